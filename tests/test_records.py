"""stop.records: the canonical bytes and the time stamp every record has."""

from __future__ import annotations

import datetime
import random

import pytest

from stop import records


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
