"""Forward records to a central syslog collector (RFC 5424 over TCP, RFC 6587
octet-counted framing): the code behind the example site plugin
``syslog-forward`` (plugins/syslog_forward.py, see stop-plugins(7)).

One message per record::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID record [stop@32473 token="..."] BOM JSON

Forwarding is best effort and never delays a reply: the local store stays
the authoritative copy. While the collector is unreachable or slow, records
wait in a bounded queue (``queue`` setting); past it the oldest are dropped
and counted in a warning. The connection is retried with back-off.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from typing import Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from stop.errors import ConfigError
from stop.interfaces import IRecordHook, IRecordStore
from stop.logsetup import facility_number

log = Logger()

#: SD-ID of the structured data element carrying the token. 32473 is the
#: private enterprise number RFC 5612 reserves for examples: a site that
#: has its own number may set ``sd_id``.
SD_ID = "stop@32473"
MSGID = "record"
#: MSGID of an entry linked to a record (a recursion outcome); the SD
#: element's token is the record's.
MSGID_LINKED = "linked"
BOM = b"\xef\xbb\xbf"
SEVERITY_INFO = 6


def _sd_escape(value: str) -> str:
    # RFC 5424 section 6.3.3: '"', '\' and ']' are escaped in PARAM-VALUE.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    # PRINTUSASCII (33..126), at most ``limit`` characters, "-" when empty.
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def format_message(token: str, record: bytes, when: float, facility: int = 3,
                   hostname: str = "-", app_name: str = "stopd", procid: str = "-",
                   sd_id: str = SD_ID, msgid: str = MSGID) -> bytes:
    """One RFC 5424 message (without framing) for ``record`` saved under
    ``token`` at ``when`` (seconds since the epoch, shown in UTC with
    microseconds). The MSG is the record's bytes after a UTF-8 BOM.
    ``msgid`` is ``record``, or ``linked`` for an entry linked to the record
    of ``token``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + \
        ".%06dZ" % int(round((when % 1) * 1e6) % 1000000)
    header = "<%d>1 %s %s %s %s %s [%s token=\"%s\"] " % (
        facility * 8 + SEVERITY_INFO, stamp, _header_field(hostname, 255),
        _header_field(app_name, 48), _header_field(procid, 128), msgid,
        sd_id, _sd_escape(token))
    return header.encode("utf-8") + BOM + record  # PARAM-VALUE is UTF-8


def frame(message: bytes) -> bytes:
    """RFC 6587 octet counting: ``LENGTH SP MESSAGE``."""
    return b"%d %s" % (len(message), message)


@implementer(IPushProducer)
class _Sender(Protocol):
    """The TCP connection to the collector; pauses the forwarder's queue
    when the kernel's and Twisted's buffers are full."""

    def __init__(self, forwarder: "Forwarder") -> None:
        self.forwarder = forwarder
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.forwarder._connected(self)

    def connectionLost(self, reason) -> None:
        self.forwarder._lost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        pass  # a syslog collector sends nothing back

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.forwarder._flush()

    def stopProducing(self) -> None:
        self.paused = True


class Forwarder:
    """Sends records to ``collector`` (a Twisted client endpoint string,
    e.g. ``tcp:host=192.0.2.9:port=514``), holding at most ``queue``
    records while it cannot send."""

    def __init__(self, reactor, collector: str, queue: int = 10000, facility: str = "daemon",
                 hostname: Optional[str] = None, app_name: str = "stopd",
                 sd_id: str = SD_ID) -> None:
        if queue < 1:
            raise ConfigError("queue: must be at least 1")
        try:
            endpoint = clientFromString(reactor, collector)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"collector: {collector!r} is not a client endpoint: {e}") from None
        self._reactor = reactor
        self.collector = collector
        self._facility = facility_number(facility)
        self._hostname = hostname or socket.gethostname()
        self._app_name = app_name
        self._sd_id = sd_id
        self._queue: collections.deque[bytes] = collections.deque()
        self._max = queue
        self.sent = 0
        self.dropped = 0
        self._sender: Optional[_Sender] = None
        self._closed = False
        self._service = ClientService(
            endpoint, Factory.forProtocol(lambda: _Sender(self)),
            retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=60.0), clock=reactor)

    def start(self) -> None:
        """Start connecting (idempotent)."""
        if not self._service.running:
            self._service.startService()

    def send(self, token: str, record: bytes, msgid: str = MSGID) -> None:
        """Queue ``record`` for the collector and send what can be sent.
        Returns at once; never raises for a network problem. After
        :meth:`stop`, records are dropped (counted), never reconnected for."""
        if self._closed:
            self.dropped += 1
            return
        self.start()
        message = format_message(token, record, self._reactor.seconds(), self._facility,
                                 self._hostname, self._app_name, str(os.getpid()), self._sd_id,
                                 msgid)
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warn("syslog forward to {collector}: queue full ({max} records), "
                         "{n} dropped so far (they stay in the local store)",
                         collector=self.collector, max=self._max, n=self.dropped)
        self._queue.append(frame(message))
        self._flush()

    @property
    def queued(self) -> int:
        """Records waiting to be sent."""
        return len(self._queue)

    def _flush(self) -> None:
        sender = self._sender
        while self._queue and sender is not None and not sender.paused:
            sender.transport.write(self._queue.popleft())
            self.sent += 1

    def _connected(self, sender: _Sender) -> None:
        log.info("syslog forward: connected to {collector}, {n} records queued",
                 collector=self.collector, n=len(self._queue))
        self._sender = sender
        self._flush()

    def _lost(self, sender: _Sender, reason) -> None:
        if self._sender is sender:
            self._sender = None
            log.warn("syslog forward: connection to {collector} lost: {why}",
                     collector=self.collector, why=reason.getErrorMessage())

    def stop(self) -> defer.Deferred:
        """Send what is queued if connected, then disconnect; fires when
        the connection is closed."""
        self._closed = True
        self._flush()
        if not self._service.running:
            return defer.succeed(None)
        return defer.maybeDeferred(self._service.stopService)


def forwarder_from_options(options: dict, reactor) -> Forwarder:
    """A Forwarder from a ``[plugin syslog-forward]`` section.

    :raise ConfigError: ``collector`` missing, or a bad value.
    """
    known = {"collector", "queue", "facility", "hostname", "app_name", "sd_id", "store"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"[plugin syslog-forward]: unknown setting(s) {', '.join(unknown)}")
    if not options.get("collector"):
        raise ConfigError("[plugin syslog-forward]: collector = ENDPOINT is required, e.g. "
                          "tcp:host=192.0.2.9:port=514")
    try:
        queue = int(options.get("queue", "10000"))
    except ValueError:
        raise ConfigError(f"[plugin syslog-forward]: queue: {options['queue']!r} "
                          "is not a number") from None
    return Forwarder(reactor, options["collector"], queue=queue,
                     facility=options.get("facility", "daemon"),
                     hostname=options.get("hostname") or None,
                     app_name=options.get("app_name", "stopd"),
                     sd_id=options.get("sd_id", SD_ID))


@implementer(IRecordStore)
class ForwardingStore:
    """An IRecordStore that keeps records in ``inner`` and, once each is
    durable there, forwards it with ``forwarder``."""

    name = "syslog-forward"

    def __init__(self, inner: IRecordStore, forwarder: Forwarder) -> None:
        self.inner = IRecordStore(inner)
        self.forwarder = forwarder

    def open(self) -> None:
        self.inner.open()
        self.forwarder.start()

    def save(self, token: str, record: bytes) -> defer.Deferred:
        d = self.inner.save(token, record)
        d.addCallback(lambda _: self.forwarder.send(token, record))
        return d

    def save_linked(self, token: str, entry: bytes) -> defer.Deferred:
        """Keep ``entry`` in ``inner`` and, once durable there, forward it
        (MSGID ``linked``, the token it belongs to in the SD element)."""
        d = self.inner.save_linked(token, entry)
        d.addCallback(lambda _: self.forwarder.send(token, entry, msgid=MSGID_LINKED))
        return d

    def get(self, token: str) -> Optional[bytes]:
        return self.inner.get(token)

    def linked(self, token: str) -> list:
        return self.inner.linked(token)

    def integrity(self, token: str) -> bool:
        return self.inner.integrity(token)

    def records(self):
        return self.inner.records()

    def usage(self) -> int:
        return self.inner.usage()

    def close(self) -> defer.Deferred:
        d = defer.maybeDeferred(self.inner.close)
        d.addBoth(lambda result: self.forwarder.stop().addCallback(lambda _: result))
        return d


@implementer(IRecordHook)
class ForwardHook:
    """The same forwarding as a record hook, for any store."""

    name = "syslog-forward"

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def recordSaved(self, token: str, record: bytes) -> None:
        self.forwarder.send(token, record)

    def close(self) -> defer.Deferred:
        return self.forwarder.stop()
