//! A stack of layers served as one disk: reads resolve each cluster to the
//! topmost layer that holds it, writes go to the top (copy-on-write from
//! below on first touch).
//!
//! Lookup cost does not depend on depth: `owner` keeps, per cluster, the
//! index of the topmost layer that holds it, updated on every allocation.
//!
//! The I/O path is split in two so that a frontend can run the data
//! transfers on its own ring: `plan_read`/`plan_write` turn a request into
//! file segments (allocating clusters on the way, synchronously, through
//! the given backend), and the caller moves the bytes. `read`/`write` do
//! both for callers that just want the data.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Direct, IoBackend, IoOp};
use crate::layers::header::DEFAULT_CLUSTER;
use crate::layers::{Layer, OpenReport, PloopLayer};
use crate::tracker::Tracker;

/// Deepest stack we serve: layer indexes must fit the u8 owner map, with
/// one value left to mean "no layer".
pub const MAX_DEPTH: usize = 255;
const NOBODY: u8 = u8::MAX;

/// One piece of a planned request, in request order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    /// Transfer `len` bytes between the request buffer at `buf_off` and
    /// file `fd` at `file_off`.
    Data { fd: RawFd, file_off: u64, buf_off: usize, len: usize },
    /// The request buffer at `buf_off` reads as zeros.
    Zero { buf_off: usize, len: usize },
}

/// See `Stack::flush_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushKind {
    /// Read-only: nothing to make durable.
    Nothing,
    /// An fdatasync of this descriptor is the whole flush.
    SyncData(RawFd),
}

/// What `plan_write` hands back: pass it to `finish_write` once the data
/// transfers completed, before acknowledging the write.
#[must_use = "a planned write must be finished with Stack::finish_write"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteTicket(Option<(u64, u64)>);

#[derive(Clone, Debug, Default)]
pub struct StackOptions {
    /// Open every layer read-only (the top too).
    pub read_only: bool,
    pub direct: Direct,
}

pub struct Stack {
    layers: Vec<Layer>,
    owner: Box<[AtomicU8]>,
    cluster: u64,
    size: u64,
    block: u32,
    read_only: bool,
    direct: Direct,
    /// Serialises cluster allocation in the top layer, and holds the
    /// copy-on-write buffer so that it is not reallocated per cluster.
    alloc: Mutex<Option<AlignedBuf>>,
    tracker: Option<Arc<Tracker>>,
}

impl Stack {
    /// Open images bottom first; the last one is the top.
    pub fn open(paths: &[PathBuf], opts: &StackOptions) -> Result<(Stack, Vec<OpenReport>)> {
        if paths.is_empty() {
            return Err(Error::invalid("a stack needs at least one image"));
        }
        if paths.len() > MAX_DEPTH {
            return Err(Error::invalid(format!("stack of {} layers exceeds the limit of {MAX_DEPTH}", paths.len())));
        }
        reject_repeated_files(paths)?;
        let mut layers = Vec::with_capacity(paths.len());
        let mut reports = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let writable = !opts.read_only && i + 1 == paths.len();
            let (layer, report) = Layer::open(path, writable, opts.direct)?;
            layers.push(layer);
            reports.push(report);
        }
        match Stack::from_layers(layers, opts) {
            Ok(stack) => Ok((stack, reports)),
            Err((e, layers)) => {
                // The top was marked in use when it opened: leave it clean.
                if let Some(top) = layers.last() {
                    let _ = top.close(&mut crate::io::SyncBackend::new());
                }
                Err(e)
            }
        }
    }

    fn from_layers(layers: Vec<Layer>, opts: &StackOptions) -> std::result::Result<Stack, (Error, Vec<Layer>)> {
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
        let clusters = size.div_ceil(cluster);
        let owner: Box<[AtomicU8]> = (0..clusters).map(|_| AtomicU8::new(NOBODY)).collect();
        for (index, layer) in layers.iter().enumerate() {
            for (c, slot) in owner.iter().enumerate() {
                if layer.lookup(c as u64, cluster).is_some() {
                    slot.store(index as u8, Ordering::Relaxed);
                }
            }
        }
        let block = layers.iter().map(|l| l.file().block_size).max().unwrap_or(512);
        if size % block as u64 != 0 {
            let e = Error::invalid(format!(
                "disk size {size} is not a multiple of the O_DIRECT block size {block} of the image filesystem (try --direct=off)"
            ));
            return Err((e, layers));
        }
        let read_only = opts.read_only || !top.file().writable;
        Ok(Stack { layers, owner, cluster, size, block, read_only, direct: opts.direct, alloc: Mutex::new(None), tracker: None })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }
    /// Offsets and lengths of requests must be multiples of this.
    pub fn block_size(&self) -> u32 {
        self.block
    }
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn top_index(&self) -> u8 {
        (self.layers.len() - 1) as u8
    }
    fn top(&self) -> &Layer {
        self.layers.last().expect("stack is never empty")
    }

    /// Attach (or detach) the write tracker; every later change is marked.
    pub fn set_tracker(&mut self, tracker: Option<Arc<Tracker>>) {
        self.tracker = tracker;
    }
    pub fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.as_ref()
    }

    /// Index of the topmost layer holding cluster `c`, if any.
    pub fn owner_of(&self, c: u64) -> Option<usize> {
        match self.owner.get(c as usize)?.load(Ordering::Acquire) {
            NOBODY => None,
            i => Some(i as usize),
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let block = self.block as u64;
        if offset % block != 0 || len as u64 % block != 0 {
            return Err(Error::invalid(format!("request {offset}+{len} is not aligned to {block} bytes")));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(libc::EINVAL, format!("request {offset}+{len} goes past the end of the disk ({})", self.size))),
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
    pub fn plan_read(&self, offset: u64, len: usize, segs: &mut Vec<Seg>) -> Result<()> {
        self.check_range(offset, len)?;
        segs.clear();
        for (c, within, buf_off, n) in self.pieces(offset, len) {
            let seg = match self.owner_of(c) {
                None => Seg::Zero { buf_off, len: n },
                Some(i) => {
                    // The owner map can name the top for an instant after a
                    // failed BAT write undid its entry: then look below.
                    let found = Some(i)
                        .filter(|&i| self.layers[i].lookup(c, self.cluster).is_some())
                        .or_else(|| self.holder_below_top(c));
                    match found {
                        Some(i) => {
                            let layer = &self.layers[i];
                            let base = layer.lookup(c, self.cluster).expect("checked above");
                            Seg::Data { fd: layer.file().fd(), file_off: base + within, buf_off, len: n }
                        }
                        None => Seg::Zero { buf_off, len: n },
                    }
                }
            };
            push_merged(segs, seg);
        }
        Ok(())
    }

    /// Resolve a write into segments of the top layer, allocating (and
    /// copying up from below) every cluster the top does not hold yet.
    /// The returned ticket goes to `finish_write` after the data is written.
    pub fn plan_write(&self, io: &mut dyn IoBackend, offset: u64, len: usize, segs: &mut Vec<Seg>) -> Result<WriteTicket> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        segs.clear();
        let window = self.window_start();
        let top = self.top_index();
        let fd = self.top().file().fd();
        for (c, within, buf_off, n) in self.pieces(offset, len) {
            let held = match self.owner_of(c) {
                Some(i) if i as u8 == top => self.top().lookup(c, self.cluster),
                _ => None,
            };
            let base = match held {
                Some(base) => base,
                None => self.allocate(io, c, true)?.0,
            };
            push_merged(segs, Seg::Data { fd, file_off: base + within, buf_off, len: n });
        }
        if let Some(t) = &self.tracker {
            t.mark_range(offset, len as u64);
        }
        Ok(self.ticket(window))
    }

    /// Give cluster `c` a home in the top layer and return its file offset.
    /// With `copy_up`, the cluster's current content (from the layer that
    /// holds it now) is copied there and synced before the BAT entry is
    /// written: the entry never points at bytes other than what the disk
    /// showed before, so a crash at any point leaves each byte old or new.
    /// Also says whether the cluster is fresh (linked by this call).
    fn allocate(&self, io: &mut dyn IoBackend, c: u64, copy_up: bool) -> Result<(u64, bool)> {
        let mut scratch = self.alloc.lock().unwrap();
        let top_index = self.top_index();
        if let Some(base) = self.top().lookup(c, self.cluster) {
            // Another request allocated it while we waited.
            return Ok((base, false));
        }
        let below = self.holder_below(c);
        let Layer::Ploop(top) = self.top() else {
            unreachable!("a raw top layer holds every cluster");
        };
        let offset = top.reserve_cluster(io)?;
        if let (true, Some(i)) = (copy_up, below) {
            let src = &self.layers[i];
            let src_off = src.lookup(c, self.cluster).expect("owner map and BAT agree");
            let buf = scratch.get_or_insert_with(|| AlignedBuf::zeroed(self.cluster as usize));
            let n = self.copy_len(c);
            io.submit(&mut [IoOp::read(src.file().fd(), src_off, &mut buf[..n])])
                .map_err(|e| Error::io(e, format_args!("{}: copy-up read", src.file().path.display())))?;
            io.submit(&mut [IoOp::write(top.file().fd(), offset, &buf[..n])])
                .map_err(|e| Error::io(e, format_args!("{}: copy-up write", top.file().path.display())))?;
            // Data before index: the copy is durable before the entry.
            io.sync_data(top.file().fd())
                .map_err(|e| Error::io(e, format_args!("{}: copy-up sync", top.file().path.display())))?;
        }
        top.link(c, offset);
        self.owner[c as usize].store(top_index, Ordering::Release);
        Ok((offset, true))
    }

    /// Bytes of cluster `c` inside the disk (the last one may be partial).
    fn copy_len(&self, c: u64) -> usize {
        (self.size - c * self.cluster).min(self.cluster) as usize
    }

    /// Zero a range: afterwards it reads as zeros, whatever lower layers hold.
    pub fn write_zeroes(&self, io: &mut dyn IoBackend, offset: u64, len: usize) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let window = self.window_start();
        for (c, within, _, n) in self.pieces(offset, len) {
            // The top's own BAT decides what it holds (the owner map can
            // lag for an instant behind a rolled-back entry).
            if let Some(base) = self.top().lookup(c, self.cluster) {
                self.punch_top(io, base + within, n)?;
            } else if self.holder_below(c).is_some() {
                // Lower data must be hidden by a cluster of the top.
                let whole = within == 0 && n as u64 == self.cluster.min(self.size - c * self.cluster);
                let (base, fresh) = self.allocate(io, c, !whole)?;
                // A fresh cluster already reads as zeros; one that a
                // concurrent write allocated first holds data to zero.
                if !(whole && fresh) {
                    self.punch_top(io, base + within, n)?;
                }
            }
        }
        if let Some(t) = &self.tracker {
            t.mark_range(offset, len as u64);
        }
        self.finish_write(io, self.ticket(window))
    }

    /// Discard a range: space the top layer holds there is released and
    /// reads as zeros; data that lives only in lower (read-only) layers is
    /// left as it is, since reclaiming it would cost space, not save it.
    pub fn discard(&self, io: &mut dyn IoBackend, offset: u64, len: usize) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let window = self.window_start();
        let mut changed = false;
        for (c, within, _, n) in self.pieces(offset, len) {
            if let Some(base) = self.top().lookup(c, self.cluster) {
                self.punch_top(io, base + within, n)?;
                changed = true;
            }
        }
        if let (true, Some(t)) = (changed, &self.tracker) {
            t.mark_range(offset, len as u64);
        }
        // Punched clusters may have been linked by writes still in flight.
        self.finish_write(io, self.ticket(window))
    }

    /// Make `n` bytes of the top file at `at` read as zeros.
    fn punch_top(&self, io: &mut dyn IoBackend, at: u64, n: usize) -> Result<()> {
        let top = self.top();
        let fd = top.file().fd();
        match io.punch_hole(fd, at, n as u64) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = AlignedBuf::zeroed(n);
                io.submit(&mut [IoOp::write(fd, at, &zeros)]).map_err(|e| Error::io(e, top.file().path.display()))
            }
            Err(e) => Err(Error::io(e, format_args!("{}: punching a hole", top.file().path.display()))),
        }
    }

    /// Read into `buf` (any alignment; O_DIRECT-aligned buffers avoid a copy).
    pub fn read(&self, io: &mut dyn IoBackend, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut segs = Vec::new();
        self.plan_read(offset, buf.len(), &mut segs)?;
        let mut ops = Vec::with_capacity(segs.len());
        let mut rest = buf;
        let mut at = 0;
        for seg in segs {
            let (buf_off, len) = match seg {
                Seg::Data { buf_off, len, .. } | Seg::Zero { buf_off, len } => (buf_off, len),
            };
            debug_assert_eq!(buf_off, at);
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            at += len;
            match seg {
                Seg::Data { fd, file_off, .. } => ops.push(IoOp::read(fd, file_off, piece)),
                Seg::Zero { .. } => piece.fill(0),
            }
        }
        io.submit(&mut ops).map_err(|e| Error::io(e, "reading image data"))
    }

    /// Write `data` at `offset`.
    pub fn write(&self, io: &mut dyn IoBackend, offset: u64, data: &[u8]) -> Result<()> {
        let mut segs = Vec::new();
        let ticket = self.plan_write(io, offset, data.len(), &mut segs)?;
        let mut ops: Vec<IoOp> = segs
            .iter()
            .map(|seg| match *seg {
                Seg::Data { fd, file_off, buf_off, len } => IoOp::write(fd, file_off, &data[buf_off..buf_off + len]),
                Seg::Zero { .. } => unreachable!("writes plan no zero segments"),
            })
            .collect();
        io.submit(&mut ops).map_err(|e| Error::io(e, "writing image data"))?;
        self.finish_write(io, ticket)
    }

    /// What a flush needs: every acknowledged write already has its BAT
    /// entry written, so one data sync of the top file makes them all
    /// durable; frontends with their own ring run it asynchronously.
    pub fn flush_kind(&self) -> FlushKind {
        if self.read_only {
            return FlushKind::Nothing;
        }
        FlushKind::SyncData(self.top().file().fd())
    }

    /// Make every completed write durable.
    pub fn flush(&self, io: &mut dyn IoBackend) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match self.top() {
            Layer::Ploop(top) => top.flush(io).map_err(|e| self.rolled_back(e)),
            raw => raw.flush(io),
        }
    }

    /// Complete a planned write whose data transfers succeeded: the BAT
    /// entries it (or a concurrent write it relies on) linked are written
    /// before it may be acknowledged. Writes finishing together share the
    /// metadata writes.
    pub fn finish_write(&self, io: &mut dyn IoBackend, ticket: WriteTicket) -> Result<()> {
        match (ticket.0, self.top()) {
            (Some((lo, hi)), Layer::Ploop(top)) => top.write_metadata(io, lo, hi).map_err(|e| self.rolled_back(e)),
            _ => Ok(()),
        }
    }

    /// After a failed BAT write undid some entries of the top: resolve
    /// those clusters to the layers below again.
    fn rolled_back(&self, e: crate::layers::ploop::MetaError) -> Error {
        if !e.rolled_back.is_empty() {
            let _alloc = self.alloc.lock().unwrap();
            for c in e.rolled_back {
                if self.top().lookup(c, self.cluster).is_none() {
                    let below = self.holder_below_top(c).map_or(NOBODY, |i| i as u8);
                    self.owner[c as usize].store(below, Ordering::Release);
                }
            }
        }
        e.error
    }

    /// The topmost layer under the top that holds cluster `c`: the owner
    /// map answers in O(1), unless it names the top (then look below).
    fn holder_below(&self, c: u64) -> Option<usize> {
        match self.owner_of(c) {
            Some(i) if i as u8 != self.top_index() => Some(i),
            Some(_) => self.holder_below_top(c),
            None => None,
        }
    }

    /// The same by scanning the layers (for when the owner map is stale).
    fn holder_below_top(&self, c: u64) -> Option<usize> {
        let top = self.layers.len() - 1;
        (0..top).rev().find(|&i| self.layers[i].lookup(c, self.cluster).is_some())
    }

    /// Where a request's window of BAT generations starts: read before it
    /// looks anything up (see `PloopLayer::first_unwritten`).
    fn window_start(&self) -> u64 {
        match self.top() {
            Layer::Ploop(top) => top.first_unwritten(),
            Layer::Raw(_) => u64::MAX,
        }
    }

    /// The ticket for a request whose window started at `lo`: every BAT
    /// entry it linked or found unwritten is in `lo..=published`.
    fn ticket(&self, lo: u64) -> WriteTicket {
        match self.top() {
            Layer::Ploop(top) => {
                let hi = top.published();
                WriteTicket((hi >= lo).then_some((lo, hi)))
            }
            Layer::Raw(_) => WriteTicket(None),
        }
    }

    /// Flush and mark the top image cleanly closed.
    pub fn close(self, io: &mut dyn IoBackend) -> Result<()> {
        self.mark_clean(io)
    }

    /// Flush and clear the in-use mark, for owners that share the stack
    /// (the daemon) and so cannot consume it. No writes may follow.
    pub fn mark_clean(&self, io: &mut dyn IoBackend) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.top().close(io)
    }


    /// Snapshot: create `path` as a new empty ploop image and make it the
    /// top; the old top becomes a read-only lower layer, cleanly closed.
    pub fn push_layer(&mut self, io: &mut dyn IoBackend, path: &Path) -> Result<()> {
        self.check_writable()?;
        if self.layers.len() >= MAX_DEPTH {
            return Err(Error::invalid(format!("stack already has the maximum of {MAX_DEPTH} layers")));
        }
        PloopLayer::create(path, self.size, self.cluster)?;
        let opened = Layer::open(path, true, self.direct);
        let (new_top, _) = match opened {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        // The old top is made consistent on disk, then demoted in place
        // (its descriptor stays; only its lock and role change), so no step
        // after the new file exists can leave the stack without a top.
        let demoted = self.top().close(io).and_then(|()| self.layers.last_mut().expect("stack is never empty").demote());
        if let Err(e) = demoted {
            drop(new_top);
            let _ = std::fs::remove_file(path);
            // The old top goes on taking writes: it is in use again.
            if let Layer::Ploop(top) = self.top() {
                if let Err(mark) = top.reopen_in_use(io) {
                    tracing::error!("{}: restoring the in-use mark: {mark}", top.file().path.display());
                }
            }
            return Err(e);
        }
        self.layers.push(new_top);
        Ok(())
    }

    /// Paths of the layers, bottom first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|l| l.file().path.clone()).collect()
    }
}

fn push_merged(segs: &mut Vec<Seg>, seg: Seg) {
    match (segs.last_mut(), seg) {
        (Some(Seg::Data { fd, file_off, len, .. }), Seg::Data { fd: fd2, file_off: off2, len: n, .. })
            if *fd == fd2 && *file_off + *len as u64 == off2 =>
        {
            *len += n;
        }
        (Some(Seg::Zero { len, .. }), Seg::Zero { len: n, .. }) => *len += n,
        _ => segs.push(seg),
    }
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
