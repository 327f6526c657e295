#!/bin/bash
# Containers on ublk-ploop disks, with systemd 252 as the guest's PID 1:
#   tests/vm/run --systemd tests/vm/containers.sh [CLONES]
# A template disk holds a small busybox root filesystem; CLONES thin clones
# of it (3 by default) each get a device unit (ublk-ploop@) and a
# container unit (ublk-ploop-nspawn@, systemd-nspawn bound to the device's
# unit) as shipped. Each container writes its own files; the template's
# file never changes; each clone holds only its own writes. Stopping a
# container leaves its device; stopping a device stops its container
# first. One container keeps running through snapshot, backup and merge,
# and the backup restores to a disk a container starts from. A container
# migrates to host B (a network namespace) by live copy, and another moves
# to host B on shared NFS, where the lock keeps the two hosts apart.
set -euo pipefail
exec 2>&1
trap 'echo "containers: line $LINENO: \"$BASH_COMMAND\" failed"' ERR
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN=${UBLK_PLOOP_BIN:-$repo/target/release/ublk-ploop}
SCRATCH=${UBLK_PLOOP_SCRATCH:?run this inside the VM: tests/vm/run --systemd $0}
CLONES=${1:-3}
CONF=/run/ublk-ploop-test
# To stderr: the console, also from inside $(...) and >/dev/null.
log() { echo "containers: $*" >&2; }
die() {
	log "FAIL: $*"
	{ systemctl --no-pager --all status 'ublk-ploop*' 2>&1 | tail -40; journalctl --no-pager -u 'ublk-ploop*' -n 40 2>&1; } >&2 || true
	exit 1
}

[ "$(cat /proc/1/comm)" = systemd ] || die "PID 1 is $(cat /proc/1/comm), not systemd (run with tests/vm/run --systemd)"
command -v systemd-nspawn >/dev/null || die "no systemd-nspawn (package systemd-container)"

# The units as shipped, pointed at the binary under test and at configs on
# the guest's tmpfs (the host root is read-only here). The container runs
# a command instead of an init: it records its name and writes a heartbeat.
mkdir -p "$CONF" /run/systemd/system/ublk-ploop@.service.d /run/systemd/system/ublk-ploop-nspawn@.service.d
cp "$repo/systemd/ublk-ploop@.service" "$repo/systemd/ublk-ploop-nspawn@.service" /run/systemd/system/
cat >/run/systemd/system/ublk-ploop@.service.d/test.conf <<CONF
[Unit]
ConditionPathExists=
ConditionPathExists=$CONF/%i.toml
[Service]
ExecStart=
ExecStart=$BIN serve --config $CONF/%i.toml
CONF
cat >/run/systemd/system/ublk-ploop-nspawn@.service.d/test.conf <<'CONF'
[Service]
ExecStart=
ExecStart=/bin/sh -c 'mkdir -p /run/ublk-ploop/root/%i && mount /dev/ublk-ploop/%i /run/ublk-ploop/root/%i && \
    exec /usr/bin/systemd-nspawn --quiet --keep-unit --register=no --machine=%i --directory=/run/ublk-ploop/root/%i /bin/sh /start'

CONF
systemctl daemon-reload

# The template: ext4 with busybox, an os-release (nspawn wants one) and
# the container's start script.
tmpl=$SCRATCH/template
"$BIN" init "$tmpl" --size 128M >/dev/null
dev=$("$BIN" add --image "$tmpl"); for _ in $(seq 50); do [ -b "$dev" ] && break; sleep 0.1; done
mkfs.ext4 -q -F "$dev"
mnt=/mnt/tmpl; mkdir -p "$mnt"; mount "$dev" "$mnt"
mkdir -p "$mnt"/{bin,etc,proc,sys,dev,tmp,run,data,usr/lib,shared}
cp /bin/busybox "$mnt/bin/"
for a in sh cat echo date sleep hostname ls head sha256sum; do ln -s busybox "$mnt/bin/$a"; done
printf 'ID=busybox\nNAME="ublk-ploop test container"\n' >"$mnt/usr/lib/os-release"
head -c 64M /dev/urandom >"$mnt/shared/blob"
(cd "$mnt" && sha256sum shared/blob) >"$SCRATCH/blob.sum"
cat >"$mnt/start" <<'START'
hostname >/data/name
head -c 4194304 /dev/urandom >/data/own
(cd /data && sha256sum own >own.sum)
sync
n=0
while :; do n=$((n + 1)); echo "$n" >/data/beat; sync; sleep 1; done
START
umount "$mnt"; "$BIN" del -n "${dev#/dev/ublkb}" >/dev/null
tsum=$(sha256sum "$tmpl/root.hds" | cut -c1-64)
tused=$(du -k "$tmpl/root.hds" | cut -f1)

# A container's root, seen from here through its first process (the
# filesystem is mounted in its unit's namespace only).
root_of() { # name
	local main p
	main=$(systemctl show -p MainPID --value "ublk-ploop-nspawn@$1")
	[ "$main" -gt 0 ] && p=$(pgrep -P "$main" | head -1) && [ -n "$p" ] || return 1
	echo "/proc/$p/root"
}
beat() { local r; r=$(root_of "$1") && cat "$r/data/beat" 2>/dev/null; }
wait_beat() { # name [above]
	local b
	for _ in $(seq 300); do
		b=$(beat "$1" || true)
		[ -n "$b" ] && [ "$b" -gt "${2:-0}" ] && { echo "$b"; return 0; }
		sleep 0.2
	done
	die "container $1 gives no heartbeat"
}

# CLONES clones, each a device unit and a container unit.
total_ms=0
for i in $(seq "$CLONES"); do
	ct=ct$((100 + i))
	out=$("$BIN" clone "$tmpl" "$SCRATCH/$ct" --json) || die "clone $ct"
	ms=$(sed -n 's/.*"ms": *\([0-9.]*\).*/\1/p' <<<"$out")
	total_ms=$(awk -v a="$total_ms" -v b="$ms" 'BEGIN { print a + b }')
	printf 'disk = "%s"\n' "$SCRATCH/$ct" >"$CONF/$ct.toml"
done
log "$CLONES clones made, $(awk -v t="$total_ms" -v n="$CLONES" 'BEGIN { printf "%.1f", t / n }') ms each on average"
for i in $(seq "$CLONES"); do
	ct=ct$((100 + i))
	timeout 120 systemctl start "ublk-ploop-nspawn@$ct" || { journalctl --no-pager -u "ublk-ploop-nspawn@$ct" | tail -20; die "starting container $ct"; }
	systemctl is-active -q "ublk-ploop@$ct" || die "the container's unit did not bring its device up"
	[ -b "/dev/ublk-ploop/$ct" ] || die "no /dev/ublk-ploop/$ct"
done
for i in $(seq "$CLONES"); do wait_beat "ct$((100 + i))" >/dev/null; done
log "$CLONES containers running, each on its own clone"

# Snapshot, backup and merge under the first container, running all along.
ct=ct101
id=$(readlink "/dev/ublk-ploop/$ct"); id=${id#/dev/ublkb}
before=$(wait_beat "$ct")
root=$(root_of "$ct")
fsfreeze -f "$root" || die "freezing $ct's filesystem"
"$BIN" snapshot -n "$id" >/dev/null || { fsfreeze -u "$root"; die "snapshot"; }
fsfreeze -u "$root"
# The backup freezes the container's filesystem itself for its last pass.
"$BIN" backup -n "$id" --to "$SCRATCH/full.stream" 2>"$SCRATCH/backup.err" || { cat "$SCRATCH/backup.err"; die "backup"; }
"$BIN" snapshot-merge -n "$id" >/dev/null || die "merge"
after=$(wait_beat "$ct" "$((before + 2))")
systemctl is-active -q "ublk-ploop-nspawn@$ct" || die "$ct stopped during snapshot, backup and merge"
log "$ct ran through snapshot, backup and merge (heartbeat $before -> $after)"

# Stopping a container leaves its device; stopping a device stops its
# container first.
systemctl stop "ublk-ploop-nspawn@ct102"
systemctl is-active -q ublk-ploop@ct102 || die "stopping the container stopped its device"
[ -b /dev/ublk-ploop/ct102 ] || die "/dev/ublk-ploop/ct102 went with the container"
grep -q ublk /proc/self/mountinfo && die "a container's filesystem is mounted in the host's namespace"
systemctl stop ublk-ploop@ct101
systemctl is-active -q ublk-ploop-nspawn@ct101 && die "the container outlived its device"
[ ! -e /dev/ublk-ploop/ct101 ] || die "/dev/ublk-ploop/ct101 outlived its device"
for i in $(seq "$CLONES"); do systemctl stop "ublk-ploop@ct$((100 + i))"; done

# What each container wrote is on its own disk, beside the template's
# files; the template did not change; each clone holds its own writes only.
[ "$(sha256sum "$tmpl/root.hds" | cut -c1-64)" = "$tsum" ] || die "the template's file changed"
check_ct() { # disk-dir name
	local d=$1 ct=$2 dev m=/mnt/check
	dev=$("$BIN" add --image "$d" --read-only) || die "serving $d to check it"
	for _ in $(seq 50); do [ -b "$dev" ] && break; sleep 0.1; done
	mkdir -p "$m"; mount -o ro,noload "$dev" "$m"
	[ "$(cat "$m/data/name")" = "$ct" ] || die "$d: the container's name file says $(cat "$m/data/name")"
	(cd "$m/data" && sha256sum -c --quiet own.sum) && (cd "$m" && sha256sum -c --quiet "$SCRATCH/blob.sum") || die "$d: data differs"
	umount "$m"; "$BIN" del -n "${dev#/dev/ublkb}" >/dev/null
	"$BIN" check "$d" >/dev/null || die "check $d"
}
for i in $(seq "$CLONES"); do
	ct=ct$((100 + i))
	check_ct "$SCRATCH/$ct" "$ct"
	used=$(du -k "$SCRATCH/$ct"/root.hds.* | awk '{ s += $1 } END { print s }')
	# Its 4 MiB file, the journal's and the heartbeat's clusters (1 MiB
	# each): far below the template's 64 MiB blob.
	[ "$used" -lt 32768 ] || die "$ct uses $used KiB: more than its own writes (the template holds $tused KiB)"
	log "$ct: its files and the template's intact; $used KiB of its own (the template: $tused KiB)"
done

# The backup restores to a disk a container starts from.
"$BIN" receive --image "$SCRATCH/restored/" --from "$SCRATCH/full.stream" >/dev/null 2>&1 || die "restoring the backup"
printf 'disk = "%s"\n' "$SCRATCH/restored" >"$CONF/restored.toml"
systemctl start ublk-ploop-nspawn@restored || die "starting a container on the restored disk"
wait_beat restored >/dev/null
systemctl stop ublk-ploop@restored
log "the backup taken under the running container restored to a disk a container started from"

# Migration: host B is a network namespace with its own address, where a
# receiver listens and writes its own directory. The running container's
# disk goes over with one live copy (rounds while it runs, the last pass
# frozen, then its device stops); the container starts on B's copy.
if ip link add ub-a type veth peer name ub-b 2>/dev/null; then
	ip netns add hostb
	ip link set ub-b netns hostb
	ip addr add 10.77.0.1/24 dev ub-a; ip link set ub-a up
	ip -n hostb addr add 10.77.0.2/24 dev ub-b; ip -n hostb link set ub-b up; ip -n hostb link set lo up
	mkdir -p "$SCRATCH/hostb"
	ct=ct103
	systemctl start "ublk-ploop-nspawn@$ct" || die "restarting $ct"
	wait_beat "$ct" >/dev/null
	id=$(readlink "/dev/ublk-ploop/$ct"); id=${id#/dev/ublkb}
	ip netns exec hostb "$BIN" receive --image "$SCRATCH/hostb/$ct/" --listen 10.77.0.2:7000 >"$SCRATCH/recv.out" 2>&1 &
	recv=$!
	for _ in $(seq 100); do ip netns exec hostb ss -ltn 2>/dev/null | grep -q 10.77.0.2:7000 && break; sleep 0.1; done
	# --force: the container's filesystem is still mounted (frozen) when
	# the device stops under it; its unit goes with the device's.
	timeout 300 "$BIN" copy -n "$id" --connect 10.77.0.2:7000 --stop --force --json >"$SCRATCH/copy.json" 2>"$SCRATCH/copy.err" ||
		{ cat "$SCRATCH/copy.err" "$SCRATCH/recv.out" >&2; die "migration copy"; }
	stopped=$(date +%s%N)
	wait "$recv" || { cat "$SCRATCH/recv.out" >&2; die "receiver on host B"; }
	received=$(date +%s%N)
	for _ in $(seq 100); do systemctl is-active -q "ublk-ploop-nspawn@$ct" || break; sleep 0.1; done
	systemctl is-active -q "ublk-ploop-nspawn@$ct" && {
		{ systemctl --no-pager status "ublk-ploop@$ct" 2>&1 | head -12; journalctl --no-pager -u "ublk-ploop@$ct" -n 15; } >&2
		die "the container on host A outlived its migrated disk"
	}
	# What the container wrote on A is on B (checked outside the timing).
	check_ct "$SCRATCH/hostb/$ct" "$ct"
	printf 'disk = "%s"\n' "$SCRATCH/hostb/$ct" >"$CONF/$ct-b.toml"
	t0=$(date +%s%N)
	systemctl start "ublk-ploop@$ct-b" || die "serving the migrated disk on host B"
	live=$(date +%s%N)
	systemctl start "ublk-ploop-nspawn@$ct-b" || die "starting the container on host B"
	wait_beat "$ct-b" >/dev/null
	frozen=$(sed -n 's/.*"frozen_ms": *\([0-9.]*\).*/\1/p' "$SCRATCH/copy.json" | head -1)
	down=$(awk -v f="${frozen:-0}" -v a="$stopped" -v r="$received" -v t="$t0" -v l="$live" 'BEGIN { printf "%.0f", f + (r - a) / 1e6 + (l - t) / 1e6 }')
	systemctl stop "ublk-ploop@$ct-b"
	log "migrated $ct to host B: frozen $(printf '%.0f' "${frozen:-0}") ms; downtime about $down ms (the freeze, the receiver's finish, the device's start on B); the container runs there"
else
	log "no veth in this kernel (UBLK_PLOOP_VM_MODULES=veth): migration skipped"
fi

# Shared NFS: the guest's kernel NFS server exports one directory; host A
# (the root namespace) and host B (its own network namespace and host
# name, so the server sees two clients) each mount it. A container runs on
# A from a disk there; B is refused while A serves it (ploop's lock and the
# image's lock cross NFS); A stops, B serves the same directory, online
# verbs work there, and the container starts on B with A's files.
onb() { nsenter --net=/run/netns/hostb unshare --uts sh -c 'hostname host-b && exec "$@"' sh "$@"; }
if [ -d /sys/module/nfsd ] && ip netns list 2>/dev/null | grep -q hostb && command -v rpc.nfsd >/dev/null; then
	exp=$SCRATCH/export
	mkdir -p "$exp" /run/nfs-a /run/nfs-b
	mount -t tmpfs tmpfs /var/lib/nfs; touch /var/lib/nfs/etab /var/lib/nfs/rmtab
	mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
	# The shortest lease and grace the server allows: locks are granted
	# 10 s after it starts, not 90.
	echo 10 >/proc/fs/nfsd/nfsv4leasetime; echo 10 >/proc/fs/nfsd/nfsv4gracetime
	exportfs -o rw,no_root_squash,sync,no_subtree_check,fsid=0 "10.77.0.0/24:$exp"
	rpc.mountd -N 3 --no-udp || die "rpc.mountd"
	rpc.nfsd -N 3 --no-udp 4 || die "rpc.nfsd"
	timeout 60 mount -t nfs4 -o vers=4.2 10.77.0.1:/ /run/nfs-a || die "mounting the export on host A"
	onb timeout 60 mount -t nfs4 -o vers=4.2 10.77.0.1:/ /run/nfs-b || die "mounting the export on host B"
	ct=ctn
	"$BIN" receive --image /run/nfs-a/$ct/ --from "$SCRATCH/full.stream" >/dev/null 2>"$SCRATCH/nfs.err" || die "restoring the backup onto NFS: $(cat "$SCRATCH/nfs.err")"
	printf 'disk = "%s"\n' /run/nfs-a/$ct >"$CONF/$ct.toml"
	printf 'disk = "%s"\n' /run/nfs-b/$ct >"$CONF/$ct-b.toml"
	systemctl start "ublk-ploop-nspawn@$ct" || die "starting a container on NFS (host A)"
	wait_beat "$ct" >/dev/null
	# The daemon reads and writes its image with O_DIRECT over NFS.
	pid=$(systemctl show -p MainPID --value "ublk-ploop@$ct")
	direct=0
	for fd in /proc/"$pid"/fd/*; do
		# (The guest's root is a chroot: the kernel may name it with a prefix.)
		[[ $(readlink "$fd") == */run/nfs-a/$ct/root.hds ]] || continue
		flags=$(awk '/^flags:/ { print $2 }' /proc/"$pid"/fdinfo/"${fd##*/}")
		(( 8#$flags & 8#40000 )) && direct=1
	done
	[ "$direct" = 1 ] || die "the daemon on NFS does not use O_DIRECT: $(ls -l /proc/"$pid"/fd/)"
	# Host B is refused while A serves the disk, and touches nothing.
	sum_xml=$(sha256sum /run/nfs-a/$ct/DiskDescriptor.xml | cut -c1-64)
	onb "$BIN" add --image /run/nfs-b/$ct >/dev/null 2>"$SCRATCH/nfs.err" && die "host B served the disk host A serves"
	grep -q "in use\|locked" "$SCRATCH/nfs.err" || die "host B's refusal: $(cat "$SCRATCH/nfs.err")"
	onb "$BIN" check /run/nfs-b/$ct >/dev/null 2>&1 && die "host B checked (and might have repaired) a disk host A serves"
	[ "$(sha256sum /run/nfs-a/$ct/DiskDescriptor.xml | cut -c1-64)" = "$sum_xml" ] || die "host B's attempt changed the descriptor"
	log "NFS: host B refused while host A serves: $(head -1 "$SCRATCH/nfs.err")"
	# An online snapshot and merge on NFS, the container running.
	id=$(readlink "/dev/ublk-ploop/$ct"); id=${id#/dev/ublkb}
	"$BIN" snapshot -n "$id" >/dev/null || die "online snapshot on NFS"
	"$BIN" snapshot-merge -n "$id" >/dev/null || die "online merge on NFS"
	beat_a=$(wait_beat "$ct")
	systemctl stop "ublk-ploop@$ct"
	check_ct /run/nfs-a/$ct "$ct"
	# Host B: the same directory, through its own mount, under a unit.
	systemctl start "ublk-ploop-nspawn@$ct-b" || die "starting the container on host B over NFS"
	beat_b=$(wait_beat "$ct-b")
	"$BIN" add --image /run/nfs-a/$ct >/dev/null 2>&1 && die "host A served the disk again while host B serves it"
	systemctl stop "ublk-ploop@$ct-b"
	# What the container on B wrote, read on A (check_ct also checks the disk).
	check_ct /run/nfs-a/$ct "$ct-b"
	qemu-img check -f parallels /run/nfs-a/$ct/root.hds >/dev/null || die "qemu-img check of the NFS disk"
	umount /run/nfs-a; onb umount /run/nfs-b
	log "NFS: the container moved from host A to host B on shared storage (heartbeat $beat_a on A, $beat_b on B); O_DIRECT over NFS"
else
	log "no NFS server in this kernel or no host B (UBLK_PLOOP_VM_MODULES=\"veth nfsd nfsv4\", package nfs-kernel-server): NFS skipped"
fi
log "PASS"
