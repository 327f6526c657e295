//! Reads through a QCOW2 base (#22): the engine serving a QCOW2 image as
//! the bottom of a stack, against `qemu-img bench` reading the same file,
//! in alternating turns. Two images of the same data, made by qemu-img with
//! 64 KiB clusters: uncompressed, and zlib-compressed (the data compresses
//! about 2:1, as a filesystem of ordinary files does). The engine reads a
//! QCOW2 image through the page cache (compressed clusters lie at byte
//! offsets), so qemu runs with `-t writeback` too, and each turn of either
//! side starts with the file's cached pages dropped.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use ublk_ploop::io::{block_on, Direct, SyncIo};
use ublk_ploop::layers::Format;
use ublk_ploop::{LayerSpec, Stack, StackOptions};

use crate::baselines::{bench_secs, scatter_step};
use crate::drive::{drive_one, gen_data, random_offsets, seq_offsets, Dir};
use crate::measure::Run;
use crate::scratch::Cfg;
use crate::{Res, K4, MIB, SEQ_QD, SLICES};

const SRC: &str = "q2-src.raw";
const PLAIN: &str = "q2-plain.qcow2";
const PACKED: &str = "q2-zlib.qcow2";
/// Disk size of the images: the bench's, at most 256 MiB (compressing
/// more costs setup time, not insight).
const MAX_SIZE: u64 = 256 << 20;

pub struct Qcow2Row {
    pub key: String,
    pub what: String,
    pub engine: Run,
    pub qemu: Option<Run>,
}

/// Half of each 4 KiB block incompressible, half zeros.
fn make_source(cfg: &Cfg, size: u64) -> Res<()> {
    let f = fs::File::create(cfg.path(SRC)).map_err(|e| format!("{SRC}: {e}"))?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (4 * MIB).min(size - off) as usize;
        for (i, block) in buf[..n].chunks_mut(K4).enumerate() {
            gen_data(&mut block[..K4 / 2], off + (i * K4) as u64);
            block[K4 / 2..].fill(0);
        }
        f.write_all_at(&buf[..n], off).map_err(|e| format!("{SRC}: {e}"))?;
        off += n as u64;
    }
    Ok(())
}

fn qemu_img(args: &[&str]) -> Res<()> {
    let out = Command::new("qemu-img").args(args).output().map_err(|e| format!("running qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!("qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Drop what the page cache holds of `name` (clean pages: no root needed).
fn uncache(cfg: &Cfg, name: &str) {
    if let Ok(f) = fs::File::open(cfg.path(name)) {
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn engine_read(cfg: &Cfg, name: &str, size: u64, bs: usize, qd: usize, seq: bool, secs: f64) -> Res<Run> {
    uncache(cfg, name);
    let spec = LayerSpec { path: cfg.path(name), format: Format::Qcow2 };
    let opts = StackOptions { read_only: true, direct: Direct::Auto, offline: false, link_log: None };
    let (stack, _) = block_on(Stack::open_layers(&SyncIo, &[spec], &opts)).map_err(|e| format!("opening {name}: {e}"))?;
    let next: crate::drive::Offsets = if seq { Box::new(seq_offsets(size, bs)) } else { Box::new(random_offsets(size, bs, 0x9c02)) };
    drive_one(&stack, Dir::Read, bs, qd, Duration::from_secs_f64(secs), next)
}

/// `qemu-img bench` reads of `count` requests; strided for the 4k shape.
fn qemu_read(cfg: &Cfg, name: &str, aio: &str, bs: u64, qd: usize, step: u64, count: u64) -> Res<Run> {
    uncache(cfg, name);
    let out = Command::new("qemu-img")
        .args(["bench", "-f", "qcow2", "-t", "writeback", "-i", aio])
        .arg("-c")
        .arg(count.to_string())
        .arg("-d")
        .arg(qd.to_string())
        .arg("-s")
        .arg(bs.to_string())
        .arg("-S")
        .arg(step.to_string())
        .args(["-o", "0"])
        .arg(cfg.path(name))
        .output()
        .map_err(|e| format!("running qemu-img bench: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("qemu-img bench (qcow2 read) failed: {}{}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(Run { ios: count, bytes: count * bs, secs: bench_secs(&stdout)?, rounds: 1, ..Default::default() })
}

/// Both images, 4k random reads at QD32 and 1M sequential reads at QD4;
/// the engine and qemu take turns, qemu's count sized by the engine's
/// rate in the turn before. None when qemu-img is missing.
pub fn qcow2_rows(cfg: &Cfg, aio: Option<&'static str>, have_qemu: bool) -> Res<Option<Vec<Qcow2Row>>> {
    if !have_qemu {
        return Ok(None);
    }
    let size = cfg.size.min(MAX_SIZE);
    make_source(cfg, size)?;
    let src = cfg.path(SRC);
    let src = src.to_str().ok_or("scratch path is not UTF-8")?;
    let (plain, packed) = (cfg.path(PLAIN), cfg.path(PACKED));
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", src, plain.to_str().unwrap()])?;
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536,compression_type=zlib", src, packed.to_str().unwrap()])?;
    let _ = fs::remove_file(cfg.path(SRC));
    let aio = aio.unwrap_or("io_uring");
    let turn = cfg.secs / SLICES as f64;
    let mut rows = Vec::new();
    for (name, kind) in [(PLAIN, "uncompressed"), (PACKED, "zlib")] {
        for (bs, qd, seq, shape) in [(K4, 32, false, "4k randread QD32"), (MIB as usize, SEQ_QD, true, "1M seqread QD4")] {
            let step = if seq { bs as u64 } else { scatter_step(size, bs as u64) };
            let (mut engine, mut qemu) = (Run::default(), Some(Run::default()));
            for _ in 0..SLICES {
                let e = engine_read(cfg, name, size, bs, qd, seq, turn)?;
                let count = ((e.iops() * turn) as u64).max(64);
                engine.add(&e);
                if let Some(q) = qemu.as_mut() {
                    match qemu_read(cfg, name, aio, bs as u64, qd, step, count) {
                        Ok(r) => q.add(&r),
                        Err(e) => {
                            eprintln!("bench: {e}; the qcow2 rows have no qemu column");
                            qemu = None;
                        }
                    }
                }
            }
            let key = format!("qcow2_{}_{}", if seq { "seqread_1m" } else { "randread_4k" }, if name == PLAIN { "plain" } else { "zlib" });
            rows.push(Qcow2Row { key, what: format!("{shape}, {kind}"), engine, qemu });
        }
    }
    for name in [PLAIN, PACKED] {
        let _ = fs::remove_file(cfg.path(name));
    }
    Ok(Some(rows))
}
