"""SV end to end without the network daemon: a real process tree, the
answerer, the hash token, and ``stopctl verify`` on the stored bytes."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from argparse import Namespace

import pytest
from twisted.internet.task import Clock

from stop import wire
from stop.answer import Answerer, Query
from stop.config import Config
from stop.errors import ConfigError
from stop.model import Endpoint
from stop.os import make_inspector
from stop.sv import ProcessState
from stop.testing import FakeLookup, HeldStore
from tests.integration import svtrees

needs = pytest.mark.skipif(not shutil.which("nc"), reason="needs netcat-openbsd")


@pytest.fixture(scope="module")
def fig3():
    tree = svtrees.figure3()
    yield tree
    tree.stop()


def answer(tree, line: bytes, config: Config):
    store = HeldStore()
    store.auto = True
    clock = Clock()
    clock.advance(1764072000)
    conn = tree.connection
    state = ProcessState(config, make_inspector(config, None))
    a = Answerer(config, FakeLookup(conn), store, clock, process_state=state, host_name="h")
    out = []
    req = wire.parse_request(line)
    a.answer(Query(req, Endpoint(conn.remote.host, conn.remote.port),
                   Endpoint(conn.local.host, 113))).addBoth(out.append)
    (reply,) = out
    m = re.fullmatch(rb"\d+, \d+ : USERID : OTHER : ([0-9a-f]+)\r\n", reply)
    assert m, reply
    return m.group(1).decode(), store


def sv_line(tree) -> bytes:
    c = tree.connection
    return f"{c.local.port}, {c.remote.port} : SV".encode()


def verify(store, token: str, hash_name: str = "sha1") -> tuple[int, str]:
    # stop.ctl imports stop.storage, which lands on main separately.
    ctl = pytest.importorskip("stop.ctl")
    out = io.StringIO()
    code = ctl.cmd_verify(store, Namespace(token=token), out, hash_name)
    return code, out.getvalue()


@needs
@pytest.mark.parametrize("hash_name, length", [("sha1", 40), ("sha256", 64)])
def test_sv_token_is_the_hash_of_the_stored_bytes(fig3, hash_name, length):
    token, store = answer(fig3, sv_line(fig3), Config(hash=hash_name))
    data = store.get(token)
    assert len(token) == length
    assert token == hashlib.new(hash_name, data).hexdigest()
    record = json.loads(data)
    pids = {p["pid"] for p in record["processes"]["processes"]}
    assert {fig3.info["nc_out"], fig3.info["shell"], fig3.info["nc_in"]} <= pids
    assert record["system"]["hostname"]
    assert record["system"]["os"]["release"]


@needs
@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_verify_says_ok_for_an_untouched_sv_record(fig3, hash_name):
    token, store = answer(fig3, sv_line(fig3), Config(hash=hash_name))
    assert verify(store, token, hash_name) == (0, "store integrity: OK\nOK\n")


@needs
def test_tampering_one_byte_makes_verify_fail(fig3):
    token, store = answer(fig3, sv_line(fig3), Config())
    data = bytearray(store.saved[token])
    i = data.index(b'"nc"')
    data[i + 1] = ord("m")  # "nc" -> "mc": still valid JSON
    store.saved[token] = bytes(data)
    code, text = verify(store, token)
    assert code == 1 and text.endswith("MISMATCH\n")
    assert verify(store, "0" * 40)[0] == 2


@needs
def test_id_token_is_random_and_sv_fields_select(fig3):
    token, store = answer(fig3, f"{fig3.connection.local.port}, {fig3.connection.remote.port}"
                          .encode(), Config())
    data = store.get(token)
    assert token != hashlib.sha1(data).hexdigest()
    assert "processes" not in json.loads(data)
    token, store = answer(fig3, sv_line(fig3),
                          Config(sv_fields=("pid", "ppid", "name", "hostname"), open_files=False))
    record = json.loads(store.get(token))
    for p in record["processes"]["processes"]:
        assert set(p) <= {"pid", "ppid", "name", "reached", "scope", "unavailable"}
    assert set(record["system"]) == {"hostname"}


def test_sv_settings_are_checked():
    with pytest.raises(ConfigError, match="sv_fields"):
        Config(sv_fields=("name", "password"))
    with pytest.raises(ConfigError, match="process_backend"):
        Config(process_backend="")
    # A name that is not built in may be a site plugin's: refused when built.
    with pytest.raises(ConfigError, match="process_backend: 'kvm' is neither built in"):
        make_inspector(Config(process_backend="kvm", plugin_dirs=()), None)
    with pytest.raises(ConfigError, match="walk_max_fds"):
        Config(walk_max_fds=0)
