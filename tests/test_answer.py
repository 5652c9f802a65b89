"""stop.answer: outcomes, policies, opt-in, quota, durability order."""

import json
import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from stop import wire
from stop.answer import Answerer, Query
from stop.config import Config
from stop.errors import LookupFailed
from stop.interfaces import IAccounts, IOptIn, IRecordStore, ISocketLookup
from stop.model import Connection, Endpoint
from stop.testing import FakeAccounts, FakeLookup, FakeOptIn, HeldStore

HERE = "127.0.0.1"
PEER = "127.0.0.2"
OUT = Connection(Endpoint(HERE, 40000), Endpoint(PEER, 6667), uid=1000, inode=77, accepted=False)
SERVICE = Connection(Endpoint(HERE, 22), Endpoint(PEER, 50000), uid=0, inode=78, accepted=True)
TOKEN_RE = rb"[0-9a-f]{40}"


def make(config=None, optin=None, conns=(OUT, SERVICE), auto=True):
    store = HeldStore()
    store.auto = auto
    clock = Clock()
    clock.advance(1764072000)
    a = Answerer(config or Config(), FakeLookup(*conns), store, clock,
                 optin=optin or FakeOptIn(),
                 accounts=FakeAccounts({1000: ("alice", "/home/alice"), 0: ("root", "/root")}),
                 host_name="h1")
    return a, store


def ask(a, line, requester=PEER):
    results = []
    req = wire.parse_request(line)
    a.answer(Query(req, Endpoint(requester, 51000), Endpoint(HERE, 113))).addBoth(results.append)
    return results


def test_doubles_provide_the_interfaces():
    verifyObject(ISocketLookup, FakeLookup())
    verifyObject(IRecordStore, HeldStore())
    verifyObject(IAccounts, FakeAccounts())
    verifyObject(IOptIn, FakeOptIn())


def test_a_slow_account_delays_only_its_own_queries():
    """uid 1000's account is not cached and resolves late (NSS stalls):
    its query waits for it; a query about another uid meanwhile does not."""
    other = Connection(Endpoint(HERE, 40002), Endpoint(PEER, 6667), uid=0, inode=79, accepted=False)
    a, store = make(conns=(OUT, other))
    a._accounts.slow = {1000}
    slow = ask(a, b"40000, 6667")
    fast = ask(a, b"40002, 6667")
    assert slow == [] and re.fullmatch(rb"40002, 6667 : USERID : OTHER : " + TOKEN_RE + rb"\r\n", fast[0])
    a._accounts.release()
    assert re.fullmatch(rb"40000, 6667 : USERID : OTHER : " + TOKEN_RE + rb"\r\n", slow[0])
    names = sorted(json.loads(r)["user"]["name"] for r in store.saved.values())
    assert names == ["alice", "root"]


class BlockingLookup(FakeLookup):
    blocking = True


def test_a_blocking_lookup_runs_where_the_answerer_is_told():
    ran = []

    def run(f, *args):
        ran.append(f.__name__)
        return defer.maybeDeferred(f, *args)
    for lookup, want in ((FakeLookup(OUT), []), (BlockingLookup(OUT), ["_connection"])):
        store = HeldStore()
        store.auto = True
        a = Answerer(Config(), lookup, store, Clock(), optin=FakeOptIn(),
                     accounts=FakeAccounts({1000: ("alice", "/home/alice")}), host_name="h1",
                     run=run)
        assert b"USERID : OTHER" in ask(a, b"40000, 6667")[0]
        assert b"NO-USER" in ask(a, b"40009, 6667")[0]
        assert ran == want * 2
        ran.clear()


def test_token_after_durable_save_and_record_content():
    a, store = make(auto=False)
    out = ask(a, b"40000, 6667")
    assert out == []  # nothing is sent before the record is durable
    assert len(store.pending) == 1
    store.complete()
    m = re.fullmatch(rb"40000, 6667 : USERID : OTHER : (" + TOKEN_RE + rb")\r\n", out[0])
    assert m
    rec = json.loads(store.saved[m.group(1).decode()])
    assert rec["user"] == {"uid": 1000, "name": "alice"}
    assert rec["connection"]["local"] == {"address": HERE, "port": 40000}
    assert rec["connection"]["remote"] == {"address": PEER, "port": 6667}
    assert rec["requester"] == {"address": PEER, "port": 51000}
    assert rec["request"] == {"type": "ID", "sid": None, "ports": [40000, 6667], "address": None}
    assert rec["time"] == "2025-11-25T12:00:00.000000Z"
    assert rec["host"] == "h1" and rec["type"] == "ID"
    # the token carries nothing of the request
    assert b"40000" not in m.group(1) and b"1000" not in m.group(1)


def test_tokens_are_fresh_and_same_length():
    a, store = make()
    toks = {ask(a, b"40000, 6667")[0] for _ in range(20)}
    assert len(toks) == 20


def test_store_failure_gives_no_token():
    a, store = make(auto=False)
    out = ask(a, b"40000, 6667")
    store.fail()
    assert out == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    assert store.saved == {}


@pytest.mark.parametrize("line,reply", [
    (b"40001, 6667", b"40001, 6667 : ERROR : NO-USER\r\n"),
    (b"22, 50000", b"22, 50000 : ERROR : NO-USER\r\n"),  # accepted: a service's socket
])
def test_no_user(line, reply):
    a, store = make()
    assert ask(a, line) == [reply]
    assert store.saved == {}


def test_the_connection_meant_is_local_p1_and_requester_p2():
    a, store = make()
    assert ask(a, b"40000, 6667", requester="127.0.0.3") == [b"40000, 6667 : ERROR : NO-USER\r\n"]
    assert a._lookup.calls[-1] == (Endpoint(HERE, 40000), Endpoint("127.0.0.3", 6667))


@pytest.mark.parametrize("policy,expected", [
    ("normal", rb"40001, 6667 : ERROR : NO-USER\r\n"),
    ("unknown", rb"40001, 6667 : ERROR : UNKNOWN-ERROR\r\n"),
    ("token", rb"40001, 6667 : USERID : OTHER : " + TOKEN_RE + rb"\r\n"),
])
def test_error_policies(policy, expected):
    a, store = make(Config(errors=policy))
    assert re.fullmatch(expected, ask(a, b"40001, 6667")[0])
    assert store.saved == {}


def test_lookup_failure_is_unknown_error():
    a, store = make()
    a._lookup.error = LookupFailed("netlink said EPERM")
    assert ask(a, b"40000, 6667") == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]


def test_unexpected_exception_is_logged_and_unknown_error():
    a, store = make()
    a._lookup.error = ZeroDivisionError("bug")
    assert ask(a, b"40000, 6667") == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]


@pytest.mark.parametrize("line", [b"40000, 6667 : ID : 127.0.0.2", b"40001, 6667 : ID : 127.0.0.2",
                                  b"22, 50000 : ID : 127.0.0.2", b"40000, 6667 : ID : [::1]"])
def test_address_form_gives_tokens_only(line):
    a, store = make(Config(errors="normal"))
    out = ask(a, line, requester="198.51.100.9")
    assert re.fullmatch(rb"\d+, \d+ : USERID : OTHER : " + TOKEN_RE + rb"\r\n", out[0])


def test_address_form_looks_up_any_local_address_and_saves():
    a, store = make()
    ask(a, b"40000, 6667 : ID : 127.0.0.2", requester="198.51.100.9")
    assert a._lookup.calls[-1] == (Endpoint("", 40000), Endpoint(PEER, 6667))
    (rec,) = [json.loads(v) for v in store.saved.values()]
    assert rec["request"]["address"] == PEER
    assert rec["requester"]["address"] == "198.51.100.9"


def test_address_form_allowlist():
    a, store = make(Config(address_form=("192.0.2.0/24",)))
    out = ask(a, b"40000, 6667 : ID : 127.0.0.2", requester="198.51.100.9")
    assert re.fullmatch(rb"40000, 6667 : USERID : OTHER : " + TOKEN_RE + rb"\r\n", out[0])
    assert store.saved == {} and a._lookup.calls == []  # nothing looked up or saved
    ask(a, b"40000, 6667 : ID : 127.0.0.2", requester="192.0.2.5")
    assert len(store.saved) == 1


def test_optin_sends_the_name_for_id_only():
    optin = FakeOptIn({(1000, PEER)})
    a, store = make(optin=optin)
    assert ask(a, b"40000, 6667") == [b"40000, 6667 : USERID : UNIX : alice\r\n"]
    assert len(store.saved) == 1  # the record is kept all the same
    for line in (b"40000, 6667 : SV", b"40000, 6667 : ID_REC : 5"):
        assert re.fullmatch(rb".* : USERID : OTHER : " + TOKEN_RE + rb"\r\n", ask(a, line)[0])
    a2, _ = make(Config(user_optin=False), optin=optin)
    assert b"OTHER" in ask(a2, b"40000, 6667")[0]


def test_optin_not_listed_gets_token():
    a, store = make(optin=FakeOptIn({(1000, "192.0.2.1")}))
    assert b"USERID : OTHER" in ask(a, b"40000, 6667")[0]


def test_queue_full_is_unknown_error_and_nothing_saved():
    a, store = make(Config(max_lookups=1, lookup_queue=1), auto=False)
    first, second, third = (ask(a, b"40000, 6667") for _ in range(3))
    assert third == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
    assert first == second == []
    store.complete()  # first done; second now runs
    store.complete()
    assert len(store.saved) == 2 and first and second
    a2, store2 = make(Config(max_lookups=1, lookup_queue=0, errors="token"), auto=False)
    ask(a2, b"40000, 6667")
    assert re.fullmatch(rb".* : USERID : OTHER : " + TOKEN_RE + rb"\r\n", ask(a2, b"40000, 6667")[0])
    assert len(store2.pending) == 1


def test_every_outcome_gives_the_gate_place_back():
    """One place, no queue: after each way a query can end (a token, NO-USER,
    a lookup error, a bug, a failed save, an opt-in's name), the next query
    still gets the place, and none is held at the end."""
    a, store = make(Config(max_lookups=1, lookup_queue=0),
                    optin=FakeOptIn({(1000, PEER)}), auto=False)

    def answered(line, finish=None):
        out = ask(a, line)
        if finish is not None:
            assert out == [] and a._gate.running == 1
            finish()
        assert len(out) == 1 and a._gate.running == 0
        return out[0]
    assert b"USERID : UNIX : alice" in answered(b"40000, 6667", store.complete)
    assert b"NO-USER" in answered(b"40001, 6667")
    for error in (LookupFailed("netlink said EPERM"), ZeroDivisionError("bug")):
        a._lookup.error = error
        assert ask(a, b"40000, 6667") == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"]
        assert a._gate.running == 0
    a._lookup.error = None
    out = ask(a, b"40000, 6667")
    store.fail()
    assert out == [b"40000, 6667 : ERROR : UNKNOWN-ERROR\r\n"] and a._gate.running == 0
    assert b"USERID : OTHER" in answered(b"40000, 6667 : ID : " + PEER.encode(), store.complete)


def test_quota_reached_is_noted_and_still_answers():
    a, store = make(Config(quota_mb=1))
    store.bytes_used = 2**20
    out = ask(a, b"40000, 6667")
    assert b"USERID : OTHER" in out[0]
    (rec,) = [json.loads(v) for v in store.saved.values()]
    assert rec["quota"] == "reached"


def test_recursive_types_without_recursion_say_so():
    # An answerer built without a Recursion (tests, tools): the record says
    # "disabled" (the daemon always has one: tests/test_answer_recursion.py).
    a, store = make()
    ask(a, b"40000, 6667 : ID_REC : 99")
    (rec,) = [json.loads(v) for v in store.saved.values()]
    assert rec["request"]["sid"] == 99
    assert rec["recursion"] == {"sid": 99, "status": "disabled", "targets": []}


def test_sha256_makes_64_char_tokens():
    a, store = make(Config(hash="sha256", errors="token"))
    for line in (b"40000, 6667", b"40001, 6667"):
        assert re.fullmatch(rb".* : USERID : OTHER : [0-9a-f]{64}\r\n", ask(a, line)[0])


def _messages(a):
    from twisted.logger import Logger, formatEvent
    events = []
    a.log = Logger(observer=events.append)
    return events, formatEvent


def test_one_log_line_per_query_and_log_users_setting():
    for log_users, shown in ((True, True), (False, False)):
        a, store = make(Config(log_users=log_users))
        events, fmt = _messages(a)
        ask(a, b"40000, 6667")
        ask(a, b"40001, 6667")
        texts = [fmt(e) for e in events]
        assert len(texts) == 2
        assert "127.0.0.2:51000 asked 40000, 6667 ID" in texts[0] and "uid 1000" in texts[0]
        assert ("alice" in texts[0]) is shown
        assert "NO-USER" in texts[1]
