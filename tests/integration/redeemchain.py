"""A real stepping-stone chain whose daemons run the redemption service:
the recursion tests' four hosts on loopback aliases, each daemon with its
own host certificate from one CA, and real relays between them run as
three users. Used by tests/integration/test_redeem_chain.py and by
dev/trace_demo.py (the README's worked example).

    H0 (root: the attacker's end, ``sleep | nc``)
      -> H1 (nobody: ``nc -l | nc``, twice, through a local TCP port)
      -> H2 (daemon: socat TCP -> UNIX socket -> socat)
      -> H3 (the victim: a listener, which asks H2 with SV_REC)
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile

from tests.integration.chain import (Hosts, Victim, settings_for, token_line, wait_established,
                                     wait_listening)
from tests.integration.harness import free_port
from tests.integration.svtrees import Tree, wait_for
from tests.testca import TestCA

H0, H1, H2, H3 = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"
ADDRESSES = (H0, H1, H2, H3)
#: The user each relay runs as, the attacker's end first.
USERS = {H0: "root", H1: "nobody", H2: "daemon"}
#: The identity ``redeem_allow`` names on every host.
INVESTIGATOR = "investigator"


class RedeemHosts(Hosts):
    """The recursion tests' hosts, each also running the redemption service
    on ``rport`` of its alias with its own certificate from ``ca``."""

    def __init__(self, start_daemon, addresses, ca: TestCA):
        self.port = free_port(tuple(addresses))
        self.rport = free_port(tuple(addresses))
        self.daemons = {}
        for a in addresses:
            self.daemons[a] = start_daemon(settings_for(
                a, self.port, **redeem_settings(ca, a, f"tcp:{self.rport}:interface={a}")),
                interfaces=(a,), port=self.port)


def redeem_settings(ca: TestCA, address: str, listen: str) -> dict:
    """A daemon's redemption settings: its certificate names ``address``."""
    cert, key = ca.host(address)
    return {"redeem_listen": listen, "redeem_cert": cert, "redeem_key": key,
            "redeem_ca": ca.path, "redeem_allow": INVESTIGATOR}


def hosts_in_namespaces(start_daemon, namespaces: dict, ca: TestCA, rport: int = 8113) -> Hosts:
    """The recursion tests' namespace hosts (:meth:`Hosts.in_namespaces`),
    each daemon also running the redemption service on ``rport`` of every
    address of its namespace. ``namespaces``: {Netns: (address, ...)}, the
    first address being the one its certificate names (the one a trace
    reaches it at)."""
    hosts = Hosts.in_namespaces(start_daemon, {})
    for ns, addresses in namespaces.items():
        part = Hosts.in_namespaces(start_daemon, {ns: addresses},
                                   **redeem_settings(ca, addresses[0], f"tcp:{rport}"))
        hosts.daemons.update(part.daemons)
    hosts.rport = rport
    return hosts


def as_user(user: str, cmd: str) -> str:
    """``cmd`` (a shell command) run as ``user`` by the relay's shell."""
    pw = pwd.getpwnam(user)
    quoted = cmd.replace("'", "'\\''")
    return (f"exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --clear-groups "
            f"sh -c '{quoted}'")


class RelayChain:
    """The relays H0 -> H1 -> H2 -> victim (on H3), started in ``tree``.

    The UNIX socket of H2's relay lives in a directory of its own under
    /tmp that H2's user can write (pytest's temporary directories are
    root's, 0700); ``close()`` removes it.
    """

    def __init__(self, tree: Tree):
        self.tree = tree
        self.victim = Victim(H3)
        self.shared = tempfile.mkdtemp(prefix="stop-relay-")
        os.chmod(self.shared, 0o1777)

    def start(self) -> None:
        """Start every relay and wait until each connection is established
        and the victim has accepted the last one."""
        tree, victim = self.tree, self.victim
        p1, pl = free_port((H1,)), free_port((H1,))
        p2 = free_port((H2,))
        path = os.path.join(self.shared, "relay.sock")
        tree.spawn(as_user(USERS[H2], f"exec socat UNIX-LISTEN:{path} "
                                      f"TCP:{H3}:{victim.port},bind={H2}"))
        wait_for(lambda: os.path.exists(path), what="the UNIX socket of H2's relay")
        tree.spawn(as_user(USERS[H2], f"exec socat TCP-LISTEN:{p2},bind={H2},reuseaddr "
                                      f"UNIX-CONNECT:{path}"))
        wait_listening(H2, p2)
        tree.spawn(as_user(USERS[H1], f"nc -l {H1} {pl} | nc -s {H1} {H2} {p2}; true"))
        wait_listening(H1, pl)
        tree.spawn(as_user(USERS[H1], f"nc -l {H1} {p1} | nc -s {H1} {H1} {pl}; true"))
        wait_listening(H1, p1)
        tree.spawn(f"sleep 600 | nc -s {H0} {H1} {p1}; true")
        wait_established(remote=(H1, p1), what="H0 -> H1")
        wait_established(remote=(H1, pl), what="H1's local relay")
        wait_established(remote=(H2, p2), what="H1 -> H2")
        victim.accept()
        wait_established(local=(H2, victim.peer[1]), what="H2 -> H3")

    def ask(self, hosts: Hosts) -> str:
        """The victim asks H2's daemon (SV_REC) about the connection it
        accepted; the token of the reply."""
        v = self.victim
        return token_line(v.ask(hosts[H2]), (v.peer[1], v.port))

    def close(self) -> None:
        self.victim.close()
        shutil.rmtree(self.shared, ignore_errors=True)
