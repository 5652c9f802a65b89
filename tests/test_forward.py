"""stop.forward and the example plugin plugins/syslog_forward.py: RFC 5424
formatting, and forwarding to a real rsyslogd listening on TCP."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile

import pytest
from hypothesis import given, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from stop import config, plugins
from stop.errors import ConfigError
from stop.forward import (BOM, SD_ID, ForwardHook, Forwarder, ForwardingStore, format_message,
                          forwarder_from_options, frame)
from stop.interfaces import IHookPlugin, IRecordHook, IRecordStore, IStorePlugin
from stop.testing import HeldStore
from tests import rsyslogd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "plugins")

HEADER = re.compile(
    rb"<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\S+) record "
    rb"\[stop@32473 token=\"((?:[^\"\\\]]|\\[\"\\\]])*)\"\] ")


def unframe(data: bytes) -> list[bytes]:
    """Split RFC 6587 octet-counted frames."""
    out = []
    while data:
        length, rest = data.split(b" ", 1)
        out.append(rest[:int(length)])
        data = rest[int(length):]
    return out


def test_message_layout():
    record = json.dumps({"user": "zoë", "uid": 1000}, sort_keys=True).encode()
    msg = format_message("ab12", record, 1764072000.25, facility=16, hostname="h 1",
                         app_name="stopd", procid="77")
    m = HEADER.match(msg)
    assert m, msg
    assert m.groups() == (b"134", b"2025-11-25T12:00:00.250000Z", b"h1", b"stopd", b"77", b"ab12")
    assert msg[m.end():] == BOM + record


@given(token=st.text(min_size=1, max_size=80),
       records=st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_frames_round_trip_and_tokens_are_escaped(token, records):
    stream = b"".join(frame(format_message(token, r, 0.0)) for r in records)
    messages = unframe(stream)
    assert len(messages) == len(records)
    for msg, record in zip(messages, records):
        m = HEADER.match(msg)
        assert m is not None
        escaped = m.group(6).decode("utf-8")
        assert re.sub(r"\\([\"\\\]])", r"\1", escaped) == token
        assert msg[m.end():] == BOM + record


def test_options_are_checked():
    with pytest.raises(ConfigError, match="collector = ENDPOINT is required"):
        forwarder_from_options({}, Clock())
    with pytest.raises(ConfigError, match="unknown setting.*colector"):
        forwarder_from_options({"colector": "tcp:host=127.0.0.1:port=1"}, Clock())
    with pytest.raises(ConfigError, match="queue"):
        forwarder_from_options({"collector": "tcp:host=127.0.0.1:port=1", "queue": "x"}, Clock())
    with pytest.raises(ConfigError, match="collector"):
        forwarder_from_options({"collector": "nosuchproto:1"}, Clock())
    with pytest.raises(ConfigError, match="facility"):
        forwarder_from_options({"collector": "tcp:host=127.0.0.1:port=1", "facility": "x"},
                               Clock())


def test_example_plugin_file_declares_both_plugins():
    stores = plugins.available(IStorePlugin, [EXAMPLES])
    hooks = plugins.available(IHookPlugin, [EXAMPLES])
    assert "syslog-forward" in stores and "syslog-forward" in hooks
    verifyObject(IStorePlugin, stores["syslog-forward"])
    verifyObject(IHookPlugin, hooks["syslog-forward"])


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def wait_until(predicate, timeout=15.0, step=0.05) -> defer.Deferred:
    """Fires with True once ``predicate()`` is true, or False after
    ``timeout`` seconds, polling without blocking the reactor."""
    attempts = int(timeout / step)

    @defer.inlineCallbacks
    def poll():
        for _ in range(attempts):
            if predicate():
                return True
            yield task.deferLater(reactor, step, lambda: None)
        return bool(predicate())
    return poll()


class ForwardToRsyslog(unittest.TestCase):
    """Against a real rsyslogd on 127.0.0.1 (imtcp, octet-counted frames)."""

    def setUp(self):
        if not rsyslogd.available():
            raise unittest.SkipTest("rsyslogd not installed")
        workdir = tempfile.mkdtemp(prefix="stop-rsyslogd-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.syslogd = rsyslogd.Rsyslogd(workdir, unix=False, tcp=True).start()
        self.addCleanup(self.syslogd.stop)
        self.collector = f"tcp:host=127.0.0.1:port={self.syslogd.tcp_port}"

    def records(self, n):
        return [(f"{i:040x}", json.dumps({"n": i, "user": "zoë", "note": "a]\"b"},
                                         sort_keys=True, ensure_ascii=False).encode())
                for i in range(n)]

    def received(self):
        return [m for m in self.syslogd.messages() if m[5] == "record"]

    @defer.inlineCallbacks
    def test_forwarding_store_keeps_then_forwards(self):
        inner = HeldStore()
        store = ForwardingStore(inner, Forwarder(reactor, self.collector, facility="local5",
                                                 hostname="stop-test"))
        verifyObject(IRecordStore, store)
        store.open()
        records = self.records(3)
        saves = [store.save(t, r) for t, r in records]
        yield task.deferLater(reactor, 0.2, lambda: None)
        # Nothing leaves before the local store says the record is durable.
        self.assertEqual(store.forwarder.sent + store.forwarder.queued, 0)
        inner.complete()
        yield defer.gatherResults(saves)
        self.assertEqual([store.get(t) for t, _ in records], [r for _, r in records])
        self.assertEqual([store.integrity(t) for t, _ in records] + [store.integrity("x")],
                         [True, True, True, False])
        self.assertTrue((yield wait_until(lambda: len(self.received()) == 3)))
        got = self.received()
        self.assertEqual([(m[0], m[1], m[2], m[3]) for m in got],
                         [("local5", "info", "stopd", str(os.getpid()))] * 3)
        self.assertEqual([m[4] for m in got], [f'[{SD_ID} token="{t}"]' for t, _ in records])
        self.assertEqual([m[6].lstrip("\ufeff") for m in got],
                         [r.decode("utf-8") for _, r in records])
        # A linked entry: kept by the inner store first, then forwarded
        # with MSGID "linked" under the token of its record.
        entry = b'{"kind":"recursion","outcome":"timeout","version":1}'
        linked = store.save_linked(records[0][0], entry)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertFalse([m for m in self.syslogd.messages() if m[5] == "linked"])
        inner.complete()
        yield linked
        self.assertEqual(store.linked(records[0][0]), [entry])
        self.assertEqual(store.linked("unknown"), [])
        self.assertTrue((yield wait_until(
            lambda: [m for m in self.syslogd.messages() if m[5] == "linked"])))
        [m] = [m for m in self.syslogd.messages() if m[5] == "linked"]
        self.assertEqual((m[4], m[6].lstrip("\ufeff")),
                         (f'[{SD_ID} token="{records[0][0]}"]', entry.decode()))
        yield store.close()
        self.assertFalse(store.forwarder._service.running)

    @defer.inlineCallbacks
    def test_example_plugin_as_a_hook(self):
        settings = config.Config(**config.parse(
            f"[stop]\nplugin_dirs = {EXAMPLES}\nhooks = syslog-forward\n"
            f"[plugin syslog-forward]\ncollector = {self.collector}\napp_name = stopd-hook\n"))
        [hook] = plugins.build_hooks(settings, reactor)
        verifyObject(IRecordHook, hook)
        self.assertIsInstance(hook, ForwardHook)
        token, record = self.records(1)[0]
        hook.recordSaved(token, record)
        self.assertTrue((yield wait_until(lambda: self.received())))
        [m] = self.received()
        self.assertEqual((m[2], m[4], m[6].lstrip("\ufeff")),
                         ("stopd-hook", f'[{SD_ID} token="{token}"]', record.decode()))
        yield hook.close()


class ForwardWhileCollectorIsDown(unittest.TestCase):

    @defer.inlineCallbacks
    def test_queue_is_bounded_and_oldest_dropped(self):
        forwarder = Forwarder(reactor, f"tcp:host=127.0.0.1:port={closed_port()}", queue=2)
        for i in range(3):
            forwarder.send(f"t{i}", b"{}")
        yield task.deferLater(reactor, 0.3, lambda: None)  # connection refused meanwhile
        self.assertEqual((forwarder.queued, forwarder.dropped, forwarder.sent), (2, 1, 0))
        yield forwarder.stop()
        forwarder.send("late", b"{}")  # at shutdown: dropped, no new connection
        self.assertEqual((forwarder.dropped, forwarder._service.running), (2, False))
