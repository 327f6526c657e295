//! Image formats that can be a layer of a stack. A layer's format is
//! declared (by the disk descriptor or the command line), never guessed
//! from the data: a ploop image whose first bytes are damaged must not be
//! served as a raw disk (its header and BAT would become disk content, and
//! the first write would destroy it).

pub mod ploop;
pub mod qcow2;
pub mod raw;

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::io::{open_image_file_in, AlignedBuf, Direct, ImageFile, Io, LockHow};
use ploop::header;

pub use ploop::{MetaError, OpenReport, PloopLayer};
pub use raw::RawLayer;

/// The mode of every image file we create (before the umask): owner only,
/// as ploop creates them, for they hold a container's data.
pub const IMAGE_MODE: u32 = 0o600;

/// The formats a layer file can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Ploop,
    Raw,
    /// Read-only, with its own backing chain: the base of a stack.
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ploop" | "parallels" => Ok(Format::Ploop),
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown format '{s}' (use ploop, raw or qcow2)")),
        }
    }
}

#[allow(clippy::large_enum_variant)] // Layers live behind an Arc, one per file.
pub enum Layer {
    Ploop(PloopLayer),
    Raw(RawLayer),
    Qcow2(qcow2::Qcow2Layer),
}

/// Other formats' magics: served as raw they would expose their metadata
/// as disk content, so they are refused by name instead.
const FOREIGN_MAGICS: &[(&[u8], &str)] = &[
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vhd"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
];

/// What a file's first bytes say it is: used to explain a refusal (a qcow2
/// image given as a ploop one) and by `info`, never to pick how to serve it.
pub async fn detect_format<I: Io>(io: &I, path: &Path) -> Result<Format> {
    let file = open_image_file_in(io, path, false, Direct::Off)?;
    let mut head = AlignedBuf::zeroed(4096);
    io.read_at(file.fd(), &mut head, 0).await.map_err(|e| Error::io(e, path.display()))?;
    if header::has_magic(&head) {
        return Ok(Format::Ploop);
    }
    let len = file.len_in(io)?;
    if len == 0 {
        return Err(Error::invalid(format!("{}: empty file: neither a ploop image nor a usable raw disk", path.display())));
    }
    if head.starts_with(b"WithouFr") || head.starts_with(b"WithoutF") {
        // Most of a ploop signature: a damaged header, not a raw disk whose
        // "data" would be the image's own BAT.
        return Err(Error::corrupt(format!(
            "{}: damaged ploop signature {:?}; refusing to treat it as a raw disk",
            path.display(),
            String::from_utf8_lossy(&head[..16])
        )));
    }
    if qcow2::header::has_magic(&head) {
        return Err(Error::unsupported(format!(
            "{}: a QCOW2 image: declare it with --format qcow2 (it can be the bottom of a stack), or as <Type>QCOW2</Type> in a disk descriptor",
            path.display()
        )));
    }
    for (magic, name) in FOREIGN_MAGICS {
        if head.starts_with(magic) {
            return Err(Error::unsupported(format!("{}: {name} images are not supported as layers", path.display())));
        }
    }
    Ok(Format::Raw)
}

/// True when `path` is a ploop image whose in-use mark is set (its last
/// writer did not close it).
pub async fn marked_in_use<I: Io>(io: &I, path: &Path) -> Result<bool> {
    let file = open_image_file_in(io, path, false, Direct::Off)?;
    file_marked_in_use(io, &file).await
}

/// A ploop image still marked in use (a process died while it had it open
/// for writing), checked through a file already open read-only, is opened
/// read-write once and closed: its table checked and its grown-ahead tail
/// trimmed, so that it is clean before it serves as a read-only layer.
/// Returns whether it was marked. With `links`, the link log a killed
/// session left for it is applied first (a top being frozen may have had
/// one).
pub async fn clean_file_if_in_use<I: Io>(io: &I, file: &ImageFile, direct: Direct, links: Option<&Path>) -> Result<bool> {
    if !file_marked_in_use(io, file).await? {
        return Ok(false);
    }
    let (layer, _) = Layer::open_with(io, &file.path, Format::Ploop, true, direct, true, links).await?;
    layer.close(io).await?;
    layer.remove_link_log(io);
    Ok(true)
}

/// Make a layer about to be served below a writable top safe to serve:
/// a ploop image left in use is cleaned (see `clean_file_if_in_use`), and
/// any other is synced. A process killed while it wrote the file (a top
/// being frozen by a snapshot, its clean mark written but not synced)
/// leaves pages that reads show but a power cut may take back; a flush of
/// the device syncs only its top, so what is served from below must be
/// durable before it is served. Returns whether the image was cleaned.
pub async fn settle_lower<I: Io>(io: &I, file: &ImageFile, format: Format, direct: Direct, links: Option<&Path>) -> Result<bool> {
    if format == Format::Ploop && clean_file_if_in_use(io, file, direct, links).await? {
        return Ok(true);
    }
    sync_lower(io, file).await?;
    Ok(false)
}

/// Sync a file served read-only (see `settle_lower`). A filesystem that
/// cannot sync (EINVAL: squashfs, iso9660) or is read-only (EROFS) holds
/// no unsynced writes: nothing to do there.
pub async fn sync_lower<I: Io>(io: &I, file: &ImageFile) -> Result<()> {
    match io.sync_data(file.fd()).await {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EROFS)) => Ok(()),
        r => r.map_err(|e| Error::io(e, format_args!("{}: syncing a lower layer", file.path.display()))),
    }
}

/// The same through a file already open.
pub async fn file_marked_in_use<I: Io>(io: &I, file: &ImageFile) -> Result<bool> {
    let name = file.path.display().to_string();
    let read = ploop::load::read_header(io, file.fd(), &name).await.map_err(|e| e.context(&name))?;
    Ok(read.header.in_use == header::IN_USE)
}

impl Layer {
    /// Open a layer file of the declared format, locked: exclusively when
    /// writable, shared otherwise.
    pub async fn open<I: Io>(io: &I, path: &Path, format: Format, writable: bool, direct: Direct) -> Result<(Layer, OpenReport)> {
        Self::open_with(io, path, format, writable, direct, true, None).await
    }

    /// Open a writable ploop top, locked, keeping a link log in `links`
    /// (see `ploop::links`) and applying the one a killed session left.
    pub async fn open_top<I: Io>(io: &I, path: &Path, direct: Direct, links: Option<&Path>) -> Result<(Layer, OpenReport)> {
        Self::open_with(io, path, Format::Ploop, true, direct, true, links).await
    }

    /// The same without taking the lock, for a second opening of a file
    /// whose lock this process holds already (a merge writing into a
    /// parent that the stack reads meanwhile).
    pub async fn open_unlocked<I: Io>(io: &I, path: &Path, format: Format, writable: bool, direct: Direct) -> Result<(Layer, OpenReport)> {
        Self::open_with(io, path, format, writable, direct, false, None).await
    }

    /// Open a layer on a file already open (writable if the file is),
    /// locked as `open` locks it.
    pub async fn open_file<I: Io>(io: &I, file: ImageFile, format: Format, direct: Direct) -> Result<(Layer, OpenReport)> {
        Self::from_file(io, file, format, direct, true, None).await
    }

    /// The same, with a link log in `links` when the file is a writable
    /// ploop image.
    pub async fn open_file_linked<I: Io>(io: &I, file: ImageFile, format: Format, direct: Direct, links: Option<&Path>) -> Result<(Layer, OpenReport)> {
        Self::from_file(io, file, format, direct, true, links).await
    }

    async fn open_with<I: Io>(io: &I, path: &Path, format: Format, writable: bool, direct: Direct, locked: bool, links: Option<&Path>) -> Result<(Layer, OpenReport)> {
        let file = open_image_file_in(io, path, writable, direct)?;
        Self::from_file(io, file, format, direct, locked, links).await
    }

    async fn from_file<I: Io>(io: &I, file: ImageFile, format: Format, direct: Direct, locked: bool, links: Option<&Path>) -> Result<(Layer, OpenReport)> {
        let (path, writable) = (file.path.clone(), file.writable);
        if locked {
            lock(io, &file, writable)?;
        }
        match format {
            Format::Ploop => match PloopLayer::open(io, file, direct, locked, links).await {
                Ok((l, r)) => Ok((Layer::Ploop(l), r)),
                Err(e) if e.kind() == ErrorKind::NotPloop => {
                    Err(not_ploop(io, &path, e).await)
                }
                Err(e) => Err(e),
            },
            Format::Qcow2 => Ok((Layer::Qcow2(qcow2::Qcow2Layer::open(io, file).await?), OpenReport::default())),
            Format::Raw => {
                let layer = RawLayer::open(io, file)?;
                if layer.size() % 512 != 0 {
                    return Err(Error::invalid(format!("{}: raw image size is not a multiple of 512", path.display())));
                }
                Ok((Layer::Raw(layer), OpenReport::default()))
            }
        }
    }

    pub fn file(&self) -> &ImageFile {
        match self {
            Layer::Ploop(l) => l.file(),
            Layer::Raw(l) => l.file(),
            Layer::Qcow2(l) => l.file(),
        }
    }
    /// The layer's opening of its file, kept past the layer (with its
    /// lock) for a caller that opens the layer on it again.
    pub fn into_file(self) -> ImageFile {
        match self {
            Layer::Ploop(l) => l.into_file(),
            Layer::Raw(l) => l.into_file(),
            Layer::Qcow2(l) => l.into_file(),
        }
    }
    pub fn format(&self) -> Format {
        match self {
            Layer::Ploop(_) => Format::Ploop,
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
        }
    }
    /// Virtual disk size this layer describes.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Ploop(l) => l.size(),
            Layer::Raw(l) => l.size(),
            Layer::Qcow2(l) => l.size(),
        }
    }
    /// The ploop version of this layer (None for other formats).
    pub fn variant(&self) -> Option<header::Variant> {
        match self {
            Layer::Ploop(l) => Some(l.header().variant),
            Layer::Raw(_) | Layer::Qcow2(_) => None,
        }
    }
    /// The cluster size the format imposes on the stack, if any (a QCOW2
    /// image maps any range itself, whatever its own cluster size).
    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            Layer::Ploop(l) => Some(l.cluster_size()),
            Layer::Raw(_) | Layer::Qcow2(_) => None,
        }
    }
    /// Where virtual cluster `c` lies, if this layer holds it: an offset
    /// in the file (ploop, raw), or on the QCOW2 image's virtual disk; in
    /// either case what `read_at` takes.
    #[inline]
    pub fn lookup(&self, c: u64, cluster: u64) -> Option<u64> {
        match self {
            Layer::Ploop(l) => l.lookup(c),
            Layer::Raw(l) => l.lookup(c, cluster),
            Layer::Qcow2(l) => l.lookup(c, cluster),
        }
    }
    /// Whether the bytes `lookup` locates lie in the file as they read
    /// (a transfer may go straight between the file and a request).
    #[inline]
    pub fn stored_in_place(&self) -> bool {
        !matches!(self, Layer::Qcow2(_))
    }
    /// Read `buf.len()` bytes at `at`, a location `lookup` gave.
    pub async fn read_at<I: Io>(&self, io: &I, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        match self {
            Layer::Qcow2(l) => l.read_at(io, buf, at).await,
            _ => io.read_at(self.file().fd(), buf, at).await,
        }
    }
    /// The QCOW2 image's cache counts, for a QCOW2 layer.
    pub fn qcow2_caches(&self) -> Option<qcow2::CacheStats> {
        match self {
            Layer::Qcow2(l) => Some(l.cache_stats()),
            _ => None,
        }
    }
    /// The clusters below `clusters` this layer holds, ascending: time
    /// follows its table's entries (a raw file holds all it covers).
    pub fn allocated(&self, cluster: u64, clusters: u64) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            Layer::Ploop(l) => Box::new(l.allocated().map(|(c, _)| c).take_while(move |&c| c < clusters)),
            Layer::Raw(l) => Box::new(0..l.size().div_ceil(cluster).min(clusters)),
            Layer::Qcow2(l) => Box::new(0..l.size().div_ceil(cluster).min(clusters)),
        }
    }
    /// Bytes of memory this layer's table holds.
    pub fn table_bytes(&self) -> u64 {
        match self {
            Layer::Ploop(l) => l.table_bytes(),
            Layer::Raw(_) => 0,
            Layer::Qcow2(l) => l.table_bytes(),
        }
    }
    /// Take this layer's lock exclusively (converting a shared one) or
    /// shared, without waiting: a merge that will drop or rewrite a lower
    /// layer first makes sure no other process (a mounted snapshot) reads it.
    /// A holder that goes away within a moment (a process that forked
    /// with our descriptors and is about to exec) is waited for.
    pub fn relock<I: Io + ?Sized>(&self, io: &I, exclusive: bool) -> Result<()> {
        let start = io.now();
        loop {
            match lock(io, self.file(), exclusive) {
                Err(e) if io.now().duration_since(start) < std::time::Duration::from_secs(2) && e.errno() == libc::EWOULDBLOCK => {
                    io.sleep_blocking(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    /// Let go of this opening's lock before it is dropped for good, so that
    /// another opening of the file can take the lock at once: the kernel
    /// keeps a dropped opening, and its lock, alive until the last io_uring
    /// request that used it is put away, which may wait for the ring's
    /// thread (see `Submit::run_task_work`).
    pub fn unlock<I: Io + ?Sized>(&self, io: &I) {
        let _ = io.flock(self.file().fd(), crate::io::LockHow::Unlock);
    }

    /// Turn the writable top into a read-only lower layer, keeping its open
    /// descriptor: the exclusive lock becomes a shared one. Call after
    /// `close`, which left the image consistent and marked clean.
    pub fn demote<I: Io + ?Sized>(&self, io: &I) -> Result<()> {
        if self.file().writable {
            lock(io, self.file(), false)?;
        }
        Ok(())
    }

    /// Reserve a fresh cluster at the end of the file (a top layer that
    /// does not hold every cluster: a ploop image).
    pub async fn reserve_cluster<I: Io>(&self, io: &I) -> Result<u64> {
        match self {
            Layer::Ploop(l) => l.reserve_cluster(io).await,
            Layer::Raw(l) => Err(Error::unsupported(format!("{}: a raw layer allocates nothing", l.file().path.display()))),
            Layer::Qcow2(l) => Err(qcow2::layer::read_only(&l.file().path)),
        }
    }
    /// Grow the file ahead of need (see `PloopLayer::grow_ahead`).
    pub async fn grow_ahead<I: Io>(&self, io: &I) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.grow_ahead(io).await,
            Layer::Raw(_) | Layer::Qcow2(_) => Ok(()),
        }
    }
    /// Whether copy-ups may be linked through a link log.
    pub fn defers_links(&self) -> bool {
        matches!(self, Layer::Ploop(l) if l.defers_links())
    }
    /// See `PloopLayer::log_link`.
    pub async fn log_link<I: Io>(&self, io: &I, c: u64, offset: u64) -> Option<u32> {
        match self {
            Layer::Ploop(l) => l.log_link(io, c, offset).await,
            Layer::Raw(_) | Layer::Qcow2(_) => None,
        }
    }
    /// See `PloopLayer::link_pending`.
    pub fn link_pending(&self, c: u64) -> bool {
        matches!(self, Layer::Ploop(l) if l.link_pending(c))
    }
    /// See `PloopLayer::link_logged`.
    pub fn link_logged(&self, c: u64, offset: u64, slot: u32) {
        if let Layer::Ploop(l) = self {
            l.link_logged(c, offset, slot)
        }
    }
    /// See `PloopLayer::remove_link_log`.
    pub fn remove_link_log<I: Io>(&self, io: &I) {
        if let Layer::Ploop(l) = self {
            l.remove_link_log(io)
        }
    }
    /// Point cluster `c` at `offset` (see `PloopLayer::link`); returns the
    /// generation of the change.
    pub fn link(&self, c: u64, offset: u64) -> u64 {
        match self {
            Layer::Ploop(l) => l.link(c, offset),
            Layer::Raw(_) | Layer::Qcow2(_) => 0,
        }
    }
    /// Where a request's window of metadata generations starts (see
    /// `PloopLayer::first_unwritten`); None when the layer keeps none.
    pub fn window_start(&self) -> Option<u64> {
        match self {
            Layer::Ploop(l) => Some(l.first_unwritten()),
            Layer::Raw(_) | Layer::Qcow2(_) => None,
        }
    }
    pub fn published(&self) -> u64 {
        match self {
            Layer::Ploop(l) => l.published(),
            Layer::Raw(_) | Layer::Qcow2(_) => 0,
        }
    }
    /// Write the metadata generations `lo..=hi` for a request on
    /// `clusters` (see `PloopLayer::write_metadata`).
    pub async fn write_metadata<I: Io>(&self, io: &I, lo: u64, hi: u64, clusters: std::ops::Range<u64>) -> std::result::Result<(), MetaError> {
        match self {
            Layer::Ploop(l) => l.write_metadata(io, lo, hi, clusters).await,
            Layer::Raw(_) | Layer::Qcow2(_) => Ok(()),
        }
    }
    /// Wait for a metadata write in flight and write what is still dirty
    /// (see `PloopLayer::write_dirty_meta`).
    pub async fn write_dirty_meta<I: Io>(&self, io: &I) -> std::result::Result<(), MetaError> {
        match self {
            Layer::Ploop(l) => l.write_dirty_meta(io).await,
            Layer::Raw(_) | Layer::Qcow2(_) => Ok(()),
        }
    }
    /// Make the writes to the file completed so far durable (shared with
    /// concurrent callers where the format keeps a sync group).
    pub async fn sync_data<I: Io>(&self, io: &I) -> std::io::Result<()> {
        match self {
            Layer::Ploop(l) => l.sync_data(io).await,
            Layer::Raw(l) => l.sync_data(io).await,
            // Never written here.
            Layer::Qcow2(_) => Ok(()),
        }
    }
    /// A sync of the file failed: what it covered may be lost.
    pub fn sync_failed(&self) -> bool {
        match self {
            Layer::Ploop(l) => l.sync_failed(),
            Layer::Raw(l) => l.sync_failed(),
            Layer::Qcow2(_) => false,
        }
    }
    /// Fail every later sync, as after one that failed here (one that
    /// failed through another opening of the file).
    pub fn poison_syncs(&self) {
        match self {
            Layer::Ploop(l) => l.poison_syncs(),
            Layer::Raw(l) => l.poison_syncs(),
            Layer::Qcow2(_) => {}
        }
    }
    /// Make acknowledged writes durable.
    pub async fn sync<I: Io>(&self, io: &I) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.flush(io).await,
            Layer::Raw(l) if l.file().writable => {
                l.sync_data(io).await.map_err(|e| Error::io(e, l.file().path.display()))
            }
            Layer::Raw(_) | Layer::Qcow2(_) => Ok(()),
        }
    }
    /// Leave the image consistent and (ploop) marked clean. No request may
    /// be in flight.
    pub async fn close<I: Io>(&self, io: &I) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.close(io).await,
            Layer::Raw(_) | Layer::Qcow2(_) => self.sync(io).await,
        }
    }
    /// Close keeping dirty bitmaps (ploop only; other formats cannot hold
    /// them and close as usual).
    pub async fn close_with_bitmaps<I: Io>(&self, io: &I, bitmaps: &[ploop::ext::DirtyBitmap]) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.close_with_bitmaps(io, bitmaps).await,
            Layer::Raw(_) | Layer::Qcow2(_) => self.sync(io).await,
        }
    }
    /// The dirty bitmaps a ploop image carried when it opened read-write.
    pub fn take_saved_bitmaps(&self) -> Vec<ploop::ext::DirtyBitmap> {
        match self {
            Layer::Ploop(l) => l.take_saved_bitmaps(),
            Layer::Raw(_) | Layer::Qcow2(_) => Vec::new(),
        }
    }
    /// Mark a writable image in use again after a `close` (a snapshot that
    /// failed after closing the old top).
    pub async fn reopen_in_use<I: Io>(&self, io: &I) -> Result<()> {
        match self {
            Layer::Ploop(l) => l.reopen_in_use(io).await,
            Layer::Raw(_) | Layer::Qcow2(_) => Ok(()),
        }
    }
}

/// The refusal for a file opened as ploop that has no ploop signature,
/// saying what it looks like instead.
pub async fn not_ploop<I: Io>(io: &I, path: &Path, e: Error) -> Error {
    let hint = match detect_format(io, path).await {
        Err(found) if found.errno() == libc::EOPNOTSUPP => found.message().to_string(),
        Err(found) => found.message().to_string(),
        Ok(_) => {
            let _ = e;
            "no WithouFreSpacExt/WithoutFreeSpace signature; if it is a raw disk image, declare it with --format raw".to_string()
        }
    };
    Error::not_ploop(format!("{}: not a valid ploop image: {hint}", path.display()))
}

const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// flock without blocking, but waiting `LOCK_WAIT` for a holder that lets
/// go (see `lock`). Converting our own lock between kinds is atomic.
pub(crate) fn flock_waiting<I: Io + ?Sized>(io: &I, fd: std::os::fd::RawFd, exclusive: bool) -> std::io::Result<()> {
    let how = if exclusive { LockHow::Exclusive } else { LockHow::Shared };
    let start = io.now();
    loop {
        let err = match io.flock(fd, how) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) || io.now().duration_since(start) >= LOCK_WAIT {
            return Err(err);
        }
        io.sleep_blocking(std::time::Duration::from_millis(20));
    }
}

/// One writer per image, and no writer on an image others read as a lower
/// layer: a second daemon or tool on the same file would corrupt it. The
/// lock dies with the descriptor, even on kill -9.
/// A holder that lets go within a moment is waited for: a process forked
/// by another thread holds our descriptors (and so our locks) until it
/// execs, and a closed opening of our own until this thread's ring has put
/// away the requests that used it (the waits run the ring's deferred work).
/// (A top closed to be grown or compacted keeps its own opening instead.)
pub(crate) fn lock<I: Io + ?Sized>(io: &I, file: &ImageFile, exclusive: bool) -> Result<()> {
    if let Err(err) = flock_waiting(io, file.fd(), exclusive) {
        return Err(Error::new(
            err.raw_os_error().unwrap_or(libc::EBUSY),
            format!("{}: image is in use by another process ({err})", file.path.display()),
        ));
    }
    Ok(())
}
