//! What the engine is measured against: fio on the same disk blocks (the
//! machine's file-I/O ceiling), `qemu-img bench` on a parallels
//! image, and plain file-to-file I/O on a ring of our own.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use ublk_ploop::io::{Io, OwnRing};
use ublk_ploop::layers::ploop::header::Header;

use crate::drive::new_ring;
use crate::measure::{alloc_rounds, cluster_run, cpu_secs, Run};
use crate::scratch::{create_direct, Cfg, COPY, FRESH_RAW, PLOOP, QEMU_ALLOC, QEMU_IMG, RAW};
use crate::{Res, CLUSTER, K4};

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

// fio

/// fio on the disk blocks the engine's rows use: the data area of the
/// fully written ploop image, past its header and table. Where a file lies
/// on a virtual disk moves fio by more than the engine costs: fio wrote 4k
/// at QD32 on the image's data area at 0.82-0.94x its rate on the raw
/// file of the same data written beside it, and at QD1 at 1.08-1.16x. A baseline on other blocks measured that, not the engine.
pub fn fio(cfg: &Cfg, rw: &str, bs: usize, qd: usize, secs: f64) -> Res<Run> {
    let image = cfg.path(PLOOP);
    fio_on(cfg, &image, image_data_start(cfg, &image)?, rw, bs, qd, secs)
}

/// fio on the separate raw file of the same data (the baseline before it
/// moved onto the image's blocks), printed beside it to show placement.
pub fn fio_raw_file(cfg: &Cfg, rw: &str, bs: usize, qd: usize, secs: f64) -> Res<Run> {
    fio_on(cfg, &cfg.path(RAW), 0, rw, bs, qd, secs)
}

/// Where the data of the setup's image starts; its clusters follow one
/// another from there (written in order, all of them).
fn image_data_start(cfg: &Cfg, image: &Path) -> Res<u64> {
    let mut head = vec![0u8; 4096];
    let f = fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    f.read_exact_at(&mut head, 0).map_err(|e| format!("{}: {e}", image.display()))?;
    let start = Header::parse(&head).map_err(|e| format!("{}: {e}", image.display()))?.data_off_bytes();
    let len = f.metadata().map_err(|e| format!("{}: {e}", image.display()))?.len();
    if start == 0 || len < start + cfg.size {
        return Err(format!("{}: data at {start} does not hold {} bytes in a file of {len}", image.display(), cfg.size));
    }
    Ok(start)
}

fn fio_on(cfg: &Cfg, file: &Path, offset: u64, rw: &str, bs: usize, qd: usize, secs: f64) -> Res<Run> {
    let out = Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--offset={offset}"))
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

/// The run time `qemu-img bench` printed. It prints milliseconds
/// resolution; never divide by zero.
pub fn bench_secs(stdout: &str) -> Res<f64> {
    let secs = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in ").and_then(|r| r.split_whitespace().next()).and_then(|s| s.parse::<f64>().ok()))
        .ok_or_else(|| format!("qemu-img bench: unexpected output {stdout:?}"))?;
    Ok(secs.max(0.0005))
}

pub struct Qemu {
    /// The AIO mode that works (`io_uring`, else `native`); None until known.
    pub aio: Option<&'static str>,
    pub notes: Vec<String>,
}

pub struct QemuJob<'a> {
    pub img: &'a Path,
    pub write: bool,
    pub count: u64,
    pub depth: usize,
    pub bs: u64,
    pub step: u64,
}

impl Qemu {
    pub fn run_once(&self, aio: &str, j: &QemuJob<'_>) -> Res<f64> {
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
        bench_secs(&stdout)
    }

    /// Run with io_uring, falling back (once, for good) to native AIO.
    pub fn run(&mut self, j: &QemuJob<'_>) -> Res<f64> {
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
    pub fn timed(&mut self, cfg: &Cfg, mut j: QemuJob<'_>, guess: f64) -> Res<Run> {
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
pub fn scatter_step(size: u64, bs: u64) -> u64 {
    let blocks = size / bs;
    let k = ((blocks as f64) * 0.618_033_988_7) as u64 | 1;
    k * bs
}

/// The same on a fresh sparse raw file (what a loop device over a new file
/// does).
pub fn fio_fresh(cfg: &Cfg, secs: f64) -> Res<Run> {
    let path = cfg.path(FRESH_RAW);
    let _ = fs::remove_file(&path);
    fs::File::create(&path).and_then(|f| f.set_len(cfg.size)).map_err(|e| format!("{}: {e}", path.display()))?;
    let run = fio_on(cfg, &path, 0, "randwrite", K4, 32, secs);
    let _ = fs::remove_file(&path);
    run
}

/// What the device itself does under the same load: fio's 4k random reads
/// at QD16 on the raw file, alone and beside two fio jobs doing the I/O of
/// `rate` copy-ups per second (a 1 MiB read, and a 1 MiB write followed by
/// an fdatasync). Returns (alone, beside).
pub fn fio_beside_copy_up(cfg: &Cfg, secs: f64, rate: f64) -> Res<(Run, Run)> {
    let alone = fio_raw_file(cfg, "randread", K4, 16, secs)?;
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

/// A copy of the raw file's first `clusters` MiB into a new plain file on
/// `ring`, 8 x 1 MiB in flight, synced at the end: what a merge of the
/// same bytes is measured against.
pub fn raw_copy(cfg: &Cfg, ring: &OwnRing, clusters: u64) -> Res<Run> {
    let src = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(cfg.path(RAW)).map_err(|e| e.to_string())?;
    let dst_path = cfg.path(COPY);
    let _ = fs::remove_file(&dst_path);
    let dst = create_direct(&dst_path)?;
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let io = ring.io();
    let t = Instant::now();
    let cpu0 = cpu_secs();
    raw_transfer(ring, sfd, Some(dfd), clusters * CLUSTER).map_err(|e| format!("raw copy: {e}"))?;
    ring.block_on(io.sync_data(dfd)).map_err(|e| format!("raw copy sync: {e}"))?;
    let copy = cluster_run(clusters, t.elapsed().as_secs_f64(), cpu0);
    drop(dst);
    let _ = fs::remove_file(&dst_path);
    Ok(copy)
}

/// Read `bytes` of the raw file from the start, 1 MiB at a time with
/// eight in flight (what a copy of those bytes must at least do).
pub fn raw_read(cfg: &Cfg, bytes: u64) -> Res<Run> {
    let src = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(cfg.path(RAW)).map_err(|e| e.to_string())?;
    let ring = new_ring()?;
    let t = Instant::now();
    let cpu0 = cpu_secs();
    raw_transfer(&ring, src.as_raw_fd(), None, bytes).map_err(|e| format!("raw read: {e}"))?;
    Ok(cluster_run(bytes / CLUSTER, t.elapsed().as_secs_f64(), cpu0))
}

/// The same for qemu-img bench: `-w -s 4k -S 1M -d 32` on fresh empty
/// parallels images, so each write allocates a cluster (in ascending order).
pub fn qemu_alloc(cfg: &Cfg, q: &mut Qemu, secs: f64) -> Res<Run> {
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
pub fn make_qemu_image(cfg: &Cfg, q: &mut Qemu) -> Res<String> {
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
