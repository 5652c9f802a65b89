"""Which side accepted a connection, on real processes and real sockets
(loopback only): every consumer of stop.os.direction must give the same
answer. The consumers: the socket lookups' ``accepted`` (netlink, procfs)
and the walk's per-socket ``direction`` / ``direction_by`` (procfs and
psutil inspectors).

The relays that close their listener after accepting (socat without
``fork``, traditional ``nc -l``) are the case the listener signal alone
called outbound.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import sys

import pytest

from stop import os as os_layer
from stop.config import Config
from stop.model import Endpoint
from stop.os.linux.lookup import NetlinkLookup
from stop.os.linux.procnet import ProcfsLookup
from tests.integration import svtrees

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")


def needs(*programs):
    missing = [p for p in programs if not shutil.which(p)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (dev/lib.sh)")


def lookups():
    return [NetlinkLookup(), ProcfsLookup()]


def observe(local: Endpoint, remote: Endpoint, pid: int) -> tuple[str, str]:
    """(direction, direction_by) of the socket (local, remote) held by
    ``pid``, after checking that every consumer agrees on it."""
    accepted = {}
    for lookup in lookups():
        try:
            conn = lookup.find(local, remote)
        finally:
            lookup.close()
        assert conn is not None, f"{lookup.name} does not find {local} -> {remote}"
        accepted[lookup.name] = conn.accepted
    walked = {}
    for backend in ("procfs", "psutil"):
        scan = os_layer.make_inspector(Config(process_backend=backend), None).begin(100000)
        try:
            found = [d for d in scan.descriptors(pid, False)
                     if d.get("local") == local.as_dict() and d.get("remote") == remote.as_dict()]
        finally:
            scan.close()
        assert len(found) == 1, f"{backend}: pid {pid} holds {found} for {local} -> {remote}"
        walked[backend] = (found[0]["direction"], found[0]["direction_by"])
    assert len(set(walked.values())) == 1, walked
    (decided,) = set(walked.values())
    assert set(accepted.values()) == {decided[0] == "inbound"}, (accepted, walked)
    return decided


def listening_on(port: int, host: str = "127.0.0.1") -> bool:
    return any(s.local == (host, port) for s in svtrees.tcp_sockets("LISTEN"))


@pytest.fixture
def tree():
    t = svtrees.Tree()
    yield t
    t.stop()


def relay_case(tree, listen_cmd: str, port: int):
    """Start ``listen_cmd`` (listening on 127.0.0.1:port), connect a client,
    return (relay side, client side) as (local, remote, pid) each."""
    tree.spawn(listen_cmd)
    svtrees.wait_for(lambda: listening_on(port), what=f"listener on {port}")
    tree.spawn(f"sleep 600 | nc.openbsd 127.0.0.1 {port}")
    client = svtrees.connection_to(port)
    relay_local, relay_remote = Endpoint("127.0.0.1", port), client.local
    relay_pid = svtrees.holder_of(svtrees.accepted_inode(client))
    return ((relay_local, relay_remote, relay_pid),
            (client.local, client.remote, svtrees.holder_of(client.inode)))


@needs("socat", "nc.openbsd")
def test_socat_without_fork_closes_its_listener_and_is_still_inbound(tree):
    port = svtrees.free_port_outside_range()
    relay, client = relay_case(tree, f"exec socat TCP-LISTEN:{port},bind=127.0.0.1 PIPE", port)
    # The case itself: socat closed its listener when it accepted.
    svtrees.wait_for(lambda: not listening_on(port), what="socat to close its listener")
    assert svtrees.comm(relay[2]) == "socat"
    assert observe(*relay) == ("inbound", "ephemeral-range")
    assert observe(*client) == ("outbound", "ephemeral-range")


@needs("nc.traditional", "nc.openbsd")
def test_traditional_nc_listen_closes_its_listener_and_is_still_inbound(tree):
    port = svtrees.free_port_outside_range()
    relay, client = relay_case(
        tree, f"sleep 600 | nc.traditional -l -p {port} -s 127.0.0.1 >/dev/null", port)
    svtrees.wait_for(lambda: not listening_on(port), what="nc.traditional to close its listener")
    assert svtrees.comm(relay[2]) == "nc.traditional"
    assert observe(*relay) == ("inbound", "ephemeral-range")
    assert observe(*client) == ("outbound", "ephemeral-range")


@needs("nc.openbsd")
def test_openbsd_nc_listen_keeps_its_listener(tree):
    # A port from bind(0), inside the ephemeral range: only the listener
    # can tell, and it does.
    port = svtrees.free_port()
    relay, client = relay_case(
        tree, f"sleep 600 | nc.openbsd -l 127.0.0.1 {port} >/dev/null", port)
    assert listening_on(port)
    assert observe(*relay) == ("inbound", "listener")
    assert observe(*client) == ("unknown", "none")  # both ports ephemeral


@pytest.mark.skipif(not svtrees.ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_an_ipv4_wildcard_listener_does_not_cover_ipv6_on_the_same_port():
    """A listener on 0.0.0.0:P and an IPv6 connection from [::1]:P: the v6
    connection is not accepted by it (it is an outbound one here)."""
    socks = []
    try:
        v4 = socket.socket(socket.AF_INET)
        socks.append(v4)
        v4.bind(("0.0.0.0", 0))
        v4.listen(1)
        port = v4.getsockname()[1]  # inside the ephemeral range
        server = socket.socket(socket.AF_INET6)
        socks.append(server)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        service = svtrees.free_port_in(1024, svtrees.ephemeral_range()[0] - 1, host="::1")
        server.bind(("::1", service))
        server.listen(1)
        client = socket.socket(socket.AF_INET6)
        socks.append(client)
        client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        client.bind(("::1", port))
        client.connect(("::1", service))
        accepted, _ = server.accept()
        socks.append(accepted)
        mine = Endpoint("::1", port)
        theirs = Endpoint("::1", service)
        assert observe(mine, theirs, os.getpid()) == ("outbound", "ephemeral-range")
        assert observe(theirs, mine, os.getpid()) == ("inbound", "listener")
    finally:
        for s in socks:
            s.close()


def test_so_reuseport_listeners():
    """A service with several SO_REUSEPORT listeners on one port: every
    connection they accept is inbound by the listener, and the LISTEN trap
    still answers nothing for a port pair without a connection."""
    port = svtrees.free_port()  # inside the range: only the listener decides
    socks = []
    try:
        listeners = []
        for _ in range(3):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen(8)
            listeners.append(s)
        clients = []
        for _ in range(4):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(c)
            clients.append(c)
        accepted = []
        for _ in range(40):
            if len(accepted) == len(clients):
                break
            ready, _, _ = select.select(listeners, [], [], 0.5)
            for s in ready:
                a, _ = s.accept()
                socks.append(a)
                accepted.append(a)
        assert len(accepted) == len(clients)
        for a in accepted:
            local, remote = Endpoint(*a.getsockname()), Endpoint(*a.getpeername())
            assert observe(local, remote, os.getpid()) == ("inbound", "listener")
        unused = svtrees.free_port()
        for lookup in lookups():
            try:
                assert lookup.find(Endpoint("127.0.0.1", port), Endpoint("127.0.0.1", unused)) is None
            finally:
                lookup.close()
    finally:
        for s in socks:
            s.close()


@needs("nc.openbsd")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a source port below 1024)")
def test_outbound_from_a_fixed_low_source_port_is_not_called_inbound(tree):
    service = svtrees.free_port_outside_range()
    tree.spawn(f"sleep 600 | nc.openbsd -l 127.0.0.1 {service} >/dev/null")
    svtrees.wait_for(lambda: listening_on(service), what="the service")
    low = svtrees.free_port_in(600, 1000)
    tree.spawn(f"sleep 600 | nc.openbsd -s 127.0.0.1 -p {low} 127.0.0.1 {service}")
    client = svtrees.connection_to(service)
    assert client.local.port == low
    pid = svtrees.holder_of(client.inode)
    assert observe(client.local, client.remote, pid) == ("unknown", "none")
    server = svtrees.holder_of(svtrees.accepted_inode(client))
    assert observe(client.remote, client.local, server) == ("inbound", "listener")
