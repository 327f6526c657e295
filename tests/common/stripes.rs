//! Writers that each own a stripe of every cluster of a disk, so that each
//! one's model of its own bytes is exact whatever the interleaving with the
//! others (shared by the concurrency tests).

use ublk_ploop::io::{block_on, AlignedBuf, Io, SyncIo};
pub use ublk_ploop::rng::Rng;
use ublk_ploop::Stack;

pub const BLOCK: u64 = 4096;

/// Bytes no other write produces: (tag, disk offset) in every word.
pub fn pattern(tag: u64, off: u64, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((tag << 40) ^ (off / 8 + i as u64)).to_le_bytes());
    }
    b
}

pub struct Geometry {
    pub cluster: u64,
    pub clusters: u64,
    pub stripe: u64,
}

impl Geometry {
    pub fn size(&self) -> u64 {
        self.cluster * self.clusters
    }
    /// Disk offset of `owner`'s stripe in cluster `c`.
    pub fn stripe_at(&self, owner: usize, c: u64) -> u64 {
        c * self.cluster + owner as u64 * self.stripe
    }
}

/// One writer: its stripe of every cluster, as the disk must show it.
pub struct Owner {
    pub id: usize,
    pub rng: Rng,
    pub stripes: Vec<Vec<u8>>,
    pub ops: usize,
}

impl Owner {
    /// Owner `id`, its stripes as `disk` holds them now.
    pub fn new(id: usize, seed: u64, g: &Geometry, disk: &[u8]) -> Owner {
        let stripes = (0..g.clusters)
            .map(|c| {
                let at = g.stripe_at(id, c) as usize;
                disk[at..at + g.stripe as usize].to_vec()
            })
            .collect();
        Owner { id, rng: Rng::new(seed), stripes, ops: 0 }
    }

    /// Take `disk`'s content as this owner's model (after a switch).
    pub fn reset(&mut self, g: &Geometry, disk: &[u8]) {
        self.stripes = Owner::new(self.id, 0, g, disk).stripes;
    }

    /// One random operation on its own bytes, checked against its model.
    pub async fn step<I: Io>(&mut self, stack: &Stack, io: &I, g: &Geometry, tag: u64) -> Result<(), String> {
        let c = self.rng.below(g.clusters);
        let blocks = g.stripe / BLOCK;
        let first = self.rng.below(blocks);
        let n = 1 + self.rng.below(blocks - first);
        let within = first * BLOCK;
        let len = (n * BLOCK) as usize;
        let off = g.stripe_at(self.id, c) + within;
        let model = &mut self.stripes[c as usize][within as usize..within as usize + len];
        let ctx = format!("owner {} op {} (cluster {c}, {off}+{len})", self.id, self.ops);
        self.ops += 1;
        match self.rng.below(10) {
            0..=4 => {
                let data = pattern(tag, off, len);
                stack.write(io, off, &data).await.map_err(|e| format!("{ctx}: write: {e}"))?;
                model.copy_from_slice(&data);
            }
            5 => {
                stack.write_zeroes(io, off, len).await.map_err(|e| format!("{ctx}: write_zeroes: {e}"))?;
                model.fill(0);
            }
            6 => stack.flush(io).await.map_err(|e| format!("{ctx}: flush: {e}"))?,
            _ => {
                let mut got = AlignedBuf::zeroed(len);
                stack.read(io, off, &mut got).await.map_err(|e| format!("{ctx}: read: {e}"))?;
                if got[..] != model[..] {
                    let at = got.iter().zip(model.iter()).position(|(a, b)| a != b).unwrap();
                    return Err(format!("{ctx}: byte {} of the read differs from what this writer wrote", at));
                }
            }
        }
        Ok(())
    }
}

/// The whole disk as the owners' models say it is.
pub fn expected(g: &Geometry, owners: &[Owner]) -> Vec<u8> {
    let mut disk = vec![0u8; g.size() as usize];
    for o in owners {
        for c in 0..g.clusters {
            let at = g.stripe_at(o.id, c) as usize;
            disk[at..at + g.stripe as usize].copy_from_slice(&o.stripes[c as usize]);
        }
    }
    disk
}

pub fn verify(stack: &Stack, want: &[u8], ctx: &str) {
    let mut got = AlignedBuf::zeroed(want.len());
    block_on(stack.read(&SyncIo, 0, &mut got)).unwrap_or_else(|e| panic!("{ctx}: reading the disk: {e}"));
    if got[..] != want[..] {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!("{ctx}: disk byte {at} differs from the model");
    }
}

