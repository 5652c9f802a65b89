"""The hot-path targets of issue 12, each printed with PASS/MISS: durable ID
side by side with Debian's oidentd, and SV on a fresh connection.

Run as root, with the interpreter that has Twisted (``dev/test`` makes
``.venv``); everything is on loopback, bounded in count and time:

    .venv/bin/python bench/hot_bench.py            # both parts, ~6 min
    .venv/bin/python bench/hot_bench.py --quick    # smoke run, ~2 min
    .venv/bin/python bench/hot_bench.py --only id  # or --only sv

ID (as ``compare_oidentd.py``: ``twistd stop`` with the flat store and
``fsync = batch``, oidentd, established connections held by nobody, one
query per connection, servers alternating, medians of ``--runs``): at
N = 1,000 sockets and C = 1, 10, 50 clients, req/s and daemon CPU per 1,000
queries against oidentd's, p99 at 1 client; and stop's CPU per query at
N = 10,000 against N = 100. The load comes from ``bench/loadgen.c``, built
now with gcc into a temporary directory (``--pin CPU`` runs it under
taskset); its own CPU per 1,000 queries is printed beside the daemon's.
Beside the p99 target, the disk's own p50 / p99 of writing a record into
room written ahead (as the flat store does) and fdatasync'ing it (a durable
reply waits for one; oidentd writes none).

SV on a fresh connection: a second daemon (``open_files = yes``) is asked
about a connection opened just before each query (a new socket every time,
so the daemon has never seen it) by a helper process running as nobody,
detached (its parent is PID 1), driven by signals and answering in a file,
so the walk meets nothing of the bench (it follows pipes, FIFOs and local
sockets: the FIFOs that drove it before led every walk into the bench's
own process tree and up to PID 1's other children). Medians of ``--sv-queries`` queries of each
kind, ID and SV alternating in blocks: on the quiet host; with
``--idle`` extra idle processes (3 std fds, a pipe, a file each; run as
``--idle-user``); with ``--time-wait`` TIME_WAIT and ``--established``
established sockets made on loopback (the TIME_WAIT ones expire by
themselves within 60 s; the measurement runs well inside that). Then the
daemon's CPU share of one core while answering SV at 600 requests per
minute for ``--cpu-seconds`` (measured on the quiet host, right
after the first point); with ``--floor``, ID alone at that rate from the
bare floor, floor+d, floor+dcq and oidentd, the share of the 1 % that ID
takes before any walk.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pwd
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare_oidentd as co  # noqa: E402
from cloadgen import CLoadgen  # noqa: E402
from tests.integration.harness import Daemon  # noqa: E402
from tests.integration.netns import stop_process  # noqa: E402

THIS, REQUESTER = co.THIS, co.REQUESTER
TW_ADDR = "127.0.0.3"           # where the TIME_WAIT sockets are made
LINGER_RESET = struct.pack("ii", 1, 0)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IO_TIMEOUT = 20.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- helpers run as nobody -----------------------------------------------------

FRESH_CODE = r'''
import os, signal, socket, sys, time
out, here, there = sys.argv[1:4]
if os.fork():
    os._exit(0)
os.setsid()                       # detached: reparented to PID 1 (or a subreaper)
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.close(null)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
listener = socket.socket()
listener.bind((there, 0))
listener.listen(16)
lport = listener.getsockname()[1]

def put(text):
    # A file written whole and renamed: no descriptor stays open to it.
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)

put("ready %d %d 0\n" % (os.getpid(), lport))
held, seq = [], 0
deadline = time.monotonic() + 3600
while time.monotonic() < deadline:
    info = signal.sigtimedwait({signal.SIGUSR1, signal.SIGTERM}, 60)
    if info is None:
        continue
    if info.si_signo == signal.SIGTERM:
        break
    for s in held:
        s.close()
    c = socket.socket()
    c.setsockopt(socket.SOL_IP, 24, 1)   # IP_BIND_ADDRESS_NO_PORT
    c.bind((here, 0))
    c.connect((there, lport))
    a, _ = listener.accept()
    held = [c, a]
    seq += 1
    put("conn %d %d %d\n" % (c.getsockname()[1], lport, seq))
'''

IDLE_CODE = r'''
import os, signal, sys, time
n = int(sys.argv[1])
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 4096)
        r, w = os.pipe()
        f = os.open("/etc/hostname", os.O_RDONLY)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(900)
        os._exit(0)
    kids.append(pid)
print(len(kids), flush=True)
sys.stdin.read()                  # until the bench closes it (or dies)
for pid in kids:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
for pid in kids:
    os.waitpid(pid, 0)
'''


def system_python() -> str:
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


class FreshHolder:
    """Opens a new connection THIS:P1 -> REQUESTER:P2 on request (closing
    the previous one); runs as nobody, detached, in its own session. It is
    driven by signals (SIGUSR1: a new connection; SIGTERM: exit) and
    answers in a file it rewrites whole: no pipe, FIFO or socket joins it
    to the bench, so the walk from its socket meets its own process and
    its parent (PID 1), not the bench's process tree (the walk follows
    FIFOs too)."""

    def __init__(self):
        nobody = pwd.getpwnam("nobody")
        self.dir = tempfile.mkdtemp(prefix="stop-hot-fresh-")
        os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
        self.out = os.path.join(self.dir, "out")
        self.pid = None
        self._seq = 0
        subprocess.run([system_python(), "-c", FRESH_CODE, self.out, THIS, REQUESTER],
                       user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=self.dir, check=True, timeout=30)
        words = self._answer(lambda w: w[0] == "ready")
        self.pid = int(words[1])

    def _answer(self, done) -> list[str]:
        """The words of the answer file once ``done(words)``; bounded."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                with open(self.out) as f:
                    words = f.read().split()
                if len(words) == 4 and done(words):
                    return words
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("fresh holder did not answer")
            time.sleep(0.0005)

    def new(self) -> tuple[int, int]:
        """A new connection; its (P1, P2)."""
        self._seq += 1
        os.kill(self.pid, signal.SIGUSR1)
        _, p1, p2, _ = self._answer(lambda w: w[0] == "conn" and int(w[3]) == self._seq)
        return int(p1), int(p2)

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


class IdleProcesses:
    """``n`` idle processes (the paper's Table II load), children of one
    helper process running as ``user``; stopped by closing its stdin."""

    def __init__(self, n: int, user: str):
        pw = pwd.getpwnam(user)
        self.proc = subprocess.Popen([system_python(), "-c", IDLE_CODE, str(n)],
                                     user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if not select.select([self.proc.stdout], [], [], 120)[0]:
            self.stop()
            raise RuntimeError(f"{n} idle processes did not start in 120 s")
        self.n = int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)


def make_time_wait(n: int, listeners: int = 8) -> int:
    """Leave ``n`` sockets in TIME_WAIT on TW_ADDR (the client closes
    first); bounded by count and 60 s. They expire by themselves (60 s).
    :return: how many were made."""
    ls = []
    for _ in range(listeners):
        s = socket.socket()
        s.bind((TW_ADDR, 0))
        s.listen(1024)
        ls.append(s)
    made, deadline = 0, time.monotonic() + 60
    try:
        while made < n and time.monotonic() < deadline:
            batch = []
            for i in range(min(256, n - made)):
                c = socket.socket()
                c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                c.bind((TW_ADDR, 0))
                c.connect(ls[(made + i) % listeners].getsockname())
                batch.append(c)
            for i, c in enumerate(batch):
                a, _ = ls[(made + i) % listeners].accept()
                c.close()      # FIN first: this end goes to TIME_WAIT
                a.close()
            made += len(batch)
    finally:
        for s in ls:
            s.close()
    return made


def tcp_summary() -> str:
    """``ss -s``'s TCP line (established, time-wait counts)."""
    out = subprocess.run(["ss", "-s"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("TCP:"):
            return " ".join(line.split()[1:])
    return "?"


def process_count() -> int:
    return sum(1 for e in os.listdir("/proc") if e.isdigit())


# -- asking the SV daemon ------------------------------------------------------

def ask_once(port: int, line: bytes) -> tuple[bytes, float]:
    """One query to THIS:port on a new connection from REQUESTER (closed
    with a reset); (reply, seconds from connect to the reply line)."""
    s = socket.socket()
    try:
        s.settimeout(IO_TIMEOUT)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        s.bind((REQUESTER, 0))
        t0 = time.perf_counter()
        s.connect((THIS, port))
        s.sendall(line + b"\r\n")
        buf = b""
        while b"\n" not in buf and len(buf) < 1024:
            chunk = s.recv(1024)
            if not chunk:
                break
            buf += chunk
        return buf, time.perf_counter() - t0
    finally:
        s.close()


class SvDaemon:
    """``twistd stop`` on THIS with the bench's settings and open_files."""

    def __init__(self, workdir: pathlib.Path):
        settings = dict(co.STOP_SETTINGS, open_files="yes")
        base = workdir / "sv"
        base.mkdir()
        self.daemon = Daemon(base, settings, interfaces=(THIS,))

    def start(self) -> None:
        self.daemon.start()
        self.pid = self.daemon.proc.pid
        self.port = self.daemon.port

    def stop(self) -> None:
        self.daemon.stop()

    def cpu(self) -> float:
        return co.tree_cpu_seconds(self.pid)

    def ask(self, line: bytes) -> tuple[bytes, float]:
        """One query on a new connection from REQUESTER; (reply, seconds
        from connect to the reply line)."""
        buf, t = ask_once(self.port, line)
        if b"USERID" not in buf:
            raise RuntimeError(f"daemon answered {buf!r}\n{self.daemon.read_log()[-2000:]}")
        return buf, t

    def index_notes(self) -> Counter:
        """How the daemon's SV walks got their index, from its records."""
        notes: Counter = Counter()
        for root, _dirs, files in os.walk(self.daemon.data_dir):
            for name in (n for n in files if n.endswith(".log")):
                with open(os.path.join(root, name), "rb") as f:
                    for line in f:
                        try:  # the record is the JSON object that ends the line
                            rec = json.loads(line[line.index(b" {") + 1:])
                        except ValueError:
                            continue
                        note = rec.get("processes", {}).get("index") if isinstance(
                            rec.get("processes"), dict) else None
                        if note:
                            notes["reused" if note.get("cached") else
                                  f"built ({note.get('why')})"] += 1
        return notes


def fresh_point(daemon: SvDaemon, fresh: FreshHolder, n: int, block: int = 10) -> dict:
    """Medians of ``n`` ID and ``n`` SV queries, each about a new
    connection, in alternating blocks; the daemon's CPU per query of each."""
    times: dict[str, list[float]] = {"ID": [], "SV": []}
    cpu = {"ID": 0.0, "SV": 0.0}
    while len(times["SV"]) < n:
        for kind, suffix in (("ID", b""), ("SV", b" : SV")):
            c0 = daemon.cpu()
            for _ in range(min(block, n - len(times[kind]))):
                p1, p2 = fresh.new()
                _, t = daemon.ask(b"%d, %d%s" % (p1, p2, suffix))
                times[kind].append(t)
            cpu[kind] += daemon.cpu() - c0
    return {k: {"median_ms": statistics.median(v) * 1e3,
                "p90_ms": sorted(v)[int(len(v) * 0.9) - 1] * 1e3,
                "cpu_ms": cpu[k] / len(v) * 1e3} for k, v in times.items()}


def sv_cpu_share(daemon: SvDaemon, fresh: FreshHolder, per_minute: int,
                 seconds: float, suffix: bytes = b" : SV") -> tuple[float, float]:
    """(daemon CPU % of one core, achieved rate per minute) for SV
    queries (``suffix`` b"": ID) about fresh connections paced at
    ``per_minute``."""
    interval = 60.0 / per_minute
    count = max(1, round(per_minute * seconds / 60.0))
    c0, w0 = daemon.cpu(), time.monotonic()
    nxt = w0
    for _ in range(count):
        p1, p2 = fresh.new()
        daemon.ask(b"%d, %d%s" % (p1, p2, suffix))
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - w0
    return 100 * (daemon.cpu() - c0) / max(elapsed, seconds), count / elapsed * 60


def paced_share(server, fresh: FreshHolder, per_minute: int, seconds: float) -> float:
    """CPU % of one core of ``server`` (a floor server) answering ID about
    fresh connections, one query per connection, paced at ``per_minute``."""
    interval = 60.0 / per_minute
    count = max(1, round(per_minute * seconds / 60.0))
    c0, w0 = co.tree_cpu_seconds(server.pid), time.monotonic()
    nxt = w0
    for _ in range(count):
        p1, p2 = fresh.new()
        buf, _ = ask_once(server.port, b"%d, %d" % (p1, p2))
        if b"USERID" not in buf:
            raise RuntimeError(f"{server.name} answered {buf!r}")
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - w0
    return 100 * (co.tree_cpu_seconds(server.pid) - c0) / max(elapsed, seconds)


def sync_latency(directory: pathlib.Path, count: int = 2000) -> tuple[float, float]:
    """(p50, p99) in ms of writing a record-sized line into a file in
    ``directory`` and fdatasync'ing it, one at a time with a short pause
    (as at one client), into room written ahead as stop's flat store does
    (stop.storage.entries.PREALLOC_BYTES of zeros, made durable first):
    the disk's share of a durable reply's latency."""
    from stop.storage.entries import PREALLOC_BYTES
    fd, path = tempfile.mkstemp(prefix="sync-", dir=directory)
    times = []
    try:
        line, off = b"x" * 400 + b"\n", 0
        room = max(PREALLOC_BYTES, count * len(line))
        os.pwrite(fd, bytes(room), 0)
        os.fsync(fd)
        for _ in range(count):
            t0 = time.perf_counter()
            off += os.pwrite(fd, line, off)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
            time.sleep(0.0003)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


# -- the two parts ------------------------------------------------------------

def id_part(a, gen: CLoadgen, workdir: pathlib.Path, targets: list) -> None:
    servers = [co.StopServer(workdir), co.OidentdServer(workdir)]
    floors = ()
    if a.floor:
        servers += [co.FloorServer(workdir), co.FloorServer(workdir, "minimal"),
                    co.FloorServer(workdir, "chained"), co.FloorServer(workdir, "duties"),
                    co.FloorServer(workdir, "store")]
        floors = ("floor", "floor+d", "floor+dc", "floor+dcq", "floor+st")
    holders = co.Holders()
    results: dict = {}
    try:
        for s in servers:
            s.start()
        print(f"ID: twistd stop (pid {servers[0].pid}), flat store, fsync=batch (records "
              f"fdatasync'ed before their replies), data in {workdir} "
              f"({co.fs_type(str(workdir))}), one log line per query; oidentd -i -S -o "
              f"(pid {servers[1].pid}, forks per connection, logs each query)")
        print(f"load: {gen.describe()}, one query per connection, from {REQUESTER} to {THIS}, "
              f"RST close; M = {a.queries} queries per run, {a.runs} runs per point, servers "
              f"alternating, medians; gen ms/1k = the generator's own CPU")
        print()
        print(co.ROW.format(*co.HEADER))
        flip = False
        points = [(a.sockets_main, c, names) for c in a.clients
                  for names in [("stop", "oidentd") + floors]]
        warm = True
        # The scale pair first, side by side: the same queries about
        # --sockets-low connections, alternately with and without
        # sockets-high - low more held by a second set of holders (closed
        # with resets: no TIME_WAIT left), so the store's growth between
        # two points far apart in time is not taken for the lookup's.
        low = holders.grow(a.sockets_low)
        pairs = co.write_pairs(workdir / f"id-{a.sockets_low}.txt", low)
        for s in servers:
            co.measure(s, pairs, 300, 10, 30, gen)
        warm = False
        scale: dict[int, list] = {a.sockets_low: [], a.sockets_high: []}
        for _ in range(a.runs):
            scale[a.sockets_low].append(co.measure(servers[0], pairs, a.queries,
                                                   a.scale_clients, 120, gen))
            extra = co.Holders()
            try:
                extra.grow(a.sockets_high - a.sockets_low)
                scale[a.sockets_high].append(co.measure(servers[0], pairs, a.queries,
                                                        a.scale_clients, 120, gen))
            finally:
                extra.stop()
        for n, rs in scale.items():
            res = co.median_of(rs)
            res.update(name="stop", n=n, c=a.scale_clients, kind="ID")
            results[(n, a.scale_clients, "stop")] = res
            print(co.row(n, a.scale_clients, res))
        for n, c, names in sorted(points, key=lambda p: p[0]):
            if (n, c, "stop") in results:
                continue
            held = holders.grow(n)
            random.shuffle(held)
            pairs = co.write_pairs(workdir / f"id-{n}.txt", held)
            chosen = [s for s in servers if s.name in names]
            if warm:
                for s in servers:
                    co.measure(s, pairs, 300, 10, 30, gen)
                warm = False
            runs: dict[str, list] = {s.name: [] for s in chosen}
            for _ in range(a.runs):
                for s in (chosen[::-1] if flip else chosen):
                    runs[s.name].append(co.measure(s, pairs, a.queries, c, 120, gen))
                flip = not flip
            for name, rs in runs.items():
                res = co.median_of(rs)
                res.update(name=name, n=n, c=c, kind="ID")
                results[(n, c, name)] = res
                print(co.row(n, c, res))
            if len(chosen) >= 2:
                print(co.ratio_row(n, c, results[(n, c, "stop")], results[(n, c, "oidentd")]))
            sys.stdout.flush()
    finally:
        holders.stop()
        for s in servers:
            s.stop()

    n = a.sockets_main
    want_rate = {1: 1.0, 10: 2.0, 50: 3.0}
    want_cpu = {1: 0.8, 10: 0.33, 50: 0.33}
    for c in a.clients:
        ours, theirs = results[(n, c, "stop")], results[(n, c, "oidentd")]
        r = ours["rate"] / theirs["rate"]
        want = want_rate.get(c, 1.0)
        targets.append((f"ID req/s, N={n}, C={c}: stop/oidentd >= {want:.1f}x",
                        f"{r:.2f}x ({ours['rate']:.0f} vs {theirs['rate']:.0f})", r >= want))
    for c in a.clients:
        ours, theirs = results[(n, c, "stop")], results[(n, c, "oidentd")]
        r = ours["cpu_ms_per_1k"] / theirs["cpu_ms_per_1k"]
        want = want_cpu.get(c, 0.33)
        targets.append((f"ID CPU/1k, N={n}, C={c}: stop/oidentd <= {want:.2f}x",
                        f"{r:.2f}x ({ours['cpu_ms_per_1k']:.0f} vs "
                        f"{theirs['cpu_ms_per_1k']:.0f} ms; gen {ours['gen_ms_per_1k']:.0f})",
                        r <= want))
    if 1 in a.clients:
        ours, theirs = results[(n, 1, "stop")], results[(n, 1, "oidentd")]
        targets.append((f"ID p99, N={n}, C=1: stop <= 1 ms",
                        f"{ours['p99_ms']:.2f} ms (oidentd {theirs['p99_ms']:.2f} ms)",
                        ours["p99_ms"] <= 1.0))
        # Not a target: how much of that millisecond the disk takes (a
        # durable reply waits for one fdatasync; oidentd writes none).
        p50, p99 = sync_latency(workdir)
        targets.append(("  (the disk: a record into room + fdatasync, p50 / p99)",
                        f"{p50:.2f} / {p99:.2f} ms", None))
    if floors:
        # Not targets: the same measures for the floors (bench/floor_server.py),
        # and whether the floor itself would meet stop's target: where it does
        # not, no per-query work of stop's can make stop meet it.
        for c in a.clients:
            theirs = results[(n, c, "oidentd")]
            parts = []
            for name in floors:
                fl = results[(n, c, name)]
                rate = fl["rate"] / theirs["rate"]
                cpu = fl["cpu_ms_per_1k"] / theirs["cpu_ms_per_1k"]
                p99 = f", p99 {fl['p99_ms']:.2f} ms" if c == 1 else ""
                verdicts = [verdict(rate >= want_rate.get(c, 1.0)),
                            verdict(cpu <= want_cpu.get(c, 0.33))]
                if c == 1:
                    verdicts.append(verdict(fl["p99_ms"] <= 1.0))
                parts.append(f"{name} {rate:.2f}x/{cpu:.2f}x{p99} ({'/'.join(verdicts)})")
            what = "req/s / oidentd's / CPU/1k / oidentd's" + (" / p99" if c == 1 else "")
            targets.append((f"  (floors, C={c}: {what})", "; ".join(parts), None))
    c = a.scale_clients
    hi = results[(a.sockets_high, c, "stop")]["cpu_ms_per_1k"]
    lo = results[(a.sockets_low, c, "stop")]["cpu_ms_per_1k"]
    targets.append((f"ID CPU/query, C={c}: N={a.sockets_high} / N={a.sockets_low} <= 1.1x",
                    f"{hi / lo:.2f}x ({hi:.0f} vs {lo:.0f} ms/1k)", hi / lo <= 1.1))


def sv_part(a, workdir: pathlib.Path, targets: list) -> None:
    daemon = SvDaemon(workdir)
    fresh = idle = holders = None
    rows = []

    def show(label, point, extra=""):
        id_, sv = point["ID"], point["SV"]
        line = (f"  {label:<34} ID {id_['median_ms']:6.2f} ms (p90 {id_['p90_ms']:6.2f}, "
                f"CPU {id_['cpu_ms']:5.2f})   SV {sv['median_ms']:6.2f} ms (p90 "
                f"{sv['p90_ms']:6.2f}, CPU {sv['cpu_ms']:5.2f})   SV/ID "
                f"{sv['median_ms'] / id_['median_ms']:5.2f}x{extra}")
        rows.append(line)
        print(line)
        sys.stdout.flush()

    try:
        daemon.start()
        fresh = FreshHolder()
        print()
        print(f"SV on a fresh connection: twistd stop (pid {daemon.pid}), open_files = yes, "
              f"flat store, fsync=batch; a new connection {THIS}:P1 -> {REQUESTER}:P2 for every "
              f"query, held by pid {fresh.pid} (nobody, parent "
              f"{co._stat_fields(fresh.pid)[1]}); medians of {a.sv_queries} queries of each "
              f"kind (latency from connect to reply, client in Python; CPU = the daemon's "
              f"per query, ms)")
        for _ in range(5):  # warm: imports, first files, first index
            p1, p2 = fresh.new()
            daemon.ask(b"%d, %d : SV" % (p1, p2))
            daemon.ask(b"%d, %d" % (p1, p2))
        quiet = fresh_point(daemon, fresh, a.sv_queries)
        show(f"quiet host ({process_count()} processes)", quiet)
        r = quiet["SV"]["median_ms"] / quiet["ID"]["median_ms"]
        targets.append(("SV fresh / ID fresh, quiet host <= 3x", f"{r:.2f}x", r <= 3.0))

        # On the quiet host too (before the TIME_WAIT sockets, which last 60 s).
        share, achieved = sv_cpu_share(daemon, fresh, 600, a.cpu_seconds)
        id_share, _ = sv_cpu_share(daemon, fresh, 600, a.cpu_seconds, b"")
        print(f"  SV (open_files), fresh connections, 600/min for {a.cpu_seconds:g} s: daemon "
              f"CPU {share:.2f} % of one core ({achieved:.0f}/min achieved); ID the same way: "
              f"{id_share:.2f} % (the floor under it)")
        targets.append(("SV+open_files at 600/min: daemon CPU <= 1 % of a core",
                        f"{share:.2f} %", share <= 1.0 and achieved >= 570))
        if a.floor:
            # What ID alone costs at this rate, where nothing is shared
            # between queries (each wakes a cold process): the floors, and
            # oidentd (a process forked per connection).
            shares = {}
            servers = [co.FloorServer(workdir), co.FloorServer(workdir, "minimal"),
                       co.FloorServer(workdir, "duties")]
            if shutil.which("oidentd"):
                servers.append(co.OidentdServer(workdir))
            for server in servers:
                server.start()
                try:
                    for _ in range(3):  # warm: imports, first files
                        p1, p2 = fresh.new()
                        ask_once(server.port, b"%d, %d" % (p1, p2))
                    shares[server.name] = paced_share(server, fresh, 600, a.cpu_seconds)
                finally:
                    server.stop()
            print("  ID alone the same way, CPU % of one core: " + ", ".join(
                f"{name} {share:.2f} %" for name, share in shares.items()) +
                  " (floor: bare Twisted; floor+d: + the lookup, a durable record and a log "
                  "line; floor+dcq: + the chain, the index and stop's per-query duties)")
            for name in ("floor+d", "floor+dcq"):
                targets.append((f"  ({name}, ID at 600/min; room left under 1 %)",
                                f"{shares[name]:.2f} %; {max(0.0, 1.0 - shares[name]):.2f} %",
                                None))

        idle = IdleProcesses(a.idle, a.idle_user)
        time.sleep(1.0)
        loaded = fresh_point(daemon, fresh, a.sv_queries)
        show(f"+{idle.n} idle processes ({a.idle_user})", loaded)
        idle.stop()
        idle = None
        r = loaded["SV"]["median_ms"] / loaded["ID"]["median_ms"]
        targets.append((f"SV fresh / ID fresh, +{a.idle} idle processes <= 5x", f"{r:.2f}x",
                        r <= 5.0))

        # The quiet figure again, just before the sockets are made: the
        # first one is minutes old by now, and a host that slowed down
        # meanwhile (a noisy VM: ID and SV alike) must not read as the
        # sockets' cost. The target uses this one; both are printed.
        time.sleep(1.0)
        again = fresh_point(daemon, fresh, a.sv_queries)
        show("quiet again, before the sockets", again)

        holders = co.Holders()
        holders.grow(a.established)
        t0 = time.monotonic()
        made = make_time_wait(a.time_wait)
        before = tcp_summary()
        sockets = fresh_point(daemon, fresh, a.sv_queries)
        after = tcp_summary()
        show(f"+{made} TIME_WAIT, +{a.established} estab.", sockets,
             f"   (ss -s TCP: before {before}; after {after}; {time.monotonic() - t0:.0f} s "
             f"after the first TIME_WAIT)")
        holders.stop()
        holders = None
        r = sockets["SV"]["median_ms"] / again["SV"]["median_ms"]
        first = sockets["SV"]["median_ms"] / quiet["SV"]["median_ms"]
        targets.append((f"SV fresh with {a.time_wait} TIME_WAIT + {a.established} estab. / "
                        "quiet <= 1.5x", f"{r:.2f}x (to the first quiet point: {first:.2f}x)",
                        r <= 1.5))

        notes = daemon.index_notes()
        print("  index, per SV record: " + ", ".join(f"{k}: {v}" for k, v in
                                                      sorted(notes.items())))
    finally:
        if holders is not None:
            holders.stop()
        if idle is not None:
            idle.stop()
        if fresh is not None:
            fresh.stop()
        daemon.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (fewer queries, 1 run)")
    ap.add_argument("--only", choices=("id", "sv"), help="run one part")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--queries", type=int, help="ID: queries per run and point (4000)")
    ap.add_argument("--runs", type=int, help="ID: runs per point, medians (3; >= 2)")
    ap.add_argument("--sockets-main", type=int, default=1000)
    ap.add_argument("--sockets-low", type=int, default=100)
    ap.add_argument("--sockets-high", type=int, default=10000)
    ap.add_argument("--scale-clients", type=int, default=10,
                    help="C of the N=low vs N=high comparison")
    ap.add_argument("--pin", help="run the C load generator under taskset -c PIN")
    ap.add_argument("--floor", action="store_true",
                    help="ID: also the floors of bench/floor_server.py (floor, floor+d, "
                         "floor+dc, floor+dcq, floor+st; bench/README.rst), at N = "
                         "--sockets-main")
    ap.add_argument("--sv-queries", type=int, help="SV: queries of each kind per point (100)")
    ap.add_argument("--idle", type=int, default=1000, help="SV: extra idle processes")
    ap.add_argument("--idle-user", default="daemon", help="SV: user the idle processes run as")
    ap.add_argument("--time-wait", type=int, default=20000)
    ap.add_argument("--established", type=int, default=10000)
    ap.add_argument("--cpu-seconds", type=float, help="SV: seconds at 600/min (30)")
    ap.add_argument("--workdir", default="/var/tmp", help="parent of the data dirs (a real disk)")
    a = ap.parse_args(argv)
    a.queries = a.queries or (1500 if a.quick else 4000)
    a.runs = a.runs or (1 if a.quick else 3)
    a.sv_queries = a.sv_queries or (30 if a.quick else 100)
    a.cpu_seconds = a.cpu_seconds or (10.0 if a.quick else 30.0)
    if os.geteuid() != 0:
        print("hot_bench: run as root (oidentd, connections owned by nobody)", file=sys.stderr)
        return 2
    if a.only != "sv" and shutil.which("oidentd") is None:
        print("hot_bench: oidentd is not installed (apt-get install oidentd)", file=sys.stderr)
        return 2
    co.raise_nofile()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"hot_bench: {os.cpu_count()} CPUs, load average {' '.join(load)} at the start, "
          f"{process_count()} processes, Python {sys.version.split()[0]}"
          f"{'; QUICK run: not for quoting' if a.quick else ''}")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stop-hot-", dir=a.workdir))
    targets: list = []
    gen = None
    try:
        if a.only != "sv":
            gen = CLoadgen(a.pin)
            id_part(a, gen, workdir, targets)
        if a.only != "id":
            sv_part(a, workdir, targets)
    finally:
        if gen is not None:
            gen.close()
        shutil.rmtree(workdir, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print()
    print(f"Targets of issue 12 (load average {' '.join(load)} at the end):")
    for label, value, ok in targets:
        print(f"  {label:<60} {value:<44} {'' if ok is None else verdict(ok)}")
    counted = [ok for *_, ok in targets if ok is not None]
    print(f"  {sum(counted)}/{len(counted)} pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
