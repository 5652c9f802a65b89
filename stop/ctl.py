"""``stopctl``: the administrator's view of the record store.

    stopctl [--config PATH] [--data-dir DIR] show [--json] TOKEN
    stopctl [--config PATH] [--data-dir DIR] list [--json] [--user U] [--remote ADDR]
                                                  [--since ISO] [--until ISO]
    stopctl [--config PATH] [--data-dir DIR] verify TOKEN

It opens the store read-only, so it is safe while the daemon runs. Exit
status: 0 done, 1 a failure (store unreadable), 2 usage error or unknown
token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Iterable, Optional, TextIO

from stop import config as config_mod
from stop import records
from stop.errors import ConfigError, StopError
from stop.redeem import cli as redeem_cli
from stop.storage import make_store

DEFAULT_CONFIG = "/etc/stop/stop.conf"

EXIT_OK, EXIT_FAIL, EXIT_UNKNOWN = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stopctl", description="Read the records of a stop daemon.")
    p.add_argument("--config", "-c", help=f"the daemon's config file (default {DEFAULT_CONFIG} "
                   "when it exists)")
    p.add_argument("--data-dir", "-d", help="the record directory (default: the config's data_dir)")
    p.add_argument("--storage", help="store backend (default: the config's storage)")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the record of a token and the entries linked to it")
    show.add_argument("token")
    how = show.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true",
                     help='one JSON object: {"token", "record", "linked": [...]}')
    how.add_argument("--raw", action="store_true",
                     help="the exact stored bytes of the record (one line), nothing else")
    lst = sub.add_parser("list", help="list records, oldest first")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.add_argument("--user", help="only records of this user name or uid")
    lst.add_argument("--remote", help="only records whose remote end has this address")
    lst.add_argument("--since", help="only records at or after this time (ISO 8601, UTC)")
    lst.add_argument("--until", help="only records before this time (ISO 8601, UTC)")
    ver = sub.add_parser("verify", help="check a token's record: the hash of an SV record, "
                         "and the store's own integrity for every record")
    ver.add_argument("token")
    redeem_cli.add_parsers(sub)  # trace, audit (docs/redeem.rst)
    return p


def _settings(args: argparse.Namespace) -> config_mod.Config:
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return config_mod.load(path, {"data_dir": args.data_dir, "storage": args.storage})


def _field(rows: list[tuple[str, str]], out: TextIO) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k.ljust(width)}  {v}\n")


def _endpoint(d: Optional[dict]) -> str:
    if not d:
        return "-"
    host = d.get("address") or "*"
    return f"[{host}]:{d.get('port')}" if ":" in host else f"{host}:{d.get('port')}"


def describe(token: str, record: dict) -> list[tuple[str, str]]:
    """The human-readable rows of a record (what ``show`` prints)."""
    req = record.get("request", {})
    user = record.get("user", {})
    conn = record.get("connection", {})
    ports = req.get("ports") or ["?", "?"]
    rows = [
        ("token", token),
        ("type", str(record.get("type"))),
        ("time", str(record.get("time"))),
        ("host", str(record.get("host"))),
        ("user", f"{user.get('name') or '?'} (uid {user.get('uid')})"),
        ("local", _endpoint(conn.get("local"))),
        ("remote", _endpoint(conn.get("remote"))),
        ("requester", _endpoint(record.get("requester"))),
        ("request", f"{ports[0]}, {ports[1]} : {req.get('type')}"
                    + (f" : {req['sid']}" if req.get("sid") is not None else "")
                    + (f" : {req['address']}" if req.get("address") else "")),
    ]
    state = record.get("processes")
    if isinstance(state, dict):
        rows.extend(_process_rows(state))
    system = record.get("system")
    if isinstance(system, dict):
        os_ = system.get("os") or {}
        rows.append(("system", f"{system.get('hostname')}: {os_.get('name')} {os_.get('release')} "
                               f"{os_.get('version')}, booted {system.get('boot_time')}"))
        for u in system.get("utmp") or []:
            rows.append(("utmp", json.dumps(u, sort_keys=True, ensure_ascii=False)))
    for key in sorted(set(record) - {"version", "type", "time", "host", "user", "connection",
                                     "requester", "request", "received_on", "processes",
                                     "system"}):
        rows.append((key, json.dumps(record[key], sort_keys=True, ensure_ascii=False)))
    return rows


def _process_rows(state: dict) -> list[tuple[str, str]]:
    """One row per process reached by the walk (pid, parent, user, how it
    was reached, command line), then the connections to other hosts."""
    rows = []
    for p in state.get("processes", []):
        users = p.get("users") or {}
        cmd = " ".join(p.get("cmdline") or []) or f"[{p.get('name')}]"
        via = (p.get("reached") or {}).get("via", "?")
        rows.append(("process", f"{p.get('pid')} (parent {p.get('ppid')}) "
                                f"{users.get('effective', '?')}  via {via}  {cmd}"))
    for c in state.get("remote_connections", []):
        rows.append(("connection", f"{_endpoint(c.get('local'))} -> {_endpoint(c.get('remote'))} "
                                   f"{c.get('direction', '')}".rstrip()))
    for what, why in sorted((state.get("unavailable") or {}).items()):
        rows.append(("unavailable", f"{what}: {why}"))
    if any((state.get("truncated") or {}).values()):
        rows.append(("truncated", json.dumps(state["truncated"], sort_keys=True)))
    return rows


def _matches(record: dict, args: argparse.Namespace) -> bool:
    user = record.get("user", {})
    if args.user is not None and args.user not in (str(user.get("uid")), user.get("name")):
        return False
    remote = record.get("connection", {}).get("remote", {})
    if args.remote is not None and remote.get("address") != args.remote:
        return False
    t = str(record.get("time", ""))
    # ISO 8601 UTC strings of one format compare in time order.
    if args.since is not None and t < args.since:
        return False
    if args.until is not None and t >= args.until:
        return False
    return True


def _when(entry: dict) -> str:
    times = [f"{k} {entry[k]}" for k in ("sent", "answered") if entry.get(k)]
    return f"  ({', '.join(times)})" if times else ""


def describe_linked(data: bytes) -> str:
    """One line for an entry linked to a record: a summary for a
    recursion outcome (CONTRACTS.md section 3), the JSON for other kinds."""
    try:
        entry = records.load(data)
    except ValueError:
        return data.decode("utf-8", "replace")
    if entry.get("kind") != "recursion":
        return json.dumps(entry, sort_keys=True, ensure_ascii=False)
    req = entry.get("request") or {}
    ports = req.get("ports") or ["?", "?"]
    return (f"recursion {_endpoint(entry.get('target'))} {req.get('type')} "
            f"{ports[0]}, {ports[1]} sid {req.get('sid')} from {_endpoint(entry.get('local'))}: "
            f"{outcome_result(entry)}{_when(entry)}")


def outcome_result(entry: dict) -> str:
    """What a recursion outcome brought back, in words (``token T``,
    ``error NO-USER``, ``userid UNIX alice``, ``timeout (reply timeout)``);
    ``show`` and ``trace`` print it."""
    outcome = entry.get("outcome")
    if outcome == "token":
        result = f"token {entry.get('token')}"
    elif outcome == "error":
        result = f"error {entry.get('error')}"
    elif outcome == "userid":
        result = f"userid {entry.get('opsys')} {entry.get('user')}"
    else:
        result = str(outcome)
    if entry.get("why"):
        result += f" ({entry['why']})"
    return result


def cmd_show(store, args, out: TextIO) -> int:
    data = store.get(args.token)
    if data is None:
        sys.stderr.write(f"stopctl: no record for token {args.token}\n")
        return EXIT_UNKNOWN
    if args.raw:
        out.write(data.decode("utf-8") + "\n")
        return EXIT_OK
    linked = store.linked(args.token)
    if args.json:
        out.write(json.dumps({"token": args.token, "record": records.load(data),
                              "linked": [records.load(e) for e in linked]},
                             sort_keys=True, ensure_ascii=False) + "\n")
    else:
        _field(describe(args.token, records.load(data))
               + [("linked", describe_linked(e)) for e in linked], out)
    return EXIT_OK


def cmd_list(store, args, out: TextIO) -> int:
    entries: Iterable = store.records()
    for token, data in entries:
        record = records.load(data)
        if not _matches(record, args):
            continue
        if args.json:
            out.write(json.dumps({"token": token, "record": record}, sort_keys=True,
                                 ensure_ascii=False) + "\n")
        else:
            user = record.get("user", {})
            conn = record.get("connection", {})
            out.write(f"{record.get('time')}  {token}  {record.get('type', '?'):6}  "
                      f"{user.get('name') or user.get('uid')}  {_endpoint(conn.get('local'))} -> "
                      f"{_endpoint(conn.get('remote'))}\n")
    return EXIT_OK


def _hash_for(token: str, configured: str) -> str:
    """The hash a token was made with: the configured one, unless the
    token's length says the other (records made before a setting change)."""
    by_length = {40: "sha1", 64: "sha256"}
    return configured if by_length.get(len(token)) in (None, configured) else by_length[len(token)]


def cmd_verify(store, args, out: TextIO, hash_name: str = "sha1") -> int:
    """SV / SV_REC: recompute the hash of the stored bytes (OK / MISMATCH);
    every type: the store's own integrity check (``integrity(token)``).
    Exit 0 sound, 1 not, 2 unknown token."""
    data = store.get(args.token)
    if data is None:
        sys.stderr.write(f"stopctl: no record for token {args.token}\n")
        return EXIT_UNKNOWN
    sound = bool(store.integrity(args.token))
    out.write(f"store integrity: {'OK' if sound else 'MISMATCH'}\n")
    try:
        rtype = records.load(data).get("type")
    except ValueError:
        # Damaged beyond parsing: for an SV token the hash still decides.
        rtype = None
    hashed = hashlib.new(_hash_for(args.token, hash_name), data).hexdigest()
    if rtype in ("SV", "SV_REC") or (rtype is None and hashed == args.token):
        ok = hashed == args.token
        out.write(f"{'OK' if ok else 'MISMATCH'}\n")
        sound = sound and ok
    elif rtype is None:
        out.write("MISMATCH (record is not valid JSON)\n")
        sound = False
    else:
        out.write(f"{rtype} record: its token is random, there is no hash to check\n")
    return EXIT_OK if sound else EXIT_FAIL


COMMANDS = {"show": cmd_show, "list": cmd_list, "verify": cmd_verify}


def main(argv: Optional[list[str]] = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    if args.command in redeem_cli.COMMANDS:  # no store needed
        return redeem_cli.run(args, out, lambda: _settings(args))
    try:
        settings = _settings(args)
        store = make_store(settings.storage, settings.data_dir, readonly=True)
        store.open()
    except ConfigError as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_UNKNOWN
    except StopError as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_FAIL
    try:
        if args.command == "verify":
            return cmd_verify(store, args, out, settings.hash)
        return COMMANDS[args.command](store, args, out)
    except (StopError, ValueError) as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
