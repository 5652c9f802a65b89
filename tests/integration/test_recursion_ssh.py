"""Recursion through real OpenSSH logins (as root): the walk stays in the
attacker's session (two users logged in at once, each running a relay),
and a chain across network namespaces with an sshd hop and an ``ssh -W``
hop, daemons on port 113 (issue 9, "Tests")."""

from __future__ import annotations

import contextlib
import inspect

import pytest

from stop import walk as walk_mod
from tests.integration import netns as netns_mod
from tests.integration import sshd as sshd_mod
from tests.integration.chain import (Hosts, Victim, _matches, assert_nothing_leaks, token_line,
                                     wait_established)
from tests.integration.harness import free_port
from tests.integration.netns import Netns
from tests.integration.sshd import Sshd, Users
from tests.integration.svtrees import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif("here" not in inspect.signature(walk_mod.walk).parameters,
                       reason="the walk does not take this host's addresses yet (issue 9 part 3)"),
]

H0, H1, H2, H0B = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.15"


@pytest.fixture
def users(tmp_path):
    why = sshd_mod.available()
    if why:
        pytest.skip(why)
    u = Users(tmp_path)
    yield u
    u.remove()


def test_two_users_over_ssh_the_walk_stays_in_the_session(start_daemon, tree, users, tmp_path):
    """Alice (from H0) and Bob (from H0B) are logged in to H1 over ssh at
    once, each running ``nc`` to H2. An SV_REC about Alice's relay targets
    Alice's login only, and its record holds none of Bob's processes."""
    hosts = Hosts(start_daemon, (H0, H1))
    alice, bob = users.add("a"), users.add("b")
    ssh_port = free_port((H1,))
    Sshd(tmp_path, H1, ssh_port, tree)
    va, vb = Victim(H2), Victim(H2)
    try:
        tree.spawn("sleep 600 | " + alice.ssh(H1, ssh_port, f"nc -s {H1} {H2} {va.port}",
                                              source=H0) + "; true")
        tree.spawn("sleep 600 | " + bob.ssh(H1, ssh_port, f"nc -s {H1} {H2} {vb.port}",
                                            source=H0B) + "; true")
        va.accept(30)
        vb.accept(30)
        alice_in = wait_established(local=(H0, None), remote=(H1, ssh_port), what="Alice's login")
        wait_established(local=(H0B, None), remote=(H1, ssh_port), what="Bob's login")

        reply = va.ask(hosts[H1])
        token = token_line(reply, (va.peer[1], va.port))
        hops = hosts.trace(H1, token)
        assert [h.address for h in hops] == [H1, H0], hosts.logs()
        h1 = hops[0]
        # Alice's login is the one target; Bob's never is
        assert [(t["address"], t["port"], t["local"]["port"]) for t in h1.targets] == [
            (H0, alice_in.local[1], ssh_port)], h1.targets
        assert all(e["target"]["address"] != H0B for e in h1.linked)
        procs = h1.record["processes"]["processes"]
        uids = {p.get("uids", {}).get("real") for p in procs}
        assert bob.uid not in uids, [p.get("cmdline") for p in procs]
        assert alice.uid in uids  # her shell and nc, and sshd's session process
        names = {p.get("name") for p in procs}
        assert "nc" in names and "sshd" in names
        [entry] = h1.linked
        assert entry["outcome"] == "token" and entry["token"] == hops[1].token
        assert_nothing_leaks(va, reply, hops)
    finally:
        va.close()
        vb.close()


# The namespace chain: H0 (attacker) -> H1 (an ssh -W forward through its
# sshd) -> H2 (an sshd login session running nc) -> H3 (victim), one network
# namespace per host, veth links, daemons on port 113 with the default
# recursion port and local_addresses (each namespace's own interfaces).
NS_H0, NS_H1_A = "192.0.2.1", "192.0.2.2"          # link H0 - H1
NS_H1_B, NS_H2_A = "198.51.100.1", "198.51.100.2"  # link H1 - H2
NS_H2_B, NS_H3 = "192.0.2.5", "192.0.2.6"          # link H2 - H3


@pytest.fixture
def namespaces():
    """Four namespaces linked in a line, removed after the test (after the
    daemons and processes in them are stopped: fixtures end in reverse)."""
    if not netns_mod.available():
        pytest.skip("needs root and iproute2 (network namespaces)")
    with contextlib.ExitStack() as stack:
        ns = [stack.enter_context(Netns(f"rec{i}")) for i in range(4)]
        ns[0].link(ns[1], NS_H0, NS_H1_A)
        ns[1].link(ns[2], NS_H1_B, NS_H2_A)
        ns[2].link(ns[3], NS_H2_B, NS_H3)
        yield ns


def ns_established(ns, local=None, remote=None):
    """wait for an established TCP connection in ``ns`` with these ends
    (as chain.established: None, or None parts, match anything)."""
    def found():
        for lo, re_ in ns.tcp():
            if _matches(lo, local) and _matches(re_, remote):
                return lo, re_
        return None
    return wait_for(found, timeout=30, what=f"connection {local} -> {remote} in {ns.name}")


def ssh_chain(namespaces, tree, user, tmp_path):
    """Start the namespace chain: sshds on H1 and H2, the victim's listener
    on H3, and on H0 the attacker's login as ``user`` to H2 through an
    ``ssh -W`` forward by H1, running ``nc`` to the victim. Once the victim
    has accepted: ``(victim, H0's ssh into H1, H1's forward into H2)``,
    each connection ``(local, remote)`` as seen on the host it came into."""
    ns0, ns1, ns2, ns3 = namespaces
    Sshd(tmp_path, NS_H1_A, 22, tree, netns=ns1)
    Sshd(tmp_path, NS_H2_A, 22, tree, netns=ns2)
    victim = Victim(NS_H3, netns=ns3)
    try:
        attacker = tmp_path / "attacker.sh"
        attacker.write_text("sleep 600 | " + user.ssh(
            NS_H2_A, 22, f"nc -s {NS_H2_B} {NS_H3} {victim.port}",
            extra=user.jump(NS_H1_A, 22)) + "; true\n")
        tree.spawn(f"exec ip netns exec {ns0.name} sh {attacker}")
        victim.accept(30)
        into_h1 = ns_established(ns1, local=(NS_H1_A, 22))    # H0's ssh
        into_h2 = ns_established(ns2, local=(NS_H2_A, 22))    # H1's forward
        ns_established(ns0, remote=(NS_H1_A, 22))
    except BaseException:
        victim.close()
        raise
    return victim, into_h1, into_h2


def test_chain_across_namespaces_with_sshd_and_ssh_w_hops(namespaces, start_daemon, tree,
                                                          users, tmp_path):
    """The victim asks H2 about the nc of a login session that came in over
    an ``ssh -W`` forward through H1 from H0; every host's daemon, on port
    113 in its own namespace, traces it back: H2 -> H1 -> H0."""
    ns0, ns1, ns2, ns3 = namespaces
    hosts = Hosts.in_namespaces(start_daemon, {ns0: (NS_H0,), ns1: (NS_H1_A, NS_H1_B),
                                               ns2: (NS_H2_A, NS_H2_B)})
    user = users.add("n")
    victim, into_h1, into_h2 = ssh_chain(namespaces, tree, user, tmp_path)
    try:
        reply = victim.ask(hosts[NS_H2_B])
        token = token_line(reply, (victim.peer[1], victim.port))
        hops = hosts.trace(NS_H2_B, token)
        assert [h.address for h in hops] == [NS_H2_B, NS_H1_B, NS_H0], hosts.logs()
        h2, h1, h0 = hops
        # each host asked the previous one about its own login's connection,
        # from that connection's address, on port 113
        assert [(t["address"], t["port"], t["local"]) for t in h2.targets] == [
            (NS_H1_B, into_h2[1][1], {"address": NS_H2_A, "port": 22})], h2.targets
        assert [(t["address"], t["port"], t["local"]) for t in h1.targets] == [
            (NS_H0, into_h1[1][1], {"address": NS_H1_A, "port": 22})], h1.targets
        assert h0.recursion == {"sid": 4711, "status": "no-targets", "targets": []}
        for hop, prev, local in ((h2, h1, NS_H2_A), (h1, h0, NS_H1_A)):
            [entry] = hop.linked
            assert (entry["outcome"], entry["token"]) == ("token", prev.token), entry
            assert entry["target"]["port"] == 113 and entry["local"]["address"] == local
            assert entry["request"] == {"type": "SV_REC", "sid": 4711,
                                        "ports": [hop.targets[0]["port"], 22]}
        # the hops are what the test made: H2's login session (sshd, sh,
        # nc as the user), H1's sshd forwarding for the user, H0's ssh -W
        procs = {h.address: h.record["processes"]["processes"] for h in hops}
        names = {a: {p.get("name") for p in ps} for a, ps in procs.items()}
        assert {"nc", "sshd"} <= names[NS_H2_B], names
        assert "sshd" in names[NS_H1_B] and "ssh" in names[NS_H0], names
        assert user.uid in {p.get("uids", {}).get("real") for p in procs[NS_H1_B]}
        for hop in hops:
            r = hosts.verify(hop.address, hop.token)
            assert r.returncode == 0, r.stdout + r.stderr
        # Leak: the victim got H2's token line and nothing else, ever.
        assert_nothing_leaks(victim, reply, hops)
    finally:
        victim.close()
    assert "Traceback" not in hosts.logs()
