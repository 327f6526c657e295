//! The disk directory's online operations in the simulation (#19 stage
//! 2): snapshot, merge, delete, switch, grow and compact run as the daemon
//! runs them (one at a time, through `disk::ops` and the stack), while the
//! queues' requests go on; a crash may cut any of them short, and the
//! recovery opens the disk from its descriptor as the daemon's start does.
//!
//! Invariants added here: the descriptor in memory names what the stack
//! serves after every operation, and the one on disk names exactly the
//! files in the directory (3); a switch shows the snapshot's content (4);
//! an operation fails only with an error it was owed (7).

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::sim::model::Tag;
use super::sim::{gen, Joined};
use super::{errinfo, Driver, DIR};
use ublk_ploop::disk::{ops, Disk, Guid, DESCRIPTOR, TOP_GUID};
use ublk_ploop::io::Io;

/// The most a run lets the disk grow to, against its first size.
const GROW_LIMIT: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// `quiet`: no write runs meanwhile; its content is recorded.
    Snapshot { quiet: bool },
    Merge,
    Delete,
    Switch,
    Grow(u64),
    Compact,
}

/// What an operation hands back besides its disk.
pub enum JobDone {
    Snapshot(Guid),
    /// Clusters a compaction moved.
    Compacted(u64),
    Other,
}

/// The disk back (None on a bare stack) and the outcome.
type JobResult = (Option<Disk>, Result<JobDone, (i32, String)>);

/// The online operation in flight.
pub struct Job {
    pub kind: JobKind,
    joined: Joined<JobResult>,
    pub step: u64,
    pub issued_ops: u64,
    what: String,
    /// A quiet snapshot's content, or a switch target's.
    content: Option<Rc<Vec<Tag>>>,
    /// A switch's target.
    target: Option<Guid>,
    /// The top's file when it began.
    top_before: PathBuf,
    /// Every layer's file when it began.
    chain_before: Vec<PathBuf>,
    /// A bare snapshot's new delta.
    pub new_top: Option<PathBuf>,
}

impl Job {
    /// Nothing may write while it runs.
    pub fn quiet(&self) -> bool {
        matches!(self.kind, JobKind::Snapshot { quiet: true } | JobKind::Switch)
    }
}

impl Driver {
    /// Admission, as the daemon's: one operation at a time.
    fn admitted(&self) -> bool {
        self.job.is_none() && !self.bk.busy() && (self.bare || self.disk.is_some())
    }

    pub fn start_job<F, Fut>(&mut self, kind: JobKind, what: String, content: Option<Rc<Vec<Tag>>>, target: Option<Guid>, work: F)
    where
        F: FnOnce(super::SimIo, Rc<ublk_ploop::Stack>, Option<Disk>) -> Fut,
        Fut: Future<Output = JobResult> + 'static,
    {
        let disk = self.disk.take();
        let issued_ops = self.owed_from();
        let joined = self.sim.spawn("job", work(self.io.clone(), self.stack(), disk));
        self.log(|| format!("job: {what}"));
        let top_before = self.paths.last().cloned().expect("a chain is never empty");
        let chain_before = self.paths.clone();
        self.job = Some(Job { kind, joined, step: self.step, issued_ops, what, content, target, top_before, chain_before, new_top: None });
    }

    /// A snapshot of the top (`ops::snapshot`), concurrent with requests;
    /// a quiet one first waits for them, reads the disk back for its
    /// content, and lets no write run until it ends.
    pub fn snapshot(&mut self, quiet: bool) -> Result<(), String> {
        if !self.admitted() || self.paths.len() >= gen::MAX_LAYERS {
            return Ok(());
        }
        if self.bare {
            self.bare_snapshot();
            return Ok(());
        }
        let content = if quiet {
            self.settle()?;
            self.sim.set_faults_enabled(false);
            let tags = self.read_back();
            self.sim.set_faults_enabled(true);
            Some(Rc::new(tags?))
        } else {
            None
        };
        self.watch.model().snapshot_begin();
        self.start_job(JobKind::Snapshot { quiet }, format!("snapshot{}", if quiet { " (quiet)" } else { "" }), content, None, |io, stack, disk| async move {
            let mut disk = disk.expect("a disk directory");
            let r = ops::snapshot(&io, &stack, &mut disk, None).await;
            (Some(disk), r.map(|s| JobDone::Snapshot(s.guid)).map_err(errinfo))
        });
        Ok(())
    }

    /// Merge a delta of the served chain into its parent: the top (pick 0)
    /// or a lower one.
    pub fn merge(&mut self, pick: u8) -> Result<(), String> {
        if !self.admitted() {
            return Ok(());
        }
        if self.bare {
            self.bare_merge();
            return Ok(());
        }
        let disk = self.disk.as_ref().unwrap();
        let chain: Vec<Guid> = disk.desc.chain(disk.desc.top).map_err(|e| format!("step {}: the chain: {e}", self.step))?.iter().map(|i| i.guid).collect();
        // Children with a parent, top first.
        let candidates: Vec<Guid> = chain.iter().skip(1).rev().copied().collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let child = candidates[pick as usize % candidates.len()];
        let arg = (child != disk.desc.top).then_some(child);
        self.watch.model().merge_moves_holdings();
        self.start_job(JobKind::Merge, format!("merge {child}"), None, None, move |io, stack, disk| async move {
            let mut disk = disk.expect("a disk directory");
            let r = ops::merge(&io, &stack, &mut disk, arg, &|_, _| {}).await;
            (Some(disk), r.map(|_| JobDone::Other).map_err(errinfo))
        });
        Ok(())
    }

    /// Delete a snapshot (merged into its child, removed, or marked).
    pub fn delete(&mut self, pick: u8) -> Result<(), String> {
        if !self.admitted() || self.bare {
            return Ok(());
        }
        let disk = self.disk.as_ref().unwrap();
        let shots: Vec<Guid> = disk.desc.shots.iter().map(|s| s.guid).filter(|&g| g != disk.desc.top).collect();
        if shots.is_empty() {
            return Ok(());
        }
        let guid = shots[pick as usize % shots.len()];
        self.watch.model().merge_moves_holdings();
        self.start_job(JobKind::Delete, format!("delete {guid}"), None, None, move |io, stack, disk| async move {
            let mut disk = disk.expect("a disk directory");
            let r = ops::delete(&io, &stack, &mut disk, guid, &|_, _| {}).await;
            (Some(disk), r.map(|_| JobDone::Other).map_err(errinfo))
        });
        Ok(())
    }

    /// Switch to a snapshot whose content is known, with no write running.
    pub fn switch(&mut self, pick: u8) -> Result<(), String> {
        if !self.admitted() || self.bare {
            return Ok(());
        }
        let disk = self.disk.as_ref().unwrap();
        let size = self.size;
        let known: Vec<(Guid, Rc<Vec<Tag>>)> = self
            .snap_content
            .iter()
            .filter(|(g, c)| **g != disk.desc.top && disk.desc.shot(**g).is_some_and(|s| s.temporary == ublk_ploop::disk::Temporary::No) && c.len() as u64 * 512 == size)
            .map(|(g, c)| (*g, c.clone()))
            .collect();
        if known.is_empty() {
            return Ok(());
        }
        let (guid, content) = known[pick as usize % known.len()].clone();
        self.settle()?;
        self.start_job(JobKind::Switch, format!("switch to {guid}"), Some(content), Some(guid), move |io, stack, disk| async move {
            let mut disk = disk.expect("a disk directory");
            let r = ops::switch(&io, &stack, &mut disk, guid).await;
            (Some(disk), r.map(|_| JobDone::Other).map_err(errinfo))
        });
        Ok(())
    }

    /// Grow the disk online as the daemon does: the top, then the
    /// descriptor's size under the disk lock.
    pub fn grow(&mut self, clusters: u64) -> Result<(), String> {
        if !self.admitted() {
            return Ok(());
        }
        let new_size = self.size + clusters * self.cfg.cluster;
        if new_size > self.cfg.size * GROW_LIMIT {
            return Ok(());
        }
        self.start_job(JobKind::Grow(new_size), format!("grow to {new_size:#x}"), None, None, move |io, stack, mut disk| async move {
            let r = async {
                stack.grow_top(&io, new_size).await?;
                // Only the top grew; the descriptor says the disk's size.
                if let Some(d) = &mut disk {
                    let _lock = d.lock_in(&io)?;
                    let mut next = Disk::load_in(&io, &d.dir).await?;
                    next.desc.set_size(new_size)?;
                    next.store(&io).await?;
                    *d = next;
                }
                Ok::<_, ublk_ploop::Error>(JobDone::Other)
            }
            .await;
            (disk, r.map_err(errinfo))
        });
        Ok(())
    }

    /// Compact the top online, to its end.
    pub fn compact(&mut self, step: u64) -> Result<(), String> {
        if !self.admitted() {
            return Ok(());
        }
        self.start_job(JobKind::Compact, format!("compact, {step} clusters a step"), None, None, move |io, stack, disk| async move {
            let r = stack.compact(&io, step, &|_, _| {}).await;
            (disk, r.map(|c| JobDone::Compacted(c.moved)).map_err(errinfo))
        });
        Ok(())
    }

    /// Take the operation that finished, checking what it left.
    pub fn reap_job(&mut self) -> Result<(), String> {
        if !self.job.as_ref().is_some_and(|j| j.joined.is_done()) {
            return Ok(());
        }
        let job = self.job.take().unwrap();
        let (disk, result) = job.joined.take().unwrap();
        // Outside any task, with no stack change running: the gate is open.
        let now = self.stack().paths();
        let ok = result.is_ok();
        self.log(|| format!("job {} (step {}): {}", job.what, job.step, match &result { Ok(_) => "ok".to_string(), Err((e, m)) => format!("failed: {m} (errno {e})") }));
        match job.kind {
            JobKind::Snapshot { quiet } => {
                let swapped = now.len() > self.paths.len();
                self.watch.model().snapshot_end(Some(swapped), ok);
                if let (true, Ok(JobDone::Snapshot(guid))) = (quiet, &result) {
                    self.snap_content.insert(*guid, job.content.clone().expect("a quiet snapshot's content"));
                }
                self.figures.snapshots += ok as u64;
            }
            JobKind::Merge | JobKind::Delete => {
                self.watch.model().merge_moves_holdings();
                self.figures.merges += ok as u64;
            }
            JobKind::Switch => {
                let switched = now.last() != Some(&job.top_before);
                if switched != ok {
                    return Err(format!("step {}: {} returned {} but the stack {} switched", self.step, job.what, if ok { "Ok" } else { "an error" }, if switched { "was" } else { "was not" }));
                }
                if switched {
                    self.watch.model().switched(job.content.as_ref().expect("a switch's content"));
                    self.figures.switches += 1;
                }
            }
            JobKind::Grow(_) => {
                let size = self.stack().size();
                if size > self.size {
                    self.watch.model().grow(size);
                    self.size = size;
                    // The grow ended the record of changes (the daemon
                    // takes it from the stack the same way).
                    let mut record = self.bk.record.lock().unwrap();
                    if record.is_some() {
                        *record = self.stack().kept_record();
                    }
                }
                self.figures.grows += ok as u64;
            }
            JobKind::Compact => {
                self.figures.compacts += ok as u64;
                if let Ok(JobDone::Compacted(moved)) = &result {
                    self.figures.compact_moved += moved;
                }
            }
        }
        let before = std::mem::replace(&mut self.paths, now);
        if before.last() != self.paths.last() {
            // A merge into the parent's file makes it the top: its syncs
            // that failed before were the merge's own opening's, which
            // then failed the merge (every later one rewrites them).
            self.top_since = self.sim.ops_completed();
        }
        for p in &self.paths {
            if !self.served.contains(p) {
                self.served.push(p.clone());
            }
        }
        let Some(disk) = disk else {
            // A bare stack: the driver's chain is the stack's.
            self.bare_remove_dropped(&before)?;
            return self.job_error(&job, result.err());
        };
        // Invariant 3: the descriptor the daemon holds names what it serves.
        let named: Vec<PathBuf> = disk.layers(None).map_err(|e| format!("invariant 3 (descriptor): step {}: after {}: {e}", self.step, job.what))?.into_iter().map(|s| s.path).collect();
        // (Unless an earlier operation could not tell which descriptor is on
        // disk: an operation since re-read it, refused with ESTALE, and the
        // two stay apart until a restart.)
        // (Nor after a grow or compaction whose top would not reopen: the
        // stack serves nothing from then on, every request failing with
        // ESHUTDOWN, until the restart reopens the descriptor's chain.)
        let lost_top = matches!(job.kind, JobKind::Grow(_) | JobKind::Compact)
            && result.is_err()
            && named.len() == self.paths.len() + 1
            && named.starts_with(&self.paths);
        if named != self.paths && !self.descriptor_uncertain && !lost_top {
            return Err(format!("invariant 3 (descriptor): step {}: after {} the descriptor names {named:?} but the stack serves {:?}", self.step, job.what, self.paths));
        }
        self.disk = Some(disk);
        self.forget_gone_snapshots();
        let uncertain = result.as_ref().is_err_and(|(_, m)| m.contains("either may be on disk"));
        // A merge into the parent's file that could not tell which
        // descriptor is on disk closes the stack: only one of the two
        // files may take the next write.
        let closed = result.is_err() && {
            let stack = self.stack();
            self.block_on("is_closed", async move { stack.is_closed().await })?
        };
        self.job_error(&job, result.err())?;
        if lost_top || closed {
            // The device is dead until restarted: restart it as a kill would.
            self.log(|| "the stack closed (a top that would not reopen, an uncertain descriptor): the daemon is restarted".into());
            return self.crash(0, false, false);
        }
        // Invariant 3 on disk: the descriptor there is the one the daemon
        // holds (unless the operation said it could not tell), and names
        // exactly the files there are.
        self.sim.set_faults_enabled(false);
        let io = self.io.clone();
        let stored = self.block_on("load", async move { Disk::load_in(&io, Path::new(DIR)).await });
        self.sim.set_faults_enabled(true);
        let stored = stored?.map_err(|e| format!("invariant 3 (descriptor): step {}: loading the descriptor after {}: {e}", self.step, job.what))?;
        let held = self.disk.as_ref().unwrap();
        if stored.desc.images != held.desc.images || stored.desc.shots != held.desc.shots {
            if !uncertain {
                return Err(format!(
                    "invariant 3 (descriptor): step {}: after {} the descriptor on disk ({:?}) is not the one the daemon holds ({:?})",
                    self.step, job.what, stored.desc.images, held.desc.images
                ));
            }
            // Until a restart, operations refuse (ESTALE): the chain on
            // disk is not what the device serves.
            self.log(|| "the descriptor on disk is uncertain: the daemon's recovery decides".into());
            self.descriptor_uncertain = true;
            return Ok(());
        }
        self.check_files(&stored, !ok)
    }

    /// Invariant 7 for an operation: refusals the daemon passes on (the
    /// delta in use), otherwise only an injected fault.
    fn job_error(&self, job: &Job, err: Option<(i32, String)>) -> Result<(), String> {
        match err {
            Some((errno, _)) if errno == libc::ESTALE && self.descriptor_uncertain => Ok(()),
            Some((errno, msg)) if errno != libc::EBUSY && !self.owed(errno, job.issued_ops) => {
                Err(format!("invariant 7 (errors owed): step {}: {} issued at step {} failed: {msg} (errno {errno})", self.step, job.what, job.step))
            }
            _ => Ok(()),
        }
    }

    /// An operation a crash cut short, once the disk is open again.
    pub fn recovered_job(&mut self, job: Job, disk: &Disk) -> Result<(), String> {
        self.log(|| format!("recovery: {} (step {}) was cut short", job.what, job.step));
        match job.kind {
            JobKind::Snapshot { .. } => {
                if self.paths.len() > 1 && self.paths.last() != Some(&job.top_before) {
                    // Its descriptor was stored: the new top may hold
                    // acknowledged writes, the old one the rest.
                    self.watch.model().unsure_holdings();
                }
            }
            JobKind::Merge | JobKind::Delete => self.watch.model().merge_moves_holdings(),
            JobKind::Switch => {
                let target = job.target.expect("a switch's target");
                let top_parent = disk.desc.shot(disk.desc.top).map(|s| s.parent);
                // A switch's top is a file the chain did not have; a merge
                // a crash left half done, which the start finished, makes a
                // file the chain had the top (seed 26125928321433).
                if self.paths.last().is_some_and(|top| !job.chain_before.contains(top)) {
                    if top_parent != Some(target) {
                        return Err(format!("step {}: after a crash in {} the top is new but its parent is {top_parent:?}", self.step, job.what));
                    }
                    self.watch.model().switched(job.content.as_ref().expect("a switch's content"));
                }
            }
            JobKind::Grow(_) | JobKind::Compact => {}
        }
        self.forget_gone_snapshots_of(disk);
        Ok(())
    }

    fn forget_gone_snapshots(&mut self) {
        if let Some(disk) = self.disk.take() {
            self.forget_gone_snapshots_of(&disk);
            self.disk = Some(disk);
        }
    }

    /// A snapshot merged away (its GUID gone) is no switch target; one
    /// that stays keeps its content (merges keep the child's content under
    /// the child's GUID).
    fn forget_gone_snapshots_of(&mut self, disk: &Disk) {
        self.snap_content.retain(|g, _| *g != TOP_GUID && disk.desc.shot(*g).is_some());
    }

    /// Invariant 3: the directory holds the descriptor (and its lock
    /// file) and exactly the files it names. After a crash or a failed
    /// operation a file nobody names may be left (counted, then removed as
    /// an administrator would); never one named and missing.
    pub fn check_files(&mut self, disk: &Disk, leftovers_allowed: bool) -> Result<(), String> {
        let there: BTreeSet<String> = self.sim.list(Path::new(DIR)).into_iter().collect();
        let mut named: BTreeSet<String> = BTreeSet::new();
        for img in &disk.desc.images {
            let name = Path::new(&img.file).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !there.contains(&name) {
                return Err(format!("invariant 3 (descriptor): step {}: the descriptor names {name}, which does not exist (files: {there:?})", self.step));
            }
            named.insert(name);
        }
        named.insert(DESCRIPTOR.to_string());
        named.insert(format!("{DESCRIPTOR}.lck"));
        for name in there.difference(&named) {
            if !leftovers_allowed {
                return Err(format!("invariant 3 (descriptor): step {}: {name} is in the disk directory but the descriptor does not name it (names {named:?})", self.step));
            }
            self.log(|| format!("leftover file {name}"));
            self.figures.leftovers += 1;
            let path = Path::new(DIR).join(name);
            self.io.remove_file(&path).map_err(|e| format!("step {}: removing the leftover {}: {e}", self.step, path.display()))?;
        }
        Ok(())
    }
}
