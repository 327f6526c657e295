//! The workload a seed draws (plan §3.1): the disk's shape, the world's
//! fault budget, and the operations, all generated up front from the
//! workload stream (`Rng::new(mix(seed ^ 1))`) so that a failing run can
//! be shrunk by dropping operations while the scheduler's, the faults' and
//! the crashes' streams (split from the seed by the world) stay as they
//! were.
use ublk_ploop::rng::{mix, Rng};

use super::{DirMode, FaultPlan};

/// The unit requests are generated in; the driver rounds them to the
/// stack's block size when that is larger.
pub const SECTOR: u64 = 512;

/// Deltas a run may stack at most (snapshots beyond it are skipped).
pub const MAX_LAYERS: usize = 8;

#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub cluster: u64,
    pub size: u64,
    /// Queues issuing requests concurrently, each up to `depth` at once.
    pub queues: usize,
    pub depth: usize,
    pub dir_mode: DirMode,
    pub faults: FaultPlan,
    /// The stack keeps a copy-up link log in a volatile directory.
    pub links: bool,
}

/// One step of the workload. Serde so that a shrunk failure can be saved
/// and replayed (`UBLK_PLOOP_SIM_REPLAY`) whatever the variants are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WorkOp {
    /// Requests, issued on `queue` (a task each, at most `depth` of a
    /// queue's in flight together). `misalign` offsets the memory buffer
    /// (a bounce buffer at an odd address).
    Read { queue: usize, off: u64, len: u64, misalign: usize },
    Write { queue: usize, off: u64, len: u64, misalign: usize },
    Zeroes { queue: usize, off: u64, len: u64 },
    Discard { queue: usize, off: u64, len: u64 },
    Flush { queue: usize },
    /// Let the executor run this many events before the next step.
    Run(u64),
    /// Wait for everything in flight.
    Settle,
    /// A new top layer (`Stack::push_layer`), concurrent with requests.
    Snapshot,
    /// The process dies after `after` more executor events; `repair` runs
    /// `check --repair` on every delta before the reopen.
    Kill { after: u64, repair: bool },
    /// The power goes after `after` more events.
    PowerCut { after: u64, repair: bool },
    /// Close cleanly, check every delta, reopen.
    CleanReopen,
    /// Read the whole disk and check it (and collapse the model).
    ReadBack,
    /// A snapshot taken with no write in flight or issued meanwhile, its
    /// content recorded: a switch may go back to it.
    QuietSnapshot,
    /// Merge a delta into its parent (`ops::merge`): `pick` chooses the
    /// child among the chain's deltas that have a parent (0 = the top).
    Merge { pick: u8 },
    /// Delete a snapshot (`ops::delete`): `pick` chooses among them.
    Delete { pick: u8 },
    /// Switch to a snapshot whose content was recorded (`ops::switch`),
    /// with no write running.
    Switch { pick: u8 },
    /// Grow the disk online by this many clusters, as the daemon does.
    Grow { clusters: u64 },
    /// Compact the top online, `step` clusters a step.
    Compact { step: u64 },
    /// A full or incremental backup as the daemon runs it, concurrent with
    /// the requests: `freeze_limit_us` bounds its frozen pass (a short one
    /// makes it give up), `capture` holds the last pass in memory.
    Backup { incremental: bool, freeze_limit_us: u64, in_flight: usize, max_rounds: u32, capture: bool },
    /// A write tracker (`track start`), drained and detached later.
    TrackStart,
    TrackDrain,
    TrackStop,
    /// The power goes while a sync is in flight (the `skip`-th one after
    /// this, within `within` events): what it was to make durable is not
    /// yet, and a cut there tests the order of the writes before it.
    /// With `sync_lost`, that sync is certain not to have landed (else it
    /// lands or not by the crash stream, as every op in flight does).
    PowerCutAtSync {
        within: u64,
        skip: u64,
        repair: bool,
        #[serde(default)]
        sync_lost: bool,
    },
}

impl WorkOp {
    pub fn is_crash(&self) -> bool {
        matches!(self, WorkOp::Kill { .. } | WorkOp::PowerCut { .. } | WorkOp::PowerCutAtSync { .. })
    }
}

/// The workload stream of `seed`.
pub fn workload_rng(seed: u64) -> Rng {
    Rng::new(mix(seed ^ 1))
}

/// The disk, queues and faults of `seed`, then its operations.
pub fn generate(seed: u64) -> (Config, Vec<WorkOp>) {
    let mut rng = workload_rng(seed);
    let cfg = config(seed, &mut rng);
    let ops = operations(&cfg, &mut rng);
    (cfg, ops)
}

fn config(seed: u64, rng: &mut Rng) -> Config {
    // Small clusters make growth past the table's slack cheap.
    let cluster = if rng.chance(50) { 4096 } else { 65536 };
    let clusters = 16 + rng.below(512 - 16 + 1);
    // Sometimes a partial last cluster (4 KiB aligned, for O_DIRECT).
    let size = if cluster > 4096 && rng.chance(25) {
        (clusters - 1) * cluster + 4096 * (1 + rng.below(cluster / 4096 - 1))
    } else {
        clusters * cluster
    };
    let queues = 1 + rng.below(4) as usize;
    let depth = [1, 2, 4, 8, 16][rng.below(5) as usize];
    let dir_mode = if rng.chance(50) { DirMode::Posix } else { DirMode::Journal };
    let faults = if rng.chance(35) {
        FaultPlan::none()
    } else {
        let data_blocks = size.div_ceil(4096);
        FaultPlan {
            transient: 1 + rng.below(3) as u32,
            per_op: 50 + rng.below(1000),
            sticky_after: if rng.chance(5) { Some(2000 + rng.below(20000)) } else { None },
            no_punch: rng.chance(10),
            no_alloc: rng.chance(10),
            // Tight sometimes: a layer or two of the disk plus metadata.
            capacity_blocks: if rng.chance(15) { data_blocks + data_blocks / (1 + rng.below(4)) + 64 } else { u64::MAX },
        }
    };
    Config { seed, cluster, size, queues, depth, dir_mode, faults, links: links_for(seed) }
}

/// Worlds with the copy-up link log: every other seed, or all (none) with
/// `UBLK_PLOOP_SIM_LINKS=1` (`=0`). Not drawn: a seed's world and workload
/// are the same either way.
fn links_for(seed: u64) -> bool {
    match std::env::var("UBLK_PLOOP_SIM_LINKS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => seed % 2 == 0,
    }
}

fn operations(cfg: &Config, rng: &mut Rng) -> Vec<WorkOp> {
    let steps = 300 + rng.below(1500 - 300 + 1) as usize;
    let clusters = cfg.size.div_ceil(cfg.cluster);
    // Requests crowd into a few hot clusters often, so that they overlap
    // each other, copy-ups and snapshots.
    let hot_len = clusters.min(1 + rng.below(8));
    let hot_start = rng.below(clusters - hot_len + 1);
    // How often this seed crashes (per mille of steps).
    let crash_rate = [0, 2, 5, 10][rng.below(4) as usize];
    let mut jobs = Rng::new(mix(cfg.seed ^ 0xbac0));
    // Compaction's extra trims and cuts, from a stream of their own (the
    // other operations stay as the seed drew them).
    let mut compacts = Rng::new(mix(cfg.seed ^ 0xc0a7));
    let mut ops = Vec::with_capacity(steps);
    while ops.len() < steps {
        let queue = rng.below(cfg.queues as u64) as usize;
        let pick = rng.below(1000);
        let op = match pick {
            0..=339 => {
                let (off, len) = extent(cfg, rng, hot_start, hot_len);
                WorkOp::Write { queue, off, len, misalign: misalign(rng) }
            }
            340..=579 => {
                let (off, len) = extent(cfg, rng, hot_start, hot_len);
                WorkOp::Read { queue, off, len, misalign: misalign(rng) }
            }
            580..=659 => {
                let (off, len) = extent(cfg, rng, hot_start, hot_len);
                WorkOp::Zeroes { queue, off, len }
            }
            660..=739 => {
                let (off, len) = extent(cfg, rng, hot_start, hot_len);
                WorkOp::Discard { queue, off, len }
            }
            740..=809 => WorkOp::Flush { queue },
            810..=889 => {
                let most = if rng.chance(20) { 400 } else { 40 };
                WorkOp::Run(1 + rng.below(most))
            }
            // The disk directory's online operations.
            890..=909 => {
                let op = match rng.below(12) {
                    0..=3 => WorkOp::Merge { pick: rng.below(256) as u8 },
                    4..=5 => WorkOp::Delete { pick: rng.below(256) as u8 },
                    6..=7 => WorkOp::QuietSnapshot,
                    8..=9 => WorkOp::Switch { pick: rng.below(256) as u8 },
                    10 => WorkOp::Grow { clusters: 1 + rng.below(clusters) },
                    _ => {
                        // A trim first (whole clusters discarded), as before a
                        // real compaction: holes for it to move clusters into.
                        for _ in 0..rng.below(9) {
                            // Mostly the hot clusters: the top holds those.
                            let c = if rng.chance(70) { hot_start + rng.below(hot_len) } else { rng.below(clusters) };
                            let len = cfg.cluster.min(cfg.size - c * cfg.cluster);
                            ops.push(WorkOp::Discard { queue: rng.below(cfg.queues as u64) as usize, off: c * cfg.cluster, len });
                        }
                        if compacts.chance(80) {
                            ops.extend(trimmed_burst(cfg, &mut compacts));
                        }
                        WorkOp::Compact { step: 1 + rng.below(16) }
                    }
                };
                // Often a crash right inside it: the operation's own
                // ordering is what a cut then tests.
                let crash_here = crash_rate > 0 && rng.chance(30);
                if !crash_here && crash_rate > 0 && matches!(op, WorkOp::Compact { .. }) && compacts.chance(70) {
                    // A compaction's syncs are few and its window between
                    // moving clusters and relinking them short: a cut aimed
                    // at one of its first syncs past the top's close (whose
                    // two every operation on the top shares).
                    ops.push(op);
                    WorkOp::PowerCutAtSync { within: 400, skip: 2 + compacts.below(3), repair: compacts.chance(25), sync_lost: true }
                } else if crash_here {
                    ops.push(op);
                    let most = if rng.chance(50) { 40 } else { 200 };
                    let after = rng.below(most);
                    if rng.chance(30) {
                        WorkOp::PowerCutAtSync { within: 20 + after * 4, skip: rng.below(8), repair: rng.chance(25), sync_lost: false }
                    } else if rng.chance(45) {
                        WorkOp::PowerCut { after, repair: rng.chance(25) }
                    } else {
                        WorkOp::Kill { after, repair: rng.chance(25) }
                    }
                } else {
                    op
                }
            }
            910..=929 => WorkOp::Settle,
            930..=949 => WorkOp::Snapshot,
            // A whole read-back is the costliest step: rare.
            950..=955 => WorkOp::ReadBack,
            956..=961 => WorkOp::CleanReopen,
            962..=972 => WorkOp::Run(1 + rng.below(20)),
            _ if rng.below(1000) < crash_rate * 30 => {
                let most = if rng.chance(50) { 30 } else { 300 };
                let after = rng.below(most);
                let repair = rng.chance(25);
                if rng.chance(50) {
                    WorkOp::Kill { after, repair }
                } else {
                    WorkOp::PowerCut { after, repair }
                }
            }
            _ => WorkOp::Run(1 + rng.below(20)),
        };
        ops.push(op);
        if let Some(op) = backup_op(&mut jobs).filter(|_| ops.len() < steps) {
            ops.push(op);
        }
    }
    ops
}

/// Now and then a backup or a tracker step, drawn from a stream of its
/// own so that the other operations stay as the seed drew them.
fn backup_op(rng: &mut Rng) -> Option<WorkOp> {
    Some(match rng.below(1000) {
        0..=3 => WorkOp::Backup {
            incremental: rng.chance(70),
            freeze_limit_us: if rng.chance(15) { 50 + rng.below(5000) } else { 30_000_000 },
            in_flight: 1 + rng.below(8) as usize,
            max_rounds: rng.below(4) as u32,
            capture: rng.chance(70),
        },
        4..=5 => WorkOp::TrackStart,
        6..=8 => WorkOp::TrackDrain,
        9 => WorkOp::TrackStop,
        _ => return None,
    })
}

/// Before a compaction: a burst of whole-cluster writes the top places
/// one after another at its end, flushed, then trims of the burst's
/// first part.
/// The trimmed clusters (those no lower layer holds) leave holes near
/// the file's end that the later ones move into, so the compaction has
/// moves to make and a relink to order after them.
fn trimmed_burst(cfg: &Config, rng: &mut Rng) -> Vec<WorkOp> {
    let clusters = cfg.size / cfg.cluster;
    let len = clusters.min(2 + rng.below(15));
    let first = rng.below(clusters - len + 1);
    let queue = |rng: &mut Rng| rng.below(cfg.queues as u64) as usize;
    let mut ops: Vec<WorkOp> = (first..first + len).map(|c| WorkOp::Write { queue: queue(rng), off: c * cfg.cluster, len: cfg.cluster, misalign: 0 }).collect();
    // Flushed: the model holds the moved clusters' data as durable, so a
    // cut that loses them is a failure (unflushed, losing them is allowed).
    ops.extend([WorkOp::Settle, WorkOp::Flush { queue: queue(rng) }, WorkOp::Settle]);
    let trimmed = 1 + rng.below(len - 1);
    ops.extend((first..first + trimmed).map(|c| WorkOp::Discard { queue: queue(rng), off: c * cfg.cluster, len: cfg.cluster }));
    ops.push(WorkOp::Settle);
    ops
}

/// A request's place: a few sectors inside a cluster, a whole cluster, or
/// several clusters from any sector (crossing owners), mostly in the hot
/// clusters.
fn extent(cfg: &Config, rng: &mut Rng, hot_start: u64, hot_len: u64) -> (u64, u64) {
    let clusters = cfg.size.div_ceil(cfg.cluster);
    let c = if rng.chance(60) { hot_start + rng.below(hot_len) } else { rng.below(clusters) };
    let sectors_per_cluster = cfg.cluster / SECTOR;
    let (off, len) = match rng.below(10) {
        0..=5 => {
            let len = SECTOR * (1 + rng.below(16.min(sectors_per_cluster)));
            let within = SECTOR * rng.below(sectors_per_cluster - len / SECTOR + 1);
            (c * cfg.cluster + within, len)
        }
        6..=7 => (c * cfg.cluster, cfg.cluster),
        _ => {
            let within = SECTOR * rng.below(sectors_per_cluster);
            (c * cfg.cluster + within, cfg.cluster * (1 + rng.below(2)) + SECTOR * rng.below(sectors_per_cluster))
        }
    };
    // Clip to the disk.
    let off = off.min(cfg.size - SECTOR);
    (off, len.min(cfg.size - off).max(SECTOR))
}

fn misalign(rng: &mut Rng) -> usize {
    if rng.chance(20) {
        1 + rng.below(7) as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_workload_every_time_and_stays_in_the_disk() {
        for seed in 1..40 {
            let (cfg, ops) = generate(seed);
            let (_, again) = generate(seed);
            assert_eq!(ops, again);
            assert!((300..=1500).contains(&ops.len()));
            assert!(cfg.size % 4096 == 0 && cfg.size >= 16 * cfg.cluster - cfg.cluster);
            for op in &ops {
                if let WorkOp::Read { off, len, .. } | WorkOp::Write { off, len, .. } | WorkOp::Zeroes { off, len, .. } | WorkOp::Discard { off, len, .. } = *op {
                    assert!(len > 0 && off % SECTOR == 0 && len % SECTOR == 0 && off + len <= cfg.size, "seed {seed}: {op:?}");
                }
            }
        }
    }
}
