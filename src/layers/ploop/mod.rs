//! A ploop v2 (or v1) expandable image opened as a layer: BAT lookups for
//! the I/O path (`mod.rs`), cluster allocation at the end of the file
//! (`alloc.rs`), and the crash-safe write-back of BAT changes (`meta.rs`),
//! on a header and BAT read by the loader `check` shares (`load.rs`).
//!
//! Ordering rules (the crash-safety contract):
//! - a BAT entry is written only when the cluster it points to already
//!   holds the disk's current bytes durably: a fresh cluster (zeros, inside
//!   a file size made durable when the file grew) or a copy-up that was
//!   synced. So the entry may reach the disk at any moment after that.
//! - the entry is written before the request that allocated it (or relied
//!   on it) completes; writes that complete together share the chunk write
//!   (`write_metadata`), so a daemon that is killed loses nothing it
//!   acknowledged; a failed chunk write rolls back the entries it carried;
//! - a flush is one data sync of the file: every acknowledged write's data
//!   and BAT entries were written before it was acknowledged;
//! - except with a link log (`links`): a copy-up's entry is then recorded
//!   there and linked in memory only, every BAT write leaves it out, and a
//!   flush syncs the copies before it writes such entries and syncs again.

mod alloc;
pub mod bat;
pub mod check;
pub mod compact;
pub mod ext;
pub mod header;
pub mod links;
pub mod load;
mod meta;
pub mod resize;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::io::{open_image_file_in, wait::SyncGroup, wait::WaitList, Direct, ImageFile, Io};

use bat::BatScan;
use header::{Header, Variant, CLOSED, FLAG_EMPTY, FLAG_VERSION_CONVERT, HEADER_SIZE, IN_USE, SECTOR};
use super::IMAGE_MODE;

pub use meta::MetaError;

pub struct PloopLayer {
    file: ImageFile,
    cluster: u64,
    bat_unit: u64,
    /// The entries of the clusters the disk covers (see `load::used_entries`).
    table: table::Table,
    meta: Mutex<Meta>,
    /// Data syncs of the file, group-committed (copy-ups, flushes).
    syncs: SyncGroup,
    /// Dirty bitmaps a clean close left in the format extension, taken
    /// when the image opened read-write (the file no longer has them).
    saved_bitmaps: Mutex<Vec<ext::DirtyBitmap>>,
    /// Where copy-ups are linked before they are synced (see `links`).
    links: Option<links::LinkLog>,
}

/// The on-disk copy of header + BAT, the allocation cursor, and the state
/// of the metadata writes and of the file's growth.
struct Meta {
    header: Header,
    /// The header's bytes as they should be on disk; with the table and
    /// `tail` they make every block of the metadata area (`Table::bytes_at`).
    head: [u8; HEADER_SIZE],
    /// The bytes after the last used entry, to the end of its block.
    tail: Vec<u8>,
    /// Indexes of `block_size` blocks of the metadata area that differ
    /// from the file.
    dirty: BTreeSet<usize>,
    /// Byte offset of the next cluster to allocate.
    next_free: u64,
    /// End of the space grown ahead of `next_free` (durable file size).
    prealloc_end: u64,
    /// A request is growing the file; others that need space wait.
    growing: bool,
    grow_waiters: WaitList,
    /// Generations of BAT changes: each `link` publishes one; every
    /// generation up to `written` is either on disk or was rolled back, and
    /// `failed` lists the entries that were rolled back: (generation,
    /// cluster). It only grows, by the entries each failed write carried.
    published: u64,
    written: u64,
    failed: Vec<(u64, u64)>,
    /// Linked entries not yet written: (generation, cluster, previous value).
    pending: Vec<(u64, u64, u32)>,
    /// Blocks a failed metadata write carried: on disk they may hold
    /// entries that memory rolled back, until a write of them lands. A
    /// copy-up there is not logged (a replay keeps what the file names).
    stale_on_disk: BTreeSet<usize>,
    /// A metadata write is in flight (one at a time, so an older copy of a
    /// chunk can never land after a newer one); others wait for it.
    writing: bool,
    write_waiters: WaitList,
    /// Entries linked through the link log whose copies are not known
    /// durable: cluster -> the record's slot. Every BAT write leaves them
    /// out, so none reaches the disk before its data.
    unsynced: BTreeMap<u64, u32>,
    /// Logged entries whose copies were synced, written by the next BAT
    /// write: (settle number -> (slot, cluster)); their records go once a sync
    /// followed that write.
    settling: BTreeMap<u64, (u32, u64)>,
    settles: u64,
    /// The header on disk is known to carry the in-use mark (the last
    /// write of block 0 succeeded with it): only then may a copy-up be
    /// linked through the log, whose replay an image not marked refuses.
    disk_in_use: bool,
}

/// What opening found out that a caller may want to report.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// The in-use mark was set: the last writer did not close cleanly.
    pub was_in_use: bool,
    /// Bytes of unreferenced clusters cut from the end of the file.
    pub trimmed_leak: u64,
    /// Unreferenced clusters inside the file given back (punched) after
    /// an unclean stop: allocations whose BAT entries never reached the
    /// disk, below others that did.
    pub released_leak: u64,
    /// Copy-ups a killed session had linked through its link log, linked
    /// in the image now.
    pub relinked: u64,
    /// Records of the link log that no longer fit the image (another tool
    /// opened it meanwhile), dropped.
    pub links_dropped: u64,
}

/// `BatScan::unreferenced_inside` as runs of (byte offset, length), so
/// each run is released with one call.
fn leaked_inside(scan: &BatScan, data_off: u64, cluster: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for at in scan.unreferenced_inside(data_off, cluster) {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == at => *len += cluster,
            _ => runs.push((at, cluster)),
        }
    }
    runs
}

/// Link what a killed session's link log recorded, where the image still
/// agrees: the cluster has no entry, and the offset is a data cluster
/// inside the file that no entry uses and that holds data. Returns the
/// clusters linked.
fn apply_links(
    table: &table::Table,
    scan: &mut BatScan,
    header: &Header,
    file_len: u64,
    found: &[links::Link],
    holds_data: impl Fn(u64, u64) -> bool,
) -> Vec<u64> {
    let (data_off, cluster, unit) = (header.data_off_bytes(), header.cluster_bytes(), header.bat_unit());
    let mut applied = Vec::new();
    for link in found {
        let offset = link.value as u64 * unit;
        if link.cluster >= table.entries() || table.get(link.cluster) != 0 {
            continue;
        }
        if offset < data_off || (offset - data_off) % cluster != 0 || offset + cluster > file_len {
            continue;
        }
        let slot = ((offset - data_off) / cluster) as usize;
        if scan.used.get(slot).is_some_and(|b| *b) {
            continue;
        }
        // A copy is written whole before its record: a cluster without data
        // was released since (punched by an opening without the log).
        if !holds_data(offset, cluster) {
            continue;
        }
        if slot >= scan.used.len() {
            scan.used.resize(slot + 1, false);
        }
        scan.used.set(slot, true);
        scan.allocated += 1;
        scan.high_water = scan.high_water.max(offset + cluster);
        table.set(link.cluster, link.value);
        applied.push(link.cluster);
    }
    applied
}

/// Write zeros over `[from, to)`, a MiB at a time.
pub(super) async fn write_zeros<I: Io>(io: &I, fd: std::os::fd::RawFd, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (to - from).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        io.write_at(fd, &zeros[..n], at).await?;
        at += n as u64;
    }
    Ok(())
}

/// Why an image whose header says ploop's version conversion is under way
/// is neither served nor repaired: its table may be half converted, and
/// only ploop's tool holds the copy to put back.
pub const CONVERSION_INTERRUPTED: &str = "ploop's tool was converting this image between format versions (v1/v2) \
     and did not finish (header flag 2): its table may be half converted, and ploop's tool puts back the copy it kept; \
     open the image with ploop's own tool first";

impl PloopLayer {
    /// Open an image. Damage to the BAT is refused (with a pointer to
    /// `check --repair`); an unclean previous close is tolerated, its
    /// leaked tail trimmed when writable.
    /// With `links` (a volatile directory), a writable image keeps a link
    /// log there, and applies the one a killed session left first.
    pub async fn open<I: Io>(io: &I, mut file: ImageFile, direct: Direct, lock: bool, links: Option<&Path>) -> Result<(PloopLayer, OpenReport)> {
        let path = file.path.display().to_string();
        let mut read = load::read_header(io, file.fd(), &path).await.map_err(|e| e.context(&path))?;
        if file.writable && !file.direct && read.header.in_use == IN_USE {
            // Left in use, read through the cache: a page the last session
            // wrote whose writeback failed stays cached and clean, and a
            // sync of this opening no longer reports that error. Its clean
            // pages go, and the header, the table and the data are read
            // from the disk. (A clean close synced everything it wrote.)
            match io.drop_clean_cache(file.fd()) {
                Ok(()) => read = load::read_header(io, file.fd(), &path).await.map_err(|e| e.context(&path))?,
                Err(e) => tracing::warn!(path, "dropping cached pages before reading: {e}"),
            }
        }
        let (mut header, mut head, file_len) = (read.header, read.head, read.file_len);
        if file_len < header.bat_end() {
            return Err(Error::corrupt(format!("{path}: file is truncated: {file_len} bytes, BAT ends at {}", header.bat_end())));
        }
        let cluster = header.cluster_bytes();
        if file.direct && (cluster % file.block_size as u64 != 0 || header.data_off_bytes() % file.block_size as u64 != 0) {
            // O_DIRECT could not address these clusters; fall back or refuse.
            if direct == Direct::On {
                return Err(Error::invalid(format!(
                    "{path}: clusters are not aligned to the filesystem's O_DIRECT block of {} bytes",
                    file.block_size
                )));
            }
            tracing::warn!(path, "image clusters not aligned for O_DIRECT; using buffered I/O");
            // The lock belongs to the descriptor: drop the old one first
            // (flock would conflict with ourselves), then lock the new one.
            let (p, writable) = (file.path.clone(), file.writable);
            drop(file);
            file = open_image_file_in(io, &p, writable, Direct::Off)?;
            if lock {
                super::lock(io, &file, writable)?;
            }
        }
        if header.flags & FLAG_VERSION_CONVERT != 0 {
            return Err(Error::corrupt(format!("{path}: {CONVERSION_INTERRUPTED}")));
        }
        let block = file.block_size as u64;
        let load::TableRead { table, mut scan, tail } = load::load_table(io, file.fd(), &header, block, file_len, &path).await?;

        if ![0, IN_USE, CLOSED].contains(&header.in_use) {
            // As `check` reports it: the format allows no other value.
            return Err(Error::corrupt(format!(
                "{path}: unknown in-use mark {:#x}; run `ublk-ploop check --repair {path}`",
                header.in_use
            )));
        }
        let mut report = OpenReport { was_in_use: header.in_use == IN_USE, ..Default::default() };
        let mut leaks: Vec<(u64, u64)> = Vec::new();
        let mut dirty: BTreeSet<usize> = BTreeSet::new();
        let mut saved_bitmaps = Vec::new();
        if header.ext_off_sectors != 0 && file.writable {
            // As ploop does on a read-write mount: the bitmaps move into
            // memory and the extension leaves the file (a crash from here
            // on loses them, and then every block counts as changed).
            if header.in_use != CLOSED {
                tracing::warn!(path, "format extension of an image not closed cleanly: dropped");
            } else {
                match ext::read(io, file.fd(), &header, file_len).await {
                    Ok(e) => {
                        if !e.unknown.is_empty() {
                            tracing::warn!(path, features = ?e.unknown, "unknown format extension features dropped");
                        }
                        saved_bitmaps = e.bitmaps;
                    }
                    Err(e) if e.errno() == libc::EOPNOTSUPP => return Err(e.context(&path)),
                    Err(e) => tracing::warn!(path, "{e}; dropped (changed-block tracking starts over)"),
                }
            }
            header.ext_off_sectors = 0;
        }
        if header.flags & FLAG_EMPTY != 0 && file.writable {
            // "Nothing written yet" stops being true with our first write.
            // The BAT stays authoritative, as qemu and check treat it.
            header.flags &= !FLAG_EMPTY;
        }
        if let Some(first_bad) = scan.bad.first() {
            return Err(Error::corrupt(format!(
                "{path}: {} damaged BAT entries (entry {} {}); run `ublk-ploop check --repair {path}`",
                scan.bad.len(),
                first_bad.index,
                first_bad.problem
            )));
        }
        let data_off = header.data_off_bytes();
        // Opened for writing without a log of its own, an image left in use
        // still has the log a killed session left applied, then removed.
        // Read-only under our lock (no writer lives), it is applied in
        // memory: else reads would show bytes from before acknowledged
        // writes.
        let leftover = match (links, report.was_in_use && (file.writable || lock)) {
            (None, true) => links::leftover_dir(io, &path, file.fd(), file.writable)?,
            _ => None,
        };
        // Link the records not in the image yet: (the clusters linked, the
        // records pending). A record whose entry is in the image already
        // was settled (its slot freed, not yet reused): neither news nor
        // loss. Where SEEK_DATA fails, every cluster counts as data.
        let mut replay = |found: &[links::Link]| {
            let pending: Vec<links::Link> = found.iter().copied().filter(|l| table.get(l.cluster) != l.value).collect();
            let applied = apply_links(&table, &mut scan, &header, file_len, &pending, |at, len| !crate::io::is_hole(io, file.fd(), at, len));
            (applied, pending.len())
        };
        if let (Some(dir), false) = (leftover.as_deref(), file.writable) {
            let found = links::LinkLog::read(io, dir, file.fd()).await;
            let found = found.map_err(|e| Error::io(e, format_args!("{path}: reading its link log in {}", dir.display())))?;
            report.relinked = replay(&found).0.len() as u64;
        }
        let mut log = None;
        if let (Some(dir), true) = (links.or(leftover.as_deref()), file.writable) {
            let opened = links::LinkLog::open(io, dir, file.fd()).await;
            let (l, found) = opened.map_err(|e| Error::io(e, format_args!("{path}: opening its link log in {}", dir.display())))?.unzip();
            let found = found.unwrap_or_default();
            if !found.is_empty() && !report.was_in_use {
                // Closed cleanly since, by a tool without the log: what the
                // image holds now is what it shows.
                report.links_dropped = found.iter().filter(|l| table.get(l.cluster) != l.value).count() as u64;
            } else {
                let found = if crate::mutant::off("link-replay") { &[][..] } else { &found[..] };
                let (applied, pending) = replay(found);
                report.relinked = applied.len() as u64;
                report.links_dropped = (pending - applied.len()) as u64;
                dirty.extend(applied.iter().map(|&c| (HEADER_SIZE as u64 + 4 * c) as usize / block as usize));
            }
            if report.links_dropped > 0 {
                tracing::warn!(path, dropped = report.links_dropped, "link log records that no longer fit the image were dropped");
            }
            log = l;
        }
        let (log, applied_only) = match leftover {
            Some(_) => (None, log),
            None => (log, None),
        };
        // Allocate past everything in the file, referenced or not: a leaked
        // cluster may hold garbage that a partial write must not expose.
        let mut next_free = data_off + file_len.saturating_sub(data_off).div_ceil(cluster) * cluster;
        if file.writable {
            if report.was_in_use {
                tracing::warn!(path, "image was not closed cleanly (in-use mark set); BAT checked, no damage");
            }
            if file_len > scan.high_water {
                // Unreferenced tail (trimmed once the in-use mark is on
                // disk): a crash between allocation and flush, another
                // tool's preallocation, or a format extension just taken.
                report.trimmed_leak = file_len - scan.high_water;
                next_free = scan.high_water;
            }
            // Unreferenced clusters inside: a crash between allocation and
            // flush, or another tool's leak (ploop's reverse merge zeroes
            // the base's entries for the top's clusters and allocates them
            // again at the end of the file).
            leaks = leaked_inside(&scan, data_off, cluster);
            header.in_use = IN_USE;
            head = header.to_bytes();
            dirty.insert(0);
        }
        let layer = PloopLayer {
            cluster,
            bat_unit: header.bat_unit(),
            table,
            meta: Mutex::new(Meta {
                header,
                head,
                tail,
                dirty,
                next_free,
                prealloc_end: next_free,
                growing: false,
                grow_waiters: WaitList::default(),
                published: 0,
                written: 0,
                failed: vec![],
                pending: vec![],
                writing: false,
                write_waiters: WaitList::default(),
                unsynced: BTreeMap::new(),
                stale_on_disk: BTreeSet::new(),
                settling: BTreeMap::new(),
                settles: 0,
                disk_in_use: false,
            }),
            // Through the page cache, a failed sync is remembered for good.
            syncs: SyncGroup::new(true),
            file,
            saved_bitmaps: Mutex::new(saved_bitmaps),
            links: log,
        };
        if layer.file.writable {
            if report.relinked > 0 {
                // The copies a killed session wrote are in the page cache:
                // durable before the entries that point at them.
                layer.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: syncing relinked clusters")))?;
            }
            // The in-use mark must be on disk before any data changes.
            layer.write_all_meta(io, true).await.map_err(|e| e.error.of_kind(crate::error::ErrorKind::WritebackFailed))?;
            if let Some(log) = &layer.links {
                // Every record is in the image now, or was dropped.
                log.reset(io).await.map_err(|e| Error::io(e, format_args!("{path}: emptying its link log")))?;
            }
            if let Some(log) = &applied_only {
                // Its records are in the image, durably. Emptied first: a
                // record left behind by a failed removal could apply again
                // once a discard has taken its cluster's entry away.
                if log.reset(io).await.is_ok() {
                    let _ = io.remove_file(&log.path);
                }
            }
            if report.trimmed_leak > 0 {
                io.set_len(layer.file.fd(), next_free).await.map_err(|e| Error::io(e, &path))?;
            }
            // Nothing on disk points at these, and nothing will until they
            // are allocated again (allocation goes past the file's end):
            // giving them back cannot lose data, failing to only keeps
            // them leaked, as before.
            for &(at, len) in &leaks {
                match io.punch_hole(layer.file.fd(), at, len).await {
                    Ok(()) => report.released_leak += len,
                    Err(e) => {
                        tracing::warn!(path, at, len, "leaked clusters not released: {e}");
                        break;
                    }
                }
            }
        }
        Ok((layer, report))
    }

    /// Create a new, empty v2 image file (fails if `path` exists).
    pub async fn create<I: Io>(io: &I, path: &Path, size: u64, cluster: u64) -> Result<Header> {
        Self::create_variant(io, path, size, cluster, Variant::V2).await
    }

    /// Create a new, empty image file of either version (a delta takes its
    /// chain's version: ploop refuses to merge mixed ones). Mode 0600, as
    /// ploop creates images: they hold a container's data.
    pub async fn create_variant<I: Io>(io: &I, path: &Path, size: u64, cluster: u64, variant: Variant) -> Result<Header> {
        let header = Header::new_variant(size, cluster, variant)?;
        let file = io.open(path, &crate::io::OpenHow::create_new(IMAGE_MODE)).map_err(|e| Error::io(e, path.display()))?;
        // The header, then an empty BAT up to the data area, allocated (so
        // that BAT writes never need space the filesystem may not have
        // later) but not written: the table's unwritten extents read as
        // zeros and as holes, so opening a thin disk reads only the blocks
        // that hold entries. Where the filesystem cannot allocate, zeros
        // are written, a chunk at a time.
        let fd = file.fd();
        let meta_end = header.data_off_bytes();
        let first = meta_end.min(4096) as usize;
        let mut chunk = vec![0u8; first];
        chunk[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let mut result = io.write_at(fd, &chunk, 0).await;
        if result.is_ok() && meta_end > first as u64 {
            result = match io.allocate(fd, first as u64, meta_end - first as u64).await {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(io, fd, first as u64, meta_end).await,
                other => other,
            };
        }
        if result.is_ok() {
            result = io.sync_data(fd).await;
        }
        if let Err(e) = result {
            drop(file);
            let _ = io.remove_file(path);
            return Err(Error::io(e, path.display()));
        }
        Ok(header)
    }

    pub fn file(&self) -> &ImageFile {
        &self.file
    }
    pub fn into_file(self) -> ImageFile {
        self.file
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }
    pub fn size(&self) -> u64 {
        self.meta.lock().unwrap().header.size_bytes()
    }
    pub fn header(&self) -> Header {
        self.meta.lock().unwrap().header.clone()
    }

    /// File offset of virtual cluster `c`, if allocated here.
    #[inline]
    pub fn lookup(&self, c: u64) -> Option<u64> {
        match self.table.get(c) {
            0 => None,
            v => Some(v as u64 * self.bat_unit),
        }
    }

    /// The clusters allocated here and their file offsets, ascending.
    pub fn allocated(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.table.present().map(|(c, v)| (c, v as u64 * self.bat_unit))
    }

    /// Bytes of memory the BAT holds.
    pub fn table_bytes(&self) -> u64 {
        self.table.bytes()
    }

    /// The dirty bitmaps the image carried when it was opened read-write.
    pub fn take_saved_bitmaps(&self) -> Vec<ext::DirtyBitmap> {
        std::mem::take(&mut *self.saved_bitmaps.lock().unwrap())
    }

    /// Flush and clear the in-use mark: the image is consistent on disk.
    /// The caller guarantees that no request is in flight.
    pub async fn close<I: Io>(&self, io: &I) -> Result<()> {
        self.close_with_bitmaps(io, &[]).await
    }

    /// Close, keeping `bitmaps` in a format extension after the last
    /// cluster, as ploop does: written and synced before the header that
    /// points at it says "closed with a valid extension". If the extension
    /// cannot be written, the image closes without it (a warning).
    pub async fn close_with_bitmaps<I: Io>(&self, io: &I, bitmaps: &[ext::DirtyBitmap]) -> Result<()> {
        if !self.file.writable {
            return Ok(());
        }
        self.settle(io).await?;
        self.write_all_meta(io, false).await.map_err(|e| e.error)?;
        let path = self.file.path.display();
        self.sync_data(io).await.map_err(|e| Error::io(e, format_args!("{path}: flushing")))?;
        // Give back the space grown ahead; the file ends at its last cluster.
        let end = self.meta.lock().unwrap().next_free;
        io.set_len(self.file.fd(), end).await.map_err(|e| Error::io(e, &path))?;
        self.meta.lock().unwrap().prealloc_end = end;
        if !bitmaps.is_empty() {
            let header = self.meta.lock().unwrap().header.clone();
            let written = async {
                let (bytes, ext_at) = ext::encode(&header, bitmaps, end)?;
                io.write_at(self.file.fd(), &bytes, end).await.map_err(|e| Error::io(e, "writing the format extension"))?;
                self.sync_data(io).await.map_err(|e| Error::io(e, "writing the format extension"))?;
                Ok::<u64, Error>(ext_at)
            };
            match written.await {
                Ok(ext_at) => self.meta.lock().unwrap().header.ext_off_sectors = ext_at / SECTOR,
                Err(e) => tracing::warn!(path = %path, "{e}; closing without the changed-block record"),
            }
        }
        self.set_in_use(io, CLOSED).await?;
        if let Some(log) = &self.links {
            // Its records are all in the image (a stale one would only be
            // dropped with a warning by the next open).
            if let Err(e) = log.reset(io).await {
                tracing::warn!(log = %log.path.display(), "emptying the link log: {e}");
            }
        }
        Ok(())
    }

    /// Remove the link log's file: the image is closed for good (or
    /// removed, whatever its close did), so no record may meet a later
    /// file on the same inode.
    pub fn remove_link_log<I: Io>(&self, io: &I) {
        if let Some(log) = &self.links {
            let _ = io.remove_file(&log.path);
        }
    }

    /// Set the in-use mark again on a top that stays writable after a
    /// `close` (a snapshot that failed half way). Even if this write fails,
    /// the mark is in the pending header, so every later header write
    /// carries it.
    pub async fn reopen_in_use<I: Io>(&self, io: &I) -> Result<()> {
        self.meta.lock().unwrap().header.ext_off_sectors = 0;
        self.set_in_use(io, IN_USE).await
    }

    async fn set_in_use<I: Io>(&self, io: &I, mark: u32) -> Result<()> {
        let before = {
            let mut meta = self.meta.lock().unwrap();
            let before = meta.header.in_use;
            meta.header.in_use = mark;
            meta.head = meta.header.to_bytes();
            meta.dirty.insert(0);
            before
        };
        let result = self.write_all_meta(io, true).await.map_err(|e| e.error);
        if result.is_err() && mark != IN_USE && before == IN_USE {
            // A close that failed leaves the image in service: the mark
            // it could not clear stays in the header later writes carry
            // (else one of them would say CLOSED under logged links).
            let mut meta = self.meta.lock().unwrap();
            meta.header.in_use = IN_USE;
            meta.head = meta.header.to_bytes();
            meta.dirty.insert(0);
        }
        result
    }
}
