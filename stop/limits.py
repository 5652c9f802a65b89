"""Budgets shared by the server: a concurrency gate with a bounded queue."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from stop.errors import Overloaded


class Gate:
    """Runs at most ``active`` calls at once, queues at most ``queue`` more,
    and refuses the rest at once with :class:`Overloaded`.

    Twisted's DeferredSemaphore alone would queue without bound.
    """

    def __init__(self, active: int, queue: int):
        self._sem = defer.DeferredSemaphore(active)
        self._queue = queue

    @property
    def waiting(self) -> int:
        return len(self._sem.waiting)

    @property
    def running(self) -> int:
        return self._sem.limit - self._sem.tokens

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Call ``f`` (which may return a Deferred) when a place is free.

        :return: a Deferred with ``f``'s result; fails with Overloaded when
            the queue is full (``f`` is then never called).
        """
        if self._sem.tokens == 0 and len(self._sem.waiting) >= self._queue:
            return defer.fail(Overloaded("lookup queue full"))
        return self._sem.run(f, *args, **kwargs)
