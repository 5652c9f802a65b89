"""``stopctl``: the administrator's view of the record store (stopctl(8)).

    stopctl [--config PATH] [--data-dir DIR] [--storage NAME] COMMAND ...
    stopctl --version

    show [--json|--raw] TOKEN           a record and the entries linked to it
    list [--json] [filters]             records, oldest first
    verify [--json] TOKEN               one record: its bytes and (SV) its hash
    verify --all [--head HEAD] [--json] the whole chain, against a saved head
    prune --before TIME [--yes] [--dry-run] [--json]
    stats [--json]

TOKEN may be a unique prefix of at least 8 characters, in any case. It
opens the store read-only (``prune`` aside), so it is safe while the daemon
runs. Exit status: 0 done (or sound), 1 a failure or findings, 2 a usage
error, an unreadable time, or an unknown or ambiguous token.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import json
import os
import re
import sys
from typing import Iterator, Optional, TextIO

import stop
from stop import config as config_mod
from stop import records
from stop.errors import ConfigError, StopError
from stop.redeem import cli as redeem_cli
from stop.storage import make_store

DEFAULT_CONFIG = "/etc/stop/stop.conf"

EXIT_OK, EXIT_FAIL, EXIT_UNKNOWN = 0, 1, 2
#: Shortest token prefix ``show`` and ``verify`` accept.
MIN_PREFIX = 8
#: Candidates listed for an ambiguous prefix.
MAX_CANDIDATES = 20

TIME_HELP = "ISO 8601 with any offset (UTC without), a date, or relative: 30m, 2h, 7d, 4w"


class UsageError(Exception):
    """A bad argument (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stopctl", description="Read the records of a stop daemon.")
    p.add_argument("--version", action="version", version=f"stopctl (stop) {stop.__version__}")
    p.add_argument("--config", "-c", help=f"the daemon's config file (default {DEFAULT_CONFIG} "
                   "when it exists)")
    p.add_argument("--data-dir", "-d", help="the record directory (default: the config's data_dir)")
    p.add_argument("--storage", help="store backend (default: the config's storage)")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the record of a token and the entries linked to it")
    show.add_argument("token", help=f"a token, or a unique prefix of at least {MIN_PREFIX} characters")
    how = show.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true",
                     help='one JSON object: {"token", "record", "linked": [...]}')
    how.add_argument("--raw", action="store_true",
                     help="the exact stored bytes of the record (one line), nothing else")
    lst = sub.add_parser("list", help="list records, oldest first")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.add_argument("--user", help="only records of this user name or uid")
    lst.add_argument("--uid", type=int, help="only records of this uid")
    lst.add_argument("--remote", help="only records whose remote end has this address (or is in "
                     "this network, ADDR/BITS); ::ffff:192.0.2.1 is 192.0.2.1")
    lst.add_argument("--port", type=int, help="only records whose connection has this port at "
                     "either end")
    lst.add_argument("--type", help="only records of this type (ID, SV, ID_REC, SV_REC)")
    lst.add_argument("--sid", type=int, help="only records of requests with this sid")
    lst.add_argument("--since", help=f"only records at or after this time ({TIME_HELP})")
    lst.add_argument("--until", help=f"only records before this time ({TIME_HELP})")
    ver = sub.add_parser("verify", help="check a token's record (its bytes; an SV record's hash), "
                         "or with --all the whole chain of the store")
    ver.add_argument("--all", action="store_true", help="check every entry and the chain")
    ver.add_argument("--head", help="with --all: a saved chain head (COUNT:HASH, as logged)")
    ver.add_argument("--json", action="store_true", help="one JSON object")
    ver.add_argument("token", nargs="?")
    prune = sub.add_parser("prune", help="delete the segments holding only records made before "
                           "a time, leaving a checkpoint")
    prune.add_argument("--before", required=True, help=f"the time ({TIME_HELP})")
    prune.add_argument("--yes", action="store_true", help="do not ask")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    prune.add_argument("--json", action="store_true", help="one JSON object")
    stats = sub.add_parser("stats", help="records, bytes, quota use, per type and per day, chain head")
    stats.add_argument("--json", action="store_true", help="one JSON object")
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


# -- values an investigator types ----------------------------------------------

_RELATIVE = re.compile(r"([0-9]{1,9})([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: Optional[datetime.datetime] = None) -> datetime.datetime:
    """A time as an investigator writes it: ISO 8601 with any offset (UTC
    when it has none), a date alone (its midnight, UTC), or a relative time
    before ``now``: ``30m``, ``2h``, ``7d``, ``4w``. Returns an aware datetime.

    :raise UsageError: none of these.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    t = text.strip()
    m = _RELATIVE.match(t)
    if m:
        return now - datetime.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in "zZ" and t else t)
    except ValueError:
        raise UsageError(f"cannot read the time {text!r}: want {TIME_HELP}") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def record_time(record: dict) -> Optional[datetime.datetime]:
    """A record's ``time`` as an aware datetime (None when unreadable)."""
    try:
        return parse_time(str(record.get("time")))
    except UsageError:
        return None


def parse_address(text: str):
    """An address or network to compare as such: IPv6 written any way
    (``::1`` = ``0:0:0:0:0:0:0:1``), an IPv4-mapped IPv6 address as its IPv4.

    :raise ValueError: not an address.
    """
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 \
                and net.network_address.ipv4_mapped is not None:
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        return net
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Filters:
    """The ``list`` filters, read and checked once (a bad value is a
    UsageError), then applied to each record by value."""

    def __init__(self, args: argparse.Namespace, now: Optional[datetime.datetime] = None):
        self.since = parse_time(args.since, now) if args.since is not None else None
        self.until = parse_time(args.until, now) if args.until is not None else None
        self.user = args.user
        self.uid = args.uid
        self.port = args.port
        self.type = args.type.upper() if args.type is not None else None
        self.sid = args.sid
        self.remote = None
        if args.remote is not None:
            try:
                self.remote = parse_address(args.remote)
            except ValueError:
                raise UsageError(f"--remote {args.remote!r}: not an address or ADDR/BITS") from None

    def __call__(self, record: dict) -> bool:
        user = record.get("user") or {}
        conn = record.get("connection") or {}
        req = record.get("request") or {}
        if self.user is not None and self.user not in (str(user.get("uid")), user.get("name")):
            return False
        if self.uid is not None and user.get("uid") != self.uid:
            return False
        if self.type is not None and str(record.get("type")).upper() != self.type:
            return False
        if self.sid is not None and req.get("sid") != self.sid:
            return False
        if self.port is not None and self.port not in {
                (conn.get(end) or {}).get("port") for end in ("local", "remote")}:
            return False
        if self.remote is not None and not self._remote(conn.get("remote") or {}):
            return False
        if self.since is not None or self.until is not None:
            t = record_time(record)
            if t is None or (self.since is not None and t < self.since) \
                    or (self.until is not None and t >= self.until):
                return False
        return True

    def _remote(self, end: dict) -> bool:
        try:
            addr = parse_address(str(end.get("address")))
        except ValueError:
            return False
        if isinstance(self.remote, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return addr.version == self.remote.version and addr in self.remote
        return addr == self.remote


def resolve_token(store, text: str) -> Optional[str]:
    """The token ``text`` names: itself when stored, else the one stored
    token it is a prefix of (at least MIN_PREFIX characters, any case).

    :return: None when no record has it.
    :raise UsageError: ``text`` is an ambiguous prefix (the message lists
        the candidates).
    """
    if store.get(text) is not None:
        return text
    if len(text) < MIN_PREFIX:
        return None
    find = getattr(store, "tokens_with_prefix", None)
    if find is not None:
        found = find(text, MAX_CANDIDATES + 1)
    else:  # a store without an index (memory)
        low = text.lower()
        found = sorted(t for t, _ in store.records() if t.lower().startswith(low))
    if len(found) == 1:
        return found[0]
    if not found:
        return None
    more = "\n  ..." if len(found) > MAX_CANDIDATES else ""
    raise UsageError(f"token prefix {text} is ambiguous; candidates:\n  "
                     + "\n  ".join(found[:MAX_CANDIDATES]) + more)


def _unknown(text: str) -> int:
    hint = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(text) < MIN_PREFIX else ""
    sys.stderr.write(f"stopctl: no record for token {text}{hint}\n")
    return EXIT_UNKNOWN


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
    token = resolve_token(store, args.token)
    if token is None:
        return _unknown(args.token)
    data = store.get(token)
    if args.raw:
        out.write(data.decode("utf-8") + "\n")
        return EXIT_OK
    linked = store.linked(token)
    if args.json:
        out.write(json.dumps({"token": token, "record": records.load(data),
                              "linked": [records.load(e) for e in linked]},
                             sort_keys=True, ensure_ascii=False) + "\n")
    else:
        _field(describe(token, records.load(data))
               + [("linked", describe_linked(e)) for e in linked], out)
    return EXIT_OK


def _records(store, damaged: list) -> Iterator[tuple[str, dict]]:
    """Every readable ``(token, record)`` in log order; each damaged entry
    (or record that is not a JSON object) is reported on standard error,
    appended to ``damaged`` and skipped: the ones after it still come."""
    entries = getattr(store, "entries", None)
    if entries is None:  # memory
        for token, data in store.records():
            yield token, records.load(data)
        return
    position = 0
    for seg, item in entries():
        position += 1
        where = f"{os.path.basename(store._seg_path(seg))} offset {item.pos}"
        e = item.entry
        if e is None:
            what = (f"entry {item.salvaged[1]} ({item.salvaged[2]})" if item.salvaged
                    else f"{item.end - item.pos} bytes")
            damaged.append(where)
            sys.stderr.write(f"stopctl: position {position} ({where}): {what} damaged "
                             f"({item.why}); skipped\n")
            continue
        if e.kind != "R":
            continue
        try:
            yield e.token, records.load(e.payload)
        except (ValueError, UnicodeDecodeError):
            damaged.append(where)
            sys.stderr.write(f"stopctl: position {position} ({where}): record {e.token} is not "
                             "a JSON object; skipped\n")


def cmd_list(store, args, out: TextIO) -> int:
    """Exit 0, or 1 when damaged entries were skipped (each reported)."""
    keep = Filters(args)
    damaged: list = []
    for token, record in _records(store, damaged):
        if not keep(record):
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
    return EXIT_FAIL if damaged else EXIT_OK


def _hash_for(token: str, configured: str) -> str:
    """The hash a token was made with: the configured one, unless the
    token's length says the other (records made before a setting change)."""
    by_length = {40: "sha1", 64: "sha256"}
    return configured if by_length.get(len(token)) in (None, configured) else by_length[len(token)]


def cmd_verify(store, args, out: TextIO, hash_name: str = "sha1") -> int:
    """One record (stopctl(8) says what is printed): the store's check of
    its bytes, then for SV / SV_REC the hash recomputed. With ``--all``,
    the whole chain (:func:`cmd_verify_all`). Exit 0 sound, 1 not, 2
    unknown or ambiguous token."""
    if getattr(args, "all", False):
        return cmd_verify_all(store, args, out)
    if getattr(args, "head", None) is not None:
        raise UsageError("--head goes with --all")
    if args.token is None:
        raise UsageError("verify needs a TOKEN, or --all")
    try:
        token = resolve_token(store, args.token)
    except StopError:
        token = args.token  # damaged: its own check says so below
    if token is None:
        return _unknown(args.token)
    why = None
    try:
        data = store.get(token)
    except StopError as exc:
        data, why = None, str(exc)
    sound = data is not None and bool(store.integrity(token))
    if data is None:
        integrity = f"DAMAGED ({why})"
    else:
        integrity = "OK" if sound else "MISMATCH"
    result: dict = {"token": token, "integrity": integrity.split(" ")[0], "why": why}
    lines = [f"store integrity: {integrity}"]
    try:
        rtype = records.load(data).get("type") if data is not None else None
    except (ValueError, UnicodeDecodeError):
        rtype = None  # damaged beyond parsing: for an SV token the hash still decides
    result["type"] = rtype
    hashed = hashlib.new(_hash_for(token, hash_name), data).hexdigest() if data is not None else None
    if data is None:
        lines.append("MISMATCH (the stored record cannot be read)")
        result["hash"] = "MISMATCH"
    elif rtype in ("SV", "SV_REC") or (rtype is None and hashed == token):
        ok = hashed == token
        lines.append("OK" if ok else "MISMATCH")
        result["hash"] = "OK" if ok else "MISMATCH"
        sound = sound and ok
    elif rtype is None:
        lines.append("MISMATCH (record is not valid JSON)")
        result["hash"] = "MISMATCH"
        sound = False
    else:
        lines.append(f"{rtype} record: its token is random, there is no hash to check")
        result["hash"] = None
    result["sound"] = sound
    if getattr(args, "json", False):
        out.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        out.write("".join(line + "\n" for line in lines))
    return EXIT_OK if sound else EXIT_FAIL


def _log_store(store, what: str):
    """``store`` when it is a log store (flat, gzip), else UsageError."""
    if not hasattr(store, "entries"):
        raise UsageError(f"{what} needs a flat or gzip store, not {store.name}")
    return store


def cmd_verify_all(store, args, out: TextIO) -> int:
    """Every entry in order and the chain (stop.storage.chain.verify_all),
    against ``--head`` when given. Exit 0 sound, 1 findings."""
    from stop.storage.chain import head_text, verify_all
    if args.token is not None:
        raise UsageError("verify --all takes no TOKEN")
    try:
        report = verify_all(_log_store(store, "verify --all"), args.head)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        out.write(json.dumps(report.as_dict(), sort_keys=True) + "\n")
        return EXIT_OK if report.sound else EXIT_FAIL
    for f in report.findings:
        out.write(f"{f.kind.upper()}: {f.text}\n")
    if report.dropped:
        out.write(f"... and {report.dropped} more findings\n")
    start = f"from entry {report.start.seq + 1}" + (" (after a prune)" if report.start.seq else "")
    out.write(f"checked {report.entries} entries ({report.records} records, {report.linked} linked) "
              f"in {report.segments} segments {start}; head {head_text(report.head_seq, report.head_chain)}\n")
    if report.saved_head:
        out.write(report.saved_head + "\n")
    n = len(report.findings) + report.dropped
    out.write("SOUND\n" if report.sound else f"NOT SOUND: {n} finding{'s' if n != 1 else ''}\n")
    return EXIT_OK if report.sound else EXIT_FAIL


def _syslog(line: str, settings: Optional[config_mod.Config]) -> Optional[str]:
    """Send ``line`` to syslog as ``stopctl`` (warning), through the
    configured ``syslog_socket`` and ``syslog_facility`` (whatever the
    ``syslog`` setting: a prune must leave a trace outside the store).

    :return: None when sent, else why not (the socket is missing, refuses).
    """
    from twisted.logger import LogLevel

    from stop.logsetup import SyslogObserver
    settings = settings or config_mod.Config()
    observer = SyslogObserver(settings.syslog_socket, settings.syslog_facility, ident="stopctl")
    observer({"log_format": "{line}", "line": line, "log_level": LogLevel.warn})
    observer.close()
    if observer.dropped:
        return f"syslog socket {settings.syslog_socket} did not take it"
    return None


def cmd_prune(store, args, out: TextIO, settings: Optional[config_mod.Config] = None,
              ask=input) -> int:
    """Remove the segments holding only entries made before ``--before``
    (stop.storage.chain.plan_prune), with ``--yes`` or after asking on a
    terminal; log it. Exit 0 done (or nothing to do), 1 failed, 2 not
    confirmed."""
    from stop.storage import chain
    before = parse_time(args.before)
    plan = chain.plan_prune(_log_store(store, "prune"), before)
    result = {"before": before.isoformat(), "segments": plan.segments, "records": plan.records,
              "linked": plan.linked, "first": plan.first_seq, "last": plan.last_seq,
              "checkpoint": chain.head_text(plan.last_seq, plan.last_chain),
              "kept": plan.kept, "leftover": plan.leftover, "pruned": False}
    say = (f"{len(plan.segments)} segments ({plan.records} records, {plan.linked} linked entries, "
           f"entries {plan.first_seq} to {plan.last_seq}, {plan.oldest} to {plan.newest})"
           if plan.segments else "nothing")
    if plan.leftover:
        say += (f", and segments {', '.join(map(str, plan.leftover))} an interrupted prune left "
                "before the checkpoint")
    if not (plan.segments or plan.leftover) or args.dry_run:
        if args.json:
            out.write(json.dumps(result, sort_keys=True) + "\n")
        else:
            out.write(f"{'would prune' if args.dry_run else 'nothing to prune'}: {say} made before "
                      f"{before.isoformat()}; kept from there: {plan.kept}\n")
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("prune deletes records: give --yes (or run it on a terminal to be asked)")
        try:
            answer = ask(f"delete {say} from {store.records_dir}? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
            sys.stderr.write("\n")
        if answer.strip().lower() not in ("y", "yes"):
            sys.stderr.write("stopctl: nothing pruned\n")
            return EXIT_UNKNOWN
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        why = _syslog(line, settings)
        if why is not None:
            sys.stderr.write(f"stopctl: not logged to syslog ({why}); records/checkpoint keeps it\n")

    chain.prune(store, plan, now, before.isoformat(), log)
    result["pruned"] = True
    if args.json:
        out.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        out.write("".join(line + "\n" for line in lines))
    return EXIT_OK


def cmd_stats(store, args, out: TextIO, quota_bytes: int = 0) -> int:
    """Records, bytes, quota use, per type and per day, the chain head."""
    from stop.storage import chain
    st = chain.stats(_log_store(store, "stats"))
    st["quota_bytes"] = quota_bytes
    st["quota_used"] = round(st["bytes"] / quota_bytes, 4) if quota_bytes else None
    if args.json:
        out.write(json.dumps(st, sort_keys=True) + "\n")
        return EXIT_OK
    quota = (f"{st['quota_used'] * 100:.1f} % of quota_mb = {quota_bytes // 2**20}" if quota_bytes
             else "no quota")
    rows = [("records", str(st["records"])), ("linked", str(st["linked"])),
            ("damaged", str(st["damaged"])), ("bytes", f"{st['bytes']} ({quota})"),
            ("segments", str(st["segments"]))]
    rows += [(f"type {k}", str(v)) for k, v in st["per_type"].items()]
    rows += [(f"day {k}", str(v)) for k, v in st["per_day"].items()]
    rows.append(("head", st["head"]["text"]))
    _field(rows, out)
    return EXIT_OK


COMMANDS = {"show": cmd_show, "list": cmd_list, "verify": cmd_verify, "prune": cmd_prune,
            "stats": cmd_stats}


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
        if args.command == "prune":
            return cmd_prune(store, args, out, settings)
        if args.command == "stats":
            return cmd_stats(store, args, out, settings.quota_bytes)
        return COMMANDS[args.command](store, args, out)
    except UsageError as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_UNKNOWN
    except (StopError, ValueError) as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
