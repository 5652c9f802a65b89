"""As root: the default config binds port 113 for IPv4 and IPv6, then twistd
drops to an unprivileged user; records belong to that user."""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.integration import netns
from tests.integration.harness import ROOT

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and iproute2")

CLIENT = r"""
import socket, sys
out = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    lst = socket.socket(fam); lst.bind((host, 0)); lst.listen(1)
    c = socket.socket(fam); c.connect(lst.getsockname()[:2]); srv, _ = lst.accept()
    q = socket.socket(fam); q.settimeout(10); q.connect((host, 113))
    q.sendall(b"%d, %d\r\n" % (c.getsockname()[1], lst.getsockname()[1]))
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = q.recv(200)
        if not chunk:
            break
        buf += chunk
    out.append(buf.decode().strip())
print("\n".join(out))
"""


def _uid_of(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]


def _wait_for(path, text, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().count(text) >= 1:
            return
        assert proc.poll() is None, open(path).read() if os.path.exists(path) else "exited"
        time.sleep(0.05)
    raise AssertionError("daemon did not start:\n" + open(path).read())


def test_binds_113_dual_stack_then_runs_as_nobody():
    nobody = pwd.getpwnam("nobody")
    work = tempfile.mkdtemp(prefix="stop-priv-", dir="/tmp")
    os.chmod(work, 0o755)
    data = os.path.join(work, "data")
    os.mkdir(data, 0o700)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    log = os.path.join(work, "twistd.log")
    empty_config = os.path.join(work, "empty.conf")  # not the machine's /etc/stop/stop.conf
    open(empty_config, "w").close()
    with netns.Netns("priv") as ns:
        env = dict(os.environ, PYTHONPATH=ROOT)
        daemon = ns.popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                           "--nodaemon", "--pidfile=", f"--logfile={log}",
                           f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}",
                           "stop", "--data-dir", data], env=env, cwd=work)
        try:
            _wait_for(log, "record store flat open", daemon)
            assert "starting on 113" in open(log).read()
            assert _uid_of(daemon.pid) == [nobody.pw_uid] * 4  # real, effective, saved, fs
            out = ns.run([sys.executable, "-c", CLIENT], capture_output=True, text=True)
            replies = out.stdout.split("\n")
            assert len(replies) >= 2, out.stderr
            for reply in replies[:2]:
                assert " : USERID : OTHER : " in reply, reply
                token = reply.rsplit(" ", 1)[1]
                show = subprocess.run([sys.executable, "-m", "stop.ctl", "--config", empty_config,
                                       "--data-dir", data, "show",
                                       "--json", token], capture_output=True, text=True, env=env,
                                      timeout=60)
                assert show.returncode == 0, show.stderr
                assert json.loads(show.stdout)["record"]["user"]["uid"] == 0
            for dirpath, dirnames, filenames in os.walk(data):
                for name in dirnames + filenames:
                    st = os.stat(os.path.join(dirpath, name))
                    assert st.st_uid == nobody.pw_uid, name
                    assert st.st_mode & 0o077 == 0, (name, oct(st.st_mode))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(10)
            # (not pytest's tmp_path: nobody must reach the data dir, and
            # its parents are root's alone)
            shutil.rmtree(work, ignore_errors=True)
