"""Socket lookup through Linux ``sock_diag`` (the ``netlink`` backend).

Both hosts known: one exact ``inet_diag_req_v2`` for the 4-tuple (~8-10 µs
whatever the number of sockets); the address form (``local.host == ""``):
one dump of established sockets filtered in the kernel by the two ports.
Whether the connection was accepted is :mod:`stop.os.direction`'s rule,
fed with one more exact request, the kernel's own listener lookup
(:func:`~stop.os.linux.sockdiag.listener_probe`). pyroute2 makes the same
request ~30-50x slower (docs/lookup.rst has the figures).
"""

from __future__ import annotations

import socket

from zope.interface import implementer

from stop.interfaces import ISocketLookup
from stop.model import Connection, Endpoint
from stop.os.direction import DirectionRule
from stop.os.linux import sockdiag
from stop.os.linux.sockdiag import (TCP_ESTABLISHED, InetSock, SockDiag, decode_inet, host_key,
                                    key_host)


@implementer(ISocketLookup)
class NetlinkLookup:
    """:class:`~stop.interfaces.ISocketLookup` over the sock_diag transport.

    One transport (one netlink socket, opened on first use) serves every
    call; calls may come from several threads.

    :param timeout: seconds a receive may block (see :class:`SockDiag`).
    :param max_datagrams: most datagrams one answer may take.
    :param transport: a :class:`SockDiag` to use instead (tests).
    :param rule: the :class:`~stop.os.direction.DirectionRule` deciding
        ``accepted`` (default: this host's port range).
    """

    name = "netlink"
    #: find() costs microseconds and never blocks: called in the reactor thread.
    blocking = False

    def __init__(self, timeout: float = 2.0, max_datagrams: int = 1 << 14,
                 transport: SockDiag | None = None, rule: DirectionRule | None = None):
        self.transport = transport or SockDiag(timeout, max_datagrams)
        self._rule = rule or DirectionRule()

    # -- ISocketLookup -----------------------------------------------------

    def find(self, local: Endpoint, remote: Endpoint) -> Connection | None:
        """See :meth:`stop.interfaces.ISocketLookup.find`.

        :raise stop.errors.SockDiagFailed: the kernel refused the request or
            the socket failed (a ``LookupFailed``); ``ValueError`` for a host
            that is not an address literal.
        """
        rkey, rif = host_key(remote.host)
        if local.host:
            lkey, lif = host_key(local.host)
            if len(lkey) != len(rkey):
                return None  # an IPv4 and an IPv6 end: no such connection
            ifindex = lif or rif
            hit = self.established(lkey, local.port, rkey, remote.port, ifindex)
            if hit is None:
                return None
            # The four-tuple was checked equal: keep the caller's spelling
            # (scope ids included).
            found_local = local
        else:
            ifindex = 0
            hit = self._by_ports(local.port, rkey, remote.port)
            if hit is None:
                return None
            lkey = hit.src
            found_local = Endpoint(key_host(lkey), local.port)
        listening = self.listening(lkey, local.port, ifindex)
        accepted = self._rule.decide(local.port, remote.port, listening).inbound
        return Connection(local=found_local, remote=remote, uid=hit.uid, inode=hit.inode,
                          accepted=accepted)

    def close(self) -> None:
        """Close the netlink socket, if open. Idempotent."""
        self.transport.close()

    # -- the questions -----------------------------------------------------

    def probe(self) -> None:
        """Make one exact request and one listener probe, to see that this
        kernel answers both (used by ``lookup = auto``).

        :raise stop.errors.SockDiagFailed: it does not.
        """
        loopback = b"\x7f\0\0\x01"
        self.established(loopback, 0, loopback, 0, 0)
        self.listening(loopback, 0)

    def established(self, lkey: bytes, lport: int, rkey: bytes, rport: int,
                    ifindex: int = 0) -> InetSock | None:
        """The ESTABLISHED socket of exactly this 4-tuple (keys from
        :func:`~stop.os.linux.sockdiag.host_key`), or None (the LISTEN
        trap and TIME_WAIT sockets excluded: see
        :func:`~stop.os.linux.sockdiag.exact`)."""
        hit = sockdiag.exact(self.transport, lkey, lport, rkey, rport, ifindex)
        return hit if hit is not None and hit.state == TCP_ESTABLISHED else None

    def listening(self, lkey: bytes, lport: int, ifindex: int = 0) -> bool:
        """Whether a TCP listener would accept on (``lkey``, ``lport``) now
        (:func:`~stop.os.linux.sockdiag.listening`)."""
        return sockdiag.listening(self.transport, lkey, lport, ifindex)

    def exact_raw(self, local: Endpoint, remote: Endpoint) -> list[InetSock]:
        """What the kernel answers to the exact request of a 4-tuple, with
        no filtering (tests and diagnostics: shows the LISTEN trap)."""
        lkey, lif = host_key(local.host)
        rkey, rif = host_key(remote.host)
        return self.transport.request(
            sockdiag.inet_exact(lkey, local.port, rkey, remote.port, lif or rif), False, decode_inet)

    def _by_ports(self, lport: int, rkey: bytes, rport: int) -> InetSock | None:
        """The first ESTABLISHED socket with these ports and remote address,
        on any local address (the address form)."""
        bc = sockdiag.port_filter(sport=lport, dport=rport)
        # An IPv4 address may also sit, mapped, on an AF_INET6 socket.
        families = (socket.AF_INET, socket.AF_INET6) if len(rkey) == 4 else (socket.AF_INET6,)
        for family in families:
            dump = sockdiag.inet_dump(family, 1 << TCP_ESTABLISHED, bc)
            for r in self.transport.request(dump, True, decode_inet):
                if r.state == TCP_ESTABLISHED and r.sport == lport and r.dport == rport \
                        and r.dst == rkey:
                    return r
        return None


__all__ = ["NetlinkLookup"]
