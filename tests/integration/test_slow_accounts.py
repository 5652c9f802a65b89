"""A slow account lookup (NSS stalling on one uid) must not slow the
answers about other uids: a real reactor, its real thread pool, the real
Answerer and Accounts; only the passwd read is replaced, by one that stalls
for one uid. Run in a child process (a reactor cannot be restarted).

No clock decides the outcome: uid 4242's read is held (at least 5 s, and
until every query about the other uids has been answered). Were those
queries to wait for it, they could never all be answered while it is
held: the read would give up after STALL_MAX seconds, and the test fails
on ``released`` and on the order of the replies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r'''
import json, sys, threading, time
from twisted.internet import reactor
from stop import wire
from stop.answer import Answerer, Query
from stop.config import Config
from stop.model import Connection, Endpoint
from stop.os.accounts import Accounts
from stop.os.common import in_thread_pool
from stop.testing import FakeLookup, FakeOptIn, HeldStore

SLOW, OTHERS = 4242, list(range(5000, 5050))
ROUNDS = 8                  # queries about each other uid: 8 x 50 = 400
STALL_MIN, STALL_MAX = 5.0, 60.0
reads, threads = [], set()
stalled = threading.Event()  # set in the reactor thread once uid 4242's read began
others_done = threading.Event()
out = {"events": [], "slow": [], "others": [], "reply_thread": [], "released": None}

def read(uid):  # the passwd lookup, in a worker thread
    reads.append(uid)
    threads.add(threading.current_thread().name)
    if uid == SLOW:
        began = time.monotonic()
        reactor.callFromThread(started)
        out["released"] = others_done.wait(STALL_MAX)
        time.sleep(max(0.0, STALL_MIN - (time.monotonic() - began)))
        reactor.callFromThread(out["events"].append, "slow read returned")
    return (f"u{uid}", f"/home/u{uid}")

conns = [Connection(Endpoint("127.0.0.1", 30000 + i), Endpoint("127.0.0.2", 6667), uid, i + 1, False)
         for i, uid in enumerate([SLOW] + OTHERS)]
store = HeldStore()
store.auto = True
run = in_thread_pool(reactor)
config = Config(account_timeout=STALL_MAX + 30)
answerer = Answerer(config, FakeLookup(*conns), store, reactor, optin=FakeOptIn(),
                    accounts=Accounts.from_config(config, reactor, run, read=read),
                    host_name="h", run=run)

def ask(port, key):
    q = Query(wire.parse_request(f"{port}, 6667".encode()), Endpoint("127.0.0.2", 51000),
              Endpoint("127.0.0.1", 113))
    def done(reply):
        out[key].append({"ok": b"USERID : OTHER" in reply})
        out["events"].append(key)
        out["reply_thread"].append(threading.current_thread().name)
        if key == "others":
            answered = len(out["others"])
            if answered == ROUNDS * len(OTHERS):
                others_done.set()
            elif answered % len(OTHERS) == 0:
                ask_round(answered // len(OTHERS))
    answerer.answer(q).addCallback(done)

def ask_round(r):
    # Every other uid once; the next round when this one is answered (the
    # lookup gate holds max_lookups + lookup_queue queries at a time). The
    # first round misses the cache (a read each), the rest hit it.
    if r == 1:
        ask(30000, "slow")  # 4242 again: shares the read in flight
    for i in range(len(OTHERS)):
        ask(30001 + i, "others")

def started():
    # uid 4242's read is now stalled in a worker thread.
    ask_round(0)

def check():
    if len(out["slow"]) == 2 or time.monotonic() - t0 > STALL_MAX + 20:
        out["reads"] = reads
        out["worker_threads"] = sorted(threads)
        print(json.dumps(out))
        reactor.stop()
    else:
        reactor.callLater(0.05, check)

t0 = time.monotonic()
reactor.callWhenRunning(ask, 30000, "slow")             # the stalled uid
reactor.callWhenRunning(check)
reactor.run()
'''


def test_a_5_second_account_lookup_does_not_slow_other_uids():
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    others, slow, events = out["others"], out["slow"], out["events"]
    # Every query about another uid was answered while uid 4242's read was
    # stalled: the read was released by the last of them, not by its cap.
    assert out["released"] is True
    assert len(others) == 400 and all(o["ok"] for o in others)
    assert events.index("slow read returned") > max(i for i, e in enumerate(events) if e == "others")
    # The stalled uid's two queries waited for it, and shared one read.
    assert len(slow) == 2 and all(s["ok"] for s in slow)
    assert [e for e in events if e != "others"] == ["slow read returned", "slow", "slow"]
    assert out["reads"].count(4242) == 1
    # One read per other uid (the rest were cache hits), all in worker
    # threads; every reply in the reactor thread.
    assert sorted(set(out["reads"])) == sorted(out["reads"]) and len(out["reads"]) == 51
    assert out["worker_threads"] and "MainThread" not in out["worker_threads"]
    assert set(out["reply_thread"]) == {"MainThread"}
