//! The plain pread/pwrite backend: simple, obviously correct, the reference
//! the io_uring backend is tested against.

use std::io;
use std::os::fd::RawFd;

use super::aligned::{is_aligned, AlignedBuf, MEM_ALIGN};
use super::{fdatasync, IoBackend, IoKind, IoOp};

#[derive(Default)]
pub struct SyncBackend;

impl SyncBackend {
    pub fn new() -> Self {
        SyncBackend
    }
}

/// Read all of `buf` at `offset`; bytes past EOF read as zeros.
pub(crate) fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is a valid writable region.
        let n = unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), (offset + done as u64) as libc::off_t) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // A regular file reads short only at EOF: the rest is a hole.
        if (n as usize) < rest.len() {
            rest[n as usize..].fill(0);
            return Ok(());
        }
        done += n as usize;
    }
    Ok(())
}

pub(crate) fn pwrite_full(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: rest is a valid readable region.
        let n = unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), (offset + done as u64) as libc::off_t) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Run one op, bouncing through an aligned buffer when the caller's memory
/// is not aligned (O_DIRECT would refuse it with EINVAL).
pub(crate) fn run_op_sync(op: &mut IoOp<'_>) -> io::Result<()> {
    let fd = op.fd;
    let offset = op.offset;
    match &mut op.kind {
        IoKind::Read(buf) if is_aligned(buf, MEM_ALIGN) => pread_full(fd, buf, offset),
        IoKind::Read(buf) => {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            pread_full(fd, &mut bounce, offset)?;
            buf.copy_from_slice(&bounce);
            Ok(())
        }
        IoKind::Write(buf) if is_aligned(buf, MEM_ALIGN) => pwrite_full(fd, buf, offset),
        IoKind::Write(buf) => pwrite_full(fd, &AlignedBuf::from_slice(buf), offset),
    }
}

impl IoBackend for SyncBackend {
    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        ops.iter_mut().try_for_each(run_op_sync)
    }
    fn sync_data(&mut self, fd: RawFd) -> io::Result<()> {
        fdatasync(fd)
    }
    fn name(&self) -> &'static str {
        "sync"
    }
}
