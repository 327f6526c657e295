//! The command line: argument validation, exit codes, JSON output, and the
//! meaning of argument order in `convert`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Write `(virtual offset, bytes)` pieces into an image through the library.
fn fill(img: &Path, pieces: &[(u64, Vec<u8>)]) {
    let stack = open_stack(&[img], false);
    for (off, data) in pieces {
        block_on(stack.write(&SyncIo, *off, data)).unwrap();
    }
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn create_makes_an_empty_image() {
    let dir = TempDir::new("cli-create");
    let img = dir.join("a.img");
    let r = ploop(["create", p(&img), "--size", "64M"]);
    r.ok().mentions(&["created"]);
    let bytes = fs::read(&img).unwrap();
    assert_eq!(&bytes[..16], MAGIC_V2);
    assert_eq!(bytes.len() as u64, M, "64M disk, 1M clusters: header+BAT padded to one cluster");
    assert!(bytes[64..].iter().all(|&b| b == 0), "fresh BAT not empty");
    ploop(["check", p(&img)]).ok();
    let info = ploop(["info", p(&img), "--json"]).ok().json();
    assert_eq!(info["disk_size"], 64 * M);
    assert_eq!(info["cluster_size"], M);
    assert_eq!(info["allocated_clusters"], 0);
    assert_eq!(info["in_use"], false);
    assert_eq!(info["format"], "ploop");
    assert_eq!(info["variant"], "WithouFreSpacExt");
}

#[test]
fn create_json_output() {
    let dir = TempDir::new("cli-create-json");
    let img = dir.join("a.img");
    let out = ploop(["create", p(&img), "--size", "8M", "--cluster-size", "64K", "--json"]).ok().json();
    assert_eq!(out["disk_size"], 8 * M, "{out}");
    assert_eq!(out["cluster_size"], 64 * K, "{out}");
    assert_eq!(out["allocated_clusters"], 0, "{out}");
}

#[test]
fn create_accepts_size_suffixes() {
    let dir = TempDir::new("cli-suffix");
    for (i, (size, cluster, bytes, cluster_bytes)) in [
        ("512K", None, 512 * K, M),
        ("3M", Some("64K"), 3 * M, 64 * K),
        ("2G", None, 2 << 30, M),
        ("100m", Some("32k"), 100 * M, 32 * K),
        ("1048576", Some("128K"), M, 128 * K),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.join(&format!("s{i}.img"));
        let mut args = vec!["create", p(&img), "--size", size];
        if let Some(c) = cluster {
            args.extend(["--cluster-size", c]);
        }
        ploop(&args).ok();
        let info = ploop(["info", p(&img), "--json"]).ok().json();
        // Rounded up to whole clusters, as ploop's tool rounds it.
        let bytes = bytes.next_multiple_of(cluster_bytes);
        assert_eq!(info["disk_size"], bytes, "--size {size}: {info}");
        assert_eq!(info["cluster_size"], cluster_bytes, "--cluster-size {cluster:?}: {info}");
        assert_eq!(info["bat_entries"], bytes.div_ceil(cluster_bytes), "{info}");
        // The data area starts on the first cluster boundary after the BAT.
        let data_off = (64 + 4 * bytes.div_ceil(cluster_bytes)).next_multiple_of(cluster_bytes);
        assert_eq!(info["data_offset"], data_off, "{info}");
        assert_eq!(file_len(&img), data_off);
    }
}

#[test]
fn create_refuses_an_existing_path() {
    let dir = TempDir::new("cli-exists");
    let img = dir.join("a.img");
    fs::write(&img, b"precious").unwrap();
    ploop(["create", p(&img), "--size", "16M"]).expect_code(1).expect_clean_failure().mentions(&["exists"]);
    assert_eq!(fs::read(&img).unwrap(), b"precious", "create overwrote an existing file");
    // And an existing image too.
    let img2 = dir.join("b.img");
    ploop(["create", p(&img2), "--size", "16M"]).ok();
    let print = fingerprint(&img2);
    ploop(["create", p(&img2), "--size", "32M"]).expect_code(1).mentions(&["exists"]);
    assert_eq!(fingerprint(&img2), print);
}

#[test]
fn create_refuses_a_size_not_a_multiple_of_512() {
    let dir = TempDir::new("cli-size512");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "1000"]).expect_code(1).expect_clean_failure().mentions(&["512"]);
    assert!(!img.exists(), "a refused create left a file behind");
    ploop(["create", p(&img), "--size", "0"]).expect_code(1).expect_clean_failure();
    assert!(!img.exists());
}

#[test]
fn create_refuses_bad_cluster_sizes() {
    let dir = TempDir::new("cli-cluster");
    let img = dir.join("a.img");
    for bad in ["3K", "0", "256", "1G"] {
        ploop(["create", p(&img), "--size", "16M", "--cluster-size", bad])
            .expect_code(1)
            .expect_clean_failure()
            .mentions(&["power of two"]);
        assert!(!img.exists(), "--cluster-size {bad} left a file behind");
    }
}

/// A size that does not parse is a usage error. It must exit 1 like every
/// other error: exit 2 means "image corrupt" to scripts that run `check`.
#[test]
fn unparsable_size_exits_1() {
    let dir = TempDir::new("cli-parse");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "10X"]).expect_code(1).expect_clean_failure().mentions(&["10X"]);
    ploop(["create", p(&img), "--size", "16M", "--cluster-size", "64Q"]).expect_code(1).mentions(&["64Q"]);
    assert!(!img.exists());
}

#[test]
fn check_usage_error_is_not_mistaken_for_corruption() {
    // `check` uses 2 for "corrupt": a typo must not look like that.
    let dir = TempDir::new("cli-check-usage");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "4M"]).ok();
    let r = ploop(["check", p(&img), "--repiar"]);
    r.expect_clean_failure().mentions(&["repiar"]);
    assert_ne!(r.code(), 2, "a usage error exits with check's 'corrupt' code");
    assert_ne!(r.code(), 3, "a usage error exits with check's 'leaks' code");
}

#[test]
fn missing_files_are_errors() {
    let dir = TempDir::new("cli-missing");
    let nope = dir.join("nope.img");
    for args in [
        vec!["info", p(&nope)],
        vec!["check", p(&nope)],
        vec!["convert", p(&nope), p(&dir.join("out.raw")), "--to", "raw"],
    ] {
        ploop(&args).expect_code(1).expect_clean_failure().mentions(&["no such file"]);
    }
    assert!(!dir.join("out.raw").exists());
}

#[test]
fn json_errors_come_as_json_on_stdout() {
    // A script that asked for --json parses stdout, failure or not.
    let dir = TempDir::new("cli-json-error");
    let nope = dir.join("nope.img");
    for args in [vec!["info", p(&nope), "--json"], vec!["check", "--json", p(&nope)], vec!["snapshot-list", p(&dir.join("nodisk")), "--json"]] {
        let r = ploop(&args);
        r.expect_code(1).expect_clean_failure();
        let v = r.json();
        assert_eq!(v["ok"], false, "{args:?}: {v}");
        assert!(v["errno"].as_i64().is_some_and(|e| e > 0), "{args:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{args:?}: {v}");
    }
    // Without --json, stdout stays empty; so it does where stdout is a
    // copy's stream (--to -): no answer may land inside the stream.
    assert!(ploop(["info", p(&nope)]).expect_code(1).stdout.is_empty());
    assert!(ploop(["copy", "-n", "4095", "--to", "-", "--json"]).expect_code(1).stdout.is_empty());
}

#[test]
fn info_json_reports_allocation() {
    let dir = TempDir::new("cli-info");
    let img = dir.join("a.img");
    let cluster = 64 * K;
    ploop(["create", p(&img), "--size", "8M", "--cluster-size", "64K"]).ok();
    // Three clusters: one whole, two touched by a write across a border.
    fill(&img, &[(0, vec![1u8; cluster as usize]), (5 * cluster - 4096, vec![2u8; 8192])]);
    let r = ploop(["info", p(&img), "--json"]);
    let info = r.ok().json();
    assert_eq!(info["disk_size"], 8 * M, "{info}");
    assert_eq!(info["cluster_size"], cluster, "{info}");
    assert_eq!(info["allocated_clusters"], 3, "{info}");
    assert_eq!(info["in_use"], false, "{info}");
    assert_eq!(info["file_size"], file_len(&img), "{info}");
    assert_eq!(info["path"], p(&img));
    // Plain output says the same in words.
    ploop(["info", p(&img)]).ok().mentions(&["3 of 128 allocated"]);

    // Several images: a JSON array, in order.
    let other = dir.join("b.img");
    ploop(["create", p(&other), "--size", "4M"]).ok();
    let both = ploop(["info", p(&img), p(&other), "--json"]).ok().json();
    let list = both.as_array().expect("info of two images prints a JSON array");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["allocated_clusters"], 3);
    assert_eq!(list[1]["disk_size"], 4 * M);
    assert_eq!(list[1]["allocated_clusters"], 0);
}

#[test]
fn check_json_on_a_clean_image() {
    let dir = TempDir::new("cli-check");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    fill(&img, &[(M, vec![7u8; 4096])]);
    let r = ploop(["check", p(&img), "--json"]).ok().json();
    assert_eq!(r["verdict"], "clean", "{r}");
    assert_eq!(r["deltas"][0]["report"]["allocated_clusters"], 1, "{r}");
    assert_eq!(r["deltas"][0]["report"]["leaked_clusters"], 0, "{r}");
    assert_eq!(r["deltas"][0]["report"]["unclean"], false, "{r}");
    assert!(r["deltas"][0]["report"]["bad_entries"].as_array().unwrap().is_empty(), "{r}");
    ploop(["check", p(&img)]).ok().mentions(&["no errors"]);
}

/// Two layers that both hold cluster 1: the later argument is the upper
/// layer and wins there; elsewhere each shows through.
#[test]
fn convert_stack_order_matters() {
    let dir = TempDir::new("cli-order");
    let cluster = 64 * K;
    let c = cluster as usize;
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    for img in [&a, &b] {
        ploop(["create", p(img), "--size", "1M", "--cluster-size", "64K"]).ok();
    }
    fill(&a, &[(0, vec![0xaa; c]), (cluster, vec![0xa1; c])]);
    fill(&b, &[(cluster + 512, vec![0xbb; 1024]), (2 * cluster, vec![0xb2; c])]);

    let ab = dir.join("ab.raw");
    ploop(["convert", p(&a), p(&b), p(&ab), "--to", "raw"]).ok();
    let ba = dir.join("ba.raw");
    ploop(["convert", p(&b), p(&a), p(&ba), "--to", "raw"]).ok();
    let ab = fs::read(&ab).unwrap();
    let ba = fs::read(&ba).unwrap();
    assert_eq!(ab.len() as u64, M);
    assert_eq!(ba.len() as u64, M);

    // Cluster 0 only in a, cluster 2 only in b: the same either way.
    for out in [&ab, &ba] {
        assert!(out[..c].iter().all(|&x| x == 0xaa));
        assert!(out[2 * c..3 * c].iter().all(|&x| x == 0xb2));
        assert!(out[3 * c..].iter().all(|&x| x == 0));
    }
    // Cluster 1: the top layer's whole cluster, whatever it holds (b's is
    // zeros around the 1 KiB it wrote: a cluster comes from one layer).
    let mut want_b = vec![0u8; c];
    want_b[512..1536].fill(0xbb);
    assert_bytes_equal(&ab[c..2 * c], &want_b, "a b: b on top");
    assert!(ba[c..2 * c].iter().all(|&x| x == 0xa1), "b a: a on top");
}

#[test]
fn convert_refuses_an_existing_destination() {
    let dir = TempDir::new("cli-convert-exists");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "1M", "--cluster-size", "64K"]).ok();
    fill(&img, &[(0, vec![9u8; 4096])]);
    let out = dir.join("out.raw");
    fs::write(&out, b"keep me").unwrap();
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).expect_code(1).mentions(&["exists"]);
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn an_interrupted_convert_leaves_no_destination() {
    // Ctrl-C (or a service stop) while converting: the partial image
    // would refuse the next try ("destination exists").
    let dir = TempDir::new("cli-convert-sigint");
    let src = dir.join("big.raw");
    // Enough data that the copy takes a while after the destination is
    // made (the signal must meet it under way).
    let f = fs::File::create(&src).unwrap();
    let chunk = vec![0x5au8; M as usize];
    for c in 0..256 {
        std::os::unix::fs::FileExt::write_at(&f, &chunk, c * M).unwrap();
    }
    drop(f);
    // '-' is no stream here: refused, no file named '-' made.
    ploop(["convert", "--format", "raw", p(&src), "-"]).expect_code(1).mentions(&["not a stream"]);
    assert!(!Path::new("-").exists());
    let dst = dir.join("out.hds");
    let child = std::process::Command::new(bin())
        .args(["convert", "--format", "raw", "--to", "ploop", "--direct", "off", p(&src), p(&dst)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !dst.exists() && start.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    assert!(dst.exists(), "the convert never made its destination");
    std::thread::sleep(std::time::Duration::from_millis(30));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("the convert finished before the signal: nothing to check");
        return;
    }
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT), "{stderr}");
    assert!(stderr.contains("removed"), "{stderr}");
    assert!(!dst.exists(), "the partial destination was left behind: {stderr}");
}

#[test]
fn a_copy_or_backup_refused_leaves_no_stream_file() {
    // No such device (or no ublk at all here): the job never started, so
    // the file made for its stream goes, and the next try can make it.
    let dir = TempDir::new("cli-copy-refused");
    for verb in ["copy", "backup"] {
        let to = dir.join(&format!("{verb}.stream"));
        ploop([verb, "-n", "4095", "--to", p(&to)]).expect_code(1).expect_clean_failure();
        assert!(!to.exists(), "{verb}: the stream file of a refused job was left");
    }
}

#[test]
fn convert_round_trip_raw_ploop_raw() {
    let dir = TempDir::new("cli-roundtrip");
    let size = 3 * M + 512 * K;
    let mut rng = Rng::new(99);
    let mut disk = vec![0u8; size as usize];
    // Sparse content: some 4K blocks of noise.
    for _ in 0..40 {
        let at = rng.below(size / 4096) as usize * 4096;
        rng.fill(&mut disk[at..at + 4096]);
    }
    let raw = dir.join("in.raw");
    fs::write(&raw, &disk).unwrap();
    let img = dir.join("a.ploop");
    // A file without a ploop signature is only read as raw when declared so.
    ploop(["convert", p(&raw), p(&img), "--cluster-size", "64K"]).expect_clean_failure().mentions(&["not a valid ploop image", "--format raw"]);
    assert!(!img.exists(), "a refused conversion left its destination behind");
    let stats = ploop(["convert", p(&raw), p(&img), "--format", "raw", "--cluster-size", "64K", "--json"]).ok().json();
    assert_eq!(stats["disk_size"], size, "{stats}");
    ploop(["check", p(&img)]).ok();
    let back = dir.join("back.raw");
    ploop(["convert", p(&img), p(&back), "--to", "raw", "--backend", "sync", "--direct", "off"]).ok();
    assert_files_equal(&back, &raw);
    let info = ploop(["info", p(&img), "--json"]).ok().json();
    assert_eq!(info["cluster_size"], 64 * K);
    // The result stays sparse: exactly the 64K clusters with data are allocated.
    let with_data = disk.chunks(64 * K as usize).filter(|c| c.iter().any(|&b| b != 0)).count();
    assert_eq!(info["allocated_clusters"], with_data as u64, "zero clusters were allocated: {info} {stats}");
}

#[test]
fn convert_needs_a_destination() {
    let dir = TempDir::new("cli-convert-args");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "1M"]).ok();
    let r = ploop(["convert", p(&img)]);
    r.expect_clean_failure();
    let listed: Vec<PathBuf> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(listed, vec![img.clone()], "a refused convert created files");
}

#[test]
fn convert_refuses_mismatched_stacks() {
    let dir = TempDir::new("cli-mismatch");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    ploop(["create", p(&a), "--size", "4M", "--cluster-size", "64K"]).ok();
    ploop(["create", p(&b), "--size", "4M", "--cluster-size", "1M"]).ok();
    let out = dir.join("out.raw");
    ploop(["convert", p(&a), p(&b), p(&out), "--to", "raw"]).expect_code(1).mentions(&["cluster size"]);
    assert!(!out.exists());
    ploop(["convert", p(&a), p(&a), p(&out), "--to", "raw"]).expect_code(1).mentions(&["twice"]);
    assert!(!out.exists());
}

/// What an image shows, read through the library.
fn read_all(img: &Path) -> Vec<u8> {
    let stack = open_stack(&[img], true);
    let mut buf = vec![0u8; stack.size() as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

/// A one-way stream of an image, made by the library's sender.
fn stream_of(img: &Path, out: &Path) {
    let stack = open_stack(&[img], false);
    let ring = ublk_ploop::io::OwnRing::new(16).unwrap();
    let file = fs::File::create(out).unwrap();
    let opts = ublk_ploop::copy::SendOptions::default();
    ring.block_on(ublk_ploop::copy::send(&ring.io(), &stack, Box::new(file), None, &mut ublk_ploop::copy::NoFs, opts, &|_, _, _| {})).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
}

#[test]
fn receive_makes_images_and_refuses_bad_streams() {
    let dir = TempDir::new("cli-receive");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    fill(&img, &[(0, vec![1u8; 4096]), (3 * M, vec![2u8; 64 * K as usize])]);
    let stream = dir.join("a.stream");
    stream_of(&img, &stream);

    let out = dir.join("b.img");
    let got = ploop(["receive", "--image", p(&out), "--from", p(&stream), "--json"]).ok().json();
    assert_eq!(got["disk_size"], 4 * M, "{got}");
    assert_eq!(got["md5"], true, "{got}");
    assert_eq!(read_all(&out), read_all(&img));
    ploop(["check", p(&out)]).ok();
    if have_qemu() {
        qemu_check_clean(&out);
    }
    // Into an empty directory: a disk directory.
    let ddir = dir.join("disk");
    fs::create_dir(&ddir).unwrap();
    ploop(["receive", "--image", p(&ddir), "--from", p(&stream)]).ok().mentions(&["received"]);
    assert!(ddir.join("DiskDescriptor.xml").is_file() && ddir.join("root.hds").is_file());
    assert_eq!(read_all(&ddir.join("root.hds")), read_all(&img));

    // Cut and damaged streams: exit 1, a clear message, nothing left.
    let bytes = fs::read(&stream).unwrap();
    let cut = dir.join("cut.stream");
    fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let bad = dir.join("c.img");
    ploop(["receive", "--image", p(&bad), "--from", p(&cut)]).expect_clean_failure().mentions(&["cut off"]);
    assert!(!bad.exists());
    let mut flipped = bytes.clone();
    let i = flipped.len() / 2;
    flipped[i] ^= 0x10;
    fs::write(&cut, &flipped).unwrap();
    ploop(["receive", "--image", p(&bad), "--from", p(&cut)]).expect_clean_failure().mentions(&["damaged"]);
    assert!(!bad.exists() && !dir.join("c.img.partial").exists());
    // An existing destination is refused, and stays.
    ploop(["receive", "--image", p(&out), "--from", p(&stream)]).expect_clean_failure().mentions(&["exists"]);
}

/// `receive --listen` on a unix socket answers a two-way sender.
#[test]
fn receive_listens_for_a_two_way_sender() {
    let dir = TempDir::new("cli-listen");
    let img = dir.join("a.img");
    ploop(["create", p(&img), "--size", "2M", "--cluster-size", "64K"]).ok();
    fill(&img, &[(M, vec![5u8; 8192])]);
    let sock = dir.join("r.sock");
    let out = dir.join("b.img");
    let child = std::process::Command::new(bin())
        .args(["receive", "--image", p(&out), "--listen", p(&sock), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed().as_secs() < 10, "receiver never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let stack = open_stack(&[&img], false);
    let ring = ublk_ploop::io::OwnRing::new(16).unwrap();
    let opts = ublk_ploop::copy::SendOptions { two_way: true, ..Default::default() };
    let sent = ring
        .block_on(ublk_ploop::copy::send(&ring.io(), &stack, Box::new(s.try_clone().unwrap()), Some(Box::new(s)), &mut ublk_ploop::copy::NoFs, opts, &|_, _, _| {}))
        .unwrap();
    assert!(sent.md5);
    block_on(stack.close(&SyncIo)).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let got: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(got["md5"], true);
    drop(stack);
    assert_eq!(read_all(&out), read_all(&img));
}
