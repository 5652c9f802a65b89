"""The floor: the least a Twisted ident-like server can cost per query on
this machine. A bare LineReceiver that answers every line with a fixed-form
USERID reply and a random token; no lookup, no record, no log line.

``--store DIR`` adds the durable part as the daemon does it: a fixed-size
ID-like record saved in the flat store (``fsync = batch``, group commit in
its writer thread) before the reply; ``--log`` adds one twisted.logger line
per query to the global log (``--logfile``). With both, what ``stop`` spends
above this figure is its own per-query work (lookup, record, policy).

Prints its port on stdout, then serves until killed:
    python bench/floor_server.py [--interface 127.0.0.1] [--store DIR] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import protocol, reactor
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: An ID record's size and shape (about 400 bytes of canonical JSON).
RECORD = (b'{"connection":{"inode":1234567,"local":{"address":"127.0.0.1","port":40000},'
          b'"remote":{"address":"127.0.0.2","port":6667}},"host":"bench","received_on":'
          b'{"address":"127.0.0.1","port":113},"request":{"address":null,"ports":[40000,6667],'
          b'"sid":null,"type":"ID"},"requester":{"address":"127.0.0.2","port":51234},'
          b'"time":"2026-12-01T04:00:00.000000Z","type":"ID","user":{"name":"nobody",'
          b'"uid":65534},"version":1}')


class FloorProtocol(LineReceiver):
    store = None
    log = None

    def lineReceived(self, line: bytes) -> None:
        token = os.urandom(20).hex()
        reply = line.rstrip(b"\r") + b" : USERID : OTHER : " + token.encode()
        if self.store is None:
            self._reply(None, reply, token)
            return
        self.store.save(token, RECORD).addCallback(self._reply, reply, token)

    def _reply(self, _, reply: bytes, token: str) -> None:
        if self.log is not None:
            self.log.info("{peer} asked: token {token}", peer=str(self.transport.getPeer()),
                          token=token)
        self.sendLine(reply)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interface", default="127.0.0.1")
    ap.add_argument("--store", help="save a record per query in a flat store here")
    ap.add_argument("--log", help="log one line per query to this file")
    a = ap.parse_args()
    if a.log:
        from twisted.logger import globalLogBeginner, textFileLogObserver
        out = open(a.log, "a")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
        FloorProtocol.log = Logger()
    if a.store:
        sys.path.insert(0, ROOT)
        from stop.storage import make_store
        store = make_store("flat", a.store, reactor=reactor, fsync="batch")
        store.open()
        FloorProtocol.store = store
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(FloorProtocol), interface=a.interface)
    print(port.getHost().port, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
