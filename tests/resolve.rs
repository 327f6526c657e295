//! What path arguments name, as every verb that takes them reads them
//! (`disk::resolve`): the same mistakes are refused with the same words,
//! before anything is opened, whichever verb was given them.

mod common;

use common::*;

const SNAP: &str = "00000000-0000-0000-0000-000000000001";

/// A scratch directory with a disk directory `d`, an image `a.hds` and a
/// directory `bare` that is no disk.
fn world() -> TempDir {
    let t = TempDir::new("resolve");
    ploop(["init", t.join("d").to_str().unwrap(), "--size", "16M"]).ok();
    ploop(["create", t.join("a.hds").to_str().unwrap(), "--size", "16M"]).ok();
    std::fs::create_dir(t.join("bare")).unwrap();
    t
}

/// `args` fail with exit 1 and exactly this error line.
fn refused(t: &TempDir, args: &[&str], error: &str) {
    let args: Vec<String> = args.iter().map(|a| if ["d", "a.hds", "bare"].contains(a) { t.join(a).display().to_string() } else { a.to_string() }).collect();
    let r = ploop(&args);
    r.expect_code(1);
    let want = format!("ublk-ploop: error: {}\n", error.replace("{T}", &t.path().display().to_string()));
    assert_eq!(r.stderr, want, "{args:?}");
}

#[test]
fn a_bare_directory_is_no_disk() {
    let t = world();
    for verb in [&["info", "bare"][..], &["check", "bare"], &["convert", "bare", "out.hds"], &["add", "--image", "bare"], &["compact", "bare"], &["resize", "bare", "--size", "32M"]] {
        refused(&t, verb, "{T}/bare has no DiskDescriptor.xml: not a disk directory");
    }
}

#[test]
fn a_disk_declares_its_own_formats() {
    let t = world();
    for verb in [&["info", "d", "--format", "raw"][..], &["check", "d", "--format", "ploop"], &["convert", "d", "out.hds", "--format", "raw"], &["add", "--image", "d", "--format", "raw"], &["resize", "d", "--format", "raw", "--size", "32M"]] {
        refused(&t, verb, "{T}/d: a disk directory declares its formats; drop --format");
    }
}

#[test]
fn a_stack_takes_no_disk_and_no_snapshot() {
    let t = world();
    refused(&t, &["convert", "a.hds", "d", "out.hds"], "{T}/d: a disk directory must be the only image given");
    refused(&t, &["add", "--image", "a.hds", "--image", "d"], "{T}/d: a disk directory must be the only image given");
    let needs = "--snapshot needs a disk directory (a DiskDescriptor.xml) as the image";
    refused(&t, &["convert", "a.hds", "out.hds", "--snapshot", SNAP], needs);
    refused(&t, &["add", "--image", "a.hds", "--snapshot", SNAP], needs);
}

#[test]
fn formats_are_one_for_all_or_one_per_image() {
    let t = world();
    let wrong = "3 formats for 2 images: give one --format for all of them, or one per image in order (--format qcow2 --format ploop)";
    let three = ["--format", "ploop", "--format", "raw", "--format", "raw"];
    for verb in [&["info", "a.hds", "a.hds"][..], &["convert", "a.hds", "a.hds", "out.hds"], &["add", "--image", "a.hds", "--image", "a.hds"]] {
        let args: Vec<&str> = verb.iter().chain(three.iter()).copied().collect();
        refused(&t, &args, wrong);
    }
    // One per image reads each as declared: the second as raw shows the
    // ploop header's bytes as a raw disk's size, the first as ploop.
    let a = t.join("a.hds").display().to_string();
    let info = ploop(["info", &a, &a, "--format", "ploop", "--format", "raw", "--json"]).ok().json();
    let formats: Vec<&str> = info.as_array().unwrap().iter().map(|i| i["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["ploop", "raw"], "{info}");
    // qcow2 once for a stack declares its bottom (the only place a QCOW2
    // image can be); the rest are ploop.
    let q = t.join("q.qcow2");
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "16M"]).output().unwrap();
    assert!(out.status.success());
    let info = ploop(["info", q.to_str().unwrap(), &a, "--format", "qcow2", "--json"]).ok().json();
    let formats: Vec<&str> = info.as_array().unwrap().iter().map(|i| i["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["qcow2", "ploop"], "{info}");
}
