"""Who may redeem which record: the ``redeem_allow`` and ``redeem_deny``
settings, and the identity of a client taken from its verified certificate.

``redeem_allow`` holds one rule per line::

    IDENTITY [SCOPE ...]

IDENTITY says which clients the rule is for:

``*``
    every certificate signed by ``redeem_ca``;
``NAME`` or ``cn:NAME``
    the certificate's subject common name is exactly NAME;
``dns:NAME``
    the certificate's subjectAltName holds the DNS name NAME itself (then
    checked with ``service_identity``, RFC 6125). A wildcard entry
    (``*.team.example.org``) names no one: it never matches a ``dns:``
    rule, or one certificate would stand for every investigator under it
    (a refusing ``dns:`` entry, below, does match through a wildcard);
``sha256:HEX``
    the certificate's SHA-256 fingerprint (colons optional).

SCOPE says which records the rule releases; none, ``*`` or ``all`` mean
every record. ``net:CIDR`` releases records whose requester or either end
of whose connection lies in the network; ``type:TYPE`` records of that
request type (ID, SV, ID_REC, SV_REC). Networks of one rule are alternatives,
so are types; a rule with both wants one of each. A record is released when
any rule for the client releases it. ``redeem_allow = *`` is the rule
``* *``: everyone the CA signed, every record. Empty (the default): nobody.

A line ``!IDENTITY`` in ``redeem_allow`` refuses that identity whatever
the other lines say (the deny list kept with the rules); ``redeem_deny``
lists more such identities, one word each. Both are revocation without a
CRL: NAME / ``cn:``, ``dns:``, ``sha256:`` as above, and ``serial:HEX``
(the certificate's serial number).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from stop.errors import ConfigError

#: The request types a ``type:`` scope may name.
RECORD_TYPES = ("ID", "SV", "ID_REC", "SV_REC")

_HEX = re.compile(r"[0-9a-f]+\Z")


@dataclass(frozen=True)
class ClientIdentity:
    """A client as its verified certificate names it.

    ``name`` is what logs, the audit trail and rate limits use: the subject
    common name, or the fingerprint when the certificate has none.
    """

    name: str
    common_name: Optional[str]
    fingerprint: str  # "sha256:<64 lowercase hex>"
    serial: str  # lowercase hex, no leading zeros
    dns_names: tuple[str, ...] = ()
    not_after: Optional[str] = None
    #: The cryptography certificate (for service_identity's DNS-ID checks).
    certificate: Any = field(default=None, compare=False, repr=False)

    def audit_fields(self) -> dict:
        """What the audit trail records of this client."""
        return {"identity": self.name, "fingerprint": self.fingerprint, "serial": self.serial}


def identity_from_certificate(cert) -> ClientIdentity:
    """The :class:`ClientIdentity` of a ``cryptography`` X.509 certificate
    (one the TLS layer has verified)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(cns[0].value) if cns else None
    fingerprint = "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    try:
        not_after = cert.not_valid_after_utc  # cryptography >= 42
    except AttributeError:
        not_after = cert.not_valid_after
    # A common name is free text: keep the identity printable and bounded.
    name = _printable(common_name)[:128] if common_name else fingerprint
    return ClientIdentity(name=name, common_name=common_name, fingerprint=fingerprint,
                          serial=format(cert.serial_number, "x"), dns_names=dns_names,
                          not_after=not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), certificate=cert)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256 else "?"
                   for c in text)


@dataclass(frozen=True)
class IdentityPattern:
    """One IDENTITY of a rule or of the deny list."""

    kind: str  # "any", "cn", "dns", "sha256", "serial"
    value: str = ""

    def matches(self, client: ClientIdentity, wildcards: bool = False) -> bool:
        """Whether this names ``client``; ``wildcards``: a ``dns:`` pattern
        also matches through a wildcard entry (for refusing: fail closed)."""
        if self.kind == "any":
            return True
        if self.kind == "cn":
            return client.common_name == self.value
        if self.kind == "sha256":
            return client.fingerprint == "sha256:" + self.value
        if self.kind == "serial":
            return client.serial == self.value
        return _dns_matches(client, self.value, wildcards)

    def __str__(self) -> str:
        return "*" if self.kind == "any" else f"{self.kind}:{self.value}"


def _dns_matches(client: ClientIdentity, name: str, wildcards: bool = False) -> bool:
    """Whether ``client``'s certificate holds the DNS name ``name`` as such
    (not through a wildcard entry, unless ``wildcards``), confirmed by service_identity's RFC 6125
    check of the subjectAltName DNS-IDs."""
    if client.certificate is None or not client.dns_names:
        return False
    if not wildcards and name not in {d.lower() for d in client.dns_names if "*" not in d}:
        return False  # a wildcard client certificate identifies no one
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname
    try:
        verify_certificate_hostname(client.certificate, name)
    except (VerificationError, CertificateError):
        return False
    except ValueError:  # not a DNS-ID (parse_identity refuses those): no match
        return False
    return True


def _valid_dns_id(name: str) -> bool:
    """Whether service_identity takes ``name`` as a DNS-ID (it refuses IP
    addresses, for one: a rule it would refuse at match time is refused
    when the configuration is read)."""
    try:
        from service_identity.hazmat import DNS_ID
    except ImportError:  # service_identity < 23 (Debian 12: 18.1)
        from service_identity._common import DNS_ID
    try:
        DNS_ID(name)
    except (ValueError, TypeError):
        return False
    return True


def parse_identity(text: str, setting: str, allow_any: bool = True,
                   allow_serial: bool = False) -> IdentityPattern:
    """One IDENTITY word. :raise ConfigError: malformed (names ``setting``)."""
    if text == "*":
        if not allow_any:
            raise ConfigError(f"{setting}: '*' is not an identity here")
        return IdentityPattern("any")
    kind, sep, value = text.partition(":")
    if not sep:
        kind, value = "cn", text
    kind = kind.lower()
    if kind == "sha256":
        value = value.replace(":", "").lower()
        if len(value) != 64 or not _HEX.match(value):
            raise ConfigError(f"{setting}: {text!r}: sha256: wants the 64 hex digits of a "
                              "certificate's SHA-256 fingerprint")
    elif kind == "serial":
        if not allow_serial:
            raise ConfigError(f"{setting}: serial: identities only refuse (redeem_deny, or a "
                              "!serial: line of redeem_allow)")
        value = value.replace(":", "").lower().lstrip("0") or "0"
        if not _HEX.match(value):
            raise ConfigError(f"{setting}: {text!r}: serial: wants a hexadecimal serial number")
    elif kind == "dns":
        value = value.lower()
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,252})", value) or ".." in value \
                or not _valid_dns_id(value):
            raise ConfigError(f"{setting}: {text!r} is not a DNS name (no wildcards or "
                              "IP addresses here)")
    elif kind != "cn":
        raise ConfigError(f"{setting}: {text!r}: unknown identity kind {kind!r}; "
                          "use NAME, cn:, dns:, sha256:" + (" or serial:" if allow_serial else ""))
    if not value:
        raise ConfigError(f"{setting}: {text!r}: empty identity")
    return IdentityPattern(kind, value)


@dataclass(frozen=True)
class Rule:
    """One line of ``redeem_allow``."""

    identity: IdentityPattern
    networks: tuple = ()  # ipaddress networks; () = any
    types: tuple[str, ...] = ()  # () = any

    def releases(self, record: dict) -> bool:
        """Whether this rule's scope covers ``record`` (a parsed record)."""
        if self.types and record.get("type") not in self.types:
            return False
        if self.networks:
            return any(_in(addr, self.networks) for addr in record_addresses(record))
        return True

    def __str__(self) -> str:
        scope = [f"net:{n}" for n in self.networks] + [f"type:{t}" for t in self.types]
        return " ".join([str(self.identity)] + (scope or ["*"]))


def record_addresses(record: dict) -> list[str]:
    """The addresses a ``net:`` scope looks at: the requester's and both
    ends of the queried connection."""
    out = []
    conn = record.get("connection") if isinstance(record.get("connection"), dict) else {}
    for end in (record.get("requester"), conn.get("local"), conn.get("remote")):
        if isinstance(end, dict) and isinstance(end.get("address"), str):
            out.append(end["address"])
    return out


def _in(address: str, networks: tuple) -> bool:
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in networks)


def _parse_rule(line: str) -> Rule:
    words = line.split()
    identity = parse_identity(words[0], "redeem_allow")
    networks, types = [], []
    for word in words[1:]:
        kind, sep, value = word.partition(":")
        if word in ("*", "all"):
            continue
        if sep and kind == "net":
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise ConfigError(f"redeem_allow: {word!r} is not a network (net:CIDR)") from None
        elif sep and kind == "type":
            if value.upper() not in RECORD_TYPES:
                raise ConfigError(f"redeem_allow: {word!r}: type is one of {', '.join(RECORD_TYPES)}")
            types.append(value.upper())
        else:
            raise ConfigError(f"redeem_allow: {word!r} is not a scope (*, net:CIDR or type:TYPE)")
    if len(words) > 1 and any(w in ("*", "all") for w in words[1:]) and (networks or types):
        raise ConfigError(f"redeem_allow: {line!r}: '*' and a narrower scope on one line")
    return Rule(identity, tuple(networks), tuple(types))


@dataclass(frozen=True)
class Policy:
    """The parsed ``redeem_allow`` rules, its ``!IDENTITY`` lines and the
    ``redeem_deny`` list."""

    rules: tuple[Rule, ...] = ()
    deny: tuple[IdentityPattern, ...] = ()  # redeem_deny
    refused: tuple[IdentityPattern, ...] = ()  # redeem_allow's !IDENTITY lines

    def denied(self, client: ClientIdentity) -> Optional[str]:
        """The entry that refuses ``client`` (``redeem_allow !cn:NAME``,
        ``redeem_deny serial:HEX``...), or None."""
        for setting, mark, patterns in (("redeem_allow", "!", self.refused),
                                        ("redeem_deny", "", self.deny)):
            for pattern in patterns:
                if pattern.matches(client, wildcards=True):
                    return f"{setting} {mark}{pattern}"
        return None

    def rules_for(self, client: ClientIdentity) -> tuple[Rule, ...]:
        """The rules that apply to ``client`` (none when it is denied): an
        empty tuple means the client may redeem nothing at all."""
        if self.denied(client) is not None:
            return ()
        return tuple(r for r in self.rules if r.identity.matches(client))

    @staticmethod
    def releases(rules: tuple[Rule, ...], record: dict) -> bool:
        """Whether any of ``rules`` (from :meth:`rules_for`) releases ``record``."""
        return any(r.releases(record) for r in rules)


def parse_policy(allow: str, deny: tuple[str, ...] = ()) -> Policy:
    """Parse the ``redeem_allow`` text and the ``redeem_deny`` words.

    Lines of ``allow`` may end in a ``#`` comment; blank lines are skipped;
    a line ``!IDENTITY`` (no scope) refuses that identity.

    :raise ConfigError: a malformed rule or identity (the message names the
        setting and the word).
    """
    rules, refused = [], []
    for raw in allow.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("!"):
            words = line[1:].split()
            if len(words) != 1:
                raise ConfigError(f"redeem_allow: {line!r}: '!' wants one identity and no scope")
            refused.append(parse_identity(words[0], "redeem_allow", allow_any=False,
                                          allow_serial=True))
        elif line:
            rules.append(_parse_rule(line))
    patterns = tuple(parse_identity(w, "redeem_deny", allow_any=False, allow_serial=True)
                     for w in deny)
    return Policy(tuple(rules), patterns, tuple(refused))
