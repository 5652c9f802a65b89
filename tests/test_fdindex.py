"""The procfs backend's shared index: grown with new processes, patched
with fresh tables, searched by uid (stop.os.linux.fdindex), with fake
/proc listings and tables."""

import sys

import pytest

from stop.testing import ManualClock

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _index(fdindex, entries, tables, uids=None, built=1000.0):
    return fdindex.FdIndex.from_tables(tables, uids or {p: 0 for p in tables}, {},
                                       frozenset(entries), built, True)


@linux
def test_new_processes_are_read_into_the_shared_index_not_rebuilt(monkeypatch):
    from stop.os.linux import fdindex
    shown = {"entries": frozenset({"1", "10", "stat"}), "pid": 10}
    listed = []
    monkeypatch.setattr(fdindex, "proc_entries", lambda: listed.append(1) or shown["entries"])
    monkeypatch.setattr(fdindex, "last_pid", lambda: shown["pid"])
    clock = ManualClock()
    tables = {1: [(3, ("pipe", 7))], 10: [(4, ("pipe", 7)), (5, ("socket", 9))]}
    builds, reads = [], []

    def build(entries, started):
        builds.append(entries)
        return _index(fdindex, entries, {p: t for p, t in tables.items() if str(p) in entries},
                      built=started)

    def read(pid):
        reads.append(pid)
        return {11: ([(0, ("pipe", 7))], 0), 12: "EACCES"}.get(pid)

    cache = fdindex.IndexCache(10.0, clock)
    first, why, _ = cache.get(build, read=read)
    assert why == "none" and len(builds) == 1 and len(listed) == 1
    # No process started (the last PID did not move): not even a listing.
    assert cache.get(build, read=read)[:2] == (first, None) and len(listed) == 1
    # Three new processes (one gone again before it was read), one exited.
    shown["entries"] = frozenset({"10", "11", "12", "13", "stat"})
    shown["pid"] = 13
    again, why, _ = cache.get(build, read=read)
    assert again is first and why is None and len(builds) == 1
    assert sorted(reads) == [11, 12, 13] and cache.added == 3
    assert sorted(first.holders[("pipe", 7)]) == [(10, 4), (11, 0)]  # 1 exited
    assert first.unreadable == {"EACCES": 1} and 1 not in first.tables
    # Past max_age: a full scan again.
    clock.now += 11
    assert cache.get(build, read=read)[1] == "expired" and len(builds) == 2


@linux
def test_candidates_follow_owners_as_processes_come_go_and_change_uid():
    from stop.os.linux import fdindex
    index = _index(fdindex, {"5", "6"}, {5: [(3, ("socket", 50))], 6: []}, {5: 100, 6: 200})
    cache = fdindex.IndexCache(10.0, ManualClock())
    assert cache.candidates(index, 100) == [5] and cache.candidates(index, 200) == [6]
    cache.patch(index, 6, [(3, ("socket", 60))], uid=100)  # setuid: now uid 100's
    assert cache.candidates(index, 100) == [6, 5] and cache.candidates(index, 200) == []
    # 5 exited, 7 is new (uid 300): what a grown index says.
    cache._grow(index, frozenset({"6", "7"}), lambda pid: ([(3, ("pipe", 70))], 300))
    assert cache.candidates(index, 100) == [6] and cache.candidates(index, 300) == [7]
    assert index.by_uid == {100: {6}, 300: {7}} and index.uids == {6: 100, 7: 300}


@linux
def test_patch_and_candidates():
    from stop.os.linux import fdindex
    index = _index(fdindex, {"5", "6", "7", "8"},
                   {5: [(3, ("socket", 50))], 6: [(3, ("pipe", 90))], 7: [], 8: [(4, ("socket", 20))]},
                   {5: 100, 6: 100, 7: 100, 8: 0})
    cache = fdindex.IndexCache(10.0, ManualClock())
    # uid 100's processes, the one with the newest inode first, then by PID.
    assert cache.candidates(index, 100) == [6, 5, 7]
    assert cache.candidates(index, 0) == [8]
    assert cache.patch(index, 5, [(3, ("socket", 50))]) is False  # unchanged
    assert cache.patch(index, 5, [(4, ("socket", 95))]) is True
    assert ("socket", 50) not in index.holders and index.holders[("socket", 95)] == [(5, 4)]
    assert cache.candidates(index, 100) == [5, 6, 7] and cache.patched == 1
    # A holder list is replaced, never changed in place (readers in other
    # threads keep a consistent list).
    before = index.holders[("socket", 95)]
    cache.patch(index, 6, [(3, ("pipe", 90)), (8, ("socket", 95))])
    assert before == [(5, 4)] and sorted(index.holders[("socket", 95)]) == [(5, 4), (6, 8)]
