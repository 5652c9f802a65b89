"""The SV part of a record: the process walk and the system facts, run off
the reactor thread.

:class:`ProcessState` is what the answerer calls for SV and SV_REC; it
turns the settings (``sv_fields``, ``open_files``, ``walk_max_*``) into one
:func:`stop.walk.walk` and one :meth:`stop.sysinfo.SystemInfo.collect` call, in a
worker thread so the reactor keeps answering while ``/proc`` is read.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from stop.interfaces import IProcessInspector
from stop.model import Connection
from stop.os.common import PROCESS_FIELDS, SYSTEM_FIELDS, synchronously
from stop.sysinfo import SystemInfo
from stop.walk import Budget, walk


def selected_fields(names: tuple[str, ...]) -> tuple[frozenset, frozenset]:
    """``sv_fields`` -> (process fields, system fields); ``all`` selects
    every one. Names are checked by the config."""
    chosen = set(PROCESS_FIELDS + SYSTEM_FIELDS) if "all" in names else set(names)
    return frozenset(chosen & set(PROCESS_FIELDS)), frozenset(chosen & set(SYSTEM_FIELDS))



class ProcessState:
    """Collects the process state of spec 5 for one connection.

    :param config: a :class:`stop.config.Config`.
    :param inspector: an :class:`stop.interfaces.IProcessInspector`.
    :param run: ``run(f, *args) -> Deferred``: where blocking work runs
        (:func:`stop.os.common.in_thread_pool` in the daemon).
    :param addresses: which addresses are this host's (a
        :class:`stop.recursion.LocalAddresses`, read on the reactor thread
        for each walk); None: every loopback address.
    """

    def __init__(self, config, inspector, run: Callable[..., defer.Deferred] = synchronously,
                 addresses=None):
        self._inspector = IProcessInspector(inspector)
        self._addresses = addresses
        self._run = run
        self._process_fields, self._system_fields = selected_fields(config.sv_fields)
        self._open_files = config.open_files
        self._budget = Budget(config.walk_max_processes, config.walk_max_fds)
        #: Boot time and OS version kept between records (stop.sysinfo).
        self._facts = SystemInfo()

    @property
    def backend(self) -> str:
        return self._inspector.name

    def collect(self, connection: Connection) -> defer.Deferred:
        """Fire with ``{"processes": <walk result>, "system": <system info>}``
        (JSON-able). Unreadable processes are noted inside, not raised."""
        here = self._addresses.current() if self._addresses is not None else None
        return self._run(self._collect, connection, here)

    def _collect(self, connection: Connection, here=None) -> dict:
        state = walk(self._inspector, connection, self._budget,
                     self._process_fields, self._open_files, here)
        return {"processes": state,
                "system": self._facts.collect(self._system_fields, state["users"])}
