#!/bin/bash
# Write-log crash replay, inside the VM:
#   tests/vm/run tests/vm/crash_replay.sh [MAX_POINTS] [GENERATIONS] [link-log]
# (CI: 10 points of 12 generations, about 5 minutes; MAX_POINTS 0 checks every flush, FUA
# and mark and a point between each two of them).
#
# The host filesystem that holds the images sits on dm-log-writes, which
# records every write its disk completed, in order, with flushes and marks.
# Two devices run on it at once: a disk directory taking generations of
# fsynced 4k writes while a snapshot, an online merge and a second snapshot
# happen, and a plain image carrying ext4 with files synced one by one.
# Then prefixes of the log are replayed onto a blank disk (a power cut at
# that point) and, on a throwaway dm snapshot of it, every point is checked:
# the host filesystem mounts, `check` finds no damage (an unclean mark and
# leaked clusters are not damage), both disks open on a device, every
# generation marked before the point reads back (or a newer one), the guest
# ext4 mounts, passes fsck and holds every file synced before the point.
# Without `link-log` the disk directory's device syncs each copy-up before
# acknowledging it (--no-link-log); with it, its copy-ups are acknowledged
# before their sync, and a power cut (the
# replay) finds no log, as a reboot empties the tmpfs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN=${UBLK_PLOOP_BIN:-$repo/target/release/ublk-ploop}
SCRATCH=${UBLK_PLOOP_SCRATCH:?run this inside the VM: tests/vm/run $0}
TOOL="python3 $here/crashlog.py"
MAX_POINTS=${1:-10}
GENS=${2:-12}
LINK_LOG=(--no-link-log)
[ "${3:-}" = link-log ] && LINK_LOG=(--link-log)
log() { echo "crash-replay: $*"; }
die() { log "FAIL: $*"; exit 1; }
trap 'log "FAIL: line $LINENO: $BASH_COMMAND"' ERR
# shellcheck source=tests/vm/lib.sh
. "$here/lib.sh"
mark() { dmsetup message lw 0 mark "$1"; }
WORK=/tmp/crash-replay
mkdir -p "$WORK" /mnt/lw /mnt/rp /mnt/rpb /mnt/b

# ---- the logged filesystem -----------------------------------------------
truncate -s 320M "$SCRATCH/lw.data"
truncate -s 3G "$SCRATCH/lw.log"
dloop=$(losetup -f --show "$SCRATCH/lw.data")
lloop=$(losetup -f --show "$SCRATCH/lw.log")
sectors=$(blockdev --getsz "$dloop")
dmsetup create lw --table "0 $sectors log-writes $dloop $lloop"
dmsetup mknodes lw
mkfs.ext4 -q -F -E nodiscard /dev/mapper/lw
mark mkfs
mount /dev/mapper/lw /mnt/lw

# ---- the workloads -------------------------------------------------------
"$BIN" init /mnt/lw/a --size 64M >/dev/null
"$BIN" create /mnt/lw/b.hdd --size 64M >/dev/null
sync -f /mnt/lw
mark created-1
deva=$("$BIN" add --image /mnt/lw/a --id 20 "${LINK_LOG[@]}"); wait_dev "$deva"
devb=$("$BIN" add --image /mnt/lw/b.hdd --id 21); wait_dev "$devb"
mkfs.ext4 -q -F "$devb"
mount "$devb" /mnt/b
sync -f /mnt/b
mark fs-1

# The guest filesystem: files written and synced one by one, each marked.
(
	k=0
	while [ ! -e "$WORK/stop" ] || [ $k -lt 4 ]; do
		k=$((k + 1))
		head -c $((64 * 1024 + k * 4096)) /dev/urandom >"/mnt/b/f$k"
		sync "/mnt/b/f$k"; sync -f /mnt/b
		echo "$(sha256sum <"/mnt/b/f$k" | cut -d' ' -f1) f$k" >>"$WORK/files"
		mark "file-$k"
	done
) &
files_pid=$!

# The disk directory: generations of random 4k writes, each fsynced and
# marked, with snapshot, merge and snapshot in between.
for g in $(seq 1 "$GENS"); do
	$TOOL pattern-write "$deva" "$WORK/journal" "$g" 256
	mark "gen-$g"
	case $g in
	$((GENS / 3))) "$BIN" snapshot -n 20 >/dev/null ;;
	$((GENS * 2 / 3))) "$BIN" snapshot-merge -n 20 >/dev/null ;;
	$((GENS * 5 / 6))) "$BIN" snapshot -n 20 >/dev/null ;;
	esac
done
touch "$WORK/stop"
wait "$files_pid"
umount /mnt/b
"$BIN" del -n 21 >/dev/null
"$BIN" del -n 20 >/dev/null
umount /mnt/lw
dmsetup remove lw
log "workload done: $GENS generations, $(wc -l <"$WORK/files") files, log $(du -h "$SCRATCH/lw.log" | cut -f1)"

# ---- replay ----------------------------------------------------------------
truncate -s 320M "$SCRATCH/lw.target"
truncate -s 256M "$SCRATCH/lw.cow"
tloop=$(losetup -f --show "$SCRATCH/lw.target")
cloop=$(losetup -f --show "$SCRATCH/lw.cow")
$TOOL points "$lloop" --max "$MAX_POINTS" --after mkfs >"$WORK/points"

check_point() { # entries gen files
	local n=$1 gen=$2 nfiles=$3 out dev
	mount /dev/mapper/rp /mnt/rp || die "entry $n: the host filesystem does not mount"
	out=""
	if [ -e /mnt/rp/a/DiskDescriptor.xml ]; then
		{ "$BIN" check --json /mnt/rp/a 2>"$WORK/err" || true; } | $TOOL verdict >"$WORK/verdict" \
			|| die "entry $n: disk directory: $(cat "$WORK/verdict" "$WORK/err")"
		dev=$("$BIN" add --image /mnt/rp/a --id 22 2>"$WORK/err") || die "entry $n: the disk directory does not open: $(cat "$WORK/err")"
		wait_dev "$dev"
		$TOOL pattern-verify "$dev" "$WORK/journal" "$gen" >"$WORK/verify" \
			|| { "$BIN" del -n 22 >/dev/null; die "entry $n: generation $gen: $(cat "$WORK/verify")"; }
		"$BIN" del -n 22 >/dev/null
		out="a: $(cat "$WORK/verdict"), generation $gen verified ($(sed 's/.*checked": \([0-9]*\).*/\1/' "$WORK/verify") blocks)"
	else
		[ "$gen" = 0 ] || die "entry $n: the disk directory is gone after generation $gen"
	fi
	if [ -e /mnt/rp/b.hdd ]; then
		{ "$BIN" check --json /mnt/rp/b.hdd 2>"$WORK/err" || true; } | $TOOL verdict >"$WORK/verdict" \
			|| die "entry $n: image: $(cat "$WORK/verdict" "$WORK/err")"
		dev=$("$BIN" add --image /mnt/rp/b.hdd --id 23 2>"$WORK/err") || die "entry $n: the image does not open: $(cat "$WORK/err")"
		wait_dev "$dev"
		if [ "$FS" = 1 ]; then
			mount "$dev" /mnt/rpb || { "$BIN" del -n 23 >/dev/null; die "entry $n: the guest ext4 does not mount"; }
			head -n "$nfiles" "$WORK/files" | while read -r sum f; do
				[ "$(sha256sum <"/mnt/rpb/$f" | cut -d' ' -f1)" = "$sum" ] || { echo "$f"; exit 1; }
			done >"$WORK/badfile" || { umount /mnt/rpb; "$BIN" del -n 23 >/dev/null; die "entry $n: file $(cat "$WORK/badfile") synced before the point is wrong"; }
			umount /mnt/rpb
			fsck.ext4 -fn "$dev" >"$WORK/fsck" 2>&1 || { "$BIN" del -n 23 >/dev/null; cat "$WORK/fsck"; die "entry $n: the guest ext4 fails fsck"; }
		fi
		"$BIN" del -n 23 >/dev/null
		out="$out; b: $(cat "$WORK/verdict"), $nfiles files"
	fi
	umount /mnt/rp
	log "entry $n ($kind): ${out#; }"
}

prev=0 points=0
start=$SECONDS
markval() { # NAME WORDS...: the number after NAME= among WORDS, or 0
	local name=$1 w
	shift
	for w in "$@"; do [ "${w%%=*}" = "$name" ] && { echo "${w#*=}"; return; }; done
	echo 0
}
while read -r n _ kind marks; do
	# shellcheck disable=SC2086
	gen=$(markval gen $marks); nfiles=$(markval file $marks); FS=$(markval fs $marks)
	$TOOL replay "$lloop" "$tloop" --from "$prev" --to "$n"
	prev=$n
	dmsetup create rp --table "0 $sectors snapshot $tloop $cloop N 8"
	dmsetup mknodes rp
	check_point "$n" "$gen" "$nfiles"
	dmsetup remove rp
	points=$((points + 1))
done <"$WORK/points"
losetup -d "$tloop" "$cloop" "$lloop" "$dloop"
rm -f "$SCRATCH"/lw.*
log "PASS: $points crash points replayed and checked in $((SECONDS - start)) s, 0 failures"
