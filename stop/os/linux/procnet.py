"""``/proc/net`` tables: their address decoder, and the socket lookup that
reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` (the ``procfs`` backend).

The lookup is the fallback when sock_diag is not available: correct, but it
reads the whole table (milliseconds at tens of thousands of sockets), so it
declares itself ``blocking`` and the answerer calls it in a worker thread.
Each file is read at most once per query.

Row format (``net/ipv4/tcp_ipv4.c: get_tcp4_sock``)::

    sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
    0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 ...

An address is its 32-bit words printed ``%08X`` in host byte order (one
word for IPv4, four for IPv6); a port is ``%04X`` of the port number.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from zope.interface import implementer

from stop.errors import LookupFailed
from stop.interfaces import ISocketLookup
from stop.model import Connection, Endpoint, host_family
from stop.os.direction import DirectionRule, listener_covers
from stop.os.linux.sockdiag import address_key, key_host

ST_ESTABLISHED = 0x01
ST_LISTEN = 0x0A

_WORDS = {8: struct.Struct("=I"), 32: struct.Struct("=4I")}


@dataclass(frozen=True)
class TcpRow:
    """One parsed row of ``/proc/net/tcp{,6}``; hosts canonical (v4-mapped
    addresses of tcp6 become IPv4)."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int


def parse_address(text: str) -> Endpoint:
    """Parse ``"0100007F:0CEA"`` (host-order hex words, then the port), as
    every ``/proc/net`` table of IP sockets prints it (tcp, udp, v4 and v6).

    :raise ValueError: not 8 or 32 hex digits, a colon and 4 hex digits.
    """
    addr, sep, port = text.partition(":")
    words = _WORDS.get(len(addr))
    if not sep or words is None or len(port) != 4:
        raise ValueError(f"not a /proc/net address: {text!r}")
    raw = words.pack(*(int(addr[i:i + 8], 16) for i in range(0, len(addr), 8)))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return Endpoint(key_host(address_key(family, raw)), int(port, 16))


def parse_row(line: str) -> TcpRow | None:
    """Parse one line of ``/proc/net/tcp{,6}``.

    :return: the row, or ``None`` for the header line.
    :raise ValueError: a line that is neither.
    """
    fields = line.split()
    if fields[:1] == ["sl"]:
        return None
    return _row(fields)


def _row(fields: list[str]) -> TcpRow:
    if len(fields) < 10 or not fields[0].endswith(":"):
        raise ValueError(f"not a /proc/net/tcp row: {' '.join(fields)!r}")
    return TcpRow(
        local=parse_address(fields[1]),
        remote=parse_address(fields[2]),
        state=int(fields[3], 16),
        uid=int(fields[7]),
        inode=int(fields[9]),
    )


def _bare(host: str) -> str:
    """``host`` without its scope id (``/proc`` shows none)."""
    return host.partition("%")[0]


def _port(address: str) -> int:
    return int(address[-4:], 16)


@implementer(ISocketLookup)
class ProcfsLookup:
    """:class:`~stop.interfaces.ISocketLookup` over ``<root>/net/tcp{,6}``.

    Same semantics as the netlink backend: only ESTABLISHED rows whose
    ends equal the query are returned; ``accepted`` is
    :mod:`stop.os.direction`'s rule, its listener signal read from the
    LISTEN rows of the local port
    (:func:`~stop.os.direction.listener_covers`). The files are not a
    snapshot: a socket that changes while the kernel prints them can be
    missed (then: ``None``, i.e. NO-USER).

    :param root: the proc mount (tests point it at fixture files).
    :param rule: the :class:`~stop.os.direction.DirectionRule`.
    """

    name = "procfs"
    #: find() reads whole tables (milliseconds): the answerer calls it in a
    #: worker thread.
    blocking = True

    def __init__(self, root: str = "/proc", rule: DirectionRule | None = None):
        self._root = root
        self._rule = rule or DirectionRule()

    def find(self, local: Endpoint, remote: Endpoint) -> Connection | None:
        """See :meth:`stop.interfaces.ISocketLookup.find`.

        :raise LookupFailed: ``net/tcp`` cannot be read or has a bad row.
        """
        if local.host and host_family(local.host) != host_family(remote.host):
            return None
        texts: dict[str, str] = {}
        found = None
        for name in self._files(remote.host):
            found = self._scan(name, texts, lambda f: self._is_connection(f, local, remote))
            if found is not None:
                break
        if found is None:
            return None
        if local.host:
            # Equal to the query: keep the caller's spelling (scope ids).
            found = TcpRow(local, remote, found.state, found.uid, found.inode)
        port = found.local.port
        listeners = set()
        for name in self._files(found.local.host):
            self._scan(name, texts, lambda f: self._listener(f, port, listeners))
        listening = listener_covers(listeners, _bare(found.local.host), port)
        accepted = self._rule.decide(port, found.remote.port, listening).inbound
        return Connection(
            local=found.local, remote=found.remote, uid=found.uid, inode=found.inode, accepted=accepted
        )

    def close(self) -> None:
        """Nothing to release."""

    # -- scanning ----------------------------------------------------------

    @staticmethod
    def _files(host: str) -> tuple[str, ...]:
        # An IPv4 address may also sit, mapped, on an AF_INET6 socket.
        return ("tcp", "tcp6") if host_family(host) == 4 else ("tcp6",)

    def _read(self, name: str, texts: dict[str, str]) -> str:
        if name not in texts:
            path = os.path.join(self._root, "net", name)
            try:
                with open(path, "rb") as f:
                    texts[name] = f.read().decode("ascii")
            except FileNotFoundError:
                if name != "tcp6":
                    raise LookupFailed(f"procfs: {path} does not exist") from None
                texts[name] = ""  # IPv6 disabled: no v6 sockets
            except (OSError, UnicodeDecodeError) as e:
                raise LookupFailed(f"procfs: cannot read {path}: {e}") from e
        return texts[name]

    def _scan(self, name: str, texts: dict[str, str], match) -> TcpRow | None:
        """The first row of file ``name`` whose split fields satisfy
        ``match`` (which sees raw fields and returns the parsed row or
        None); the file is read only if not in ``texts`` yet."""
        for number, line in enumerate(self._read(name, texts).splitlines()[1:], 2):
            fields = line.split()
            if not fields:
                continue
            try:
                row = match(fields)
            except (ValueError, IndexError) as e:
                raise LookupFailed(f"procfs: {self._root}/net/{name} line {number}: {e}") from e
            if row is not None:
                return row
        return None

    @staticmethod
    def _is_connection(fields: list[str], local: Endpoint, remote: Endpoint) -> TcpRow | None:
        # Cheap checks on the raw text first; parse addresses only then.
        if int(fields[3], 16) != ST_ESTABLISHED:
            return None
        if _port(fields[1]) != local.port or _port(fields[2]) != remote.port:
            return None
        row = _row(fields)
        if row.remote.host != _bare(remote.host) or (local.host and row.local.host != _bare(local.host)):
            return None
        return row

    @staticmethod
    def _listener(fields: list[str], port: int, into: set) -> None:
        """Collect the LISTEN row on ``port`` into ``into`` as (host, port);
        never stops the scan."""
        if int(fields[3], 16) == ST_LISTEN and _port(fields[1]) == port:
            row = _row(fields)
            into.add((row.local.host, row.local.port))


__all__ = ["ProcfsLookup", "TcpRow", "parse_row", "parse_address"]
