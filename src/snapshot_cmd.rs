//! The snapshot commands: online through a device's daemon (`-n N`), or
//! offline on a disk directory no device serves (the same engine
//! operations on a stack opened for the occasion).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ublk_ploop::disk::ops::{self, Deleted, Merged};
use ublk_ploop::disk::{format_snapshot_rows, Disk, Guid};
use ublk_ploop::io::{block_on, OwnRing, SyncIo};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Error, Result, Stack, StackOptions};

use crate::cli::print_json;
use crate::control::request;
use crate::protocol::{DeleteReply, Job, JobState, ListReply, Request, SnapshotReply, Status, SwitchReply};

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
    let mut disk = Disk::load_locked(dir)?;
    let layers = block_on(disk.writable_layers(&SyncIo))?;
    let (stack, _) = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default())).map_err(|e| {
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

pub fn snapshot(id: Option<u32>, dir: Option<PathBuf>, uuid: Option<Guid>, json: bool) -> Result<i32> {
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

pub fn list(id: Option<u32>, dir: Option<PathBuf>, json: bool) -> Result<i32> {
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

pub fn merge(id: Option<u32>, dir: Option<PathBuf>, uuid: Option<Guid>, json: bool) -> Result<i32> {
    let merged = match (id, dir) {
        (Some(id), _) => {
            let _started: Job = request(id, Request::SnapshotMerge { uuid })?;
            follow(id, json)?.merged.ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no merge result"))?
        }
        (None, Some(dir)) => {
            let bar = Bar::new(json, "merging");
            let progress = |done: u64, total: u64| bar.set(done, total);
            let m = offline(&dir, Record::Keep, |ring, stack, disk, _| ring.block_on(ops::merge(&ring.io(), stack, disk, uuid, &progress)))?;
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

pub fn delete(id: Option<u32>, dir: Option<PathBuf>, uuid: Guid, json: bool) -> Result<i32> {
    // Whether it was marked temporary already (a delete of a snapshot with
    // several children), to say so instead of "marked" again.
    let was_temporary = |rows: &[ublk_ploop::disk::SnapshotRow]| rows.iter().any(|r| r.guid == uuid && r.temporary);
    let (deleted, already) = match (id, dir) {
        (Some(id), _) => {
            let already = was_temporary(&request::<ListReply>(id, Request::SnapshotList)?);
            let deleted = match request::<DeleteReply>(id, Request::SnapshotDelete { uuid })? {
                DeleteReply::Done(d) => d,
                DeleteReply::Started(_) => follow(id, json)?.deleted.ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no result"))?,
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

/// What an offline compact opens for an image file given on its own: the
/// chain below it when a DiskDescriptor.xml beside it names it (with the
/// disk locked), else the file alone, over an unknown lower part unless the
/// caller says it is a base.
fn bare_image_chain(image: &Path, base: bool) -> Result<(Option<Disk>, Vec<ublk_ploop::LayerSpec>, bool)> {
    let alone = vec![ublk_ploop::LayerSpec { path: image.to_path_buf(), format: ublk_ploop::layers::Format::Ploop }];
    let dir = match image.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("."),
    };
    if !Disk::is_disk(dir) {
        return Ok((None, alone, !base));
    }
    let me = std::fs::canonicalize(image).map_err(|e| Error::io(e, image.display()))?;
    let disk = Disk::load_locked(dir)?;
    let named = disk.desc.images.iter().find(|i| std::fs::canonicalize(disk.file_path(i)).is_ok_and(|p| p == me));
    match named {
        // The chain from the base up to this delta: its lower layers say
        // which discarded clusters must stay (reading as zeros over theirs).
        // Only a delta of the disk's own is compacted.
        Some(image) => {
            disk.writable_path(image, "compact")?;
            let layers = disk.layers(Some(image.guid))?;
            Ok((Some(disk), layers, false))
        }
        None => Ok((None, alone, !base)),
    }
}

/// Compact a served disk (a job) or a disk directory or image no device
/// serves: its top image's free space goes back to the host filesystem.
pub fn compact(id: Option<u32>, target: Option<PathBuf>, step: Option<u64>, speed: Option<u64>, base: bool, json: bool) -> Result<i32> {
    use ublk_ploop::layers::ploop::compact::Compacted;
    let done: Compacted = match (id, target) {
        (Some(id), _) => {
            let _started: Job = request(id, Request::Compact { step, speed })?;
            follow(id, json)?.compacted.ok_or_else(|| Error::new(libc::EPROTO, "the daemon reported no result"))?
        }
        (None, Some(target)) => {
            crate::cli::refuse_bare_dirs(std::slice::from_ref(&target))?;
            // ploop's lock is held (the disk) until the image is closed:
            // another offline command holding it is waited for, and the
            // descriptor is read once it is ours; only a top inside the
            // directory is ever compacted.
            let (_disk, layers, unknown_below) = if Disk::is_disk(&target) {
                let disk = Disk::load_locked(&target)?;
                let layers = block_on(disk.writable_layers(&SyncIo))?;
                (Some(disk), layers, false)
            } else {
                bare_image_chain(&target, base)?
            };
            // Refused before the image is opened: opening marks it in use.
            let top = layers.last().expect("a chain is never empty");
            if top.format == ublk_ploop::layers::Format::Ploop {
                let seen = block_on(ublk_ploop::layers::ploop::check::inspect(&SyncIo, &top.path, top.format))?;
                if seen.variant == Some(ublk_ploop::layers::ploop::header::Variant::V1) {
                    return Err(Error::unsupported(format!(
                        "{}: compacting v1 (WithoutFreeSpace) images is not supported; convert it first",
                        top.path.display()
                    )));
                }
            }
            let (stack, _) = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default()))?;
            // The read-write open took the top's record of changes out of
            // the file; it goes back in when the stack closes (compaction
            // moves clusters in the file, not on the disk the record maps).
            if let Some(bm) = block_on(stack.take_saved_bitmaps()).into_iter().next() {
                let t = Arc::new(Tracker::from_bits(stack.size(), bm.granularity, &bm.bits));
                stack.keep_on_close(Some((t, bm.id)));
            }
            let bar = Bar::new(json, "compacting");
            let pace = crate::pace::Pace::new(speed);
            let cluster = stack.cluster_size();
            let result = block_on(stack.compact_with(&SyncIo, step.unwrap_or(256).max(1), unknown_below, &|d, t| {
                bar.set(d, t);
                pace.wait(d * cluster);
            }));
            bar.finish();
            let closed = block_on(stack.close(&SyncIo));
            let done = result?;
            closed?;
            if unknown_below && !json {
                eprintln!(
                    "note: {} may be a delta over other images (no DiskDescriptor.xml beside it names it): \
                     discarded clusters were kept; give --base if nothing lies below it",
                    target.display()
                );
            }
            done
        }
        (None, None) => unreachable!("clap requires -n or a path"),
    };
    if json {
        print_json(&done);
    } else {
        println!(
            "compacted: {} discarded clusters unlinked, {} moved; file {} -> {} bytes",
            done.unlinked, done.moved, done.file_size_before, done.file_size_after
        );
    }
    Ok(0)
}

pub fn switch(id: Option<u32>, dir: Option<PathBuf>, uuid: Guid, force: bool, json: bool) -> Result<i32> {
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

/// Follow a device's job to its end, with a progress bar on a terminal.
pub fn follow(id: u32, json: bool) -> Result<Job> {
    let bar = Bar::new(json, "merging");
    loop {
        let job: Option<Job> = request(id, Request::Job)?;
        let job = job.ok_or_else(|| Error::new(libc::EPROTO, "the daemon has no job to report"))?;
        if let Some(r) = job.round {
            bar.label(&format!("{} round {r}", job.kind));
        } else if job.kind != "merge" && job.kind != "delete" {
            bar.label(&job.kind);
        }
        bar.set(job.done, job.total);
        match job.state {
            JobState::Running => std::thread::sleep(Duration::from_millis(200)),
            JobState::Done => {
                bar.finish();
                return Ok(job);
            }
            JobState::Failed => {
                bar.finish();
                return Err(Error::new(job.errno.unwrap_or(libc::EIO), job.error.unwrap_or_else(|| format!("the {} failed", job.kind))));
            }
        }
    }
}

/// A progress bar on stderr when it is a terminal (and not --json).
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub fn new(json: bool, label: &str) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} clusters ({eta})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Bar(Some(bar))
    }
    fn label(&self, label: &str) {
        if let Some(b) = &self.0 {
            b.set_message(label.to_string());
        }
    }
    fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

pub fn print_status(s: &Status) {
    println!(
        "{} (pid {}), {} bytes{}{}",
        s.device,
        s.pid,
        s.size,
        if s.read_only { ", read-only" } else { "" },
        s.snapshot.map(|g| format!(", snapshot {g}")).unwrap_or_default()
    );
    if let Some(d) = &s.disk {
        println!("  disk: {}", d.display());
    }
    if !s.data_path.is_empty() {
        println!("  data path: {}", s.data_path.replace('_', " "));
    }
    if let Some(sched) = &s.io_scheduler {
        println!("  I/O scheduler: {sched}");
    }
    for (i, l) in s.layers.iter().enumerate() {
        println!("  layer {i}: {} ({:?}{})", l.path.display(), l.format, if l.writable { ", writable" } else { "" });
    }
    let c = &s.counters;
    println!(
        "  counters: reads {} ({} bytes), writes {} ({} bytes), flushes {}, discards {}, write-zeroes {}, errors {}; copy-ups {}",
        c.reads, c.read_bytes, c.writes, c.write_bytes, c.flushes, c.discards, c.write_zeroes, c.errors, s.copy_ups
    );
    if let Some(j) = &s.job {
        let what = j.uuid.map(|g| format!(" {g}")).unwrap_or_default();
        match j.state {
            JobState::Running => {
                let round = j.round.map(|r| format!(" round {r}")).unwrap_or_default();
                println!("  job: {}{what}{round}: {}/{} clusters, {:.0} s", j.kind, j.done, j.total, j.secs)
            }
            JobState::Done => println!("  last job: {}{what} done in {:.1} s", j.kind, j.secs),
            JobState::Failed => println!("  last job: {}{what} failed: {}", j.kind, j.error.as_deref().unwrap_or("?")),
        }
    }
}
