"""``stopctl trace``: rebuild a stepping-stone chain from one token.

Start at one host's redemption service with one token; each record's
recursion outcomes (linked entries, contract section 3) whose ``outcome``
is ``"token"`` name the previous host (``target.address``) and its token:
fetch that, and so on, depth first in the order the entries were saved,
under a depth budget and a budget of hosts fetched. The result is a tree of
:class:`Hop` (a chain is a tree with one branch), rendered as text
(:func:`render_text`), JSON (:func:`to_json`) or Graphviz DOT
(:func:`render_dot`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from stop.errors import RedeemError
from stop.redeem.audit import printable
from stop.redeem.client import Redeemed, where

#: Default budgets: hops from the first host, and hosts fetched in all.
DEFAULT_MAX_DEPTH = 16
DEFAULT_MAX_HOSTS = 32
#: The deepest a trace may be asked to go (the walk recurses).
LIMIT_DEPTH = 256

# Hop statuses besides the RedeemError kinds.
OK, CYCLE, BUDGET = "ok", "cycle", "budget"

#: A token the walk follows: the spec's form (40 or 64 lowercase hex digits).
_TOKEN = re.compile(r"[0-9a-f]{40}\Z|[0-9a-f]{64}\Z")


@dataclass
class Link:
    """One linked entry of a record; ``hop`` is where a ``token`` outcome
    led (None for other outcomes)."""

    entry: dict
    hop: Optional["Hop"] = None


@dataclass
class Hop:
    """One host of the chain as the trace met it."""

    address: str  # the address the record named (or the host given)
    host: str  # where the redemption service was asked
    port: int
    token: str
    depth: int
    status: str = OK
    error: Optional[str] = None
    number: int = 0  # 1, 2, ... in the order fetched; 0 when not fetched
    redeemed: Optional[Redeemed] = None
    links: list[Link] = field(default_factory=list)
    seen_at: Optional[str] = None  # a cycle: where the token was met first

    def walk(self):
        """This hop and every hop below it, depth first."""
        yield self
        for link in self.links:
            if link.hop is not None:
                yield from link.hop.walk()


Fetch = Callable[[str, int, str, str], Redeemed]  # (host, port, token, server name)


def trace(address: str, port: int, token: str, fetch: Fetch,
          resolve: Callable[[str], tuple[str, int]],
          max_depth: int = DEFAULT_MAX_DEPTH, max_hosts: int = DEFAULT_MAX_HOSTS) -> Hop:
    """Follow the chain from ``token`` at ``address``:``port``.

    :param fetch: redeems one token (:func:`stop.redeem.client.redeem`
        with credentials bound); raises :class:`~stop.errors.RedeemError`.
    :param resolve: where to redeem at a host named by a recursion outcome:
        ``address -> (host, port)``.
    :return: the first :class:`Hop`; failures are marked on the hops, never
        raised.
    """
    first: dict[str, Hop] = {}
    count = [0]

    def visit(address: str, host: str, port: int, token: str, depth: int) -> Hop:
        hop = Hop(address=address, host=host, port=port, token=token, depth=depth)
        if token in first:
            seen = first[token]
            hop.status, hop.seen_at = CYCLE, f"hop {seen.number} ({where(seen.host, seen.port)})"
            return hop
        if count[0] >= max_hosts:
            hop.status, hop.error = BUDGET, f"host budget spent (--max-hosts {max_hosts})"
            return hop
        count[0] += 1
        hop.number = count[0]
        first[token] = hop
        try:
            hop.redeemed = fetch(host, port, token, host)
        except RedeemError as e:
            hop.status, hop.error = e.kind, str(e)
            return hop
        for entry in recursion_entries(hop.redeemed):
            link = Link(entry)
            hop.links.append(link)
            nxt = _next_token(entry)
            if nxt is None:
                continue
            target, tok = nxt
            if depth + 1 > max_depth:
                link.hop = Hop(address=target, host=target, port=0, token=tok, depth=depth + 1,
                               status=BUDGET, error=f"depth budget spent (--max-depth {max_depth})")
                continue
            h, p = resolve(target)
            link.hop = visit(target, h, p, tok, depth + 1)
        return hop

    return visit(address, address, port, token, 0)


def recursion_entries(redeemed: Redeemed) -> list[dict]:
    """The ``"kind": "recursion"`` linked entries of a record, in order."""
    return [e for e in redeemed.linked if isinstance(e, dict) and e.get("kind") == "recursion"]


def _next_token(entry: dict) -> Optional[tuple[str, str]]:
    """``(address, token)`` of a ``token`` outcome, or None: only a
    well-formed token (:data:`_TOKEN`) at an IP address is followed (a
    record is hostile input: no host names, nothing IDNA could choke on)."""
    if entry.get("outcome") != "token":
        return None
    target = entry.get("target") if isinstance(entry.get("target"), dict) else {}
    address, tok = target.get("address"), entry.get("token")
    if not isinstance(address, str) or not isinstance(tok, str) or not _TOKEN.match(tok):
        return None
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    return address, tok


def incomplete(root: Hop) -> bool:
    """Whether some hop could not be fetched (cycles are not failures)."""
    return any(h.status not in (OK, CYCLE) for h in root.walk())


# -- what a record says ------------------------------------------------------


def _proc_name(p: dict) -> str:
    name = p.get("name")
    cmdline = p.get("cmdline")
    if not name and isinstance(cmdline, list) and cmdline:
        name = os.path.basename(str(cmdline[0]))
    return f"{name or '?'}({p.get('pid')})"


def process_path(record: dict, entry: Optional[dict] = None) -> list[dict]:
    """The walk's path through the processes of ``record``: from the
    process holding the queried socket to the one holding the connection
    that ``entry`` (a recursion outcome) asked about; without ``entry``
    (or when it cannot be matched), the holder and its parents.

    :return: ``[{"pid", "name", "via"}]``, ``via`` being how the walk
        reached that process from the one before (``parent``, ``pipe``,
        ``socket``...); empty when the record has no process state.
    """
    state = record.get("processes")
    if not isinstance(state, dict):
        return []
    procs = {p["pid"]: p for p in _list(state.get("processes"))
             if isinstance(p, dict) and isinstance(p.get("pid"), int)}
    target = _holder_of(state, entry) if entry is not None else None
    if target in procs:
        chain, pid, seen = [], target, set()
        while pid in procs and pid not in seen and len(chain) < 64:
            seen.add(pid)
            chain.append(procs[pid])
            pid = _dict(procs[pid].get("reached")).get("from")  # None at a holder of the queried socket
        chain.reverse()
    else:
        start = [pid for pid in _list(state.get("start")) if isinstance(pid, int) and pid in procs]
        chain, pid = [], start[0] if start else None
        while isinstance(pid, int) and pid in procs and pid > 1 and procs[pid] not in chain and len(chain) < 8:
            chain.append(procs[pid])
            pid = procs[pid].get("ppid")
    return [{"pid": p.get("pid"), "name": _proc_name(p),
             "via": _dict(p.get("reached")).get("via")} for p in chain]


def _dict(value) -> dict:
    """``value`` when it is a dict, else ``{}`` (record fields are hostile)."""
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    """``value`` when it is a list, else ``[]``."""
    return value if isinstance(value, list) else []


def _holder_of(state: dict, entry: dict) -> Optional[int]:
    """The PID holding the connection a recursion outcome asked about."""
    target = entry.get("target") if isinstance(entry.get("target"), dict) else {}
    ports = (entry.get("request") or {}).get("ports") if isinstance(entry.get("request"), dict) else None
    for c in _list(state.get("remote_connections")):
        if not isinstance(c, dict):
            continue
        remote = _dict(c.get("remote"))
        if remote.get("address") != target.get("address"):
            continue
        if isinstance(ports, list) and len(ports) == 2 and remote.get("port") != ports[0]:
            continue
        holders = _list(c.get("holders")) or ([[c.get("pid"), c.get("fd")]] if "pid" in c else [])
        if holders and isinstance(holders[0], list) and holders[0] \
                and isinstance(holders[0][0], int):
            return holders[0][0]
    return None


def path_text(path: list[dict]) -> str:
    """``ssh(42) -parent-> bash(40) -parent-> sshd(30)``."""
    out = ""
    for i, p in enumerate(path):
        out += p["name"] if i == 0 else f" -{p['via'] or '?'}-> {p['name']}"
    return out


def _user(record: dict) -> str:
    user = record.get("user") if isinstance(record.get("user"), dict) else {}
    return f"{user.get('name') or '?'} (uid {user.get('uid')})"


def outcome_text(entry: dict) -> str:
    """One line for a recursion outcome: what was asked where, and what
    came back."""
    target = entry.get("target") if isinstance(entry.get("target"), dict) else {}
    req = entry.get("request") if isinstance(entry.get("request"), dict) else {}
    ports = _ports(req)
    asked = (f"{where(str(target.get('address')), target.get('port'))} "
             f"{ports[0]}, {ports[1]} : {req.get('type')}:{req.get('sid')}")
    from stop.ctl import outcome_result  # here: stop.ctl imports this package
    return printable(f"{asked} -> {outcome_result(entry)}")


def _ports(req: dict) -> list:
    """A request's two ports, or ``["?", "?"]`` when it has no such pair."""
    ports = req.get("ports")
    return ports if isinstance(ports, list) and len(ports) == 2 else ["?", "?"]


_MARKS = {
    "not-found": "NOT FOUND", "unreachable": "UNREACHABLE",
    "certificate-refused": "CERTIFICATE REFUSED", "not-authorised": "NOT AUTHORISED",
    "rate-limited": "RATE LIMITED", "error": "ERROR", CYCLE: "CYCLE", BUDGET: "BUDGET",
}


def end_text(hop: Hop) -> Optional[str]:
    """Why the chain stops at this fetched hop, or None when it goes on."""
    record = hop.redeemed.record
    rec = record.get("recursion")
    if not isinstance(rec, dict):
        return f"[END] a {record.get('type')} record: no recursion was asked for"
    if not rec.get("targets"):
        return "[ORIGIN] no inbound connection: the chain starts here"
    if not hop.links:
        targets = rec["targets"]
        count = len(targets) if isinstance(targets, list) else "?"
        return f"[DEAD END] {count} target(s), no outcome saved yet"
    if not any(link.hop is not None for link in hop.links):
        return "[DEAD END] no previous host gave a token"
    return None


# -- renderings ----------------------------------------------------------------


def render_text(root: Hop) -> str:
    """The chain as an indented tree (README.rst's worked example shows one)."""
    lines: list[str] = []
    _text_hop(root, "", lines)
    # Records are hostile (process names, user names...): no control
    # character or escape sequence reaches the terminal.
    return "\n".join(printable(line) for line in lines) + "\n"


def _text_hop(hop: Hop, indent: str, lines: list[str]) -> None:
    head = f"{where(hop.host, hop.port)}" if hop.port else hop.host
    if hop.status != OK:
        detail = hop.error or (f"token already met at {hop.seen_at}" if hop.seen_at else "")
        lines.append(f"{indent}{head}  token {hop.token}  [{_MARKS.get(hop.status, hop.status)}] {detail}".rstrip())
        return
    record = hop.redeemed.record
    lines.append(f"{indent}{head}  {record.get('type')}  {record.get('time')}  {_user(record)}"
                 f"  host {record.get('host')}")
    sub = indent + "    "
    verified = hop.redeemed.hash_verified
    check = "" if verified is None else ("  (hash verified)" if verified else "  (HASH MISMATCH)")
    lines.append(f"{sub}token    {hop.token}{check}")
    entries = hop.links or [Link({})]
    for i, link in enumerate(entries):
        path = path_text(process_path(record, link.entry or None))
        if path and (i == 0 or path != path_text(process_path(record, entries[i - 1].entry or None))):
            lines.append(f"{sub}process  {path}")
        if not link.entry:
            continue
        last = i == len(entries) - 1
        mark = "" if link.hop is not None or link.entry.get("outcome") == "token" else "  [DEAD END]"
        lines.append(f"{sub}{'`' if last else '|'}-- asked {outcome_text(link.entry)}{mark}")
        if link.hop is not None:
            _text_hop(link.hop, sub + ("    " if last else "|   "), lines)
    end = end_text(hop)
    if end:
        lines.append(f"{sub}{end}")


def to_json(root: Hop, start: dict) -> dict:
    """The trace as one JSON-able object: ``{"start", "complete", "hops":
    N, "chain": <hop>}``; a hop holds its record (parsed, and as the exact
    text under ``record_text``), its linked entries and where each led."""
    return {"start": start, "complete": not incomplete(root),
            "hops": sum(1 for h in root.walk() if h.number), "chain": _hop_json(root)}


def _hop_json(hop: Hop) -> dict:
    out = {"number": hop.number, "address": hop.address, "host": hop.host, "port": hop.port,
           "token": hop.token, "depth": hop.depth, "status": hop.status}
    if hop.error:
        out["error"] = hop.error
    if hop.seen_at:
        out["seen_at"] = hop.seen_at
    if hop.redeemed is not None:
        r = hop.redeemed
        out.update({"record": r.record, "record_text": r.record_bytes.decode("utf-8"),
                    "hash_verified": r.hash_verified, "integrity": r.integrity,
                    "process_path": process_path(r.record, hop.links[0].entry if hop.links else None),
                    "linked": r.linked, "end": end_text(hop)})
        out["links"] = [{"entry": link.entry,
                         "process_path": process_path(r.record, link.entry),
                         "next": _hop_json(link.hop) if link.hop is not None else None}
                        for link in hop.links]
    return out


def _dot_str(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "\\n".join(printable(part) for part in text.split("\n")) + '"'


def render_dot(root: Hop) -> str:
    """The chain as a Graphviz digraph: a box per host (red and dashed when
    it could not be fetched), an edge per recursion outcome labelled with
    the question and its outcome (grey dead ends for outcomes without a
    token)."""
    out = ["digraph stop_trace {", '  node [shape=box, fontname="monospace", fontsize=10];',
           '  edge [fontname="monospace", fontsize=9];']
    names: dict[int, str] = {}
    extra = [0]

    def node(hop: Hop) -> str:
        key = id(hop)
        if key in names:
            return names[key]
        name = f"h{len(names) + 1}"
        names[key] = name
        if hop.status == OK:
            r = hop.redeemed.record
            path = path_text(process_path(r, hop.links[0].entry if hop.links else None))
            label = "\n".join(x for x in (
                f"{where(hop.host, hop.port)}  {r.get('type')}", str(r.get("time")), _user(r), path,
                hop.token, end_text(hop) or "") if x)
            attrs = ""
        else:
            label = f"{where(hop.host, hop.port) if hop.port else hop.host}\n{hop.token}\n" \
                    f"{_MARKS.get(hop.status, hop.status)}" + (f": {hop.seen_at}" if hop.seen_at else "")
            attrs = ', color=red, style=dashed' if hop.status != CYCLE else ', color=orange'
        out.append(f"  {name} [label={_dot_str(label)}{attrs}];")
        for link in hop.links:
            e = link.entry
            req = e.get("request") if isinstance(e.get("request"), dict) else {}
            ports = _ports(req)
            elabel = f"{req.get('type')} {ports[0]},{ports[1]}"
            if link.hop is not None:
                out.append(f"  {name} -> {node(link.hop)} [label={_dot_str(elabel + ': token')}];")
            else:
                extra[0] += 1
                dead = f"x{extra[0]}"
                target = e.get("target") if isinstance(e.get("target"), dict) else {}
                what = e.get("error") or e.get("user") or e.get("outcome")
                dlabel = _dot_str(f"{target.get('address')}: {what}")
                out.append(f"  {dead} [label={dlabel}, color=gray, fontcolor=gray, shape=octagon];")
                out.append(f"  {name} -> {dead} [label={_dot_str(elabel + ': ' + str(e.get('outcome')))}, "
                           "color=gray, style=dashed];")
        return name

    node(root)
    out.append("}")
    return "\n".join(out) + "\n"


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
