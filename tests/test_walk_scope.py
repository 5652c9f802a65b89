"""stop.walk's scope (spec 5, issue 9): pipes and sockets are followed only
from the queried connection's session and the relays reached from it;
ancestors above the session leader are saved and their connections to
other hosts listed, nothing more; this host's addresses decide what "TCP to
this same host" is."""

from __future__ import annotations

import ipaddress

from stop.model import Connection, Endpoint
from stop.recursion import HostAddresses
from stop.walk import walk
from tests.test_walk import TableInspector, TableScan, tcp

HERE = "192.0.2.12"
QUERIED = Connection(Endpoint(HERE, 40000), Endpoint("192.0.2.13", 5555), uid=1001,
                     inode=500, accepted=False)
ALICE_HOST, BOB_HOST = "192.0.2.11", "192.0.2.15"
ROOT, ALICE, BOB, DBUS = 0, 1001, 1002, 101


class ScopedScan(TableScan):
    """TableScan whose processes also have a session and a real uid:
    ``attrs`` {pid: (session, uid)}."""

    def __init__(self, table, links, holders, attrs, **kw):
        super().__init__(table, links, holders, **kw)
        self.attrs = attrs

    def process(self, pid, fields):
        out = super().process(pid, fields)
        session, uid = self.attrs.get(pid, (None, None))
        if "session" in fields and session is not None:
            out["session"] = session
        if "uids" in fields and uid is not None:
            out["uids"] = {"real": uid, "effective": uid, "saved": uid}
        return out


def pipe(fd, inode):
    return {"fd": fd, "kind": "pipe", "inode": inode}


def link(links, *ends):
    """Every end in ``ends`` ((pid, fd)) is a peer of every other."""
    for end in ends:
        links[end] = [e for e in ends if e != end]


def sshd_logins():
    """Alice and Bob logged in over ssh at once; Alice's nc is asked about.

    1 init; 100 sshd listener (session 100); 150 its log writer; per login
    a [priv] process (session leader) and the user's sshd process holding
    the login's TCP connection; Alice's shell 300 (its own session) runs nc
    301, whose stdin is a pipe from her sshd process. Every sshd process
    writes to the listener's log pipe (inode 9)."""
    login_a = tcp(4, 61, (HERE, 22), (ALICE_HOST, 50001), "inbound")
    login_b = tcp(4, 62, (HERE, 22), (BOB_HOST, 50002), "inbound")
    table = {
        1: (0, []),
        100: (1, [pipe(2, 9)]),
        150: (1, [pipe(0, 9)]),
        200: (100, [pipe(2, 9), login_a]),
        201: (200, [pipe(2, 9), login_a, pipe(7, 7)]),
        300: (201, []),
        301: (300, [pipe(0, 7), tcp(3, 500, (HERE, 40000), ("192.0.2.13", 5555), "outbound",
                                    by="ephemeral-range")]),
        400: (100, [pipe(2, 9), login_b]),
        401: (400, [pipe(2, 9), login_b, pipe(7, 17)]),
        500: (401, []),
        501: (500, [pipe(0, 17), tcp(3, 510, (HERE, 40001), ("192.0.2.13", 5556), "outbound")]),
    }
    links = {}
    link(links, (100, 2), (150, 0), (200, 2), (201, 2), (400, 2), (401, 2))
    link(links, (201, 7), (301, 0))
    link(links, (401, 7), (501, 0))
    attrs = {1: (1, ROOT), 100: (100, ROOT), 150: (100, ROOT), 200: (200, ROOT),
             201: (200, ALICE), 300: (300, ALICE), 301: (300, ALICE), 400: (400, ROOT),
             401: (400, BOB), 500: (500, BOB), 501: (500, BOB)}
    return table, links, attrs


def run(table, links, holders, attrs, here=None, fields=None):
    scan = ScopedScan(table, links, holders, attrs)
    kw = {"fields": fields} if fields else {}
    return walk(TableInspector(scan), QUERIED, here=here, **kw)


def test_the_walk_stays_in_the_attackers_session():
    table, links, attrs = sshd_logins()
    result = run(table, links, [301], attrs)
    procs = {p["pid"]: p for p in result["processes"]}
    # Ancestors are saved up to PID 1; no process of Bob's login is.
    assert set(procs) == {301, 300, 201, 200, 100, 1}
    assert {pid: p["scope"] for pid, p in procs.items()} == {
        301: "session", 300: "session", 201: "ancestor", 200: "ancestor", 100: "ancestor",
        1: "ancestor"}
    # Alice's login is the one remote connection (held by her sshd
    # processes, ancestors of her shell); Bob's never is.
    assert [(r["remote"]["address"], r["holders"]) for r in result["remote_connections"]] == [
        (ALICE_HOST, [[201, 4], [200, 4]])]
    # nc's stdin comes from sshd, above the session: not followed from there
    [stdin] = procs[301]["pipes"]
    assert stdin["not_followed"] == "shared with a process outside the session"
    assert stdin["peers"] == [[201, 7]]


def test_without_sessions_and_uids_the_walk_is_the_papers():
    # A backend that cannot tell sessions or uids: everything is followed,
    # as before the scope rule (and the paper).
    table, links, _ = sshd_logins()
    result = run(table, links, [301], {})
    assert {ALICE_HOST, BOB_HOST} <= {r["remote"]["address"]
                                      for r in result["remote_connections"]}


def test_a_service_of_another_user_is_saved_not_followed():
    """nc talks to a dbus-like daemon (another user, another session) that
    is connected to Bob's process with an inbound connection."""
    table = {
        1: (0, []),
        10: (1, [{"fd": 5, "kind": "socket", "family": "AF_UNIX", "inode": 71},
                 tcp(3, 500, (HERE, 40000), ("192.0.2.13", 5555), "outbound")]),
        20: (1, [{"fd": 8, "kind": "socket", "family": "AF_UNIX", "inode": 72},
                 {"fd": 9, "kind": "socket", "family": "AF_UNIX", "inode": 73}]),
        30: (1, [{"fd": 5, "kind": "socket", "family": "AF_UNIX", "inode": 74},
                 tcp(4, 75, (HERE, 22), (BOB_HOST, 50002), "inbound")]),
    }
    links = {(10, 5): [(20, 8)], (20, 8): [(10, 5)], (20, 9): [(30, 5)], (30, 5): [(20, 9)]}
    attrs = {1: (1, ROOT), 10: (10, ALICE), 20: (20, DBUS), 30: (30, BOB)}
    result = run(table, links, [10], attrs)
    procs = {p["pid"]: p for p in result["processes"]}
    assert procs[20]["scope"] == "not-followed"
    assert 30 not in procs and result["remote_connections"] == []


def test_a_relay_of_the_same_user_in_another_session_is_followed():
    """Figure 4's shape: the asked nc's pipeline reaches, over a local TCP
    connection, a relay started in another session by the same user."""
    table = {
        1: (0, []),
        10: (1, [tcp(3, 500, (HERE, 40000), ("192.0.2.13", 5555), "outbound"),
                 tcp(4, 81, (HERE, 7000), (HERE, 41000), "inbound")]),
        20: (1, [tcp(3, 82, (HERE, 41000), (HERE, 7000), "outbound"),
                 tcp(4, 83, (HERE, 8000), (ALICE_HOST, 50001), "inbound")]),
    }
    links = {(10, 4): [(20, 3)], (20, 3): [(10, 4)]}
    attrs = {1: (1, ROOT), 10: (10, ALICE), 20: (20, ALICE)}
    result = run(table, links, [10], attrs, here=HostAddresses({HERE}))
    assert {p["pid"]: p["scope"] for p in result["processes"]} == {
        10: "session", 20: "session", 1: "ancestor"}
    assert [r["remote"]["address"] for r in result["remote_connections"]] == [ALICE_HOST]


def test_a_process_met_first_as_an_ancestor_counts_for_more_when_a_relay_reaches_it():
    """5 is the parent of the asked process, in another session (an
    ancestor); 20, a relay reached from the session, talks to 5 through a
    pipe: then 5 is followed too, and what it is connected to is found."""
    table = {
        1: (0, []),
        5: (1, [pipe(3, 91), pipe(4, 92)]),
        6: (1, [pipe(0, 92), tcp(4, 93, (HERE, 9000), (ALICE_HOST, 50003), "inbound")]),
        10: (5, [tcp(3, 500, (HERE, 40000), ("192.0.2.13", 5555), "outbound"),
                 tcp(4, 81, (HERE, 7000), (HERE, 41000), "inbound")]),
        20: (1, [tcp(3, 82, (HERE, 41000), (HERE, 7000), "outbound"), pipe(5, 91)]),
    }
    links = {(10, 4): [(20, 3)], (20, 3): [(10, 4)], (20, 5): [(5, 3)], (5, 3): [(20, 5)],
             (5, 4): [(6, 0)], (6, 0): [(5, 4)]}
    attrs = {1: (1, ROOT), 5: (5, ALICE), 6: (5, ALICE), 10: (10, ALICE), 20: (20, ALICE)}
    result = run(table, links, [10], attrs, here=HostAddresses({HERE}))
    procs = {p["pid"]: p for p in result["processes"]}
    assert procs[5]["scope"] == "session" and procs[6]["scope"] == "session"
    assert [r["remote"]["address"] for r in result["remote_connections"]] == [ALICE_HOST]


def test_this_hosts_addresses_decide_what_is_another_host():
    """On loopback aliases standing for hosts: a connection to 127.0.0.11
    is to another host when only 127.0.0.12 is this host's, even though the
    kernel knows the process at its other end."""
    a, b = "127.0.0.12", "127.0.0.11"
    table = {
        10: (0, [tcp(3, 500, (HERE, 40000), ("192.0.2.13", 5555), "outbound"),
                 tcp(4, 81, (a, 7000), (b, 41000), "unknown", by="none")]),
        20: (0, [tcp(3, 82, (b, 41000), (a, 7000), "unknown", by="none")]),
    }
    links = {(10, 4): [(20, 3)], (20, 3): [(10, 4)]}
    alias = run(table, links, [10], {}, here=HostAddresses({a}))
    assert [p["pid"] for p in alias["processes"]] == [10]
    assert [r["remote"]["address"] for r in alias["remote_connections"]] == [b]
    everything = run(table, links, [10], {}, here=HostAddresses((), [
        ipaddress.ip_network("127.0.0.0/8")]))
    assert [p["pid"] for p in everything["processes"]] == [10, 20]
    assert everything["remote_connections"] == []
    default = run(table, links, [10], {})  # no addresses given: all of loopback
    assert [p["pid"] for p in default["processes"]] == [10, 20]


def test_session_and_uids_are_read_always_saved_when_selected():
    table, links, attrs = sshd_logins()
    narrow = run(table, links, [301], attrs, fields=("name",))
    assert all("session" not in p and "uids" not in p for p in narrow["processes"])
    assert {p["pid"] for p in narrow["processes"]} == {301, 300, 201, 200, 100, 1}
    wide = run(table, links, [301], attrs, fields=("name", "session", "uids"))
    assert {p["pid"]: p["session"] for p in wide["processes"]}[201] == 200
