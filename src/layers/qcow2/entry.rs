//! QCOW2 table entries, decoded and checked: an L1 entry names an L2
//! table, an L2 entry says where one guest cluster's data is (or that it
//! reads as zeros, or from the backing file). Pure data, no I/O.

use crate::error::{Error, Result};

/// Bits 9..=55 of an L1 entry and of a standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// Where an L2 table is, from its L1 entry (None: not allocated; every
/// cluster it would map reads from the backing file).
pub fn l1_entry(raw: u64, cluster_bits: u32, file_len: u64) -> Result<Option<u64>> {
    if raw & !(OFFSET_MASK | COPIED) != 0 {
        return Err(Error::corrupt(format!("L1 entry {raw:#x} sets reserved bits")));
    }
    let offset = raw & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    check_cluster(offset, cluster_bits, file_len, "L2 table")?;
    Ok(Some(offset))
}

fn check_cluster(offset: u64, cluster_bits: u32, file_len: u64, what: &str) -> Result<()> {
    let cluster = 1u64 << cluster_bits;
    if offset % cluster != 0 {
        return Err(Error::corrupt(format!("{what} at {offset} is not cluster aligned")));
    }
    if offset.checked_add(cluster).map_or(true, |end| end > file_len) {
        return Err(Error::corrupt(format!("{what} at {offset} lies past the end of the file ({file_len} bytes)")));
    }
    Ok(())
}

/// What one guest cluster (or, with extended L2, one subcluster) reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// From the backing file, or zeros without one.
    Backing,
    Zero,
    /// At this host offset, uncompressed.
    Data(u64),
    /// Compressed: `len` bytes from `offset` (not aligned; the length is
    /// an upper bound in whole sectors, the stream ends inside it).
    Compressed { offset: u64, len: u64 },
}

/// One decoded L2 entry: the cluster's mapping, and with extended L2 the
/// 32 subclusters' allocation and zero bitmaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Entry {
    pub mapping: Mapping,
    /// Extended L2 only: bit i set = subcluster i is allocated (reads
    /// from the cluster's host offset) ...
    pub alloc: u32,
    /// ... or reads as zeros. Neither: from the backing file.
    pub zero: u32,
}

impl L2Entry {
    /// What subcluster `i` (0..32) reads, for an extended L2 entry; for a
    /// standard entry the cluster's mapping (subcluster = cluster).
    pub fn subcluster(&self, i: u32, extended: bool, subcluster_bytes: u64) -> Mapping {
        if !extended {
            return self.mapping;
        }
        match self.mapping {
            Mapping::Compressed { .. } => self.mapping,
            _ if self.zero & (1 << i) != 0 => Mapping::Zero,
            Mapping::Data(at) if self.alloc & (1 << i) != 0 => Mapping::Data(at + i as u64 * subcluster_bytes),
            _ => Mapping::Backing,
        }
    }
}

/// Decode a standard L2 entry `raw` (and for extended L2 its bitmap word
/// `bitmap`), checking that it points inside a file of `file_len` bytes.
pub fn l2_entry(raw: u64, bitmap: Option<u64>, cluster_bits: u32, file_len: u64) -> Result<L2Entry> {
    if raw & COMPRESSED != 0 {
        // Bits 0..x-1 the offset, x..61 the extra sectors, x = 62 - (cluster_bits - 8).
        let x = 62 - (cluster_bits - 8);
        let offset = raw & ((1u64 << x) - 1);
        let sectors = ((raw & !COPIED & !COMPRESSED) >> x) + 1;
        if raw & COPIED != 0 {
            return Err(Error::corrupt(format!("compressed L2 entry {raw:#x} sets the copied bit")));
        }
        if bitmap.is_some_and(|b| b != 0) {
            return Err(Error::corrupt(format!("compressed cluster {raw:#x} with a subcluster bitmap")));
        }
        // The length counts from the sector holding the offset.
        let len = sectors * 512 - (offset & 511);
        if offset == 0 || offset.checked_add(len.min(1)).map_or(true, |end| end > file_len) {
            return Err(Error::corrupt(format!("compressed cluster at {offset} lies past the end of the file ({file_len} bytes)")));
        }
        // The stream may end before the last sector the entry counts, and
        // that sector may lie past the end of the file: read what is there.
        let len = len.min(file_len - offset);
        return Ok(L2Entry { mapping: Mapping::Compressed { offset, len }, alloc: 0, zero: 0 });
    }
    if raw & !(OFFSET_MASK | COPIED | ZERO) != 0 {
        return Err(Error::corrupt(format!("L2 entry {raw:#x} sets reserved bits")));
    }
    let offset = raw & OFFSET_MASK;
    let (alloc, zero) = match bitmap {
        None => (0, 0),
        Some(b) => {
            let (alloc, zero) = (b as u32, (b >> 32) as u32);
            if alloc & zero != 0 {
                return Err(Error::corrupt(format!("subclusters {:#x} both allocated and zero", alloc & zero)));
            }
            if raw & ZERO != 0 {
                return Err(Error::corrupt("extended L2 entry with the cluster zero bit"));
            }
            if offset == 0 && alloc != 0 {
                return Err(Error::corrupt("allocated subclusters without a host cluster"));
            }
            (alloc, zero)
        }
    };
    let mapping = if bitmap.is_none() && raw & ZERO != 0 {
        Mapping::Zero
    } else if offset == 0 {
        Mapping::Backing
    } else {
        // A data cluster may end past the end of the file (qemu writes
        // only the subclusters it allocates, or preallocated metadata
        // only): what lies past it reads as zeros.
        if offset % (1u64 << cluster_bits) != 0 {
            return Err(Error::corrupt(format!("data cluster at {offset} is not cluster aligned")));
        }
        Mapping::Data(offset)
    };
    Ok(L2Entry { mapping, alloc, zero })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn l1_entries() {
        assert_eq!(l1_entry(0, 16, MB).unwrap(), None);
        assert_eq!(l1_entry(COPIED | 0x30000, 16, MB).unwrap(), Some(0x30000));
        assert!(l1_entry(0x30001, 16, MB).is_err(), "reserved bit");
        assert!(l1_entry(0x30200, 16, MB).is_err(), "unaligned");
        assert!(l1_entry(MB, 16, MB).is_err(), "past the end");
        l1_entry(MB - 0x10000, 16, MB).unwrap();
    }

    #[test]
    fn standard_l2_entries() {
        assert_eq!(l2_entry(0, None, 16, MB).unwrap().mapping, Mapping::Backing);
        assert_eq!(l2_entry(1, None, 16, MB).unwrap().mapping, Mapping::Zero);
        // A preallocated zero cluster still reads as zeros.
        assert_eq!(l2_entry(COPIED | 0x40000 | 1, None, 16, MB).unwrap().mapping, Mapping::Zero);
        assert_eq!(l2_entry(COPIED | 0x40000, None, 16, MB).unwrap().mapping, Mapping::Data(0x40000));
        assert!(l2_entry(0x40000 | 2, None, 16, MB).is_err(), "reserved bit");
        assert!(l2_entry(0x40200, None, 16, MB).is_err(), "unaligned");
        // Past the end of the file: zeros there, as qemu reads them.
        assert_eq!(l2_entry(0x100000, None, 16, MB).unwrap().mapping, Mapping::Data(0x100000));
    }

    #[test]
    fn compressed_entries() {
        // 64 KiB clusters: x = 54; offset 0x12345, 3 extra sectors.
        let raw = COMPRESSED | (3 << 54) | 0x12345;
        let e = l2_entry(raw, None, 16, MB).unwrap();
        assert_eq!(e.mapping, Mapping::Compressed { offset: 0x12345, len: 4 * 512 - 0x145 });
        // Near the end of the file the length is cut to what is there.
        let e = l2_entry(COMPRESSED | (3 << 54) | (MB - 100), None, 16, MB).unwrap();
        assert_eq!(e.mapping, Mapping::Compressed { offset: MB - 100, len: 100 });
        assert!(l2_entry(raw | COPIED, None, 16, MB).is_err());
        assert!(l2_entry(raw, Some(1), 16, MB).is_err());
        assert!(l2_entry(COMPRESSED | (3 << 54) | (2 * MB), None, 16, MB).is_err());
    }

    #[test]
    fn extended_entries_map_subclusters() {
        let sub = 2048; // 64 KiB / 32
        let e = l2_entry(0x40000, Some(0b0101 | (0b1000u64 << 32)), 16, MB).unwrap();
        assert_eq!(e.subcluster(0, true, sub), Mapping::Data(0x40000));
        assert_eq!(e.subcluster(1, true, sub), Mapping::Backing);
        assert_eq!(e.subcluster(2, true, sub), Mapping::Data(0x40000 + 2 * sub));
        assert_eq!(e.subcluster(3, true, sub), Mapping::Zero);
        assert!(l2_entry(0x40000, Some(1 | (1 << 32)), 16, MB).is_err(), "allocated and zero");
        assert!(l2_entry(0, Some(1), 16, MB).is_err(), "allocated without a cluster");
        let e = l2_entry(0, Some(0xffff_ffffu64 << 32), 16, MB).unwrap();
        assert_eq!(e.subcluster(31, true, sub), Mapping::Zero);
    }
}
