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

thread_local! {
    /// Where this thread's entropy comes from while a simulation runs.
    static SEEDED: std::cell::RefCell<Option<Rng>> = const { std::cell::RefCell::new(None) };
}

/// Random bits for names and identities (GUIDs, temporary suffixes): the
/// system's generator, or the seeded stream installed by [`seeded`], so a
/// simulated run names its files the same way every time.
pub fn entropy_u128() -> u128 {
    if let Some(v) = SEEDED.with(|s| s.borrow_mut().as_mut().map(|r| (r.next_u64() as u128) << 64 | r.next_u64() as u128)) {
        return v;
    }
    uuid::Uuid::new_v4().as_u128()
}

/// While the guard lives, [`entropy_u128`] on this thread draws from `seed`.
pub fn seeded(seed: u64) -> EntropyGuard {
    SEEDED.with(|s| *s.borrow_mut() = Some(Rng::new(seed)));
    EntropyGuard(())
}

pub struct EntropyGuard(());

impl Drop for EntropyGuard {
    fn drop(&mut self) {
        SEEDED.with(|s| *s.borrow_mut() = None);
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

    #[test]
    fn seeded_entropy_repeats_and_ends_with_its_guard() {
        let a = {
            let _g = seeded(5);
            (entropy_u128(), entropy_u128())
        };
        let b = {
            let _g = seeded(5);
            (entropy_u128(), entropy_u128())
        };
        assert_eq!(a, b);
        assert_ne!(a.0, a.1);
        assert_ne!(entropy_u128(), a.0, "the system's generator again once the guard is gone");
    }
}
