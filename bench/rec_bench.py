#!/usr/bin/env python3
"""Recursion figures (issue 9, "Benchmark"), in one run, on this machine.

    .venv/bin/python bench/rec_bench.py [--hops 2,4,8] [--trials 15] [--flood-runs 3]
                                        [--json FILE]

Chains: for each length N, N real ``twistd stop`` daemons on loopback
aliases (127.0.3.1 ... 127.0.3.N, one port, ``local_addresses`` each its
own alias: tests/integration/chain.py), joined by real relays: H1 runs
``nc -s H1 ... | nc``, the origin H0 runs ``sleep | nc`` into H1 ... and
H(N-1)'s relay connects to the victim (127.0.3.100, this process). The
victim asks H(N-1) ``SV`` and ``SV_REC`` with a fresh sid about that same
connection, in turn (which of the two goes first alternates from trial to
trial); a trace of N hosts visits every daemon.
Printed per N, medians and p90 over ``--trials``:

- the reply latency of SV_REC and of SV (the victim's round trip: connect,
  line, reply line), and their ratio: SV_REC is answered like SV, before
  any question goes out, so neither may grow with N;
- the time from the SV_REC request to the last upstream outcome saved
  (the moment H1's linked entry with the answer of H0 is in its store's
  log file, found by reading the new bytes of every host's log every
  millisecond): this one grows with N, one question per hop.

Each trial waits for its last outcome before the next starts (no overlap).

Flood: the DoS test itself (tests/integration/test_recursion_flood.py,
run ``--flood-runs`` times by pytest; it prints its figures as one JSON
line): 10,000 idle connections, then SV_REC with fresh sids at 1,000/s
from one address for 4 s, whose walks find silent, dead and refusing
upstreams. Printed, median over the runs: the daemon's CPU seconds
(utime + stime) from the start of the flood to its end and that per wall
second, its RSS before, with the idle connections, at its peak during
the flood and after; the legitimate ID latencies and the peak outbound
connections against the budget.

Loopback only; as root (the flood raises the open-files limit). Take
``flock /work/coord/bench.lock`` around a run on a shared machine; the load
average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.integration.chain import (Hosts, Victim, token_line, wait_established,  # noqa: E402
                                     wait_listening)
from tests.integration.harness import Daemon, free_port  # noqa: E402
from tests.integration.svtrees import Tree  # noqa: E402

VICTIM = "127.0.3.100"
SAVED_TIMEOUT = 30.0


def alias(i: int) -> str:
    return f"127.0.3.{i + 1}"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Started:
    """``start_daemon`` for :class:`Hosts` outside pytest: the daemons it
    started, each in a directory of its own, stopped by :meth:`stop`."""

    def __init__(self, base: str):
        self.base = base
        self.daemons: list[Daemon] = []

    def __call__(self, settings=None, args=(), **kw) -> Daemon:
        d = Daemon(pathlib.Path(tempfile.mkdtemp(dir=self.base)), settings, args, **kw).start()
        self.daemons.append(d)
        return d

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


class StoreTail:
    """The linked entries a daemon's flat store writes, read as they come
    from the end of its newest log segment."""

    def __init__(self, daemon: Daemon):
        self.dir = os.path.join(daemon.data_dir, "records")
        self.path = None
        self.offset = 0
        self.partial = b""

    def new_linked(self) -> list[dict]:
        segs = sorted(glob.glob(os.path.join(self.dir, "seg-*.log")))
        if not segs:
            return []
        if segs[-1] != self.path:
            self.path, self.offset, self.partial = segs[-1], 0, b""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line.split(b" ", 5)[5]) for line in lines if line.startswith(b"L ")]


class Chain:
    """N daemons and the relays between them, the victim at the end."""

    def __init__(self, n: int, started: Started, tree: Tree):
        self.n = n
        addrs = [alias(i) for i in range(n)]
        self.hosts = Hosts(started, addrs)
        self.victim = Victim(VICTIM)
        # from the victim's end back to the origin: each relay listens
        # before the one behind it connects
        to, to_port = VICTIM, self.victim.port
        for i in range(n - 1, 0, -1):
            here = addrs[i]
            port = free_port((here,))
            tree.spawn(f"nc -l {here} {port} | nc -s {here} {to} {to_port}; true")
            wait_listening(here, port)
            to, to_port = here, port
        tree.spawn(f"sleep 3600 | nc -s {addrs[0]} {to} {to_port}; true")
        self.victim.accept(30)
        wait_established(local=(addrs[-1], self.victim.peer[1]), what="the last hop")
        self.tails = {a: StoreTail(self.hosts[a]) for a in addrs[1:]}
        for t in self.tails.values():
            t.new_linked()  # skip what is there already

    def ask(self, kind: str) -> tuple[float, str]:
        start = time.monotonic()
        reply = self.victim.ask(self.hosts[alias(self.n - 1)], kind)
        took = time.monotonic() - start
        self.victim.query_socket.close()
        return took, token_line(reply, (self.victim.peer[1], self.victim.port))

    def wait_saved(self, sid: int, start: float) -> float:
        """Seconds from ``start`` until every host but the origin has saved
        the outcome of its question with ``sid``."""
        waiting = set(self.tails)
        deadline = start + SAVED_TIMEOUT
        while waiting:
            for a in list(waiting):
                if any(e["request"]["sid"] == sid for e in self.tails[a].new_linked()):
                    waiting.discard(a)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no outcome of sid {sid} on {sorted(waiting)} "
                                   f"after {SAVED_TIMEOUT} s")
            time.sleep(0.001)
        return time.monotonic() - start

    def close(self) -> None:
        self.victim.close()


def chain_figures(n: int, trials: int, base: str) -> dict:
    started, tree = Started(base), Tree()
    try:
        chain = Chain(n, started, tree)
        sv, rec, saved = [], [], []
        chain.ask("SV")  # warm-up: imports, caches, first store writes
        for t in range(trials):
            sid = 1000 * n + t
            # which goes first alternates: the first walk of a pair may
            # rebuild the shared inode index that the second reuses
            for kind in (("SV", "SV_REC") if t % 2 else ("SV_REC", "SV")):
                if kind == "SV":
                    sv.append(chain.ask("SV")[0])
                    continue
                start = time.monotonic()
                rec.append(chain.ask(f"SV_REC : {sid}")[0])
                saved.append(chain.wait_saved(sid, start))
        chain.close()
        logs = chain.hosts.logs()
        if "Traceback" in logs:
            raise RuntimeError(logs)
        return {"hops": n, "sv": sv, "sv_rec": rec, "last_saved": saved}
    finally:
        tree.stop()
        started.stop()


def med(xs) -> float:
    return statistics.median(xs) * 1000


def p90(xs) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] * 1000


def print_chains(results: list[dict]) -> None:
    print(f"{'hops':>4} {'SV ms':>14} {'SV_REC ms':>14} {'REC/SV':>7} {'last saved ms':>16}"
          "   (median / p90)")
    for r in results:
        print(f"{r['hops']:>4} {med(r['sv']):>6.2f} / {p90(r['sv']):>5.2f} "
              f"{med(r['sv_rec']):>6.2f} / {p90(r['sv_rec']):>5.2f} "
              f"{med(r['sv_rec']) / med(r['sv']):>7.2f} "
              f"{med(r['last_saved']):>7.1f} / {p90(r['last_saved']):>6.1f}")
    first, last = results[0], results[-1]
    print(f"SV_REC median at {last['hops']} hops / at {first['hops']} hops: "
          f"{med(last['sv_rec']) / med(first['sv_rec']):.2f} (must not grow with the chain; "
          f"SV's: {med(last['sv']) / med(first['sv']):.2f})")
    print(f"last outcome saved, median per hop: "
          + ", ".join(f"{r['hops']}: {med(r['last_saved']) / r['hops']:.1f} ms"
                      for r in results))


def flood_figures(runs: int) -> list[dict]:
    """Run the DoS test ``runs`` times; its figures, one dict a run."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            "tests/integration/test_recursion_flood.py"],
                           cwd=root, capture_output=True, text=True, timeout=600)
        lines = [line for line in r.stdout.splitlines() if line.startswith("flood: ")]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"the DoS test failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
        out.append(json.loads(lines[-1][len("flood: "):]))
    return out


def print_flood(runs: list[dict]) -> None:
    def m(key):
        return statistics.median(r[key] for r in runs)

    sent = statistics.median(r["flood"]["sent"] for r in runs)
    rate = statistics.median(r["flood"]["rate"] for r in runs)
    print(f"flood ({len(runs)} runs, medians): {sent:.0f} SV_REC at {rate:.0f}/s with "
          f"{runs[0]['idle_connections']} idle connections; daemon CPU {m('daemon_cpu_s'):.2f} s "
          f"in {m('cpu_wall_s'):.1f} s ({100 * m('daemon_cpu_s') / m('cpu_wall_s'):.0f}% of a "
          f"core); RSS KiB before {m('rss_kib_before'):.0f}, idle {m('rss_kib_idle'):.0f}, "
          f"peak {m('rss_kib_peak'):.0f}, after {m('rss_kib_after'):.0f}")
    worst = max(max(r["legit_id_latencies_s"]) for r in runs)
    print(f"legit ID during the flood: worst {worst * 1000:.0f} ms; peak outbound "
          f"{max(r['peak_outbound'] for r in runs)} (budget {runs[0]['budget']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hops", default="2,4,8")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--flood-runs", type=int, default=3, help="0: no flood")
    p.add_argument("--json", help="write every figure to this file")
    a = p.parse_args()
    print(f"load average at start: {loadavg()}")
    out: dict = {"load_start": loadavg()}
    with tempfile.TemporaryDirectory(prefix="rec_bench-") as base:
        out["chains"] = [chain_figures(int(n), a.trials, base) for n in a.hops.split(",")]
        print_chains(out["chains"])
    if a.flood_runs:
        out["flood"] = flood_figures(a.flood_runs)
        print_flood(out["flood"])
    print(f"load average at end: {loadavg()}")
    out["load_end"] = loadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
