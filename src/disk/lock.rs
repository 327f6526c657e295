//! ploop's disk lock, so that ploop's tools and ours exclude each other
//! while one of them changes a disk: ploop 9 takes fcntl byte-range locks on
//! the base delta (tests for a conflicting lock on bytes [200, 205), takes a
//! read lock there, tests again), ploop 7 an flock on
//! `DiskDescriptor.xml.lck`. We take both. The byte-range lock is an
//! open-file-description lock: it lives in the same lock space as ploop's
//! POSIX locks, but is not dropped when this process closes some other
//! descriptor of the base file (a POSIX lock would be).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{Handle, Io, LockHow, OpenHow};

const RANGE: (u64, u64) = (200, 5);

/// Held while a disk is being changed; dropping it releases what it holds.
/// A device holds the byte-range lock for its whole life and takes the
/// `.lck` flock for each change ([`DiskLock::changes`]); a clone of a
/// snapshot of a served template takes the flock and a read lock beside
/// the device's ([`DiskLock::take_beside_device`]).
pub struct DiskLock {
    range: Option<(Handle, std::path::PathBuf)>,
    lck: Option<Handle>,
}

impl std::fmt::Debug for DiskLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLock").field("base", &self.base()).field("lck", &self.lck.is_some()).finish()
    }
}

/// Whether a holder of the byte-range lock, as `ofd_holder` names it, is
/// an open file description (ours: the kernel gives no pid for those)
/// rather than a process (ploop's POSIX lock).
fn held_by_description(who: Option<i32>) -> bool {
    who.is_some_and(|pid| pid < 0)
}

/// Take the byte-range read lock on an opened base delta, or say who
/// holds a conflicting one: tested before and after taking it, since
/// another process may take its read lock at the same time.
fn lock_range<I: Io + ?Sized>(io: &I, base: &Handle, path: &Path, busy: impl Fn(Option<i32>, &str) -> Error) -> Result<()> {
    let io_err = |e| Error::io(e, path.display());
    if let Some(who) = io.ofd_holder(base.fd(), RANGE).map_err(io_err)? {
        return Err(busy(Some(who), "byte-range lock on the base delta"));
    }
    io.ofd_lock(base.fd(), RANGE, LockHow::Shared).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => busy(None, "byte-range lock on the base delta"),
        _ => io_err(e),
    })?;
    if let Some(who) = io.ofd_holder(base.fd(), RANGE).map_err(io_err)? {
        return Err(busy(Some(who), "byte-range lock on the base delta, taken at the same time"));
    }
    Ok(())
}

fn open_base<I: Io + ?Sized>(io: &I, base: &Path) -> Result<Handle> {
    io.open(base, &OpenHow { block_ok: true, ..OpenHow::read() }).map_err(|e| Error::io(e, base.display()))
}

/// How long to wait for another holder to let go (ploop waits 60 s).
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Try `take` until it succeeds, fails otherwise than busy, or `WAIT` ends.
fn waiting<I: Io + ?Sized>(io: &I, take: impl Fn() -> Result<DiskLock>) -> Result<DiskLock> {
    let start = io.now();
    loop {
        match take() {
            Err(e) if e.errno() == libc::EBUSY && io.now().duration_since(start) < WAIT => io.sleep_blocking(std::time::Duration::from_millis(50)),
            other => return other,
        }
    }
}

fn busy_error(xml: &Path) -> impl Fn(Option<i32>, &str) -> Error + '_ {
    move |who: Option<i32>, what: &str| {
        let by = match who {
            Some(pid) if pid > 0 => format!(", pid {pid}"),
            _ => String::new(),
        };
        Error::new(libc::EBUSY, format!("{}: the disk is locked by another process ({what}{by})", xml.display()))
    }
}

impl DiskLock {
    /// Take the lock, waiting a while if another process holds it.
    pub fn take<I: Io + ?Sized>(io: &I, xml: &Path, base: &Path) -> Result<DiskLock> {
        waiting(io, || Self::try_take(io, xml, base, false))
    }

    /// The `.lck` flock alone, waiting a while: for each change a device
    /// makes under the byte-range lock it holds for its life.
    pub fn changes<I: Io + ?Sized>(io: &I, xml: &Path) -> Result<DiskLock> {
        waiting(io, || Ok(DiskLock { range: None, lck: Self::try_lck(io, xml)? }))
    }

    /// The lock for reading a disk's chain that a device of ours serves
    /// (the caller checked: a clone of one of its snapshots): the `.lck`
    /// flock keeps the device's changes and our other commands out
    /// meanwhile (each takes it). The byte-range lock is tested and taken
    /// as by `take` unless an open file description holds it (the device:
    /// ploop's are POSIX locks of a process); then a read lock is taken
    /// beside it, untested.
    pub fn take_beside_device<I: Io + ?Sized>(io: &I, xml: &Path, base: &Path) -> Result<DiskLock> {
        waiting(io, || Self::try_take(io, xml, base, true))
    }

    /// Whether this lock holds the `.lck` flock (a device's life lock lets
    /// go of it between changes).
    pub fn holds_changes(&self) -> bool {
        self.lck.is_some()
    }

    /// Let go of the `.lck` flock, keeping the byte-range lock: a device
    /// holds that for its life and takes the flock for each change.
    pub fn release_changes(&mut self) {
        self.lck = None;
    }

    /// ploop 7's flock on `DiskDescriptor.xml.lck`.
    fn try_lck<I: Io + ?Sized>(io: &I, xml: &Path) -> Result<Option<Handle>> {
        let busy = busy_error(xml);
        let lck_path = xml.with_file_name(format!(
            "{}.lck",
            xml.file_name().and_then(|n| n.to_str()).unwrap_or(super::DESCRIPTOR)
        ));
        // Never through a symlink: a dangling one planted there would have
        // us create its target (as root).
        let how = OpenHow { write: true, create: true, mode: 0o666, nofollow: true, ..OpenHow::default() };
        let lck_err = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::new(libc::ELOOP, format!("{}: is a symbolic link; refusing to lock through it", lck_path.display())),
            _ => Error::io(e, lck_path.display()),
        };
        // On read-only storage (a template on a read-only mount) nothing
        // here can change the disk, so a reader's lock is enough: a shared
        // flock on the .lck file if some writer made one, none if not.
        let (lck, how) = match io.open(&lck_path, &how) {
            Ok(lck) => (Some(lck), LockHow::Exclusive),
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                match io.open(&lck_path, &OpenHow { nofollow: true, ..OpenHow::read() }) {
                    Ok(lck) => (Some(lck), LockHow::Shared),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => (None, LockHow::Shared),
                    Err(e) => return Err(lck_err(e)),
                }
            }
            Err(e) => return Err(lck_err(e)),
        };
        if let Some(lck) = &lck {
            if io.flock(lck.fd(), how).is_err() {
                return Err(busy(None, "flock on the .lck file"));
            }
        }
        Ok(lck)
    }

    fn try_take<I: Io + ?Sized>(io: &I, xml: &Path, base: &Path, beside_device: bool) -> Result<DiskLock> {
        let lck = Self::try_lck(io, xml)?;
        let base_file = open_base(io, base)?;
        if beside_device {
            let who = io.ofd_holder(base_file.fd(), RANGE).map_err(|e| Error::io(e, base.display()))?;
            if held_by_description(who) {
                // A read lock beside the device's (read locks do not
                // conflict), so that ploop finds the disk locked even if
                // the device stops meanwhile.
                io.ofd_lock(base_file.fd(), RANGE, LockHow::Shared).map_err(|e| Error::io(e, base.display()))?;
                return Ok(DiskLock { range: Some((base_file, base.to_path_buf())), lck });
            }
        }
        lock_range(io, &base_file, base, busy_error(xml))?;
        Ok(DiskLock { range: Some((base_file, base.to_path_buf())), lck })
    }

    /// The base delta the byte-range lock is on, if this lock holds it.
    pub fn base(&self) -> Option<&Path> {
        self.range.as_ref().map(|(_, p)| p.as_path())
    }

    /// Move the byte-range lock to another base delta (an operation under
    /// this lock made another file the base), keeping the `.lck` flock
    /// throughout: the new range is locked before the old one is let go.
    pub fn rebase<I: Io + ?Sized>(&mut self, io: &I, base: &Path) -> Result<()> {
        let busy = |who: Option<i32>, _: &str| {
            let by = who.filter(|&p| p > 0).map(|p| format!(", pid {p}")).unwrap_or_default();
            Error::new(libc::EBUSY, format!("{}: the new base delta is locked by another process{by}", base.display()))
        };
        let file = open_base(io, base)?;
        lock_range(io, &file, base, busy)?;
        self.range = Some((file, base.to_path_buf()));
        Ok(())
    }
}
