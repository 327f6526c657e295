//! The device daemon: opens the stack, creates (or recovers) the ublk
//! device, serves its control socket, and closes the images cleanly when
//! the device is stopped.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::sys;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use bitvec::vec::BitVec;
use ublk_ploop::copy;
use ublk_ploop::disk::{ops, Disk, Guid};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::io::{block_on, Direct, OwnRing, SyncIo};
use ublk_ploop::{Error, LayerSpec, Result, Stack, StackOptions};

use crate::control::{self, Access, Handler};
use crate::mount::{self, MountFreeze};
use ublk_ploop::protocol::{self as proto, DeleteReply, Job, JobState, Request};
use crate::ublk_control::{self, io_scheduler, set_io_scheduler, stop_device, ublk_err};
use crate::ublk_target::{self, Counters, Device};

// What the CLI calls here; device control is `ublk_control`'s.
pub use crate::ublk_control::{delete, parse_io_scheduler, require_ublk, stored_config, wait_quiesced, Mode, DEFAULT_IO_SCHEDULER, TARGET_NAME};

/// Everything needed to (re)create a device; stored with the device so
/// that `recover` can rebuild it after the daemon died.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Layer images, bottom first, absolute paths. For a disk directory,
    /// the chain when the device started (the descriptor rules).
    #[serde(deserialize_with = "layer_specs")]
    pub images: Vec<LayerSpec>,
    /// The disk directory served, whose descriptor names the layers: a
    /// restarted daemon follows it (snapshots taken meanwhile included).
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The snapshot a read-only snapshot device serves.
    #[serde(default)]
    pub snapshot: Option<Guid>,
    pub queues: u16,
    pub depth: u16,
    pub read_only: bool,
    #[serde(with = "direct_serde")]
    pub direct: Direct,
    /// Group allowed on the control socket (numeric gid).
    pub socket_gid: Option<u32>,
    /// Move request data through the daemon's memory even where the
    /// kernel offers zero copy (to compare the two).
    #[serde(default)]
    pub copy_mode: bool,
    /// Block-layer I/O scheduler set on the device once it is live.
    #[serde(default = "crate::ublk_control::default_io_scheduler")]
    pub io_scheduler: String,
}

impl DeviceConfig {
    /// The layers to open now: the descriptor's chain for a disk directory
    /// (served read-write only if its top is the disk's own file).
    pub fn layers(&self) -> Result<Vec<LayerSpec>> {
        match &self.disk {
            Some(dir) if !self.read_only && self.snapshot.is_none() => block_on(Disk::load(dir)?.writable_layers(&SyncIo)),
            Some(dir) => Disk::load(dir)?.layers(self.snapshot),
            None => Ok(self.images.clone()),
        }
    }
}

/// Layer lists as stored by earlier versions (plain paths) or now.
fn layer_specs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<LayerSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Path(PathBuf),
        Spec(LayerSpec),
    }
    let v: Vec<Stored> = Deserialize::deserialize(d)?;
    Ok(v.into_iter()
        .map(|s| match s {
            Stored::Path(p) => LayerSpec::ploop(p),
            Stored::Spec(s) => s,
        })
        .collect())
}

mod direct_serde {
    use super::Direct;
    pub fn serialize<S: serde::Serializer>(d: &Direct, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match d {
            Direct::Auto => "auto",
            Direct::On => "on",
            Direct::Off => "off",
        })
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Direct, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the daemon reports "live" (or a failure) to whoever started it.
pub enum Ready {
    /// Print the device path on stdout; tell systemd when NOTIFY_SOCKET is set.
    Foreground,
    /// Write "ok ID" or "err MESSAGE" down this pipe to the waiting parent.
    Pipe(OwnedFd),
}


/// Start a device daemon. Unless `foreground`, fork: the parent returns
/// once the device is live (printing its path) or failed.
pub fn start(config: DeviceConfig, mode: Mode, foreground: bool) -> Result<i32> {
    require_ublk()?;
    // A copy's reader may go away: the daemon gets EPIPE, never the signal.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Open the images before forking so that bad input fails right here.
    let opts = StackOptions { read_only: config.read_only, direct: config.direct };
    let layers = config.layers()?;
    let (stack, reports) = block_on(Stack::open_layers(&SyncIo, &layers, &opts))?;
    if let (Some(dir), false) = (&config.disk, config.read_only) {
        // A merge a crash interrupted is finished before serving.
        let mut disk = Disk::load(dir)?;
        let merged = block_on(ops::finish_merges(&SyncIo, &stack, &mut disk))?;
        for m in merged {
            tracing::warn!("finished merging {} into {} (interrupted before)", m.child, m.parent);
        }
    }
    for (spec, r) in layers.iter().zip(&reports) {
        if r.was_in_use {
            tracing::warn!(image = %spec.path.display(), trimmed = r.trimmed_leak, "image was not closed cleanly; checked, no damage");
        }
    }
    if foreground {
        return run(stack, config, mode, Ready::Foreground);
    }
    let (read_end, write_end) = pipe()?;
    // SAFETY: single-threaded so far (no ring, no thread created yet).
    match unsafe { libc::fork() } {
        -1 => Err(Error::io(std::io::Error::last_os_error(), "fork")),
        0 => {
            drop(read_end);
            detach();
            let code = match run(stack, config, mode, Ready::Pipe(write_end)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(write_end);
            drop(stack);
            let mut answer = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
            match answer.trim().split_once(' ') {
                Some(("ok", id)) => {
                    println!("/dev/ublkb{id}");
                    Ok(0)
                }
                Some(("err", msg)) => Err(Error::new(libc::EIO, msg.to_string())),
                _ => Err(Error::new(libc::EIO, "the daemon exited before the device came up (see its log)")),
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(std::io::Error::last_os_error(), "pipe"));
    }
    // SAFETY: fresh descriptors from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Leave the caller's session and terminal; logs go to stderr, which is
/// kept only when it is not a terminal (a file or journal), else dropped.
fn detach() {
    use std::io::IsTerminal;
    // SAFETY: plain syscalls in the child after fork.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if std::io::stderr().is_terminal() {
                libc::dup2(null, 2);
            }
            libc::close(null);
        }
    }
}

fn report(ready: &mut Option<Ready>, outcome: std::result::Result<u32, String>) {
    match ready.take() {
        Some(Ready::Pipe(fd)) => {
            let msg = match outcome {
                Ok(id) => format!("ok {id}\n"),
                Err(e) => format!("err {e}\n"),
            };
            let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
        }
        Some(Ready::Foreground) => {
            if let Ok(id) = outcome {
                println!("/dev/ublkb{id}");
                let _ = std::io::stdout().flush();
                sd_notify(&format!("READY=1\nSTATUS=serving /dev/ublkb{id}\nMAINPID={}", std::process::id()));
            }
        }
        None => {}
    }
}

/// Tell systemd (Type=notify) about our state; a no-op outside systemd.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy().into_owned();
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let result = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Answers control-socket requests from the live device.
struct DaemonHandler {
    device: Arc<Device>,
    dev_id: u32,
    config: DeviceConfig,
    started: Instant,
    /// The disk directory, for snapshot commands; one change at a time.
    disk: Mutex<Option<Disk>>,
    /// The running or last background job.
    job: Arc<Mutex<Option<Job>>>,
    /// The finished job's result was fetched (a device stopping after its
    /// last copy waits for that).
    job_seen: Arc<std::sync::atomic::AtomicBool>,
    /// The write tracker `track start` attached.
    tracker: Mutex<Option<Arc<Tracker>>>,
    /// "zero_copy" or "copy": how request data moves (see ublk_target).
    data_path: &'static str,
    /// Changed-block tracking since the last backup, when one was taken.
    cbt: Arc<Mutex<Option<Arc<Tracker>>>>,
}

impl Handler for DaemonHandler {
    fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> Result<Value> {
        let stack = &self.device.stack;
        let json = |v: &dyn erased::Ser| Ok(v.to_json());
        match request {
            Request::Status => json(&self.status()),
            Request::Info => Ok(serde_json::json!({
                "device": format!("/dev/ublkb{}", self.dev_id),
                "id": self.dev_id,
                "config": serde_json::to_value(&self.config).unwrap(),
                "version": env!("CARGO_PKG_VERSION"),
            })),
            Request::Flush => {
                block_on(stack.flush(&SyncIo))?;
                Ok(Value::Object(Default::default()))
            }
            Request::Job => {
                let job = self.job.lock().unwrap().clone();
                if job.as_ref().is_some_and(|j| j.state != JobState::Running) {
                    self.job_seen.store(true, Ordering::Relaxed);
                }
                json(&job)
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
                json(&self.start_job(
                    Job::new("compact", None),
                    guard,
                    Box::new(move |ring, stack, progress| {
                        // Paced between steps, with no request held.
                        let pace = crate::pace::Pace::new(speed);
                        let c = ring.block_on(stack.compact(&ring.io(), step, &|d, t| {
                            progress(None, d, t);
                            pace.wait(d * cluster);
                        }))?;
                        Ok(Outcome { compacted: Some(c), ..Default::default() })
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
            Request::SnapshotMerge { uuid } => json(&self.start_disk_job("merge", uuid, move |io, stack, disk, progress| {
                let m = ring_merge(io, stack, disk, uuid, &|d, t| progress(None, d, t))?;
                Ok(Outcome { merged: Some(m), ..Default::default() })
            })?),
            Request::SnapshotDelete { uuid } => {
                // Deleting a delta with one child is a merge: a job; the
                // rest is done at once.
                let children = self.disk_now()?.desc.children(uuid).len();
                if children == 1 {
                    let job = self.start_disk_job("delete", Some(uuid), move |io, stack, disk, progress| {
                        let d = io.block_on(ops::delete(&io.io(), stack, disk, uuid, &|d, t| progress(None, d, t)))?;
                        Ok(Outcome { deleted: Some(d), ..Default::default() })
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
                json(&self.start_copy("copy", channel, opts, allow_unfrozen, None, None)?)
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
                    .start_copy(if incremental { "backup-incremental" } else { "backup" }, channel, opts, allow_unfrozen, None, Some(record))
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

/// What a job reports: (copy round, done, total).
type JobProgress<'a> = &'a dyn Fn(Option<u32>, u64, u64);

/// What a finished job did.
#[derive(Default)]
struct Outcome {
    merged: Option<ops::Merged>,
    deleted: Option<ops::Deleted>,
    copy: Option<copy::Sent>,
    compacted: Option<ublk_ploop::layers::ploop::compact::Compacted>,
    note: Option<String>,
    /// Stop this device after the job's result was fetched.
    stop: Option<u32>,
}

/// Clusters moved per step of an online compaction (requests are held for
/// one step: 16 MiB of copying with 1 MiB clusters).
const COMPACT_STEP: u64 = 16;

type JobFn = dyn FnOnce(&OwnRing, &Stack, JobProgress<'_>) -> Result<Outcome> + Send;

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
            io_scheduler: io_scheduler(self.dev_id),
            job: self.job.lock().unwrap().clone(),
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
        let mut guard = self.idle()?;
        let done = block_on(self.device.stack.grow_top(&SyncIo, size))?;
        if let Some(disk) = guard.as_mut() {
            // Only the top grew (lower deltas are frozen and may be served
            // elsewhere); the descriptor says the disk's size.
            let _lock = disk.lock()?;
            let mut next = Disk::load(&disk.dir)?;
            next.desc.set_size(size)?;
            block_on(next.store(&SyncIo))?;
            *disk = next;
        }
        let rc = UblkCtrl::new_simple(self.dev_id as i32).and_then(|c| c.update_size(size));
        match rc {
            Ok(rc) if rc >= 0 => Ok(done),
            Ok(rc) => Err(Error::new(-rc, format!("the disk grew to {size} bytes but the kernel refused the new device size ({rc}): restart the device"))),
            Err(e) => Err(ublk_err(e, "the disk grew but telling the kernel failed; restart the device")),
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
        kind: &str,
        uuid: Option<Guid>,
        work: impl FnOnce(&OwnRing, &Stack, &mut Disk, JobProgress<'_>) -> Result<Outcome> + Send + 'static,
    ) -> Result<Job> {
        let guard = self.change()?;
        // The operation re-reads the descriptor under the disk lock.
        let mut disk = guard.clone().expect("checked by change()");
        self.start_job(Job::new(kind, uuid), guard, Box::new(move |ring, stack, progress| work(ring, stack, &mut disk, progress)))
    }

    /// Start a copy or backup into `channel`; a backup's record is
    /// published or dropped once the copy ends (or could not start).
    fn start_copy(
        &self,
        kind: &str,
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
        kind: &str,
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
        self.start_job(
            job,
            guard,
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
                Ok(Outcome { copy: Some(sent), note, stop: stop.then_some(dev_id), ..Default::default() })
            }),
        )
    }

    /// No job runs (one at a time): the guard holds off snapshot commands
    /// until the job is registered.
    fn idle(&self) -> Result<std::sync::MutexGuard<'_, Option<Disk>>> {
        if self.job.lock().unwrap().as_ref().is_some_and(|j| j.state == JobState::Running) {
            return Err(Error::new(libc::EBUSY, "a job is running on this device; wait for it (`ublk-ploop status`)"));
        }
        self.disk.try_lock().map_err(|_| Error::new(libc::EBUSY, "a snapshot command is running on this device"))
    }

    /// Run a job on a thread of its own (with its own ring); returns its
    /// first status.
    fn start_job(&self, job: Job, guard: std::sync::MutexGuard<'_, Option<Disk>>, work: Box<JobFn>) -> Result<Job> {
        *self.job.lock().unwrap() = Some(job.clone());
        drop(guard);
        let (device, slot) = (self.device.clone(), self.job.clone());
        let seen = self.job_seen.clone();
        seen.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let kind = job.kind.clone();
        let spawned = std::thread::Builder::new().name(format!("job-{kind}")).spawn(move || {
            let progress = |round: Option<u32>, done: u64, total: u64| {
                if let Some(j) = slot.lock().unwrap().as_mut() {
                    j.round = round;
                    j.done = done;
                    j.total = total;
                    j.secs = started.elapsed().as_secs_f64();
                }
            };
            let outcome = match OwnRing::new(64) {
                Ok(ring) => work(&ring, &device.stack, &progress),
                Err(e) => Err(Error::io(e, "setting up io_uring")),
            };
            let mut stop = None;
            let mut j = slot.lock().unwrap();
            if let Some(j) = j.as_mut() {
                j.secs = started.elapsed().as_secs_f64();
                match outcome {
                    Ok(o) => {
                        stop = o.stop;
                        j.state = JobState::Done;
                        j.merged = o.merged;
                        j.deleted = o.deleted;
                        j.copy = o.copy;
                        j.compacted = o.compacted;
                        if let Some(n) = o.note {
                            j.note = Some(j.note.take().map_or(n.clone(), |old| format!("{old}; {n}")));
                        }
                    }
                    Err(e) => {
                        tracing::error!("{} failed: {e}", j.kind);
                        j.state = JobState::Failed;
                        j.error = Some(e.message().to_string());
                        j.errno = Some(e.errno());
                    }
                }
            }
            drop(j);
            if let Some(dev_id) = stop {
                let until = Instant::now() + Duration::from_secs(10);
                while !seen.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop_device(dev_id);
            }
        });
        if let Err(e) = spawned {
            *self.job.lock().unwrap() = None;
            return Err(Error::io(e, "starting the job"));
        }
        Ok(job)
    }
}

/// Block the stop signals in every thread; one thread waits for them and
/// stops the device, which ends `run_target` in the main thread.
fn install_stop_signals(dev_id: u32) {
    // SAFETY: sigset manipulation on a local set, then a process-wide mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig = 0;
        // SAFETY: waits on the set blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, "stopping device {dev_id}");
        sd_notify("STOPPING=1");
        // A control handle of this thread's own (libublk's rings are per
        // thread). Keep listening: a stop sent before the device was live
        // does nothing, and a later signal must still be heard.
        stop_device(dev_id);
    });
}

fn run(stack: Stack, config: DeviceConfig, mode: Mode, ready: Ready) -> Result<i32> {
    let mut ready = Some(ready);
    let device = Arc::new(Device { stack, counters: Counters::default() });
    let result = run_inner(&device, config, mode, &mut ready);
    if let Err(e) = &result {
        report(&mut ready, Err(e.to_string()));
    }
    // Whatever happened, the images are left consistent and marked clean.
    let closed = block_on(device.stack.close(&SyncIo));
    let code = result?;
    closed?;
    Ok(code)
}

fn run_inner(device: &Arc<Device>, config: DeviceConfig, mode: Mode, ready: &mut Option<Ready>) -> Result<i32> {
    let ctrl = ublk_control::open_device(&mode, config.queues, config.depth, config.copy_mode)?;
    let dev_id = ctrl.dev_info().dev_id;
    // A recovered device keeps the data path it was created with.
    let data_path = ublk_target::data_path(ctrl.dev_info().flags);
    tracing::info!(data_path, "ublk device {dev_id}");
    install_stop_signals(dev_id);
    let disk = match &config.disk {
        Some(dir) if !config.read_only => Some(Disk::load(dir)?),
        _ => None,
    };
    // Changed-block tracking a clean stop kept: tracking goes on.
    let mut cbt = None;
    if !config.read_only {
        if let Some(bm) = block_on(device.stack.take_saved_bitmaps()).into_iter().next() {
            let t = Arc::new(Tracker::from_bits(device.stack.size(), bm.granularity, &bm.bits));
            block_on(device.stack.add_tracker(t.clone()))?;
            device.stack.keep_on_close(Some((t.clone(), bm.id)));
            tracing::info!(changed = t.dirty_count(), "changed-block record since the last backup loaded");
            cbt = Some(t);
        }
    }
    let handler = Arc::new(DaemonHandler {
        device: device.clone(),
        dev_id,
        config: config.clone(),
        started: Instant::now(),
        disk: Mutex::new(disk),
        job: Arc::new(Mutex::new(None)),
        job_seen: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        tracker: Mutex::new(None),
        cbt: Arc::new(Mutex::new(cbt)),
        data_path,
    });
    let server = control::Server::start(&control::socket_path(dev_id), Access { group: config.socket_gid }, handler)?;

    let read_only = config.read_only;
    let target_json = serde_json::to_value(&config).expect("config serialises");
    let dev_for_init = device.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        ublk_target::init_target(dev, &dev_for_init.stack, read_only)?;
        dev.set_target_json(target_json);
        Ok(())
    };
    let dev_for_queues = device.clone();
    let queue_fn = move |qid: u16, dev: &UblkDev| ublk_target::run_queue(qid, dev, dev_for_queues.clone());
    // Shared with the live callback; if the device never goes live, it is
    // still here to carry the error back to whoever started us.
    let shared_ready = Arc::new(std::sync::Mutex::new(ready.take()));
    let ready_for_live = shared_ready.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let scheduler = config.io_scheduler.clone();
    let on_live = move |c: &UblkCtrl| {
        tracing::info!(device = %c.get_bdev_path(), "device is live");
        set_io_scheduler(c.dev_info().dev_id, &scheduler);
        report(&mut ready_for_live.lock().unwrap(), Ok(c.dev_info().dev_id));
        let _ = tx.send(());
    };
    let served = ctrl.run_target(tgt_init, queue_fn, on_live);
    let went_live = rx.try_recv().is_ok();
    *ready = shared_ready.lock().unwrap().take();

    drop(server);
    if matches!(mode, Mode::Recover { .. }) && served.is_ok() && went_live {
        // A recovered control does not delete the device when dropped. A
        // failed recovery leaves the device quiesced for another attempt.
        let _ = ctrl.del_dev();
    }
    served.map_err(|e| ublk_err(e, if went_live { "serving the device" } else { "starting the device" }))?;
    tracing::info!("device {dev_id} stopped");
    Ok(0)
}

