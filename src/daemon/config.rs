//! A device's configuration: what the daemon serves and how, stored with
//! the device for `recover`; and the per-instance TOML file read by
//! `ublk-ploop serve` (the systemd unit's entry point).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ublk_ploop::disk::{Disk, Guid};
use ublk_ploop::io::{block_on, Direct, SyncIo};
use ublk_ploop::layers::Format;
use ublk_ploop::{Error, LayerSpec, Result};

use crate::ublk_control::{parse_io_scheduler, DEFAULT_IO_SCHEDULER};

/// Everything needed to (re)create a device; stored with the device so
/// that `recover` can rebuild it after the daemon died.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Layer images, bottom first, absolute paths. For a disk directory,
    /// the chain when the device started (the descriptor rules).
    #[serde(deserialize_with = "layer_specs")]
    pub images: Vec<LayerSpec>,
    /// The disk directory served, whose descriptor names the layers: a
    /// restarted daemon follows it (snapshots taken meanwhile included).
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The snapshot a read-only snapshot device serves.
    #[serde(default)]
    pub snapshot: Option<Guid>,
    pub queues: u16,
    pub depth: u16,
    pub read_only: bool,
    #[serde(with = "direct_serde")]
    pub direct: Direct,
    /// Group allowed on the control socket (numeric gid).
    pub socket_gid: Option<u32>,
    /// Move request data through the daemon's memory even where the
    /// kernel offers zero copy (to compare the two).
    #[serde(default)]
    pub copy_mode: bool,
    /// Block-layer I/O scheduler set on the device once it is live.
    #[serde(default = "crate::ublk_control::default_io_scheduler")]
    pub io_scheduler: String,
    /// The device's stable name: `/dev/ublk-ploop/NAME` while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Acknowledge copy-ups before their sync, through a link log in
    /// `LINK_DIR` (see `layers::ploop::links`): always, never, or (None)
    /// wherever that directory is on tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_log: Option<bool>,
    /// The link log directory this device's daemon kept its log in (see
    /// `link_dir_identity`): a successor must find the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_dir_id: Option<String>,
}

/// Where link logs live: tmpfs, so a power cut empties it and a killed
/// daemon's successor finds its log.
pub const LINK_DIR: &str = "/run/ublk-ploop/links";

/// `LINK_DIR`, or for tests the directory `UBLK_PLOOP_LINK_DIR` names.
pub fn link_dir_path() -> PathBuf {
    std::env::var_os("UBLK_PLOOP_LINK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(LINK_DIR))
}

/// Make the link log directory and refuse one that a power cut would not
/// empty: a log there would outlive the copies it links. Its files are
/// root's; others may search it (not list it), so that a command run by
/// another user is refused only an image whose log holds records.
pub fn link_dir() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = link_dir_path();
    // The parent as the control sockets' code makes it (others may search
    // it to reach a socket their group is allowed).
    let parent = dir.parent().unwrap_or(&dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(e, parent.display()))?;
    if !ublk_ploop::io::Io::is_volatile_dir(&SyncIo, parent).map_err(|e| Error::io(e, parent.display()))? {
        return Err(Error::invalid(format!("{}: not on tmpfs, so it cannot hold link logs (serve without --link-log)", parent.display())));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&dir).map_err(|e| Error::io(e, dir.display()))?;
    // Made 0700 by an earlier version.
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
    Ok(dir)
}

/// Which directory `dir` is: its filesystem, inode and birth time. A tmpfs
/// mounted again (a container's /run after a restart), or the directory
/// made again, is another one, whose logs are gone.
pub fn link_dir_identity(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    let born = m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Some(format!("{:x}-{:x}-{born:x}", m.dev(), m.ino()))
}

/// A daemon taking over a device whose killed daemon kept a link log in
/// the directory `stored` names must find that directory in `dir`: else
/// the copy-ups it acknowledged since the last flush are gone, and serving
/// on would hide that from the filesystem on the device.
pub fn check_link_dir_kept(stored: &str, dir: &Path, id: u32) -> Result<()> {
    match link_dir_identity(dir) {
        Some(now) if now == stored => Ok(()),
        _ => Err(Error::new(
            libc::ESTALE,
            format!(
                "device {id}: its daemon kept a link log in {}, and that directory is not the one it used (the tmpfs was \
                 mounted or made again): the writes into snapshot clusters it acknowledged since the last flush are lost. \
                 Remove the device (del -n {id} --force) and add it again, and check the filesystem on it",
                dir.display()
            ),
        )),
    }
}

impl DeviceConfig {
    /// True when this device serves a disk directory read-write: it holds
    /// ploop's lock on the disk for its whole life.
    pub fn locks_disk(&self) -> bool {
        self.disk.is_some() && !self.read_only && self.snapshot.is_none()
    }

    /// The layers to open now: the descriptor's chain for a disk directory
    /// (served read-write only if its top is the disk's own file), read
    /// from `locked` (the disk under the device's lock) when it locks one.
    pub fn layers(&self, locked: Option<&Disk>) -> Result<Vec<LayerSpec>> {
        match (&self.disk, locked) {
            (Some(_), Some(disk)) if self.locks_disk() => block_on(disk.writable_layers(&SyncIo)),
            (Some(dir), _) => Disk::load(dir)?.layers(self.snapshot),
            (None, _) => Ok(self.images.clone()),
        }
    }

    /// Checks for a new device (not a recovery, which serves on what it
    /// served): an image file served read-write on its own keeps the rules
    /// of the disk whose descriptor names it.
    pub fn check_new(&self) -> Result<()> {
        match (&self.disk, self.read_only, self.images.last()) {
            (None, false, Some(top)) => ublk_ploop::disk::resolve::check_served_alone(&top.path),
            _ => Ok(()),
        }
    }
}

/// Layer lists as stored by earlier versions (plain paths) or now.
fn layer_specs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<LayerSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Path(PathBuf),
        Spec(LayerSpec),
    }
    let v: Vec<Stored> = Deserialize::deserialize(d)?;
    Ok(v.into_iter()
        .map(|s| match s {
            Stored::Path(p) => LayerSpec::ploop(p),
            Stored::Spec(s) => s,
        })
        .collect())
}

mod direct_serde {
    use super::Direct;
    pub fn serialize<S: serde::Serializer>(d: &Direct, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match d {
            Direct::Auto => "auto",
            Direct::On => "on",
            Direct::Off => "off",
        })
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Direct, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}


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
    /// Format of `image`/`images`: ploop (default), raw or qcow2.
    pub format: Option<String>,
    /// One format per entry of `images`, in order (a QCOW2 base under a
    /// ploop top: `["qcow2", "ploop"]`).
    pub formats: Option<Vec<String>>,
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
    /// The device's stable name, `/dev/ublk-ploop/NAME` (default: the
    /// config file's name without `.toml`, the systemd unit's instance).
    pub name: Option<String>,
    /// Copy-ups acknowledged before their sync, with a link log on tmpfs
    /// (unset: wherever /run is a tmpfs).
    pub link_log: Option<bool>,
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
    let formats: Vec<Format> = match (file.format, file.formats) {
        (Some(_), Some(_)) => return Err(bad("set either `format` or `formats`, not both".into())),
        (Some(one), None) => vec![one.parse::<Format>().map_err(|e| bad(format!("format: {e}")))?],
        (None, Some(many)) => many.iter().map(|f| f.parse::<Format>().map_err(|e| bad(format!("formats: {e}")))).collect::<Result<_>>()?,
        (None, None) => Vec::new(),
    };
    let snapshot = file.snapshot.as_deref().map(|g| g.parse::<Guid>().map_err(|e| bad(format!("snapshot: {e}")))).transpose()?;
    if file.disk.is_some() && !Disk::is_disk(&images[0]) {
        return Err(bad(format!("disk: {} holds no {}", images[0].display(), ublk_ploop::disk::DESCRIPTOR)));
    }
    let resolved = ublk_ploop::disk::resolve::layers(&images, &formats, snapshot).map_err(|e| e.context(path.display()))?;
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
            Some(s) => parse_io_scheduler(&s).map_err(|e| bad(format!("io_scheduler: {e}")))?,
            None => DEFAULT_IO_SCHEDULER.to_string(),
        },
        name: Some(match file.name {
            Some(n) => n,
            None => path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string(),
        }),
        link_log: file.link_log,
        link_dir_id: None,
    };
    if let Some(n) = &config.name {
        crate::daemon::devlink::validate(n).map_err(|e| bad(format!("name: {e}")))?;
    }
    config.check_new().map_err(|e| e.context(path.display()))?;
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
    if name.contains('\0') {
        return Err(Error::invalid("group name contains a NUL byte"));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(Error::invalid(format!("unknown group '{name}'"))),
    }
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

    /// Unset, the link log follows /run; set, it is asked for or refused.
    /// A device stored by an earlier version (a plain `false`) stays without.
    #[test]
    fn the_link_log_is_unset_unless_named() {
        let img = write("l.img", "x");
        for (text, want) in [("", None), ("link_log = true\n", Some(true)), ("link_log = false\n", Some(false))] {
            let cfg = write("links.toml", &format!("image = {img:?}\n{text}"));
            assert_eq!(load(&cfg).unwrap().0.link_log, want, "{text:?}");
        }
        let stored = format!(r#"{{"images":[{img:?}],"queues":1,"depth":64,"read_only":false,"direct":"auto","link_log":false}}"#);
        let c: DeviceConfig = serde_json::from_str(&stored).unwrap();
        assert_eq!(c.link_log, Some(false));
        let c: DeviceConfig = serde_json::from_str(&stored.replace(r#","link_log":false"#, "")).unwrap();
        assert_eq!(c.link_log, None);
    }

    /// A successor finds the directory its predecessor used, or refuses.
    #[test]
    fn a_link_dir_made_again_is_not_the_one_kept() {
        let dir = std::env::temp_dir().join(format!("ublk-ploop-cfg-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kept = link_dir_identity(&dir).unwrap();
        check_link_dir_kept(&kept, &dir, 3).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        let gone = check_link_dir_kept(&kept, &dir, 3).unwrap_err();
        assert_eq!(gone.errno(), libc::ESTALE, "{gone}");
        // Made again: another inode (and birth time), the same path.
        let other = dir.with_extension("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        assert!(check_link_dir_kept(&kept, &dir, 3).unwrap_err().to_string().contains("del -n 3"));
        let _ = (std::fs::remove_dir(&dir), std::fs::remove_dir(&other));
    }

    #[test]
    fn reads_one_format_per_image() {
        let (a, b) = (write("q.qcow2", "x"), write("t.hds", "x"));
        let cfg = write("formats.toml", &format!("images = [{a:?}, {b:?}]\nformats = [\"qcow2\", \"ploop\"]\n"));
        let (c, _) = load(&cfg).unwrap();
        assert_eq!(c.images.iter().map(|l| l.format).collect::<Vec<_>>(), [Format::Qcow2, Format::Ploop]);
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
            ("ff.toml", format!("images = [{img:?}]\nformat = \"raw\"\nformats = [\"raw\"]\n"), "not both"),
            ("fn.toml", format!("images = [{img:?}, {img:?}]\nformats = [\"raw\", \"raw\", \"raw\"]\n"), "one per image"),
            ("fq.toml", format!("images = [{img:?}]\nformats = [\"qcow3\"]\n"), "unknown format"),
        ] {
            let err = load(&write(name, &text)).err().unwrap_or_else(|| panic!("{name} accepted"));
            assert!(err.message().contains(needle), "{name}: {err}");
        }
    }
}
