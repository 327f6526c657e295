//! What the fuzz targets (`fuzz/`) run, one function per parser that takes
//! outside bytes, shared with the regression test that replays every
//! corpus entry and every crash ever found (`tests/fuzz_corpus.rs`). Each
//! must return, never panic, whatever the bytes; an error is a fine answer.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::copy::{self, ReceiveOptions};
use crate::disk::Descriptor;
use crate::io::{block_on, Direct, SyncIo};
use crate::layers::{Format, Layer};

/// The fuzz targets, by name (the corpus directory of each).
pub const TARGETS: &[&str] = &["image", "descriptor", "stream", "paths", "request"];

/// Run `target` on `data`.
pub fn run(target: &str, data: &[u8], scratch: &Path) {
    match target {
        "image" => image(data, scratch),
        "descriptor" => descriptor(data),
        "stream" => stream(data, scratch),
        "paths" => paths(data, scratch),
        "request" => request(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// The bytes as an image file: check it, open it read-only and read all of
/// it, open it read-write (which may repair a stale mark, trim a tail, take
/// a format extension) and check again.
pub fn image(data: &[u8], scratch: &Path) {
    let path = scratch.join("image.hds");
    let _ = std::fs::remove_file(&path);
    if std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).is_err() {
        return;
    }
    let _ = block_on(crate::layers::ploop::check::check(&SyncIo, &path, Format::Ploop, false));
    if let Ok((layer, _)) = block_on(Layer::open(&SyncIo, &path, Format::Ploop, false, Direct::Off)) {
        read_some(&layer);
    }
    if let Ok((layer, _)) = block_on(Layer::open(&SyncIo, &path, Format::Ploop, true, Direct::Off)) {
        let _ = layer.take_saved_bitmaps();
        let _ = block_on(layer.close(&SyncIo));
    }
    let _ = block_on(crate::layers::ploop::check::check(&SyncIo, &path, Format::Ploop, true));
    qcow2_tables(data);
    qcow2_read(&path);
}

/// The file as a QCOW2 image through the reader: its first and last
/// clusters and a few reads across cluster bounds (bounded as `read_some`).
fn qcow2_read(path: &Path) {
    let Ok(q) = block_on(crate::layers::qcow2::Qcow2Image::open(&SyncIo, path)) else { return };
    let cluster = q.header().cluster_size();
    let mut buf = vec![0u8; (2 * cluster).min(1 << 20) as usize];
    let size = q.size();
    for at in [0, cluster / 2, cluster.saturating_mul(7) / 3, size.saturating_sub(buf.len() as u64), size.saturating_sub(1)] {
        let _ = block_on(q.read(&SyncIo, at, &mut buf));
        // What a merge of the image up asks of each stack cluster.
        let _ = block_on(q.holds_data(&SyncIo, at, 1 << 20));
    }
    let _ = q.cache_stats();
    let _ = block_on(q.check_tables(&SyncIo));
}

/// The same bytes as a QCOW2 image: its header, backing name and the
/// first tables' entries, decoded (bounded, as `read_some`).
fn qcow2_tables(data: &[u8]) {
    use crate::layers::qcow2::{entry, header::Header};
    let Ok(h) = Header::parse(data) else { return };
    let _ = h.backing_name(data);
    let len = data.len() as u64;
    let be64 = |at: Option<u64>| {
        let at = usize::try_from(at?).ok()?;
        data.get(at..at.checked_add(8)?).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    for i in 0..(h.l1_entries as u64).min(16) {
        let Some(raw) = be64(h.l1_offset.checked_add(i * 8)) else { break };
        let Ok(Some(l2)) = entry::l1_entry(raw, h.cluster_bits, len) else { continue };
        for j in 0..h.l2_entries().min(256) {
            let at = l2 + j * h.l2_entry_bytes();
            let Some(raw) = be64(Some(at)) else { break };
            let bitmap = if h.extended_l2 { Some(be64(Some(at + 8)).unwrap_or(0)) } else { None };
            if let Ok(e) = entry::l2_entry(raw, bitmap, h.cluster_bits, len) {
                for sub in 0..32 {
                    let _ = e.subcluster(sub, h.extended_l2, h.cluster_size() / 32);
                }
            }
        }
    }
}

fn read_some(layer: &Layer) {
    let Some(cluster) = layer.cluster_size() else { return };
    // Lookups of the first and last clusters (bounded: a hostile size must
    // not make the harness itself slow).
    let clusters = layer.size().div_ceil(cluster);
    for c in (0..clusters.min(64)).chain(clusters.saturating_sub(64)..clusters) {
        let _ = layer.lookup(c, cluster);
    }
}

/// The bytes as a control-socket request line, through the daemon's own
/// parser: what it takes serialises and parses back the same.
pub fn request(data: &[u8]) {
    if let Ok(request) = crate::protocol::parse_request(data) {
        let envelope = crate::protocol::Envelope { version: Some(crate::protocol::PROTOCOL_VERSION), request };
        let line = serde_json::to_vec(&envelope).expect("requests serialise");
        assert_eq!(crate::protocol::parse_request(&line).expect("a request we wrote parses"), envelope.request);
    }
}

pub fn descriptor(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = Descriptor::parse(text) {
            // What we parse, we can write and parse back alike.
            let again = Descriptor::parse(&d.to_xml()).expect("a descriptor we wrote parses");
            assert_eq!(again.top, d.top);
        }
    }
}

/// The bytes as a descriptor of a disk directory full of traps (a symlink
/// out, a symlinked directory, a hard link, a subdirectory): whatever its
/// deltas' names, one a command may write is a plain file below the
/// directory with no other link, and the names of new deltas are plain
/// file names.
pub fn paths(data: &[u8], scratch: &Path) {
    use crate::disk::{Disk, Place};
    use std::path::Component;
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(desc) = Descriptor::parse(text) else { return };
    let Some(dir) = trap_directory(scratch) else { return };
    let disk = Disk::from_parts(dir.clone(), desc);
    for img in &disk.desc.images {
        let place = disk.place(img);
        assert_eq!(disk.writable_path(img, "write").is_ok(), place == Place::Inside, "{}", img.file);
        if place != Place::Inside {
            continue;
        }
        let path = disk.file_path(img);
        let rel = path.strip_prefix(&dir).unwrap_or_else(|_| panic!("{}: inside, but {} is not below the directory", img.file, path.display()));
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))), "{}: inside, but {}", img.file, path.display());
        if let Ok(real) = std::fs::canonicalize(&path) {
            assert!(real.starts_with(&dir), "{}: inside, but leads to {}", img.file, real.display());
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(&real).map(|m| m.nlink()).unwrap_or(1), 1, "{}: inside, but hard-linked", img.file);
        }
    }
    for name in [disk.new_delta_name(), disk.switch_top_name()] {
        let parts: Vec<Component> = Path::new(&name).components().collect();
        assert!(matches!(parts[..], [Component::Normal(n)] if n == name.as_str()), "new delta name {name:?} is not a plain file name");
    }
}

/// `scratch/paths/disk`, made once: a delta `root.hds`, a subdirectory
/// with one, a symlink out (`evil.hds`), a symlink to the parent (`up`),
/// two hard links to one file; a victim next to the directory.
fn trap_directory(scratch: &Path) -> Option<PathBuf> {
    let top = scratch.join("paths");
    let dir = top.join("disk");
    if !dir.join("hl2.hds").exists() {
        let _ = std::fs::create_dir_all(dir.join("sub"));
        let _ = std::fs::write(top.join("victim"), b"victim");
        let _ = std::fs::write(dir.join("root.hds"), b"delta");
        let _ = std::fs::write(dir.join("sub/root.hds"), b"delta");
        let _ = std::os::unix::fs::symlink("../victim", dir.join("evil.hds"));
        let _ = std::os::unix::fs::symlink("..", dir.join("up"));
        let _ = std::fs::write(dir.join("hl.hds"), b"linked");
        let _ = std::fs::hard_link(dir.join("hl.hds"), dir.join("hl2.hds"));
    }
    std::fs::canonicalize(&dir).ok()
}

/// The bytes as a one-way copy stream into a new image.
pub fn stream(data: &[u8], scratch: &Path) {
    let dest: PathBuf = scratch.join("received.hds");
    let _ = std::fs::remove_file(&dest);
    let _ = std::fs::remove_dir_all(&dest);
    let opts = ReceiveOptions { two_way: false, incremental: false, direct: Direct::Off };
    if copy::receive(Box::new(std::io::Cursor::new(data.to_vec())), None, &dest, &opts).is_ok() {
        // A stream that was taken must have made a clean image.
        let report = block_on(crate::layers::ploop::check::check(&SyncIo, &dest, Format::Ploop, false)).expect("a received image checks");
        assert_eq!(report.verdict(), crate::layers::ploop::check::Verdict::Clean);
    }
}
