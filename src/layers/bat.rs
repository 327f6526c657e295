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

/// Check every entry; `file_len` is the image file's current length.
pub fn scan(header: &Header, bat: &[u32], file_len: u64) -> BatScan {
    let cluster = header.cluster_bytes();
    let data_off = header.data_off_bytes();
    let unit = header.bat_unit();
    let data_clusters = file_len.saturating_sub(data_off).div_ceil(cluster) as usize;
    let mut out = BatScan { used: BitVec::repeat(false, data_clusters), high_water: data_off, ..Default::default() };
    // Duplicates of clusters outside the data area are reported once as
    // that problem, not again as duplicates.
    for (index, &value) in bat.iter().enumerate() {
        if value == 0 {
            continue;
        }
        let offset = value as u64 * unit;
        let problem = if offset < data_off {
            Some(EntryProblem::IntoMetadata)
        } else if (offset - data_off) % cluster != 0 {
            Some(EntryProblem::Misaligned)
        } else if offset + cluster > file_len {
            Some(EntryProblem::PastEof)
        } else {
            let slot = ((offset - data_off) / cluster) as usize;
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
    out
}
