"""The redemption service's TLS: mutual authentication with pyOpenSSL.

The context is built here rather than with Twisted's ``CertificateOptions``
because that one always installs Python callbacks into OpenSSL (its
``_verifyCallback`` in Twisted 22.4, an ALPN selection callback in newer
releases), and a cffi callback needs write+execute memory, which the
systemd unit forbids (``MemoryDenyWriteExecute=yes``). Measured under the
kernel's ``PR_SET_MDWE`` with Debian 12's python3-openssl 23.0 and with the
newest pyOpenSSL: ``CertificateOptions`` fails ("Cannot allocate
write+execute memory"), this context works. So: ``set_verify`` without a
callback (OpenSSL's own chain verification), and the wrapped factory does
not offer ALPN (see :mod:`stop.redeem.service`). docs/redeem.rst has the
details.

What the context enforces: TLS 1.2 or newer; a client certificate is
required and verified by OpenSSL against ``redeem_ca`` (and, when
``redeem_crl`` is set, against that CRL); no session resumption (every
connection verifies its certificate afresh, so a revocation applies at
once). The files are checked for changes at most every
:data:`RELOAD_INTERVAL` seconds and the context rebuilt when one changed (a
new CRL or certificate needs no restart); a rebuild that fails keeps the
previous context and is logged.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from stop.errors import ConfigError

log = Logger()

#: Seconds between checks of the certificate, key, CA and CRL files.
RELOAD_INTERVAL = 5.0
#: TLS 1.2 suites offered (TLS 1.3 uses OpenSSL's own, all AEAD).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"

# OpenSSL's X509_V_ERR_* codes that have a plainer name in the audit trail.
_VERIFY_WHY = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    2: "certificate not signed by redeem_ca",
    18: "self-signed certificate",
    19: "certificate not signed by redeem_ca",
    20: "certificate not signed by redeem_ca",
    21: "certificate not signed by redeem_ca",
    23: "certificate revoked",
    3: "no CRL for the certificate's CA (redeem_crl)",
    12: "redeem_crl has expired",
}


def _load_error(setting: str, path: str, exc: Exception) -> ConfigError:
    detail = exc.strerror if isinstance(exc, OSError) else _ssl_text(exc) or str(exc)
    return ConfigError(f"{setting} {path}: cannot load it: {detail}")


def _ssl_text(exc: Exception) -> str:
    """The reasons of a pyOpenSSL error, joined: ``[('SSL routines', '',
    'certificate verify failed')]`` -> ``certificate verify failed``."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):
        parts = [str(e[-1]) for e in args[0] if isinstance(e, tuple) and e]
        return "; ".join(p for p in parts if p)
    return ""


def build_context(cert: str, key: str, ca: str, crl: str = ""):
    """A pyOpenSSL ``Context`` for the service (see the module doc).

    :raise ConfigError: a file cannot be read or used; the message names
        the setting and the file.
    """
    from OpenSSL import SSL, crypto
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    # no client-initiated TLS 1.2 renegotiation (OpenSSL >= 1.1.0h)
                    | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(b"stop-redeem")
    ctx.set_cipher_list(CIPHERS)
    for setting, path in (("redeem_cert", cert), ("redeem_key", key), ("redeem_ca", ca)) + (
            (("redeem_crl", crl),) if crl else ()):
        if not path:
            raise ConfigError(f"{setting}: must be set when redeem_listen is")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise _load_error(setting, path, e) from None
    try:
        ctx.use_certificate_chain_file(cert)
    except SSL.Error as e:
        raise _load_error("redeem_cert", cert, e) from None
    try:
        ctx.use_privatekey_file(key)
        ctx.check_privatekey()
    except SSL.Error as e:
        raise _load_error("redeem_key", key, e) from None
    try:
        ctx.load_verify_locations(ca)
        ctx.load_client_ca(ca.encode())
    except SSL.Error as e:
        raise _load_error("redeem_ca", ca, e) from None
    if crl:
        store = ctx.get_cert_store()
        for one in load_crls(crl):
            try:
                store.add_crl(one)  # pyOpenSSL >= 23.2 takes cryptography's CRL
            except (TypeError, AttributeError):
                store.add_crl(crypto.CRL.from_cryptography(one))
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    # No callback: OpenSSL verifies the chain itself (see the module doc).
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_verify_depth(4)
    return ctx


_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def load_crls(path: str) -> list:
    """The CRLs of the PEM file ``path`` (``cryptography`` objects). Only
    CRLs: a certificate in it would otherwise become a trusted CA.

    :raise ConfigError: unreadable, no CRL, a certificate, or a CRL that
        does not parse.
    """
    from cryptography import x509
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise _load_error("redeem_crl", path, e) from None
    blocks = _CRL_PEM.findall(data)
    if not blocks or b"-----BEGIN CERTIFICATE" in data:
        raise ConfigError(f"redeem_crl {path}: want PEM CRLs (-----BEGIN X509 CRL-----) "
                          "and nothing else")
    try:
        return [x509.load_pem_x509_crl(b) for b in blocks]
    except ValueError as e:
        raise ConfigError(f"redeem_crl {path}: cannot load it: {e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes the server side of each TLS connection (Twisted's
    ``TLSMemoryBIOFactory`` calls :meth:`serverConnectionForTLS`).

    :param clock: ``seconds()`` for the reload checks (the reactor).
    :raise ConfigError: see :func:`build_context`.
    """

    def __init__(self, cert: str, key: str, ca: str, crl: str = "", clock=None):
        self._paths = (cert, key, ca, crl)
        self._clock = clock
        self._context = build_context(cert, key, ca, crl)
        self._stamp = self._stamps()
        self._checked = clock.seconds() if clock is not None else 0.0

    def _stamps(self) -> tuple:
        out = []
        for path in self._paths:
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append(None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def maybe_reload(self) -> bool:
        """Rebuild the context when a file changed (checked at most every
        :data:`RELOAD_INTERVAL` seconds). :return: whether it was rebuilt."""
        if self._clock is None:
            return False
        now = self._clock.seconds()
        if now - self._checked < RELOAD_INTERVAL:
            return False
        self._checked = now
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._context = build_context(*self._paths)
        except ConfigError as e:
            log.error("redemption TLS files changed but cannot be used ({err}); "
                      "keeping the previous ones", err=str(e))
            return False
        log.info("redemption TLS files changed: certificate, key, CA and CRL reloaded")
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL
        self.maybe_reload()
        return SSL.Connection(self._context, None)


def peer_identity(transport):
    """The :class:`~stop.redeem.policy.ClientIdentity` of the verified
    client certificate on ``transport`` (a TLS transport after its
    handshake), or None when there is none."""
    from stop.redeem.policy import identity_from_certificate
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return identity_from_certificate(cert.to_cryptography())


def handshake_failure(reason, tls_connection=None) -> str:
    """Why a connection ended before its TLS handshake completed, in words
    for the audit trail: ``no client certificate``, ``certificate has
    expired``, ``certificate not signed by redeem_ca``, ``certificate
    revoked``, ``not TLS (...)``, ``closed before the TLS handshake``...

    :param reason: the Failure given to ``connectionLost``.
    :param tls_connection: the pyOpenSSL ``Connection`` (for OpenSSL's
        verification result), or None.
    """
    from OpenSSL import SSL
    exc = reason.value
    if not isinstance(exc, SSL.Error):
        return "closed before the TLS handshake"
    text = _ssl_text(exc) or exc.__class__.__name__
    if "peer did not return a certificate" in text or "certificate required" in text:
        return "no client certificate"
    if "certificate verify failed" in text:
        code = _verify_result(tls_connection)
        if code is not None:
            return _VERIFY_WHY.get(code) or f"certificate verify failed: {_verify_text(code)}"
        return "certificate verify failed"
    if any(w in text for w in ("wrong version number", "http request", "unknown protocol",
                               "record layer failure", "packet length too long")):
        return f"not TLS ({text})"
    return f"TLS handshake failed: {text}"


def _verify_result(tls_connection) -> Optional[int]:
    """OpenSSL's X509_V_ERR code of the failed verification; pyOpenSSL has
    no public call for it, so this reads it through its bindings and gives
    None when they change."""
    if tls_connection is None:
        return None
    try:
        from OpenSSL.SSL import _lib
        return int(_lib.SSL_get_verify_result(tls_connection._ssl))
    except Exception:
        return None


def _verify_text(code: int) -> str:
    try:
        from OpenSSL.SSL import _ffi, _lib
        return _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:
        return f"X509 error {code}"
