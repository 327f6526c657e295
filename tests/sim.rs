//! The deterministic simulation of the whole engine (#19): the real stack
//! on a simulated world that one seed controls (page cache, completion
//! order, faults, kills, power cuts, the interleaving of the engine's
//! tasks), driven by a workload drawn from the seed and checked against a
//! model after every step and every reopen.
//!
//! - `UBLK_PLOOP_SIM_SEEDS=N` seeds (default 200) from `UBLK_PLOOP_SIM_FIRST`
//!   (default 1); `UBLK_PLOOP_SIM_SEED=N` replays one.
//! - `UBLK_PLOOP_SIM_TRACE=1` prints the step log.
//! - `UBLK_PLOOP_SIM_NO_REGRESSIONS=1` skips the regression seeds (which
//!   otherwise run first).
//!
//! A failure names the invariant, the step, the sector and what was read
//! against what was allowed, and prints the line that replays it.

#[path = "common/sim/mod.rs"]
mod sim;
#[path = "sim_parts/backup.rs"]
mod backup;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use sim::gen::{self, Config, WorkOp};
use sim::model::{fill_payload, Model, OpId};
use sim::{FaultEvent, Joined, Sim, SimError, SimIo};
use ublk_ploop::io::{Direct, Io};
use ublk_ploop::layers::ploop::check;
use ublk_ploop::layers::{Format, PloopLayer};
use ublk_ploop::{LayerSpec, Stack, StackOptions};

/// Seeds that once failed, kept so they run first (each with why).
const REGRESSION_SEEDS: &[u64] = &[
    // A discard in flight punched a cluster that a write issued after it
    // allocated: the model allowed its zeros only once the discard ended
    // (a model defect; the engine was right, the two are unordered).
    1688,
];

/// A run ends early, passing, when the reopen finds the filesystem full.
const DISK_FULL: &str = "disk full at reopen";

/// Where the disk's files live in the simulated filesystem.
const DIR: &str = "/sim/disk";
/// Full read-backs go in pieces of this many bytes.
const READBACK_CHUNK: u64 = 1 << 20;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn tracing() -> bool {
    std::env::var_os("UBLK_PLOOP_SIM_TRACE").is_some_and(|v| v != "0")
}

/// What a run adds to the figures.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    steps: u64,
    kills: u64,
    power_cuts: u64,
    faults: u64,
    events: u64,
    ops: u64,
    reopens: u64,
    /// Known engine findings met (see the FINDING comments).
    findings: u64,
    trace_hash: u64,
    backup: backup::BackupFigures,
}

/// What a request's task reports when it ends.
enum Outcome {
    Done,
    /// The engine returned an error (errno, message).
    Failed(i32, String),
    /// A read returned what the model does not allow.
    Mismatch(String),
}

/// A request or online operation in flight.
struct Pending {
    joined: Joined<Outcome>,
    what: String,
    step: u64,
    /// The world's completed-op count when it was issued: a fault after it
    /// may be what failed it.
    issued_ops: u64,
    /// A change (write, write-zeroes, discard): the trackers must mark it.
    change: Option<backup::Change>,
}

struct SnapshotInFlight {
    joined: Joined<Result<(), (i32, String)>>,
    path: PathBuf,
    step: u64,
    issued_ops: u64,
}

/// The faults the world injected so far, for tasks (which cannot hold
/// the Sim that owns them).
type FaultProbe = Rc<dyn Fn() -> Vec<FaultEvent>>;

/// Tell the model about writebacks that failed since it last looked,
/// before it hears of anything that happened after them.
fn note_faults(model: &RefCell<Model>, seen: &std::cell::Cell<usize>, probe: &FaultProbe) {
    let faults = probe();
    if faults.len() == seen.get() {
        return;
    }
    let lost = faults[seen.get()..].iter().any(|f| f.op == "sync_data");
    seen.set(faults.len());
    if lost {
        model.borrow_mut().page_cache_lost();
    }
}

/// What a request's task needs to keep the model in step.
#[derive(Clone)]
struct Watch {
    model: Rc<RefCell<Model>>,
    seen: Rc<std::cell::Cell<usize>>,
    probe: FaultProbe,
}

impl Watch {
    fn model(&self) -> std::cell::RefMut<'_, Model> {
        note_faults(&self.model, &self.seen, &self.probe);
        self.model.borrow_mut()
    }
}

struct Driver {
    cfg: Config,
    sim: Rc<Sim>,
    watch: Watch,
    io: SimIo,
    stack: Option<Rc<Stack>>,
    /// The layers, bottom first, as the stack has them.
    paths: Vec<PathBuf>,
    next_layer: usize,
    queues: Vec<Vec<Pending>>,
    snapshot: Option<SnapshotInFlight>,
    /// Backups, the record of changes, trackers (invariants 5, 6).
    bk: backup::Backups,
    /// The world's op count at the last (re)open: a failed sync since then
    /// is remembered by the open layers (`SyncGroup`), so later syncs owe
    /// an error.
    opened_ops: u64,
    block: u64,
    step: u64,
    figures: Figures,
    trace: bool,
}

fn errinfo(e: ublk_ploop::Error) -> (i32, String) {
    (e.errno(), e.to_string())
}

fn sim_error(e: SimError, step: u64) -> String {
    match e {
        SimError::Hang(s) => format!("invariant 8 (liveness): step {step}: hang: {s}"),
        SimError::Budget(s) => format!("invariant 8 (liveness): step {step}: event budget exhausted: {s}"),
        SimError::Panic(s) => format!("step {step}: a task panicked: {s}"),
    }
}

impl Driver {
    fn new(cfg: Config) -> Driver {
        let sim = Rc::new(Sim::new(cfg.seed, cfg.dir_mode, cfg.faults.clone()));
        let io = sim.io();
        let model = Rc::new(RefCell::new(Model::new(cfg.size, cfg.cluster)));
        let weak = Rc::downgrade(&sim);
        let probe: FaultProbe = Rc::new(move || weak.upgrade().map(|s| s.faults()).unwrap_or_default());
        let watch = Watch { model: model.clone(), seen: Rc::new(std::cell::Cell::new(0)), probe };
        let queues = (0..cfg.queues).map(|_| Vec::new()).collect();
        Driver {
            cfg,
            sim,
            watch,
            io,
            stack: None,
            paths: Vec::new(),
            next_layer: 0,
            queues,
            snapshot: None,
            bk: backup::Backups::default(),
            opened_ops: 0,
            block: 512,
            step: 0,
            figures: Figures::default(),
            trace: tracing(),
        }
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{} t{:?}] {}", self.step, self.sim.now(), what());
        }
    }

    fn stack(&self) -> Rc<Stack> {
        self.stack.clone().expect("the stack is open between steps")
    }

    /// Run `fut` to its end on the executor, with whatever else is running.
    fn block_on<T: 'static>(&self, name: &'static str, fut: impl std::future::Future<Output = T> + 'static) -> Result<T, String> {
        self.sim.block_on(name, fut).map_err(|e| sim_error(e, self.step))
    }

    fn new_layer_path(&mut self) -> PathBuf {
        let p = Path::new(DIR).join(format!("delta{}.img", self.next_layer));
        self.next_layer += 1;
        p
    }

    /// Create the base image and open the stack on it (no faults: the
    /// setup is not under test).
    fn setup(&mut self) -> Result<(), String> {
        self.sim.set_faults_enabled(false);
        self.io.create_dir_all(Path::new(DIR)).map_err(|e| format!("setup: creating {DIR}: {e}"))?;
        let base = self.new_layer_path();
        let (io, path, size, cluster) = (self.io.clone(), base.clone(), self.cfg.size, self.cfg.cluster);
        // The directory is synced as the descriptor's store would: the
        // base's entry must survive a power cut.
        self.block_on("create", async move {
            PloopLayer::create(&io, &path, size, cluster).await?;
            io.sync_dir(Path::new(DIR)).await.map_err(|e| ublk_ploop::Error::io(e, DIR))?;
            io.sync_dir(Path::new(DIR).parent().unwrap()).await.map_err(|e| ublk_ploop::Error::io(e, "/sim"))
        })?
        .map_err(|e| format!("setup: creating {}: {e}", base.display()))?;
        self.paths = vec![base];
        self.open(&self.paths.clone()).map_err(|e| format!("setup: {e}"))?;
        self.sim.set_faults_enabled(true);
        Ok(())
    }

    fn open(&mut self, paths: &[PathBuf]) -> Result<(), String> {
        let specs: Vec<LayerSpec> = paths.iter().map(LayerSpec::ploop).collect();
        let io = self.io.clone();
        let opts = StackOptions { read_only: false, direct: Direct::Auto };
        let (stack, _) = self
            .block_on("open", async move { Stack::open_layers(&io, &specs, &opts).await })?
            .map_err(|e| format!("opening {paths:?}: {e}"))?;
        self.block = stack.block_size() as u64;
        self.stack = Some(Rc::new(stack));
        self.opened_ops = self.sim.ops_completed();
        self.figures.reopens += 1;
        self.backup_reopened()
    }

    /// Was an error owed (invariant 7)? ENOSPC always is; otherwise a
    /// fault the world injected while the request was in flight, or a sync
    /// failure the open layers remember.
    fn owed(&self, errno: i32, issued_ops: u64) -> bool {
        if errno == libc::ENOSPC {
            return true;
        }
        let now = self.sim.ops_completed();
        self.sim
            .faults()
            .iter()
            .any(|f| (f.op_index >= issued_ops && f.op_index <= now) || (f.op_index >= self.opened_ops && f.op.contains("sync")))
    }

    /// From which world op on a fault may fail what is issued now: a fault
    /// reaches the engine only when the task that met it runs again, so a
    /// fault hitting anything still in flight (a BAT write a new request
    /// then relies on) counts too.
    fn owed_from(&self) -> u64 {
        let pending = self.queues.iter().flatten().map(|p| p.issued_ops);
        pending.chain(self.snapshot.iter().map(|s| s.issued_ops)).fold(self.sim.ops_completed(), u64::min)
    }

    /// Round a generated extent to the stack's block size.
    fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let b = self.block;
        let start = off / b * b;
        let end = ((off + len).div_ceil(b) * b).min(self.cfg.size / b * b);
        (start, (end - start).max(b))
    }

    /// Take the requests that finished, checking each (invariants 1, 7).
    fn reap(&mut self) -> Result<(), String> {
        for q in 0..self.queues.len() {
            let mut i = 0;
            while i < self.queues[q].len() {
                if !self.queues[q][i].joined.is_done() {
                    i += 1;
                    continue;
                }
                let p = self.queues[q].swap_remove(i);
                let outcome = p.joined.take().unwrap();
                if !matches!(outcome, Outcome::Mismatch(_)) {
                    self.change_done(&p)?;
                }
                match outcome {
                    Outcome::Done => {}
                    Outcome::Mismatch(m) => return Err(format!("{m} ({} issued at step {})", p.what, p.step)),
                    Outcome::Failed(errno, msg) => {
                        self.log(|| format!("{} (step {}) failed: {msg}", p.what, p.step));
                        if !self.owed(errno, p.issued_ops) {
                            return Err(format!(
                                "invariant 7 (errors owed): step {}: {} issued at step {} (world op {}) failed with no fault to owe it: {msg} (errno {errno}); faults so far: {:?}",
                                self.step,
                                p.what,
                                p.step,
                                p.issued_ops,
                                self.sim.faults().iter().map(|f| format!("{} {} {:#x}+{:#x} at op {}", f.op, f.path, f.offset, f.len, f.op_index)).collect::<Vec<_>>()
                            ));
                        }
                    }
                }
            }
        }
        self.reap_snapshot()?;
        self.reap_backup()
    }

    fn reap_snapshot(&mut self) -> Result<(), String> {
        if !self.snapshot.as_ref().is_some_and(|s| s.joined.is_done()) {
            return Ok(());
        }
        let snap = self.snapshot.take().unwrap();
        let result = snap.joined.take().unwrap();
        // Outside any task, with no stack change running: the gate is open.
        let now = self.stack().paths();
        let swapped = now.len() > self.paths.len();
        self.log(|| format!("snapshot {} (step {}): {result:?}, swapped {swapped}", snap.path.display(), snap.step));
        self.watch.model().snapshot_end(Some(swapped), result.is_ok());
        self.paths = now;
        if let Err((errno, msg)) = result {
            if errno != libc::EBUSY && !self.owed(errno, snap.issued_ops) {
                return Err(format!("invariant 7 (errors owed): step {}: snapshot issued at step {} failed: {msg}", self.step, snap.step));
            }
        }
        Ok(())
    }

    /// Run `events` executor events, then reap.
    fn run_for(&mut self, events: u64) -> Result<(), String> {
        self.sim.run_for(events).map_err(|e| sim_error(e, self.step))?;
        self.reap()
    }

    /// Everything in flight finishes.
    fn settle(&mut self) -> Result<(), String> {
        self.sim.run().map_err(|e| sim_error(e, self.step))?;
        self.reap()?;
        assert!(self.queues.iter().all(Vec::is_empty) && self.snapshot.is_none() && !self.bk.busy(), "settled with work left");
        Ok(())
    }

    /// Issue a request on `queue` once it has room.
    fn request(&mut self, queue: usize, op: &WorkOp) -> Result<(), String> {
        while self.queues[queue].len() >= self.cfg.depth || self.held_by_freeze(op) {
            self.run_for(1)?;
        }
        let stack = self.stack();
        let io = self.io.clone();
        let w = self.watch.clone();
        let issued_ops = self.owed_from();
        let (what, joined) = match *op {
            WorkOp::Write { off, len, misalign, .. } => {
                let (off, len) = self.aligned(off, len);
                let (id, tag) = w.model().issue_write(off, len);
                let mut buf = vec![0u8; len as usize + misalign];
                fill_payload(&mut buf[misalign..], tag, off);
                let joined = self.sim.spawn("write", async move {
                    let r = stack.write(&io, off, &buf[misalign..]).await;
                    w.model().complete(id, r.is_ok());
                    outcome(r)
                });
                (format!("write #{tag} {off:#x}+{len:#x}"), joined)
            }
            WorkOp::Read { off, len, misalign, .. } => {
                let (off, len) = self.aligned(off, len);
                let id = w.model().issue_read(off, len);
                let joined = self.sim.spawn("read", async move {
                    let mut buf = vec![0u8; len as usize + misalign];
                    let r = stack.read(&io, off, &mut buf[misalign..]).await;
                    read_outcome(&w, id, r, &buf[misalign..])
                });
                (format!("read {off:#x}+{len:#x}"), joined)
            }
            WorkOp::Zeroes { off, len, .. } => {
                let (off, len) = self.aligned(off, len);
                let id = w.model().issue_zeroes(off, len);
                let joined = self.sim.spawn("write-zeroes", async move {
                    let r = stack.write_zeroes(&io, off, len as usize).await;
                    w.model().complete(id, r.is_ok());
                    outcome(r)
                });
                (format!("write-zeroes {off:#x}+{len:#x}"), joined)
            }
            WorkOp::Discard { off, len, .. } => {
                let (off, len) = self.aligned(off, len);
                let id = w.model().issue_discard(off, len);
                let joined = self.sim.spawn("discard", async move {
                    let r = stack.discard(&io, off, len as usize).await;
                    w.model().complete(id, r.is_ok());
                    outcome(r)
                });
                (format!("discard {off:#x}+{len:#x}"), joined)
            }
            WorkOp::Flush { .. } => {
                let id = w.model().issue_flush();
                let joined = self.sim.spawn("flush", async move {
                    let r = stack.flush(&io).await;
                    w.model().complete(id, r.is_ok());
                    outcome(r)
                });
                ("flush".to_string(), joined)
            }
            _ => unreachable!("not a request: {op:?}"),
        };
        self.log(|| format!("queue {queue}: {what}"));
        let change = self.bk.change(op, self.aligned_op(op));
        self.queues[queue].push(Pending { joined, what, step: self.step, issued_ops, change });
        Ok(())
    }

    fn snapshot(&mut self) -> Result<(), String> {
        // One job at a time: refused while a backup runs, as the daemon does.
        if self.snapshot.is_some() || self.bk.busy() || self.paths.len() >= gen::MAX_LAYERS {
            return Ok(());
        }
        let path = self.new_layer_path();
        self.log(|| format!("snapshot onto {}", path.display()));
        self.watch.model().snapshot_begin();
        let (stack, io, p) = (self.stack(), self.io.clone(), path.clone());
        // As ops::snapshot does, minus the descriptor: the new delta's
        // directory entry is made durable before the swap.
        let joined = self.sim.spawn("snapshot", async move {
            let top = stack.prepare_top(&io, &p).await.map_err(errinfo)?;
            if let Err(e) = io.sync_dir(Path::new(DIR)).await {
                ublk_ploop::stack::discard_top(&io, top).await;
                return Err(errinfo(ublk_ploop::Error::io(e, DIR)));
            }
            stack.install_top(&io, top).await.map(|_| ()).map_err(errinfo)
        });
        let issued_ops = self.owed_from();
        self.snapshot = Some(SnapshotInFlight { joined, path, step: self.step, issued_ops });
        Ok(())
    }

    /// The process dies (or the power goes) `after` events from now; then
    /// the disk is checked and reopened as the daemon's recovery would.
    fn crash(&mut self, after: u64, cut: bool, repair: bool) -> Result<(), String> {
        self.run_for(after)?;
        self.log(|| if cut { "power cut".into() } else { "kill".into() });
        // A snapshot caught in flight may or may not have made its delta
        // the top: the reopen decides.
        let new_top = self.snapshot.take().map(|s| s.path);
        self.bk.crashed();
        for q in &mut self.queues {
            q.clear();
        }
        self.stack = None;
        {
            let mut model = self.watch.model();
            if cut {
                model.power_cut();
            } else {
                model.kill();
            }
        }
        if cut {
            self.sim.power_cut();
            self.figures.power_cuts += 1;
        } else {
            self.sim.kill();
            self.figures.kills += 1;
        }
        self.recover(new_top, repair, true)
    }

    /// Check every delta, reopen, read the whole disk back against the
    /// model (then collapse it).
    fn recover(&mut self, new_top: Option<PathBuf>, repair: bool, crashed: bool) -> Result<(), String> {
        self.sim.set_faults_enabled(false);
        let result = self.recover_quietly(new_top, repair, crashed);
        self.sim.set_faults_enabled(true);
        self.opened_ops = self.sim.ops_completed();
        result
    }

    fn recover_quietly(&mut self, new_top: Option<PathBuf>, repair: bool, crashed: bool) -> Result<(), String> {
        // The snapshot's delta, if it survived whole enough to open: after
        // the swap it may hold acknowledged writes.
        let mut candidates = vec![self.paths.clone()];
        if let Some(top) = &new_top {
            let mut with = self.paths.clone();
            with.push(top.clone());
            candidates.insert(0, with);
            self.watch.model().unsure_holdings();
        }
        let mut last_err = String::new();
        let mut opened = false;
        for paths in candidates {
            if paths.len() > self.paths.len() && self.sim.read_file(paths.last().unwrap()).is_none() {
                continue;
            }
            self.check_deltas(&paths, repair, crashed, new_top.as_deref())?;
            match self.open(&paths) {
                Ok(()) => {
                    if paths.len() > self.paths.len() {
                        // Now a member for good: its entry is made durable,
                        // as the descriptor's store would have.
                        let io = self.io.clone();
                        self.block_on("sync-dir", async move { io.sync_dir(Path::new(DIR)).await })?
                            .map_err(|e| format!("step {}: syncing {DIR} with faults off: {e}", self.step))?;
                    }
                    self.paths = paths;
                    opened = true;
                    break;
                }
                Err(e) => last_err = e,
            }
        }
        if !opened && last_err.contains("(os error 28)") {
            // The filesystem is full (a tight capacity): the recovery owes
            // this error and the run cannot go on.
            return Err(format!("{DISK_FULL}: {last_err}"));
        }
        if !opened {
            return Err(format!("invariant 2 (deltas open): step {}: reopen after a {} failed: {last_err}", self.step, if crashed { "crash" } else { "clean close" }));
        }
        self.read_back()?;
        self.watch.model().recovered();
        Ok(())
    }

    /// Invariant 2: every delta passes `check` (an unclean mark and leaks
    /// allowed after a crash; after a clean close the top is clean).
    /// `unsure` (a snapshot's delta caught mid-creation) may be broken.
    fn check_deltas(&mut self, paths: &[PathBuf], repair: bool, crashed: bool, unsure: Option<&Path>) -> Result<(), String> {
        for path in paths {
            let (io, p) = (self.io.clone(), path.clone());
            let mut report = self.block_on("check", async move { check::check(&io, &p, Format::Ploop, repair).await })?;
            if repair && self.cfg.faults.no_punch && report.as_ref().is_err_and(|e| e.errno() == libc::EOPNOTSUPP) {
                // FINDING (reported, not yet fixed): check --repair releases
                // leaked clusters with punch_hole and fails outright where
                // the filesystem cannot punch, where the request path falls
                // back. Counted, then checked without repair.
                self.figures.findings += 1;
                self.log(|| format!("finding: check --repair of {} fails without hole punching", path.display()));
                let (io, p) = (self.io.clone(), path.clone());
                report = self.block_on("check", async move { check::check(&io, &p, Format::Ploop, false).await })?;
            }
            let report = match report {
                Ok(r) => r,
                Err(_) if Some(path.as_path()) == unsure => return Ok(()),
                Err(e) => return Err(format!("invariant 2 (check): step {}: check of {} failed: {e}", self.step, path.display())),
            };
            if Some(path.as_path()) == unsure && !report.header_errors.is_empty() {
                continue;
            }
            self.log(|| format!("check {}: unclean {}, leaked {}, repairs {:?}", path.display(), report.unclean, report.leaked_clusters, report.repairs));
            let bad = !report.header_errors.is_empty() || !report.bad_entries.is_empty() || (!crashed && report.unclean);
            if bad {
                return Err(format!(
                    "invariant 2 (check): step {}: {} after a {}: header errors {:?}, bad entries {:?}, unclean {}",
                    self.step,
                    path.display(),
                    if crashed { "crash" } else { "clean close" },
                    report.header_errors,
                    report.bad_entries,
                    report.unclean
                ));
            }
        }
        Ok(())
    }

    /// Read the whole disk (no faults) and check it against the model,
    /// which then takes it as the content.
    fn read_back(&mut self) -> Result<(), String> {
        let mut off = 0;
        while off < self.cfg.size {
            let len = READBACK_CHUNK.min(self.cfg.size - off);
            let (stack, io) = (self.stack(), self.io.clone());
            let data = self
                .block_on("read-back", async move {
                    let mut buf = vec![0u8; len as usize];
                    stack.read(&io, off, &mut buf).await.map(|_| buf)
                })?
                .map_err(|e| format!("invariant 7 (errors owed): step {}: read-back at {off:#x} failed with faults off: {e}", self.step))?;
            self.watch.model().check_readback(off, &data)?;
            off += len;
        }
        Ok(())
    }

    /// Close cleanly, check, reopen.
    fn clean_reopen(&mut self) -> Result<(), String> {
        self.settle()?;
        let (stack, io) = (self.stack(), self.io.clone());
        let issued_ops = self.sim.ops_completed();
        let closed = self.block_on("close", async move { stack.close(&io).await })?;
        self.stack = None;
        if let Err(e) = closed {
            if !self.owed(e.errno(), issued_ops) {
                return Err(format!("invariant 7 (errors owed): step {}: close failed: {e}", self.step));
            }
            // Not closed cleanly: as a kill, the page cache holds it all.
            self.watch.model().kill();
            self.sim.kill();
            self.figures.kills += 1;
            return self.recover(None, false, true);
        }
        self.sim.kill();
        self.recover(None, false, false)
    }

    fn step(&mut self, op: &WorkOp) -> Result<(), String> {
        self.watch.model().step = self.step;
        match op {
            WorkOp::Read { queue, .. } | WorkOp::Write { queue, .. } | WorkOp::Zeroes { queue, .. } | WorkOp::Discard { queue, .. } | WorkOp::Flush { queue } => {
                self.request(*queue, op)
            }
            WorkOp::Run(n) => self.run_for(*n),
            WorkOp::Settle => self.settle(),
            WorkOp::Snapshot => self.snapshot(),
            WorkOp::Kill { after, repair } => self.crash(*after, false, *repair),
            WorkOp::PowerCut { after, repair } => self.crash(*after, true, *repair),
            WorkOp::CleanReopen => self.clean_reopen(),
            WorkOp::ReadBack => {
                self.settle()?;
                self.sim.set_faults_enabled(false);
                let r = self.read_back();
                self.sim.set_faults_enabled(true);
                r
            }
            WorkOp::Backup { .. } => self.backup(op),
            WorkOp::TrackStart => self.track_start(),
            WorkOp::TrackDrain => self.track_drain(),
            WorkOp::TrackStop => self.track_stop(),
        }
    }

    /// The end: everything finishes, the disk reads as the model says, a
    /// clean close leaves every delta clean.
    fn finish(&mut self) -> Result<(), String> {
        self.settle()?;
        self.sim.set_faults_enabled(false);
        self.read_back()?;
        let (stack, io) = (self.stack(), self.io.clone());
        let issued_ops = self.sim.ops_completed();
        let closed = self.block_on("close", async move { stack.close(&io).await })?;
        self.stack = None;
        match closed {
            Ok(()) => self.check_deltas(&self.paths.clone(), false, false, None)?,
            Err(e) if self.owed(e.errno(), issued_ops) => {}
            Err(e) => return Err(format!("invariant 7 (errors owed): final close failed: {e}")),
        }
        Ok(())
    }
}

fn outcome(r: ublk_ploop::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Failed(e.errno(), e.to_string()),
    }
}

fn read_outcome(w: &Watch, id: OpId, r: ublk_ploop::Result<()>, data: &[u8]) -> Outcome {
    let mut model = w.model();
    match r {
        Ok(()) => match model.check_read(id, data) {
            Ok(()) => Outcome::Done,
            Err(m) => Outcome::Mismatch(m),
        },
        Err(e) => {
            model.read_failed(id);
            Outcome::Failed(e.errno(), e.to_string())
        }
    }
}

/// One seed, start to end: its figures, or the first invariant it broke.
fn run_seed(seed: u64) -> Result<Figures, String> {
    let (cfg, ops) = gen::generate(seed);
    let mut d = Driver::new(cfg.clone());
    d.log(|| format!("seed {seed}: {cfg:?}, {} steps", ops.len()));
    d.setup()?;
    let mut full = false;
    for (i, op) in ops.iter().enumerate() {
        d.step = i as u64;
        d.log(|| format!("{op:?}"));
        match d.step(op) {
            Err(e) if e.starts_with(DISK_FULL) => {
                d.log(|| e.clone());
                full = true;
                break;
            }
            r => r?,
        }
    }
    if !full {
        d.step = ops.len() as u64;
        d.finish()?;
    }
    let stats = d.sim.stats();
    let mut f = d.figures;
    f.steps = ops.len() as u64;
    f.faults = stats.faults;
    f.events = stats.events;
    f.ops = stats.ops_completed;
    f.trace_hash = d.sim.trace_hash();
    f.backup = d.bk.figures;
    Ok(f)
}

/// Run one seed, turning a panic inside (an engine assertion, a model
/// bug) into a failure that names the seed too.
fn run_seed_caught(seed: u64) -> Result<Figures, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed))) {
        Ok(r) => r,
        Err(p) => Err(format!("panicked: {}", p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("?"))),
    }
}

#[test]
fn seeds_hold_every_invariant() {
    let seeds: Vec<u64> = match env_u64("UBLK_PLOOP_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("UBLK_PLOOP_SIM_FIRST").unwrap_or(1);
            let count = env_u64("UBLK_PLOOP_SIM_SEEDS").unwrap_or(200);
            let regressions = if std::env::var_os("UBLK_PLOOP_SIM_NO_REGRESSIONS").is_some() { &[][..] } else { REGRESSION_SEEDS };
            regressions.iter().copied().chain(first..first + count).collect()
        }
    };
    let mut total = Figures::default();
    for (i, &seed) in seeds.iter().enumerate() {
        let f = match run_seed_caught(seed) {
            Ok(f) => f,
            Err(why) => panic!("seed {seed} failed ({why}); replay: UBLK_PLOOP_SIM_SEED={seed} cargo test --test sim"),
        };
        // Determinism self-check: the same seed, the same decisions.
        if i % 50 == 49 {
            let again = run_seed_caught(seed).unwrap_or_else(|why| panic!("seed {seed} passed, then failed on its rerun ({why}): the simulation is not deterministic; replay: UBLK_PLOOP_SIM_SEED={seed}"));
            assert_eq!(f.trace_hash, again.trace_hash, "seed {seed}: two runs made different decisions (trace hashes differ); replay: UBLK_PLOOP_SIM_SEED={seed}");
        }
        total.steps += f.steps;
        total.kills += f.kills;
        total.power_cuts += f.power_cuts;
        total.faults += f.faults;
        total.events += f.events;
        total.ops += f.ops;
        total.reopens += f.reopens;
        total.findings += f.findings;
        total.backup.add(&f.backup);
    }
    println!(
        "sim figures: seeds {}, steps {}, kills {}, power cuts {}, faults {}, events {}, ops {}, reopens {}, known findings met {}",
        seeds.len(),
        total.steps,
        total.kills,
        total.power_cuts,
        total.faults,
        total.events,
        total.ops,
        total.reopens,
        total.findings
    );
    println!("sim backups: {:?}", total.backup);
}
