//! Randomised, seeded, model-based test of the layered engine.
//!
//! A stack of 1 to 16 layers is driven with reads, writes, write-zeroes,
//! discards, snapshots (new top layer), flushes, clean reopens and unclean
//! reopens, at random block-aligned offsets and lengths, and every read is
//! compared with an in-memory model of the disk. A mismatch names the seed;
//! rerun one seed with UBLK_PLOOP_MODEL_SEED=N. UBLK_PLOOP_MODEL_SEEDS sets
//! how many seeds run (default 48); UBLK_PLOOP_KEEP_TMP=1 keeps the images.

mod common;

use std::path::PathBuf;

use common::{assert_clean_driving, assert_reads, assert_reads_all, for_each_seed, AnyIo, Rng, TempDir};
use ublk_ploop::io::{block_on, AlignedBuf, Direct, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{LayerSpec, Stack, StackOptions};

/// What the disk must read as, and which clusters the top layer and the
/// layers below it hold (needed for discard, whose effect depends on it).
struct Model {
    data: Vec<u8>,
    cluster: u64,
    top_has: Vec<bool>,
    lower_has: Vec<bool>,
}

impl Model {
    fn clusters(&self, off: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        (off / self.cluster) as usize..=((off + len - 1) / self.cluster) as usize
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.data[off as usize..off as usize + data.len()].copy_from_slice(data);
        for c in self.clusters(off, data.len() as u64) {
            self.top_has[c] = true;
        }
    }
    fn write_zeroes(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
        for c in self.clusters(off, len) {
            // Zeroing over lower data needs a top cluster to hide it.
            self.top_has[c] |= self.lower_has[c];
        }
    }
    fn discard(&mut self, off: u64, len: u64) {
        // Only what the top holds is released (and then reads as zeros).
        for c in self.clusters(off, len) {
            if self.top_has[c] {
                let start = (c as u64 * self.cluster).max(off);
                let end = ((c as u64 + 1) * self.cluster).min(off + len);
                self.data[start as usize..end as usize].fill(0);
            }
        }
    }
    fn push_layer(&mut self) {
        for (l, t) in self.lower_has.iter_mut().zip(self.top_has.iter_mut()) {
            *l |= *t;
            *t = false;
        }
    }
}

/// The layers, with the base declared raw when it is one.
fn specs(paths: &[PathBuf], raw_base: bool) -> Vec<LayerSpec> {
    paths.iter().enumerate().map(|(i, p)| if i == 0 && raw_base { LayerSpec::raw(p) } else { LayerSpec::ploop(p) }).collect()
}

fn open(io: &AnyIo, paths: &[PathBuf], raw_base: bool) -> Stack {
    io.run(Stack::open_layers(io, &specs(paths, raw_base), &StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None })).unwrap().0
}

fn verify_range(stack: &Stack, io: &AnyIo, model: &Model, off: u64, len: usize, ctx: &str) {
    assert_reads(stack, io, &model.data, off, len, ctx)
}

fn verify_all(stack: &Stack, io: &AnyIo, model: &Model, ctx: &str) {
    assert_reads_all(stack, io, &model.data, 1 << 20, ctx)
}

fn run_seed(seed: u64) {
    let mut rng = Rng::new(seed);
    let dir = TempDir::new(&format!("model-{seed}"));
    let cluster = [4096u64, 65536, 1 << 20][rng.below(3) as usize];
    let clusters = 4 + rng.below(28);
    // A partial last cluster sometimes, kept 4 KiB aligned for O_DIRECT.
    let size = if cluster > 4096 && rng.chance(30) { (clusters - 1) * cluster + 4096 * (1 + rng.below(cluster / 4096 - 1)) } else { clusters * cluster };
    let max_depth = 1 + rng.below(16) as usize;
    let raw_base = rng.chance(20);
    // The syscalls, the ring, and the ring's zero-copy path (requests in a
    // registered buffer) in turn.
    let io = AnyIo::new(["sync", "uring", "fixed"][(seed % 3) as usize]);
    let ctx = format!("seed {seed} (cluster {cluster}, size {size}, depth<={max_depth}, raw base {raw_base}, backend {})", io.name());

    let base = dir.join("layer0.img");
    if raw_base {
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(size).unwrap();
    } else {
        block_on(PloopLayer::create(&SyncIo, &base, size, cluster)).unwrap();
    }
    let mut paths = vec![base];
    let mut stack = open(&io, &paths, raw_base);
    // A stack with no ploop layer uses the default cluster size; layers
    // pushed on top of it inherit the stack's.
    let cluster = stack.cluster_size();
    let nclusters = size.div_ceil(cluster) as usize;
    let mut model = Model { data: vec![0; size as usize], cluster, top_has: vec![raw_base; nclusters], lower_has: vec![false; nclusters] };
    let block = stack.block_size() as u64;
    assert!(block <= 4096, "{ctx}: unexpected O_DIRECT block {block}");

    let ops = 250;
    for step in 0..ops {
        let ctx = format!("{ctx}, step {step}");
        // Requests of up to three clusters, block aligned.
        let max_len = (3 * cluster).min(size);
        let len = block * (1 + rng.below(max_len / block));
        let off = block * rng.below((size - len) / block + 1);
        let pick = rng.below(100);
        if std::env::var_os("UBLK_PLOOP_MODEL_TRACE").is_some() {
            eprintln!("step {step}: op {pick} at {off}+{len} (depth {})", paths.len());
        }
        match pick {
            0..=34 => {
                let mut data = AlignedBuf::zeroed(len as usize);
                let fill = (rng.next_u64() as u8).max(1);
                data.iter_mut().enumerate().for_each(|(i, b)| *b = fill.wrapping_add((i / 512) as u8));
                io.request_write(&stack, off, &data).unwrap_or_else(|e| panic!("{ctx}: write failed: {e}"));
                model.write(off, &data);
            }
            35..=59 => verify_range(&stack, &io, &model, off, len as usize, &ctx),
            60..=69 => {
                io.run(stack.write_zeroes(&io, off, len as usize)).unwrap_or_else(|e| panic!("{ctx}: write_zeroes: {e}"));
                model.write_zeroes(off, len);
            }
            70..=79 => {
                io.run(stack.discard(&io, off, len as usize)).unwrap_or_else(|e| panic!("{ctx}: discard: {e}"));
                model.discard(off, len);
            }
            80..=85 if paths.len() < max_depth => {
                let next = dir.join(&format!("layer{}.img", paths.len()));
                io.run(stack.push_layer(&io, &next)).unwrap_or_else(|e| panic!("{ctx}: push_layer: {e}"));
                paths.push(next);
                model.push_layer();
                assert_eq!(stack.depth(), paths.len());
            }
            86..=89 => io.run(stack.flush(&io)).unwrap_or_else(|e| panic!("{ctx}: flush: {e}")),
            90..=94 => {
                io.run(stack.close(&io)).unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
                drop(stack);
                stack = open(&io, &paths, raw_base);
            }
            95..=97 => {
                // The process dies (no close, no flush): every completed
                // write was acknowledged, so none may be lost, and reopening
                // must accept the in-use mark and the grown-ahead tail.
                drop(stack);
                stack = open(&io, &paths, raw_base);
            }
            _ => verify_all(&stack, &io, &model, &ctx),
        }
        if std::env::var_os("UBLK_PLOOP_MODEL_TRACE").is_some() {
            verify_all(&stack, &io, &model, &format!("{ctx}, traced"));
        }
    }
    verify_all(&stack, &io, &model, &format!("{ctx}, final"));
    io.run(stack.close(&io)).unwrap();
    drop(stack);

    // Independent checks on the files: our checker and qemu-img's.
    for spec in specs(&paths, raw_base) {
        let path = &spec.path;
        assert_clean_driving(path, spec.format, &ctx, &|| io.settle());
    }
    // Reopen read-only and verify once more: what close wrote is what we read.
    let (ro, _) = io.run(Stack::open_layers(&io, &specs(&paths, raw_base), &StackOptions { read_only: true, direct: Direct::Auto, offline: false, link_log: None })).unwrap();
    verify_all(&ro, &io, &model, &format!("{ctx}, after close"));
}

#[test]
fn random_operations_match_the_model() {
    for_each_seed("MODEL", 48, run_seed);
}
