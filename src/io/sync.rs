//! The plain-syscall implementation of [`Io`]: every future is ready when
//! first polled. Offline tools use it, and it is the reference the ring
//! implementation is tested against.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::FallocateFlags;

use super::aligned::{is_aligned, AlignedBuf, MEM_ALIGN};
use super::Io;

#[derive(Clone, Copy, Debug, Default)]
pub struct SyncIo;

fn fd(raw: RawFd) -> BorrowedFd<'static> {
    // SAFETY: callers pass descriptors of image files that outlive the call.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Read all of `buf` at `offset`; bytes past EOF read as zeros.
fn pread_full(raw: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry(|| nix::sys::uio::pread(fd(raw), &mut buf[done..], (offset + done as u64) as libc::off_t))?;
        if n == 0 {
            // A regular file reads short only at EOF: the rest is a hole.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

fn pwrite_full(raw: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry(|| nix::sys::uio::pwrite(fd(raw), &buf[done..], (offset + done as u64) as libc::off_t))?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += n;
    }
    Ok(())
}

pub(crate) fn fallocate(raw: RawFd, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    retry(|| nix::fcntl::fallocate(raw, mode, offset as libc::off_t, len as libc::off_t))
}

pub(crate) fn ftruncate(raw: RawFd, len: u64) -> io::Result<()> {
    retry(|| nix::unistd::ftruncate(fd(raw), len as libc::off_t))
}

pub(crate) const PUNCH: FallocateFlags = FallocateFlags::FALLOC_FL_PUNCH_HOLE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE);

impl Io for SyncIo {
    async fn read_at(&self, raw: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf, MEM_ALIGN) {
            return pread_full(raw, buf, offset);
        }
        // O_DIRECT refuses unaligned memory: bounce.
        let mut bounce = AlignedBuf::zeroed(buf.len());
        pread_full(raw, &mut bounce, offset)?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    async fn write_at(&self, raw: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf, MEM_ALIGN) {
            pwrite_full(raw, buf, offset)
        } else {
            pwrite_full(raw, &AlignedBuf::from_slice(buf), offset)
        }
    }

    async fn sync_data(&self, raw: RawFd) -> io::Result<()> {
        retry(|| nix::unistd::fdatasync(raw))
    }

    async fn allocate(&self, raw: RawFd, offset: u64, len: u64) -> io::Result<()> {
        fallocate(raw, FallocateFlags::empty(), offset, len)
    }

    async fn punch_hole(&self, raw: RawFd, offset: u64, len: u64) -> io::Result<()> {
        fallocate(raw, PUNCH, offset, len)
    }

    async fn set_len(&self, raw: RawFd, len: u64) -> io::Result<()> {
        ftruncate(raw, len)
    }
}
