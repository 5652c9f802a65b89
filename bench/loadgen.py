"""Load generator for ident servers: C concurrent clients, one query per
connection (like real clients), a bounded number of queries and seconds.

It is one thread driving non-blocking sockets with epoll, so that on a
2-core machine it costs as little CPU as a Python client can (no thread
switching, no GIL hand-offs): connect, send one line, read one reply line,
close, start the next.

Clients close with SO_LINGER 0 (a reset) after reading the reply, so their
connections leave no TIME_WAIT entries behind: the server's TCP table holds
exactly the connections a benchmark set up, whatever ran before.

Usage (prints one JSON object):
    python bench/loadgen.py --dest 127.0.0.1:1113 --source 127.0.0.2 \\
        --pairs pairs.txt --count 4000 --concurrency 50 [--time-limit 60]
where pairs.txt holds "P1 P2" lines; they are asked in turn, cyclically.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import struct
import sys
import time
from typing import Sequence

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_RESET = struct.pack("ii", 1, 0)
MAX_REPLY = 1024          # bytes; a longer "line" is counted as a failure
STALL_CHECK = 0.5         # seconds between scans for stalled connections


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100, nearest rank) of already sorted values; 0 if none."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run(dest: tuple[str, int], source: str, queries: Sequence[bytes], count: int,
        concurrency: int, time_limit: float = 60.0, conn_timeout: float = 20.0) -> dict:
    """Send ``count`` queries (``queries`` cycled, each a line with CR LF),
    ``concurrency`` connections in flight, each from ``source`` to ``dest``.

    Stops starting connections after ``time_limit`` seconds; a connection
    without a full reply line after ``conn_timeout`` seconds is a failure.
    Returns counts (``userid``, ``error`` replies by RFC word, ``failed``),
    ``elapsed`` seconds, ``rate`` (replies per second) and latency
    percentiles in milliseconds (connect to reply, replies only);
    ``failures`` counts connections without a reply line by reason.
    """
    ep = select.epoll()
    conns: dict[int, list] = {}       # fd -> [sock, t0 (ns), query, buffer]
    latencies: list[int] = []         # ns
    counts = {"userid": 0}
    failures: dict[str, int] = {}     # why a connection got no reply line
    errors: dict[str, int] = {}
    sample: dict[str, str] = {}
    started = 0
    t_start = time.perf_counter()
    deadline = t_start + time_limit
    next_stall_check = t_start + STALL_CHECK

    def finish(fd: int, reply: bytes | None, why: str = "") -> None:
        sock = conns.pop(fd)[0]
        try:
            ep.unregister(fd)
        except OSError:
            pass
        sock.close()
        if reply is None:
            failures[why] = failures.get(why, 0) + 1
            return
        if b"USERID" in reply:
            counts["userid"] += 1
            sample.setdefault("userid", reply.decode("ascii", "replace"))
        elif b"ERROR" in reply:
            word = reply.rsplit(b":", 1)[-1].strip().decode("ascii", "replace")
            errors[word] = errors.get(word, 0) + 1
            sample.setdefault("error", reply.decode("ascii", "replace"))
        else:
            failures["bad reply"] = failures.get("bad reply", 0) + 1
            sample.setdefault("bad reply", reply[:80].decode("ascii", "replace"))

    def start_one() -> None:
        nonlocal started
        query = queries[started % len(queries)]
        started += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.bind((source, 0))
        t0 = time.perf_counter_ns()
        err = sock.connect_ex(dest)
        fd = sock.fileno()
        conns[fd] = [sock, t0, query, b""]
        if err in (0, errno.EINPROGRESS):
            # On loopback the handshake has usually completed by now: try
            # the write at once and save an epoll round trip.
            try:
                sock.send(query)
                ep.register(fd, select.EPOLLIN)
                return
            except (BlockingIOError, OSError) as e:
                if getattr(e, "errno", None) not in (errno.EAGAIN, errno.ENOTCONN):
                    ep.register(fd, 0)
                    finish(fd, None, "send: " + errno.errorcode.get(e.errno, "?"))
                    return
            ep.register(fd, select.EPOLLOUT)
        else:
            ep.register(fd, 0)
            finish(fd, None, "connect: " + errno.errorcode.get(err, "?"))

    while (started < count and time.perf_counter() < deadline) or conns:
        while (len(conns) < concurrency and started < count
               and time.perf_counter() < deadline):
            start_one()
        for fd, ev in ep.poll(STALL_CHECK):
            entry = conns.get(fd)
            if entry is None:
                continue
            sock = entry[0]
            if ev & select.EPOLLOUT:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, None, "connect: " + errno.errorcode.get(err, "?"))
                    continue
                try:
                    sock.send(entry[2])
                except OSError as e:
                    finish(fd, None, "send: " + errno.errorcode.get(e.errno, "?"))
                    continue
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                chunk = sock.recv(MAX_REPLY)
            except BlockingIOError:
                continue
            except OSError as e:
                finish(fd, None, "recv: " + errno.errorcode.get(e.errno, "?"))
                continue
            if not chunk:
                finish(fd, None, "closed before the reply" if not entry[3] else "closed mid-line")
                continue
            entry[3] += chunk
            end = entry[3].find(b"\r\n")
            if end < 0:
                end = entry[3].find(b"\n")
            if end >= 0:
                latencies.append(time.perf_counter_ns() - entry[1])
                finish(fd, entry[3][:end])
            elif len(entry[3]) > MAX_REPLY:
                finish(fd, None, "reply too long")
        now = time.perf_counter()
        if now >= next_stall_check:
            next_stall_check = now + STALL_CHECK
            limit = time.perf_counter_ns() - int(conn_timeout * 1e9)
            for fd in [fd for fd, e in conns.items() if e[1] < limit]:
                finish(fd, None, "timeout")
    elapsed = time.perf_counter() - t_start
    ep.close()
    latencies.sort()
    replies = len(latencies)
    return {
        "started": started, "replies": replies, "userid": counts["userid"],
        "errors": errors, "failed": sum(failures.values()), "failures": failures,
        "elapsed": elapsed,
        "rate": replies / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) / 1e6, "p99_ms": percentile(latencies, 99) / 1e6,
        "sample": sample,
    }


def read_pairs(path: str) -> list[bytes]:
    """Query lines from a file of "P1 P2" lines."""
    out = []
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.strip():
                p1, p2 = line.split()
                out.append(b"%d, %d\r\n" % (int(p1), int(p2)))
    if not out:
        raise SystemExit(f"{path}: no pairs")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", required=True, help="HOST:PORT of the ident server")
    ap.add_argument("--source", default="127.0.0.2", help="address the clients connect from")
    ap.add_argument("--pairs", required=True, help='file of "P1 P2" lines to ask about')
    ap.add_argument("--count", type=int, default=2000, help="queries (= connections) in all")
    ap.add_argument("--concurrency", type=int, default=10, help="connections in flight")
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="seconds after which no new connection starts")
    ap.add_argument("--conn-timeout", type=float, default=20.0,
                    help="seconds a connection may wait for its reply")
    a = ap.parse_args(argv)
    host, port = a.dest.rsplit(":", 1)
    result = run((host, int(port)), a.source, read_pairs(a.pairs), a.count, a.concurrency,
                 a.time_limit, a.conn_timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
