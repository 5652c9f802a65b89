"""The entries of a log store: their format, their chain, how they sit in a
segment file (a codec), and reading them back from a segment in bounded
memory. No store state here: :mod:`stop.storage.log` (the store),
:mod:`stop.storage.chain` (verify, prune, stats) and
:mod:`stop.storage.offline` build on it.

An entry is one line::

    <kind> <seq> <token> <sha256-of-payload> <chain> <payload>\\n

``kind`` is ``R`` (a record, saved under its token) or ``L`` (an entry
linked to the record of ``token``); ``seq`` numbers the entries of the
store from 1; ``chain`` is the SHA-256 (hex) of the previous entry's chain,
a space, and this entry's first four fields (the first entry's predecessor
is :data:`GENESIS`, or a prune checkpoint's), so every entry commits to
every one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple, Optional

from stop.errors import StoreFailed

fsync = os.fsync

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
_ENTRY_RE = re.compile(rb"([RL]) ([1-9][0-9]{0,19}) ([!-~]{1,%d}) (%s) (%s) "
                       % (MAX_TOKEN_CHARS, _HEX64, _HEX64))
_SALVAGE_RE = re.compile(rb"([RL]) ([1-9][0-9]{0,19}) ([!-~]{1,%d}) " % MAX_TOKEN_CHARS)
#: Longest stored line an entry can be (bytes).
MAX_LINE = 2 + 21 + MAX_TOKEN_CHARS + 2 * 65 + 1 + MAX_RECORD_BYTES + 1
_READ_CHUNK = 4096
#: Bytes read from a segment at a time when scanning.
SCAN_CHUNK = 1 << 20
#: Room the writer gives the current segment file ahead of its entries
#: (codecs whose ``pads`` is true; see :func:`data_end`), written as zeros.
PREALLOC_BYTES = 2**20


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
    """The uncompressed line of an entry, and its chain value
    (:func:`chain_next`, computed here on bytes: this is the writer's hot
    path).

    :param prev: the chain value of the entry before it.
    """
    # Formatted as str (f-strings are faster than bytes' %), encoded once.
    fields = f"{kind} {seq} {token} {hashlib.sha256(payload).hexdigest()}"
    chain = hashlib.sha256(f"{prev} {fields}".encode("ascii")).hexdigest()
    return f"{fields} {chain} ".encode("ascii") + payload + b"\n", chain


class BadEntry(Exception):
    """An entry that is incomplete or fails its checks (``str()`` says why)."""


def match_line(line: bytes, shape: re.Pattern, what: str, digest_group: int):
    """Match one newline-terminated ``line`` against ``shape`` and check the
    payload after the match against the SHA-256 in ``digest_group``.

    :return: ``(match, payload)``.
    :raise BadEntry: it is not such a line, or the SHA-256 differs.
    """
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise BadEntry("not one newline-terminated line")
    m = shape.match(line)
    if m is None:
        raise BadEntry(f"not '{what}'")
    payload = line[m.end():-1]
    if hashlib.sha256(payload).hexdigest().encode("ascii") != m.group(digest_group):
        raise BadEntry("payload does not match its SHA-256")
    return m, payload


def parse_entry(line: bytes) -> Entry:
    """Split one uncompressed entry (with its newline) and check its
    payload against its SHA-256. The chain is not checked here (that needs
    the previous entry: :mod:`stop.storage.chain`).

    :raise BadEntry: wrong shape, or the payload's SHA-256 differs.
    """
    m, payload = match_line(line, _ENTRY_RE, "<kind> <seq> <token> <sha256> <chain> <payload>", 4)
    digest = m.group(4)
    return Entry(m.group(1).decode("ascii"), int(m.group(2)), m.group(3).decode("ascii"),
                 digest.decode("ascii"), m.group(5).decode("ascii"), payload)


#: What the start of a bad entry still says: (kind, seq, token).
Salvaged = tuple[str, int, str]


def salvage_line(line: bytes) -> Optional[Salvaged]:
    m = _SALVAGE_RE.match(line)
    return (m.group(1).decode("ascii"), int(m.group(2)), m.group(3).decode("ascii")) if m else None


def salvage_fields(line: bytes) -> Optional[tuple[str, int, str, str, str]]:
    """``(kind, seq, token, sha256, chain)`` of the start of a bad entry's
    line when its five fields are still whole (its payload is what failed),
    else ``None``: so ``verify --all`` can still check its place in the chain."""
    m = _ENTRY_RE.match(line)
    if m is None:
        return None
    return (m.group(1).decode("ascii"), int(m.group(2)), m.group(3).decode("ascii"),
            m.group(4).decode("ascii"), m.group(5).decode("ascii"))


class Codec:
    """How entries sit in a segment file: the one thing flat and gzip
    differ in. This base class stores lines as they are (flat)."""

    #: Segment file name suffix.
    suffix = ".log"
    #: No entry of this codec ends with a NUL byte, so the NUL bytes at the
    #: end of a segment are room the writer preallocated, not data
    #: (:func:`data_end`): the writer may preallocate its segments.
    pads = True

    def encode(self, line: bytes) -> bytes:
        """The bytes appended to a segment for one entry ``line``."""
        return line

    def next_entry(self, buf: bytes, pos: int) -> tuple[bytes, int]:
        """Read the entry starting at ``buf[pos]``.

        :return: ``(line, end)``: the uncompressed line and the offset just
            past the stored entry.
        :raise BadEntry: incomplete or malformed (not yet hash-checked).
        """
        end = buf.find(b"\n", pos, pos + MAX_LINE)
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

    def head(self, raw: bytes) -> bytes:
        """The start of the line a bad entry's bytes ``raw`` still show
        (as much as can be read; no check)."""
        return raw

    def salvage(self, raw: bytes) -> Optional[Salvaged]:
        """``(kind, seq, token)`` read from the start of a bad entry's bytes
        when they still say it, else ``None``: so a damaged record is
        reported as damaged, not as unknown."""
        return salvage_line(self.head(raw))


class Found(NamedTuple):
    """What :func:`iter_entries` met at ``buf[pos:end]``: a sound ``entry``,
    or bad bytes (``entry`` None, ``why`` says why, ``salvaged`` what they
    still show, if anything)."""

    pos: int
    end: int
    entry: Optional[Entry]
    why: Optional[str]
    salvaged: Optional[Salvaged]


def iter_entries(codec: Codec, buf: bytes, pos: int = 0, parse=parse_entry) -> Iterator[Found]:
    """Every entry of ``buf`` from ``pos``, in order; a run of bad bytes is
    one :class:`Found` without entry, and the walk goes on at the next place
    an entry may start (a damaged entry never hides the ones after it).
    ``parse`` reads one line (another format's, to convert it)."""
    while pos < len(buf):
        try:
            line, end = codec.next_entry(buf, pos)
            yield Found(pos, end, parse(line), None, None)
            pos = end
            continue
        except BadEntry as exc:
            why = str(exc)
        end = codec.resync(buf, pos)
        # Bad bytes run until the next sound entry.
        while end < len(buf):
            try:
                line, _ = codec.next_entry(buf, end)
                parse(line)
                break
            except BadEntry:
                end = codec.resync(buf, end)
        yield Found(pos, end, None, why, codec.salvage(buf[pos:end]))
        pos = end


def read_entries(codec: Codec, path: str, start: int = 0, chunk: int = SCAN_CHUNK,
                 parse=parse_entry) -> Iterator[Found]:
    """:func:`iter_entries` over the file ``path`` from offset ``start``,
    read ``chunk`` bytes at a time (memory: about ``chunk`` plus one
    entry). Offsets in what it yields are the file's. Bad bytes at the very
    end are yielded too (a torn tail, or an entry being written).

    :raise OSError: the file cannot be read.
    """
    fd = open_file(path, os.O_RDONLY)
    try:
        limit = data_end(fd) if codec.pads else None
        buf = b""
        base = start  # file offset of buf[0]
        eof = False
        while True:
            if not eof:
                want = chunk if limit is None else min(chunk, limit - base - len(buf))
                data = os.pread(fd, want, base + len(buf)) if want > 0 else b""
                eof = not data
                buf += data
            pos = 0
            for item in iter_entries(codec, buf, 0, parse):
                if item.entry is None and item.end == len(buf) and not eof and len(buf) - item.pos < 2 * MAX_LINE:
                    break  # maybe an entry cut by the chunk: read on first
                yield Found(base + item.pos, base + item.end, item.entry, item.why, item.salvaged)
                pos = item.end
            buf = buf[pos:]
            base += pos
            if eof and not buf:
                return
    finally:
        os.close(fd)


def data_end(fd: int) -> int:
    """Where the entries of the segment file ``fd`` end: its size less the
    NUL bytes at its end, the room a writer preallocated (only for a codec
    whose ``pads`` is true: its entries never end with a NUL). Reads back
    from the end a block at a time (the room is about
    :data:`PREALLOC_BYTES`)."""
    end = os.fstat(fd).st_size
    while end > 0:
        n = min(end, len(_ZERO_BLOCK))
        block = os.pread(fd, n, end - n)
        if len(block) < n:  # cut meanwhile (a writer closing): look again
            end = os.fstat(fd).st_size
            continue
        # A comparison is ~70x cheaper than rstrip over a block of zeros.
        if block != (_ZERO_BLOCK if n == len(_ZERO_BLOCK) else bytes(n)):
            return end - n + len(block.rstrip(b"\0"))
        end -= n
    return 0


_ZERO_BLOCK = bytes(1 << 16)


def starts_with_nul(path: str, pos: int) -> bool:
    """Does the bad entry at ``pos`` of the segment at ``path`` start with
    a NUL byte? No entry written starts with one (of a codec that pads):
    such bytes are room the writer preallocated, a hole in it left by a
    power loss in the middle of a batch (its pages reach the disk in any
    order) -- never an acknowledged entry, whose batch's fdatasync wrote
    every byte before it."""
    fd = open_file(path, os.O_RDONLY)
    try:
        return os.pread(fd, 1, pos) == b"\0"
    finally:
        os.close(fd)


def segment_end(codec: Codec, path: str) -> int:
    """The end of the entries of the segment at ``path`` (its size when
    ``codec`` never pads).

    :raise OSError: it cannot be read.
    """
    if not codec.pads:
        return os.path.getsize(path)
    fd = open_file(path, os.O_RDONLY)
    try:
        return data_end(fd)
    finally:
        os.close(fd)


# -- files --------------------------------------------------------------------

def oserror(what: str, path: str, exc: OSError) -> StoreFailed:
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return StoreFailed(f"{what} {path}: {text} (errno {exc.errno})")


def open_file(path: str, flags: int) -> int:
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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: str, data: bytes, owner: Optional[tuple[int, int]] = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (0600), owned
    by ``owner`` (uid, gid) from the start when given."""
    tmp = path + ".tmp"
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        write_all(fd, data)
        fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def check_dir(path: str, readonly: bool) -> None:
    """Refuse a directory an attacker could have planted or can write.

    :raise StoreFailed: ``path`` is a symlink, not a directory, owned by
        another uid (a root reader may read any), or group/world-writable.
    :raise FileNotFoundError: it does not exist.
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


def make_dir(path: str) -> None:
    """Create ``path`` 0700 (whatever the umask) and make it durable."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
