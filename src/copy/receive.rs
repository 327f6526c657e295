//! The receiving end of a copy stream: a new ploop image (or disk
//! directory) from a full copy, or an existing one brought up to date by an
//! incremental one.
//!
//! Nothing that looks complete comes out of a stream that is not: a new
//! image is built under a temporary name and renamed into place only after
//! the end mark arrived, the stream checked out and the image passed a
//! check; an incremental stream is gathered into a delta beside the image
//! and applied only then.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::wire::{bad, cmd, command_of, Header, Kind, Reader, FLAG_COPY_DEVICE, FLAG_MD5};
use crate::check::{self, Verdict};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::io::{block_on, AlignedBuf, Direct, Io, SyncIo};
use crate::layers::header::Variant;
use crate::layers::{Format, PloopLayer, IMAGE_MODE};
use crate::stack::{LayerSpec, Stack, StackOptions};

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
/// `dest`. On any error the destination is as it was.
pub fn receive(input: Box<dyn Read>, answers: Option<Box<dyn Write>>, dest: &Path, opts: &ReceiveOptions) -> Result<Received> {
    let started = Instant::now();
    check_destination(dest, opts.incremental)?;
    let mut rx = Receiving { reader: Reader::new(input), answers, opts: opts.clone(), dest: dest.to_path_buf(), sink: None, out: Received::default() };
    let result = rx.run();
    match result {
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
    }
}

fn check_destination(dest: &Path, incremental: bool) -> Result<()> {
    if incremental {
        if !dest.exists() {
            return Err(Error::new(libc::ENOENT, format!("{}: an incremental stream updates an existing image; it does not exist", dest.display())));
        }
    } else if dest.exists() && !is_empty_dir(dest) {
        return Err(Error::new(libc::EEXIST, format!("{}: destination exists; refusing to overwrite it (--incremental updates an image)", dest.display())));
    }
    Ok(())
}

fn is_empty_dir(p: &Path) -> bool {
    p.is_dir() && std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

struct Receiving {
    reader: Reader<Box<dyn Read>>,
    answers: Option<Box<dyn Write>>,
    opts: ReceiveOptions,
    dest: PathBuf,
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
                sink.finish(&self.dest, &mut self.out)?;
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
                        self.sink = Some(Sink::file(&self.dest)?);
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
                self.sink = Some(Sink::device(&self.dest, size, cluster, &self.opts)?);
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

/// Where the stream's bytes go until it is complete.
enum Sink {
    /// Disk bytes into a stack: a new image (or disk directory) under a
    /// temporary name, or a delta over the existing destination.
    Device { stack: Stack, made: Made, size: u64 },
    /// Image-file bytes into a new file under a temporary name.
    File { file: std::fs::File, temp: PathBuf },
}

enum Made {
    Image { temp: PathBuf },
    DiskDir { temp: PathBuf },
    Delta { delta: PathBuf, target: Vec<LayerSpec> },
}

fn temp_beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dest.with_file_name(name)
}

impl Sink {
    fn device(dest: &Path, size: u64, cluster: u64, opts: &ReceiveOptions) -> Result<Sink> {
        // Validates the geometry a hostile stream could get wrong, and
        // bounds what it costs: memory follows the number of clusters.
        crate::layers::header::Header::new(size, cluster).map_err(|e| bad(format!("the disk described is impossible: {e}")))?;
        if size / cluster > MAX_RECEIVED_CLUSTERS {
            return Err(Error::unsupported(format!(
                "the disk described has {} clusters of {cluster} bytes (at most {MAX_RECEIVED_CLUSTERS} are received)",
                size / cluster
            )));
        }
        let io = &SyncIo;
        let stack_opts = StackOptions { read_only: false, direct: opts.direct };
        let (made, specs) = if opts.incremental {
            let target = if Disk::is_disk(dest) { Disk::load(dest)?.layers(None)? } else { vec![LayerSpec::ploop(dest)] };
            let top = &target.last().expect("a chain is never empty").path;
            let delta = temp_beside(top, ".incoming");
            let _ = std::fs::remove_file(&delta);
            // The delta takes the target's geometry, which must match.
            let (probe, _) = block_on(Stack::open_layers(io, &target, &StackOptions { read_only: true, direct: opts.direct }))?;
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
            block_on(PloopLayer::create_variant(io, &delta, size, cluster, variant))?;
            let mut specs = target.clone();
            specs.push(LayerSpec::ploop(&delta));
            (Made::Delta { delta, target }, specs)
        } else if dest.is_dir() || dest.to_string_lossy().ends_with('/') {
            let temp = temp_beside(Path::new(dest.to_string_lossy().trim_end_matches('/')), ".partial");
            let _ = std::fs::remove_dir_all(&temp);
            let disk = block_on(Disk::init(io, &temp, size, cluster))?;
            let specs = disk.layers(None)?;
            (Made::DiskDir { temp }, specs)
        } else {
            let temp = temp_beside(dest, ".partial");
            let _ = std::fs::remove_file(&temp);
            block_on(PloopLayer::create(io, &temp, size, cluster))?;
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

    fn file(dest: &Path) -> Result<Sink> {
        let temp = temp_beside(dest, ".partial");
        let _ = std::fs::remove_file(&temp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(IMAGE_MODE)
            .open(&temp)
            .map_err(|e| Error::io(e, temp.display()))?;
        Ok(Sink::File { file, temp })
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
        let Sink::File { file, temp } = self else { unreachable!("checked by the caller") };
        if pos.checked_add(data.len() as u64).map_or(true, |e| e > MAX_FILE_STREAM) {
            return Err(bad(format!("image-file data at {pos}+{} is past any image's end", data.len())));
        }
        block_on(SyncIo.write_at(file.as_raw_fd(), data, pos)).map_err(|e| Error::io(e, temp.display()))
    }

    fn sync(&mut self) -> Result<()> {
        match self {
            Sink::Device { stack, .. } => block_on(stack.flush(&SyncIo)),
            Sink::File { file, temp } => block_on(SyncIo.sync_data(file.as_raw_fd())).map_err(|e| Error::io(e, temp.display())),
        }
    }

    /// The stream is complete: make the result durable, check it, and put
    /// it in place.
    fn finish(self, dest: &Path, out: &mut Received) -> Result<()> {
        let io = &SyncIo;
        match self {
            Sink::Device { stack, made, .. } => {
                let closed = block_on(stack.close(io));
                drop(stack);
                if let Err(e) = closed {
                    made.remove();
                    return Err(e);
                }
                let placed = match &made {
                    Made::Image { temp } => check_clean(temp).and_then(|_| place(temp, dest)),
                    Made::DiskDir { temp } => {
                        let disk = Disk::load(temp)?;
                        let base = disk.layers(None)?.remove(0).path;
                        check_clean(&base).and_then(|_| place(temp, Path::new(dest.to_string_lossy().trim_end_matches('/'))))
                    }
                    Made::Delta { delta, target } => apply_delta(delta, target, out),
                };
                if placed.is_err() {
                    made.remove();
                }
                placed
            }
            Sink::File { file, temp } => {
                let synced = block_on(io.sync_data(file.as_raw_fd())).map_err(|e| Error::io(e, temp.display()));
                drop(file);
                let done = synced.and_then(|_| {
                    let h = block_on(crate::layers::ploop::load::read_header(io, std::fs::File::open(&temp).map_err(|e| Error::io(e, temp.display()))?.as_raw_fd(), &temp.display().to_string()))?;
                    out.disk_size = h.header.size_bytes();
                    out.cluster_size = h.header.cluster_bytes();
                    check_clean(&temp)
                });
                match done.and_then(|_| place(&temp, dest)) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let _ = std::fs::remove_file(&temp);
                        Err(e)
                    }
                }
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
            Sink::File { file, temp } => {
                drop(file);
                let _ = std::fs::remove_file(temp);
            }
        }
    }
}

impl Made {
    fn remove(&self) {
        match self {
            Made::Image { temp } => {
                let _ = std::fs::remove_file(temp);
            }
            Made::DiskDir { temp } => {
                let _ = std::fs::remove_dir_all(temp);
            }
            Made::Delta { delta, .. } => {
                let _ = std::fs::remove_file(delta);
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

/// Rename the finished temporary into place and make that durable.
fn place(temp: &Path, dest: &Path) -> Result<()> {
    if is_empty_dir(dest) {
        std::fs::remove_dir(dest).map_err(|e| Error::io(e, dest.display()))?;
    }
    std::fs::rename(temp, dest).map_err(|e| Error::io(e, format_args!("{} -> {}", temp.display(), dest.display())))?;
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    block_on(SyncIo.sync_dir(dir)).map_err(|e| Error::io(e, dir.display()))
}

/// Copy the clusters of a verified delta into the target's top. The
/// target is marked in use meanwhile (an interruption shows), and the delta
/// stays until the target is closed, so the same stream can be applied
/// again.
fn apply_delta(delta: &Path, target: &[LayerSpec], out: &mut Received) -> Result<()> {
    let io = &SyncIo;
    let direct = Direct::Auto;
    let (src, _) = block_on(Stack::open_layers(io, &[LayerSpec::ploop(delta)], &StackOptions { read_only: true, direct }))?;
    let (dst, _) = block_on(Stack::open_layers(io, target, &StackOptions { read_only: false, direct }))?;
    let cluster = src.cluster_size();
    let mut buf = AlignedBuf::zeroed(cluster as usize);
    let mut applied = 0;
    let copied = (|| {
        for c in block_on(src.allocated()).iter_ones() {
            let at = c as u64 * cluster;
            let len = (src.size() - at).min(cluster) as usize;
            block_on(src.read(io, at, &mut buf[..len]))?;
            block_on(dst.write(io, at, &buf[..len]))?;
            applied += 1;
        }
        block_on(dst.flush(io))
    })();
    let closed = block_on(dst.close(io));
    drop(dst);
    copied?;
    closed?;
    out.applied_clusters = applied;
    drop(src);
    let _ = std::fs::remove_file(delta);
    check_clean(&target.last().expect("never empty").path)
}
