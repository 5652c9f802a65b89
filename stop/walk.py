"""The SV process walk (spec section 5), independent of the OS backend.

Start from the process(es) holding the queried socket; save each, then its
parent, up to PID 1 / 0; resolve every pipe, UNIX-domain socket and TCP
connection to this same host held by any process reached to the
process(es) at the other end, and walk those in turn, until nothing new is
reached or the budget is spent. This catches ``nc -l -p 8888 | nc next 8889``:
asked about the second ``nc``'s socket, the pipe leads to the first ``nc``
and its inbound connection.

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


@dataclass(frozen=True)
class Budget:
    """Limits of one walk, so a fork bomb cannot make a request unbounded.

    ``max_processes``: processes saved (reached ones beyond are dropped and
    the result says ``truncated``); ``max_fds``: descriptors read in total,
    the index scan of all processes included.
    """

    max_processes: int = 512
    max_fds: int = 65536


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
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
         fields=PROCESS_FIELDS, open_files: bool = True) -> dict:
    """Walk the processes behind ``connection``; return a JSON-able dict.

    :param inspector: an :class:`stop.interfaces.IProcessInspector`.
    :param connection: the queried connection (its ``inode`` finds the
        holder when not 0, its ends otherwise).
    :param budget: the walk's :class:`Budget`.
    :param fields: per-process fields to save (names from
        ``stop.os.common.PROCESS_FIELDS``; ``pid`` and ``ppid`` always).
    :param open_files: save regular files too (the paper's "SV + open
        files"); pipes and sockets are always followed.
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
        ``fd``). Processes that exited or could not be read are recorded
        with ``unavailable``; this function does not raise for them.

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
        try:
            result = _walk(scan, connection, budget, fields, open_files, save_lists)
        except StaleIndex as stale:
            # The backend's shared index missed a descriptor of a process
            # walked: what was looked up in it may be incomplete. Walk
            # again from scratch on a newer index (a rescan never raises
            # this, so once).
            scan.close()
            scan = stale.rescan()
            result = _walk(scan, connection, budget, fields, open_files, save_lists)
        result["backend"] = inspector.name
        return result
    finally:
        scan.close()


def _walk(scan, connection, budget, fields, open_files, save_lists) -> dict:
    """One pass of :func:`walk` over ``scan`` (may raise StaleIndex)."""
    start = scan.holders(connection)
    queue = deque((pid, {"via": "socket"}) for pid in start)
    seen: set[int] = set()
    processes: list[dict] = []
    users: set[str] = set()
    remote: dict = {}
    truncated_procs = False
    while queue:
        pid, reached = queue.popleft()
        if pid <= 0 or pid in seen:
            continue
        if len(processes) >= budget.max_processes:
            truncated_procs = True
            break
        seen.add(pid)
        try:
            proc = scan.process(pid, fields | {"users"})
        except ProcessGone:
            processes.append({"pid": pid, "reached": reached,
                              "unavailable": {"process": "ESRCH"}})
            continue
        except Unavailable as exc:
            processes.append({"pid": pid, "reached": reached,
                              "unavailable": {"process": exc.reason}})
            continue
        proc["reached"] = reached
        names = proc.get("users") if "users" in fields else proc.pop("users", None)
        users.update(n for n in (names or {}).values() if n)
        processes.append(proc)
        if proc["ppid"] > 0:
            queue.append((proc["ppid"], {"via": "parent", "from": pid}))
        _descriptors(scan, pid, proc, connection, open_files, save_lists, queue, remote)
    index = getattr(scan, "index", None)
    return {
        "start": start,
        "processes": processes,
        "users": sorted(users),
        "remote_connections": list(remote.values()),
        "truncated": {"processes": truncated_procs, "descriptors": bool(scan.truncated)},
        "budget": {"max_processes": budget.max_processes, "max_fds": budget.max_fds},
        **({"index": dict(index)} if index is not None else {}),
        **({"unavailable": dict(scan.unavailable)} if scan.unavailable else {}),
    }


def _descriptors(scan, pid, proc, connection, open_files, save_lists, queue, remote) -> None:
    """Read ``pid``'s descriptors into ``proc``, queue the peers, note TCP
    connections to other hosts in ``remote`` (key -> entry: one entry per
    socket, however many processes hold it)."""
    try:
        descriptors = scan.descriptors(pid, open_files)
    except ProcessGone:
        proc.setdefault("unavailable", {})["descriptors"] = "ESRCH"
        return
    except Unavailable as exc:
        proc.setdefault("unavailable", {})["descriptors"] = exc.reason
        return
    for kind, name in save_lists.items():
        proc[name] = []
    for d in descriptors:
        queried = (d["kind"] == "socket" and "remote" in d and "local" in d
                   and _is_queried(d, connection))
        # The queried socket's other end is the requester, not part of the
        # chain behind this host (on loopback it would be a local process).
        peers = [] if queried else scan.peers(pid, d)
        if peers:
            d["peers"] = [list(p) for p in peers]
            for peer_pid, fd in peers:
                queue.append((peer_pid, {"via": d["kind"], "from": pid, "fd": d["fd"]}))
        elif (d["kind"] == "socket" and d.get("type") == "SOCK_STREAM" and "remote" in d
              and d.get("state") not in (None, "LISTEN", "CLOSE", "TIME_WAIT")
              and not queried and not _is_loopback(d["remote"]["address"])):
            _note_remote(remote, pid, d)
        name = save_lists.get(d["kind"])
        if name is not None:
            proc[name].append(d)



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
