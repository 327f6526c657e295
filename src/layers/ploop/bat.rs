//! Validation of a block address table against the file it lives in:
//! shared by `open` (which refuses damage) and `check` (which reports and
//! repairs it), so the two can never disagree.

use bitvec::vec::BitVec;

use super::header::Header;

/// One damaged BAT entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadEntry {
    pub index: u32,
    pub value: u32,
    pub problem: EntryProblem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryProblem {
    /// The cluster starts or ends beyond the end of the file.
    PastEof,
    /// The cluster overlaps the header or the BAT.
    IntoMetadata,
    /// The offset is not on a cluster boundary of the data area.
    Misaligned,
    /// Another entry already points at this cluster.
    Duplicate,
}

impl std::fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EntryProblem::PastEof => "points past the end of the file",
            EntryProblem::IntoMetadata => "points into the header or BAT",
            EntryProblem::Misaligned => "is not cluster aligned",
            EntryProblem::Duplicate => "points to a cluster another entry uses",
        })
    }
}

/// What a scan of the BAT found.
#[derive(Debug, Default)]
pub struct BatScan {
    pub bad: Vec<BadEntry>,
    /// Data-area clusters referenced by a valid entry (index from data_off).
    pub used: BitVec,
    /// Number of valid, allocated entries.
    pub allocated: u64,
    /// End (byte offset) of the highest referenced cluster, at least data_off.
    pub high_water: u64,
}

impl BatScan {
    /// Byte offsets of the data-area clusters below the highest referenced
    /// one that no entry references: what a crash between allocation and
    /// BAT write leaves inside the file (open releases them after an
    /// unclean stop, check counts and repairs them).
    pub fn unreferenced_inside(&self, data_off: u64, cluster: u64) -> impl Iterator<Item = u64> + '_ {
        let inside = (self.high_water.saturating_sub(data_off) / cluster) as usize;
        self.used[..inside.min(self.used.len())].iter_zeros().map(move |slot| data_off + slot as u64 * cluster)
    }
}

/// Every entry checked, fed a piece of the BAT at a time, so a table can
/// be scanned without ever being held whole. Memory follows the entries that
/// point at real clusters of the file (one bit each, up to the highest),
/// not the length of the table the header claims.
pub struct Scanner {
    cluster: u64,
    data_off: u64,
    unit: u64,
    file_len: u64,
    out: BatScan,
}

impl Scanner {
    pub fn new(header: &Header, file_len: u64) -> Scanner {
        let data_off = header.data_off_bytes();
        Scanner {
            cluster: header.cluster_bytes(),
            data_off,
            unit: header.bat_unit(),
            file_len,
            out: BatScan { used: BitVec::new(), high_water: data_off, ..Default::default() },
        }
    }

    /// Scan `values`, the entries from index `first` on. Pieces may come in
    /// any order; a skipped piece counts as zeros (holes).
    pub fn feed(&mut self, first: u64, values: &[u32]) {
        let (cluster, data_off) = (self.cluster, self.data_off);
        let out = &mut self.out;
        // Duplicates of clusters outside the data area are reported once as
        // that problem, not again as duplicates.
        for (i, &value) in values.iter().enumerate() {
            if value == 0 {
                continue;
            }
            let index = first + i as u64;
            let offset = value as u64 * self.unit;
            let problem = if offset < data_off {
                Some(EntryProblem::IntoMetadata)
            } else if (offset - data_off) % cluster != 0 {
                Some(EntryProblem::Misaligned)
            } else if offset + cluster > self.file_len {
                Some(EntryProblem::PastEof)
            } else {
                let slot = ((offset - data_off) / cluster) as usize;
                if slot >= out.used.len() {
                    // Grows with the clusters really referenced (a slot is
                    // inside the file, so never past its length).
                    out.used.resize(slot + 1, false);
                }
                if out.used[slot] {
                    Some(EntryProblem::Duplicate)
                } else {
                    out.used.set(slot, true);
                    None
                }
            };
            match problem {
                Some(problem) => out.bad.push(BadEntry { index: index as u32, value, problem }),
                None => {
                    out.allocated += 1;
                    out.high_water = out.high_water.max(offset + cluster);
                }
            }
        }
    }

    pub fn finish(self) -> BatScan {
        self.out
    }
}
