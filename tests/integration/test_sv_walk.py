"""The SV walk on real process trees (loopback only), both backends.

Every asserted field is read from the live system (``ps``, ``/proc``,
``os.getpgid``), never written down as a constant.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from zope.interface.verify import verifyObject

from stop.interfaces import IProcessInspector, IProcessScan
from stop.os.common import PROCESS_FIELDS
from stop.walk import Budget, walk
from tests.integration import svtrees
from tests.integration.svtrees import make_inspector

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux trees")
needs = pytest.mark.skipif(not (shutil.which("nc") and shutil.which("socat")),
                           reason="needs netcat-openbsd and socat")
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BACKENDS = ("procfs", "psutil")


def by_pid(result: dict) -> dict[int, dict]:
    return {p["pid"]: p for p in result["processes"]}


def ps(pid: int) -> dict:
    """The process as ``ps`` reports it."""
    out = subprocess.run(
        ["ps", "-o", "ppid=,pgid=,ruid=,euid=,rgid=,egid=,ni=,comm=", "-p", str(pid)],
        capture_output=True, text=True, timeout=10, check=True).stdout.split()
    keys = ("ppid", "pgid", "ruid", "euid", "rgid", "egid", "ni")
    d = {k: int(v) for k, v in zip(keys, out)}
    d["comm"] = out[7]
    return d


def assert_live(p: dict) -> None:
    """``p`` (a saved process) matches the live process."""
    pid = p["pid"]
    live = ps(pid)
    assert p["ppid"] == live["ppid"]
    assert p["pgid"] == live["pgid"] == os.getpgid(pid)
    assert (p["uids"]["real"], p["uids"]["effective"]) == (live["ruid"], live["euid"])
    assert (p["gids"]["real"], p["gids"]["effective"]) == (live["rgid"], live["egid"])
    assert p["users"]["real"] == pwd.getpwuid(live["ruid"]).pw_name
    assert p["nice"] == live["ni"]
    assert p["name"] == live["comm"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert p["cmdline"] == [a.decode() for a in f.read().split(b"\0")[:-1]]
    assert p["cwd"] == os.readlink(f"/proc/{pid}/cwd")
    assert p["exe"] == os.readlink(f"/proc/{pid}/exe")
    st = os.stat(f"/proc/{pid}")
    assert abs(p["start_time"] - st.st_mtime) < 5  # /proc/PID appears at fork


@pytest.fixture
def fig3():
    tree = svtrees.figure3()
    yield tree
    tree.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_provide_the_interfaces(backend):
    inspector = make_inspector(backend)
    assert verifyObject(IProcessInspector, inspector)
    scan = inspector.begin(100)
    try:
        assert verifyObject(IProcessScan, scan)
    finally:
        scan.close()


@needs
def test_figure3_pipe_leads_to_the_listening_nc_and_its_inbound_connection(fig3):
    info = fig3.info
    result = walk(make_inspector("procfs"), fig3.connection)
    procs = by_pid(result)
    assert result["start"] == [info["nc_out"]]
    assert procs[info["nc_out"]]["reached"] == {"via": "socket"}
    assert procs[info["shell"]]["reached"] == {"via": "parent", "from": info["nc_out"]}
    assert procs[info["nc_in"]]["reached"]["via"] == "pipe"
    assert procs[info["nc_in"]]["reached"]["from"] == info["nc_out"]
    for pid in (info["nc_out"], info["shell"], info["nc_in"]):
        assert_live(procs[pid])
    # The first nc's inbound connection is saved with its direction.
    inbound = [s for s in procs[info["nc_in"]]["sockets"] if s.get("state") == "ESTABLISHED"]
    assert [(s["local"]["port"], s["direction"]) for s in inbound] == [(info["p1"], "inbound")]
    # The pipe between them is the same inode on both ends.
    out_pipe = {d["inode"] for d in procs[info["nc_out"]]["pipes"] if d["fd"] == 0}
    in_pipe = {d["inode"] for d in procs[info["nc_in"]]["pipes"] if d["fd"] == 1}
    assert out_pipe == in_pipe == {int(os.readlink(f"/proc/{info['nc_in']}/fd/1")[6:-1])}
    # The queried socket is saved but not followed to the requester.
    queried = [s for s in procs[info["nc_out"]]["sockets"] if s["inode"] == fig3.connection.inode]
    assert queried and "peers" not in queried[0]
    assert result["truncated"] == {"processes": False, "descriptors": False}


@needs
def test_figure3_psutil_says_it_cannot_follow_pipes(fig3):
    info = fig3.info
    result = walk(make_inspector("psutil"), fig3.connection)
    procs = by_pid(result)
    assert {info["nc_out"], info["shell"]} <= set(procs)
    assert info["nc_in"] not in procs
    assert "pipes" in result["unavailable"]
    assert "pipes" in procs[info["nc_out"]]["unavailable"]
    for pid in (info["nc_out"], info["shell"]):
        assert_live(procs[pid])


@needs
def test_a_named_fifo_is_followed_like_a_pipe(tmp_path):
    """``nc -l P1 > FIFO`` and ``nc P2 < FIFO`` in two sessions: asked about
    the second nc's socket, the FIFO leads to the first and its inbound
    connection, as an anonymous pipe does (figure 3)."""
    tree = svtrees.fifo_relay(str(tmp_path))
    try:
        info = tree.info
        result = walk(make_inspector("procfs"), tree.connection)
        procs = by_pid(result)
        assert result["start"] == [info["nc_out"]]
        assert procs[info["nc_in"]]["reached"] == {"via": "fifo", "from": info["nc_out"], "fd": 0}
        ino = os.stat(info["fifo"]).st_ino
        out_end = [d for d in procs[info["nc_out"]]["pipes"] if d["fd"] == 0]
        in_end = [d for d in procs[info["nc_in"]]["pipes"] if d["fd"] == 1]
        assert out_end == [{"fd": 0, "kind": "fifo", "path": info["fifo"], "inode": ino,
                            "peers": [[info["nc_in"], 1]]}]
        assert in_end == [{"fd": 1, "kind": "fifo", "path": info["fifo"], "inode": ino,
                           "peers": [[info["nc_out"], 0]]}]
        # Not listed again as an open file.
        assert not [f for p in procs.values() for f in p.get("files", ())
                    if f["path"] == info["fifo"]]
        inbound = [s for s in procs[info["nc_in"]]["sockets"] if s.get("state") == "ESTABLISHED"]
        assert [(s["local"]["port"], s["direction"]) for s in inbound] == [(info["p1"], "inbound")]
        for pid in (info["nc_out"], info["nc_in"]):
            assert_live(procs[pid])
        # On a shared index (which holds no paths) the FIFO is found too.
        inspector = make_inspector("procfs", index_max_age=3600)
        walk(inspector, tree.connection)
        again = walk(inspector, tree.connection)
        assert again["index"]["cached"] is True
        assert by_pid(again)[info["nc_in"]]["reached"] == procs[info["nc_in"]]["reached"]
    finally:
        tree.stop()


TITLE = r'''
import sys, time
with open("/proc/self/stat", "rb") as f:
    rest = f.read().rsplit(b")", 1)[1].split()
start, end = int(rest[45]), int(rest[46])  # fields 48, 49: arg_start, arg_end
title = sys.argv[1].encode()
with open("/proc/self/mem", "r+b", buffering=0) as mem:  # as sshd's setproctitle
    mem.seek(start)
    mem.write(title + b"\0" * (end - start - len(title)))
print("ready", flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rewritten_process_title_is_saved_without_its_padding(tmp_path, backend):
    """sshd overwrites its argument area with its title and pads the rest
    with NUL bytes: /proc shows a run of empty arguments after the title."""
    script = tmp_path / "title.py"
    script.write_text(TITLE)
    title = "sshd: alice [priv]"
    proc = subprocess.Popen([sys.executable, str(script), title, "x" * 64, "y" * 64],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            raw = f.read()
        assert raw.startswith(title.encode() + b"\0\0\0")  # the padding is there
        scan = make_inspector(backend).begin(1000)
        try:
            assert scan.process(proc.pid, {"cmdline"})["cmdline"] == [title]
        finally:
            scan.close()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


MONITOR = r'''
import os, socket, sys, time
far = socket.create_connection((sys.argv[1], int(sys.argv[2])))   # the "ssh" connection
asked = socket.create_connection(("127.0.0.1", int(sys.argv[3])))  # the queried one
if os.fork() == 0:  # the session: keeps both, as sshd's forked session does
    time.sleep(600)
    os._exit(0)
print(far.fileno(), flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_socket_two_processes_hold_is_one_remote_connection_with_both_holders(
        tmp_path, backend):
    """An sshd-like monitor and its forked session both hold a connection
    to another host (a loopback alias that is not one of ``here``): the
    record lists it once, with both holders."""
    far_host = "127.0.0.58"
    with socket.socket() as far, socket.socket() as near:
        far.bind((far_host, 0))
        far.listen(4)
        near.bind(("127.0.0.1", 0))
        near.listen(4)
        script = tmp_path / "monitor.py"
        script.write_text(MONITOR)
        tree = svtrees.Tree()
        try:
            monitor = tree.spawn(f"exec {sys.executable} {script} {far_host} "
                                 f"{far.getsockname()[1]} {near.getsockname()[1]}").pid
            held = [far.accept()[0], near.accept()[0]]
            try:
                conn = svtrees.connection_to(near.getsockname()[1])
                session = svtrees.wait_for(lambda: svtrees.children(monitor),
                                           what="the forked session")[0]
                far_inode = svtrees.wait_for(lambda: next(
                    (s.inode for s in svtrees.tcp_sockets()
                     if s.remote == (far_host, far.getsockname()[1])), None))
                fds = {pid: [int(n) for n in os.listdir(f"/proc/{pid}/fd")
                             if os.readlink(f"/proc/{pid}/fd/{n}") == f"socket:[{far_inode}]"]
                       for pid in (monitor, session)}
                result = walk(make_inspector(backend), conn, here={"127.0.0.1"})
            finally:
                for s in held:
                    s.close()
        finally:
            tree.stop()
    if backend == "procfs":
        assert set(result["start"]) == {monitor, session}
    else:  # psutil's system-wide table names one holder per socket: the
        # highest PID (the session, forked later); the monitor is its parent
        assert result["start"] == [max(monitor, session)]
    assert {monitor, session} <= set(by_pid(result))
    (entry,) = [r for r in result["remote_connections"] if r["remote"]["address"] == far_host]
    assert sorted(map(tuple, entry["holders"])) == sorted(
        (pid, fd) for pid, fds_of in fds.items() for fd in fds_of)
    assert len(entry["holders"]) == 2
    assert entry.get("inode", far_inode) == far_inode


@needs
def test_figure4_two_relays_through_a_pipe_and_a_local_tcp_connection():
    tree = svtrees.figure4()
    try:
        result = walk(make_inspector("procfs"), tree.connection)
        procs = by_pid(result)
        expected = set(tree.info["shells"])
        for shell in tree.info["shells"]:
            expected.update(svtrees.descendants(shell))
        assert expected <= set(procs)
        groups = {procs[p]["pgid"] for p in expected}
        assert groups == {os.getpgid(s) for s in tree.info["shells"]} == set(tree.info["shells"])
        for pid in expected:
            assert_live(procs[pid])
        # Both hops between the relays were local TCP: no connection to
        # another host was met.
        assert result["remote_connections"] == []
    finally:
        tree.stop()


@needs
def test_socat_relay_through_a_unix_domain_socket():
    tree = svtrees.socat_unix()
    try:
        result = walk(make_inspector("procfs"), tree.connection)
        procs = by_pid(result)
        server = tree.info["server"]
        assert result["start"] == [server]
        # socat also holds socketpairs of its own; the relay is the one
        # whose peer is another process.
        unix = [s for s in procs[server]["sockets"] if s["family"] == "AF_UNIX"
                and any(pid != server for pid, _fd in s.get("peers", []))]
        assert len(unix) == 1 and unix[0]["peer_inode"]
        (peer_pid, peer_fd), = unix[0]["peers"]
        assert svtrees.comm(peer_pid) == "socat"
        assert procs[peer_pid]["reached"]["via"] == "socket"
        assert os.readlink(f"/proc/{peer_pid}/fd/{peer_fd}") == f"socket:[{unix[0]['peer_inode']}]"
        client_shell = tree.info["client_shell"]
        assert procs[client_shell]["reached"] == {"via": "parent", "from": peer_pid}
        sleeps = [p for p in svtrees.children(client_shell) if svtrees.comm(p) == "sleep"]
        assert sleeps and set(sleeps) <= set(procs)
        assert_live(procs[peer_pid])
    finally:
        tree.stop()


class _KillOnRead:
    """Wraps a real inspector: kills ``victim`` just before the walk reads
    it, so it exits mid-walk for real."""

    def __init__(self, inner, victim: int):
        self.name = inner.name
        self._inner, self._victim = inner, victim

    def begin(self, max_fds):
        scan = self._inner.begin(max_fds)
        victim = self._victim
        real_process = scan.process

        def process(pid, fields):
            if pid == victim:
                os.kill(victim, signal.SIGKILL)
                svtrees.wait_for(lambda: not os.path.exists(f"/proc/{victim}"),
                                 what="the killed process to be reaped")
            return real_process(pid, fields)
        scan.process = process
        return scan


@needs
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_process_that_exits_mid_walk_is_recorded_not_fatal(fig3, backend):
    shell = fig3.info["shell"]
    result = walk(_KillOnRead(make_inspector(backend), shell), fig3.connection)
    procs = by_pid(result)
    assert procs[shell]["unavailable"] == {"process": "ESRCH"}
    assert procs[fig3.info["nc_out"]]["name"] == "nc"
    if backend == "procfs":
        assert fig3.info["nc_in"] in procs  # the walk went on


@needs
@pytest.mark.slow
def test_200_process_tree_respects_the_budget():
    tree = svtrees.big_tree(200)
    try:
        shell = tree.info["shell"]
        members = set(svtrees.children(shell)) | {shell}
        inspector = make_inspector("procfs")
        full = walk(inspector, tree.connection, Budget(max_processes=1000, max_fds=100000))
        assert members <= set(by_pid(full))
        assert full["truncated"] == {"processes": False, "descriptors": False}
        small = walk(inspector, tree.connection, Budget(max_processes=50, max_fds=100000))
        assert len(small["processes"]) == 50
        assert small["truncated"]["processes"] is True
        few_fds = walk(inspector, tree.connection, Budget(max_processes=1000, max_fds=100))
        assert few_fds["truncated"]["descriptors"] is True
    finally:
        tree.stop()


@needs
@root
def test_a_process_owned_by_nobody():
    nobody = pwd.getpwnam("nobody")
    tree = svtrees.Tree()
    try:
        port = svtrees.free_port()
        svtrees.listen_sink(tree, port)
        tree.spawn(f"exec setpriv --reuid={nobody.pw_uid} --regid={nobody.pw_gid} "
                   f"--clear-groups nc 127.0.0.1 {port}")
        conn = svtrees.connection_to(port)
        for backend in BACKENDS:
            result = walk(make_inspector(backend), conn)
            (start,) = result["start"]
            p = by_pid(result)[start]
            assert_live(p)
            assert p["uids"]["effective"] == nobody.pw_uid
            assert p["users"] == {"real": "nobody", "effective": "nobody"}
            assert "nobody" in result["users"]
    finally:
        tree.stop()


@needs
@root
def test_walking_as_nobody_records_what_it_cannot_read(fig3):
    """A daemon without privileges cannot read root's processes' cwd or
    descriptors: the record says so, the walk does not fail."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = walk(make_inspector("procfs"), fig3.connection)
            scan = make_inspector("procfs").begin(1000)
            shell = scan.process(fig3.info["shell"], PROCESS_FIELDS)
            os.write(w, json.dumps({"walk": result, "shell": shell}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    for _ in range(10000):
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = json.loads(data)
    # The holder cannot be found without reading root's descriptors, and
    # the record says why rather than claiming there is none.
    assert got["walk"]["start"] == []
    assert got["walk"]["unavailable"]["descriptors"].startswith("EACCES")
    shell = got["shell"]
    assert shell["unavailable"]["cwd"] == "EACCES"
    assert shell["unavailable"]["exe"] == "EACCES"
    assert shell["ppid"] == ps(fig3.info["shell"])["ppid"]
    assert shell["uids"]["real"] == 0


@needs
def test_both_backends_agree_on_the_same_live_tree():
    tree = svtrees.figure4()
    try:
        pids = set(tree.info["shells"])
        for shell in tree.info["shells"]:
            pids.update(svtrees.descendants(shell))
        fields = [f for f in PROCESS_FIELDS if f not in ("priority", "sockets", "pipes", "files")]
        a, b = make_inspector("procfs").begin(100000), make_inspector("psutil").begin(100000)
        try:
            for pid in sorted(pids):
                pa, pb = a.process(pid, fields), b.process(pid, fields)
                assert abs(pa.pop("start_time") - pb.pop("start_time")) <= 0.02
                assert pa == pb
                tcp = lambda ds: sorted(  # noqa: E731
                    (d["fd"], d["local"]["port"], d.get("remote", {}).get("port"), d["state"],
                     d.get("direction")) for d in ds if d.get("type") == "SOCK_STREAM"
                    and d["family"].startswith("AF_INET"))
                assert tcp(a.descriptors(pid, False)) == tcp(b.descriptors(pid, False))
        finally:
            a.close()
            b.close()
        # Walks agree where psutil can follow (parents and local TCP).
        wa = by_pid(walk(make_inspector("procfs"), tree.connection))
        wb = by_pid(walk(make_inspector("psutil"), tree.connection))
        assert set(wb) <= set(wa)
        for pid in wb:
            assert wb[pid]["ppid"] == wa[pid]["ppid"]
            assert wb[pid]["uids"] == wa[pid]["uids"]
    finally:
        tree.stop()


# -- the procfs backend's shared inode index ---------------------------------
#
# Each test drives real processes (a small Python program taking commands
# through a FIFO) and checks what a walk on a cached index reports against
# the live /proc. Where only the descriptor checks must catch a change, the
# "new process" check is pinned to the index's own /proc listing, so that
# unrelated processes started elsewhere on the machine cannot trigger a
# rebuild first.

ACTOR = r'''
import json, os, socket, sys, time, traceback
ctl, out = sys.argv[1], sys.argv[2]
sys.stderr = open(out + ".err", "w", buffering=1)
conn = socket.create_connection(("127.0.0.1", int(sys.argv[3]))) if len(sys.argv) > 3 else None
fds, kids, seq = {}, [], 0
for _ in range(200):
    # Read to EOF: the command is done only once the writer has closed the
    # FIFO, else the next open(ctl) could find the writer still there and
    # hold ctl open while a walk reads this process's descriptors.
    with open(ctl) as f:
        line = f.read().split()
    if not line:  # a writer that came and went without a command
        continue
    seq += 1
    cmd, args = line[0], line[1:]
    if cmd == "pipe":
        fds["r"], fds["w"] = os.pipe()
    elif cmd == "grab":  # open another process's descriptor (a pipe end)
        fds["g"] = os.open(f"/proc/{args[0]}/fd/{args[1]}", os.O_RDWR)
    elif cmd == "reuse":  # close it; the same number now names /dev/null
        os.close(fds["g"])
        assert os.open("/dev/null", os.O_RDONLY) == fds["g"]
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:  # keeps the pipe, not the connection
            if conn is not None:
                conn.close()
            time.sleep(600)
            os._exit(0)
        kids.append(pid)
    with open(out + ".tmp", "w") as f:
        json.dump({"seq": seq, "fds": fds, "kids": kids}, f)
    os.rename(out + ".tmp", out)
'''


class Actor:
    """One real process obeying ACTOR commands (own session, parent 1)."""

    def __init__(self, tree: svtrees.Tree, tmp_path, name: str, port: int | None = None):
        script = tmp_path / "actor.py"
        script.write_text(ACTOR)
        self.ctl, self.out = str(tmp_path / f"{name}.ctl"), str(tmp_path / f"{name}.json")
        os.mkfifo(self.ctl, 0o600)
        self.seq = 0
        args = f"{self.ctl} {self.out}" + (f" {port}" if port else "")
        self.pid = tree.spawn(f"exec {sys.executable} {script} {args}").pid

    def do(self, *words) -> dict:
        def reader_ready():  # never block on a FIFO nobody reads (bounded)
            try:
                return os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK) + 1
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return None
        fd = svtrees.wait_for(reader_ready, what=f"actor {self.pid} to listen") - 1
        try:
            os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
        finally:
            os.close(fd)
        self.seq += 1

        def done():
            try:
                with open(self.out) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                return None
            return state if state["seq"] == self.seq else None
        return svtrees.wait_for(done, what=f"actor {self.pid}: {words}")


@pytest.fixture
def actors(tmp_path):
    """``holder`` holds the queried connection, ``other`` is not connected."""
    tree = svtrees.Tree()
    try:
        port = svtrees.free_port()
        svtrees.listen_sink(tree, port)
        holder = Actor(tree, tmp_path, "holder", port)
        other = Actor(tree, tmp_path, "other")
        conn = svtrees.connection_to(port)
        svtrees.wait_for(lambda: conn.inode in socket_inodes(holder.pid),
                         what="holder's connection")
        yield holder, other, conn
    finally:
        tree.stop()


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes ``pid`` holds now."""
    found = set()
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def pin_process_list(monkeypatch, inspector):
    """Make the index's own /proc listing the "current" one (see above)."""
    from stop.os.linux import fdindex
    entries = inspector.index_cache.current.entries
    monkeypatch.setattr(fdindex, "proc_entries", lambda: entries)


def pipe_inode(pid: int, fd: int) -> int:
    return int(os.readlink(f"/proc/{pid}/fd/{fd}")[6:-1])


@needs
def test_a_second_walk_on_an_unchanged_tree_reuses_the_index(fig3):
    inspector = make_inspector("procfs", index_max_age=3600)
    first = walk(inspector, fig3.connection)
    assert first["index"]["cached"] is False and first["index"]["rebuilt"] is True
    assert inspector.index_cache.builds == 1
    # Other tests on this machine start processes: each forces a rebuild
    # ("new process"); within 50 walks one must find the tree unchanged.
    reused = None
    for _ in range(50):
        builds = inspector.index_cache.builds
        result = walk(inspector, fig3.connection)
        note = result["index"]
        if note["cached"]:
            assert inspector.index_cache.builds == builds
            reused = result
            break
        assert note["why"] == "new process" and inspector.index_cache.builds == builds + 1
    assert reused is not None, "the index was never reused"
    assert reused["index"]["age_s"] >= 0 and reused["index"]["rebuilt"] is False
    # The same processes, reached the same way, as from a fresh index.
    strip = lambda r: [(p["pid"], p["reached"]) for p in r["processes"]]  # noqa: E731
    assert strip(reused) == strip(first)
    assert fig3.info["nc_in"] in by_pid(reused)


@needs
def test_max_age_zero_builds_for_every_walk(fig3):
    inspector = make_inspector("procfs", index_max_age=0)
    for n in range(1, 4):
        result = walk(inspector, fig3.connection)
        assert result["index"] == {"cached": False, "age_s": 0.0, "rebuilt": True,
                                   "why": "disabled"}
        assert inspector.index_cache.builds == n
        assert fig3.info["nc_in"] in by_pid(result)


def test_a_new_process_that_inherited_a_pipe_is_read_into_the_index(actors):
    holder, _other, conn = actors
    fds = holder.do("pipe")["fds"]
    inspector = make_inspector("procfs", index_max_age=3600)
    first = walk(inspector, conn)
    assert first["start"] == [holder.pid]
    (kid,) = holder.do("fork")["kids"]  # after the build; holds both ends
    assert pipe_inode(kid, fds["r"]) == pipe_inode(holder.pid, fds["r"])
    # The kid closes its copy of the queried connection at once; until it
    # has, the walk may start from it too (reached via "socket").
    svtrees.wait_for(lambda: conn.inode not in socket_inodes(kid),
                     what="the kid's close of the connection")
    result = walk(inspector, conn)
    # Grown, not rebuilt: only the new processes were read.
    assert result["index"]["cached"] is True and result["index"]["added"] >= 1
    assert inspector.index_cache.builds == 1
    procs = by_pid(result)
    assert kid in procs and kid not in by_pid(first)
    assert procs[kid]["reached"]["via"] == "pipe"
    assert procs[kid]["reached"]["from"] == holder.pid
    assert procs[kid]["ppid"] == holder.pid == ps(kid)["ppid"]


def test_a_new_pipe_of_a_walked_process_restarts_the_walk(actors, monkeypatch):
    holder, other, conn = actors
    inspector = make_inspector("procfs", index_max_age=3600)
    first = walk(inspector, conn)
    assert other.pid not in by_pid(first)
    pin_process_list(monkeypatch, inspector)
    fds = holder.do("pipe")["fds"]  # after the build
    grabbed = other.do("grab", holder.pid, fds["r"])["fds"]["g"]
    inode = pipe_inode(holder.pid, fds["r"])
    assert pipe_inode(other.pid, grabbed) == inode
    result = walk(inspector, conn)
    assert result["index"]["restarted"] is True
    assert result["index"]["why"] == "stale descriptor"
    # A new inode: only a new full scan finds who else got it since.
    assert inspector.index_cache.builds == 2
    procs = by_pid(result)
    assert procs[other.pid]["reached"] == {"via": "pipe", "from": holder.pid,
                                           "fd": min(fds["r"], fds["w"])}
    assert [d["inode"] for d in procs[other.pid]["pipes"]] == [inode]


def test_closed_reused_fds_and_exited_processes_in_the_index_are_not_reported(
        actors, monkeypatch):
    holder, other, conn = actors
    fds = holder.do("pipe")["fds"]
    grabbed = other.do("grab", holder.pid, fds["w"])["fds"]["g"]
    inspector = make_inspector("procfs", index_max_age=3600)
    first = walk(inspector, conn)
    assert by_pid(first)[other.pid]["reached"]["via"] == "pipe"
    pin_process_list(monkeypatch, inspector)
    # The fd number now names another file: the index entry is stale.
    other.do("reuse")
    assert os.readlink(f"/proc/{other.pid}/fd/{grabbed}") == "/dev/null"
    result = walk(inspector, conn)
    assert result["index"]["cached"] is True
    assert result["index"]["dropped"] >= 1
    assert other.pid not in by_pid(result)
    holder_pipes = [d for d in by_pid(result)[holder.pid]["pipes"]]
    assert all(other.pid not in [p[0] for p in d.get("peers", [])] for d in holder_pipes)
    # A process in the index that exited since.
    fresh = make_inspector("procfs", index_max_age=3600)
    monkeypatch.undo()
    other.do("grab", holder.pid, fds["w"])
    before = walk(fresh, conn)
    assert other.pid in by_pid(before)
    pin_process_list(monkeypatch, fresh)
    os.kill(other.pid, signal.SIGKILL)
    svtrees.wait_for(lambda: not os.path.exists(f"/proc/{other.pid}"), what="exit")
    after = walk(fresh, conn)
    assert after["index"]["cached"] is True and after["index"]["dropped"] >= 1
    assert other.pid not in by_pid(after)


@needs
def test_parallel_walks_share_one_index(fig3):
    import threading
    inspector = make_inspector("procfs", index_max_age=3600)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(walk(inspector, fig3.connection))
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 20
    want = {fig3.info["nc_out"], fig3.info["shell"], fig3.info["nc_in"]}
    assert all(want <= set(by_pid(r)) for r in results)
    # One build per distinct index: never more builds than walks that did not reuse.
    assert inspector.index_cache.builds == sum(not r["index"]["cached"] for r in results)
