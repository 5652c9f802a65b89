"""stop.client: the recursive client's outcomes and budgets.

In memory (MemoryReactorClock + StringTransport) for the protocol and the
timers; real sockets on loopback for the faults of issue 9: a dead host, a
refusing one, one that accepts and never answers, a byte a second, garbage,
an over-long line, and Debian's oidentd as a plain RFC 1413 upstream.
"""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from stop import wire
from stop.client import ClientBudget, Outcome, RecursiveClient, tcp_endpoint
from stop.interfaces import IRecursiveClient
from stop.model import Endpoint
from stop.testing import FakeRecursiveClient
from tests.upstream import (GARBAGE, DeadHost, Oidentd, Upstream, answer_token, byte_a_second,
                            closes, oidentd_available, over_long, reply_with, silent)

THEM = Endpoint("127.0.0.31", 113)
US = Endpoint("127.0.0.32", 0)
QUESTION = wire.Request((6193, 23), wire.SV_REC, 4711)
LINE = b"6193, 23 : SV_REC : 4711\r\n"
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def test_implementations_provide_the_interface():
    verifyObject(IRecursiveClient, RecursiveClient(MemoryReactorClock()))
    verifyObject(IRecursiveClient, FakeRecursiveClient())


# -- in memory --------------------------------------------------------------

class Harness:
    """A client on a MemoryReactorClock; connect() plays the other side."""

    def __init__(self, **budget):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1764072000)
        self.client = RecursiveClient(self.reactor, ClientBudget(**budget))
        self.results: list = []

    def ask(self, target=THEM, local=US, request=QUESTION):
        d = self.client.ask(target, local, request)
        d.addBoth(self.results.append)
        return d

    def connection(self, n=-1):
        host, port, factory, timeout, bind = self.reactor.tcpClients[n]
        return factory, bind

    def connect(self, n=-1, local_port=40001) -> StringTransport:
        factory, bind = self.connection(n)
        t = StringTransport(hostAddress=IPv4Address("TCP", bind[0], local_port),
                            peerAddress=IPv4Address("TCP", THEM.host, THEM.port))
        proto = factory.buildProtocol(t.getPeer())
        proto.makeConnection(t)
        t.protocol = proto
        return t

    def fail_connect(self, exc, n=-1) -> None:
        factory, _ = self.connection(n)
        factory.clientConnectionFailed(self.reactor.connectors[n], Failure(exc))


def test_connects_from_the_local_address_to_the_target_and_sends_the_question():
    h = Harness()
    h.ask()
    host, port, _, _, bind = h.reactor.tcpClients[0]
    assert (host, port, bind) == (THEM.host, THEM.port, (US.host, 0))
    t = h.connect()
    assert t.value() == LINE
    assert h.results == []
    assert h.client.in_flight == 1 and h.client.in_flight_to(THEM.host) == 1


@pytest.mark.parametrize("reply,expected", [
    (b"6193, 23 : USERID : OTHER : " + TOKEN.encode() + b"\r\n",
     dict(outcome="token", token=TOKEN)),
    (b"6193 ,23:USERID:OTHER:" + TOKEN.encode() + b"\n", dict(outcome="token", token=TOKEN)),
    (b"6193, 23 : ERROR : NO-USER\r\n", dict(outcome="error", error="NO-USER")),
    (b"6193, 23 : ERROR : X-PRIVATE\r\n", dict(outcome="error", error="X-PRIVATE")),
    (b"6193, 23 : USERID : UNIX : alice\r\n", dict(outcome="userid", opsys="UNIX", user="alice")),
    (b"6193, 23 : USERID : UNIX , US-ASCII : a:b\r\n",
     dict(outcome="userid", opsys="UNIX", user="a:b")),
    (b"6193, 23 : USERID : OTHER : not a token\r\n",
     dict(outcome="userid", opsys="OTHER", user="not a token")),
    (b"6193, 24 : USERID : OTHER : " + TOKEN.encode() + b"\r\n",
     dict(outcome="unreadable", why="the reply's ports differ from the question's")),
    (b"HTTP/1.1 400 Bad Request\r\n", dict(outcome="unreadable", why="not an ident reply line")),
    (b"6193, 23 : ERROR : \r\n",
     dict(outcome="unreadable", why="error word is empty, too long or not printable")),
    (b"6193, 23 : USERID : UNIX : \x00\xff\r\n",
     dict(outcome="unreadable", why="user-id is empty, longer than 512 or not printable")),
])
def test_reply_outcomes(reply, expected):
    h = Harness()
    h.ask()
    t = h.connect()
    h.reactor.advance(0.5)
    t.protocol.dataReceived(reply)
    [o] = h.results
    assert isinstance(o, Outcome)
    for k, v in expected.items():
        assert getattr(o, k) == v, (k, o)
    assert o.reply == wire.printable(reply.rstrip(b"\r\n"), 1000)
    assert o.sent == 1764072000 and o.answered == 1764072000.5
    assert o.local == Endpoint(US.host, 40001)
    # the connection is closed either way, never left open
    assert t.disconnecting or t.disconnected
    # its slot in the budget is given back once the socket is gone, not
    # before (Twisted closes it in a later turn): never more sockets than
    # the budget
    assert h.client.in_flight == 1 and h.client.in_flight_to(THEM.host) == 1
    t.protocol.connectionLost(Failure(error.ConnectionDone()))
    assert h.client.in_flight == 0 and h.client.in_flight_to(THEM.host) == 0
    assert h.results == [o]  # one outcome, whatever comes after


def test_reply_in_pieces():
    h = Harness()
    h.ask()
    t = h.connect()
    for b in b"6193, 23 : ERROR : NO-USER\r\n":
        assert h.results == []
        t.protocol.dataReceived(bytes([b]))
    assert h.results[0].outcome == "error"


def test_connect_timeout():
    h = Harness(connect_timeout=5)
    h.ask()
    h.reactor.advance(4.9)
    assert h.results == []
    h.reactor.advance(0.2)
    [o] = h.results
    assert (o.outcome, o.why, o.sent, o.answered) == ("timeout", "connect timeout", None, None)
    assert o.local == Endpoint(US.host, None)
    assert h.client.in_flight == 0


def test_reply_timeout_is_a_deadline_not_an_idle_timer():
    h = Harness(connect_timeout=5, reply_timeout=10)
    h.ask()
    h.reactor.advance(3)  # connecting takes 3 s: not counted in the reply timeout
    t = h.connect()
    for n in range(9):  # a byte a second keeps an idle timer alive, not a deadline
        h.reactor.advance(1)
        t.protocol.dataReceived(b"6193, 23 : ERROR"[n:n + 1])
    assert h.results == []
    h.reactor.advance(1.01)
    [o] = h.results
    assert (o.outcome, o.why) == ("timeout", "reply timeout")
    assert o.reply == "6193, 23 "
    assert o.sent == 1764072003 and o.answered is None
    assert t.disconnected or t.disconnecting


def test_over_long_line_without_newline_is_cut_off():
    h = Harness(max_reply_length=100)
    h.ask()
    t = h.connect()
    t.protocol.dataReceived(b"6193, 23 : USERID : OTHER : " + b"a" * 73)  # 101 bytes + room for CR: ok
    assert h.results == []
    t.protocol.dataReceived(b"aa")
    [o] = h.results
    assert (o.outcome, o.why) == ("unreadable", "reply line longer than 100 bytes")
    assert o.answered == 1764072000  # the peer decided it
    assert len(o.reply) == 100 + 3 and o.reply.endswith("...")
    assert t.disconnected  # aborted


def test_line_of_exactly_the_limit_is_read():
    h = Harness(max_reply_length=100)
    h.ask()
    t = h.connect()
    head = b"6193, 23 : USERID : UNIX : "
    t.protocol.dataReceived(head + b"u" * (100 - len(head)) + b"\r\n")
    assert h.results[0].outcome == "userid"


def test_over_long_line_with_newline():
    h = Harness(max_reply_length=100)
    h.ask()
    t = h.connect()
    t.protocol.dataReceived(b"6193, 23 : USERID : UNIX : " + b"u" * 80 + b"\r\n")
    assert (h.results[0].outcome, h.results[0].why) == ("unreadable",
                                                         "reply line longer than 100 bytes")


@pytest.mark.parametrize("data,why", [(b"", "closed without a reply"),
                                      (b"6193, 2", "closed before a full reply line")])
def test_closed_before_a_reply(data, why):
    h = Harness()
    h.ask()
    t = h.connect()
    if data:
        t.protocol.dataReceived(data)
    h.reactor.advance(2)
    t.protocol.connectionLost(Failure(error.ConnectionDone()))
    [o] = h.results
    assert (o.outcome, o.why, o.answered) == ("unreadable", why, 1764072002)


@pytest.mark.parametrize("exc,outcome", [
    (error.ConnectionRefusedError(), "refused"),
    (error.ConnectBindError(99, "Cannot assign requested address"), "failed"),
    (error.NoRouteError(), "failed"),
    (error.TimeoutError(), "timeout"),
])
def test_connect_failures(exc, outcome):
    h = Harness()
    h.ask()
    h.fail_connect(exc)
    [o] = h.results
    assert o.outcome == outcome and o.sent is None
    assert (o.answered is not None) == (outcome == "refused")
    assert h.client.in_flight == 0


def test_budget_in_flight_in_all():
    h = Harness(max_outbound=3, max_per_host=3)
    for n in range(5):
        h.ask(target=Endpoint(f"127.0.0.{40 + n}", 113))
    assert len(h.reactor.tcpClients) == 3  # never more connections than the budget
    skipped = [o for o in h.results if o.outcome == "skipped"]
    assert len(skipped) == 2
    assert skipped[0].why == "budget: questions in flight in all (recursion_max_outbound)"
    assert h.client.in_flight == 3
    # one ends: one more may go
    h.fail_connect(error.ConnectionRefusedError(), n=0)
    h.ask(target=Endpoint("127.0.0.50", 113))
    assert len(h.reactor.tcpClients) == 4


def test_budget_per_host():
    h = Harness(max_outbound=10, max_per_host=2)
    for _ in range(3):
        h.ask()
    h.ask(target=Endpoint("127.0.0.41", 113))
    assert [c[0] for c in h.reactor.tcpClients] == [THEM.host, THEM.host, "127.0.0.41"]
    [o] = h.results
    assert (o.outcome, o.why) == ("skipped", "budget: questions in flight to this host "
                                             "(recursion_max_per_host)")


def test_close_ends_every_question_and_skips_later_ones():
    h = Harness()
    h.ask()
    h.ask(target=Endpoint("127.0.0.41", 113))
    t = h.connect(n=1)
    done = []
    h.client.close().addCallback(done.append)
    assert done and len(h.results) == 2
    assert {(o.outcome, o.why) for o in h.results} == {("failed", "stopping")}
    assert t.disconnected
    h.ask()
    assert (h.results[-1].outcome, h.results[-1].why) == ("skipped", "stopping")


def test_endpoint_families():
    r = MemoryReactorClock()
    e4 = tcp_endpoint(r, Endpoint("192.0.2.1", 113), Endpoint("192.0.2.2", 0), 5)
    e6 = tcp_endpoint(r, Endpoint("2001:db8::1", 113), Endpoint("", 0), 5)
    e4.connect(RecursiveClient(r)._endpoint_factory and _NullFactory())
    e6.connect(_NullFactory())
    assert r.tcpClients[0][0] == "192.0.2.1" and r.tcpClients[0][4] == ("192.0.2.2", 0)
    assert r.tcpClients[1][0] == "2001:db8::1" and r.tcpClients[1][4] is None


class _NullFactory:
    def buildProtocol(self, addr):
        return None

    def doStart(self):
        pass

    def doStop(self):
        pass


def test_fake_client():
    done = Outcome("token", token=TOKEN)
    fake = FakeRecursiveClient({THEM: done})
    got = []
    fake.ask(THEM, US, QUESTION).addCallback(got.append)
    other = Endpoint("127.0.0.41", 113)
    fake.ask(other, US, QUESTION).addCallback(got.append)
    assert got == [done] and fake.in_flight == 1
    fake.answer(Outcome("refused"), other)
    assert got[-1].outcome == "refused" and fake.asked[1][0] == other


# -- real sockets -----------------------------------------------------------

UPSTREAM = "127.0.0.33"
FROM = "127.0.0.34"
REAL = dict(connect_timeout=2.0, reply_timeout=2.0)


def run(reactor_ask):
    """Run the real reactor until the Deferred from ``reactor_ask()`` fires
    (bounded: 30 s). The global reactor runs once per process, so this is a
    tiny loop over reactor.iterate()."""
    from twisted.internet import reactor
    out = []
    d = reactor_ask(reactor)
    d.addBoth(out.append)
    deadline = time.monotonic() + 30
    while not out and time.monotonic() < deadline:
        reactor.iterate(0.05)
    assert out, "no outcome within 30 s"
    return out[0]


def ask_real(port, budget=REAL, request=QUESTION):
    start = time.monotonic()
    outcome = run(lambda r: RecursiveClient(r, ClientBudget(**budget)).ask(
        Endpoint(UPSTREAM, port), Endpoint(FROM, 0), request))
    return outcome, time.monotonic() - start


def ask_upstream(behaviour):
    """Ask an :class:`Upstream` running ``behaviour``; (outcome, seconds, peers)."""
    up = Upstream(behaviour, UPSTREAM)
    try:
        o, took = ask_real(up.port)
    finally:
        up.close()
    return o, took, up.peers


def test_real_token_from_the_local_address():
    o, _, peers = ask_upstream(answer_token(TOKEN))
    assert (o.outcome, o.token) == ("token", TOKEN)
    assert peers[0][0] == FROM  # asked from the local address of the connection
    assert o.local == Endpoint(FROM, peers[0][1])


def test_real_refused():
    with socket.socket() as s:
        s.bind((UPSTREAM, 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        o, took = ask_real(port)
    assert o.outcome == "refused" and took < 2


def test_real_dead_host_times_out_connecting():
    dead = DeadHost(UPSTREAM)
    try:
        o, took = ask_real(dead.port)
    finally:
        dead.close()
    assert (o.outcome, o.why) == ("timeout", "connect timeout")
    assert 1.5 < took < 10


def test_real_accepts_and_never_answers():
    o, took, _ = ask_upstream(silent)
    assert (o.outcome, o.why) == ("timeout", "reply timeout")
    assert o.sent is not None and 1.5 < took < 10


def test_real_a_byte_a_second():
    """Bytes keep coming (every 0.25 s: the line would take 7 s), the reply
    deadline (2 s) cuts it off; what came is kept."""
    o, took, _ = ask_upstream(byte_a_second(0.25))
    assert (o.outcome, o.why) == ("timeout", "reply timeout")
    line = "6193, 23 : ERROR : NO-USER"
    assert o.reply and line.startswith(o.reply) and len(o.reply) < len(line), o.reply
    assert took < 10


def test_real_garbage():
    o, _, _ = ask_upstream(reply_with(GARBAGE))
    assert (o.outcome, o.why) == ("unreadable", "not an ident reply line")
    assert o.reply == "\\x00\\x01\\xfeSSH-2.0-OpenSSH"


def test_real_over_long_line():
    o, _, _ = ask_upstream(over_long)
    assert (o.outcome, o.why) == ("unreadable", "reply line longer than 1000 bytes")
    assert len(o.reply) == 1003


def test_real_closed_without_a_reply():
    o, _, _ = ask_upstream(closes)
    assert (o.outcome, o.why) == ("unreadable", "closed without a reply")


def test_real_cannot_bind_the_local_address():
    o = run(lambda r: RecursiveClient(r, ClientBudget(**REAL)).ask(
        Endpoint("127.0.0.1", 113), Endpoint("192.0.2.77", 0), QUESTION))
    assert o.outcome == "failed" and "cannot bind 192.0.2.77" in o.why


@pytest.fixture
def oidentd(tmp_path):
    why = oidentd_available()
    if why:
        pytest.skip(why)
    with socket.socket() as s:
        s.bind((UPSTREAM, 0))
        port = s.getsockname()[1]
    daemon = Oidentd(tmp_path, UPSTREAM, port, names=(FROM,))
    yield port
    daemon.close()


def test_real_oidentd_upstream(oidentd):
    # The connection oidentd is asked about: opened from UPSTREAM (oidentd's
    # host) to a listener on FROM (this "host"), as a chain's previous hop.
    with socket.socket() as listener:
        listener.bind((FROM, 0))
        listener.listen(1)
        out = socket.socket()
        out.bind((UPSTREAM, 0))
        out.connect(listener.getsockname())
        accepted, _ = listener.accept()
        try:
            their, ours = out.getsockname()[1], listener.getsockname()[1]
            o = run(lambda r: RecursiveClient(r, ClientBudget(**REAL)).ask(
                Endpoint(UPSTREAM, oidentd), Endpoint(FROM, 0),
                wire.Request((their, ours), wire.SV_REC, 4711)))
        finally:
            out.close()
            accepted.close()
    # oidentd reads the port pair, ignores the rest and names the owner: a
    # plain RFC 1413 reply, kept as it came.
    assert (o.outcome, o.opsys, o.user) == ("userid", "UNIX", "root"), o
    assert o.reply == f"{their},{ours}:USERID:UNIX:root"
