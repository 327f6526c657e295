//! A stable name for a device: `/dev/ublk-ploop/NAME` → `/dev/ublkbN`,
//! made by the daemon once the device is live and removed when it stops,
//! so that units and fstab name the container's disk, not a number the
//! kernel picked. The systemd unit names its device after its instance.

use std::io;
use std::path::{Path, PathBuf};

use ublk_ploop::{Error, Result};

/// Where the links live (another directory for tests).
pub fn dir() -> PathBuf {
    std::env::var_os("UBLK_PLOOP_DEV_LINK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/ublk-ploop"))
}

/// A name is one path component of letters, digits and `._@:+-`, not
/// starting with a dot, at most 64 bytes: what a unit instance or a
/// container id is, and nothing a link could be made to escape with.
pub fn validate(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._@:+-".contains(c);
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(Error::invalid(format!(
            "device name '{name}': use 1 to 64 letters, digits and . _ @ : + - (not starting with a dot)"
        )));
    }
    Ok(())
}

fn device(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// The device a name's link points at now, if the link exists.
fn target(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_link(dir.join(name)).ok()
}

/// Refuse a name another live device holds (its link points at a device
/// that exists and is not `own`, the device being recovered).
pub fn check_free(name: &str, own: Option<u32>) -> Result<()> {
    let dir = dir();
    match target(&dir, name) {
        Some(t) if own.is_some_and(|id| t == device(id)) => Ok(()),
        Some(t) if t.exists() => Err(Error::new(
            libc::EEXIST,
            format!("device name '{name}' is taken: {} points at {}", dir.join(name).display(), t.display()),
        )),
        _ => Ok(()),
    }
}

/// Point `NAME` at the device, replacing a stale link atomically (a new
/// link under a temporary name, renamed over the old one).
pub fn link(name: &str, id: u32) -> io::Result<()> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(device(id), &tmp)?;
    std::fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Remove `NAME` if it still points at this device (another daemon may
/// have taken the name since).
pub fn unlink(name: &str, id: u32) {
    let dir = dir();
    if target(&dir, name).is_some_and(|t| t == device(id)) {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_component() {
        for good in ["ct101", "101", "web-1.example", "ct@host", "a:b+c_d"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "ct\n", &"x".repeat(65)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_replace_and_unlink_only_our_own() {
        let tmp = tempfile::tempdir().unwrap();
        // SAFETY of the test: the variable is read only by this module, and
        // no other test in this binary uses it.
        std::env::set_var("UBLK_PLOOP_DEV_LINK_DIR", tmp.path());
        link("ct1", 3).unwrap();
        assert_eq!(std::fs::read_link(tmp.path().join("ct1")).unwrap(), PathBuf::from("/dev/ublkb3"));
        // A stale link (a device that stopped uncleanly) is replaced.
        link("ct1", 4).unwrap();
        assert_eq!(std::fs::read_link(tmp.path().join("ct1")).unwrap(), PathBuf::from("/dev/ublkb4"));
        // Device 3 stopping does not remove the name device 4 holds.
        unlink("ct1", 3);
        assert!(tmp.path().join("ct1").symlink_metadata().is_ok());
        unlink("ct1", 4);
        assert!(tmp.path().join("ct1").symlink_metadata().is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary left");
        std::env::remove_var("UBLK_PLOOP_DEV_LINK_DIR");
    }
}
