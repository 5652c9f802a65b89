"""The sock_diag transport, builders and address decoder
(stop.os.linux.sockdiag): the reading rules on a fake socket that serves
crafted datagrams, then the same rules against the live kernel (and ``ss``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from stop.errors import LookupFailed, SockDiagFailed
from stop.os.linux import sockdiag
from stop.os.linux.sockdiag import (INET_MSG, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE,
                                    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLMSGHDR,
                                    SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED, TCP_LISTEN, UNIX_MSG,
                                    SockDiag, address_key, decode_inet, decode_unix, host_key,
                                    key_host)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")


# -- a fake netlink socket ---------------------------------------------------------


def message(mtype: int, seq: int, payload: bytes = b"", flags: int = NLM_F_MULTI) -> bytes:
    """One netlink message, padded to 4 bytes as the kernel does."""
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(payload), mtype, flags, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def inet_msg(sport: int, dport: int = 0, state: int = TCP_ESTABLISHED, inode: int = 0,
             uid: int = 1000, src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    return INET_MSG.pack(socket.AF_INET, state, 0, 0, socket.htons(sport), socket.htons(dport),
                         socket.inet_aton(src) + bytes(12), socket.inet_aton(dst) + bytes(12),
                         0, 0, 0, 0, 0, 0, uid, inode)


def error(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR: the negative errno and the request's header."""
    return message(NLMSG_ERROR, seq, struct.pack("=i", -code) + bytes(16), flags=0)


class FakeNetlink:
    """Stands in for the netlink socket. Each item of ``script`` is one
    datagram to give to a recv: bytes, a function of the last request's
    sequence number giving bytes, or an exception to raise."""

    def __init__(self, script):
        self.script = list(script)
        self.sent: list[bytes] = []
        self.recvs = 0
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    @property
    def seq(self) -> int:
        return NLMSGHDR.unpack_from(self.sent[-1])[3]

    def recv_into(self, view, size, flags):
        assert flags & socket.MSG_TRUNC
        self.recvs += 1
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        data = item(self.seq) if callable(item) else item
        n = min(len(data), size)
        view[:n] = data[:n]
        return len(data)  # MSG_TRUNC: the real length

    def close(self) -> None:
        self.closed = True


class Opener:
    """``open_socket`` for SockDiag: hands out the given fakes in order."""

    def __init__(self, *socks):
        self.socks = list(socks)
        self.opened: list[FakeNetlink] = []

    def __call__(self, timeout):
        sock = self.socks.pop(0)
        if isinstance(sock, BaseException):
            raise sock
        self.opened.append(sock)
        return sock


def fake(*script, **kw) -> tuple[SockDiag, FakeNetlink]:
    sock = FakeNetlink(script)
    return SockDiag(open_socket=Opener(sock), **kw), sock


def ports(items) -> list[int]:
    return [i.sport for i in items]


# -- reading answers -----------------------------------------------------------------


def test_a_dump_is_read_over_every_datagram_until_done():
    diag, sock = fake(
        lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(1)) + message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(2)),
        lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(3)) + message(NLMSG_DONE, seq, bytes(4)),
    )
    assert ports(diag.request(sockdiag.inet_dump(socket.AF_INET), True, decode_inet)) == [1, 2, 3]
    assert sock.recvs == 2
    length, mtype, flags, seq, _ = NLMSGHDR.unpack_from(sock.sent[0])
    assert (length, mtype, flags) == (len(sock.sent[0]), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP)
    # The next request has the next sequence number; the socket is kept.
    sock.script = [lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(4), flags=0)]
    assert ports(diag.request(sockdiag.inet_exact(b"\x7f\0\0\1", 4, b"\x7f\0\0\1", 5), False, decode_inet)) == [4]
    assert NLMSGHDR.unpack_from(sock.sent[1])[2:4] == (NLM_F_REQUEST, seq + 1)
    assert diag.is_open and not sock.closed


def test_an_exact_request_takes_the_first_message_and_skips_what_is_not_its_own():
    diag, sock = fake(lambda seq: (message(SOCK_DIAG_BY_FAMILY, seq - 1, inet_msg(9))  # late, earlier request
                                   + message(NLMSG_NOOP, seq)
                                   + message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(1), flags=0)
                                   + message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(2), flags=0)))
    assert ports(diag.request(b"", False, decode_inet)) == [1]


@pytest.mark.parametrize("dump,code,want", [
    (False, errno.ENOENT, []),  # an exact request that finds nothing
    (False, 0, []),  # an ACK
    (True, errno.ENOENT, "ENOENT"),
    (False, errno.EACCES, "EACCES"),
    (True, errno.EINVAL, "EINVAL"),
])
def test_nlmsg_error(dump, code, want):
    diag, sock = fake(lambda seq: error(seq, code))
    if isinstance(want, list):
        assert diag.request(b"", dump, decode_inet) == want
        assert not sock.closed
    else:
        with pytest.raises(SockDiagFailed) as info:
            diag.request(b"", dump, decode_inet)
        assert info.value.reason == want and os.strerror(code) in str(info.value)
        assert sock.closed and not diag.is_open


def test_errors_are_lookup_failures():
    assert issubclass(SockDiagFailed, LookupFailed)


@pytest.mark.parametrize("datagram,reason", [
    # MSG_TRUNC: the datagram was larger than the buffer (64 bytes here).
    (lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(1)) * 2, "truncated"),
    # A message and then 8 bytes: not even a header.
    (lambda seq: message(NLMSG_NOOP, seq, bytes(20)) + bytes(8), "truncated"),
    # A header claiming more than the datagram holds.
    (lambda seq: NLMSGHDR.pack(60, SOCK_DIAG_BY_FAMILY, 0, seq, 0) + bytes(8), "malformed"),
    # A header claiming less than itself.
    (lambda seq: NLMSGHDR.pack(8, SOCK_DIAG_BY_FAMILY, 0, seq, 0), "malformed"),
    # An inet_diag_msg cut short.
    (lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, bytes(20)), "malformed"),
    # An NLMSG_ERROR without its errno.
    (lambda seq: message(NLMSG_ERROR, seq, b""), "malformed"),
    (lambda seq: message(NLMSG_OVERRUN, seq), "overrun"),
])
def test_truncated_and_malformed_answers_fail_whole(datagram, reason):
    diag, sock = fake(datagram, bufsize=64)
    with pytest.raises(SockDiagFailed) as info:
        diag.request(b"", True, decode_inet)
    assert info.value.reason == reason
    assert sock.closed and not diag.is_open


def test_a_dump_cut_short_by_truncation_returns_nothing():
    """The first datagram is fine, the second truncated: nothing partial."""
    diag, _ = fake(lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(1)),
                   lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(2)) * 40, bufsize=256)
    with pytest.raises(SockDiagFailed, match="truncated"):
        diag.request(b"", True, decode_inet)


def test_timeout_closes_and_the_next_request_opens_a_new_socket():
    first = FakeNetlink([BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")])
    second = FakeNetlink([lambda seq: error(seq, errno.ENOENT)])
    opener = Opener(first, second)
    diag = SockDiag(timeout=0.5, open_socket=opener)
    with pytest.raises(SockDiagFailed, match=r"no answer within 0.5 s") as info:
        diag.request(b"", False, decode_inet)
    assert info.value.reason == "timeout" and first.closed
    assert diag.request(b"", False, decode_inet) == []
    assert opener.opened == [first, second]


def test_the_number_of_datagrams_is_bounded():
    endless = [lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, inet_msg(1))] * 10
    diag, sock = fake(*endless, max_datagrams=3)
    with pytest.raises(SockDiagFailed, match="after 3 datagrams") as info:
        diag.request(b"", True, decode_inet)
    assert info.value.reason == "runaway" and sock.recvs == 3 and sock.closed


def test_socket_errors_have_their_errno_name():
    diag = SockDiag(open_socket=Opener(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(SockDiagFailed) as info:
        diag.request(b"", False, decode_inet)
    assert info.value.reason == "EACCES"
    diag, sock = fake(ConnectionResetError(errno.ECONNRESET, "reset"))
    with pytest.raises(SockDiagFailed) as info:
        diag.request(b"", False, decode_inet)
    assert info.value.reason == "ECONNRESET" and sock.closed


def test_decode_unix_attributes():
    body = UNIX_MSG.pack(socket.AF_UNIX, 1, 1, 0, 77, 0, 0)
    name = b"\0abstract"
    body += struct.pack("=HH", 4 + len(name), sockdiag.UNIX_DIAG_NAME) + name + bytes(-len(name) % 4)
    body += struct.pack("=HHI", 8, sockdiag.UNIX_DIAG_PEER, 78)
    diag, _ = fake(lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, body, flags=0))
    (u,) = diag.request(sockdiag.unix_exact(77), False, decode_unix)
    assert u == sockdiag.UnixSock(77, "SOCK_STREAM", "ESTABLISHED", "@abstract", 78)
    bad = UNIX_MSG.pack(socket.AF_UNIX, 1, 1, 0, 77, 0, 0) + struct.pack("=HH", 40, 0)
    diag, _ = fake(lambda seq: message(SOCK_DIAG_BY_FAMILY, seq, bad, flags=0))
    with pytest.raises(SockDiagFailed, match="attribute") as info:
        diag.request(b"", False, decode_unix)
    assert info.value.reason == "malformed"


# -- the address decoder -------------------------------------------------------------


@given(st.binary(min_size=4, max_size=4))
def test_ipv4_addresses(raw):
    assert key_host(address_key(socket.AF_INET, raw + bytes(12))) == str(ipaddress.IPv4Address(raw))


@given(st.binary(min_size=16, max_size=16))
def test_ipv6_addresses_are_canonical(raw):
    addr = ipaddress.IPv6Address(raw)
    want = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    assert key_host(address_key(socket.AF_INET6, raw)) == want


@given(st.ip_addresses())
def test_host_key_round_trip(addr):
    key, ifindex = host_key(str(addr))
    assert ifindex == 0
    want = addr.ipv4_mapped if getattr(addr, "ipv4_mapped", None) else addr
    assert key_host(key) == str(want)


# -- against the live kernel ---------------------------------------------------------


class Counting:
    """A real netlink socket that counts its receives and may clear
    NLM_F_REQUEST of what it sends (the kernel then never answers)."""

    def __init__(self, timeout, silent=False):
        self.sock = sockdiag.open_netlink(timeout)
        self.recvs = 0
        self.silent = silent

    def send(self, data):
        if self.silent:
            length, mtype, flags, seq, pid = NLMSGHDR.unpack_from(data)
            data = NLMSGHDR.pack(length, mtype, flags & ~NLM_F_REQUEST, seq, pid) + data[16:]
        return self.sock.send(data)

    def recv_into(self, view, size, flags):
        self.recvs += 1
        return self.sock.recv_into(view, size, flags)

    def close(self):
        self.sock.close()


@pytest.fixture
def listeners():
    """120 TCP listeners on 127.0.0.113: a LISTEN dump of them takes more
    than one datagram."""
    socks = []
    try:
        for _ in range(120):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.113", 0))
            s.listen(1)
        yield {s.getsockname()[1] for s in socks}
    finally:
        for s in socks:
            s.close()


@linux
def test_kernel_multipart_dump(listeners):
    counting = []
    diag = SockDiag(open_socket=lambda t: counting.append(Counting(t)) or counting[-1])
    try:
        found = diag.request(sockdiag.listen_dump(socket.AF_INET), True, decode_inet)
        mine = {s.sport for s in found if s.src == b"\x7f\0\0\x71"}
        assert mine == listeners
        assert all(s.state == TCP_LISTEN for s in found)
        assert counting[0].recvs >= 2  # it really came in several datagrams
    finally:
        diag.close()


@linux
def test_kernel_dump_over_the_datagram_bound_fails(listeners):
    diag = SockDiag(max_datagrams=1)
    try:
        with pytest.raises(SockDiagFailed) as info:
            diag.request(sockdiag.listen_dump(socket.AF_INET), True, decode_inet)
        assert info.value.reason == "runaway"
    finally:
        diag.close()


@linux
def test_kernel_answer_larger_than_the_buffer_is_truncation():
    with socket.socket() as s:
        s.bind(("127.0.0.114", 0))
        s.listen(1)
        diag = SockDiag(bufsize=64)  # an inet_diag answer is 88 bytes
        try:
            with pytest.raises(SockDiagFailed) as info:
                sockdiag.listening(diag, b"\x7f\0\0\x72", s.getsockname()[1])
            assert info.value.reason == "truncated"
        finally:
            diag.close()


@linux
def test_kernel_receive_timeout():
    """A request the kernel does not answer (NLM_F_REQUEST cleared): the
    receive gives up after the timeout instead of hanging."""
    diag = SockDiag(timeout=0.3, open_socket=lambda t: Counting(t, silent=True))
    t0 = time.monotonic()
    with pytest.raises(SockDiagFailed) as info:
        diag.request(sockdiag.listen_dump(socket.AF_INET), True, decode_inet)
    assert info.value.reason == "timeout"
    assert 0.25 <= time.monotonic() - t0 < 10
    assert not diag.is_open


@linux
def test_kernel_exact_tcp_and_unix_peer_match_the_socket_and_ss():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    a, b = socket.socketpair()
    diag = SockDiag()
    try:
        (lhost, lport), (rhost, rport) = client.getsockname(), client.getpeername()
        lkey, rkey = host_key(lhost)[0], host_key(rhost)[0]
        s = sockdiag.exact(diag, lkey, lport, rkey, rport)
        assert s.state_name == "ESTABLISHED" and s.local == (lhost, lport)
        assert s.inode == os.fstat(client.fileno()).st_ino
        assert s.uid == os.geteuid()
        peer = sockdiag.exact(diag, rkey, rport, lkey, lport)
        assert peer.inode == os.fstat(accepted.fileno()).st_ino
        # The LISTEN trap: an exact miss on the listening port gives the
        # listener, which exact() refuses and listening() uses.
        assert sockdiag.exact(diag, rkey, rport, lkey, 1) is None
        assert sockdiag.listening(diag, rkey, rport) is True
        assert sockdiag.listening(diag, lkey, lport) is False
        listeners = {x.local for x in diag.request(sockdiag.listen_dump(socket.AF_INET), True,
                                                   decode_inet)}
        assert server.getsockname() in listeners
        (ua,) = diag.request(sockdiag.unix_exact(os.fstat(a.fileno()).st_ino), False, decode_unix)
        assert ua.peer == os.fstat(b.fileno()).st_ino
        assert ua.type == "SOCK_STREAM"
        # ss (iproute2) agrees on the peer.
        ss = subprocess.run(["ss", "-xp"], capture_output=True, text=True, timeout=10).stdout
        assert f" {ua.inode} " in ss and f" {ua.peer} " in ss
        assert diag.request(sockdiag.unix_exact(2**32 - 2), False, decode_unix) == []
    finally:
        diag.close()
        for x in (server, client, accepted, a, b):
            x.close()
