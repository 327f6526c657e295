//! A ploop BAT in memory, kept in chunks that exist only where entries do:
//! a thin disk of 64 TiB costs its small directory, not 256 MiB of zeros,
//! and a lookup stays two dependent loads, without a lock.
//!
//! Slots are the table's 32-bit words in file order: slot `c + 16` holds
//! the entry of cluster `c` (the 64-byte header is the first 16), so one
//! chunk is exactly one 4 KiB piece of the on-disk table, and the bytes of
//! any block of it are rebuilt from the chunks (`bytes_at`).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::header::HEADER_SIZE;
use crate::error::{Error, Result};

const CHUNK_SLOTS: usize = 1024;
const HEADER_SLOTS: usize = HEADER_SIZE / 4;

type Chunk = [AtomicU32; CHUNK_SLOTS];

pub struct Table {
    /// Entries the disk uses (`load::used_entries`).
    entries: u64,
    dir: Box<[OnceLock<Box<Chunk>>]>,
    chunks: AtomicUsize,
}

impl Table {
    /// An empty table of `entries` entries; refused (not aborted) when
    /// even its directory cannot be allocated.
    pub fn new(entries: u64, path: &str) -> Result<Table> {
        let slots = entries as usize + HEADER_SLOTS;
        let len = slots.div_ceil(CHUNK_SLOTS);
        let mut dir: Vec<OnceLock<Box<Chunk>>> = Vec::new();
        dir.try_reserve_exact(len).map_err(|_| Error::too_large(path, (len * size_of::<OnceLock<Box<Chunk>>>()) as u64))?;
        dir.resize_with(len, OnceLock::new);
        Ok(Table { entries, dir: dir.into_boxed_slice(), chunks: AtomicUsize::new(0) })
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The raw entry of cluster `c` (0: not allocated, or beyond the table).
    #[inline]
    pub fn get(&self, c: u64) -> u32 {
        if c >= self.entries {
            return 0;
        }
        let slot = c as usize + HEADER_SLOTS;
        match self.dir[slot / CHUNK_SLOTS].get() {
            Some(chunk) => chunk[slot % CHUNK_SLOTS].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Set the entry of cluster `c` (below `entries`), returning the old
    /// value. Callers serialize their sets (the layer's metadata mutex);
    /// readers may run meanwhile. A zero never creates a chunk.
    pub fn set(&self, c: u64, value: u32) -> u32 {
        assert!(c < self.entries, "BAT entry {c} beyond the table's {}", self.entries);
        let slot = c as usize + HEADER_SLOTS;
        let cell = &self.dir[slot / CHUNK_SLOTS];
        let chunk = match cell.get() {
            Some(chunk) => chunk,
            None if value == 0 => return 0,
            None => cell.get_or_init(|| {
                self.chunks.fetch_add(1, Ordering::Relaxed);
                Box::new([const { AtomicU32::new(0) }; CHUNK_SLOTS])
            }),
        };
        chunk[slot % CHUNK_SLOTS].swap(value, Ordering::AcqRel)
    }

    /// Fill the entries from `first` on with `values` (loading; non-zero
    /// entries only create chunks).
    pub fn fill(&self, first: u64, values: &[u32]) {
        for (i, &v) in values.iter().enumerate() {
            if v != 0 {
                self.set(first + i as u64, v);
            }
        }
    }

    /// The clusters with a non-zero entry, in ascending order: time and
    /// memory follow the chunks present, not the table's length.
    pub fn present(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.dir.iter().enumerate().filter_map(|(k, cell)| cell.get().map(|chunk| (k, chunk))).flat_map(move |(k, chunk)| {
            chunk.iter().enumerate().filter_map(move |(i, v)| {
                let slot = k * CHUNK_SLOTS + i;
                let value = v.load(Ordering::Acquire);
                (slot >= HEADER_SLOTS && value != 0).then(|| ((slot - HEADER_SLOTS) as u64, value))
            })
        })
    }

    /// Bytes of memory the table holds (directory and chunks).
    pub fn bytes(&self) -> u64 {
        (self.dir.len() * size_of::<OnceLock<Box<Chunk>>>() + self.chunks.load(Ordering::Relaxed) * size_of::<Chunk>()) as u64
    }

    /// The bytes `[at, at + out.len())` of the file's header-and-table area
    /// as they should be on disk: `head` (the header's 64 bytes), then the
    /// entries, then `tail` (the bytes after the last used entry, as read
    /// when opening), then zeros. `at` and the length are multiples of 4.
    pub fn bytes_at(&self, head: &[u8; HEADER_SIZE], tail: &[u8], at: usize, out: &mut [u8]) {
        let end = HEADER_SIZE + 4 * self.entries as usize;
        for (k, word) in out.chunks_exact_mut(4).enumerate() {
            let pos = at + 4 * k;
            if pos < HEADER_SIZE {
                word.copy_from_slice(&head[pos..pos + 4]);
            } else if pos < end {
                word.copy_from_slice(&self.get(((pos - HEADER_SIZE) / 4) as u64).to_le_bytes());
            } else {
                let from = (pos - end).min(tail.len());
                let take = (tail.len() - from).min(4);
                word[..take].copy_from_slice(&tail[from..from + take]);
                word[take..].fill(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_zero_entries_cost_chunks_and_reads_match_sets() {
        // 2^26 entries: 64 TiB of 1 MiB clusters.
        let t = Table::new(1 << 26, "t").unwrap();
        let empty = t.bytes();
        assert!(empty < 2 << 20, "directory of {empty} bytes");
        assert_eq!(t.get(5), 0);
        assert_eq!(t.set(5, 0), 0);
        assert_eq!(t.bytes(), empty, "a zero created a chunk");
        assert_eq!(t.set(5, 77), 0);
        assert_eq!(t.set((1 << 26) - 1, 9), 0);
        assert_eq!(t.bytes(), empty + 2 * 4096);
        assert_eq!(t.get(5), 77);
        assert_eq!(t.get(6), 0);
        assert_eq!(t.get(1 << 26), 0, "beyond the table");
        assert_eq!(t.present().collect::<Vec<_>>(), vec![(5, 77), ((1 << 26) - 1, 9)]);
        assert_eq!(t.set(5, 0), 77);
        assert_eq!(t.present().count(), 1);
    }

    #[test]
    fn rebuilt_bytes_are_header_entries_and_tail_in_file_order() {
        let t = Table::new(3, "t").unwrap();
        t.fill(0, &[0x0102_0304, 0, 7]);
        let head = [0xAAu8; HEADER_SIZE];
        let mut out = vec![0xEEu8; 96];
        t.bytes_at(&head, &[1, 2, 3, 4, 5, 6], 0, &mut out);
        let mut want = vec![0xAAu8; HEADER_SIZE];
        want.extend([4, 3, 2, 1, 0, 0, 0, 0, 7, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
        want.resize(96, 0);
        assert_eq!(out, want);
        // A window that starts inside the entries.
        let mut part = vec![0u8; 8];
        t.bytes_at(&head, &[1, 2, 3, 4, 5, 6], HEADER_SIZE + 8, &mut part);
        assert_eq!(part, [7, 0, 0, 0, 1, 2, 3, 4]);
    }
}
