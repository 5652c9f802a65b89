"""``twistd stop``: command-line options and the service tree.

``makeService`` stays short: construction is in :func:`build`, which tests
call directly with a Clock or a real reactor.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python import usage

from stop import config as config_mod
from stop import logsetup, plugins
from stop.answer import Answerer
from stop.client import ClientBudget, RecursiveClient
from stop.recursion import LocalAddresses, Recursion
from stop.sv import ProcessState, in_thread_pool
from stop.errors import ConfigError, StopError
from stop.hooks import Hooks, HooksService
from stop.interfaces import IRecordStore, ISocketLookup
from stop.os import make_inspector, make_lookup
from stop.server import IdentFactory
from stop.storage import STORES, make_store

log = Logger()


class Options(usage.Options):
    """Options of the stop plugin; each overrides the config file."""

    synopsis = "[--config PATH] [--listen ENDPOINT ...] [options]"
    longdesc = ("Session TOken Protocol daemon: answers RFC 1413 ident queries with privacy "
                "tokens and saves a record of each. Settings come from the config file "
                "(see stop.conf(5)); these options override it.")
    optParameters = [
        ["config", "c", None, "Config file (INI, section [stop]); without it, built-in defaults."],
        ["data-dir", "d", None, "Directory for records (setting data_dir)."],
        ["storage", None, None, "Record store: flat, gzip, or a plugin's name (setting storage)."],
        ["errors", None, None, "Error policy: normal, unknown or token (setting errors)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to listen on, e.g. tcp:1113:interface=127.0.0.1
        (repeatable; replaces the setting listen)."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        overrides = {
            "listen": tuple(self["listen"]) or None,
            "data_dir": self["data-dir"],
            "storage": self["storage"],
            "errors": self["errors"],
        }
        try:
            self["settings"] = config_mod.load(self["config"], overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class StoreService(service.Service):
    """Opens the store when the daemon starts (after twistd dropped its
    privileges, so files belong to the daemon's user) and closes it last."""

    def __init__(self, store: IRecordStore, reactor):
        self.store = store
        self._reactor = reactor

    def startService(self) -> None:
        try:
            self.store.open()
        except StopError as e:
            log.critical("cannot open the record store: {err}; stopping", err=str(e))
            # Answering without a working store would lose records.
            self._reactor.callWhenRunning(self._reactor.stop)
            return
        super().startService()
        log.info("record store {name} open", name=self.store.name)

    def stopService(self):
        super().stopService()
        return self.store.close()


class RecursionService(service.Service):
    """Ends the recursion's questions in flight when the daemon stops."""

    def __init__(self, recursion: Recursion):
        self.recursion = recursion

    def stopService(self):
        super().stopService()
        return self.recursion.close()


@dataclass
class Daemon:
    """The parts of a running daemon, for makeService and for tests."""

    service: service.MultiService
    factory: IdentFactory
    answerer: Answerer
    lookup: ISocketLookup
    store: IRecordStore


def build(settings: config_mod.Config, reactor) -> Daemon:
    """Build every part from the settings.

    :raise ConfigError: a backend named in the settings does not exist.
    """
    # A name that is not built in is a site plugin's (stop-plugins(7)).
    lookup = make_lookup(settings, reactor)
    if settings.storage in STORES:
        store = make_store(settings.storage, settings.data_dir, reactor=reactor,
                           fsync=settings.fsync)
    else:
        store = plugins.build_store(settings, reactor)
    inspector = make_inspector(settings, reactor)
    addresses = LocalAddresses(settings.local_addresses, reactor)  # the walk's and recursion's
    process_state = ProcessState(settings, inspector, in_thread_pool(reactor), addresses)
    hooks = Hooks(plugins.build_hooks(settings, reactor))
    recursion = Recursion(settings, RecursiveClient(reactor, ClientBudget.from_config(settings)),
                          store, reactor, addresses)
    answerer = Answerer(settings, lookup, store, reactor, process_state=process_state,
                        hooks=hooks, recursion=recursion)
    factory = IdentFactory(settings, answerer, reactor)
    top = service.MultiService()
    syslog = logsetup.syslog_service(settings)
    if syslog is not None:  # first started, last stopped: it sees every event
        syslog.setServiceParent(top)
    if hooks.hooks:  # stopped after the listeners: no record meets a closed hook
        HooksService(hooks).setServiceParent(top)
    # The store starts before the listeners, so no query meets a closed store.
    StoreService(store, reactor).setServiceParent(top)
    # Stopped after the listeners, before the store: outcomes of questions
    # cut short are still saved.
    RecursionService(recursion).setServiceParent(top)
    for endpoint in settings.listen:
        strports.service(endpoint, factory, reactor=reactor).setServiceParent(top)
    log.info("stop: lookup {lookup}, storage {storage} in {dir}, errors {errors}, "
             "listening on {listen}", lookup=lookup.name, storage=settings.storage,
             dir=settings.data_dir, errors=settings.errors, listen=" ".join(settings.listen))
    return Daemon(top, factory, answerer, lookup, store)


def makeService(options: Options, reactor=None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        return build(options["settings"], reactor).service
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
