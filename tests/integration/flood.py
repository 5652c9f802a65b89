"""A bounded flood of recursive requests, and idle connections, for the DoS
test and bench/recursion_bench.py (loopback only).

Run as a program (its own process, so the flood does not share a GIL with
the test)::

    python -m tests.integration.flood --source 127.0.0.12 --dest 127.0.0.11 \\
        --port 1113 --ports 40000,6667 --rate 1000 --seconds 3

sends ``P1, P2 : SV_REC : <fresh sid>`` at ``--rate`` per second for
``--seconds`` (at most ``--max-count``), over connections of at most 64
requests with at most 16 outstanding each (the daemon's defaults), and
prints one JSON object: how many were sent, the replies by kind, and the
achieved rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import socket
import time

REQUESTS_PER_CONNECTION = 64
PIPELINE = 16
DRAIN_SECONDS = 10.0
#: Linux's IP_BIND_ADDRESS_NO_PORT (4.2+; Python names it from 3.12 on).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bound_socket(source: str) -> socket.socket:
    """A TCP socket bound to ``source``, its port picked at connect time:
    a ``bind(source, 0)`` picks a port no bound socket holds, which takes
    milliseconds each once thousands are bound (45 s for 10,000 idle
    connections under load, seen), where connect picks by the whole
    4-tuple."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((source, 0))
    return s


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sent = 0
        self.outstanding = 0
        self.buf = b""
        self.closed = False


def flood(source: str, dest: str, port: int, ports: tuple[int, int], rate: float,
          seconds: float, max_count: int, connections: int = 8, kind: str = "SV_REC") -> dict:
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    replies: dict[str, int] = {}
    sid = random.randrange(2**31)
    sent = 0
    refused = 0
    start = time.monotonic()
    end = start + seconds

    def open_one():
        nonlocal refused
        s = bound_socket(source)
        try:
            s.connect((dest, port))
        except OSError:
            refused += 1
            s.close()
            return
        s.setblocking(False)
        c = _Conn(s)
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)

    def read(c: _Conn):
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            sel.unregister(c.sock)
            c.sock.close()
            c.closed = True
            conns.remove(c)
            return
        c.buf += data
        while b"\r\n" in c.buf:
            line, c.buf = c.buf.split(b"\r\n", 1)
            c.outstanding -= 1
            key = ("token" if b" : USERID : OTHER : " in line
                   else line.split(b" : ")[-1].decode("ascii", "replace"))
            replies[key] = replies.get(key, 0) + 1

    while True:
        now = time.monotonic()
        sending = now < end and sent < max_count
        if not sending and not any(c.outstanding for c in conns):
            break
        if now > end + DRAIN_SECONDS:
            break
        if sending:
            allowed = min(max_count, int(rate * (now - start)) + 1)
            while sent < allowed:
                usable = [c for c in conns
                          if c.sent < REQUESTS_PER_CONNECTION and c.outstanding < PIPELINE]
                if not usable:
                    if len(conns) < connections:
                        open_one()
                        continue
                    break
                c = usable[0]
                sid += 1
                try:
                    c.sock.send(b"%d, %d : %s : %d\r\n" % (ports[0], ports[1], kind.encode(),
                                                          sid % 2**32))
                except (BlockingIOError, OSError):
                    break
                c.sent += 1
                c.outstanding += 1
                sent += 1
        for key, _ in sel.select(timeout=0.005):
            read(key.data)
    for c in conns:
        c.sock.close()
    took = time.monotonic() - start
    return {"sent": sent, "replies": replies, "answered": sum(replies.values()),
            "seconds": round(took, 3), "rate": round(sent / max(seconds, 1e-9), 1),
            "connect_failures": refused}


def idle_connections(n: int, source: str, dest: str, port: int, accepted=None,
                     batch: int = 40, timeout: float = 120.0) -> list[socket.socket]:
    """``n`` established connections from ``source`` to ``dest``:``port``
    that never send anything (the caller closes them).

    :param accepted: ``() -> int``: how many the server has accepted so far;
        when given, connections are opened ``batch`` at a time, each batch
        once the server accepted the one before (a listen backlog is small:
        past it the kernel drops handshakes and retries them for seconds).
    """
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    base = accepted() if accepted else 0
    try:
        while len(socks) < n:
            group = []
            for _ in range(min(batch if accepted else n, n - len(socks))):
                s = bound_socket(source)
                socks.append(s)
                group.append(s)
                s.setblocking(False)
                s.connect_ex((dest, port))
            _wait_writable(group, deadline)
            while accepted and accepted() - base < len(socks):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server accepted {accepted() - base} of "
                                       f"{len(socks)} idle connections")
                time.sleep(0.001)
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def fd_count(pid: int) -> int:
    """Open descriptors of ``pid``: the size of /proc/PID/fd (Linux >= 6.2
    says it without a listing), else its listing."""
    size = os.stat(f"/proc/{pid}/fd").st_size
    return size if size else len(os.listdir(f"/proc/{pid}/fd"))


def _wait_writable(socks: list[socket.socket], deadline: float) -> None:
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_WRITE)
        pending = len(socks)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                sel.unregister(key.fileobj)
                pending -= 1
    if pending:
        raise RuntimeError(f"{pending} idle connections did not complete")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ports", required=True, help="P1,P2 of the request")
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--max-count", type=int, default=100000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--kind", default="SV_REC")
    a = p.parse_args()
    p1, p2 = (int(x) for x in a.ports.split(","))
    print(json.dumps(flood(a.source, a.dest, a.port, (p1, p2), a.rate, a.seconds, a.max_count,
                           a.connections, a.kind)), flush=True)


if __name__ == "__main__":
    main()
