"""From a parsed query to the reply line: policy, lookup, record, store.

This is the one place where spec 2.3, 3 and 4 are decided: which
connection is meant, NO-USER for strangers' and accepted sockets, the error
policy, the address form's tokens-only rule, the ~/.ident opt-in, the
quota, and "the reply only after the record is durable".
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from stop import records, wire
from stop.config import Config, address_networks
from stop.errors import NoUser, Overloaded, StopError
from stop.hooks import Hooks
from stop.interfaces import IAccounts, IOptIn, IRecordStore, ISocketLookup
from stop.limits import Gate
from stop.logsetup import QuickLogger
from stop.model import Connection, Endpoint
from stop.optin import OptIn
from stop.os.accounts import Accounts
from stop.os.common import synchronously
from stop.recursion import DISABLED, WALK_FAILED
from stop.tokens import Tokens

#: Seconds between two "quota reached" warnings.
QUOTA_WARN_INTERVAL = 300.0


@dataclass(frozen=True)
class Query:
    """One request with where it came from.

    ``requester`` is the ident client's end of the query connection;
    ``server`` is this host's end of it (the address the query arrived on).
    """

    request: wire.Request
    requester: Endpoint
    server: Endpoint


class Answerer:
    """Answers queries; see the module docstring.

    :param clock: an IReactorTime (the reactor, or a Clock in tests).
    :param optin: the :class:`~stop.interfaces.IOptIn` (default: read
        ``~/.ident`` in this thread at each query).
    :param accounts: the :class:`~stop.interfaces.IAccounts` giving a uid's
        name and home (default: passwd read in this thread, cached).
    :param run: ``run(f, *args) -> Deferred``: where a ``blocking`` socket
        lookup runs (:func:`stop.os.common.in_thread_pool` in the daemon; default:
        in this thread).
    """

    def __init__(self, config: Config, lookup: ISocketLookup, store: IRecordStore, clock,
                 optin: Optional[IOptIn] = None, accounts: Optional[IAccounts] = None,
                 host_name: Optional[str] = None, process_state=None,
                 hooks: Optional[Hooks] = None, recursion=None,
                 run: Callable[..., defer.Deferred] = synchronously):
        self._config = config
        self._hooks = hooks if hooks is not None else Hooks()
        self._lookup = ISocketLookup(lookup)
        # A lookup that reads whole tables (procfs, psutil) runs in a worker
        # thread; netlink's microseconds stay in this one.
        self._lookup_blocking = bool(getattr(lookup, "blocking", False))
        self._run = run
        self._record_store = IRecordStore(store)
        self._clock = clock
        self._optin = IOptIn(optin) if optin is not None else OptIn(log_paths=config.log_users)
        self._accounts = (IAccounts(accounts) if accounts is not None
                          else Accounts.from_config(config, clock))
        self._host = host_name or socket.gethostname()
        self._tokens = Tokens(config.hash)
        self._gate = Gate(config.max_lookups, config.lookup_queue)
        self._address_form_nets = address_networks(config.address_form)
        self._last_quota_warning: Optional[float] = None
        #: stop.sv.ProcessState for SV/SV_REC; None: they save ID records.
        self._process_state = process_state
        #: stop.recursion.Recursion for ID_REC/SV_REC (spec 6); None: they
        #: are answered like ID/SV and their record says "disabled".
        self._recursion = recursion
        self.log = QuickLogger()

    @property
    def tokens(self) -> Tokens:
        return self._tokens

    def reconfigure(self, config: Config) -> None:
        """Answer from now on with ``config``, a reload's new settings (only
        those in stop.config.RELOADABLE differ from the running ones).
        A query in progress sees the new values from its next step on."""
        self._config = config
        self._address_form_nets = address_networks(config.address_form)
        self._gate.resize(config.max_lookups, config.lookup_queue)
        if isinstance(self._optin, OptIn):
            self._optin.log_paths = config.log_users

    # -- the public entry points -------------------------------------------

    def answer(self, query: Query) -> "defer.Deferred[bytes]":
        """The reply line for ``query``. Never fails: every error, expected
        or not, becomes a reply per the error policy, and is logged."""
        if query.request.address is not None and not self._address_form_allowed(query.requester):
            token = self._tokens.random()
            self._log(query, f"address form not allowed for this requester: random token {token}")
            return defer.succeed(wire.format_token(query.request.ports, token))
        if query.request.recursive and self._recursion is not None:
            return self._answer_recursive(query)
        return self._gated(query)

    def error_reply(self, ports: tuple[int, int], error: StopError,
                    address_form: bool = False) -> bytes:
        """The reply for an error under the configured policy (spec 2.3, 3.3)."""
        if address_form or self._config.errors == "token":
            return wire.format_token(ports, self._tokens.random())
        word = error.word if self._config.errors == "normal" else "UNKNOWN-ERROR"
        return wire.format_error(ports, word)

    # -- internals ------------------------------------------------------------

    def _address_form_allowed(self, requester: Endpoint) -> bool:
        nets = self._address_form_nets
        if nets is None:
            return True
        addr = ipaddress.ip_address(requester.host.split("%", 1)[0])
        return any(addr in net for net in nets)

    def _gated(self, query: Query) -> "defer.Deferred[bytes]":
        """The reply to ``query``, answered with a place in the lookup gate
        (``max_lookups``; up to ``lookup_queue`` wait for one, the rest get
        the Overloaded reply). Never fails."""
        waiting = self._gate.enter()
        if waiting is None:  # the common case: no Deferred of the gate's
            return self._in_gate(query)
        waiting.addCallbacks(self._let_in, self._failed, callbackArgs=(query,),
                             errbackArgs=(query,))
        return waiting

    def _let_in(self, _, query: Query) -> "defer.Deferred[bytes]":
        return self._in_gate(query)

    def _in_gate(self, query: Query) -> "defer.Deferred[bytes]":
        # Holding a place: it is given back once the reply is known, by one
        # callback pair that also turns a failure into its reply.
        try:
            d = self._answer(query)
        except BaseException:
            self._gate.leave()
            return defer.succeed(self._failed(Failure(), query))
        d.addCallbacks(self._leave, self._leave_failed, errbackArgs=(query,))
        return d

    def _leave(self, reply: bytes) -> bytes:
        self._gate.leave()
        return reply

    def _leave_failed(self, failure: Failure, query: Query) -> bytes:
        self._gate.leave()
        return self._failed(failure, query)

    def _connection(self, query: Query) -> Connection:
        p1, p2 = query.request.ports
        if query.request.address is not None:
            local = Endpoint("", p1)
            remote = Endpoint(query.request.address, p2)
        else:
            local = Endpoint(query.server.host, p1)
            remote = Endpoint(query.requester.host, p2)
        conn = self._lookup.find(local, remote)
        if conn is None:
            raise NoUser("no such connection")
        if conn.accepted:
            raise NoUser("accepted connection (a service), not opened by this host")
        return conn

    def _answer(self, query: Query) -> defer.Deferred:
        # Plain callbacks, not inlineCallbacks: this runs for every query.
        # The common case (netlink, a uid seen a moment ago) makes no thread
        # hop: the lookup and the cached account are answered here. Always
        # a Deferred (the store's, at the end of every path), or raises.
        if self._lookup_blocking:
            d = self._run(self._connection, query)
            d.addCallback(self._with_account, query)
            return d
        return self._with_account(self._connection(query), query)

    def _with_account(self, conn: Connection, query: Query):
        account = self._accounts.cached(conn.uid)
        if account is None:  # NSS may stall: resolved in a worker thread
            d = self._accounts.resolve(conn.uid)
            d.addCallback(lambda account: self._answer_for(query, conn, *account))
            return d
        return self._answer_for(query, conn, *account)

    def _answer_for(self, query: Query, conn: Connection, name: Optional[str],
                    home: Optional[str]):
        request = query.request
        now = self._clock.seconds()
        over_quota = self._over_quota(now)
        if not (over_quota or request.recursive or (
                request.type != wire.ID and self._process_state is not None)):
            # An ID record (also SV's when no process state is kept): its
            # bytes made at once, without the dict.
            data = records.id_record(request=request, requester=query.requester,
                                     server=query.server, connection=conn, user_name=name,
                                     now=now, host=self._host)
            return self._save_data(query, conn, name, home, data, sv=False)
        record = records.base_record(
            request=self._request_fields(request), requester=query.requester,
            server=query.server, connection=conn, user_name=name, now=now, host=self._host)
        if over_quota:
            record["quota"] = "reached"
        if request.recursive:
            recursion = self._recursion
            if recursion is not None and recursion.enabled and self._process_state is not None:
                return self._walk_for_recursion(query, conn, name, home, record, over_quota)
            # Answered like ID / SV; the record says why no one is asked.
            enabled = recursion is not None and recursion.enabled
            record["recursion"] = {"sid": request.sid, "targets": [],
                                   "status": WALK_FAILED if enabled else DISABLED}
        if (request.type in (wire.SV, wire.SV_REC) and not over_quota
                and self._process_state is not None):
            d = self._process_state.collect(conn)
            d.addCallback(lambda state: self._save(query, conn, name, home,
                                                    {**record, **state}, sv=True))
            return d
        return self._save(query, conn, name, home, record, sv=False)

    def _save(self, query: Query, conn: Connection, name, home, record: dict,
               sv: bool) -> defer.Deferred:
        return self._save_data(query, conn, name, home, records.canonical(record), sv,
                               record.get("recursion"))

    def _save_data(self, query: Query, conn: Connection, name, home, data: bytes, sv: bool,
                   plan: Optional[dict] = None) -> defer.Deferred:
        # An SV token is the hash of the exact stored bytes (spec 4).
        token = self._tokens.of_record(data) if sv else self._tokens.random()
        d = self._record_store.save(token, data)
        d.addCallback(self._stored, query, conn, name, home, token, data)
        if plan and plan.get("targets"):
            d.addCallback(self._recurse_after_reply, token, query.request, plan)
        return d

    # -- recursion (spec 6; stop.recursion) ---------------------------------

    def _answer_recursive(self, query: Query) -> "defer.Deferred[bytes]":
        """ID_REC / SV_REC: the loop and per-requester guards, then the
        same path as ID / SV with a walk for the targets."""
        recursion = self._recursion
        if recursion.is_loop(query.request, query.requester):
            token = self._tokens.random()
            self._log(query, f"loop: the same sid, requester and port pair within "
                             f"{self._config.loop_window:g} s: random token {token}, "
                             f"not processed", warn=True)
            return defer.succeed(wire.format_token(query.request.ports, token))
        host = query.requester.host
        if not recursion.admit(host):
            return defer.succeed(self._failed(Failure(Overloaded(
                "recursive requests in progress from this address "
                "(recursion_max_per_requester)")), query))
        d = self._gated(query)
        d.addBoth(recursion.release, host)
        return d

    def _walk_for_recursion(self, query: Query, conn: Connection, name, home, record: dict,
                            over_quota: bool) -> defer.Deferred:
        """Walk the processes (for ID_REC too: the targets come from the
        walk), put the targets in the record, save it; SV_REC keeps the
        whole process state (not over the quota), ID_REC only the targets."""
        request = query.request
        recursion = self._recursion
        sv = request.type == wire.SV_REC and not over_quota

        def walked(state: dict) -> defer.Deferred:
            full = {**record, **state} if sv else record
            full["recursion"] = recursion.plan(request, state.get("processes"))
            return self._save(query, conn, name, home, full, sv=sv)

        def not_walked(failure: Failure) -> defer.Deferred:
            # ID_REC does not need the walk for its own record: answer as ID.
            self.log.failure("the process walk for {query} failed; the record has no "
                             "recursion targets", failure, query=query)
            record["recursion"] = recursion.plan(request, None, walk_failed=True)
            return self._save(query, conn, name, home, record, sv=False)

        d = self._process_state.collect(conn)
        if sv:
            d.addCallback(walked)  # an SV_REC walk that fails fails like SV's
        else:
            d.addCallbacks(walked, not_walked)
        return d

    def _recurse_after_reply(self, reply: bytes, token: str, request: wire.Request,
                             plan: dict) -> bytes:
        # The reply is formed: the server writes it when this Deferred fires,
        # in this same call chain. The questions start in a later reactor
        # turn, so none can go out before the reply (spec 4), and nothing
        # they bring back can reach the requester.
        self._clock.callLater(0, self._recursion.start, token, request, plan)
        return reply

    def _stored(self, _, query: Query, conn: Connection, name, home, token: str,
                data: bytes):
        self._hooks.saved(token, data)  # returns at once; failures are logged
        request = query.request
        who = f"uid {conn.uid}" + (f" ({name})" if name and self._config.log_users else "")
        if (request.type == wire.ID and request.address is None and name and home
                and self._config.user_optin):
            d = self._optin.allows(conn.uid, home, query.requester.host)
            d.addCallback(self._reply, query, conn, name, who, token)
            return d
        return self._reply(False, query, conn, name, who, token)

    def _reply(self, send_name: bool, query: Query, conn: Connection, name, who: str,
               token: str) -> bytes:
        ports = query.request.ports
        if send_name:
            try:
                reply = wire.format_user(ports, "UNIX", name)
            except ValueError:
                pass  # a name that cannot go on the wire gets a token
            else:
                self._log(query, f"{conn.local}->{conn.remote} {who}: user name sent "
                                 f"(~/.ident), record {token}")
                return reply
        self._log(query, f"{conn.local}->{conn.remote} {who}: token {token}")
        return wire.format_token(ports, token)

    @staticmethod
    def _request_fields(request: wire.Request) -> dict:
        return {"type": request.type, "sid": request.sid, "ports": list(request.ports),
                "address": request.address}

    def _over_quota(self, now: float) -> bool:
        quota = self._config.quota_bytes
        if not quota or self._record_store.usage() < quota:
            return False
        if self._last_quota_warning is None or now - self._last_quota_warning >= QUOTA_WARN_INTERVAL:
            self._last_quota_warning = now
            self.log.warn("storage quota of {mb} MiB reached ({used} bytes used): SV records "
                          "are saved at ID size; nothing is deleted",
                          mb=self._config.quota_mb, used=self._record_store.usage())
        return True

    def _failed(self, failure: Failure, query: Query) -> bytes:
        if failure.check(StopError):
            error = failure.value
            # A budget hit is worth a warning: the admin may need to raise it.
            self._log(query, f"{error.word} ({error})", warn=bool(failure.check(Overloaded)))
        else:
            self.log.failure("unexpected error answering {query}", failure, query=query)
            error = StopError("internal error")
        return self.error_reply(query.request.ports, error, query.request.address is not None)

    def _log(self, query: Query, outcome: str, warn: bool = False) -> None:
        r = query.request
        kind = r.type + (f":{r.sid}" if r.sid is not None else "") + (
            f" for {r.address}" if r.address else "")
        requester = str(query.requester)
        text = f"{requester} asked {r.ports[0]}, {r.ports[1]} {kind}: {outcome}"
        # One line per query is the daemon's biggest single cost after the
        # kernel: the text is made here with an f-string, and the format
        # has no fields left for twisted.logger's (pure Python) formatter
        # to fill. The parts still travel in the event for JSON observers.
        emit = self.log.warn if warn else self.log.info
        emit(text.replace("{", "{{").replace("}", "}}"), requester=requester,
             ports=r.ports, type=r.type, sid=r.sid, address=r.address, outcome=outcome)
