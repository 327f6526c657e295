//! Snapshot operations on a disk directory, online (on the stack a device
//! serves) or offline (on a stack opened for the operation): snapshot,
//! merge, delete and switch, as ploop defines them.
//!
//! Crash safety: the descriptor names the files of the disk, and a stored
//! descriptor must always describe a disk that reads the same data as the
//! device showed. So each operation first prepares the files the new
//! descriptor will name (a new empty top; a merged layer that holds all of
//! its child's clusters, durably), then stores the new descriptor
//! atomically, and only then changes the stack and removes files the new
//! descriptor no longer names. A crash at any point leaves either the old
//! descriptor with files that still read the same, or the new one with the
//! files it needs; at worst a file nobody names is left behind.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::descriptor::{ImageType, MAX_SNAPSHOTS};
use super::{Disk, Guid, Image, Place, Shot, Temporary, NONE_GUID, TOP_GUID};
use crate::crash_point::crash_point;
use crate::error::{Error, Result};
use crate::io::{Direct, Io};
use crate::layers::{Format, Layer};
use crate::stack::{discard_top, Stack};

mod switch;
pub use switch::{switch, Switched};

/// Clusters copied at once by a merge.
const MERGE_BATCH: usize = 8;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Snapshotted {
    /// The snapshot: it names the delta that was the top.
    pub guid: Guid,
    /// The new, empty top delta.
    pub file: PathBuf,
    /// How long requests were held.
    pub stall: Duration,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Merged {
    /// The delta whose data went into its parent (its GUID survives).
    pub child: Guid,
    /// The parent, whose GUID is gone.
    pub parent: Guid,
    pub clusters: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Deleted {
    /// It had no child: its file is gone.
    Removed,
    /// It had one child, merged into it (its GUID is gone).
    Merged(Merged),
    /// It has several children: marked temporary, as ploop does.
    MarkedTemporary,
}

/// Re-read the descriptor under the lock and make sure it still describes
/// the stack (another tool may have changed it).
/// When the disk carries a lock its caller took for the whole session
/// (`Disk::load_locked`: offline commands, a device's life), that lock is
/// used: the caller opened the stack from the descriptor it read under it.
async fn refresh<I: Io>(io: &I, disk: &mut Disk, stack: &Stack) -> Result<Option<super::DiskLock>> {
    let lock = if disk.holds_lock() {
        let changes = disk.lock_in(io)?; // a device's lock: the `.lck` flock
        disk.reload_in(io).await.map(|()| changes)?
    } else {
        // The lock lives on the base delta, and which file that is can
        // change (a merge into the base keeps the child's file): find it
        // from the descriptor on disk, never from a copy in memory that may
        // predate a merge, and make sure it did not change before the lock
        // was held.
        let mut lock = None;
        for _ in 0..3 {
            let seen = Disk::load_in(io, &disk.dir).await?;
            let held = seen.lock_fresh(io)?;
            *disk = Disk::load_in(io, &disk.dir).await?;
            if disk.lock_path()? == seen.lock_path()? {
                lock = Some(held);
                break;
            }
        }
        let changing = || Error::new(libc::ESTALE, format!("{}: the base delta keeps changing under us", disk.xml_path().display()));
        Some(lock.ok_or_else(changing)?)
    };
    // A former top a transient error left open for writing is closed
    // first: operations relock the deltas below the top.
    stack.retire_pending(io).await?;
    let want: Vec<PathBuf> = disk.layers(None)?.into_iter().map(|s| s.path).collect();
    let have = stack.paths_now().await;
    if want != have {
        return Err(Error::new(
            libc::ESTALE,
            format!(
                "{}: the descriptor's chain ({}) is not what the device serves ({}); was the disk changed by another tool?",
                disk.xml_path().display(),
                names(&want),
                names(&have)
            ),
        ));
    }
    Ok(lock)
}

fn names(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().join(" <- ")
}

fn no_such(disk: &Disk, guid: Guid) -> Error {
    Error::new(libc::ENOENT, format!("{}: no snapshot {guid}", disk.xml_path().display()))
}

/// Take a snapshot: the top becomes the snapshot `guid` (random if None),
/// frozen, and a new empty top takes the writes.
pub async fn snapshot<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, guid: Option<Guid>) -> Result<Snapshotted> {
    let _lock = refresh(io, disk, stack).await?;
    let snap = guid.unwrap_or_else(Guid::random);
    if snap == TOP_GUID || snap == NONE_GUID || disk.desc.shot(snap).is_some() {
        return Err(Error::new(libc::EEXIST, format!("{snap} is already used in {}", disk.xml_path().display())));
    }
    if disk.desc.shots.len() > MAX_SNAPSHOTS {
        return Err(Error::new(libc::EMLINK, format!("ploop allows at most {MAX_SNAPSHOTS} snapshots per disk")));
    }
    // The top is closed as a lower layer (its header written): it must be
    // the disk's own; the new top is made in the disk directory.
    let top_img = disk.desc.image(disk.desc.top).cloned().ok_or_else(|| no_such(disk, disk.desc.top))?;
    disk.writable_path_in(io, &top_img, "freeze (close) the top")?;
    let file = disk.new_delta_name();
    let path = disk.dir.join(&file);
    let new_top = stack.prepare_top(io, &path).await?;
    let old_top = disk.desc.top;
    let mut next = disk.clone();
    let d = &mut next.desc;
    // The top keeps ploop's fixed GUID: the frozen delta takes the new one.
    d.images.iter_mut().filter(|i| i.guid == old_top).for_each(|i| i.guid = snap);
    for s in d.shots.iter_mut() {
        if s.guid == old_top {
            s.guid = snap;
        }
        if s.parent == old_top {
            s.parent = snap;
        }
    }
    let kind = d.delta_kind();
    d.images.push(Image { guid: TOP_GUID, kind, file });
    d.shots.push(Shot { guid: TOP_GUID, parent: snap, temporary: Temporary::No });
    d.top = TOP_GUID;
    if crate::mutant::off("store-before-swap") {
        // The broken order: writes land in a top no stored descriptor names.
        let stall = stack.install_top(io, new_top).await?;
        next.store(io).await?;
        *disk = next;
        return Ok(Snapshotted { guid: snap, file: path, stall });
    }
    if let Err(e) = next.replace(io, disk).await {
        drop_new_top(io, stack, new_top, &e).await;
        return Err(e);
    }
    match stack.install_top_keeping(io, new_top).await {
        Ok(stall) => {
            *disk = next;
            Ok(Snapshotted { guid: snap, file: path, stall })
        }
        Err((e, None)) => {
            // Swapped, but the old top did not close: the snapshot stands.
            *disk = next;
            Err(e)
        }
        Err((e, Some(unused))) => {
            // Not swapped: the old descriptor describes the disk again.
            put_back(io, stack, disk, &next, unused).await;
            Err(e)
        }
    }
}

/// A new top that never served, after the descriptor naming it was
/// stored: store `disk`'s descriptor again in place of `next`, and only
/// then remove the new top's file. If the old descriptor cannot be put
/// back, the one naming the new top may be on disk: the file stays (empty:
/// either descriptor shows the same data), so the one on disk never names
/// a missing file, and the stack stops serving, as after an uncertain
/// store (see `drop_new_top`).
async fn put_back<I: Io>(io: &I, stack: &Stack, disk: &Disk, next: &Disk, unused: Arc<Layer>) {
    match disk.replace(io, next).await {
        Ok(()) => discard_top(io, unused).await,
        Err(e) => {
            tracing::warn!("{}: putting the descriptor back after a failed swap: {e}; the unused new top stays", disk.xml_path().display());
            keep_unused_top(io, stack, unused).await;
        }
    }
}

/// An unused new top a descriptor on disk may name: closed and kept (its
/// empty link log goes), and the stack stops serving, since by that
/// descriptor the old top may be a snapshot, or dropped.
async fn keep_unused_top<I: Io>(io: &I, stack: &Stack, unused: Arc<Layer>) {
    stack.stop_serving().await;
    let _ = unused.close(io).await;
    unused.remove_link_log(io);
}

/// Merge the delta `child` (the top when None) into its parent, as ploop's
/// `snapshot-merge`: the parent's GUID disappears, the child's survives and
/// its parent becomes the grandparent. The top's parent is copied up into
/// the top while requests go on; a lower delta is copied into its parent's
/// file. `progress` gets (clusters done, clusters to do).
pub async fn merge<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, child: Option<Guid>, progress: &dyn Fn(u64, u64)) -> Result<Merged> {
    let _lock = refresh(io, disk, stack).await?;
    merge_locked(io, stack, disk, child, progress).await
}

async fn merge_locked<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, child: Option<Guid>, progress: &dyn Fn(u64, u64)) -> Result<Merged> {
    let child = child.unwrap_or(disk.desc.top);
    let cshot = disk.desc.shot(child).cloned().ok_or_else(|| no_such(disk, child))?;
    let parent = cshot.parent;
    if parent == NONE_GUID {
        return Err(Error::invalid(format!("{child} is the base delta: it has no parent to merge into")));
    }
    let pshot = disk.desc.shot(parent).cloned().ok_or_else(|| no_such(disk, parent))?;
    if disk.desc.children(parent).len() != 1 {
        return Err(Error::new(
            libc::EBUSY,
            format!("{parent} has more than one child (other snapshots branch from it); ploop refuses to merge into it too"),
        ));
    }
    let pimg = disk.desc.image(parent).cloned().ok_or_else(|| no_such(disk, parent))?;
    let cimg = disk.desc.image(child).cloned().ok_or_else(|| no_such(disk, child))?;
    // A QCOW2 base is never written: only the top takes it in, by copying
    // it up (refused here, before anything is marked temporary).
    let qcow2_parent = pimg.kind == ImageType::Qcow2;
    if qcow2_parent && child != disk.desc.top {
        return Err(Error::invalid(format!(
            "{parent} is a QCOW2 image, which is never written: only the top takes it in; merge the deltas above it into the top first"
        )));
    }
    // A merge writes into one of the two and removes the other (or its
    // name): both must be the disk's own files. A parent outside the disk
    // directory (a template under a clone) is merged only into the top,
    // by copying it up: it is read, dropped from the descriptor, and left.
    // A QCOW2 base is kept like a shared delta, wherever it lies: read,
    // dropped from the descriptor, its file left alone.
    let shared_parent = qcow2_parent || disk.place_in(io, &pimg) != Place::Inside;
    let ppath = if shared_parent && child == disk.desc.top {
        disk.file_path(&pimg)
    } else {
        disk.writable_path_in(io, &pimg, "merge into")?
    };
    let cpath = disk.writable_path_in(io, &cimg, "merge and remove")?;
    let layers = stack.layers_now().await;
    let index = |p: &PathBuf| layers.iter().position(|l| &l.file().path == p);
    let (pi, ci) = match (index(&ppath), index(&cpath)) {
        (Some(pi), Some(ci)) if ci == pi + 1 => (pi, ci),
        (None, None) => return merge_off_chain(io, stack, disk, (child, &cimg), (parent, &pimg, &pshot), progress).await,
        _ => return Err(Error::invalid(format!("{child} and its parent {parent} are not next to each other in the served chain"))),
    };
    let in_use = |e: Error| Error::new(e.errno(), format!("{}: in use by another process (a mounted snapshot?): {e}", ppath.display()));
    let mut next = disk.clone();
    let d = &mut next.desc;
    d.images.retain(|i| i.guid != parent);
    d.shots.retain(|s| s.guid != parent);
    d.shots.iter_mut().filter(|s| s.guid == child).for_each(|s| s.parent = pshot.parent);
    let clusters;
    let top = ci + 1 == layers.len();
    let same_kind = |a: &Layer, b: &Layer| a.format() == Format::Ploop && b.format() == Format::Ploop && a.variant() == b.variant();
    // ploop 9's reverse merge stopped after its swap: the parent's GUID
    // names the small delta, the top is the old base. Copying the parent
    // up costs the delta and keeps the base's file, as ploop's resume does.
    let swapped = pshot.temporary == Temporary::ZeroSwap;
    // The top over a raw base goes into it in place, as ploop's merge
    // does; offline as a lower delta goes, online as a fold. A raw base
    // the disk outgrew online (only the top grows) is extended first, as
    // ploop's merge extends it.
    let raw_in_place = layers[pi].format() == Format::Raw && layers[ci].format() == Format::Ploop && layers[pi].size() <= layers[ci].size();
    let top_over_own_parent = top && !shared_parent && !swapped;
    let fold = top_over_own_parent && (same_kind(&layers[pi], &layers[ci]) || (raw_in_place && !stack.is_offline()));
    let into_raw = top_over_own_parent && raw_in_place && stack.is_offline();
    if fold && stack.is_offline() {
        // Offline, as ploop's offline merge: the top is copied into its
        // parent's file, which then serves as the top under the top's
        // GUID. The cost is the top's clusters, and the parent keeps its
        // name. The parent is marked temporary first: a crash while its
        // content changes leaves a merge the next open finishes (the top
        // over it reads the same meanwhile).
        if pshot.temporary == Temporary::No {
            mark_temporary(io, disk, parent).await?;
        }
        let direct = if layers[ci].file().direct { Direct::Auto } else { Direct::Off };
        drop(layers);
        let format = disk.desc.format_of(&pimg);
        clusters = stack
            .fold_top(io, |io, top_path, parent_path| async move {
                let (top, _) = Layer::open(io, &top_path, Format::Ploop, false, direct).await?;
                let (_, n) = copy_into_parent(io, &top, &parent_path, format, true, stack, progress).await?;
                Ok(n)
            })
            .await?;
        // The top's GUID now names the parent's file.
        next.desc.images.iter_mut().filter(|i| i.guid == child).for_each(|i| i.file = pimg.file.clone());
        next.replace(io, disk).await?;
        *disk = next;
        remove_file(io, &cpath);
    } else if fold {
        // Online, as ploop's forward merge: the top is copied into its
        // parent's file while requests go on, and that file then serves as
        // the top under the top's GUID. The cost is the top's clusters
        // (and those written again meanwhile), and the parent keeps its
        // name. Marked temporary first, as offline.
        layers[pi].relock(io, true).map_err(in_use)?;
        if pshot.temporary == Temporary::No {
            if let Err(e) = mark_temporary(io, disk, parent).await {
                let _ = layers[pi].relock(io, false);
                return Err(e);
            }
        }
        crash_point("merge-marked");
        let grown = layers[ci].size() > layers[pi].size();
        if grown {
            if let Err(e) = stack.grow_lower(io, pi, layers[ci].size()).await {
                let _ = layers[pi].relock(io, false);
                drop(layers);
                relock_lower(io, stack, pi).await;
                return Err(e);
            }
        }
        let direct = if layers[ci].file().direct { Direct::Auto } else { Direct::Off };
        let into = match Layer::open_unlocked(io, &ppath, layers[pi].format(), true, direct).await {
            Ok((l, _)) => Arc::new(l),
            Err(e) => {
                let _ = layers[pi].relock(io, false);
                if grown {
                    // The stack reads the grown parent through an opening
                    // without a lock, and the old one goes now.
                    drop(layers);
                    relock_lower(io, stack, pi).await;
                }
                return Err(e.context("opening the parent to merge into"));
            }
        };
        // The parent's own record of changes (from when it was a top) is
        // not this disk's any more: the stack keeps the current one.
        into.take_saved_bitmaps();
        next.desc.images.iter_mut().filter(|i| i.guid == child).for_each(|i| i.file = pimg.file.clone());
        let folded = {
            let (n, d) = (&next, &mut *disk);
            let commit = move || async move {
                store_new(io, n, d).await?;
                crash_point("merge-stored");
                Ok(())
            };
            stack.fold_top_online(io, into.clone(), progress, commit).await
        };
        clusters = match folded {
            Ok(n) => n,
            Err(e) => {
                // Left half merged (the descriptor says so), closed clean.
                let _ = into.close(io).await;
                drop(into);
                let _ = layers[pi].relock(io, false);
                drop(layers);
                if let Err(re) = stack.reopen_lower(io, pi).await {
                    tracing::error!("{re}");
                }
                return Err(e);
            }
        };
        *disk = next;
        // The stack dropped the parent's opening and the old top; once these
        // go (unlocked first: `Layer::unlock`), the parent takes the lock.
        layers[pi].unlock(io);
        drop(layers);
        if let Err(e) = into.relock(io, true) {
            tracing::warn!("{}: locking the merged top: {e}", ppath.display());
        }
        crash_point("merge-swapped");
        remove_file(io, &cpath);
    } else if top && !into_raw {
        // The top: copy the parent up into it (the two are of another
        // format or version, the parent is shared: other disks read it
        // too, so it is neither locked for us alone nor removed; or ploop
        // swapped the two, and the parent is the small one).
        if !shared_parent {
            layers[pi].relock(io, true).map_err(in_use)?;
        }
        clusters = match stack.merge_parent_into_top(io, MERGE_BATCH, progress).await {
            Ok(n) => n,
            Err(e) => {
                if !shared_parent {
                    let _ = layers[pi].relock(io, false);
                }
                return Err(e);
            }
        };
        if layers[pi].format() == Format::Raw {
            // The raw base is gone: every file left is a ploop image, and
            // the disk leaves ploop's raw mode (its type names them all).
            next.desc.images.iter_mut().filter(|i| i.kind == ImageType::Plain).for_each(|i| i.kind = ImageType::Compressed);
        }
        next.replace(io, disk).await?;
        *disk = next;
        let removed = stack.remove_layer(pi).await?;
        drop(layers);
        drop(removed);
        if !shared_parent {
            remove_file(io, &ppath);
        }
    } else {
        // A lower delta, or the top `into_raw`: copy it into its parent's
        // file.
        layers[pi].relock(io, true).map_err(in_use)?;
        if let Err(e) = layers[ci].relock(io, true) {
            let _ = layers[pi].relock(io, false);
            return Err(in_use(e));
        }
        let unlock = || {
            let _ = layers[pi].relock(io, false);
            let _ = layers[ci].relock(io, false);
        };
        // The parent's own content changes from the first copied cluster
        // on: mark it temporary first, as ploop does, so that a crash
        // leaves a snapshot known to be half merged (and merged again on
        // the next open), never one that silently shows other data.
        if pshot.temporary == Temporary::No {
            if let Err(e) = mark_temporary(io, disk, parent).await {
                unlock();
                return Err(e);
            }
        }
        let growable = matches!(layers[pi].format(), Format::Ploop | Format::Raw);
        if layers[ci].format() == Format::Ploop && growable && layers[ci].size() > layers[pi].size() {
            if let Err(e) = stack.grow_lower(io, pi, layers[ci].size()).await {
                unlock();
                drop(layers);
                relock_lower(io, stack, pi).await;
                return Err(e);
            }
        }
        let merged = match copy_into_parent(io, &layers[ci], &ppath, disk.desc.format_of(&pimg), false, stack, progress).await {
            Ok(m) => m,
            Err(e) => {
                unlock();
                // The parent's file may hold clusters the stack's opening
                // of it does not know: open it afresh.
                drop(layers);
                if let Err(re) = stack.reopen_lower(io, pi).await {
                    tracing::error!("{re}");
                }
                return Err(e);
            }
        };
        clusters = merged.1;
        // The child's GUID now names the parent's file.
        next.desc.images.iter_mut().filter(|i| i.guid == child).for_each(|i| i.file = pimg.file.clone());
        if let Err(e) = next.replace(io, disk).await {
            unlock();
            // As after a failed copy: the parent's file holds clusters the
            // stack's opening of it does not know.
            drop((layers, merged));
            relock_lower(io, stack, pi).await;
            return Err(e);
        }
        *disk = next;
        if top {
            // The raw file is the top now: it takes the lock once the old openings go.
            let direct = if layers[ci].file().direct { Direct::Auto } else { Direct::Off };
            let (raw, _) = Layer::open_unlocked(io, &ppath, Format::Raw, true, direct).await?;
            let raw = Arc::new(raw);
            let old = stack.replace_layers(layers[..pi].iter().cloned().chain([raw.clone()]).collect()).await?;
            layers[pi].unlock(io);
            drop((layers, old, merged));
            if let Err(e) = raw.relock(io, true) {
                tracing::warn!("{}: locking the merged top: {e}", ppath.display());
            }
        } else {
            let (old_parent, old_child) = stack.replace_pair(pi, merged.0.clone()).await?;
            let _ = old_parent.relock(io, false); // shared: the merged one's lock never waits on it
            drop(layers);
            drop((old_parent, old_child));
            merged.0.relock(io, false)?;
        }
        remove_file(io, &cpath);
    }
    Ok(Merged { child, parent, clusters })
}

/// After a failed grow of lower layer `index`: the stack may read it
/// through an opening made without a lock (the caller's old opening held
/// it, and is gone now); open it afresh, locked.
async fn relock_lower<I: Io>(io: &I, stack: &Stack, index: usize) {
    if let Err(e) = stack.reopen_lower(io, index).await {
        tracing::error!("{e}");
    }
}

/// Store `next` in place of `disk`'s descriptor, for a change after which
/// only the files `next` names take writes: if the old descriptor could not
/// be put back either, storing `next` is tried once more, and only when
/// that fails too is the outcome uncertain.
async fn store_new<I: Io>(io: &I, next: &Disk, disk: &mut Disk) -> Result<()> {
    match next.replace(io, disk).await {
        Err(e) if e.kind() == crate::error::ErrorKind::DescriptorUncertain => match next.store(io).await {
            Ok(()) => Ok(()),
            Err(again) => Err(again.context(format_args!("{e}")).of_kind(crate::error::ErrorKind::DescriptorUncertain)),
        },
        other => other,
    }
}

/// Store `disk`'s descriptor with snapshot `guid` marked temporary: half
/// merged from now on, so a crash leaves a merge the next open finishes.
async fn mark_temporary<I: Io>(io: &I, disk: &mut Disk, guid: Guid) -> Result<()> {
    let mut marked = disk.clone();
    marked.desc.shots.iter_mut().filter(|s| s.guid == guid).for_each(|s| s.temporary = Temporary::Temporary);
    marked.replace(io, disk).await?;
    *disk = marked;
    Ok(())
}

/// Finish what a crash interrupted: a temporary snapshot in the served
/// chain with exactly one child was half merged into (a lower merge, or a
/// delete); merge its child into it again, as ploop merges unused
/// temporary snapshots on the next mount. Returns what was merged.
pub async fn finish_merges<I: Io>(io: &I, stack: &Stack, disk: &mut Disk) -> Result<Vec<Merged>> {
    let _lock = refresh(io, disk, stack).await?;
    let mut done = vec![];
    loop {
        let chain: Vec<Guid> = disk.desc.chain(disk.desc.top)?.iter().map(|i| i.guid).collect();
        let pending = chain.iter().copied().find(|g| {
            disk.desc.shot(*g).is_some_and(|s| s.temporary != Temporary::No) && disk.desc.children(*g).len() == 1 && *g != disk.desc.top
        });
        let Some(parent) = pending else { return Ok(done) };
        let child = disk.desc.children(parent)[0];
        tracing::warn!("{}: {parent} is a temporary snapshot left half merged; merging {child} into it again", disk.xml_path().display());
        done.push(merge_locked(io, stack, disk, Some(child), &|_, _| {}).await?);
    }
}

/// Merge two deltas no device serves (a branch left by a switch): the
/// child copied into its parent's file, both held exclusively meanwhile.
async fn merge_off_chain<I: Io>(
    io: &I,
    stack: &Stack,
    disk: &mut Disk,
    (child, cimg): (Guid, &Image),
    (parent, pimg, pshot): (Guid, &Image, &Shot),
    progress: &dyn Fn(u64, u64),
) -> Result<Merged> {
    let (cpath, ppath) = (disk.file_path(cimg), disk.file_path(pimg));
    let direct = if stack.layers_now().await[0].file().direct { Direct::Auto } else { Direct::Off };
    let (child_layer, _) = Layer::open(io, &cpath, disk.desc.format_of(cimg), false, direct).await?;
    child_layer
        .relock(io, true)
        .map_err(|e| Error::new(e.errno(), format!("{}: in use by another process (a mounted snapshot?): {e}", cpath.display())))?;
    // A state ploop's reverse merge left (Zero, ZeroSwap) is kept: it says
    // more than ours.
    if pshot.temporary == Temporary::No {
        mark_temporary(io, disk, parent).await?;
    }
    let (_, clusters) = copy_into_parent(io, &child_layer, &ppath, disk.desc.format_of(pimg), true, stack, progress).await?;
    let mut next = disk.clone();
    let d = &mut next.desc;
    d.images.retain(|i| i.guid != parent);
    d.shots.retain(|s| s.guid != parent);
    d.shots.iter_mut().filter(|s| s.guid == child).for_each(|s| s.parent = pshot.parent);
    d.images.iter_mut().filter(|i| i.guid == child).for_each(|i| i.file = pimg.file.clone());
    next.replace(io, disk).await?;
    *disk = next;
    drop(child_layer);
    remove_file(io, &cpath);
    Ok(Merged { child, parent, clusters })
}

/// Copy every cluster `child` holds into a writable opening of its parent's
/// file (unlocked when the stack holds that file's lock and keeps reading
/// it meanwhile): data first, synced, then the BAT entries, batch by batch;
/// the parent is closed clean at the end. Returns the parent as a layer
/// (read-only from now on) and the clusters copied.
async fn copy_into_parent<I: Io>(
    io: &I,
    child: &Layer,
    parent_path: &std::path::Path,
    format: Format,
    lock: bool,
    stack: &Stack,
    progress: &dyn Fn(u64, u64),
) -> Result<(Arc<Layer>, u64)> {
    let direct = if child.file().direct { Direct::Auto } else { Direct::Off };
    // A child grown online (only the top grows) is larger than its parent:
    // the parent grows first, or the clusters past its end had nowhere to go.
    // A parent the stack reads (unlocked here) was grown by the caller,
    // through the stack (`Stack::grow_lower`).
    if format == crate::layers::Format::Ploop && child.size() > crate::layers::ploop::load::image_size(io, parent_path).await? {
        if !lock {
            return Err(Error::invalid("a parent the stack reads must be grown through the stack before a merge into it"));
        }
        let file = crate::io::open_image_file_in(io, parent_path, true, direct)?;
        crate::layers::lock(io, &file, true)?;
        crate::layers::ploop::resize::resize_file(io, &file, child.size(), true)
            .await
            .map_err(|e| e.context("growing the parent to its child's size"))?;
    }
    let (parent, _) = if lock {
        Layer::open(io, parent_path, format, true, direct).await
    } else {
        Layer::open_unlocked(io, parent_path, format, true, direct).await
    }
    .map_err(|e| e.context("opening the parent to merge into"))?;
    match copy_clusters(io, child, &parent, stack, progress).await {
        Ok(total) => {
            parent.close(io).await?;
            Ok((Arc::new(parent), total))
        }
        Err(e) => {
            // Left half merged (the descriptor says so), but closed: a
            // clean stop leaves no delta marked in use, and what it
            // reserved past its links is a leak the next open releases.
            let _ = parent.close(io).await;
            Err(e)
        }
    }
}

/// The copying part of [`copy_into_parent`]: every cluster the child
/// holds, data synced before its entries. Returns the clusters copied.
async fn copy_clusters<I: Io>(io: &I, child: &Layer, parent: &Layer, stack: &Stack, progress: &dyn Fn(u64, u64)) -> Result<u64> {
    let cluster = stack.cluster_size();
    let todo: Vec<u64> = child.allocated(cluster, stack.size().div_ceil(cluster)).collect();
    let total = todo.len() as u64;
    progress(0, total);
    stack.copy_clusters(io, child, parent, &todo, &|n| progress(n, total)).await?;
    Ok(total)
}

/// Delete the snapshot `guid`, as ploop's `snapshot-delete`: refused for
/// the top; a delta with no child is removed, one with one child is merged
/// into it, one with several is marked temporary.
pub async fn delete<I: Io>(io: &I, stack: &Stack, disk: &mut Disk, guid: Guid, progress: &dyn Fn(u64, u64)) -> Result<Deleted> {
    let _lock = refresh(io, disk, stack).await?;
    if guid == disk.desc.top {
        return Err(Error::invalid(format!("{guid} is the top delta: it cannot be deleted (merge or switch instead)")));
    }
    let shot = disk.desc.shot(guid).cloned().ok_or_else(|| no_such(disk, guid))?;
    let children = disk.desc.children(guid);
    match children.len() {
        0 => {
            let img = disk.desc.image(guid).cloned().ok_or_else(|| no_such(disk, guid))?;
            let path = disk.writable_path_in(io, &img, "remove")?;
            // Not in the served chain (only the top has no child there);
            // refuse if something else reads it.
            let probe = io.open(&path, &crate::io::OpenHow::read()).map_err(|e| Error::io(e, path.display()))?;
            if io.flock(probe.fd(), crate::io::LockHow::Exclusive).is_err() {
                return Err(Error::new(libc::EBUSY, format!("{}: in use by another process (a mounted snapshot?)", path.display())));
            }
            let mut next = disk.clone();
            next.desc.images.retain(|i| i.guid != guid);
            next.desc.shots.retain(|s| s.guid != guid);
            next.replace(io, disk).await?;
            *disk = next;
            drop(probe);
            remove_file(io, &path);
            let _ = shot;
            Ok(Deleted::Removed)
        }
        1 => merge_locked(io, stack, disk, Some(children[0]), progress).await.map(Deleted::Merged),
        _ => {
            // Merged into its last child once the others go: refused now if that would be.
            disk.writable_path_in(io, disk.desc.image(guid).ok_or_else(|| no_such(disk, guid))?, "delete (merge into its last child later)")?;
            let mut next = disk.clone();
            next.desc.shots.iter_mut().filter(|s| s.guid == guid).for_each(|s| s.temporary = Temporary::Temporary);
            next.replace(io, disk).await?;
            *disk = next;
            Ok(Deleted::MarkedTemporary)
        }
    }
}

/// Undo a prepared top whose descriptor did not take: removed, unless the
/// descriptor on disk may name it. Then it stays (empty: under either
/// descriptor the disk reads the same), and the stack stops serving: the
/// descriptor on disk may call the old top a snapshot (or drop it), and a
/// write into it now would change a snapshot (or vanish at the next
/// start). Requests fail until a restart opens what the disk says.
async fn drop_new_top<I: Io>(io: &I, stack: &Stack, new_top: Arc<Layer>, e: &Error) {
    if e.kind() == crate::error::ErrorKind::DescriptorUncertain {
        keep_unused_top(io, stack, new_top).await;
    } else {
        discard_top(io, new_top).await;
    }
}

fn remove_file<I: Io>(io: &I, path: &std::path::Path) {
    if let Err(e) = io.remove_file(path) {
        tracing::warn!("{}: removing a delta no descriptor names any more: {e}", path.display());
    }
}
