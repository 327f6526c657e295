//! Copy-on-write against qcow2 (#20): every write lands in a cluster the
//! top does not hold yet, so each one copies 1 MiB up from the full base
//! first. The engine writes into a fresh ploop top over the bench's image;
//! `qemu-img bench` writes into a fresh qcow2 overlay with 1 MiB clusters
//! over that same image (QEMU's layered image, which also
//! copies a cluster on its first write). Each shape runs without flushes and
//! with a flush after every 32 writes on both sides, so that durability is
//! equal there; the engine keeps its stronger guarantees without flushes
//! (an acknowledged write survives a kill -9), so that row is a report.
//!
//! The engine runs twice per turn: syncing each copy-up before its entry
//! (the daemon's `--no-link-log`), and with a link log on tmpfs
//! (`StackOptions::link_log`, the daemon's default where `/run` is a
//! tmpfs), which defers that sync to the next flush.

use std::fs;
use std::process::Command;
use std::time::Instant;

use ublk_ploop::io::{block_on, for_each_in_flight, AlignedBuf, SyncIo};
use ublk_ploop::layers::PloopLayer;

use crate::baselines::{bench_secs, Qemu};
use crate::drive::{new_ring, open_stack_linked};
use crate::measure::{cpu_secs, median, Run};
use crate::scratch::{Cfg, PLOOP};
use crate::{Res, CLUSTER, K4};

const COW_TOP: &str = "cow-top.hds";
const COW_QCOW2: &str = "cow-overlay.qcow2";
/// Writes between flushes in the equal-durability rows.
pub const FLUSH_EVERY: usize = 32;

/// One shape of copy-on-write writes.
pub struct CowShape {
    pub key: &'static str,
    /// The key of the engine-with-link-log row.
    pub logged_key: &'static str,
    pub what: &'static str,
    pub bs: usize,
    pub depth: usize,
    pub flush_every: Option<usize>,
}

pub const SHAPES: [CowShape; 6] = [
    CowShape { key: "cow_4k_qd1_noflush", logged_key: "cow_4k_qd1_noflush_link_log", what: "4k QD1, no flush", bs: K4, depth: 1, flush_every: None },
    CowShape { key: "cow_4k_qd1_flush32", logged_key: "cow_4k_qd1_flush32_link_log", what: "4k QD1, flush / 32", bs: K4, depth: 1, flush_every: Some(FLUSH_EVERY) },
    CowShape { key: "cow_4k_qd32_noflush", logged_key: "cow_4k_qd32_noflush_link_log", what: "4k QD32, no flush", bs: K4, depth: 32, flush_every: None },
    CowShape { key: "cow_4k_qd32_flush32", logged_key: "cow_4k_qd32_flush32_link_log", what: "4k QD32, flush / 32", bs: K4, depth: 32, flush_every: Some(FLUSH_EVERY) },
    CowShape { key: "cow_1m_qd4_noflush", logged_key: "cow_1m_qd4_noflush_link_log", what: "1M QD4, no flush", bs: CLUSTER as usize, depth: 4, flush_every: None },
    CowShape { key: "cow_1m_qd4_flush32", logged_key: "cow_1m_qd4_flush32_link_log", what: "1M QD4, flush / 32", bs: CLUSTER as usize, depth: 4, flush_every: Some(FLUSH_EVERY) },
];

/// What one shape measured: both sides summed over the turns, and the
/// ratio of each turn on its own (the disk's rate drifts by more than the
/// difference between the two formats, so a ratio is taken only between
/// runs that sat side by side).
pub struct CowRow {
    pub shape: &'static CowShape,
    pub engine: Run,
    pub qemu: Option<Run>,
    /// engine/qemu writes per second, one per turn.
    pub turn_ratios: Vec<f64>,
    /// The engine with a link log (None where no tmpfs was found).
    pub logged: Option<Run>,
    pub logged_ratios: Vec<f64>,
}

impl CowRow {
    /// The median of the turns' ratios (None without a qemu column).
    pub fn ratio(&self) -> Option<f64> {
        median_of(&self.turn_ratios)
    }
    /// The lowest and highest turn ratio.
    pub fn spread(&self) -> Option<(f64, f64)> {
        spread_of(&self.turn_ratios)
    }
    /// The same for the engine with a link log.
    pub fn logged_ratio(&self) -> Option<f64> {
        median_of(&self.logged_ratios)
    }
    pub fn logged_spread(&self) -> Option<(f64, f64)> {
        spread_of(&self.logged_ratios)
    }
}

fn median_of(ratios: &[f64]) -> Option<f64> {
    (!ratios.is_empty()).then(|| median(ratios.to_vec()))
}

fn spread_of(ratios: &[f64]) -> Option<(f64, f64)> {
    let lo = ratios.iter().copied().reduce(f64::min)?;
    let hi = ratios.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// A tmpfs directory for the link log, removed when dropped.
fn link_dir() -> Option<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("ublk-ploop-bench-links-").tempdir_in("/dev/shm").ok()?;
    ublk_ploop::io::Io::is_volatile_dir(&SyncIo, dir.path()).ok()?.then_some(dir)
}

/// Turns per shape (each runs both sides once), or
/// `UBLK_PLOOP_BENCH_COW_TURNS`.
fn turns() -> usize {
    std::env::var("UBLK_PLOOP_BENCH_COW_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1)
}

/// Writes per run: one per cluster of the disk, at most 256 (each copies
/// 1 MiB up), or `UBLK_PLOOP_BENCH_COW_WRITES`.
fn writes(cfg: &Cfg) -> u64 {
    let want = std::env::var("UBLK_PLOOP_BENCH_COW_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    (cfg.size / CLUSTER).min(want).max(1)
}

/// The engine: a fresh top over the bench's full ploop image, one write at
/// the start of each cluster in ascending order, `depth` in flight, a flush
/// after every `flush_every` (the writes before it completed first, as
/// qemu-img bench drains before its flush).
fn engine_cow(cfg: &Cfg, s: &CowShape, links: Option<&std::path::Path>) -> Res<Run> {
    let top = cfg.path(COW_TOP);
    let _ = fs::remove_file(&top);
    block_on(PloopLayer::create(&SyncIo, &top, cfg.size, CLUSTER)).map_err(|e| format!("creating the top: {e}"))?;
    let stack = open_stack_linked(&[cfg.path(PLOOP), top.clone()], false, links)?;
    let ring = new_ring()?;
    let io = ring.io();
    let count = writes(cfg);
    let offsets: Vec<u64> = (0..count).map(|c| c * CLUSTER).collect();
    let mut data = AlignedBuf::zeroed(s.bs);
    data.fill(0xa5);
    let (stack_ref, data_ref, io_ref) = (&stack, &data, &io);
    let write = |&off: &u64| async move { stack_ref.write(io_ref, off, data_ref).await };
    let (t, cpu0) = (Instant::now(), cpu_secs());
    let per = s.flush_every.unwrap_or(offsets.len());
    for chunk in offsets.chunks(per) {
        ring.block_on(for_each_in_flight(s.depth, chunk, write, |_| {})).map_err(|e| format!("engine write: {e}"))?;
        if s.flush_every.is_some() {
            ring.block_on(stack.flush(&io)).map_err(|e| format!("engine flush: {e}"))?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing: {e}"))?;
    drop(stack);
    let _ = fs::remove_file(&top);
    Ok(Run { ios: count, bytes: count * s.bs as u64, secs, cpu_pct: Some(100.0 * cpu / secs.max(1e-9)), rounds: 1, ..Default::default() })
}

/// qemu: a fresh qcow2 overlay (1 MiB clusters) over the engine's own base
/// image, read through qemu's parallels driver, so that both sides read
/// their copies from the same disk blocks (where a file lies moves this
/// disk's rate by up to a fifth); the same writes through `qemu-img bench
/// -t none` (`--flush-interval` for the flushed shapes).
fn qemu_cow(cfg: &Cfg, q: &Qemu, s: &CowShape) -> Res<Run> {
    let overlay = cfg.path(COW_QCOW2);
    let _ = fs::remove_file(&overlay);
    let base = fs::canonicalize(cfg.path(PLOOP)).map_err(|e| format!("base image: {e}"))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={CLUSTER}"))
        .arg("-b")
        .arg(&base)
        .args(["-F", "parallels"])
        .arg(&overlay)
        .output()
        .map_err(|e| format!("running qemu-img create: {e}"))?;
    if !out.status.success() {
        return Err(format!("qemu-img create (qcow2 overlay) failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let count = writes(cfg);
    let aio = q.aio.unwrap_or("io_uring");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "qcow2", "-t", "none", "-i", aio, "-w", "--pattern=165"]);
    cmd.arg("-c").arg(count.to_string()).arg("-d").arg(s.depth.to_string());
    cmd.arg("-s").arg(s.bs.to_string()).arg("-S").arg(CLUSTER.to_string()).args(["-o", "0"]);
    if let Some(n) = s.flush_every {
        cmd.arg(format!("--flush-interval={n}"));
    }
    cmd.arg(&overlay);
    let out = cmd.output().map_err(|e| format!("running qemu-img bench: {e}"))?;
    let _ = fs::remove_file(&overlay);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("qemu-img bench (qcow2) failed: {}{}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let secs = bench_secs(&stdout)?;
    Ok(Run { ios: count, bytes: count * s.bs as u64, secs, rounds: 1, ..Default::default() })
}

/// Every shape, the engine (synced and logged) and qemu side by side in
/// each turn; who goes first rotates, so a drift of the disk's rate
/// within a turn favours none.
pub fn cow_rows(cfg: &Cfg, q: &Qemu, have_qemu: bool) -> Res<Vec<CowRow>> {
    let links = link_dir();
    if links.is_none() {
        eprintln!("bench: no tmpfs for a link log; the cow rows have no logged column");
    }
    let mut have_qemu = have_qemu;
    let mut rows = Vec::new();
    for s in &SHAPES {
        let (mut engine, mut logged, mut qemu) = (Run::default(), Run::default(), Run::default());
        let (mut turn_ratios, mut logged_ratios) = (Vec::new(), Vec::new());
        for turn in 0..turns() {
            let (mut mine, mut with_log, mut theirs) = (None, None, None);
            for side in (0..3).map(|i| (i + turn) % 3) {
                match side {
                    0 => mine = Some(engine_cow(cfg, s, None)?),
                    1 => with_log = links.as_ref().map(|d| engine_cow(cfg, s, Some(d.path()))).transpose()?,
                    _ if have_qemu => match qemu_cow(cfg, q, s) {
                        Ok(r) => theirs = Some(r),
                        Err(e) => {
                            eprintln!("bench: {e}; the cow rows have no qemu column");
                            have_qemu = false;
                        }
                    },
                    _ => {}
                }
            }
            let mine = mine.expect("every turn runs the engine");
            if let Some(r) = &theirs {
                turn_ratios.push(mine.iops() / r.iops().max(1e-9));
                if let Some(l) = &with_log {
                    logged_ratios.push(l.iops() / r.iops().max(1e-9));
                }
                qemu.add(r);
            }
            if let Some(l) = &with_log {
                logged.add(l);
            }
            engine.add(&mine);
        }
        if !have_qemu {
            (turn_ratios, logged_ratios) = (Vec::new(), Vec::new());
        }
        let qemu = have_qemu.then_some(qemu);
        let logged = links.is_some().then_some(logged);
        rows.push(CowRow { shape: s, engine, qemu, turn_ratios, logged, logged_ratios });
    }
    Ok(rows)
}
