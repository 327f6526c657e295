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

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{open_image_file_in, AlignedBuf, Direct, Io};
use crate::layers::ploop::header::{Header, Variant, HEADER_SIZE, IN_USE, SECTOR};

use super::load;

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
    let done = resize_file(io, &file, new_size, apply).await?;
    drop(file);
    if apply && (done.dropped_change_record || new_size < done.old_size) {
        // A dropped change record's clusters, or the table area a shrink
        // freed, are leaked space now: give them back as `check --repair`
        // does (holes inside, truncation at the end).
        crate::layers::ploop::check::check(io, path, crate::layers::Format::Ploop, true).await?;
    }
    Ok(done)
}

/// The same on a file the caller opened read-write and holds the lock of
/// (a merge growing a parent that is smaller than its child); a dropped
/// change record's clusters stay as leaked space.
pub async fn resize_file<I: Io>(io: &I, file: &crate::io::ImageFile, new_size: u64, apply: bool) -> Result<Resized> {
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
    let bat = load::read_bat(io, fd, &old, block, &name).await?;
    let mut values = bat.values;
    let old_entries = values.len() as u64;

    // A changed-block record describes the old size: the header stops
    // pointing at it first (its clusters are given back at the end).
    let mut cur = old.clone();
    if old.ext_off_sectors != 0 && apply {
        cur.ext_off_sectors = 0;
        write_header(io, fd, &cur, block, &name).await?;
    }
    let mut next = cur.clone();
    next.size_sectors = new_size / SECTOR;
    next.cylinders = (next.size_sectors / (next.heads.max(1) as u64 * 32)).min(u32::MAX as u64) as u32;

    if new_entries <= old_entries {
        // Shrink: only if every dropped cluster is unallocated.
        let dropped = values[new_entries as usize..].iter().filter(|&&v| v != 0).count();
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
    values.resize(new_entries as usize, 0);
    if !apply {
        done.relocated = values.iter().filter(|&&v| v != 0 && (v as u64 * unit) < new_data_off).count() as u64;
        return Ok(done);
    }

    if new_data_off > old_data_off {
        // 1. and 2. The clusters in the way go to the end of the file.
        let dest = file_len.next_multiple_of(cluster).max(new_data_off);
        let in_way = values.iter().enumerate().filter(|(_, &v)| v != 0 && (v as u64 * unit) < new_data_off);
        let moves: Vec<(usize, u64, u64)> = in_way.zip((dest..).step_by(cluster as usize)).map(|((c, &v), to)| (c, v as u64 * unit, to)).collect();
        let table = Table { header: &cur, end: old_data_off, unit, block, name: &name };
        move_clusters(io, fd, &table, &mut values[..old_entries as usize], &moves).await?;
        done.relocated = moves.len() as u64;
        next.data_off_sectors = (new_data_off / SECTOR) as u32;
    }
    // 3. The new entries (and the space the table grows into) are zeros.
    write_table(io, fd, &cur, &values, new_data_off, block, &name).await?;
    // 4. The header.
    next.bat_entries = new_entries as u32;
    write_header(io, fd, &next, block, &name).await?;
    Ok(done)
}

/// Resize a raw image (ploop's raw mode): grown with a hole at the end;
/// never shrunk, since any byte of a raw file may be data.
pub async fn resize_raw<I: Io>(io: &I, path: &Path, new_size: u64, apply: bool) -> Result<Resized> {
    let name = path.display().to_string();
    let file = open_image_file_in(io, path, true, Direct::Off)?;
    crate::layers::lock(io, &file, true)?;
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

/// Write header + `values` + zeros up to `end` (whole blocks; the header
/// bytes are rewritten as they are), then sync.
pub(super) async fn write_table<I: Io>(io: &I, fd: i32, header: &Header, values: &[u32], end: u64, block: u64, name: &str) -> Result<()> {
    let len = end.max(block).next_multiple_of(block);
    let mut buf = AlignedBuf::try_zeroed(len as usize).ok_or_else(|| Error::too_large(name, len))?;
    buf[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
    for (slot, v) in buf[HEADER_SIZE..].chunks_exact_mut(4).zip(values) {
        slot.copy_from_slice(&v.to_le_bytes());
    }
    io.write_at(fd, &buf, 0).await.map_err(|e| Error::io(e, format_args!("{name}: writing the BAT")))?;
    io.sync_data(fd).await.map_err(|e| Error::io(e, name))
}

/// Where a table is written (see `write_table`): its header, the end of
/// the zeroed area, the entries' unit, the I/O block.
pub(super) struct Table<'a> {
    pub header: &'a Header,
    pub end: u64,
    pub unit: u64,
    pub block: u64,
    pub name: &'a str,
}

/// Move clusters (entry, from, to): copy each, sync, then point the
/// entries at the copies and write the table (synced). The old copies
/// stay intact until then, so a crash leaves the old entries valid.
pub(super) async fn move_clusters<I: Io>(io: &I, fd: i32, t: &Table<'_>, values: &mut [u32], moves: &[(usize, u64, u64)]) -> Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let name = t.name;
    let cluster = t.header.cluster_bytes();
    let mut buf = AlignedBuf::try_zeroed(cluster as usize).ok_or_else(|| Error::too_large(name, cluster))?;
    for &(_, from, to) in moves {
        io.read_at(fd, &mut buf, from).await.map_err(|e| Error::io(e, format_args!("{name}: reading cluster at {from}")))?;
        io.write_at(fd, &buf, to).await.map_err(|e| Error::io(e, format_args!("{name}: moving a cluster to {to}")))?;
    }
    if !crate::mutant::off("compact-sync") {
        io.sync_data(fd).await.map_err(|e| Error::io(e, name))?;
    }
    for &(c, _, to) in moves {
        values[c] = (to / t.unit) as u32;
    }
    write_table(io, fd, t.header, values, t.end, t.block, name).await
}

/// Rewrite the header (the first block, the BAT part as it is on disk).
pub(super) async fn write_header<I: Io>(io: &I, fd: i32, header: &Header, block: u64, name: &str) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(block as usize);
    io.read_at(fd, &mut buf, 0).await.map_err(|e| Error::io(e, name))?;
    buf[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
    io.write_at(fd, &buf, 0).await.map_err(|e| Error::io(e, format_args!("{name}: writing the header")))?;
    io.sync_data(fd).await.map_err(|e| Error::io(e, name))
}
