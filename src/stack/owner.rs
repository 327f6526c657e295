//! Per cluster, the topmost layer that holds it, in chunks that exist only
//! where some layer holds clusters: a thin disk costs its directory, and a
//! lookup stays two dependent loads at any depth.
//!
//! A raw or QCOW2 layer holds every cluster below its end; it is kept as a
//! *floor* (its index and end) rather than as entries, so such a base of
//! any size costs nothing until a layer above it allocates near a cluster.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::NOBODY;
use crate::layers::Layer;

const CHUNK: usize = 4096;

type Chunk = [AtomicU8; CHUNK];

pub(super) struct OwnerMap {
    clusters: u64,
    dir: Box<[OnceLock<Box<Chunk>>]>,
    /// Raw and QCOW2 layers, bottom first: (index, clusters covered). A cluster with
    /// no chunk belongs to the topmost floor that covers it.
    floors: Vec<(u8, u64)>,
    chunks: AtomicUsize,
}

impl OwnerMap {
    fn empty(clusters: u64) -> OwnerMap {
        let len = (clusters as usize).div_ceil(CHUNK);
        OwnerMap { clusters, dir: (0..len).map(|_| OnceLock::new()).collect(), floors: Vec::new(), chunks: AtomicUsize::new(0) }
    }

    /// The map of `layers` (bottom first) over a disk of `clusters`: time
    /// and memory follow the clusters the layers hold.
    pub(super) fn build(layers: &[Arc<Layer>], clusters: u64, cluster: u64) -> OwnerMap {
        let mut map = OwnerMap::empty(clusters);
        for (index, layer) in layers.iter().enumerate() {
            let index = index as u8;
            match &**layer {
                Layer::Ploop(l) => {
                    for (c, _) in l.allocated().take_while(|&(c, _)| c < clusters) {
                        map.set(c, index);
                    }
                }
                // A raw file and a QCOW2 image hold every cluster below
                // their size.
                Layer::Raw(_) | Layer::Qcow2(_) => {
                    let end = layer.size().div_ceil(cluster).min(clusters);
                    for (c, slot) in map.present_slots() {
                        if c < end {
                            slot.store(index, Ordering::Relaxed);
                        }
                    }
                    map.floors.push((index, end));
                }
            }
        }
        map
    }

    fn floor_of(&self, c: u64) -> u8 {
        self.floors.iter().rev().find(|&&(_, end)| c < end).map_or(NOBODY, |&(i, _)| i)
    }

    #[inline]
    pub(super) fn get(&self, c: u64) -> Option<usize> {
        if c >= self.clusters {
            return None;
        }
        let c = c as usize;
        let owner = match self.dir[c / CHUNK].get() {
            Some(chunk) => chunk[c % CHUNK].load(Ordering::Acquire),
            None => self.floor_of(c as u64),
        };
        (owner != NOBODY).then_some(owner as usize)
    }

    /// Name `owner` (or NOBODY) as the holder of cluster `c`.
    pub(super) fn set(&self, c: u64, owner: u8) {
        if c >= self.clusters {
            return;
        }
        let k = c as usize / CHUNK;
        let cell = &self.dir[k];
        let chunk = match cell.get() {
            Some(chunk) => chunk,
            None if owner == self.floor_of(c) => return,
            None => cell.get_or_init(|| {
                self.chunks.fetch_add(1, Ordering::Relaxed);
                let first = (k * CHUNK) as u64;
                Box::new(std::array::from_fn(|i| AtomicU8::new(self.floor_of(first + i as u64))))
            }),
        };
        chunk[c as usize % CHUNK].store(owner, Ordering::Release);
    }

    fn present_slots(&self) -> impl Iterator<Item = (u64, &AtomicU8)> + '_ {
        self.present_slots_from(0)
    }

    /// The slots of the chunks that exist, from cluster `start` on: the
    /// chunks before `start`'s are skipped unread.
    fn present_slots_from(&self, start: u64) -> impl Iterator<Item = (u64, &AtomicU8)> + '_ {
        let clusters = self.clusters;
        let first = (start.min(clusters) as usize) / CHUNK;
        self.dir[first..]
            .iter()
            .enumerate()
            .filter_map(move |(k, cell)| cell.get().map(|chunk| (first + k, chunk)))
            .flat_map(|(k, chunk)| chunk.iter().enumerate().map(move |(i, slot)| ((k * CHUNK + i) as u64, slot)))
            .skip_while(move |&(c, _)| c < start)
            .take_while(move |&(c, _)| c < clusters)
    }

    /// The clusters whose owner is kept in a chunk (not implied by a
    /// floor), with their owners: every cluster a ploop layer holds.
    pub(super) fn present(&self) -> impl Iterator<Item = (u64, Option<usize>)> + '_ {
        self.present_slots().map(|(c, slot)| {
            let owner = slot.load(Ordering::Acquire);
            (c, (owner != NOBODY).then_some(owner as usize))
        })
    }

    /// The clusters some layer holds, ascending.
    pub(super) fn held(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        self.held_from(0)
    }

    /// The clusters from `start` on that some layer holds, ascending; the
    /// chunks before `start`'s and the absent ones are skipped unread.
    pub(super) fn held_from(&self, start: u64) -> Box<dyn Iterator<Item = u64> + '_> {
        if self.floors.iter().all(|&(_, end)| end == 0) {
            return Box::new(self.present_slots_from(start).filter(|(_, slot)| slot.load(Ordering::Acquire) != NOBODY).map(|(c, _)| c));
        }
        Box::new((start.min(self.clusters)..self.clusters).filter(|&c| self.get(c).is_some()))
    }

    /// Bytes of memory the map holds (directory and chunks).
    pub(super) fn bytes(&self) -> u64 {
        (self.dir.len() * size_of::<OnceLock<Box<Chunk>>>() + self.chunks.load(Ordering::Relaxed) * CHUNK) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_sets_and_missing_ones_read_as_their_floor() {
        let mut map = OwnerMap::empty(10 * CHUNK as u64);
        let empty = map.bytes();
        assert_eq!(map.get(5), None);
        map.set(5, NOBODY);
        assert_eq!(map.bytes(), empty, "naming nobody created a chunk");
        map.set(5, 1);
        assert_eq!(map.get(5), Some(1));
        assert_eq!(map.bytes(), empty + CHUNK as u64);
        assert_eq!(map.present().filter(|(_, o)| o.is_some()).collect::<Vec<_>>(), vec![(5, Some(1))]);
        // A raw layer 0 covering the first three chunks and a bit.
        map.floors.push((0, 3 * CHUNK as u64 + 7));
        assert_eq!(map.get(6), None, "a present chunk speaks for itself");
        assert_eq!(map.get(CHUNK as u64), Some(0));
        assert_eq!(map.get(3 * CHUNK as u64 + 6), Some(0));
        assert_eq!(map.get(3 * CHUNK as u64 + 7), None);
        map.set(3 * CHUNK as u64 + 1, 2);
        assert_eq!(map.get(3 * CHUNK as u64 + 1), Some(2));
        assert_eq!(map.get(3 * CHUNK as u64 + 2), Some(0), "a new chunk starts from the floor");
        assert_eq!(map.get(3 * CHUNK as u64 + 8), None);
        assert_eq!(map.get(10 * CHUNK as u64), None, "beyond the disk");
        // Chunk 0 predates the floor (build applies floors to chunks made
        // before them; this test does not): its one held cluster, two
        // chunks of floor, and the seven covered clusters of chunk 3.
        assert_eq!(map.held().count(), 1 + 2 * CHUNK + 7);
        assert_eq!(map.held_from(3 * CHUNK as u64 + 2).count(), 5, "the floor's clusters of chunk 3 from the start");
    }

    #[test]
    fn held_from_starts_inside_a_chunk_and_skips_absent_ones() {
        let map = OwnerMap::empty(10 * CHUNK as u64);
        let c = CHUNK as u64;
        for at in [3, 9, c + 4, 7 * c, 10 * c - 1] {
            map.set(at, 0);
        }
        map.set(9, NOBODY);
        assert_eq!(map.held().collect::<Vec<_>>(), vec![3, c + 4, 7 * c, 10 * c - 1]);
        assert_eq!(map.held_from(4).collect::<Vec<_>>(), vec![c + 4, 7 * c, 10 * c - 1]);
        assert_eq!(map.held_from(c + 4).collect::<Vec<_>>(), vec![c + 4, 7 * c, 10 * c - 1]);
        assert_eq!(map.held_from(c + 5).collect::<Vec<_>>(), vec![7 * c, 10 * c - 1]);
        assert_eq!(map.held_from(10 * c).count(), 0);
        assert_eq!(map.held_from(u64::MAX).count(), 0);
    }
}
