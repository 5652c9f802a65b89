"""stop.storage.writer: one thread, calls in order, results on the reactor."""

import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from stop.storage.writer import WriterThread


class WriterThreadTests(unittest.TestCase):
    def setUp(self):
        self.w = WriterThread(reactor, "test-writer")
        self.w.start()
        self.addCleanup(self.w.stop)

    @defer.inlineCallbacks
    def test_calls_run_in_order_in_one_other_thread(self):
        seen = []
        ds = [self.w.call(lambda i=i: seen.append((i, threading.get_ident())) or i)
              for i in range(50)]
        results = yield defer.gatherResults(ds)
        self.assertEqual(results, list(range(50)))
        self.assertEqual([i for i, _ in seen], list(range(50)))
        self.assertEqual(len({t for _, t in seen}), 1)
        self.assertNotEqual(seen[0][1], threading.get_ident())

    @defer.inlineCallbacks
    def test_exception_is_a_failure_and_the_thread_goes_on(self):
        d = self.w.call(lambda: 1 / 0)
        yield self.assertFailure(d, ZeroDivisionError)
        self.assertEqual((yield self.w.call(lambda: "still here")), "still here")

    def test_stop_finishes_queued_calls_and_is_idempotent(self):
        gate = threading.Event()
        done = []
        self.w.call(gate.wait)
        self.w.call(lambda: done.append(1))
        gate.set()
        self.w.stop()
        self.w.stop()
        self.assertEqual(done, [1])
        self.assertFalse(self.w.started)

    @defer.inlineCallbacks
    def test_then_runs_after_the_result_and_before_the_next_call(self):
        seen = []
        first = self.w.call(lambda: seen.append("f") or 1, then=lambda: seen.append("then"))
        second = self.w.call(lambda: seen.append("next"))
        self.assertEqual((yield first), 1)
        yield second
        self.assertEqual(seen, ["f", "then", "next"])

    @defer.inlineCallbacks
    def test_a_failing_then_is_logged_and_the_thread_goes_on(self):
        d = self.w.call(lambda: "ok", then=lambda: 1 / 0)
        self.assertEqual((yield d), "ok")
        self.assertEqual((yield self.w.call(lambda: "still here")), "still here")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @defer.inlineCallbacks
    def test_hold_if_idle_only_when_nothing_runs_or_waits(self):
        """hold_if_idle: False while a call runs or is queued; True when
        idle, and then the thread runs no call until release."""
        gate = threading.Event()
        self.addCleanup(gate.set)
        running = self.w.call(gate.wait, 10)
        queued = self.w.call(lambda: "queued")
        self.assertFalse(self.w.hold_if_idle())  # a call runs (or waits for the thread)
        gate.set()
        yield running
        yield queued
        for _ in range(1000):  # bounded: 1 s; the thread leaves its last call
            if not self.w._lock.locked():
                break
            threading.Event().wait(0.001)
        self.assertTrue(self.w.hold_if_idle())
        ran = threading.Event()
        later = self.w.call(ran.set)
        self.assertFalse(ran.wait(0.2))  # held: the thread waits
        self.w.release()
        yield later
        self.assertTrue(ran.is_set())
        self.assertTrue(self.w.hold_if_idle())
        self.w.release()

    def test_hold_if_idle_refuses_while_a_call_is_queued(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.w.call(gate.wait, 10)
        for _ in range(1000):  # bounded: 1 s; until the thread runs the first call
            if self.w._lock.locked():
                break
            threading.Event().wait(0.001)
        self.assertFalse(self.w.hold_if_idle())
        # The lock alone would be free between calls: the queue still says busy.
        self.w._lock.release()
        try:
            self.w.call(lambda: None)
            self.assertFalse(self.w.hold_if_idle())
        finally:
            self.w._lock.acquire()
