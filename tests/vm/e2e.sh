#!/bin/bash
# End-to-end scenarios for ublk-ploop, run inside the test VM (a kernel with
# ublk_drv) by `tests/vm/run tests/vm/e2e.sh [SCENARIO...]`.
#
# Each scenario runs in its own process with `set -e`; the last line is a
# "N passed, N failed" summary and the exit status is non-zero on failure.
# The binary under test: $UBLK_PLOOP_BIN (default target/release/ublk-ploop).

set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN=${UBLK_PLOOP_BIN:-$repo/target/release/ublk-ploop}
SCRATCH=${UBLK_PLOOP_SCRATCH:?run this inside the VM: tests/vm/run tests/vm/e2e.sh}
ALL="data_path basic_fs fio_verify stack_layers control_socket kill_recover kill_recover_links read_only serve_config snapshots merge_kill merge_steps track_copy mounts_frozen full_disk io_errors resize compact clones qcow2_base old_cli"

log() { echo "e2e[${SCENARIO:-main}]: $*"; }
# Why each failed scenario failed, said again after the summary: CI shows
# only the end of the guest's console.
WHY=${E2E_WHY:-/tmp/e2e-why.$$}
export E2E_WHY=$WHY
die() { log "FAIL: $*"; echo "${SCENARIO:-main}: $*" | cut -c1-600 >>"$WHY"; exit 1; }

# shellcheck source=tests/vm/lib.sh
. "$here/lib.sh"

qemu_check() { qemu-img check -f parallels "$1" >/tmp/qcheck.out 2>&1 || { cat /tmp/qcheck.out; die "qemu-img check $1"; }; }

# Write files of random data on a mounted filesystem; record checksums.
write_files() { # dir count size_mb
	for i in $(seq "$2"); do
		head -c "$(($3 << 20))" /dev/urandom >"$1/file$i"
	done
	(cd "$1" && sha256sum file* >"$SCRATCH/sums.$SCENARIO")
}
verify_files() { (cd "$1" && sha256sum -c --quiet "$SCRATCH/sums.$SCENARIO") || die "checksums differ in $1"; }

# The data path the kernel allows: zero copy (auto buffer registration)
# where the driver has it, copy mode otherwise or on request. Both serve the
# same bytes from a 2-layer stack with holes; zero copy keeps no request
# buffers in the daemon.
scenario_data_path() {
	local base=$SCRATCH/dp-base.hdd top=$SCRATCH/dp-top.hdd want dev id path mode sum rss features status
	# Output is captured before it is searched: under pipefail, `grep -q`
	# leaving early fails the writer with EPIPE, and the step with it.
	features=$("$BIN" features --json | tr -d ' \n')
	want=copy
	[[ $features == *'"auto_buf_reg"'* ]] && want=zero_copy
	[[ $features == *"\"data_path\":\"$want\""* ]] || die "features does not say $want: $("$BIN" features)"
	[ "$want" = zero_copy ] || log "SKIP zero copy: this kernel's ublk has no auto_buf_reg; checking copy mode only"
	"$BIN" create "$base" --size 256M >/dev/null
	dev=$("$BIN" add --image "$base"); wait_dev "$dev"
	# One queue: the kernel would give it mq-deadline; the daemon sets none.
	grep -q '\[none\]' "/sys/block/$(basename "$dev")/queue/scheduler" ||
		die "scheduler of a 1-queue device: $(cat "/sys/block/$(basename "$dev")/queue/scheduler")"
	status=$("$BIN" status -n "$(dev_id "$dev")")
	[[ $status == *"I/O scheduler: none"* ]] || die "status does not show the scheduler: $status"
	# Data in the base, holes between, more data and a partial overwrite above.
	for i in 0 3 7 12 100 255; do dd if=/dev/urandom of="$dev" bs=1M seek="$i" count=1 oflag=direct status=none; done
	"$BIN" del -n "$(dev_id "$dev")"
	"$BIN" create "$top" --size 256M >/dev/null
	dd if=/dev/urandom of="$SCRATCH/dp.piece" bs=64k count=1 status=none
	for mode in "" --copy-mode; do
		dev=$("$BIN" add --image "$base" --image "$top" $mode --queues 2); wait_dev "$dev"; id=$(dev_id "$dev")
		path=$("$BIN" status -n "$id" --json | tr -d ' \n' | sed -n 's/.*"data_path":"\([a-z_]*\)".*/\1/p')
		if [ -z "$mode" ]; then [ "$path" = "$want" ] || die "status says $path, the kernel offers $want"
		else [ "$path" = copy ] || die "--copy-mode device runs $path"; fi
		# Writes through this data path: a partial cluster over lower data
		# (copy-up) and a fresh cluster; then the whole device read back.
		dd if="$SCRATCH/dp.piece" of="$dev" bs=64k seek=$((3 * 16 + 5)) count=1 oflag=direct conv=notrunc status=none
		dd if="$SCRATCH/dp.piece" of="$dev" bs=64k seek=$((50 * 16)) count=1 oflag=direct conv=notrunc status=none
		dd if="$dev" of="$SCRATCH/dp.read" bs=64k skip=$((3 * 16 + 5)) count=1 iflag=direct status=none
		cmp "$SCRATCH/dp.read" "$SCRATCH/dp.piece" || die "$path: the write over lower data reads back wrong"
		dd if="$dev" of="$SCRATCH/dp.read" bs=1M skip=20 count=8 iflag=direct status=none
		cmp -n 8M "$SCRATCH/dp.read" /dev/zero || die "$path: a hole does not read as zeros"
		dd if="$dev" of=/dev/null bs=1M iflag=direct status=none
		rss=$(awk '/VmRSS/ {print $2}' "/proc/$(daemon_pid "$id")/status")
		sum=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -c1-16)
		log "$path: whole device sha256 $sum, daemon RSS ${rss} KiB after reading it with 1 MiB requests"
		eval "sum_${path}=$sum rss_${path}=$rss"
		"$BIN" del -n "$id"
		# Undo the writes for the other mode: same bytes expected.
		rm -f "$top"; "$BIN" create "$top" --size 256M >/dev/null
	done
	if [ "$want" = zero_copy ]; then
		[ "$sum_zero_copy" = "$sum_copy" ] || die "zero copy and copy mode read different bytes"
		log "same bytes both ways; daemon RSS ${rss_zero_copy} KiB zero copy vs ${rss_copy} KiB copy mode"
	fi
	"$BIN" check "$base" >/dev/null || die "check after the data path runs"
	rm -f "$SCRATCH"/dp.*
}

scenario_basic_fs() {
	local img=$SCRATCH/basic.hdd mnt=/mnt/basic
	"$BIN" create "$img" --size 1G
	dev=$("$BIN" add --image "$img")
	log "serving $img as $dev"
	wait_dev "$dev"
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$mnt"
	mount "$dev" "$mnt"
	write_files "$mnt" 6 40
	"$BIN" del -n "$(dev_id "$dev")" 2>"$SCRATCH/del.err" && die "del of a mounted device succeeded"
	grep -q "is mounted" "$SCRATCH/del.err" || die "del refusal: $(cat "$SCRATCH/del.err")"
	"$BIN" add --image "$img" 2>"$SCRATCH/add.err" && die "a second daemon opened the image"
	grep -q "in use" "$SCRATCH/add.err" || die "second add: $(cat "$SCRATCH/add.err")"
	umount "$mnt"
	"$BIN" del -n "$(dev_id "$dev")"
	[ ! -e "$dev" ] || die "$dev still exists after del"
	"$BIN" check "$img"
	qemu_check "$img"
	dev=$("$BIN" add --image "$img")
	wait_dev "$dev"
	mount "$dev" "$mnt"
	verify_files "$mnt"
	umount "$mnt"
	"$BIN" del -n "$(dev_id "$dev")"
	"$BIN" check "$img"
	qemu_check "$img"
	log "240 MiB of files survived del/add; image clean"
}

scenario_fio_verify() {
	local img=$SCRATCH/fio.hdd
	"$BIN" create "$img" --size 256M --cluster-size 64K
	dev=$("$BIN" add --image "$img" --queues 2 --depth 64)
	wait_dev "$dev"
	fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
		--iodepth=32 --size=96M --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=0 --verify_state_save=0 \
		--output="$SCRATCH/fio.out" || { cat "$SCRATCH/fio.out"; die "fio verify"; }
	grep -E "IOPS|err=" "$SCRATCH/fio.out" | head -3
	"$BIN" del -n "$(dev_id "$dev")"
	"$BIN" check "$img"
	qemu_check "$img"
}

scenario_stack_layers() {
	local base=$SCRATCH/base.hdd mid=$SCRATCH/mid.hdd top=$SCRATCH/top.hdd
	"$BIN" create "$base" --size 128M
	"$BIN" create "$mid" --size 128M
	"$BIN" create "$top" --size 128M
	# Lower layers get distinct data through their own devices first.
	dev=$("$BIN" add --image "$base"); wait_dev "$dev"
	dd if=/dev/urandom of="$SCRATCH/pat.base" bs=1M count=16 status=none
	dd if="$SCRATCH/pat.base" of="$dev" bs=1M oflag=direct status=none
	"$BIN" del -n "$(dev_id "$dev")"
	dev=$("$BIN" add --image "$mid"); wait_dev "$dev"
	dd if=/dev/urandom of="$SCRATCH/pat.mid" bs=1M count=8 status=none
	dd if="$SCRATCH/pat.mid" of="$dev" bs=1M seek=8 oflag=direct status=none
	"$BIN" del -n "$(dev_id "$dev")"
	sum_base=$(sha256sum <"$base"); sum_mid=$(sha256sum <"$mid")
	dev=$("$BIN" add --image "$base" --image "$mid" --image "$top"); wait_dev "$dev"
	# Reads: the mid layer wins over the base where both hold data.
	dd if="$dev" of="$SCRATCH/read.all" bs=1M count=24 iflag=direct status=none
	cmp -n 8M "$SCRATCH/pat.base" "$SCRATCH/read.all" || die "base data"
	cmp -n 8M "$SCRATCH/pat.mid" "$SCRATCH/read.all" 0 8M || die "mid data"
	cmp -n 8M /dev/zero "$SCRATCH/read.all" 0 16M || die "unwritten range not zero"
	# Writes go to the top only; sub-cluster writes copy the rest up.
	dd if=/dev/urandom of="$SCRATCH/pat.top" bs=4k count=3 status=none
	dd if="$SCRATCH/pat.top" of="$dev" bs=4k seek=1000 oflag=direct status=none
	dd if="$dev" of="$SCRATCH/read.top" bs=4k skip=1000 count=3 iflag=direct status=none
	cmp "$SCRATCH/pat.top" "$SCRATCH/read.top" || die "top data"
	# The rest of that cluster still reads the mid/base data beneath it.
	dd if="$dev" of="$SCRATCH/read.all" bs=1M count=24 iflag=direct status=none
	cmp -n 4096000 "$SCRATCH/pat.base" "$SCRATCH/read.all" || die "data before the write"
	cmp -n 4096000 "$SCRATCH/pat.base" "$SCRATCH/read.all" 4108288 4108288 || die "data after the write"
	"$BIN" status -n "$(dev_id "$dev")"
	"$BIN" del -n "$(dev_id "$dev")"
	[ "$(sha256sum <"$base")" = "$sum_base" ] || die "base layer changed"
	[ "$(sha256sum <"$mid")" = "$sum_mid" ] || die "mid layer changed"
	for f in "$base" "$mid" "$top"; do "$BIN" check "$f"; qemu_check "$f"; done
	grep -q '"allocated_clusters": 1' <<<"$("$BIN" info --json "$top")" || die "top should hold exactly one cluster"
}

scenario_control_socket() {
	local img=$SCRATCH/ctl.hdd
	"$BIN" create "$img" --size 64M
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"
	id=$(dev_id "$dev")
	sock=/run/ublk-ploop/$id.sock
	[ "$(stat -c %a "$sock")" = 600 ] || die "socket mode $(stat -c %a "$sock")"
	python3 - "$sock" <<'PY' || die "hostile requests"
import json, os, socket, sys
path = sys.argv[1]
def talk(payload):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.sendall(payload); s.shutdown(socket.SHUT_WR)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with our input unread (an oversized line), after its reply
    return [json.loads(l) for l in data.decode().splitlines()]
r = talk(b'not json\n{"cmd":"frobnicate"}\n{"version":99,"cmd":"status"}\n{"version":1,"cmd":"status"}\n')
assert [x["ok"] for x in r] == [False, False, False, True], r
assert "malformed" in r[0]["error"] and "unknown variant `frobnicate`" in r[1]["error"] and "`resize`" in r[1]["error"], r
assert r[3]["result"]["size"] == 64 << 20, r
r = talk(b"x" * 8192)
assert len(r) == 1 and "too large" in r[0]["error"], r
print("hostile requests refused; daemon still answering")
PY
	# A peer that is neither root nor the daemon's user is refused by its
	# credentials even when the socket file itself lets it connect.
	chmod 666 "$sock"
	out=$(setpriv --reuid=65534 --regid=65534 --clear-groups "$BIN" status -n "$id" 2>&1) && die "non-root peer was served: $out"
	grep -q "permission denied" <<<"$out" || die "unexpected refusal: $out"
	# Still serving I/O.
	dd if=/dev/urandom of="$dev" bs=64k count=16 oflag=direct status=none
	grep -q '"writes"' <<<"$("$BIN" status -n "$id" --json)" || die "status after hostile input"
	"$BIN" del -n "$id"
	"$BIN" check "$img"
}

scenario_kill_recover() {
	local img=$SCRATCH/kill.hdd
	"$BIN" create "$img" --size 256M
	dev=$("$BIN" add --image "$img" --queues 2 --depth 32); wait_dev "$dev"
	id=$(dev_id "$dev")
	"$BIN" features
	# Writes into fresh clusters and overwrites, with checksummed blocks.
	fio --name=kill --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k \
		--iodepth=16 --size=128M --verify=crc32c --do_verify=0 --randrepeat=1 --randseed=42 --verify_state_save=0 \
		--output="$SCRATCH/fio-kill.out" &
	fio_pid=$!
	sleep 4
	pid=$(daemon_pid "$id")
	[ -n "$pid" ] || die "no daemon pid"
	log "killing daemon $pid while fio writes"
	kill -9 "$pid"
	sleep 1
	kill -0 "$fio_pid" 2>/dev/null || log "(fio finished before the kill took effect)"
	"$BIN" list
	"$BIN" recover -n "$id"
	wait "$fio_pid" || { cat "$SCRATCH/fio-kill.out"; die "fio write phase failed across recovery"; }
	kill_verify() {
		fio --name=kill --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k \
			--iodepth=16 --size=128M --verify=crc32c --verify_only=1 --verify_fatal=1 --randrepeat=1 --randseed=42 --verify_state_save=0 \
			--output="$SCRATCH/fio-verify.out" || { cat "$SCRATCH/fio-verify.out"; die "fio verify after recovery ($1)"; }
	}
	kill_verify "after a pause"
	grep -E "err=|verify" "$SCRATCH/fio-verify.out" | head -3 || true
	# Again with no pause: recover waits for the dying daemon (exiting, or
	# a zombie not yet reaped) instead of calling the device live.
	pid=$(daemon_pid "$id")
	[ -n "$pid" ] || die "no daemon pid after recovery"
	kill -9 "$pid"
	"$BIN" recover -n "$id" || die "recover right after kill -9 refused"
	kill_verify "at once"
	"$BIN" del -n "$id"
	"$BIN" check "$img"
	qemu_check "$img"
}

# --link-log: a first write into a snapshot's cluster is acknowledged
# before its copy is synced, the link kept in a log on tmpfs until a flush.
# A kill -9 while fio writes into fresh clusters of a top over a full base
# (every write copies a cluster up, and fio never flushes): the recovered
# daemon links the copies again from the log, and every block verifies.
scenario_kill_recover_links() {
	local base=$SCRATCH/links-base.hdd top=$SCRATCH/links-top.hdd links=/run/ublk-ploop/links
	"$BIN" create "$base" --size 256M
	dev=$("$BIN" add --image "$base"); wait_dev "$dev"
	dd if=/dev/urandom of="$dev" bs=1M count=256 oflag=direct status=none
	"$BIN" del -n "$(dev_id "$dev")"
	"$BIN" create "$top" --size 256M
	dev=$("$BIN" add --image "$base" --image "$top" --queues 2 --depth 32 --link-log); wait_dev "$dev"
	id=$(dev_id "$dev")
	# Paced, so that the kill lands while writes are in flight and after
	# some were acknowledged.
	fio --name=links --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k \
		--iodepth=16 --size=64M --rate_iops=1000 --verify=crc32c --do_verify=0 --randrepeat=1 --randseed=7 --verify_state_save=0 \
		--output="$SCRATCH/fio-links.out" &
	fio_pid=$!
	# fio may take seconds to start under emulation: wait for the first
	# records, then let some writes be acknowledged.
	local records=0 waited=0
	while [ "$records" -eq 0 ] && [ "$waited" -lt 60 ]; do
		sleep 0.5; waited=$((waited + 1))
		records=$(find "$links" -name '*.links' -size +0 | wc -l)
	done
	[ "$records" -eq 1 ] || { ls -la "$links"; die "expected the top's link log with records, found $records"; }
	sleep 1
	pid=$(daemon_pid "$id")
	log "killing daemon $pid while fio copies clusters up"
	kill -9 "$pid"
	sleep 1
	kill -0 "$fio_pid" 2>/dev/null || die "fio finished before the kill: the scenario must kill mid-write"
	"$BIN" recover -n "$id"
	wait "$fio_pid" || { cat "$SCRATCH/fio-links.out"; die "fio write phase failed across recovery"; }
	fio --name=links --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k \
		--iodepth=16 --size=64M --verify=crc32c --verify_only=1 --verify_fatal=1 --randrepeat=1 --randseed=7 --verify_state_save=0 \
		--output="$SCRATCH/fio-links-verify.out" || { cat "$SCRATCH/fio-links-verify.out"; die "fio verify after recovery"; }
	"$BIN" del -n "$id"
	[ -z "$(ls -A "$links")" ] || { ls -la "$links"; die "a link log outlived its device"; }
	"$BIN" check "$top"
	qemu_check "$top"
	# The log's directory made again (a container's /run mounted again)
	# while the daemon is dead: recover refuses, and recovers once the
	# directory it logged in is back.
	dev=$("$BIN" add --image "$base" --image "$top"); wait_dev "$dev"
	id=$(dev_id "$dev")
	dd if=/dev/urandom of="$dev" bs=4k count=64 seek=4096 oflag=direct status=none
	kill -9 "$(daemon_pid "$id")"
	sleep 1
	mv "$links" "$links.kept" && mkdir -m 711 "$links"
	out=$("$BIN" recover -n "$id" 2>&1) && die "recover served on with another link log directory: $out"
	grep -q "not the one it used" <<<"$out" || die "unexpected refusal: $out"
	rmdir "$links" && mv "$links.kept" "$links"
	"$BIN" recover -n "$id"
	"$BIN" del -n "$id"
	"$BIN" check "$top"
}

scenario_read_only() {
	local img=$SCRATCH/ro.hdd
	"$BIN" create "$img" --size 64M
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"
	dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
	"$BIN" del -n "$(dev_id "$dev")"
	sum=$(sha256sum <"$img")
	dev=$("$BIN" add --image "$img" --read-only); wait_dev "$dev"
	[ "$(blockdev --getro "$dev")" = 1 ] || die "device not read-only"
	dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null && die "write to read-only device succeeded"
	dd if="$dev" of=/dev/null bs=1M count=8 iflag=direct status=none
	"$BIN" del -n "$(dev_id "$dev")"
	[ "$(sha256sum <"$img")" = "$sum" ] || die "read-only image changed"
}

# What systemd does with the unit: `serve --config` in the foreground with
# NOTIFY_SOCKET set; a restart after a crash recovers; SIGTERM removes.
scenario_serve_config() {
	local img=$SCRATCH/ct.hdd cfg=$SCRATCH/ct.toml notify=/run/e2e-notify.sock
	"$BIN" init "$img" --size 128M
	"$BIN" create "$SCRATCH/other.hdd" --size 16M >/dev/null
	printf 'disk = "%s"\nid = 7\nqueues = 2\ndepth = 32\nio_scheduler = "no such"\n' "$img" >"$cfg"
	"$BIN" serve --config "$cfg" 2>"$SCRATCH/serve.err" && die "serve took a bad io_scheduler"
	grep -q "io_scheduler" "$SCRATCH/serve.err" || die "bad io_scheduler: $(cat "$SCRATCH/serve.err")"
	printf 'disk = "%s"\nid = 7\nqueues = 2\ndepth = 32\nio_scheduler = "mq-deadline"\n' "$img" >"$cfg"
	start_serve() {
		rm -f "$notify" "$SCRATCH/notify.msg"
		python3 - "$notify" "$SCRATCH/notify.msg" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.settimeout(60)
while True:
    msg = s.recv(4096).decode()
    if "READY=1" in msg:
        open(sys.argv[2], "w").write(msg); break
PY
		listener=$!
		for _ in $(seq 50); do [ -S "$notify" ] && break; sleep 0.1; done
		NOTIFY_SOCKET=$notify "$BIN" serve --config "$cfg" >"$SCRATCH/serve.out" 2>"$SCRATCH/serve.err" &
		serve_pid=$!
		wait "$listener" || die "no READY=1 from serve: $(cat "$SCRATCH/serve.err")"
		grep -q "STATUS=serving /dev/ublkb7" "$SCRATCH/notify.msg" || die "READY message: $(cat "$SCRATCH/notify.msg")"
		wait_dev /dev/ublkb7
		# Named after the config file, as the systemd unit's instance.
		for _ in $(seq 50); do [ -L /dev/ublk-ploop/ct ] && break; sleep 0.1; done
		[ "$(readlink /dev/ublk-ploop/ct)" = /dev/ublkb7 ] || die "/dev/ublk-ploop/ct: $(ls -l /dev/ublk-ploop 2>&1)"
	}
	start_serve
	"$BIN" add --image "$SCRATCH/other.hdd" --name ct 2>"$SCRATCH/name.err" && die "a second device took the name ct"
	grep -q "taken" "$SCRATCH/name.err" || die "name refusal: $(cat "$SCRATCH/name.err")"
	grep -q '\[mq-deadline\]' /sys/block/ublkb7/queue/scheduler || die "io_scheduler from the config not set: $(cat /sys/block/ublkb7/queue/scheduler)"
	dd if=/dev/urandom of="$SCRATCH/pat.ct" bs=1M count=8 status=none
	dd if="$SCRATCH/pat.ct" of=/dev/ublkb7 bs=1M oflag=direct status=none
	# A snapshot the restarted daemon must follow: its writes go to the new top.
	"$BIN" snapshot -n 7 >/dev/null
	dd if=/dev/urandom of="$SCRATCH/pat.ct2" bs=1M count=4 status=none
	dd if="$SCRATCH/pat.ct2" of=/dev/ublkb7 bs=1M seek=2 oflag=direct status=none
	dd if="$SCRATCH/pat.ct2" of="$SCRATCH/pat.ct" bs=1M seek=2 conv=notrunc status=none
	log "crash: kill -9 $serve_pid, then start serve again as systemd's Restart= would"
	kill -9 "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
	start_serve
	grep -qi "recover" "$SCRATCH/serve.err" || die "second serve did not recover: $(cat "$SCRATCH/serve.err")"
	dd if=/dev/ublkb7 of="$SCRATCH/read.ct" bs=1M count=8 iflag=direct status=none
	cmp "$SCRATCH/pat.ct" "$SCRATCH/read.ct" || die "data lost across crash and recovery"
	[ "$("$BIN" status -n 7 --json | grep -c '"path"')" = 2 ] || die "the recovered daemon does not serve the snapshot's chain"
	kill -TERM "$serve_pid"
	wait "$serve_pid" || die "serve exited with $? on SIGTERM"
	[ ! -e /dev/ublkb7 ] || die "device left behind after SIGTERM"
	[ ! -L /dev/ublk-ploop/ct ] || die "/dev/ublk-ploop/ct left behind after SIGTERM"
	check_disk "$img"
}

# Checksums of a set of files, kept apart per set.
sums_of() { (cd "$1" && sha256sum $2) >"$SCRATCH/sums.$3"; }
check_sums() { (cd "$1" && sha256sum -c --quiet "$SCRATCH/sums.$2") || die "set $2 differs in $1"; }
# Every delta of a disk directory is clean, for us and for qemu-img.
check_disk() {
	"$BIN" check "$1" || die "check $1"
	for f in "$1"/root.hds*; do qemu_check "$f"; done
}
# After a kill -9, clusters being allocated at that instant may be leaked
# (never data): check says "leaked space only" (3), and --repair gives the
# space back; anything else is damage.
check_disk_after_kill() {
	local rc=0
	"$BIN" check "$1" || rc=$?
	case $rc in
	0) ;;
	3) log "leaked space after the kill; repairing"
	   "$BIN" check --repair "$1" >/dev/null || die "repair $1"
	   "$BIN" check "$1" || die "check after repair $1" ;;
	*) die "check $1 (exit $rc)" ;;
	esac
	for f in "$1"/root.hds*; do qemu_check "$f"; done
}
# A consistent snapshot of a mounted filesystem: frozen around it.
snapshot_frozen() { # mnt id
	sync; fsfreeze -f "$1"
	"$BIN" snapshot -n "$2" >"$SCRATCH/snap.out" || { fsfreeze -u "$1"; die "snapshot"; }
	fsfreeze -u "$1"
	cat "$SCRATCH/snap.out"
}

# Whether ploop's tool finds a disk locked (in use): it tests for a write
# lock on bytes [200, 205) of the base delta with F_GETLK (lib/lock.c).
ploop_locked() { # base delta
	python3 - "$1" <<'PY'
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 200, 5, 0)
sys.exit(0 if struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK else 1)
PY
}

scenario_snapshots() {
	local d=$SCRATCH/ct1 mnt=/mnt/ct1 smnt=/mnt/ct1snap
	"$BIN" init "$d" --size 512M
	ploop_locked "$d/root.hds" && die "a disk no device serves is locked"
	dev=$("$BIN" add --image "$d"); wait_dev "$dev"; id=$(dev_id "$dev")
	# Served, the disk is locked as ploop locks a disk it mounts, for the
	# device's life; an offline change of it names the device.
	ploop_locked "$d/root.hds" || die "ploop's tool would find the served disk free"
	"$BIN" snapshot "$d" 2>"$SCRATCH/off.err" && die "an offline snapshot of a served disk"
	grep -q "/dev/ublkb$id serves this disk" "$SCRATCH/off.err" || die "offline snapshot refusal: $(cat "$SCRATCH/off.err")"
	mkfs.ext4 -q -F "$dev"; mkdir -p "$mnt" "$smnt"; mount "$dev" "$mnt"
	mkdir "$mnt/A" "$mnt/B"
	for i in 1 2 3; do head -c 4M /dev/urandom >"$mnt/A/a$i"; done
	sums_of "$mnt" "A/*" A
	snap1=$(snapshot_frozen "$mnt" "$id")
	log "snapshot $snap1 holds set A"
	for i in 1 2 3; do head -c 4M /dev/urandom >"$mnt/B/b$i"; done
	sums_of "$mnt" "B/*" B
	"$BIN" snapshot-list -n "$id"
	# The snapshot, read-only, beside the live device: set A only.
	sdev=$("$BIN" add --image "$d" --snapshot "$snap1"); wait_dev "$sdev"
	[ "$(blockdev --getro "$sdev")" = 1 ] || die "snapshot device is writable"
	fsck.ext4 -n "$sdev" >"$SCRATCH/fsck.out" 2>&1 || { cat "$SCRATCH/fsck.out"; die "fsck -n of the snapshot"; }
	mount -o ro,noload "$sdev" "$smnt"
	check_sums "$smnt" A
	[ -z "$(ls "$smnt/B")" ] || die "the snapshot shows set B"
	# A merge that would remove the mounted snapshot's layer is refused.
	snap2=$(snapshot_frozen "$mnt" "$id")
	"$BIN" snapshot-delete -n "$id" --uuid "$snap1" 2>"$SCRATCH/del.err" && die "deleted a snapshot a device serves"
	grep -q "in use" "$SCRATCH/del.err" || die "delete refusal: $(cat "$SCRATCH/del.err")"
	umount "$smnt"; "$BIN" del -n "$(dev_id "$sdev")"
	# Merge the top into its parent while fio writes and verifies.
	fio --name=m --filename="$mnt/fio.dat" --size=48M --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 \
		--verify=crc32c --do_verify=0 --randrepeat=1 --randseed=7 --verify_state_save=0 --output="$SCRATCH/fio-m.out" &
	fio_pid=$!
	sleep 2
	"$BIN" snapshot-merge -n "$id" || die "merge"
	wait "$fio_pid" || { cat "$SCRATCH/fio-m.out"; die "fio during the merge"; }
	fio --name=m --filename="$mnt/fio.dat" --size=48M --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 \
		--verify=crc32c --verify_only=1 --verify_fatal=1 --randrepeat=1 --randseed=7 --verify_state_save=0 \
		--output="$SCRATCH/fio-v.out" || { cat "$SCRATCH/fio-v.out"; die "fio verify after the merge"; }
	check_sums "$mnt" A; check_sums "$mnt" B
	grep -q "$snap2" <<<"$("$BIN" snapshot-list -n "$id" --json)" && die "the merged parent's GUID survived"
	# Switch back to the first snapshot: refused while mounted, then set A only.
	"$BIN" snapshot-switch -n "$id" --uuid "$snap1" 2>"$SCRATCH/sw.err" && die "switched under a mounted filesystem"
	grep -q "mounted" "$SCRATCH/sw.err" || die "switch refusal: $(cat "$SCRATCH/sw.err")"
	umount "$mnt"
	"$BIN" snapshot-switch -n "$id" --uuid "$snap1"
	fsck.ext4 -n "$dev" >"$SCRATCH/fsck.out" 2>&1 || { cat "$SCRATCH/fsck.out"; die "fsck -n after the switch"; }
	mount "$dev" "$mnt"
	check_sums "$mnt" A
	[ -z "$(ls "$mnt/B")" ] || die "set B survived the switch"
	umount "$mnt"
	ploop_locked "$d/root.hds" || die "the lock went with the snapshot commands"
	"$BIN" del -n "$id"
	ploop_locked "$d/root.hds" && die "the lock outlived the device"
	check_disk "$d"
}

scenario_merge_kill() {
	local d=$SCRATCH/ct2
	# Small clusters: many of them to copy, so the kill lands mid-merge.
	"$BIN" init "$d" --size 512M --cluster-size 64K
	dev=$("$BIN" add --image "$d"); wait_dev "$dev"; id=$(dev_id "$dev")
	dd if=/dev/urandom of="$SCRATCH/pat.0" bs=1M count=160 status=none
	dd if="$SCRATCH/pat.0" of="$dev" bs=1M oflag=direct status=none
	"$BIN" snapshot -n "$id" >/dev/null
	# A merge costs the top's clusters: 96 MiB of them (1,536), so the
	# kill lands while they are copied into the parent's file.
	dd if=/dev/urandom of="$SCRATCH/pat.1" bs=1M count=96 status=none
	dd if="$SCRATCH/pat.1" of="$dev" bs=1M seek=40 oflag=direct status=none
	pid=$(daemon_pid "$id")
	"$BIN" snapshot-merge -n "$id" >"$SCRATCH/merge.out" 2>&1 &
	merge_pid=$!
	# Kill as soon as the merge has copied something (no status call in
	# between: the copy is quick).
	for _ in $(seq 400); do
		st=$("$BIN" status -n "$id" --json)
		grep -q '"done": *[1-9]' <<<"$st" && break
	done
	kill -9 "$pid"
	log "killed daemon $pid in the middle of the merge: $(grep -E '"(state|done|total)"' <<<"$st" | tr -d ' \n')"
	wait "$merge_pid" && log "(the merge finished before the kill)"
	"$BIN" recover -n "$id"
	ploop_locked "$d/root.hds" || die "the recovered device does not hold ploop's lock"
	expect_data() { # what
		dd if="$dev" of="$SCRATCH/read.0" bs=1M count=160 iflag=direct status=none
		cmp "$SCRATCH/read.0" "$SCRATCH/pat.want" || die "the device's data differs $1"
	}
	cp "$SCRATCH/pat.0" "$SCRATCH/pat.want"
	dd if="$SCRATCH/pat.1" of="$SCRATCH/pat.want" bs=1M seek=40 conv=notrunc status=none
	expect_data "after recovery"
	# The merge can be run again, to its end.
	if [ "$("$BIN" snapshot-list -n "$id" --json | grep -c '"guid"')" != 1 ]; then
		"$BIN" snapshot-merge -n "$id"
	else
		log "(the merge was finished before the kill, or by the recovery: a start finishes a half-done merge first)"
	fi
	[ "$("$BIN" snapshot-list -n "$id" --json | grep -c '"guid"')" = 1 ] || die "the merge left more than one delta"
	[ -f "$d/root.hds" ] || die "the merge did not keep the base's file"
	expect_data "after the merge"
	"$BIN" del -n "$id"
	check_disk_after_kill "$d"
}

# A kill -9 at each step of an online merge into the parent's file, where
# no outside timing can land: the daemon is started to kill itself there
# (UBLK_PLOOP_CRASH_AT). After each: the device recovers with the data
# whole, a start or the next merge finishes the merge, the base keeps its
# file name, and the disk checks clean (our check and qemu-img).
scenario_merge_steps() {
	local d point pid merge_pid
	dd if=/dev/urandom of="$SCRATCH/ms.0" bs=1M count=64 status=none
	dd if=/dev/urandom of="$SCRATCH/ms.1" bs=1M count=16 status=none
	cp "$SCRATCH/ms.0" "$SCRATCH/ms.want"
	dd if="$SCRATCH/ms.1" of="$SCRATCH/ms.want" bs=1M seek=20 conv=notrunc status=none
	for point in merge-marked merge-stored merge-swapped; do
		d=$SCRATCH/ms-$point
		"$BIN" init "$d" --size 128M --cluster-size 64K
		dev=$(UBLK_PLOOP_CRASH_AT=$point "$BIN" add --image "$d"); wait_dev "$dev"; id=$(dev_id "$dev")
		dd if="$SCRATCH/ms.0" of="$dev" bs=1M oflag=direct status=none
		"$BIN" snapshot -n "$id" >/dev/null
		dd if="$SCRATCH/ms.1" of="$dev" bs=1M seek=20 oflag=direct status=none
		pid=$(daemon_pid "$id")
		"$BIN" snapshot-merge -n "$id" >"$SCRATCH/merge.out" 2>&1 &
		merge_pid=$!
		for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -0 "$pid" 2>/dev/null && die "$point: the daemon did not stop there"
		wait "$merge_pid" && die "$point: the merge reported success from a killed daemon"
		"$BIN" recover -n "$id"
		dd if="$dev" of="$SCRATCH/ms.read" bs=1M count=64 iflag=direct status=none
		cmp "$SCRATCH/ms.read" "$SCRATCH/ms.want" || die "$point: the data differs after recovery"
		if [ "$("$BIN" snapshot-list -n "$id" --json | grep -c '"guid"')" != 1 ]; then
			"$BIN" snapshot-merge -n "$id" >/dev/null
		fi
		[ "$("$BIN" snapshot-list -n "$id" --json | grep -c '"guid"')" = 1 ] || die "$point: more than one delta after the merge"
		[ -f "$d/root.hds" ] || die "$point: the base's file was not kept"
		# A kill after the descriptor stopped naming the old top's file
		# leaves that file behind, named by nothing (as ploop leaves it);
		# the user removes it.
		for f in "$d"/root.hds.*; do
			[ -e "$f" ] || continue
			grep -qF "$(basename "$f")" "$d/DiskDescriptor.xml" && die "$point: $f is still in the descriptor"
			log "$point: left behind, in no descriptor: $(basename "$f")"
			rm -f -- "$f"
		done
		dd if="$dev" of="$SCRATCH/ms.read" bs=1M count=64 iflag=direct status=none
		cmp "$SCRATCH/ms.read" "$SCRATCH/ms.want" || die "$point: the data differs after the merge"
		"$BIN" del -n "$id"
		[ "$(find "$d" -name '*.hds*' | wc -l)" = 1 ] || die "$point: files left: $(ls "$d")"
		check_disk_after_kill "$d"
		log "$point: killed there, recovered, merged, data and disk whole"
		rm -rf -- "$d"
	done
	# The scratch filesystem is shared with the scenarios after this one.
	rm -f -- "$SCRATCH"/ms.*
}

# qemu-img 7.2 does not know that format-extension clusters (a kept
# changed-block record) are in use: it may call them leaked space (exit 3),
# never damage.
qemu_check_ext() {
	local rc=0
	qemu-img check -f parallels "$1" >/tmp/qcheck.out 2>&1 || rc=$?
	[ $rc = 0 ] || [ $rc = 3 ] || { cat /tmp/qcheck.out; die "qemu-img check $1 (exit $rc)"; }
}
# The same content: two ploop images, as qemu-img sees them.
same_images() { qemu-img compare -q -f parallels -F parallels "$1" "$2" || die "$3: $1 and $2 differ"; }

# An incremental backup while fio writes to the device (writes complete as
# it starts, during its rounds and up to its frozen point), then one more
# with the device idle: together they bring the backup to what the device
# shows. fio writes 4 KiB into each 64 KiB cluster once, in order, so a
# write the backup misses is not sent again with a later write to its
# cluster: the second incremental would miss it too (the first cleared the
# record) and the restore would differ.
backup_under_writes() {
	local img=$SCRATCH/bk.hdd dev id dev2 w0 fio_pid s
	"$BIN" create "$img" --size 128M --cluster-size 64K >/dev/null
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")
	dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
	"$BIN" backup -n "$id" --to "$SCRATCH/bk-full.stream" >/dev/null
	"$BIN" receive --image "$SCRATCH/bk-backup.hdd" --from "$SCRATCH/bk-full.stream" >/dev/null
	rm -f "$SCRATCH/bk-full.stream"
	fio --name=bk --filename="$dev" --ioengine=io_uring --direct=1 --rw=write:60k --bs=4k --iodepth=16 \
		--offset=8M --size=120M --io_size=7680k --output="$SCRATCH/fio.bk" >/dev/null 2>&1 &
	fio_pid=$!
	# Once fio's writes reach the device (it takes a while to start).
	writes() { awk '{print $5}' "/sys/block/$(basename "$dev")/stat"; }
	w0=$(writes)
	for _ in $(seq 300); do [ "$(writes)" -gt $((w0 + 100)) ] && break; sleep 0.1; done
	[ "$(writes)" -gt $((w0 + 100)) ] || die "fio does not write"
	"$BIN" backup -n "$id" --incremental --to "$SCRATCH/bk-incr1.stream" --json >"$SCRATCH/bk-incr1.json" || die "backup under writes"
	kill -0 "$fio_pid" 2>/dev/null || log "(fio ended before the backup did: it ran only partly under writes)"
	wait "$fio_pid" || { cat "$SCRATCH/fio.bk"; die "fio during the backup"; }
	grep -q '"note"' "$SCRATCH/bk-incr1.json" && die "the record of changes was lost: $(cat "$SCRATCH/bk-incr1.json")"
	"$BIN" backup -n "$id" --incremental --to "$SCRATCH/bk-incr2.stream" >/dev/null
	log "incremental backups under fio and after it: $(stat -c %s "$SCRATCH/bk-incr1.stream") and $(stat -c %s "$SCRATCH/bk-incr2.stream") bytes"
	for s in incr1 incr2; do
		"$BIN" receive --image "$SCRATCH/bk-backup.hdd" --incremental --from "$SCRATCH/bk-$s.stream" >/dev/null
	done
	rm -f "$SCRATCH/bk-incr1.stream" "$SCRATCH/bk-incr2.stream"
	dev2=$("$BIN" add --image "$SCRATCH/bk-backup.hdd" --read-only); wait_dev "$dev2"
	cmp "$dev" "$dev2" || die "the backup restored from incrementals taken under writes differs from the device"
	"$BIN" del -n "$(dev_id "$dev2")"
	"$BIN" del -n "$id"
	qemu_check "$SCRATCH/bk-backup.hdd"
	rm -f "$SCRATCH/bk-backup.hdd" "$img"
}

scenario_track_copy() {
	local img=$SCRATCH/cp.hdd mnt=/mnt/cp
	ip link set lo up 2>/dev/null || true
	"$BIN" create "$img" --size 256M
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")

	# The tracker: what changed since the last get, as byte ranges.
	"$BIN" track start -n "$id" >/dev/null
	dd if=/dev/urandom of="$dev" bs=4k count=1 seek=$((5 * 256 + 3)) oflag=direct status=none
	dd if=/dev/urandom of="$dev" bs=4k count=300 seek=$((100 * 256 + 200)) oflag=direct status=none
	got=$("$BIN" track get -n "$id" 2>/dev/null)
	want="$((5 << 20)) $((6 << 20))
$((100 << 20)) $((102 << 20))"
	[ "$got" = "$want" ] || die "track get: '$got', want '$want'"
	[ -z "$("$BIN" track get -n "$id" 2>/dev/null)" ] || die "a second get is not empty"
	"$BIN" track stop -n "$id" >/dev/null
	"$BIN" track get -n "$id" 2>/dev/null && die "get after stop"

	# A live copy under a filesystem workload, over a pipe: the filesystem
	# is frozen for the last pass, so the copy holds a consistent one.
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$mnt"; mount "$dev" "$mnt"
	mkdir "$mnt/A"; write_files "$mnt/A" 4 8; sums_of "$mnt/A" 'file*' A; sync
	fio --name=busy --directory="$mnt" --rw=randwrite --bs=4k --size=48M --direct=1 --ioengine=io_uring --iodepth=8 \
		--verify=crc32c --verify_backlog=256 --time_based --runtime=30 --output="$SCRATCH/fio.busy" >/dev/null 2>&1 &
	fio_pid=$!
	sleep 3
	"$BIN" copy -n "$id" --to - --json 2>"$SCRATCH/copy.json" | "$BIN" receive --image "$SCRATCH/live.hdd" >/dev/null \
		|| { cat "$SCRATCH/copy.json"; die "live copy over a pipe"; }
	log "live copy: $(tr -d ' \n' <"$SCRATCH/copy.json" | grep -o '"frozen_ms":[0-9.]*'), $(grep -c '"round"' "$SCRATCH/copy.json") rounds"
	grep -q 'frozen for the last pass' "$SCRATCH/copy.json" || die "the filesystem was not frozen: $(cat "$SCRATCH/copy.json")"
	wait "$fio_pid" || { cat "$SCRATCH/fio.busy"; die "fio verify on the source during the copy"; }
	umount "$mnt"
	# The copy: a clean filesystem with the files written before.
	dev2=$("$BIN" add --image "$SCRATCH/live.hdd" --read-only); wait_dev "$dev2"
	fsck.ext4 -n "$dev2" >"$SCRATCH/fsck.out" 2>&1 || { cat "$SCRATCH/fsck.out"; die "fsck of the live copy"; }
	mkdir -p /mnt/cp2; mount -o ro,noload "$dev2" /mnt/cp2
	check_sums /mnt/cp2/A A
	umount /mnt/cp2
	"$BIN" del -n "$(dev_id "$dev2")"
	qemu_check "$SCRATCH/live.hdd"
	rm -f "$SCRATCH/live.hdd"   # the scratch disk is small

	# Over TCP on loopback, two-way, into a disk directory; the device idle,
	# so the copy equals it.
	mkdir "$SCRATCH/tcp.disk"
	"$BIN" receive --image "$SCRATCH/tcp.disk" --listen 127.0.0.1:7311 >"$SCRATCH/recv.out" 2>&1 &
	recv_pid=$!
	# (Up to 30 s: a slow emulated guest on a busy host starts processes slowly.)
	for _ in $(seq 300); do grep -q listening "$SCRATCH/recv.out" && break; sleep 0.1; done
	"$BIN" copy -n "$id" --connect 127.0.0.1:7311 >"$SCRATCH/copy.out" || { cat "$SCRATCH/copy.out"; die "copy over TCP"; }
	wait "$recv_pid" || { cat "$SCRATCH/recv.out"; die "receive over TCP"; }
	grep -q 'checksums verified' "$SCRATCH/recv.out" || die "no checksums over TCP: $(cat "$SCRATCH/recv.out")"

	# To a file; cut and damaged copies of it are refused and leave nothing.
	"$BIN" copy -n "$id" --to "$SCRATCH/cp.stream" >/dev/null
	size=$(stat -c %s "$SCRATCH/cp.stream")
	head -c $((size / 2)) "$SCRATCH/cp.stream" >"$SCRATCH/cut.stream"
	"$BIN" receive --image "$SCRATCH/cut.hdd" --from "$SCRATCH/cut.stream" 2>"$SCRATCH/cut.err" && die "a cut stream was received"
	grep -q 'cut off' "$SCRATCH/cut.err" || die "cut stream: $(cat "$SCRATCH/cut.err")"
	cp "$SCRATCH/cp.stream" "$SCRATCH/flip.stream"
	printf '\x5a' | dd of="$SCRATCH/flip.stream" bs=1 seek=$((size / 3)) conv=notrunc status=none
	"$BIN" receive --image "$SCRATCH/cut.hdd" --from "$SCRATCH/flip.stream" 2>"$SCRATCH/flip.err" && die "a damaged stream was received"
	grep -q 'damaged' "$SCRATCH/flip.err" || die "damaged stream: $(cat "$SCRATCH/flip.err")"
	[ ! -e "$SCRATCH/cut.hdd" ] && [ ! -e "$SCRATCH/cut.hdd.partial" ] || die "a refused stream left an image"
	"$BIN" receive --image "$SCRATCH/file.hdd" --from "$SCRATCH/cp.stream" >/dev/null
	rm -f "$SCRATCH/cp.stream" "$SCRATCH/cut.stream" "$SCRATCH/flip.stream"
	same_images "$SCRATCH/tcp.disk/root.hds" "$SCRATCH/file.hdd" "TCP vs file copy"
	for f in "$SCRATCH/tcp.disk/root.hds" "$SCRATCH/file.hdd"; do
		"$BIN" check "$f" >/dev/null || die "check $f"
		qemu_check "$f"
	done
	rm -rf "$SCRATCH/tcp.disk" "$SCRATCH/file.hdd"

	# Backups: a full one; a clean restart (the record of changes is kept
	# in the image's format extension); changes; an incremental one.
	"$BIN" backup -n "$id" --to "$SCRATCH/full.stream" >/dev/null
	"$BIN" receive --image "$SCRATCH/backup.hdd" --from "$SCRATCH/full.stream" >/dev/null
	"$BIN" del -n "$id"
	"$BIN" check "$img" >/dev/null || die "check of an image with a changed-block record"
	qemu_check_ext "$img"
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")
	dd if=/dev/urandom of="$dev" bs=64k count=16 seek=700 oflag=direct status=none
	"$BIN" backup -n "$id" --incremental --to "$SCRATCH/incr.stream" --json >"$SCRATCH/incr.json"
	grep -q '"note"' "$SCRATCH/incr.json" && die "the record of changes was lost: $(cat "$SCRATCH/incr.json")"
	full=$(stat -c %s "$SCRATCH/full.stream"); incr=$(stat -c %s "$SCRATCH/incr.stream")
	[ "$incr" -lt $((full / 10)) ] || die "the incremental backup is not small: $incr of $full"
	"$BIN" receive --image "$SCRATCH/backup.hdd" --incremental --from "$SCRATCH/incr.stream" >/dev/null
	# After a kill -9 the record is gone: an incremental is refused (a
	# stream of the allocated clusters only would leave clusters zeroed
	# since in the old backup); a full one into a new destination works.
	kill -9 "$(daemon_pid "$id")"; sleep 0.5
	"$BIN" recover -n "$id" >/dev/null
	if "$BIN" backup -n "$id" --incremental --to "$SCRATCH/incr2.stream" 2>"$SCRATCH/incr2.err"; then
		die "an incremental backup after a crash was not refused"
	fi
	grep -q "no record of changes" "$SCRATCH/incr2.err" || die "an incremental backup after a crash: $(cat "$SCRATCH/incr2.err")"
	"$BIN" backup -n "$id" --to "$SCRATCH/full2.stream" >/dev/null
	"$BIN" receive --image "$SCRATCH/backup2.hdd" --from "$SCRATCH/full2.stream" >/dev/null
	rm -f "$SCRATCH/full.stream" "$SCRATCH/incr.stream" "$SCRATCH/incr2.stream" "$SCRATCH/incr2.err" "$SCRATCH/full2.stream"
	# The restored backups show what the (idle) device shows.
	for b in "$SCRATCH/backup.hdd" "$SCRATCH/backup2.hdd"; do
		dev2=$("$BIN" add --image "$b" --read-only); wait_dev "$dev2"
		cmp "$dev" "$dev2" || die "the backup $b differs from the device"
		"$BIN" del -n "$(dev_id "$dev2")"
		"$BIN" check "$b" >/dev/null || die "check the backup $b"
		qemu_check "$b"
	done
	rm -f "$SCRATCH/backup.hdd" "$SCRATCH/backup2.hdd"
	backup_under_writes

	# Migration under writes: fio writes until the last pass stops the
	# device; the copy then equals the source image, byte for byte.
	fio --name=mig --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
		--time_based --runtime=60 --output="$SCRATCH/fio.mig" >/dev/null 2>&1 &
	fio_pid=$!
	sleep 3
	"$BIN" copy -n "$id" --stop --to "$SCRATCH/stop.stream" --json >"$SCRATCH/stop.json" || die "copy --stop"
	log "copy --stop under writes: $(tr -d ' \n' <"$SCRATCH/stop.json" | grep -o '"frozen_ms":[0-9.]*')"
	wait "$fio_pid" && log "(fio ended before the stop)"
	for _ in $(seq 300); do [ -e "$dev" ] || break; sleep 0.1; done
	[ ! -e "$dev" ] || die "copy --stop left the device"
	"$BIN" receive --image "$SCRATCH/moved.hdd" --from "$SCRATCH/stop.stream" >/dev/null
	rm -f "$SCRATCH/stop.stream"
	"$BIN" check "$img" >/dev/null || die "check $img"
	qemu_check_ext "$img"
	"$BIN" check "$SCRATCH/moved.hdd" >/dev/null || die "check the migrated copy"
	qemu_check "$SCRATCH/moved.hdd"
	# The migrated copy equals the source as the device left it.
	same_images "$img" "$SCRATCH/moved.hdd" "copy --stop under writes"
	rm -f "$img" "$SCRATCH/moved.hdd"
}

# An MBR partition table on $1 (no sfdisk needed): Linux partitions at the
# given start:sectors pairs.
write_mbr() { # dev start:sectors... (in 512-byte units)
	# An MBR counts in the device's logical blocks: 4 KiB where the image
	# files' direct I/O alignment is (the 7.x guest's scratch disk).
	local dev=$1 at=446 p per
	per=$(($(blockdev --getss "$dev") / 512))
	shift
	le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
	for p in "$@"; do
		# shellcheck disable=SC2059
		printf "\\x00\\x00\\x00\\x00\\x83\\x00\\x00\\x00$(le32 $((${p%:*} / per)))$(le32 $((${p#*:} / per)))" |
			dd of="$dev" bs=1 seek=$at conv=notrunc status=none
		at=$((at + 16))
	done
	printf '\x55\xaa' | dd of="$dev" bs=1 seek=510 conv=notrunc status=none
	blockdev --flushbufs "$dev"
	blockdev --rereadpt "$dev"
}

# Filesystems the device's own mount table does not show: one on a
# partition, one mounted in another mount namespace. del and copy --stop
# refuse while either is mounted; a copy freezes both for its last pass;
# a receiver that stops reading during the frozen pass (it writes into the
# frozen filesystem) ends the freeze at --freeze-limit: the copy fails
# saying so, and the filesystem takes writes again.
scenario_mounts_frozen() {
	local img=$SCRATCH/mf.hdd mnt=/mnt/mf other=/mnt/mf-other ns_pid t0 took
	"$BIN" create "$img" --size 256M >/dev/null
	# No memory for the last pass: it goes on the channel while frozen.
	dev=$(UBLK_PLOOP_COPY_MEMORY=0 "$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")
	write_mbr "$dev" 2048:196608 198656:196608
	wait_dev "${dev}p1"; wait_dev "${dev}p2"
	mkfs.ext4 -q -F "${dev}p1"; mkfs.ext4 -q -F "${dev}p2"
	mkdir -p "$mnt" "$other"
	mount "${dev}p1" "$mnt"
	write_files "$mnt" 2 4
	# p2 mounted in a mount namespace of its own, invisible here (the
	# copy of p1's mount it starts with is dropped there).
	unshare -m --propagation private sh -c "umount $mnt && mount ${dev}p2 $other && echo x >$other/hello && touch /tmp/mf.ready && exec sleep 3600" &
	ns_pid=$!
	for _ in $(seq 100); do [ -e /tmp/mf.ready ] && break; sleep 0.1; done
	[ -e /tmp/mf.ready ] || die "the other namespace did not mount ${dev}p2"
	grep -q " $other " /proc/self/mounts && die "the other namespace's mount shows here"

	"$BIN" del -n "$id" 2>"$SCRATCH/del.err" && die "del with a mounted partition succeeded"
	grep -q "ublkb${id}p1 is mounted on $mnt" "$SCRATCH/del.err" || die "del refusal: $(cat "$SCRATCH/del.err")"
	"$BIN" copy -n "$id" --stop --to "$SCRATCH/mf.stream" 2>"$SCRATCH/stop.err" && die "copy --stop with a mounted partition succeeded"
	grep -q "is mounted on" "$SCRATCH/stop.err" || die "copy --stop refusal: $(cat "$SCRATCH/stop.err")"
	rm -f "$SCRATCH/mf.stream"
	umount "$mnt"
	"$BIN" del -n "$id" 2>"$SCRATCH/del.err" && die "del with a partition mounted in another namespace succeeded"
	grep -q "ublkb${id}p2 is mounted on $other in the mount namespace of pid" "$SCRATCH/del.err" || die "del refusal: $(cat "$SCRATCH/del.err")"
	mount "${dev}p1" "$mnt"

	# A copy freezes both filesystems for its last pass.
	"$BIN" copy -n "$id" --to "$SCRATCH/mf.stream" --json >"$SCRATCH/mf.json" || die "copy: $(cat "$SCRATCH/mf.json")"
	grep -q "frozen for the last pass: ublkb${id}p1 is mounted on $mnt" "$SCRATCH/mf.json" || die "p1 not frozen: $(cat "$SCRATCH/mf.json")"
	grep -q "ublkb${id}p2 is mounted on $other in the mount namespace of pid" "$SCRATCH/mf.json" || die "p2 not frozen: $(cat "$SCRATCH/mf.json")"
	tr -d ' \n' <"$SCRATCH/mf.json" | grep -q '"frozen":true' || die "no frozen round: $(cat "$SCRATCH/mf.json")"
	"$BIN" receive --image "$SCRATCH/mf-copy.hdd" --from "$SCRATCH/mf.stream" >/dev/null
	rm -f "$SCRATCH/mf.stream" "$SCRATCH/mf-copy.hdd"
	verify_files "$mnt"

	# The receiver writes the stream into the filesystem being copied: at
	# the freeze it stops reading. The last pass goes on the channel while
	# frozen (no memory for it), so the freeze ends at its limit.
	t0=$(date +%s)
	if timeout 120 bash -o pipefail -c "'$BIN' copy -n $id --to - --freeze-limit 3 --timeout 10 2>'$SCRATCH/stall.err' | cat >'$mnt/self.stream'"; then
		die "a copy whose receiver stalled in the freeze succeeded: $(cat "$SCRATCH/stall.err")"
	fi
	took=$(($(date +%s) - t0))
	grep -q "freeze limit" "$SCRATCH/stall.err" || die "stalled copy: $(cat "$SCRATCH/stall.err")"
	[ "$took" -lt 60 ] || die "the stalled copy took $took s"
	timeout 20 sh -c "echo after >'$mnt/after' && sync -f '$mnt/after'" || die "the filesystem on $mnt takes no writes after the stalled copy"
	timeout 20 nsenter -t "$ns_pid" -m -r -w sh -c "echo after >$other/after && sync -f $other/after" || die "the other namespace's filesystem takes no writes"
	log "a receiver stalled in the freeze: the copy gave up after $took s ($(tail -1 "$SCRATCH/stall.err"))"
	rm -f "$mnt/self.stream"

	kill "$ns_pid"; wait "$ns_pid" 2>/dev/null || true
	umount "$mnt"

	# Held with no filesystem to freeze (swap on p2; the other namespace's
	# mount goes with its last process, shortly): a copy refuses, or with
	# --allow-unfrozen goes on and says it is not filesystem-consistent.
	mkswap -q "${dev}p2" 2>/dev/null || mkswap "${dev}p2" >/dev/null
	for _ in $(seq 50); do swapon "${dev}p2" 2>/dev/null && break; sleep 0.2; done
	grep -q "^${dev}p2 " /proc/swaps || die "swapon ${dev}p2"
	"$BIN" copy -n "$id" --to "$SCRATCH/mf.stream" 2>"$SCRATCH/held.err" && die "a copy of a held device with nothing to freeze succeeded"
	grep -q "no filesystem on it was found to freeze" "$SCRATCH/held.err" || die "held copy: $(cat "$SCRATCH/held.err")"
	rm -f "$SCRATCH/mf.stream"
	"$BIN" copy -n "$id" --to "$SCRATCH/mf.stream" --allow-unfrozen --json >"$SCRATCH/held.json" || die "copy --allow-unfrozen: $(cat "$SCRATCH/held.json")"
	grep -q "not filesystem-consistent" "$SCRATCH/held.json" || die "copy --allow-unfrozen did not say so: $(cat "$SCRATCH/held.json")"
	rm -f "$SCRATCH/mf.stream"
	"$BIN" del -n "$id" 2>"$SCRATCH/del.err" && die "del of a device with swap on it succeeded"
	grep -q "in use" "$SCRATCH/del.err" || die "del refusal (swap): $(cat "$SCRATCH/del.err")"
	swapoff "${dev}p2"
	"$BIN" del -n "$id" 2>"$SCRATCH/del.err" || die "del after unmounting everything: $(cat "$SCRATCH/del.err")"
	"$BIN" check "$img" >/dev/null || die "check $img"
	rm -f "$img" /tmp/mf.ready
}

# The image's filesystem fills up: allocating writes fail with ENOSPC, the
# rest goes on, and once space is freed writes succeed again; nothing
# acknowledged is lost.
scenario_full_disk() {
	local small=$SCRATCH/small.fs mnt=/mnt/small img loopdev
	truncate -s 128M "$small"
	loopdev=$(losetup -f --show "$small")
	mkfs.ext4 -q -F "$loopdev"
	mkdir -p "$mnt"; mount "$loopdev" "$mnt"
	img=$mnt/full.hdd
	"$BIN" create "$img" --size 256M >/dev/null
	dd if=/dev/zero of="$mnt/filler" bs=1M count=24 status=none; sync   # space to give back later
	dd if=/dev/urandom of="$SCRATCH/pat.full" bs=1M count=256 status=none
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")
	dd if="$SCRATCH/pat.full" of="$dev" bs=1M count=32 oflag=direct status=none
	# Past what the filesystem holds: ENOSPC, after some MiB went through.
	if dd if="$SCRATCH/pat.full" of="$dev" bs=1M skip=64 seek=64 count=192 oflag=direct 2>"$SCRATCH/full.err"; then
		die "writes past a full filesystem succeeded"
	fi
	grep -qi "no space" "$SCRATCH/full.err" || die "not ENOSPC: $(cat "$SCRATCH/full.err")"
	done_mb=$(sed -n 's/^\([0-9]*\)+0 records out.*/\1/p' "$SCRATCH/full.err")
	log "ENOSPC after $done_mb MiB of allocating writes"
	[ -n "$done_mb" ] && [ "$done_mb" -gt 0 ] || die "no write went through before ENOSPC"
	"$BIN" status -n "$id" >/dev/null || die "the daemon is gone after ENOSPC"
	# Reads, and writes into allocated clusters, go on.
	cmp -n 32M "$SCRATCH/pat.full" "$dev" || die "data before the full disk"
	cmp -n $((done_mb << 20)) "$SCRATCH/pat.full" "$dev" $((64 << 20)) $((64 << 20)) || die "acknowledged writes before ENOSPC"
	dd if="$SCRATCH/pat.full" of="$dev" bs=1M skip=200 seek=8 count=8 oflag=direct conv=notrunc status=none \
		|| die "overwriting allocated clusters failed on a full filesystem"
	# Space back: allocating writes succeed again.
	rm "$mnt/filler"; sync
	dd if="$SCRATCH/pat.full" of="$dev" bs=1M skip=240 seek=240 count=16 oflag=direct status=none \
		|| die "writes after space was freed"
	"$BIN" del -n "$id"
	dev=$("$BIN" add --image "$img" --read-only); wait_dev "$dev"
	cmp -n 8M "$SCRATCH/pat.full" "$dev" || die "first 8 MiB after a restart"
	cmp -n 8M "$SCRATCH/pat.full" "$dev" $((200 << 20)) $((8 << 20)) || die "the overwrite made while full"
	cmp -n 16M "$SCRATCH/pat.full" "$dev" $((16 << 20)) $((16 << 20)) || die "data after the overwrite"
	cmp -n $((done_mb << 20)) "$SCRATCH/pat.full" "$dev" $((64 << 20)) $((64 << 20)) || die "acknowledged writes after a restart"
	cmp -n 16M "$SCRATCH/pat.full" "$dev" $((240 << 20)) $((240 << 20)) || die "writes made after space was freed"
	"$BIN" del -n "$(dev_id "$dev")"
	"$BIN" check "$img" || die "check after ENOSPC"
	qemu_check "$img"
	umount "$mnt"; losetup -d "$loopdev"; rm -f "$small" "$SCRATCH/pat.full"
}

# I/O errors under the image's filesystem (a device-mapper table swapped
# for the error target): they reach the guest as errors, the daemon stays
# up, and once the disk is back nothing flushed before is lost and
# the image is not damaged.
scenario_io_errors() {
	local back=$SCRATCH/errs.back mnt=/mnt/errs img loopdev sectors table
	truncate -s 256M "$back"
	loopdev=$(losetup -f --show "$back")
	sectors=$(blockdev --getsz "$loopdev")
	table="0 $sectors linear $loopdev 0"
	dmsetup create errs --table "$table"
	dmsetup mknodes errs
	mkfs.ext4 -q -F /dev/mapper/errs
	mkdir -p "$mnt"; mount /dev/mapper/errs "$mnt"
	img=$mnt/e.hdd
	"$BIN" create "$img" --size 128M >/dev/null
	dd if=/dev/urandom of="$SCRATCH/pat.err" bs=1M count=32 status=none
	dev=$("$BIN" add --image "$img"); wait_dev "$dev"; id=$(dev_id "$dev")
	# Flushed: the device has a volatile write cache, so what survives a
	# failure is what a flush after it acknowledged (unflushed, the host
	# filesystem's record of the image's new clusters may still be in its
	# journal when the disk dies).
	dd if="$SCRATCH/pat.err" of="$dev" bs=1M count=16 oflag=direct conv=fsync status=none
	# The disk under the image fails every I/O.
	dmsetup suspend --nolockfs --noflush errs; dmsetup load errs --table "0 $sectors error"; dmsetup resume errs
	dd if="$SCRATCH/pat.err" of="$dev" bs=1M skip=16 seek=16 count=16 oflag=direct 2>"$SCRATCH/err.out" \
		&& die "writes succeeded on a failing disk"
	grep -qi "error" "$SCRATCH/err.out" || die "no error reached the guest: $(cat "$SCRATCH/err.out")"
	log "the guest saw: $(grep -i error "$SCRATCH/err.out" | head -1)"
	# Reads fail too (the image is read with O_DIRECT: no cache answers),
	# and a read that fails still completes with its error.
	dd if="$dev" of=/dev/null bs=4k count=16 iflag=direct 2>"$SCRATCH/err.out" && die "reads succeeded on a failing disk"
	grep -qi "error" "$SCRATCH/err.out" || die "no read error reached the guest: $(cat "$SCRATCH/err.out")"
	"$BIN" status -n "$id" >/dev/null || die "the daemon is gone after I/O errors"
	# The disk comes back: the same device reads right again; then stop
	# it, repair the host filesystem, and look at the image.
	dmsetup suspend --nolockfs --noflush errs; dmsetup load errs --table "$table"; dmsetup resume errs
	cmp -n 16M "$SCRATCH/pat.err" "$dev" || die "reads once the disk is back"
	"$BIN" del -n "$id" --force >/dev/null 2>&1 || true
	umount "$mnt" 2>/dev/null || umount -l "$mnt"
	fsck.ext4 -fy /dev/mapper/errs >"$SCRATCH/fsck.err" 2>&1 || [ $? -le 1 ] || { cat "$SCRATCH/fsck.err"; die "fsck of the host filesystem"; }
	mount /dev/mapper/errs "$mnt"
	# A stale in-use mark or leaked space may be left (the daemon could not
	# close cleanly); damage may not.
	"$BIN" check --json "$img" >"$SCRATCH/check.json" || true
	grep -q '"header_errors": \[\]' "$SCRATCH/check.json" && grep -q '"bad_entries": \[\]' "$SCRATCH/check.json" \
		|| { cat "$SCRATCH/check.json"; die "the image is damaged after I/O errors"; }
	log "after the errors: $(grep -o '"verdict": "[a-z]*"' "$SCRATCH/check.json"), unclean $(grep -o '"unclean": [a-z]*' "$SCRATCH/check.json" | cut -d' ' -f2)"
	"$BIN" check --repair "$img" >/dev/null
	"$BIN" check "$img" >/dev/null || die "check after repair"
	dev=$("$BIN" add --image "$img" --read-only); wait_dev "$dev"
	cmp -n 16M "$SCRATCH/pat.err" "$dev" || die "data acknowledged before the errors"
	"$BIN" del -n "$(dev_id "$dev")"
	qemu_check "$img"
	umount "$mnt"; dmsetup remove errs; losetup -d "$loopdev"; rm -f "$back" "$SCRATCH/pat.err"
}

# Online grow where the kernel has UPDATE_SIZE (7.x): ext4 on the device
# grows with resize2fs while mounted and its files verify; without it, the
# clear refusal, then the offline resize and a restart.
scenario_resize() {
	local dir=$SCRATCH/ctr mnt=/mnt/resize dev id out
	"$BIN" init "$dir" --size 128M >/dev/null
	dev=$("$BIN" add --image "$dir"); wait_dev "$dev"; id=$(dev_id "$dev")
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$mnt"; mount "$dev" "$mnt"
	dd if=/dev/urandom of="$mnt/before" bs=1M count=40 status=none
	sum=$(sha256sum <"$mnt/before"); sync
	"$BIN" snapshot -n "$id" >/dev/null
	# 393000K is not whole clusters: rounded up to 384 MiB, as ploop does.
	if out=$("$BIN" resize -n "$id" --size 393000K 2>&1); then
		[ "$(blockdev --getsize64 "$dev")" = $((384 << 20)) ] || die "the device did not grow: $(blockdev --getsize64 "$dev")"
		resize2fs "$dev" >/dev/null 2>&1 || die "resize2fs on the mounted filesystem"
		size_kb=$(df -k --output=size "$mnt" | tail -1)
		[ "$size_kb" -gt $((300 << 10)) ] || die "the filesystem did not grow: ${size_kb} KiB"
		dd if=/dev/urandom of="$mnt/after" bs=1M count=200 status=none || die "writing into the grown space"
		sync
		log "grown online: device 384 MiB, filesystem ${size_kb} KiB, 200 MiB written past the old end"
	else
		grep -q "must be restarted" <<<"$out" || die "no clear refusal on a kernel without UPDATE_SIZE: $out"
		log "SKIP online grow: this kernel's ublk has no UPDATE_SIZE ($out)"
		umount "$mnt"; "$BIN" del -n "$id"
		"$BIN" resize "$dir" --size 393000K >/dev/null || die "offline resize"
		dev=$("$BIN" add --image "$dir"); wait_dev "$dev"; id=$(dev_id "$dev")
		[ "$(blockdev --getsize64 "$dev")" = $((384 << 20)) ] || die "the device did not grow offline"
		mount "$dev" "$mnt"; resize2fs "$dev" >/dev/null 2>&1 || die "resize2fs after the offline resize"
		log "grown offline and restarted"
	fi
	[ "$(sha256sum <"$mnt/before")" = "$sum" ] || die "data written before the grow"
	umount "$mnt"
	fsck.ext4 -fn "$dev" >/dev/null 2>&1 || die "fsck after the grow"
	# The snapshot (taken before) still shows the old size, and merges back.
	"$BIN" snapshot-merge -n "$id" >/dev/null || die "merging the snapshot of the smaller disk"
	mount "$dev" "$mnt"
	[ "$(sha256sum <"$mnt/before")" = "$sum" ] || die "data after the merge"
	umount "$mnt"
	"$BIN" del -n "$id"
	"$BIN" check "$dir" >/dev/null || die "check after grow and merge"
	for f in "$dir"/root.hds*; do qemu_check "$f"; done
}

# Files deleted and trimmed in the guest: compact gives the image's space
# back online, the rest verifies; a kill -9 in the middle loses nothing.
scenario_compact() {
	local dir=$SCRATCH/ctc mnt=/mnt/compact dev id before after alloc
	"$BIN" init "$dir" --size 1G >/dev/null
	dev=$("$BIN" add --image "$dir"); wait_dev "$dev"; id=$(dev_id "$dev")
	mkfs.ext4 -q -F -E nodiscard "$dev"
	mkdir -p "$mnt"; mount "$dev" "$mnt"
	for i in $(seq 1 24); do dd if=/dev/urandom of="$mnt/f$i" bs=1M count=24 status=none; done
	sync
	for i in $(seq 1 24); do [ $((i % 4)) = 0 ] || rm "$mnt/f$i"; done
	(cd "$mnt" && sha256sum f4 f8 f12 f16 f20 f24 >"$SCRATCH/sums.compact")
	# ext4 trims blocks only once their freeing is committed.
	sync
	fstrim "$mnt" || die "fstrim"
	before=$(stat -c %s "$dir/root.hds")
	# kill -9 of the daemon once the first steps are done, then recovery
	# and a full run. One cluster per step at 8 MiB/s on average: about
	# 15 s for the whole job, so the kill lands between two steps however
	# fast this machine moves clusters.
	"$BIN" compact -n "$id" --step 1 --speed 8M --json >/dev/null 2>"$SCRATCH/compact.err" &
	local midway="" pid job done_ total seen=""
	pid=$(daemon_pid "$id")
	for _ in $(seq 600); do
		job=$("$BIN" status -n "$id" --json 2>/dev/null | tr -d ' \n' | grep -o '"kind":"compact","uuid":null,"state":"[a-z]*","done":[0-9]*,"total":[0-9]*' || true)
		[ -z "$job" ] || seen=$job
		done_=$(sed -n 's/.*"done":\([0-9]*\).*/\1/p' <<<"$job"); total=$(sed -n 's/.*"total":\([0-9]*\).*/\1/p' <<<"$job")
		if [ -n "$done_" ] && [ "$done_" -gt 0 ] && [ "$done_" -lt "$total" ]; then
			kill -9 "$pid"; midway="$done_ of $total"; break
		fi
		grep -q '"state":"running"' <<<"$job" || [ -z "$job" ] || break
		sleep 0.05
	done
	wait || true
	[ -n "$midway" ] || die "never saw the compaction in progress to kill it there (last job seen: ${seen:-none}; compact said: $(cat "$SCRATCH/compact.err"))"
	log "killed the daemon with $midway clusters moved"
	"$BIN" recover -n "$id" >/dev/null || die "recover after a kill during compact"
	(cd "$mnt" && sha256sum -c --quiet "$SCRATCH/sums.compact") || die "files after a kill during compact"
	"$BIN" compact -n "$id" --json >"$SCRATCH/compact.json" || die "compact"
	grep -q '"moved":[1-9]' <<<"$(tr -d ' \n' <"$SCRATCH/compact.json")" || log "(the killed run had moved everything already)"
	after=$(stat -c %s "$dir/root.hds")
	(cd "$mnt" && sha256sum -c --quiet "$SCRATCH/sums.compact") || die "files after compact"
	umount "$mnt"
	fsck.ext4 -fn "$dev" >/dev/null 2>&1 || die "fsck after compact"
	"$BIN" del -n "$id"
	alloc=$("$BIN" info --json "$dir" | sed -n 's/.*"allocated_clusters": *\([0-9]*\).*/\1/p' | head -1)
	log "image file $before -> $after bytes; $alloc clusters in use; $(tr -d '\n ' <"$SCRATCH/compact.json")"
	# Within a few clusters of the live data: header + table cluster + data.
	[ "$after" -le $(( (alloc + 4) << 20 )) ] || die "the file ($after bytes) is far above its $alloc live clusters"
	[ "$alloc" -lt 240 ] || die "$alloc clusters in use after deleting 432 of 576 MiB and fstrim"
	[ "$after" -lt "$before" ] || die "compact gave nothing back"
	"$BIN" check "$dir" >/dev/null || die "check after compact"
	qemu_check "$dir/root.hds"
}

# The control protocol across versions: a CLI built from an older commit
# (tests/vm/old-cli; $UBLK_PLOOP_OLD_BIN) drives a daemon of this build
# through every online verb; what it reads back and the exit codes show
# that the two still understand each other.
# Thin clones of one template served at once: each mounts the template's
# filesystem, writes its own files, and the template's file never changes;
# one is detached online while mounted and then stands alone.
scenario_clones() {
	local t=$SCRATCH/tmpl mnt=/mnt/clone
	"$BIN" init "$t" --size 256M
	dev=$("$BIN" add --image "$t"); wait_dev "$dev"
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$mnt"; mount "$dev" "$mnt"
	mkdir "$mnt/T"; for i in 1 2 3; do head -c 4M /dev/urandom >"$mnt/T/t$i"; done
	sums_of "$mnt" "T/*" T
	# A snapshot of the served template is cloned while the device goes
	# on, keeping ploop's lock; the snapshot is merged back once the clone
	# is gone.
	local tid snap; tid=$(dev_id "$dev")
	snap=$(snapshot_frozen "$mnt" "$tid" | grep -o '{[0-9a-f-]*}' | head -1)
	"$BIN" clone "$t" "$SCRATCH/ct-live" -u "$snap" >/dev/null || die "clone of a snapshot of the served template"
	ploop_locked "$t/root.hds" || die "cloning took the served template's lock away"
	local cdev; cdev=$("$BIN" add --image "$SCRATCH/ct-live" --read-only); wait_dev "$cdev"
	mkdir -p "$mnt-live"; mount -o ro,noload "$cdev" "$mnt-live"
	check_sums "$mnt-live" T
	umount "$mnt-live"; "$BIN" del -n "$(dev_id "$cdev")"
	rm -rf "$SCRATCH/ct-live" "$t/ublk-ploop-clones"   # (the list named only that clone)
	"$BIN" snapshot-merge -n "$tid" >/dev/null || die "merging the cloned snapshot back"
	umount "$mnt"; "$BIN" del -n "$tid"
	# A template on read-only storage clones, before any lock file exists
	# there and after one does, and nothing is made beside it.
	local ro=$SCRATCH/tmpl.ro
	mkdir -p "$ro"; mount --bind "$t" "$ro"; mount -o remount,bind,ro "$ro"
	touch "$ro/probe" 2>/dev/null && die "the read-only mount of the template is writable"
	rm -f "$t"/*.lck
	"$BIN" clone "$ro" "$SCRATCH/ct-ro" >/dev/null || die "clone of a template on read-only storage"
	[ -z "$(ls "$t" | grep -v -e '^DiskDescriptor.xml$' -e '^root.hds$')" ] || die "cloning a read-only template left $(ls "$t")"
	rm -rf "$SCRATCH/ct-ro"
	"$BIN" clone "$t" "$SCRATCH/ct-busy" >/dev/null || die "clone of a stopped template"
	rm -rf "$SCRATCH/ct-busy"
	local tsum; tsum=$(sha256sum "$t/root.hds" | cut -c1-64)
	local ids="" i
	for i in 1 2 3; do
		# The third reads its template through the read-only mount.
		local from=$t; [ "$i" = 3 ] && from=$ro
		"$BIN" clone "$from" "$SCRATCH/ct$i" >"$SCRATCH/clone.out" || die "clone $i"
		log "$(head -1 "$SCRATCH/clone.out")"
		dev=$("$BIN" add --image "$SCRATCH/ct$i") || die "serving clone $i beside the others"
		wait_dev "$dev"; ids="$ids $(dev_id "$dev")"
		mkdir -p "$mnt$i"; mount "$dev" "$mnt$i"
		check_sums "$mnt$i" T
		mkdir "$mnt$i/own"; head -c 8M /dev/urandom >"$mnt$i/own/f"
		sums_of "$mnt$i" "own/*" "own$i"
	done
	"$BIN" snapshot-list -n "${ids##* }" | grep -q "(shared, read-only)" || die "snapshot-list does not show the shared template"
	# Detach the first while mounted and writing.
	local -a idv=($ids)
	head -c 8M /dev/urandom >"$mnt"1/own/g &
	"$BIN" detach -n "${idv[0]}" >"$SCRATCH/detach.out" || { cat "$SCRATCH/detach.out"; die "online detach"; }
	wait
	log "$(cat "$SCRATCH/detach.out")"
	"$BIN" snapshot-list -n "${idv[0]}" | grep -q "shared" && die "the detached clone still reads the template"
	sums_of "$mnt"1 "own/*" own1
	for i in 1 2 3; do
		check_sums "$mnt$i" T; check_sums "$mnt$i" "own$i"
		umount "$mnt$i"; "$BIN" del -n "${idv[$((i - 1))]}"
	done
	[ "$(sha256sum "$t/root.hds" | cut -c1-64)" = "$tsum" ] || die "the template's file changed"
	# ct2 stands on the template's top, stopped: the template is not
	# served read-write under it (its list of clones says so).
	"$BIN" add --image "$t" 2>"$SCRATCH/tmpl.err" && die "the template served read-write under a stopped clone"
	grep -q "stands on it" "$SCRATCH/tmpl.err" || die "serving the template under a clone: $(cat "$SCRATCH/tmpl.err")"
	# The detached clone stands alone: the template goes, it still mounts.
	mv "$t" "$SCRATCH/tmpl.away"
	dev=$("$BIN" add --image "$SCRATCH/ct1") || die "serving the detached clone without its template"
	wait_dev "$dev"; mount "$dev" "$mnt"1
	check_sums "$mnt"1 T; check_sums "$mnt"1 own1
	umount "$mnt"1; "$BIN" del -n "$(dev_id "$dev")"
	check_disk "$SCRATCH/ct1"
	"$BIN" add --image "$SCRATCH/ct2" 2>/dev/null && die "a clone served without its template"
	umount "$ro"; rmdir "$ro"
	rm -rf "$SCRATCH/tmpl.away" "$t"
	log "3 clones served at once over one template (one through a read-only mount); one detached online and served alone"
}

# A cloud image as a container's base (#22): the filesystem inside a
# compressed QCOW2 image made by qemu-img mounts through a ploop top with
# no mkfs, writes land in the top, fsck is clean, the image never changes;
# then a disk directory cloned from it takes an online snapshot, merge and
# detach. On 7.x this is the zero-copy path: inflated clusters reach the
# request's pages through the ring.
scenario_qcow2_base() {
	local raw=$SCRATCH/fs.raw q=$SCRATCH/cloud.qcow2 mnt=/mnt/qcow2
	truncate -s 128M "$raw"
	dev=$("$BIN" add --image "$raw" --format raw); wait_dev "$dev"
	mkfs.ext4 -q -F "$dev"
	mkdir -p "$mnt"; mount "$dev" "$mnt"
	mkdir "$mnt/T"; for i in 1 2 3; do head -c 4M /dev/urandom >"$mnt/T/t$i"; done
	seq 1 200000 >"$mnt/T/text"
	sums_of "$mnt" "T/*" T
	umount "$mnt"; "$BIN" del -n "$(dev_id "$dev")"
	qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=65536 "$raw" "$q"
	rm "$raw"
	local qsum; qsum=$(sha256sum "$q" | cut -c1-64)
	"$BIN" create "$SCRATCH/top.hds" --size 128M >/dev/null
	dev=$("$BIN" add --image "$q" --image "$SCRATCH/top.hds" --format qcow2 --format ploop) || die "serving a QCOW2 base"
	wait_dev "$dev"
	e2fsck -fn "$dev" >/dev/null || die "fsck of the image's filesystem through the stack"
	mount "$dev" "$mnt"; check_sums "$mnt" T
	mkdir "$mnt/own"; head -c 16M /dev/urandom >"$mnt/own/f"; sums_of "$mnt" "own/*" own
	"$BIN" status -n "$(dev_id "$dev")" >"$SCRATCH/status.out"
	grep -q "caches: L2 tables" "$SCRATCH/status.out" || { cat "$SCRATCH/status.out"; die "status shows no QCOW2 caches"; }
	log "$(grep "data path\|caches" "$SCRATCH/status.out" | tr -s ' ' | tr '\n' ';')"
	umount "$mnt"; "$BIN" del -n "$(dev_id "$dev")"
	dev=$("$BIN" add --image "$q" --image "$SCRATCH/top.hds" --format qcow2 --format ploop); wait_dev "$dev"
	e2fsck -fn "$dev" >/dev/null || die "fsck after writes"
	mount "$dev" "$mnt"; check_sums "$mnt" T; check_sums "$mnt" own
	umount "$mnt"; "$BIN" del -n "$(dev_id "$dev")"
	"$BIN" check "$SCRATCH/top.hds" || die "check of the top"
	qemu_check "$SCRATCH/top.hds"
	# A disk directory over the image: snapshot, merge and detach online.
	"$BIN" clone "$q" "$SCRATCH/ctq" --format qcow2 >/dev/null || die "clone of a QCOW2 image"
	dev=$("$BIN" add --image "$SCRATCH/ctq"); wait_dev "$dev"
	local id; id=$(dev_id "$dev")
	mount "$dev" "$mnt"; check_sums "$mnt" T
	mkdir "$mnt/own"; head -c 8M /dev/urandom >"$mnt/own/f"
	snapshot_frozen "$mnt" "$id"
	head -c 8M /dev/urandom >"$mnt/own/g"; sums_of "$mnt" "own/*" own
	"$BIN" snapshot-merge -n "$id" >/dev/null || die "online merge over a QCOW2 base"
	"$BIN" detach -n "$id" >"$SCRATCH/detach.out" || { cat "$SCRATCH/detach.out"; die "online detach from a QCOW2 image"; }
	log "$(cat "$SCRATCH/detach.out")"
	umount "$mnt"; "$BIN" del -n "$id"
	check_disk "$SCRATCH/ctq"
	[ "$(sha256sum "$q" | cut -c1-64)" = "$qsum" ] || die "the QCOW2 image changed"
	mv "$q" "$q.away"
	dev=$("$BIN" add --image "$SCRATCH/ctq") || die "serving the detached disk without the image"
	wait_dev "$dev"; e2fsck -fn "$dev" >/dev/null || die "fsck of the detached disk"
	mount "$dev" "$mnt"; check_sums "$mnt" T; check_sums "$mnt" own
	umount "$mnt"; "$BIN" del -n "$(dev_id "$dev")"
	rm -rf "$SCRATCH/ctq" "$q.away" "$SCRATCH/top.hds"
	log "a filesystem in a compressed QCOW2 image served under ploop tops, cloned, detached online; the image unchanged"
}

old_cmp_at() { # file offset_mb count_mb
	dd if="$dev" bs=1M skip="$2" count="$3" iflag=direct status=none | cmp - "$1" || die "the device at ${2} MiB does not read back $1"
}
old_fill() { # name offset_mb count_mb
	head -c "$(($3 << 20))" /dev/urandom >"$SCRATCH/old.$1"
	dd if="$SCRATCH/old.$1" of="$dev" bs=1M seek="$2" oflag=direct conv=notrunc status=none
}
old_sum() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -c1-64; }

scenario_old_cli() {
	local OLD=${UBLK_PLOOP_OLD_BIN:-} d=$SCRATCH/old.disk dev id out snap1 snap2 snap3 sum dev2
	[ -n "$OLD" ] || die "no old CLI to test with: UBLK_PLOOP_OLD_BIN is unset (tests/vm/old-cli builds one, as .ci/run does)"
	[ -x "$OLD" ] || die "no usable old CLI: $OLD"
	log "old CLI: $("$OLD" --version) ($OLD), new daemon: $("$BIN" --version)"
	"$BIN" init "$d" --size 128M >/dev/null
	dev=$("$BIN" add --image "$d"); wait_dev "$dev"; id=$(dev_id "$dev")

	"$OLD" status -n "$id" >"$SCRATCH/old.out" || die "old status"
	grep -q "^/dev/ublkb$id (pid $(daemon_pid "$id")), $((128 << 20)) bytes" "$SCRATCH/old.out" || die "old status: $(cat "$SCRATCH/old.out")"
	"$OLD" status -n "$id" --json | tr -d ' \n' | grep -q "\"id\":$id," || die "old status --json"

	# Snapshots, a merge of the top and a delete that merges: the data
	# written between them reads back after each.
	old_fill a 0 8
	snap1=$("$OLD" snapshot -n "$id" 2>/dev/null) || die "old snapshot"
	old_fill b 16 8
	snap2='{0001dc11-0000-4000-8000-000000000002}'
	"$OLD" snapshot -n "$id" --uuid "$snap2" --json | tr -d ' \n' | grep -q "\"guid\":\"$snap2\"" || die "old snapshot --uuid --json"
	old_fill c 32 8
	"$OLD" snapshot-list -n "$id" | grep -q -- "$snap1" || die "old snapshot-list"
	[ "$("$OLD" snapshot-list -n "$id" --json | grep -c '"guid"')" = 3 ] || die "old snapshot-list --json: not three deltas"
	"$OLD" snapshot-merge -n "$id" >"$SCRATCH/old.out" || die "old snapshot-merge"
	grep -q "^merged .* into its parent $snap2" "$SCRATCH/old.out" || die "old snapshot-merge said: $(cat "$SCRATCH/old.out")"
	"$OLD" snapshot-list -n "$id" --json | grep -q -- "$snap2" && die "the merged parent $snap2 is still listed"
	old_cmp_at "$SCRATCH/old.a" 0 8; old_cmp_at "$SCRATCH/old.b" 16 8; old_cmp_at "$SCRATCH/old.c" 32 8
	"$OLD" snapshot-delete -n "$id" --uuid "$snap1" --json | tr -d ' \n' | grep -q '"action":"merged"' || die "old snapshot-delete (a merge)"
	"$OLD" snapshot-list -n "$id" --json | grep -q -- "$snap1" && die "the deleted $snap1 is still listed"
	old_cmp_at "$SCRATCH/old.a" 0 8; old_cmp_at "$SCRATCH/old.b" 16 8; old_cmp_at "$SCRATCH/old.c" 32 8
	"$OLD" snapshot-delete -n "$id" --uuid "$snap1" 2>/dev/null && die "deleting a snapshot twice succeeded"

	# Switch back: what was written after the snapshot is gone.
	snap3=$("$OLD" snapshot -n "$id" 2>/dev/null) || die "old snapshot (3)"
	old_fill d 0 8
	"$OLD" snapshot-switch -n "$id" --uuid "$snap3" >/dev/null || die "old snapshot-switch"
	old_cmp_at "$SCRATCH/old.a" 0 8; old_cmp_at "$SCRATCH/old.c" 32 8

	# The write tracker.
	"$OLD" track start -n "$id" >/dev/null || die "old track start"
	dd if=/dev/urandom of="$dev" bs=4k count=1 seek=$((100 * 256 + 3)) oflag=direct status=none
	out=$("$OLD" track get -n "$id" 2>/dev/null) || die "old track get"
	[ "$out" = "$((100 << 20)) $((101 << 20))" ] || die "old track get: '$out'"
	"$OLD" track stop -n "$id" --json | tr -d ' \n' | grep -q '"ranges":\[\]' || die "old track stop --json"
	"$OLD" track get -n "$id" 2>/dev/null && die "old track get after stop succeeded"

	# Copies: to a file, to stdout (the descriptor passed is a pipe), and
	# backups full then incremental; each received image reads as the device.
	sum=$(old_sum "$dev")
	"$OLD" copy -n "$id" --to "$SCRATCH/old.stream" >/dev/null || die "old copy --to FILE"
	"$BIN" receive --image "$SCRATCH/old-file.hdd" --from "$SCRATCH/old.stream" >/dev/null || die "receiving the old CLI's copy"
	rm -f "$SCRATCH/old.stream"
	"$OLD" copy -n "$id" --to - --json 2>"$SCRATCH/old.json" | "$BIN" receive --image "$SCRATCH/old-pipe.hdd" >/dev/null \
		|| { cat "$SCRATCH/old.json"; die "old copy --to - into a pipe"; }
	grep -q '"device": "/dev/ublkb'"$id"'"' "$SCRATCH/old.json" || die "old copy --json: $(cat "$SCRATCH/old.json")"
	"$OLD" backup -n "$id" --to "$SCRATCH/old.full" >/dev/null || die "old backup"
	"$BIN" receive --image "$SCRATCH/old-backup.hdd" --from "$SCRATCH/old.full" >/dev/null || die "receiving the old CLI's backup"
	rm -f "$SCRATCH/old.full"
	old_fill e 64 4
	"$OLD" backup -n "$id" --incremental --to "$SCRATCH/old.incr" >/dev/null || die "old backup --incremental"
	"$BIN" receive --image "$SCRATCH/old-backup.hdd" --incremental --from "$SCRATCH/old.incr" >/dev/null || die "receiving the old CLI's incremental backup"
	rm -f "$SCRATCH/old.incr"
	for img in old-file old-pipe old-backup; do
		dev2=$("$BIN" add --image "$SCRATCH/$img.hdd" --read-only); wait_dev "$dev2"
		if [ "$img" = old-backup ]; then want=$(old_sum "$dev"); else want=$sum; fi
		[ "$(old_sum "$dev2")" = "$want" ] || die "$img does not read as the device did"
		"$BIN" del -n "$(dev_id "$dev2")"
		rm -f "$SCRATCH/$img.hdd"
	done

	# Compact and an online grow (or the refusal of a kernel without
	# UPDATE_SIZE: the same from the old CLI as from the new).
	blkdiscard -o $((32 << 20)) -l $((8 << 20)) "$dev"
	"$OLD" compact -n "$id" >"$SCRATCH/old.out" || die "old compact"
	grep -q "^compacted: " "$SCRATCH/old.out" || die "old compact said: $(cat "$SCRATCH/old.out")"
	old_cmp_at "$SCRATCH/old.a" 0 8
	if out=$("$OLD" resize -n "$id" --size 192M 2>&1); then
		[ "$(blockdev --getsize64 "$dev")" = $((192 << 20)) ] || die "old resize: the device did not grow"
	else
		new=$("$BIN" resize -n "$id" --size 192M 2>&1) && die "the new CLI grew what the old could not"
		[ "$out" = "$new" ] || die "old and new CLI refuse the grow differently: '$out' / '$new'"
		log "online grow refused alike by both CLIs: $out"
	fi
	old_cmp_at "$SCRATCH/old.a" 0 8

	# A refusal keeps its exit code and message: switching to an unknown snapshot.
	out=$("$OLD" snapshot-switch -n "$id" --uuid '{00000000-0000-4000-8000-0000000000aa}' 2>&1) && die "old switch to an unknown snapshot succeeded"
	new=$("$BIN" snapshot-switch -n "$id" --uuid '{00000000-0000-4000-8000-0000000000aa}' 2>&1) && die "new switch to an unknown snapshot succeeded"
	[ "$out" = "$new" ] || die "refusals differ: '$out' / '$new'"

	"$OLD" del -n "$id" || die "old del"
	[ ! -e "$dev" ] || die "$dev still exists after the old CLI's del"
	"$BIN" check "$d" >/dev/null || die "check after the old CLI's session"
	rm -rf "$SCRATCH"/old.* "$d"
}

if [ "${1:-}" = --scenario ]; then
	SCENARIO=$2
	set -Eeo pipefail
	# A command that fails outside a `|| die` ends the scenario too: say
	# which, so that a failure in CI is never only "FAIL name".
	# (Not in command substitutions: their failures may be allowed.)
	trap 'e2e_rc=$?; [ "$BASH_SUBSHELL" != 0 ] || { log "stopped at line $LINENO by \`$BASH_COMMAND\` (exit $e2e_rc)"; echo "$SCENARIO: stopped at line $LINENO by \`$BASH_COMMAND\` (exit $e2e_rc)" | cut -c1-600 >>"$WHY"; }' ERR
	"scenario_$2"
	exit 0
fi

[ -x "$BIN" ] || { echo "e2e: $BIN not built (cargo build --release)"; exit 2; }
[ -c /dev/ublk-control ] || { echo "e2e: no /dev/ublk-control: run inside the VM (tests/vm/run $0)"; exit 2; }
pass=0 fail=0 failed=""
for s in ${*:-$ALL}; do
	start=$(date +%s)
	if "$0" --scenario "$s"; then
		pass=$((pass + 1)); log "PASS $s ($(($(date +%s) - start)) s)"
	else
		fail=$((fail + 1)); failed="$failed $s"; log "FAIL $s ($(($(date +%s) - start)) s)"
		"$BIN" del --all --force >/dev/null 2>&1 || true
		umount /mnt/* >/dev/null 2>&1 || true
	fi
	rm -rf "$SCRATCH"/*.hdd "$SCRATCH"/pat.* "$SCRATCH"/read.* "$SCRATCH"/sums.* "$SCRATCH"/ct*
done
[ -z "$failed" ] || { log "failed:$failed"; [ ! -s "$WHY" ] || sed 's/^/e2e: why: /' "$WHY"; }
rm -f "$WHY"
echo "e2e: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
