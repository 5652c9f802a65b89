"""stop.answer with recursion (spec 6): the reply first, then the questions;
targets in the hashed record, outcomes as linked entries; loops; the
per-requester budget; ID_REC's walk; nothing upstream reaches the requester."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from stop import wire
from stop.answer import Answerer, Query
from stop.client import Outcome
from stop.config import Config
from stop.model import Connection, Endpoint
from stop.recursion import Recursion
from stop.testing import (FakeAccounts, FakeLookup, FakeProcessState, FakeRecursiveClient,
                          HeldStore)

HERE, PEER, OTHER_PEER = "192.0.2.10", "198.51.100.20", "198.51.100.21"
PREV = "203.0.113.5"  # the previous host: the walk's inbound connection comes from it
OUT = Connection(Endpoint(HERE, 40000), Endpoint(PEER, 6667), uid=1000, inode=77, accepted=False)
TOKEN_LINE = rb"40000, 6667 : USERID : OTHER : ([0-9a-f]{40})\r\n"
THEIRS = "fedcba9876543210fedcba9876543210fedcba98"
INBOUND = {"family": "AF_INET", "local": {"address": HERE, "port": 22},
           "remote": {"address": PREV, "port": 51515}, "direction": "inbound",
           "direction_by": "listener", "pid": 10, "fd": 4, "holders": [[10, 4]]}
OUTBOUND = {**INBOUND, "remote": {"address": "203.0.113.6", "port": 22},
            "local": {"address": HERE, "port": 41000}, "direction": "outbound",
            "direction_by": "ephemeral-range"}


class Setup:
    def __init__(self, config=None, outcomes=None, auto=True, **walk):
        self.config = config or Config(local_addresses=(HERE,))
        self.store = HeldStore()
        self.store.auto = auto
        self.clock = Clock()
        self.clock.advance(1764072000)
        self.client = FakeRecursiveClient(outcomes)
        walk.setdefault("remote", (INBOUND, OUTBOUND))
        self.walk = FakeProcessState(**walk)
        self.recursion = Recursion(self.config, self.client, self.store, self.clock)
        conns = (OUT, Connection(Endpoint(HERE, 40001), Endpoint(OTHER_PEER, 6667), 1000, 78,
                                 False))
        self.answerer = Answerer(self.config, FakeLookup(*conns), self.store, self.clock,
                                 accounts=FakeAccounts({1000: ("alice", "/home/alice")}),
                                 host_name="h1", process_state=self.walk,
                                 recursion=self.recursion)
        self.events = []
        self.answerer.log = Logger(observer=self.events.append)

    def ask(self, line, requester=PEER):
        out = []
        self.answerer.answer(Query(wire.parse_request(line), Endpoint(requester, 51000),
                                   Endpoint(HERE, 113))).addBoth(out.append)
        return out

    def record(self, token):
        return json.loads(self.store.saved[token])

    def entries(self, token):
        return [json.loads(e) for e in self.store.linked(token)]

    def logs(self):
        return [formatEvent(e) for e in self.events]


def token_of(reply: bytes) -> str:
    m = re.fullmatch(TOKEN_LINE, reply)
    assert m, reply
    return m.group(1).decode()


def test_sv_rec_reply_first_then_the_questions():
    s = Setup(auto=False, outcomes={Endpoint(PREV, 113): Outcome("token", token=THEIRS)})
    out = s.ask(b"40000, 6667 : SV_REC : 4711")
    assert out == [] and s.client.asked == []  # nothing before the record is durable
    s.store.complete()
    token = token_of(out[0])
    assert s.client.asked == []  # the reply is formed and handed on: still no question
    s.clock.advance(0)
    [(target, local, question)] = s.client.asked
    assert target == Endpoint(PREV, 113)
    assert local.host == HERE  # from the local address of that connection
    assert question == wire.Request((51515, 22), wire.SV_REC, 4711)
    # SV_REC: the token is the hash of the record, which lists its targets
    rec = s.record(token)
    assert hashlib.sha1(s.store.saved[token]).hexdigest() == token
    assert rec["recursion"] == {"sid": 4711, "status": "asking", "targets": [
        {"address": PREV, "port": 51515, "local": {"address": HERE, "port": 22},
         "direction": "inbound", "direction_by": "listener"}]}
    assert "processes" in rec and "system" in rec
    assert s.entries(token) == [] and len(s.store.pending_linked) == 1  # saved when durable
    s.store.complete()
    [entry] = s.entries(token)
    assert (entry["of"], entry["outcome"], entry["token"]) == (token, "token", THEIRS)
    # the record never changed
    assert hashlib.sha1(s.store.saved[token]).hexdigest() == token


def test_id_rec_saves_an_id_record_but_walks_for_the_targets():
    s = Setup()
    token = token_of(s.ask(b"40000, 6667 : ID_REC : 5")[0])
    rec = s.record(token)
    assert len(s.walk.calls) == 1
    assert "processes" not in rec and "system" not in rec
    assert hashlib.sha1(s.store.saved[token]).hexdigest() != token  # a random token
    assert [t["address"] for t in rec["recursion"]["targets"]] == [PREV]
    s.clock.advance(0)
    assert s.client.asked[0][2] == wire.Request((51515, 22), wire.ID_REC, 5)


def test_no_targets_asks_no_one():
    s = Setup(remote=[OUTBOUND])
    token = token_of(s.ask(b"40000, 6667 : SV_REC : 1")[0])
    s.clock.advance(0)
    assert s.record(token)["recursion"]["status"] == "no-targets"
    assert s.client.asked == [] and s.store.linked(token) == []


def test_loop_gets_a_random_token_is_not_processed_and_is_logged():
    s = Setup()
    first = token_of(s.ask(b"40000, 6667 : SV_REC : 4711")[0])
    s.clock.advance(119)
    again = s.ask(b"40000, 6667 : SV_REC : 4711")
    second = token_of(again[0])
    assert second != first and second not in s.store.saved
    assert len(s.walk.calls) == 1 and len(s.store.saved) == 1
    assert any("loop" in t and "not processed" in t for t in s.logs())
    # the same shape of reply as any SV: nothing tells the requester
    assert re.fullmatch(TOKEN_LINE, again[0])
    # after the window: processed again
    s.clock.advance(1)
    token_of(s.ask(b"40000, 6667 : SV_REC : 4711")[0])
    assert len(s.walk.calls) == 2


def test_not_a_loop_when_sid_requester_or_ports_differ():
    s = Setup()
    s.ask(b"40000, 6667 : SV_REC : 4711")
    s.ask(b"40000, 6667 : SV_REC : 4712")
    s.ask(b"40001, 6667 : SV_REC : 4711", requester=OTHER_PEER)
    s.ask(b"40000, 6667 : ID_REC : 4711")  # the type is not part of the key: a loop
    assert len(s.walk.calls) == 3


def test_loop_window_setting():
    s = Setup(Config(local_addresses=(HERE,), loop_window=5))
    s.ask(b"40000, 6667 : SV_REC : 1")
    s.clock.advance(5)
    s.ask(b"40000, 6667 : SV_REC : 1")
    assert len(s.walk.calls) == 2


def test_per_requester_budget():
    s = Setup(Config(local_addresses=(HERE,), recursion_max_per_requester=2), hold=True)
    a, b = s.ask(b"40000, 6667 : SV_REC : 1"), s.ask(b"40000, 6667 : SV_REC : 2")
    c = s.ask(b"40000, 6667 : SV_REC : 3")
    assert c == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    # another address is not held back; a plain SV from the same one neither
    d = s.ask(b"40001, 6667 : SV_REC : 3", requester=OTHER_PEER)
    e = s.ask(b"40000, 6667 : SV")
    assert len(s.walk.held) == 4
    s.walk.release()
    assert all(len(x) == 1 for x in (a, b, d, e))
    f = s.ask(b"40000, 6667 : SV_REC : 4")  # places free again
    s.walk.release()
    token_of(f[0])


def test_per_requester_default_is_hit():
    s = Setup(hold=True)
    n = Config().recursion_max_per_requester
    for sid in range(n):
        s.ask(b"40000, 6667 : SV_REC : %d" % sid)
    assert s.ask(b"40000, 6667 : SV_REC : 99") == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    s2 = Setup(Config(local_addresses=(HERE,), errors="token"), hold=True)
    for sid in range(n):
        s2.ask(b"40000, 6667 : SV_REC : %d" % sid)
    token_of(s2.ask(b"40000, 6667 : SV_REC : 99")[0])
    assert len(s2.walk.held) == n


def test_upstream_that_never_answers_delays_no_one():
    s = Setup()  # the fake client holds every question until told
    replies = [s.ask(b"40000, 6667 : SV_REC : %d" % sid) for sid in range(3)]
    s.clock.advance(0)
    assert all(len(r) == 1 for r in replies)
    assert len(s.client.pending) == 3
    assert token_of(s.ask(b"40000, 6667")[0])  # an ID meanwhile: answered at once
    s.client.answer(Outcome("timeout", why="reply timeout"))
    token = token_of(replies[0][0])
    assert s.entries(token)[0]["outcome"] == "timeout"


def test_nothing_upstream_reaches_the_requester():
    theirs = {Endpoint(PREV, 113): Outcome("token", token=THEIRS,
                                           reply=f"51515, 22 : USERID : OTHER : {THEIRS}")}
    for outcome in (theirs, {Endpoint(PREV, 113): Outcome("error", error="NO-USER")}, {}):
        s = Setup(outcomes=outcome)
        for line in (b"40000, 6667 : SV_REC : 7", b"40000, 6667 : ID_REC : 8"):
            out = s.ask(line)
            s.clock.advance(0)
            assert re.fullmatch(TOKEN_LINE, out[0])
            assert THEIRS.encode() not in out[0] and b"NO-USER" not in out[0]


def test_sv_rec_walk_failure_is_an_error_like_sv_id_rec_still_answers():
    s = Setup(fail=True)
    assert s.ask(b"40000, 6667 : SV_REC : 1") == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    token = token_of(s.ask(b"40000, 6667 : ID_REC : 2")[0])
    assert s.record(token)["recursion"] == {"sid": 2, "status": "walk-failed", "targets": []}


def test_disabled_answers_like_id_and_sv():
    s = Setup(Config(local_addresses=(HERE,), recursion_enabled=False))
    token = token_of(s.ask(b"40000, 6667 : SV_REC : 1")[0])
    rec = s.record(token)
    assert rec["recursion"] == {"sid": 1, "status": "disabled", "targets": []}
    assert "processes" in rec and hashlib.sha1(s.store.saved[token]).hexdigest() == token
    s.clock.advance(0)
    assert s.client.asked == []


def test_over_quota_sv_rec_saves_id_size_with_targets():
    s = Setup(Config(local_addresses=(HERE,), quota_mb=1))
    s.store.bytes_used = 2**20
    token = token_of(s.ask(b"40000, 6667 : SV_REC : 1")[0])
    rec = s.record(token)
    assert rec["quota"] == "reached" and "processes" not in rec
    assert rec["recursion"]["status"] == "asking"


def test_store_failure_gives_no_token_and_asks_no_one():
    s = Setup(auto=False)
    out = s.ask(b"40000, 6667 : SV_REC : 1")
    s.store.fail()
    s.clock.advance(0)
    assert out == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    assert s.client.asked == []


def test_no_such_connection_is_no_user_and_asks_no_one():
    s = Setup()
    assert s.ask(b"40005, 6667 : SV_REC : 1") == [b"40005, 6667 : ERROR : NO-USER\r\n"]
    s.clock.advance(0)
    assert s.client.asked == [] and s.walk.calls == []


@pytest.mark.parametrize("line", [b"40000, 6667 : SV_REC : 9 : 198.51.100.20",
                                  b"40000, 6667 : ID_REC : 9 : 198.51.100.20"])
def test_address_form_recursion(line):
    s = Setup()
    token = token_of(s.ask(line, requester="203.0.113.99")[0])
    s.clock.advance(0)
    assert s.record(token)["recursion"]["status"] == "asking" and len(s.client.asked) == 1
