"""Profile the running daemon under load with py-spy: where a query's CPU
goes in the real process (reactor, accept/close, the answer, the writer
thread), which ``profile_answer.py`` (in-process, no network) cannot show.

Run as root with the ``.venv`` interpreter and ``py-spy`` installed in it
(``.venv/bin/pip install py-spy``):

    .venv/bin/python bench/profile_daemon.py [--clients 10] [--seconds 15] [--kind id|sv]

``--kind id``: ``twistd stop`` as in ``compare_oidentd.py`` (flat store,
fsync = batch), 1,000 established connections held by nobody, the C load
generator asking about them. ``--kind sv``: SV about a fresh connection
each time (``hot_bench.FreshHolder``), one query at a time; ``--idle N``
adds N idle processes on the host, ``--established N --time-wait M`` such
sockets (as ``hot_bench.py``'s SV points).

py-spy samples every thread (``--threads``, idle samples dropped); the
report gives, per thread, the share of samples whose stack contains each
function (inclusive) and the functions on top of the stack (self).
``--native`` adds the C frames (the interpreter, the GC, SQLite, libc):
py-spy then stops the process for each sample, which slows it and
over-counts system calls (``kernel_profile.py --perf`` measures those).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare_oidentd as co  # noqa: E402
import hot_bench  # noqa: E402
from cloadgen import CLoadgen  # noqa: E402


def short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: one name per
    function, whatever line was sampled."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({tail})"


def report(raw: str, top: int) -> None:
    """Print inclusive and self shares per thread from py-spy's raw
    (collapsed) output: ``thread;frame;frame... count`` per line."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    selfc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):  # "thread (TID): NAME"
            thread = frames.pop(0).partition(": ")[2] or "?"
        else:
            thread = "?"
        frames = [short(f) for f in frames]
        totals[thread] += n
        for f in set(frames):
            per_thread[thread][f] += n
        if frames:
            selfc[thread][frames[-1]] += n
    grand = sum(totals.values())
    for thread, total in totals.most_common():
        print(f"\n{thread}: {total} samples ({100 * total / grand:.0f} % of all non-idle)")
        print("  inclusive:")
        for f, n in per_thread[thread].most_common(top):
            print(f"    {100 * n / total:5.1f} %  {f}")
        print("  self:")
        for f, n in selfc[thread].most_common(top):
            print(f"    {100 * n / total:5.1f} %  {f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("id", "sv"), default="id")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--raw", help="also keep py-spy's raw output in this file")
    ap.add_argument("--idle", type=int, default=0,
                    help="--kind sv: this many extra idle processes on the host (hot_bench's)")
    ap.add_argument("--idle-user", default="daemon", help="user the idle processes run as")
    ap.add_argument("--established", type=int, default=0,
                    help="--kind sv: this many extra established connections on the host")
    ap.add_argument("--time-wait", type=int, default=0,
                    help="--kind sv: this many TIME_WAIT sockets on the host at the start")
    ap.add_argument("--floor", choices=("floor", *co.FloorServer.OPTIONS),
                    help="--kind id: profile this floor server (bench/floor_server.py, as "
                         "hot_bench.py starts it: minimal = floor+d, duties = floor+dcq; "
                         "see compare_oidentd.FloorServer) instead of stop")
    ap.add_argument("--gil", action="store_true",
                    help="only samples holding the GIL (Python CPU; no GIL waits)")
    ap.add_argument("--native", action="store_true",
                    help="with C frames (the interpreter, the cyclic GC, SQLite, libc): "
                         "py-spy stops the daemon for each sample, so the load is slower")
    a = ap.parse_args(argv)
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    if spy is None or os.geteuid() != 0:
        print("profile_daemon: needs root and py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    co.raise_nofile()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stop-prof-", dir="/var/tmp"))
    out = workdir / "pyspy.txt"
    holders = fresh = gen = idle = None
    if a.kind == "sv":
        server = hot_bench.SvDaemon(workdir)
    elif a.floor:
        server = co.FloorServer(workdir, None if a.floor == "floor" else a.floor)
    else:
        server = co.StopServer(workdir)
    try:
        server.start()
        if a.kind == "id":
            holders = co.Holders()
            pairs = holders.grow(a.sockets)
            random.shuffle(pairs)
            pairs_file = co.write_pairs(workdir / "pairs.txt", pairs)
            gen = CLoadgen()
            gen.run(f"{co.THIS}:{server.port}", co.REQUESTER, pairs_file, 300, 10, 30)  # warm
        else:
            fresh = hot_bench.FreshHolder()
            if a.idle:
                idle = hot_bench.IdleProcesses(a.idle, a.idle_user)
            if a.established:
                holders = co.Holders()
                holders.grow(a.established)
            if a.time_wait:
                hot_bench.make_time_wait(a.time_wait)
        cmd = [spy, "record", "--pid", str(server.pid), "--threads", "--rate", str(a.rate),
               "--duration", str(int(a.seconds)), "--format", "raw", "--output", str(out)]
        # Native stacks can only be read from a stopped process.
        cmd += ["--native"] if a.native else ["--nonblocking"]
        cmd += ["--gil"] if a.gil else []
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        c0, t0 = co.tree_cpu_seconds(server.pid), time.monotonic()
        queries = 0
        if a.kind == "id":
            while time.monotonic() - t0 < a.seconds - 1.5:
                res = gen.run(f"{co.THIS}:{server.port}", co.REQUESTER, pairs_file,
                              100000, a.clients, min(5.0, a.seconds - 1.5))
                queries += res["replies"]
        else:
            while time.monotonic() - t0 < a.seconds - 1.5 and queries < 100000:
                p1, p2 = fresh.new()
                server.ask(b"%d, %d : SV" % (p1, p2))
                queries += 1
        cpu = co.tree_cpu_seconds(server.pid) - c0
        spy_proc.wait(timeout=a.seconds + 60)
        print(f"profile_daemon: {a.kind}, {queries} queries in {time.monotonic() - t0:.1f} s, "
              f"daemon CPU {cpu * 1e6 / max(queries, 1):.0f} us per query; py-spy "
              f"{a.rate}/s, idle samples dropped")
        raw = out.read_text() if out.exists() else ""
        if not raw:
            print(spy_proc.stderr.read().decode(errors="replace"))
        if a.raw:
            shutil.copy(out, a.raw)
        report(raw, a.top)
    finally:
        if holders is not None:
            holders.stop()
        if fresh is not None:
            fresh.stop()
        if idle is not None:
            idle.stop()
        if gen is not None:
            gen.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
