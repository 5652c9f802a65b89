"""stop.server: the protocol and factory, in memory (StringTransport + Clock)."""

import re

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from stop.answer import Answerer
from stop.config import Config
from stop.model import Connection, Endpoint
from stop.server import SWEEP_INTERVAL, IdentFactory
from stop.testing import FakeLookup, FakeOptIn, HeldStore

OUT = Connection(Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.2", 6667), 1000, 5, False)
TOKEN = rb"[0-9a-f]{40}"


def factory(**settings):
    config = Config(**settings)
    clock = Clock()
    store = HeldStore()
    store.auto = True
    a = Answerer(config, FakeLookup(OUT), store, clock, optin=FakeOptIn(), host_name="h")
    return IdentFactory(config, a, clock), clock, store


def connect(f, peer="127.0.0.2", port=51000):
    addr = IPv4Address("TCP", peer, port)
    p = f.buildProtocol(addr)
    if p is None:
        return None, None
    t = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 113), peerAddress=addr)
    p.makeConnection(t)
    return p, t


def test_replies_in_order_even_when_saves_finish_out_of_order():
    f, clock, store = factory()
    store.auto = False
    p, t = connect(f)
    p.dataReceived(b"40000, 6667\r\n99, 98\r\n40000,6667 : sv\n")
    # the NO-USER reply is ready first but must wait for the first one
    assert t.value() == b""
    store.complete()
    lines = t.value().split(b"\r\n")
    assert re.fullmatch(rb"40000, 6667 : USERID : OTHER : " + TOKEN, lines[0])
    assert lines[1] == b"99, 98 : ERROR : NO-USER"
    assert re.fullmatch(rb"40000, 6667 : USERID : OTHER : " + TOKEN, lines[2])
    assert not t.disconnecting


def test_parse_errors_answer_and_keep_the_connection():
    f, clock, store = factory()
    p, t = connect(f)
    p.dataReceived(b"hello\r\n0, 5\r\n5, 6 : ZZ\r\n\x00\xff\r\n40000, 6667\r\n")
    lines = t.value().split(b"\r\n")
    assert lines[:4] == [b"0, 0 : ERROR : UNKNOWN-ERROR", b"0, 5 : ERROR : INVALID-PORT",
                         b"5, 6 : ERROR : UNKNOWN-ERROR", b"0, 0 : ERROR : UNKNOWN-ERROR"]
    assert b"USERID" in lines[4]
    assert not t.disconnecting


def test_line_of_max_length_is_answered_longer_closes():
    f, clock, store = factory()
    p, t = connect(f)
    line = b"40000, 6667" + b" " * (1000 - 11)
    assert len(line) == 1000
    p.dataReceived(line + b"\r\n")
    assert b"USERID" in t.value()
    p.dataReceived(line + b" \n")  # 1,001 bytes
    assert t.disconnecting or t.disconnected


def test_long_data_without_newline_closes():
    f, clock, store = factory()
    p, t = connect(f)
    p.dataReceived(b"1" * 65536)
    assert t.value() == b""
    assert t.disconnecting or t.disconnected


def test_idle_timeout():
    f, clock, store = factory(idle_timeout=60)
    p, t = connect(f)
    clock.advance(59)
    assert not (t.disconnecting or t.disconnected)
    p.dataReceived(b"40000, 6667\r\n")
    clock.advance(59)
    assert not (t.disconnecting or t.disconnected)
    clock.advance(2)
    assert t.disconnecting or t.disconnected


def closed(t) -> bool:
    return t.disconnecting or t.disconnected


def test_idle_timeout_bound_is_one_sweep_interval():
    """Closed after idle_timeout, at most SWEEP_INTERVAL later: a connection
    whose last reply went out just after a sweep is not closed early, and
    is closed by the first sweep past its timeout."""
    f, clock, store = factory(idle_timeout=10)
    p, t = connect(f)
    clock.advance(0.5)  # between two sweeps (the first is at 1.0)
    p.dataReceived(b"40000, 6667\r\n")  # a line and its reply at 0.5
    for _ in range(9):
        clock.advance(1.0)  # sweeps at 1.5 ... 9.5: idle up to 9 s
    assert not closed(t)
    clock.advance(1.0)  # the sweep at 10.5: idle 10 s
    assert closed(t)
    assert 10 <= clock.seconds() - 0.5 <= 10 + SWEEP_INTERVAL


def test_a_reply_counts_as_activity():
    f, clock, store = factory(idle_timeout=5)
    store.auto = False
    p, t = connect(f)
    p.dataReceived(b"40000, 6667\r\n")
    clock.advance(4)
    store.complete()  # the reply at 4 s
    clock.advance(4)
    assert b"USERID" in t.value() and not closed(t)
    clock.advance(1)
    assert closed(t)


def test_one_timer_for_all_connections_and_none_when_all_are_closed():
    f, clock, store = factory(idle_timeout=3, max_connections=200, max_connections_per_host=200)
    conns = [connect(f, port=50000 + i) for i in range(100)]
    assert len(clock.getDelayedCalls()) == 1  # the sweep, not a DelayedCall per connection
    for p, t in conns[:50]:
        t.loseConnection()
        p.connectionLost(None)
    clock.advance(1)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2)  # the other 50 time out, once each
    assert all(closed(t) for _, t in conns[50:])
    assert clock.getDelayedCalls() == []  # nothing watched: no sweep is scheduled
    clock.advance(10)
    assert f.connections == 50  # still counted until the reactor reports the close
    for p, t in conns[50:]:
        p.connectionLost(None)
    assert f.connections == 0 and f.per_host == {}
    p, t = connect(f, port=60000)  # the next connection starts the sweep again
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert closed(t)


def test_a_connection_times_out_once_while_it_closes():
    f, clock, store = factory(idle_timeout=2)
    p, t = connect(f)
    calls = []
    p.timeoutConnection = lambda: calls.append(clock.seconds())  # its close never completes
    clock.advance(2)
    clock.advance(1)
    clock.advance(1)
    assert calls == [2.0]


def test_sub_second_idle_timeout_sweeps_more_often():
    f, clock, store = factory(idle_timeout=0.25)
    p, t = connect(f)
    clock.advance(0.25)
    assert closed(t)


def test_the_sweep_survives_a_failing_close():
    f, clock, store = factory(idle_timeout=1)
    bad, t_bad = connect(f, port=50001)
    good, t_good = connect(f, port=50002)

    def fail():
        raise RuntimeError("test")
    bad.timeoutConnection = fail
    later, t_later = connect(f, port=50003)
    later._last = 5  # active until 5: keeps the sweep going
    clock.advance(1)
    assert closed(t_good) and not closed(t_later)
    clock.advance(5)
    assert closed(t_later)


def test_requests_per_connection():
    f, clock, store = factory(max_requests_per_connection=3)
    p, t = connect(f)
    p.dataReceived(b"40000, 6667\r\n" * 5)
    assert t.value().count(b"\r\n") == 3
    assert t.disconnecting


def test_pipeline_pauses_reading_until_replies_drain():
    f, clock, store = factory(max_pipeline=2)
    store.auto = False
    p, t = connect(f)
    p.dataReceived(b"40000, 6667\r\n" * 5)
    assert len(store.pending) == 2 and t.producerState == "paused"
    store.complete()
    # reading resumed: the buffered lines are processed, two at a time
    assert t.value().count(b"\r\n") == 2
    while store.pending:
        store.complete()
    assert t.value().count(b"\r\n") == 5
    assert t.producerState == "producing"


def test_connection_limits():
    f, clock, store = factory(max_connections=3, max_connections_per_host=2)
    a1, _ = connect(f, "127.0.0.2")
    a2, _ = connect(f, "127.0.0.2")
    assert connect(f, "127.0.0.2")[0] is None  # per host
    b1, tb = connect(f, "127.0.0.3")
    assert connect(f, "127.0.0.4")[0] is None  # total
    tb.loseConnection()
    b1.connectionLost(None)
    assert connect(f, "127.0.0.4")[0] is not None
    assert f.per_host == {"127.0.0.2": 2, "127.0.0.4": 1}


def test_a_reload_applies_to_new_connections_and_the_limits_at_accept():
    f, clock, store = factory(max_line_length=20, max_connections_per_host=1)
    old, t_old = connect(f, "127.0.0.2")
    assert connect(f, "127.0.0.2")[0] is None
    f.reconfigure(f.config.replace(max_line_length=100, max_connections_per_host=2))
    new, t_new = connect(f, "127.0.0.2")  # the per-host limit is read at accept
    assert new is not None
    line = b"40000, 6667" + b" " * 30  # 41 bytes: over the old limit, within the new
    new.dataReceived(line + b"\r\n")
    assert b"USERID" in t_new.value()
    old.dataReceived(line + b"\r\n")  # a connection keeps the limits it began with
    assert t_old.value() == b"" and (t_old.disconnecting or t_old.disconnected)


def test_ipv4_mapped_peer_is_the_ipv4_host():
    f, clock, store = factory()
    addr = IPv6Address("TCP", "::ffff:127.0.0.2", 51000)
    p = f.buildProtocol(addr)
    t = StringTransport(hostAddress=IPv6Address("TCP", "::ffff:127.0.0.1", 113), peerAddress=addr)
    p.makeConnection(t)
    p.dataReceived(b"40000, 6667\r\n")
    assert b"USERID : OTHER" in t.value()
    assert f.per_host == {"127.0.0.2": 1}


class _Socket:
    """A socket that takes ``room`` bytes, then raises ``error`` (errno)."""

    def __init__(self, room, error=None):
        self.room, self.error, self.sent = room, error, b""

    def send(self, data):
        if self.error is not None and not self.room:
            raise OSError(self.error, "test")
        n = min(self.room, len(data))
        self.room -= n
        self.sent += data[:n]
        return n


def test_replies_go_straight_to_the_socket_and_the_rest_through_the_transport():
    import errno
    f, clock, store = factory()
    p, t = connect(f)
    p._sock = sock = _Socket(room=10**6)
    p.dataReceived(b"40000, 6667\r\n")
    assert b"USERID" in sock.sent and t.value() == b""
    # A reply the socket takes only in part: the rest, and every later
    # reply, go through the transport, in order.
    p._sock = sock = _Socket(room=5)
    p.dataReceived(b"40000, 6667\r\n99, 98\r\n")
    assert sock.sent == b"40000" and p._sock is None
    lines = t.value().split(b"\r\n")
    assert lines[0].startswith(b", 6667 : USERID") and lines[1] == b"99, 98 : ERROR : NO-USER"
    # An error other than "full" leaves the reply to the transport too.
    p2, t2 = connect(f, port=51001)
    p2._sock = _Socket(room=0, error=errno.EPIPE)
    p2.dataReceived(b"99, 98\r\n")
    assert t2.value() == b"99, 98 : ERROR : NO-USER\r\n" and p2._sock is None
