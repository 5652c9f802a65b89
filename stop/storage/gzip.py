"""The ``gzip`` store: the append-only log with each entry stored as its
own gzip member (``seg-NNNNNNNN.log.gz``).

Concatenated gzip members are one valid gzip stream, so ``zcat`` reads a
segment as the same lines a flat store holds, and an entry can be appended
(and a torn one cut off) without rewriting the file. Only :mod:`zlib` is
used here: this module's name shadows the standard :mod:`gzip` for nobody
(imports are absolute), but it needs none of it.
"""

from __future__ import annotations

import zlib
from stop.storage.entries import _READ_CHUNK, MAX_LINE, BadEntry, Codec
from stop.storage.log import LogStore

# wbits for a gzip header and trailer (CRC-32 and length, checked on read).
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# How every member this store writes starts: magic, deflate, no flags.
_MEMBER_START = b"\x1f\x8b\x08\x00"


class GzipCodec(Codec):
    """One gzip member per entry; the member's CRC-32 and the entry's
    SHA-256 (over the uncompressed record) are both checked on read."""

    suffix = ".log.gz"
    #: A member's trailer may end with NUL bytes (its length, little
    #: endian): a segment's NULs at its end may be data, so no preallocation.
    pads = False

    def encode(self, line: bytes) -> bytes:
        """One gzip member holding ``line`` (header mtime 0: deterministic)."""
        comp = zlib.compressobj(6, zlib.DEFLATED, _GZIP_WBITS)
        return comp.compress(line) + comp.flush()

    def next_entry(self, buf: bytes, pos: int) -> tuple[bytes, int]:
        """Decompress the member at ``buf[pos]``, fed in small chunks so that
        finding its end costs O(member), not O(rest of the segment).

        :raise BadEntry: incomplete, corrupt, or larger than a record may be.
        """
        dec = zlib.decompressobj(_GZIP_WBITS)
        out = []
        size = 0
        p = pos
        view = memoryview(buf)
        try:
            while not dec.eof:
                if p >= len(buf):
                    raise BadEntry("incomplete gzip member")
                chunk = view[p:p + _READ_CHUNK]
                data = dec.decompress(chunk, MAX_LINE + 1 - size)
                if dec.unconsumed_tail:
                    raise BadEntry("gzip member larger than a record may be")
                out.append(data)
                size += len(data)
                p += len(chunk)
        except zlib.error as exc:
            raise BadEntry(f"bad gzip member: {exc}") from None
        return b"".join(out), p - len(dec.unused_data)


    def resync(self, buf: bytes, pos: int) -> int:
        """The next gzip member header after ``buf[pos]``."""
        nxt = buf.find(_MEMBER_START, pos + 1)
        return len(buf) if nxt < 0 else nxt

    def head(self, raw: bytes) -> bytes:
        """Decompress what can be of a bad member (no CRC check): the
        start of its line."""
        if not raw.startswith(_MEMBER_START) or len(raw) < 11:
            return b""
        try:
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw[10:], 1024)
        except zlib.error:
            return b""


class GzipStore(LogStore):
    """Records in gzip segments; see :class:`stop.storage.log.LogStore` for
    the parameters and the contract."""

    name = "gzip"
    codec = GzipCodec()
