//! How rings are set up: the daemon's queue rings and the engine's own
//! (`OwnRing`) alike, so that the engine benchmark measures what the daemon
//! runs.
//!
//! Deferred task work (with a single issuer, as fio and the kernel's own
//! ublk server set up theirs): completions are handed over only when the
//! ring's thread enters the kernel to wait, in one batch, instead of
//! interrupting it at every return from a system call. Every wait must then
//! ask for completions (`submit_and_wait(n >= 1)`): nothing else runs the
//! work that posts them. Kernels before 6.1 refuse the flags and get
//! cooperative task work (5.19), else a plain ring.

use std::io;

use io_uring::IoUring;

/// True unless `UBLK_PLOOP_RING=coop` asks for cooperative task work only
/// (libublk's own setup), for side-by-side measurements.
fn defers_task_work() -> bool {
    !matches!(std::env::var_os("UBLK_PLOOP_RING"), Some(v) if v == "coop")
}

/// A ring of `sq` submission and `cq` completion entries (see the module).
pub fn build_ring(sq: u32, cq: u32) -> io::Result<IoUring> {
    let refused = |r: &io::Result<IoUring>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
    if defers_task_work() {
        let r = IoUring::builder().setup_cqsize(cq).setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun().build(sq);
        if !refused(&r) {
            return r;
        }
    }
    let r = IoUring::builder().setup_cqsize(cq).setup_coop_taskrun().build(sq);
    if !refused(&r) {
        return r;
    }
    IoUring::builder().setup_cqsize(cq).build(sq)
}

/// Run the ring's deferred task work now, asking for no completion (so it
/// returns at once; what it posts is reaped by the next wait). A kernel
/// runs a bounded batch of it per enter (20 since 6.13): a few enters.
/// Call on the ring's own thread (a single issuer).
pub fn run_task_work(ring: &IoUring) {
    const ENTER_GETEVENTS: u32 = 1;
    for _ in 0..4 {
        // SAFETY: nothing is submitted and no argument is passed.
        let _ = unsafe { ring.submitter().enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None) };
    }
}
