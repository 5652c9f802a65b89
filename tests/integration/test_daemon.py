"""A real ``twistd stop`` answering real queries about real connections."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import is_root
from tests.integration.harness import GATEWAY, HOST, PEER, Pair, read_lines

TOKEN = rb"[0-9a-f]{40}"


def token_of(reply: bytes, pair: Pair) -> str:
    m = re.fullmatch(pair.query() + rb" : USERID : OTHER : (" + TOKEN + rb")", reply)
    assert m, reply
    return m.group(1).decode()


def show(daemon, token):
    r = daemon.stopctl("show", "--json", token)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["record"]


def test_outbound_connection_gets_a_token_and_a_record(daemon, pair):
    (reply,) = daemon.ask(pair.query())
    token = token_of(reply, pair)
    rec = show(daemon, token)
    assert rec["user"]["uid"] == __import__("os").geteuid()
    assert rec["connection"]["local"] == {"address": HOST, "port": pair.local_port}
    assert rec["connection"]["remote"] == {"address": PEER, "port": pair.remote_port}
    assert rec["requester"]["address"] == PEER
    assert rec["request"]["type"] == "ID"
    human = daemon.stopctl("show", token)
    assert human.returncode == 0
    assert f"{HOST}:{pair.local_port}" in human.stdout and token in human.stdout
    assert token in daemon.stopctl("list").stdout


@pytest.mark.parametrize("spelling", [b"%d,%d", b"%d , %d", b"%d, %d : id", b"%d, %d:ID",
                                      b"  %d,\t%d  "])
def test_spellings_of_real_clients(daemon, pair, spelling):
    line = spelling % (pair.local_port, pair.remote_port)
    (reply,) = daemon.ask(line)
    assert re.fullmatch(rb"%d, %d : USERID : OTHER : " % (pair.local_port, pair.remote_port)
                        + TOKEN, reply)


def test_bare_lf_and_pipelined_queries_in_order(daemon, pair):
    other = Pair()
    try:
        with daemon.connect() as s:
            s.sendall(pair.query() + b"\n" + b"1, 1\n" + other.query() + b" : ID\r\n"
                      + b"bogus\n" + pair.query() + b"\r\n")
            lines = read_lines(s, 5)
        assert re.fullmatch(pair.query() + rb" : USERID : OTHER : " + TOKEN, lines[0])
        assert lines[1] == b"1, 1 : ERROR : NO-USER"
        assert re.fullmatch(other.query() + rb" : USERID : OTHER : " + TOKEN, lines[2])
        assert lines[3] == b"0, 0 : ERROR : UNKNOWN-ERROR"
        assert lines[0] != lines[4] and lines[4].startswith(pair.query())
    finally:
        other.close()


def test_accepted_socket_and_nonexistent_pair_are_no_user(daemon, pair):
    # Asked of the remote host's side: that end was accepted by a listener.
    accepted = b"%d, %d" % (pair.remote_port, pair.local_port)
    assert daemon.ask(accepted, source=HOST, dest=PEER) == [accepted + b" : ERROR : NO-USER"]
    # A listening port asked with any remote port: the lookup trap.
    trap = b"%d, %d" % (pair.remote_port, 1)
    assert daemon.ask(trap, source=HOST, dest=PEER) == [trap + b" : ERROR : NO-USER"]
    # The right ports asked by the wrong host.
    assert daemon.ask(pair.query(), source=GATEWAY) == [pair.query() + b" : ERROR : NO-USER"]


def test_ipv6(daemon):
    p = Pair("::1", "::1")
    try:
        (reply,) = daemon.ask(p.query(), source="::1", dest="::1")
        rec = show(daemon, token_of(reply, p))
        assert rec["connection"]["local"] == {"address": "::1", "port": p.local_port}
    finally:
        p.close()


def test_address_form_tokens_only(daemon, pair):
    line = pair.query() + b" : ID : " + PEER.encode()
    (reply,) = daemon.ask(line, source=GATEWAY)
    rec = show(daemon, token_of(reply, pair))
    assert rec["requester"]["address"] == GATEWAY
    assert rec["request"]["address"] == PEER
    for bad in (b"1, 1 : ID : 192.0.2.7", b"1, 1 : ID : [2001:db8::7]",
                b"%d, %d : ID : %s" % (pair.remote_port, pair.local_port, HOST.encode())):
        (reply,) = daemon.ask(bad, source=GATEWAY)
        assert re.fullmatch(rb"\d+, \d+ : USERID : OTHER : " + TOKEN, reply), reply
        assert daemon.stopctl("show", reply.rsplit(b" ", 1)[1].decode()).returncode == 2


def test_address_form_allowlist(start_daemon, pair):
    d = start_daemon({"address_form": "127.0.0.13/32"})
    before = d.stopctl("list").stdout
    line = pair.query() + b" : ID : " + PEER.encode()
    (refused,) = d.ask(line, source=PEER)  # not on the list: token, nothing saved
    assert d.stopctl("show", token_of(refused, pair)).returncode == 2
    assert d.stopctl("list").stdout == before
    (allowed,) = d.ask(line, source=GATEWAY)
    assert d.stopctl("show", token_of(allowed, pair)).returncode == 0


@pytest.mark.parametrize("policy,expected", [
    ("unknown", rb"1, 1 : ERROR : UNKNOWN-ERROR"),
    ("token", rb"1, 1 : USERID : OTHER : " + TOKEN),
])
def test_error_policies(start_daemon, policy, expected):
    d = start_daemon(args=["--errors", policy])
    assert re.fullmatch(expected, d.ask(b"1, 1")[0])
    assert re.fullmatch(expected.replace(b"1, 1", b"0, 0"), d.ask(b"nonsense")[0])


def test_hostile_lines(daemon, pair):
    # 1,000 bytes is answered; 1,001 closes the connection without a reply.
    ok = pair.query() + b" " * (1000 - len(pair.query()))
    assert re.fullmatch(pair.query() + rb" : USERID : OTHER : " + TOKEN, daemon.ask(ok)[0])
    with daemon.connect() as s:
        s.sendall(ok + b" \r\n" + pair.query() + b"\r\n")
        assert read_lines(s, 1) == []
    # 64 KiB without a newline closes it too.
    with daemon.connect() as s:
        try:
            s.sendall(b"7" * 65536)
        except OSError:
            pass
        assert read_lines(s, 1) == []
    # NUL and 8-bit bytes get a clean error and the connection stays usable.
    with daemon.connect() as s:
        s.sendall(b"\x00\x00\xff\xfe\r\n" + pair.query() + b"\x00\r\n\xc3\xa9, 1\r\n" + pair.query() + b"\r\n")
        lines = read_lines(s, 4)
    assert lines[:3] == [b"0, 0 : ERROR : UNKNOWN-ERROR", pair.query() + b" : ERROR : UNKNOWN-ERROR",
                         b"0, 0 : ERROR : UNKNOWN-ERROR"]
    assert lines[3].startswith(pair.query() + b" : USERID : OTHER : ")
    assert daemon.alive()


def test_idle_connection_is_closed(start_daemon):
    d = start_daemon({"idle_timeout": "1"})
    with d.connect() as s:
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - t0 < 9
    d.wait_log("idle for")


def test_per_host_connection_limit(start_daemon):
    d = start_daemon({"max_connections_per_host": "2"})
    held = [d.connect(), d.connect()]
    try:
        time.sleep(0.2)
        with d.connect() as third:
            assert third.recv(10) == b""  # closed at once
        with d.connect(source=GATEWAY) as other:  # another host still gets in
            other.sendall(b"1, 1\r\n")
            assert read_lines(other, 1) == [b"1, 1 : ERROR : NO-USER"]
    finally:
        for s in held:
            s.close()
    d.wait_log("max_connections_per_host")


@pytest.mark.skipif(not is_root(), reason="needs root to run a process as another user")
def test_connection_owned_by_a_normal_user(daemon):
    """A connection opened by a process running as ``nobody``."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    listener = socket.socket()
    listener.bind((PEER, 0))
    listener.listen(1)
    code = ("import socket,sys,time;s=socket.socket();s.bind(('%s',0));s.connect(('%s',%d));"
            "print(s.getsockname()[1],flush=True);sys.stdin.read()") % (HOST, PEER, listener.getsockname()[1])
    # The venv's interpreter may live under /root, which nobody cannot read.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    child = subprocess.Popen([python, "-c", code], user=nobody.pw_uid, group=nobody.pw_gid,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(child.stdout.readline())
        conn, _ = listener.accept()
        line = b"%d, %d" % (port, listener.getsockname()[1])
        (reply,) = daemon.ask(line)
        token = reply.rsplit(b" ", 1)[1].decode()
        rec = show(daemon, token)
        assert rec["user"] == {"uid": nobody.pw_uid, "name": "nobody"}
        conn.close()
    finally:
        child.stdin.close()
        child.wait(10)
        listener.close()


def test_log_has_one_line_per_query(daemon, pair):
    (reply,) = daemon.ask(pair.query())
    token = reply.rsplit(b" ", 1)[1].decode()
    time.sleep(0.2)
    lines = [ln for ln in daemon.read_log().splitlines() if token in ln]
    assert len(lines) == 1
    assert f"{PEER}" in lines[0] and f"{pair.local_port}, {pair.remote_port}" in lines[0]


def test_sv_token_verifies_and_one_flipped_byte_on_disk_fails(start_daemon, pair):
    import glob
    import hashlib
    d = start_daemon()
    (reply,) = d.ask(pair.query() + b" : SV")
    token = token_of(reply, pair)
    (id_reply,) = d.ask(pair.query())
    id_token = token_of(id_reply, pair)
    raw = d.stopctl("show", "--raw", token).stdout.rstrip("\n").encode()
    assert hashlib.sha1(raw).hexdigest() == token
    ok = d.stopctl("verify", token)
    assert ok.returncode == 0 and ok.stdout.endswith("OK\n"), ok.stdout + ok.stderr
    assert d.stopctl("verify", id_token).returncode == 0
    assert d.stopctl("verify", "f" * 40).returncode == 2
    d.stop()
    (segment,) = glob.glob(d.data_dir + "/records/seg-*")
    with open(segment, "r+b") as fh:
        data = fh.read()
        at = data.index(b" {", data.index(token.encode())) + 10  # inside the record
        fh.seek(at)
        fh.write(bytes([data[at] ^ 0x01]))
    bad = d.stopctl("verify", token)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "MISMATCH" in bad.stdout or "damaged" in bad.stderr
    assert d.stopctl("verify", id_token).returncode == 0  # the other record is untouched


def test_list_filters(daemon, pair):
    (reply,) = daemon.ask(pair.query())
    token = token_of(reply, pair)
    import pwd
    me = pwd.getpwuid(__import__("os").geteuid()).pw_name
    assert token in daemon.stopctl("list", "--user", me).stdout
    assert token not in daemon.stopctl("list", "--user", "no-such-user").stdout
    assert token in daemon.stopctl("list", "--remote", PEER).stdout
    assert token not in daemon.stopctl("list", "--remote", "192.0.2.1").stdout
    assert token not in daemon.stopctl("list", "--since", "2999-01-01").stdout
    assert token in daemon.stopctl("list", "--since", "2000-01-01").stdout
    lines = [json.loads(x) for x in daemon.stopctl("list", "--json").stdout.splitlines()]
    assert any(x["token"] == token and x["record"]["connection"]["local"]["port"] == pair.local_port
               for x in lines)
