//! Changing the disk size of a closed image, as `ploop resize` does offline.
//!
//! Growing needs one more BAT entry per new cluster. While the BAT still
//! fits in front of the first data cluster (256 GiB of disk per 1 MiB
//! cluster of table) only the new entries and the header are written. When
//! it does not, the data clusters in the way are moved to the end of the
//! file first, in a crash-safe order:
//!   1. copy each cluster in the way to the end of the file, sync;
//!   2. point its BAT entry at the copy, sync;
//!   3. zero the space the table grows into (old copies included), sync;
//!   4. write the header with the new size and data offset, sync.
//! A crash before 4 leaves the old disk, whole, with some leaked space at
//! most (`check` says so, opening trims it); after 4, the new one.
//!
//! Shrinking only drops clusters nothing was ever written to: the header
//! gets the smaller size and BAT (and, for v2, the data offset the smaller
//! table needs: a grow that moved it leaves no table area behind), then
//! what that freed is given back as `check --repair` gives leaks back.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{open_image_file_in, AlignedBuf, Direct, ImageFile, Io};
use crate::layers::ploop::header::{Header, Variant, HEADER_SIZE, IN_USE, SECTOR};

use super::load;
use super::table::Table;

/// What a resize did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resized {
    pub old_size: u64,
    pub new_size: u64,
    /// Data clusters moved out of the way of the larger BAT.
    pub relocated: u64,
    /// A changed-block record (format extension) was dropped: it described
    /// the old size. The next incremental backup sends everything.
    pub dropped_change_record: bool,
}

/// Resize the image at `path` to `new_size` bytes. The image must be closed
/// cleanly and not in use (it is locked exclusively meanwhile). Without
/// `apply`, only find out whether it can be done and what it would do.
pub async fn resize<I: Io>(io: &I, path: &Path, new_size: u64, apply: bool) -> Result<Resized> {
    let file = open_image_file_in(io, path, true, Direct::Auto)?;
    crate::layers::lock(io, &file, true)?;
    resize_locked(io, &file, new_size, apply).await
}

/// The cluster size of the image at `path` (a frontend rounds a size the
/// user gives up to whole clusters of it, as ploop's tool does).
pub async fn cluster_of<I: Io>(io: &I, path: &Path) -> Result<u64> {
    let name = path.display().to_string();
    let file = open_image_file_in(io, path, false, Direct::Off)?;
    Ok(load::read_header(io, file.fd(), &name).await.map_err(|e| e.context(&name))?.header.cluster_bytes())
}

/// The same on an image open for writing in `file`, whose lock the caller
/// holds (a served top, closed clean, that opens again on `file`).
pub async fn resize_locked<I: Io>(io: &I, file: &ImageFile, new_size: u64, apply: bool) -> Result<Resized> {
    let path = file.path.as_path();
    // What open (and so compact and convert) refuses, resize refuses too:
    // a table pointing past the file or into itself is not moved around.
    let seen = crate::layers::ploop::check::inspect(io, path, crate::layers::Format::Ploop).await?;
    if !seen.bad_entries.is_empty() || !seen.header_errors.is_empty() {
        let mut what: Vec<String> = seen.header_errors.clone();
        what.extend(seen.bad_entries.iter().take(3).map(|b| format!("BAT entry {} {}", b.index, b.problem)));
        return Err(Error::corrupt(format!(
            "{}: the image is damaged ({}); run `ublk-ploop check --repair` on it first",
            path.display(),
            what.join("; ")
        )));
    }
    let done = resize_file(io, file, new_size, apply).await?;
    if apply && (done.dropped_change_record || new_size < done.old_size) {
        // A dropped change record's clusters, or the table area a shrink
        // freed, are leaked space now: give them back as `check --repair`
        // does (holes inside, truncation at the end), under our lock.
        crate::layers::ploop::check::repair_locked(io, path, crate::layers::Format::Ploop).await?;
    }
    Ok(done)
}

/// The same on a file the caller opened read-write and holds the lock of
/// (a merge growing a parent that is smaller than its child); a dropped
/// change record's clusters stay as leaked space.
pub async fn resize_file<I: Io>(io: &I, file: &ImageFile, new_size: u64, apply: bool) -> Result<Resized> {
    let name = file.path.display().to_string();
    let fd = file.fd();
    let read = load::read_header(io, fd, &name).await.map_err(|e| e.context(&name))?;
    let (old, file_len) = (read.header, read.file_len);
    if old.in_use == IN_USE {
        return Err(Error::invalid(format!(
            "{name}: was not closed cleanly (in-use mark set): run `ublk-ploop check --repair` on it first"
        )));
    }
    let cluster = old.cluster_bytes();
    let unit = if old.variant == Variant::V2 { cluster } else { SECTOR };
    let block = file.block_size as u64;
    if new_size == 0 || new_size % SECTOR != 0 || new_size % block != 0 {
        return Err(Error::invalid(format!(
            "new size {new_size} must be a non-zero multiple of 512 bytes and of the filesystem's block of {block}"
        )));
    }
    let new_entries = new_size.div_ceil(cluster);
    if new_entries > u32::MAX as u64 || (old.variant == Variant::V1 && new_size / SECTOR > u32::MAX as u64) {
        return Err(Error::invalid(format!("{name}: {new_size} bytes is too large for this image's format and cluster size")));
    }
    let mut done = Resized { old_size: old.size_bytes(), new_size, ..Default::default() };
    if new_size == old.size_bytes() {
        return Ok(done);
    }
    done.dropped_change_record = old.ext_off_sectors != 0;
    let mut edit = TableEdit::load(io, fd, &old, read.head, block, file_len, &name).await?;
    let old_entries = edit.table.entries();

    // A changed-block record describes the old size: the header stops
    // pointing at it first (its clusters are given back at the end).
    let mut cur = old.clone();
    if old.ext_off_sectors != 0 && apply {
        cur.ext_off_sectors = 0;
        write_header(io, fd, &cur, block, &name).await?;
        edit.head = cur.to_bytes();
    }
    let mut next = cur.clone();
    next.size_sectors = new_size / SECTOR;
    next.cylinders = (next.size_sectors / (next.heads.max(1) as u64 * 32)).min(u32::MAX as u64) as u32;

    if new_entries <= old_entries {
        // Shrink: only if every dropped cluster is unallocated.
        let dropped = edit.table.present().filter(|&(c, _)| c >= new_entries).count();
        if dropped > 0 {
            return Err(Error::invalid(format!(
                "{name}: shrinking to {new_size} bytes would drop {dropped} allocated clusters; \
                 ploop never shrinks a disk with data past the new end: shrink the filesystem, \
                 discard the space past its end, then resize"
            )));
        }
        // Past the new end inside the last kept cluster there may be data:
        // it stays in the file, unseen, as when a disk is grown again.
        if !apply {
            return Ok(done);
        }
        next.bat_entries = new_entries as u32;
        // v2 entries count clusters from the start of the file, so a data
        // area that a grow moved up can start right after the smaller
        // table again; the clusters in between hold nothing (zero entries
        // of the old table) and are given back by the caller.
        let least = (HEADER_SIZE as u64 + 4 * new_entries).next_multiple_of(cluster);
        if old.variant == Variant::V2 && least < old.data_off_bytes() {
            next.data_off_sectors = (least / SECTOR) as u32;
        }
        write_header(io, fd, &next, block, &name).await?;
        return Ok(done);
    }

    let need_bat_end = HEADER_SIZE as u64 + 4 * new_entries;
    let old_data_off = old.data_off_bytes();
    let new_data_off = if need_bat_end <= old_data_off {
        old_data_off
    } else {
        if old.variant != Variant::V2 {
            return Err(Error::unsupported(format!(
                "{name}: growing the BAT of a v1 (WithoutFreeSpace) image past its first data sector is not supported; \
                 `ublk-ploop convert` it to v2 first"
            )));
        }
        need_bat_end.next_multiple_of(cluster)
    };
    if new_data_off / SECTOR > u32::MAX as u64 {
        return Err(Error::invalid(format!("{name}: a BAT for {new_size} bytes is too large for this cluster size")));
    }
    let in_way: Vec<(u64, u64)> =
        edit.table.present().map(|(c, v)| (c, v as u64 * unit)).filter(|&(_, at)| at < new_data_off).collect();
    if !apply {
        done.relocated = in_way.len() as u64;
        return Ok(done);
    }

    if new_data_off > old_data_off {
        // 1. and 2. The clusters in the way go to the end of the file.
        let dest = file_len.next_multiple_of(cluster).max(new_data_off);
        let moves: Vec<(u64, u64, u64)> = in_way.iter().zip((dest..).step_by(cluster as usize)).map(|(&(c, from), to)| (c, from, to)).collect();
        move_clusters(io, fd, &mut edit, cluster, unit, &moves).await?;
        done.relocated = moves.len() as u64;
        next.data_off_sectors = (new_data_off / SECTOR) as u32;
    }
    // 3. The new entries (and the space the table grows into) are zeros:
    // the rest of the old table's last block is written, what follows it
    // is punched and allocated again (or written with zeros where the
    // filesystem cannot), so a thin disk's table stays holes.
    let old_end = HEADER_SIZE as u64 + 4 * old_entries;
    edit.tail.clear();
    if old_end % block != 0 {
        edit.dirty.insert((old_end / block) as usize);
        edit.write(io, fd).await?;
    }
    let from = old_end.next_multiple_of(block);
    if from < new_data_off {
        zero_range(io, fd, from, new_data_off).await.map_err(|e| Error::io(e, format_args!("{name}: zeroing the table's new area")))?;
        io.sync_data(fd).await.map_err(|e| Error::io(e, &name))?;
    }
    // 4. The header.
    next.bat_entries = new_entries as u32;
    write_header(io, fd, &next, block, &name).await?;
    Ok(done)
}

/// Make `[from, to)` read as zeros while keeping its space: punched and
/// allocated again, or written with zeros where the filesystem cannot.
async fn zero_range<I: Io>(io: &I, fd: i32, from: u64, to: u64) -> std::io::Result<()> {
    let unsupported = |e: &std::io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
    match io.punch_hole(fd, from, to - from).await {
        Ok(()) => match io.allocate(fd, from, to - from).await {
            Err(e) if unsupported(&e) => super::write_zeros(io, fd, from, to).await,
            other => other,
        },
        Err(e) if unsupported(&e) => super::write_zeros(io, fd, from, to).await,
        Err(e) => Err(e),
    }
}

/// Resize a raw image (ploop's raw mode): grown with a hole at the end;
/// never shrunk, since any byte of a raw file may be data.
pub async fn resize_raw<I: Io>(io: &I, path: &Path, new_size: u64, apply: bool) -> Result<Resized> {
    let file = open_image_file_in(io, path, true, Direct::Off)?;
    crate::layers::lock(io, &file, true)?;
    resize_raw_file(io, &file, new_size, apply).await
}

/// The same on a raw file already open for writing (its lock held by the
/// caller): extended, never shrunk, and synced before it returns.
pub async fn resize_raw_file<I: Io>(io: &I, file: &ImageFile, new_size: u64, apply: bool) -> Result<Resized> {
    let name = file.path.display().to_string();
    let old_size = load::file_len(io, file.fd(), &name)?;
    if new_size == 0 || new_size % SECTOR != 0 {
        return Err(Error::invalid(format!("new size {new_size} must be a non-zero multiple of 512 bytes")));
    }
    if new_size < old_size {
        return Err(Error::invalid(format!("{name}: a raw image is never shrunk (any of its bytes may be data)")));
    }
    if apply && new_size > old_size {
        io.set_len(file.fd(), new_size).await.map_err(|e| Error::io(e, &name))?;
        io.sync_data(file.fd()).await.map_err(|e| Error::io(e, &name))?;
    }
    Ok(Resized { old_size, new_size, ..Default::default() })
}

/// An image's table as an offline operation edits it: the chunked entries
/// (memory follows the allocated ones), the bytes around them, and the
/// blocks changed since the last write.
pub(super) struct TableEdit<'a> {
    pub table: Table,
    pub head: [u8; HEADER_SIZE],
    pub tail: Vec<u8>,
    pub dirty: BTreeSet<usize>,
    pub block: u64,
    pub name: &'a str,
}

impl<'a> TableEdit<'a> {
    pub async fn load<I: Io>(io: &I, fd: i32, header: &Header, head: [u8; HEADER_SIZE], block: u64, file_len: u64, name: &'a str) -> Result<TableEdit<'a>> {
        let load::TableRead { table, tail, .. } = load::load_table(io, fd, header, block, file_len, name).await?;
        Ok(TableEdit { table, head, tail, dirty: BTreeSet::new(), block, name })
    }

    pub fn set(&mut self, c: u64, value: u32) {
        self.table.set(c, value);
        self.dirty.insert(((HEADER_SIZE as u64 + 4 * c) / self.block) as usize);
    }

    /// Write the changed blocks, then sync.
    pub async fn write<I: Io>(&mut self, io: &I, fd: i32) -> Result<()> {
        let block = self.block as usize;
        for &i in &self.dirty {
            let mut buf = AlignedBuf::zeroed(block);
            self.table.bytes_at(&self.head, &self.tail, i * block, &mut buf);
            io.write_at(fd, &buf, (i * block) as u64).await.map_err(|e| Error::io(e, format_args!("{}: writing the BAT", self.name)))?;
        }
        self.dirty.clear();
        io.sync_data(fd).await.map_err(|e| Error::io(e, self.name))
    }
}

/// Move clusters (entry, from, to): copy each, sync, then point the
/// entries at the copies and write the table (synced). The old copies
/// stay intact until then, so a crash leaves the old entries valid.
pub(super) async fn move_clusters<I: Io>(io: &I, fd: i32, edit: &mut TableEdit<'_>, cluster: u64, unit: u64, moves: &[(u64, u64, u64)]) -> Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let name = edit.name;
    let mut buf = AlignedBuf::try_zeroed(cluster as usize).ok_or_else(|| Error::too_large(name, cluster))?;
    for &(_, from, to) in moves {
        io.read_at(fd, &mut buf, from).await.map_err(|e| Error::io(e, format_args!("{name}: reading cluster at {from}")))?;
        io.write_at(fd, &buf, to).await.map_err(|e| Error::io(e, format_args!("{name}: moving a cluster to {to}")))?;
    }
    if !crate::mutant::off("compact-sync") {
        io.sync_data(fd).await.map_err(|e| Error::io(e, name))?;
    }
    for &(c, _, to) in moves {
        edit.set(c, (to / unit) as u32);
    }
    edit.write(io, fd).await
}

/// Rewrite the header (the first block, the BAT part as it is on disk).
pub(super) async fn write_header<I: Io>(io: &I, fd: i32, header: &Header, block: u64, name: &str) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(block as usize);
    io.read_at(fd, &mut buf, 0).await.map_err(|e| Error::io(e, name))?;
    buf[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
    io.write_at(fd, &buf, 0).await.map_err(|e| Error::io(e, format_args!("{name}: writing the header")))?;
    io.sync_data(fd).await.map_err(|e| Error::io(e, name))
}
