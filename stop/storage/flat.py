"""The ``flat`` store: the append-only log with entries stored as plain
lines (``seg-NNNNNNNN.log``), readable with ``cat`` and ``grep``."""

from __future__ import annotations

from stop.storage.log import Codec, LogStore


class FlatStore(LogStore):
    """Records in plain-text segments; see :class:`stop.storage.log.LogStore`
    for the parameters and the contract."""

    name = "flat"
    codec = Codec()
