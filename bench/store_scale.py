"""The record store at scale: open time, ``stopctl show`` time and the
daemon's memory, for stores of 1,000 and 1,000,000 records (issue 10).

    .venv/bin/python bench/store_scale.py [--sizes 1000,1000000] [--store flat]
                                          [--dir var] [--keep] [--code DIR]

For each size it makes a store directly in its files (``stop.storage.offline``:
ID-like records of ~280 bytes, each with a random token; every 10th has a
linked entry), then opens it once as the daemon would to build its index
(timed: the index rebuild a lost index costs). Then, each in a fresh process:

* **open**: ``store.open()`` of the writer (what the daemon does at start)
  and of a reader (what ``stopctl`` does), wall time;
* **stopctl show**: ``stopctl show TOKEN`` as a command (interpreter start
  included), median of 5, for a full token and for a 12-character prefix;
  and ``stopctl verify TOKEN``; ``stopctl verify --all`` once (the whole
  chain);
* **daemon RSS**: a real ``twistd stop`` on the store (flat, fsync=batch)
  answers 2,000 ID queries over loopback (one connection each, about real
  connections); its VmRSS after start and after the queries;
* **writer RSS** (``--writer N``, default a million): one process saves N
  records itself into a fresh store (``fsync=never``, 50 concurrent savers,
  the store's own code path: batches, index, chain); its VmRSS after 1,000
  and after N saves.

The fixtures are kept under ``--dir`` with ``--keep`` (about 420 MB for a
million flat records), and reused when present. Run as root (the daemon
binds loopback aliases 127.0.0.11/12). ``--code DIR`` measures another
version of ``stop`` (its store must read the fixture's format).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _code_dir() -> str:
    if "--code" in sys.argv[1:-1]:
        return os.path.abspath(sys.argv[sys.argv.index("--code") + 1])
    return os.path.abspath(ROOT)


sys.path.insert(0, _code_dir())
sys.path.insert(1, os.path.abspath(ROOT))

QUERIES = 2000


def token_of(i: int) -> str:
    return hashlib.sha1(b"scale-%d" % i).hexdigest()


def id_record(i: int) -> bytes:
    rec = {"version": 1, "type": "ID", "time": "2026-%02d-%02dT12:%02d:%02d.%06dZ" % (
        i // 2600000 % 12 + 1, i // 86400 % 28 + 1, i // 60 % 60, i % 60, i * 7919 % 10**6),
        "host": "gw1.example.net",
        "request": {"type": "ID", "sid": None, "ports": [40000 + i % 20000, 6667], "address": None},
        "requester": {"address": "198.51.100.%d" % (i % 250 + 1), "port": 50000 + i % 10000},
        "received_on": {"address": "192.0.2.10", "port": 113},
        "connection": {"local": {"address": "192.0.2.10", "port": 40000 + i % 20000},
                       "remote": {"address": "198.51.100.%d" % (i % 250 + 1), "port": 6667},
                       "inode": 1000000 + i},
        "user": {"uid": 1000 + i % 37, "name": "user%02d" % (i % 37)}}
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def items(n: int):
    for i in range(n):
        yield "R", token_of(i), id_record(i)
        if i % 10 == 0:
            yield "L", token_of(i), b'{"kind":"recursion","outcome":"timeout","version":1}'


def build(data_dir: str, n: int, store: str) -> dict:
    """Make the fixture (files, then the index by opening it once)."""
    from stop.storage import STORES
    from stop.storage.offline import write_store
    from twisted.internet import reactor as _  # noqa: F401 (a writer needs one)
    t0 = time.perf_counter()
    write_store(data_dir, items(n), STORES[store].codec, sync=False)
    t1 = time.perf_counter()
    s = STORES[store](data_dir)
    s.open()
    t2 = time.perf_counter()
    s._stop_pool()
    s.close()
    return {"files_s": t1 - t0, "index_s": t2 - t1}


CHILD_OPEN = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from twisted.internet import reactor
from stop.storage import STORES
out = {}
for mode in ("writer", "reader"):
    s = STORES[sys.argv[3]](sys.argv[2], reactor=reactor, readonly=(mode == "reader"))
    t = time.perf_counter()
    s.open()
    out[mode] = time.perf_counter() - t
    if mode == "writer":
        s._stop_pool()
    s.close()
print(json.dumps(out))
"""


def open_times(data_dir: str, store: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD_OPEN, _code_dir(), data_dir, store],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def stopctl_seconds(data_dir: str, store: str, *args: str, runs: int = 5) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=_code_dir())
    cmd = [sys.executable, "-m", "stop.ctl", "--config", "/dev/null", "--data-dir", data_dir,
           "--storage", store, *args]
    times, out = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        times.append(time.perf_counter() - t)
        out = r.stdout if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()}"
    return statistics.median(times), out


CHILD_WRITER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, os.path.dirname(os.path.abspath(sys.argv[2])))
from twisted.internet import defer, reactor
from stop.storage import STORES
import store_scale as bench
n, data_dir, name = int(sys.argv[3]), sys.argv[4], sys.argv[5]
marks = sorted({1000, n})
out = {"saved": 0}
store = STORES[name](data_dir, reactor=reactor, fsync="never")
store.open()
todo = iter(range(n))  # shared by the savers: n saves in all, bounded


def rss():
    with open("/proc/self/status") as fh:
        return int(next(l for l in fh if l.startswith("VmRSS:")).split()[1])


@defer.inlineCallbacks
def saver():
    for i in todo:
        yield store.save(bench.token_of(i), bench.id_record(i))
        out["saved"] += 1
        if out["saved"] in marks:
            out[f"rss_kib_{out['saved']}"] = rss()
            out[f"at_s_{out['saved']}"] = time.perf_counter() - t0


t0 = time.perf_counter()
d = defer.gatherResults([saver() for _ in range(50)], consumeErrors=True)
d.addCallback(lambda _: store.close())
d.addErrback(lambda f: out.update(error=f.getErrorMessage()))
d.addBoth(lambda _: reactor.stop())
reactor.run()
print(json.dumps(out))
"""


def writer_rss(n: int, store: str, base: str) -> dict:
    """A store process saving ``n`` records itself (fsync=never, 50 savers,
    one fresh store): its VmRSS after 1,000 and after ``n`` saves."""
    data_dir = tempfile.mkdtemp(prefix="store-writer-", dir=base)
    try:
        r = subprocess.run([sys.executable, "-c", CHILD_WRITER, _code_dir(), os.path.abspath(__file__),
                            str(n), data_dir, store], capture_output=True, text=True, timeout=1800)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def daemon_rss(data_dir: str, store: str, work: str) -> dict:
    """Run twistd stop on ``data_dir``; VmRSS after start and after QUERIES queries."""
    import pathlib

    from tests.integration.harness import Daemon, Pair
    os.environ["PYTHONPATH"] = _code_dir()
    d = Daemon(pathlib.Path(work), settings={"storage": store, "quota_mb": 0})
    d.data_dir = data_dir
    with open(d.config) as fh:
        text = fh.read()
    with open(d.config, "w") as fh:
        fh.write(text.replace(str(pathlib.Path(work) / "data"), data_dir))
    t = time.perf_counter()
    d.start()
    started = time.perf_counter() - t
    try:
        before = rss_kib(d.proc.pid)
        pair = Pair()
        try:
            for _ in range(QUERIES):
                [reply] = d.ask(pair.query())
                if b"USERID" not in reply:
                    raise RuntimeError(f"unexpected reply {reply!r}")
        finally:
            pair.close()
        after = rss_kib(d.proc.pid)
    finally:
        d.stop()
    return {"start_s": started, "rss_start_kib": before, "rss_after_kib": after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,1000000")
    p.add_argument("--store", default="flat", choices=("flat", "gzip"))
    p.add_argument("--dir", default=os.path.join(ROOT, "var"))
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the fixtures")
    p.add_argument("--code", default=None, help="import stop from this directory")
    p.add_argument("--writer", type=int, default=1000000, metavar="N",
                   help="also save N records in one fresh store, in process, and report its "
                        "RSS after 1,000 and after N (0: skip)")
    args = p.parse_args()
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    print(f"store scale: {args.store}, code {_code_dir()}, Python {sys.version.split()[0]}")
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        data_dir = os.path.join(os.path.abspath(args.dir), f"scale-{args.store}-{n}")
        made = {}
        if not os.path.exists(os.path.join(data_dir, "records", "format")):
            shutil.rmtree(data_dir, ignore_errors=True)
            made = build(data_dir, n, args.store)
        size = sum(os.path.getsize(os.path.join(data_dir, "records", f))
                   for f in os.listdir(os.path.join(data_dir, "records")))
        opened = open_times(data_dir, args.store)
        token = token_of(n // 2)
        show, out = stopctl_seconds(data_dir, args.store, "show", token)
        assert token in out, out
        prefix, out = stopctl_seconds(data_dir, args.store, "show", token[:12].upper())
        verify, out = stopctl_seconds(data_dir, args.store, "verify", token)
        # The whole chain, read once (bounded memory: a megabyte at a time).
        verify_all, out = stopctl_seconds(data_dir, args.store, "verify", "--all", runs=1)
        assert out.endswith("SOUND\n") and "NOT" not in out, out
        work = tempfile.mkdtemp(prefix="store-scale-", dir=args.dir)
        try:
            rss = daemon_rss(data_dir, args.store, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {"records": n, "bytes": size, **made, "open_writer_s": opened["writer"],
               "open_reader_s": opened["reader"], "show_s": show, "show_prefix_s": prefix,
               "verify_s": verify, "verify_all_s": verify_all, **rss}
        rows.append(row)
        print(json.dumps(row))
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print()
    print(f"{'records':>9} {'MB':>6} {'open w s':>8} {'open r s':>8} {'show s':>7} {'prefix s':>8} "
          f"{'verify s':>8} {'verify --all s':>14} {'RSS start':>9} {'RSS after':>9}  "
          f"(RSS in MiB, after {QUERIES} queries)")
    for r in rows:
        print(f"{r['records']:9d} {r['bytes'] / 2**20:6.0f} {r['open_writer_s']:8.3f} {r['open_reader_s']:8.3f} "
              f"{r['show_s']:7.3f} {r['show_prefix_s']:8.3f} {r['verify_s']:8.3f} {r['verify_all_s']:14.1f} "
              f"{r['rss_start_kib'] / 1024:9.1f} {r['rss_after_kib'] / 1024:9.1f}")
    if len(rows) > 1:
        print(f"RSS after, largest minus smallest: {(rows[-1]['rss_after_kib'] - rows[0]['rss_after_kib']) / 1024:.1f} MiB")
    if args.writer:
        w = writer_rss(args.writer, args.store, os.path.abspath(args.dir))
        print(json.dumps(w))
        if "error" in w:
            raise SystemExit(f"writer: {w['error']}")
        n = args.writer
        print(f"one process saving {n} records itself (fsync=never, 50 savers): VmRSS "
              f"{w['rss_kib_1000'] / 1024:.1f} MiB after 1,000, {w[f'rss_kib_{n}'] / 1024:.1f} MiB "
              f"after {n:,} ({(w[f'rss_kib_{n}'] - w['rss_kib_1000']) / 1024:+.1f} MiB), "
              f"{n / w[f'at_s_{n}']:.0f} saves/s")


if __name__ == "__main__":
    main()
