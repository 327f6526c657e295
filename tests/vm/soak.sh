#!/bin/bash
# Soak, inside the VM: 8 devices (plain images, disk directories taking
# snapshots, stacks of files), 2 queues each, fio writing and verifying on
# all of them round after round, with del/add, snapshots and a daemon kill
# between the rounds. Every round's data is verified after the disruptions
# (fio --verify_only with the round's seed); daemons that were never
# restarted are watched for memory, descriptor and thread growth.
#   tests/vm/run tests/vm/soak.sh [ROUNDS] [MIB_PER_DEVICE_PER_ROUND]
# (default 3 rounds of 16 MiB of 4k random writes per device: CI's short
# version; `soak.sh 30 32` runs for a good while under emulation).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN=${UBLK_PLOOP_BIN:-$repo/target/release/ublk-ploop}
SCRATCH=${UBLK_PLOOP_SCRATCH:?run this inside the VM: tests/vm/run $0}
ROUNDS=${1:-3}
MB=${2:-16}
log() { echo "soak: $*"; }
die() { log "FAIL: $*"; exit 1; }
# shellcheck source=tests/vm/lib.sh
. "$here/lib.sh"
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status"; }
# The daemon's own threads: control clients get one each that ends with the
# connection (let the last one finish), and io_uring's kernel workers
# (iou-wrk-*) come and go with the kernel's load, so they are not counted.
threads() { sleep 1; cat /proc/"$1"/task/*/comm | grep -vc '^iou-'; }
fds() { ls "/proc/$1/fd" | wc -l; }

SIZE=96M
declare -A what
# Devices 10-13: plain images; 14-15: disk directories; 16-17: stacks.
for i in 10 11 12 13; do
	"$BIN" create "$SCRATCH/soak$i.hdd" --size $SIZE >/dev/null
	what[$i]="--image $SCRATCH/soak$i.hdd"
done
for i in 14 15; do
	"$BIN" init "$SCRATCH/soak$i" --size $SIZE >/dev/null
	what[$i]="--image $SCRATCH/soak$i"
done
for i in 16 17; do
	"$BIN" create "$SCRATCH/soak$i.base" --size $SIZE >/dev/null
	"$BIN" create "$SCRATCH/soak$i.top" --size $SIZE >/dev/null
	what[$i]="--image $SCRATCH/soak$i.base --image $SCRATCH/soak$i.top"
done
ALL="10 11 12 13 14 15 16 17"
# Copy-ups through the link log (the default) on the disk directories (a
# snapshot every round makes later writes copy clusters up) and on one
# stack; 16 syncs each copy-up before its acknowledgement.
what[16]="${what[16]} --no-link-log"
# Never restarted: watched for growth, with a queue depth of 16 so that the
# warm-up below can put every tag's buffer to use.
WATCH="11 13"
what[11]="${what[11]} --depth 16"
what[13]="${what[13]} --depth 16"
for i in $ALL; do
	# shellcheck disable=SC2086
	"$BIN" add ${what[$i]} --id "$i" --queues 2 >/dev/null
	wait_dev "/dev/ublkb$i"
done
declare -A pid rss0 fd0 th0
for i in $WATCH; do pid[$i]=$(daemon_pid "$i"); done
watch_start() {
	for i in $WATCH; do
		p=${pid[$i]}; rss0[$i]=$(rss_kb "$p"); fd0[$i]=$(fds "$p"); th0[$i]=$(threads "$p")
	done
}

fio_all() { # round extra-args...
	local round=$1 args=""
	shift
	for i in $ALL; do args="$args --name=d$i --filename=/dev/ublkb$i"; done
	# shellcheck disable=SC2086
	fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size="${MB}M" --offset=$(( (round % 2) * 48 ))M \
		--verify=crc32c --randseed=$((1000 + round)) --output="$SCRATCH/soak-fio.$round" "$@" $args >/dev/null 2>&1
}

# Each tag's I/O buffer (1 MiB in copy mode) is touched lazily, as the
# kernel sends larger requests: use every buffer at full size once on
# both queues (64 requests per queue wait for 16 tags), so that what grows
# after this is the daemon's own.
for i in $WATCH; do
	fio --name=warm --filename=/dev/ublkb$i --ioengine=io_uring --direct=1 --rw=read --bs=1M \
		--iodepth=64 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --size=$SIZE >/dev/null 2>&1 \
		|| die "warming up device $i"
done
watch_start
for i in $WATCH; do log "device $i (pid ${pid[$i]}) after warm-up: rss ${rss0[$i]} KiB, fds ${fd0[$i]}, threads ${th0[$i]}"; done

for round in $(seq 1 "$ROUNDS"); do
	log "round $round: $MB MiB of 4k random writes on each of $ALL"
	t0=$SECONDS
	# While fio writes: a snapshot of each disk directory and a kill -9 of
	# a stack's daemon and of a disk directory's (its copy-ups since the
	# snapshot in the link log), each recovered with its requests in
	# flight (reissued).
	fio_all "$round" --do_verify=0 &
	fio_pid=$!
	sleep 3
	for i in 14 15; do "$BIN" snapshot -n "$i" >/dev/null; done
	k=$((16 + round % 2)) kd=$((14 + round % 2))
	kill -0 "$fio_pid" 2>/dev/null || die "fio ended before the disruptions: give it more to write"
	logged=$(find /run/ublk-ploop/links -name '*.links' -size +0 2>/dev/null | wc -l)
	kill -9 "$(daemon_pid "$k")" "$(daemon_pid "$kd")"; sleep 0.5
	"$BIN" recover -n "$k" >/dev/null
	"$BIN" recover -n "$kd" >/dev/null
	wait "$fio_pid" || { tail -30 "$SCRATCH/soak-fio.$round"; die "fio writes, round $round"; }
	# Between rounds: a del/add.
	d=$((10 + (round % 2) * 2))
	"$BIN" del -n "$d" >/dev/null
	# shellcheck disable=SC2086
	"$BIN" add ${what[$d]} --id "$d" --queues 2 >/dev/null; wait_dev "/dev/ublkb$d"
	log "round $round: snapshots of 14 15 and kill -9 + recover of $k $kd under fio ($logged link logs with records at the kill), then del/add $d"
	# The round's data, after all that.
	fio_all "$round" --verify_only \
		|| { grep -i -B2 -A5 'verify\|error' "$SCRATCH/soak-fio.$round" | head -40; die "verify after round $round"; }
	errs=$(grep -ci 'verify: bad\|crc32c: verify failed\|err= *[1-9]' "$SCRATCH/soak-fio.$round" || true)
	[ "$errs" = 0 ] || die "$errs verify errors in round $round"
	log "round $round: verified after the disruptions ($((SECONDS - t0)) s)"
	for i in $WATCH; do
		log "round $round: device $i $(grep -E '^(VmRSS|RssAnon|RssFile|VmHWM)' /proc/${pid[$i]}/status | tr -s ' \t\n' ' ')"
	done
done

for i in $WATCH; do
	p=${pid[$i]}
	log "device $i (pid $p): rss ${rss0[$i]} -> $(rss_kb "$p") KiB, fds ${fd0[$i]} -> $(fds "$p"), threads ${th0[$i]} -> $(threads "$p")"
	[ "$(fds "$p")" -le "${fd0[$i]}" ] || die "device $i leaks descriptors"
	[ "$(threads "$p")" -le "${th0[$i]}" ] || die "device $i leaks threads: $(cat /proc/$p/task/*/comm | sort | uniq -c | tr -s ' \n' ' ')"
	[ "$(rss_kb "$p")" -le $(( rss0[$i] + 4096 )) ] || die "device $i grew by more than 4 MiB"
done
for i in $ALL; do "$BIN" del -n "$i" >/dev/null; done
for i in 10 11 12 13; do "$BIN" check "$SCRATCH/soak$i.hdd" >/dev/null || die "check soak$i"; done
for i in 14 15; do "$BIN" check "$SCRATCH/soak$i" >/dev/null || die "check soak$i"; done
for i in 16 17; do
	rc=0; "$BIN" check "$SCRATCH/soak$i.top" >/dev/null || rc=$?
	[ $rc = 0 ] || [ $rc = 3 ] || die "check soak$i.top (exit $rc)"
done
log "PASS: $ROUNDS rounds of $MB MiB per device on 8 devices, 0 verify errors"
