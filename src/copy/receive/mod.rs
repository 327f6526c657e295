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

mod apply;
mod temporaries;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::wire::{bad, cmd, command_of, Header, Kind, Reader, FLAG_COPY_DEVICE, FLAG_MD5};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::io::{block_on, AlignedBuf, Direct, Io, SyncIo};
use crate::layers::ploop::check::{self, Verdict};
use crate::layers::ploop::header::Variant;
use crate::layers::{Format, PloopLayer, IMAGE_MODE};
use crate::stack::{LayerSpec, Stack, StackOptions};
use apply::{apply_delta, check_top_is_ours, publish_delta, target_chain};
use temporaries::{make_temp, place, registry, remove_temp, temp_beside, DestLock};

pub use apply::finish_interrupted_apply;
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
    let started = Instant::now();
    let as_dir = !opts.incremental && (dest.is_dir() || dest.as_os_str().as_bytes().ends_with(b"/"));
    let dest = trim_slashes(dest);
    check_destination(&dest, opts.incremental)?;
    let lock = DestLock::take(&dest)?;
    // Another receive may have finished between the check and the lock.
    check_destination(&dest, opts.incremental)?;
    // An incremental receive changes a disk directory's top: hold ploop's
    // lock on the disk throughout, as every command that changes it does.
    let _disk_lock = if opts.incremental && Disk::is_disk(&dest) { Some(Disk::load_locked(&dest)?) } else { None };
    let mut out = Received::default();
    if opts.incremental {
        out.finished_apply = finish_interrupted_apply(&dest, opts.direct, note)?;
    }
    let max_size = match max_size {
        Some(m) => m,
        None => free_space(parent_of(&dest))?,
    };
    let mut rx = Receiving { reader: Reader::new(input), answers, opts: opts.clone(), dest, as_dir, max_size, sink: None, out };
    let result = rx.run();
    let result = match result {
        Ok(()) => {
            rx.out.secs = started.elapsed().as_secs_f64();
            rx.out.stream_bytes = rx.reader.offset();
            Ok(rx.out)
        }
        Err(e) => {
            rx.answer(-e.errno().abs().max(1));
            if let Some(sink) = rx.sink.take() {
                sink.discard();
            }
            Err(e)
        }
    };
    drop(lock);
    result
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

fn check_destination(dest: &Path, incremental: bool) -> Result<()> {
    // `.`, `..` or `/` name a directory that can never be renamed over: a
    // receive into one would transfer everything and then fail.
    if !matches!(dest.components().next_back(), Some(std::path::Component::Normal(_))) {
        return Err(Error::invalid(format!(
            "{}: the destination must name a new image or disk directory (e.g. DIR/backup.hds or DIR/ct101), not a directory by . or .. or /",
            dest.display()
        )));
    }
    if incremental {
        if !dest.exists() {
            return Err(Error::new(libc::ENOENT, format!("{}: an incremental stream updates an existing image; it does not exist", dest.display())));
        }
    } else if std::fs::symlink_metadata(dest).is_ok() && !is_empty_dir(dest) {
        return Err(Error::new(libc::EEXIST, format!("{}: destination exists; refusing to overwrite it (--incremental updates an image)", dest.display())));
    } else {
        // A delta an earlier receive left for the image once under this
        // name: the next incremental receive would apply it to the new one.
        let left = temp_beside(dest, ".incoming");
        if std::fs::symlink_metadata(&left).is_ok() {
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

fn is_empty_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) && std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

struct Receiving {
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

impl Receiving {
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

    fn run(&mut self) -> Result<()> {
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
                sink.finish(&self.dest, self.opts.direct, &mut self.out)?;
                // ploop's receiver answers the end, after its fsync.
                self.answer(0);
                return Ok(());
            }
            match h.kind {
                Kind::Cmd => self.command(&h, &payload)?,
                Kind::DataDevice => {
                    let sink = match self.sink.as_mut() {
                        Some(s @ Sink::Device { .. }) => s,
                        _ => return Err(bad("disk data before the disk was described (no INIT command)")),
                    };
                    sink.write_disk(h.pos, &payload)?;
                    self.out.data_bytes += payload.len() as u64;
                }
                Kind::Data | Kind::DataAsync => {
                    if self.sink.is_none() {
                        if self.opts.incremental {
                            return Err(Error::unsupported("an image-file stream (ploop 7's copy) cannot update an existing image; receive it as a new one"));
                        }
                        self.sink = Some(Sink::file(&self.dest, self.max_size)?);
                        self.out.kind = "image-file".into();
                    }
                    match self.sink.as_mut() {
                        Some(s @ Sink::File { .. }) => s.write_file(h.pos, &payload)?,
                        _ => return Err(bad("image-file data in a stream of disk data")),
                    }
                    self.out.data_bytes += payload.len() as u64;
                }
                Kind::DataCbt => self.out.cbt_records_ignored += 1,
            }
            self.ok(&h)?;
        }
    }

    fn command(&mut self, h: &Header, payload: &[u8]) -> Result<()> {
        match command_of(payload)? {
            cmd::SYNC => match self.sink.as_mut() {
                Some(s) => s.sync(),
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
                self.sink = Some(Sink::device(&self.dest, self.as_dir, size, cluster, &self.opts)?);
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
    File { file: std::fs::File, temp: PathBuf, max: u64 },
}

enum Made {
    Image { temp: PathBuf },
    DiskDir { temp: PathBuf },
    Delta { delta: PathBuf, target: Vec<LayerSpec> },
}

impl Sink {
    fn device(dest: &Path, as_dir: bool, size: u64, cluster: u64, opts: &ReceiveOptions) -> Result<Sink> {
        // Validates the geometry a hostile stream could get wrong, and
        // bounds what it costs: memory follows the number of clusters.
        crate::layers::ploop::header::Header::new(size, cluster).map_err(|e| bad(format!("the disk described is impossible: {e}")))?;
        if size / cluster > MAX_RECEIVED_CLUSTERS {
            return Err(Error::unsupported(format!(
                "the disk described has {} clusters of {cluster} bytes (at most {MAX_RECEIVED_CLUSTERS} are received)",
                size / cluster
            )));
        }
        let io = &SyncIo;
        let stack_opts = StackOptions { read_only: false, direct: opts.direct };
        let (made, specs) = if opts.incremental {
            let target = target_chain(dest)?;
            let top = &target.last().expect("a chain is never empty").path;
            // The delta takes the target's geometry, which must match.
            let (probe, _) = block_on(Stack::open_layers(io, &target, &StackOptions { read_only: true, direct: opts.direct }))?;
            // Refused before the stream is read, not only at the apply.
            check_top_is_ours(&probe)?;
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
            let (delta, _) = make_temp(top, "incoming", false, |p| block_on(PloopLayer::create_variant(io, p, size, cluster, variant)))?;
            let mut specs = target.clone();
            specs.push(LayerSpec::ploop(&delta));
            (Made::Delta { delta, target }, specs)
        } else if as_dir {
            let (temp, disk) = make_temp(dest, "partial", true, |p| {
                std::fs::create_dir(p).map_err(|e| Error::io(e, p.display()))?;
                block_on(Disk::init(io, p, size, cluster)).inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(p);
                })
            })?;
            let specs = match disk.layers(None) {
                Ok(s) => s,
                Err(e) => {
                    remove_temp(&temp, true);
                    return Err(e);
                }
            };
            (Made::DiskDir { temp }, specs)
        } else {
            let (temp, _) = make_temp(dest, "partial", false, |p| block_on(PloopLayer::create(io, p, size, cluster)))?;
            (Made::Image { temp: temp.clone() }, vec![LayerSpec::ploop(&temp)])
        };
        match block_on(Stack::open_layers(io, &specs, &stack_opts)) {
            Ok((stack, _)) => Ok(Sink::Device { stack, made, size }),
            Err(e) => {
                made.remove();
                Err(e)
            }
        }
    }

    fn file(dest: &Path, max: u64) -> Result<Sink> {
        let (temp, file) = make_temp(dest, "partial", false, |p| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(IMAGE_MODE)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| Error::io(e, p.display()))
        })?;
        Ok(Sink::File { file, temp, max })
    }

    fn write_disk(&mut self, pos: u64, data: &[u8]) -> Result<()> {
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
        block_on(stack.write(&SyncIo, pos, &buf))
    }

    fn write_file(&mut self, pos: u64, data: &[u8]) -> Result<()> {
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
        block_on(SyncIo.write_at(file.as_raw_fd(), data, pos)).map_err(|e| Error::io(e, temp.display()))
    }

    fn sync(&mut self) -> Result<()> {
        match self {
            Sink::Device { stack, .. } => block_on(stack.flush(&SyncIo)),
            Sink::File { file, temp, .. } => block_on(SyncIo.sync_data(file.as_raw_fd())).map_err(|e| Error::io(e, temp.display())),
        }
    }

    /// The stream is complete: make the result durable, check it, and put
    /// it in place.
    fn finish(self, dest: &Path, direct: Direct, out: &mut Received) -> Result<()> {
        let io = &SyncIo;
        match self {
            Sink::Device { stack, made, .. } => {
                let closed = block_on(stack.close(io));
                drop(stack);
                if let Err(e) = closed {
                    made.remove();
                    return Err(e);
                }
                match &made {
                    Made::Image { temp } => check_clean(temp).and_then(|_| place(temp, dest)),
                    Made::DiskDir { temp } => Disk::load(temp)
                        .and_then(|disk| disk.layers(None))
                        .and_then(|layers| check_clean(&layers[0].path))
                        .and_then(|_| place(temp, dest)),
                    Made::Delta { delta, target } => {
                        let top = &target.last().expect("never empty").path;
                        let complete = temp_beside(top, ".incoming");
                        match check_clean(delta).and_then(|_| publish_delta(delta, &complete)) {
                            // From here on the delta is complete and durable:
                            // if the apply stops, the next receive finishes it.
                            Ok(()) => apply_delta(&complete, target, direct).map(|n| out.applied_clusters = n),
                            Err(e) => Err(e),
                        }
                    }
                }
                .inspect_err(|_| made.remove())
            }
            Sink::File { file, temp, max } => {
                let synced = block_on(io.sync_data(file.as_raw_fd())).map_err(|e| Error::io(e, temp.display()));
                drop(file);
                let done = synced.and_then(|_| {
                    let h = block_on(crate::layers::ploop::load::read_header(io, std::fs::File::open(&temp).map_err(|e| Error::io(e, temp.display()))?.as_raw_fd(), &temp.display().to_string()))?;
                    image_file_claims(&h.header.to_bytes(), max)?;
                    out.disk_size = h.header.size_bytes();
                    out.cluster_size = h.header.cluster_bytes();
                    check_clean(&temp)
                });
                done.and_then(|_| place(&temp, dest)).inspect_err(|_| remove_temp(&temp, false))
            }
        }
    }

    /// Give up: remove what was made.
    fn discard(self) {
        match self {
            Sink::Device { stack, made, .. } => {
                let _ = block_on(stack.close(&SyncIo));
                drop(stack);
                made.remove();
            }
            Sink::File { file, temp, .. } => {
                drop(file);
                remove_temp(&temp, false);
            }
        }
    }
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
    fn remove(&self) {
        match self {
            Made::Image { temp } => remove_temp(temp, false),
            Made::DiskDir { temp } => remove_temp(temp, true),
            Made::Delta { delta, .. } => {
                if registry().iter().any(|t| &t.path == delta) {
                    remove_temp(delta, false);
                }
            }
        }
    }
}

fn check_clean(image: &Path) -> Result<()> {
    let report = block_on(check::check(&SyncIo, image, Format::Ploop, false))?;
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

