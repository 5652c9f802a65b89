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
from dataclasses import dataclass
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


def pids_of(entries: frozenset[str]) -> list[int]:
    """The PIDs among ``/proc`` entry names, ascending."""
    return sorted(int(e) for e in entries if e.isdigit())


@dataclass(frozen=True)
class FdIndex:
    """Who held which pipe or socket inode when the index was built.

    ``holders``: key -> list of (pid, fd) (never mutated once built);
    ``entries``: the ``/proc`` names listed for the build; its PIDs are the
    processes it covered (read, found unreadable, or gone);
    ``built``: ``time.monotonic()`` when the build began; ``unreadable``:
    reason -> number of processes whose descriptors could not be read;
    ``complete``: False when the descriptor budget cut the build short
    (such an index is used by its own walk only, never shared).
    """

    holders: dict[Key, list[Holder]]
    entries: frozenset[str]
    built: float
    unreadable: dict[str, int]
    complete: bool

    def has(self, key: Key, holder: Holder) -> bool:
        """True when the index lists ``holder`` for ``key``."""
        return holder in self.holders.get(key, ())


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
        self._clock = clock
        self._lock = threading.Lock()
        self._index: Optional[FdIndex] = None

    def get(self, build: Callable[[frozenset, float], FdIndex],
            not_before: Optional[float] = None) -> tuple[FdIndex, Optional[str], float]:
        """The shared index when it may be reused, else a new one.

        Reused only when it exists, is at most ``max_age`` old, was built
        at or after ``not_before`` (a walk that found it stale asks for a
        newer one) and no process exists now that it did not cover (a new
        process, e.g. a fork that inherited a pipe, forces a rebuild;
        processes that exited are fine: their entries fail validation).

        :param build: ``build(entries, started) -> FdIndex`` reads every
            process among ``entries`` (names in ``/proc``); called with the
            lock held.
        :return: ``(index, why, age)``: ``why`` is None when the shared
            index was reused, else why one was built (``"disabled"``,
            ``"none"``, ``"expired"``, ``"new process"``, ``"stale"``);
            ``age`` is the reused index's age in seconds (0 when built).
        """
        with self._lock:
            entries = proc_entries()
            now = self._clock()
            why = self._unusable(entries, now, not_before)
            if why is None:
                assert self._index is not None
                return self._index, None, now - self._index.built
            index = build(entries, now)
            self.builds += 1
            self._index = index if index.complete and self.max_age > 0 else None
            return index, why, 0.0

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
