"""The SV walk's results do not depend on how the backend finds holders.

However the procfs backend gets its inode -> holders answers (a shared
index, reused or grown, a search among the processes of the socket's uid,
anything a speed-up brings), a walk must report exactly what a walk on an
index built from scratch for that walk reports (``index_max_age = 0``: the
plain full scan), on the same live trees: the same processes reached the
same way, the same sockets (ends, state, direction), pipes and their peers,
files. And what it reports for each process must be that process's live
descriptor table.

Not timed: speed is measured in bench/.
"""

from __future__ import annotations

import os
import signal
import shutil
import sys

import pytest

from stop.model import Connection, Endpoint
from stop.walk import walk
from tests.integration import svtrees
from tests.integration.svtrees import make_inspector

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux trees"),
    pytest.mark.skipif(not (shutil.which("nc") and shutil.which("socat")),
                       reason="needs netcat-openbsd and socat"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

#: A process that opens one more connection to 127.0.0.1:PORT on every
#: SIGUSR1 and writes how many it opened and the local port of the last to
#: OUT (atomically; "0 0" once it is ready for signals). It keeps every
#: connection it opened; bounded to 50.
OPENER = r'''
import os, signal, socket, sys, time
out, port = sys.argv[1], int(sys.argv[2])
held, wanted = [], [0]
signal.signal(signal.SIGUSR1, lambda *a: wanted.__setitem__(0, wanted[0] + 1))
with open(out + ".tmp", "w") as f:
    f.write("0 0")  # ready for signals
os.rename(out + ".tmp", out)
deadline = time.monotonic() + 600
while time.monotonic() < deadline and len(held) < 50:
    if not wanted[0]:
        signal.pause()
        continue
    wanted[0] -= 1
    held.append(socket.create_connection(("127.0.0.1", port)))
    with open(out + ".tmp", "w") as f:
        f.write("%d %d" % (len(held), held[-1].getsockname()[1]))
    os.rename(out + ".tmp", out)
'''


class Opener:
    """``sleep 600 | python OPENER`` in its own session, and a sink on
    PORT that forks a ``socat`` (which runs ``cat``) per connection: every
    new connection brings a new socket into an existing process and new
    processes at its other end."""

    def __init__(self, tree: svtrees.Tree, tmp_path):
        self.port = svtrees.free_port()
        tree.spawn(f"exec socat TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr EXEC:cat")
        svtrees.wait_for(lambda: any(s.local == ("127.0.0.1", self.port)
                                     for s in svtrees.tcp_sockets("LISTEN")), what="sink")
        script = tmp_path / "opener.py"
        script.write_text(OPENER)
        self.out = str(tmp_path / "opener.out")
        shell = tree.spawn(f"sleep 600 | {sys.executable} {script} {self.out} {self.port}")
        self.pid = svtrees.wait_for(
            lambda: [k for k in svtrees.children(shell.pid) if "python" in svtrees.comm(k)],
            what="opener")[0]
        svtrees.wait_for(lambda: os.path.exists(self.out), what="opener ready")
        self.opened = 0

    def new(self) -> Connection:
        """Open one more connection; the established socket of its opener end."""
        self.opened += 1
        os.kill(self.pid, signal.SIGUSR1)

        def ready():
            try:
                with open(self.out) as f:
                    n, port = (int(x) for x in f.read().split())
            except (OSError, ValueError):
                return None
            return port if n == self.opened else None
        lport = svtrees.wait_for(ready, what="new connection")

        def found():
            for s in svtrees.tcp_sockets():
                if s.local == ("127.0.0.1", lport) and s.remote == ("127.0.0.1", self.port):
                    return s
            return None
        s = svtrees.wait_for(found, what="its socket")
        # ... and the sink's side has forked its socat and cat.
        svtrees.wait_for(lambda: any(s2.local == ("127.0.0.1", self.port)
                                     and s2.remote == ("127.0.0.1", lport)
                                     for s2 in svtrees.tcp_sockets()), what="accepted end")
        return Connection(Endpoint(*s.local), Endpoint(*s.remote), s.uid, s.inode, False)


def tree_pids(tree: svtrees.Tree) -> set[int]:
    pids = set()
    for p in tree.procs:
        pids.add(p.pid)
        pids.update(svtrees.descendants(p.pid))
    return pids


def comparable(result: dict, pids: set[int]) -> dict:
    """The parts of a walk result that must not depend on the index: all of
    the tree's processes; of others (PID 1, which the machine's own
    programs change meanwhile) only that and how they were reached."""
    procs = []
    for p in result["processes"]:
        procs.append(p if p["pid"] in pids else {"pid": p["pid"], "reached": p["reached"]})
    out = {k: v for k, v in result.items() if k not in ("index", "processes", "unavailable")}
    out["processes"] = procs
    out["remote_connections"] = [r for r in result["remote_connections"] if r["pid"] in pids]
    out["unavailable"] = {k: v for k, v in result.get("unavailable", {}).items()
                          if k != "descriptors"}  # counts of unreadable processes host-wide
    return out


def live_descriptors(pid: int) -> list[tuple[int, str]]:
    """(fd, link) of every pipe and socket of ``pid``, from /proc now."""
    base = f"/proc/{pid}/fd"
    out = []
    for name in os.listdir(base):
        target = os.readlink(f"{base}/{name}")
        if target.startswith(("pipe:[", "socket:[")):
            out.append((int(name), target))
    return sorted(out)


def check_against_live(result: dict, pids: set[int]) -> None:
    """Every tree process walked reports its live pipes and sockets, and
    every pipe's peers are exactly the other holders of that pipe on the
    host (a brute-force scan of /proc, independent of the backend)."""
    holders: dict[str, set] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd, target in live_descriptors(int(entry)):
                holders.setdefault(target, set()).add((int(entry), fd))
        except OSError:
            continue
    walked = [p for p in result["processes"] if p["pid"] in pids]
    assert walked
    for p in walked:
        saved = sorted([(d["fd"], f"pipe:[{d['inode']}]") for d in p["pipes"]]
                       + [(d["fd"], f"socket:[{d['inode']}]") for d in p["sockets"]])
        assert saved == live_descriptors(p["pid"]), p["pid"]
        for d in p["pipes"]:
            others = holders[f"pipe:[{d['inode']}]"] - {(p["pid"], d["fd"])}
            assert sorted(tuple(x) for x in d.get("peers", [])) == sorted(others), (p["pid"], d)


def assert_same_walk(inspector, connection: Connection, pids: set[int]) -> dict:
    """Walk with ``inspector`` and with a fresh full-scan one; the results
    must agree (one retry: the host's other processes can change PID 1's
    side between the two walks, never the tree's)."""
    for attempt in range(2):
        got = walk(inspector, connection)
        want = walk(make_inspector("procfs", index_max_age=0), connection)
        if comparable(got, pids) == comparable(want, pids) or attempt:
            break
    assert comparable(got, pids) == comparable(want, pids)
    check_against_live(got, pids)
    return got


@pytest.mark.parametrize("build", [svtrees.figure3, svtrees.figure4, svtrees.socat_unix],
                         ids=["figure3", "figure4", "socat_unix"])
def test_a_walk_on_a_shared_index_equals_a_fresh_full_scan(build):
    tree = build()
    try:
        pids = tree_pids(tree)
        inspector = make_inspector("procfs", index_max_age=3600)
        first = assert_same_walk(inspector, tree.connection, pids)
        again = assert_same_walk(inspector, tree.connection, pids)
        assert [p["pid"] for p in first["processes"]] == [p["pid"] for p in again["processes"]]
    finally:
        tree.stop()


def test_fresh_connections_walk_as_a_full_scan_does(tmp_path):
    """New sockets in a process the index already knows, new processes at
    their other end: the walks the daemon makes for fresh ident queries."""
    tree = svtrees.Tree()
    try:
        opener = Opener(tree, tmp_path)
        inspector = make_inspector("procfs", index_max_age=3600)
        first = opener.new()
        assert_same_walk(inspector, first, tree_pids(tree))
        for _ in range(3):
            conn = opener.new()
            pids = tree_pids(tree)
            result = assert_same_walk(inspector, conn, pids)
            walked = {p["pid"]: p for p in result["processes"]}
            # The opener, the sleep feeding it, their shell; the socat
            # child at the far end of each earlier connection and the cat
            # it runs; the sink (the queried socket's far end is the
            # requester: not followed).
            assert result["start"] == [opener.pid]
            assert len([p for p in walked if p in pids]) == 4 + 2 * (opener.opened - 1)
            queried = [d for d in walked[opener.pid]["sockets"] if d["inode"] == conn.inode]
            assert len(queried) == 1 and queried[0]["state"] == "ESTABLISHED"
            # Both ports are ephemeral (the sink's came from bind(0)) and
            # the opener has no listener: nothing says which side opened
            # it (stop.os.direction), so never "inbound".
            assert (queried[0]["direction"], queried[0]["direction_by"]) == ("unknown", "none")
    finally:
        tree.stop()


@pytest.mark.parametrize("build", [svtrees.figure4, svtrees.socat_unix],
                         ids=["figure4", "socat_unix"])
def test_socket_ends_asked_of_the_socket_equal_the_table_dump(build, monkeypatch):
    """The walk learns a TCP socket's ends from the lookup that found the
    queried socket, else from the socket itself (pidfd_getfd); where it
    cannot it dumps the TCP table. All give the same sockets."""
    from stop.os.linux.procfs import ProcfsScan
    dumps = []
    real = ProcfsScan._refresh_tcp
    real_remember = ProcfsScan._remember_ends

    def counted(scan):
        dumps.append(scan._inspector)
        return real(scan)

    def remember(scan, *args):
        if scan._inspector is not dumped:  # the dump alone tells it its ends
            real_remember(scan, *args)
    monkeypatch.setattr(ProcfsScan, "_refresh_tcp", counted)
    monkeypatch.setattr(ProcfsScan, "_remember_ends", remember)
    tree = build()
    try:
        pids = tree_pids(tree)
        asked = make_inspector("procfs", index_max_age=0)
        dumped = make_inspector("procfs", index_max_age=0)
        dumped.peek_ok = False  # as when the call is refused
        for attempt in range(2):
            a, b = walk(asked, tree.connection), walk(dumped, tree.connection)
            if comparable(a, pids) == comparable(b, pids):
                break
        assert comparable(a, pids) == comparable(b, pids)
        tcp = [d for p in a["processes"] if p["pid"] in pids for d in p.get("sockets", [])
               if d.get("family", "").startswith("AF_INET")]
        assert tcp and all("local" in d for d in tcp)
        assert asked.peek_ok is True and asked not in dumps and dumped in dumps
    finally:
        tree.stop()


def test_peek_reports_a_socket_as_the_socket_itself_does():
    import socket as so

    from stop.os.linux import fdsock
    listener = so.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = so.create_connection(listener.getsockname())
    server, _ = listener.accept()
    udp = so.socket(so.AF_INET, so.SOCK_DGRAM)
    unix_a, unix_b = so.socketpair()
    try:
        me = os.getpid()
        got = fdsock.peek(me, client.fileno())
        assert (got.family, got.type) == (so.AF_INET, so.SOCK_STREAM)
        assert got.local == client.getsockname() and got.remote == client.getpeername()
        got = fdsock.peek(me, listener.fileno())
        assert got.local == listener.getsockname() and got.remote is None
        assert fdsock.peek(me, udp.fileno()).type == so.SOCK_DGRAM
        got = fdsock.peek(me, unix_a.fileno())
        assert got.family == so.AF_UNIX and got.local is None
        r, w = os.pipe()
        try:
            with pytest.raises(OSError):
                fdsock.peek(me, r)  # not a socket
        finally:
            os.close(r)
            os.close(w)
        # The borrowed copies are closed: the sockets still work.
        client.sendall(b"x")
        assert server.recv(1) == b"x"
    finally:
        for s in (listener, client, server, udp, unix_a, unix_b):
            s.close()


def test_a_refused_pidfd_getfd_falls_back_to_the_dump(monkeypatch):
    import errno

    from stop.os.linux import fdsock
    monkeypatch.setattr(fdsock, "_syscall", lambda *a: -1)
    monkeypatch.setattr(fdsock.ctypes, "get_errno", lambda: errno.EPERM)
    tree = svtrees.figure3()
    try:
        inspector = make_inspector("procfs", index_max_age=0)
        result = walk(inspector, tree.connection)
        assert inspector.peek_ok is False
        monkeypatch.undo()
        want = walk(make_inspector("procfs", index_max_age=0), tree.connection)
        pids = tree_pids(tree)
        assert comparable(result, pids) == comparable(want, pids)
    finally:
        tree.stop()


def refused_process():
    """A PID whose exe link this process may not read though it may list
    its descriptors (PID 1 in some VMs and containers), or None."""
    for entry in sorted(os.listdir("/proc"), key=lambda e: (len(e), e)):
        if not entry.isdigit():
            continue
        try:
            os.readlink(f"/proc/{entry}/exe")
            continue
        except PermissionError:
            pass
        except OSError:
            continue
        try:
            if os.listdir(f"/proc/{entry}/fd"):
                return int(entry)
        except OSError:
            continue
    return None


def test_a_refused_process_reports_as_listing_its_table_does(monkeypatch):
    """The walk does not list the descriptors of a process whose exe link
    was refused (the same kernel check guards its fd links); what it
    reports is what listing and reading them reports."""
    from stop.os.linux import procfs
    pid = refused_process()
    if pid is None:
        pytest.skip("no process here refuses its links to root")
    fields = ("name", "cwd", "exe", "ppid")

    def read(scan):
        proc = scan.process(pid, fields)
        try:
            scan.descriptors(pid, True)
        except Exception as exc:  # noqa: BLE001: the outcome is compared
            proc["descriptors"] = (type(exc).__name__, str(exc))
        return proc, scan._fds_read, scan.truncated

    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(procfs.os, "listdir", lambda p: listed.append(p) or real_listdir(p))
    fast = read(make_inspector("procfs", index_max_age=0).begin(65536))
    assert f"/proc/{pid}/fd" not in listed
    monkeypatch.setattr(procfs, "_fd_count", lambda base: 0)  # the plain listing
    plain = read(make_inspector("procfs", index_max_age=0).begin(65536))
    assert f"/proc/{pid}/fd" in listed
    assert fast == plain
    assert fast[0]["descriptors"] == ("Unavailable", "EACCES")


def test_the_queried_socket_is_not_asked_for_its_ends(tmp_path, monkeypatch):
    """The lookup gave the queried socket's ends: the walk looks it up by
    them, without pidfd_getfd, and reports it as asking it would."""
    from stop.os.linux import fdsock, procfs
    peeked = []
    real_peek = fdsock.peek
    monkeypatch.setattr(fdsock, "peek", lambda pid, fd: peeked.append((pid, fd)) or
                        real_peek(pid, fd))
    tree = svtrees.Tree()
    try:
        opener = Opener(tree, tmp_path)
        opener.new()  # an earlier connection, whose sockets the walk asks
        conn = opener.new()
        seeded = walk(make_inspector("procfs", index_max_age=0), conn)
        queried_fds = [d["fd"] for p in seeded["processes"] if p["pid"] == opener.pid
                       for d in p["sockets"] if d["inode"] == conn.inode]
        assert len(queried_fds) == 1
        assert (opener.pid, queried_fds[0]) not in peeked
        assert (opener.pid, queried_fds[0] - 1) in peeked  # the earlier one still is
        monkeypatch.setattr(procfs.ProcfsScan, "_remember_ends", lambda *a: None)
        peeked.clear()
        asked = walk(make_inspector("procfs", index_max_age=0), conn)
        assert (opener.pid, queried_fds[0]) in peeked
        pids = tree_pids(tree)
        assert comparable(seeded, pids) == comparable(asked, pids)
    finally:
        tree.stop()
