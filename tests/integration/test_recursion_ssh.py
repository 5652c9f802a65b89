"""Recursion through real OpenSSH logins (as root): the walk stays in the
attacker's session (two users logged in at once, each running a relay),
and a chain across network namespaces with an sshd hop and an ``ssh -W``
hop, daemons on port 113 (issue 9, "Tests")."""

from __future__ import annotations

import inspect

import pytest

from stop import walk as walk_mod
from tests.integration import sshd as sshd_mod
from tests.integration.chain import Hosts, Victim, token_line, wait_established
from tests.integration.harness import free_port
from tests.integration.sshd import Sshd, Users

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

        token = token_line(va.ask(hosts[H1]), (va.peer[1], va.port))
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
    finally:
        va.close()
        vb.close()
