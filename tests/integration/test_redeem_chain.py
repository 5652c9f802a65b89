"""``stopctl trace`` over a real recursive chain: four real daemons on
loopback aliases, each with the redemption service and its own host
certificate from a CA made here; real relays between them (the recursion
tests' chain), run as three different users; the victim asks the last hop
with SV_REC, the daemons ask each other, and one token rebuilds the chain.
"""

from __future__ import annotations

import inspect
import json
import os
import pwd
import subprocess
import sys

import pytest

from stop import walk as walk_mod
from stop.redeem.cli import EXIT_OK
from tests.integration.chain import (Hosts, Victim, settings_for, token_line, wait_established,
                                     wait_listening)
from tests.integration.harness import ROOT, free_port
from tests.integration.svtrees import Tree, wait_for
from tests.testca import TestCA

H0, H1, H2, H3 = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"

pytestmark = [
    pytest.mark.skipif("here" not in inspect.signature(walk_mod.walk).parameters,
                       reason="the walk does not take this host's addresses yet (issue 9 part 3)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs relays as other users (needs root)"),
]


class RedeemHosts(Hosts):
    """The recursion tests' hosts, each also running the redemption service
    on ``rport`` of its alias with its own certificate."""

    def __init__(self, start_daemon, addresses, ca: TestCA):
        self.port = free_port(tuple(addresses))
        self.rport = free_port(tuple(addresses))
        self.daemons = {}
        for a in addresses:
            cert, key = ca.host(a)
            self.daemons[a] = start_daemon(settings_for(
                a, self.port, redeem_listen=f"tcp:{self.rport}:interface={a}", redeem_cert=cert,
                redeem_key=key, redeem_ca=ca.path, redeem_allow="investigator"),
                interfaces=(a,), port=self.port)


def as_user(user: str, cmd: str) -> str:
    """``cmd`` (a shell command) run as ``user`` by the relay's shell."""
    pw = pwd.getpwnam(user)
    quoted = cmd.replace("'", "'\\''")
    return (f"exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --clear-groups "
            f"sh -c '{quoted}'")


@pytest.fixture
def tree():
    t = Tree()
    yield t
    t.stop()


def test_trace_a_real_recursive_chain(start_daemon, tree, tmp_path):
    """H0 (root: the attacker's end) -> H1 (nobody: nc -l | nc, through a
    local TCP port) -> H2 (daemon: socat TCP -> UNIX socket -> socat) -> H3
    (the victim, which asks H2). stopctl trace from H2's token lists H2, H1,
    H0 in order, each with its user and the processes the walk went
    through, and the SV hash verified at each hop."""
    ca = TestCA(tmp_path)
    cert, key = ca.client("investigator")
    hosts = RedeemHosts(start_daemon, (H0, H1, H2, H3), ca)
    victim = Victim(H3)
    shared = tmp_path / "relay"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    try:
        p1, pl = free_port((H1,)), free_port((H1,))
        p2 = free_port((H2,))
        path = shared / "relay.sock"
        tree.spawn(as_user("daemon", f"exec socat UNIX-LISTEN:{path} TCP:{H3}:{victim.port},bind={H2}"))
        wait_for(lambda: path.exists(), what="the UNIX socket of H2's relay")
        tree.spawn(as_user("daemon", f"exec socat TCP-LISTEN:{p2},bind={H2},reuseaddr "
                                     f"UNIX-CONNECT:{path}"))
        wait_listening(H2, p2)
        tree.spawn(as_user("nobody", f"nc -l {H1} {pl} | nc -s {H1} {H2} {p2}; true"))
        wait_listening(H1, pl)
        tree.spawn(as_user("nobody", f"nc -l {H1} {p1} | nc -s {H1} {H1} {pl}; true"))
        wait_listening(H1, p1)
        tree.spawn(f"sleep 600 | nc -s {H0} {H1} {p1}; true")
        wait_established(remote=(H1, p1), what="H0 -> H1")
        wait_established(remote=(H1, pl), what="H1's local relay")
        wait_established(remote=(H2, p2), what="H1 -> H2")
        victim.accept()
        wait_established(local=(H2, victim.peer[1]), what="H2 -> H3")

        token = token_line(victim.ask(hosts[H2]), (victim.peer[1], victim.port))
        hops = hosts.trace(H2, token)  # waits until every outcome is saved
        assert [h.address for h in hops] == [H2, H1, H0], hosts.logs()

        env = dict(os.environ, PYTHONPATH=ROOT)
        base = [sys.executable, "-m", "stop.ctl", "trace", f"{token}@{H2}:{hosts.rport}",
                "--cert", cert, "--key", key, "--ca", ca.path]
        out = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == EXIT_OK, out.stderr
        lines = out.stdout.splitlines()
        heads = [l.strip(" |`-") for l in lines if "  SV_REC  " in l]
        assert [h.split()[0] for h in heads] == [f"{a}:{hosts.rport}" for a in (H2, H1, H0)], out.stdout
        for head, user in zip(heads, ("daemon", "nobody", "root")):
            assert f"  {user} (uid {pwd.getpwnam(user).pw_uid})  " in head, out.stdout
        assert out.stdout.count("(hash verified)") == 3
        assert "[ORIGIN]" in out.stdout

        # The processes the walk went through, as JSON: socat to socat on
        # H2, four nc (pipe, local TCP, pipe) on H1, nc then its shell's
        # pipe partner on H0.
        out = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == EXIT_OK, out.stderr
        hop, chain = json.loads(out.stdout)["chain"], []
        while hop is not None:
            chain.append(hop)
            nxt = [link["next"] for link in hop["links"] if link["next"]]
            hop = nxt[0] if nxt else None
        assert [h["token"] for h in chain] == [h.token for h in hops]
        names = [[p["name"].split("(")[0] for p in h["process_path"]] for h in chain]
        assert names[0] == ["socat", "socat"], names
        assert names[1] == ["nc", "nc", "nc", "nc"], names
        assert names[2][0] == "nc", names
        vias = [p["via"] for p in chain[1]["process_path"]]
        assert vias == ["socket", "pipe", "socket", "pipe"], chain[1]["process_path"]
    finally:
        victim.close()
    logs = hosts.logs()
    assert "Traceback" not in logs, logs
