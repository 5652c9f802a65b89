"""stop.os.direction: the rule, its signals in order, the port range and the
listener table check. Real processes: tests/integration/test_direction.py."""

from __future__ import annotations

import sys

import pytest

from stop.os import direction
from stop.os.direction import (Direction, DirectionRule, PortRange, listener_covers,
                               read_port_range)

RANGE = (32768, 60999)


@pytest.mark.parametrize("local,remote,listening,want", [
    # A listener decides first, whatever the ports.
    (22, 50000, True, ("inbound", "listener")),
    (40000, 40001, True, ("inbound", "listener")),
    (40000, 22, True, ("inbound", "listener")),
    # No listener (a relay that closed it): the ports decide.
    (8888, 40000, False, ("inbound", "ephemeral-range")),
    (40000, 8888, False, ("outbound", "ephemeral-range")),
    (40000, 22, None, ("outbound", "ephemeral-range")),  # listener unknown: skipped
    # Neither decides.
    (40000, 40001, False, ("unknown", "none")),  # a service on an ephemeral port
    (700, 8888, False, ("unknown", "none")),  # outbound from a fixed low port
    (32768, 60999, False, ("unknown", "none")),  # the range is inclusive
    (32767, 60999, False, ("inbound", "ephemeral-range")),
    (61000, 32768, False, ("inbound", "ephemeral-range")),
])
def test_signals_in_order(local, remote, listening, want):
    decided = DirectionRule(RANGE).decide(local, remote, listening)
    assert decided == Direction(*want)
    assert decided.inbound is (want[0] == "inbound")
    assert decided.by in direction.SIGNALS


def test_unknown_range_leaves_only_the_listener():
    rule = DirectionRule(None)
    assert rule.port_range is None
    assert rule.decide(8888, 40000, False) == ("unknown", "none")
    assert rule.decide(8888, 40000, True) == ("inbound", "listener")


def test_port_range_is_read_again_after_max_age():
    now, values = [0.0], [(1000, 2000), (3000, 4000)]
    reads = []

    def read():
        reads.append(now[0])
        return values[len(reads) - 1]
    ports = PortRange(read, max_age=60, clock=lambda: now[0])
    rule = DirectionRule(ports)
    assert rule.port_range == (1000, 2000)
    now[0] = 59
    assert rule.decide(1500, 80, False) == ("outbound", "ephemeral-range")
    now[0] = 61
    assert rule.port_range == (3000, 4000) and reads == [0.0, 61]
    assert rule.decide(1500, 80, False) == ("unknown", "none")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux")
def test_linux_range_is_the_kernel_setting(tmp_path, monkeypatch):
    with open(direction.LINUX_RANGE) as f:
        first, last = (int(x) for x in f.read().split())
    assert read_port_range() == (first, last)
    assert DirectionRule().port_range == (first, last)
    for text in ("garbage", "5 4", "0 10", ""):
        path = tmp_path / "range"
        path.write_text(text)
        monkeypatch.setattr(direction, "LINUX_RANGE", str(path))
        assert read_port_range() is None, text
    monkeypatch.setattr(direction, "LINUX_RANGE", str(tmp_path / "absent"))
    assert read_port_range() is None


def test_no_range_on_an_unknown_system():
    assert read_port_range("plan9") is None


@pytest.mark.parametrize("listeners,address,port,want", [
    ({("192.0.2.1", 80)}, "192.0.2.1", 80, True),
    ({("192.0.2.1", 80)}, "192.0.2.2", 80, False),
    ({("192.0.2.1", 80)}, "192.0.2.1", 81, False),
    ({("0.0.0.0", 80)}, "192.0.2.1", 80, True),
    ({("0.0.0.0", 80)}, "2001:db8::1", 80, False),  # not for IPv6
    ({("::", 80)}, "2001:db8::1", 80, True),
    ({("::", 80)}, "192.0.2.1", 80, True),  # dual-stack assumed (tables hide V6ONLY)
    ({("2001:db8::1", 80)}, "2001:db8::2", 80, False),
])
def test_listener_table(listeners, address, port, want):
    assert listener_covers(listeners, address, port) is want
