"""stopctl trace's walk over recursion outcomes (with a fake fetch), its
renderings (text, JSON, DOT), the process path, and the command line."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess

import pytest

from stop import ctl, records
from stop.errors import CertificateRefused, UnknownToken, Unreachable
from stop.redeem import cli, trace
from stop.errors import RedeemError
from stop.redeem.client import Redeemed, parse_release
from tests.chainrecords import outcome, walk_record
from tests.testca import TestCA

PATH = [(300, "ssh", "socket"), (200, "bash", "parent"), (100, "sshd", "parent")]


def sv_record(host: str, user: str, prev: str | None, ports=(40001, 22)) -> dict:
    """A record whose walk went ssh -> bash -> sshd, sshd holding the
    inbound connection from ``prev``."""
    return walk_record(host, user, 1000 + len(user), PATH, prev, ports)


class Fleet:
    """Hosts with their records; ``fetch`` is trace's fetch."""

    def __init__(self):
        self.records: dict[tuple[str, str], Redeemed] = {}
        self.errors: dict[str, Exception] = {}
        self.calls: list[tuple[str, int, str]] = []

    def add(self, host, record, linked=()) -> str:
        data = records.canonical(record)
        token = hashlib.sha1(data).hexdigest()
        self.records[(host, token)] = Redeemed(token, data, record, list(linked),
                                                [records.canonical(e) for e in linked], True)
        return token

    def fetch(self, host, port, token, name):
        self.calls.append((host, port, token))
        if host in self.errors:
            raise self.errors[host]
        try:
            return self.records[(host, token)]
        except KeyError:
            raise UnknownToken(f"{token}@{host}:{port}: not found") from None


def chain(fleet: Fleet, hosts: list[str], users: list[str]) -> str:
    """Records for hosts[0] <- hosts[1] <- ... (hosts[-1] the victim side);
    returns the victim-side token."""
    token = None
    for i, host in enumerate(hosts):
        prev = hosts[i - 1] if i else None
        rec = sv_record(host, users[i], prev)
        linked = [outcome("t", prev, token)] if prev else []
        token = fleet.add(host, rec, linked)
    return token


def run_trace(fleet, host, token, **kw):
    return trace.trace(host, 8113, token, fleet.fetch, lambda a: (a, 8113), **kw)


def test_linear_chain_in_order():
    fleet = Fleet()
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    token = chain(fleet, hosts, ["mallory", "m2", "m3", "victim-side"])
    root = run_trace(fleet, "10.0.0.4", token)
    hops = list(root.walk())
    assert [h.host for h in hops] == hosts[::-1]
    assert [h.number for h in hops] == [1, 2, 3, 4]
    assert all(h.status == "ok" for h in hops) and not trace.incomplete(root)
    assert trace.end_text(hops[-1]).startswith("[ORIGIN]")
    text = trace.render_text(root)
    lines = text.splitlines()
    # Hop headers in order, each indented deeper, with user and the path.
    heads = [l for l in lines if "SV_REC  2026" in l]
    assert [h.split()[0] for h in heads] == [f"{h}:8113" for h in hosts[::-1]]
    assert [len(h) - len(h.lstrip()) for h in heads] == [0, 8, 16, 24]
    assert "victim-side (uid 1011)" in heads[0] and "mallory" in heads[-1]
    assert "process  ssh(300) -parent-> bash(200) -parent-> sshd(100)" in text
    assert text.count("(hash verified)") == 4
    assert "[ORIGIN] no inbound connection" in text


def test_cycle_dead_end_and_failures_are_marked():
    fleet = Fleet()
    a = sv_record("10.0.0.1", "u1", "10.0.0.2")
    # 10.0.0.1 asked two hosts: 10.0.0.2 gave a token, 10.0.0.9 NO-USER.
    b = sv_record("10.0.0.2", "u2", "10.0.0.1")
    tb_placeholder = fleet.add("10.0.0.2", b, [])
    ta = fleet.add("10.0.0.1", a, [outcome("x", "10.0.0.2", tb_placeholder),
                                   outcome("x", "10.0.0.9", error="NO-USER", ports=(1, 2))])
    # b's record leads back to a's token: a cycle.
    fleet.records[("10.0.0.2", tb_placeholder)].linked.append(outcome("y", "10.0.0.1", ta))
    root = run_trace(fleet, "10.0.0.1", ta)
    assert [l.entry["outcome"] for l in root.links] == ["token", "error"]
    cyc = root.links[0].hop.links[0].hop
    assert cyc.status == "cycle" and cyc.seen_at == "hop 1 (10.0.0.1:8113)"
    assert not trace.incomplete(root)  # a cycle is the chain's shape, not a failure
    text = trace.render_text(root)
    assert "[CYCLE] token already met at hop 1" in text
    assert "-> error NO-USER  [DEAD END]" in text


def test_unreachable_in_the_middle_keeps_the_hops_before():
    fleet = Fleet()
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    token = chain(fleet, hosts, ["a", "b", "c", "d"])
    fleet.errors["10.0.0.2"] = Unreachable("10.0.0.2:8113: Connection refused")
    root = run_trace(fleet, "10.0.0.4", token)
    hops = list(root.walk())
    assert [(h.host, h.status) for h in hops] == [
        ("10.0.0.4", "ok"), ("10.0.0.3", "ok"), ("10.0.0.2", "unreachable")]
    assert trace.incomplete(root)
    assert "10.0.0.2:8113  token" in trace.render_text(root)
    assert "[UNREACHABLE] 10.0.0.2:8113: Connection refused" in trace.render_text(root)
    fleet.errors["10.0.0.2"] = CertificateRefused("refused our certificate")
    assert "[CERTIFICATE REFUSED]" in trace.render_text(run_trace(fleet, "10.0.0.4", token))


def test_budgets():
    fleet = Fleet()
    hosts = [f"10.0.0.{i}" for i in range(1, 7)]
    token = chain(fleet, hosts, list("abcdef"))
    root = run_trace(fleet, "10.0.0.6", token, max_depth=2)
    hops = list(root.walk())
    assert [h.status for h in hops] == ["ok", "ok", "ok", "budget"]
    assert "--max-depth 2" in hops[-1].error
    assert len(fleet.calls) == 3
    fleet.calls.clear()
    hops = list(run_trace(fleet, "10.0.0.6", token, max_hosts=2).walk())
    assert [h.status for h in hops] == ["ok", "ok", "budget"] and len(fleet.calls) == 2


def test_mapping_is_used_for_later_hosts():
    fleet = Fleet()
    token = chain(fleet, ["192.0.2.1", "10.0.0.2"], ["a", "b"])
    fleet.records[("gw.example.org", list(fleet.records)[0][1])] = list(fleet.records.values())[0]
    root = trace.trace("10.0.0.2", 9000, token, fleet.fetch,
                       lambda a: ("gw.example.org", 443) if a == "192.0.2.1" else (a, 9000))
    assert [(c[0], c[1]) for c in fleet.calls] == [("10.0.0.2", 9000), ("gw.example.org", 443)]
    assert root.links[0].hop.address == "192.0.2.1"


def test_json_and_dot():
    fleet = Fleet()
    token = chain(fleet, ["10.0.0.1", "10.0.0.2"], ["a", "b"])
    fleet.records[("10.0.0.2", token)].linked.append(outcome("z", "10.0.0.7", error="NO-USER"))
    root = run_trace(fleet, "10.0.0.2", token)
    obj = json.loads(trace.dump_json(trace.to_json(root, {"token": token})))
    assert obj["complete"] and obj["hops"] == 2
    first = obj["chain"]
    assert first["record_text"].encode() == records.canonical(first["record"])
    assert first["hash_verified"] is True
    assert [p["name"] for p in first["process_path"]] == ["ssh(300)", "bash(200)", "sshd(100)"]
    assert first["links"][0]["next"]["host"] == "10.0.0.1"
    assert first["links"][1]["next"] is None
    dot = trace.render_dot(root)
    assert dot.startswith("digraph stop_trace {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == 2 and "NO-USER" in dot and "color=gray" in dot
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=60)
        assert svg.returncode == 0 and b"<svg" in svg.stdout, svg.stderr


def test_dot_escapes_hostile_text():
    fleet = Fleet()
    rec = sv_record("10.0.0.1", 'evil"\\\nname', None)
    token = fleet.add("10.0.0.1", rec)
    dot = trace.render_dot(run_trace(fleet, "10.0.0.1", token))
    assert 'evil\\"\\\\\\nname' in dot


def test_process_path_fallback_and_odd_records():
    rec = sv_record("10.0.0.1", "a", None)
    assert [p["name"] for p in trace.process_path(rec)] == ["ssh(300)", "bash(200)", "sshd(100)"]
    assert trace.process_path({"type": "ID"}) == []
    assert trace.process_path({"processes": {"processes": [{"pid": "x"}, 7]}}) == []
    loop = {"processes": {"start": [5], "processes": [
        {"pid": 5, "ppid": 6, "name": "a", "reached": {"via": "pipe", "from": 6}},
        {"pid": 6, "ppid": 5, "name": "b", "reached": {"via": "pipe", "from": 5}}],
        "remote_connections": [{"remote": {"address": "10.0.0.9", "port": 1}, "holders": [[5, 3]]}]}}
    entry = outcome("t", "10.0.0.9", "c" * 40, ports=(1, 2))
    assert len(trace.process_path(loop, entry)) <= 2  # a malformed loop ends


def test_process_path_through_local_sockets():
    """A path that crosses sockets to this host after the holder (socat ->
    UNIX socket -> socat; nc | nc -> local TCP -> nc | nc) is followed back
    through every hop to the holder of the queried socket, not cut at the
    first socket."""
    relays = [(11, "nc", "socket"), (12, "nc", "pipe"), (13, "nc", "socket"), (14, "nc", "pipe")]
    rec = walk_record("10.0.0.2", "nobody", 65534, relays, "10.0.0.1")
    entry = outcome("t", "10.0.0.1", "c" * 40)
    path = trace.process_path(rec, entry)
    assert [(p["pid"], p["via"]) for p in path] == [(11, "socket"), (12, "pipe"), (13, "socket"),
                                                     (14, "pipe")]
    assert trace.path_text(path) == "nc(11) -pipe-> nc(12) -socket-> nc(13) -pipe-> nc(14)"


def test_parse_target():
    t = "a" * 40
    assert cli.parse_target(f"{t}@192.0.2.1") == (t, "192.0.2.1", 8113)
    assert cli.parse_target(f"{t}@192.0.2.1:9000") == (t, "192.0.2.1", 9000)
    assert cli.parse_target(f"{t}@[2001:db8::1]:9000") == (t, "2001:db8::1", 9000)
    assert cli.parse_target(f"{t}@2001:db8::1") == (t, "2001:db8::1", 8113)
    assert cli.parse_target(f"{t}@host.example.org") == (t, "host.example.org", 8113)
    for bad in ("nothing", f"{t}@", "ABC@h", f"{t}@h:99999", f"{t}@[::1", f"{t}@h:x"):
        with pytest.raises(ValueError):
            cli.parse_target(bad)


def test_parse_release_rejects_malformed():
    good = json.dumps({"token": "a" * 40, "record": "{}", "linked": ["{\"kind\":1}", None, "[]"]})
    r = parse_release("a" * 40, good.encode(), "h:1")
    assert r.record == {} and r.linked == [{"kind": 1}] and r.linked_bytes[1] is None
    for body in (b"not json", b"[]", json.dumps({"token": "b" * 40, "record": "{}"}).encode(),
                 json.dumps({"token": "a" * 40, "record": "[1]"}).encode(),
                 json.dumps({"token": "a" * 40}).encode()):
        with pytest.raises(RedeemError):
            parse_release("a" * 40, body, "h:1")


def test_stopctl_trace_usage_errors(capsys):
    out = io.StringIO()
    common = ["--cert", "c", "--key", "k", "--ca", "a"]
    assert ctl.main(["trace", "nonsense"] + common, out) == cli.EXIT_USAGE
    assert "TOKEN@HOST" in capsys.readouterr().err
    assert ctl.main(["trace", "a" * 40 + "@h", "--max-hosts", "0"] + common, out) == cli.EXIT_USAGE
    assert "--max-hosts" in capsys.readouterr().err
    # Unreadable credentials: one line, exit 1, no traceback.
    assert ctl.main(["trace", "a" * 40 + "@h"] + common, out) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ca a" in err and "Traceback" not in err


def test_stopctl_trace_unreachable_first_host(capsys, tmp_path):
    """Nothing listens at the first host: one line, its own exit status."""
    ca = TestCA(tmp_path)
    cert, key = ca.client("investigator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: a refused connect
    status = ctl.main(["trace", f"{'a' * 40}@127.0.0.1:{port}", "--cert", cert, "--key", key,
                       "--ca", ca.path, "--timeout", "5"], io.StringIO())
    assert status == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}: " in err and "Traceback" not in err, err


def test_stopctl_trace_unencodable_host_is_one_line(capsys, tmp_path):
    """A host name IDNA cannot encode (a 64-character label) is a one-line
    error with the failure status, not a UnicodeError traceback (review C1).
    The name is refused before any lookup: no traffic."""
    ca = TestCA(tmp_path)
    cert, key = ca.client("investigator")
    status = ctl.main(["trace", f"{'a' * 40}@{'b' * 64}", "--cert", cert, "--key", key,
                       "--ca", ca.path, "--timeout", "5"], io.StringIO())
    assert status == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "not a usable host" in err, err


def test_parse_release_hostile_shapes_are_redeem_errors():
    deep = "[" * 100000 + "]" * 100000
    for body in (json.dumps({"token": "a" * 40, "record": "{}", "linked": 5}),
                 json.dumps({"token": "a" * 40, "record": deep}),
                 '{"token": "' + "a" * 40 + '", "record": "{}", "linked": ' + deep + "}",
                 json.dumps({"token": "a" * 40, "record": "{}", "linked": [deep]})):
        with pytest.raises(RedeemError):
            parse_release("a" * 40, body.encode(), "h:1")


def test_only_well_formed_tokens_at_addresses_are_followed():
    good = outcome("t", "10.0.0.9", "c" * 40)
    assert trace._next_token(good) == ("10.0.0.9", "c" * 40)
    assert trace._next_token(outcome("t", "2001:db8::9", "d" * 64)) == ("2001:db8::9", "d" * 64)
    for address, token in (("10.0.0.9", "C" * 40), ("10.0.0.9", "c" * 39), ("10.0.0.9", "x" * 40),
                           ("b" * 64, "c" * 40), ("host.example.org", "c" * 40),
                           ("10.0.0.9", "c" * 40 + "\n")):
        assert trace._next_token(outcome("t", address, token)) is None, (address, token)


def test_hostile_record_fields_never_crash_trace():
    """Every odd shape a hostile host could put in its record or linked
    entries: trace renders what it can (review C1)."""
    rec = sv_record("10.0.0.1", "a", "10.0.0.2")
    state = rec["processes"]
    state["start"] = 5
    state["remote_connections"] = ["x", 7, {"remote": "y", "holders": "z"},
                                   {"remote": {"address": "10.0.0.2", "port": 40001},
                                    "holders": [["p", 3]]}]
    state["processes"][0]["reached"] = "not a dict"
    state["processes"][1]["reached"] = ["from", 300]
    state["processes"][2]["cmdline"] = 5
    state["processes"][2]["name"] = None
    rec["recursion"]["targets"] = 3
    odd = [outcome("t", "10.0.0.2", "c" * 40, ports=(1, 2)), "a string", 7]
    odd[0]["request"]["ports"] = 5
    fleet = Fleet()
    token = fleet.add("10.0.0.1", rec, [e for e in odd if isinstance(e, dict)])
    fleet.records[("10.0.0.1", token)].linked.extend(odd[1:])
    root = run_trace(fleet, "10.0.0.1", token)
    for entry in (None, odd[0]):
        trace.process_path(rec, entry)
    assert "?, ?" in trace.outcome_text(odd[0])
    trace.render_text(root)
    trace.render_dot(root)
    trace.to_json(root, {})
    no_links = run_trace(fleet, "10.0.0.1", token)
    no_links.links = []
    assert trace.end_text(no_links) == "[DEAD END] ? target(s), no outcome saved yet"


ESC = "\x1b]0;owned\x07\x1b[2J\x9b31m\u2028"


def test_trace_and_audit_output_escape_record_text():
    """Process names, user names, outcome words and audit fields come from
    hosts an attacker may control: no control character or escape
    sequence reaches the terminal (review S3)."""
    rec = sv_record("10.0.0.1", "u" + ESC, "10.0.0.2")
    rec["processes"]["processes"][0]["name"] = "ssh" + ESC
    rec["host"] = "h" + ESC
    entry = outcome("t", "10.0.0.2", error="NO-USER" + ESC)
    entry["why"] = "why" + ESC
    fleet = Fleet()
    token = fleet.add("10.0.0.1", rec, [entry])
    root = run_trace(fleet, "10.0.0.1", token)
    for text in (trace.render_text(root), trace.outcome_text(entry), trace.render_dot(root),
                 cli.audit_line({"time": "t" + ESC, "outcome": "released" + ESC,
                                 "identity": "i" + ESC, "client": {"address": "a" + ESC},
                                 "token": "k" + ESC, "why": "w" + ESC})):
        assert not any(c in text for c in "\x1b\x07\x9b\u2028"), repr(text)
        assert "\\x1b" in text


def test_stopctl_trace_not_found_has_its_own_status(capsys, monkeypatch):
    """"Not found" at the first host is not a usage error (review C4)."""
    def not_found(host, port, token, context, **kw):
        raise UnknownToken(f"{token}@{host}:{port}: not found")
    monkeypatch.setattr(cli, "redeem", not_found)
    monkeypatch.setattr(cli.Credentials, "context", lambda self: None)
    status = ctl.main(["trace", "a" * 40 + "@192.0.2.1", "--cert", "c", "--key", "k", "--ca", "a"],
                      io.StringIO())
    assert status == cli.EXIT_UNKNOWN == 8 and cli.EXIT_USAGE == 2
    assert "not found" in capsys.readouterr().err
    assert len(set(cli.EXIT.values()) | {cli.EXIT_USAGE, cli.EXIT_INCOMPLETE, cli.EXIT_OK}) == 9  # 0..8, none shared


def test_stopctl_trace_dot_file_is_private_and_atomic(monkeypatch, tmp_path):
    """--dot replaces its file atomically, mode 0600, and does not follow a
    symlink planted at the path (review S5)."""
    import os
    import stat
    fleet = Fleet()
    token = fleet.add("192.0.2.1", sv_record("192.0.2.1", "alice", None))
    monkeypatch.setattr(cli, "redeem", lambda h, p, t, c, **kw: fleet.fetch(h, p, t, h))
    monkeypatch.setattr(cli.Credentials, "context", lambda self: None)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    out = tmp_path / "trace.dot"
    os.symlink(victim, out)
    old = os.umask(0o022)
    try:
        status = ctl.main(["trace", f"{token}@192.0.2.1", "--cert", "c", "--key", "k", "--ca", "a",
                           "--dot", str(out)], io.StringIO())
    finally:
        os.umask(old)
    assert status == cli.EXIT_OK
    assert victim.read_text() == "keep" and not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith("digraph stop_trace {")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.dot", "victim"]
