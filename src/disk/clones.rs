//! The clones a template knows. A served clone holds shared locks on the
//! template's files, but a stopped one holds nothing, so a merge, delete,
//! switch or read-write start of the template could change or remove a
//! file a clone stands on. `clone` therefore lists the new clone's
//! directory in the template's `ublk-ploop-clones` (one absolute path a
//! line), and loading a disk resolves that list into the files its clones
//! read: such a file is no longer the template's to change
//! ([`super::Disk::place`]).
//!
//! A clone is listed before its descriptor is stored, so a crash leaves at
//! worst a line that names no clone. A line whose directory no longer
//! reads the template (removed, detached) names nothing and is dropped at
//! the next `clone`. Clones of clones are followed through their own
//! lists. ploop's tool does not read the list.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::Disk;
use crate::error::{Error, Result};
use crate::io::{Io, OpenHow};

/// The list's file name in a template's directory.
pub const LIST: &str = "ublk-ploop-clones";
/// A list is a line per clone; anything larger is not ours.
const MAX_LIST: u64 = 1 << 20;
/// Clones followed from one template, its clones' clones included.
const MAX_FOLLOWED: usize = 4096;

/// A file some clone reads, known by device and inode (names differ: the
/// clone's descriptor spells it as an absolute path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadFile {
    pub dev: u64,
    pub ino: u64,
    /// The clone that reads it.
    pub clone: PathBuf,
}

/// The clone directories `dir`'s list names (none without a list).
async fn listed<I: Io + ?Sized>(io: &I, dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join(LIST);
    let file = match io.open(&path, &OpenHow::read()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(e, path.display())),
    };
    let len = io.fstat(file.fd()).map_err(|e| Error::io(e, path.display()))?.len;
    if len > MAX_LIST {
        return Err(Error::invalid(format!("{}: larger than {} KiB, not a list of clones", path.display(), MAX_LIST >> 10)));
    }
    let mut bytes = vec![0u8; len as usize];
    io.read_at(file.fd(), &mut bytes, 0).await.map_err(|e| Error::io(e, path.display()))?;
    // A line that is not an absolute UTF-8 path names no clone of ours.
    Ok(String::from_utf8_lossy(&bytes).lines().map(PathBuf::from).filter(|p| p.is_absolute()).collect())
}

/// The outside files (a template's) that the clone in `dir` reads, or None
/// when `dir` holds no descriptor that loads: a clone removed or never
/// finished.
async fn reads_of<I: Io + ?Sized>(io: &I, dir: &Path) -> Option<Vec<(u64, u64)>> {
    let disk = Disk::load_bare(io, dir).await.ok()?;
    let files = disk
        .desc
        .images
        .iter()
        .filter(|img| super::clone::is_shared(&disk, img))
        .filter_map(|img| io.stat(&disk.file_path(img)).ok().flatten())
        .map(|st| (st.dev, st.ino))
        .collect();
    Some(files)
}

/// Every file that a clone of the disk in `dir` reads, its clones' clones
/// included. Empty without a list (nearly every disk).
pub(super) async fn files_read<I: Io + ?Sized>(io: &I, dir: &Path) -> Result<Vec<ReadFile>> {
    let mut out = Vec::new();
    let mut followed = vec![dir.to_path_buf()];
    let mut queue: VecDeque<PathBuf> = listed(io, dir).await?.into();
    while let Some(clone) = queue.pop_front() {
        if followed.contains(&clone) {
            continue;
        }
        if followed.len() > MAX_FOLLOWED {
            return Err(Error::invalid(format!(
                "{}: more than {MAX_FOLLOWED} clones listed (its clones' clones included)",
                dir.join(LIST).display()
            )));
        }
        followed.push(clone.clone());
        let Some(reads) = reads_of(io, &clone).await else { continue };
        out.extend(reads.into_iter().map(|(dev, ino)| ReadFile { dev, ino, clone: clone.clone() }));
        queue.extend(listed(io, &clone).await?);
    }
    Ok(out)
}

/// List `clone` in the template's list, before the clone's descriptor is
/// stored, under the template's lock (which the caller holds). Lines of
/// clones that no longer read the template go. A template on storage we
/// may not write (read-only, or another user's) is left unlisted: who may
/// not write it cannot change it either, and `clone` makes nothing beside
/// such a template.
pub(super) async fn list_clone<I: Io + ?Sized>(io: &I, template: &Disk, clone: &Path) -> Result<()> {
    let mut keep = Vec::new();
    for dir in listed(io, &template.dir).await? {
        if dir != clone && reads_of(io, &dir).await.is_some_and(|r| !r.is_empty()) && !keep.contains(&dir) {
            keep.push(dir);
        }
    }
    keep.push(clone.to_path_buf());
    let mut text = String::new();
    for dir in &keep {
        let Some(line) = dir.to_str() else { continue };
        text.push_str(line);
        text.push('\n');
    }
    let path = template.dir.join(LIST);
    let tmp = template.dir.join(format!("{LIST}.tmp"));
    let write = async {
        match io.remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = io.open(&tmp, &OpenHow::create_new(0o644))?;
        io.write_at(file.fd(), text.as_bytes(), 0).await?;
        io.sync_data(file.fd()).await?;
        io.rename(&tmp, &path).await?;
        io.sync_dir(&template.dir).await
    };
    match write.await {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM)) => Ok(()),
        Err(e) => {
            let _ = io.remove_file(&tmp);
            Err(Error::io(e, format_args!("{}: listing the clone {}", path.display(), clone.display())))
        }
    }
}
