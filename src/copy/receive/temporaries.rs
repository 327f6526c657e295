//! A receive's temporaries and the lock on its destination: every file or
//! directory a receive makes is listed until it is put in place or removed,
//! so that a terminating signal's handler can remove what is left
//! ([`remove_temporaries`]), and a second receive into the same
//! destination is refused while the first holds its lock.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{is_empty_dir, parent_of};
use crate::error::{Error, Result};
use crate::io::{FileKind, Handle, Io, LockHow, OpenHow, SyncIo};

/// A file or directory this process made and has not put in place yet.
pub(super) struct Temp {
    pub(super) path: PathBuf,
    dir: bool,
}

/// What [`remove_temporaries`] removes, and the makings and placings under
/// way, which it waits for, so that it sees each temporary either before
/// or after (never made but not listed, nor half moved into place). The
/// lock is only ever held for a moment, never across an await: two
/// receives on one thread must not wait for each other.
pub(super) struct Registry {
    temps: Vec<Temp>,
    busy: usize,
    /// A signal's cleanup has begun: nothing new starts.
    closing: bool,
}

impl Registry {
    pub(super) fn forget(&mut self, path: &Path) {
        self.temps.retain(|t| t.path != path);
    }
    pub(super) fn holds(&self, path: &Path) -> bool {
        self.temps.iter().any(|t| t.path == path)
    }
}

static TEMPORARIES: Mutex<Registry> = Mutex::new(Registry { temps: Vec::new(), busy: 0, closing: false });

pub(super) fn registry() -> MutexGuard<'static, Registry> {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A making or placing under way; the cleanup waits until it ends.
struct Busy;

impl Busy {
    fn start() -> Busy {
        let mut reg = registry();
        if reg.closing {
            // The process is exiting once the cleanup is done: this
            // receive goes no further.
            drop(reg);
            loop {
                std::thread::park();
            }
        }
        reg.busy += 1;
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        registry().busy -= 1;
    }
}

/// Remember `path` (a file, or a directory with `dir`) for
/// [`remove_temporaries`]: the command's own temporaries (a socket).
pub fn register_temporary(path: &Path, dir: bool) {
    registry().temps.push(Temp { path: path.to_path_buf(), dir });
}

pub fn forget_temporary(path: &Path) {
    registry().forget(path);
}

/// Remove every temporary that a receive in this process made and has not
/// put in place or removed yet, and return their names. For the handler
/// of a terminating signal, on a thread of its own (it waits for the
/// makings and placings under way): the process must exit right after,
/// and no receive in it gets any further (the list stays locked).
pub fn remove_temporaries() -> Vec<PathBuf> {
    registry().closing = true;
    let mut reg = loop {
        let reg = registry();
        if reg.busy == 0 {
            break reg;
        }
        drop(reg);
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let mut gone = Vec::new();
    for t in reg.temps.drain(..).rev() {
        let removed = if t.dir { remove_tree(&SyncIo, &t.path) } else { SyncIo.remove_file(&t.path) };
        if removed.is_ok() {
            gone.push(t.path);
        }
    }
    std::mem::forget(reg);
    gone
}

/// Remove a directory and everything under it (a temporary disk
/// directory), through `io`; symbolic links are removed, never followed.
pub(super) fn remove_tree<I: Io>(io: &I, dir: &Path) -> std::io::Result<()> {
    for name in io.read_dir(dir)? {
        let path = dir.join(name);
        match io.stat(&path)? {
            Some(st) if st.kind == FileKind::Dir => remove_tree(io, &path)?,
            Some(_) => io.remove_file(&path)?,
            None => {}
        }
    }
    io.remove_dir(dir)
}

/// Six letters or digits from the entropy source (seeded in a simulation).
fn random_suffix() -> String {
    const ALNUM: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bits = crate::rng::entropy_u128();
    (0..6)
        .map(|_| {
            let c = ALNUM[(bits % ALNUM.len() as u128) as usize] as char;
            bits /= ALNUM.len() as u128;
            c
        })
        .collect()
}

/// Make a temporary `BASE.TAG.XXXXXX` beside `base` with `make`, which
/// must refuse an existing name (O_EXCL, mkdir) with EEXIST; it is listed
/// for removal on a signal (which waits for the making to end).
pub(super) async fn make_temp<T, F: Future<Output = Result<T>>>(base: &Path, tag: &str, dir: bool, mut make: impl FnMut(PathBuf) -> F) -> Result<(PathBuf, T)> {
    for _ in 0..32 {
        let path = temp_beside(base, &format!(".{tag}.{}", random_suffix()));
        let busy = Busy::start();
        match make(path.clone()).await {
            Ok(made) => {
                registry().temps.push(Temp { path: path.clone(), dir });
                drop(busy);
                return Ok((path, made));
            }
            Err(e) if e.errno() == libc::EEXIST => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(libc::EEXIST, format!("{}: no free name for a temporary beside it", base.display())))
}

/// Remove a temporary of ours and forget it.
pub(super) fn remove_temp<I: Io>(io: &I, path: &Path, dir: bool) {
    let mut reg = registry();
    let _ = if dir { remove_tree(io, path) } else { io.remove_file(path) };
    reg.forget(path);
}

/// An empty file `.NAME.receiving` beside the destination, flocked while a
/// receive works on it, removed after.
pub(super) struct DestLock<'a, I: Io> {
    io: &'a I,
    path: PathBuf,
    _file: Handle,
}

impl<'a, I: Io> DestLock<'a, I> {
    pub(super) fn take(io: &'a I, dest: &Path) -> Result<DestLock<'a, I>> {
        let name = dest.file_name().ok_or_else(|| Error::invalid(format!("{}: give the destination a file name", dest.display())))?;
        let mut lock_name = OsString::from(".");
        lock_name.push(name);
        lock_name.push(".receiving");
        let path = dest.with_file_name(lock_name);
        let not_a_lock = || {
            Error::new(
                libc::EEXIST,
                format!("{}: exists and is not a receive's lock (an empty file); refusing to use it", path.display()),
            )
        };
        for _ in 0..8 {
            let file = match open_or_create(io, &path) {
                Ok(f) => f,
                // Io::open refuses what is not a regular file.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return Err(not_a_lock()),
                Err(e) => return Err(Error::io(e, format_args!("{} (the receive lock)", path.display()))),
            };
            let meta = io.fstat(file.fd()).map_err(|e| Error::io(e, path.display()))?;
            if meta.kind != FileKind::File || meta.len != 0 {
                return Err(not_a_lock());
            }
            if io.flock(file.fd(), LockHow::Exclusive).is_err() {
                return Err(Error::new(
                    libc::EBUSY,
                    format!("{}: another receive into it is running (it holds {}); refusing to run a second", dest.display(), path.display()),
                ));
            }
            // The holder before us removes the file as it lets go: the
            // lock counts only on the file that is still there.
            match io.stat(&path) {
                Ok(Some(m)) if m.ino == meta.ino && m.dev == meta.dev => {
                    register_temporary(&path, false);
                    return Ok(DestLock { io, path, _file: file });
                }
                _ => continue,
            }
        }
        Err(Error::new(libc::EBUSY, format!("{}: could not take the receive lock {}", dest.display(), path.display())))
    }
}

/// Open `path` for writing, creating it (mode 0600) if it is missing
/// (O_CREAT without O_EXCL, in two steps the trait has), never through a
/// symbolic link.
fn open_or_create<I: Io>(io: &I, path: &Path) -> std::io::Result<Handle> {
    loop {
        match io.open(path, &OpenHow { write: true, nofollow: true, ..OpenHow::default() }) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        match io.open(path, &OpenHow::create_new(0o600)) {
            // Made meanwhile by another receive: open that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            other => return other,
        }
    }
}

impl<I: Io> Drop for DestLock<'_, I> {
    fn drop(&mut self) {
        // Removed while still locked, so that nobody locks a file that is
        // about to go.
        remove_temp(self.io, &self.path, false);
    }
}

pub(super) async fn sync_parent<I: Io>(io: &I, p: &Path) -> Result<()> {
    let dir = parent_of(p);
    io.sync_dir(dir).await.map_err(|e| Error::io(e, dir.display()))
}

pub(super) fn temp_beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dest.with_file_name(name)
}

/// Put the finished temporary in place and make that durable: never over
/// anything (but the empty directory named as the destination), so that a
/// destination that appeared meanwhile is refused, not replaced. A signal's
/// cleanup waits for the move, as for a making (see [`Registry`]).
pub(super) async fn place<I: Io>(io: &I, temp: &Path, dest: &Path) -> Result<()> {
    let busy = Busy::start();
    let temp_is_dir = matches!(io.stat(temp), Ok(Some(st)) if st.kind == FileKind::Dir);
    let placed = if temp_is_dir && is_empty_dir(io, dest) {
        // rename(2) replaces a directory only if it is empty.
        io.rename(temp, dest).await
    } else {
        io.rename_noreplace(temp, dest)
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
    registry().forget(temp);
    drop(busy);
    sync_parent(io, dest).await
}
