//! A ploop v2 (or v1) expandable image opened as a layer: BAT lookups for
//! the I/O path, cluster allocation at the end of the file, and the
//! crash-safe write-back of BAT changes.
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
//! - `flush` writes any chunk still pending, then syncs data and BAT at once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Direct, ImageFile, IoBackend, IoOp};

use super::bat::{self, BatScan};
use super::header::{Header, CLOSED, FLAG_EMPTY, HEADER_SIZE, IN_USE};

pub struct PloopLayer {
    file: ImageFile,
    cluster: u64,
    bat_unit: u64,
    bat: Box<[AtomicU32]>,
    meta: Mutex<Meta>,
    /// Serialises writes of header/BAT chunks, so that an older copy of a
    /// chunk can never land after a newer one.
    meta_io: Mutex<()>,
}

/// The on-disk copy of header + BAT, and the allocation cursor.
struct Meta {
    header: Header,
    /// Header and BAT bytes exactly as they should be on disk, padded to a
    /// whole number of I/O blocks.
    disk: AlignedBuf,
    /// Indexes of `block_size` chunks of `disk` that differ from the file.
    dirty: BTreeSet<usize>,
    /// Byte offset of the next cluster to allocate.
    next_free: u64,
    /// End of the space grown ahead of `next_free` (durable file size).
    prealloc_end: u64,
    /// Generations of BAT changes: each `link` publishes one; every
    /// generation up to `written` is either on disk or was rolled back, and
    /// `failed` lists the (inclusive) ranges that were rolled back.
    published: u64,
    written: u64,
    failed: Vec<(u64, u64)>,
    /// Linked entries not yet written: (generation, cluster, previous value).
    pending: Vec<(u64, u64, u32)>,
}

/// The file grows ahead by an eighth of its size, at least this many
/// clusters and `PREALLOC_MIN` bytes, at most `PREALLOC_MAX`: each step
/// costs an fallocate and a sync (and ext4's fallocate drains the file's
/// in-flight direct I/O), so steps grow with the image. Unused space is
/// given back on close, or trimmed on the next open after a crash.
const PREALLOC_CLUSTERS: u64 = 16;
const PREALLOC_MIN: u64 = 64 << 20;
const PREALLOC_MAX: u64 = 1 << 30;

/// A failed header/BAT write, with the clusters whose new entries were
/// rolled back because of it (the stack re-resolves them).
#[derive(Debug)]
pub struct MetaError {
    pub error: Error,
    pub rolled_back: Vec<u64>,
}

impl From<Error> for MetaError {
    fn from(error: Error) -> Self {
        MetaError { error, rolled_back: vec![] }
    }
}

/// What opening found out that a caller may want to report.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// The in-use mark was set: the last writer did not close cleanly.
    pub was_in_use: bool,
    /// Bytes of unreferenced clusters cut from the end of the file.
    pub trimmed_leak: u64,
}

impl PloopLayer {
    /// Open an image. Damage to the BAT is refused (with a pointer to
    /// `check --repair`); an unclean previous close is tolerated, its
    /// leaked tail trimmed when writable.
    pub fn open(mut file: ImageFile, direct: Direct) -> Result<(PloopLayer, OpenReport)> {
        let path = file.path.display().to_string();
        let file_len = file.len()?;
        let mut first = AlignedBuf::zeroed(4096);
        crate::io::SyncBackend::new()
            .submit(&mut [IoOp::read(file.fd(), 0, &mut first)])
            .map_err(|e| Error::io(e, &path))?;
        let mut header = Header::parse(&first[..HEADER_SIZE.min(file_len as usize)]).map_err(|e| e.context(&path))?;
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
            let (path, writable) = (file.path.clone(), file.writable);
            drop(file);
            file = crate::io::open_image_file(&path, writable, Direct::Off)?;
            super::lock(&file, writable)?;
        }
        let block = file.block_size as u64;
        let meta_len = header.bat_end().next_multiple_of(block).min(header.data_off_bytes().max(block));
        // Sizes come from the file: fail, never abort, when they are absurd.
        let mut disk = AlignedBuf::try_zeroed(meta_len as usize).ok_or_else(|| Error::too_large(&path, meta_len * 3))?;
        crate::io::SyncBackend::new()
            .submit(&mut [IoOp::read(file.fd(), 0, &mut disk)])
            .map_err(|e| Error::io(e, &path))?;
        let mut values: Vec<u32> = Vec::new();
        values.try_reserve_exact(header.bat_entries as usize).map_err(|_| Error::too_large(&path, meta_len * 3))?;
        values.extend(disk[HEADER_SIZE..header.bat_end() as usize].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())));

        if ![0, IN_USE, CLOSED].contains(&header.in_use) {
            // As `check` reports it: the format allows no other value.
            return Err(Error::corrupt(format!(
                "{path}: unknown in-use mark {:#x}; run `ublk-ploop check --repair {path}`",
                header.in_use
            )));
        }
        let mut report = OpenReport { was_in_use: header.in_use == IN_USE, ..Default::default() };
        let mut dirty = BTreeSet::new();
        if header.ext_off_sectors != 0 && file.writable {
            return Err(Error::unsupported(format!(
                "{path}: image carries a format extension (e.g. dirty bitmaps) that would go stale; open it read-only"
            )));
        }
        if header.flags & FLAG_EMPTY != 0 && file.writable {
            // "Nothing written yet" stops being true with our first write.
            // The BAT stays authoritative, as qemu and check treat it.
            header.flags &= !FLAG_EMPTY;
        }
        let scan: BatScan = bat::scan(&header, &values, file_len);
        if let Some(first_bad) = scan.bad.first() {
            return Err(Error::corrupt(format!(
                "{path}: {} damaged BAT entries (entry {} {}); run `ublk-ploop check --repair {path}`",
                scan.bad.len(),
                first_bad.index,
                first_bad.problem
            )));
        }
        let data_off = header.data_off_bytes();
        // Allocate past everything in the file, referenced or not: a leaked
        // cluster may hold garbage that a partial write must not expose.
        let mut next_free = data_off + file_len.saturating_sub(data_off).div_ceil(cluster) * cluster;
        if file.writable {
            if report.was_in_use {
                tracing::warn!(path, "image was not closed cleanly (in-use mark set); BAT checked, no damage");
            }
            if file_len > scan.high_water {
                // Unreferenced tail: a crash between allocation and flush,
                // or another tool's preallocation. Safe to give back.
                file.file.set_len(scan.high_water).map_err(|e| Error::io(e, &path))?;
                report.trimmed_leak = file_len - scan.high_water;
                next_free = scan.high_water;
            }
            header.in_use = IN_USE;
            disk[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
            dirty.insert(0);
        }
        let mut bat: Vec<AtomicU32> = Vec::new();
        bat.try_reserve_exact(values.len()).map_err(|_| Error::too_large(&path, meta_len * 3))?;
        bat.extend(values.into_iter().map(AtomicU32::new));
        let bat = bat.into_boxed_slice();
        let layer = PloopLayer {
            cluster,
            bat_unit: header.bat_unit(),
            bat,
            meta: Mutex::new(Meta { header, disk, dirty, next_free, prealloc_end: next_free, published: 0, written: 0, failed: vec![], pending: vec![] }),
            meta_io: Mutex::new(()),
            file,
        };
        if layer.file.writable {
            // The in-use mark must be on disk before any data changes.
            let mut io = crate::io::SyncBackend::new();
            layer.write_meta(&mut io).map_err(|e| e.error)?;
        }
        Ok((layer, report))
    }

    /// Create a new, empty image file (fails if `path` exists).
    pub fn create(path: &std::path::Path, size: u64, cluster: u64) -> Result<Header> {
        let header = Header::new(size, cluster)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(e, path.display()))?;
        let mut meta = vec![0u8; header.data_off_bytes() as usize];
        meta[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let result = crate::io::sync_write_all(&file, &meta, 0).and_then(|()| file.sync_all());
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(Error::io(e, path.display()));
        }
        Ok(header)
    }

    pub fn file(&self) -> &ImageFile {
        &self.file
    }
    pub(crate) fn file_mut(&mut self) -> &mut ImageFile {
        &mut self.file
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }
    pub fn size(&self) -> u64 {
        self.meta.lock().unwrap().header.size_bytes()
    }

    /// File offset of virtual cluster `c`, if allocated here.
    #[inline]
    pub fn lookup(&self, c: u64) -> Option<u64> {
        match self.bat.get(c as usize)?.load(Ordering::Acquire) {
            0 => None,
            v => Some(v as u64 * self.bat_unit),
        }
    }

    /// Reserve a fresh cluster at the end of the file. It reads as zeros,
    /// and it lies inside the file size that is already durable: the file
    /// is grown ahead in steps, each made durable before any BAT entry can
    /// point into it, so an entry never points past EOF after a crash.
    pub fn reserve_cluster(&self, io: &mut dyn IoBackend) -> Result<u64> {
        // Callers serialise allocation (the stack's allocation lock), so
        // only one thread grows the file; the meta lock is not held while it
        // does, so links and BAT writes of other requests go on meanwhile.
        let (offset, grow) = {
            let meta = self.meta.lock().unwrap();
            let offset = meta.next_free;
            if meta.header.bat_value(offset).is_none() {
                return Err(Error::new(libc::EFBIG, format!("{}: image too large for its BAT", self.file.path.display())));
            }
            let end = offset + self.cluster;
            let grow = (end > meta.prealloc_end).then(|| {
                // Never grow past what the BAT can address in all.
                let max_end = meta.header.data_off_bytes() + self.bat.len() as u64 * self.cluster;
                let step = (meta.prealloc_end / 8).clamp(PREALLOC_MIN, PREALLOC_MAX).max(PREALLOC_CLUSTERS * self.cluster);
                (meta.prealloc_end.max(offset), end, end.max((meta.prealloc_end + step).min(max_end)))
            });
            (offset, grow)
        };
        if let Some((from, needed, wanted)) = grow {
            // Short of space for a whole step: take just what this cluster needs.
            let grown = match self.grow_file(from, wanted) {
                Err(e) if e.errno() == libc::ENOSPC && wanted > needed => self.grow_file(from, needed).map(|()| needed),
                other => other.map(|()| wanted),
            }?;
            io.sync_data(self.file.fd())
                .map_err(|e| Error::io(e, format_args!("{}: growing the image", self.file.path.display())))?;
            self.meta.lock().unwrap().prealloc_end = grown;
        }
        self.meta.lock().unwrap().next_free = offset + self.cluster;
        Ok(offset)
    }

    /// Allocate file space `[from, to)` (it reads as zeros).
    fn grow_file(&self, from: u64, to: u64) -> Result<()> {
        let path = self.file.path.display();
        // SAFETY: plain syscall on our own descriptor.
        let rc = unsafe { libc::fallocate(self.file.fd(), 0, from as libc::off_t, (to - from) as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io(err, format_args!("{path}: growing the image")));
        }
        self.file.file.set_len(to).map_err(|e| Error::io(e, &path))
    }

    /// Point virtual cluster `c` at `offset`, in memory (so I/O uses it at
    /// once), and queue the BAT entry; returns its generation. The entry
    /// reaches the disk with `write_metadata`, which the request that
    /// needed it waits for before it completes, so a killed daemon loses
    /// nothing it acknowledged. Concurrent allocations share chunk writes.
    /// The caller guarantees the cluster already holds the disk's current
    /// bytes durably (fresh zeros in grown-ahead space, or a synced
    /// copy-up), so the entry may reach the disk at any moment without
    /// exposing wrong data after a power loss.
    pub fn link(&self, c: u64, offset: u64) -> u64 {
        let value = (offset / self.bat_unit) as u32;
        let at = HEADER_SIZE + 4 * c as usize;
        let mut meta = self.meta.lock().unwrap();
        let previous = self.bat[c as usize].swap(value, Ordering::AcqRel);
        meta.disk[at..at + 4].copy_from_slice(&value.to_le_bytes());
        meta.dirty.insert(at / self.file.block_size as usize);
        meta.published += 1;
        let generation = meta.published;
        meta.pending.push((generation, c, previous));
        generation
    }

    /// The oldest generation that may still be unwritten: a request reads
    /// this before it looks at the BAT, so every entry it can find that is
    /// not yet on disk has a generation at or above it.
    pub fn first_unwritten(&self) -> u64 {
        self.meta.lock().unwrap().written + 1
    }

    /// The newest linked generation.
    pub fn published(&self) -> u64 {
        self.meta.lock().unwrap().published
    }

    /// Make sure every entry linked in generations `lo..=hi` (the window a
    /// request may depend on) is written, not synced. One call writes
    /// whatever is pending, so requests that complete together share the
    /// writes. If any of those generations was rolled back after a failed
    /// write, the request fails: its data may sit in an unlinked cluster.
    pub fn write_metadata(&self, io: &mut dyn IoBackend, lo: u64, hi: u64) -> std::result::Result<(), MetaError> {
        let _serial = self.meta_io.lock().unwrap();
        {
            let meta = self.meta.lock().unwrap();
            if meta.failed.iter().any(|&(a, b)| a <= hi && lo <= b) {
                return Err(Error::new(libc::EIO, format!("{}: writing the BAT failed", self.file.path.display())).into());
            }
            if meta.written >= hi {
                return Ok(());
            }
        }
        self.write_meta_locked(io, false)
    }

    /// Make every acknowledged write durable: their BAT entries are
    /// already written, so one data sync covers both; pending entries of
    /// requests still in flight are written first, which is harmless.
    pub fn flush(&self, io: &mut dyn IoBackend) -> std::result::Result<(), MetaError> {
        let _serial = self.meta_io.lock().unwrap();
        self.write_meta_locked(io, false)?;
        let path = self.file.path.display();
        io.sync_data(self.file.fd()).map_err(|e| Error::io(e, format_args!("{path}: flushing")))?;
        Ok(())
    }

    fn write_meta(&self, io: &mut dyn IoBackend) -> std::result::Result<(), MetaError> {
        let _serial = self.meta_io.lock().unwrap();
        self.write_meta_locked(io, true)
    }

    /// Write the dirty chunks of header+BAT (and sync them if asked). On
    /// failure the entries they carried for the first time are undone, in
    /// memory and in the on-disk image, and reported.
    fn write_meta_locked(&self, io: &mut dyn IoBackend, sync: bool) -> std::result::Result<(), MetaError> {
        let block = self.file.block_size as usize;
        let (snapshot, chunks, bufs): (u64, Vec<usize>, Vec<AlignedBuf>) = {
            let mut meta = self.meta.lock().unwrap();
            let taken = std::mem::take(&mut meta.dirty);
            let (chunks, bufs) =
                taken.into_iter().map(|i| (i, AlignedBuf::from_slice(&meta.disk[i * block..(i + 1) * block]))).unzip();
            (meta.published, chunks, bufs)
        };
        let fd = self.file.fd();
        let mut ops: Vec<IoOp> = chunks.iter().zip(&bufs).map(|(&i, b)| IoOp::write(fd, (i * block) as u64, b)).collect();
        let result = io.submit(&mut ops).and_then(|()| if sync { io.sync_data(fd) } else { Ok(()) });
        let mut meta = self.meta.lock().unwrap();
        match result {
            Ok(()) => {
                meta.written = meta.written.max(snapshot);
                meta.pending.retain(|&(g, _, _)| g > snapshot);
                Ok(())
            }
            Err(e) => {
                meta.dirty.extend(chunks);
                let mut rolled_back = vec![];
                let undo: Vec<(u64, u64, u32)> = meta.pending.iter().copied().filter(|&(g, _, _)| g <= snapshot).collect();
                for &(_, c, previous) in undo.iter().rev() {
                    let at = HEADER_SIZE + 4 * c as usize;
                    self.bat[c as usize].store(previous, Ordering::Release);
                    meta.disk[at..at + 4].copy_from_slice(&previous.to_le_bytes());
                    meta.dirty.insert(at / block);
                    rolled_back.push(c);
                }
                meta.pending.retain(|&(g, _, _)| g > snapshot);
                if snapshot > meta.written {
                    let range = (meta.written + 1, snapshot);
                    meta.failed.push(range);
                    meta.written = snapshot;
                }
                let error = Error::io(e, format_args!("{}: writing the BAT", self.file.path.display()));
                Err(MetaError { error, rolled_back })
            }
        }
    }

    /// Flush and clear the in-use mark: the image is consistent on disk.
    pub fn close(&self, io: &mut dyn IoBackend) -> Result<()> {
        if !self.file.writable {
            return Ok(());
        }
        self.flush(io).map_err(|e| e.error)?;
        // Give back the space grown ahead; the file ends at its last cluster.
        let end = self.meta.lock().unwrap().next_free;
        self.file.file.set_len(end).map_err(|e| Error::io(e, self.file.path.display()))?;
        self.meta.lock().unwrap().prealloc_end = end;
        self.set_in_use(io, CLOSED)
    }

    /// Set the in-use mark again on a top that stays writable after a
    /// `close` (a snapshot that failed half way). Even if this write fails,
    /// the mark is in the pending header, so every later header write
    /// carries it.
    pub fn reopen_in_use(&self, io: &mut dyn IoBackend) -> Result<()> {
        self.set_in_use(io, IN_USE)
    }

    fn set_in_use(&self, io: &mut dyn IoBackend, mark: u32) -> Result<()> {
        {
            let mut meta = self.meta.lock().unwrap();
            meta.header.in_use = mark;
            let bytes = meta.header.to_bytes();
            meta.disk[..HEADER_SIZE].copy_from_slice(&bytes);
            meta.dirty.insert(0);
        }
        self.write_meta(io).map_err(|e| e.error)
    }
}
