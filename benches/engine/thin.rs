//! Opening a thin disk (#20): a 64 TiB image of 1 MiB clusters with 1 GiB
//! written, one cluster every 64 GiB (the spread that costs chunked tables
//! the most: every written entry lands in its own chunk). The engine must
//! open it in under 100 ms holding under 64 MiB of tables; a flat table
//! would hold 256 MiB of entries (and used to hold the on-disk copy too).
//! The baseline is `qemu-img info` on the same image, whose parallels
//! driver reads the whole table.

use std::fs;
use std::process::Command;
use std::time::Instant;

use ublk_ploop::io::{block_on, AlignedBuf, SyncIo};
use ublk_ploop::layers::PloopLayer;

use crate::drive::{gen_data, open_stack};
use crate::measure::median;
use crate::scratch::Cfg;
use crate::{Res, CLUSTER};

const THIN: &str = "thin-64t.hds";
pub const THIN_SIZE: u64 = 64 << 40;
pub const THIN_WRITTEN: u64 = 1 << 30;
/// Opens measured; the median counts.
const OPENS: usize = 5;

pub struct ThinRow {
    /// Median time of a writable open (in-use mark written and synced).
    pub open_secs: f64,
    /// Memory of the open stack's tables, as it counts them.
    pub table_bytes: u64,
    /// Growth of the process's resident memory while the stack was open.
    pub rss_bytes: u64,
    /// Median time of `qemu-img info` on the same image, when qemu-img ran.
    pub qemu_secs: Option<f64>,
}

fn rss() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn thin_open(cfg: &Cfg, have_qemu: bool) -> Res<ThinRow> {
    let path = cfg.path(THIN);
    let _ = fs::remove_file(&path);
    block_on(PloopLayer::create(&SyncIo, &path, THIN_SIZE, CLUSTER)).map_err(|e| format!("creating the thin image: {e}"))?;
    let count = THIN_WRITTEN / CLUSTER;
    let step = THIN_SIZE / count;
    {
        let stack = open_stack(std::slice::from_ref(&path), false)?;
        let mut buf = AlignedBuf::zeroed(CLUSTER as usize);
        for i in 0..count {
            gen_data(&mut buf, i * step);
            block_on(stack.write(&SyncIo, i * step, &buf)).map_err(|e| format!("writing the thin image: {e}"))?;
        }
        block_on(stack.close(&SyncIo)).map_err(|e| format!("closing the thin image: {e}"))?;
    }
    let (mut times, mut table_bytes, mut rss_bytes) = (Vec::new(), 0, 0);
    for _ in 0..OPENS {
        let before = rss();
        let t = Instant::now();
        let stack = open_stack(std::slice::from_ref(&path), false)?;
        times.push(t.elapsed().as_secs_f64());
        rss_bytes = rss_bytes.max(rss().saturating_sub(before));
        table_bytes = block_on(stack.table_bytes());
        // Every written cluster is found where it was written.
        let mut buf = AlignedBuf::zeroed(4096);
        let mut want = AlignedBuf::zeroed(4096);
        for i in [0, count / 2, count - 1] {
            block_on(stack.read(&SyncIo, i * step, &mut buf)).map_err(|e| format!("reading the thin image: {e}"))?;
            gen_data(&mut want, i * step);
            if buf[..] != want[..] {
                return Err(format!("thin image: cluster {} reads back wrong", i * step / CLUSTER));
            }
        }
        block_on(stack.close(&SyncIo)).map_err(|e| format!("closing the thin image: {e}"))?;
    }
    let qemu_secs = have_qemu
        .then(|| {
            let mut times = Vec::new();
            for _ in 0..OPENS {
                let t = Instant::now();
                let ok = Command::new("qemu-img").args(["info", "-f", "parallels"]).arg(&path).output().is_ok_and(|o| o.status.success());
                if !ok {
                    return None;
                }
                times.push(t.elapsed().as_secs_f64());
            }
            Some(median(times))
        })
        .flatten();
    if !cfg.keep {
        let _ = fs::remove_file(&path);
    }
    Ok(ThinRow { open_secs: median(times), table_bytes, rss_bytes, qemu_secs })
}
