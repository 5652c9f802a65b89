"""The daemon's log observers: syslog (``syslog = yes``) and twistd's own
text lines, made cheaper for the one line every query writes.

Syslog: send the daemon's log events to the local syslog daemon.

Under systemd the journal already gets everything twistd prints
(``--logfile=-``); this observer is for sites that also want the events in
syslog (files under /var/log, a central log host). It writes RFC 3164
datagrams, as glibc's ``syslog(3)`` does, to a UNIX datagram socket
(``/dev/log`` by default), without ever blocking the reactor: a datagram that
cannot be sent at once is dropped and counted, and the next event tries
again.

:func:`file_observer` makes twistd's log file observer for ``--logfile``,
kept by the daemon so that SIGHUP can reopen the file. :class:`TextLogObserver`
writes exactly twistd's lines (those of ``textFileLogObserver``) at a
fraction of the CPU for a plain-text event, the lines of a reactor turn in
one write at its end, and :class:`QuickLogger` emits
the same events as ``Logger`` without its level check by iteration: one line
per query is on the hot path (bench/README.rst, ``profile_answer.py``).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from typing import IO, Any, Optional

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    formatTime,
    globalLogPublisher,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.compat import ioType
from twisted.python.logfile import LogFile
from zope.interface import implementer

from stop.errors import ConfigError

#: syslog(3) facility names and their numbers (RFC 5424 section 6.2.1).
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5,
    "lpr": 6, "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}

#: Twisted log levels as syslog severities.
SEVERITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

#: Longest datagram sent, in bytes; longer messages are cut (a traceback
#: can be long; the journal keeps the whole text).
MAX_DATAGRAM = 8192

DEFAULT_SOCKET = "/dev/log"


def facility_number(name: str) -> int:
    """The number of syslog facility ``name`` (``daemon``, ``local0``...).

    :raise ConfigError: an unknown name.
    """
    try:
        return FACILITIES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"syslog_facility: {name!r} is not one of {', '.join(FACILITIES)}") from None


def format_datagram(event: dict, facility: int, ident: str, pid: int) -> bytes:
    """One RFC 3164 datagram for a twisted.logger ``event``:
    ``<PRI>Mmm dd hh:mm:ss ident[pid]: text`` (local time, as syslog(3)).

    The text is :func:`formatEvent` plus the traceback of ``log_failure``
    when there is one; the result is at most :data:`MAX_DATAGRAM` bytes.
    """
    level = event.get("log_level", LogLevel.info)
    severity = SEVERITIES.get(level, 6)
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text = f"{text}\n{failure.getTraceback()}"
        except Exception:  # a broken Failure must not lose the message
            pass
    when = time.localtime(event.get("log_time") or time.time())
    # "%e"-style day: space-padded, as RFC 3164 wants.
    stamp = time.strftime("%b ", when) + f"{when.tm_mday:2d}" + time.strftime(" %H:%M:%S", when)
    head = f"<{facility * 8 + severity}>{stamp} {ident}[{pid}]: "
    data = (head + text.rstrip("\n")).encode("utf-8", "replace")
    return data[:MAX_DATAGRAM]


@implementer(ILogObserver)
class SyslogObserver:
    """A log observer writing each event as one datagram to ``path``.

    Never raises and never blocks: when the socket is missing, refuses or
    is full, the event is dropped and :attr:`dropped` counts it; the socket
    is reconnected on the next event.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, facility: str = "daemon",
                 ident: str = "stopd") -> None:
        self.path = path
        self.facility = facility_number(facility)
        self.ident = ident
        self.dropped = 0
        self._sock: Optional[socket.socket] = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def __call__(self, event: dict) -> None:
        try:
            data = format_datagram(event, self.facility, self.ident, os.getpid())
            if self._sock is None:
                self._sock = self._connect()
            self._sock.send(data)
        except OSError as e:
            self.dropped += 1
            # A restarted syslog daemon makes a new socket: reconnect next
            # time. A full queue (EAGAIN) keeps the connection.
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self.close()
        except Exception:
            # An observer that raises is removed by twisted.logger: never.
            self.dropped += 1

    def close(self) -> None:
        """Close the socket (idempotent); the next event reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SyslogService(Service):
    """Adds a :class:`SyslogObserver` to ``publisher`` while running.

    Events below ``level`` (default info) are not sent.
    """

    def __init__(self, observer: SyslogObserver, level: LogLevel = LogLevel.info,
                 publisher=globalLogPublisher) -> None:
        self.observer = observer
        self.publisher = publisher
        predicate = LogLevelFilterPredicate(defaultLogLevel=level)
        self._filtered = FilteringLogObserver(observer, [predicate])

    def startService(self) -> None:
        Service.startService(self)
        self.publisher.addObserver(self._filtered)

    def stopService(self) -> None:
        self.publisher.removeObserver(self._filtered)
        self.observer.close()
        return Service.stopService(self)


#: Every log level; :meth:`QuickLogger.emit` checks a level against this set.
_LEVELS = frozenset(LogLevel.iterconstants())

#: Above this fraction of a second, ``datetime.fromtimestamp`` may round a
#: time up to the next second: :class:`TextLogObserver` does not reuse the
#: stamp of the second then.
_LAST_SAFE_FRACTION = 0.999999


class QuickLogger(Logger):
    """A ``twisted.logger.Logger`` whose :meth:`emit` builds the same event
    as ``Logger.emit`` and hands it to the same observer, without
    ``Logger.emit``'s check of the level against a fresh iteration over
    every ``LogLevel`` (about 2 µs, once per query). An unknown level still
    goes through ``Logger.emit``, which reports it."""

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            Logger.emit(self, level, format, **kwargs)
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)


class _Pending:
    """The file Twisted's own text observer writes into (for the events
    :class:`TextLogObserver` leaves to it): its lines join the others in
    the observer's pending list, in order."""

    def __init__(self, pending: list) -> None:
        self.write = pending.append

    def flush(self) -> None:
        pass


#: Events at these levels are written at once, with every line before them.
_URGENT = frozenset((LogLevel.error, LogLevel.critical))


@implementer(ILogObserver)
class TextLogObserver:
    """Writes the lines ``twisted.logger.textFileLogObserver(out,
    time_format)`` writes (twistd's ``TIME [namespace#level] text``), byte
    for byte, with less CPU for the common event: a format that is plain
    text (no ``{}`` field, as the daemon's per-query line, which is made
    before it is logged) is written without Twisted's format parser, and
    the time stamp is made once per second. Events with fields, a failure,
    a ``log_system`` or flattened fields go through Twisted's own formatter.

    With a running ``reactor``, the lines of one reactor turn are written
    together, in one ``write`` (and ``flush``) at the end of the turn,
    before the reactor waits for the next event: a turn that answers many
    queries makes one system call for their lines, and the replies go out
    before their lines are written. Lines are written at once (with every
    line still pending before them) when the reactor is not running
    (before it starts, after it stopped: twistd's last lines), for events
    at level error or critical (a crash report), and on :meth:`flush`; the
    reactor's "after shutdown" event flushes too. A process killed outright
    (SIGKILL) loses at most the lines of the turn it was in.

    :param out: a text or binary file (binary gets UTF-8), flushed after
        every write, as Twisted's ``FileLogObserver`` does.
    :param reactor: an IReactorTime and IReactorCore; None (or an object
        without ``running``, such as a ``Clock``): every line is written at
        once, as Twisted's observer does.
    """

    def __init__(self, out: IO[Any], time_format: Optional[str] = timeFormatRFC3339,
                 reactor=None) -> None:
        self._pending: list[str] = []
        self._full = textFileLogObserver(_Pending(self._pending), time_format)
        self._out = out
        self._encoding = None if ioType(out) is str else "utf-8"
        self._reactor = reactor
        self._scheduled = False
        if reactor is not None and hasattr(reactor, "addSystemEventTrigger"):
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        # A stamp per second: only for formats without fractions of one.
        self._time_format = time_format
        self._per_second = time_format is not None and "%f" not in time_format
        self._second: Optional[int] = None
        self._stamp = ""

    def __call__(self, event: dict) -> None:
        text = event.get("log_format")
        when = event.get("log_time")
        level = event.get("log_level")
        if (text.__class__ is not str or not text or "{" in text or "}" in text
                or when.__class__ is not float or not self._per_second or when < 0
                or "log_failure" in event or "log_system" in event
                or "log_flattened" in event):
            self._full(event)
        else:
            second = int(when)
            if second == self._second and when - second < _LAST_SAFE_FRACTION:
                stamp = self._stamp
            else:
                stamp = formatTime(when, self._time_format)
                if when - second < _LAST_SAFE_FRACTION:
                    self._second, self._stamp = second, stamp
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
            text = text.replace("\n", "\n\t")
            self._pending.append(f"{stamp} [{system}] {text}\n")
        reactor = self._reactor
        if reactor is None or level in _URGENT or not getattr(reactor, "running", False):
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write every pending line now (one ``write``, then ``flush``)."""
        pending = self._pending
        if not pending:
            return
        data = "".join(pending)
        pending.clear()
        self._out.write(data if self._encoding is None else data.encode(self._encoding))
        self._out.flush()


def file_observer(path: str, reactor) -> tuple[LogFile, "TextLogObserver"]:
    """twistd's log file and observer for ``--logfile=path``, made as twistd
    makes them (a :class:`LogFile` that twistd rotates at 1 MB and on
    SIGUSR1, the lines of ``textFileLogObserver``: :class:`TextLogObserver`,
    written once per reactor turn), but kept by the daemon, which reopens
    the file on SIGHUP (after logrotate moved it; flush the observer first).
    SIGUSR1 writes the pending lines to the file before it is rotated."""
    log_file = LogFile.fromFullPath(path)
    observer = TextLogObserver(log_file, reactor=reactor)

    def rotate() -> None:
        observer.flush()
        log_file.rotate()
    if not signal.getsignal(signal.SIGUSR1):  # as twistd: unless someone else took it
        signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(rotate))
    return log_file, observer


def syslog_service(config) -> Optional[SyslogService]:
    """The service that tap.makeService adds when ``config.syslog`` is
    true, else None. Reads ``syslog``, ``syslog_facility`` and
    ``syslog_socket`` from the Config.

    :raise ConfigError: an unknown facility.
    """
    if not config.syslog:
        return None
    observer = SyslogObserver(path=config.syslog_socket, facility=config.syslog_facility)
    return SyslogService(observer)
