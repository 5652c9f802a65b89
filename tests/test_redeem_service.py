"""The redemption service over real TLS on loopback, in this process: what
it releases, what it refuses (and that a refusal carries nothing of the
record), what it audits; the client's typed errors against it."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import socket
import ssl
import subprocess
import time

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from stop import config, records
from stop.errors import (CertificateRefused, NotAuthorised, RateLimited, RedeemError,
                         UnknownToken, Unreachable)
from stop.redeem import audit as audit_mod
from stop.redeem import service as service_mod
from stop.redeem import tls as tls_mod
from stop.redeem.audit import audit_path, read_audit
from stop.redeem.client import Credentials, redeem
from stop.redeem.service import MAX_BODY, build_redemption
from tests.testca import TestCA

HOST = "127.0.0.1"


class LinkedStore:
    """The store calls the service makes (get, integrity, linked), from
    dicts; ``broken`` makes them raise as a damaged store would."""

    def __init__(self):
        self.records: dict[str, bytes] = {}
        self.entries: dict[str, list[bytes]] = {}
        self.broken = False

    def add(self, record: dict, linked=(), sv=True) -> str:
        data = records.canonical(record)
        token = hashlib.sha1(data).hexdigest() if sv else os.urandom(20).hex()
        self.records[token] = data
        self.entries[token] = [records.canonical(e) for e in linked]
        return token

    def get(self, token):
        if self.broken:
            raise OSError(5, "Input/output error")
        return self.records.get(token)

    def integrity(self, token):
        return token in self.records

    def linked(self, token):
        return list(self.entries.get(token, []))


def a_record(type_="SV_REC", requester="192.0.2.7", user="alice") -> dict:
    return {"version": 1, "type": type_, "time": "2026-11-25T12:00:00.000001Z", "host": "h1",
            "requester": {"address": requester, "port": 40000},
            "connection": {"local": {"address": "198.51.100.1", "port": 5555},
                           "remote": {"address": requester, "port": 22}, "inode": 1},
            "user": {"uid": 1000, "name": user}, "secret": "only-for-investigators \u00e9"}


class TLSCase(unittest.TestCase):
    """A running service on 127.0.0.1 with a test CA; no tests of its own."""

    allow = "alice\nbob net:203.0.113.0/24\ncarol type:ID"
    deny = ("mallory",)
    host = HOST

    def setUp(self):
        # Not trial's mktemp: that writes under the current directory.
        base = tempfile.mkdtemp(prefix="stop-redeem-")
        self.addCleanup(shutil.rmtree, base, True)
        self.ca = TestCA(base)
        self.other = TestCA(base, "other CA")
        cert, key = self.ca.host(self.host)
        self.data_dir = os.path.join(base, "data")
        os.mkdir(self.data_dir, 0o700)
        self.store = LinkedStore()
        entry = {"version": 1, "kind": "recursion", "of": "x", "outcome": "token",
                 "target": {"address": "192.0.2.1", "port": 113}, "token": "b" * 40}
        self.token = self.store.add(a_record(), [entry])
        self.id_token = self.store.add(a_record("ID"), sv=False)
        self.settings = config.Config(
            data_dir=self.data_dir, redeem_listen="tcp:0", redeem_cert=cert, redeem_key=key,
            redeem_ca=self.ca.path, redeem_allow=self.allow, redeem_deny=self.deny,
            redeem_rate=600, redeem_burst=50, **self.extra_settings())
        self.gate, self.audit = build_redemption(self.settings, self.store, reactor)
        self.audit.open()
        self.port = reactor.listenTCP(0, self.gate, interface=self.host)
        self.portno = self.port.getHost().port
        self.addCleanup(self.audit.close)
        self.addCleanup(self.port.stopListening)

    def extra_settings(self) -> dict:
        return {}

    def creds(self, cn="alice", ca=None, **kw) -> ssl.SSLContext:
        cert, key = (ca or self.ca).client(cn, **kw)
        return Credentials(cert, key, self.ca.path).context()

    def fetch(self, token, ctx, **kw):
        return threads.deferToThread(redeem, self.host, self.portno, token, ctx, timeout=10, **kw)

    def raw(self, ctx, path, method="GET", body=None):
        """(status, body) of one request, or the exception raised."""
        def run():
            conn = http.client.HTTPSConnection(HOST, self.portno, context=ctx, timeout=10)
            try:
                conn.request(method, path, body=body)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except Exception as e:
                return e
            finally:
                conn.close()
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def events(self, n=None):
        """The audit events, once at least ``n`` are durable (a refused
        handshake is audited after the client has seen the refusal)."""
        deadline = time.monotonic() + 10
        while True:
            found = [e for e in read_audit(audit_path(self.data_dir))]
            if n is None or len(found) >= n or time.monotonic() > deadline:
                return found
            d = defer.Deferred()
            reactor.callLater(0.02, d.callback, None)
            yield d



class ServiceTests(TLSCase):

    # -- released ----------------------------------------------------------

    @defer.inlineCallbacks
    def test_release_exact_bytes_linked_and_audit(self):
        got = yield self.fetch(self.token, self.creds())
        self.assertEqual(got.record_bytes, self.store.records[self.token])
        self.assertTrue(got.hash_verified)
        self.assertTrue(got.integrity)
        self.assertEqual(got.linked_bytes, self.store.entries[self.token])
        self.assertEqual(got.linked[0]["token"], "b" * 40)
        [event] = yield self.events(1)
        self.assertEqual(event["outcome"], "released")
        self.assertEqual(event["identity"], "alice")
        self.assertEqual(event["token"], self.token)
        self.assertEqual(event["fingerprint"], self.ca.fingerprint("client-alice"))
        self.assertEqual(event["client"]["address"], HOST)

    @defer.inlineCallbacks
    def test_policy_scopes(self):
        # carol: ID records only; bob: a network no record is in.
        got = yield self.fetch(self.id_token, self.creds("carol"))
        self.assertEqual(got.record["type"], "ID")
        self.assertIsNone(got.hash_verified)
        yield self.assertFailure(self.fetch(self.token, self.creds("carol")), UnknownToken)
        yield self.assertFailure(self.fetch(self.token, self.creds("bob")), UnknownToken)
        outcomes = [e["outcome"] for e in (yield self.events(3))]
        self.assertEqual(outcomes, ["released", "refused-by-policy", "refused-by-policy"])

    # -- refused: the same "not found" whether unknown or not ours ------------

    @defer.inlineCallbacks
    def test_unknown_and_refused_look_the_same(self):
        ctx = self.creds("bob")
        refused = yield self.raw(ctx, f"/v1/records/{self.token}")
        unknown = yield self.raw(ctx, "/v1/records/" + "c" * 40)
        self.assertEqual(refused, (404, b'{"error": "not found"}'))
        self.assertEqual(unknown, refused)
        events = yield self.events(2)
        self.assertEqual([e["outcome"] for e in events], ["refused-by-policy", "unknown-token"])

    @defer.inlineCallbacks
    def test_not_authorised_identities(self):
        for cn in ("dave", "mallory"):
            err = yield self.assertFailure(self.fetch(self.token, self.creds(cn)), NotAuthorised)
            self.assertNotIn("alice", str(err))
        status, body = yield self.raw(self.creds("dave"), f"/v1/records/{self.token}")
        self.assertEqual((status, body), (403, b'{"error": "not authorised"}'))
        events = yield self.events(3)
        self.assertEqual([(e["outcome"], e["identity"]) for e in events],
                         [("not-authorised", "dave"), ("not-authorised", "mallory"),
                          ("not-authorised", "dave")])
        self.assertEqual(events[1]["why"], "redeem_deny cn:mallory")

    @defer.inlineCallbacks
    def test_tls_refusals_of_one_address_are_counted(self):
        """At most REFUSED_BURST tls-refused lines per address per
        REFUSED_WINDOW; the others are counted into the next line (review S5)."""
        self.patch(service_mod, "REFUSED_BURST", 1)
        bare = ssl.create_default_context(cafile=self.ca.path)
        for _ in range(3):
            yield self.assertFailure(self.fetch(self.token, bare), CertificateRefused)
        [first] = yield self.events(1)
        self.assertEqual((first["outcome"], first.get("more")), ("tls-refused", None))
        self.patch(service_mod, "REFUSED_WINDOW", 0)
        yield self.assertFailure(self.fetch(self.token, bare), CertificateRefused)
        events = yield self.events(2)
        self.assertEqual([(e["outcome"], e.get("more")) for e in events],
                         [("tls-refused", None), ("tls-refused", 2)])

    @defer.inlineCallbacks
    def test_tls_refusals_are_audited_and_carry_nothing(self):
        # No client certificate.
        bare = ssl.create_default_context(cafile=self.ca.path)
        err = yield self.assertFailure(self.fetch(self.token, bare), CertificateRefused)
        self.assertIn("certificate required", str(err))
        # A certificate of another CA.
        yield self.assertFailure(self.fetch(self.token, self.creds("alice", ca=self.other)),
                                 CertificateRefused)
        # An expired certificate of the right CA.
        err = yield self.assertFailure(self.fetch(self.token, self.creds("alice", expired=True)),
                                       CertificateRefused)
        self.assertIn("expired", str(err))
        events = yield self.events(3)
        self.assertEqual([(e["outcome"], e["why"]) for e in events], [
            ("tls-refused", "no client certificate"),
            ("tls-refused", "certificate not signed by redeem_ca"),
            ("tls-refused", "certificate has expired")])
        self.assertTrue(all("identity" not in e and "token" not in e for e in events))

    @defer.inlineCallbacks
    def test_not_tls_is_audited(self):
        def plain():
            with socket.create_connection((HOST, self.portno), 5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                s.settimeout(5)
                try:
                    return s.recv(100)
                except OSError:
                    return b""
        yield threads.deferToThread(plain)
        [event] = yield self.events(1)
        self.assertEqual(event["outcome"], "tls-refused")
        self.assertTrue(event["why"].startswith("not TLS"), event["why"])

    @defer.inlineCallbacks
    def test_bad_requests(self):
        ctx = self.creds()
        self.assertEqual((yield self.raw(ctx, "/v1/records/" + self.token, method="POST", body=b"x")),
                         (405, b'{"error": "method not allowed"}'))
        self.assertEqual((yield self.raw(ctx, "/")), (404, b'{"error": "not found"}'))
        self.assertEqual((yield self.raw(ctx, "/v1/records/../etc/passwd")),
                         (404, b'{"error": "not found"}'))
        result = yield self.raw(ctx, "/v1/records/" + self.token, method="POST",
                                body=b"x" * (MAX_BODY * 64))
        self.assertIsInstance(result, Exception)
        events = yield self.events(3)
        self.assertEqual([e["outcome"] for e in events[:3]],
                         ["bad-request", "bad-request", "unknown-token"])

    @defer.inlineCallbacks
    def test_declared_large_body_closes_at_once(self):
        """A Content-Length over MAX_BODY closes the connection before any
        body arrives (no temporary file for it; review S5)."""
        def run():
            sock = socket.create_connection((HOST, self.portno), 10)
            tls = self.creds().wrap_socket(sock, server_hostname=HOST)
            try:
                tls.sendall(b"POST /v1/records/%s HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: 200000\r\n\r\n" % self.token.encode())
                tls.settimeout(5)
                try:
                    return tls.recv(100)
                except (ConnectionResetError, ssl.SSLError):
                    return b""
            finally:
                tls.close()
        self.assertEqual((yield threads.deferToThread(run)), b"")

    def test_no_renegotiation(self):
        from OpenSSL import SSL
        ctx = tls_mod.build_context(self.settings.redeem_cert, self.settings.redeem_key,
                                    self.ca.path)
        self.assertTrue(ctx.set_options(0) & SSL.OP_NO_RENEGOTIATION)

    @defer.inlineCallbacks
    def test_unaudited_means_unreleased(self):
        def broken(fd):
            raise OSError(28, "No space left on device")
        self.patch(audit_mod, "fdatasync", broken)
        status, body = yield self.raw(self.creds(), f"/v1/records/{self.token}")
        self.assertEqual((status, body), (503, b'{"error": "unavailable"}'))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_store_failure_is_unavailable(self):
        self.store.broken = True
        status, body = yield self.raw(self.creds(), f"/v1/records/{self.token}")
        self.assertEqual((status, body), (503, b'{"error": "unavailable"}'))
        [event] = yield self.events(1)
        self.assertEqual(event["outcome"], "error")

    @defer.inlineCallbacks
    def test_unexpected_error_is_audited_and_unavailable(self):
        """A bug while deciding is a 503 with its audit line, not a bare 500."""
        def boom(client):
            raise RuntimeError("policy bug")
        self.patch(self.gate.redeem.policy.__class__, "denied", lambda self, client: boom(client))
        status, body = yield self.raw(self.creds(), f"/v1/records/{self.token}")
        self.assertEqual((status, body), (503, b'{"error": "unavailable"}'))
        [event] = yield self.events(1)
        self.assertEqual((event["outcome"], event["identity"]), ("error", "alice"))
        self.assertIn("RuntimeError", event["why"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_unreachable(self):
        self.port.stopListening()
        yield self.assertFailure(self.fetch(self.token, self.creds()), Unreachable)

    @defer.inlineCallbacks
    def test_host_certificate_must_name_the_host(self):
        # The host certificate is for 127.0.0.1; asking for another name fails
        # our own verification.
        err = yield self.assertFailure(self.fetch(self.token, self.creds(), server_name="localhost"),
                                       CertificateRefused)
        self.assertIn("verification", str(err))

    def test_local_files_errors(self):
        with self.assertRaises(RedeemError):
            Credentials("/nonexistent.pem", "/nonexistent.key", self.ca.path).context()
        with self.assertRaises(RedeemError):
            Credentials(self.ca.path, self.ca.path, "/nonexistent-ca.pem").context()


class SlotTests(TLSCase):
    """At most ``limit`` connections are served; the others wait unread,
    and a served keep-alive connection gives way after its response."""

    allow = "*"
    deny = ()

    def setUp(self):
        TLSCase.setUp(self)
        self.gate.slots.limit = 1

    def tls_socket(self):
        sock = socket.create_connection((HOST, self.portno), 10)
        return self.creds().wrap_socket(sock, server_hostname=HOST)

    @defer.inlineCallbacks
    def test_waiting_connection_is_served_when_a_slot_frees(self):
        first = yield threads.deferToThread(self.tls_socket)  # served, idle
        second = threads.deferToThread(self.tls_socket)
        pause = defer.Deferred()
        reactor.callLater(0.5, pause.callback, None)
        yield pause
        self.assertFalse(second.called, "the second handshake ran while the slot was taken")
        self.assertEqual((self.gate.slots.active, len(self.gate.slots.waiting)), (1, 1))
        first.close()
        sock = yield second
        sock.close()

    def idle_tcp(self, source="127.0.0.1"):
        """A TCP connection that never starts its TLS handshake."""
        sock = socket.create_connection((HOST, self.portno), 10, source_address=(source, 0))
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def until(self, check, seconds=10):
        deadline = time.monotonic() + seconds
        while not check():
            self.assertLess(time.monotonic(), deadline, "condition not reached in time")
            pause = defer.Deferred()
            reactor.callLater(0.02, pause.callback, None)
            yield pause

    @defer.inlineCallbacks
    def test_no_handshake_loses_the_slot(self):
        """A served TCP connection that never handshakes is closed after
        HANDSHAKE_TIMEOUT, and the one waiting is served (review S1)."""
        self.patch(service_mod, "HANDSHAKE_TIMEOUT", 0.5)
        idle = yield threads.deferToThread(self.idle_tcp)
        yield self.until(lambda: self.gate.slots.active == 1)

        def served():
            sock = socket.create_connection((HOST, self.portno), 10, source_address=("127.0.0.2", 0))
            return self.creds().wrap_socket(sock, server_hostname=HOST)
        started = time.monotonic()
        sock = yield threads.deferToThread(served)
        sock.close()
        self.assertLess(time.monotonic() - started, 8)

        def closed():
            idle.settimeout(5)
            try:
                return idle.recv(100)
            except ConnectionResetError:
                return b""
        self.assertEqual((yield threads.deferToThread(closed)), b"")
        events = yield self.events(1)
        self.assertEqual([(e["outcome"], e["why"]) for e in events][:1],
                         [("tls-refused", "no TLS handshake within 0.5 s")])

    @defer.inlineCallbacks
    def test_one_served_connection_per_address(self):
        """Two idle connections from one address take one slot; another
        address is served at once (review S1)."""
        self.gate.slots.limit = 2
        self.patch(service_mod, "HANDSHAKE_TIMEOUT", 60)
        yield threads.deferToThread(self.idle_tcp)
        yield threads.deferToThread(self.idle_tcp)
        slots = self.gate.slots
        yield self.until(lambda: (slots.active, len(slots.waiting)) == (1, 1))

        def other():
            sock = socket.create_connection((HOST, self.portno), 5, source_address=("127.0.0.2", 0))
            return self.creds().wrap_socket(sock, server_hostname=HOST)
        sock = yield threads.deferToThread(other)
        self.assertEqual((slots.active, len(slots.waiting)), (2, 1))
        sock.close()

    @defer.inlineCallbacks
    def test_keepalive_gives_way(self):
        def request(sock):
            sock.sendall(b"GET /v1/records/%s HTTP/1.1\r\nHost: x\r\n\r\n" % self.token.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            return data

        first = yield threads.deferToThread(self.tls_socket)
        head = yield threads.deferToThread(request, first)
        self.assertIn(b"200 OK", head)  # alone: kept alive
        second = threads.deferToThread(self.tls_socket)
        pause = defer.Deferred()
        reactor.callLater(0.3, pause.callback, None)
        yield pause
        yield threads.deferToThread(request, first)  # someone waits: closed after this one

        def drained(sock):
            """True once the server closed; False if it kept it open."""
            sock.settimeout(10)
            while True:
                try:
                    if not sock.recv(65536):
                        return True
                except (socket.timeout, TimeoutError):
                    return False
                except (ssl.SSLError, OSError):
                    return True

        self.assertTrue((yield threads.deferToThread(drained, first)))
        first.close()
        (yield second).close()


class RateTests(TLSCase):
    """A low rate: the client gets 429 and the refusals are audited."""

    allow = "*"
    deny = ()

    def setUp(self):
        TLSCase.setUp(self)
        self.gate.inner.wrappedFactory.site.resource.limiter.burst = 2.0

    @defer.inlineCallbacks
    def test_rate_limited(self):
        ctx = self.creds()
        yield self.fetch(self.token, ctx)
        yield self.fetch(self.token, ctx)
        yield self.assertFailure(self.fetch(self.token, ctx), RateLimited)
        status, body = yield self.raw(ctx, f"/v1/records/{self.token}")
        self.assertEqual((status, body), (429, b'{"error": "rate limited"}'))
        events = yield self.events(4)
        self.assertEqual([e["outcome"] for e in events],
                         ["released", "released", "rate-limited", "rate-limited"])

    @defer.inlineCallbacks
    def test_connection_rate_per_address(self):
        self.gate.limiter.burst = 1.0
        self.gate.limiter.rate = 1e-9
        ctx = self.creds()
        yield self.fetch(self.token, ctx)
        for _ in range(3):
            yield self.assertFailure(self.fetch(self.token, ctx), Unreachable)
        events = yield self.events(2)
        self.assertEqual([e["outcome"] for e in events], ["released", "dropped"])
        self.assertIn("redeem_rate", events[1]["why"])
        # Let it in again: the refusals that were not audited one by one
        # are counted.
        self.gate.limiter.rate = 1e9
        yield self.fetch(self.token, ctx)
        events = yield self.events(4)
        self.assertEqual(events[2]["outcome"], "dropped")
        self.assertEqual(events[2]["count"], 2)


class GateKeyTests(unittest.TestCase):
    """The connection rate is counted per IPv4 address and per IPv6 /64
    (review S1)."""

    def test_rate_key(self):
        from stop.redeem.service import rate_key
        self.assertEqual(rate_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(rate_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(rate_key("2001:db8::ffff:1234"), rate_key("2001:db8::1"))
        self.assertNotEqual(rate_key("2001:db8:0:1::1"), rate_key("2001:db8::1"))
        self.assertEqual(rate_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(rate_key("fe80::1%eth0"), "fe80::/64")

    def test_one_slash_64_shares_a_bucket(self):
        from twisted.internet.address import IPv6Address
        from stop.redeem.service import ConnectionGate, RateLimiter, Slots

        class Inner(protocol.Factory):
            def buildProtocol(self, addr):
                return protocol.Protocol()

        class Notes:
            def __init__(self):
                self.seen = []

            def note(self, outcome, addr, **fields):
                self.seen.append((outcome, addr.host))
        notes = Notes()
        gate = ConnectionGate(Inner(), Slots(), 32, RateLimiter(1e-9, 1, Clock()), notes)
        self.assertIsNotNone(gate.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1)))
        self.assertIsNone(gate.buildProtocol(IPv6Address("TCP", "2001:db8::2", 1)))
        self.assertIsNotNone(gate.buildProtocol(IPv6Address("TCP", "2001:db8:0:1::2", 1)))
        self.assertEqual(notes.seen, [("dropped", "2001:db8::2")])


class CRLTests(TLSCase):
    """redeem_crl: a revoked certificate is refused in the handshake; a new
    CRL is picked up without a restart."""

    allow = "*"
    deny = ()

    def extra_settings(self):
        self.paths = {cn: self.ca.client(cn) for cn in ("alice", "oscar")}
        return {"redeem_crl": self.ca.crl(["client-oscar"])}

    @defer.inlineCallbacks
    def test_revoked(self):
        yield self.fetch(self.token, Credentials(*self._paths("alice"), self.ca.path).context())
        oscar = Credentials(*self._paths("oscar"), self.ca.path).context()
        yield self.assertFailure(self.fetch(self.token, oscar), CertificateRefused)
        events = yield self.events(2)
        self.assertEqual(events[1]["why"], "certificate revoked")
        # Revoke alice too: a new CRL in place, noticed on a later connection.
        self.ca.crl(["client-oscar", "client-alice"], path=self.settings.redeem_crl)
        self.patch(tls_mod, "RELOAD_INTERVAL", 0.0)
        alice = Credentials(*self._paths("alice"), self.ca.path).context()
        yield self.assertFailure(self.fetch(self.token, alice), CertificateRefused)

    def _paths(self, cn):
        return self.paths[cn]


class ManPageCredentialsTests(unittest.TestCase):
    """The openssl commands of stopctl(8), run as printed (the host's
    address swapped for loopback), make credentials the service accepts,
    and both ways of revoking shown there work."""

    def setUp(self):
        from tests.test_docs import page, unroff
        self.dir = tempfile.mkdtemp(prefix="stop-mancreds-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        text = unroff(page("stopctl.8")).replace("\\(aq", "'")
        [block] = [b for b in text.split(".nf\n") if "openssl req -x509" in b]
        self.script = block.split("\n.fi", 1)[0]
        script = self.script.replace("192.0.2.10", HOST)
        run = subprocess.run(["bash", "-euc", script], cwd=self.dir, capture_output=True,
                             text=True, timeout=120)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.serial = run.stdout.strip().split("=", 1)[1]

    def path(self, name):
        return os.path.join(self.dir, name)

    @defer.inlineCallbacks
    def serve_and_fetch(self, **settings):
        data_dir = os.path.join(self.dir, "data-%d" % len(os.listdir(self.dir)))
        os.mkdir(data_dir, 0o700)
        store = LinkedStore()
        token = store.add(a_record())
        config_ = config.Config(data_dir=data_dir, redeem_listen="tcp:0",
                                redeem_cert=self.path("h1.pem"), redeem_key=self.path("h1.key"),
                                redeem_ca=self.path("fleet-ca.pem"),
                                **{"redeem_allow": "alice", **settings})
        gate, audit = build_redemption(config_, store, reactor)
        audit.open()
        port = reactor.listenTCP(0, gate, interface=HOST)
        try:
            ctx = Credentials(self.path("alice.pem"), self.path("alice.key"),
                              self.path("fleet-ca.pem")).context()
            got = yield threads.deferToThread(redeem, HOST, port.getHost().port, token, ctx,
                                              timeout=10, server_name="h1.example.org")
            return got
        finally:
            yield port.stopListening()
            yield audit.close()

    @defer.inlineCallbacks
    def test_credentials_work_and_revocation_works(self):
        got = yield self.serve_and_fetch()
        self.assertEqual(got.record["user"]["name"], "alice")
        yield self.assertFailure(self.serve_and_fetch(redeem_crl=self.path("fleet-crl.pem")),
                                 CertificateRefused)
        yield self.assertFailure(self.serve_and_fetch(redeem_deny=(f"serial:{self.serial}",)),
                                 NotAuthorised)
        # The deny line in redeem_allow, as stopctl(8) and the README show it.
        yield self.assertFailure(
            self.serve_and_fetch(redeem_allow=f"alice\n!serial:{self.serial}"), NotAuthorised)

    def test_readme_shows_these_commands(self):
        """The README's credentials commands are the tested ones of
        stopctl(8) (a subset: the man page adds the CRL's set-up)."""
        from tests.test_docs import ROOT
        with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as fh:
            readme = fh.read()
        start = readme.index("    # The fleet CA.")
        block = readme[start:readme.index("\n\n", start)]
        commands = [line[4:] for line in block.splitlines() if not line.lstrip().startswith("#")]
        assert len(commands) >= 10
        tested = self.script.splitlines()
        self.assertEqual([c for c in commands if c not in tested], [])


class BuildTests(unittest.TestCase):
    """tap.build adds the service only when redeem_listen is set, and bad
    TLS files are configuration errors naming the setting."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="stop-redeem-tap-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = TestCA(self.dir)
        self.cert, self.key = self.ca.host(HOST)

    def settings(self, **kw):
        values = dict(data_dir=os.path.join(self.dir, "data"), storage="memory",
                      listen=("tcp:0:interface=127.0.0.1",), redeem_cert=self.cert,
                      redeem_key=self.key, redeem_ca=self.ca.path, redeem_allow="*")
        values.update(kw)
        return config.Config(**values)

    def names(self, svc):
        out = [type(svc).__name__]
        for child in getattr(svc, "services", []):
            out += self.names(child)
        return out

    def test_off_by_default(self):
        from stop import tap
        daemon = tap.build(self.settings(), Clock())
        self.assertNotIn("_AuditService", self.names(daemon.service))

    def test_on_with_redeem_listen(self):
        from stop import tap
        daemon = tap.build(self.settings(redeem_listen="tcp:0:interface=127.0.0.1"), Clock())
        names = self.names(daemon.service)
        self.assertIn("_AuditService", names)
        # After the store (it reads records), before the ident listeners.
        self.assertLess(names.index("StoreService"), names.index("_AuditService"))

    def test_bad_files_are_config_errors(self):
        from stop import tap
        from stop.errors import ConfigError
        for setting, value in (("redeem_cert", "/nonexistent/c.pem"), ("redeem_key", self.ca.path),
                               ("redeem_ca", self.key), ("redeem_crl", self.cert)):
            with self.assertRaises(ConfigError) as caught:
                tap.build(self.settings(redeem_listen="tcp:0", **{setting: value}), Clock())
            self.assertIn(setting, str(caught.exception))


class IPv6Tests(TLSCase):
    """The service and the client over IPv6 (the host certificate names ::1)."""

    allow = "*"
    deny = ()
    host = "::1"

    @defer.inlineCallbacks
    def test_redeem_over_ipv6(self):
        got = yield threads.deferToThread(redeem, "::1", self.portno, self.token, self.creds(),
                                          timeout=10)
        self.assertEqual(got.record_bytes, self.store.records[self.token])
        [event] = yield self.events(1)
        self.assertEqual(event["client"]["address"], "::1")


class StartTests(unittest.TestCase):
    """A redemption service that cannot start stops the daemon's start with
    one line naming what (stop(8), EXIT STATUS)."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="stop-redeem-start-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = TestCA(self.dir)
        cert, key = self.ca.host(HOST)
        self.values = dict(data_dir=os.path.join(self.dir, "data"), redeem_cert=cert,
                           redeem_key=key, redeem_ca=self.ca.path, redeem_allow="*")
        os.mkdir(self.values["data_dir"], 0o700)

    def test_unusable_audit_trail(self):
        from stop.errors import StartFailed
        from stop.redeem.service import redemption_service
        os.symlink("/tmp", os.path.join(self.values["data_dir"], "audit"))
        svc = redemption_service(config.Config(redeem_listen="tcp:0:interface=127.0.0.1",
                                               **self.values), LinkedStore(), reactor)
        with self.assertRaises(StartFailed) as caught:
            svc.startService()
        self.assertIn("audit", str(caught.exception))
        svc.stopService()

    def test_port_in_use(self):
        from stop.errors import StartFailed
        from stop.redeem.service import redemption_service
        with socket.socket() as busy:
            busy.bind((HOST, 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            svc = redemption_service(config.Config(
                redeem_listen=f"tcp:{port}:interface={HOST}", **self.values), LinkedStore(), reactor)
            with self.assertRaises(StartFailed) as caught:
                svc.privilegedStartService()
            self.assertIn("redeem_listen", str(caught.exception))

    def test_bad_endpoint(self):
        from stop.errors import ConfigError
        from stop.redeem.service import redemption_service
        with self.assertRaises(ConfigError) as caught:
            redemption_service(config.Config(redeem_listen="nonsense:1", **self.values),
                               LinkedStore(), reactor)
        self.assertIn("redeem_listen", str(caught.exception))
