#!/bin/sh
# The Debian package, end to end (as root, on Debian 12):
#   build stopd_*.deb from a clean clone, lintian (no errors, no warnings),
#   apt-get install it on Debian's own python3-twisted & co, check what it
#   installed, start the daemon exactly as stopd.service would (systemd is
#   not PID 1 here: the unit's ExecStart, as its User, with its capabilities,
#   through setpriv) in a private network namespace, query it on
#   127.0.0.1:113, check the record, run it again with the example plugin
#   (syslog-forward) forwarding to a real rsyslogd, boot a container with
#   systemd as PID 1 to run the unit for real (ci/systemd-test.sh), then
#   purge and check that only what policy keeps is left (the records and
#   the user "stop").
# Re-runnable: an installed stopd is purged first. Every wait is bounded.
set -eu

START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NS="stoppkg$$"
WORK=$(mktemp -d /tmp/stop-package.XXXXXX)
PIDS=""

elapsed() { echo "$(( $(date +%s) - START ))s"; }
step() { echo "== package-test [$(elapsed)]: $*"; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }

cleanup() {
    for pid in $PIDS; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $PIDS; do
        n=0
        while kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "must run as root (installs packages, binds port 113)"
export DEBIAN_FRONTEND=noninteractive

# -- tools ------------------------------------------------------------------
step "tools"
. "$ROOT/dev/lib.sh"   # apt_install (installs only what is missing)
apt_install build-essential dpkg-dev lintian systemd rsyslog man-db util-linux iproute2 git python3
cd "$WORK"

# -- build ------------------------------------------------------------------
step "build from a clean clone of $ROOT"
if [ -d "$ROOT/.git" ] || [ -f "$ROOT/.git" ]; then
    git clone -q "$ROOT" "$WORK/src"
else
    cp -a "$ROOT" "$WORK/src"
fi
timeout 900 apt-get build-dep -y -q "$WORK/src" > "$WORK/build-dep.log" 2>&1 \
    || { cat "$WORK/build-dep.log"; fail "apt-get build-dep"; }
VERSION=$(cd "$WORK/src" && dpkg-parsechangelog -S Version)
(cd "$WORK/src" && timeout 900 dpkg-buildpackage -us -uc -b) > "$WORK/build.log" 2>&1 \
    || { tail -50 "$WORK/build.log"; fail "dpkg-buildpackage"; }
DEB="$WORK/stopd_${VERSION}_all.deb"
[ -f "$DEB" ] || fail "no $DEB"
echo "built $(basename "$DEB") ($(stat -c %s "$DEB") bytes)"

# -- lintian -----------------------------------------------------------------
step "lintian"
# TMPDIR: lintian leaves mldbm-elf-* files in the temp directory; in $WORK
# they go with it.
if ! TMPDIR="$WORK" lintian --fail-on error,warning "$DEB" > "$WORK/lintian.log" 2>&1; then
    cat "$WORK/lintian.log"
    fail "lintian reports errors or warnings"
fi
cat "$WORK/lintian.log"
echo "lintian: no errors, no warnings"

# -- install -----------------------------------------------------------------
if dpkg-query -W -f='${Status}' stopd 2>/dev/null | grep -q "installed"; then
    step "purge the stopd already installed (re-run)"
    apt-get purge -y -q stopd > /dev/null
fi
step "apt-get install $(basename "$DEB")"
timeout 900 apt-get install -y -q --no-install-recommends "$DEB" 2>&1 | grep -v "Reading database" | tail -12
dpkg-query -W -f='${Status}\n' stopd | grep -q "install ok installed" || fail "stopd not installed"

step "check the installed files"
SITE=/usr/lib/python3/dist-packages
getent passwd stop > /dev/null || fail "no user stop"
[ "$(stat -c '%a %U %G' /var/lib/stop)" = "700 stop stop" ] \
    || fail "/var/lib/stop is $(stat -c '%a %U %G' /var/lib/stop)"
dpkg-query -W -f='${Conffiles}\n' stopd | grep -q "/etc/stop/stop.conf" \
    || fail "/etc/stop/stop.conf is not a conffile"
[ -f "$SITE/twisted/plugins/stop_plugin.py" ] || fail "no twisted dropin"
if dpkg -L stopd | grep -E "dropin\.cache|twisted/__init__\.py|twisted/plugins/__init__\.py"; then
    fail "the package ships a plugin cache or a twisted __init__"
fi
# The twisted-plugins-cache trigger had python3-twisted rebuild its cache.
grep -aq stop_plugin "$SITE/twisted/plugins/dropin.cache" || fail "dropin.cache lacks stop_plugin"
for page in stop.8 stopctl.8 stop.conf.5 stop-plugins.7; do
    name=${page%.*}
    section=${page##*.}
    out=$(MANWIDTH=80 man --warnings "$section" "$name" 2>&1 >/dev/null) || fail "man $section $name"
    [ -z "$out" ] || fail "man $section $name: $out"
done
echo "user, state directory, conffile, dropin, trigger, man pages: ok"

UNIT=/lib/systemd/system/stopd.service
if command -v systemd-analyze > /dev/null; then
    step "systemd-analyze"
    systemd-analyze verify "$UNIT" || fail "systemd-analyze verify $UNIT"
    systemd-analyze security --offline=true "$UNIT" 2>&1 | grep -i "overall exposure" || true
fi

# -- run it as the unit would ----------------------------------------------
# The unit's own lines, turned into a setpriv command line.
unit_value() { sed -n "s/^$1=//p" "$UNIT" | tail -1; }
EXEC=$(unit_value ExecStart)
USER_=$(unit_value User)
GROUP_=$(unit_value Group)
CAPS=$(unit_value AmbientCapabilities | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')
[ "$(unit_value CapabilityBoundingSet | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')" = "$CAPS" ] \
    || fail "the bounding set differs from the ambient capabilities"
[ "$(unit_value UMask)" = 0077 ] || fail "UMask is not 0077"
echo "ExecStart=$EXEC; User=$USER_ Group=$GROUP_; capabilities $CAPS"

ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
chmod 0755 "$WORK"  # the daemon's user reads files made here

# MemoryDenyWriteExecute=yes: systemd refuses W+X mappings with seccomp; the
# kernel's own PR_SET_MDWE (Linux 6.3+, kept across execve) refuses the same,
# so the daemon runs under it here too where the kernel has it.
MDWE=""
if [ "$(unit_value MemoryDenyWriteExecute)" = yes ]; then
    printf '%s\n' \
        'import ctypes, os, sys' \
        '# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1)' \
        'if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:' \
        '    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))' \
        'os.execv(sys.argv[1], sys.argv[1:])' > "$WORK/mdwe-exec.py"
    chmod 0644 "$WORK/mdwe-exec.py"
    if python3 "$WORK/mdwe-exec.py" /bin/true 2>/dev/null; then
        MDWE="/usr/bin/python3 $WORK/mdwe-exec.py"
        echo "MemoryDenyWriteExecute: emulated with PR_SET_MDWE"
    else
        echo "MemoryDenyWriteExecute: this kernel has no PR_SET_MDWE; not emulated"
    fi
fi

# start_daemon EXTRA_ARGS...: start ExecStart (plus the extra arguments) as
# the unit's user with exactly its capabilities; sets DAEMON.
start_daemon() {
    log="$WORK/daemon.$(date +%s%N).log"
    # shellcheck disable=SC2086 # ExecStart is split into words as systemd does
    (umask 0077 && exec ip netns exec "$NS" setpriv --reuid="$USER_" --regid="$GROUP_" \
        --init-groups --no-new-privs --bounding-set="-all,$CAPS" --inh-caps="-all,$CAPS" \
        --ambient-caps="$CAPS" $MDWE $EXEC "$@") > "$log" 2>&1 &
    DAEMON=$!
    PIDS="$PIDS $DAEMON"
    n=0
    until in_ns python3 -c 'import socket; socket.create_connection(("127.0.0.1", 113), 1).close()' 2>/dev/null; do
        n=$((n + 1))
        if [ $n -gt 150 ] || ! kill -0 "$DAEMON" 2>/dev/null; then
            cat "$log"
            fail "the daemon did not listen on 127.0.0.1:113"
        fi
        sleep 0.1
    done
    DAEMON_LOG=$log
}

stop_daemon() {
    kill "$DAEMON"
    n=0
    while kill -0 "$DAEMON" 2>/dev/null; do
        n=$((n + 1))
        [ $n -lt 100 ] || { kill -9 "$DAEMON"; fail "the daemon did not stop on SIGTERM"; }
        sleep 0.1
    done
}

# query: ask the daemon about the connection the query travels on (opened by
# this host as root): prints the reply line.
query() {
    in_ns python3 -c '
import socket
s = socket.create_connection(("127.0.0.1", 113), 5)
s.settimeout(10)
s.sendall(b"%d, 113\r\n" % s.getsockname()[1])
print(s.recv(1024).decode("ascii").strip())'
}

token_of() {
    echo "$1" | sed -n 's/^[0-9]*, 113 : USERID : OTHER : \([0-9a-f]\{40\}\)$/\1/p'
}

step "start the daemon as the unit would (user $USER_, capabilities only)"
start_daemon
ps -o user=,pid=,args= -p "$DAEMON" | cut -c1-150
grep -E "^CapAmb|^CapBnd|^NoNewPrivs" "/proc/$DAEMON/status"
REPLY=$(query)
echo "reply: $REPLY"
TOKEN=$(token_of "$REPLY")
[ -n "$TOKEN" ] || { cat "$DAEMON_LOG"; fail "no token in the reply"; }
# SIGHUP (the unit's ExecReload): the daemon survives, logs the reload, answers.
kill -HUP "$DAEMON"
n=0
until grep -q "SIGHUP: settings reloaded" "$DAEMON_LOG"; do
    n=$((n + 1))
    [ $n -lt 100 ] && kill -0 "$DAEMON" 2>/dev/null || { cat "$DAEMON_LOG"; fail "no reload on SIGHUP"; }
    sleep 0.1
done
[ -n "$(token_of "$(query)")" ] || { cat "$DAEMON_LOG"; fail "no token after SIGHUP"; }
grep "SIGHUP:" "$DAEMON_LOG" | cut -c1-120
stop_daemon
grep -q "\[stop.tap#info\] stop .* started (pid $DAEMON): listening on \[::\]:113; store flat in /var/lib/stop" \
    "$DAEMON_LOG" || { cat "$DAEMON_LOG"; fail "no start-up line"; }

step "a start failure: one line on stderr, exit status 2"
# shellcheck disable=SC2086 # ExecStart is split into words as systemd does
set +e
ERR=$(ip netns exec "$NS" setpriv --reuid="$USER_" --regid="$GROUP_" --init-groups \
    --no-new-privs $EXEC --errors loud 2>&1 >/dev/null)
RC=$?
set -e
echo "exit $RC: $ERR"
[ "$RC" = 2 ] || fail "a bad setting exited $RC, not 2"
[ "$(echo "$ERR" | wc -l)" = 1 ] && echo "$ERR" | grep -q "^stop: cannot start: command line: errors: 'loud'" \
    || fail "not one clear line on stderr"
step "the record"
stopctl show "$TOKEN" || fail "stopctl show $TOKEN"
stopctl verify "$TOKEN" || fail "stopctl verify $TOKEN"
if [ -n "$(find /var/lib/stop ! -user stop)" ] || [ -n "$(find /var/lib/stop -type f -perm /077)" ] \
        || [ -n "$(find /var/lib/stop -type d -perm /077)" ]; then
    ls -laR /var/lib/stop
    fail "records not all owned by stop with modes 0600/0700"
fi
echo "record saved in /var/lib/stop, owned by stop, 0600/0700"

# -- the example plugin --------------------------------------------------------
step "the example plugin syslog-forward, to a real rsyslogd"
mkdir -m 0755 "$WORK/plugins" "$WORK/rsyslog"
cp /usr/share/stopd/plugins/syslog_forward.py "$WORK/plugins/"
cat > "$WORK/rsyslog/rsyslog.conf" <<EOF
global(workDirectory="$WORK/rsyslog" maxMessageSize="64k")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="$WORK/rsyslog/log.sock" RateLimit.Interval="0")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="$WORK/rsyslog/port")
template(name="t" type="string" string="%programname%|%msgid%|%structured-data%|%msg%\n")
*.* action(type="omfile" file="$WORK/rsyslog/messages" template="t")
EOF
# Not through the in_ns function: a backgrounded function is a subshell,
# and $! must be the PID of rsyslogd itself (ip netns exec execs it).
ip netns exec "$NS" rsyslogd -n -f "$WORK/rsyslog/rsyslog.conf" -i "$WORK/rsyslog/pid" > "$WORK/rsyslog/out" 2>&1 &
RSYSLOGD=$!
PIDS="$PIDS $RSYSLOGD"
n=0
until [ -s "$WORK/rsyslog/port" ] && [ -S "$WORK/rsyslog/log.sock" ]; do
    n=$((n + 1))
    [ $n -lt 150 ] && kill -0 "$RSYSLOGD" 2>/dev/null || { cat "$WORK/rsyslog/out"; fail "rsyslogd did not start"; }
    sleep 0.1
done
cat > "$WORK/plugin.conf" <<EOF
[stop]
listen = tcp:113:interface=127.0.0.1
plugin_dirs = $WORK/plugins
storage = syslog-forward
syslog = yes
syslog_facility = local3
syslog_socket = $WORK/rsyslog/log.sock

[plugin syslog-forward]
collector = tcp:host=127.0.0.1:port=$(cat "$WORK/rsyslog/port")
EOF
chmod 0644 "$WORK/plugin.conf"
start_daemon --config "$WORK/plugin.conf"
REPLY=$(query)
echo "reply: $REPLY"
TOKEN2=$(token_of "$REPLY")
[ -n "$TOKEN2" ] || { cat "$DAEMON_LOG"; fail "no token in the reply (plugin)"; }
n=0
until grep -q "^stopd|record|\[stop@32473 token=\"$TOKEN2\"\]|" "$WORK/rsyslog/messages" 2>/dev/null \
        && grep -q "^stopd|-|-|.*token $TOKEN2" "$WORK/rsyslog/messages"; do
    n=$((n + 1))
    [ $n -lt 150 ] || { cat "$WORK/rsyslog/messages" "$DAEMON_LOG"; fail "rsyslogd did not get the record and the log line"; }
    sleep 0.1
done
stop_daemon
grep "$TOKEN2" "$WORK/rsyslog/messages" | cut -c1-160
stopctl --config "$WORK/plugin.conf" --storage flat show "$TOKEN2" > /dev/null \
    || fail "the plugin store did not keep the record locally"
echo "record forwarded to the collector, logged to syslog, and kept in /var/lib/stop"

# -- under a real systemd --------------------------------------------------------
step "the unit under a real systemd (systemd-nspawn boot of this host, throw-away overlay)"
apt_install systemd-container
timeout 300 "$ROOT/ci/systemd-test.sh"

# -- purge -------------------------------------------------------------------
step "apt-get purge stopd"
apt-get purge -y -q stopd 2>&1 | grep -v "Reading database" | tail -8
! dpkg-query -W -f='${Status}' stopd 2>/dev/null | grep -q "installed" || fail "still installed"
for gone in /etc/stop "$UNIT" "$SITE/stop" "$SITE/twisted/plugins/stop_plugin.py" \
        /usr/bin/stopctl /usr/share/stopd /usr/share/man/man8/stop.8.gz; do
    [ ! -e "$gone" ] || fail "$gone is left after purge"
done
if grep -aq stop_plugin "$SITE/twisted/plugins/dropin.cache" 2>/dev/null; then
    fail "dropin.cache still lists stop_plugin"
fi
stopctl_left=$(find /var/lib/stop -type f | wc -l)
[ "$stopctl_left" -gt 0 ] || fail "purge removed the records (policy: keep them)"
getent passwd stop > /dev/null || fail "purge removed the user that owns the kept records"
echo "left, as policy says: /var/lib/stop ($stopctl_left files of records) and the user stop"

step "passed in $(elapsed)"
