//! What files a command may touch: only those of its disk directory. A
//! descriptor naming a delta elsewhere (`../`, an absolute path, a symlink,
//! a hard link) may be read from, never written, grown, merged into,
//! created beside or removed; the fixed names the disk directory holds
//! (`DiskDescriptor.xml.tmp`, `.lck`) are never followed. Each test builds
//! a hostile directory next to a victim, runs the command, and checks that
//! nothing outside the disk directory changed, appeared or went away.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use ublk_ploop::disk::{Descriptor, Disk, Guid, ImageType, TOP_GUID};
use ublk_ploop::io::{block_on, SyncIo};

const M: u64 = 1024 * 1024;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// What a file tree holds, by path: a file's bytes' hash and length, a
/// symlink's target, or a directory. `skip` (the disk directory) is left out.
fn tree(root: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    use std::hash::{Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path == skip {
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                todo.push(path.clone());
                "dir".to_string()
            } else {
                let bytes = fs::read(&path).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                format!("{} bytes, {:016x}", bytes.len(), h.finish())
            };
            out.insert(path, what);
        }
    }
    out
}

/// A world: a scratch root holding the disk directory `ct` and whatever
/// victims a test puts next to it.
struct World {
    root: TempDir,
    ct: PathBuf,
}

impl World {
    fn new(tag: &str) -> World {
        let root = TempDir::new(tag);
        let ct = root.join("ct");
        World { root, ct }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// Everything outside the disk directory.
    fn outside(&self) -> BTreeMap<PathBuf, String> {
        tree(self.root.path(), &self.ct)
    }
    /// `ploop init` of `dir` with a recognisable cluster of data.
    fn disk_with_data(&self, dir: &Path, byte: u8) {
        ploop(["init", p(dir), "--size", "8M", "--cluster-size", "64K"]).ok();
        let base = dir.join("root.hds");
        let stack = open_stack(&[&base], false);
        block_on(stack.write(&SyncIo, 0, &[byte; 65536])).unwrap();
        block_on(stack.close(&SyncIo)).unwrap();
    }
    fn disk(&self) -> Disk {
        Disk::load(&self.ct).unwrap()
    }
    /// Rename a delta in the descriptor: the one whose file is `from`.
    fn rename_file(&self, from: &str, to: &str) {
        let mut d = self.disk();
        let img = d.desc.images.iter_mut().find(|i| i.file == from).unwrap_or_else(|| panic!("no delta {from}"));
        img.file = to.to_string();
        block_on(d.store(&SyncIo)).unwrap();
    }
    /// Run `args` (the disk directory appended), expect a refusal that
    /// mentions `words`, and nothing outside changed.
    fn refused(&self, args: &[&str], words: &[&str]) {
        let before = self.outside();
        let mut all: Vec<&str> = args.to_vec();
        all.push(p(&self.ct));
        ploop(&all).expect_clean_failure().mentions(words);
        assert_eq!(self.outside(), before, "{args:?} changed files outside the disk directory");
    }
}

/// A disk `ct` whose base is `base` (a path as the descriptor spells it)
/// under a top of its own: `ct` is made with a snapshot, then its base
/// file is removed and the descriptor pointed at `base` instead. Returns
/// the GUID of the base.
fn over_base(w: &World, base: &str) -> Guid {
    w.disk_with_data(&w.ct, 0xC7);
    ploop(["snapshot", p(&w.ct)]).ok();
    w.rename_file("root.hds", base);
    fs::remove_file(w.ct.join("root.hds")).unwrap();
    let d = w.disk();
    d.desc.chain(d.desc.top).unwrap()[0].guid
}

/// `snapshot-merge` of a top whose parent is another disk's base would
/// delete that base once merged up. Such a parent is shared (a template
/// under a clone): it is copied up into the top, dropped from the
/// descriptor and left as it was.
#[test]
fn merge_never_removes_a_base_outside() {
    let w = World::new("paths-merge");
    w.disk_with_data(&w.path("victimct"), 0x11);
    over_base(&w, "../victimct/root.hds");
    let before = w.outside();
    ploop(["snapshot-merge", p(&w.ct)]).ok();
    assert_eq!(w.outside(), before, "the merge changed files outside the disk directory");
    assert!(w.path("victimct/root.hds").exists());
    let d = w.disk();
    assert_eq!(d.desc.images.len(), 1);
    let top = d.file_path(&d.desc.images[0]);
    assert!(top.starts_with(&w.ct));
    let stack = open_stack(&[&top], true);
    let mut buf = vec![0u8; 65536];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "the shared base's data, copied up");
}

/// `snapshot-switch` on a disk whose top is an absolute path elsewhere
/// removed that file (the old top) — and served it read-write before.
#[test]
fn switch_refuses_a_top_outside() {
    let w = World::new("paths-switch-abs");
    w.disk_with_data(&w.path("victimct"), 0x22);
    w.disk_with_data(&w.ct, 0xC7);
    ploop(["snapshot", p(&w.ct)]).ok();
    let d = w.disk();
    let snap = d.desc.chain(d.desc.top).unwrap()[0].guid;
    let top = d.desc.image(TOP_GUID).unwrap().file.clone();
    let victim = w.path("victimct/root.hds");
    w.rename_file(&top, p(&victim));
    fs::remove_file(w.ct.join(&top)).unwrap();
    w.refused(&["snapshot-switch", "-u", &snap.to_string()], &["outside"]);
    assert!(victim.exists());
    // And no other command that writes the top goes through it either.
    w.refused(&["snapshot"], &["outside"]);
    w.refused(&["compact"], &["outside"]);
}

/// `resize` rewrote every delta's header: through a symlink, into another
/// disk's image.
#[test]
fn resize_refuses_a_symlinked_delta() {
    let w = World::new("paths-resize-link");
    w.disk_with_data(&w.path("victimct"), 0x33);
    w.disk_with_data(&w.ct, 0xC7);
    fs::remove_file(w.ct.join("root.hds")).unwrap();
    std::os::unix::fs::symlink("../victimct/root.hds", w.ct.join("root.hds")).unwrap();
    w.refused(&["resize", "--size", "16M"], &["symbolic link", "outside"]);
}

/// The same through a symlinked directory on the delta's path.
#[test]
fn resize_refuses_a_delta_below_a_symlinked_directory() {
    let w = World::new("paths-resize-dirlink");
    w.disk_with_data(&w.path("victimct"), 0x34);
    w.disk_with_data(&w.ct, 0xC7);
    std::os::unix::fs::symlink("../victimct", w.ct.join("sub")).unwrap();
    w.rename_file("root.hds", "sub/root.hds");
    w.refused(&["resize", "--size", "16M"], &["symbolic link", "outside"]);
}

/// A delta hard-linked to another disk's image: writing it writes both.
#[test]
fn resize_refuses_a_hard_linked_delta() {
    let w = World::new("paths-resize-hardlink");
    w.disk_with_data(&w.path("victimct"), 0x35);
    w.disk_with_data(&w.ct, 0xC7);
    fs::remove_file(w.ct.join("root.hds")).unwrap();
    fs::hard_link(w.path("victimct/root.hds"), w.ct.join("root.hds")).unwrap();
    w.refused(&["resize", "--size", "16M"], &["hard link"]);
}

/// A raw (Plain) disk whose delta is `../victim2.bin`: `resize` grew it.
#[test]
fn resize_refuses_a_plain_delta_outside() {
    let w = World::new("paths-resize-plain");
    let victim = w.path("victim2.bin");
    fs::write(&victim, vec![0x44u8; 8 * M as usize]).unwrap();
    fs::create_dir(&w.ct).unwrap();
    let desc = Descriptor::new(8 * M, M, "../victim2.bin", ImageType::Plain).unwrap();
    let disk = Disk::from_parts(fs::canonicalize(&w.ct).unwrap(), desc);
    block_on(disk.store(&SyncIo)).unwrap();
    w.refused(&["resize", "--size", "16M"], &["outside"]);
    assert_eq!(file_len(&victim), 8 * M);
}

/// `snapshot-delete` of a childless snapshot removes its file: not one
/// outside the directory.
#[test]
fn delete_never_removes_a_file_outside() {
    let w = World::new("paths-delete");
    w.disk_with_data(&w.path("victimct"), 0x55);
    w.disk_with_data(&w.ct, 0xC7);
    let guid = |d: &Disk, i: usize| d.desc.chain(d.desc.top).unwrap()[i].guid;
    ploop(["snapshot", p(&w.ct)]).ok();
    let base = guid(&w.disk(), 0);
    ploop(["snapshot", p(&w.ct)]).ok();
    let middle = guid(&w.disk(), 1);
    // Back to the base: `middle` has no child any more.
    ploop(["snapshot-switch", "-u", &base.to_string(), p(&w.ct)]).ok();
    let d = w.disk();
    assert!(d.desc.children(middle).is_empty());
    let file = d.desc.image(middle).unwrap().file.clone();
    w.rename_file(&file, "../victimct/root.hds");
    fs::remove_file(w.ct.join(&file)).unwrap();
    w.refused(&["snapshot-delete", "-u", &middle.to_string()], &["outside"]);
    assert!(w.path("victimct/root.hds").exists());
}

/// A disk whose base is a read-only template outside (`../template/root.hds`):
/// read, snapshotted (the new delta inside, named after the base's file
/// name only), switched (the new top inside too); merging into the
/// template is refused. The template never changes.
#[test]
fn a_template_outside_is_read_never_written() {
    let w = World::new("paths-template");
    w.disk_with_data(&w.path("template"), 0x66);
    let template = over_base(&w, "../template/root.hds");
    let outside = w.outside();
    // Reads: the template's cluster shows through.
    let raw = w.path("out.raw");
    ploop(["convert", "--to", "raw", p(&w.ct), p(&raw)]).ok();
    let bytes = fs::read(&raw).unwrap();
    assert!(bytes[..65536].iter().all(|&b| b == 0x66), "the template's data does not show");
    fs::remove_file(&raw).unwrap();
    // A snapshot: its new delta in the disk directory.
    let out = ploop(["snapshot", "--json", p(&w.ct)]).ok().json();
    let snap: Guid = out["guid"].as_str().unwrap().parse().unwrap();
    let new = PathBuf::from(out["file"].as_str().unwrap());
    assert_eq!(new.parent().unwrap(), fs::canonicalize(&w.ct).unwrap(), "new delta {} not in the disk directory", new.display());
    assert!(new.file_name().unwrap().to_str().unwrap().starts_with("root.hds.{"));
    assert_eq!(w.outside(), outside, "snapshot changed files outside the disk directory");
    // Merging into the template is refused; merging above it is fine.
    let d = w.disk();
    let over_template = d.desc.children(template)[0];
    w.refused(&["snapshot-merge", "-u", &over_template.to_string()], &["outside"]);
    ploop(["snapshot-merge", p(&w.ct)]).ok();
    assert!(w.disk().desc.shot(snap).is_none() || w.disk().desc.shot(over_template).is_none());
    // A switch to the template: the new top in the disk directory.
    let out = ploop(["snapshot-switch", "--json", "-u", &template.to_string(), p(&w.ct)]).ok().json();
    let new = PathBuf::from(out["file"].as_str().unwrap());
    assert_eq!(new.parent().unwrap(), fs::canonicalize(&w.ct).unwrap(), "new top {} not in the disk directory", new.display());
    assert_eq!(w.outside(), outside, "switch changed files outside the disk directory");
    // Still reads the template's data, and checks clean.
    ploop(["convert", "--to", "raw", p(&w.ct), p(&raw)]).ok();
    assert!(fs::read(&raw).unwrap()[..65536].iter().all(|&b| b == 0x66));
    fs::remove_file(&raw).unwrap();
    ploop(["check", p(&w.ct)]).ok();
    // A repair writes the disk's own deltas only: the template is checked
    // read-only and left as it was.
    let before = w.outside();
    ploop(["check", "--repair", p(&w.ct)]).ok().mentions(&["not repaired"]);
    assert_eq!(w.outside(), before, "repair changed files outside the disk directory");
}

/// `snapshot` stored the descriptor through `DiskDescriptor.xml.tmp`,
/// created with truncate: a hard link or a symlink planted there had its
/// target overwritten with XML.
#[test]
fn the_descriptor_temporary_is_never_written_through() {
    for link in ["hard", "symbolic"] {
        let w = World::new("paths-tmp");
        w.disk_with_data(&w.ct, 0xC7);
        let victim = w.path("victim.txt");
        fs::write(&victim, b"precious").unwrap();
        let tmp = w.ct.join("DiskDescriptor.xml.tmp");
        match link {
            "hard" => fs::hard_link(&victim, &tmp).unwrap(),
            _ => std::os::unix::fs::symlink(&victim, &tmp).unwrap(),
        }
        let before = w.outside();
        ploop(["snapshot", p(&w.ct)]).ok();
        assert_eq!(w.outside(), before, "a {link} link at the temporary's name: files outside changed");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(w.disk().desc.images.len(), 2);
    }
}

/// A dangling symlink at `DiskDescriptor.xml.lck` made every locked
/// command create its target.
#[test]
fn the_lock_file_is_never_a_symlink() {
    let w = World::new("paths-lck");
    w.disk_with_data(&w.ct, 0xC7);
    let target = w.path("created-by-root");
    std::os::unix::fs::symlink(&target, w.ct.join("DiskDescriptor.xml.lck")).unwrap();
    w.refused(&["snapshot"], &["symbolic link"]);
    w.refused(&["resize", "--size", "16M"], &["symbolic link"]);
    assert!(!target.exists());
}

/// `cd DIR && ublk-ploop info DiskDescriptor.xml`, as ploop is used: the
/// directory of a bare file name is the current one.
#[test]
fn a_bare_descriptor_name_means_the_current_directory() {
    let w = World::new("paths-bare");
    w.disk_with_data(&w.ct, 0xC7);
    let run_in = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args).current_dir(&w.ct).env_remove("RUST_LOG");
        run(&mut cmd)
    };
    let info = run_in(&["info", "--json", "DiskDescriptor.xml"]);
    info.ok();
    assert_eq!(info.json()["disk"], fs::canonicalize(&w.ct).unwrap().to_str().unwrap());
    run_in(&["snapshot", "DiskDescriptor.xml"]).ok();
    assert_eq!(w.disk().desc.images.len(), 2);
    run_in(&["snapshot-list", "DiskDescriptor.xml"]).ok();
}

/// Whatever a path is checked against, an image is written only through
/// its own name: a writable opening refuses a symlink (a read follows it).
#[test]
fn images_are_never_opened_for_writing_through_a_symlink() {
    use ublk_ploop::io::{open_image_file, Direct};
    let w = World::new("paths-nofollow");
    let real = w.path("real.hds");
    ploop(["create", p(&real), "--size", "8M"]).ok();
    let link = w.path("link.hds");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let before = w.outside();
    let e = open_image_file(&link, true, Direct::Off).map(drop).unwrap_err();
    assert_eq!(e.errno(), libc::ELOOP, "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    open_image_file(&link, false, Direct::Off).unwrap();
    ploop(["check", "--repair", p(&link)]).expect_clean_failure();
    ploop(["resize", "--size", "16M", p(&link)]).expect_clean_failure().mentions(&["symbolic link"]);
    assert_eq!(w.outside(), before);
}

/// A template outside left marked in use (a crash while something else
/// had it open read-write) would be repaired — written — by the opening
/// that serves the disk read-write: refused, saying where to repair it.
#[test]
fn a_template_outside_left_in_use_is_not_repaired_from_here() {
    let w = World::new("paths-template-in-use");
    w.disk_with_data(&w.path("template"), 0x77);
    over_base(&w, "../template/root.hds");
    write_u32(&w.path("template/root.hds"), 44, IN_USE);
    w.refused(&["snapshot"], &["marked in use"]);
    w.refused(&["compact"], &["marked in use"]);
    assert_eq!(in_use_mark(&w.path("template/root.hds")), IN_USE);
    // Reading it is still fine.
    let raw = w.path("out.raw");
    ploop(["convert", "--to", "raw", p(&w.ct), p(&raw)]).ok();
}

/// A FIFO or a device under a name a descriptor (or the command line)
/// gives is refused at once: opening a FIFO would hang the command, and
/// opening a device can have effects of its own.
#[test]
fn fifos_and_devices_are_refused_not_opened() {
    let w = World::new("paths-fifo");
    over_base(&w, "../fifo");
    let fifo = w.path("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Bounded: on the old code each of these hung forever on the FIFO.
    let bounded = |args: &[&str]| {
        let mut cmd = std::process::Command::new("timeout");
        cmd.arg("20").arg(bin()).args(args).env_remove("RUST_LOG");
        run(&mut cmd)
    };
    let out = w.root.join("out.raw");
    for args in [vec!["info"], vec!["check"], vec!["snapshot"], vec!["snapshot-merge"], vec!["convert", "--to", "raw"]] {
        let mut all = args.clone();
        all.push(p(&w.ct));
        if args[0] == "convert" {
            all.push(p(&out));
        }
        let r = bounded(&all);
        assert_ne!(r.code(), 124, "{args:?} hung on a FIFO");
        r.expect_clean_failure().mentions(&["FIFO"]);
    }
    assert!(!out.exists());
    // An image or a descriptor given by path that is a FIFO or a device.
    for args in [vec!["info", p(&fifo)], vec!["check", p(&fifo)], vec!["info", "/dev/null"], vec!["snapshot-list", p(&fifo)]] {
        let r = bounded(&args);
        assert_ne!(r.code(), 124, "{args:?} hung");
        assert_ne!(r.code(), 0, "{args:?} accepted a FIFO or a device");
    }
    // The same FIFO as the disk's descriptor.
    let d2 = w.path("ct2");
    fs::create_dir(&d2).unwrap();
    std::process::Command::new("mkfifo").arg(d2.join("DiskDescriptor.xml")).status().unwrap();
    let r = bounded(&["info", p(&d2)]);
    assert_ne!(r.code(), 124, "a FIFO descriptor hung info");
    r.expect_clean_failure().mentions(&["FIFO"]);
}
