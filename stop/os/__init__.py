"""The OS layer: everything that asks the operating system about sockets,
processes and accounts, behind the interfaces of :mod:`stop.interfaces`.

Where things are:

* :mod:`stop.os.linux.sockdiag`: the one sock_diag (netlink) transport,
  its request builders and address decoder;
* :mod:`stop.os.linux.lookup`: the ``netlink`` socket lookup;
* :mod:`stop.os.linux.procnet`: the ``procfs`` socket lookup
  (``/proc/net/tcp``, the fallback) and the ``/proc/net`` address decoder;
* :mod:`stop.os.linux.procfs` (+ :mod:`stop.os.linux.fdindex`): the
  ``procfs`` process inspector of the SV walk;
* :mod:`stop.os.portable`: the ``psutil`` socket lookup and process
  inspector (BSDs, macOS, Solaris; also runs on Linux);
* :mod:`stop.os.direction`: the one answer to "inbound or outbound";
* :mod:`stop.os.common`: field names and helpers the inspectors share.

The selectors below build a backend from the configuration, with the same
signature as every other backend factory (``make_X(config, reactor)``); a
name that is not built in is a site plugin's (stop-plugins(7)).
"""

from __future__ import annotations

import sys

from twisted.logger import Logger

from stop import plugins
from stop.errors import ConfigError, LookupFailed
from stop.os.common import PROCESS_FIELDS, SYSTEM_FIELDS

log = Logger()

_LINUX = sys.platform.startswith("linux")


def _netlink(config, reactor):
    from stop.os.linux.lookup import NetlinkLookup
    return NetlinkLookup()


def _procfs_lookup(config, reactor):
    if not _LINUX:
        raise ConfigError("lookup = procfs needs Linux; use psutil")
    from stop.os.linux.procnet import ProcfsLookup
    return ProcfsLookup()


def _psutil_lookup(config, reactor):
    from stop.os.portable import PsutilLookup
    return PsutilLookup()


def _auto_lookup(config, reactor):
    """netlink on Linux when it answers a probe, else procfs there; psutil
    elsewhere. The choice is logged."""
    if not _LINUX:
        log.info("socket lookup: using psutil (not Linux)")
        return _psutil_lookup(config, reactor)
    netlink = _netlink(config, reactor)
    try:
        netlink.probe()
    except LookupFailed as e:
        netlink.close()
        log.warn("socket lookup: using procfs, the slow fallback, because netlink failed "
                 "its probe: {why}", why=e)
        return _procfs_lookup(config, reactor)
    log.info("socket lookup: using netlink (sock_diag answered the probe)")
    return netlink


#: Built-in socket lookups by name (the ``lookup`` setting).
LOOKUPS = {"auto": _auto_lookup, "netlink": _netlink, "procfs": _procfs_lookup,
           "psutil": _psutil_lookup}


def _procfs_inspector(config, reactor):
    if not _LINUX:
        raise ConfigError("process_backend = procfs needs Linux; use psutil")
    from stop.os.linux.procfs import ProcfsInspector
    return ProcfsInspector(index_max_age=config.index_max_age)


def _psutil_inspector(config, reactor):
    from stop.os.portable import PsutilInspector
    return PsutilInspector()


def _auto_inspector(config, reactor):
    return (_procfs_inspector if _LINUX else _psutil_inspector)(config, reactor)


#: Built-in process inspectors by name (the ``process_backend`` setting).
INSPECTORS = {"auto": _auto_inspector, "procfs": _procfs_inspector, "psutil": _psutil_inspector}


def make_lookup(config, reactor):
    """The socket lookup ``config.lookup`` names: ``auto`` (netlink on
    Linux, procfs there when netlink fails its probe, psutil elsewhere),
    ``netlink``, ``procfs``, ``psutil``, or a site plugin's name.

    :return: an :class:`stop.interfaces.ISocketLookup` provider.
    :raise ConfigError: no such backend or plugin, or one that cannot run here.
    """
    return plugins.make("lookup", LOOKUPS, config, reactor)


def make_inspector(config, reactor):
    """The process inspector ``config.process_backend`` names: ``auto``
    (procfs on Linux, psutil elsewhere), ``procfs``, ``psutil``, or a site
    plugin's name. procfs shares its inode index for
    ``config.index_max_age`` seconds.

    :return: an :class:`stop.interfaces.IProcessInspector` provider.
    :raise ConfigError: no such backend or plugin, or one that cannot run here.
    """
    return plugins.make("process_backend", INSPECTORS, config, reactor)


__all__ = ["make_lookup", "make_inspector", "LOOKUPS", "INSPECTORS", "PROCESS_FIELDS",
           "SYSTEM_FIELDS"]
