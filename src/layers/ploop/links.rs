//! The link log: BAT entries of copied-up clusters that are linked before
//! their copy is synced, kept where a killed daemon finds them again and a
//! power cut loses them (a tmpfs directory).
//!
//! A copy-up must not let its entry reach the image before its data is
//! durable (a power cut would show the new entry over bytes that never
//! landed), and an acknowledged write must survive a kill (ublk recovery
//! keeps the filesystem mounted across a daemon restart). Syncing each copy
//! before its entry pays for both with one fdatasync per first write. With
//! the log, a copy-up writes its cluster, records `(cluster, entry)` here
//! and is acknowledged: the image's BAT writes leave such entries out
//! until the next flush syncs their data and writes them. A kill leaves the
//! record, and the next read-write open applies it; a power cut leaves
//! neither record nor entry, and the disk shows the cluster as it was at
//! the last flush, as it may.
//!
//! The file holds fixed records in slots that are reused once their entry
//! is durable in the image; a stale record is harmless (its cluster has an
//! entry, so it is never applied again) and the file is emptied whenever
//! the image is opened or closed.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::io::{Handle, Io, OpenHow};

/// Where this process looks for the logs killed sessions left, for a
/// read-write open that keeps no log itself (offline tools, a daemon
/// serving without one). Set once by the frontend; the engine's default
/// is none. Whether the directory exists and may be used is decided at
/// each open (`leftover_dir`): a daemon may make it, and be killed with a
/// log there, while a command waits for a disk's lock.
static LEFTOVER_DIR: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Set where this process finds leftover logs (see `LEFTOVER_DIR`).
pub fn set_leftover_dir(dir: Option<PathBuf>) {
    *LEFTOVER_DIR.write().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// The name of the log of the image open as `image_fd`: one per file,
/// whatever name it was opened by; the birth time keeps a later file on a
/// reused inode from meeting it.
fn log_name<I: Io>(io: &I, image_fd: RawFd) -> std::io::Result<String> {
    let st = io.fstat(image_fd)?;
    Ok(format!("{:x}-{:x}-{:x}.links", st.dev, st.ino, st.born_ns))
}

/// The directory whose log an image left in use (open as `image_fd`;
/// `image` names it in errors) must have applied when opened read-write
/// without a log of its own. None where no log can be: no directory, or
/// one that is not volatile. A directory this process may not use refuses
/// the open when the image's log there holds records: opened without it,
/// the logged copies would be released as leaks and their space reused,
/// and the log, applied later by a process that can read it, would link
/// them to those bytes. (The directory lets anyone search it, so that
/// only an image with records is refused.) A read-only look (`write`
/// false) only reads the log: it is given the directory where this
/// image's log has records it may read, and refused only where it may not.
pub(super) fn leftover_dir<I: Io>(io: &I, image: &str, image_fd: RawFd, write: bool) -> crate::Result<Option<PathBuf>> {
    use nix::unistd::AccessFlags;
    let Some(dir) = LEFTOVER_DIR.read().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(None) };
    match std::fs::metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Ok(m) if m.is_dir() => {
            if !io.is_volatile_dir(&dir).unwrap_or(true) {
                return Ok(None);
            }
            let rwx = AccessFlags::R_OK | AccessFlags::W_OK | AccessFlags::X_OK;
            if write && nix::unistd::faccessat(None, &dir, rwx, nix::fcntl::AtFlags::AT_EACCESS).is_ok() {
                return Ok(Some(dir));
            }
        }
        _ => {}
    }
    let name = log_name(io, image_fd).map_err(|e| crate::Error::io(e, image))?;
    let log = dir.join(name);
    let readable = || nix::unistd::faccessat(None, &log, AccessFlags::R_OK, nix::fcntl::AtFlags::AT_EACCESS).is_ok();
    match std::fs::metadata(&log) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Ok(m) if m.len() == 0 => Ok(None),
        Ok(_) if !write && readable() => Ok(Some(dir)),
        _ => Err(crate::Error::new(
            libc::EACCES,
            format!(
                "{image}: not closed cleanly, and the link log a killed daemon left for it in {} is not open to this user: \
                 opened without it, acknowledged writes would be missing (and lost once written over); run this as root, \
                 or recover the device",
                dir.display()
            ),
        )),
    }
}

/// Remove the log of the image open as `image_fd` from `dir`, if any: for
/// a repair that releases what it recorded.
pub fn remove_log_of<I: Io>(io: &I, dir: &Path, image_fd: RawFd) {
    if let Ok(name) = log_name(io, image_fd) {
        let _ = io.remove_file(&dir.join(name));
    }
}

/// Bytes of one record.
pub const RECORD: usize = 32;
const MAGIC: [u8; 8] = *b"UPLINKS1";

/// A link the log holds: cluster `cluster`'s entry is `value` (it had none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub cluster: u64,
    pub value: u32,
}

impl Link {
    pub fn encode(self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.cluster.to_le_bytes());
        b[16..20].copy_from_slice(&self.value.to_le_bytes());
        let sum = checksum(&b[..24]);
        b[24..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// A record, or None for an empty slot or one that is not whole.
    pub fn decode(b: &[u8]) -> Option<Link> {
        if b.len() != RECORD || b[..8] != MAGIC || b[24..] != checksum(&b[..24]).to_le_bytes() {
            return None;
        }
        let value = u32::from_le_bytes(b[16..20].try_into().unwrap());
        (value != 0 && b[20..24] == [0; 4]).then(|| Link { cluster: u64::from_le_bytes(b[8..16].try_into().unwrap()), value })
    }
}

/// FNV-1a: catches a torn or foreign record, nothing more is asked of it.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

pub struct LinkLog {
    handle: Handle,
    pub path: PathBuf,
    slots: Mutex<Slots>,
}

/// Every whole record of the log open as `fd`.
async fn read_links<I: Io>(io: &I, fd: RawFd) -> std::io::Result<Vec<Link>> {
    let len = io.fstat(fd)?.len as usize;
    let mut bytes = vec![0u8; len - len % RECORD];
    io.read_at(fd, &mut bytes, 0).await?;
    Ok(bytes.chunks_exact(RECORD).filter_map(Link::decode).collect())
}

#[derive(Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

impl LinkLog {
    /// The log of the image open as `image_fd`, in `dir`, with the links a
    /// killed session left there. None when `dir` is not volatile: a log
    /// that outlived a power cut would link clusters whose copies never
    /// became durable, so only a tmpfs may hold one.
    pub async fn open<I: Io>(io: &I, dir: &Path, image_fd: RawFd) -> std::io::Result<Option<(LinkLog, Vec<Link>)>> {
        if !io.is_volatile_dir(dir)? {
            return Ok(None);
        }
        if !io.keeps_written_zeros(image_fd) {
            // A replay drops a record whose cluster is a hole (released
            // since); here a copy of zeros might read as one.
            tracing::info!(dir = %dir.display(), "no link log: the image's filesystem may store written zeros as holes");
            return Ok(None);
        }
        let path = dir.join(log_name(io, image_fd)?);
        let how = OpenHow { write: true, create: true, mode: 0o600, nofollow: true, ..OpenHow::default() };
        let handle = io.open(&path, &how)?;
        let links = read_links(io, handle.fd()).await?;
        Ok(Some((LinkLog { handle, path, slots: Mutex::new(Slots::default()) }, links)))
    }

    /// The links a killed session left in `dir` for the image open as
    /// `image_fd`, read without creating or changing the log: for a
    /// read-only opening. None found where `open` would keep no log.
    pub async fn read<I: Io>(io: &I, dir: &Path, image_fd: RawFd) -> std::io::Result<Vec<Link>> {
        if !io.is_volatile_dir(dir)? || !io.keeps_written_zeros(image_fd) {
            return Ok(vec![]);
        }
        let path = dir.join(log_name(io, image_fd)?);
        let handle = match io.open(&path, &OpenHow { nofollow: true, ..OpenHow::read() }) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(vec![]),
            other => other?,
        };
        read_links(io, handle.fd()).await
    }

    /// Record `link`; returns its slot, to be released once the entry is
    /// durable in the image. The record is in the file when this returns.
    pub async fn append<I: Io>(&self, io: &I, link: Link) -> std::io::Result<u32> {
        let slot = {
            let mut s = self.slots.lock().unwrap();
            s.free.pop().unwrap_or_else(|| {
                s.next += 1;
                s.next - 1
            })
        };
        let result = io.write_at(self.handle.fd(), &link.encode(), slot as u64 * RECORD as u64).await;
        if result.is_err() {
            self.release(&[slot]);
        }
        result.map(|()| slot)
    }

    /// Slots whose entries are durable in the image: free for reuse (their
    /// records stay until overwritten, and are never applied again).
    pub fn release(&self, slots: &[u32]) {
        self.slots.lock().unwrap().free.extend_from_slice(slots);
    }

    /// Empty the file: every link it held is in the image, durably.
    pub async fn reset<I: Io>(&self, io: &I) -> std::io::Result<()> {
        *self.slots.lock().unwrap() = Slots::default();
        io.set_len(self.handle.fd(), 0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_whole_and_is_refused_torn_or_empty() {
        let link = Link { cluster: 0x1234_5678_9abc, value: 77 };
        let b = link.encode();
        assert_eq!(Link::decode(&b), Some(link));
        assert_eq!(Link::decode(&[0u8; RECORD]), None);
        for i in 0..RECORD {
            let mut torn = b;
            torn[i] ^= 0x40;
            assert_eq!(Link::decode(&torn), None, "byte {i} changed");
        }
        assert_eq!(Link::decode(&b[..RECORD - 1]), None);
    }
}
