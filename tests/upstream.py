"""Faulty "previous hosts" for the recursion tests (loopback only): a
scripted ident daemon in a thread, the usual faults as behaviours, a host
that never completes a connection, and Debian's oidentd.

Every one binds the address it is given (a loopback alias standing for a
host) and is stopped by the test that made it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

from tests.integration.netns import stop_process


class Upstream:
    """A scripted "ident daemon" on ``address``:``port`` (0: any free one),
    in a thread: for each connection, reads the request line (bounded) and
    runs ``behaviour(conn, request_bytes, stopping)``."""

    def __init__(self, behaviour, address: str, port: int = 0, backlog: int = 8):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self.behaviour = behaviour
        self.peers: list = []
        self.requests: list = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.peers.append(peer)
            with conn:
                conn.settimeout(10)
                try:
                    data = b""
                    while b"\n" not in data and len(data) < 2000:
                        chunk = conn.recv(2000)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    self.behaviour(conn, data, self.stopping)
                except OSError:
                    pass

    def close(self):
        self.stopping.set()
        self.thread.join(10)
        self.listener.close()


# -- behaviours -------------------------------------------------------------

def reply_with(data: bytes):
    """Send ``data`` whatever was asked."""
    def behaviour(conn, request, stopping):
        conn.sendall(data)
    return behaviour


def answer_token(token: str):
    """A well-behaved STOP daemon: echo the ports, send ``token``."""
    def behaviour(conn, request, stopping):
        ports = request.split(b":")[0].strip()
        conn.sendall(ports + b" : USERID : OTHER : " + token.encode() + b"\r\n")
    return behaviour


def silent(conn, request, stopping):
    """Accept, read the question, never answer."""
    stopping.wait(60)


def byte_a_second(period: float = 1.0):
    """Answer NO-USER one byte every ``period`` seconds."""
    def behaviour(conn, request, stopping):
        ports = request.split(b":")[0].strip()
        for b in ports + b" : ERROR : NO-USER\r\n":
            if stopping.wait(period):
                return
            conn.sendall(bytes([b]))
    return behaviour


def over_long(conn, request, stopping):
    """Send megabytes without a newline."""
    for _ in range(100):
        conn.sendall(b"A" * 10000)


def closes(conn, request, stopping):
    """Close without a word."""


GARBAGE = b"\x00\x01\xfeSSH-2.0-OpenSSH\r\n"


class DeadHost:
    """A host that never completes a connection: a listener whose accept
    queue is full drops further SYNs (the client sees a connect timeout)."""

    def __init__(self, address: str, port: int = 0):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fill = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((address, self.port))
            self.fill.append(s)
        time.sleep(0.2)

    def close(self):
        for s in self.fill + [self.listener]:
            s.close()


def oidentd_available() -> str | None:
    """Why Debian's oidentd cannot run here, or None when it can."""
    if shutil.which("oidentd") is None:
        return "oidentd is not installed (dev/lib.sh APT_TEST installs it)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare (oidentd reads every user's connections)"
    return None


class Oidentd:
    """Debian's oidentd on ``address``:``port`` in the foreground, in a
    private mount namespace whose /etc/hosts names ``names`` (it resolves
    the requester for its log: no DNS query leaves the host). Stopped by
    PID."""

    def __init__(self, tmp_path, address: str, port: int, names=()):
        hosts = tmp_path / "oidentd-hosts"
        hosts.write_text("".join(f"{a} h{n}\n" for n, a in enumerate((address,) + tuple(names))))
        cmd = f"mount --bind {hosts} /etc/hosts && exec oidentd -i -S -a {address} -p {port}"
        self.port = port
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as c:
                if c.connect_ex((address, port)) == 0:
                    return
            time.sleep(0.05)
        err = self.proc.stderr.read(2000) if self.proc.poll() is not None else b""
        self.close()
        raise RuntimeError(f"oidentd did not start: {err!r}")

    def close(self):
        stop_process(self.proc)
