"""The whole chain of a log store: ``stopctl verify --all`` (every entry
checked in order, against a saved head too), the checkpoint a prune leaves,
``stopctl prune`` and ``stopctl stats``. Everything here reads the segments
in bounded memory (:meth:`LogStore.entries`); what it keeps grows with the
findings, capped at ``limit``, not with the records.

What ``verify --all`` can tell apart (docs/storage.rst, "Tamper evidence"):

* *damaged*: bytes that are no sound entry (a changed payload fails its
  SHA-256; a flat line or gzip member cut or garbled);
* *changed*: a sound entry whose chain does not follow from the entry
  before it (a field rewritten with a matching SHA-256, or an entry
  before it replaced);
* *removed*: entry numbers missing from the sequence (named from the
  index when it still holds them);
* *swapped*: two neighbours in each other's place; *moved*: an entry
  found far from its place;
* *inserted*: an entry whose number was met already (a copied line);
* *segment*: a segment file missing from the numbering;
* *duplicate*: a record stored again under a token already used;
* *head*: a saved chain head (``--head``) the store does not hold: entries
  were removed from its end (truncated), or the chain was rewritten.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from stop.errors import StoreFailed
from stop.storage.entries import (
    GENESIS, RECORD, chain_next, fsync_dir, salvage_fields, salvage_line, segment_end,
    write_file)
from stop.storage.index import Index, IndexBroken

#: File under records/ holding where the chain starts after a prune.
CHECKPOINT_NAME = "checkpoint"
_MAGIC = "stop-checkpoint 1"
#: Findings kept by verify --all (the rest are counted).
MAX_FINDINGS = 1000
#: Seconds before bad bytes at the very end are read again (a batch being written).
TAIL_WAIT = 0.2
#: Entries named from the index for one run of removed entries...
NAMED = 3
#: ... for the first this many runs (each costs a scan of the index).
NAMED_RUNS = 20


class Checkpoint(NamedTuple):
    """Where the chain of a store starts: after entry ``seq`` whose chain
    is ``chain`` (``0``, :data:`GENESIS` in a store never pruned), in
    segment ``segment``; ``history``: one line per prune, oldest first."""

    seq: int = 0
    chain: str = GENESIS
    segment: int = 1
    history: tuple[str, ...] = ()


def checkpoint_path(records_dir: str) -> str:
    return os.path.join(records_dir, CHECKPOINT_NAME)


def read_checkpoint(records_dir: str) -> Checkpoint:
    """The checkpoint of the store in ``records_dir`` (the default one
    when there is none).

    :raise StoreFailed: the file is there but not a checkpoint.
    """
    path = checkpoint_path(records_dir)
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("ascii")
    except FileNotFoundError:
        return Checkpoint()
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreFailed(f"cannot read the checkpoint {path}: {exc}") from None
    lines = text.splitlines()
    try:
        if lines[0] != _MAGIC:
            raise ValueError(lines[0])
        word, seq, chain, segment = lines[1].split(" ")
        if word != "start" or len(chain) != 64 or int(seq) < 0 or int(segment) < 1:
            raise ValueError(lines[1])
        int(chain, 16)
    except (IndexError, ValueError):
        raise StoreFailed(f"{path} is not a checkpoint of this version of stop") from None
    return Checkpoint(int(seq), chain, int(segment),
                      tuple(line[6:] for line in lines[2:] if line.startswith("prune ")))


def write_checkpoint(records_dir: str, cp: Checkpoint) -> None:
    """Replace the checkpoint atomically and durably (0600, owned like
    ``records_dir``: a prune run as root leaves it readable by the daemon's user)."""
    text = "".join([f"{_MAGIC}\nstart {cp.seq} {cp.chain} {cp.segment}\n"]
                   + [f"prune {line}\n" for line in cp.history])
    st = os.stat(records_dir)
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    write_file(checkpoint_path(records_dir), text.encode("ascii"), owner)


def parse_head(text: str) -> tuple[Optional[int], str]:
    """A saved head as the daemon logs it, ``COUNT:HASH``, or ``HASH``
    alone.

    :raise ValueError: neither.
    """
    count, _, chain = text.rpartition(":")
    chain = chain.lower()
    if len(chain) != 64 or any(c not in "0123456789abcdef" for c in chain):
        raise ValueError(f"head {text!r}: want COUNT:HASH or HASH (64 hex digits), as the daemon logs it")
    if not count:
        return None, chain
    if not count.isdigit():
        raise ValueError(f"head {text!r}: COUNT must be a number")
    return int(count), chain


def head_text(count: int, chain: Optional[str]) -> str:
    """A head as the daemon logs it and ``--head`` takes it."""
    return f"{count}:{chain or '?'}"


class Finding(NamedTuple):
    """One thing ``verify --all`` found. ``position``: the place (from 1) in
    log order of the entry or bad bytes concerned; ``where``: its segment
    file and offset."""

    kind: str
    position: Optional[int]
    seq: Optional[int]
    token: Optional[str]
    where: str
    text: str

    def as_dict(self) -> dict:
        return self._asdict()


@dataclass
class _Gap:
    """Entry numbers missing where entry ``after + len`` was met."""

    first: int
    last: int
    chain_before: Optional[str]   # chain of entry first - 1
    position: int                 # of the entry met in their place
    where: str
    before: str                   # "entry N (record T)" before the gap
    met_seq: int
    met: str                      # the entry met in their place
    unreadable: Optional[str] = None  # damaged bytes that may hold them
    met_kind: str = RECORD
    met_token: str = ""
    met_digest: Optional[str] = None


class _Ahead(NamedTuple):
    """An entry met before its place (taken out of the sequence until its
    place comes)."""

    position: int
    where: str
    what: str
    kind: str
    token: str
    digest: Optional[str]
    chain: Optional[str]


@dataclass
class Report:
    """What ``verify --all`` saw."""

    start: Checkpoint
    segments: int = 0
    entries: int = 0
    records: int = 0
    linked: int = 0
    head_seq: int = 0
    head_chain: Optional[str] = None
    findings: list[Finding] = field(default_factory=list)
    dropped: int = 0
    #: ``--head``: what the saved head is in this store (text), or None.
    saved_head: Optional[str] = None

    @property
    def sound(self) -> bool:
        return not self.findings and not self.dropped

    def as_dict(self) -> dict:
        return {"sound": self.sound, "segments": self.segments, "entries": self.entries,
                "records": self.records, "linked": self.linked,
                "start": {"seq": self.start.seq, "chain": self.start.chain,
                          "segment": self.start.segment},
                "head": {"count": self.head_seq, "chain": self.head_chain,
                         "text": head_text(self.head_seq, self.head_chain)},
                "saved_head": self.saved_head,
                "findings": [f.as_dict() for f in self.findings], "more_findings": self.dropped}


def _what(kind: str, seq: int, token: str) -> str:
    return f"entry {seq} ({'record' if kind == RECORD else 'linked to'} {token})"


class _Verifier:
    def __init__(self, store, limit: int):
        self.store = store
        self.limit = limit
        self.cp = read_checkpoint(store.records_dir)
        self.report = Report(self.cp)
        self.prev_seq = self.cp.seq
        self.prev_chain: Optional[str] = self.cp.chain
        self.prev_what = f"the checkpoint (entry {self.cp.seq})" if self.cp.seq else "the start"
        self.last_met: Optional[tuple[int, int]] = None   # (seq, position) of the entry just met
        self.gaps: list[_Gap] = []
        self.ahead: dict[int, _Ahead] = {}
        self.named = 0
        #: (segment, offset) of bad bytes at the very end, read again once.
        self.tail: Optional[tuple[int, int]] = None
        self.unreadable: Optional[str] = None  # damaged bytes of unknown number just met
        self.position = 0
        self.saved_at: Optional[int] = None
        #: The last entry met in order whose chain is known: the head.
        self.head: tuple[int, Optional[str]] = (self.cp.seq, self.cp.chain)

    def add(self, kind, seq, token, where, text, position=None) -> None:
        if len(self.report.findings) >= self.limit:
            self.report.dropped += 1
            return
        self.report.findings.append(Finding(kind, position or self.position, seq, token, where, text))

    def names(self, first: int, last: int) -> str:
        ix = getattr(self.store, "_rix", None)
        self.named += 1
        if ix is None or not ix.usable or self.named > NAMED_RUNS:
            return ""
        rows = ix.at_seq(first, last, NAMED + 1)
        if not rows:
            return ""
        shown = ", ".join(_what(k, s, t) for s, k, t in rows[:NAMED])
        more = ", ..." if len(rows) > NAMED else ""
        return f"; the index still names {shown}{more}"

    def run(self, saved: Optional[tuple[Optional[int], str]]) -> Report:
        self.saved = saved
        if saved is not None and saved[1] == self.cp.chain and self.cp.seq:
            self.saved_at = self.cp.seq
        segments = self.store.segments()
        self.check_numbering(segments)
        last_seg = segments[-1] if segments else None
        self.walk(self.store.entries(trailing=True), last_seg)
        if self.tail is not None:
            # Bad bytes at the very end may be a batch the daemon is
            # writing right now: read them once more, a moment later.
            time.sleep(TAIL_WAIT)
            seg, pos = self.tail
            self.tail = None
            self.walk(self.store._walk(seg, pos, trailing=True), last_seg, again=True)
        self.report.segments = len([s for s in segments if s >= self.cp.segment])
        self.put_back(None)
        for gap in self.gaps:
            self.gap_finding(gap)
        self.report.findings.sort(key=lambda f: (f.position or 0))
        self.report.head_seq, self.report.head_chain = self.head
        if saved is not None:
            self.check_saved(saved)
        return self.report

    def walk(self, entries, last_seg: Optional[int], again: bool = False) -> None:
        for seg, found in entries:
            if seg < self.cp.segment:
                continue  # left by an interrupted prune: reported by check_numbering
            where = f"{os.path.basename(self.store._seg_path(seg))} offset {found.pos}"
            if found.entry is None:
                at_end = seg == last_seg and found.end >= segment_end(self.store.codec,
                                                                     self.store._seg_path(seg))
                if at_end and not again:
                    self.tail = (seg, found.pos)
                    return
                self.position += 1
                self.damaged(seg, found, where, at_end)
                continue
            self.position += 1
            e = found.entry
            self.report.entries += 1
            if e.kind == RECORD:
                self.report.records += 1
            else:
                self.report.linked += 1
            self.place(e.kind, e.seq, e.token, e.digest, e.chain, where)

    def check_numbering(self, segments: list[int]) -> None:
        name = self.store._seg_path
        for s in segments:
            if s < self.cp.segment:
                self.add("segment", s, None, os.path.basename(name(s)),
                         f"{os.path.basename(name(s))} is before the checkpoint's first segment "
                         f"{self.cp.segment}: left by an interrupted prune (not checked)", position=0)
        kept = [s for s in segments if s >= self.cp.segment]
        expect = self.cp.segment
        for s in kept:
            if s > expect:
                gone = ", ".join(os.path.basename(name(n)) for n in range(expect, s))
                self.add("segment", expect, None, gone,
                         f"segment file{'s' if s - expect > 1 else ''} {gone} missing "
                         f"(the numbering goes on with {os.path.basename(name(s))})", position=0)
            expect = s + 1

    def damaged(self, seg: int, found, where: str, at_end: bool) -> None:
        raw = self.store.raw_at((seg, found.pos, found.end - found.pos))
        head = self.store.codec.head(raw)
        fields = salvage_fields(head)
        salvaged = salvage_line(head)
        tail = ""
        if at_end:
            tail = (" (at the very end of the store, still after a second read: a torn tail, "
                    "which the daemon moves aside when it next starts)")
        n = found.end - found.pos
        if salvaged is not None:
            kind, seq, token = salvaged
            self.add("damaged", seq, token, where,
                     f"position {self.position} ({where}): {_what(kind, seq, token)} is damaged "
                     f"({found.why}, {n} bytes){tail}")
            if fields is not None:
                # The payload failed, the fields are whole: its place in
                # the chain can still be checked.
                self.place(*fields, where, damaged=True)
            else:
                self.place(kind, seq, token, None, None, where, damaged=True)
        else:
            self.add("damaged", None, None, where,
                     f"position {self.position} ({where}): {n} bytes that are no entry "
                     f"({found.why}){tail}")
            self.unreadable = where
            self.prev_chain = None

    def put_back(self, seq: Optional[int]) -> None:
        """Entries met ahead of their place whose place has come (before
        entry ``seq``; None: the end): each a *moved* finding, then the
        sequence goes on from it."""
        while self.ahead and (seq is None or self.prev_seq + 1 in self.ahead and seq > self.prev_seq + 1):
            n = self.prev_seq + 1 if self.prev_seq + 1 in self.ahead else min(self.ahead)
            a = self.ahead.pop(n)
            self.add("moved", n, a.token, a.where,
                     f"position {a.position} ({a.where}): {a.what} is out of place: it belongs "
                     f"after {self.prev_what}" + (f", before position {self.position}" if seq else ""),
                     position=a.position)
            if n == self.prev_seq + 1 and a.digest is not None and self.prev_chain is not None \
                    and chain_next(self.prev_chain, a.kind, n, a.token, a.digest) != a.chain:
                self.add("changed", n, a.token, a.where,
                         f"position {a.position} ({a.where}): {a.what} does not follow from "
                         f"{self.prev_what} in the chain", position=a.position)
            self.prev_seq, self.prev_chain, self.prev_what = n, a.chain, a.what
            if a.chain is not None:
                self.head = (n, a.chain)

    def place(self, kind, seq, token, digest, chain, where, damaged=False) -> None:
        if self.ahead and seq > self.prev_seq + 1:
            self.put_back(seq)
        what = _what(kind, seq, token)
        expected = self.prev_seq + 1
        link = None if digest is None else (lambda prev, n: chain_next(prev, kind, n, token, digest))
        here = f"position {self.position} ({where})"
        if self.saved is not None and chain is not None and chain == self.saved[1]:
            self.saved_at = seq
        if seq == expected and seq in self.ahead:
            a = self.ahead.pop(seq)
            self.add("inserted", seq, token, a.where,
                     f"position {a.position} ({a.where}): {a.what} is met again at {here}, in its "
                     f"place: the one at position {a.position} was inserted", position=a.position)
        if seq == expected:
            if link and self.prev_chain is not None and link(self.prev_chain, seq) != chain and not damaged:
                self.add("changed", seq, token, where,
                         f"{here}: {what} does not follow from {self.prev_what} in the chain: "
                         "its kind, number, token or SHA-256 was changed, or the entry before it was replaced")
            self.advance(seq, chain, what, kind, token)
        elif seq > expected:
            if link and self.prev_chain is not None and link(self.prev_chain, expected) == chain:
                self.add("changed", seq, token, where,
                         f"{here}: entry {expected} ({token}) has its number changed to {seq}")
                self.advance(expected, chain, _what(kind, expected, token), kind, token)
                return
            self.gaps.append(_Gap(expected, seq - 1, self.prev_chain, self.position, where,
                                  self.prev_what, seq, what, self.unreadable, kind, token, digest))
            if len(self.gaps) > self.limit:  # bounded memory: the oldest stays missing
                self.gap_finding(self.gaps.pop(0))
            self.advance(seq, chain, what, kind, token)
        else:
            self.out_of_place(kind, seq, token, digest, chain, link, what, where, here, damaged)
            return
        self.unreadable = None

    def advance(self, seq, chain, what, kind, token) -> None:
        self.prev_seq, self.prev_chain, self.prev_what = seq, chain, what
        if chain is not None:
            self.head = (seq, chain)
        self.last_met = (seq, self.position)
        self.unreadable = None
        if kind == RECORD:
            self.check_token(seq, token)

    def check_token(self, seq: int, token: str) -> None:
        ix = getattr(self.store, "_rix", None)
        if ix is None or not ix.usable:
            return
        row = ix.record(token)
        if row is not None and row[0] != seq:
            self.add("duplicate", seq, token, "",
                     f"position {self.position}: entry {seq} stores record {token} again "
                     f"(the index holds entry {row[0]}); a token is never reused")

    def out_of_place(self, kind, seq, token, digest, chain, link, what, where, here, damaged) -> None:
        self.unreadable = None
        gap = next((g for g in self.gaps if g.first <= seq <= g.last), None)
        if gap is None:
            self.add("inserted", seq, token, where,
                     f"{here}: {what} again, after {self.prev_what}: an entry already met, inserted")
            return
        just_opened = gap.position == self.position - 1 and self.last_met == (gap.met_seq, gap.position)
        adjacent = just_opened and gap.first == gap.last and gap.met_seq == seq + 1
        if just_opened and not adjacent and gap is self.gaps[-1]:
            # The entry just met, which opened the gap, is the one out of
            # place (it came ahead of its turn): take it out of the
            # sequence until its place comes, and go on from before it.
            self.ahead[gap.met_seq] = _Ahead(gap.position, gap.where, gap.met, gap.met_kind,
                                             gap.met_token, gap.met_digest, self.prev_chain)
            if len(self.ahead) > self.limit:  # bounded memory
                a = self.ahead.pop(min(self.ahead))
                self.add("moved", None, a.token, a.where, f"position {a.position} ({a.where}): "
                         f"{a.what} is out of place", position=a.position)
            self.gaps.remove(gap)
            self.prev_seq, self.prev_chain, self.prev_what = gap.first - 1, gap.chain_before, gap.before
            self.unreadable = gap.unreadable
            self.place(kind, seq, token, digest, chain, where, damaged)
            return
        if adjacent:
            self.add("swapped", seq, token, gap.where,
                     f"positions {gap.position} and {self.position} ({gap.where}): {gap.met} and "
                     f"{what} are swapped", position=gap.position)
        else:
            self.add("moved", seq, token, where,
                     f"{here}: {what} is out of place: it belongs after {gap.before}, "
                     f"before position {gap.position}")
        if link and gap.chain_before is not None and seq == gap.first and link(gap.chain_before, seq) != chain:
            self.add("changed", seq, token, where,
                     f"{here}: {what} does not follow from entry {seq - 1} in the chain")
        # What is still missing of the gap.
        if seq == gap.first:
            gap.first, gap.chain_before = seq + 1, chain
        elif seq == gap.last:
            gap.last = seq - 1
        else:
            self.gaps.insert(self.gaps.index(gap) + 1, _Gap(seq + 1, gap.last, chain, gap.position,
                                                           gap.where, what, gap.met_seq, gap.met,
                                                           None, gap.met_kind, gap.met_token,
                                                           gap.met_digest))
            gap.last = seq - 1
        if gap.first > gap.last:
            self.gaps.remove(gap)

    def gap_finding(self, gap: _Gap) -> None:
        n = gap.last - gap.first + 1
        nums = f"entry {gap.first}" if n == 1 else f"entries {gap.first} to {gap.last} ({n})"
        where = f"before position {gap.position} ({gap.where}), between {gap.before} and {gap.met}"
        if gap.unreadable:
            self.add("damaged", gap.first, None, gap.where,
                     f"{nums} unreadable: in the damaged bytes at {gap.unreadable}, {where}",
                     position=gap.position)
        else:
            self.add("removed", gap.first, None, gap.where,
                     f"{nums} missing {where}: removed{self.names(gap.first, gap.last)}",
                     position=gap.position)

    def check_saved(self, saved: tuple[Optional[int], str]) -> None:
        count, chain = saved
        r = self.report
        given = head_text(count, chain) if count is not None else chain
        if self.saved_at is not None and (count is None or count == self.saved_at):
            if self.saved_at == r.head_seq:
                r.saved_head = f"the saved head {given} is the store's head"
            else:
                r.saved_head = (f"the saved head {given} is entry {self.saved_at}; "
                                f"{r.head_seq - self.saved_at} entries were stored since")
            return
        if count is not None and count <= self.cp.seq:
            r.saved_head = (f"the saved head {given} is entry {count}, pruned (the checkpoint is at "
                            f"entry {self.cp.seq}): it cannot be checked against what remains")
            return
        r.saved_head = f"the saved head {given} is not in the store"
        if count is not None and count > r.head_seq:
            n = count - r.head_seq
            why = (f"the store ends at entry {r.head_seq}, {n} entr{'ies' if n > 1 else 'y'} before "
                   "the saved head: entries were removed from its end (truncated)")
        else:
            why = "the chain that led to it was changed or removed"
            if count is None and self.cp.seq:
                why += (f", or it is an entry pruned before the checkpoint (entry {self.cp.seq}): "
                        "give COUNT:HASH to tell")
        self.add("head", count, None, "", f"the saved head {given} is not in the store "
                 f"(its head is {head_text(r.head_seq, r.head_chain)}): {why}",
                 position=self.position + 1)


def verify_all(store, head: Optional[str] = None, limit: int = MAX_FINDINGS) -> Report:
    """Check every entry of an open log store in order (see the module doc).

    :param head: a saved head (``COUNT:HASH`` or ``HASH``) to check against.
    :raise ValueError: ``head`` is not one.
    :raise StoreFailed: a segment or the checkpoint cannot be read.
    """
    saved = parse_head(head) if head is not None else None
    return _Verifier(store, limit).run(saved)


# -- prune ---------------------------------------------------------------------

def entry_time(kind: str, payload: bytes) -> Optional[datetime.datetime]:
    """When an entry was made: a record's ``time``, a linked entry's
    ``sent`` (or ``time``); None when it does not say (or is no JSON)."""
    try:
        obj = json.loads(payload)
        text = obj.get("time") if kind == RECORD else (obj.get("sent") or obj.get("time"))
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


class PrunePlan(NamedTuple):
    """The segments ``prune`` removes (a run from the first), what they
    hold, and the checkpoint it leaves; ``kept``: why it stops there;
    ``leftover``: segments before the checkpoint that an interrupted prune
    left (removed too, the checkpoint stays)."""

    segments: list[int]
    records: int
    linked: int
    first_seq: int
    last_seq: int
    last_chain: str
    oldest: Optional[str]
    newest: Optional[str]
    kept: str
    leftover: list[int]


def plan_prune(store, before: datetime.datetime) -> PrunePlan:
    """Which segments hold only entries made before ``before``: whole
    segments, from the first, never the last one (the daemon appends to
    it), and none after a segment that holds a later, undated or damaged
    entry (the chain must stay one piece).

    :raise StoreFailed: a segment cannot be read.
    """
    cp = read_checkpoint(store.records_dir)
    every = store.segments()
    segments = [s for s in every if s >= cp.segment]
    chosen: list[int] = []
    records = linked = 0
    first_seq = last_seq = None
    last_chain = cp.chain
    oldest = newest = None
    kept = "no segment but the last (the daemon appends to it)" if len(segments) < 2 else ""
    for s in segments[:-1]:
        n_rec = n_link = 0
        seg_first = seg_last = None
        seg_chain = None
        stop_why = None
        for seg, found in store._walk(s, 0, trailing=True):
            if seg != s:
                break
            e = found.entry
            if e is None:
                stop_why = f"segment {s} holds damaged bytes at offset {found.pos}"
                break
            t = entry_time(e.kind, e.payload)
            if t is None or t >= before:
                stop_why = (f"segment {s} holds {_what(e.kind, e.seq, e.token)} "
                            f"{'without a time' if t is None else 'of ' + t.isoformat()}")
                break
            seg_first = seg_first or e.seq
            seg_last, seg_chain = e.seq, e.chain
            if e.kind == RECORD:
                n_rec += 1
            else:
                n_link += 1
            stamp = t.isoformat()
            oldest = oldest or stamp
            newest = stamp
        if stop_why is not None or seg_last is None:
            kept = stop_why or f"segment {s} is empty"
            break
        chosen.append(s)
        records += n_rec
        linked += n_link
        first_seq = first_seq or seg_first
        last_seq, last_chain = seg_last, seg_chain
    else:
        if segments[:-1]:
            kept = f"segment {segments[-1]} is the last (the daemon appends to it)"
    return PrunePlan(chosen, records, linked, first_seq or 0, last_seq or cp.seq, last_chain,
                     oldest, newest, kept, [s for s in every if s < cp.segment])


def prune(store, plan: PrunePlan, now: str, before: str,
          log: Callable[[str], None]) -> Checkpoint:
    """Remove the segments of ``plan`` (and its leftovers): first the
    checkpoint (so what remains verifies, even if interrupted), then their
    index rows, then the files. ``log`` gets one line saying what was done.

    :raise StoreFailed: a file cannot be written or removed.
    """
    records_dir = store.records_dir
    cp = new = read_checkpoint(records_dir)
    done = []
    if plan.leftover:
        done.append(f"finished an interrupted prune: removed segments {_span(plan.leftover)} "
                    f"(before the checkpoint's first segment {cp.segment})")
    if plan.segments:
        line = (f"{now} before {before}: removed segments {_span(plan.segments)}, "
                f"entries {plan.first_seq}-{plan.last_seq} ({plan.records} records, {plan.linked} linked, "
                f"{plan.oldest} to {plan.newest}); chain goes on from {head_text(plan.last_seq, plan.last_chain)}")
        done.append(line)
        new = Checkpoint(plan.last_seq, plan.last_chain, plan.segments[-1] + 1, cp.history + (line,))
        try:
            write_checkpoint(records_dir, new)
        except OSError as exc:
            raise StoreFailed(f"cannot write the checkpoint in {records_dir}: {exc}") from None
    ix = Index(records_dir, readonly=False) if os.path.exists(os.path.join(records_dir, "index.sqlite")) else None
    try:
        if ix is not None:
            ix.open()
        for s in plan.leftover + plan.segments:
            if ix is not None:
                _unindex(store, ix, s)
            os.unlink(store._seg_path(s))
    except OSError as exc:
        raise StoreFailed(f"prune of {records_dir} stopped: {exc}; run it again") from None
    except (sqlite3.Error, IndexBroken) as exc:
        raise StoreFailed(f"prune of {records_dir}: the index {exc}; the segments are removed "
                          "from the checkpoint on; the daemon rebuilds the index when it next starts") from None
    finally:
        if ix is not None:
            ix.close()
    fsync_dir(records_dir)
    log(f"pruned {records_dir}: {'; '.join(done)}")
    return new


def _span(segments: list[int]) -> str:
    return f"{segments[0]}-{segments[-1]}" if len(segments) > 1 else str(segments[0])


def _unindex(store, ix: Index, s: int) -> None:
    """Delete the index rows of the entries of segment ``s``."""
    recs: list[tuple[str, int]] = []
    links: list[tuple[str, int]] = []
    for seg, found in store._walk(s, 0, trailing=True):
        if seg != s:
            break
        e = found.entry
        if e is not None:
            (recs if e.kind == RECORD else links).append((e.token, e.seq))
        if len(recs) + len(links) >= 10000:
            ix.remove(recs, links)
            recs, links = [], []
    ix.remove(recs, links)


# -- stats ---------------------------------------------------------------------

def stats(store) -> dict:
    """Records, bytes, per type and per day (UTC), the chain head, read
    from the segments in bounded memory (days and types are few)."""
    # The head as the segments have it (the index's may name entries cut off).
    seq, chain = read_checkpoint(store.records_dir)[:2]
    per_type: dict[str, int] = {}
    per_day: dict[str, int] = {}
    records = linked = damaged = 0
    for _, found in store.entries():
        e = found.entry
        if e is None:
            damaged += 1
            continue
        if e.seq > seq:
            seq, chain = e.seq, e.chain
        if e.kind != RECORD:
            linked += 1
            continue
        records += 1
        try:
            rec = json.loads(e.payload)
            rtype = str(rec.get("type"))
            day = str(rec.get("time", ""))[:10] or "?"
        except (ValueError, AttributeError):
            rtype, day = "?", "?"
        per_type[rtype] = per_type.get(rtype, 0) + 1
        per_day[day] = per_day.get(day, 0) + 1
    return {"records": records, "linked": linked, "damaged": damaged,
            "bytes": store.usage(), "segments": len(store.segments()),
            "per_type": dict(sorted(per_type.items())), "per_day": dict(sorted(per_day.items())),
            "head": {"count": seq, "chain": chain, "text": head_text(seq, chain)}}
