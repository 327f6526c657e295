//! The engine driver: the daemon's structure on a ring of our own. Each
//! request in flight is a task that calls Stack::read/Stack::write with the
//! ring's I/O, exactly as a ublk queue's task per tag does; the ring thread
//! runs the runnable tasks, waits for completions and wakes the tasks whose
//! operations completed. Also the setup (the same data in a raw file and
//! a fully allocated ploop image) and the engine's side of the table rows.

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_ploop::copy;
use ublk_ploop::io::{block_on, AlignedBuf, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::rng::{mix, Rng};
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Stack, StackOptions};

use crate::measure::{alloc_rounds, cpu_secs, thread_cpu_secs, Run};
use crate::scratch::{create_direct, upper_name, Cfg, ALLOC, FRESH, PLOOP, RAW};
use crate::{Res, CLUSTER, DEEP, K4, MIB};

/// Deterministic, incompressible content for disk offset `off`.
pub fn gen_data(buf: &mut [u8], off: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(off / 8 + i as u64).to_le_bytes());
    }
}

pub fn open_stack(paths: &[PathBuf], read_only: bool) -> Res<Stack> {
    open_stack_linked(paths, read_only, None)
}

/// The same, keeping the top's copy-up link log in `links`.
pub fn open_stack_linked(paths: &[PathBuf], read_only: bool, links: Option<&std::path::Path>) -> Res<Stack> {
    let opts = StackOptions { read_only, direct: Direct::Auto, offline: false, link_log: links.map(|p| p.to_path_buf()) };
    block_on(Stack::open(&SyncIo, paths, &opts)).map(|(s, _)| s).map_err(|e| format!("opening stack: {e}"))
}

pub fn new_ring() -> Res<OwnRing> {
    OwnRing::new(256).map_err(|e| format!("io_uring setup: {e}"))
}

/// The same data in a raw file and a fully allocated ploop image, and the
/// empty upper layers of the deep stack.
pub fn setup(cfg: &Cfg) -> Res<()> {
    let raw_path = cfg.path(RAW);
    let ploop_path = cfg.path(PLOOP);
    block_on(PloopLayer::create(&SyncIo, &ploop_path, cfg.size, CLUSTER)).map_err(|e| format!("creating image: {e}"))?;
    let stack = open_stack(&[ploop_path], false)?;
    let raw = create_direct(&raw_path)?;
    let chunk = 4 * MIB as usize;
    let mut buf = AlignedBuf::zeroed(chunk);
    let mut off = 0;
    while off < cfg.size {
        let n = chunk.min((cfg.size - off) as usize);
        gen_data(&mut buf[..n], off);
        block_on(stack.write(&SyncIo, off, &buf[..n])).map_err(|e| format!("filling image: {e}"))?;
        raw.write_all_at(&buf[..n], off).map_err(|e| format!("filling raw file: {e}"))?;
        off += n as u64;
    }
    raw.sync_all().map_err(|e| format!("{}: {e}", raw_path.display()))?;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing image: {e}"))?;
    for i in 1..DEEP {
        block_on(PloopLayer::create(&SyncIo, &cfg.path(&upper_name(i)), cfg.size, CLUSTER))
            .map_err(|e| format!("creating upper layer: {e}"))?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Read,
    Write,
}

pub type Offsets = Box<dyn FnMut() -> Option<u64>>;

/// One job: `qd` requests in flight of `bs` bytes at the offsets `next`
/// gives, until the deadline or until `next` runs dry.
pub struct Job<'a> {
    pub stack: &'a Stack,
    pub dir: Dir,
    pub bs: usize,
    pub qd: usize,
    pub next: Offsets,
    /// Keep per-request latencies.
    pub latency: bool,
}

#[derive(Default)]
struct Tally {
    pub ios: u64,
    pub lat_us: Vec<u32>,
    pub error: Option<String>,
}

/// Run jobs together on one ring (as one ublk queue serves everything its
/// tasks are given) until `secs` have passed; one Run per job.
pub fn drive(ring: &OwnRing, jobs: Vec<Job<'_>>, secs: Duration) -> Res<Vec<Run>> {
    let io = ring.io();
    let exe = async_executor::LocalExecutor::new();
    let start = Instant::now();
    let deadline = coarse_ns() + secs.as_nanos() as u64;
    let cpu0 = thread_cpu_secs();
    let mut tallies = Vec::new();
    let mut tasks = Vec::new();
    for job in jobs {
        let tally = Rc::new(RefCell::new(Tally::default()));
        let next = Rc::new(RefCell::new(job.next));
        for i in 0..job.qd {
            let (tally, next, io) = (tally.clone(), next.clone(), &io);
            let (stack, dir, bs, latency) = (job.stack, job.dir, job.bs, job.latency);
            tasks.push(exe.spawn(async move {
                let mut buf = AlignedBuf::zeroed(bs);
                if dir == Dir::Write {
                    gen_data(&mut buf, 0x5eed_0000 + i as u64 * bs as u64);
                }
                while coarse_ns() < deadline {
                    let Some(off) = (next.borrow_mut())() else { break };
                    let t = latency.then(Instant::now);
                    let r = match dir {
                        Dir::Read => stack.read(io, off, &mut buf).await,
                        Dir::Write => stack.write(io, off, &buf).await,
                    };
                    let mut tally = tally.borrow_mut();
                    if let Err(e) = r {
                        tally.error.get_or_insert(format!("{dir:?} {off}+{bs}: {e}"));
                        break;
                    }
                    tally.ios += 1;
                    if let Some(t) = t {
                        tally.lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }));
        }
        tallies.push((tally, job.bs));
    }
    ring.run_tasks(&exe, || tasks.iter().all(|t| t.is_finished()));
    let secs = start.elapsed().as_secs_f64();
    let cpu = Some((thread_cpu_secs() - cpu0) / secs * 100.0);
    let mut runs = Vec::new();
    for (tally, bs) in tallies {
        let t = std::mem::take(&mut *tally.borrow_mut());
        if let Some(e) = t.error {
            return Err(e);
        }
        runs.push(Run { ios: t.ios, bytes: t.ios * bs as u64, secs, cpu_pct: cpu, lat_us: t.lat_us, ..Default::default() });
    }
    Ok(runs)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds, for the deadline checked before
/// every request: it reads a value the kernel keeps (to a few ms) where
/// the precise clock reads the TSC, which on this kind of virtual machine
/// took 14% of the ring thread's samples at QD1 on tmpfs (`perf`, two
/// reads per request): a cost of the harness, not of the engine.
fn coarse_ns() -> u64 {
    // SAFETY: clock_gettime fills the zeroed struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn drive_one(stack: &Stack, dir: Dir, bs: usize, qd: usize, secs: Duration, next: Offsets) -> Res<Run> {
    let ring = new_ring()?;
    let job = Job { stack, dir, bs, qd, next, latency: false };
    Ok(drive(&ring, vec![job], secs)?.remove(0))
}

/// Uniform random `bs`-aligned offsets over the disk.
pub fn random_offsets(size: u64, bs: usize, seed: u64) -> impl FnMut() -> Option<u64> {
    let mut rng = Rng::new(seed);
    let n = size / bs as u64;
    move || Some(rng.below(n) * bs as u64)
}

/// Sequential `bs` requests, wrapping at the end of the disk.
pub fn seq_offsets(size: u64, bs: usize) -> impl FnMut() -> Option<u64> {
    let mut pos = 0u64;
    move || {
        if pos + bs as u64 > size {
            pos = 0;
        }
        let off = pos;
        pos += bs as u64;
        Some(off)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn engine_rw(cfg: &Cfg, paths: &[PathBuf], read_only: bool, dir: Dir, bs: usize, qd: usize, seq: bool, secs: Duration) -> Res<Run> {
    let stack = open_stack(paths, read_only)?;
    let next: Offsets =
        if seq { Box::new(seq_offsets(cfg.size, bs)) } else { Box::new(random_offsets(cfg.size, bs, 0x1234_5678 ^ qd as u64)) };
    let run = drive_one(&stack, dir, bs, qd, secs, next)?;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
    Ok(run)
}

/// Allocating 4k writes at QD32: every write lands in a cluster the image
/// does not hold yet (the first 4k of each cluster, ascending, as qemu-img
/// bench -w -s 4k -S 1M does), on fresh empty images, round after round
/// until `secs` of I/O or ALLOCS_PER_TURN allocations. Every write is
/// acknowledged only once its BAT entry is written (the kill -9 guarantee).
/// Returns the I/O phase; the closing flush is counted apart.
pub fn engine_alloc(cfg: &Cfg, secs: f64) -> Res<Run> {
    let path = cfg.path(ALLOC);
    let clusters = cfg.alloc_size / CLUSTER;
    alloc_rounds(secs, || {
        let _ = fs::remove_file(&path);
        block_on(PloopLayer::create(&SyncIo, &path, cfg.alloc_size, CLUSTER)).map_err(|e| format!("creating empty image: {e}"))?;
        let stack = open_stack(std::slice::from_ref(&path), false)?;
        let mut it = 0..clusters;
        let next: Offsets = Box::new(move || it.next().map(|c| c * CLUSTER));
        let run = drive_one(&stack, Dir::Write, K4, 32, Duration::from_secs(3600), next)?;
        if run.ios != clusters {
            return Err(format!("allocating run wrote {} of {clusters} clusters", run.ios));
        }
        let t = Instant::now();
        block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
        let flush = t.elapsed().as_secs_f64();
        drop(stack);
        fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Run { rounds: 1, close_secs: flush, ..run })
    })
}

/// 4k random writes at QD32 over a fresh empty image for `secs`: the first
/// write to a cluster allocates it, later ones land in it (many writes per
/// cluster, unlike the allocating row's one). Creation, close and deletion
/// are not counted.
pub fn engine_fresh(cfg: &Cfg, secs: f64) -> Res<Run> {
    let path = cfg.path(FRESH);
    let _ = fs::remove_file(&path);
    block_on(PloopLayer::create(&SyncIo, &path, cfg.size, CLUSTER)).map_err(|e| format!("creating empty image: {e}"))?;
    let stack = open_stack(std::slice::from_ref(&path), false)?;
    let run = drive_one(&stack, Dir::Write, K4, 32, Duration::from_secs_f64(secs), Box::new(random_offsets(cfg.size, K4, 0xf7e5)))?;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
    drop(stack);
    fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(run)
}

/// 4k random overwrites at QD32 on the full image, with a write tracker
/// attached or not (the tracker's cost on the write path).
pub fn engine_write_tracked(cfg: &Cfg, tracked: bool, secs: Duration) -> Res<Run> {
    let stack = open_stack(&[cfg.path(PLOOP)], false)?;
    if tracked {
        block_on(stack.add_tracker(Arc::new(Tracker::new(stack.size(), CLUSTER)))).map_err(|e| e.to_string())?;
    }
    let run = drive_one(&stack, Dir::Write, K4, 32, secs, Box::new(random_offsets(cfg.size, K4, 0x7ac7)))?;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
    Ok(run)
}

/// A live copy of `stack` as `copy` runs it (one-way stream, checksums
/// on) into a sink that discards it: the engine's side of a copy.
pub fn copy_to_sink(stack: &Stack) -> Res<(Run, copy::Sent)> {
    let ring = new_ring()?;
    let t = Instant::now();
    let cpu0 = cpu_secs();
    let sent = ring
        .block_on(copy::send(&ring.io(), stack, Box::new(std::io::sink()), None, &mut copy::NoFs, copy::SendOptions::default(), &|_, _, _| {}))
        .map_err(|e| format!("copy: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let clusters = sent.rounds.iter().map(|r| r.sent).sum();
    let run = Run { ios: clusters, bytes: sent.bytes, secs, cpu_pct: Some((cpu_secs() - cpu0) / secs * 100.0), ..Default::default() };
    Ok((run, sent))
}
