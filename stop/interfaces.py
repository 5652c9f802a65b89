"""Every swappable part of stop, as zope interfaces.

Each is a contract: implementations declare ``@implementer(I...)`` and the
tests check them with ``zope.interface.verify.verifyObject``. Site plugins
(see README.rst, "Plugins") provide the same interfaces.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISocketLookup(Interface):
    """Finds the established TCP connection behind an ident query.

    Implementations (``stop.os``): ``netlink`` (Linux sock_diag, exact
    4-tuple), ``procfs`` (Linux ``/proc/net/tcp{,6}``), ``psutil``
    (portable). Lookups are synchronous. One that can take milliseconds or
    block sets ``blocking = True`` and is then called in a worker thread; a
    provider without the attribute is taken as not blocking (called in the
    reactor thread, so it must answer in microseconds).
    """

    name = Attribute("Short name of the backend, e.g. 'netlink'; used in logs and config.")
    blocking = Attribute("True when find() may take milliseconds or block (reads whole "
                         "tables): the answerer then calls it off the reactor thread.")

    def find(local, remote):
        """Find the established TCP connection between ``local`` and ``remote``.

        :param local: :class:`stop.model.Endpoint` on this host; its ``host``
            may be ``""`` to mean any local address (the address form).
        :param remote: :class:`stop.model.Endpoint`, the other end.
        :return: a :class:`stop.model.Connection` whose state is ESTABLISHED
            and whose ends equal the ones asked for, or ``None`` when there is
            none. Listening and TIME_WAIT sockets are never returned.
            ``accepted`` is :mod:`stop.os.direction`'s decision (inbound).
        :raise stop.errors.LookupFailed: when the kernel could not be asked.
        """

    def close():
        """Release any kernel handles (netlink sockets). Idempotent."""


class IAccounts(Interface):
    """uid -> (login name, home directory), for records and ``~/.ident``.

    Implementation: ``stop.os.accounts.Accounts``. The passwd database goes
    through NSS, which can stall for seconds (LDAP, SSSD): lookups run in a
    worker thread and are kept in a bounded cache, so the common case is a
    cache hit answered in the reactor thread.
    """

    def cached(uid):
        """(name, home) of ``uid`` when known now, without blocking, else
        None. Either item is None when the uid has no account."""

    def resolve(uid):
        """A Deferred firing (name, home) of ``uid``; (None, None) when it
        has no account or the lookup took longer than the configured
        timeout. Never fails; never blocks the calling thread."""


class IOptIn(Interface):
    """The ``~/.ident`` opt-in (spec 3.4). Implementation: ``stop.optin.OptIn``."""

    def allows(uid, home, host):
        """A Deferred firing True when ``home/.ident``, belonging to
        ``uid``, lists ``host`` (an address literal). Never blocks the
        calling thread on the file system (an NFS home may hang)."""


class IRecordStore(Interface):
    """Durable storage of records, keyed by token.

    A record is the exact bytes of canonical UTF-8 JSON (``stop.records``);
    a store keeps them byte for byte, so the hash of an SV record can be
    verified later. Records are append-only: nothing is ever changed or
    deleted by the daemon. Entries linked to a record (``save_linked``:
    the outcomes of recursive requests, spec 6) are kept beside it and
    never change its bytes.

    Implementations: ``memory`` (tests), ``flat`` and ``gzip``
    (``stop.storage``). Writes may be grouped (one fsync for many records),
    but ``save`` fires only once its record is durable.
    """

    name = Attribute("Short name of the backend, e.g. 'flat'.")

    def open():
        """Open (creating when needed) the store. Called once, after twistd
        has dropped privileges, before the first ``save``.

        :raise stop.errors.StoreFailed: the store cannot be opened (path,
            permissions); the message says which and why.
        """

    def save(token, record):
        """Store ``record`` (bytes) under ``token`` (str).

        :return: a Deferred that fires with ``None`` once the record is
            durable (per the ``fsync`` setting), or fails with
            :class:`stop.errors.StoreFailed`. The caller sends its reply
            only after it fired.
        """

    def get(token):
        """The stored bytes of ``token``, or ``None``. Synchronous; reads
        what is durable on disk (usable from ``stopctl`` while the daemon
        runs)."""

    def integrity(token):
        """Whether the stored entry of ``token`` is intact as written (the
        store's own checksum: framing, CRC, SHA-256 of the record bytes);
        False for an unknown token. Synchronous; ``stopctl verify`` uses it
        for every record type."""

    def records():
        """Iterate ``(token, record_bytes)`` over every stored record,
        oldest first (records only, never linked entries). Synchronous."""

    def save_linked(token, entry):
        """Append ``entry`` (bytes: canonical JSON of one object, made with
        stop.records.canonical; same size limit as a record) linked to the
        stored record of ``token``. Linked entries never change the record's
        own bytes (an SV token stays the hash of exactly the record) and take
        part in the store's tamper evidence like records do.

        :return: a Deferred firing None once the entry is durable (same
            fsync rules as save), or failing with StoreFailed (unknown token,
            bad entry, closed or read-only store, OS error)."""

    def linked(token):
        """The entries linked to ``token``: a list of bytes, oldest first;
        [] when there are none or the token is unknown. Synchronous; reads
        what is durable (usable from stopctl while the daemon runs).

        :raise stop.errors.StoreFailed: a linked entry is damaged, or an OS
            error."""

    def usage():
        """Bytes this store occupies on disk, records and linked entries
        (what the quota counts). Cheap: called for every request."""

    def close():
        """Flush what is pending and release files.

        :return: a Deferred that fires when every pending ``save`` has
            completed.
        """


class IProcessInspector(Interface):
    """Reads the processes of this host for the SV process walk (spec 5).

    Implementations: ``stop.os.linux.procfs`` (Linux ``/proc`` + sock_diag)
    and ``stop.os.portable`` (psutil). The walk itself (``stop.walk``) is
    backend-independent: it asks for one :class:`IProcessScan` per walk, so
    concurrent walks in threads do not share mutable state; what an
    inspector keeps between walks (procfs: its inode index,
    ``stop.os.linux.fdindex``) is locked and checked before each use.
    """

    name = Attribute("Short name of the backend: 'procfs' or 'psutil'.")

    def begin(max_fds):
        """Start one walk.

        :param max_fds: at most this many descriptors are read in the walk,
            counting the index scan of every process (int > 0).
        :return: a fresh :class:`IProcessScan`. Blocking I/O happens only in
            its methods; call them off the reactor thread.
        """


class IProcessScan(Interface):
    """One walk's view of the processes; made by ``IProcessInspector.begin``.

    Descriptors are JSON-able dicts with ``fd`` and ``kind``: ``"socket"``
    (``inode`` when known, ``family`` as ``"AF_INET"``/``"AF_INET6"``/
    ``"AF_UNIX"``/``"unknown"``, ``type`` ``"SOCK_STREAM"``...,
    ``local``/``remote`` as ``{"address", "port"}`` for IP sockets, ``state``,
    ``direction`` ``"inbound"``/``"outbound"``/``"unknown"`` and
    ``direction_by`` (the signal that decided, :mod:`stop.os.direction`) for
    connected TCP, ``path`` and ``peer_inode`` for UNIX sockets), ``"pipe"``
    (``inode``), ``"fifo"`` (a named pipe: ``inode`` and ``path``) or
    ``"file"`` (``path``). A backend that cannot tell something leaves the
    key out and names it under ``unavailable``; it never guesses.
    """

    truncated = Attribute(
        "True once the descriptor budget (begin's max_fds) was exhausted: "
        "the walk may have missed peers.")
    unavailable = Attribute(
        "Dict of what this backend cannot give on this platform for any "
        "process, e.g. {'pipes': 'psutil does not list pipes'}.")

    def holders(connection):
        """PIDs of the processes holding the socket of ``connection``
        (a :class:`stop.model.Connection`: by its ``inode`` when not 0,
        else by its two ends). Sorted list of int; empty when none."""

    def process(pid, fields):
        """The fields of process ``pid`` named in ``fields`` (an iterable of
        names from ``stop.os.common.PROCESS_FIELDS``), as a dict; ``pid`` and
        ``ppid`` are always included. What could not be read is left out and
        named in ``result["unavailable"]`` with a reason (``"EACCES"``).

        :raise stop.errors.ProcessGone: the process does not exist (any
            more).
        """

    def descriptors(pid, open_files):
        """The descriptors of ``pid`` as a list of dicts (see above),
        sockets resolved, ordered by fd; regular files only when
        ``open_files``.

        :raise stop.errors.ProcessGone: the process exited.
        :raise stop.errors.Unavailable: the table cannot be read (the
            reason says why, e.g. ``EACCES``).
        """

    def peers(pid, descriptor):
        """The processes at the other end of a pipe, UNIX-domain socket or
        TCP connection to this same host that ``pid`` holds as
        ``descriptor`` (one of :meth:`descriptors`' dicts; a named FIFO like
        a pipe): a sorted list of
        ``(pid, fd)`` not including ``(pid, descriptor["fd"])`` itself.
        Built from an index of every process's descriptors, made once per
        scan. Empty for anything else (files, TCP to other hosts)."""

    def close():
        """Release kernel handles (netlink sockets). Idempotent."""


# -- Site plugins ---------------------------------------------------------
#
# A site adds a backend by dropping a Python module into a directory named
# by the ``plugin_dirs`` setting (default /etc/stop/plugins). The module
# holds objects that provide ``twisted.plugin.IPlugin`` and one of the
# factory interfaces below; ``stop.plugins`` finds them with
# ``twisted.plugin.getPlugins`` and stop.conf selects them by ``name``.
# See stop-plugins(7).


class IStorePlugin(Interface):
    """Makes a record store; selected by ``storage = NAME``."""

    name = Attribute("The name stop.conf selects it by (str, e.g. 'syslog-forward'); "
                     "must not be a built-in store's name.")

    def build(config, reactor):
        """Make the store.

        :param config: the daemon's :class:`stop.config.Config`; a plugin's
            own settings are ``config.plugin_options(name)`` (the
            ``[plugin NAME]`` section of stop.conf).
        :param reactor: the reactor (a Clock-bearing fake in tests).
        :return: an :class:`IRecordStore` provider, not yet opened (the
            daemon calls ``open()`` after twistd has dropped privileges).
        :raise stop.errors.ConfigError: a missing or bad plugin setting.
        """


class ILookupPlugin(Interface):
    """Makes a socket lookup (an OS backend); selected by ``lookup = NAME``."""

    name = Attribute("The name stop.conf selects it by (str).")

    def build(config, reactor):
        """Make the lookup.

        :return: an :class:`ISocketLookup` provider.
        :raise stop.errors.ConfigError: a missing or bad plugin setting.
        """


class IProcessPlugin(Interface):
    """Makes a process inspector (the SV walk's OS backend); selected by
    ``process_backend = NAME``."""

    name = Attribute("The name stop.conf selects it by (str).")

    def build(config, reactor):
        """Make the inspector.

        :return: an :class:`IProcessInspector` provider.
        :raise stop.errors.ConfigError: a missing or bad plugin setting.
        """


class IRecordHook(Interface):
    """Told of every record once it is durable (a policy hook: forward to a
    collector, count, alert...)."""

    name = Attribute("Short name, used in logs.")

    def recordSaved(token, record):
        """``record`` (bytes, canonical JSON) was stored under ``token``
        (str). Called in the reactor thread after the store's ``save``
        fired, while the reply goes out: it must not block. It may return
        a Deferred; a failure (raised or as a Deferred) is logged and
        changes nothing for the requester, the reply or the store."""

    def close():
        """Release resources at shutdown; may return a Deferred."""


class IHookPlugin(Interface):
    """Makes an :class:`IRecordHook`; selected by ``hooks = NAME ...``."""

    name = Attribute("The name stop.conf selects it by (str).")

    def build(config, reactor):
        """Make the hook.

        :return: an :class:`IRecordHook` provider.
        :raise stop.errors.ConfigError: a missing or bad plugin setting.
        """


# -- Recursion (spec 6) ---------------------------------------------------


class IRecursiveClient(Interface):
    """Asks other hosts' STOP daemons the recursive questions of spec 6,
    one TCP connection per question, within budgets.

    Implementation: ``stop.client.RecursiveClient`` (Twisted client
    endpoints); ``stop.testing.FakeRecursiveClient`` for tests.
    """

    in_flight = Attribute("Questions being asked now (int): connecting, or "
                          "waiting for the reply.")

    def ask(target, local, request):
        """Ask one question.

        :param target: :class:`stop.model.Endpoint`: the other host's
            address and its ident (recursion) port.
        :param local: :class:`stop.model.Endpoint`: the address to ask from
            (the local address of the connection asked about, so the other
            daemon can match it; ``""`` for any); its port is ignored.
        :param request: a :class:`stop.wire.Request` (ports as seen from
            the other host: their port first; ID_REC or SV_REC with a sid).
        :return: a Deferred that fires with a :class:`stop.client.Outcome`
            once the outcome is known: never later than the connect
            timeout plus the reply timeout, at once (``"skipped"``) when a
            budget is spent. It never fails.
        """

    def close():
        """Stop: questions in flight end (outcome ``"failed"``, why
        ``"stopping"``) and later ones are skipped.

        :return: a Deferred firing once every question's Deferred fired.
        """
