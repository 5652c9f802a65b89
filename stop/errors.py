"""The exception hierarchy. Each error that reaches a peer carries its
RFC 1413 error word; everything else is logged and answered UNKNOWN-ERROR.
"""

from __future__ import annotations


class StopError(Exception):
    """Base of every error this package raises on purpose."""

    #: The RFC 1413 / STOP error word sent to a peer for this error.
    word = "UNKNOWN-ERROR"


class RequestError(StopError):
    """A request line that does not parse (answered UNKNOWN-ERROR)."""

    def __init__(self, message: str, ports: tuple[int, int] = (0, 0)):
        super().__init__(message)
        #: The port pair to echo in the reply: (0, 0) when none could be read.
        self.ports = ports


class InvalidPort(RequestError):
    """A port pair that was read but is out of 1..65535."""

    word = "INVALID-PORT"


class NoUser(StopError):
    """No established, locally initiated connection matches (NO-USER)."""

    word = "NO-USER"


class Overloaded(StopError):
    """The lookup queue is full; nothing was looked up or saved."""


class LookupFailed(StopError):
    """The OS backend could not be asked (netlink or /proc failed)."""


class StoreFailed(StopError):
    """A record could not be stored durably; no token is given for it."""


class ConfigError(StopError):
    """The configuration file or command line is wrong; the message says
    which setting and why."""


# -- the OS layer (stop/os/) --------------------------------------------------


class SockDiagFailed(LookupFailed):
    """A sock_diag request could not be made or its answer could not be read
    whole (stop/os/linux/sockdiag.py): the socket failed, the kernel refused
    the request, no answer came in time, or the answer was truncated,
    malformed or never ended. Nothing partial is returned with it.

    ``reason`` is short and stable for records and tests: the errno name
    (``"EACCES"``, ``"EINVAL"``) when there is one, else ``"timeout"``,
    ``"truncated"``, ``"malformed"``, ``"overrun"`` or ``"runaway"``.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ProcessGone(StopError):
    """The process exited (or its PID was never there) while being read."""


class Unavailable(StopError):
    """A piece of process state could not be read; ``reason`` says why
    (an errno name such as ``EACCES``, or a short phrase)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StaleIndex(StopError):
    """A backend's shared index (kept between walks) missed a descriptor of
    a process the walk read, so lookups already answered from it may be
    incomplete: the walk must start again on :attr:`rescan` ``()``, a fresh
    scan that never raises this (so a walk restarts at most once).

    Only a backend that shares an index between walks raises it (procfs).
    """

    def __init__(self, reason: str, rescan):
        super().__init__(reason)
        self.reason = reason
        #: () -> a new IProcessScan on an index built after this was found.
        self.rescan = rescan


class UnreadableReply(StopError):
    """A reply from another host's ident daemon (to a recursive question)
    that is not an RFC 1413 / STOP reply line; the message says why."""


class StartFailed(StopError):
    """The daemon cannot start. The message is the one line shown to the
    administrator (it names the setting or file); ``status`` is the exit
    status (stop(8), EXIT STATUS)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# -- Redemption (stop.redeem): what a redemption client meets -------------


class RedeemError(StopError):
    """A redemption did not give a record; ``kind`` names the case in
    ``stopctl trace`` output (text, JSON, DOT)."""

    kind = "error"


class UnknownToken(RedeemError):
    """The host answered "not found": the token is unknown there, or not
    released to this client (the service does not say which)."""

    kind = "not-found"


class Unreachable(RedeemError):
    """No connection to the host's redemption service (refused, timed out,
    no route, closed before TLS)."""

    kind = "unreachable"


class CertificateRefused(RedeemError):
    """The TLS handshake failed on a certificate: the host refused ours, or
    its own failed our verification (CA, name, dates)."""

    kind = "certificate-refused"


class NotAuthorised(RedeemError):
    """The host's policy lets this client's identity redeem nothing."""

    kind = "not-authorised"


class RateLimited(RedeemError):
    """The host refused: this client is over its rate for now."""

    kind = "rate-limited"
