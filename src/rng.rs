//! splitmix64: the one seeded generator of the tests, the benchmark and
//! the simulation. Tiny and fully determined by its seed, so a seed that
//! a failing run prints replays the same run.

/// A splitmix64 stream; `Rng::new(seed)` always yields the same numbers.
#[derive(Clone, Debug)]
pub struct Rng(u64);

/// One splitmix64 step: a well-mixed word from any counter value (used on
/// its own to give every disk offset fixed, incompressible content).
pub fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        let out = mix(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }
    /// Uniform enough in 0..n; n must not be 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream the tests' printed seeds were recorded with: the state
    /// advances by the golden ratio, then the mix runs on the new state.
    #[test]
    fn the_stream_is_the_classic_splitmix64() {
        let mut old = 7u64;
        let mut classic = || {
            old = old.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = old;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut rng = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(rng.next_u64(), classic());
        }
    }
}
