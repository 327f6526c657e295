//! The one I/O wrapper of the tests: [`Hooked`] passes every operation of
//! the engine's `Io` trait through a [`Hook`], which may fail it, hold it,
//! count it, or change its result, and otherwise runs it on the wrapped
//! I/O. Fault injection, power cuts, a full disk and hand-built
//! interleavings are each a hook; the forwarding is written once, here.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ublk_ploop::io::{FileStat, FixedBuf, Handle, Io, LockHow, OpenHow};

/// What an operation does, as a hook sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Sync,
    Punch,
    /// The file growing ahead (fallocate).
    Grow,
    /// The file's length set (trimming on open, giving space back on close).
    Truncate,
    /// A rename (the descriptor's temporary file over the descriptor).
    Rename,
    SyncDir,
    ReadFixed,
    WriteFixed,
    ZeroFixed,
    CopyToFixed,
}

/// One operation: its kind, file, and byte range (0 where it has none).
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: Kind,
    /// -1 for the operations on paths and on registered buffers alone.
    pub fd: RawFd,
    pub offset: u64,
    pub len: u64,
}

/// An operation with its arguments, to run on the wrapped I/O.
pub enum Call<'a> {
    Read(RawFd, &'a mut [u8], u64),
    Write(RawFd, &'a [u8], u64),
    Sync(RawFd),
    Allocate(RawFd, u64, u64),
    Punch(RawFd, u64, u64),
    SetLen(RawFd, u64),
    Rename(&'a Path, &'a Path),
    SyncDir(&'a Path),
    ReadFixed(RawFd, FixedBuf, u64),
    WriteFixed(RawFd, FixedBuf, u64),
    ZeroFixed(FixedBuf),
    CopyToFixed(&'a [u8], FixedBuf),
}

impl Call<'_> {
    pub fn op(&self) -> Op {
        let (kind, fd, offset, len) = match self {
            Call::Read(fd, buf, at) => (Kind::Read, *fd, *at, buf.len() as u64),
            Call::Write(fd, buf, at) => (Kind::Write, *fd, *at, buf.len() as u64),
            Call::Sync(fd) => (Kind::Sync, *fd, 0, 0),
            Call::Allocate(fd, at, len) => (Kind::Grow, *fd, *at, *len),
            Call::Punch(fd, at, len) => (Kind::Punch, *fd, *at, *len),
            Call::SetLen(fd, len) => (Kind::Truncate, *fd, *len, 0),
            Call::Rename(..) => (Kind::Rename, -1, 0, 0),
            Call::SyncDir(_) => (Kind::SyncDir, -1, 0, 0),
            Call::ReadFixed(fd, buf, at) => (Kind::ReadFixed, *fd, *at, buf.len as u64),
            Call::WriteFixed(fd, buf, at) => (Kind::WriteFixed, *fd, *at, buf.len as u64),
            Call::ZeroFixed(buf) => (Kind::ZeroFixed, -1, 0, buf.len as u64),
            Call::CopyToFixed(_, buf) => (Kind::CopyToFixed, -1, 0, buf.len as u64),
        };
        Op { kind, fd, offset, len }
    }

    /// Run this operation on `io`.
    pub async fn on<I: Io>(self, io: &I) -> io::Result<()> {
        match self {
            Call::Read(fd, buf, at) => io.read_at(fd, buf, at).await,
            Call::Write(fd, buf, at) => io.write_at(fd, buf, at).await,
            Call::Sync(fd) => io.sync_data(fd).await,
            Call::Allocate(fd, at, len) => io.allocate(fd, at, len).await,
            Call::Punch(fd, at, len) => io.punch_hole(fd, at, len).await,
            Call::SetLen(fd, len) => io.set_len(fd, len).await,
            Call::Rename(from, to) => io.rename(from, to).await,
            Call::SyncDir(dir) => io.sync_dir(dir).await,
            Call::ReadFixed(fd, buf, at) => io.read_fixed(fd, buf, at).await,
            Call::WriteFixed(fd, buf, at) => io.write_fixed(fd, buf, at).await,
            Call::ZeroFixed(buf) => io.zero_fixed(buf).await,
            Call::CopyToFixed(data, buf) => io.copy_to_fixed(data, buf).await,
        }
    }
}

/// What a [`Hooked`] wraps: any `Io`, or a choice among several (see
/// `AnyIo`), which runs each call on the one it holds.
#[allow(async_fn_in_trait)]
pub trait Backend {
    async fn call(&self, call: Call<'_>) -> io::Result<()>;
    /// The wrapped I/O's namespace, lock and clock calls (no hook sees
    /// them; they go to the wrapped I/O, never around it to the host).
    fn plain(&self) -> &dyn Plain;
}

impl<I: Io> Backend for I {
    async fn call(&self, call: Call<'_>) -> io::Result<()> {
        call.on(self).await
    }
    fn plain(&self) -> &dyn Plain {
        self
    }
}

/// The plain (not async) methods of `Io`, as an object: a `Backend` that
/// chooses among several I/Os hands out the one it holds.
pub trait Plain {
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle>;
    fn dio_alignment(&self, fd: RawFd) -> u32;
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat>;
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>>;
    fn keeps_written_zeros(&self, fd: RawFd) -> bool;
    fn drop_clean_cache(&self, fd: RawFd) -> io::Result<()>;
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>>;
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()>;
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()>;
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>>;
    fn now(&self) -> Instant;
    fn sleep_blocking(&self, d: Duration);
}

impl<I: Io> Plain for I {
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        Io::open(self, path, how)
    }
    fn dio_alignment(&self, fd: RawFd) -> u32 {
        Io::dio_alignment(self, fd)
    }
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        Io::fstat(self, fd)
    }
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        Io::seek_data(self, fd, at)
    }
    fn keeps_written_zeros(&self, fd: RawFd) -> bool {
        Io::keeps_written_zeros(self, fd)
    }
    fn drop_clean_cache(&self, fd: RawFd) -> io::Result<()> {
        Io::drop_clean_cache(self, fd)
    }
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        Io::stat(self, path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        Io::canonicalize(self, path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        Io::create_dir_all(self, path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        Io::create_dir(self, path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        Io::remove_dir(self, path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        Io::remove_file(self, path)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        Io::rename_noreplace(self, from, to)
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        Io::read_dir(self, dir)
    }
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        Io::flock(self, fd, how)
    }
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()> {
        Io::ofd_lock(self, fd, range, how)
    }
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>> {
        Io::ofd_holder(self, fd, range)
    }
    fn now(&self) -> Instant {
        Io::now(self)
    }
    fn sleep_blocking(&self, d: Duration) {
        Io::sleep_blocking(self, d)
    }
}

/// What happens around each operation. `run` is the operation on the
/// wrapped I/O, not started yet: a hook that returns without awaiting it
/// fails the operation before it touches the file.
#[allow(async_fn_in_trait)]
pub trait Hook {
    async fn around(&self, op: Op, run: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        let _ = op;
        run.await
    }
    /// Sees each open before it happens (to count them).
    fn opening(&self, path: &Path, how: &OpenHow) {
        let _ = (path, how);
    }
}

/// No hook: the wrapped I/O as it is.
impl Hook for () {}

/// I/O `inner`, every operation passed through `hook`. Derefs to the hook,
/// so a test reaches its knobs and counters through the wrapper.
pub struct Hooked<B, H> {
    pub inner: B,
    pub hook: H,
}

impl<B, H> std::ops::Deref for Hooked<B, H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.hook
    }
}

impl<B: Backend, H: Hook> Hooked<B, H> {
    async fn go(&self, call: Call<'_>) -> io::Result<()> {
        let op = call.op();
        self.hook.around(op, self.inner.call(call)).await
    }
}

impl<B: Backend, H: Hook> Io for Hooked<B, H> {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.go(Call::Read(fd, buf, offset)).await
    }
    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        self.go(Call::Write(fd, buf, offset)).await
    }
    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        self.go(Call::Sync(fd)).await
    }
    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.go(Call::Allocate(fd, offset, len)).await
    }
    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.go(Call::Punch(fd, offset, len)).await
    }
    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        self.go(Call::SetLen(fd, len)).await
    }
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.go(Call::Rename(from, to)).await
    }
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.go(Call::SyncDir(dir)).await
    }
    async fn read_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        self.go(Call::ReadFixed(fd, buf, offset)).await
    }
    async fn write_fixed(&self, fd: RawFd, buf: FixedBuf, offset: u64) -> io::Result<()> {
        self.go(Call::WriteFixed(fd, buf, offset)).await
    }
    async fn zero_fixed(&self, buf: FixedBuf) -> io::Result<()> {
        self.go(Call::ZeroFixed(buf)).await
    }
    async fn copy_to_fixed(&self, data: &[u8], buf: FixedBuf) -> io::Result<()> {
        self.go(Call::CopyToFixed(data, buf)).await
    }
    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        self.hook.opening(path, how);
        self.inner.plain().open(path, how)
    }
    fn dio_alignment(&self, fd: RawFd) -> u32 {
        self.inner.plain().dio_alignment(fd)
    }
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        self.inner.plain().fstat(fd)
    }
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        self.inner.plain().seek_data(fd, at)
    }
    fn keeps_written_zeros(&self, fd: RawFd) -> bool {
        self.inner.plain().keeps_written_zeros(fd)
    }
    fn drop_clean_cache(&self, fd: RawFd) -> io::Result<()> {
        self.inner.plain().drop_clean_cache(fd)
    }
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        self.inner.plain().stat(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.plain().canonicalize(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.plain().create_dir_all(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.plain().create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.plain().remove_dir(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.plain().remove_file(path)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.plain().rename_noreplace(from, to)
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.inner.plain().read_dir(dir)
    }
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        self.inner.plain().flock(fd, how)
    }
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()> {
        self.inner.plain().ofd_lock(fd, range, how)
    }
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>> {
        self.inner.plain().ofd_holder(fd, range)
    }
    fn now(&self) -> Instant {
        self.inner.plain().now()
    }
    fn sleep_blocking(&self, d: Duration) {
        self.inner.plain().sleep_blocking(d)
    }
}

/// An error as the kernel reports it.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}
