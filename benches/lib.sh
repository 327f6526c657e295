# Shell helpers the VM benchmarks share (sourced by fio-suite.sh and
# vm-profile.sh).

# The process that serves a ublk device: the one holding its char device.
ublk_server() { # /dev/ublkcN
	local fd
	for fd in /proc/[0-9]*/fd/*; do
		[ "$(readlink "$fd" 2>/dev/null)" = "$1" ] && { fd=${fd#/proc/}; echo "${fd%%/*}"; return; }
	done
}

# User plus system CPU ticks of the processes given (all their threads).
cpu_ticks() {
	local pid t=0
	for pid in "$@"; do
		# Fields 14 and 15 of stat, counted after the ")" that ends the name.
		t=$((t + $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0)))
	done
	echo "$t"
}
