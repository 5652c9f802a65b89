"""stop.logsetup: the syslog observer, unit tests and against a real rsyslogd."""

from __future__ import annotations

import io
import os
import re
import signal

import pytest
from hypothesis import given, strategies as st
from twisted.logger import (ILogObserver, Logger, LogLevel, LogPublisher, formatEvent,
                            textFileLogObserver)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from stop.errors import ConfigError
from stop.logsetup import (MAX_DATAGRAM, QuickLogger, SyslogObserver, SyslogService,
                           TextLogObserver, facility_number, file_observer,
                           format_datagram)

from tests import rsyslogd

needs_rsyslog = pytest.mark.skipif(not rsyslogd.available(), reason="rsyslogd not installed")


def test_facility_numbers():
    assert facility_number("kern") == 0
    assert facility_number("daemon") == 3
    assert facility_number("LOCAL7") == 23
    with pytest.raises(ConfigError, match="syslog_facility"):
        facility_number("nosuch")


def test_datagram_priority_header_and_text():
    event = {"log_format": "hello {who}", "who": "world", "log_level": LogLevel.warn,
             "log_time": 0.0}
    data = format_datagram(event, facility=3, ident="stopd", pid=42)
    # daemon (3) * 8 + warning (4) = 28
    assert re.fullmatch(rb"<28>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d stopd\[42\]: hello world",
                        data), data


def test_datagram_carries_traceback_and_is_bounded():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_format": "boom", "log_level": LogLevel.critical, "log_failure": failure,
             "log_time": 0.0}
    data = format_datagram(event, facility=16, ident="x", pid=1)
    assert data.startswith(b"<130>")  # local0 * 8 + crit
    assert b"ZeroDivisionError" in data
    big = {"log_format": "{x}", "x": "a" * (3 * MAX_DATAGRAM), "log_level": LogLevel.info}
    assert len(format_datagram(big, 3, "x", 1)) == MAX_DATAGRAM


def test_observer_provides_interface(tmp_path):
    verifyObject(ILogObserver, SyslogObserver(str(tmp_path / "none"), "daemon"))


def test_missing_socket_drops_without_raising(tmp_path):
    observer = SyslogObserver(str(tmp_path / "absent.sock"), "daemon")
    observer({"log_format": "lost", "log_level": LogLevel.info})
    observer({"log_format": "lost again", "log_level": LogLevel.info})
    assert observer.dropped == 2


@pytest.fixture
def syslogd(tmp_path):
    server = rsyslogd.Rsyslogd(tmp_path / "rsyslog").start()
    yield server
    server.stop()


@needs_rsyslog
def test_events_reach_rsyslog(syslogd):
    observer = SyslogObserver(syslogd.socket_path, "local3", ident="stopd")
    observer({"log_format": "answered {n} queries", "n": 7, "log_level": LogLevel.info})
    observer({"log_format": "store failed: {why}", "why": "disk full",
              "log_level": LogLevel.error})
    got = syslogd.wait_messages(lambda m: m[2] == "stopd", count=2)
    pid = str(os.getpid())
    assert got == [
        ("local3", "info", "stopd", pid, "-", "-", "answered 7 queries"),
        ("local3", "err", "stopd", pid, "-", "-", "store failed: disk full"),
    ]
    assert observer.dropped == 0


@needs_rsyslog
def test_service_filters_debug_and_detaches_on_stop(syslogd):
    publisher = LogPublisher()
    log = Logger(namespace="stop.test", observer=publisher)
    service = SyslogService(SyslogObserver(syslogd.socket_path, "daemon"), publisher=publisher)
    service.startService()
    log.debug("not sent {x}", x=1)
    log.info("sent {x}", x=2)
    assert syslogd.wait_messages(lambda m: m[6] == "sent 2")
    service.stopService()
    log.info("after stop")
    observer = SyslogObserver(syslogd.socket_path, "daemon")
    observer({"log_format": "sentinel", "log_level": LogLevel.info})
    syslogd.wait_messages(lambda m: m[6] == "sentinel")
    assert [m[6] for m in syslogd.messages() if m[2] == "stopd"] == ["sent 2", "sentinel"]


@needs_rsyslog
def test_reconnects_after_rsyslog_restart(tmp_path):
    first = rsyslogd.Rsyslogd(tmp_path / "r").start()
    observer = SyslogObserver(first.socket_path, "daemon")
    try:
        observer({"log_format": "one", "log_level": LogLevel.info})
        assert first.wait_messages(lambda m: m[6] == "one")
    finally:
        first.stop()
    if os.path.exists(first.socket_path):  # rsyslogd usually removes it itself
        os.unlink(first.socket_path)
    observer({"log_format": "while down", "log_level": LogLevel.info})
    assert observer.dropped == 1
    second = rsyslogd.Rsyslogd(tmp_path / "r").start()
    try:
        observer({"log_format": "two", "log_level": LogLevel.info})
        assert second.wait_messages(lambda m: m[6] == "two")
    finally:
        second.stop()


# -- twistd's text lines, cheaper (TextLogObserver) and QuickLogger ----------

def _lines(make, events, binary=False):
    """What an observer made by ``make(out)`` writes for ``events``."""
    out = io.BytesIO() if binary else io.StringIO()
    observer = make(out)
    for event in events:
        observer(dict(event))
    return out.getvalue()


def _running_reactor() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


def _buffered(out):
    """A TextLogObserver on a running reactor whose every turn ends after
    each event (so _lines reads the file after the turn's write)."""
    reactor = _running_reactor()
    observer = TextLogObserver(out, reactor=reactor)

    def observe(event):
        observer(event)
        reactor.advance(0)
    return observe


def _same_as_twisted(events, binary=False):
    ours = _lines(TextLogObserver, events, binary)
    theirs = _lines(textFileLogObserver, events, binary)
    assert ours == theirs
    assert _lines(_buffered, events, binary) == theirs
    return ours


def test_text_observer_provides_interface():
    verifyObject(ILogObserver, TextLogObserver(io.StringIO()))


def test_text_observer_writes_twisteds_lines_for_every_kind_of_event():
    base = {"log_level": LogLevel.info, "log_namespace": "stop.answer", "log_time": 1764565200.25}
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    events = [
        {**base, "log_format": "127.0.0.2:5 asked 40000, 6667 ID: token ab"},  # the query line
        {**base, "log_format": "two\nlines"},
        {**base, "log_format": "a {field} here", "field": "value"},
        {**base, "log_format": "escaped {{braces}}"},
        {**base, "log_format": "with failure", "log_failure": failure},
        {**base, "log_format": "legacy", "log_system": "-"},
        {**base, "log_format": ""},
        {**base, "log_format": None},
        {**base, "log_format": "no level", "log_level": None},
        {"log_format": "no namespace, level or time"},
        {**base, "log_format": "an int time", "log_time": 1764565200},
        {**base, "log_format": "rounds up to the next second", "log_time": 1764565200.9999996},
        {**base, "log_format": "just below", "log_time": 1764565200.9999989},
        {**base, "log_format": "next second", "log_time": 1764565201.0},
        {**base, "log_format": "back again", "log_time": 1764565200.5},
        {**base, "log_format": "before 1970", "log_time": -1.5},
        {**base, "log_format": "warn, unicode é", "log_level": LogLevel.warn},
    ]
    text = _same_as_twisted(events)
    assert "rounds up" in text and "ZeroDivisionError" in text
    _same_as_twisted(events, binary=True)


@given(st.text(), st.floats(min_value=0, max_value=4e9),
       st.sampled_from(list(LogLevel.iterconstants())))
def test_text_observer_equals_twisted_for_any_text_and_time(text, when, level):
    events = [{"log_format": text, "log_time": when, "log_level": level, "log_namespace": "n"},
              {"log_format": text, "log_time": when + 0.5, "log_level": level,
               "log_namespace": "n"}]
    _same_as_twisted(events)


def test_text_observer_time_format_with_fractions_is_not_reused():
    events = [{"log_format": "x", "log_time": 10.25}, {"log_format": "y", "log_time": 10.5}]
    ours = _lines(lambda out: TextLogObserver(out, "%S.%f"), events)
    assert ours == _lines(lambda out: textFileLogObserver(out, "%S.%f"), events)
    assert ".250000" in ours and ".500000" in ours


class _Writes(io.StringIO):
    """A text file that counts its write calls."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        return super().write(data)


def _event(text, level=LogLevel.info, **more):
    return {"log_format": text, "log_level": level, "log_time": 1764565200.25,
            "log_namespace": "stop.answer", **more}


def test_lines_of_a_turn_are_written_together_at_its_end():
    reactor = _running_reactor()
    out = _Writes()
    observer = TextLogObserver(out, reactor=reactor)
    for n in range(5):
        observer(_event(f"query {n}"))
    observer(_event("a {field}", field="with Twisted's formatter"))  # in order with the rest
    assert out.getvalue() == "" and len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)  # the turn ends
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "query 0", "query 1", "query 2", "query 3", "query 4", "a with Twisted's formatter"]
    assert out.writes == 1 and reactor.getDelayedCalls() == []
    observer(_event("next turn"))
    reactor.advance(0)
    assert out.writes == 2 and out.getvalue().endswith("next turn\n")


@pytest.mark.parametrize("level,running", [
    (LogLevel.error, True),  # a crash report
    (LogLevel.critical, True),
    (LogLevel.info, False),  # stopped (twistd's last lines): the end of turn never comes
])
def test_written_at_once_with_the_lines_before_it(level, running):
    reactor = _running_reactor()
    out = io.StringIO()
    observer = TextLogObserver(out, reactor=reactor)
    observer(_event("query"))
    reactor.running = running
    observer(_event("Main loop terminated.", level))
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        "query", "Main loop terminated."]


def test_the_reactors_shutdown_flushes_the_pending_lines():
    reactor = _running_reactor()
    out = io.StringIO()
    observer = TextLogObserver(out, reactor=reactor)
    observer(_event("said while stopping"))
    assert out.getvalue() == ""
    for f, args, kwargs in reactor.triggers["after"]["shutdown"]:
        f(*args, **kwargs)
    assert out.getvalue().endswith("said while stopping\n")


def test_sigusr1_rotation_writes_the_pending_lines_to_the_file_being_rotated(tmp_path):
    class Reactor(MemoryReactorClock):
        def callFromThread(self, f, *args, **kwargs):
            f(*args, **kwargs)
    reactor = Reactor()
    reactor.running = True
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        log_file, observer = file_observer(str(tmp_path / "twistd.log"), reactor)
        observer(_event("before the rotation"))
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        observer(_event("after it"))
        reactor.advance(0)
        log_file.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert (tmp_path / "twistd.log.1").read_text().endswith("before the rotation\n")
    assert (tmp_path / "twistd.log").read_text().endswith("] after it\n")
    assert "before" not in (tmp_path / "twistd.log").read_text()


def test_quick_logger_emits_the_event_logger_emits():
    seen = []
    publisher = LogPublisher(seen.append)
    for cls in (Logger, QuickLogger):
        cls(namespace="ns", source="src", observer=publisher).warn(
            "text {x}", x=1, requester="r")
    plain, quick = seen
    assert plain.pop("log_time") <= quick.pop("log_time")
    assert isinstance(plain.pop("log_logger"), Logger)
    assert isinstance(quick.pop("log_logger"), QuickLogger)
    assert plain == quick
    assert quick["log_level"] is LogLevel.warn and quick["log_namespace"] == "ns"


def test_quick_logger_namespace_is_the_callers_module():
    assert QuickLogger().namespace == __name__


def test_quick_logger_reports_an_unknown_level_as_logger_does():
    seen = []
    QuickLogger(observer=seen.append).emit("nosuch", "hello")
    assert len(seen) == 1 and seen[0]["log_level"] is LogLevel.critical
    assert "invalid log level" in formatEvent(seen[0])
