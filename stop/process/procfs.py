"""Linux process inspection: ``/proc`` read directly, sockets via sock_diag.

Costs (why it is shaped this way): every descriptor of every process is
read at most once per walk. The first call that needs to know who holds a
pipe or socket inode (:meth:`ProcfsScan.holders`, :meth:`ProcfsScan.peers`)
reads every ``/proc/PID/fd`` once and builds an inode -> (pid, fd) index;
the descriptor tables of reached processes come from that same read. TCP
sockets come from one ``inet_diag`` dump per family per walk; a UNIX
socket's peer from one exact ``unix_diag`` request per socket met.
"""

from __future__ import annotations

import errno
import glob
import os
import pwd
import socket
import sys
from collections import defaultdict

from zope.interface import implementer

from stop.interfaces import IProcessInspector, IProcessScan
from stop.model import Connection
from stop.process import ProcessGone, Unavailable, reason_of, text
from stop.process.sockdiag import LISTEN_ONLY, InetSock, SockDiag, format_address

PROC = "/proc"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def boot_time() -> float:
    """Boot time in seconds since the epoch, from ``/proc/stat``."""
    for line in _read(f"{PROC}/stat").splitlines():
        if line.startswith(b"btime "):
            return float(line.split()[1])
    raise OSError(errno.ENOENT, "no btime in /proc/stat")


def _tty_name(dev: int, ttys: dict[int, str]) -> str | None:
    """Device number of a controlling terminal -> its /dev path (None for 0)."""
    if dev == 0:
        return None
    major = (dev >> 8) & 0xFFF
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"/dev/pts/{(major - 136) * 256 + minor}"
    if not ttys:
        # Rare terminals (serial, console): map like psutil does, once.
        for path in glob.glob("/dev/tty*") + glob.glob("/dev/pts/*"):
            try:
                ttys[os.stat(path).st_rdev] = path
            except OSError:
                continue
    return ttys.get(dev, f"dev:{major}:{minor}")


@implementer(IProcessInspector)
class ProcfsInspector:
    """Linux backend: see the module docstring."""

    name = "procfs"

    def __init__(self) -> None:
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        self._boot = boot_time()
        self._ttys: dict[int, str] = {}
        #: TCP socket inode -> (local, remote), shared by walks: a socket's
        #: ends never change, and every use is checked by an exact lookup.
        #: Replaced whole (never grown) on refresh, so bounded by the
        #: number of sockets.
        self.tcp_ends: dict[int, tuple[tuple[str, int], tuple[str, int]]] = {}

    def begin(self, max_fds: int) -> "ProcfsScan":
        return ProcfsScan(self, max_fds)


@implementer(IProcessScan)
class ProcfsScan:
    """One walk over ``/proc`` (see :class:`stop.interfaces.IProcessScan`)."""

    unavailable: dict = {}

    def __init__(self, inspector: ProcfsInspector, max_fds: int):
        self._inspector = inspector
        self._max_fds = max_fds
        self._clk_tck = inspector._clk_tck
        self._boot = inspector._boot
        self._ttys = inspector._ttys
        self._fds_read = 0
        self.truncated = False
        self.unavailable = {}
        self._links: dict[int, list[tuple[int, str]]] = {}
        self._index: dict[tuple[str, int], list[tuple[int, int]]] | None = None
        self._tcp: dict[int, InetSock | None] = {}
        self._tcp_refreshed = False
        self._listening: set[tuple[str, int]] | None = None
        self._unix: dict[int, dict] = {}
        self._udp: dict[int, dict] | None = None
        self._diag: SockDiag | None = None
        self._users: dict[int, str | None] = {}

    # -- descriptor tables and the index -----------------------------------

    def _read_links(self, pid: int) -> list[tuple[int, str]]:
        """(fd, link target) of every descriptor of ``pid``, counted against
        the budget; cached for the rest of the walk."""
        if pid in self._links:
            return self._links[pid]
        base = f"{PROC}/{pid}/fd"
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            if not os.path.exists(f"{PROC}/{pid}"):
                raise ProcessGone(pid) from None
            raise Unavailable("ENOENT") from None
        except OSError as exc:
            raise Unavailable(reason_of(exc)) from None
        links = []
        for name in sorted(names, key=int):
            if self._fds_read >= self._max_fds:
                self.truncated = True
                break
            self._fds_read += 1
            try:
                links.append((int(name), os.readlink(f"{base}/{name}")))
            except PermissionError:
                # One unreadable link means all are (ptrace access mode):
                # stop here instead of failing once per descriptor.
                raise Unavailable("EACCES") from None
            except OSError:
                # Closed between listdir and readlink: the table changed
                # while read, which is normal.
                continue
        self._links[pid] = links
        return links

    def _build_index(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        if self._index is not None:
            return self._index
        index: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        unreadable: dict[str, int] = defaultdict(int)
        for entry in os.listdir(PROC):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                links = self._read_links(pid)
            except ProcessGone:
                continue
            except Unavailable as exc:
                unreadable[exc.reason] += 1
                continue
            for fd, target in links:
                if target.startswith("socket:["):
                    index[("socket", int(target[8:-1]))].append((pid, fd))
                elif target.startswith("pipe:["):
                    index[("pipe", int(target[6:-1]))].append((pid, fd))
        if unreadable:
            # Peers among these processes cannot be found: say so.
            self.unavailable["descriptors"] = ", ".join(
                f"{why} for {n} processes" for why, n in sorted(unreadable.items()))
        self._index = index
        return index

    # -- sockets ---------------------------------------------------------

    def _diag_socket(self) -> SockDiag:
        if self._diag is None:
            self._diag = SockDiag()
        return self._diag

    def _tcp_sock(self, inode: int) -> InetSock | None:
        """The TCP socket ``inode``, fresh from the kernel, or None when it
        is not a TCP socket (any more)."""
        if inode in self._tcp:
            return self._tcp[inode]
        found = None
        ends = self._inspector.tcp_ends.get(inode)
        try:
            if ends is not None:
                s = self._diag_socket().inet_exact(*ends)
                if s is not None and s.inode == inode:
                    found = s
            if found is None and not self._tcp_refreshed and self._unix_sock(inode) is None:
                found = self._refresh_tcp().get(inode)
        except OSError as exc:
            self.unavailable["tcp"] = reason_of(exc)
        self._tcp[inode] = found
        return found

    def _refresh_tcp(self) -> dict[int, InetSock]:
        """Dump every TCP socket once per walk (a socket met that the shared
        cache does not know), and renew the cache."""
        self._tcp_refreshed = True
        table: dict[int, InetSock] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for s in self._diag_socket().inet_dump(family):
                if s.inode:
                    table[s.inode] = s
        self._inspector.tcp_ends = {i: (s.local, s.remote) for i, s in table.items()}
        return table

    def _tcp_peer(self, local: tuple[str, int], remote: tuple[str, int]) -> int:
        """Inode of the socket at the other end of a TCP connection, when it
        is on this host (0 otherwise)."""
        try:
            s = self._diag_socket().inet_exact(remote, local)
        except OSError as exc:
            self.unavailable["tcp"] = reason_of(exc)
            return 0
        # An exact lookup can answer with the listener on (remote): reject.
        if s is None or s.state == "LISTEN" or (s.local, s.remote) != (remote, local):
            return 0
        return s.inode

    def _is_listening(self, address: str, port: int) -> bool:
        if self._listening is None:
            self._listening = set()
            try:
                for family in (socket.AF_INET, socket.AF_INET6):
                    for s in self._diag_socket().inet_dump(family, LISTEN_ONLY):
                        self._listening.add(s.local)
            except OSError as exc:
                self.unavailable["listening"] = reason_of(exc)
        return any((a, port) in self._listening for a in (address, "0.0.0.0", "::"))

    def _unix_sock(self, inode: int) -> dict | None:
        if inode in self._unix:
            return self._unix[inode]
        found: dict | None = None
        try:
            u = self._diag_socket().unix_exact(inode)
            if u is not None:
                found = {"family": "AF_UNIX", "type": u.type, "state": u.state,
                         "path": text(u.name), "peer_inode": u.peer or None}
        except OSError as exc:
            found = self._unix_from_proc(inode, reason_of(exc))
        self._unix[inode] = found
        return found

    def _unix_from_proc(self, inode: int, why: str) -> dict | None:
        """Fallback without unix_diag: /proc/net/unix has no peer."""
        types = {"0001": "SOCK_STREAM", "0002": "SOCK_DGRAM", "0005": "SOCK_SEQPACKET"}
        try:
            lines = _read(f"{PROC}/net/unix").decode("utf-8", "backslashreplace").splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            parts = line.split(None, 7)
            if len(parts) >= 7 and parts[6] == str(inode):
                return {"family": "AF_UNIX", "type": types.get(parts[4], parts[4]),
                        "path": parts[7] if len(parts) > 7 else "",
                        "unavailable": {"peer_inode": why}}
        return None

    def _udp_table(self) -> dict[int, dict]:
        if self._udp is None:
            self._udp = {}
            for name, family in (("udp", "AF_INET"), ("udp6", "AF_INET6")):
                try:
                    lines = _read(f"{PROC}/net/{name}").decode().splitlines()[1:]
                except OSError:
                    continue
                for line in lines:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    self._udp[int(parts[9])] = {
                        "family": family, "type": "SOCK_DGRAM",
                        "local": _hex_endpoint(parts[1]), "remote": _hex_endpoint(parts[2]),
                    }
        return self._udp

    def _socket(self, inode: int) -> dict:
        tcp = self._tcp_sock(inode)
        if tcp is not None:
            d = {"family": "AF_INET6" if tcp.family == socket.AF_INET6 else "AF_INET",
                 "type": "SOCK_STREAM",
                 "local": {"address": tcp.local[0], "port": tcp.local[1]},
                 "remote": {"address": tcp.remote[0], "port": tcp.remote[1]},
                 "state": tcp.state}
            if tcp.state == "LISTEN":
                del d["remote"]  # a listener has no other end (as psutil says)
            elif tcp.state not in ("TIME_WAIT", "CLOSE"):
                d["direction"] = ("inbound" if self._is_listening(*tcp.local) else "outbound")
            return d
        unix = self._unix_sock(inode)
        if unix is not None:
            return dict(unix)
        udp = self._udp_table().get(inode)
        if udp is not None:
            return dict(udp)
        return {"family": "unknown"}

    # -- IProcessScan ------------------------------------------------------

    def holders(self, connection: Connection) -> list[int]:
        inode = connection.inode
        if not inode and connection.local.host:
            inode = self._tcp_peer((connection.remote.host, connection.remote.port),
                                   (connection.local.host, connection.local.port))
        if not inode:
            return []
        return sorted({pid for pid, _fd in self._build_index().get(("socket", inode), [])})

    def process(self, pid: int, fields) -> dict:
        fields = set(fields)
        try:
            stat = _read(f"{PROC}/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(pid) from None
        except OSError as exc:
            raise Unavailable(reason_of(exc)) from None
        lparen, rparen = stat.index(b"("), stat.rindex(b")")
        rest = stat[rparen + 2:].split()
        out: dict = {"pid": pid, "ppid": int(rest[1])}
        missing: dict[str, str] = {}
        if "name" in fields:
            out["name"] = text(stat[lparen + 1:rparen].decode("utf-8", "surrogateescape"))
        if "pgid" in fields:
            out["pgid"] = int(rest[2])
        if "tty" in fields:
            out["tty"] = _tty_name(int(rest[4]), self._ttys)
        if "priority" in fields:
            out["priority"] = int(rest[15])
        if "nice" in fields:
            out["nice"] = int(rest[16])
        if "start_time" in fields:
            out["start_time"] = round(self._boot + int(rest[19]) / self._clk_tck, 2)
        if fields & {"uids", "gids", "users"}:
            self._ids(pid, fields, out, missing)
        if "cmdline" in fields:
            try:
                raw = _read(f"{PROC}/{pid}/cmdline")
                out["cmdline"] = [text(a.decode("utf-8", "surrogateescape"))
                                  for a in raw.split(b"\0")[:-1]] if raw else []
            except OSError as exc:
                missing["cmdline"] = reason_of(exc)
        for field in ("cwd", "exe"):
            if field in fields:
                try:
                    out[field] = text(os.readlink(f"{PROC}/{pid}/{field}"))
                except OSError as exc:
                    missing[field] = reason_of(exc)
        if missing:
            out["unavailable"] = missing
        return out

    def _ids(self, pid: int, fields: set, out: dict, missing: dict) -> None:
        try:
            status = _read(f"{PROC}/{pid}/status")
        except OSError as exc:
            for f in fields & {"uids", "gids", "users"}:
                missing[f] = reason_of(exc)
            return
        ids = {}
        for line in status.splitlines():
            if line.startswith((b"Uid:", b"Gid:")):
                real, eff, saved = (int(x) for x in line.split()[1:4])
                ids[line[:3].decode().lower()] = {"real": real, "effective": eff, "saved": saved}
        if "uids" in fields:
            out["uids"] = ids["uid"]
        if "gids" in fields:
            out["gids"] = ids["gid"]
        if "users" in fields:
            out["users"] = {k: self._user(v) for k, v in ids["uid"].items() if k != "saved"}

    def _user(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def descriptors(self, pid: int, open_files: bool) -> list[dict]:
        out = []
        for fd, target in self._read_links(pid):
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                d = {"fd": fd, "kind": "socket", "inode": inode}
                d.update(self._socket(inode))
            elif target.startswith("pipe:["):
                d = {"fd": fd, "kind": "pipe", "inode": int(target[6:-1])}
            elif open_files:
                d = {"fd": fd, "kind": "file", "path": text(target)}
            else:
                continue
            out.append(d)
        return out

    def peers(self, pid: int, descriptor: dict) -> list[tuple[int, int]]:
        kind = descriptor.get("kind")
        if kind == "pipe":
            key = ("pipe", descriptor["inode"])
        elif kind == "socket" and descriptor.get("family") == "AF_UNIX":
            if not descriptor.get("peer_inode"):
                return []
            key = ("socket", descriptor["peer_inode"])
        elif kind == "socket" and "remote" in descriptor and descriptor.get("type") == "SOCK_STREAM":
            if descriptor.get("state") in ("LISTEN", "TIME_WAIT", "CLOSE"):
                return []
            loc, rem = descriptor["local"], descriptor["remote"]
            peer = self._tcp_peer((loc["address"], loc["port"]), (rem["address"], rem["port"]))
            if not peer:
                return []
            key = ("socket", peer)
        else:
            return []
        me = (pid, descriptor["fd"])
        return sorted(h for h in self._build_index().get(key, []) if h != me)

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None


def _hex_endpoint(field: str) -> dict:
    """``0100007F:0035`` (a /proc/net/udp address) -> {"address", "port"}."""
    addr, port = field.split(":")
    raw = bytes.fromhex(addr)
    if sys.byteorder == "little":
        # /proc/net prints each 32-bit word of the address as a host-order int.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return {"address": format_address(family, raw), "port": int(port, 16)}
