//! Rows under concurrent load: reads beside a copy-up writer, snapshots and
//! stack swaps under writes, a merge, and live copies under writes.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_ploop::copy;
use ublk_ploop::disk::descriptor::{Descriptor, ImageType};
use ublk_ploop::disk::{ops, Disk};
use ublk_ploop::io::{block_on, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

use crate::baselines::raw_copy;
use crate::drive::{copy_to_sink, drive, new_ring, open_stack, random_offsets, Dir, Job, Offsets};
use crate::measure::{cluster_run, cpu_secs, Run};
use crate::scratch::{swap_top_name, Cfg, MERGE_DIR, PLOOP, SWAP_BASE, TOP};
use crate::{Res, CLUSTER, K4, SLICES, SWAP_HOT_SET};

/// Head-of-line blocking: 4k random reads at QD16 on one ring (one queue)
/// over a full base under a fresh empty top, alone and then beside a job
/// of 4k random writes into the top at `writer_qd`, whose first write to
/// each cluster copies it up (1 MiB read, written, synced before the BAT
/// entry). Both turns get a fresh top. Returns (alone, reads beside the
/// writer, the writer, copy-ups per second).
pub fn read_beside_copy_up(cfg: &Cfg, secs: Duration, writer_qd: usize) -> Res<(Run, Run, Run, f64)> {
    let top = cfg.path(TOP);
    let copy_ups = std::cell::Cell::new(0u64);
    let turn = |with_writer: bool| -> Res<Vec<Run>> {
        let _ = fs::remove_file(&top);
        block_on(PloopLayer::create(&SyncIo, &top, cfg.size, CLUSTER)).map_err(|e| format!("creating top: {e}"))?;
        let stack = open_stack(&[cfg.path(PLOOP), top.clone()], false)?;
        let ring = new_ring()?;
        let mut jobs = vec![Job {
            stack: &stack,
            dir: Dir::Read,
            bs: K4,
            qd: 16,
            next: Box::new(random_offsets(cfg.size, K4, 0xbeef)),
            latency: false,
        }];
        if with_writer {
            jobs.push(Job {
                stack: &stack,
                dir: Dir::Write,
                bs: K4,
                qd: writer_qd,
                next: Box::new(random_offsets(cfg.size, K4, 0xfeed)),
                latency: false,
            });
        }
        let runs = drive(&ring, jobs, secs)?;
        copy_ups.set(copy_ups.get() + stack.copy_ups());
        block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
        drop(stack);
        let _ = fs::remove_file(&top);
        Ok(runs)
    };
    let (mut alone, mut beside, mut writer) = (Run::default(), Run::default(), Run::default());
    for _ in 0..SLICES {
        alone.add(&turn(false)?[0]);
        let r = turn(true)?;
        beside.add(&r[0]);
        writer.add(&r[1]);
    }
    let rate = copy_ups.get() as f64 / writer.secs.max(0.001);
    Ok((alone, beside, writer, rate))
}

/// A disk directory whose base delta is a copy of the bench's ploop image,
/// opened read-write.
fn bench_disk(cfg: &Cfg) -> Res<(Disk, Stack)> {
    let dir = cfg.path(MERGE_DIR);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::copy(cfg.path(PLOOP), dir.join(ublk_ploop::disk::BASE_FILE)).map_err(|e| format!("copying image: {e}"))?;
    let desc = Descriptor::new(cfg.size, CLUSTER, ublk_ploop::disk::BASE_FILE, ImageType::Compressed).map_err(|e| e.to_string())?;
    let disk = Disk::from_parts(fs::canonicalize(&dir).map_err(|e| e.to_string())?, desc);
    block_on(disk.store(&SyncIo)).map_err(|e| format!("descriptor: {e}"))?;
    let layers = disk.layers(None).map_err(|e| e.to_string())?;
    let stack = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions::default())).map_err(|e| format!("opening the disk: {e}"))?.0;
    Ok((disk, stack))
}

/// The top of the merge row: 64 MiB (less on a disk under 128 MiB).
pub const MERGE_TOP: u64 = 64 * CLUSTER;

/// What the merge row measured.
pub struct MergeRow {
    /// The merge (clusters copied, time).
    pub merge: Run,
    /// A raw copy of the top's bytes, file to file.
    pub copy: Run,
    /// Bytes the merge wrote to storage (`/proc/self/io`), all turns.
    pub moved: u64,
    /// Bytes the top held, all turns.
    pub top: u64,
    /// The base's size (it is full).
    pub base: u64,
}

/// Bytes this process has caused to be written to storage so far.
fn written_bytes() -> u64 {
    let io = fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// The bench's disk directory with a snapshot taken and 64 MiB written
/// into the new top, every 1 MiB cluster of it a whole write, spread over
/// the disk; returns the top's clusters.
fn disk_with_top(cfg: &Cfg) -> Res<(Disk, Stack, u64)> {
    let (mut disk, stack) = bench_disk(cfg)?;
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).map_err(|e| format!("snapshot: {e}"))?;
    let clusters = (MERGE_TOP.min(cfg.size / 2) / CLUSTER).max(1);
    let stride = cfg.size / CLUSTER / clusters;
    let data = ublk_ploop::io::AlignedBuf::zeroed(CLUSTER as usize);
    for i in 0..clusters {
        block_on(stack.write(&SyncIo, i * stride * CLUSTER, &data)).map_err(|e| format!("writing the top: {e}"))?;
    }
    block_on(stack.flush(&SyncIo)).map_err(|e| format!("flush: {e}"))?;
    Ok((disk, stack, clusters))
}

/// Merge cost: a disk directory whose base holds the bench's data, a
/// snapshot, 64 MiB written into the top (every 1 MiB cluster of it a
/// whole write, spread over the disk), then the top merged into its parent
/// online. The cost should follow the top, not the base: bytes written to
/// storage are counted, and the time is compared with a raw copy of the
/// top's bytes between two plain files (8 x 1 MiB in flight, synced).
pub fn merge_vs_copy(cfg: &Cfg) -> Res<MergeRow> {
    let (mut disk, stack, clusters) = disk_with_top(cfg)?;
    let ring = new_ring()?;
    let (t, cpu0, w0) = (Instant::now(), cpu_secs(), written_bytes());
    let merged = ring.block_on(ops::merge(&ring.io(), &stack, &mut disk, None, &|_, _| {})).map_err(|e| format!("merge: {e}"))?;
    let merge = cluster_run(merged.clusters, t.elapsed().as_secs_f64(), cpu0);
    let moved = written_bytes().saturating_sub(w0);
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing: {e}"))?;
    drop(stack);
    let _ = fs::remove_dir_all(&disk.dir);

    // The same bytes, file to file.
    let copy = raw_copy(cfg, &ring, clusters)?;
    Ok(MergeRow { merge, copy, moved, top: clusters * CLUSTER, base: cfg.size })
}

/// The same merge while 4k random writes at QD32 go on over a 64 MiB hot
/// set: first a second of writes alone (the hot set's clusters get copied
/// up into the top, then rewritten in place), then the merge beside the
/// same writes (requests flow throughout; writes to clusters the merge has
/// copied are carried into the parent's file, so none is copied twice).
/// Returns the merge (its clusters: every one it copied, a cluster copied
/// again counted again), the writes before it and during it, the bytes
/// this process wrote during it (merge and writes) and the clusters the top
/// held when the merge began.
pub fn merge_under_writes(cfg: &Cfg) -> Res<MergeUnderWrites> {
    let (mut disk, stack, _) = disk_with_top(cfg)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, start) = std::sync::mpsc::channel::<()>();
    let (mut w0, mut held_at_start) = (0, 0);
    let result = std::thread::scope(|scope| {
        let stack = &stack;
        let stop_w = stop.clone();
        let writer = scope.spawn(move || -> Res<(Run, Run)> {
            let ring = new_ring()?;
            let mut offsets = random_offsets(SWAP_HOT_SET, K4, 0x3e76e);
            let before = {
                let next: Offsets = Box::new(move || offsets());
                let job = Job { stack, dir: Dir::Write, bs: K4, qd: 32, next, latency: true };
                drive(&ring, vec![job], Duration::from_secs(1))?.remove(0)
            };
            let _ = started.send(());
            let mut offsets = random_offsets(SWAP_HOT_SET, K4, 0x3e76f);
            let next: Offsets = Box::new(move || (!stop_w.load(std::sync::atomic::Ordering::Relaxed)).then(&mut offsets).flatten());
            let job = Job { stack, dir: Dir::Write, bs: K4, qd: 32, next, latency: true };
            Ok((before, drive(&ring, vec![job], Duration::from_secs(600))?.remove(0)))
        });
        let _ = start.recv();
        let clusters = cfg.size.div_ceil(CLUSTER);
        held_at_start = stack.layers().last().map_or(0, |top| top.allocated(CLUSTER, clusters).count() as u64);
        w0 = written_bytes();
        let ring = new_ring()?;
        let (t, cpu0) = (Instant::now(), cpu_secs());
        let merged = ring.block_on(ops::merge(&ring.io(), stack, &mut disk, None, &|_, _| {})).map_err(|e| format!("merge under writes: {e}"));
        let merge = merged.map(|m| cluster_run(m.clusters, t.elapsed().as_secs_f64(), cpu0));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writer.join().map_err(|_| "writer thread panicked".to_string())?;
        Ok::<_, String>((merge?, writes?))
    });
    let written = written_bytes().saturating_sub(w0);
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing: {e}"))?;
    drop(stack);
    let _ = fs::remove_dir_all(&disk.dir);
    let (merge, (before, during)) = result?;
    Ok(MergeUnderWrites { merge, before, during, written, held_at_start })
}

/// See `merge_under_writes`.
pub struct MergeUnderWrites {
    pub merge: Run,
    pub before: Run,
    pub during: Run,
    pub written: u64,
    /// Clusters the top held when the merge began (the hot set's among
    /// them): a merge that copies more copied some twice.
    pub held_at_start: u64,
}

/// Live copies taken while 4k random writes at QD32 go on over a hot set:
/// each copy's rounds and its freeze (requests held for the last pass).
pub fn copy_under_load(cfg: &Cfg, copies: usize) -> Res<(Run, Vec<copy::Sent>)> {
    let stack = open_stack(&[cfg.path(PLOOP)], false)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = std::thread::scope(|scope| {
        let copier = scope.spawn(|| -> Res<Vec<copy::Sent>> {
            let mut out = Vec::new();
            let r = (|| {
                for _ in 0..copies {
                    std::thread::sleep(Duration::from_millis(300));
                    out.push(copy_to_sink(&stack)?.1);
                }
                Ok(())
            })();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            r.map(|_| out)
        });
        let ring = new_ring()?;
        let mut offsets = random_offsets(SWAP_HOT_SET, K4, 0xc0b1);
        let stop = stop.clone();
        let next: Offsets = Box::new(move || (!stop.load(std::sync::atomic::Ordering::Relaxed)).then(&mut offsets).flatten());
        let job = Job { stack: &stack, dir: Dir::Write, bs: K4, qd: 32, next, latency: true };
        let run = drive(&ring, vec![job], Duration::from_secs(600));
        let sent = copier.join().map_err(|_| "copy thread panicked".to_string())?;
        Ok::<_, String>((run?.remove(0), sent?))
    });
    let closed = block_on(stack.close(&SyncIo));
    closed.map_err(|e| format!("closing: {e}"))?;
    result
}

/// The tracker's cost, a copy's throughput and a copy's freeze.
pub struct CopyRows {
    /// 4k randwrite QD32 without and with a tracker, in turns.
    pub untracked: Run,
    pub tracked: Run,
    /// A copy of the full image and a raw read of the same bytes, in turns.
    pub copy: Run,
    pub raw: Run,
    /// Writes during copies, and each copy.
    pub under_load: (Run, Vec<copy::Sent>),
}

/// A disk directory's snapshot (descriptor update included) under 4k
/// random writes at QD32 over a hot set: the stall is still only the swap.
pub fn disk_snapshot_stall(cfg: &Cfg, gap: Duration, snapshots: usize) -> Res<(Run, Vec<Duration>, Vec<Duration>)> {
    let (disk, stack) = bench_disk(cfg)?;
    let secs = gap * (snapshots as u32 + 1) + Duration::from_secs(1);
    let result = std::thread::scope(|scope| {
        let taker = scope.spawn(|| -> Res<(Vec<Duration>, Vec<Duration>)> {
            let mut disk = disk.clone();
            let (mut stalls, mut whole) = (Vec::new(), Vec::new());
            for i in 0..snapshots {
                std::thread::sleep(gap);
                let t = Instant::now();
                let s = block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).map_err(|e| format!("snapshot {i}: {e}"))?;
                whole.push(t.elapsed());
                stalls.push(s.stall);
            }
            Ok((stalls, whole))
        });
        let ring = new_ring()?;
        let job = Job { stack: &stack, dir: Dir::Write, bs: K4, qd: 32, next: Box::new(random_offsets(SWAP_HOT_SET, K4, 0x7777)), latency: true };
        let run = drive(&ring, vec![job], secs);
        let taken = taker.join().map_err(|_| "snapshot thread panicked".to_string())?;
        let (stalls, whole) = taken?;
        Ok::<_, String>((run?.remove(0), stalls, whole))
    });
    let closed = block_on(stack.close(&SyncIo));
    drop(stack);
    let _ = fs::remove_dir_all(&disk.dir);
    closed.map_err(|e| format!("closing: {e}"))?;
    result
}

/// The stall of a stack change under load: 4k random writes at QD32 over
/// the first `span` bytes of the full image while another thread pushes a
/// new empty top `swaps` times, `gap` apart (a snapshot each time).
/// Returns the writes' run (with latencies) and each swap's stall: how long
/// new requests were held (draining the ones in flight, then the swap).
pub fn swap_stall(cfg: &Cfg, gap: Duration, swaps: usize, span: u64) -> Res<(Run, Vec<Duration>)> {
    // Writes go on a little after the last snapshot (taking one costs time too).
    let secs = gap * (swaps as u32 + 1) + Duration::from_secs(1);
    let base = cfg.path(SWAP_BASE);
    let _ = fs::remove_file(&base);
    fs::copy(cfg.path(PLOOP), &base).map_err(|e| format!("copying image: {e}"))?;
    let stack = open_stack(std::slice::from_ref(&base), false)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        let pusher = scope.spawn(|| -> Res<Vec<Duration>> {
            let mut stalls = Vec::new();
            for i in 0..swaps {
                std::thread::sleep(gap);
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let path = cfg.path(&swap_top_name(i));
                stalls.push(block_on(stack.push_layer(&SyncIo, &path)).map_err(|e| format!("snapshot {i}: {e}"))?);
            }
            Ok(stalls)
        });
        let ring = new_ring()?;
        let job = Job { stack: &stack, dir: Dir::Write, bs: K4, qd: 32, next: Box::new(random_offsets(span, K4, 0x5a5a)), latency: true };
        let run = drive(&ring, vec![job], secs);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let stalls = pusher.join().map_err(|_| "snapshot thread panicked".to_string())?;
        Ok::<_, String>((run?.remove(0), stalls?))
    });
    let closed = block_on(stack.close(&SyncIo));
    let layers = stack.paths();
    drop(stack);
    for p in layers {
        let _ = fs::remove_file(p);
    }
    closed.map_err(|e| format!("closing stack: {e}"))?;
    result
}

/// Reads alone and beside a copy-up writer, and the device's own figures
/// under the same I/O.
pub struct HeadOfLine {
    pub alone: Run,
    pub beside: Run,
    pub writer: Run,
    /// Copy-ups per second the writer caused.
    pub rate: f64,
    /// fio's reads alone and beside fio doing that copy-up I/O.
    pub device: Option<Res<(Run, Run)>>,
}

/// Writes during stack changes, and each change's stall.
pub type Stalls = (Run, Vec<Duration>);

/// Snapshots of a disk directory and a merge.
pub struct DiskRows {
    /// Writes, each snapshot's stall, each snapshot's whole time.
    pub snapshots: (Run, Vec<Duration>, Vec<Duration>),
    /// The merge of a 64 MiB top, and the raw copy of its bytes.
    pub merge: MergeRow,
    /// The same merge under 4k random writes.
    pub under_writes: MergeUnderWrites,
}

impl DiskRows {
    /// What the quiet raw copy of the top's bytes took per cluster, times
    /// `clusters`.
    pub fn raw_copy_secs(&self, clusters: u64) -> f64 {
        self.merge.copy.secs * clusters as f64 / (self.merge.top / CLUSTER).max(1) as f64
    }
}

/// The rows measured under concurrent load.
pub struct UnderLoad {
    pub disk: Option<DiskRows>,
    pub hol: Option<HeadOfLine>,
    /// Writes during the snapshots and each snapshot's stall, with the
    /// snapshots far apart and close together.
    pub swap: Option<(Stalls, Stalls)>,
    pub copy: Option<CopyRows>,
    /// Copy-on-write against qcow2, one row per shape.
    pub cow: Option<Vec<crate::cow::CowRow>>,
    /// Opening a thin disk: time and table memory.
    pub thin: Option<crate::thin::ThinRow>,
    /// Reads through a QCOW2 base against qemu-img.
    pub qcow2: Option<Vec<crate::qcow2::Qcow2Row>>,
}
