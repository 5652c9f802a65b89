"""Benchmark the record stores: throughput and save latency, side by side.

    .venv/bin/python bench/store_bench.py [--records 2000] [--rounds 3] [--dir PATH] [--code DIR]

For flat and gzip, fsync=always and fsync=batch, with 1 and 50 concurrent
savers (each saver saves its next record as soon as the previous one
fired: a closed loop, like clients waiting for their replies), it reports
records/s (median over the rounds) and the per-record latency from
``save()`` to its Deferred firing (median and p99 over all rounds), then the
ratios batch/always and gzip/flat, and the bytes per record on disk for a
~300-byte ID record. Then the CPU the whole process (reactor and writer
thread) spends per record with ``fsync=never`` (so the disk does not
dominate): what a save costs in Python, the figure a hot path cares about.

``--code DIR`` imports ``stop`` from DIR instead of this checkout, to
measure an older version side by side (e.g. ``git archive <commit> stop |
tar -x -C DIR``); run the two alternately, since the machine is shared.

The store lives under --dir (default: a fresh directory in ./var/), which
must be on a real disk: on tmpfs fsync costs nothing and the figures say
nothing. Rounds go round-robin over the configurations so that a noisy
spell hits them all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time


def _code_dir() -> str:
    if "--code" in sys.argv[1:-1]:
        return os.path.abspath(sys.argv[sys.argv.index("--code") + 1])
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


sys.path.insert(0, _code_dir())

from twisted.internet import defer, reactor  # noqa: E402

from stop.storage import make_store  # noqa: E402

STORES = ("flat", "gzip")
FSYNCS = ("always", "batch")
SAVERS = (1, 50)


def id_record(i: int) -> bytes:
    """A canonical ID record of about 300 bytes, varied like real ones."""
    rec = {
        "type": "ID",
        "token": "%032x" % (0x9E3779B97F4A7C15 * (i + 1) % 2**128),
        "time": "2025-06-01T12:%02d:%02d.%06dZ" % (i // 60 % 60, i % 60, i * 7919 % 10**6),
        "host": "gw1.example.net",
        "local": {"addr": "192.0.2.10", "port": 40000 + i % 20000},
        "remote": {"addr": "198.51.100.%d" % (i % 250 + 1), "port": 6667},
        "uid": 1000 + i % 37,
        "user": "user%02d" % (i % 37),
        "pid": 20000 + i % 5000,
        "comm": "irssi",
        "inode": 1000000 + i,
        "v": 1,
    }
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@defer.inlineCallbacks
def run_one(base: str, store_name: str, fsync: str, savers: int, n: int, start: int, cpu=None):
    """Save ``n`` records with ``savers`` closed-loop savers.

    :param cpu: a list to append the process CPU seconds per record to.
    :return: (records per second, list of latencies in seconds).
    """
    data_dir = tempfile.mkdtemp(dir=base)
    store = make_store(store_name, data_dir, reactor=reactor, fsync=fsync)
    store.open()
    latencies: list[float] = []
    counter = iter(range(start, start + n))

    @defer.inlineCallbacks
    def saver():
        for i in counter:  # shared: n records in all, bounded
            t0 = time.perf_counter()
            yield store.save("b%d" % i, id_record(i))
            latencies.append(time.perf_counter() - t0)

    t0, c0 = time.perf_counter(), cpu_seconds()
    yield defer.gatherResults([saver() for _ in range(savers)], consumeErrors=True)
    elapsed = time.perf_counter() - t0
    if cpu is not None:
        cpu.append((cpu_seconds() - c0) / n)
    yield store.close()
    shutil.rmtree(data_dir)
    return n / elapsed, latencies


@defer.inlineCallbacks
def bytes_per_record(base: str, n: int):
    """Segment and index bytes per ~300-byte ID record, flat and gzip."""
    out = {}
    for name in STORES:
        data_dir = tempfile.mkdtemp(dir=base)
        store = make_store(name, data_dir, reactor=reactor, fsync="never")
        store.open()
        yield defer.gatherResults([store.save("b%d" % i, id_record(i)) for i in range(n)])
        yield store.close()
        rec_dir = os.path.join(data_dir, "records")
        sizes = {f: os.path.getsize(os.path.join(rec_dir, f)) for f in os.listdir(rec_dir)}
        seg = sum(v for f, v in sizes.items() if f.startswith("seg-"))
        idx = sum(v for f, v in sizes.items() if not f.startswith("seg-"))  # index (when any), format
        out[name] = (seg / n, idx / n)
        shutil.rmtree(data_dir)
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


@defer.inlineCallbacks
def main(args):
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    base = tempfile.mkdtemp(prefix="store-bench-", dir=args.dir)
    try:
        configs = [(s, f, c) for s in STORES for f in FSYNCS for c in SAVERS]
        cpu_configs = [(s, "never", c) for s in STORES for c in SAVERS]
        rates = {k: [] for k in configs + cpu_configs}
        lats = {k: [] for k in configs + cpu_configs}
        cpus = {k: [] for k in cpu_configs}
        start = 0
        for _ in range(args.rounds):
            for key in configs + cpu_configs:
                rate, lat = yield run_one(base, *key, args.records, start, cpus.get(key))
                start += args.records
                rates[key].append(rate)
                lats[key].extend(lat)
        sizes = yield bytes_per_record(base, args.records)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rec = len(id_record(0))
    print(f"store bench: {args.records} records x {args.rounds} rounds per row, ID record {rec} bytes, "
          f"dir {args.dir}, Python {sys.version.split()[0]}, code {os.path.abspath(_code_dir())}")
    print()
    print(f"{'store':5} {'fsync':6} {'savers':>6} {'records/s':>10} {'lat med ms':>10} {'lat p99 ms':>10}")
    for key in configs:
        med = statistics.median(rates[key])
        print(f"{key[0]:5} {key[1]:6} {key[2]:6d} {med:10.0f} {statistics.median(lats[key]) * 1e3:10.3f} "
              f"{pct(lats[key], 99) * 1e3:10.3f}")
    print()
    print("ratios of records/s (median):")
    for s in STORES:
        for c in SAVERS:
            r = statistics.median(rates[(s, "batch", c)]) / statistics.median(rates[(s, "always", c)])
            print(f"  {s:5} savers={c:<3} batch/always = {r:5.2f}")
    for f in FSYNCS:
        for c in SAVERS:
            r = statistics.median(rates[("gzip", f, c)]) / statistics.median(rates[("flat", f, c)])
            print(f"  fsync={f:6} savers={c:<3} gzip/flat    = {r:5.2f}")
    print()
    print(f"bytes per {rec}-byte ID record on disk (segment + other files):")
    for name, (seg, idx) in sizes.items():
        print(f"  {name:5} {seg:7.1f} + {idx:5.1f} = {seg + idx:7.1f}")
    print(f"  gzip/flat segment bytes = {sizes['gzip'][0] / sizes['flat'][0]:.2f}")
    print()
    print("process CPU per record, fsync=never (reactor + writer thread; median of rounds):")
    print(f"{'store':5} {'savers':>6} {'records/s':>10} {'cpu us/rec':>10}")
    for key in cpu_configs:
        print(f"{key[0]:5} {key[2]:6d} {statistics.median(rates[key]):10.0f} "
              f"{statistics.median(cpus[key]) * 1e6:10.1f}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="records per configuration per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations")
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "var"),
                        help="directory on the disk to measure (default ./var)")
    parser.add_argument("--code", default=None,
                        help="import stop from this directory (an older version, to compare)")
    args = parser.parse_args()
    failure = []
    d = main(args)
    d.addErrback(failure.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failure:
        failure[0].printTraceback()
        sys.exit(1)


if __name__ == "__main__":
    cli()
