//! The changes of a [`Stack`]'s layer list: a snapshot pushes a new top,
//! a merge folds the top's parent into it, a switch replaces the list, and
//! compact and grow work on the top while it is closed. Each holds the
//! requests (the exclusive gate) only while the list itself changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::io::{for_each_in_flight, ImageFile, Io};
use crate::layers::ploop::header::Variant;
use crate::layers::{Format, Layer, PloopLayer};

use super::request::Fill;
use super::{owner_map, Shape, Stack, MAX_DEPTH, NOBODY};

impl Stack {
    /// Attempts at reopening the top after it was changed closed.
    const REOPEN_TRIES: u32 = 3;

    /// Snapshot, online: create `path` as a new empty ploop image and make
    /// it the top; the old top becomes a read-only lower layer, made
    /// durable and marked clean. Requests are held only while the layer
    /// list is swapped (after the ones in flight drained); returns how long
    /// that was.
    ///
    /// If closing the old top fails after the swap, the new top stays (it
    /// may hold writes already) and the error says so; the old top keeps
    /// its in-use mark, so the next open checks it.
    pub async fn push_layer<I: Io>(&self, io: &I, path: &Path) -> Result<Duration> {
        let new_top = self.prepare_top(io, path).await?;
        self.install_top(io, new_top).await
    }

    /// The first half of a snapshot: create `path` as an empty image the
    /// size of this disk, open it as a writable top and grow it ahead (so its
    /// first copy-ups do not wait for that), without touching the stack. If
    /// the caller gives up, `discard_top` removes it again.
    pub async fn prepare_top<I: Io>(&self, io: &I, path: &Path) -> Result<Arc<Layer>> {
        self.prepare_top_variant(io, path, None).await
    }

    /// The same, of the given ploop version (None: the top's), for a new
    /// top over another chain than the one served (a switch).
    pub async fn prepare_top_variant<I: Io>(&self, io: &I, path: &Path, variant: Option<Variant>) -> Result<Arc<Layer>> {
        self.check_writable()?;
        // A former top whose close failed is closed first: a snapshot over
        // a layer that cannot be made durable would freeze what a failed
        // writeback may have lost, and report it taken.
        self.retire_pending(io).await?;
        let variant = {
            let shape = self.shape.enter().await;
            shape.check_open()?;
            if shape.layers.len() >= MAX_DEPTH {
                return Err(Error::invalid(format!("stack already has the maximum of {MAX_DEPTH} layers")));
            }
            // A delta takes its chain's version, as ploop's do (its merge
            // refuses a v2 delta over a v1 one).
            variant.or(shape.top().variant()).unwrap_or(Variant::V2)
        };
        PloopLayer::create_variant(io, path, self.size(), self.cluster, variant).await?;
        let layer = match Layer::open_top(io, path, self.direct, self.links.as_deref()).await {
            Ok((layer, _)) => Arc::new(layer),
            Err(e) => {
                let _ = io.remove_file(path);
                return Err(e);
            }
        };
        // Space for the first copy-ups, before requests need it.
        if let Err(e) = layer.grow_ahead(io).await {
            discard_top(io, layer).await;
            return Err(e);
        }
        Ok(layer)
    }

    /// The second half: swap `new_top` in as the top (holding requests only
    /// for the swap), then close the old top. Returns the stall.
    pub async fn install_top<I: Io>(&self, io: &I, new_top: Arc<Layer>) -> Result<Duration> {
        match self.install_top_keeping(io, new_top).await {
            Ok(stall) => Ok(stall),
            Err((e, unused)) => {
                if let Some(top) = unused {
                    discard_top(io, top).await;
                }
                Err(e)
            }
        }
    }

    /// The same, but a top that did not go in comes back with the error,
    /// its file left: a caller that stored a descriptor naming it removes
    /// the file only once the old descriptor is back (a crash in between
    /// would leave a descriptor naming a missing top). None with the error:
    /// the top went in, and closing the old one failed.
    pub async fn install_top_keeping<I: Io>(&self, io: &I, new_top: Arc<Layer>) -> std::result::Result<Duration, (Error, Option<Arc<Layer>>)> {
        let start = io.now();
        let swapped = {
            let mut shape = self.shape.exclusive().await;
            if shape.closed || shape.layers.len() >= MAX_DEPTH {
                Err(Error::new(libc::EBUSY, "the stack was closed or filled up meanwhile"))
            } else {
                let old = shape.top().clone();
                // The map may name the top for a cluster whose entry a failed
                // BAT write undid (while another request was allocating it);
                // once the top is a lower layer that would claim data it does
                // not hold. No request is in flight now: make it exact.
                let old_index = shape.top_index();
                let stale: Vec<u64> = shape
                    .owner
                    .present()
                    .filter(|&(c, o)| o == Some(old_index as usize) && old.lookup(c, self.cluster).is_none())
                    .map(|(c, _)| c)
                    .collect();
                for c in stale {
                    let below = shape.holder_below_top(c, self.cluster).map_or(NOBODY, |i| i as u8);
                    shape.owner.set(c, below);
                }
                self.retiring.lock().unwrap().push(old.clone());
                shape.layers.push(new_top.clone());
                Ok(old)
            }
        };
        let stall = io.now().duration_since(start);
        let old = match swapped {
            Ok(old) => old,
            Err(e) => return Err((e, Some(new_top))),
        };
        self.retire(io, &old).await.map_err(|e| {
            (e.context(format_args!("snapshot taken, but closing the frozen layer {} failed", old.file().path.display())), None)
        })?;
        Ok(stall)
    }

    /// Retire again every former top whose closing failed before (a
    /// transient error): until then it keeps its exclusive lock, which a
    /// merge into it or a later change of the stack needs.
    pub async fn retire_pending<I: Io>(&self, io: &I) -> Result<()> {
        let pending = self.retiring.lock().unwrap().clone();
        for old in &pending {
            self.retire(io, old).await.map_err(|e| e.context(format_args!("closing the frozen layer {} again", old.file().path.display())))?;
        }
        Ok(())
    }

    /// Close a former top (durable, marked clean, shared lock); until this
    /// succeeded, flushes sync it too.
    async fn retire<I: Io>(&self, io: &I, old: &Arc<Layer>) -> Result<()> {
        old.close(io).await?;
        old.remove_link_log(io);
        old.demote(io)?;
        self.retiring.lock().unwrap().retain(|l| !Arc::ptr_eq(l, old));
        Ok(())
    }

    /// Merge the top's parent into the top, online: every cluster whose
    /// topmost holder is the parent is copied up into the top, exactly as a
    /// first write would copy it (claimed, copied, synced, linked), `batch`
    /// at a time; requests go on meanwhile. Then the top is flushed, so the
    /// parent may be dropped from the descriptor and then from the stack
    /// (`remove_layer`) once this returns Ok, and only then. `progress` gets
    /// (clusters done, clusters to do). Returns the clusters copied.
    /// The top must not change meanwhile (the caller runs one stack change
    /// at a time); if it does, the merge stops with an error.
    ///
    /// A cluster a request linked in the top meanwhile is not copied; but
    /// that request's BAT write may still fail, and then the entry is rolled
    /// back and the cluster is the parent's again. So the merge ends with a
    /// check while requests are held (none in flight, so no BAT write
    /// either): whatever is dirty is written, and a cluster the parent
    /// still holds for the top is copied in another pass. Only when none is
    /// left, with every entry written (and written entries are never rolled
    /// back), is the top synced and the merge done.
    pub async fn merge_parent_into_top<I: Io>(&self, io: &I, batch: usize, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        /// Passes after the first before the merge gives up: each one is
        /// needed only after a failed BAT write of a concurrent request.
        const PASSES: usize = 8;
        self.check_writable()?;
        let (top, parent, mut todo): (Arc<Layer>, u8, Vec<u64>) = {
            let shape = self.shape.enter().await;
            shape.check_open()?;
            if shape.layers.len() < 2 {
                return Err(Error::invalid("the top has no parent to merge"));
            }
            let parent = shape.top_index() - 1;
            (shape.top().clone(), parent, self.left_in_parent(&shape, parent))
        };
        let total = todo.len() as u64;
        progress(0, total);
        // `batch` workers, each taking the next cluster as soon as its last
        // one is done, so that copies stay in flight without pauses; each
        // copy enters the gate on its own, so stack changes and requests
        // interleave with the merge.
        let top = &top;
        let changed = || Error::new(libc::EBUSY, "the stack changed during the merge");
        // Clusters a bottom parent stores nothing for (a QCOW2 image's
        // unallocated ones, a raw file's holes): they read as zeros with or
        // without it, so they are not copied. A raw file above another
        // layer is not asked: its holes hide what is below.
        let empty = std::sync::Mutex::new(std::collections::HashSet::new());
        let empty = &empty;
        let copy_one = |&c: &u64| async move {
            let shape = self.shape.enter().await;
            shape.check_open()?;
            if !Arc::ptr_eq(shape.top(), top) || shape.top_index() != parent + 1 {
                return Err(changed());
            }
            // A write may have copied it up meanwhile: then nothing to do
            // (the check at the end catches its link failing).
            if shape.top().lookup(c, self.cluster).is_none() && shape.holder_below(c, self.cluster) == Some(parent as usize) {
                let nothing = match &*shape.layers[parent as usize] {
                    Layer::Qcow2(q) => !q.image().holds_data(io, c * self.cluster, self.cluster).await?,
                    Layer::Raw(r) if parent == 0 => {
                        crate::io::is_hole(io, r.file().fd(), c * self.cluster, self.cluster)
                    }
                    _ => false,
                };
                if nothing {
                    empty.lock().unwrap().insert(c);
                    return Ok(());
                }
                let window = shape.top().window_start();
                self.allocate(io, &shape, c, Fill::CopyUp).await?;
                self.finish(io, &shape, window, c..c + 1).await?;
            }
            Ok(())
        };
        let mut copied = 0;
        for pass in 0..=PASSES {
            if pass == 0 {
                for_each_in_flight(batch, &todo, copy_one, |done| progress(done, total)).await?;
            } else {
                tracing::warn!(clusters = todo.len(), "merge: clusters fell back to the parent after a failed BAT write; copying them again");
                for_each_in_flight(batch, &todo, copy_one, |_| {}).await?;
            }
            copied += todo.len() as u64;
            if crate::mutant::off("merge-recheck") {
                top.sync(io).await?;
                return Ok(copied);
            }
            todo = {
                let shape = self.shape.exclusive().await;
                shape.check_open()?;
                if !Arc::ptr_eq(shape.top(), top) || shape.top_index() != parent + 1 {
                    return Err(changed());
                }
                top.write_dirty_meta(io).await.map_err(|e| self.rolled_back(&shape, e))?;
                let empty = empty.lock().unwrap();
                self.left_in_parent(&shape, parent).into_iter().filter(|c| !empty.contains(c)).collect()
            };
            if todo.is_empty() {
                if !crate::mutant::off("merge-final-sync") {
                    top.sync(io).await?;
                }
                return Ok(copied - empty.lock().unwrap().len() as u64);
            }
        }
        Err(Error::new(
            libc::EIO,
            format!("{} clusters of the parent kept falling back to it (failing BAT writes?); the parent is kept", todo.len()),
        ))
    }

    /// Clusters the top does not hold whose topmost holder below it is
    /// `parent` (the owner map may name the top for an instant after a
    /// failed BAT write undid its entry: then the layers are asked).
    fn left_in_parent(&self, shape: &Shape, parent: u8) -> Vec<u64> {
        let top = shape.top();
        shape
            .owner
            .held()
            .filter(|&c| match shape.owner_of(c) {
                Some(i) if i == parent as usize => top.lookup(c, self.cluster).is_none(),
                Some(i) if i as u8 == shape.top_index() => {
                    top.lookup(c, self.cluster).is_none() && shape.holder_below_top(c, self.cluster) == Some(parent as usize)
                }
                _ => false,
            })
            .collect()
    }

    /// Drop a layer below the top from the stack (after a merge made it
    /// redundant). Requests are held while the list changes; the owner map
    /// is rebuilt. Returns the layer (its file may be removed once this
    /// returns: no request uses it any more).
    pub async fn remove_layer(&self, index: usize) -> Result<Arc<Layer>> {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if index + 1 >= shape.layers.len() {
            return Err(Error::invalid(format!("layer {index} is the top or does not exist; only lower layers can be dropped")));
        }
        let removed = shape.layers.remove(index);
        shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
        Ok(removed)
    }

    /// Replace the whole layer list (a switch to another snapshot): the
    /// new list's top must be a writable, open image. Requests are held
    /// while the list changes. Returns the old list; the caller closes the
    /// old top (it keeps its in-use mark until then).
    pub async fn replace_layers(&self, layers: Vec<Arc<Layer>>) -> Result<Vec<Arc<Layer>>> {
        self.check_writable()?;
        let top = layers.last().ok_or_else(|| Error::invalid("a stack needs at least one layer"))?;
        if !top.file().writable || layers.len() > MAX_DEPTH {
            return Err(Error::invalid("the new top must be writable, and the stack at most 255 layers deep"));
        }
        // Lower layers may be smaller than the disk (it grew after they were
        // frozen: only the top grows online); they show zeros past their end.
        if top.size() != self.size() || layers.iter().any(|l| l.cluster_size().is_some_and(|c| c != self.cluster)) {
            return Err(Error::invalid("the new top must have the disk's size, and every layer its cluster size"));
        }
        super::check_qcow2_at_bottom(&layers)?;
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        let owner = owner_map(&layers, self.size(), self.cluster);
        let old = std::mem::replace(&mut shape.layers, layers);
        shape.owner = owner;
        // The disk now shows other content, anywhere.
        for t in &shape.trackers {
            t.mark_all();
        }
        Ok(old)
    }

    /// Swap a lower layer for a fresh read-only opening of its file. A
    /// merge into it that failed midway left clusters linked in the file
    /// that the stack's opening does not know; the child above still holds
    /// each of them, so reads do not change, but what the stack decides
    /// about the layers below the top (a compaction's unlink of a discarded
    /// cluster, a write-zeroes that finds nothing to hide, a later merge's
    /// copy-up) must see them, as a restart would. If the file cannot be
    /// opened, the stack closes (requests fail until a restart).
    pub async fn reopen_lower<I: Io>(&self, io: &I, index: usize) -> Result<()> {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if index + 1 >= shape.layers.len() {
            return Err(Error::invalid(format!("layer {index} is the top or does not exist")));
        }
        let old = &shape.layers[index];
        let (path, format) = (old.file().path.clone(), old.format());
        self.reload_lower(io, &mut shape, index, format, self.direct, true)
            .await
            .map_err(|e| e.context(format_args!("{}: reopening a lower layer a failed merge changed", path.display())))
    }

    /// Open lower layer `index` afresh from its file (read-only; with its
    /// shared lock when `locked`) and serve that opening, with requests
    /// held by the caller. A transient failure (the change before may have
    /// failed on one) must not leave the device serving nothing: the open
    /// is tried a few times; if it still fails, the stack closes.
    pub(super) async fn reload_lower<I: Io>(&self, io: &I, shape: &mut Shape, index: usize, format: Format, direct: crate::io::Direct, locked: bool) -> Result<()> {
        let path = shape.layers[index].file().path.clone();
        let mut tries = 0;
        loop {
            tries += 1;
            let opened = if locked {
                Layer::open(io, &path, format, false, direct).await
            } else {
                Layer::open_unlocked(io, &path, format, false, direct).await
            };
            match opened {
                Ok((layer, _)) => {
                    shape.layers[index] = Arc::new(layer);
                    shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
                    return Ok(());
                }
                Err(e) if tries < Self::REOPEN_TRIES => tracing::warn!("{}: reopening a lower layer failed ({e}); trying again", path.display()),
                Err(e) => {
                    shape.closed = true;
                    return Err(e);
                }
            }
        }
    }

    /// Swap a lower layer for another opening of it and drop the layer
    /// above it (a merge of a lower delta into its parent: `merged` is the
    /// parent with the child's clusters copied in). Returns the old parent
    /// and the child.
    pub async fn replace_pair(&self, parent: usize, merged: Arc<Layer>) -> Result<(Arc<Layer>, Arc<Layer>)> {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if parent + 2 >= shape.layers.len() {
            return Err(Error::invalid(format!("layers {parent} and {} are not both below the top", parent + 1)));
        }
        let child = shape.layers.remove(parent + 1);
        let old = std::mem::replace(&mut shape.layers[parent], merged);
        shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
        Ok((old, child))
    }

    /// Give the top image's free space back to the host filesystem, online:
    /// in steps of at most `budget` moved clusters, each with requests held
    /// while the top is closed, compacted (`layers::ploop::compact`) and
    /// opened again. `progress` gets (clusters moved, clusters to move).
    pub async fn compact<I: Io>(&self, io: &I, budget: u64, progress: &dyn Fn(u64, u64)) -> Result<crate::layers::ploop::compact::Compacted> {
        self.compact_with(io, budget, false, progress, &|| true).await
    }

    /// The same; with `unknown_below`, the top is taken to lie over layers
    /// this stack does not have (an image file opened on its own that may
    /// be a delta): a discarded cluster must keep reading as zeros from the
    /// top, so none is unlinked (clusters still move, the file is still cut).
    /// When `keep_going` says no after a step, it stops there (`done`
    /// false): every step leaves the image whole, so the next run goes on.
    pub async fn compact_with<I: Io>(
        &self,
        io: &I,
        budget: u64,
        unknown_below: bool,
        progress: &dyn Fn(u64, u64),
        keep_going: &dyn Fn() -> bool,
    ) -> Result<crate::layers::ploop::compact::Compacted> {
        use crate::layers::ploop::compact::{compact_step, Compacted};
        self.check_writable()?;
        let mut total = Compacted::default();
        let mut first = true;
        loop {
            let step = self
                .with_top_closed(io, false, |io, file, lower: Vec<Arc<Layer>>| async move {
                    let lower_has = |c: u64| unknown_below || lower.iter().any(|l| l.lookup(c, self.cluster).is_some());
                    let step = compact_step(io, &file, &lower_has, budget).await;
                    (file, step)
                })
                .await?;
            if first {
                total.file_size_before = step.file_size_before;
                first = false;
            }
            total.unlinked += step.unlinked;
            total.moved += step.moved;
            progress(total.moved, total.moved + step.remaining);
            if step.done || !keep_going() {
                total.file_size_after = step.file_size_after;
                total.remaining = step.remaining;
                total.done = step.done;
                return Ok(total);
            }
        }
    }

    /// The kept record of changes may be attached (a grow ends it); a
    /// copy, a backup sending its marks or a write tracker may not.
    pub(super) fn check_no_trackers(&self, shape: &Shape) -> Result<()> {
        let kept = self.kept_record();
        let busy = shape.trackers.iter().any(|t| !kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, t)) || t.has_pending());
        if busy {
            return Err(Error::new(libc::EBUSY, "a write tracker, a copy or a backup is running: wait for it or stop it first"));
        }
        Ok(())
    }

    /// Run `work` on the top image's file while it is closed, with requests
    /// held; then open it again (also when `work` failed) and rebuild the
    /// owner map. `work` gets the top's own opening of the file (closed
    /// clean, still locked) and the layers below the top, and hands it
    /// back; the top opens again on it, so its lock is never let go: no
    /// other process can take the image meanwhile, and no new opening has
    /// to wait for the kernel to drop the lock of a closed one (an io_uring
    /// request that used a file may keep it open after our close returned,
    /// until the ring's thread enters the ring again: a compaction after a
    /// daemon restart failed on it).
    /// Only a simulated file is opened by its path again after a failed try.
    pub(super) async fn with_top_closed<'a, I, T, F, Fut>(&'a self, io: &'a I, no_trackers: bool, work: F) -> Result<T>
    where
        I: Io,
        F: FnOnce(&'a I, ImageFile, Vec<Arc<Layer>>) -> Fut,
        Fut: std::future::Future<Output = (ImageFile, Result<T>)> + 'a,
    {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if no_trackers {
            self.check_no_trackers(&shape)?;
        }
        self.retire_pending(io).await?;
        if shape.top().format() != Format::Ploop {
            // A raw top (ploop's raw mode, or left by a merge into a raw
            // base): no table to compact (a grow does not come here).
            return Err(Error::unsupported(format!(
                "{}: the top is a raw file (ploop's raw mode), not a ploop image: it has no table to compact",
                shape.top().file().path.display()
            )));
        }
        let top = shape.layers.pop().expect("a stack is never empty");
        let path = top.file().path.clone();
        if let Err(e) = top.close(io).await {
            shape.layers.push(top);
            return Err(e.context("closing the top"));
        }
        let top = match Arc::try_unwrap(top) {
            Ok(top) => top,
            Err(top) => {
                let _ = top.reopen_in_use(io).await;
                shape.layers.push(top);
                return Err(Error::new(libc::EBUSY, "the top is in use elsewhere in the daemon; try again"));
            }
        };
        let (file, result) = work(io, top.into_file(), shape.layers.clone()).await;
        // A try that fails drops the file it was given: the next one opens
        // on another descriptor of the kept opening, never by its path.
        let spare = file.dup();
        let mut kept = Some(file);
        // A transient failure must not leave the device without its top:
        // try the reopen a few times before giving up.
        let mut tries = 0;
        // An I/O error of the work (a grow or compaction through its own
        // opening) or a failed reopen's write of its in-use mark may have
        // been a failed writeback of this file: the reopened top remembers
        // it as its own, whatever the retry's sync then said.
        let mut eio = matches!(&result, Err(e) if e.errno() == libc::EIO);
        loop {
            tries += 1;
            let reopened = match kept.take().or_else(|| spare.as_ref().and_then(|f| f.dup())) {
                Some(file) => Layer::open_file_linked(io, file, Format::Ploop, self.direct, self.links.as_deref()).await,
                None => Layer::open_top(io, &path, self.direct, self.links.as_deref()).await,
            };
            match reopened {
                Ok((layer, _)) => {
                    if eio {
                        layer.poison_syncs();
                    }
                    shape.layers.push(Arc::new(layer));
                    shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
                    if result.is_ok() {
                        self.end_kept_record(&mut shape);
                    }
                    return result;
                }
                Err(e) if tries < Self::REOPEN_TRIES => {
                    // Its in-use mark's write or sync failed (a read's
                    // failure loses nothing).
                    eio |= e.kind() == crate::error::ErrorKind::WritebackFailed;
                    tracing::warn!("{}: reopening the top failed ({e}); trying again", path.display())
                }
                Err(e) => {
                    // Nothing may be served without the top: every request
                    // fails from now on (reads too), until a restart.
                    shape.closed = true;
                    shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
                    return Err(e.context(format_args!("{}: reopening the top", path.display())));
                }
            }
        }
    }

    /// Offline only (no request is served): fold the top into its parent.
    /// The top is closed clean and the parent's read-only opening dropped,
    /// so that `work` (given the top's and the parent's paths) may open the
    /// top itself and copy its clusters into the parent's file under the
    /// parent's exclusive lock. Then the parent's file, opened writable,
    /// replaces both as the top. If `work` fails, both are opened again as
    /// they were. The kept record of changes goes into the new top on close.
    pub async fn fold_top<'a, I, T, F, Fut>(&'a self, io: &'a I, work: F) -> Result<T>
    where
        I: Io,
        F: FnOnce(&'a I, PathBuf, PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        if !self.offline {
            return Err(Error::invalid("folding the top into its parent needs a stack no request is served from (offline)"));
        }
        self.check_writable()?;
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if !shape.trackers.is_empty() {
            return Err(Error::new(libc::EBUSY, "a write tracker is attached: the top cannot be folded"));
        }
        self.retire_pending(io).await?;
        let n = shape.layers.len();
        if n < 2 || shape.layers[n - 1].format() != Format::Ploop || shape.layers[n - 2].format() != Format::Ploop {
            return Err(Error::invalid("folding needs a ploop top over a ploop parent"));
        }
        if shape.layers[n - 2..].iter().any(|l| Arc::strong_count(l) != 1) {
            return Err(Error::new(libc::EBUSY, "the top or its parent is in use elsewhere; try again"));
        }
        let top = shape.layers.pop().expect("two layers");
        if let Err(e) = top.close(io).await {
            shape.layers.push(top);
            return Err(e.context("closing the top"));
        }
        let parent = shape.layers.pop().expect("two layers");
        let (top_path, parent_path) = (top.file().path.clone(), parent.file().path.clone());
        drop((top, parent));
        let result = work(io, top_path.clone(), parent_path.clone()).await;
        let reopened: Result<Vec<Arc<Layer>>> = async {
            if result.is_ok() {
                let (p, _) = Layer::open(io, &parent_path, Format::Ploop, true, self.direct).await?;
                Ok(vec![Arc::new(p)])
            } else {
                let (p, _) = Layer::open(io, &parent_path, Format::Ploop, false, self.direct).await?;
                let (t, _) = Layer::open(io, &top_path, Format::Ploop, true, self.direct).await?;
                Ok(vec![Arc::new(p), Arc::new(t)])
            }
        }
        .await;
        match reopened {
            Ok(layers) => {
                shape.layers.extend(layers);
                shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
                result
            }
            Err(e) => {
                // Nothing is served offline; the tool closes the stack and
                // the next open finishes the merge the descriptor records.
                shape.closed = true;
                Err(result.err().unwrap_or(e))
            }
        }
    }

    /// After the disk grew (requests still held): the kept record of
    /// changes, the one tracker a grow allows, ends. An incremental stream
    /// of the grown disk would not apply to the older backups (a receiver
    /// takes a stream of another size for another disk's), so the next
    /// backup must be a full one, and an incremental is refused for want
    /// of a record, saying so.
    pub(super) fn end_kept_record(&self, shape: &mut Shape) {
        let mut keep = self.keep.lock().unwrap();
        let Some((old, _)) = keep.as_ref() else { return };
        if old.disk_size() == self.size() {
            return;
        }
        shape.trackers.retain(|t| !Arc::ptr_eq(t, old));
        *keep = None;
    }
}

impl Stack {
    /// Stop serving without closing: every request fails from now on, and
    /// the images keep their in-use marks, so the next open checks them.
    /// For a change whose outcome on disk is unknown.
    pub async fn stop_serving(&self) {
        self.shape.exclusive().await.closed = true;
    }
}

/// Close and remove a prepared top that never served.
pub async fn discard_top<I: Io>(io: &I, layer: Arc<Layer>) {
    let path = layer.file().path.clone();
    let _ = layer.close(io).await;
    layer.remove_link_log(io);
    drop(layer);
    let _ = io.remove_file(&path);
}
