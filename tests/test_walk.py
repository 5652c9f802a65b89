"""stop.walk on an in-memory process table: order, budget, cycles, gone
processes, remote connections and their direction, field selection."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from stop.interfaces import IProcessInspector, IProcessScan
from stop.model import Connection, Endpoint
from stop.os.common import PROCESS_FIELDS
from stop.testing import TableInspector, TableScan
from stop.walk import Budget, walk

QUERIED = Connection(Endpoint("192.0.2.1", 40000), Endpoint("198.51.100.9", 113 + 1),
                     uid=1000, inode=500, accepted=False)


def tcp(fd, inode, local, remote, direction, state="ESTABLISHED", by="listener"):
    return {"fd": fd, "kind": "socket", "inode": inode, "family": "AF_INET",
            "type": "SOCK_STREAM", "local": {"address": local[0], "port": local[1]},
            "remote": {"address": remote[0], "port": remote[1]}, "state": state,
            "direction": direction, "direction_by": by}


def figure3_table():
    """1 <- 10 (shell) <- 11 (nc -l), 12 (nc out); pipe 11:1 <-> 12:0;
    11 holds an inbound connection from another host."""
    table = {
        1: (0, []),
        10: (1, [{"fd": 0, "kind": "file", "path": "/dev/pts/0"}]),
        11: (10, [{"fd": 1, "kind": "pipe", "inode": 900},
                  tcp(3, 501, ("192.0.2.1", 8888), ("203.0.113.5", 5555), "inbound")]),
        12: (10, [{"fd": 0, "kind": "pipe", "inode": 900},
                  tcp(3, 500, ("192.0.2.1", 40000), ("198.51.100.9", 114), "outbound")]),
    }
    links = {(12, 0): [(11, 1)], (11, 1): [(12, 0)]}
    return table, links


def test_fakes_provide_the_interfaces():
    scan = TableScan({}, {}, [])
    verifyObject(IProcessScan, scan)
    verifyObject(IProcessInspector, TableInspector(scan))


def test_figure3_order_reasons_and_remote_connections():
    table, links = figure3_table()
    result = walk(TableInspector(TableScan(table, links, [12])), QUERIED)
    assert [p["pid"] for p in result["processes"]] == [12, 10, 11, 1]
    reached = {p["pid"]: p["reached"] for p in result["processes"]}
    assert reached == {12: {"via": "socket"}, 10: {"via": "parent", "from": 12},
                       11: {"via": "pipe", "from": 12, "fd": 0},
                       1: {"via": "parent", "from": 10}}
    # The queried connection is not a recursion target; the inbound one is.
    assert result["remote_connections"] == [{
        "pid": 11, "fd": 3, "family": "AF_INET",
        "local": {"address": "192.0.2.1", "port": 8888},
        "remote": {"address": "203.0.113.5", "port": 5555}, "direction": "inbound",
        "direction_by": "listener", "inode": 501, "holders": [[11, 3]]}]
    assert result["users"] == ["u1", "u10", "u11", "u12"]


@pytest.mark.parametrize("with_inode", [True, False])  # procfs / psutil (no inodes)
def test_a_socket_held_by_several_processes_is_listed_once_with_all_holders(with_inode):
    """An sshd monitor (20) and its session (21, forked from it) both hold
    the inbound ssh connection; the session also holds the queried one."""
    ssh = tcp(5, 601, ("192.0.2.1", 22), ("203.0.113.5", 50000), "inbound")
    if not with_inode:
        del ssh["inode"]
    table = {
        1: (0, []),
        20: (1, [dict(ssh, fd=4)]),
        21: (20, [dict(ssh, fd=5), dict(ssh, fd=6),
                  tcp(3, 500, ("192.0.2.1", 40000), ("198.51.100.9", 114), "outbound")]),
    }
    result = walk(TableInspector(TableScan(table, {}, [21])), QUERIED)
    want = {"pid": 21, "fd": 5, "family": "AF_INET",
            "local": {"address": "192.0.2.1", "port": 22},
            "remote": {"address": "203.0.113.5", "port": 50000}, "direction": "inbound",
            "direction_by": "listener", "holders": [[21, 5], [21, 6], [20, 4]]}
    if with_inode:
        want["inode"] = 601
    assert result["remote_connections"] == [want]


def test_budget_limits_processes_and_is_passed_to_the_scan():
    table = {pid: (pid - 1 if pid > 1 else 0, []) for pid in range(1, 101)}
    inspector = TableInspector(TableScan(table, {}, [100]))
    result = walk(inspector, QUERIED, Budget(max_processes=7, max_fds=33))
    assert len(result["processes"]) == 7
    assert result["truncated"] == {"processes": True, "descriptors": False}
    assert inspector.max_fds == 33
    assert result["budget"] == {"max_processes": 7, "max_fds": 33}


def test_cycles_end():
    table = {5: (6, [{"fd": 0, "kind": "pipe", "inode": 1}]),
             6: (5, [{"fd": 1, "kind": "pipe", "inode": 1}])}
    links = {(5, 0): [(6, 1)], (6, 1): [(5, 0)]}
    scan = TableScan(table, links, [5])
    result = walk(TableInspector(scan), QUERIED)
    assert [p["pid"] for p in result["processes"]] == [5, 6]
    assert scan.read == [5, 6]


def test_gone_and_unreadable_processes_are_recorded():
    table, links = figure3_table()
    scan = TableScan(table, links, [12], gone={10}, denied={11})
    result = walk(TableInspector(scan), QUERIED)
    procs = {p["pid"]: p for p in result["processes"]}
    assert procs[10]["unavailable"] == {"process": "ESRCH"}
    assert procs[11]["unavailable"] == {"descriptors": "EACCES"}
    assert 1 not in procs  # its only way up was through the gone shell


@pytest.mark.parametrize("open_files", [True, False])
def test_fields_and_open_files(open_files):
    table, links = figure3_table()
    fields = ("name", "sockets", "pipes", "files")
    result = walk(TableInspector(TableScan(table, links, [12])), QUERIED,
                  fields=fields, open_files=open_files)
    shell = next(p for p in result["processes"] if p["pid"] == 10)
    assert ("files" in shell) is open_files
    assert "users" not in shell  # not selected, though used for utmp
    assert result["users"]
    narrow = walk(TableInspector(TableScan(table, links, [12])), QUERIED, fields=("name",))
    assert all(set(p) <= {"pid", "ppid", "name", "reached", "scope"} for p in narrow["processes"])


def test_every_field_name_is_known():
    assert len(set(PROCESS_FIELDS)) == len(PROCESS_FIELDS)
