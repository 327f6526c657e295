//! The write tracker: which parts of the disk changed since it was last
//! drained.
//!
//! Live copy sends everything once, then drains this set round after round
//! and sends only what changed; changed-block tracking keeps one across
//! stops for incremental backups. The stack marks a range when a write,
//! write-zeroes or discard *completes* (also when it failed: a failed write
//! may have changed some of its bytes), so a drain never misses a change
//! that completed before it. Marking is a lock-free OR, one atomic per
//! granule touched.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use bitvec::vec::BitVec;

pub struct Tracker {
    /// Bytes per bit.
    granularity: u64,
    disk_size: u64,
    bits: u64,
    words: Box<[AtomicU64]>,
    /// Marks a backup took at its frozen point and is still sending: they
    /// count as changed (in `peek`, and so in the record a stop saves)
    /// until the backup confirms them sent, or go back on failure.
    pending: Box<[AtomicU64]>,
}

impl Tracker {
    /// A tracker for a disk of `disk_size` bytes, one bit per `granularity`
    /// bytes (a power of two: the cluster size for live copy, ploop's 64 KiB
    /// for changed-block tracking).
    pub fn new(disk_size: u64, granularity: u64) -> Tracker {
        assert!(granularity.is_power_of_two(), "tracker granularity {granularity} is not a power of two");
        let bits = disk_size.div_ceil(granularity);
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let pending = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Tracker { granularity, disk_size, bits, words, pending }
    }

    /// A tracker holding the marks of a saved bitmap.
    pub fn from_bits(disk_size: u64, granularity: u64, bits: &BitVec) -> Tracker {
        let t = Tracker::new(disk_size, granularity);
        t.mark_bits(bits);
        t
    }

    /// The marks as they are, in units of `granularity` (a unit is marked
    /// when any byte of it is).
    pub fn peek_at(&self, granularity: u64) -> BitVec {
        regranulate(&self.peek(), self.granularity, granularity, self.disk_size)
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of granules (bits).
    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Record a change to bytes `[offset, offset + len)`.
    pub fn mark_range(&self, offset: u64, len: u64) {
        if len == 0 || self.bits == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = ((offset + len - 1) / self.granularity).min(self.bits - 1);
        let mut g = first;
        while g <= last {
            let w = g / 64;
            let lo = g % 64;
            let hi = (last - w * 64).min(63);
            let mask = if hi - lo == 63 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
            self.words[w as usize].fetch_or(mask, Ordering::Release);
            g = (w + 1) * 64;
        }
    }

    /// Everything counts as changed (after the disk's content was replaced,
    /// or when the record of changes was lost).
    pub fn mark_all(&self) {
        self.mark_range(0, self.bits * self.granularity);
    }

    /// Add the marks of `bits` (a set taken earlier and given back, as when
    /// a copy that consumed it failed).
    pub fn mark_bits(&self, bits: &BitVec) {
        for g in bits.iter_ones().take_while(|&g| (g as u64) < self.bits) {
            self.words[g / 64].fetch_or(1 << (g % 64), Ordering::Release);
        }
    }

    /// Take the set of changed granules, leaving it empty (the pending
    /// marks stay where they are).
    pub fn drain(&self) -> BitVec {
        self.collect(|i| self.words[i].swap(0, Ordering::AcqRel))
    }

    /// The set of changed granules, left as it is: the live marks and the
    /// pending ones (what a saved record must hold).
    pub fn peek(&self) -> BitVec {
        self.collect(|i| self.words[i].load(Ordering::Acquire) | self.pending[i].load(Ordering::Acquire))
    }

    /// A backup's frozen point: move the live marks to the pending set and
    /// return them. Each word is added to the pending set before it leaves
    /// the live one, so `peek` never misses a mark; one set again by a write
    /// meanwhile stays live (it is the next backup's too).
    pub fn drain_to_pending(&self) -> BitVec {
        self.collect(|i| {
            let v = self.words[i].load(Ordering::Acquire);
            self.pending[i].fetch_or(v, Ordering::AcqRel);
            self.words[i].fetch_and(!v, Ordering::AcqRel);
            v
        })
    }

    /// The backup that took the pending marks succeeded: they are sent.
    pub fn confirm(&self) {
        for p in self.pending.iter() {
            p.store(0, Ordering::Release);
        }
    }

    /// The backup that took the pending marks failed: they are changes
    /// again (live first, then out of the pending set).
    pub fn restore(&self) {
        for (w, p) in self.words.iter().zip(self.pending.iter()) {
            let v = p.load(Ordering::Acquire);
            w.fetch_or(v, Ordering::AcqRel);
            p.fetch_and(!v, Ordering::AcqRel);
        }
    }

    fn collect(&self, take: impl Fn(usize) -> u64) -> BitVec {
        let mut out = BitVec::with_capacity(self.bits as usize);
        for i in 0..self.words.len() {
            let word = take(i);
            let n = (self.bits - i as u64 * 64).min(64) as usize;
            out.extend((0..n).map(|b| word & (1 << b) != 0));
        }
        out
    }

    /// Marks a backup took and has not confirmed or given back yet.
    pub fn has_pending(&self) -> bool {
        self.pending.iter().any(|p| p.load(Ordering::Acquire) != 0)
    }

    /// Granules marked now.
    pub fn dirty_count(&self) -> u64 {
        self.words.iter().zip(self.pending.iter()).map(|(w, p)| (w.load(Ordering::Relaxed) | p.load(Ordering::Relaxed)).count_ones() as u64).sum()
    }

    /// The byte ranges a set of granules covers, neighbours joined, the
    /// last one cut at the end of the disk.
    pub fn ranges(&self, bits: &BitVec) -> Vec<Range<u64>> {
        ranges_of(bits, self.granularity, self.disk_size)
    }
}

/// The same marks in other units: a unit of `to` bytes is set when any
/// byte of it was set in units of `from`.
pub fn regranulate(bits: &BitVec, from: u64, to: u64, disk_size: u64) -> BitVec {
    let mut out = BitVec::repeat(false, disk_size.div_ceil(to) as usize);
    for r in ranges_of(bits, from, disk_size) {
        for u in r.start / to..=(r.end - 1) / to {
            out.set(u as usize, true);
        }
    }
    out
}

/// Byte ranges of the set bits of `bits` (one bit per `granularity` bytes of
/// a disk of `disk_size` bytes), adjacent ones joined.
pub fn ranges_of(bits: &BitVec, granularity: u64, disk_size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for g in bits.iter_ones() {
        let start = g as u64 * granularity;
        if start >= disk_size {
            break;
        }
        let end = (start + granularity).min(disk_size);
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
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
        assert_eq!(t.peek().count_ones(), 4);
        let d = t.drain();
        assert_eq!(d.len(), 10);
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), vec![0, 2, 3, 9]);
        assert_eq!(t.ranges(&d), vec![0..1 << 20, 2 << 20..4 << 20, 9 << 20..10 << 20]);
        assert_eq!(t.dirty_count(), 0);
        assert_eq!(t.drain().count_ones(), 0);
        t.mark_bits(&d);
        assert_eq!(t.drain(), d);
    }

    #[test]
    fn pending_marks_count_until_confirmed_and_come_back_on_failure() {
        let t = Tracker::new(200 * 4096, 4096);
        t.mark_range(0, 4096);
        t.mark_range(100 * 4096, 4096);
        let taken = t.drain_to_pending();
        assert_eq!(taken.iter_ones().collect::<Vec<_>>(), vec![0, 100]);
        // Still in the record a stop would save.
        assert_eq!(t.peek().iter_ones().collect::<Vec<_>>(), vec![0, 100]);
        // A write after the frozen point, to a pending granule and another.
        t.mark_range(100 * 4096, 1);
        t.mark_range(150 * 4096, 1);
        t.confirm();
        assert_eq!(t.peek().iter_ones().collect::<Vec<_>>(), vec![100, 150], "later writes survive the confirm");
        t.drain_to_pending();
        t.mark_range(7 * 4096, 1);
        t.restore();
        assert_eq!(t.peek().iter_ones().collect::<Vec<_>>(), vec![7, 100, 150]);
        t.confirm();
        assert_eq!(t.drain().iter_ones().collect::<Vec<_>>(), vec![7, 100, 150], "a restore leaves nothing pending");
        assert_eq!(t.dirty_count(), 0);
    }

    #[test]
    fn ranges_across_words_and_a_partial_end() {
        // 200 granules of 4 KiB and a disk that ends inside the last one.
        let size = 200 * 4096 - 1024;
        let t = Tracker::new(size, 4096);
        assert_eq!(t.len(), 200);
        t.mark_range(60 * 4096, 10 * 4096);
        t.mark_range(190 * 4096, 1 << 30);
        let d = t.drain();
        assert_eq!(d.iter_ones().collect::<Vec<_>>(), (60..70).chain(190..200).collect::<Vec<_>>());
        assert_eq!(t.ranges(&d), vec![60 * 4096..70 * 4096, 190 * 4096..size]);
        // Coarser and finer units.
        t.mark_range(4096, 1);
        assert_eq!(t.peek_at(65536).iter_ones().collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.peek_at(2048).iter_ones().collect::<Vec<_>>(), vec![2, 3]);
        t.drain();
        t.mark_all();
        assert_eq!(t.dirty_count(), 200);
        assert_eq!(t.ranges(&t.peek()), vec![0..size]);
    }

    #[test]
    fn matches_a_model_bit_by_bit() {
        let t = Tracker::new(1000 * 512, 512);
        let mut model = vec![false; 1000];
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % (1000 * 512);
            let len = (x >> 20) % 70_000;
            t.mark_range(off, len);
            if len > 0 {
                let last = ((off + len - 1) / 512).min(999);
                for m in &mut model[(off / 512) as usize..=last as usize] {
                    *m = true;
                }
            }
        }
        let got: Vec<bool> = t.drain().iter().map(|b| *b).collect();
        assert_eq!(got, model);
    }
}
