"""Real ident clients from Debian get a token from a real ``twistd stop``.

The clients (Net::Ident from libnet-ident-perl, tcp_wrappers' rfc931()
inside ``tcpd``) always ask port 113 on the client's address, so each test
runs the daemon on 127.0.0.1:113 in a network namespace of its own, with
the ident client's server and the connecting client (a process running as
``nobody``) in the same namespace. The token each client receives must name
a record whose uid and ports are those of the client's connection.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess

import pytest

from tests.integration.harness import Daemon
from tests.integration import netns as netns_mod
from tests.integration.netns import read_line, stop_process

pytestmark = pytest.mark.root

LOOPBACK = "127.0.0.1"
TOKEN = r"[0-9a-f]{40}"
STEP_TIMEOUT = 30.0
# Children running as nobody use the system interpreter: the venv's may sit
# under /root, which nobody cannot read.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")

# Connects to the port in argv[1], prints its own port, then prints all it
# receives until the server closes.
CLIENT = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
print(s.getsockname()[1], flush=True)
data = b""
while len(data) < 4096:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode("ascii", "replace").strip(), flush=True)
"""

# A server that asks ident about its one client with Net::Ident: prints its
# port, then "opsys<TAB>user<TAB>error<TAB>raw reply", and tells the client.
NET_IDENT_SERVER = r"""
use strict; use warnings; use IO::Socket::INET; use Net::Ident;
$| = 1;
alarm 60;
my $l = IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1", LocalPort => 0,
                              Proto => "tcp", ReuseAddr => 1) or die "listen: $!";
print $l->sockport, "\n";
my $c = $l->accept or die "accept: $!";
my $id = Net::Ident->new($c, 20);
my ($user, $opsys, $error) = $id->username;
my $raw = defined $id->{answer} ? $id->{answer} : "";
$raw =~ s/[\r\n]+$//;
print join("\t", map { defined $_ ? $_ : "" } $opsys, $user, $error, $raw), "\n";
print $c "user=", (defined $user ? $user : "-"), "\r\n";
close $c;
"""

# A one-shot inetd: prints its port, accepts one connection and runs tcpd
# on it (stdin and stdout are the socket, as under inetd). tcpd takes an
# absolute argv[0] as the real daemon's path; the hosts.allow rule twists
# the connection to a shell command before that daemon would run.
INETD = r"""
import os, socket
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
print(l.getsockname()[1], flush=True)
l.settimeout(60)
c, _ = l.accept()
os.dup2(c.fileno(), 0)
os.dup2(c.fileno(), 1)
os.execv("/usr/sbin/tcpd", ["/bin/true"])
"""


@pytest.fixture
def netns():
    if not netns_mod.available():
        pytest.skip("needs root and iproute2 (a network namespace, port 113)")
    with netns_mod.Netns("clients") as ns:
        yield ns


@pytest.fixture
def daemon113(netns, tmp_path_factory):
    """``twistd stop`` on 127.0.0.1:113 inside the namespace."""
    d = Daemon(tmp_path_factory.mktemp("stopd"), interfaces=(LOOPBACK,), port=113,
               netns=netns).start()
    yield d
    d.stop()
    assert "Traceback" not in d.read_log(), d.read_log()


@pytest.fixture
def processes():
    """spawn(cmd) -> Popen (binary pipes); all stopped by PID afterwards."""
    started: list[subprocess.Popen] = []

    def spawn(cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, **kw)
        started.append(p)
        return p

    yield spawn
    for p in started:
        stop_process(p)


def as_nobody() -> list[str]:
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def need(*programs: str) -> None:
    for prog in programs:
        if shutil.which(prog) is None:
            pytest.skip(f"{prog} is not installed")


def stderr_of(p: subprocess.Popen) -> str:
    stop_process(p)
    return p.stderr.read().decode(errors="replace") if not p.stderr.closed else ""


def read_port(p: subprocess.Popen, what: str) -> int:
    line = read_line(p, STEP_TIMEOUT)
    assert line.isdigit(), f"{what} printed {line!r}; stderr: {stderr_of(p)}"
    return int(line)


def record_of(daemon: Daemon, token: str) -> dict:
    r = daemon.stopctl("show", "--json", token)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["record"]


def assert_record_is_the_clients(daemon: Daemon, token: str, client_port: int,
                                 server_port: int) -> None:
    """The record behind ``token`` is nobody's connection client_port ->
    server_port on loopback, asked about by the server's host."""
    nobody = pwd.getpwnam("nobody")
    rec = record_of(daemon, token)
    assert rec["user"]["uid"] == nobody.pw_uid
    assert rec["connection"]["local"] == {"address": LOOPBACK, "port": client_port}
    assert rec["connection"]["remote"] == {"address": LOOPBACK, "port": server_port}
    assert rec["requester"]["address"] == LOOPBACK
    assert rec["request"]["type"] == "ID"


def test_net_ident_perl_client_gets_the_token(netns, daemon113, processes):
    need("perl", "setpriv")
    if subprocess.run(["perl", "-MNet::Ident", "-e", "1"], capture_output=True,
                      timeout=30).returncode != 0:
        pytest.skip("Net::Ident (libnet-ident-perl) is not installed")
    server = processes(netns.command(["perl", "-e", NET_IDENT_SERVER]))
    server_port = read_port(server, "the Net::Ident server")
    client = processes(netns.command(as_nobody() + [SYSTEM_PYTHON, "-c", CLIENT,
                                                    str(server_port)]))
    client_port = read_port(client, "the client")

    result = read_line(server, STEP_TIMEOUT)
    fields = result.split("\t")
    assert len(fields) == 4, f"{result!r}; stderr: {stderr_of(server)}"
    opsys, user, error, raw = fields
    assert (opsys, error) == ("OTHER", ""), result
    assert re.fullmatch(TOKEN, user), result
    assert re.fullmatch(rf"{client_port}, {server_port} : USERID : OTHER : {user}", raw), raw
    assert read_line(client, STEP_TIMEOUT) == f"user={user}"
    assert_record_is_the_clients(daemon113, user, client_port, server_port)


def test_tcpd_rfc931_gets_the_token(netns, daemon113, processes, tmp_path):
    need("unshare", "mount", "setpriv")
    if not os.access("/usr/sbin/tcpd", os.X_OK):
        pytest.skip("tcpd (tcp_wrappers) is not installed")
    for f in ("/etc/hosts.allow", "/etc/hosts.deny"):
        if not os.path.isfile(f):
            pytest.skip(f"{f} is missing: nothing to bind-mount the test's rules over")
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    # %u makes tcpd ask the client's ident server (rfc931()) for the user.
    allow.write_text("ALL : ALL : twist /bin/echo STOP-USER=%u\n")
    deny.write_text("ALL : ALL\n")
    # The rules are bind-mounted in a private mount namespace only: the
    # system's own files are never touched.
    inetd_cmd = (f"mount --bind {allow} /etc/hosts.allow && mount --bind {deny} /etc/hosts.deny"
                 f' && exec {SYSTEM_PYTHON} -c "$1"')
    inetd = processes(netns.command(["unshare", "--mount", "--propagation", "private",
                                     "sh", "-c", inetd_cmd, "sh", INETD]))
    server_port = read_port(inetd, "the inetd wrapper")
    client = processes(netns.command(as_nobody() + [SYSTEM_PYTHON, "-c", CLIENT,
                                                    str(server_port)]))
    client_port = read_port(client, "the client")

    reply = read_line(client, STEP_TIMEOUT)
    m = re.fullmatch(rf"STOP-USER=({TOKEN})", reply)
    assert m, f"tcpd sent {reply!r}; inetd stderr: {stderr_of(inetd)}\n{daemon113.read_log()}"
    assert_record_is_the_clients(daemon113, m.group(1), client_port, server_port)
