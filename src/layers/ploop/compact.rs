//! Giving a closed image's free space back to the host filesystem, in
//! steps (`compact_step`), so that a served disk is compacted with requests
//! held only for one step at a time (`Stack::compact`).
//!
//! A step, in a crash-safe order:
//!   1. clusters that are holes through and through (a discard punched
//!      them) and that no lower layer holds are unlinked: zeros either way;
//!      the BAT is written and synced;
//!   2. up to `budget` clusters from the end of the file are copied into
//!      the lowest free slots, synced, then their entries moved, synced;
//!   3. when nothing is left to move, the file is cut after its last used
//!      cluster.
//! An entry always points at bytes made durable before it; a slot is
//! reused or cut off only once no durable entry points at it. A crash
//! leaves leaked space at most.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::io::{ImageFile, Io};
use crate::layers::ploop::header::{Variant, IN_USE};

use super::load;
use super::resize::{move_clusters, write_header, TableEdit};

/// What one step did, and what is left.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Compacted {
    /// Fully discarded clusters no longer referenced.
    pub unlinked: u64,
    /// Clusters moved from the end of the file into free slots.
    pub moved: u64,
    /// Moves still to do after this step.
    pub remaining: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
    /// Nothing left to do: the file ends at its last used cluster.
    pub done: bool,
}

/// One step on `file` (open read-write, locked by the caller). `lower_has(c)`
/// says whether a layer below holds cluster `c` (then a discarded cluster
/// must keep reading as zeros from this one and stays linked).
pub async fn compact_step<I: Io>(io: &I, file: &ImageFile, lower_has: &dyn Fn(u64) -> bool, budget: u64) -> Result<Compacted> {
    let name = file.path.display().to_string();
    let fd = file.fd();
    let read = load::read_header(io, fd, &name).await.map_err(|e| e.context(&name))?;
    let (mut header, file_len) = (read.header, read.file_len);
    if header.in_use == IN_USE {
        return Err(Error::invalid(format!("{name}: was not closed cleanly (in-use mark set): run `ublk-ploop check --repair` first")));
    }
    if header.variant != Variant::V2 {
        return Err(Error::unsupported(format!("{name}: compacting v1 (WithoutFreeSpace) images is not supported; convert it first")));
    }
    let cluster = header.cluster_bytes();
    let block = file.block_size as u64;
    let data_off = header.data_off_bytes();
    let mut edit = TableEdit::load(io, fd, &header, read.head, block, file_len, &name).await?;
    let mut out = Compacted { file_size_before: file_len, file_size_after: file_len, ..Default::default() };
    if header.ext_off_sectors != 0 {
        // A changed-block record's clusters are not data: it is dropped
        // (the next incremental backup sends everything) and its clusters
        // are free like any other.
        header.ext_off_sectors = 0;
        write_header(io, fd, &header, block, &name).await?;
        edit.head = header.to_bytes();
    }

    // 1. Unlink what discards left as holes.
    let holes: Vec<u64> = edit
        .table
        .present()
        .filter(|&(c, v)| !lower_has(c) && crate::io::is_hole(io, fd, v as u64 * cluster, cluster))
        .map(|(c, _)| c)
        .collect();
    for &c in &holes {
        edit.set(c, 0);
    }
    out.unlinked = holes.len() as u64;
    if out.unlinked > 0 {
        edit.write(io, fd).await?;
    }

    // 2. Move clusters from the end into the lowest free slots.
    let mut by_offset: Vec<(u64, u64)> = edit.table.present().map(|(c, v)| (v as u64 * cluster, c)).collect();
    by_offset.sort_unstable();
    let used: BTreeSet<u64> = by_offset.iter().map(|&(at, _)| at).collect();
    let mut free = (data_off..).step_by(cluster as usize).filter(|at| !used.contains(at));
    let mut plan = Vec::new();
    let mut tail = by_offset.iter().rev();
    loop {
        let (Some(hole), Some(&(from, c))) = (free.next(), tail.next()) else { break };
        if hole >= from {
            break;
        }
        plan.push((c, from, hole));
    }
    let now = plan.len().min(budget as usize);
    out.remaining = (plan.len() - now) as u64;
    move_clusters(io, fd, &mut edit, cluster, cluster, &plan[..now]).await?;
    out.moved = now as u64;

    // 3. Nothing left to move: cut the file after its last used cluster.
    if out.remaining == 0 {
        let end = edit.table.present().map(|(_, v)| v as u64 * cluster + cluster).filter(|&e| e > cluster).max().unwrap_or(data_off).max(data_off);
        if end < file_len {
            io.set_len(fd, end).await.map_err(|e| Error::io(e, format_args!("{name}: cutting the file to {end}")))?;
            io.sync_data(fd).await.map_err(|e| Error::io(e, &name))?;
        }
        out.file_size_after = end.min(file_len);
        out.done = true;
    }
    Ok(out)
}
