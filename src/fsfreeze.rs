//! Freezing the filesystem mounted on a device for the last pass of a
//! copy, as ploop does: the filesystem writes out its dirty state and
//! stops changing, so the copy holds a consistent filesystem.

use std::fs::File;
use std::os::fd::AsRawFd;

use ublk_ploop::copy::FsFreeze;
use ublk_ploop::{Error, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Freezes whatever is mounted from `device` (nothing if nothing is).
pub struct MountFreeze {
    device: String,
    frozen: Option<(String, File)>,
    /// Where a filesystem was frozen, once it was.
    pub froze: Option<String>,
}

impl MountFreeze {
    pub fn new(device: &str) -> MountFreeze {
        MountFreeze { device: device.to_string(), frozen: None, froze: None }
    }
}

impl FsFreeze for MountFreeze {
    fn freeze(&mut self) -> Result<()> {
        let Some(on) = crate::daemon::mount_point(&self.device) else { return Ok(()) };
        let dir = File::open(&on).map_err(|e| Error::io(e, format_args!("opening {on} to freeze it")))?;
        let mut arg = 0;
        // SAFETY: FIFREEZE on a directory of the filesystem; the argument is unused.
        unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }.map_err(|e| {
            Error::new(e as i32, format!("cannot freeze the filesystem on {on} ({e}); the copy would not be consistent"))
        })?;
        tracing::info!("froze the filesystem on {on}");
        self.froze = Some(on.clone());
        self.frozen = Some((on, dir));
        Ok(())
    }

    fn thaw(&mut self) -> Result<()> {
        let Some((on, dir)) = self.frozen.take() else { return Ok(()) };
        let mut arg = 0;
        // SAFETY: as above.
        unsafe { fithaw(dir.as_raw_fd(), &mut arg) }.map_err(|e| Error::new(e as i32, format!("cannot thaw the filesystem on {on}: {e}")))?;
        tracing::info!("thawed the filesystem on {on}");
        Ok(())
    }
}

impl Drop for MountFreeze {
    fn drop(&mut self) {
        // Never leave a filesystem frozen behind an error.
        let _ = self.thaw();
    }
}
