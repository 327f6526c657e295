//! Helpers shared by the integration tests: scratch directories, running
//! commands, qemu-img/qemu-io as an independent oracle, a seeded PRNG and
//! a builder for hand-crafted (possibly damaged) ploop images.
//!
//! Every test binary includes this module and uses a different subset.
#![allow(dead_code)]

pub mod hooked;
pub mod inject;
pub mod stripes;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::RwLock;

pub const SECTOR: u64 = 512;
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
pub const IN_USE: u32 = 0x746F_6E59;
pub const HEADER_SIZE: u64 = 64;

// ---------------------------------------------------------------------------
// Openings held across a lock hand-over.

/// Another descriptor of the opening the stack reads layer `index`
/// through: held across an operation, it keeps that opening and its lock
/// alive, as the kernel may after the stack dropped it.
pub fn hold_layer(stack: &ublk_ploop::Stack, index: usize) -> fs::File {
    use std::os::fd::BorrowedFd;
    let fd = stack.layers()[index].file().fd();
    // SAFETY: the stack keeps the descriptor open while it is borrowed.
    fs::File::from(unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().unwrap())
}

/// Whether two descriptors are of one opening: they share its offset (the
/// stack reads and writes at explicit offsets, so moving it changes nothing).
pub fn same_opening(a: &mut fs::File, b: &mut fs::File) -> bool {
    use std::io::{Seek, SeekFrom};
    a.seek(SeekFrom::Start(4321)).unwrap();
    b.stream_position().unwrap() == 4321
}

// ---------------------------------------------------------------------------
// Scratch directories.

/// A fresh directory under the system temp dir, removed on drop (kept when
/// UBLK_PLOOP_KEEP_TMP=1, for post-mortems).
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let prefix = format!("ublk-ploop-test-{tag}-");
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .disable_cleanup(keep_tmp())
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory {prefix}*: {e}"));
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

fn keep_tmp() -> bool {
    std::env::var_os("UBLK_PLOOP_KEEP_TMP").is_some_and(|v| v == "1")
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if keep_tmp() {
            eprintln!("keeping {}", self.path().display());
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands.

/// Result of a finished command. `code` is None when a signal killed it.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    /// The exit code, failing the test if the process died of a signal.
    pub fn code(&self) -> i32 {
        match self.code {
            Some(c) => c,
            None => panic!("{} was killed by a signal\nstderr:\n{}", self.what, self.stderr),
        }
    }
    pub fn expect_code(&self, want: i32) -> &Run {
        assert_eq!(
            self.code(),
            want,
            "unexpected exit code from {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }
    pub fn ok(&self) -> &Run {
        self.expect_code(0)
    }
    /// A controlled failure: non-zero exit, not a Rust panic (101), not a
    /// signal, and something said (errors go to stderr; `check` reports
    /// damage on stdout).
    pub fn expect_clean_failure(&self) -> &Run {
        let code = self.code();
        assert_ne!(code, 0, "{} succeeded but should have failed\nstdout:\n{}", self.what, self.stdout);
        assert_ne!(code, 101, "{} panicked (exit 101)\nstderr:\n{}", self.what, self.stderr);
        assert!(!self.stderr.contains("panicked"), "{} panicked\nstderr:\n{}", self.what, self.stderr);
        assert!(
            !(self.stderr.trim().is_empty() && self.stdout.trim().is_empty()),
            "{} failed (exit {code}) without saying why",
            self.what
        );
        self
    }
    /// stderr (or stdout) mentions at least one of `words`, case-insensitively.
    pub fn mentions(&self, words: &[&str]) -> &Run {
        let all = format!("{}\n{}", self.stderr, self.stdout).to_lowercase();
        assert!(
            words.iter().any(|w| all.contains(&w.to_lowercase())),
            "{}: output mentions none of {words:?}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{}", self.what, self.stdout))
    }
}

/// Held (shared) while a child process is being spawned. Between fork and
/// exec a child holds copies of all our descriptors, and with them any
/// flock() the engine took: a lock we drop meanwhile lives on until the
/// child execs. Code that drops a locked image and relies on the lock being
/// gone at once (`Stack::push_layer` reopens the old top) runs under
/// `quiesced`, which waits for spawns in flight and holds off new ones.
static SPAWNING: RwLock<()> = RwLock::new(());

pub fn quiesced<T>(f: impl FnOnce() -> T) -> T {
    let _guard = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Run a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Run {
    let what = format!("{cmd:?}");
    let child = {
        let _guard = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
        // spawn() returns once the child has exec'd (or failed to).
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
    };
    let out: Output = child.and_then(|c| c.wait_with_output()).unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        what,
    }
}

/// True for the engine's "image is in use" refusal.
pub fn is_busy(message: &str) -> bool {
    message.contains("in use by another process")
}

/// Retry `f` while it fails because an image is locked: a lock this test
/// process just dropped may linger for a moment in a child that another
/// test thread is spawning (see `quiesced`). A lock that never goes away
/// still fails the test after a few seconds.
pub fn retry_busy<T, E: std::fmt::Display>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    for _ in 0..100 {
        match f() {
            Err(e) if is_busy(&e.to_string()) => std::thread::sleep(std::time::Duration::from_millis(30)),
            other => return other,
        }
    }
    f()
}

/// Path of the `ublk-ploop` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ublk-ploop"))
}

/// Run `ublk-ploop ARGS...`.
pub fn ploop<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut tries = 0;
    loop {
        let mut cmd = Command::new(bin());
        cmd.args(&args).env_remove("RUST_LOG");
        let r = run(&mut cmd);
        // See retry_busy: a lock dropped by this test process may linger.
        if r.code == Some(1) && is_busy(&r.stderr) && tries < 100 {
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(30));
            continue;
        }
        return r;
    }
}

// ---------------------------------------------------------------------------
// qemu as the oracle.

/// True when qemu-img/qemu-io are usable. When they are missing the test
/// fails with an explanation, unless UBLK_PLOOP_NO_QEMU=1 asks to skip
/// qemu-dependent tests (then this returns false and the caller returns).
pub fn have_qemu() -> bool {
    let works = |tool: &str| Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    let missing: Vec<&str> = ["qemu-img", "qemu-io"].into_iter().filter(|t| !works(t)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("UBLK_PLOOP_NO_QEMU").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: {missing:?} not found and UBLK_PLOOP_NO_QEMU=1");
        return false;
    }
    panic!(
        "{missing:?} not found in PATH: these tests use qemu-img/qemu-io (Debian/Ubuntu package qemu-utils, \
         Fedora qemu-img) as an independent oracle. Install them, or set UBLK_PLOOP_NO_QEMU=1 to skip these tests."
    );
}

pub fn qemu_img<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    run(&mut cmd)
}

/// `qemu-img create -f parallels [-o cluster_size=C] IMG SIZE`.
pub fn qemu_create(img: &Path, size: u64, cluster: Option<u64>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "parallels".into()];
    if let Some(c) = cluster {
        args.push("-o".into());
        args.push(format!("cluster_size={c}"));
    }
    args.push(img.display().to_string());
    args.push(size.to_string());
    qemu_img(&args).ok();
}

/// Run qemu-io commands (e.g. "write -P 0xab 1000k 300k") on a parallels image.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("parallels");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(img);
    let r = run(&mut cmd);
    r.ok();
    // qemu-io reports failed commands on stdout/stderr but exits 0.
    let all = format!("{}{}", r.stdout, r.stderr).to_lowercase();
    assert!(!all.contains("error") && !all.contains("failed"), "qemu-io reported a failure:\n{}{}", r.stdout, r.stderr);
}

/// `qemu-img convert -f parallels -O raw IMG OUT`.
pub fn qemu_to_raw(img: &Path, out: &Path) {
    qemu_img(
        ["convert", "-f", "parallels", "-O", "raw"].iter().map(OsStr::new).chain([img.as_os_str(), out.as_os_str()]),
    )
    .ok();
}

/// A qemu json: filename describing `layers` (bottom first) as a chain of
/// parallels images, each backed by the one below.
pub fn qemu_chain_spec(layers: &[PathBuf]) -> String {
    let mut spec: Option<String> = None;
    for l in layers {
        let file =
            format!(r#"{{"driver":"file","filename":{}}}"#, serde_json::to_string(&l.display().to_string()).unwrap());
        spec = Some(match spec {
            None => format!(r#"{{"driver":"parallels","file":{file}}}"#),
            Some(below) => format!(r#"{{"driver":"parallels","file":{file},"backing":{below}}}"#),
        });
    }
    format!("json:{}", spec.expect("at least one layer"))
}

/// Flatten a chain with qemu (bottom first) into a raw file.
pub fn qemu_chain_to_raw(layers: &[PathBuf], out: &Path) {
    let spec = qemu_chain_spec(layers);
    qemu_img([OsStr::new("convert"), OsStr::new("-O"), OsStr::new("raw"), OsStr::new(&spec), out.as_os_str()]).ok();
}

/// `qemu-img check -f parallels IMG`, asserting exit 0 and no errors.
pub fn qemu_check_clean(img: &Path) {
    let r = qemu_img([OsStr::new("check"), OsStr::new("-f"), OsStr::new("parallels"), img.as_os_str()]);
    r.ok();
    assert!(r.stdout.contains("No errors were found"), "qemu-img check {}:\n{}{}", img.display(), r.stdout, r.stderr);
    assert!(!r.stderr.to_lowercase().contains("error"), "qemu-img check {} complained:\n{}", img.display(), r.stderr);
}

/// `qemu-img compare -f parallels -F raw IMG RAW` must say identical.
pub fn qemu_compare_raw(img: &Path, raw: &Path) {
    let r = qemu_img(
        ["compare", "-f", "parallels", "-F", "raw"].iter().map(OsStr::new).chain([img.as_os_str(), raw.as_os_str()]),
    );
    r.ok();
    assert!(r.stdout.contains("Images are identical"), "qemu-img compare:\n{}{}", r.stdout, r.stderr);
}

// ---------------------------------------------------------------------------
// Comparing bytes.

/// Assert two files have identical contents; on mismatch, say where.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let x = fs::read(a).unwrap_or_else(|e| panic!("reading {}: {e}", a.display()));
    let y = fs::read(b).unwrap_or_else(|e| panic!("reading {}: {e}", b.display()));
    assert_bytes_equal(&x, &y, &format!("{} vs {}", a.display(), b.display()));
}

pub fn assert_bytes_equal(x: &[u8], y: &[u8], what: &str) {
    assert_eq!(x.len(), y.len(), "{what}: lengths differ");
    if x == y {
        return; // memcmp: fast even in debug builds
    }
    if let Some(i) = x.iter().zip(y).position(|(a, b)| a != b) {
        let end = (i + 16).min(x.len());
        panic!("{what}: first difference at byte {i} ({:#x}): {:02x?} vs {:02x?}", i, &x[i..end], &y[i..end]);
    }
}

/// A cheap content fingerprint (FNV-1a 64) for "did this file change".
pub fn fingerprint(path: &Path) -> (u64, u64) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (data.len() as u64, h)
}

// ---------------------------------------------------------------------------
// Randomness.

/// The one seeded generator (splitmix64): a seed a failing run prints
/// replays the same run.
pub use ublk_ploop::rng::Rng;

// ---------------------------------------------------------------------------
// Raw header access.

pub fn read_u32(path: &Path, at: u64) -> u32 {
    let f = fs::File::open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

pub fn read_u64(path: &Path, at: u64) -> u64 {
    let f = fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

pub fn write_u32(path: &Path, at: u64, value: u32) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), at).unwrap();
}

pub fn write_u64(path: &Path, at: u64, value: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), at).unwrap();
}

/// BAT entry `i` (u32 at byte 64 + 4i).
pub fn bat_entry(path: &Path, i: u64) -> u32 {
    read_u32(path, HEADER_SIZE + 4 * i)
}

pub fn set_bat_entry(path: &Path, i: u64, value: u32) {
    write_u32(path, HEADER_SIZE + 4 * i, value)
}

pub fn in_use_mark(path: &Path) -> u32 {
    read_u32(path, 44)
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

// ---------------------------------------------------------------------------
// Hand-made images.

/// A ploop image laid out by hand, field by field, so that tests can build
/// any damage they like. Defaults describe a valid v2 image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub magic: [u8; 16],
    pub version: u32,
    pub cluster_sectors: u32,
    pub bat_entries: u32,
    pub size_sectors: u64,
    pub in_use: u32,
    pub data_off_sectors: u32,
    pub flags: u32,
    pub ext_off: u64,
    /// Raw BAT values by index.
    pub bat: Vec<(u32, u32)>,
    /// Bytes to place at file offsets (the file grows to hold them).
    pub data: Vec<(u64, Vec<u8>)>,
    /// Final file length; None: end of the last thing written.
    pub file_len: Option<u64>,
}

impl ImageSpec {
    /// A valid, empty v2 image of `size` bytes with `cluster`-byte clusters,
    /// laid out as qemu-img create lays it out.
    pub fn v2(size: u64, cluster: u64) -> ImageSpec {
        let entries = size.div_ceil(cluster);
        let data_off = (HEADER_SIZE + 4 * entries).next_multiple_of(cluster);
        ImageSpec {
            magic: *MAGIC_V2,
            version: 2,
            cluster_sectors: (cluster / SECTOR) as u32,
            bat_entries: entries as u32,
            size_sectors: size / SECTOR,
            in_use: 0,
            data_off_sectors: (data_off / SECTOR) as u32,
            flags: 0,
            ext_off: 0,
            bat: vec![],
            data: vec![],
            file_len: None,
        }
    }

    /// A valid, empty v1 ("WithoutFreeSpace") image: BAT values count
    /// sectors and the data area starts at the first sector after the BAT.
    pub fn v1(size: u64, cluster: u64) -> ImageSpec {
        let mut s = ImageSpec::v2(size, cluster);
        s.magic = *MAGIC_V1;
        s.data_off_sectors = (HEADER_SIZE + 4 * s.bat_entries as u64).div_ceil(SECTOR) as u32;
        s
    }

    pub fn cluster(&self) -> u64 {
        self.cluster_sectors as u64 * SECTOR
    }
    pub fn data_off(&self) -> u64 {
        self.data_off_sectors as u64 * SECTOR
    }
    fn bat_unit(&self) -> u64 {
        if &self.magic == MAGIC_V1 {
            SECTOR
        } else {
            self.cluster()
        }
    }

    /// Put `content` (at most one cluster) in virtual cluster `index`,
    /// stored in data-area cluster `slot`.
    pub fn with_cluster(mut self, index: u32, slot: u64, content: &[u8]) -> ImageSpec {
        let at = self.data_off() + slot * self.cluster();
        self.bat.push((index, (at / self.bat_unit()) as u32));
        let mut c = content.to_vec();
        c.resize(self.cluster() as usize, 0);
        self.data.push((at, c));
        self
    }

    pub fn header_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..16].copy_from_slice(&self.magic);
        b[16..20].copy_from_slice(&self.version.to_le_bytes());
        b[20..24].copy_from_slice(&16u32.to_le_bytes());
        b[24..28].copy_from_slice(&((self.size_sectors / 16 / 32) as u32).to_le_bytes());
        b[28..32].copy_from_slice(&self.cluster_sectors.to_le_bytes());
        b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[36..44].copy_from_slice(&self.size_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.in_use.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_off_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b[56..64].copy_from_slice(&self.ext_off.to_le_bytes());
        b
    }

    pub fn write(&self, path: &Path) {
        let f = fs::OpenOptions::new().write(true).create_new(true).open(path).unwrap();
        f.write_all_at(&self.header_bytes(), 0).unwrap();
        let mut end = HEADER_SIZE;
        // The BAT as zeros up to the data area (or as far as the file goes).
        let bat_end = HEADER_SIZE + 4 * self.bat_entries as u64;
        let meta_end = bat_end.max(self.data_off());
        let zero_to = self.file_len.map_or(meta_end, |l| l.min(meta_end));
        if zero_to > end {
            f.set_len(zero_to).unwrap();
            end = zero_to;
        }
        for &(i, v) in &self.bat {
            f.write_all_at(&v.to_le_bytes(), HEADER_SIZE + 4 * i as u64).unwrap();
            end = end.max(HEADER_SIZE + 4 * i as u64 + 4);
        }
        for (at, bytes) in &self.data {
            f.write_all_at(bytes, *at).unwrap();
            end = end.max(at + bytes.len() as u64);
        }
        f.set_len(self.file_len.unwrap_or(end)).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The engine as a library.

pub use hooked::{Backend, Call, Hooked};
pub use ublk_ploop::io::{block_on, Direct, Io, OwnRing, RingIo, SyncIo};
pub use ublk_ploop::{Stack, StackOptions};

pub fn open_stack<P: AsRef<Path>>(paths: &[P], read_only: bool) -> Stack {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
    let (stack, _) = retry_busy(|| block_on(Stack::open(&SyncIo, &paths, &StackOptions { read_only, direct: Direct::Auto, offline: false, link_log: None })))
        .unwrap_or_else(|e| panic!("opening {paths:?}: {e}"));
    stack
}

/// Either I/O implementation, for tests that run against both: the
/// syscalls, or the ring (the code the daemon runs on its queues).
pub type AnyIo = Hooked<Backends, ()>;

/// The I/O implementations an [`AnyIo`] chooses from.
#[allow(clippy::large_enum_variant)]
pub enum Backends {
    Sync(SyncIo),
    Uring(RingIo<OwnRing>),
    /// The ring with a registered buffer that requests go through (the
    /// daemon's zero-copy path, with user memory standing in for the
    /// kernel's request pages).
    Fixed(RingIo<OwnRing>, std::cell::RefCell<ublk_ploop::io::AlignedBuf>),
}

impl Backend for Backends {
    async fn call(&self, call: Call<'_>) -> std::io::Result<()> {
        match self {
            Backends::Sync(i) => call.on(i).await,
            Backends::Uring(i) | Backends::Fixed(i, _) => call.on(i).await,
        }
    }
    fn plain(&self) -> &dyn hooked::Plain {
        match self {
            Backends::Sync(i) => i,
            Backends::Uring(i) | Backends::Fixed(i, _) => i,
        }
    }
}

/// Largest request `Backends::Fixed` takes.
pub const FIXED_STAGING: usize = 4 << 20;

impl AnyIo {
    pub fn new(name: &str) -> AnyIo {
        let inner = match name {
            "sync" => Backends::Sync(SyncIo),
            "uring" => Backends::Uring(RingIo::new(
                OwnRing::new(64).unwrap_or_else(|e| panic!("io_uring is not available here ({e}); the uring tests need it")),
            )),
            "fixed" => {
                let ring = OwnRing::new(64).unwrap_or_else(|e| panic!("io_uring is not available here ({e}); the uring tests need it"));
                let mut staging = ublk_ploop::io::AlignedBuf::zeroed(FIXED_STAGING);
                let iov = libc::iovec { iov_base: staging.as_mut_ptr().cast(), iov_len: staging.len() };
                // SAFETY: the buffer lives in the same value as the ring and
                // its heap memory never moves.
                unsafe { ring.register_buffers(&[iov]) }.unwrap_or_else(|e| panic!("registering a fixed buffer: {e}"));
                Backends::Fixed(RingIo::new(ring), std::cell::RefCell::new(staging))
            }
            _ => unreachable!(),
        };
        Hooked { inner, hook: () }
    }
    pub fn name(&self) -> &'static str {
        match self.inner {
            Backends::Sync(_) => "sync",
            Backends::Uring(_) => "uring",
            Backends::Fixed(..) => "fixed",
        }
    }
    /// Run an engine future that uses this I/O to completion. On a ring,
    /// the ring's deferred work runs after it: what the kernel still holds
    /// of files the future used is let go, so a file closed next (a stack
    /// dropped) gives up its lock at once, not at the ring's next wait (a
    /// `check` right after a close found the image "in use").
    pub fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.inner {
            Backends::Sync(_) => block_on(f),
            Backends::Uring(r) | Backends::Fixed(r, _) => {
                let out = r.ring().block_on(f);
                ublk_ploop::io::Submit::run_task_work(r.ring());
                out
            }
        }
    }

    /// Enter the ring once to run its deferred work (nothing on `sync`).
    pub fn settle(&self) {
        self.run(async {})
    }

    fn fixed(&self, staging: &ublk_ploop::io::AlignedBuf, len: usize) -> ublk_ploop::io::FixedBuf {
        assert!(len <= FIXED_STAGING, "request of {len} bytes is larger than the fixed buffer");
        ublk_ploop::io::FixedBuf { index: 0, base: staging.as_ptr() as u64, off: 0, len }
    }

    /// A request's read, the way the daemon serves it with this I/O: for
    /// `Fixed`, into the registered buffer (filled with garbage first, so
    /// a range left untouched shows), then copied out.
    pub fn request_read(&self, stack: &Stack, offset: u64, buf: &mut [u8]) -> ublk_ploop::Result<()> {
        match &self.inner {
            Backends::Fixed(_, staging) => {
                let mut staging = staging.borrow_mut();
                staging[..buf.len()].fill(0xa5);
                let fixed = self.fixed(&staging, buf.len());
                self.run(stack.read_fixed(self, offset, fixed))?;
                buf.copy_from_slice(&staging[..buf.len()]);
                Ok(())
            }
            _ => self.run(stack.read(self, offset, buf)),
        }
    }

    /// A request's write, as `request_read`.
    pub fn request_write(&self, stack: &Stack, offset: u64, data: &[u8]) -> ublk_ploop::Result<()> {
        match &self.inner {
            Backends::Fixed(_, staging) => {
                let mut staging = staging.borrow_mut();
                staging[..data.len()].copy_from_slice(data);
                let fixed = self.fixed(&staging, data.len());
                self.run(stack.write_fixed(self, offset, fixed))
            }
            _ => self.run(stack.write(self, offset, data)),
        }
    }
}

/// Read `[off, off + len)` as a request of this I/O and compare it with
/// the same range of `model` (the whole disk as it must read), naming the
/// first byte that differs.
pub fn assert_reads(stack: &Stack, io: &AnyIo, model: &[u8], off: u64, len: usize, ctx: &str) {
    let mut buf = ublk_ploop::io::AlignedBuf::zeroed(len);
    io.request_read(stack, off, &mut buf).unwrap_or_else(|e| panic!("{ctx}: read {off}+{len} failed: {e}"));
    let want = &model[off as usize..off as usize + len];
    if let Some(first) = buf.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{ctx}: mismatch reading {off}+{len}: first differing byte at disk offset {} (got {:#x}, want {:#x})",
            off + first as u64,
            buf[first],
            want[first]
        );
    }
}

/// The same over the whole disk, in requests of `step` bytes.
pub fn assert_reads_all(stack: &Stack, io: &AnyIo, model: &[u8], step: u64, ctx: &str) {
    let size = model.len() as u64;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(step) as usize;
        assert_reads(stack, io, model, off, n, ctx);
        off += n as u64;
    }
}

/// Read the whole disk through the library, in `chunk`-byte requests.
pub fn read_disk(stack: &Stack, io: &AnyIo, chunk: usize) -> Vec<u8> {
    let size = stack.size() as usize;
    let mut out = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let n = chunk.min(size - at);
        io.request_read(stack, at as u64, &mut out[at..at + n]).unwrap_or_else(|e| panic!("reading {at}+{n}: {e}"));
        at += n;
    }
    out
}

/// `len` bytes of a recognisable pattern seeded by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Our check and (when installed) qemu-img's both call a ploop image clean:
/// the post-fault, post-run check of every test that writes images.
pub fn assert_ploop_clean(img: &Path, ctx: &str) {
    assert_clean(img, ublk_ploop::layers::Format::Ploop, ctx)
}

/// Our `check` of a ploop image (repairing with `repair`), retried while
/// a lock this process dropped lingers in a child (see `retry_busy`).
pub fn ploop_check(img: &Path, repair: bool, ctx: &str) -> ublk_ploop::layers::ploop::check::CheckReport {
    retry_busy(|| block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, img, ublk_ploop::layers::Format::Ploop, repair)))
        .unwrap_or_else(|e| panic!("{ctx}: check {}: {e}", img.display()))
}

/// After a fault (and a power cut): `check`, repairing with `repair`,
/// finds no damage, only what a crash may leave (an in-use mark, leaks).
pub fn assert_undamaged(img: &Path, repair: bool, ctx: &str) -> ublk_ploop::layers::ploop::check::CheckReport {
    let report = ploop_check(img, repair, ctx);
    assert!(report.header_errors.is_empty() && report.bad_entries.is_empty(), "{ctx}: {report:?}");
    report
}

/// As `assert_ploop_clean`, for a layer of either format (qemu-img checks
/// only ploop ones).
pub fn assert_clean(img: &Path, format: ublk_ploop::layers::Format, ctx: &str) {
    assert_clean_driving(img, format, ctx, &|| {})
}

/// As `assert_clean`, running `drive` between tries while the image is
/// busy: a ring's deferred work may still hold the file of an image just
/// closed, and its lock. A lock that stays fails with who holds it.
pub fn assert_clean_driving(img: &Path, format: ublk_ploop::layers::Format, ctx: &str, drive: &dyn Fn()) {
    let check = || block_on(ublk_ploop::layers::ploop::check::check(&SyncIo, img, format, false)).inspect_err(|_| drive());
    let report = retry_busy(check).unwrap_or_else(|e| panic!("{ctx}: check {}: {e}; {}", img.display(), lock_holders(img)));
    assert_eq!(report.exit_code(), 0, "{ctx}: check of {} not clean: {report:?}", img.display());
    if format == ublk_ploop::layers::Format::Ploop && have_qemu() {
        qemu_check_clean(img);
    }
}

/// Run `run` for seeds 1..=N, N from UBLK_PLOOP_<NAME>_SEEDS (else
/// `default`), or only for the seed UBLK_PLOOP_<NAME>_SEED names. A seed
/// that fails is printed with the variable that replays it.
pub fn for_each_seed(name: &str, default: u64, mut run: impl FnMut(u64)) {
    let var = |suffix: &str| std::env::var(format!("UBLK_PLOOP_{name}_{suffix}")).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = match var("SEED") {
        Some(seed) => seed..=seed,
        None => 1..=var("SEEDS").unwrap_or(default),
    };
    /// Says which seed was running when a panic unwinds through it.
    struct Replay<'a>(&'a str, u64);
    impl Drop for Replay<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("seed {} failed; replay it with UBLK_PLOOP_{}_SEED={}", self.1, self.0, self.1);
            }
        }
    }
    for seed in seeds {
        let _replay = Replay(name, seed);
        run(seed);
    }
}

/// A one-way copy of `stack` into memory, and what the copy reports.
pub fn send_to_vec(
    stack: &ublk_ploop::Stack,
    fs: &mut dyn ublk_ploop::copy::FsFreeze,
    opts: ublk_ploop::copy::SendOptions,
) -> (Vec<u8>, ublk_ploop::copy::Sent) {
    let (sink, bytes) = VecSink::new();
    let ring = ublk_ploop::io::OwnRing::new(64).unwrap();
    let sent = ring.block_on(ublk_ploop::copy::send(&ring.io(), stack, Box::new(sink), None, fs, opts, &|_, _, _| {})).unwrap();
    let bytes = bytes.lock().unwrap().clone();
    (bytes, sent)
}

/// A writer into memory that the test keeps a handle to (a copy's stream
/// is given away as a `Box<dyn Write + Send>`).
pub struct VecSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl VecSink {
    pub fn new() -> (VecSink, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        (VecSink(bytes.clone()), bytes)
    }
}

impl std::io::Write for VecSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether ploop's tool would find the disk of `base` locked: it tests for
/// a write lock on bytes [200, 205) of the base delta (F_GETLK, a POSIX
/// lock; our OFD locks conflict with those, even in this process).
pub fn ploop_sees_locked(base: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(base).unwrap();
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = 200;
    fl.l_len = 5;
    assert_eq!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) }, 0, "F_GETLK on {}", base.display());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// `!ploop_sees_locked`, allowing a moment for a lock just let go to leave
/// a child another test thread is spawning (see `retry_busy`).
pub fn ploop_sees_free_soon(base: &Path) -> bool {
    (0..100).any(|_| !ploop_sees_locked(base) || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        false
    })
}

/// Who holds locks on `path`, for a failure message: the lines of
/// /proc/locks for its inode, and this process's descriptors of it.
pub fn lock_holders(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = fs::metadata(path).map(|m| m.ino()) else { return "(gone)".into() };
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    let held: Vec<&str> = locks.lines().filter(|l| l.split_whitespace().nth(5).is_some_and(|f| f.ends_with(&format!(":{ino}")))).collect();
    let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let own: Vec<String> = fs::read_dir("/proc/self/fd")
        .map(|d| d.flatten().filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == real)).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    format!("locks on inode {ino}: {held:?}; this process's descriptors of it: {own:?}")
}
