//! Folding the top into its parent's file, online: the merge whose cost is
//! the top's clusters, not the parent's (ploop's forward merge, with
//! requests going on). The parent keeps its file and becomes the top.
//!
//! Crash argument (the caller marks the parent temporary first, so any
//! crash before the end leaves a merge the next open finishes the same way):
//! - while the rounds copy, the top still hides every cluster it holds, so
//!   whatever the parent's file holds of it is never read;
//! - each copy is data first, synced, then the parent's entries;
//! - a write to a cluster already copied lands in both files (`mirror`):
//!   the parent's file is read, until the end, only where the top does not
//!   hold the cluster (never at what is copied or carried), and the end
//!   syncs it;
//! - the end holds requests: the last changes are copied, the parent's file
//!   synced, and only then is the descriptor that names it as the top
//!   stored; no write reaches the old top after that, and none reaches
//!   the parent's file before it except as a copy of the old top's bytes
//!   (a carried write is in the old top as well).

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{for_each_in_flight, BufPool, Io};
use crate::layers::Layer;

use super::mirror::FoldMirror;
use super::{owner_map, OnDrop, Stack};

/// The top changed under a merge (the caller runs one change at a time).
fn stack_changed() -> Error {
    Error::new(libc::EBUSY, "the stack changed during the merge")
}

/// Clusters a copy into another file keeps in flight.
const COPY_IN_FLIGHT: usize = 8;
/// Clusters whose data shares one sync before their entries are written.
const COPY_PER_SYNC: usize = 256;
/// The same while requests go on (a fold): a sync of less data holds up
/// the requests' own I/O on the device for less time.
const FOLD_PER_SYNC: usize = 64;
/// A fold's copies in flight while requests change the disk: the rest of
/// the disk's queue is theirs. Asked again every `PACE_GROUP` clusters.
const FOLD_IN_FLIGHT_BESIDE_WRITES: usize = 3;
const PACE_GROUP: usize = 16;
/// Rounds of catching up with the clusters changed and not carried over
/// (new in the top, zeroed, discarded, or a carried write failed), after
/// the first, before the rest is copied with requests held.
const CATCH_UP_ROUNDS: usize = 8;
/// A round that finds at most this many changed clusters ends the catching
/// up: they are copied with requests held (the stall of the fold).
const FINAL_AT_MOST: usize = 64;

impl Stack {
    /// Copy every cluster of the top into `into`, a writable opening of
    /// the parent's file (the caller holds that file's lock exclusively:
    /// nothing else reads it), in rounds while requests go on. A write to a
    /// cluster already copied is carried into `into` as well; the clusters
    /// changed otherwise are copied by the next round (see `mirror`). Then,
    /// with requests held, the last
    /// ones are copied, `into` is synced and `commit` runs (it stores the
    /// descriptor naming the parent's file as the top); `into` then serves
    /// as the top in place of the parent and the old top. `progress` gets
    /// (clusters done, clusters to do). Returns the clusters copied.
    ///
    /// If `commit` fails, the stack serves the two layers as before and the
    /// caller should open the parent afresh (`reopen_lower`): its file
    /// holds clusters the stack's opening does not know. If `commit` could
    /// not tell whether its descriptor is on disk (`DescriptorUncertain`),
    /// the stack closes: either descriptor reads the same now, but only one
    /// of the two files may take the next write.
    pub async fn fold_top_online<I, F, Fut>(&self, io: &I, into: Arc<Layer>, progress: &dyn Fn(u64, u64), commit: F) -> Result<u64>
    where
        I: Io,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        self.check_writable()?;
        let top = {
            let shape = self.shape.enter().await;
            shape.check_open()?;
            // What a failed sync of the top covered may be gone from it (the
            // page cache may have dropped it): copied into a fresh file, a
            // later flush would call it durable. A restart checks first.
            shape.check_sync_ok()?;
            if shape.layers.len() < 2 {
                return Err(Error::invalid("the top has no parent to fold into"));
            }
            shape.top().clone()
        };
        let fold = Arc::new(FoldMirror::new(into, self.size(), self.cluster));
        {
            // From here on, changes are carried or marked; the first round
            // reads after it. Installed with requests held, so that none in
            // flight escapes both.
            let mut shape = self.shape.exclusive().await;
            shape.check_open()?;
            if shape.fold.as_ref().is_some_and(|f| !f.abandoned()) {
                return Err(Error::new(libc::EBUSY, "a merge into the parent's file is running"));
            }
            shape.fold = Some(fold.clone());
        }
        // Whatever ends the fold, its future dropped half way included,
        // writes stop being carried into a file it will not finish.
        let _abandon = OnDrop::new(|| fold.abandon());
        let result = self.fold_rounds(io, &top, &fold, progress, commit).await;
        if result.is_err() {
            self.shape.exclusive().await.fold = None;
        }
        result
    }

    async fn fold_rounds<I, F, Fut>(&self, io: &I, top: &Arc<Layer>, fold: &FoldMirror, progress: &dyn Fn(u64, u64), commit: F) -> Result<u64>
    where
        I: Io,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let into = &fold.into;
        // Copy-ups linked through the link log become ordinary entries
        // first (none is logged while the fold runs): what the rounds read
        // from the top is then durable in it, as the fold's crash order
        // assumes.
        if top.defers_links() {
            top.sync(io).await?;
        }
        let clusters = self.size().div_ceil(self.cluster);
        let holds = |c: &u64| top.lookup(*c, self.cluster).is_some();
        let held = |changed: Vec<u64>| -> Vec<u64> { changed.into_iter().filter(holds).collect() };
        let mut todo: Vec<u64> = top.allocated(self.cluster, clusters).collect();
        let total = todo.len() as u64;
        progress(0, total);
        let mut copied = 0;
        for round in 0..=CATCH_UP_ROUNDS {
            let report = |n: u64| {
                if round == 0 {
                    progress(n, total)
                }
            };
            self.copy_into(io, top, into, &todo, Some(fold), &report).await?;
            copied += todo.len() as u64;
            todo = held(fold.take_changed());
            if crate::mutant::off("fold-catch-up") {
                todo.clear();
            }
            if todo.len() <= FINAL_AT_MOST {
                break;
            }
            tracing::debug!(round, clusters = todo.len(), "merge: copying again the clusters changed meanwhile and not carried over");
        }
        // Requests held: none is in flight, so the clusters marked changed
        // now are every change not carried over since the last round read.
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        shape.check_sync_ok()?;
        if !Arc::ptr_eq(shape.top(), top) {
            return Err(stack_changed());
        }
        if !crate::mutant::off("fold-catch-up") {
            todo.extend(held(fold.take_changed()));
        }
        todo.sort_unstable();
        todo.dedup();
        self.copy_into(io, top, into, &todo, None, &|_| {}).await?;
        copied += todo.len() as u64;
        // Everything the top holds is in the parent's file, durable, before
        // a descriptor names that file as the top.
        if !crate::mutant::off("fold-sync") {
            into.sync(io).await?;
        }
        if let Err(e) = commit().await {
            if e.kind() == ErrorKind::DescriptorUncertain {
                shape.closed = true;
            }
            shape.fold = None;
            return Err(e);
        }
        shape.fold = None;
        // The old top's log holds only settled records (settled before the
        // fold, nothing logged during it) and its file goes: so does the log.
        shape.top().remove_link_log(io);
        let parent_index = shape.layers.len() - 2;
        shape.layers.truncate(parent_index);
        shape.layers.push(into.clone());
        shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
        Ok(copied)
    }

    /// Copy `clusters` of `from` (those it still holds when their turn
    /// comes) into `into`, a writable opening of another file: `COPY_IN_FLIGHT`
    /// at a time, data first, synced, then `into`'s entries (written again
    /// where it held the cluster already), `COPY_PER_SYNC` clusters per sync.
    /// `progress` gets the clusters done.
    pub async fn copy_clusters<I: Io>(&self, io: &I, from: &Layer, into: &Layer, clusters: &[u64], progress: &dyn Fn(u64)) -> Result<()> {
        self.copy_into(io, from, into, clusters, None, progress).await
    }

    /// `copy_clusters`, and with `fold`: `from` is the served top and
    /// requests go on (`FOLD_PER_SYNC` clusters per sync, and
    /// `FOLD_IN_FLIGHT_BESIDE_WRITES` in flight while they change the
    /// disk), so each read enters the gate (the top's clusters
    /// stay where its table says while they are read, and a stack change
    /// stops the copy), and each cluster is copied inside its section of
    /// the fold, which carries later writes to it over (`mirror`); never
    /// with the requests held by the caller.
    async fn copy_into<I: Io>(&self, io: &I, from: &Layer, into: &Layer, clusters: &[u64], fold: Option<&FoldMirror>, progress: &dyn Fn(u64)) -> Result<()> {
        let (cluster, size) = (self.cluster, self.size());
        let pool = BufPool::new(cluster as usize, COPY_IN_FLIGHT);
        let mut done = 0;
        let per_sync = if fold.is_some() { FOLD_PER_SYNC } else { COPY_PER_SYNC };
        for chunk in clusters.chunks(per_sync) {
            let window = into.window_start();
            let links = Mutex::new(Vec::new());
            let one = |&c: &u64| {
                let (pool, links) = (&pool, &links);
                async move {
                    let mut buf = pool.get();
                    let copied = async {
                        let n = (size - c * cluster).min(cluster) as usize;
                        let mut section = None;
                        {
                            let _inside = match fold {
                                Some(fold) => {
                                    let shape = self.shape.enter().await;
                                    shape.check_open()?;
                                    if !std::ptr::eq(Arc::as_ptr(shape.top()), from) {
                                        return Err(stack_changed());
                                    }
                                    // Taken inside the gate, as a write takes
                                    // it: a held gate never waits on one.
                                    let held = fold.copy_section(c).await;
                                    fold.copy_starts(&held);
                                    section = Some(held);
                                    Some(shape)
                                }
                                None => None,
                            };
                            let Some(at) = from.lookup(c, cluster) else { return Ok(()) };
                            io.read_at(from.file().fd(), &mut buf[..n], at).await.map_err(|e| Error::io(e, from.file().path.display()))?;
                        }
                        // A cluster `into` holds is linked again too: its
                        // table block is then written again, so an entry an
                        // earlier attempt wrote whose writeback failed (its
                        // page looking written all the same) becomes durable.
                        let to = match into.lookup(c, cluster) {
                            Some(to) => to,
                            None => into.reserve_cluster(io).await?,
                        };
                        links.lock().unwrap().push((c, to));
                        io.write_at(into.file().fd(), &buf[..n], to).await.map_err(|e| Error::io(e, into.file().path.display()))?;
                        if let (Some(fold), Some(section)) = (fold, &section) {
                            fold.copied(section, to);
                        }
                        Ok(())
                    }
                    .await;
                    pool.put(buf);
                    copied
                }
            };
            let mut started = 0;
            for group in chunk.chunks(PACE_GROUP) {
                let width = match fold {
                    Some(fold) if fold.requests_went_on() => FOLD_IN_FLIGHT_BESIDE_WRITES,
                    _ => COPY_IN_FLIGHT,
                };
                for_each_in_flight(width, group, &one, |n| progress(done + started + n)).await?;
                started += group.len() as u64;
            }
            // Data before index.
            into.sync_data(io).await.map_err(|e| Error::io(e, into.file().path.display()))?;
            let links = links.into_inner().unwrap();
            for &(c, at) in &links {
                into.link(c, at);
            }
            if let Some(fold) = fold {
                fold.linked(links.iter().map(|&(c, _)| c));
            }
            if let Some(lo) = window {
                let hi = into.published();
                if hi >= lo {
                    // This opening is the copy's own: every entry of the
                    // window is one of its links.
                    into.write_metadata(io, lo, hi, 0..u64::MAX).await.map_err(|e| e.error)?;
                }
            }
            done += chunk.len() as u64;
        }
        Ok(())
    }
}
