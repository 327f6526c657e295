//! ploop disk directories: a `DiskDescriptor.xml` naming the deltas of a
//! disk and how they chain, next to the delta files (`root.hds`,
//! `root.hds.{guid}`...). This module reads and writes them the way ploop
//! does, takes ploop's lock, and turns a descriptor into the layer list a
//! [`crate::Stack`] opens. The snapshot operations that change both the
//! stack and the descriptor are in `ops.rs`.

pub mod descriptor;
mod lock;
pub mod ops;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::io::Io;
use crate::layers::PloopLayer;
use crate::stack::LayerSpec;

pub use descriptor::{Descriptor, Guid, Image, ImageType, Shot, Temporary, NONE_GUID, TOP_GUID};
pub use lock::DiskLock;

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
}

impl Disk {
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
        let xml_path = Self::descriptor_path(path);
        let text = std::fs::read_to_string(&xml_path).map_err(|e| Error::io(e, xml_path.display()))?;
        let desc = Descriptor::parse(&text).map_err(|e| e.context(xml_path.display()))?;
        let dir = xml_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(e, dir.display()))?;
        Ok(Disk { dir, desc, held: None })
    }

    /// Take ploop's lock on a disk (waiting for another holder) and read
    /// the descriptor under it, for a session of operations on a disk no
    /// device serves: whatever another tool did while we waited is what
    /// the session works on. The operations of `ops.rs` on the returned
    /// disk use this lock instead of taking it; it is let go when the last
    /// clone of the disk is dropped.
    pub fn load_locked(path: &Path) -> Result<Disk> {
        // The lock lives on the base delta, which another tool may change
        // while we wait: read the descriptor again once the lock is held,
        // and start over if its base is not the file we locked.
        for _ in 0..3 {
            let seen = Disk::load(path)?;
            let lock = seen.lock_fresh()?;
            let mut disk = Disk::load(path)?;
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

    /// Read the descriptor again, keeping a lock this disk carries (moved
    /// to the new base delta if an operation changed which file that is).
    pub fn reload(&mut self) -> Result<()> {
        let held = self.held.take();
        *self = Disk::load(&self.dir)?;
        if let Some(h) = &held {
            let base = self.lock_path()?;
            let mut lock = h.lock().unwrap();
            if lock.base() != base {
                lock.rebase(&base)?;
            }
        }
        self.held = held;
        Ok(())
    }

    pub fn xml_path(&self) -> PathBuf {
        self.dir.join(DESCRIPTOR)
    }

    /// The path of a delta file as the descriptor names it.
    pub fn file_path(&self, image: &Image) -> PathBuf {
        let p = Path::new(&image.file);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The layers of the chain from the base up to `guid` (the top when
    /// None), bottom first, each with its declared format.
    pub fn layers(&self, guid: Option<Guid>) -> Result<Vec<LayerSpec>> {
        let guid = guid.unwrap_or(self.desc.top);
        if self.desc.shot(guid).is_none() {
            return Err(Error::new(libc::ENOENT, format!("{}: no snapshot {guid}", self.xml_path().display())));
        }
        Ok(self
            .desc
            .chain(guid)?
            .into_iter()
            .map(|img| LayerSpec { path: self.file_path(img), format: img.kind.format() })
            .collect())
    }

    /// Create a disk directory as `ploop init` does: `DIR/root.hds`, an
    /// empty expandable image, and its descriptor.
    pub async fn init<I: Io>(io: &I, dir: &Path, size: u64, cluster: u64) -> Result<Disk> {
        let desc = Descriptor::new(size, cluster, BASE_FILE, ImageType::Compressed)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(e, dir.display()))?;
        let xml = dir.join(DESCRIPTOR);
        if xml.exists() {
            return Err(Error::new(libc::EEXIST, format!("{}: a disk descriptor exists already", xml.display())));
        }
        let base = dir.join(BASE_FILE);
        PloopLayer::create(io, &base, size, cluster).await?;
        let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(e, dir.display()))?;
        let disk = Disk { dir, desc, held: None };
        if let Err(e) = disk.store(io).await {
            let _ = std::fs::remove_file(&base);
            return Err(e);
        }
        Ok(disk)
    }

    /// Write the descriptor atomically, as ploop does and then some: a
    /// temporary file, written and synced, renamed over the descriptor, and
    /// the directory synced, so that after a crash the descriptor is the
    /// old one or the new one, whole.
    pub async fn store<I: Io>(&self, io: &I) -> Result<()> {
        self.desc.validate()?;
        let xml = self.xml_path();
        let tmp = self.dir.join(format!("{DESCRIPTOR}.tmp"));
        let text = self.desc.to_xml();
        let write = async {
            let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            use std::os::fd::AsRawFd;
            io.write_at(file.as_raw_fd(), text.as_bytes(), 0).await?;
            io.sync_data(file.as_raw_fd()).await?;
            io.rename(&tmp, &xml).await?;
            io.sync_dir(&self.dir).await
        };
        write.await.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(e, format_args!("{}: storing the descriptor", xml.display()))
        })
    }

    /// Resize a disk no device serves, as `ploop resize` does offline:
    /// every delta of the disk first (so that merges never meet a child
    /// larger than its parent), then the descriptor. Checked on every delta
    /// before any is changed; a crash in between leaves deltas of both
    /// sizes, which open fine, and running the resize again finishes it.
    pub async fn resize<I: Io>(&mut self, io: &I, new_size: u64) -> Result<Vec<crate::layers::ploop::resize::Resized>> {
        use crate::layers::ploop::resize::{resize, resize_raw};
        use crate::layers::Format;
        let _lock = self.lock()?;
        self.reload()?;
        let mut next = self.desc.clone();
        next.set_size(new_size)?;
        let files: Vec<(PathBuf, Format)> = self.desc.images.iter().map(|i| (self.file_path(i), i.kind.format())).collect();
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
        resized.store(io).await?;
        *self = resized;
        Ok(done)
    }

    /// Take ploop's lock on this disk (see `lock.rs`); None when this disk
    /// carries it already (`load_locked`): the caller holds it.
    pub fn lock(&self) -> Result<Option<DiskLock>> {
        if self.held.is_some() {
            return Ok(None);
        }
        self.lock_fresh().map(Some)
    }

    fn lock_fresh(&self) -> Result<DiskLock> {
        DiskLock::take(&self.xml_path(), &self.lock_path()?)
    }

    /// The file ploop's byte-range lock goes on: the base delta of the
    /// current chain.
    pub fn lock_path(&self) -> Result<PathBuf> {
        Ok(self.desc.chain(self.desc.top)?.first().map(|img| self.file_path(img)).expect("a chain is never empty"))
    }

    /// The name ploop gives a new delta: the first image's file name without
    /// a trailing `.{...}`, then `.{guid}` of a fresh GUID.
    pub fn new_delta_name(&self) -> String {
        let first = &self.desc.images[0].file;
        let stem = match first.rfind(".{") {
            Some(i) if first.ends_with('}') => &first[..i],
            _ => first.as_str(),
        };
        format!("{stem}.{}", Guid::random())
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
            })
            .collect()
    }
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
}

/// Lines as `ploop snapshot-list` prints them.
pub fn format_snapshot_rows(rows: &[SnapshotRow]) -> String {
    let mut out = format!("{:<38} {:<1} {:<38} {:<32} \n", "PARENT_UUID", "C", "UUID", "FNAME");
    for r in rows {
        out.push_str(&format!(
            "{:<38} {:<1} {:<38} {}\n",
            r.parent.to_string(),
            if r.current { "*" } else { "" },
            r.guid.to_string(),
            r.file
        ));
    }
    out
}
