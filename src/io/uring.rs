//! io_uring backend: a batch becomes one submission, so a request that
//! spans several clusters or layers costs one syscall, not one per piece.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

use super::aligned::{is_aligned, AlignedBuf, MEM_ALIGN};
use super::sync::run_op_sync;
use super::{IoBackend, IoKind, IoOp};

pub struct UringBackend {
    ring: IoUring,
    entries: u32,
}

impl UringBackend {
    pub fn new(entries: u32) -> io::Result<Self> {
        Ok(UringBackend { ring: IoUring::new(entries)?, entries })
    }
}

/// Per-op state while in flight: the bounce buffer (if any) and how much
/// the kernel reported done.
struct Slot {
    bounce: Option<AlignedBuf>,
    result: i32,
}

impl IoBackend for UringBackend {
    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        for chunk in ops.chunks_mut(self.entries as usize) {
            self.submit_chunk(chunk)?;
        }
        Ok(())
    }

    fn sync_data(&mut self, fd: RawFd) -> io::Result<()> {
        let sqe = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build().user_data(0);
        // SAFETY: the SQE references no memory.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        let cqe = loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => continue,
                Err(e) => return Err(e),
            }
            if let Some(cqe) = self.ring.completion().next() {
                break cqe;
            }
        };
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl UringBackend {
    fn submit_chunk(&mut self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let mut slots: Vec<Slot> = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            let fd = types::Fd(op.fd);
            let (sqe, bounce) = match &mut op.kind {
                IoKind::Read(buf) if is_aligned(buf, MEM_ALIGN) => {
                    (opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(op.offset).build(), None)
                }
                IoKind::Read(buf) => {
                    let mut b = AlignedBuf::zeroed(buf.len());
                    (opcode::Read::new(fd, b.as_mut_ptr(), b.len() as u32).offset(op.offset).build(), Some(b))
                }
                IoKind::Write(buf) if is_aligned(buf, MEM_ALIGN) => {
                    (opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(op.offset).build(), None)
                }
                IoKind::Write(buf) => {
                    let b = AlignedBuf::from_slice(buf);
                    (opcode::Write::new(fd, b.as_ptr(), b.len() as u32).offset(op.offset).build(), Some(b))
                }
            };
            slots.push(Slot { bounce, result: 0 });
            // SAFETY: the buffers (caller's or the bounce in `slots`) outlive
            // the wait below; the chunk never exceeds the ring size.
            unsafe { self.ring.submission().push(&sqe.user_data(i as u64)) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let mut pending = ops.len();
        while pending > 0 {
            // The kernel may still be writing into the buffers: never
            // return before every op completed.
            match self.ring.submit_and_wait(pending) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed with I/O in flight: {e}");
                    std::process::abort();
                }
            }
            for cqe in self.ring.completion() {
                slots[cqe.user_data() as usize].result = cqe.result();
                pending -= 1;
            }
        }
        let mut first_err = None;
        for (op, slot) in ops.iter_mut().zip(slots.iter_mut()) {
            let len = op.len();
            let res = slot.result;
            let outcome = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as usize == len {
                Ok(())
            } else {
                // Short transfer (EOF on read, or a partial write): finish the
                // remainder the simple way; pread_full zero-fills past EOF.
                finish_short(op, slot, res as usize)
            };
            if let (Ok(()), Some(b), IoKind::Read(buf)) = (&outcome, &slot.bounce, &mut op.kind) {
                buf.copy_from_slice(b);
            }
            if let Err(e) = outcome {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn finish_short(op: &mut IoOp<'_>, slot: &mut Slot, done: usize) -> io::Result<()> {
    let fd = op.fd;
    let offset = op.offset + done as u64;
    match (&mut op.kind, &mut slot.bounce) {
        // A regular file reads short only at EOF: the rest is a hole.
        (IoKind::Read(_), Some(b)) => Ok(b[done..].fill(0)),
        (IoKind::Read(buf), None) => Ok(buf[done..].fill(0)),
        (IoKind::Write(_), Some(b)) => run_op_sync(&mut IoOp::write(fd, offset, &b[done..])),
        (IoKind::Write(buf), None) => run_op_sync(&mut IoOp::write(fd, offset, &buf[done..])),
    }
}
