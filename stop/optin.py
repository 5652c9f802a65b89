"""The ``~/.ident`` opt-in (spec 3.4): may this user's name be sent to that host?

The file lists hosts, one or more per line, separated by white space:
IPv4/IPv6 addresses, CIDR blocks, or host names (resolved forward, in a
thread, only when the file names one). ``#`` starts a comment. It is read
only if it is a regular file (not a symlink: it is opened with O_NOFOLLOW),
owned by the user, not writable by group or others, and at most 64 KiB.
Anything else is ignored, silently for a missing file and with a log line
otherwise, so a user cannot make the daemon read another user's file.

In the daemon the file is read in a worker thread (a home on NFS can hang)
and what was read is reused for ``account_cache_age`` seconds
(:class:`stop.os.accounts.ThreadCache`): an edit of ``~/.ident`` counts
from then on. A read that takes longer than ``account_timeout`` answers
"not listed" (a token).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from typing import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from stop.interfaces import IOptIn
from stop.model import canonical_host
from stop.os.accounts import MISSING, ThreadCache
from stop.os.common import synchronously

MAX_BYTES = 65536
FILENAME = ".ident"

log = Logger()


def read_entries(home: str, uid: int, log_paths: bool = True) -> list[str]:
    """The entries of ``home/.ident`` for ``uid``, or [] when it is absent or unsafe.

    :param log_paths: name the file in log lines; False names only the uid
        (a home directory usually holds the user name: ``log_users = no``).
    """
    path = os.path.join(home, FILENAME)
    shown = path if log_paths else f"~uid{uid}/{FILENAME}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.info("ignoring {path}: {err}", path=shown, err=os.strerror(e.errno))
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
            log.warn("ignoring {path}: not a regular file owned by uid {uid} and "
                     "writable only by it", path=shown, uid=uid)
            return []
        data = os.read(fd, MAX_BYTES + 1)
    except OSError as e:
        log.info("ignoring {path}: {err}", path=shown, err=os.strerror(e.errno))
        return []
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        log.warn("ignoring {path}: larger than {max} bytes", path=shown, max=MAX_BYTES)
        return []
    entries = []
    for line in data.decode("utf-8", "replace").splitlines():
        entries.extend(line.split("#", 1)[0].split())
    return entries


def _resolve(names: list[str]) -> list[str]:
    """Forward-resolve host names (blocking; runs in a thread)."""
    found = []
    for name in names:
        try:
            for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
                found.append(info[4][0])
        except (OSError, UnicodeError):
            continue
    return found


def _matches(host: str, entries: list[str]) -> tuple[bool, list[str]]:
    """(matched by an address or CIDR entry, the entries that are names)."""
    if not entries:  # most users have no ~/.ident: no address to parse
        return False, []
    addr = ipaddress.ip_address(host)
    names = []
    for entry in entries:
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True, []
        except ValueError:
            names.append(entry)
    return False, names


@implementer(IOptIn)
class OptIn:
    """Answers whether a user opted in to send their name to a host.

    :param resolve: ``names -> Deferred[addresses]`` (default: getaddrinfo
        in a thread).
    :param log_paths: name the file in log lines (``log_users``).
    :param entries: where file contents come from: a
        :class:`~stop.os.accounts.ThreadCache` of (uid, home) -> entries
        (:meth:`from_config`: the daemon's), or None to read the file at
        each call in the calling thread (tests, tools).
    """

    def __init__(self, resolve: Callable[[list[str]], "defer.Deferred"] = None,
                 log_paths: bool = True, entries: ThreadCache | None = None):
        #: Name the file in log lines (``log_users``; a reload may change it).
        self.log_paths = log_paths
        self._resolve = resolve or (lambda names: threads.deferToThread(_resolve, names))
        self._entries = entries

    @classmethod
    def from_config(cls, config, clock, run: Callable[..., defer.Deferred] = synchronously,
                    **kw) -> "OptIn":
        """The daemon's: files read by ``run`` (a worker thread), kept as the
        ``account_cache_*`` settings say, given up on after ``account_timeout``."""
        optin = cls(log_paths=config.log_users, **kw)
        optin._entries = ThreadCache(optin._read, clock, run, config.account_cache_size,
                                     config.account_cache_age, config.account_timeout,
                                     default=[], what="~/.ident")
        return optin

    def _read(self, key: tuple[int, str]) -> list[str]:
        uid, home = key
        return read_entries(home, uid, self.log_paths)

    def allows(self, uid: int, home: str, host: str) -> "defer.Deferred[bool]":
        """Fires True when ``home/.ident``, belonging to ``uid``, lists
        ``host`` (an address literal)."""
        if self._entries is None:
            return self._listed(read_entries(home, uid, self.log_paths), host)
        entries = self._entries.cached((uid, home))
        if entries is MISSING:
            d = self._entries.fetch((uid, home))
            d.addCallback(self._listed, host)
            return d
        return self._listed(entries, host)

    def _listed(self, entries: list[str], host: str) -> "defer.Deferred[bool]":
        matched, names = _matches(host, entries)
        if matched or not names:
            return defer.succeed(matched)
        canonical = canonical_host(host)
        d = self._resolve(names)
        d.addCallback(lambda addrs: canonical in {_canon(a) for a in addrs})
        return d


def _canon(text: str) -> str:
    try:
        return canonical_host(text.split("%", 1)[0])
    except ValueError:
        return ""

