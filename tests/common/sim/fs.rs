//! Files and directories in memory, with the page cache a power cut can
//! tear (docs/simulation-plan.md §2.1).
//!
//! Every file holds two states: `cur`, what reads see (the page cache),
//! and `dur`, what a power cut keeps for certain. A completed write
//! changes `cur` and remembers, per 512-byte sector, the content the
//! cache then held for it (a [`Version`]); `sync` copies the touched
//! blocks to `dur`. A power cut rebuilds each file from `dur`, a
//! seed-chosen prefix of its unsynced size changes, and per sector one of
//! its remembered versions (or none): kept, dropped, torn and reordered
//! writes are all such choices. Directories work the same way at the
//! level of names (see [`DirMode`]). A volatile directory (tmpfs) keeps
//! its files across a kill and loses all of them at a cut.
//!
//! Blocks are `Rc`-shared 4 KiB pages in a map (holes are absent, so a
//! sparse file of any size costs only its data), and a sync or a cut
//! costs a pointer copy per block, never a copy of a file.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use ublk_ploop::io::{FileKind, FileStat, LockHow, OpenHow};
use ublk_ploop::rng::Rng;

use super::DirMode;

pub const BLOCK: u64 = 4096;
pub const SECTOR: u64 = 512;
const SECTORS_PER_BLOCK: u64 = BLOCK / SECTOR;
/// Simulated descriptors start here: never a real descriptor, so a raw
/// syscall the engine makes behind the `Io` fails with EBADF.
pub const FIRST_FD: RawFd = 1 << 30;
const ROOT: u64 = 1;

type Page = Rc<[u8; BLOCK as usize]>;
/// Block number -> page; a missing block is a hole.
type Blocks = BTreeMap<u64, Page>;

thread_local! {
    static ZERO_PAGE: Page = Rc::new([0; BLOCK as usize]);
}

/// The page fallocate gives: shared until written (copy on write).
fn zero_page() -> Page {
    ZERO_PAGE.with(|z| z.clone())
}

pub fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A block's content as the cache held it right after one op, for the
/// sectors the op touched (`mask`, bit i = sector i of the block); a
/// hole reads as zeros.
struct Version {
    /// The op (within the unsynced log) that produced it.
    entry: u64,
    mask: u8,
    /// None: a hole.
    page: Option<Page>,
}

/// An unsynced change of size or allocation, in the order the journal
/// would commit it.
#[derive(Clone, Copy)]
enum Meta {
    Size(u64),
    Alloc { off: u64, len: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LockKind {
    Shared,
    Exclusive,
}

pub struct Inode {
    cur: Blocks,
    len: u64,
    dur: Blocks,
    dur_len: u64,
    /// Block -> the versions unsynced ops gave its sectors, oldest first.
    dirty: BTreeMap<u64, Vec<Version>>,
    meta: Vec<Meta>,
    /// Every unsynced data op: its first sector and sector count (a torn
    /// op lands a prefix of them).
    entries: BTreeMap<u64, (u64, u64)>,
    next_entry: u64,
    open: u32,
    flocks: BTreeMap<RawFd, LockKind>,
    /// Byte-range locks of open descriptions (F_OFD_SETLK): holder,
    /// start, end (exclusive), kind.
    ofd_locks: Vec<(RawFd, u64, u64, LockKind)>,
}

impl Inode {
    fn new() -> Inode {
        Inode {
            cur: Blocks::new(),
            len: 0,
            dur: Blocks::new(),
            dur_len: 0,
            dirty: BTreeMap::new(),
            meta: Vec::new(),
            entries: BTreeMap::new(),
            next_entry: 0,
            open: 0,
            flocks: BTreeMap::new(),
            ofd_locks: Vec::new(),
        }
    }
    fn data_blocks(&self) -> u64 {
        self.cur.len() as u64
    }
    /// Remember the sectors `[first, first + count)` as one op changed them.
    fn remember(&mut self, first: u64, count: u64) {
        let entry = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(entry, (first, count));
        let end = first + count;
        for b in first / SECTORS_PER_BLOCK..end.div_ceil(SECTORS_PER_BLOCK) {
            let lo = first.max(b * SECTORS_PER_BLOCK) - b * SECTORS_PER_BLOCK;
            let hi = end.min((b + 1) * SECTORS_PER_BLOCK) - b * SECTORS_PER_BLOCK;
            let mask = ((1u16 << hi) - (1u16 << lo)) as u8;
            let page = self.cur.get(&b).cloned();
            self.dirty.entry(b).or_default().push(Version { entry, mask, page });
        }
    }
    fn page_mut(&mut self, b: u64) -> &mut [u8; BLOCK as usize] {
        Rc::make_mut(self.cur.entry(b).or_insert_with(zero_page))
    }
}

/// Change `blocks` to hold exactly `len` bytes: cut whole blocks past it,
/// zero the tail of a partial last block (as ftruncate does).
fn resize(blocks: &mut Blocks, len: u64) {
    blocks.split_off(&len.div_ceil(BLOCK));
    let tail = (len % BLOCK) as usize;
    if tail != 0 {
        if let Some(p) = blocks.get_mut(&(len / BLOCK)) {
            if p[tail..].iter().any(|&b| b != 0) {
                Rc::make_mut(p)[tail..].fill(0);
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    File(u64),
    Dir(u64),
}

struct Dir {
    cur: BTreeMap<OsString, Entry>,
    dur: BTreeMap<OsString, Entry>,
}

/// One namespace change: every name it sets (Some) or removes (None),
/// landing together (a rename is atomic within its directory).
struct DirOp {
    changes: Vec<(u64, OsString, Option<Entry>)>,
}

/// An open file description.
struct Ofd {
    ino: u64,
    write: bool,
    path: PathBuf,
    /// Ops in flight on it: as the kernel's file reference, they keep the
    /// description (not its name, not its locks) alive past a close.
    pinned: u32,
    closed: bool,
    /// O_DIRECT: transfers must be aligned to the sector.
    direct: bool,
}

/// How a power cut treats what was not yet durable, drawn once per cut
/// so that the nasty extremes come up often.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Personality {
    KeepAll,
    DropAll,
    /// Sizes and allocations land, data does not.
    MetaOnly,
    /// Data lands, sizes stay as synced.
    DataOnly,
    /// Every sector independently any version it had.
    Uniform,
    /// Every write lands a prefix of its sectors (all, none, or torn).
    TornPrefix,
}

impl Personality {
    pub fn draw(rng: &mut Rng) -> Personality {
        match rng.below(6) {
            0 => Personality::KeepAll,
            1 => Personality::DropAll,
            2 => Personality::MetaOnly,
            3 => Personality::DataOnly,
            4 => Personality::Uniform,
            _ => Personality::TornPrefix,
        }
    }
    pub fn draw_reordered(rng: &mut Rng) -> Personality {
        if rng.chance(50) {
            Personality::Uniform
        } else {
            Personality::TornPrefix
        }
    }
}

pub struct SimFs {
    inodes: BTreeMap<u64, Inode>,
    dirs: BTreeMap<u64, Dir>,
    dir_log: Vec<DirOp>,
    fds: BTreeMap<RawFd, Ofd>,
    next_fd: RawFd,
    next_ino: u64,
    pub capacity_blocks: u64,
    pub used_blocks: u64,
    pub mode: DirMode,
    /// Directories declared tmpfs: a cut empties them, whatever was synced.
    volatile: BTreeSet<u64>,
}

/// `path` made absolute (relative to /) and free of `.` and `..`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

impl SimFs {
    pub fn new(capacity_blocks: u64, mode: DirMode) -> SimFs {
        let mut dirs = BTreeMap::new();
        dirs.insert(ROOT, Dir { cur: BTreeMap::new(), dur: BTreeMap::new() });
        SimFs {
            inodes: BTreeMap::new(),
            dirs,
            dir_log: Vec::new(),
            fds: BTreeMap::new(),
            next_fd: FIRST_FD,
            next_ino: ROOT + 1,
            capacity_blocks,
            used_blocks: 0,
            mode,
            volatile: BTreeSet::new(),
        }
    }

    // ---- names ----

    fn lookup_dir(&self, path: &Path) -> io::Result<u64> {
        self.walk_dir(path).map(|(d, _)| d)
    }

    /// The directory at `path`, and the volatile directory it lies in (its
    /// tmpfs), if any.
    fn walk_dir(&self, path: &Path) -> io::Result<(u64, Option<u64>)> {
        let mut d = ROOT;
        let mut mount = self.volatile.contains(&ROOT).then_some(ROOT);
        for c in normalize(path).components() {
            if let Component::Normal(n) = c {
                d = match self.dirs[&d].cur.get(n) {
                    Some(Entry::Dir(id)) => *id,
                    Some(Entry::File(_)) => return Err(errno(libc::ENOTDIR)),
                    None => return Err(errno(libc::ENOENT)),
                };
                if mount.is_none() && self.volatile.contains(&d) {
                    mount = Some(d);
                }
            }
        }
        Ok((d, mount))
    }

    /// Make `path` (if needed) a tmpfs: what lies in it outlives a kill,
    /// never a power cut.
    pub fn make_volatile(&mut self, path: &Path) -> io::Result<()> {
        self.create_dir_all(path)?;
        let d = self.lookup_dir(path)?;
        self.volatile.insert(d);
        Ok(())
    }

    /// Whether `dir` lies in a volatile directory (statfs says tmpfs).
    pub fn is_volatile(&self, dir: &Path) -> io::Result<bool> {
        Ok(self.walk_dir(dir)?.1.is_some())
    }

    /// The tmpfs a path's parent lies in (None: the disk's filesystem).
    fn mount_of(&self, path: &Path) -> io::Result<Option<u64>> {
        Ok(self.walk_dir(normalize(path).parent().unwrap_or(Path::new("/")))?.1)
    }

    /// The directory holding `path`'s last component, and that name.
    fn parent(&self, path: &Path) -> io::Result<(u64, OsString)> {
        let p = normalize(path);
        let name = p.file_name().ok_or_else(|| errno(libc::EINVAL))?.to_os_string();
        Ok((self.lookup_dir(p.parent().unwrap_or(Path::new("/")))?, name))
    }

    fn lookup(&self, path: &Path) -> io::Result<Option<Entry>> {
        let p = normalize(path);
        if p == Path::new("/") {
            return Ok(Some(Entry::Dir(ROOT)));
        }
        let (d, name) = self.parent(&p)?;
        Ok(self.dirs[&d].cur.get(&name).copied())
    }

    fn log_dir_op(&mut self, changes: Vec<(u64, OsString, Option<Entry>)>) {
        for (d, name, e) in &changes {
            let dir = self.dirs.get_mut(d).unwrap();
            match e {
                Some(e) => dir.cur.insert(name.clone(), *e),
                None => dir.cur.remove(name),
            };
        }
        self.dir_log.push(DirOp { changes });
    }

    fn nlink(&self, ino: u64) -> u64 {
        self.dirs.values().map(|d| d.cur.values().filter(|e| **e == Entry::File(ino)).count() as u64).sum()
    }

    /// Forget inodes nothing can reach any more: no current name, no
    /// durable name (a cut could bring that back) and not open.
    fn collect(&mut self) {
        let mut live = BTreeSet::new();
        for d in self.dirs.values() {
            for e in d.cur.values().chain(d.dur.values()) {
                if let Entry::File(i) = e {
                    live.insert(*i);
                }
            }
        }
        let dead: Vec<u64> = self.inodes.iter().filter(|(i, n)| n.open == 0 && !live.contains(*i)).map(|(i, _)| *i).collect();
        for i in dead {
            let n = self.inodes.remove(&i).unwrap();
            self.used_blocks -= n.data_blocks();
        }
    }

    pub fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        match self.lookup(path)? {
            Some(_) => Ok(normalize(path)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    /// New directories are durable at once (the simulation creates them
    /// while setting up, never as part of a crash-relevant sequence).
    pub fn create_dir_all(&mut self, path: &Path) -> io::Result<()> {
        let mut d = ROOT;
        for c in normalize(path).components() {
            if let Component::Normal(n) = c {
                d = match self.dirs[&d].cur.get(n) {
                    Some(Entry::Dir(id)) => *id,
                    Some(Entry::File(_)) => return Err(errno(libc::EEXIST)),
                    None => {
                        let id = self.next_ino;
                        self.next_ino += 1;
                        self.dirs.insert(id, Dir { cur: BTreeMap::new(), dur: BTreeMap::new() });
                        let parent = self.dirs.get_mut(&d).unwrap();
                        parent.cur.insert(n.to_os_string(), Entry::Dir(id));
                        parent.dur.insert(n.to_os_string(), Entry::Dir(id));
                        id
                    }
                };
            }
        }
        Ok(())
    }

    pub fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        match self.lookup(path) {
            Ok(Some(Entry::File(ino))) => Ok(Some(self.stat_ino(ino))),
            Ok(Some(Entry::Dir(id))) => Ok(Some(FileStat { kind: FileKind::Dir, nlink: 2, len: BLOCK, dev: 1, ino: id, born_ns: 0 })),
            Ok(None) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn stat_ino(&self, ino: u64) -> FileStat {
        FileStat { kind: FileKind::File, nlink: self.nlink(ino), len: self.inodes[&ino].len, dev: 1, ino, born_ns: 0 }
    }

    pub fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        match self.lookup(dir)? {
            Some(Entry::Dir(id)) => Ok(self.dirs[&id].cur.keys().cloned().collect()),
            Some(Entry::File(_)) => Err(errno(libc::ENOTDIR)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    pub fn remove_file(&mut self, path: &Path) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        match self.dirs[&d].cur.get(&name) {
            None => Err(errno(libc::ENOENT)),
            Some(Entry::Dir(_)) => Err(errno(libc::EISDIR)),
            Some(Entry::File(_)) => {
                self.log_dir_op(vec![(d, name, None)]);
                self.collect();
                Ok(())
            }
        }
    }

    pub fn rename(&mut self, from: &Path, to: &Path, replace: bool) -> io::Result<()> {
        let (fd_, fname) = self.parent(from)?;
        let (td, tname) = self.parent(to)?;
        let e = match self.dirs[&fd_].cur.get(&fname) {
            None => return Err(errno(libc::ENOENT)),
            Some(Entry::Dir(_)) => return Err(errno(libc::EISDIR)), // not needed by the engine
            Some(e) => *e,
        };
        // A tmpfs is another filesystem: rename(2) cannot cross into or out of it.
        if self.mount_of(from)? != self.mount_of(to)? {
            return Err(errno(libc::EXDEV));
        }
        match self.dirs[&td].cur.get(&tname) {
            Some(Entry::Dir(_)) => return Err(errno(libc::EISDIR)),
            Some(_) if !replace => return Err(errno(libc::EEXIST)),
            Some(t) if *t == e => return Ok(()), // the same file: rename(2) does nothing
            _ => {}
        }
        self.log_dir_op(vec![(fd_, fname, None), (td, tname, Some(e))]);
        self.collect();
        Ok(())
    }

    /// The directory's names as they are now become durable (under
    /// `Journal`, as a journal commit: every name change so far).
    pub fn sync_dir(&mut self, path: &Path) -> io::Result<()> {
        let id = match self.lookup(path)? {
            Some(Entry::Dir(id)) => id,
            Some(Entry::File(_)) => return Err(errno(libc::ENOTDIR)),
            None => return Err(errno(libc::ENOENT)),
        };
        if self.mode == DirMode::Journal {
            self.commit_all_dirs();
            return Ok(());
        }
        for op in &mut self.dir_log {
            op.changes.retain(|(d, _, _)| *d != id);
        }
        self.dir_log.retain(|op| !op.changes.is_empty());
        let dir = self.dirs.get_mut(&id).unwrap();
        dir.dur = dir.cur.clone();
        self.collect();
        Ok(())
    }

    fn commit_all_dirs(&mut self) {
        self.dir_log.clear();
        for d in self.dirs.values_mut() {
            d.dur = d.cur.clone();
        }
        self.collect();
    }

    // ---- open files ----

    pub fn open(&mut self, path: &Path, how: &OpenHow) -> io::Result<RawFd> {
        let path = normalize(path);
        let ino = match self.lookup(&path)? {
            Some(_) if how.create_new => return Err(errno(libc::EEXIST)),
            Some(Entry::Dir(_)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a directory, not an image or descriptor file; refused"))
            }
            Some(Entry::File(ino)) => ino,
            None if how.create_new || how.create => {
                let (d, name) = self.parent(&path)?;
                let ino = self.next_ino;
                self.next_ino += 1;
                self.inodes.insert(ino, Inode::new());
                self.log_dir_op(vec![(d, name, Some(Entry::File(ino)))]);
                ino
            }
            None => return Err(errno(libc::ENOENT)),
        };
        let fd = self.next_fd;
        self.next_fd += 1;
        self.inodes.get_mut(&ino).unwrap().open += 1;
        self.fds.insert(fd, Ofd { ino, write: how.write || how.create_new, path, pinned: 0, closed: false, direct: how.direct });
        Ok(fd)
    }

    /// Close an open description (its flocks go); unknown numbers (a
    /// handle that outlived a kill) are ignored.
    pub fn close(&mut self, fd: RawFd) {
        let Some(o) = self.fds.get_mut(&fd) else { return };
        if !o.closed {
            o.closed = true;
            let ino = o.ino;
            let n = self.inodes.get_mut(&ino).unwrap();
            n.flocks.remove(&fd);
            n.ofd_locks.retain(|l| l.0 != fd);
        }
        self.release(fd);
    }

    fn release(&mut self, fd: RawFd) {
        let Some(o) = self.fds.get(&fd) else { return };
        if o.closed && o.pinned == 0 {
            let o = self.fds.remove(&fd).unwrap();
            self.inodes.get_mut(&o.ino).unwrap().open -= 1;
            self.collect();
        }
    }

    /// An op on `fd` was submitted: the description stays until `unpin`.
    pub fn pin(&mut self, fd: RawFd) {
        if let Some(o) = self.fds.get_mut(&fd) {
            o.pinned += 1;
        }
    }

    pub fn unpin(&mut self, fd: RawFd) {
        if let Some(o) = self.fds.get_mut(&fd) {
            o.pinned = o.pinned.saturating_sub(1);
        }
        self.release(fd);
    }

    /// Every description goes (a kill, after its ops were decided).
    pub fn close_all(&mut self) {
        let fds: Vec<RawFd> = self.fds.keys().copied().collect();
        for fd in fds {
            self.fds.get_mut(&fd).unwrap().pinned = 0;
            self.close(fd);
        }
    }

    pub fn open_count(&self) -> usize {
        self.fds.len()
    }

    fn ofd(&self, fd: RawFd) -> io::Result<&Ofd> {
        self.fds.get(&fd).ok_or_else(|| errno(libc::EBADF))
    }

    /// A description a plain call may use: open, not merely pinned by ops.
    fn live(&self, fd: RawFd) -> io::Result<&Ofd> {
        self.fds.get(&fd).filter(|o| !o.closed).ok_or_else(|| errno(libc::EBADF))
    }

    pub fn path_of(&self, fd: RawFd) -> String {
        self.fds.get(&fd).map(|o| o.path.display().to_string()).unwrap_or_default()
    }

    fn writable(&self, fd: RawFd) -> io::Result<u64> {
        let o = self.ofd(fd)?;
        if o.write {
            Ok(o.ino)
        } else {
            Err(errno(libc::EBADF))
        }
    }

    pub fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        Ok(self.stat_ino(self.live(fd)?.ino))
    }

    pub fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        let n = &self.inodes[&self.live(fd)?.ino];
        if at >= n.len {
            return Ok(None);
        }
        Ok(n.cur.range(at / BLOCK..).next().map(|(&b, _)| (b * BLOCK).max(at)).filter(|&o| o < n.len))
    }

    pub fn flock(&mut self, fd: RawFd, how: LockHow) -> io::Result<()> {
        let ino = self.live(fd)?.ino;
        let n = self.inodes.get_mut(&ino).unwrap();
        let want = match how {
            LockHow::Unlock => {
                n.flocks.remove(&fd);
                return Ok(());
            }
            LockHow::Shared => LockKind::Shared,
            LockHow::Exclusive => LockKind::Exclusive,
        };
        if n.flocks.get(&fd) == Some(&want) {
            return Ok(());
        }
        // Linux drops the old lock before trying the new one: a failed
        // conversion leaves the description with no lock at all.
        n.flocks.remove(&fd);
        let conflict = n.flocks.values().any(|k| *k == LockKind::Exclusive || want == LockKind::Exclusive);
        if conflict {
            return Err(errno(libc::EWOULDBLOCK));
        }
        n.flocks.insert(fd, want);
        Ok(())
    }

    /// A byte-range lock of the open description (F_OFD_SETLK, never
    /// waiting): EAGAIN when another description holds a conflicting one.
    /// A length of 0 reaches to the end of any file, as in fcntl. Ranges
    /// are kept whole (the engine locks and unlocks the same ranges).
    pub fn ofd_lock(&mut self, fd: RawFd, (start, len): (u64, u64), how: LockHow) -> io::Result<()> {
        let ino = self.live(fd)?.ino;
        let n = self.inodes.get_mut(&ino).unwrap();
        let end = if len == 0 { u64::MAX } else { start + len };
        let overlaps = |l: &(RawFd, u64, u64, LockKind)| l.1 < end && start < l.2;
        let want = match how {
            LockHow::Unlock => {
                n.ofd_locks.retain(|l| !(l.0 == fd && overlaps(l)));
                return Ok(());
            }
            LockHow::Shared => LockKind::Shared,
            LockHow::Exclusive => LockKind::Exclusive,
        };
        if n.ofd_locks.iter().any(|l| l.0 != fd && overlaps(l) && (l.3 == LockKind::Exclusive || want == LockKind::Exclusive)) {
            return Err(errno(libc::EAGAIN));
        }
        n.ofd_locks.retain(|l| !(l.0 == fd && overlaps(l)));
        n.ofd_locks.push((fd, start, end, want));
        Ok(())
    }

    /// Whether another description holds a lock on the range that a
    /// write lock would conflict with: Some(-1), as OFD locks report.
    pub fn ofd_holder(&self, fd: RawFd, (start, len): (u64, u64)) -> io::Result<Option<i32>> {
        let n = &self.inodes[&self.live(fd)?.ino];
        let end = if len == 0 { u64::MAX } else { start + len };
        Ok(n.ofd_locks.iter().any(|l| l.0 != fd && l.1 < end && start < l.2).then_some(-1))
    }

    /// Make one directory (durable at once, as `create_dir_all`'s are).
    pub fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        if self.dirs[&d].cur.contains_key(&name) {
            return Err(errno(libc::EEXIST));
        }
        self.create_dir_all(path)
    }

    /// Remove an empty directory; the entry's removal is durable after a
    /// sync of its parent, like any name change.
    pub fn remove_dir(&mut self, path: &Path) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        match self.dirs[&d].cur.get(&name) {
            None => Err(errno(libc::ENOENT)),
            Some(Entry::File(_)) => Err(errno(libc::ENOTDIR)),
            Some(Entry::Dir(id)) if !self.dirs[id].cur.is_empty() => Err(errno(libc::ENOTEMPTY)),
            Some(Entry::Dir(_)) => {
                self.log_dir_op(vec![(d, name, None)]);
                Ok(())
            }
        }
    }

    // ---- data (applied when an op completes) ----

    /// O_DIRECT refuses a transfer whose offset or length is not aligned
    /// (the buffer's address is not checked: no decision on a pointer).
    fn check_direct(&self, fd: RawFd, off: u64, len: u64) -> io::Result<()> {
        if self.ofd(fd)?.direct && (off % SECTOR != 0 || len % SECTOR != 0) {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    pub fn read(&self, fd: RawFd, off: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check_direct(fd, off, len as u64)?;
        let n = &self.inodes[&self.ofd(fd)?.ino];
        Ok(read_blocks(&n.cur, n.len, off, len))
    }

    pub fn file_content(&self, path: &Path) -> Option<Vec<u8>> {
        match self.lookup(path).ok()?? {
            Entry::File(ino) => {
                let n = &self.inodes[&ino];
                Some(read_blocks(&n.cur, n.len, 0, n.len as usize))
            }
            Entry::Dir(_) => None,
        }
    }

    /// Blocks a write or allocation of the range would newly take.
    fn new_blocks(n: &Inode, off: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let (first, last) = (off / BLOCK, (off + len - 1) / BLOCK);
        (last - first + 1) - n.cur.range(first..=last).count() as u64
    }

    fn charge(&mut self, ino: u64, off: u64, len: u64) -> io::Result<()> {
        let need = Self::new_blocks(&self.inodes[&ino], off, len);
        // A cut may bring back blocks punched after the last sync and leave
        // more in use than the capacity; rewriting blocks a file holds
        // takes no space, and never fails for it on a real filesystem.
        if need > 0 && self.used_blocks.saturating_add(need) > self.capacity_blocks {
            return Err(errno(libc::ENOSPC));
        }
        self.used_blocks += need;
        Ok(())
    }

    pub fn write(&mut self, fd: RawFd, off: u64, data: &[u8]) -> io::Result<()> {
        let ino = self.writable(fd)?;
        self.check_direct(fd, off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.charge(ino, off, data.len() as u64)?;
        let n = self.inodes.get_mut(&ino).unwrap();
        let end = off + data.len() as u64;
        let mut at = off;
        while at < end {
            let b = at / BLOCK;
            let in_block = (at % BLOCK) as usize;
            let take = ((BLOCK as usize - in_block) as u64).min(end - at) as usize;
            let src = &data[(at - off) as usize..][..take];
            n.page_mut(b)[in_block..in_block + take].copy_from_slice(src);
            at += take as u64;
        }
        if end > n.len {
            n.len = end;
            n.meta.push(Meta::Size(end));
        }
        let (s0, s1) = (off / SECTOR, end.div_ceil(SECTOR));
        n.remember(s0, s1 - s0);
        Ok(())
    }

    pub fn punch(&mut self, fd: RawFd, off: u64, len: u64) -> io::Result<()> {
        let ino = self.writable(fd)?;
        let n = self.inodes.get_mut(&ino).unwrap();
        let end = (off + len).min(n.len);
        if off >= end {
            return Ok(());
        }
        let mut freed = 0;
        let mut at = off;
        while at < end {
            let b = at / BLOCK;
            let in_block = (at % BLOCK) as usize;
            let take = ((BLOCK as usize - in_block) as u64).min(end - at) as usize;
            if n.cur.contains_key(&b) {
                if take == BLOCK as usize {
                    n.cur.remove(&b);
                    freed += 1;
                } else {
                    n.page_mut(b)[in_block..in_block + take].fill(0);
                }
            }
            at += take as u64;
        }
        let (s0, s1) = (off / SECTOR, end.div_ceil(SECTOR));
        n.remember(s0, s1 - s0);
        self.used_blocks -= freed;
        Ok(())
    }

    pub fn allocate(&mut self, fd: RawFd, off: u64, len: u64) -> io::Result<()> {
        let ino = self.writable(fd)?;
        if len == 0 {
            return Err(errno(libc::EINVAL));
        }
        self.charge(ino, off, len)?;
        let n = self.inodes.get_mut(&ino).unwrap();
        let end = off + len;
        for b in off / BLOCK..end.div_ceil(BLOCK) {
            n.cur.entry(b).or_insert_with(zero_page);
        }
        n.len = n.len.max(end);
        n.meta.push(Meta::Alloc { off, len });
        Ok(())
    }

    pub fn set_len(&mut self, fd: RawFd, len: u64) -> io::Result<()> {
        let ino = self.writable(fd)?;
        let n = self.inodes.get_mut(&ino).unwrap();
        let mut freed = 0;
        if len < n.len {
            // The cut part reads as zeros if the file grows again: remember
            // that as the sectors' newest version.
            let first_cut = len.div_ceil(BLOCK);
            let e = n.next_entry;
            n.next_entry += 1;
            let cut: Vec<u64> = n.cur.range(first_cut..).map(|(&b, _)| b).collect();
            let last = cut.last().map_or(first_cut, |b| b + 1);
            for b in cut {
                freed += 1;
                n.dirty.entry(b).or_default().push(Version { entry: e, mask: 0xff, page: None });
            }
            resize(&mut n.cur, len);
            // The partial last block's tail was zeroed: its sectors from
            // the first one past `len` (a sector `len` splits keeps its head).
            let mut first = first_cut * SECTORS_PER_BLOCK;
            let lo = len.div_ceil(SECTOR) % SECTORS_PER_BLOCK;
            if len % BLOCK != 0 && lo != 0 {
                let b = len / BLOCK;
                first = b * SECTORS_PER_BLOCK + lo;
                let page = n.cur.get(&b).cloned();
                n.dirty.entry(b).or_default().push(Version { entry: e, mask: (0xffu16 << lo) as u8, page });
            }
            n.entries.insert(e, (first, (last * SECTORS_PER_BLOCK).saturating_sub(first)));
        }
        if len != n.len {
            n.len = len;
            n.meta.push(Meta::Size(len));
        }
        self.used_blocks -= freed;
        Ok(())
    }

    /// fdatasync: everything completed on the file becomes durable, its
    /// size included. Under `Journal` the journal commit also carries
    /// every namespace change made so far.
    pub fn sync(&mut self, fd: RawFd) -> io::Result<()> {
        let ino = self.ofd(fd)?.ino;
        let n = self.inodes.get_mut(&ino).unwrap();
        // Only growth since the last sync: the touched blocks are all that
        // differ (a shrink or an allocation copies the whole map).
        if n.meta.iter().all(|m| matches!(m, Meta::Size(l) if *l >= n.dur_len)) && n.meta.windows(2).all(|w| matches!(w, [Meta::Size(a), Meta::Size(b)] if a <= b)) {
            for &b in n.dirty.keys() {
                match n.cur.get(&b) {
                    Some(p) => n.dur.insert(b, p.clone()),
                    None => n.dur.remove(&b),
                };
            }
        } else {
            n.dur = n.cur.clone();
        }
        n.dur_len = n.len;
        n.dirty.clear();
        n.meta.clear();
        n.entries.clear();
        if self.mode == DirMode::Journal {
            self.commit_all_dirs();
        }
        Ok(())
    }

    /// A failed writeback: the dirty pages are thrown away unwritten (the
    /// cache then reads as the disk does).
    pub fn drop_dirty(&mut self, fd: RawFd) {
        let Ok(o) = self.ofd(fd) else { return };
        let ino = o.ino;
        let n = self.inodes.get_mut(&ino).unwrap();
        let before = n.data_blocks();
        n.cur = n.dur.clone();
        n.len = n.dur_len;
        n.dirty.clear();
        n.meta.clear();
        n.entries.clear();
        let after = n.data_blocks();
        self.used_blocks = self.used_blocks + after - before;
    }

    // ---- power cut ----

    /// Every file and directory falls back to its durable state plus a
    /// seed-chosen part of what was not yet durable (see the module doc).
    /// Open descriptions must be closed first (a cut follows a kill).
    /// With `reordered`, only the personalities that keep some writes and
    /// not others (a cut aimed at a sync tests the order before it; the
    /// other personalities are what a cut before or after the sync gives).
    pub fn cut(&mut self, rng: &mut Rng, reordered: bool) -> Vec<(u64, Personality)> {
        debug_assert!(self.fds.is_empty());
        self.empty_volatile();
        self.cut_dirs(rng);
        let mut chosen = Vec::new();
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            let n = self.inodes.get_mut(&ino).unwrap();
            if n.dirty.is_empty() && n.meta.is_empty() {
                n.cur = n.dur.clone();
                n.len = n.dur_len;
                continue;
            }
            let p = if reordered { Personality::draw_reordered(rng) } else { Personality::draw(rng) };
            chosen.push((ino, p));
            cut_inode(n, p, rng);
        }
        self.collect();
        self.used_blocks = self.inodes.values().map(|n| n.data_blocks()).sum();
        chosen
    }

    /// A tmpfs is empty after a reboot: every name and file under a
    /// volatile directory goes, synced or not, before the cut draws
    /// anything (so none of it can land torn, and a world without
    /// volatile directories draws as before).
    fn empty_volatile(&mut self) {
        let mut gone = BTreeSet::new();
        let mut todo: Vec<u64> = self.volatile.iter().copied().filter(|d| self.dirs.contains_key(d)).collect();
        while let Some(d) = todo.pop() {
            if gone.insert(d) {
                let dir = &self.dirs[&d];
                todo.extend(dir.cur.values().chain(dir.dur.values()).filter_map(|e| match e {
                    Entry::Dir(id) => Some(*id),
                    Entry::File(_) => None,
                }));
            }
        }
        for op in &mut self.dir_log {
            op.changes.retain(|(d, _, _)| !gone.contains(d));
        }
        self.dir_log.retain(|op| !op.changes.is_empty());
        for d in gone {
            if self.volatile.contains(&d) {
                let dir = self.dirs.get_mut(&d).unwrap();
                dir.cur.clear();
                dir.dur.clear();
            } else {
                self.dirs.remove(&d);
            }
        }
        self.collect();
    }

    fn cut_dirs(&mut self, rng: &mut Rng) {
        let log = std::mem::take(&mut self.dir_log);
        match self.mode {
            DirMode::Journal => {
                // The journal commits in order: a prefix of every change.
                let k = rng.below(log.len() as u64 + 1) as usize;
                for op in &log[..k] {
                    for (d, name, e) in &op.changes {
                        set_entry(&mut self.dirs.get_mut(d).unwrap().dur, name, *e);
                    }
                }
            }
            DirMode::Posix => {
                // Each directory independently keeps a prefix of its own
                // changes (an op's changes to one directory land together).
                let ids: Vec<u64> = self.dirs.keys().copied().collect();
                for id in ids {
                    let mine: Vec<&DirOp> = log.iter().filter(|op| op.changes.iter().any(|c| c.0 == id)).collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let k = rng.below(mine.len() as u64 + 1) as usize;
                    let dir = self.dirs.get_mut(&id).unwrap();
                    for op in &mine[..k] {
                        for (d, name, e) in &op.changes {
                            if *d == id {
                                set_entry(&mut dir.dur, name, *e);
                            }
                        }
                    }
                }
            }
        }
        for d in self.dirs.values_mut() {
            d.cur = d.dur.clone();
        }
    }
}

fn set_entry(map: &mut BTreeMap<OsString, Entry>, name: &OsStr, e: Option<Entry>) {
    match e {
        Some(e) => map.insert(name.to_os_string(), e),
        None => map.remove(name),
    };
}

fn cut_inode(n: &mut Inode, p: Personality, rng: &mut Rng) {
    use Personality::*;
    let k_meta = match p {
        KeepAll | MetaOnly => n.meta.len(),
        DropAll | DataOnly => 0,
        Uniform | TornPrefix => rng.below(n.meta.len() as u64 + 1) as usize,
    };
    let mut blocks = n.dur.clone();
    let mut size = n.dur_len;
    for m in &n.meta[..k_meta] {
        match *m {
            Meta::Size(len) => {
                resize(&mut blocks, len);
                size = len;
            }
            Meta::Alloc { off, len } => {
                let end = off + len;
                for b in off / BLOCK..end.div_ceil(BLOCK) {
                    blocks.entry(b).or_insert_with(zero_page);
                }
                size = size.max(end);
            }
        }
    }
    // How many sectors of each op land, for TornPrefix: all, none, or a
    // torn prefix, a third each.
    // The sector each op's landing stops before, for TornPrefix.
    let cutoffs: BTreeMap<u64, u64> = if p == TornPrefix {
        n.entries
            .iter()
            .map(|(&e, &(first, count))| {
                let k = match rng.below(3) {
                    0 => count,
                    1 => 0,
                    _ => rng.below(count + 1),
                };
                (e, first + k)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut hole_sectors: BTreeMap<u64, u64> = BTreeMap::new();
    for (b, i, v) in n.dirty.iter().flat_map(|(&b, vs)| (0..SECTORS_PER_BLOCK).map(move |i| (b, i, vs))) {
        let s = b * SECTORS_PER_BLOCK + i;
        let mut touching = v.iter().filter(|v| v.mask & (1 << i) != 0);
        let v = match p {
            KeepAll | DataOnly => touching.next_back(),
            DropAll | MetaOnly => None,
            Uniform => {
                let all: Vec<&Version> = touching.collect();
                match rng.below(all.len() as u64 + 1) as usize {
                    0 => None,
                    k => Some(all[k - 1]),
                }
            }
            TornPrefix => touching.rfind(|v| s < cutoffs[&v.entry]),
        };
        let Some(v) = v else { continue };
        let at = (i * SECTOR) as usize;
        let sector = at..at + SECTOR as usize;
        match &v.page {
            None => {
                *hole_sectors.entry(b).or_default() += 1;
                if let Some(d) = blocks.get_mut(&b) {
                    if d[sector.clone()].iter().any(|&x| x != 0) {
                        Rc::make_mut(d)[sector].fill(0);
                    }
                }
            }
            Some(src) => {
                let d = blocks.entry(b).or_insert_with(zero_page);
                if !Rc::ptr_eq(d, src) {
                    Rc::make_mut(d)[sector.clone()].copy_from_slice(&src[sector]);
                }
            }
        }
    }
    // A block whose every sector ended punched is a hole again.
    for (b, count) in hole_sectors {
        if count == SECTORS_PER_BLOCK {
            blocks.remove(&b);
        }
    }
    resize(&mut blocks, size);
    n.cur = blocks.clone();
    n.dur = blocks;
    n.len = size;
    n.dur_len = size;
    n.dirty.clear();
    n.meta.clear();
    n.entries.clear();
}

fn read_blocks(blocks: &Blocks, len: u64, off: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let end = (off + n as u64).min(len);
    let mut at = off;
    while at < end {
        let b = at / BLOCK;
        let in_block = (at % BLOCK) as usize;
        let take = ((BLOCK as usize - in_block) as u64).min(end - at) as usize;
        if let Some(p) = blocks.get(&b) {
            out[(at - off) as usize..][..take].copy_from_slice(&p[in_block..in_block + take]);
        }
        at += take as u64;
    }
    out
}
