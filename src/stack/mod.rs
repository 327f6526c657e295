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

use bitvec::vec::BitVec;
use std::collections::HashMap;
use std::future::poll_fn;
use std::ops::Range;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::io::wait::{Entered, Exclusive, Gate, WaitList};
use crate::io::{block_on, for_each_in_flight, join_all, AlignedBuf, BufPool, Direct, FixedBuf, Io};
use crate::layers::ploop::header::{Variant, DEFAULT_CLUSTER};
use crate::layers::ploop::ext::DirtyBitmap;
use crate::layers::{Format, Layer, MetaError, OpenReport, PloopLayer};
use crate::tracker::Tracker;

/// Deepest stack we serve: layer indexes must fit the u8 owner map, with
/// one value left to mean "no layer".
pub const MAX_DEPTH: usize = 255;
const NOBODY: u8 = u8::MAX;
/// Copy-up buffers kept for reuse.
const KEEP_BUFS: usize = 8;

/// One piece of a planned request, in request order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    /// Transfer `len` bytes between the request buffer at `buf_off` and
    /// file `fd` at `file_off`.
    Data { fd: RawFd, file_off: u64, buf_off: usize, len: usize },
    /// The request buffer at `buf_off` reads as zeros.
    Zero { buf_off: usize, len: usize },
}

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
}

/// What requests share and a stack change swaps.
struct Shape {
    layers: Vec<Arc<Layer>>,
    owner: Box<[AtomicU8]>,
    /// Closed cleanly: no more writes.
    closed: bool,
    /// Write trackers attached (live copy, changed-block tracking).
    trackers: Vec<Arc<Tracker>>,
}

impl Shape {
    fn top(&self) -> &Arc<Layer> {
        self.layers.last().expect("stack is never empty")
    }
    fn top_index(&self) -> u8 {
        (self.layers.len() - 1) as u8
    }
    fn owner_of(&self, c: u64) -> Option<usize> {
        match self.owner.get(c as usize)?.load(Ordering::Acquire) {
            NOBODY => None,
            i => Some(i as usize),
        }
    }
    /// The topmost layer under the top that holds cluster `c`: the owner
    /// map answers in O(1), unless it names the top (then look below).
    fn holder_below(&self, c: u64, cluster: u64) -> Option<usize> {
        match self.owner_of(c) {
            Some(i) if i as u8 != self.top_index() => Some(i),
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
}

pub struct Stack {
    shape: Gate<Shape>,
    cluster: u64,
    /// Changes only under the exclusive gate (`grow_top`).
    size: AtomicU64,
    block: u32,
    read_only: bool,
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
        let paths: Vec<PathBuf> = specs.iter().map(|s| s.path.clone()).collect();
        if paths.is_empty() {
            return Err(Error::invalid("a stack needs at least one image"));
        }
        if paths.len() > MAX_DEPTH {
            return Err(Error::invalid(format!("stack of {} layers exceeds the limit of {MAX_DEPTH}", paths.len())));
        }
        reject_repeated_files(&paths)?;
        let lowers = &paths[..paths.len() - 1];
        let mut repaired = vec![false; paths.len()];
        if !opts.read_only {
            // A lower layer still marked in use was being closed by a
            // snapshot when the process died: open it read-write once (its
            // BAT is checked and its grown-ahead tail trimmed, as on any
            // unclean open) and close it, so it is clean before it serves
            // as a read-only layer.
            for (i, spec) in specs[..lowers.len()].iter().enumerate() {
                let path = &spec.path;
                if spec.format == Format::Ploop && crate::layers::marked_in_use(io, path).await? {
                    let (layer, _) = Layer::open(io, path, Format::Ploop, true, opts.direct).await?;
                    layer.close(io).await?;
                    tracing::warn!(image = %path.display(), "lower layer was left in use by a snapshot that did not finish; checked and closed");
                    repaired[i] = true;
                }
            }
        }
        let mut layers = Vec::with_capacity(paths.len());
        let mut reports = Vec::with_capacity(paths.len());
        for (i, spec) in specs.iter().enumerate() {
            let writable = !opts.read_only && i + 1 == paths.len();
            let (layer, mut report) = Layer::open(io, &spec.path, spec.format, writable, opts.direct).await?;
            report.was_in_use |= repaired[i];
            layers.push(Arc::new(layer));
            reports.push(report);
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
        let shape = Shape { layers, owner, closed: false, trackers: Vec::new() };
        Ok(Stack {
            shape: Gate::new(shape),
            cluster,
            size: AtomicU64::new(size),
            block,
            read_only,
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
    /// Index of the topmost layer holding cluster `c`, if any.
    pub async fn owner_of(&self, c: u64) -> Option<usize> {
        let shape = self.shape.enter().await;
        shape.owner_of(c).filter(|&i| shape.layers[i].lookup(c, self.cluster).is_some()).or_else(|| {
            shape.holder_below_top(c, self.cluster)
        })
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
        if tracker.disk_size() != self.size() {
            return Err(Error::invalid(format!("tracker for {} bytes on a disk of {}", tracker.disk_size(), self.size())));
        }
        self.shape.exclusive().await.trackers.push(tracker);
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

    /// The dirty bitmaps the top image held when it was opened read-write
    /// (left there by a clean close); taken once.
    pub async fn take_saved_bitmaps(&self) -> Vec<DirtyBitmap> {
        self.shape.enter().await.top().take_saved_bitmaps()
    }

    /// Clusters some layer holds (all others read as zeros).
    pub async fn allocated(&self) -> BitVec {
        let shape = self.shape.enter().await;
        (0..shape.owner.len() as u64).map(|c| shape.owner_of(c).is_some()).collect()
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

    /// Split `[offset, offset+len)` into per-cluster pieces:
    /// (cluster, offset within cluster, offset within request, length).
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize, usize)> + '_ {
        let cluster = self.cluster;
        let mut pos = 0usize;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let abs = offset + pos as u64;
            let within = abs % cluster;
            let n = ((cluster - within) as usize).min(len - pos);
            let piece = (abs / cluster, within, pos, n);
            pos += n;
            Some(piece)
        })
    }

    /// Resolve a read into file segments, merging neighbours that are
    /// contiguous in one file (a sequential read of adjacent clusters stays
    /// one transfer).
    fn plan_read(&self, shape: &Shape, offset: u64, len: usize, segs: &mut Vec<Seg>) {
        for (c, within, buf_off, n) in self.pieces(offset, len) {
            // The owner map can name the top for an instant after a failed
            // BAT write undid its entry: then look below.
            let found = shape
                .owner_of(c)
                .and_then(|i| Some((i, shape.layers[i].lookup(c, self.cluster)?)))
                .or_else(|| shape.holder_below_top(c, self.cluster).map(|i| (i, shape.layers[i].lookup(c, self.cluster).unwrap())));
            let seg = match found {
                Some((i, base)) => Seg::Data { fd: shape.layers[i].file().fd(), file_off: base + within, buf_off, len: n },
                None => Seg::Zero { buf_off, len: n },
            };
            push_merged(segs, seg);
        }
    }

    /// Read into `buf` (any alignment; O_DIRECT-aligned buffers avoid a
    /// copy). All transfers of the request are in flight together.
    pub async fn read<I: Io>(&self, io: &I, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_to(io, offset, Dst::Mem(buf)).await
    }

    /// Read into a buffer registered on `io`'s ring (zero copy: the bytes
    /// go from the image files straight into the request's pages, holes
    /// are zeroed there by the kernel).
    pub async fn read_fixed<I: Io>(&self, io: &I, offset: u64, buf: FixedBuf) -> Result<()> {
        self.read_to(io, offset, Dst::Fixed(buf)).await
    }

    async fn read_to<I: Io>(&self, io: &I, offset: u64, dst: Dst<'_>) -> Result<()> {
        let len = dst.len();
        self.check_range(offset, len)?;
        let shape = self.shape.enter().await;
        let mut segs = Vec::with_capacity(2);
        self.plan_read(&shape, offset, len, &mut segs);
        read_segs(io, &segs, dst).await.map_err(|e| Error::io(e, "reading image data"))
    }

    /// Write `data` at `offset`: clusters the top lacks are allocated (and
    /// copied up from below) first; the write completes once the BAT
    /// entries it created or relies on are written.
    pub async fn write<I: Io>(&self, io: &I, offset: u64, data: &[u8]) -> Result<()> {
        self.write_from(io, offset, Src::Mem(data)).await
    }

    /// Write from a buffer registered on `io`'s ring (zero copy), as `write`.
    pub async fn write_fixed<I: Io>(&self, io: &I, offset: u64, buf: FixedBuf) -> Result<()> {
        self.write_from(io, offset, Src::Fixed(buf)).await
    }

    async fn write_from<I: Io>(&self, io: &I, offset: u64, data: Src<'_>) -> Result<()> {
        let len = data.len();
        self.check_writable()?;
        self.check_range(offset, len)?;
        let shape = self.shape.enter().await;
        shape.check_open()?;
        let result = self.write_entered(io, &shape, offset, data).await;
        mark(&shape, offset, len);
        result
    }

    async fn write_entered<I: Io>(&self, io: &I, shape: &Shape, offset: u64, data: Src<'_>) -> Result<()> {
        let top = shape.top();
        let window = top.window_start();
        let fd = top.file().fd();
        let mut segs = Vec::with_capacity(2);
        for (c, within, buf_off, n) in self.pieces(offset, data.len()) {
            let base = match top.lookup(c, self.cluster) {
                Some(base) => base,
                None => {
                    // A piece that covers the whole cluster replaces it: no
                    // copy-up of bytes it would overwrite at once.
                    let fill = if within == 0 && n == self.copy_len(c) { Fill::Whole(data, buf_off) } else { Fill::CopyUp };
                    let (base, _, written) = self.allocate(io, shape, c, fill).await?;
                    if written {
                        continue;
                    }
                    base
                }
            };
            push_merged(&mut segs, Seg::Data { fd, file_off: base + within, buf_off, len: n });
        }
        // The BAT entries this write created (or found unwritten) may reach
        // the disk before its data: each points at a cluster that already
        // holds the disk's bytes durably. So the metadata write runs beside
        // the data transfer, and the write completes when both did.
        let meta = self.finish(io, shape, window, self.clusters_of(offset, data.len()));
        let data = async { write_segs(io, &segs, data).await.map_err(|e| Error::io(e, format_args!("{}: writing image data", top.file().path.display()))) };
        let (data, meta) = futures_lite::future::zip(data, meta).await;
        data.and(meta)
    }

    /// Give cluster `c` a home in the top layer and return its file offset,
    /// whether this call linked it (a fresh cluster), and whether it wrote
    /// the request's bytes there (`Fill::Whole` over lower data). A lower
    /// layer's cluster is first copied up (`Fill::CopyUp`) or replaced by
    /// the request's bytes (`Fill::Whole`), and either is synced before the
    /// cluster is linked: the BAT entry never points at bytes the disk did
    /// not show, so a crash at any point leaves each byte old or new.
    ///
    /// The cluster is claimed for the duration: other requests that need it
    /// wait for this one; requests on other clusters go on.
    async fn allocate<I: Io>(&self, io: &I, shape: &Shape, c: u64, fill: Fill<'_>) -> Result<(u64, bool, bool)> {
        let top = shape.top();
        let held = poll_fn(|cx| {
            let mut busy = self.busy.lock().unwrap();
            if let Some(base) = top.lookup(c, self.cluster) {
                // Another request allocated it meanwhile.
                return Poll::Ready(Some(base));
            }
            match busy.get_mut(&c) {
                Some(waiters) => {
                    waiters.register(cx);
                    Poll::Pending
                }
                None => {
                    busy.insert(c, WaitList::default());
                    Poll::Ready(None)
                }
            }
        })
        .await;
        if let Some(base) = held {
            return Ok((base, false, false));
        }
        let _claim = Claim { stack: self, c };
        let below = shape.holder_below(c, self.cluster);
        let offset = top.reserve_cluster(io).await?;
        let mut written = false;
        match (fill, below) {
            (Fill::CopyUp, Some(i)) => {
                let src = &shape.layers[i];
                let src_off = src.lookup(c, self.cluster).expect("owner map and BAT agree");
                let mut buf = self.bufs.get();
                let result = self.copy_up(io, src, src_off, top, offset, &mut buf[..self.copy_len(c)]).await;
                self.bufs.put(buf);
                result?;
                self.copy_ups.fetch_add(1, Ordering::Relaxed);
            }
            (Fill::Whole(data, buf_off), Some(_)) => {
                // Until it is linked, readers still see the lower cluster.
                let path = top.file().path.display();
                let seg = Seg::Data { fd: top.file().fd(), file_off: offset, buf_off, len: self.copy_len(c) };
                write_segs(io, &[seg], data).await.map_err(|e| Error::io(e, format_args!("{path}: writing a whole cluster")))?;
                top.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: syncing a whole cluster")))?;
                written = true;
            }
            // Nothing below: the fresh cluster's zeros are what the disk
            // showed, so the caller's write may race its BAT entry.
            _ => {}
        }
        // Owner first: a write that finds the link and completes must be
        // seen by every later read, which looks at the owner map first (an
        // owner naming the top before its entry exists resolves below).
        shape.owner[c as usize].store(shape.top_index(), Ordering::Release);
        top.link(c, offset);
        Ok((offset, true, written))
    }

    /// Copy one cluster's bytes up and make them durable (data before index).
    async fn copy_up<I: Io>(&self, io: &I, src: &Layer, src_off: u64, top: &Layer, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (from, to) = (src.file(), top.file());
        io.read_at(from.fd(), buf, src_off).await.map_err(|e| Error::io(e, format_args!("{}: copy-up read", from.path.display())))?;
        io.write_at(to.fd(), buf, offset).await.map_err(|e| Error::io(e, format_args!("{}: copy-up write", to.path.display())))?;
        top.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{}: copy-up sync", to.path.display())))
    }

    /// Bytes of cluster `c` inside the disk (the last one may be partial).
    fn copy_len(&self, c: u64) -> usize {
        (self.size() - c * self.cluster).min(self.cluster) as usize
    }

    /// Zero a range: afterwards it reads as zeros, whatever lower layers hold.
    pub async fn write_zeroes<I: Io>(&self, io: &I, offset: u64, len: usize) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let shape = self.shape.enter().await;
        shape.check_open()?;
        let result = self.write_zeroes_entered(io, &shape, offset, len).await;
        mark(&shape, offset, len);
        result
    }

    async fn write_zeroes_entered<I: Io>(&self, io: &I, shape: &Shape, offset: u64, len: usize) -> Result<()> {
        let top = shape.top();
        let window = top.window_start();
        for (c, within, _, n) in self.pieces(offset, len) {
            // The top's own BAT decides what it holds (the owner map can
            // lag for an instant behind a rolled-back entry).
            if let Some(base) = top.lookup(c, self.cluster) {
                punch(io, top, base + within, n).await?;
            } else if shape.holder_below(c, self.cluster).is_some() {
                // Lower data must be hidden by a cluster of the top.
                let whole = within == 0 && n == self.copy_len(c);
                let (base, fresh, _) = self.allocate(io, shape, c, if whole { Fill::Nothing } else { Fill::CopyUp }).await?;
                // A fresh cluster already reads as zeros; one that a
                // concurrent write allocated first holds data to zero.
                if !(whole && fresh) {
                    punch(io, top, base + within, n).await?;
                }
            }
        }
        self.finish(io, shape, window, self.clusters_of(offset, len)).await
    }

    /// Discard a range: space the top layer holds there is released and
    /// reads as zeros; data that lives only in lower (read-only) layers is
    /// left as it is, since reclaiming it would cost space, not save it.
    pub async fn discard<I: Io>(&self, io: &I, offset: u64, len: usize) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let shape = self.shape.enter().await;
        shape.check_open()?;
        let top = shape.top();
        let window = top.window_start();
        let mut changed = false;
        let mut result = Ok(());
        for (c, within, _, n) in self.pieces(offset, len) {
            if let Some(base) = top.lookup(c, self.cluster) {
                changed = true;
                result = punch(io, top, base + within, n).await;
                if result.is_err() {
                    break;
                }
            }
        }
        // Punched clusters may have been linked by writes still in flight.
        if result.is_ok() {
            result = self.finish(io, &shape, window, self.clusters_of(offset, len)).await;
        }
        if changed {
            mark(&shape, offset, len);
        }
        result
    }

    /// Make every completed write durable: their BAT entries are written
    /// already, so a data sync of the top (and of a former top a snapshot
    /// is still closing) covers them.
    pub async fn flush<I: Io>(&self, io: &I) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let shape = self.shape.enter().await;
        self.flush_shape(io, &shape).await
    }

    async fn flush_shape<I: Io>(&self, io: &I, shape: &Shape) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        shape.top().sync(io).await?;
        let retiring = self.retiring.lock().unwrap().clone();
        for layer in retiring {
            layer.sync(io).await?;
        }
        Ok(())
    }

    /// Complete a request whose data transfers succeeded: the BAT entries
    /// it (or a concurrent request it relies on) linked since `window`
    /// are written before it may be acknowledged. It fails if one of those
    /// entries for its `clusters` was rolled back, not for other clusters'.
    async fn finish<I: Io>(&self, io: &I, shape: &Shape, window: Option<u64>, clusters: Range<u64>) -> Result<()> {
        let Some(lo) = window else { return Ok(()) };
        let top = shape.top();
        let hi = top.published();
        if hi < lo {
            return Ok(());
        }
        top.write_metadata(io, lo, hi, clusters).await.map_err(|e| self.rolled_back(shape, e))
    }

    /// The clusters a request on `[offset, offset+len)` touches.
    fn clusters_of(&self, offset: u64, len: usize) -> Range<u64> {
        offset / self.cluster..(offset + len as u64).div_ceil(self.cluster)
    }

    /// After a failed BAT write undid some entries of the top: resolve
    /// those clusters to the layers below again, unless a request is
    /// allocating one of them anew (it sets the owner itself).
    fn rolled_back(&self, shape: &Shape, e: MetaError) -> Error {
        if !e.rolled_back.is_empty() {
            let busy = self.busy.lock().unwrap();
            for c in e.rolled_back {
                if !busy.contains_key(&c) && shape.top().lookup(c, self.cluster).is_none() {
                    let below = shape.holder_below_top(c, self.cluster).map_or(NOBODY, |i| i as u8);
                    shape.owner[c as usize].store(below, Ordering::Release);
                }
            }
        }
        e.error
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
        }
        let keep = self.keep.lock().unwrap().clone();
        let bitmaps: Vec<DirtyBitmap> = keep
            .into_iter()
            .map(|(t, id)| DirtyBitmap { id, granularity: t.granularity(), bits: t.peek() })
            .collect();
        shape.top().close_with_bitmaps(io, &bitmaps).await
    }

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
        let layer = match Layer::open(io, path, Format::Ploop, true, self.direct).await {
            Ok((layer, _)) => Arc::new(layer),
            Err(e) => {
                let _ = std::fs::remove_file(path);
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
        let start = Instant::now();
        let swapped = {
            let mut shape = self.shape.exclusive().await;
            if shape.closed || shape.layers.len() >= MAX_DEPTH {
                Err(Error::new(libc::EBUSY, "the stack was closed or filled up meanwhile"))
            } else {
                let old = shape.top().clone();
                self.retiring.lock().unwrap().push(old.clone());
                shape.layers.push(new_top.clone());
                Ok(old)
            }
        };
        let stall = start.elapsed();
        let old = match swapped {
            Ok(old) => old,
            Err(e) => {
                discard_top(io, new_top).await;
                return Err(e);
            }
        };
        self.retire(io, &old).await.map_err(|e| {
            e.context(format_args!("snapshot taken, but closing the frozen layer {} failed", old.file().path.display()))
        })?;
        Ok(stall)
    }

    /// Close a former top (durable, marked clean, shared lock); until this
    /// succeeded, flushes sync it too.
    async fn retire<I: Io>(&self, io: &I, old: &Arc<Layer>) -> Result<()> {
        old.close(io).await?;
        old.demote()?;
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
        let copy_one = |&c: &u64| async move {
            let shape = self.shape.enter().await;
            shape.check_open()?;
            if !Arc::ptr_eq(shape.top(), top) || shape.top_index() != parent + 1 {
                return Err(changed());
            }
            // A write may have copied it up meanwhile: then nothing to do
            // (the check at the end catches its link failing).
            if shape.top().lookup(c, self.cluster).is_none() && shape.holder_below(c, self.cluster) == Some(parent as usize) {
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
            todo = {
                let shape = self.shape.exclusive().await;
                shape.check_open()?;
                if !Arc::ptr_eq(shape.top(), top) || shape.top_index() != parent + 1 {
                    return Err(changed());
                }
                top.write_dirty_meta(io).await.map_err(|e| self.rolled_back(&shape, e))?;
                self.left_in_parent(&shape, parent)
            };
            if todo.is_empty() {
                top.sync(io).await?;
                return Ok(copied);
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
        (0..shape.owner.len() as u64)
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
}

impl Stack {
    /// Give the top image's free space back to the host filesystem, online:
    /// in steps of at most `budget` moved clusters, each with requests held
    /// while the top is closed, compacted (`layers::ploop::compact`) and
    /// opened again. `progress` gets (clusters moved, clusters to move).
    pub async fn compact<I: Io>(&self, io: &I, budget: u64, progress: &dyn Fn(u64, u64)) -> Result<crate::layers::ploop::compact::Compacted> {
        self.compact_with(io, budget, false, progress).await
    }

    /// The same; with `unknown_below`, the top is taken to lie over layers
    /// this stack does not have (an image file opened on its own that may
    /// be a delta): a discarded cluster must keep reading as zeros from the
    /// top, so none is unlinked (clusters still move, the file is still cut).
    pub async fn compact_with<I: Io>(
        &self,
        io: &I,
        budget: u64,
        unknown_below: bool,
        progress: &dyn Fn(u64, u64),
    ) -> Result<crate::layers::ploop::compact::Compacted> {
        use crate::layers::ploop::compact::{compact_step, Compacted};
        self.check_writable()?;
        let mut total = Compacted::default();
        let mut first = true;
        loop {
            let step = self
                .with_top_closed(io, false, |io, path, lower: Vec<Arc<Layer>>| async move {
                    let file = crate::io::open_image_file(&path, true, self.direct)?;
                    crate::layers::lock(&file, true)?;
                    let lower_has = |c: u64| unknown_below || lower.iter().any(|l| l.lookup(c, self.cluster).is_some());
                    compact_step(io, &file, &lower_has, budget).await
                })
                .await?;
            if first {
                total.file_size_before = step.file_size_before;
                first = false;
            }
            total.unlinked += step.unlinked;
            total.moved += step.moved;
            progress(total.moved, total.moved + step.remaining);
            if step.done {
                total.file_size_after = step.file_size_after;
                total.done = true;
                return Ok(total);
            }
        }
    }

    /// Run `work` on the top image's file while it is closed, with requests
    /// held; then open it again (also when `work` failed) and rebuild the
    /// owner map. `work` gets the path and the layers below the top.
    async fn with_top_closed<'a, I, T, F, Fut>(&'a self, io: &'a I, no_trackers: bool, work: F) -> Result<T>
    where
        I: Io,
        F: FnOnce(&'a I, PathBuf, Vec<Arc<Layer>>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let mut shape = self.shape.exclusive().await;
        shape.check_open()?;
        if no_trackers && !shape.trackers.is_empty() {
            return Err(Error::new(libc::EBUSY, "a write tracker (or a copy) is running: stop it first"));
        }
        if !self.retiring.lock().unwrap().is_empty() || shape.top().format() != Format::Ploop {
            return Err(Error::new(libc::EBUSY, "the top is not a ploop image, or a snapshot is still being closed; try again"));
        }
        let top = shape.layers.pop().expect("a stack is never empty");
        let path = top.file().path.clone();
        if let Err(e) = top.close(io).await {
            shape.layers.push(top);
            return Err(e.context("closing the top"));
        }
        if Arc::strong_count(&top) != 1 {
            let _ = top.reopen_in_use(io).await;
            shape.layers.push(top);
            return Err(Error::new(libc::EBUSY, "the top is in use elsewhere in the daemon; try again"));
        }
        drop(top);
        let result = work(io, path.clone(), shape.layers.clone()).await;
        match Layer::open(io, &path, Format::Ploop, true, self.direct).await {
            Ok((layer, _)) => {
                shape.layers.push(Arc::new(layer));
                shape.owner = owner_map(&shape.layers, self.size(), self.cluster);
                result
            }
            Err(e) => {
                shape.closed = true;
                Err(e.context(format_args!("{}: reopening the top", path.display())))
            }
        }
    }

    /// Grow the disk online, as ploop does: only the top image grows (the
    /// lower layers keep their size and show zeros past it). Requests are
    /// held meanwhile: the top is closed cleanly, resized as a closed image
    /// (`layers::ploop::resize`), opened again and swapped in with the new
    /// size. The caller tells the kernel afterwards. If the resize fails,
    /// the top is opened again at its old size.
    pub async fn grow_top<I: Io>(&self, io: &I, new_size: u64) -> Result<crate::layers::ploop::resize::Resized> {
        use crate::layers::ploop::resize::{resize, Resized};
        self.check_writable()?;
        let old_size = self.size();
        if new_size < old_size {
            return Err(Error::invalid(format!(
                "a served disk is never shrunk ({old_size} bytes now, {new_size} asked); ploop does not shrink devices either"
            )));
        }
        if new_size % self.block as u64 != 0 {
            return Err(Error::invalid(format!("{new_size} is not a multiple of the disk's block of {} bytes", self.block)));
        }
        if new_size == old_size {
            return Ok(Resized { old_size, new_size, ..Default::default() });
        }
        self.with_top_closed(io, true, |io, path, _| async move {
            let done = resize(io, &path, new_size, true).await?;
            self.size.store(new_size, Ordering::Release);
            Ok(done)
        })
        .await
    }
}

/// Close and remove a prepared top that never served.
pub async fn discard_top<I: Io>(io: &I, layer: Arc<Layer>) {
    let path = layer.file().path.clone();
    let _ = layer.close(io).await;
    drop(layer);
    let _ = std::fs::remove_file(path);
}

/// Releases a cluster claimed by `allocate`, waking the requests that wait
/// for it (also when the allocation failed: they try again themselves).
struct Claim<'a> {
    stack: &'a Stack,
    c: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let waiters = self.stack.busy.lock().unwrap().remove(&self.c);
        if let Some(mut w) = waiters {
            drop(w.take());
        }
    }
}

fn mark(shape: &Entered<'_, Shape>, offset: u64, len: usize) {
    for t in &shape.trackers {
        t.mark_range(offset, len as u64);
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
        read_segs(io, &segs, Dst::Mem(buf)).await.map_err(|e| Error::io(e, "reading image data"))
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

/// Make `n` bytes of `layer` at `at` read as zeros.
async fn punch<I: Io>(io: &I, layer: &Layer, at: u64, n: usize) -> Result<()> {
    let file = layer.file();
    match io.punch_hole(file.fd(), at, n as u64).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = AlignedBuf::zeroed(n);
            io.write_at(file.fd(), &zeros, at).await.map_err(|e| Error::io(e, file.path.display()))
        }
        Err(e) => Err(Error::io(e, format_args!("{}: punching a hole", file.path.display()))),
    }
}

/// Where a request's bytes go: our memory, or a buffer registered on the
/// ring (zero copy).
enum Dst<'a> {
    Mem(&'a mut [u8]),
    Fixed(FixedBuf),
}

/// What a newly allocated cluster of the top is given before it is linked.
#[derive(Clone, Copy)]
enum Fill<'a> {
    /// Nothing: it reads as zeros (a caller about to zero it all).
    Nothing,
    /// The content it shows now, from the layer below that holds it.
    CopyUp,
    /// A request's bytes from `buf_off` on, which cover the whole cluster.
    Whole(Src<'a>, usize),
}

/// Where a write's bytes come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    Mem(&'a [u8]),
    Fixed(FixedBuf),
}

impl Dst<'_> {
    fn len(&self) -> usize {
        match self {
            Dst::Mem(b) => b.len(),
            Dst::Fixed(f) => f.len,
        }
    }
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::Mem(b) => b.len(),
            Src::Fixed(f) => f.len,
        }
    }
}

/// Move planned read segments into `dst`, all in flight together.
async fn read_segs<I: Io>(io: &I, segs: &[Seg], dst: Dst<'_>) -> std::io::Result<()> {
    let buf = match dst {
        Dst::Mem(buf) => buf,
        Dst::Fixed(fixed) => {
            let transfer = |seg: &Seg| {
                let seg = *seg;
                async move {
                    match seg {
                        Seg::Data { fd, file_off, buf_off, len } => io.read_fixed(fd, fixed.slice(buf_off, len), file_off).await,
                        Seg::Zero { buf_off, len } => io.zero_fixed(fixed.slice(buf_off, len)).await,
                    }
                }
            };
            return match segs {
                [one] => transfer(one).await,
                _ => join_all(segs.iter().map(transfer).collect()).await.into_iter().collect(),
            };
        }
    };
    if let [Seg::Data { fd, file_off, len, .. }] = *segs {
        return io.read_at(fd, &mut buf[..len], file_off).await;
    }
    let mut futures = Vec::with_capacity(segs.len());
    let mut rest = buf;
    for seg in segs {
        match *seg {
            Seg::Zero { len, .. } => {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                piece.fill(0);
                rest = tail;
            }
            Seg::Data { fd, file_off, len, .. } => {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                futures.push(io.read_at(fd, piece, file_off));
                rest = tail;
            }
        }
    }
    join_all(futures).await.into_iter().collect()
}

/// Move planned write segments from `data`, all in flight together.
async fn write_segs<I: Io>(io: &I, segs: &[Seg], data: Src<'_>) -> std::io::Result<()> {
    let transfer = |seg: &Seg| {
        let seg = *seg;
        async move {
            match (seg, data) {
                (Seg::Data { fd, file_off, buf_off, len }, Src::Mem(data)) => io.write_at(fd, &data[buf_off..buf_off + len], file_off).await,
                (Seg::Data { fd, file_off, buf_off, len }, Src::Fixed(fixed)) => io.write_fixed(fd, fixed.slice(buf_off, len), file_off).await,
                (Seg::Zero { .. }, _) => unreachable!("writes plan no zero segments"),
            }
        }
    };
    match segs {
        [one] => transfer(one).await,
        _ => join_all(segs.iter().map(transfer).collect()).await.into_iter().collect(),
    }
}

fn push_merged(segs: &mut Vec<Seg>, seg: Seg) {
    match (segs.last_mut(), seg) {
        // Contiguous in the file and in the request (a write may skip a
        // piece it already wrote while allocating).
        (Some(Seg::Data { fd, file_off, buf_off, len }), Seg::Data { fd: fd2, file_off: off2, buf_off: b2, len: n })
            if *fd == fd2 && *file_off + *len as u64 == off2 && *buf_off + *len == b2 =>
        {
            *len += n;
        }
        (Some(Seg::Zero { buf_off, len }), Seg::Zero { buf_off: b2, len: n }) if *buf_off + *len == b2 => *len += n,
        _ => segs.push(seg),
    }
}

/// Per cluster, the topmost layer that holds it.
fn owner_map(layers: &[Arc<Layer>], size: u64, cluster: u64) -> Box<[AtomicU8]> {
    let owner: Box<[AtomicU8]> = (0..size.div_ceil(cluster)).map(|_| AtomicU8::new(NOBODY)).collect();
    for (index, layer) in layers.iter().enumerate() {
        for (c, slot) in owner.iter().enumerate() {
            if layer.lookup(c as u64, cluster).is_some() {
                slot.store(index as u8, Ordering::Relaxed);
            }
        }
    }
    owner
}

/// The same file twice in one stack would be both read-only and writable.
fn reject_repeated_files(paths: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(e, path.display()))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            return Err(Error::invalid(format!("{} appears twice in the stack", path.display())));
        }
    }
    Ok(())
}
