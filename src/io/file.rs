//! Opening image files: O_DIRECT when the filesystem allows it, and the
//! alignment that O_DIRECT transfers must then respect.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether image files bypass the host page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direct {
    /// O_DIRECT, or buffered I/O with a logged warning where refused.
    #[default]
    Auto,
    /// O_DIRECT or fail: data is never cached twice.
    On,
    /// Buffered I/O (tests on filesystems without O_DIRECT, debugging).
    Off,
}

impl std::str::FromStr for Direct {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Direct::Auto),
            "on" | "yes" | "true" => Ok(Direct::On),
            "off" | "no" | "false" => Ok(Direct::Off),
            _ => Err(format!("'{s}': expected auto, on or off")),
        }
    }
}

/// An open image file and how it must be accessed.
#[derive(Debug)]
pub struct ImageFile {
    pub handle: Handle,
    pub path: PathBuf,
    pub writable: bool,
    pub direct: bool,
    /// Offsets and lengths of every transfer must be multiples of this.
    pub block_size: u32,
}

impl ImageFile {
    pub fn fd(&self) -> RawFd {
        self.handle.fd()
    }
    /// Another descriptor of the same opening (its lock, its offset and
    /// its writeback errors are shared); None for a simulated file.
    pub fn dup(&self) -> Option<ImageFile> {
        let Handle::Os(file) = &self.handle else { return None };
        let handle = Handle::Os(file.try_clone().ok()?);
        Some(ImageFile { handle, path: self.path.clone(), writable: self.writable, direct: self.direct, block_size: self.block_size })
    }
    #[allow(clippy::len_without_is_empty)]
    pub fn len_in<I: crate::io::Io + ?Sized>(&self, io: &I) -> Result<u64> {
        Ok(io.fstat(self.fd()).map_err(|e| Error::io(e, self.path.display()))?.len)
    }
}

/// An open file as an [`Io`](crate::io::Io) gave it: a real descriptor,
/// or a number a simulated world gave out (never a real descriptor, so a
/// syscall that bypasses the `Io` fails with EBADF instead of answering
/// about some other file). Closing a virtual one tells its world.
pub enum Handle {
    Os(File),
    Virtual { fd: RawFd, closer: std::sync::Arc<dyn Fn(RawFd) + Send + Sync> },
}

impl Handle {
    pub fn fd(&self) -> RawFd {
        match self {
            Handle::Os(f) => f.as_raw_fd(),
            Handle::Virtual { fd, .. } => *fd,
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Handle::Virtual { fd, closer } = self {
            closer(*fd)
        }
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handle::Os(file) => write!(f, "Os({})", file.as_raw_fd()),
            Handle::Virtual { fd, .. } => write!(f, "Virtual({fd})"),
        }
    }
}

/// How [`Io::open`](crate::io::Io::open) opens a name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenHow {
    pub write: bool,
    /// O_CREAT|O_EXCL with `mode`: the file must not exist yet.
    pub create_new: bool,
    /// O_CREAT with `mode`: made where missing, opened as it is otherwise
    /// (a lock file).
    pub create: bool,
    pub mode: u32,
    /// O_DIRECT; EINVAL where the filesystem refuses it.
    pub direct: bool,
    /// O_NOFOLLOW: a final symbolic link fails with ELOOP.
    pub nofollow: bool,
    /// A block device is acceptable too (a raw layer may be one).
    pub block_ok: bool,
}

impl OpenHow {
    pub fn read() -> OpenHow {
        OpenHow::default()
    }
    pub fn write() -> OpenHow {
        OpenHow { write: true, ..OpenHow::default() }
    }
    /// A new file only this user reads, written only through its name.
    pub fn create_new(mode: u32) -> OpenHow {
        OpenHow { write: true, create_new: true, mode, nofollow: true, ..OpenHow::default() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Block,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    pub kind: FileKind,
    pub nlink: u64,
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
    /// Birth time in ns (statx btime), 0 where the filesystem keeps none:
    /// with dev and ino it tells a file from a later one given the same
    /// inode number.
    pub born_ns: u64,
}

impl FileStat {
    fn of(m: &std::fs::Metadata) -> FileStat {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let t = m.file_type();
        let kind = if t.is_file() {
            FileKind::File
        } else if t.is_dir() {
            FileKind::Dir
        } else if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_block_device() {
            FileKind::Block
        } else {
            FileKind::Other
        };
        let born_ns = m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64);
        FileStat { kind, nlink: m.nlink(), len: m.len(), dev: m.dev(), ino: m.ino(), born_ns }
    }
}

/// A whole-file lock request (flock(2), never waiting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockHow {
    Shared,
    Exclusive,
    Unlock,
}

fn borrowed(fd: RawFd) -> std::mem::ManuallyDrop<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller owns `fd` for the duration; ManuallyDrop never closes it.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

pub(crate) fn os_fstat(fd: RawFd) -> std::io::Result<FileStat> {
    Ok(FileStat::of(&borrowed(fd).metadata()?))
}

pub(crate) fn os_stat(path: &Path) -> std::io::Result<Option<FileStat>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(FileStat::of(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn os_seek_data(fd: RawFd, at: u64) -> std::io::Result<Option<u64>> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    let next = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    if next >= 0 {
        return Ok(Some(next as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Filesystems whose flock(2) is a whole-file byte-range lock on the
/// server (NFS, SMB, 9p): there a flock and ploop's byte-range lock on the
/// same file conflict, even when one process holds both (a daemon holds
/// its base delta and takes ploop's lock for an online snapshot).
const FLOCK_AS_RANGE: [i64; 4] = [NFS_MAGIC, 0xFE53_4D42, 0xFF53_4D42, 0x0102_1997];

/// Where a whole-file lock goes on those filesystems instead: one byte
/// that neither ploop's lock ([200, 205)) nor qemu's (from 100 and 200)
/// touches, so it conflicts only with our own locks and with flocks
/// taken elsewhere (which cover the whole file).
const FLOCK_RANGE: (u64, u64) = (0, 1);

const NFS_MAGIC: i64 = 0x6969;

/// The type of the filesystem `fd` is on (statfs's f_type).
fn fs_magic(fd: RawFd) -> Option<i64> {
    // SAFETY: a zeroed statfs is a valid value; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on a descriptor the caller owns.
    let ok = unsafe { libc::fstatfs(fd, &mut st) == 0 };
    ok.then_some(st.f_type as i64)
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `dir` is on tmpfs (statfs's f_type).
pub(crate) fn os_is_tmpfs(dir: &Path) -> std::io::Result<bool> {
    // A path opening: a user who may only search the directory (the link
    // log directory is made so) may still ask what it is.
    let dir = OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(dir)?;
    Ok(fs_magic(dir.as_raw_fd()) == Some(TMPFS_MAGIC))
}

/// Filesystems that may store written zeros as holes: ZFS (with any
/// compression, all-zero blocks become holes), and those that report
/// another machine's or process's filesystem (NFS, SMB, FUSE, 9p, Ceph).
const MAY_HOLE_ZEROS: [i64; 7] = [0x2FC1_2FC1, NFS_MAGIC, 0xFE53_4D42, 0xFF53_4D42, 0x6573_5546, 0x0102_1997, 0x00C3_6400];

pub(crate) fn os_keeps_written_zeros(fd: RawFd) -> bool {
    fs_magic(fd).is_some_and(|m| !MAY_HOLE_ZEROS.contains(&m))
}

fn flock_is_range_lock(fd: RawFd) -> bool {
    fs_magic(fd).is_some_and(|m| FLOCK_AS_RANGE.contains(&m))
}

/// A whole-file lock that never waits: flock(2) where the filesystem keeps
/// it apart from byte-range locks, an open-file-description lock on
/// `FLOCK_RANGE` where it does not. Either way EWOULDBLOCK means another
/// open file description holds a conflicting one.
pub(crate) fn os_flock(fd: RawFd, how: LockHow) -> std::io::Result<()> {
    if flock_is_range_lock(fd) {
        return os_ofd_lock(fd, FLOCK_RANGE, how).map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) => std::io::Error::from_raw_os_error(libc::EWOULDBLOCK),
            _ => e,
        });
    }
    let op = match how {
        LockHow::Shared => libc::LOCK_SH | libc::LOCK_NB,
        LockHow::Exclusive => libc::LOCK_EX | libc::LOCK_NB,
        LockHow::Unlock => libc::LOCK_UN,
    };
    // SAFETY: plain syscall on a descriptor the caller owns.
    if unsafe { libc::flock(fd, op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn os_ofd(fd: RawFd, cmd: libc::c_int, kind: libc::c_int, (start, len): (u64, u64)) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid value; fcntl fills it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // SAFETY: fcntl with a flock struct we own, on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

pub(crate) fn os_ofd_lock(fd: RawFd, range: (u64, u64), how: LockHow) -> std::io::Result<()> {
    let kind = match how {
        LockHow::Shared => libc::F_RDLCK,
        LockHow::Exclusive => libc::F_WRLCK,
        LockHow::Unlock => libc::F_UNLCK,
    };
    os_ofd(fd, libc::F_OFD_SETLK, kind, range).map(|_| ())
}

pub(crate) fn os_ofd_holder(fd: RawFd, range: (u64, u64)) -> std::io::Result<Option<i32>> {
    let fl = os_ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK, range)?;
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

pub(crate) fn os_rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match nix::fcntl::renameat2(None, from, None, to, nix::fcntl::RenameFlags::RENAME_NOREPLACE) {
        // A filesystem without RENAME_NOREPLACE: link refuses an existing
        // name too (files only).
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) if !from.is_dir() => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        // ... and for a directory (NFS has no RENAME_NOREPLACE), rename(2)
        // itself refuses anything but an empty directory there.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => std::fs::rename(from, to),
        r => r.map_err(std::io::Error::from),
    }
}

pub(crate) fn os_open(path: &Path, how: &OpenHow) -> std::io::Result<File> {
    let mut extra = 0;
    if how.direct {
        extra |= libc::O_DIRECT;
    }
    if how.nofollow {
        extra |= libc::O_NOFOLLOW;
    }
    if how.create_new || how.create {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(how.create_new)
            .create(how.create)
            .truncate(false)
            .mode(how.mode)
            .custom_flags(extra | libc::O_CLOEXEC)
            .open(path)?;
        return Ok(file);
    }
    open_named(path, how.write, extra, how.block_ok)
}

/// True when `[at, at+len)` of the file holds no data blocks (a punched or
/// never written range).
pub fn is_hole<I: crate::io::Io + ?Sized>(io: &I, fd: RawFd, at: u64, len: u64) -> bool {
    // An error answers "data": the safe side, since a caller that takes a
    // range for a hole may drop it.
    match io.seek_data(fd, at) {
        Ok(Some(next)) => next >= at + len,
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Open a file a descriptor or a command line named, for reading (and
/// writing with `write`). It is opened without blocking, so a FIFO or a
/// device planted under the name cannot hang the command, and refused
/// unless it is a regular file (or a block device where `block_ok`:
/// a raw layer may be one). `extra` adds open flags (O_DIRECT,
/// O_NOFOLLOW); the non-blocking flag is cleared again before returning,
/// since io_uring would take it as a request for non-blocking I/O.
pub fn open_named(path: &Path, write: bool, extra: i32, block_ok: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(extra | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(kind.is_file() || (block_ok && kind.is_block_device())) {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}, not an image or descriptor file; refused")));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// See `Io::drop_clean_cache`.
pub fn os_drop_clean_cache(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: advice on an open descriptor; no memory is passed.
    match unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

pub fn open_image_file(path: &Path, writable: bool, direct: Direct) -> Result<ImageFile> {
    open_image_file_in(&crate::io::SyncIo, path, writable, direct)
}

/// Open an image through `io`: O_DIRECT where the filesystem allows it
/// (or refuse, or use buffered I/O, as `direct` says).
pub fn open_image_file_in<I: crate::io::Io + ?Sized>(io: &I, path: &Path, writable: bool, direct: Direct) -> Result<ImageFile> {
    // A file is written only through its own name, never through a symlink
    // (which could lead anywhere); reading through one is fine.
    let open = |direct: bool| io.open(path, &OpenHow { write: writable, nofollow: writable, direct, block_ok: true, ..OpenHow::default() });
    let (handle, is_direct) = match direct {
        Direct::Off => (open(false), false),
        Direct::On | Direct::Auto => match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct == Direct::Auto => {
                tracing::warn!(
                    path = %path.display(),
                    "filesystem refuses O_DIRECT; using buffered I/O, so image data is also cached by the host"
                );
                (open(false), false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("{}: the filesystem does not support O_DIRECT (use --direct=off to allow buffered I/O)", path.display()),
                ))
            }
            other => (other, true),
        },
    };
    let handle = handle.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) if writable => Error::new(
            libc::ELOOP,
            format!("{}: is a symbolic link; an image is written only through its own name, never through a link", path.display()),
        ),
        _ => Error::io(e, path.display()),
    })?;
    let block_size = if is_direct { io.dio_alignment(handle.fd()) } else { 512 };
    Ok(ImageFile { handle, path: path.to_path_buf(), writable, direct: is_direct, block_size })
}

/// The O_DIRECT offset alignment the kernel reports (statx DIOALIGN), at
/// least one sector; 4096 when the kernel cannot tell, which is always safe.
pub(crate) fn os_dio_alignment(fd: RawFd) -> u32 {
    // SAFETY: statx fills the zeroed struct; the path is empty and
    // AT_EMPTY_PATH makes it describe the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        stx.stx_dio_offset_align.max(512)
    } else if fs_magic(fd) == Some(NFS_MAGIC) {
        // NFS's direct I/O has no alignment rule, but not every kernel
        // says so: 4096 there would give a disk moved onto NFS 4 KiB
        // sectors, and a filesystem of 1 KiB blocks in it would no longer
        // mount.
        512
    } else {
        4096
    }
}
