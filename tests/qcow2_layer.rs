//! A QCOW2 image as the read-only base of a stack (issue #22), with
//! qemu as the oracle: images qemu-img and qemu-io make (cluster sizes
//! 512 B to 2 MiB, extended L2, compressed with zlib or zstd, a backing
//! chain) serve as the bottom of a ploop stack driven by random writes,
//! write-zeroes, discards, snapshots, merges (into the ploop layers, and
//! the QCOW2 base merged up and dropped), clean and unclean reopens. Every
//! read is compared with a model that starts as `qemu-img convert -O raw`
//! of the base; the QCOW2 files never change. Seeds as in `model.rs`:
//! UBLK_PLOOP_QCOW2_MODEL_SEED=N replays one, UBLK_PLOOP_QCOW2_MODEL_SEEDS=N
//! runs N (default 12).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_clean, assert_clean_driving, assert_reads, assert_reads_all, for_each_seed, ploop, retry_busy, AnyIo, Rng, TempDir};
use ublk_ploop::io::{block_on, AlignedBuf, Direct, SyncIo};
use ublk_ploop::layers::{Format, PloopLayer};
use ublk_ploop::{LayerSpec, Stack, StackOptions};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Random writes (patterns and zeros) through qemu-io, at 512-byte
/// granularity so that they straddle clusters and subclusters.
fn scribble(rng: &mut Rng, img: &Path, size: u64, writes: usize) {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for _ in 0..writes {
        let len = 512 * (1 + rng.below(600));
        let off = 512 * rng.below((size - len) / 512 + 1);
        let cmd = if rng.chance(15) { format!("write -z {off} {len}") } else { format!("write -P {} {off} {len}", 1 + rng.below(254)) };
        args.extend(["-c".into(), cmd]);
    }
    args.push(img.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run("qemu-io", &args);
}

/// A QCOW2 base of `size` bytes as qemu makes them; returns it and every
/// file of its chain (to prove they never change), and a description.
fn make_base(rng: &mut Rng, dir: &TempDir, size: u64) -> (PathBuf, Vec<PathBuf>, String) {
    let cluster = [512u64, 4096, 65536, 2 << 20][rng.below(4) as usize];
    let extended = cluster >= 16384 && rng.chance(40);
    let mut opts = format!("cluster_size={cluster}");
    if extended {
        opts += ",extended_l2=on";
    }
    let size_s = size.to_string();
    let lower = dir.join("lower.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opts, lower.to_str().unwrap(), &size_s]);
    scribble(rng, &lower, size, 12);
    let mut what = format!("qcow2 cluster {cluster}, extended L2 {extended}");
    let base = if rng.chance(35) {
        // An overlay over `lower`: its unallocated parts read from there.
        let top = dir.join("base.qcow2");
        let mut o = opts.clone();
        o += &format!(",backing_file={},backing_fmt=qcow2", lower.display());
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, top.to_str().unwrap(), &size_s]);
        scribble(rng, &top, size, 6);
        what += ", over a backing file";
        top
    } else if rng.chance(50) && !extended {
        let kind = ["zlib", "zstd"][rng.below(2) as usize];
        let packed = dir.join("packed.qcow2");
        let o = format!("{opts},compression_type={kind}");
        run("qemu-img", &["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", &o, lower.to_str().unwrap(), packed.to_str().unwrap()]);
        what += &format!(", compressed with {kind}");
        packed
    } else {
        lower.clone()
    };
    let mut files = vec![base.clone()];
    if base != lower {
        files.push(lower);
    }
    (base, files, what)
}

fn oracle(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("oracle.raw");
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// The disk, and which clusters each layer holds (a QCOW2 base: all).
struct Model {
    data: Vec<u8>,
    cluster: u64,
    has: Vec<Vec<bool>>,
}

impl Model {
    fn clusters(&self, off: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        (off / self.cluster) as usize..=((off + len - 1) / self.cluster) as usize
    }
    fn below_top(&self, c: usize) -> bool {
        self.has[..self.has.len() - 1].iter().any(|h| h[c])
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.data[off as usize..off as usize + data.len()].copy_from_slice(data);
        for c in self.clusters(off, data.len() as u64) {
            self.has.last_mut().unwrap()[c] = true;
        }
    }
    fn write_zeroes(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
        for c in self.clusters(off, len) {
            let below = self.below_top(c);
            self.has.last_mut().unwrap()[c] |= below;
        }
    }
    fn discard(&mut self, off: u64, len: u64) {
        for c in self.clusters(off, len) {
            if self.has.last().unwrap()[c] {
                let start = (c as u64 * self.cluster).max(off);
                let end = ((c as u64 + 1) * self.cluster).min(off + len);
                self.data[start as usize..end as usize].fill(0);
            }
        }
    }
    /// The top's parent merged into the top and dropped.
    fn merge_parent(&mut self) {
        let n = self.has.len();
        let parent = self.has.remove(n - 2);
        for (t, p) in self.has.last_mut().unwrap().iter_mut().zip(parent) {
            *t |= p;
        }
    }
}

fn specs(paths: &[(PathBuf, Format)]) -> Vec<LayerSpec> {
    paths.iter().map(|(path, format)| LayerSpec { path: path.clone(), format: *format }).collect()
}

/// Opened again right after a drop, an image's lock may still be held by
/// a child another test thread is spawning (qemu-img): `retry_busy`.
fn open(io: &AnyIo, paths: &[(PathBuf, Format)], read_only: bool) -> Stack {
    let opts = StackOptions { read_only, direct: Direct::Auto, offline: false, link_log: None };
    retry_busy(|| io.run(Stack::open_layers(io, &specs(paths), &opts))).unwrap_or_else(|e| panic!("opening {paths:?}: {e}")).0
}

fn verify(stack: &Stack, io: &AnyIo, model: &Model, off: u64, len: usize, ctx: &str) {
    assert_reads(stack, io, &model.data, off, len, ctx)
}

fn verify_all(stack: &Stack, io: &AnyIo, model: &Model, ctx: &str) {
    // Pieces that do not line up with any cluster size.
    assert_reads_all(stack, io, &model.data, 3 * 65536 + 4096, ctx)
}

fn run_seed(seed: u64) {
    let mut rng = Rng::new(seed);
    let dir = TempDir::new(&format!("qcow2-model-{seed}"));
    let size = (2 + rng.below(5)) << 20;
    let (base, chain, what) = make_base(&mut rng, &dir, size);
    let sums: Vec<Vec<u8>> = chain.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let cluster = [65536u64, 1 << 20][rng.below(2) as usize];
    let io = AnyIo::new(["sync", "uring", "fixed"][(seed % 3) as usize]);
    let ctx = format!("seed {seed} ({what}, disk {size}, ploop cluster {cluster}, backend {})", io.name());

    let mut names = 1;
    let top = dir.join("layer1.hds");
    block_on(PloopLayer::create(&SyncIo, &top, size, cluster)).unwrap();
    let mut paths = vec![(base.clone(), Format::Qcow2), (top, Format::Ploop)];
    let mut stack = open(&io, &paths, false);
    assert_eq!(stack.cluster_size(), cluster, "{ctx}: the ploop top sets the stack's cluster size");
    let nclusters = size.div_ceil(cluster) as usize;
    let mut model = Model { data: oracle(&base), cluster, has: vec![vec![true; nclusters], vec![false; nclusters]] };
    verify_all(&stack, &io, &model, &format!("{ctx}, as qemu reads it"));

    let block = stack.block_size() as u64;
    for step in 0..120 {
        let ctx = format!("{ctx}, step {step}");
        let max_len = (3 * cluster).min(size);
        let len = block * (1 + rng.below(max_len / block));
        let off = block * rng.below((size - len) / block + 1);
        match rng.below(100) {
            0..=34 => {
                let data = common::pattern(rng.next_u64(), len as usize);
                let mut buf = AlignedBuf::zeroed(len as usize);
                buf.copy_from_slice(&data);
                io.request_write(&stack, off, &buf).unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
                model.write(off, &buf);
            }
            35..=59 => verify(&stack, &io, &model, off, len as usize, &ctx),
            60..=66 => {
                io.run(stack.write_zeroes(&io, off, len as usize)).unwrap_or_else(|e| panic!("{ctx}: write_zeroes: {e}"));
                model.write_zeroes(off, len);
            }
            67..=73 => {
                io.run(stack.discard(&io, off, len as usize)).unwrap_or_else(|e| panic!("{ctx}: discard: {e}"));
                model.discard(off, len);
            }
            74..=79 if paths.len() < 5 => {
                names += 1;
                let next = dir.join(&format!("layer{names}.hds"));
                io.run(stack.push_layer(&io, &next)).unwrap_or_else(|e| panic!("{ctx}: push_layer: {e}"));
                paths.push((next, Format::Ploop));
                model.has.push(vec![false; nclusters]);
            }
            80..=83 if paths.len() > 2 || (paths.len() == 2 && rng.chance(25)) => {
                // Merge the top's parent up; with two layers that is the
                // QCOW2 base itself (a clone standing alone).
                let parent = paths.len() - 2;
                io.run(stack.merge_parent_into_top(&io, 4, &|_, _| {})).unwrap_or_else(|e| panic!("{ctx}: merge: {e}"));
                io.run(stack.remove_layer(parent)).unwrap_or_else(|e| panic!("{ctx}: remove_layer: {e}"));
                paths.remove(parent);
                model.merge_parent();
                verify_all(&stack, &io, &model, &format!("{ctx}, after merging layer {parent}"));
            }
            84..=87 => io.run(stack.flush(&io)).unwrap_or_else(|e| panic!("{ctx}: flush: {e}")),
            88..=92 => {
                io.run(stack.close(&io)).unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
                drop(stack);
                stack = open(&io, &paths, false);
            }
            93..=95 => {
                drop(stack);
                stack = open(&io, &paths, false);
            }
            _ => verify_all(&stack, &io, &model, &ctx),
        }
    }
    verify_all(&stack, &io, &model, &format!("{ctx}, final"));
    io.run(stack.close(&io)).unwrap();
    drop(stack);
    for (path, format) in &paths {
        if *format == Format::Ploop {
            assert_clean_driving(path, *format, &ctx, &|| io.settle());
        }
    }
    let ro = open(&io, &paths, true);
    verify_all(&ro, &io, &model, &format!("{ctx}, read-only after close"));
    for (file, before) in chain.iter().zip(&sums) {
        assert!(std::fs::read(file).unwrap() == *before, "{ctx}: {} changed", file.display());
    }
}

#[test]
fn a_ploop_stack_over_qcow2_bases_matches_the_model() {
    for_each_seed("QCOW2_MODEL", 12, run_seed);
}

/// A merge of the QCOW2 base up into the top copies only the clusters
/// the base stores something for (plainly, compressed, or in its backing
/// file): its holes and zero clusters stay holes.
#[test]
fn merging_a_qcow2_base_up_copies_only_what_it_stores() {
    for variant in ["plain", "compressed", "overlay"] {
        let dir = TempDir::new("qcow2-merge-up");
        let size = 64u64 << 20;
        let made = dir.join("made.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", made.to_str().unwrap(), &size.to_string()]);
        // Data in 3 of the 64 clusters of the stack, a zero cluster in a 4th.
        let mut args = vec!["-f", "qcow2"];
        let cmds = ["write -P 7 0 4096", "write -P 8 20M 1M", "write -P 9 40M 65536", "write -z 50M 1M"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(made.to_str().unwrap());
        run("qemu-io", &args);
        let base = match variant {
            "plain" => made.clone(),
            "compressed" => {
                let packed = dir.join("packed.qcow2");
                run("qemu-img", &["convert", "-c", "-f", "qcow2", "-O", "qcow2", made.to_str().unwrap(), packed.to_str().unwrap()]);
                packed
            }
            _ => {
                let over = dir.join("over.qcow2");
                let o = format!("backing_file={},backing_fmt=qcow2", made.display());
                run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, over.to_str().unwrap()]);
                over
            }
        };
        let top = dir.join("top.hds");
        block_on(PloopLayer::create(&SyncIo, &top, size, 1 << 20)).unwrap();
        let io = AnyIo::new("sync");
        let stack = open(&io, &[(base.clone(), Format::Qcow2), (top.clone(), Format::Ploop)], false);
        let copied = io.run(stack.merge_parent_into_top(&io, 4, &|_, _| {})).unwrap();
        assert_eq!(copied, 3, "{variant}: only the clusters holding data are copied");
        io.run(stack.remove_layer(0)).unwrap();
        let want = oracle(&base);
        let got = common::read_disk(&stack, &io, 1 << 20);
        assert!(got == want, "{variant}: the disk reads the same without its base");
        io.run(stack.close(&io)).unwrap();
        let bytes = std::fs::metadata(&top).unwrap().len();
        assert!(bytes < 8 << 20, "{variant}: the top holds 3 clusters, not the disk: {bytes} bytes");
    }
}

#[test]
fn a_qcow2_image_is_read_only_and_only_the_bottom() {
    let dir = TempDir::new("qcow2-rules");
    let size = 8u64 << 20;
    let q = dir.join("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), &size.to_string()]);
    let p = dir.join("top.hds");
    block_on(PloopLayer::create(&SyncIo, &p, size, 1 << 20)).unwrap();
    let io = AnyIo::new("sync");
    let try_open = |layers: &[(PathBuf, Format)], ro: bool| {
        io.run(Stack::open_layers(&io, &specs(layers), &StackOptions { read_only: ro, direct: Direct::Auto, offline: false, link_log: None })).err().map(|e| e.to_string())
    };
    let top = try_open(&[(q.clone(), Format::Qcow2)], false).expect("a writable QCOW2 top is refused");
    assert!(top.contains("read-only") && top.contains("ploop image on it"), "{top}");
    assert!(try_open(&[(q.clone(), Format::Qcow2)], true).is_none(), "served read-only on its own");
    let q2 = dir.join("second.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", q2.to_str().unwrap(), &size.to_string()]);
    let mid = try_open(&[(q.clone(), Format::Qcow2), (q2, Format::Qcow2), (p.clone(), Format::Ploop)], false).expect("refused");
    assert!(mid.contains("only be the bottom"), "{mid}");
    // A top that the image also reads as its backing file.
    let over = dir.join("over.qcow2");
    let o = format!("backing_file={},backing_fmt=raw", p.display());
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, over.to_str().unwrap(), &size.to_string()]);
    // Served read-only, the two openings are named; writable, the image's
    // shared lock on its backing file already keeps the top from opening.
    let both = try_open(&[(over.clone(), Format::Qcow2), (p.clone(), Format::Ploop)], true).expect("refused");
    assert!(both.contains("also a backing file"), "{both}");
    let both = try_open(&[(over, Format::Qcow2), (p.clone(), Format::Ploop)], false).expect("refused");
    assert!(both.contains("also a backing file") || both.contains("in use"), "{both}");
    // Nothing was written: the top opened and closed cleanly or not at all.
    assert_clean(&p, Format::Ploop, "after refusals");
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A cloud image as a template, through the CLI: `clone --format qcow2`
/// makes a disk directory over it (its descriptor names it as a QCOW2
/// base), that disk takes writes and snapshots, `info`, `check` and
/// `convert` read it, `detach` copies up only what the image stores, and
/// the image never changes.
#[test]
fn a_disk_directory_cloned_from_a_qcow2_image() {
    let root = TempDir::new("qcow2-clone");
    let made = root.join("made.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", made.to_str().unwrap(), "16M"]);
    let mut args = vec!["-f", "qcow2"];
    for c in ["write -P 0x11 0 1M", "write -P 0x22 5M 100k", "write -z 9M 1M"] {
        args.extend(["-c", c]);
    }
    args.push(p(&made));
    run("qemu-io", &args);
    let cloud = root.join("cloud.qcow2");
    run("qemu-img", &["convert", "-c", "-f", "qcow2", "-O", "qcow2", p(&made), p(&cloud)]);
    let before = std::fs::read(&cloud).unwrap();
    let mut model = oracle(&cloud);

    let ct = root.join("ct");
    ploop(["clone", p(&cloud), p(&ct), "--format", "qcow2", "--cluster-size", "64K"]).ok().mentions(&["root.hds", "cloud.qcow2"]);
    let xml = std::fs::read_to_string(ct.join("DiskDescriptor.xml")).unwrap();
    assert!(xml.contains("<Type>QCOW2</Type>") && xml.contains(p(&cloud)), "{xml}");
    ploop(["clone", p(&cloud), p(&root.join("bad")), "--format", "qcow2", "-u", "{5fbaabe3-6958-40ff-92a7-860e329aab41}"])
        .expect_clean_failure()
        .mentions(&["no snapshots"]);

    // Served as a daemon opens it: writes land in the top.
    let write = |off: u64, byte: u8, model: &mut Vec<u8>| {
        let disk = ublk_ploop::disk::Disk::load(&ct).unwrap();
        let layers = block_on(disk.writable_layers(&SyncIo)).unwrap();
        let formats: Vec<Format> = layers.iter().map(|l| l.format).collect();
        assert!(formats[0] == Format::Qcow2 || formats == [Format::Ploop], "{formats:?}");
        let (stack, _) = block_on(Stack::open_layers(&SyncIo, &layers, &StackOptions { offline: true, ..Default::default() })).unwrap();
        block_on(stack.write(&SyncIo, off, &[byte; 8192])).unwrap();
        model[off as usize..off as usize + 8192].fill(byte);
        assert!(common::read_disk(&stack, &AnyIo::new("sync"), 1 << 20) == *model, "the disk reads the image and the writes");
        block_on(stack.close(&SyncIo)).unwrap();
    };
    write(4096, 0x33, &mut model);
    // A snapshot's new top is a ploop delta named after the disk's own
    // first file, not after the image.
    ploop(["snapshot", p(&ct)]).ok();
    let disk = ublk_ploop::disk::Disk::load(&ct).unwrap();
    let kinds: Vec<_> = disk.desc.images.iter().map(|i| (i.kind, i.file.clone())).collect();
    assert_eq!(kinds.len(), 3);
    assert!(kinds[2].0 == ublk_ploop::disk::ImageType::Compressed && kinds[2].1.starts_with("root.hds.{"), "{kinds:?}");
    write(8 << 20, 0x55, &mut model);
    let info = ploop(["info", p(&ct), "--json"]).ok().json();
    assert!(info.to_string().contains("qcow2"), "{info}");
    ploop(["check", p(&ct)]).ok();
    let out = root.join("flat.raw");
    ploop(["convert", p(&ct), p(&out), "--to", "raw"]).ok();
    assert!(std::fs::read(&out).unwrap() == model, "convert flattens image and top");

    // The snapshot merged away, then standing alone: 1 MiB of data and
    // 100 KiB in two 64 KiB clusters of the image, not its 16 MiB.
    ploop(["snapshot-merge", p(&ct)]).ok();
    let detached = ploop(["detach", p(&ct), "--json"]).ok().json();
    assert_eq!(detached["merged"].as_array().unwrap().len(), 1, "{detached}");
    let disk = ublk_ploop::disk::Disk::load(&ct).unwrap();
    assert_eq!(disk.desc.images.len(), 1, "one delta left");
    let top = disk.file_path(&disk.desc.images[0]);
    assert!(std::fs::metadata(&top).unwrap().len() < 3 << 20, "the top holds what the image stored");
    write(12 << 20, 0x44, &mut model);
    ploop(["check", p(&ct)]).ok();
    assert!(std::fs::read(&cloud).unwrap() == before, "the image never changes");
    if common::have_qemu() {
        common::qemu_check_clean(&top);
    }
}

/// `check` reads a QCOW2 image's tables (never writes them): clean images
/// qemu makes pass, a misaligned L2 entry is named and exits 2, and
/// --repair is refused with qemu-img's way.
#[test]
fn check_reads_a_qcow2_images_tables() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("qcow2-check");
    let img = dir.join("c.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p(&img), "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 33M 64k", p(&img)]);
    let out = ploop(["check", p(&img), "--format", "qcow2", "--json"]).ok().json();
    assert_eq!(out["verdict"], "clean", "{out}");
    assert_eq!(out["deltas"][0]["report"]["allocated_clusters"], 17, "{out}");
    // Point cluster 1's L2 entry at an offset inside a cluster.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, 40).unwrap();
    let l1 = u64::from_be_bytes(word);
    f.read_exact_at(&mut word, l1).unwrap();
    let l2 = u64::from_be_bytes(word) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&((1u64 << 63) | (0x10000 + 512)).to_be_bytes(), l2 + 8).unwrap();
    drop(f);
    let before = std::fs::read(&img).unwrap();
    let r = ploop(["check", p(&img), "--format", "qcow2"]);
    r.expect_code(2);
    r.mentions(&["L2 entry of cluster 1", "not cluster aligned"]);
    ploop(["check", p(&img), "--format", "qcow2", "--repair"]).expect_clean_failure().mentions(&["qemu-img check -r"]);
    assert!(std::fs::read(&img).unwrap() == before, "check wrote the image");
}

/// A QCOW2 image of real size with little written (1 TiB, three places,
/// one compressed) under a ploop top: reads, a copy-up, the memory the
/// stack holds for it, and merging it up copying only what it stores.
#[test]
fn a_sparse_terabyte_image_as_a_base() {
    let dir = TempDir::new("qcow2-sparse");
    let size = 1u64 << 40;
    let big = dir.join("big.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&big), "1T"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 500G 1M", "-c", "write -c -P 0x33 1020G 64k", p(&big)]);
    let before = std::fs::read(&big).unwrap();
    let top = dir.join("top.hds");
    block_on(PloopLayer::create(&SyncIo, &top, size, 1 << 20)).unwrap();
    let io = AnyIo::new("uring");
    let stack = open(&io, &[(big.clone(), Format::Qcow2), (top.clone(), Format::Ploop)], false);
    let tables = io.run(stack.table_bytes());
    assert!(tables < 16 << 20, "a 1 TiB thin base holds {tables} bytes of tables and caches");
    let read = |off: u64, len: usize| {
        let mut buf = AlignedBuf::zeroed(len);
        io.request_read(&stack, off, &mut buf).unwrap();
        buf.to_vec()
    };
    let g = 1u64 << 30;
    assert!(read(0, 65536).iter().all(|&b| b == 0x11));
    assert!(read(500 * g, 1 << 20).iter().all(|&b| b == 0x22));
    assert!(read(1020 * g, 65536).iter().all(|&b| b == 0x33), "a compressed cluster");
    assert!(read(700 * g, 1 << 20).iter().all(|&b| b == 0), "a hole");
    let mut data = AlignedBuf::zeroed(4096);
    data.fill(0x44);
    io.request_write(&stack, 500 * g + 4096, &data).unwrap();
    let got = read(500 * g, 1 << 20);
    assert!(got[..4096].iter().all(|&b| b == 0x22) && got[4096..8192].iter().all(|&b| b == 0x44) && got[8192..].iter().all(|&b| b == 0x22));
    let copied = io.run(stack.merge_parent_into_top(&io, 8, &|_, _| {})).unwrap();
    assert_eq!(copied, 2, "the clusters at 0 and 1020G; 500G was copied up by the write");
    io.run(stack.remove_layer(0)).unwrap();
    assert!(read(1020 * g, 65536).iter().all(|&b| b == 0x33) && read(0, 4096).iter().all(|&b| b == 0x11));
    io.run(stack.close(&io)).unwrap();
    assert!(std::fs::metadata(&top).unwrap().len() < 16 << 20, "the top holds 3 clusters and its table");
    assert!(std::fs::read(&big).unwrap() == before, "the image never changes");
}

/// A QCOW2 base inside the disk directory is still never written: a merge
/// of the delta above it (not the top) is refused before anything is
/// marked, and merging it up into the top leaves its file in place.
#[test]
fn a_qcow2_base_is_never_merged_into_nor_removed() {
    let root = TempDir::new("qcow2-own");
    let ct = root.join("ct");
    std::fs::create_dir(&ct).unwrap();
    let img = ct.join("cloud.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 1M", p(&img)]);
    let before = std::fs::read(&img).unwrap();
    ploop(["clone", p(&img), p(&ct), "--format", "qcow2", "--cluster-size", "64K"]).ok();
    ploop(["snapshot", p(&ct)]).ok();
    let xml = || std::fs::read_to_string(ct.join("DiskDescriptor.xml")).unwrap();
    let disk = ublk_ploop::disk::Disk::load(&ct).unwrap();
    let own = disk.desc.images.iter().find(|i| i.file == "root.hds").unwrap().guid.to_string();
    let was = xml();
    ploop(["snapshot-merge", p(&ct), "-u", &own]).expect_clean_failure().mentions(&["QCOW2 image, which is never written"]);
    assert_eq!(xml(), was, "a refused merge changed the descriptor");
    // The top's snapshots merged away, then the image merged up.
    ploop(["snapshot-merge", p(&ct)]).ok();
    ploop(["snapshot-merge", p(&ct)]).ok();
    let disk = ublk_ploop::disk::Disk::load(&ct).unwrap();
    assert_eq!(disk.desc.images.len(), 1, "{}", xml());
    assert!(std::fs::read(&img).unwrap() == before, "the image is still there, unchanged");
    ploop(["check", p(&ct)]).ok();
}

/// A backing chain that leads back to one of its files is refused, and so
/// is a backing file a writer holds.
#[test]
fn backing_loops_and_written_backing_files_are_refused() {
    let dir = TempDir::new("qcow2-loop");
    let (a, b) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&b), "8M"]);
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&b), "-F", "qcow2", p(&a)]);
    run("qemu-img", &["rebase", "-u", "-f", "qcow2", "-b", p(&a), "-F", "qcow2", p(&b)]);
    let e = block_on(ublk_ploop::layers::qcow2::Qcow2Image::open(&SyncIo, &a)).err().expect("a loop is refused").to_string();
    assert!(e.contains("leads back"), "{e}");
    let raw = dir.join("base.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let c = dir.join("c.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&raw), "-F", "raw", p(&c), "1M"]);
    let writer = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&writer), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let e = block_on(ublk_ploop::layers::qcow2::Qcow2Image::open(&SyncIo, &c)).err().expect("a written backing file is refused").to_string();
    assert!(e.contains("in use by a writer"), "{e}");
    drop(writer);
    block_on(ublk_ploop::layers::qcow2::Qcow2Image::open(&SyncIo, &c)).expect("opens once the writer is gone");
}
