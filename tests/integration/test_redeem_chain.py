"""``stopctl trace`` over real recursive chains: real daemons, each with
the redemption service and its own host certificate from a CA made here;
real relays between them (the recursion tests' chains); the victim asks
the last hop with SV_REC, the daemons ask each other, and one token
rebuilds the chain, with the right user and processes on each host.

- On loopback aliases: relays run as three different users.
- Across network namespaces (one per host, veth links, routed so the
  investigator on the victim's side reaches every host): an ``ssh -W``
  hop and an sshd login.
"""

from __future__ import annotations

import inspect
import json
import os
import pwd
import shutil
import subprocess
import sys

import pytest

from stop import walk as walk_mod
from stop.redeem.cli import EXIT_OK
from tests.integration.chain import token_line
from tests.integration.harness import ROOT
from tests.integration.redeemchain import (H0, H1, H2, H3, INVESTIGATOR, USERS, RedeemHosts,
                                           RelayChain, hosts_in_namespaces)
# The recursion tests' namespace chain: its addresses, how it starts, and
# its fixtures (four linked namespaces; per-run test users), as they are.
from tests.integration.test_recursion_ssh import (NS_H0, NS_H1_A, NS_H1_B, NS_H2_A, NS_H2_B,
                                                  namespaces, ssh_chain, users)  # noqa: F401
from tests.testca import TestCA

pytestmark = [
    pytest.mark.skipif("here" not in inspect.signature(walk_mod.walk).parameters,
                       reason="the walk does not take this host's addresses yet (issue 9 part 3)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs relays as other users (needs root)"),
]


class Investigator:
    """``stopctl trace`` of one token with a certificate ``redeem_allow``
    names (run inside ``netns`` when given)."""

    def __init__(self, ca: TestCA, target: str, netns=None):
        cert, key = ca.client(INVESTIGATOR)
        self.base = [sys.executable, "-m", "stop.ctl", "trace", target, "--cert", cert,
                     "--key", key, "--ca", ca.path]
        self.netns = netns

    def trace(self, *extra: str) -> subprocess.CompletedProcess:
        argv = self.base + list(extra)
        if self.netns is not None:
            argv = self.netns.command(argv)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        assert out.returncode == EXIT_OK, out.stdout + out.stderr
        return out

    def chain(self) -> list[dict]:
        """``--json``: the hops, first to last (the first branch)."""
        hop, chain = json.loads(self.trace("--json").stdout)["chain"], []
        while hop is not None:
            chain.append(hop)
            nxt = [link["next"] for link in hop["links"] if link["next"]]
            hop = nxt[0] if nxt else None
        return chain


def assert_trace(inv: Investigator, hops, rport: int, users: list[str], tmp_path) -> list[dict]:
    """The text tree lists ``hops`` (the test's own trace, chain.Hosts.trace)
    in order, each at its address and with its user, hashes verified, the
    last one the origin; the JSON has the same tokens; the DOT has a box per
    hop and an edge per token, and Graphviz draws it. Returns the JSON hops."""
    out = inv.trace().stdout
    heads = [l.strip(" |`-") for l in out.splitlines() if "  SV_REC  " in l]
    assert [h.split()[0] for h in heads] == [f"{h.address}:{rport}" for h in hops], out
    for head, user in zip(heads, users):
        assert f"  {user} (uid {pwd.getpwnam(user).pw_uid})  " in head, out
    assert out.count("(hash verified)") == len(hops), out
    assert out.rstrip().endswith("[ORIGIN] no inbound connection: the chain starts here"), out

    chain = inv.chain()
    assert [h["token"] for h in chain] == [h.token for h in hops]

    dot = tmp_path / "chain.dot"
    inv.trace("--dot", str(dot))
    text = dot.read_text()
    assert text.startswith("digraph stop_trace {") and text.count(': token"];') == len(hops) - 1, text
    assert all(h.token in text for h in hops)
    if shutil.which("dot"):
        drawn = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True,
                               timeout=60)
        assert drawn.returncode == 0 and b"<svg" in drawn.stdout, drawn.stderr
        assert all(h.token.encode() in drawn.stdout for h in hops)
    return chain


def names(hop: dict) -> list[str]:
    return [p["name"].split("(")[0] for p in hop["process_path"]]


def test_trace_a_real_recursive_chain(start_daemon, tree, tmp_path):
    """H0 (root: the attacker's end) -> H1 (nobody: nc -l | nc, through a
    local TCP port) -> H2 (daemon: socat TCP -> UNIX socket -> socat) -> H3
    (the victim, which asks H2). stopctl trace from H2's token lists H2, H1,
    H0 in order, each with its user and the processes the walk went
    through, and the SV hash verified at each hop."""
    ca = TestCA(tmp_path)
    hosts = RedeemHosts(start_daemon, (H0, H1, H2, H3), ca)
    relays = RelayChain(tree)
    try:
        relays.start()
        token = relays.ask(hosts)
        hops = hosts.trace(H2, token)  # waits until every outcome is saved
        assert [h.address for h in hops] == [H2, H1, H0], hosts.logs()
        inv = Investigator(ca, f"{token}@{H2}:{hosts.rport}")
        chain = assert_trace(inv, hops, hosts.rport, [USERS[H2], USERS[H1], USERS[H0]], tmp_path)
        # The processes the walk went through: socat to socat on H2, four
        # nc (pipe, local TCP, pipe) on H1, nc then its shell on H0.
        assert names(chain[0]) == ["socat", "socat"], chain[0]["process_path"]
        assert names(chain[1]) == ["nc", "nc", "nc", "nc"], chain[1]["process_path"]
        assert [p["via"] for p in chain[1]["process_path"]] == ["socket", "pipe", "socket", "pipe"]
        assert names(chain[2])[0] == "nc", chain[2]["process_path"]
    finally:
        relays.close()
    logs = hosts.logs()
    assert "Traceback" not in logs, logs


def route(namespaces) -> None:
    """Routes along the line of namespaces (H1 and H2 forward), so the
    investigator on the victim's side (H3) reaches every host."""
    ns0, ns1, ns2, ns3 = namespaces
    for ns in (ns1, ns2):
        ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
    for ns, net, via in ((ns0, "default", NS_H1_A), (ns1, "192.0.2.4/30", NS_H2_A),
                         (ns2, "default", NS_H1_B), (ns3, "default", NS_H2_B)):
        ns.run(["ip", "route", "add", net, "via", via], check=True)


def test_trace_across_namespaces(namespaces, start_daemon, tree, users, tmp_path):
    """The recursion tests' namespace chain (H0 -> ssh -W through H1's sshd
    -> an sshd login on H2 running nc -> the victim on H3), daemons on port
    113 with the redemption service on 8113 of each namespace: stopctl
    trace, run in the victim's namespace, rebuilds H2 -> H1 -> H0 with the
    login's user on H2 and H1 (its sshd session) and root's ssh on H0."""
    ns0, ns1, ns2, ns3 = namespaces
    route(namespaces)
    ca = TestCA(tmp_path)
    hosts = hosts_in_namespaces(start_daemon, {ns0: (NS_H0,), ns1: (NS_H1_B, NS_H1_A),
                                               ns2: (NS_H2_B, NS_H2_A)}, ca)
    user = users.add("r")
    victim, _, _ = ssh_chain(namespaces, tree, user, tmp_path)
    try:
        token = token_line(victim.ask(hosts[NS_H2_B]), (victim.peer[1], victim.port))
        hops = hosts.trace(NS_H2_B, token)
        assert [h.address for h in hops] == [NS_H2_B, NS_H1_B, NS_H0], hosts.logs()
        inv = Investigator(ca, f"{token}@{NS_H2_B}:{hosts.rport}", netns=ns3)
        chain = assert_trace(inv, hops, hosts.rport, [user.name, user.name, "root"], tmp_path)
        assert names(chain[0])[0] == "nc" and "sshd" in names(chain[0]), chain[0]["process_path"]
        assert "sshd" in names(chain[1]), chain[1]["process_path"]
        assert names(chain[2])[0] == "ssh", chain[2]["process_path"]
    finally:
        victim.close()
    assert "Traceback" not in hosts.logs()
