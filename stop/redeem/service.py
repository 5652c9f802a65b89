"""The redemption service: HTTPS with mutual TLS on ``twisted.web``.

One resource::

    GET /v1/records/<token>

answers ``200`` with ``{"version": 1, "token", "record", "linked",
"integrity"}``: ``record`` is the stored record as text (its UTF-8 bytes are
exactly the stored bytes, so the hash of an SV record can be checked),
``linked`` the linked entries (contract section 1: recursion outcomes) as
text, oldest first, ``integrity`` the store's own check. Every token the
client may not have gets the same ``404 {"error": "not found"}``, whether
it is unknown or refused by the policy. ``403 {"error": "not authorised"}``
means the client's identity may redeem nothing at all (no rule names it, or
it is refused: a ``!IDENTITY`` line of ``redeem_allow``, or ``redeem_deny``); ``429`` a client over its rate. Nothing else is
served.

The layers, outermost first: :class:`ConnectionGate` (at most
``redeem_max_connections`` at once, ``redeem_rate`` connections per source
address: refused before any TLS work), Twisted's ``TLSMemoryBIOFactory``
with :class:`stop.redeem.tls.ServerTLS`, then a ``twisted.web`` ``Site``
whose channel (:class:`RedeemChannel`) takes the client's identity from its
verified certificate when the handshake completes and audits a handshake
that fails. The ``Site`` is handed to TLS through a plain factory so no ALPN
callback is installed (``stop.redeem.tls`` says why).

Every request is audited (:mod:`stop.redeem.audit`) and answered only once
its audit line is durable; when the audit trail cannot be written, nothing
is released (``503``).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections import OrderedDict, deque
from typing import Optional

from twisted.application import service
from twisted.internet import endpoints, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, resource, server
from zope.interface import implementer

from stop import records
from stop.errors import ConfigError
from stop.redeem.audit import AuditFailed, AuditLog, audit_path, bounded
from stop.redeem.policy import ClientIdentity, Policy, parse_policy
from stop.redeem.tls import ServerTLS, handshake_failure, peer_identity

log = Logger()

#: The one resource: ``/v1/records/<token>``, a token of the spec's form
#: (40 or 64 lowercase hex digits).
RECORD_PATH = re.compile(rb"/v1/records/([0-9a-f]{40}|[0-9a-f]{64})\Z")
RECORD_PREFIX = b"/v1/records/"
#: Bytes of request body tolerated (and ignored) before the connection is
#: closed: redemption requests have no body.
MAX_BODY = 1024
#: Clients (identities or addresses) remembered by the rate limiter.
MAX_TRACKED = 4096
#: TLS connections served at once; the others wait (see :class:`Slots`).
MAX_ACTIVE = 2
#: Refused handshakes of one address written per :data:`REFUSED_WINDOW`
#: seconds; more are counted, and the count written with its next line.
REFUSED_BURST = 10
REFUSED_WINDOW = 60.0
#: Seconds a served connection has to complete its TLS handshake before it
#: is aborted: an idle TCP connection must not hold a slot for
#: ``redeem_timeout``.
HANDSHAKE_TIMEOUT = 5.0

# Audit outcomes (docs/redeem.rst lists them).
RELEASED = "released"
UNKNOWN = "unknown-token"
REFUSED = "refused-by-policy"
NOT_AUTHORISED = "not-authorised"
RATE_LIMITED = "rate-limited"
BAD_REQUEST = "bad-request"
TLS_REFUSED = "tls-refused"
DROPPED = "dropped"
FAILED = "error"


class RateLimiter:
    """A token bucket per key: ``rate`` per minute, up to ``burst`` at
    once. At most ``max_keys`` keys are kept; the least recently seen is
    forgotten first (it comes back with a full bucket).

    :param clock: ``seconds()`` (the reactor, or a Clock in tests).
    """

    def __init__(self, rate: float, burst: int, clock, max_keys: int = MAX_TRACKED):
        self.rate = rate / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict = OrderedDict()

    def allow(self, key) -> bool:
        """Take one from ``key``'s bucket; False when it is empty."""
        now = self._clock.seconds()
        level, then = self._buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - then) * self.rate)
        ok = level >= 1.0
        if ok:
            level -= 1.0
        self._buckets[key] = (level, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return ok

    def retry_after(self, key) -> int:
        """Seconds until ``key`` has one again (at least 1)."""
        level, _ = self._buckets.get(key, (self.burst, 0.0))
        if self.rate <= 0:
            return 3600
        return max(1, int((1.0 - level) / self.rate + 0.999))


class Slots:
    """Connections open, and the few being served at once.

    Every event of a TLS connection (a handshake step, a request) runs on
    the reactor thread, between ident answers; many connections in flight
    would put many such events before an ident query's turn. So at most
    ``active`` connections are served at once, at most one per source
    address; the others (up to the gate's limit) wait, unread, in accept
    order, and are let in as served ones close. A served connection has
    :data:`HANDSHAKE_TIMEOUT` seconds to complete its TLS handshake; a
    served keep-alive connection is closed after its response while others
    wait, so it cannot hold its place. So one address (idle TCP connections
    that never handshake) cannot keep the investigators out.
    """

    def __init__(self, active: int = MAX_ACTIVE):
        self.open = 0
        self.active = 0
        self.limit = active
        self.waiting: deque = deque()
        self.hosts: set = set()  # the source addresses being served

    def admit(self, channel: "RedeemChannel") -> bool:
        """Serve ``channel`` now (True), or queue it (False: the caller
        stops reading its transport)."""
        if self.active < self.limit and channel.host not in self.hosts:
            self._take(channel)
            return True
        self.waiting.append(channel)
        return False

    def _take(self, channel: "RedeemChannel") -> None:
        self.active += 1
        self.hosts.add(channel.host)

    def release(self, channel: "RedeemChannel") -> None:
        """``channel`` closed: free its place or its slot (and serve the
        next one waiting)."""
        if not channel.served:
            try:
                self.waiting.remove(channel)
            except ValueError:
                pass
            return
        self.active -= 1
        self.hosts.discard(channel.host)
        while self.active < self.limit:
            nxt = next((c for c in self.waiting if c.host not in self.hosts), None)
            if nxt is None:
                return
            self.waiting.remove(nxt)
            self._take(nxt)
            nxt.serve()


class RedeemRequest(server.Request):
    """A request whose body is bounded: a redemption has none, so more
    than :data:`MAX_BODY` bytes close the connection."""

    _body_bytes = 0

    def gotLength(self, length) -> None:
        # A declared body over the bound closes the connection at once
        # (Twisted would spool more than 100,000 bytes to a temporary file).
        server.Request.gotLength(self, None if length is not None and length > MAX_BODY
                                 else length)
        if length is not None and length > MAX_BODY:
            self.channel.transport.abortConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        server.Request.handleContentChunk(self, data)


@implementer(interfaces.IHandshakeListener)
class RedeemChannel(http.HTTPChannel):
    """HTTP/1.1 over the TLS connection, with tighter header limits; knows
    its client's :class:`ClientIdentity` once the handshake completed."""

    maxHeaders = 32
    totalHeadersSize = 8192
    MAX_LENGTH = 4096

    client: Optional[ClientIdentity] = None
    served = False
    host = None  # the source address (Slots serves one per address)
    _handshook = False
    _counted = False
    _deadline = None

    def connectionMade(self):
        slots = self.factory.slots
        slots.open += 1
        self._counted = True
        self.host = getattr(self.transport.getPeer(), "host", None)
        http.HTTPChannel.connectionMade(self)
        if slots.admit(self):
            self.served = True
            self._start_deadline()
        else:
            # Not read until served: no TLS work for it meanwhile (the
            # idle timeout runs: a connection cannot wait forever).
            self._tcp().pauseProducing()

    def _tcp(self):
        return self.transport.transport  # under TLSMemoryBIOProtocol

    def serve(self) -> None:
        """Our turn (see :class:`Slots`): start reading."""
        self.served = True
        self._start_deadline()
        if self._tcp() is not None:
            self._tcp().resumeProducing()

    def _start_deadline(self) -> None:
        """Give the TLS handshake :data:`HANDSHAKE_TIMEOUT` seconds from now."""
        if not self._handshook:
            self._deadline = self.factory.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._handshook:
            log.info("redemption: no TLS handshake from {host} within {t:g} s: closed",
                     host=self.host, t=HANDSHAKE_TIMEOUT)
            self._why_lost = f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
            self.transport.abortConnection()

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def requestDone(self, request):
        if self.factory.slots.waiting:
            self.persistent = False  # make room: it closes after this response
        http.HTTPChannel.requestDone(self, request)

    _why_lost: Optional[str] = None

    def handshakeCompleted(self) -> None:
        self._handshook = True
        self._stop_deadline()
        try:
            self.client = peer_identity(self.transport)
        except Exception:
            log.failure("redemption: cannot read the verified client certificate")
            self.client = None

    def connectionLost(self, reason):
        self._stop_deadline()
        if self._counted:
            self.factory.slots.open -= 1
            self._counted = False
            self.factory.slots.release(self)
        if not self._handshook:
            handle = getattr(self.transport, "getHandle", lambda: None)()
            why = self._why_lost or handshake_failure(reason, handle)
            self.factory.redeem.tls_refused(self.getPeer(), why)
        http.HTTPChannel.connectionLost(self, reason)


class _PlainFactory(protocol.ServerFactory):
    """Hands the Site to the TLS layer without the Site's ALPN offer
    (``IProtocolNegotiationFactory``): Twisted would install a cffi
    callback for it (see stop.redeem.tls)."""

    def __init__(self, site: server.Site):
        self.site = site

    def startFactory(self):
        self.site.doStart()

    def stopFactory(self):
        self.site.doStop()

    def buildProtocol(self, addr):
        return self.site.buildProtocol(addr)


class ConnectionGate(protocol.ServerFactory):
    """The outermost factory: refuses a connection (closed at once, before
    any TLS work) when ``max_connections`` are open or its source address
    is over its rate. The first refusal of a run is audited; how many more
    followed is audited when that address is let in again."""

    noisy = False

    def __init__(self, inner: protocol.Factory, slots: Slots, max_connections: int,
                 limiter: RateLimiter, redeem: "Redemption"):
        self.inner = inner
        self.slots = slots
        self.max_connections = max_connections
        self.limiter = limiter
        self.redeem = redeem
        self._dropped: dict[str, int] = {}

    def startFactory(self):
        self.inner.doStart()

    def stopFactory(self):
        self.inner.doStop()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "?")
        if self.slots.open >= self.max_connections:
            why = f"{self.max_connections} connections open (redeem_max_connections)"
        elif not self.limiter.allow(("address", rate_key(host))):
            why = "over the connection rate of its address (redeem_rate)"
        else:
            more = self._dropped.pop(host, 0) - 1
            if more > 0:
                self.redeem.note(DROPPED, addr, why=f"{more} more connections were refused "
                                 "after the first", count=more)
            return self.inner.buildProtocol(addr)
        seen = self._dropped.get(host, 0)
        if seen == 0:
            log.warn("redemption: refused a connection from {host}: {why}", host=host, why=why)
            self.redeem.note(DROPPED, addr, why=why)
        if seen or len(self._dropped) < MAX_TRACKED:
            self._dropped[host] = seen + 1
        return None


def rate_key(host: str) -> str:
    """What the connection rate is counted on: the address, or its /64 for
    IPv6 (one host usually holds a whole /64: counting each address would
    give it billions of buckets)."""
    if ":" not in host:
        return host
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.ip_network(f"{addr}/64", strict=False))


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


class Redemption(resource.Resource):
    """The ``/v1/records/<token>`` resource and its decisions.

    :param store: the daemon's :class:`~stop.interfaces.IRecordStore`
        (``get``, ``integrity``, ``linked``).
    :param policy: the parsed :class:`~stop.redeem.policy.Policy`.
    :param audit: the :class:`~stop.redeem.audit.AuditLog`.
    :param limiter: the per-identity :class:`RateLimiter`.
    """

    isLeaf = True

    def __init__(self, store, policy: Policy, audit: AuditLog, limiter: RateLimiter, clock=None):
        resource.Resource.__init__(self)
        self.store = store
        self.policy = policy
        self.audit = audit
        self.limiter = limiter
        self.clock = clock if clock is not None else limiter._clock
        #: address -> (time of its last tls-refused line, refusals since)
        self._refused: OrderedDict = OrderedDict()

    # -- audit -------------------------------------------------------------

    def audit_event(self, outcome: str, peer, client: Optional[ClientIdentity] = None,
                    token: Optional[str] = None, why: Optional[str] = None, **extra):
        """Append one event to the audit trail.

        :return: a Deferred firing once the line is durable, or failing with
            AuditFailed (already logged by the audit log).
        """
        event = {"outcome": outcome,
                 "client": {"address": getattr(peer, "host", None), "port": getattr(peer, "port", None)}}
        if client is not None:
            event.update(client.audit_fields())
        if token is not None:
            event["token"] = bounded(token, 128)
        if why is not None:
            event["why"] = bounded(why)
        event.update(extra)
        return self.audit.record(event)

    def tls_refused(self, peer, why: str) -> None:
        """Audit a refused handshake: at most :data:`REFUSED_BURST` lines
        per address per :data:`REFUSED_WINDOW` seconds; the refusals
        counted beyond are written (``more``) with the next line for that
        address."""
        host = getattr(peer, "host", None)
        now = self.clock.seconds()
        start, written, more = self._refused.pop(host, (None, 0, 0))
        if start is None or now - start >= REFUSED_WINDOW:
            start, written = now, 0
        if written >= REFUSED_BURST:
            self._refused[host] = (start, written, more + 1)
            return
        self._refused[host] = (start, written + 1, 0)
        while len(self._refused) > MAX_TRACKED:
            self._refused.popitem(last=False)
        self.note(TLS_REFUSED, peer, why=why, **({"more": more} if more else {}))

    def note(self, outcome: str, peer, **fields) -> None:
        """:meth:`audit_event` for events nobody waits for (connections
        refused before HTTP); a write failure is logged by the audit log."""
        self.audit_event(outcome, peer, **fields).addErrback(lambda f: None)

    # -- HTTP --------------------------------------------------------------

    def render(self, request):
        request.setHeader(b"server", b"stop")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"application/json")
        client = getattr(request.channel, "client", None)
        if request.method != b"GET":
            method = bounded(request.method.decode("latin-1"), 16)
            status, outcome, why, token, body = (405, BAD_REQUEST, f"method {method}", None,
                                                 {"error": "method not allowed"})
        else:
            try:
                status, outcome, why, token, body = self._decide(request, client)
            except Exception as e:
                # A bug must not skip the audit line (a plain Twisted 500
                # would): answer 503, audit it, log it for the admin.
                log.failure("redemption: request {path} from {client} failed",
                            path=bounded(request.path.decode("latin-1"), 128),
                            client=client.name if client is not None else None)
                status, outcome, why, token, body = (
                    503, FAILED, f"internal error: {type(e).__name__}", None,
                    {"error": "unavailable"})
        gone: list = []
        request.notifyFinish().addErrback(gone.append)

        def respond(_):
            if gone:
                return
            request.setResponseCode(status)
            if status == 429:
                request.setHeader(b"retry-after", b"%d" % self.limiter.retry_after(
                    ("identity", client.name)))
            request.write(body if isinstance(body, bytes) else _json(body))
            request.finish()

        def unaudited(_):
            # No record leaves without its audit line.
            if gone:
                return
            request.setResponseCode(503)
            request.write(_json({"error": "unavailable"}))
            request.finish()

        d = self.audit_event(outcome, request.getClientAddress(), client, token, why)
        d.addCallbacks(respond, unaudited)
        d.addErrback(lambda f: log.failure("redemption: cannot answer", f))
        return server.NOT_DONE_YET

    def _decide(self, request, client: Optional[ClientIdentity]):
        """:return: ``(status, outcome, why, token, body)``."""
        if client is None:  # the TLS layer requires one; never serve without
            return 403, NOT_AUTHORISED, "no verified client certificate", None, {"error": "not authorised"}
        path = request.path
        match = RECORD_PATH.match(path)
        token = None
        if path.startswith(RECORD_PREFIX):
            token = path[len(RECORD_PREFIX):].decode("latin-1")
        if not self.limiter.allow(("identity", client.name)):
            return 429, RATE_LIMITED, "over redeem_rate", token, {"error": "rate limited"}
        denied = self.policy.denied(client)
        if denied is not None:
            return 403, NOT_AUTHORISED, denied, token, {"error": "not authorised"}
        rules = self.policy.rules_for(client)
        if not rules:
            return 403, NOT_AUTHORISED, "no redeem_allow rule for this identity", token, \
                {"error": "not authorised"}
        not_found = {"error": "not found"}
        if match is None:
            if token is None:
                return 404, BAD_REQUEST, f"path {bounded(path.decode('latin-1'), 64)}", None, not_found
            return 404, UNKNOWN, "not a token", token, not_found
        token = match.group(1).decode("ascii")
        try:
            data = self.store.get(token)
        except Exception as e:  # a store error must not become a traceback
            log.error("redemption: cannot read token {token}: {err}", token=token, err=str(e))
            return 503, FAILED, f"store: {e}", token, {"error": "unavailable"}
        if data is None:
            return 404, UNKNOWN, None, token, not_found
        try:
            record = records.load(data)
        except ValueError:
            record = {}
        if not self.policy.releases(rules, record):
            return 404, REFUSED, "outside this identity's redeem_allow scope", token, not_found
        try:
            linked = list(self.store.linked(token))
            integrity = bool(self.store.integrity(token))
        except Exception as e:
            log.error("redemption: cannot read token {token}: {err}", token=token, err=str(e))
            return 503, FAILED, f"store: {e}", token, {"error": "unavailable"}
        return 200, RELEASED, None, token, _json(release_body(token, data, linked, integrity))


def _text(data: bytes) -> dict:
    """A stored entry for the reply: its text (exact bytes once UTF-8
    encoded), or base64 when it is not UTF-8 (a damaged entry)."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def release_body(token: str, data: bytes, linked: list, integrity: bool) -> dict:
    """The JSON object of a released record (see the module doc)."""
    body = {"version": 1, "token": token, "integrity": integrity}
    rec = _text(data)
    if "text" in rec:
        body["record"] = rec["text"]
    else:
        body["record_base64"] = rec["base64"]
        body["integrity"] = False
    body["linked"] = [_text(e).get("text") for e in linked]
    return body


class _AuditService(service.Service):
    """Opens the audit trail when the daemon starts (after privileges are
    dropped) and closes it last. A trail that cannot be opened stops the
    start, as a store that cannot be opened does: no redemption without
    its audit."""

    def __init__(self, audit: AuditLog):
        self.audit = audit

    def startService(self):
        from stop.errors import StartFailed
        try:
            self.audit.open()
        except AuditFailed as e:
            raise StartFailed(f"redemption: {e}", 1) from None
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        return self.audit.close()


def build_redemption(settings, store, reactor) -> tuple[ConnectionGate, AuditLog]:
    """The service's factory (listen on it) and its audit trail (open it
    first) for ``settings``; see :func:`redemption_service`.

    :raise stop.errors.ConfigError: unreadable or unusable TLS files, a bad
        policy (the message names the setting).
    """
    policy = parse_policy(settings.redeem_allow, settings.redeem_deny)
    tls = ServerTLS(settings.redeem_cert, settings.redeem_key, settings.redeem_ca,
                    settings.redeem_crl, clock=reactor)
    audit = AuditLog(audit_path(settings.data_dir), reactor)
    limiter = RateLimiter(settings.redeem_rate, settings.redeem_burst, reactor)
    redeem = Redemption(store, policy, audit, limiter, clock=reactor)
    site = server.Site(redeem, timeout=settings.redeem_timeout, reactor=reactor)
    site.protocol = RedeemChannel
    site.requestFactory = RedeemRequest
    site.noisy = False
    slots = Slots()
    site.slots = slots
    site.redeem = redeem
    gate = ConnectionGate(TLSMemoryBIOFactory(tls, False, _PlainFactory(site)), slots,
                          settings.redeem_max_connections,
                          RateLimiter(settings.redeem_rate, settings.redeem_burst, reactor), redeem)
    log.info("redemption service: {n} redeem_allow rule(s), {d} refused identit(ies)",
             n=len(policy.rules), d=len(policy.deny) + len(policy.refused))
    return gate, audit


def redemption_service(settings, store, reactor) -> Optional[service.MultiService]:
    """The redemption service for ``settings``, or None when
    ``redeem_listen`` is empty (the default: off): the audit trail opened
    first, then the listener.

    :param store: the daemon's record store (opened before this starts).
    :raise stop.errors.ConfigError: see :func:`build_redemption`.
    """
    if not settings.redeem_listen:
        return None
    from stop.tap import ListenService
    try:
        endpoint = endpoints.serverFromString(reactor, settings.redeem_listen)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"redeem_listen: {settings.redeem_listen!r} is not a server "
                          f"endpoint: {e}") from None
    gate, audit = build_redemption(settings, store, reactor)
    top = service.MultiService()
    _AuditService(audit).setServiceParent(top)
    ListenService(f"{settings.redeem_listen} (redeem_listen)", gate, reactor,
                  endpoint=endpoint).setServiceParent(top)
    log.info("redemption service on {listen}", listen=settings.redeem_listen)
    return top
