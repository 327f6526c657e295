//! [`SimIo`], the `Io` the engine runs on (docs/simulation-plan.md §2.2).
//!
//! An async op does nothing until first polled; that poll *submits* it
//! (records it in flight with the task's waker; a write's bytes are
//! copied then) and pends. The executor later *completes* it, in an order
//! the seed chooses: only then does its effect reach the files (a read
//! takes its bytes at that moment), possibly as a fault. The next poll
//! returns the result. Every I/O is therefore a scheduling point.
//!
//! The namespace, lock and clock methods act at once on the current state.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ublk_ploop::io::{FileStat, Handle, Io, LockHow, OpenHow};
use ublk_ploop::rng::Rng;

use super::fs::{errno, SimFs, SECTOR};
use super::{DirMode, FaultEvent, FaultPlan};

#[derive(Debug)]
enum Op {
    Read { fd: RawFd, off: u64, len: usize },
    Write { fd: RawFd, off: u64, data: Vec<u8> },
    Sync { fd: RawFd },
    Alloc { fd: RawFd, off: u64, len: u64 },
    Punch { fd: RawFd, off: u64, len: u64 },
    SetLen { fd: RawFd, len: u64 },
    Rename { from: PathBuf, to: PathBuf },
    SyncDir { dir: PathBuf },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Sync { .. } => "sync_data",
            Op::Alloc { .. } => "allocate",
            Op::Punch { .. } => "punch_hole",
            Op::SetLen { .. } => "set_len",
            Op::Rename { .. } => "rename",
            Op::SyncDir { .. } => "sync_dir",
        }
    }
    fn fd(&self) -> Option<RawFd> {
        match self {
            Op::Read { fd, .. } | Op::Write { fd, .. } | Op::Sync { fd } | Op::Alloc { fd, .. } | Op::Punch { fd, .. } | Op::SetLen { fd, .. } => Some(*fd),
            Op::Rename { .. } | Op::SyncDir { .. } => None,
        }
    }
    /// (path, offset, len) for the fault log.
    fn place(&self, fs: &SimFs) -> (String, u64, u64) {
        match self {
            Op::Read { fd, off, len } => (fs.path_of(*fd), *off, *len as u64),
            Op::Write { fd, off, data } => (fs.path_of(*fd), *off, data.len() as u64),
            Op::Sync { fd } => (fs.path_of(*fd), 0, 0),
            Op::Alloc { fd, off, len } | Op::Punch { fd, off, len } => (fs.path_of(*fd), *off, *len),
            Op::SetLen { fd, len } => (fs.path_of(*fd), *len, 0),
            Op::Rename { from, .. } => (from.display().to_string(), 0, 0),
            Op::SyncDir { dir } => (dir.display().to_string(), 0, 0),
        }
    }
}

/// An op as a trace line shows it: the file by name, not by descriptor.
struct Brief<'a>(&'a Op, &'a SimFs);

impl std::fmt::Debug for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, off, len) = self.0.place(self.1);
        write!(f, "{} {path} @{off:#x}+{len:#x}", self.0.name())
    }
}

struct InFlight {
    op: Op,
    waker: Option<Waker>,
}

pub struct State {
    pub fs: SimFs,
    in_flight: BTreeMap<u64, InFlight>,
    /// Submitted ops whose futures were dropped before completing: no
    /// longer the executor's to complete; the next kill lands them or not.
    abandoned: BTreeMap<u64, Op>,
    done: BTreeMap<u64, io::Result<Vec<u8>>>,
    next_op: u64,
    pub ops_completed: u64,
    plan: FaultPlan,
    faults_left: u32,
    faults_on: bool,
    fault_rng: Rng,
    crash_rng: Rng,
    pub fault_log: Vec<FaultEvent>,
    pub kills: u64,
    pub power_cuts: u64,
    /// The task being polled, and the waker it was polled with.
    current: Option<(u64, Waker)>,
    /// Ops that completed at once because nothing would ever complete
    /// them (polled outside any task, or under a foreign waker: a
    /// `block_on` inside the engine).
    pub inline_ops: u64,
    last_op: BTreeMap<u64, &'static str>,
}

pub struct World {
    st: RefCell<State>,
    /// Descriptors whose handles were dropped, closed at the next op (a
    /// handle may drop on any thread, so this is the one Send part).
    closed: Arc<Mutex<Vec<RawFd>>>,
    now: Cell<Duration>,
    base: Instant,
    hash: Cell<u64>,
    pub dir_mode: DirMode,
    /// Print every event (UBLK_PLOOP_SIM_TRACE=1, or `Sim::set_trace`).
    trace: Cell<bool>,
    /// The process is being killed: its tasks are being dropped, and
    /// whatever their destructors try to do to the files must not happen
    /// (a killed process runs no destructor).
    pub dying: Cell<bool>,
    /// The next power cut is aimed at a sync: no sync in flight lands, and
    /// every file keeps a reordered part of its unsynced writes.
    pub lose_syncs: Cell<bool>,
}

const FNV_PRIME: u64 = 0x100_0000_01b3;

impl World {
    pub fn new(fault_seed: u64, crash_seed: u64, dir_mode: DirMode, plan: FaultPlan) -> World {
        World {
            st: RefCell::new(State {
                fs: SimFs::new(plan.capacity_blocks, dir_mode),
                in_flight: BTreeMap::new(),
                abandoned: BTreeMap::new(),
                done: BTreeMap::new(),
                next_op: 0,
                ops_completed: 0,
                faults_left: plan.transient,
                plan,
                faults_on: true,
                fault_rng: Rng::new(fault_seed),
                crash_rng: Rng::new(crash_seed),
                fault_log: Vec::new(),
                kills: 0,
                power_cuts: 0,
                current: None,
                inline_ops: 0,
                last_op: BTreeMap::new(),
            }),
            closed: Arc::new(Mutex::new(Vec::new())),
            now: Cell::new(Duration::ZERO),
            base: Instant::now(),
            hash: Cell::new(0xcbf2_9ce4_8422_2325),
            dir_mode,
            trace: Cell::new(std::env::var_os("UBLK_PLOOP_SIM_TRACE").is_some_and(|v| v != "0")),
            dying: Cell::new(false),
            lose_syncs: Cell::new(false),
        }
    }

    /// Fold one decision into the trace hash (FNV-1a over its bytes).
    pub fn fold(&self, kind: u8, v: u64) {
        let mut h = self.hash.get();
        for b in std::iter::once(kind).chain(v.to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.hash.set(h);
    }

    pub fn tracing(&self) -> bool {
        self.trace.get()
    }

    pub fn set_trace(&self, on: bool) {
        self.trace.set(on)
    }

    /// The kinds of the ops in flight, in submission order.
    pub fn in_flight_kinds(&self) -> Vec<&'static str> {
        self.st.borrow().in_flight.values().map(|f| f.op.name()).collect()
    }

    pub fn trace_hash(&self) -> u64 {
        self.hash.get()
    }

    pub fn now(&self) -> Duration {
        self.now.get()
    }

    pub fn set_now(&self, t: Duration) {
        self.now.set(t)
    }

    pub fn set_current(&self, task: Option<(u64, Waker)>) {
        self.st.borrow_mut().current = task;
    }

    pub fn current_task(&self) -> Option<u64> {
        self.st.borrow().current.as_ref().map(|c| c.0)
    }

    pub fn last_op_of(&self, task: u64) -> &'static str {
        self.st.borrow().last_op.get(&task).copied().unwrap_or("none")
    }

    /// Refuse what a dead process cannot do.
    fn alive(&self) -> io::Result<()> {
        if self.dying.get() {
            return Err(io::Error::other("the simulated process was killed"));
        }
        Ok(())
    }

    /// The state, after closing what dropped handles left to close.
    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        let closed = std::mem::take(&mut *self.closed.lock().unwrap());
        let mut st = self.st.borrow_mut();
        for fd in closed {
            st.fs.close(fd);
        }
        st
    }

    pub fn in_flight(&self) -> usize {
        self.st.borrow().in_flight.len()
    }

    pub fn set_faults_enabled(&self, on: bool) {
        self.st.borrow_mut().faults_on = on;
    }

    /// Record `op` in flight; or, when no executor task would ever be
    /// woken by its completion (polled outside a task, or under a waker
    /// that is not the task's: a nested `block_on`), complete it at once
    /// as a synchronous syscall would, so the thread cannot park forever.
    fn submit(&self, op: Op, waker: &Waker) -> Result<u64, io::Result<Vec<u8>>> {
        self.alive().map_err(Err)?;
        let mut st = self.state();
        let inline = match st.current.as_ref().map(|(task, w)| (*task, w.will_wake(waker))) {
            Some((task, same)) => {
                st.last_op.insert(task, op.name());
                !same
            }
            None => true,
        };
        if inline {
            st.inline_ops += 1;
            st.ops_completed += 1;
            let r = st.apply(op, true);
            if let Err(e) = &r {
                self.fold(4, e.raw_os_error().unwrap_or(-1) as u64);
            }
            return Err(r);
        }
        let id = st.next_op;
        st.next_op += 1;
        if let Some(fd) = op.fd() {
            st.fs.pin(fd);
        }
        st.in_flight.insert(id, InFlight { op, waker: Some(waker.clone()) });
        Ok(id)
    }

    fn take_done(&self, id: u64, waker: &Waker) -> Option<io::Result<Vec<u8>>> {
        let mut st = self.st.borrow_mut();
        if let Some(r) = st.done.remove(&id) {
            return Some(r);
        }
        if let Some(f) = st.in_flight.get_mut(&id) {
            if !f.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                f.waker = Some(waker.clone());
            }
        }
        None
    }

    fn abandon(&self, id: u64) {
        let mut st = self.st.borrow_mut();
        st.done.remove(&id);
        if let Some(f) = st.in_flight.remove(&id) {
            st.abandoned.insert(id, f.op);
        }
    }

    /// Complete the `i`th op in flight (in submission order).
    pub fn complete(&self, i: usize) {
        let waker = {
            let mut st = self.state();
            let id = *st.in_flight.keys().nth(i).expect("an op in flight");
            let f = st.in_flight.remove(&id).unwrap();
            st.ops_completed += 1;
            let fd = f.op.fd();
            let desc = if self.tracing() { format!("{:?}", Brief(&f.op, &st.fs)) } else { String::new() };
            let r = st.apply(f.op, true);
            if self.tracing() {
                eprintln!("sim {:>12?} done #{id} {desc} -> {}", self.now(), match &r { Ok(_) => "ok".to_string(), Err(e) => e.to_string() });
            }
            if let Some(fd) = fd {
                st.fs.unpin(fd);
            }
            if let Err(e) = &r {
                self.fold(4, e.raw_os_error().unwrap_or(-1) as u64);
            }
            st.done.insert(id, r);
            f.waker
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The process dies: every op still in flight lands or not (by seed),
    /// every open description closes. The page cache stays.
    pub fn kill(&self) {
        let mut st = self.state();
        let mut ops: BTreeMap<u64, Op> = std::mem::take(&mut st.in_flight).into_iter().map(|(id, f)| (id, f.op)).collect();
        ops.append(&mut st.abandoned);
        for (_, op) in ops {
            // The draw is made either way: the crash stream stays as it was.
            let lands = st.crash_rng.chance(50) && !(self.lose_syncs.get() && matches!(op, Op::Sync { .. }));
            self.fold(5, lands as u64);
            if self.tracing() {
                eprintln!("sim kill: {:?} {}", Brief(&op, &st.fs), if lands { "lands" } else { "is lost" });
            }
            if lands {
                let _ = st.apply(op, false);
            }
        }
        st.done.clear();
        st.fs.close_all();
    }

    /// A power cut after a kill: see `SimFs::cut`.
    pub fn cut(&self) {
        let mut st = self.state();
        let st = &mut *st;
        for (ino, p) in st.fs.cut(&mut st.crash_rng, self.lose_syncs.replace(false)) {
            self.fold(6, ino ^ (p as u64) << 56);
            if self.tracing() {
                eprintln!("sim power cut: inode {ino} {p:?}");
            }
        }
    }

    fn handle(&self, fd: RawFd) -> Handle {
        let closed = self.closed.clone();
        Handle::Virtual { fd, closer: Arc::new(move |fd| closed.lock().unwrap().push(fd)) }
    }
}

/// What fault, if any, hits an op at completion.
enum Fault {
    Eio,
    Short,
    NoSpace,
    NotSupported,
}

impl State {
    fn draw_fault(&mut self, op: &Op) -> Option<Fault> {
        let sticky = self.plan.sticky_after.is_some_and(|n| self.ops_completed > n);
        let unsupported = match op {
            Op::Punch { .. } => self.plan.no_punch,
            Op::Alloc { .. } => self.plan.no_alloc,
            _ => false,
        };
        if unsupported {
            return Some(Fault::NotSupported);
        }
        if !self.faults_on {
            return None;
        }
        // Drawn for every op, so that the stream does not depend on which
        // faults the plan allows.
        let roll = self.fault_rng.below(self.plan.per_op.max(1));
        let kind = self.fault_rng.below(8);
        if sticky {
            return Some(Fault::Eio);
        }
        if self.faults_left == 0 || roll != 0 {
            return None;
        }
        self.faults_left -= 1;
        Some(match op {
            Op::Write { .. } => match kind {
                0..=3 => Fault::Eio,
                4..=5 => Fault::Short,
                _ => Fault::NoSpace,
            },
            Op::Alloc { .. } if kind >= 4 => Fault::NoSpace,
            _ => Fault::Eio,
        })
    }

    /// Apply a completed op to the files, with a fault where the plan
    /// says (`faults` false: an op landing at a kill).
    fn apply(&mut self, op: Op, faults: bool) -> io::Result<Vec<u8>> {
        let fault = if faults { self.draw_fault(&op) } else { None };
        if let Some(f) = fault {
            let errno_ = match f {
                Fault::Eio => libc::EIO,
                Fault::Short => 0,
                Fault::NoSpace => libc::ENOSPC,
                Fault::NotSupported => libc::EOPNOTSUPP,
            };
            if !matches!(f, Fault::NotSupported) {
                let (path, offset, len) = op.place(&self.fs);
                self.fault_log.push(FaultEvent { op_index: self.ops_completed, op: op.name(), path, offset, len, errno: errno_ });
            }
            match (&op, &f) {
                // A failed or short write may have moved a prefix of its
                // sectors before it stopped.
                (Op::Write { fd, off, data }, Fault::Eio | Fault::Short) => {
                    let sectors = (data.len() as u64).div_ceil(SECTOR);
                    let keep = (self.fault_rng.below(sectors) * SECTOR) as usize;
                    if keep > 0 {
                        let _ = self.fs.write(*fd, *off, &data[..keep.min(data.len())]);
                    }
                }
                // Writeback failed: maybe the dirty pages are gone unwritten.
                (Op::Sync { fd }, Fault::Eio) if self.fault_rng.chance(50) => self.fs.drop_dirty(*fd),
                _ => {}
            }
            return Err(match f {
                Fault::Short => io::Error::new(io::ErrorKind::WriteZero, "short write (simulated)"),
                _ => errno(errno_),
            });
        }
        let (name, fd) = (op.name(), op.fd());
        let span = match &op {
            Op::Write { off, data, .. } => (*off, data.len() as u64),
            Op::Alloc { off, len, .. } => (*off, *len),
            _ => (0, 0),
        };
        let fs = &mut self.fs;
        let r = match op {
            Op::Read { fd, off, len } => fs.read(fd, off, len),
            Op::Write { fd, off, data } => fs.write(fd, off, &data).map(|_| Vec::new()),
            Op::Sync { fd } => fs.sync(fd).map(|_| Vec::new()),
            Op::Alloc { fd, off, len } => fs.allocate(fd, off, len).map(|_| Vec::new()),
            Op::Punch { fd, off, len } => fs.punch(fd, off, len).map(|_| Vec::new()),
            Op::SetLen { fd, len } => fs.set_len(fd, len).map(|_| Vec::new()),
            Op::Rename { from, to } => fs.rename(&from, &to, true).map(|_| Vec::new()),
            Op::SyncDir { dir } => fs.sync_dir(&dir).map(|_| Vec::new()),
        };
        // A full filesystem is a fault the seed chose too (through the
        // capacity): log it, so that the driver knows the error was owed.
        if let Err(e) = &r {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                let path = fd.map(|fd| self.fs.path_of(fd)).unwrap_or_default();
                let (offset, len) = span;
                self.fault_log.push(FaultEvent { op_index: self.ops_completed, op: name, path, offset, len, errno: libc::ENOSPC });
            }
        }
        r
    }
}

/// An op's future: submits on first poll, resolves once completed.
struct OpFuture {
    w: Rc<World>,
    op: Option<Op>,
    id: Option<u64>,
}

impl Future for OpFuture {
    type Output = io::Result<Vec<u8>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(op) = this.op.take() {
            match this.w.submit(op, cx.waker()) {
                Ok(id) => this.id = Some(id),
                Err(done) => return Poll::Ready(done),
            }
            return Poll::Pending;
        }
        let id = this.id.expect("an op polled after it resolved");
        match this.w.take_done(id, cx.waker()) {
            Some(r) => {
                this.id = None;
                Poll::Ready(r)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.w.abandon(id);
        }
    }
}

/// The simulated world as an [`Io`]: cheap to clone, all clones share it.
#[derive(Clone)]
pub struct SimIo {
    pub w: Rc<World>,
}

impl SimIo {
    fn op(&self, op: Op) -> OpFuture {
        OpFuture { w: self.w.clone(), op: Some(op), id: None }
    }
}

impl Io for SimIo {
    async fn read_at(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.op(Op::Read { fd, off: offset, len: buf.len() }).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }
    async fn write_at(&self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
        self.op(Op::Write { fd, off: offset, data: Vec::new() }).submit_with(buf).await.map(drop)
    }
    async fn sync_data(&self, fd: RawFd) -> io::Result<()> {
        self.op(Op::Sync { fd }).await.map(drop)
    }
    async fn allocate(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.op(Op::Alloc { fd, off: offset, len }).await.map(drop)
    }
    async fn punch_hole(&self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.op(Op::Punch { fd, off: offset, len }).await.map(drop)
    }
    async fn set_len(&self, fd: RawFd, len: u64) -> io::Result<()> {
        self.op(Op::SetLen { fd, len }).await.map(drop)
    }
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(Op::Rename { from: from.to_path_buf(), to: to.to_path_buf() }).await.map(drop)
    }
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.op(Op::SyncDir { dir: dir.to_path_buf() }).await.map(drop)
    }

    fn open(&self, path: &Path, how: &OpenHow) -> io::Result<Handle> {
        self.w.alive()?;
        let fd = self.w.state().fs.open(path, how)?;
        Ok(self.w.handle(fd))
    }
    fn dio_alignment(&self, _fd: RawFd) -> u32 {
        SECTOR as u32
    }
    fn fstat(&self, fd: RawFd) -> io::Result<FileStat> {
        self.w.state().fs.fstat(fd)
    }
    fn seek_data(&self, fd: RawFd, at: u64) -> io::Result<Option<u64>> {
        self.w.state().fs.seek_data(fd, at)
    }
    fn stat(&self, path: &Path) -> io::Result<Option<FileStat>> {
        self.w.state().fs.stat(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.w.state().fs.canonicalize(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.create_dir_all(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.remove_file(path)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.rename(from, to, false)
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        self.w.state().fs.read_dir(dir)
    }
    fn flock(&self, fd: RawFd, how: LockHow) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.flock(fd, how)
    }
    fn ofd_lock(&self, fd: RawFd, range: (u64, u64), how: LockHow) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.ofd_lock(fd, range, how)
    }
    fn ofd_holder(&self, fd: RawFd, range: (u64, u64)) -> io::Result<Option<i32>> {
        self.w.alive()?;
        self.w.state().fs.ofd_holder(fd, range)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.create_dir(path)
    }
    /// From the simulated world's own mounts: the host's statfs would
    /// answer for a directory that is not the one the engine means.
    fn is_volatile_dir(&self, dir: &Path) -> io::Result<bool> {
        self.w.state().fs.is_volatile(dir)
    }
    /// The simulated file system never turns written zeros into holes.
    fn keeps_written_zeros(&self, _fd: RawFd) -> bool {
        true
    }
    /// The simulated cache never keeps a page whose writeback failed as
    /// clean (a failed sync drops the dirty pages or leaves them dirty):
    /// nothing to drop.
    fn drop_clean_cache(&self, _fd: RawFd) -> io::Result<()> {
        Ok(())
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.w.alive()?;
        self.w.state().fs.remove_dir(path)
    }
    fn now(&self) -> Instant {
        self.w.base + self.w.now()
    }
    fn sleep_blocking(&self, d: Duration) {
        self.w.set_now(self.w.now() + d)
    }
}

impl OpFuture {
    /// A write takes a copy of its bytes (as the kernel does when the op
    /// is submitted; the caller's buffer may change afterwards).
    fn submit_with(mut self, buf: &[u8]) -> OpFuture {
        if let Some(Op::Write { data, .. }) = &mut self.op {
            *data = buf.to_vec();
        }
        self
    }
}
