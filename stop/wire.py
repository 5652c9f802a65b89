"""Bytes in, bytes out: parse one STOP / RFC 1413 request line, format one
reply line. No I/O, no state.

The grammar is spec 2.1; every decision the spec leaves to us is written
next to the code that makes it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from stop.errors import InvalidPort, RequestError, UnreadableReply
from stop.model import canonical_host

#: Request types, as sent on the wire (upper case).
ID, SV, ID_REC, SV_REC = "ID", "SV", "ID_REC", "SV_REC"
TYPES = (ID, SV, ID_REC, SV_REC)
RECURSIVE = frozenset((ID_REC, SV_REC))

MAX_SID = 2**32 - 1
MAX_PORT = 65535

_WS = r"[ \t]*"
_PORTS = re.compile(_WS + r"([0-9]+)" + _WS + "," + _WS + r"([0-9]+)" + _WS)
_TYPE = re.compile(":" + _WS + r"([A-Za-z_]+)" + _WS)
_SID = re.compile(":" + _WS + r"([0-9]{1,10})" + _WS)
_ADDRESS = re.compile(":" + _WS + r"(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3})|\[([0-9A-Fa-f:.]+)\])" + _WS + r"\Z")
#: The common request, a plain port pair (its ports at most 5 digits): read
#: straight from the bytes; anything else goes through the full grammar.
_PLAIN = re.compile(rb"[ \t]*([0-9]{1,5})[ \t]*,[ \t]*([0-9]{1,5})[ \t]*\r?\Z")
_TOKEN_CHARS = re.compile(r"[\x21-\x39\x3b-\x7e]{1,512}\Z")


@dataclass(frozen=True)
class Request:
    """One parsed request.

    ``ports`` is (port on this host, port on the requester's host), as sent.
    ``sid`` is set for ID_REC and SV_REC only. ``address`` is the named
    remote address of the address form (canonical text), else None.
    """

    ports: tuple[int, int]
    type: str = ID
    sid: Optional[int] = None
    address: Optional[str] = None

    @property
    def recursive(self) -> bool:
        return self.type in RECURSIVE


def _port_value(digits: str) -> int:
    # Echo what was read; a number too long to be a port at all is echoed 0.
    return int(digits) if len(digits) <= 10 else 0


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its LF; a trailing CR is allowed).

    :raise InvalidPort: the line is well formed but a port is not 1..65535
        (its ``ports`` are the numbers read).
    :raise RequestError: anything else that does not parse (``ports`` are
        the numbers read, or (0, 0) when no port pair could be read).
    """
    m = _PLAIN.match(line)
    if m is not None:  # what parse_full gives (tests/test_wire.py), in half the time
        p1, p2 = int(m.group(1)), int(m.group(2))
        if 0 < p1 <= MAX_PORT and 0 < p2 <= MAX_PORT:
            return Request((p1, p2))
    return parse_full(line)


def parse_full(line: bytes) -> Request:
    """:func:`parse_request` without its shortcut for a plain port pair."""
    if line.endswith(b"\r"):
        line = line[:-1]
    # latin-1 maps every byte to one character, so 8-bit and NUL bytes
    # simply fail the grammar below instead of failing to decode.
    text = line.decode("latin-1")
    m = _PORTS.match(text)
    if m is None:
        raise RequestError("no port pair")
    ports = (_port_value(m.group(1)), _port_value(m.group(2)))
    rest = text[m.end():]
    request = _parse_rest(rest, ports)
    if not all(1 <= p <= MAX_PORT and len(d) <= 5 for p, d in zip(ports, m.groups())):
        raise InvalidPort("port out of range", ports)
    return request


def _parse_rest(rest: str, ports: tuple[int, int]) -> Request:
    if rest == "":
        return Request(ports)  # plain RFC 1413: an ID request
    m = _TYPE.match(rest)
    if m is None:
        raise RequestError("no request type", ports)
    kind = m.group(1).upper()
    if kind not in TYPES:
        raise RequestError("unknown request type", ports)
    rest = rest[m.end():]
    sid = None
    if kind in RECURSIVE:
        m = _SID.match(rest)
        if m is None:
            raise RequestError("missing or malformed session id", ports)
        sid = int(m.group(1))
        if sid > MAX_SID:
            raise RequestError("session id out of range", ports)
        rest = rest[m.end():]
    if rest == "":
        return Request(ports, kind, sid)
    return Request(ports, kind, sid, _parse_address(rest, ports))


def _parse_address(rest: str, ports: tuple[int, int]) -> str:
    m = _ADDRESS.match(rest)
    if m is None:
        raise RequestError("malformed address", ports)
    try:
        if m.group(1) is not None:
            if any(len(b) > 1 and b[0] == "0" for b in m.group(1).split(".")):
                # ipaddress rejects leading zeros (octal ambiguity); so do we,
                # but as the parse error the spec asks for.
                raise ValueError("leading zero")
            return str(ipaddress.IPv4Address(m.group(1)))
        return canonical_host(str(ipaddress.IPv6Address(m.group(2))))
    except ValueError:
        raise RequestError("malformed address", ports) from None


def _ports_text(ports: tuple[int, int]) -> str:
    return f"{ports[0]}, {ports[1]}"


def format_token(ports: tuple[int, int], token: str) -> bytes:
    """``P1, P2 : USERID : OTHER : token`` CR LF.

    :raise ValueError: the token is not 1..512 printable characters without ':'.
    """
    if not _TOKEN_CHARS.match(token):
        raise ValueError("token must be 1..512 printable ASCII characters except ':'")
    return f"{_ports_text(ports)} : USERID : OTHER : {token}\r\n".encode("ascii")


def format_user(ports: tuple[int, int], opsys: str, user: str) -> bytes:
    """``P1, P2 : USERID : opsys : user`` CR LF (the ~/.ident opt-in case).

    :raise ValueError: the user name cannot be sent safely (not printable
        ASCII, or contains ':').
    """
    if not _TOKEN_CHARS.match(user) or not _TOKEN_CHARS.match(opsys):
        raise ValueError("user name not sendable")
    return f"{_ports_text(ports)} : USERID : {opsys} : {user}\r\n".encode("ascii")


def format_error(ports: tuple[int, int], word: str) -> bytes:
    """``P1, P2 : ERROR : word`` CR LF. ``HIDDEN-USER`` is never sent."""
    if word == "HIDDEN-USER":
        raise ValueError("HIDDEN-USER is never sent")
    return f"{_ports_text(ports)} : ERROR : {word}\r\n".encode("ascii")


# -- The other direction: this host asking another (recursion, spec 6) -------

#: The reply kinds of :class:`Reply`.
USERID, ERROR = "USERID", "ERROR"

_REPLY = re.compile(r"[ \t]*([0-9]{1,5})[ \t]*,[ \t]*([0-9]{1,5})[ \t]*:[ \t]*"
                    r"(USERID|ERROR)[ \t]*:(.*)\Z", re.I | re.S)
_ERROR_WORD = re.compile(r"[\x21-\x39\x3b-\x7e]{1,64}\Z")
_USER_TEXT = re.compile(r"[\x20-\x7e]{1,512}\Z")
_OPSYS = re.compile(r"[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64}\Z")


@dataclass(frozen=True)
class Reply:
    """One reply line from another host's ident daemon.

    ``kind`` is :data:`USERID` (``opsys`` and ``user`` set; ``opsys`` in
    upper case, without a character set) or :data:`ERROR` (``error`` set,
    the error word as sent).
    """

    ports: tuple[int, int]
    kind: str
    opsys: Optional[str] = None
    user: Optional[str] = None
    error: Optional[str] = None

    @property
    def token(self) -> Optional[str]:
        """The STOP token this reply carries: the user-id of a ``USERID :
        OTHER`` reply when it has a token's grammar (spec 2.2), else None."""
        if self.kind == USERID and self.opsys == "OTHER" and _TOKEN_CHARS.match(self.user):
            return self.user
        return None


def format_request(request: Request) -> bytes:
    """The request line (CR LF) for ``request``: ``P1, P2`` alone for a
    plain ID, else ``P1, P2 : TYPE`` and `` : sid`` for the recursive
    types (never the address form: the recursion asks about connections of
    the asking host)."""
    text = _ports_text(request.ports)
    if request.type != ID or request.sid is not None:
        text += f" : {request.type}"
    if request.sid is not None:
        text += f" : {request.sid}"
    return (text + "\r\n").encode("ascii")


def parse_reply(line: bytes) -> Reply:
    """Parse one reply line (without its LF; a trailing CR is allowed).

    Spaces and tabs are allowed around the separators (RFC 1413); the
    user-id of a USERID reply is everything after the third colon, with
    the white space around it removed, so it may hold colons.

    :raise stop.errors.UnreadableReply: not a reply line, a port that is
        not 1..65535, an opsys, user-id or error word that is empty, too
        long or not printable ASCII.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    text = line.decode("latin-1")
    m = _REPLY.match(text)
    if m is None:
        raise UnreadableReply("not an ident reply line")
    ports = (int(m.group(1)), int(m.group(2)))
    if not all(1 <= p <= MAX_PORT for p in ports):
        raise UnreadableReply("port out of range")
    kind, rest = m.group(3).upper(), m.group(4)
    if kind == ERROR:
        word = rest.strip(" \t")
        if not _ERROR_WORD.match(word):
            raise UnreadableReply("error word is empty, too long or not printable")
        return Reply(ports, ERROR, error=word)
    opsys_field, colon, user = rest.partition(":")
    if not colon:
        raise UnreadableReply("USERID reply without a user-id field")
    opsys = opsys_field.split(",", 1)[0].strip(" \t").upper()
    user = user.strip(" \t")
    if not _OPSYS.match(opsys):
        raise UnreadableReply("opsys is empty, too long or not printable")
    if not _USER_TEXT.match(user):
        raise UnreadableReply("user-id is empty, longer than 512 or not printable")
    return Reply(ports, USERID, opsys=opsys, user=user)


def printable(data: bytes, limit: int) -> str:
    """``data`` (at most ``limit`` bytes of it) as printable ASCII for a
    record or a log: bytes outside 0x20..0x7E and the backslash as
    ``\\xNN``; ``...`` marks a cut."""
    out = "".join(chr(b) if 0x20 <= b <= 0x7e and b != 0x5c else f"\\x{b:02x}"
                  for b in data[:limit])
    return out + ("..." if len(data) > limit else "")
