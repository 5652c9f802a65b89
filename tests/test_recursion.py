"""stop.recursion: the loop table, this host's addresses, the targets of a
walk, and outcomes saved as linked entries (contract section 3)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from twisted.internet.task import Clock

from stop import wire
from stop.client import Outcome
from stop.config import Config
from stop.errors import ConfigError
from stop.model import Endpoint
from stop.recursion import (HostAddresses, LocalAddresses, LoopTable, Recursion,
                            interface_addresses, linked_entry, targets_of)
from stop.storage.memory import MemoryStore
from stop.testing import FakeRecursiveClient
from stop.interfaces import IRecursiveClient
from zope.interface.verify import verifyObject

T0 = 1764072000.0
TOKEN = "0123456789abcdef0123456789abcdef01234567"
THEIRS = "fedcba9876543210fedcba9876543210fedcba98"


def clock_at(t=T0) -> Clock:
    c = Clock()
    c.advance(t)
    return c


# -- settings ---------------------------------------------------------------

@pytest.mark.parametrize("change", [
    dict(recursion_port=0), dict(recursion_port=65536), dict(recursion_max_outbound=0),
    dict(recursion_max_per_host=0), dict(recursion_max_targets=0), dict(loop_table_size=0),
    dict(recursion_connect_timeout=0), dict(recursion_reply_timeout=-1), dict(loop_window=0),
    dict(loop_window=86401), dict(recursion_max_reply_length=63),
    dict(recursion_max_reply_length=65537), dict(local_addresses=()),
    dict(local_addresses=("auto", "example.org")), dict(local_addresses=("127.0.0.300",)),
])
def test_bad_recursion_settings(change):
    with pytest.raises(ConfigError):
        Config(**change)


def test_recursion_settings_read_from_a_file(tmp_path):
    from stop import config
    p = tmp_path / "stop.conf"
    p.write_text("[stop]\nrecursion_enabled = no\nrecursion_port = 1113\n"
                 "local_addresses = 127.0.0.11 192.0.2.0/24\nloop_window = 2.5\n")
    c = config.load(str(p))
    assert (c.recursion_enabled, c.recursion_port, c.local_addresses, c.loop_window) == (
        False, 1113, ("127.0.0.11", "192.0.2.0/24"), 2.5)


# -- the loop table -----------------------------------------------------------

def test_loop_table_same_sid_requester_and_ports_within_the_window():
    clock = clock_at()
    t = LoopTable(120, 100, clock)
    assert not t.seen(4711, "192.0.2.1", (6193, 23))
    clock.advance(119.9)
    assert t.seen(4711, "192.0.2.1", (6193, 23))
    # any part different: not a loop
    assert not t.seen(4712, "192.0.2.1", (6193, 23))
    assert not t.seen(4711, "192.0.2.2", (6193, 23))
    assert not t.seen(4711, "192.0.2.1", (6193, 24))


def test_loop_table_expires_by_the_clock():
    clock = clock_at()
    t = LoopTable(120, 100, clock)
    t.seen(1, "h", (1, 2))
    clock.advance(60)
    t.seen(2, "h", (1, 2))
    clock.advance(60)  # the first is 120 s old: gone; the second stays
    assert not t.seen(1, "h", (1, 2))
    assert t.seen(2, "h", (1, 2))
    clock.advance(61)
    assert not t.seen(2, "h", (1, 2))
    assert len(t) == 2  # (1,...) seen again at T0+120, (2,...) again now


def test_loop_table_is_bounded_oldest_first():
    clock = clock_at()
    t = LoopTable(120, 3, clock)
    for sid in range(5):
        assert not t.seen(sid, "h", (1, 2))
        clock.advance(1)
    assert len(t) == 3
    assert not t.seen(0, "h", (1, 2))  # pushed out, though within the window
    assert t.seen(4, "h", (1, 2))


def test_loop_table_default_size_hit():
    # the shipped default (16384) holds, then the oldest goes
    c = Config()
    clock = clock_at()
    t = LoopTable(c.loop_window, c.loop_table_size, clock)
    for sid in range(c.loop_table_size + 1):
        t.seen(sid, "h", (1, 2))
    assert len(t) == c.loop_table_size
    assert not t.seen(0, "h", (1, 2))
    assert t.seen(c.loop_table_size, "h", (1, 2))


# -- this host's addresses ------------------------------------------------------

def test_host_addresses():
    h = HostAddresses({"192.0.2.1"}, [ipaddress.ip_network("127.0.0.0/8"),
                                      ipaddress.ip_network("2001:db8::/64")])
    assert "192.0.2.1" in h and "127.0.0.12" in h and "2001:db8::5" in h
    assert "::ffff:127.0.0.1" in h and "fe80::1%eth0" not in h
    assert "192.0.2.2" not in h and "198.51.100.1" not in h and "bogus" not in h


def test_fixed_local_addresses_make_loopback_aliases_hosts():
    la = LocalAddresses(("127.0.0.11",), clock_at(), read=lambda: pytest.fail("not auto"))
    here = la.current()
    assert "127.0.0.11" in here
    assert "127.0.0.12" not in here and "127.0.0.1" not in here and "::1" not in here


def test_auto_reads_the_interfaces_and_rereads_now_and_then():
    clock = clock_at()
    readings = [HostAddresses({"192.0.2.1"}), HostAddresses({"192.0.2.2"})]
    calls = []

    def read():
        calls.append(clock.seconds())
        return readings[min(len(calls) - 1, 1)]

    la = LocalAddresses(("auto", "198.51.100.0/24"), clock, read=read, refresh=60)
    assert "192.0.2.1" in la.current() and "198.51.100.7" in la.current()
    clock.advance(59)
    assert "192.0.2.1" in la.current() and len(calls) == 1
    clock.advance(1)
    here = la.current()
    assert "192.0.2.2" in here and "192.0.2.1" not in here and "198.51.100.7" in here
    assert len(calls) == 2


def test_auto_keeps_the_last_reading_when_reading_fails():
    clock = clock_at()
    state = {"fail": False}

    def read():
        if state["fail"]:
            raise OSError("no netlink")
        return HostAddresses({"192.0.2.1"})

    la = LocalAddresses(("auto",), clock, read=read, refresh=60)
    la.current()
    state["fail"] = True
    clock.advance(61)
    assert "192.0.2.1" in la.current()


def test_interface_addresses_of_this_machine():
    here = interface_addresses()
    assert "127.0.0.1" in here and "127.0.0.11" in here  # lo's whole network
    assert "192.0.2.254" not in here or "192.0.2.254" in here.addresses


def test_default_local_addresses_setting_is_auto():
    assert Config().local_addresses == ("auto",)
    la = LocalAddresses(Config().local_addresses, clock_at())
    assert "127.0.0.42" in la.current()


# -- targets ------------------------------------------------------------------------

def rc(remote, local=("192.0.2.10", 22), direction="inbound", by="listener", pid=10, fd=3):
    return {"family": "AF_INET", "local": {"address": local[0], "port": local[1]},
            "remote": {"address": remote[0], "port": remote[1]}, "direction": direction,
            "direction_by": by, "pid": pid, "fd": fd, "holders": [[pid, fd]]}


def test_targets_are_inbound_and_unknown_to_other_hosts_once_each():
    here = HostAddresses({"192.0.2.10"}, [ipaddress.ip_network("127.0.0.0/8")])
    walk = {"remote_connections": [
        rc(("198.51.100.1", 40000)),
        rc(("198.51.100.2", 40001), direction="unknown", by="none"),
        rc(("198.51.100.3", 22), local=("192.0.2.10", 40002), direction="outbound",
           by="ephemeral-range"),
        rc(("198.51.100.1", 40000), pid=11),  # the same socket, another holder
        rc(("192.0.2.10", 5000)),  # to this host: never a target
        rc(("127.0.0.5", 5000)),
    ]}
    got = targets_of(walk, here)
    assert got == [
        {"address": "198.51.100.1", "port": 40000, "local": {"address": "192.0.2.10", "port": 22},
         "direction": "inbound", "direction_by": "listener"},
        {"address": "198.51.100.2", "port": 40001, "local": {"address": "192.0.2.10", "port": 22},
         "direction": "unknown", "direction_by": "none"},
    ]
    assert targets_of(None, here) == [] and targets_of({}, here) == []


def test_targets_tolerate_walks_without_direction_by():
    walk = {"remote_connections": [{"pid": 1, "fd": 3, "family": "AF_INET",
                                    "local": {"address": "192.0.2.10", "port": 22},
                                    "remote": {"address": "198.51.100.1", "port": 5}}]}
    [t] = targets_of(walk, HostAddresses())
    assert (t["direction"], t["direction_by"]) == ("unknown", "none")


# -- Recursion: plan, ask, save -----------------------------------------------------------

def make(config=None, outcomes=None):
    config = config or Config(local_addresses=("192.0.2.10",))
    clock = clock_at()
    client = FakeRecursiveClient(outcomes)
    store = MemoryStore()
    return Recursion(config, client, store, clock), client, store, clock


SV_REC = wire.Request((40000, 6667), wire.SV_REC, 4711)


def test_plan_statuses():
    r, *_ = make()
    walk = {"remote_connections": [rc(("198.51.100.1", 40000))]}
    assert r.plan(SV_REC, walk)["status"] == "asking"
    assert r.plan(SV_REC, walk)["sid"] == 4711
    assert r.plan(SV_REC, {"remote_connections": []}) == {"sid": 4711, "status": "no-targets",
                                                          "targets": []}
    assert r.plan(SV_REC, None)["status"] == "walk-failed"
    off, *_ = make(Config(recursion_enabled=False))
    assert off.plan(SV_REC, walk) == {"sid": 4711, "status": "disabled", "targets": []}


def test_start_asks_their_port_pair_from_the_local_address_and_saves_outcomes():
    target = Endpoint("198.51.100.1", 113)
    r, client, store, clock = make(outcomes={target: Outcome(
        "token", token=THEIRS, reply=f"40000, 22 : USERID : OTHER : {THEIRS}",
        local=Endpoint("192.0.2.10", 50001), sent=T0 + 1, answered=T0 + 1.5)})
    store.save(TOKEN, b"{}")
    plan = r.plan(SV_REC, {"remote_connections": [rc(("198.51.100.1", 40000))]})
    done = []
    r.start(TOKEN, SV_REC, plan).addCallback(done.append)
    assert done == [None]
    [(where, local, question)] = client.asked
    assert where == target
    assert local.host == "192.0.2.10"
    assert question == wire.Request((40000, 22), wire.SV_REC, 4711)
    [entry] = store.linked(TOKEN)
    assert json.loads(entry) == {
        "version": 1, "kind": "recursion", "of": TOKEN,
        "target": {"address": "198.51.100.1", "port": 113},
        "local": {"address": "192.0.2.10", "port": 50001},
        "request": {"type": "SV_REC", "sid": 4711, "ports": [40000, 22]},
        "sent": "2025-11-25T12:00:01.000000Z", "answered": "2025-11-25T12:00:01.500000Z",
        "outcome": "token", "token": THEIRS, "reply": f"40000, 22 : USERID : OTHER : {THEIRS}"}
    assert entry == json.dumps(json.loads(entry), sort_keys=True,
                               separators=(",", ":")).encode()  # canonical


def test_recursion_port_setting_is_where_questions_go():
    r, client, store, _ = make(Config(local_addresses=("192.0.2.10",), recursion_port=1113))
    store.save(TOKEN, b"{}")
    r.start(TOKEN, SV_REC, r.plan(SV_REC, {"remote_connections": [rc(("198.51.100.1", 9))]}))
    assert client.asked[0][0] == Endpoint("198.51.100.1", 1113)


def test_outcomes_are_saved_when_known_not_before():
    r, client, store, _ = make()
    store.save(TOKEN, b"{}")
    walk = {"remote_connections": [rc(("198.51.100.1", 1)), rc(("198.51.100.2", 2))]}
    done = []
    r.start(TOKEN, SV_REC, r.plan(SV_REC, walk)).addCallback(done.append)
    assert store.linked(TOKEN) == [] and done == []
    client.answer(Outcome("refused", answered=T0), Endpoint("198.51.100.2", 113))
    assert [json.loads(e)["outcome"] for e in store.linked(TOKEN)] == ["refused"]
    client.answer(Outcome("timeout", why="reply timeout", sent=T0))
    assert [json.loads(e)["outcome"] for e in store.linked(TOKEN)] == ["refused", "timeout"]
    assert done == [None]


def test_targets_past_the_budget_are_saved_as_skipped():
    r, client, store, _ = make(Config(local_addresses=("192.0.2.10",), recursion_max_targets=2))
    store.save(TOKEN, b"{}")
    walk = {"remote_connections": [rc((f"198.51.100.{n}", 1000 + n)) for n in range(1, 6)]}
    plan = r.plan(SV_REC, walk)
    assert len(plan["targets"]) == 5  # the record lists every target
    r.start(TOKEN, SV_REC, plan)
    assert len(client.asked) == 2
    entries = [json.loads(e) for e in store.linked(TOKEN)]
    assert [(e["target"]["address"], e["outcome"]) for e in entries] == [
        ("198.51.100.3", "skipped"), ("198.51.100.4", "skipped"), ("198.51.100.5", "skipped")]
    assert entries[0]["why"] == "budget: targets per request (recursion_max_targets)"
    assert entries[0]["request"] == {"type": "SV_REC", "sid": 4711, "ports": [1003, 22]}
    assert entries[0]["sent"] is None and entries[0]["local"] == {"address": "192.0.2.10",
                                                                 "port": None}


def test_default_max_targets_hit():
    r, client, store, _ = make()
    store.save(TOKEN, b"{}")
    n = Config().recursion_max_targets
    walk = {"remote_connections": [rc((f"198.51.100.{k}", 1000 + k)) for k in range(1, n + 3)]}
    r.start(TOKEN, SV_REC, r.plan(SV_REC, walk))
    assert len(client.asked) == n
    assert sum(json.loads(e)["outcome"] == "skipped" for e in store.linked(TOKEN)) == 2


def test_a_failed_save_is_logged_and_harms_nothing():
    r, client, store, _ = make(outcomes={Endpoint("198.51.100.1", 113): Outcome("refused")})
    # the record was never saved: save_linked fails (unknown token)
    done = []
    r.start(TOKEN, SV_REC, r.plan(SV_REC, {"remote_connections": [rc(("198.51.100.1", 1))]})
            ).addCallback(done.append)
    assert done == [None]


def test_linked_entry_keeps_only_the_fields_that_apply():
    e = linked_entry(TOKEN, Endpoint("198.51.100.1", 113), SV_REC,
                     Outcome("userid", opsys="UNIX", user="root", reply="x"))
    assert {k for k in e} == {"version", "kind", "of", "target", "local", "request", "sent",
                              "answered", "outcome", "opsys", "user", "reply"}
    assert e["local"] == {"address": None, "port": None}


def test_is_loop_uses_sid_requester_and_ports():
    r, *_ = make()
    peer = Endpoint("198.51.100.9", 51000)
    assert not r.is_loop(SV_REC, peer)
    assert r.is_loop(SV_REC, Endpoint("198.51.100.9", 52000))  # the requester's port is not part
    assert not r.is_loop(wire.Request((40000, 6667), wire.SV_REC, 4712), peer)


def test_the_daemon_stops_questions_in_flight_before_the_store(tmp_path):
    from stop import tap
    d = tap.build(Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=str(tmp_path),
                         storage="memory"), Clock())
    [rs] = [s for s in d.service if isinstance(s, tap.RecursionService)]
    client = rs.recursion.client
    verifyObject(IRecursiveClient, client)
    rs.startService()
    done = []
    rs.stopService().addCallback(done.append)
    assert done and client.ask(Endpoint("192.0.2.1", 113), Endpoint("", 0), SV_REC
                               ).result.outcome == "skipped"
