//! QCOW2 images read through our reader (issue #22), with qemu-img as the
//! oracle: every image qemu makes reads byte-identical to what
//! `qemu-img convert -O raw` makes of it, and `ublk-ploop convert --format
//! qcow2` gives a ploop image that qemu-img reads back the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use ublk_ploop::io::{block_on, SyncIo};
use ublk_ploop::layers::qcow2::Qcow2Image;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("runs");
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img.to_str().unwrap());
    run("qemu-io", &args);
}

/// What qemu reads of `img` (its whole chain).
fn oracle(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("oracle.raw");
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    std::fs::read(&raw).unwrap()
}

/// What our reader reads of `img`, in pieces of `piece` bytes from `skew`
/// (pieces that straddle clusters and subclusters).
fn ours(img: &Path, piece: usize, skew: usize) -> Vec<u8> {
    let q = block_on(Qcow2Image::open(&SyncIo, img)).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let size = q.size() as usize;
    let mut out = vec![0xa5u8; size];
    let mut at = 0;
    let mut first = skew.min(size);
    while at < size {
        let n = if first > 0 { std::mem::take(&mut first) } else { piece.min(size - at) };
        block_on(q.read(&SyncIo, at as u64, &mut out[at..at + n])).unwrap();
        at += n;
    }
    out
}

fn check(img: &Path, what: &str) {
    let want = oracle(img);
    for (piece, skew) in [(1 << 20, 0), (7 * 512, 3 * 512), (65536 + 512, 4096)] {
        let got = ours(img, piece, skew);
        assert_eq!(got.len(), want.len(), "{what}: size");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("{what}: byte {i} reads {:#x}, qemu reads {:#x} (pieces of {piece} from {skew})", got[i], want[i]);
        }
    }
}

/// Data, zeros written as zeros, holes and rewrites, at unaligned places.
fn scribble(img: &Path) {
    qemu_io(
        img,
        "qcow2",
        &[
            "write -P 0x11 0 192k",
            "write -P 0x22 1000k 24k",
            "write -z 64k 64k",
            "write -P 0x33 3m 8k",
            "write -P 0x44 4194816 1536",
            "write -z -u 3m 4k",
        ],
    );
}

fn mk(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, p.to_str().unwrap(), "6M"]);
    p
}

#[test]
fn images_of_every_layout_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("v2", "compat=0.10,cluster_size=65536"),
        ("v3", "compat=1.1"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2M"),
        ("ext16k", "extended_l2=on,cluster_size=16k"),
        ("ext2m", "extended_l2=on,cluster_size=2M"),
    ] {
        let img = mk(dir.path(), name, opts);
        scribble(&img);
        check(&img, name);
    }
}

#[test]
fn compressed_images_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = mk(dir.path(), "src", "cluster_size=65536");
    scribble(&src);
    for (name, opts) in [
        ("zlib", "cluster_size=65536"),
        ("zstd", "compression_type=zstd"),
        ("zlib-512", "cluster_size=512"),
        ("zstd-2m", "compression_type=zstd,cluster_size=2M"),
        ("zstd-ext", "compression_type=zstd,extended_l2=on,cluster_size=32k"),
    ] {
        let img = dir.path().join(name);
        run("qemu-img", &["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", opts, src.to_str().unwrap(), img.to_str().unwrap()]);
        check(&img, name);
    }
}

#[test]
fn backing_chains_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, (0..5 << 20).map(|i: u32| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let mid = dir.path().join("mid.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid.to_str().unwrap(), "6M"]);
    qemu_io(&mid, "qcow2", &["write -P 0x55 512k 100k", "write -z 2m 64k"]);
    let top = dir.path().join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", &["write -P 0x66 520k 4k", "write -z -u 0 4k"]);
    check(&top, "a chain of qcow2, qcow2 and a shorter raw");
    // info names the chain; check reads the image's tables (clean) and
    // leaves repairs to qemu-img.
    let bin = env!("CARGO_BIN_EXE_ublk-ploop");
    let out = Command::new(bin).args(["info", top.to_str().unwrap(), "--format", "qcow2", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((info["format"].as_str(), info["disk_size"].as_u64()), (Some("qcow2"), Some(6 << 20)), "{info}");
    assert_eq!(info["qcow2"]["extended_l2"], true, "{info}");
    assert!(info["qcow2"]["backing"][0].as_str().unwrap().ends_with("mid.qcow2"), "{info}");
    assert!(info["qcow2"]["backing"][1].as_str().unwrap().ends_with("base.raw"), "{info}");
    let out = Command::new(bin).args(["check", top.to_str().unwrap(), "--format", "qcow2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new(bin).args(["check", top.to_str().unwrap(), "--format", "qcow2", "--repair"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("qemu-img check -r"));
    let q = block_on(Qcow2Image::open(&SyncIo, &top)).unwrap();
    assert_eq!(q.chain().len(), 3, "the raw file ends the chain");

    // A backing file whose format the image does not name is refused, not guessed.
    // (qemu-img no longer makes one: its backing format extension is
    // renamed to one nobody knows.)
    let bare = dir.path().join("bare.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", bare.to_str().unwrap(), "6M"]);
    let mut bytes = std::fs::read(&bare).unwrap();
    let at = bytes.windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x0b, 0xad, 0xca, 0xfe]);
    std::fs::write(&bare, bytes).unwrap();
    let err = block_on(Qcow2Image::open(&SyncIo, &bare)).err().expect("refused").to_string();
    assert!(err.contains("never guessed"), "{err}");

    // A backing file that is not a regular file is not followed.
    for (name, dev) in [("dev.qcow2", "/dev/zero"), ("blk.qcow2", "/dev/loop0")] {
        let img = dir.path().join(name);
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", dev, "-F", "raw", img.to_str().unwrap(), "6M"]);
        let err = block_on(Qcow2Image::open(&SyncIo, &img)).err().expect("refused").to_string();
        assert!(err.contains(dev), "{err}");
    }
}

/// `convert --format qcow2` to ploop and to raw: qemu-img reads the ploop
/// image back as the QCOW2 image, and the raw one is the same bytes.
#[test]
fn convert_makes_ploop_and_raw_images_of_a_qcow2_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = mk(dir.path(), "src", "compression_type=zstd");
    scribble(&src);
    let packed = dir.path().join("packed.qcow2");
    run("qemu-img", &["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type=zstd", src.to_str().unwrap(), packed.to_str().unwrap()]);
    let want = oracle(&packed);
    let bin = env!("CARGO_BIN_EXE_ublk-ploop");
    let hds = dir.path().join("out.hds");
    run(bin, &["convert", packed.to_str().unwrap(), hds.to_str().unwrap(), "--format", "qcow2"]);
    run("qemu-img", &["check", "-f", "parallels", hds.to_str().unwrap()]);
    let back = dir.path().join("back.raw");
    run("qemu-img", &["convert", "-f", "parallels", "-O", "raw", hds.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == want, "the ploop image reads other than the QCOW2 one");
    let raw = dir.path().join("out.raw");
    run(bin, &["convert", packed.to_str().unwrap(), raw.to_str().unwrap(), "--format", "qcow2", "--to", "raw"]);
    assert!(std::fs::read(&raw).unwrap() == want, "the raw image differs");
}
