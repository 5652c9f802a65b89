"""Process inspection: who holds a socket, and the process state around it.

Two backends provide :class:`stop.interfaces.IProcessInspector`:

* ``procfs`` (:mod:`stop.process.procfs`): Linux, reads ``/proc`` directly
  and asks the kernel about sockets over ``AF_NETLINK`` (sock_diag);
* ``psutil`` (:mod:`stop.process.psutil_backend`): the portable path for
  FreeBSD, OpenBSD, macOS and Solaris; what psutil cannot give on a platform
  is recorded as unavailable.

:func:`make_inspector` picks one by name; the walk (:mod:`stop.walk`) works
with either.
"""

from __future__ import annotations

import errno
import sys

from stop.errors import ConfigError

#: Per-process fields the walk can save (spec section 5); ``sv_fields``
#: selects among these and :data:`SYSTEM_FIELDS`. ``pid`` and ``ppid`` are
#: always read because the walk needs them.
PROCESS_FIELDS = (
    "name", "cmdline", "pid", "ppid", "pgid", "uids", "gids", "users",
    "start_time", "nice", "priority", "tty", "cwd", "exe",
    "sockets", "pipes", "files",
)

#: Per-record system fields (:func:`stop.sysinfo.system_info`).
SYSTEM_FIELDS = ("hostname", "boot_time", "os", "utmp")

BACKENDS = ("auto", "procfs", "psutil")


class ProcessGone(Exception):
    """The process exited (or its PID was never there) while being read."""


class Unavailable(Exception):
    """A piece of process state could not be read; ``reason`` says why
    (an errno name such as ``EACCES``, or a short phrase)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    """A short, stable reason for ``exc``: its errno name when it has one
    (``EACCES``), otherwise the exception's class name."""
    code = getattr(exc, "errno", None)
    if code is not None and code in errno.errorcode:
        return errno.errorcode[code]
    if isinstance(exc, Unavailable):
        return exc.reason
    return type(exc).__name__


def text(value: str) -> str:
    """``value`` (an OS string that may carry surrogate escapes) as text that
    always encodes to UTF-8: undecodable bytes become ``\\xNN``."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")


def make_inspector(name: str = "auto"):
    """Build the process inspector called ``name``.

    ``auto`` is ``procfs`` on Linux and ``psutil`` elsewhere.

    :return: an object providing :class:`stop.interfaces.IProcessInspector`.
    :raise stop.errors.ConfigError: for an unknown name, or ``procfs`` on a
        system without a Linux ``/proc``.
    """
    if name == "auto":
        name = "procfs" if sys.platform.startswith("linux") else "psutil"
    if name == "procfs":
        if not sys.platform.startswith("linux"):
            raise ConfigError("process_backend = procfs needs Linux; use psutil")
        from stop.process.procfs import ProcfsInspector
        return ProcfsInspector()
    if name == "psutil":
        from stop.process.psutil_backend import PsutilInspector
        return PsutilInspector()
    raise ConfigError(
        f"process_backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
    )
