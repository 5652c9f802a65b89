"""Record stores (``IRecordStore``): one module per store, and the factory
that picks one by its configured name.

``memory`` (tests), ``flat`` and ``gzip`` (the append-only log of
:mod:`stop.storage.log`, plain or gzip-compressed). See docs/storage.rst.
"""

from __future__ import annotations

from stop.errors import ConfigError
from stop.interfaces import IRecordStore
from stop.storage.flat import FlatStore
from stop.storage.gzip import GzipStore
from stop.storage.log import DEFAULT_SEGMENT_BYTES
from stop.storage.memory import MemoryStore

#: Store name (the ``store`` setting) -> class.
STORES = {"memory": MemoryStore, "flat": FlatStore, "gzip": GzipStore}


def make_store(name: str, data_dir: str, reactor=None, fsync: str = "batch",
               segment_bytes: int = DEFAULT_SEGMENT_BYTES, readonly: bool = False) -> IRecordStore:
    """A new, not yet opened store called ``name`` keeping its files under
    ``data_dir``; call its ``open()`` (after privileges are dropped).

    :param readonly: for ``stopctl``: read what a running daemon stores.
    :raise stop.errors.ConfigError: unknown ``name``, bad ``fsync`` or
        ``segment_bytes``; the message lists the valid values.
    """
    cls = STORES.get(name)
    if cls is None:
        raise ConfigError(f"store = {name!r}: unknown store; valid: {', '.join(sorted(STORES))}")
    return cls(data_dir, reactor=reactor, fsync=fsync, segment_bytes=segment_bytes, readonly=readonly)
