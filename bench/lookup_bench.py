#!/usr/bin/env python3
"""Time every socket lookup backend side by side on N established loopback
connections (N = 100, 1000, 10000 by default): netlink, procfs and psutil
(forced on Linux), in one run, so their ratios hold on a shared machine.

    .venv/bin/python bench/lookup_bench.py [--sizes 100,1000,10000] [--lookups 2000]

Each size opens connections until N exist. 10000 connections are ~20000
sockets, more than one process may hold under a hard RLIMIT_NOFILE of
20000: the client sides stay here, a forked child accepts and holds the
server sides, and each raises its soft limit to ~N + 256. Then for each backend
it times, per lookup (µs, median and p99):

- ``hit``: an outbound connection (accepted False: the answer that gets a
  token; netlink makes one exact request plus the listener dumps);
- ``miss``: a 4-tuple with no connection at all;
- ``miss-listen``: the listening port with an unknown remote port (the
  kernel answers with the listener, which is rejected);
- ``exact``: the netlink exact request alone (no listener check), to
  compare with pyroute2, which does only that here.

pyroute2, if importable (it is not a dependency; e.g.
``pip install --target /tmp/pr2 pyroute2`` and ``PYTHONPATH=/tmp/pr2``),
is timed on the same exact request through ``nlm_request``.
procfs and psutil are slow (they read the whole table per query; psutil
also every process's descriptors, to map sockets to processes): they get
``--slow-lookups`` samples, and their answers are checked against netlink's
first (psutil has no inode: compared with it set to 0). Ratios printed at
the end: each backend / netlink, and cost at the largest N / cost at the
smallest N.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import resource
import select
import socket
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stop.os.linux.lookup import NetlinkLookup  # noqa: E402
from stop.os.linux.procnet import ProcfsLookup  # noqa: E402
from stop.os.portable import PsutilLookup  # noqa: E402
from stop.os.linux.sockdiag import host_key  # noqa: E402
from stop.model import Endpoint  # noqa: E402

SERVERS = [f"127.0.0.{i}" for i in range(60, 64)]  # spread over 4 listeners


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE to ``want`` if possible; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Pool:
    """Listeners on SERVERS, a child process that accepts and holds the
    server side of every connection, and the client sockets (here).

    Splitting the two sides over two processes halves the descriptors each
    needs (10000 connections are 20000 sockets, more than a default hard
    RLIMIT_NOFILE of 20000 allows one process)."""

    def __init__(self, max_connections: int, deadline_s: float = 900) -> None:
        self.servers = []
        listeners = []
        for host in SERVERS:
            s = socket.socket()
            s.bind((host, 0))
            s.listen(4096)
            listeners.append(s)
            self.servers.append(s.getsockname())
        stop_r, self._stop_w = os.pipe()
        self.holder = os.fork()
        if self.holder == 0:  # the child: accept until told to stop
            os.close(self._stop_w)
            _hold(listeners, stop_r, max_connections, deadline_s)
        os.close(stop_r)
        for s in listeners:
            s.close()
        self.clients: list[socket.socket] = []

    def grow(self, n: int) -> None:
        """Open connections until n exist (the child accepts them)."""
        while len(self.clients) < n:
            c = socket.socket()
            c.connect(self.servers[len(self.clients) % len(self.servers)])
            self.clients.append(c)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        os.close(self._stop_w)  # EOF tells the holder to exit
        _, status = os.waitpid(self.holder, 0)
        if status:
            print(f"# holder process exited with status {status}", file=sys.stderr)


def _hold(listeners: list[socket.socket], stop_r: int, limit: int, deadline_s: float) -> None:
    """Child body: accept up to ``limit`` connections and keep them until
    ``stop_r`` reaches EOF or ``deadline_s`` passes. Never returns."""
    code = 1
    try:
        held = []
        by_fd = {s.fileno(): s for s in listeners}
        poller = select.poll()  # not select(): held sockets go past fd 1024
        for fd in [stop_r, *by_fd]:
            poller.register(fd, select.POLLIN)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            ready = [fd for fd, _ in poller.poll(1000)]
            if stop_r in ready:
                code = 0
                break
            for fd in ready:
                if len(held) < limit:
                    held.append(by_fd[fd].accept()[0])
    finally:
        os._exit(code)


def queries(pool: Pool, count: int, rng: random.Random) -> dict[str, list[tuple[Endpoint, Endpoint]]]:
    """``count`` (local, remote) queries of each kind."""
    hits, misses, traps = [], [], []
    used = {c.getsockname()[1] for c in pool.clients}
    for _ in range(count):
        c = pool.clients[rng.randrange(len(pool.clients))]
        hits.append((Endpoint(*c.getsockname()), Endpoint(*c.getpeername())))
        port = rng.randrange(1024, 65536)
        while port in used:
            port = rng.randrange(1024, 65536)
        server = pool.servers[rng.randrange(len(pool.servers))]
        misses.append((Endpoint("127.0.0.1", port), Endpoint(*server)))
        traps.append((Endpoint(*server), Endpoint("127.0.0.1", port)))
    return {"hit": hits, "miss": misses, "miss-listen": traps}


def timed(fn: Callable[[Endpoint, Endpoint], object], qs: list[tuple[Endpoint, Endpoint]]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for local, remote in qs:
        t0 = clock()
        fn(local, remote)
        out.append((clock() - t0) / 1000)
    return out


def summary(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))]


def pyroute2_exact() -> Callable[[Endpoint, Endpoint], object] | None:
    """The exact sock_diag request through pyroute2, or None if absent."""
    try:
        from pyroute2 import DiagSocket
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return None
    ds = DiagSocket()
    ds.bind()

    def words(key: bytes) -> tuple[int, ...]:
        # pyroute2 packs idiag_src/dst as four big-endian 32-bit words.
        raw = key + b"\0" * (16 - len(key))
        return tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))

    def find(local: Endpoint, remote: Endpoint) -> object:
        req = inet_diag_req()
        req["sdiag_family"] = socket.AF_INET
        req["sdiag_protocol"] = socket.IPPROTO_TCP
        req["idiag_states"] = 0
        req["idiag_ext"] = 0
        req["idiag_sport"] = local.port
        req["idiag_dport"] = remote.port
        req["idiag_src"] = words(host_key(local.host)[0])
        req["idiag_dst"] = words(host_key(remote.host)[0])
        req["idiag_if"] = 0
        req["idiag_cookie"] = 0xFFFFFFFFFFFFFFFF
        try:
            return list(ds.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST))
        except NetlinkError:
            return None

    find.close = ds.close  # type: ignore[attr-defined]
    return find


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--lookups", type=int, default=2000, help="lookups per kind (fast backends)")
    ap.add_argument("--slow-lookups", type=int, default=200,
                    help="lookups per kind for procfs and psutil")
    ap.add_argument("--seed", type=int, default=113)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rng = random.Random(args.seed)

    limit = raise_nofile(max(sizes) + 256)
    if max(sizes) + 64 > limit:
        print(f"RLIMIT_NOFILE is {limit}: cannot hold {max(sizes)} connections", file=sys.stderr)
        return 1

    netlink = NetlinkLookup()
    slow = {"procfs": ProcfsLookup(), "psutil": PsutilLookup()}
    pr2 = pyroute2_exact()
    backends: list[tuple[str, Callable, int, tuple[str, ...]]] = [
        ("netlink", netlink.find, args.lookups, ("hit", "miss", "miss-listen")),
        ("netlink", lambda lo, re: netlink.exact_raw(lo, re), args.lookups, ("exact",)),
    ] + [(name, b.find, args.slow_lookups, ("hit", "miss", "miss-listen"))
         for name, b in slow.items()]
    if pr2 is not None:
        backends.append(("pyroute2", pr2, args.lookups, ("exact",)))

    pool = Pool(max(sizes))
    results: dict[tuple[str, str, int], tuple[float, float]] = {}
    try:
        for n in sizes:
            t0 = time.monotonic()
            pool.grow(n)
            print(f"# {n} connections open ({time.monotonic() - t0:.1f} s to open)", file=sys.stderr)
            qs = queries(pool, args.lookups, rng)
            qs["exact"] = qs["hit"]
            for name, fn, count, kinds in backends:
                for kind in kinds:
                    if name in slow and kind == "hit":
                        # sanity: the backends must agree before we time them
                        lo, re = qs["hit"][0]
                        want = netlink.find(lo, re)
                        if name == "psutil":
                            want = dataclasses.replace(want, inode=0)
                        assert slow[name].find(lo, re) == want, name
                    fn(*qs[kind][0])  # warm up (opens the netlink socket)
                    results[(name, kind, n)] = summary(timed(fn, qs[kind][:count]))
    finally:
        pool.close()
        netlink.close()
        if pr2 is not None:
            pr2.close()

    rows = sorted({(kind, name) for name, kind, _ in results})
    import psutil
    print(f"python {sys.version.split()[0]}, kernel {os.uname().release}, psutil "
          f"{psutil.__version__}; {args.lookups} lookups per kind ({args.slow_lookups} for "
          f"procfs and psutil); µs per lookup, median / p99")
    print(f"{'kind':<12}{'backend':<10}" + "".join(f"{f'N={n}':>22}" for n in sizes))
    for kind, name in rows:
        cells = "".join(f"{'%.1f / %.1f' % results[(name, kind, n)]:>22}" for n in sizes)
        print(f"{kind:<12}{name:<10}{cells}")
    print("\nratios of medians")
    for name in slow:
        for kind in ("hit", "miss", "miss-listen"):
            cells = "  ".join(
                f"N={n}: {results[(name, kind, n)][0] / results[('netlink', kind, n)][0]:.0f}x"
                for n in sizes)
            print(f"  {name}/netlink {kind:<12} {cells}")
    if pr2 is not None:
        cells = "  ".join(
            f"N={n}: {results[('pyroute2', 'exact', n)][0] / results[('netlink', 'exact', n)][0]:.0f}x" for n in sizes
        )
        print(f"  pyroute2/netlink exact       {cells}")
    lo, hi = sizes[0], sizes[-1]
    for kind, name in rows:
        print(f"  {name} {kind}: N={hi} / N={lo} = {results[(name, kind, hi)][0] / results[(name, kind, lo)][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
