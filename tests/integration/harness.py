"""Real daemons for integration tests: start ``twistd stop`` as a process
on loopback, talk to it over real sockets, stop it by PID.

Loopback aliases stand for hosts: 127.0.0.11 is "this host" (where the
daemon answers), 127.0.0.12 the requester, 127.0.0.13 a gateway.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time
from typing import Optional

from tests.integration.netns import stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST, PEER, GATEWAY = "127.0.0.11", "127.0.0.12", "127.0.0.13"
START_TIMEOUT = 20.0
IO_TIMEOUT = 10.0


def free_port(hosts=(HOST, PEER, "::1")) -> int:
    """A TCP port that is free on every one of ``hosts`` just now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for h in hosts:
                fam = socket.AF_INET6 if ":" in h else socket.AF_INET
                with socket.socket(fam) as s:
                    s.bind((h, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")


class Daemon:
    """One ``twistd stop`` process with its own config and data dir."""

    def __init__(self, tmp_path, settings: Optional[dict] = None, args=(),
                 interfaces=(HOST, PEER, "::1"), port: Optional[int] = None,
                 netns=None, twistd_args=()):
        self.dir = tmp_path
        self.interfaces = tuple(interfaces)
        self.netns = netns  # a tests.integration.netns.Netns to run it in, or None
        self.data_dir = str(tmp_path / "data")
        self.port = port or free_port(interfaces)
        listen = [("tcp6:%d:interface=%s" if ":" in i else "tcp:%d:interface=%s")
                  % (self.port, i.replace(":", "\\:")) for i in interfaces]
        lines = ["[stop]", "listen = " + "\n  ".join(listen), f"data_dir = {self.data_dir}"]
        for k, v in (settings or {}).items():
            lines.append(f"{k} = {v}")
        self.config = str(tmp_path / "stop.conf")
        with open(self.config, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.log = str(tmp_path / "twistd.log")
        self.args = list(args)
        self.twistd_args = list(twistd_args)  # twistd's own options, e.g. --profile
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        """The twistd command line that runs this daemon."""
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "--nodaemon", "--pidfile=",
               f"--logfile={self.log}"] + self.twistd_args
        cmd += ["stop", "--config", self.config] + self.args
        if self.netns is not None:
            cmd = self.netns.command(cmd)
        return cmd

    @staticmethod
    def environment() -> dict:
        return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(self) -> "Daemon":
        self.proc = subprocess.Popen(self.command(), cwd=str(self.dir), env=self.environment(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()}\n{self.read_log()}")
            if self.read_log().count("starting on %d" % self.port) >= 1 and self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("twistd did not start listening:\n" + self.read_log())

    def _answers(self) -> bool:
        try:
            fam = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
            with self._socket(fam) as s:
                s.settimeout(1)
                s.connect((self.listen_host, self.port))
                return True
        except OSError:
            return False

    @property
    def listen_host(self) -> str:
        return HOST if HOST in self.interfaces else self.interfaces[0]

    def _socket(self, family: int) -> socket.socket:
        if self.netns is not None:
            return self.netns.socket(family)
        return socket.socket(family, socket.SOCK_STREAM)

    def read_log(self) -> str:
        """The whole log, rotated parts too (twistd rotates its log file at
        1 MB: twistd.log.N is the oldest, .1 the newest before the current
        one; a flood writes more than that)."""
        rotated = sorted(glob.glob(glob.escape(self.log) + ".[0-9]*"),
                         key=lambda p: int(p.rsplit(".", 1)[1]), reverse=True)
        parts = []
        for path in rotated + [self.log]:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    parts.append(fh.read())
            except FileNotFoundError:
                pass
        return "".join(parts)

    def wait_log(self, text: str, timeout: float = IO_TIMEOUT) -> str:
        """The whole log once it holds ``text`` (AssertionError after
        ``timeout`` s): the daemon writes a reactor turn's lines at the end
        of the turn, so a line can reach the file just after the reply or
        the close it is about reached the peer."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.read_log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- talking to it -------------------------------------------------------

    def connect(self, source: str = PEER, dest: Optional[str] = None) -> socket.socket:
        dest = dest or (HOST if ":" not in source else "::1")
        fam = socket.AF_INET6 if ":" in dest else socket.AF_INET
        s = self._socket(fam)
        s.settimeout(IO_TIMEOUT)
        s.bind((source, 0))
        s.connect((dest, self.port))
        return s

    def ask(self, *lines: bytes, source: str = PEER, dest: Optional[str] = None) -> list[bytes]:
        """Send ``lines`` (each gets CR LF) on one connection; the reply lines."""
        with self.connect(source, dest) as s:
            s.sendall(b"".join(line + b"\r\n" for line in lines))
            return read_lines(s, len(lines))

    def stopctl(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run([sys.executable, "-m", "stop.ctl", "--config", self.config] + list(args),
                              capture_output=True, text=True, env=env, timeout=60)


def read_lines(s: socket.socket, n: int) -> list[bytes]:
    """Read ``n`` CR LF lines (fewer if the peer closes)."""
    buf = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while buf.count(b"\r\n") < n and time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:  # closed with our data unread: a reset
            break
        if not chunk:
            break
        buf += chunk
    if not buf:
        return []
    return buf.split(b"\r\n")[:-1] if buf.endswith(b"\r\n") else buf.split(b"\r\n")


class Pair:
    """A real TCP connection: ``client`` (opened by "this host") from
    ``local`` to a listener on ``remote``; ``server`` is the accepted end."""

    def __init__(self, local: str = HOST, remote: str = PEER):
        fam = socket.AF_INET6 if ":" in remote else socket.AF_INET
        self.listener = socket.socket(fam)
        self.listener.bind((remote, 0))
        self.listener.listen(8)
        self.client = socket.socket(fam)
        self.client.bind((local, 0))
        self.client.connect(self.listener.getsockname()[:2])
        self.server, _ = self.listener.accept()
        self.local_port = self.client.getsockname()[1]
        self.remote_port = self.listener.getsockname()[1]

    def query(self) -> bytes:
        """The request the remote end would send: ``local_port, remote_port``."""
        return b"%d, %d" % (self.local_port, self.remote_port)

    def close(self) -> None:
        for s in (self.client, self.server, self.listener):
            s.close()
