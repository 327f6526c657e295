//! A backend that fails on purpose, to prove the engine reports I/O errors
//! instead of acknowledging data it did not store.

use std::io;
use std::os::fd::RawFd;

use super::{IoBackend, IoKind, IoOp};

/// When to fail. Counters are over the whole life of the backend.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Fail the write with this index (0-based), and every one after it
    /// when `sticky`.
    pub fail_write_at: Option<u64>,
    /// Fail the read with this index (0-based).
    pub fail_read_at: Option<u64>,
    /// Fail every sync_data call.
    pub fail_sync: bool,
    /// Keep failing once the first fault fired (a dead disk).
    pub sticky: bool,
    /// errno to report.
    pub errno: i32,
}

pub struct FaultBackend<B: IoBackend> {
    inner: B,
    plan: FaultPlan,
    reads: u64,
    writes: u64,
    tripped: bool,
}

impl<B: IoBackend> FaultBackend<B> {
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        FaultBackend { inner, plan, reads: 0, writes: 0, tripped: false }
    }
    pub fn writes_seen(&self) -> u64 {
        self.writes
    }
    fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(if self.plan.errno == 0 { libc::EIO } else { self.plan.errno })
    }
}

impl<B: IoBackend> IoBackend for FaultBackend<B> {
    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let mut fail = self.tripped && self.plan.sticky;
        for op in ops.iter() {
            match op.kind {
                IoKind::Read(_) => {
                    fail |= self.plan.fail_read_at == Some(self.reads);
                    self.reads += 1;
                }
                IoKind::Write(_) => {
                    fail |= self.plan.fail_write_at == Some(self.writes);
                    self.writes += 1;
                }
            }
        }
        if fail {
            // The ops before the faulty one may have happened: a real disk
            // gives no all-or-nothing promise either, so run none of the
            // writes (the harshest case for the engine's ordering rules).
            self.tripped = true;
            return Err(self.error());
        }
        self.inner.submit(ops)
    }

    fn sync_data(&mut self, fd: RawFd) -> io::Result<()> {
        if self.plan.fail_sync || (self.tripped && self.plan.sticky) {
            self.tripped = true;
            return Err(self.error());
        }
        self.inner.sync_data(fd)
    }

    fn punch_hole(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        if self.tripped && self.plan.sticky {
            return Err(self.error());
        }
        self.inner.punch_hole(fd, offset, len)
    }

    fn name(&self) -> &'static str {
        "fault"
    }
}
