"""A real rsyslogd for tests: own config, socket and output under a temp dir.

Started with ``-n`` (foreground) and its own pidfile, stopped by the PID we
started; never touches the system's /dev/log or /run/rsyslogd.pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

# One line per message: facility, severity, program, pid, structured data,
# msgid, then the message (control characters escaped by rsyslog).
TEMPLATE = ('template(name="testfmt" type="string" string="'
            '%syslogfacility-text%|%syslogseverity-text%|%programname%|%procid%|'
            '%structured-data%|%msgid%|%msg%\\n")')


def available() -> bool:
    return os.access(RSYSLOGD, os.X_OK)


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, step: float = 0.05):
    """Poll ``predicate`` until it returns something true (returned) or
    ``timeout`` seconds pass (returns the last false value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


class Rsyslogd:
    """rsyslogd listening on a UNIX datagram socket (``socket_path``) and/or
    TCP on 127.0.0.1 (``tcp_port``, chosen by rsyslog), writing every message
    to ``output`` in :data:`TEMPLATE` form."""

    def __init__(self, workdir: Path, unix: bool = True, tcp: bool = False) -> None:
        self.dir = Path(workdir).absolute()  # rsyslogd changes to /
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(self.dir / "log.sock") if unix else None
        self.output = self.dir / "messages.log"
        self.port_file = self.dir / "tcp.port"
        self.tcp = tcp
        self.proc: Optional[subprocess.Popen] = None
        self.tcp_port: Optional[int] = None

    def config(self) -> str:
        lines = [
            f'global(workDirectory="{self.dir}" maxMessageSize="256k")',
            TEMPLATE,
        ]
        if self.socket_path:
            lines += [
                'module(load="imuxsock" SysSock.Use="off")',
                f'input(type="imuxsock" Socket="{self.socket_path}" '
                'RateLimit.Interval="0" UseSpecialParser="on")',
            ]
        if self.tcp:
            lines += [
                'module(load="imtcp")',
                f'input(type="imtcp" address="127.0.0.1" port="0" '
                f'listenPortFileName="{self.port_file}")',
            ]
        lines.append(f'*.* action(type="omfile" file="{self.output}" template="testfmt")')
        return "\n".join(lines) + "\n"

    def start(self) -> "Rsyslogd":
        conf = self.dir / "rsyslog.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "rsyslogd.stderr", "wb"))
        wait_for(self._ready, timeout=20)
        if self.proc.poll() is not None or not self._ready():
            err = (self.dir / "rsyslogd.stderr").read_text(errors="replace")
            self.stop()
            raise RuntimeError(f"rsyslogd did not start: {err}")
        if self.tcp:
            self.tcp_port = int(self.port_file.read_text().strip())
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            return True  # died: start() reports it below
        if self.socket_path and not os.path.exists(self.socket_path):
            return False
        if self.tcp and not (self.port_file.exists() and self.port_file.read_text().strip()):
            return False
        return True

    def lines(self) -> list[str]:
        """Every message written so far, one string each."""
        try:
            return self.output.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def messages(self) -> list[tuple[str, ...]]:
        """Every message so far as (facility, severity, program, procid,
        structured-data, msgid, msg); the one space RFC 3164 puts after the
        tag's colon is taken off msg."""
        out = []
        for line in self.lines():
            fields = line.split("|", 6)
            if len(fields) == 7:
                msg = fields[6]
                fields[6] = msg[1:] if msg.startswith(" ") else msg
                out.append(tuple(fields))
        return out

    def wait_messages(self, predicate: Callable[[tuple], bool], count: int = 1,
                      timeout: float = 15.0) -> list[tuple[str, ...]]:
        """Wait (at most ``timeout`` s) until ``count`` messages match
        ``predicate``; return every matching message seen by then."""
        def matching() -> list[tuple[str, ...]]:
            return [m for m in self.messages() if predicate(m)]
        wait_for(lambda: len(matching()) >= count, timeout=timeout)
        return matching()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
