//! Engine benchmark: the ploop engine driven by a small io_uring loop,
//! against fio on a raw file (the machine's file-I/O ceiling) and
//! `qemu-img bench` on a parallels image holding the same data.
//!
//! Run with `cargo bench --bench engine`. It is a report, not a test:
//! missed targets are marked MISS but do not fail the process; only a
//! bench that could not run exits non-zero.
//!
//! Environment:
//! - `UBLK_PLOOP_BENCH_DIR`      scratch directory (default `target/bench-scratch`,
//!   relative to the current directory; it must be on the filesystem to test)
//! - `UBLK_PLOOP_BENCH_SIZE_MB`  disk size in MiB (default 1024)
//! - `UBLK_PLOOP_BENCH_SECS`     runtime per workload and tool (default 5; fractions allowed)
//! - `UBLK_PLOOP_BENCH_KEEP=1`   leave the scratch files behind (debugging)
//!
//! Disk space: three copies of the disk (ploop image, raw file, qemu's
//! copy) plus up to 4 GiB for the empty images of the allocating row.
//! With the defaults the run takes about 100 s.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::{json, Value};
use std::os::fd::AsRawFd;

use ublk_ploop::disk::descriptor::{Descriptor, ImageType};
use ublk_ploop::disk::{ops, Disk};
use ublk_ploop::io::{block_on, AlignedBuf, Direct, Io, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::copy;
use ublk_ploop::tracker::Tracker;
use ublk_ploop::{Stack, StackOptions};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = MIB;
const K4: usize = 4096;
/// Layers in the deep stack of the stack-depth comparison.
const DEEP: usize = 16;
/// Queue depth of the 1 MiB sequential workloads.
const SEQ_QD: usize = 4;
/// The engine and the reference tool take turns this many times per row
/// (a b a b ...), each turn `secs / SLICES` long, so that drift in the
/// machine's speed (other load, the host's caches) hits both alike.
const SLICES: usize = 4;

type Res<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration and scratch files

struct Cfg {
    dir: PathBuf,
    size: u64,
    secs: f64,
    keep: bool,
    /// Virtual size of the empty images of the allocating-write rows: big
    /// enough that a round (one write per cluster) takes a while, so that
    /// per-round setup (image creation, process start) stays small.
    alloc_size: u64,
}

impl Cfg {
    fn from_env() -> Res<Cfg> {
        let dir = std::env::var_os("UBLK_PLOOP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/bench-scratch"));
        let size_mb: u64 = env_num("UBLK_PLOOP_BENCH_SIZE_MB", 1024.0)? as u64;
        if size_mb < 64 {
            return Err("UBLK_PLOOP_BENCH_SIZE_MB must be at least 64".into());
        }
        let secs = env_num("UBLK_PLOOP_BENCH_SECS", 5.0)?;
        if secs.is_nan() || secs <= 0.0 {
            return Err("UBLK_PLOOP_BENCH_SECS must be positive".into());
        }
        let keep = std::env::var("UBLK_PLOOP_BENCH_KEEP").is_ok_and(|v| v == "1");
        Ok(Cfg { dir, size: size_mb * MIB, secs, keep, alloc_size: size_mb * MIB })
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn env_num(name: &str, default: f64) -> Res<f64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| format!("{name}={v:?}: not a number")),
        _ => Ok(default),
    }
}

const RAW: &str = "data.raw";
const PLOOP: &str = "data.hds";
const QEMU_IMG: &str = "qemu-data.hds";
const ALLOC: &str = "alloc.hds";
const QEMU_ALLOC: &str = "qemu-alloc.hds";
const TOP: &str = "top.hds";
const FRESH: &str = "fresh.hds";
const FRESH_RAW: &str = "fresh.raw";
const SWAP_BASE: &str = "swap-base.hds";
/// The disk directory of the merge row, and the raw copy it is compared with.
const MERGE_DIR: &str = "merge-disk";
const COPY: &str = "copy.raw";
/// Snapshots taken in each stall row. Steady: writes over a hot set of
/// 64 clusters that each new top absorbs within a few tens of ms, snapshots
/// 500 ms apart, so a snapshot meets ordinary writes in flight (as one every
/// few minutes would in use). Storm: writes over the whole disk, snapshots
/// 50 ms apart, so every snapshot meets 32 copy-ups of the previous one.
const SWAPS: usize = 12;
const SWAP_GAP_STEADY: Duration = Duration::from_millis(500);
const SWAP_HOT_SET: u64 = 64 * MIB;
const SWAP_GAP_STORM: Duration = Duration::from_millis(50);

fn swap_top_name(i: usize) -> String {
    format!("swap-top-{i:02}.hds")
}

fn upper_name(i: usize) -> String {
    format!("upper-{i:02}.hds")
}

fn scratch_names() -> Vec<String> {
    let mut v: Vec<String> = [RAW, PLOOP, QEMU_IMG, ALLOC, QEMU_ALLOC, TOP, SWAP_BASE, COPY].iter().map(|s| s.to_string()).collect();
    v.extend((1..DEEP).map(upper_name));
    v.extend((0..SWAPS).map(swap_top_name));
    v
}

/// Removes the scratch files (and the directory, if we made it and it is
/// empty) however the bench ends.
struct Scratch {
    dir: PathBuf,
    created: bool,
    keep: bool,
}

impl Scratch {
    fn new(cfg: &Cfg) -> Res<Scratch> {
        let created = !cfg.dir.exists();
        fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let s = Scratch { dir: cfg.dir.clone(), created, keep: cfg.keep };
        s.remove_files(); // leftovers of an interrupted run
        Ok(s)
    }
    fn remove_files(&self) {
        for name in scratch_names() {
            let _ = fs::remove_file(self.dir.join(name));
        }
        let _ = fs::remove_dir_all(self.dir.join(MERGE_DIR));
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            println!("scratch files kept in {}", self.dir.display());
            return;
        }
        self.remove_files();
        if self.created {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Small utilities

/// xorshift64*: cheap, good enough for offsets.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic, incompressible content for disk offset `off`.
fn gen_data(buf: &mut [u8], off: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(off / 8 + i as u64).to_le_bytes());
    }
}

/// User + system CPU seconds of this process (all its threads, io-wq included).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn open_stack(paths: &[PathBuf], read_only: bool) -> Res<Stack> {
    block_on(Stack::open(&SyncIo, paths, &StackOptions { read_only, direct: Direct::Auto }))
        .map(|(s, _)| s)
        .map_err(|e| format!("opening stack: {e}"))
}

fn new_ring() -> Res<OwnRing> {
    OwnRing::new(256).map_err(|e| format!("io_uring setup: {e}"))
}

// ---------------------------------------------------------------------------
// The engine driver: the daemon's structure on a ring of our own. Each
// request in flight is a task that calls Stack::read/Stack::write with the
// ring's I/O, exactly as a ublk queue's task per tag does; the ring thread
// runs the runnable tasks, waits for completions and wakes the tasks whose
// operations completed.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Read,
    Write,
}

/// Result of one measured run (any tool).
#[derive(Clone, Debug, Default)]
struct Run {
    ios: u64,
    bytes: u64,
    secs: f64,
    /// CPU use in percent of one core (None when the tool does not say).
    cpu_pct: Option<f64>,
    /// Allocating rows: rounds run, and seconds spent closing (flushing)
    /// the images, which the rate does not count.
    rounds: u64,
    close_secs: f64,
    /// Request latencies in microseconds, when asked for.
    lat_us: Vec<u32>,
}

impl Run {
    fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ios as f64 / self.secs
        } else {
            0.0
        }
    }
    fn mibps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / MIB as f64
        } else {
            0.0
        }
    }
    fn add(&mut self, o: &Run) {
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
    fn lat_ms(&self, pct: f64) -> Option<f64> {
        percentile_us(&self.lat_us, pct).map(|us| us / 1000.0)
    }
    fn to_json(&self) -> Value {
        json!({
            "iops": round1(self.iops()),
            "mib_s": round1(self.mibps()),
            "ios": self.ios,
            "secs": round3(self.secs),
            "cpu_pct": self.cpu_pct.map(round1),
            "rounds": self.rounds,
            "close_secs": round3(self.close_secs),
            "p99_ms": self.lat_ms(99.0).map(round3),
        })
    }
}

fn percentile_us(samples: &[u32], pct: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((pct / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[i.min(v.len() - 1)] as f64)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

type Offsets = Box<dyn FnMut() -> Option<u64>>;

/// One job: `qd` requests in flight of `bs` bytes at the offsets `next`
/// gives, until the deadline or until `next` runs dry.
struct Job<'a> {
    stack: &'a Stack,
    dir: Dir,
    bs: usize,
    qd: usize,
    next: Offsets,
    /// Keep per-request latencies.
    latency: bool,
}

#[derive(Default)]
struct Tally {
    ios: u64,
    lat_us: Vec<u32>,
    error: Option<String>,
}

/// Run jobs together on one ring (as one ublk queue serves everything its
/// tasks are given) until `secs` have passed; one Run per job.
fn drive(ring: &OwnRing, jobs: Vec<Job<'_>>, secs: Duration) -> Res<Vec<Run>> {
    let io = ring.io();
    let exe = async_executor::LocalExecutor::new();
    let start = Instant::now();
    let deadline = start + secs;
    let cpu0 = cpu_secs();
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
                while Instant::now() < deadline {
                    let Some(off) = (next.borrow_mut())() else { break };
                    let t = Instant::now();
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
                    if latency {
                        tally.lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }));
        }
        tallies.push((tally, job.bs));
    }
    ring.run_tasks(&exe, || tasks.iter().all(|t| t.is_finished()));
    let secs = start.elapsed().as_secs_f64();
    let cpu = Some((cpu_secs() - cpu0) / secs * 100.0);
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

fn drive_one(stack: &Stack, dir: Dir, bs: usize, qd: usize, secs: Duration, next: Offsets) -> Res<Run> {
    let ring = new_ring()?;
    let job = Job { stack, dir, bs, qd, next, latency: false };
    Ok(drive(&ring, vec![job], secs)?.remove(0))
}

/// Uniform random `bs`-aligned offsets over the disk.
fn random_offsets(size: u64, bs: usize, seed: u64) -> impl FnMut() -> Option<u64> {
    let mut rng = Rng::new(seed);
    let n = size / bs as u64;
    move || Some(rng.below(n) * bs as u64)
}

/// Sequential `bs` requests, wrapping at the end of the disk.
fn seq_offsets(size: u64, bs: usize) -> impl FnMut() -> Option<u64> {
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

// ---------------------------------------------------------------------------
// Setup: the same data in a raw file and a fully allocated ploop image.

fn setup(cfg: &Cfg) -> Res<()> {
    let raw_path = cfg.path(RAW);
    let ploop_path = cfg.path(PLOOP);
    block_on(PloopLayer::create(&SyncIo, &ploop_path, cfg.size, CLUSTER)).map_err(|e| format!("creating image: {e}"))?;
    let stack = open_stack(&[ploop_path], false)?;
    let raw = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&raw_path)
        .map_err(|e| format!("{}: {e}", raw_path.display()))?;
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

// ---------------------------------------------------------------------------
// fio

fn fio(cfg: &Cfg, rw: &str, bs: usize, qd: usize, secs: f64) -> Res<Run> {
    fio_on(cfg, &cfg.path(RAW), rw, bs, qd, secs)
}

fn fio_on(cfg: &Cfg, raw: &Path, rw: &str, bs: usize, qd: usize, secs: f64) -> Res<Run> {
    let out = Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", raw.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={}", cfg.size))
        .arg("--time_based")
        .arg(format!("--runtime={}ms", (secs * 1000.0).round().max(100.0) as u64))
        .arg("--randrepeat=0")
        .arg("--norandommap")
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let start = stdout.find('{').ok_or("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { &job["read"] } else { &job["write"] };
    let ios = side["total_ios"].as_u64().unwrap_or(0);
    let bytes = side["io_bytes"].as_u64().unwrap_or(0);
    let ms = side["runtime"].as_u64().unwrap_or(0);
    if ios == 0 || ms == 0 {
        return Err(format!("fio reported no I/O ({rw})"));
    }
    let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    Ok(Run { ios, bytes, secs: ms as f64 / 1000.0, cpu_pct: Some(cpu), ..Default::default() })
}

// ---------------------------------------------------------------------------
// qemu-img bench

struct Qemu {
    /// The AIO mode that works (`io_uring`, else `native`); None until known.
    aio: Option<&'static str>,
    notes: Vec<String>,
}

struct QemuJob<'a> {
    img: &'a Path,
    write: bool,
    count: u64,
    depth: usize,
    bs: u64,
    step: u64,
}

impl Qemu {
    fn run_once(&self, aio: &str, j: &QemuJob<'_>) -> Res<f64> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-f", "parallels", "-t", "none", "-i", aio]);
        if j.write {
            cmd.args(["-w", "--pattern=165"]);
        }
        cmd.arg("-c").arg(j.count.to_string());
        cmd.arg("-d").arg(j.depth.to_string());
        cmd.arg("-s").arg(j.bs.to_string());
        cmd.arg("-S").arg(j.step.to_string());
        cmd.args(["-o", "0"]);
        cmd.arg(j.img);
        let out = cmd.output().map_err(|e| format!("running qemu-img: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("qemu-img bench -i {aio} failed: {}{}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim()));
        }
        let secs = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Run completed in ").and_then(|r| r.split_whitespace().next()).and_then(|s| s.parse::<f64>().ok()))
            .ok_or_else(|| format!("qemu-img bench: unexpected output {stdout:?}"))?;
        // It prints milliseconds resolution; never divide by zero.
        Ok(secs.max(0.0005))
    }

    /// Run with io_uring, falling back (once, for good) to native AIO.
    fn run(&mut self, j: &QemuJob<'_>) -> Res<f64> {
        if let Some(aio) = self.aio {
            return self.run_once(aio, j);
        }
        match self.run_once("io_uring", j) {
            Ok(s) => {
                self.aio = Some("io_uring");
                Ok(s)
            }
            Err(e) => {
                let s = self.run_once("native", j)?;
                self.notes.push(format!("qemu-img bench -i io_uring failed ({e}); qemu column uses -i native"));
                self.aio = Some("native");
                Ok(s)
            }
        }
    }

    /// A run of about `secs`: calibrate the request rate on a short run,
    /// then size the count. `guess` is a rate to start from (requests/s).
    fn timed(&mut self, cfg: &Cfg, mut j: QemuJob<'_>, guess: f64) -> Res<Run> {
        let mut count = ((guess * 0.3).max(64.0)) as u64;
        let rate = loop {
            j.count = count;
            let t = self.run(&j)?;
            if t >= 0.2 || count >= 50_000_000 {
                break count as f64 / t;
            }
            count *= 4;
        };
        j.count = ((rate * cfg.secs) as u64).max(64);
        let t = self.run(&j)?;
        Ok(Run { ios: j.count, bytes: j.count * j.bs, secs: t, ..Default::default() })
    }
}

/// A stride for qemu's "random" 4k pattern: an odd number of blocks near
/// the golden ratio of the disk, so successive requests land far apart and
/// the sequence visits every block before repeating (the disk has a
/// power-of-two number of blocks when its size is a power of two).
fn scatter_step(size: u64, bs: u64) -> u64 {
    let blocks = size / bs;
    let k = ((blocks as f64) * 0.618_033_988_7) as u64 | 1;
    k * bs
}

// ---------------------------------------------------------------------------
// Workloads

struct Row {
    key: &'static str,
    label: String,
    engine: Option<Run>,
    fio: Option<Res<Run>>,
    qemu: Option<Res<Run>>,
    /// What the qemu column measured, if it differs from the row label.
    qemu_what: Option<String>,
}

impl Row {
    fn new(key: &'static str, label: impl Into<String>) -> Row {
        Row { key, label: label.into(), engine: None, fio: None, qemu: None, qemu_what: None }
    }
}

#[allow(clippy::too_many_arguments)]
fn engine_rw(cfg: &Cfg, paths: &[PathBuf], read_only: bool, dir: Dir, bs: usize, qd: usize, seq: bool, secs: Duration) -> Res<Run> {
    let stack = open_stack(paths, read_only)?;
    let next: Offsets =
        if seq { Box::new(seq_offsets(cfg.size, bs)) } else { Box::new(random_offsets(cfg.size, bs, 0x1234_5678 ^ qd as u64)) };
    let run = drive_one(&stack, dir, bs, qd, secs, next)?;
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing stack: {e}"))?;
    Ok(run)
}

/// Allocations measured per call (one turn of the row): bounded by count
/// as well as by time, because deleting a file of freshly allocated
/// clusters costs far more than writing them (~0.25 ms per cluster on
/// ext4 over virtio), and that cost is paid outside the measurement.
const ALLOCS_PER_TURN: u64 = 4096;

/// Allocating 4k writes at QD32: every write lands in a cluster the image
/// does not hold yet (the first 4k of each cluster, ascending, as qemu-img
/// bench -w -s 4k -S 1M does), on fresh empty images, round after round
/// until `secs` of I/O or ALLOCS_PER_TURN allocations. Every write is
/// acknowledged only once its BAT entry is written (the kill -9 guarantee).
/// Returns the I/O phase; the closing flush is counted apart.
fn engine_alloc(cfg: &Cfg, secs: f64) -> Res<Run> {
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
fn engine_fresh(cfg: &Cfg, secs: f64) -> Res<Run> {
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

/// The same on a fresh sparse raw file (what a loop device over a new file
/// does).
fn fio_fresh(cfg: &Cfg, secs: f64) -> Res<Run> {
    let path = cfg.path(FRESH_RAW);
    let _ = fs::remove_file(&path);
    fs::File::create(&path).and_then(|f| f.set_len(cfg.size)).map_err(|e| format!("{}: {e}", path.display()))?;
    let run = fio_on(cfg, &path, "randwrite", K4, 32, secs);
    let _ = fs::remove_file(&path);
    run
}

/// Head-of-line blocking: 4k random reads at QD16 on one ring (one queue)
/// over a full base under a fresh empty top, alone and then beside a job
/// of 4k random writes into the top at `writer_qd`, whose first write to
/// each cluster copies it up (1 MiB read, written, synced before the BAT
/// entry). Both turns get a fresh top. Returns (alone, reads beside the
/// writer, the writer, copy-ups per second).
fn read_beside_copy_up(cfg: &Cfg, secs: Duration, writer_qd: usize) -> Res<(Run, Run, Run, f64)> {
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

/// What the device itself does under the same load: fio's 4k random reads
/// at QD16 on the raw file, alone and beside two fio jobs doing the I/O of
/// `rate` copy-ups per second (a 1 MiB read, and a 1 MiB write followed by
/// an fdatasync). Returns (alone, beside).
fn fio_beside_copy_up(cfg: &Cfg, secs: f64, rate: f64) -> Res<(Run, Run)> {
    let alone = fio(cfg, "randread", K4, 16, secs)?;
    let raw = cfg.path(RAW);
    let out = Command::new("fio")
        .args(["--output-format=json", "--direct=1", "--ioengine=io_uring", "--time_based", "--norandommap", "--randrepeat=0"])
        .arg(format!("--filename={}", raw.display()))
        .arg(format!("--size={}", cfg.size))
        .arg(format!("--runtime={}ms", (secs * 1000.0).round().max(100.0) as u64))
        .args(["--name=reads", "--rw=randread", "--bs=4k", "--iodepth=16"])
        .args(["--name=copy-read", "--rw=randread", "--bs=1M", "--iodepth=1"])
        .arg(format!("--rate_iops={}", rate.round().max(1.0) as u64))
        .args(["--name=copy-write", "--rw=randwrite", "--bs=1M", "--iodepth=1", "--fdatasync=1"])
        .arg(format!("--rate_iops={}", rate.round().max(1.0) as u64))
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let start = stdout.find('{').ok_or("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0]["read"];
    let ios = job["total_ios"].as_u64().unwrap_or(0);
    let ms = job["runtime"].as_u64().unwrap_or(0).max(1);
    Ok((alone, Run { ios, bytes: ios * K4 as u64, secs: ms as f64 / 1000.0, ..Default::default() }))
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

/// A run that moved `clusters` whole clusters in `secs`, with the CPU used since `cpu0`.
fn cluster_run(clusters: u64, secs: f64, cpu0: f64) -> Run {
    Run { ios: clusters, bytes: clusters * CLUSTER, secs, cpu_pct: Some((cpu_secs() - cpu0) / secs * 100.0), ..Default::default() }
}

/// Merge throughput: a disk directory whose base holds the bench's data,
/// a snapshot (an empty top), then the top merged into its parent online:
/// every cluster copied up (read, written, synced, linked). Against a raw
/// copy of the same bytes between two plain files with the same number of
/// 1 MiB copies in flight, synced at the end. Returns (merge, copy).
fn merge_vs_copy(cfg: &Cfg) -> Res<(Run, Run)> {
    let (mut disk, stack) = bench_disk(cfg)?;
    block_on(ops::snapshot(&SyncIo, &stack, &mut disk, None)).map_err(|e| format!("snapshot: {e}"))?;
    let ring = new_ring()?;
    let t = Instant::now();
    let cpu0 = cpu_secs();
    let merged = ring.block_on(ops::merge(&ring.io(), &stack, &mut disk, None, &|_, _| {})).map_err(|e| format!("merge: {e}"))?;
    let merge = cluster_run(merged.clusters, t.elapsed().as_secs_f64(), cpu0);
    block_on(stack.close(&SyncIo)).map_err(|e| format!("closing: {e}"))?;
    drop(stack);
    let _ = fs::remove_dir_all(&disk.dir);

    // The same bytes, file to file.
    let src = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(cfg.path(RAW)).map_err(|e| e.to_string())?;
    let dst_path = cfg.path(COPY);
    let _ = fs::remove_file(&dst_path);
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dst_path)
        .map_err(|e| format!("{}: {e}", dst_path.display()))?;
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let io = ring.io();
    let t = Instant::now();
    let cpu0 = cpu_secs();
    raw_transfer(&ring, sfd, Some(dfd), merged.clusters * CLUSTER).map_err(|e| format!("raw copy: {e}"))?;
    ring.block_on(io.sync_data(dfd)).map_err(|e| format!("raw copy sync: {e}"))?;
    let copy = cluster_run(merged.clusters, t.elapsed().as_secs_f64(), cpu0);
    drop(dst);
    let _ = fs::remove_file(&dst_path);
    Ok((merge, copy))
}

/// 4k random overwrites at QD32 on the full image, with a write tracker
/// attached or not (the tracker's cost on the write path).
fn engine_write_tracked(cfg: &Cfg, tracked: bool, secs: Duration) -> Res<Run> {
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
fn copy_to_sink(stack: &Stack) -> Res<(Run, copy::Sent)> {
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

/// Read `bytes` from `src` (and write them to `dst`, at the same offsets),
/// 1 MiB at a time with eight in flight: the plain file I/O a merge or a
/// copy is measured against.
fn raw_transfer(ring: &OwnRing, src: std::os::fd::RawFd, dst: Option<std::os::fd::RawFd>, bytes: u64) -> ublk_ploop::Result<()> {
    let io = ring.io();
    let offsets: Vec<u64> = (0..bytes.div_ceil(CLUSTER)).map(|c| c * CLUSTER).collect();
    let bufs = ublk_ploop::io::BufPool::new(CLUSTER as usize, 8);
    let one = |&at: &u64| {
        let (io, bufs) = (&io, &bufs);
        async move {
            let mut buf = bufs.get();
            let moved = async {
                io.read_at(src, &mut buf, at).await?;
                match dst {
                    Some(d) => io.write_at(d, &buf, at).await,
                    None => Ok(()),
                }
            };
            let r = moved.await.map_err(|e| ublk_ploop::Error::io(e, "raw transfer"));
            bufs.put(buf);
            r
        }
    };
    ring.block_on(ublk_ploop::io::for_each_in_flight(8, &offsets, one, |_| {}))
}

/// Read `bytes` of the raw file from the start, 1 MiB at a time with
/// eight in flight (what a copy of those bytes must at least do).
fn raw_read(cfg: &Cfg, bytes: u64) -> Res<Run> {
    let src = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(cfg.path(RAW)).map_err(|e| e.to_string())?;
    let ring = new_ring()?;
    let t = Instant::now();
    let cpu0 = cpu_secs();
    raw_transfer(&ring, src.as_raw_fd(), None, bytes).map_err(|e| format!("raw read: {e}"))?;
    Ok(cluster_run(bytes / CLUSTER, t.elapsed().as_secs_f64(), cpu0))
}

/// Live copies taken while 4k random writes at QD32 go on over a hot set:
/// each copy's rounds and its freeze (requests held for the last pass).
fn copy_under_load(cfg: &Cfg, copies: usize) -> Res<(Run, Vec<copy::Sent>)> {
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
struct CopyRows {
    /// 4k randwrite QD32 without and with a tracker, in turns.
    untracked: Run,
    tracked: Run,
    /// A copy of the full image and a raw read of the same bytes, in turns.
    copy: Run,
    raw: Run,
    /// Writes during copies, and each copy.
    under_load: (Run, Vec<copy::Sent>),
}

/// A disk directory's snapshot (descriptor update included) under 4k
/// random writes at QD32 over a hot set: the stall is still only the swap.
fn disk_snapshot_stall(cfg: &Cfg, gap: Duration, snapshots: usize) -> Res<(Run, Vec<Duration>, Vec<Duration>)> {
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
fn swap_stall(cfg: &Cfg, gap: Duration, swaps: usize, span: u64) -> Res<(Run, Vec<Duration>)> {
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

/// Run allocation rounds on fresh images until `secs` of I/O, or
/// ALLOCS_PER_TURN allocations, or a wall-clock cap; at least one round.
fn alloc_rounds(secs: f64, mut one_round: impl FnMut() -> Res<Run>) -> Res<Run> {
    let mut total = Run::default();
    let wall = Instant::now();
    while total.rounds == 0 || (total.secs < secs && total.ios < ALLOCS_PER_TURN && wall.elapsed().as_secs_f64() < 3.0 * secs + 2.0) {
        total.add(&one_round()?);
    }
    Ok(total)
}

/// The same for qemu-img bench: `-w -s 4k -S 1M -d 32` on fresh empty
/// parallels images, so each write allocates a cluster (in ascending order).
fn qemu_alloc(cfg: &Cfg, q: &mut Qemu, secs: f64) -> Res<Run> {
    let path = cfg.path(QEMU_ALLOC);
    let clusters = cfg.alloc_size / CLUSTER;
    alloc_rounds(secs, || {
        let _ = fs::remove_file(&path);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "parallels", "-o"])
            .arg(format!("cluster_size={CLUSTER}"))
            .arg(&path)
            .arg(cfg.alloc_size.to_string())
            .output()
            .map_err(|e| format!("running qemu-img create: {e}"))?;
        if !out.status.success() {
            return Err(format!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let t = q.run(&QemuJob { img: &path, write: true, count: clusters, depth: 32, bs: K4 as u64, step: CLUSTER })?;
        let _ = fs::remove_file(&path);
        Ok(Run { ios: clusters, bytes: clusters * K4 as u64, secs: t, rounds: 1, ..Default::default() })
    })
}

/// A parallels image with the same data for qemu: a byte copy of the ploop
/// image (same layout); if qemu will not open that, qemu's own conversion
/// of the raw file.
fn make_qemu_image(cfg: &Cfg, q: &mut Qemu) -> Res<String> {
    let dst = cfg.path(QEMU_IMG);
    fs::copy(cfg.path(PLOOP), &dst).map_err(|e| format!("copying image: {e}"))?;
    let probe = QemuJob { img: &dst, write: false, count: 64, depth: 1, bs: K4 as u64, step: K4 as u64 };
    if q.run(&probe).is_ok() {
        return Ok("byte copy of the engine's ploop image".into());
    }
    let _ = fs::remove_file(&dst);
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "parallels", "-t", "none", "-o"])
        .arg(format!("cluster_size={CLUSTER}"))
        .arg(cfg.path(RAW))
        .arg(&dst)
        .output()
        .map_err(|e| format!("running qemu-img convert: {e}"))?;
    if !out.status.success() {
        return Err(format!("qemu-img convert failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    q.run(&probe)?;
    Ok("qemu-img convert of the raw file (qemu refused the engine's image)".into())
}

// ---------------------------------------------------------------------------

/// Size of the empty images for allocating writes: one round fills a turn's
/// worth of allocations (ALLOCS_PER_TURN clusters), at most a quarter
/// of the free space, never below the data disk size.
fn pick_alloc_size(cfg: &Cfg) -> u64 {
    let want = cfg.size.max(ALLOCS_PER_TURN * CLUSTER);
    let free = {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(cfg.dir.as_os_str().as_bytes()).unwrap_or_default();
        // SAFETY: statvfs fills the zeroed struct; c is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            st.f_bavail as u64 * st.f_frsize as u64
        } else {
            0
        }
    };
    (want.min(free / 4) / CLUSTER * CLUSTER).max(cfg.size)
}

/// Add a tool's slice to its running total; the first error sticks.
fn accumulate(total: &mut Option<Res<Run>>, slice: Res<Run>) {
    match (total.as_mut(), slice) {
        (Some(Ok(t)), Ok(r)) => t.add(&r),
        (Some(Err(_)), _) => {}
        (_, Err(e)) => *total = Some(Err(e)),
        (None, Ok(r)) => *total = Some(Ok(r)),
    }
}

/// Run the engine and a reference tool in alternating turns (see SLICES).
/// Engine errors end the bench; the tool's are reported.
fn alternate(
    cfg: &Cfg,
    mut engine: impl FnMut(f64) -> Res<Run>,
    mut tool: Option<&mut dyn FnMut(f64) -> Res<Run>>,
) -> Res<(Run, Option<Res<Run>>)> {
    let turn = cfg.secs / SLICES as f64;
    let mut a = Run::default();
    let mut b = None;
    for _ in 0..SLICES {
        a.add(&engine(turn)?);
        if let Some(t) = tool.as_mut() {
            accumulate(&mut b, t(turn));
        }
    }
    Ok((a, b))
}

fn run() -> Res<()> {
    let mut cfg = Cfg::from_env()?;
    let t_all = Instant::now();
    let have_fio = on_path("fio");
    let have_qemu = on_path("qemu-img");
    let _scratch = Scratch::new(&cfg)?;
    cfg.alloc_size = pick_alloc_size(&cfg);
    println!("ublk-ploop engine bench");
    println!(
        "  scratch {} | disk {} MiB | {} s per workload and tool | cluster {} KiB | load avg {}",
        cfg.dir.display(),
        cfg.size / MIB,
        cfg.secs,
        CLUSTER / 1024,
        loadavg()
    );
    if !have_fio {
        println!("  fio not found: install fio (the fio column is skipped)");
    }
    if !have_qemu {
        println!("  qemu-img not found: install qemu-utils (the qemu column is skipped)");
    }
    let t = Instant::now();
    setup(&cfg)?;
    println!("  setup: wrote {} MiB to the ploop image and the raw file in {:.1} s", cfg.size / MIB, t.elapsed().as_secs_f64());

    let mut q = Qemu { aio: None, notes: Vec::new() };
    let mut qemu_img_ok = false;
    let mut qemu_img_what = String::new();
    if have_qemu {
        match make_qemu_image(&cfg, &mut q) {
            Ok(what) => {
                qemu_img_ok = true;
                qemu_img_what = what;
            }
            Err(e) => println!("  qemu column skipped: {e}"),
        }
    }

    let ploop = vec![cfg.path(PLOOP)];
    let mut deep = ploop.clone();
    deep.extend((1..DEEP).map(|i| cfg.path(&upper_name(i))));
    let qimg = cfg.path(QEMU_IMG);
    let step4k = scatter_step(cfg.size, K4 as u64);
    let mut rows: Vec<Row> = Vec::new();
    // UBLK_PLOOP_BENCH_ONLY=read,alloc,... runs only the groups named
    // (read, write, seq, qd, alloc, hol, swap, disk, copy): for profiling one workload.
    let only = std::env::var("UBLK_PLOOP_BENCH_ONLY").unwrap_or_default();
    let want = |group: &str| only.is_empty() || only.split(',').any(|g| g.trim() == group);
    let progress = |s: &str| eprintln!("  [{:5.1}s] {s}", t_all.elapsed().as_secs_f64());
    let secs = |s: f64| Duration::from_secs_f64(s);

    // 4k random read QD32: stack depth 1, depth 16 and fio in turn.
    if want("read") {
        progress("4k randread QD32: depth 1, depth 16, fio");
        let (mut d1, mut d16, mut f) = (Run::default(), Run::default(), None);
        let turn = cfg.secs / SLICES as f64;
        for _ in 0..SLICES {
            d1.add(&engine_rw(&cfg, &ploop, true, Dir::Read, K4, 32, false, secs(turn))?);
            d16.add(&engine_rw(&cfg, &deep, true, Dir::Read, K4, 32, false, secs(turn))?);
            if have_fio {
                accumulate(&mut f, fio(&cfg, "randread", K4, 32, turn));
            }
        }
        let mut r = Row::new("randread_4k_qd32", "4k randread QD32");
        r.engine = Some(d1);
        r.fio = f;
        if qemu_img_ok {
            progress("qemu 4k scattered read QD32");
            let guess = r.engine.as_ref().unwrap().iops();
            r.qemu = Some(q.timed(&cfg, QemuJob { img: &qimg, write: false, count: 0, depth: 32, bs: K4 as u64, step: step4k }, guess));
            r.qemu_what = Some(format!("strided, step {} KiB", step4k / 1024));
        }
        rows.push(r);
        let mut r = Row::new("randread_4k_qd32_depth16", format!("4k randread QD32, {DEEP}-layer stack"));
        r.engine = Some(d16);
        rows.push(r);
    }

    // 4k random overwrite QD32 on the allocated image.
    if want("write") {
        progress("4k randwrite QD32 (allocated)");
        let mut r = Row::new("randwrite_4k_qd32", "4k randwrite QD32 (allocated)");
        let mut f = |s: f64| fio(&cfg, "randwrite", K4, 32, s);
        let (e, f) = alternate(
            &cfg,
            |s| engine_rw(&cfg, &ploop, false, Dir::Write, K4, 32, false, secs(s)),
            if have_fio { Some(&mut f) } else { None },
        )?;
        r.engine = Some(e);
        r.fio = f;
        if qemu_img_ok {
            let guess = r.engine.as_ref().unwrap().iops();
            r.qemu = Some(q.timed(&cfg, QemuJob { img: &qimg, write: true, count: 0, depth: 32, bs: K4 as u64, step: step4k }, guess));
            r.qemu_what = Some(format!("strided, step {} KiB", step4k / 1024));
        }
        rows.push(r);
    }

    // 1 MiB sequential read and write.
    for (dir, key, label, rw) in [
        (Dir::Read, "seqread_1m", format!("1M seqread QD{SEQ_QD}"), "read"),
        (Dir::Write, "seqwrite_1m", format!("1M seqwrite QD{SEQ_QD}"), "write"),
    ] {
        if !want("seq") {
            continue;
        }
        progress(&label);
        let mut r = Row::new(key, label);
        let mut f = |s: f64| fio(&cfg, rw, MIB as usize, SEQ_QD, s);
        let (e, f) = alternate(
            &cfg,
            |s| engine_rw(&cfg, &ploop, dir == Dir::Read, dir, MIB as usize, SEQ_QD, true, secs(s)),
            if have_fio { Some(&mut f) } else { None },
        )?;
        r.engine = Some(e);
        r.fio = f;
        if qemu_img_ok {
            let guess = r.engine.as_ref().unwrap().iops();
            r.qemu = Some(q.timed(&cfg, QemuJob { img: &qimg, write: dir == Dir::Write, count: 0, depth: SEQ_QD, bs: MIB, step: MIB }, guess));
        }
        rows.push(r);
    }

    // Queue-depth scaling of random reads (informational, no target).
    for qd in [1usize, 16].into_iter().filter(|_| want("qd")) {
        let label = format!("4k randread QD{qd}");
        progress(&label);
        let key = if qd == 1 { "randread_4k_qd1" } else { "randread_4k_qd16" };
        let mut r = Row::new(key, label);
        let mut f = |s: f64| fio(&cfg, "randread", K4, qd, s);
        let (e, f) = alternate(
            &cfg,
            |s| engine_rw(&cfg, &ploop, true, Dir::Read, K4, qd, false, secs(s)),
            if have_fio { Some(&mut f) } else { None },
        )?;
        r.engine = Some(e);
        r.fio = f;
        rows.push(r);
    }

    // Allocating writes on empty images, engine and qemu in turn.
    if want("alloc") {
        progress("4k allocating writes QD32 (empty images)");
        let mut r = Row::new("allocwrite_4k_qd32", "4k alloc-write QD32 (empty img)");
        let mut qa = |s: f64| qemu_alloc(&cfg, &mut q, s);
        let (e, qr) = alternate(&cfg, |s| engine_alloc(&cfg, s), if have_qemu { Some(&mut qa) } else { None })?;
        r.engine = Some(e);
        r.qemu = qr;
        if have_qemu {
            r.qemu_what = Some("-w -s 4k -S 1M: one write per cluster, ascending".into());
        }
        rows.push(r);
        progress("4k randwrite QD32 (fresh images)");
        let mut r = Row::new("randwrite_4k_qd32_fresh", "4k randwrite QD32 (fresh img)");
        let mut f = |s: f64| fio_fresh(&cfg, s);
        let (e, f) = alternate(&cfg, |s| engine_fresh(&cfg, s), if have_fio { Some(&mut f) } else { None })?;
        r.engine = Some(e);
        r.fio = f;
        rows.push(r);
    }

    // Reads beside a job whose writes copy clusters up, on one ring.
    if want("hol") {
        progress("4k randread QD16 alone / beside a copy-up writer (QD1), one ring");
    }
    let hol = if want("hol") {
        let (alone, beside, writer, rate) = read_beside_copy_up(&cfg, secs(cfg.secs / SLICES as f64), 1)?;
        let device = if have_fio { Some(fio_beside_copy_up(&cfg, cfg.secs, rate)) } else { None };
        Some(HeadOfLine { alone, beside, writer, rate, device })
    } else {
        None
    };

    // Snapshots taken under write load: how long requests are held.
    if want("swap") {
        progress(&format!("{SWAPS} snapshots under 4k randwrite QD32, {} ms and {} ms apart", SWAP_GAP_STEADY.as_millis(), SWAP_GAP_STORM.as_millis()));
    }
    let swap = if want("swap") {
        Some((swap_stall(&cfg, SWAP_GAP_STEADY, SWAPS, SWAP_HOT_SET)?, swap_stall(&cfg, SWAP_GAP_STORM, SWAPS, cfg.size)?))
    } else {
        None
    };

    // Snapshots of a disk directory (descriptor included), and a merge.
    if want("disk") {
        progress("disk snapshots under 4k randwrite QD32; merge vs a raw copy");
    }
    let disk = if want("disk") {
        // Merge and copy take turns (twice), so that drift hits both alike.
        let (mut merge, mut copy) = (Run::default(), Run::default());
        for _ in 0..2 {
            let (m, c) = merge_vs_copy(&cfg)?;
            merge.add(&m);
            copy.add(&c);
        }
        Some(DiskRows { snapshots: disk_snapshot_stall(&cfg, SWAP_GAP_STEADY, SWAPS)?, merge: (merge, copy) })
    } else {
        None
    };
    // The write tracker's cost, a live copy's throughput, and its freeze.
    if want("copy") {
        progress("4k randwrite QD32 with and without a tracker; live copy vs raw read; copies under writes");
    }
    let copy = if want("copy") {
        let (mut untracked, mut tracked) = (Run::default(), Run::default());
        let turn = secs(cfg.secs / SLICES as f64);
        for _ in 0..SLICES {
            untracked.add(&engine_write_tracked(&cfg, false, turn)?);
            tracked.add(&engine_write_tracked(&cfg, true, turn)?);
        }
        let (mut c, mut raw) = (Run::default(), Run::default());
        for _ in 0..2 {
            let stack = open_stack(&ploop, true)?;
            let (run, _) = copy_to_sink(&stack)?;
            drop(stack);
            c.add(&run);
            raw.add(&raw_read(&cfg, run.bytes)?);
        }
        Some(CopyRows { untracked, tracked, copy: c, raw, under_load: copy_under_load(&cfg, 3)? })
    } else {
        None
    };
    let load = UnderLoad { hol, swap, disk, copy };
    report(&cfg, &rows, &load, &q, have_fio, have_qemu, &qemu_img_what, t_all.elapsed().as_secs_f64());
    Ok(())
}

/// Reads alone and beside a copy-up writer, and the device's own figures
/// under the same I/O.
struct HeadOfLine {
    alone: Run,
    beside: Run,
    writer: Run,
    /// Copy-ups per second the writer caused.
    rate: f64,
    /// fio's reads alone and beside fio doing that copy-up I/O.
    device: Option<Res<(Run, Run)>>,
}

/// Writes during stack changes, and each change's stall.
type Stalls = (Run, Vec<Duration>);

/// Snapshots of a disk directory and a merge.
struct DiskRows {
    /// Writes, each snapshot's stall, each snapshot's whole time.
    snapshots: (Run, Vec<Duration>, Vec<Duration>),
    /// The merge, and the raw copy of the same bytes.
    merge: (Run, Run),
}

/// The rows measured under concurrent load.
struct UnderLoad {
    disk: Option<DiskRows>,
    hol: Option<HeadOfLine>,
    /// Writes during the snapshots and each snapshot's stall, with the
    /// snapshots far apart and close together.
    swap: Option<(Stalls, Stalls)>,
    copy: Option<CopyRows>,
}

// ---------------------------------------------------------------------------
// Report

fn fmt_iops(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn cell(r: &Option<Res<Run>>) -> (String, String, String) {
    match r {
        Some(Ok(run)) => (fmt_iops(run.iops()), format!("{:.0}", run.mibps()), run.cpu_pct.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into())),
        Some(Err(_)) => ("error".into(), "-".into(), "-".into()),
        None => ("n/a".into(), "-".into(), "-".into()),
    }
}

fn ratio(a: Option<&Run>, b: &Option<Res<Run>>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(Ok(b))) if b.iops() > 0.0 => Some(a.iops() / b.iops()),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn report(cfg: &Cfg, rows: &[Row], load: &UnderLoad, q: &Qemu, have_fio: bool, have_qemu: bool, qemu_img_what: &str, total_secs: f64) {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<34} | {:>8} {:>7} {:>5} | {:>8} {:>7} {:>5} | {:>8} {:>7} | {:>5} {:>5}",
        "workload", "(a)IOPS", "MiB/s", "CPU%", "(b)IOPS", "MiB/s", "CPU%", "(c)IOPS", "MiB/s", "a/b", "a/c"
    );
    let _ = writeln!(out, "{}", "-".repeat(128));
    for r in rows {
        let e = r.engine.as_ref();
        let (ei, em, ec) = cell(&e.cloned().map(Ok));
        let (fi, fm, fc) = cell(&r.fio);
        let (qi, qm, _) = cell(&r.qemu);
        let ab = ratio(e, &r.fio).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let ac = ratio(e, &r.qemu).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<34} | {:>8} {:>7} {:>5} | {:>8} {:>7} {:>5} | {:>8} {:>7} | {:>5} {:>5}",
            r.label, ei, em, ec, fi, fm, fc, qi, qm, ab, ac
        );
    }
    let _ = writeln!(out);
    if let Some(h) = &load.hol {
        let _ = writeln!(
            out,
            "Head-of-line (one ring, 2-layer stack: full base, fresh top): 4k randread QD16 alone {} IOPS; beside a writer\n  \
             (4k random writes QD1 into the top, {:.0} copy-ups/s of 1 MiB) {} IOPS = {:.2}x; the writer did {} IOPS",
            fmt_iops(h.alone.iops()),
            h.rate,
            fmt_iops(h.beside.iops()),
            h.beside.iops() / h.alone.iops().max(1.0),
            fmt_iops(h.writer.iops())
        );
        match &h.device {
            Some(Ok((alone, beside))) => {
                let _ = writeln!(
                    out,
                    "  the device under the same I/O (fio: 4k randread QD16 on the raw file beside 1 MiB reads and 1 MiB writes\n  \
                     + fdatasync at {:.0}/s): alone {} IOPS, beside {} IOPS = {:.2}x; engine beside vs fio beside = {:.2}",
                    h.rate,
                    fmt_iops(alone.iops()),
                    fmt_iops(beside.iops()),
                    beside.iops() / alone.iops().max(1.0),
                    h.beside.iops() / beside.iops().max(1.0)
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "  fio error on the device baseline: {e}");
            }
            None => {}
        }
    }
    let stall_stats = |stalls: &[Duration]| -> Vec<u32> { stalls.iter().map(|d| d.as_micros() as u32).collect() };
    if let Some((steady, storm)) = &load.swap {
        for ((writes, stalls), what) in [
            (steady, format!("{} ms apart, writes over {} MiB", SWAP_GAP_STEADY.as_millis(), SWAP_HOT_SET / MIB)),
            (storm, format!("{} ms apart, writes over the disk", SWAP_GAP_STORM.as_millis())),
        ] {
            let us = stall_stats(stalls);
            let ms = |pct| percentile_us(&us, pct).map(|v| format!("{:.2}", v / 1000.0)).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "Stack swap, {} snapshots {what} under 4k randwrite QD32 ({} IOPS): requests held p50 {} ms, p99 {} ms,\n  \
                 max {} ms; write latency p50 {} ms, p99 {} ms, max {} ms",
                stalls.len(),
                fmt_iops(writes.iops()),
                ms(50.0),
                ms(99.0),
                ms(100.0),
                writes.lat_ms(50.0).map(|x| format!("{x:.2}")).unwrap_or_default(),
                writes.lat_ms(99.0).map(|x| format!("{x:.2}")).unwrap_or_default(),
                writes.lat_ms(100.0).map(|x| format!("{x:.2}")).unwrap_or_default(),
            );
        }
    }
    if let Some(d) = &load.disk {
        let (writes, stalls, whole) = &d.snapshots;
        let us = stall_stats(stalls);
        let whole_us = stall_stats(whole);
        let ms = |v: &[u32], pct| percentile_us(v, pct).map(|x| format!("{:.2}", x / 1000.0)).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "Disk snapshots (ops::snapshot: new delta, descriptor stored, swap, old top closed), {} of them {} ms apart under\n  \
             4k randwrite QD32 over {} MiB ({} IOPS): requests held p50 {} ms, p99 {} ms; whole operation p50 {} ms, p99 {} ms",
            stalls.len(),
            SWAP_GAP_STEADY.as_millis(),
            SWAP_HOT_SET / MIB,
            fmt_iops(writes.iops()),
            ms(&us, 50.0),
            ms(&us, 99.0),
            ms(&whole_us, 50.0),
            ms(&whole_us, 99.0)
        );
        let (merge, copy) = &d.merge;
        let _ = writeln!(
            out,
            "Merge of the top into its parent ({} clusters of 1 MiB, online, twice): {:.0} MiB/s; raw copy of the same bytes (8 x 1 MiB\n  \
             in flight, synced at the end; in turns with the merge): {:.0} MiB/s = {:.2}x",
            merge.ios,
            merge.mibps(),
            copy.mibps(),
            merge.mibps() / copy.mibps().max(1.0)
        );
    }
    if let Some(c) = &load.copy {
        let _ = writeln!(
            out,
            "Write tracker: 4k randwrite QD32 without {} IOPS, with {} IOPS = {:.3}x (in turns)",
            fmt_iops(c.untracked.iops()),
            fmt_iops(c.tracked.iops()),
            c.tracked.iops() / c.untracked.iops().max(1.0)
        );
        let _ = writeln!(
            out,
            "Live copy of the full image (one-way stream with checksums, into a sink; twice): {:.0} MiB/s, CPU {:.0}%;\n  \
             raw read of the same bytes (8 x 1 MiB in flight, in turns with it): {:.0} MiB/s = {:.2}x",
            c.copy.mibps(),
            c.copy.cpu_pct.unwrap_or(0.0),
            c.raw.mibps(),
            c.copy.mibps() / c.raw.mibps().max(1.0)
        );
        let (writes, sent) = &c.under_load;
        let frozen: Vec<u32> = sent.iter().map(|s| (s.frozen_ms * 1000.0) as u32).collect();
        let ms = |pct| percentile_us(&frozen, pct).map(|v| format!("{:.1}", v / 1000.0)).unwrap_or_else(|| "-".into());
        let rounds: Vec<String> = sent
            .iter()
            .map(|s| s.rounds.iter().map(|r| format!("{}{}", r.sent, if r.frozen { "f" } else { "" })).collect::<Vec<_>>().join("/"))
            .collect();
        let _ = writeln!(
            out,
            "Live copies under 4k randwrite QD32 over {} MiB ({} IOPS): {} copies, clusters per round {} (f: frozen);\n  \
             frozen p50 {} ms, max {} ms; write latency p99 {} ms, max {} ms",
            SWAP_HOT_SET / MIB,
            fmt_iops(writes.iops()),
            sent.len(),
            rounds.join(", "),
            ms(50.0),
            ms(100.0),
            writes.lat_ms(99.0).map(|x| format!("{x:.2}")).unwrap_or_default(),
            writes.lat_ms(100.0).map(|x| format!("{x:.2}")).unwrap_or_default(),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "What each column measured:");
    let _ = writeln!(
        out,
        "  (a) engine: the daemon's request path (Stack::read/Stack::write, one task per request in flight, the engine's\n      I/O as SQEs on one io_uring, each handed to the kernel when queued, as a ublk queue's are), O_DIRECT, on a\n      fully written ploop image (random rows: uniform random offsets; seq rows: ascending, wrapping).\n      CPU% = this process (all threads) per wall second."
    );
    if have_fio {
        let _ = writeln!(
            out,
            "  (b) fio: ioengine=io_uring direct=1 norandommap, same bs/iodepth, on a raw file with the same data.\n      (a) and (b) take {SLICES} turns each (a b a b ..., {:.2} s per turn) so drift in the machine hits both alike;\n      the depth-16 stack takes its turns between them.",
            cfg.secs / SLICES as f64
        );
    } else {
        let _ = writeln!(out, "  (b) not run: fio not found: install fio.");
    }
    if have_qemu {
        let _ = writeln!(
            out,
            "  (c) qemu-img bench -f parallels -t none -i {} on a parallels image ({}), count sized for ~{} s.\n      qemu-img bench cannot do random offsets: the 4k \"rand\" rows use a fixed large stride that scatters requests\n      over the whole disk; seq rows use step = block size.",
            q.aio.unwrap_or("io_uring"),
            if qemu_img_what.is_empty() { "none" } else { qemu_img_what },
            cfg.secs
        );
    } else {
        let _ = writeln!(out, "  (c) not run: qemu-img not found.");
    }
    for r in rows {
        if let Some(w) = &r.qemu_what {
            let _ = writeln!(out, "      (c) {}: {w}", r.label);
        }
    }
    let per_round = cfg.alloc_size / CLUSTER;
    let _ = writeln!(
        out,
        "  Allocating row: every write lands in a cluster the image does not hold yet, on fresh empty {} MiB images\n      ({per_round} writes per round, a and c alternating); both write the first 4k of each cluster in\n      ascending order (the only pattern qemu-img bench can do); both append clusters to the image file. Time counts the I/O phase only, not\n      image creation, close or deletion.",
        cfg.alloc_size / MIB
    );
    for r in rows.iter().filter(|r| r.key == "allocwrite_4k_qd32") {
        if let Some(e) = &r.engine {
            let _ = writeln!(
                out,
                "      (a) {} rounds; closing flush (fdatasync + BAT write) {:.1} ms per round, not counted",
                e.rounds,
                e.close_secs * 1000.0 / e.rounds.max(1) as f64
            );
        }
        if let Some(Ok(c)) = &r.qemu {
            let _ = writeln!(out, "      (c) {} rounds", c.rounds);
        }
    }
    for n in &q.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for r in rows {
        for (tool, res) in [("fio", &r.fio), ("qemu", &r.qemu)] {
            if let Some(Err(e)) = res {
                let _ = writeln!(out, "  {tool} error on {}: {e}", r.label);
            }
        }
    }

    // Targets.
    let find = |key: &str| rows.iter().find(|r| r.key == key);
    // (JSON key, label, measured ratio, target)
    let mut targets: Vec<(&str, String, Option<f64>, f64)> = Vec::new();
    for (key, what, goal) in [
        ("randread_4k_qd32", "4k randread QD32 a/b", 0.90),
        ("randwrite_4k_qd32", "4k randwrite QD32 (allocated) a/b", 0.90),
        ("seqread_1m", "1M seqread a/b", 0.95),
        ("seqwrite_1m", "1M seqwrite a/b", 0.95),
        ("randwrite_4k_qd32_fresh", "4k randwrite QD32 (fresh img vs sparse file) a/b", 1.0),
    ] {
        targets.push((key, what.into(), find(key).and_then(|r| ratio(r.engine.as_ref(), &r.fio)), goal));
    }
    targets.push((
        "allocwrite_4k_qd32",
        "4k allocating write QD32 a/c".into(),
        find("allocwrite_4k_qd32").and_then(|r| ratio(r.engine.as_ref(), &r.qemu)),
        1.0,
    ));
    let engine_iops = |key: &str| find(key).and_then(|r| r.engine.as_ref()).map(Run::iops).filter(|&x| x > 0.0);
    targets.push((
        "allocwrite_vs_allocated",
        "4k allocating vs allocated write, engine".into(),
        engine_iops("allocwrite_4k_qd32").zip(engine_iops("randwrite_4k_qd32")).map(|(a, b)| a / b),
        0.7,
    ));
    targets.push((
        "read_beside_copyup",
        "4k randread QD16 beside copy-ups vs alone".into(),
        load.hol.as_ref().filter(|h| h.alone.iops() > 0.0).map(|h| h.beside.iops() / h.alone.iops()),
        0.8,
    ));
    targets.push((
        "read_beside_copyup_vs_device",
        "the same, engine vs fio doing that I/O".into(),
        load.hol.as_ref().and_then(|h| match &h.device {
            Some(Ok((_, beside))) if beside.iops() > 0.0 => Some(h.beside.iops() / beside.iops()),
            _ => None,
        }),
        0.8,
    ));
    targets.push((
        "merge_vs_copy",
        "merge vs raw copy of the same bytes".into(),
        load.disk.as_ref().map(|d| d.merge.0.mibps() / d.merge.1.mibps().max(1.0)),
        0.8,
    ));
    let depth = match (find("randread_4k_qd32").and_then(|r| r.engine.as_ref()), find("randread_4k_qd32_depth16").and_then(|r| r.engine.as_ref())) {
        (Some(d1), Some(d16)) if d1.iops() > 0.0 => Some(d16.iops() / d1.iops()),
        _ => None,
    };
    targets.push(("stack_depth", format!("stack depth {DEEP} vs 1, 4k randread QD32"), depth, 0.95));
    targets.push((
        "tracker_cost",
        "4k randwrite QD32, tracker on vs off".into(),
        load.copy.as_ref().map(|c| c.tracked.iops() / c.untracked.iops().max(1.0)),
        0.98,
    ));
    targets.push((
        "copy_vs_raw_read",
        "live copy vs raw read of the same bytes".into(),
        load.copy.as_ref().map(|c| c.copy.mibps() / c.raw.mibps().max(1.0)),
        0.8,
    ));

    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    let mut tj = serde_json::Map::new();
    for (key, what, val, goal) in &targets {
        let verdict = match val {
            Some(v) if *v >= *goal => "PASS",
            Some(_) => "MISS",
            None => "SKIP",
        };
        let v = val.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
        let _ = writeln!(out, "  {what:<44} {v:>7}  (target >= {goal:.2})  {verdict}");
        tj.insert(key.to_string(), json!({ "what": what, "ratio": val.map(round3), "target": goal, "verdict": verdict }));
    }
    // Lower is better here.
    for (key, what, stalls) in [
        ("swap_stall_p99_ms", "stack swap stall p99, ms (steady)".to_string(), load.swap.as_ref().map(|s| &s.0 .1)),
        ("swap_stall_storm_p99_ms", "stack swap stall p99, ms (copy-up storm)".to_string(), load.swap.as_ref().map(|s| &s.1 .1)),
        ("disk_snapshot_stall_p99_ms", "disk snapshot stall p99, ms".to_string(), load.disk.as_ref().map(|d| &d.snapshots.1)),
    ] {
        let p99 = stalls.and_then(|s| percentile_us(&stall_stats(s), 99.0)).map(|us| us / 1000.0);
        let verdict = match p99 {
            Some(v) if v < 10.0 => "PASS",
            Some(_) => "MISS",
            None => "SKIP",
        };
        let v = p99.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
        let _ = writeln!(out, "  {what:<44} {v:>7}  (target < 10 ms)  {verdict}");
        tj.insert(key.into(), json!({ "what": what, "value": p99.map(round3), "target": 10.0, "verdict": verdict }));
    }
    let frozen_max = load.copy.as_ref().and_then(|c| c.under_load.1.iter().map(|s| s.frozen_ms).reduce(f64::max));
    let verdict = match frozen_max {
        Some(v) if v < 100.0 => "PASS",
        Some(_) => "MISS",
        None => "SKIP",
    };
    let v = frozen_max.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(out, "  {:<44} {v:>7}  (target < 100 ms)  {verdict}", "live copy freeze, max ms, under writes");
    tj.insert("copy_freeze_max_ms".into(), json!({ "what": "live copy freeze, max ms", "value": frozen_max.map(round3), "target": 100.0, "verdict": verdict }));
    let _ = writeln!(out, "  (total bench time {total_secs:.0} s, load avg now {})", loadavg());
    print!("{out}");

    let mut rj = serde_json::Map::new();
    for r in rows {
        let res = |x: &Option<Res<Run>>| match x {
            Some(Ok(run)) => run.to_json(),
            Some(Err(e)) => json!({ "error": e }),
            None => Value::Null,
        };
        rj.insert(
            r.key.into(),
            json!({
                "label": r.label,
                "engine": r.engine.as_ref().map(Run::to_json),
                "fio": res(&r.fio),
                "qemu": res(&r.qemu),
                "qemu_workload": r.qemu_what,
            }),
        );
    }
    let j = json!({
        "size_mib": cfg.size / MIB,
        "secs_per_run": cfg.secs,
        "cluster_bytes": CLUSTER,
        "seq_qd": SEQ_QD,
        "stack_depth": DEEP,
        "alloc_image_mib": cfg.alloc_size / MIB,
        "fio": have_fio,
        "qemu": have_qemu,
        "qemu_aio": q.aio,
        "qemu_image": qemu_img_what,
        "loadavg_end": loadavg(),
        "total_secs": round1(total_secs),
        "results": rj,
        "head_of_line": load.hol.as_ref().map(|h| json!({
            "reads_alone": h.alone.to_json(),
            "reads_beside_copy_up": h.beside.to_json(),
            "copy_up_writer": h.writer.to_json(),
            "copy_ups_per_s": round1(h.rate),
            "fio_alone": h.device.as_ref().and_then(|d| d.as_ref().ok()).map(|d| d.0.to_json()),
            "fio_beside": h.device.as_ref().and_then(|d| d.as_ref().ok()).map(|d| d.1.to_json()),
        })),
        "swap": load.swap.as_ref().map(|(steady, storm)| {
            let one = |(writes, stalls): &(Run, Vec<Duration>)| json!({
                "writes": writes.to_json(),
                "stalls_ms": stalls.iter().map(|d| round3(d.as_secs_f64() * 1000.0)).collect::<Vec<_>>(),
            });
            json!({ "steady": one(steady), "storm": one(storm) })
        }),
        "disk": load.disk.as_ref().map(|d| json!({
            "snapshot_writes": d.snapshots.0.to_json(),
            "snapshot_stalls_ms": d.snapshots.1.iter().map(|x| round3(x.as_secs_f64() * 1000.0)).collect::<Vec<_>>(),
            "snapshot_whole_ms": d.snapshots.2.iter().map(|x| round3(x.as_secs_f64() * 1000.0)).collect::<Vec<_>>(),
            "merge": d.merge.0.to_json(),
            "raw_copy": d.merge.1.to_json(),
        })),
        "copy": load.copy.as_ref().map(|c| json!({
            "untracked": c.untracked.to_json(),
            "tracked": c.tracked.to_json(),
            "copy": c.copy.to_json(),
            "raw_read": c.raw.to_json(),
            "writes_under_copies": c.under_load.0.to_json(),
            "copies": c.under_load.1,
        })),
        "targets": tj,
    });
    println!("BENCH_JSON {j}");
}
