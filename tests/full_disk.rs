//! The image's filesystem fills up (a small ext4 on a loop device): writes
//! that need a new cluster fail with ENOSPC, reads and overwrites of
//! allocated clusters go on, and once space is freed, writes succeed
//! again; everything acknowledged reads back and the image checks clean.
//! Needs root and a loop device; says why and passes trivially without.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have_qemu, qemu_check_clean, Rng, TempDir};
use ublk_ploop::io::{block_on, Direct, OwnRing, SyncIo};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::{Stack, StackOptions};

const M: u64 = 1 << 20;

/// A small ext4 mounted from a loop device, torn down on drop.
struct SmallFs {
    mnt: PathBuf,
    loopdev: String,
    _dir: TempDir,
}

impl SmallFs {
    fn new(mb: u64) -> Option<SmallFs> {
        let dir = TempDir::new("fullfs");
        let backing = dir.join("fs.img");
        std::fs::File::create(&backing).ok()?.set_len(mb * M).ok()?;
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output().ok()?;
        if !out.status.success() {
            eprintln!("skipped: no loop device ({})", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).ok()?;
        let ok = Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]).status().is_ok_and(|s| s.success())
            && Command::new("mount").arg(&loopdev).arg(&mnt).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot make and mount a filesystem here");
            let _ = Command::new("losetup").args(["-d", &loopdev]).status();
            return None;
        }
        Some(SmallFs { mnt, loopdev, _dir: dir })
    }
    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

fn sync_fs(p: &Path) {
    let f = std::fs::File::open(p).unwrap();
    // SAFETY: syncfs on a descriptor we own.
    unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
}

fn run(ring: bool) {
    let Some(fs) = SmallFs::new(96) else { return };
    let img = fs.path("full.hdd");
    let size = 256 * M;
    block_on(PloopLayer::create(&SyncIo, &img, size, M)).unwrap();
    let filler = fs.path("filler");
    std::fs::write(&filler, vec![1u8; 16 * M as usize]).unwrap();
    sync_fs(&fs.mnt);
    let mut rng = Rng::new(ring as u64);
    let data = rng.bytes(size as usize);
    let own = OwnRing::new(32).unwrap();
    let io = ublk_ploop::io::RingIo::new(own);
    let (stack, _) = block_on(Stack::open(&SyncIo, &[img.clone()], &StackOptions { read_only: false, direct: Direct::Auto, offline: false, link_log: None })).unwrap();
    let write = |at: u64, len: u64| -> ublk_ploop::Result<()> {
        let buf = &data[at as usize..(at + len) as usize];
        if ring {
            io.ring().block_on(stack.write(&io, at, buf))
        } else {
            block_on(stack.write(&SyncIo, at, buf))
        }
    };
    // Fill: 1 MiB allocating writes until the filesystem is full.
    let mut acked = 0u64;
    let err = loop {
        match write(acked, M) {
            Ok(()) => acked += M,
            Err(e) => break e,
        }
        assert!(acked < size, "the small filesystem never filled up");
    };
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(acked >= 32 * M, "only {acked} bytes before ENOSPC");
    // Reads, and overwrites of allocated clusters, go on.
    let mut back = vec![0u8; acked as usize];
    block_on(stack.read(&SyncIo, 0, &mut back)).unwrap();
    assert!(back == data[..acked as usize], "acknowledged data reads back");
    write(0, 4 * M).unwrap();
    // A sub-cluster write into a new cluster fails too, and changes nothing.
    assert_eq!(write(acked + 4096, 4096).unwrap_err().errno(), libc::ENOSPC);
    // Space back: allocating writes succeed again.
    std::fs::remove_file(&filler).unwrap();
    sync_fs(&fs.mnt);
    // At the end of the disk: BAT entries far from those written so far.
    let tail = size - 16 * M;
    for i in 0..16 {
        write(tail + i * M, M).unwrap_or_else(|e| panic!("write {i} after space was freed: {e}"));
    }
    block_on(stack.close(&SyncIo)).unwrap();
    drop(stack);
    let report = block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, &img, ublk_ploop::layers::Format::Ploop, false)).unwrap();
    assert_eq!(report.verdict(), ublk_ploop::layers::ploop::check::Verdict::Clean, "{report:?}");
    let (stack, _) = block_on(Stack::open(&SyncIo, &[img.clone()], &StackOptions { read_only: true, direct: Direct::Auto, offline: false, link_log: None })).unwrap();
    let mut back = vec![0u8; size as usize];
    block_on(stack.read(&SyncIo, 0, &mut back)).unwrap();
    assert!(back[..acked as usize] == data[..acked as usize], "everything acknowledged, after a reopen");
    assert!(back[acked as usize..tail as usize].iter().all(|&b| b == 0), "nothing else");
    assert!(back[tail as usize..] == data[tail as usize..], "the writes made after space was freed");
    drop(stack);
    if have_qemu() {
        qemu_check_clean(&img);
    }
}

#[test]
fn a_full_filesystem_fails_allocations_only_and_recovers() {
    run(false);
}

#[test]
fn the_same_on_a_ring() {
    run(true);
}
