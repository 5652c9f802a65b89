"""The investigator's side: redeem one token at one host, synchronously.

``stopctl`` is a plain synchronous program, so this uses the standard
library's ``ssl`` and ``http.client`` rather than a reactor: one blocking
call per host, a timeout on every socket operation, nothing left running.
``ssl.create_default_context`` verifies the host's certificate against the
CA given and its name (the subjectAltName must hold the address or name we
connected to: OpenSSL's own RFC 6125 check, the same rules service_identity
applies) and presents our certificate.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from dataclasses import dataclass, field
from typing import Optional

from stop import records
from stop.errors import (CertificateRefused, NotAuthorised, RateLimited, RedeemError, UnknownToken,
                         Unreachable)

#: Largest reply read (bytes): a record is at most 4 MiB, and so is each
#: linked entry; more is refused as a bad reply.
MAX_REPLY = 64 * 2**20
#: Seconds for each connect, handshake and read.
DEFAULT_TIMEOUT = 15.0

_HASHES = {40: "sha1", 64: "sha256"}


@dataclass(frozen=True)
class Credentials:
    """The investigator's PEM files: certificate, key, and the fleet CA
    that signed the hosts' certificates."""

    cert: str
    key: str
    ca: str

    def context(self) -> ssl.SSLContext:
        """The client TLS context (TLS 1.2+, host name checked).

        :raise RedeemError: a file cannot be read or used (the message
            names it).
        """
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise RedeemError(f"--ca {self.ca}: cannot use it: {_why(e)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise RedeemError(f"--cert {self.cert} / --key {self.key}: cannot use them: "
                              f"{_why(e)}") from None
        return ctx


def _why(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


@dataclass
class Redeemed:
    """A record released by a host, with what the reply said of it."""

    token: str
    record_bytes: bytes
    record: dict
    linked: list[dict] = field(default_factory=list)
    #: The raw linked entries, each exactly as stored (None: not UTF-8).
    linked_bytes: list = field(default_factory=list)
    integrity: bool = False

    @property
    def hash_verified(self) -> Optional[bool]:
        """SV / SV_REC: whether the token is the hash of the record bytes
        (SHA-1 for 40 hex digits, SHA-256 for 64); None for other types."""
        if self.record.get("type") not in ("SV", "SV_REC"):
            return None
        name = _HASHES.get(len(self.token))
        return name is not None and hashlib.new(name, self.record_bytes).hexdigest() == self.token


def where(host: str, port: int) -> str:
    """``host:port``, with brackets for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redeem(host: str, port: int, token: str, context: ssl.SSLContext,
           timeout: float = DEFAULT_TIMEOUT, server_name: Optional[str] = None) -> Redeemed:
    """Fetch ``token`` from the redemption service at ``host``:``port``.

    :param server_name: the name the host's certificate must hold (default:
        ``host``).
    :return: the :class:`Redeemed` record.
    :raise UnknownToken: "not found" (unknown there, or not released to us).
    :raise Unreachable: no TLS connection could be made.
    :raise CertificateRefused: either side refused the other's certificate.
    :raise NotAuthorised: our identity may redeem nothing there.
    :raise RateLimited: we are over our rate there.
    :raise RedeemError: anything else (a bad reply); the message says what.
    """
    at = where(host, port)
    conn = _Connection(host, port, context=context, timeout=timeout,
                       server_hostname=server_name or host)
    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            raise CertificateRefused(f"{at}: its certificate failed verification: "
                                     f"{e.verify_message or _why(e)}") from None
        except ssl.SSLError as e:
            if "ALERT" in (e.reason or "").upper():
                raise CertificateRefused(f"{at} refused our certificate ({_alert(e)})") from None
            raise Unreachable(f"{at}: TLS failed before any certificate was checked "
                              f"({_why(e)}); over its connection limits?") from None
        except (socket.timeout, TimeoutError):
            raise Unreachable(f"{at}: timed out after {timeout:g} s") from None
        except OSError as e:
            raise Unreachable(f"{at}: {_why(e)}") from None
        except ValueError as e:  # UnicodeError too: a name IDNA cannot encode
            raise RedeemError(f"{at}: not a usable host name or address ({e})") from None
        try:
            conn.request("GET", f"/v1/records/{token}", headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(MAX_REPLY + 1)
        except ssl.SSLError as e:
            if "ALERT" in (e.reason or "").upper():
                raise CertificateRefused(f"{at} refused our certificate ({_alert(e)})") from None
            raise RedeemError(f"{at}: TLS error: {_why(e)}") from None
        except (socket.timeout, TimeoutError):
            raise Unreachable(f"{at}: no answer within {timeout:g} s") from None
        except (http.client.HTTPException, OSError) as e:
            raise RedeemError(f"{at}: the connection ended without an answer ({_why(e)})") from None
        except ValueError as e:  # http.client refuses the request line (a bad token)
            raise RedeemError(f"{at}: cannot ask for {token!r}: {e}") from None
    finally:
        conn.close()
    if len(body) > MAX_REPLY:
        raise RedeemError(f"{at}: reply larger than {MAX_REPLY} bytes")
    if resp.status == 404:
        raise UnknownToken(f"{token}@{at}: not found (unknown there, or not released to you)")
    if resp.status == 403:
        raise NotAuthorised(f"{at}: not authorised: its policy lets your certificate redeem nothing")
    if resp.status == 429:
        raise RateLimited(f"{at}: rate limited; retry after {resp.getheader('retry-after', '?')} s")
    if resp.status != 200:
        raise RedeemError(f"{at}: HTTP {resp.status} {resp.reason}")
    return parse_release(token, body, at)


class _Connection(http.client.HTTPSConnection):
    """HTTPSConnection with a server name distinct from the address."""

    def __init__(self, host, port, context, timeout, server_hostname):
        super().__init__(host, port, context=context, timeout=timeout)
        self._server_hostname = server_hostname

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self._server_hostname)
        except BaseException:
            sock.close()
            raise


def _alert(e: ssl.SSLError) -> str:
    reason = (e.reason or "").lower()
    for marker in ("alert_", "alert "):
        if marker in reason:
            reason = reason.split(marker, 1)[1]
    return reason.replace("_", " ") or _why(e)


def parse_release(token: str, body: bytes, at: str) -> Redeemed:
    """Check and decode a 200 reply of the service (see
    :mod:`stop.redeem.service`). :raise RedeemError: it is malformed."""
    try:
        obj = json.loads(body.decode("utf-8"))
        if not isinstance(obj, dict) or obj.get("token") != token:
            raise ValueError("not a reply for this token")
        text = obj.get("record")
        if not isinstance(text, str):
            raise ValueError("no record text")
        record_bytes = text.encode("utf-8")
        record = records.load(record_bytes)
        linked_bytes, linked = [], []
        for entry in obj.get("linked") or []:
            if not isinstance(entry, str):
                linked_bytes.append(None)
                continue
            linked_bytes.append(entry.encode("utf-8"))
            try:
                value = json.loads(entry)
            except ValueError:
                continue
            if isinstance(value, dict):
                linked.append(value)
    except (ValueError, TypeError, RecursionError) as e:  # a hostile reply never crashes us
        raise RedeemError(f"{at}: malformed reply ({type(e).__name__}: {e})"[:300]) from None
    return Redeemed(token=token, record_bytes=record_bytes, record=record, linked=linked,
                    linked_bytes=linked_bytes, integrity=bool(obj.get("integrity")))
