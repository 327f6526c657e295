//! Backups, the record of changes and write trackers in the simulation
//! (plan §3.2, invariants 5 and 6).
//!
//! A backup runs as the daemon runs one: `BackupRecord::start`, then
//! `copy::send` on the sim's Io (inline: no threads) into a stream kept in
//! memory, then `finish`. Its `FsFreeze` stands for the filesystem on the
//! device: once frozen, the driver issues no change (write, write-zeroes,
//! discard) until the backup task ended, so that the device then reads as
//! at the frozen point. A backup that completed Ok is restored — the last
//! full one and every incremental after it, in order — with the receiver
//! (`receive_in`) in a world of its own (no faults, no capacity limit, and
//! its own kills: an incremental apply is sometimes stopped midway and
//! finished by `finish_interrupted_apply_in`), and the restored bytes are
//! checked (invariant 5) against the model as a read between the freeze
//! and the thaw, and byte for byte against the device read back when
//! nothing could have changed it since the frozen point.
//!
//! A failed backup gives its marks back; a crash drops a backup in flight
//! (its stream never joins the chain) and the record with it, unless a
//! clean close kept it in the top image, as the daemon reloads it. With no
//! record an incremental backup is refused, and the driver checks that.
//!
//! Invariant 6: a change issued after a tracker's attach returned, once it
//! completed, is marked until the next drain (checked when the request is
//! reaped, which is always before a drain); the record of changes too, as
//! long as no backup reached its frozen point since the change was issued
//! (the frozen point moves the record's marks into the backup).

use std::cell::Cell;
use std::future::Future;
use std::io::{Cursor, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bitvec::vec::BitVec;
use ublk_ploop::copy::receive::{finish_interrupted_apply_in, receive_in, Hooks};
use ublk_ploop::copy::send::CAPTURE_MAX;
use ublk_ploop::copy::{self, BackupRecord, End, FsFreeze, ReceiveOptions, SendOptions, Sent};
use ublk_ploop::io::{block_on, Direct, Io};
use ublk_ploop::rng::{mix, Rng};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{LayerSpec, Stack, StackOptions};

use super::sim::gen::WorkOp;
use super::sim::model::Time;
use super::sim::world::World;
use super::sim::{DirMode, FaultPlan, Joined, SimIo};
use super::{errinfo, sim_error, Driver, Pending, Watch};

/// Where restores are built, in their own world.
const RESTORE_DIR: &str = "/restore";

/// What the backups of a run add to the figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupFigures {
    /// Backups that completed Ok.
    pub full: u64,
    pub incremental: u64,
    /// Backups that failed (a fault, the freeze limit), owed.
    pub failed: u64,
    /// Backups a crash dropped in flight.
    pub dropped: u64,
    /// Incremental backups refused for want of a record of changes.
    pub refused: u64,
    /// Restored images checked against the model.
    pub restores: u64,
    /// ... and also byte for byte against the device.
    pub exact: u64,
    /// Incremental applies stopped midway (a kill or a power cut of the
    /// restoring world) and finished by the next receive.
    pub interrupted: u64,
    /// Records of changes a reopen found in the top image.
    pub records_loaded: u64,
    /// Completed changes checked against a tracker or the record.
    pub marks_checked: u64,
}

impl BackupFigures {
    pub fn add(&mut self, o: &BackupFigures) {
        self.full += o.full;
        self.incremental += o.incremental;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.refused += o.refused;
        self.restores += o.restores;
        self.exact += o.exact;
        self.interrupted += o.interrupted;
        self.records_loaded += o.records_loaded;
        self.marks_checked += o.marks_checked;
    }
}

/// A change request, as the trackers must see it.
pub struct Change {
    off: u64,
    len: u64,
    /// Its issue number (`Backups::seq`).
    seq: u64,
    /// Frozen points reached before it was issued.
    freezes: u64,
    /// A discard marks only where it changed something.
    discard: bool,
}

/// The filesystem's freeze, as a backup saw it.
#[derive(Default)]
struct FreezeState {
    frozen: Cell<bool>,
    /// Model times of the freeze and of the thaw.
    at: Cell<Option<Time>>,
    thawed: Cell<Option<Time>>,
    /// Changes still in flight at the thaw: held by the frozen stack, they
    /// land after the frozen point, and the device no longer reads as the
    /// backup.
    changes_at_thaw: Cell<usize>,
    /// Faults logged before the freeze.
    faults_at_freeze: Cell<usize>,
}

/// The filesystem on the simulated device: it stops issuing changes while
/// frozen (the driver holds them); a freeze counts as a frozen point.
struct SimFreeze {
    st: Rc<FreezeState>,
    watch: Watch,
    freezes: Rc<Cell<u64>>,
}

impl FsFreeze for SimFreeze {
    fn freeze(&mut self) -> ublk_ploop::Result<()> {
        self.st.faults_at_freeze.set((self.watch.probe)().len());
        self.st.at.set(Some(self.watch.model().mark_time()));
        self.st.frozen.set(true);
        self.freezes.set(self.freezes.get() + 1);
        Ok(())
    }
    fn thaw(&mut self) -> ublk_ploop::Result<()> {
        let mut model = self.watch.model();
        self.st.thawed.set(Some(model.mark_time()));
        self.st.changes_at_thaw.set(model.changes_in_flight());
        Ok(())
    }
}

/// The stream a backup writes, in memory.
struct StreamSink(Arc<Mutex<Vec<u8>>>);

impl Write for StreamSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Running {
    joined: Joined<Result<Sent, (i32, String)>>,
    incremental: bool,
    step: u64,
    issued_ops: u64,
    stream: Arc<Mutex<Vec<u8>>>,
    freeze: Rc<FreezeState>,
    /// The freeze limit is short enough that giving up is owed.
    short_limit: bool,
}

/// A write tracker `track start` attached (`since`: changes issued after
/// this number were issued after its attach returned).
struct Watched {
    tracker: Arc<Tracker>,
    since: u64,
    /// The last drain's marks and the changes issued by then: one the
    /// engine completed (and marked) just before the drain may be reaped
    /// by the driver only after it, its mark then in the drained set.
    drained: Option<(BitVec, u64)>,
}

/// The restored chain: the last full backup and the incrementals after it,
/// received in a world of its own.
struct Chain {
    io: SimIo,
    image: PathBuf,
    rng: Rng,
    streams: u64,
}

#[derive(Default)]
pub struct Backups {
    /// The record of changes since the last backup (the daemon's `cbt`).
    pub(super) record: Arc<Mutex<Option<Arc<Tracker>>>>,
    /// Changes issued after this number the record must hold.
    record_since: u64,
    running: Option<Running>,
    chain: Option<Chain>,
    trackers: Vec<Watched>,
    /// Changes issued so far.
    seq: Rc<Cell<u64>>,
    /// Frozen points reached so far.
    freezes: Rc<Cell<u64>>,
    /// Restores built so far (each world gets a seed of its own).
    worlds: u64,
    pub figures: BackupFigures,
}

impl Backups {
    /// A backup runs (one job at a time).
    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// The process died: a backup in flight is dropped, and the record
    /// and the trackers go with the stack (the reopen reloads a record a
    /// clean close kept).
    pub fn crashed(&mut self) {
        if self.running.take().is_some() {
            self.figures.dropped += 1;
        }
        self.trackers.clear();
        *self.record.lock().unwrap() = None;
    }

    /// A request was issued: a change gets its issue number.
    pub fn change(&mut self, op: &WorkOp, span: Option<(u64, u64)>) -> Option<Change> {
        let (off, len) = span?;
        self.seq.set(self.seq.get() + 1);
        Some(Change { off, len, seq: self.seq.get(), freezes: self.freezes.get(), discard: matches!(op, WorkOp::Discard { .. }) })
    }
}

/// Every granule of `c` is marked in `t`.
fn marked(t: &Tracker, c: &Change) -> bool {
    marked_in(&t.peek(), t.granularity(), c)
}

fn marked_in(bits: &BitVec, g: u64, c: &Change) -> bool {
    (c.off / g..=(c.off + c.len - 1) / g).all(|i| bits.get(i as usize).is_some_and(|b| *b))
}

fn is_change(op: &WorkOp) -> bool {
    matches!(op, WorkOp::Write { .. } | WorkOp::Zeroes { .. } | WorkOp::Discard { .. })
}

impl Driver {
    /// The extent a change request covers, as the driver issues it.
    pub(super) fn aligned_op(&self, op: &WorkOp) -> Option<(u64, u64)> {
        match *op {
            WorkOp::Write { off, len, .. } | WorkOp::Zeroes { off, len, .. } | WorkOp::Discard { off, len, .. } => Some(self.aligned(off, len)),
            _ => None,
        }
    }

    /// A frozen filesystem issues no change: `op` waits for the backup's end.
    pub(super) fn held_by_freeze(&self, op: &WorkOp) -> bool {
        is_change(op) && self.bk.running.as_ref().is_some_and(|r| r.freeze.frozen.get())
    }

    /// After every open: the record a clean close kept in the top image
    /// tracks on, as the daemon's start reloads it (a crash lost it).
    pub(super) fn backup_reopened(&mut self) -> Result<(), String> {
        self.bk.trackers.clear();
        let stack = self.stack();
        let loaded = self.block_on("load-record", async move {
            let Some(bm) = stack.take_saved_bitmaps().await.into_iter().next() else {
                return Ok(None);
            };
            let t = Arc::new(Tracker::from_bits(stack.size(), bm.granularity, &bm.bits));
            stack.add_tracker(t.clone()).await.map_err(errinfo)?;
            stack.keep_on_close(Some((t.clone(), bm.id)));
            Ok(Some(t))
        })?;
        let loaded = loaded.map_err(|(_, msg)| format!("step {}: loading the record of changes: {msg}", self.step))?;
        self.log(|| format!("record of changes at reopen: {:?}", loaded.as_ref().map(|t| t.dirty_count())));
        self.bk.figures.records_loaded += loaded.is_some() as u64;
        *self.bk.record.lock().unwrap() = loaded;
        self.bk.record_since = self.bk.seq.get();
        Ok(())
    }

    /// Start a backup, unless a job or a snapshot runs (the daemon refuses
    /// it then: EBUSY).
    pub(super) fn backup(&mut self, op: &WorkOp) -> Result<(), String> {
        let WorkOp::Backup { incremental, freeze_limit_us, in_flight, max_rounds, capture } = *op else { unreachable!() };
        if self.bk.running.is_some() || self.job.is_some() {
            return Ok(());
        }
        let current = self.bk.record.lock().unwrap().clone();
        let stack = self.stack();
        if incremental && current.is_none() {
            // Refused at once (no await): an incremental needs the record.
            let r = block_on(async { BackupRecord::start(&stack, None, true).await.map(drop) });
            return match r {
                Err(e) if e.errno() == libc::ENOENT => {
                    self.log(|| "incremental backup refused: no record of changes".into());
                    self.bk.figures.refused += 1;
                    Ok(())
                }
                r => Err(format!("invariant 5 (backups): step {}: an incremental backup with no record of changes was not refused: {r:?}", self.step)),
            };
        }
        let io = self.io.clone();
        let slot = self.bk.record.clone();
        let stream = Arc::new(Mutex::new(Vec::new()));
        let freeze = Rc::new(FreezeState::default());
        let mut fs = SimFreeze { st: freeze.clone(), watch: self.watch.clone(), freezes: self.bk.freezes.clone() };
        let sink = StreamSink(stream.clone());
        let id = ublk_ploop::rng::entropy_u128().to_le_bytes();
        let opts = SendOptions {
            incremental,
            end: End::Resume,
            in_flight,
            max_rounds,
            freeze_limit: Duration::from_micros(freeze_limit_us),
            capture_max: if capture { CAPTURE_MAX } else { 0 },
            inline: true,
            ..Default::default()
        };
        self.log(|| format!("backup (incremental {incremental}, record {})", current.is_some()));
        let joined = self.sim.spawn("backup", async move {
            let record = BackupRecord::start(&stack, current.as_ref(), incremental).await.map_err(errinfo)?;
            let opts = SendOptions { cbt: Some(record.tracker()), ..opts };
            let sent = copy::send(&io, &stack, Box::new(sink), None, &mut fs, opts, &|_, _, _| {}).await;
            record.finish(&stack, sent.is_ok(), &slot, id).await;
            sent.map_err(errinfo)
        });
        let issued_ops = self.owed_from();
        let short_limit = freeze_limit_us < 1_000_000;
        self.bk.running = Some(Running { joined, incremental, step: self.step, issued_ops, stream, freeze, short_limit });
        Ok(())
    }

    /// A backup that ended: a failure must be owed; a success is restored
    /// and compared (invariant 5).
    pub(super) fn reap_backup(&mut self) -> Result<(), String> {
        if !self.bk.running.as_ref().is_some_and(|r| r.joined.is_done()) {
            return Ok(());
        }
        let run = self.bk.running.take().unwrap();
        let result = run.joined.take().unwrap();
        self.log(|| format!("backup (step {}, incremental {}) ended: {:?}", run.step, run.incremental, result.as_ref().map(|s| s.rounds.len())));
        match result {
            Err((errno, msg)) => {
                self.bk.figures.failed += 1;
                let owed = (errno == libc::ETIMEDOUT && run.short_limit) || self.owed(errno, run.issued_ops);
                if !owed {
                    return Err(format!(
                        "invariant 7 (errors owed): step {}: a backup issued at step {} failed with no fault to owe it: {msg} (errno {errno})",
                        self.step, run.step
                    ));
                }
                Ok(())
            }
            Ok(_) => {
                if run.incremental {
                    self.bk.figures.incremental += 1;
                } else {
                    self.bk.figures.full += 1;
                }
                // A new record was published by this backup (or the old
                // one goes on): what is issued from now on it must hold.
                self.bk.record_since = self.bk.seq.get();
                // Changes held by the frozen stack land; nothing new is
                // issued meanwhile.
                self.sim.run().map_err(|e| sim_error(e, self.step))?;
                self.reap()?;
                self.sim.set_faults_enabled(false);
                let r = self.verify_backup(&run);
                self.sim.set_faults_enabled(true);
                r
            }
        }
    }

    fn verify_backup(&mut self, run: &Running) -> Result<(), String> {
        let step = self.step;
        let fail = |what: String| format!("invariant 5 (backups): step {step}: the {} backup issued at step {}: {what}", if run.incremental { "incremental" } else { "full" }, run.step);
        let (Some(from), Some(to)) = (run.freeze.at.get(), run.freeze.thawed.get()) else {
            return Err(fail("completed Ok without a freeze and a thaw".into()));
        };
        let stream = std::mem::take(&mut *run.stream.lock().unwrap());
        if !run.incremental {
            self.bk.worlds += 1;
            let seed = mix(self.cfg.seed ^ 0x7e57) ^ self.bk.worlds;
            self.bk.chain = Some(Chain::new(seed).map_err(&fail)?);
        }
        let Some(chain) = self.bk.chain.as_mut() else {
            return Err(fail("succeeded with no full backup before it to apply onto".into()));
        };
        let interrupted = chain.receive(&stream, run.incremental).map_err(&fail)?;
        self.bk.figures.interrupted += interrupted as u64;
        let restored = chain.read().map_err(&fail)?;
        let streams = chain.streams;
        if restored.len() as u64 != self.size {
            return Err(fail(format!("restores to {} bytes, the disk has {}", restored.len(), self.size)));
        }
        self.log(|| format!("backup restored ({} streams, {} stream bytes), frozen between model t{from} and t{to}", streams, stream.len()));
        // The content between the freeze and the thaw.
        self.watch
            .model()
            .check_as_read(0, &restored, from, to, "backup restored")
            .map_err(|m| fail(format!("{} (restored from {streams} streams)", m.replacen("invariant 1 (reads match): ", "", 1))))?;
        self.bk.figures.restores += 1;
        // Byte for byte with the device, when nothing changed it since the
        // frozen point: no change held over the thaw, no writeback lost.
        let lost = (self.watch.probe)()[run.freeze.faults_at_freeze.get()..].iter().any(|f| f.op == "sync_data");
        let exact = run.freeze.changes_at_thaw.get() == 0 && !lost;
        // The device read back (checked against the model as every
        // read-back is): a tag per sector, each sector's bytes being its
        // tag's payload at its offset.
        let device = self.read_back()?;
        if exact {
            use super::sim::model::{decode, Seen};
            let differs = |i: usize| decode(&restored[i * 512..(i + 1) * 512], i as u64 * 512) != Seen::Tag(device[i]);
            if let Some(i) = (0..device.len()).find(|&i| differs(i)) {
                let at = i as u64 * 512;
                let restored_as = match decode(&restored[i * 512..(i + 1) * 512], at) {
                    Seen::Tag(t) => self.watch.model.borrow().describe(t),
                    other => format!("{other:?}"),
                };
                let device_as = self.watch.model.borrow().describe(device[i]);
                return Err(fail(format!("sector {i} (offset {at:#x}) restores as {restored_as} but the device reads {device_as}")));
            }
        }
        self.bk.figures.exact += exact as u64;
        Ok(())
    }

    /// Invariant 6 for a change that completed: every tracker attached
    /// before it was issued marks it, and so does the record while no
    /// frozen point took its marks since.
    pub(super) fn change_done(&mut self, p: &Pending) -> Result<(), String> {
        let Some(c) = &p.change else { return Ok(()) };
        if c.discard {
            return Ok(());
        }
        for (i, w) in self.bk.trackers.iter().enumerate() {
            if w.since < c.seq {
                self.bk.figures.marks_checked += 1;
                let drained = w.drained.as_ref().is_some_and(|(bits, seq)| c.seq <= *seq && marked_in(bits, w.tracker.granularity(), c));
                if !marked(&w.tracker, c) && !drained {
                    return Err(format!(
                        "invariant 6 (trackers): step {}: {} (issued at step {}) completed after tracker {i} was attached and is not marked in it",
                        self.step, p.what, p.step
                    ));
                }
            }
        }
        // The stack's own: a grow ends the record (with requests held)
        // before the driver learns it when it reaps the grow.
        let record = self.bk.record.lock().unwrap().clone().and_then(|_| self.stack.as_ref().and_then(|s| s.kept_record()));
        if let Some(r) = record.filter(|_| self.bk.record_since < c.seq && c.freezes == self.bk.freezes.get()) {
            self.bk.figures.marks_checked += 1;
            if !marked(&r, c) {
                return Err(format!(
                    "invariant 6 (trackers): step {}: {} (issued at step {}) completed with the record of changes attached and is not in it",
                    self.step, p.what, p.step
                ));
            }
        }
        Ok(())
    }

    /// `track start`: a tracker attached while the requests go on (the
    /// step waits for the attach, as the control socket's answer does).
    pub(super) fn track_start(&mut self) -> Result<(), String> {
        if self.bk.trackers.len() >= 2 {
            return Ok(());
        }
        let stack = self.stack();
        let tracker = Arc::new(Tracker::new(stack.size(), stack.cluster_size()));
        let t = tracker.clone();
        match self.block_on("track-start", async move { stack.add_tracker(t).await.map_err(errinfo) })? {
            Ok(()) => {}
            // A grow ran while it waited: refused, as the daemon passes on.
            Err((libc::EAGAIN, msg)) => {
                self.log(|| format!("track start refused: {msg}"));
                return Ok(());
            }
            Err((_, msg)) => return Err(format!("step {}: attaching a tracker: {msg}", self.step)),
        }
        self.bk.trackers.push(Watched { tracker, since: self.bk.seq.get(), drained: None });
        Ok(())
    }

    /// Drain the oldest tracker (every change done is reaped, so checked,
    /// before its marks go).
    pub(super) fn track_drain(&mut self) -> Result<(), String> {
        self.reap()?;
        let seq = self.bk.seq.get();
        if let Some(w) = self.bk.trackers.first_mut() {
            let bits = w.tracker.drain();
            let n = bits.count_ones();
            w.drained = Some((bits, seq));
            self.log(|| format!("tracker drained: {n} granules"));
        }
        Ok(())
    }

    /// Detach the oldest tracker (unchecked from now on).
    pub(super) fn track_stop(&mut self) -> Result<(), String> {
        if self.bk.trackers.is_empty() {
            return Ok(());
        }
        let w = self.bk.trackers.remove(0);
        let stack = self.stack();
        let detached = self.block_on("track-stop", async move { stack.remove_tracker(&w.tracker).await })?;
        if !detached {
            return Err(format!("step {}: a tracker attached was not found to detach", self.step));
        }
        Ok(())
    }
}

impl Chain {
    /// An empty restoring world (no faults, no capacity limit).
    fn new(seed: u64) -> Result<Chain, String> {
        let world = Rc::new(World::new(mix(seed ^ 1), mix(seed ^ 2), DirMode::Journal, FaultPlan::none()));
        world.set_trace(false);
        let io = SimIo { w: world };
        io.create_dir_all(Path::new(RESTORE_DIR)).map_err(|e| format!("creating the restore directory: {e}"))?;
        Ok(Chain { io, image: Path::new(RESTORE_DIR).join("backup.img"), rng: Rng::new(mix(seed ^ 3)), streams: 0 })
    }

    /// Receive a stream onto the chain; an incremental apply is sometimes
    /// stopped midway, the restoring world killed (or its power cut), and
    /// the apply finished as the next receive would. True when it was.
    fn receive(&mut self, stream: &[u8], incremental: bool) -> Result<bool, String> {
        let halt = (incremental && self.rng.chance(30)).then(|| (self.rng.below(4), self.rng.chance(50)));
        self.receive_halting(stream, incremental, halt)
    }

    /// `receive`, the apply stopped before cluster `halt.0` and the world
    /// then killed (its power cut too if `halt.1`).
    fn receive_halting(&mut self, stream: &[u8], incremental: bool, halt: Option<(u64, bool)>) -> Result<bool, String> {
        let opts = ReceiveOptions { two_way: false, incremental, direct: Direct::Off };
        let (halt_at, cut) = (halt.map(|h| h.0), halt.is_some_and(|h| h.1));
        let halted = Cell::new(false);
        let hooks = Hooks {
            note: Box::new(|_| {}),
            before_cluster: Box::new(|n| {
                if Some(n) == halt_at {
                    halted.set(true);
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        };
        let input = Box::new(Cursor::new(stream.to_vec()));
        let which = if incremental { "incremental" } else { "full" };
        {
            // Every op of this world completes at once (no task waits on
            // it), so the receive pends only where its hook stopped it.
            let mut fut = pin!(receive_in(&self.io, input, None, &self.image, &opts, Some(1 << 40), hooks));
            let mut cx = Context::from_waker(Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => {
                    r.map_err(|e| format!("the {which} stream (#{}) does not restore: {e}", self.streams + 1))?;
                    self.streams += 1;
                    return Ok(false);
                }
                Poll::Pending if halted.get() => {}
                Poll::Pending => return Err(format!("restoring the {which} stream waits on nothing")),
            }
        }
        // The receive dies where its hook stopped it.
        self.io.w.kill();
        if cut {
            self.io.w.cut();
        }
        // As the next incremental receive begins; whether the apply was
        // finished shows in the restored bytes.
        block_on(finish_interrupted_apply_in(&self.io, &self.image, Direct::Off, &mut Hooks::default()))
            .map_err(|e| format!("finishing an incremental apply stopped by a {}: {e}", if cut { "power cut" } else { "kill" }))?;
        self.streams += 1;
        Ok(true)
    }

    /// The restored disk's bytes.
    fn read(&self) -> Result<Vec<u8>, String> {
        let opts = StackOptions { read_only: true, direct: Direct::Off, offline: false, link_log: None };
        let (stack, _) = block_on(Stack::open_layers(&self.io, &[LayerSpec::ploop(&self.image)], &opts)).map_err(|e| format!("opening the restored image: {e}"))?;
        let mut buf = vec![0u8; stack.size() as usize];
        block_on(stack.read(&self.io, 0, &mut buf)).map_err(|e| format!("reading the restored image: {e}"))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_ploop::copy::NoFs;
    use ublk_ploop::layers::PloopLayer;

    const CLUSTER: u64 = 4096;

    fn stream_of(io: &SimIo, stack: &Stack, cbt: &Arc<Tracker>, incremental: bool) -> Vec<u8> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let opts = SendOptions { incremental, cbt: Some(cbt.clone()), inline: true, ..Default::default() };
        block_on(copy::send(io, stack, Box::new(StreamSink(out.clone())), None, &mut NoFs, opts, &|_, _, _| {})).unwrap();
        let s = std::mem::take(&mut *out.lock().unwrap());
        s
    }

    fn all(io: &SimIo, stack: &Stack) -> Vec<u8> {
        let mut buf = vec![0u8; stack.size() as usize];
        block_on(stack.read(io, 0, &mut buf)).unwrap();
        buf
    }

    /// An incremental apply stopped at every cluster, by a kill or a power
    /// cut of the restoring world, restores the same bytes as one that ran
    /// through; a chain of two incrementals too.
    #[test]
    fn a_chain_restores_whole_whatever_cluster_its_apply_is_stopped_at() {
        let src = SimIo { w: Rc::new(World::new(1, 2, DirMode::Journal, FaultPlan::none())) };
        src.create_dir_all(Path::new("/src")).unwrap();
        let path = Path::new("/src/disk.img");
        block_on(PloopLayer::create(&src, path, 64 * CLUSTER, CLUSTER)).unwrap();
        let opts = StackOptions { read_only: false, direct: Direct::Off, offline: false, link_log: None };
        let (stack, _) = block_on(Stack::open_layers(&src, &[LayerSpec::ploop(path)], &opts)).unwrap();
        let mut rng = Rng::new(7);
        block_on(stack.write(&src, 0, &rng.bytes(20 * CLUSTER as usize))).unwrap();
        let cbt = Arc::new(Tracker::new(stack.size(), CLUSTER));
        block_on(stack.add_tracker(cbt.clone())).unwrap();
        let full = stream_of(&src, &stack, &cbt, false);
        let at_full = all(&src, &stack);
        block_on(stack.write(&src, 3 * CLUSTER, &rng.bytes(5 * CLUSTER as usize))).unwrap();
        block_on(stack.write_zeroes(&src, 10 * CLUSTER, 2 * CLUSTER as usize)).unwrap();
        block_on(stack.write(&src, 40 * CLUSTER + 512, &rng.bytes(1024))).unwrap();
        let first = stream_of(&src, &stack, &cbt, true);
        let at_first = all(&src, &stack);
        block_on(stack.write(&src, 63 * CLUSTER, &rng.bytes(CLUSTER as usize))).unwrap();
        let second = stream_of(&src, &stack, &cbt, true);
        let at_second = all(&src, &stack);
        assert!(at_full != at_first);

        for halt in (0..9).flat_map(|n| [None, Some((n, false)), Some((n, true))]) {
            let mut chain = Chain::new(halt.map_or(0, |h| h.0 * 2 + h.1 as u64)).unwrap();
            assert!(!chain.receive_halting(&full, false, None).unwrap());
            assert!(chain.read().unwrap() == at_full, "the full stream restores as the disk was");
            let stopped = chain.receive_halting(&first, true, halt).unwrap();
            // 8 clusters changed: a stop at 8 or later never comes.
            assert_eq!(stopped, halt.is_some_and(|h| h.0 < 8), "{halt:?}");
            assert!(chain.read().unwrap() == at_first, "stopped at {halt:?}: the first incremental does not restore whole");
            chain.receive_halting(&second, true, halt.map(|h| (0, h.1))).unwrap();
            assert!(chain.read().unwrap() == at_second, "stopped at {halt:?}: the second incremental does not restore whole");
            assert_eq!(chain.streams, 3);
        }
    }
}
