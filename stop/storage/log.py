"""The append-only, chained log engine shared by the ``flat`` and ``gzip`` stores.

Layout under ``data_dir`` (see docs/storage.rst)::

    records/                    0700
        format                  0600, "stop-store 2": the format of the entries
        seg-00000001.log[.gz]   0600, append-only entries, rotated at segment_bytes
        torn-<segment>-<offset> 0600, bytes of a torn tail moved aside on open

An entry is one line::

    <kind> <seq> <token> <sha256-of-payload> <chain> <payload>\\n

``kind`` is ``R`` (a record, saved under its token) or ``L`` (an entry
linked to the record of ``token``); ``seq`` numbers the entries of the
store from 1; ``chain`` is the SHA-256 (hex) of the previous entry's chain
followed by a space and this entry's first four fields (the first entry's
predecessor is :data:`GENESIS`), so every entry commits to every one before
it. A line is stored as is (flat) or as its own gzip member (gzip); a codec
(:class:`Codec`) is the only difference between the two stores.

Writes: ``save``/``save_linked`` queue the entry; one worker thread writes
each batch with one write and one ``fdatasync`` (group commit), then every
Deferred of the batch fires on the reactor thread. Reads are synchronous
``pread`` calls and verify the payload's SHA-256 every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple, Optional

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
#: Largest record (or linked entry) accepted (bytes); bounds memory when a segment is scanned.
MAX_RECORD_BYTES = 4 * 2**20
#: Longest token accepted (characters).
MAX_TOKEN_CHARS = 256
#: Entry kinds: a record, and an entry linked to a record.
RECORD, LINKED = "R", "L"
#: The chain value before the first entry of a store.
GENESIS = "0" * 64
#: What ``records/format`` holds for the entry format written here.
FORMAT_LINE = b"stop-store 2\n"

_TOKEN_RE = re.compile(rb"[!-~]{1,%d}\Z" % MAX_TOKEN_CHARS)
_HEX64 = rb"[0-9a-f]{64}"
_ENTRY_RE = re.compile(rb"([RL]) ([1-9][0-9]{0,19}) ([!-~]{1,%d}) (%s) (%s) " % (MAX_TOKEN_CHARS, _HEX64, _HEX64))
_MAX_LINE = 2 + 21 + MAX_TOKEN_CHARS + 2 * 65 + 1 + MAX_RECORD_BYTES + 1
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


def check_linked(token: str, entry: bytes) -> None:
    """Check a linked entry as every store does: the rules of
    :func:`check_entry`, and ``entry`` is the canonical JSON of one object
    (``stop.records.canonical``).

    :raise stop.errors.StoreFailed: it is not.
    """
    check_entry(token, entry)
    try:
        obj = json.loads(entry.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StoreFailed(f"entry linked to {token} is not JSON") from None
    if not isinstance(obj, dict):
        raise StoreFailed(f"entry linked to {token} is not a JSON object")
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode("utf-8")
    if canonical != entry:
        raise StoreFailed(f"entry linked to {token} is not canonical JSON (stop.records.canonical)")


def chain_next(prev: str, kind: str, seq: int, token: str, digest: str) -> str:
    """The chain value of an entry: SHA-256 (hex) of ``prev`` (the previous
    entry's chain, or :data:`GENESIS`), a space, and the entry's first four
    fields ``kind seq token digest`` separated by single spaces."""
    return hashlib.sha256(f"{prev} {kind} {seq} {token} {digest}".encode("ascii")).hexdigest()


class Entry(NamedTuple):
    """One parsed, digest-checked entry."""

    kind: str
    seq: int
    token: str
    digest: str
    chain: str
    payload: bytes


def format_entry(kind: str, seq: int, token: str, payload: bytes, prev: str) -> tuple[bytes, str]:
    """The uncompressed line of an entry, and its chain value.

    :param prev: the chain value of the entry before it.
    """
    digest = hashlib.sha256(payload).hexdigest()
    chain = chain_next(prev, kind, seq, token, digest)
    return b"%s %d %s %s %s %s\n" % (kind.encode("ascii"), seq, token.encode("ascii"),
                                       digest.encode("ascii"), chain.encode("ascii"), payload), chain


class BadEntry(Exception):
    """An entry that is incomplete or fails its checks (``str()`` says why)."""


def parse_entry(line: bytes) -> Entry:
    """Split one uncompressed entry (with its newline) and check its
    payload against its SHA-256. The chain is not checked here (that needs
    the previous entry: see ``stopctl verify --all``).

    :raise BadEntry: wrong shape, or the payload's SHA-256 differs.
    """
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise BadEntry("not one newline-terminated line")
    m = _ENTRY_RE.match(line)
    if m is None:
        raise BadEntry("not '<kind> <seq> <token> <sha256> <chain> <payload>'")
    payload = line[m.end():-1]
    digest = m.group(4)
    if hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise BadEntry("payload does not match its SHA-256")
    return Entry(m.group(1).decode("ascii"), int(m.group(2)), m.group(3).decode("ascii"),
                 digest.decode("ascii"), m.group(5).decode("ascii"), payload)


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

    def resync(self, buf: bytes, pos: int) -> int:
        """Where the next entry may start after a bad one at ``buf[pos]``
        (``len(buf)`` when nowhere): past the next newline."""
        end = buf.find(b"\n", pos)
        return len(buf) if end < 0 else end + 1

    def salvage(self, raw: bytes) -> Optional[tuple[str, str]]:
        """``(kind, token)`` read from the start of a bad entry's bytes
        when they still say it, else ``None``: so a damaged record is
        reported as damaged, not as unknown."""
        m = _ENTRY_RE.match(raw)
        return (m.group(1).decode("ascii"), m.group(3).decode("ascii")) if m else None


class Found(NamedTuple):
    """What :func:`iter_entries` met at ``buf[pos:end]``: a sound ``entry``,
    or bad bytes (``entry`` None, ``why`` says why, ``salvaged`` the
    ``(kind, token)`` they still show, if any)."""

    pos: int
    end: int
    entry: Optional[Entry]
    why: Optional[str]
    salvaged: Optional[tuple[str, str]]


def iter_entries(codec: Codec, buf: bytes, pos: int = 0) -> Iterator[Found]:
    """Every entry of ``buf`` from ``pos``, in order; a run of bad bytes is
    one :class:`Found` without entry, and the walk goes on at the next place
    an entry may start (a damaged entry never hides the ones after it)."""
    while pos < len(buf):
        try:
            line, end = codec.next_entry(buf, pos)
            yield Found(pos, end, parse_entry(line), None, None)
            pos = end
            continue
        except BadEntry as exc:
            why = str(exc)
        end = codec.resync(buf, pos)
        # Bad bytes run until the next sound entry.
        while end < len(buf):
            try:
                line, _ = codec.next_entry(buf, end)
                parse_entry(line)
                break
            except BadEntry:
                end = codec.resync(buf, end)
        yield Found(pos, end, None, why, codec.salvage(buf[pos:end]))
        pos = end


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
        repair, no writes; reads rescan the tail to see what the daemon
        appended since.
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
        # token -> loc of its record; insertion order is log order.
        self._index: dict[str, Loc] = {}
        # token -> locs of its linked entries, oldest first.
        self._linked: dict[str, list[Loc]] = {}
        # Where the next scan starts: (segment, offset) past the last known entry.
        self._scan_seg = 0
        self._scan_off = 0
        # The chain head: seq and chain value of the last entry (on the
        # reactor thread: of the last entry known durable).
        self._head_seq = 0
        self._head_chain = GENESIS
        self._usage = 0
        self._read_fds: dict[int, int] = {}
        self._released = False
        self._found_on_open: list = []
        # Writer state; the worker thread owns _seg_*, _w_* while a batch is in flight.
        self._pool: WriterThread | None = None
        self._shutdown_trigger = None
        self._seg_no = 0
        self._seg_fd: int | None = None
        self._seg_size = 0
        self._dir_dirty = False
        self._w_seq = 0
        self._w_chain = GENESIS
        self._pending: list[tuple[str, str, bytes, defer.Deferred]] = []
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
        """Open the store: check the directories and the format, scan the
        segments, and (writer) move a torn tail aside.

        :raise StoreFailed: unsafe or unusable directory, a store of another
            format, an OS error, or ``open`` called twice.
        """
        if self._opened:
            raise StoreFailed(f"{self.name} store {self.data_dir} is already open")
        try:
            self._open_dirs()
            self._check_format()
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
        log.info("{name} store {dir} open{ro}: {n} records, {usage} bytes, head {seq} {chain}",
                 name=self.name, dir=self.data_dir, ro=" (read-only)" if self.readonly else "",
                 n=len(self._index), usage=self._usage, seq=self._head_seq, chain=self._head_chain)

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

    def _check_format(self) -> None:
        """Check ``records/format``; a writer creates it in a new store.

        :raise StoreFailed: segments without a format file (the format of
            stop 0.1.0), or a format this code does not know.
        """
        try:
            fd = _open_file(self.format_path, os.O_RDONLY)
        except FileNotFoundError:
            if self._segments():
                raise StoreFailed(
                    f"{self.records_dir} holds segments of the record format of stop 0.1.0 "
                    "(no records/format file), which this version does not read; "
                    "see docs/storage.rst, 'Stores of stop 0.1.0'") from None
            if not self.readonly:
                self._write_format()
            return
        try:
            found = os.read(fd, 100)
        finally:
            os.close(fd)
        if found != FORMAT_LINE:
            raise StoreFailed(f"{self.format_path} says {found[:40]!r}, not {FORMAT_LINE!r}: "
                              "a store of another version of stop")

    def _write_format(self) -> None:
        tmp = self.format_path + ".tmp"
        fd = _open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(fd, FORMAT_LINE)
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.format_path)
        _fsync_dir(self.records_dir)

    def _load(self) -> None:
        """Index every entry of the segments (moving a torn tail aside when
        writing) and count the bytes on disk."""
        segments = self._segments()
        self._found_on_open = self._scan(segments, repair=not self.readonly)
        self._usage = sum(os.stat(self._seg_path(s)).st_size for s in self._segments())
        for entry in os.listdir(self.records_dir):
            if entry == "format" or entry.startswith("torn-"):
                self._usage += os.lstat(os.path.join(self.records_dir, entry)).st_size

    def _note(self, entry: Entry, loc: Loc, path: str) -> bool:
        """Index one sound entry found by a scan; False when it is a record
        whose token is already stored (reported, not indexed)."""
        if entry.kind == RECORD:
            if entry.token in self._index:
                log.error("{path}: token {token} stored twice (offset {off}); keeping the first",
                          path=path, token=entry.token, off=loc[1])
                return False
            self._index[entry.token] = loc
        else:
            self._linked.setdefault(entry.token, []).append(loc)
        return True

    def _scan(self, segments: list[int], repair: bool) -> list:
        """Index every good entry past (_scan_seg, _scan_off).

        :param repair: move a torn tail of the last segment aside (writer).
        :return: the new ``(entry, loc)`` pairs, in order.
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
            pos = 0
            last = seg == segments[-1]
            for item in iter_entries(self.codec, buf):
                loc = (seg, start + item.pos, item.end - item.pos)
                if item.entry is not None:
                    if self._note(item.entry, loc, path):
                        found.append((item.entry, loc))
                    self._head_seq, self._head_chain = item.entry.seq, item.entry.chain
                elif last and item.end == len(buf):
                    # Bad bytes after the last sound entry of the last
                    # segment: a torn tail, or bytes the writer is adding
                    # right now (a reader leaves them for the next scan).
                    if repair:
                        self._move_torn_tail(seg, start + item.pos, buf[item.pos:], item.why)
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
                        self._index.setdefault(item.salvaged[1], loc)
                pos = item.end
            self._scan_seg, self._scan_off = seg, start + pos
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
            _write_all(fd, tail)
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

    def _open_writer(self) -> None:
        segments = self._segments()
        if segments:
            self._seg_no = segments[-1]
            self._seg_fd = _open_file(self._seg_path(self._seg_no), os.O_WRONLY)
            self._seg_size = os.fstat(self._seg_fd).st_size
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
            if token in self._index or token in self._reserved:
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
            if token not in self._index and token not in self._reserved:
                raise StoreFailed(f"no record for token {token}: nothing to link an entry to")
        except StoreFailed:
            return defer.fail()
        return self._queue(LINKED, token, entry)

    def _queue(self, kind: str, token: str, payload: bytes) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((kind, token, payload, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        """Hand the queued entries to the worker as one batch ("always":
        one entry per batch)."""
        take = 1 if self._fsync == "always" else len(self._pending)
        batch, self._pending = self._pending[:take], self._pending[take:]
        self._flushing = True
        items = [(kind, token, payload) for kind, token, payload, _ in batch]
        d = self._pool.call(self._commit, items)
        d.addBoth(self._committed, batch)

    def _committed(self, result, batch) -> None:
        """Reactor thread: record where the batch went, fire its Deferreds,
        start the next batch. ``_flushing`` stays set while the Deferreds
        fire, so a callback's ``save`` queues and its ``close`` waits."""
        if isinstance(result, tuple):
            outcomes, added, head = result
        else:  # not an OSError: a bug; fail the batch, keep the store going
            log.failure("{name} store: batch of {n} failed", result, name=self.name, n=len(batch))
            error = StoreFailed(f"{self.name} store: internal error: {result.value!r}")
            outcomes, added, head = [error] * len(batch), 0, None
        self._usage += added
        if head is not None:
            self._head_seq, self._head_chain = head
        failed = 0
        for (kind, token, _, _), outcome in zip(batch, outcomes):
            if not isinstance(outcome, Exception):
                if kind == RECORD:
                    self._index[token] = outcome
                else:
                    self._linked.setdefault(token, []).append(outcome)
                self._scan_seg, self._scan_off = outcome[0], outcome[1] + outcome[2]
            else:
                failed += 1
        if failed:
            first = next(o for o in outcomes if isinstance(o, Exception))
            log.error("{name} store: {n} of {m} entries not stored: {error}",
                      name=self.name, n=failed, m=len(batch), error=first)
        for (kind, token, _, d), outcome in zip(batch, outcomes):
            if kind == RECORD:
                self._reserved.discard(token)
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(None)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closed:
            self._finish_close()

    def _commit(self, items: list[tuple[str, str, bytes]]):
        """Worker thread: append ``items`` durably.

        :return: ``(outcomes, added, head)``: per item its loc when durable,
            else a StoreFailed; the bytes added on disk; the (seq, chain) of
            the last durable entry (``None`` when none was written).
        """
        outcomes: list = [None] * len(items)
        added = 0
        buf = bytearray()
        run: list = []      # (index in items, loc) of the entries in buf
        seq, chain = self._w_seq, self._w_chain
        synced = (seq, chain)
        stored_here: set[str] = set()
        path = self._seg_path(self._seg_no)
        error = None
        try:
            for i, (kind, token, payload) in enumerate(items):
                if kind == LINKED and token not in self._index and token not in stored_here:
                    # Its record was not stored (its batch failed).
                    outcomes[i] = StoreFailed(f"no record for token {token}: nothing to link an entry to")
                    continue
                line, next_chain = format_entry(kind, seq + 1, token, payload, chain)
                raw = self.codec.encode(line)
                if self._seg_fd is None:
                    path = self._new_segment()
                elif self._seg_size + len(buf) > 0 and self._seg_size + len(buf) + len(raw) > self._segment_bytes:
                    # Rotation always syncs the old segment (even with
                    # fsync=never) so that only the last one can be torn.
                    added += self._append(buf, sync=True)
                    for j, loc in run:
                        outcomes[j] = loc
                    synced = (seq, chain)
                    buf, run = bytearray(), []
                    os.close(self._seg_fd)
                    self._seg_fd = None
                    path = self._new_segment()
                run.append((i, (self._seg_no, self._seg_size + len(buf), len(raw))))
                buf += raw
                seq, chain = seq + 1, next_chain
                if kind == RECORD:
                    stored_here.add(token)
            added += self._append(buf, sync=self._fsync != "never")
            for j, loc in run:
                outcomes[j] = loc
            synced = (seq, chain)
        except OSError as exc:
            error = _oserror("cannot write", getattr(exc, "filename", None) or path, exc)
        self._w_seq, self._w_chain = synced
        for i, outcome in enumerate(outcomes):
            if outcome is None:
                outcomes[i] = error
        head = synced if synced != (self._head_seq, self._head_chain) else None
        return outcomes, added, head

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

    # -- read --------------------------------------------------------------

    def _entry_at(self, loc: Loc) -> Entry:
        """The digest-checked entry stored at ``loc``.

        :raise BadEntry: the bytes there are not one sound entry.
        :raise OSError: it cannot be read.
        """
        seg, off, length = loc
        raw = os.pread(_open_read(self._seg_path(seg), self._read_fds, seg), length, off)
        return parse_entry(self.codec.decode(raw))

    def _read_entry(self, kind: str, token: str, loc: Loc) -> Optional[bytes]:
        """The checked payload at ``loc``; ``None`` when the bytes there are
        not an entry of ``kind`` for ``token``.

        :raise StoreFailed: an OS error.
        """
        try:
            entry = self._entry_at(loc)
        except BadEntry:
            return None
        except OSError as exc:
            raise _oserror("cannot read", self._seg_path(loc[0]), exc) from exc
        return entry.payload if (entry.kind, entry.token) == (kind, token) else None

    def _payload(self, kind: str, token: str, loc: Loc) -> bytes:
        data = self._read_entry(kind, token, loc)
        if data is None:
            seg, off, _ = loc
            what = "record" if kind == RECORD else "entry linked to"
            raise StoreFailed(f"{what} {token} in {self._seg_path(seg)} at offset {off} is damaged "
                              "(its SHA-256 or framing does not check out)")
        return data

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
        loc = self._index.get(token)
        return None if loc is None else self._payload(RECORD, token, loc)

    def linked(self, token: str) -> list[bytes]:
        """The entries linked to ``token``, oldest first, each verified
        against its SHA-256; ``[]`` when none or the token is unknown.

        :raise StoreFailed: an entry is damaged, or an OS error.
        """
        self._check_open()
        if self.readonly:
            self._refresh()
        return [self._payload(LINKED, token, loc) for loc in list(self._linked.get(token, ()))]

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
        return loc is not None and self._read_entry(RECORD, token, loc) is not None

    def records(self) -> Iterator[tuple[str, bytes]]:
        """Every ``(token, record)``, oldest first, each verified.

        :raise StoreFailed: as :meth:`get`.
        """
        self._check_open()
        if self.readonly:
            self._refresh()
        for token, loc in list(self._index.items()):
            yield token, self._payload(RECORD, token, loc)

    def head(self) -> tuple[int, str]:
        """The chain head: ``(count, chain)`` of the last durable entry
        (``(0, GENESIS)`` for an empty store)."""
        self._check_open()
        if self.readonly:
            self._refresh()
        return self._head_seq, self._head_chain

    def usage(self) -> int:
        """Bytes on disk: segments, format and torn-tail files (tracked in
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
        for fd in [self._seg_fd, *self._read_fds.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._seg_fd = None
        self._read_fds = {}
        self._released = True


def _open_read(path: str, cache: dict, key) -> int:
    """A cached read-only fd for ``path``."""
    fd = cache.get(key)
    if fd is None:
        fd = cache[key] = _open_file(path, os.O_RDONLY)
    return fd
