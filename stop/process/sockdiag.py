"""Linux sock_diag over a raw AF_NETLINK socket, built with ``struct``.

Two questions only, both what the process walk needs:

* :meth:`SockDiag.inet_dump`: every TCP socket of one address family, with
  its inode, ends and state (``inet_diag``); one dump per walk;
* :meth:`SockDiag.unix_exact`: one UNIX-domain socket by inode, with its
  bound name and the inode of its peer (``unix_diag``, ``UDIAG_SHOW_PEER``).

See linux/sock_diag.h, linux/inet_diag.h, linux/unix_diag.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator, NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
LISTEN_ONLY = 1 << 10

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
INET_REQ = struct.Struct("=BBBBI HH16s16sI II")  # inet_diag_req_v2
INET_MSG = struct.Struct("=BBBB HH16s16sI II IIIII")  # inet_diag_msg
UNIX_REQ = struct.Struct("=BBHIII2I")  # unix_diag_req
UNIX_MSG = struct.Struct("=BBBBI2I")  # unix_diag_msg
RTA_HDR = struct.Struct("=HH")

#: Kernel TCP state numbers (also used for UNIX sockets) -> names.
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
    5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT",
    9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 5: "SOCK_SEQPACKET"}

#: Upper bound on recv() calls for one dump: a table bigger than this many
#: 64 KiB buffers (~millions of sockets) is cut short rather than looping on.
MAX_RECVS = 4096


class InetSock(NamedTuple):
    """One TCP socket from a dump; addresses are canonical text."""

    family: int
    state: str
    local: tuple[str, int]
    remote: tuple[str, int]
    uid: int
    inode: int


class UnixSock(NamedTuple):
    """One UNIX-domain socket; ``name`` is ``""`` when unbound, ``@...`` for
    an abstract name; ``peer`` is the peer's inode or 0."""

    inode: int
    type: str
    state: str
    name: str
    peer: int


_MAPPED = b"\0" * 10 + b"\xff\xff"


def format_address(family: int, raw: bytes) -> str:
    """Packed address bytes -> canonical text (IPv4-mapped IPv6 becomes
    IPv4, as :func:`stop.model.canonical_host` does)."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


class SockDiag:
    """One NETLINK_SOCK_DIAG socket; not thread-safe (one per walk)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._seq = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request(self, payload: bytes, flags: int) -> Iterator[bytes]:
        """Send one SOCK_DIAG_BY_FAMILY request; yield each reply payload.

        :raise OSError: the kernel answered with an error (its errno).
        """
        self._seq += 1
        seq = self._seq
        header = NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST | flags, seq, 0)
        self._sock.sendto(header + payload, (0, 0))
        for _ in range(MAX_RECVS):
            data = self._sock.recv(65536)
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, kind, _flags, rseq, _pid = NLMSG_HDR.unpack_from(data, offset)
                if length < NLMSG_HDR.size:
                    return
                body = data[offset + NLMSG_HDR.size:offset + length]
                offset += (length + 3) & ~3
                if rseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield body
            if not flags & NLM_F_DUMP:
                return

    def inet_dump(self, family: int, states: int = ALL_STATES) -> list[InetSock]:
        """Every TCP socket of ``family`` (AF_INET or AF_INET6) in
        ``states`` (a bit mask, ``1 << state``).

        Cost: the kernel walks every bucket of its established hash for any
        state but LISTEN (about 1-2 ms on a 2-core VM even when empty); a
        LISTEN-only dump walks the small listening hash (~25 us).

        :raise OSError: netlink failed.
        """
        req = INET_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states,
                            0, 0, b"", b"", 0, NO_COOKIE, NO_COOKIE)
        return [_parse_inet(body) for body in self._request(req, NLM_F_DUMP)]

    def inet_exact(self, local: tuple[str, int], remote: tuple[str, int]) -> InetSock | None:
        """The TCP socket with exactly these ends (addresses as text; an
        IPv4 pair also finds IPv4-mapped IPv6 sockets), or None. The kernel
        may answer with a listening socket on ``local``; callers check the
        state. Cost: ~10 us, independent of the number of sockets.

        :raise OSError: netlink failed (other than "no such socket").
        """
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        try:
            src = socket.inet_pton(family, local[0])
            dst = socket.inet_pton(family, remote[0])
        except OSError:
            return None
        req = INET_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES,
                            socket.htons(local[1]), socket.htons(remote[1]), src, dst,
                            0, NO_COOKIE, NO_COOKIE)
        try:
            for body in self._request(req, 0):
                return _parse_inet(body)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return None

    def unix_exact(self, inode: int) -> UnixSock | None:
        """The UNIX-domain socket with ``inode``, or None when there is none
        in this network namespace.

        :raise OSError: netlink failed (other than "no such socket").
        """
        req = UNIX_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode,
                            UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, NO_COOKIE, NO_COOKIE)
        try:
            for body in self._request(req, 0):
                return _parse_unix(body)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return None


def _parse_inet(body: bytes) -> InetSock:
    (fam, state, _t, _r, sport, dport, src, dst, _if, _c0, _c1,
     _exp, _rq, _wq, uid, inode) = INET_MSG.unpack_from(body)
    return InetSock(fam, TCP_STATES.get(state, str(state)),
                    (format_address(fam, src), socket.ntohs(sport)),
                    (format_address(fam, dst), socket.ntohs(dport)), uid, inode)


def _parse_unix(body: bytes) -> UnixSock:
    _fam, stype, state, _pad, inode, _c0, _c1 = UNIX_MSG.unpack_from(body)
    name, peer = "", 0
    offset = UNIX_MSG.size
    while offset + RTA_HDR.size <= len(body):
        length, kind = RTA_HDR.unpack_from(body, offset)
        if length < RTA_HDR.size:
            break
        value = body[offset + RTA_HDR.size:offset + length]
        if kind == UNIX_DIAG_NAME:
            if value[:1] == b"\0":
                name = "@" + value[1:].decode("utf-8", "backslashreplace")
            else:
                name = value.rstrip(b"\0").decode("utf-8", "backslashreplace")
        elif kind == UNIX_DIAG_PEER:
            peer = struct.unpack_from("=I", value)[0]
        offset += (length + 3) & ~3
    return UnixSock(inode, SOCK_TYPES.get(stype, str(stype)),
                    TCP_STATES.get(state, str(state)), name, peer)
