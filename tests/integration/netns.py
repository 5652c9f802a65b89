"""Network namespaces for tests that need port 113 (real ident clients
always ask port 113 on the client's address): created here, removed by
:meth:`NetNS.delete`. Needs root and iproute2's ``ip``.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def netns_unavailable() -> str | None:
    """Why a namespace cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespace, port 113)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    return None


class NetNS:
    """One network namespace with only ``lo`` (up): 127.0.0.0/8 and ::1."""

    def __init__(self) -> None:
        self.name = f"stoptest-{os.getpid()}-{next(_counter)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        try:
            subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"],
                           check=True, timeout=30)
        except BaseException:
            self.delete()
            raise

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace (``ip netns
        exec`` execs it: the PID of the Popen is the program's)."""
        return ["ip", "netns", "exec", self.name]

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

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout (text mode, unbuffered writer),
    '' on EOF or after ``timeout`` seconds."""
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
        if f:
            f.close()
