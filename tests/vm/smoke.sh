#!/bin/sh
# Smoke test for the VM harness: run as `tests/vm/run tests/vm/smoke.sh`.
set -e
echo "smoke: kernel $(uname -r)"
if [ ! -c /dev/ublk-control ]; then
	echo "smoke: FAIL: /dev/ublk-control missing" >&2
	exit 1
fi
echo "smoke: /dev/ublk-control present"
[ "${UBLK_PLOOP_SCRATCH:-}" = /mnt/scratch ] || {
	echo "smoke: FAIL: UBLK_PLOOP_SCRATCH=${UBLK_PLOOP_SCRATCH:-<unset>}" >&2
	exit 1
}
dd if=/dev/zero of="$UBLK_PLOOP_SCRATCH/x" bs=1M count=4 oflag=direct
rm -f "$UBLK_PLOOP_SCRATCH/x"
echo "smoke: O_DIRECT write to $UBLK_PLOOP_SCRATCH ok"
echo "smoke: cwd $(pwd), args: $*"
echo "smoke: PASS"
