#!/usr/bin/env python3
"""Replicate the paper's Tables I, II and III (Carrier & Shields 2002, V)
side by side, in one run, on this machine.

    .venv/bin/python bench/sv_bench.py [--n 200] [--seconds 10] [--profile]

Measured in-process (the daemon's answer path without the network): each
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
Prints medians, the paper's figures and the target ratios. Loopback only.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stop import records  # noqa: E402
from stop.config import Config  # noqa: E402
from stop.model import Endpoint  # noqa: E402
from stop.process import make_inspector  # noqa: E402
from stop.process.sockdiag import SockDiag  # noqa: E402
from stop.sv import ProcessState  # noqa: E402
from tests.integration import svtrees  # noqa: E402

PAPER_T1 = {"ID": 0.533, "SV": 5.718, "SV + file": 8.243}  # Linux, ms
PAPER_T2 = {"SV": 63.354, "SV +100 procs": 224.589}
PAPER_T3 = {6: 0.12, 60: 0.79, 600: 7.01, 6000: 35.92}  # % overhead


class Requests:
    """One in-process request path for a tree's queried connection."""

    def __init__(self, conn, data_dir: str, open_files: bool):
        self.conn = conn
        self.diag = SockDiag()
        self.state = ProcessState(Config(open_files=open_files), make_inspector("procfs"))
        self.dir = data_dir
        self.dirfd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.n = 0

    def _record(self, sv: bool) -> bytes:
        c = self.conn
        found = self.diag.inet_exact((c.local.host, c.local.port), (c.remote.host, c.remote.port))
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


def median_ms(f, n: int) -> float:
    f()  # warm caches (inode cache, pwd) as a running daemon has them
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def walked(req: Requests) -> int:
    out = []
    req.state.collect(req.conn).addCallback(out.append)
    return len(out[0]["processes"]["processes"])


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="requests per latency figure")
    ap.add_argument("--seconds", type=float, default=10.0, help="run time per CPU rate")
    ap.add_argument("--profile", action="store_true", help="cProfile the SV paths")
    args = ap.parse_args()
    nprocs = sum(1 for e in os.listdir("/proc") if e.isdigit())
    print(f"sv_bench: {nprocs} processes on this host before the trees; Python "
          f"{sys.version.split()[0]}; in-process (no network), procfs backend")
    with tempfile.TemporaryDirectory(prefix="stop-bench-") as data_dir:
        # Table I
        tree = svtrees.figure3()
        try:
            plain = Requests(tree.connection, data_dir, open_files=False)
            files = Requests(tree.connection, data_dir, open_files=True)
            t_id = median_ms(plain.id, args.n)
            t_sv_nofile = median_ms(lambda: plain.sv(write=False), args.n)
            t_sv = median_ms(plain.sv, args.n)
            t_svf = median_ms(files.sv, args.n)
            size = files.sv()
            print(f"\nTable I: Figure 3 tree ({walked(plain)} processes walked; record "
                  f"{size} bytes with open files), median of {args.n}")
            print(row("ID (lookup+record+fsync)", t_id, PAPER_T1["ID"]))
            print(row("SV, no file", t_sv_nofile, PAPER_T1["SV"]))
            print(row("SV (with file)", t_sv, PAPER_T1["SV + file"]))
            print(row("SV + open files (file)", t_svf, PAPER_T1["SV + file"]))
            print(f"  ratio SV/ID = {t_sv / t_id:.2f}x (target <= 3x; paper "
                  f"{PAPER_T1['SV'] / PAPER_T1['ID']:.1f}x)")
            if args.profile:
                profile("SV + open files, Figure 3", files.sv, 50)
            # Table III, on the same tree as the paper did (6-process tree)
            print(f"\nTable III: daemon CPU, SV (with file) requests paced for "
                  f"{args.seconds:g} s per rate (share of one core)")
            for rate in (6, 60, 600, 6000):
                interval = 60.0 / rate
                count = max(1, round(rate * args.seconds / 60.0))
                c0, w0 = time.process_time(), time.monotonic()
                nxt = w0
                for _ in range(count):
                    files.sv()
                    nxt += interval
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                wall = max(time.monotonic() - w0, args.seconds)
                cpu = time.process_time() - c0
                achieved = count / (time.monotonic() - w0) * 60
                note = "" if achieved >= rate * 0.95 else f"  (only {achieved:.0f}/min sustained)"
                print(f"  {rate:>5}/min  CPU {100 * cpu / wall:7.2f} % of one core   "
                      f"paper overhead {PAPER_T3[rate]:6.2f} %{note}")
            plain.close()
            files.close()
        finally:
            tree.stop()
        # Table II
        tree = svtrees.figure4()
        extra = None
        try:
            req = Requests(tree.connection, data_dir, open_files=True)
            n_walked = walked(req)
            t_14 = median_ms(req.sv, args.n)
            extra = svtrees.idle_processes(100)
            svtrees.wait_for(lambda: all(len(os.listdir(f"/proc/{p.pid}/fd")) >= 6
                                         for p in extra.procs if os.path.exists(f"/proc/{p.pid}")),
                             timeout=60, what="100 extra processes")
            t_114 = median_ms(req.sv, args.n)
            print(f"\nTable II: Figure 4 tree ({n_walked} processes walked), SV + open files "
                  f"(with file), median of {args.n}")
            print(row("SV", t_14, PAPER_T2["SV"]))
            print(row("SV + 100 processes", t_114, PAPER_T2["SV +100 procs"]))
            print(f"  ratio SV(+100)/SV = {t_114 / t_14:.2f}x (target <= 1.5x; paper "
                  f"{PAPER_T2['SV +100 procs'] / PAPER_T2['SV']:.1f}x)")
            if args.profile:
                profile("SV, Figure 4 + 100 processes", req.sv, 30)
            req.close()
        finally:
            if extra is not None:
                extra.stop()
            tree.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
