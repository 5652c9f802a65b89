"""stop.records: the canonical bytes and the time stamp every record has."""

from __future__ import annotations

import datetime
import random

import pytest
from hypothesis import example, given, strategies as st

from stop import records, wire
from stop.model import Connection, Endpoint


def reference(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


EDGES = [0.0, 0.5e-6, 1.5e-6, 0.9999994999, 0.9999995, 0.9999996, 1.0000005, -0.5, -1.0000005,
         1764547200.0, 1764547200.9999996, 1764547200.0000005, 1764547200.0000015,
         951782399.9999999,  # 2000-02-28 23:59:59.9999999: rounds into Feb 29
         253402300799.0, -62135596800.0]


@pytest.mark.parametrize("seconds", EDGES)
def test_iso_time_is_datetimes_text_at_the_edges(seconds):
    assert records.iso_time(seconds) == reference(seconds)


def test_iso_time_is_datetimes_text_for_many_times_in_any_order():
    # The per-second cache must not leak one second's text into another:
    # random times, then the same second twice, then going back.
    rng = random.Random(12)
    times = [rng.uniform(0, 4e9) for _ in range(20000)]
    times += [1764547200 + rng.randrange(0, 3 * 10**6) / 1e6 for _ in range(20000)]
    for seconds in times:
        assert records.iso_time(seconds) == reference(seconds), seconds


def test_iso_time_refuses_what_datetime_refuses():
    for seconds in (253402300800.0, -62135596801.0):
        with pytest.raises((ValueError, OverflowError, OSError)):
            reference(seconds)
        with pytest.raises(ValueError):
            records.iso_time(seconds)


def test_canonical_sorts_keys_and_keeps_utf8():
    assert records.canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode("utf-8")


# -- id_record: the same bytes as canonical(base_record(...)) -----------------

_texts = st.text(max_size=12)
_ints = st.one_of(st.integers(0, 65535), st.integers(-2**70, 2**70))
_endpoints = st.builds(Endpoint, _texts, _ints)


def _both(request, requester, server, connection, user_name, now, host):
    """(id_record's outcome, canonical(base_record(...))'s): bytes or the exception type."""
    kw = dict(requester=requester, server=server, connection=connection,
              user_name=user_name, now=now, host=host)
    out = []
    for make in (lambda: records.id_record(request=request, **kw),
                 lambda: records.canonical(records.base_record(
                     request={"type": request.type, "sid": request.sid,
                              "ports": list(request.ports), "address": request.address},
                     **kw))):
        try:
            out.append(make())
        except Exception as e:  # the same failure (a lone surrogate) both ways
            out.append(type(e))
    return out


@given(request=st.builds(wire.Request, st.tuples(_ints, _ints), st.sampled_from(wire.TYPES),
                         st.one_of(st.none(), st.integers(0, 2**32 - 1), st.booleans()),
                         st.one_of(st.none(), _texts)),
       requester=_endpoints, server=_endpoints,
       connection=st.builds(Connection, _endpoints, _endpoints,
                            st.one_of(_ints, st.booleans()), _ints, st.booleans()),
       user_name=st.one_of(st.none(), _texts, st.just("a\ud800b")),
       now=st.floats(0, 4e9), host=st.one_of(_texts, st.just("\u2028\"\\\x00\x1f\x7f")))
@example(request=wire.Request((40000, 6667)), requester=Endpoint("127.0.0.2", 6667),
         server=Endpoint("127.0.0.1", 113),
         connection=Connection(Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.2", 6667),
                               65534, 1234567, False),
         user_name="nobody", now=1764590000.123456, host="bench")
def test_id_record_is_the_canonical_base_record(request, requester, server, connection,
                                                user_name, now, host):
    a, b = _both(request, requester, server, connection, user_name, now, host)
    assert a == b
