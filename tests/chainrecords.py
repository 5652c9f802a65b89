"""Records and recursion outcomes shaped as stop writes them (contract
sections 2 and 3), to build stepping-stone chains for the redemption and
trace tests without running the recursion itself."""

from __future__ import annotations

import hashlib
from typing import Optional

from stop import records

SID = 4242


def walk_record(host: str, user: str, uid: int, procs: list[tuple[int, str, str]],
                prev: Optional[str] = None, ports=(40001, 22), sid: int = SID,
                time: str = "2026-11-25T12:00:00.000001Z") -> dict:
    """An SV_REC record of ``host``. ``procs`` is the walk's path from the
    holder of the queried socket: ``[(pid, name, via), ...]`` where ``via``
    says how each was reached from the one before (the first: "socket");
    the last holds the inbound connection from ``prev`` (None: the origin,
    no inbound connection) on ``ports`` = (their port, our port)."""
    processes = []
    for i, (pid, name, via) in enumerate(procs):
        reached = {"via": "socket"} if i == 0 else {"via": via, "from": procs[i - 1][0]}
        ppid = procs[i + 1][0] if i + 1 < len(procs) and procs[i + 1][2] == "parent" else 1
        processes.append({"pid": pid, "ppid": ppid, "name": name, "cmdline": [name],
                          "users": {"real": user, "effective": user}, "reached": reached})
    remote, targets = [], []
    if prev is not None:
        holder = procs[-1][0]
        remote.append({"family": "AF_INET", "local": {"address": host, "port": ports[1]},
                       "remote": {"address": prev, "port": ports[0]}, "direction": "inbound",
                       "direction_by": "listener", "pid": holder, "fd": 3, "holders": [[holder, 3]]})
        targets.append({"address": prev, "port": ports[0], "local": {"address": host, "port": ports[1]},
                        "direction": "inbound", "direction_by": "listener"})
    return {"version": 1, "type": "SV_REC", "time": time, "host": f"host-{host}",
            "user": {"uid": uid, "name": user},
            "request": {"type": "SV_REC", "sid": sid, "ports": [50000, 113]},
            "requester": {"address": "192.0.2.250", "port": 50000},
            "received_on": {"address": host, "port": 113},
            "connection": {"local": {"address": host, "port": 50000},
                           "remote": {"address": "192.0.2.250", "port": 113}, "inode": 1},
            "processes": {"start": [procs[0][0]], "processes": processes, "users": [user],
                          "remote_connections": remote},
            "recursion": {"sid": sid, "status": "done", "targets": targets}}


def outcome(of: str, prev: str, token: Optional[str] = None, error: Optional[str] = None,
            ports=(40001, 22), sid: int = SID) -> dict:
    """The linked entry of one recursion question to ``prev``: a token, or
    an error word."""
    e = {"version": 1, "kind": "recursion", "of": of, "target": {"address": prev, "port": 113},
         "local": {"address": "0.0.0.0", "port": None},
         "request": {"type": "SV_REC", "sid": sid, "ports": list(ports)},
         "sent": "2026-11-25T12:00:00.000001Z", "answered": "2026-11-25T12:00:00.000002Z",
         "outcome": "token" if token else "error"}
    if token:
        e["token"] = token
    else:
        e["error"] = error
    return e


def sv_token(record: dict) -> str:
    """The SV token of ``record``: the SHA-1 of its canonical bytes."""
    return hashlib.sha1(records.canonical(record)).hexdigest()
