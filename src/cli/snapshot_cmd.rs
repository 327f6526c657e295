//! The snapshot commands: online through a device's daemon (`-n N`), or
//! offline on a disk directory no device serves (the same engine
//! operations on a stack opened for the occasion).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ublk_ploop::disk::clone::{self as clones, Cloned};
use ublk_ploop::disk::ops::{self, Deleted, Merged};
use ublk_ploop::disk::{format_snapshot_rows, Disk, Guid};
use ublk_ploop::io::{block_on, OwnRing, SyncIo};
use ublk_ploop::layers::ploop::header::DEFAULT_CLUSTER;
use ublk_ploop::layers::Format;
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Error, Result, Stack, StackOptions};

use crate::cli::args::SnapshotCommand;
use crate::cli::output::{follow, print_json, Bar};
use crate::control::request;
use ublk_ploop::protocol::{DeleteReply, Job, ListReply, Request, SnapshotReply, SwitchReply};

pub fn run(command: SnapshotCommand) -> Result<i32> {
    match command {
        SnapshotCommand::Snapshot { target, uuid, json } => snapshot(target.id, target.dir, uuid, json),
        SnapshotCommand::SnapshotList { target, json } => list(target.id, target.dir, json),
        SnapshotCommand::SnapshotMerge { target, uuid, json } => merge(target.id, target.dir, uuid, json),
        SnapshotCommand::SnapshotDelete { target, uuid, json } => delete(target.id, target.dir, uuid, json),
        SnapshotCommand::SnapshotSwitch { target, uuid, force, json } => switch(target.id, target.dir, uuid, force, json),
        SnapshotCommand::Clone { template, dir, uuid, format, cluster_size, json } => clone(template, dir, uuid, format, cluster_size, json),
        SnapshotCommand::Detach { target, json } => detach(target.id, target.dir, json),
    }
}

/// What happens to the top's changed-block record in an offline session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Record {
    /// It stays with the disk's top, whichever file that is at the end (a
    /// snapshot moves it onto the new top, a merge into the merged file),
    /// as ploop's offline snapshot and merge do.
    Keep,
    /// It is dropped (a switch throws away what it described).
    Drop,
}

/// Run `op` on a disk directory no device serves. ploop's lock is taken
/// first and the descriptor read under it (a command that waited for
/// another tool goes on with what that tool left); the chain is then opened
/// read-write (which fails, saying so, if a daemon holds it) and closed
/// cleanly afterwards, whatever the outcome. Half-done merges a crash left
/// are finished first; `op` is told which.
fn offline<T>(dir: &std::path::Path, record: Record, op: impl FnOnce(&OwnRing, &Stack, &mut Disk, &[Merged]) -> Result<T>) -> Result<T> {
    super::device_cmd::refuse_if_served(dir)?;
    let mut disk = Disk::load_locked(dir)?;
    let layers = block_on(disk.writable_layers(&SyncIo))?;
    // Nothing is served: a merge of the top folds it into its parent.
    let opts = StackOptions { offline: true, ..Default::default() };
    let (stack, _) = block_on(Stack::open_layers(&SyncIo, &layers, &opts)).map_err(|e| {
        if e.errno() == libc::EWOULDBLOCK || e.errno() == libc::EBUSY {
            Error::new(e.errno(), format!("{e}; if a device serves this disk, name it with -n N"))
        } else {
            e
        }
    })?;
    // The read-write open took the top's record out of the file; it goes
    // back into the top when the stack closes (also if `op` fails).
    let saved = block_on(stack.take_saved_bitmaps());
    if let (Record::Keep, Some(bm)) = (record, saved.into_iter().next()) {
        let t = Arc::new(Tracker::from_bits(stack.size(), bm.granularity, &bm.bits));
        stack.keep_on_close(Some((t, bm.id)));
    }
    let ring = OwnRing::new(64).map_err(|e| Error::io(e, "setting up io_uring"))?;
    let result = ring.block_on(ops::finish_merges(&ring.io(), &stack, &mut disk)).and_then(|merged| op(&ring, &stack, &mut disk, &merged));
    let closed = block_on(stack.close(&SyncIo));
    let value = result?;
    closed?;
    Ok(value)
}

/// How long requests were held, in milliseconds: only a served disk has
/// requests to hold (offline there is nothing to say).
fn stall_ms(online: bool, stall: Duration) -> Option<f64> {
    online.then(|| stall.as_secs_f64() * 1000.0)
}

/// `--json` of snapshot and switch: the stall as a number of milliseconds
/// (`stall_ms`, online only), not a serialised duration.
#[derive(serde::Serialize)]
struct NewTop<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    guid: Option<Guid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<Guid>,
    file: &'a std::path::Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_ms: Option<f64>,
}

fn held(stall_ms: Option<f64>) -> String {
    stall_ms.map(|ms| format!(" (requests held {ms:.2} ms)")).unwrap_or_default()
}

fn snapshot(id: Option<u32>, dir: Option<PathBuf>, uuid: Option<Guid>, json: bool) -> Result<i32> {
    let done: SnapshotReply = match (id, dir) {
        (Some(id), _) => request(id, Request::Snapshot { uuid })?,
        (None, Some(dir)) => offline(&dir, Record::Keep, |ring, stack, disk, _| ring.block_on(ops::snapshot(&ring.io(), stack, disk, uuid)))?,
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    let stall = stall_ms(id.is_some(), done.stall);
    if json {
        print_json(&NewTop { guid: Some(done.guid), snapshot: None, file: &done.file, stall_ms: stall });
    } else {
        println!("{}", done.guid);
        eprintln!("snapshot {} taken; new top {}{}", done.guid, done.file.display(), held(stall));
    }
    Ok(0)
}

fn list(id: Option<u32>, dir: Option<PathBuf>, json: bool) -> Result<i32> {
    let rows: ListReply = match (id, dir) {
        (Some(id), _) => request(id, Request::SnapshotList)?,
        (None, Some(dir)) => Disk::load(&dir)?.snapshot_rows(),
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    if json {
        print_json(&rows);
    } else {
        print!("{}", format_snapshot_rows(&rows));
    }
    Ok(0)
}

fn merge(id: Option<u32>, dir: Option<PathBuf>, uuid: Option<Guid>, json: bool) -> Result<i32> {
    let merged = match (id, dir) {
        (Some(id), _) => {
            let _started: Job = request(id, Request::SnapshotMerge { uuid })?;
            follow(id, json)?.merged().cloned().ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no merge result"))?
        }
        (None, Some(dir)) => {
            let bar = Bar::new(json, "merging");
            let progress = |done: u64, total: u64| bar.set(done, total);
            let m = offline(&dir, Record::Keep, |ring, stack, disk, finished| {
                // Run again after an interruption, the merge of the top is
                // the one just finished: merging once more would merge a
                // delta nobody asked for.
                match finished.iter().rev().find(|f| f.child == disk.desc.top) {
                    Some(done) if uuid.is_none() => {
                        eprintln!("the interrupted merge of the top into {} was finished", done.parent);
                        Ok(done.clone())
                    }
                    _ => ring.block_on(ops::merge(&ring.io(), stack, disk, uuid, &progress)),
                }
            })?;
            bar.finish();
            m
        }
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    report_merge(&merged, json);
    Ok(0)
}

fn report_merge(m: &Merged, json: bool) {
    if json {
        print_json(m);
    } else {
        println!("merged {} into its parent {} ({} clusters copied); {} names the merged delta", m.child, m.parent, m.clusters, m.child);
    }
}

fn delete(id: Option<u32>, dir: Option<PathBuf>, uuid: Guid, json: bool) -> Result<i32> {
    // Whether it was marked temporary already (a delete of a snapshot with
    // several children), to say so instead of "marked" again.
    let was_temporary = |rows: &[ublk_ploop::disk::SnapshotRow]| rows.iter().any(|r| r.guid == uuid && r.temporary);
    let (deleted, already) = match (id, dir) {
        (Some(id), _) => {
            let already = was_temporary(&request::<ListReply>(id, Request::SnapshotList)?);
            let deleted = match request::<DeleteReply>(id, Request::SnapshotDelete { uuid })? {
                DeleteReply::Done(d) => d,
                DeleteReply::Started(_) => follow(id, json)?.deleted().cloned().ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no result"))?,
            };
            (deleted, already)
        }
        (None, Some(dir)) => {
            let already = was_temporary(&Disk::load(&dir)?.snapshot_rows());
            let bar = Bar::new(json, "merging");
            let progress = |done: u64, total: u64| bar.set(done, total);
            let d = offline(&dir, Record::Keep, |ring, stack, disk, finished| {
                // A temporary snapshot left with one child is merged away
                // on opening (as ploop does): that was the delete asked for.
                if let Some(m) = finished.iter().find(|m| m.parent == uuid) {
                    return Ok(Deleted::Merged(m.clone()));
                }
                ring.block_on(ops::delete(&ring.io(), stack, disk, uuid, &progress))
            })?;
            bar.finish();
            (d, already)
        }
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    if json {
        print_json(&deleted);
    } else {
        match deleted {
            Deleted::Removed => println!("deleted {uuid}"),
            Deleted::Merged(m) => println!("deleted {uuid}: merged into its child {} ({} clusters copied)", m.child, m.clusters),
            Deleted::MarkedTemporary if already => {
                println!("{uuid} is marked temporary already (it has several children); it is merged away once one child is left")
            }
            Deleted::MarkedTemporary => println!("{uuid} has several children: marked temporary, as ploop does"),
        }
    }
    Ok(0)
}

fn switch(id: Option<u32>, dir: Option<PathBuf>, uuid: Guid, force: bool, json: bool) -> Result<i32> {
    let done: SwitchReply = match (id, dir) {
        (Some(id), _) => request(id, Request::SnapshotSwitch { uuid, force })?,
        (None, Some(dir)) => offline(&dir, Record::Drop, |ring, stack, disk, _| ring.block_on(ops::switch(&ring.io(), stack, disk, uuid)))?,
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    let stall = stall_ms(id.is_some(), done.stall);
    if json {
        print_json(&NewTop { guid: None, snapshot: Some(done.snapshot), file: &done.file, stall_ms: stall });
    } else {
        println!("switched to {}; new top {}{}", done.snapshot, done.file.display(), held(stall));
    }
    Ok(0)
}

/// A thin clone of a template disk; prints how long it took (it costs a
/// descriptor and an empty image, whatever the template holds).
fn clone(template: PathBuf, dir: PathBuf, uuid: Option<Guid>, format: Option<Format>, cluster: Option<u64>, json: bool) -> Result<i32> {
    let start = std::time::Instant::now();
    let cloned: Cloned = match format {
        Some(Format::Qcow2) => {
            if uuid.is_some() {
                return Err(Error::invalid("a QCOW2 template has no snapshots to pick with -u"));
            }
            block_on(clones::clone_qcow2(&SyncIo, &template, &dir, cluster.unwrap_or(DEFAULT_CLUSTER)))?
        }
        Some(other) => {
            return Err(Error::invalid(format!("--format {other:?}: a template is a disk directory, or a QCOW2 image with --format qcow2")))
        }
        None if cluster.is_some() => {
            return Err(Error::invalid("--cluster-size is for a QCOW2 template; a disk directory's clone takes its template's"))
        }
        None => {
            // A device of ours serving it holds ploop's lock for its life.
            let served = super::device_cmd::served_by(&template).is_some();
            block_on(clones::clone_disk(&SyncIo, &template, &dir, uuid, served))?
        }
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if json {
        print_json(&serde_json::json!({ "clone": cloned, "ms": ms }));
    } else {
        println!("cloned {} into {} in {ms:.1} ms; its top {} takes the writes", template.display(), cloned.dir.display(), cloned.top.display());
        for s in &cloned.shared {
            println!("  reads (shared, read-only): {}", s.display());
        }
    }
    Ok(0)
}

/// Detach a clone from its template: offline through the engine's
/// `detach`, online as merges of the top's shared parent, one at a time,
/// until none is left.
fn detach(id: Option<u32>, dir: Option<PathBuf>, json: bool) -> Result<i32> {
    let merged: Vec<Merged> = match (id, dir) {
        (Some(id), _) => {
            let mut merged = Vec::new();
            while shared_parent_online(id)? {
                let _started: Job = request(id, Request::SnapshotMerge { uuid: None })?;
                let m = follow(id, json)?.merged().cloned().ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no merge result"))?;
                merged.push(m);
            }
            merged
        }
        (None, Some(dir)) => {
            let bar = Bar::new(json, "detaching");
            let progress = |done: u64, total: u64| bar.set(done, total);
            let m = offline(&dir, Record::Keep, |ring, stack, disk, _| ring.block_on(clones::detach(&ring.io(), stack, disk, &progress)))?;
            bar.finish();
            m
        }
        (None, None) => unreachable!("clap requires -n or DIR"),
    };
    let clusters: u64 = merged.iter().map(|m| m.clusters).sum();
    if json {
        print_json(&serde_json::json!({ "merged": merged, "clusters": clusters }));
    } else if merged.is_empty() {
        println!("nothing to detach: the disk reads no shared delta");
    } else {
        println!("detached: {} shared deltas copied up into the top ({clusters} clusters); the disk stands alone", merged.len());
    }
    Ok(0)
}

/// Whether the served disk's top still reads a shared (template) delta,
/// by the engine's own plan on the disk the daemon serves (refused when a
/// delta of the disk's own lies between them).
fn shared_parent_online(id: u32) -> Result<bool> {
    let status: ublk_ploop::protocol::Status = request(id, Request::Status)?;
    let dir = status.disk.ok_or_else(|| Error::unsupported(format!("/dev/ublkb{id} serves image files, not a disk directory: nothing to detach")))?;
    Ok(clones::detach_plan(&Disk::load(&dir)?)? > 0)
}
