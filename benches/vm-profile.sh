#!/bin/bash
# Where a request's CPU goes in the daemon, beside rublk's loop target on
# the same file and workload: perf samples each server's process (all its
# threads, kernel and user) while fio drives its device, and prints the
# top symbols and the CPU per I/O. Needs a kernel with ublk; in the VM:
#   cargo build --release && benches/peers && tests/vm/run --kernel 7 benches/vm-profile.sh
# Knobs: UBLK_PLOOP_PROFILE_RW (randwrite), UBLK_PLOOP_PROFILE_QD (32),
# UBLK_PLOOP_PROFILE_SECS (8), UBLK_PLOOP_PROFILE_TOP (30 symbols).
# Under emulation the split between symbols is what means something.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
BIN=${UBLK_PLOOP_BIN:-$here/../target/release/ublk-ploop}
RUBLK=${UBLK_PLOOP_RUBLK:-$here/../target/peers/bin/rublk}
DIR=${UBLK_PLOOP_SCRATCH:-/var/tmp}/vm-profile
RW=${UBLK_PLOOP_PROFILE_RW:-randwrite}
QD=${UBLK_PLOOP_PROFILE_QD:-32}
SECS=${UBLK_PLOOP_PROFILE_SECS:-8}
TOP=${UBLK_PLOOP_PROFILE_TOP:-30}
SIZE_MB=256
for tool in fio perf; do
	command -v "$tool" >/dev/null || { echo "vm-profile: $tool is missing" >&2; exit 2; }
done
mkdir -p "$DIR"
raw=$DIR/disk.raw img=$DIR/disk.hdd
ublk_id="" rublk_id=61
cleanup() {
	[ -z "$ublk_id" ] || "$BIN" del -n "$ublk_id" >/dev/null 2>&1 || true
	[ -x "$RUBLK" ] && "$RUBLK" del -n "$rublk_id" >/dev/null 2>&1 || true
	rm -rf "$DIR"
}
trap cleanup EXIT
head -c "$((SIZE_MB << 20))" /dev/urandom >"$raw"
"$BIN" convert "$raw" "$img" --format raw --to ploop >/dev/null
sync


profile() { # name device pid
	local name=$1 dev=$2 pid=$3 t0 t1 ios
	t0=$(cpu_ticks "$pid")
	fio --name=p --filename="$dev" --ioengine=io_uring --direct=1 --rw="$RW" --bs=4k --iodepth="$QD" \
		--time_based --runtime="$SECS" --norandommap --randrepeat=0 --output-format=terse --terse-version=3 >"$DIR/$name.fio" 2>/dev/null &
	local fio_pid=$!
	sleep 1
	perf record -q -e cpu-clock -F 1000 -g -p "$pid" -o "$DIR/$name.perf" -- sleep "$((SECS - 2))" >/dev/null 2>&1 || true
	wait "$fio_pid"
	t1=$(cpu_ticks "$pid")
	# Terse v3: read iops field 8, write iops field 49.
	ios=$(awk -F';' '{print ($8 + $49) * '"$SECS"'}' "$DIR/$name.fio")
	echo "== $name: $RW 4k QD$QD: $(awk -F';' '{print $8 + $49}' "$DIR/$name.fio") IOPS, CPU per I/O $(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$ios" 'BEGIN {printf "%.0f", t / hz * 1e6 / n}') us"
	echo "-- by binary"
	# awk, not head: head would end the pipe early, and pipefail fails on that.
	perf report -i "$DIR/$name.perf" --no-children --sort dso --stdio -g none 2>/dev/null | awk '/%/ && n++ < 6' 
	echo "-- top $TOP symbols"
	perf report -i "$DIR/$name.perf" --no-children --sort sym --stdio -g none 2>/dev/null | awk -v top="$TOP" '/%/ && n++ < top' 
}

dev=$("$BIN" add --image "$img" --queues 1 --depth 128)
ublk_id=${dev#/dev/ublkb}
for _ in $(seq 100); do [ -b "$dev" ] && break; sleep 0.05; done
profile ublk-ploop "$dev" "$(ublk_server "/dev/ublkc$ublk_id")"
"$BIN" del -n "$ublk_id" >/dev/null
ublk_id=""

if [ -x "$RUBLK" ]; then
	zc=()
	"$BIN" features --json | tr -d ' \n' | grep -q '"data_path":"zero_copy"' && zc=(-z)
	"$RUBLK" add loop -n "$rublk_id" -q 1 -d 128 -b 1MiB "${zc[@]}" -f "$raw" --quiet >/dev/null
	for _ in $(seq 100); do [ -b "/dev/ublkb$rublk_id" ] && break; sleep 0.05; done
	profile rublk "/dev/ublkb$rublk_id" "$(ublk_server "/dev/ublkc$rublk_id")"
	"$RUBLK" del -n "$rublk_id" >/dev/null
else
	echo "vm-profile: no rublk at $RUBLK (benches/peers builds it)" >&2
fi
