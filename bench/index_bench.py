"""What the store's SQLite index costs per record: CPU per row inserted
into ``records`` (stop's table and settings: WAL, ``synchronous =
NORMAL``, 2 MiB page cache) as the store inserts them (batches of
``--batch`` rows, sorted), committed every 256 rows (the store's
INDEX_ROWS), every 4,096, or once at the end, into an index already
holding N rows. The commit writes every page the rows dirtied to the WAL,
so its share per row falls as more rows share a page and grows with the
B-tree.

    .venv/bin/python bench/index_bench.py [--rows 100000 10000] [--batch 20]

One process, one thread: CPU figures are this process's. The index lives
in a temporary directory under --dir (a real disk; default /var/tmp).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stop.storage import index as index_mod  # noqa: E402


def open_index(directory: str, rows: int) -> index_mod.Index:
    ix = index_mod.Index(directory, readonly=False)
    ix.open()
    ix.add([(secrets.token_hex(20), i, 1, i * 500, 500) for i in range(rows)], [])
    ix.commit()
    return ix


def per_row_us(ix: index_mod.Index, seq: int, batch: int, every: int, total: int) -> float:
    tokens = [secrets.token_hex(20) for _ in range(total)]
    t0 = time.process_time()
    waiting = 0
    for start in range(0, total, batch):
        rows = [(tokens[start + i], seq + start + i, 1, 0, 500) for i in range(batch)]
        if not ix.add_new(rows):
            raise RuntimeError("a random token was there already")
        waiting += batch
        if waiting >= every:
            ix.commit()
            waiting = 0
    ix.commit()
    return (time.process_time() - t0) / total * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 400000],
                    help="rows in the index before the measured inserts")
    ap.add_argument("--batch", type=int, default=20, help="rows per insert call")
    ap.add_argument("--inserts", type=int, default=20000, help="rows inserted per figure")
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args(argv)
    print(f"index_bench: CPU us per record row, batches of {a.batch}, {a.inserts} rows per figure")
    print(f"{'rows before':>12} {'commit/256':>11} {'commit/4096':>12} {'one commit':>11}")
    for n in a.rows:
        figures = []
        for every in (256, 4096, a.inserts):
            directory = tempfile.mkdtemp(prefix="stop-index-", dir=a.dir)
            try:
                ix = open_index(directory, n)
                figures.append(per_row_us(ix, n, a.batch, every, a.inserts))
                ix.close()
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        print(f"{n:>12,} " + " ".join(f"{f:>11.1f}" for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
