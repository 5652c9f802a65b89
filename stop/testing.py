"""Test doubles shipped with the package, for our tests and for plugin
authors: a socket lookup answering from a table, and a store whose saves
complete when the test says so.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from zope.interface import implementer

from stop.errors import StoreFailed
from stop.interfaces import IRecordStore, ISocketLookup
from stop.model import Connection, Endpoint


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
