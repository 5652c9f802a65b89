"""The floor: the least a Twisted ident-like server can cost per query on
this machine. A bare LineReceiver that answers every line with a fixed-form
USERID reply and a random token; no lookup, no record, no log line.

Prints its port on stdout, then serves until killed:
    python bench/floor_server.py [--interface 127.0.0.1]
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver


class FloorProtocol(LineReceiver):
    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line.rstrip(b"\r") + b" : USERID : OTHER : " + os.urandom(20).hex().encode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interface", default="127.0.0.1")
    a = ap.parse_args()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(FloorProtocol), interface=a.interface)
    print(port.getHost().port, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
