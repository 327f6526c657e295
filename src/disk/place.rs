//! Which files a command may change: only a disk directory's own, and of
//! those none a clone stands on. Everything else a descriptor names is
//! only ever read.

use std::path::{Path, PathBuf};

use super::{Disk, Guid, Image};
use crate::error::{Error, Result};
use crate::io::{FileKind, Io, SyncIo};

impl Disk {
    /// Whether a command may change the delta `image` names: only a file
    /// inside the disk directory, as the descriptor spells it (a relative
    /// path that stays below the directory, or an absolute one under it)
    /// and as it is on disk (its directory inside the disk directory once
    /// symlinks are resolved, the file itself no symlink, a regular file
    /// with no other hard link). Anything else is read-only from here: a
    /// shared template below many clones is read as a lower layer, never
    /// written, merged into, moved or removed.
    pub fn place(&self, image: &Image) -> Place {
        self.place_in(&SyncIo, image)
    }

    /// The same through `io`. A file inside that a clone of this disk
    /// reads (it is listed in `ublk-ploop-clones`) is the clone's too, so it
    /// is only read as well: changing it would change the clone.
    pub fn place_in<I: Io + ?Sized>(&self, io: &I, image: &Image) -> Place {
        let place = self.home_place_in(io, image);
        if place != Place::Inside || self.read_by_clones.is_empty() {
            return place;
        }
        let Ok(Some(st)) = io.stat(&self.file_path(image)) else { return place };
        match self.read_by_clones.reader(st.dev, st.ino) {
            Some((clone, why)) => Place::ReadByClone { clone, why },
            None => place,
        }
    }

    /// Where the file lives, whatever clones read it: inside, a repair
    /// may mend it (a repair keeps what the file shows).
    pub fn home_place(&self, image: &Image) -> Place {
        self.home_place_in(&SyncIo, image)
    }

    fn home_place_in<I: Io + ?Sized>(&self, io: &I, image: &Image) -> Place {
        let Some(rel) = inside_name(&self.dir, &image.file) else {
            return Place::Outside("the descriptor names it outside the disk directory".into());
        };
        let path = self.dir.join(rel);
        let parent = path.parent().unwrap_or(&self.dir);
        match io.canonicalize(parent) {
            Ok(p) if p.starts_with(&self.dir) => {}
            Ok(_) => return Place::Outside("a symbolic link on its path leads outside the disk directory".into()),
            Err(e) => return Place::Outside(format!("its directory cannot be resolved ({e})")),
        }
        match io.stat(&path) {
            Ok(Some(m)) if m.kind == FileKind::Symlink => Place::Outside("it is a symbolic link".into()),
            Ok(Some(m)) if m.kind != FileKind::File => Place::Outside("it is not a regular file".into()),
            Ok(Some(m)) if m.nlink > 1 => Place::Outside(format!("it has {} hard links, so writing it would change another file too", m.nlink)),
            // A missing file is inside: opening it will say it is missing.
            Ok(_) | Err(_) => Place::Inside,
        }
    }

    /// The path of the delta `image` names, for a command that would
    /// change it (`what`: "merge into", "remove"...): refused, naming the
    /// file and the rule, unless it is inside the disk directory.
    pub fn writable_path(&self, image: &Image, what: &str) -> Result<PathBuf> {
        self.writable_path_in(&SyncIo, image, what)
    }

    /// The same through `io`.
    pub fn writable_path_in<I: Io + ?Sized>(&self, io: &I, image: &Image, what: &str) -> Result<PathBuf> {
        match self.place_in(io, image) {
            Place::Inside => Ok(self.file_path(image)),
            Place::ReadByClone { why, .. } => Err(Error::new(
                libc::EBUSY,
                format!(
                    "{}: refusing to {what} delta {}, which clones read: {why}",
                    self.xml_path().display(),
                    image.file
                ),
            )),
            Place::Outside(why) => Err(Error::new(
                libc::EPERM,
                format!(
                    "{}: refusing to {what} delta {} ({why}): a command changes, creates and removes only files inside the disk directory {}; \
                     a delta outside it is only ever read",
                    self.xml_path().display(),
                    image.file,
                    self.dir.display()
                ),
            )),
        }
    }

    /// Two deltas must be two files: one file in two places of a chain
    /// would be written through one name and read through the other. The
    /// descriptor's own check compares spellings; this one the files (an
    /// absolute and a relative name, a symlink, a hard link). Missing files
    /// are for the open to report.
    pub(super) fn check_distinct_files<I: Io + ?Sized>(&self, io: &I) -> Result<()> {
        let mut seen: Vec<((u64, u64), Guid)> = Vec::with_capacity(self.desc.images.len());
        for img in &self.desc.images {
            let Ok(path) = io.canonicalize(&self.file_path(img)) else { continue };
            let Ok(Some(st)) = io.stat(&path) else { continue };
            if let Some((_, other)) = seen.iter().find(|(id, _)| *id == (st.dev, st.ino)) {
                return Err(Error::invalid(format!(
                    "{}: <Image> {other} and {} name one file, {} (a delta would be read through one name and written through the other)",
                    self.xml_path().display(),
                    img.guid,
                    path.display()
                )));
            }
            seen.push(((st.dev, st.ino), img.guid));
        }
        Ok(())
    }
}

/// Where a delta lives, for a command that would change it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// A file of the disk directory: it may be written, grown, merged
    /// into, replaced or removed.
    Inside,
    /// Anywhere else, and why: it is only ever opened read-only.
    Outside(String),
    /// Inside, but a clone of the disk (this directory) stands on it, or
    /// may (`why`): only read, as a file outside.
    ReadByClone { clone: PathBuf, why: String },
}

/// True when the descriptor names `img` outside the disk directory: a
/// delta shared with others (a template), which this disk only reads.
pub fn is_shared(disk: &Disk, img: &Image) -> bool {
    inside_name(&disk.dir, &img.file).is_none()
}

/// The path below `dir` that a descriptor's file name stays inside, by its
/// spelling alone: a relative path, or an absolute one under `dir`, whose
/// `.` and `..` never climb above `dir` and that names a file, not `dir`
/// itself. None for anything else. (The file system may still lead
/// elsewhere through symlinks: [`Disk::place`] checks that too.)
pub fn inside_name(dir: &Path, file: &str) -> Option<PathBuf> {
    use std::path::Component;
    let path = Path::new(file);
    let rel = if path.is_absolute() { path.strip_prefix(dir).ok()? } else { path };
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.iter().collect())
}

