//! The control socket's messages, shared by the daemon (which answers them)
//! and the command line (which sends them): one type per request and per
//! result, so both ends agree by construction.
//!
//! On the wire, one JSON object per line:
//! `{"version": 1, "cmd": "snapshot", "args": {"uuid": "{...}"}}` →
//! `{"version": 1, "ok": true, "result": {...}}` or
//! `{"version": 1, "ok": false, "error": "...", "errno": 16}`.
//!
//! Messages and their parser only: the socket is the daemon's, so that the
//! fuzzer and the tests run the very parser the daemon answers with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::copy::Sent;
use crate::disk::ops::{Deleted, Merged, Snapshotted, Switched};
use crate::disk::{Guid, SnapshotRow};
use crate::layers::Format;
use crate::{Error, Result};

pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", content = "args", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The device, its layers, counters and the running job.
    Status,
    /// How the device was configured.
    Info,
    /// Make every completed write durable.
    Flush,
    /// Take a snapshot (a disk directory's device).
    Snapshot {
        #[serde(default)]
        uuid: Option<Guid>,
    },
    SnapshotList,
    /// Grow the disk online (the top image, the descriptor, the device).
    Resize { size: u64 },
    /// Give the top image's free space back (a job), moving at most `step`
    /// clusters per step (requests are held for one step).
    Compact {
        #[serde(default)]
        step: Option<u64>,
        /// Average bytes per second the moves may take (None: no limit).
        #[serde(default)]
        speed: Option<u64>,
    },
    /// Start merging a delta (the top when None) into its parent; a job.
    SnapshotMerge {
        #[serde(default)]
        uuid: Option<Guid>,
    },
    /// Delete a snapshot; a job when it merges.
    SnapshotDelete { uuid: Guid },
    /// Switch the device to a snapshot (refused while mounted unless forced).
    SnapshotSwitch {
        uuid: Guid,
        #[serde(default)]
        force: bool,
    },
    /// The running (or last) job.
    Job,
    /// Start the write tracker.
    TrackStart,
    /// What changed since the last `track-get` (or the start), cleared.
    TrackGet,
    TrackStop,
    /// Copy the disk live into the channel passed with the request (one
    /// descriptor; a socket when `two_way`); a job.
    Copy {
        #[serde(default)]
        two_way: bool,
        /// Stop the device after the last pass (a migration).
        #[serde(default)]
        stop: bool,
        /// With `stop`: even while a filesystem is mounted on the device.
        #[serde(default)]
        force: bool,
        /// Seconds the last pass may hold the filesystem frozen before the
        /// copy gives up (default 30).
        #[serde(default)]
        freeze_limit: Option<f64>,
        /// Seconds the copy waits for the channel (a receiver that stops
        /// reading or answering) before it fails (default 60).
        #[serde(default)]
        timeout: Option<f64>,
        /// Go on, not filesystem-consistent, when the device is in use but
        /// no filesystem on it is found to freeze.
        #[serde(default)]
        allow_unfrozen: bool,
    },
    /// A full or incremental backup into the channel passed with the
    /// request, from a frozen point; a job.
    Backup {
        #[serde(default)]
        two_way: bool,
        #[serde(default)]
        incremental: bool,
        /// Seconds the last pass may hold the filesystem frozen before the
        /// copy gives up (default 30).
        #[serde(default)]
        freeze_limit: Option<f64>,
        /// Seconds the copy waits for the channel (a receiver that stops
        /// reading or answering) before it fails (default 60).
        #[serde(default)]
        timeout: Option<f64>,
        /// Go on, not filesystem-consistent, when the device is in use but
        /// no filesystem on it is found to freeze.
        #[serde(default)]
        allow_unfrozen: bool,
    },
}

impl Request {
    /// Descriptors the request takes (passed with it); any more are closed
    /// unused.
    pub fn descriptors(&self) -> usize {
        match self {
            Request::Copy { .. } | Request::Backup { .. } => 1,
            _ => 0,
        }
    }
}

/// A request as sent: the protocol version beside it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(flatten)]
    pub request: Request,
}

impl Envelope {
    /// Parse a request; a command whose arguments are all optional may
    /// come without `args`. The errors are serde's own (an unknown command
    /// is answered with the list of known ones).
    pub fn from_value(mut value: serde_json::Value) -> serde_json::Result<Envelope> {
        let first = serde_json::from_value::<Envelope>(value.clone());
        match value.as_object_mut() {
            Some(map) if first.is_err() && !map.contains_key("args") => {
                // Commands without arguments parse as they are; the others
                // get an empty set of arguments to take their defaults
                // from (and a missing one is named).
                map.insert("args".into(), serde_json::json!({}));
                serde_json::from_value(value)
            }
            _ => first,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Reply {
        Reply { version: PROTOCOL_VERSION, ok: true, result: Some(result), error: None, errno: None }
    }
    pub fn err(e: &Error) -> Reply {
        Reply { version: PROTOCOL_VERSION, ok: false, result: None, error: Some(e.message().to_string()), errno: Some(e.errno()) }
    }
}

/// Parse one request line as the daemon does: the version is checked
/// before the command. An unknown command is answered by serde's own
/// error, which lists the known ones.
pub fn parse_request(line: &[u8]) -> Result<Request> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| Error::invalid(format!("malformed request: {e}")))?;
    if let Some(v) = value.get("version").filter(|v| !v.is_null()) {
        if v.as_u64() != Some(PROTOCOL_VERSION as u64) {
            return Err(Error::new(
                libc::EPROTONOSUPPORT,
                format!("protocol version {v} not supported (this daemon speaks {PROTOCOL_VERSION})"),
            ));
        }
    }
    Envelope::from_value(value).map(|env| env.request).map_err(|e| Error::invalid(format!("malformed request: {e}")))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerStatus {
    pub path: PathBuf,
    pub format: Format,
    pub writable: bool,
    pub direct_io: bool,
    /// A QCOW2 layer's caches of L2 tables and inflated clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches: Option<crate::layers::qcow2::CacheStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub device: String,
    pub id: u32,
    pub pid: u32,
    pub uptime_secs: u64,
    pub size: u64,
    pub cluster_size: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// The disk directory, when the device serves one.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The snapshot a read-only snapshot device shows.
    #[serde(default)]
    pub snapshot: Option<Guid>,
    pub layers: Vec<LayerStatus>,
    pub counters: Counters,
    pub copy_ups: u64,
    pub in_flight: usize,
    /// "zero_copy" (request pages registered on the queue's ring) or
    /// "copy" (through the daemon's buffers).
    #[serde(default)]
    pub data_path: String,
    /// The block-layer scheduler the device runs with ("none" usually).
    #[serde(default)]
    pub io_scheduler: Option<String>,
    #[serde(default)]
    pub job: Option<Job>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

/// What a job does. On the wire, its name: "merge", "delete", "compact",
/// "copy", "backup", "backup-incremental".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Merge,
    Delete,
    Compact,
    Copy,
    Backup,
    BackupIncremental,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Merge => "merge",
            JobKind::Delete => "delete",
            JobKind::Compact => "compact",
            JobKind::Copy => "copy",
            JobKind::Backup => "backup",
            JobKind::BackupIncremental => "backup-incremental",
        }
    }
    /// What a progress line says while a job of this kind runs.
    pub fn doing(self) -> &'static str {
        match self {
            JobKind::Merge => "merging",
            JobKind::Delete => "deleting",
            JobKind::Compact => "compacting",
            JobKind::Copy => "copying",
            JobKind::Backup => "backing up",
            JobKind::BackupIncremental => "backing up (incremental)",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}


/// What a finished job did: one result per kind of job.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "ResultFields", into = "ResultFields")]
pub enum JobResult {
    /// No result (yet, or the job failed).
    None,
    Merged(Merged),
    Deleted(Deleted),
    Copy(Sent),
    Compacted(crate::layers::ploop::compact::Compacted),
}

/// A job's result as the wire has it: one field per kind, all present,
/// null but the one that is set (so old clients read it as they did).
#[derive(Clone, Serialize, Deserialize)]
struct ResultFields {
    #[serde(default)]
    merged: Option<Merged>,
    #[serde(default)]
    deleted: Option<Deleted>,
    #[serde(default)]
    copy: Option<Sent>,
    #[serde(default)]
    compacted: Option<crate::layers::ploop::compact::Compacted>,
}

impl From<JobResult> for ResultFields {
    fn from(r: JobResult) -> ResultFields {
        let mut f = ResultFields { merged: None, deleted: None, copy: None, compacted: None };
        match r {
            JobResult::None => {}
            JobResult::Merged(m) => f.merged = Some(m),
            JobResult::Deleted(d) => f.deleted = Some(d),
            JobResult::Copy(c) => f.copy = Some(c),
            JobResult::Compacted(c) => f.compacted = Some(c),
        }
        f
    }
}

impl From<ResultFields> for JobResult {
    fn from(f: ResultFields) -> JobResult {
        match f {
            ResultFields { merged: Some(m), .. } => JobResult::Merged(m),
            ResultFields { deleted: Some(d), .. } => JobResult::Deleted(d),
            ResultFields { copy: Some(c), .. } => JobResult::Copy(c),
            ResultFields { compacted: Some(c), .. } => JobResult::Compacted(c),
            _ => JobResult::None,
        }
    }
}

/// A long operation the daemon runs in the background (a merge).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub kind: JobKind,
    pub uuid: Option<Guid>,
    pub state: JobState,
    /// Clusters done and to do.
    pub done: u64,
    pub total: u64,
    pub secs: f64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub errno: Option<i32>,
    /// The copy round running now.
    #[serde(default)]
    pub round: Option<u32>,
    /// What it did, once done.
    #[serde(flatten)]
    pub result: JobResult,
    /// Something the user should know about the result.
    #[serde(default)]
    pub note: Option<String>,
}

impl Job {
    pub fn new(kind: JobKind, uuid: Option<Guid>) -> Job {
        Job {
            kind,
            uuid,
            state: JobState::Running,
            done: 0,
            total: 0,
            secs: 0.0,
            error: None,
            errno: None,
            round: None,
            result: JobResult::None,
            note: None,
        }
    }

    pub fn merged(&self) -> Option<&Merged> {
        match &self.result {
            JobResult::Merged(m) => Some(m),
            _ => None,
        }
    }

    pub fn deleted(&self) -> Option<&Deleted> {
        match &self.result {
            JobResult::Deleted(d) => Some(d),
            _ => None,
        }
    }

    pub fn copy(&self) -> Option<&Sent> {
        match &self.result {
            JobResult::Copy(c) => Some(c),
            _ => None,
        }
    }

    pub fn compacted(&self) -> Option<&crate::layers::ploop::compact::Compacted> {
        match &self.result {
            JobResult::Compacted(c) => Some(c),
            _ => None,
        }
    }
}

/// The answer to `info`: the device and how it was configured. `config`
/// is the daemon's own record of it (what `recover` reads back).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoReply {
    pub device: String,
    pub id: u32,
    pub config: serde_json::Value,
    pub version: String,
}

/// One ublk device as `list` shows it, ours or not: what the kernel
/// says of it and what our stored configuration serves. The fields are in
/// the order `list --json` has always printed them (sorted by name).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRow {
    pub depth: u16,
    pub device: String,
    pub disk: Option<serde_json::Value>,
    pub id: u32,
    /// The stored layer list (as stored: paths or layer specs).
    pub images: serde_json::Value,
    pub pid: i32,
    pub queues: u16,
    pub snapshot: Option<serde_json::Value>,
    pub state: String,
    /// The target name the device was created with ("ploop" for ours).
    pub target: String,
    /// What it serves, in a word: the disk directory, or the files.
    pub what: String,
}

/// The write tracker's answer: what changed, as byte ranges `[start, end)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrackReply {
    pub disk_size: u64,
    /// The tracker's unit: the cluster size.
    pub granularity: u64,
    pub clusters: u64,
    pub bytes: u64,
    pub ranges: Vec<[u64; 2]>,
}

/// The answer to `snapshot-delete`: done at once, or a job to follow.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReply {
    Done(Deleted),
    Started(Job),
}

pub type SnapshotReply = Snapshotted;
pub type SwitchReply = Switched;
pub type ListReply = Vec<SnapshotRow>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_the_wire_format() {
        let parse = |s: &str| Envelope::from_value(serde_json::from_str(s).unwrap());
        let r = parse(r#"{"version":1,"cmd":"status"}"#).unwrap();
        assert_eq!(r.request, Request::Status);
        let r = parse(r#"{"cmd":"snapshot","args":{"uuid":"{5fbaabe3-6958-40ff-92a7-860e329aab41}"}}"#).unwrap();
        assert_eq!(r.request, Request::Snapshot { uuid: Some(crate::disk::TOP_GUID) });
        let r = parse(r#"{"cmd":"snapshot-merge"}"#).unwrap();
        assert_eq!(r.request, Request::SnapshotMerge { uuid: None });
        let line = serde_json::to_string(&Envelope { version: Some(1), request: Request::SnapshotSwitch { uuid: crate::disk::TOP_GUID, force: true } }).unwrap();
        assert!(line.contains(r#""cmd":"snapshot-switch""#), "{line}");
        assert!(parse(r#"{"cmd":"nope"}"#).is_err());
        assert!(parse(r#"{"cmd":"snapshot-delete","args":{}}"#).is_err());
        assert!(parse(r#"{"cmd":"snapshot-delete"}"#).is_err());
        assert_eq!(parse(r#"{"cmd":"track-get"}"#).unwrap().request, Request::TrackGet);
        let r = parse(r#"{"cmd":"copy","args":{"stop":true}}"#).unwrap();
        assert_eq!(r.request, Request::Copy { two_way: false, stop: true, force: false, freeze_limit: None, timeout: None, allow_unfrozen: false });
        let r = parse(r#"{"cmd":"backup","args":{"freeze_limit":2.5,"timeout":10,"allow_unfrozen":true}}"#).unwrap();
        assert_eq!(r.request, Request::Backup { two_way: false, incremental: false, freeze_limit: Some(2.5), timeout: Some(10.0), allow_unfrozen: true });
        assert_eq!(parse(r#"{"cmd":"backup"}"#).unwrap().request, Request::Backup { two_way: false, incremental: false, freeze_limit: None, timeout: None, allow_unfrozen: false });
    }

    /// serde's error lists the commands, all of them; a known command with
    /// bad arguments is not called unknown.
    #[test]
    fn malformed_requests_name_every_command() {
        let e = parse_request(b"{\"cmd\":\"nope\"}").unwrap_err();
        for cmd in ["status", "resize", "compact", "snapshot-switch", "backup"] {
            assert!(e.message().contains(&format!("`{cmd}`")), "{cmd} missing from: {}", e.message());
        }
        let e = parse_request(b"{\"cmd\":\"resize\"}").unwrap_err();
        assert!(!e.message().contains("unknown"), "{}", e.message());
        assert!(e.message().contains("size"), "{}", e.message());
        let e = parse_request(b"{\"cmd\":\"compact\",\"args\":{\"step\":\"x\"}}").unwrap_err();
        assert!(!e.message().contains("unknown command"), "{}", e.message());
        // Commands whose arguments are all optional still need none.
        assert_eq!(parse_request(b"{\"cmd\":\"compact\"}").unwrap(), Request::Compact { step: None, speed: None });
        assert_eq!(parse_request(b"{\"cmd\":\"status\"}").unwrap(), Request::Status);
        assert_eq!(parse_request(b"{\"version\":9,\"cmd\":\"status\"}").unwrap_err().errno(), libc::EPROTONOSUPPORT);
    }

    /// `Job` as it was before its result was one enum (kind a string, one
    /// field per result), to hold the new type to the old wire format.
    #[derive(Serialize)]
    struct OldJob {
        kind: String,
        uuid: Option<Guid>,
        state: JobState,
        done: u64,
        total: u64,
        secs: f64,
        error: Option<String>,
        errno: Option<i32>,
        round: Option<u32>,
        merged: Option<Merged>,
        deleted: Option<Deleted>,
        copy: Option<Sent>,
        compacted: Option<crate::layers::ploop::compact::Compacted>,
        note: Option<String>,
    }

    fn old_job(kind: &str, r: &JobResult) -> OldJob {
        let f = ResultFields::from(r.clone());
        OldJob {
            kind: kind.into(),
            uuid: Some(crate::disk::TOP_GUID),
            state: JobState::Done,
            done: 3,
            total: 4,
            secs: 1.5,
            error: None,
            errno: None,
            round: Some(2),
            merged: f.merged,
            deleted: f.deleted,
            copy: f.copy,
            compacted: f.compacted,
            note: Some("frozen for the last pass: /mnt".into()),
        }
    }

    /// Every kind with every result: the same bytes as the old `Job`, as a
    /// reply (through a `Value`, as the daemon sends it) and printed
    /// directly (as the CLI's `--json` does); and read back the same.
    #[test]
    fn jobs_keep_the_wire_format() {
        let merged = Merged { child: crate::disk::TOP_GUID, parent: crate::disk::TOP_GUID, clusters: 7 };
        let sent: Sent = serde_json::from_value(serde_json::json!({
            "rounds": [], "bytes": 1, "stream_bytes": 2, "frozen_ms": 0.5, "md5": true, "secs": 0.25, "stopped": false
        }))
        .unwrap();
        let compacted = crate::layers::ploop::compact::Compacted {
            unlinked: 1,
            moved: 2,
            remaining: 3,
            file_size_before: 4,
            file_size_after: 5,
            done: true,
        };
        let results = [
            JobResult::None,
            JobResult::Merged(merged.clone()),
            JobResult::Deleted(Deleted::Merged(merged)),
            JobResult::Deleted(Deleted::Removed),
            JobResult::Copy(sent),
            JobResult::Compacted(compacted),
        ];
        let kinds = [JobKind::Merge, JobKind::Delete, JobKind::Compact, JobKind::Copy, JobKind::Backup, JobKind::BackupIncremental];
        for kind in kinds {
            for r in &results {
                let mut job = Job::new(kind, Some(crate::disk::TOP_GUID));
                (job.state, job.done, job.total, job.secs, job.round) = (JobState::Done, 3, 4, 1.5, Some(2));
                job.result = r.clone();
                job.note = Some("frozen for the last pass: /mnt".into());
                let old = old_job(kind.as_str(), r);
                let line = serde_json::to_string(&job).unwrap();
                assert_eq!(line, serde_json::to_string(&old).unwrap());
                let value = serde_json::to_value(&job).unwrap();
                assert_eq!(value.to_string(), serde_json::to_value(&old).unwrap().to_string());
                let back: Job = serde_json::from_str(&line).unwrap();
                assert_eq!(serde_json::to_string(&back).unwrap(), line);
                assert_eq!(back.kind, kind);
            }
        }
        // A failed job, and one as the old daemon might have left out the
        // result fields: read as no result.
        let mut job = Job::new(JobKind::Copy, None);
        (job.state, job.error, job.errno) = (JobState::Failed, Some("gone".into()), Some(5));
        let mut old = old_job("copy", &JobResult::None);
        (old.uuid, old.state, old.done, old.total, old.secs, old.round, old.note) = (None, JobState::Failed, 0, 0, 0.0, None, None);
        (old.error, old.errno) = (Some("gone".into()), Some(5));
        assert_eq!(serde_json::to_string(&job).unwrap(), serde_json::to_string(&old).unwrap());
        let bare: Job = serde_json::from_str(r#"{"kind":"merge","uuid":null,"state":"running","done":0,"total":0,"secs":0.0}"#).unwrap();
        assert!(matches!(bare.result, JobResult::None));
        assert!(serde_json::from_str::<Job>(r#"{"kind":"nope","uuid":null,"state":"running","done":0,"total":0,"secs":0.0}"#).is_err());
    }

    /// `info` as the daemon built it by hand before it had a type.
    #[test]
    fn info_keeps_the_wire_format() {
        let config = serde_json::json!({"images": [{"path": "/a.hds", "format": "ploop"}], "queues": 1, "io_scheduler": "none"});
        let old = serde_json::json!({
            "device": format!("/dev/ublkb{}", 3),
            "id": 3,
            "config": config.clone(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        let info = InfoReply { device: "/dev/ublkb3".into(), id: 3, config, version: env!("CARGO_PKG_VERSION").into() };
        assert_eq!(serde_json::to_value(&info).unwrap().to_string(), old.to_string());
        assert_eq!(serde_json::from_value::<InfoReply>(old).unwrap().id, 3);
    }

    /// `list`'s rows as the CLI built them by hand.
    #[test]
    fn device_rows_keep_the_wire_format() {
        let data = serde_json::json!({"images": ["/x/root.hds"], "disk": "/x", "snapshot": null});
        let images = data.get("images").cloned().unwrap_or_default();
        let old = serde_json::json!({
            "id": 4,
            "device": format!("/dev/ublkb{}", 4),
            "state": "live",
            "pid": 77,
            "queues": 2u16,
            "depth": 128u16,
            "target": "ploop",
            "images": images.clone(),
            "disk": data.get("disk"),
            "snapshot": data.get("snapshot"),
            "what": "/x",
        });
        let row = DeviceRow {
            id: 4,
            device: "/dev/ublkb4".into(),
            state: "live".into(),
            pid: 77,
            queues: 2,
            depth: 128,
            target: "ploop".into(),
            images,
            disk: data.get("disk").cloned(),
            snapshot: data.get("snapshot").cloned(),
            what: "/x".into(),
        };
        // Printed as the struct (list --json prints rows directly): the
        // bytes, key order included, are the old json!'s.
        assert_eq!(serde_json::to_string(&row).unwrap(), old.to_string());
        // A device that stored nothing (not ours): nulls where it had none.
        let old = serde_json::json!({"id": 0, "device": "/dev/ublkb0", "state": "dead", "pid": -1, "queues": 1, "depth": 1,
            "target": "", "images": null, "disk": None::<&serde_json::Value>, "snapshot": None::<&serde_json::Value>, "what": ""});
        let row = DeviceRow { id: 0, device: "/dev/ublkb0".into(), state: "dead".into(), pid: -1, queues: 1, depth: 1,
            target: String::new(), images: serde_json::Value::Null, disk: None, snapshot: None, what: String::new() };
        // Printed as the struct (list --json prints rows directly): the
        // bytes, key order included, are the old json!'s.
        assert_eq!(serde_json::to_string(&row).unwrap(), old.to_string());
    }
}
