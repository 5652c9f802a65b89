"""The portable OS backend, through psutil (FreeBSD, OpenBSD, macOS,
Solaris; also runs on Linux, where netlink and procfs are faster): the
``psutil`` socket lookup (:class:`PsutilLookup`) and process inspector
(:class:`PsutilInspector`).

What psutil cannot give is named in :attr:`PsutilScan.unavailable` and
never guessed: it lists no pipes and no socket inodes, so pipes cannot be
followed and UNIX-domain socket peers cannot be resolved; TCP connections
to this host are matched by their two ends. It has no scheduling priority
(only nice). The lookup's limits (root, uid, cost) are in docs/lookup.rst.
Works with psutil 5.9 (Debian 12) and newer, where ``Process.connections``
became ``net_connections``.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict

import psutil
from zope.interface import implementer

from stop.errors import LookupFailed, ProcessGone, Unavailable
from stop.interfaces import IProcessInspector, IProcessScan, ISocketLookup
from stop.model import Connection, Endpoint, canonical_host, host_family
from stop.os.common import UserNames, command_line, reason_of, text
from stop.os.direction import DirectionRule, listener_covers

#: What this backend cannot give, on every platform.
GAPS = {
    "pipes": "psutil does not list pipes",
    "peer_inode": "psutil does not give UNIX-domain socket peers",
    "priority": "psutil gives nice, not priority",
}


def _connections(proc: psutil.Process, kind: str):
    # psutil 6 renamed Process.connections to net_connections.
    method = getattr(proc, "net_connections", None) or proc.connections
    return method(kind=kind)


def _host(address: str) -> str:
    try:
        return canonical_host(address)
    except ValueError:
        return address


def _ends(conn) -> tuple[tuple[str, int], tuple[str, int]] | None:
    if not conn.laddr or not conn.raddr or isinstance(conn.laddr, str):
        return None
    return (_host(conn.laddr[0]), conn.laddr[1]), (_host(conn.raddr[0]), conn.raddr[1])


def _bare(host: str) -> str:
    """``host`` without its scope id."""
    return host.partition("%")[0]


def tcp_table() -> list:
    """Every TCP socket of this host, as psutil lists them (``sconn``
    tuples: fd, family, type, laddr, raddr, status, pid).

    :raise LookupFailed: psutil was refused the table (macOS and AIX
        without root) or failed.
    """
    try:
        return psutil.net_connections(kind="tcp")
    except psutil.AccessDenied as e:
        raise LookupFailed("psutil: the connection table needs root on this system") from e
    except (OSError, psutil.Error) as e:
        raise LookupFailed(f"psutil: cannot list connections: {e!r}") from e


@implementer(ISocketLookup)
class PsutilLookup:
    """:class:`~stop.interfaces.ISocketLookup` over ``psutil.net_connections``.

    Same semantics as the netlink backend: only ESTABLISHED connections
    whose ends equal the query (IPv4-mapped IPv6 folded to IPv4); ``accepted``
    is :mod:`stop.os.direction`'s rule, its listener signal read from the
    table's LISTEN entries (:func:`~stop.os.direction.listener_covers`).
    Differences, all from what psutil gives: ``inode`` is 0 (the walk then
    finds the holders by the two ends); ``uid`` is the effective uid of the
    process holding the socket (psutil has no socket owner; the two differ
    when a socket is passed to a process of another user); a connection
    whose holder psutil cannot see (``pid`` None: another user's process,
    when the daemon is not root, on Linux and the BSDs) raises
    :class:`~stop.errors.LookupFailed` rather than guess.

    It reads the whole table for each query (milliseconds to tens of
    milliseconds: ``bench/lookup_bench.py``), so it is ``blocking``: the
    answerer calls it in a worker thread.

    :param rule: the :class:`~stop.os.direction.DirectionRule`.
    :param table: ``() -> [sconn, ...]`` (default :func:`tcp_table`).
    """

    name = "psutil"
    blocking = True

    def __init__(self, rule: DirectionRule | None = None, table=tcp_table):
        self._rule = rule or DirectionRule()
        self._table = table

    def find(self, local: Endpoint, remote: Endpoint) -> Connection | None:
        """See :meth:`stop.interfaces.ISocketLookup.find`.

        :raise LookupFailed: the table cannot be read, or the holder of the
            connection cannot be seen or read.
        """
        if local.host and host_family(local.host) != host_family(remote.host):
            return None
        want_local, want_remote = _bare(local.host), (_bare(remote.host), remote.port)
        hit = None
        listeners: set[tuple[str, int]] = set()
        for c in self._table():
            if c.status == psutil.CONN_LISTEN:
                if c.laddr:
                    listeners.add((_bare(_host(c.laddr[0])), c.laddr[1]))
            elif hit is None and c.status == psutil.CONN_ESTABLISHED:
                ends = _ends(c)
                if ends is None:
                    continue
                (lhost, lport), (rhost, rport) = ends
                if (lport == local.port and (_bare(rhost), rport) == want_remote
                        and (not want_local or _bare(lhost) == want_local)):
                    hit = c, _bare(lhost)
        if hit is None:
            return None
        conn, lhost = hit
        listening = listener_covers(listeners, lhost, local.port)
        accepted = self._rule.decide(local.port, remote.port, listening).inbound
        return Connection(local=local if local.host else Endpoint(lhost, local.port),
                          remote=remote, uid=self._owner(conn), inode=0, accepted=accepted)

    def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def _owner(conn) -> int:
        if conn.pid is None:
            raise LookupFailed("psutil: the process holding the connection is not visible "
                               "(another user's; the daemon must run as root to see it)")
        try:
            return psutil.Process(conn.pid).uids().effective
        except psutil.NoSuchProcess:
            raise LookupFailed(f"psutil: process {conn.pid} exited while read") from None
        except psutil.AccessDenied:
            raise LookupFailed(f"psutil: process {conn.pid} cannot be read") from None


def _enum_name(enum, value) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(int(value))


@implementer(IProcessInspector)
class PsutilInspector:
    """Portable backend: see the module docstring.

    :param rule: the :class:`~stop.os.direction.DirectionRule` deciding each
        connection's direction (default: this host's port range).
    """

    name = "psutil"

    def __init__(self, rule: DirectionRule | None = None):
        self.rule = rule or DirectionRule()

    def begin(self, max_fds: int) -> "PsutilScan":
        return PsutilScan(max_fds, self.rule)


@implementer(IProcessScan)
class PsutilScan:
    """One walk through psutil (see :class:`stop.interfaces.IProcessScan`)."""

    def __init__(self, max_fds: int, rule: DirectionRule | None = None):
        self._rule = rule or DirectionRule()
        self._max_fds = max_fds
        self._fds_read = 0
        self.truncated = False
        self.unavailable = dict(GAPS)
        self._tcp: dict[tuple, list[tuple[int, int]]] | None = None
        self._listening: set[tuple[str, int]] = set()
        self._user = UserNames()

    def _index(self) -> dict[tuple, list[tuple[int, int]]]:
        """(local, remote) -> [(pid, fd)] for every TCP socket, read once."""
        if self._tcp is None:
            index: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
            try:
                conns = psutil.net_connections(kind="tcp")
            except psutil.AccessDenied:
                self.unavailable["tcp"] = "EACCES"
                conns = []
            for c in self._within_budget(conns):
                if c.status == psutil.CONN_LISTEN and c.laddr:
                    self._listening.add((_host(c.laddr[0]), c.laddr[1]))
                    continue
                ends = _ends(c)
                if ends is not None and c.pid is not None:
                    index[ends].append((c.pid, c.fd))
            self._tcp = index
        return self._tcp

    def _within_budget(self, items):
        """Yield ``items`` while the descriptor budget lasts (each counts
        one); sets ``truncated`` when it runs out."""
        for item in items:
            if self._fds_read >= self._max_fds:
                self.truncated = True
                return
            self._fds_read += 1
            yield item

    def holders(self, connection: Connection) -> list[int]:
        remote = (connection.remote.host, connection.remote.port)
        found = set()
        for (local, rem), holders in self._index().items():
            if rem == remote and local[1] == connection.local.port and \
                    connection.local.host in ("", local[0]):
                found.update(pid for pid, _fd in holders)
        return sorted(found)

    def process(self, pid: int, fields) -> dict:
        fields = set(fields)
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                out = {"pid": pid, "ppid": proc.ppid()}
                missing: dict[str, str] = {}
                for field in sorted(fields):
                    getter = _GETTERS.get(field)
                    if getter is None:
                        if field in GAPS:
                            missing[field] = GAPS[field]
                        continue
                    try:
                        out[field] = getter(self, proc)
                    except psutil.ZombieProcess:
                        missing[field] = "zombie"
                    except psutil.AccessDenied:
                        missing[field] = "EACCES"
                    except (OSError, Unavailable) as exc:
                        missing[field] = reason_of(exc)
        except psutil.NoSuchProcess:
            raise ProcessGone(pid) from None
        if missing:
            out["unavailable"] = missing
        return out

    def descriptors(self, pid: int, open_files: bool) -> list[dict]:
        try:
            proc = psutil.Process(pid)
            conns = _connections(proc, "all")
            files = proc.open_files() if open_files else []
        except psutil.NoSuchProcess:
            raise ProcessGone(pid) from None
        except psutil.AccessDenied:
            raise Unavailable("EACCES") from None
        self._index()  # the listening set, for direction
        out = []
        for c in self._within_budget(conns):
            out.append(self._socket(c))
        for f in files:
            out.append({"fd": f.fd, "kind": "file", "path": text(f.path)})
        return sorted(out, key=lambda d: (d["fd"] is None, d["fd"] or 0))

    def _socket(self, c) -> dict:
        d = {"fd": c.fd if c.fd is not None and c.fd >= 0 else None, "kind": "socket",
             "family": _enum_name(socket.AddressFamily, c.family),
             "type": _enum_name(socket.SocketKind, c.type)}
        if c.family == socket.AF_UNIX:
            d["path"] = text(c.laddr or "")
            if c.raddr:
                d["peer_path"] = text(c.raddr)
            return d
        if c.laddr:
            d["local"] = {"address": _host(c.laddr[0]), "port": c.laddr[1]}
        if c.raddr:
            d["remote"] = {"address": _host(c.raddr[0]), "port": c.raddr[1]}
        if c.status and c.status != psutil.CONN_NONE:
            d["state"] = c.status
            if c.status not in (psutil.CONN_LISTEN, psutil.CONN_TIME_WAIT, psutil.CONN_CLOSE) \
                    and "local" in d and "remote" in d:
                loc, rem = d["local"], d["remote"]
                listening = listener_covers(self._listening, loc["address"], loc["port"])
                decided = self._rule.decide(loc["port"], rem["port"], listening)
                d["direction"], d["direction_by"] = decided
        return d

    def peers(self, pid: int, descriptor: dict) -> list[tuple[int, int]]:
        if descriptor.get("type") != "SOCK_STREAM" or "remote" not in descriptor \
                or descriptor.get("state") == psutil.CONN_LISTEN:
            return []
        loc, rem = descriptor["local"], descriptor["remote"]
        key = ((rem["address"], rem["port"]), (loc["address"], loc["port"]))
        me = (pid, descriptor["fd"])
        return sorted(h for h in self._index().get(key, []) if h != me)

    def close(self) -> None:
        pass


def _ids(pair) -> dict:
    return {"real": pair.real, "effective": pair.effective, "saved": pair.saved}


def _terminal(scan, proc):
    get = getattr(proc, "terminal", None)
    if get is None:
        raise Unavailable("psutil gives no terminal on this platform")
    return get()


_GETTERS = {
    "name": lambda s, p: text(p.name()),
    "cmdline": lambda s, p: command_line(p.cmdline()),
    "pgid": lambda s, p: os.getpgid(p.pid),
    "session": lambda s, p: os.getsid(p.pid),
    "uids": lambda s, p: _ids(p.uids()),
    "gids": lambda s, p: _ids(p.gids()),
    "users": lambda s, p: {k: s._user(v) for k, v in _ids(p.uids()).items() if k != "saved"},
    "start_time": lambda s, p: round(p.create_time(), 2),
    "nice": lambda s, p: p.nice(),
    "tty": _terminal,
    "cwd": lambda s, p: text(p.cwd()),
    "exe": lambda s, p: text(p.exe()),
}
