#!/bin/bash
# fio: ublk-ploop against a kernel loop device (--direct-io=on) holding the
# same data. Needs a kernel with ublk: run it in the test VM with
#   cargo build --release && tests/vm/run benches/vm-loop.sh
# Under software emulation only the ratios mean anything.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${UBLK_PLOOP_BIN:-$here/../target/release/ublk-ploop}
DIR=${UBLK_PLOOP_SCRATCH:-/var/tmp}/vm-loop
SIZE_MB=${UBLK_PLOOP_LOOP_SIZE_MB:-512}
SECS=${UBLK_PLOOP_LOOP_SECS:-8}
mkdir -p "$DIR"
raw=$DIR/disk.raw img=$DIR/disk.hdd

echo "== data: $SIZE_MB MiB of random bytes in a raw file and a ploop image"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$raw"
"$BIN" convert "$raw" "$img" --format raw --to ploop >/dev/null
sync

iops() { sed -n 's/.*IOPS=\([0-9.k]*\).*/\1/p' | head -1 | awk '/k$/ {sub("k",""); print $1*1000; next} {print $1}'; }
run_fio() { # dev rw bs depth
	fio --name=b --filename="$1" --ioengine=io_uring --direct=1 --rw="$2" --bs="$3" --iodepth="$4" \
		--time_based --runtime="$SECS" --norandommap --randrepeat=0 --output-format=normal 2>/dev/null | iops
}
ublk=$("$BIN" add --image "$img" --queues 1 --depth 64)
loop=$(losetup --find --show --direct-io=on "$raw")
trap '"$BIN" del -n "${ublk#/dev/ublkb}" >/dev/null 2>&1; losetup -d "$loop" 2>/dev/null; rm -rf "$DIR"' EXIT

printf '%-26s %12s %12s %8s\n' workload "ublk-ploop" "loop(dio)" ratio
for w in "randread 4k 32" "randwrite 4k 32" "read 1M 4" "write 1M 4"; do
	set -- $w
	u=$(run_fio "$ublk" "$1" "$2" "$3")
	l=$(run_fio "$loop" "$1" "$2" "$3")
	printf '%-26s %12s %12s %8s\n' "$1 $2 QD$3 (IOPS)" "$u" "$l" "$(awk -v a="$u" -v b="$l" 'BEGIN {printf "%.2f", a / b}')"
done

# Head-of-line blocking on one queue: 4k random reads (QD16) of a full base
# under an empty top, alone and beside a job of 4k random writes whose
# first write to each cluster copies 1 MiB up. Before the engine ran its
# allocations on the queue's ring, a copy-up stalled every request of the
# queue (measured in this VM: 13.3k IOPS alone, 3.0k beside the writer).
echo "== head-of-line: one queue, full base + empty top"
top=$DIR/top.hdd
"$BIN" create "$top" --size "${SIZE_MB}M" >/dev/null
"$BIN" del -n "${ublk#/dev/ublkb}" >/dev/null
ublk=$("$BIN" add --image "$img" --image "$top" --queues 1 --depth 64)
alone=$(run_fio "$ublk" randread 4k 16)
beside=$(fio --ioengine=io_uring --direct=1 --time_based --runtime="$SECS" --norandommap --randrepeat=0 \
	--filename="$ublk" --output-format=normal \
	--name=reads --rw=randread --bs=4k --iodepth=16 \
	--name=writer --rw=randwrite --bs=4k --iodepth=1 2>/dev/null | iops)
copies=$("$BIN" status -n "${ublk#/dev/ublkb}" --json | sed -n 's/.*"copy_ups": *\([0-9]*\).*/\1/p')
printf '%-40s %10s\n' "4k randread QD16 alone (IOPS)" "$alone" "4k randread QD16 beside the writer" "$beside"
printf '%-40s %10s\n' "ratio" "$(awk -v a="$beside" -v b="$alone" 'BEGIN {printf "%.2f", a / b}')" "copy-ups during the run" "${copies:-?}"
# The device alone under the same I/O: fio's reads on the raw file beside
# 1 MiB reads and 1 MiB writes + fdatasync at the copy-up rate just seen.
rate=$(( ${copies:-0} / SECS ))
if [ "$rate" -gt 0 ]; then
	dalone=$(run_fio "$raw" randread 4k 16)
	dbeside=$(fio --ioengine=io_uring --direct=1 --time_based --runtime="$SECS" --norandommap --randrepeat=0 \
		--filename="$raw" --output-format=normal \
		--name=reads --rw=randread --bs=4k --iodepth=16 \
		--name=copy-read --rw=randread --bs=1M --iodepth=1 --rate_iops="$rate" \
		--name=copy-write --rw=randwrite --bs=1M --iodepth=1 --fdatasync=1 --rate_iops="$rate" 2>/dev/null | iops)
	printf '%-40s %10s\n' "device: fio randread alone (raw file)" "$dalone" "device: beside $rate copy-ups/s of I/O" "$dbeside"
	printf '%-40s %10s\n' "device ratio" "$(awk -v a="$dbeside" -v b="$dalone" 'BEGIN {printf "%.2f", a / b}')"
fi
