"""Per-record system facts for SV records (spec section 5): host name,
boot time, OS name/release/version/build and the utmp entries of the users
named in the record.

utmp is read through ``psutil.users()``, which parses the real utmp file
(``getutxent`` on BSD/macOS, the C struct on Linux): no program is run.
"""

from __future__ import annotations

import platform
import socket
from typing import Iterable

import psutil

from stop.os.common import SYSTEM_FIELDS, reason_of, text


def _os_version(system: str) -> str | None:
    """The OS's product version: PRETTY_NAME from os-release (Linux, the
    BSDs), the product version on macOS; None when unknown."""
    if system == "Darwin":
        return platform.mac_ver()[0] or None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("PRETTY_NAME="):
                        return line.split("=", 1)[1].strip().strip('"')
        except OSError:
            continue
    return None


def utmp_entries(users: Iterable[str]) -> list[dict]:
    """The utmp login entries of ``users`` (login names), oldest first:
    ``{"name", "terminal", "host", "started", "pid"}`` (``pid`` None where
    the platform has none)."""
    wanted = set(users)
    entries = []
    for u in psutil.users():
        if u.name in wanted:
            entries.append({"name": text(u.name), "terminal": u.terminal and text(u.terminal),
                            "host": u.host and text(u.host), "started": u.started,
                            "pid": getattr(u, "pid", None)})
    return sorted(entries, key=lambda e: (e["started"], e["name"], e["terminal"] or ""))


def system_info(fields: Iterable[str] = SYSTEM_FIELDS, users: Iterable[str] = ()) -> dict:
    """The system part of an SV record, restricted to ``fields`` (names from
    ``stop.os.common.SYSTEM_FIELDS``).

    :param users: login names in the record; their utmp entries are saved.
    :return: JSON-able dict; what could not be read is named under
        ``"unavailable"`` with a reason instead of raising.
    """
    fields = set(fields)
    out: dict = {}
    missing: dict[str, str] = {}
    if "hostname" in fields:
        out["hostname"] = socket.gethostname()
    if "boot_time" in fields:
        try:
            out["boot_time"] = psutil.boot_time()
        except Exception as exc:  # psutil raises RuntimeError on odd /proc
            missing["boot_time"] = reason_of(exc)
    if "os" in fields:
        u = platform.uname()
        # "version" is the OS's own (distribution, macOS product version);
        # "build" the kernel's build string (number and date, uname -v).
        out["os"] = {"name": u.system, "release": u.release, "version": _os_version(u.system),
                     "build": u.version, "machine": u.machine}
    if "utmp" in fields:
        try:
            out["utmp"] = utmp_entries(users)
        except Exception as exc:  # a missing or unreadable utmp is normal
            missing["utmp"] = reason_of(exc)
    if missing:
        out["unavailable"] = missing
    return out
