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
//! - `UBLK_PLOOP_SIM_SHRINK=SECS` shrinks a failing seed's op list for up
//!   to SECS and saves it to `target/sim-fail-SEED.json`;
//!   `UBLK_PLOOP_SIM_REPLAY=FILE` reruns such a file.
//!
//! A failure names the invariant, the step, the sector and what was read
//! against what was allowed, and prints the line that replays it.

#[path = "common/sim/mod.rs"]
mod sim;
#[path = "sim_parts/bare.rs"]
mod bare;
#[path = "sim_parts/disk.rs"]
mod disk;
#[path = "sim_parts/shrink.rs"]
mod shrink;
#[path = "sim_parts/backup.rs"]
mod backup;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use sim::gen::{self, Config, WorkOp};
use disk::Job;
use shrink::Failure;
use sim::model::{decode, fill_payload, Model, OpId, Seen, Tag};
use sim::{FaultEvent, Sim, SimError, SimIo};
use ublk_ploop::disk::{ops, Disk, Guid};
use ublk_ploop::io::{Direct, Io};
use ublk_ploop::layers::ploop::check;
use ublk_ploop::layers::Format;
use ublk_ploop::{Stack, StackOptions};

/// Seeds that once failed, kept so they run first (each with why).
const REGRESSION_SEEDS: &[u64] = &[
    // A discard in flight punched a cluster that a write issued after it
    // allocated: the model allowed its zeros only once the discard ended
    // (a model defect; the engine was right, the two are unordered).
    1688,
    // An injected EIO reopening the top after an online grow left the
    // stack without its top but its owner map naming it: a read panicked.
    19,
    // The directory sync after the descriptor's rename failed; the
    // snapshot removed its new top, which the renamed descriptor named.
    576,
    // The same for a lower merge's final store: the descriptor on disk
    // was not the daemon's.
    385,
    // A former top whose close failed kept its exclusive lock until the
    // device stopped: a later merge into it was refused as "in use".
    401,
    // A delta whose writeback failed keeps its in-use mark (a model rule).
    1434,
    // A tracker attached while an online grow ran was sized for the old
    // disk: writes past the old end went unmarked.
    118,
    // After a failed sync of the top a later one succeeded (O_DIRECT did
    // not remember the failure): a merge dropped its parent on it, and
    // flushes claimed lost writes durable.
    145,
    25,
    // A backup read data a failed writeback then lost, and ended Ok: its
    // restore differed from the device at the frozen point.
    910,
    // After a failed sync a write was acknowledged into a cluster whose
    // table entry the writeback had lost; a kill then lost the write.
    728,
    // A compaction's own opening met the failed sync; the reopened top
    // forgot it and a flush succeeded. Later (with the compaction's own
    // cuts in the workload) the same seed, and a 2-hour run's, met it in
    // the reopen itself: its in-use mark's sync failed, the retry's
    // succeeded, and the top forgot the first.
    1071,
    187,
    // A model defect (2-hour run): after a failed writeback a read-back
    // took what the live stack read as the content; a restart read the
    // table on disk, which the lost writeback never updated.
    12953784027610,
    // The owner map named the top for a cluster whose entry a failed BAT
    // write undid while another request (which then failed) was allocating
    // it; a snapshot made that top a lower layer, and a copy-up trusted the
    // map: a panic (no entry there), or a copy of older data from below.
    4072121796817,
    4072121797750,
    // A snapshot over a stack whose former top could not be closed (its
    // sync failed) was taken and reported Ok through the stack's own API
    // (the descriptor's path closed it first): what the failed writeback
    // lost was frozen, and a power cut later showed zeros.
    4072121797667,
    4072121806206,
    // A kill between a snapshot's (or switch's) descriptor rename and its
    // directory sync; the restart served the new top and acknowledged
    // flushes; a power cut brought the old descriptor back, without the
    // top that had taken the writes.
    4072121812305,
    4072121813682,
    // A kill while deleting a snapshot of another branch left the delta it
    // merged into marked in use; a switch into that branch served it as it
    // was, and it stayed marked after a clean stop.
    4072121814625,
    // Driver and model defects the long search found on the final engine:
    // a write acknowledged while a writeback failed was taken as holding
    // its cluster for sure; a descriptor left uncertain was checked
    // against the stack by the next (refused) operation; a failed
    // write-zeroes linked a cluster in memory only, and a kill took back
    // the zeros a read had shown.
    21660941229179,
    21660941232540,
    21660941226316,
    // A write the engine completed (and marked) just before a `track`
    // drain was reaped by the driver after it, its mark in the drained set.
    21660941254561,
    // A compaction's top would not reopen (three tries): the stack, closed,
    // serves without its top until a restart, as designed (seed 19's fix);
    // the driver compared it with the descriptor and read from it.
    12432250633076,
    // A kill during a snapshot left the frozen delta's last writes (its
    // clean mark with a BAT entry, and the data) in the page cache only;
    // the restart served them from below, a flush synced only the top,
    // and a power cut took back what reads had shown. A writable start
    // (and a switch) now syncs every lower layer before serving it.
    12432250630278,
    // A lower merge failed after linking a cluster into its parent's file;
    // the stack kept its old opening of the parent, so once the child was
    // deleted a compaction unlinked the top's discarded cluster (nothing
    // below, it believed) and the restart showed the child's old data from
    // the parent. A failed lower merge now reopens the parent.
    1255208727134,
    // The online merge into the parent's file: a failed fold (ENOSPC)
    // whose reopen of the parent met one transient read error closed the
    // stack (the reopen now retries).
    20025612189632,
    // A failed fold's sync of the parent's file, then a fold that made
    // that file the top: the model counted the merge's own failed sync
    // against the new top's flushes (it counts from the top's change now;
    // the engine links again what the fold copies over in place, so a
    // table block whose writeback failed is written again).
    25499325622065,
    25499325623247,
    // A merge of the top after the top's sync failed: the fold made the
    // parent's file the top, and a later flush succeeded on it (a merge
    // is refused now, as writes are, until a restart).
    26125928319775,
    // A merge whose descriptor store failed left its parent temporary; a
    // switch was cut short by a power cut, and the start finished the
    // merge: the model took the new top (the parent's file) for the
    // switch's (a model defect: it now asks whether the chain had it).
    26125928321433,
];

/// A run ends early, passing, when the reopen finds the filesystem full.
const DISK_FULL: &str = "disk full at reopen";

/// Where the disk's files live in the simulated filesystem.
const DIR: &str = "/sim/disk";
/// The link log's directory (a tmpfs), in worlds that keep one.
const LINKS: &str = "/run/ublk-ploop/links";
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
    /// Copy-ups a reopen linked from the link log a kill left.
    relinked: u64,
    /// Known engine findings met (see the FINDING comments).
    findings: u64,
    /// Online operations that ended Ok, by kind.
    snapshots: u64,
    merges: u64,
    switches: u64,
    grows: u64,
    compacts: u64,
    compact_moved: u64,
    /// Files a crash or a failed operation left that no descriptor names.
    leftovers: u64,
    trace_hash: u64,
    backup: backup::BackupFigures,
}

/// What a request's task reports when it ends.
enum Outcome {
    Done,
    /// The engine returned an error (errno, message).
    Failed(i32, String),
    /// A change refused before it touched anything (`ErrorKind::WritesRefused`:
    /// a sync of the top failed earlier).
    Refused(String),
    /// A read returned what the model does not allow.
    Mismatch(String),
}

/// A request in flight.
struct Pending {
    joined: sim::Joined<Outcome>,
    what: String,
    step: u64,
    /// The world's completed-op count when it was issued: a fault after it
    /// may be what failed it.
    issued_ops: u64,
    /// A change (write, write-zeroes, discard): the trackers must mark it.
    change: Option<backup::Change>,
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
    /// The disk directory as the daemon holds it (None while a job has it).
    disk: Option<Disk>,
    /// 4 KiB clusters: no descriptor allows them, so the driver keeps the
    /// chain on a bare stack (see `bare`).
    bare: bool,
    /// The next bare delta's number.
    next_layer: usize,
    /// An operation could not tell which descriptor is on disk: until the
    /// next open, operations may refuse with ESTALE.
    descriptor_uncertain: bool,
    /// The layers, bottom first, as the stack has them.
    paths: Vec<PathBuf>,
    /// The world op from which the top's failed syncs count against a
    /// flush: its opening, or the operation that made a file that was
    /// written through another opening before (a merge's target) the top.
    top_since: u64,
    /// Every layer the stack has served since it opened: a failed
    /// writeback of one a merge then dropped still fails every flush.
    served: Vec<PathBuf>,
    /// The disk's size now (it grows).
    size: u64,
    queues: Vec<Vec<Pending>>,
    /// The online operation running (one at a time, as the daemon admits).
    job: Option<Job>,
    /// The content (a tag per sector) of each snapshot taken while no
    /// write ran, by GUID: what a switch to it must show.
    snap_content: BTreeMap<Guid, Rc<Vec<Tag>>>,
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
        let size = cfg.size;
        let bare = cfg.cluster < 32 << 10;
        if cfg.links {
            sim.volatile_dir(Path::new(LINKS));
        }
        Driver {
            cfg,
            sim,
            watch,
            io,
            stack: None,
            disk: None,
            bare,
            next_layer: 0,
            descriptor_uncertain: false,
            top_since: 0,
            paths: Vec::new(),
            served: Vec::new(),
            size,
            queues,
            job: None,
            snap_content: BTreeMap::new(),
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

    /// The link log's directory, in worlds that keep one.
    fn links(&self) -> Option<&'static Path> {
        self.cfg.links.then_some(Path::new(LINKS))
    }

    fn stack(&self) -> Rc<Stack> {
        self.stack.clone().expect("the stack is open between steps")
    }

    /// Run `fut` to its end on the executor, with whatever else is running.
    fn block_on<T: 'static>(&self, name: &'static str, fut: impl std::future::Future<Output = T> + 'static) -> Result<T, String> {
        self.sim.block_on(name, fut).map_err(|e| sim_error(e, self.step))
    }

    /// Create the disk directory (`Disk::init`) and open it as the
    /// daemon does (no faults: the setup is not under test).
    fn setup(&mut self) -> Result<(), String> {
        self.sim.set_faults_enabled(false);
        if self.bare {
            self.bare_setup()?;
            self.sim.set_faults_enabled(true);
            return Ok(());
        }
        let (io, size, cluster) = (self.io.clone(), self.cfg.size, self.cfg.cluster);
        self.block_on("init", async move {
            Disk::init(&io, Path::new(DIR), size, cluster).await?;
            // The directory's own entry, as an administrator's mkdir -p
            // and a sync would leave it.
            io.sync_dir(Path::new(DIR).parent().unwrap()).await.map_err(|e| ublk_ploop::Error::io(e, "/sim"))
        })?
        .map_err(|e| format!("setup: creating the disk in {DIR}: {e}"))?;
        let disk = self.open_disk().map_err(|e| format!("setup: {e}"))?;
        self.disk = Some(disk);
        self.sim.set_faults_enabled(true);
        Ok(())
    }

    /// Open the disk as the daemon's start does: the descriptor, the
    /// writable chain it names, then finishing a merge a crash cut short.
    /// Sets the stack, the paths and the size; returns the disk.
    fn open_disk(&mut self) -> Result<Disk, String> {
        let io = self.io.clone();
        let opts = StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: self.links().map(Path::to_path_buf) };
        let step = self.step;
        let (stack, disk, merged, relinked) = self
            .block_on("open", async move {
                let mut disk = Disk::load_in(&io, Path::new(DIR)).await.map_err(|e| format!("loading the descriptor: {e}"))?;
                let specs = disk.writable_layers(&io).await.map_err(|e| format!("the descriptor's chain: {e}"))?;
                let (stack, reports) = Stack::open_layers(&io, &specs, &opts).await.map_err(|e| format!("opening {:?}: {e}", specs.iter().map(|s| &s.path).collect::<Vec<_>>()))?;
                let merged = ops::finish_merges(&io, &stack, &mut disk).await.map_err(|e| format!("step {step}: finishing an interrupted merge: {e}"))?;
                let relinked: u64 = reports.iter().map(|r| r.relinked).sum();
                Ok::<_, String>((stack, disk, merged, relinked))
            })??;
        self.figures.relinked += relinked;
        self.block = stack.block_size() as u64;
        self.descriptor_uncertain = false;
        self.paths = stack.paths();
        self.served = self.paths.clone();
        self.stack = Some(Rc::new(stack));
        self.opened_ops = self.sim.ops_completed();
        self.figures.reopens += 1;
        if !merged.is_empty() {
            self.log(|| format!("recovery finished merges: {merged:?}"));
            self.watch.model().merge_moves_holdings();
        }
        self.backup_reopened()?;
        Ok(disk)
    }

    /// Was an error owed (invariant 7)? ENOSPC always is; otherwise a
    /// fault the world injected while the request was in flight, or a sync
    /// failure the open layers remember.
    fn owed(&self, errno: i32, issued_ops: u64) -> bool {
        if errno == libc::ENOSPC {
            return true;
        }
        let now = self.sim.ops_completed();
        // A stack a failure closed (a top that would not reopen) refuses
        // everything after it.
        let closed = errno == libc::ESHUTDOWN;
        // An I/O error on a layer since the open may have been its
        // writeback's (met through a grow's or compaction's own opening):
        // the top then fails every sync and refuses writes.
        let layers: Vec<String> = self.served.iter().map(|t| t.display().to_string()).collect();
        self.sim.faults().iter().any(|f| {
            (f.op_index >= issued_ops && f.op_index <= now)
                || (f.op_index >= self.opened_ops && (closed || f.op.contains("sync") || errno == libc::EIO && layers.contains(&f.path)))
        })
    }

    /// From which world op on a fault may fail what is issued now: a fault
    /// reaches the engine only when the task that met it runs again, so a
    /// fault hitting anything still in flight (a BAT write a new request
    /// then relies on) counts too.
    fn owed_from(&self) -> u64 {
        let pending = self.queues.iter().flatten().map(|p| p.issued_ops);
        pending.chain(self.job.iter().map(|j| j.issued_ops)).fold(self.sim.ops_completed(), u64::min)
    }

    /// Round a generated extent to the stack's block size (and spread it
    /// over the whole disk once it grew).
    fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let b = self.block;
        let off = if self.size == self.cfg.size { off } else { (off as u128 * self.size as u128 / self.cfg.size as u128) as u64 };
        let start = off / b * b;
        let end = ((off + len).div_ceil(b) * b).min(self.size / b * b);
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
                // A request refused before it changed anything (a sync failed
                // earlier) owes no mark.
                let refused = matches!(&outcome, Outcome::Refused(_));
                if !matches!(outcome, Outcome::Mismatch(_)) && !refused {
                    self.change_done(&p)?;
                }
                match outcome {
                    Outcome::Done if p.what == "flush" => {
                        // Invariant 7's other side: after a failed sync of the
                        // top, no flush may claim durability (until a reopen).
                        let top = self.paths.last().map(|t| t.display().to_string());
                        let failed = self.sim.faults().into_iter().find(|f| {
                            f.op == "sync_data" && Some(&f.path) == top.as_ref() && f.op_index >= self.opened_ops.max(self.top_since) && f.op_index < p.issued_ops
                        });
                        if let Some(f) = failed {
                            return Err(format!(
                                "invariant 7 (errors owed): step {}: a flush issued at step {} succeeded after the top's sync failed (world op {})",
                                self.step, p.step, f.op_index
                            ));
                        }
                    }
                    Outcome::Done => {}
                    Outcome::Mismatch(m) => return Err(format!("{m} ({} issued at step {})", p.what, p.step)),
                    Outcome::Refused(msg) => {
                        self.log(|| format!("{} (step {}) refused: {msg}", p.what, p.step));
                        // Refused after any I/O error of the top since the
                        // open (one through a grow's or compaction's own opening
                        // counts as the top's writeback).
                        if !self.sim.faults().iter().any(|f| f.op_index >= self.opened_ops) {
                            return Err(format!(
                                "invariant 7 (errors owed): step {}: {} issued at step {} was refused with no fault since the open: {msg}",
                                self.step, p.what, p.step
                            ));
                        }
                    }
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
        self.reap_job()?;
        self.reap_backup()
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
        assert!(self.queues.iter().all(Vec::is_empty) && self.job.is_none() && !self.bk.busy(), "settled with work left");
        Ok(())
    }

    /// Issue a request on `queue` once it has room.
    fn request(&mut self, queue: usize, op: &WorkOp) -> Result<(), String> {
        if let Some(job) = &self.job {
            // Nothing writes while a switch or a quiet snapshot runs, and
            // nothing reads while a switch changes the content under it (the
            // daemon refuses a switch while the device is mounted).
            let writes = matches!(op, WorkOp::Write { .. } | WorkOp::Zeroes { .. } | WorkOp::Discard { .. });
            if job.kind == disk::JobKind::Switch || job.quiet() && writes {
                return Ok(());
            }
        }
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

    /// The process dies (or the power goes) `after` events from now; then
    /// the disk is checked and reopened as the daemon's recovery would.
    fn crash(&mut self, after: u64, cut: bool, repair: bool) -> Result<(), String> {
        self.run_for(after)?;
        self.log(|| if cut { "power cut".into() } else { "kill".into() });
        // An operation caught in flight may or may not have stored its
        // descriptor: the reopen decides.
        let job = self.job.take();
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
        self.recover(job, repair, true)
    }

    /// Check every delta, reopen, read the whole disk back against the
    /// model (then collapse it).
    fn recover(&mut self, job: Option<Job>, repair: bool, crashed: bool) -> Result<(), String> {
        self.sim.set_faults_enabled(false);
        let result = self.recover_quietly(job, repair, crashed);
        self.sim.set_faults_enabled(true);
        self.opened_ops = self.sim.ops_completed();
        result
    }

    fn recover_quietly(&mut self, job: Option<Job>, repair: bool, crashed: bool) -> Result<(), String> {
        let step = self.step;
        let what = if crashed { "crash" } else { "clean close" };
        if self.bare {
            if job.as_ref().is_some_and(|j| j.kind == disk::JobKind::Merge) {
                self.watch.model().merge_moves_holdings();
            }
            self.bare_recover(job.and_then(|j| j.new_top), repair, crashed)?;
            return self.recovered_size_and_read_back(what);
        }
        // The descriptor on disk decides the chain (invariant 3: it loads,
        // and names exactly the files there are).
        let io = self.io.clone();
        let disk = self
            .block_on("load", async move { Disk::load_in(&io, Path::new(DIR)).await })?
            .map_err(|e| format!("invariant 3 (descriptor): step {step}: loading the descriptor after a {what}: {e}"))?;
        let paths: Vec<PathBuf> = disk
            .layers(None)
            .map_err(|e| format!("invariant 3 (descriptor): step {step}: the descriptor after a {what}: {e}"))?
            .into_iter()
            .map(|s| s.path)
            .collect();
        self.check_files(&disk, crashed || job.is_some())?;
        self.check_deltas(&paths, repair, crashed, None)?;
        let disk = match self.open_disk() {
            Ok(d) => d,
            Err(e) if e.contains("(os error 28)") => {
                // The filesystem is full (a tight capacity): the recovery
                // owes this error and the run cannot go on.
                return Err(format!("{DISK_FULL}: {e}"));
            }
            Err(e) => return Err(format!("invariant 2 (deltas open): step {step}: reopen after a {what} failed: {e}")),
        };
        if let Some(job) = job {
            self.recovered_job(job, &disk)?;
        }
        self.disk = Some(disk);
        self.recovered_size_and_read_back(what)
    }

    /// After a reopen: the disk's size (a grow may have been cut short
    /// after it took), then the whole disk read back against the model.
    fn recovered_size_and_read_back(&mut self, what: &str) -> Result<(), String> {
        let step = self.step;
        let size = self.stack().size();
        if size != self.size {
            if size < self.size {
                return Err(format!("step {step}: the disk shrank from {} to {size} bytes over a {what}", self.size));
            }
            self.watch.model().grow(size);
            self.size = size;
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
            let links = self.links();
            let report = self.block_on("check", async move { check::check_in(&io, &p, Format::Ploop, repair, links).await })?;
            let report = match report {
                Ok(r) => r,
                Err(_) if Some(path.as_path()) == unsure => return Ok(()),
                Err(e) => return Err(format!("invariant 2 (check): step {}: check of {} failed: {e}", self.step, path.display())),
            };
            if Some(path.as_path()) == unsure && !report.header_errors.is_empty() {
                continue;
            }
            self.log(|| {
                format!(
                    "check {}: unclean {}, leaked {}, repairs {:?}, not repaired {:?}",
                    path.display(),
                    report.unclean,
                    report.leaked_clusters,
                    report.repairs,
                    report.not_repaired
                )
            });
            // A repair gives back every leak, or says why it could not (a
            // filesystem without hole punching).
            if repair && report.leaked_clusters > 0 && report.not_repaired.is_empty() {
                return Err(format!(
                    "invariant 2 (check): step {}: {} keeps {} leaked clusters after a repair that reports nothing left undone: {:?}",
                    self.step,
                    path.display(),
                    report.leaked_clusters,
                    report.repairs
                ));
            }
            // A delta whose writeback failed keeps its in-use mark (closing
            // it clean would claim what may not be on disk): allowed after a
            // fault on that file, for the next open or check to settle.
            let faulted = || self.sim.faults().iter().any(|f| Path::new(&f.path) == path.as_path());
            let bad = !report.header_errors.is_empty() || !report.bad_entries.is_empty() || (!crashed && report.unclean && !faulted());
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
    /// which then takes it as the content; returns it, a tag per sector.
    fn read_back(&mut self) -> Result<Vec<Tag>, String> {
        let mut off = 0;
        let mut tags = Vec::with_capacity((self.size / 512) as usize);
        while off < self.size {
            let len = READBACK_CHUNK.min(self.size - off);
            let (stack, io) = (self.stack(), self.io.clone());
            let data = self
                .block_on("read-back", async move {
                    let mut buf = vec![0u8; len as usize];
                    stack.read(&io, off, &mut buf).await.map(|_| buf)
                })?
                .map_err(|e| format!("invariant 7 (errors owed): step {}: read-back at {off:#x} failed with faults off: {e}", self.step))?;
            self.watch.model().check_readback(off, &data)?;
            for (i, sector) in data.chunks_exact(512).enumerate() {
                let at = off + i as u64 * 512;
                match decode(sector, at) {
                    Seen::Tag(t) => tags.push(t),
                    seen => return Err(format!("step {}: read-back at {at:#x} passed the model but decodes as {seen:?}", self.step)),
                }
            }
            off += len;
        }
        Ok(tags)
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
            WorkOp::Snapshot => self.snapshot(false),
            WorkOp::QuietSnapshot => self.snapshot(true),
            WorkOp::Merge { pick } => self.merge(*pick),
            WorkOp::Delete { pick } => self.delete(*pick),
            WorkOp::Switch { pick } => self.switch(*pick),
            WorkOp::Grow { clusters } => self.grow(*clusters),
            WorkOp::Compact { step } => self.compact(*step),
            WorkOp::Kill { after, repair } => self.crash(*after, false, *repair),
            WorkOp::PowerCut { after, repair } => self.crash(*after, true, *repair),
            WorkOp::PowerCutAtSync { within, skip, repair, sync_lost } => {
                let mut skip = *skip;
                let mut counted_at = None;
                for _ in 0..*within {
                    if self.sim.world.in_flight_kinds().iter().any(|k| k.starts_with("sync")) {
                        let at = self.sim.ops_completed();
                        if skip == 0 {
                            break;
                        }
                        if counted_at != Some(at) {
                            skip -= 1;
                            counted_at = Some(at);
                        }
                    }
                    self.run_for(1)?;
                }
                self.sim.world.lose_syncs.set(*sync_lost);
                self.crash(0, true, *repair)
            }
            WorkOp::CleanReopen => self.clean_reopen(),
            WorkOp::ReadBack => {
                self.settle()?;
                self.sim.set_faults_enabled(false);
                let r = self.read_back();
                self.sim.set_faults_enabled(true);
                r.map(drop)
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
            Ok(()) => {
                self.check_deltas(&self.paths.clone(), false, false, None)?;
                if let Some(disk) = self.disk.take() {
                    self.check_files(&disk, false)?;
                }
            }
            Err(e) if self.owed(e.errno(), issued_ops) => {}
            Err(e) => return Err(format!("invariant 7 (errors owed): final close failed: {e}")),
        }
        Ok(())
    }
}

fn outcome(r: ublk_ploop::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) if e.kind() == ublk_ploop::error::ErrorKind::WritesRefused => Outcome::Refused(e.to_string()),
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
fn run_seed(seed: u64) -> Result<Figures, Failure> {
    let (cfg, ops) = gen::generate(seed);
    run_ops(cfg, &ops)
}

/// A regression seed, in the world it failed in: without the link log.
fn run_regression(seed: u64) -> Result<Figures, Failure> {
    let (mut cfg, ops) = gen::generate(seed);
    cfg.links = false;
    run_ops(cfg, &ops)
}

/// `ops` in the world of `cfg.seed` (its scheduler, faults, crashes and
/// entropy come from the seed, whatever the list), a panic inside (an
/// engine assertion, a model bug) turned into a failure too.
fn run_ops(cfg: Config, ops: &[WorkOp]) -> Result<Figures, Failure> {
    let at = Cell::new(None);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_steps(cfg, ops, &at))) {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(why)) => Err(Failure::new(why, ops, at.get())),
        Err(p) => {
            let msg = p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("?");
            Err(Failure::new(format!("panicked: {msg}"), ops, at.get()))
        }
    }
}

/// The run itself; `at` follows the step (`None` in the setup, the list's
/// length in the final checks).
fn run_steps(cfg: Config, ops: &[WorkOp], at: &Cell<Option<usize>>) -> Result<Figures, String> {
    let seed = cfg.seed;
    let mut d = Driver::new(cfg.clone());
    d.log(|| format!("seed {seed}: {cfg:?}, {} steps", ops.len()));
    d.setup()?;
    let mut full = false;
    for (i, op) in ops.iter().enumerate() {
        at.set(Some(i));
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
        at.set(Some(ops.len()));
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
    d.log(|| format!("figures: {f:?}"));
    Ok(f)
}

/// `UBLK_PLOOP_SIM_REPLAY=FILE`: rerun a saved op list in its seed's world.
fn replay(file: &str) {
    let (seed, ops) = shrink::load(Path::new(file));
    let (cfg, _) = gen::generate(seed);
    match run_ops(cfg, &ops) {
        Ok(_) => println!("replay of {file} (seed {seed}, {} ops) passed", ops.len()),
        Err(why) => panic!("replay of {file} (seed {seed}, {} ops) failed ({why}) in a {} step", ops.len(), why.kind),
    }
}

/// A failing seed's message, after shrinking it when `UBLK_PLOOP_SIM_SHRINK`
/// gives seconds for that.
fn failed(seed: u64, why: Failure) -> String {
    let replay = format!("replay: UBLK_PLOOP_SIM_SEED={seed} cargo test --test sim");
    match env_u64("UBLK_PLOOP_SIM_SHRINK").filter(|&s| s > 0) {
        Some(secs) => {
            let (cfg, ops) = gen::generate(seed);
            let file = shrink::shrink_seed(&cfg, &ops, &why, secs);
            format!("seed {seed} failed ({why}); {replay}; shrunk: UBLK_PLOOP_SIM_REPLAY={} cargo test --test sim", file.display())
        }
        None => format!("seed {seed} failed ({why}); {replay}"),
    }
}

#[test]
fn seeds_hold_every_invariant() {
    if let Ok(file) = std::env::var("UBLK_PLOOP_SIM_REPLAY") {
        return replay(&file);
    }
    let (seeds, regressions): (Vec<u64>, usize) = match env_u64("UBLK_PLOOP_SIM_SEED") {
        Some(seed) => (vec![seed], 0),
        None => {
            let first = env_u64("UBLK_PLOOP_SIM_FIRST").unwrap_or(1);
            let count = env_u64("UBLK_PLOOP_SIM_SEEDS").unwrap_or(200);
            let regressions = if std::env::var_os("UBLK_PLOOP_SIM_NO_REGRESSIONS").is_some() { &[][..] } else { REGRESSION_SEEDS };
            (regressions.iter().copied().chain(first..first + count).collect(), regressions.len())
        }
    };
    let mut total = Figures::default();
    for (i, &seed) in seeds.iter().enumerate() {
        let run = if i < regressions { run_regression(seed) } else { run_seed(seed) };
        let f = match run {
            Ok(f) => f,
            Err(why) => panic!("{}", failed(seed, why)),
        };
        // Determinism self-check: the same seed, the same decisions.
        if i % 50 == 49 {
            let again = if i < regressions { run_regression(seed) } else { run_seed(seed) };
            let again = again.unwrap_or_else(|why| panic!("seed {seed} passed, then failed on its rerun ({why}): the simulation is not deterministic; replay: UBLK_PLOOP_SIM_SEED={seed}"));
            assert_eq!(f.trace_hash, again.trace_hash, "seed {seed}: two runs made different decisions (trace hashes differ); replay: UBLK_PLOOP_SIM_SEED={seed}");
        }
        total.steps += f.steps;
        total.kills += f.kills;
        total.power_cuts += f.power_cuts;
        total.faults += f.faults;
        total.events += f.events;
        total.ops += f.ops;
        total.reopens += f.reopens;
        total.relinked += f.relinked;
        total.findings += f.findings;
        total.snapshots += f.snapshots;
        total.merges += f.merges;
        total.switches += f.switches;
        total.grows += f.grows;
        total.compacts += f.compacts;
        total.compact_moved += f.compact_moved;
        total.leftovers += f.leftovers;
        total.backup.add(&f.backup);
    }
    println!(
        "sim figures: seeds {}, steps {}, kills {}, power cuts {}, faults {}, events {}, ops {}, reopens {} (copy-ups relinked {}), known findings met {}, snapshots {}, merges {}, switches {}, grows {}, compactions {} (clusters moved {}), leftover files {}",
        seeds.len(),
        total.steps,
        total.kills,
        total.power_cuts,
        total.faults,
        total.events,
        total.ops,
        total.reopens,
        total.relinked,
        total.findings,
        total.snapshots,
        total.merges,
        total.switches,
        total.grows,
        total.compacts,
        total.compact_moved,
        total.leftovers
    );
    println!("sim backups: {:?}", total.backup);
}
