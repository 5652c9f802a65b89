"""The floor: the least a Twisted ident-like server can cost per query on
this machine. A bare LineReceiver that answers every line with a fixed-form
USERID reply and a random token; no lookup, no record, no log line. Every
floor sends its replies as the daemon does, straight on the socket
(:func:`send_now`; ``--twisted-write`` for Twisted's ``write``, which
costs floor+dcq ~0-10 % more CPU a query: 208 against 205 us at 50
clients, 290 against 263 at 10, side by side, 7 runs).

``--lookup`` finds the asked connection (local = the address the query
came to, remote = the requester's) with stop's netlink lookup, both its
requests (the 4-tuple, the listener probe), as the daemon does.

``--minimal DIR`` adds the least a *durable* server must do: an ID-sized
record appended to ``DIR/records.log`` and ``fdatasync``'ed before the
reply, with group commit (the records of one reactor turn written and
synced together by one writer thread; a record alone, with the writer idle
and the recent batches single, synced inline on the reactor thread, which
spares two thread hand-offs at one client at a time). No index, no hash
chain, no sequence numbers: a lower bound, not a store.

``--store DIR`` instead saves the record in stop's own flat store
(``fsync = batch``), as the daemon does. ``--log FILE`` adds one log line
per query, written as the daemon writes its own (stop.logsetup's observer
for twistd's log file, the same line shape), emitted before the reply.

``--duties`` (with ``--lookup --minimal DIR --chained --log``: "floor+dcq"
in hot_bench.py; with ``--lookup --store DIR --log``: "floor+stq", the same
on stop's own store) adds stop's own per-query duties (spec 2-4), each
with stop's own code and the least glue, all in ``lineReceived``: the
request parsed by ``stop.wire``, the whole record of the asked connection
made by ``stop.records.id_record`` (the looked-up connection, the account
name from a dict of ``pwd`` answers, the time), the ``~/.ident`` opt-in
(the file read once per uid and home by ``stop.optin.read_entries``, kept
in a dict, matched as the daemon matches it), the reply by ``stop.wire``
and the daemon's log line with its fields (NO-USER and unreadable
requests logged too). No gate, no Deferred, no layers: what is left
between it and ``stop`` is stop's structure.

With ``--lookup --minimal --log`` ("floor+d" in hot_bench.py): the least
an ident server doing stop's job can cost here (the lookup, a durable record
and a log line per query, on Twisted); what ``stop`` spends above it is its
record, policy and store. With ``--store --log`` ("floor+st"): the store
and the log line without any lookup.

Prints its port on stdout, then serves until killed:
    python bench/floor_server.py [--interface 127.0.0.1] [--lookup]
                                 [--minimal DIR [--chained] | --store DIR] [--log FILE]
                                 [--duties] [--twisted-write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import sys
import threading
import time

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: An ID record's size and shape (about 400 bytes of canonical JSON).
RECORD = (b'{"connection":{"inode":1234567,"local":{"address":"127.0.0.1","port":40000},'
          b'"remote":{"address":"127.0.0.2","port":6667}},"host":"bench","received_on":'
          b'{"address":"127.0.0.1","port":113},"request":{"address":null,"ports":[40000,6667],'
          b'"sid":null,"type":"ID"},"requester":{"address":"127.0.0.2","port":51234},'
          b'"time":"2026-12-01T04:00:00.000000Z","type":"ID","user":{"name":"nobody",'
          b'"uid":65534},"version":1}')

#: --minimal: batches of one in a row before a lone record is synced inline.
INLINE_AFTER = 4


class MinimalLog:
    """Append + fdatasync with group commit; ``save(data, done)`` calls
    ``done()`` on the reactor thread once ``data`` is on disk. Appends
    into room preallocated ahead (zeros, stop.storage.entries.PREALLOC_BYTES
    at a time), as stop's flat store does: an fdatasync then has no file
    size to commit."""

    def __init__(self, path: str):
        from stop.storage.entries import PREALLOC_BYTES
        self._prealloc = PREALLOC_BYTES
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._off = self._room = os.lseek(self._fd, 0, os.SEEK_END)
        self._pending: list = []
        self._busy = False        # a batch is in the writer thread
        self._turn = False        # the end-of-turn call is scheduled
        self._singles = 0         # batches of one in a row
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def save(self, data: bytes, done) -> None:
        self._pending.append((data, done))
        if not self._busy and not self._turn:
            self._turn = True
            reactor.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn = False
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._singles = self._singles + 1 if len(batch) == 1 else 0
        if len(batch) == 1 and self._singles > INLINE_AFTER:
            self._write(batch)
            self._done(batch)
        else:
            self._busy = True
            self._queue.put(batch)

    def _append(self, data: bytes) -> None:
        """Write ``data`` at the end (no fdatasync)."""
        end = self._off + len(data)
        if end > self._room:
            room = end + self._prealloc
            os.pwrite(self._fd, bytes(room - self._off), self._off)
            self._room = room
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self._off)
            view, self._off = view[n:], self._off + n

    def _write(self, batch: list) -> None:
        self._append(b"".join(data for data, _ in batch))
        os.fdatasync(self._fd)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            self._write(batch)
            reactor.callFromThread(self._returned, batch)

    def _returned(self, batch: list) -> None:
        self._busy = False
        self._done(batch)

    def _done(self, batch: list) -> None:
        for _, done in batch:
            done()
        if self._pending and not self._turn:
            self._turn = True
            reactor.callLater(0, self._end_of_turn)


class ChainedLog(MinimalLog):
    """``--minimal --chained``: :class:`MinimalLog` plus the two duties spec
    8 puts on every store beyond durability, each done the least way: a
    tamper-evident chain (each entry's SHA-256 over the previous one's and
    its payload's SHA-256, in the entry) and an on-disk index from token to
    entry (memory must not grow with the records): a row per record in
    SQLite (stop's table, WAL, ``synchronous = NORMAL``, inserted as stop
    inserts them: one statement per batch of up to 64 rows), committed
    every 256 rows. No sequence numbers, no duplicate check, no segments."""

    def __init__(self, path: str):
        import sqlite3

        from stop.storage.index import insert_statements
        self._insert_statements = insert_statements
        super().__init__(path)
        self._chain = b"0" * 64
        self._seq = 0
        self._rows = 0
        self._db = sqlite3.connect(path + ".index", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (token TEXT PRIMARY KEY, "
                         "seq INTEGER NOT NULL, seg INTEGER NOT NULL, off INTEGER NOT NULL, "
                         "len INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("BEGIN")

    def save(self, data: bytes, done, token: str = "") -> None:
        self._pending.append(((token, data), done))
        if not self._busy and not self._turn:
            self._turn = True
            reactor.callLater(0, self._end_of_turn)

    def _write(self, batch: list) -> None:
        out, rows = [], []
        chain, seq, off = self._chain, self._seq, self._off
        for (token, data), _ in batch:
            seq += 1
            digest = hashlib.sha256(data).hexdigest().encode()
            chain = hashlib.sha256(chain + b" " + digest).hexdigest().encode()
            line = b"%d %s %s %s %s" % (seq, token.encode(), digest, chain, data)
            rows.append((token, seq, 1, off, len(line)))
            out.append(line)
            off += len(line)
        # stop's insert (Index.add_new): one statement per batch (up to 64
        # rows), not a statement step (and a hand-off of the GIL) per row.
        rows.sort()
        for sql, parameters, _ in self._insert_statements(rows):
            self._db.execute(sql, parameters)
        self._append(b"".join(out))
        os.fdatasync(self._fd)
        self._chain, self._seq = chain, seq
        self._rows += len(rows)

    def _commit_index(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def _done(self, batch: list) -> None:
        # The index is committed by the writer thread, after the replies
        # (as stop does): the reactor then sends batches there until it is
        # done, never writing itself meanwhile.
        if self._rows >= 256 and not self._busy:
            self._rows = 0
            self._busy = True
            self._queue.put(None)
        super()._done(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                self._commit_index()
                reactor.callFromThread(self._returned, [])
                continue
            self._write(batch)
            reactor.callFromThread(self._returned, batch)


#: ``--twisted-write``: every reply through Twisted's ``write`` instead.
TWISTED_WRITE = False


def send_now(p, reply: bytes) -> None:
    """Send ``reply`` on ``p``'s connection as stop.server does: straight
    on the socket (Twisted's write would send it on the next turn, after
    two more epoll_ctl calls), until once it takes less than the whole:
    the transport then carries every later write, so the order is kept."""
    if TWISTED_WRITE or p.buffered:
        p.transport.write(reply)
        return
    try:
        sent = p.transport.getHandle().send(reply)
    except OSError:
        sent = 0
    if sent < len(reply):
        p.buffered = True
        p.transport.write(reply[sent:])


class Duties:
    """``--duties``: stop's per-query duties the least way (module doc).
    Needs the lookup, the log line, and a ChainedLog or stop's own store."""

    def __init__(self, lookup, log_store: "ChainedLog", log):
        import pwd
        import socket as socket_mod
        from stop import optin, records, wire
        from stop.errors import RequestError
        from stop.model import Endpoint
        from stop.server import endpoint_of
        from stop.tokens import Tokens
        self._pwd, self._optin, self._records, self._wire = pwd, optin, records, wire
        self._request_error = RequestError
        self._endpoint, self._endpoint_of = Endpoint, endpoint_of
        self._lookup, self._store, self._log = lookup, log_store, log
        self._flat = not isinstance(log_store, ChainedLog)  # stop's own store
        self._tokens = Tokens("sha1")
        self._host = socket_mod.gethostname()
        self._accounts: dict = {}   # uid -> (name, home)
        self._entries: dict = {}    # (uid, home) -> ~/.ident entries

    def connected(self, p) -> None:
        p.requester = self._endpoint_of(p.transport.getPeer())
        p.server = self._endpoint_of(p.transport.getHost())

    def _account(self, uid: int):
        account = self._accounts.get(uid)
        if account is None:
            try:
                pw = self._pwd.getpwuid(uid)
                account = (pw.pw_name, pw.pw_dir)
            except KeyError:
                account = (None, None)
            self._accounts[uid] = account
        return account

    def answer(self, p, line: bytes) -> None:
        wire = self._wire
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            request = wire.parse_request(line)
        except self._request_error as e:
            self._log.info(f"{p.requester} sent an unreadable request: {e.word}")
            send_now(p, wire.format_error(e.ports, e.word))
            return
        requester, server = p.requester, p.server
        ports = request.ports
        conn = self._lookup.find(self._endpoint(server.host, ports[0]),
                                 self._endpoint(requester.host, ports[1]))
        if conn is None or conn.accepted:
            self._log.info(f"{requester} asked {ports[0]}, {ports[1]} {request.type}: NO-USER")
            send_now(p, wire.format_error(ports, "NO-USER"))
            return
        name, home = self._account(conn.uid)
        data = self._records.id_record(request=request, requester=requester, server=server,
                                       connection=conn, user_name=name, now=time.time(),
                                       host=self._host)
        token = self._tokens.random()

        def durable() -> None:
            send_name = False
            if name and home:
                key = (conn.uid, home)
                entries = self._entries.get(key)
                if entries is None:
                    entries = self._entries[key] = self._optin.read_entries(home, conn.uid,
                                                                            True)
                send_name = self._optin._matches(requester.host, entries)[0]
            if send_name:
                reply, outcome = (wire.format_user(ports, "UNIX", name),
                                  f"{conn.local}->{conn.remote} uid {conn.uid} ({name}): "
                                  f"user name sent (~/.ident), record {token}")
            else:
                reply, outcome = (wire.format_token(ports, token),
                                  f"{conn.local}->{conn.remote} uid {conn.uid} ({name}): "
                                  f"token {token}")
            # The daemon's line and fields (stop.answer.Answerer._log).
            who = str(requester)
            self._log.info(f"{who} asked {ports[0]}, {ports[1]} {request.type}: {outcome}",
                           requester=who, ports=ports, type=request.type, sid=request.sid,
                           address=request.address, outcome=outcome)
            send_now(p, reply)

        if self._flat:
            self._store.save(token, data).addCallback(lambda _: durable())
        else:
            self._store.save(data + b"\n", durable, token)


class FloorProtocol(LineReceiver):
    store = None
    minimal = None
    log = None
    lookup = None
    duties = None
    buffered = False  # send_now: the transport carries every write from now on

    def connectionMade(self) -> None:
        if self.duties is not None:
            self.duties.connected(self)

    def lineReceived(self, line: bytes) -> None:
        if self.duties is not None:
            self.duties.answer(self, line)
            return
        token = os.urandom(20).hex()
        line = line.rstrip(b"\r")
        if self.lookup is not None:
            from stop.model import Endpoint
            p1, _, p2 = line.partition(b",")
            here, peer = self.transport.getHost(), self.transport.getPeer()
            conn = self.lookup.find(Endpoint(here.host, int(p1)), Endpoint(peer.host, int(p2)))
            if conn is None or conn.accepted:
                send_now(self, line + b" : ERROR : NO-USER\r\n")
                return
        reply = line + b" : USERID : OTHER : " + token.encode()
        if isinstance(self.minimal, ChainedLog):
            self.minimal.save(RECORD + b"\n", lambda: self._reply(None, reply, token), token)
        elif self.minimal is not None:
            self.minimal.save(RECORD + b"\n", lambda: self._reply(None, reply, token))
        elif self.store is not None:
            self.store.save(token, RECORD).addCallback(self._reply, reply, token)
        else:
            self._reply(None, reply, token)

    def _reply(self, _, reply: bytes, token: str) -> None:
        if self.log is not None:
            peer = self.transport.getPeer()
            # The daemon's line shape, made before it is logged (stop.answer).
            self.log.info(f"{peer.host}:{peer.port} asked 40000, 6667 ID: 127.0.0.1:40000->"
                          f"127.0.0.2:6667 uid 65534: token {token}")
        send_now(self, reply + b"\r\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interface", default="127.0.0.1")
    durable = ap.add_mutually_exclusive_group()
    durable.add_argument("--minimal", help="append + fdatasync each record to a file here")
    durable.add_argument("--store", help="save a record per query in stop's flat store here")
    ap.add_argument("--log", help="log one line per query to this file")
    ap.add_argument("--lookup", action="store_true", help="look the asked connection up")
    ap.add_argument("--chained", action="store_true",
                    help="with --minimal: chain the entries and index them in SQLite (spec 8)")
    ap.add_argument("--duties", action="store_true",
                    help="with --lookup --minimal --chained --log: stop's per-query duties "
                         "(parse, record, account, ~/.ident, log fields), the least way")
    ap.add_argument("--twisted-write", action="store_true",
                    help="send replies through Twisted's write (what that costs)")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    global TWISTED_WRITE
    TWISTED_WRITE = a.twisted_write
    if a.lookup:
        from stop.os.linux.lookup import NetlinkLookup
        FloorProtocol.lookup = NetlinkLookup()
    if a.log:
        from twisted.logger import globalLogBeginner
        from stop import logsetup
        _, observer = logsetup.file_observer(a.log, reactor)
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
        FloorProtocol.log = logsetup.QuickLogger()
    if a.minimal:
        os.makedirs(a.minimal, mode=0o700, exist_ok=True)
        kind = ChainedLog if a.chained else MinimalLog
        FloorProtocol.minimal = kind(os.path.join(a.minimal, "records.log"))
    if a.duties:
        if not (a.lookup and a.log and (a.chained or a.store)):
            ap.error("--duties needs --lookup, --log and --minimal DIR --chained or --store DIR")
    if a.store:
        from stop.storage import make_store
        store = make_store("flat", a.store, reactor=reactor, fsync="batch")
        store.open()
        FloorProtocol.store = store
    if a.duties:
        FloorProtocol.duties = Duties(FloorProtocol.lookup, FloorProtocol.minimal or
                                      FloorProtocol.store, FloorProtocol.log)
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(FloorProtocol), interface=a.interface)
    print(port.getHost().port, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
