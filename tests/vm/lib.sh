# Helpers the VM scripts share; source after defining die().

# /dev/ublkbN -> N
dev_id() { echo "${1#/dev/ublkb}"; }

# Wait until a block device node exists and has its size.
wait_dev() {
	for _ in $(seq 100); do
		[ -b "$1" ] && [ "$(blockdev --getsize64 "$1" 2>/dev/null || echo 0)" -gt 0 ] && return 0
		sleep 0.1
	done
	die "$1 did not appear"
}

# The daemon serving device N.
daemon_pid() { "$BIN" status -n "$1" --json | sed -n 's/^ *"pid": *\([0-9]*\).*/\1/p'; }
