"""Run ``twistd stop`` and Debian's ``oidentd`` side by side on loopback and
print req/s, latency, CPU per 1,000 queries, RSS and the ratios.

Run as root (oidentd binds and drops to nobody; the established connections
belong to nobody), with the interpreter that has Twisted (``dev/test``
makes ``.venv``):

    .venv/bin/python bench/compare_oidentd.py            # full matrix, ~5 min
    .venv/bin/python bench/compare_oidentd.py --quick    # ~1 min smoke run

Set-up: "this host" is 127.0.0.1, where both servers listen (each on its own
port); the requester is 127.0.0.2. A helper process running as nobody holds
N established connections 127.0.0.1:P1 -> 127.0.0.2:P2. The load generator
(bench/loadgen.py, its own process) asks "P1, P2" from 127.0.0.2, one query
per connection, C connections in flight, M queries per point. CPU is read
from /proc/PID/stat (utime+stime of the process and its threads, plus
cutime+cstime of reaped children and the times of live ones: oidentd forks
a child per connection) before and after each point.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pwd
import random
import resource
import select
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from tests.integration.harness import Daemon, free_port  # noqa: E402
from tests.integration.netns import stop_process  # noqa: E402

THIS, REQUESTER = "127.0.0.1", "127.0.0.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PER_HOLDER = 9000       # connections per holder process: 2 descriptors each, under
                        # the usual hard RLIMIT_NOFILE of 20,000 (not raisable in containers)
SETTLE_TIMEOUT = 5.0    # seconds to wait for a server's children to be reaped
START_TIMEOUT = 20.0
NO_USER_PORT = 9        # P2 of the NO-USER queries: nothing is connected to it
STOP_SETTINGS = {
    # The defaults, spelled out so the output can say what was measured.
    "storage": "flat",
    "fsync": "batch",
    # All clients come from one address. The default (16) is below C = 50,
    # and a connection counts until the reactor has seen its close, which
    # can be a turn after the client's next connect: allow max_connections.
    "max_connections_per_host": 256,
}


# -- /proc -------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    return data[data.rindex(b")") + 2:].decode().split()


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (live or zombie)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat_fields(int(name))[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its reaped children and its
    live children."""
    total = 0
    for p in [pid] + children_of(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def raise_nofile() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, for this process and every
    child it starts (holders, servers, the load generator)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def fs_type(path: str) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as fh:
        for line in fh:
            dev, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, f"{typ} on {dev}"
    return kind


# -- the servers --------------------------------------------------------------

class StopServer:
    """This daemon, through the integration harness's Daemon."""

    name = "stop"

    def __init__(self, workdir: pathlib.Path):
        self.daemon = Daemon(workdir, STOP_SETTINGS, interfaces=(THIS,))
        self.port = self.daemon.port

    def start(self) -> None:
        self.daemon.start()
        self.pid = self.daemon.proc.pid

    def stop(self) -> None:
        self.daemon.stop()

    def settle(self) -> None:
        pass  # one process; its threads are counted in its own stat


class OidentdServer:
    """Debian's oidentd in the foreground, answering the user name (OS
    "OTHER"), logging each query to a file as ``stop`` does.

    oidentd resolves the requester's address to a name for its log; here
    that would be a DNS query (with 5 s stalls when the resolver drops one),
    so it runs in a private mount namespace whose /etc/hosts (bind-mounted,
    the system's file is untouched) names both loopback addresses.
    """

    name = "oidentd"

    def __init__(self, workdir: pathlib.Path):
        self.port = free_port((THIS,))
        self.log = workdir / "oidentd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        hosts = self.log.parent / "hosts"
        hosts.write_text(f"{THIS} localhost\n{REQUESTER} requester\n")
        # unshare and sh exec: the PID we get is oidentd's.
        cmd = (f"mount --bind {hosts} /etc/hosts && exec oidentd -i -S -o -a {THIS} "
               f"-p {self.port}")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                          "sh", "-c", cmd],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oidentd exited {self.proc.returncode}: "
                                   + self.log.read_text(errors="replace"))
            try:
                with socket.create_connection((THIS, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("oidentd did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def settle(self) -> None:
        """Wait (bounded) until every per-connection child has been reaped,
        so its CPU time is in the parent's cutime/cstime."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while children_of(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


class FloorServer:
    """bench/floor_server.py: a bare Twisted LineReceiver (no lookup, no
    record, no log), to show what Twisted itself costs per connection here.
    ``kind`` "minimal" ("floor+d"): plus the least an ident server doing
    stop's job does per query: stop's netlink lookup of the asked
    connection, an ID-sized record appended and fdatasync'ed with group
    commit before the reply, and the daemon's log line; "store"
    ("floor+st"): no lookup, the record in stop's own flat store (fsync =
    batch), the same log line. What stop costs above floor+d is its own
    per-query work (record, policy, store). "chained" ("floor+dc"): floor+d
    whose records are also chained and indexed in SQLite, the least way
    (floor_server.ChainedLog): floor+d with spec 8's store duties.
    "duties" ("floor+dcq"): floor+dc with stop's per-query duties too
    (parse, the real record, account, ``~/.ident``, the log line's
    fields), each with stop's own code and the least glue
    (floor_server.Duties): what stop costs above it is its structure.
    "store-duties" ("floor+stq"): the same duties with stop's own flat
    store (``fsync = batch``) in place of the least one."""

    NAMES = {None: "floor", "minimal": "floor+d", "store": "floor+st", "chained": "floor+dc",
             "duties": "floor+dcq", "store-duties": "floor+stq"}
    #: Per kind: the store option (given a data directory) and the other flags.
    OPTIONS = {"minimal": ("--minimal", ["--lookup"]),
               "store": ("--store", []),
               "chained": ("--minimal", ["--lookup", "--chained"]),
               "duties": ("--minimal", ["--lookup", "--chained", "--duties"]),
               "store-duties": ("--store", ["--lookup", "--duties"])}

    def __init__(self, workdir: pathlib.Path, kind: Optional[str] = None):
        self.proc: subprocess.Popen | None = None
        self.name = self.NAMES[kind]
        self.args = []
        if kind is not None:
            # A directory of its own: the ID and SV parts of hot_bench each start one.
            base = pathlib.Path(tempfile.mkdtemp(prefix=f"floor-{kind}-", dir=workdir))
            option, flags = self.OPTIONS[kind]
            self.args = [option, str(base / "data"), "--log", str(base / "floor.log"), *flags]

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "floor_server.py"),
                                      "--interface", THIS] + self.args, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        if not ready:
            raise RuntimeError("floor_server did not start")
        self.port = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def settle(self) -> None:
        pass


# -- the established connections ------------------------------------------------

class Holders:
    """Enough holder processes for N connections, PER_HOLDER each."""

    def __init__(self):
        self.holders: list[Holder] = []

    def grow(self, n: int) -> list[tuple[int, int]]:
        """Hold ``n`` connections in all; every (P1, P2) pair held."""
        pairs = []
        for i in range((n + PER_HOLDER - 1) // PER_HOLDER):
            if i == len(self.holders):
                self.holders.append(Holder())
            p2, ports = self.holders[i].grow(min(PER_HOLDER, n - i * PER_HOLDER))
            pairs += [(p1, p2) for p1 in ports]
        return pairs

    def stop(self) -> None:
        for h in self.holders:
            h.stop()


class Holder:
    """bench/holder.py running as nobody (system python), holding
    connections the queries ask about."""

    def __init__(self):
        nobody = pwd.getpwnam("nobody")
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        with open(os.path.join(ROOT, "bench", "holder.py")) as fh:
            code = fh.read()  # passed inline: nobody may not read the checkout
        self.proc = subprocess.Popen([python, "-c", code, THIS, REQUESTER],
                                     user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.uid = nobody.pw_uid

    def grow(self, n: int, timeout: float = 120.0) -> tuple[int, list[int]]:
        """Hold ``n`` connections; (P2, [P1, ...])."""
        self.proc.stdin.write(b"grow %d\n" % n)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"holder did not open {n} connections in {timeout} s")
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply or len(reply["ports"]) != n:
            raise RuntimeError(f"holder: {str(reply)[:200]}")
        return reply["listen_port"], reply["ports"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- measuring ---------------------------------------------------------------------

def write_pairs(path: pathlib.Path, pairs: list[tuple[int, int]]) -> str:
    path.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return str(path)


def measure(server, pairs_file: str, count: int, concurrency: int, time_limit: float,
            gen=None, suffix: str = "") -> dict:
    """One point: the load generator against ``server``; its figures plus
    the server's CPU ms per 1,000 replies and RSS, and the generator's own
    (``gen_ms_per_1k``).

    :param gen: a ``bench.cloadgen.CLoadgen`` (the C generator), or None
        for ``bench/loadgen.py`` (whose own CPU is then its process's).
    """
    server.settle()
    before = tree_cpu_seconds(server.pid)
    dest = f"{THIS}:{server.port}"
    if gen is not None:
        res = gen.run(dest, REQUESTER, pairs_file, count, concurrency, time_limit, suffix)
    else:
        cmd = [sys.executable, os.path.join(ROOT, "bench", "loadgen.py"),
               "--dest", dest, "--source", REQUESTER, "--pairs", pairs_file,
               "--count", str(count), "--concurrency", str(concurrency),
               "--time-limit", str(time_limit)]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit + 120)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr}")
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = json.loads(out.stdout)
        res["cpu_s"] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    server.settle()
    cpu = tree_cpu_seconds(server.pid) - before
    n = res["replies"]
    res["cpu_ms_per_1k"] = cpu * 1e6 / n if n else float("nan")
    res["gen_ms_per_1k"] = res["cpu_s"] * 1e6 / n if n else float("nan")
    res["rss_mb"] = rss_mb(server.pid)
    return res


def median_of(runs: list[dict]) -> dict:
    """One point from repeated runs: the median of each figure, the replies
    summed, and the range of CPU per 1,000 (to show the noise)."""
    def med(key):
        return statistics.median(r[key] for r in runs)
    out = dict(runs[-1])
    for key in ("rate", "p50_ms", "p99_ms", "cpu_ms_per_1k", "gen_ms_per_1k"):
        out[key] = med(key)
    out["rss_mb"] = runs[-1]["rss_mb"]
    out["userid"] = sum(r["userid"] for r in runs)
    out["errors"], out["failures"] = {}, {}
    for r in runs:
        for field in ("errors", "failures"):
            for k, v in r[field].items():
                out[field][k] = out[field].get(k, 0) + v
    cpus = [r["cpu_ms_per_1k"] for r in runs]
    out["cpu_range"] = f"{min(cpus):.0f}-{max(cpus):.0f}"
    out["runs"] = runs
    return out


def outcome(res: dict) -> str:
    parts = []
    if res["userid"]:
        parts.append(f"{res['userid']} USERID")
    parts += [f"{n} {w}" for w, n in sorted(res["errors"].items())]
    parts += [f"{n} failed ({why})" for why, n in sorted(res["failures"].items())]
    return ", ".join(parts) or "none"


ROW = "{:>6} {:>3}  {:<8} {:>8} {:>7} {:>7} {:>9} {:>13} {:>9} {:>7}  {}"
HEADER = ("N", "C", "server", "req/s", "p50 ms", "p99 ms", "CPU ms/1k", "CPU range",
          "gen ms/1k", "RSS MB", "replies")


def row(n, c, res: dict) -> str:
    return ROW.format(n, c, res["name"], f"{res['rate']:.0f}", f"{res['p50_ms']:.2f}",
                      f"{res['p99_ms']:.2f}", f"{res['cpu_ms_per_1k']:.0f}",
                      res.get("cpu_range", ""), f"{res['gen_ms_per_1k']:.0f}",
                      f"{res['rss_mb']:.1f}", outcome(res))


def ratio_row(n, c, ours: dict, theirs: dict) -> str:
    def r(key):
        return f"{ours[key] / theirs[key]:.2f}x" if theirs[key] else "-"
    return ROW.format("", "", "ratio", r("rate"), r("p50_ms"), r("p99_ms"), r("cpu_ms_per_1k"),
                      "", "", r("rss_mb"), "stop / oidentd")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small matrix (~1 min)")
    ap.add_argument("--sockets", type=int, nargs="+", help="N: established connections")
    ap.add_argument("--clients", type=int, nargs="+", help="C: concurrent clients")
    ap.add_argument("--queries", type=int, help="M: queries per point and run")
    ap.add_argument("--runs", type=int, help="runs per point (medians are printed)")
    ap.add_argument("--no-user-sockets", type=int, help="established connections for NO-USER")
    ap.add_argument("--no-user-seconds", type=float, default=30.0,
                    help="time bound of each NO-USER run")
    ap.add_argument("--workdir", default="/var/tmp",
                    help="parent of the temporary data dir (on a real disk: fsync matters)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--floor", action="store_true",
                    help="add a bare Twisted LineReceiver (bench/floor_server.py) to each point")
    ap.add_argument("--floor-store", action="store_true",
                    help="add the floor server with a durable record and a log line per query")
    ap.add_argument("--loadgen", choices=("c", "python"), default="c",
                    help="load generator: bench/loadgen.c built now (default) or bench/loadgen.py")
    ap.add_argument("--pin", help="run the C load generator under taskset -c PIN (e.g. 1)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("compare_oidentd: run as root (oidentd, connections owned by nobody)",
              file=sys.stderr)
        return 2
    if shutil.which("oidentd") is None:
        print("compare_oidentd: oidentd is not installed (apt-get install oidentd)",
              file=sys.stderr)
        return 2
    sockets = a.sockets or ([100, 1000] if a.quick else [100, 1000, 10000])
    clients = a.clients or ([1, 50] if a.quick else [1, 10, 50])
    queries = a.queries or (500 if a.quick else 3000)
    runs = a.runs or (1 if a.quick else 3)
    no_user_sockets = a.no_user_sockets or (5000 if a.quick else 20000)
    no_user_seconds = min(a.no_user_seconds, 10.0) if a.quick else a.no_user_seconds

    raise_nofile()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stop-bench-", dir=a.workdir))
    servers = [StopServer(workdir), OidentdServer(workdir)]
    if a.floor:
        servers.append(FloorServer(workdir))
    if a.floor_store:
        servers.append(FloorServer(workdir, "store"))
    holder = None
    results: list[dict] = []
    gen = None
    try:
        if a.loadgen == "c":
            from cloadgen import CLoadgen
            gen = CLoadgen(a.pin)
        for s in servers:
            s.start()
        holder = Holders()
        print(f"stop: twistd stop (pid {servers[0].pid}, {sys.executable}), flat store, "
              f"fsync=batch (durable: records fdatasync'ed before their replies), data in "
              f"{workdir} ({fs_type(str(workdir))}); max_connections_per_host=256; "
              f"one log line per query")
        oid_version = subprocess.run(["oidentd", "-v"], capture_output=True, text=True,
                                     timeout=10).stdout.split("\n")[0]
        print(f"oidentd: {oid_version} (pid {servers[1].pid}), -i -S -o: foreground, forks per "
              f"connection, runs as nobody, logs each query to a file")
        print(f"load: {gen.describe() if gen else 'bench/loadgen.py'} in its own process, "
              f"one query per connection, clients "
              f"from {REQUESTER} to {THIS}, closed with RST after the reply (no TIME_WAIT); "
              f"M = {queries} queries per run, {runs} runs per point (servers alternate), "
              f"medians shown; {os.cpu_count()} CPUs")
        print(f"connections asked about: held by a process running as nobody")
        print()
        header = ROW.format(*HEADER)
        print(header)
        warm = True
        flip = False
        for n in sockets:
            held = holder.grow(n)
            random.shuffle(held)
            pairs = write_pairs(workdir / f"id-{n}.txt", held)
            if warm:  # imports, caches, first files: not measured
                for s in servers:
                    measure(s, pairs, 300, 10, 30, gen)
                warm = False
            for c in clients:
                by_server: dict[str, list] = {s.name: [] for s in servers}
                for _ in range(runs):
                    for s in (servers[::-1] if flip else servers):
                        by_server[s.name].append(measure(s, pairs, queries, c, 120, gen))
                    flip = not flip
                point = {}
                for name, rs in by_server.items():
                    res = median_of(rs)
                    res.update(name=name, n=n, c=c, kind="ID")
                    point[name] = res
                    results.append(res)
                for name in by_server:
                    print(row(n, c, point[name]))
                print(ratio_row(n, c, point["stop"], point["oidentd"]))
                sys.stdout.flush()

        used = {p1 for p1, _ in holder.grow(no_user_sockets)}
        missing = [(p1, NO_USER_PORT) for p1 in range(1024, 65536) if p1 not in used][:5000]
        pairs = write_pairs(workdir / "no-user.txt", missing)
        print()
        print(f"NO-USER flood: {no_user_sockets} established connections, queries for pairs that "
              f"do not exist, C = 10, at most {queries} queries or {no_user_seconds:.0f} s each")
        print(header)
        nouser = {}
        for s in servers[:2]:
            res = median_of([measure(s, pairs, queries, 10, no_user_seconds, gen)])
            res.update(name=s.name, n=no_user_sockets, c=10, kind="NO-USER")
            nouser[s.name] = res
            results.append(res)
            print(row(no_user_sockets, 10, res))
        print(ratio_row(no_user_sockets, 10, nouser["stop"], nouser["oidentd"]))
    finally:
        if holder is not None:
            holder.stop()
        for s in servers:
            s.stop()
        if gen is not None:
            gen.close()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report_targets(results, sockets, clients, no_user_sockets)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def report_targets(results: list[dict], sockets, clients, no_user_sockets) -> None:
    """Print each target of issue 3 with the measured ratio and PASS/MISS."""
    def get(name, n, c, kind="ID"):
        for r in results:
            if (r["name"], r["n"], r["c"], r["kind"]) == (name, n, c, kind):
                return r
        return None

    print()
    print("Targets (stop / oidentd unless stated):")
    cpu = [(n, c, get("stop", n, c)["cpu_ms_per_1k"] / get("oidentd", n, c)["cpu_ms_per_1k"])
           for n in sockets for c in clients]
    worst = max(cpu, key=lambda t: t[2])
    print(f"  CPU per 1,000 ID queries <= 0.5x oidentd: worst {worst[2]:.2f}x (N={worst[0]}, "
          f"C={worst[1]}); {sum(x <= 0.5 for *_, x in cpu)}/{len(cpu)} points  "
          f"{verdict(all(x <= 0.5 for *_, x in cpu))}")
    if 50 in clients:
        rate = [(n, get("stop", n, 50)["rate"] / get("oidentd", n, 50)["rate"]) for n in sockets]
        print(f"  req/s at 50 clients >= 1.5x oidentd: "
              + ", ".join(f"N={n}: {x:.2f}x" for n, x in rate)
              + f"  {verdict(all(x >= 1.5 for _, x in rate))}")
    p99 = [(n, c, get("stop", n, c)["p99_ms"] / get("oidentd", n, c)["p99_ms"])
           for n in sockets for c in clients]
    worst = max(p99, key=lambda t: t[2])
    print(f"  p99 <= oidentd's: worst {worst[2]:.2f}x (N={worst[0]}, C={worst[1]}); "
          f"{sum(x <= 1.0 for *_, x in p99)}/{len(p99)} points  "
          f"{verdict(all(x <= 1.0 for *_, x in p99))}")
    lo, hi = min(sockets), max(sockets)
    if lo != hi:
        cost = [(c, get("stop", hi, c)["cpu_ms_per_1k"] / get("stop", lo, c)["cpu_ms_per_1k"])
                for c in clients]
        print(f"  stop's CPU per query at N={hi} <= 1.2x at N={lo}: "
              + ", ".join(f"C={c}: {x:.2f}x" for c, x in cost)
              + f"  {verdict(all(x <= 1.2 for _, x in cost))}")
    nu = get("stop", no_user_sockets, 10, "NO-USER")["rate"] / \
        get("oidentd", no_user_sockets, 10, "NO-USER")["rate"]
    print(f"  NO-USER rate at {no_user_sockets} sockets >= 20x oidentd: {nu:.0f}x  "
          f"{verdict(nu >= 20)}")


if __name__ == "__main__":
    sys.exit(main())
