"""stop.os.accounts: the bounded, aging cache whose misses are read in a
worker thread (here: a run function that holds each read until the test
finishes it), the Accounts on it, and the ~/.ident cache of stop.optin.
The same with a real thread and a real reactor:
tests/integration/test_slow_accounts.py."""

from __future__ import annotations

import os
import pwd

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from stop.config import Config
from stop.interfaces import IAccounts, IOptIn
from stop.optin import OptIn
from stop.os.accounts import MISSING, Accounts, ThreadCache, read_account


class HeldRun:
    """``run(f, *args)`` that holds each call until :meth:`finish`."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, index: int = 0, error: Exception | None = None):
        f, args, d = self.calls.pop(index)
        if error is not None:
            d.errback(error)
        else:
            d.callback(f(*args))


def fired(d):
    out = []
    d.addBoth(out.append)
    return out


def cache(clock, run, **kw):
    reads = []

    def read(key):
        reads.append(key)
        return f"value of {key}"
    kw.setdefault("default", "default")
    return ThreadCache(read, clock, run, **kw), reads


def test_a_hit_is_answered_at_once_without_a_thread():
    clock, run = Clock(), HeldRun()
    c, reads = cache(clock, run)
    assert c.cached("a") is MISSING
    first = fired(c.fetch("a"))
    assert first == [] and len(run.calls) == 1
    run.finish()
    assert first == ["value of a"]
    assert c.cached("a") == "value of a"
    assert fired(c.fetch("a")) == ["value of a"] and run.calls == [] and reads == ["a"]


def test_concurrent_misses_of_one_key_share_one_read_others_are_independent():
    clock, run = Clock(), HeldRun()
    c, reads = cache(clock, run)
    waiting = [fired(c.fetch("slow")) for _ in range(5)]
    other = fired(c.fetch("other"))
    assert len(run.calls) == 2 and c.reads == 2
    run.finish(1)  # "other" completes while "slow" still reads
    assert other == ["value of other"] and waiting == [[]] * 5
    run.finish(0)
    assert waiting == [["value of slow"]] * 5 and reads == ["other", "slow"]  # one read each


def test_a_waiter_gives_up_after_the_timeout_and_the_read_still_fills_the_cache():
    clock, run = Clock(), HeldRun()
    c, _ = cache(clock, run, timeout=5)
    late = fired(c.fetch("k"))
    clock.advance(4.9)
    assert late == []
    clock.advance(0.2)
    assert late == ["default"]
    # A new query waits for the same read (no second thread for it).
    again = fired(c.fetch("k"))
    assert len(run.calls) == 1
    run.finish()
    assert again == ["value of k"] and late == ["default"]
    assert c.cached("k") == "value of k"


def test_values_age_out_and_the_size_is_bounded():
    clock, run = Clock(), HeldRun()
    c, reads = cache(clock, run, max_size=2, max_age=60)
    for key in ("a", "b"):
        c.fetch(key)
        run.finish()
    clock.advance(30)
    assert c.cached("a") == "value of a"  # now the most recently used
    c.fetch("c")
    run.finish()
    assert c.cached("b") is MISSING  # the least recently used went
    assert c.cached("a") == "value of a" and c.cached("c") == "value of c"
    clock.advance(31)
    assert c.cached("a") is MISSING and c.cached("c") == "value of c"
    clock.advance(30)
    assert c.cached("c") is MISSING


def test_a_failed_read_gives_the_default_and_is_not_kept():
    clock, run = Clock(), HeldRun()
    c, _ = cache(clock, run)
    out = fired(c.fetch("k"))
    run.finish(error=OSError("NSS exploded"))
    assert out == ["default"] and c.cached("k") is MISSING


def test_bad_parameters():
    for kw in ({"max_size": 0}, {"max_age": -1}, {"timeout": 0}):
        with pytest.raises(ValueError):
            cache(Clock(), HeldRun(), **kw)


def test_accounts_read_passwd():
    accounts = Accounts(Clock())
    verifyObject(IAccounts, accounts)
    me = pwd.getpwuid(os.getuid())
    assert accounts.cached(os.getuid()) is None
    assert fired(accounts.resolve(os.getuid())) == [(me.pw_name, me.pw_dir)]
    assert accounts.cached(os.getuid()) == (me.pw_name, me.pw_dir)
    nobody = max(p.pw_uid for p in pwd.getpwall()) + 12345
    assert read_account(nobody) == (None, None)
    assert fired(accounts.resolve(nobody)) == [(None, None)]


def test_accounts_from_config():
    clock, run = Clock(), HeldRun()
    config = Config(account_cache_size=3, account_cache_age=7, account_timeout=2)
    accounts = Accounts.from_config(config, clock, run, read=lambda uid: (f"u{uid}", "/"))
    out = fired(accounts.resolve(1))
    clock.advance(2.1)
    assert out == [(None, None)]  # account_timeout
    run.finish()
    assert accounts.cached(1) == ("u1", "/")
    clock.advance(7.1)
    assert accounts.cached(1) is None  # account_cache_age


@pytest.mark.parametrize("bad", [{"account_cache_size": 0}, {"account_cache_age": -1},
                                 {"account_timeout": 0}])
def test_settings_are_checked(bad):
    from stop.errors import ConfigError
    with pytest.raises(ConfigError, match=next(iter(bad))):
        Config(**bad)


def test_optin_files_are_read_in_the_worker_and_kept(tmp_path):
    clock, run = Clock(), HeldRun()
    optin = OptIn.from_config(Config(account_cache_age=60), clock, run)
    verifyObject(IOptIn, optin)
    path = tmp_path / ".ident"
    path.write_text("192.0.2.7\n")
    os.chmod(path, 0o600)
    uid = os.getuid()
    first = fired(optin.allows(uid, str(tmp_path), "192.0.2.7"))
    assert first == [] and len(run.calls) == 1  # read in the worker
    run.finish()
    assert first == [True]
    path.write_text("192.0.2.8\n")
    # Kept for account_cache_age: no read, the old content.
    assert fired(optin.allows(uid, str(tmp_path), "192.0.2.7")) == [True]
    assert run.calls == []
    clock.advance(61)
    later = fired(optin.allows(uid, str(tmp_path), "192.0.2.7"))
    run.finish()
    assert later == [False]


def test_optin_read_that_hangs_answers_not_listed():
    clock, run = Clock(), HeldRun()
    optin = OptIn.from_config(Config(account_timeout=3), clock, run)
    out = fired(optin.allows(os.getuid(), "/nfs/hung", "192.0.2.7"))
    clock.advance(3.1)
    assert out == [False]
