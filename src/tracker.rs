//! The write tracker: which clusters changed since it was last drained.
//!
//! Live copy sends everything once, then drains this set round after round
//! and sends only what changed. Marking is a lock-free OR on every write
//! path, so a running tracker costs one atomic per cluster touched.

use std::sync::atomic::{AtomicU64, Ordering};

use bitvec::vec::BitVec;

pub struct Tracker {
    cluster: u64,
    clusters: u64,
    words: Box<[AtomicU64]>,
}

impl Tracker {
    pub fn new(disk_size: u64, cluster: u64) -> Tracker {
        let clusters = disk_size.div_ceil(cluster);
        let words = (0..clusters.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Tracker { cluster, clusters, words }
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Record a change to bytes `[offset, offset + len)`.
    pub fn mark_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.cluster;
        let last = ((offset + len - 1) / self.cluster).min(self.clusters.saturating_sub(1));
        for c in first..=last {
            self.words[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Relaxed);
        }
    }

    /// Take the set of changed clusters, leaving it empty.
    pub fn drain(&self) -> BitVec {
        let mut out = BitVec::with_capacity(self.clusters as usize);
        for (i, w) in self.words.iter().enumerate() {
            let bits = w.swap(0, Ordering::AcqRel);
            let n = (self.clusters - i as u64 * 64).min(64) as usize;
            out.extend((0..n).map(|b| bits & (1 << b) != 0));
        }
        out
    }

    /// Clusters marked now.
    pub fn dirty_count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_drains() {
        let t = Tracker::new(10 << 20, 1 << 20);
        t.mark_range(0, 512);
        t.mark_range((3 << 20) - 512, 1024);
        t.mark_range(9 << 20, 1 << 20);
        assert_eq!(t.dirty_count(), 4);
        let d = t.drain();
        assert_eq!(d.len(), 10);
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![0, 2, 3, 9]);
        assert_eq!(t.dirty_count(), 0);
        assert_eq!(t.drain().count_ones(), 0);
    }
}
