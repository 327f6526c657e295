//! ploop disk directories: a `DiskDescriptor.xml` naming the deltas of a
//! disk and how they chain, next to the delta files (`root.hds`,
//! `root.hds.{guid}`...). This module reads and writes them the way ploop
//! does, takes ploop's lock, and turns a descriptor into the layer list a
//! [`crate::Stack`] opens. The snapshot operations that change both the
//! stack and the descriptor are in `ops.rs`.

pub mod clone;
pub mod clones;
mod place;
pub mod descriptor;
mod lock;
pub mod ops;
pub mod resolve;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::io::{block_on, FileKind, FileStat, Io, OpenHow, SyncIo};
use crate::layers::PloopLayer;
use crate::stack::LayerSpec;

pub use descriptor::{Descriptor, Guid, Image, ImageType, Shot, Temporary, NONE_GUID, TOP_GUID};
pub use lock::DiskLock;
pub use place::{inside_name, Place};

pub const DESCRIPTOR: &str = "DiskDescriptor.xml";
/// The base delta's name in a new disk directory (ploop's default).
pub const BASE_FILE: &str = "root.hds";

/// A disk directory and its descriptor as last read or written.
#[derive(Clone, Debug)]
pub struct Disk {
    /// The directory holding the descriptor; relative file names start here.
    pub dir: PathBuf,
    pub desc: Descriptor,
    /// ploop's lock, when the caller took it for a whole session of
    /// operations (`load_locked`); otherwise each operation takes it.
    held: Option<Arc<Mutex<DiskLock>>>,
    /// Files of this disk that its clones read, from its list of clones
    /// as of the last load: not this disk's to change ([`Disk::place`]).
    read_by_clones: Arc<clones::ReadByClones>,
}

impl Disk {
    /// A disk of `desc` in `dir`, read by the caller (no lock held).
    pub fn from_parts(dir: PathBuf, desc: Descriptor) -> Disk {
        Disk { dir, desc, held: None, read_by_clones: Arc::default() }
    }

    /// The descriptor path for a directory or a descriptor file.
    pub fn descriptor_path(path: &Path) -> PathBuf {
        if path.is_dir() {
            path.join(DESCRIPTOR)
        } else {
            path.to_path_buf()
        }
    }

    /// True when `path` names a disk directory or a descriptor file.
    pub fn is_disk(path: &Path) -> bool {
        (path.is_dir() && path.join(DESCRIPTOR).is_file()) || path.file_name().is_some_and(|n| n == DESCRIPTOR)
    }

    /// Read the descriptor of a disk directory (or of the descriptor file).
    pub fn load(path: &Path) -> Result<Disk> {
        block_on(Disk::load_in(&SyncIo, path))
    }

    /// The same through `io` (the daemon's recovery in a simulated world).
    pub async fn load_in<I: Io + ?Sized>(io: &I, path: &Path) -> Result<Disk> {
        let mut disk = Disk::load_bare(io, path).await?;
        disk.read_by_clones = Arc::new(clones::files_read(io, &disk.dir).await);
        Ok(disk)
    }

    /// The descriptor alone, without what its clones read.
    async fn load_bare<I: Io + ?Sized>(io: &I, path: &Path) -> Result<Disk> {
        let is_dir = stat_following(io, path).is_some_and(|st| st.kind == FileKind::Dir);
        if is_dir && stat_following(io, &path.join(DESCRIPTOR)).is_none() {
            return Err(no_descriptor(path));
        }
        let xml_path = if is_dir { path.join(DESCRIPTOR) } else { path.to_path_buf() };
        let text = Descriptor::read_text_in(io, &xml_path).await?;
        // The parser names the file "DiskDescriptor.xml"; the path says
        // which one, once.
        let desc = Descriptor::parse(&text).map_err(|e| {
            let msg = e.message().strip_prefix("DiskDescriptor.xml: ").unwrap_or(e.message()).to_string();
            Error::new(e.errno(), format!("{}: {msg}", xml_path.display())).of_kind(e.kind())
        })?;
        // A bare file name (`info DiskDescriptor.xml`, ploop's usual way)
        // has "" for its parent: the current directory.
        let dir = match xml_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = io.canonicalize(&dir).map_err(|e| Error::io(e, dir.display()))?;
        let disk = Disk { dir, desc, held: None, read_by_clones: Arc::default() };
        disk.check_distinct_files(io)?;
        Ok(disk)
    }

    /// Take ploop's lock on a disk (waiting for another holder) and read
    /// the descriptor under it, for a session of operations on a disk no
    /// device serves: whatever another tool did while we waited is what
    /// the session works on. The operations of `ops.rs` on the returned
    /// disk use this lock instead of taking it; it is let go when the last
    /// clone of the disk is dropped.
    pub fn load_locked(path: &Path) -> Result<Disk> {
        block_on(Disk::load_locked_in(&SyncIo, path))
    }

    /// The same through `io`.
    pub async fn load_locked_in<I: Io + ?Sized>(io: &I, path: &Path) -> Result<Disk> {
        Disk::load_locked_with(io, path, false).await
    }

    /// `load_locked_in` for reading the chain of a disk a device of ours
    /// serves (a clone of one of its snapshots): the device keeps its
    /// byte-range lock, and the `.lck` flock keeps its changes out.
    pub async fn load_beside_device_in<I: Io + ?Sized>(io: &I, path: &Path) -> Result<Disk> {
        Disk::load_locked_with(io, path, true).await
    }

    async fn load_locked_with<I: Io + ?Sized>(io: &I, path: &Path, beside_device: bool) -> Result<Disk> {
        // The lock lives on the base delta, which another tool may change
        // while we wait: read the descriptor again once the lock is held,
        // and start over if its base is not the file we locked.
        for _ in 0..3 {
            let seen = Disk::load_in(io, path).await?;
            let (xml, base) = (seen.xml_path(), seen.lock_path()?);
            let lock = if beside_device { DiskLock::take_beside_device(io, &xml, &base)? } else { DiskLock::take(io, &xml, &base)? };
            let mut disk = Disk::load_in(io, path).await?;
            if disk.lock_path()? == seen.lock_path()? {
                disk.held = Some(Arc::new(Mutex::new(lock)));
                return Ok(disk);
            }
        }
        Err(Error::new(libc::ESTALE, format!("{}: the base delta keeps changing under us", Self::descriptor_path(path).display())))
    }

    /// True when this disk carries a lock taken by `load_locked`.
    pub fn holds_lock(&self) -> bool {
        self.held.is_some()
    }

    /// Keep only the byte-range lock of the lock this disk carries, for a
    /// device's life: ploop's tools find the disk locked, and each change
    /// takes the `.lck` flock again (`lock_in`, the operations of `ops`),
    /// which lets a clone of one of its snapshots read the chain between
    /// changes.
    pub fn keep_range_lock_only(&self) {
        if let Some(held) = &self.held {
            held.lock().unwrap().release_changes();
        }
    }

    /// For a change under the lock this disk carries: the `.lck` flock
    /// when that lock let go of it (a device's), else nothing more.
    fn change_lock_in<I: Io + ?Sized>(&self, io: &I) -> Result<Option<DiskLock>> {
        match &self.held {
            Some(held) if !held.lock().unwrap().holds_changes() => DiskLock::changes(io, &self.xml_path()).map(Some),
            _ => Ok(None),
        }
    }

    /// Read the descriptor again, keeping a lock this disk carries (moved
    /// to the new base delta if an operation changed which file that is).
    /// On any failure the lock stays with this disk (dropping it would let
    /// another tool in while the caller still works on the disk).
    pub fn reload(&mut self) -> Result<()> {
        block_on(self.reload_in(&SyncIo))
    }

    /// The same through `io`.
    pub async fn reload_in<I: Io + ?Sized>(&mut self, io: &I) -> Result<()> {
        let held = self.held.take();
        let result = Disk::load_in(io, &self.dir).await.map(|d| *self = d).and_then(|()| match &held {
            Some(h) => {
                let base = self.lock_path()?;
                let mut lock = h.lock().unwrap();
                if lock.base().is_some_and(|b| b != base) {
                    lock.rebase(io, &base)?;
                }
                Ok(())
            }
            None => Ok(()),
        });
        self.held = held;
        result
    }

    pub fn xml_path(&self) -> PathBuf {
        self.dir.join(DESCRIPTOR)
    }

    /// The path of a delta file as the descriptor names it (for reading:
    /// see [`Disk::place`] before changing the file). A name inside the
    /// directory comes back with its `.` and `..` resolved by spelling, so
    /// that the file checked and the file opened are the same.
    pub fn file_path(&self, image: &Image) -> PathBuf {
        if let Some(rel) = inside_name(&self.dir, &image.file) {
            return self.dir.join(rel);
        }
        let p = Path::new(&image.file);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The chain up to the top, for serving read-write or changing the
    /// disk: the top must be inside the disk directory (it is written),
    /// and no delta outside it may be marked in use (opening would repair
    /// it, which writes it).
    pub async fn writable_layers<I: Io>(&self, io: &I) -> Result<Vec<LayerSpec>> {
        // What is served and acknowledged from now on is built on the
        // descriptor as read, and on the files it names: a process killed
        // between an operation's rename and its directory sync leaves both
        // visible but not durable, and a power cut after this start would
        // bring back the old descriptor without the top that took writes.
        io.sync_dir(&self.dir).await.map_err(|e| Error::io(e, format_args!("{}: syncing the disk directory", self.dir.display())))?;
        let chain = self.desc.chain(self.desc.top)?;
        let top = chain.last().expect("a chain is never empty");
        self.writable_path_in(io, top, "write")?;
        for img in &chain[..chain.len() - 1] {
            if self.desc.format_of(img) == crate::layers::Format::Ploop && self.place_in(io, img) != Place::Inside {
                let path = self.file_path(img);
                if crate::layers::marked_in_use(io, &path).await? {
                    return Err(Error::new(
                        libc::EPERM,
                        format!(
                            "{}: delta {} is only read from here (outside the disk directory, or a clone stands on it) and is marked in use \
                             (not closed cleanly), so it is not repaired: check it (`ublk-ploop check --repair {}`)",
                            self.xml_path().display(),
                            img.file,
                            path.display()
                        ),
                    ));
                }
            }
        }
        self.layers(None)
    }

    /// The layers of the chain from the base up to `guid` (the top when
    /// None), bottom first, each with its declared format.
    pub fn layers(&self, guid: Option<Guid>) -> Result<Vec<LayerSpec>> {
        let guid = guid.unwrap_or(self.desc.top);
        let Some(shot) = self.desc.shot(guid) else {
            return Err(Error::new(libc::ENOENT, format!("{}: no snapshot {guid}", self.xml_path().display())));
        };
        // A merge into a snapshot changes its file: half done, it holds
        // some of its child's clusters (or, in ploop's reverse merge, lost
        // some of its own), so it no longer shows what it showed. Chains
        // through it are whole: the child above hides what changed. Its
        // mark cannot tell: a merge that failed cleanly closed the file
        // clean, and a start cleans lower layers before it finishes merges.
        // So, as ploop (which merges such a snapshot away at its next
        // mount rather than serve it), a temporary snapshot with one child
        // is taken for half merged; one that several children share (a
        // deleted snapshot kept for them) is whole.
        let half_merged = match shot.temporary {
            Temporary::No => false,
            Temporary::Zero | Temporary::ZeroSwap => true,
            Temporary::Temporary => self.desc.children(guid).len() == 1,
        };
        if guid != self.desc.top && half_merged {
            let child = self.desc.children(guid).first().map_or_else(|| "its child".to_string(), |c| c.to_string());
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "{}: snapshot {guid} is marked temporary: a merge of {child} into it was interrupted (so it may no longer show what it \
                     showed), or it was deleted and {child} still holds it; ploop merges such a snapshot away rather than serve it. \
                     Finish the merge: `ublk-ploop snapshot-merge {} -u {child}` (or start the disk read-write, which finishes merges on its chain)",
                    self.xml_path().display(),
                    self.dir.display()
                ),
            ));
        }
        Ok(self
            .desc
            .chain(guid)?
            .into_iter()
            .map(|img| LayerSpec { path: self.file_path(img), format: self.desc.format_of(img) })
            .collect())
    }

    /// Create a disk directory as `ploop init` does: `DIR/root.hds`, an
    /// empty expandable image, and its descriptor (the size as given: the
    /// command line rounds it up to whole clusters, as ploop's tool does).
    pub async fn init<I: Io>(io: &I, dir: &Path, size: u64, cluster: u64) -> Result<Disk> {
        let desc = Descriptor::new(size, cluster, BASE_FILE, ImageType::Compressed)?;
        io.create_dir_all(dir).map_err(|e| Error::io(e, dir.display()))?;
        let xml = dir.join(DESCRIPTOR);
        if stat_following(io, &xml).is_some() {
            return Err(Error::new(libc::EEXIST, format!("{}: a disk descriptor exists already", xml.display())));
        }
        let base = dir.join(BASE_FILE);
        PloopLayer::create(io, &base, size, cluster).await?;
        let dir = io.canonicalize(dir).map_err(|e| Error::io(e, dir.display()))?;
        let disk = Disk { dir, desc, held: None, read_by_clones: Arc::default() };
        disk.store_naming_new(io, &base).await?;
        Ok(disk)
    }

    /// Store the first descriptor of a new disk, which names `new_file`,
    /// made for it. If storing fails before the rename, the file goes; after
    /// it (the directory's sync failed) the descriptor naming it may be
    /// there, so the file stays and the error says so. The new directory's
    /// own entry is synced too: a disk reported made must survive a crash.
    pub(crate) async fn store_naming_new<I: Io>(&self, io: &I, new_file: &Path) -> Result<()> {
        match self.store_renamed(io).await {
            Ok(()) => match self.dir.parent() {
                Some(parent) => io.sync_dir(parent).await.map_err(|e| {
                    Error::io(e, format_args!("the disk is made, but syncing {} (which holds its directory) failed", parent.display()))
                }),
                None => Ok(()),
            },
            Err((e, false)) => {
                let _ = io.remove_file(new_file);
                Err(e)
            }
            Err((e, true)) => Err(e.context(format_args!(
                "the descriptor is in place but perhaps not durable; {} is kept, as it names it",
                new_file.display()
            ))),
        }
    }

    /// Write the descriptor atomically, as ploop does and then some: a
    /// temporary file, written and synced, renamed over the descriptor, and
    /// the directory synced, so that after a crash the descriptor is the
    /// old one or the new one, whole.
    ///
    /// The temporary is made afresh: whatever has its name (a file left by
    /// a crash, or a symlink or hard link planted there) is unlinked, never
    /// followed or written through, and the file is created exclusively.
    pub async fn store<I: Io>(&self, io: &I) -> Result<()> {
        self.store_renamed(io).await.map_err(|(e, _)| e)
    }

    /// Store this descriptor in place of `old` (the one on disk now). A
    /// failure after the rename (the directory's sync) leaves the new one
    /// visible but perhaps not durable; then `old` is stored back, so that
    /// an error means the old descriptor stands, as callers undo on that
    /// assumption (a snapshot removes its new top). If that fails too the
    /// error is of kind `DescriptorUncertain`: keep what either names.
    pub async fn replace<I: Io>(&self, io: &I, old: &Disk) -> Result<()> {
        match self.store_renamed(io).await {
            Ok(()) => Ok(()),
            Err((e, false)) => Err(e),
            Err((e, true)) => match old.store_renamed(io).await {
                Ok(()) => Err(e.context("storing the descriptor (the previous one was put back)")),
                Err((back, _)) => Err(Error::new(
                    e.errno(),
                    format!("{e}; putting the previous descriptor back failed too ({back}): either may be on disk, so the files of both are kept"),
                )
                .of_kind(crate::error::ErrorKind::DescriptorUncertain)),
            },
        }
    }

    /// `store`, saying with an error whether the rename had happened.
    async fn store_renamed<I: Io>(&self, io: &I) -> std::result::Result<(), (Error, bool)> {
        self.desc.validate().map_err(|e| (e, false))?;
        // The base this descriptor names is locked before anyone can read
        // the descriptor (a failed store leaves it there until the next
        // reload moves it back; a `replace` stores the old one back, which
        // moves it at once).
        self.follow_base(io);
        let xml = self.xml_path();
        let tmp = self.dir.join(format!("{DESCRIPTOR}.tmp"));
        let text = self.desc.to_xml();
        let renamed = std::cell::Cell::new(false);
        let write = async {
            match io.remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let file = io.open(&tmp, &OpenHow::create_new(0o666))?;
            io.write_at(file.fd(), text.as_bytes(), 0).await?;
            io.sync_data(file.fd()).await?;
            io.rename(&tmp, &xml).await?;
            renamed.set(true);
            io.sync_dir(&self.dir).await
        };
        write.await.map_err(|e| {
            if !renamed.get() {
                let _ = io.remove_file(&tmp);
            }
            (Error::io(e, format_args!("{}: storing the descriptor", xml.display())), renamed.get())
        })
    }

    /// Move a lock this disk carries onto the base delta this descriptor
    /// names (a merge may have made another file the base): a device
    /// holds it for its whole life, and ploop's tools look for it on the
    /// base they read. A failure leaves it where it was, with a warning;
    /// the next operation's reload tries again.
    fn follow_base<I: Io + ?Sized>(&self, io: &I) {
        let Some(held) = &self.held else { return };
        let Ok(base) = self.lock_path() else { return };
        let mut lock = held.lock().unwrap();
        if let Some(old) = lock.base().filter(|&b| b != base).map(Path::to_path_buf) {
            if let Err(e) = lock.rebase(io, &base) {
                tracing::warn!("{}: ploop's lock stays on {}: {e}", self.xml_path().display(), old.display());
            }
        }
    }

    /// Resize a disk no device serves, as `ploop resize` does offline:
    /// every delta of the disk first (so that merges never meet a child
    /// larger than its parent), then the descriptor. Checked on every delta
    /// before any is changed; a crash in between leaves deltas of both
    /// sizes, which open fine, and running the resize again finishes it.
    pub async fn resize<I: Io>(&mut self, io: &I, new_size: u64) -> Result<Vec<crate::layers::ploop::resize::Resized>> {
        use crate::layers::ploop::resize::{resize, resize_raw};
        use crate::layers::Format;
        let _lock = self.lock_in(io)?;
        self.reload_in(io).await?;
        let mut next = self.desc.clone();
        next.set_size(new_size)?;
        // Every delta is rewritten: all must be inside the disk directory.
        let files: Vec<(PathBuf, Format)> =
            self.desc.images.iter().map(|i| Ok((self.writable_path_in(io, i, "resize")?, self.desc.format_of(i)))).collect::<Result<_>>()?;
        let one = |f: &PathBuf, format: Format, apply: bool| {
            let f = f.clone();
            async move {
                match format {
                    Format::Raw => resize_raw(io, &f, new_size, apply).await,
                    _ => resize(io, &f, new_size, apply).await,
                }
            }
        };
        for (f, format) in &files {
            one(f, *format, false).await?;
        }
        let mut done = Vec::new();
        for (f, format) in &files {
            done.push(one(f, *format, true).await?);
        }
        let mut resized = self.clone();
        resized.desc = next;
        resized.store(io).await.map_err(|e| {
            Error::new(
                e.errno(),
                format!(
                    "{e}. The deltas have the new size ({new_size} bytes) but the descriptor still says {} bytes; \
                     they open fine. Free space and run `ublk-ploop resize {} --size {new_size}` again to finish",
                    self.desc.size(),
                    self.dir.display()
                ),
            )
        })?;
        *self = resized;
        Ok(done)
    }

    /// Take ploop's lock on this disk (see `lock.rs`); None when this disk
    /// carries it already (`load_locked`): the caller holds it.
    pub fn lock(&self) -> Result<Option<DiskLock>> {
        self.lock_in(&SyncIo)
    }

    /// The same through `io`.
    pub fn lock_in<I: Io + ?Sized>(&self, io: &I) -> Result<Option<DiskLock>> {
        if self.held.is_some() {
            return self.change_lock_in(io);
        }
        self.lock_fresh(io).map(Some)
    }

    fn lock_fresh<I: Io + ?Sized>(&self, io: &I) -> Result<DiskLock> {
        DiskLock::take(io, &self.xml_path(), &self.lock_path()?)
    }

    /// The file ploop's byte-range lock goes on: the base delta of the
    /// current chain, or for a clone (whose base is a template's, shared
    /// with other clones) its lowest delta inside the directory, so that
    /// clones of one template are locked each on its own.
    pub fn lock_path(&self) -> Result<PathBuf> {
        let chain = self.desc.chain(self.desc.top)?;
        let own = chain.iter().find(|img| !clone::is_shared(self, img));
        Ok(self.file_path(own.or(chain.first()).expect("a chain is never empty")))
    }

    /// The name ploop gives a new delta: the first image's file name without
    /// a trailing `.{...}`, then `.{guid}` of a fresh GUID. Only the file
    /// name is kept: a new delta is always created in the disk directory,
    /// wherever the first image lives.
    pub fn new_delta_name(&self) -> String {
        let first = self.first_file_name();
        let stem = match first.rfind(".{") {
            Some(i) if first.ends_with('}') && i > 0 => &first[..i],
            _ => first.as_str(),
        };
        format!("{stem}.{}", Guid::random())
    }

    /// The name ploop gives the new top of a switch: the first image's
    /// file name (not stripped), then `.{guid}`; in the disk directory.
    pub fn switch_top_name(&self) -> String {
        format!("{}.{}", self.first_file_name(), Guid::random())
    }

    /// The last component of the first image's file, or ploop's default
    /// base name when it has none that can name a file (`..`, `/`).
    /// A QCOW2 base (a template image elsewhere) is passed over: the
    /// disk's own deltas are named after its first own file.
    fn first_file_name(&self) -> String {
        let first = self.desc.images.iter().find(|i| i.kind != ImageType::Qcow2);
        first
            .map(|i| Path::new(&i.file))
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(BASE_FILE)
            .to_string()
    }

    /// Rows of `snapshot-list`, in descriptor order.
    pub fn snapshot_rows(&self) -> Vec<SnapshotRow> {
        self.desc
            .shots
            .iter()
            .map(|s| SnapshotRow {
                parent: s.parent,
                current: s.guid == self.desc.top,
                guid: s.guid,
                file: self.desc.image(s.guid).map(|i| self.file_path(i).display().to_string()).unwrap_or_default(),
                temporary: s.temporary != Temporary::No,
                shared: self.desc.image(s.guid).is_some_and(|i| clone::is_shared(self, i)),
            })
            .collect()
    }
}

/// What a name leads to, following symbolic links (as `Path::is_dir` and
/// `exists` do); None when nothing does.
fn stat_following<I: Io + ?Sized>(io: &I, path: &Path) -> Option<FileStat> {
    match io.stat(path) {
        Ok(Some(st)) if st.kind == FileKind::Symlink => io.canonicalize(path).ok().and_then(|p| io.stat(&p).ok().flatten()),
        Ok(found) => found,
        Err(_) => None,
    }
}

/// The error for a directory given as a disk that is none.
pub fn no_descriptor(dir: &Path) -> Error {
    Error::new(libc::ENOENT, format!("{} has no {DESCRIPTOR}: not a disk directory", dir.display()))
}

/// One line of `snapshot-list`: ploop's columns.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRow {
    pub parent: Guid,
    /// This delta is the top (`*` in ploop's list).
    pub current: bool,
    pub guid: Guid,
    pub file: String,
    pub temporary: bool,
    /// The delta lies outside the disk directory (a template's, shared
    /// with other disks): only ever read from here. Written only when
    /// true, so rows of a disk with no shared delta read as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// Lines as `ploop snapshot-list` prints them.
pub fn format_snapshot_rows(rows: &[SnapshotRow]) -> String {
    let mut out = format!("{:<38} {:<1} {:<38} {:<32} \n", "PARENT_UUID", "C", "UUID", "FNAME");
    for r in rows {
        out.push_str(&format!(
            "{:<38} {:<1} {:<38} {}{}\n",
            r.parent.to_string(),
            if r.current { "*" } else { "" },
            r.guid.to_string(),
            r.file,
            // A snapshot deleted while it had several children stays, marked.
            match (r.temporary, r.shared) {
                (true, _) => " (temporary)",
                (false, true) => " (shared, read-only)",
                (false, false) => "",
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::inside_name;
    use std::path::{Path, PathBuf};

    #[test]
    fn inside_names_by_spelling() {
        let dir = Path::new("/srv/ct");
        let inside = |f: &str| inside_name(dir, f);
        let some = |p: &str| Some(PathBuf::from(p));
        assert_eq!(inside("root.hds"), some("root.hds"));
        assert_eq!(inside("./root.hds"), some("root.hds"));
        assert_eq!(inside("sub/root.hds"), some("sub/root.hds"));
        assert_eq!(inside("sub/../root.hds"), some("root.hds"));
        assert_eq!(inside("/srv/ct/root.hds"), some("root.hds"));
        for outside in ["../root.hds", "sub/../../root.hds", "/srv/ct/../x", "/srv/ctx/root.hds", "/etc/passwd", ".", "sub/..", "", "/srv/ct", "/"] {
            assert_eq!(inside(outside), None, "{outside:?}");
        }
    }
}

