//! The report: the table of rows, the rows under load, what each column
//! measured, the targets, and the same as one line of JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::baselines::Qemu;
use crate::load::UnderLoad;
use crate::measure::{loadavg, percentile_us, round1, round3, Run};
use crate::scratch::Cfg;
use crate::{Res, CLUSTER, DEEP, MIB, SEQ_QD, SLICES, SWAP_GAP_STEADY, SWAP_GAP_STORM, SWAP_HOT_SET};

pub struct Row {
    pub key: &'static str,
    pub label: String,
    pub engine: Option<Run>,
    pub fio: Option<Res<Run>>,
    /// fio on the separate raw file of the same data (rows that show how
    /// much placement moves the disk).
    pub fio_raw_file: Option<Res<Run>>,
    pub qemu: Option<Res<Run>>,
    /// What the qemu column measured, if it differs from the row label.
    pub qemu_what: Option<String>,
}

impl Row {
    pub fn new(key: &'static str, label: impl Into<String>) -> Row {
        Row { key, label: label.into(), engine: None, fio: None, fio_raw_file: None, qemu: None, qemu_what: None }
    }
}

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
        Some(Ok(run)) => (fmt_iops(run.iops()), format!("{:.0}", run.mibps()), fmt_cpu(run)),
        Some(Err(_)) => ("error".into(), "-".into(), "-".into()),
        None => ("n/a".into(), "-".into(), "-".into()),
    }
}

/// CPU% and, for small requests, µs of CPU per I/O ("95/7.6").
fn fmt_cpu(run: &Run) -> String {
    match (run.cpu_pct, run.cpu_us_per_io()) {
        (Some(pct), Some(us)) if run.bytes / run.ios.max(1) <= 64 * 1024 => format!("{pct:.0}/{us:.1}"),
        (Some(pct), _) => format!("{pct:.0}"),
        _ => "-".into(),
    }
}

fn ratio(a: Option<&Run>, b: &Option<Res<Run>>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(Ok(b))) if b.iops() > 0.0 => Some(a.iops() / b.iops()),
        _ => None,
    }
}

/// Microseconds of each stall, for percentile_us.
fn stall_us(stalls: &[Duration]) -> Vec<u32> {
    stalls.iter().map(|d| d.as_micros() as u32).collect()
}

/// Everything the report reads.
pub struct Report<'a> {
    pub cfg: &'a Cfg,
    pub rows: &'a [Row],
    pub load: &'a UnderLoad,
    pub q: &'a Qemu,
    pub have_fio: bool,
    pub have_qemu: bool,
    /// How qemu's image was made (empty when there is none).
    pub qemu_img_what: &'a str,
    pub total_secs: f64,
}

impl Report<'_> {
    /// The text report, then the same as one `BENCH_JSON` line.
    pub fn print(&self) {
        let mut out = String::new();
        self.table(&mut out);
        self.under_load(&mut out);
        self.cow(&mut out);
        self.qcow2(&mut out);
        self.thin(&mut out);
        self.columns(&mut out);
        let targets = self.targets(&mut out);
        let _ = writeln!(out, "  (total bench time {:.0} s, load avg now {})", self.total_secs, loadavg());
        print!("{out}");
        println!("BENCH_JSON {}", self.json(targets));
    }

    /// One line per row: the engine, fio and qemu, and the ratios.
    fn table(&self, out: &mut String) {
        let rows = self.rows;

        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<34} | {:>8} {:>7} {:>9} | {:>8} {:>7} {:>9} | {:>8} {:>7} | {:>5} {:>5}",
            "workload", "(a)IOPS", "MiB/s", "CPU%/µs", "(b)IOPS", "MiB/s", "CPU%/µs", "(c)IOPS", "MiB/s", "a/b", "a/c"
        );
        let _ = writeln!(out, "{}", "-".repeat(136));
        for r in rows {
            let e = r.engine.as_ref();
            let (ei, em, ec) = cell(&e.cloned().map(Ok));
            let (fi, fm, fc) = cell(&r.fio);
            let (qi, qm, _) = cell(&r.qemu);
            let ab = ratio(e, &r.fio).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            let ac = ratio(e, &r.qemu).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<34} | {:>8} {:>7} {:>9} | {:>8} {:>7} {:>9} | {:>8} {:>7} | {:>5} {:>5}",
                r.label, ei, em, ec, fi, fm, fc, qi, qm, ab, ac
            );
        }
        let _ = writeln!(out);
    }

    /// The rows measured under concurrent load, a few lines each.
    fn under_load(&self, out: &mut String) {
        let load = self.load;

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
        if let Some((steady, storm)) = &load.swap {
            for ((writes, stalls), what) in [
                (steady, format!("{} ms apart, writes over {} MiB", SWAP_GAP_STEADY.as_millis(), SWAP_HOT_SET / MIB)),
                (storm, format!("{} ms apart, writes over the disk", SWAP_GAP_STORM.as_millis())),
            ] {
                let us = stall_us(stalls);
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
            let us = stall_us(stalls);
            let whole_us = stall_us(whole);
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
            let (merge, copy) = (&d.merge.merge, &d.merge.copy);
            let _ = writeln!(
                out,
                "Merge of a {} MiB top into its parent over a full {} MiB base (online, twice): {} clusters copied in {:.0} ms, {:.1} MiB\n  \
                 written to storage ({:.2}x the top); raw copy of the top's bytes (8 x 1 MiB in flight, synced at the end; in turns\n  \
                 with the merge): {:.0} ms; merge time = {:.2}x the copy's",
                d.merge.top / 2 / MIB,
                d.merge.base / MIB,
                merge.ios,
                merge.secs * 1000.0,
                d.merge.moved as f64 / MIB as f64,
                d.merge.moved as f64 / d.merge.top.max(1) as f64,
                copy.secs * 1000.0,
                merge.secs / copy.secs.max(1e-9)
            );
            let u = &d.under_writes;
            let p99 = |r: &Run| r.lat_ms(99.0).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "The same merge beside 4k randwrite QD32 over a 64 MiB hot set: {} clusters copied (the top held {} when it began,\n  \
                 the hot set's among them) in {:.0} ms = {:.2}x a raw copy of as many clusters; {:.1} MiB written meanwhile (merge and\n  \
                 writes); the writes alone before it {} IOPS p99 {} ms, beside it {} IOPS p50 {} p99 {} ms ({:.2}x)",
                u.merge.ios,
                u.held_at_start,
                u.merge.secs * 1000.0,
                u.merge.secs / d.raw_copy_secs(u.merge.ios).max(1e-9),
                u.written as f64 / MIB as f64,
                fmt_iops(u.before.iops()),
                p99(&u.before),
                fmt_iops(u.during.iops()),
                u.during.lat_ms(50.0).map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                p99(&u.during),
                u.during.iops() / u.before.iops().max(1e-9)
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
    }

    /// Copy-on-write against qcow2, with the ratio and each side's rate.
    fn cow(&self, out: &mut String) {
        let Some(cow) = &self.load.cow else { return };
        let _ = writeln!(
            out,
            "Copy-on-write (each write into a fresh 1 MiB cluster of a new top over the full base; qemu: qemu-img bench on a qcow2\n  \
             overlay, 1 MiB clusters, over the same base image, -t none; flush / {}: a flush after every {} writes on both sides;\n  \
             rates summed over the turns, the ratio is the median of the turns' own ratios (lowest-highest)):",
            crate::cow::FLUSH_EVERY,
            crate::cow::FLUSH_EVERY
        );
        let ratio = |m: Option<f64>, s: Option<(f64, f64)>| match (m, s) {
            (Some(m), Some((lo, hi))) => format!("{m:.2} ({lo:.2}-{hi:.2})"),
            _ => "-".into(),
        };
        for r in cow {
            let q = r.qemu.as_ref().filter(|q| q.secs > 0.0);
            let _ = writeln!(
                out,
                "  {:<20} engine --no-link-log {:>6} w/s, with the link log (default) {:>6} w/s   qemu qcow2 {:>6} w/s   engine/qemu {}, with the link log {}",
                r.shape.what,
                fmt_iops(r.engine.iops()),
                r.logged.as_ref().map(|l| fmt_iops(l.iops())).unwrap_or_else(|| "-".into()),
                q.map(|q| fmt_iops(q.iops())).unwrap_or_else(|| "-".into()),
                ratio(r.ratio(), r.spread()),
                ratio(r.logged_ratio(), r.logged_spread()),
            );
        }
    }

    /// Reads through a QCOW2 base, with the ratio to qemu and CPU per read.
    fn qcow2(&self, out: &mut String) {
        let Some(rows) = &self.load.qcow2 else { return };
        let _ = writeln!(
            out,
            "Reads through a QCOW2 base (the engine serving the image as the bottom of a stack; qemu: qemu-img bench -t writeback\n  \
             on the same file, 4k reads strided; 64 KiB clusters; page cache dropped before each turn of either side):"
        );
        for r in rows {
            let q = r.qemu.as_ref().filter(|q| q.secs > 0.0);
            let _ = writeln!(
                out,
                "  {:<32} engine {:>7} IOPS ({:>6.1} MiB/s, {} us CPU/IO)   qemu {:>7} IOPS   engine/qemu {}",
                r.what,
                fmt_iops(r.engine.iops()),
                r.engine.mibps(),
                r.engine.cpu_us_per_io().map_or("-".into(), |c| format!("{c:.1}")),
                q.map(|q| fmt_iops(q.iops())).unwrap_or_else(|| "-".into()),
                q.map(|q| format!("{:.2}", r.engine.iops() / q.iops().max(1e-9))).unwrap_or_else(|| "-".into())
            );
        }
    }

    /// Opening a thin disk: time, table memory, resident growth.
    fn thin(&self, out: &mut String) {
        let Some(t) = &self.load.thin else { return };
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let flat = crate::thin::THIN_SIZE / crate::CLUSTER * 4;
        let _ = writeln!(
            out,
            "Thin disk open (64 TiB, 1 MiB clusters, 1 GiB written one cluster per 64 GiB; writable open, median of 5):\n  \
             engine {:.1} ms, tables {:.2} MiB (a flat table: {:.0} MiB), resident growth {:.1} MiB; qemu-img info {}",
            t.open_secs * 1000.0,
            mib(t.table_bytes),
            mib(flat),
            mib(t.rss_bytes),
            t.qemu_secs.map(|q| format!("{:.1} ms (engine/qemu time {:.2})", q * 1000.0, t.open_secs / q.max(1e-9))).unwrap_or_else(|| "-".into())
        );
    }

    /// What each column measured, and the tools' notes and errors.
    fn columns(&self, out: &mut String) {
        let &Report { cfg, rows, q, have_fio, have_qemu, qemu_img_what, .. } = self;

        let _ = writeln!(out);
        let _ = writeln!(out, "What each column measured:");
        let _ = writeln!(
            out,
            "  (a) engine: the daemon's request path (Stack::read/Stack::write, one task per request in flight, the engine's\n      I/O as SQEs on one io_uring, each handed to the kernel when queued, as fio does), O_DIRECT, on a\n      fully written ploop image (random rows: uniform random offsets; seq rows: ascending, wrapping).\n      CPU% = this process (all threads) per wall second; /µs = µs of CPU per I/O (rows of requests up to 64 KiB)."
        );
        if have_fio {
            let _ = writeln!(
                out,
                "  (b) fio: ioengine=io_uring direct=1 norandommap, same bs/iodepth, on the image file's data area (--offset\n      past its header and table): the disk blocks the engine uses, since where a file lies moves the disk's rate.\n      (a) and (b) take {SLICES} turns each (a b a b ..., {:.2} s per turn) so drift in the machine hits both alike;\n      the depth-16 stack takes its turns between them.",
                cfg.secs / SLICES as f64
            );
            for r in rows {
                let placed = r.fio.as_ref().and_then(|f| f.as_ref().ok()).and_then(|same| ratio(Some(same), &r.fio_raw_file));
                if let (Some(Ok(raw)), Some(a), Some(placed)) = (&r.fio_raw_file, ratio(r.engine.as_ref(), &r.fio_raw_file), placed) {
                    let _ = writeln!(
                        out,
                        "      {}: fio on the separate raw file of the same data, in the same turns: {} IOPS; a/that {a:.2},\n        fio on the image's blocks / fio on the raw file {placed:.2} (placement, not the engine)",
                        r.label,
                        fmt_iops(raw.iops()),
                    );
                }
            }
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
            for (tool, res) in [("fio", &r.fio), ("fio on the raw file", &r.fio_raw_file), ("qemu", &r.qemu)] {
                if let Some(Err(e)) = res {
                    let _ = writeln!(out, "  {tool} error on {}: {e}", r.label);
                }
            }
        }
    }

    /// The targets with their verdicts; returns them keyed for the JSON.
    fn targets(&self, out: &mut String) -> Map<String, Value> {
        let &Report { rows, load, .. } = self;

        let find = |key: &str| rows.iter().find(|r| r.key == key);
        // (JSON key, label, measured ratio, target)
        let mut targets: Vec<(&str, String, Option<f64>, f64)> = Vec::new();
        for (key, what, goal) in [
            ("randread_4k_qd32", "4k randread QD32 a/b", 0.90),
            ("randwrite_4k_qd1", "4k randwrite QD1 (allocated) a/b", 1.0),
            ("randwrite_4k_qd32", "4k randwrite QD32 (allocated) a/b", 1.0),
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
            "merge of a 64 MiB top: raw copy time / merge time (<= 1.2x the copy)".into(),
            load.disk.as_ref().map(|d| d.merge.copy.secs / d.merge.merge.secs.max(1e-9)),
            1.0 / 1.2,
        ));
        targets.push((
            "merge_beside_writes_vs_copy",
            "the same beside 4k writes: raw copy of as many clusters / merge time (<= 1.2x)".into(),
            load.disk.as_ref().map(|d| d.raw_copy_secs(d.under_writes.merge.ios) / d.under_writes.merge.secs.max(1e-9)),
            1.0 / 1.2,
        ));
        targets.push((
            "merge_beside_writes_copied_once",
            "the same: clusters the top held / clusters copied (none copied twice)".into(),
            load.disk.as_ref().map(|d| d.under_writes.held_at_start as f64 / d.under_writes.merge.ios.max(1) as f64),
            1.0,
        ));
        targets.push((
            "merge_moved",
            "merge of a 64 MiB top: 70 MiB / bytes written (<= 70 MiB per 64 MiB of top)".into(),
            load.disk.as_ref().map(|d| d.merge.top as f64 * 70.0 / 64.0 / d.merge.moved.max(1) as f64),
            1.0,
        ));
        // Copy-on-write at equal durability must at least match qcow2;
        // without flushes the engine keeps acknowledged writes through a
        // kill -9 and qcow2 does not, so those rows are a report.
        for r in load.cow.iter().flatten().filter(|r| r.shape.flush_every.is_some()) {
            targets.push((
                r.shape.key,
                format!("copy-on-write {} engine --no-link-log/qcow2", r.shape.what),
                r.ratio(),
                1.0,
            ));
            targets.push((
                r.shape.logged_key,
                format!("copy-on-write {} engine (link log, the default)/qcow2", r.shape.what),
                r.logged_ratio(),
                1.0,
            ));
        }
        targets.push((
            "thin_open_time",
            "open of a 64 TiB thin disk, 1 GiB written: 100 ms / open time".into(),
            load.thin.as_ref().map(|t| 0.1 / t.open_secs.max(1e-9)),
            1.0,
        ));
        targets.push((
            "thin_open_tables",
            "the same: 64 MiB / memory of its tables".into(),
            load.thin.as_ref().map(|t| (64u64 << 20) as f64 / t.table_bytes.max(1) as f64),
            1.0,
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
        let mut tj = Map::new();
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
            let p99 = stalls.and_then(|s| percentile_us(&stall_us(s), 99.0)).map(|us| us / 1000.0);
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
        tj
    }

    /// The whole run as JSON, for tools that keep results.
    fn json(&self, tj: Map<String, Value>) -> Value {
        let &Report { cfg, rows, load, q, have_fio, have_qemu, qemu_img_what, total_secs } = self;

        let mut rj = Map::new();
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
                    "fio_raw_file": res(&r.fio_raw_file),
                    "qemu": res(&r.qemu),
                    "qemu_workload": r.qemu_what,
                }),
            );
        }
        json!({
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
                "merge": d.merge.merge.to_json(),
                "raw_copy": d.merge.copy.to_json(),
                "merge_moved_bytes": d.merge.moved,
                "merge_top_bytes": d.merge.top,
                "merge_under_writes": d.under_writes.merge.to_json(),
                "writes_before_merge": d.under_writes.before.to_json(),
                "writes_during_merge": d.under_writes.during.to_json(),
                "under_writes_written_bytes": d.under_writes.written,
                "under_writes_top_clusters_at_start": d.under_writes.held_at_start,
            })),
            "cow": load.cow.as_ref().map(|rows| rows.iter().map(|r| (r.shape.key.to_string(), json!({
                "engine": r.engine.to_json(),
                "qemu_qcow2": r.qemu.as_ref().map(|q| q.to_json()),
                "turn_ratios": r.turn_ratios,
                "median_ratio": r.ratio(),
                "engine_link_log": r.logged.as_ref().map(|l| l.to_json()),
                "link_log_turn_ratios": r.logged_ratios,
                "link_log_median_ratio": r.logged_ratio(),
            }))).collect::<Map<String, Value>>()),
            "qcow2": load.qcow2.as_ref().map(|rows| rows.iter().map(|r| (r.key.clone(), json!({
                "engine": r.engine.to_json(),
                "qemu": r.qemu.as_ref().map(|q| q.to_json()),
            }))).collect::<Map<String, Value>>()),
            "thin": load.thin.as_ref().map(|t| json!({
                "open_ms": round3(t.open_secs * 1000.0),
                "table_bytes": t.table_bytes,
                "rss_growth_bytes": t.rss_bytes,
                "qemu_info_ms": t.qemu_secs.map(|q| round3(q * 1000.0)),
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
        })
    }
}
