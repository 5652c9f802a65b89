"""Redemption across four real daemons on loopback aliases, each with its
own host certificate from a CA made here, and ``stopctl trace`` over them.

The stores are seeded offline through the store API (records and linked
recursion outcomes forming a chain 127.0.0.11 <- .12 <- .13 <- .14, .14
being the victim's side); the daemons then serve them. Where the kernel has
PR_SET_MDWE the daemons run under it, as ``MemoryDenyWriteExecute=yes``
would run them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys

import pytest

from stop import records
from stop.errors import CertificateRefused
from stop.redeem.client import redeem
from stop.redeem.cli import (EXIT_CERTIFICATE, EXIT_INCOMPLETE, EXIT_NOT_AUTHORISED, EXIT_OK,
                             EXIT_UNKNOWN)
from tests.chainrecords import outcome, sv_token, walk_record
from tests.integration.harness import ROOT, Daemon, free_port
from tests.testca import TestCA

HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]  # attacker's side first
USERS = [("mallory", 1101), ("relay2", 1102), ("relay3", 1103), ("carol", 1104)]
PATHS = [
    [(1111, "ssh", "socket"), (1110, "bash", "parent")],
    [(1211, "nc", "socket"), (1212, "nc", "pipe")],
    [(1311, "socat", "socket")],
    [(1411, "ssh", "socket"), (1410, "bash", "parent"), (1409, "sshd", "parent")],
]
PATH_TEXT = ["ssh(1111) -parent-> bash(1110)", "nc(1211) -pipe-> nc(1212)", "socat(1311)",
             "ssh(1411) -parent-> bash(1410) -parent-> sshd(1409)"]
MDWE_EXEC = ("import ctypes, os, sys\n"
             "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
             "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n")


def mdwe_available() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux 6.3+); tried in a child."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


class MDWE:
    """Runs the harness's daemon command under PR_SET_MDWE (the harness
    calls ``command`` and ``socket`` of its ``netns`` argument)."""

    def __init__(self, script: str):
        self.script = script

    def command(self, argv: list[str]) -> list[str]:
        return [sys.executable, self.script, sys.executable] + list(argv)[1:]

    def socket(self, family: int) -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)


class Fleet:
    def __init__(self, base):
        self.base = base
        self.ca = TestCA(base)
        self.other = TestCA(base, "other CA")
        self.port = free_port(HOSTS)
        self.investigator = self.ca.client("investigator")
        self.daemons: dict[str, Daemon] = {}
        self.tokens: list[str] = []
        self.records: list[dict] = []
        wrapper = None
        if mdwe_available():
            script = os.path.join(str(base), "mdwe-exec.py")
            with open(script, "w") as fh:
                fh.write(MDWE_EXEC)
            wrapper = MDWE(script)
        self.mdwe = wrapper is not None
        prev_token = None
        for i, host in enumerate(HOSTS):
            prev = HOSTS[i - 1] if i else None
            rec = walk_record(host, *USERS[i], PATHS[i], prev, time=f"2026-11-25T12:00:0{i}.000001Z")
            rec["secret"] = f"only-for-investigators-{host}"
            token = sv_token(rec)
            linked = [outcome(token, prev, prev_token)] if prev else []
            if host == HOSTS[2]:  # .13 also asked a host that had nothing to say
                linked.append(outcome(token, "192.0.2.99", error="NO-USER", ports=(1, 2)))
            cert, key = self.ca.host(host)
            (base / host).mkdir()
            d = Daemon(base / host, {
                "redeem_listen": f"tcp:{self.port}:interface={host}",
                "redeem_cert": cert, "redeem_key": key, "redeem_ca": self.ca.path,
                "redeem_allow": "investigator\n  auditor type:ID\n  !revoked-two",
                "redeem_deny": "revoked-one", "redeem_rate": "600", "redeem_burst": "100",
            }, interfaces=(host,), netns=wrapper)
            seed(d.data_dir, [{"token": token, "record": records.canonical(rec).decode(),
                               "linked": [records.canonical(e).decode() for e in linked]}])
            self.daemons[host] = d
            self.tokens.append(token)
            self.records.append(rec)
            prev_token = token
        for d in self.daemons.values():
            d.start()

    def stop(self):
        for d in self.daemons.values():
            d.stop()

    def stopctl(self, *args, cert=None) -> subprocess.CompletedProcess:
        cert, key = cert or self.investigator
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run([sys.executable, "-m", "stop.ctl", "trace"] + list(args)
                              + ["--cert", cert, "--key", key, "--ca", self.ca.path],
                              capture_output=True, text=True, env=env, timeout=120)

    def target(self, i: int = 3) -> str:
        return f"{self.tokens[i]}@{HOSTS[i]}:{self.port}"

    def audit(self, host: str) -> list[dict]:
        out = self.daemons[host].stopctl("audit", "--json")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]


def seed(data_dir: str, entries: list) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "tests.integration.seed_store", "flat", data_dir],
                   input=json.dumps(entries), text=True, env=env, check=True, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("redeem"))
    yield f
    f.stop()
    for d in f.daemons.values():
        assert "Traceback" not in d.read_log(), d.read_log()


def test_trace_rebuilds_every_hop_in_order(fleet, tmp_path):
    dot, svg = tmp_path / "chain.dot", tmp_path / "chain.svg"
    args = [fleet.target(), "--dot", str(dot)]
    if shutil.which("dot"):
        args += ["--svg", str(svg)]
    out = fleet.stopctl(*args)
    assert out.returncode == EXIT_OK, out.stderr
    lines = out.stdout.splitlines()
    heads = [l.strip(" |`-") for l in lines if "  SV_REC  2026-" in l]
    assert [h.split()[0] for h in heads] == [f"{h}:{fleet.port}" for h in reversed(HOSTS)]
    for head, (user, uid), host in zip(heads, reversed(USERS), reversed(HOSTS)):
        assert f"{user} (uid {uid})" in head and f"host host-{host}" in head
    paths = [l.split("process  ", 1)[1] for l in lines if "process  " in l]
    assert paths == list(reversed(PATH_TEXT))
    assert out.stdout.count("(hash verified)") == 4
    assert "192.0.2.99:113 1, 2 : SV_REC:4242 -> error NO-USER  [DEAD END]" in out.stdout
    origin = [i for i, l in enumerate(lines) if "[ORIGIN] no inbound connection" in l]
    first = [i for i, l in enumerate(lines) if l.strip(" |`-").startswith(HOSTS[0] + ":")]
    assert len(origin) == 1 and origin[0] - first[0] == 3  # under the .11 hop, after its path
    text = dot.read_text()
    assert text.startswith("digraph stop_trace {") and text.count(" -> ") == 4
    if shutil.which("dot"):
        rendered = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True,
                                  timeout=60)
        assert rendered.returncode == 0 and b"<svg" in rendered.stdout, rendered.stderr
        assert svg.read_bytes().lstrip().startswith(b"<?xml") and b"carol" in svg.read_bytes()
    events = fleet.audit(HOSTS[0])
    assert [(e["outcome"], e["identity"], e["token"]) for e in events][-1] == \
        ("released", "investigator", fleet.tokens[0])


def test_trace_json(fleet):
    out = fleet.stopctl(fleet.target(), "--json")
    assert out.returncode == EXIT_OK, out.stderr
    obj = json.loads(out.stdout)
    assert obj["complete"] and obj["hops"] == 4
    hop, seen = obj["chain"], []
    while hop is not None:
        seen.append(hop)
        assert hop["record_text"].encode() == records.canonical(hop["record"])
        assert hop["hash_verified"] is True
        nxt = [link["next"] for link in hop["links"] if link["next"]]
        hop = nxt[0] if nxt else None
    assert [h["host"] for h in seen] == list(reversed(HOSTS))
    assert [h["token"] for h in seen] == list(reversed(fleet.tokens))
    assert [h["record"]["user"]["name"] for h in seen] == [u for u, _ in reversed(USERS)]


def test_refusals_carry_nothing_and_are_audited(fleet):
    host = HOSTS[3]
    secret_bits = ("carol", "only-for-investigators", fleet.tokens[2])
    cases = [
        (fleet.other.client("investigator"), EXIT_CERTIFICATE, "refused our certificate"),
        (fleet.ca.client("investigator", expired=True), EXIT_CERTIFICATE, "certificate expired"),
        (fleet.ca.client("eve"), EXIT_NOT_AUTHORISED, "not authorised"),
        (fleet.ca.client("revoked-one"), EXIT_NOT_AUTHORISED, "not authorised"),
        (fleet.ca.client("revoked-two"), EXIT_NOT_AUTHORISED, "not authorised"),
        (fleet.ca.client("auditor"), EXIT_UNKNOWN, "not found"),  # ID records only
    ]
    for cert, status, words in cases:
        out = fleet.stopctl(fleet.target(), cert=cert)
        assert out.returncode == status, (cert, out.stdout, out.stderr)
        assert out.stdout == "" and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
        assert not any(bit in out.stderr for bit in secret_bits)
    out = fleet.stopctl("f" * 40 + f"@{host}:{fleet.port}")
    assert out.returncode == EXIT_UNKNOWN and "not found" in out.stderr
    # No client certificate at all (stopctl always sends one).
    bare = ssl.create_default_context(cafile=fleet.ca.path)
    with pytest.raises(CertificateRefused):
        redeem(host, fleet.port, fleet.tokens[3], bare, timeout=30)
    events = fleet.audit(host)
    refused = [(e["outcome"], e.get("identity"), e.get("why")) for e in events
               if e["outcome"] != "released"]
    assert refused[-8:] == [
        ("tls-refused", None, "certificate not signed by redeem_ca"),
        ("tls-refused", None, "certificate has expired"),
        ("not-authorised", "eve", "no redeem_allow rule for this identity"),
        ("not-authorised", "revoked-one", "redeem_deny cn:revoked-one"),
        ("not-authorised", "revoked-two", "redeem_allow !cn:revoked-two"),
        ("refused-by-policy", "auditor", "outside this identity's redeem_allow scope"),
        ("unknown-token", "investigator", None),
        ("tls-refused", None, "no client certificate"),
    ]
    text = fleet.daemons[host].stopctl("audit", "--outcome", "tls-refused")
    assert text.returncode == 0 and text.stdout.count("tls-refused") >= 3
    assert all(line.split()[1] == "tls-refused" for line in text.stdout.splitlines())


def test_daemons_ran_under_mdwe(fleet):
    """The daemons above redeemed under PR_SET_MDWE (W^X enforced by the
    kernel, as MemoryDenyWriteExecute=yes does with seccomp)."""
    if not fleet.mdwe:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    # The wrapper really enforces it: a W+X mapping is refused in a child.
    probe = ("import ctypes, mmap, sys\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "libc.mmap.restype = ctypes.c_void_p\n"
             "p = libc.mmap(None, 4096, 7, 0x22, -1, 0)\n"  # RWX, MAP_PRIVATE|ANON
             "sys.exit(0 if p in (None, ctypes.c_void_p(-1).value) else 3)\n")
    script = os.path.join(str(fleet.base), "mdwe-exec.py")
    run = subprocess.run([sys.executable, script, sys.executable, "-c", probe], timeout=30)
    assert run.returncode == 0, "a W+X mapping succeeded under the wrapper"
    assert all(d.alive() for d in fleet.daemons.values())


def test_host_down_in_the_middle(fleet):
    """Runs last: it stops 127.0.0.12."""
    fleet.daemons[HOSTS[1]].stop()
    out = fleet.stopctl(fleet.target())
    assert out.returncode == EXIT_INCOMPLETE, out.stderr
    heads = [l.strip(" |`-").split()[0] for l in out.stdout.splitlines() if "  SV_REC  2026-" in l]
    assert heads == [f"{HOSTS[3]}:{fleet.port}", f"{HOSTS[2]}:{fleet.port}"]
    assert f"{HOSTS[1]}:{fleet.port}  token {fleet.tokens[1]}  [UNREACHABLE]" in out.stdout
    assert HOSTS[0] not in out.stdout.split("[UNREACHABLE]")[1]
