//! I/O that counts every operation of the engine, fails a chosen one (once,
//! or for good: the disk dies), and keeps an undo log of writes no sync has
//! made durable yet, so that a power cut can be simulated afterwards.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ublk_ploop::io::{block_on, AlignedBuf, Io, SyncIo};

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
}

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
    pub fn get(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Read => &mut self.reads,
            Kind::Write => &mut self.writes,
            Kind::Sync => &mut self.syncs,
            Kind::Punch => &mut self.punches,
            Kind::Grow => &mut self.grows,
            Kind::Truncate => &mut self.truncates,
            Kind::Rename => &mut self.renames,
        }
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
    /// Answer every punch_hole with EOPNOTSUPP.
    pub punch_unsupported: bool,
    pub counts: Counts,
    /// Keep the undo log (costs a read per write; only power cuts need it).
    pub journaling: bool,
    pub journal: Vec<Undo>,
}

pub struct Injector {
    pub st: RefCell<InjectorState>,
}

pub fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

pub fn fd_path(fd: RawFd) -> PathBuf {
    fs::read_link(format!("/proc/self/fd/{fd}")).expect("naming a descriptor")
}

impl Injector {
    pub fn new(fault: Option<Fault>) -> Injector {
        Injector { st: RefCell::new(InjectorState { fault, data_off: 64 * 1024, ..Default::default() }) }
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
        let index = *st.counts.get(kind) + skip;
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
        let index = *st.counts.get(kind);
        *st.counts.get(kind) += 1;
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

impl Io for Injector {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.enter(Kind::Read)?;
        SyncIo.read_at(fd, buf, offset).await
    }

    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        let pre = self.journaling().then(|| Self::pre_image(fd, offset, buf.len()));
        SyncIo.write_at(fd, buf, offset).await?;
        pre.into_iter().for_each(|u| self.record(u));
        Ok(())
    }

    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        self.enter(Kind::Sync)?;
        SyncIo.sync_data(fd).await?;
        let id = file_id(fd);
        self.st.borrow_mut().journal.retain(|u| match u {
            Undo::Bytes { file, .. } | Undo::Len { file, .. } => *file != id,
        });
        Ok(())
    }

    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.enter(Kind::Punch)?;
        if self.st.borrow().punch_unsupported {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let pre = self.journaling().then(|| Self::pre_image(fd, offset, len as usize));
        SyncIo.punch_hole(fd, offset, len).await?;
        pre.into_iter().for_each(|u| self.record(u));
        Ok(())
    }

    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.enter(Kind::Grow)?;
        let pre = self.journaling().then(|| Self::pre_len(fd));
        SyncIo.allocate(fd, offset, len).await?;
        pre.into_iter().for_each(|u| self.record(u));
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.enter(Kind::Rename)?;
        SyncIo.rename(from, to).await
    }

    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        self.enter(Kind::Truncate)?;
        let pre = self.journaling().then(|| Self::pre_len(fd));
        SyncIo.set_len(fd, len).await?;
        pre.into_iter().for_each(|u| self.record(u));
        Ok(())
    }
}

