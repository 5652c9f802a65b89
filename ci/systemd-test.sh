#!/bin/sh
# Run the installed stopd.service under a real systemd (PID 1 of a
# systemd-nspawn container booted from this host's own / with a throw-away
# overlay and no network but its loopback), so that every hardening line of
# the unit (SystemCallFilter, MemoryDenyWriteExecute, ProtectHome, the
# capability sets...) is in force, and check that:
#   - the daemon answers on 127.0.0.1:113, saves its record, logs to the
#     journal;
#   - the ~/.ident opt-in works with ProtectHome=read-only and a 0700 home;
#   - systemctl reload (ExecReload: SIGHUP) keeps the process and applies the
#     new settings; a bad configuration exits 2 and is not restarted; a store
#     that cannot be opened exits 1 and is restarted until it opens;
#   - a service with the unit's [Service] lines and only its capabilities can
#     read another user's /proc/PID/fd targets (what the SV walk needs), and
#     cannot without CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH.
# Manual (not in .ci/run): it needs systemd-container, which pulls a newer
# systemd; run as root with stopd installed (apt-get install ./stopd_*.deb).
set -eu

[ "$(id -u)" = 0 ] || { echo "systemd-test: run as root" >&2; exit 1; }
[ -f /lib/systemd/system/stopd.service ] || { echo "systemd-test: install stopd first" >&2; exit 1; }
command -v systemd-nspawn > /dev/null || { echo "systemd-test: apt-get install systemd-container" >&2; exit 1; }

START=$(date +%s)
T=$(mktemp -d /tmp/stop-systemd.XXXXXX)
NSPAWN=""
cleanup() {
    [ -z "$NSPAWN" ] || kill "$NSPAWN" 2>/dev/null || true
    [ -n "$KEEP" ] && echo "kept $T" || rm -rf "$T"
}
trap cleanup EXIT
KEEP=${KEEP:-}
mkdir -p "$T/units" "$T/out"
chmod 0755 "$T" "$T/units"
chmod 0777 "$T/out"

# The probe: the unit's own [Service] hardening, another ExecStart.
probe_unit() {  # $1: name, $2: capabilities (AmbientCapabilities= value)
    sed -n '/^\[Service\]/,/^\[Install\]/p' /lib/systemd/system/stopd.service \
        | grep -v -e '^\[Install\]' -e '^ExecStart=' -e '^Restart' -e '^Type=' \
              -e '^AmbientCapabilities=' -e '^CapabilityBoundingSet=' > "$T/units/$1.body"
    {
        printf '[Unit]\nDescription=stopd hardening probe %s\n' "$1"
        cat "$T/units/$1.body"
        printf 'Type=oneshot\nAmbientCapabilities=%s\nCapabilityBoundingSet=%s\n' "$2" "$2"
        printf 'ExecStart=/usr/bin/python3 /stoptest/probe.py %s\n' "$1"
        printf 'StandardOutput=append:/stoptest-out/result.txt\n'
    } > "$T/units/$1.service"
    rm "$T/units/$1.body"
}
probe_unit stop-probe-all "CAP_NET_BIND_SERVICE CAP_DAC_READ_SEARCH CAP_SYS_PTRACE"
probe_unit stop-probe-bind "CAP_NET_BIND_SERVICE"

cat > "$T/units/probe.py" <<'EOF'
import os, sys, psutil
target = int(open("/run/stoptest-target.pid").read())
try:
    fds = [os.readlink(f"/proc/{target}/fd/{n}") for n in os.listdir(f"/proc/{target}/fd")]
    print(sys.argv[1], "read another user's fds:", any(f.startswith("socket:") for f in fds))
    print(sys.argv[1], "psutil connections:", len(psutil.Process(target).connections()),
          "cwd:", psutil.Process(target).cwd())
except OSError as e:
    print(sys.argv[1], "cannot read another user's fds:", e)
EOF

cat > "$T/units/ask.py" <<'EOF'
# Ask stopd about the connection this query travels on; argv[1]: request
# type suffix (e.g. " : SV"). Prints the reply line.
import socket, sys
kind = sys.argv[1] if len(sys.argv) > 1 else ""
s = socket.create_connection(("127.0.0.1", 113), 5)
s.settimeout(30)
s.sendall(b"%d, 113%s\r\n" % (s.getsockname()[1], kind.encode()))
print(s.recv(1024).decode().strip())
EOF

cat > "$T/units/line.py" <<'EOF'
# Send one request line (argv[1]) to stopd; print the reply line.
import socket, sys
s = socket.create_connection(("127.0.0.1", 113), 5)
s.settimeout(30)
s.sendall(sys.argv[1].encode() + b"\r\n")
print(s.recv(1024).decode().strip())
EOF

cat > "$T/units/test.sh" <<'EOF'
#!/bin/sh
# Inside the container, as root, once stopd.service runs.
exec >> /stoptest-out/result.txt 2>&1
echo "== inside: systemd $(systemctl --version | head -1)"
useradd -m -s /bin/sh stoptestuser
chmod 0700 /home/stoptestuser
printf '127.0.0.1\n' > /home/stoptestuser/.ident
chown stoptestuser: /home/stoptestuser/.ident
chmod 0600 /home/stoptestuser/.ident
# A process of another user holding a socket, for the probes.
setpriv --reuid=nobody --regid=nogroup --clear-groups python3 -c \
    'import socket, time; s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); time.sleep(120)' &
echo $! > /run/stoptest-target.pid
n=0
until python3 -c 'import socket; socket.create_connection(("127.0.0.1", 113), 1).close()' 2>/dev/null; do
    n=$((n + 1)); [ $n -lt 100 ] || break; sleep 0.1
done
systemctl show stopd -p ActiveState -p SubState -p MainPID -p ExecMainStatus
pid=$(systemctl show stopd -p MainPID --value)
grep -E '^(Uid|CapAmb|CapBnd|NoNewPrivs|Seccomp):' /proc/$pid/status
AS_USER="setpriv --reuid=stoptestuser --regid=stoptestuser --clear-groups"
echo "root asks:  $(python3 /stoptest/ask.py)"
echo "user asks:  $($AS_USER python3 /stoptest/ask.py)"
# SV about another user's pipeline: the walk must read that user's fds.
reply=$($AS_USER sh -c 'python3 /stoptest/ask.py " : SV" | cat')
echo "user SV:    $reply"
token=${reply##* : }
stopctl show --json "$token" > /stoptest-out/sv.json
verified=$(stopctl verify "$token"); status=$?
echo "verify SV:  $(echo "$verified" | tr '\n' ' ')(exit $status)"
ls -la /var/lib/stop | head -5
systemctl start stop-probe-all.service stop-probe-bind.service
journalctl -u stopd --no-pager -o cat | tail -8
# wait_for STATE: until stopd's ActiveState is STATE (at most 20 s).
wait_for() {
    n=0
    until [ "$(systemctl show stopd -p ActiveState --value)" = "$1" ]; do
        n=$((n + 1)); [ $n -lt 200 ] || break; sleep 0.1
    done
}
# Reload (ExecReload: SIGHUP): same process, the new errors policy in force.
pid=$(systemctl show stopd -p MainPID --value)
sed -i 's/^errors = normal$/errors = unknown/' /etc/stop/stop.conf
systemctl reload stopd; echo "reload:     exit $?"
n=0
until journalctl -u stopd -o cat | grep -q "SIGHUP: settings reloaded"; do
    n=$((n + 1)); [ $n -lt 100 ] || break; sleep 0.1
done
[ "$(systemctl show stopd -p MainPID --value)" = "$pid" ] && same=same || same=changed
echo "reloaded:   $(systemctl show stopd -p ActiveState --value), pid $same"
echo "reload log: $(journalctl -u stopd -o cat | grep 'SIGHUP:' | tail -1)"
echo "after reload: $(python3 /stoptest/line.py '1, 1')"
journalctl -u stopd -o cat | grep "started (pid" | tail -1
# A bad configuration: exit 2, one line, and no restart.
cp /etc/stop/stop.conf /run/stop.conf.good
echo "no_such_setting = 1" >> /etc/stop/stop.conf
systemctl restart stopd
wait_for failed
echo "bad config: $(systemctl show stopd -p ActiveState --value) status $(systemctl show stopd -p ExecMainStatus --value) restarts $(systemctl show stopd -p NRestarts --value)"
echo "bad config log: $(journalctl -u stopd -o cat | grep 'cannot start' | tail -1)"
cp /run/stop.conf.good /etc/stop/stop.conf
# A store that cannot be opened: exit 1, restarted (Restart=on-failure) until it opens.
mv /var/lib/stop/records /var/lib/stop/records.away
touch /var/lib/stop/records
systemctl reset-failed stopd
systemctl start stopd
n=0
until [ "$(systemctl show stopd -p NRestarts --value)" -ge 1 ]; do
    n=$((n + 1)); [ $n -lt 200 ] || break; sleep 0.1
done
echo "store log: $(journalctl -u stopd -o cat | grep 'cannot start' | tail -1)"
echo "store failure: $(journalctl -u stopd -o cat | grep 'Main process exited' | tail -1), restarts $(systemctl show stopd -p NRestarts --value)"
rm /var/lib/stop/records
mv /var/lib/stop/records.away /var/lib/stop/records
wait_for active
sleep 1
echo "store back: $(systemctl show stopd -p ActiveState --value), $(python3 /stoptest/ask.py)"
echo "== done"
systemctl poweroff --no-block
EOF
chmod 0755 "$T/units/test.sh" "$T/units"/*.py
chmod 0644 "$T/units"/*.service
cat > "$T/units/stop-test.service" <<'EOF'
[Unit]
Description=stopd test driver
After=stopd.service
Wants=stopd.service
[Service]
Type=oneshot
ExecStart=/stoptest/test.sh
EOF

echo "== systemd-test: booting a container from / (overlay, private network)"
binds=""
for u in stop-test stop-probe-all stop-probe-bind; do
    binds="$binds --bind-ro=$T/units/$u.service:/etc/systemd/system/$u.service"
done
# shellcheck disable=SC2086
timeout 180 systemd-nspawn --quiet --directory=/ --volatile=yes --overlay=/etc::/etc --private-network \
    --link-journal=no --register=no --keep-unit \
    --machine="stoptest$$" --bind-ro="$T/units:/stoptest" --bind="$T/out:/stoptest-out" \
    $binds --boot systemd.wants=stop-test.service systemd.mask=oidentd.service \
    systemd.mask=oidentd.socket > "$T/console.log" 2>&1 &
NSPAWN=$!
wait "$NSPAWN" || echo "systemd-nspawn exited with $?"
NSPAWN=""
if [ ! -s "$T/out/result.txt" ]; then
    cp "$T/console.log" /tmp/stop-systemd-console.log
    echo "console: /tmp/stop-systemd-console.log"
    echo "systemd-test: FAILED: no result from inside the container" >&2
    exit 1
fi
cat "$T/out/result.txt"
grep -q "^root asks:  [0-9]*, 113 : USERID : OTHER : [0-9a-f]\{40\}$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: no token for root" >&2; exit 1; }
TOKEN=$(sed -n 's/^root asks:  [0-9]*, 113 : USERID : OTHER : \([0-9a-f]*\)$/\1/p' "$T/out/result.txt")
grep -q "\[stop.answer#info\] .* token $TOKEN\$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: the query is not in the journal" >&2; exit 1; }
grep -q "^user asks:  [0-9]*, 113 : USERID : UNIX : stoptestuser$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: ~/.ident opt-in under ProtectHome" >&2; exit 1; }
grep -q "^user SV:    [0-9]*, 113 : USERID : OTHER : [0-9a-f]\{40\}$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: no SV token" >&2; exit 1; }
grep -q "^verify SV:  store integrity: OK OK (exit 0)" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: stopctl verify of the SV record" >&2; exit 1; }
python3 - "$T/out/sv.json" <<'EOF' || { echo "systemd-test: FAILED: the SV walk did not reach the user's pipeline" >&2; exit 1; }
import json, sys
record = json.load(open(sys.argv[1]))
record = record.get("record", record)  # show --json: {"token", "record", "linked"}
text = json.dumps(record)
names = sorted({p.get("name") for p in record["processes"]["processes"]})
print("SV walk reached:", names, "| EACCES in record:", "EACCES" in text)
assert "cat" in names and "python3" in names and "EACCES" not in text
EOF
grep -q "^reload:     exit 0$" "$T/out/result.txt" && grep -q "^reloaded:   active, pid same$" "$T/out/result.txt" \
    && grep -q "^reload log: .*SIGHUP: settings reloaded: errors = unknown$" "$T/out/result.txt" \
    && grep -q "^after reload: 1, 1 : ERROR : UNKNOWN-ERROR$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: systemctl reload (ExecReload, SIGHUP)" >&2; exit 1; }
grep -q "^bad config: failed status 2 restarts 0$" "$T/out/result.txt" \
    && grep -q "^bad config log: .*cannot start: /etc/stop/stop.conf: unknown setting 'no_such_setting'$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: a bad configuration must exit 2, once" >&2; exit 1; }
grep -q "^store failure: .*code=exited, status=1/FAILURE, restarts [1-9]" "$T/out/result.txt" \
    && grep -q "^store log: .*cannot start: cannot open the record store (storage = flat, data_dir = /var/lib/stop)" "$T/out/result.txt" \
    && grep -q "^store back: active, [0-9]*, 113 : USERID : OTHER : [0-9a-f]\{40\}$" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: a store failure must exit 1 and be restarted" >&2; exit 1; }
grep -q "^stop-probe-all read another user's fds: True" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: the unit's capabilities do not reach other users' fds" >&2; exit 1; }
grep -q "^stop-probe-bind cannot read another user's fds" "$T/out/result.txt" \
    || { echo "systemd-test: FAILED: fds readable without the two capabilities?" >&2; exit 1; }
echo "== systemd-test: passed in $(( $(date +%s) - START ))s"
