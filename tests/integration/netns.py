"""Private network namespaces for tests that need port 113 (as root):
each has its own loopback and whatever veth links the test makes between
them (192.0.2.0/24 and 198.51.100.0/24 only), made by the test and removed
afterwards.

Real ident clients always ask port 113 on the client's address, so tests
with them run the daemon and the clients in such a namespace; the
recursion tests make one namespace per host of a chain.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
#: The only networks a veth link may use (documentation ranges, RFC 5737).
LINK_NETWORKS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/24"))
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Netns:
    def __init__(self, tag: str):
        self.name = f"stoptest-{tag}-{os.getpid()}"
        self.links: list[str] = []  # the veth ends in this namespace

    def __enter__(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"], check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def link(self, other: "Netns", mine: str, theirs: str, prefix: int = 30) -> None:
        """A veth pair between this namespace and ``other``: ``mine``/prefix
        here, ``theirs``/prefix there, both up. The pair is made inside the
        namespaces (its names are theirs alone) and goes with them."""
        for a in (mine, theirs):
            if not any(ipaddress.ip_address(a) in n for n in LINK_NETWORKS):
                raise ValueError(f"{a} is outside the test networks {LINK_NETWORKS}")
        here, there = f"veth{len(self.links)}", f"veth{len(other.links)}"
        self.run(["ip", "link", "add", here, "type", "veth", "peer", "name", there,
                  "netns", other.name], check=True)
        self.links.append(here)
        other.links.append(there)
        for ns, dev, addr in ((self, here, mine), (other, there, theirs)):
            ns.run(["ip", "addr", "add", f"{addr}/{prefix}", "dev", dev], check=True)
            ns.run(["ip", "link", "set", dev, "up"], check=True)

    def tcp(self, state: str = "established") -> list[tuple[tuple[str, int], tuple[str, int]]]:
        """The IPv4 TCP sockets in ``state`` here: [(local, remote)], each
        end (address, port) (from ``ss``, run in the namespace)."""
        out = self.run(["ss", "-H", "-n", "-t", "-4", "state", state], capture_output=True,
                       text=True, check=True).stdout

        def end(text: str) -> tuple[str, int]:
            address, port = text.rsplit(":", 1)
            return address, int(port)

        rows = []
        for line in out.splitlines():
            fields = line.split()
            # Recv-Q Send-Q Local Peer (ss leaves out the State column when a state is given)
            rows.append((end(fields[-2]), end(fields[-1])))
        return rows

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the
        PID of the Popen is the program's)."""
        return ["ip", "netns", "exec", self.name] + list(argv)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kw)

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket created inside the namespace (a socket keeps the
        namespace it was made in). setns() moves only the calling thread,
        so it runs in a short-lived thread of its own."""
        out: dict = {}

        def make() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
                out["sock"] = socket.socket(family, socket.SOCK_STREAM)
            except BaseException as e:  # handed to the caller's thread
                out["err"] = e

        t = threading.Thread(target=make, name="setns")
        t.start()
        t.join(10)
        if "err" in out:
            raise out["err"]
        return out["sock"]


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout (a binary pipe), stripped; '' on
    EOF or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 1)  # byte by byte: the rest stays in the pipe
            if not chunk:
                break
            buf += chunk
    return buf.decode("utf-8", "replace").strip()


def stop_process(proc: subprocess.Popen) -> None:
    """Stop ``proc`` (one we started) by its PID and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f and not f.closed:
            f.close()
