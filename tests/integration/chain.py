"""Stepping-stone chains for the recursion tests: one real ``twistd stop``
per host, relays between them, and a way to follow the tokens back.

On loopback, a host is a loopback alias (127.0.0.11, .12, ...): every
daemon listens on the same port of its own alias, asks the others on that
port (``recursion_port``) and counts only its alias as its own
(``local_addresses``), so a TCP connection to another alias is a
connection to another host, as it would be between machines.

Across network namespaces (as root), a host is a namespace: its daemon
listens on port 113 of each of its addresses, with the default recursion
port and ``local_addresses`` (its own interfaces), as on a real machine.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from tests.integration.harness import Daemon, free_port, read_lines
from tests.integration.svtrees import tcp_sockets, wait_for

TOKEN_RE = r"[0-9a-f]{40}"
#: Timeouts of the daemons in the tests (the defaults are 10 and 30 s).
FAST = {"recursion_connect_timeout": 3, "recursion_reply_timeout": 4}
TRACE_TIMEOUT = 60.0


def settings_for(address: str, port: int, **extra) -> dict:
    return {"recursion_port": port, "local_addresses": address, **FAST, **extra}


class Hosts:
    """One daemon per address, all on the same port.

    :param start_daemon: the ``start_daemon`` fixture (stops them after).
    """

    def __init__(self, start_daemon, addresses, port: Optional[int] = None, **settings):
        self.port = port or free_port(tuple(addresses))
        self.daemons = {a: start_daemon(settings_for(a, self.port, **settings), interfaces=(a,),
                                        port=self.port)
                        for a in addresses}

    @classmethod
    def in_namespaces(cls, start_daemon, namespaces: dict, **settings) -> "Hosts":
        """One daemon per namespace ({Netns: (address, ...)}), on port 113
        of each of its addresses; every address of a host names it."""
        hosts = cls.__new__(cls)
        hosts.port = 113
        hosts.daemons = {}
        for ns, addresses in namespaces.items():
            d = start_daemon({**FAST, **settings}, interfaces=tuple(addresses), port=113,
                             netns=ns)
            hosts.daemons.update(dict.fromkeys(addresses, d))
        return hosts

    def __getitem__(self, address: str) -> Daemon:
        return self.daemons[address]

    def show(self, address: str, token: str) -> Optional[dict]:
        """``stopctl show --json`` on that host: {"token", "record", "linked"},
        None for a token it does not know (exit 2)."""
        r = self.daemons[address].stopctl("show", "--json", token)
        if r.returncode == 2:
            return None
        assert r.returncode == 0, (address, token, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def verify(self, address: str, token: str) -> subprocess.CompletedProcess:
        return self.daemons[address].stopctl("verify", token)

    def complete(self, address: str, token: str, timeout: float = TRACE_TIMEOUT) -> dict:
        """The record of ``token`` once every target has its outcome saved."""
        def done():
            shown = self.show(address, token)
            assert shown is not None, f"{address} has no record {token}"
            targets = shown["record"].get("recursion", {}).get("targets", [])
            return shown if len(shown["linked"]) >= len(targets) else None
        return wait_for(done, timeout=timeout, what=f"outcomes of {token} on {address}")

    def trace(self, address: str, token: str) -> list["Hop"]:
        """Follow ``token`` from ``address`` back, hop by hop, through every
        ``token`` outcome whose target is one of these hosts and has a
        record there (a loop's random token has none)."""
        hops, todo, seen = [], [(address, token)], set()
        while todo:
            address, token = todo.pop(0)
            if (address, token) in seen or (hops and self.show(address, token) is None):
                continue
            seen.add((address, token))
            shown = self.complete(address, token)
            hop = Hop(address, token, shown["record"], shown["linked"])
            hops.append(hop)
            for e in hop.linked:
                if e["outcome"] == "token" and e["target"]["address"] in self.daemons:
                    todo.append((e["target"]["address"], e["token"]))
        return hops

    def logs(self) -> str:
        first = {}
        for a, d in self.daemons.items():
            first.setdefault(id(d), (a, d))
        return "\n".join(f"== {a}\n{d.read_log()}" for a, d in first.values())


@dataclass
class Hop:
    address: str
    token: str
    record: dict
    linked: list = field(default_factory=list)

    @property
    def recursion(self) -> dict:
        return self.record.get("recursion", {})

    @property
    def targets(self) -> list:
        return self.recursion.get("targets", [])


def _matches(end, want) -> bool:
    return want is None or all(w is None or e == w for e, w in zip(end, want))


def established(local=None, remote=None) -> Optional[object]:
    """An established TCP socket (sock_diag) with these ends ((addr, port);
    either end, or a part of it, may be None: any), or None."""
    for s in tcp_sockets():
        if _matches(s.local, local) and _matches(s.remote, remote):
            return s
    return None


def wait_established(local=None, remote=None, what="connection"):
    return wait_for(lambda: established(local, remote), what=what)


def listening(address: str, port: int) -> bool:
    return any(s.local == (address, port) for s in tcp_sockets("LISTEN"))


def wait_listening(address: str, port: int):
    wait_for(lambda: listening(address, port), what=f"listener on {address}:{port}")


class Victim:
    """The last host: a listener the chain's last hop connects to, in this
    process (its sockets in ``netns`` when given); asks that hop's daemon
    about the accepted connection."""

    def __init__(self, address: str, netns=None):
        self.address = address
        self.netns = netns
        self.listener = self._socket()
        self.listener.bind((address, 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.conn: Optional[socket.socket] = None
        self.peer = None
        self.query_socket: Optional[socket.socket] = None
        self.received = b""

    def accept(self, timeout: float = 20.0):
        self.listener.settimeout(timeout)
        self.conn, self.peer = self.listener.accept()
        return self.peer

    def ask(self, daemon: Daemon, kind: str = "SV_REC : 4711") -> bytes:
        """Ask ``daemon`` about the accepted connection; the reply line. The
        query connection is kept open: every byte that ever comes back is
        in ``received`` (see :meth:`everything`)."""
        s = self._socket()
        s.settimeout(10)
        s.bind((self.address, 0))
        s.connect((self.peer[0], daemon.port))
        s.sendall(b"%d, %d : %s\r\n" % (self.peer[1], self.port, kind.encode()))
        self.query_socket = s
        self.received = read_reply(s)
        return self.received.split(b"\r\n", 1)[0]

    def everything(self) -> bytes:
        """Every byte the daemon ever sent on the query connection (see
        :func:`read_to_end`), all in ``received``, which is returned."""
        self.received += read_to_end(self.query_socket)
        return self.received

    def _socket(self) -> socket.socket:
        return self.netns.socket() if self.netns is not None else socket.socket()

    def close(self):
        for s in (self.conn, self.query_socket, self.listener):
            if s is not None:
                s.close()


def read_reply(s: socket.socket, timeout: float = 10.0) -> bytes:
    """What ``s`` receives up to the end of the first CR LF line (all of
    what came with it too: nothing is dropped)."""
    s.settimeout(timeout)
    got = b""
    while b"\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def read_to_end(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Half-close ``s`` (the daemon then closes its end) and read all that
    is left to the end; a daemon that never closes raises a timeout."""
    s.settimeout(timeout)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk


def assert_nothing_leaks(victim: Victim, reply: bytes, hops=(), entries=()) -> None:
    """Spec 6, issue 9 "Nothing leaks": the requester got its one reply
    line (a token line, as an SV gets) and not one byte more, ever; none of
    the upstream tokens, replies or error words of ``hops`` (their linked
    entries, and ``entries``) is in it."""
    assert victim.everything() == reply + b"\r\n", victim.received
    token_line(reply, (victim.peer[1], victim.port))
    mine = reply.rsplit(b" : ", 1)[1].decode()
    entries = [e for h in hops for e in h.linked] + list(entries)
    upstream = {h.token for h in hops} - {mine}
    for e in entries:
        upstream.update(str(e[k]) for k in ("token", "reply", "error", "user") if e.get(k))
    # (a slow upstream's first bytes, digits of the port pair it echoes,
    # would match our own port numbers and say nothing)
    for text in (t for t in upstream if not re.fullmatch(r"[0-9, ]*", t)):
        assert text.encode() not in victim.received, (text, victim.received)


def token_line(line: bytes, ports: tuple[int, int]) -> str:
    """The token of a reply line ``P1, P2 : USERID : OTHER : <token>``
    (asserting that it is exactly that)."""
    m = re.fullmatch(rb"%d, %d : USERID : OTHER : (%s)" % (ports[0], ports[1],
                                                           TOKEN_RE.encode()), line)
    assert m, line
    return m.group(1).decode()
