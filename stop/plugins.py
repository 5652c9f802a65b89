"""Site plugins: find them in ``plugin_dirs`` and build what stop.conf selects.

A plugin directory is searched as a package path for
``twisted.plugin.getPlugins``: every ``*.py`` in it is imported (as a
submodule of a private package named after the directory) and every
module-level object providing ``IPlugin`` and the asked interface is a
candidate; its ``name`` attribute is what stop.conf selects. Directories are
searched in order; a missing one is skipped, and so is one that group or
others may write to (logged); the first plugin of a name wins.

twisted.plugin keeps a ``dropin.cache`` next to the modules when it can
write there (a run as root); the daemon's user normally cannot, and then
Twisted logs that it could not write the cache: harmless.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from typing import Iterable, Sequence

from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass

import stop
from stop.errors import ConfigError
from stop.interfaces import (IHookPlugin, ILookupPlugin, IRecordHook, IRecordStore,
                             ISocketLookup, IStorePlugin)

log = Logger()

_PREFIX = "_stop_site_plugins_"


def plugin_package(directory: str) -> types.ModuleType:
    """A package object whose ``__path__`` is ``directory`` (absolute), for
    ``getPlugins``; the same object for the same directory."""
    directory = os.path.abspath(directory)
    name = _PREFIX + hashlib.sha256(directory.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    package = sys.modules.get(name)
    if package is None:
        package = types.ModuleType(name, f"stop site plugins in {directory}")
        package.__path__ = [directory]
        # twisted.python.modules wants an existing __init__ file to call a
        # module a package; any will do, as __path__ says where to look.
        package.__file__ = stop.__file__
        sys.modules[name] = package
    return package


def available(interface: InterfaceClass, dirs: Iterable[str]) -> dict[str, object]:
    """Every plugin providing ``interface`` in ``dirs``, by name.

    A module that fails to import is logged by twisted.plugin and skipped;
    a plugin without a usable ``name``, or whose name an earlier one has,
    is logged and skipped.
    """
    found: dict[str, object] = {}
    for directory in dirs:
        if not os.path.isdir(directory):
            continue
        if os.stat(directory).st_mode & 0o022:
            # Whoever can write there could run code as the daemon.
            log.warn("plugin directory {dir} is writable by group or others: ignored",
                     dir=directory)
            continue
        for plugin in getPlugins(interface, plugin_package(directory)):
            name = getattr(plugin, "name", None)
            if not isinstance(name, str) or not name:
                log.warn("plugin {plugin!r} in {dir} has no name: ignored",
                         plugin=plugin, dir=directory)
            elif name in found:
                log.warn("plugin {name} in {dir} ignored: one of that name was found first",
                         name=name, dir=directory)
            else:
                found[name] = plugin
    return found


def find(interface: InterfaceClass, name: str, dirs: Sequence[str], setting: str):
    """The plugin ``name`` providing ``interface`` in ``dirs``.

    :raise ConfigError: there is none; the message names the setting, the
        directories and the plugins that were found.
    """
    return _pick(available(interface, dirs), name, dirs, setting)


def _pick(plugins: dict, name: str, dirs: Sequence[str], setting: str):
    try:
        return plugins[name]
    except KeyError:
        raise ConfigError(
            f"{setting}: {name!r} is neither built in nor a plugin in "
            f"{' '.join(dirs) or '(no plugin_dirs)'} (plugins found: "
            f"{', '.join(sorted(plugins)) or 'none'}; see the log for modules that failed)"
        ) from None


def _build(plugin, produced: InterfaceClass, config, reactor, setting: str):
    try:
        thing = plugin.build(config, reactor)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{setting}: plugin {plugin.name!r} failed to build: "
                          f"{type(e).__name__}: {e}") from e
    if not produced.providedBy(thing):
        raise ConfigError(f"{setting}: plugin {plugin.name!r} built {thing!r}, "
                          f"which does not provide {produced.getName()}")
    return thing


def build_store(config, reactor) -> IRecordStore:
    """The store of the plugin named by ``config.storage``.

    :raise ConfigError: no such plugin, or it could not be built.
    """
    plugin = find(IStorePlugin, config.storage, config.plugin_dirs, "storage")
    return _build(plugin, IRecordStore, config, reactor, "storage")


def build_lookup(config, reactor) -> ISocketLookup:
    """The lookup of the plugin named by ``config.lookup``.

    :raise ConfigError: no such plugin, or it could not be built.
    """
    plugin = find(ILookupPlugin, config.lookup, config.plugin_dirs, "lookup")
    return _build(plugin, ISocketLookup, config, reactor, "lookup")


def build_hooks(config, reactor) -> list:
    """The record hooks named by ``config.hooks``, in that order.

    :raise ConfigError: a name that is no plugin, or a hook that could not
        be built.
    """
    if not config.hooks:
        return []
    plugins = available(IHookPlugin, config.plugin_dirs)
    hooks = []
    for name in config.hooks:
        plugin = _pick(plugins, name, config.plugin_dirs, "hooks")
        hooks.append(_build(plugin, IRecordHook, config, reactor, "hooks"))
    return hooks
