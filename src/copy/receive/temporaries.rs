//! A receive's temporaries and the lock on its destination: every file or
//! directory a receive makes is listed until it is put in place or removed,
//! so that a terminating signal's handler can remove what is left
//! ([`remove_temporaries`]), and a second receive into the same
//! destination is refused while the first holds its lock.

use std::ffi::{CString, OsString};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{is_empty_dir, parent_of};
use crate::error::{Error, Result};
use crate::io::{block_on, Io, SyncIo};

/// A file or directory this process made and has not put in place yet.
pub(super) struct Temp {
    pub(super) path: PathBuf,
    dir: bool,
}

/// What [`remove_temporaries`] removes. Held while a temporary is made and
/// while one is put in place, so that a signal's cleanup sees each either
/// before or after.
static TEMPORARIES: Mutex<Vec<Temp>> = Mutex::new(Vec::new());

pub(super) fn registry() -> MutexGuard<'static, Vec<Temp>> {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn forget_in(reg: &mut Vec<Temp>, path: &Path) {
    reg.retain(|t| t.path != path);
}

/// Remember `path` (a file, or a directory with `dir`) for
/// [`remove_temporaries`]: the command's own temporaries (a socket).
pub fn register_temporary(path: &Path, dir: bool) {
    registry().push(Temp { path: path.to_path_buf(), dir });
}

pub fn forget_temporary(path: &Path) {
    forget_in(&mut registry(), path);
}

/// Remove every temporary that a receive in this process made and has not
/// put in place or removed yet, and return their names. For the handler
/// of a terminating signal: the process must exit right after, and no
/// receive in it gets any further (the list stays locked).
pub fn remove_temporaries() -> Vec<PathBuf> {
    let mut reg = registry();
    let mut gone = Vec::new();
    for t in reg.drain(..).rev() {
        let removed = if t.dir { std::fs::remove_dir_all(&t.path) } else { std::fs::remove_file(&t.path) };
        if removed.is_ok() {
            gone.push(t.path);
        }
    }
    std::mem::forget(reg);
    gone
}

fn random_suffix() -> String {
    const ALNUM: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: the time and our pid still differ between
        // runs, and O_EXCL catches the rest.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        b = (t ^ (std::process::id() as u64) << 40).to_le_bytes();
    }
    b[..6].iter().map(|x| ALNUM[*x as usize % ALNUM.len()] as char).collect()
}

/// Make a temporary `BASE.TAG.XXXXXX` beside `base` with `make`, which
/// must refuse an existing name (O_EXCL, mkdir) with EEXIST; it is listed
/// for removal on a signal.
pub(super) fn make_temp<T>(base: &Path, tag: &str, dir: bool, mut make: impl FnMut(&Path) -> Result<T>) -> Result<(PathBuf, T)> {
    for _ in 0..32 {
        let path = temp_beside(base, &format!(".{tag}.{}", random_suffix()));
        let mut reg = registry();
        match make(&path) {
            Ok(made) => {
                reg.push(Temp { path: path.clone(), dir });
                return Ok((path, made));
            }
            Err(e) if e.errno() == libc::EEXIST => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(libc::EEXIST, format!("{}: no free name for a temporary beside it", base.display())))
}

/// Remove a temporary of ours and forget it.
pub(super) fn remove_temp(path: &Path, dir: bool) {
    let mut reg = registry();
    let _ = if dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    forget_in(&mut reg, path);
}

/// An empty file `.NAME.receiving` beside the destination, flocked while a
/// receive works on it, removed after.
pub(super) struct DestLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl DestLock {
    pub(super) fn take(dest: &Path) -> Result<DestLock> {
        let name = dest.file_name().ok_or_else(|| Error::invalid(format!("{}: give the destination a file name", dest.display())))?;
        let mut lock_name = OsString::from(".");
        lock_name.push(name);
        lock_name.push(".receiving");
        let path = dest.with_file_name(lock_name);
        for _ in 0..8 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| Error::io(e, format_args!("{} (the receive lock)", path.display())))?;
            let meta = file.metadata().map_err(|e| Error::io(e, path.display()))?;
            if !meta.is_file() || meta.len() != 0 {
                return Err(Error::new(
                    libc::EEXIST,
                    format!("{}: exists and is not a receive's lock (an empty file); refusing to use it", path.display()),
                ));
            }
            // SAFETY: plain syscall on our own descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(Error::new(
                    libc::EBUSY,
                    format!("{}: another receive into it is running (it holds {}); refusing to run a second", dest.display(), path.display()),
                ));
            }
            // The holder before us removes the file as it lets go: the
            // lock counts only on the file that is still there.
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {
                    register_temporary(&path, false);
                    return Ok(DestLock { path, _file: file });
                }
                _ => continue,
            }
        }
        Err(Error::new(libc::EBUSY, format!("{}: could not take the receive lock {}", dest.display(), path.display())))
    }
}

impl Drop for DestLock {
    fn drop(&mut self) {
        // Removed while still locked, so that nobody locks a file that is
        // about to go.
        remove_temp(&self.path, false);
    }
}

/// Rename `from` to `to` unless `to` exists (a file or directory of ours
/// to its final name); EEXIST if it does.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL));
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: two NUL-terminated paths we own.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // A filesystem without RENAME_NOREPLACE: link refuses an existing
        // name too (files only).
        Some(libc::EINVAL) | Some(libc::ENOSYS) if !from.is_dir() => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(e),
    }
}

pub(super) fn sync_parent(p: &Path) -> Result<()> {
    let dir = parent_of(p);
    block_on(SyncIo.sync_dir(dir)).map_err(|e| Error::io(e, dir.display()))
}

pub(super) fn temp_beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dest.with_file_name(name)
}

/// Put the finished temporary in place and make that durable: never over
/// anything (but the empty directory named as the destination), so that a
/// destination that appeared meanwhile is refused, not replaced.
pub(super) fn place(temp: &Path, dest: &Path) -> Result<()> {
    let mut reg = registry();
    let placed = if temp.is_dir() && is_empty_dir(dest) {
        // rename(2) replaces a directory only if it is empty.
        std::fs::rename(temp, dest)
    } else {
        rename_noreplace(temp, dest)
    };
    if let Err(e) = placed {
        return Err(match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Error::new(
                libc::EEXIST,
                format!("{}: appeared while the stream was received; refusing to replace it (what was received is discarded)", dest.display()),
            ),
            _ => Error::io(e, format_args!("{} -> {}", temp.display(), dest.display())),
        });
    }
    forget_in(&mut reg, temp);
    drop(reg);
    sync_parent(dest)
}
