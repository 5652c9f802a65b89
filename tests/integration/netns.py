"""A private network namespace for tests that need port 113 (as root):
only its own loopback, made by the test and removed afterwards.

Real ident clients always ask port 113 on the client's address, so tests
with them run the daemon and the clients in such a namespace.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Netns:
    def __init__(self, tag: str):
        self.name = f"stoptest-{tag}-{os.getpid()}"

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
