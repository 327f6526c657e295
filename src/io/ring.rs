//! [`Io`] as io_uring operations on a ring the caller owns: the ublk
//! queue's ring in the daemon, [`super::OwnRing`] in the benchmark and the
//! tools. This is the one piece of code that moves image data on a ring:
//! it retries short transfers and EAGAIN, zero-fills reads past EOF and
//! bounces unaligned memory, whoever owns the ring.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::aligned::{is_aligned, AlignedBuf, MEM_ALIGN};
use super::sync::{ftruncate, PUNCH};
use super::{FixedBuf, Io};

/// A ring that takes one SQE and completes it: the SQE is queued when
/// `submit` is called (the owner enters the kernel with a batch later), and
/// the future yields the CQE's result (bytes moved, or -errno).
pub trait Submit {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32>;
    /// Run the ring's deferred task work now, waiting for nothing. With
    /// deferred task work (`ring_setup`) a finished request is sometimes
    /// put away, its file reference with it, only when this thread next
    /// enters the ring for events: an fdatasync's io-wq worker that lets
    /// go of the request after we took its completion leaves the last put
    /// to us. Until then a closed image stays open in the kernel, and so
    /// does its lock, however long a lock retry sleeps.
    fn run_task_work(&self) {}
}

impl<S: Submit + ?Sized> Submit for &S {
    fn submit(&self, sqe: squeue::Entry) -> impl Future<Output = i32> {
        (**self).submit(sqe)
    }
    fn run_task_work(&self) {
        (**self).run_task_work()
    }
}

/// The engine's I/O as SQEs on `S`.
pub struct RingIo<S> {
    ring: S,
}

impl<S: Submit> RingIo<S> {
    pub fn new(ring: S) -> Self {
        RingIo { ring }
    }
    pub fn ring(&self) -> &S {
        &self.ring
    }

    /// One SQE, awaited; EINTR and EAGAIN are retried.
    async fn op(&self, build: impl Fn() -> squeue::Entry) -> io::Result<u32> {
        loop {
            let guard = InFlight;
            let res = self.ring.submit(build()).await;
            guard.done();
            match res {
                r if r == -libc::EAGAIN || r == -libc::EINTR => continue,
                r if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
                r => return Ok(r as u32),
            }
        }
    }

    async fn read_aligned(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let (ptr, len) = (rest.as_mut_ptr(), rest.len() as u32);
            let at = offset + done as u64;
            let n = self.op(|| opcode::Read::new(types::Fd(fd), ptr, len).offset(at).build()).await? as usize;
            if n == 0 {
                // A regular file reads short only at EOF: the rest is a hole.
                rest.fill(0);
                return Ok(());
            }
            done += n;
        }
        Ok(())
    }

    async fn write_aligned(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
            let at = offset + done as u64;
            let n = self.op(|| opcode::Write::new(types::Fd(fd), ptr, len).offset(at).build()).await? as usize;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
            }
            done += n;
        }
        Ok(())
    }
}

/// /dev/zero, the source that fills registered buffers with zeros without
/// the bytes passing through our memory; opened once per process.
fn dev_zero() -> io::Result<RawFd> {
    use std::os::fd::AsRawFd;
    static ZERO: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = ZERO.get() {
        return Ok(f.as_raw_fd());
    }
    let f = std::fs::File::open("/dev/zero")?;
    Ok(ZERO.get_or_init(|| f).as_raw_fd())
}

impl<S: Submit> RingIo<S> {
    /// Move a registered buffer's range from (`read`) or to `fd`, whole;
    /// a read that ends at EOF leaves the rest to `zero_fixed`.
    async fn transfer_fixed(&self, read: bool, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len {
            let addr = buf.base + (buf.off + done) as u64;
            let (len, at) = ((buf.len - done) as u32, offset + done as u64);
            let n = self
                .op(|| {
                    if read {
                        opcode::ReadFixed::new(types::Fd(fd), addr as *mut u8, len, buf.index).offset(at).build()
                    } else {
                        opcode::WriteFixed::new(types::Fd(fd), addr as *const u8, len, buf.index).offset(at).build()
                    }
                })
                .await? as usize;
            if n == 0 {
                if !read {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                }
                // Past EOF: the rest is a hole.
                return self.zero_fixed(buf.slice(done, buf.len - done)).await;
            }
            done += n;
        }
        Ok(())
    }
}

/// Armed while the kernel may still touch a buffer of ours. A future that
/// is dropped before its CQE arrived would free memory the kernel writes
/// into; the process dies instead of corrupting itself. The frontends never
/// drop a request's future early (queues stop only between requests).
struct InFlight;

impl InFlight {
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        eprintln!("ublk-ploop: an io_uring operation was abandoned while in flight; aborting");
        std::process::abort();
    }
}

impl<S: Submit> Io for RingIo<S> {
    fn sleep_blocking(&self, d: std::time::Duration) {
        // Whatever this thread's ring still holds of a closed file is let
        // go before the pause (a paced job's files closed in its last
        // step, whose locks others may wait for meanwhile) and after it
        // (what the pause left, before the caller tries again).
        self.ring.run_task_work();
        std::thread::sleep(d);
        self.ring.run_task_work();
    }

    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf, MEM_ALIGN) {
            return self.read_aligned(fd, buf, offset).await;
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        self.read_aligned(fd, &mut bounce, offset).await?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf, MEM_ALIGN) {
            self.write_aligned(fd, buf, offset).await
        } else {
            self.write_aligned(fd, &AlignedBuf::from_slice(buf), offset).await
        }
    }

    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        self.op(|| opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build()).await.map(drop)
    }

    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.op(|| opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(0).build()).await.map(drop)
    }

    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.op(|| opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(PUNCH.bits()).build()).await.map(drop)
    }

    async fn read_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        self.transfer_fixed(true, fd, buf, offset).await
    }

    async fn write_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        self.transfer_fixed(false, fd, buf, offset).await
    }

    async fn zero_fixed(&self, buf: FixedBuf) -> io::Result<()> {
        let zero = dev_zero()?;
        let mut done = 0usize;
        while done < buf.len {
            let addr = buf.base + (buf.off + done) as u64;
            let len = (buf.len - done) as u32;
            let n = self.op(|| opcode::ReadFixed::new(types::Fd(zero), addr as *mut u8, len, buf.index).build()).await? as usize;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "/dev/zero read short"));
            }
            done += n;
        }
        Ok(())
    }

    async fn copy_to_fixed(&self, data: &[u8], buf: FixedBuf) -> io::Result<()> {
        // A registered kernel buffer (a ublk request's pages) is reached only
        // by transfers on the ring: the bytes go through a memory file of
        // this call's own (rare: only what a QCOW2 layer serves).
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::os::unix::fs::FileExt;
        debug_assert_eq!(data.len(), buf.len);
        let fd = unsafe { libc::memfd_create(c"ublk-ploop-bounce".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all_at(data, 0)?;
        self.transfer_fixed(true, file.as_raw_fd(), buf, 0).await
    }

    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        match self.op(|| opcode::Ftruncate::new(types::Fd(fd), len).build()).await {
            // Kernels before 6.9 have no ftruncate on the ring; it is rare
            // (closing, trimming after a crash), so the syscall will do.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => ftruncate(fd, len),
            other => other.map(drop),
        }
    }
}
