"""What a socket descriptor of another process is, without a table dump.

``/proc/PID/fd/N`` says only ``socket:[inode]``; sock_diag finds a TCP
socket exactly only by its four-tuple, and has no lookup by inode. Dumping
the whole TCP table to learn one socket's ends costs in proportion to every
TCP socket on the host (TIME_WAIT included: tens of milliseconds on a busy
server). Instead, :func:`peek` borrows the descriptor for a moment with
``pidfd_getfd(2)`` (Linux 5.6; needs ptrace access to the process, which
the daemon has: CAP_SYS_PTRACE) and asks the socket itself: family, type,
protocol, its own and its peer's address. The borrowed copy is closed at
once; the process never sees it (no shutdown: closing a duplicate only
drops a reference).

When the call is not there (older kernel, or a seccomp filter that refuses
it: ``EPERM``/``ENOSYS``), :func:`peek` raises :class:`NotAvailable` and
the caller falls back to the dump.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import NamedTuple, Optional

#: The syscall's number: the same on every architecture (Linux 5.6+).
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class NotAvailable(Exception):
    """pidfd_getfd cannot be used here (``reason``: an errno name)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SocketInfo(NamedTuple):
    """A socket as the socket itself reports it. ``local``/``remote`` are
    ``(address, port)`` for AF_INET/AF_INET6 (``remote`` None when it has no
    peer: a listener, or not connected); None for other families."""

    family: int
    type: int
    proto: int
    local: Optional[tuple[str, int]]
    remote: Optional[tuple[str, int]]


#: Errors that mean "this host does not allow it", for every call.
_UNAVAILABLE = (errno.ENOSYS, errno.EPERM)


def peek(pid: int, fd: int) -> SocketInfo:
    """Family, type, protocol and ends of the socket ``fd`` of ``pid``.

    :raise NotAvailable: pidfd_getfd is missing or forbidden on this host.
    :raise OSError: the process or descriptor is gone (ESRCH, EBADF), it is
        not a socket (ENOTSOCK), or another error.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except AttributeError:
        raise NotAvailable("ENOSYS") from None
    except OSError as exc:
        if exc.errno in _UNAVAILABLE:
            raise NotAvailable(errno.errorcode[exc.errno]) from None
        raise
    try:
        dup = _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            code = ctypes.get_errno()
            if code in _UNAVAILABLE:
                raise NotAvailable(errno.errorcode[code])
            raise OSError(code, os.strerror(code))
    finally:
        os.close(pidfd)
    try:
        sock = socket.socket(fileno=dup)  # learns family, type and protocol
    except OSError:
        os.close(dup)
        raise
    try:
        local = remote = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            local = sock.getsockname()[:2]
            try:
                remote = sock.getpeername()[:2]
            except OSError:
                remote = None
        return SocketInfo(sock.family, sock.type, sock.proto, local, remote)
    finally:
        sock.close()
