//! The control socket's requests, answered from the live device: status
//! and configuration, snapshots, resize, the write tracker, and the jobs
//! (merge, delete, compact, copy, backup) started through `jobs`.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use libublk::ctrl::UblkCtrl;
use libublk::sys;
use serde_json::Value;

use ublk_ploop::copy;
use ublk_ploop::disk::{ops, Disk, Guid};
use ublk_ploop::io::{block_on, OwnRing, SyncIo};
use ublk_ploop::protocol::{self as proto, DeleteReply, InfoReply, Job, JobKind, JobResult, Request};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Error, Result, Stack};

use crate::control::Handler;
use crate::daemon::config::DeviceConfig;
use crate::daemon::jobs::{JobProgress, Jobs, Outcome};
use crate::mount::{self, MountFreeze};
use crate::ublk_control;
use crate::ublk_target::Device;

/// Answers control-socket requests from the live device.
pub struct DaemonHandler {
    pub device: Arc<Device>,
    pub dev_id: u32,
    pub config: DeviceConfig,
    pub started: Instant,
    /// The disk directory, for snapshot commands; one change at a time.
    pub disk: Mutex<Option<Disk>>,
    /// The running or last background job.
    pub jobs: Jobs,
    /// The write tracker `track start` attached.
    pub tracker: Mutex<Option<Arc<Tracker>>>,
    /// "zero_copy" or "copy": how request data moves (see ublk_target).
    pub data_path: &'static str,
    /// Changed-block tracking since the last backup, when one was taken.
    pub cbt: Arc<Mutex<Option<Arc<Tracker>>>>,
}

impl Handler for DaemonHandler {
    fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value> {
        let stack = &self.device.stack;
        let json = |v: &dyn erased::Ser| Ok(v.to_json());
        match request {
            Request::Status => json(&self.status()),
            Request::Info => json(&InfoReply {
                device: format!("/dev/ublkb{}", self.dev_id),
                id: self.dev_id,
                config: serde_json::to_value(&self.config).unwrap(),
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::Flush => {
                block_on(stack.flush(&SyncIo))?;
                Ok(Value::Object(Default::default()))
            }
            Request::Job => {
                json(&self.jobs.fetch())
            }
            Request::SnapshotList => {
                let disk = self.disk_now()?;
                json(&disk.snapshot_rows())
            }
            Request::Resize { size } => json(&self.resize(size)?),
            Request::Compact { step, speed } => {
                let step = step.unwrap_or(COMPACT_STEP).max(1);
                let cluster = stack.cluster_size();
                if stack.is_read_only() {
                    return Err(Error::new(libc::EROFS, format!("/dev/ublkb{} is read-only (a snapshot device)", self.dev_id)));
                }
                let guard = self.idle()?;
                json(&self.jobs.start(
                    Job::new(JobKind::Compact, None),
                    guard,
                    self.device.clone(),
                    Box::new(move |ring, stack, progress| {
                        // Paced between steps, with no request held.
                        let pace = crate::pace::Pace::new(speed);
                        let c = ring.block_on(stack.compact(&ring.io(), step, &|d, t| {
                            progress(None, d, t);
                            pace.wait(&ring.io(), d * cluster, d >= t);
                        }))?;
                        Ok(JobResult::Compacted(c).into())
                    }),
                )?)
            }
            Request::Snapshot { uuid } => {
                let mut guard = self.change()?;
                let disk = guard.as_mut().expect("checked by change()");
                json(&block_on(ops::snapshot(&SyncIo, stack, disk, uuid))?)
            }
            Request::SnapshotSwitch { uuid, force } => {
                if !force {
                    if let Some(why) = mount::in_use(self.dev_id) {
                        return Err(Error::new(
                            libc::EBUSY,
                            format!("/dev/ublkb{} is in use ({why}): switching would change the data under it; unmount it first (or use --force)", self.dev_id),
                        ));
                    }
                }
                let mut guard = self.change()?;
                let disk = guard.as_mut().expect("checked by change()");
                json(&block_on(ops::switch(&SyncIo, stack, disk, uuid))?)
            }
            Request::SnapshotMerge { uuid } => json(&self.start_disk_job(JobKind::Merge, uuid, move |io, stack, disk, progress| {
                let m = ring_merge(io, stack, disk, uuid, &|d, t| progress(None, d, t))?;
                Ok(JobResult::Merged(m).into())
            })?),
            Request::SnapshotDelete { uuid } => {
                // Deleting a delta with one child is a merge: a job; the
                // rest is done at once.
                let children = self.disk_now()?.desc.children(uuid).len();
                if children == 1 {
                    let job = self.start_disk_job(JobKind::Delete, Some(uuid), move |io, stack, disk, progress| {
                        let d = io.block_on(ops::delete(&io.io(), stack, disk, uuid, &|d, t| progress(None, d, t)))?;
                        Ok(JobResult::Deleted(d).into())
                    })?;
                    json(&DeleteReply::Started(job))
                } else {
                    let mut guard = self.change()?;
                    let disk = guard.as_mut().expect("checked by change()");
                    json(&DeleteReply::Done(block_on(ops::delete(&SyncIo, stack, disk, uuid, &|_, _| {}))?))
                }
            }
            Request::TrackStart => {
                let mut slot = self.tracker.lock().unwrap();
                if slot.is_some() {
                    return Err(Error::new(libc::EBUSY, "the write tracker is running already (`track get`, `track stop`)"));
                }
                let t = Arc::new(Tracker::new(stack.size(), stack.cluster_size()));
                block_on(stack.add_tracker(t.clone()))?;
                *slot = Some(t.clone());
                json(&track_reply(&t, &BitVec::new()))
            }
            Request::TrackGet => {
                let slot = self.tracker.lock().unwrap();
                let t = slot.as_ref().ok_or_else(tracker_off)?;
                json(&track_reply(t, &t.drain()))
            }
            Request::TrackStop => {
                let t = self.tracker.lock().unwrap().take().ok_or_else(tracker_off)?;
                block_on(stack.remove_tracker(&t));
                json(&track_reply(&t, &t.drain()))
            }
            Request::Copy { two_way, stop, force, freeze_limit, timeout, allow_unfrozen } => {
                let channel = one_channel(fds)?;
                if stop && !force {
                    if let Some(why) = mount::in_use(self.dev_id) {
                        return Err(Error::new(
                            libc::EBUSY,
                            format!("/dev/ublkb{} is in use ({why}): --stop would take the device from under it; unmount it first (or use --force)", self.dev_id),
                        ));
                    }
                }
                let end = if stop { copy::End::Stop } else { copy::End::Resume };
                let opts = limited(copy::SendOptions { two_way, end, ..Default::default() }, freeze_limit, timeout)?;
                json(&self.start_copy(JobKind::Copy, channel, opts, allow_unfrozen, None, None)?)
            }
            Request::Backup { two_way, incremental, freeze_limit, timeout, allow_unfrozen } => {
                let channel = one_channel(fds)?;
                let mut opts = limited(copy::SendOptions { two_way, ..Default::default() }, freeze_limit, timeout)?;
                // The copy reads the record itself, once its own tracker is
                // attached: a peek here would miss a write completing before
                // the attach, in this backup and (the frozen point clears
                // the record) in every later. Without a record an
                // incremental is refused; a new record (from here on,
                // changes are tracked for the next backup) is published
                // only once this full backup succeeded.
                let cbt = self.cbt.lock().unwrap();
                let record = block_on(copy::BackupRecord::start(stack, cbt.as_ref(), incremental))?;
                drop(cbt);
                opts.incremental = incremental;
                opts.cbt = Some(record.tracker());
                return self
                    .start_copy(if incremental { JobKind::BackupIncremental } else { JobKind::Backup }, channel, opts, allow_unfrozen, None, Some(record))
                    .and_then(|job| json(&job));
            }
        }
    }
}

fn tracker_off() -> Error {
    Error::new(libc::ENOENT, "the write tracker is not running (`track start`)")
}

fn track_reply(t: &Tracker, bits: &BitVec) -> proto::TrackReply {
    let ranges = t.ranges(bits);
    proto::TrackReply {
        disk_size: t.disk_size(),
        granularity: t.granularity(),
        clusters: bits.count_ones() as u64,
        bytes: ranges.iter().map(|r| r.end - r.start).sum(),
        ranges: ranges.into_iter().map(|r| [r.start, r.end]).collect(),
    }
}

/// A copy's bounds from the request (seconds), the defaults otherwise.
fn limited(mut opts: copy::SendOptions, freeze_limit: Option<f64>, timeout: Option<f64>) -> Result<copy::SendOptions> {
    let secs = |v: f64, what: &str| {
        if v.is_finite() && v > 0.0 && v <= 86400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(Error::invalid(format!("{what} must be between 0 and 86400 seconds, not {v}")))
        }
    };
    if let Some(v) = freeze_limit {
        opts.freeze_limit = secs(v, "the freeze limit")?;
    }
    if let Some(v) = timeout {
        opts.timeout = secs(v, "the channel timeout")?;
    }
    // The memory the last pass may take to end the freeze before it is
    // sent (bytes; beyond it the pass is sent while frozen).
    if let Some(v) = std::env::var("UBLK_PLOOP_COPY_MEMORY").ok().and_then(|v| v.trim().parse().ok()) {
        opts.capture_max = v;
    }
    Ok(opts)
}

/// The one descriptor a copy writes to.
fn one_channel(mut fds: Vec<OwnedFd>) -> Result<OwnedFd> {
    match fds.len() {
        1 => Ok(fds.remove(0)),
        0 => Err(Error::invalid("a copy needs the channel to write to, passed with the request (the CLI does this)")),
        n => Err(Error::invalid(format!("a copy takes one channel; {n} descriptors came"))),
    }
}

/// Run a merge on a ring of its own: its copies go on in parallel.
fn ring_merge(ring: &OwnRing, stack: &Stack, disk: &mut Disk, uuid: Option<Guid>, progress: &dyn Fn(u64, u64)) -> Result<ops::Merged> {
    ring.block_on(ops::merge(&ring.io(), stack, disk, uuid, progress))
}

/// Serialising results without naming each type at the call site.
mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("replies serialise")
        }
    }
}

/// Clusters moved per step of an online compaction (requests are held for
/// one step: 16 MiB of copying with 1 MiB clusters).
const COMPACT_STEP: u64 = 16;

impl DaemonHandler {
    fn status(&self) -> proto::Status {
        let stack = &self.device.stack;
        let layers = stack.layers();
        let top = layers.len() - 1;
        let c = &self.device.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        proto::Status {
            device: format!("/dev/ublkb{}", self.dev_id),
            id: self.dev_id,
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            size: stack.size(),
            cluster_size: stack.cluster_size(),
            block_size: stack.block_size(),
            read_only: stack.is_read_only(),
            disk: self.config.disk.clone(),
            snapshot: self.config.snapshot,
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, l)| proto::LayerStatus {
                    path: l.file().path.clone(),
                    format: l.format(),
                    writable: i == top && !stack.is_read_only(),
                    direct_io: l.file().direct,
                    caches: l.qcow2_caches(),
                })
                .collect(),
            counters: proto::Counters {
                reads: load(&c.reads),
                writes: load(&c.writes),
                read_bytes: load(&c.read_bytes),
                write_bytes: load(&c.write_bytes),
                flushes: load(&c.flushes),
                discards: load(&c.discards),
                write_zeroes: load(&c.write_zeroes),
                errors: load(&c.errors),
            },
            copy_ups: stack.copy_ups(),
            in_flight: stack.in_flight(),
            data_path: self.data_path.to_string(),
            io_scheduler: ublk_control::io_scheduler(self.dev_id),
            job: self.jobs.peek(),
        }
    }

    /// The descriptor as it is now (for listing).
    /// Grow the disk online: only where the kernel can change a live
    /// device's size (UPDATE_SIZE, Linux 6.16 on); otherwise say how to do
    /// it offline.
    fn resize(&self, size: u64) -> Result<ublk_ploop::layers::ploop::resize::Resized> {
        if self.device.stack.is_read_only() {
            return Err(Error::new(libc::EROFS, format!("/dev/ublkb{} is read-only (a snapshot device)", self.dev_id)));
        }
        let features = UblkCtrl::get_features().unwrap_or(0);
        if features & sys::UBLK_F_UPDATE_SIZE as u64 == 0 {
            let what = self.config.disk.as_ref().map_or("IMAGE".to_string(), |d| d.display().to_string());
            return Err(Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "this kernel's ublk driver cannot change the size of a live device (UPDATE_SIZE needs Linux 6.16 or newer): \
                     the device must be restarted: `ublk-ploop del -n {id}`, `ublk-ploop resize {what} --size {size}`, then add it again",
                    id = self.dev_id
                ),
            ));
        }
        // In whole clusters, as the offline resize and ploop round it.
        let size = ublk_ploop::layers::ploop::header::whole_clusters(size, self.device.stack.cluster_size())?;
        let mut guard = self.idle()?;
        let done = block_on(self.device.stack.grow_top(&SyncIo, size))?;
        // The grow ended the record of changes (the next backup is a full one).
        {
            let mut cbt = self.cbt.lock().unwrap();
            if cbt.is_some() {
                *cbt = self.device.stack.kept_record();
            }
        }
        if let Some(disk) = guard.as_mut() {
            // Only the top grew (lower deltas are frozen and may be served
            // elsewhere); the descriptor says the disk's size.
            // Under the device's lock (the disk carries it): re-read, as
            // another tool may have changed the descriptor since.
            let _lock = disk.lock()?;
            let mut next = disk.clone();
            next.reload()?;
            next.desc.set_size(size)?;
            block_on(next.store(&SyncIo))?;
            *disk = next;
        }
        let rc = UblkCtrl::new_simple(self.dev_id as i32).and_then(|c| c.update_size(size));
        match rc {
            Ok(rc) if rc >= 0 => Ok(done),
            Ok(rc) => Err(Error::new(-rc, format!("the disk grew to {size} bytes but the kernel refused the new device size ({rc}): restart the device"))),
            Err(e) => Err(ublk_control::ublk_err(e, "the disk grew but telling the kernel failed; restart the device")),
        }
    }

    fn disk_now(&self) -> Result<Disk> {
        match &self.config.disk {
            Some(dir) => Disk::load(dir),
            None => Err(self.not_a_disk()),
        }
    }

    fn not_a_disk(&self) -> Error {
        Error::unsupported(format!(
            "/dev/ublkb{} serves image files, not a disk directory: snapshots need a DiskDescriptor.xml (`ublk-ploop init`, then `add --image DIR`)",
            self.dev_id
        ))
    }

    /// The disk, for a change: refused for a read-only (snapshot) device and
    /// while a job runs.
    fn change(&self) -> Result<std::sync::MutexGuard<'_, Option<Disk>>> {
        if self.device.stack.is_read_only() {
            return Err(Error::new(libc::EROFS, format!("/dev/ublkb{} is read-only (a snapshot device)", self.dev_id)));
        }
        let guard = self.idle()?;
        if guard.is_none() {
            return Err(self.not_a_disk());
        }
        Ok(guard)
    }

    /// Start a job that changes the disk directory (a merge).
    fn start_disk_job(
        &self,
        kind: JobKind,
        uuid: Option<Guid>,
        work: impl FnOnce(&OwnRing, &Stack, &mut Disk, JobProgress<'_>) -> Result<Outcome> + Send + 'static,
    ) -> Result<Job> {
        let guard = self.change()?;
        // The operation re-reads the descriptor under the disk lock.
        let mut disk = guard.clone().expect("checked by change()");
        self.jobs.start(Job::new(kind, uuid), guard, self.device.clone(), Box::new(move |ring, stack, progress| work(ring, stack, &mut disk, progress)))
    }

    /// Start a copy or backup into `channel`; a backup's record is
    /// published or dropped once the copy ends (or could not start).
    fn start_copy(
        &self,
        kind: JobKind,
        channel: OwnedFd,
        opts: copy::SendOptions,
        allow_unfrozen: bool,
        note: Option<String>,
        record: Option<copy::BackupRecord>,
    ) -> Result<Job> {
        let record = Arc::new(Mutex::new(record));
        let started = self.start_copy_job(kind, channel, opts, allow_unfrozen, note, record.clone());
        if started.is_err() {
            // The job never ran: a new record goes.
            if let Some(r) = record.lock().unwrap().take() {
                block_on(r.finish(&self.device.stack, false, &self.cbt, [0; 16]));
            }
        }
        started
    }

    fn start_copy_job(
        &self,
        kind: JobKind,
        channel: OwnedFd,
        opts: copy::SendOptions,
        allow_unfrozen: bool,
        note: Option<String>,
        record: Arc<Mutex<Option<copy::BackupRecord>>>,
    ) -> Result<Job> {
        let guard = self.idle()?;
        // Every read and write of the channel is bounded: a receiver that
        // stops must not hold the copy (and a frozen filesystem) forever.
        let out = copy::Timed::new(channel, opts.timeout).map_err(|e| Error::io(e, "the copy channel"))?;
        let replies: Option<Box<dyn Read + Send>> = match opts.two_way {
            true => Some(Box::new(out.clone())),
            false => None,
        };
        let (dev_id, stop) = (self.dev_id, opts.end == copy::End::Stop);
        let mut job = Job::new(kind, None);
        job.note = note;
        let cbt = self.cbt.clone();
        self.jobs.start(
            job,
            guard,
            self.device.clone(),
            Box::new(move |ring, stack, progress| {
                let record = record.lock().unwrap().take();
                let mut fs = MountFreeze::new(dev_id, allow_unfrozen);
                let report = |round: u32, done: u64, total: u64| progress(Some(round), done, total);
                let sent = ring.block_on(copy::send(&ring.io(), stack, Box::new(out), replies, &mut fs, opts, &report));
                if let Some(r) = record {
                    // Kept in the image across clean stops, as ploop's CBT.
                    ring.block_on(r.finish(stack, sent.is_ok(), &cbt, *uuid::Uuid::new_v4().as_bytes()));
                }
                let sent = sent?;
                let mut notes: Vec<String> = fs.froze.iter().map(|on| format!("frozen for the last pass: {on}")).collect();
                notes.extend(fs.unfrozen.take());
                let note = (!notes.is_empty()).then(|| notes.join("; "));
                // The stack is closed: the device goes down once the result
                // was fetched (or after a while).
                Ok(Outcome { result: JobResult::Copy(sent), note, stop: stop.then_some(dev_id) })
            }),
        )
    }

    /// No job runs (one at a time): the guard holds off snapshot commands
    /// until the job is registered.
    fn idle(&self) -> Result<std::sync::MutexGuard<'_, Option<Disk>>> {
        if self.jobs.running() {
            return Err(Error::new(libc::EBUSY, "a job is running on this device; wait for it (`ublk-ploop status`)"));
        }
        self.disk.try_lock().map_err(|_| Error::new(libc::EBUSY, "a snapshot command is running on this device"))
    }
}
