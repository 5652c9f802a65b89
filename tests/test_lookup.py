"""Tests of the socket lookup backends (stop.os: netlink, procfs), on real
loopback sockets, each behaviour checked on every backend.

Loopback aliases 127.0.0.x keep the tests apart (Linux answers all of
127/8); every socket is closed at teardown.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from stop.config import Config
from stop.errors import ConfigError, LookupFailed, SockDiagFailed
from stop.interfaces import ISocketLookup
from stop.model import Connection, Endpoint, canonical_host
from stop.os import LOOKUPS, make_lookup
from stop.os.linux.lookup import NetlinkLookup
from stop.os.linux.procnet import ProcfsLookup, TcpRow, parse_address, parse_row
from stop.os.portable import PsutilLookup
from stop.os.linux.sockdiag import (TCP_ESTABLISHED, TCP_LISTEN, decode_inet, inet_dump,
                                    port_filter)
from tests.integration.svtrees import ipv6_loopback

NOBODY = 65534
TCP_TIME_WAIT = 6

#: Every built-in backend, by name (the same answers are expected of each,
#: psutil forced here on Linux).
BACKENDS = {"netlink": NetlinkLookup, "procfs": ProcfsLookup, "psutil": PsutilLookup}


# -- helpers -------------------------------------------------------------


@pytest.fixture(params=sorted(BACKENDS))
def lookup(request):
    """Each backend in turn, closed afterwards."""
    backend = BACKENDS[request.param]()
    yield backend
    backend.close()


@pytest.fixture
def opened():
    """A list of sockets, all closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def endpoint(sockaddr) -> Endpoint:
    return Endpoint(canonical_host(sockaddr[0]), sockaddr[1])


def local_of(s: socket.socket) -> Endpoint:
    return endpoint(s.getsockname())


def remote_of(s: socket.socket) -> Endpoint:
    return endpoint(s.getpeername())


def listener(opened, host: str, family=socket.AF_INET, v6only: int | None = None, port: int = 0):
    s = socket.socket(family, socket.SOCK_STREAM)
    opened.append(s)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((host, port))
    s.listen(8)
    return s


def connect(opened, server: socket.socket, host: str, family=socket.AF_INET, source=None):
    """Connect a new client to ``server`` (reached at ``host``); returns
    (client socket, accepted socket)."""
    c = socket.socket(family, socket.SOCK_STREAM)
    opened.append(c)
    c.settimeout(5)
    if source is not None:
        c.bind(source)
    c.connect((host, server.getsockname()[1]))
    server.settimeout(5)
    a, _ = server.accept()
    opened.append(a)
    return c, a


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody uses on ``host`` right now (bound then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def seen(lookup, s: socket.socket) -> int:
    """The inode ``lookup`` reports for ``s``: psutil has none (0)."""
    return 0 if lookup.name == "psutil" else inode(s)


# -- the contract ----------------------------------------------------------


def test_provides_interface(lookup):
    assert verifyObject(ISocketLookup, lookup)
    assert lookup.name in BACKENDS and lookup.name in LOOKUPS


def test_outbound_connection_found(lookup, opened):
    server = listener(opened, "127.0.0.21")
    client, _ = connect(opened, server, "127.0.0.21")
    conn = lookup.find(local_of(client), remote_of(client))
    assert conn == Connection(
        local=local_of(client), remote=Endpoint("127.0.0.21", server.getsockname()[1]),
        uid=os.getuid(), inode=seen(lookup, client), accepted=False,
    )


def test_accepted_side_found_and_marked(lookup, opened):
    server = listener(opened, "127.0.0.22")
    client, accepted = connect(opened, server, "127.0.0.22")
    conn = lookup.find(local_of(accepted), remote_of(accepted))
    assert conn == Connection(
        local=Endpoint("127.0.0.22", server.getsockname()[1]), remote=local_of(client),
        uid=os.getuid(), inode=seen(lookup, accepted), accepted=True,
    )


def test_nonexistent_pair_is_none(lookup, opened):
    server = listener(opened, "127.0.0.23")
    client, _ = connect(opened, server, "127.0.0.23")
    # Right ports, wrong remote host; right hosts, wrong port; nothing at all.
    assert lookup.find(local_of(client), Endpoint("127.0.0.99", server.getsockname()[1])) is None
    assert lookup.find(local_of(client), Endpoint("127.0.0.23", free_port("127.0.0.23"))) is None
    assert lookup.find(Endpoint("127.0.0.23", free_port("127.0.0.23")), Endpoint("127.0.0.1", 9)) is None


@pytest.mark.parametrize("bound", ["127.0.0.24", "0.0.0.0"])
def test_listening_port_and_any_remote_is_none(lookup, opened, bound):
    """THE TRAP: ``listenport, anyport`` must not reveal the listener."""
    server = listener(opened, bound)
    port = server.getsockname()[1]
    # A live connection on the port too, from another remote port.
    connect(opened, server, "127.0.0.24")
    assert lookup.find(Endpoint("127.0.0.24", port), Endpoint("127.0.0.1", free_port())) is None
    assert lookup.find(Endpoint("127.0.0.24", port), Endpoint("127.0.0.1", 0)) is None


def test_listening_dual_stack_port_and_any_remote_is_none(lookup, opened):
    server = listener(opened, "::", socket.AF_INET6, v6only=0)
    port = server.getsockname()[1]
    assert lookup.find(Endpoint("127.0.0.25", port), Endpoint("127.0.0.1", free_port())) is None


def test_kernel_answers_exact_miss_with_listener(opened):
    """Why the trap test matters: show that the raw exact request does
    return the listener (if this kernel ever stops doing so, skip)."""
    server = listener(opened, "127.0.0.26")
    port = server.getsockname()[1]
    nl = NetlinkLookup()
    try:
        raw = nl.exact_raw(Endpoint("127.0.0.26", port), Endpoint("127.0.0.1", free_port()))
    finally:
        nl.close()
    if not raw:
        pytest.skip("this kernel does not fall back to the listener")
    assert [(r.state, r.inode) for r in raw] == [(TCP_LISTEN, inode(server))]


def wait_for_time_wait(client_local: Endpoint, remote: Endpoint) -> None:
    """Wait (at most 5 s) until /proc/net/tcp shows the pair in TIME_WAIT."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            rows = [parse_row(line) for line in f]
        if any(r and r.state == TCP_TIME_WAIT and r.local == client_local and r.remote == remote for r in rows):
            return
        time.sleep(0.01)
    pytest.fail("the connection never reached TIME_WAIT")


def test_time_wait_not_returned(lookup, opened):
    server = listener(opened, "127.0.0.27")
    client, accepted = connect(opened, server, "127.0.0.27")
    mine, theirs = local_of(client), remote_of(client)
    client.close()  # the active closer ends in TIME_WAIT
    accepted.close()
    wait_for_time_wait(mine, theirs)
    assert lookup.find(mine, theirs) is None
    assert lookup.find(Endpoint("", mine.port), theirs) is None


def test_kernel_answers_time_wait_pair(opened):
    """The exact request does find the TIME_WAIT socket: find() must and
    does drop it (see test_time_wait_not_returned)."""
    server = listener(opened, "127.0.0.28")
    client, accepted = connect(opened, server, "127.0.0.28")
    mine, theirs = local_of(client), remote_of(client)
    client.close()
    accepted.close()
    wait_for_time_wait(mine, theirs)
    nl = NetlinkLookup()
    try:
        raw = nl.exact_raw(mine, theirs)
    finally:
        nl.close()
    assert [r.state for r in raw] == [TCP_TIME_WAIT]


@needs_ipv6
def test_ipv6_loopback(lookup, opened):
    server = listener(opened, "::1", socket.AF_INET6, v6only=1)
    client, accepted = connect(opened, server, "::1", socket.AF_INET6)
    out = lookup.find(local_of(client), remote_of(client))
    assert out == Connection(local_of(client), Endpoint("::1", server.getsockname()[1]), os.getuid(), seen(lookup, client), False)
    back = lookup.find(local_of(accepted), remote_of(accepted))
    assert back == Connection(local_of(accepted), local_of(client), os.getuid(), seen(lookup, accepted), True)
    assert lookup.find(Endpoint("", local_of(client).port), remote_of(client)) == out
    # The same ports with an IPv4 end are another connection (none).
    assert lookup.find(Endpoint("127.0.0.1", local_of(client).port), Endpoint("127.0.0.1", server.getsockname()[1])) is None


@needs_ipv6
def test_ipv4_connection_on_dual_stack_socket(lookup, opened):
    """The accepted side is an AF_INET6 socket with v4-mapped addresses;
    the lookup finds it by its IPv4 ends and reports them canonical."""
    server = listener(opened, "::", socket.AF_INET6, v6only=0)
    port = server.getsockname()[1]
    client, accepted = connect(opened, server, "127.0.0.29", source=("127.0.0.30", 0))
    assert accepted.family == socket.AF_INET6
    assert accepted.getsockname()[0] == "::ffff:127.0.0.29"
    client_end = Endpoint("127.0.0.30", client.getsockname()[1])
    want = Connection(Endpoint("127.0.0.29", port), client_end, os.getuid(), seen(lookup, accepted), True)
    assert lookup.find(Endpoint("127.0.0.29", port), client_end) == want
    assert lookup.find(Endpoint("", port), client_end) == want
    # And the outbound IPv4 client side: not accepted.
    out = lookup.find(client_end, Endpoint("127.0.0.29", port))
    assert (out.inode, out.accepted) == (seen(lookup, client), False)


def test_address_form_finds_any_local_address(lookup, opened):
    server = listener(opened, "127.0.0.31")
    client, accepted = connect(opened, server, "127.0.0.31", source=("127.0.0.32", 0))
    out = lookup.find(Endpoint("", client.getsockname()[1]), remote_of(client))
    assert out == Connection(local_of(client), remote_of(client), os.getuid(), seen(lookup, client), False)
    back = lookup.find(Endpoint("", server.getsockname()[1]), local_of(client))
    assert (back.local, back.inode, back.accepted) == (local_of(accepted), seen(lookup, accepted), True)
    assert lookup.find(Endpoint("", client.getsockname()[1]), Endpoint("127.0.0.99", server.getsockname()[1])) is None


def test_accepted_needs_a_listener_covering_the_local_address(lookup, opened):
    """A listener on 127.0.0.33:P does not cover an outbound connection
    from 127.0.0.34:P; one bound to 127.0.0.34:P does (and that is the
    limit of the rule: such a connection then looks accepted)."""
    busy = listener(opened, "127.0.0.33")
    port = busy.getsockname()[1]
    server = listener(opened, "127.0.0.35")
    client = socket.socket()
    opened.append(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.34", port))
    client.connect(server.getsockname())
    mine = Endpoint("127.0.0.34", port)
    out = lookup.find(mine, remote_of(client))
    assert (out.inode, out.accepted) == (seen(lookup, client), False)
    # SO_REUSEADDR on both lets a listener share the connected address.
    cover = socket.socket()
    opened.append(cover)
    cover.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    cover.bind(("127.0.0.34", port))
    cover.listen(1)
    assert lookup.find(mine, remote_of(client)).accepted is True


def test_wildcard_listener_makes_accepted(lookup, opened):
    server = listener(opened, "0.0.0.0")
    client, accepted = connect(opened, server, "127.0.0.37")
    conn = lookup.find(local_of(accepted), remote_of(accepted))
    assert (conn.local, conn.inode, conn.accepted) == (Endpoint("127.0.0.37", server.getsockname()[1]), seen(lookup, accepted), True)


def _hold_connection_as_nobody(address: tuple[str, int], report_w: int, release_r: int) -> None:
    """In a forked child: become nobody, connect, report the local end,
    hold until released (at most 30 s). Never returns."""
    code = 1
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        s = socket.create_connection(address, timeout=5)
        host, port = s.getsockname()[:2]
        os.write(report_w, f"{host} {port}\n".encode())
        select.select([release_r], [], [], 30)
        code = 0
    except BaseException as e:  # tell the parent why, in its failure
        os.write(report_w, f"child failed: {e!r}\n".encode())
    finally:
        os._exit(code)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid to nobody)")
def test_connection_of_another_user(lookup, opened):
    server = listener(opened, "127.0.0.38")
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    # The child, as nobody, may not be able to read Python's library:
    # load the codec connect() uses for host names beforehand.
    "127.0.0.38".encode("idna")
    pid = os.fork()
    if pid == 0:
        _hold_connection_as_nobody(server.getsockname(), report_w, release_r)
    try:
        os.close(report_w)
        ready, _, _ = select.select([report_r], [], [], 10)
        assert ready, "the child did not connect within 10 s"
        report = os.read(report_r, 1000).decode()
        assert not report.startswith("child failed"), report
        host, port = report.split()
        accepted, _ = server.accept()
        opened.append(accepted)
        child_end = Endpoint(host, int(port))
        conn = lookup.find(child_end, local_of(accepted))
        assert (conn.uid, conn.accepted) == (NOBODY, False)
        if lookup.name != "psutil":  # psutil has no inodes
            assert conn.inode not in (0, inode(accepted))
        # Our accepted side of the same connection: ours, and accepted.
        back = lookup.find(local_of(accepted), child_end)
        assert (back.uid, back.inode, back.accepted) == (os.getuid(), seen(lookup, accepted), True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (report_r, release_r, release_w):
            os.close(fd)


def test_mixed_families_are_none(lookup):
    assert lookup.find(Endpoint("127.0.0.1", 1), Endpoint("::1", 2)) is None


# -- netlink specifics -----------------------------------------------------


def test_netlink_kernel_error_raises_then_recovers(opened):
    server = listener(opened, "127.0.0.39")
    client, _ = connect(opened, server, "127.0.0.39")
    nl = NetlinkLookup()
    try:
        assert nl.find(local_of(client), remote_of(client)) is not None
        # A bytecode program the kernel's audit refuses (a jump of 0).
        bad = inet_dump(socket.AF_INET, 1 << TCP_LISTEN, b"\x01\x00\x00\x00")
        with pytest.raises(SockDiagFailed, match="Invalid argument") as info:
            nl.transport.request(bad, True, decode_inet)
        assert info.value.reason == "EINVAL" and isinstance(info.value, LookupFailed)
        assert not nl.transport.is_open  # closed: the next call starts clean
        assert nl.find(local_of(client), remote_of(client)).inode == inode(client)
    finally:
        nl.close()


def test_netlink_socket_failure_raises_then_recovers(opened):
    server = listener(opened, "127.0.0.40")
    client, _ = connect(opened, server, "127.0.0.40")
    nl = NetlinkLookup()
    try:
        nl.probe()
        nl.transport._sock.close()  # pull the socket from under it
        with pytest.raises(SockDiagFailed, match="sock_diag: request failed") as info:
            nl.find(local_of(client), remote_of(client))
        assert info.value.reason == "EBADF"
        assert nl.find(local_of(client), remote_of(client)).inode == inode(client)
    finally:
        nl.close()
    nl.close()  # idempotent


def test_netlink_reply_reading_is_bounded():
    """A request whose reply does not end within max_datagrams fails
    instead of reading on (and leaves no half-read socket behind)."""
    nl = NetlinkLookup(max_datagrams=0)
    try:
        with pytest.raises(SockDiagFailed, match="no end of the answer after 0 datagrams"):
            nl.find(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2))
        assert not nl.transport.is_open
    finally:
        nl.close()


def test_netlink_socket_is_reused(opened):
    server = listener(opened, "127.0.0.41")
    client, _ = connect(opened, server, "127.0.0.41")
    nl = NetlinkLookup()
    try:
        nl.find(local_of(client), remote_of(client))
        first = nl.transport._sock
        for _ in range(3):
            nl.find(local_of(client), remote_of(client))
            nl.find(local_of(client), Endpoint("127.0.0.99", 1))
        assert nl.transport._sock is first
    finally:
        nl.close()


@settings(max_examples=60, deadline=None)
@given(
    sport=st.one_of(st.none(), st.integers(0, 65535)),
    dport=st.one_of(st.none(), st.integers(0, 65535)),
    family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
)
def test_port_filter_accepted_by_kernel(sport, dport, family):
    """Every program port_filter builds passes the kernel's bytecode audit
    and returns only sockets with those ports."""
    nl = NetlinkLookup()
    try:
        states = (1 << TCP_LISTEN) | (1 << TCP_ESTABLISHED)
        for r in nl.transport.request(inet_dump(family, states, port_filter(sport, dport)), True,
                                      decode_inet):
            assert sport is None or r.sport == sport
            assert dport is None or r.dport == dport
    finally:
        nl.close()


# -- psutil specifics ------------------------------------------------------


def test_psutil_answers_as_netlink_on_the_same_live_connections(opened):
    """Forced on Linux: the portable lookup gives netlink's answers (but
    the inode, which psutil does not have) for hits, misses, accepted
    sockets, IPv6 and IPv4 on a dual-stack socket, both query forms."""
    queries = []
    server = listener(opened, "127.0.0.42")
    client, accepted = connect(opened, server, "127.0.0.42", source=("127.0.0.43", 0))
    queries += [(local_of(client), remote_of(client)), (local_of(accepted), remote_of(accepted)),
                (Endpoint("", local_of(client).port), remote_of(client)),
                (local_of(client), Endpoint("127.0.0.99", remote_of(client).port)),
                (Endpoint("127.0.0.42", server.getsockname()[1]), Endpoint("127.0.0.1", free_port()))]
    if ipv6_loopback():
        six = listener(opened, "::1", socket.AF_INET6, v6only=1)
        c6, a6 = connect(opened, six, "::1", socket.AF_INET6)
        dual = listener(opened, "::", socket.AF_INET6, v6only=0)
        c4, a4 = connect(opened, dual, "127.0.0.44")
        assert a4.getsockname()[0] == "::ffff:127.0.0.44"
        queries += [(local_of(c6), remote_of(c6)), (local_of(a6), remote_of(a6)),
                    (local_of(c4), remote_of(c4)), (local_of(a4), remote_of(a4)),
                    (Endpoint("", local_of(a4).port), remote_of(a4))]
    netlink, portable = NetlinkLookup(), PsutilLookup()
    try:
        for local, remote in queries:
            want = netlink.find(local, remote)
            got = portable.find(local, remote)
            if want is None:
                assert got is None, (local, remote)
            else:
                assert got == dataclasses.replace(want, inode=0), (local, remote)
        assert sum(1 for q in queries if netlink.find(*q) is not None) >= 3
        assert any(netlink.find(*q).accepted for q in queries if netlink.find(*q) is not None)
    finally:
        netlink.close()


class Sconn:
    """A psutil sconn, written out (fd, family, type, laddr, raddr, status, pid)."""

    def __init__(self, laddr, raddr, status, pid):
        self.fd, self.family, self.type = 3, socket.AF_INET, socket.SOCK_STREAM
        self.laddr, self.raddr, self.status, self.pid = laddr, raddr, status, pid


def test_psutil_says_what_it_cannot_see(monkeypatch):
    import psutil
    row = Sconn(("192.0.2.1", 40000), ("198.51.100.7", 113), psutil.CONN_ESTABLISHED, None)
    lookup = PsutilLookup(table=lambda: [row])
    # pid None: another user's process, the daemon not root.
    with pytest.raises(LookupFailed, match="not visible"):
        lookup.find(Endpoint("192.0.2.1", 40000), Endpoint("198.51.100.7", 113))
    assert lookup.find(Endpoint("192.0.2.1", 40001), Endpoint("198.51.100.7", 113)) is None

    def refused(kind):
        raise psutil.AccessDenied()
    monkeypatch.setattr(psutil, "net_connections", refused)  # macOS without root
    with pytest.raises(LookupFailed, match="needs root"):
        PsutilLookup().find(Endpoint("192.0.2.1", 40000), Endpoint("198.51.100.7", 113))


def test_psutil_is_called_off_the_reactor_thread():
    assert PsutilLookup.blocking is True and ProcfsLookup.blocking is True
    assert NetlinkLookup.blocking is False


# -- procfs specifics ------------------------------------------------------


def hexaddr(host: str) -> str:
    """An address as the kernel prints it: 32-bit words in host order."""
    raw = ipaddress.ip_address(host).packed
    return "".join("%08X" % w for w in struct.unpack("=%dI" % (len(raw) // 4), raw))


def proc_line(sl: int, local: tuple[str, int], remote: tuple[str, int], state: int, uid: int, ino: int) -> str:
    """A row formatted like net/ipv4/tcp_ipv4.c get_tcp4_sock (and the v6
    twin), with plausible filler in the fields we do not read."""
    return "%4d: %s:%04X %s:%04X %02X %08X:%08X %02X:%08X %08X %5d %8d %d 1 0000000000000000 100 0 0 10 0" % (
        sl, hexaddr(local[0]), local[1], hexaddr(remote[0]), remote[1], state, 0, 0, 0, 0, 0, uid, 0, ino,
    )


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


@pytest.mark.skipif(sys.byteorder != "little", reason="literal little-endian /proc text")
def test_parse_kernel_text_literally():
    line = "   0: 0100007F:0CEA 0500007F:99FD 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 00000000f56f6987 20 4 30 10 -1"
    assert parse_row(line) == TcpRow(Endpoint("127.0.0.1", 3306), Endpoint("127.0.0.5", 0x99FD), 1, 1000, 4242)
    v6 = "   1: 0000000000000000FFFF00000100007F:0016 00000000000000000000000001000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1"
    assert parse_row(v6) == TcpRow(Endpoint("127.0.0.1", 22), Endpoint("::1", 0), 10, 0, 7)
    assert parse_row(HEADER) is None


@given(
    sl=st.integers(0, 99999),
    local=st.tuples(st.ip_addresses(), st.integers(0, 65535)),
    remote_port=st.integers(0, 65535),
    remote_host=st.data(),
    state=st.integers(1, 12),
    uid=st.integers(0, 2**32 - 2),
    ino=st.integers(0, 2**64 - 1),
)
def test_parse_row_roundtrip(sl, local, remote_port, remote_host, state, uid, ino):
    version = local[0].version
    rhost = remote_host.draw(st.ip_addresses(v=version))
    line = proc_line(sl, (str(local[0]), local[1]), (str(rhost), remote_port), state, uid, ino)
    assert parse_row(line) == TcpRow(
        Endpoint(canonical_host(str(local[0])), local[1]), Endpoint(canonical_host(str(rhost)), remote_port),
        state, uid, ino,
    )


@pytest.mark.parametrize("text", ["", "0100007F", "0100007F:CEA", "0100007:0CEA", "0100007G:0CEA", "0100007F0CEA"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)


def fake_proc(tmp_path, tcp: list[str], tcp6: list[str] | None) -> str:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(HEADER + "".join(line + "\n" for line in tcp))
    if tcp6 is not None:
        (tmp_path / "net" / "tcp6").write_text(HEADER + "".join(line + "\n" for line in tcp6))
    return str(tmp_path)


def test_procfs_fixture_root(tmp_path):
    root = fake_proc(
        tmp_path,
        tcp=[
            proc_line(0, ("0.0.0.0", 80), ("0.0.0.0", 0), 0x0A, 0, 100),
            proc_line(1, ("192.0.2.1", 80), ("198.51.100.7", 4000), 0x01, 33, 101),
            proc_line(2, ("192.0.2.1", 5000), ("198.51.100.7", 113), 0x01, 1000, 102),
            proc_line(3, ("192.0.2.1", 5001), ("198.51.100.7", 113), 0x06, 0, 0),
        ],
        tcp6=[
            proc_line(0, ("::ffff:192.0.2.1", 5002), ("::ffff:198.51.100.7", 113), 0x01, 1001, 103),
            proc_line(1, ("2001:db8::1", 22), ("::", 0), 0x0A, 0, 104),
            proc_line(2, ("2001:db8::1", 22), ("2001:db8::9", 6000), 0x01, 0, 105),
        ],
    )
    p = ProcfsLookup(root=root)
    remote = Endpoint("198.51.100.7", 113)
    assert p.find(Endpoint("192.0.2.1", 5000), remote) == Connection(Endpoint("192.0.2.1", 5000), remote, 1000, 102, False)
    assert p.find(Endpoint("192.0.2.1", 80), Endpoint("198.51.100.7", 4000)).accepted is True
    assert p.find(Endpoint("192.0.2.1", 5001), remote) is None  # TIME_WAIT
    assert p.find(Endpoint("192.0.2.1", 80), Endpoint("198.51.100.7", 4001)) is None  # LISTEN trap
    assert p.find(Endpoint("192.0.2.1", 5002), remote) == Connection(Endpoint("192.0.2.1", 5002), remote, 1001, 103, False)
    assert p.find(Endpoint("", 5002), remote).local == Endpoint("192.0.2.1", 5002)
    six = p.find(Endpoint("2001:db8::1", 22), Endpoint("2001:db8::9", 6000))
    assert (six.uid, six.inode, six.accepted) == (0, 105, True)


def test_procfs_missing_tcp6_is_empty_missing_tcp_fails(tmp_path):
    root = fake_proc(tmp_path, tcp=[proc_line(0, ("192.0.2.1", 5000), ("198.51.100.7", 113), 1, 7, 9)], tcp6=None)
    assert ProcfsLookup(root=root).find(Endpoint("192.0.2.1", 5000), Endpoint("198.51.100.7", 113)).uid == 7
    assert ProcfsLookup(root=root).find(Endpoint("192.0.2.1", 5001), Endpoint("198.51.100.7", 113)) is None
    with pytest.raises(LookupFailed, match="does not exist"):
        ProcfsLookup(root=str(tmp_path / "nowhere")).find(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2))


def test_procfs_bad_row_fails_with_place(tmp_path):
    root = fake_proc(tmp_path, tcp=["   0: garbage"], tcp6=[])
    with pytest.raises(LookupFailed, match=r"net/tcp line 2"):
        ProcfsLookup(root=root).find(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2))


# -- the selector ----------------------------------------------------------


def test_make_lookup_by_name():
    for name, cls in BACKENDS.items():
        backend = make_lookup(Config(lookup=name), None)
        try:
            assert type(backend) is cls and backend.name == name
        finally:
            backend.close()


def test_make_lookup_auto_prefers_netlink_when_it_answers():
    backend = make_lookup(Config(), None)
    try:
        assert verifyObject(ISocketLookup, backend)
        # This kernel answers sock_diag (the netlink tests above pass on it).
        assert backend.name == "netlink"
    finally:
        backend.close()


def test_make_lookup_auto_falls_back_to_procfs(monkeypatch):
    def refuse(self):
        raise LookupFailed("netlink: kernel refused the sock_diag request: Operation not supported")

    monkeypatch.setattr(NetlinkLookup, "probe", refuse)
    backend = make_lookup(Config(lookup="auto"), None)
    assert backend.name == "procfs"


def test_make_lookup_auto_is_psutil_elsewhere(monkeypatch):
    import stop.os
    monkeypatch.setattr(stop.os, "_LINUX", False)
    assert make_lookup(Config(lookup="auto"), None).name == "psutil"
    with pytest.raises(ConfigError, match="procfs needs Linux"):
        make_lookup(Config(lookup="procfs"), None)


def test_make_lookup_unknown_name():
    with pytest.raises(ConfigError, match=r"lookup: 'bsd' is neither built in \(auto, netlink, "
                                          r"procfs, psutil\) nor a plugin"):
        make_lookup(Config(lookup="bsd", plugin_dirs=()), None)
