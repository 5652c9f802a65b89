"""stop.storage.chain and ``stopctl verify --all`` / ``prune`` / ``stats``
on real stores: each tamper case is made by editing a real store's files
(flat lines, gzip members), then the whole chain is checked."""

import hashlib
import io
import json
import os
import shutil
import tempfile

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from stop import ctl, records
from stop.storage import STORES, make_store
from stop.storage.chain import read_checkpoint, verify_all
from stop.storage.entries import Codec, format_entry, read_entries, segment_end
from stop.storage.offline import write_store
from tests import rsyslogd

N = 24  # records; with linked entries on every 6th record: 28 entries


def token(i: int) -> str:
    return hashlib.sha1(b"chain-%d" % i).hexdigest()


def record(i: int) -> bytes:
    return records.canonical({
        "version": 1, "type": "ID" if i % 3 else "SV", "time": "2026-01-%02dT%02d:00:00.000000Z" % (1 + i // 24, i % 24),
        "host": "h", "user": {"uid": 1000 + i % 2, "name": "alice" if i % 2 else "bob"},
        "connection": {"local": {"address": "192.0.2.1", "port": 40000 + i},
                       "remote": {"address": "::ffff:198.51.100.7" if i % 2 else "2001:db8::7",
                                  "port": 6667}, "inode": i},
        "request": {"type": "ID", "sid": i, "ports": [40000 + i, 6667], "address": None}})


def items():
    out = []
    for i in range(N):
        out.append(("R", token(i), record(i)))
        if i % 6 == 5:
            out.append(("L", token(i), records.canonical(
                {"kind": "note", "sent": "2026-01-01T%02d:30:00.000000Z" % (i % 24)})))
    return out


class Store:
    """A store written in its files, indexed once by a writer, then closed."""

    def __init__(self, tmp_path, name, segment_bytes=2500, syslog_socket=None):
        self.name = name
        self.dir = str(tmp_path / "d")
        # stopctl prune logs to syslog: never to the host's /dev/log here.
        self.config = str(tmp_path / "stop.conf")
        with open(self.config, "w") as f:
            f.write(f"[stop]\nsyslog_socket = {syslog_socket or tmp_path / 'no-syslog'}\n")
        self.codec = STORES[name].codec
        self.items = items()
        self.count, self.chain = write_store(self.dir, self.items, self.codec, segment_bytes, sync=False)
        s = make_store(name, self.dir)
        s.open()
        s.close()
        self.records_dir = os.path.join(self.dir, "records")

    def segments(self):
        return sorted(os.path.join(self.records_dir, f) for f in os.listdir(self.records_dir)
                      if f.startswith("seg-"))

    def spans(self, path):
        """(pos, end) of each stored entry of a segment file."""
        return [(f.pos, f.end) for f in read_entries(self.codec, path)]

    def edit(self, n, change):
        """Apply ``change(list of stored entries)`` to the segment holding
        entry number ``n`` (1-based over the store); returns the index of
        the entry in that list."""
        seen = 0
        for path in self.segments():
            spans = self.spans(path)
            if seen + len(spans) >= n:
                data = open(path, "rb").read()
                parts = [data[a:b] for a, b in spans]
                change(parts, n - seen - 1)
                with open(path, "wb") as f:
                    f.write(b"".join(parts))
                return
            seen += len(spans)
        raise AssertionError(f"no entry {n}")

    def ctl(self, *argv):
        out = io.StringIO()
        rc = ctl.main(["--config", self.config, "--data-dir", self.dir, "--storage", self.name,
                       *argv], out=out)
        return rc, out.getvalue()

    def verify(self, *extra):
        return self.ctl("verify", "--all", *extra)

    def findings(self, *extra):
        rc, text = self.ctl("verify", "--all", "--json", *extra)
        report = json.loads(text)
        assert rc == (0 if report["sound"] else 1)
        return report


@pytest.fixture(params=["flat", "gzip"])
def store(request, tmp_path):
    return Store(tmp_path, request.param)


def kinds(report):
    return [(f["kind"], f["seq"]) for f in report["findings"]]


def test_sound_store(store):
    assert len(store.segments()) >= 3
    rc, text = store.verify()
    assert rc == 0, text
    assert text.endswith("SOUND\n")
    assert f"checked {len(store.items)} entries ({N} records, 4 linked)" in text
    assert f"head {store.count}:{store.chain}" in text


def test_flipped_byte(store):
    def flip(parts, i):
        p = bytearray(parts[i])
        p[-5] ^= 0x01  # in the payload (flat); the gzip trailer (CRC)
        parts[i] = bytes(p)
    store.edit(7, flip)
    report = store.findings()
    assert kinds(report) == [("damaged", 7)]
    f = report["findings"][0]
    assert f["position"] == 7 and f["token"] == store.items[6][1]
    assert f["where"].startswith("seg-")


def test_changed_payload_with_its_sha256(tmp_path):
    """Rewriting an entry whole (new payload, its SHA-256 recomputed) is
    caught by the chain."""
    store = Store(tmp_path, "flat")
    new = records.canonical({"type": "ID", "time": "2026-01-01T00:00:00Z", "user": {"name": "mallory"}})

    def rewrite(parts, i):
        kind, seq, tok, _, chain = parts[i].split(b" ")[:5]
        line, _ = format_entry(kind.decode(), int(seq), tok.decode(), new, "0" * 64)
        fields = line.split(b" ", 5)
        fields[4] = chain  # the chain field kept as it was
        parts[i] = b" ".join(fields)
    store.edit(5, rewrite)
    report = store.findings()
    assert kinds(report) == [("changed", 5)]
    assert store.items[4][1] in report["findings"][0]["text"]


def test_deleted_line(store):
    store.edit(9, lambda parts, i: parts.pop(i))
    report = store.findings()
    assert kinds(report) == [("removed", 9)]
    text = report["findings"][0]["text"]
    # The index still names what was removed: by token.
    assert "entry 9 missing" in text and store.items[8][1] in text
    assert report["findings"][0]["position"] == 9


def swap(store, n, distance):
    """Swap entries ``n`` and ``n + distance`` (one segment)."""
    def change(parts, i):
        parts[i], parts[i + distance] = parts[i + distance], parts[i]
    store.edit(n, change)


def test_swapped_lines(store):
    swap(store, 3, 1)
    report = store.findings()
    assert kinds(report) == [("swapped", 3)]
    text = report["findings"][0]["text"]
    assert "positions 3 and 4" in text
    assert store.items[2][1] in text and store.items[3][1] in text


def move(store, n, to):
    """Move entry ``n`` to be entry ``to`` (both in the first segment)."""
    def change(parts, i):
        parts.insert(i + to - n, parts.pop(i))
    store.edit(n, change)


@pytest.mark.parametrize("n, to, expect", [
    (5, 2, [("moved", 5)]),                 # ahead of its place
    (2, 5, [("moved", 2)]),                 # behind it
    (2, 3, [("swapped", 2)]),               # neighbours
])
def test_moved_entry_is_the_one_named(store, n, to, expect):
    assert len(store.spans(store.segments()[0])) >= 5
    move(store, n, to)
    report = store.findings()
    assert kinds(report) == expect
    assert store.items[n - 1][1] in report["findings"][0]["text"]


def test_two_entries_far_apart_swapped(store):
    swap(store, 2, 3)
    report = store.findings()
    assert sorted(kinds(report)) == [("moved", 2), ("moved", 5)]
    for f in report["findings"]:
        assert store.items[f["seq"] - 1][1] in f["text"]


def test_inserted_copy(store):
    copy = []
    store.edit(2, lambda parts, i: copy.append(parts[i]))
    store.edit(6, lambda parts, i: parts.insert(i + 1, copy[0]))
    report = store.findings()
    assert kinds(report) == [("inserted", 2)]
    assert report["findings"][0]["position"] == 7


def test_segment_removed(store):
    segs = store.segments()
    first_of_second = len(store.spans(segs[0])) + 1
    n = len(store.spans(segs[1]))
    os.unlink(segs[1])
    report = store.findings()
    assert kinds(report) == [("segment", 2), ("removed", first_of_second)]
    assert f"entries {first_of_second} to {first_of_second + n - 1} ({n}) missing" \
        in report["findings"][1]["text"]


def test_truncated_tail_against_saved_head(store):
    saved = f"{store.count}:{store.chain}"
    rc, text = store.verify("--head", saved)
    assert rc == 0 and f"the saved head {saved} is the store's head" in text
    last = store.segments()[-1]
    spans = store.spans(last)
    with open(last, "r+b") as f:
        f.truncate(spans[-2][0])  # the last two entries gone, cleanly
    rc, text = store.verify()
    assert rc == 0  # nothing inside the store shows it...
    report = store.findings("--head", saved)  # ...the saved head does
    assert kinds(report) == [("head", store.count)]
    assert "2 entries before the saved head" in report["findings"][0]["text"]
    rc, text = store.verify("--head", store.chain)  # the hash alone
    assert rc == 1 and "HEAD: " in text


def test_older_saved_head_is_found(store):
    rc, text = store.verify("--head", f"{store.count - 3}:{_chain_at(store, store.count - 3)}")
    assert rc == 0 and "3 entries were stored since" in text


def _chain_at(store, n):
    seq = 0
    for path in store.segments():
        for f in read_entries(store.codec, path):
            seq += 1
            if seq == n:
                return f.entry.chain


def test_keeps_going_past_the_first_finding(store):
    store.edit(20, lambda parts, i: parts.pop(i))
    swap(store, 12, 1)

    def flip(parts, i):
        p = bytearray(parts[i])
        p[-5] ^= 0x01
        parts[i] = bytes(p)
    store.edit(4, flip)
    rc, text = store.verify()
    assert rc == 1
    assert [line.split(":")[0] for line in text.splitlines()[:3]] == ["DAMAGED", "SWAPPED", "REMOVED"]
    assert text.endswith("NOT SOUND: 3 findings\n")


def test_bad_head_argument_is_a_usage_error(store):
    assert store.verify("--head", "nonsense")[0] == 2
    assert store.ctl("verify", "--head", store.chain, token(1))[0] == 2


def test_prune_then_verify(store, capsys):
    segs = store.segments()
    kept_first = len(store.spans(segs[0])) + len(store.spans(segs[1])) + 1
    first_kept_token = next(t for k, t, _ in store.items[kept_first - 1:] if k == "R")
    # Every record of the first two segments is before 05:00 (records are an hour apart).
    before = json.loads(store.items[kept_first - 1][2])["time"] if store.items[kept_first - 1][0] == "R" \
        else None
    assert before is not None
    rc, text = store.ctl("prune", "--before", before, "--dry-run")
    assert rc == 0 and text.startswith("would prune: 2 segments") and len(store.segments()) == len(segs)
    rc, text = store.ctl("prune", "--before", before)  # not a terminal, no --yes
    assert rc == 2 and len(store.segments()) == len(segs)
    rc, text = store.ctl("prune", "--before", before, "--yes")
    assert rc == 0 and text.startswith(f"pruned {store.records_dir}: ")
    assert "not logged to syslog" in capsys.readouterr().err  # no socket here: said so
    assert f"entries 1-{kept_first - 1}" in text
    assert store.segments() == segs[2:]
    cp = read_checkpoint(store.records_dir)
    assert (cp.seq, cp.segment, len(cp.history)) == (kept_first - 1, 3, 1)
    assert oct(os.stat(os.path.join(store.records_dir, "checkpoint")).st_mode & 0o777) == "0o600"
    # What remains verifies, from the checkpoint, against the old head too.
    rc, text = store.verify("--head", f"{store.count}:{store.chain}")
    assert rc == 0, text
    assert f"from entry {kept_first} (after a prune)" in text
    assert store.ctl("show", store.items[0][1])[0] == 2
    assert store.ctl("show", first_kept_token)[0] == 0
    # A daemon opening the pruned store goes on with the chain.
    s = make_store(store.name, store.dir)
    s.open()
    assert s.head() == (store.count, store.chain)
    s.close()
    assert store.verify()[0] == 0
    # Nothing more to prune before the same time: the kept segments hold later records.
    rc, text = store.ctl("prune", "--before", before, "--yes")
    assert rc == 0 and text.startswith("nothing to prune")


def test_prune_then_removing_the_first_kept_segment_is_found(store):
    segs = store.segments()
    before = "2026-01-01T12:00:00Z"
    assert store.ctl("prune", "--before", before, "--yes")[0] == 0
    left = store.segments()
    assert len(left) < len(segs)
    os.unlink(left[0])
    report = store.findings()
    assert [k for k, _ in kinds(report)] == ["segment", "removed"]


def test_prune_never_takes_the_last_segment(tmp_path):
    store = Store(tmp_path, "flat", segment_bytes=10**6)
    rc, text = store.ctl("prune", "--before", "2030-01-01", "--yes")
    assert rc == 0 and "nothing to prune" in text and "the daemon appends to it" in text
    assert store.verify()[0] == 0


def test_stats(store):
    rc, text = store.ctl("stats", "--json")
    st = json.loads(text)
    assert rc == 0
    assert (st["records"], st["linked"], st["damaged"]) == (N, 4, 0)
    assert st["per_type"] == {"ID": 16, "SV": 8}
    assert st["per_day"] == {"2026-01-01": 24}
    assert st["head"]["text"] == f"{store.count}:{store.chain}"
    assert st["quota_bytes"] == 1024 * 2**20 and 0 < st["quota_used"] < 0.001
    rc, text = store.ctl("stats")
    assert rc == 0 and "type ID" in text and f"{store.count}:{store.chain}" in text


def test_verify_all_api_limits_findings(store):
    for n in (20, 14, 8):
        store.edit(n, lambda parts, i: parts.pop(i))
    s = make_store(store.name, store.dir, readonly=True)
    s.open()
    report = verify_all(s, limit=2)
    assert len(report.findings) == 2 and report.dropped == 1 and not report.sound



class PruneWhileWritingTests(unittest.TestCase):
    """``stopctl prune`` on a store a writer (the daemon) has open: the
    writer goes on saving, reads still work, what remains verifies."""

    @defer.inlineCallbacks
    def test_prune_under_a_running_writer(self):
        from twisted.internet import reactor
        base = tempfile.mkdtemp(prefix="stop-chain-")
        self.addCleanup(shutil.rmtree, base, True)
        d = os.path.join(base, "d")
        writer = make_store("flat", d, reactor=reactor, segment_bytes=3000)
        writer.open()
        self.addCleanup(writer.close)
        yield defer.gatherResults([writer.save(token(i), record(i)) for i in range(N)])
        yield writer.close()  # its index rows committed...
        writer = make_store("flat", d, reactor=reactor, segment_bytes=3000)
        writer.open()          # ...and open again, as a running daemon
        self.addCleanup(writer.close)
        conf = os.path.join(base, "stop.conf")
        with open(conf, "w") as f:
            f.write(f"[stop]\nsyslog_socket = {base}/no-syslog\n")
        argv = ["--config", conf, "--data-dir", d, "--storage", "flat"]
        out = io.StringIO()
        self.assertEqual(ctl.main(argv + ["prune", "--before", "2026-01-01T12:00:00Z", "--yes"], out=out), 0)
        self.assertIn("removed segments 1-", out.getvalue())
        self.assertIsNone(writer.get(token(0)))        # its index row is gone
        self.assertEqual(writer.get(token(N - 1)), record(N - 1))
        yield defer.gatherResults([writer.save(token(i), record(i)) for i in range(N, N + 10)])
        self.assertEqual(writer.get(token(N + 9)), record(N + 9))
        writer.recount_usage()
        # Every file's bytes, the current segment's up to its entries (the
        # room preallocated after them is not counted).
        paths = [os.path.join(d, "records", f) for f in os.listdir(os.path.join(d, "records"))]
        self.assertEqual(writer.usage(), sum(
            segment_end(Codec(), p) if os.path.basename(p).startswith("seg-")
            else os.path.getsize(p) for p in paths))
        yield writer.close()
        out = io.StringIO()
        rc = ctl.main(argv + ["verify", "--all"], out=out)
        self.assertEqual(rc, 0, out.getvalue())
        self.assertIn("(after a prune)", out.getvalue())
        self.assertIn(f"head {N + 10}:", out.getvalue())


@pytest.mark.skipif(not rsyslogd.available(), reason="rsyslogd not installed")
def test_prune_is_logged_to_syslog(tmp_path):
    server = rsyslogd.Rsyslogd(tmp_path / "rsyslog").start()
    try:
        store = Store(tmp_path, "flat", syslog_socket=server.socket_path)
        rc, text = store.ctl("prune", "--before", "2026-01-01T12:00:00Z", "--yes")
        assert rc == 0
        (msg,) = server.wait_messages(lambda m: m[2] == "stopctl")
        assert msg[:2] == ("daemon", "warning")
        assert msg[6] == text.strip()
        assert "removed segments 1-" in msg[6] and "chain goes on from" in msg[6]
    finally:
        server.stop()


def test_what_verify_all_keeps_is_bounded(store):
    """Every other entry removed: the runs of missing entries are more than
    the limit; the oldest become findings as they go, nothing is lost."""
    for n in range(len(store.items) - 1, 1, -2):
        store.edit(n, lambda parts, i: parts.pop(i))
    s = make_store(store.name, store.dir, readonly=True)
    s.open()
    report = verify_all(s, limit=4)
    assert len(report.findings) == 4 and report.dropped == len(range(len(store.items) - 1, 1, -2)) - 4


# -- review fixes ----------------------------------------------------------------

def test_an_interrupted_prune_is_finished_by_the_next(store, monkeypatch):
    from stop.storage import chain
    real = chain.os.unlink
    calls = []

    def unlink_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error", path)
        real(path)
    monkeypatch.setattr(chain.os, "unlink", unlink_once)
    segs = store.segments()
    rc, text = store.ctl("prune", "--before", "2026-01-01T12:00:00Z", "--yes")
    assert rc == 1
    assert store.segments() == segs  # checkpoint written, nothing removed
    cp = read_checkpoint(store.records_dir)
    assert cp.segment > 1
    report = store.findings()
    assert {k for k, _ in kinds(report)} == {"segment"}
    rc, text = store.ctl("prune", "--before", "2026-01-01T12:00:00Z", "--yes")
    assert rc == 0 and "finished an interrupted prune: removed segments 1" in text, text
    assert store.segments() == segs[cp.segment - 1:]
    assert read_checkpoint(store.records_dir) == cp  # it stays
    assert store.verify()[0] == 0


def test_a_head_saved_before_a_prune_is_not_a_finding(store):
    old = f"3:{_chain_at(store, 3)}"
    assert store.ctl("prune", "--before", "2026-01-01T12:00:00Z", "--yes")[0] == 0
    rc, text = store.verify("--head", old)
    assert rc == 0, text
    assert "is entry 3, pruned (the checkpoint is at entry" in text
    cp = read_checkpoint(store.records_dir)
    rc, text = store.verify("--head", f"{cp.seq}:{cp.chain}")  # the checkpoint's own
    assert rc == 0 and f"is entry {cp.seq};" in text


def test_a_copy_inserted_before_its_entry(store):
    copy = []
    store.edit(4, lambda parts, i: copy.append(parts[i]))
    store.edit(1, lambda parts, i: parts.insert(i, copy[0]))
    report = store.findings()
    assert kinds(report) == [("inserted", 4)]
    assert report["findings"][0]["position"] == 1


def test_the_first_and_fourth_swapped(store):
    swap(store, 1, 3)
    report = store.findings()
    assert sorted(kinds(report)) == [("moved", 1), ("moved", 4)]
    assert {f["position"] for f in report["findings"]} == {1, 4}


def test_index_remove_takes_only_that_entry(tmp_path):
    from stop.storage.index import Index
    ix = Index(str(tmp_path), readonly=False)
    ix.open()
    ix.add([("t", 5, 1, 0, 10)], [("t", 6, 1, 10, 10)])
    ix.commit()
    ix.remove([("t", 1)], [("t", 2)])  # another entry of the same token
    assert ix.record("t") == (5, (1, 0, 10)) and len(ix.linked("t")) == 1
    ix.remove([("t", 5)], [("t", 6)])
    assert ix.record("t") is None and ix.linked("t") == []
    ix.close()


def test_bad_bytes_at_the_end_are_read_again(store, monkeypatch):
    from stop.storage import chain
    last = store.segments()[-1]
    whole = open(last, "rb").read()
    a, b = store.spans(last)[-1]
    with open(last, "r+b") as f:
        f.truncate(a + (b - a) // 2)  # an entry half written...
    monkeypatch.setattr(chain.time, "sleep", lambda s: open(last, "wb").write(whole))
    rc, text = store.verify()  # ...complete when read again
    assert rc == 0, text
    monkeypatch.undo()
    with open(last, "r+b") as f:
        f.truncate(a + (b - a) // 2)
    report = store.findings()
    assert [k for k, _ in kinds(report)] == ["damaged"]
    assert "still after a second read" in report["findings"][0]["text"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_prune_as_root_leaves_the_checkpoint_to_the_store_owner(store):
    for path in [store.dir, store.records_dir] + [os.path.join(store.records_dir, f)
                                                  for f in os.listdir(store.records_dir)]:
        os.chown(path, 4242, 4242)
    assert store.ctl("prune", "--before", "2026-01-01T12:00:00Z", "--yes")[0] == 0
    st = os.stat(os.path.join(store.records_dir, "checkpoint"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4242, 4242, 0o600)


def test_end_of_input_at_the_prompt_prunes_nothing(store, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdin", Tty(""))
    segs = store.segments()
    rc, _ = store.ctl("prune", "--before", "2026-01-01T12:00:00Z")
    assert rc == 2 and store.segments() == segs
    assert "nothing pruned" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", Tty("y\n"))
    assert store.ctl("prune", "--before", "2026-01-01T12:00:00Z")[0] == 0
    assert len(store.segments()) < len(segs)


def test_a_token_stored_twice_is_reported(tmp_path):
    """What a store converted from 0.1.0 can hold: the index keeps the
    first, verify --all names the second."""
    d = str(tmp_path / "d")
    items = [("R", token(i), record(i)) for i in range(4)] + [("R", token(1), record(9))]
    write_store(d, items, STORES["flat"].codec, sync=False)
    s = make_store("flat", d)
    s.open()
    s.close()
    out = io.StringIO()
    rc = ctl.main(["--config", "/dev/null", "--data-dir", d, "--storage", "flat", "verify", "--all",
                   "--json"], out=out)
    report = json.loads(out.getvalue())
    assert rc == 1
    assert [(f["kind"], f["seq"], f["token"], f["position"]) for f in report["findings"]] == \
        [("duplicate", 5, token(1), 5)]
