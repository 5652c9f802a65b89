"""The chain head of a store in the daemon's log (StoreService): at start,
every head_log_interval seconds, at stop; a writer knows it after close."""

import pytest

from stop.errors import StoreFailed
from stop.storage import make_store
from tests.test_chain import Store


class HeadStore:
    """A chained store as StoreService sees it."""

    name = "flat"

    def __init__(self):
        self.count = 0
        self.recounts = 0

    def open(self):
        self.count = 5

    def head(self):
        return self.count, "ab" * 32

    def recount_usage(self):
        self.recounts += 1

    def close(self):
        from twisted.internet import defer
        self.count += 1  # written while closing
        return defer.succeed(None)


def head_lines(interval, steps):
    """Run a StoreService on a HeadStore with a Clock: ``steps`` is a list
    of (seconds to advance, count the store has then); the log lines that
    give the head, and the store."""
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent, globalLogPublisher
    from stop import tap
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    store = HeadStore()
    try:
        clock = Clock()
        svc = tap.StoreService(store, "/d", interval, clock)
        svc.startService()
        if not interval:
            assert clock.getDelayedCalls() == []
        for seconds, count in steps:
            store.count = count if count is not None else store.count
            clock.advance(seconds)
        svc.stopService()
        clock.advance(600)
    finally:
        globalLogPublisher.removeObserver(observer)
    return [line for line in lines if "chain head" in line], store


def test_head_logged_at_start_every_interval_and_at_stop():
    heads, store = head_lines(60.0, [(60, 7), (59, None), (1, 9)])
    assert [h.split(": ")[1].split(" ")[0] for h in heads] == \
        [f"{n}:{'ab' * 32}" for n in (5, 7, 9, 10)]
    assert "at start" in heads[0] and "every 60 s" in heads[1] and "at stop" in heads[3]
    assert f"stopctl verify --all --head 5:{'ab' * 32}" in heads[0]
    assert store.recounts == 3  # not at stop


def test_head_interval_0_logs_at_start_and_stop_only():
    heads, _ = head_lines(0.0, [(3600, 8)])
    assert [line.split(": ")[0] for line in heads] == \
        ["record store chain head at start", "record store chain head at stop"]


def test_a_writer_knows_its_head_after_close(tmp_path):
    store = Store(tmp_path, "flat")
    s = make_store("flat", store.dir)
    s.open()
    s.close()
    assert s.head() == (store.count, store.chain)
    r = make_store("flat", store.dir, readonly=True)
    with pytest.raises(StoreFailed):
        r.head()  # never opened
