//! qemu-img / qemu-io as an independent oracle: images qemu writes must read
//! the same through ublk-ploop, and images ublk-ploop writes must pass
//! qemu-img check and compare equal, byte for byte, to a plain shadow file.
//!
//! qemu is required: missing tools fail these tests with an explanation
//! (UBLK_PLOOP_NO_QEMU=1 turns them into no-ops instead).

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Apply `write -P byte off len` to a model of the disk.
fn model_write(model: &mut [u8], byte: u8, off: u64, len: u64) {
    model[off as usize..(off + len) as usize].fill(byte);
}

fn clusters_of(off: u64, len: u64, cluster: u64) -> std::ops::Range<u64> {
    off / cluster..(off + len).div_ceil(cluster)
}

// ---------------------------------------------------------------------------
// 1. Images written by qemu read right.

fn qemu_written_image_reads_right(cluster: Option<u64>, tag: &str) {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new(tag);
    let img = dir.join("qemu.img");
    let size = 16 * M;
    let cl = cluster.unwrap_or(M);
    qemu_create(&img, size, cluster);

    // (pattern, offset, length): unaligned, across cluster borders, tiny,
    // overlapping, the first and the very last sector; the rest is sparse.
    let writes: &[(u8, u64, u64)] = &[
        (0xa1, 1000 * K, 300 * K),
        (0xb2, 0, 512),
        (0xc3, size - 512, 512),
        (0xd4, 3 * M, M),
        (0xe5, 5000 * K + 3, 7),
        (0xf6, 1100 * K, 10 * K),
        (0x17, 8 * M - K, 2 * K),
        (0x28, 12 * M, 3 * 64 * K + 512),
        (0x39, 14 * M + 65 * K + 100, 70 * K + 11),
    ];
    let cmds: Vec<String> = writes.iter().map(|(b, o, l)| format!("write -P {b:#x} {o} {l}")).collect();
    qemu_io(&img, &cmds.iter().map(String::as_str).collect::<Vec<_>>());

    let mut model = vec![0u8; size as usize];
    let mut touched = HashSet::new();
    for &(b, o, l) in writes {
        model_write(&mut model, b, o, l);
        touched.extend(clusters_of(o, l, cl));
    }

    // qemu's own reading agrees with the model (else the oracle is broken).
    let reference = dir.join("ref.raw");
    qemu_to_raw(&img, &reference);
    assert_bytes_equal(&fs::read(&reference).unwrap(), &model, "qemu-img convert vs model");

    // Our converter, both backends, direct and buffered.
    for (name, extra) in [("uring.raw", vec![]), ("sync.raw", vec!["--backend", "sync", "--direct", "off"])] {
        let out = dir.join(name);
        let mut args = vec!["convert", p(&img), p(&out), "--to", "raw"];
        args.extend(extra);
        ploop(&args).ok();
        assert_files_equal(&out, &reference);
    }

    // Our allocation count matches what qemu allocated.
    let info = ploop(["info", p(&img), "--json"]).ok().json();
    assert_eq!(info["allocated_clusters"], touched.len() as u64, "info: {info}");
    assert_eq!(info["cluster_size"], cl);
    assert_eq!(info["disk_size"], size);
    ploop(["check", p(&img)]).ok();

    // Read through the library: whole disk in odd-sized chunks, then random
    // aligned reads.
    for name in ["sync", "uring"] {
        let io = AnyIo::new(name);
        let stack = open_stack(&[&img], true);
        assert_eq!(stack.size(), size);
        assert_eq!(stack.cluster_size(), cl);
        let got = read_disk(&stack, &io, 196 * 1024);
        assert_bytes_equal(&got, &model, &format!("library read ({name}) vs model"));
        let unit = stack.block_size() as u64;
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let len = unit * (1 + rng.below(3 * cl / unit));
            let len = len.min(size);
            let off = rng.below((size - len) / unit + 1) * unit;
            let mut buf = vec![0u8; len as usize];
            io.run(stack.read(&io, off, &mut buf)).unwrap();
            assert_bytes_equal(&buf, &model[off as usize..(off + len) as usize], &format!("read {off}+{len}"));
        }
        io.run(stack.close(&io)).unwrap();
        drop(stack);
    }
    // A read-only open must not have touched the image.
    qemu_check_clean(&img);

    // Converting to ploop (another cluster size) gives an image qemu reads
    // as the same disk.
    let out = dir.join("out.ploop");
    ploop(["convert", p(&img), p(&out), "--cluster-size", "256K"]).ok();
    qemu_check_clean(&out);
    qemu_compare_raw(&out, &reference);
    let info = ploop(["info", p(&out), "--json"]).ok().json();
    assert_eq!(info["cluster_size"], 256 * K);
}

#[test]
fn qemu_written_image_reads_right_1m_clusters() {
    qemu_written_image_reads_right(None, "qemu1m");
}

#[test]
fn qemu_written_image_reads_right_64k_clusters() {
    qemu_written_image_reads_right(Some(64 * K), "qemu64k");
}

// ---------------------------------------------------------------------------
// 2. Images written by the engine pass qemu-img check and compare.

#[derive(Clone, Copy, Debug)]
enum Op {
    Write,
    Zero,
    Discard,
}

/// A request range: small, whole clusters, across a border, or medium.
fn pick_range(rng: &mut Rng, size: u64, cluster: u64, unit: u64) -> (u64, u64) {
    let (off, len) = match rng.below(4) {
        0 => {
            let len = unit * (1 + rng.below(16));
            (rng.below((size - len) / unit + 1) * unit, len)
        }
        1 => {
            let n = 1 + rng.below(3);
            let full = size / cluster;
            let n = n.min(full);
            (rng.below(full - n + 1) * cluster, n * cluster)
        }
        2 => {
            let border = (1 + rng.below(size.div_ceil(cluster) - 1)) * cluster;
            let before = unit * (1 + rng.below(cluster / unit - 1));
            let after = unit * (1 + rng.below(cluster / unit));
            (border - before, before + after)
        }
        _ => {
            let len = unit * (1 + rng.below(2 * cluster / unit));
            let len = len.min(size);
            (rng.below((size - len) / unit + 1) * unit, len)
        }
    };
    (off, len.min(size - off))
}

fn pick_op(rng: &mut Rng) -> Op {
    match rng.below(20) {
        0..=13 => Op::Write,
        14..=16 => Op::Zero,
        _ => Op::Discard,
    }
}

fn engine_writes_pass_qemu(backend_name: &str, made_by_qemu: bool) {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new(&format!("rw-{backend_name}"));
    let img = dir.join("disk.img");
    // Sizes that leave a partial last cluster.
    let (size, cluster) = if made_by_qemu {
        let size = 32 * M + 192 * K;
        qemu_create(&img, size, None);
        (size, M)
    } else {
        // Through the library: the command line rounds a new size up to
        // whole clusters, as ploop does; images made elsewhere need not.
        let size = 24 * M + 4 * K;
        block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &img, size, 64 * K)).unwrap();
        (size, 64 * K)
    };
    let shadow_path = dir.join("shadow.raw");
    let shadow = fs::File::create(&shadow_path).unwrap();
    shadow.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];

    let io = AnyIo::new(backend_name);
    let stack = open_stack(&[&img], false);
    assert_eq!((stack.size(), stack.cluster_size()), (size, cluster));
    let unit = stack.block_size() as u64;
    let seed = if made_by_qemu { 0x51 } else { 0x52 } + if backend_name == "sync" { 0 } else { 0x100 };
    let mut rng = Rng::new(seed);

    // The last block of the disk, then a few hundred random requests.
    let mut ops = vec![(Op::Write, size - unit, unit)];
    for _ in 0..300 {
        let op = pick_op(&mut rng);
        let (off, len) = pick_range(&mut rng, size, cluster, unit);
        ops.push((op, off, len));
    }
    for (i, &(op, off, len)) in ops.iter().enumerate() {
        let range = off as usize..(off + len) as usize;
        match op {
            Op::Write => {
                let data = rng.bytes(len as usize);
                io.run(stack.write(&io, off, &data)).unwrap_or_else(|e| panic!("op {i}: write {off}+{len}: {e}"));
                shadow.write_all_at(&data, off).unwrap();
                model[range].copy_from_slice(&data);
            }
            Op::Zero | Op::Discard => {
                // One layer: what the top does not hold reads as zeros
                // anyway, so both leave the range reading as zeros.
                match op {
                    Op::Zero => io.run(stack.write_zeroes(&io, off, len as usize)),
                    _ => io.run(stack.discard(&io, off, len as usize)),
                }
                .unwrap_or_else(|e| panic!("op {i}: {op:?} {off}+{len}: {e}"));
                shadow.write_all_at(&vec![0u8; len as usize], off).unwrap();
                model[range].fill(0);
            }
        }
        if i % 50 == 49 {
            io.run(stack.flush(&io)).unwrap();
        }
    }
    let got = read_disk(&stack, &io, 3 * cluster as usize / 2);
    assert_bytes_equal(&got, &model, "library read-back before close");
    io.run(stack.close(&io)).unwrap();
    drop(stack);
    drop(shadow);
    assert_ne!(in_use_mark(&img), IN_USE, "in-use mark left set after close");

    qemu_check_clean(&img);
    qemu_compare_raw(&img, &shadow_path);
    ploop(["check", p(&img)]).ok().mentions(&["no errors"]);
    let out = dir.join("out.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    assert_files_equal(&out, &shadow_path);
}

#[test]
fn engine_writes_pass_qemu_sync_own_image() {
    engine_writes_pass_qemu("sync", false);
}

#[test]
fn engine_writes_pass_qemu_uring_own_image() {
    engine_writes_pass_qemu("uring", false);
}

#[test]
fn engine_writes_pass_qemu_sync_qemu_image() {
    engine_writes_pass_qemu("sync", true);
}

#[test]
fn engine_writes_pass_qemu_uring_qemu_image() {
    engine_writes_pass_qemu("uring", true);
}

// ---------------------------------------------------------------------------
// 3. A stack of layers.

fn stack_of_layers(backend_name: &str) {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new(&format!("stack-{backend_name}"));
    // A partial last cluster: copy-up and whole-cluster zeroing must respect it.
    let size = 16 * M + 20 * K;
    let cluster = 64 * K;
    let base = dir.join("base.img");
    qemu_create(&base, size, Some(cluster));
    let mut model = vec![0u8; size as usize];
    // Clusters some layer holds, and clusters the current top holds.
    let mut any_owned: HashSet<u64> = HashSet::new();
    let base_writes: &[(u8, u64, u64)] =
        &[(0x11, 0, 3 * cluster), (0x22, 5 * M + 1000, 200 * K), (0x33, 9 * M, 4 * cluster), (0x44, size - 4096, 4096)];
    let cmds: Vec<String> = base_writes.iter().map(|(b, o, l)| format!("write -P {b:#x} {o} {l}")).collect();
    qemu_io(&base, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    for &(b, o, l) in base_writes {
        model_write(&mut model, b, o, l);
        any_owned.extend(clusters_of(o, l, cluster));
    }

    let io = AnyIo::new(backend_name);
    let stack = open_stack(&[&base], false);
    let unit = stack.block_size() as u64;
    let mut rng = Rng::new(if backend_name == "sync" { 3 } else { 4 });
    let mut layers = vec![base.clone()];
    // Each lower layer's content right after it became a lower layer.
    let mut frozen: Vec<(PathBuf, (u64, u64))> = vec![];
    for n in 1..=3 {
        let path = dir.join(&format!("l{n}.img"));
        quiesced(|| io.run(stack.push_layer(&io, &path))).unwrap();
        let below = layers.last().unwrap().clone();
        frozen.push((below.clone(), fingerprint(&below)));
        layers.push(path);
        assert_eq!(stack.depth(), n + 1);
        let mut top_owned: HashSet<u64> = HashSet::new();
        for i in 0..80 {
            let (mut op, (mut off, mut len)) = (pick_op(&mut rng), pick_range(&mut rng, size, cluster, unit));
            if i == 0 {
                // First, the partial last cluster: a small write (copy-up
                // of a short cluster), zeroing it whole, discarding it.
                let last = size / cluster * cluster;
                (op, off, len) = match n {
                    1 => (Op::Write, last + unit, unit),
                    2 => (Op::Zero, last, size - last),
                    _ => (Op::Discard, last, size - last),
                };
            }
            let range = off as usize..(off + len) as usize;
            let touched = clusters_of(off, len, cluster);
            match op {
                Op::Write => {
                    let data = rng.bytes(len as usize);
                    io.run(stack.write(&io, off, &data)).unwrap();
                    model[range].copy_from_slice(&data);
                    top_owned.extend(touched.clone());
                    any_owned.extend(touched);
                }
                Op::Zero => {
                    io.run(stack.write_zeroes(&io, off, len as usize)).unwrap();
                    model[range].fill(0);
                    // Zeroing over lower data takes the cluster into the top.
                    top_owned.extend(touched.filter(|c| any_owned.contains(c)));
                }
                Op::Discard => {
                    io.run(stack.discard(&io, off, len as usize)).unwrap();
                    // Only what the top holds is discarded; lower data stays.
                    for c in touched {
                        if top_owned.contains(&c) {
                            let from = (c * cluster).max(off);
                            let to = ((c + 1) * cluster).min(off + len);
                            model[from as usize..to as usize].fill(0);
                        }
                    }
                }
            }
            if i % 30 == 29 {
                io.run(stack.flush(&io)).unwrap();
            }
        }
    }
    assert_eq!(stack.paths(), layers);
    let got = read_disk(&stack, &io, 320 * 1024);
    assert_bytes_equal(&got, &model, "stack read-back before close");
    io.run(stack.close(&io)).unwrap();
    drop(stack);

    for (path, print) in &frozen {
        assert_eq!(&fingerprint(path), print, "{} changed after it became a lower layer", path.display());
    }
    let shadow = dir.join("shadow.raw");
    fs::write(&shadow, &model).unwrap();

    // Our flattening, and qemu's reading of the same chain (each layer
    // backed by the one below), both equal the model.
    let out = dir.join("out.raw");
    let mut args: Vec<&str> = vec!["convert"];
    args.extend(layers.iter().map(|l| p(l)));
    args.extend([p(&out), "--to", "raw"]);
    ploop(&args).ok();
    assert_files_equal(&out, &shadow);
    let qemu_out = dir.join("qemu-chain.raw");
    qemu_chain_to_raw(&layers, &qemu_out);
    assert_files_equal(&qemu_out, &shadow);

    // Flattened into one ploop image: qemu agrees too.
    let flat = dir.join("flat.ploop");
    let mut args: Vec<&str> = vec!["convert"];
    args.extend(layers.iter().map(|l| p(l)));
    args.push(p(&flat));
    ploop(&args).ok();
    qemu_check_clean(&flat);
    qemu_compare_raw(&flat, &shadow);

    for layer in &layers {
        qemu_check_clean(layer);
        ploop(["check", p(layer)]).ok();
    }
    // The library reads the stack back read-only the same way.
    let stack = open_stack(&layers, true);
    let got = read_disk(&stack, &io, 1 << 20);
    assert_bytes_equal(&got, &model, "stack read-back after reopen");
}

#[test]
fn stack_of_layers_sync() {
    stack_of_layers("sync");
}

#[test]
fn stack_of_layers_uring() {
    stack_of_layers("uring");
}

/// A snapshot demotes the old top in place (no reopen by name), so a top
/// file that was moved still snapshots fine; and a snapshot that fails
/// (its target exists) leaves the stack and that file as they were.
#[test]
fn push_layer_survives_a_moved_top_and_fails_cleanly() {
    let dir = TempDir::new("pushfail");
    let base = dir.join("base.img");
    let cluster = 64 * K;
    ploop(["create", p(&base), "--size", "4M", "--cluster-size", "64K"]).ok();
    let io = AnyIo::new("sync");
    let stack = open_stack(&[&base], false);
    let data = pattern(5, cluster as usize);
    io.run(stack.write(&io, 0, &data)).unwrap();

    // A target that exists: refused, untouched, stack unchanged.
    let taken = dir.join("taken.img");
    fs::write(&taken, b"not yours").unwrap();
    let err = quiesced(|| io.run(stack.push_layer(&io, &taken))).expect_err("push_layer over an existing file succeeded");
    assert!(err.to_string().contains("exists"), "unexpected error: {err}");
    assert_eq!(fs::read(&taken).unwrap(), b"not yours", "push_layer clobbered an existing file");
    assert_eq!(stack.depth(), 1, "a failed push_layer changed the depth of the stack");
    io.run(stack.write(&io, cluster, &data)).expect("write after a failed push_layer");

    // The top moved away under us: the snapshot still works.
    let moved = dir.join("moved.img");
    fs::rename(&base, &moved).unwrap();
    let l1 = dir.join("l1.img");
    quiesced(|| io.run(stack.push_layer(&io, &l1))).expect("push_layer after the top file was renamed");
    assert_eq!(stack.depth(), 2);
    let mut buf = vec![0u8; 2 * cluster as usize];
    io.run(stack.read(&io, 0, &mut buf)).expect("read after push_layer");
    assert_bytes_equal(&buf[..cluster as usize], &data, "data below the new top");
    assert_bytes_equal(&buf[cluster as usize..], &data, "data written before the snapshot");
    io.run(stack.write(&io, 2 * cluster, &data)).expect("write to the new top");
    io.run(stack.close(&io)).expect("close");
    drop(stack);
    ploop(["check", p(&moved)]).ok();
    ploop(["check", p(&l1)]).ok();
}

// ---------------------------------------------------------------------------
// 4. Two BAT entries sharing one cluster.

#[test]
fn check_finds_and_repairs_shared_cluster() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("dup");
    let img = dir.join("dup.img");
    let cluster = 64 * K;
    qemu_create(&img, 4 * M, Some(cluster));
    qemu_io(
        &img,
        &[
            &format!("write -P 0x11 {} {}", cluster, cluster),
            &format!("write -P 0x22 {} {}", 2 * cluster, cluster / 2),
            &format!("write -P 0x55 {} {}", 5 * cluster, cluster),
        ],
    );
    let (e2, e5) = (bat_entry(&img, 2), bat_entry(&img, 5));
    assert!(e2 != 0 && e5 != 0 && e2 != e5, "qemu allocated e2={e2} e5={e5}");
    // Virtual cluster 2 now shares cluster 5's storage; its own is orphaned.
    set_bat_entry(&img, 2, e5);

    let before = dir.join("before.raw");
    qemu_to_raw(&img, &before);
    let before_bytes = fs::read(&before).unwrap();
    let c = cluster as usize;
    assert!(before_bytes[2 * c..3 * c].iter().all(|&b| b == 0x55), "qemu does not read the shared cluster");

    let r = ploop(["check", p(&img), "--json"]);
    r.expect_code(2);
    let report = r.json();
    assert_eq!(report["verdict"], "corrupt", "{report}");
    let bad = report["deltas"][0]["report"]["bad_entries"].as_array().expect("bad_entries array");
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["problem"], "duplicate", "{report}");
    assert!(bad[0]["index"] == 2 || bad[0]["index"] == 5, "{report}");
    ploop(["check", p(&img)]).expect_code(2).mentions(&["another entry"]);
    let q = qemu_img(["check", "-f", "parallels", p(&img)]);
    eprintln!("for the record, qemu-img check on a shared cluster: exit {:?}\n{}{}", q.code, q.stdout, q.stderr);
    // Serving it is refused until repaired.
    ploop(["convert", p(&img), p(&dir.join("no.raw")), "--to", "raw"]).expect_clean_failure().mentions(&["repair"]);
    assert!(!dir.join("no.raw").exists());

    let r = ploop(["check", p(&img), "--repair", "--json"]);
    r.expect_code(0);
    let report = r.json();
    assert_eq!(report["verdict"], "clean", "{report}");
    assert!(!report["deltas"][0]["report"]["repairs"].as_array().unwrap().is_empty(), "{report}");
    assert_ne!(bat_entry(&img, 2), bat_entry(&img, 5), "entries still shared after repair");
    ploop(["check", p(&img)]).ok();
    qemu_check_clean(&img);
    let after = dir.join("after.raw");
    qemu_to_raw(&img, &after);
    assert_files_equal(&after, &before);
    let ours = dir.join("ours.raw");
    ploop(["convert", p(&img), p(&ours), "--to", "raw"]).ok();
    assert_files_equal(&ours, &before);

    // The two virtual clusters are independent now.
    let io = AnyIo::new("sync");
    let stack = open_stack(&[&img], false);
    io.run(stack.write(&io, 5 * cluster, &vec![0x99u8; c])).unwrap();
    io.run(stack.close(&io)).unwrap();
    drop(stack);
    let last = dir.join("last.raw");
    qemu_to_raw(&img, &last);
    let last = fs::read(&last).unwrap();
    assert!(last[2 * c..3 * c].iter().all(|&b| b == 0x55), "cluster 2 changed with cluster 5");
    assert!(last[5 * c..6 * c].iter().all(|&b| b == 0x99));
    qemu_check_clean(&img);
}

// ---------------------------------------------------------------------------
// 5. Unclean close and leaked space.

#[test]
fn unclean_close_is_detected_and_recovered() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("unclean");
    let img = dir.join("u.img");
    let cluster = 64 * K;
    let size = 8 * M;
    ploop(["create", p(&img), "--size", "8M", "--cluster-size", "64K"]).ok();
    let mut model = vec![0u8; size as usize];
    let first = pattern(1, 3 * cluster as usize + 4096);
    {
        let io = AnyIo::new("sync");
        let stack = open_stack(&[&img], false);
        assert_eq!(in_use_mark(&img), IN_USE, "in-use mark not set while open read-write");
        io.run(stack.write(&io, cluster - 4096, &first)).unwrap();
        io.run(stack.flush(&io)).unwrap();
        // Dropped without close: the process "crashed" after a flush.
        drop(stack);
    }
    model[(cluster - 4096) as usize..][..first.len()].copy_from_slice(&first);
    let header = fs::read(&img).unwrap();
    assert_eq!(&header[44..48], &0x746F_6E59u32.to_le_bytes(), "header bytes 44..48 after an unclean close");

    let r = ploop(["check", p(&img)]);
    r.expect_code(2).mentions(&["not closed cleanly"]);
    let r = ploop(["check", p(&img), "--json"]);
    r.expect_code(2);
    assert_eq!(r.json()["deltas"][0]["report"]["unclean"], true);
    assert_eq!(ploop(["info", p(&img), "--json"]).ok().json()["in_use"], true);
    let q = qemu_img(["check", "-f", "parallels", p(&img)]);
    eprintln!("for the record, qemu-img check on an unclean image: exit {:?}\n{}{}", q.code, q.stdout, q.stderr);

    // Reopening read-write is allowed; the flushed data is there.
    let second = pattern(2, cluster as usize);
    {
        let io = AnyIo::new("uring");
        let stack = open_stack(&[&img], false);
        let got = read_disk(&stack, &io, 1 << 20);
        assert_bytes_equal(&got, &model, "data after unclean close");
        io.run(stack.write(&io, 6 * cluster, &second)).unwrap();
        io.run(stack.close(&io)).unwrap();
        drop(stack);
    }
    model[6 * cluster as usize..7 * cluster as usize].copy_from_slice(&second);
    assert_ne!(in_use_mark(&img), IN_USE, "in-use mark not cleared by close");
    ploop(["check", p(&img)]).ok();
    qemu_check_clean(&img);
    let shadow = dir.join("shadow.raw");
    fs::write(&shadow, &model).unwrap();
    qemu_compare_raw(&img, &shadow);
}

#[test]
fn unclean_image_is_repaired_by_check() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("unclean-repair");
    let img = dir.join("u.img");
    qemu_create(&img, 4 * M, Some(64 * K));
    qemu_io(&img, &["write -P 0x5a 100000 200000"]);
    let before = dir.join("before.raw");
    qemu_to_raw(&img, &before);
    {
        let stack = open_stack(&[&img], false);
        drop(stack);
    }
    assert_eq!(in_use_mark(&img), IN_USE);
    ploop(["check", p(&img)]).expect_code(2);
    ploop(["check", p(&img), "--repair"]).ok().mentions(&["in-use mark cleared"]);
    assert_ne!(in_use_mark(&img), IN_USE);
    ploop(["check", p(&img)]).ok();
    qemu_check_clean(&img);
    let after = dir.join("after.raw");
    qemu_to_raw(&img, &after);
    assert_files_equal(&after, &before);
}

#[test]
fn leaked_tail_is_reported_and_trimmed() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("leak");
    let img = dir.join("leak.img");
    let cluster = 64 * K;
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    {
        let io = AnyIo::new("sync");
        let stack = open_stack(&[&img], false);
        io.run(stack.write(&io, 0, &pattern(9, 2 * cluster as usize))).unwrap();
        io.run(stack.close(&io)).unwrap();
        drop(stack);
    }
    let before = dir.join("before.raw");
    qemu_to_raw(&img, &before);
    let clean_len = file_len(&img);
    let f = fs::OpenOptions::new().append(true).open(&img).unwrap();
    f.write_all_at(&pattern(10, cluster as usize), clean_len).unwrap();
    drop(f);

    let r = ploop(["check", p(&img), "--json"]);
    r.expect_code(3);
    let report = r.json();
    assert_eq!(report["verdict"], "leaks", "{report}");
    assert_eq!(report["deltas"][0]["report"]["leaked_clusters"], 1, "{report}");
    ploop(["check", p(&img)]).expect_code(3).mentions(&["leaked"]);
    // qemu agrees: leaks only (its exit code 3 as well).
    let q = qemu_img(["check", "-f", "parallels", p(&img)]);
    assert_eq!(q.code, Some(3), "qemu-img check on a leaked tail:\n{}{}", q.stdout, q.stderr);
    // Leaked space does not stop serving the image read-only.
    let out = dir.join("leaky.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    assert_files_equal(&out, &before);

    ploop(["check", p(&img), "--repair"]).ok().mentions(&["leaked bytes cut"]);
    assert_eq!(file_len(&img), clean_len, "repair did not truncate the leaked tail");
    ploop(["check", p(&img)]).ok();
    qemu_check_clean(&img);
    let after = dir.join("after.raw");
    qemu_to_raw(&img, &after);
    assert_files_equal(&after, &before);
}

#[test]
fn read_write_open_trims_leaked_tail() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("trim");
    let img = dir.join("t.img");
    let cluster = 64 * K;
    qemu_create(&img, 4 * M, Some(cluster));
    qemu_io(&img, &[&format!("write -P 0x77 0 {}", 2 * cluster)]);
    let clean_len = file_len(&img);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pattern(11, 2 * cluster as usize), clean_len).unwrap();
    drop(f);
    let paths = [img.clone()];
    let (stack, reports) =
        retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None }))).unwrap();
    assert_eq!(reports[0].trimmed_leak, 2 * cluster);
    let io = AnyIo::new("sync");
    // A new cluster must read as zeros, not as the garbage that was there.
    io.run(stack.write(&io, 10 * cluster, &[0xeeu8; 4096])).unwrap();
    let mut buf = vec![0u8; cluster as usize];
    io.run(stack.read(&io, 10 * cluster, &mut buf)).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xee) && buf[4096..].iter().all(|&b| b == 0));
    io.run(stack.close(&io)).unwrap();
    drop(stack);
    qemu_check_clean(&img);
    assert_eq!(file_len(&img), clean_len + cluster);
}
