"""The on-disk index of a log store: ``records/index.sqlite``.

It maps a token to where its record and its linked entries are in the
segments, so neither the daemon nor ``stopctl`` holds anything per record in
memory. It is a cache: the segments are the truth, and a store rebuilds the
index from them whenever it does not describe them (docs/storage.rst, "The
index").

SQLite (the standard library's ``sqlite3``) in WAL mode with
``synchronous=NORMAL``: a commit writes the WAL without an fsync, a crash or
power loss can lose the last commits but never corrupts the file, and
readers in other processes (``stopctl``) read while the daemon writes.
Memory is SQLite's page cache, bounded (:data:`CACHE_KIB` per connection).

Tables::

    records(token PRIMARY KEY, seq, seg, off, len)    one row per record
    linked(token, seq, seg, off, len)                 one row per linked entry
    meta(key PRIMARY KEY, value)                      "last": the newest indexed entry

``meta.last`` is ``"<seq> <seg> <off> <len> <chain>"`` of the newest entry
whose row (if any) is committed: everything before it is in the index,
what comes after it is found by scanning the segments from there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Iterator
from typing import NamedTuple, Optional

from stop.errors import StoreFailed

#: File name under records/.
INDEX_NAME = "index.sqlite"
#: Page cache per connection, KiB (SQLite's default is 2000).
CACHE_KIB = 2048
#: How long a write waits for another process's write (stopctl prune), ms.
BUSY_MS = 30000
#: Version of the index's own layout (meta "layout").
LAYOUT = "1"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (token TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
    "seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS linked (token TEXT NOT NULL, seq INTEGER NOT NULL, "
    "seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL, "
    "PRIMARY KEY (token, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)

Loc = tuple[int, int, int]
_ONE = "SELECT 1 FROM records WHERE token = ?"
_INSERT_ONE = "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?)"
#: add_new inserts at most this many rows with one statement (5 parameters
#: a row stay far under SQLite's oldest limit of 999; a statement for each
#: size stays prepared in the connection's cache of 128).
INSERT_CHUNK = 64


@functools.lru_cache(maxsize=None)
def _insert_new(rows: int) -> str:
    return "INSERT INTO records VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * rows)


def insert_statements(rows: list) -> Iterator[tuple[str, list, int]]:
    """The statements that insert record ``rows`` (``(token, seq, seg,
    off, len)``, in this order) into ``records``: ``(sql, parameters,
    rows inserted once it ran)``, one per :data:`INSERT_CHUNK` rows (a
    batch of up to that many: one statement). A known token makes its
    statement fail (IntegrityError), and SQLite takes back the rows that
    statement had put in (a statement is atomic)."""
    done = 0
    while done < len(rows):
        n = min(INSERT_CHUNK, len(rows) - done)
        yield _insert_new(n), [v for row in rows[done:done + n] for v in row], done + n
        done += n


class Last(NamedTuple):
    """The newest entry the index covers."""

    seq: int
    seg: int
    off: int
    len: int
    chain: str

    @property
    def loc(self) -> Loc:
        return self.seg, self.off, self.len

    def encode(self) -> str:
        return f"{self.seq} {self.seg} {self.off} {self.len} {self.chain}"

    @classmethod
    def decode(cls, text: str) -> Optional["Last"]:
        parts = text.split(" ")
        try:
            seq, seg, off, length = (int(p) for p in parts[:4])
        except ValueError:
            return None
        if len(parts) != 5 or len(parts[4]) != 64 or min(seq, seg, off, length) < 0:
            return None
        return cls(seq, seg, off, length, parts[4])


class IndexBroken(Exception):
    """The index file cannot be used (corrupt, another layout): rebuild it."""


def files(records_dir: str) -> list[str]:
    """The index's files (the database, its WAL and shared memory)."""
    base = os.path.join(records_dir, INDEX_NAME)
    return [base, base + "-wal", base + "-shm"]


class Index:
    """One connection to the index of the store in ``records_dir``.

    A writer (``readonly=False``) creates the file (0600) and its tables; a
    reader opens it read-only, or works without it (``usable`` false) when
    it is missing or cannot be opened: then every lookup misses and the
    store scans the segments.
    """

    def __init__(self, records_dir: str, readonly: bool):
        self.path = os.path.join(records_dir, INDEX_NAME)
        self.readonly = readonly
        self._db: Optional[sqlite3.Connection] = None
        self._in_txn = False

    @property
    def usable(self) -> bool:
        return self._db is not None

    def open(self) -> None:
        """Connect.

        :raise IndexBroken: (writer) the file is not an index of this layout.
        :raise StoreFailed: (writer) it cannot be created or opened.
        """
        if self.readonly:
            self._db = self._open_reader()
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreFailed(f"cannot open the index {self.path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise IndexBroken("cannot use WAL mode")
            db.execute("PRAGMA synchronous = NORMAL")
            # A statement or savepoint that may have to be undone keeps the
            # pages it changes in a sub-journal; on disk that is a new file
            # in the temp directory each time (open, writes, unlink: index
            # pages outside the store). add_new has none now; this keeps
            # any other one (a rebuild's, a drop's) in memory, bounded by
            # the pages it touches.
            db.execute("PRAGMA temp_store = MEMORY")
            for statement in _SCHEMA:
                db.execute(statement)
            layout = db.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
            if layout is None:
                db.execute("INSERT INTO meta VALUES ('layout', ?)", (LAYOUT,))
            elif layout[0] != LAYOUT:
                raise IndexBroken(f"index layout {layout[0]!r}, not {LAYOUT!r}")
        except sqlite3.Error as exc:
            db.close()
            raise IndexBroken(str(exc)) from exc
        except IndexBroken:
            db.close()
            raise
        self._db = db

    def _open_reader(self) -> Optional[sqlite3.Connection]:
        if not os.path.exists(self.path):
            return None
        # SQLite running as root gives the -wal/-shm files it creates the
        # owner of the database file, so a root reader leaves nothing the
        # daemon cannot open. On read-only media, immutable=1 reads the
        # file as it is (nobody can be writing it).
        for query in ("mode=ro", "mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(f"file:{self.path}?{query}", uri=True, isolation_level=None,
                                     check_same_thread=False)
                db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
                db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
                layout = db.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
            except sqlite3.Error:
                continue
            if layout is None or layout[0] != LAYOUT:
                db.close()
                return None
            return db
        return None

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints the WAL
        into the file and removes it). Idempotent."""
        db, self._db = self._db, None
        if db is not None:
            try:
                if self._in_txn:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._in_txn = False
            db.close()

    # -- reads ---------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self):
        """Make the reads inside one consistent view of the index (one
        read transaction): a row a writer commits meanwhile is either seen
        with the ``last`` that covers it, or neither is."""
        if self._db is None or self._in_txn:
            yield
            return
        try:
            self._db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise StoreFailed(f"cannot read the index {self.path}: {exc}") from exc
        self._in_txn = True
        try:
            yield
        finally:
            self._in_txn = False
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                pass

    def _query(self, sql: str, args=()) -> list:
        if self._db is None:
            return []
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreFailed(f"cannot read the index {self.path}: {exc}") from exc

    def last(self) -> Optional[Last]:
        """The newest entry the committed index covers; None when empty."""
        rows = self._query("SELECT value FROM meta WHERE key = 'last'")
        return Last.decode(rows[0][0]) if rows else None

    def record(self, token: str) -> Optional[tuple[int, Loc]]:
        """``(seq, loc)`` of the record of ``token``, or None."""
        rows = self._query("SELECT seq, seg, off, len FROM records WHERE token = ?", (token,))
        return (rows[0][0], tuple(rows[0][1:])) if rows else None

    def linked(self, token: str) -> list[tuple[int, Loc]]:
        """``(seq, loc)`` of the entries linked to ``token``, oldest first."""
        rows = self._query("SELECT seq, seg, off, len FROM linked WHERE token = ? ORDER BY seq",
                           (token,))
        return [(r[0], tuple(r[1:])) for r in rows]

    def with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Tokens of records starting with ``prefix`` (exactly as given),
        sorted, at most ``limit``."""
        if not prefix:
            return []
        # Tokens are printable ASCII (! to ~): every token with the prefix
        # sorts between it and it followed by DEL.
        rows = self._query("SELECT token FROM records WHERE token >= ? AND token < ? "
                           "ORDER BY token LIMIT ?", (prefix, prefix + "\x7f", limit))
        return [r[0] for r in rows]

    def at_seq(self, first: int, last: int, limit: int) -> list[tuple[int, str, str]]:
        """``(seq, kind, token)`` of indexed entries numbered ``first`` to
        ``last``, by seq, at most ``limit`` (``verify --all`` naming the
        entries gone from the segments; a full scan of the tables: for
        findings, not for a hot path)."""
        rows = self._query("SELECT seq, 'R', token FROM records WHERE seq BETWEEN ? AND ? "
                           "UNION ALL SELECT seq, 'L', token FROM linked WHERE seq BETWEEN ? AND ? "
                           "ORDER BY 1 LIMIT ?", (first, last, first, last, limit))
        return [(r[0], r[1], r[2]) for r in rows]

    def count(self) -> int:
        """Records in the index (a full count: for stopctl, not the daemon)."""
        rows = self._query("SELECT count(*) FROM records")
        return rows[0][0] if rows else 0

    # -- writes (the writer's thread, or open) --------------------------------

    def known(self, tokens: list[str]) -> set[str]:
        """Which of ``tokens`` have a record in the index (one query per
        500: a batch's duplicate check costs about one lookup)."""
        if len(tokens) == 1:
            return set(tokens) if self._db.execute(_ONE, tokens).fetchone() else set()
        found: set[str] = set()
        for i in range(0, len(tokens), 500):
            part = tokens[i:i + 500]
            marks = ",".join("?" * len(part))
            found.update(r[0] for r in self._db.execute(
                f"SELECT token FROM records WHERE token IN ({marks})", part))
        return found

    def _begin(self) -> sqlite3.Connection:
        db = self._db
        if not self._in_txn:
            db.execute("BEGIN IMMEDIATE")
            self._in_txn = True
        return db

    def add(self, records: list, linked: list, last: Optional[Last] = None) -> int:
        """Insert rows (and move ``last`` unless None) in the open
        transaction (begun here when none is). Rows are ``(token, seq,
        seg, off, len)``; a record whose token is there already is left out.

        :return: the records left out.
        """
        db = self._begin()
        before = db.total_changes
        if records:
            # In key order: each B-tree page is met once per batch.
            db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?)", sorted(records))
        skipped = len(records) - (db.total_changes - before)
        if linked:
            db.executemany("INSERT OR IGNORE INTO linked VALUES (?, ?, ?, ?, ?)", linked)
        if last is not None:
            self.set_last(last)
        return skipped

    def add_new(self, records: list) -> bool:
        """Insert record rows all or none, in the open transaction (begun
        here when none is): True when every token was new; False, and
        nothing changed, when one was there already. A batch's duplicate
        check and its inserts in one pass (:meth:`known` first costs a
        second lookup per row, for a duplicate that random and hash tokens
        make as good as impossible).

        The rows go in with one statement per :data:`INSERT_CHUNK` rows,
        not one per row as ``executemany`` would: ``sqlite3`` lets the GIL
        go at every statement step, and the writer thread then waits to
        take it back from the reactor thread, once per row (measured with
        ``bench/ab_daemon.py --events``: 6.4 futex calls and 2.4 context
        switches of the writer a query at 50 clients).

        "None" without a savepoint (two more statements a batch, each a
        hand-off of the GIL): a known token stops its statement, which
        SQLite takes back, and the rows of the statements before it (a
        batch of more than :data:`INSERT_CHUNK`), whose tokens were new,
        are taken out again (:meth:`drop`).
        """
        db = self._begin()
        # In key order: each B-tree page is met once per batch.
        rows = sorted(records)
        done = 0
        try:
            for sql, parameters, end in insert_statements(rows):
                db.execute(sql, parameters)
                done = end
        except sqlite3.IntegrityError:
            if done:
                self.drop([row[:2] for row in rows[:done]], [])
            return False
        return True

    def add_record(self, row: tuple) -> bool:
        """Insert one record row in the open transaction; False (and
        nothing changed) when its token is there already: the duplicate
        check and the insert in one lookup."""
        return self._begin().execute(_INSERT_ONE, row).rowcount == 1

    def drop(self, records: list, linked: list) -> None:
        """Delete rows inserted in the open transaction whose entries did
        not become durable: ``records`` as (token, seq), ``linked`` as
        (token, seq)."""
        db = self._begin()
        db.executemany("DELETE FROM records WHERE token = ? AND seq = ?", records)
        db.executemany("DELETE FROM linked WHERE token = ? AND seq = ?", linked)

    def set_last(self, last: Last) -> None:
        self._begin().execute("INSERT OR REPLACE INTO meta VALUES ('last', ?)", (last.encode(),))

    def commit(self) -> None:
        if self._in_txn:
            self._in_txn = False
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._in_txn:
            self._in_txn = False
            self._db.execute("ROLLBACK")

    def clear(self) -> None:
        """Empty every table but the layout (before a rebuild), committed."""
        self.rollback()
        self._db.execute("BEGIN")
        for table in ("records", "linked"):
            self._db.execute(f"DELETE FROM {table}")
        self._db.execute("DELETE FROM meta WHERE key = 'last'")
        self._db.execute("COMMIT")

    def remove(self, records: list[tuple[str, int]], linked: list[tuple[str, int]]) -> None:
        """Delete the rows of the entries ``records`` and ``linked``, each
        ``(token, seq)`` (a record's row only when it is that entry's: a
        later copy of a token keeps its own), committed (stopctl prune)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM records WHERE token = ? AND seq = ?", records)
            db.executemany("DELETE FROM linked WHERE token = ? AND seq = ?", linked)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
