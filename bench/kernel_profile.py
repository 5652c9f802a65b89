"""Where a query's CPU goes below Python: the system calls of each thread
of ``twistd stop`` and of a floor server under the same ID load, and
(``--perf``) the CPU samples of each thread by the system call they fell
in. What py-spy cannot show: py-spy sees Python frames, not the kernel
work (or the context switches) a frame causes.

Run as root with the ``.venv`` interpreter; everything is on loopback:

    .venv/bin/python bench/kernel_profile.py [--kinds stop chained] [--clients 50] [--perf]

For each server (``stop``: as ``compare_oidentd.py`` runs it; ``floor``,
``minimal`` = floor+d, ``chained`` = floor+dc, ``duties`` = floor+dcq,
``store-duties`` = floor+stq, ``store`` = floor+st: as
``hot_bench.py --floor`` runs them): 1,000 established connections held by
nobody, the C load generator (``loadgen.c``), ``--warm`` queries first
(the store and its index grow as in the benchmarks' later points), then

* ``strace -f`` over ``--queries`` queries: calls per query of each
  system call, main thread (the reactor) and other threads (the store's
  writer) apart. strace slows the server; the counts are what it shows;
* with ``--perf``, ``perf record -e cpu-clock -g`` over as many queries
  (software clock: works where the machine has no hardware counters):
  microseconds of CPU per query of each thread, by the system call the
  sample's kernel stack is in ("user" when none: Python, libc, SQLite),
  and how much of each was in the scheduler (context switches).

A difference between stop and a floor in these tables is a system call
stop makes that the floor does not, or one that costs it more: the
SQLite temp files of the index's savepoints were found this way
(docs/storage.rst, "The index").
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare_oidentd as co  # noqa: E402
from cloadgen import CLoadgen  # noqa: E402

PERF_HZ = 2000
#: A fixed sampling period (``-c``, in ns of cpu-clock): with ``-F`` perf
#: adapts the period as it goes, and counting samples as 1/PERF_HZ s each
#: gave 204 us a query where /proc gave 140-160 (bench/README.rst).
PERF_PERIOD_NS = 1_000_000_000 // PERF_HZ
SCHEDULER = ("finish_task_switch", "_raw_spin_unlock_irqrestore", "__schedule")
STRACE_LINE = re.compile(r"(\d+)\s+(\w+)\(")


def start(kind: str, workdir: pathlib.Path):
    base = workdir / kind
    base.mkdir()
    server = co.StopServer(base) if kind == "stop" else co.FloorServer(
        base, None if kind == "floor" else kind)
    server.start()
    return server


def traced(cmd: list[str], run) -> dict:
    """Start ``cmd`` (a tracer attached to the server), let it settle,
    ``run()`` the load, stop the tracer; the load's result."""
    tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        result = run()
        time.sleep(0.3)
    finally:
        tracer.send_signal(2)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    return result


def syscalls(path: pathlib.Path, main_tid: int, queries: int) -> list[tuple[str, str, float]]:
    """(thread, call, per query) from ``strace -f -o`` output, most first."""
    counts: collections.Counter = collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            m = STRACE_LINE.match(line)
            if m:
                thread = "main" if int(m.group(1)) == main_tid else "other"
                counts[(thread, m.group(2))] += 1
    return [(t, c, n / queries) for (t, c), n in counts.most_common()]


def perf_samples(path: pathlib.Path, main_tid: int, queries: int) -> list[tuple]:
    """(thread, call, us per query, of which in the scheduler) from
    ``perf script`` of a ``perf record -g`` file, most first."""
    out = subprocess.run(["perf", "script", "-i", str(path)], capture_output=True, text=True,
                         check=True).stdout
    total: collections.Counter = collections.Counter()
    sched: collections.Counter = collections.Counter()
    for sample in out.split("\n\n"):
        lines = sample.strip().splitlines()
        if not lines:
            continue
        head = lines[0].split()
        if len(head) < 2 or not head[1].isdigit():
            continue
        thread = "main" if int(head[1]) == main_tid else "other"
        frames = [ln.split()[1].split("+")[0] for ln in lines[1:] if len(ln.split()) >= 2]
        call = next((f[len("__x64_sys_"):] for f in frames if f.startswith("__x64_sys_")), "user")
        total[(thread, call)] += 1
        if any(s in f for f in frames[:3] for s in SCHEDULER):
            sched[(thread, call)] += 1
    per = 1e6 / PERF_HZ / queries
    return [(t, c, n * per, sched[(t, c)] * per) for (t, c), n in total.most_common()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["stop", "chained"],
                    choices=["stop", "floor", *co.FloorServer.OPTIONS])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--warm", type=int, default=20000, help="queries before the traced ones")
    ap.add_argument("--queries", type=int, default=3000, help="queries traced")
    ap.add_argument("--perf", action="store_true", help="also perf record (cpu-clock)")
    ap.add_argument("--min", type=float, default=0.02, help="hide calls below this per query")
    a = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("strace") is None or (
            a.perf and shutil.which("perf") is None):
        print("kernel_profile: needs root, strace (and perf for --perf: linux-perf)",
              file=sys.stderr)
        return 2
    co.raise_nofile()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stop-kprof-", dir="/var/tmp"))
    holders = co.Holders()
    gen = CLoadgen()
    print(f"kernel_profile: load average {os.getloadavg()[0]:.2f} at the start; C = "
          f"{a.clients}, {a.warm} queries first, then {a.queries} traced, N = 1,000")
    try:
        pairs = holders.grow(1000)
        random.shuffle(pairs)
        pairs_file = co.write_pairs(workdir / "pairs.txt", pairs)
        for kind in a.kinds:
            server = start(kind, workdir)
            try:
                def load(n):
                    return gen.run(f"{co.THIS}:{server.port}", co.REQUESTER, pairs_file, n,
                                   a.clients, 120)["replies"]
                load(a.warm)
                trace = workdir / f"{kind}.strace"
                n = traced(["strace", "-f", "-qq", "-o", str(trace), "-p", str(server.pid)],
                           lambda: load(a.queries))
                print(f"\n{kind}: system calls per query (strace, {n} queries)")
                for thread, call, per in syscalls(trace, server.pid, n):
                    if per >= a.min:
                        print(f"  {thread:6} {call:16} {per:6.2f}")
                if a.perf:
                    data = workdir / f"{kind}.perf"
                    cpu0 = co.tree_cpu_seconds(server.pid)
                    n = traced(["perf", "record", "-q", "-e", "cpu-clock", "-c",
                                str(PERF_PERIOD_NS), "-g", "-p", str(server.pid), "-o", str(data)],
                               lambda: load(a.queries))
                    own = (co.tree_cpu_seconds(server.pid) - cpu0) * 1e6 / n
                    rows = perf_samples(data, server.pid, n)
                    print(f"{kind}: CPU us per query by system call (perf cpu-clock "
                          f"{PERF_HZ}/s, {n} queries; total {sum(r[2] for r in rows):.0f}; "
                          f"/proc over the same window: {own:.0f})")
                    for thread in ("main", "other"):
                        mine = [r for r in rows if r[0] == thread]
                        print(f"  {thread}: {sum(r[2] for r in mine):.0f} us")
                        for _, call, us, in_sched in mine:
                            if us >= 1.0:
                                print(f"    {call:16} {us:6.1f}  (scheduler {in_sched:5.1f})")
            finally:
                server.stop()
    finally:
        holders.stop()
        gen.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nkernel_profile: load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
