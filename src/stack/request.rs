//! The per-request path of a [`Stack`]: reads resolve through the owner
//! map, writes allocate (claim, copy up, link) the clusters the top lacks,
//! and each request completes once the BAT entries it relies on are written.

use std::future::poll_fn;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use crate::error::{Error, Result};
use crate::io::wait::{Entered, WaitList};
use crate::io::{join_all, AlignedBuf, FixedBuf, Io};
use crate::layers::{Layer, MetaError};

use super::mirror::FoldMirror;
use super::{OnDrop, Shape, Stack, NOBODY};

/// One piece of a planned request, in request order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    /// Transfer `len` bytes between the request buffer at `buf_off` and
    /// file `fd` at `file_off`.
    Data { fd: RawFd, file_off: u64, buf_off: usize, len: usize },
    /// The request buffer at `buf_off` reads as zeros.
    Zero { buf_off: usize, len: usize },
    /// Read `len` bytes through layer `layer`'s own mapping from `at` (a
    /// QCOW2 base: its bytes are inflated, zeroed or found in its backing
    /// files, not stored in place).
    Mapped { layer: u8, at: u64, buf_off: usize, len: usize },
}

impl Stack {
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
    pub(super) fn plan_read(&self, shape: &Shape, offset: u64, len: usize, segs: &mut Vec<Seg>) {
        for (c, within, buf_off, n) in self.pieces(offset, len) {
            // The owner map can name the top for an instant after a failed
            // BAT write undid its entry: then look below.
            let found = shape
                .owner_of(c)
                .and_then(|i| Some((i, shape.layers[i].lookup(c, self.cluster)?)))
                .or_else(|| shape.holder_below_top(c, self.cluster).map(|i| (i, shape.layers[i].lookup(c, self.cluster).unwrap())));
            let seg = match found {
                Some((i, base)) if shape.layers[i].stored_in_place() => {
                    Seg::Data { fd: shape.layers[i].file().fd(), file_off: base + within, buf_off, len: n }
                }
                Some((i, at)) => Seg::Mapped { layer: i as u8, at: at + within, buf_off, len: n },
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
        // A stack closed by a failure may lack its top: reading the layers
        // below would show old data.
        shape.check_open()?;
        let mut segs = Vec::with_capacity(2);
        self.plan_read(&shape, offset, len, &mut segs);
        read_segs(io, &shape.layers, &segs, dst).await.map_err(|e| Error::io(e, "reading image data"))
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
        shape.check_sync_ok()?;
        // Marked after the write, or if its future is dropped half way.
        let _marks = OnDrop::new(|| mark_trackers(&shape, offset, len));
        match &shape.fold {
            Some(fold) => self.write_carried(io, &shape, fold, offset, data).await,
            None => self.write_entered(io, &shape, offset, data).await,
        }
    }

    /// A write during a fold: inside the sections of its clusters, the
    /// bytes go to the top and, for each cluster the fold has copied, to
    /// the parent's file as well, both at once. Whatever was not carried
    /// over is marked for the fold's next round (see `mirror`).
    async fn write_carried<I: Io>(&self, io: &I, shape: &Shape, fold: &FoldMirror, offset: u64, data: Src<'_>) -> Result<()> {
        fold.note_change();
        let clusters = self.clusters_of(offset, data.len());
        let sections = fold.write_sections(clusters.clone(), offset..offset + data.len() as u64).await;
        let into = fold.into.file();
        let mut carried = Vec::with_capacity(2);
        let mut not_carried: Vec<u64> = Vec::new();
        for (c, within, buf_off, n) in self.pieces(offset, data.len()) {
            match fold.placed(c) {
                Some(to) => push_merged(&mut carried, Seg::Data { fd: into.fd(), file_off: to + within, buf_off, len: n }),
                None => not_carried.push(c),
            }
        }
        // A future dropped between its writes (one dropped with I/O in
        // flight aborts the process) may have changed either file: copied
        // again, before the sections are left.
        let unsettled = OnDrop::new(|| fold.changed(clusters.clone()));
        let to_top = self.write_entered(io, shape, offset, data);
        let to_parent = async { if carried.is_empty() { Ok(()) } else { write_segs(io, &carried, data).await } };
        let (result, copied) = futures_lite::future::zip(to_top, to_parent).await;
        unsettled.defuse();
        if result.is_err() || copied.is_err() {
            // Marking a carried cluster again costs a copy, never a byte.
            fold.changed(clusters);
        } else {
            for c in not_carried {
                fold.changed(c..c + 1);
            }
        }
        drop(sections);
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
                    let fill = match data {
                        _ if within == 0 && n == self.copy_len(c) => Fill::Whole(data, buf_off),
                        // Laid over the copy: one write instead of two.
                        Src::Mem(bytes) => Fill::CopyUpUnder(&bytes[buf_off..buf_off + n], within as usize),
                        // A kernel buffer cannot be copied from here.
                        Src::Fixed(_) => Fill::CopyUp,
                    };
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
    /// not show, so a crash at any point leaves each byte old or new. With a
    /// link log, the link is recorded there instead and the sync waits for
    /// the next flush (see `layers::ploop::links`); not during a fold, whose
    /// copies rely on the top's entries as they are.
    ///
    /// The cluster is claimed for the duration: other requests that need it
    /// wait for this one; requests on other clusters go on.
    pub(super) async fn allocate<I: Io>(&self, io: &I, shape: &Shape, c: u64, fill: Fill<'_>) -> Result<(u64, bool, bool)> {
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
        let path = top.file().path.display();
        let mut written = false;
        match (fill, below) {
            (Fill::CopyUp, Some(i)) => {
                self.copy_up(io, &shape.layers[i], c, top, offset, None).await?;
            }
            (Fill::CopyUpUnder(bytes, within), Some(i)) => {
                self.copy_up(io, &shape.layers[i], c, top, offset, Some((bytes, within))).await?;
                written = true;
            }
            (Fill::Whole(data, buf_off), Some(_)) => {
                // Until it is linked, readers still see the lower cluster.
                let seg = Seg::Data { fd: top.file().fd(), file_off: offset, buf_off, len: self.copy_len(c) };
                write_segs(io, &[seg], data).await.map_err(|e| Error::io(e, format_args!("{path}: writing a whole cluster")))?;
                written = true;
            }
            // Nothing below: the fresh cluster's zeros are what the disk
            // showed, so the caller's write may race its BAT entry.
            _ => {
                shape.owner.set(c, shape.top_index());
                top.link(c, offset);
                return Ok((offset, true, false));
            }
        }
        // The cluster now holds bytes the disk did not show before: data
        // before index, through the link log or by a sync. The record is in
        // the log before any request can find the link.
        let logged = match top.defers_links() && shape.fold.is_none() {
            true => top.log_link(io, c, offset).await,
            false => None,
        };
        if logged.is_none() && !crate::mutant::off("copy-up-sync") {
            top.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: syncing a copied cluster")))?;
        }
        // Owner first: a write that finds the link and completes must be
        // seen by every later read, which looks at the owner map first (an
        // owner naming the top before its entry exists resolves below).
        shape.owner.set(c, shape.top_index());
        match logged {
            Some(slot) => top.link_logged(c, offset, slot),
            None => {
                top.link(c, offset);
            }
        }
        Ok((offset, true, written))
    }

    /// Copy cluster `c` up from `src` to `offset` in the top, with a
    /// request's bytes laid over it at `within` if given (not synced: see
    /// `allocate`).
    async fn copy_up<I: Io>(&self, io: &I, src: &Layer, c: u64, top: &Layer, offset: u64, over: Option<(&[u8], usize)>) -> Result<()> {
        let src_off = src.lookup(c, self.cluster).expect("owner map and BAT agree");
        let mut buf = self.bufs.get();
        let result = async {
            let (from, to) = (src.file(), top.file());
            let buf = &mut buf[..self.copy_len(c)];
            src.read_at(io, buf, src_off).await.map_err(|e| Error::io(e, format_args!("{}: copy-up read", from.path.display())))?;
            if let Some((bytes, within)) = over {
                buf[within..within + bytes.len()].copy_from_slice(bytes);
            }
            io.write_at(to.fd(), buf, offset).await.map_err(|e| Error::io(e, format_args!("{}: copy-up write", to.path.display())))
        }
        .await;
        self.bufs.put(buf);
        result?;
        self.copy_ups.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
        shape.check_sync_ok()?;
        let _sections = self.fold_sections(&shape, offset, len).await;
        // Marked before the sections are left (declared after them), also
        // if the future is dropped half way.
        let _marks = OnDrop::new(|| mark(self, &shape, offset, len));
        self.write_zeroes_entered(io, &shape, offset, len).await
    }

    /// During a fold, zeroes and discards hold their clusters' sections
    /// (shared, as writes do) until they are marked: the fold's copy of a
    /// cluster then never reads an entry they linked whose table write may
    /// still fail (a copy over the parent's own cluster, of bytes the top
    /// then gives up, would leave the parent showing them).
    async fn fold_sections<'a>(&self, shape: &'a Shape, offset: u64, len: usize) -> Vec<super::mirror::WriteSection<'a>> {
        match &shape.fold {
            Some(fold) => fold.write_sections(self.clusters_of(offset, len), offset..offset + len as u64).await,
            None => Vec::new(),
        }
    }

    async fn write_zeroes_entered<I: Io>(&self, io: &I, shape: &Shape, offset: u64, len: usize) -> Result<()> {
        let top = shape.top();
        let window = top.window_start();
        for (c, within, _, n) in self.pieces(offset, len) {
            // The top's own BAT decides what it holds (the owner map can
            // lag for an instant behind a rolled-back entry).
            if let Some(base) = top.lookup(c, self.cluster) {
                punch(io, top, c, base + within, n).await?;
            } else if shape.holder_below(c, self.cluster).is_some() {
                // Lower data must be hidden by a cluster of the top.
                let whole = within == 0 && n == self.copy_len(c);
                let (base, fresh, _) = self.allocate(io, shape, c, if whole { Fill::Nothing } else { Fill::CopyUp }).await?;
                // A fresh cluster already reads as zeros; one that a
                // concurrent write allocated first holds data to zero.
                if !(whole && fresh) {
                    punch(io, top, c, base + within, n).await?;
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
        shape.check_sync_ok()?;
        let _sections = self.fold_sections(&shape, offset, len).await;
        let changed = std::cell::Cell::new(false);
        // As for zeroes, once a punch began.
        let _marks = OnDrop::new(|| {
            if changed.get() {
                mark(self, &shape, offset, len)
            }
        });
        let top = shape.top();
        let window = top.window_start();
        for (c, within, _, n) in self.pieces(offset, len) {
            if let Some(base) = top.lookup(c, self.cluster) {
                changed.set(true);
                punch(io, top, c, base + within, n).await?;
            }
        }
        // Punched clusters may have been linked by writes still in flight.
        self.finish(io, &shape, window, self.clusters_of(offset, len)).await
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

    pub(super) async fn flush_shape<I: Io>(&self, io: &I, shape: &Shape) -> Result<()> {
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
    pub(super) async fn finish<I: Io>(&self, io: &I, shape: &Shape, window: Option<u64>, clusters: Range<u64>) -> Result<()> {
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
    pub(super) fn rolled_back(&self, shape: &Shape, e: MetaError) -> Error {
        if !e.rolled_back.is_empty() {
            let busy = self.busy.lock().unwrap();
            for c in e.rolled_back {
                if !busy.contains_key(&c) && shape.top().lookup(c, self.cluster).is_none() {
                    let below = shape.holder_below_top(c, self.cluster).map_or(NOBODY, |i| i as u8);
                    shape.owner.set(c, below);
                }
            }
        }
        e.error
    }
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

/// A change by zeroes or a discard: the trackers note it, and a fold
/// copies its clusters again (it is never carried over; see `mirror`).
fn mark(stack: &Stack, shape: &Entered<'_, Shape>, offset: u64, len: usize) {
    mark_trackers(shape, offset, len);
    if let Some(fold) = &shape.fold {
        fold.note_change();
        fold.changed(stack.clusters_of(offset, len));
    }
}

fn mark_trackers(shape: &Entered<'_, Shape>, offset: u64, len: usize) {
    for t in &shape.trackers {
        t.mark_range(offset, len as u64);
    }
}

/// Make `n` bytes of `layer` at `at` (in cluster `c`) read as zeros: a
/// hole, or zeros written where the filesystem cannot punch or where the
/// cluster's link is in the link log only (see `Layer::link_pending`).
async fn punch<I: Io>(io: &I, layer: &Layer, c: u64, at: u64, n: usize) -> Result<()> {
    let file = layer.file();
    if !layer.link_pending(c) {
        match io.punch_hole(file.fd(), at, n as u64).await {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(Error::io(e, format_args!("{}: punching a hole", file.path.display()))),
        }
    }
    let zeros = AlignedBuf::zeroed(n);
    io.write_at(file.fd(), &zeros, at).await.map_err(|e| Error::io(e, file.path.display()))
}

/// Where a request's bytes go: our memory, or a buffer registered on the
/// ring (zero copy).
pub(super) enum Dst<'a> {
    Mem(&'a mut [u8]),
    Fixed(FixedBuf),
}

/// What a newly allocated cluster of the top is given before it is linked.
#[derive(Clone, Copy)]
pub(super) enum Fill<'a> {
    /// Nothing: it reads as zeros (a caller about to zero it all).
    Nothing,
    /// The content it shows now, from the layer below that holds it.
    CopyUp,
    /// The same with a request's bytes over it from offset `.1` within the
    /// cluster: the request is done with the copy.
    CopyUpUnder(&'a [u8], usize),
    /// A request's bytes from `buf_off` on, which cover the whole cluster.
    Whole(Src<'a>, usize),
}

/// Where a write's bytes come from.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
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

/// Move planned read segments into `dst`, all in flight together;
/// `layers` are those the segments name.
pub(super) async fn read_segs<I: Io>(io: &I, layers: &[Arc<Layer>], segs: &[Seg], dst: Dst<'_>) -> std::io::Result<()> {
    let buf = match dst {
        Dst::Mem(buf) => buf,
        Dst::Fixed(fixed) => {
            let transfer = |seg: &Seg| {
                let seg = *seg;
                async move {
                    match seg {
                        Seg::Data { fd, file_off, buf_off, len } => io.read_fixed(fd, fixed.slice(buf_off, len), file_off).await,
                        Seg::Zero { buf_off, len } => io.zero_fixed(fixed.slice(buf_off, len)).await,
                        Seg::Mapped { layer, at, buf_off, len } => {
                            let mut bounce = AlignedBuf::zeroed(len);
                            layers[layer as usize].read_at(io, &mut bounce, at).await?;
                            io.copy_to_fixed(&bounce, fixed.slice(buf_off, len)).await
                        }
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
    let mut mapped = Vec::new();
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
            Seg::Mapped { layer, at, len, .. } => {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                mapped.push((&layers[layer as usize], at, piece));
                rest = tail;
            }
        }
    }
    if mapped.is_empty() {
        return join_all(futures).await.into_iter().collect();
    }
    // Pieces through a layer's own mapping (rare: a QCOW2 base) run beside
    // the file transfers, one after another.
    let through_layers = async {
        for (layer, at, piece) in mapped {
            layer.read_at(io, piece, at).await?;
        }
        Ok(())
    };
    let (files, layers): (Vec<std::io::Result<()>>, std::io::Result<()>) = futures_lite::future::zip(join_all(futures), through_layers).await;
    files.into_iter().collect::<std::io::Result<()>>().and(layers)
}

/// Move planned write segments from `data`, all in flight together.
async fn write_segs<I: Io>(io: &I, segs: &[Seg], data: Src<'_>) -> std::io::Result<()> {
    let transfer = |seg: &Seg| {
        let seg = *seg;
        async move {
            match (seg, data) {
                (Seg::Data { fd, file_off, buf_off, len }, Src::Mem(data)) => io.write_at(fd, &data[buf_off..buf_off + len], file_off).await,
                (Seg::Data { fd, file_off, buf_off, len }, Src::Fixed(fixed)) => io.write_fixed(fd, fixed.slice(buf_off, len), file_off).await,
                (Seg::Zero { .. } | Seg::Mapped { .. }, _) => unreachable!("writes plan only data segments"),
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
        (Some(Seg::Mapped { layer, at, buf_off, len }), Seg::Mapped { layer: l2, at: at2, buf_off: b2, len: n })
            if *layer == l2 && *at + *len as u64 == at2 && *buf_off + *len == b2 =>
        {
            *len += n;
        }
        _ => segs.push(seg),
    }
}
