#!/bin/bash
# The systemd unit for real, with systemd 252 as the guest's PID 1:
#   tests/vm/run --systemd tests/vm/systemd.sh
# `systemctl start` brings the device up (Type=notify), a kill -9 of the
# daemon makes systemd restart it and the new daemon recovers the device
# with its data, `systemctl stop` removes the device and leaves the disk
# clean, and the journal holds the daemon's log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN=${UBLK_PLOOP_BIN:-$repo/target/release/ublk-ploop}
SCRATCH=${UBLK_PLOOP_SCRATCH:?run this inside the VM: tests/vm/run --systemd $0}
log() { echo "systemd-e2e: $*"; }
die() { log "FAIL: $*"; journalctl -u ublk-ploop@ct7 --no-pager 2>/dev/null | tail -20; exit 1; }

[ "$(cat /proc/1/comm)" = systemd ] || die "PID 1 is $(cat /proc/1/comm), not systemd (run with tests/vm/run --systemd)"
# The unit as shipped, pointed at the binary under test and at a config
# on the guest's tmpfs (the host root is read-only here).
cp "$repo/systemd/ublk-ploop@.service" /run/systemd/system/
mkdir -p /run/systemd/system/ublk-ploop@.service.d /run/ublk-ploop-test
cat >/run/systemd/system/ublk-ploop@.service.d/test.conf <<CONF
[Unit]
ConditionPathExists=
ConditionPathExists=/run/ublk-ploop-test/%i.toml
[Service]
ExecStart=
ExecStart=$BIN serve --config /run/ublk-ploop-test/%i.toml
CONF
"$BIN" init "$SCRATCH/ct7" --size 256M >/dev/null
printf 'disk = "%s"\nid = 7\n' "$SCRATCH/ct7" >/run/ublk-ploop-test/ct7.toml
systemctl daemon-reload

systemctl start ublk-ploop@ct7
[ -b /dev/ublkb7 ] || die "no /dev/ublkb7 once systemctl start returned"
systemctl is-active -q ublk-ploop@ct7 || die "the unit is not active"
dd if=/dev/urandom of="$SCRATCH/pat" bs=1M count=16 status=none
dd if="$SCRATCH/pat" of=/dev/ublkb7 bs=1M oflag=direct status=none
log "device up; 16 MiB written"

pid=$(systemctl show -p MainPID --value ublk-ploop@ct7)
[ "$pid" -gt 0 ] || die "no main PID"
kill -9 "$pid"
new=0
for _ in $(seq 150); do
	new=$(systemctl show -p MainPID --value ublk-ploop@ct7)
	if [ "$new" != 0 ] && [ "$new" != "$pid" ] && systemctl is-active -q ublk-ploop@ct7; then break; fi
	sleep 0.2
done
[ "$new" != 0 ] && [ "$new" != "$pid" ] || die "systemd did not restart the daemon after kill -9"
restarts=$(systemctl show -p NRestarts --value ublk-ploop@ct7)
[ "$restarts" -ge 1 ] || die "NRestarts is $restarts"
log "killed $pid; systemd restarted it as $new (restarts: $restarts)"
cmp -n 16M "$SCRATCH/pat" /dev/ublkb7 || die "data after the restart"
dd if="$SCRATCH/pat" of=/dev/ublkb7 bs=1M seek=32 count=8 oflag=direct status=none || die "writes after the restart"

systemctl stop ublk-ploop@ct7
for _ in $(seq 50); do [ -e /dev/ublkb7 ] || break; sleep 0.1; done
[ ! -e /dev/ublkb7 ] || die "the device is still there after systemctl stop"
"$BIN" check "$SCRATCH/ct7" >/dev/null || die "the disk is not clean after systemctl stop"

journal=$(journalctl -u ublk-ploop@ct7 --no-pager -o cat)
grep -q "device is live" <<<"$journal" || die "the journal lacks the daemon's log"
grep -qi "recover" <<<"$journal" || die "the journal does not show the recovery"
log "journal: $(grep -c . <<<"$journal") lines from the daemon, recovery included"
log "PASS"
