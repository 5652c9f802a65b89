"""stop.tap: the plugin's options, the service tree, and its life: start
failures as one line and an exit status, the start-up line, reloads.
(tests/integration/test_lifecycle.py runs the same through real twistd.)"""

import os
import signal
import socket

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, formatEvent, formatTime, globalLogPublisher
from zope.interface.verify import verifyObject

import stop
from stop import logsetup, tap
from stop.config import RELOADABLE, Config
from stop.errors import ConfigError, StartFailed
from stop.interfaces import IRecordStore, ISocketLookup


def parse(*argv):
    o = tap.Options()
    o.parseOptions(list(argv))
    return o


@pytest.fixture
def events():
    """The log events emitted during the test."""
    seen = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def texts(events, level=None):
    return [formatEvent(e) for e in events if level is None or e["log_level"] == level]


def memory_settings(tmp_path, **changes):
    return Config(**{"listen": ("tcp:0:interface=127.0.0.1",), "data_dir": str(tmp_path),
                     "storage": "memory", **changes})


# -- options ------------------------------------------------------------------

def test_no_options_are_the_defaults():
    o = parse()
    assert o["settings"] == Config() and o["error"] is None


def test_options_override_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "stop.conf"
    conf.write_text("[stop]\nerrors = unknown\nstorage = gzip\nlisten = tcp:9:interface=127.0.0.1\n")
    s = parse("--config", str(conf), "--listen", "tcp:1113:interface=127.0.0.1",
              "--listen", "tcp6:1113:interface=\\:\\:1", "--data-dir", str(tmp_path),
              "--errors", "token")["settings"]
    assert s == Config(listen=("tcp:1113:interface=127.0.0.1", "tcp6:1113:interface=\\:\\:1"),
                       data_dir=str(tmp_path), storage="gzip", errors="token")
    assert parse("--config", str(conf))["settings"].listen == ("tcp:9:interface=127.0.0.1",)
    # A relative path is made absolute: SIGHUP reads it after twistd's chdir.
    monkeypatch.chdir(tmp_path)
    o = parse("--config", "stop.conf", "--errors", "token")
    assert o["config"] == str(conf)
    conf.write_text("[stop]\nerrors = unknown\nhash = sha256\n")
    monkeypatch.chdir("/")
    assert o.load() == Config(errors="token", hash="sha256")  # the option still wins


@pytest.mark.parametrize("argv,message", [
    (["--errors", "loud"], "command line: errors: 'loud' is not one of normal, unknown, token"),
    (["--storage", ""], "command line: storage: must not be empty"),
    (["--config", "/nonexistent/stop.conf"],
     "cannot read config file /nonexistent/stop.conf: No such file or directory"),
    (["--bogus"], "command line: option --bogus not recognized (see twistd stop --help)"),
    (["--listen"], "command line: option --listen requires argument (see twistd stop --help)"),
])
def test_bad_options_are_kept_for_the_daemon_to_report(argv, message):
    # Not a UsageError: twistd 22.4 would print its usage and exit 0.
    o = parse(*argv)
    assert o["error"] == message and o["settings"] is None


def test_a_bad_setting_in_the_file_names_the_file(tmp_path):
    conf = tmp_path / "stop.conf"
    conf.write_text("[stop]\nmax_pipeline = 0\n")
    assert parse("--config", str(conf))["error"] == (
        f"{conf}: max_pipeline: must be at least 1, not 0")


# -- start failures -------------------------------------------------------------

def start(top):
    """Start ``top`` as twistd does: privileged first."""
    top.privilegedStartService()
    top.startService()


def failed_start(top, capfd):
    """Start ``top``; it must exit: (status, stderr lines)."""
    with pytest.raises(SystemExit) as exc:
        start(top)
    return exc.value.code, capfd.readouterr().err.splitlines()


@pytest.mark.parametrize("argv,status,words", [
    (["--errors", "loud"], tap.EXIT_CONFIG, "command line: errors: 'loud'"),
    (["--bogus"], tap.EXIT_CONFIG, "option --bogus not recognized"),
    (["--storage", "nosuch"], tap.EXIT_CONFIG, "storage: 'nosuch' is neither built in (flat, gzip, memory) nor a plugin"),
    (["--listen", "foo:1"], tap.EXIT_CONFIG, "listen: 'foo:1' is not a server endpoint"),
])
def test_a_bad_configuration_exits_2_with_one_line(argv, status, words, tmp_path, events, capfd):
    top = tap.makeService(parse("--data-dir", str(tmp_path), *argv), MemoryReactorClock())
    assert top.daemon is None
    code, err = failed_start(top, capfd)
    assert code == status == 2
    assert len(err) == 1 and err[0].startswith("stop: cannot start: ") and words in err[0], err
    [critical] = texts(events, LogLevel.critical)
    assert critical == "cannot start: " + err[0][len("stop: cannot start: "):]


def test_a_store_that_cannot_open_exits_1(tmp_path, events, capfd):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    settings = Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=str(not_a_dir))
    d = tap.build(settings, MemoryReactorClock())
    code, err = failed_start(d.service, capfd)
    assert code == tap.EXIT_FAILURE == 1
    assert err == [f"stop: cannot start: cannot open the record store (storage = flat, "
                   f"data_dir = {not_a_dir}): store directory {not_a_dir} is not a directory"]
    assert len(texts(events, LogLevel.critical)) == 1
    assert not any("started" in t for t in texts(events))


def test_an_address_in_use_exits_1(tmp_path, capfd):
    from twisted.internet import reactor
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        d = tap.build(memory_settings(tmp_path, listen=(f"tcp:{port}:interface=127.0.0.1",)),
                      reactor)
        code, err = failed_start(d.service, capfd)
    assert code == 1
    assert len(err) == 1 and err[0].startswith(
        f"stop: cannot start: listen = tcp:{port}:interface=127.0.0.1: Couldn't listen on "
        f"127.0.0.1:{port}: [Errno 98]"), err


class LaterEndpoint:
    """An endpoint that answers listen() later, when the test says."""

    def __init__(self):
        self.d = defer.Deferred()

    def listen(self, factory):
        return self.d


class FakePort:
    def __init__(self, address):
        self.address = address

    def getHost(self):
        return self.address

    def stopListening(self):
        return None


def with_later_listener(tmp_path, reactor, exits):
    top = tap.Lifecycle(reactor, exit=exits.append)
    d = tap.build(memory_settings(tmp_path), reactor, top)
    d.listeners[0].disownServiceParent()
    later = LaterEndpoint()
    d.listeners[0] = tap.ListenService("later:1", d.factory, reactor, endpoint=later)
    d.listeners[0].setServiceParent(top)
    return d, later


def test_a_listener_failing_later_stops_the_reactor_and_exits_1(tmp_path, events, capfd):
    reactor, exits = MemoryReactorClock(), []
    d, later = with_later_listener(tmp_path, reactor, exits)
    start(d.service)
    assert exits == [] and not texts(events, LogLevel.critical)
    later.d.errback(CannotListenError("::", 1, OSError("no")))
    assert capfd.readouterr().err.startswith("stop: cannot start: listen = later:1: Couldn't listen")
    reactor.run()  # the stop waits for the reactor to run
    assert reactor.hasStopped
    for f, args, kw in reactor.triggers["after"]["shutdown"]:
        f(*args, **kw)
    assert exits == [1]


def test_the_start_up_line_names_version_addresses_store_and_hooks(tmp_path, events):
    reactor = MemoryReactorClock()
    d, later = with_later_listener(tmp_path, reactor, [])
    start(d.service)
    assert not [t for t in texts(events) if " started " in t]  # not before every listener
    later.d.callback(FakePort(IPv6Address("TCP", "::1", 1113)))
    [line] = [t for t in texts(events) if " started " in t]
    assert line == (f"stop {stop.__version__} started (pid {os.getpid()}): listening on "
                    f"[::1]:1113; store memory in {tmp_path}; hooks: none; lookup "
                    f"{d.lookup.name}, errors normal")
    assert d.listeners[0].port is not None
    d.service.stopService()
    assert d.listeners[0].port is None


def test_address_text():
    from twisted.internet.address import IPv4Address, UNIXAddress
    assert tap.address_text(IPv4Address("TCP", "0.0.0.0", 113)) == "0.0.0.0:113"
    assert tap.address_text(IPv6Address("TCP", "::", 113)) == "[::]:113"
    assert tap.address_text(UNIXAddress(b"/run/stop.sock")) == "/run/stop.sock"


# -- the tree -------------------------------------------------------------------

def test_build_wires_every_part(tmp_path):
    d = tap.build(memory_settings(tmp_path), Clock())
    verifyObject(ISocketLookup, d.lookup)
    verifyObject(IRecordStore, d.store)
    children = list(d.service)
    assert isinstance(children[0], tap.StoreService)  # opened before any listener
    assert isinstance(children[1], tap.RecursionService)  # stopped before the store
    assert children[2:] == d.listeners and isinstance(d.listeners[0], tap.ListenService)
    assert isinstance(d.service, service.MultiService) and d.service.daemon is d
    assert d.factory.answerer is d.answerer and d.settings.storage == "memory"


# -- reloads ----------------------------------------------------------------------

def running(tmp_path, load):
    reactor = MemoryReactorClock()
    top = tap.Lifecycle(reactor, load=load)
    d = tap.build(memory_settings(tmp_path), reactor, top)
    start(top)
    return d


def test_a_reload_applies_what_may_change_and_logs_the_rest(tmp_path, events):
    new = memory_settings(tmp_path, errors="unknown", max_pipeline=4, address_form=("none",),
                          user_optin=False, hash="sha256", fsync="always")
    d = running(tmp_path, lambda: new)
    before = d.settings
    d.service.reload()
    assert d.settings == before.replace(errors="unknown", max_pipeline=4,
                                        address_form=("none",), user_optin=False)
    assert d.factory.config is d.settings
    assert d.answerer.error_reply((1, 1), ConfigError("x")) == b"1, 1 : ERROR : UNKNOWN-ERROR\r\n"
    assert d.answerer.tokens.random().__len__() == 40  # hash needs a restart
    [warn] = texts(events, LogLevel.warn)
    assert warn == "SIGHUP: changed, in effect only after a restart: fsync, hash"
    assert ("SIGHUP: settings reloaded: errors = unknown, address_form = none, "
            "user_optin = no, max_pipeline = 4") in texts(events, LogLevel.info)


def test_a_reload_with_no_change_says_so(tmp_path, events):
    d = running(tmp_path, lambda: memory_settings(tmp_path))
    d.service.reload()
    assert "SIGHUP: settings reloaded: no change" in texts(events)


def test_a_bad_file_on_reload_changes_nothing(tmp_path, events):
    def load():
        raise ConfigError("/etc/stop/stop.conf: errors: 'loud' is not one of normal, unknown, token")
    d = running(tmp_path, load)
    before = d.settings
    d.service.reload()
    assert d.settings is before and d.factory.config is before
    assert texts(events, LogLevel.error) == [
        "SIGHUP: reload failed, nothing changed: /etc/stop/stop.conf: errors: 'loud' is not "
        "one of normal, unknown, token"]


def test_reloadable_settings_exist():
    assert RELOADABLE <= {f for f in Config.__dataclass_fields__}


@pytest.fixture
def usr1():
    """Restore SIGUSR1 (file_observer installs twistd's rotation handler)."""
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_the_log_file_is_taken_from_twistd_and_reopened(tmp_path, usr1):
    path = tmp_path / "twistd.log"
    top = tap.Lifecycle(Clock(), tap.Twistd({"logfile": str(path), "nodaemon": True}))
    app = service.Application("stop")
    top.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    verifyObject(ILogObserver, observer)
    observer({"log_format": "before", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    os.rename(path, tmp_path / "twistd.log.1")  # what logrotate does
    top.reload()  # no daemon was built: only the file is reopened
    observer({"log_format": "after", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    assert "before" in (tmp_path / "twistd.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()
    assert callable(signal.getsignal(signal.SIGUSR1))  # twistd's rotation, as before


def test_sighup_writes_the_pending_lines_to_the_old_file_first(tmp_path, usr1):
    path = tmp_path / "twistd.log"
    reactor = MemoryReactorClock()
    reactor.running = True  # lines wait for the end of the reactor turn
    top = tap.Lifecycle(reactor, tap.Twistd({"logfile": str(path), "nodaemon": True}))
    app = service.Application("stop")
    top.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    assert observer is top.log_observer
    observer({"log_format": "before", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    assert "before" not in path.read_text()  # pending until the turn ends
    os.rename(path, tmp_path / "twistd.log.1")
    top.reload()
    observer({"log_format": "after", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    reactor.advance(0)
    assert "before" in (tmp_path / "twistd.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


def test_the_stdout_log_is_written_once_per_reactor_turn(capsys):
    reactor = MemoryReactorClock()
    reactor.running = True
    top = tap.Lifecycle(reactor, tap.Twistd({"logfile": "-", "nodaemon": True}))
    app = service.Application("stop")
    top.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    observer({"log_format": "to the journal", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    assert capsys.readouterr().out == ""
    reactor.advance(0)
    assert capsys.readouterr().out == f"{formatTime(0.0)} [t#info] to the journal\n"


@pytest.mark.parametrize("options,path", [
    ({}, None),
    ({"logfile": "-", "nodaemon": True}, None),
    ({"logfile": None, "nodaemon": True}, None),
    ({"logfile": None, "nodaemon": False}, "twistd.log"),
    ({"logfile": "/var/log/stop.log", "nodaemon": True}, "/var/log/stop.log"),
    ({"logfile": "/var/log/stop.log", "syslog": True}, None),
    ({"logfile": "/var/log/stop.log", "logger": "x.y"}, None),
])
def test_which_log_file_twistd_writes(options, path):
    assert tap.Twistd(options).log_path() == path


@pytest.mark.parametrize("options,stdout", [
    ({}, False),
    ({"logfile": "-", "nodaemon": True}, True),
    ({"logfile": None, "nodaemon": True}, True),
    ({"logfile": "-", "nodaemon": False}, False),  # twistd refuses that itself
    ({"logfile": None, "nodaemon": False}, False),
    ({"logfile": "/var/log/stop.log", "nodaemon": True}, False),
    ({"logfile": "-", "nodaemon": True, "syslog": True}, False),
    ({"logfile": "-", "nodaemon": True, "logger": "x.y"}, False),
])
def test_when_twistd_logs_to_stdout(options, stdout):
    assert tap.Twistd(options).logs_to_stdout() is stdout


def test_the_stdout_log_gets_twisteds_lines_from_the_cheaper_observer(capsys):
    top = tap.Lifecycle(Clock(), tap.Twistd({"logfile": "-", "nodaemon": True}))
    app = service.Application("stop")
    top.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    assert isinstance(observer, logsetup.TextLogObserver) and top.log_file is None
    observer({"log_format": "to the journal", "log_level": LogLevel.info, "log_time": 0.0,
              "log_namespace": "t"})
    assert capsys.readouterr().out == f"{formatTime(0.0)} [t#info] to the journal\n"


def test_start_failed_carries_a_status():
    assert StartFailed("x").status == 1 and StartFailed("x", 2).status == 2


def test_a_daemonized_twistd_hears_of_the_failure_through_its_status_pipe(tmp_path, capfd):
    r, w = os.pipe()
    try:
        options = parse("--errors", "loud")
        options.parent = {"statusPipe": w, "logfile": str(tmp_path / "twistd.log")}
        top = tap.makeService(options, MemoryReactorClock())
        code, err = failed_start(top, capfd)
        assert code == 2
        # twistd's first process prints this after "An error has occurred:".
        assert os.read(r, 200) == b"1 command line: errors: 'loud' is not one of normal, unknown, token"
        assert options.parent["statusPipe"] is None
    finally:
        os.close(r)
