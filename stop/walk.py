"""The SV process walk (spec section 5), independent of the OS backend.

Start from the process(es) holding the queried socket; save each, then its
parent, up to PID 1 / 0; resolve every pipe, UNIX-domain socket and TCP
connection to this same host held by any process reached to the
process(es) at the other end, and walk those in turn, until nothing new is
reached or the budget is spent. This catches ``nc -l -p 8888 | nc next 8889``:
asked about the second ``nc``'s socket, the pipe leads to the first ``nc``
and its inbound connection.

Scope (spec 5; docs/sv.rst "Scope"): ancestors are saved up to PID 1, but
pipes and sockets are followed only from the processes of the queried
connection's session and the relays reached from it. Each process saved
says how it counts (``scope``):

``session``
    a holder of the queried socket, one of its ancestors in the same
    session, or a peer reached from such a process that runs under the same
    real uid or in the same session (a relay), and their ancestors in their
    own sessions: its pipes, UNIX sockets and local TCP connections are
    followed, its TCP connections to other hosts listed;
``ancestor``
    an ancestor above a session leader (sshd's session process, the sshd
    listener, a terminal multiplexer's server, PID 1): saved, its TCP
    connections to other hosts listed (the login path: sshd's session
    process holds the login's connection), nothing followed;
``not-followed``
    a peer of another user in another session (a system service such as
    dbus-daemon or journald reached through a socket): saved, nothing
    followed or listed, its ancestors not walked.

A descriptor shared with an ancestor above the session leader (a log pipe
inherited from sshd's listener, say) was opened outside the session: it is
not followed (``"not_followed": "shared with a process outside the
session"``). When a backend cannot tell a session or a uid, the process
counts as in the same session / under the same uid (the paper's walk).

TCP connections count as "to this same host" when their remote address is
one of this host's (``here``: :class:`stop.recursion.HostAddresses`; without
it, every loopback address); any other is a remote connection, never
followed even when this kernel holds its other end (loopback aliases
standing for hosts).

Everything here is blocking (it reads ``/proc`` or calls psutil): run it off
the reactor thread.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

from stop.errors import ProcessGone, StaleIndex, Unavailable
from stop.model import Connection
from stop.os.common import PROCESS_FIELDS

#: Descriptor-list fields of a process record, and which kind fills each
#: (a named FIFO is a pipe with a path).
_LISTS = {"socket": "sockets", "pipe": "pipes", "fifo": "pipes", "file": "files"}


#: Restarts of one walk after StaleIndex; a backend's rescans stop raising
#: it before (procfs: its MAX_PATCHED_RESTARTS-th rescan builds a new index).
MAX_RESTARTS = 4


@dataclass(frozen=True)
class Budget:
    """Limits of one walk, so a fork bomb cannot make a request unbounded.

    ``max_processes``: processes saved (reached ones beyond are dropped and
    the result says ``truncated``); ``max_fds``: descriptors read in total,
    the index scan of all processes included.
    """

    max_processes: int = 512
    max_fds: int = 65536


#: ``scope`` of a process in the walk result, strongest first.
SESSION, ANCESTOR, NOT_FOLLOWED = "session", "ancestor", "not-followed"
_RANK = {SESSION: 2, ANCESTOR: 1, NOT_FOLLOWED: 0}
#: Read for every process, saved only when selected: the walk needs them.
_ALWAYS = frozenset(("users", "session", "uids"))
OUTSIDE = "shared with a process outside the session"


class _Loopback:
    """``here`` when none is given: every loopback address."""

    def __contains__(self, address: str) -> bool:
        try:
            return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
        except ValueError:
            return False


def _is_queried(d: dict, connection: Connection) -> bool:
    if connection.inode and d.get("inode") == connection.inode:
        return True
    loc, rem = d["local"], d["remote"]
    return (loc["port"] == connection.local.port
            and connection.local.host in ("", loc["address"])
            and (rem["address"], rem["port"]) == (connection.remote.host, connection.remote.port))


def walk(inspector, connection: Connection, budget: Budget = Budget(),
         fields=PROCESS_FIELDS, open_files: bool = True, here=None) -> dict:
    """Walk the processes behind ``connection``; return a JSON-able dict.

    :param inspector: an :class:`stop.interfaces.IProcessInspector`.
    :param connection: the queried connection (its ``inode`` finds the
        holder when not 0, its ends otherwise).
    :param budget: the walk's :class:`Budget`.
    :param fields: per-process fields to save (names from
        ``stop.os.common.PROCESS_FIELDS``; ``pid`` and ``ppid`` always).
    :param open_files: save regular files too (the paper's "SV + open
        files"); pipes and sockets are always followed.
    :param here: this host's addresses (``address in here``); None: every
        loopback address.
    :return: ``{"backend", "start", "processes": [...], "users": [...],
        "remote_connections": [...], "truncated": {"processes", "descriptors"},
        "budget": {...}}`` plus ``"unavailable"`` when the backend could not
        give something, and ``"index"`` when the backend shares an inode
        index between walks (procfs): ``{"cached", "age_s", "rebuilt"}``,
        ``"why"`` it was rebuilt, ``"restarted"`` when the walk started
        again because the shared index was stale, ``"dropped"``: holders
        in it that failed validation. Each process carries ``reached``: how
        the walk got there (``{"via": "socket"}`` for the holders, else
        ``"parent"``, ``"pipe"``, ``"fifo"``, ``"socket"`` with ``from`` and
        ``fd``) and ``scope`` (module docstring). Processes that exited
        or could not be read are recorded with ``unavailable``; this
        function does not raise for them.

        ``remote_connections`` lists each TCP socket to another host met in
        the walk once (by inode, else by its ends), the queried one
        excluded: ``{"family", "local", "remote", "direction",
        "direction_by", "inode" (when known), "pid", "fd" (its first
        holder), "holders": [[pid, fd], ...] (every holder met)}``.
    """
    fields = set(fields)
    save_lists = {k: v for k, v in _LISTS.items() if v in fields}
    if not open_files:
        save_lists.pop("file", None)
    scan = inspector.begin(budget.max_fds)
    try:
        for restarts in range(MAX_RESTARTS + 1):
            try:
                result = _Walk(scan, connection, budget, fields, open_files, save_lists,
                               here).run()
                break
            except StaleIndex as stale:
                # The backend's shared index missed a descriptor of a
                # process walked: what was looked up in it may be
                # incomplete. Walk again from scratch on an index that
                # knows it (the backend's last rescan never raises this).
                if restarts == MAX_RESTARTS:
                    raise
                scan.close()
                scan = stale.rescan()
        result["backend"] = inspector.name
        return result
    finally:
        scan.close()


class _Walk:
    """One pass of :func:`walk` over ``scan`` (may raise StaleIndex)."""

    def __init__(self, scan, connection, budget, fields, open_files, save_lists, here):
        self.scan, self.connection, self.budget = scan, connection, budget
        self.fields, self.open_files, self.save_lists = fields, open_files, save_lists
        self.here = here if here is not None else _Loopback()
        self.queue: deque = deque()
        self.procs: dict[int, dict] = {}       # pid -> its saved record
        self.descs: dict[int, list] = {}       # pid -> its descriptors (read once)
        self.info: dict[int, tuple] = {}       # pid -> (ppid, session, real uid)
        self.fetched: dict[int, object] = {}   # pid -> process() result or its exception
        self.outside_of: dict[int, frozenset] = {}
        self.remote: dict = {}

    def run(self) -> dict:
        scan = self.scan
        start = scan.holders(self.connection)
        for pid in start:
            self.queue.append((pid, {"via": "socket"}, None))
        processes: list[dict] = []
        users: set[str] = set()
        truncated_procs = False
        while self.queue:
            pid, reached, how = self.queue.popleft()
            if pid <= 0:
                continue
            known = self.procs.get(pid)
            if known is not None:
                # Reached again: it may now count for more (a process first
                # met as an ancestor, then as a relay's peer).
                role = self._role(pid, how)
                if _RANK[role] > _RANK[known.get("scope", SESSION)]:
                    known["scope"] = role
                    self._follow(pid, known, role)
                continue
            if len(processes) >= self.budget.max_processes:
                truncated_procs = True
                break
            try:
                proc = self._fetch(pid)
            except ProcessGone:
                processes.append({"pid": pid, "reached": reached,
                                  "unavailable": {"process": "ESRCH"}})
                self.procs[pid] = processes[-1]
                continue
            except Unavailable as exc:
                processes.append({"pid": pid, "reached": reached,
                                  "unavailable": {"process": exc.reason}})
                self.procs[pid] = processes[-1]
                continue
            role = self._role(pid, how)
            proc["reached"] = reached
            proc["scope"] = role
            names = proc.get("users")
            users.update(n for n in (names or {}).values() if n)
            self._unselect(proc)
            processes.append(proc)
            self.procs[pid] = proc
            if proc["ppid"] > 0 and role != NOT_FOLLOWED:
                self.queue.append((proc["ppid"], {"via": "parent", "from": pid},
                                   ("parent", pid)))
            self._read(pid, proc)
            self._follow(pid, proc, role)
        index = getattr(scan, "index", None)
        return {
            "start": start,
            "processes": processes,
            "users": sorted(users),
            "remote_connections": list(self.remote.values()),
            "truncated": {"processes": truncated_procs, "descriptors": bool(scan.truncated)},
            "budget": {"max_processes": self.budget.max_processes,
                       "max_fds": self.budget.max_fds},
            **({"index": dict(index)} if index is not None else {}),
            **({"unavailable": dict(scan.unavailable)} if scan.unavailable else {}),
        }

    # -- who counts for what ------------------------------------------------

    def _remember(self, pid: int, proc: dict) -> None:
        uids = proc.get("uids")
        self.info[pid] = (proc.get("ppid", 0), proc.get("session"),
                          uids.get("real") if isinstance(uids, dict) else None)

    def _fetch(self, pid: int) -> dict:
        """``scan.process(pid)`` with the walk's fields, read once per walk
        (the scope may need a process's session before it is saved).

        :raise ProcessGone, Unavailable: as ``scan.process``.
        """
        got = self.fetched.get(pid)
        if got is None:
            try:
                got = self.scan.process(pid, self.fields | _ALWAYS)
            except (ProcessGone, Unavailable) as exc:
                got = exc
                self.info[pid] = (0, None, None)
            else:
                self._remember(pid, got)
            self.fetched[pid] = got
        if isinstance(got, Exception):
            raise got
        return got

    def _info(self, pid: int) -> tuple:
        """(ppid, session, real uid) of ``pid``; Nones when unknown."""
        if pid not in self.info:
            try:
                self._fetch(pid)
            except (ProcessGone, Unavailable):
                pass
        return self.info[pid]

    def _role(self, pid: int, how) -> str:
        """The scope of ``pid`` reached ``how``: None (a holder),
        ("parent", child) or ("peer", from_pid)."""
        if how is None:
            return SESSION
        kind, other = how
        other_role = self.procs[other].get("scope", SESSION)
        _, session, uid = self._info(pid)
        _, other_session, other_uid = self._info(other)
        same_session = session is None or other_session is None or session == other_session
        if kind == "parent":
            return SESSION if other_role == SESSION and same_session else ANCESTOR
        same_uid = uid is None or other_uid is None or uid == other_uid
        return SESSION if same_session or same_uid else NOT_FOLLOWED

    def _outside(self, pid: int) -> frozenset:
        """The ancestors of ``pid`` above its session leader."""
        got = self.outside_of.get(pid)
        if got is None:
            out, seen = set(), {pid}
            ppid, session, _ = self._info(pid)
            left = False
            while ppid > 0 and ppid not in seen and len(seen) < 4096:
                seen.add(ppid)
                up, up_session, _ = self._info(ppid)
                if left or (session is not None and up_session is not None
                            and up_session != session):
                    left = True
                    out.add(ppid)
                ppid = up
            got = self.outside_of[pid] = frozenset(out)
        return got

    def _unselect(self, proc: dict) -> None:
        """Drop what was read only for the walk (not selected in sv_fields)."""
        for name in _ALWAYS - self.fields:
            proc.pop(name, None)
            missing = proc.get("unavailable")
            if missing:
                missing.pop(name, None)
                if not missing:
                    del proc["unavailable"]

    # -- descriptors ------------------------------------------------------------

    def _read(self, pid: int, proc: dict) -> None:
        """Read ``pid``'s descriptors into ``proc`` (the selected lists)."""
        try:
            descriptors = self.scan.descriptors(pid, self.open_files)
        except ProcessGone:
            proc.setdefault("unavailable", {})["descriptors"] = "ESRCH"
            return
        except Unavailable as exc:
            proc.setdefault("unavailable", {})["descriptors"] = exc.reason
            return
        self.descs[pid] = descriptors
        for name in self.save_lists.values():
            proc[name] = []
        for d in descriptors:
            name = self.save_lists.get(d["kind"])
            if name is not None:
                proc[name].append(d)

    def _follow(self, pid: int, proc: dict, role: str) -> None:
        """Queue the peers of ``pid``'s pipes and sockets (``session``) and
        note its TCP connections to other hosts (``session``, ``ancestor``)."""
        if role == NOT_FOLLOWED:
            return
        for d in self.descs.get(pid, ()):
            is_tcp = (d["kind"] == "socket" and "remote" in d and "local" in d)
            # The queried socket's other end is the requester, not part of the
            # chain behind this host (on loopback it would be a local process).
            if is_tcp and _is_queried(d, self.connection):
                continue
            if is_tcp and d["remote"]["address"] not in self.here:
                if (d.get("type") == "SOCK_STREAM"
                        and d.get("state") not in (None, "LISTEN", "CLOSE", "TIME_WAIT")):
                    _note_remote(self.remote, pid, d)
                continue
            if role != SESSION:
                continue
            peers = self.scan.peers(pid, d)
            if not peers:
                continue
            d["peers"] = [list(p) for p in peers]
            outside = self._outside(pid)
            if any(peer_pid in outside for peer_pid, _ in peers):
                d["not_followed"] = OUTSIDE
                continue
            for peer_pid, fd in peers:
                self.queue.append((peer_pid, {"via": d["kind"], "from": pid, "fd": d["fd"]},
                                   ("peer", pid)))


def _note_remote(remote: dict, pid: int, d: dict) -> None:
    """Add holder (pid, d["fd"]) of the TCP socket ``d`` to ``remote``."""
    inode = d.get("inode")
    key = inode or (d["family"], d["local"]["address"], d["local"]["port"],
                    d["remote"]["address"], d["remote"]["port"])
    entry = remote.get(key)
    if entry is None:
        entry = remote[key] = {
            "pid": pid, "fd": d["fd"], "family": d["family"],
            "local": d["local"], "remote": d["remote"],
            "direction": d.get("direction", "unknown"),
            "direction_by": d.get("direction_by", "none"),
            "holders": [],
        }
        if inode:
            entry["inode"] = inode
    holder = [pid, d["fd"]]
    if holder not in entry["holders"]:
        entry["holders"].append(holder)
