"""Recursion (spec 6): whom an ID_REC / SV_REC asks, the loop table, which
addresses are this host's, and the outcomes saved as linked entries.

The answerer (:mod:`stop.answer`) uses one :class:`Recursion`:

1. :meth:`Recursion.is_loop` before anything else: a second request with
   the same (sid, requester address, port pair) within ``loop_window``
   seconds gets a random token and is not processed;
2. :meth:`Recursion.plan` turns the process walk's ``remote_connections``
   into the record's ``"recursion"`` part (the targets), before the record
   is saved and hashed;
3. :meth:`Recursion.start`, once the reply is on its way, asks every
   target through the :class:`stop.interfaces.IRecursiveClient` and saves
   each outcome, when known, as one entry linked to the record's token
   (``IRecordStore.save_linked``): the hashed record never changes.

See docs/recursion.rst.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from typing import Callable, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from stop import records, wire
from stop.client import Outcome
from stop.config import local_networks
from stop.interfaces import IRecordStore, IRecursiveClient
from stop.model import Endpoint, canonical_host

#: Version of the linked entries written here.
ENTRY_VERSION = 1
#: Directions (contract CONTRACTS.md section 2) whose remote end is asked.
TARGET_DIRECTIONS = ("inbound", "unknown")
#: Seconds between two readings of the interface addresses (local_addresses = auto).
ADDRESS_REFRESH = 60.0
#: Seconds between two "budget spent" warnings.
BUDGET_WARN_INTERVAL = 60.0

#: ``status`` of a record's ``"recursion"`` part.
ASKING = "asking"          # targets found; asked after the reply (outcomes: linked entries)
NO_TARGETS = "no-targets"  # the walk found no inbound connection: a dead end or the origin
DISABLED = "disabled"      # recursion_enabled = no
WALK_FAILED = "walk-failed"  # the process walk could not be made: no targets known


class LoopTable:
    """Remembers recursive requests for ``window`` seconds (spec 6's cycle
    and flood guard); at most ``size`` of them, the oldest dropped first.

    :param clock: an IReactorTime; entries expire by its ``seconds()``.
    """

    def __init__(self, window: float, size: int, clock):
        self.window = window
        self.size = size
        self._clock = clock
        self._seen: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, sid: int, requester: str, ports: tuple[int, int]) -> bool:
        """True when the same (``sid``, ``requester`` address, ``ports``)
        came within the window: a loop or a duplicate. Otherwise remember
        it, from now, and return False."""
        now = self._clock.seconds()
        seen = self._seen
        # Entries are in arrival order: the expired ones are at the front.
        while seen:
            first = next(iter(seen.values()))
            if now - first < self.window:
                break
            seen.popitem(last=False)
        key = (sid, requester, ports)
        when = seen.get(key)
        if when is not None and now - when < self.window:
            return True
        seen[key] = now
        seen.move_to_end(key)
        while len(seen) > self.size:
            seen.popitem(last=False)
        return False


class HostAddresses:
    """One snapshot of this host's addresses; ``address in snapshot``.

    :param addresses: canonical address literals.
    :param networks: ``ipaddress`` networks.
    """

    def __init__(self, addresses: Iterable[str] = (), networks: Iterable = ()):
        self.addresses = frozenset(addresses)
        self.networks = tuple(networks)

    def __contains__(self, address: str) -> bool:
        if address in self.addresses:
            return True
        try:
            addr = ipaddress.ip_address(canonical_host(address).split("%", 1)[0])
        except ValueError:
            return False
        return any(addr.version == net.version and addr in net for net in self.networks)

    def __repr__(self) -> str:
        return (f"HostAddresses({sorted(self.addresses)!r}, "
                f"{[str(n) for n in self.networks]!r})")


#: The loopback networks: every address in them is this host's (the kernel
#: routes all of 127.0.0.0/8 to lo).
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def interface_addresses() -> HostAddresses:
    """This host's interface addresses now (psutil: ``getifaddrs``); a
    loopback interface's address stands for its whole network.

    :raise OSError: the interfaces cannot be read.
    """
    import psutil
    addresses, networks = set(), list(LOOPBACK)
    for snics in psutil.net_if_addrs().values():
        for snic in snics:
            if snic.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                host = canonical_host(snic.address)
            except ValueError:
                continue
            addresses.add(host.split("%", 1)[0])
            if ipaddress.ip_address(host.split("%", 1)[0]).is_loopback and snic.netmask:
                try:
                    networks.append(ipaddress.ip_network(
                        f"{host.split('%', 1)[0]}/{snic.netmask}", strict=False))
                except ValueError:
                    pass
    return HostAddresses(addresses, networks)


class LocalAddresses:
    """Which addresses are this host's: the ``local_addresses`` setting.

    ``auto`` stands for the interface addresses, read again when the last
    reading is older than ``refresh`` seconds (so an address added later
    counts within a minute); the other entries are fixed addresses and
    CIDR blocks.

    :param clock: an IReactorTime. Call :meth:`current` on the reactor
        thread; the snapshot it returns is immutable and may go to threads.
    :param read: ``() -> HostAddresses`` (:func:`interface_addresses`).
    """

    log = Logger()

    def __init__(self, entries: tuple[str, ...], clock,
                 read: Callable[[], HostAddresses] = interface_addresses,
                 refresh: float = ADDRESS_REFRESH):
        self._auto, self._networks = local_networks(entries)
        self._clock = clock
        self._read = read
        self._refresh = refresh
        self._read_at: Optional[float] = None
        self._current = HostAddresses((), self._networks + (LOOPBACK if self._auto else ()))

    def current(self) -> HostAddresses:
        """The addresses now (re-read first when ``auto`` and stale)."""
        if not self._auto:
            return self._current
        now = self._clock.seconds()
        if self._read_at is None or not 0 <= now - self._read_at < self._refresh:
            self._read_at = now
            try:
                found = self._read()
            except Exception as e:  # keep the last reading; say why
                self.log.warn("cannot read this host's interface addresses ({err}); "
                              "keeping the last ones", err=str(e))
            else:
                self._current = HostAddresses(found.addresses,
                                              found.networks + self._networks)
        return self._current


def targets_of(walk: Optional[dict], here: HostAddresses) -> list[dict]:
    """The recursion targets in a walk result (``stop.walk.walk``): its
    ``remote_connections`` whose direction is inbound or unknown and whose
    remote address is not this host's, each once, in walk order, as
    ``{"address", "port", "local": {"address", "port"}, "direction",
    "direction_by"}``."""
    out, seen = [], set()
    for rc in (walk or {}).get("remote_connections", ()):
        direction = rc.get("direction", "unknown")
        if direction not in TARGET_DIRECTIONS:
            continue
        remote, local = rc.get("remote") or {}, rc.get("local") or {}
        address, port = remote.get("address"), remote.get("port")
        if not address or not port or address in here:
            continue
        key = (address, port, local.get("address"), local.get("port"))
        if key in seen:
            continue
        seen.add(key)
        out.append({"address": address, "port": port,
                    "local": {"address": local.get("address"), "port": local.get("port")},
                    "direction": direction, "direction_by": rc.get("direction_by", "none")})
    return out


def linked_entry(of: str, target: Endpoint, request: wire.Request, outcome: Outcome) -> dict:
    """The linked entry (contract CONTRACTS.md section 3) of one outcome."""
    local = outcome.local
    entry = {
        "version": ENTRY_VERSION, "kind": "recursion", "of": of,
        "target": target.as_dict(),
        "local": {"address": local.host if local else None, "port": local.port if local else None},
        "request": {"type": request.type, "sid": request.sid, "ports": list(request.ports)},
        "sent": records.iso_time(outcome.sent) if outcome.sent is not None else None,
        "answered": records.iso_time(outcome.answered) if outcome.answered is not None else None,
        "outcome": outcome.outcome,
    }
    for key in ("token", "error", "opsys", "user", "reply", "why"):
        value = getattr(outcome, key)
        if value is not None:
            entry[key] = value
    return entry


class Recursion:
    """Recursion for the answerer (see the module docstring).

    :param config: a :class:`stop.config.Config` (``recursion_*``,
        ``loop_*``).
    :param client: an :class:`IRecursiveClient`.
    :param store: the :class:`IRecordStore` the records go to (it must
        implement ``save_linked``).
    :param clock: an IReactorTime.
    :param addresses: a :class:`LocalAddresses` (built from the config when
        None).
    """

    log = Logger()

    def __init__(self, config, client, store, clock,
                 addresses: Optional[LocalAddresses] = None):
        self.enabled = config.recursion_enabled
        self.port = config.recursion_port
        self.max_targets = config.recursion_max_targets
        self.client = IRecursiveClient(client)
        self._store = IRecordStore(store)
        self._clock = clock
        self.addresses = addresses or LocalAddresses(config.local_addresses, clock)
        self.loops = LoopTable(config.loop_window, config.loop_table_size, clock)
        self.max_per_requester = config.recursion_max_per_requester
        self._busy: dict[str, int] = {}
        self._skipped_since_warning = 0
        self._last_budget_warning: Optional[float] = None

    def is_loop(self, request: wire.Request, requester: Endpoint) -> bool:
        """Whether ``request`` (recursive) from ``requester`` is a loop or a
        duplicate (remembered otherwise)."""
        return self.loops.seen(request.sid, requester.host, request.ports)

    def admit(self, requester: str) -> bool:
        """Whether one more recursive request from the address
        ``requester`` may be processed now (``recursion_max_per_requester``);
        when True, call :meth:`release` once it is answered."""
        n = self._busy.get(requester, 0)
        if n >= self.max_per_requester:
            return False
        self._busy[requester] = n + 1
        return True

    def release(self, result, requester: str):
        """One recursive request from ``requester`` is answered; passes
        ``result`` through (a Deferred callback)."""
        n = self._busy.get(requester, 1) - 1
        if n > 0:
            self._busy[requester] = n
        else:
            self._busy.pop(requester, None)
        return result

    def plan(self, request: wire.Request, walk: Optional[dict],
             walk_failed: bool = False) -> dict:
        """The record's ``"recursion"`` part: ``{"sid", "status", "targets"}``.

        :param walk: the walk result (``processes`` of an SV record), or
            None when there was none.
        :param walk_failed: the walk could not be made.
        """
        if not self.enabled:
            return {"sid": request.sid, "status": DISABLED, "targets": []}
        if walk_failed or walk is None:
            return {"sid": request.sid, "status": WALK_FAILED, "targets": []}
        targets = targets_of(walk, self.addresses.current())
        return {"sid": request.sid, "status": ASKING if targets else NO_TARGETS,
                "targets": targets}

    def start(self, token: str, request: wire.Request, plan: dict) -> defer.Deferred:
        """Ask every target of ``plan`` (the first ``recursion_max_targets``;
        the others are saved as skipped) and save each outcome linked to
        ``token`` as it comes.

        :return: a Deferred firing (None) once every outcome is saved or its
            saving failed (logged); it never fails.
        """
        done = []
        for n, target in enumerate(plan.get("targets", ())):
            where = Endpoint(target["address"], self.port)
            local = Endpoint(target["local"]["address"] or "", target["local"]["port"])
            question = wire.Request((target["port"], target["local"]["port"]), request.type,
                                    request.sid)
            if n >= self.max_targets:
                d = defer.succeed(Outcome(
                    "skipped", why="budget: targets per request (recursion_max_targets)",
                    local=Endpoint(local.host, None)))
            else:
                d = self.client.ask(where, local, question)
            d.addCallback(self._outcome, token, where, question)
            d.addErrback(self._failed, token, where)
            done.append(d)
        return defer.gatherResults(done).addCallback(lambda _: None)

    def _outcome(self, outcome: Outcome, token: str, target: Endpoint,
                 question: wire.Request) -> defer.Deferred:
        entry = linked_entry(token, target, question, outcome)
        detail = outcome.token or outcome.error or (
            f"{outcome.opsys} {outcome.user}" if outcome.outcome == "userid" else "") or ""
        why = f" ({outcome.why})" if outcome.why else ""
        text = (f"recursion for {token}: asked {target} about {question.ports[0]}, "
                f"{question.ports[1]} {question.type}:{question.sid}: "
                f"{outcome.outcome} {detail}".rstrip() + why)
        self.log.info(text.replace("{", "{{").replace("}", "}}"), of=token,
                      target=str(target), outcome=outcome.outcome)
        if outcome.outcome == "skipped" and (outcome.why or "").startswith("budget"):
            self._budget_spent(outcome.why)
        d = self._store.save_linked(token, records.canonical(entry))
        d.addErrback(self._not_saved, token, target)
        return d

    def _budget_spent(self, why: Optional[str]) -> None:
        self._skipped_since_warning += 1
        now = self._clock.seconds()
        if (self._last_budget_warning is None
                or now - self._last_budget_warning >= BUDGET_WARN_INTERVAL):
            self.log.warn("recursion: {n} target(s) skipped since the last warning, "
                          "the latest for {why}", n=self._skipped_since_warning, why=why)
            self._last_budget_warning = now
            self._skipped_since_warning = 0

    def _not_saved(self, failure, token: str, target: Endpoint) -> None:
        self.log.error("recursion for {token}: the outcome of asking {target} could not "
                       "be saved: {err}", token=token, target=str(target),
                       err=failure.getErrorMessage())

    def _failed(self, failure, token: str, target: Endpoint) -> None:
        self.log.failure("recursion for {token}: unexpected error asking {target}", failure,
                         token=token, target=str(target))

    def close(self) -> defer.Deferred:
        """Stop the client (questions in flight end as ``failed``)."""
        return self.client.close()
