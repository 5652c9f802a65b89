"""Test doubles shipped with the package, for our tests and for plugin
authors, one per swappable part: the OS layer's (a socket lookup answering
from a table, accounts and an opt-in answering from dicts, a process table
for the walk), a store whose saves complete when the test says so, and
(appended by their owners) the others'. Each provides its interface; the
tests check them with ``verifyObject``.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from zope.interface import implementer

from stop.errors import ProcessGone, StoreFailed, Unavailable
from stop.interfaces import (IAccounts, IOptIn, IProcessInspector, IProcessScan, IRecordStore,
                             ISocketLookup)
from stop.model import Connection, Endpoint

# -- The OS layer (stop.os) --------------------------------------------------


@implementer(ISocketLookup)
class FakeLookup:
    """Answers from ``connections``; ``calls`` records every question."""

    name = "fake"
    blocking = False

    def __init__(self, *connections: Connection):
        self.connections = list(connections)
        self.calls: list[tuple[Endpoint, Endpoint]] = []
        self.error: Optional[Exception] = None

    def find(self, local: Endpoint, remote: Endpoint) -> Optional[Connection]:
        self.calls.append((local, remote))
        if self.error is not None:
            raise self.error
        for c in self.connections:
            if c.remote == remote and c.local.port == local.port and local.host in ("", c.local.host):
                return c
        return None

    def close(self) -> None:
        pass


@implementer(IAccounts)
class FakeAccounts:
    """uid -> (name, home) from ``table``; (None, None) for other uids.
    Every uid is "cached" unless listed in ``slow``: those are resolved only
    when the test calls :meth:`release` (``pending`` holds them)."""

    def __init__(self, table: Optional[dict] = None, slow=()):
        self.table = dict(table or {})
        self.slow = set(slow)
        self.pending: list[tuple[int, defer.Deferred]] = []

    def cached(self, uid: int):
        return None if uid in self.slow else self.table.get(uid, (None, None))

    def resolve(self, uid: int) -> defer.Deferred:
        if uid not in self.slow:
            return defer.succeed(self.table.get(uid, (None, None)))
        d: defer.Deferred = defer.Deferred()
        self.pending.append((uid, d))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for uid, d in pending:
            d.callback(self.table.get(uid, (None, None)))


@implementer(IOptIn)
class FakeOptIn:
    """Allows exactly the (uid, host) pairs of ``allowed``; ``asked`` lists
    every (uid, host) asked about."""

    def __init__(self, allowed=()):
        self.allowed = set(allowed)
        self.asked: list[tuple[int, str]] = []

    def allows(self, uid: int, home: str, host: str) -> defer.Deferred:
        self.asked.append((uid, host))
        return defer.succeed((uid, host) in self.allowed)


@implementer(IProcessScan)
class TableScan:
    """A walk's view of an in-memory process table: ``table`` is
    {pid: (ppid, [descriptor dicts])}, ``links`` {(pid, fd): [(pid, fd)]}
    (the peers), ``holders`` the PIDs holding any queried socket; PIDs in
    ``gone`` exited, those in ``denied`` have unreadable descriptors.
    ``read`` lists the PIDs whose process was read, in order."""

    def __init__(self, table: dict, links: dict, holders: list, gone=(), denied=()):
        self.table, self.links, self._holders = table, links, holders
        self.gone, self.denied = set(gone), set(denied)
        self.truncated = False
        self.unavailable: dict = {}
        self.read: list[int] = []

    def holders(self, connection):
        return self._holders

    def process(self, pid, fields):
        self.read.append(pid)
        if pid in self.gone or pid not in self.table:
            raise ProcessGone(pid)
        out = {"pid": pid, "ppid": self.table[pid][0]}
        if "name" in fields:
            out["name"] = f"p{pid}"
        if "users" in fields:
            out["users"] = {"real": f"u{pid}", "effective": f"u{pid}"}
        return out

    def descriptors(self, pid, open_files):
        if pid in self.denied:
            raise Unavailable("EACCES")
        return [dict(d) for d in self.table[pid][1]
                if open_files or d["kind"] != "file"]

    def peers(self, pid, descriptor):
        return sorted(self.links.get((pid, descriptor["fd"]), []))

    def close(self):
        pass


@implementer(IProcessInspector)
class TableInspector:
    """Hands out one :class:`TableScan`; ``max_fds`` is the budget the
    last walk asked for."""

    name = "table"

    def __init__(self, scan: TableScan):
        self.scan = scan
        self.max_fds = None

    def begin(self, max_fds):
        self.max_fds = max_fds
        return self.scan


class FakeProcessState:
    """Stands in for :class:`stop.sv.ProcessState` (the SV walk as the
    answerer and recursion see it): ``collect`` fires with a one-process walk
    whose ``remote_connections`` are ``remote`` (dicts shaped as
    :class:`stop.interfaces.IProcessScan` describes); ``hold`` keeps the
    Deferreds until :meth:`release`; ``fail`` makes every walk fail."""

    def __init__(self, remote=(), hold=False, fail=False):
        self.remote = list(remote)
        self.hold = hold
        self.fail = fail
        self.calls = []
        self.held = []

    def state(self):
        return {"processes": {"start": [10], "processes": [{"pid": 10, "ppid": 1}],
                              "users": ["alice"], "remote_connections": self.remote},
                "system": {"hostname": "h1"}}

    def collect(self, conn):
        self.calls.append(conn)
        if self.fail:
            return defer.fail(RuntimeError("walk exploded"))
        if self.hold:
            d = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(self.state())

    def release(self):
        held, self.held = self.held, []
        for d in held:
            d.callback(self.state())


class ManualClock:
    """A monotonic clock for code that takes ``clock: () -> seconds``
    (e.g. :class:`stop.os.linux.fdindex.IndexCache`): it reads ``now``,
    which the test moves."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- Storage -------------------------------------------------------------------


@implementer(IRecordStore)
class HeldStore:
    """A store whose ``save`` and ``save_linked`` Deferreds fire only when
    the test calls :meth:`complete` (or :meth:`fail`), to observe "reply
    after durable". Saves wait in ``pending``, linked entries in
    ``pending_linked`` (both ``(token, bytes, Deferred)``); completed ones
    are in ``saved`` and ``saved_linked`` (token -> list of entries)."""

    name = "held"

    def __init__(self):
        self.saved: dict[str, bytes] = {}
        self.saved_linked: dict[str, list[bytes]] = {}
        self.pending: list[tuple[str, bytes, defer.Deferred]] = []
        self.pending_linked: list[tuple[str, bytes, defer.Deferred]] = []
        self.bytes_used = 0
        self.auto = False  # True: complete every save at once

    def open(self) -> None:
        pass

    def save(self, token: str, record: bytes) -> defer.Deferred:
        return self._hold(self.pending, token, record)

    def save_linked(self, token: str, entry: bytes) -> defer.Deferred:
        return self._hold(self.pending_linked, token, entry)

    def _hold(self, queue: list, token: str, data: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        queue.append((token, data, d))
        if self.auto:
            self.complete()
        return d

    def complete(self) -> None:
        """Make every pending save durable (records first), firing their
        Deferreds; a linked entry whose token has no record fails."""
        pending, self.pending = self.pending, []
        linked, self.pending_linked = self.pending_linked, []
        for token, record, d in pending:
            self.saved[token] = record
            self.bytes_used += len(record)
            d.callback(None)
        for token, entry, d in linked:
            if token not in self.saved:
                d.errback(StoreFailed(f"no record for token {token}"))
                continue
            self.saved_linked.setdefault(token, []).append(entry)
            self.bytes_used += len(entry)
            d.callback(None)

    def fail(self, why: str = "disk full") -> None:
        pending, self.pending = self.pending, []
        linked, self.pending_linked = self.pending_linked, []
        for _, _, d in pending + linked:
            d.errback(StoreFailed(why))

    def linked(self, token: str) -> list[bytes]:
        return list(self.saved_linked.get(token, ()))

    def get(self, token: str) -> Optional[bytes]:
        return self.saved.get(token)

    def integrity(self, token: str) -> bool:
        return token in self.saved

    def records(self):
        return iter(list(self.saved.items()))

    def usage(self) -> int:
        return self.bytes_used

    def close(self) -> defer.Deferred:
        return defer.succeed(None)


# -- Recursion (appended by rec) -------------------------------------------

from stop.client import Outcome  # noqa: E402 (kept with the fake that uses it)
from stop.interfaces import IRecursiveClient  # noqa: E402


@implementer(IRecursiveClient)
class FakeRecursiveClient:
    """An :class:`IRecursiveClient` that asks no one: ``asked`` lists every
    ``(target, local, request)``; each question's Deferred fires with
    ``outcomes[target]`` (an :class:`stop.client.Outcome`, by target
    Endpoint) at once, or, for targets not in ``outcomes``, when the test
    calls :meth:`answer` (``pending`` holds them)."""

    def __init__(self, outcomes=None):
        self.outcomes = dict(outcomes or {})
        self.asked: list = []
        self.pending: list = []
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def ask(self, target, local, request) -> defer.Deferred:
        self.asked.append((target, local, request))
        if target in self.outcomes:
            return defer.succeed(self.outcomes[target])
        d: defer.Deferred = defer.Deferred()
        self.pending.append((target, d))
        return d

    def answer(self, outcome: Outcome, target=None) -> None:
        """Fire the pending questions (to ``target``, or all) with ``outcome``."""
        keep = []
        for t, d in self.pending:
            if target is None or t == target:
                d.callback(outcome)
            else:
                keep.append((t, d))
        self.pending = keep

    def close(self) -> defer.Deferred:
        self.closed = True
        self.answer(Outcome("failed", why="stopping"))
        return defer.succeed(None)
