"""Seed a record store offline through the store API (for the redemption
tests, before a daemon opens it):

    python -m tests.integration.seed_store STORAGE DATA_DIR < entries.json

``entries.json``: ``[{"token": T, "record": TEXT, "linked": [TEXT, ...]}, ...]``
(each TEXT the exact JSON text to store). Runs its own reactor, so it is a
process of its own.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, task

from stop.storage import make_store


@defer.inlineCallbacks
def seed(reactor, storage: str, data_dir: str, entries: list):
    store = make_store(storage, data_dir, reactor=reactor)
    store.open()
    try:
        for e in entries:
            yield store.save(e["token"], e["record"].encode("utf-8"))
            for linked in e.get("linked", []):
                yield store.save_linked(e["token"], linked.encode("utf-8"))
    finally:
        yield store.close()


if __name__ == "__main__":
    task.react(seed, [sys.argv[1], sys.argv[2], json.load(sys.stdin)])
