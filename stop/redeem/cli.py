"""``stopctl trace`` and ``stopctl audit`` (registered by :mod:`stop.ctl`).

    stopctl trace TOKEN@HOST[:PORT] --cert FILE --key FILE --ca FILE
                  [--port N] [--map ADDRESS=HOST[:PORT] ...] [--max-depth N]
                  [--max-hosts N] [--timeout S] [--json] [--dot FILE] [--svg FILE]
    stopctl audit [--json] [--since ISO] [--until ISO] [--identity ID]
                  [--token T] [--outcome O]

``trace`` needs no config and no record store (an investigator's machine
has neither). Exit statuses are in :data:`EXIT` and stopctl(8).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Optional, TextIO

from stop.errors import RedeemError, StopError
from stop.redeem import trace as trace_mod
from stop.redeem.audit import AuditFailed, audit_path, printable, read_audit
from stop.redeem.client import DEFAULT_TIMEOUT, Credentials, redeem, where

#: The redemption port assumed when TOKEN@HOST names none (our docs use it
#: in every example; ``redeem_listen`` has no default).
DEFAULT_PORT = 8113

EXIT_OK = 0
EXIT_FAIL = 1  # local files, a bad reply, Graphviz failed
EXIT_USAGE = 2  # a usage error (argparse's status too)
EXIT_UNREACHABLE = 3
EXIT_CERTIFICATE = 4
EXIT_NOT_AUTHORISED = 5
EXIT_INCOMPLETE = 6  # the first hop was fetched, a later one was not
EXIT_RATE_LIMITED = 7
EXIT_UNKNOWN = 8  # the first host answered "not found" (distinct from a usage error)
#: The exit status when the FIRST hop fails, by RedeemError kind.
EXIT = {"not-found": EXIT_UNKNOWN, "unreachable": EXIT_UNREACHABLE,
        "certificate-refused": EXIT_CERTIFICATE, "not-authorised": EXIT_NOT_AUTHORISED,
        "rate-limited": EXIT_RATE_LIMITED, "error": EXIT_FAIL}

_TOKEN = re.compile(r"[0-9a-f]{40}\Z|[0-9a-f]{64}\Z")


def add_parsers(sub) -> None:
    """Add ``trace`` and ``audit`` to stopctl's subcommands."""
    tr = sub.add_parser("trace", help="rebuild a stepping-stone chain from one token through "
                        "the hosts' redemption services (mutual TLS)")
    tr.add_argument("target", metavar="TOKEN@HOST[:PORT]",
                    help=f"the token and the host whose record it is (port default {DEFAULT_PORT})")
    tr.add_argument("--cert", required=True, help="your certificate (PEM)")
    tr.add_argument("--key", required=True, help="its key (PEM)")
    tr.add_argument("--ca", required=True, help="the CA of the hosts' certificates (PEM)")
    tr.add_argument("--port", type=int, help="redemption port of the hosts the chain leads to "
                    "(default: the first host's)")
    tr.add_argument("--map", action="append", default=[], metavar="ADDRESS=HOST[:PORT]",
                    help="redeem at HOST[:PORT] for records naming ADDRESS (repeatable)")
    tr.add_argument("--max-depth", type=int, default=trace_mod.DEFAULT_MAX_DEPTH,
                    help=f"hops followed from the first (default {trace_mod.DEFAULT_MAX_DEPTH})")
    tr.add_argument("--max-hosts", type=int, default=trace_mod.DEFAULT_MAX_HOSTS,
                    help=f"records fetched in all (default {trace_mod.DEFAULT_MAX_HOSTS})")
    tr.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help=f"seconds per connect and read (default {DEFAULT_TIMEOUT:g})")
    tr.add_argument("--json", action="store_true", help="the whole trace as JSON")
    tr.add_argument("--dot", metavar="FILE", help="also write the chain as Graphviz DOT")
    tr.add_argument("--svg", metavar="FILE", help="also draw it as SVG (needs Graphviz's dot)")
    au = sub.add_parser("audit", help="print the redemption audit trail, oldest first")
    au.add_argument("--json", action="store_true", help="one JSON object per line, as stored")
    for flag, when in (("--since", "at or after"), ("--until", "before")):
        au.add_argument(flag, help=f"only events {when} this time (ISO 8601, UTC)")
    au.add_argument("--identity", help="only this client identity (name or sha256: fingerprint)")
    au.add_argument("--token", help="only events about this token")
    au.add_argument("--outcome", help="only this outcome (released, unknown-token, ...)")


COMMANDS = ("trace", "audit")


def run(args: argparse.Namespace, out: TextIO, settings: Callable) -> int:
    """Run ``trace`` or ``audit``. ``settings()`` loads stop.conf (only
    ``audit`` needs it). Errors are one line on stderr, never a traceback."""
    try:
        if args.command == "trace":
            return cmd_trace(args, out)
        return cmd_audit(args, out, settings())
    except (StopError, OSError) as e:
        sys.stderr.write(f"stopctl: {getattr(e, 'strerror', None) or e}\n")
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


def _usage(message: str) -> int:
    sys.stderr.write(f"stopctl trace: {message}\n")
    return EXIT_USAGE


def parse_target(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, str, int]:
    """``TOKEN@HOST[:PORT]`` (``HOST`` may be ``[IPv6]``) -> ``(token, host,
    port)``. :raise ValueError: malformed (the message says how)."""
    token, sep, rest = text.partition("@")
    if not sep or not rest:
        raise ValueError(f"{text!r}: want TOKEN@HOST[:PORT]")
    if not _TOKEN.match(token):
        raise ValueError(f"{token!r} is not a token (40 or 64 lowercase hex digits)")
    host, port = _host_port(rest, default_port)
    return token, host, port


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"{text!r}: unclosed [")
        port = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None  # a name, an IPv4 address, or a bare IPv6 address
    if port is None:
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: bad port")
    return host, int(port)


def cmd_trace(args: argparse.Namespace, out: TextIO) -> int:
    try:
        token, host, port = parse_target(args.target)
        mapping = {}
        for item in args.map:
            address, sep, dest = item.partition("=")
            if not sep or not address or not dest:
                raise ValueError(f"--map {item!r}: want ADDRESS=HOST[:PORT]")
            mapping[address.strip("[]")] = _host_port(dest, args.port or port)
    except ValueError as e:
        return _usage(str(e))
    if not 0 <= args.max_depth <= trace_mod.LIMIT_DEPTH or args.max_hosts < 1 or args.timeout <= 0:
        return _usage(f"--max-depth is 0..{trace_mod.LIMIT_DEPTH}, --max-hosts at least 1, "
                      "--timeout more than 0")
    context = Credentials(args.cert, args.key, args.ca).context()
    later = args.port or port

    def fetch(h: str, p: int, t: str, name: str):
        return redeem(h, p, t, context, timeout=args.timeout, server_name=name)

    def resolve(address: str) -> tuple[str, int]:
        return mapping.get(address, (address, later))

    root = trace_mod.trace(host, port, token, fetch, resolve, args.max_depth, args.max_hosts)
    if root.status != trace_mod.OK:
        sys.stderr.write(f"stopctl: {printable(str(root.error))}\n")
        return EXIT[root.status]
    if args.json:
        out.write(trace_mod.dump_json(trace_mod.to_json(
            root, {"token": token, "host": host, "port": port})))
    else:
        out.write(f"trace of {token}@{where(host, port)}\n")
        out.write(trace_mod.render_text(root))
    status = EXIT_INCOMPLETE if trace_mod.incomplete(root) else EXIT_OK
    if args.dot or args.svg:
        dot = trace_mod.render_dot(root)
        if args.dot:
            replace_file(args.dot, lambda tmp: _write_text(tmp, dot))
        if args.svg:
            failed = replace_file(args.svg, lambda tmp: draw_svg(dot, tmp))
            if failed:
                sys.stderr.write(f"stopctl: --svg: {failed}\n")
                return EXIT_FAIL
    return status


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def replace_file(path: str, write: Callable[[str], Optional[str]]) -> Optional[str]:
    """Write ``path`` atomically, mode 0600 (a trace holds records): ``write``
    fills a temporary file beside it, which then replaces ``path``; a
    symlink at ``path`` is replaced, not followed. :return: what ``write``
    returned (a reason it failed: ``path`` is left alone), or None."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        failed = write(tmp)
        if failed is None:
            os.replace(tmp, path)
        return failed
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def draw_svg(dot: str, path: str, timeout: float = 60.0) -> Optional[str]:
    """Render ``dot`` to ``path`` with Graphviz; the reason it failed, or None."""
    program = shutil.which("dot")
    if program is None:
        return "Graphviz's dot is not installed (apt-get install graphviz); --dot FILE works without it"
    try:
        result = subprocess.run([program, "-Tsvg", "-o", path], input=dot.encode("utf-8"),
                                capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"dot took more than {timeout:g} s"
    if result.returncode != 0:
        return f"dot failed: {result.stderr.decode('utf-8', 'replace').strip()[:200]}"
    return None


def cmd_audit(args: argparse.Namespace, out: TextIO, settings) -> int:
    import json
    path = audit_path(settings.data_dir)
    if not os.path.exists(path):
        sys.stderr.write(f"stopctl: no audit trail at {path} (no redemption yet, or "
                         "redeem_listen is off)\n")
        return EXIT_OK
    damaged = 0
    try:
        for event in read_audit(path):
            if event is None:
                damaged += 1
                continue
            if not _audit_matches(event, args):
                continue
            if args.json:
                out.write(json.dumps(event, sort_keys=True, ensure_ascii=False) + "\n")
            else:
                out.write(audit_line(event) + "\n")
    except AuditFailed as e:
        sys.stderr.write(f"stopctl: {e}\n")
        return EXIT_FAIL
    if damaged:
        sys.stderr.write(f"stopctl: {damaged} damaged line(s) in {path} skipped "
                         "(a torn last line after a crash, or tampering)\n")
    return EXIT_OK


def _audit_matches(event: dict, args) -> bool:
    t = str(event.get("time", ""))
    if args.since is not None and t < args.since:
        return False
    if args.until is not None and t >= args.until:
        return False
    if args.identity is not None and args.identity not in (event.get("identity"), event.get("fingerprint")):
        return False
    if args.token is not None and event.get("token") != args.token:
        return False
    if args.outcome is not None and event.get("outcome") != args.outcome:
        return False
    return True


def audit_line(event: dict) -> str:
    """One text line: time, outcome, identity, client address, token, why."""
    client = event.get("client") if isinstance(event.get("client"), dict) else {}
    address = where(str(client.get("address")), client.get("port"))
    return printable(f"{event.get('time')}  {str(event.get('outcome')):<17}  "
                     f"{event.get('identity') or '-'}  {address}  {event.get('token') or '-'}"
                     + (f"  {event['why']}" if event.get("why") else ""))
