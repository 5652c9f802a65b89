"""``twistd stop``: command-line options, the service tree, and its life.

``makeService`` stays short: construction is in :func:`build`, which tests
call directly with a Clock or a real reactor. The top of the tree,
:class:`Lifecycle`, is what an administrator meets (stop(8), SIGNALS and
EXIT STATUS):

- a daemon that cannot start says why in one line, on standard error and in
  the log, and exits non-zero, whatever twistd's version: a bad option or
  setting is reported by the daemon, not as a twistd usage error (twistd
  22.4 prints its whole usage and exits 0 on one), and a part that fails to
  start raises :class:`StartFailed`, which becomes that line and
  ``SystemExit``;
- once every listener listens and the store is open, one start-up line
  names the version, the bound addresses, the store and the hooks;
- SIGHUP reopens the log file and reloads the settings that may change
  while running (:data:`stop.config.RELOADABLE`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, NoReturn, Optional

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import ILogObserver, Logger
from twisted.python import components, usage
from twisted.python.failure import Failure

import stop
from stop import config as config_mod
from stop import logsetup, plugins
from stop.answer import Answerer
from stop.client import ClientBudget, RecursiveClient
from stop.recursion import LocalAddresses, Recursion
from stop.sv import ProcessState
from stop.errors import ConfigError, StartFailed, StopError
from stop.hooks import Hooks, HooksService
from stop.interfaces import IRecordStore, ISocketLookup
from stop.optin import OptIn
from stop.os import make_inspector, make_lookup
from stop.os.common import in_thread_pool
from stop.os.accounts import Accounts
from stop.server import IdentFactory
from stop.storage import make_storage

log = Logger()

#: Exit status when the daemon cannot start: the store cannot be opened, an
#: address cannot be listened on.
EXIT_FAILURE = 1
#: Exit status for a bad configuration: the config file cannot be read, a
#: bad setting or option, a plugin that is not there or cannot be built.
EXIT_CONFIG = 2


class Options(usage.Options):
    """Options of the stop plugin; each overrides the config file.

    A bad option or setting does not raise: it is kept in ``self["error"]``
    and reported by the daemon once twistd's log is open (see the module
    docstring).
    """

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
        self["settings"] = None
        self["error"] = None  # why the daemon cannot start, if it cannot

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to listen on, e.g. tcp:1113:interface=127.0.0.1
        (repeatable; replaces the setting listen)."""
        self["listen"].append(endpoint)

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            self["error"] = f"command line: {e} (see twistd stop --help)"

    def postOptions(self) -> None:
        if self["config"] is not None:
            # Read again on SIGHUP, after twistd changed to its --rundir.
            self["config"] = os.path.abspath(self["config"])
        self["overrides"] = {
            "listen": tuple(self["listen"]) or None,
            "data_dir": self["data-dir"],
            "storage": self["storage"],
            "errors": self["errors"],
        }
        try:
            self["settings"] = self.load()
        except ConfigError as e:
            self["error"] = str(e)

    def load(self) -> config_mod.Config:
        """The settings: the config file, then the options over it.

        :raise ConfigError: the file cannot be read or holds a bad setting.
        """
        return config_mod.load(self["config"], self["overrides"])


class Twistd:
    """What twistd itself was told (its options, the parent of ours):
    where it logs and, once daemonized, the pipe its parent process waits on.
    Empty when the daemon is not run by twistd (tests)."""

    def __init__(self, options: Optional[Mapping] = None):
        self.options = options if options is not None else {}

    def log_path(self) -> Optional[str]:
        """The file twistd logs to, as twistd decides it; None when it logs
        to standard output, to syslog or through ``--logger``."""
        o = self.options
        if not o or o.get("logger") or o.get("syslog"):
            return None
        path = o.get("logfile")
        if path == "-" or (not path and o.get("nodaemon")):
            return None
        return path or "twistd.log"

    def logs_to_stdout(self) -> bool:
        """Whether twistd writes its log lines to standard output (``--nodaemon``
        with ``--logfile=-`` or no log file: under systemd, the journal)."""
        o = self.options
        if not o or o.get("logger") or o.get("syslog") or not o.get("nodaemon"):
            return False
        return o.get("logfile") in ("-", None, "")

    def log_on_stderr(self) -> bool:
        """Whether the log already goes where standard error goes (the
        journal, a terminal): then a start failure is not shown twice."""
        o = self.options
        if not o or o.get("logger") or o.get("syslog") or self.log_path() is not None:
            return False
        try:
            out, err = os.fstat(1), os.fstat(2)
        except OSError:
            return False
        return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


class StoreService(service.Service):
    """Opens the store when the daemon starts (after twistd dropped its
    privileges, so files belong to the daemon's user) and closes it last.

    The head of a chained store (``head()``: count and hash) is logged once
    it is open, every ``head_interval`` seconds (setting
    ``head_log_interval``; 0: not in between) and once it is closed: a copy
    held elsewhere (syslog) is what ``stopctl verify --all --head`` checks a
    truncated store against.
    """

    def __init__(self, store: IRecordStore, data_dir: str, head_interval: float = 0.0,
                 reactor=None):
        self.store = store
        self._data_dir = data_dir
        self._head_interval = head_interval
        self._reactor = reactor
        self._head_loop: Optional[task.LoopingCall] = None

    def startService(self) -> None:
        try:
            self.store.open()
        except (StopError, OSError) as e:
            # Answering without a working store would lose records.
            raise StartFailed(f"cannot open the record store (storage = {self.store.name}, "
                              f"data_dir = {self._data_dir}): {e}", EXIT_FAILURE) from None
        super().startService()
        log.info("record store {name} open", name=self.store.name)
        if getattr(self.store, "head", None) is None:
            return
        self.log_head("at start")
        if self._head_interval > 0:
            self._head_loop = task.LoopingCall(self.log_head, "every %g s" % self._head_interval)
            if self._reactor is not None:
                self._head_loop.clock = self._reactor
            self._head_loop.start(self._head_interval, now=False)

    def log_head(self, when: str) -> None:
        """Log the chain head (never raises: a LoopingCall that raises stops for good)."""
        try:
            if when != "at stop" and getattr(self.store, "recount_usage", None) is not None:
                self.store.recount_usage()  # segments a prune removed stop counting
            count, chain = self.store.head()
            log.info("record store chain head {when}: {head} ({name} in {data_dir}); "
                     "stopctl verify --all --head {head} checks the store against it",
                     when=when, head=f"{count}:{chain}", name=self.store.name,
                     data_dir=self._data_dir)
        except Exception:
            log.failure("cannot log the record store's chain head")

    def stopService(self):
        super().stopService()
        if self._head_loop is not None and self._head_loop.running:
            self._head_loop.stop()
        self._head_loop = None
        d = self.store.close()
        if getattr(self.store, "head", None) is not None:
            d.addCallback(lambda _: self.log_head("at stop"))
        return d


class ListenService(service.Service):
    """Listens on one endpoint of the setting ``listen``.

    :param endpoint: the IStreamServerEndpoint to use; by default the one
        ``description`` names.
    :attr listening: a Deferred firing with the IListeningPort, or failing
        with StartFailed; set once the service started.
    :raise ConfigError: ``description`` is not a server endpoint string.
    """

    def __init__(self, description: str, factory, reactor, endpoint=None):
        self.description = description
        if endpoint is None:
            try:
                endpoint = endpoints.serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"listen: {description!r} is not a server endpoint: "
                                  f"{e}") from None
        self._endpoint = endpoint
        self._factory = factory
        self.port = None
        self.listening: Optional[defer.Deferred] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()  # as root under twistd --uid: port 113

    def startService(self) -> None:
        super().startService()
        if self.listening is None:  # started without the privileged step (tests)
            self._listen()

    def _listen(self) -> None:
        d = defer.maybeDeferred(self._endpoint.listen, self._factory)
        d.addCallbacks(self._listened, self._cannot_listen)
        if d.called:  # TCP and UNIX endpoints answer at once: fail now
            result = []
            d.addBoth(result.append)
            if isinstance(result[0], Failure):
                result[0].raiseException()
            d = defer.succeed(result[0])
        self.listening = d

    def _listened(self, port):
        self.port = port
        return port

    def _cannot_listen(self, failure: Failure) -> NoReturn:
        raise StartFailed(f"listen = {self.description}: {failure.getErrorMessage()}",
                          EXIT_FAILURE)

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if self.listening is not None and not self.listening.called:
            self.listening.cancel()
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


class RecursionService(service.Service):
    """Ends the recursion's questions in flight when the daemon stops."""

    def __init__(self, recursion: Recursion):
        self.recursion = recursion

    def stopService(self):
        super().stopService()
        return self.recursion.close()


def address_text(address) -> str:
    """A bound address for the log: ``127.0.0.1:113``, ``[::]:113``, a
    UNIX socket's path."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None) or address
        return os.fsdecode(name) if isinstance(name, bytes) else str(name)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Daemon:
    """The parts of a running daemon, for makeService and for tests."""

    service: "Lifecycle"
    factory: IdentFactory
    answerer: Answerer
    lookup: ISocketLookup
    store: IRecordStore
    #: The settings in force (a reload replaces them).
    settings: config_mod.Config
    listeners: list

    def listening(self) -> defer.Deferred:
        """Fires with the listening ports once every listener listens;
        fails with the first StartFailed."""
        d = defer.gatherResults([l.listening for l in self.listeners], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        return d

    def log_started(self, ports) -> None:
        s = self.settings
        log.info("stop {version} started (pid {pid}): listening on {addresses}; "
                 "store {store} in {data_dir}; hooks: {hooks}; lookup {lookup}, errors {errors}",
                 version=stop.__version__, pid=os.getpid(),
                 addresses=" ".join(address_text(p.getHost()) for p in ports),
                 store=self.store.name, data_dir=s.data_dir, hooks=" ".join(s.hooks) or "none",
                 lookup=self.lookup.name, errors=s.errors)


def build(settings: config_mod.Config, reactor, top: Optional["Lifecycle"] = None) -> Daemon:
    """Build every part from the settings, as children of ``top`` (a new
    :class:`Lifecycle` by default).

    :raise ConfigError: a backend named in the settings does not exist, or
        a ``listen`` value is not an endpoint.
    """
    top = top if top is not None else Lifecycle(reactor)
    # A name that is not built in is a site plugin's (stop-plugins(7)).
    lookup = make_lookup(settings, reactor)
    store = make_storage(settings, reactor)
    inspector = make_inspector(settings, reactor)
    in_threads = in_thread_pool(reactor)
    addresses = LocalAddresses(settings.local_addresses, reactor)  # the walk's and recursion's
    process_state = ProcessState(settings, inspector, in_threads, addresses)
    hooks = Hooks(plugins.build_hooks(settings, reactor))
    recursion = Recursion(settings, RecursiveClient(reactor, ClientBudget.from_config(settings)),
                          store, reactor, addresses)
    # Blocking OS calls (slow lookups, NSS, ~/.ident) run in worker threads.
    answerer = Answerer(settings, lookup, store, reactor, run=in_threads,
                        accounts=Accounts.from_config(settings, reactor, in_threads),
                        optin=OptIn.from_config(settings, reactor, in_threads),
                        process_state=process_state,
                        hooks=hooks, recursion=recursion)
    factory = IdentFactory(settings, answerer, reactor)
    listeners = [ListenService(endpoint, factory, reactor) for endpoint in settings.listen]
    syslog = logsetup.syslog_service(settings)
    if syslog is not None:  # first started, last stopped: it sees every event
        syslog.setServiceParent(top)
    if hooks.hooks:  # stopped after the listeners: no record meets a closed hook
        HooksService(hooks).setServiceParent(top)
    # The store starts before the listeners, so no query meets a closed store.
    StoreService(store, settings.data_dir, settings.head_log_interval, reactor).setServiceParent(top)
    # Stopped after the listeners, before the store: outcomes of questions
    # cut short are still saved.
    RecursionService(recursion).setServiceParent(top)
    if settings.redeem_listen:  # after the store: it reads records (docs/redeem.rst)
        from stop.redeem.service import redemption_service
        redemption_service(settings, store, reactor).setServiceParent(top)
    for listener in listeners:
        listener.setServiceParent(top)
    daemon = Daemon(top, factory, answerer, lookup, store, settings, listeners)
    top.daemon = daemon
    return daemon


class Lifecycle(service.MultiService):
    """The top of the service tree, what twistd starts and stops: start
    failures, the start-up line, SIGHUP (see the module docstring).

    :param twistd: what twistd was told; without it (tests) no log file
        is taken over (and makeService installs no SIGHUP handler).
    :param load: reads the settings again (``Options.load``), for reloads.
    :param exit: ends the process when a start fails after the reactor
        started (an endpoint that listens later than at once).
    """

    def __init__(self, reactor, twistd: Optional[Twistd] = None,
                 load: Optional[Callable[[], config_mod.Config]] = None,
                 exit: Callable[[int], None] = os._exit):
        super().__init__()
        self._reactor = reactor
        self.twistd = twistd if twistd is not None else Twistd()
        self._load = load
        self._exit = exit
        #: Set by build(); None when the configuration could not be built.
        self.daemon: Optional[Daemon] = None
        #: Why the daemon cannot start, found before it started.
        self.failure: Optional[StartFailed] = None
        #: twistd's log file, when it logs to one (reopened on SIGHUP).
        self.log_file = None
        #: The observer writing twistd's lines (to log_file or standard
        #: output), when it is ours: flushed before the file is reopened.
        self.log_observer: Optional[logsetup.TextLogObserver] = None

    def setServiceParent(self, parent) -> None:
        # twistd puts this service into its Application, then starts its
        # log: a log observer set on the Application now is the one twistd
        # uses (AppLogger.start), so its file is ours to reopen on SIGHUP,
        # and its lines (twistd's own) cost less CPU (logsetup.TextLogObserver).
        path = self.twistd.log_path()
        if (isinstance(parent, components.Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            if path is not None:
                self.log_file, self.log_observer = logsetup.file_observer(path, self._reactor)
            elif self.twistd.logs_to_stdout():
                self.log_observer = logsetup.TextLogObserver(sys.stdout, reactor=self._reactor)
            if self.log_observer is not None:
                parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        self._starting(super().privilegedStartService)

    def startService(self) -> None:
        self._starting(super().startService)
        if self.daemon is not None:
            d = self.daemon.listening()
            d.addCallbacks(self.daemon.log_started, self._failed_later)

    def _starting(self, step: Callable[[], None]) -> None:
        try:
            if self.failure is not None:
                raise self.failure
            step()
        except StartFailed as e:
            self._report(e)
            raise SystemExit(e.status) from None

    def _report(self, e: StartFailed) -> None:
        """The one line: in the log, on standard error, and to twistd's
        parent process when daemonized (it prints it and exits 1)."""
        log.critical("cannot start: {why}", why=str(e))
        line = f"stop: cannot start: {e}\n"
        if sys.__stderr__ is not None and not self.twistd.log_on_stderr():
            sys.__stderr__.write(line)
            sys.__stderr__.flush()
        pipe = self.twistd.options.get("statusPipe")
        if pipe is not None:
            self.twistd.options["statusPipe"] = None
            # twistd reads 100 bytes and prints them after "An error has occurred:".
            os.write(pipe, (b"1 " + str(e).encode("utf-8", "replace"))[:100])
            os.close(pipe)

    def _failed_later(self, failure: Failure) -> None:
        e = failure.value
        if not isinstance(e, StartFailed):
            e = StartFailed(failure.getErrorMessage(), EXIT_FAILURE)
        self._report(e)
        self._reactor.addSystemEventTrigger("after", "shutdown", self._end, e.status)
        self._reactor.callWhenRunning(self._reactor.stop)

    def _end(self, status: int) -> None:
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        self._exit(status)

    def sighup(self, signum, frame) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: reopen the log file; read the settings again and apply
        those that may change while running (stop.config.RELOADABLE) to the
        parts holding them; log the other changes as needing a restart. A
        file that cannot be read or holds a bad setting changes nothing."""
        if self.log_file is not None:
            try:
                try:
                    self.log_observer.flush()  # the lines so far: to the file logrotate moved
                finally:
                    self.log_file.reopen()
            except OSError as e:
                log.error("SIGHUP: cannot reopen the log file: {err}", err=str(e))
        daemon = self.daemon
        if daemon is None or self._load is None or not self.running:
            return
        try:
            new = self._load()
        except ConfigError as e:
            log.error("SIGHUP: reload failed, nothing changed: {why}", why=str(e))
            return
        running = daemon.settings
        changed = [f.name for f in dataclasses.fields(new)
                   if getattr(new, f.name) != getattr(running, f.name)]
        later = [name for name in changed if name not in config_mod.RELOADABLE]
        now = {name: getattr(new, name) for name in changed if name in config_mod.RELOADABLE}
        if later:
            log.warn("SIGHUP: changed, in effect only after a restart: {names}",
                     names=", ".join(_setting_name(name) for name in later))
        if now:
            daemon.settings = running.replace(**now)
            daemon.factory.reconfigure(daemon.settings)
            daemon.answerer.reconfigure(daemon.settings)
            log.info("SIGHUP: settings reloaded: {changes}",
                     changes=", ".join(f"{name} = {_value_text(value)}"
                                       for name, value in now.items()))
        elif not later:
            log.info("SIGHUP: settings reloaded: no change")


def _setting_name(name: str) -> str:
    return "[plugin NAME] sections" if name == "plugin_settings" else name


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def makeService(options: Options, reactor=None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    top = Lifecycle(reactor, Twistd(getattr(options, "parent", None)), options.load)
    if top.twistd.options:
        # From now on, not only once started: a SIGHUP while the daemon
        # starts would end it (the reload waits for the reactor).
        signal.signal(signal.SIGHUP, top.sighup)
    try:
        if options["error"] is not None:
            raise ConfigError(options["error"])
        build(options["settings"], reactor, top)
    except StopError as e:
        # Reported once twistd's log is open, when the service starts.
        top.failure = StartFailed(str(e), EXIT_CONFIG if isinstance(e, ConfigError)
                                  else EXIT_FAILURE)
    return top
