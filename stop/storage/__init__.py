"""Record stores (``IRecordStore``): one module per store, and the factory
that picks one by its configured name.

``memory`` (tests), ``flat`` and ``gzip`` (the append-only log of
:mod:`stop.storage.log`, plain or gzip-compressed). See docs/storage.rst.
"""

from __future__ import annotations

from stop import plugins
from stop.errors import ConfigError
from stop.interfaces import IRecordStore
from stop.storage.flat import FlatStore
from stop.storage.gzip import GzipStore
from stop.storage.log import DEFAULT_SEGMENT_BYTES
from stop.storage.memory import MemoryStore

#: Store name (the ``storage`` setting) -> class.
STORES = {"memory": MemoryStore, "flat": FlatStore, "gzip": GzipStore}


def _built_in(cls):
    def build(config, reactor) -> IRecordStore:
        return cls(config.data_dir, reactor=reactor, fsync=config.fsync)
    build.__name__ = f"_{cls.__name__}"
    return build


#: Built-in stores by name, each built as ``(config, reactor) -> store``.
BUILT_IN = {name: _built_in(cls) for name, cls in STORES.items()}


def make_storage(config, reactor) -> IRecordStore:
    """The store ``config.storage`` names, not yet opened (call its
    ``open()`` after privileges are dropped): a built-in one (``memory``,
    ``flat``, ``gzip``: under ``config.data_dir``, with ``config.fsync``)
    or a site plugin's (stop-plugins(7)). The daemon's factory, with the
    signature of every backend factory (``stop.os.make_lookup``,
    ``stop.os.make_inspector``).

    :raise ConfigError: no such store or plugin, or it could not be built.
    """
    return plugins.make("storage", BUILT_IN, config, reactor)


def make_store(name: str, data_dir: str, reactor=None, fsync: str = "batch",
               segment_bytes: int = DEFAULT_SEGMENT_BYTES, readonly: bool = False) -> IRecordStore:
    """A new, not yet opened built-in store called ``name`` keeping its
    files under ``data_dir``, with every parameter explicit (stopctl,
    benchmarks, tests; the daemon uses :func:`make_storage`); call its
    ``open()`` (after privileges are dropped).

    :param readonly: for ``stopctl``: read what a running daemon stores.
    :raise stop.errors.ConfigError: unknown ``name``, bad ``fsync`` or
        ``segment_bytes``; the message lists the valid values.
    """
    cls = STORES.get(name)
    if cls is None:
        raise ConfigError(f"store = {name!r}: unknown store; valid: {', '.join(sorted(STORES))}")
    return cls(data_dir, reactor=reactor, fsync=fsync, segment_bytes=segment_bytes, readonly=readonly)
