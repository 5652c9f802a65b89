"""What every process inspector shares: the field names of spec 5 and small
helpers for the values they read (text that always encodes, short failure
reasons, uid -> login name, command lines)."""

from __future__ import annotations

import errno
import pwd
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads

from stop.errors import Unavailable

#: Per-process fields the walk can save (spec section 5); ``sv_fields``
#: selects among these and :data:`SYSTEM_FIELDS`. ``pid`` and ``ppid`` are
#: always read because the walk needs them.
PROCESS_FIELDS = (
    "name", "cmdline", "pid", "ppid", "pgid", "session", "uids", "gids", "users",
    "start_time", "nice", "priority", "tty", "cwd", "exe",
    "sockets", "pipes", "files",
)

#: Per-record system fields (:func:`stop.sysinfo.system_info`).
SYSTEM_FIELDS = ("hostname", "boot_time", "os", "utmp")


def reason_of(exc: BaseException) -> str:
    """A short, stable reason for ``exc``: its errno name when it has one
    (``EACCES``), its own ``reason`` (``Unavailable``, ``SockDiagFailed``),
    otherwise the exception's class name."""
    code = getattr(exc, "errno", None)
    if code is not None and code in errno.errorcode:
        return errno.errorcode[code]
    reason = getattr(exc, "reason", None)
    if isinstance(exc, Unavailable) or isinstance(reason, str):
        return reason
    return type(exc).__name__


def text(value: str) -> str:
    """``value`` (an OS string that may carry surrogate escapes) as text that
    always encodes to UTF-8: undecodable bytes become ``\\xNN``."""
    if value.isascii():  # the common case, O(1) for str
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")


def command_line(args: list[str]) -> list[str]:
    """A process's arguments as saved: text, without the trailing empty
    strings a rewritten process title leaves (sshd and others overwrite
    their argv area and pad it with NUL bytes, which read back as empty
    arguments). An empty argument before a non-empty one is kept."""
    end = len(args)
    while end and not args[end - 1]:
        end -= 1
    return [text(a) for a in args[:end]]


class UserNames:
    """uid -> login name (None when it has none), each looked up once:
    a walk meets the same few uids many times. Runs in the walk's worker
    thread (NSS may be slow)."""

    def __init__(self):
        self._names: dict[int, str | None] = {}

    def __call__(self, uid: int) -> str | None:
        if uid not in self._names:
            try:
                self._names[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._names[uid] = None
        return self._names[uid]


def in_thread_pool(reactor) -> Callable[..., defer.Deferred]:
    """``run(f, *args) -> Deferred``: a blocking call in the reactor's
    (bounded) thread pool. A reactor without threads (a ``Clock`` in tests)
    runs it in this thread."""
    if not IReactorThreads.providedBy(reactor):
        return synchronously
    from twisted.internet import threads
    return lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)


def synchronously(f, *args) -> defer.Deferred:
    """``run(f, *args) -> Deferred``: the call now, in this thread (tests, tools)."""
    return defer.maybeDeferred(f, *args)
