"""How many function calls a query costs: the live daemon and a floor
server side by side under the same ID load, each run under cProfile, with
the calls per query of every function, stop's own code, Twisted, the
standard library and the built-ins apart.

Run as root with the ``.venv`` interpreter; everything is on loopback:

    .venv/bin/python bench/call_counts.py [--kinds stop chained] [--clients 50]

``stop`` runs as ``compare_oidentd.py`` runs it, through twistd's own
``--profile --profiler=cprofile``; a floor (``floor``, ``minimal`` =
floor+d, ``chained`` = floor+dc, ``store`` = floor+st, ``duties`` =
floor+dcq, ``store-duties`` = floor+stq) runs as
``hot_bench.py --floor`` runs it, under ``python -m cProfile``. 1,000
established connections held by nobody, ``--queries`` queries from the C
load generator; the counts cover the whole process life (start-up is a
few thousand calls, under 1 % of a run), divided by the replies.

Counts, not times: a count is exact and the same on any machine, where
cProfile's times are inflated by its own cost per call (several times
the real figure for small functions). A function stop calls and the floor
does not, or calls more often, is per-query work the floor shows can go;
the same count costing more CPU (``kernel_profile.py --perf``) is work
done inside the calls.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import compare_oidentd as co  # noqa: E402
from cloadgen import CLoadgen  # noqa: E402
from tests.integration.harness import Daemon  # noqa: E402

KINDS = ("stop", "floor", *co.FloorServer.OPTIONS)


class ProfiledStop(co.StopServer):
    """The daemon under twistd's cProfile; the stats are written at exit."""

    def __init__(self, workdir: pathlib.Path, stats: pathlib.Path):
        self.daemon = Daemon(workdir, co.STOP_SETTINGS, interfaces=(co.THIS,),
                             twistd_args=[f"--profile={stats}", "--profiler=cprofile",
                                          "--savestats"])
        self.port = self.daemon.port


class ProfiledFloor(co.FloorServer):
    """A floor server under ``python -m cProfile``; SIGINT stops its
    reactor, and the stats are written as the script returns."""

    def __init__(self, workdir: pathlib.Path, kind: str, stats: pathlib.Path):
        super().__init__(workdir, None if kind == "floor" else kind)
        self.stats = stats

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cProfile", "-o", str(self.stats),
               os.path.join(ROOT, "bench", "floor_server.py"), "--interface", co.THIS] + self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)


def where(path: str) -> str:
    """Which part of the code a pstats file name is in."""
    if path == "~":
        return "built-in"
    if os.sep + "stop" + os.sep in path and "site-packages" not in path:
        return "stop"
    if os.sep + "bench" + os.sep in path:
        return "bench"
    if os.sep + "twisted" + os.sep in path:
        return "twisted"
    return "other"


def short(path: str, line: int, name: str) -> str:
    if path == "~":
        return name
    tail = path.split("site-packages" + os.sep)[-1]
    if tail == path:
        tail = os.path.relpath(path, ROOT) if path.startswith(ROOT) else os.path.basename(path)
    return f"{tail}:{line}({name})"


def per_query(stats_file: pathlib.Path, replies: int) -> dict[str, tuple[str, float]]:
    """{function: (part, calls per query)} from a cProfile stats file."""
    st = pstats.Stats(str(stats_file))
    return {short(*key): (where(key[0]), v[1] / replies) for key, v in st.stats.items()}


def run_one(kind: str, workdir: pathlib.Path, pairs_file: str, gen: CLoadgen,
            queries: int, clients: int) -> tuple[int, dict]:
    stats = workdir / f"{kind}.pstats"
    base = workdir / kind
    base.mkdir()
    server = ProfiledStop(base, stats) if kind == "stop" else ProfiledFloor(base, kind, stats)
    server.start()
    try:
        replies = gen.run(f"{co.THIS}:{server.port}", co.REQUESTER, pairs_file, queries,
                          clients, 300)["replies"]
    finally:
        server.stop()
    if not replies or not stats.exists():
        raise RuntimeError(f"{kind}: {replies} replies, stats written: {stats.exists()}")
    return replies, per_query(stats, replies)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["stop", "chained"], choices=KINDS)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--top", type=int, default=40, help="functions listed (most calls first)")
    ap.add_argument("--min", type=float, default=0.5, help="hide functions below this per query")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("call_counts: run as root (the connections asked about belong to nobody)",
              file=sys.stderr)
        return 2
    co.raise_nofile()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stop-calls-", dir="/var/tmp"))
    holders, gen = co.Holders(), CLoadgen()
    counts: dict[str, dict] = {}
    try:
        pairs = holders.grow(a.sockets)
        random.shuffle(pairs)
        pairs_file = co.write_pairs(workdir / "pairs.txt", pairs)
        for kind in a.kinds:
            replies, counts[kind] = run_one(kind, workdir, pairs_file, gen, a.queries, a.clients)
            print(f"call_counts: {kind}: {replies} replies at C = {a.clients}", flush=True)
    finally:
        holders.stop()
        gen.close()
        shutil.rmtree(workdir, ignore_errors=True)
    kinds = list(counts)
    print("\ncalls per query" + "".join(f"{k:>10}" for k in kinds))
    parts = ("stop", "bench", "twisted", "other", "built-in")
    for part in parts + ("all", "Python-level"):
        row = []
        for k in kinds:
            values = counts[k].values()
            if part == "all":
                row.append(sum(n for _, n in values))
            elif part == "Python-level":
                row.append(sum(n for p, n in values if p != "built-in"))
            else:
                row.append(sum(n for p, n in values if p == part))
        print(f"  {part:13}" + "".join(f"{n:10.1f}" for n in row))
    totals: collections.Counter = collections.Counter()
    for k in kinds:
        for f, (_, n) in counts[k].items():
            totals[f] = max(totals[f], n)
    print(f"\nfunctions, calls per query (at least {a.min:g} in one column)"
          + "".join(f"{k:>10}" for k in kinds))
    shown = [f for f, n in totals.most_common() if n >= a.min][:a.top]
    for f in shown:
        print("  " + "".join(f"{counts[k].get(f, ('', 0.0))[1]:8.2f}  " for k in kinds) + f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
