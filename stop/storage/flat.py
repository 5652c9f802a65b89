"""The ``flat`` store: the append-only log with entries stored as plain
lines (``seg-NNNNNNNN.log``), readable with ``cat`` and ``grep`` (``grep
-a`` for the current segment, which ends in NUL bytes: room preallocated
for the next entries, see :mod:`stop.storage.log`)."""

from __future__ import annotations

from stop.storage.log import Codec, LogStore


class FlatStore(LogStore):
    """Records in plain-text segments; see :class:`stop.storage.log.LogStore`
    for the parameters and the contract."""

    name = "flat"
    codec = Codec()
