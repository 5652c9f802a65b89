"""The recursive client: asks another host's ident daemon one ``ID_REC`` /
``SV_REC`` question (spec 6) and says what came of it.

One TCP connection per question, opened from the local address of the
connection asked about (so the other daemon can match it: for it, this host
is the requester), on Twisted client endpoints. Every question ends in an
:class:`Outcome`, never in an exception, within budgets:

* questions in flight at once, in all and per target host: past either,
  the outcome is ``skipped`` at once (nothing is queued, so a flood of
  requests never opens more connections than the budget);
* the connect timeout and the reply timeout (a deadline from the moment
  the connection is up: a peer sending a byte a second is cut off too);
* the longest reply line (longer: ``unreadable``, connection aborted).

Nothing here touches the requester of the original query, the record or
the store: :mod:`stop.recursion` decides whom to ask and saves outcomes.
See docs/recursion.rst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger
from zope.interface import implementer

from stop import wire
from stop.errors import UnreadableReply
from stop.interfaces import IRecursiveClient
from stop.model import Endpoint, canonical_host, host_family

#: Every outcome a question can have (contract: CONTRACTS.md section 3).
OUTCOMES = ("token", "error", "userid", "refused", "timeout", "unreadable", "skipped", "failed")


@dataclass(frozen=True)
class Outcome:
    """What came of one question.

    ``outcome`` is one of :data:`OUTCOMES`:

    * ``token``: a ``USERID : OTHER : <token>`` reply (``token`` set);
    * ``error``: an ``ERROR : <word>`` reply (``error`` set);
    * ``userid``: a plain RFC 1413 reply with a user name (``opsys``,
      ``user`` set), e.g. oidentd's ``USERID : UNIX : alice``;
    * ``refused``: the connection was refused (no daemon there);
    * ``timeout``: no connection within the connect timeout, or no reply
      line within the reply timeout (``why`` says which);
    * ``unreadable``: a reply that is not an ident reply line, a line too
      long, ports that differ from the question, or the connection closed
      before a full line;
    * ``skipped``: not asked, a budget was spent (``why`` names it);
    * ``failed``: could not ask for a local reason (cannot bind the local
      address, no route, the daemon stopping).

    ``reply`` is the reply as received (bounded, non-printables escaped),
    when any byte came; ``local`` our end of the query connection (port
    ``None`` until connected); ``sent`` when the question was written and
    ``answered`` when the other host decided the outcome (its reply line,
    its refusal or its close), seconds since the epoch, ``None`` when that
    did not happen.
    """

    outcome: str
    why: Optional[str] = None
    token: Optional[str] = None
    error: Optional[str] = None
    opsys: Optional[str] = None
    user: Optional[str] = None
    reply: Optional[str] = None
    local: Optional[Endpoint] = None
    sent: Optional[float] = None
    answered: Optional[float] = None


@dataclass(frozen=True)
class ClientBudget:
    """The client's limits (settings ``recursion_*``).

    ``max_outbound``: questions in flight in all; ``max_per_host``: in
    flight to one target address; ``connect_timeout`` and
    ``reply_timeout`` in seconds; ``max_reply_length``: longest reply line
    in bytes, CR LF not counted.
    """

    max_outbound: int = 32
    max_per_host: int = 4
    connect_timeout: float = 10.0
    reply_timeout: float = 30.0
    max_reply_length: int = 1000

    @classmethod
    def from_config(cls, config) -> "ClientBudget":
        return cls(config.recursion_max_outbound, config.recursion_max_per_host,
                   config.recursion_connect_timeout, config.recursion_reply_timeout,
                   config.recursion_max_reply_length)


def tcp_endpoint(reactor, target: Endpoint, local: Endpoint, timeout: float):
    """A TCP4/TCP6 client endpoint to ``target`` bound to ``local``'s address
    (any port; no bind when the address is ``""``)."""
    bind = (local.host, 0) if local.host else None
    cls = endpoints.TCP6ClientEndpoint if host_family(target.host) == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, target.host, target.port, timeout=timeout, bindAddress=bind)


@implementer(IRecursiveClient)
class RecursiveClient:
    """The recursive client (see the module docstring).

    :param reactor: provides IReactorTCP and IReactorTime (a
        ``MemoryReactorClock`` in unit tests).
    :param budget: a :class:`ClientBudget`.
    :param endpoint_factory: ``(reactor, target, local, timeout) ->
        IStreamClientEndpoint``; :func:`tcp_endpoint` by default.
    """

    log = Logger()

    def __init__(self, reactor, budget: ClientBudget = ClientBudget(),
                 endpoint_factory=tcp_endpoint):
        self._reactor = reactor
        self.budget = budget
        self._endpoint_factory = endpoint_factory
        self._asking: set = set()
        self._per_host: dict[str, int] = {}
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._asking)

    def in_flight_to(self, host: str) -> int:
        """Questions in flight to ``host`` (an address literal)."""
        return self._per_host.get(host, 0)

    def ask(self, target: Endpoint, local: Endpoint, request: wire.Request) -> defer.Deferred:
        """See :meth:`IRecursiveClient.ask`."""
        local = Endpoint(local.host, None)
        if self._closed:
            return defer.succeed(Outcome("skipped", why="stopping", local=local))
        if len(self._asking) >= self.budget.max_outbound:
            return defer.succeed(Outcome(
                "skipped", why="budget: questions in flight in all (recursion_max_outbound)",
                local=local))
        host = target.host
        if self._per_host.get(host, 0) >= self.budget.max_per_host:
            return defer.succeed(Outcome(
                "skipped", why="budget: questions in flight to this host "
                               "(recursion_max_per_host)", local=local))
        asking = _Asking(self, target, local, request)
        self._asking.add(asking)
        self._per_host[host] = self._per_host.get(host, 0) + 1
        asking.start()
        return asking.done

    def _finished(self, asking: "_Asking") -> None:
        self._asking.discard(asking)
        host = asking.target.host
        left = self._per_host.get(host, 1) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    def close(self) -> defer.Deferred:
        """See :meth:`IRecursiveClient.close`."""
        self._closed = True
        pending = [a.done for a in self._asking]
        for asking in list(self._asking):
            asking.stop("stopping")
        return defer.DeferredList(pending)


class _Question(protocol.Protocol):
    """The connection of one question; everything is decided by its
    :class:`_Asking`."""

    def __init__(self, asking: "_Asking"):
        self.asking = asking

    def connectionMade(self) -> None:
        self.asking.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.asking.received(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.asking.lost(reason)


class _QuestionFactory(protocol.Factory):
    noisy = False

    def __init__(self, asking: "_Asking"):
        self.asking = asking

    def buildProtocol(self, addr) -> _Question:
        return _Question(self.asking)


class _Asking:
    """The state of one question, from connect to outcome (fires ``done``
    exactly once)."""

    log = Logger()

    def __init__(self, client: RecursiveClient, target: Endpoint, local: Endpoint,
                 request: wire.Request):
        self.client = client
        self.target = target
        self.local = local
        self.request = request
        self.done: defer.Deferred = defer.Deferred()
        self._clock = client._reactor
        self._budget = client.budget
        self._connecting: Optional[defer.Deferred] = None
        self._transport = None
        self._timer = None
        self._buffer = b""
        self._sent: Optional[float] = None
        self._timed_out = False
        self._finished = False
        self._released = False

    def start(self) -> None:
        try:
            endpoint = self.client._endpoint_factory(
                self._clock, self.target, self.local, self._budget.connect_timeout)
            d = endpoint.connect(_QuestionFactory(self))
        except Exception as e:  # a bad address literal, say: still one outcome
            self.log.failure("recursion: cannot ask {target}", target=str(self.target))
            self._finish("failed", why=f"cannot connect: {e}")
            return
        self._connecting = d
        # The endpoint's own timeout needs a real connector; this one works
        # on a Clock too.
        self._timer = self._clock.callLater(self._budget.connect_timeout, self._connect_timeout)
        d.addErrback(self._connect_failed)

    def _connect_timeout(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._connecting is not None:
            self._connecting.cancel()  # -> _connect_failed

    def _connect_failed(self, failure) -> None:
        self._connecting = None
        if self._finished:
            return
        if self._timed_out or failure.check(error.TimeoutError):
            self._finish("timeout", why="connect timeout")
        elif failure.check(error.ConnectionRefusedError):
            self._finish("refused", why="connection refused", answered=self._clock.seconds())
        elif failure.check(error.ConnectBindError):
            self._finish("failed", why=f"cannot bind {self.local.host}: {failure.value}")
        elif failure.check(error.ConnectingCancelledError, defer.CancelledError):
            self._finish("failed", why="stopping")
        elif failure.check(error.ConnectError):
            self._finish("failed", why=f"cannot connect: {failure.value}")
        else:
            self.log.failure("recursion: unexpected error asking {target}", failure,
                             target=str(self.target))
            self._finish("failed", why=f"unexpected error: {failure.getErrorMessage()}")

    def connected(self, transport) -> None:
        self._connecting = None
        self._transport = transport
        if self._timer is not None and self._timer.active():
            self._timer.cancel()  # the connect timer
        self._timer = None
        if self._finished:  # stopped while the connection came up
            transport.abortConnection()
            return
        host = transport.getHost()
        try:
            self.local = Endpoint(canonical_host(host.host), host.port)
        except (AttributeError, ValueError):
            pass
        self._timer = self._clock.callLater(self._budget.reply_timeout, self._reply_timeout)
        transport.write(wire.format_request(self.request))
        self._sent = self._clock.seconds()

    def received(self, data: bytes) -> None:
        if self._finished:
            return
        limit = self._budget.max_reply_length
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            # CR LF not counted: room for the CR of a line of exactly limit.
            if len(self._buffer) > limit + 1:
                self._abort("unreadable", why=f"reply line longer than {limit} bytes",
                            answered=self._clock.seconds())
            return
        line = self._buffer[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            self._abort("unreadable", why=f"reply line longer than {limit} bytes",
                        answered=self._clock.seconds())
            return
        self._decide(line)

    def _decide(self, line: bytes) -> None:
        now = self._clock.seconds()
        reply_text = wire.printable(line, self._budget.max_reply_length)
        try:
            reply = wire.parse_reply(line)
        except UnreadableReply as e:
            self._abort("unreadable", why=str(e), answered=now, reply=reply_text)
            return
        if reply.ports != self.request.ports:
            self._abort("unreadable", why="the reply's ports differ from the question's",
                        answered=now, reply=reply_text)
            return
        if reply.kind == wire.ERROR:
            result = dict(outcome="error", error=reply.error)
        elif reply.token is not None:
            result = dict(outcome="token", token=reply.token)
        else:
            result = dict(outcome="userid", opsys=reply.opsys, user=reply.user)
        self._finish(reply=reply_text, answered=now, **result)
        if self._transport is not None:
            self._transport.loseConnection()

    def _reply_timeout(self) -> None:
        self._timer = None
        self._abort("timeout", why="reply timeout")

    def lost(self, reason) -> None:
        self._transport = None
        if not self._finished:
            why = "closed before a full reply line" if self._buffer else "closed without a reply"
            self._finish("unreadable", why=why, answered=self._clock.seconds())
        self._release()

    def stop(self, why: str) -> None:
        """End now (the client is closing)."""
        if self._connecting is not None:
            self._connecting.cancel()  # -> _connect_failed -> "failed"
        if not self._finished:
            self._abort("failed", why=why)

    def _release(self) -> None:
        """Give the question's slots in the budget back (once)."""
        if not self._released:
            self._released = True
            self.client._finished(self)

    def _abort(self, outcome: str, **kw) -> None:
        self._finish(outcome, **kw)
        if self._transport is not None:
            self._transport.abortConnection()

    def _finish(self, outcome: str, reply: Optional[str] = None, **kw) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if reply is None and self._buffer:
            reply = wire.printable(self._buffer, self._budget.max_reply_length)
        if self._transport is None:
            self._release()
        # else the slot is given back once the connection is closed (lost()):
        # a slot of the budget is a socket, and Twisted closes it in a later
        # reactor turn; released now, a new question's socket could open
        # before this one is gone (33 sockets for a budget of 32, seen in
        # the DoS test).
        self.done.callback(Outcome(outcome, reply=reply, local=self.local, sent=self._sent, **kw))
