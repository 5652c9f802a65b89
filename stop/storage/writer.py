"""One writer thread for a store: calls run there one at a time, in order;
their results come back on the reactor thread.

The thread holds a lock around every call it runs (the call and its
``then``). The owner may run writer work on its own thread instead, when the
writer is idle: :meth:`WriterThread.hold_if_idle` takes that lock without
waiting, so the work done there never overlaps a call of the thread
(:class:`stop.storage.log.LogStore` commits a lone record that way).

Twisted's ThreadPool + deferToThreadPool does the same with more layers
(a team of workers, a Queue with a Condition, context copies); on the hot
path, with one record per batch, those layers cost more CPU than the write
itself (bench/profile notes in docs/storage.rst).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class WriterThread:
    """A single worker thread. ``started`` says whether it runs."""

    def __init__(self, reactor, name: str):
        self._reactor = reactor
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Held by the thread around each call; by the owner while it runs
        # writer work itself (hold_if_idle .. release).
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the calls already queued finish, then end the thread. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def call(self, f: Callable[..., Any], *args: Any,
             then: Optional[Callable[[], None]] = None) -> defer.Deferred:
        """Run ``f(*args)`` in the thread; the Deferred fires (on the
        reactor thread) with its result or its exception.

        :param then: run in the thread right after the result was handed
            to the reactor, before the next call: work that must follow
            ``f`` but need not delay its result. It must not raise (what it
            raises is logged and dropped).
        """
        d: defer.Deferred = defer.Deferred()
        self._queue.put((d, f, args, then))
        return d

    def hold_if_idle(self) -> bool:
        """Take the writer's lock if no call is running or queued, without
        waiting. ``True``: the caller holds it and may run writer work on
        its own thread until it calls :meth:`release`; the thread runs no
        call meanwhile (one it took from the queue just now waits for the
        lock). ``False``: the writer is busy; nothing held."""
        if not self._lock.acquire(blocking=False):
            return False
        if not self._queue.empty():
            self._lock.release()
            return False
        return True

    def release(self) -> None:
        """Give back the lock :meth:`hold_if_idle` took."""
        self._lock.release()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            d, f, args, then = item
            with self._lock:
                try:
                    result = f(*args)
                except BaseException:
                    self._reactor.callFromThread(d.errback, Failure())
                else:
                    self._reactor.callFromThread(d.callback, result)
                if then is not None:
                    try:
                        then()
                    except BaseException:
                        log.failure("{name}: follow-up call failed", name=self._name)
