"""Plain value types shared by every layer: endpoints and connections.

Addresses are text in their canonical form (``ipaddress`` spelling); an
IPv4-mapped IPv6 address is always turned into its IPv4 form at the edge
(:func:`canonical_host`), so the rest of the code compares plain strings.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


def canonical_host(host: str) -> str:
    """Return ``host`` (an IPv4 or IPv6 literal) in canonical spelling.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) become IPv4, since the
    spec treats them as the same host. A scope id (``fe80::1%eth0``) is kept.
    Raises ValueError for anything that is not an address literal.
    """
    scope = ""
    if "%" in host:
        host, scope = host.split("%", 1)
        scope = "%" + scope
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr) + scope


def host_family(host: str) -> int:
    """4 or 6: the IP version of a canonical address literal."""
    return 6 if ":" in host else 4


@dataclass(frozen=True)
class Endpoint:
    """One end of a TCP connection: an address literal and a port.

    ``host`` is a canonical address (see :func:`canonical_host`), or ``""``
    to mean "any address of this host" (only in a lookup's local end, for the
    address form of a request).
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host or '*'}:{self.port}"

    def as_dict(self) -> dict:
        return {"address": self.host, "port": self.port}


@dataclass(frozen=True)
class Connection:
    """An established TCP connection as the kernel reports it.

    ``uid`` owns the socket; ``inode`` is the socket inode (0 when unknown),
    the key the process walk uses to find the process holding it;
    ``accepted`` is True when the local port is also a listening port, i.e.
    this host did not initiate the connection (spec 3.2).
    """

    local: Endpoint
    remote: Endpoint
    uid: int
    inode: int
    accepted: bool
