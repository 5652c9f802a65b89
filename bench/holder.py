"""Hold N established TCP connections for a benchmark (run as a normal
user, e.g. nobody, with the system python: plain sockets only).

Opens a listener on LISTEN_ADDR (port chosen by the kernel) and connects to
it from CLIENT_ADDR, accepting each connection, so both ends stay open in
this process. Commands on stdin, one per line:

    grow N    open connections until N are held; prints one JSON line
              {"listen_port": P2, "ports": [P1, ...]} (every client port)

It exits when stdin closes (or after MAX_LIFETIME seconds); both ends of
every connection are set to close with a reset (SO_LINGER 0), so its exit
leaves no TIME_WAIT entries behind to weigh on the next measurement. The
caller raises RLIMIT_NOFILE first: each connection costs two descriptors.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

CLIENT_ADDR, LISTEN_ADDR = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("127.0.0.1",
                                                                                  "127.0.0.2")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_RESET = struct.pack("ii", 1, 0)
MAX_CONNECTIONS = 60000
MAX_LIFETIME = 3600.0
BATCH = 256   # connects before the matching accepts (well below the backlog)


def main() -> int:
    listener = socket.socket()
    listener.bind((LISTEN_ADDR, 0))
    listener.listen(4096)
    lport = listener.getsockname()[1]
    held: list[socket.socket] = []
    ports: list[int] = []
    deadline = time.monotonic() + MAX_LIFETIME
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], 60)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            break
        cmd, _, arg = line.strip().partition(" ")
        if cmd != "grow":
            print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
            continue
        want = min(int(arg), MAX_CONNECTIONS)
        while len(ports) < want:
            batch = []
            for _ in range(min(BATCH, want - len(ports))):
                c = socket.socket()
                c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                c.bind((CLIENT_ADDR, 0))
                c.connect((LISTEN_ADDR, lport))
                batch.append(c)
            for c in batch:
                server, _ = listener.accept()
                for end in (c, server):
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                held.extend((c, server))
                ports.append(c.getsockname()[1])
        print(json.dumps({"listen_port": lport, "ports": ports}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
