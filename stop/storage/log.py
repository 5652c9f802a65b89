"""The append-only, chained log store shared by the ``flat`` and ``gzip`` stores.

Layout under ``data_dir`` (see docs/storage.rst)::

    records/                    0700
        format                  0600, "stop-store 2": the format of the entries
        seg-00000001.log[.gz]   0600, append-only entries, rotated at segment_bytes
                                (the current .log: then NUL bytes, room for more)
        index.sqlite[-wal|-shm] 0600, a cache: token -> where (stop.storage.index)
        checkpoint              0600, where the chain starts after a prune (stop.storage.chain)
        torn-<segment>-<offset> 0600, bytes of a torn tail moved aside on open

The entries and their chain are described in :mod:`stop.storage.entries`; a
codec (:class:`~stop.storage.entries.Codec`) is the only difference between
the flat and gzip stores.

Writes: ``save``/``save_linked`` queue the entry; entries are written in
batches, each with one write and one ``fdatasync`` (group commit); every
Deferred of a batch fires on the reactor thread once it is durable, never
before. Who writes a batch:

* the worker thread (:class:`~stop.storage.writer.WriterThread`), as a
  rule: a save made while no batch is in flight starts one at once, and
  the worker's ``fdatasync`` overlaps the reactor's work on the next
  requests, whose saves go together as the next batch;
* the reactor thread itself ("inline"), when the store is alone with one
  client: once ``INLINE_AFTER`` batches in a row held one new entry each,
  a save made while no batch is in flight waits for the end of its
  reactor turn (``callLater(0)``); if it is then still alone, the worker
  idle (nothing running or queued: its lock, taken without waiting, keeps
  the two from ever writing at once) and the index need not be caught up
  first, the reactor writes it itself, else the turn's saves go to the
  worker as one batch. That saves two thread hand-offs (waking the
  worker, then waking the reactor) per query. With ``fsync = never`` (no
  fdatasync to overlap) every batch waits for the end of its turn and is
  written inline when the worker is idle.

Both run the same code (:meth:`LogStore._commit`) with the same outcomes.
A flat store's current segment has room preallocated after its entries
(zeros, :data:`~stop.storage.entries.PREALLOC_BYTES` at a time), so an
append changes no file size and its ``fdatasync`` commits no inode; the
room is given back when the segment is left and cut off on open after a
crash (:meth:`LogStore._preallocate`, docs/storage.rst).
After a batch the rows go into the index in the worker (one SQLite commit
per ``INDEX_ROWS`` rows or ``INDEX_DELAY`` seconds, no fsync).
Reads are synchronous: an index lookup, then a ``pread`` whose payload is
checked against its SHA-256 every time. Nothing is kept in memory per
record: the daemon's memory does not grow with the store.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sqlite3
from collections.abc import Iterator
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stop.errors import ConfigError, StoreFailed
from stop.interfaces import IRecordStore
from stop.storage import index as index_mod
# The entry format, re-exported: other modules and tests import it from here.
from stop.storage.entries import (  # noqa: F401
    DEFAULT_SEGMENT_BYTES, FORMAT_LINE, GENESIS, LINKED, MAX_LINE, MAX_RECORD_BYTES,
    MAX_TOKEN_CHARS, RECORD, BadEntry, Codec, Entry, Found, check_dir, check_entry,
    check_linked, chain_next, format_entry, fsync_dir, iter_entries, make_dir, open_file,
    oserror, parse_entry, read_entries, write_all, write_file)
from stop.storage.entries import PREALLOC_BYTES, data_end, segment_end, starts_with_nul
from stop.storage.index import Index, IndexBroken, Last
from stop.storage.writer import WriterThread

# Module-level names so tests can observe or fail them (monkeypatch).
fdatasync = os.fdatasync
fsync = os.fsync
pwrite = os.pwrite
#: Writes a segment's preallocated room (zeros).
pwrite_room = os.pwrite
#: Zeros to write room with, a block at a time.
_ZEROS = bytes(1 << 16)

#: The ``fsync`` settings: one fdatasync per batch, per record, or none.
FSYNC_MODES = ("batch", "always", "never")
#: Read-only segment descriptors kept open at most (least recently used go).
MAX_READ_FDS = 16
#: Index rows written per transaction while (re)building the index on open.
_BUILD_ROWS = 10000
#: The writer commits index rows once this many are waiting...
INDEX_ROWS = 256
#: ... or this many seconds after the first of them (whichever comes first).
INDEX_DELAY = 1.0
#: A lone entry is committed on the reactor thread (worker idle) only after
#: this many batches in a row held one new entry each: a load of several
#: clients, which sometimes leaves one entry in a turn, keeps the worker
#: (an inline fdatasync there would stall the other clients' requests).
#: Until then a save made with no batch in flight goes to the worker at
#: once, as the first of a batch.
INLINE_AFTER = 4

log = Logger()

#: Where an entry is: (segment number, offset, stored length).
Loc = tuple[int, int, int]


@implementer(IRecordStore)
class LogStore:
    """An append-only, group-committed, chained log of records and linked
    entries (see the module doc).

    :param data_dir: the store's directory (created 0700 when missing,
        unless ``readonly``).
    :param reactor: the reactor the Deferreds fire on (threads needed);
        ``None``: the global one.
    :param fsync: ``"batch"`` (one fdatasync per batch), ``"always"`` (one
        per entry, each entry its own batch) or ``"never"`` (unsafe: a
        crash can lose records whose replies were sent).
    :param segment_bytes: start a new segment file before one would grow
        past this size (a single entry larger than it gets its own segment).
    :param readonly: open for reading only (``stopctl``): no thread, no
        repair, no writes; reads also scan what the daemon appended past
        the index.
    :raise stop.errors.ConfigError: bad ``fsync`` or ``segment_bytes``.
    """

    name = "log"
    codec = Codec()

    def __init__(self, data_dir: str, reactor=None, fsync: str = "batch",
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, readonly: bool = False):
        if fsync not in FSYNC_MODES:
            raise ConfigError(f"fsync = {fsync!r}: must be one of {', '.join(FSYNC_MODES)}")
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise ConfigError(f"segment_bytes = {segment_bytes!r}: must be a positive integer")
        self.data_dir = data_dir
        self.records_dir = os.path.join(data_dir, "records")
        self.format_path = os.path.join(self.records_dir, "format")
        self._reactor = reactor
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self.readonly = readonly
        self._opened = False
        self._closed = False
        # The index: the writer's connection (its thread; open) and one for
        # reads on the reactor thread (both, in a reader, the same).
        self._wix: Optional[Index] = None
        self._rix: Optional[Index] = None
        # The chain head (reactor thread): seq and chain of the last entry
        # known durable.
        self._head_seq = 0
        self._head_chain = GENESIS
        # usage(): segment bytes (tracked per batch), other files, index files.
        self._seg_bytes = 0
        self._other_bytes = 0
        self._index_bytes = 0
        self._read_fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._released = False
        # Writer state: while a batch is in flight, _seg_*, _w_*, _ix_* and the
        # writer's index belong to whoever holds the writer's lock (the worker
        # thread, or the reactor thread committing a batch inline).
        self._pool: WriterThread | None = None
        self._shutdown_trigger = None
        self._seg_no = 0
        self._seg_fd: int | None = None
        self._seg_size = 0
        # The current segment file's size: its entries (_seg_size) and the
        # room preallocated after them (see _preallocate); whether it may
        # get more (False after a failure, until the next segment).
        self._seg_alloc = 0
        self._prealloc_ok = True
        self._dir_dirty = False
        self._w_seq = 0
        self._w_chain = GENESIS
        self._w_last: Optional[Last] = None   # the newest durable entry (the index's "last")
        self._ix_rows = 0              # rows in the writer's open index transaction
        self._ix_stale = False         # the index missed entries: catch up before the next batch
        self._ix_corrupt = False       # SQLite said it is corrupt: rebuild it before the next batch
        self._index_timer = None
        # The queued entries (kind, token, payload), as the writer takes
        # them, and their Deferreds, in the same order.
        self._pending: list[tuple[str, str, bytes]] = []
        self._waiters: list[defer.Deferred] = []
        self._reserved: set[str] = set()
        self._flushing = False
        self._turn_call = None         # the end of this reactor turn: batch what came in it
        self._arrived = 0              # entries queued since the last batch started
        self._lone = 0                 # batches in a row that had one new entry each
        self._close_waiters: list[defer.Deferred] = []

    # -- paths -------------------------------------------------------------

    def _seg_path(self, seg: int) -> str:
        return os.path.join(self.records_dir, "seg-%08d%s" % (seg, self.codec.suffix))

    def segments(self) -> list[int]:
        """Segment numbers present on disk, ascending.

        :raise StoreFailed: segments of another codec are there.
        """
        own = re.compile(r"seg-([0-9]{8})%s\Z" % re.escape(self.codec.suffix))
        found = []
        for entry in os.listdir(self.records_dir):
            m = own.match(entry)
            if m:
                found.append(int(m.group(1)))
            elif entry.startswith("seg-"):
                raise StoreFailed(f"{self.records_dir} holds {entry}, not a {self.name} segment; "
                                  "is the store setting right?")
        return sorted(found)

    # -- open --------------------------------------------------------------

    def open(self) -> None:
        """Open the store: check the directories and the format (a writer
        converts a store of stop 0.1.0 first), open the index and check it
        against the segments (rebuilding it when it does not describe
        them), index what the segments hold past it, and (writer) move a
        torn tail aside.

        :raise StoreFailed: unsafe or unusable directory, a store of another
            format, an OS error, or ``open`` called twice.
        """
        if self._opened:
            raise StoreFailed(f"{self.name} store {self.data_dir} is already open")
        try:
            self._open_dirs()
            self._check_format()
            if self.readonly:
                self._rix = Index(self.records_dir, readonly=True)
                self._rix.open()
                self._head_seq, self._head_chain = self._tail_head()
            else:
                self._open_index()
                self._cut_room()
                self._load()
                self._open_writer()
            self._count_usage()
        except OSError as exc:
            self._release_fds()
            raise oserror("cannot open store", getattr(exc, "filename", None) or self.data_dir, exc) from exc
        except StoreFailed:
            self._release_fds()
            raise
        self._opened = True
        log.info("{name} store {dir} open{ro}: {usage} bytes, head {seq} {chain}",
                 name=self.name, dir=self.data_dir, ro=" (read-only)" if self.readonly else "",
                 usage=self.usage(), seq=self._head_seq, chain=self._head_chain)

    def _open_dirs(self) -> None:
        for path in (self.data_dir, self.records_dir):
            if not self.readonly and not os.path.lexists(path):
                if path == self.records_dir:
                    from stop.storage import migrate
                    if migrate.resume(self):
                        continue
                make_dir(path)
            try:
                check_dir(path, self.readonly)
            except FileNotFoundError:
                raise StoreFailed(f"store directory {path} does not exist") from None
        if not self.readonly:
            # records/ is ours alone: 0700 even when made by an older umask.
            os.chmod(self.records_dir, 0o700)

    def _check_format(self) -> None:
        """Check ``records/format``; a writer creates it in a new store and
        converts a store of stop 0.1.0 (:mod:`stop.storage.migrate`).

        :raise StoreFailed: (reader) a store of stop 0.1.0; a format this
            code does not know.
        """
        try:
            fd = open_file(self.format_path, os.O_RDONLY)
        except FileNotFoundError:
            if self.segments():
                from stop.storage import migrate
                if self.readonly:
                    raise StoreFailed(migrate.reader_message(self)) from None
                migrate.convert(self)
                return self._check_format()
            if not self.readonly:
                write_file(self.format_path, FORMAT_LINE)
            return
        try:
            found = os.read(fd, 100)
        finally:
            os.close(fd)
        if found != FORMAT_LINE:
            raise StoreFailed(f"{self.format_path} says {found[:40]!r}, not {FORMAT_LINE!r}: "
                              "a store of another version of stop")

    def _open_index(self) -> None:
        """Writer: open the index, replacing a broken one."""
        self._wix = Index(self.records_dir, readonly=False)
        try:
            self._wix.open()
        except IndexBroken as exc:
            log.warn("{path}: unusable ({why}); rebuilding it from the segments",
                     path=self._wix.path, why=str(exc))
            self._new_index()
        self._rix = Index(self.records_dir, readonly=True)
        self._rix.open()

    def _new_index(self) -> None:
        """Writer: remove the index's files and make an empty index.

        :raise StoreFailed: it cannot be made.
        """
        self._wix.close()
        for path in index_mod.files(self.records_dir):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._wix = Index(self.records_dir, readonly=False)
        try:
            self._wix.open()
        except IndexBroken as exc:
            raise StoreFailed(f"cannot make the index {self._wix.path}: {exc}") from None

    def _load(self) -> None:
        """Writer: check the index against the segments, then index every
        entry past it (moving a torn tail aside)."""
        start = self._index_start()
        if start is None:
            self._wix.clear()
            seg, off = 0, 0
            self._head_seq, self._head_chain = self._chain_start()
        else:
            seg, off = start.seg, start.off + start.len
            self._head_seq, self._head_chain = start.seq, start.chain
        self._w_last = start
        self._index_past(seg, off)

    def _index_start(self) -> Optional[Last]:
        """The index's newest entry when the index describes these
        segments, else None (rebuild from the start).

        It does when the entry it names is there: sound with the same seq
        and chain, or damaged but still showing that seq (an entry the
        index lists was durable, so damage to it is reported by reads, not
        taken for a torn tail).
        """
        last = self._wix.last()
        if last is None:
            return None
        path = self._seg_path(last.seg)
        try:
            raw = os.pread(_open_read(path, self._read_fds, last.seg), last.len, last.off)
        except (OSError, StoreFailed):
            raw = b""
        why = None
        if len(raw) != last.len:
            why = "it names an entry past the end of the segments"
        else:
            try:
                entry = parse_entry(self.codec.decode(raw))
            except BadEntry as exc:
                salvaged = self.codec.salvage(raw)
                if salvaged is None or not self._indexed_at(salvaged, last):
                    why = f"its newest entry is not there ({exc})"
                else:
                    log.error("{path}: entry {seq} at offset {off} is damaged ({why})",
                              path=path, seq=last.seq, off=last.off, why=str(exc))
            else:
                if (entry.seq, entry.chain) != (last.seq, last.chain):
                    why = f"its newest entry {last.seq} is entry {entry.seq} there"
        if why is None:
            return last
        log.warn("{path} does not describe the segments ({why}); rebuilding it by a full scan",
                 path=self._wix.path, why=why)
        return None

    def _indexed_at(self, salvaged: tuple[str, int, str], last: Last) -> bool:
        """Does the index hold the entry ``salvaged`` says, as ``last``?"""
        kind, seq, token = salvaged
        rows = [self._wix.record(token)] if kind == RECORD else self._wix.linked(token)
        return (last.seq, last.loc) in rows

    def _index_past(self, seg: int, off: int, repair: bool = True) -> None:
        """Writer: index every entry from (seg, off) to the end,
        ``_BUILD_ROWS`` rows per commit; with ``repair`` (on open) move a
        torn tail aside, else leave it unindexed."""
        records: list = []
        linked: list = []
        skipped = 0
        segments = [s for s in self.segments() if s >= seg]
        last = self._w_last
        for s in segments:
            path = self._seg_path(s)
            tail_end = None
            for item in read_entries(self.codec, path, off if s == seg else 0):
                loc = (s, item.pos, item.end - item.pos)
                entry = item.entry
                if entry is not None:
                    row = (entry.token, entry.seq, *loc)
                    (records if entry.kind == RECORD else linked).append(row)
                    self._head_seq, self._head_chain = entry.seq, entry.chain
                    last = Last(entry.seq, *loc, entry.chain)
                elif s == segments[-1] and self._torn(path, item):
                    tail_end = item if repair else None  # torn tail: moved aside below
                    break
                else:
                    # Followed by sound entries, or in an older segment
                    # (rotation syncs a segment before the next one starts):
                    # not a crash, damage. Left as is and reported; a record
                    # whose token can still be read is indexed, so reading
                    # it says "damaged", not "unknown".
                    log.error("{path}: bad entry at offset {off} ({why}), {n} bytes",
                              path=path, off=loc[1], why=item.why, n=loc[2])
                    if item.salvaged and item.salvaged[0] == RECORD:
                        records.append((item.salvaged[2], item.salvaged[1], *loc))
                if len(records) + len(linked) >= _BUILD_ROWS:
                    skipped += self._wix.add(records, linked, last)
                    self._wix.commit()
                    records, linked = [], []
            if tail_end is not None:
                self._move_torn_tail(s, tail_end.pos, tail_end.why)
        if records or linked or last != self._w_last:
            skipped += self._wix.add(records, linked, last)
            self._wix.commit()
        if skipped:
            log.error("{dir}: {n} records reuse a token stored before them; the index keeps the first",
                      dir=self.records_dir, n=skipped)
        self._w_last = last

    def _torn(self, path: str, item: Found) -> bool:
        """Is the bad ``item`` of the last segment at ``path`` where a crash
        tore it: at the end of its entries, or (a codec that pads) a hole of
        NULs in its room that a power loss left before later bytes of the
        same unacknowledged batch (:func:`~stop.storage.entries.starts_with_nul`)?
        Everything from there on is then the torn tail."""
        if item.end >= segment_end(self.codec, path):
            return True
        return self.codec.pads and starts_with_nul(path, item.pos)

    def _move_torn_tail(self, seg: int, offset: int, why: str) -> None:
        """Copy a torn tail to ``torn-<seg>-<offset>`` (0600, durable), then
        truncate the segment to its last good entry."""
        seg_path = self._seg_path(seg)
        with open(seg_path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        base = os.path.join(self.records_dir, "torn-%08d-%d" % (seg, offset))
        for n in range(1000):  # bounded: same name again only after repeated crashes at one spot
            path = base if n == 0 else f"{base}.{n}"
            try:
                fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                continue
        else:
            raise StoreFailed(f"cannot name a torn-tail file next to {base}")
        try:
            write_all(fd, tail)
            fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.records_dir)
        _cut_file(seg_path, offset)
        log.warn("{seg}: torn tail of {n} bytes at offset {off} ({why}), from a crash before its reply; "
                 "moved to {path} and truncated", seg=seg_path, n=len(tail), off=offset, why=why, path=path)

    def _count_usage(self) -> None:
        self._seg_bytes = self._other_bytes = self._index_bytes = 0
        index_files = set(os.path.basename(p) for p in index_mod.files(self.records_dir))
        seg_re = re.compile(r"seg-[0-9]{8}%s\Z" % re.escape(self.codec.suffix))
        current = os.path.basename(self._seg_path(self._seg_no)) if self._seg_fd is not None else None
        last = None
        for entry in os.listdir(self.records_dir):
            size = os.lstat(os.path.join(self.records_dir, entry)).st_size
            if seg_re.match(entry):
                # The room after the current segment's entries is not
                # counted: the writer's own figure (read on another thread:
                # a batch old at worst), else (a reader) read from the file.
                self._seg_bytes += self._seg_size if entry == current else size
                if last is None or entry > last:
                    last = entry
            elif entry in index_files:
                self._index_bytes += size
            else:
                self._other_bytes += size
        if current is None and last is not None and self.codec.pads:
            path = os.path.join(self.records_dir, last)
            try:
                self._seg_bytes -= os.path.getsize(path) - segment_end(self.codec, path)
            except OSError:
                pass

    def _open_writer(self) -> None:
        segments = self.segments()
        if segments:
            self._seg_no = segments[-1]
            self._seg_fd = open_file(self._seg_path(self._seg_no), os.O_WRONLY)
            self._seg_size = self._seg_alloc = os.fstat(self._seg_fd).st_size
        self._w_seq, self._w_chain = self._head_seq, self._head_chain
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        self._pool = WriterThread(self._reactor, f"stop-{self.name}-store")
        self._pool.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)

    # -- write -------------------------------------------------------------

    def _check_writable(self) -> None:
        if not self._opened or self._closed or self.readonly or not self._pool.started:
            # (the pool stops early when the reactor shuts down)
            raise StoreFailed(f"{self.name} store {self.data_dir} is not open for writing")

    def save(self, token: str, record: bytes) -> defer.Deferred:
        """Queue ``record`` under ``token``; see :meth:`IRecordStore.save`.

        :return: a Deferred firing ``None`` once the entry is durable (per
            the ``fsync`` setting), or failing with StoreFailed (bad or
            reused token, closed or read-only store, an OS error).
        """
        try:
            self._check_writable()
            check_entry(token, record)
            if token in self._reserved:
                raise StoreFailed(f"token {token} is already stored; a token is never reused")
        except StoreFailed:
            return defer.fail()
        self._reserved.add(token)
        return self._queue(RECORD, token, record)

    def save_linked(self, token: str, entry: bytes) -> defer.Deferred:
        """Queue ``entry`` linked to the record of ``token``; see
        :meth:`IRecordStore.save_linked`.

        :return: a Deferred firing ``None`` once the entry is durable, or
            failing with StoreFailed (unknown token, bad entry, closed or
            read-only store, an OS error).
        """
        try:
            self._check_writable()
            check_linked(token, entry)
        except StoreFailed:
            return defer.fail()
        return self._queue(LINKED, token, entry)

    def _queue(self, kind: str, token: str, payload: bytes) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((kind, token, payload))
        self._waiters.append(d)
        self._arrived += 1
        if not self._flushing and self._turn_call is None:
            if self._fsync == "never" or self._lone >= INLINE_AFTER:
                # Maybe inline: right after this turn's I/O, with what came in it.
                self._turn_call = self._reactor.callLater(0, self._end_of_turn)
            else:
                # To the worker at once: its fdatasync overlaps the rest of
                # this turn (waiting for the end of the turn cost ~20 % of
                # the throughput at 50 clients).
                self._flush()
        return d

    def _end_of_turn(self) -> None:
        """Reactor: commit what this turn queued, inline when it may."""
        self._turn_call = None
        if not self._flushing and self._pending:
            self._flush(turn=True)

    def _flush_turn_now(self) -> None:
        """Reactor: hand what the current turn queued to the worker now
        (close, shutdown: they must not wait for the end of the turn)."""
        if self._turn_call is not None:
            if self._turn_call.active():
                self._turn_call.cancel()
            self._turn_call = None
            if not self._flushing and self._pending:
                self._flush()

    def _flush(self, turn: bool = False) -> None:
        """Commit the queued entries as one batch ("always": one entry per
        batch): inline when ``turn`` (the end of a reactor turn) and
        :meth:`_may_inline` says so, else in the worker; the index rows
        follow once the Deferreds are on their way."""
        arrived, self._arrived = self._arrived, 0
        if arrived == 1:
            self._lone += 1
        elif arrived > 1:
            self._lone = 0
        stopped = self._pool is None or not self._pool.started
        if self._fsync != "always" or stopped:  # all of them, without copies
            items, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
        else:
            items, self._pending = self._pending[:1], self._pending[1:]
            waiters, self._waiters = self._waiters[:1], self._waiters[1:]
        self._flushing = True
        if stopped:
            # The reactor shuts down and the worker is gone: fail them
            # rather than leave them (and a close) waiting for ever.
            error = StoreFailed(f"{self.name} store {self.data_dir}: the writer stopped (shutdown)")
            self._committed(([error] * len(items), 0, None), items, waiters)
            return
        if self._index_timer is None:
            self._index_timer = self._reactor.callLater(INDEX_DELAY, self._index_due)
        if turn and self._may_inline(len(items)) and self._pool.hold_if_idle():
            try:
                done = not self._ix_stale  # (read under the lock) catching up may take long
                if done:
                    try:
                        result = self._commit(items)
                    except Exception:
                        result = Failure()
            finally:
                self._pool.release()
            if done:
                self._committed(result, items, waiters)
                if self._pool is not None and self._ix_rows >= INDEX_ROWS:
                    self._pool.call(self._index_some)
                return
        d = self._pool.call(self._commit, items, then=self._index_some)
        d.addBoth(self._committed, items, waiters)

    def _may_inline(self, size: int) -> bool:
        """May a batch of ``size`` entries be committed on the reactor
        thread (if the worker is idle)? See the module doc."""
        if self._fsync == "never":
            return True
        return size == 1 and not self._pending  # (and INLINE_AFTER: see _queue)

    def _index_due(self) -> None:
        """Reactor: INDEX_DELAY after a batch, have the writer commit the
        rows still waiting (queued behind the batches in flight)."""
        self._index_timer = None
        if self._pool is not None and self._pool.started:
            self._pool.call(self._index_commit)

    def _committed(self, result, items: list, waiters: list) -> None:
        """Reactor thread: fire the Deferreds (``waiters``) of a batch's
        ``items``, start the next batch. ``_flushing`` stays set while the
        Deferreds fire, so a callback's ``save`` queues and its ``close``
        waits."""
        if isinstance(result, tuple):
            outcomes, added, head = result
        else:  # not an OSError: a bug; fail the batch, keep the store going
            log.failure("{name} store: batch of {n} failed", result, name=self.name, n=len(items))
            error = StoreFailed(f"{self.name} store: internal error: {result.value!r}")
            outcomes, added, head = [error] * len(items), 0, None
        self._seg_bytes += added
        if head is not None:
            self._head_seq, self._head_chain = head
        if any(outcomes):
            errors = [o for o in outcomes if o is not None]
            log.error("{name} store: {n} of {m} entries not stored: {error}",
                      name=self.name, n=len(errors), m=len(items), error=errors[0])
        for (kind, token, _), d, outcome in zip(items, waiters, outcomes):
            if kind == RECORD:
                self._reserved.discard(token)
            if outcome is not None:
                d.errback(outcome)
            else:
                d.callback(None)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closed:
            self._finish_close()


    def _commit(self, items: list[tuple[str, str, bytes]]):
        """Writer (the worker thread, or the reactor thread holding the
        writer's lock: see :meth:`_flush`): append ``items`` durably, their
        index rows in the index's open transaction (committed later:
        :meth:`_index_commit`).

        The duplicate check and the rows go into the index *before* the
        write (so a token is never taken twice); rows of entries whose
        write failed are taken out again.

        :return: ``(outcomes, added, head)``: per item ``None`` when it is
            durable, else a StoreFailed; the bytes added on disk; the
            (seq, chain) of the last durable entry (``None`` when none).
        """
        outcomes: list = [None] * len(items)
        try:
            if self._ix_stale:
                self._catch_up()
            plan = self._plan(items, outcomes)
        except (sqlite3.Error, OSError, StoreFailed) as exc:
            self._index_failed(exc)
            error = StoreFailed(f"{self.name} store {self.data_dir}: the index cannot be used ({exc}); "
                                "nothing stored")
            return [o or error for o in outcomes], 0, None
        added = 0
        durable = 0   # entries of plan durable so far
        error = None
        try:
            start = 0
            while start < len(plan):
                seg = plan[start][3]
                end = start
                while end < len(plan) and plan[end][3] == seg:
                    end += 1
                if self._seg_fd is None or seg != self._seg_no:
                    if self._seg_fd is not None:
                        self._give_back_room()
                        os.close(self._seg_fd)
                        self._seg_fd = None
                    self._new_segment()
                # Rotation always syncs the old segment (even with
                # fsync=never) so that only the last one can be torn.
                last_group = end == len(plan)
                raw = plan[start][6] if end - start == 1 else b"".join([p[6] for p in plan[start:end]])
                added += self._append(raw, sync=self._fsync != "never" or not last_group)
                durable, start = end, end
        except OSError as exc:
            error = oserror("cannot write", getattr(exc, "filename", None) or self._seg_path(self._seg_no), exc)
            lost = plan[durable:]
            try:
                self._wix.drop([(p[1], p[2]) for p in lost if p[0] == RECORD],
                               [(p[1], p[2]) for p in lost if p[0] == LINKED])
            except sqlite3.Error as exc2:
                self._index_failed(exc2)
            for p in lost:
                outcomes[p[7]] = error
        self._ix_rows += durable
        if not durable:
            return outcomes, added, None
        kind, token, seq, seg, off, length, raw, _, chain = plan[durable - 1]
        self._w_last = Last(seq, seg, off, length, chain)
        self._w_seq, self._w_chain = seq, chain
        return outcomes, added, (seq, chain)

    def _plan(self, items: list, outcomes: list, checked: bool = False) -> list:
        """Worker thread: number, chain, place and index ``items``: a list
        of ``(kind, token, seq, seg, off, len, raw, item index, chain)`` in
        write order, rows already in the index's open transaction; refused
        items get their StoreFailed in ``outcomes``.

        The inserts are the duplicate check of a batch of records alone
        (the common case): one record's insert, or a batch's inserts all
        or none (:meth:`Index.add_new`); only when one of them was stored
        already, or the batch has linked entries (whose records must be
        there), does one query first ask which tokens the index knows
        (``checked``).

        :raise sqlite3.Error: the index cannot be read or written.
        """
        ix = self._wix
        single = len(items) == 1 and items[0][0] == RECORD
        fast = not checked and (single or all(item[0] == RECORD for item in items))
        before = set() if fast else ix.known([item[1] for item in items])
        here: set[str] = set()
        plan = []
        rows: tuple[list, list] = ([], [])  # records, linked
        seq, chain = self._w_seq, self._w_chain
        seg = self._seg_no
        size = self._seg_size if self._seg_fd is not None else None
        encode = self.codec.encode
        for i, (kind, token, payload) in enumerate(items):
            stored = token in before or token in here
            if kind == RECORD:
                if stored:
                    outcomes[i] = StoreFailed(f"token {token} is already stored; a token is never reused")
                    continue
                here.add(token)
            elif not stored:
                outcomes[i] = StoreFailed(f"no record for token {token}: nothing to link an entry to")
                continue
            line, next_chain = format_entry(kind, seq + 1, token, payload, chain)
            raw = encode(line)
            n = len(raw)
            if size is None or (size > 0 and size + n > self._segment_bytes):
                seg, size = seg + 1, 0
            row = (token, seq + 1, seg, size, n)
            if single:
                if not ix.add_record(row):
                    outcomes[i] = StoreFailed(f"token {token} is already stored; a token is never reused")
                    return []
            else:
                rows[kind == LINKED].append(row)
            seq, chain = seq + 1, next_chain
            plan.append((kind, token, seq, seg, size, n, raw, i, chain))
            size += n
        if fast and rows[0]:
            if not ix.add_new(rows[0]):
                # A token stored before (nothing was inserted): plan again,
                # asking the index which.
                outcomes[:] = [None] * len(items)
                return self._plan(items, outcomes, checked=True)
        elif rows[0] or rows[1]:
            ix.add(*rows)
        return plan

    def _index_some(self) -> None:
        """Worker thread, after a batch's Deferreds were handed over: commit
        the index when INDEX_ROWS rows wait (else the timer does it)."""
        if self._ix_rows >= INDEX_ROWS:
            self._index_commit()

    def _index_commit(self) -> None:
        """Worker thread: commit the index's open transaction with the
        newest entry as its ``last`` (no fsync: a crash loses at most rows
        the next open finds again in the segments). Until then a lookup
        finds the entries by scanning past the committed index."""
        if self._wix is None or not self._wix.usable:
            return
        try:
            if self._ix_rows and self._w_last is not None:
                self._wix.set_last(self._w_last)
            self._wix.commit()
        except sqlite3.Error as exc:
            self._index_failed(exc)
            return
        self._ix_rows = 0
        try:
            self._index_bytes = sum(os.stat(p).st_size for p in index_mod.files(self.records_dir)
                                    if os.path.exists(p))
        except OSError:
            pass

    def _index_failed(self, exc: Exception) -> None:
        """Worker thread: the index could not be written: drop its open
        transaction; the next batch first indexes again what the segments
        hold past its committed part (and fails while it cannot)."""
        if not self._ix_stale:
            log.error("cannot use the index {path}: {exc}; catching up from the segments "
                      "before the next batch", path=self._wix.path, exc=str(exc))
        self._ix_stale = True
        # SQLite's plain DatabaseError says the file is corrupt (not a
        # passing failure): rebuilt before the next batch.
        self._ix_corrupt = self._ix_corrupt or type(exc) is sqlite3.DatabaseError
        try:
            self._wix.rollback()
        except sqlite3.Error:
            pass
        self._ix_rows = 0

    def _catch_up(self) -> None:
        """Worker thread: index every entry past the committed index; an
        index SQLite says is corrupt (not a passing failure: disk full,
        I/O, locked) is rebuilt from the segments instead, as open does.

        :raise sqlite3.Error, OSError, StoreFailed: it cannot.
        """
        try:
            if self._ix_corrupt:
                raise sqlite3.DatabaseError("it failed as corrupt")
            self._wix.rollback()
            last = self._wix.last()
            self._w_last = last
            seg, off = (last.seg, last.off + last.len) if last else (0, 0)
            self._index_past(seg, off, repair=False)
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # OperationalError & co: retried
                raise
            self._rebuild_index(exc)
        self._ix_stale = False
        log.info("the index {path} caught up with the segments", path=self._wix.path)

    def _rebuild_index(self, why: Exception) -> None:
        """Worker thread: replace a corrupt index by a new one made from a
        full scan of the segments (batches wait meanwhile: about 25 s per
        million records); the reactor thread then reopens its reader."""
        log.error("the index {path} is corrupt ({why}); rebuilding it from the segments",
                  path=self._wix.path, why=str(why))
        self._new_index()
        self._w_last = None
        self._index_past(0, 0, repair=False)
        self._ix_corrupt = False
        self._reactor.callFromThread(self._reopen_reader)

    def _reopen_reader(self) -> None:
        """Reactor thread: read the index that replaced a corrupt one."""
        if self._released:
            return
        old, self._rix = self._rix, Index(self.records_dir, readonly=True)
        self._rix.open()
        if old is not None:
            old.close()

    def _append(self, buf: bytearray, sync: bool) -> int:
        """Worker thread: write ``buf`` at the end of the current segment
        (and fdatasync it). On failure the segment is cut back to its old
        size, best effort, so the next batch starts on a clean entry.

        :return: bytes added.
        """
        if self._dir_dirty:
            fsync_dir(self.records_dir)
            self._dir_dirty = False
        start = self._seg_size
        if start + len(buf) > self._seg_alloc:
            self._preallocate(start, start + len(buf))
        try:
            view = memoryview(buf)
            off = start
            while view:
                n = pwrite(self._seg_fd, view, off)
                view, off = view[n:], off + n
            if sync:
                fdatasync(self._seg_fd)
        except OSError:
            try:
                os.ftruncate(self._seg_fd, start)
                self._seg_alloc = start
            except OSError as exc:
                log.error("cannot cut {path} back to {size} bytes after a failed write: {exc}",
                          path=self._seg_path(self._seg_no), size=start, exc=exc)
            raise
        self._seg_size = start + len(buf)
        return len(buf)

    def _new_segment(self) -> str:
        """Worker thread: create the next segment (0600), make it and its
        directory entry durable, and make it current."""
        path = self._seg_path(self._seg_no + 1)
        self._seg_fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self._seg_no += 1
        self._seg_size = self._seg_alloc = 0
        self._prealloc_ok = True
        self._dir_dirty = True  # retried before the next write if this fails
        fsync(self._seg_fd)
        fsync_dir(self.records_dir)
        self._dir_dirty = False
        return path

    def _preallocate(self, start: int, end: int) -> None:
        """Writer: before entries go at ``start`` .. ``end``, give the
        current segment room up to ``end`` and :data:`PREALLOC_BYTES` more
        (not past the segment size, unless ``end`` is): zeros written after
        its entries, so that the appends into them change no file size and
        allocate no block, and their fdatasync has only the data to flush
        (ext4, this VM: a median of 0.17 ms against 0.23, p99 0.5 against
        0.83-0.95). Zeros rather than ``posix_fallocate``: a durable
        append into them relies on no file system's handling of unwritten
        extents. The room reads as NUL bytes (:func:`data_end`); it is
        given back when the segment is left (:meth:`_give_back_room`). A
        failure (no space) is logged, what was written of the room is cut
        back, and the segment is appended to without room until the next
        one: never a lost write. Never raises."""
        if not (self._prealloc_ok and self.codec.pads):
            return
        base = max(self._seg_alloc, start)  # never over an entry
        target = max(end, min(end + PREALLOC_BYTES, self._segment_bytes))
        try:
            off = base
            zeros = memoryview(_ZEROS)
            while off < target:
                off += pwrite_room(self._seg_fd, zeros[:min(target - off, len(zeros))], off)
        except OSError as exc:
            self._prealloc_ok = False
            try:
                os.ftruncate(self._seg_fd, base)
            except OSError:
                pass  # the next open cuts it (_cut_room)
            log.warn("cannot preallocate room in {path} ({exc}); appending to it without "
                     "(each fdatasync then commits the file size too)",
                     path=self._seg_path(self._seg_no), exc=exc)
            return
        self._seg_alloc = target

    def _give_back_room(self) -> None:
        """Writer: cut the current segment file back to its entries (before
        it is left: the next segment starts, or the store closes), durably.
        A failure is logged; the next open cuts the room (:meth:`_cut_room`)."""
        if self._seg_alloc <= self._seg_size:
            return
        try:
            os.ftruncate(self._seg_fd, self._seg_size)
            fsync(self._seg_fd)
        except OSError as exc:
            log.warn("cannot cut {path} back to its entries ({exc}); the next open will",
                     path=self._seg_path(self._seg_no), exc=exc)
            return
        self._seg_alloc = self._seg_size

    def _cut_room(self) -> None:
        """Writer, on open: cut back to its entries every segment that still
        has preallocated room (NUL bytes at its end: left by a crash, or by
        a failure to cut it), durably, before the segments are read."""
        if not self.codec.pads:
            return
        segments = self.segments()
        for seg in segments:
            path = self._seg_path(seg)
            fd = open_file(path, os.O_RDONLY)  # most are read here, never written
            try:
                size = os.fstat(fd).st_size
                if not size or os.pread(fd, 1, size - 1) != b"\0":
                    continue
                end = data_end(fd)
            finally:
                os.close(fd)
            _cut_file(path, end)
            # The last segment's room is what a crash leaves; an older one's
            # only a failed cut at rotation (logged then) leaves.
            (log.info if seg == segments[-1] else log.warn)(
                "{path}: {n} bytes of room preallocated after its entries cut off "
                "(left by a crash or a failed cut)", path=path, n=size - end)

    # -- read --------------------------------------------------------------

    def _raw_at(self, loc: Loc) -> bytes:
        seg, off, length = loc
        try:
            return os.pread(_open_read(self._seg_path(seg), self._read_fds, seg), length, off)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise oserror("cannot read", self._seg_path(seg), exc) from exc

    def raw_at(self, loc: Loc) -> bytes:
        """The stored bytes at ``loc`` (``(segment, offset, length)``), as
        they are (``b""`` when the segment is gone).

        :raise StoreFailed: an OS error.
        """
        return self._raw_at(loc)

    def _payload(self, kind: str, token: str, loc: Loc) -> bytes:
        """The checked payload of the entry of ``kind`` for ``token`` at ``loc``.

        :raise StoreFailed: the bytes there are not that sound entry
            (damaged), or an OS error.
        """
        seg, off, _ = loc
        try:
            entry = parse_entry(self.codec.decode(self._raw_at(loc)))
        except BadEntry as exc:
            why = str(exc)
        else:
            if (entry.kind, entry.token) == (kind, token):
                return entry.payload
            why = f"another entry ({entry.kind} {entry.token}) is there"
        what = "record" if kind == RECORD else "entry linked to"
        raise StoreFailed(f"{what} {token} in {self._seg_path(seg)} at offset {off} is damaged ({why})")

    def _walk(self, seg: int = 0, off: int = 0, trailing: bool = False) -> Iterator[tuple[int, Found]]:
        """Every entry from (seg, off) to the end, in log order, sound or
        not, as ``(segment, found)``, read in bounded memory. Bad bytes at
        the very end of the last segment (a torn tail the writer moves
        aside when it opens, or an entry it is writing right now) come only
        when ``trailing``.

        :raise StoreFailed: a segment cannot be read.
        """
        segments = [s for s in self.segments() if s >= seg]
        for s in segments:
            path = self._seg_path(s)
            held = None
            try:
                for found in read_entries(self.codec, path, off if s == seg else 0):
                    if held is not None:
                        yield s, held
                    held = found
            except FileNotFoundError:
                continue  # pruned meanwhile
            except OSError as exc:
                raise oserror("cannot read", path, exc) from exc
            if held is not None and (held.entry is not None or trailing or s != segments[-1]):
                yield s, held

    def _tail(self) -> Iterator[tuple[int, Found]]:
        """Every entry past what the committed index covers (what a writer
        appended since); a read-only store without index walks everything."""
        last = self._rix.last() if self._rix is not None else None
        return self._walk(*((last.seg, last.off + last.len) if last else (0, 0)))

    def _tail_head(self) -> tuple[int, str]:
        with self._snapshot():
            last = self._rix.last() if self._rix is not None else None
            head = (last.seq, last.chain) if last else self._chain_start()
            for _, found in self._tail():
                if found.entry is not None:
                    head = (found.entry.seq, found.entry.chain)
        return head

    def _snapshot(self):
        """A consistent view of the index for the reads inside (see
        :meth:`Index.snapshot`)."""
        return self._rix.snapshot() if self._rix is not None else contextlib.nullcontext()

    def _chain_start(self) -> tuple[int, str]:
        """(seq, chain) before the first entry: the checkpoint's after a
        prune (:mod:`stop.storage.chain`)."""
        from stop.storage.chain import read_checkpoint
        cp = read_checkpoint(self.records_dir)
        return cp.seq, cp.chain

    def _find(self, kind: str, token: str) -> list[Loc]:
        """Locations of ``kind`` entries of ``token`` past the index,
        including damaged ones that still show it."""
        found = []
        for seg, item in self._tail():
            e = item.entry
            if e is not None:
                if (e.kind, e.token) == (kind, token):
                    found.append((seg, item.pos, item.end - item.pos))
            elif item.salvaged and (item.salvaged[0], item.salvaged[2]) == (kind, token):
                found.append((seg, item.pos, item.end - item.pos))
        return found

    def _record_loc(self, token: str) -> Optional[Loc]:
        with self._snapshot():
            row = self._rix.record(token) if self._rix is not None else None
            if row is not None:
                return row[1]
            found = self._find(RECORD, token)
        return found[0] if found else None

    def locate(self, kind: str, token: str) -> list[Loc]:
        """Where the entries of ``kind`` (``"R"``, ``"L"``) of ``token`` are,
        as ``(segment, offset, length)``, oldest first."""
        self._check_open()
        if kind == RECORD:
            loc = self._record_loc(token)
            return [] if loc is None else [loc]
        with self._snapshot():
            locs = [loc for _, loc in self._rix.linked(token)] if self._rix is not None else []
            return locs + [loc for loc in self._find(LINKED, token) if loc not in locs]

    def get(self, token: str) -> bytes | None:
        """The stored bytes of ``token``, verified against their SHA-256, or
        ``None``.

        :raise StoreFailed: the entry is damaged, or an OS error.
        """
        self._check_open()
        loc = self._record_loc(token)
        return None if loc is None else self._payload(RECORD, token, loc)

    def linked(self, token: str) -> list[bytes]:
        """The entries linked to ``token``, oldest first, each verified
        against its SHA-256; ``[]`` when none or the token is unknown.

        :raise StoreFailed: an entry is damaged, or an OS error.
        """
        return [self._payload(LINKED, token, loc) for loc in self.locate(LINKED, token)]

    def integrity(self, token: str) -> bool:
        """Whether the stored entry of ``token`` checks out (framing, gzip
        CRC, SHA-256 of the record); ``False`` for an unknown token. Used
        by ``stopctl verify``.

        :raise StoreFailed: an OS error.
        """
        self._check_open()
        loc = self._record_loc(token)
        if loc is None:
            return False
        try:
            self._payload(RECORD, token, loc)
        except StoreFailed as exc:
            if " is damaged " not in str(exc):
                raise
            return False
        return True

    def tokens_with_prefix(self, prefix: str, limit: int = 20) -> list[str]:
        """Tokens of stored records that start with ``prefix`` as given,
        lower-cased or upper-cased (tokens are lowercase hex), sorted, at
        most ``limit``."""
        self._check_open()
        variants = {prefix, prefix.lower(), prefix.upper()}
        found = set()
        with self._snapshot():
            if self._rix is not None:
                for v in variants:
                    found.update(self._rix.with_prefix(v, limit))
            for _, item in self._tail():
                token = item.entry.token if item.entry else (item.salvaged[2] if item.salvaged else None)
                kind = item.entry.kind if item.entry else (item.salvaged[0] if item.salvaged else None)
                if kind == RECORD and any(token.startswith(v) for v in variants):
                    found.add(token)
        return sorted(found)[:limit]

    def entries(self, trailing: bool = False) -> Iterator[tuple[int, Found]]:
        """Every entry of every segment in log order, sound or not, as
        ``(segment, found)``; read in bounded memory, without the index
        (``stopctl list``, ``verify --all``, ``stats``). ``trailing``: see
        :meth:`_walk`.

        :raise StoreFailed: a segment cannot be read.
        """
        self._check_open()
        return self._walk(trailing=trailing)

    def records(self) -> Iterator[tuple[str, bytes]]:
        """Every sound ``(token, record)``, oldest first, read from the
        segments; damaged entries are logged and skipped (``stopctl list``
        reports them)."""
        for seg, item in self.entries():
            if item.entry is None:
                log.error("{path}: bad entry at offset {off} ({why}), skipped",
                          path=self._seg_path(seg), off=item.pos, why=item.why)
            elif item.entry.kind == RECORD:
                yield item.entry.token, item.entry.payload

    def head(self) -> tuple[int, str]:
        """The chain head: ``(count, chain)`` of the last durable entry
        (``(0, GENESIS)`` for an empty store, the checkpoint's when all
        that was written is pruned). A writer's is known after ``close``
        too (the daemon logs it at stop); a reader reads what the daemon
        appended since.

        :raise StoreFailed: never opened (a reader: closed).
        """
        if not self._opened or (self.readonly and self._released):
            raise StoreFailed(f"{self.name} store {self.data_dir} is not open")
        if self.readonly:
            self._head_seq, self._head_chain = self._tail_head()
        return self._head_seq, self._head_chain

    def recount_usage(self) -> None:
        """Count the bytes under records/ again from the files (after a
        ``stopctl prune`` removed segments; the daemon does it whenever it
        logs the chain head). A batch being written meanwhile may be
        counted twice until the next count."""
        self._check_open()
        self._count_usage()

    def usage(self) -> int:
        """Bytes on disk under records/: segments (tracked per batch),
        index and other files (as of the last index commit)."""
        return self._seg_bytes + self._other_bytes + self._index_bytes

    def __len__(self) -> int:
        """Records in the index (counts them all: not for a hot path)."""
        self._check_open()
        return self._rix.count() if self._rix is not None else 0

    def _check_open(self) -> None:
        if not self._opened or self._released:
            raise StoreFailed(f"{self.name} store {self.data_dir} is not open")

    # -- close -------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Stop taking saves; fire once every queued save completed and the
        files are released. Idempotent."""
        d = defer.Deferred()
        if self._closed or not self._opened:
            self._closed = True
            self._release_fds()
            d.callback(None)
            return d
        self._closed = True
        self._close_waiters.append(d)
        self._flush_turn_now()
        if not self._flushing:
            self._finish_close()
        return d

    def _stop_pool(self) -> None:
        """Stop the worker once it wrote what is queued (idempotent)."""
        self._flush_turn_now()
        if self._pool is not None:
            self._pool.stop()

    def _finish_close(self) -> None:
        self._stop_pool()
        self._pool = None
        if self._index_timer is not None:
            if self._index_timer.active():
                self._index_timer.cancel()
            self._index_timer = None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._index_commit()
        if self._seg_fd is not None:
            self._give_back_room()
        self._release_fds()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def _release_fds(self) -> None:
        for ix in (self._rix, self._wix):
            if ix is not None:
                ix.close()
        for fd in [self._seg_fd, *self._read_fds.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._seg_fd = None
        self._read_fds = collections.OrderedDict()
        self._released = True


def _cut_file(path: str, size: int) -> None:
    """Truncate the file at ``path`` to ``size`` bytes, durably."""
    fd = open_file(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        fsync(fd)
    finally:
        os.close(fd)


def _open_read(path: str, cache: collections.OrderedDict, key) -> int:
    """A cached read-only fd for ``path`` (at most MAX_READ_FDS kept)."""
    fd = cache.get(key)
    if fd is None:
        fd = open_file(path, os.O_RDONLY)
        cache[key] = fd
        while len(cache) > MAX_READ_FDS:
            os.close(cache.popitem(last=False)[1])
    else:
        cache.move_to_end(key)
    return fd
