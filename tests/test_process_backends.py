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


# -- the shared inode index cache (stop.process.fdindex) ----------------------

class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _builder(calls, complete=True):
    from stop.process.fdindex import FdIndex

    def build(entries, started):
        calls.append(started)
        return FdIndex({("pipe", len(calls)): [(1, 0)]}, entries, started, {}, complete)
    return build


@linux
def test_index_cache_reuses_until_max_age_then_rebuilds(monkeypatch):
    from stop.process import fdindex
    clock, calls = _Clock(), []
    entries = frozenset(os.listdir("/proc"))
    monkeypatch.setattr(fdindex, "proc_entries", lambda: entries)
    cache = fdindex.IndexCache(10.0, clock)
    first, why, age = cache.get(_builder(calls))
    assert (why, age, cache.builds) == ("none", 0.0, 1)
    clock.now += 9.5
    again, why, age = cache.get(_builder(calls))
    assert again is first and why is None and age == pytest.approx(9.5)
    clock.now += 1.0
    third, why, _ = cache.get(_builder(calls))
    assert third is not first and why == "expired" and cache.builds == 2
    # A walk that found it stale asks for one built after that moment.
    clock.now += 1.0
    fourth, why, _ = cache.get(_builder(calls), not_before=clock.now)
    assert fourth is not third and why == "stale"
    cache.discard(third)  # not the current one: no effect
    assert cache.current is fourth
    cache.discard(fourth)
    assert cache.current is None


@linux
def test_index_cache_rebuilds_for_a_new_process_not_for_a_gone_one(monkeypatch):
    from stop.process import fdindex
    calls = []
    live = frozenset(os.listdir("/proc"))
    pid = max(int(e) for e in live if e.isdigit())
    shown = {"entries": live - {str(pid)}}
    monkeypatch.setattr(fdindex, "proc_entries", lambda: shown["entries"])
    cache = fdindex.IndexCache(10.0, _Clock())
    first, _, _ = cache.get(_builder(calls))
    shown["entries"] = live - {str(pid), "1"}  # a process exited: fine
    assert cache.get(_builder(calls))[1] is None
    shown["entries"] = live  # one the index did not cover: rebuild
    assert cache.get(_builder(calls))[1] == "new process"
    assert cache.builds == 2


@linux
def test_index_cache_disabled_and_incomplete_indexes_are_not_shared(monkeypatch):
    from stop.process import fdindex
    calls = []
    off = fdindex.IndexCache(0, _Clock())
    assert [off.get(_builder(calls))[1] for _ in range(3)] == ["disabled"] * 3
    assert off.builds == 3 and off.current is None
    cut = fdindex.IndexCache(10.0, _Clock())
    assert [cut.get(_builder(calls, complete=False))[1] for _ in range(2)] == ["none"] * 2
    with pytest.raises(ValueError):
        fdindex.IndexCache(-1)


@linux
def test_index_cache_builds_once_for_concurrent_walks(monkeypatch):
    import threading
    import time
    from stop.process import fdindex
    entries = frozenset(os.listdir("/proc"))
    monkeypatch.setattr(fdindex, "proc_entries", lambda: entries)
    cache = fdindex.IndexCache(10.0)
    calls, got = [], []
    slow = _builder(calls)

    def build(entries, started):
        time.sleep(0.2)  # others arrive while this one builds
        return slow(entries, started)

    threads = [threading.Thread(target=lambda: got.append(cache.get(build)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 4 and len({id(i) for i in got}) == 1
    assert cache.builds == 1 == len(calls)


def test_link_keys():
    from stop.process.fdindex import link_key
    assert link_key("pipe:[12]") == ("pipe", 12)
    assert link_key("socket:[34]") == ("socket", 34)
    assert link_key("anon_inode:[eventfd]") is None
    assert link_key("/dev/null") is None
