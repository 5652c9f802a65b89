"""Budgets shared by the server: a concurrency gate with a bounded queue."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer

from stop.errors import Overloaded


class Gate:
    """Runs at most ``active`` calls at once, queues at most ``queue`` more,
    and refuses the rest at once with :class:`Overloaded`.

    (Twisted's DeferredSemaphore would queue without bound, and costs two
    more Deferreds per call on the hot path.)
    """

    def __init__(self, active: int, queue: int):
        self._limit = active
        self._queue = queue
        self._running = 0
        self._waiting: deque = deque()
        self._pumping = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Call ``f`` (which may return a Deferred) when a place is free.

        :return: a Deferred with ``f``'s result (or its exception); fails
            with Overloaded when the queue is full (``f`` is then never called).
        """
        if self._running < self._limit:
            return self._start(f, args, kwargs)
        if len(self._waiting) >= self._queue:
            return defer.fail(Overloaded("lookup queue full"))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((d, f, args, kwargs))
        return d

    def resize(self, active: int, queue: int) -> None:
        """New limits (a reload). More room starts waiting calls at once;
        less lets the calls already running or waiting finish."""
        self._limit = active
        self._queue = queue
        self._pump()

    def _start(self, f, args, kwargs) -> defer.Deferred:
        # defer.maybeDeferred, without its checks for coroutines and
        # generators (f is ours: it returns a value or a Deferred), which
        # cost a few microseconds on every query.
        self._running += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return defer.fail().addBoth(self._release)
        if isinstance(result, defer.Deferred):
            return result.addBoth(self._release)
        return defer.succeed(self._release(result))

    def _release(self, result):
        self._running -= 1
        if self._waiting:
            self._pump()
        return result

    def _pump(self) -> None:
        # A loop, not recursion: queued calls that finish at once would
        # otherwise nest one stack frame deeper each.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._waiting and self._running < self._limit:
                d, f, args, kwargs = self._waiting.popleft()
                self._start(f, args, kwargs).chainDeferred(d)
        finally:
            self._pumping = False
