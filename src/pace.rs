//! Pacing of background work (compact), so that it leaves the container's
//! I/O room: between steps, the job sleeps until its average speed is back
//! under the limit. The engine knows nothing of it; only the frontends,
//! which own the job's thread, pace.

use std::time::{Duration, Instant};

use ublk_ploop::io::Io;

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

    /// Sleep until `bytes` in all are within the limit. The sleep is the
    /// job's ring's (`Io::sleep_blocking`): a thread asleep outside its
    /// ring would keep what the ring still holds of files closed meanwhile
    /// (their locks among it) until its next step.
    /// After the `last` step nothing follows to pace: no wait (a job that
    /// did all its work in one step must not then hold its lock for the
    /// time a slow limit asks).
    pub fn wait(&self, io: &impl Io, bytes: u64, last: bool) {
        self.wait_unless(io, bytes, last, &|| false);
    }

    /// The same, in slices of at most 200 ms, ending early once `stop`
    /// says so: a command asked to stop does not sit out a long pause.
    pub fn wait_unless(&self, io: &impl Io, bytes: u64, last: bool, stop: &dyn Fn() -> bool) {
        while !last && !stop() {
            let d = self.delay(bytes);
            if d.is_zero() {
                return;
            }
            io.sleep_blocking(d.min(Duration::from_millis(200)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_ploop::io::SyncIo;

    #[test]
    fn a_stop_ends_a_long_pause() {
        let pace = Pace::new(Some(1));
        let t = std::time::Instant::now();
        pace.wait_unless(&SyncIo, 1 << 20, false, &|| true);
        let asked = std::cell::Cell::new(0);
        pace.wait_unless(&SyncIo, 1 << 20, false, &|| {
            asked.set(asked.get() + 1);
            asked.get() > 2
        });
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(asked.get(), 3);
    }

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

    /// SyncIo's operations; its waits are counted.
    struct CountsWaits(std::cell::Cell<u32>);
    impl Io for CountsWaits {
        async fn read_at(&self, fd: i32, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            SyncIo.read_at(fd, buf, offset).await
        }
        async fn write_at(&self, fd: i32, buf: &[u8], offset: u64) -> std::io::Result<()> {
            SyncIo.write_at(fd, buf, offset).await
        }
        async fn sync_data(&self, fd: i32) -> std::io::Result<()> {
            SyncIo.sync_data(fd).await
        }
        async fn allocate(&self, fd: i32, offset: u64, len: u64) -> std::io::Result<()> {
            SyncIo.allocate(fd, offset, len).await
        }
        async fn punch_hole(&self, fd: i32, offset: u64, len: u64) -> std::io::Result<()> {
            SyncIo.punch_hole(fd, offset, len).await
        }
        async fn set_len(&self, fd: i32, len: u64) -> std::io::Result<()> {
            SyncIo.set_len(fd, len).await
        }
        fn sleep_blocking(&self, d: Duration) {
            self.0.set(self.0.get() + 1);
            std::thread::sleep(d);
        }
    }

    #[test]
    fn a_paced_job_waits_as_its_ring_does() {
        // A job's ring lets go of closed files only when its thread enters
        // it: the pause between steps must be the ring's wait.
        let io = CountsWaits(std::cell::Cell::new(0));
        let pace = Pace::new(Some(1 << 30));
        pace.wait(&io, 0, false);
        assert_eq!(io.0.get(), 0, "no wait is due at the start");
        pace.wait(&io, 16 << 20, false);
        assert_eq!(io.0.get(), 1, "the due wait did not go through the ring's wait");
        // Due, but nothing follows the last step.
        let slow = Pace::new(Some(1));
        let start = Instant::now();
        slow.wait(&io, 1 << 20, true);
        assert!(io.0.get() == 1 && start.elapsed() < Duration::from_secs(1), "the last step was paced");
    }
}
