//! Pacing of background work (compact), so that it leaves the container's
//! I/O room: between steps, the job sleeps until its average speed is back
//! under the limit. The engine knows nothing of it; only the frontends,
//! which own the job's thread, pace.

use std::time::{Duration, Instant};

/// An average speed limit from the first step on.
pub struct Pace {
    started: Instant,
    bytes_per_sec: Option<u64>,
}

impl Pace {
    /// No limit when `bytes_per_sec` is None (or 0).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Pace { started: Instant::now(), bytes_per_sec: bytes_per_sec.filter(|&b| b > 0) }
    }

    /// How long to wait once `bytes` are done in all.
    pub fn delay(&self, bytes: u64) -> Duration {
        let Some(rate) = self.bytes_per_sec else { return Duration::ZERO };
        let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
        due.saturating_sub(self.started.elapsed())
    }

    /// Sleep until `bytes` in all are within the limit.
    pub fn wait(&self, bytes: u64) {
        let d = self.delay(bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_never_waits() {
        assert_eq!(Pace::new(None).delay(u64::MAX), Duration::ZERO);
        assert_eq!(Pace::new(Some(0)).delay(1 << 40), Duration::ZERO);
    }

    #[test]
    fn the_delay_follows_the_average() {
        let pace = Pace::new(Some(4 << 20));
        // 8 MiB at 4 MiB/s are due two seconds after the start.
        let d = pace.delay(8 << 20);
        assert!(d > Duration::from_millis(1900) && d <= Duration::from_secs(2), "{d:?}");
        assert_eq!(pace.delay(0), Duration::ZERO);
    }
}
