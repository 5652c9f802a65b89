"""A real ``twistd stop`` process as an administrator meets it: every start
failure is one line and a non-zero exit status, SIGHUP reloads (under load,
with a bad file, with a moved log file), the start-up line, SIGTERM.
(Run on both package sets: twistd 22.4 and the newest behave the same.)"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

import stop
from tests.integration.harness import (HOST, PEER, START_TIMEOUT, Daemon, Pair, read_lines)
from tests.test_tap_plugins import SITE

TOKEN = rb"[0-9a-f]{40}"
CANNOT = "stop: cannot start: "


def run_to_exit(d: Daemon) -> subprocess.CompletedProcess:
    """Run ``d`` (which must fail to start) to its end."""
    return subprocess.run(d.command(), cwd=str(d.dir), env=d.environment(),
                          capture_output=True, text=True, timeout=START_TIMEOUT * 2)


def store_is_a_file(d: Daemon) -> str:
    with open(d.data_dir, "w"):
        pass
    return f"data_dir = {d.data_dir}): store directory {d.data_dir} is not a directory"


def store_is_world_writable(d: Daemon) -> str:
    os.mkdir(d.data_dir)
    os.chmod(d.data_dir, 0o777)
    return f"data_dir = {d.data_dir}): store directory {d.data_dir} is group- or world-writable"


def store_of_another_user(d: Daemon) -> str:
    os.mkdir(d.data_dir, 0o700)
    os.chown(d.data_dir, 65534, 65534)
    return f"data_dir = {d.data_dir}): store directory {d.data_dir} is owned by uid 65534"


def config_is_missing(d: Daemon) -> str:
    os.unlink(d.config)
    return f"cannot read config file {d.config}: No such file or directory"


def config_is_a_directory(d: Daemon) -> str:
    os.unlink(d.config)
    os.mkdir(d.config)
    return f"cannot read config file {d.config}: Is a directory"


# (name, settings, options, prepare(daemon) -> words of the line, exit status)
FAILURES = [
    ("store not a directory", {}, [], store_is_a_file, 1),
    ("store world-writable", {}, [], store_is_world_writable, 1),
    ("store of another user", {}, [], store_of_another_user, 1),
    ("bad setting in the file", {"errors": "loud"}, [],
     lambda d: f"{d.config}: errors: 'loud' is not one of normal, unknown, token", 2),
    ("bad setting on the command line", {}, ["--errors", "loud"],
     lambda d: "command line: errors: 'loud' is not one of normal, unknown, token", 2),
    ("unknown option", {}, ["--bogus"],
     lambda d: "command line: option --bogus not recognized (see twistd stop --help)", 2),
    ("unknown storage plugin", {"storage": "nosuch"}, [],
     lambda d: "storage: 'nosuch' is neither built in (flat, gzip, memory) nor a plugin in /etc/stop/plugins", 2),
    ("unknown hook plugin", {"hooks": "nosuch"}, [],
     lambda d: "hooks: 'nosuch' is neither built in nor a plugin in /etc/stop/plugins", 2),
    ("not an endpoint", {}, ["--listen", "tcp:notaport"],
     lambda d: "listen: 'tcp:notaport' is not a server endpoint", 2),
    ("config file missing", {}, [], config_is_missing, 2),
    ("config file a directory", {}, [], config_is_a_directory, 2),
]


@pytest.mark.parametrize("name,settings,args,prepare,status", FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_start_failure_is_one_line_and_an_exit_status(tmp_path, name, settings, args,
                                                       prepare, status):
    d = Daemon(tmp_path, settings, args, interfaces=(HOST,))
    words = prepare(d)
    result = run_to_exit(d)
    assert result.returncode == status, (result, d.read_log())
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(CANNOT) and words in lines[0], result.stderr
    assert result.stdout == ""
    log = d.read_log()
    assert f"[stop.tap#critical] cannot start: {lines[0][len(CANNOT):]}\n" in log, log
    assert "Traceback" not in result.stderr + log
    assert " started (pid " not in log


def test_address_in_use_is_one_line_and_exit_1(tmp_path):
    d = Daemon(tmp_path, interfaces=(HOST,))
    with socket.socket() as busy:
        busy.bind((HOST, d.port))
        busy.listen(1)
        result = run_to_exit(d)
    assert result.returncode == 1, (result, d.read_log())
    assert result.stderr == (f"{CANNOT}listen = tcp:{d.port}:interface={HOST}: Couldn't listen "
                             f"on {HOST}:{d.port}: [Errno 98] Address already in use.\n")
    assert "Traceback" not in d.read_log()


# -- the start-up line and SIGTERM -------------------------------------------------

def whole_log(d: Daemon) -> str:
    """The log, with the part twistd rotated away (at 1 MB) when it did."""
    try:
        with open(d.log + ".1", encoding="utf-8", errors="replace") as fh:
            return fh.read() + d.read_log()
    except FileNotFoundError:
        return d.read_log()


def wait_for(d: Daemon, pattern: str, count: int = 1, timeout: float = START_TIMEOUT):
    """The log's matches of ``pattern`` once there are ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, whole_log(d), re.M)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline or not d.alive():
            raise AssertionError(f"{pattern!r} x{count} not in the log:\n{d.read_log()}")
        time.sleep(0.05)


def test_start_up_line_names_the_bound_addresses_store_hooks_and_sigterm_ends_it(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    (plugins / "site.py").write_text(SITE)  # a hook plugin "site-hook", among others
    d = Daemon(tmp_path, {"plugin_dirs": str(plugins), "hooks": "site-hook"},
               ["--listen", f"tcp:0:interface={HOST}", "--listen", "tcp6:0:interface=\\:\\:1"])
    d.proc = subprocess.Popen(d.command(), cwd=str(d.dir), env=d.environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        [line] = wait_for(d, r"\[stop\.tap#info\] (stop .* started .*)$")
        m = re.fullmatch(
            rf"stop {re.escape(stop.__version__)} started \(pid {d.proc.pid}\): listening on "
            rf"{re.escape(HOST)}:(\d+) \[::1\]:(\d+); store flat in {re.escape(d.data_dir)}; "
            rf"hooks: site-hook; lookup \w+, errors normal", line)
        assert m, line
        ports = [int(p) for p in m.groups()]
        assert 0 not in ports
        # The real ports: a query through each gets its answer.
        for host, port in zip((HOST, "::1"), ports):
            d.port = port
            with d.connect(source=PEER if host == HOST else "::1", dest=host) as s:
                s.sendall(b"1, 1\r\n")
                assert read_lines(s, 1) == [b"1, 1 : ERROR : NO-USER"]
        d.proc.send_signal(signal.SIGTERM)
        # twistd ends by the signal it was stopped with (stop(8), EXIT STATUS).
        assert d.proc.wait(START_TIMEOUT) == -signal.SIGTERM
        assert "Server Shut Down." in d.read_log() and "Traceback" not in d.read_log()
    finally:
        d.stop()


# -- SIGHUP -------------------------------------------------------------------------

def rewrite(d: Daemon, **settings) -> None:
    """Replace the settings of ``d``'s config file (atomically, as editors
    and config managers should), keeping listen and data_dir."""
    with open(d.config) as fh:
        lines = fh.read().splitlines()
    head = lines[:lines.index(next(x for x in lines if x.startswith("data_dir"))) + 1]
    tmp = d.config + ".new"
    with open(tmp, "w") as fh:
        fh.write("\n".join(head + [f"{k} = {v}" for k, v in settings.items()]) + "\n")
    os.replace(tmp, d.config)


def hup(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGHUP)


RELOADED = r"\[stop\.tap#info\] SIGHUP: settings reloaded: (.*)$"


def test_sighup_reloads_what_may_change_logs_the_rest_and_survives_a_bad_file(start_daemon):
    d = start_daemon()
    assert d.ask(b"1, 1") == [b"1, 1 : ERROR : NO-USER"]
    rewrite(d, errors="unknown", hash="sha256", fsync="always")
    hup(d)
    assert wait_for(d, RELOADED) == ["errors = unknown"]
    assert wait_for(d, r"\[stop\.tap#warn\] SIGHUP: (.*)$") == [
        "changed, in effect only after a restart: fsync, hash"]
    assert d.ask(b"1, 1") == [b"1, 1 : ERROR : UNKNOWN-ERROR"]
    pair = Pair()
    try:
        (reply,) = d.ask(pair.query())
        assert re.fullmatch(pair.query() + rb" : USERID : OTHER : " + TOKEN, reply)  # sha1 still
        # A bad file changes nothing and is logged.
        rewrite(d, errors="loud")
        hup(d)
        [why] = wait_for(d, r"\[stop\.tap#error\] SIGHUP: reload failed, nothing changed: (.*)$")
        assert why == f"{d.config}: errors: 'loud' is not one of normal, unknown, token"
        os.unlink(d.config)
        hup(d)
        [_, why] = wait_for(d, r"\[stop\.tap#error\] SIGHUP: reload failed, nothing changed: "
                               r"(.*)$", 2)
        assert why == f"cannot read config file {d.config}: No such file or directory"
        assert d.ask(b"1, 1") == [b"1, 1 : ERROR : UNKNOWN-ERROR"] and d.alive()
    finally:
        pair.close()
    assert "Traceback" not in d.read_log()


SLOW_STORE = """
import time
from twisted.plugin import IPlugin
from zope.interface import implementer
from stop.interfaces import IStorePlugin
from stop.storage.memory import MemoryStore

class Slow(MemoryStore):
    def open(self):
        time.sleep(2)  # listening already, not started yet
        super().open()

@implementer(IPlugin, IStorePlugin)
class SlowPlugin:
    name = "slow"
    def build(self, config, reactor):
        return Slow(config.data_dir, reactor=reactor)

slow = SlowPlugin()
"""


def test_sighup_while_starting_is_a_reload_once_started(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    (plugins / "slow.py").write_text(SLOW_STORE)
    d = Daemon(tmp_path, {"plugin_dirs": str(plugins), "storage": "slow"}, interfaces=(HOST,))
    d.proc = subprocess.Popen(d.command(), cwd=str(d.dir), env=d.environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(d, f"starting on {d.port}$")
        hup(d)  # the store is still opening
        wait_for(d, RELOADED)
        assert d.alive() and " started (pid " in d.read_log()
        assert d.ask(b"1, 1") == [b"1, 1 : ERROR : NO-USER"]
    finally:
        d.stop()


def test_sighup_reopens_the_log_file(start_daemon):
    d = start_daemon()
    os.rename(d.log, d.log + ".1")  # logrotate, without copytruncate
    hup(d)
    wait_for(d, RELOADED)  # read_log reads the new file
    assert "SIGHUP" not in open(d.log + ".1").read()
    assert d.ask(b"1, 1") == [b"1, 1 : ERROR : NO-USER"]
    wait_for(d, r"asked 1, 1 ID: NO-USER")


def test_sighup_under_load_loses_no_query(start_daemon):
    d = start_daemon()
    clients, most_rounds, signals = 4, 2000, 20
    per_connection = 20  # rounds of 3 requests: under max_requests_per_connection (64)
    deadline = time.monotonic() + 60
    hups_done = threading.Event()
    sent, bad, tokens, errors = [0] * clients, [], set(), []

    def client(n: int) -> None:
        pair = Pair()
        s = None
        try:
            # Until the signals are all sent (each client at most
            # most_rounds rounds of 3 requests, at most 60 s).
            for i in range(most_rounds):
                if hups_done.is_set() or time.monotonic() > deadline:
                    break
                if i % per_connection == 0:
                    if s is not None:
                        s.close()
                    s = d.connect()
                s.sendall(pair.query() + b"\r\n1, 1\r\nbogus\r\n")
                sent[n] += 3
                lines = read_lines(s, 3)
                ok = (len(lines) == 3
                      and re.fullmatch(pair.query() + rb" : USERID : OTHER : (" + TOKEN + rb")",
                                       lines[0])
                      and re.fullmatch(rb"1, 1 : ERROR : (NO-USER|UNKNOWN-ERROR)", lines[1])
                      and re.fullmatch(rb"0, 0 : ERROR : UNKNOWN-ERROR", lines[2]))
                if ok:
                    tokens.add(lines[0].rsplit(b" ", 1)[1].decode())
                else:
                    bad.append(lines)
        except Exception as e:  # reported below, with the daemon's log
            errors.append(repr(e))
        finally:
            if s is not None:
                s.close()
            pair.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for i in range(signals):
        rewrite(d, errors=("unknown" if i % 2 == 0 else "normal"),
                max_connections_per_host=16 + i)
        hup(d)
        time.sleep(0.1)
    hups_done.set()
    for t in threads:
        t.join(120)
    assert not errors and not bad, (errors, bad[:3], d.read_log()[-3000:])
    assert sum(sent) == 3 * len(tokens) and len(tokens) > clients * 10, (sent, len(tokens))
    assert d.alive()
    # Signals that arrive together are handled once: at least one reload.
    reloads = wait_for(d, RELOADED)
    print(f"{sum(sent)} queries, {len(reloads)} reloads for {signals} SIGHUPs")
    listed = {json.loads(x)["token"] for x in d.stopctl("list", "--json").stdout.splitlines()}
    assert tokens <= listed  # every token given has its record
    log = whole_log(d)
    assert "Traceback" not in log and "reload failed" not in log


def test_a_daemonized_twistd_exits_1_and_says_why(tmp_path):
    d = Daemon(tmp_path, {"errors": "loud"}, interfaces=(HOST,))
    command = [arg for arg in d.command() if arg != "--nodaemon"]
    result = subprocess.run(command, cwd=str(d.dir), env=d.environment(), capture_output=True,
                            text=True, timeout=START_TIMEOUT * 2)
    assert result.returncode == 1
    # twistd prints the first 98 bytes of the reason, as a bytes repr.
    assert re.match(rf"An error has occurred: b['\"]{re.escape(d.config)}: errors: 'loud'",
                    result.stderr), result.stderr
    assert f"cannot start: {d.config}: errors: 'loud' is not one of" in d.read_log()
