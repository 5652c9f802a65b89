"""The chain head of a real daemon's store: logged at start and at stop,
and what ``stopctl verify --all --head`` makes of it, before and after the
store's last entries are cut off (issue 10)."""

import glob
import re
import time

import pytest

from tests import rsyslogd
from tests.integration.harness import Pair

HEAD = re.compile(r"record store chain head (at start|at stop|every [0-9.]+ s): ([0-9]+):([0-9a-f]{64})")


def heads(daemon):
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in HEAD.finditer(daemon.read_log())]


def test_logged_head_catches_a_truncated_store(start_daemon):
    d = start_daemon({"head_log_interval": "1"})
    pair = Pair()
    try:
        for _ in range(3):
            (reply,) = d.ask(pair.query())
            assert b"USERID" in reply
    finally:
        pair.close()
    # While it runs: the head every second, the store sound against it.
    deadline = time.monotonic() + 30
    while not any(w.startswith("every") and n == 3 for w, n, _ in heads(d)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (_, count, chain) = [h for h in heads(d) if h[0].startswith("every") and h[1] == 3][0]
    assert heads(d)[0][:2] == ("at start", 0)
    ok = d.stopctl("verify", "--all", "--head", f"{count}:{chain}")
    assert ok.returncode == 0 and ok.stdout.endswith("SOUND\n"), ok.stdout + ok.stderr
    d.stop()
    assert heads(d)[-1] == ("at stop", 3, chain)
    # Cut the last record off: the chain inside is sound, the saved head is not in it.
    (segment,) = glob.glob(d.data_dir + "/records/seg-*")
    with open(segment, "rb") as fh:
        data = fh.read()
    with open(segment, "wb") as fh:
        fh.write(data[:data.rindex(b"\n", 0, len(data) - 1) + 1])
    assert d.stopctl("verify", "--all").returncode == 0
    bad = d.stopctl("verify", "--all", "--head", f"{count}:{chain}")
    assert bad.returncode == 1
    assert "HEAD: the saved head" in bad.stdout and "1 entry before the saved head" in bad.stdout
    stats = d.stopctl("stats")
    assert stats.returncode == 0 and re.search(r"^head +2:[0-9a-f]{64}$", stats.stdout, re.M), stats.stdout


@pytest.mark.skipif(not rsyslogd.available(), reason="rsyslogd not installed")
def test_head_reaches_syslog(start_daemon, tmp_path):
    server = rsyslogd.Rsyslogd(tmp_path / "rsyslog").start()
    try:
        d = start_daemon({"syslog": "yes", "syslog_socket": server.socket_path,
                          "head_log_interval": "0"})
        pair = Pair()
        try:
            (reply,) = d.ask(pair.query())
            assert b"USERID" in reply
        finally:
            pair.close()
        d.stop()
        got = server.wait_messages(lambda m: "record store chain head" in m[6], count=2)
        said = [HEAD.search(m[6]).groups() for m in got]
        assert [(w, int(n)) for w, n, _ in said] == [("at start", 0), ("at stop", 1)]
        assert all(m[:3] == ("daemon", "info", "stopd") for m in got)
        ok = d.stopctl("verify", "--all", "--head", f"{said[1][1]}:{said[1][2]}")
        assert ok.returncode == 0 and ok.stdout.endswith("SOUND\n"), ok.stdout + ok.stderr
    finally:
        server.stop()
