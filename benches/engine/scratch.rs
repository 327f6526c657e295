//! The scratch directory: the settings from the environment, the names of
//! the files the bench makes, and their removal however the bench ends.
//! Below every other module: it knows nothing of the engine.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{Res, ALLOCS_PER_TURN, CLUSTER, DEEP, MIB, SWAPS};

pub struct Cfg {
    pub dir: PathBuf,
    pub size: u64,
    pub secs: f64,
    pub keep: bool,
    /// Virtual size of the empty images of the allocating-write rows: big
    /// enough that a round (one write per cluster) takes a while, so that
    /// per-round setup (image creation, process start) stays small.
    pub alloc_size: u64,
}

impl Cfg {
    pub fn from_env() -> Res<Cfg> {
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
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn env_num(name: &str, default: f64) -> Res<f64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| format!("{name}={v:?}: not a number")),
        _ => Ok(default),
    }
}

pub const RAW: &str = "data.raw";
pub const PLOOP: &str = "data.hds";
pub const QEMU_IMG: &str = "qemu-data.hds";
pub const ALLOC: &str = "alloc.hds";
pub const QEMU_ALLOC: &str = "qemu-alloc.hds";
pub const TOP: &str = "top.hds";
pub const FRESH: &str = "fresh.hds";
pub const FRESH_RAW: &str = "fresh.raw";
pub const SWAP_BASE: &str = "swap-base.hds";
/// The disk directory of the merge row, and the raw copy it is compared with.
pub const MERGE_DIR: &str = "merge-disk";
pub const COPY: &str = "copy.raw";

pub fn swap_top_name(i: usize) -> String {
    format!("swap-top-{i:02}.hds")
}

pub fn upper_name(i: usize) -> String {
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
pub struct Scratch {
    pub dir: PathBuf,
    pub created: bool,
    pub keep: bool,
}

impl Scratch {
    pub fn new(cfg: &Cfg) -> Res<Scratch> {
        let created = !cfg.dir.exists();
        fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let s = Scratch { dir: cfg.dir.clone(), created, keep: cfg.keep };
        s.remove_files(); // leftovers of an interrupted run
        Ok(s)
    }
    pub fn remove_files(&self) {
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

/// A new file for O_DIRECT writes; an old one of that name is an error.
pub fn create_direct(path: &Path) -> Res<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Size of the empty images for allocating writes: one round fills a turn's
/// worth of allocations (ALLOCS_PER_TURN clusters), at most a quarter
/// of the free space, never below the data disk size.
pub fn pick_alloc_size(cfg: &Cfg) -> u64 {
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
