"""The procfs backend's inode -> (pid, fd) index, kept between walks.

Linux has no map from a pipe or socket inode to the processes holding it:
the only way is to read every ``/proc/PID/fd``, which is most of what an SV
walk costs (``listdir`` + ``readlink`` of every descriptor on the host). So
the index is built once and shared by the walks that follow, as long as it
can be trusted; see ``docs/sv.rst`` ("The shared index") for the rules.
This module holds the data (:class:`FdIndex`) and the thread-safe cache
(:class:`IndexCache`); the validation of each use is in
:mod:`stop.os.linux.procfs`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from typing import Callable, Optional

PROC = "/proc"

#: ("pipe" | "socket", inode): what a descriptor link names.
Key = tuple[str, int]
#: (pid, fd): one descriptor of one process.
Holder = tuple[int, int]


def link_key(target: str) -> Optional[Key]:
    """The key of a ``/proc/PID/fd/N`` link target (``pipe:[123]`` ->
    ``("pipe", 123)``), or None for anything else (files, anon inodes)."""
    if target.startswith("socket:["):
        return ("socket", int(target[8:-1]))
    if target.startswith("pipe:["):
        return ("pipe", int(target[6:-1]))
    return None


def proc_entries() -> frozenset[str]:
    """The names in ``/proc`` now (one ``listdir``): PIDs and fixed files.
    Kept as names, so "is there a new process" is one set difference."""
    return frozenset(os.listdir(PROC))


def last_pid() -> Optional[int]:
    """The PID (or thread id) the kernel handed out last, from
    ``/proc/loadavg``; None when unreadable, or when ``/proc`` is not the
    one of this process's PID namespace (``/proc/loadavg`` speaks of the
    reader's namespace). While it stays the same, no process was started:
    no ``listdir('/proc')`` is needed to know."""
    if not _own_proc():
        return None
    try:
        fd = os.open(f"{PROC}/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.read(fd, 256).rsplit(None, 1)[1])
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return None


def _own_proc(_known: list = []) -> bool:
    """Whether ``/proc/self`` is this process (asked once)."""
    if not _known:
        try:
            _known.append(os.readlink(f"{PROC}/self") == str(os.getpid()))
        except OSError:
            _known.append(False)
    return _known[0]


def pids_of(entries: frozenset[str]) -> list[int]:
    """The PIDs among ``/proc`` entry names, ascending."""
    return sorted(int(e) for e in entries if e.isdigit())


class FdIndex:
    """Who held which pipe or socket inode, per process, as last read.

    ``holders``: key -> (pid, fd) holders (each value is replaced, never
    changed in place, so a walk reading it in another thread sees one
    consistent list); ``entries``: the ``/proc`` names covered, whose PIDs
    are the processes read (found unreadable, or gone); ``built``:
    ``time.monotonic()`` when the full build began (a grown or patched
    index keeps it: :meth:`IndexCache.get`'s max_age counts from the last
    full scan); ``unreadable``: reason -> number of processes whose
    descriptors could not be read; ``complete``: False when the descriptor
    budget cut the build short (such an index is used by its own walk only,
    never shared). ``tables``: pid -> its (fd, key) pairs, and ``uids``:
    pid -> owner of ``/proc/PID`` (the effective uid), for the processes
    read; both are kept when the index is grown or patched (under the
    cache's lock, see :class:`IndexCache`).
    """

    def __init__(self, holders: dict, entries: frozenset, built: float,
                 unreadable: dict, complete: bool, tables: Optional[dict] = None,
                 uids: Optional[dict] = None, unreadable_pids: Optional[dict] = None):
        self.holders: dict[Key, list[Holder]] = holders
        self.entries = entries
        self.built = built
        self.unreadable = unreadable
        self.complete = complete
        self.tables: dict[int, list[tuple[int, Key]]] = tables if tables is not None else {}
        self.uids: dict[int, int] = uids if uids is not None else {}
        #: uid -> its PIDs in ``uids`` (IndexCache.candidates: no pass over
        #: every process of the host for each search).
        self.by_uid: dict[int, set[int]] = defaultdict(set)
        for pid, owner in self.uids.items():
            self.by_uid[owner].add(pid)
        #: pid -> the highest inode in its table (see IndexCache.candidates).
        self.newest: dict[int, int] = {p: max((k[1] for _fd, k in pairs), default=0)
                                       for p, pairs in self.tables.items()}
        #: pid -> why its table could not be read (``unreadable`` counts these).
        self.unreadable_pids: dict[int, str] = unreadable_pids if unreadable_pids is not None else {}

    @classmethod
    def from_tables(cls, tables: dict, uids: dict, unreadable_pids: dict, entries: frozenset,
                    built: float, complete: bool) -> "FdIndex":
        """An index of ``tables`` (pid -> [(fd, key), ...])."""
        holders: dict[Key, list[Holder]] = defaultdict(list)
        for pid, pairs in tables.items():
            for fd, key in pairs:
                holders[key].append((pid, fd))
        return cls(dict(holders), entries, built, _count(unreadable_pids), complete, tables,
                   uids, unreadable_pids)

    def has(self, key: Key, holder: Holder) -> bool:
        """True when the index lists ``holder`` for ``key``."""
        return holder in self.holders.get(key, ())

    def same_table(self, pid: int, pairs: list[tuple[int, Key]]) -> bool:
        """True when the index holds exactly ``pairs`` for ``pid``."""
        return self.tables.get(pid) == pairs

    # -- changes: only through IndexCache (under its lock) ------------------

    def _set_table(self, pid: int, pairs: Optional[list[tuple[int, Key]]],
                   uid: Optional[int] = None) -> None:
        """Replace what the index says ``pid`` holds (None: forget it)."""
        old = self.tables.pop(pid, None) or []
        holders = self.holders
        for fd, key in old:
            left = [h for h in holders.get(key, ()) if h != (pid, fd)]
            if left:
                holders[key] = left
            else:
                holders.pop(key, None)
        if self.unreadable_pids.pop(pid, None) is not None:
            self.unreadable = _count(self.unreadable_pids)
        if pairs is None:
            self._set_uid(pid, None)
            self.newest.pop(pid, None)
            return
        self.tables[pid] = pairs
        self.newest[pid] = max((k[1] for _fd, k in pairs), default=0)
        if uid is not None:
            self._set_uid(pid, uid)
        for fd, key in pairs:
            holders[key] = holders.get(key, []) + [(pid, fd)]


    def _set_uid(self, pid: int, uid: Optional[int]) -> None:
        """``uids[pid] = uid`` (None: forget it), ``by_uid`` in step."""
        old = self.uids.pop(pid, None)
        if old is not None:
            pids = self.by_uid.get(old)
            if pids is not None:
                pids.discard(pid)
                if not pids:
                    del self.by_uid[old]
        if uid is not None:
            self.uids[pid] = uid
            self.by_uid[uid].add(pid)


def _count(unreadable_pids: dict) -> dict[str, int]:
    """reason -> number of processes, from pid -> reason."""
    counts: dict[str, int] = defaultdict(int)
    for why in unreadable_pids.values():
        counts[why] += 1
    return dict(counts)


#: ``read(pid)`` for :meth:`IndexCache.get`: ``(pairs, uid)`` for a process
#: read, a reason (str) for one whose table cannot be read, None when gone.
Reader = Callable[[int], "tuple[list, int] | str | None"]


class IndexCache:
    """The one shared :class:`FdIndex` of an inspector, thread-safe.

    Walks run in parallel threads of the reactor's pool; they all go
    through :meth:`get`, under one lock, so a rebuild happens once and the
    walks that need the index meanwhile wait for it and then use it.

    :param max_age: seconds an index may be reused for (> 0); 0 disables
        reuse: every :meth:`get` builds.
    :param clock: monotonic clock in seconds (tests).
    """

    def __init__(self, max_age: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, not {max_age!r}")
        self.max_age = max_age
        #: How many indexes were built (for tests and the bench).
        self.builds = 0
        #: How many new processes were read into a shared index, and how
        #: many tables were patched (found changed) instead of rebuilding.
        self.added = 0
        self.patched = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._index: Optional[FdIndex] = None
        #: last_pid() when /proc was last listed for a walk (see get).
        self._seen_pid: Optional[int] = None

    def get(self, build: Callable[[frozenset, float], FdIndex],
            not_before: Optional[float] = None,
            read: Optional[Reader] = None) -> tuple[FdIndex, Optional[str], float]:
        """The shared index when it may be reused, else a new one.

        Reused only when it exists, is at most ``max_age`` old, was built
        at or after ``not_before`` (a walk that found it stale asks for a
        newer one) and no process exists now that it did not cover (a new
        process, e.g. a fork that inherited a pipe; with ``read``, ``/proc``
        is listed only when :func:`last_pid` moved). For new processes,
        when ``read`` is given, the shared index is grown instead: only the
        new processes are read into it (and exited ones dropped), which is
        what a rebuild would have found for them; otherwise it is rebuilt.
        (Processes that exited are fine: their entries fail validation.)

        :param build: ``build(entries, started) -> FdIndex`` reads every
            process among ``entries`` (names in ``/proc``); called with the
            lock held.
        :param read: see :data:`Reader`; called with the lock held.
        :return: ``(index, why, age)``: ``why`` is None when the shared
            index was reused (perhaps grown: ``read`` was called), else why
            one was built (``"disabled"``, ``"none"``, ``"expired"``,
            ``"new process"``, ``"stale"``); ``age`` is the time since the
            shared index's full build (0 when built now).
        """
        with self._lock:
            now = self._clock()
            seen = last_pid() if read is not None else None
            index = self._index
            if (seen is not None and seen == self._seen_pid and index is not None
                    and not_before is None and 0 < self.max_age
                    and now - index.built <= self.max_age):
                # No process started since the last look: nothing to list.
                return index, None, now - index.built
            entries = proc_entries()
            why = self._unusable(entries, now, not_before)
            self._seen_pid = seen
            if why == "new process" and read is not None:
                index = self._index
                assert index is not None
                self._grow(index, entries, read)
                return index, None, now - index.built
            if why is None:
                assert self._index is not None
                return self._index, None, now - self._index.built
            index = build(entries, now)
            self.builds += 1
            self._index = index if index.complete and self.max_age > 0 else None
            return index, why, 0.0

    def _grow(self, index: FdIndex, entries: frozenset, read: Reader) -> None:
        """Read the processes in ``entries`` that ``index`` lacks, drop the
        ones that exited."""
        new = sorted(int(e) for e in entries - index.entries if e.isdigit())
        for e in index.entries - entries:
            if e.isdigit():
                index._set_table(int(e), None)
        for pid in new:
            got = read(pid)
            if got is None:
                continue
            if isinstance(got, str):
                index.unreadable_pids[pid] = got
                index.unreadable = _count(index.unreadable_pids)
                continue
            index._set_table(pid, *got)
        index.entries = entries
        self.added += len(new)

    def patch(self, index: FdIndex, pid: int, pairs: list, uid: Optional[int] = None) -> bool:
        """Make ``index`` say that ``pid`` holds exactly ``pairs`` (a walk
        read its table fresh). Only a shared index (or one a walk owns) is
        changed. :return: True when it differed."""
        with self._lock:
            if index.same_table(pid, pairs):
                return False
            index._set_table(pid, pairs, uid if uid is not None else index.uids.get(pid))
            self.patched += 1
            return True

    def candidates(self, index: FdIndex, uid: int) -> list[int]:
        """PIDs of ``index`` whose ``/proc/PID`` belongs to ``uid``, the
        most recently active first: by the newest pipe or socket inode they
        held when last read (inode numbers grow as the kernel hands them
        out), then by PID (newer first)."""
        with self._lock:
            newest = index.newest
            return sorted(index.by_uid.get(uid, ()),
                          key=lambda p: (newest.get(p, 0), p), reverse=True)

    @property
    def current(self) -> Optional[FdIndex]:
        """The index shared now (None when there is none)."""
        return self._index

    def discard(self, index: FdIndex) -> None:
        """Stop sharing ``index`` (a walk found it stale); a newer one that
        another walk put in its place stays."""
        with self._lock:
            if self._index is index:
                self._index = None

    def _unusable(self, entries: frozenset, now: float,
                  not_before: Optional[float]) -> Optional[str]:
        index = self._index
        if self.max_age <= 0:
            return "disabled"
        if index is None:
            return "none"
        if not_before is not None and index.built < not_before:
            return "stale"
        if now - index.built > self.max_age:
            return "expired"
        if any(e.isdigit() for e in entries - index.entries):
            return "new process"
        return None
