"""The chain head of a store in the daemon's log (StoreService): at start,
every head_log_interval seconds, at stop; a writer knows it after close."""

import pytest

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


def test_head_logged_at_start_every_interval_and_at_stop():
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent, globalLogPublisher
    from stop import tap
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        clock = Clock()
        store = HeadStore()
        svc = tap.StoreService(store, "/d", 60.0, clock)
        svc.startService()
        store.count = 7
        clock.advance(60)
        clock.advance(59)
        store.count = 9
        clock.advance(1)
        svc.stopService()
        clock.advance(600)
    finally:
        globalLogPublisher.removeObserver(observer)
    heads = [line for line in lines if "chain head" in line]
    assert [h.split(": ")[1].split(" ")[0] for h in heads] == \
        [f"{n}:{'ab' * 32}" for n in (5, 7, 9, 10)]
    assert "at start" in heads[0] and "every 60 s" in heads[1] and "at stop" in heads[3]
    assert f"stopctl verify --all --head 5:{'ab' * 32}" in heads[0]
    assert store.recounts == 3  # not at stop


def test_head_interval_0_logs_at_start_and_stop_only():
    from twisted.internet.task import Clock
    from stop import tap
    clock = Clock()
    store = HeadStore()
    svc = tap.StoreService(store, "/d", 0.0, clock)
    svc.startService()
    assert clock.getDelayedCalls() == []
    svc.stopService()


def test_a_writer_knows_its_head_after_close(tmp_path):
    store = Store(tmp_path, "flat")
    s = make_store("flat", store.dir)
    s.open()
    s.close()
    assert s.head() == (store.count, store.chain)
    r = make_store("flat", store.dir, readonly=True)
    with pytest.raises(Exception):
        r.head()  # never opened
