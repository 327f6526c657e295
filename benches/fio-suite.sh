#!/bin/bash
# The fio suite, run where /dev/ublk-control exists (a host with ublk, or
# the test VM): ublk-ploop against a loop device with --direct-io=on and a
# buffered loop device, on the same data. Prints one line per measurement
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
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${UBLK_PLOOP_BIN:-$here/../target/release/ublk-ploop}
DIR=${UBLK_PLOOP_SCRATCH:-/var/tmp}/fio-suite
SIZE_MB=${UBLK_PLOOP_FIO_SIZE_MB:-512}
SECS=${UBLK_PLOOP_FIO_SECS:-4}
RUNS=${UBLK_PLOOP_FIO_RUNS:-3}
QUEUES=${UBLK_PLOOP_FIO_QUEUES:-"1 2"}
STATES=${UBLK_PLOOP_FIO_STATES:-"allocated fresh stack"}
DEPTH=128

[ -c /dev/ublk-control ] || { echo "fio-suite: no /dev/ublk-control (use benches/fio-suite, which runs this in the VM)" >&2; exit 2; }
for tool in fio losetup fincore python3; do
	command -v "$tool" >/dev/null || { echo "fio-suite: $tool is missing" >&2; exit 2; }
done
mkdir -p "$DIR"
raw=$DIR/full.raw img=$DIR/full.hdd fresh_raw=$DIR/fresh.raw fresh_img=$DIR/fresh.hdd top=$DIR/top.hdd
size=$((SIZE_MB << 20))

ublk_id="" loop_dev=""
cleanup() {
	[ -z "$ublk_id" ] || "$BIN" del -n "$ublk_id" >/dev/null 2>&1 || true
	[ -z "$loop_dev" ] || losetup -d "$loop_dev" 2>/dev/null || true
}
trap 'cleanup; rm -rf "$DIR"' EXIT

echo "fio-suite: $SIZE_MB MiB of random data in a raw file and a ploop image" >&2
head -c "$size" /dev/urandom >"$raw"
"$BIN" convert "$raw" "$img" --format raw --to ploop >/dev/null
sync
features=$("$BIN" features --json | tr -d ' \n')
python3 - "$features" "$(uname -r)" "$SIZE_MB" "$SECS" "$RUNS" <<'PY'
import json, sys
f = json.loads(sys.argv[1])
print("FIO-META " + json.dumps({"kernel": sys.argv[2], "data_path": f.get("data_path"), "size_mb": int(sys.argv[3]),
                                "secs": int(sys.argv[4]), "runs": int(sys.argv[5]), "depth": 128}))
PY

# The files a state's devices read and write: ublk-ploop's layers and the
# loop devices' raw file. Write rows start from a clean state each time.
prepare() { # state
	case $1 in
	allocated) UBLK_IMAGES=(--image "$img"); LOOP_FILE=$raw ;;
	fresh)
		rm -f "$fresh_img" "$fresh_raw"
		"$BIN" create "$fresh_img" --size "${SIZE_MB}M" >/dev/null
		truncate -s "$size" "$fresh_raw"
		UBLK_IMAGES=(--image "$fresh_img"); LOOP_FILE=$fresh_raw ;;
	stack)
		rm -f "$top"
		"$BIN" create "$top" --size "${SIZE_MB}M" >/dev/null
		# A loop device has no layers: it serves the same bytes from the raw file.
		UBLK_IMAGES=(--image "$img" --image "$top"); LOOP_FILE=$raw ;;
	esac
}

attach() { # device queues: sets DEV
	case $1 in
	ublk) DEV=$("$BIN" add "${UBLK_IMAGES[@]}" --queues "$2" --depth "$DEPTH"); ublk_id=${DEV#/dev/ublkb}
		for _ in $(seq 100); do [ -b "$DEV" ] && break; sleep 0.05; done ;;
	loop-dio) DEV=$(losetup --find --show --direct-io=on "$LOOP_FILE"); loop_dev=$DEV ;;
	loop-buf) DEV=$(losetup --find --show "$LOOP_FILE"); loop_dev=$DEV ;;
	esac
}

detach() {
	cleanup
	ublk_id="" loop_dev=""
}

# name rw bs depth: the workloads; the last field is fio's rwmixread.
WORKLOADS="randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 randwrite-4k-qd1:randwrite:4k:1 randwrite-4k-qd32:randwrite:4k:32 randrw70-4k-qd32:randrw:4k:32 read-1m-qd4:read:1m:4 write-1m-qd4:write:1m:4"
writes() { [[ $1 == *write* || $1 == randrw* ]]; }

fio_row() { # run state queues device workload rw bs depth dev
	local run=$1 state=$2 q=$3 device=$4 name=$5 rw=$6 bs=$7 depth=$8 dev=$9 per=$((size / $3))
	# Terse output read with awk: a python per row costs seconds under
	# emulation. Version 3 has a read block then a write block of the same
	# length; 99.000000%= marks the p99 clat (usec) of each; iops is the
	# block's third field, bandwidth (KiB/s) its second.
	fio --output-format=terse --terse-version=3 --name=j --filename="$dev" --ioengine=io_uring --direct=1 --rw="$rw" --rwmixread=70 \
		--bs="$bs" --iodepth="$depth" --numjobs="$q" --size="$per" --offset_increment="$per" --group_reporting \
		--time_based --runtime="$SECS" --ramp_time=1 --norandommap --randrepeat=0 2>/dev/null |
		awk -F';' -v run="$run" -v state="$state" -v q="$q" -v device="$device" -v name="$name" '
		$1 == 3 {
			n = 0
			for (i = 1; i <= NF; i++) if ($i ~ /^99\.000000%=/) at[++n] = i
			b = at[2] - at[1]
			iops = $8 + $(8 + b); bw = ($7 + $(7 + b)) * 1024
			r99 = $(at[1]); w99 = $(at[2]); sub(/.*=/, "", r99); sub(/.*=/, "", w99)
			p99 = 0
			if ($8 > 0) p99 = r99
			if ($(8 + b) > 0 && w99 + 0 > p99 + 0) p99 = w99
			printf "FIO-ROW {\"run\": %d, \"state\": \"%s\", \"queues\": %d, \"device\": \"%s\", \"workload\": \"%s\", \"iops\": %d, \"bw\": %d, \"p99_us\": %d}\n", run, state, q, device, name, iops, bw, p99
		}'
}

for run in $(seq 1 "$RUNS"); do
	for state in $STATES; do
		for q in $QUEUES; do
			for w in $WORKLOADS; do
				IFS=: read -r name rw bs depth <<<"$w"
				# A fresh image has nothing to read.
				[ "$state" = fresh ] && ! writes "$name" && continue
				for device in ublk loop-dio loop-buf; do
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
