"""The append-only log engine shared by the ``flat`` and ``gzip`` stores.

Layout under ``data_dir`` (see docs/storage.rst)::

    records/                    0700
        seg-00000001.log[.gz]   0600, append-only entries, rotated at segment_bytes
        index                   0600, a cache: "<token> <segment> <offset> <length>\\n"
        torn-<segment>-<offset> 0600, bytes of a torn tail moved aside on open

An entry is the line ``<token> <sha256-hex-of-record> <record>\\n``, stored
as is (flat) or as its own gzip member (gzip); a codec (:class:`Codec`) is
the only difference between the two stores. The segments are the truth; the
index only saves a scan on open.

Writes: ``save`` queues the entry; one worker thread writes each batch with
one write and one ``fdatasync`` (group commit), then every Deferred of the
batch fires on the reactor thread. Reads (``get``, ``records``) are
synchronous ``pread`` calls and verify the record's SHA-256 every time.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from stop.errors import ConfigError, StoreFailed
from stop.interfaces import IRecordStore
from stop.storage.writer import WriterThread

# Module-level names so tests can observe or fail them (monkeypatch).
fdatasync = os.fdatasync
fsync = os.fsync
pwrite = os.pwrite

#: The ``fsync`` settings: one fdatasync per batch, per record, or none.
FSYNC_MODES = ("batch", "always", "never")
#: Default segment size at which a new segment file is started (bytes).
DEFAULT_SEGMENT_BYTES = 64 * 2**20
#: Largest record accepted (bytes); bounds memory when a segment is scanned.
MAX_RECORD_BYTES = 4 * 2**20
#: Longest token accepted (characters).
MAX_TOKEN_CHARS = 256

_TOKEN_RE = re.compile(rb"[!-~]{1,%d}\Z" % MAX_TOKEN_CHARS)
_HASH_RE = re.compile(rb"[0-9a-f]{64}\Z")
_INDEX_RE = re.compile(rb"([!-~]{1,%d}) ([0-9]{1,9}) ([0-9]{1,20}) ([0-9]{1,20})\Z" % MAX_TOKEN_CHARS)
_MAX_LINE = MAX_TOKEN_CHARS + 66 + MAX_RECORD_BYTES + 1
_READ_CHUNK = 4096

log = Logger()


def check_entry(token: str, record: bytes) -> None:
    """Check that ``token`` and ``record`` can be stored (every store,
    ``memory`` too, accepts exactly the same).

    :raise stop.errors.StoreFailed: ``token`` is not 1..256 printable ASCII
        characters without space, or ``record`` is not bytes, holds a
        newline, or is larger than :data:`MAX_RECORD_BYTES`.
    """
    if not isinstance(token, str) or not _TOKEN_RE.match(token.encode("utf-8")):
        raise StoreFailed(f"bad token {token!r}: want 1..{MAX_TOKEN_CHARS} printable ASCII characters, no space")
    if not isinstance(record, bytes):
        raise StoreFailed(f"record for {token} is {type(record).__name__}, not bytes")
    if b"\n" in record:
        raise StoreFailed(f"record for {token} holds a newline (not canonical JSON)")
    if len(record) > MAX_RECORD_BYTES:
        raise StoreFailed(f"record for {token} is {len(record)} bytes, over {MAX_RECORD_BYTES}")


def format_line(token: str, record: bytes) -> bytes:
    """The uncompressed entry: ``<token> <sha256-hex> <record>\\n``."""
    digest = hashlib.sha256(record).hexdigest().encode("ascii")
    return b"%s %s %s\n" % (token.encode("ascii"), digest, record)


class BadEntry(Exception):
    """An entry that is incomplete or fails its checks (``str()`` says why)."""


def parse_line(line: bytes) -> tuple[str, bytes]:
    """Split and verify one uncompressed entry (with its newline).

    :return: ``(token, record)``.
    :raise BadEntry: wrong shape, or the record's SHA-256 differs.
    """
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise BadEntry("not one newline-terminated line")
    parts = line[:-1].split(b" ", 2)
    if len(parts) != 3 or not _TOKEN_RE.match(parts[0]) or not _HASH_RE.match(parts[1]):
        raise BadEntry("not '<token> <sha256> <record>'")
    token, digest, record = parts
    if hashlib.sha256(record).hexdigest().encode("ascii") != digest:
        raise BadEntry("record does not match its SHA-256")
    return token.decode("ascii"), record


class Codec:
    """How entries sit in a segment file: the one thing flat and gzip
    differ in. This base class stores lines as they are (flat)."""

    #: Segment file name suffix.
    suffix = ".log"

    def encode(self, line: bytes) -> bytes:
        """The bytes appended to a segment for one entry ``line``."""
        return line

    def next_entry(self, buf: bytes, pos: int) -> tuple[bytes, int]:
        """Read the entry starting at ``buf[pos]``.

        :return: ``(line, end)``: the uncompressed line and the offset just
            past the stored entry.
        :raise BadEntry: incomplete or malformed (not yet hash-checked).
        """
        end = buf.find(b"\n", pos, pos + _MAX_LINE)
        if end < 0:
            raise BadEntry("no newline: incomplete entry")
        return buf[pos:end + 1], end + 1

    def decode(self, raw: bytes) -> bytes:
        """The line of exactly one stored entry ``raw`` (for ``get``).

        :raise BadEntry: ``raw`` is not exactly one entry.
        """
        line, end = self.next_entry(raw, 0)
        if end != len(raw):
            raise BadEntry("entry length differs from the index")
        return line


def _oserror(what: str, path: str, exc: OSError) -> StoreFailed:
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return StoreFailed(f"{what} {path}: {text} (errno {exc.errno})")


def _open_file(path: str, flags: int) -> int:
    """os.open that never follows a symlink and forces mode 0600 on a file
    it creates, whatever the umask."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if flags & os.O_CREAT:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _check_dir(path: str, readonly: bool) -> None:
    """Refuse a directory an attacker could have planted or can write.

    :raise StoreFailed: ``path`` is a symlink, not a directory, owned by
        another uid (a root reader may read any), or group/world-writable.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StoreFailed(f"store directory {path} is a symlink; refusing it")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreFailed(f"store directory {path} is not a directory")
    uid = os.getuid()
    if st.st_uid != uid and not (readonly and uid == 0):
        raise StoreFailed(f"store directory {path} is owned by uid {st.st_uid}, not by uid {uid}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreFailed(f"store directory {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})")


def _make_dir(path: str) -> None:
    """Create ``path`` 0700 (whatever the umask) and make it durable."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@implementer(IRecordStore)
class LogStore:
    """An append-only, group-committed log of records (see the module doc).

    :param data_dir: the store's directory (created 0700 when missing,
        unless ``readonly``).
    :param reactor: the reactor the Deferreds fire on (threads needed);
        ``None``: the global one.
    :param fsync: ``"batch"`` (one fdatasync per batch), ``"always"`` (one
        per record, each record its own batch) or ``"never"`` (unsafe: a
        crash can lose records whose replies were sent).
    :param segment_bytes: start a new segment file before one would grow
        past this size (a single entry larger than it gets its own segment).
    :param readonly: open for reading only (``stopctl``): no thread, no
        repair, no writes; ``get`` rescans the tail on a miss to see what the
        daemon appended since.
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
        self.index_path = os.path.join(self.records_dir, "index")
        self._reactor = reactor
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self.readonly = readonly
        self._opened = False
        self._closed = False
        # token -> (segment, offset, length); insertion order is log order.
        self._index: dict[str, tuple[int, int, int]] = {}
        # Where the next scan starts: (segment, offset) past the last known entry.
        self._scan_seg = 0
        self._scan_off = 0
        self._usage = 0
        self._read_fds: dict[int, int] = {}
        self._released = False
        self._index_ok = True
        self._found_on_open: list = []
        # Writer state; the worker thread owns _seg_* while a batch is in flight.
        self._pool: WriterThread | None = None
        self._shutdown_trigger = None
        self._seg_no = 0
        self._seg_fd: int | None = None
        self._seg_size = 0
        self._dir_dirty = False
        self._index_fd: int | None = None
        self._pending: list[tuple[str, bytes, defer.Deferred]] = []
        self._reserved: set[str] = set()
        self._flushing = False
        self._close_waiters: list[defer.Deferred] = []

    # -- paths -------------------------------------------------------------

    def _seg_path(self, seg: int) -> str:
        return os.path.join(self.records_dir, "seg-%08d%s" % (seg, self.codec.suffix))

    def _segments(self) -> list[int]:
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
        """Open the store: check the directories, load and check the index,
        scan the segments past it, and (writer) move a torn tail aside.

        :raise StoreFailed: unsafe or unusable directory, an OS error, or
            ``open`` called twice.
        """
        if self._opened:
            raise StoreFailed(f"{self.name} store {self.data_dir} is already open")
        try:
            self._open_dirs()
            self._load()
            if not self.readonly:
                self._open_writer()
        except OSError as exc:
            self._release_fds()
            raise _oserror("cannot open store", getattr(exc, "filename", None) or self.data_dir, exc) from exc
        except StoreFailed:
            self._release_fds()
            raise
        self._opened = True
        log.info("{name} store {dir} open{ro}: {n} records, {usage} bytes",
                 name=self.name, dir=self.data_dir, ro=" (read-only)" if self.readonly else "",
                 n=len(self._index), usage=self._usage)

    def _open_dirs(self) -> None:
        for path in (self.data_dir, self.records_dir):
            if not self.readonly and not os.path.lexists(path):
                _make_dir(path)
            try:
                _check_dir(path, self.readonly)
            except FileNotFoundError:
                raise StoreFailed(f"store directory {path} does not exist") from None
        if not self.readonly:
            # records/ is ours alone: 0700 even when made by an older umask.
            os.chmod(self.records_dir, 0o700)

    def _load(self) -> None:
        """Fill the in-memory index from the index file (when it checks
        out), then scan the segments past its last entry."""
        segments = self._segments()
        sizes = {seg: os.stat(self._seg_path(seg)).st_size for seg in segments}
        entries, index_ok = self._read_index(sizes)
        if not index_ok:
            log.warn("{dir}: index does not match the segments; rebuilding it by a full scan",
                     dir=self.records_dir)
            entries = []
        for token, loc in entries:
            self._index[token] = loc
        if entries:
            seg, off, length = entries[-1][1]
            self._scan_seg, self._scan_off = seg, off + length
        self._found_on_open = self._scan(segments, repair=not self.readonly)
        self._index_ok = index_ok
        self._usage = sum(os.stat(self._seg_path(s)).st_size for s in self._segments())
        for entry in os.listdir(self.records_dir):
            if entry == "index" or entry.startswith("torn-"):
                self._usage += os.lstat(os.path.join(self.records_dir, entry)).st_size

    def _read_index(self, sizes: dict[int, int]) -> tuple[list, bool]:
        """Parse the index and check it against the segment sizes.

        :return: ``(entries, ok)``; entries are ``(token, (seg, off, len))``
            in log order; ``ok`` false means rebuild from the segments.
        """
        try:
            fd = _open_file(self.index_path, os.O_RDONLY)
        except FileNotFoundError:
            return [], not any(sizes.values())
        try:
            data = b""
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a line torn mid-write
        entries: list = []
        seen: set[str] = set()
        prev = None
        for line in lines:
            m = _INDEX_RE.match(line)
            if not m:
                return [], False
            token = m.group(1).decode("ascii")
            seg, off, length = int(m.group(2)), int(m.group(3)), int(m.group(4))
            contiguous = (prev is None and off == 0) or (
                prev is not None and ((seg == prev[0] and off == prev[1] + prev[2]) or (seg > prev[0] and off == 0)))
            if token in seen or length < 1 or not contiguous or off + length > sizes.get(seg, -1):
                return [], False
            seen.add(token)
            entries.append((token, (seg, off, length)))
            prev = (seg, off, length)
        if entries:
            # Does the index describe these segments? Its newest entry must
            # be there. An entry it lists was durable (index lines are
            # written after the fdatasync), so one that no longer parses is
            # damage, reported by get(), not a crash tail to move aside.
            token, loc = entries[-1]
            try:
                found, _ = self._entry_at(loc)
            except BadEntry as exc:
                log.error("{path}: indexed record {token} at offset {off} is damaged ({why})",
                          path=self._seg_path(loc[0]), token=token, off=loc[1], why=str(exc))
            except OSError:
                return [], False
            else:
                if found != token:
                    return [], False
        return entries, True

    def _scan(self, segments: list[int], repair: bool) -> list:
        """Index every good entry past (_scan_seg, _scan_off).

        :param repair: move a torn tail of the last segment aside (writer).
        :return: the new ``(token, (seg, off, len))`` entries, in order.
        """
        found = []
        todo = [s for s in segments if s >= self._scan_seg]
        for seg in todo:
            start = self._scan_off if seg == self._scan_seg else 0
            path = self._seg_path(seg)
            fd = _open_file(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                buf = os.pread(fd, size - start, start) if size > start else b""
            finally:
                os.close(fd)
            pos, why = 0, None
            while pos < len(buf):
                try:
                    line, end = self.codec.next_entry(buf, pos)
                    token, _ = parse_line(line)
                except BadEntry as exc:
                    why = str(exc)
                    break
                if token in self._index:
                    log.error("{path}: token {token} stored twice (offset {off}); keeping the first",
                              path=path, token=token, off=start + pos)
                else:
                    loc = (seg, start + pos, end - pos)
                    self._index[token] = loc
                    found.append((token, loc))
                pos = end
            self._scan_seg, self._scan_off = seg, start + pos
            if why is None:
                continue
            if seg != segments[-1]:
                # Rotation syncs a segment before the next one starts, so a
                # crash cannot tear an older one: this is damage, left as is.
                log.error("{path}: bad entry at offset {off} ({why}); {n} bytes after it are not indexed",
                          path=path, off=start + pos, why=why, n=len(buf) - pos)
            elif repair:
                self._move_torn_tail(seg, start + pos, buf[pos:], why)
        return found

    def _move_torn_tail(self, seg: int, offset: int, tail: bytes, why: str) -> None:
        """Copy a torn tail to ``torn-<seg>-<offset>`` (0600, durable), then
        truncate the segment to its last good entry."""
        base = os.path.join(self.records_dir, "torn-%08d-%d" % (seg, offset))
        for n in range(1000):  # bounded: same name again only after repeated crashes at one spot
            path = base if n == 0 else f"{base}.{n}"
            try:
                fd = _open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                continue
        else:
            raise StoreFailed(f"cannot name a torn-tail file next to {base}")
        try:
            view = memoryview(tail)
            while view:
                view = view[os.write(fd, view):]
            fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.records_dir)
        seg_path = self._seg_path(seg)
        fd = _open_file(seg_path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            fsync(fd)
        finally:
            os.close(fd)
        log.warn("{seg}: torn tail of {n} bytes at offset {off} ({why}), from a crash before its reply; "
                 "moved to {path} and truncated", seg=seg_path, n=len(tail), off=offset, why=why, path=path)

    def _rewrite_index(self) -> None:
        """Replace the index with one made from the in-memory index
        (atomic rename; no fsync: it is a cache)."""
        tmp = self.index_path + ".tmp"
        fd = _open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            data = b"".join(_index_line(t, loc) for t, loc in self._index.items())
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, self.index_path)

    def _open_writer(self) -> None:
        segments = self._segments()
        if segments:
            self._seg_no = segments[-1]
            self._seg_fd = _open_file(self._seg_path(self._seg_no), os.O_WRONLY)
            self._seg_size = os.fstat(self._seg_fd).st_size
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self._index_fd = _open_file(self.index_path, flags)
        size = os.fstat(self._index_fd).st_size
        # A line torn mid-write would glue onto the next one appended.
        torn = size > 0 and os.pread(self._index_fd, 1, size - 1) != b"\n"
        if torn or not self._index_ok:
            os.close(self._index_fd)
            self._index_fd = None
            self._rewrite_index()
            self._index_fd = _open_file(self.index_path, flags)
        else:
            self._append_index_lines(self._found_on_open)
        self._usage += os.fstat(self._index_fd).st_size - size
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        self._pool = WriterThread(self._reactor, f"stop-{self.name}-store")
        self._pool.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)

    # -- write -------------------------------------------------------------

    def save(self, token: str, record: bytes) -> defer.Deferred:
        """Queue ``record`` under ``token``; see :meth:`IRecordStore.save`.

        :return: a Deferred firing ``None`` once the entry is durable (per
            the ``fsync`` setting), or failing with StoreFailed (bad or
            reused token, closed or read-only store, an OS error).
        """
        try:
            if not self._opened or self._closed or self.readonly or not self._pool.started:
                # (the pool stops early when the reactor shuts down)
                raise StoreFailed(f"{self.name} store {self.data_dir} is not open for writing")
            check_entry(token, record)
            if token in self._index or token in self._reserved:
                raise StoreFailed(f"token {token} is already stored; a token is never reused")
        except StoreFailed:
            return defer.fail()
        d = defer.Deferred()
        self._reserved.add(token)
        self._pending.append((token, record, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        """Hand the queued entries to the worker as one batch ("always":
        one entry per batch)."""
        take = 1 if self._fsync == "always" else len(self._pending)
        batch, self._pending = self._pending[:take], self._pending[take:]
        self._flushing = True
        items = [(token, record) for token, record, _ in batch]
        d = self._pool.call(self._commit, items)
        d.addBoth(self._committed, batch)

    def _committed(self, result, batch) -> None:
        """Reactor thread: record where the batch went, fire its Deferreds,
        start the next batch. ``_flushing`` stays set while the Deferreds
        fire, so a callback's ``save`` queues and its ``close`` waits."""
        if isinstance(result, tuple):
            done, added, error = result
        else:  # not an OSError: a bug; fail the batch, keep the store going
            log.failure("{name} store: batch of {n} failed", result, name=self.name, n=len(batch))
            done, added, error = [], 0, StoreFailed(f"{self.name} store: internal error: {result.value!r}")
        self._usage += added
        for token, loc in done:
            self._index[token] = loc
            self._scan_seg, self._scan_off = loc[0], loc[1] + loc[2]
        if error is not None:
            log.error("{name} store: {n} of {m} records not stored: {error}",
                      name=self.name, n=len(batch) - len(done), m=len(batch), error=error)
        for i, (token, _, d) in enumerate(batch):
            self._reserved.discard(token)
            if i < len(done):
                d.callback(None)
            else:
                d.errback(error)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closed:
            self._finish_close()

    def _commit(self, items: list[tuple[str, bytes]]):
        """Worker thread: append ``items`` durably, then extend the index.

        :return: ``(done, added, error)``: the ``(token, loc)`` of the
            leading items that are durable, the bytes added on disk, and a
            StoreFailed for the rest (``None`` when all went).
        """
        done: list = []
        added = 0
        buf = bytearray()
        run: list = []
        path = self._seg_path(self._seg_no)
        try:
            for token, record in items:
                raw = self.codec.encode(format_line(token, record))
                if self._seg_fd is None:
                    path = self._new_segment()
                elif self._seg_size + len(buf) > 0 and self._seg_size + len(buf) + len(raw) > self._segment_bytes:
                    # Rotation always syncs the old segment (even with
                    # fsync=never) so that only the last one can be torn.
                    added += self._append(buf, sync=True)
                    done += run
                    buf, run = bytearray(), []
                    os.close(self._seg_fd)
                    self._seg_fd = None
                    path = self._new_segment()
                run.append((token, (self._seg_no, self._seg_size + len(buf), len(raw))))
                buf += raw
            added += self._append(buf, sync=self._fsync != "never")
            done += run
        except OSError as exc:
            error = _oserror("cannot write", getattr(exc, "filename", None) or path, exc)
        else:
            error = None
        added += self._append_index_lines(done)
        return done, added, error

    def _append(self, buf: bytearray, sync: bool) -> int:
        """Worker thread: write ``buf`` at the end of the current segment
        (and fdatasync it). On failure the segment is cut back to its old
        size, best effort, so the next batch starts on a clean entry.

        :return: bytes added.
        """
        if self._dir_dirty:
            _fsync_dir(self.records_dir)
            self._dir_dirty = False
        start = self._seg_size
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
        self._seg_fd = _open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self._seg_no += 1
        self._seg_size = 0
        self._dir_dirty = True  # retried before the next write if this fails
        fsync(self._seg_fd)
        _fsync_dir(self.records_dir)
        self._dir_dirty = False
        return path

    def _append_index_lines(self, entries: list) -> int:
        """Append ``entries`` to the index (no fsync: it is a cache). A
        failure is logged and ends index writing for this process; the next
        open extends the index by scanning.

        :return: bytes added.
        """
        if not entries or self._index_fd is None:
            return 0
        data = b"".join(_index_line(token, loc) for token, loc in entries)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._index_fd, view):]
        except OSError as exc:
            log.error("cannot extend {path} ({exc}); the next open rescans the segments",
                      path=self.index_path, exc=exc)
            os.close(self._index_fd)
            self._index_fd = None
            return 0
        return len(data)

    # -- read --------------------------------------------------------------

    def _entry_at(self, loc: tuple[int, int, int]) -> tuple[str, bytes]:
        """The verified ``(token, record)`` stored at ``loc``.

        :raise BadEntry: the bytes there are not one sound entry.
        :raise OSError: it cannot be read.
        """
        seg, off, length = loc
        raw = os.pread(_open_read(self._seg_path(seg), self._read_fds, seg), length, off)
        return parse_line(self.codec.decode(raw))

    def _read_entry(self, token: str, loc: tuple[int, int, int]) -> bytes | None:
        """The verified record at ``loc``; ``None`` when the bytes there are
        not the entry of ``token``.

        :raise StoreFailed: an OS error.
        """
        try:
            found, record = self._entry_at(loc)
        except BadEntry:
            return None
        except OSError as exc:
            raise _oserror("cannot read", self._seg_path(loc[0]), exc) from exc
        return record if found == token else None

    def _get_known(self, token: str) -> bytes | None:
        loc = self._index.get(token)
        if loc is None:
            return None
        record = self._read_entry(token, loc)
        if record is None:
            seg, off, _ = loc
            raise StoreFailed(f"record {token} in {self._seg_path(seg)} at offset {off} is damaged "
                              "(its SHA-256 or framing does not check out)")
        return record

    def _refresh(self) -> None:
        """Reader: index what the writer appended since the last scan."""
        try:
            self._scan(self._segments(), repair=False)
        except OSError as exc:
            raise _oserror("cannot scan", self.records_dir, exc) from exc

    def get(self, token: str) -> bytes | None:
        """The stored bytes of ``token``, verified against their SHA-256, or
        ``None``. A read-only store rescans the segments' tails on a miss.

        :raise StoreFailed: the entry is damaged, or an OS error.
        """
        self._check_open()
        if token not in self._index and self.readonly:
            self._refresh()
        return self._get_known(token)

    def integrity(self, token: str) -> bool:
        """Whether the stored entry of ``token`` checks out (framing, gzip
        CRC, SHA-256 of the record); ``False`` for an unknown token. Used
        by ``stopctl verify``.

        :raise StoreFailed: an OS error.
        """
        self._check_open()
        if token not in self._index and self.readonly:
            self._refresh()
        loc = self._index.get(token)
        return loc is not None and self._read_entry(token, loc) is not None

    def records(self) -> Iterator[tuple[str, bytes]]:
        """Every ``(token, record)``, oldest first, each verified.

        :raise StoreFailed: as :meth:`get`.
        """
        self._check_open()
        if self.readonly:
            self._refresh()
        for token in list(self._index):
            yield token, self._get_known(token)

    def usage(self) -> int:
        """Bytes on disk: segments, index and torn-tail files (tracked in
        memory, not re-read)."""
        return self._usage

    def __len__(self) -> int:
        return len(self._index)

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
        if not self._flushing:
            self._finish_close()
        return d

    def _stop_pool(self) -> None:
        """Stop the worker (idempotent)."""
        if self._pool is not None:
            self._pool.stop()

    def _finish_close(self) -> None:
        self._stop_pool()
        self._pool = None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._release_fds()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def _release_fds(self) -> None:
        for fd in [self._seg_fd, self._index_fd, *self._read_fds.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._seg_fd = self._index_fd = None
        self._read_fds = {}
        self._released = True


def _index_line(token: str, loc: tuple[int, int, int]) -> bytes:
    return b"%s %d %d %d\n" % (token.encode("ascii"), *loc)


def _open_read(path: str, cache: dict, key) -> int:
    """A cached read-only fd for ``path``."""
    fd = cache.get(key)
    if fd is None:
        fd = cache[key] = _open_file(path, os.O_RDONLY)
    return fd
