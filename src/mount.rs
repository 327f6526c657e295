//! Whether a device is in use, and freezing the filesystems mounted from
//! it for the last pass of a copy (as ploop does: the filesystem writes out
//! its dirty state and stops changing, so the copy holds a consistent one).
//!
//! The kernel is asked, not a path in our own mount table: the device and
//! each of its partitions by device number, in the mount table of every
//! mount namespace (`/proc/PID/mountinfo`; the daemon runs in a private
//! one), their holders (device mapper, md), and an exclusive open, which
//! fails while anything mounts or claims the device or a partition. A
//! filesystem found is opened through `/proc/PID/root/`, so its mount point
//! resolves in its own namespace.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use ublk_ploop::copy::FsFreeze;
use ublk_ploop::{Error, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// A block device node: `ublkbN` or one of its partitions.
struct Node {
    name: String,
    dev: (u32, u32),
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `ublkbN` and its partitions, from sysfs.
fn nodes(id: u32) -> Vec<Node> {
    let name = format!("ublkb{id}");
    let base = PathBuf::from("/sys/class/block").join(&name);
    let mut out = Vec::new();
    if let Some(dev) = std::fs::read_to_string(base.join("dev")).ok().as_deref().and_then(parse_dev) {
        out.push(Node { name: name.clone(), dev });
    }
    if let Ok(dir) = std::fs::read_dir(&base) {
        for e in dir.flatten() {
            let part = e.file_name().to_string_lossy().into_owned();
            if part.starts_with(&format!("{name}p")) {
                if let Some(dev) = std::fs::read_to_string(e.path().join("dev")).ok().as_deref().and_then(parse_dev) {
                    out.push(Node { name: part, dev });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A filesystem mounted from the device (or a partition), as one process
/// sees it.
#[derive(Clone)]
pub struct Mount {
    /// The node it is mounted from.
    pub node: String,
    pub pid: u32,
    /// The mount point in that process's namespace.
    pub point: String,
    /// Whether that is our own mount namespace.
    pub ours: bool,
    /// The filesystem's device number (what its files' `st_dev` is).
    dev: (u32, u32),
}

impl Mount {
    /// The mount point, opened through the process's root.
    fn path(&self) -> PathBuf {
        let rel = self.point.trim_start_matches('/');
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(rel)
    }

    pub fn describe(&self) -> String {
        if self.ours {
            format!("{} is mounted on {}", self.node, self.point)
        } else {
            format!("{} is mounted on {} in the mount namespace of pid {}", self.node, self.point, self.pid)
        }
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields of a mountinfo line we use.
#[derive(Debug, PartialEq)]
struct Entry {
    dev: (u32, u32),
    point: String,
    source: Option<String>,
}

/// `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER`
fn parse_mountinfo(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split(' ').collect();
    if f.len() < 5 {
        return None;
    }
    let dev = parse_dev(f[2])?;
    let source = f.iter().skip(6).position(|&x| x == "-").and_then(|i| f.get(6 + i + 2)).map(|s| unescape(s));
    Some(Entry { dev, point: unescape(f[4]), source })
}

fn ns_of(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// Every filesystem mounted from the device or its partitions, in any
/// mount namespace: one per filesystem (device number), ours first.
pub fn mounts(id: u32) -> Vec<Mount> {
    let nodes = nodes(id);
    if nodes.is_empty() {
        return Vec::new();
    }
    let own_ns = ns_of("self");
    let own = std::process::id().to_string();
    let mut pids = vec![own.clone()];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        pids.extend(dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && *n != own));
    }
    let mut seen_ns = HashSet::new();
    let mut seen_fs = HashSet::new();
    let mut out = Vec::new();
    for pid in pids {
        let ns = ns_of(&pid);
        if let Some(ns) = &ns {
            if !seen_ns.insert(ns.clone()) {
                continue;
            }
        }
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { continue };
        for line in table.lines() {
            let Some(entry) = parse_mountinfo(line) else { continue };
            let dev = entry.dev;
            let mut node = nodes.iter().find(|n| n.dev == dev);
            if node.is_none() && dev.0 == 0 {
                // A filesystem with anonymous device numbers (btrfs): its
                // source, resolved in that namespace.
                if let Some(src) = entry.source.filter(|s| s.starts_with('/')) {
                    let p = format!("/proc/{pid}/root/{}", src.trim_start_matches('/'));
                    if let Ok(m) = std::fs::metadata(&p) {
                        if m.file_type().is_block_device() {
                            let rdev = (libc::major(m.rdev()), libc::minor(m.rdev()));
                            node = nodes.iter().find(|n| n.dev == rdev);
                        }
                    }
                }
            }
            let Some(node) = node else { continue };
            if !seen_fs.insert(dev) {
                continue;
            }
            let pid_n = pid.parse().unwrap_or(0);
            out.push(Mount { node: node.name.clone(), pid: pid_n, point: entry.point, ours: ns.is_some() && ns == own_ns, dev });
        }
    }
    out
}

/// What holds the device or a partition other than a mount we can see:
/// holders in sysfs (device mapper, md), or an exclusive open that fails.
fn held(id: u32) -> Option<String> {
    for n in nodes(id) {
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/class/block/{}/holders", n.name))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if !holders.is_empty() {
            return Some(format!("{} is held by {}", n.name, holders.join(", ")));
        }
    }
    let dev = format!("/dev/ublkb{id}");
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Some(format!("{dev} or a partition of it is open exclusively (a mount in a namespace not visible here, swap, or another program)"))
        }
        _ => None,
    }
}

/// Why the device is in use, if it is: a filesystem mounted from it or a
/// partition (in any mount namespace), a holder, an exclusive opener.
pub fn in_use(id: u32) -> Option<String> {
    let found = mounts(id);
    if let Some(first) = found.first() {
        let more = match found.len() {
            1 => String::new(),
            n => format!(", and {} more filesystem{}", n - 1, if n == 2 { "" } else { "s" }),
        };
        return Some(format!("{}{more}", first.describe()));
    }
    held(id)
}

/// Freezes every filesystem mounted from the device or its partitions.
pub struct MountFreeze {
    id: u32,
    /// Go on when the device is in use but no filesystem is found.
    allow_unfrozen: bool,
    frozen: Vec<(String, File)>,
    /// Where filesystems were frozen, once they were.
    pub froze: Vec<String>,
    /// Why the copy is not filesystem-consistent, when it went on anyway.
    pub unfrozen: Option<String>,
}

impl MountFreeze {
    pub fn new(id: u32, allow_unfrozen: bool) -> MountFreeze {
        MountFreeze { id, allow_unfrozen, frozen: Vec::new(), froze: Vec::new(), unfrozen: None }
    }

    fn freeze_one(&mut self, m: &Mount) -> Result<()> {
        let on = m.describe();
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(m.path())
            .map_err(|e| Error::io(e, format_args!("opening the filesystem to freeze it ({on})")))?;
        // What was opened is that filesystem, not what a path changed
        // meanwhile (a process's own tree) leads to.
        let st = dir.metadata().map_err(|e| Error::io(e, format_args!("{on}")))?;
        if (libc::major(st.dev()), libc::minor(st.dev())) != m.dev {
            return Err(Error::new(libc::ESTALE, format!("the mount point changed while it was opened ({on})")));
        }
        let mut arg = 0;
        // SAFETY: FIFREEZE on a directory of the filesystem; the argument is unused.
        unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }.map_err(|e| {
            Error::new(e as i32, format!("cannot freeze the filesystem ({on}): {e}; the copy would not be consistent"))
        })?;
        tracing::info!("froze the filesystem: {on}");
        self.froze.push(on.clone());
        self.frozen.push((on, dir));
        Ok(())
    }
}

impl FsFreeze for MountFreeze {
    fn freeze(&mut self) -> Result<()> {
        let mut found = mounts(self.id);
        if found.is_empty() {
            let dev = format!("/dev/ublkb{}", self.id);
            return match held(self.id) {
                None => Ok(()),
                Some(why) if self.allow_unfrozen => {
                    tracing::warn!("{why}; no filesystem found to freeze: the copy is not filesystem-consistent");
                    self.unfrozen = Some(format!("{why}, but no filesystem on it was found to freeze: this copy is not filesystem-consistent"));
                    Ok(())
                }
                Some(why) => Err(Error::new(
                    libc::EBUSY,
                    format!("{dev} is in use ({why}) but no filesystem on it was found to freeze: the copy would not be filesystem-consistent; unmount it, or copy anyway with --allow-unfrozen"),
                )),
            };
        }
        let mut retried = false;
        let mut i = 0;
        while i < found.len() {
            let m = found[i].clone();
            let r = self.freeze_one(&m);
            if let Err(e) = r {
                if !retried && matches!(e.errno(), libc::ENOENT | libc::ESRCH | libc::ENOTDIR | libc::ELOOP | libc::ESTALE) {
                    // The process we looked through went away: look again
                    // for those not frozen yet.
                    retried = true;
                    let done: HashSet<String> = found[..i].iter().map(|m| m.node.clone()).collect();
                    found = mounts(self.id).into_iter().filter(|m| !done.contains(&m.node)).collect();
                    i = 0;
                    continue;
                }
                let _ = self.thaw();
                return Err(e);
            }
            i += 1;
        }
        Ok(())
    }

    fn thaw(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some((on, dir)) = self.frozen.pop() {
            let mut arg = 0;
            // SAFETY: as above.
            match unsafe { fithaw(dir.as_raw_fd(), &mut arg) } {
                Ok(_) => tracing::info!("thawed the filesystem: {on}"),
                Err(e) => {
                    if first.is_ok() {
                        first = Err(Error::new(e as i32, format!("cannot thaw the filesystem ({on}): {e}")));
                    }
                }
            }
        }
        first
    }
}

impl Drop for MountFreeze {
    fn drop(&mut self) {
        // Never leave a filesystem frozen behind an error.
        let _ = self.thaw();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields() {
        assert_eq!(parse_dev("259:3\n"), Some((259, 3)));
        assert_eq!(parse_dev("x"), None);
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/mnt/a\\\\"), "/mnt/a\\\\");
        assert_eq!(unescape("\\134x"), "\\x");
        let e = parse_mountinfo("36 25 259:1 / /srv/my\\040disk rw,relatime shared:1 master:2 - ext4 /dev/ublkb0p1 rw").unwrap();
        assert_eq!(e, Entry { dev: (259, 1), point: "/srv/my disk".into(), source: Some("/dev/ublkb0p1".into()) });
        let e = parse_mountinfo("40 25 0:45 /sub /mnt/b rw - btrfs /dev/ublkb1 rw").unwrap();
        assert_eq!((e.dev, e.source.as_deref()), ((0, 45), Some("/dev/ublkb1")));
        assert_eq!(parse_mountinfo("garbage"), None);
    }
}
