"""A real OpenSSH server and test users for the recursion tests (as root):
an ``sshd`` of our own on an address and port we pick (optionally inside a
network namespace), users made for one test run and removed afterwards.

Names are unique per run (they include the pid): other engineers run the
same suite on this machine at the same time.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time

from tests.integration.svtrees import Tree, wait_for

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """Why sshd tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (test users, sshd)"
    for prog in (SSHD, shutil.which("ssh-keygen") or "", shutil.which("ssh") or "",
                 shutil.which("useradd") or ""):
        if not prog or not os.access(prog, os.X_OK):
            return "openssh-server, openssh-client and useradd are needed (dev/lib.sh APT_TEST)"
    return None


class Users:
    """Test users ``stoprec<pid><tag>``, each with a key pair in ``dir``;
    all removed (with their home) by :meth:`remove`."""

    def __init__(self, directory):
        self.dir = directory
        self.made: list[str] = []

    def add(self, tag: str) -> "User":
        name = f"stoprec{os.getpid()}{tag}"
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment",
                        "stop recursion test (removed after the test)", name],
                       check=True, capture_output=True, timeout=60)
        self.made.append(name)
        # No password, yet not locked: sshd without PAM refuses locked accounts ("!").
        subprocess.run(["usermod", "--password", "*", name], check=True, capture_output=True,
                       timeout=60)
        key = self.dir / f"{name}.key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                       check=True, capture_output=True, timeout=60)
        pw = pwd.getpwnam(name)
        ssh_dir = os.path.join(pw.pw_dir, ".ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        auth = os.path.join(ssh_dir, "authorized_keys")
        with open(auth, "w") as f:
            f.write(open(f"{key}.pub").read())
        for path in (ssh_dir, auth):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(auth, 0o600)
        return User(name, pw.pw_uid, str(key))

    def remove(self) -> None:
        for name in self.made:
            # the user's processes first (all started by this test: the
            # user exists only for it), each by its PID; then the user
            uid = pwd.getpwnam(name).pw_uid
            for pid in processes_of(uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(50):
                r = subprocess.run(["userdel", "--remove", name], capture_output=True,
                                   timeout=60)
                if r.returncode in (0, 6):  # removed, or does not exist
                    break
                time.sleep(0.1)
        self.made = []


def processes_of(uid: int) -> list[int]:
    """PIDs whose real uid is ``uid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                out.append(int(entry))
                            break
            except OSError:
                continue
    return out


class User:
    def __init__(self, name: str, uid: int, key: str):
        self.name, self.uid, self.key = name, uid, key

    def options(self, port: int) -> str:
        """``ssh`` options to log in as this user to ``port`` with the key,
        never asking anything."""
        return (f"-i {self.key} -p {port} -o BatchMode=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=20")

    def ssh(self, host: str, port: int, command: str, source: str | None = None,
            extra: str = "") -> str:
        """The ``ssh`` command line (a shell string) that logs in as this
        user to ``host``:``port`` (from ``source``) and runs ``command``."""
        opts = self.options(port)
        if source:
            opts += f" -b {source}"
        return f"ssh {opts} {extra} {self.name}@{host} '{command}'"

    def jump(self, host: str, port: int) -> str:
        """An ``ssh`` option that reaches the next host through an ``ssh -W``
        forward by ``host``:``port``'s sshd (a ``ProxyCommand``; OpenSSH's
        ``-J`` does the same)."""
        return f'-o "ProxyCommand=ssh {self.options(port)} -W %h:%p {self.name}@{host}"'


class Sshd:
    """``sshd -D`` on ``address``:``port`` with a host key of its own,
    public-key logins only, logging through a pipe; started detached (its
    parent is PID 1, as a system's sshd) through ``tree`` (in ``netns``
    when given), stopped by the tree."""

    def __init__(self, directory, address: str, port: int, tree: Tree, netns=None):
        self.address, self.port = address, port
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        name = f"sshd-{address}-{port}"  # two may share a port in two namespaces
        host_key = directory / f"{name}-host.key"
        if not host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                           check=True, capture_output=True, timeout=60)
        config = directory / f"{name}.conf"
        config.write_text("\n".join([
            f"ListenAddress {address}:{port}",
            f"HostKey {host_key}",
            "PidFile none",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PermitRootLogin no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel ERROR",
            "MaxStartups 100",
            "",
        ]))
        self.log = directory / f"{name}.log"
        # Its log goes through a pipe to a writer, as a system sshd's goes to
        # the journal: every session's sshd processes hold that pipe, which
        # joins the sessions (the path the walk must not take).
        cmd = f"{SSHD} -D -e -f {config} 2>&1 | cat >> {self.log}"
        self.netns = netns
        if netns is not None:
            cmd = f"exec ip netns exec {netns.name} sh -c '{cmd}'"
        tree.spawn(cmd)
        wait_for(self._listening, timeout=20, what=f"sshd on {address}:{port}")

    def _listening(self) -> bool:
        argv = ["ss", "-Htln"]
        if self.netns is not None:
            argv = self.netns.command(argv)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return f"{self.address}:{self.port} " in out.stdout
