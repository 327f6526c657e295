//! A stack of layers served as one disk: reads resolve each cluster to the
//! topmost layer that holds it, writes go to the top (copy-on-write from
//! below on first touch).
//!
//! Every operation is an `async fn` over an [`Io`]: on a ublk queue's ring
//! a request that waits (for a copy-up, the file growing, a metadata
//! write) yields to the other requests of its queue instead of blocking
//! them. Requests wait for one another only where they must:
//! - a cluster being allocated (copied up) in the top is claimed; requests
//!   that need that cluster wait for the claim, others go on (`busy`);
//! - the layer list is behind a [`Gate`]: requests enter it, and a stack
//!   change (a snapshot pushing a new top) closes it, waits for the
//!   requests inside to leave, swaps the list and reopens it.
//!
//! Lookup cost does not depend on depth: `owner` keeps, per cluster, the
//! index of the topmost layer that holds it, updated on every allocation.
//!
//! One type, its impl blocks by operation: this file holds the type and its
//! state (open, trackers, freeze, close), `request.rs` the per-request path
//! (read, write, zeroes, discard, flush, and the cluster claims they take),
//! `change.rs` the changes of the layer list (snapshot, merge, replace,
//! compact, grow), `fold.rs` the online merge of the top into its parent's
//! file, and `mirror.rs` the writes that merge carries into that file.

mod change;
mod fold;
mod grow;
mod mirror;
mod owner;
mod request;

use bitvec::vec::BitVec;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::io::wait::{Exclusive, Gate, WaitList};
use crate::io::{block_on, open_image_file_in, BufPool, Direct, ImageFile, Io};
use crate::layers::ploop::ext::DirtyBitmap;
use crate::layers::ploop::header::DEFAULT_CLUSTER;
use crate::layers::{Format, Layer, OpenReport};
use crate::tracker::Tracker;

pub use change::discard_top;
use request::{read_segs, Dst};

/// Deepest stack we serve: layer indexes must fit the u8 owner map, with
/// one value left to mean "no layer".
pub const MAX_DEPTH: usize = 255;
pub(super) const NOBODY: u8 = u8::MAX;

/// Runs its closure when dropped, unless defused: what must happen however
/// a future ends, also when it is dropped between two awaits (a request's
/// marks after its I/O, a fold's copy taking back its wait).
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn new(f: F) -> Self {
        OnDrop(Some(f))
    }
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}
/// Copy-up buffers kept for reuse.
const KEEP_BUFS: usize = 8;

/// A layer to open: its file and its declared format.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub format: Format,
}

impl LayerSpec {
    pub fn ploop(path: impl Into<PathBuf>) -> LayerSpec {
        LayerSpec { path: path.into(), format: Format::Ploop }
    }
    pub fn raw(path: impl Into<PathBuf>) -> LayerSpec {
        LayerSpec { path: path.into(), format: Format::Raw }
    }
}

#[derive(Clone, Debug, Default)]
pub struct StackOptions {
    /// Open every layer read-only (the top too).
    pub read_only: bool,
    pub direct: Direct,
    /// No request will be served (an offline tool's stack): a merge of
    /// the top may then fold it into its parent's file, which costs the
    /// top's clusters and keeps the parent's name, as ploop's offline
    /// merge does, instead of copying the parent up.
    pub offline: bool,
    /// A volatile directory (tmpfs) for the writable top's link log: its
    /// copy-ups are then acknowledged before they are synced, and a
    /// restart after a kill links them again (see `layers::ploop::links`).
    /// Without it, or where the directory is not volatile, every copy-up
    /// is synced before its entry is written.
    pub link_log: Option<PathBuf>,
}

/// What requests share and a stack change swaps.
struct Shape {
    layers: Vec<Arc<Layer>>,
    owner: owner::OwnerMap,
    /// Closed cleanly: no more writes.
    closed: bool,
    /// Write trackers attached (live copy, changed-block tracking).
    trackers: Vec<Arc<Tracker>>,
    /// A fold in progress: writes to clusters it copied reach the parent's
    /// file too.
    fold: Option<Arc<mirror::FoldMirror>>,
}

impl Shape {
    fn top(&self) -> &Arc<Layer> {
        self.layers.last().expect("stack is never empty")
    }
    fn top_index(&self) -> u8 {
        (self.layers.len() - 1) as u8
    }
    fn owner_of(&self, c: u64) -> Option<usize> {
        self.owner.get(c)
    }
    /// The topmost layer under the top that holds cluster `c`: the owner
    /// map answers in O(1), unless it names the top (then look below).
    fn holder_below(&self, c: u64, cluster: u64) -> Option<usize> {
        match self.owner_of(c) {
            Some(i) if i as u8 != self.top_index() && self.layers[i].lookup(c, cluster).is_some() => Some(i),
            Some(_) => self.holder_below_top(c, cluster),
            None => None,
        }
    }
    /// The same by scanning the layers (for when the owner map is stale).
    fn holder_below_top(&self, c: u64, cluster: u64) -> Option<usize> {
        let top = self.layers.len() - 1;
        (0..top).rev().find(|&i| self.layers[i].lookup(c, cluster).is_some())
    }
    fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(Error::new(libc::ESHUTDOWN, "the stack was closed"));
        }
        Ok(())
    }

    /// Refuse changes once a sync of the top failed: the writeback may have
    /// lost table entries a change would rely on, so it could be
    /// acknowledged and still vanish. A restart checks the image.
    fn check_sync_ok(&self) -> Result<()> {
        if self.top().sync_failed() {
            return Err(Error::new(
                libc::EIO,
                format!(
                    "{}: a sync of this image failed earlier, so what it covered may be lost; the device refuses writes until it is restarted (which checks the image)",
                    self.top().file().path.display()
                ),
            )
            .of_kind(crate::error::ErrorKind::WritesRefused));
        }
        Ok(())
    }
}

pub struct Stack {
    shape: Gate<Shape>,
    cluster: u64,
    /// Changes only under the exclusive gate (`grow_top`).
    size: AtomicU64,
    block: u32,
    read_only: bool,
    /// See `StackOptions::offline`.
    offline: bool,
    /// See `StackOptions::link_log`.
    links: Option<PathBuf>,
    direct: Direct,
    /// Clusters of the top being allocated, with the requests waiting for
    /// each (see `allocate`).
    busy: Mutex<HashMap<u64, WaitList>>,
    bufs: BufPool,
    /// Former tops whose writes are not yet known durable: a flush syncs
    /// them too until their snapshot has closed them.
    retiring: Mutex<Vec<Arc<Layer>>>,
    /// Clusters copied up from a lower layer into the top, in all.
    copy_ups: AtomicU64,
    /// Changed-block tracking to keep across a clean close (in the top
    /// image's format extension), with its id.
    keep: Mutex<Option<(Arc<Tracker>, [u8; 16])>>,
}

impl Stack {
    /// Open ploop images bottom first; the last one is the top.
    pub async fn open<I: Io>(io: &I, paths: &[PathBuf], opts: &StackOptions) -> Result<(Stack, Vec<OpenReport>)> {
        let specs: Vec<LayerSpec> = paths.iter().map(LayerSpec::ploop).collect();
        Self::open_layers(io, &specs, opts).await
    }

    /// Open layers of declared formats, bottom first; the last is the top.
    pub async fn open_layers<I: Io>(io: &I, specs: &[LayerSpec], opts: &StackOptions) -> Result<(Stack, Vec<OpenReport>)> {
        if specs.is_empty() {
            return Err(Error::invalid("a stack needs at least one image"));
        }
        if specs.len() > MAX_DEPTH {
            return Err(Error::invalid(format!("stack of {} layers exceeds the limit of {MAX_DEPTH}", specs.len())));
        }
        // Each file is opened once: the handles give the identities that
        // refuse a file named twice, before anything is written.
        let mut files = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let writable = !opts.read_only && i + 1 == specs.len();
            files.push(open_image_file_in(io, &spec.path, writable, opts.direct)?);
        }
        reject_repeated_files(io, &files)?;
        let lowers = specs.len() - 1;
        let mut repaired = vec![false; specs.len()];
        if !opts.read_only {
            // A lower layer still marked in use was being closed by a
            // snapshot when the process died: open it read-write once (its
            // BAT is checked and its grown-ahead tail trimmed, as on any
            // unclean open) and close it, so it is clean before it serves
            // as a read-only layer. Any other is synced: what it shows
            // must be durable before a flush of the top is acknowledged.
            for (i, spec) in specs[..lowers].iter().enumerate() {
                let path = &spec.path;
                if crate::layers::settle_lower(io, &files[i], spec.format, opts.direct, opts.link_log.as_deref()).await? {
                    tracing::warn!(image = %path.display(), "lower layer was left in use by a snapshot that did not finish; checked and closed");
                    repaired[i] = true;
                }
            }
        }
        let mut layers = Vec::with_capacity(specs.len());
        let mut reports = Vec::with_capacity(specs.len());
        for ((spec, file), was_repaired) in specs.iter().zip(files).zip(repaired) {
            let (layer, mut report) = Layer::open_file_linked(io, file, spec.format, opts.direct, opts.link_log.as_deref()).await?;
            report.was_in_use |= was_repaired;
            layers.push(Arc::new(layer));
            reports.push(report);
        }
        if let Err(e) = reject_layers_in_a_qcow2_chain(io, &layers) {
            if let Some(top) = layers.last() {
                let _ = top.close(io).await;
            }
            return Err(e);
        }
        match Stack::from_layers(layers, opts) {
            Ok(stack) => Ok((stack, reports)),
            Err((e, layers)) => {
                // The top was marked in use when it opened: leave it clean.
                if let Some(top) = layers.last() {
                    let _ = top.close(io).await;
                }
                Err(e)
            }
        }
    }

    fn from_layers(layers: Vec<Arc<Layer>>, opts: &StackOptions) -> std::result::Result<Stack, (Error, Vec<Arc<Layer>>)> {
        let mut cluster = None;
        for layer in &layers {
            if let Some(c) = layer.cluster_size() {
                if *cluster.get_or_insert(c) != c {
                    let e = Error::invalid(format!(
                        "{}: cluster size {c} differs from the other layers' {}",
                        layer.file().path.display(),
                        cluster.unwrap()
                    ));
                    return Err((e, layers));
                }
            }
        }
        if let Err(e) = check_qcow2_at_bottom(&layers) {
            return Err((e, layers));
        }
        let cluster = cluster.unwrap_or(DEFAULT_CLUSTER);
        let top = layers.last().expect("checked non-empty");
        let size = top.size();
        let owner = owner_map(&layers, size, cluster);
        let block = layers.iter().map(|l| l.file().block_size).max().unwrap_or(512);
        if size % block as u64 != 0 {
            let e = Error::invalid(format!(
                "disk size {size} is not a multiple of the O_DIRECT block size {block} of the image filesystem (try --direct=off)"
            ));
            return Err((e, layers));
        }
        let read_only = opts.read_only || !top.file().writable;
        let shape = Shape { layers, owner, closed: false, trackers: Vec::new(), fold: None };
        Ok(Stack {
            shape: Gate::new(shape),
            cluster,
            size: AtomicU64::new(size),
            block,
            read_only,
            offline: opts.offline,
            links: opts.link_log.clone(),
            direct: opts.direct,
            busy: Mutex::new(HashMap::new()),
            bufs: BufPool::new(cluster as usize, KEEP_BUFS),
            retiring: Mutex::new(Vec::new()),
            copy_ups: AtomicU64::new(0),
            keep: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }
    /// Offsets and lengths of requests must be multiples of this.
    pub fn block_size(&self) -> u32 {
        self.block
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Opened by an offline tool: no request is served (see
    /// `StackOptions::offline`).
    /// See `StackOptions::link_log`.
    pub fn link_dir(&self) -> Option<&std::path::Path> {
        self.links.as_deref()
    }
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The layers now, bottom first. Waits while the stack changes: call
    /// it from a thread of its own (the control socket, a test), never from
    /// a task on a queue's ring.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        block_on(self.shape.enter()).layers.clone()
    }
    pub fn depth(&self) -> usize {
        block_on(self.shape.enter()).layers.len()
    }
    /// Paths of the layers, bottom first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.layers().iter().map(|l| l.file().path.clone()).collect()
    }
    /// The layers now, bottom first, for a task: awaits a stack change in
    /// progress instead of parking the thread (which would stall every
    /// other task of a ring, and hang a single-threaded executor).
    pub async fn layers_now(&self) -> Vec<Arc<Layer>> {
        self.shape.enter().await.layers.clone()
    }
    /// Paths of the layers, bottom first, for a task (see `layers_now`).
    pub async fn paths_now(&self) -> Vec<PathBuf> {
        self.layers_now().await.iter().map(|l| l.file().path.clone()).collect()
    }
    /// Index of the topmost layer holding cluster `c`, if any.
    pub async fn owner_of(&self, c: u64) -> Option<usize> {
        let shape = self.shape.enter().await;
        shape.owner_of(c).filter(|&i| shape.layers[i].lookup(c, self.cluster).is_some()).or_else(|| {
            shape.holder_below_top(c, self.cluster)
        })
    }
    /// Whether a failure closed the stack (a layer that would not reopen,
    /// a descriptor it could not tell): every request fails until the
    /// device is restarted.
    pub async fn is_closed(&self) -> bool {
        self.shape.enter().await.closed
    }
    /// Requests inside the stack now.
    pub fn in_flight(&self) -> usize {
        self.shape.inside()
    }
    /// Clusters copied up into the top so far (each costs a cluster read,
    /// write and sync).
    pub fn copy_ups(&self) -> u64 {
        self.copy_ups.load(Ordering::Relaxed)
    }

    /// Attach a write tracker: every change that completes from now on is
    /// marked in it. Waits for the requests in flight (their changes are
    /// not marked: they completed before the tracker started).
    pub async fn add_tracker(&self, tracker: Arc<Tracker>) -> Result<()> {
        // Checked with requests held: a grow that ran while this waited for
        // them would leave a tracker blind to the new part of the disk.
        let mut shape = self.shape.exclusive().await;
        if tracker.disk_size() != self.size() {
            return Err(Error::new(
                libc::EAGAIN,
                format!("a tracker for {} bytes on a disk of {} (the disk grew meanwhile); try again", tracker.disk_size(), self.size()),
            ));
        }
        shape.trackers.push(tracker);
        Ok(())
    }

    /// Detach a tracker; returns whether it was attached.
    pub async fn remove_tracker(&self, tracker: &Arc<Tracker>) -> bool {
        let mut shape = self.shape.exclusive().await;
        let before = shape.trackers.len();
        shape.trackers.retain(|t| !Arc::ptr_eq(t, tracker));
        shape.trackers.len() != before
    }

    /// Keep this tracker's marks across a clean close, as a dirty bitmap in
    /// the top image (None: close without one).
    pub fn keep_on_close(&self, cbt: Option<(Arc<Tracker>, [u8; 16])>) {
        *self.keep.lock().unwrap() = cbt;
    }

    /// The record of changes kept across a clean close, if any. An online
    /// grow ends it: a frontend holding the record takes it again from
    /// here after a grow.
    pub fn kept_record(&self) -> Option<Arc<Tracker>> {
        self.keep.lock().unwrap().as_ref().map(|(t, _)| t.clone())
    }

    /// The dirty bitmaps the top image held when it was opened read-write
    /// (left there by a clean close); taken once.
    pub async fn take_saved_bitmaps(&self) -> Vec<DirtyBitmap> {
        self.shape.enter().await.top().take_saved_bitmaps()
    }

    /// Bytes of memory the stack's tables hold: every layer's BAT and the
    /// owner map. They follow the clusters held, not the disk's size.
    pub async fn table_bytes(&self) -> u64 {
        let shape = self.shape.enter().await;
        shape.owner.bytes() + shape.layers.iter().map(|l| l.table_bytes()).sum::<u64>()
    }

    /// Up to `max` clusters from `from` on that some layer holds,
    /// ascending: a walk over a thin disk's data that costs its data, not
    /// its size.
    pub async fn held_clusters(&self, from: u64, max: usize) -> Vec<u64> {
        let shape = self.shape.enter().await;
        shape.owner.held_from(from).take(max).collect()
    }

    /// Clusters some layer holds (all others read as zeros).
    pub async fn allocated(&self) -> BitVec {
        let shape = self.shape.enter().await;
        let mut held = BitVec::repeat(false, self.size().div_ceil(self.cluster) as usize);
        for c in shape.owner.held() {
            held.set(c as usize, true);
        }
        held
    }

    /// Hold new requests once those in flight have finished, until the
    /// returned guard is dropped: the disk's content stands still, and
    /// reads and a flush through the guard see it (the last pass of a
    /// live copy).
    pub async fn freeze(&self) -> Frozen<'_> {
        Frozen { stack: self, shape: self.shape.exclusive().await }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let block = self.block as u64;
        if offset % block != 0 || len as u64 % block != 0 {
            return Err(Error::invalid(format!("request {offset}+{len} is not aligned to {block} bytes")));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(libc::EINVAL, format!("request {offset}+{len} goes past the end of the disk ({})", self.size()))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(libc::EROFS, "the stack is read-only"));
        }
        Ok(())
    }

    /// Flush and mark the top image cleanly closed; later writes fail.
    /// Waits for the requests in flight.
    pub async fn close<I: Io>(&self, io: &I) -> Result<()> {
        let mut shape = self.shape.exclusive().await;
        self.close_shape(io, &mut shape).await
    }

    async fn close_shape<I: Io>(&self, io: &I, shape: &mut Shape) -> Result<()> {
        if shape.closed || self.read_only {
            shape.closed = true;
            return Ok(());
        }
        shape.closed = true;
        let retiring = std::mem::take(&mut *self.retiring.lock().unwrap());
        for layer in retiring {
            layer.close(io).await?;
            layer.remove_link_log(io);
        }
        let keep = self.keep.lock().unwrap().clone();
        let bitmaps: Vec<DirtyBitmap> = keep
            .into_iter()
            .map(|(t, id)| DirtyBitmap { id, granularity: t.granularity(), bits: t.peek() })
            .collect();
        shape.top().close_with_bitmaps(io, &bitmaps).await?;
        shape.top().remove_link_log(io);
        Ok(())
    }
}

/// The stack with every request held (see `Stack::freeze`).
pub struct Frozen<'a> {
    stack: &'a Stack,
    shape: Exclusive<'a, Shape>,
}

impl Frozen<'_> {
    pub fn size(&self) -> u64 {
        self.stack.size()
    }
    pub fn cluster_size(&self) -> u64 {
        self.stack.cluster
    }
    /// Read the disk as it stands.
    pub async fn read<I: Io>(&self, io: &I, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.stack.check_range(offset, buf.len())?;
        let mut segs = Vec::with_capacity(2);
        self.stack.plan_read(&self.shape, offset, buf.len(), &mut segs);
        read_segs(io, &self.shape.layers, &segs, Dst::Mem(buf)).await.map_err(|e| Error::io(e, "reading image data"))
    }

    /// Make every completed write durable.
    pub async fn flush<I: Io>(&self, io: &I) -> Result<()> {
        self.stack.flush_shape(io, &self.shape).await
    }

    /// Close the stack as `Stack::close` does, before any held request
    /// runs (they fail): the device stops with this content.
    pub async fn close<I: Io>(mut self, io: &I) -> Result<()> {
        self.stack.close_shape(io, &mut self.shape).await
    }
}

/// Per cluster, the topmost layer that holds it.
fn owner_map(layers: &[Arc<Layer>], size: u64, cluster: u64) -> owner::OwnerMap {
    owner::OwnerMap::build(layers, size.div_ceil(cluster), cluster)
}

/// A QCOW2 image brings its own backing chain and shows every cluster of
/// its disk (its unallocated ones from that chain), so nothing can lie
/// below it in the stack: it is the bottom or nothing.
pub(super) fn check_qcow2_at_bottom(layers: &[Arc<Layer>]) -> Result<()> {
    match layers.iter().skip(1).find(|l| l.format() == Format::Qcow2) {
        Some(l) => Err(Error::invalid(format!(
            "{}: a QCOW2 image can only be the bottom layer of a stack (it reads its own backing files)",
            l.file().path.display()
        ))),
        None => Ok(()),
    }
}

/// A layer that is also a file of a QCOW2 layer's backing chain would be
/// read through the image while it is written as a layer.
fn reject_layers_in_a_qcow2_chain<I: Io>(io: &I, layers: &[Arc<Layer>]) -> Result<()> {
    for q in layers.iter().filter_map(|l| match &**l {
        Layer::Qcow2(q) => Some(q),
        _ => None,
    }) {
        let chain = q.image().chain_identities(io)?;
        for l in layers.iter().filter(|l| !std::ptr::eq(l.file(), q.file())) {
            let st = io.fstat(l.file().fd()).map_err(|e| Error::io(e, l.file().path.display()))?;
            if chain.contains(&(st.dev, st.ino)) {
                return Err(Error::invalid(format!(
                    "{}: is also a backing file of the QCOW2 image {}; a file cannot be both",
                    l.file().path.display(),
                    q.file().path.display()
                )));
            }
        }
    }
    Ok(())
}

/// The same file twice in one stack would be both read-only and writable.
/// The open handles say what file each name leads to (through links), before
/// any layer takes its lock.
fn reject_repeated_files<I: Io>(io: &I, files: &[ImageFile]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for file in files {
        let stat = io.fstat(file.fd()).map_err(|e| Error::io(e, file.path.display()))?;
        if !seen.insert((stat.dev, stat.ino)) {
            return Err(Error::invalid(format!("{} appears twice in the stack", file.path.display())));
        }
    }
    Ok(())
}
