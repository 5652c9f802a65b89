"""The README's worked example, for real: a 4-host stepping-stone chain on
loopback aliases, traced with ``stopctl trace``.

Four ``twistd stop`` daemons (127.0.0.11 .. .14, one per "host"), each
with the redemption service and its own host certificate from a fleet CA
made here; real relays between them run as root, nobody and daemon
(tests/integration/redeemchain.py, the chain the integration test traces);
the victim on 127.0.0.14 asks 127.0.0.13 with SV_REC, the daemons ask each
other, and the investigator's one token rebuilds the chain. Prints the
commands and what they print; everything runs in a temporary directory,
and every process started here is stopped by its PID at the end.

    sudo .venv/bin/python dev/trace_demo.py [--json] [--svg FILE]

Needs root (relays as other users), socat and netcat-openbsd; about
20 s. The ports and tokens differ from run to run.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.integration.harness import Daemon  # noqa: E402
from tests.integration.redeemchain import (ADDRESSES, H2, INVESTIGATOR, RedeemHosts,  # noqa: E402
                                           RelayChain)
from tests.integration.svtrees import Tree  # noqa: E402
from tests.testca import TestCA  # noqa: E402


def stopctl(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Print ``$ stopctl ARGS`` and run it (``python -m stop.ctl``, as the
    installed ``stopctl`` is) in ``cwd``; print what it printed."""
    print("$ stopctl " + " ".join(shlex.quote(a) for a in args))
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "stop.ctl"] + args, cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    sys.stdout.write(out.stdout)
    sys.stdout.write(out.stderr)
    if out.returncode:
        print(f"(exit status {out.returncode})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="also print the trace as JSON")
    parser.add_argument("--svg", metavar="FILE", help="also draw the chain (Graphviz)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("trace_demo: run as root (the relays run as nobody and daemon)")
    from stop import walk
    if "here" not in inspect.signature(walk.walk).parameters:
        sys.exit("trace_demo: the walk does not take this host's addresses yet (issue 9): "
                 "loopback aliases are not separate hosts")
    work = tempfile.mkdtemp(prefix="stop-trace-demo-")
    started: list[Daemon] = []

    def start_daemon(settings, **kw) -> Daemon:
        d = Daemon(_dir(work, f"daemon-{len(started)}"), settings, **kw)
        started.append(d)
        return d.start()

    tree = Tree()
    relays = None
    try:
        ca = TestCA(work, "fleet")
        cert, key = (os.path.basename(p) for p in ca.client(INVESTIGATOR))
        hosts = RedeemHosts(start_daemon, ADDRESSES, ca)
        relays = RelayChain(tree)
        relays.start()
        token = relays.ask(hosts)
        hosts.trace(H2, token)  # until every host has saved its outcomes
        creds = ["--cert", cert, "--key", key, "--ca", os.path.basename(ca.path)]
        target = f"{token}@{H2}:{hosts.rport}"
        status = stopctl(["trace", target] + creds, work).returncode
        if args.json:
            status = status or stopctl(["trace", target] + creds + ["--json"], work).returncode
        if args.svg:
            svg = os.path.abspath(args.svg)
            status = status or stopctl(["trace", target] + creds + ["--svg", svg], work).returncode
        return status
    finally:
        tree.stop()
        for d in started:
            d.stop()
        if relays is not None:
            relays.close()
        shutil.rmtree(work, ignore_errors=True)


def _dir(base: str, name: str):
    from pathlib import Path
    path = Path(base) / name
    path.mkdir()
    return path


if __name__ == "__main__":
    sys.exit(main())
