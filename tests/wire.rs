//! The control protocol's wire format as a contract. A fake daemon listens on
//! the control socket of a device nobody uses, answers each request with a
//! canned reply (the daemon's real reply shapes) and keeps every request line
//! the command line sent. `tests/wire/*.json` hold what the CLI of a pinned
//! commit sent and printed for every verb that talks to a daemon; this CLI
//! must send the same bytes and print the same output with the same exit
//! code, and the daemon's parser must accept every recorded line.
//!
//! Recording (from an old binary, rarely):
//! `UBLK_PLOOP_WIRE_RECORD=path/to/old/ublk-ploop cargo test --release --test wire -- --ignored record`

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use ublk_ploop::copy::{Round, Sent};
use ublk_ploop::disk::ops::{Deleted, Merged, Snapshotted, Switched};
use ublk_ploop::disk::{Guid, SnapshotRow};
use ublk_ploop::layers::ploop::compact::Compacted;
use ublk_ploop::layers::ploop::resize::Resized;
use ublk_ploop::layers::Format;

// The daemon's message types, until they are the library's.
use ublk_ploop::protocol;

/// The device the fake daemon answers for: no real device has it.
const DEV_ID: u32 = 4242;
const SOCKET_DIR: &str = "/run/ublk-ploop";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wire")
}

/// The daemon's own parser on one recorded request line.
fn daemon_parses(line: &str) -> Result<(), String> {
    let request = protocol::parse_request(line.as_bytes()).map_err(|e| e.to_string())?;
    // Nothing the line said is lost: the parsed request says it again in
    // the same bytes.
    let again = serde_json::to_string(&protocol::Envelope { version: Some(protocol::PROTOCOL_VERSION), request }).unwrap();
    if again != line {
        return Err(format!("parsed, but says it back as {again}"));
    }
    Ok(())
}

/// One request as the fake daemon got it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Received {
    line: String,
    /// Descriptors that came with it, by kind ("file", "socket", "fifo").
    fds: Vec<String>,
}

/// One CLI run against the fake daemon, as stored in `tests/wire/NAME.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Case {
    /// The command line; `{dir}` is a fresh directory of the run's own.
    args: Vec<String>,
    /// The reply lines, answered in order, one per connection.
    replies: Vec<String>,
    requests: Vec<Received>,
    stdout: String,
    stderr: String,
    code: i32,
}

/// The socket directory, or a loud failure: without it nothing is tested.
fn socket_dir() -> PathBuf {
    let dir = PathBuf::from(SOCKET_DIR);
    let usable = fs::create_dir_all(&dir).and_then(|()| nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).map_err(std::io::Error::from));
    if let Err(e) = usable {
        panic!("wire test cannot run: cannot make sockets in {SOCKET_DIR} ({e}); the control socket lives there, so this test needs root");
    }
    dir
}

/// Only one fake daemon for device 4242 on the machine at a time (other
/// checkouts may run this test too): a lock on the socket directory, which
/// leaves nothing behind.
struct MachineLock {
    _held: fs::File,
}

impl MachineLock {
    fn take() -> MachineLock {
        let dir = socket_dir();
        let f = fs::File::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0, "flock {}", dir.display());
        MachineLock { _held: f }
    }
}

/// A directory of the run's own, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ublk-ploop-wire-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The fake daemon: answers each connection's first request line with the
/// next canned reply and keeps what came.
struct FakeDaemon {
    path: PathBuf,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(replies: Vec<String>) -> FakeDaemon {
        let path = socket_dir().join(format!("{DEV_ID}.sock"));
        if UnixStream::connect(&path).is_ok() {
            panic!("{} is served by something else: device {DEV_ID} is in use on this machine", path.display());
        }
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, halt) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut replies = replies.into_iter();
            for conn in listener.incoming() {
                if halt.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let Some(received) = read_request(&conn) else { continue };
                sink.lock().unwrap().push(received);
                let reply = replies.next().unwrap_or_else(|| {
                    r#"{"version":1,"ok":false,"error":"wire test: no canned reply left","errno":5}"#.to_string()
                });
                let _ = conn.write_all(format!("{reply}\n").as_bytes());
            }
        });
        FakeDaemon { path, got, stop, thread: Some(thread) }
    }

    /// Stop, remove the socket, and give what came.
    fn finish(mut self) -> Vec<Received> {
        self.halt();
        std::mem::take(&mut *self.got.lock().unwrap())
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // Wake the accept.
            let _ = UnixStream::connect(&self.path);
            t.join().unwrap();
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One request line and the descriptors that rode with it; the descriptors
/// are closed at once (a copy to our stdout must see its end).
fn read_request(conn: &UnixStream) -> Option<Received> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    while !line.contains(&b'\n') {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).ok()?;
        for c in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: the kernel just gave us these descriptors.
                fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return None;
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap();
    line.truncate(end);
    let kinds = fds.iter().map(|fd| fd_kind(fd)).collect();
    Some(Received { line: String::from_utf8(line).expect("a request line is UTF-8"), fds: kinds })
}

fn fd_kind(fd: &OwnedFd) -> String {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat");
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFSOCK => "socket",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "char",
        _ => "other",
    }
    .to_string()
}

/// Run `cli` with `args` against a fake daemon answering `replies`.
fn run_case(cli: &Path, args: &[String], replies: &[String]) -> Case {
    let scratch = Scratch::new("run");
    let dir = scratch.0.to_str().unwrap().to_string();
    // A receiver for `--connect` to a unix socket: connecting is all the
    // CLI does with it (the daemon would do the rest).
    let _receiver = UnixListener::bind(scratch.0.join("receiver.sock")).unwrap();
    let daemon = FakeDaemon::start(replies.to_vec());
    let out = Command::new(cli)
        .args(args.iter().map(|a| a.replace("{dir}", &dir)))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", cli.display()));
    let requests = daemon.finish();
    let text = |b: &[u8]| String::from_utf8_lossy(b).replace(&dir, "{dir}");
    Case {
        args: args.to_vec(),
        replies: replies.to_vec(),
        requests,
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
        code: out.status.code().unwrap_or(-1),
    }
}

fn recorded() -> Vec<(String, Case)> {
    let mut cases: Vec<(String, Case)> = fs::read_dir(fixtures())
        .expect("tests/wire holds the recorded cases")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            let case: Case = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, case)
        })
        .collect();
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

/// Every recorded verb: this CLI sends the same request lines (and
/// descriptors) and prints the same, with the same exit code.
#[test]
fn cli_speaks_the_recorded_wire_format() {
    let _lock = MachineLock::take();
    let cli = Path::new(env!("CARGO_BIN_EXE_ublk-ploop"));
    let cases = recorded();
    assert!(cases.len() >= 20, "only {} recorded cases in tests/wire", cases.len());
    let mut failed = Vec::new();
    for (name, want) in &cases {
        let got = run_case(cli, &want.args, &want.replies);
        if got != *want {
            eprintln!("== {name}: differs from the recording ({})", want.args.join(" "));
            let (w, g) = (serde_json::to_value(want).unwrap(), serde_json::to_value(&got).unwrap());
            for key in ["requests", "stdout", "stderr", "code"] {
                if w[key] != g[key] {
                    eprintln!("   {key} recorded: {}\n   {key} now:      {}", w[key], g[key]);
                }
            }
            failed.push(name.clone());
        }
    }
    assert!(failed.is_empty(), "the CLI no longer speaks as recorded in: {failed:?}");
}

/// Every recorded request line is one the daemon's parser takes, and says
/// back in the same bytes.
#[test]
fn daemon_parses_every_recorded_request() {
    let mut lines = 0;
    for (name, case) in recorded() {
        for r in &case.requests {
            daemon_parses(&r.line).unwrap_or_else(|e| panic!("{name}: {}: {e}", r.line));
            lines += 1;
        }
    }
    // Every command the CLI has is among them.
    let seen: std::collections::BTreeSet<String> = recorded()
        .iter()
        .flat_map(|(_, c)| c.requests.iter().map(|r| serde_json::from_str::<Value>(&r.line).unwrap()["cmd"].as_str().unwrap().to_string()))
        .collect();
    for cmd in [
        "status", "snapshot", "snapshot-list", "snapshot-merge", "snapshot-delete", "snapshot-switch", "resize", "compact", "job",
        "track-start", "track-get", "track-stop", "copy", "backup",
    ] {
        assert!(seen.contains(cmd), "no recorded request for {cmd}: {seen:?}");
    }
    assert!(lines > 0);
}

// ---------------------------------------------------------------------------
// Recording: the cases, with replies in the daemon's own shapes.
// ---------------------------------------------------------------------------

fn guid(s: &str) -> Guid {
    s.parse().unwrap()
}

fn ok(result: Value) -> String {
    serde_json::to_string(&json!({"version": 1, "ok": true, "result": result})).unwrap()
}

fn err(message: &str, errno: i32) -> String {
    serde_json::to_string(&json!({"version": 1, "ok": false, "error": message, "errno": errno})).unwrap()
}

fn v<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap()
}

const SNAP: &str = "{b3c4a0e2-1f6d-4a8e-9c21-6e0f3d7a5b19}";
const CHILD: &str = "{7d2e9f41-0c3b-4e5a-8f16-2a9b4c6d8e03}";
const TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

/// A job as the daemon reports it (`protocol::Job`, every field present).
fn job(kind: &str, uuid: Option<&str>, state: &str, done: u64, total: u64, round: Option<u32>, result: Value) -> Value {
    let mut j = json!({
        "kind": kind, "uuid": uuid, "state": state, "done": done, "total": total, "secs": 1.5,
        "error": null, "errno": null, "round": round,
        "merged": null, "deleted": null, "copy": null, "compacted": null, "note": null,
    });
    if let Value::Object(extra) = result {
        j.as_object_mut().unwrap().extend(extra);
    }
    j
}

fn merged() -> Merged {
    Merged { child: guid(TOP), parent: guid(SNAP), clusters: 37 }
}

fn rows(temporary: bool) -> Value {
    v(&vec![
        SnapshotRow { parent: Guid(uuid::Uuid::nil()), current: false, guid: guid(SNAP), file: "root.hds".into(), temporary, shared: false },
        SnapshotRow { parent: guid(SNAP), current: true, guid: guid(TOP), file: "root.hds.{5fbaabe3-6958-40ff-92a7-860e329aab41}".into(), temporary: false, shared: false },
    ])
}

fn status_reply(with_job: Value) -> Value {
    json!({
        "device": format!("/dev/ublkb{DEV_ID}"), "id": DEV_ID, "pid": 31337, "uptime_secs": 3600,
        "size": 10u64 << 30, "cluster_size": 1u64 << 20, "block_size": 512, "read_only": false,
        "disk": "/var/lib/vz/private/101/root.hdd", "snapshot": null,
        "layers": [
            {"path": "/var/lib/vz/private/101/root.hdd/root.hds", "format": v(&Format::Ploop), "writable": false, "direct_io": true},
            {"path": "/var/lib/vz/private/101/root.hdd/root.hds.{5fbaabe3-6958-40ff-92a7-860e329aab41}", "format": v(&Format::Ploop), "writable": true, "direct_io": true},
        ],
        "counters": {"reads": 1200, "writes": 800, "read_bytes": 4915200, "write_bytes": 3276800, "flushes": 17, "discards": 3, "write_zeroes": 2, "errors": 0},
        "copy_ups": 5, "in_flight": 1, "data_path": "zero_copy", "io_scheduler": "none", "job": with_job,
    })
}

fn sent(stopped: bool) -> Sent {
    Sent {
        rounds: vec![
            Round { round: 1, clusters: 10240, sent: 812, bytes: 812 << 20, secs: 4.25, frozen: false },
            Round { round: 2, clusters: 40, sent: 40, bytes: 40 << 20, secs: 0.5, frozen: false },
            Round { round: 3, clusters: 3, sent: 3, bytes: 3 << 20, secs: 0.02, frozen: true },
        ],
        bytes: 855 << 20,
        stream_bytes: (855 << 20) + 65536,
        frozen_ms: 21.5,
        md5: true,
        secs: 4.8,
        stopped,
    }
}

fn track(ranges: &[[u64; 2]]) -> Value {
    let bytes: u64 = ranges.iter().map(|r| r[1] - r[0]).sum();
    json!({"disk_size": 10u64 << 30, "granularity": 1u64 << 20, "clusters": bytes >> 20, "bytes": bytes, "ranges": ranges})
}

/// Every verb that talks to a daemon, plain and `--json`, and the error path.
fn cases() -> Vec<(String, Vec<&'static str>, Vec<String>)> {
    let id = "4242";
    let compacted = Compacted { unlinked: 12, moved: 30, remaining: 0, file_size_before: 900 << 20, file_size_after: 400 << 20, done: true };
    let copy_note = json!({"copy": v(&sent(false)), "note": "the filesystem was frozen for the last pass"});
    let mut c: Vec<(String, Vec<&'static str>, Vec<String>)> = Vec::new();
    let running_merge = ok(job("merge", None, "running", 10, 37, None, json!({})));
    let running_copy = ok(job("copy", None, "running", 500, 10240, Some(1), json!({})));
    for json_flag in [false, true] {
        let mut with = |name: &str, mut args: Vec<&'static str>, replies: Vec<String>| {
            let mut name = name.to_string();
            if json_flag {
                args.push("--json");
                name += "_json";
            }
            c.push((name, args, replies));
        };
        with("status", vec!["status", "-n", id], vec![ok(status_reply(Value::Null))]);
        with(
            "status_job_running",
            vec!["status", "-n", id],
            vec![ok(status_reply(job("copy", None, "running", 500, 10240, Some(2), json!({}))))],
        );
        with("status_job_done", vec!["status", "-n", id], vec![ok(status_reply(job("merge", Some(SNAP), "done", 37, 37, None, json!({"merged": v(&merged())}))))]);
        with(
            "status_job_failed",
            vec!["status", "-n", id],
            vec![ok(status_reply(job("delete", Some(SNAP), "failed", 3, 37, None, json!({"error": "no space left", "errno": 28}))))],
        );
        with("status_refused", vec!["status", "-n", id], vec![err("/dev/ublkb4242: permission denied", 13)]);
        let snapped = Snapshotted { guid: guid(SNAP), file: "/var/lib/vz/private/101/root.hdd/root.hds.{7d2e9f41-0c3b-4e5a-8f16-2a9b4c6d8e03}".into(), stall: Duration::from_micros(1250) };
        with("snapshot", vec!["snapshot", "-n", id], vec![ok(v(&snapped))]);
        with("snapshot_uuid", vec!["snapshot", "-n", id, "--uuid", SNAP], vec![ok(v(&snapped))]);
        with("snapshot_list", vec!["snapshot-list", "-n", id], vec![ok(rows(false))]);
        with(
            "snapshot_merge",
            vec!["snapshot-merge", "-n", id],
            vec![running_merge.clone(), running_merge.clone(), ok(job("merge", None, "done", 37, 37, None, json!({"merged": v(&merged())})))],
        );
        with(
            "snapshot_merge_uuid_failed",
            vec!["snapshot-merge", "-n", id, "--uuid", SNAP],
            vec![running_merge.clone(), ok(job("merge", Some(SNAP), "failed", 3, 37, None, json!({"error": "reading the delta: I/O error", "errno": 5})))],
        );
        with(
            "snapshot_delete_removed",
            vec!["snapshot-delete", "-n", id, "--uuid", SNAP],
            vec![ok(rows(false)), ok(json!({"done": v(&Deleted::Removed)}))],
        );
        with(
            "snapshot_delete_merged",
            vec!["snapshot-delete", "-n", id, "--uuid", SNAP],
            vec![
                ok(rows(false)),
                ok(json!({"started": job("delete", Some(SNAP), "running", 0, 0, None, json!({}))})),
                ok(job("delete", Some(SNAP), "done", 37, 37, None, json!({"deleted": v(&Deleted::Merged(merged()))}))),
            ],
        );
        with(
            "snapshot_delete_marked",
            vec!["snapshot-delete", "-n", id, "--uuid", SNAP],
            vec![ok(rows(false)), ok(json!({"done": v(&Deleted::MarkedTemporary)}))],
        );
        with(
            "snapshot_delete_marked_already",
            vec!["snapshot-delete", "-n", id, "--uuid", SNAP],
            vec![ok(rows(true)), ok(json!({"done": v(&Deleted::MarkedTemporary)}))],
        );
        let switched = Switched { snapshot: guid(SNAP), file: "/var/lib/vz/private/101/root.hdd/root.hds.{7d2e9f41-0c3b-4e5a-8f16-2a9b4c6d8e03}".into(), stall: Duration::from_micros(2500) };
        with("snapshot_switch", vec!["snapshot-switch", "-n", id, "--uuid", SNAP], vec![ok(v(&switched))]);
        with(
            "snapshot_switch_force",
            vec!["snapshot-switch", "-n", id, "--uuid", CHILD, "--force"],
            vec![ok(v(&Switched { snapshot: guid(CHILD), ..switched.clone() }))],
        );
        with(
            "snapshot_switch_refused",
            vec!["snapshot-switch", "-n", id, "--uuid", SNAP],
            vec![err("/dev/ublkb4242 is in use (mounted on /mnt): switching would change the data under it; unmount it first (or use --force)", 16)],
        );
        let resized = Resized { old_size: 10 << 30, new_size: 20 << 30, relocated: 2, dropped_change_record: false };
        with("resize", vec!["resize", "-n", id, "--size", "20G"], vec![ok(v(&resized))]);
        with(
            "compact",
            vec!["compact", "-n", id],
            vec![ok(job("compact", None, "running", 0, 0, None, json!({}))), ok(job("compact", None, "done", 30, 30, None, json!({"compacted": v(&compacted)})))],
        );
        with(
            "compact_step_speed",
            vec!["compact", "-n", id, "--step", "8", "--speed", "10M"],
            vec![ok(job("compact", None, "running", 0, 0, None, json!({}))), ok(job("compact", None, "done", 30, 30, None, json!({"compacted": v(&compacted)})))],
        );
        with("track_start", vec!["track", "start", "-n", id], vec![ok(track(&[]))]);
        with("track_get", vec!["track", "get", "-n", id], vec![ok(track(&[[5 << 20, 6 << 20], [100 << 20, 102 << 20]]))]);
        with("track_stop", vec!["track", "stop", "-n", id], vec![ok(track(&[[0, 1 << 20]]))]);
        with("track_get_off", vec!["track", "get", "-n", id], vec![err("the write tracker is not running (`track start`)", 2)]);
        with(
            "copy_to_file",
            vec!["copy", "-n", id, "--to", "{dir}/stream"],
            vec![ok(job("copy", None, "running", 0, 0, None, json!({}))), running_copy.clone(), ok(job("copy", None, "done", 3, 3, Some(3), copy_note.clone()))],
        );
        with(
            "copy_to_stdout_stop",
            vec!["copy", "-n", id, "--to", "-", "--stop", "--force", "--freeze-limit", "2.5", "--timeout", "10", "--allow-unfrozen"],
            vec![ok(job("copy", None, "running", 0, 0, None, json!({}))), ok(job("copy", None, "done", 3, 3, Some(3), json!({"copy": v(&sent(true))})))],
        );
        with(
            "copy_connect_unix",
            vec!["copy", "-n", id, "--connect", "{dir}/receiver.sock"],
            vec![ok(job("copy", None, "running", 0, 0, None, json!({}))), ok(job("copy", None, "done", 3, 3, Some(3), copy_note.clone()))],
        );
        with(
            "copy_failed",
            vec!["copy", "-n", id, "--to", "{dir}/stream"],
            vec![ok(job("copy", None, "running", 0, 0, None, json!({}))), ok(job("copy", None, "failed", 3, 10240, Some(1), json!({"error": "the receiver stopped answering", "errno": 110})))],
        );
        with("copy_refused", vec!["copy", "-n", id, "--to", "{dir}/stream", "--stop"], vec![err("/dev/ublkb4242 is in use (mounted on /mnt): --stop would take the device from under it; unmount it first (or use --force)", 16)]);
        with(
            "backup_full",
            vec!["backup", "-n", id, "--to", "{dir}/full"],
            vec![ok(job("backup", None, "running", 0, 0, None, json!({}))), ok(job("backup", None, "done", 3, 3, Some(3), copy_note.clone()))],
        );
        with(
            "backup_incremental_connect",
            vec!["backup", "-n", id, "--incremental", "--connect", "{dir}/receiver.sock", "--freeze-limit", "5", "--timeout", "30"],
            vec![ok(job("backup-incremental", None, "running", 0, 0, None, json!({}))), ok(job("backup-incremental", None, "done", 3, 3, Some(2), json!({"copy": v(&sent(false))})))],
        );
        with(
            "backup_incremental_stdout",
            vec!["backup", "-n", id, "--incremental", "--to", "-", "--allow-unfrozen"],
            vec![ok(job("backup-incremental", None, "running", 0, 0, None, json!({}))), ok(job("backup-incremental", None, "done", 3, 3, Some(2), copy_note.clone()))],
        );
    }
    c
}

/// Record every case from the CLI named by `UBLK_PLOOP_WIRE_RECORD` (an old
/// binary) into `tests/wire/`.
#[test]
#[ignore]
fn record() {
    let cli = PathBuf::from(std::env::var("UBLK_PLOOP_WIRE_RECORD").expect("UBLK_PLOOP_WIRE_RECORD=path of the CLI to record from"));
    let _lock = MachineLock::take();
    fs::create_dir_all(fixtures()).unwrap();
    for (name, args, replies) in cases() {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let case = run_case(&cli, &args, &replies);
        let text = serde_json::to_string_pretty(&case).unwrap() + "\n";
        fs::write(fixtures().join(format!("{name}.json")), text).unwrap();
        eprintln!("{name}: exit {}, {} requests", case.code, case.requests.len());
    }
}
