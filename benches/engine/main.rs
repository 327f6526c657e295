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
//!
//! The code, lowest first: `scratch.rs` (settings, the files it works on),
//! `measure.rs` (what a run measured), `drive.rs` (the setup, and the
//! engine on a ring of its own), `baselines.rs` (fio, qemu-img and plain
//! file I/O), `load.rs` (rows under concurrent load), `report.rs` (the
//! table, the ratios and the targets), `main.rs` (the order of the rows).

mod baselines;
mod cow;
mod drive;
mod load;
mod measure;
mod qcow2;
mod report;
mod scratch;
mod thin;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use baselines::{fio, fio_beside_copy_up, fio_raw_file, fio_fresh, make_qemu_image, on_path, qemu_alloc, raw_read, scatter_step, Qemu, QemuJob};
use drive::{copy_to_sink, engine_alloc, engine_fresh, engine_rw, engine_write_tracked, open_stack, setup, Dir};
use load::{copy_under_load, disk_snapshot_stall, merge_under_writes, merge_vs_copy, read_beside_copy_up, swap_stall, CopyRows, DiskRows, HeadOfLine, UnderLoad};
use measure::{accumulate, in_turns, loadavg, Run};
use report::{Report, Row};
use scratch::{pick_alloc_size, upper_name, Cfg, Scratch, PLOOP, QEMU_IMG};

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

/// Snapshots taken in each stall row. Steady: writes over a hot set of
/// 64 clusters that each new top absorbs within a few tens of ms, snapshots
/// 500 ms apart, so a snapshot meets ordinary writes in flight (as one every
/// few minutes would in use). Storm: writes over the whole disk, snapshots
/// 50 ms apart, so every snapshot meets 32 copy-ups of the previous one.
const SWAPS: usize = 12;
const SWAP_GAP_STEADY: Duration = Duration::from_millis(500);
const SWAP_HOT_SET: u64 = 64 * MIB;
const SWAP_GAP_STORM: Duration = Duration::from_millis(50);

/// Allocations measured per call (one turn of the row): bounded by count
/// as well as by time, because deleting a file of freshly allocated
/// clusters costs far more than writing them (~0.25 ms per cluster on
/// ext4 over virtio), and that cost is paid outside the measurement.
const ALLOCS_PER_TURN: u64 = 4096;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run the engine and reference tools in alternating turns (see SLICES),
/// in the order engine, tools, tools reversed, engine, engine, tools...: a
/// disk whose rate drifts steadily, or that is slower for whoever follows
/// a turn of writes, then weighs on all alike, where the engine always
/// going first put the same side behind every time. Engine errors end the
/// bench; the tools' are reported.
fn alternate_many(
    cfg: &Cfg,
    mut engine: impl FnMut(f64) -> Res<Run>,
    tools: &mut [&mut dyn FnMut(f64) -> Res<Run>],
) -> Res<(Run, Vec<Option<Res<Run>>>)> {
    let turn = cfg.secs / SLICES as f64;
    let mut a = Run::default();
    let mut b: Vec<Option<Res<Run>>> = tools.iter().map(|_| None).collect();
    for slice in 0..SLICES {
        if slice % 2 == 1 {
            for (t, sum) in tools.iter_mut().zip(b.iter_mut()).rev() {
                accumulate(sum, t(turn));
            }
        }
        a.add(&engine(turn)?);
        if slice % 2 == 0 {
            for (t, sum) in tools.iter_mut().zip(b.iter_mut()) {
                accumulate(sum, t(turn));
            }
        }
    }
    Ok((a, b))
}

fn alternate(
    cfg: &Cfg,
    engine: impl FnMut(f64) -> Res<Run>,
    tool: Option<&mut dyn FnMut(f64) -> Res<Run>>,
) -> Res<(Run, Option<Res<Run>>)> {
    match tool {
        Some(t) => alternate_many(cfg, engine, &mut [t]).map(|(a, mut b)| (a, b.remove(0))),
        None => alternate_many(cfg, engine, &mut []).map(|(a, _)| (a, None)),
    }
}

/// A row's engine and fio columns in alternating turns; fio only if it is
/// installed.
fn with_fio(
    cfg: &Cfg,
    have_fio: bool,
    engine: impl FnMut(f64) -> Res<Run>,
    mut fio: impl FnMut(f64) -> Res<Run>,
) -> Res<(Run, Option<Res<Run>>)> {
    alternate(cfg, engine, if have_fio { Some(&mut fio) } else { None })
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
    // (read, write, seq, qd, alloc, hol, swap, disk, copy, cow, thin, qcow2): for profiling one workload.
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

    // 4k random overwrites on the allocated image: no metadata to write, so
    // the engine should cost what fio on the raw file costs.
    for (qd, key) in [(1usize, "randwrite_4k_qd1"), (32, "randwrite_4k_qd32")].into_iter().filter(|_| want("write")) {
        let label = format!("4k randwrite QD{qd} (allocated)");
        progress(&label);
        let mut r = Row::new(key, label);
        // fio also on the separate raw file, in the same turns: how much
        // where a file lies moves the disk's rate.
        let engine = |s| engine_rw(&cfg, &ploop, false, Dir::Write, K4, qd, false, secs(s));
        let (mut same_blocks, mut raw_file) = (|s| fio(&cfg, "randwrite", K4, qd, s), |s| fio_raw_file(&cfg, "randwrite", K4, qd, s));
        let (e, mut f) = if have_fio { alternate_many(&cfg, engine, &mut [&mut same_blocks, &mut raw_file])? } else { alternate_many(&cfg, engine, &mut [])? };
        r.engine = Some(e);
        if have_fio {
            r.fio_raw_file = f.pop().flatten();
            r.fio = f.pop().flatten();
        }
        if qemu_img_ok && qd == 32 {
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
        let (e, f) = with_fio(
            &cfg,
            have_fio,
            |s| engine_rw(&cfg, &ploop, dir == Dir::Read, dir, MIB as usize, SEQ_QD, true, secs(s)),
            |s| fio(&cfg, rw, MIB as usize, SEQ_QD, s),
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
        let (e, f) = with_fio(
            &cfg,
            have_fio,
            |s| engine_rw(&cfg, &ploop, true, Dir::Read, K4, qd, false, secs(s)),
            |s| fio(&cfg, "randread", K4, qd, s),
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
        let (e, f) = with_fio(&cfg, have_fio, |s| engine_fresh(&cfg, s), |s| fio_fresh(&cfg, s))?;
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
        let mut merge = merge_vs_copy(&cfg)?;
        let again = merge_vs_copy(&cfg)?;
        merge.merge.add(&again.merge);
        merge.copy.add(&again.copy);
        merge.moved += again.moved;
        merge.top += again.top;
        let under_writes = merge_under_writes(&cfg)?;
        Some(DiskRows { snapshots: disk_snapshot_stall(&cfg, SWAP_GAP_STEADY, SWAPS)?, merge, under_writes })
    } else {
        None
    };
    // The write tracker's cost, a live copy's throughput, and its freeze.
    if want("copy") {
        progress("4k randwrite QD32 with and without a tracker; live copy vs raw read; copies under writes");
    }
    let copy = if want("copy") {
        let turn = secs(cfg.secs / SLICES as f64);
        let (untracked, tracked) = in_turns(SLICES, || Ok((engine_write_tracked(&cfg, false, turn)?, engine_write_tracked(&cfg, true, turn)?)))?;
        let (copy, raw) = in_turns(2, || {
            let stack = open_stack(&ploop, true)?;
            let (run, _) = copy_to_sink(&stack)?;
            drop(stack);
            let raw = raw_read(&cfg, run.bytes)?;
            Ok((run, raw))
        })?;
        Some(CopyRows { untracked, tracked, copy, raw, under_load: copy_under_load(&cfg, 3)? })
    } else {
        None
    };
    // Copy-on-write against a qcow2 overlay served by qemu-img bench.
    if want("cow") {
        progress("copy-on-write: 4k QD1/QD32 and 1M QD4 into a fresh top, without and with flushes, vs a qcow2 overlay");
    }
    let cow = if want("cow") { Some(cow::cow_rows(&cfg, &q, have_qemu)?) } else { None };
    // Opening a 64 TiB thin disk with 1 GiB written.
    if want("thin") {
        progress("opening a 64 TiB thin disk with 1 GiB written, vs qemu-img info");
    }
    let thin = if want("thin") { Some(thin::thin_open(&cfg, have_qemu)?) } else { None };
    // Reads through a QCOW2 base, uncompressed and compressed, vs qemu-img.
    if want("qcow2") {
        progress("reads through a QCOW2 base (uncompressed, zlib): 4k randread QD32 and 1M seqread QD4, vs qemu-img bench");
    }
    let qcow2 = if want("qcow2") { qcow2::qcow2_rows(&cfg, q.aio, have_qemu)? } else { None };
    let load = UnderLoad { hol, swap, disk, copy, cow, thin, qcow2 };
    let total_secs = t_all.elapsed().as_secs_f64();
    Report { cfg: &cfg, rows: &rows, load: &load, q: &q, have_fio, have_qemu, qemu_img_what: &qemu_img_what, total_secs }.print();
    Ok(())
}
