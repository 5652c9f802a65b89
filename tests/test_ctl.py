"""stop.ctl: what ``show`` prints for a record, and the exit statuses."""

import io
import json

import pytest

from stop import ctl, records


def test_describe_id_record():
    rec = {"version": 1, "type": "ID", "time": "2026-01-01T00:00:00.000000Z", "host": "h",
           "user": {"uid": 1000, "name": "alice"},
           "connection": {"local": {"address": "192.0.2.1", "port": 40000},
                          "remote": {"address": "2001:db8::2", "port": 6667}, "inode": 5},
           "requester": {"address": "2001:db8::2", "port": 50000},
           "request": {"type": "ID_REC", "sid": 7, "ports": [40000, 6667], "address": None},
           "recursion": {"status": "not-implemented"}}
    rows = dict(ctl.describe("t" * 40, rec))
    assert rows["user"] == "alice (uid 1000)"
    assert rows["local"] == "192.0.2.1:40000" and rows["remote"] == "[2001:db8::2]:6667"
    assert rows["request"] == "40000, 6667 : ID_REC : 7"
    assert rows["recursion"] == '{"status": "not-implemented"}'


def test_describe_sv_record_lists_processes_and_connections():
    rec = {"type": "SV", "processes": {
        "processes": [
            {"pid": 30, "ppid": 20, "users": {"effective": "bob"}, "cmdline": ["nc", "h", "9"],
             "reached": {"via": "socket"}},
            {"pid": 20, "ppid": 1, "users": {"effective": "bob"}, "cmdline": [], "name": "sh",
             "reached": {"via": "parent"}}],
        "remote_connections": [{"local": {"address": "192.0.2.1", "port": 8888},
                                "remote": {"address": "192.0.2.9", "port": 5000},
                                "direction": "inbound"}],
        "unavailable": {"cwd": "EACCES"}, "truncated": {"processes": False}}}
    rows = ctl.describe("t" * 40, rec)
    procs = [v for k, v in rows if k == "process"]
    assert procs == ["30 (parent 20) bob  via socket  nc h 9", "20 (parent 1) bob  via parent  [sh]"]
    assert ("connection", "192.0.2.1:8888 -> 192.0.2.9:5000 inbound") in rows
    assert ("unavailable", "cwd: EACCES") in rows


def test_show_unknown_token_exits_2(tmp_path, capsys):
    assert ctl.main(["--config", "/dev/null", "--data-dir", str(tmp_path), "--storage", "memory",
                     "show", "0" * 40], out=io.StringIO()) == 2
    assert "no record" in capsys.readouterr().err


def test_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.conf"
    bad.write_text("[stop]\nnope = 1\n")
    assert ctl.main(["--config", str(bad), "list"], out=io.StringIO()) == 2
    assert "unknown setting 'nope'" in capsys.readouterr().err


def test_canonical_records_have_no_newline():
    assert b"\n" not in records.canonical({"a": "x\ny", "b": ["\u00e9"]})


def _recursion(of, outcome, **extra):
    entry = {"version": 1, "kind": "recursion", "of": of,
             "target": {"address": "192.0.2.1", "port": 113},
             "local": {"address": "192.0.2.10", "port": 40001},
             "request": {"type": "SV_REC", "sid": 7, "ports": [6667, 40001]},
             "sent": "2026-01-01T00:00:01.000000Z", "answered": "2026-01-01T00:00:02.000000Z",
             "outcome": outcome}
    entry.update(extra)
    return records.canonical(entry)


ID_REC = {"version": 1, "type": "SV_REC", "time": "2026-01-01T00:00:00.000000Z", "host": "h",
          "user": {"uid": 1000, "name": "alice"},
          "connection": {"local": {"address": "192.0.2.10", "port": 40000},
                         "remote": {"address": "198.51.100.7", "port": 6667}, "inode": 5},
          "requester": {"address": "198.51.100.7", "port": 50000},
          "request": {"type": "SV_REC", "sid": 7, "ports": [40000, 6667], "address": None}}


@pytest.fixture(params=["flat", "gzip"])
def linked_store(request, tmp_path):
    """A store written directly: one record with four linked entries (three
    recursion outcomes and one of another kind), one record with none."""
    from stop.storage import STORES
    from stop.storage.offline import write_store
    tok, other = "a" * 40, "b" * 40
    entries = [_recursion(tok, "token", token="c" * 40),
               _recursion(tok, "error", error="NO-USER"),
               _recursion(tok, "timeout", answered=None, why="reply timeout"),
               records.canonical({"kind": "note", "text": "zoë"})]
    data = records.canonical(ID_REC)
    items = [("R", tok, data), ("R", other, records.canonical({"type": "ID"}))]
    items += [("L", tok, e) for e in entries]
    write_store(str(tmp_path / "d"), items, STORES[request.param].codec, sync=False)
    args = ["--config", "/dev/null", "--data-dir", str(tmp_path / "d"), "--storage", request.param]
    return args, tok, other, data, entries


def run(argv):
    out = io.StringIO()
    return ctl.main(argv, out=out), out.getvalue()


def test_show_prints_linked_entries(linked_store):
    args, tok, other, data, entries = linked_store
    rc, text = run(args + ["show", tok])
    assert rc == 0
    linked = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("linked")]
    assert linked == [
        f"recursion 192.0.2.1:113 SV_REC 6667, 40001 sid 7 from 192.0.2.10:40001: token {'c' * 40}"
        "  (sent 2026-01-01T00:00:01.000000Z, answered 2026-01-01T00:00:02.000000Z)",
        "recursion 192.0.2.1:113 SV_REC 6667, 40001 sid 7 from 192.0.2.10:40001: error NO-USER"
        "  (sent 2026-01-01T00:00:01.000000Z, answered 2026-01-01T00:00:02.000000Z)",
        "recursion 192.0.2.1:113 SV_REC 6667, 40001 sid 7 from 192.0.2.10:40001: timeout "
        "(reply timeout)  (sent 2026-01-01T00:00:01.000000Z)",
        '{"kind": "note", "text": "zoë"}']
    rc, text = run(args + ["show", other])
    assert rc == 0 and "linked" not in text


def test_show_json_and_raw(linked_store):
    args, tok, other, data, entries = linked_store
    rc, text = run(args + ["show", "--json", tok])
    assert rc == 0 and len(text.splitlines()) == 1
    assert json.loads(text) == {"token": tok, "record": ID_REC,
                                "linked": [json.loads(e) for e in entries]}
    rc, text = run(args + ["show", "--raw", tok])
    assert rc == 0 and text.encode("utf-8") == data + b"\n"
    rc, text = run(args + ["show", "--json", other])
    assert json.loads(text)["linked"] == []
