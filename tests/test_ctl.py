"""stop.ctl: what ``show`` prints for a record, and the exit statuses."""

import io

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
