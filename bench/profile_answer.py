"""Where the daemon's CPU per query goes, without the network: the CPU
cost of one ``Answerer.answer()`` (memory store, the real netlink lookup,
the configured log line going to a file), and the same with one part at a
time taken out, so each part's share is a difference of two measurements.
Optionally a cProfile of the whole (process-time timer).

Run as root (the looked-up connections belong to nobody):

    .venv/bin/python bench/profile_answer.py [--sockets 1000] [--cprofile]

The answerer is built as ``stop.tap`` builds it (account and ``~/.ident``
caches). The variants replace internals on purpose (this is a diagnostic, not a
test): "no listener check" makes the lookup's accepted-socket check answer
False without asking the kernel; "no log line" makes Answerer._log do
nothing; "user_optin = no" is the setting.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

import compare_oidentd  # noqa: E402
from stop import config as config_mod, wire  # noqa: E402
from stop.logsetup import TextLogObserver  # noqa: E402
from stop.answer import Answerer, Query  # noqa: E402
from stop.os.linux.lookup import NetlinkLookup  # noqa: E402
from stop.model import Endpoint  # noqa: E402
from stop.optin import OptIn  # noqa: E402
from stop.os.accounts import Accounts  # noqa: E402
from stop.os.common import synchronously  # noqa: E402
from stop.storage.memory import MemoryStore  # noqa: E402

ROUNDS, PER_ROUND, WARM = 7, 2000, 300


def make(pairs, overrides=None, listener_check=True, log_line=True):
    """An answerer and a function answering n queries with it."""
    config = config_mod.load(None, overrides or {})
    store = MemoryStore()
    store.open()
    lookup = NetlinkLookup()
    if not listener_check:
        lookup.listening = lambda *a: False
    # As stop.tap builds it: the account and ~/.ident caches (misses read
    # at once here: a Clock runs them inline), so a repeated uid costs what
    # it costs in the daemon.
    clock = Clock()
    answerer = Answerer(config, lookup, store, clock,
                        accounts=Accounts.from_config(config, clock, synchronously),
                        optin=OptIn.from_config(config, clock, synchronously))
    if not log_line:
        answerer._log = lambda *a, **k: None
    queries = [Query(wire.parse_request(b"%d, %d" % p), Endpoint(compare_oidentd.REQUESTER, 40000),
                     Endpoint(compare_oidentd.THIS, 113)) for p in pairs]
    replies = []

    def go(n: int) -> None:
        for i in range(n):
            answerer.answer(queries[i % len(queries)]).addCallback(replies.append)

    go(WARM)
    assert replies and b"USERID" in replies[-1], replies[-1:]
    return go


def cpu_us(variants) -> list[float]:
    """Best of ROUNDS for each variant: CPU microseconds per answered
    query. The variants take turns within each round (the reverse order
    every other round), so a slow phase of the machine hits them alike."""
    best = [float("inf")] * len(variants)
    order = list(range(len(variants)))
    for r in range(ROUNDS):
        for i in (order if r % 2 == 0 else order[::-1]):
            go = variants[i]
            t0 = time.process_time()
            go(PER_ROUND)
            best[i] = min(best[i], (time.process_time() - t0) / PER_ROUND * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--cprofile", action="store_true", help="also print a cProfile of the whole")
    ap.add_argument("--sort", default="cumulative", help="cProfile order (cumulative, tottime)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("profile_answer: run as root", file=sys.stderr)
        return 2
    compare_oidentd.raise_nofile()
    log = tempfile.NamedTemporaryFile("w", prefix="stop-profile-", suffix=".log")
    # The daemon's observer for twistd's lines (stop.tap sets it for twistd).
    globalLogBeginner.beginLoggingTo([TextLogObserver(log)], redirectStandardIO=False)
    holders = compare_oidentd.Holders()
    try:
        pairs = holders.grow(a.sockets)
        whole = make(pairs)
        variants = [
            ("whole answer() (memory store)", whole),
            ("without the listener check", make(pairs, listener_check=False)),
            ("with user_optin = no", make(pairs, {"user_optin": False})),
            ("without the log line", make(pairs, log_line=False)),
            ("without all three", make(pairs, {"user_optin": False}, False, False)),
        ]
        print(f"CPU per ID query in Answerer.answer(), {a.sockets} connections held by nobody, "
              f"best of {ROUNDS} x {PER_ROUND}, "
              f"the variants taking turns:")
        costs = cpu_us([go for _, go in variants])
        for (label, _), us in zip(variants, costs):
            print(f"  {label:34s} {us:7.1f} us   (saves {costs[0] - us:6.1f} us)")
        if a.cprofile:
            prof = cProfile.Profile(time.process_time)
            prof.enable()
            whole(PER_ROUND)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(a.sort).print_stats(30)
            print(out.getvalue())
    finally:
        holders.stop()
        log.close()  # (and removed: the observer still holds it at exit otherwise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
