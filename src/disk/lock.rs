//! ploop's disk lock, so that ploop's tools and ours exclude each other
//! while one of them changes a disk: ploop 9 takes fcntl byte-range locks on
//! the base delta (tests for a conflicting lock on bytes [200, 205), takes a
//! read lock there, tests again), ploop 7 an flock on
//! `DiskDescriptor.xml.lck`. We take both. The byte-range lock is an
//! open-file-description lock: it lives in the same lock space as ploop's
//! POSIX locks, but is not dropped when this process closes some other
//! descriptor of the base file (a POSIX lock would be).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

const RANGE: (i64, i64) = (200, 5);

/// Held while a disk is being changed; dropping it releases both locks.
pub struct DiskLock {
    base: File,
    base_path: std::path::PathBuf,
    _lck: File,
}

impl std::fmt::Debug for DiskLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLock").field("base", &self.base_path).finish()
    }
}

fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_short) -> std::io::Result<libc::flock> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = RANGE.0;
    fl.l_len = RANGE.1;
    // SAFETY: fcntl with a flock struct we own, on our descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

/// Somebody else's lock on the range, if any: who (a pid, -1 when unknown).
fn conflicting(file: &File) -> std::io::Result<Option<i32>> {
    let fl = ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short)?;
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

/// How long to wait for another holder to let go (ploop waits 60 s).
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl DiskLock {
    /// Take the lock, waiting a while if another process holds it.
    pub fn take(xml: &Path, base: &Path) -> Result<DiskLock> {
        let start = std::time::Instant::now();
        loop {
            match Self::try_take(xml, base) {
                Err(e) if e.errno() == libc::EBUSY && start.elapsed() < WAIT => std::thread::sleep(std::time::Duration::from_millis(50)),
                other => return other,
            }
        }
    }

    fn try_take(xml: &Path, base: &Path) -> Result<DiskLock> {
        let busy = |who: Option<i32>, what: &str| {
            let by = match who {
                Some(pid) if pid > 0 => format!(", pid {pid}"),
                _ => String::new(),
            };
            Error::new(libc::EBUSY, format!("{}: the disk is locked by another process ({what}{by})", xml.display()))
        };
        let lck_path = xml.with_file_name(format!(
            "{}.lck",
            xml.file_name().and_then(|n| n.to_str()).unwrap_or(super::DESCRIPTOR)
        ));
        // Never through a symlink: a dangling one planted there would have
        // us create its target (as root).
        use std::os::unix::fs::OpenOptionsExt;
        let lck = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lck_path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::new(libc::ELOOP, format!("{}: is a symbolic link; refusing to lock through it", lck_path.display())),
                _ => Error::io(e, lck_path.display()),
            })?;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::flock(lck.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(busy(None, "flock on the .lck file"));
        }
        let base_file = crate::io::open_named(base, false, 0, true).map_err(|e| Error::io(e, base.display()))?;
        let io_err = |e| Error::io(e, base.display());
        if let Some(who) = conflicting(&base_file).map_err(io_err)? {
            return Err(busy(Some(who), "byte-range lock on the base delta"));
        }
        ofd_lock(&base_file, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short).map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => busy(None, "byte-range lock on the base delta"),
            _ => io_err(e),
        })?;
        // Another process may have taken its read lock at the same time.
        if let Some(who) = conflicting(&base_file).map_err(io_err)? {
            return Err(busy(Some(who), "byte-range lock on the base delta, taken at the same time"));
        }
        Ok(DiskLock { base: base_file, base_path: base.to_path_buf(), _lck: lck })
    }

    /// The base delta the byte-range lock is on.
    pub fn base(&self) -> &Path {
        &self.base_path
    }

    /// Move the byte-range lock to another base delta (an operation under
    /// this lock made another file the base), keeping the `.lck` flock
    /// throughout: the new range is locked before the old one is let go.
    pub fn rebase(&mut self, base: &Path) -> Result<()> {
        let busy = |who: Option<i32>| {
            let by = who.filter(|&p| p > 0).map(|p| format!(", pid {p}")).unwrap_or_default();
            Error::new(libc::EBUSY, format!("{}: the new base delta is locked by another process{by}", base.display()))
        };
        let file = crate::io::open_named(base, false, 0, true).map_err(|e| Error::io(e, base.display()))?;
        let io_err = |e| Error::io(e, base.display());
        if let Some(who) = conflicting(&file).map_err(io_err)? {
            return Err(busy(Some(who)));
        }
        ofd_lock(&file, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short).map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => busy(None),
            _ => io_err(e),
        })?;
        self.base = file;
        self.base_path = base.to_path_buf();
        Ok(())
    }
}
