"""The audit trail: safe files, durable before it fires, group commit,
torn lines read back as damaged."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import stat
import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from stop.redeem import audit as audit_mod
from stop.redeem.audit import AuditFailed, AuditLog, audit_path, bounded, read_audit


class AuditLogTests(unittest.TestCase):

    def setUp(self):
        # Not trial's mktemp: that writes under the current directory.
        self.dir = tempfile.mkdtemp(prefix="stop-audit-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = audit_path(self.dir)

    def open(self) -> AuditLog:
        log = AuditLog(self.path, reactor)
        log.open()
        self.addCleanup(log.close)
        return log

    def test_modes_whatever_the_umask(self):
        old = os.umask(0)
        try:
            self.open()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_created_directory_and_file_are_fsynced(self):
        """Creating the audit directory and file fsyncs their parents (review
        S4); opening an existing trail does not."""
        synced = []
        self.patch(audit_mod, "fsync_dir", synced.append)
        self.open()
        directory = os.path.dirname(self.path)
        self.assertEqual(synced, [os.path.dirname(directory), directory])
        del synced[:]
        self.open()
        self.assertEqual(synced, [])

    @defer.inlineCallbacks
    def test_fires_after_fdatasync_and_reads_back(self):
        synced = []
        real = audit_mod.fdatasync

        def observe(fd):
            real(fd)
            with open(self.path, "rb") as fh:
                synced.append(fh.read().count(b"\n"))

        self.patch(audit_mod, "fdatasync", observe)
        log = self.open()
        yield log.record({"outcome": "released", "token": "a" * 40})
        self.assertEqual(synced, [1])
        events = list(read_audit(self.path))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["outcome"], "released")
        self.assertRegex(events[0]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    @defer.inlineCallbacks
    def test_group_commit(self):
        """Events recorded while a batch is on its way share the next
        fdatasync; each Deferred fires after its own line is durable."""
        hold = threading.Event()
        calls = []
        real = audit_mod.fdatasync

        def slow(fd):
            hold.wait(10)
            calls.append(fd)
            real(fd)

        self.patch(audit_mod, "fdatasync", slow)
        log = self.open()
        ds = [log.record({"n": i}) for i in range(20)]
        reactor.callLater(0.05, hold.set)
        yield defer.gatherResults(ds)
        self.assertLessEqual(len(calls), 2)
        self.assertEqual([e["n"] for e in read_audit(self.path)], list(range(20)))

    @defer.inlineCallbacks
    def test_write_failure_fails_the_deferred(self):
        def broken(fd):
            raise OSError(28, "No space left on device")

        self.patch(audit_mod, "fdatasync", broken)
        log = self.open()
        with self.assertRaises(AuditFailed):
            yield log.record({"outcome": "released"})
        self.flushLoggedErrors()

    def test_closed_log_refuses(self):
        log = AuditLog(self.path, reactor)
        self.assertFailure(log.record({}), AuditFailed)

    def test_symlink_refused(self):
        os.mkdir(os.path.dirname(self.path), 0o700)
        os.symlink("/etc/passwd", self.path)
        with self.assertRaises(AuditFailed):
            AuditLog(self.path, reactor).open()

    def test_torn_and_foreign_lines_are_damaged(self):
        os.mkdir(os.path.dirname(self.path), 0o700)
        with open(self.path, "wb") as fh:
            fh.write(b'{"outcome":"released"}\n[1,2]\nnot json\n' + b"x" * 40000 + b"\n"
                     + b'{"outcome":"unknown-token"}\n{"outcome":"rel')
        events = list(read_audit(self.path))
        self.assertEqual([e and e["outcome"] for e in events],
                         ["released", None, None, None, "unknown-token", None])

    def test_missing_file_reads_as_empty(self):
        self.assertEqual(list(read_audit(self.path)), [])

    def test_bounded(self):
        self.assertEqual(bounded("a\x00b\u2028"), "a\\x00b\\u2028")
        self.assertEqual(bounded("x" * 300, 10), "x" * 10 + "...")
        self.assertIsNone(bounded(None))
        self.assertEqual(json.loads(json.dumps(bounded("\udcff"))), "\\udcff")
