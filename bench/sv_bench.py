#!/usr/bin/env python3
"""Replicate the paper's Tables I, II and III (Carrier & Shields 2002, V)
side by side, in one run, on this machine.

    .venv/bin/python bench/sv_bench.py [--mode daemon|inproc] [--n 200] [--seconds 10] [--profile]

``--mode daemon`` (the default): through the real daemon (``twistd stop``
started on 127.0.0.1 by ``tests/integration/harness.py``, one TCP
connection per request, as a requester makes them; default settings, so
``fsync = batch`` and the shared inode index with ``max_age`` 10 s). The
latency is the client's round trip; the CPU of Table III is the daemon
process's own (utime + stime from /proc), per wall second.

``--mode inproc``: in-process (the answer path without the network): each
request is an exact sock_diag lookup of the queried connection, the record,
its canonical bytes and, "with file", a durable write (temporary file,
fsync, rename, directory fsync), as the store does. SV adds the process
walk, the system facts and the SHA-1 of the record.

Table I: ID, SV, SV + open files for the paper's Figure 3 tree.
Table II: SV for the Figure 4 tree, then with 100 extra processes (3 std
fds, 2 pipe fds, 1 file fd each).
Table III: CPU of SV requests (with file) paced at 6, 60, 600, 6000 per
minute for --seconds each (scaled down from a minute; the CPU share is
per wall second, so it is the per-minute figure).
Prints medians, the paper's figures, the target ratios with PASS/MISS, and
how each walk got its inode index (reused / rebuilt, and why). Loopback only.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stop import records  # noqa: E402
from stop.config import Config  # noqa: E402
from stop.model import Endpoint  # noqa: E402
from stop.os.linux import sockdiag  # noqa: E402
from stop.sv import ProcessState  # noqa: E402
from tests.integration import svtrees  # noqa: E402
from tests.integration.svtrees import make_inspector  # noqa: E402
from tests.integration.harness import Daemon, read_lines  # noqa: E402

PAPER_T1 = {"ID": 0.533, "SV": 5.718, "SV + file": 8.243}  # Linux, ms
PAPER_T2 = {"SV": 63.354, "SV +100 procs": 224.589}
PAPER_T3 = {6: 0.12, 60: 0.79, 600: 7.01, 6000: 35.92}  # % overhead


class Requests:
    """One in-process request path for a tree's queried connection."""

    def __init__(self, conn, data_dir: str, open_files: bool):
        self.conn = conn
        self.diag = sockdiag.SockDiag()
        self.state = ProcessState(Config(open_files=open_files), make_inspector("procfs"))
        self.dir = data_dir
        self.dirfd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.n = 0

    def _record(self, sv: bool) -> bytes:
        c = self.conn
        found = sockdiag.exact(self.diag, sockdiag.host_key(c.local.host)[0], c.local.port,
                               sockdiag.host_key(c.remote.host)[0], c.remote.port)
        assert found is not None and found.inode == c.inode
        rec = records.base_record(
            request={"type": "SV" if sv else "ID", "sid": None,
                     "ports": [c.local.port, c.remote.port], "address": None},
            requester=c.remote, server=Endpoint(c.local.host, 113), connection=c,
            user_name="root", now=time.time(), host="bench")
        if sv:
            out = []
            self.state.collect(c).addCallback(out.append)
            rec.update(out[0])
        return records.canonical(rec)

    def _store(self, data: bytes) -> None:
        self.n += 1
        name = f"r{self.n}"
        fd = os.open(f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self.dirfd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(f"{name}.tmp", name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        os.fsync(self.dirfd)

    def id(self) -> None:
        self._store(self._record(False))

    def sv(self, write: bool = True) -> int:
        data = self._record(True)
        hashlib.sha1(data).hexdigest()
        if write:
            self._store(data)
        return len(data)

    def close(self):
        self.diag.close()
        os.close(self.dirfd)


class LoopbackDaemon(Daemon):
    """The harness's daemon, listening on 127.0.0.1 only (where the trees'
    connections are)."""

    @property
    def listen_host(self) -> str:
        return "127.0.0.1"


class DaemonRequests:
    """Requests through a real ``twistd stop`` on 127.0.0.1 about a tree's
    queried connection (asked from 127.0.0.1, its remote end)."""

    HOST = "127.0.0.1"

    def __init__(self, conn, data_dir: str, open_files: bool):
        import pathlib
        self.conn = conn
        base = pathlib.Path(tempfile.mkdtemp(prefix="daemon-", dir=data_dir))
        self.daemon = LoopbackDaemon(base, {"open_files": "yes" if open_files else "no"},
                             interfaces=(self.HOST,)).start()
        self.pid = self.daemon.proc.pid
        self.ports = b"%d, %d" % (conn.local.port, conn.remote.port)
        self.notes: Counter = Counter()
        self.index_notes = False

    def _ask(self, line: bytes) -> bytes:
        with self.daemon.connect(source=self.HOST, dest=self.HOST) as s:
            s.sendall(line + b"\r\n")
            (reply,) = read_lines(s, 1)
        if b"USERID" not in reply:
            raise RuntimeError(f"daemon answered {reply!r}\n{self.daemon.read_log()[-2000:]}")
        return reply

    def id(self) -> None:
        self._ask(self.ports)

    def sv(self, write: bool = True) -> None:
        self._ask(self.ports + b" : SV")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")

    def index_summary(self) -> str:
        """How the daemon's walks got their index, from its records."""
        notes: Counter = Counter()
        for root, _dirs, files in os.walk(self.daemon.data_dir):
            for name in (n for n in files if n.endswith(".log")):  # flat segments
                with open(os.path.join(root, name), "rb") as f:
                    lines = f.read().splitlines()
                for line in lines:  # "... <record>": the JSON object ends the line
                    try:
                        rec = json.loads(line[line.index(b" {") + 1:])
                    except ValueError:
                        continue
                    note = rec.get("processes", {}).get("index")
                    if not note:
                        continue
                    notes["reused" if note["cached"] else f"built ({note.get('why')})"] += 1
                    if note.get("restarted"):
                        notes["restarted"] += 1
        return ", ".join(f"{k}: {v}" for k, v in sorted(notes.items())) or "no records read"

    def close(self):
        self.daemon.stop()


def median_ms(f, n: int) -> float:
    f()  # warm caches (inode cache, pwd) as a running daemon has them
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def walked(req) -> int:
    """Processes in one walk of ``req``'s tree (in-process, procfs)."""
    from stop.walk import walk
    return len(walk(make_inspector("procfs"), req.conn)["processes"])


def profile(label: str, f, n: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        f()
    prof.disable()
    print(f"\n--- cProfile: {label}, {n} requests, top 8 by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


def row(name, ours, paper, unit="ms"):
    return f"  {name:<26} {ours:>9.3f} {unit}   paper (Linux, PIII 600) {paper:>9.3f} {unit}"


def verdict(name: str, value: float, limit: float, unit: str, paper: float) -> str:
    ok = "PASS" if value <= limit else "MISS"
    return (f"  {name:<26} {value:>8.2f}{unit}   target <= {limit:g}{unit}   "
            f"paper {paper:.2f}{unit}   {ok}")


def cpu_share(req, rate: int, seconds: float) -> tuple[float, float]:
    """(CPU % of one core, achieved rate/min) of SV requests paced at
    ``rate`` per minute for ``seconds``."""
    interval = 60.0 / rate
    count = max(1, round(rate * seconds / 60.0))
    cpu = getattr(req, "cpu_seconds", time.process_time)
    c0, w0 = cpu(), time.monotonic()
    nxt = w0
    for _ in range(count):
        req.sv()
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - w0
    return 100 * (cpu() - c0) / max(elapsed, seconds), count / elapsed * 60


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("daemon", "inproc"), default="daemon",
                    help="through twistd on 127.0.0.1 (default) or in-process")
    ap.add_argument("--n", type=int, default=200, help="requests per latency figure")
    ap.add_argument("--seconds", type=float, default=10.0, help="run time per CPU rate")
    ap.add_argument("--profile", action="store_true", help="cProfile the SV paths (inproc)")
    args = ap.parse_args()
    make = DaemonRequests if args.mode == "daemon" else Requests
    nprocs = sum(1 for e in os.listdir("/proc") if e.isdigit())
    how = ("through twistd stop on 127.0.0.1, one connection per request"
           if args.mode == "daemon" else "in-process (no network)")
    print(f"sv_bench: {nprocs} processes on this host before the trees; Python "
          f"{sys.version.split()[0]}; {how}; procfs backend")
    results = {}
    with tempfile.TemporaryDirectory(prefix="stop-bench-") as data_dir:
        # Table I and, on the same tree as the paper, Table III
        tree = svtrees.figure3()
        plain = files = None
        try:
            plain = make(tree.connection, data_dir, open_files=False)
            files = make(tree.connection, data_dir, open_files=True)
            cpu = {}

            def timed(label, req, f):
                # Median latency, and (daemon) its CPU per request.
                c0 = req.cpu_seconds() if args.mode == "daemon" else 0.0
                t = median_ms(f, args.n)
                if args.mode == "daemon":
                    cpu[label] = (req.cpu_seconds() - c0) / (args.n + 1) * 1e3
                return t
            t_id = timed("ID", plain, plain.id)
            t_sv = timed("SV", plain, plain.sv)
            t_svf = timed("SV + open files", files, files.sv)
            results["t1"] = (t_id, t_sv, t_svf)
            print(f"\nTable I: Figure 3 tree ({walked(plain)} processes walked), "
                  f"median of {args.n}")
            print(row("ID", t_id, PAPER_T1["ID"]))
            print(row("SV", t_sv, PAPER_T1["SV"]))
            print(row("SV + open files", t_svf, PAPER_T1["SV + file"]))
            if cpu:
                print("  daemon CPU per request, back to back: " + ", ".join(
                    f"{k} {v:.2f} ms" for k, v in cpu.items()))
            if args.profile and args.mode == "inproc":
                profile("SV + open files, Figure 3", files.sv, 50)
            print(f"\nTable III: CPU of SV + open files requests paced for "
                  f"{args.seconds:g} s per rate (share of one core"
                  f"{', the daemon process' if args.mode == 'daemon' else ''})")
            results["t3"] = {}
            for rate in (6, 60, 600, 6000):
                share, achieved = cpu_share(files, rate, args.seconds)
                results["t3"][rate] = share
                note = "" if achieved >= rate * 0.95 else f"  (only {achieved:.0f}/min sustained)"
                print(f"  {rate:>5}/min  CPU {share:7.2f} % of one core   "
                      f"paper overhead {PAPER_T3[rate]:6.2f} %{note}")
            if args.mode == "daemon":
                print(f"  index, open-files daemon: {files.index_summary()}")
        finally:
            for r in (plain, files):
                if r is not None:
                    r.close()
            tree.stop()
        # Table II
        tree = svtrees.figure4()
        extra = req = None
        try:
            req = make(tree.connection, data_dir, open_files=True)
            n_walked = walked(req)
            t_14 = median_ms(req.sv, args.n)
            extra = svtrees.idle_processes(100)
            svtrees.wait_for(lambda: all(len(os.listdir(f"/proc/{p.pid}/fd")) >= 6
                                         for p in extra.procs if os.path.exists(f"/proc/{p.pid}")),
                             timeout=60, what="100 extra processes")
            t_114 = median_ms(req.sv, args.n)
            results["t2"] = (t_14, t_114)
            print(f"\nTable II: Figure 4 tree ({n_walked} processes walked), SV + open files, "
                  f"median of {args.n}")
            print(row("SV", t_14, PAPER_T2["SV"]))
            print(row("SV + 100 processes", t_114, PAPER_T2["SV +100 procs"]))
            if args.mode == "daemon":
                print(f"  index: {req.index_summary()}")
            if args.profile and args.mode == "inproc":
                profile("SV, Figure 4 + 100 processes", req.sv, 30)
        finally:
            if req is not None:
                req.close()
            if extra is not None:
                extra.stop()
            tree.stop()
    t_id, t_sv, t_svf = results["t1"]
    t_14, t_114 = results["t2"]
    print("\nTargets (one run):")
    print(verdict("SV/ID", t_sv / t_id, 3, "x", PAPER_T1["SV"] / PAPER_T1["ID"]))
    print(verdict("SV(+100)/SV", t_114 / t_14, 1.5, "x",
                  PAPER_T2["SV +100 procs"] / PAPER_T2["SV"]))
    print(verdict("CPU at 600 SV/min", results["t3"][600], 1, "%", PAPER_T3[600]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
