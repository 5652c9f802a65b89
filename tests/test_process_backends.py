"""stop.process: the selector, text handling, and the sock_diag codec
against the live kernel and ``ss``."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from stop.errors import ConfigError
from stop.process import make_inspector, reason_of, text
from stop.process.sockdiag import SockDiag, format_address

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")


def test_selector():
    assert make_inspector("psutil").name == "psutil"
    if sys.platform.startswith("linux"):
        assert make_inspector().name == "procfs"
    with pytest.raises(ConfigError, match="unknown backend"):
        make_inspector("kvm")


@given(st.binary(min_size=4, max_size=4))
def test_ipv4_addresses(raw):
    assert format_address(socket.AF_INET, raw + bytes(12)) == str(ipaddress.IPv4Address(raw))


@given(st.binary(min_size=16, max_size=16))
def test_ipv6_addresses_are_canonical(raw):
    addr = ipaddress.IPv6Address(raw)
    want = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    assert format_address(socket.AF_INET6, raw) == want


@given(st.binary(max_size=40))
def test_text_always_encodes(raw):
    s = raw.decode("utf-8", "surrogateescape")
    out = text(s)
    out.encode("utf-8")
    if raw.decode("utf-8", "replace") == raw.decode("utf-8", "ignore"):
        assert out == raw.decode("utf-8")


def test_reason_names_errno():
    assert reason_of(PermissionError(13, "x")) == "EACCES"
    assert reason_of(ValueError()) == "ValueError"


@linux
def test_exact_tcp_lookup_and_unix_peer_match_the_kernel():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    a, b = socket.socketpair()
    diag = SockDiag()
    try:
        local, remote = client.getsockname(), client.getpeername()
        s = diag.inet_exact(local, remote)
        assert s.state == "ESTABLISHED"
        assert s.inode == os.fstat(client.fileno()).st_ino
        assert s.uid == os.geteuid()
        peer = diag.inet_exact(remote, local)
        assert peer.inode == os.fstat(accepted.fileno()).st_ino
        listeners = {x.local for x in diag.inet_dump(socket.AF_INET, 1 << 10)}
        assert server.getsockname() in listeners
        ua = diag.unix_exact(os.fstat(a.fileno()).st_ino)
        assert ua.peer == os.fstat(b.fileno()).st_ino
        assert ua.type == "SOCK_STREAM"
        # ss (iproute2) agrees on the peer.
        ss = subprocess.run(["ss", "-xp"], capture_output=True, text=True, timeout=10).stdout
        assert f" {ua.inode} " in ss and f" {ua.peer} " in ss
        assert diag.unix_exact(2**32 - 2) is None
    finally:
        diag.close()
        for x in (server, client, accepted, a, b):
            x.close()
