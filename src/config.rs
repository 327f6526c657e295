//! The per-instance TOML configuration read by `ublk-ploop serve`
//! (the systemd unit's entry point).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use ublk_ploop::disk::{Disk, Guid};
use ublk_ploop::io::Direct;
use ublk_ploop::layers::Format;
use ublk_ploop::{Error, Result};

use crate::daemon::DeviceConfig;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A ploop disk directory (or its DiskDescriptor.xml): its descriptor
    /// names the layers, and a restarted daemon follows it.
    pub disk: Option<PathBuf>,
    /// Serve this snapshot of `disk`, read-only.
    pub snapshot: Option<String>,
    /// One image file, or use `images` for a stack (bottom first).
    pub image: Option<PathBuf>,
    pub images: Option<Vec<PathBuf>>,
    /// Format of `image`/`images`: ploop (default) or raw.
    pub format: Option<String>,
    /// Fixed device id: needed for recovery after a crash.
    pub id: Option<u32>,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    #[serde(default)]
    pub read_only: bool,
    pub direct: Option<String>,
    /// Group (name or number) allowed to use the control socket.
    pub socket_group: Option<String>,
    /// Request data through the daemon's buffers even where zero copy is offered.
    #[serde(default)]
    pub copy_mode: bool,
    /// Block-layer I/O scheduler of the device (`none` unless set; `kernel`
    /// keeps the kernel's choice).
    pub io_scheduler: Option<String>,
}

pub const DEFAULT_QUEUES: u16 = 1;
pub const DEFAULT_DEPTH: u16 = 128;

pub fn load(path: &Path) -> Result<(DeviceConfig, Option<u32>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(e, path.display()))?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    let bad = |msg: String| Error::invalid(format!("{}: {msg}", path.display()));
    let images = match (&file.disk, file.image, file.images) {
        (Some(dir), None, None) => vec![dir.clone()],
        (Some(_), _, _) => return Err(bad("set `disk`, or `image`/`images`, not both".into())),
        (None, Some(one), None) => vec![one],
        (None, None, Some(many)) if !many.is_empty() => many,
        (None, Some(_), Some(_)) => return Err(bad("set either `image` or `images`, not both".into())),
        _ => return Err(bad("no `disk`, `image` or `images` given".into())),
    };
    let format = file.format.as_deref().map(|f| f.parse::<Format>().map_err(|e| bad(format!("format: {e}")))).transpose()?;
    let snapshot = file.snapshot.as_deref().map(|g| g.parse::<Guid>().map_err(|e| bad(format!("snapshot: {e}")))).transpose()?;
    if file.disk.is_some() && !Disk::is_disk(&images[0]) {
        return Err(bad(format!("disk: {} holds no {}", images[0].display(), ublk_ploop::disk::DESCRIPTOR)));
    }
    let resolved = ublk_ploop::disk::resolve::layers(&images, format, snapshot).map_err(|e| e.context(path.display()))?;
    let direct = match file.direct.as_deref() {
        None => Direct::Auto,
        Some(s) => s.parse().map_err(|e: String| Error::invalid(format!("{}: direct: {e}", path.display())))?,
    };
    let config = DeviceConfig {
        images: resolved.layers,
        disk: resolved.disk,
        snapshot,
        queues: validate_queues(file.queues.unwrap_or(DEFAULT_QUEUES))?,
        depth: validate_depth(file.depth.unwrap_or(DEFAULT_DEPTH))?,
        read_only: file.read_only || snapshot.is_some(),
        direct,
        socket_gid: file.socket_group.as_deref().map(group_id).transpose()?,
        copy_mode: file.copy_mode,
        io_scheduler: match file.io_scheduler {
            Some(s) => crate::daemon::parse_io_scheduler(&s).map_err(|e| bad(format!("io_scheduler: {e}")))?,
            None => crate::daemon::DEFAULT_IO_SCHEDULER.to_string(),
        },
    };
    Ok((config, file.id))
}

pub fn validate_queues(q: u16) -> Result<u16> {
    if q == 0 || q > 64 {
        return Err(Error::invalid(format!("queues must be between 1 and 64, not {q}")));
    }
    Ok(q)
}

pub fn validate_depth(d: u16) -> Result<u16> {
    if d == 0 || d > 4096 {
        return Err(Error::invalid(format!("depth must be between 1 and 4096, not {d}")));
    }
    Ok(d)
}

/// A group name or number to a gid.
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = std::ffi::CString::new(name).map_err(|_| Error::invalid("group name contains a NUL byte"))?;
    // SAFETY: getgrnam returns a pointer into static storage or null; we copy
    // the gid out at once and call it from one thread at startup.
    let entry = unsafe { libc::getgrnam(cname.as_ptr()) };
    if entry.is_null() {
        return Err(Error::invalid(format!("unknown group '{name}'")));
    }
    Ok(unsafe { (*entry).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ublk-ploop-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_a_full_config() {
        let img = write("a.img", "x");
        let cfg = write("full.toml", &format!("image = {:?}\nid = 7\nqueues = 2\ndepth = 64\ndirect = \"off\"\nsocket_group = \"0\"\n", img));
        let (c, id) = load(&cfg).unwrap();
        assert_eq!(id, Some(7));
        assert_eq!((c.queues, c.depth, c.direct, c.socket_gid), (2, 64, Direct::Off, Some(0)));
        assert!(c.images[0].path.is_absolute());
    }

    #[test]
    fn refuses_bad_configs() {
        let img = write("b.img", "x");
        for (name, text, needle) in [
            ("none.toml", "id = 1\n".to_string(), "no `disk`"),
            ("typo.toml", format!("image = {img:?}\nqueus = 2\n"), "unknown field"),
            ("q.toml", format!("image = {img:?}\nqueues = 0\n"), "queues"),
            ("d.toml", format!("image = {img:?}\ndirect = \"maybe\"\n"), "direct"),
            ("g.toml", format!("image = {img:?}\nsocket_group = \"no-such-group-here\"\n"), "unknown group"),
            ("m.toml", "image = \"/nonexistent/x.img\"\n".to_string(), "nonexistent"),
        ] {
            let err = load(&write(name, &text)).err().unwrap_or_else(|| panic!("{name} accepted"));
            assert!(err.message().contains(needle), "{name}: {err}");
        }
    }
}
