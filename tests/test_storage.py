"""Tests for stop.storage: the memory, flat and gzip record stores.

The disk stores run for real (files, fdatasync, the worker thread, the real
reactor through trial's TestCase); fdatasync and pwrite are observed or
failed through the module-level names of stop.storage.log.
"""

from __future__ import annotations

import errno
import hashlib
import sqlite3
import gzip as stdlib_gzip
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from stop.errors import ConfigError, StoreFailed
from stop.interfaces import IRecordStore
from stop.storage import STORES, make_store
from stop.storage import log as storelog
from stop.storage.flat import FlatStore
from stop.storage.gzip import GzipCodec, GzipStore
from stop.storage.chain import verify_all
from stop.storage.entries import PREALLOC_BYTES, segment_end
from stop.storage.log import GENESIS, BadEntry, Codec, chain_next, format_entry, parse_entry
from stop.storage.memory import MemoryStore


def canonical(obj) -> bytes:
    """Canonical JSON as stop.records makes it (sort_keys, compact, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
json_records = st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(canonical)
unicode_records = st.text(min_size=0, max_size=200).map(canonical)
tokens = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)

TRICKY = [
    canonical({}),
    canonical({"line": "a\nb\r\nc", "sep": "\u2028\u2029", "nul": "\x00"}),
    canonical({"user": "Jürgen Ŝmith 漢字 🦊", "space": "a b  c"}),
    canonical({"big": "x" * 200_000}),
    canonical({"n": [1, 2.5, -3e300, None, True]}),
]


def format_line(token: str, record: bytes, seq: int = 1, prev: str = GENESIS, kind: str = "R") -> bytes:
    """The uncompressed entry line of a record (or linked entry)."""
    return format_entry(kind, seq, token, record, prev)[0]


def lines_of(items, kinds=None) -> bytes:
    """The lines a fresh store holds after saving ``items`` in order."""
    out, prev = [], GENESIS
    for seq, (token, record) in enumerate(items, 1):
        line, prev = format_entry((kinds or {}).get(seq, "R"), seq, token, record, prev)
        out.append(line)
    return b"".join(out)


def indexed(store) -> defer.Deferred:
    """Fires once the writer thread put every batch so far into the index
    (it does that every INDEX_ROWS rows or INDEX_DELAY seconds)."""
    return store._pool.call(store._index_commit)


def entries_end(path: str) -> int:
    """Where the entries of the segment at ``path`` end: a flat store's
    current segment has room preallocated after them (NUL bytes)."""
    return segment_end(GzipCodec() if path.endswith(".gz") else Codec(), path)


def disk_bytes(store) -> int:
    """The bytes under records/, a segment's up to the end of its entries
    (usage() does not count the room preallocated after them)."""
    return sum(entries_end(p) if os.path.basename(p).startswith("seg-") else os.path.getsize(p)
               for p in (os.path.join(store.records_dir, n) for n in os.listdir(store.records_dir)))


def segment_files(store) -> list[str]:
    return sorted(os.path.join(store.records_dir, n) for n in os.listdir(store.records_dir) if n.startswith("seg-"))


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class TempDirMixin:
    def tempdir(self) -> str:
        """A fresh 0700 directory, removed after the test (not trial's
        mktemp: that writes under the current directory)."""
        path = tempfile.mkdtemp(prefix="stop-storage-")
        self.addCleanup(shutil.rmtree, path, True)
        return path


class LogStoreTests(TempDirMixin):
    """Every test here runs for each disk store (subclasses set ``cls``)."""

    cls = FlatStore

    def make(self, data_dir=None, **kw):
        """An opened store, closed after the test."""
        data_dir = data_dir or os.path.join(self.tempdir(), "data")
        store = self.cls(data_dir, reactor=reactor, **kw)
        store.open()
        self.addCleanup(store.close)
        self.opened = getattr(self, "opened", []) + [store]
        return store

    def reopen(self, store, **kw):
        return self.make(store.data_dir, **kw)

    @defer.inlineCallbacks
    def save_all(self, store, items):
        yield defer.gatherResults([store.save(t, r) for t, r in items], consumeErrors=True)

    def spy_fdatasync(self, hold=None):
        """Record (thread, fd path, size) per fdatasync; optionally hold the
        first call until ``hold`` (threading.Event) is set."""
        calls = []
        real = storelog.fdatasync

        def spy(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            calls.append((threading.current_thread(), path, entries_end(path)))
            if hold is not None and len(calls) == 1:
                hold.wait(10)
            real(fd)
        self.patch(storelog, "fdatasync", spy)
        return calls

    def fail_next_write(self, code: int, half: bool = False):
        """The next pwrite fails with ``code`` (after writing half its
        bytes when ``half``); later ones work."""
        real = storelog.pwrite
        failures = [OSError(code, os.strerror(code))]

        def broken(fd, data, offset):
            if failures:
                if half:
                    real(fd, bytes(data[:len(data) // 2]), offset)
                raise failures.pop()
            return real(fd, data, offset)
        self.patch(storelog, "pwrite", broken)

    def flip_in_entry(self, loc, marker: bytes) -> None:
        """Flip one bit inside the stored entry at ``loc``: in the bytes
        ``marker`` of a flat entry, in the deflate data of a gzip one."""
        seg, start, length = loc
        path = segment_files(self.opened[-1])[seg - 1]
        with open(path, "r+b") as f:
            raw = bytearray(f.read())
            pos = raw.index(marker, start) if self.cls is FlatStore else start + 15
            raw[pos] ^= 0x01
            f.seek(0)
            f.write(bytes(raw))

    def test_verify_object(self):
        store = self.make()
        self.assertTrue(verifyObject(IRecordStore, store))
        self.assertEqual(store.name, {FlatStore: "flat", GzipStore: "gzip"}[self.cls])
        self.assertIsInstance(make_store(store.name, store.data_dir), self.cls)

    @defer.inlineCallbacks
    def test_save_get_exact_bytes_and_reopen(self):
        store = self.make()
        items = [(f"tok{i}", rec) for i, rec in enumerate(TRICKY)]
        yield self.save_all(store, items)
        for token, record in items:
            self.assertEqual(store.get(token), record)
        self.assertIsNone(store.get("nope"))
        self.assertEqual(list(store.records()), items)
        yield store.close()
        again = self.reopen(store)
        self.assertEqual(list(again.records()), items)
        self.assertEqual(again.get("tok3"), TRICKY[3])

    def test_hypothesis_roundtrip(self):
        """Arbitrary canonical JSON and unicode, saved through the real
        reactor and worker thread (hypothesis runs in a thread and blocks on
        each save), read back byte for byte, then again after reopening."""
        store = self.make()
        saved = {}

        @settings(max_examples=60, deadline=None, database=None)
        @given(record=json_records | unicode_records)
        def check(record):
            token = f"h{len(saved)}"
            threads.blockingCallFromThread(reactor, store.save, token, record)
            saved[token] = record
            self.assertEqual(threads.blockingCallFromThread(reactor, store.get, token), record)

        d = threads.deferToThread(check)

        @d.addCallback
        def reopened(_):
            d2 = store.close()
            d2.addCallback(lambda _: self.reopen(store))
            d2.addCallback(lambda again: self.assertEqual(dict(again.records()), saved))
            return d2
        return d

    @defer.inlineCallbacks
    def test_fires_only_after_fdatasync(self):
        calls = self.spy_fdatasync()
        store = self.make()
        fired = []
        ds = []
        for i in range(30):
            token = f"t{i}"
            d = store.save(token, canonical({"i": i}))
            # When it fires, a sync of its segment must already cover it.
            d.addCallback(lambda _, token=token: fired.append((token, list(calls))))
            ds.append(d)
        yield defer.gatherResults(ds)
        self.assertEqual(len(fired), 30)
        main = threading.current_thread()
        for token, syncs_before in fired:
            seg, off, length = store.locate("R", token)[0]
            path = os.path.realpath(store._seg_path(seg))
            self.assertTrue(any(p == path and size >= off + length for _, p, size in syncs_before),
                            (token, syncs_before))
        self.assertTrue(calls)
        self.assertTrue(all(thread is not main for thread, _, _ in calls))

    @defer.inlineCallbacks
    def test_group_commit(self):
        """50 saves in one reactor turn while the first batch is held in its
        fdatasync: the first batch has one record, the other 49 go together
        in the next batch: two fdatasync calls in all."""
        hold = threading.Event()
        calls = self.spy_fdatasync(hold)
        store = self.make()
        ds = [store.save(f"g{i}", canonical({"i": i, "pad": "p" * 250})) for i in range(50)]
        self.addCleanup(hold.set)  # never leave the worker blocked
        release = reactor.callLater(0.05, hold.set)
        self.addCleanup(lambda: release.active() and release.cancel())
        yield defer.gatherResults(ds)
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[-1][2], entries_end(segment_files(store)[0]))
        self.assertEqual(len(list(store.records())), 50)

    @defer.inlineCallbacks
    def test_saves_of_one_turn_are_one_batch(self):
        """A client alone (saves wait for the end of their turn), then 50
        saves in one reactor turn: one batch, in the worker: one
        fdatasync."""
        calls = self.spy_fdatasync()
        store = self.make()
        yield self.alone(store)
        n = len(calls)
        yield deferLater(reactor, 0, lambda: None)
        yield self.save_all(store, [(f"t{i}", canonical({"i": i})) for i in range(50)])
        self.assertEqual(len(calls), n + 1)
        self.assertIsNot(calls[-1][0], threading.current_thread())
        self.assertEqual(len(list(store.records())), 50 + storelog.INLINE_AFTER)

    @defer.inlineCallbacks
    def test_fsync_always(self):
        calls = self.spy_fdatasync()
        store = self.make(fsync="always")
        yield self.save_all(store, [(f"a{i}", canonical({"i": i})) for i in range(10)])
        self.assertEqual(len(calls), 10)
        self.assertEqual(sorted(size for _, _, size in calls), [size for _, _, size in calls])

    @defer.inlineCallbacks
    def test_fsync_never(self):
        calls = self.spy_fdatasync()
        store = self.make(fsync="never")
        items = [(f"n{i}", canonical({"i": i})) for i in range(10)]
        yield self.save_all(store, items)
        self.assertEqual(calls, [])
        yield store.close()
        self.assertEqual(list(self.reopen(store).records()), items)

    # -- who commits: the worker, or the reactor thread inline -----------

    @defer.inlineCallbacks
    def lone(self, store, token, record=b"{}"):
        """Save ``record`` alone in a reactor turn (as a query of a client
        alone: it comes in a turn after the reply to the one before), then
        wait until the worker is idle (it may still run the index
        follow-up of a batch when the batch's Deferreds fire)."""
        yield deferLater(reactor, 0, lambda: None)
        yield store.save(token, record)
        for _ in range(1000):  # bounded: about 1 s
            yield deferLater(reactor, 0, lambda: None)  # (and out of the save's callbacks)
            if not store._pool._lock.locked() and store._pool._queue.empty():
                break
            yield deferLater(reactor, 0.001, lambda: None)

    @defer.inlineCallbacks
    def alone(self, store, prefix="w"):
        """Save INLINE_AFTER records one after the other, each alone (one
        client alone): the store then commits a lone save inline."""
        for i in range(storelog.INLINE_AFTER):
            yield self.lone(store, f"{prefix}{i}", canonical({"i": i}))

    def busy_writer(self, store, wrap=lambda f: f):
        """Keep the worker busy (in a call, its queue empty) until the
        returned Event is set (always set at cleanup); ``wrap`` wraps the
        call the worker runs meanwhile."""
        gate, started = threading.Event(), threading.Event()
        self.addCleanup(gate.set)
        store._pool.call(wrap(lambda: started.set() or gate.wait(10)))
        self.assertTrue(started.wait(10))
        return gate

    @defer.inlineCallbacks
    def test_lone_save_is_committed_inline_and_fires_after_fdatasync(self):
        """One client alone: its first saves go to the worker; once
        INLINE_AFTER lone batches came in a row, a lone save is written and
        fdatasync'ed on the reactor thread, and its Deferred fires only
        after that fdatasync covered it."""
        calls = self.spy_fdatasync()
        store = self.make()
        main = threading.current_thread()
        yield self.lone(store, "first")
        self.assertIsNot(calls[0][0], main)  # no streak yet: the worker
        yield self.alone(store)
        fired = []
        d = store.save("lone", canonical({"x": 1}))
        d.addCallback(lambda _: fired.append(list(calls)))
        self.assertEqual(fired, [])  # not before the end of the turn
        yield d
        seg, off, length = store.locate("R", "lone")[0]
        path = os.path.realpath(store._seg_path(seg))
        thread, synced, size = fired[0][-1]
        self.assertIs(thread, main)
        self.assertEqual((synced, size), (path, off + length))
        self.assertEqual(store.get("lone"), canonical({"x": 1}))

    @defer.inlineCallbacks
    def test_a_lone_save_goes_to_a_busy_worker_and_in_flight_saves_follow_together(self):
        """The worker busy (a call running): a lone save is not committed
        inline but queued to the worker; saves that arrive while that batch
        is in flight go together as the next batch, in the worker too."""
        calls = self.spy_fdatasync()
        store = self.make()
        yield self.alone(store)
        gate = self.busy_writer(store)
        first = store.save("b0", b"{}")
        yield deferLater(reactor, 0.02, lambda: None)  # its turn ended: queued
        self.assertEqual(calls[storelog.INLINE_AFTER:], [])
        self.assertNoResult(first)
        rest = []
        for i in range(1, 6):
            rest.append(store.save(f"b{i}", b"{}"))
            yield deferLater(reactor, 0, lambda: None)
        gate.set()
        yield defer.gatherResults([first] + rest)
        new = calls[storelog.INLINE_AFTER:]
        self.assertEqual(len(new), 2)  # b0 alone, then b1..b5 in one batch
        main = threading.current_thread()
        self.assertTrue(all(thread is not main for thread, _, _ in new))
        self.assertEqual([t for t, _ in store.records()][-6:], [f"b{i}" for i in range(6)])

    @defer.inlineCallbacks
    def test_several_clients_keep_the_worker(self):
        """Lone batches between batches of several entries (a load of
        several clients): no inline commit until INLINE_AFTER lone batches
        came in a row again."""
        calls = self.spy_fdatasync()
        store = self.make()
        main = threading.current_thread()
        yield self.alone(store)
        yield self.lone(store, "w-inline")
        self.assertIs(calls[-1][0], main)
        yield self.save_all(store, [("p0", b"{}"), ("p1", b"{}")])
        for i in range(storelog.INLINE_AFTER):
            yield self.lone(store, f"q{i}")
        self.assertTrue(all(thread is not main for thread, _, _ in calls[-storelog.INLINE_AFTER:]))
        yield self.lone(store, "q-last")
        self.assertIs(calls[-1][0], main)

    @defer.inlineCallbacks
    def test_inline_failure_fails_that_save_and_the_next_works(self):
        """An OSError in an inline commit: that save fails with StoreFailed
        (logged), the torn bytes are cut back, and the next lone save is
        stored inline."""
        calls = self.spy_fdatasync()
        store = self.make()
        yield self.alone(store)
        seg = segment_files(store)[0]
        size = entries_end(seg)
        self.fail_next_write(errno.ENOSPC, half=True)
        errors = []
        observer = lambda event: event.get("log_level") == LogLevel.error and errors.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        err = yield self.assertFailure(store.save("lost", b'{"a":2}'), StoreFailed)
        self.assertIn("No space left on device", str(err))
        self.assertTrue(any("not stored" in e and "No space left" in e for e in errors), errors)
        self.assertEqual(entries_end(seg), size)
        n = len(calls)
        yield self.lone(store, "after", b'{"a":3}')
        self.assertEqual(len(calls), n + 1)
        self.assertIs(calls[-1][0], threading.current_thread())
        yield store.close()
        self.assertEqual([t for t, _ in self.reopen(store).records()][-1:], ["after"])

    @defer.inlineCallbacks
    def test_an_index_to_catch_up_sends_the_next_batch_to_the_worker(self):
        """An inline commit whose index write fails: that save fails; the
        next lone save goes to the worker, which catches the index up
        first (that can take long: never on the reactor thread)."""
        calls = self.spy_fdatasync()
        store = self.make()
        main = threading.current_thread()
        yield self.alone(store)
        real = store._wix.add_record
        broken = [sqlite3.OperationalError("disk I/O error")]

        def add_record(row):
            if broken:
                raise broken.pop()
            return real(row)
        store._wix.add_record = add_record
        n = len(calls)
        yield deferLater(reactor, 0, lambda: None)
        yield self.assertFailure(store.save("f1", b"{}"), StoreFailed)
        self.assertEqual(len(calls), n)  # refused before any write
        yield self.lone(store, "f2")
        self.assertIsNot(calls[-1][0], main)
        self.assertFalse(store._ix_stale)
        yield self.lone(store, "f3")
        self.assertIs(calls[-1][0], main)
        self.assertEqual([t for t, _ in store.records()][-2:], ["f2", "f3"])

    @defer.inlineCallbacks
    def test_reactor_shutdown_writes_the_saves_of_its_turn(self):
        """The shutdown trigger comes in the turn of a save: the save is
        handed to the worker and written before the worker stops."""
        store = self.make()
        yield self.alone(store)
        yield deferLater(reactor, 0, lambda: None)
        store.save("last", b"{}")
        store._stop_pool()  # what the "during shutdown" trigger calls
        self.assertEqual(store.get("last"), b"{}")  # written before the worker stopped
        yield store.close()
        self.assertEqual([t for t, _ in self.reopen(store).records()][-1], "last")

    @defer.inlineCallbacks
    def test_a_batch_after_the_worker_stopped_fails_instead_of_waiting(self):
        """Saves still waiting for their turn when the worker is gone: the
        batch fails with StoreFailed and close() fires, nothing hangs."""
        store = self.make()
        yield self.alone(store)
        yield deferLater(reactor, 0, lambda: None)
        waiting = store.save("late", b"{}")
        store._pool.stop()  # the worker alone, without the store's flush
        closed = store.close()
        err = yield self.assertFailure(waiting, StoreFailed)
        self.assertIn("writer stopped", str(err))
        self.assertIsNone((yield closed))

    @defer.inlineCallbacks
    def test_close_after_and_during_inline_commits(self):
        """close() right after an inline commit fires at once; close() from
        the callback of an inline save waits for what that callback saved;
        a save and a close in one turn: the save is written first."""
        calls = self.spy_fdatasync()
        store = self.make()
        main = threading.current_thread()
        yield self.alone(store)
        yield self.lone(store, "i1")
        self.assertIs(calls[-1][0], main)
        self.assertIsNone(self.successResultOf(store.close()))
        again = self.reopen(store)
        yield self.alone(again, "v")
        yield deferLater(reactor, 0, lambda: None)
        second, closing = [], []

        def then(_):
            self.assertIs(calls[-1][0], main)  # this save was inline
            second.append(again.save("i3", b"{}"))
            closing.append(again.close())
        yield again.save("i2", b"{}").addCallback(then)
        yield closing[0]
        self.assertIsNone(self.successResultOf(second[0]))
        third = self.reopen(store)
        yield self.alone(third, "x")
        yield deferLater(reactor, 0, lambda: None)
        saved = third.save("i4", b"{}")
        yield third.close()
        self.assertIsNone(self.successResultOf(saved))
        stored = [t for t, _ in self.reopen(store).records()]
        self.assertEqual([t for t in stored if t.startswith("i")], ["i1", "i2", "i3", "i4"])
        self.assertEqual(stored[-1], "i4")

    @defer.inlineCallbacks
    def test_inline_and_worker_commits_never_overlap_and_keep_the_chain(self):
        """Lone saves, bursts and a sometimes busy worker, mixed: no two
        commits ever run at once; sequence numbers follow the order of the
        commits and ``verify --all`` finds the chain sound."""
        from stop.storage.chain import verify_all
        store = self.make(segment_bytes=2000)
        running, overlaps, threads_seen = [0], [], set()
        lock = threading.Lock()

        def watched(f):
            """``f`` is writer work: count how many run at once."""
            def run(*args):
                with lock:
                    running[0] += 1
                    if running[0] > 1:
                        overlaps.append(running[0])
                try:
                    return f(*args)
                finally:
                    with lock:
                        running[0] -= 1
            return run
        real = watched(store._commit)

        def commit(items):
            threads_seen.add(threading.current_thread())
            return real(items)
        store._commit = commit
        order = []
        n = 0
        for round_ in range(12):
            if round_ % 3 == 2:
                # The worker busy with other writer work (as with an index
                # commit) while a lone save that could go inline comes.
                gate = self.busy_writer(store, watched)
                reactor.callLater(0.005, gate.set)
            if round_ % 4 == 3:
                burst = [store.save(f"m{n + i}", canonical({"n": n + i})) for i in range(5)]
                order += [f"m{n + i}" for i in range(5)]
                n += 5
                yield defer.gatherResults(burst)
            else:
                for _ in range(storelog.INLINE_AFTER + 1):
                    order.append(f"m{n}")
                    yield self.lone(store, f"m{n}", canonical({"n": n}))
                    n += 1
        self.assertEqual(overlaps, [])
        self.assertEqual(len(threads_seen), 2)  # both paths were taken
        with store._snapshot():
            seqs = [store._rix.record(t) or store._find("R", t) for t in order]
        self.assertEqual(store.head()[0], n)
        yield store.close()
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual([t for t, _ in reader.records()], order)
        report = verify_all(reader, head=f"{n}:{store.head()[1]}")
        self.assertTrue(report.sound, report.findings)
        self.assertEqual((report.records, report.head_seq), (n, n))
        self.assertEqual(len(seqs), n)

    @defer.inlineCallbacks
    def test_fsync_never_commits_inline_when_the_worker_is_idle(self):
        """fsync = never: no fdatasync to overlap, so a batch of any size is
        written on the reactor thread when the worker is idle; with the
        worker busy it goes to the worker."""
        writes = []
        real = storelog.pwrite

        def spy(fd, data, offset):
            writes.append(threading.current_thread())
            return real(fd, data, offset)
        self.patch(storelog, "pwrite", spy)
        calls = self.spy_fdatasync()
        store = self.make(fsync="never")
        items = [(f"n{i}", canonical({"i": i})) for i in range(10)]
        yield self.save_all(store, items)
        self.assertEqual(writes, [threading.current_thread()])
        yield deferLater(reactor, 0, lambda: None)
        gate = self.busy_writer(store)
        reactor.callLater(0.01, gate.set)
        yield store.save("n-busy", b"{}")
        self.assertIsNot(writes[-1], threading.current_thread())
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_fsync_always_inline_and_in_the_worker(self):
        """fsync = always: a lone save (alone) is one inline fdatasync; five
        saves of one turn are five batches of one, five fdatasync calls, in
        the worker."""
        calls = self.spy_fdatasync()
        store = self.make(fsync="always")
        main = threading.current_thread()
        yield self.alone(store)
        yield self.lone(store, "a-lone")
        self.assertIs(calls[-1][0], main)
        n = len(calls)
        yield self.save_all(store, [(f"a{i}", canonical({"i": i})) for i in range(5)])
        self.assertEqual(len(calls), n + 5)
        self.assertTrue(all(thread is not main for thread, _, _ in calls[n:]))
        sizes = [size for _, _, size in calls]
        self.assertEqual(sizes, sorted(set(sizes)))

    def test_bad_settings(self):
        for kw in ({"fsync": "sometimes"}, {"segment_bytes": 0}):
            with self.assertRaises(ConfigError):
                self.cls(self.tempdir(), **kw)

    def test_permissions_with_umask_0(self):
        return self.check_permissions(0)

    def test_permissions_with_umask_0277(self):
        """A umask that would make files read-only (0400) and directories
        0500: modes are set explicitly, not left to the umask."""
        return self.check_permissions(0o277)

    @defer.inlineCallbacks
    def check_permissions(self, umask):
        old = os.umask(umask)
        self.addCleanup(os.umask, old)
        store = self.make(segment_bytes=100)
        yield self.save_all(store, [(f"p{i}", canonical({"i": i, "x": "y" * 60})) for i in range(3)])
        yield store.close()
        # Reopen over a torn tail so that a torn-* file exists too.
        with open(segment_files(store)[-1], "ab") as f:
            f.write(b"torn")
        again = self.reopen(store)
        self.assertEqual(mode(store.data_dir), 0o700)
        self.assertEqual(mode(store.records_dir), 0o700)
        names = os.listdir(again.records_dir)
        self.assertTrue(any(n.startswith("torn-") for n in names))
        self.assertGreater(len([n for n in names if n.startswith("seg-")]), 1)
        for name in names:
            self.assertEqual(mode(os.path.join(again.records_dir, name)), 0o600, name)

    def assertRefused(self, data_dir, text, readonly=False):
        store = self.cls(data_dir, reactor=reactor, readonly=readonly)
        with self.assertRaises(StoreFailed) as caught:
            store.open()
        self.assertIn(text, str(caught.exception))
        self.assertIn(data_dir, str(caught.exception))

    def test_unsafe_data_dir_refused(self):
        base = self.tempdir()
        real = os.path.join(base, "real")
        os.mkdir(real, 0o700)
        link = os.path.join(base, "link")
        os.symlink(real, link)
        self.assertRefused(link, "symlink")
        afile = os.path.join(base, "file")
        open(afile, "w").close()
        self.assertRefused(afile, "not a directory")
        for bits in (0o770, 0o707):
            path = os.path.join(base, f"m{bits:o}")
            os.mkdir(path)
            os.chmod(path, bits)
            self.assertRefused(path, "writable")
            self.assertRefused(path, "writable", readonly=True)
        self.assertRefused(os.path.join(base, "missing"), "does not exist", readonly=True)
        self.assertFalse(os.path.exists(os.path.join(base, "missing")))

    @pytest.mark.root
    @defer.inlineCallbacks
    def test_foreign_owner_refused(self):
        if os.getuid() != 0:
            raise unittest.SkipTest("needs root to chown")
        store = self.make()
        yield store.save("t1", b"{}")
        yield store.close()
        path = store.data_dir
        for dirpath, _, files in os.walk(path):
            for p in [dirpath] + [os.path.join(dirpath, f) for f in files]:
                os.chown(p, 65534, 65534)
        self.assertRefused(path, "owned by uid 65534")
        # root's stopctl may read a store the daemon's user owns, and leaves
        # nothing behind that the daemon's user could not open (SQLite gives
        # the index's -wal/-shm files the owner of the index).
        reader = self.cls(path, readonly=True)
        reader.open()
        self.assertEqual(list(reader.records()), [("t1", b"{}")])
        self.assertEqual(reader.get("t1"), b"{}")
        reader.close()
        for name in os.listdir(store.records_dir):
            self.assertEqual(os.lstat(os.path.join(store.records_dir, name)).st_uid, 65534, name)

    def torn_bytes(self, kind: str) -> bytes:
        """A tail a crash could leave: an incomplete entry, or a complete
        one whose record does not match its SHA-256."""
        line = format_line("torn1", canonical({"x": "y"}))
        if kind == "badhash":
            line = line.replace(b'"y"', b'"z"')
            return self.cls.codec.encode(line)
        return self.cls.codec.encode(line)[:-7]

    @defer.inlineCallbacks
    def check_torn_tail(self, kind, room=0):
        """``room``: that many NUL bytes after the tail, the room a flat
        store's writer preallocates (a crash leaves it)."""
        store = self.make()
        items = [(f"k{i}", canonical({"i": i})) for i in range(3)]
        yield self.save_all(store, items)
        yield store.close()
        seg = segment_files(store)[-1]
        good = os.path.getsize(seg)
        tail = self.torn_bytes(kind)
        with open(seg, "ab") as f:
            f.write(tail + b"\0" * room)
        # A reader neither repairs nor indexes it.
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.assertEqual(list(reader.records()), items)
        self.assertEqual(os.path.getsize(seg), good + len(tail) + room)
        reader.close()

        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            again = self.reopen(store)
        finally:
            globalLogPublisher.removeObserver(events.append)
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"torn tail of {len(tail)} bytes", warnings[0])
        torn = os.path.join(again.records_dir, "torn-00000001-%d" % good)
        with open(torn, "rb") as f:
            self.assertEqual(f.read(), tail)
        self.assertEqual(mode(torn), 0o600)
        self.assertEqual(os.path.getsize(seg), good)
        self.assertEqual(list(again.records()), items)
        self.assertIsNone(again.get("torn1"))
        yield again.save("k3", canonical({"i": 3}))
        yield again.close()
        self.assertEqual(list(self.reopen(store).records()), items + [("k3", canonical({"i": 3}))])

    def test_torn_tail_incomplete(self):
        return self.check_torn_tail("incomplete")

    def test_torn_tail_bad_hash(self):
        return self.check_torn_tail("badhash")

    @defer.inlineCallbacks
    def test_duplicate_token(self):
        store = self.make()
        yield store.save("dup", b"{}")
        yield self.assertFailure(store.save("dup", b'{"a":1}'), StoreFailed)
        # twice in one batch: the second is refused at once
        first = store.save("twin", b"{}")
        yield self.assertFailure(store.save("twin", b"{}"), StoreFailed)
        yield first
        yield store.close()
        again = self.reopen(store)
        yield self.assertFailure(again.save("dup", b"{}"), StoreFailed)
        self.assertEqual(again.get("dup"), b"{}")

    @defer.inlineCallbacks
    def test_a_stored_token_in_a_batch_fails_alone(self):
        """A batch of records whose one token was stored before (in the
        committed index, or in its open transaction): that one fails, the
        others are stored in order with no gap in the chain."""
        store = self.make()
        yield store.save("old", b"{}")
        yield store._pool.call(store._index_commit)
        yield store.save("recent", b'{"a":1}')  # its row not committed yet
        first = store.save("n0", b'{"b":0}')   # goes at once; the rest wait for it
        batch = [store.save(t, b'{"b":%d}' % i)
                 for i, t in enumerate(["n1", "old", "n2", "recent", "n3"], 1)]
        self.assertGreater(len(store._pending), 1)
        yield first
        results = yield defer.DeferredList(batch, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True, False, True])
        for ok, value in results:
            if not ok:
                self.assertIn("already stored", str(value.value))
        self.assertEqual(store.head()[0], 6)
        yield store.close()
        again = self.reopen(store)
        self.assertEqual([t for t, _ in again.records()],
                         ["old", "recent", "n0", "n1", "n2", "n3"])
        self.assertEqual(again.get("old"), b"{}")
        self.assertEqual(again.get("n2"), b'{"b":3}')
        yield self.assertFailure(again.save("n3", b"{}"), StoreFailed)

    @defer.inlineCallbacks
    def test_bad_entries_refused(self):
        store = self.make()
        for token, record in [("a b", b"{}"), ("", b"{}"), ("tök", b"{}"), ("ok", b"{\n}"), ("ok", "{}")]:
            yield self.assertFailure(store.save(token, record), StoreFailed)
        self.assertEqual(list(store.records()), [])

    @defer.inlineCallbacks
    def test_segment_rotation(self):
        store = self.make(segment_bytes=300)
        items = [(f"r{i:02d}", canonical({"i": i, "pad": "q" * 40})) for i in range(20)]
        yield self.save_all(store, items[:10])
        for token, record in items[10:]:  # one batch each, too
            yield store.save(token, record)
        files = segment_files(store)
        self.assertGreater(len(files), 3)
        self.assertTrue(all(os.path.getsize(f) <= 300 for f in files), [os.path.getsize(f) for f in files])
        self.assertEqual(list(store.records()), items)
        yield indexed(store)
        self.assertEqual(store.usage(), disk_bytes(store))
        yield store.close()
        self.assertEqual(list(self.reopen(store).records()), items)

    @defer.inlineCallbacks
    def test_reader_sees_later_saves(self):
        store = self.make(segment_bytes=400)
        yield store.save("first", canonical({"n": 1}))
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual(reader.get("first"), canonical({"n": 1}))
        later = [(f"later{i}", canonical({"n": i, "pad": "z" * 80})) for i in range(8)]
        yield self.save_all(store, later)
        self.assertGreater(len(segment_files(store)), 1)
        self.assertEqual(reader.get("later7"), later[-1][1])
        self.assertEqual(list(reader.records()), [("first", canonical({"n": 1}))] + later)
        self.assertIsNone(reader.get("never"))
        yield self.assertFailure(reader.save("x", b"{}"), StoreFailed)

    @defer.inlineCallbacks
    def test_failed_write_then_recovers(self):
        """ENOSPC half-way through a write: the batch fails with StoreFailed
        naming the file and errno, the partial bytes are cut off, and the
        next batch is stored."""
        store = self.make()
        yield store.save("before", b'{"a":1}')
        self.fail_next_write(errno.ENOSPC, half=True)
        seg = segment_files(store)[0]
        size = entries_end(seg)
        err = yield self.assertFailure(store.save("lost", b'{"a":2}'), StoreFailed)
        self.assertIn("No space left on device", str(err))
        self.assertIn("seg-00000001", str(err))
        self.assertEqual(entries_end(seg), size)  # the half-written entry was cut off
        self.assertIsNone(store.get("lost"))
        yield store.save("after", b'{"a":3}')
        yield store.save("lost", b'{"a":4}')  # never stored, so not a reuse
        yield store.close()
        again = self.reopen(store)
        self.assertEqual(list(again.records()), [("before", b'{"a":1}'), ("after", b'{"a":3}'), ("lost", b'{"a":4}')])
        self.assertFalse([n for n in os.listdir(again.records_dir) if n.startswith("torn-")])

    @defer.inlineCallbacks
    def test_failure_after_rotation_keeps_synced_part(self):
        """A batch that rotates and then fails: the records synced into the
        old segment succeed, the rest fail; nothing is lost or duplicated."""
        store = self.make(segment_bytes=250)
        yield store.save("r0", canonical({"pad": "x" * 40}))
        real = storelog.pwrite
        calls = []

        def second_fails(fd, data, offset):
            calls.append(offset)
            if len(calls) == 3:  # the batch's second segment write
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)
        self.patch(storelog, "pwrite", second_fails)
        hold = store.save("hold", canonical({"pad": "h" * 40}))  # a batch in flight
        ds = [store.save(f"r{i}", canonical({"pad": "x" * 40})) for i in range(1, 6)]
        yield hold
        results = yield defer.DeferredList(ds, consumeErrors=True)
        ok = [success for success, _ in results]
        self.assertEqual(len(calls), 3)  # hold; the first segment's part; the next one's (failed)
        self.assertIn(True, ok)
        self.assertIn(False, ok)
        self.assertEqual(ok, sorted(ok, reverse=True))  # a durable prefix, then failures
        for success, value in results:
            if not success:
                self.assertIsInstance(value.value, StoreFailed)
        stored = [t for t, _ in store.records()]
        self.assertEqual(stored, ["r0", "hold"] + [f"r{i}" for i in range(1, 6) if ok[i - 1]])
        yield store.close()
        self.assertEqual([t for t, _ in self.reopen(store).records()], stored)

    @defer.inlineCallbacks
    def test_failed_fdatasync_fails_batch(self):
        store = self.make()
        real = storelog.fdatasync
        failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

        def broken(fd):
            if failures:
                raise failures.pop()
            real(fd)
        self.patch(storelog, "fdatasync", broken)
        ds = [store.save("x1", b"{}"), store.save("x2", b"{}")]
        err = yield self.assertFailure(ds[0], StoreFailed)
        self.assertIn("Input/output error", str(err))
        yield ds[1]  # queued behind: its own batch, which worked
        self.assertEqual(list(store.records()), [("x2", b"{}")])

    @defer.inlineCallbacks
    def test_damage_is_reported_not_returned(self):
        store = self.make(fsync="never")
        yield self.save_all(store, [("d1", canonical({"v": "aaaa"})), ("d2", canonical({"v": "bbbb"}))])
        yield indexed(store)
        self.flip_in_entry(store.locate("R", "d1")[0], b"aaaa")
        with self.assertRaises(StoreFailed) as caught:
            store.get("d1")
        self.assertIn("d1", str(caught.exception))
        self.assertEqual(store.get("d2"), canonical({"v": "bbbb"}))
        self.assertFalse(store.integrity("d1"))
        self.assertTrue(store.integrity("d2"))
        self.assertFalse(store.integrity("unknown"))

    @defer.inlineCallbacks
    def test_callbacks_may_save_and_close(self):
        """A save's callback that saves again and closes the store (as a
        reply path may): the second save is stored, close waits for it."""
        store = self.make()
        second = []

        def then(_):
            second.append(store.save("second", b"{}"))
            closing.append(store.close())
        closing = []
        yield store.save("first", b"{}").addCallback(then)
        yield closing[0]
        self.assertIsNone(self.successResultOf(second[0]))
        self.assertEqual([t for t, _ in self.reopen(store).records()], ["first", "second"])

    @defer.inlineCallbacks
    def test_damaged_last_indexed_record_is_not_a_torn_tail(self):
        """The newest record was indexed (so it was durable and answered),
        then damaged: it is reported damaged, never moved aside as torn."""
        store = self.make()
        yield self.save_all(store, [("e1", canonical({"v": "aaaa"})), ("e2", canonical({"v": "bbbb"}))])
        off, length = store.locate("R", "e2")[0][1:]
        yield store.close()
        seg = segment_files(store)[0]
        with open(seg, "r+b") as f:
            data = bytearray(f.read())
            data[off + length - 5] ^= 0x01  # inside the record (flat) or gzip trailer
            f.seek(0)
            f.write(bytes(data))
        size = os.path.getsize(seg)
        for readonly in (True, False):
            again = self.cls(store.data_dir, reactor=reactor, readonly=readonly)
            again.open()
            self.addCleanup(again.close)
            self.assertRaises(StoreFailed, again.get, "e2")
            self.assertFalse(again.integrity("e2"))
            self.assertTrue(again.integrity("e1"))
        self.assertEqual(os.path.getsize(seg), size)
        self.assertFalse([n for n in os.listdir(store.records_dir) if n.startswith("torn-")])
        yield again.save("e3", b"{}")
        self.assertEqual(again.get("e3"), b"{}")

    @defer.inlineCallbacks
    def test_close_waits_for_pending_saves(self):
        store = self.make()
        fired = []
        for i in range(20):
            store.save(f"c{i}", b"{}").addCallback(fired.append)
        yield store.close()
        self.assertEqual(len(fired), 20)
        yield self.assertFailure(store.save("late", b"{}"), StoreFailed)

    @defer.inlineCallbacks
    def test_reactor_shutdown_then_close(self):
        """The shutdown trigger stops the worker; saves are refused after,
        and a close that comes later still fires (no second stop)."""
        store = self.make()
        yield store.save("s1", b"{}")
        store._stop_pool()  # what the "during shutdown" trigger calls
        yield self.assertFailure(store.save("s2", b"{}"), StoreFailed)
        yield store.close()
        self.assertEqual([t for t, _ in self.reopen(store).records()], ["s1"])

    @defer.inlineCallbacks
    def test_usage_tracks_disk(self):
        """usage() is every byte under records/: segments as each batch
        is durable, the index as of its last commit."""
        store = self.make()
        empty = store.usage()
        yield self.save_all(store, [(f"u{i}", canonical({"i": i})) for i in range(5)])
        segments = sum(entries_end(f) for f in segment_files(store))
        self.assertGreaterEqual(store.usage(), empty + segments)
        yield indexed(store)
        self.assertEqual(store.usage(), disk_bytes(store))
        yield store.close()
        again = self.reopen(store)
        self.assertEqual(again.usage(), disk_bytes(again))

    @defer.inlineCallbacks
    def test_linked_entries(self):
        """Entries linked to a record: kept in order, durable, never in
        records(), never changing the record's bytes; a reader sees later
        ones; they survive a reopen and count in usage()."""
        store = self.make(segment_bytes=600)
        rec = canonical({"type": "SV", "n": 1})
        outcome = [canonical({"kind": "recursion", "n": i, "pad": "l" * 100}) for i in range(4)]
        # linked in the same batch as its record: stored after it
        yield defer.gatherResults([store.save("sv1", rec), store.save_linked("sv1", outcome[0])])
        yield store.save("id2", canonical({"type": "ID"}))
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        before = store.usage()
        for e in outcome[1:]:
            yield store.save_linked("sv1", e)
        self.assertGreater(store.usage(), before + 3 * 100)
        self.assertGreater(len(segment_files(store)), 1)
        self.assertEqual(store.linked("sv1"), outcome)
        self.assertEqual(reader.linked("sv1"), outcome)
        self.assertEqual(store.linked("id2"), [])
        self.assertEqual(store.linked("unknown"), [])
        self.assertEqual(store.get("sv1"), rec)
        self.assertEqual([t for t, _ in store.records()], ["sv1", "id2"])
        self.assertEqual(store.head()[0], 6)
        yield indexed(store)
        self.assertEqual(store.usage(), disk_bytes(store))
        head = store.head()
        self.assertEqual(reader.head(), head)
        yield store.close()
        again = self.reopen(store)
        self.assertEqual(again.linked("sv1"), outcome)
        self.assertEqual(again.get("sv1"), rec)
        self.assertEqual(again.usage(), disk_bytes(again))
        self.assertEqual(again.head(), head)
        yield again.save_linked("id2", outcome[0])
        self.assertEqual(again.linked("id2"), [outcome[0]])

    @defer.inlineCallbacks
    def test_linked_entries_refused(self):
        store = self.make()
        yield store.save("r1", b"{}")
        for token, entry, why in [
                ("nope", b'{"a":1}', "no record"),
                ("r1", b'{"a": 1}', "canonical"),
                ("r1", b"[1]", "object"),
                ("r1", b"{not json", "JSON"),
                ("r1", b'{"a":\n1}', "newline"),
                ("r1", "{}", "not bytes"),
                ("r1", b'{"a":"' + b"x" * storelog.MAX_RECORD_BYTES + b'"}', "over"),
                ("r 1", b"{}", "bad token")]:
            err = yield self.assertFailure(store.save_linked(token, entry), StoreFailed)
            self.assertIn(why, str(err))
        self.assertEqual(store.linked("r1"), [])
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        yield self.assertFailure(reader.save_linked("r1", b"{}"), StoreFailed)
        yield store.close()
        yield self.assertFailure(store.save_linked("r1", b"{}"), StoreFailed)

    @defer.inlineCallbacks
    def test_linked_entry_of_a_failed_record_fails(self):
        """A record and an entry linked to it in one batch: the write fails,
        both fail; nothing of either is stored."""
        store = self.make()
        yield store.save("first", b"{}")
        self.fail_next_write(errno.EIO)
        d1, d2 = store.save("r2", b"{}"), store.save_linked("r2", b'{"a":1}')
        yield self.assertFailure(d1, StoreFailed)
        yield self.assertFailure(d2, StoreFailed)
        # the next save is numbered on from the last durable entry
        yield store.save_linked("first", b'{"b":2}')
        yield store.close()
        again = self.reopen(store)
        self.assertIsNone(again.get("r2"))
        self.assertEqual(again.linked("r2"), [])
        self.assertEqual(again.linked("first"), [b'{"b":2}'])
        self.assertEqual(again.head()[0], 2)

    @defer.inlineCallbacks
    def test_damaged_linked_entry_is_reported(self):
        store = self.make(fsync="never")
        yield store.save("d1", canonical({"v": 1}))
        yield store.save_linked("d1", canonical({"kind": "x", "v": "aaaa"}))
        yield indexed(store)  # (a damaged last entry past the index looks torn)
        self.flip_in_entry(store.locate("L", "d1")[0], b"aaaa")
        with self.assertRaises(StoreFailed) as caught:
            store.linked("d1")
        self.assertIn("linked to d1", str(caught.exception))
        self.assertEqual(store.get("d1"), canonical({"v": 1}))

    def old_store(self, items, torn=b""):
        """A data_dir as stop 0.1.0 left it: '<token> <sha256> <record>'
        entries, a text index, no records/format."""
        data = os.path.join(self.tempdir(), "data")
        os.makedirs(os.path.join(data, "records"), 0o700)
        os.chmod(data, 0o700)
        seg = os.path.join(data, "records", "seg-00000001" + self.cls.codec.suffix)
        with open(seg, "wb") as f:
            for token, record in items:
                line = b"%s %s %s\n" % (token.encode(), hashlib.sha256(record).hexdigest().encode(), record)
                f.write(self.cls.codec.encode(line))
            f.write(torn)
        with open(os.path.join(data, "records", "index"), "wb") as f:
            f.write(b"tok0 1 0 10\n")
        return data

    def test_store_of_stop_0_1_0_is_converted_keeping_the_old_files(self):
        """A reader refuses it with a message naming what happens; the
        daemon (a writer) converts it into the chained format and keeps
        every old file in records-0.1.0/; bad old entries are not converted
        (they stay in the old files) and do not hide later ones."""
        items = [(f"tok{i}", canonical({"i": i})) for i in range(5)]
        data = self.old_store(items[:3], torn=b"garbage\n")
        with open(os.path.join(data, "records", "seg-00000001" + self.cls.codec.suffix), "ab") as f:
            for token, record in items[3:]:
                line = b"%s %s %s\n" % (token.encode(), hashlib.sha256(record).hexdigest().encode(), record)
                f.write(self.cls.codec.encode(line))
        before = {n: open(os.path.join(data, "records", n), "rb").read()
                  for n in os.listdir(os.path.join(data, "records"))}
        reader = self.cls(data, readonly=True)
        with self.assertRaises(StoreFailed) as caught:
            reader.open()
        for text in ("stop 0.1.0", "records-0.1.0", "docs/storage.rst"):
            self.assertIn(text, str(caught.exception))
        store = self.make(data)
        self.assertEqual(list(store.records()), items)
        self.assertEqual(store.head()[0], 5)
        old = os.path.join(data, "records-0.1.0")
        self.assertEqual({n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)}, before)
        self.assertEqual(mode(old), 0o700)
        self.assertFalse(os.path.exists(os.path.join(data, "records.converting")))
        reader = self.cls(data, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual(reader.get("tok4"), items[4][1])

    def test_interrupted_conversion_is_finished_or_redone(self):
        items = [(f"tok{i}", canonical({"i": i})) for i in range(3)]
        from stop.storage import migrate
        # Crash before the renames: a partial records.converting is redone.
        data = self.old_store(items)
        os.mkdir(os.path.join(data, migrate.CONVERTING), 0o700)
        open(os.path.join(data, migrate.CONVERTING, "seg-00000001" + self.cls.codec.suffix), "wb").close()
        self.assertEqual(list(self.make(data).records()), items)
        # Crash between the renames: records/ is gone, the new one complete.
        data = self.old_store(items)
        store = self.cls(data, reactor=reactor)
        real_rename, calls = os.rename, []

        def crash_on_second(a, b):
            calls.append((a, b))
            if len(calls) == 2:
                raise OSError(errno.EIO, "simulated crash")
            return real_rename(a, b)
        self.patch(os, "rename", crash_on_second)
        self.assertRaises(StoreFailed, store.open)
        self.patch(os, "rename", real_rename)
        self.assertFalse(os.path.exists(os.path.join(data, "records")))
        self.assertEqual(list(self.make(data).records()), items)
        self.assertTrue(os.path.exists(os.path.join(data, "records-0.1.0", "index")))

    @defer.inlineCallbacks
    def test_index_is_a_cache(self):
        """records/index.sqlite may be lost, stale, garbage or describe
        other segments: the store rebuilds it from the segments, and every
        record and linked entry is found again."""
        from stop.storage import index as index_mod
        store = self.make()
        items = [(f"i{i}", canonical({"i": i})) for i in range(6)]
        yield self.save_all(store, items)
        yield store.save_linked("i2", canonical({"n": 1}))
        yield store.close()
        path = os.path.join(store.records_dir, index_mod.INDEX_NAME)
        with open(path, "rb") as f:
            good = f.read()
        other = self.make()
        yield other.save("elsewhere", b"{}")
        yield other.close()
        with open(os.path.join(other.records_dir, index_mod.INDEX_NAME), "rb") as f:
            foreign = f.read()
        for what, content in [("missing", None), ("garbage", b"junk" * 100), ("foreign", foreign),
                              ("good", good)]:
            for p in index_mod.files(store.records_dir):
                if os.path.exists(p):
                    os.unlink(p)
            if content is not None:
                with open(path, "wb") as f:
                    f.write(content)
            again = self.reopen(store)
            self.assertEqual(list(again.records()), items, what)
            self.assertEqual([again.get(t) for t, _ in items], [r for _, r in items], what)
            self.assertEqual(again.linked("i2"), [canonical({"n": 1})], what)
            self.assertIsNone(again.get("elsewhere"), what)
            yield self.assertFailure(again.save("i3", b"{}"), StoreFailed)
            self.assertEqual(mode(path), 0o600)
            yield again.close()

    @defer.inlineCallbacks
    def test_index_lagging_behind_is_completed(self):
        """Entries durable in the segments but not in the index (a crash
        before its commit) are indexed on open; a reader finds them
        meanwhile by scanning past the index."""
        store = self.make()
        yield store.save("a1", b"{}")
        yield indexed(store)
        yield store.close()
        from stop.storage.offline import write_records  # noqa: F401 (the format's own writer)
        # Append two entries behind the index's back, as a crash would leave them.
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        seq, chain = reader.head()
        reader.close()
        line1, chain = format_entry("R", seq + 1, "a2", b'{"n":2}', chain)
        line2, chain = format_entry("L", seq + 2, "a2", b'{"x":1}', chain)
        with open(segment_files(store)[-1], "ab") as f:
            f.write(self.cls.codec.encode(line1) + self.cls.codec.encode(line2))
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual((reader.get("a2"), reader.linked("a2")), (b'{"n":2}', [b'{"x":1}']))
        self.assertEqual(reader.head(), (seq + 2, chain))
        again = self.reopen(store)
        self.assertEqual(again._rix.record("a2")[0], seq + 1)
        self.assertEqual(again.head(), (seq + 2, chain))
        yield self.assertFailure(again.save("a2", b"{}"), StoreFailed)
        yield again.save("a3", b"{}")
        self.assertEqual([t for t, _ in again.records()], ["a1", "a2", "a3"])

    @defer.inlineCallbacks
    def test_index_committed_by_count_and_by_time(self):
        """The writer commits the index every INDEX_ROWS rows, and
        INDEX_DELAY seconds after a batch; before that a reader finds the
        entries past the committed index all the same."""
        self.patch(storelog, "INDEX_ROWS", 3)
        self.patch(storelog, "INDEX_DELAY", 3600.0)
        store = self.make()
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        for i in range(2):
            yield store.save(f"c{i}", b"{}")
        yield store._pool.call(lambda: None)  # the batches' follow-ups ran
        self.assertIsNone(reader._rix.last())
        self.assertEqual(reader.get("c1"), b"{}")  # found past the index
        yield store.save("c2", b"{}")
        yield store._pool.call(lambda: None)
        self.assertEqual(reader._rix.last().seq, 3)
        self.assertEqual(reader._rix.record("c2")[0], 3)
        store._index_timer.cancel()
        store._index_timer = None
        self.patch(storelog, "INDEX_DELAY", 0.05)
        yield store.save("c3", b"{}")
        for _ in range(100):  # bounded: 10 s
            if reader._rix.last().seq == 4:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(reader._rix.last().seq, 4)

    @defer.inlineCallbacks
    def test_index_failure_fails_the_batch_then_catches_up(self):
        """The index cannot be written: that batch fails (no token is
        taken unchecked); the next batch first indexes what the segments
        hold past the committed index, then goes on."""
        store = self.make()
        yield store.save("f1", b"{}")
        real = store._wix.add_record
        calls = []

        def broken(row):
            calls.append(row)
            if len(calls) == 1:
                raise sqlite3.OperationalError("disk I/O error")
            return real(row)
        store._wix.add_record = broken
        err = yield self.assertFailure(store.save("f2", b"{}"), StoreFailed)
        self.assertIn("index", str(err))
        yield store.save("f3", b"{}")
        yield self.assertFailure(store.save("f1", b"{}"), StoreFailed)  # still a reuse
        yield store.save("f2", b"{}")  # never stored before
        yield store.close()
        again = self.reopen(store)
        self.assertEqual([t for t, _ in again.records()], ["f1", "f3", "f2"])
        self.assertEqual(again.head()[0], 3)

    @defer.inlineCallbacks
    def test_an_index_corrupt_while_running_is_rebuilt(self):
        """SQLite says the index is corrupt (not a passing failure): that
        batch fails, the next one rebuilds the index from the segments
        and goes on; the reads use the new index."""
        store = self.make()
        yield self.save_all(store, [("c1", b"{}"), ("c2", b'{"a":1}')])
        yield store._pool.call(store._index_commit)
        old = store._wix

        def corrupt(*args):
            raise sqlite3.DatabaseError("database disk image is malformed")
        old.add_record = corrupt  # its reads still work: rebuilt all the same
        yield self.assertFailure(store.save("c3", b"{}"), StoreFailed)
        yield store.save("c4", b"{}")
        self.assertIsNot(store._wix, old)
        yield store.save("c5", b"{}")
        yield self.assertFailure(store.save("c1", b"{}"), StoreFailed)  # still known
        yield store._pool.call(store._index_commit)
        self.assertEqual(store._rix.count(), 4)  # the reader reads the new index
        self.assertEqual([store.get(t) for t in ("c1", "c2", "c3", "c4", "c5")],
                         [b"{}", b'{"a":1}', None, b"{}", b"{}"])

    @defer.inlineCallbacks
    def test_reader_without_index_scans(self):
        store = self.make()
        yield self.save_all(store, [("n1", b"{}"), ("n2", b'{"a":1}')])
        yield store.save_linked("n2", b'{"b":2}')
        yield store.close()
        from stop.storage import index as index_mod
        for p in index_mod.files(store.records_dir):
            if os.path.exists(p):
                os.unlink(p)
        reader = self.cls(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertFalse(reader._rix.usable)
        self.assertEqual((reader.get("n2"), reader.linked("n2")), (b'{"a":1}', [b'{"b":2}']))
        self.assertEqual(reader.head()[0], 3)
        self.assertEqual(reader.tokens_with_prefix("N"), ["n1", "n2"])
        self.assertFalse(os.path.exists(os.path.join(store.records_dir, index_mod.INDEX_NAME)))

    def test_other_codec_segments_refused(self):
        data = os.path.join(self.tempdir(), "data")
        os.makedirs(os.path.join(data, "records"), 0o700)
        other = "seg-00000001.log" if self.cls is GzipStore else "seg-00000001.log.gz"
        open(os.path.join(data, "records", other), "w").close()
        self.assertRefused(data, other)


class FlatStoreTests(LogStoreTests, unittest.TestCase):
    cls = FlatStore

    def test_torn_tail_before_room(self):
        """A crash in the middle of an entry, with the room the writer
        preallocated after it: the torn bytes (not the room) are moved
        aside, and the segment is cut back to its last sound entry."""
        return self.check_torn_tail("incomplete", room=5000)

    @defer.inlineCallbacks
    def test_segment_is_plain_lines(self):
        store = self.make()
        items = [("f1", canonical({"a": "b c"})), ("f2", canonical({"ü": 1}))]
        yield self.save_all(store, items)
        path = segment_files(store)[0]
        with open(path, "rb") as f:
            data = f.read()
        # The current segment: its entries, then room preallocated for the
        # next ones (NUL bytes), given back when the store closes.
        self.assertEqual(data[:len(lines_of(items))], lines_of(items))
        self.assertEqual(data[len(lines_of(items)):].strip(b"\0"), b"")
        yield store.close()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), lines_of(items))


class GzipStoreTests(LogStoreTests, unittest.TestCase):
    cls = GzipStore

    @defer.inlineCallbacks
    def test_segment_is_a_gzip_stream(self):
        store = self.make()
        items = [(f"z{i}", rec) for i, rec in enumerate(TRICKY)]
        yield self.save_all(store, items)
        seg = segment_files(store)[0]
        self.assertTrue(seg.endswith(".log.gz"))
        expected = lines_of(items)
        out = subprocess.run(["gzip", "-dc", seg], capture_output=True, check=True, timeout=30).stdout
        self.assertEqual(out, expected)
        with open(seg, "rb") as f:
            self.assertEqual(stdlib_gzip.decompress(f.read()), expected)

    @defer.inlineCallbacks
    def test_hash_covers_uncompressed_record(self):
        """A valid gzip member whose record was changed after hashing is a
        bad entry: the SHA-256 is over the uncompressed record."""
        store = self.make()
        yield store.save("g1", canonical({"v": 1}))
        yield store.close()
        forged = format_line("g2", canonical({"v": 2}), seq=2).replace(b'"v":2', b'"v":3')
        seg = segment_files(store)[0]
        good = os.path.getsize(seg)
        with open(seg, "ab") as f:
            f.write(stdlib_gzip.compress(forged))  # a perfectly valid member
        again = self.reopen(store)
        self.assertIsNone(again.get("g2"))
        self.assertEqual(os.path.getsize(seg), good)
        self.assertTrue(os.path.exists(os.path.join(again.records_dir, "torn-00000001-%d" % good)))


class PreallocationTests(TempDirMixin, unittest.TestCase):
    """A flat store gives its current segment room ahead of its entries
    (storelog.PREALLOC_BYTES, up to the segment size), so that appends
    change no file size and fdatasync has no metadata to commit; the room
    is given back when the segment is left, and cut off on open when a
    crash left it."""

    def make(self, data_dir=None, **kw):
        store = FlatStore(data_dir or os.path.join(self.tempdir(), "data"), reactor=reactor, **kw)
        store.open()
        self.addCleanup(store.close)
        return store

    def events(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def test_room_ahead_of_the_entries_given_back_when_the_segment_is_left(self):
        store = self.make(segment_bytes=1500)
        items = [(f"p{i}", canonical({"i": i, "pad": "p" * 200})) for i in range(12)]
        yield store.save(*items[0])
        (seg1,) = segment_files(store)
        end = entries_end(seg1)
        self.assertEqual(end, len(lines_of(items[:1])))
        # Room up to the segment size (here less than PREALLOC_BYTES).
        self.assertEqual(os.path.getsize(seg1), 1500)
        # A reader, and verify, see the entries and nothing wrong after them.
        reader = FlatStore(store.data_dir, readonly=True)
        reader.open()
        self.addCleanup(reader.close)
        self.assertEqual(list(reader.records()), items[:1])
        self.assertTrue(verify_all(store).sound)
        for item in items[1:]:
            yield store.save(*item)
        segs = segment_files(store)
        self.assertGreater(len(segs), 2)
        for path in segs[:-1]:  # left: cut back to its entries, durably
            self.assertEqual(os.path.getsize(path), entries_end(path))
        self.assertGreater(os.path.getsize(segs[-1]), entries_end(segs[-1]))
        self.assertEqual(list(reader.records()), items)
        report = verify_all(store)
        self.assertTrue(report.sound, report.findings)
        self.assertEqual(report.records, len(items))
        # usage() counts the entries, not the room, counted again or not,
        # by the writer or by a reader.
        yield indexed(store)
        self.assertEqual(store.usage(), disk_bytes(store))
        store.recount_usage()
        self.assertEqual(store.usage(), disk_bytes(store))
        reader.recount_usage()
        self.assertEqual(reader.usage(), disk_bytes(store))
        yield store.close()
        self.assertEqual(os.path.getsize(segs[-1]), entries_end(segs[-1]))
        data = b""
        for path in segs:
            with open(path, "rb") as f:
                data += f.read()
        self.assertEqual(data, lines_of(items))

    @defer.inlineCallbacks
    def test_a_default_segment_gets_prealloc_bytes_of_room(self):
        store = self.make()
        yield store.save("one", b"{}")
        (seg,) = segment_files(store)
        self.assertEqual(os.path.getsize(seg), entries_end(seg) + PREALLOC_BYTES)

    @defer.inlineCallbacks
    def test_room_left_by_a_crash_is_cut_on_open(self):
        store = self.make()
        items = [(f"c{i}", canonical({"i": i})) for i in range(3)]
        for item in items:
            yield store.save(*item)
        yield store.close()
        (seg,) = segment_files(store)
        good = os.path.getsize(seg)
        with open(seg, "ab") as f:  # as a crash leaves the room
            f.write(b"\0" * 100000)
        reader = FlatStore(store.data_dir, readonly=True)
        reader.open()
        self.assertEqual(list(reader.records()), items)
        self.assertTrue(verify_all(reader).sound)
        reader.close()
        events = self.events()
        again = self.make(store.data_dir)
        text = [formatEvent(e) for e in events]
        self.assertFalse([t for e, t in zip(events, text) if e.get("log_level") in
                          (LogLevel.warn, LogLevel.error)], text)
        self.assertTrue(any("100000 bytes of room" in t for t in text), text)
        self.assertFalse([n for n in os.listdir(again.records_dir) if n.startswith("torn-")])
        self.assertEqual(os.path.getsize(seg), good)  # cut off, durably, before any read
        self.assertEqual(list(again.records()), items)
        yield again.save("c3", canonical({"i": 3}))
        yield again.close()
        with open(seg, "rb") as f:
            self.assertEqual(f.read(), lines_of(items + [("c3", canonical({"i": 3}))]))
        self.assertTrue(verify_all(self.make(store.data_dir)).sound)

    @defer.inlineCallbacks
    def test_a_hole_in_the_room_before_later_entries_is_a_torn_tail(self):
        """A power loss in the middle of a batch written into the room: a
        later page of it reached the disk, an earlier one did not (zeros).
        No acknowledged entry is after such a hole (its batch's fdatasync
        would have written the hole too): the hole and what follows are
        the torn tail, moved aside, not damage left in the log."""
        store = self.make()
        items = [(f"h{i}", canonical({"i": i})) for i in range(3)]
        for item in items:
            yield store.save(*item)
        seq, chain = store.head()
        yield store.close()
        (seg,) = segment_files(store)
        good = os.path.getsize(seg)
        # Two entries after the hole: the bad bytes (the hole up to the
        # first one's newline) are then followed by a sound entry.
        late, chain2 = format_entry("R", seq + 2, "late", canonical({"late": 1}), chain)
        later, _ = format_entry("R", seq + 3, "later", canonical({"late": 2}), chain2)
        tail = b"\0" * 300 + late + later
        with open(seg, "ab") as f:
            f.write(tail + b"\0" * 5000)
        events = self.events()
        again = self.make(store.data_dir)
        text = [formatEvent(e) for e in events]
        self.assertFalse([t for e, t in zip(events, text) if e.get("log_level") == LogLevel.error],
                         text)
        warnings = [t for e, t in zip(events, text) if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"torn tail of {len(tail)} bytes", warnings[0])
        with open(os.path.join(again.records_dir, "torn-00000001-%d" % good), "rb") as f:
            self.assertEqual(f.read(), tail)
        self.assertEqual(os.path.getsize(seg), good)
        self.assertEqual(list(again.records()), items)
        self.assertIsNone(again.get("late"))
        self.assertIsNone(again.get("later"))
        yield again.save("h3", canonical({"i": 3}))
        self.assertTrue(verify_all(again).sound)

    @defer.inlineCallbacks
    def test_room_left_in_an_older_segment_is_cut_with_a_warning(self):
        """Only a failed cut at rotation leaves room in a segment that is
        not the last: cut on open, and said louder than a crash's."""
        store = self.make(segment_bytes=600)
        items = [(f"o{i}", canonical({"i": i, "pad": "o" * 100})) for i in range(4)]
        for item in items:
            yield store.save(*item)
        yield store.close()
        first, last = segment_files(store)
        good = os.path.getsize(first)
        with open(first, "ab") as f:
            f.write(b"\0" * 700)
        events = self.events()
        again = self.make(store.data_dir)
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("700 bytes of room", warnings[0])
        self.assertEqual(os.path.getsize(first), good)
        self.assertEqual(list(again.records()), items)
        self.assertTrue(verify_all(again).sound)

    @defer.inlineCallbacks
    def test_no_room_when_the_disk_is_full(self):
        """Writing the room fails (no space) after part of it was written:
        that part is cut back, the saves are stored all the same, without
        room, with a warning; the next segment tries again."""
        refused = []
        real = storelog.pwrite_room

        def refuse(fd, data, offset):
            refused.append(fd)
            real(fd, data[:len(data) // 2], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.patch(storelog, "pwrite_room", refuse)
        events = self.events()
        store = self.make(segment_bytes=600)
        items = [(f"n{i}", canonical({"i": i, "pad": "n" * 100})) for i in range(4)]
        for item in items:
            yield store.save(*item)
            for seg in segment_files(store):  # no zeros left after the entries
                self.assertEqual(os.path.getsize(seg), entries_end(seg))
        self.assertEqual(len(segment_files(store)), 2)
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(refused), 2)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("cannot preallocate", warnings[0])
        self.assertIn("No space left on device", warnings[0])
        self.assertEqual(list(store.records()), items)
        yield store.close()
        self.assertEqual(list(self.make(store.data_dir).records()), items)

    @defer.inlineCallbacks
    def test_a_gzip_segment_gets_no_room(self):
        """A gzip member may end with NUL bytes: no room, ever."""
        store = GzipStore(os.path.join(self.tempdir(), "data"), reactor=reactor)
        store.open()
        self.addCleanup(store.close)
        yield store.save("z", canonical({"z": 1}))
        (seg,) = segment_files(store)
        entry = GzipCodec().encode(format_line("z", canonical({"z": 1})))
        self.assertEqual(os.path.getsize(seg), len(entry))


class MemoryStoreTests(unittest.TestCase):
    def test_verify_object(self):
        self.assertTrue(verifyObject(IRecordStore, MemoryStore()))

    @settings(max_examples=100, deadline=None)
    @given(items=st.dictionaries(tokens, json_records | unicode_records, max_size=8))
    def test_save_get_records(self, items):
        store = MemoryStore()
        store.open()
        for token, record in items.items():
            self.assertIsNone(self.successResultOf(store.save(token, record)))
        for token, record in items.items():
            self.assertEqual(store.get(token), record)
        self.assertEqual(list(store.records()), list(items.items()))
        self.assertEqual(store.usage(), sum(len(t) + len(r) for t, r in items.items()))

    def test_linked(self):
        store = MemoryStore()
        self.successResultOf(store.save("a", b"{}"))
        self.assertEqual(store.linked("a"), [])
        used = store.usage()
        self.successResultOf(store.save_linked("a", b'{"n":1}'))
        self.successResultOf(store.save_linked("a", b'{"n":2}'))
        self.assertEqual(store.linked("a"), [b'{"n":1}', b'{"n":2}'])
        self.assertEqual(store.usage(), used + 2 * (1 + 7))
        self.assertEqual(list(store.records()), [("a", b"{}")])
        self.failureResultOf(store.save_linked("b", b"{}"), StoreFailed)
        self.failureResultOf(store.save_linked("a", b'{"n": 3}'), StoreFailed)
        self.failureResultOf(store.save_linked("a", b"[]"), StoreFailed)
        self.successResultOf(store.close())
        self.failureResultOf(store.save_linked("a", b"{}"), StoreFailed)
        self.assertEqual(store.linked("nope"), [])

    def test_duplicate_and_bad(self):
        store = MemoryStore()
        self.successResultOf(store.save("a", b"{}"))
        self.failureResultOf(store.save("a", b"{}"), StoreFailed)
        self.failureResultOf(store.save("b c", b"{}"), StoreFailed)
        self.failureResultOf(store.save("b", b"{\n}"), StoreFailed)
        self.successResultOf(store.close())
        self.failureResultOf(store.save("d", b"{}"), StoreFailed)
        self.assertEqual(store.get("a"), b"{}")


class IndexTests(TempDirMixin, unittest.TestCase):
    """stop.storage.index alone (once, not per store format)."""

    def test_the_index_writer_keeps_its_statement_journals_in_memory(self):
        """A statement or savepoint that may be undone journals the pages
        it changes; with SQLite's default that journal spills to a new
        file in the temp directory (a batch's savepoint did so for nearly
        every batch under load: index pages outside the store, ~2
        syscalls a record): the writer keeps such journals in memory."""
        from stop.storage import index as index_mod
        ix = index_mod.Index(self.tempdir(), readonly=False)
        ix.open()
        try:
            self.assertEqual(ix._db.execute("PRAGMA temp_store").fetchone()[0], 2)  # MEMORY
            rows = [(f"t{i:04d}", i, 1, i, 1) for i in range(300)]
            self.assertTrue(ix.add_new(rows[:150]))
            self.assertFalse(ix.add_new(rows[140:]))  # one known: none of them
            self.assertTrue(ix.add_new(rows[150:]))
            ix.commit()
            self.assertEqual(ix._query("SELECT count(*) FROM records")[0][0], 300)
        finally:
            ix.close()

    def test_a_batch_goes_in_with_a_statement_per_chunk_all_or_none(self):
        """Index.add_new puts a batch in with one statement per INSERT_CHUNK
        (64) rows, not one per row: each step of a statement lets the GIL
        go, and the writer thread then waits for it. A known token in a
        later chunk still leaves nothing of the batch in the index."""
        from stop.storage import index as index_mod
        ix = index_mod.Index(self.tempdir(), readonly=False)
        ix.open()
        try:
            inserts = []
            ix._db.set_trace_callback(
                lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None)
            rows = [(f"t{i:04d}", i + 1, 1, i, 1) for i in range(300)]
            self.assertTrue(ix.add_new(rows[:100]))
            # (SQLite shows each statement with its values bound.)
            self.assertEqual([sql.count("('t") for sql in inserts], [64, 36])
            # 200 rows whose last-sorted one is known: three chunks go in,
            # the fourth fails; nothing of the batch stays.
            batch = rows[100:299] + [rows[99]]
            self.assertFalse(ix.add_new(batch))
            self.assertEqual(ix._query("SELECT count(*) FROM records")[0][0], 100)
            self.assertTrue(ix.add_new(rows[100:]))
            ix.commit()
            self.assertEqual(ix._query("SELECT count(*) FROM records")[0][0], 300)
        finally:
            ix.close()

    def test_a_batch_with_a_known_token_changes_nothing(self):
        """Index.add_new is all or none: new tokens sorted before the
        known one (inserted when it is met) and after it are not left in
        the index, nor is a token twice in one batch; the rows stored
        before, the known one's included, are untouched."""
        from stop.storage import index as index_mod
        ix = index_mod.Index(self.tempdir(), readonly=False)
        ix.open()
        try:
            stored = [("m", 1, 1, 0, 10), ("q", 2, 1, 10, 10)]
            self.assertTrue(ix.add_new(stored))
            ix.commit()
            for batch in ([("a", 3, 1, 20, 5), ("b", 4, 1, 25, 5), ("m", 5, 1, 30, 5),
                           ("z", 6, 1, 35, 5)],
                          [("c", 3, 1, 20, 5), ("d", 4, 1, 25, 5), ("c", 5, 1, 30, 5)],
                          [("e", 3, 1, 20, 5), ("q", 2, 1, 10, 10)]):
                self.assertFalse(ix.add_new(batch))
                self.assertEqual(ix._query("SELECT * FROM records ORDER BY token"), stored)
            self.assertTrue(ix.add_new([("a", 3, 1, 20, 5), ("b", 4, 1, 25, 5)]))
            ix.commit()
            self.assertEqual([r[0] for r in ix._query("SELECT token FROM records ORDER BY token")],
                             ["a", "b", "m", "q"])
        finally:
            ix.close()


class FactoryTests(TempDirMixin, unittest.TestCase):
    def test_names(self):
        self.assertEqual(sorted(STORES), ["flat", "gzip", "memory"])
        for name, cls in STORES.items():
            store = make_store(name, self.tempdir(), reactor=reactor)
            self.assertIsInstance(store, cls)
            self.assertEqual(store.name, name)

    def test_unknown_name(self):
        with self.assertRaises(ConfigError) as caught:
            make_store("tape", self.tempdir())
        for name in ("flat", "gzip", "memory", "tape"):
            self.assertIn(name, str(caught.exception))

    def test_bad_fsync(self):
        with self.assertRaises(ConfigError) as caught:
            make_store("flat", self.tempdir(), fsync="yes")
        self.assertIn("batch", str(caught.exception))


class FormatTests(unittest.TestCase):
    """The entry format itself, for both codecs (hypothesis)."""

    @settings(max_examples=200, deadline=None)
    @given(token=tokens, records=st.lists(json_records | unicode_records, min_size=1, max_size=5))
    def test_roundtrip(self, token, records):
        for codec in (Codec(), GzipCodec()):
            buf = b"".join(codec.encode(format_line(f"{token}{i}", r, seq=i + 1)) for i, r in enumerate(records))
            pos = 0
            for i, record in enumerate(records):
                line, end = codec.next_entry(buf, pos)
                entry = parse_entry(line)
                self.assertEqual((entry.kind, entry.seq, entry.token, entry.payload),
                                 ("R", i + 1, f"{token}{i}", record))
                self.assertEqual(entry.chain, chain_next(GENESIS, "R", i + 1, entry.token, entry.digest))
                self.assertEqual(codec.decode(buf[pos:end]), line)
                pos = end
            self.assertEqual(pos, len(buf))

    @settings(max_examples=300, deadline=None)
    @given(junk=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
    def test_junk_is_a_bad_entry(self, junk, cut):
        """Arbitrary or truncated bytes raise BadEntry, never anything else,
        and never parse as an entry."""
        good = format_line("t", b'{"a":1}')
        for codec in (Codec(), GzipCodec()):
            for buf in (junk, codec.encode(good)[:cut] if cut < len(codec.encode(good)) else junk):
                try:
                    line, _ = codec.next_entry(buf, 0)
                    parse_entry(line)
                except BadEntry:
                    continue
                self.fail(f"{buf!r} parsed as an entry")


class HeldStoreTests(unittest.TestCase):
    """stop.testing.HeldStore: saves and linked entries wait for complete()."""

    def test_held_then_completed(self):
        from stop.testing import HeldStore
        store = HeldStore()
        self.assertTrue(verifyObject(IRecordStore, store))
        d1 = store.save("t", b"{}")
        d2 = store.save_linked("t", b'{"n":1}')
        d3 = store.save_linked("other", b"{}")
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.assertEqual(len(store.pending_linked), 2)
        store.complete()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.failureResultOf(d3, StoreFailed)
        self.assertEqual(store.linked("t"), [b'{"n":1}'])
        self.assertEqual(store.linked("other"), [])
        self.assertEqual(store.usage(), 2 + 7)
        d4 = store.save_linked("t", b"{}")
        store.fail()
        self.failureResultOf(d4, StoreFailed)
