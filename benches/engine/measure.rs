//! What one measured run did, whichever tool ran it, and how turns and
//! rounds add up.

use std::fs;
use std::time::Instant;

use serde_json::{json, Value};

use crate::{Res, ALLOCS_PER_TURN, CLUSTER, MIB};

/// User + system CPU seconds of this process (all its threads, io-wq included).
pub fn cpu_secs() -> f64 {
    rusage_secs(libc::RUSAGE_SELF)
}

/// The same for the calling thread alone: what fio counts for a job (its
/// `usr_cpu`/`sys_cpu` leave out the io-wq workers its writes are handed
/// to, as on tmpfs), so the engine's rows beside fio's count alike.
pub fn thread_cpu_secs() -> f64 {
    rusage_secs(libc::RUSAGE_THREAD)
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Result of one measured run (any tool).
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub ios: u64,
    pub bytes: u64,
    pub secs: f64,
    /// CPU use in percent of one core (None when the tool does not say).
    pub cpu_pct: Option<f64>,
    /// Allocating rows: rounds run, and seconds spent closing (flushing)
    /// the images, which the rate does not count.
    pub rounds: u64,
    pub close_secs: f64,
    /// Request latencies in microseconds, when asked for.
    pub lat_us: Vec<u32>,
}

impl Run {
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ios as f64 / self.secs
        } else {
            0.0
        }
    }
    /// Microseconds of CPU (the thread issuing the I/O) per I/O: a per-request
    /// cost shows here even when the disk, not the CPU, sets the rate.
    pub fn cpu_us_per_io(&self) -> Option<f64> {
        let pct = self.cpu_pct?;
        (self.ios > 0).then(|| pct / 100.0 * self.secs / self.ios as f64 * 1e6)
    }
    pub fn mibps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / MIB as f64
        } else {
            0.0
        }
    }
    pub fn add(&mut self, o: &Run) {
        let cpu = |r: &Run| r.cpu_pct.unwrap_or(0.0) / 100.0 * r.secs;
        let total_cpu = cpu(self) + cpu(o);
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.secs += o.secs;
        self.rounds += o.rounds;
        self.close_secs += o.close_secs;
        self.lat_us.extend_from_slice(&o.lat_us);
        if o.cpu_pct.is_some() && self.secs > 0.0 {
            self.cpu_pct = Some(total_cpu / self.secs * 100.0);
        }
    }
    /// Latency percentile in milliseconds.
    pub fn lat_ms(&self, pct: f64) -> Option<f64> {
        percentile_us(&self.lat_us, pct).map(|us| us / 1000.0)
    }
    pub fn to_json(&self) -> Value {
        json!({
            "iops": round1(self.iops()),
            "mib_s": round1(self.mibps()),
            "ios": self.ios,
            "secs": round3(self.secs),
            "cpu_pct": self.cpu_pct.map(round1),
            "cpu_us_per_io": self.cpu_us_per_io().map(round3),
            "rounds": self.rounds,
            "close_secs": round3(self.close_secs),
            "p99_ms": self.lat_ms(99.0).map(round3),
        })
    }
}

pub fn percentile_us(samples: &[u32], pct: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((pct / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[i.min(v.len() - 1)] as f64)
}

/// The middle value (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A run that moved `clusters` whole clusters in `secs`, with the CPU used since `cpu0`.
pub fn cluster_run(clusters: u64, secs: f64, cpu0: f64) -> Run {
    Run { ios: clusters, bytes: clusters * CLUSTER, secs, cpu_pct: Some((cpu_secs() - cpu0) / secs * 100.0), ..Default::default() }
}

/// Run allocation rounds on fresh images until `secs` of I/O, or
/// ALLOCS_PER_TURN allocations, or a wall-clock cap; at least one round.
pub fn alloc_rounds(secs: f64, mut one_round: impl FnMut() -> Res<Run>) -> Res<Run> {
    let mut total = Run::default();
    let wall = Instant::now();
    while total.rounds == 0 || (total.secs < secs && total.ios < ALLOCS_PER_TURN && wall.elapsed().as_secs_f64() < 3.0 * secs + 2.0) {
        total.add(&one_round()?);
    }
    Ok(total)
}

/// Add a tool's slice to its running total; the first error sticks.
pub fn accumulate(total: &mut Option<Res<Run>>, slice: Res<Run>) {
    match (total.as_mut(), slice) {
        (Some(Ok(t)), Ok(r)) => t.add(&r),
        (Some(Err(_)), _) => {}
        (_, Err(e)) => *total = Some(Err(e)),
        (None, Ok(r)) => *total = Some(Ok(r)),
    }
}

/// Two measurements taken in turns `n` times (a b a b ...), each summed,
/// so that drift in the machine's speed hits both alike.
pub fn in_turns(n: usize, mut turn: impl FnMut() -> Res<(Run, Run)>) -> Res<(Run, Run)> {
    let (mut a, mut b) = (Run::default(), Run::default());
    for _ in 0..n {
        let (x, y) = turn()?;
        a.add(&x);
        b.add(&y);
    }
    Ok((a, b))
}
