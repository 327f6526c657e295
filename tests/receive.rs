//! `receive` against crashes and hostile input, through the built binary:
//! an incremental apply cut short is finished by the next receive; two
//! receives into one destination cannot mix; temporaries are our own and
//! never replace or remove what we did not make; signals leave nothing
//! behind; a silent peer times out; streams that claim too much are refused
//! before they cost disk or memory.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use common::*;
use ublk_ploop::copy::wire::{cmd, Kind, Writer, FLAG_MD5};
use ublk_ploop::copy::{NoFs, SendOptions};
use ublk_ploop::layers::PloopLayer;
use ublk_ploop::tracker::Tracker;

const CLUSTER: u64 = 64 << 10;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn new_image(path: &Path, size: u64) -> Stack {
    block_on(PloopLayer::create(&SyncIo, path, size, CLUSTER)).unwrap();
    open_stack(&[path], false)
}

fn read_all(stack: &Stack) -> Vec<u8> {
    let mut buf = vec![0u8; stack.size() as usize];
    block_on(stack.read(&SyncIo, 0, &mut buf)).unwrap();
    buf
}

fn image_bytes(path: &Path) -> Vec<u8> {
    let s = open_stack(&[path], true);
    read_all(&s)
}

/// A one-way copy of `stack` (only `first` clusters, if given).
fn stream_of(stack: &Stack, first: Option<BitVec>) -> Vec<u8> {
    // Only the `first` clusters: through a record of changes holding them,
    // read by the copy as an incremental backup reads the daemon's.
    let opts = match first {
        Some(set) => {
            let record = Arc::new(Tracker::from_bits(stack.size(), stack.cluster_size(), &set));
            SendOptions { incremental: true, cbt: Some(record), ..Default::default() }
        }
        None => SendOptions::default(),
    };
    send_to_vec(stack, &mut NoFs, opts).0
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A receive reading `stdin` from a pipe we hold.
fn spawn_receive(args: &[&str], envs: &[(&str, &str)]) -> Child {
    let mut c = Command::new(bin());
    c.arg("receive").args(args).env_remove("RUST_LOG").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    quiesced(|| c.spawn().unwrap())
}

fn finish(child: Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        what: "ublk-ploop receive".into(),
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A source disk, a full backup of it, and the tracker of changes since.
struct Source {
    stack: Stack,
    cbt: Arc<Tracker>,
}

fn source_and_backup(dir: &TempDir, backup: &Path, seed: u64) -> Source {
    let size = 32 * CLUSTER;
    let stack = new_image(&dir.join("src.img"), size);
    block_on(stack.write(&SyncIo, 0, &Rng::new(seed).bytes(24 * CLUSTER as usize))).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(stack.add_tracker(cbt.clone())).unwrap();
    let full = stream_of(&stack, None);
    cbt.drain();
    let f = dir.join("full.stream");
    std::fs::write(&f, &full).unwrap();
    ploop(["receive", "--image", p(backup), "--from", p(&f)]).ok();
    Source { stack, cbt }
}

/// Write fresh bytes over `clusters` of the source; the incremental stream
/// of what changed since the last one.
fn change(src: &Source, clusters: &[u64], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    for &c in clusters {
        block_on(src.stack.write(&SyncIo, c * CLUSTER + 512, &rng.bytes(CLUSTER as usize - 1024))).unwrap();
    }
    let changed = src.cbt.drain();
    assert_eq!(changed.iter_ones().map(|c| c as u64).collect::<Vec<_>>(), clusters);
    stream_of(&src.stack, Some(changed))
}

fn assert_backup_is_source(backup: &Path, src: &Source) {
    assert_bytes_equal(&image_bytes(backup), &read_all(&src.stack), "backup vs source");
    assert_ploop_clean(backup, "backup");
    if have_qemu() {
        qemu_check_clean(backup);
    }
}

/// The state an apply cut short leaves, built by hand: a complete delta
/// `backup.img.incoming` (closed, checked) whose clusters are only partly
/// in the backup. The next incremental receive must finish it before its
/// own stream (the sender cleared its record of those clusters): today's
/// receive deleted it, and the backup kept old bytes for ever.
#[test]
fn an_interrupted_apply_left_on_disk_is_finished_first() {
    let dir = TempDir::new("recv-left-apply");
    let backup = dir.join("backup.img");
    let src = source_and_backup(&dir, &backup, 1);
    let first = [2u64, 5, 6, 9, 17, 30];
    let _lost_stream = change(&src, &first, 2);
    // The delta, as the receiver gathers it: over the backup.
    let incoming = dir.join("backup.img.incoming");
    block_on(PloopLayer::create(&SyncIo, &incoming, src.stack.size(), CLUSTER)).unwrap();
    let now = read_all(&src.stack);
    let cl = |c: u64| &now[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize];
    {
        let s = open_stack(&[&backup, &incoming], false);
        for &c in &first {
            block_on(s.write(&SyncIo, c * CLUSTER, cl(c))).unwrap();
        }
        block_on(s.close(&SyncIo)).unwrap();
    }
    // Half of it reached the backup before the crash.
    {
        let s = open_stack(&[&backup], false);
        for &c in &first[..3] {
            block_on(s.write(&SyncIo, c * CLUSTER, cl(c))).unwrap();
        }
        block_on(s.close(&SyncIo)).unwrap();
    }
    let second = change(&src, &[3, 20], 3);
    let f = dir.join("incr2.stream");
    std::fs::write(&f, &second).unwrap();
    let r = ploop(["receive", "--image", p(&backup), "--incremental", "--from", p(&f)]);
    r.ok().mentions(&["finished an interrupted apply"]);
    assert!(r.stdout.contains("2 clusters updated"), "{}", r.stdout);
    assert_backup_is_source(&backup, &src);
    assert!(!incoming.exists(), "the applied delta stays behind");
    assert_eq!(names(dir.path()), ["backup.img", "full.stream", "incr2.stream", "src.img"]);
}

/// A receiver killed (SIGKILL, as a crash) in the middle of an incremental
/// apply: the next receive finishes that apply, then applies its own
/// stream; a delta that was still arriving when a receive died is removed,
/// never applied.
#[test]
fn a_receiver_killed_mid_apply_is_finished_by_the_next() {
    let dir = TempDir::new("recv-kill-apply");
    let backup = dir.join("backup.img");
    let src = source_and_backup(&dir, &backup, 4);
    let f1 = dir.join("incr1.stream");
    std::fs::write(&f1, change(&src, &[1, 4, 7, 8, 12, 13, 22, 31], 5)).unwrap();
    let mut c = Command::new(bin());
    c.args(["receive", "--image", p(&backup), "--incremental", "--from", p(&f1)]).env("UBLK_PLOOP_TEST_CRASH_APPLY_AFTER", "3");
    let r = run(&mut c);
    assert_eq!(r.code, None, "the receiver was to die mid-apply\n{}\n{}", r.stdout, r.stderr);
    let incoming = dir.join("backup.img.incoming");
    assert!(incoming.exists(), "no complete delta left by the crash: {:?}", names(dir.path()));
    assert_eq!(in_use_mark(&backup), IN_USE, "the crash left the backup in use");
    // A delta a receive died receiving (our temporary's name): not applied.
    let stale = dir.join("backup.img.incoming.k3x9q0");
    std::fs::write(&stale, b"half a delta").unwrap();
    let f2 = dir.join("incr2.stream");
    std::fs::write(&f2, change(&src, &[0, 16], 6)).unwrap();
    let r = ploop(["receive", "--image", p(&backup), "--incremental", "--from", p(&f2)]);
    r.ok().mentions(&["finished an interrupted apply"]);
    assert!(r.stderr.contains("(8 clusters)"), "{}", r.stderr);
    assert_backup_is_source(&backup, &src);
    assert_eq!(names(dir.path()), ["backup.img", "full.stream", "incr1.stream", "incr2.stream", "src.img"]);
}

/// Two receives into one destination: the second is refused while the
/// first runs, and what the first says it received is what is there. A
/// destination that appears during a transfer is not replaced.
#[test]
fn two_receives_into_one_destination_do_not_mix() {
    let dir = TempDir::new("recv-two");
    let a = new_image(&dir.join("a.img"), 16 * CLUSTER);
    block_on(a.write(&SyncIo, 0, &vec![0xaa; 16 * CLUSTER as usize])).unwrap();
    let b = new_image(&dir.join("b.img"), 16 * CLUSTER);
    block_on(b.write(&SyncIo, 0, &vec![0xbb; 16 * CLUSTER as usize])).unwrap();
    let (sa, sb) = (stream_of(&a, None), stream_of(&b, None));
    let fb = dir.join("b.stream");
    std::fs::write(&fb, &sb).unwrap();
    let dest = dir.join("dest.img");

    let mut first = spawn_receive(&["--image", p(&dest)], &[]);
    let mut pipe = first.stdin.take().unwrap();
    pipe.write_all(&sa[..sa.len() / 2]).unwrap();
    wait_for("the first receive's temporary", || names(dir.path()).iter().any(|n| n.starts_with("dest.img.partial")));
    let second = ploop(["receive", "--image", p(&dest), "--from", p(&fb)]);
    second.expect_clean_failure().mentions(&["another receive"]);
    pipe.write_all(&sa[sa.len() / 2..]).unwrap();
    drop(pipe);
    let r = finish(first);
    r.ok().mentions(&[p(&dest)]);
    assert_eq!(image_bytes(&dest), read_all(&a), "the first receive's bytes");

    // Someone else's file appears under the name during the transfer.
    let dest2 = dir.join("dest2.img");
    let mut third = spawn_receive(&["--image", p(&dest2)], &[]);
    let mut pipe = third.stdin.take().unwrap();
    pipe.write_all(&sb[..sb.len() / 2]).unwrap();
    wait_for("the temporary", || names(dir.path()).iter().any(|n| n.starts_with("dest2.img.partial")));
    std::fs::write(&dest2, b"not yours").unwrap();
    pipe.write_all(&sb[sb.len() / 2..]).unwrap();
    drop(pipe);
    finish(third).expect_clean_failure().mentions(&["appeared"]);
    assert_eq!(std::fs::read(&dest2).unwrap(), b"not yours");
    assert_eq!(names(dir.path()), ["a.img", "b.img", "b.stream", "dest.img", "dest2.img"]);
}

/// Temporaries have names of their own: `receive --image ../keep` (a disk
/// directory, or an image) leaves an unrelated `../keep.partial` alone.
#[test]
fn unrelated_partial_names_are_left_alone() {
    let dir = TempDir::new("recv-keep");
    let a = new_image(&dir.join("a.img"), 8 * CLUSTER);
    block_on(a.write(&SyncIo, CLUSTER, &vec![7; CLUSTER as usize])).unwrap();
    let f = dir.join("a.stream");
    std::fs::write(&f, stream_of(&a, None)).unwrap();
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    // A directory destination (empty) and somebody's keep.partial/.
    std::fs::create_dir(dir.join("keep")).unwrap();
    std::fs::create_dir(dir.join("keep.partial")).unwrap();
    std::fs::write(dir.join("keep.partial/precious"), b"mine").unwrap();
    // An image destination and somebody's file keep2.partial.
    std::fs::write(dir.join("keep2.partial"), b"also mine").unwrap();
    for dest in ["../keep", "../keep2"] {
        let mut c = Command::new(bin());
        c.args(["receive", "--image", dest, "--from", p(&f)]).current_dir(&work).env_remove("RUST_LOG");
        run(&mut c).ok();
    }
    assert_eq!(std::fs::read(dir.join("keep.partial/precious")).unwrap(), b"mine");
    assert_eq!(std::fs::read(dir.join("keep2.partial")).unwrap(), b"also mine");
    assert!(dir.join("keep/DiskDescriptor.xml").exists());
    assert_eq!(image_bytes(&dir.join("keep2")), read_all(&a));
    assert_eq!(names(dir.path()), ["a.img", "a.stream", "keep", "keep.partial", "keep2", "keep2.partial", "work"]);
}

/// A destination spelled `.`, `..` or `/` is refused before a byte is
/// read (it can never be renamed over: the whole stream was received and
/// then thrown away with EBUSY).
#[test]
fn a_destination_that_is_dot_or_dotdot_is_refused_at_once() {
    let dir = TempDir::new("recv-dot");
    let a = new_image(&dir.join("a.img"), 8 * CLUSTER);
    let f = dir.join("a.stream");
    std::fs::write(&f, stream_of(&a, None)).unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    for dest in [".", "..", "/", "./", "sub/.."] {
        let mut c = Command::new(bin());
        c.args(["receive", "--image", dest, "--from", p(&f)]).current_dir(&empty).env_remove("RUST_LOG");
        let r = run(&mut c);
        r.expect_code(1);
        assert!(r.stderr.contains("must name a new image"), "{dest}: {}", r.stderr);
    }
    assert_eq!(names(&empty), Vec::<String>::new());
    assert_eq!(names(dir.path()), ["a.img", "a.stream", "empty"]);
}

/// `--listen PATH` puts its socket only where nothing is, or where a
/// socket nobody listens on was left: a regular file or a live socket is
/// refused and kept.
#[test]
fn listen_replaces_only_a_stale_socket() {
    let dir = TempDir::new("recv-listen");
    let file = dir.join("sock");
    std::fs::write(&file, b"a regular file").unwrap();
    let r = ploop(["receive", "--image", p(&dir.join("x.img")), "--listen", p(&file)]);
    r.expect_clean_failure().mentions(&["not a socket"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"a regular file");
    // A live socket.
    let live = dir.join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    ploop(["receive", "--image", p(&dir.join("x.img")), "--listen", p(&live)]).expect_clean_failure().mentions(&["listens"]);
    assert!(live.exists());
    // A stale one: taken over, and a stream received through it.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let a = new_image(&dir.join("a.img"), 8 * CLUSTER);
    block_on(a.write(&SyncIo, 0, &vec![3; CLUSTER as usize])).unwrap();
    let stream = stream_of(&a, None);
    let child = spawn_receive(&["--image", p(&dir.join("x.img")), "--listen", p(&stale)], &[]);
    let mut s = None;
    wait_for("the receiver to listen", || {
        s = UnixStream::connect(&stale).ok();
        s.is_some()
    });
    let mut s = s.unwrap();
    s.write_all(&stream).unwrap();
    finish(child).ok();
    assert_eq!(image_bytes(&dir.join("x.img")), read_all(&a));
    assert!(!stale.exists(), "the socket stays after the receive");
}

/// SIGTERM (or SIGINT) in the middle of a stream: the temporary and the
/// lock go, the exit says so.
#[test]
fn sigterm_removes_the_temporary() {
    let dir = TempDir::new("recv-term");
    let a = new_image(&dir.join("a.img"), 16 * CLUSTER);
    block_on(a.write(&SyncIo, 0, &vec![1; 16 * CLUSTER as usize])).unwrap();
    let stream = stream_of(&a, None);
    let dest = dir.join("dest.img");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = spawn_receive(&["--image", p(&dest)], &[]);
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(&stream[..stream.len() / 2]).unwrap();
        wait_for("the temporary", || names(dir.path()).iter().any(|n| n.starts_with("dest.img.partial")));
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let r = finish(child);
        drop(pipe);
        assert_eq!(r.code, Some(128 + sig), "{}", r.stderr);
        r.mentions(&["interrupted", "removed"]);
        assert_eq!(names(dir.path()), ["a.img"], "left behind after signal {sig}");
    }
}

/// A peer that connects and says nothing is dropped after --timeout, with
/// a clear error; nothing is left.
#[test]
fn a_silent_peer_times_out() {
    let dir = TempDir::new("recv-silent");
    let sock = dir.join("r.sock");
    let started = Instant::now();
    let child = spawn_receive(&["--image", p(&dir.join("x.img")), "--listen", p(&sock), "--timeout", "1"], &[]);
    let mut s = None;
    wait_for("the receiver to listen", || {
        s = UnixStream::connect(&sock).ok();
        s.is_some()
    });
    let r = finish(child);
    r.expect_clean_failure().mentions(&["silent"]);
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(s);
    assert_eq!(names(dir.path()), Vec::<String>::new());
    // The same over TCP, on the port the receiver says it took.
    let mut child = spawn_receive(&["--image", p(&dir.join("x.img")), "--listen", "127.0.0.1:0", "--timeout", "1"], &[]);
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line}")).to_string();
    let s = std::net::TcpStream::connect(&addr).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{rest}");
    assert!(rest.contains("went silent"), "{rest}");
    drop(s);
    assert_eq!(names(dir.path()), Vec::<String>::new());
}

/// A stream whose INIT claims a disk larger than --max-size (or, by
/// default, than the free space on the destination's filesystem) is
/// refused before anything is created.
#[test]
fn a_disk_larger_than_max_size_is_refused() {
    let dir = TempDir::new("recv-max");
    let claim = |sectors: u64, cluster: u64| {
        let mut w = Writer::new(Vec::new());
        w.command(cmd::SYNC, FLAG_MD5, &[]).unwrap();
        w.set_md5(true);
        w.command(cmd::INIT_PLOOP, sectors, &vec![0; (cluster / 512) as usize - 4]).unwrap();
        w.finish(true).unwrap();
        w.get_mut().clone()
    };
    // 1 GiB of 1 MiB clusters over a 64 MiB limit.
    let f = dir.join("1g.stream");
    std::fs::write(&f, claim(2 << 20, 1 << 20)).unwrap();
    let r = ploop(["receive", "--image", p(&dir.join("x.img")), "--from", p(&f), "--max-size", "64M"]);
    r.expect_clean_failure().mentions(&["max-size"]);
    // 1 PiB of 64 MiB clusters (2^24 of them): a 2 KB stream once made
    // a "valid" image of it.
    let f2 = dir.join("1p.stream");
    std::fs::write(&f2, claim(1 << 41, 64 << 20)).unwrap();
    assert!(std::fs::metadata(&f2).unwrap().len() < 200 << 10);
    let r = ploop(["receive", "--image", p(&dir.join("y.img")), "--from", p(&f2)]);
    r.expect_clean_failure().mentions(&["max-size"]);
    assert_eq!(names(dir.path()), ["1g.stream", "1p.stream"]);
}

/// Run with the address space capped; exit code, output, and the child's
/// peak resident memory in KiB.
fn run_capped(args: &[&str], cap: u64) -> (Run, i64) {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: cap, rlim_max: cap };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = quiesced(|| c.spawn().unwrap());
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut out, &mut stdout).unwrap();
    let stderr = t.join().unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child and reads its resource usage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (Run { code, stdout, stderr, what: format!("{args:?}") }, usage.ru_maxrss)
}

/// ploop 7's kind of stream (the bytes of an image file): 752 bytes whose
/// header claims a table of 2^30 entries made `receive` take 4 GB of
/// memory and exit 0. What a stream claims is bounded; memory follows what
/// arrives.
#[test]
fn a_tiny_image_file_stream_claiming_a_huge_table_is_refused_cheaply() {
    let dir = TempDir::new("recv-imgfile");
    let entries: u64 = 1 << 30;
    let cluster_sectors: u64 = 2048;
    let data_off = (64 + 4 * entries).div_ceil(cluster_sectors * 512) * cluster_sectors;
    let mut h = [0u8; 64];
    h[..16].copy_from_slice(MAGIC_V2);
    h[16..20].copy_from_slice(&2u32.to_le_bytes());
    h[20..24].copy_from_slice(&16u32.to_le_bytes());
    h[28..32].copy_from_slice(&(cluster_sectors as u32).to_le_bytes());
    h[32..36].copy_from_slice(&(entries as u32).to_le_bytes());
    h[36..44].copy_from_slice(&(entries * cluster_sectors).to_le_bytes());
    h[48..52].copy_from_slice(&(data_off as u32).to_le_bytes());
    let mut w = Writer::new(Vec::new());
    w.command(cmd::SYNC, FLAG_MD5, &[]).unwrap();
    w.set_md5(true);
    // The table's last byte, so that the file is as long as its table.
    w.packet(Kind::Data, data_off * 512 - 512, &[0u8; 512]).unwrap();
    w.packet(Kind::Data, 0, &h).unwrap();
    w.finish(true).unwrap();
    let stream = w.get_mut().clone();
    assert!(stream.len() < 1024, "{} bytes", stream.len());
    let f = dir.join("tiny.stream");
    std::fs::write(&f, &stream).unwrap();
    for extra in [&[][..], &["--max-size", "8E"][..]] {
        let dest = dir.join("x.img");
        let mut args = vec!["receive", "--image", p(&dest), "--from", p(&f)];
        args.extend_from_slice(extra);
        let (r, peak_kib) = run_capped(&args, 1 << 30);
        r.expect_clean_failure().mentions(&["max-size", "entries"]);
        assert!(peak_kib < 100 << 10, "peak memory {peak_kib} KiB");
        assert_eq!(names(dir.path()), ["tiny.stream"]);
    }
    // A packet that claims 64 MiB and sends 4 KiB costs no 64 MiB.
    let mut w = Writer::new(Vec::new());
    w.command(cmd::SYNC, FLAG_MD5, &[]).unwrap();
    w.set_md5(true);
    let mut cut = w.get_mut().clone();
    let mut hdr = ublk_ploop::copy::wire::Header { kind: Kind::Data, size: 64 << 20, pos: 0 }.encode().to_vec();
    cut.append(&mut hdr);
    cut.extend_from_slice(&[0u8; 16]);
    cut.extend_from_slice(&[5u8; 4096]);
    let f2 = dir.join("cut.stream");
    std::fs::write(&f2, &cut).unwrap();
    let (r, peak_kib) = run_capped(&["receive", "--image", p(&dir.join("y.img")), "--from", p(&f2)], 1 << 30);
    r.expect_clean_failure().mentions(&["ends inside"]);
    assert!(peak_kib < 40 << 10, "peak memory {peak_kib} KiB for a 4 KiB payload");
}

/// An `IMAGE.incoming` still marked in use was a delta whose stream never
/// ended (as an older receive left it under the final name): removed, its
/// clusters never applied.
#[test]
fn an_incomplete_delta_is_removed_not_applied() {
    let dir = TempDir::new("recv-incomplete");
    let backup = dir.join("backup.img");
    let src = source_and_backup(&dir, &backup, 7);
    let incoming = dir.join("backup.img.incoming");
    block_on(PloopLayer::create(&SyncIo, &incoming, src.stack.size(), CLUSTER)).unwrap();
    {
        let s = open_stack(&[&backup, &incoming], false);
        block_on(s.write(&SyncIo, 5 * CLUSTER, &vec![0xee; CLUSTER as usize])).unwrap();
        block_on(s.close(&SyncIo)).unwrap();
    }
    write_u32(&incoming, 44, IN_USE);
    let f = dir.join("incr.stream");
    std::fs::write(&f, change(&src, &[11], 8)).unwrap();
    let r = ploop(["receive", "--image", p(&backup), "--incremental", "--from", p(&f)]);
    r.ok().mentions(&["never ended"]);
    assert!(!r.stderr.contains("finished an interrupted apply"), "{}", r.stderr);
    assert_backup_is_source(&backup, &src);
    assert_eq!(names(dir.path()), ["backup.img", "full.stream", "incr.stream", "src.img"]);
}

/// Every file in `dir` (by name) with its size and a checksum of its bytes.
fn snapshot_files(dir: &Path) -> Vec<(String, usize, u64)> {
    use std::hash::{Hash, Hasher};
    names(dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            (n, bytes.len(), h.finish())
        })
        .collect()
}

/// An incremental receive into a disk directory keeps to the path rules:
/// a descriptor whose top lies outside the directory (absolute, or through
/// `..`), or a top hard-linked to a file elsewhere, is refused; nothing
/// outside is written or removed (a stale-delta name planted beside the
/// outside file stays). Before, the receive wrote the outside file and
/// removed `victim/NAME.incoming.abc123`.
#[test]
fn an_incremental_receive_into_a_disk_directory_writes_only_inside_it() {
    let dir = TempDir::new("recv-disk-outside");
    let size = 32 * CLUSTER;
    let src = new_image(&dir.join("src.img"), size);
    block_on(src.write(&SyncIo, 0, &Rng::new(21).bytes(8 * CLUSTER as usize))).unwrap();
    let cbt = Arc::new(Tracker::new(size, CLUSTER));
    block_on(src.add_tracker(cbt.clone())).unwrap();
    let full = dir.join("full.stream");
    std::fs::write(&full, stream_of(&src, None)).unwrap();
    cbt.drain();
    block_on(src.write(&SyncIo, 3 * CLUSTER, &vec![0x5a; CLUSTER as usize])).unwrap();
    let incr = dir.join("incr.stream");
    std::fs::write(&incr, stream_of(&src, Some(cbt.drain()))).unwrap();

    // A disk directory as it should be takes the stream (under ploop's
    // lock on the disk, which the receive holds throughout).
    let good = dir.join("good");
    ploop([
        "receive",
        "--image",
        &format!("{}/", p(&good)),
        "--from",
        p(&full),
    ])
    .ok();
    ploop([
        "receive",
        "--image",
        p(&good),
        "--incremental",
        "--from",
        p(&incr),
    ])
    .ok();
    assert_bytes_equal(
        &image_bytes(&good.join("root.hds")),
        &read_all(&src),
        "disk directory vs source",
    );

    let victim = dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    let cases: [(&str, &str); 3] = [
        ("absolute", "data"),
        ("dotdot", "tmpl.hds"),
        ("hardlink", "tmpl.hds"),
    ];
    for (i, (case, file)) in cases.iter().enumerate() {
        let disk = dir.join(&format!("disk{i}"));
        ploop([
            "receive",
            "--image",
            &format!("{}/", p(&disk)),
            "--from",
            p(&full),
        ])
        .ok();
        let outside = victim.join(format!("{i}-{file}"));
        let _ = std::fs::remove_file(&outside);
        std::fs::copy(disk.join("root.hds"), &outside).unwrap();
        let xml = disk.join("DiskDescriptor.xml");
        let desc = std::fs::read_to_string(&xml).unwrap();
        assert!(desc.contains("<File>root.hds</File>"), "{desc}");
        match *case {
            "absolute" => std::fs::write(
                &xml,
                desc.replace(
                    "<File>root.hds</File>",
                    &format!("<File>{}</File>", p(&outside)),
                ),
            )
            .unwrap(),
            "dotdot" => std::fs::write(
                &xml,
                desc.replace(
                    "<File>root.hds</File>",
                    &format!("<File>../victim/{i}-{file}</File>"),
                ),
            )
            .unwrap(),
            _ => {
                std::fs::remove_file(disk.join("root.hds")).unwrap();
                std::fs::hard_link(&outside, disk.join("root.hds")).unwrap();
            }
        }
        // A name a dead receive's delta would have, beside the outside file.
        std::fs::write(
            victim.join(format!("{i}-{file}.incoming.abc123")),
            b"not ours",
        )
        .unwrap();
        let before = snapshot_files(&victim);
        let r = ploop([
            "receive",
            "--image",
            p(&disk),
            "--incremental",
            "--from",
            p(&incr),
        ]);
        assert_ne!(
            r.code,
            Some(0),
            "{case}: the receive went through: {}{}",
            r.stdout,
            r.stderr
        );
        assert!(
            r.stderr.contains("outside") || r.stderr.contains("hard link"),
            "{case}: {}",
            r.stderr
        );
        assert_eq!(
            snapshot_files(&victim),
            before,
            "{case}: files outside the disk directory changed"
        );
    }
}

/// A single-file image with a second hard link elsewhere: an incremental
/// receive refuses it (writing it would change the other name's file too),
/// and the file is unchanged. Before, the delta was applied through it.
#[test]
fn an_incremental_receive_refuses_a_hard_linked_image() {
    let dir = TempDir::new("recv-hardlinked");
    let backup = dir.join("backup.img");
    let src = source_and_backup(&dir, &backup, 31);
    let victim = dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::hard_link(&backup, victim.join("other.img")).unwrap();
    let f = dir.join("incr.stream");
    std::fs::write(&f, change(&src, &[4, 12], 32)).unwrap();
    let before = snapshot_files(&victim);
    let r = ploop([
        "receive",
        "--image",
        p(&backup),
        "--incremental",
        "--from",
        p(&f),
    ]);
    assert_ne!(
        r.code,
        Some(0),
        "the receive went through: {}{}",
        r.stdout,
        r.stderr
    );
    r.mentions(&["single name"]);
    assert_eq!(
        snapshot_files(&victim),
        before,
        "the other name's file changed"
    );
    assert_eq!(
        names(dir.path()),
        [
            "backup.img",
            "full.stream",
            "incr.stream",
            "src.img",
            "victim"
        ]
    );
}

/// A delta `IMG.incoming` left beside an image that was then removed: a
/// new full receive to that name refuses (naming the delta), so that the
/// next incremental does not apply a stale delta to the new image.
/// Before, the full receive went through and the delta stayed.
#[test]
fn a_full_receive_refuses_a_delta_left_under_its_name() {
    let dir = TempDir::new("recv-left-delta");
    let backup = dir.join("backup.img");
    let src = source_and_backup(&dir, &backup, 41);
    let incoming = dir.join("backup.img.incoming");
    block_on(PloopLayer::create(&SyncIo, &incoming, src.stack.size(), CLUSTER)).unwrap();
    std::fs::remove_file(&backup).unwrap();
    let before = std::fs::read(&incoming).unwrap();
    let r = ploop(["receive", "--image", p(&backup), "--from", p(&dir.join("full.stream"))]);
    assert_ne!(r.code, Some(0), "the receive went through: {}{}", r.stdout, r.stderr);
    r.mentions(&["backup.img.incoming"]);
    r.mentions(&["remove"]);
    assert!(!backup.exists(), "an image was received");
    assert_eq!(std::fs::read(&incoming).unwrap(), before);
}
