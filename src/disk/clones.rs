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

use std::collections::{HashSet, VecDeque};
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
/// Lines looked at in all the lists followed (clones gone included).
const MAX_LINES: usize = 1 << 16;

/// A file some clone reads, known by device and inode (names differ: the
/// clone's descriptor spells it as an absolute path).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReadFile {
    dev: u64,
    ino: u64,
    /// The clone that reads it.
    clone: PathBuf,
}

/// What the clones of a disk read, as its list (and its clones' lists)
/// say. Never an error: a list or a clone that cannot be read makes every
/// file of the disk count as read (the safe side), so the disk still
/// loads, and what would change its files says why not.
#[derive(Clone, Debug, Default)]
pub struct ReadByClones {
    files: Vec<ReadFile>,
    /// A clone (or a list) we could not look into, and the words for it:
    /// why, and what mends it.
    unknown: Option<(PathBuf, String)>,
}

impl ReadByClones {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.unknown.is_none()
    }

    /// The clone that reads the file with this device and inode, and the
    /// words for it; None when no clone does.
    pub fn reader(&self, dev: u64, ino: u64) -> Option<(PathBuf, String)> {
        if let Some(r) = self.files.iter().find(|r| (r.dev, r.ino) == (dev, ino)) {
            let c = r.clone.display();
            return Some((
                r.clone.clone(),
                format!("the clone {c} stands on it (its template lists it in {LIST}); detach that clone first (`ublk-ploop detach {c}`), or remove it"),
            ));
        }
        self.unknown.clone()
    }

    fn unsure(&mut self, clone: &Path, words: String) {
        self.unknown.get_or_insert_with(|| (clone.to_path_buf(), words));
    }
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
    // Lines end at `\n` alone: a clone's name may end in `\r`.
    let mut seen = HashSet::new();
    let text = String::from_utf8_lossy(&bytes);
    let dirs: Vec<PathBuf> = text.split('\n').map(PathBuf::from).filter(|p| p.is_absolute() && seen.insert(p.clone())).collect();
    if dirs.len() > MAX_LINES {
        return Err(Error::invalid(format!("{}: more than {MAX_LINES} clones listed", path.display())));
    }
    Ok(dirs)
}

/// What the clone in a listed directory reads.
enum Reads {
    /// No such directory, or no descriptor in it: removed, or never made.
    Gone,
    /// The outside files (a template's) its descriptor names.
    Files(Vec<(u64, u64)>),
    /// Its descriptor is there but does not read, and why.
    Unknown(String),
}

async fn reads_of<I: Io + ?Sized>(io: &I, dir: &Path) -> Reads {
    match io.stat(&dir.join(super::DESCRIPTOR)) {
        Ok(Some(_)) => {}
        Ok(None) => return Reads::Gone,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Reads::Gone,
        Err(e) => return Reads::Unknown(format!("its descriptor: {e}")),
    }
    let disk = match Disk::load_bare(io, dir).await {
        Ok(disk) => disk,
        Err(e) => return Reads::Unknown(format!("its descriptor does not read: {e}")),
    };
    let mut files = Vec::new();
    for img in disk.desc.images.iter().filter(|img| super::place::is_shared(&disk, img)) {
        match io.stat(&disk.file_path(img)) {
            Ok(Some(st)) => files.push((st.dev, st.ino)),
            Ok(None) => {}
            Err(e) => return Reads::Unknown(format!("{}: {e}", disk.file_path(img).display())),
        }
    }
    Reads::Files(files)
}

/// Every file that a clone of the disk in `dir` reads, its clones' clones
/// included. Empty without a list (nearly every disk).
pub(super) async fn files_read<I: Io + ?Sized>(io: &I, dir: &Path) -> ReadByClones {
    let mut out = ReadByClones::default();
    // Every path ever queued: each is looked at once.
    let mut queued: HashSet<PathBuf> = HashSet::from([dir.to_path_buf()]);
    let mut queue: VecDeque<PathBuf> = match listed(io, dir).await {
        Ok(dirs) => dirs.into_iter().filter(|d| queued.insert(d.clone())).collect(),
        Err(e) => {
            let list = dir.join(LIST);
            out.unsure(&list, format!("a clone may stand on it ({} does not read: {e}); mend that list", list.display()));
            return out;
        }
    };
    let mut clones = 0;
    while let Some(clone) = queue.pop_front() {
        match reads_of(io, &clone).await {
            Reads::Gone => continue,
            Reads::Files(files) => out.files.extend(files.into_iter().map(|(dev, ino)| ReadFile { dev, ino, clone: clone.clone() })),
            Reads::Unknown(why) => {
                let c = clone.display();
                out.unsure(&clone, format!("the clone {c} may stand on it ({why}); mend it, detach it (`ublk-ploop detach {c}`) or remove it"));
            }
        }
        clones += 1;
        match listed(io, &clone).await {
            Ok(dirs) => queue.extend(dirs.into_iter().filter(|d| queued.insert(d.clone()))),
            Err(e) => out.unsure(
                &clone,
                format!("a clone of the clone {} may stand on it (its own list of clones does not read: {e}); mend that list", clone.display()),
            ),
        }
        // `queued` holds the disk's own directory too.
        if clones > MAX_FOLLOWED || queued.len() > MAX_LINES + 1 {
            out.unsure(
                dir,
                format!("more than {MAX_FOLLOWED} clones, or {MAX_LINES} lines, are in its lists of clones, so any file may be read by one; remove the clones no longer used"),
            );
            break;
        }
    }
    out
}

/// List `clone` in the template's list, before the clone's descriptor is
/// stored, under the template's lock (which the caller holds). Lines of
/// clones that are gone, or that read nothing of the template and have no
/// clones of their own, are dropped. A template whose list we may not
/// make (read-only storage, another user's directory) is left unlisted:
/// who may not write there cannot change it either, and `clone` makes
/// nothing beside such a template.
pub(super) async fn list_clone<I: Io + ?Sized>(io: &I, template: &Disk, clone: &Path) -> Result<()> {
    let line = listable_name(clone)?;
    let mut text = String::new();
    for dir in listed(io, &template.dir).await? {
        let keep = match reads_of(io, &dir).await {
            Reads::Gone => false,
            Reads::Files(files) => !files.is_empty() || !listed(io, &dir).await.is_ok_and(|l| l.is_empty()),
            Reads::Unknown(_) => true,
        };
        if keep && dir != clone {
            text.push_str(dir.to_str().expect("read as UTF-8"));
            text.push('\n');
        }
    }
    text.push_str(line);
    text.push('\n');
    let path = template.dir.join(LIST);
    let tmp = template.dir.join(format!("{LIST}.tmp"));
    match io.remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound && !may_not_write(&e) => return Err(Error::io(e, tmp.display())),
        _ => {}
    }
    let file = match io.open(&tmp, &OpenHow::create_new(0o644)) {
        Ok(f) => f,
        Err(e) if may_not_write(&e) => return Ok(()),
        Err(e) => return Err(Error::io(e, tmp.display())),
    };
    let write = async {
        io.write_at(file.fd(), text.as_bytes(), 0).await?;
        io.sync_data(file.fd()).await?;
        io.rename(&tmp, &path).await?;
        io.sync_dir(&template.dir).await
    };
    write.await.map_err(|e| {
        let _ = io.remove_file(&tmp);
        Error::io(e, format_args!("{}: listing the clone {}", path.display(), clone.display()))
    })
}

/// A clone directory's name as its line in a list: UTF-8 without line
/// breaks (checked on the name given before the directory is made, and
/// on the name it resolved to before it is listed).
pub(super) fn listable_name(clone: &Path) -> Result<&str> {
    clone.to_str().filter(|l| !l.contains(['\n', '\r'])).ok_or_else(|| {
        Error::invalid(format!(
            "{}: a clone's directory must be named in UTF-8 without line breaks (its template lists it by name)",
            clone.display()
        ))
    })
}

/// A directory we may not write in: read-only storage, or another user's.
fn may_not_write(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM))
}
