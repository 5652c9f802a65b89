"""Record hooks (``hooks = NAME ...``): tell each of them of every saved record.

A hook never delays or changes a reply: :meth:`Hooks.saved` returns at once,
and whatever a hook raises or its Deferred fails with is logged.
"""

from __future__ import annotations

from typing import Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from stop.interfaces import IRecordHook

log = Logger()


class Hooks:
    """The configured hooks, in order (possibly none)."""

    def __init__(self, hooks: Sequence[IRecordHook] = ()) -> None:
        # Adapt on entry: a wrong object fails here, not at the first record.
        self.hooks = [IRecordHook(h) for h in hooks]

    def saved(self, token: str, record: bytes) -> None:
        """Tell every hook that ``record`` is durable under ``token``.
        Returns None at once; never raises."""
        for hook in self.hooks:
            d = defer.maybeDeferred(hook.recordSaved, token, record)
            d.addErrback(self._failed, hook, token)

    @staticmethod
    def _failed(failure, hook, token: str) -> None:
        log.failure("record hook {hook} failed on record {token}", failure,
                    hook=getattr(hook, "name", repr(hook)), token=token)

    def close(self) -> defer.Deferred:
        """Close every hook; fires when all have (failures are logged)."""
        ds = []
        for hook in self.hooks:
            d = defer.maybeDeferred(hook.close)
            d.addErrback(lambda f, h=hook: log.failure(
                "record hook {hook} failed to close", f, hook=getattr(h, "name", repr(h))))
            ds.append(d)
        return defer.DeferredList(ds).addCallback(lambda _: None)


class HooksService(Service):
    """Closes the hooks when the daemon stops."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    def stopService(self):
        Service.stopService(self)
        return self.hooks.close()
