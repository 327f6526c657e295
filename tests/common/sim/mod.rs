//! The deterministic simulation (#19): the real engine on a simulated
//! world that one seed controls completely — files with a page cache that
//! a power cut can tear, completions in a seed-chosen order, faults, and
//! one thread running the engine's tasks in a seed-chosen interleaving on
//! simulated time. Replayable: the same seed gives the same run.
//!
//! - [`exec`]: the executor (tasks, wakers, timers, hang detection).
//! - [`fs`]: files and directories in memory; completed vs durable.
//! - [`world`]: [`SimIo`], the `Io` the engine runs on; in-flight ops,
//!   their completion order and faults; kill and power cut.
//! - [`model`], [`gen`]: what the disk must read as, and the workload.
//!
//! THE CONTRACT between the world (exec, fs, world) and the driver
//! (model, gen, tests/sim.rs) is this file's public API. Bodies marked
//! `todo!()` are filled in by the world's author; signatures change only
//! by agreement.
#![allow(dead_code)]

pub mod exec;
pub mod fs;
pub mod world;
pub mod model;
pub mod gen;

use std::future::Future;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

pub use world::SimIo;

/// How a power cut treats directory entries (see `fs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirMode {
    /// An entry (create, rename, unlink) is durable only after a sync of
    /// its directory.
    Posix,
    /// ext4/xfs-like: a file's fdatasync also commits every earlier
    /// namespace change of the filesystem. Changes commit in the order
    /// they were made (a cut keeps a prefix of them), and a directory's
    /// sync commits them all.
    Journal,
}

/// What the seed lets go wrong. The world draws faults from its own
/// stream; the driver only sets the budget.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    /// Transient faults (EIO, a short write, ENOSPC) to spread over the run.
    pub transient: u32,
    /// 1 in `per_op` completions is a fault while budget lasts.
    pub per_op: u64,
    /// After this many completed ops every op fails with EIO ("the disk
    /// died"), if set.
    pub sticky_after: Option<u64>,
    /// Punch and allocate answer EOPNOTSUPP for the whole run.
    pub no_punch: bool,
    pub no_alloc: bool,
    /// Blocks of 4 KiB the filesystem holds (ENOSPC past it).
    pub capacity_blocks: u64,
}

impl FaultPlan {
    pub fn none() -> FaultPlan {
        FaultPlan { transient: 0, per_op: u64::MAX, sticky_after: None, no_punch: false, no_alloc: false, capacity_blocks: u64::MAX }
    }
}

/// One fault the world injected: which op, on which file, where.
#[derive(Clone, Debug)]
pub struct FaultEvent {
    /// Index of the completion (the world's op counter) it hit.
    pub op_index: u64,
    pub op: &'static str,
    pub path: String,
    pub offset: u64,
    pub len: u64,
    pub errno: i32,
}

/// Why a run stopped early.
#[derive(Debug)]
pub enum SimError {
    /// Nothing can make progress but tasks are unfinished (lost wakeup,
    /// a std lock held across an await, a block_on inside a task).
    Hang(String),
    /// A task panicked (the payload's message).
    Panic(String),
    /// More events than the budget: a livelock.
    Budget(String),
}

/// Counters for the figures the README reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimStats {
    /// Polls, completions and timer jumps the executor ran.
    pub events: u64,
    pub ops_completed: u64,
    /// Faults logged (injected ones, a full filesystem, a dead disk).
    pub faults: u64,
    /// Kills without a power cut.
    pub kills: u64,
    /// Power cuts (each also a kill, not counted in `kills`).
    pub power_cuts: u64,
}

/// A task's result, once it finished.
pub struct Joined<T>(Rc<std::cell::RefCell<Option<T>>>);

impl<T> Joined<T> {
    pub fn is_done(&self) -> bool {
        self.0.borrow().is_some()
    }
    pub fn take(&self) -> Option<T> {
        self.0.borrow_mut().take()
    }
}

/// The world and its executor. Single-threaded; nothing here is Send.
pub struct Sim {
    pub world: Rc<world::World>,
    pub exec: Rc<exec::Exec>,
    /// GUIDs and delta names drawn from the seed while the Sim lives.
    _entropy: ublk_ploop::rng::EntropyGuard,
}

impl Sim {
    /// A fresh world from `seed`: the scheduler, faults, crash choices and
    /// entropy each get their own stream split from it (rng::mix), so that
    /// changing the workload leaves the others' choices alone.
    pub fn new(seed: u64, dir_mode: DirMode, faults: FaultPlan) -> Sim {
        use ublk_ploop::rng::mix;
        let entropy = ublk_ploop::rng::seeded(mix(seed ^ 5));
        let world = Rc::new(world::World::new(mix(seed ^ 3), mix(seed ^ 4), dir_mode, faults));
        let exec = Rc::new(exec::Exec::new(mix(seed ^ 2)));
        Sim { world, exec, _entropy: entropy }
    }
    /// The Io the engine runs on (cheap to clone; all clones share the world).
    pub fn io(&self) -> SimIo {
        SimIo { w: self.world.clone() }
    }
    /// Start a task; it runs when the executor picks it.
    pub fn spawn<T: 'static>(&self, name: &'static str, fut: impl Future<Output = T> + 'static) -> Joined<T> {
        self.spawn_id(name, fut).1
    }
    fn spawn_id<T: 'static>(&self, name: &'static str, fut: impl Future<Output = T> + 'static) -> (exec::TaskId, Joined<T>) {
        let slot = Rc::new(std::cell::RefCell::new(None));
        let out = slot.clone();
        let id = self.exec.spawn(
            name,
            Box::pin(async move {
                let v = fut.await;
                *out.borrow_mut() = Some(v);
            }),
        );
        (id, Joined(slot))
    }
    /// Run until every task finished.
    pub fn run(&self) -> Result<(), SimError> {
        while self.exec.step(&self.world)? {}
        Ok(())
    }
    /// Run at most `events` events (a poll, a completion, a timer); true
    /// when every task finished. A kill at a random moment is
    /// `run_for(k)` then `kill()`.
    pub fn run_for(&self, events: u64) -> Result<bool, SimError> {
        for _ in 0..events {
            if !self.exec.step(&self.world)? {
                return Ok(true);
            }
        }
        Ok(self.exec.task_count() == 0)
    }
    /// Spawn `fut` and run (with every other task) until it finished.
    pub fn block_on<T: 'static>(&self, name: &'static str, fut: impl Future<Output = T> + 'static) -> Result<T, SimError> {
        let (id, joined) = self.spawn_id(name, fut);
        while self.exec.is_running(id) {
            self.exec.step(&self.world)?;
        }
        Ok(joined.take().expect("a finished task left its result"))
    }
    /// The process dies: every task is dropped (an op in flight lands or
    /// not, by seed), every open file closes and its locks go. The page
    /// cache survives. The driver drops its own engine objects (Stack,
    /// Disk) before calling this.
    pub fn kill(&self) {
        self.die();
        self.world.state().kills += 1;
    }
    fn die(&self) {
        self.world.dying.set(true);
        self.exec.drop_all();
        self.world.dying.set(false);
        self.world.kill();
    }
    /// Power cut: a kill, then every file and directory falls back to its
    /// durable state plus a seed-chosen part of what was not yet durable;
    /// volatile directories come back empty.
    pub fn power_cut(&self) {
        self.die();
        self.world.cut();
        self.world.state().power_cuts += 1;
    }
    /// Make `dir` (created if needed) a tmpfs: its files outlive a kill
    /// and are all gone after a power cut, synced or not.
    pub fn volatile_dir(&self, dir: &Path) {
        self.world.state().fs.make_volatile(dir).expect("a volatile directory where a file is")
    }
    /// Simulated time since the world began.
    pub fn now(&self) -> Duration {
        self.world.now()
    }
    /// A future that completes after `d` of simulated time.
    pub fn sleep(&self, d: Duration) -> impl Future<Output = ()> + 'static {
        exec::Sleep { exec: Rc::downgrade(&self.exec), world: self.world.clone(), d, deadline: None }
    }
    /// Faults injected so far, in order.
    pub fn faults(&self) -> Vec<FaultEvent> {
        self.world.state().fault_log.clone()
    }
    /// Ops completed so far: with `faults()`, tells whether an error a
    /// request got was owed (a fault landed between its issue and its end).
    pub fn ops_completed(&self) -> u64 {
        self.world.state().ops_completed
    }
    pub fn stats(&self) -> SimStats {
        let st = self.world.state();
        SimStats {
            events: self.exec.events.get(),
            ops_completed: st.ops_completed,
            faults: st.fault_log.len() as u64,
            kills: st.kills,
            power_cuts: st.power_cuts,
        }
    }
    /// Names in a directory now (not necessarily durable).
    pub fn list(&self, dir: &Path) -> Vec<String> {
        let names = self.world.state().fs.read_dir(dir).unwrap_or_default();
        names.into_iter().map(|n| n.to_string_lossy().into_owned()).collect()
    }
    /// A file's current content (what a read would see).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        self.world.state().fs.file_content(path)
    }
    /// Stop or resume injecting faults (the driver's own checks and the
    /// full read-back after a reopen run without them).
    pub fn set_faults_enabled(&self, on: bool) {
        self.world.set_faults_enabled(on)
    }
    /// A hash of every scheduling and fault decision so far: two runs of
    /// one seed must agree.
    pub fn trace_hash(&self) -> u64 {
        self.world.trace_hash()
    }
    /// Ops that completed synchronously because they were awaited outside
    /// the executor's tasks (a `block_on` in the engine or the driver):
    /// they work, but explore no interleaving, so a driver may flag them.
    pub fn inline_ops(&self) -> u64 {
        self.world.state().inline_ops
    }
    /// Print every event to stderr (also on with UBLK_PLOOP_SIM_TRACE=1).
    pub fn set_trace(&self, on: bool) {
        self.world.set_trace(on)
    }
    /// Events allowed before a run stops with `SimError::Budget`.
    pub fn set_budget(&self, events: u64) {
        self.exec.budget.set(self.exec.events.get().saturating_add(events))
    }
}
