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

/// A long operation the daemon runs in the background (a merge).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// What runs: "merge", "delete".
    pub kind: String,
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
    #[serde(default)]
    pub merged: Option<Merged>,
    #[serde(default)]
    pub deleted: Option<Deleted>,
    #[serde(default)]
    pub copy: Option<Sent>,
    #[serde(default)]
    pub compacted: Option<crate::layers::ploop::compact::Compacted>,
    /// Something the user should know about the result.
    #[serde(default)]
    pub note: Option<String>,
}

impl Job {
    pub fn new(kind: &str, uuid: Option<Guid>) -> Job {
        Job {
            kind: kind.into(),
            uuid,
            state: JobState::Running,
            done: 0,
            total: 0,
            secs: 0.0,
            error: None,
            errno: None,
            round: None,
            merged: None,
            deleted: None,
            copy: None,
            compacted: None,
            note: None,
        }
    }
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
}
