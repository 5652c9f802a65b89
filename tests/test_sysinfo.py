"""The system part of an SV record (stop.sysinfo): what is kept between
records, and when it is read again."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from stop.config import Config
from stop.sysinfo import SystemInfo, _os_version, system_info


class Clocks:
    """The wall clock, the time since boot and a monotonic clock, moved by
    hand; ``reads`` counts the boot time reads."""

    def __init__(self):
        self.wall, self.boot, self.mono = 1_000_000.0, 500.0, 10.0
        self.btime = 999_500.0
        self.reads = 0

    def boot_time(self):
        self.reads += 1
        return self.btime

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds
        self.mono += seconds

    def facts(self, **kw) -> SystemInfo:
        return SystemInfo(boot_time=self.boot_time, wall=lambda: self.wall,
                          since_boot=lambda: self.boot, clock=lambda: self.mono, **kw)


def test_boot_time_is_kept_until_max_age():
    c = Clocks()
    facts = c.facts(max_age=60)
    assert facts.boot_time() == 999_500.0
    c.advance(59)
    assert facts.boot_time() == 999_500.0 and c.reads == 1
    c.advance(2)
    c.btime = 999_501.0  # slewed by NTP meanwhile
    assert facts.boot_time() == 999_501.0 and c.reads == 2


def test_a_clock_step_reads_the_boot_time_again():
    c = Clocks()
    facts = c.facts(max_age=3600)
    facts.boot_time()
    c.wall += 0.4  # within the step tolerance: kept
    assert facts.boot_time() == 999_500.0 and c.reads == 1
    c.wall += 30   # stepped: the kernel's btime moved with it
    c.btime = 999_530.0
    assert facts.boot_time() == 999_530.0 and c.reads == 2
    c.wall -= 3600  # stepped back
    c.btime = 995_930.0
    assert facts.boot_time() == 995_930.0 and c.reads == 3


def test_a_failed_boot_time_read_is_not_kept():
    c = Clocks()
    calls = []

    def failing():
        calls.append(1)
        raise RuntimeError("no btime")
    facts = SystemInfo(boot_time=failing, wall=lambda: c.wall, since_boot=lambda: c.boot,
                       clock=lambda: c.mono)
    out = system_info(("boot_time",), (), facts)
    assert out == {"unavailable": {"boot_time": "RuntimeError"}}
    system_info(("boot_time",), (), facts)
    assert len(calls) == 2


def release(path, name: str) -> None:
    """Write an os-release file atomically (as a package upgrade does)."""
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        f.write(f'NAME="X"\nPRETTY_NAME="{name}"\nID=x\n')
    os.rename(tmp, path)


def test_os_version_is_read_again_when_the_file_changes(tmp_path):
    etc, lib = tmp_path / "etc-os-release", tmp_path / "lib-os-release"
    release(lib, "Lib 1")
    facts = SystemInfo(paths=(str(etc), str(lib)))
    assert facts.os_version("Linux") == "Lib 1"
    assert facts.os_version("Linux") == "Lib 1" and facts.reads["os_version"] == 1
    release(lib, "Lib 2")          # replaced: another inode
    assert facts.os_version("Linux") == "Lib 2" and facts.reads["os_version"] == 2
    release(etc, "Etc 1")          # the first file appears: it wins
    assert facts.os_version("Linux") == "Etc 1"
    release(lib, "Lib 3")          # a file after the one in use: not looked at
    assert facts.os_version("Linux") == "Etc 1" and facts.reads["os_version"] == 3
    with open(etc, "w") as f:      # rewritten in place, another size
        f.write('PRETTY_NAME="Etc 2 (in place)"\n')
    assert facts.os_version("Linux") == "Etc 2 (in place)"
    st = os.stat(etc)
    with open(etc, "w") as f:      # same size, another mtime
        f.write('PRETTY_NAME="Etc 3 (in place)"\n')
    os.utime(etc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert facts.os_version("Linux") == "Etc 3 (in place)"
    os.unlink(etc)                 # gone: back to the second
    assert facts.os_version("Linux") == "Lib 3"
    # Always what a fresh read says.
    assert facts.os_version("Linux") == _os_version("Linux", (str(etc), str(lib)))


def test_os_version_skips_a_file_without_pretty_name(tmp_path):
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.write_text("NAME=X\n")
    release(lib, "Lib 1")
    facts = SystemInfo(paths=(str(etc), str(lib)))
    assert _os_version("Linux", (str(etc), str(lib))) == "Lib 1"
    assert facts.os_version("Linux") == "Lib 1"
    release(lib, "Lib 2")  # the one the version came from changed
    assert facts.os_version("Linux") == "Lib 2"
    os.unlink(lib)
    assert facts.os_version("Linux") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os-release")
def test_kept_facts_equal_fresh_ones():
    facts = SystemInfo()
    for _ in range(3):
        kept = facts.collect(users=("root",))
        fresh = system_info(users=("root",))
        assert kept == fresh
    assert kept["boot_time"] == psutil.boot_time()
    assert facts.reads == {"boot_time": 1, "os_version": 1}


def test_process_state_keeps_the_facts_between_records():
    from stop.model import Connection, Endpoint
    from stop.os.portable import PsutilInspector
    from stop.sv import ProcessState
    state = ProcessState(Config(process_backend="psutil"), PsutilInspector())
    conn = Connection(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), 0, 0, False)
    first = state._collect(conn)["system"]
    second = state._collect(conn)["system"]
    assert first == second
    assert state._facts.reads == {"boot_time": 1, "os_version": 1}
