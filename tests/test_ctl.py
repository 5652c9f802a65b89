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


# -- list filters, prefixes, verify outcomes, --version (issue 10) -------------

import datetime  # noqa: E402
import os  # noqa: E402

from tests.test_chain import N, Store, record, token  # noqa: E402


@pytest.fixture(params=["flat", "gzip"])
def store(request, tmp_path):
    return Store(tmp_path, request.param)


def listed(store, *filters):
    rc, text = store.ctl("list", "--json", *filters)
    assert rc == 0, text
    return [json.loads(line)["token"] for line in text.splitlines()]


def want(pred):
    return [token(i) for i in range(N) if pred(i)]


@pytest.mark.parametrize("since, until, expect", [
    # Record i is at 2026-01-01, hour i (UTC).
    ("2026-01-01T05:00:00Z", "2026-01-01T08:00:00Z", range(5, 8)),
    ("2026-01-01T06:00:00+01:00", "2026-01-01T09:00:00+0100", range(5, 8)),  # other offsets
    ("2026-01-01T00:00:00-05:00", None, range(5, N)),
    ("2026-01-01T05:00:00", "2026-01-01T05:00:00.000001", range(5, 6)),  # no offset: UTC
    ("2026-01-01", "2026-01-02", range(0, N)),  # dates alone
    (None, "2026-01-01", range(0, 0)),
])
def test_list_times_compare_as_times(store, since, until, expect):
    args = (["--since", since] if since else []) + (["--until", until] if until else [])
    assert listed(store, *args) == [token(i) for i in expect]


def test_relative_times():
    now = datetime.datetime(2026, 1, 2, 0, 0, tzinfo=datetime.timezone.utc)
    assert ctl.parse_time("2h", now) == now - datetime.timedelta(hours=2)
    assert ctl.parse_time("7d", now) == now - datetime.timedelta(days=7)
    assert ctl.parse_time("30m", now) == now - datetime.timedelta(minutes=30)
    assert ctl.parse_time("1w", now) == now - datetime.timedelta(weeks=1)
    assert listed_relative_is_value(now)


def listed_relative_is_value(now):
    rec = json.loads(record(20))  # 2026-01-01T20:00Z
    args = argparse_ns(since="5h")
    assert ctl.Filters(args, now)(rec)  # 19:00 <= 20:00
    args = argparse_ns(since="3h")
    return not ctl.Filters(args, now)(rec)


def argparse_ns(**kw):
    from argparse import Namespace
    base = dict(since=None, until=None, user=None, uid=None, remote=None, port=None, type=None, sid=None)
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "2h30", "", "1.5d", "2026-01-01T25:00"])
def test_unreadable_time_exits_2_never_an_empty_list(store, bad, capsys):
    for opt in ("--since", "--until"):
        rc, text = store.ctl("list", opt, bad)
        assert rc == 2 and text == ""
        assert "cannot read the time" in capsys.readouterr().err


def test_list_addresses_compare_as_addresses(store):
    odd = want(lambda i: i % 2)        # remote ::ffff:198.51.100.7
    even = want(lambda i: i % 2 == 0)  # remote 2001:db8::7
    assert listed(store, "--remote", "198.51.100.7") == odd
    assert listed(store, "--remote", "::ffff:198.51.100.7") == odd
    assert listed(store, "--remote", "::FFFF:c633:6407") == odd
    assert listed(store, "--remote", "198.51.100.0/24") == odd
    assert listed(store, "--remote", "2001:db8:0:0:0:0:0:7") == even
    assert listed(store, "--remote", "2001:0DB8::0007") == even
    assert listed(store, "--remote", "2001:db8::/32") == even
    assert listed(store, "--remote", "2001:db8::8") == []
    assert store.ctl("list", "--remote", "not-an-address")[0] == 2


def test_list_other_filters(store):
    assert listed(store, "--user", "alice") == want(lambda i: i % 2)
    assert listed(store, "--user", "1000") == want(lambda i: i % 2 == 0)
    assert listed(store, "--uid", "1001") == want(lambda i: i % 2)
    assert listed(store, "--type", "sv") == want(lambda i: i % 3 == 0)
    assert listed(store, "--type", "ID", "--uid", "1000") == want(lambda i: i % 3 and i % 2 == 0)
    assert listed(store, "--sid", "7") == [token(7)]
    assert listed(store, "--port", "40003") == [token(3)]
    assert listed(store, "--port", "6667") == want(lambda i: True)


def test_list_reports_a_damaged_entry_and_goes_on(store, capsys):
    def flip(parts, i):
        p = bytearray(parts[i])
        p[-5] ^= 0x01
        parts[i] = bytes(p)
    store.edit(3, flip)
    rc, text = store.ctl("list")
    assert rc == 1
    assert [line.split()[1] for line in text.splitlines()] == [token(i) for i in range(N) if i != 2]
    err = capsys.readouterr().err
    assert f"position 3 (seg-00000001.log" in err and token(2) in err and "skipped" in err


def test_token_prefixes(store, capsys):
    t = token(5)
    for given in (t[:8], t[:12].upper(), t.upper(), t):
        rc, text = store.ctl("show", "--json", given)
        assert rc == 0 and json.loads(text)["token"] == t, given
        rc, text = store.ctl("verify", given)
        assert rc == 0 and text.startswith("store integrity: OK"), given
    assert store.ctl("show", t[:7])[0] == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_an_ambiguous_prefix_lists_the_candidates(tmp_path, capsys):
    from stop.storage import STORES
    from stop.storage.offline import write_store
    toks = ["abcdef01" + "0" * 32, "abcdef01" + "1" * 32, "abcdef02" + "2" * 32]
    write_store(str(tmp_path / "d"), [("R", t, record(0)) for t in toks], STORES["flat"].codec, sync=False)
    argv = ["--config", "/dev/null", "--data-dir", str(tmp_path / "d"), "--storage", "flat"]
    assert ctl.main(argv + ["show", "ABCDEF01"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and toks[0] in err and toks[1] in err and toks[2] not in err
    assert ctl.main(argv + ["verify", "abcdef01"], out=io.StringIO()) == 2
    assert ctl.main(argv + ["show", "abcdef02"], out=io.StringIO()) == 0


def test_verify_prints_what_stopctl_8_says(tmp_path):
    """One case per outcome, with the lines stopctl(8) gives."""
    import hashlib
    from stop.storage import STORES
    from stop.storage.offline import write_store
    sv = records.canonical({"type": "SV", "time": "2026-01-01T00:00:00Z"})
    sv_tok = hashlib.sha1(sv).hexdigest()
    forged = records.canonical({"type": "SV", "time": "2026-01-01T00:00:01Z"})
    idr = records.canonical({"type": "ID_REC", "time": "2026-01-01T00:00:00Z"})
    items = [("R", sv_tok, sv), ("R", "f" * 40, forged), ("R", "1" * 40, idr),
             ("R", "2" * 40, b"not json"), ("R", "3" * 40, idr), ("R", "5" * 40, sv)]
    d = str(tmp_path / "d")
    write_store(d, items, STORES["flat"].codec, sync=False)
    (seg,) = [os.path.join(d, "records", f) for f in os.listdir(os.path.join(d, "records"))
              if f.startswith("seg-")]
    data = bytearray(open(seg, "rb").read())
    at = data.rindex(b"ID_REC")
    data[at] ^= 0x20  # damage the last record
    open(seg, "wb").write(bytes(data))
    argv = ["--config", "/dev/null", "--data-dir", d, "--storage", "flat"]

    def verify(tok, *extra):
        out = io.StringIO()
        return ctl.main(argv + ["verify", *extra, tok], out=out), out.getvalue()
    assert verify(sv_tok) == (0, "store integrity: OK\nOK\n")
    assert verify("f" * 40) == (1, "store integrity: OK\nMISMATCH\n")
    assert verify("1" * 40) == (0, "store integrity: OK\nID_REC record: its token is random, "
                                   "there is no hash to check\n")
    assert verify("2" * 40) == (1, "store integrity: OK\nMISMATCH (record is not valid JSON)\n")
    rc, text = verify("3" * 40)
    assert rc == 1
    first, second = text.splitlines()
    assert first.startswith("store integrity: DAMAGED (record 3333") and "damaged" in first
    assert second == "MISMATCH (the stored record cannot be read)"
    rc, text = verify("3" * 40, "--json")
    result = json.loads(text)
    assert rc == 1 and (result["integrity"], result["hash"], result["sound"]) == ("DAMAGED", "MISMATCH", False)
    assert json.loads(verify(sv_tok, "--json")[1]) == {
        "token": sv_tok, "type": "SV", "integrity": "OK", "why": None, "hash": "OK", "sound": True}
    assert verify("4" * 40)[0] == 2


def test_version(capsys):
    import stop
    with pytest.raises(SystemExit) as exit:
        ctl.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"stopctl (stop) {stop.__version__}\n"


def test_json_everywhere():
    """Every command has --json (stopctl(8))."""
    parser = ctl._parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        if name in ("trace", "audit"):
            continue  # the redemption service's commands (docs/redeem.rst)
        assert any("--json" in a.option_strings for a in p._actions), name
