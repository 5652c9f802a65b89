"""The redemption audit trail: one JSON object per line, appended.

Every redemption attempt is written here, allowed or refused, and every
connection that failed its TLS handshake (``docs/redeem.rst`` lists the
outcomes). ``stopctl audit`` reads it.

Safety: the file is ``<data_dir>/audit/redeem.log``, the directory 0700 and
the file 0600 (whatever the umask), opened with ``O_APPEND | O_NOFOLLOW``.
Each line is written with one ``write(2)`` on the append descriptor, then the
file is ``fdatasync``'ed; lines that arrive together share one
``fdatasync`` (group commit) in a dedicated thread, so the reactor never
waits for the disk. :meth:`AuditLog.record` fires only once its line is
durable, and the service releases a record only after that: no record
leaves the host without its line on disk. A crash can at most tear the last
line, which ``stopctl audit`` reports and skips.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import Optional

from twisted.internet import defer

from stop.storage.entries import fsync_dir
from twisted.logger import Logger

from stop.errors import StopError
from stop.records import canonical, iso_time
from stop.storage.writer import WriterThread

log = Logger()

#: Path of the audit file under the daemon's ``data_dir``.
AUDIT_DIR = "audit"
AUDIT_FILE = "redeem.log"
#: Longest text kept of any one field a client controls (token, reason).
MAX_FIELD = 256
#: Longest line read back (a longer one is reported as damaged).
MAX_LINE = 16384

# Module-level so tests can fail them (monkeypatch).
fdatasync = os.fdatasync


class AuditFailed(StopError):
    """The audit trail cannot be opened or written."""


def audit_path(data_dir: str) -> str:
    """Where the audit file of a daemon with ``data_dir`` lives."""
    return os.path.join(data_dir, AUDIT_DIR, AUDIT_FILE)


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, escape
    sequences' ESC and CSI, line and paragraph separators...) written as
    ``\\xHH`` / ``\\uHHHH``: safe to print on a terminal. Everything taken
    from a record or the audit trail goes through it before it is shown."""
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c)
                   for c in text)


def bounded(text: Optional[str], limit: int = MAX_FIELD) -> Optional[str]:
    """``text`` with non-printable characters escaped (:func:`printable`),
    cut to ``limit`` characters (a trailing ``...`` says it was cut)."""
    if text is None:
        return None
    out = printable(text[:limit + 1])
    return out if len(out) <= limit else out[:limit] + "..."


class AuditLog:
    """The append-only audit file; :meth:`open` it after privileges are
    dropped (it belongs to the daemon's user).

    :param path: the file (its directory is created 0700 when missing).
    :param reactor: fires the Deferreds and gives the time.
    """

    def __init__(self, path: str, reactor):
        self.path = path
        self._reactor = reactor
        self._fd: Optional[int] = None
        self._writer: Optional[WriterThread] = None
        self._pending: list[tuple[bytes, defer.Deferred]] = []
        self._flushing = False
        self._closed = False
        self._idle: list[defer.Deferred] = []

    def open(self) -> None:
        """Create (0700 directory, 0600 file) or open the audit file.

        :raise AuditFailed: unsafe or unusable path (symlink, not ours,
            writable by others, OS error); the message says which.
        """
        directory = os.path.dirname(self.path)
        try:
            if not os.path.lexists(directory):
                os.mkdir(directory, 0o700)
                fsync_dir(os.path.dirname(directory) or ".")  # the new directory is durable
            st = os.lstat(directory)
            if not stat.S_ISDIR(st.st_mode):
                raise AuditFailed(f"audit directory {directory} is not a directory (or a symlink)")
            if st.st_uid != os.getuid():
                raise AuditFailed(f"audit directory {directory} is owned by uid {st.st_uid}, "
                                  f"not by uid {os.getuid()}")
            os.chmod(directory, 0o700)
            created = not os.path.lexists(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            if created:
                try:
                    fsync_dir(directory)  # the new file's name is durable
                except OSError:
                    os.close(fd)
                    raise
        except OSError as e:
            raise AuditFailed(f"cannot open audit file {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AuditFailed(f"audit file {self.path} is not a regular file")
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._writer = WriterThread(self._reactor, "stop-audit")
        self._writer.start()
        log.info("redemption audit trail {path}", path=self.path)

    def record(self, event: dict) -> defer.Deferred:
        """Append ``event`` (a JSON-able dict; ``time`` is added) as a line.

        :return: a Deferred firing None once the line is durable, or failing
            with :class:`AuditFailed` (closed, or the write failed).
        """
        if self._fd is None or self._closed:
            return defer.fail(AuditFailed(f"audit file {self.path} is not open"))
        line = canonical(dict(event, time=iso_time(self._reactor.seconds()))) + b"\n"
        d: defer.Deferred = defer.Deferred()
        self._pending.append((line, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = True
        data = b"".join(line for line, _ in batch)
        d = self._writer.call(self._write, self._fd, data)

        def done(result):
            self._flushing = False
            for _, waiter in batch:
                if isinstance(result, Exception):
                    waiter.errback(AuditFailed(str(result)))
                else:
                    waiter.callback(None)
            if self._pending:
                self._flush()
            elif self._idle:
                idle, self._idle = self._idle, []
                for w in idle:
                    w.callback(None)

        def failed(f):
            log.error("cannot write the audit trail {path}: {err}", path=self.path,
                      err=f.getErrorMessage())
            return f.value if isinstance(f.value, Exception) else Exception(str(f.value))

        d.addErrback(failed)
        d.addCallback(done)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        # In the writer thread. One write for the batch: O_APPEND puts it at
        # the end as a whole; loop only on a short write (disk full).
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fdatasync(fd)

    def close(self) -> defer.Deferred:
        """Write what is pending, then release the file. Idempotent."""
        self._closed = True
        if self._fd is None:
            return defer.succeed(None)
        if self._flushing or self._pending:
            d: defer.Deferred = defer.Deferred()
            self._idle.append(d)
            d.addCallback(lambda _: self._release())
            return d
        self._release()
        return defer.succeed(None)

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit(path: str) -> Iterator[Optional[dict]]:
    """The events of the audit file at ``path``, oldest first; ``None`` for
    a line that is damaged (torn by a crash, or not a JSON object).

    :raise AuditFailed: the file cannot be read (the message says why).
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as e:
        raise AuditFailed(f"cannot read audit file {path}: {e.strerror}") from None
    with fh:
        while True:
            line = fh.readline(MAX_LINE + 1)
            if not line:
                return
            if not line.endswith(b"\n"):
                if len(line) > MAX_LINE:  # skip the rest of an overlong line
                    while line and not line.endswith(b"\n"):
                        line = fh.readline(MAX_LINE + 1)
                yield None
                continue
            try:
                event = json.loads(line.decode("utf-8"))
            except ValueError:
                yield None
                continue
            yield event if isinstance(event, dict) else None
