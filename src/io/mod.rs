//! How the engine touches image files: every read, write, sync, grow,
//! punch and truncate of an image goes through the [`Io`] trait, so that
//! one implementation can run them on a ublk queue's io_uring (where a
//! request that waits for I/O yields to the others) and another can run
//! them as plain syscalls (the offline tools), and tests can put faults
//! under every byte.
//!
//! - [`SyncIo`]: pread/pwrite and friends; each future is ready at once.
//! - [`RingIo`]: the operations as io_uring SQEs on any ring that can
//!   [`Submit`] one and await its completion (the ublk queue's ring, or
//!   [`OwnRing`], a ring of the engine's own for benchmarks and tools).
//! - [`wait`]: how a request waits for another one (a cluster being copied
//!   up, a metadata write, a stack change) without blocking its thread.

mod aligned;
mod file;
mod own_ring;
mod ring;
pub mod ring_setup;
mod sync;
pub mod wait;

pub use aligned::{AlignedBuf, BufPool};
pub use file::{is_hole, open_image_file, open_image_file_in, open_named, Direct, FileKind, FileStat, Handle, ImageFile, LockHow, OpenHow};
pub use own_ring::OwnRing;
pub use ring::{RingIo, Submit};
pub use sync::SyncIo;

/// Run a future to completion on this thread, parking it while the future
/// waits for another thread (the way offline callers use the engine).
pub use futures_lite::future::block_on;

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

/// File I/O as the engine needs it. Futures may start their operation
/// when first polled and must then be polled to completion: a ring cannot
/// take back a transfer into a buffer it was given, so dropping one early
/// aborts the process (see `ring.rs`). Reads past the end of a file return
/// zeros (image files are sparse by nature; the engine checks that its
/// metadata never points past EOF). Transfers are whole: a future resolves
/// once every byte moved, or with the error that stopped it.
#[allow(async_fn_in_trait)] // Futures on a queue ring are !Send by nature.
pub trait Io {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()>;
    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make completed writes to `fd` durable (fdatasync).
    async fn sync_data(&self, fd: RawFd) -> io::Result<()>;
    /// Allocate `[offset, offset + len)`, growing the file (fallocate mode 0):
    /// the range reads as zeros and later writes there cannot fail for space.
    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()>;
    /// Deallocate a range so that it reads as zeros; the size stays.
    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()>;
    /// Set the file's length (ftruncate).
    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()>;
    /// Rename a file over another (descriptor updates).
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    /// Make a directory's entries durable (after creating or renaming).
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    // The namespace, the clock and the locks. Plain calls, not futures:
    // they are syscalls that do not wait for a device, and their callers
    // are mostly synchronous helpers. The defaults are the real thing; a
    // simulated world (the deterministic simulation in tests) overrides
    // every one, so that no engine path reaches the host behind its back.

    /// Open a file by name (see [`OpenHow`]); the default refuses anything
    /// but a regular file (or a block device where `block_ok`).
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        file::os_open(path, how).map(Handle::Os)
    }
    /// The O_DIRECT transfer alignment of an open file.
    fn dio_alignment(&self, fd: RawFd) -> u32 {
        file::os_dio_alignment(fd)
    }
    /// What an open file is now: kind, links, length, identity (fstat).
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        file::os_fstat(fd)
    }
    /// The first offset at or after `at` that holds data (SEEK_DATA), or
    /// None when only holes follow.
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        file::os_seek_data(fd, at)
    }
    /// What a name is, without following a final symbolic link; None when
    /// nothing has that name.
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        file::os_stat(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        std::fs::canonicalize(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    /// Make one directory: EEXIST when the name is taken (a receive's
    /// temporary disk directory, made exclusively).
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    /// Remove an empty directory (rmdir).
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    /// Unlink a file (its directory's sync makes that durable).
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    /// Rename without replacing: EEXIST when `to` exists.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        file::os_rename_noreplace(from, to)
    }
    /// The names in a directory (the simulation's file-set check, cleanup
    /// of leftovers).
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect()
    }
    /// Take, convert or drop a whole-file lock without waiting
    /// (flock(2) with LOCK_NB): EWOULDBLOCK while another open file
    /// description holds a conflicting one.
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        file::os_flock(fd, how)
    }
    /// Take, convert or drop a byte-range lock `(start, len)` owned by
    /// the open file description, without waiting (F_OFD_SETLK): EAGAIN
    /// or EACCES while another holds a conflicting one. It shares the lock
    /// space of POSIX record locks (ploop's disk lock).
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()> {
        file::os_ofd_lock(fd, range, how)
    }
    /// Whether another holds a lock on `range` that a write lock would
    /// conflict with (F_OFD_GETLK): Some(its pid), -1 when unknown.
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>> {
        file::os_ofd_holder(fd, range)
    }
    /// Whether files in `dir` die with the power but outlive the process
    /// (tmpfs): where a record may live that a kill must not lose and a
    /// power cut must (the link log).
    fn is_volatile_dir(&self, dir: &Path) -> io::Result<bool> {
        file::os_is_tmpfs(dir)
    }
    /// Whether zeros written into the open file stay data that SEEK_DATA
    /// finds (a link log's replay takes a hole for a released copy).
    fn keeps_written_zeros(&self, fd: RawFd) -> bool {
        file::os_keeps_written_zeros(fd)
    }
    /// Drop the open file's clean pages from the page cache
    /// (POSIX_FADV_DONTNEED), so that what is read next comes from the
    /// disk: a page whose writeback failed stays cached, clean, showing
    /// bytes the disk does not hold.
    fn drop_clean_cache(&self, fd: RawFd) -> io::Result<()> {
        file::os_drop_clean_cache(fd)
    }
    /// Now, for deadlines and pacing (only differences are ever used).
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
    /// Wait without yielding (a lock retry loop in synchronous code, a
    /// paced job). On a ring, the ring's deferred work runs before and
    /// after the wait: it may be what still holds a lock (see
    /// `Submit::run_task_work`).
    fn sleep_blocking(&self, d: std::time::Duration) {
        std::thread::sleep(d)
    }

    /// Zero copy: read from `fd` into a buffer registered on the ring.
    /// Only a ring that holds registered buffers can; the rest refuse.
    async fn read_fixed(&self, _fd: RawFd, _buf: FixedBuf, _offset: u64) -> io::Result<()> {
        Err(no_fixed_buffers())
    }
    /// Zero copy: write a registered buffer's bytes to `fd`.
    async fn write_fixed(&self, _fd: RawFd, _buf: FixedBuf, _offset: u64) -> io::Result<()> {
        Err(no_fixed_buffers())
    }
    /// Zero copy: make a registered buffer's range read as zeros.
    async fn zero_fixed(&self, _buf: FixedBuf) -> io::Result<()> {
        Err(no_fixed_buffers())
    }
    /// Zero copy: put bytes made in memory (an inflated QCOW2 cluster)
    /// into a registered buffer.
    async fn copy_to_fixed(&self, _data: &[u8], _buf: FixedBuf) -> io::Result<()> {
        Err(no_fixed_buffers())
    }
}

fn no_fixed_buffers() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "this I/O path has no registered buffers")
}

/// A byte range of a buffer registered on the ring (zero copy): the ublk
/// driver registers each request's pages at an index of the queue's ring,
/// and transfers name them by index instead of by address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedBuf {
    pub index: u16,
    /// The address the ring knows the buffer's first byte by: 0 for a
    /// kernel buffer (ublk's), the memory address for user memory.
    pub base: u64,
    /// Where the range starts within the buffer, and its length.
    pub off: usize,
    pub len: usize,
}

impl FixedBuf {
    /// The part `[off, off + len)` of this range.
    pub fn slice(self, off: usize, len: usize) -> FixedBuf {
        debug_assert!(off + len <= self.len);
        FixedBuf { off: self.off + off, len, ..self }
    }
}

impl<T: Io + ?Sized> Io for &T {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(fd, buf, offset).await
    }
    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(fd, buf, offset).await
    }
    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        (**self).sync_data(fd).await
    }
    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(fd, offset, len).await
    }
    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(fd, offset, len).await
    }
    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        (**self).set_len(fd, len).await
    }
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        (**self).rename(from, to).await
    }
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        (**self).sync_dir(dir).await
    }
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        (**self).open(path, how)
    }
    fn dio_alignment(&self, fd: RawFd) -> u32 {
        (**self).dio_alignment(fd)
    }
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        (**self).fstat(fd)
    }
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        (**self).seek_data(fd, at)
    }
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        (**self).stat(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        (**self).canonicalize(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        (**self).create_dir_all(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        (**self).create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        (**self).remove_dir(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        (**self).remove_file(path)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        (**self).rename_noreplace(from, to)
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        (**self).read_dir(dir)
    }
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        (**self).flock(fd, how)
    }
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()> {
        (**self).ofd_lock(fd, range, how)
    }
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>> {
        (**self).ofd_holder(fd, range)
    }
    fn is_volatile_dir(&self, dir: &Path) -> io::Result<bool> {
        (**self).is_volatile_dir(dir)
    }
    fn keeps_written_zeros(&self, fd: RawFd) -> bool {
        (**self).keeps_written_zeros(fd)
    }
    fn drop_clean_cache(&self, fd: RawFd) -> io::Result<()> {
        (**self).drop_clean_cache(fd)
    }
    fn now(&self) -> std::time::Instant {
        (**self).now()
    }
    fn sleep_blocking(&self, d: std::time::Duration) {
        (**self).sleep_blocking(d)
    }
    async fn read_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        (**self).read_fixed(fd, buf, offset).await
    }
    async fn write_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        (**self).write_fixed(fd, buf, offset).await
    }
    async fn zero_fixed(&self, buf: FixedBuf) -> io::Result<()> {
        (**self).zero_fixed(buf).await
    }
    async fn copy_to_fixed(&self, data: &[u8], buf: FixedBuf) -> io::Result<()> {
        (**self).copy_to_fixed(data, buf).await
    }
}

/// Run futures together and return their results in order: every one is
/// polled to completion even when another fails (see [`Io`]).
/// Run `work` on every item, `n` at a time: each of `n` workers takes the
/// next item as soon as its last one is done, so that I/O stays in flight
/// without pauses (a batch would wait for its slowest member). Stops
/// taking items at the first error, which it returns; `done` is called
/// with the count finished so far after each item.
pub async fn for_each_in_flight<T, Fut>(
    n: usize,
    items: &[T],
    work: impl Fn(&T) -> Fut,
    done: impl Fn(u64),
) -> crate::Result<()>
where
    Fut: std::future::Future<Output = crate::Result<()>>,
{
    let next = std::cell::Cell::new(0usize);
    let finished = std::cell::Cell::new(0u64);
    let failed = std::cell::Cell::new(false);
    let worker = || async {
        loop {
            let i = next.get();
            if i >= items.len() || failed.get() {
                return Ok(());
            }
            next.set(i + 1);
            if let Err(e) = work(&items[i]).await {
                failed.set(true);
                return Err(e);
            }
            finished.set(finished.get() + 1);
            done(finished.get());
        }
    };
    for r in join_all((0..n.max(1)).map(|_| worker()).collect()).await {
        r?;
    }
    Ok(())
}

pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(|f| futures_lite::future::FutureExt::boxed_local(f)).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(outputs.iter_mut().map(|o| o.take().expect("all ready")).collect())
        }
    })
    .await
}

/// Which I/O engine an offline command uses, as named on the command line.
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
