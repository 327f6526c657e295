//! Headers that claim more than their file holds: memory must follow the
//! data, not the claim. Each image is a sparse file (cheap to make: the
//! header fields set, the file truncated large), each tool runs under an
//! address-space limit, and its peak resident memory is measured. A tool
//! either answers correctly or refuses cleanly, and stays small.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// Address space each child may use: enough for the old behaviour to show
/// (it filled gigabytes before failing), far below the machine's memory.
const AS_LIMIT: u64 = 3 << 30;
/// Peak resident memory allowed.
const RSS_BOUND_KB: i64 = 200 * 1024;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ublk-ploop")
}

/// Run the tool under the limit; its result and peak RSS (KiB).
fn run_limited(args: &[&str]) -> (Run, i64) {
    let what = format!("ublk-ploop {args:?}");
    let mut child = Command::new("prlimit")
        .arg(format!("--as={AS_LIMIT}"))
        .arg(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit runs");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    let _ = out.read_to_string(&mut stdout);
    let stderr = t.join().unwrap();
    // Reaped here (not by Child) to get this child's own resource usage;
    // prlimit execs the tool, so the pid is the tool's.
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (Run { code, stdout, stderr, what }, usage.ru_maxrss)
}

/// A v2 header with `entries` BAT entries of 512-byte clusters covering the
/// whole table (the disk is as large as the table says), the data area
/// right after the BAT, and the file ending there: a valid, empty image
/// whose table is one big hole.
fn hostile(path: &Path, entries: u32) -> u64 {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(MAGIC_V2);
    for v in [2u32, 16, 0, 1, entries] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&(entries as u64).to_le_bytes()); // disk size in sectors
    let data_off = (HEADER_SIZE + 4 * entries as u64).div_ceil(SECTOR);
    for v in [0u32, data_off as u32, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u64.to_le_bytes());
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(&h, 0).unwrap();
    f.set_len(data_off * SECTOR).unwrap();
    data_off * SECTOR
}

/// The image as a writable stack of one layer, through the page cache.
fn open_rw(img: &Path) -> Stack {
    let opts = StackOptions { direct: Direct::Off, ..Default::default() };
    block_on(Stack::open(&SyncIo, &[img.to_path_buf()], &opts)).unwrap().0
}

fn small(name: &str, rss: i64) {
    assert!(rss > 0 && rss < RSS_BOUND_KB, "{name}: peak RSS {rss} KiB, bound {RSS_BOUND_KB} KiB");
}

fn info_and_check(entries: u32) {
    let dir = TempDir::new("hostile");
    let img = dir.join("claim.hds");
    let file_len = hostile(&img, entries);
    let p = img.to_str().unwrap();

    let (r, rss) = run_limited(&["info", "--json", p]);
    r.ok();
    let j = r.json();
    let j = if j.is_array() { j[0].clone() } else { j };
    assert_eq!(j["bat_entries"], entries as u64, "{}", r.stdout);
    assert_eq!(j["allocated_clusters"], 0);
    assert_eq!(j["disk_size"], entries as u64 * 512);
    assert_eq!(j["file_size"], file_len);
    small("info", rss);

    let (r, rss) = run_limited(&["check", p]);
    r.ok();
    small("check", rss);

    let out = dir.join("out.hds");
    let (r, rss) = run_limited(&["convert", p, out.to_str().unwrap()]);
    r.expect_clean_failure().mentions(&["clusters"]);
    assert!(!out.exists(), "a refused convert leaves no destination");
    small("convert", rss);
}

/// 2 GiB of table: 2^29 entries.
#[test]
fn table_of_two_gib() {
    info_and_check(1 << 29);
}

/// The largest claim a header can make: 2^32 - 1 entries, a 16 GiB table.
#[test]
fn table_of_sixteen_gib() {
    info_and_check(u32::MAX);
}

/// A damaged entry deep inside a mostly sparse table is still found (the
/// holes skipped are only holes), and repair mends it.
#[test]
fn damage_inside_a_sparse_table_is_found() {
    let dir = TempDir::new("hostile");
    let img = dir.join("claim.hds");
    let entries = 1u32 << 24;
    hostile(&img, entries);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // Entry 10_000_000 points past the end of the file.
    f.write_all_at(&u32::MAX.to_le_bytes(), HEADER_SIZE + 4 * 10_000_000).unwrap();
    drop(f);
    let p = img.to_str().unwrap();
    let (r, rss) = run_limited(&["check", "--json", p]);
    r.expect_code(2);
    let j = r.json();
    let bad = j["deltas"][0]["report"]["bad_entries"].as_array().unwrap_or_else(|| panic!("{}", r.stdout));
    assert_eq!(bad.len(), 1, "{}", r.stdout);
    assert_eq!(bad[0]["index"], 10_000_000);
    small("check", rss);
    let (r, _) = run_limited(&["check", "--repair", p]);
    r.ok();
    let (r, _) = run_limited(&["check", p]);
    r.ok();
    let mut entry = [0u8; 4];
    std::fs::File::open(&img).unwrap().read_exact_at(&mut entry, HEADER_SIZE + 4 * 10_000_000).unwrap();
    assert_eq!(entry, [0; 4]);
}

/// A 2 GiB file that is no descriptor, named as one: refused unread.
#[test]
fn huge_descriptor_is_refused_unread() {
    let dir = TempDir::new("hostile");
    let xml = dir.join("DiskDescriptor.xml");
    let f = std::fs::File::create(&xml).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    for args in [vec!["snapshot-list", xml.to_str().unwrap()], vec!["info", dir.path().to_str().unwrap()]] {
        let (r, rss) = run_limited(&args);
        r.expect_clean_failure().mentions(&["not a DiskDescriptor.xml"]);
        small(&args[0].to_string(), rss);
    }
}

/// The engine itself follows the data: a writable stack over a table that
/// claims 2^29 entries (2 GiB of table, 4.6 GB of tables in memory when
/// they were flat) holds a few MiB, and serves reads and writes.
#[test]
fn a_stack_over_a_huge_claim_holds_tables_that_follow_the_data() {
    let dir = TempDir::new("hostile");
    let img = dir.join("claim.hds");
    hostile(&img, 1 << 29);
    let stack = open_rw(&img);
    let bytes = block_on(stack.table_bytes());
    assert!(bytes < 16 << 20, "tables of {bytes} bytes for an empty table");
    let far = ((1u64 << 29) - 1) * 512;
    block_on(stack.write(&SyncIo, far, &[7u8; 512])).unwrap();
    block_on(stack.write(&SyncIo, 0, &[9u8; 512])).unwrap();
    let mut buf = [0u8; 512];
    block_on(stack.read(&SyncIo, far, &mut buf)).unwrap();
    assert_eq!(buf, [7u8; 512]);
    assert!(block_on(stack.table_bytes()) < bytes + (64 << 10), "two writes cost more than two chunks each");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let (r, _) = run_limited(&["check", img.to_str().unwrap()]);
    r.ok();
}

/// A 64 TiB thin image of 1 MiB clusters, as we create it: its table is
/// allocated but unwritten, so opening it reads only the blocks that hold
/// entries, and its tables hold the directory plus a chunk per written
/// spot, wherever the writes landed.
#[test]
fn a_thin_disk_of_64_tib_opens_holding_what_was_written() {
    let dir = TempDir::new("hostile");
    let img = dir.join("thin.hds");
    let (size, cluster) = (64u64 << 40, 1u64 << 20);
    block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &img, size, cluster)).unwrap();
    let spots: Vec<u64> = (0..16).map(|i| i * (size / 16) + i * cluster).collect();
    {
        let stack = open_rw(&img);
        for (i, &at) in spots.iter().enumerate() {
            block_on(stack.write(&SyncIo, at + 4096, &[i as u8 + 1; 4096])).unwrap();
        }
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let stack = open_rw(&img);
    let bytes = block_on(stack.table_bytes());
    // Directories: 1 MiB of table, 256 KiB of owner map; 16 chunks of each.
    assert!(bytes < (1 << 20) + (256 << 10) + 16 * 8192 + 4096, "tables of {bytes} bytes");
    for (i, &at) in spots.iter().enumerate() {
        let mut buf = vec![0u8; 8192];
        block_on(stack.read(&SyncIo, at, &mut buf)).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == i as u8 + 1), "spot {i}");
    }
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    // The table's bytes past the first block were never written out.
    let f = std::fs::File::open(&img).unwrap();
    let data = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 4096, libc::SEEK_DATA) };
    assert!(data >= 4096 + 4 * 16 || data < 0, "table written from {data} on");
    let (r, _) = run_limited(&["check", img.to_str().unwrap()]);
    r.ok();
}

/// Bytes after the last used entry, in the table's last block (a header
/// may claim more entries than the disk uses), are rewritten as they were
/// when that block carries a new entry.
#[test]
fn bytes_after_the_used_entries_survive_a_table_write() {
    let dir = TempDir::new("hostile");
    let img = dir.join("tail.hds");
    block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &img, 1 << 20, 64 << 10)).unwrap();
    // 16 clusters used; claim 64 entries and put bytes after the 16th.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    f.write_all_at(&64u32.to_le_bytes(), 32).unwrap();
    let tail_at = HEADER_SIZE + 4 * 16;
    f.write_all_at(b"kept-bytes", tail_at).unwrap();
    drop(f);
    let stack = open_rw(&img);
    block_on(stack.write(&SyncIo, 15 * (64 << 10), &[3u8; 4096])).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    let mut got = [0u8; 10];
    std::fs::File::open(&img).unwrap().read_exact_at(&mut got, tail_at).unwrap();
    assert_eq!(&got, b"kept-bytes");
    let mut entry = [0u8; 4];
    std::fs::File::open(&img).unwrap().read_exact_at(&mut entry, tail_at - 4).unwrap();
    assert_ne!(entry, [0; 4], "the 16th cluster's entry was written");
}

/// Offline table rewrites follow the data too: compacting and growing an
/// image whose table claims 2^29 entries stays small, and the result
/// checks clean.
#[test]
fn compact_and_resize_of_a_huge_claim_stay_small() {
    let dir = TempDir::new("hostile");
    let img = dir.join("claim.hds");
    hostile(&img, 1 << 29);
    let p = img.to_str().unwrap();
    let (r, rss) = run_limited(&["compact", p]);
    r.ok();
    small("compact", rss);
    let grown = ((1u64 << 29) * 512 + (1 << 20)).to_string();
    let (r, rss) = run_limited(&["resize", p, "--size", &grown]);
    r.ok();
    small("resize", rss);
    let (r, _) = run_limited(&["check", p]);
    r.ok();
}

/// Growing a thin disk writes no table: the area the table grows into is
/// allocated, not written, so the grown disk still opens by its entries.
#[test]
fn growing_a_thin_disk_leaves_its_table_holes() {
    let dir = TempDir::new("hostile");
    let img = dir.join("thin.hds");
    let cluster = 1u64 << 20;
    block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &img, 1 << 40, cluster)).unwrap();
    {
        let stack = open_rw(&img);
        block_on(stack.write(&SyncIo, (1 << 40) - 4096, &[5u8; 4096])).unwrap();
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let p = img.to_str().unwrap();
    // 64 TiB: the table (256 MiB) no longer fits in front of the data.
    let (r, rss) = run_limited(&["resize", p, "--size", &(64u64 << 40).to_string()]);
    r.ok();
    small("resize", rss);
    let f = std::fs::File::open(&img).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: plain syscall on a descriptor we own.
    // The old table ended at 4 MiB + 64; the new one ends at 256 MiB + 64.
    let data = unsafe { libc::lseek(fd, (4 << 20) + 4096, libc::SEEK_DATA) };
    assert!(data < 0 || data as u64 >= 257 << 20, "table area written at {data}");
    let (r, _) = run_limited(&["check", p]);
    r.ok();
    let stack = open_rw(&img);
    let mut buf = vec![0u8; 4096];
    block_on(stack.read(&SyncIo, (1 << 40) - 4096, &mut buf)).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    assert_eq!(stack.size(), 64 << 40);
}

/// Converting a thin disk visits the clusters its layers hold, not every
/// cluster of its size: an 8 TiB disk with three clusters written reports
/// progress a handful of times (a walk of all 2^23 clusters reported every
/// 64), and the copy holds exactly what was written, at 64 KiB clusters
/// (a source cluster split into sixteen, the zero ones left out).
#[test]
fn converting_a_thin_disk_visits_its_data_not_its_size() {
    use ublk_ploop::convert::{convert, ConvertOptions};
    use ublk_ploop::layers::Format;
    use ublk_ploop::LayerSpec;
    let dir = TempDir::new("hostile");
    let img = dir.join("thin.hds");
    let (size, cluster) = (8u64 << 40, 1u64 << 20);
    block_on(ublk_ploop::layers::PloopLayer::create(&SyncIo, &img, size, cluster)).unwrap();
    let spots = [0, size / 3 / cluster * cluster + 8192, size - cluster + 65536];
    {
        let stack = open_rw(&img);
        for (i, &at) in spots.iter().enumerate() {
            block_on(stack.write(&SyncIo, at, &[i as u8 + 1; 4096])).unwrap();
        }
        block_on(stack.close(&SyncIo)).unwrap();
    }
    let out = dir.join("out.hds");
    let mut reports = 0;
    let opts = ConvertOptions { to: Format::Ploop, cluster_size: Some(64 << 10), direct: Direct::Off };
    let spec = LayerSpec { path: img.clone(), format: Format::Ploop };
    let stats = block_on(convert(&SyncIo, &[spec], &out, &opts, &mut |_, _| reports += 1)).unwrap();
    assert!(reports < 16, "{reports} progress reports: the walk visited the whole disk");
    assert_eq!((stats.copied_clusters, stats.copied_bytes), (3, 3 * 65536), "{stats:?}");
    let copy = open_rw(&out);
    for (i, &at) in spots.iter().enumerate() {
        let mut buf = vec![0u8; 8192];
        block_on(copy.read(&SyncIo, at, &mut buf)).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == i as u8 + 1) && buf[4096..].iter().all(|&b| b == 0), "spot {i}");
    }
    block_on(copy.close(&SyncIo)).unwrap();
}
