"""Per-record system facts for SV records (spec section 5): host name,
boot time, OS name/release/version/build and the utmp entries of the users
named in the record.

utmp is read through ``psutil.users()``, which parses the real utmp file
(``getutxent`` on BSD/macOS, the C struct on Linux): no program is run.

:class:`SystemInfo` keeps the two facts that cost a file read each and
seldom change (docs/sv.rst, "System facts"): the boot time, re-read when
the wall clock moved against the time since boot (a clock step) and at
least every ``max_age`` seconds; the OS version from ``os-release``,
re-read when the file's identity or modification time changes (an
upgrade replaces it).
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
from typing import Callable, Iterable

import psutil

from stop.os.common import SYSTEM_FIELDS, reason_of, text


#: Where the OS version is read, in order (os-release(5)).
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")


def _pretty_name(path: str) -> str | None:
    """PRETTY_NAME of the os-release file ``path`` (None when it has none).

    :raise OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return None


def _read_version(paths: tuple[str, ...]) -> tuple[str | None, int]:
    """(PRETTY_NAME of the first of ``paths`` that has one, how many of
    ``paths`` were looked at to learn it)."""
    for i, path in enumerate(paths):
        try:
            name = _pretty_name(path)
        except OSError:
            continue
        if name is not None:
            return name, i + 1
    return None, len(paths)


def _os_version(system: str, paths: tuple[str, ...] = OS_RELEASE) -> str | None:
    """The OS's product version: PRETTY_NAME from os-release (Linux, the
    BSDs), the product version on macOS; None when unknown."""
    if system == "Darwin":
        return platform.mac_ver()[0] or None
    return _read_version(paths)[0]


def _since_boot() -> float:
    """Seconds since boot on a clock that the wall clock's steps do not
    move (suspend included where the platform counts it)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class SystemInfo:
    """:meth:`collect` is :func:`system_info` with the boot time and the OS
    version kept between records while they cannot have changed.

    The boot time is the kernel's (``psutil.boot_time()``: ``btime`` of
    ``/proc/stat`` on Linux), which the kernel computes as "wall clock now
    minus time since boot": it moves when the wall clock is stepped (an NTP
    sync after the daemon started). It is re-read when ``wall() -
    since_boot()`` moved by more than ``step`` seconds since the last read,
    and at least every ``max_age`` seconds. The OS version is re-read when
    one of the os-release files looked at (up to the one it came from) has
    another device, inode, size or modification time (one ``stat`` per
    record instead of a read): package upgrades replace the file; a file
    rewritten in place within one tick of the file system's clock, to the
    same size, would be missed. Thread-safe (walks run in a thread pool).

    :param boot_time: reads the boot time (seconds since the epoch;
        default ``psutil.boot_time``).
    :param wall, since_boot, clock: the wall clock, the time since boot and
        a monotonic clock, in seconds (tests pass fakes).
    :param paths: the os-release files, in order.
    """

    def __init__(self, max_age: float = 60.0, step: float = 0.5,
                 boot_time: Callable[[], float] | None = None,
                 wall: Callable[[], float] = time.time,
                 since_boot: Callable[[], float] = _since_boot,
                 clock: Callable[[], float] = time.monotonic,
                 paths: tuple[str, ...] = OS_RELEASE):
        self.max_age, self.step = max_age, step
        self._boot_time = boot_time or (lambda: psutil.boot_time())
        self._wall, self._since_boot, self._clock = wall, since_boot, clock
        self._paths = paths
        self._lock = threading.Lock()
        self._boot: tuple[float, float, float] | None = None  # (value, offset, read at)
        self._os: tuple[int, tuple, str | None] | None = None  # (files looked at, their identity, version)
        #: How many times each fact was read (tests).
        self.reads = {"boot_time": 0, "os_version": 0}

    def boot_time(self) -> float:
        """The kernel's boot time, seconds since the epoch.

        :raise Exception: as ``psutil.boot_time()`` (not kept then).
        """
        offset = self._wall() - self._since_boot()
        now = self._clock()
        with self._lock:
            got = self._boot
            if (got is not None and abs(offset - got[1]) <= self.step
                    and now - got[2] <= self.max_age):
                return got[0]
        value = self._boot_time()
        with self._lock:
            self._boot = (value, offset, now)
            self.reads["boot_time"] += 1
        return value

    def _identity(self, paths: tuple[str, ...]) -> tuple:
        """(dev, ino, size, mtime_ns) of each of ``paths`` (None: missing)."""
        out = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def os_version(self, system: str) -> str | None:
        """:func:`_os_version`, re-read only when one of the os-release
        files it looked at (up to the one it took the version from)
        changed."""
        if system == "Darwin":
            return _os_version(system)
        with self._lock:
            got = self._os
        if got is not None:
            used, key, version = got
            if self._identity(self._paths[:used]) == key:
                return version
        # Identity first: a change while reading is seen by the next call.
        key = self._identity(self._paths)
        version, used = _read_version(self._paths)
        with self._lock:
            self._os = (used, key[:used], version)
            self.reads["os_version"] += 1
        return version

    def collect(self, fields: Iterable[str] = SYSTEM_FIELDS, users: Iterable[str] = ()) -> dict:
        """See :func:`system_info`."""
        return system_info(fields, users, self)


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


def system_info(fields: Iterable[str] = SYSTEM_FIELDS, users: Iterable[str] = (),
                facts: SystemInfo | None = None) -> dict:
    """The system part of an SV record, restricted to ``fields`` (names from
    ``stop.os.common.SYSTEM_FIELDS``).

    :param users: login names in the record; their utmp entries are saved.
    :param facts: where the boot time and OS version are kept between
        records (None: both read now).
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
            out["boot_time"] = (facts.boot_time() if facts is not None
                                else psutil.boot_time())
        except Exception as exc:  # psutil raises RuntimeError on odd /proc
            missing["boot_time"] = reason_of(exc)
    if "os" in fields:
        u = platform.uname()
        # "version" is the OS's own (distribution, macOS product version);
        # "build" the kernel's build string (number and date, uname -v).
        version = facts.os_version(u.system) if facts is not None else _os_version(u.system)
        out["os"] = {"name": u.system, "release": u.release, "version": version,
                     "build": u.version, "machine": u.machine}
    if "utmp" in fields:
        try:
            out["utmp"] = utmp_entries(users)
        except Exception as exc:  # a missing or unreadable utmp is normal
            missing["utmp"] = reason_of(exc)
    if missing:
        out["unavailable"] = missing
    return out
