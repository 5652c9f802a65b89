"""The process inspectors' selector and shared helpers (stop.os,
stop.os.common), and the procfs backend's shared inode index
(stop.os.linux.fdindex). The sock_diag transport: tests/test_sockdiag.py."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, strategies as st

from stop.config import Config
from stop.errors import ConfigError, SockDiagFailed, Unavailable
from stop.os import make_inspector
from stop.os.common import command_line, reason_of, text
from stop.testing import ManualClock

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")


def test_selector():
    assert make_inspector(Config(process_backend="psutil"), None).name == "psutil"
    if sys.platform.startswith("linux"):
        assert make_inspector(Config(), None).name == "procfs"
        assert make_inspector(Config(index_max_age=3), None).index_cache.max_age == 3
    with pytest.raises(ConfigError, match=r"process_backend: 'kvm' is neither built in "
                                          r"\(auto, procfs, psutil\) nor a plugin"):
        make_inspector(Config(process_backend="kvm", plugin_dirs=()), None)


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
    assert reason_of(Unavailable("zombie")) == "zombie"
    assert reason_of(SockDiagFailed("no answer", "timeout")) == "timeout"


def test_command_line_drops_trailing_padding_only():
    assert command_line(["sshd: alice [priv]", "", "", ""]) == ["sshd: alice [priv]"]
    assert command_line(["sh", "", "-c", "x", ""]) == ["sh", "", "-c", "x"]
    assert command_line(["", ""]) == []
    assert command_line([]) == []


# -- the shared inode index cache (stop.os.linux.fdindex) ----------------------

def _builder(calls, complete=True):
    from stop.os.linux.fdindex import FdIndex

    def build(entries, started):
        calls.append(started)
        return FdIndex({("pipe", len(calls)): [(1, 0)]}, entries, started, {}, complete)
    return build


@linux
def test_index_cache_reuses_until_max_age_then_rebuilds(monkeypatch):
    from stop.os.linux import fdindex
    clock, calls = ManualClock(), []
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
    from stop.os.linux import fdindex
    calls = []
    live = frozenset(os.listdir("/proc"))
    pid = max(int(e) for e in live if e.isdigit())
    shown = {"entries": live - {str(pid)}}
    monkeypatch.setattr(fdindex, "proc_entries", lambda: shown["entries"])
    cache = fdindex.IndexCache(10.0, ManualClock())
    first, _, _ = cache.get(_builder(calls))
    shown["entries"] = live - {str(pid), "1"}  # a process exited: fine
    assert cache.get(_builder(calls))[1] is None
    shown["entries"] = live  # one the index did not cover: rebuild
    assert cache.get(_builder(calls))[1] == "new process"
    assert cache.builds == 2


@linux
def test_index_cache_disabled_and_incomplete_indexes_are_not_shared(monkeypatch):
    from stop.os.linux import fdindex
    calls = []
    off = fdindex.IndexCache(0, ManualClock())
    assert [off.get(_builder(calls))[1] for _ in range(3)] == ["disabled"] * 3
    assert off.builds == 3 and off.current is None
    cut = fdindex.IndexCache(10.0, ManualClock())
    assert [cut.get(_builder(calls, complete=False))[1] for _ in range(2)] == ["none"] * 2
    with pytest.raises(ValueError):
        fdindex.IndexCache(-1)


@linux
def test_index_cache_builds_once_for_concurrent_walks(monkeypatch):
    import threading
    import time
    from stop.os.linux import fdindex
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
    from stop.os.linux.fdindex import link_key
    assert link_key("pipe:[12]") == ("pipe", 12)
    assert link_key("socket:[34]") == ("socket", 34)
    assert link_key("anon_inode:[eventfd]") is None
    assert link_key("/dev/null") is None


@linux
def test_refused_links_fail_without_listing_the_table(monkeypatch):
    """A process whose cwd/exe link was refused (EACCES) has its fd links
    refused by the same kernel check: its descriptors are reported
    unreadable as the first refused readlink would, without the listdir;
    the budget counts that one descriptor as before."""
    from stop.os.linux import procfs
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(procfs.os, "listdir", lambda p: listed.append(p) or real_listdir(p))
    me = os.getpid()
    if os.stat(f"/proc/{me}/fd").st_size == 0:
        pytest.skip("kernel before 6.2: /proc/PID/fd has no size")
    scan = procfs.ProcfsInspector(index_max_age=0).begin(100)
    try:
        scan._denied.add(me)
        with pytest.raises(Unavailable, match="EACCES"):
            scan._read_links(me)
        assert listed == [] and scan._fds_read == 1 and not scan.truncated
        # Budget spent: what the loop does (truncated, nothing listed).
        scan._fds_read = 100
        assert scan._read_links(me) == [] and scan.truncated
    finally:
        scan.close()
    # A kernel that does not count descriptors (size 0): listed as before.
    monkeypatch.setattr(procfs, "_fd_count", lambda base: 0)
    scan = procfs.ProcfsInspector(index_max_age=0).begin(100)
    try:
        scan._denied.add(me)
        links = scan._read_links(me)
        assert links and all(isinstance(fd, int) for fd, _target in links)
        assert listed == [f"/proc/{me}/fd"]
    finally:
        scan.close()


@linux
def test_process_notes_refused_links(monkeypatch):
    from stop.os.linux import procfs
    real = procfs.os.readlink

    def readlink(path):
        if path.endswith(("/cwd", "/exe")):
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(procfs.os, "readlink", readlink)
    scan = procfs.ProcfsInspector(index_max_age=0).begin(100)
    try:
        got = scan.process(os.getpid(), ("cwd", "exe", "name"))
        assert got["unavailable"] == {"cwd": "EACCES", "exe": "EACCES"}
        assert scan._denied == {os.getpid()}
    finally:
        scan.close()


@linux
def test_walks_reuse_sock_diag_transports():
    """A walk's sock_diag transport is kept for the next walk; walks
    running at once each have their own; at most TRANSPORTS_KEPT are kept."""
    from stop.os.linux import procfs
    inspector = procfs.ProcfsInspector(index_max_age=0)
    first = inspector.begin(100)
    d = first._diag()
    first.close()
    assert inspector.transports == [d]
    a, b = inspector.begin(100), inspector.begin(100)
    assert a._diag() is d
    other = b._diag()
    assert other is not d
    d.close()  # as a failed request leaves it: reopened on use
    a.close()
    b.close()
    assert sorted(map(id, inspector.transports)) == sorted((id(d), id(other)))
    again = inspector.begin(100)
    assert again._is_listening(b"\x7f\0\0\x01", 1) is False  # a request on a reused one
    again.close()
    scans = [inspector.begin(100) for _ in range(procfs.TRANSPORTS_KEPT + 3)]
    for scan in scans:
        scan._diag()
    for scan in scans:
        scan.close()
    assert len(inspector.transports) == procfs.TRANSPORTS_KEPT
