//! The engine's I/O backend: how image-file reads and writes are executed.
//!
//! The engine decides *what* to read and write (see `Stack::plan_read`);
//! a backend decides *how*. Tests plug the plain pread/pwrite backend and a
//! fault-injecting one; the CLI and the daemon use io_uring.

mod aligned;
mod fault;
mod file;
mod sync;
mod uring;

pub use aligned::AlignedBuf;
pub use fault::{FaultBackend, FaultPlan};
pub use file::{open_image_file, Direct, ImageFile};
pub use sync::SyncBackend;
pub use uring::UringBackend;

use std::io;
use std::os::fd::RawFd;

/// One read or write of a contiguous file range.
pub struct IoOp<'a> {
    pub fd: RawFd,
    pub offset: u64,
    pub kind: IoKind<'a>,
}

pub enum IoKind<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl<'a> IoOp<'a> {
    pub fn read(fd: RawFd, offset: u64, buf: &'a mut [u8]) -> Self {
        IoOp { fd, offset, kind: IoKind::Read(buf) }
    }
    pub fn write(fd: RawFd, offset: u64, buf: &'a [u8]) -> Self {
        IoOp { fd, offset, kind: IoKind::Write(buf) }
    }
    pub fn len(&self) -> usize {
        match &self.kind {
            IoKind::Read(b) => b.len(),
            IoKind::Write(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Executes batches of file I/O. A batch completes as a whole: on return
/// every op has transferred all its bytes, or an error is returned.
/// Reads past the end of a file return zeros (image files are sparse by
/// nature; the engine validates that metadata never points past EOF).
pub trait IoBackend: Send {
    /// Run all ops; they may be executed in any order and concurrently.
    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> io::Result<()>;
    /// Make completed writes to `fd` durable.
    fn sync_data(&mut self, fd: RawFd) -> io::Result<()>;
    /// Deallocate a range so that it reads as zeros.
    fn punch_hole(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        punch_hole(fd, offset, len)
    }
    fn name(&self) -> &'static str;
}

pub(crate) fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on a descriptor the caller owns.
    let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Which backend to build, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Uring,
    Sync,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(BackendKind::Uring),
            "sync" | "psync" => Ok(BackendKind::Sync),
            _ => Err(format!("unknown I/O backend '{s}' (use uring or sync)")),
        }
    }
}

/// io_uring when the kernel allows it, else pread/pwrite with a warning.
pub fn make_backend(kind: BackendKind) -> Box<dyn IoBackend> {
    match kind {
        BackendKind::Sync => Box::new(SyncBackend::new()),
        BackendKind::Uring => match UringBackend::new(64) {
            Ok(b) => Box::new(b),
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); using pread/pwrite");
                Box::new(SyncBackend::new())
            }
        },
    }
}

/// Buffered write of a whole slice (image creation, repair), no alignment.
pub(crate) fn sync_write_all(file: &std::fs::File, data: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
}
