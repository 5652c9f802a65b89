"""Two or more versions of the daemon side by side under the same ID load:
what one change did to req/s, p99 and CPU per query, measured in one run.

Run as root with the ``.venv`` interpreter; everything is on loopback:

    .venv/bin/python bench/ab_daemon.py main HEAD [--clients 1 10 50] [--runs 5]

Each argument is a git revision of this checkout (exported with ``git
archive`` into a temporary directory), ``.`` (the working tree as it
is), or ``floor:KIND``: one of ``floor_server.py``'s floors from this
checkout (KIND: ``minimal``, ``chained``, ``duties``, ``store``,
``store-duties``: floor+d, floor+dc, floor+dcq, floor+st, floor+stq;
``floor:`` alone: the bare floor; see bench/README.rst), measured the same way, to see a change's distance to
a floor in one run. Every version runs as ``twistd stop`` as in ``compare_oidentd.py``
(flat store, ``fsync = batch``, one log line per query to a file), all at
once, each on its own port; 1,000 established connections held by
nobody; the C load generator (``loadgen.c``); one query per connection.
For each point the versions take turns, in the reverse order every other
run, ``--runs`` times; the medians are printed with the CPU range (the
noise) and, per version, the user and system CPU per query of each of
its main thread (the reactor) and of its other threads together (the
store's writer, the thread pool; ``/proc/PID/task``), user and system:
where a difference is, Python or the kernel. Prints
the load average at the start and the end: quote figures with it.

``--events`` also counts, per query and thread (the main one, the others
together), kernel events with ``perf stat`` on tracepoints (no sampling,
no stop per system call, unlike ``strace``: the load runs at its usual
speed): ``fdatasync`` calls (one per batch: the group commit's batch
size), ``futex`` calls (thread hand-offs and GIL waits), context
switches, ``epoll_wait`` calls (reactor turns), and system calls of
every kind (``raw_syscalls:sys_enter``: two versions making the same
calls differ in GIL waits and Python work, not in the kernel work asked
for). Needs ``perf`` (linux-perf) and the kernel's tracepoints.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare_oidentd as co  # noqa: E402
from cloadgen import CLoadgen  # noqa: E402
from tests.integration.harness import Daemon  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")

#: --events: tracepoint -> the short name printed.
EVENTS = {"syscalls:sys_enter_fdatasync": "fdatasync", "syscalls:sys_enter_futex": "futex",
          "sched:sched_switch": "switches", "syscalls:sys_enter_epoll_wait": "epoll_wait",
          "raw_syscalls:sys_enter": "syscalls"}


def export(rev: str, into: pathlib.Path) -> str:
    """The directory holding version ``rev`` (``.``: this working tree)."""
    if rev == ".":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


class TreeDaemon(Daemon):
    """The harness's daemon, run from the code in ``tree``."""

    def __init__(self, tree: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = tree

    def environment(self) -> dict:
        return dict(os.environ, PYTHONPATH=self.tree + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Version(co.StopServer):
    def __init__(self, name: str, tree: str, workdir: pathlib.Path):
        self.name = name
        workdir.mkdir(parents=True)
        self.daemon = TreeDaemon(tree, workdir, co.STOP_SETTINGS, interfaces=(co.THIS,))
        self.port = self.daemon.port


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread id: (user s, system s) from /proc/PID/task."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (int(fields[11]) / HZ, int(fields[12]) / HZ)
    return out


class EventCount:
    """``perf stat --per-thread`` on the tracepoints of :data:`EVENTS` for
    process ``pid``, from now until :meth:`stop`."""

    def __init__(self, pid: int, out: pathlib.Path):
        self.pid, self.out = pid, out
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x", ",", "--per-thread", "-e", ",".join(EVENTS),
             "-p", str(pid), "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.2)  # attached (perf says nothing when it is)
        if self.proc.poll() is not None:
            raise RuntimeError(f"perf stat failed: {self.proc.stderr.read().decode().strip()}")

    def stop(self) -> dict[str, dict[str, int]]:
        """``{"main"|"threads": {short name: count}}``."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        counts: dict[str, dict[str, int]] = {"main": {}, "threads": {}}
        for line in self.out.read_text().splitlines():
            fields = line.split(",")
            if line.startswith("#") or len(fields) < 4 or fields[3] not in EVENTS:
                continue
            tid = fields[0].rpartition("-")[2]
            value = int(fields[1]) if fields[1].isdigit() else 0  # "<not counted>": idle
            per = counts["main" if tid == str(self.pid) else "threads"]
            per[EVENTS[fields[3]]] = per.get(EVENTS[fields[3]], 0) + value
        return counts


def measure(version: Version, pairs: str, count: int, clients: int, gen,
            events: Optional[pathlib.Path] = None) -> dict:
    """One run: compare_oidentd.measure's figures plus user/system CPU per
    query (us) of the main thread and of the other threads together (and
    with ``events``, a file for perf's output, the kernel events per query
    and thread: ``res["events"]``)."""
    counter = EventCount(version.pid, events) if events is not None else None
    before = thread_cpu(version.pid)
    res = co.measure(version, pairs, count, clients, 60, gen)
    after = thread_cpu(version.pid)
    n = res["replies"] or 1
    if counter is not None:
        res["events"] = {where: {name: c / n for name, c in per.items()}
                         for where, per in counter.stop().items()}
    per: dict[str, list[float]] = {}
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0.0, 0.0))
        name = "main" if tid == str(version.pid) else "threads"
        u, s = per.setdefault(name, [0.0, 0.0])
        per[name] = [u + (user - user0) * 1e6 / n, s + (system - system0) * 1e6 / n]
    res["threads"] = per
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revisions", nargs="+",
                    help="git revisions, . for the working tree, floor:KIND for a floor "
                         f"(KIND: {', '.join(co.FloorServer.OPTIONS)}; none: the bare floor)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--queries", type=int, default=3000, help="queries per run")
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--events", action="store_true",
                    help="count fdatasync, futex, context switches, epoll_wait and all system "
                         "calls per query and thread (perf stat on tracepoints)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("ab_daemon: run as root (the connections asked about belong to nobody)",
              file=sys.stderr)
        return 2
    for rev in a.revisions:
        if rev.startswith("floor:") and (rev.partition(":")[2] or None) not in co.FloorServer.NAMES:
            ap.error(f"{rev}: no such floor (KIND: {', '.join(co.FloorServer.OPTIONS)}, "
                     "or nothing for the bare one)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="stop-ab-", dir="/var/tmp"))
    versions = []
    for i, rev in enumerate(a.revisions):
        if rev.startswith("floor:"):
            floor = co.FloorServer(work, rev.partition(":")[2] or None)
            floor.name = f"{i}:{floor.name}"
            versions.append(floor)
        else:
            versions.append(Version(f"{i}:{rev}", export(rev, work / f"tree{i}"), work / f"run{i}"))
    gen = holders = None
    print(f"ab_daemon: load average {open('/proc/loadavg').read().split(' ', 3)[:3]} at the start",
          flush=True)
    try:
        gen = CLoadgen()
        holders = co.Holders()
        pairs = holders.grow(a.sockets)
        random.shuffle(pairs)
        pairs_file = co.write_pairs(work / "pairs.txt", pairs)
        for v in versions:
            v.start()
        for v in versions:
            co.measure(v, pairs_file, 300, 10, 30, gen)  # warm
        for c in a.clients:
            runs: dict[str, list[dict]] = {v.name: [] for v in versions}
            for r in range(a.runs):
                for v in (versions if r % 2 == 0 else versions[::-1]):
                    runs[v.name].append(measure(v, pairs_file, a.queries, c, gen,
                                                work / "perf-stat.txt" if a.events else None))
            for v in versions:
                m = co.median_of(runs[v.name])
                threads = {}
                for run in runs[v.name]:
                    for name, (u, s) in run["threads"].items():
                        threads.setdefault(name, []).append((u, s))
                parts = "; ".join(
                    f"{name} usr {statistics.median(u for u, _ in xs):.0f} "
                    f"sys {statistics.median(s for _, s in xs):.0f}"
                    for name, xs in sorted(threads.items())
                    if statistics.median(u + s for u, s in xs) >= 1)
                print(f"C={c:<3} {v.name:<20} req/s {m['rate']:7.0f}  p99 {m['p99_ms']:6.2f} ms  "
                      f"CPU/query {m['cpu_ms_per_1k']:4.0f} us ({m.get('cpu_range', '')})  "
                      f"[{parts}]", flush=True)
                if a.events:
                    print(" " * 26 + "per query: " + "; ".join(
                        f"{where} " + " ".join(
                            f"{name} {statistics.median(run['events'][where].get(name, 0.0) for run in runs[v.name]):.2f}"
                            for name in EVENTS.values())
                        for where in ("main", "threads")), flush=True)
    finally:
        for v in versions:
            v.stop()
        if holders is not None:
            holders.stop()
        if gen is not None:
            gen.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"ab_daemon: load average {open('/proc/loadavg').read().split(' ', 3)[:3]} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
