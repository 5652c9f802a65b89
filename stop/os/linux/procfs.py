"""Linux process inspection: ``/proc`` read directly, sockets via sock_diag.

Costs (why it is shaped this way): the question "who holds pipe or socket
inode X" has no answer in Linux but reading every ``/proc/PID/fd``; that
inode -> (pid, fd) index (:mod:`stop.os.linux.fdindex`) is built by one walk
and shared by the walks that follow while it can be trusted (its age, no new
process, every walked process's descriptors in it; each holder taken from it
is checked against the live descriptor before use). A walk reads the
descriptor table of each process it reaches fresh, once. TCP sockets come
from exact ``inet_diag`` lookups (a full dump only for a socket the shared
ends cache does not know); a UNIX socket's peer from one exact ``unix_diag``
request per socket met.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
import stat
import time

from twisted.logger import Logger
from zope.interface import implementer

from stop.errors import ProcessGone, SockDiagFailed, StaleIndex, Unavailable
from stop.interfaces import IProcessInspector, IProcessScan
from stop.model import Connection
from stop.os.common import UserNames, command_line, reason_of, text
from stop.os.direction import DirectionRule
from stop.os.linux import fdsock, sockdiag
from stop.os.linux.fdindex import (FdIndex, Holder, IndexCache, Key, link_key, pids_of,
                                   proc_entries)
from stop.os.linux.procnet import parse_address
from stop.os.linux.sockdiag import (TCP_CLOSE, TCP_LISTEN, TCP_TIME_WAIT, InetSock, SockDiag,
                                    decode_inet, decode_unix, host_key)

PROC = "/proc"

log = Logger()


def _read(path: str) -> bytes:
    """The whole of a (small, ``/proc``) file; raw ``os`` calls, which cost
    half of ``open().read()`` here."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        # /proc files arrive in one read unless large (cmdline, net tables).
        while len(chunks[-1]) == 65536 and len(chunks) < 4096:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


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
    """Linux backend: see the module docstring.

    :param index_max_age: seconds the inode index may be shared between
        walks (0: every walk builds its own).
    :param rule: the :class:`~stop.os.direction.DirectionRule` deciding each
        connection's direction (default: this host's port range).
    """

    name = "procfs"

    def __init__(self, index_max_age: float = 10.0, rule: DirectionRule | None = None) -> None:
        self.rule = rule or DirectionRule()
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        self._boot = boot_time()
        self._ttys: dict[int, str] = {}
        #: TCP socket inode -> (local key, port, remote key, port), shared by
        #: walks: a socket's ends never change, and every use is checked by
        #: an exact lookup. Replaced whole on refresh; grown by the ends a
        #: socket reports itself (stop.os.linux.fdsock) up to TCP_ENDS_MAX.
        self.tcp_ends: dict[int, tuple[bytes, int, bytes, int]] = {}
        #: False once pidfd_getfd turned out unavailable (stop.os.linux.fdsock).
        self.peek_ok = True
        #: sock_diag transports of finished walks, for the next ones (a walk
        #: takes one for itself: no walk waits on another's dump); opening
        #: one costs about as much as two requests.
        self.transports: list[SockDiag] = []
        #: The inode -> (pid, fd) index shared by walks.
        self.index_cache = IndexCache(index_max_age)
        self._names = UserNames()
        self._names_at = time.monotonic()

    def user_names(self) -> UserNames:
        """uid -> name lookups shared by walks, forgotten after the index's
        max_age (so a renamed user shows as renamed as soon as a rebuilt
        index would)."""
        now = time.monotonic()
        if now - self._names_at > self.index_cache.max_age:
            self._names, self._names_at = UserNames(), now
        return self._names

    def begin(self, max_fds: int) -> "ProcfsScan":
        return ProcfsScan(self, max_fds)

    def _rescan(self, max_fds: int, restarts: int, why: str) -> "ProcfsScan":
        """A scan for a restarted walk (its ``restarts``-th): on the shared
        index, which the stale pass brought up to date with every table it
        read; from the :data:`MAX_PATCHED_RESTARTS`-th on, on an index
        built now, and that scan never raises StaleIndex."""
        return ProcfsScan(self, max_fds, restart=(restarts, why))


@implementer(IProcessScan)
class ProcfsScan:
    """One walk over ``/proc`` (see :class:`stop.interfaces.IProcessScan`)."""

    unavailable: dict = {}

    def __init__(self, inspector: ProcfsInspector, max_fds: int,
                 restart: tuple[int, str] | None = None):
        self._inspector = inspector
        self._restart = restart
        self._max_fds = max_fds
        self._clk_tck = inspector._clk_tck
        self._boot = inspector._boot
        self._ttys = inspector._ttys
        self._fds_read = 0
        self.truncated = False
        #: PIDs whose cwd or exe link was refused (EACCES) in this walk.
        self._denied: set[int] = set()
        self.unavailable = {}
        self._links: dict[int, list[tuple[int, str]]] = {}
        self._index: FdIndex | None = None
        #: True while the index in use came from the shared cache (built
        #: before this walk): its entries are validated before use.
        self._cached = False
        self._dropped = 0
        self._added = 0     # new processes this walk read into the shared index
        self._searched = 0  # processes read to find the holder of a new socket
        self.index: dict | None = None  # how the index was obtained (record note)
        self._tcp: dict[int, InetSock | None] = {}
        self._tcp_refreshed = False
        self._listening: dict[tuple[bytes, int], bool | None] = {}
        self._rule = inspector.rule
        self._stats: dict[Holder, tuple[int, int] | None] = {}  # named FIFOs
        self._fifos: dict[tuple[int, int], list[Holder]] = {}
        self._unix: dict[int, dict] = {}
        self._udp: dict[int, dict] | None = None
        self._diag_transport: SockDiag | None = None
        self._user = inspector.user_names()

    # -- descriptor tables and the index -----------------------------------

    def _read_links(self, pid: int) -> list[tuple[int, str]]:
        """(fd, link target) of every descriptor of ``pid``, counted against
        the budget; cached for the rest of the walk."""
        if pid in self._links:
            return self._links[pid]
        base = f"{PROC}/{pid}/fd"
        if pid in self._denied and _fd_count(base) > 0:
            # Its cwd or exe link was refused: every fd link is guarded by
            # the same ptrace check (the kernel's proc_pid_readlink), so the
            # first readlink below would fail as well. Fail the same way
            # without listing the table (~0.4 us per descriptor: 110 us for
            # a PID 1 with 270).
            if self._fds_read >= self._max_fds:
                self.truncated = True
                self._links[pid] = []
                return []
            self._fds_read += 1
            raise Unavailable("EACCES")
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

    def _build_index(self, entries: frozenset, started: float) -> FdIndex:
        """Read every process among ``entries`` (the index scan, counted
        against the budget; the tables stay cached for this walk)."""
        tables: dict[int, list[tuple[int, Key]]] = {}
        uids: dict[int, int] = {}
        unreadable: dict[int, str] = {}
        for pid in pids_of(entries):
            got = self._table(pid)
            if isinstance(got, tuple):
                tables[pid], uids[pid] = got
            elif got is not None:
                unreadable[pid] = got
        return FdIndex.from_tables(tables, uids, unreadable, entries, started,
                                   not self.truncated)

    def _table(self, pid: int) -> tuple[list[tuple[int, Key]], int] | str | None:
        """``pid``'s (fd, key) pairs and uid for the index
        (:data:`stop.os.linux.fdindex.Reader`)."""
        try:
            links = self._read_links(pid)
        except ProcessGone:
            return None
        except Unavailable as exc:
            return exc.reason
        return _pairs(links), _uid_of(pid)

    def _grow_table(self, pid: int):
        """:meth:`_table` for a new process read into the shared index."""
        self._added += 1
        return self._table(pid)

    def _take_index(self, not_before: float | None = None, why: str | None = None) -> FdIndex:
        """Get the index from the shared cache (reused, grown, or built)
        and note how."""
        cache = self._inspector.index_cache
        index, built_why, age = cache.get(self._build_index, not_before, self._grow_table)
        if built_why is None and self.truncated:
            cache.discard(index)  # grown with part of a table: not to be shared
        self._index = index
        self._cached = built_why is None
        note: dict = {"cached": self._cached, "age_s": round(age, 3),
                      "rebuilt": not self._cached}
        if not self._cached:
            note["why"] = why or built_why
        if self._restart is not None:
            note["restarted"] = True
            note.setdefault("why", self._restart[1])
        if self._added:
            note["added"] = self._added
        self.index = note
        self.unavailable.pop("descriptors", None)
        if index.unreadable:
            # Peers among these processes cannot be found: say so.
            self.unavailable["descriptors"] = ", ".join(
                f"{why} for {n} processes" for why, n in sorted(index.unreadable.items()))
        return index

    def _get_index(self) -> FdIndex:
        if self._index is None:
            if self._restart is not None and self._restart[0] >= MAX_PATCHED_RESTARTS:
                return self._take_index(time.monotonic(), self._restart[1])
            return self._take_index()
        return self._index

    def _holders(self, key: Key) -> list[Holder]:
        """Who holds ``key`` now, from the index. Entries of a shared index
        are checked against the live descriptor first: a closed fd, a
        reused fd number or an exited process is dropped; when the link
        changed, the process's table is read in case it moved the
        descriptor (dup2) and still holds the inode on another fd."""
        index = self._get_index()
        listed = index.holders.get(key, [])
        if not self._cached:
            return list(listed)
        want = f"{key[0]}:[{key[1]}]"
        out: list[Holder] = []
        for pid, fd in listed:
            if pid not in self._links:
                try:
                    if os.readlink(f"{PROC}/{pid}/fd/{fd}") == want:
                        out.append((pid, fd))
                        continue
                except OSError:
                    pass
            try:
                fds = [f for f, target in self._read_links(pid) if target == want]
            except (ProcessGone, Unavailable):
                fds = []
            if fd not in fds:
                self._dropped += 1
            out.extend((pid, f) for f in fds)
        if self._dropped:
            self.index["dropped"] = self._dropped
        return sorted(set(out))

    def _check(self, pid: int, links: list[tuple[int, str]]) -> None:
        """Bring the shared index up to date with ``pid``'s table, read
        fresh by this walk; raise StaleIndex when it lacked a pipe or socket
        descriptor of it: lookups already answered may have missed this
        process. The restarted walk uses the index brought up to date with
        every table this pass read, unless the descriptor names an inode
        new to the index, or after MAX_PATCHED_RESTARTS restarts: then one
        built from scratch (and that scan never raises)."""
        if not self._cached or self.truncated:
            return
        index = self._index
        pairs = _pairs(links)
        if index.same_table(pid, pairs):
            return
        missing = [(fd, key) for fd, key in pairs if not index.has(key, (pid, fd))]
        # An inode the index knows no holder of is new: a process that got
        # it since (other than by fork: new processes are read in) is not
        # in the index; only a new full scan finds it.
        new_inode = any(not index.holders.get(key) for _fd, key in missing)
        cache = self._inspector.index_cache
        for other, other_links in self._links.items():
            # Every table this pass read is fresh: the index learns them all.
            cache.patch(index, other, _pairs(other_links))
        restarts = self._restart[0] if self._restart is not None else 0
        if missing and restarts < MAX_PATCHED_RESTARTS:
            fd, key = missing[0]
            inspector, max_fds = self._inspector, self._max_fds
            then = MAX_PATCHED_RESTARTS if new_inode else restarts + 1
            raise StaleIndex(
                f"pid {pid} fd {fd} ({key[0]}:[{key[1]}]) is not in the index",
                lambda: inspector._rescan(max_fds, then, "stale descriptor"))

    # -- sockets ---------------------------------------------------------

    def _diag(self) -> SockDiag:
        if self._diag_transport is None:
            try:
                self._diag_transport = self._inspector.transports.pop()
            except IndexError:
                self._diag_transport = SockDiag()
        return self._diag_transport

    def _tcp_sock(self, inode: int, holder: Holder | None = None) -> InetSock | None:
        """The TCP socket ``inode`` (held as ``holder``, (pid, fd), when
        known), fresh from the kernel, or None when it is not a TCP socket
        (any more)."""
        if inode in self._tcp:
            return self._tcp[inode]
        found = None
        inspector = self._inspector
        ends = inspector.tcp_ends.get(inode)
        try:
            if ends is not None:
                # Any state (a listener too): the inode is the check.
                found = self._exact_inode(ends, inode)
            tcp = True
            if found is None and holder is not None and inspector.peek_ok:
                found, tcp = self._peek_tcp(inode, holder)
            if found is None and tcp and not self._tcp_refreshed and self._unix_sock(inode) is None:
                found = self._refresh_tcp().get(inode)
        except SockDiagFailed as exc:
            self.unavailable["tcp"] = exc.reason
        self._tcp[inode] = found
        return found

    def _exact_inode(self, ends: tuple[bytes, int, bytes, int], inode: int) -> InetSock | None:
        """The TCP socket ``inode`` found by an exact lookup of ``ends``."""
        for s in self._diag().request(sockdiag.inet_exact(*ends), False, decode_inet):
            if s.inode == inode:
                return s
        return None

    def _peek_tcp(self, inode: int, holder: Holder) -> tuple[InetSock | None, bool]:
        """Ask the socket itself for its ends (:mod:`stop.os.linux.fdsock`)
        and look it up exactly: ``(socket, True)``; ``(None, False)`` when
        it is not a TCP socket (no dump can find it then); ``(None, True)``
        when unsure (gone, not found by its ends: the caller dumps)."""
        try:
            info = fdsock.peek(*holder)
        except fdsock.NotAvailable as exc:
            self._inspector.peek_ok = False
            log.info("pidfd_getfd unavailable ({why}): the SV walk dumps the TCP table to "
                     "learn a socket's ends", why=exc.reason)
            return None, True
        except OSError:
            return None, True
        if info.family not in (socket.AF_INET, socket.AF_INET6) or info.type != socket.SOCK_STREAM:
            return None, False
        try:
            lkey = host_key(info.local[0])[0]
            # A listener (no peer): the wildcard remote end finds it.
            rkey = host_key(info.remote[0])[0] if info.remote else b"\0" * len(lkey)
        except ValueError:
            return None, True
        if len(lkey) != len(rkey):
            return None, True
        ends = (lkey, info.local[1], rkey, info.remote[1] if info.remote else 0)
        s = self._exact_inode(ends, inode)
        if s is None:
            return None, True
        self._keep_ends(inode, ends)
        return s, True

    def _keep_ends(self, inode: int, ends: tuple[bytes, int, bytes, int]) -> None:
        """Remember TCP socket ``inode``'s ends for later walks."""
        cache = self._inspector.tcp_ends
        if len(cache) >= TCP_ENDS_MAX:
            cache.clear()
        cache[inode] = ends

    def _remember_ends(self, inode: int, local: tuple[str, int],
                       remote: tuple[str, int]) -> None:
        """Remember the ends of TCP socket ``inode`` as given (addresses as
        text), unless known. Only a hint: every use is an exact lookup
        checked by the inode, and a miss falls back to asking the socket."""
        if inode in self._inspector.tcp_ends:
            return
        try:
            lkey, rkey = host_key(local[0])[0], host_key(remote[0])[0]
        except ValueError:
            return
        if len(lkey) == len(rkey):
            self._keep_ends(inode, (lkey, local[1], rkey, remote[1]))

    def _refresh_tcp(self) -> dict[int, InetSock]:
        """Dump every TCP socket once per walk (a socket met that the shared
        cache does not know), and renew the cache."""
        self._tcp_refreshed = True
        table: dict[int, InetSock] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for s in self._diag().request(sockdiag.inet_dump(family), True, decode_inet):
                if s.inode:
                    table[s.inode] = s
        self._inspector.tcp_ends = {i: (s.src, s.sport, s.dst, s.dport) for i, s in table.items()}
        return table

    def _tcp_peer(self, local: tuple[str, int], remote: tuple[str, int]) -> int:
        """Inode of the socket at the other end of a TCP connection, when it
        is on this host (0 otherwise)."""
        try:
            lkey, rkey = host_key(local[0])[0], host_key(remote[0])[0]
        except ValueError:
            return 0
        if len(lkey) != len(rkey):
            return 0
        try:
            s = sockdiag.exact(self._diag(), rkey, remote[1], lkey, local[1])
        except SockDiagFailed as exc:
            self.unavailable["tcp"] = exc.reason
            return 0
        return s.inode if s is not None else 0

    def _is_listening(self, key: bytes, port: int) -> bool | None:
        """The listener signal of :mod:`stop.os.direction`: the kernel's own
        listener lookup, once per (address, port) and walk; None when the
        kernel could not be asked."""
        if (key, port) not in self._listening:
            try:
                self._listening[key, port] = sockdiag.listening(self._diag(), key, port)
            except SockDiagFailed as exc:
                self.unavailable["listening"] = exc.reason
                self._listening[key, port] = None
        return self._listening[key, port]

    def _unix_sock(self, inode: int) -> dict | None:
        if inode in self._unix:
            return self._unix[inode]
        found: dict | None = None
        try:
            for u in self._diag().request(sockdiag.unix_exact(inode), False, decode_unix):
                found = {"family": "AF_UNIX", "type": u.type, "state": u.state,
                         "path": text(u.name), "peer_inode": u.peer or None}
        except SockDiagFailed as exc:
            found = self._unix_from_proc(inode, exc.reason)
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
                    try:
                        local, remote = parse_address(parts[1]), parse_address(parts[2])
                        inode = int(parts[9])
                    except ValueError:
                        continue
                    self._udp[inode] = {"family": family, "type": "SOCK_DGRAM",
                                        "local": local.as_dict(), "remote": remote.as_dict()}
        return self._udp

    def _socket(self, inode: int, holder: Holder | None = None) -> dict:
        tcp = self._tcp_sock(inode, holder)
        if tcp is not None:
            (laddr, lport), (raddr, rport) = tcp.local, tcp.remote
            d = {"family": "AF_INET6" if tcp.family == socket.AF_INET6 else "AF_INET",
                 "type": "SOCK_STREAM",
                 "local": {"address": laddr, "port": lport},
                 "remote": {"address": raddr, "port": rport},
                 "state": tcp.state_name}
            if tcp.state == TCP_LISTEN:
                del d["remote"]  # a listener has no other end (as psutil says)
            elif tcp.state not in (TCP_TIME_WAIT, TCP_CLOSE):
                decided = self._rule.decide(lport, rport, self._is_listening(tcp.src, lport))
                d["direction"], d["direction_by"] = decided
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
        if connection.inode and connection.local.host:
            # The ends the lookup found it by: its exact lookup below needs
            # no pidfd_getfd to learn them (the inode is the check).
            self._remember_ends(inode, (connection.local.host, connection.local.port),
                                (connection.remote.host, connection.remote.port))
        found = self._holders(("socket", inode))
        if not found and self._cached and connection.uid is not None:
            # A socket newer than the shared index (the usual case for a
            # new connection): it was made by a process of its uid, most
            # likely a young one. Read those, newest first, before any
            # full scan; each table read brings the shared index up to date.
            found = self._search(connection.uid, inode)
        if not found and self._cached:
            # Not there either (e.g. a process that changed its uid): build
            # an index now; nothing was walked yet, so nothing to restart.
            self._take_index(time.monotonic(), "unknown socket")
            found = self._holders(("socket", inode))
        return sorted({pid for pid, _fd in found})

    def _search(self, uid: int, inode: int) -> list[Holder]:
        """Holders of socket ``inode`` among the processes whose /proc entry
        belongs to ``uid`` (most recently active first), read fresh; stops at the first
        that holds it. Other holders are children forked after the socket
        was made (new processes: read into the index by :meth:`_take_index`)
        or are met by the walk (read fresh and checked)."""
        index, cache = self._index, self._inspector.index_cache
        want = f"socket:[{inode}]"
        for pid in cache.candidates(index, uid):
            try:
                links = self._read_links(pid)
            except (ProcessGone, Unavailable):
                continue
            self._searched += 1
            self.index["searched"] = self._searched
            if self.truncated:
                break
            cache.patch(index, pid, _pairs(links))
            fds = [fd for fd, target in links if target == want]
            if fds:
                return [(pid, fd) for fd in fds]
        return []

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
        if "session" in fields:
            out["session"] = int(rest[3])
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
                # NUL-terminated arguments; command_line drops the empty
                # ones at the end (the last NUL's, a rewritten title's pad).
                out["cmdline"] = command_line(
                    [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")])
            except OSError as exc:
                missing["cmdline"] = reason_of(exc)
        for field in ("cwd", "exe"):
            if field in fields:
                try:
                    out[field] = text(os.readlink(f"{PROC}/{pid}/{field}"))
                except OSError as exc:
                    missing[field] = reason_of(exc)
                    if exc.errno == errno.EACCES:
                        self._denied.add(pid)
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
        for tag in (b"Uid:", b"Gid:"):
            # Two lines out of ~55: find them instead of splitting all.
            at = status.find(b"\n" + tag)
            if at < 0:
                for f in fields & {"uids", "gids", "users"}:
                    missing[f] = "no " + tag.decode()
                return
            line = status[at + 5:status.find(b"\n", at + 5)]
            real, eff, saved = (int(x) for x in line.split()[:3])
            ids[tag[:3].decode().lower()] = {"real": real, "effective": eff, "saved": saved}
        if "uids" in fields:
            out["uids"] = ids["uid"]
        if "gids" in fields:
            out["gids"] = ids["gid"]
        if "users" in fields:
            out["users"] = {k: self._user(v) for k, v in ids["uid"].items() if k != "saved"}

    def descriptors(self, pid: int, open_files: bool) -> list[dict]:
        links = self._read_links(pid)
        if self._index is not None:
            self._check(pid, links)
        out = []
        for fd, target in links:
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                d = {"fd": fd, "kind": "socket", "inode": inode}
                d.update(self._socket(inode, (pid, fd)))
            elif target.startswith("pipe:["):
                d = {"fd": fd, "kind": "pipe", "inode": int(target[6:-1])}
            elif target.startswith("/") and self._fifo_id(pid, fd) is not None:
                # A named FIFO (mkfifo): a pipe with a path, followed alike.
                _dev, ino = self._fifo_id(pid, fd)
                d = {"fd": fd, "kind": "fifo", "path": text(target), "inode": ino}
            elif open_files:
                d = {"fd": fd, "kind": "file", "path": text(target)}
            else:
                continue
            out.append(d)
        return out

    def _fifo_id(self, pid: int, fd: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of ``pid``'s descriptor ``fd`` when it is a
        named FIFO, else None (a file, or gone). One ``stat`` per path
        descriptor of a walked process, remembered for this walk; the
        index scan never stats (a FIFO's link is its path, no inode)."""
        key = (pid, fd)
        if key not in self._stats:
            try:
                st = os.stat(f"{PROC}/{pid}/fd/{fd}")
            except OSError:
                st = None
            self._stats[key] = ((st.st_dev, st.st_ino)
                                if st is not None and stat.S_ISFIFO(st.st_mode) else None)
        return self._stats[key]

    def _fifo_holders(self, pid: int, descriptor: dict) -> list[Holder]:
        """Every (pid, fd) holding the named FIFO ``descriptor`` of ``pid``:
        the descriptors whose link names the same path and that are the
        same FIFO (device and inode). The index has no paths, so this reads
        the descriptor table of every process once per walk (counted
        against the budget; free when this walk built the index), and only
        when a walk meets a FIFO. Found by its path: a holder in another
        mount namespace (another path) is not found."""
        want = self._fifo_id(pid, descriptor["fd"])
        target = dict(self._links.get(pid, ())).get(descriptor["fd"])
        if want is None or target is None:
            return []
        found = self._fifos.get(want)
        if found is not None:
            return found
        found = []
        for other in pids_of(proc_entries()):
            try:
                links = self._read_links(other)
            except (ProcessGone, Unavailable):
                continue
            found.extend((other, fd) for fd, t in links
                         if t == target and self._fifo_id(other, fd) == want)
            if self.truncated:
                break
        self._fifos[want] = found
        return found

    def peers(self, pid: int, descriptor: dict) -> list[tuple[int, int]]:
        kind = descriptor.get("kind")
        if kind == "fifo":
            me = (pid, descriptor["fd"])
            return [h for h in self._fifo_holders(pid, descriptor) if h != me]
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
        return [h for h in self._holders(key) if h != me]

    def close(self) -> None:
        transport, self._diag_transport = self._diag_transport, None
        if transport is not None:
            # Kept for the next walk (a request that failed closed its
            # socket already: the next one opens a new one).
            kept = self._inspector.transports
            if len(kept) < TRANSPORTS_KEPT:
                kept.append(transport)
            else:
                transport.close()


#: Most TCP socket ends remembered between walks (then forgotten at once).
TCP_ENDS_MAX = 65536

#: Most idle sock_diag transports kept for later walks (one per walk
#: running at once is enough: the reactor's pool has 10 threads).
TRANSPORTS_KEPT = 10

#: Restarts of one walk on the shared index brought up to date (each after a
#: walked process turned out to hold descriptors it lacked) before the last
#: one, on an index built from scratch.
MAX_PATCHED_RESTARTS = 3


def _pairs(links: list[tuple[int, str]]) -> list[tuple[int, Key]]:
    """The (fd, key) pairs of the pipes and sockets among ``links``."""
    out = []
    for fd, target in links:
        key = link_key(target)
        if key is not None:
            out.append((fd, key))
    return out


def _fd_count(base: str) -> int:
    """Open descriptors of a process, from the size of its ``/proc/PID/fd``
    (Linux 6.2 and later; 0 on older kernels and when it cannot be read)."""
    try:
        return os.stat(base).st_size
    except OSError:
        return 0


def _uid_of(pid: int) -> int:
    """Owner of ``/proc/PID`` (the process's effective uid; -1 if gone)."""
    try:
        return os.stat(f"{PROC}/{pid}").st_uid
    except OSError:
        return -1
