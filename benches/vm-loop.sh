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
"$BIN" convert "$raw" "$img" --to ploop >/dev/null 2>&1
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
