"""The ident listener: a LineReceiver per client, and a factory that keeps
every per-peer budget (spec 7).

Budgets, each from the config: total connections and connections per
source address (refused at accept), an idle timeout, requests per
connection, replies outstanding per connection (the pipeline: reading stops
while it is full), and the line length (a longer line closes the
connection). Replies go out in the order the requests came.

Idle connections are found by one sweep per second over the open ones (a
time of last activity each), not by a timer per connection: Twisted's
``TimeoutMixin`` made a ``DelayedCall`` at accept, moved it at every line
and reply and cancelled it at close, about 3 µs of CPU per connection,
where the sweep costs a fraction of a microsecond per open connection per
second. A connection idle for ``idle_timeout`` seconds is closed at most
one sweep interval later.

A reply is sent straight on the socket when nothing is buffered for it:
Twisted's ``write`` would send it only on the next reactor turn, after two
more ``epoll_ctl`` calls (one query per connection is the common case, so
this is on the hot path).
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Optional

from twisted.internet import defer, protocol, tcp
from twisted.internet.address import IPv4Address
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from stop import wire
from stop.answer import Answerer, Query
from stop.config import Config
from stop.errors import RequestError
from stop.model import Endpoint, canonical_host

#: Seconds between two sweeps for idle connections (less when
#: ``idle_timeout`` is less): a connection is closed after between
#: ``idle_timeout`` and ``idle_timeout`` + this many seconds without a line
#: or a reply.
SWEEP_INTERVAL = 1.0


def endpoint_of(address) -> Endpoint:
    """An Endpoint from a Twisted IPv4Address/IPv6Address."""
    if isinstance(address, IPv4Address):
        return Endpoint(address.host, address.port)  # the kernel's dotted quad: canonical
    host = address.host
    scope = getattr(address, "scopeID", 0)
    if scope and "%" not in host:
        host = f"{host}%{scope}"
    return Endpoint(canonical_host(host), address.port)


class IdentProtocol(LineReceiver):
    """One ident client connection.

    ``_last`` is the time (the factory's clock) of the last activity: the
    connection made, a line received, a reply written. The factory's sweep
    closes the connection once that is ``idle_timeout`` seconds old.
    """

    delimiter = b"\n"  # a bare LF ends a line too; the CR is stripped
    log = Logger()

    def __init__(self):
        self._replies: deque = deque()  # [Deferred, reply bytes or None]
        self._requests = 0
        self._finishing = False
        # The socket, while replies may be sent on it directly: nothing of
        # ours is in the transport's buffer (None: always transport.write).
        self._sock = None

    # MAX_LENGTH (LineReceiver's own cap) is set per instance from config,
    # one more than the line limit to leave room for the CR.

    def connectionMade(self) -> None:
        # self.requester was set by the factory, which needed it first.
        self.server = endpoint_of(self.transport.getHost())
        # The limits of a connection are those in force when it was made:
        # a reload (SIGHUP) applies to the connections made after it.
        self.config = config = self.factory.config
        self.MAX_LENGTH = config.max_line_length + 1
        if isinstance(self.transport, tcp.Connection):  # plain TCP (not TLS, not a test's)
            self._sock = self.transport.getHandle()

    def lineReceived(self, line: bytes) -> None:
        self._last = self._seconds()
        if self._finishing:
            return
        config: Config = self.config
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > config.max_line_length:
            self.lineLengthExceeded(line)
            return
        self._requests += 1
        answerer: Answerer = self.factory.answerer
        try:
            request = wire.parse_request(line)
        except RequestError as e:
            self.log.info("{requester} sent an unreadable request ({why}): {word}",
                          requester=str(self.requester), why=str(e), word=e.word)
            d = defer.succeed(answerer.error_reply(e.ports, e))
        else:
            d = answerer.answer(Query(request, self.requester, self.server))
        slot = [d, None]
        self._replies.append(slot)
        d.addCallback(self._replied, slot)
        if self._requests >= config.max_requests_per_connection:
            self.log.warn("{requester}: {n} requests on one connection, the most allowed "
                          "(max_requests_per_connection); "
                          "closing after the replies", requester=str(self.requester),
                          n=self._requests)
            self._finish()
        elif len(self._replies) >= config.max_pipeline:
            self.pauseProducing()

    def _replied(self, reply: bytes, slot: list) -> None:
        slot[1] = reply
        while self._replies and self._replies[0][1] is not None:
            out = self._replies.popleft()[1]
            if self.transport is not None and self.connected:
                self._write(out)
                self._last = self._seconds()
        if self.paused and not self._finishing and len(self._replies) < self.config.max_pipeline:
            self.resumeProducing()
        if self._finishing and not self._replies:
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        """Send ``data`` on the socket now when nothing is buffered;
        whatever it does not take (or any error) goes through the
        transport, which then carries every later write (order is kept)."""
        sock = self._sock
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError as e:
                # Full: the transport waits for room. Anything else: the
                # transport meets the error and closes its own way.
                sent = 0 if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR) else -1
            if sent == len(data):
                return
            self._sock = None
            if sent > 0:
                data = data[sent:]
        self.transport.write(data)

    def _finish(self) -> None:
        """Read no more; close once every reply is written."""
        self._finishing = True
        self.pauseProducing()
        if not self._replies:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.warn("{requester}: line longer than {max} bytes; closing",
                      requester=str(self.requester), max=self.config.max_line_length)
        self._finishing = True
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self.log.info("{requester}: idle for {t} s; closing", requester=str(self.requester),
                      t=self.config.idle_timeout)
        self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._finishing = True
        self._sock = None
        self.factory.connection_closed(self)


class IdentFactory(protocol.ServerFactory):
    """Makes IdentProtocols within the connection budgets, and closes the
    idle ones (a sweep every :data:`SWEEP_INTERVAL` seconds, scheduled on
    ``clock`` only while a connection is open).

    :param clock: an IReactorTime (the reactor, or a Clock in tests).
    """

    protocol = IdentProtocol
    log = Logger()

    def __init__(self, config: Config, answerer: Answerer, clock):
        self.config = config
        self.answerer = answerer
        self.clock = clock
        self.connections = 0
        self.per_host: dict[str, int] = {}
        # The connections the sweep looks at: open and not yet timed out.
        self._watched: set[IdentProtocol] = set()
        self._sweep_call = None  # the next sweep's DelayedCall, or None

    def buildProtocol(self, addr) -> Optional[IdentProtocol]:
        requester = endpoint_of(addr)
        host = requester.host
        if self.connections >= self.config.max_connections:
            self.log.warn("refusing {host}: {n} connections open, the most allowed "
                          "(max_connections)", host=host, n=self.connections)
            return None
        if self.per_host.get(host, 0) >= self.config.max_connections_per_host:
            self.log.warn("refusing {host}: {n} connections open from it, the most allowed "
                          "(max_connections_per_host)", host=host, n=self.per_host[host])
            return None
        p = protocol.ServerFactory.buildProtocol(self, addr)
        p._host_key = host
        p.requester = requester
        p._seconds = seconds = self.clock.seconds
        p._last = seconds()
        self.connections += 1
        self.per_host[host] = self.per_host.get(host, 0) + 1
        self._watched.add(p)
        if self._sweep_call is None:
            self._schedule_sweep()
        return p

    def reconfigure(self, config: Config) -> None:
        """Apply a reload's settings to the connections made from now on."""
        self.config = config

    def _schedule_sweep(self) -> None:
        self._sweep_call = self.clock.callLater(
            min(SWEEP_INTERVAL, self.config.idle_timeout), self._sweep)

    def _sweep(self) -> None:
        """Close every watched connection idle for its ``idle_timeout``;
        come back while any is open. Never raises (a failure to close one
        is logged and the others are still swept)."""
        self._sweep_call = None
        try:
            now = self.clock.seconds()
            idle = [p for p in self._watched if now - p._last >= p.config.idle_timeout]
            for p in idle:
                self._watched.discard(p)  # timed out once, as TimeoutMixin did
                try:
                    p.timeoutConnection()
                except Exception:
                    self.log.failure("cannot close idle connection from {requester}",
                                     requester=str(p.requester))
        except Exception:
            self.log.failure("idle connection sweep failed")
        finally:
            if self._watched:
                self._schedule_sweep()

    def connection_closed(self, p: IdentProtocol) -> None:
        self._watched.discard(p)
        host = p._host_key
        self.connections -= 1
        left = self.per_host[host] - 1
        if left:
            self.per_host[host] = left
        else:
            del self.per_host[host]
