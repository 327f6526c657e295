//! Every input the fuzz targets (`fuzz/`) keep — the seed corpus and every
//! crash or hang ever found (`fuzz/regressions/<target>/`) — runs through
//! the same harness on every `cargo test`, so a fixed crash stays fixed.
//! `cargo test --test fuzz_corpus -- --ignored make_seed_corpus` rewrites
//! the seeds from images the engine and qemu-img make.

mod common;

use std::path::{Path, PathBuf};

use common::TempDir;
use ublk_ploop::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_kept_input_runs_clean() {
    let scratch = TempDir::new("fuzz-corpus");
    let mut ran = 0;
    for &target in fuzzing::TARGETS {
        let mut seeds = 0;
        for kind in ["corpus", "regressions"] {
            let dir = fuzz_dir().join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let t = std::time::Instant::now();
                let outcome = std::panic::catch_unwind(|| fuzzing::run(target, &data, scratch.path()));
                assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
                // A hang the fuzzer found (it allowed 1 s) stays fixed;
                // the bound is loose for slow machines.
                assert!(t.elapsed().as_secs() < 10, "{target}: {} took {:?}", path.display(), t.elapsed());
                ran += 1;
                seeds += (kind == "corpus") as usize;
            }
        }
        assert!(seeds > 0, "no seed corpus for {target}");
    }
    assert!(ran >= 10, "only {ran} inputs");
}

/// Rewrite the seed corpus (small inputs: 512-byte clusters).
#[test]
#[ignore]
fn make_seed_corpus() {
    use ublk_ploop::io::{block_on, SyncIo};
    use ublk_ploop::layers::PloopLayer;
    let tmp = TempDir::new("fuzz-seeds");
    let out = |target: &str, name: &str, bytes: &[u8]| {
        let d = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    // Images: empty, with data, v1, with a kept changed-block record.
    let img = tmp.join("a.hds");
    block_on(PloopLayer::create(&SyncIo, &img, 8192, 512)).unwrap();
    out("image", "empty-v2", &std::fs::read(&img).unwrap());
    let stack = common::open_stack(&[&img], false);
    block_on(stack.write(&SyncIo, 1024, &[0xA5; 1024])).unwrap();
    block_on(stack.write(&SyncIo, 7680, &[0x5A; 512])).unwrap();
    let cbt = std::sync::Arc::new(ublk_ploop::tracker::Tracker::new(8192, 512));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    block_on(stack.write(&SyncIo, 4096, &[1; 512])).unwrap();
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    out("image", "data-v2", &std::fs::read(&img).unwrap());
    let stack = common::open_stack(&[&img], false);
    stack.keep_on_close(Some((cbt, [7; 16])));
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    out("image", "extension-v2", &std::fs::read(&img).unwrap());
    let mut v1 = common::ImageSpec::v1(8192, 512).with_cluster(3, 0, &[0x33; 512]);
    v1.in_use = ublk_ploop::layers::ploop::header::IN_USE;
    let v1p = tmp.join("v1.hds");
    v1.write(&v1p);
    out("image", "v1-in-use", &std::fs::read(&v1p).unwrap());
    // Descriptors: ours, and one with snapshots.
    let disk = block_on(ublk_ploop::disk::Disk::init(&SyncIo, &tmp.join("disk"), 1 << 20, 1 << 20)).unwrap();
    out("descriptor", "init", disk.desc.to_xml().as_bytes());
    let mut d = disk.clone();
    block_on(ublk_ploop::disk::ops::snapshot(&SyncIo, &{
        let (s, _) = block_on(ublk_ploop::Stack::open_layers(&SyncIo, &d.layers(None).unwrap(), &Default::default())).unwrap();
        s
    }, &mut d, None))
    .unwrap();
    out("descriptor", "snapshot", d.desc.to_xml().as_bytes());
    // A stream of the data image.
    let stack = common::open_stack(&[&img], true);
    let (stream, _) = common::send_to_vec(&stack, &mut ublk_ploop::copy::NoFs, ublk_ploop::copy::SendOptions::default());
    out("stream", "small", &stream);
    // Requests.
    for (name, line) in [
        ("status", r#"{"version":1,"cmd":"status"}"#),
        ("snapshot", r#"{"version":1,"cmd":"snapshot","args":{"uuid":"{5fbaabe3-6958-40ff-92a7-860e329aab41}"}}"#),
        ("switch", r#"{"cmd":"snapshot-switch","args":{"uuid":"{5fbaabe3-6958-40ff-92a7-860e329aab41}","force":true}}"#),
        ("copy", r#"{"cmd":"copy","args":{"two_way":true,"stop":false}}"#),
        ("backup", r#"{"cmd":"backup","args":{"incremental":true}}"#),
    ] {
        out("request", name, line.as_bytes());
    }
}
