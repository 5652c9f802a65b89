"""Real process trees for the SV walk tests and bench (loopback only).

Each builder starts real programs (sh, nc from netcat-openbsd, socat) in a
new session, waits (bounded) until their sockets are up, and returns a
:class:`Tree` that knows the queried connection and how to stop exactly the
processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from stop.model import Connection, Endpoint
from stop.os.linux import sockdiag

DEVNULL = subprocess.DEVNULL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inspector(name: str, index_max_age: float = 10.0):
    """The process inspector called ``name``, built as the daemon builds it
    (``stop.os.make_inspector`` from the settings)."""
    from stop import os as os_layer
    from stop.config import Config
    return os_layer.make_inspector(
        Config(process_backend=name, index_max_age=index_max_age), None)


def free_port_in(first: int, last: int, host: str = "127.0.0.1") -> int:
    """A port in [first, last] that nobody uses on ``host`` now (random
    tries, bounded: other suites run on this machine at the same time)."""
    import random
    for _ in range(200):
        port = random.randint(first, last)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {first}..{last}")


def ipv6_loopback() -> bool:
    """Whether this host has an IPv6 loopback (::1) to test on."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first, last = (int(x) for x in f.read().split())
    return first, last


def free_port_outside_range() -> int:
    """A free port below the ephemeral range (a "service" port: the
    direction rule's range signal sees it as one)."""
    first, _ = ephemeral_range()
    return free_port_in(max(1024, first - 12000), first - 1)


def accepted_inode(client: Connection) -> int:
    """The inode of the server side of ``client`` (a connection to a
    local listener), waiting (bounded) for the server to accept it: until
    then the kernel shows it with inode 0."""
    ends = ((client.remote.host, client.remote.port), (client.local.host, client.local.port))
    return wait_for(lambda: next((s.inode for s in tcp_sockets()
                                  if (s.local, s.remote) == ends), 0),
                    what=f"the accept of {client.local}")


def holder_of(inode: int) -> int:
    """The PID holding socket ``inode`` (from /proc; the first found),
    waiting (bounded) for it: an accepted connection has no holder until
    the server's accept() returns."""
    want = f"socket:[{inode}]"

    def find():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == want:
                        return int(entry)
            except OSError:
                continue
        return None
    return wait_for(find, what=f"a holder of {want}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (the live system)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    for _ in range(100000):
        if not todo:
            break
        p = todo.pop()
        kids = children(p)
        out.extend(kids)
        todo.extend(kids)
    return sorted(out)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def tcp_sockets(state: str = "ESTABLISHED"):
    diag = sockdiag.SockDiag()
    try:
        return [s for fam in (socket.AF_INET, socket.AF_INET6)
                for s in diag.request(sockdiag.inet_dump(fam), True, sockdiag.decode_inet)
                if s.state_name == state]
    finally:
        diag.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def connection_to(port: int) -> Connection:
    """The established outbound connection to 127.0.0.1:``port`` (wait)."""
    def find():
        for s in tcp_sockets():
            if s.remote == ("127.0.0.1", port):
                return s
        return None
    s = wait_for(find, what=f"connection to port {port}")
    return Connection(Endpoint(*s.local), Endpoint(*s.remote), s.uid, s.inode, False)


@dataclass
class Process:
    """A started process; its pid is also its process group (own session)."""

    pid: int


@dataclass
class Tree:
    """Processes a test started, detached (their parent is PID 1, as in the
    paper's figures, so the walk ends there); ``stop()`` ends them by id,
    then removes the directories in ``dirs``."""

    procs: list[Process] = field(default_factory=list)
    connection: Connection | None = None
    info: dict = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)

    def spawn(self, cmd: str) -> Process:
        # setsid (not a group leader here, so it execs without forking) gives
        # the shell its own session and process group; the intermediate sh
        # exits, so the shell is reparented to PID 1.
        out = subprocess.run(
            ["sh", "-c", 'setsid sh -c "$0" </dev/null >/dev/null 2>&1 & echo $!', cmd],
            stdin=DEVNULL, capture_output=True, text=True, timeout=10, check=True)
        p = Process(int(out.stdout))
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                wait_for(lambda: not os.path.exists(f"/proc/{p.pid}"), timeout=5)
            except AssertionError:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def listen_sink(tree: Tree, port: int) -> subprocess.Popen:
    """``nc -l`` on 127.0.0.1:port, the "next host" of a relay."""
    p = tree.spawn(f"exec nc -l 127.0.0.1 {port}")
    wait_for(lambda: any(s.local == ("127.0.0.1", port) for s in tcp_sockets("LISTEN")),
             what=f"listener on {port}")
    return p


def figure3() -> Tree:
    """The paper's Figure 3: a shell running ``nc -l P1 | nc 127.0.0.1 P2``,
    fed by a client on P1. ``info``: shell, nc_in, nc_out, client pids, ports."""
    tree = Tree()
    try:
        p1, p2 = free_port(), free_port()
        listen_sink(tree, p2)
        shell = tree.spawn(f"nc -l 127.0.0.1 {p1} | nc 127.0.0.1 {p2}; true")
        wait_for(lambda: any(s.local == ("127.0.0.1", p1) for s in tcp_sockets("LISTEN")),
                 what="relay listener")
        client = tree.spawn(f"sleep 600 | nc 127.0.0.1 {p1}")
        tree.connection = connection_to(p2)
        kids = wait_for(lambda: len(children(shell.pid)) == 2 and children(shell.pid))
        cmdlines = {k: open(f"/proc/{k}/cmdline", "rb").read().split(b"\0") for k in kids}
        nc_in = next(k for k, c in cmdlines.items() if b"-l" in c)
        nc_out = next(k for k in kids if k != nc_in)
        fed = connection_to(p1)
        # The relay's side is in the kernel before nc's accept() returns,
        # with no inode and no holder: wait for the accept too.
        wait_for(lambda: holder_of(accepted_inode(fed)) == nc_in, what="nc -l to accept")
        tree.info = {"shell": shell.pid, "nc_in": nc_in, "nc_out": nc_out,
                     "client": client.pid, "p1": p1, "p2": p2}
        return tree
    except BaseException:
        tree.stop()
        raise


def fifo_relay(directory: str) -> Tree:
    """Figure 3 with a named FIFO for the pipe, across two sessions:
    ``nc -l P1 > FIFO`` and ``nc 127.0.0.1 P2 < FIFO``, fed by a client on
    P1. ``info``: nc_in, nc_out, fifo (its path), p1, p2."""
    tree = Tree()
    try:
        p1, p2 = free_port(), free_port()
        fifo = os.path.join(directory, "relay.fifo")
        os.mkfifo(fifo, 0o600)
        listen_sink(tree, p2)
        nc_in = tree.spawn(f"exec nc -l 127.0.0.1 {p1} > {fifo}")
        nc_out = tree.spawn(f"exec nc 127.0.0.1 {p2} < {fifo}")
        # Each shell opens the FIFO (blocking until the other end does),
        # then execs nc.
        wait_for(lambda: any(s.local == ("127.0.0.1", p1) for s in tcp_sockets("LISTEN")),
                 what="relay listener")
        tree.spawn(f"sleep 600 | nc 127.0.0.1 {p1}")
        tree.connection = connection_to(p2)
        fed = connection_to(p1)
        wait_for(lambda: holder_of(accepted_inode(fed)) == nc_in.pid, what="nc -l to accept")
        wait_for(lambda: holder_of(tree.connection.inode) == nc_out.pid, what="nc to connect")
        tree.info = {"nc_in": nc_in.pid, "nc_out": nc_out.pid, "fifo": fifo, "p1": p1, "p2": p2}
        return tree
    except BaseException:
        tree.stop()
        raise


def figure4() -> Tree:
    """The paper's Figure 4 (14 processes, 3 process groups): two relays
    joined through a pipe and a local TCP connection, fed by a login-like
    shell, walked from the outbound socket of the last ``nc`` (P4).

    Group A (session 1): ``sh`` -> ``sleep | nc 127.0.0.1 PA`` (the
    attacker's source), group B: ``sh`` -> ``nc -l PA | cat | nc 127.0.0.1 PB``
    (relay through a pipe and a local TCP connection), group C: ``sh`` ->
    ``nc -l PB | cat | cat | nc 127.0.0.1 PC`` -> sink on PC.
    """
    tree = Tree()
    try:
        pa, pb, pc = free_port(), free_port(), free_port()
        listen_sink(tree, pc)
        c = tree.spawn(f"nc -l 127.0.0.1 {pb} | cat | cat | nc 127.0.0.1 {pc}; true")
        wait_for(lambda: any(s.local == ("127.0.0.1", pb) for s in tcp_sockets("LISTEN")))
        b = tree.spawn(f"nc -l 127.0.0.1 {pa} | cat | nc 127.0.0.1 {pb}; true")
        wait_for(lambda: any(s.local == ("127.0.0.1", pa) for s in tcp_sockets("LISTEN")))
        a = tree.spawn(f"sleep 600 | nc 127.0.0.1 {pa}; true")
        tree.connection = connection_to(pc)
        connection_to(pb)
        connection_to(pa)
        tree.info = {"shells": [a.pid, b.pid, c.pid], "ports": [pa, pb, pc]}
        return tree
    except BaseException:
        tree.stop()
        raise


def socat_unix() -> Tree:
    """A relay through a UNIX-domain socket: ``socat`` listening on a UNIX
    socket and forwarding to 127.0.0.1:P, fed by a second ``socat`` that
    reads a pipe. Walked from the TCP side, the UNIX peer must be found.
    ``info``: server, client pids, path."""
    import tempfile
    tree = Tree()
    try:
        port = free_port()
        listen_sink(tree, port)
        tree.dirs.append(tempfile.mkdtemp(prefix="stop-sv-"))
        path = os.path.join(tree.dirs[-1], "relay.sock")
        server = tree.spawn(f"exec socat UNIX-LISTEN:{path} TCP:127.0.0.1:{port}")
        wait_for(lambda: os.path.exists(path), what="unix socket")
        client = tree.spawn(f"sleep 600 | socat - UNIX-CONNECT:{path}")
        tree.connection = connection_to(port)
        tree.info = {"server": server.pid, "client_shell": client.pid, "path": path}
        return tree
    except BaseException:
        tree.stop()
        raise


def big_tree(n: int = 200) -> Tree:
    """One shell running a pipeline of ``n`` ``cat`` processes ending in an
    ``nc`` to a local sink: n+2 processes under one shell, all joined by
    pipes. ``info``: shell pid, n."""
    tree = Tree()
    try:
        port = free_port()
        listen_sink(tree, port)
        pipeline = " | ".join(["sleep 600"] + ["cat"] * n + [f"nc 127.0.0.1 {port}"])
        shell = tree.spawn(pipeline + "; true")
        tree.connection = connection_to(port)
        wait_for(lambda: len(children(shell.pid)) >= n + 2, timeout=30, what="pipeline")
        tree.info = {"shell": shell.pid, "n": n}
        return tree
    except BaseException:
        tree.stop()
        raise


def idle_processes(n: int) -> Tree:
    """``n`` extra processes, each with 3 std fds, 2 pipe fds and 1 file fd
    (the paper's Table II load), not connected to anything walked."""
    tree = Tree()
    for _ in range(n):
        # stdin/stdout/stderr: /dev/null; fds 3,4: a pipe; fd 5: a file.
        tree.spawn(f"exec {sys.executable} -c '"
                   "import os,time; r,w=os.pipe(); f=open(\"/etc/hostname\"); time.sleep(600)'")
    return tree
