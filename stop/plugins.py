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
from typing import Callable, Iterable, Mapping, Sequence

from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass

import stop
from stop.errors import ConfigError
from stop.interfaces import (IHookPlugin, ILookupPlugin, IProcessInspector, IProcessPlugin,
                             IRecordHook, IRecordStore, ISocketLookup, IStorePlugin)

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


def find(interface: InterfaceClass, name: str, dirs: Sequence[str], setting: str,
         built_in: Iterable[str] = ()):
    """The plugin ``name`` providing ``interface`` in ``dirs``.

    :param built_in: the built-in names of ``setting``, for the message.
    :raise ConfigError: there is none; the message names the setting, the
        built-in choices, the directories and the plugins that were found.
    """
    return _pick(available(interface, dirs), name, dirs, setting, built_in)


def _pick(plugins: dict, name: str, dirs: Sequence[str], setting: str,
          built_in: Iterable[str] = ()):
    try:
        return plugins[name]
    except KeyError:
        choices = ", ".join(sorted(built_in))
        raise ConfigError(
            f"{setting}: {name!r} is neither built in{f' ({choices})' if choices else ''} "
            f"nor a plugin in {' '.join(dirs) or '(no plugin_dirs)'} (plugins found: "
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


#: Backend settings -> (the plugin interface, what its build() makes).
KINDS = {
    "storage": (IStorePlugin, IRecordStore),
    "lookup": (ILookupPlugin, ISocketLookup),
    "process_backend": (IProcessPlugin, IProcessInspector),
}


def make(setting: str, built_in: Mapping[str, Callable], config, reactor):
    """Build the backend of kind ``setting`` (a key of :data:`KINDS`) that
    ``config`` names: a built-in one, ``built_in[name](config, reactor)``,
    else the site plugin of that name. Every backend factory
    (``stop.os.make_lookup``, ``stop.os.make_inspector``,
    ``stop.storage.make_storage``) is this with its own table.

    :raise ConfigError: no such built-in or plugin, or it could not be built.
    """
    name = getattr(config, setting)
    factory = built_in.get(name)
    if factory is not None:
        return factory(config, reactor)
    return build(setting, config, reactor, built_in)


def build(setting: str, config, reactor, built_in: Iterable[str] = ()):
    """The backend of the site plugin named by ``config.<setting>``.

    :raise ConfigError: no such plugin, or it could not be built.
    """
    plugin_interface, produced = KINDS[setting]
    plugin = find(plugin_interface, getattr(config, setting), config.plugin_dirs, setting,
                  built_in)
    return _build(plugin, produced, config, reactor, setting)


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
