"""Does the redemption service delay ident answers? (issue 11: under 50
concurrent redemption clients, ident answers are not delayed by more than
10 ms at p99.)

One real daemon (``twistd stop`` through tests/integration/harness.py, flat
store, ``fsync = batch``, data under /var/tmp) answers ident on
127.0.0.11 and runs the redemption service on 127.0.0.11 too. Phases
alternate, side by side in one run:

- ``quiet``: ident queries alone;
- ``loaded``: the same ident queries while C redemption clients (default
  50: 5 processes x 10 threads) redeem a record in a loop, each with its
  own certificate and source address (127.0.1.N), one TLS connection per
  redemption (a full handshake each time: the daemon's worst case), or one
  kept-alive connection each with ``--keepalive``.

Ident queries are sequential, one connection each, paced (every
``--interval`` s) from the bench process, each about a real established
connection (so each answer stores a record: the full durable path). The
figures: ident latency p50/p90/p99/max per phase, the p99 delay
(loaded - quiet), redemptions per second served, the daemon's CPU per
phase (utime+stime of its threads). Nothing here asserts; it prints PASS or
MISS against the target.

    .venv/bin/python bench/redeem_bench.py                # shipped rate limits, ~1 min
    .venv/bin/python bench/redeem_bench.py --unlimited    # no rate limits: raw contention
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HOST, PEER = "127.0.0.11", "127.0.0.12"
TARGET_MS = 10.0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the load: one worker process runs T client threads ----------------------


def worker_main(args) -> None:
    """``--worker``: run the client threads until the deadline; print one
    JSON line of counts."""
    spec = json.loads(args.worker)
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    deadline = spec["deadline"]
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(spec["certs"][i][0], spec["certs"][i][1])
        src = (spec["sources"][i], 0)
        conn = None
        while time.time() < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(HOST, spec["port"], context=ctx, timeout=10,
                                                       source_address=src)
                conn.request("GET", f"/v1/records/{spec['token']}")
                resp = conn.getresponse()
                resp.read()
                key = str(resp.status)
                if not spec["keepalive"]:
                    conn.close()
                    conn = None
            except Exception as e:  # count it, go on
                key = type(e).__name__
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
            with lock:
                counts[key] = counts.get(key, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(spec["certs"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts))


def start_load(args, fleet, seconds: float) -> list[subprocess.Popen]:
    deadline = time.time() + seconds
    procs = []
    per = args.clients // args.processes
    for p in range(args.processes):
        idx = range(p * per, (p + 1) * per if p < args.processes - 1 else args.clients)
        spec = {"deadline": deadline, "port": fleet["rport"], "ca": fleet["ca"],
                "token": fleet["token"], "keepalive": args.keepalive, "cpus": fleet.get("client_cpus"),
                "certs": [fleet["certs"][i] for i in idx],
                "sources": [f"127.0.1.{i + 1}" for i in idx]}
        procs.append(subprocess.Popen(["nice", "-n", "19", sys.executable, __file__, "--worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, text=True))
    return procs


def collect_load(procs) -> dict[str, int]:
    total: dict[str, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=120)
        for k, v in json.loads(out.strip().splitlines()[-1]).items():
            total[k] = total.get(k, 0) + v
    return total


# -- ident latency ---------------------------------------------------------------


def ident_latencies(port: int, query: bytes, n: int, interval: float) -> tuple[list[float], int]:
    """``n`` paced queries, one connection each: their latencies in ms
    (connect to reply line) and how many did not get a token."""
    from tests.integration.harness import read_lines
    out, bad = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((PEER, 0))
            s.connect((HOST, port))
            s.sendall(query + b"\r\n")
            reply = read_lines(s, 1)
        out.append((time.perf_counter() - t0) * 1000)
        bad += not reply or b"USERID" not in reply[0]
        time.sleep(interval)
    return out, bad


# -- set-up ----------------------------------------------------------------------


def make_fleet(base: str, args) -> dict:
    from stop import records
    from tests.chainrecords import outcome, sv_token, walk_record
    from tests.integration.harness import Daemon, Pair, free_port
    from tests.integration.test_redeem import seed
    from tests.testca import TestCA

    ca = TestCA(base)
    cert, key = ca.host(HOST)
    certs = [ca.client(f"investigator{i}") for i in range(args.clients)]
    rec = walk_record(HOST, "carol", 1104, [(1411, "ssh", "socket"), (1410, "bash", "parent"),
                                            (1409, "sshd", "parent")], prev="192.0.2.13")
    token = sv_token(rec)
    settings = {"redeem_listen": f"tcp:{free_port((HOST,))}:interface={HOST}",
                "redeem_cert": cert, "redeem_key": key, "redeem_ca": ca.path, "redeem_allow": "*"}
    if args.unlimited:
        settings.update({"redeem_rate": "1000000", "redeem_burst": "1000000",
                         "redeem_max_connections": str(args.clients + 14)})
    rport = int(settings["redeem_listen"].split(":")[1])
    d = Daemon(_mkdir(os.path.join(base, "daemon")), settings, interfaces=(HOST, PEER))
    seed(d.data_dir, [{"token": token, "record": records.canonical(rec).decode(),
                       "linked": [records.canonical(outcome(token, "192.0.2.13", "a" * 40)).decode()]}])
    d.start()
    pair = Pair(local=HOST, remote=PEER)
    return {"daemon": d, "pair": pair, "rport": rport, "ca": ca.path, "certs": certs,
            "token": token, "settings": settings}


def _mkdir(path: str):
    import pathlib
    os.mkdir(path)
    return pathlib.Path(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="quiet/loaded pairs")
    p.add_argument("--queries", type=int, default=300, help="ident queries per phase")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between ident queries")
    p.add_argument("--keepalive", action="store_true", help="one TLS connection per client")
    p.add_argument("--unlimited", action="store_true",
                   help="no redeem_rate/redeem_burst limits, redeem_max_connections above --clients")
    p.add_argument("--pin", action="store_true",
                   help="daemon on CPU 0, redemption clients and this process on the others "
                        "(as if the investigators' clients ran elsewhere)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return 0
    base = tempfile.mkdtemp(prefix="stop-redeem-bench-", dir="/var/tmp")
    fleet = None
    try:
        fleet = make_fleet(base, args)
        d = fleet["daemon"]
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs 2 CPUs")
            subprocess.run(["taskset", "-a", "-p", "-c", str(cpus[0]), str(d.proc.pid)],
                           check=True, stdout=subprocess.DEVNULL)
            fleet["client_cpus"] = cpus[1:]
            os.sched_setaffinity(0, cpus[1:])
        query = fleet["pair"].query()
        ident_latencies(d.port, query, 50, 0.0)  # warm up
        phase_s = args.queries * (args.interval + 0.002) + 3
        results = {"quiet": [], "loaded": []}
        cpu = {"quiet": 0.0, "loaded": 0.0}
        wall = {"quiet": 0.0, "loaded": 0.0}
        served: dict[str, int] = {}
        bad = 0
        for r in range(args.rounds):
            for phase in ("quiet", "loaded"):
                procs = start_load(args, fleet, phase_s) if phase == "loaded" else []
                if procs:
                    time.sleep(1.5)  # let the clients start
                c0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
                lat, b = ident_latencies(d.port, query, args.queries, args.interval)
                cpu[phase] += cpu_seconds(d.proc.pid) - c0
                wall[phase] += time.monotonic() - t0
                results[phase] += lat
                bad += b
                if procs:
                    for k, v in collect_load(procs).items():
                        served[k] = served.get(k, 0) + v
                print(f"round {r + 1} {phase:6}: ident p50 {pct(lat, 50):6.2f} ms  p99 "
                      f"{pct(lat, 99):6.2f} ms", flush=True)
        q, l = results["quiet"], results["loaded"]
        loaded_s = args.rounds * (phase_s - 0.0)
        print()
        print(f"machine: {os.cpu_count()} CPUs, shared with other work; Python {sys.version.split()[0]}"
              + ("; daemon pinned to one CPU, clients to the others" if args.pin else ""))
        print(f"redemption: {args.clients} clients ({args.processes} processes), "
              f"{'keep-alive' if args.keepalive else 'one TLS connection per redemption'}, "
              f"{'no rate limits' if args.unlimited else 'shipped rate limits (60/min, burst 20 per client)'}")
        print(f"redemption replies during the loaded phases: {served} "
              f"(~{served.get('200', 0) / loaded_s:.0f} released/s)")
        print(f"{'phase':8} {'queries':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'daemon CPU':>11}")
        for name, lat in (("quiet", q), ("loaded", l)):
            print(f"{name:8} {len(lat):7d} {statistics.median(lat):8.2f} {pct(lat, 90):8.2f} "
                  f"{pct(lat, 99):8.2f} {max(lat):8.2f} {100 * cpu[name] / wall[name]:10.0f}%")
        delay = pct(l, 99) - pct(q, 99)
        print(f"p99 delay from redemption load: {delay:+.2f} ms (target <= {TARGET_MS:g} ms): "
              f"{'PASS' if delay <= TARGET_MS else 'MISS'}")
        if bad:
            print(f"{bad} ident queries got no token")
        return 0
    finally:
        if fleet is not None:
            fleet["pair"].close()
            fleet["daemon"].stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
