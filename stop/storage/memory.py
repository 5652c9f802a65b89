"""The ``memory`` store: a dict, for tests (re-exported by stop.testing).

It accepts and refuses exactly what the disk stores do (same token and
record checks, no reused token), so tests written against it hold for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet import defer
from zope.interface import implementer

from stop.errors import StoreFailed
from stop.interfaces import IRecordStore
from stop.storage.log import check_entry, check_linked


@implementer(IRecordStore)
class MemoryStore:
    """Records in a dict; nothing survives the process. ``save`` returns an
    already-fired Deferred. The constructor takes (and ignores) the disk
    stores' arguments so the factory can make any store the same way."""

    name = "memory"

    def __init__(self, data_dir: str | None = None, reactor=None, fsync: str = "batch",
                 segment_bytes: int = 0, readonly: bool = False):
        self._records: dict[str, bytes] = {}
        self._linked: dict[str, list[bytes]] = {}
        self._usage = 0
        self.closed = False

    def open(self) -> None:
        """Nothing to open."""

    def save(self, token: str, record: bytes) -> defer.Deferred:
        """Keep ``record`` under ``token``.

        :return: a fired Deferred: ``None``, or a StoreFailed failure for a
            bad or reused token, a bad record, or a closed store.
        """
        try:
            if self.closed:
                raise StoreFailed("memory store is closed")
            check_entry(token, record)
            if token in self._records:
                raise StoreFailed(f"token {token} is already stored; a token is never reused")
        except StoreFailed:
            return defer.fail()
        self._records[token] = record
        self._usage += len(token) + len(record)
        return defer.succeed(None)

    def save_linked(self, token: str, entry: bytes) -> defer.Deferred:
        """Keep ``entry`` linked to the record of ``token``.

        :return: a fired Deferred: ``None``, or a StoreFailed failure for an
            unknown token, a bad entry, or a closed store.
        """
        try:
            if self.closed:
                raise StoreFailed("memory store is closed")
            check_linked(token, entry)
            if token not in self._records:
                raise StoreFailed(f"no record for token {token}: nothing to link an entry to")
        except StoreFailed:
            return defer.fail()
        self._linked.setdefault(token, []).append(entry)
        self._usage += len(token) + len(entry)
        return defer.succeed(None)

    def linked(self, token: str) -> list[bytes]:
        """The entries linked to ``token``, oldest first."""
        return list(self._linked.get(token, ()))

    def get(self, token: str) -> bytes | None:
        """The bytes saved under ``token``, or ``None``."""
        return self._records.get(token)

    def integrity(self, token: str) -> bool:
        """Memory cannot rot: true for every stored token."""
        return token in self._records

    def records(self) -> Iterator[tuple[str, bytes]]:
        """``(token, record)`` in the order they were saved."""
        return iter(list(self._records.items()))

    def usage(self) -> int:
        """Bytes of tokens, records and linked entries held (what a disk
        store would count, less its framing)."""
        return self._usage

    def close(self) -> defer.Deferred:
        """Refuse later saves; the records stay readable."""
        self.closed = True
        return defer.succeed(None)
