//! The command line's rough edges, one test each: locks the offline
//! commands take, damage and half-done resizes, JSON shapes, and what the
//! messages say.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Hold an flock on `path` for `secs` in another process (as another
/// ploop tool holding the disk lock would), returned once it is held.
fn hold_flock(path: &Path, secs: f64) -> std::process::Child {
    fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
    let child = Command::new("flock")
        .args(["-x", p(path), "-c", &format!("sleep {secs}")])
        .stdout(Stdio::null())
        .spawn()
        .expect("running flock(1)");
    let start = Instant::now();
    // Held once a non-blocking attempt of our own fails.
    while Command::new("flock").args(["-n", p(path), "true"]).status().unwrap().success() {
        assert!(start.elapsed() < Duration::from_secs(5), "flock(1) never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn init_disk(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    ploop(["init", p(&d), "--size", "16M", "--cluster-size", "64K"]).ok();
    d
}

#[test]
fn offline_compact_and_repair_wait_for_the_disk_lock() {
    let dir = TempDir::new("rough-lock");
    let d = init_disk(&dir, "ct");
    let lck = d.join("DiskDescriptor.xml.lck");
    for args in [vec!["compact", p(&d)], vec!["check", "--repair", p(&d)]] {
        let mut holder = hold_flock(&lck, 1.5);
        let start = Instant::now();
        ploop(&args).ok();
        let waited = start.elapsed();
        holder.wait().unwrap();
        assert!(waited >= Duration::from_millis(1000), "{args:?} did not wait for the disk lock (took {waited:?})");
    }
}

#[test]
fn resize_refuses_a_damaged_image() {
    let dir = TempDir::new("rough-resize-damaged");
    let img = dir.join("bad.hds");
    // Entry 1 points far past the end of the file.
    let mut spec = ImageSpec::v2(4 * M, 64 * K).with_cluster(0, 0, &[7u8; 512]);
    spec.bat.push((1, 1000));
    spec.write(&img);
    let before = fs::read(&img).unwrap();
    ploop(["convert", p(&img), p(&dir.join("out.hds"))]).expect_clean_failure();
    ploop(["resize", p(&img), "--size", "8M"]).expect_clean_failure().mentions(&["damaged"]).mentions(&["check --repair"]);
    assert!(fs::read(&img).unwrap() == before, "a refused resize changed the image");
}

#[test]
fn a_resize_stopped_by_the_descriptor_says_what_to_run_and_info_check_flag_it() {
    let dir = TempDir::new("rough-resize-store");
    let d = init_disk(&dir, "ct");
    // Storing the descriptor fails: its temporary file cannot be created.
    let tmp = d.join("DiskDescriptor.xml.tmp");
    fs::create_dir(&tmp).unwrap();
    let r = ploop(["resize", p(&d), "--size", "32M"]);
    r.expect_clean_failure().mentions(&["descriptor still says 16777216"]).mentions(&["--size 33554432"]);
    fs::remove_dir(&tmp).unwrap();
    // The deltas grew, the descriptor did not: both commands say so.
    ploop(["info", p(&d)]).expect_code(2).mentions(&["resize did not finish"]);
    let c = ploop(["check", p(&d), "--json"]);
    c.expect_code(2);
    let out = c.json();
    assert_eq!(out["verdict"], "corrupt", "{out}");
    assert!(out["problems"][0].as_str().unwrap().contains("--size 33554432"), "{out}");
    // Running the resize again finishes it.
    ploop(["resize", p(&d), "--size", "32M"]).ok();
    ploop(["info", p(&d)]).ok();
    ploop(["check", p(&d)]).ok();
}

#[test]
fn grow_then_shrink_leaves_no_leaked_space() {
    let dir = TempDir::new("rough-grow-shrink");
    for data in [false, true] {
        let img = dir.join(&format!("g{data}.hds"));
        ploop(["create", p(&img), "--size", "256M"]).ok();
        if data {
            qemu_io(&img, &["write -P 0xab 0 1M", "write -P 0xcd 100M 64k"]);
        }
        ploop(["resize", p(&img), "--size", "2T"]).ok();
        ploop(["resize", p(&img), "--size", "256M"]).ok();
        qemu_img(["check", "-f", "parallels", p(&img)]).ok();
        ploop(["check", p(&img)]).ok();
        if data {
            qemu_io(&img, &["read -P 0xab 0 1M", "read -P 0xcd 100M 64k", "read -P 0 1M 1M"]);
        } else {
            assert_eq!(file_len(&img), M, "an empty image shrunk back ends at its table");
        }
    }
}

#[test]
fn compact_refuses_v1_before_touching_it() {
    let dir = TempDir::new("rough-compact-v1");
    let img = dir.join("v1.hds");
    ImageSpec::v1(4 * M, 64 * K).with_cluster(0, 0, &[9u8; 4096]).write(&img);
    let before = fs::read(&img).unwrap();
    ploop(["compact", p(&img)]).expect_clean_failure().mentions(&["v1"]);
    assert!(fs::read(&img).unwrap() == before, "a refused compact changed the image");
}

#[test]
fn repair_keeps_a_sparse_table_sparse() {
    let dir = TempDir::new("rough-sparse");
    let img = dir.join("big.hds");
    // 10T of 1M clusters: a 40 MiB table of zeros, all holes in the file.
    let mut spec = ImageSpec::v2(10 << 40, M);
    spec.in_use = IN_USE;
    spec.write(&img);
    let before = fs::metadata(&img).unwrap().blocks() * 512;
    assert!(before < M, "the test image is not sparse ({before} bytes allocated)");
    ploop(["check", "--repair", p(&img)]).ok().mentions(&["in-use mark cleared"]);
    let after = fs::metadata(&img).unwrap().blocks() * 512;
    assert!(after < M, "check --repair allocated the table's holes: {before} -> {after} bytes");
    ploop(["check", p(&img)]).ok();
}

#[test]
fn check_json_has_one_shape() {
    let dir = TempDir::new("rough-check-json");
    let img = dir.join("a.hds");
    ploop(["create", p(&img), "--size", "4M", "--cluster-size", "64K"]).ok();
    let one = ploop(["check", p(&img), "--json"]).ok().json();
    assert_eq!(one["verdict"], "clean", "{one}");
    assert_eq!(one["deltas"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one["deltas"][0]["report"]["allocated_clusters"], 0, "{one}");
    let d = init_disk(&dir, "ct");
    ploop(["snapshot", p(&d)]).ok();
    let two = ploop(["check", p(&d), "--json"]).ok().json();
    assert_eq!(two["verdict"], "clean", "{two}");
    assert_eq!(two["deltas"].as_array().map(Vec::len), Some(2), "{two}");
    assert_eq!(two["deltas"][1]["verdict"], "clean", "{two}");
}

#[test]
fn offline_snapshot_says_nothing_of_requests_and_json_has_no_duration_object() {
    let dir = TempDir::new("rough-snap-json");
    let d = init_disk(&dir, "ct");
    let r = ploop(["snapshot", p(&d)]);
    r.ok();
    assert!(!r.stderr.contains("requests"), "offline, no request was held: {}", r.stderr);
    let out = ploop(["snapshot", p(&d), "--json"]).ok().json();
    assert!(out.get("stall").is_none(), "a serialised Duration: {out}");
    assert!(out["guid"].is_string() && out["file"].is_string(), "{out}");
    assert!(out.get("stall_ms").is_none(), "offline there is no stall: {out}");
}

#[test]
fn sizes_and_cluster_sizes_say_what_is_accepted() {
    let dir = TempDir::new("rough-sizes");
    let img = dir.join("a.hds");
    // E is a suffix like the others: 1E parses, and is too large for 1M clusters.
    ploop(["create", p(&img), "--size", "1E"]).expect_clean_failure().mentions(&["2^32 clusters"]);
    let r = ploop(["create", p(&img), "--size", "1Z"]);
    r.expect_code(1).mentions(&["K, M, G, T, P, E"]);
    // One rule for create and init, said as a cluster size.
    for cmd in ["create", "init"] {
        let target = dir.join(&format!("{cmd}-x"));
        for bad in ["3K", "4K", "128M"] {
            let r = ploop([cmd, p(&target), "--size", "16M", "--cluster-size", bad]);
            r.expect_code(1).mentions(&["power of two between 32K and 64M"]);
            assert!(!r.stderr.contains("Blocksize"), "{}", r.stderr);
            assert!(!target.exists(), "{cmd} --cluster-size {bad} left something behind");
        }
        ploop([cmd, p(&target), "--size", "16M", "--cluster-size", "32K"]).ok();
    }
}

#[test]
fn a_descriptor_size_that_overflows_is_refused() {
    let dir = TempDir::new("rough-desc-size");
    let d = init_disk(&dir, "ct");
    let xml = d.join("DiskDescriptor.xml");
    let text = fs::read_to_string(&xml).unwrap();
    let text = text.replace("<Disk_size>32768</Disk_size>", &format!("<Disk_size>{}</Disk_size>", u64::MAX));
    assert!(text.contains(&u64::MAX.to_string()), "{text}");
    fs::write(&xml, text).unwrap();
    ploop(["info", p(&d)]).expect_clean_failure().mentions(&["64-bit"]);
    ploop(["snapshot-list", p(&d)]).expect_clean_failure().mentions(&["64-bit"]);
}

#[test]
fn a_directory_without_a_descriptor_says_so() {
    let dir = TempDir::new("rough-nodesc");
    let empty = dir.join("empty");
    fs::create_dir(&empty).unwrap();
    let out = dir.join("out.hds");
    for args in [
        vec!["info", p(&empty)],
        vec!["check", p(&empty)],
        vec!["resize", p(&empty), "--size", "1G"],
        vec!["compact", p(&empty)],
        vec!["snapshot", p(&empty)],
        vec!["snapshot-list", p(&empty)],
        vec!["convert", p(&empty), p(&out)],
    ] {
        let r = ploop(&args);
        r.expect_code(1).mentions(&["has no DiskDescriptor.xml"]);
        assert!(!r.stderr.contains("Is a directory"), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn usage_errors_ask_for_the_disk_or_image_too() {
    for (args, what) in [
        (vec!["resize", "--size", "1G"], "IMAGE_OR_DISK_DIR"),
        (vec!["compact"], "IMAGE_OR_DISK_DIR"),
        (vec!["snapshot"], "DISK_DIR"),
    ] {
        let r = ploop(&args);
        r.expect_code(1).mentions(&["--number"]).mentions(&[what]);
    }
}

#[test]
fn device_commands_without_ublk_name_the_driver() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk");
        return;
    }
    for args in [
        vec!["status", "-n", "7"],
        vec!["snapshot", "-n", "7"],
        vec!["compact", "-n", "7"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["del", "--all"],
    ] {
        ploop(&args).expect_code(1).mentions(&["the kernel has no ublk"]).mentions(&["ublk_drv"]);
    }
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", p(at)]).stderr(Stdio::null()).status().ok()?.success();
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_filesystem_under_a_raw_output_is_named() {
    let dir = TempDir::new("rough-enospc");
    let Some(fs_) = Tmpfs::mount(&dir.join("small"), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..4 * M).map(|i| (i * 7 % 251) as u8 + 1).collect();
    fs::write(&src, data).unwrap();
    let dst = fs_.0.join("out.raw");
    ploop(["convert", "--format", "raw", p(&src), p(&dst), "--to", "raw"])
        .expect_clean_failure()
        .mentions(&["out.raw"])
        .mentions(&["No space left"]);
    assert!(!dst.exists(), "the partial output was left behind");
}

#[test]
fn temporary_snapshots_are_shown_and_deleting_them_again_is_consistent() {
    let dir = TempDir::new("rough-temporary");
    let d = init_disk(&dir, "ct");
    let a = ploop(["snapshot", p(&d)]).ok().stdout.trim().to_string();
    let b = ploop(["snapshot", p(&d)]).ok().stdout.trim().to_string();
    ploop(["snapshot-switch", p(&d), "-u", &a]).ok();
    // A now has two children (B and the new top): a delete only marks it.
    ploop(["snapshot-delete", p(&d), "-u", &a]).ok().mentions(&["marked temporary"]);
    let list = ploop(["snapshot-list", p(&d)]).ok().stdout.clone();
    let row = list.lines().find(|l| l.contains(&format!("  {a} "))).unwrap_or_else(|| panic!("{a} not listed:\n{list}"));
    assert!(row.ends_with("(temporary)"), "a temporary snapshot shown as an ordinary one:\n{list}");
    let json = ploop(["snapshot-list", p(&d), "--json"]).ok().json();
    assert!(json.as_array().unwrap().iter().any(|r| r["guid"] == a.as_str() && r["temporary"] == true), "{json}");
    // Again: it is marked already; nothing changes, exit 0.
    let xml = fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap();
    ploop(["snapshot-delete", p(&d), "-u", &a]).ok().mentions(&["already"]);
    assert_eq!(fs::read_to_string(d.join("DiskDescriptor.xml")).unwrap(), xml);
    // With B gone, A has one child left: the next command merges it away
    // (as ploop does with unused temporary snapshots), and a delete of A
    // is that merge, not an error.
    ploop(["snapshot-delete", p(&d), "-u", &b]).ok();
    ploop(["snapshot-delete", p(&d), "-u", &a]).ok().mentions(&["deleted"]);
    let list = ploop(["snapshot-list", p(&d)]).ok().stdout.clone();
    assert!(!list.contains(&a), "{list}");
    assert_eq!(list.lines().count(), 2, "{list}");
    ploop(["check", p(&d)]).ok();
}
