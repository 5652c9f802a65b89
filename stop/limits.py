"""Budgets shared by the server: a concurrency gate with a bounded queue."""

from __future__ import annotations

from collections import deque
from typing import Optional

from twisted.internet import defer

from stop.errors import Overloaded


class Gate:
    """At most ``active`` holders of a place at once, at most ``queue``
    more waiting for one (in order); the rest are refused at once with
    :class:`Overloaded`.

    A caller takes a place with :meth:`enter` and gives it back with
    :meth:`leave`. The common case, a free place, costs a comparison and
    no Deferred: this is on every query's path. (Twisted's
    DeferredSemaphore would queue without bound, and costs two more
    Deferreds per call.)
    """

    def __init__(self, active: int, queue: int):
        self._limit = active
        self._queue = queue
        self._running = 0
        self._waiting: deque[defer.Deferred] = deque()
        self._pumping = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def enter(self) -> Optional[defer.Deferred]:
        """Take a place.

        :return: ``None`` when the place is taken now; else a Deferred that
            fires (``None``) once a place is taken for the caller, in the
            order of the callers, or that has failed with Overloaded when
            the queue is full (no place is taken then). Whoever got a place
            calls :meth:`leave` exactly once.
        """
        if self._running < self._limit:
            self._running += 1
            return None
        if len(self._waiting) >= self._queue:
            return defer.fail(Overloaded("lookup queue full"))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def leave(self) -> None:
        """Give back a place taken by :meth:`enter`; the first waiting
        caller takes it."""
        self._running -= 1
        if self._waiting:
            self._pump()

    def resize(self, active: int, queue: int) -> None:
        """New limits (a reload). More room lets waiting callers in at once;
        less lets the holders and the waiting callers finish."""
        self._limit = active
        self._queue = queue
        self._pump()

    def _pump(self) -> None:
        # A loop, not recursion: callers that leave as soon as they are let
        # in would otherwise nest one stack frame deeper each.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._waiting and self._running < self._limit:
                self._running += 1
                self._waiting.popleft().callback(None)
        finally:
            self._pumping = False
