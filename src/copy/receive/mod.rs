//! The receiving end of a copy stream: a new ploop image (or disk
//! directory) from a full copy, or an existing one brought up to date by an
//! incremental one.
//!
//! Nothing that looks complete comes out of a stream that is not: a new
//! image is built under a temporary name of its own (created exclusively,
//! with a random suffix) and linked into place only after the end mark
//! arrived, the stream checked out and the image passed a check, and never
//! over anything that appeared meanwhile; an incremental stream is gathered
//! into such a temporary delta beside the image, made durable and renamed
//! to `IMAGE.incoming` (which says "complete"), and applied only then. An
//! apply cut short by a crash is finished by the next incremental receive
//! before anything else: applying a complete delta again is harmless.
//!
//! A receive holds a lock beside its destination, so that a second one into
//! the same destination is refused; what it made is listed, so that a
//! signal handler can remove it ([`remove_temporaries`]).
//!
//! This file reads the stream into its sink; `temporaries.rs` keeps the
//! list of what a receive made and the lock on its destination, and
//! `apply.rs` applies a complete incremental delta.
//!
//! Every file and name is touched through an [`Io`] ([`receive_in`]), so
//! that the deterministic simulation restores a stream into its own world
//! and kills an apply midway ([`Hooks::before_cluster`]); the sync entry
//! points run it on [`SyncIo`] for the command line.

mod apply;
mod temporaries;

use std::ffi::CString;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wire::{bad, cmd, command_of, Header, Kind, Reader, FLAG_COPY_DEVICE, FLAG_MD5};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::io::{block_on, AlignedBuf, Direct, FileKind, Handle, Io, OpenHow, SyncIo};
use crate::layers::ploop::check::{self, Verdict};
use crate::layers::ploop::header::Variant;
use crate::layers::{Format, PloopLayer, IMAGE_MODE};
use crate::stack::{LayerSpec, Stack, StackOptions};
use apply::{apply_delta, check_top_is_ours, publish_delta, target_chain};
use temporaries::{make_temp, place, registry, remove_temp, temp_beside, DestLock};

pub use apply::{finish_interrupted_apply, finish_interrupted_apply_in};
pub use temporaries::{forget_temporary, register_temporary, remove_temporaries};

/// Largest image file a stream of image-file bytes may build (ploop's
/// largest disk, 2^32 clusters of 1 MiB, plus its table).
const MAX_FILE_STREAM: u64 = 1 << 53;

/// Most clusters a received disk may have: 2^25 (a 128 MiB table in
/// memory; 32 TiB at ploop's default cluster size), so that a stream's first
/// packets cannot make the receiver build a huge table for nothing.
const MAX_RECEIVED_CLUSTERS: u64 = 1 << 25;

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The sender waits for an answer to every packet (a socket).
    pub two_way: bool,
    /// Bring the existing image at the destination up to date instead of
    /// creating one.
    pub incremental: bool,
    pub direct: Direct,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Received {
    /// Clusters of an earlier incremental apply, cut short, that this
    /// receive finished first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_apply: Option<u64>,
    pub image: PathBuf,
    /// "device" (disk bytes at disk offsets) or "image-file" (the bytes of
    /// the sender's image file).
    pub kind: String,
    pub disk_size: u64,
    pub cluster_size: u64,
    pub packets: u64,
    pub data_bytes: u64,
    pub stream_bytes: u64,
    pub md5: bool,
    /// Changed-block records in the stream, not applied.
    pub cbt_records_ignored: u64,
    pub incremental: bool,
    /// Clusters an incremental stream changed.
    pub applied_clusters: u64,
    pub secs: f64,
}

/// What a receive tells its caller besides its result, and where a test
/// may stop it.
pub struct Hooks<'a> {
    /// Hears what was done besides (an interrupted apply finished, a stale
    /// delta removed).
    pub note: Box<dyn FnMut(&str) + 'a>,
    /// Called before each cluster an incremental apply copies, with the
    /// number copied so far. `Break` stops the apply there for good, as a
    /// crash would: its future never completes, and the caller drops it (a
    /// simulated kill); on a thread that waits for it, it waits forever.
    pub before_cluster: Box<dyn FnMut(u64) -> ControlFlow<()> + 'a>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Hooks { note: Box::new(|_| {}), before_cluster: Box::new(|_| ControlFlow::Continue(())) }
    }
}

impl<'a> Hooks<'a> {
    /// `note`, and the crash the tests of the command ask for with
    /// `UBLK_PLOOP_TEST_CRASH_APPLY_AFTER=N`: the process SIGKILLs itself
    /// once an apply copied N clusters.
    pub fn with_env_crash(note: &'a mut dyn FnMut(&str)) -> Hooks<'a> {
        let after: Option<u64> = std::env::var("UBLK_PLOOP_TEST_CRASH_APPLY_AFTER").ok().and_then(|v| v.parse().ok());
        Hooks {
            note: Box::new(note),
            before_cluster: Box::new(move |applied| {
                if after == Some(applied) {
                    // SAFETY: the process kills itself, as a crash would.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                ControlFlow::Continue(())
            }),
        }
    }
}

/// Read a stream from `input` (answering on `answers` when two-way) into
/// `dest`. On any error the destination is as it was. Streams that claim a
/// disk larger than the free space of the destination's filesystem are
/// refused (see [`receive_with`]).
pub fn receive(input: Box<dyn Read>, answers: Option<Box<dyn Write>>, dest: &Path, opts: &ReceiveOptions) -> Result<Received> {
    receive_with(input, answers, dest, opts, None, &mut |_| {})
}

/// As [`receive`], refusing a stream that claims a disk (or an image file)
/// of more than `max_size` bytes (None: the free space of the
/// destination's filesystem), or whose data exceeds it; `note` hears what
/// was done besides (an interrupted apply finished, a stale delta removed).
pub fn receive_with(
    input: Box<dyn Read>,
    answers: Option<Box<dyn Write>>,
    dest: &Path,
    opts: &ReceiveOptions,
    max_size: Option<u64>,
    note: &mut dyn FnMut(&str),
) -> Result<Received> {
    block_on(receive_in(&SyncIo, input, answers, dest, opts, max_size, Hooks::with_env_crash(note)))
}

/// As [`receive_with`], every file and name touched through `io`. With
/// `max_size` None the limit is the free space of the destination's
/// filesystem, asked of the host (statvfs is no `Io` method): a
/// simulated world passes its own.
pub async fn receive_in<I: Io>(
    io: &I,
    input: Box<dyn Read>,
    answers: Option<Box<dyn Write>>,
    dest: &Path,
    opts: &ReceiveOptions,
    max_size: Option<u64>,
    mut hooks: Hooks<'_>,
) -> Result<Received> {
    let started = io.now();
    let dest_is_dir = matches!(io.stat(dest), Ok(Some(st)) if st.kind == FileKind::Dir) || is_link_to_dir(io, dest);
    let as_dir = !opts.incremental && (dest_is_dir || dest.as_os_str().as_bytes().ends_with(b"/"));
    let dest = trim_slashes(dest);
    check_destination(io, &dest, opts.incremental)?;
    let lock = DestLock::take(io, &dest)?;
    // Another receive may have finished between the check and the lock.
    check_destination(io, &dest, opts.incremental)?;
    // An incremental receive changes a disk directory's top: hold ploop's
    // lock on the disk throughout, as every command that changes it does.
    let _disk_lock = if opts.incremental && Disk::is_disk(&dest) { Some(Disk::load_locked(&dest)?) } else { None };
    let mut out = Received::default();
    if opts.incremental {
        out.finished_apply = finish_interrupted_apply_in(io, &dest, opts.direct, &mut hooks).await?;
    }
    let max_size = match max_size {
        Some(m) => m,
        None => free_space(parent_of(&dest))?,
    };
    let mut rx = Receiving { io, reader: Reader::new(input), answers, opts: opts.clone(), dest, as_dir, max_size, sink: None, out };
    let result = rx.run(&mut hooks).await;
    let result = match result {
        Ok(()) => {
            rx.out.secs = io.now().saturating_duration_since(started).as_secs_f64();
            rx.out.stream_bytes = rx.reader.offset();
            Ok(rx.out)
        }
        Err(e) => {
            rx.answer(-e.errno().abs().max(1));
            if let Some(sink) = rx.sink.take() {
                sink.discard(io).await;
            }
            Err(e)
        }
    };
    drop(lock);
    result
}

/// A symbolic link that leads to a directory (`Path::is_dir` follows links).
fn is_link_to_dir<I: Io>(io: &I, p: &Path) -> bool {
    matches!(io.stat(p), Ok(Some(st)) if st.kind == FileKind::Symlink)
        && io.canonicalize(p).is_ok_and(|t| matches!(io.stat(&t), Ok(Some(st)) if st.kind == FileKind::Dir))
}

/// Whether a name leads to anything, following symbolic links (as
/// `Path::exists`: a dangling link does not).
fn exists<I: Io>(io: &I, p: &Path) -> bool {
    match io.stat(p) {
        Ok(Some(st)) if st.kind == FileKind::Symlink => io.canonicalize(p).is_ok(),
        Ok(Some(_)) => true,
        _ => false,
    }
}

/// `dest` without trailing slashes (a disk directory may be named `dir/`).
fn trim_slashes(dest: &Path) -> PathBuf {
    let b = dest.as_os_str().as_bytes();
    let mut end = b.len();
    while end > 1 && b[end - 1] == b'/' {
        end -= 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&b[..end]))
}

fn parent_of(p: &Path) -> &Path {
    p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Bytes an unprivileged user may still write on the filesystem of `dir`.
fn free_space(dir: &Path) -> Result<u64> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::invalid(format!("{}: a NUL in the path", dir.display())))?;
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(std::io::Error::last_os_error(), dir.display()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn check_destination<I: Io>(io: &I, dest: &Path, incremental: bool) -> Result<()> {
    // `.`, `..` or `/` name a directory that can never be renamed over: a
    // receive into one would transfer everything and then fail.
    if !matches!(dest.components().next_back(), Some(std::path::Component::Normal(_))) {
        return Err(Error::invalid(format!(
            "{}: the destination must name a new image or disk directory (e.g. DIR/backup.hds or DIR/ct101), not a directory by . or .. or /",
            dest.display()
        )));
    }
    if incremental {
        if !exists(io, dest) {
            return Err(Error::new(libc::ENOENT, format!("{}: an incremental stream updates an existing image; it does not exist", dest.display())));
        }
    } else if matches!(io.stat(dest), Ok(Some(_))) && !is_empty_dir(io, dest) {
        return Err(Error::new(libc::EEXIST, format!("{}: destination exists; refusing to overwrite it (--incremental updates an image)", dest.display())));
    } else {
        // A delta an earlier receive left for the image once under this
        // name: the next incremental receive would apply it to the new one.
        let left = temp_beside(dest, ".incoming");
        if matches!(io.stat(&left), Ok(Some(_))) {
            return Err(Error::new(
                libc::EEXIST,
                format!(
                    "{}: exists, a delta an earlier incremental receive left to be applied to the image once named {}; \
                     a new image under that name would get it applied later: if the old image is gone, remove {}",
                    left.display(),
                    dest.display(),
                    left.display()
                ),
            ));
        }
    }
    Ok(())
}

fn is_empty_dir<I: Io>(io: &I, p: &Path) -> bool {
    matches!(io.stat(p), Ok(Some(st)) if st.kind == FileKind::Dir) && io.read_dir(p).is_ok_and(|d| d.is_empty())
}

struct Receiving<'a, I: Io> {
    io: &'a I,
    reader: Reader<Box<dyn Read>>,
    answers: Option<Box<dyn Write>>,
    opts: ReceiveOptions,
    dest: PathBuf,
    /// A disk directory is wanted (the destination is one, or ends in /).
    as_dir: bool,
    max_size: u64,
    sink: Option<Sink>,
    out: Received,
}

impl<I: Io> Receiving<'_, I> {
    /// Answer a packet on a two-way channel (best effort on errors: the
    /// sender may be gone).
    fn answer(&mut self, status: i32) {
        if let Some(w) = self.answers.as_mut() {
            let _ = w.write_all(&status.to_le_bytes()).and_then(|_| w.flush());
        }
    }

    fn ok(&mut self, h: &Header) -> Result<()> {
        if h.kind.answered() {
            if let Some(w) = self.answers.as_mut() {
                w.write_all(&0i32.to_le_bytes()).and_then(|_| w.flush()).map_err(|e| Error::io(e, "answering the sender"))?;
            }
        }
        Ok(())
    }

    async fn run(&mut self, hooks: &mut Hooks<'_>) -> Result<()> {
        let mut payload = Vec::new();
        // The handshake: a SYNC whose position carries the sender's flags.
        let h = self.reader.next(&mut payload)?.ok_or_else(|| bad("the stream is empty"))?;
        if h.kind != Kind::Cmd || command_of(&payload)? != cmd::SYNC {
            return Err(bad("the stream does not start with ploop copy's handshake"));
        }
        let ours = FLAG_MD5 | FLAG_COPY_DEVICE;
        let md5 = if self.opts.two_way {
            self.answer(-(ours as i32));
            h.pos & ours & FLAG_MD5 != 0
        } else {
            h.pos & FLAG_MD5 != 0
        };
        if !self.opts.two_way && !md5 {
            return Err(bad("a one-way stream must carry checksums (this one does not)"));
        }
        self.reader.set_md5(md5);
        self.out.md5 = md5;
        self.out.incremental = self.opts.incremental;
        loop {
            let h = self.reader.next(&mut payload)?.ok_or_else(|| bad("the stream ended before its end mark (cut off?)"))?;
            self.out.packets += 1;
            if h.size == 0 || (h.kind == Kind::Cmd && command_of(&payload)? == cmd::FINISH) {
                if !self.opts.two_way && !self.reader.check_trailer(&payload)? {
                    return Err(bad("the end mark carries no digest of the stream; refusing a one-way stream that cannot be verified"));
                }
                let sink = self.sink.take().ok_or_else(|| bad("the stream ended before any disk was described"))?;
                self.out.image = self.dest.clone();
                sink.finish(self.io, &self.dest, self.opts.direct, &mut self.out, hooks).await?;
                // ploop's receiver answers the end, after its fsync.
                self.answer(0);
                return Ok(());
            }
            match h.kind {
                Kind::Cmd => self.command(&h, &payload).await?,
                Kind::DataDevice => {
                    let sink = match self.sink.as_mut() {
                        Some(s @ Sink::Device { .. }) => s,
                        _ => return Err(bad("disk data before the disk was described (no INIT command)")),
                    };
                    sink.write_disk(self.io, h.pos, &payload).await?;
                    self.out.data_bytes += payload.len() as u64;
                }
                Kind::Data | Kind::DataAsync => {
                    if self.sink.is_none() {
                        if self.opts.incremental {
                            return Err(Error::unsupported("an image-file stream (ploop 7's copy) cannot update an existing image; receive it as a new one"));
                        }
                        self.sink = Some(Sink::file(self.io, &self.dest, self.max_size).await?);
                        self.out.kind = "image-file".into();
                    }
                    match self.sink.as_mut() {
                        Some(s @ Sink::File { .. }) => s.write_file(self.io, h.pos, &payload).await?,
                        _ => return Err(bad("image-file data in a stream of disk data")),
                    }
                    self.out.data_bytes += payload.len() as u64;
                }
                Kind::DataCbt => self.out.cbt_records_ignored += 1,
            }
            self.ok(&h)?;
        }
    }

    async fn command(&mut self, h: &Header, payload: &[u8]) -> Result<()> {
        match command_of(payload)? {
            cmd::SYNC => match self.sink.as_mut() {
                Some(s) => s.sync(self.io).await,
                None => Ok(()),
            },
            cmd::INIT_PLOOP => {
                if self.sink.is_some() {
                    return Err(bad("a second INIT command"));
                }
                // The cluster size in sectors is the packet's size field.
                let cluster = h.size as u64 * 512;
                let size = h.pos.checked_mul(512).ok_or_else(|| bad(format!("disk size of {} sectors", h.pos)))?;
                if !self.opts.incremental && size > self.max_size {
                    return Err(too_big(size, self.max_size));
                }
                self.sink = Some(Sink::device(self.io, &self.dest, self.as_dir, size, cluster, &self.opts).await?);
                self.out.kind = "device".into();
                self.out.disk_size = size;
                self.out.cluster_size = cluster;
                Ok(())
            }
            cmd::INIT_QCOW => Err(Error::unsupported("the sender offers a qcow2 image; only ploop images are received")),
            cmd::MOUNT | cmd::UMOUNT => Ok(()),
            c => Err(bad(format!("unknown command {c}"))),
        }
    }
}

fn too_big(claimed: u64, max: u64) -> Error {
    Error::new(
        libc::EFBIG,
        format!(
            "the stream describes a disk of {claimed} bytes, more than the {max} allowed (--max-size; by default the free space of the destination's filesystem); refused before anything was written"
        ),
    )
}

/// Where the stream's bytes go until it is complete.
enum Sink {
    /// Disk bytes into a stack: a new image (or disk directory) under a
    /// temporary name, or a delta over the existing destination.
    Device { stack: Stack, made: Made, size: u64 },
    /// Image-file bytes into a new file under a temporary name.
    File { file: Handle, temp: PathBuf, max: u64 },
}

enum Made {
    Image { temp: PathBuf },
    DiskDir { temp: PathBuf },
    Delta { delta: PathBuf, target: Vec<LayerSpec> },
}

impl Sink {
    async fn device<I: Io>(io: &I, dest: &Path, as_dir: bool, size: u64, cluster: u64, opts: &ReceiveOptions) -> Result<Sink> {
        // Validates the geometry a hostile stream could get wrong, and
        // bounds what it costs: memory follows the number of clusters.
        crate::layers::ploop::header::Header::new(size, cluster).map_err(|e| bad(format!("the disk described is impossible: {e}")))?;
        if size / cluster > MAX_RECEIVED_CLUSTERS {
            return Err(Error::unsupported(format!(
                "the disk described has {} clusters of {cluster} bytes (at most {MAX_RECEIVED_CLUSTERS} are received)",
                size / cluster
            )));
        }
        let stack_opts = StackOptions { read_only: false, direct: opts.direct, offline: false, link_log: None };
        let (made, specs) = if opts.incremental {
            let target = target_chain(io, dest).await?;
            let top = &target.last().expect("a chain is never empty").path;
            // The delta takes the target's geometry, which must match.
            let (probe, _) = Stack::open_layers(io, &target, &StackOptions { read_only: true, direct: opts.direct, offline: false, link_log: None }).await?;
            // Refused before the stream is read, not only at the apply.
            check_top_is_ours(io, &probe)?;
            if probe.size() != size || probe.cluster_size() != cluster {
                return Err(Error::invalid(format!(
                    "{}: the stream's disk ({size} bytes, clusters of {cluster}) is not this image's ({} bytes, clusters of {})",
                    dest.display(),
                    probe.size(),
                    probe.cluster_size()
                )));
            }
            // ... and its version, as every delta of a chain does.
            let variant = probe.layers().last().and_then(|l| l.variant()).unwrap_or(Variant::V2);
            drop(probe);
            let (delta, _) = make_temp(top, "incoming", false, |p| async move { PloopLayer::create_variant(io, &p, size, cluster, variant).await }).await?;
            let mut specs = target.clone();
            specs.push(LayerSpec::ploop(&delta));
            (Made::Delta { delta, target }, specs)
        } else if as_dir {
            let (temp, disk) = make_temp(dest, "partial", true, |p| async move {
                io.create_dir(&p).map_err(|e| Error::io(e, p.display()))?;
                Disk::init(io, &p, size, cluster).await.inspect_err(|_| {
                    let _ = temporaries::remove_tree(io, &p);
                })
            })
            .await?;
            let specs = match disk.layers(None) {
                Ok(s) => s,
                Err(e) => {
                    remove_temp(io, &temp, true);
                    return Err(e);
                }
            };
            (Made::DiskDir { temp }, specs)
        } else {
            let (temp, _) = make_temp(dest, "partial", false, |p| async move { PloopLayer::create(io, &p, size, cluster).await }).await?;
            (Made::Image { temp: temp.clone() }, vec![LayerSpec::ploop(&temp)])
        };
        match Stack::open_layers(io, &specs, &stack_opts).await {
            Ok((stack, _)) => Ok(Sink::Device { stack, made, size }),
            Err(e) => {
                made.remove(io);
                Err(e)
            }
        }
    }

    async fn file<I: Io>(io: &I, dest: &Path, max: u64) -> Result<Sink> {
        let (temp, file) =
            make_temp(dest, "partial", false, |p| async move { io.open(&p, &OpenHow::create_new(IMAGE_MODE)).map_err(|e| Error::io(e, p.display())) })
                .await?;
        Ok(Sink::File { file, temp, max })
    }

    async fn write_disk<I: Io>(&mut self, io: &I, pos: u64, data: &[u8]) -> Result<()> {
        let Sink::Device { stack, size, .. } = self else { unreachable!("checked by the caller") };
        let end = pos.checked_add(data.len() as u64);
        if pos % 512 != 0 || data.len() % 512 != 0 || end.map_or(true, |e| e > *size) {
            return Err(bad(format!("disk data at {pos}+{} is unaligned or past the end of the disk ({size})", data.len())));
        }
        if data.is_empty() {
            return Ok(());
        }
        // Aligned, so that O_DIRECT takes it as it is.
        let buf = AlignedBuf::from_slice(data);
        stack.write(io, pos, &buf).await
    }

    async fn write_file<I: Io>(&mut self, io: &I, pos: u64, data: &[u8]) -> Result<()> {
        let Sink::File { file, temp, max } = self else { unreachable!("checked by the caller") };
        let end = pos.checked_add(data.len() as u64);
        if end.map_or(true, |e| e > MAX_FILE_STREAM) {
            return Err(bad(format!("image-file data at {pos}+{} is past any image's end", data.len())));
        }
        if end.is_some_and(|e| e > *max) {
            return Err(Error::new(
                libc::EFBIG,
                format!(
                    "image-file data at {pos}+{} makes a file of more than the {max} bytes allowed (--max-size; by default the free space of the destination's filesystem)",
                    data.len()
                ),
            ));
        }
        // A header as it arrives: what it claims is bounded before the
        // rest of the file is taken.
        if pos == 0 && data.len() >= crate::layers::ploop::header::HEADER_SIZE {
            image_file_claims(data, *max)?;
        }
        io.write_at(file.fd(), data, pos).await.map_err(|e| Error::io(e, temp.display()))
    }

    async fn sync<I: Io>(&mut self, io: &I) -> Result<()> {
        match self {
            Sink::Device { stack, .. } => stack.flush(io).await,
            Sink::File { file, temp, .. } => io.sync_data(file.fd()).await.map_err(|e| Error::io(e, temp.display())),
        }
    }

    /// The stream is complete: make the result durable, check it, and put
    /// it in place.
    async fn finish<I: Io>(self, io: &I, dest: &Path, direct: Direct, out: &mut Received, hooks: &mut Hooks<'_>) -> Result<()> {
        match self {
            Sink::Device { stack, made, .. } => {
                let closed = stack.close(io).await;
                drop(stack);
                if let Err(e) = closed {
                    made.remove(io);
                    return Err(e);
                }
                let done = match &made {
                    Made::Image { temp } => match check_clean(io, temp).await {
                        Ok(()) => place(io, temp, dest).await,
                        Err(e) => Err(e),
                    },
                    Made::DiskDir { temp } => match Disk::load(temp).and_then(|disk| disk.layers(None)) {
                        Ok(layers) => match check_clean(io, &layers[0].path).await {
                            Ok(()) => place(io, temp, dest).await,
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    },
                    Made::Delta { delta, target } => {
                        let top = &target.last().expect("never empty").path;
                        let complete = temp_beside(top, ".incoming");
                        let published = match check_clean(io, delta).await {
                            Ok(()) => publish_delta(io, delta, &complete).await,
                            Err(e) => Err(e),
                        };
                        match published {
                            // From here on the delta is complete and durable:
                            // if the apply stops, the next receive finishes it.
                            Ok(()) => apply_delta(io, &complete, target, direct, hooks).await.map(|n| out.applied_clusters = n),
                            Err(e) => Err(e),
                        }
                    }
                };
                done.inspect_err(|_| made.remove(io))
            }
            Sink::File { file, temp, max } => {
                let synced = io.sync_data(file.fd()).await.map_err(|e| Error::io(e, temp.display()));
                drop(file);
                let done = match synced {
                    Ok(()) => file_claims_and_check(io, &temp, max, out).await,
                    Err(e) => Err(e),
                };
                let done = match done {
                    Ok(()) => place(io, &temp, dest).await,
                    Err(e) => Err(e),
                };
                done.inspect_err(|_| remove_temp(io, &temp, false))
            }
        }
    }

    /// Give up: remove what was made.
    async fn discard<I: Io>(self, io: &I) {
        match self {
            Sink::Device { stack, made, .. } => {
                let _ = stack.close(io).await;
                drop(stack);
                made.remove(io);
            }
            Sink::File { file, temp, .. } => {
                drop(file);
                remove_temp(io, &temp, false);
            }
        }
    }
}

/// A received image file, synced and closed: what its header claims is
/// bounded and reported, and the whole checks clean.
async fn file_claims_and_check<I: Io>(io: &I, temp: &Path, max: u64, out: &mut Received) -> Result<()> {
    let file = io.open(temp, &OpenHow::read()).map_err(|e| Error::io(e, temp.display()))?;
    let h = crate::layers::ploop::load::read_header(io, file.fd(), &temp.display().to_string()).await?;
    drop(file);
    image_file_claims(&h.header.to_bytes(), max)?;
    out.disk_size = h.header.size_bytes();
    out.cluster_size = h.header.cluster_bytes();
    check_clean(io, temp).await
}

/// Bound what an image file's header claims (its table is read into
/// memory by the check): at most `MAX_RECEIVED_CLUSTERS` clusters, a disk
/// of at most `max` bytes.
fn image_file_claims(header: &[u8], max: u64) -> Result<()> {
    let h = crate::layers::ploop::header::Header::parse(header).map_err(|e| bad(format!("the image file's header: {e}")))?;
    if h.bat_entries as u64 > MAX_RECEIVED_CLUSTERS {
        return Err(Error::unsupported(format!(
            "the image file's table has {} entries (at most {MAX_RECEIVED_CLUSTERS} are received)",
            h.bat_entries
        )));
    }
    if h.size_bytes() > max {
        return Err(too_big(h.size_bytes(), max));
    }
    Ok(())
}

impl Made {
    /// Remove what was made and not put in place (a delta that was made
    /// complete is gone from its temporary name, and stays).
    fn remove<I: Io>(&self, io: &I) {
        match self {
            Made::Image { temp } => remove_temp(io, temp, false),
            Made::DiskDir { temp } => remove_temp(io, temp, true),
            Made::Delta { delta, .. } => {
                // Checked, then let go: remove_temp takes the list again.
                let ours = registry().holds(delta);
                if ours {
                    remove_temp(io, delta, false);
                }
            }
        }
    }
}

async fn check_clean<I: Io>(io: &I, image: &Path) -> Result<()> {
    let report = check::check(io, image, Format::Ploop, false).await?;
    if report.verdict() != Verdict::Clean {
        return Err(Error::corrupt(format!(
            "the received image does not check clean ({:?}: {} header errors, {} bad entries, {} leaked clusters)",
            report.verdict(),
            report.header_errors.len(),
            report.bad_entries.len(),
            report.leaked_clusters
        )));
    }
    Ok(())
}

