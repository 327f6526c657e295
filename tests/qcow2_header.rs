//! QCOW2 headers and tables as qemu-img makes them, read by our parser
//! (issue #22): qemu-img is the oracle for what each image says, and for
//! where each cluster's data is (`qemu-img map`).

use std::path::Path;
use std::process::Command;

use ublk_ploop::layers::qcow2::entry::{l1_entry, l2_entry, Mapping};
use ublk_ploop::layers::qcow2::header::{Compression, Header};

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn header_of(path: &Path) -> (Header, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let head = bytes[..bytes.len().min(2 << 20)].to_vec();
    (Header::parse(&head).unwrap_or_else(|e| panic!("{}: {e}", path.display())), bytes)
}

/// The images qemu-img makes, one per option set: each parses, with the
/// cluster size, disk size, version and features qemu-img says.
#[test]
fn headers_qemu_img_makes_parse_as_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, u32, bool, Compression)] = &[
        ("v2", "compat=0.10,cluster_size=65536", 2, false, Compression::Zlib),
        ("v3", "compat=1.1,cluster_size=65536", 3, false, Compression::Zlib),
        ("small", "cluster_size=512", 3, false, Compression::Zlib),
        ("big", "cluster_size=2M", 3, false, Compression::Zlib),
        ("ext", "extended_l2=on,cluster_size=128k", 3, true, Compression::Zlib),
        ("zstd", "compression_type=zstd", 3, false, Compression::Zstd),
    ];
    for &(name, opts, version, ext, comp) in cases {
        let path = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, path.to_str().unwrap(), "3G"]);
        let (h, _) = header_of(&path);
        let info = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(h.size, info["virtual-size"].as_u64().unwrap(), "{name}");
        assert_eq!(h.cluster_size(), info["cluster-size"].as_u64().unwrap(), "{name}");
        assert_eq!((h.version, h.extended_l2, h.compression), (version, ext, comp), "{name}");
        assert_eq!(h.backing_len, 0, "{name}");
    }
}

/// An overlay names its backing file and the backing file's format.
#[test]
fn an_overlay_names_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1G"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    let (h, bytes) = header_of(&top);
    assert_eq!(h.backing_name(&bytes).unwrap(), Some("base.qcow2"));
    assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
}

/// Every cluster of an image with data, zeros, compressed clusters and
/// holes decodes to what `qemu-img map` says of it.
#[test]
fn tables_decode_as_qemu_img_maps_them() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.raw");
    // 64 KiB clusters: data in clusters 0-1, zeros in 2, a hole at 3-4,
    // data in 5; then compressed and plain copies of it.
    let mut data = vec![0u8; 6 << 16];
    for (i, b) in data.iter_mut().enumerate() {
        let c = i >> 16;
        if c < 2 || c == 5 {
            *b = (i * 7 + c) as u8;
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for compressed in [false, true] {
        let img = dir.path().join(format!("img-{compressed}.qcow2"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        if compressed {
            args.push("-c");
        }
        args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        // (qemu-img leaves the zero cluster unallocated.)
        let (h, bytes) = header_of(&img);
        let len = bytes.len() as u64;
        let be64 = |at: u64| u64::from_be_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap());
        let l2 = l1_entry(be64(h.l1_offset), h.cluster_bits, len).unwrap().expect("an L2 table");
        let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
        let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
        for c in 0..6u64 {
            let e = l2_entry(be64(l2 + c * 8), None, h.cluster_bits, len).unwrap();
            let at = c << 16;
            let row = map.iter().find(|r| r["start"].as_u64().unwrap() <= at && at < r["start"].as_u64().unwrap() + r["length"].as_u64().unwrap()).unwrap();
            let has_data = row["data"].as_bool().unwrap();
            match e.mapping {
                Mapping::Data(off) => {
                    assert!(has_data && !compressed, "cluster {c}: {row}");
                    let start = row["start"].as_u64().unwrap();
                    assert_eq!(row["offset"].as_u64().map(|o| o + at - start), Some(off), "cluster {c}");
                    assert_eq!(&bytes[off as usize..(off + 65536) as usize], &data[at as usize..(at + 65536) as usize]);
                }
                Mapping::Compressed { offset, len } => {
                    assert!(has_data && compressed, "cluster {c}: {row}");
                    assert!(offset + len <= bytes.len() as u64);
                }
                Mapping::Zero | Mapping::Backing => {
                    assert!(!has_data, "cluster {c}: {row}");
                    assert!(data[at as usize..(at + 65536) as usize].iter().all(|&b| b == 0), "cluster {c}");
                }
            }
        }
    }
}

/// The fuzz corpus's QCOW2 seeds are images the parser takes, so that the
/// image target starts from the inside of the format, not its refusals.
#[test]
fn the_fuzz_seeds_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/image");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_str().unwrap().starts_with("qcow2-") {
            header_of(&path);
            seen += 1;
        }
    }
    assert!(seen >= 3, "{seen} QCOW2 seeds in {}", dir.display());
}
