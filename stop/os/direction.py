"""One answer to "did this host accept that TCP connection?" (spec 3.2, 5).

Kernels do not record which side opened a connection. This module decides
it from the signals a host gives, in this order, and says which one
decided (``direction_by``):

``listener``
    A TCP listener would accept on the connection's local address and port
    now (the backend asks the kernel's own listener lookup where it can:
    a listener on that address, on the wildcard of the *same* family, or a
    dual-stack ``::`` socket for IPv4; never a ``0.0.0.0`` listener for an
    IPv6 address): **inbound**.
``ephemeral-range``
    The local port is outside this host's ephemeral port range
    (``net.ipv4.ip_local_port_range``, which IPv6 shares) while the remote
    port is inside it: **inbound** (a service port, reached from a
    client's ephemeral port); the converse: **outbound**.
``none``
    No signal decides: **unknown**. Both ports in the range (a service on
    an ephemeral port, e.g. a relay listening on a port it got from
    ``bind(0)``), or both outside (an outbound connection from a fixed low
    source port to a service port).

The first signal that decides wins. It catches relays that close their
listener after accepting (``socat TCP-LISTEN`` without ``fork``,
traditional ``nc -l``), which the listener alone calls outbound. Users:
the socket lookup (``accepted``: NO-USER for an inbound connection), the
process walk (each established TCP socket's ``direction`` and
``direction_by``) and recursion (targets: inbound and unknown). docs/sv.rst
("Direction") has the rule and its limits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Callable, Container, NamedTuple, Optional

INBOUND = "inbound"
OUTBOUND = "outbound"
UNKNOWN = "unknown"

#: Names of the signals (``direction_by``), in the order they are tried.
LISTENER = "listener"
EPHEMERAL_RANGE = "ephemeral-range"
NONE = "none"
SIGNALS = (LISTENER, EPHEMERAL_RANGE, NONE)

#: Where Linux keeps the ephemeral range (per network namespace).
LINUX_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
#: sysctl names of the range on other systems (first, last).
_SYSCTL_RANGE = {
    "freebsd": ("net.inet.ip.portrange.first", "net.inet.ip.portrange.last"),
    "darwin": ("net.inet.ip.portrange.first", "net.inet.ip.portrange.last"),
    "openbsd": ("net.inet.ip.porthifirst", "net.inet.ip.porthilast"),
    "netbsd": ("net.inet.ip.anonportmin", "net.inet.ip.anonportmax"),
}


class Direction(NamedTuple):
    """A decision: ``direction`` is ``inbound``, ``outbound`` or
    ``unknown``; ``by`` names the signal that decided (:data:`SIGNALS`)."""

    direction: str
    by: str

    @property
    def inbound(self) -> bool:
        """True when this host accepted the connection (the lookup's
        ``accepted``)."""
        return self.direction == INBOUND


_BY_LISTENER = Direction(INBOUND, LISTENER)
_IN_BY_RANGE = Direction(INBOUND, EPHEMERAL_RANGE)
_OUT_BY_RANGE = Direction(OUTBOUND, EPHEMERAL_RANGE)
_UNDECIDED = Direction(UNKNOWN, NONE)


def read_port_range(platform: str = sys.platform) -> Optional[tuple[int, int]]:
    """This host's ephemeral port range (first, last), or None when it
    cannot be read. Linux: one small ``/proc`` read; BSDs and macOS: one
    ``sysctl`` run (call it at start-up, not per query)."""
    if platform.startswith("linux"):
        try:
            with open(LINUX_RANGE, "rb") as f:
                first, last = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            return None
        return (first, last) if 0 < first <= last <= 65535 else None
    names = next((v for k, v in _SYSCTL_RANGE.items() if platform.startswith(k)), None)
    if names is None:
        return None
    try:
        out = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True,
                             timeout=2, check=True).stdout.split()
        first, last = int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return (first, last) if 0 < first <= last <= 65535 else None


class PortRange:
    """The ephemeral range, read once and again at most every ``max_age``
    seconds (an admin may change it; on Linux a read costs microseconds).

    :param read: ``() -> (first, last) | None``.
    :param max_age: seconds a reading is kept; None: forever (systems
        where reading it runs a program).
    :param clock: monotonic seconds (tests).
    """

    def __init__(self, read: Callable[[], Optional[tuple[int, int]]] = read_port_range,
                 max_age: Optional[float] = 60.0, clock: Callable[[], float] = time.monotonic):
        if read is read_port_range and not sys.platform.startswith("linux"):
            max_age = None
        self._read, self._max_age, self._clock = read, max_age, clock
        self._value = read()
        self._at = clock()

    def get(self) -> Optional[tuple[int, int]]:
        if self._max_age is not None and self._clock() - self._at > self._max_age:
            self._value, self._at = self._read(), self._clock()
        return self._value


class DirectionRule:
    """Decides a connection's direction from the signals (module docstring).

    :param ports: the ephemeral range: a :class:`PortRange`, a fixed
        (first, last) tuple, or None for "unknown here" (the range signal
        then never decides). Default: this host's, re-read every minute.
    """

    def __init__(self, ports=PortRange):
        if ports is PortRange:
            ports = PortRange()
        if ports is None or isinstance(ports, tuple):
            fixed = ports
            self._range: Callable[[], Optional[tuple[int, int]]] = lambda: fixed
        else:
            self._range = ports.get

    @property
    def port_range(self) -> Optional[tuple[int, int]]:
        """The ephemeral range in use now (None: unknown)."""
        return self._range()

    def decide(self, local_port: int, remote_port: int,
               listening: Optional[bool]) -> Direction:
        """The direction of an established TCP connection.

        :param listening: whether a listener would accept on the local
            address and port now (None: could not be asked, the signal is
            skipped).
        """
        if listening:
            return _BY_LISTENER
        span = self._range()
        if span is not None:
            first, last = span
            local_in = first <= local_port <= last
            if local_in != (first <= remote_port <= last):
                return _OUT_BY_RANGE if local_in else _IN_BY_RANGE
        return _UNDECIDED


def listener_covers(listeners: Container[tuple[str, int]], address: str, port: int) -> bool:
    """The listener signal for backends that see listeners as a table
    (``/proc/net/tcp``, psutil) instead of asking the kernel.

    :param listeners: (canonical bound address, port) of every TCP listener
        (v4-mapped addresses folded to IPv4, as :func:`stop.model.canonical_host`).
    :param address: the connection's local address, canonical, no scope.
    :return: True when a listener is bound to ``address``, to ``::`` (for an
        IPv4 address too: tables do not show ``IPV6_V6ONLY``, so a v6-only
        ``::`` listener is taken as dual-stack, erring towards inbound), or
        to ``0.0.0.0`` when ``address`` is IPv4 (never for an IPv6 one).
    """
    if (address, port) in listeners or ("::", port) in listeners:
        return True
    return ":" not in address and ("0.0.0.0", port) in listeners


__all__ = ["Direction", "DirectionRule", "PortRange", "read_port_range", "listener_covers",
           "INBOUND", "OUTBOUND", "UNKNOWN", "LISTENER", "EPHEMERAL_RANGE", "NONE", "SIGNALS"]
