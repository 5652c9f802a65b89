"""stop.conf -> one frozen :class:`Config`; the command line overrides the file.

The file is INI, one section ``[stop]``. Every setting has a default here,
and ``etc/stop.conf`` documents every one with that same default (a test
compares the two). Unknown settings are an error, so a typo never silently
leaves a default in force.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from stop.errors import ConfigError
from stop.logsetup import facility_number

SECTION = "stop"
#: ``[plugin NAME]`` sections hold a site plugin's own settings.
PLUGIN_SECTION = "plugin "

ERROR_POLICIES = ("normal", "unknown", "token")
FSYNC_MODES = ("batch", "always", "never")
HASHES = ("sha1", "sha256")

# Reloaded on SIGHUP: the settings a running daemon takes from a
# re-read config file; every other one needs a restart. stop.conf(5) marks
# each of these "Reloaded on SIGHUP." (tests/test_docs.py checks it).
RELOADABLE = frozenset({
    "errors", "address_form", "user_optin", "log_users", "quota_mb",
    "max_connections", "max_connections_per_host", "idle_timeout",
    "max_requests_per_connection", "max_pipeline", "max_line_length",
    "max_lookups", "lookup_queue",
})


@dataclass(frozen=True)
class Config:
    """Every setting of the daemon. Units are in the names' docs in
    etc/stop.conf; durations are seconds, sizes as named (``_mb``)."""

    # Where and how to listen: Twisted endpoint strings.
    listen: tuple[str, ...] = ("tcp6:113:interface=\\:\\:",)
    # Records.
    data_dir: str = "/var/lib/stop"
    storage: str = "flat"
    fsync: str = "batch"
    quota_mb: int = 1024
    hash: str = "sha1"
    head_log_interval: float = 300.0
    # Answering.
    lookup: str = "auto"
    errors: str = "normal"
    address_form: tuple[str, ...] = ("any",)
    user_optin: bool = True
    log_users: bool = True
    # Limits.
    max_connections: int = 256
    max_connections_per_host: int = 16
    idle_timeout: float = 120.0
    max_requests_per_connection: int = 64
    max_pipeline: int = 16
    max_line_length: int = 1000
    max_lookups: int = 32
    lookup_queue: int = 256
    # SV process walk (spec 5).
    process_backend: str = "auto"
    sv_fields: tuple[str, ...] = ("all",)
    open_files: bool = True
    walk_max_processes: int = 512
    walk_max_fds: int = 65536
    index_max_age: float = 10.0
    # Logging: the journal gets everything (twistd --logfile=-); syslog too
    # when asked.
    syslog: bool = False
    syslog_facility: str = "daemon"
    syslog_socket: str = "/dev/log"
    # Recursion (spec 6): the questions ID_REC / SV_REC send to previous
    # hosts, their budgets, the loop table, and which addresses are ours.
    recursion_enabled: bool = True
    recursion_port: int = 113
    recursion_max_outbound: int = 32
    recursion_max_per_host: int = 4
    recursion_connect_timeout: float = 10.0
    recursion_reply_timeout: float = 30.0
    recursion_max_reply_length: int = 1000
    recursion_max_targets: int = 16
    recursion_max_per_requester: int = 4
    loop_window: float = 120.0
    loop_table_size: int = 16384
    local_addresses: tuple[str, ...] = ("auto",)
    # Accounts (the OS layer): uid -> name/home and ~/.ident, read in a
    # worker thread and cached (NSS and NFS homes can stall).
    account_cache_size: int = 1024
    account_cache_age: float = 60.0
    account_timeout: float = 10.0
    # Site plugins (stop-plugins(7)): where to look, which record hooks run.
    plugin_dirs: tuple[str, ...] = ("/etc/stop/plugins",)
    hooks: tuple[str, ...] = ()
    # Redemption over mutual TLS (docs/redeem.rst): off while redeem_listen
    # is empty; redeem_allow is a text of rules, one per line.
    redeem_listen: str = ""
    redeem_cert: str = ""
    redeem_key: str = ""
    redeem_ca: str = ""
    redeem_crl: str = ""
    redeem_allow: str = ""
    redeem_deny: tuple[str, ...] = ()
    redeem_rate: float = 60.0
    redeem_burst: int = 20
    redeem_max_connections: int = 32
    redeem_timeout: float = 30.0
    # The [plugin NAME] sections, as ((name, ((key, value), ...)), ...);
    # not a [stop] setting. Read it with plugin_options(name).
    plugin_settings: tuple = ()

    def __post_init__(self) -> None:
        _check_choice("storage", self.storage, None)
        _check_choice("fsync", self.fsync, FSYNC_MODES)
        _check_choice("hash", self.hash, HASHES)
        _check_choice("errors", self.errors, ERROR_POLICIES)
        if not self.listen:
            raise ConfigError("listen: at least one endpoint is needed")
        for name in ("max_connections", "max_connections_per_host", "max_requests_per_connection",
                     "max_pipeline", "max_lookups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, not {getattr(self, name)}")
        for name in ("quota_mb", "lookup_queue", "head_log_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        if not 1 <= self.max_line_length <= 65536:
            raise ConfigError("max_line_length: must be 1..65536")
        if self.idle_timeout <= 0:
            raise ConfigError("idle_timeout: must be more than 0 seconds")
        address_networks(self.address_form)  # raises ConfigError when malformed
        _check_sv(self)
        _check_recursion(self)
        _check_accounts(self)
        facility_number(self.syslog_facility)  # raises ConfigError when unknown
        _check_redeem(self)

    @property
    def quota_bytes(self) -> int:
        """The storage quota in bytes; 0 means no quota."""
        return self.quota_mb * 2**20

    def plugin_options(self, name: str) -> dict[str, str]:
        """The settings of the ``[plugin NAME]`` section (empty when none)."""
        return dict(dict(self.plugin_settings).get(name, ()))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: Optional[tuple[str, ...]]) -> None:
    if not value:
        raise ConfigError(f"{name}: must not be empty")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _check_sv(config: "Config") -> None:
    from stop.os.common import PROCESS_FIELDS, SYSTEM_FIELDS
    # A name that is not built in is a site plugin's (checked when built).
    _check_choice("process_backend", config.process_backend, None)
    known = set(PROCESS_FIELDS + SYSTEM_FIELDS + ("all",))
    unknown = [f for f in config.sv_fields if f not in known]
    if unknown:
        raise ConfigError(f"sv_fields: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    for name in ("walk_max_processes", "walk_max_fds"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, not {getattr(config, name)}")
    if config.index_max_age < 0:
        raise ConfigError("index_max_age: must not be negative")


def _check_recursion(config: "Config") -> None:
    if not 1 <= config.recursion_port <= 65535:
        raise ConfigError("recursion_port: must be 1..65535")
    for name in ("recursion_max_outbound", "recursion_max_per_host", "recursion_max_targets",
                 "recursion_max_per_requester", "loop_table_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, not {getattr(config, name)}")
    for name in ("recursion_connect_timeout", "recursion_reply_timeout", "loop_window"):
        if not 0 < getattr(config, name) <= 86400:
            raise ConfigError(f"{name}: must be more than 0 and at most 86400 seconds")
    if not 64 <= config.recursion_max_reply_length <= 65536:
        raise ConfigError("recursion_max_reply_length: must be 64..65536")
    local_networks(config.local_addresses)  # raises ConfigError when malformed


def _check_accounts(config: "Config") -> None:
    if config.account_cache_size < 1:
        raise ConfigError("account_cache_size: must be at least 1")
    if not 0 <= config.account_cache_age <= 86400:
        raise ConfigError("account_cache_age: must be 0..86400 seconds")
    if not 0 < config.account_timeout <= 3600:
        raise ConfigError("account_timeout: must be more than 0 and at most 3600 seconds")


def local_networks(entries: tuple[str, ...]) -> tuple[bool, tuple]:
    """The ``local_addresses`` setting as (``auto`` given, networks of the
    other entries).

    :raise ConfigError: empty, or an entry is neither ``auto`` nor an
        address/CIDR.
    """
    if not entries:
        raise ConfigError("local_addresses: give auto, addresses or CIDR blocks")
    nets = []
    for entry in entries:
        if entry == "auto":
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"local_addresses: {entry!r} is not 'auto' or an address/CIDR") from None
    return "auto" in entries, tuple(nets)


def address_networks(entries: tuple[str, ...]) -> Optional[tuple]:
    """The ``address_form`` setting as networks: None means anyone may use
    the address form; an empty tuple means no one (``none``).

    :raise ConfigError: an entry is neither ``any``, ``none`` nor a CIDR.
    """
    if entries == ("any",):
        return None
    if entries == ("none",):
        return ()
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"address_form: {entry!r} is not 'any', 'none' or an address/CIDR") from None
    return tuple(nets)


def _check_redeem(config: "Config") -> None:
    from stop.redeem.policy import parse_policy
    parse_policy(config.redeem_allow, config.redeem_deny)  # raises ConfigError
    if config.redeem_listen:
        if config.redeem_listen.split(":", 1)[0].lower() in ("ssl", "tls", "txtorcon"):
            raise ConfigError("redeem_listen: give a plain endpoint (tcp:PORT:interface=ADDRESS); "
                              "its TLS comes from redeem_cert, redeem_key and redeem_ca")
        for name in ("redeem_cert", "redeem_key", "redeem_ca"):
            if not getattr(config, name):
                raise ConfigError(f"{name}: must be set when redeem_listen is")
    if not config.redeem_rate > 0:
        raise ConfigError("redeem_rate: must be more than 0 per minute")
    for name in ("redeem_burst", "redeem_max_connections"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, not {getattr(config, name)}")
    if not config.redeem_timeout > 0:
        raise ConfigError("redeem_timeout: must be more than 0 seconds")


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type
    text = raw.strip()
    try:
        if kind == "bool":
            return _BOOLEANS[text.lower()]
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "tuple[str, ...]":
            # One item per line or separated by spaces; endpoint strings
            # contain no spaces.
            return tuple(text.split())
        return text
    except (KeyError, ValueError):
        raise ConfigError(f"{f.name}: cannot read {raw!r} as {kind}") from None


_FIELDS = {f.name: f for f in fields(Config)}


def parse(text: str, source: str = "<string>") -> dict[str, Any]:
    """The settings present in config ``text`` as a dict of typed values.

    :raise ConfigError: bad syntax, an unknown section or setting, or a value
        of the wrong type; the message names ``source`` and the setting.
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    parser.optionxform = str  # setting names are case-sensitive
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {e}") from None
    extra = [s for s in parser.sections()
             if s != SECTION and not (s.startswith(PLUGIN_SECTION) and s[len(PLUGIN_SECTION):].strip())]
    if extra:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(extra)}; only [{SECTION}] "
                          f"and [{PLUGIN_SECTION}NAME]")
    values: dict[str, Any] = {"plugin_settings": tuple(
        (s[len(PLUGIN_SECTION):].strip(), tuple(parser.items(s)))
        for s in parser.sections() if s != SECTION)}
    if parser.has_section(SECTION):
        for name, raw in parser.items(SECTION):
            f = _FIELDS.get(name)
            if f is None or name == "plugin_settings":
                raise ConfigError(f"{source}: unknown setting {name!r}")
            try:
                values[name] = _convert(f, raw)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return values


def load(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Build the Config: defaults, then the file at ``path`` (if given), then
    ``overrides`` (command-line options; None values are ignored).

    :raise ConfigError: the file cannot be read or holds a bad setting.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8") from None
        values.update(parse(text, path))
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    values.update(given)
    try:
        return Config(**values)
    except TypeError as e:  # an override with an unknown name: a bug of ours
        raise ConfigError(str(e)) from None
    except ConfigError as e:
        # Say where the bad value came from: the command line or the file.
        setting = str(e).split(":", 1)[0]
        source = "command line" if setting in given else path
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None
