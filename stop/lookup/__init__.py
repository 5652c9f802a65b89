"""Socket lookup backends (:class:`stop.interfaces.ISocketLookup`) and the
selector that picks one by name.

- ``netlink``: Linux sock_diag, an exact 4-tuple request (microseconds).
- ``procfs``: Linux ``/proc/net/tcp{,6}`` (milliseconds: the fallback).
- ``auto``: netlink if this kernel answers a probe, else procfs.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from stop.errors import ConfigError, LookupFailed
from stop.interfaces import ISocketLookup
from stop.lookup.netlink import NetlinkLookup
from stop.lookup.procfs import ProcfsLookup

log = Logger()

#: Backend name -> factory taking no arguments.
BACKENDS: dict[str, Callable[[], ISocketLookup]] = {
    "netlink": NetlinkLookup,
    "procfs": ProcfsLookup,
}


def _auto() -> ISocketLookup:
    netlink = NetlinkLookup()
    try:
        netlink.probe()
    except LookupFailed as e:
        netlink.close()
        log.warn("socket lookup: using procfs, the slow fallback, because netlink failed its probe: {why}", why=e)
        return ProcfsLookup()
    log.info("socket lookup: using netlink (sock_diag answered the probe)")
    return netlink


def make_lookup(name: str = "auto") -> ISocketLookup:
    """Build the socket lookup backend called ``name``.

    :param name: ``"auto"`` or a key of :data:`BACKENDS`.
    :return: a fresh backend (its kernel handles open lazily, except that
        ``auto`` has already made one probe request).
    :raise ConfigError: unknown name; the message lists the valid ones.
    """
    if name == "auto":
        return _auto()
    try:
        factory = BACKENDS[name]
    except KeyError:
        choices = ", ".join(["auto", *sorted(BACKENDS)])
        raise ConfigError(f"lookup: unknown socket lookup backend {name!r}; choose one of: {choices}") from None
    return factory()
