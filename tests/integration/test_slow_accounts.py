"""A slow account lookup (NSS stalling on one uid) must not slow the
answers about other uids: a real reactor, its real thread pool, the real
Answerer and Accounts; only the passwd read is replaced, by one that takes
5 s for one uid. Run in a child process (a reactor cannot be restarted)."""

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
reads, threads = [], set()

def read(uid):  # the passwd lookup, in a worker thread
    reads.append(uid)
    threads.add(threading.current_thread().name)
    if uid == SLOW:
        time.sleep(5)
    return (f"u{uid}", f"/home/u{uid}")

conns = [Connection(Endpoint("127.0.0.1", 30000 + i), Endpoint("127.0.0.2", 6667), uid, i + 1, False)
         for i, uid in enumerate([SLOW] + OTHERS)]
store = HeldStore()
store.auto = True
run = in_thread_pool(reactor)
config = Config(account_timeout=30)
answerer = Answerer(config, FakeLookup(*conns), store, reactor, optin=FakeOptIn(),
                    accounts=Accounts.from_config(config, reactor, run, read=read),
                    host_name="h", run=run)
t0 = time.monotonic()
out = {"slow": [], "others": [], "reply_thread": []}

def ask(port, key):
    sent = time.monotonic()
    q = Query(wire.parse_request(f"{port}, 6667".encode()), Endpoint("127.0.0.2", 51000),
              Endpoint("127.0.0.1", 113))
    def done(reply):
        out[key].append({"sent": sent - t0, "latency": time.monotonic() - sent,
                         "ok": b"USERID : OTHER" in reply})
        out["reply_thread"].append(threading.current_thread().name)
    answerer.answer(q).addCallback(done)

def burst(n):
    # Every other uid, n times over: the first round misses (a fast read in
    # a thread), the next ones hit the cache.
    for _ in range(n):
        for i in range(len(OTHERS)):
            ask(30001 + i, "others")

def finish():
    out["reads"] = reads
    out["worker_threads"] = sorted(threads)
    out["elapsed"] = time.monotonic() - t0
    print(json.dumps(out))
    reactor.stop()

def check():
    if len(out["slow"]) == 2 or time.monotonic() - t0 > 25:
        finish()
    else:
        reactor.callLater(0.05, check)

reactor.callWhenRunning(ask, 30000, "slow")             # the stalled uid
reactor.callWhenRunning(lambda: reactor.callLater(0.2, burst, 4))
reactor.callWhenRunning(lambda: reactor.callLater(1.0, ask, 30000, "slow"))  # asked again
reactor.callWhenRunning(lambda: reactor.callLater(2.0, burst, 4))
reactor.callWhenRunning(check)
reactor.run()
'''


def test_a_5_second_account_lookup_does_not_slow_other_uids():
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    others, slow = out["others"], out["slow"]
    # Every query about another uid: answered, promptly, while uid 4242's
    # lookup was stalled (all were sent within its 5 s).
    assert len(others) == 400 and all(o["ok"] for o in others)
    assert all(o["sent"] < 4.5 for o in others)
    assert max(o["latency"] for o in others) < 1.5  # generous: a shared 2-core machine
    # The stalled uid's two queries waited for it, and shared one read.
    assert len(slow) == 2 and all(s["ok"] for s in slow)
    assert all(4.0 < s["sent"] + s["latency"] < 15 for s in slow)
    assert out["reads"].count(4242) == 1
    # One read per other uid (the rest were cache hits), all in worker
    # threads; every reply in the reactor thread.
    assert sorted(set(out["reads"])) == sorted(out["reads"]) and len(out["reads"]) == 51
    assert out["worker_threads"] and "MainThread" not in out["worker_threads"]
    assert set(out["reply_thread"]) == {"MainThread"}
