"""Converting a store of stop 0.1.0 to the chained format, keeping the old
files.

stop 0.1.0 wrote ``<token> <sha256> <record>`` lines (plain or one gzip
member each) into ``records/seg-*``, with a text ``records/index`` and no
``records/format``. When the daemon (a writer) opens such a store it:

1. writes every sound record, in order, as chained entries into
   ``records.converting/`` (segments, then ``format`` last, all fsync'ed);
2. renames ``records/`` to ``records-0.1.0/`` (evidence is never deleted:
   the old files stay, torn tails and index included);
3. renames ``records.converting/`` to ``records/``.

A crash before 3 is finished on the next open (:func:`resume`: a
``records.converting/`` with its ``format`` file is complete); a crash
before 2 redoes the conversion. ``stopctl`` (a reader) converts nothing: it
says what to do (:func:`reader_message`). See docs/storage.rst.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator

from twisted.logger import Logger

from stop.errors import StoreFailed
from stop.storage.entries import RECORD, Entry, fsync_dir, match_line, oserror, read_entries
from stop.storage.offline import write_records

log = Logger()

#: Where the old files go, under data_dir.
OLD_NAME = "records-0.1.0"
CONVERTING = "records.converting"

_OLD_LINE = re.compile(rb"([!-~]{1,256}) ([0-9a-f]{64}) ")


def parse_old(line: bytes) -> Entry:
    """One entry of stop 0.1.0: ``<token> <sha256-of-record> <record>\\n``.

    :raise BadEntry: not one, or the SHA-256 differs.
    """
    m, record = match_line(line, _OLD_LINE, "<token> <sha256> <record>", 2)
    return Entry(RECORD, 0, m.group(1).decode("ascii"), m.group(2).decode("ascii"), "", record)


def reader_message(store) -> str:
    return (f"{store.records_dir} holds a store in the format of stop 0.1.0 (no records/format "
            f"file); the daemon converts it when it next starts, keeping the old files in "
            f"{os.path.join(store.data_dir, OLD_NAME)}; see docs/storage.rst, "
            "'Stores of stop 0.1.0'")


def resume(store) -> bool:
    """Finish a conversion a crash interrupted between its two renames:
    ``records/`` is missing and ``records.converting/`` is complete.

    :return: whether it did.
    """
    new = os.path.join(store.data_dir, CONVERTING)
    if not os.path.exists(os.path.join(new, "format")):
        return False
    os.rename(new, store.records_dir)
    fsync_dir(store.data_dir)
    log.warn("{dir}: finished converting a store of stop 0.1.0 (the old files are in {old})",
             dir=store.records_dir, old=os.path.join(store.data_dir, OLD_NAME))
    return True


def _old_records(store, counts: dict) -> Iterator[tuple[str, str, bytes]]:
    for seg in store.segments():
        path = store._seg_path(seg)
        for found in read_entries(store.codec, path, parse=parse_old):
            if found.entry is None:
                counts["bad"] += 1
                counts["bad_bytes"] += found.end - found.pos
                log.error("{path}: bad entry at offset {off} ({why}), {n} bytes: not converted "
                          "(kept in the old files)", path=path, off=found.pos, why=found.why,
                          n=found.end - found.pos)
                continue
            counts["records"] += 1
            yield RECORD, found.entry.token, found.entry.payload


def convert(store) -> None:
    """Convert ``store.records_dir`` (of stop 0.1.0) as the module doc says,
    in bounded memory. A token stored twice (0.1.0 refused that, so only
    tampering does it) is converted twice: the index keeps the first, as
    0.1.0 did, and ``stopctl verify --all`` reports the second.

    :raise StoreFailed: it cannot be done (an OS error: disk full...); the
        old files are untouched.
    """
    new = os.path.join(store.data_dir, CONVERTING)
    old = os.path.join(store.data_dir, OLD_NAME)
    n = 0
    while os.path.lexists(old):  # bounded by the directory's entries
        n += 1
        old = os.path.join(store.data_dir, f"{OLD_NAME}.{n}")
    log.warn("{dir}: a store of stop 0.1.0; converting it to the chained format "
             "(the old files are kept in {old})", dir=store.records_dir, old=old)
    counts = {"records": 0, "bad": 0, "bad_bytes": 0}
    try:
        if os.path.lexists(new):
            shutil.rmtree(new)  # an interrupted conversion: ours, redone
        count, head = write_records(new, _old_records(store, counts), store.codec,
                                    store._segment_bytes, sync=True)
        fsync_dir(store.data_dir)
        os.rename(store.records_dir, old)
        os.rename(new, store.records_dir)
        fsync_dir(store.data_dir)
    except OSError as exc:
        raise oserror("cannot convert the store of stop 0.1.0 in", store.data_dir, exc) from exc
    log.warn("{dir}: converted {n} records of stop 0.1.0 (head {count} {head}); {bad} bad entries "
             "({bad_bytes} bytes) not converted; the old files are in {old}: remove them once "
             "'stopctl verify --all' is content with the new store",
             dir=store.records_dir, n=counts["records"], count=count, head=head,
             bad=counts["bad"], bad_bytes=counts["bad_bytes"], old=old)
    if count != counts["records"]:
        raise StoreFailed(f"converting {store.records_dir}: wrote {count} entries for "
                          f"{counts['records']} records")
