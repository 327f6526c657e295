//! Damaged and hostile images: every tool must refuse them with a message
//! that names the problem, exit non-zero, and never panic (exit 101) or die
//! of a signal; the library must return an error, not panic.

mod common;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ublk_ploop::layers::ploop::check::{check, Verdict};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
/// Small clusters make a BAT longer than one cluster, so that a BAT entry
/// can point into the metadata: 4 MiB / 4 KiB = 1024 entries, the BAT ends
/// at byte 4160 and data starts at 8192 (cluster 2).
const SIZE: u64 = 4 * M;
const CLUSTER: u64 = 4 * K;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A valid image with data in virtual clusters 3 (slot 0) and 700 (slot 1).
fn good() -> ImageSpec {
    ImageSpec::v2(SIZE, CLUSTER).with_cluster(3, 0, &pattern(3, CLUSTER as usize)).with_cluster(
        700,
        1,
        &pattern(700, CLUSTER as usize),
    )
}

fn make(dir: &TempDir, name: &str, spec: &ImageSpec) -> PathBuf {
    let path = dir.join(name);
    spec.write(&path);
    path
}

fn open_err(path: &Path, read_only: bool) -> String {
    let paths = [path.to_path_buf()];
    let opts = StackOptions { read_only, direct: Direct::Auto, offline: false, link_log: None };
    match catch_unwind(AssertUnwindSafe(|| retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &opts)).map(|_| ())))) {
        Err(_) => panic!("Stack::open({}, read_only={read_only}) panicked", path.display()),
        Ok(Ok(())) => panic!("Stack::open({}, read_only={read_only}) accepted a bad image", path.display()),
        Ok(Err(e)) => e.to_string(),
    }
}

fn assert_mentions(text: &str, words: &[&str], what: &str) {
    let lower = text.to_lowercase();
    assert!(words.iter().any(|w| lower.contains(&w.to_lowercase())), "{what}: '{text}' mentions none of {words:?}");
}

/// `check` and `convert` refuse the image naming the problem, the library
/// refuses to open it, and nothing panics.
fn assert_rejected(dir: &TempDir, img: &Path, words: &[&str]) {
    ploop(["check", p(img)]).expect_clean_failure().mentions(words);
    let r = ploop(["check", p(img), "--json"]);
    r.expect_clean_failure();
    if !r.stdout.trim().is_empty() {
        // A report (rather than an error) must call the image corrupt.
        assert_eq!(r.json()["verdict"], "corrupt", "{}", r.stdout);
    }
    let out = dir.join("out.raw");
    let _ = fs::remove_file(&out);
    ploop(["convert", p(img), p(&out), "--to", "raw"]).expect_clean_failure().mentions(words);
    assert!(!out.exists(), "convert left {} behind after failing", out.display());
    let out = dir.join("out.ploop");
    ploop(["convert", p(img), p(&out)]).expect_clean_failure().mentions(words);
    assert!(!out.exists());
    assert_mentions(&open_err(img, true), words, "Stack::open read-only");
    assert_mentions(&open_err(img, false), words, "Stack::open read-write");
}

fn assert_info_rejects(img: &Path, words: &[&str]) {
    ploop(["info", p(img)]).expect_clean_failure().mentions(words);
    ploop(["info", p(img), "--json"]).expect_clean_failure();
}

/// Damage in the header: nothing can be trusted, so even `check --repair`
/// must give up (cleanly), leaving the file as it was.
fn header_damage(name: &str, spec: ImageSpec, words: &[&str]) {
    let dir = TempDir::new(name);
    let img = make(&dir, "bad.img", &spec);
    assert_rejected(&dir, &img, words);
    let print = fingerprint(&img);
    ploop(["check", p(&img), "--repair"]).expect_clean_failure().mentions(words);
    assert_eq!(fingerprint(&img), print, "a failed repair changed the file");
    assert_info_rejects(&img, words);
}

/// Damage in the BAT: refused until `check --repair`, which must leave an
/// image that both we and qemu accept, with the good cluster intact.
fn bat_damage(name: &str, spec: ImageSpec, words: &[&str]) {
    let dir = TempDir::new(name);
    let img = make(&dir, "bad.img", &spec);
    assert_rejected(&dir, &img, words);
    ploop(["check", p(&img)]).expect_code(2);
    ploop(["check", p(&img), "--repair"]).ok().mentions(&["repaired"]);
    ploop(["check", p(&img)]).ok();
    let out = dir.join("repaired.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    let data = fs::read(&out).unwrap();
    assert_eq!(data.len() as u64, SIZE);
    // Virtual cluster 3 was never damaged in any case.
    assert_bytes_equal(&data[3 * CLUSTER as usize..4 * CLUSTER as usize], &pattern(3, CLUSTER as usize), "cluster 3");
    if have_qemu() {
        qemu_check_clean(&img);
        let reference = dir.join("qemu.raw");
        qemu_to_raw(&img, &reference);
        assert_files_equal(&out, &reference);
    }
}

// ---------------------------------------------------------------------------
// Truncation.

#[test]
fn truncated_to_header_only() {
    let mut spec = good();
    spec.file_len = Some(64);
    header_damage("trunc-header", spec, &["truncated"]);
}

#[test]
fn truncated_in_the_middle_of_the_bat() {
    let mut spec = good();
    spec.file_len = Some(64 + 2048);
    header_damage("trunc-bat", spec, &["truncated"]);
}

#[test]
fn truncated_in_the_middle_of_the_header() {
    let mut spec = good();
    spec.file_len = Some(40);
    header_damage("trunc-mid-header", spec, &["too short", "truncated"]);
}

#[test]
fn bat_entry_past_end_of_file() {
    // The file ends 100 bytes into the second data cluster.
    let mut spec = good();
    spec.file_len = Some(spec.data_off() + CLUSTER + 100);
    bat_damage("past-eof", spec, &["past the end"]);
}

// ---------------------------------------------------------------------------
// Header fields.

#[test]
fn wrong_signature() {
    let mut spec = good();
    spec.magic = *b"WithouFreSpacExx";
    header_damage("magic", spec, &["signature", "not a ploop image"]);
}

#[test]
fn unsupported_version() {
    let mut spec = good();
    spec.version = 3;
    header_damage("version", spec, &["version"]);
}

#[test]
fn disk_size_overflows() {
    let mut spec = good();
    spec.size_sectors = u64::MAX;
    header_damage("size-overflow", spec, &["overflow"]);
}

#[test]
fn bat_too_small_for_the_disk() {
    let mut spec = good();
    spec.bat_entries = 1;
    header_damage("bat-small", spec, &["covers", "BAT"]);
}

#[test]
fn data_offset_inside_the_bat() {
    let mut spec = good();
    spec.data_off_sectors = 1;
    header_damage("dataoff-bat", spec, &["inside the BAT"]);
}

#[test]
fn data_offset_zero() {
    let mut spec = good();
    spec.data_off_sectors = 0;
    header_damage("dataoff-zero", spec, &["first data sector is 0"]);
}

#[test]
fn cluster_size_not_a_power_of_two() {
    let mut spec = good();
    spec.cluster_sectors = 3000;
    header_damage("cluster-3000", spec, &["power of two"]);
}

#[test]
fn cluster_size_zero() {
    let mut spec = good();
    spec.cluster_sectors = 0;
    header_damage("cluster-0", spec, &["cluster size"]);
}

// ---------------------------------------------------------------------------
// BAT entries.

#[test]
fn bat_entry_into_the_header() {
    // Value 1 = byte 4096: inside the BAT, before data_off (8192).
    let mut spec = good();
    spec.bat.push((10, 1));
    bat_damage("bat-into-meta", spec, &["into the header"]);
}

#[test]
fn bat_entry_misaligned_v1() {
    // v1 BAT values count sectors, so an entry can miss a cluster boundary.
    let mut spec = ImageSpec::v1(SIZE, CLUSTER).with_cluster(3, 0, &pattern(3, CLUSTER as usize));
    let stray = spec.data_off_sectors + 1;
    spec.bat.push((10, stray));
    spec.file_len = Some(spec.data_off() + 4 * CLUSTER);
    bat_damage("misaligned", spec, &["not cluster aligned"]);
}

#[test]
fn two_entries_share_one_cluster() {
    let mut spec = good();
    let shared = spec.bat[0].1;
    spec.bat.push((20, shared));
    bat_damage("dup", spec, &["another entry"]);
}

#[test]
fn info_flags_damaged_bat_entries() {
    // `info` reads the BAT to count allocations; it must not present a
    // damaged one as a healthy image.
    let dir = TempDir::new("info-bat");
    let mut past = good();
    past.file_len = Some(past.data_off() + CLUSTER + 100);
    let mut into = good();
    into.bat.push((10, 1));
    let mut dup = good();
    dup.bat.push((20, dup.bat[0].1));
    for (name, spec, words) in [
        ("past", past, &["past the end"][..]),
        ("into", into, &["into the header"][..]),
        ("dup", dup, &["another entry"][..]),
    ] {
        let img = make(&dir, name, &spec);
        assert_info_rejects(&img, words);
    }
}

// ---------------------------------------------------------------------------
// Whole-file oddities.

#[test]
fn zero_length_file() {
    let dir = TempDir::new("empty");
    let img = dir.join("empty.img");
    fs::write(&img, b"").unwrap();
    let words = ["empty", "zero", "no data"];
    assert_rejected(&dir, &img, &words);
    assert_info_rejects(&img, &words);
}

#[test]
fn random_bytes_after_the_signature() {
    let dir = TempDir::new("random");
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed);
        let len = 64 + rng.below(3 * CLUSTER) as usize;
        let mut bytes = rng.bytes(len);
        bytes[..16].copy_from_slice(if seed % 2 == 0 { MAGIC_V2 } else { MAGIC_V1 });
        if seed % 3 != 0 {
            // Get past the version check into the geometry.
            bytes[16..20].copy_from_slice(&2u32.to_le_bytes());
        }
        let img = dir.join(&format!("random{seed}.img"));
        fs::write(&img, &bytes).unwrap();
        for args in [vec!["info", p(&img)], vec!["check", p(&img)], vec!["check", p(&img), "--json"]] {
            ploop(&args).expect_clean_failure();
        }
        let out = dir.join("out.raw");
        ploop(["convert", p(&img), p(&out), "--to", "raw"]).expect_clean_failure();
        assert!(!out.exists());
        open_err(&img, true);
        open_err(&img, false);
        ploop(["check", p(&img), "--repair"]).expect_clean_failure();
        assert_eq!(fs::read(&img).unwrap(), bytes, "seed {seed}: a failed repair changed the file");
    }
}

/// Random damage to a valid image's header and BAT, checked in-process:
/// nothing panics, and `check` and `open` never disagree: an image `check`
/// finds clean opens, and an image that opens has no damaged BAT entries.
/// A repair that reports success leaves an image that opens.
#[test]
fn mutated_images_never_panic_and_check_agrees_with_open() {
    let dir = TempDir::new("mutate");
    let mut base = ImageSpec::v2(SIZE, CLUSTER);
    for (i, c) in [(0u32, 0u64), (3, 1), (700, 2), (1023, 3)] {
        base = base.with_cluster(i, c, &pattern(i as u64, CLUSTER as usize));
    }
    let original = dir.join("original.img");
    base.write(&original);
    let pristine = fs::read(&original).unwrap();
    let meta_end = 64 + 4 * base.bat_entries as usize;
    let interesting: Vec<usize> = (16..64).chain(64..76).chain(64 + 4 * 700..64 + 4 * 701).collect();
    let mut rng = Rng::new(0xbad);
    let mut problems = vec![];
    // UBLK_PLOOP_MUTATION_ROUNDS=N runs a longer campaign.
    let rounds = std::env::var("UBLK_PLOOP_MUTATION_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    for round in 0..rounds {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.below(3) {
            let at = if rng.below(2) == 0 {
                interesting[rng.below(interesting.len() as u64) as usize]
            } else {
                rng.below(meta_end as u64) as usize
            };
            bytes[at] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => bytes[at] ^ (1 << rng.below(8)),
                _ => rng.next_u64() as u8,
            };
        }
        if rng.below(8) == 0 {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        }
        let img = dir.join(&format!("m{round}.img"));
        fs::write(&img, &bytes).unwrap();
        let paths = [img.clone()];
        let ro = StackOptions { read_only: true, direct: Direct::Off, offline: false, link_log: None };
        let flags = if bytes.len() >= 56 { u32::from_le_bytes(bytes[52..56].try_into().unwrap()) } else { 0 };
        // Panics fail at once; disagreements are collected and listed.
        let opened = catch_unwind(AssertUnwindSafe(|| retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &ro)).map(|_| ()))))
            .unwrap_or_else(|_| panic!("round {round}: Stack::open panicked"));
        let report = catch_unwind(AssertUnwindSafe(|| retry_busy(|| block_on(check(&SyncIo, &img, ublk_ploop::layers::Format::Ploop, false)))))
            .unwrap_or_else(|_| panic!("round {round}: check panicked"));
        match (&opened, &report) {
            (Err(e), Ok(r)) if r.verdict() == Verdict::Clean => {
                problems.push(format!("round {round}: check says clean but open fails: {e}"))
            }
            (Ok(()), Err(e)) => problems.push(format!("round {round}: opens, but check fails: {e}")),
            (Ok(()), Ok(r)) if !r.bad_entries.is_empty() => problems.push(format!(
                "round {round}: opens, but check finds damaged entries {:?} (header flags {flags:#x})",
                r.bad_entries
            )),
            _ => {}
        }
        let repaired = catch_unwind(AssertUnwindSafe(|| retry_busy(|| block_on(check(&SyncIo, &img, ublk_ploop::layers::Format::Ploop, true)))))
            .unwrap_or_else(|_| panic!("round {round}: check --repair panicked"));
        if let Ok(r) = repaired {
            if r.verdict() != Verdict::Corrupt {
                let again = catch_unwind(AssertUnwindSafe(|| retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &ro)).map(|_| ()))))
                    .unwrap_or_else(|_| panic!("round {round}: Stack::open panicked after repair"));
                if let Err(e) = again {
                    problems.push(format!("round {round}: repaired ({:?}) but does not open: {e}", r.repairs));
                }
            }
        }
    }
    assert!(problems.is_empty(), "check and open disagree:\n{}", problems.join("\n"));
}

/// A header may claim a BAT far larger than the file: tools must notice
/// the file is too short before allocating memory for that BAT.
#[test]
fn huge_bat_claim_does_not_allocate() {
    let dir = TempDir::new("hugebat");
    let mut spec = ImageSpec::v2(SIZE, M);
    spec.bat_entries = u32::MAX;
    let bat_end = 64 + 4 * u32::MAX as u64;
    spec.data_off_sectors = (bat_end.next_multiple_of(M) / SECTOR) as u32;
    spec.file_len = Some(4096);
    let img = make(&dir, "huge.img", &spec);
    let good_img = make(&dir, "good.img", &good());

    // With a 256 MiB address-space limit a 16 GiB buffer cannot be had.
    let limited = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args).env_remove("RUST_LOG");
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 256 << 20, rlim_max: 256 << 20 };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        run(&mut cmd)
    };
    // Control: the limit itself is no obstacle to ordinary work.
    limited(&["info", p(&good_img)]).ok();
    let out = dir.join("good.raw");
    limited(&["convert", p(&good_img), p(&out), "--to", "raw"]).ok();

    limited(&["info", p(&img)]).expect_clean_failure().mentions(&["truncated", "BAT"]);
    limited(&["check", p(&img)]).expect_clean_failure().mentions(&["truncated"]);
    limited(&["convert", p(&img), p(&dir.join("x.raw")), "--to", "raw"])
        .expect_clean_failure()
        .mentions(&["truncated"]);
    open_err(&img, true);

    // The same claim in a sparse file long enough to hold it: the sizes pass
    // every structural check. Only the entries of the disk's own clusters
    // (four) are read, so memory follows the disk, not the claim.
    let sparse = dir.join("sparse.img");
    std::fs::copy(&img, &sparse).unwrap();
    std::fs::OpenOptions::new().write(true).open(&sparse).unwrap().set_len(bat_end.next_multiple_of(M)).unwrap();
    limited(&["info", p(&sparse)]).ok().mentions(&["4M"]);
    limited(&["check", p(&sparse)]).ok();
    let y = dir.join("y.raw");
    limited(&["convert", p(&sparse), p(&y), "--to", "raw"]).ok();
    assert_eq!(std::fs::read(&y).unwrap(), vec![0u8; SIZE as usize]);

    // Half a billion entries claimed by a 4 MiB disk whose data area starts
    // right after a normal BAT: the header contradicts itself. Each tool
    // says so in a few MiB of memory; check names no repair it cannot do,
    // and info does not pass the file size off as the disk size.
    let normal_len = std::fs::metadata(make(&dir, "normal.img", &good())).unwrap().len();
    let odd = make(&dir, "odd.img", &ImageSpec { bat_entries: 500_000_000, file_len: Some(normal_len), ..good() });
    let info = limited(&["info", "--json", p(&odd)]);
    assert!(info.stdout.contains("\"disk_size\": null"), "{}", info.stdout);
    limited(&["check", p(&odd)]).expect_code(2).mentions(&["beyond automatic repair", "backup"]);
    limited(&["check", "--repair", p(&odd)]).expect_code(2).mentions(&["beyond automatic repair"]);
    limited(&["convert", p(&odd), p(&dir.join("z.raw")), "--to", "raw"]).expect_clean_failure().mentions(&["inside the BAT"]);
}

// ---------------------------------------------------------------------------
// Things that are not damage.

/// v1 ("WithoutFreeSpace"): BAT values in sectors, data area right after
/// the BAT (not cluster aligned). qemu reads v1 too: both must agree.
fn v1_image_check(explicit_data_off: bool) {
    let dir = TempDir::new("v1");
    let cluster = 64 * K;
    let size = 8 * M;
    let mut spec = ImageSpec::v1(size, cluster).with_cluster(2, 0, &pattern(20, cluster as usize)).with_cluster(
        100,
        1,
        &pattern(21, cluster as usize / 2),
    );
    assert_ne!(spec.data_off() % cluster, 0, "test wants an unaligned v1 data area");
    assert_eq!(spec.bat[0].1 as u64, spec.data_off() / SECTOR, "v1 BAT values count sectors");
    if !explicit_data_off {
        spec.data_off_sectors = 0; // old images: data right after the BAT
    }
    let img = make(&dir, "v1.img", &spec);
    let mut model = vec![0u8; size as usize];
    model[2 * cluster as usize..3 * cluster as usize].copy_from_slice(&pattern(20, cluster as usize));
    model[100 * cluster as usize..][..cluster as usize / 2].copy_from_slice(&pattern(21, cluster as usize / 2));

    let out = dir.join("out.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    assert_bytes_equal(&fs::read(&out).unwrap(), &model, "v1 convert vs model");
    let info = ploop(["info", p(&img), "--json"]).ok().json();
    assert_eq!(info["variant"], "WithoutFreeSpace", "{info}");
    assert_eq!(info["allocated_clusters"], 2, "{info}");
    ploop(["check", p(&img)]).ok();
    let stack = open_stack(&[&img], true);
    let got = read_disk(&stack, &AnyIo::new("sync"), 192 * 1024);
    assert_bytes_equal(&got, &model, "v1 library read vs model");
    drop(stack);
    if have_qemu() {
        let reference = dir.join("qemu.raw");
        qemu_to_raw(&img, &reference);
        assert_files_equal(&out, &reference);
    }

    // Written through the library, it stays a v1 image qemu reads the same.
    let io = AnyIo::new("sync");
    let stack = open_stack(&[&img], false);
    let w1 = pattern(30, 3 * cluster as usize / 2);
    io.run(stack.write(&io, 2 * cluster + cluster / 2, &w1)).unwrap();
    let w2 = pattern(31, 8192);
    io.run(stack.write(&io, 50 * cluster, &w2)).unwrap();
    io.run(stack.close(&io)).unwrap();
    drop(stack);
    model[(2 * cluster + cluster / 2) as usize..][..w1.len()].copy_from_slice(&w1);
    model[50 * cluster as usize..][..w2.len()].copy_from_slice(&w2);
    assert_eq!(&fs::read(&img).unwrap()[..16], MAGIC_V1);
    ploop(["check", p(&img)]).ok();
    let out = dir.join("out2.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    assert_bytes_equal(&fs::read(&out).unwrap(), &model, "v1 after writes vs model");
    if have_qemu() {
        qemu_check_clean(&img);
        let reference = dir.join("qemu2.raw");
        qemu_to_raw(&img, &reference);
        assert_files_equal(&out, &reference);
    }
}

#[test]
fn v1_image_reads_right() {
    v1_image_check(true);
}

#[test]
fn v1_image_without_data_offset_reads_right() {
    v1_image_check(false);
}

/// The "empty" header flag makes `open` ignore the BAT. `check` must apply
/// the same rule: it must not call corrupt an image that opens fine (nor
/// "repair" a BAT that open ignores), or pass one that open refuses.
#[test]
fn empty_flag_check_agrees_with_open() {
    let dir = TempDir::new("emptyflag");
    let mut spec = good();
    spec.flags = 1;
    spec.bat.push((10, 5000)); // past the end of the file
    let img = make(&dir, "flagged.img", &spec);
    let paths = [img.clone()];
    let opened =
        retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &StackOptions { read_only: true, direct: Direct::Auto, offline: false, link_log: None })).map(|_| ()));
    let r = ploop(["check", p(&img), "--json"]);
    match opened {
        Ok(()) => assert_ne!(r.code(), 2, "opens fine, yet check calls it corrupt:\n{}", r.stdout),
        Err(e) => assert_eq!(r.code(), 2, "open refuses it ({e}), yet check passes it:\n{}", r.stdout),
    }
}

#[test]
fn a_bad_format_extension_is_reported_and_dropped() {
    // A header pointing at no valid extension: reads work, check names
    // it, and a read-write open drops it (as ploop does with a record it
    // cannot load) rather than refusing the disk.
    let dir = TempDir::new("ext");
    let mut spec = good();
    spec.ext_off = 1;
    let img = make(&dir, "ext.img", &spec);
    let stack = open_stack(&[&img], true);
    let mut buf = vec![0u8; CLUSTER as usize];
    block_on(stack.read(&SyncIo, 3 * CLUSTER, &mut buf)).unwrap();
    assert_bytes_equal(&buf, &pattern(3, CLUSTER as usize), "cluster 3");
    drop(stack);
    ploop(["check", p(&img)]).expect_code(2).mentions(&["format extension"]);
    let out = dir.join("out.raw");
    ploop(["convert", p(&img), p(&out), "--to", "raw"]).ok();
    let stack = open_stack(&[&img], false);
    block_on(stack.read(&SyncIo, 3 * CLUSTER, &mut buf)).unwrap();
    assert_bytes_equal(&buf, &pattern(3, CLUSTER as usize), "cluster 3 after a read-write open");
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_eq!(read_u64(&img, 56), 0, "the pointer is gone");
    ploop(["check", p(&img)]).ok();
}

#[test]
fn a_writable_open_after_an_unclean_stop_gives_back_clusters_leaked_inside_the_file() {
    // A process killed between allocating clusters and writing their BAT
    // entries can leave an unreferenced cluster below referenced ones (a
    // merge killed mid-copy did). The tail is trimmed on open; the middle
    // must be released too, or every later check reports the leak.
    let dir = TempDir::new("midleak");
    let mut spec = good().with_cluster(900, 3, &pattern(900, CLUSTER as usize));
    let data_off = spec.data_off();
    // Slots 0, 1 and 3 are referenced; slot 2 holds data nothing points at.
    spec.data.push((data_off + 2 * CLUSTER, pattern(2, CLUSTER as usize)));
    spec.in_use = IN_USE;
    let img = make(&dir, "unclean.img", &spec);
    let before = check_leaks(&img);
    assert_eq!(before, 1, "the crafted image should show one leaked cluster");
    let paths = [img.clone()];
    let (stack, reports) =
        retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None })))
            .expect("open read-write");
    assert!(reports[0].was_in_use);
    assert_eq!(reports[0].released_leak, CLUSTER);
    let mut buf = ublk_ploop::io::AlignedBuf::zeroed(CLUSTER as usize);
    for (virt, tag) in [(3u64, 3u64), (700, 700), (900, 900)] {
        block_on(stack.read(&SyncIo, virt * CLUSTER, &mut buf)).unwrap();
        assert!(buf[..] == pattern(tag, CLUSTER as usize)[..], "cluster {virt} changed");
    }
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    assert_eq!(check_leaks(&img), 0, "the leaked cluster is still there after a read-write open");
    let r = ploop(["check", p(&img)]);
    assert_eq!(r.code(), 0, "{}", r.stdout);
}

fn check_leaks(img: &Path) -> u64 {
    let report = block_on(check(&SyncIo, img, ublk_ploop::layers::Format::Ploop, false)).unwrap();
    report.leaked_clusters
}

#[test]
fn repair_on_a_filesystem_without_holes_leaves_inner_leaks_and_cuts_the_tail() {
    // Where punch_hole is refused, a leak inside the file cannot be given
    // back; it is harmless (nothing points at it), so repair must report
    // it and finish, not fail. A leaked tail is cut all the same.
    use common::inject::{FailEvery, Injection, Kind};
    let dir = TempDir::new("nopunch-repair");
    let mut spec = good().with_cluster(900, 3, &pattern(900, CLUSTER as usize));
    let data_off = spec.data_off();
    // Slots 0, 1 and 3 are referenced; slot 2 and the tail (4, 5) are not.
    for slot in [2, 4, 5] {
        spec.data.push((data_off + slot * CLUSTER, pattern(slot, CLUSTER as usize)));
    }
    let img = make(&dir, "leaky.img", &spec);
    assert_eq!(check_leaks(&img), 3, "the crafted image should show three leaked clusters");
    let before = dir.join("before.raw");
    ploop(["convert", p(&img), p(&before), "--to", "raw"]).ok();

    // Counted first, then refused by the filesystem.
    let io = Hooked { inner: Hooked { inner: SyncIo, hook: FailEvery(Kind::Punch, libc::EOPNOTSUPP) }, hook: Injection::new(None) };
    let r = block_on(check(&io, &img, ublk_ploop::layers::Format::Ploop, true)).expect("check --repair failed without holes");
    assert!(io.counts().punches > 0, "the repair never tried to punch: {r:?}");
    assert_eq!(r.leaked_clusters, 1, "{r:?}");
    assert_eq!(r.verdict(), Verdict::Leaks, "{r:?}");
    assert!(r.repairs.iter().any(|x| x.contains("cut from the end")), "the tail was not cut: {r:?}");
    assert!(!r.repairs.iter().any(|x| x.contains("released")), "claims a release that failed: {r:?}");
    assert!(
        r.not_repaired.iter().any(|x| x.starts_with("1 leaked cluster") && x.contains("cannot punch holes")),
        "the leak left and its reason are not reported: {r:?}"
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), data_off + 4 * CLUSTER, "the leaked tail is still there");
    let after = dir.join("after.raw");
    ploop(["convert", p(&img), p(&after), "--to", "raw"]).ok();
    assert_files_equal(&after, &before);
    // The reports agree with a fresh check: leaks only, exit 3.
    assert_eq!(check_leaks(&img), 1);
    ploop(["check", p(&img)]).expect_code(3);
    if have_qemu() {
        qemu_check_clean(&img);
    }
    // Where holes can be punched, the leak left behind goes too.
    let r = block_on(check(&SyncIo, &img, ublk_ploop::layers::Format::Ploop, true)).unwrap();
    assert!(r.not_repaired.is_empty(), "{r:?}");
    assert_eq!(r.leaked_clusters, 0, "{r:?}");
    let punched = dir.join("punched.raw");
    ploop(["convert", p(&img), p(&punched), "--to", "raw"]).ok();
    assert_files_equal(&punched, &before);
}

/// Counts the files the engine opens, by path.
#[derive(Default)]
struct CountOpens(std::cell::RefCell<Vec<PathBuf>>);

impl common::hooked::Hook for CountOpens {
    fn opening(&self, path: &Path, _: &ublk_ploop::io::OpenHow) {
        self.0.borrow_mut().push(path.to_path_buf());
    }
}

#[test]
fn a_file_named_twice_in_a_stack_is_refused_untouched_and_each_layer_is_opened_once() {
    let dir = TempDir::new("twice");
    let a = make(&dir, "a.img", &good());
    let b = make(&dir, "b.img", &ImageSpec::v2(SIZE, CLUSTER));
    let link = dir.join("a-link.img");
    fs::hard_link(&a, &link).unwrap();
    let sym = dir.join("a-sym.img");
    std::os::unix::fs::symlink(&a, &sym).unwrap();
    let print = fingerprint(&a);
    for read_only in [true, false] {
        for stack in [[&a, &a], [&a, &link], [&link, &a], [&sym, &a]] {
            let paths: Vec<PathBuf> = stack.iter().map(|p| p.to_path_buf()).collect();
            let opts = StackOptions { read_only, direct: Direct::Off, offline: false, link_log: None };
            let e = match retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &opts))) {
                Ok(_) => panic!("{paths:?} (read-only {read_only}) opened"),
                Err(e) => e,
            };
            assert!(e.to_string().contains("appears twice in the stack"), "{paths:?}: {e}");
            assert_eq!(fingerprint(&a), print, "{paths:?} (read-only {read_only}): a refused stack changed the file");
        }
    }
    // Two files: each is opened once, read-only or with a writable top.
    for read_only in [true, false] {
        let io = Hooked { inner: SyncIo, hook: CountOpens::default() };
        let paths = vec![a.clone(), b.clone()];
        let (stack, _) = retry_busy(|| block_on(Stack::open(&io, &paths, &StackOptions { read_only, direct: Direct::Off, offline: false, link_log: None })))
            .expect("two distinct files");
        assert_eq!(*io.0.borrow(), paths, "read-only {read_only}: not one open per layer");
        block_on(stack.close(&SyncIo)).unwrap();
    }
    assert_eq!(fingerprint(&a), print, "a lower layer changed");
}
