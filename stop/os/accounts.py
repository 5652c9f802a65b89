"""Account facts the answer needs, without blocking the reactor thread.

``pwd.getpwuid`` goes through NSS (LDAP, SSSD on a real fleet: seconds
when a server is slow) and ``~/.ident`` may sit on an NFS home that hangs.
So both are read in worker threads, and what was read is kept in a bounded
cache (size and age) so the common case — a uid asked about a moment ago —
answers at once, in the reactor thread, with no thread hop:

* :class:`ThreadCache`: key -> value, read by a blocking function in a
  worker thread on a miss; concurrent misses of one key share one read (one
  thread, however many queries wait); each waiter gives up after a timeout
  (the read goes on and fills the cache); one slow key never delays
  another;
* :class:`Accounts`: uid -> (login name, home directory), on it.

The ``~/.ident`` reader (:class:`stop.optin.OptIn`) uses a ThreadCache
too. Settings: ``account_cache_size``, ``account_cache_age``,
``account_timeout``.
"""

from __future__ import annotations

import pwd
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from stop.interfaces import IAccounts
from stop.os.common import synchronously

log = Logger()

#: What :meth:`ThreadCache.cached` returns for a key it does not hold.
MISSING = object()


class ThreadCache:
    """A bounded, aging cache whose misses are read in a worker thread.

    :param read: ``read(key) -> value``, blocking; it should not raise (a
        failure is logged, ``default`` is given, nothing is cached).
    :param clock: an IReactorTime (the reactor; a Clock in tests).
    :param run: ``run(f, *args) -> Deferred``: where ``read`` runs
        (:func:`stop.os.common.in_thread_pool` in the daemon).
    :param max_size: most keys kept (the least recently used go first).
    :param max_age: seconds a value is reused.
    :param timeout: seconds a waiter waits before it gets ``default``.
    :param default: what a waiter gets when the read failed or timed out.
    :param what: names the values in log lines (``"account"``).
    """

    def __init__(self, read: Callable[[Any], Any], clock, run: Callable[..., defer.Deferred],
                 max_size: int = 1024, max_age: float = 60.0, timeout: float = 10.0,
                 default: Any = None, what: str = "value"):
        if max_size < 1 or max_age < 0 or timeout <= 0:
            raise ValueError("max_size >= 1, max_age >= 0 and timeout > 0, please")
        self._read, self._clock, self._run = read, clock, run
        self._max_size, self._max_age, self._timeout = max_size, max_age, timeout
        self._default, self._what = default, what
        self._values: OrderedDict = OrderedDict()
        self._waiting: dict[Hashable, list[defer.Deferred]] = {}
        #: How many reads were started (tests, diagnostics).
        self.reads = 0

    def cached(self, key: Hashable) -> Any:
        """The value of ``key`` if held and fresh, else :data:`MISSING`.
        Never blocks."""
        entry = self._values.get(key)
        if entry is None:
            return MISSING
        value, when = entry
        if self._clock.seconds() - when > self._max_age:
            del self._values[key]
            return MISSING
        self._values.move_to_end(key)
        return value

    def fetch(self, key: Hashable) -> defer.Deferred:
        """Fires with the value of ``key`` (from the cache, or read in a
        worker thread; one read per key at a time), or with ``default``
        after ``timeout`` seconds or when the read failed. Never fails."""
        value = self.cached(key)
        if value is not MISSING:
            return defer.succeed(value)
        d: defer.Deferred = defer.Deferred()
        waiters = self._waiting.get(key)
        if waiters is None:
            self._waiting[key] = [d]
            self.reads += 1
            self._run(self._read, key).addBoth(self._done, key)
        else:
            waiters.append(d)
        if not d.called:  # a synchronous run fired it already
            d.addTimeout(self._timeout, self._clock,
                         onTimeoutCancel=lambda result, t: self._gave_up(key, t))
        return d

    def _gave_up(self, key: Hashable, timeout: float) -> Any:
        log.warn("{what} lookup for {key} takes more than {timeout:g} s (NSS or file "
                 "system slow?): answered without it", what=self._what, key=key,
                 timeout=timeout)
        return self._default

    def _done(self, result: Any, key: Hashable) -> None:
        waiters = self._waiting.pop(key, [])
        if isinstance(result, Failure):
            log.failure("{what} lookup for {key} failed", result, what=self._what, key=key)
            result = self._default
        else:
            self._values[key] = (result, self._clock.seconds())
            self._values.move_to_end(key)
            while len(self._values) > self._max_size:
                self._values.popitem(last=False)
        for d in waiters:
            if not d.called:  # not given up on
                d.callback(result)


def read_account(uid: int) -> tuple[Optional[str], Optional[str]]:
    """(login name, home directory) of ``uid`` from the passwd database
    (NSS: may block), (None, None) when it has no account."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return None, None
    return pw.pw_name, pw.pw_dir


@implementer(IAccounts)
class Accounts:
    """uid -> (name, home): see the module docstring and
    :class:`stop.interfaces.IAccounts`.

    :param clock: the reactor (a Clock in tests).
    :param run: where the passwd lookup runs (default: in this thread).
    :param read: ``uid -> (name, home)`` (default :func:`read_account`).
    """

    def __init__(self, clock, run: Callable[..., defer.Deferred] = synchronously,
                 max_size: int = 1024, max_age: float = 60.0, timeout: float = 10.0,
                 read: Callable[[int], tuple[Optional[str], Optional[str]]] = read_account):
        self.cache = ThreadCache(read, clock, run, max_size, max_age, timeout,
                                 default=(None, None), what="account")

    @classmethod
    def from_config(cls, config, clock, run: Callable[..., defer.Deferred] = synchronously,
                    **kw) -> "Accounts":
        return cls(clock, run, config.account_cache_size, config.account_cache_age,
                   config.account_timeout, **kw)

    def cached(self, uid: int) -> Optional[tuple[Optional[str], Optional[str]]]:
        value = self.cache.cached(uid)
        return None if value is MISSING else value

    def resolve(self, uid: int) -> defer.Deferred:
        return self.cache.fetch(uid)


__all__ = ["ThreadCache", "Accounts", "read_account", "MISSING"]
