"""stop.wire: the request parser and reply formatter."""

import re

import pytest
from hypothesis import example, given, strategies as st

from stop import wire
from stop.errors import InvalidPort, RequestError

TOKEN = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("line,expected", [
    (b"6193, 23", wire.Request((6193, 23))),
    (b"6193,23\r", wire.Request((6193, 23))),
    (b"6193 , 23", wire.Request((6193, 23))),
    (b" \t6193\t,\t23 \t", wire.Request((6193, 23))),
    (b"1,65535", wire.Request((1, 65535))),
    (b"00023, 00080", wire.Request((23, 80))),
    (b"80, 1000 : ID", wire.Request((80, 1000), "ID")),
    (b"80,1000:id", wire.Request((80, 1000), "ID")),
    (b"80, 1000 : sv", wire.Request((80, 1000), "SV")),
    (b"80, 1000 : ID_REC : 42", wire.Request((80, 1000), "ID_REC", 42)),
    (b"80, 1000:sv_rec:4294967295", wire.Request((80, 1000), "SV_REC", 4294967295)),
    (b"80, 1000 : SV_REC : 0000000001", wire.Request((80, 1000), "SV_REC", 1)),
    (b"80, 1000 : ID : 192.0.2.7", wire.Request((80, 1000), "ID", None, "192.0.2.7")),
    (b"80, 1000 : ID : [2001:db8::7]", wire.Request((80, 1000), "ID", None, "2001:db8::7")),
    (b"80, 1000 : ID : [2001:DB8:0::7]", wire.Request((80, 1000), "ID", None, "2001:db8::7")),
    (b"80, 1000 : ID : [::ffff:192.0.2.7]", wire.Request((80, 1000), "ID", None, "192.0.2.7")),
    (b"80, 1000 : SV_REC : 9 : 255.255.255.255",
     wire.Request((80, 1000), "SV_REC", 9, "255.255.255.255")),
])
def test_parses(line, expected):
    assert wire.parse_request(line) == expected


@pytest.mark.parametrize("line,ports", [
    (b"", (0, 0)),
    (b"hello", (0, 0)),
    (b", 23", (0, 0)),
    (b"1,", (0, 0)),
    (b"80, 1000 :", (80, 1000)),
    (b"80, 1000 : XX", (80, 1000)),
    (b"80, 1000 : ID_REC", (80, 1000)),
    (b"80, 1000 : ID_REC : ", (80, 1000)),
    (b"80, 1000 : ID_REC : 4294967296", (80, 1000)),
    (b"80, 1000 : ID_REC : 12345678901", (80, 1000)),
    (b"80, 1000 : ID_REC : -1", (80, 1000)),
    (b"80, 1000 : ID : 256.1.1.1", (80, 1000)),
    (b"80, 1000 : ID : 1.2.3", (80, 1000)),
    (b"80, 1000 : ID : 01.2.3.4", (80, 1000)),
    (b"80, 1000 : ID : [2001:db8::zz]", (80, 1000)),
    (b"80, 1000 : ID : 2001:db8::7", (80, 1000)),
    (b"80, 1000 : ID : [fe80::1%eth0]", (80, 1000)),
    (b"80, 1000 : ID : 1.2.3.4 : x", (80, 1000)),
    (b"80, 1000 : SV : 7", (80, 1000)),
    (b"80, 1000 junk", (80, 1000)),
    (b"80, 1000\x00", (80, 1000)),
    (b"80, 1000 : ID\xff", (80, 1000)),
    (b"0, 0 : bogus", (0, 0)),
])
def test_unknown_error(line, ports):
    with pytest.raises(RequestError) as info:
        wire.parse_request(line)
    assert not isinstance(info.value, InvalidPort)
    assert info.value.word == "UNKNOWN-ERROR"
    assert info.value.ports == ports


@pytest.mark.parametrize("line,ports", [
    (b"0, 23", (0, 23)),
    (b"23, 0", (23, 0)),
    (b"65536, 23", (65536, 23)),
    (b"123456, 23 : SV", (123456, 23)),
    (b"000023, 80", (23, 80)),
])
def test_invalid_port(line, ports):
    with pytest.raises(InvalidPort) as info:
        wire.parse_request(line)
    assert info.value.word == "INVALID-PORT"
    assert info.value.ports == ports


def test_bad_ports_and_bad_rest_is_unknown_error():
    with pytest.raises(RequestError) as info:
        wire.parse_request(b"0, 23 : nonsense")
    assert not isinstance(info.value, InvalidPort)


def test_replies():
    assert wire.format_token((6193, 23), TOKEN) == \
        b"6193, 23 : USERID : OTHER : " + TOKEN.encode() + b"\r\n"
    assert wire.format_error((1, 2), "NO-USER") == b"1, 2 : ERROR : NO-USER\r\n"
    assert wire.format_user((1, 2), "UNIX", "alice") == b"1, 2 : USERID : UNIX : alice\r\n"
    with pytest.raises(ValueError):
        wire.format_error((1, 2), "HIDDEN-USER")
    for bad in ("", "a:b", "a b", "x" * 513, "caf\u00e9"):
        with pytest.raises(ValueError):
            wire.format_token((1, 2), bad)
        with pytest.raises(ValueError):
            wire.format_user((1, 2), "UNIX", bad)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_give_a_clean_error(data):
    """Every byte string either parses or raises a RequestError whose reply
    can be formatted: no other exception ever escapes."""
    line = data.split(b"\n", 1)[0]
    try:
        r = wire.parse_request(line)
    except RequestError as e:
        reply = wire.format_error(e.ports, e.word)
    else:
        assert r.type in wire.TYPES
        assert all(1 <= p <= 65535 for p in r.ports)
        reply = wire.format_token(r.ports, TOKEN)
    assert reply.endswith(b"\r\n") and reply.count(b"\n") == 1
    assert re.match(rb"\A\d+, \d+ : ", reply)


def _outcome(parse, line):
    try:
        return parse(line)
    except RequestError as e:
        return type(e), e.ports, e.word


_pair_chars = st.sampled_from(list(b"0123456789 \t,\r:x\x00"))


@given(st.one_of(st.binary(max_size=40),
                 st.lists(_pair_chars, max_size=20).map(bytes),
                 st.tuples(st.integers(0, 999999), st.integers(0, 999999),
                           st.sampled_from(["", " ", "\t", "00"]), st.booleans()).map(
                     lambda t: b"%s%d%s,%s%d%s%s" % (t[2].encode(), t[0], t[2].encode(), t[2].encode(),
                                                     t[1], t[2].encode(), b"\r" if t[3] else b""))))
@example(b"0, 5")
@example(b"5,0")
@example(b"65536, 1")
@example(b"1, 65536\r")
@example(b"00023, 00080")
@example(b"000023, 80")
@example(b"1, 2\r\r")
def test_the_plain_pair_shortcut_agrees_with_the_grammar(line):
    """parse_request's shortcut for a plain port pair gives exactly what the
    full grammar gives: the same Request, or the same error and ports."""
    assert _outcome(wire.parse_request, line) == _outcome(wire.parse_full, line)


ws = st.sampled_from(["", " ", "\t", "  "])
ports = st.integers(1, 65535)
kinds = st.sampled_from(wire.TYPES)
sids = st.integers(0, 2**32 - 1)
addresses = st.one_of(st.none(), st.ip_addresses(v=4).map(str),
                      st.ip_addresses(v=6).map(str))


def _spell(text, rng):
    return "".join(c.lower() if rng.random() < 0.5 else c for c in text)


@given(p1=ports, p2=ports, kind=kinds, sid=sids, address=addresses, w=st.lists(ws, min_size=8,
       max_size=8), rnd=st.randoms(), cr=st.booleans())
def test_round_trip(p1, p2, kind, sid, address, w, rnd, cr):
    """Any request written in any allowed spelling parses back to itself."""
    from stop.model import canonical_host
    text = f"{w[0]}{p1}{w[1]},{w[2]}{p2}{w[3]}:{w[4]}{_spell(kind, rnd)}{w[5]}"
    if kind in wire.RECURSIVE:
        text += f":{w[6]}{sid}{w[7]}"
    else:
        sid = None
    if address is not None:
        addr_text = f"[{address}]" if ":" in address else address
        text += f":{w[6]}{addr_text}"
    line = text.encode() + (b"\r" if cr else b"")
    r = wire.parse_request(line)
    canon = None if address is None else canonical_host(address)
    assert r == wire.Request((p1, p2), kind, sid, canon)


# -- the recursive client's side: requests out, replies in ------------------

from stop.errors import UnreadableReply  # noqa: E402


@pytest.mark.parametrize("request_,line", [
    (wire.Request((6193, 23), wire.SV_REC, 4711), b"6193, 23 : SV_REC : 4711\r\n"),
    (wire.Request((1, 65535), wire.ID_REC, 0), b"1, 65535 : ID_REC : 0\r\n"),
    (wire.Request((6193, 23)), b"6193, 23\r\n"),
])
def test_format_request(request_, line):
    assert wire.format_request(request_) == line
    assert wire.parse_request(line.rstrip(b"\r\n")) == request_


@pytest.mark.parametrize("line,reply", [
    (b"6193, 23 : USERID : OTHER : " + TOKEN.encode(),
     wire.Reply((6193, 23), wire.USERID, "OTHER", TOKEN)),
    (b"6193,23:userid:other , US-ASCII:" + TOKEN.encode() + b"\r",
     wire.Reply((6193, 23), wire.USERID, "OTHER", TOKEN)),
    (b"6193, 23 : ERROR : NO-USER", wire.Reply((6193, 23), wire.ERROR, error="NO-USER")),
    (b" 6193 , 23 : error:  HIDDEN-USER  ", wire.Reply((6193, 23), wire.ERROR, error="HIDDEN-USER")),
    (b"6193, 23 : USERID : UNIX :  alice smith ",
     wire.Reply((6193, 23), wire.USERID, "UNIX", "alice smith")),
])
def test_parse_reply(line, reply):
    assert wire.parse_reply(line) == reply


def test_reply_token_needs_other_and_the_token_grammar():
    assert wire.parse_reply(b"1, 2 : USERID : OTHER : " + TOKEN.encode()).token == TOKEN
    assert wire.parse_reply(b"1, 2 : USERID : UNIX : " + TOKEN.encode()).token is None
    assert wire.parse_reply(b"1, 2 : USERID : OTHER : a b").token is None
    assert wire.parse_reply(b"1, 2 : USERID : OTHER : a:b").token is None


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"1, 2", b"1, 2 : ERROR", b"0, 2 : ERROR : NO-USER",
    b"1, 65536 : ERROR : NO-USER", b"1, 2 : USERID : OTHER", b"1, 2 : USERID : : x",
    b"1, 2 : USERID : OTHER : ", b"1, 2 : USERID : UNIX : a\x00b", b"1, 2 : ERROR : NO USER",
    b"1, 2 : USERID : UNIX : " + b"u" * 513, b"1, 2 : ERROR : X" + b"Y" * 64,
    b"1, 2 : FOO : bar",
])
def test_parse_reply_refuses(line):
    with pytest.raises(UnreadableReply):
        wire.parse_reply(line)


@given(st.binary(max_size=600))
def test_any_reply_bytes_parse_or_give_a_clean_error(data):
    try:
        reply = wire.parse_reply(data)
    except UnreadableReply:
        return
    assert reply.kind in (wire.USERID, wire.ERROR)


def test_printable():
    assert wire.printable(b"ab\\c\x00\xff\r\n", 100) == "ab\\x5cc\\x00\\xff\\x0d\\x0a"
    assert wire.printable(b"abcdef", 3) == "abc..."
