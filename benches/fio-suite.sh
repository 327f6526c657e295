#!/bin/bash
# The fio suite, run where /dev/ublk-control exists (a host with ublk, or
# the test VM): ublk-ploop against a loop device with --direct-io=on and a
# buffered loop device, on the same data; against rublk's loop target (the
# same ublk crossing, zero copy where the kernel has it) on the flat
# states, and against a qcow2 overlay served by qemu-nbd on the 2-layer
# stack, when those tools are present. Prints one line per measurement
# (FIO-ROW, FIO-CACHE, FIO-META: JSON) for benches/fio_report.py; start it
# with benches/fio-suite, which also boots the VM when this host has no ublk.
#
# Matrix: 4k random read/write at QD1 and QD32, 4k 70/30 random mix at
# QD32, 1 MiB sequential read/write at QD4; 1 and 2 queues (fio jobs: the
# loop devices get the same jobs); on an allocated image, a fresh one
# (writes allocate) and a 2-layer stack (full base, empty top: writes copy
# up). Each cell runs UBLK_PLOOP_FIO_RUNS times, the runs interleaved.
# Then the page cache: a buffered fio read through each device, and how
# much of the backing file and of the device sits in the page cache after.
#
# Each row of a user-space server (ublk-ploop, rublk, qemu-nbd) carries its
# CPU time per I/O (cpu_us: the server's user+system time over the run,
# ramp included, divided by the I/Os fio counted at the same rate over the
# ramp), so a per-request cost shows even where the ratio hides it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
. "$here/lib.sh"
BIN=${UBLK_PLOOP_BIN:-$here/../target/release/ublk-ploop}
DIR=${UBLK_PLOOP_SCRATCH:-/var/tmp}/fio-suite
SIZE_MB=${UBLK_PLOOP_FIO_SIZE_MB:-512}
SECS=${UBLK_PLOOP_FIO_SECS:-4}
RUNS=${UBLK_PLOOP_FIO_RUNS:-3}
QUEUES=${UBLK_PLOOP_FIO_QUEUES:-"1 2"}
STATES=${UBLK_PLOOP_FIO_STATES:-"allocated fresh stack"}
# Only the workloads named (e.g. "randwrite-4k-qd1 randwrite-4k-qd32"), and
# only the devices named (of ublk rublk qemu-nbd loop-dio loop-buf).
ONLY_WORKLOADS=${UBLK_PLOOP_FIO_WORKLOADS:-}
ONLY_DEVICES=${UBLK_PLOOP_FIO_DEVICES:-}
# rublk: benches/peers builds it into target/peers.
RUBLK=${UBLK_PLOOP_RUBLK:-$here/../target/peers/bin/rublk}
RUBLK_ID=60
# A/B of two builds: another ublk-ploop binary served as device "ublk-alt"
# beside "ublk", on the same files (e.g. the build before a change).
ALT_BIN=${UBLK_PLOOP_FIO_ALT_BIN:-}
# Extra options for rublk add loop (e.g. "-a" for its async/await path).
RUBLK_ARGS=${UBLK_PLOOP_RUBLK_ARGS:-}
DEPTH=128
RAMP=1

[ -c /dev/ublk-control ] || { echo "fio-suite: no /dev/ublk-control (use benches/fio-suite, which runs this in the VM)" >&2; exit 2; }
for tool in fio losetup fincore python3; do
	command -v "$tool" >/dev/null || { echo "fio-suite: $tool is missing" >&2; exit 2; }
done
mkdir -p "$DIR"
raw=$DIR/full.raw img=$DIR/full.hdd fresh_raw=$DIR/fresh.raw fresh_img=$DIR/fresh.hdd top=$DIR/top.hdd
overlay=$DIR/top.qcow2
size=$((SIZE_MB << 20))

# The peers this guest can run; a missing one is said once, not failed.
have_rublk=0 have_nbd=0
if [ -x "$RUBLK" ]; then have_rublk=1; else echo "fio-suite: no rublk at $RUBLK (benches/peers builds it): no rublk column" >&2; fi
if command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null && { [ -b /dev/nbd0 ] || modprobe nbd 2>/dev/null; } && [ -b /dev/nbd0 ]; then
	have_nbd=1
	mkdir -p /run/lock # qemu-nbd -c takes a lock there
else
	echo "fio-suite: no qemu-nbd or no /dev/nbd0: no qemu-nbd column" >&2
fi

ublk_id="" ublk_bin=$BIN loop_dev="" rublk_on="" nbd_on=""
cleanup() {
	[ -z "$ublk_id" ] || "$ublk_bin" del -n "$ublk_id" >/dev/null 2>&1 || true
	[ -z "$loop_dev" ] || losetup -d "$loop_dev" 2>/dev/null || true
	[ -z "$rublk_on" ] || "$RUBLK" del -n "$RUBLK_ID" >/dev/null 2>&1 || true
	[ -z "$nbd_on" ] || qemu-nbd -d /dev/nbd0 >/dev/null 2>&1 || true
}
trap 'cleanup; rm -rf "$DIR"' EXIT

echo "fio-suite: $SIZE_MB MiB of random data in a raw file and a ploop image" >&2
head -c "$size" /dev/urandom >"$raw"
"$BIN" convert "$raw" "$img" --format raw --to ploop >/dev/null
sync
features=$("$BIN" features --json | tr -d ' \n')
zero_copy=0
[[ $features == *'"data_path":"zero_copy"'* ]] && zero_copy=1
python3 - "$features" "$(uname -r)" "$SIZE_MB" "$SECS" "$RUNS" "$have_rublk" "$have_nbd" <<'PY'
import json, sys
f = json.loads(sys.argv[1])
print("FIO-META " + json.dumps({"kernel": sys.argv[2], "data_path": f.get("data_path"), "size_mb": int(sys.argv[3]),
                                "secs": int(sys.argv[4]), "runs": int(sys.argv[5]), "depth": 128,
                                "rublk": sys.argv[6] == "1", "qemu_nbd": sys.argv[7] == "1"}))
PY

# The files a state's devices read and write: ublk-ploop's layers, the
# raw file of the loop devices and rublk, and qemu-nbd's qcow2 overlay.
# Write rows start from a clean state each time.
prepare() { # state
	case $1 in
	allocated) UBLK_IMAGES=(--image "$img"); LOOP_FILE=$raw ;;
	fresh)
		rm -f "$fresh_img" "$fresh_raw"
		"$BIN" create "$fresh_img" --size "${SIZE_MB}M" >/dev/null
		truncate -s "$size" "$fresh_raw"
		UBLK_IMAGES=(--image "$fresh_img"); LOOP_FILE=$fresh_raw ;;
	stack)
		rm -f "$top" "$overlay"
		"$BIN" create "$top" --size "${SIZE_MB}M" >/dev/null
		# The layered peer: an empty qcow2 overlay of 1 MiB clusters (the
		# ploop top's) over the raw file, copying a cluster up on first write.
		[ "$have_nbd" = 0 ] || qemu-img create -q -f qcow2 -o cluster_size=1M -b "$raw" -F raw "$overlay" "${SIZE_MB}M"
		# A loop device has no layers: it serves the same bytes from the raw file.
		UBLK_IMAGES=(--image "$img" --image "$top"); LOOP_FILE=$raw ;;
	esac
}

# The devices of a state, as far as this guest has them: rublk has no
# layers (flat states), qemu-nbd is the layered peer (the stack).
devices_of() { # state
	local list="ublk"
	[ -z "$ALT_BIN" ] || list+=" ublk-alt"
	if [ "$1" = stack ]; then
		[ "$have_nbd" = 0 ] || list+=" qemu-nbd"
	else
		[ "$have_rublk" = 0 ] || list+=" rublk"
	fi
	list+=" loop-dio loop-buf"
	local d out=""
	for d in $list; do
		[ -z "$ONLY_DEVICES" ] || [[ " $ONLY_DEVICES " == *" $d "* ]] || continue
		out+="$d "
	done
	echo "$out"
}

attach() { # device queues: sets DEV and SERVER (the pids whose CPU counts)
	SERVER=""
	case $1 in
	ublk | ublk-alt)
		ublk_bin=$BIN
		[ "$1" = ublk ] || ublk_bin=$ALT_BIN
		DEV=$("$ublk_bin" add "${UBLK_IMAGES[@]}" --queues "$2" --depth "$DEPTH"); ublk_id=${DEV#/dev/ublkb}
		for _ in $(seq 100); do [ -b "$DEV" ] && break; sleep 0.05; done
		SERVER=$(ublk_server "/dev/ublkc$ublk_id") ;;
	rublk)
		# Its loop target with the same depth, queues and largest request
		# as ours; zero copy when ours has it.
		local zc=()
		[ "$zero_copy" = 0 ] || zc=(-z)
		"$RUBLK" add loop -n "$RUBLK_ID" -q "$2" -d "$DEPTH" -b 1MiB "${zc[@]}" $RUBLK_ARGS -f "$LOOP_FILE" --quiet >/dev/null
		rublk_on=1 DEV=/dev/ublkb$RUBLK_ID
		for _ in $(seq 100); do [ -b "$DEV" ] && break; sleep 0.05; done
		SERVER=$(ublk_server "/dev/ublkc$RUBLK_ID") ;;
	qemu-nbd)
		qemu-nbd -c /dev/nbd0 -f qcow2 --cache=none --aio=io_uring --fork "$overlay"
		nbd_on=1 DEV=/dev/nbd0
		SERVER=$(pgrep -x qemu-nbd | tr '\n' ' ') ;;
	loop-dio) DEV=$(losetup --find --show --direct-io=on "$LOOP_FILE"); loop_dev=$DEV ;;
	loop-buf) DEV=$(losetup --find --show "$LOOP_FILE"); loop_dev=$DEV ;;
	esac
}

detach() {
	cleanup
	ublk_id="" loop_dev="" rublk_on="" nbd_on=""
	# The next device may take the same number: wait until this one is gone.
	for _ in $(seq 100); do [ -b "/dev/ublkb$RUBLK_ID" ] || break; sleep 0.05; done
}

# name rw bs depth: the workloads; the last field is fio's rwmixread.
WORKLOADS="randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 randwrite-4k-qd1:randwrite:4k:1 randwrite-4k-qd32:randwrite:4k:32 randrw70-4k-qd32:randrw:4k:32 read-1m-qd4:read:1m:4 write-1m-qd4:write:1m:4"
writes() { [[ $1 == *write* || $1 == randrw* ]]; }

fio_row() { # run state queues device workload rw bs depth dev
	local run=$1 state=$2 q=$3 device=$4 name=$5 rw=$6 bs=$7 depth=$8 dev=$9 per=$((size / $3))
	local ticks_before="" hz
	hz=$(getconf CLK_TCK)
	[ -z "$SERVER" ] || ticks_before=$(cpu_ticks $SERVER)
	# Terse output read with awk: a python per row costs seconds under
	# emulation. Version 3 has a read block then a write block of the same
	# length; 99.000000%= marks the p99 clat (usec) of each; iops is the
	# block's third field, bandwidth (KiB/s) its second.
	fio --output-format=terse --terse-version=3 --name=j --filename="$dev" --ioengine=io_uring --direct=1 --rw="$rw" --rwmixread=70 \
		--bs="$bs" --iodepth="$depth" --numjobs="$q" --size="$per" --offset_increment="$per" --group_reporting \
		--time_based --runtime="$SECS" --ramp_time="$RAMP" --norandommap --randrepeat=0 2>/dev/null >"$DIR/terse"
	local ticks=-1
	[ -z "$ticks_before" ] || ticks=$(( $(cpu_ticks $SERVER) - ticks_before ))
	awk -F';' -v run="$run" -v state="$state" -v q="$q" -v device="$device" -v name="$name" \
		-v ticks="$ticks" -v hz="$hz" -v secs="$((SECS + RAMP))" '
		$1 == 3 {
			n = 0
			for (i = 1; i <= NF; i++) if ($i ~ /^99\.000000%=/) at[++n] = i
			b = at[2] - at[1]
			iops = $8 + $(8 + b); bw = ($7 + $(7 + b)) * 1024
			r99 = $(at[1]); w99 = $(at[2]); sub(/.*=/, "", r99); sub(/.*=/, "", w99)
			p99 = 0
			if ($8 > 0) p99 = r99
			if ($(8 + b) > 0 && w99 + 0 > p99 + 0) p99 = w99
			cpu = "null"
			if (ticks >= 0 && iops > 0) cpu = sprintf("%.1f", ticks / hz * 1e6 / (iops * secs))
			printf "FIO-ROW {\"run\": %d, \"state\": \"%s\", \"queues\": %d, \"device\": \"%s\", \"workload\": \"%s\", \"iops\": %d, \"bw\": %d, \"p99_us\": %d, \"cpu_us\": %s}\n", run, state, q, device, name, iops, bw, p99, cpu
		}' "$DIR/terse"
}

for run in $(seq 1 "$RUNS"); do
	for state in $STATES; do
		for q in $QUEUES; do
			for w in $WORKLOADS; do
				IFS=: read -r name rw bs depth <<<"$w"
				[ -z "$ONLY_WORKLOADS" ] || [[ " $ONLY_WORKLOADS " == *" $name "* ]] || continue
				# A fresh image has nothing to read.
				[ "$state" = fresh ] && ! writes "$name" && continue
				for device in $(devices_of "$state"); do
					# Every cell starts from the same files (a write row changed them).
					prepare "$state"
					attach "$device" "$q"
					echo "fio-suite: run $run $state q$q $name $device" >&2
					fio_row "$run" "$state" "$q" "$device" "$name" "$rw" "$bs" "$depth" "$DEV"
					detach
				done
			done
		done
	done
done

# Double caching: a buffered sequential read of the working set through
# each device; afterwards, what of the backing file and of the device is in
# the page cache. ublk-ploop and loop with direct I/O should leave the file
# out of it; a buffered loop device caches everything twice.
prepare allocated
ws=$((size / 2))
for device in ublk loop-dio loop-buf; do
	attach "$device" 1
	dev=$DEV
	sync; echo 3 >/proc/sys/vm/drop_caches
	# A block device's page cache is counted as Buffers in /proc/meminfo,
	# file pages as Cached.
	mem() { awk -v k="$1:" '$1 == k {print $2 * 1024}' /proc/meminfo; }
	buffers=$(mem Buffers) cached=$(mem Cached)
	fio --name=c --filename="$dev" --ioengine=psync --direct=0 --rw=read --bs=1m --size="$ws" >/dev/null 2>&1
	dev_cached=$(( $(mem Buffers) - buffers )) files_grown=$(( $(mem Cached) - cached ))
	file=$raw; [ "$device" = ublk ] && file=$img
	file_cached=$(fincore --bytes --noheadings --output RES "$file" | tr -d ' ')
	echo "FIO-CACHE {\"device\": \"$device\", \"working_set\": $ws, \"file_cached\": ${file_cached:-0}, \"device_cached\": $dev_cached, \"file_pages_grown\": $files_grown}"
	detach
done
echo "fio-suite: done" >&2
