"""Writing a store's files directly, without the daemon: for test and
benchmark fixtures (a store of a million records in seconds) and for
converting a store of an older format.

Nothing here may run on a store a daemon has open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from stop.storage.entries import (
    DEFAULT_SEGMENT_BYTES, FORMAT_LINE, GENESIS, Codec, format_entry, fsync_dir, make_dir,
    open_file, write_all, write_file)

#: An entry to write: (kind, token, payload); kind "R" or "L".
Item = tuple[str, str, bytes]


def write_store(data_dir: str, items: Iterable[Item], codec: Codec,
                segment_bytes: int = DEFAULT_SEGMENT_BYTES, sync: bool = True) -> tuple[int, str]:
    """Create a new store under ``data_dir`` (which may exist, but without
    ``records/``) holding ``items`` in order, chained from the start.

    Nothing is checked: a fixture may hold what ``save`` would refuse.

    :param codec: the store's codec (``FlatStore.codec``, ``GzipStore.codec``).
    :param sync: fsync the files and directories (off for throwaway fixtures).
    :return: the chain head ``(count, chain)``.
    """
    if not os.path.isdir(data_dir):
        make_dir(data_dir)
    return write_records(os.path.join(data_dir, "records"), items, codec, segment_bytes, sync)


def write_records(records_dir: str, items: Iterable[Item], codec: Codec,
                  segment_bytes: int = DEFAULT_SEGMENT_BYTES, sync: bool = True) -> tuple[int, str]:
    """:func:`write_store` into the new directory ``records_dir``; its
    ``format`` file is written last (with ``sync``, durably: a directory
    with it is complete)."""
    make_dir(records_dir)
    seq, chain = 0, GENESIS
    seg, size, fd = 0, 0, None
    buf: list[bytes] = []
    buffered = 0

    def flush() -> None:
        nonlocal buf, buffered
        if buf:
            write_all(fd, b"".join(buf))
            buf, buffered = [], 0

    try:
        for kind, token, payload in items:
            line, chain = format_entry(kind, seq + 1, token, payload, chain)
            seq += 1
            raw = codec.encode(line)
            if fd is None or (size > 0 and size + len(raw) > segment_bytes):
                if fd is not None:
                    flush()
                    if sync:
                        os.fsync(fd)
                    os.close(fd)
                seg += 1
                fd = open_file(os.path.join(records_dir, "seg-%08d%s" % (seg, codec.suffix)),
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                size = 0
            buf.append(raw)
            buffered += len(raw)
            size += len(raw)
            if buffered >= 1 << 20:
                flush()
        if fd is not None:
            flush()
            if sync:
                os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)
    if sync:
        write_file(os.path.join(records_dir, "format"), FORMAT_LINE)
    else:
        fd = open_file(os.path.join(records_dir, "format"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            write_all(fd, FORMAT_LINE)
        finally:
            os.close(fd)
    return seq, chain
