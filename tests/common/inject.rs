//! The faults the tests inject, as hooks on [`Hooked`]: [`Injection`]
//! counts every operation of the engine, fails a chosen one with EIO (once,
//! or for good: the disk dies), and keeps an undo log of writes no sync has
//! made durable yet, so that a power cut can be simulated afterwards;
//! [`FailEvery`] fails every operation of one kind with one errno (a full
//! disk, a filesystem without punch_hole, a disk whose syncs all fail).

use std::cell::RefCell;
use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use ublk_ploop::io::{block_on, AlignedBuf, Io, SyncIo};

use super::hooked::{errno, Hook, Hooked, Op};
pub use super::hooked::Kind;

#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub kind: Kind,
    pub index: u64,
    pub sticky: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
    pub punches: u64,
    pub grows: u64,
    pub truncates: u64,
    pub renames: u64,
}

impl Counts {
    /// The counter of `kind`; None for the kinds not counted (directory
    /// syncs and registered buffers, which no fault run targets).
    pub fn get(&mut self, kind: Kind) -> Option<&mut u64> {
        match kind {
            Kind::Read => Some(&mut self.reads),
            Kind::Write => Some(&mut self.writes),
            Kind::Sync => Some(&mut self.syncs),
            Kind::Punch => Some(&mut self.punches),
            Kind::Grow => Some(&mut self.grows),
            Kind::Truncate => Some(&mut self.truncates),
            Kind::Rename => Some(&mut self.renames),
            Kind::SyncDir | Kind::ReadFixed | Kind::WriteFixed | Kind::ZeroFixed | Kind::CopyToFixed => None,
        }
    }

    /// The fault table of a sweep: every operation of `kinds` these counts
    /// saw, as (kind, index among its kind, how many of its kind).
    pub fn points(mut self, kinds: &[Kind]) -> Vec<(Kind, u64, u64)> {
        let mut out = vec![];
        for &kind in kinds {
            let n = *self.get(kind).expect("a counted kind");
            out.extend((0..n).map(|index| (kind, index, n)));
        }
        out
    }
}

/// Which of the writes that no sync covered are lost in a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// No power cut: the process died, the page cache survives.
    None,
    All,
    /// Header/BAT writes are lost, data writes reached the disk.
    MetaOnly,
    /// Data writes (and punches) are lost, header/BAT writes reached it.
    DataOnly,
}

/// A file, by identity: descriptor numbers are reused.
pub type FileId = (u64, u64);

pub fn file_id(fd: RawFd) -> FileId {
    let st = nix::sys::stat::fstat(fd).expect("fstat");
    (st.st_dev, st.st_ino)
}

pub enum Undo {
    /// Bytes a write or punch replaced.
    Bytes { file: FileId, path: PathBuf, offset: u64, old: AlignedBuf },
    /// The length a grow or truncate changed (lost in a full cut only).
    Len { file: FileId, path: PathBuf, old: u64 },
}

#[derive(Default)]
pub struct InjectorState {
    /// Writes below this offset are metadata (for the partial power cuts).
    pub data_off: u64,
    pub fault: Option<Fault>,
    pub tripped: bool,
    pub counts: Counts,
    /// Keep the undo log (costs a read per write; only power cuts need it).
    pub journaling: bool,
    pub journal: Vec<Undo>,
}

/// The hook of [`Injector`]: counts, one fault, the undo log.
pub struct Injection {
    pub st: RefCell<InjectorState>,
}

/// Syscall I/O under an [`Injection`].
pub type Injector = Hooked<SyncIo, Injection>;

pub fn eio() -> io::Error {
    errno(libc::EIO)
}

pub fn fd_path(fd: RawFd) -> PathBuf {
    fs::read_link(format!("/proc/self/fd/{fd}")).expect("naming a descriptor")
}

impl Injector {
    pub fn new(fault: Option<Fault>) -> Injector {
        Hooked { inner: SyncIo, hook: Injection::new(fault) }
    }
}

impl Injection {
    pub fn new(fault: Option<Fault>) -> Injection {
        Injection { st: RefCell::new(InjectorState { fault, data_off: 64 * 1024, ..Default::default() }) }
    }
    pub fn counts(&self) -> Counts {
        self.st.borrow().counts
    }
    pub fn set_journaling(&self, on: bool) {
        self.st.borrow_mut().journaling = on;
    }
    pub fn journal_len(&self) -> usize {
        self.st.borrow().journal.len()
    }
    /// Fail the next operation of `kind` once.
    pub fn fail_next(&self, kind: Kind) {
        self.fail_after(kind, 0);
    }
    /// Fail, once, the operation of `kind` after `skip` more of them.
    pub fn fail_after(&self, kind: Kind, skip: u64) {
        let mut st = self.st.borrow_mut();
        let index = *st.counts.get(kind).expect("a counted kind") + skip;
        st.fault = Some(Fault { kind, index, sticky: false });
    }
    pub fn clear_fault(&self) {
        let mut st = self.st.borrow_mut();
        st.fault = None;
        st.tripped = false;
    }

    /// Count an operation of `kind`; Err if it must fail.
    pub fn enter(&self, kind: Kind) -> io::Result<()> {
        let mut st = self.st.borrow_mut();
        let Some(counter) = st.counts.get(kind) else { return Ok(()) };
        let index = *counter;
        *counter += 1;
        let dead = st.tripped && st.fault.is_some_and(|f| f.sticky);
        if dead || st.fault.is_some_and(|f| f.kind == kind && f.index == index) {
            st.tripped = true;
            return Err(eio());
        }
        Ok(())
    }

    pub fn journaling(&self) -> bool {
        self.st.borrow().journaling
    }

    /// The current bytes of a range, to restore them in a power cut.
    pub fn pre_image(fd: RawFd, offset: u64, len: usize) -> Undo {
        let mut old = AlignedBuf::zeroed(len);
        block_on(SyncIo.read_at(fd, &mut old, offset)).expect("reading a pre-image");
        Undo::Bytes { file: file_id(fd), path: fd_path(fd), offset, old }
    }
    pub fn pre_len(fd: RawFd) -> Undo {
        let old = nix::sys::stat::fstat(fd).expect("fstat").st_size as u64;
        Undo::Len { file: file_id(fd), path: fd_path(fd), old }
    }

    /// Undo what the cut loses, newest first. Call after the stack is gone.
    pub fn power_cut(&self, cut: Cut) -> usize {
        let st = self.st.borrow();
        let mut undone = 0;
        for u in st.journal.iter().rev() {
            let lost = match (cut, u) {
                (Cut::None, _) => false,
                (Cut::All, _) => true,
                (Cut::MetaOnly, Undo::Bytes { offset, .. }) => *offset < st.data_off,
                (Cut::DataOnly, Undo::Bytes { offset, .. }) => *offset >= st.data_off,
                (_, Undo::Len { .. }) => false,
            };
            // A file removed since (a failed snapshot's new top) is gone.
            let gone = match u {
                Undo::Bytes { path, .. } | Undo::Len { path, .. } => !path.exists(),
            };
            if lost && !gone {
                match u {
                    Undo::Bytes { path, offset, old, .. } => {
                        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
                        f.write_all_at(old, *offset).unwrap();
                    }
                    Undo::Len { path, old, .. } => {
                        fs::OpenOptions::new().write(true).open(path).unwrap().set_len(*old).unwrap();
                    }
                }
                undone += 1;
            }
        }
        undone
    }

    pub fn record(&self, undo: Undo) {
        self.st.borrow_mut().journal.push(undo);
    }
}

impl Hook for Injection {
    async fn around(&self, op: Op, run: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        self.enter(op.kind)?;
        let pre = match op.kind {
            Kind::Write | Kind::Punch if self.journaling() => Some(Self::pre_image(op.fd, op.offset, op.len as usize)),
            Kind::Grow | Kind::Truncate if self.journaling() => Some(Self::pre_len(op.fd)),
            _ => None,
        };
        run.await?;
        if op.kind == Kind::Sync {
            let id = file_id(op.fd);
            self.st.borrow_mut().journal.retain(|u| match u {
                Undo::Bytes { file, .. } | Undo::Len { file, .. } => *file != id,
            });
        }
        pre.into_iter().for_each(|u| self.record(u));
        Ok(())
    }
}

/// Every operation of `kind` fails with `errno`, uncounted when it wraps
/// an [`Injector`], counted when an [`Injection`] wraps it.
pub struct FailEvery(pub Kind, pub i32);

impl Hook for FailEvery {
    async fn around(&self, op: Op, run: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        if op.kind == self.0 {
            return Err(errno(self.1));
        }
        run.await
    }
}

/// Fails (EIO, or `errno`) chosen operations of one kind, for a test that needs one
/// exact failure where a sweep would be blind: optionally only those on
/// one file (`on`) or at one offset (`at`), and only once an operation of
/// another kind has run (`after`, e.g. the descriptor's rename). Of the
/// matching operations the first `skip` run, the next `fail` fail, the
/// rest run. `seen` counts the matching ones, so that a reference run
/// tells how many to skip.
pub struct Trap {
    kind: Kind,
    on: Option<PathBuf>,
    at: Option<u64>,
    after: Option<Kind>,
    skip: u64,
    fail: u64,
    errno: i32,
    armed: std::cell::Cell<bool>,
    seen: std::cell::Cell<u64>,
    failed: std::cell::Cell<u64>,
}

/// Syscall I/O under a [`Trap`].
pub type Trapped = Hooked<SyncIo, Trap>;

impl Trap {
    /// Fails the first operation of `kind`, once.
    pub fn new(kind: Kind) -> Trap {
        Trap {
            kind,
            on: None,
            at: None,
            after: None,
            skip: 0,
            fail: 1,
            errno: libc::EIO,
            armed: std::cell::Cell::new(true),
            seen: std::cell::Cell::new(0),
            failed: std::cell::Cell::new(0),
        }
    }
    /// Only operations on the file at `path` (which must exist now).
    pub fn on(mut self, path: &std::path::Path) -> Trap {
        self.on = Some(fs::canonicalize(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        self
    }
    /// Only operations at byte `offset` (0: a header read).
    pub fn at(mut self, offset: u64) -> Trap {
        self.at = Some(offset);
        self
    }
    /// Only once an operation of `kind` has run (ended, either way).
    pub fn after(mut self, kind: Kind) -> Trap {
        self.after = Some(kind);
        self.armed.set(false);
        self
    }
    pub fn skip(mut self, n: u64) -> Trap {
        self.skip = n;
        self
    }
    /// How many to fail (u64::MAX: every one from then on).
    pub fn fail(mut self, n: u64) -> Trap {
        self.fail = n;
        self
    }
    /// Fail with `errno` instead of EIO.
    pub fn errno(mut self, errno: i32) -> Trap {
        self.errno = errno;
        self
    }
    /// Syscall I/O under this trap.
    pub fn io(self) -> Trapped {
        Hooked { inner: SyncIo, hook: self }
    }
    /// The matching operations so far (failed ones included).
    pub fn seen(&self) -> u64 {
        self.seen.get()
    }
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }

    fn matches(&self, op: &Op) -> bool {
        op.kind == self.kind
            && self.armed.get()
            && self.at.map_or(true, |at| at == op.offset)
            && self.on.as_ref().map_or(true, |p| op.fd >= 0 && fd_path(op.fd) == *p)
    }
}

impl Hook for Trap {
    async fn around(&self, op: Op, run: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        if self.matches(&op) {
            let index = self.seen.get();
            self.seen.set(index + 1);
            if index >= self.skip && index - self.skip < self.fail {
                self.failed.set(self.failed.get() + 1);
                return Err(errno(self.errno));
            }
        }
        let result = run.await;
        if Some(op.kind) == self.after {
            self.armed.set(true);
        }
        result
    }
}
