//! Opening image files: O_DIRECT when the filesystem allows it, and the
//! alignment that O_DIRECT transfers must then respect.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether image files bypass the host page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direct {
    /// O_DIRECT, or buffered I/O with a logged warning where refused.
    #[default]
    Auto,
    /// O_DIRECT or fail: data is never cached twice.
    On,
    /// Buffered I/O (tests on filesystems without O_DIRECT, debugging).
    Off,
}

impl std::str::FromStr for Direct {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Direct::Auto),
            "on" | "yes" | "true" => Ok(Direct::On),
            "off" | "no" | "false" => Ok(Direct::Off),
            _ => Err(format!("'{s}': expected auto, on or off")),
        }
    }
}

/// An open image file and how it must be accessed.
#[derive(Debug)]
pub struct ImageFile {
    pub file: File,
    pub path: PathBuf,
    pub writable: bool,
    pub direct: bool,
    /// Offsets and lengths of every transfer must be multiples of this.
    pub block_size: u32,
}

impl ImageFile {
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| Error::io(e, self.path.display()))?.len())
    }
}

/// True when `[at, at+len)` of the file holds no data blocks (a punched or
/// never written range).
pub fn is_hole(fd: RawFd, at: u64, len: u64) -> bool {
    // SAFETY: plain syscall on a descriptor the caller owns.
    let next = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    next < 0 || next as u64 >= at + len
}

/// Open a file a descriptor or a command line named, for reading (and
/// writing with `write`). It is opened without blocking, so a FIFO or a
/// device planted under the name cannot hang the command, and refused
/// unless it is a regular file (or a block device where `block_ok`:
/// a raw layer may be one). `extra` adds open flags (O_DIRECT,
/// O_NOFOLLOW); the non-blocking flag is cleared again before returning,
/// since io_uring would take it as a request for non-blocking I/O.
pub fn open_named(path: &Path, write: bool, extra: i32, block_ok: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(extra | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(kind.is_file() || (block_ok && kind.is_block_device())) {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}, not an image or descriptor file; refused")));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

pub fn open_image_file(path: &Path, writable: bool, direct: Direct) -> Result<ImageFile> {
    // A file is written only through its own name, never through a symlink
    // (which could lead anywhere); reading through one is fine.
    let nofollow = if writable { libc::O_NOFOLLOW } else { 0 };
    let open = |flags: i32| open_named(path, writable, flags | nofollow, true);
    let (file, is_direct) = match direct {
        Direct::Off => (open(0), false),
        Direct::On | Direct::Auto => match open(libc::O_DIRECT) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct == Direct::Auto => {
                tracing::warn!(
                    path = %path.display(),
                    "filesystem refuses O_DIRECT; using buffered I/O, so image data is also cached by the host"
                );
                (open(0), false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("{}: the filesystem does not support O_DIRECT (use --direct=off to allow buffered I/O)", path.display()),
                ))
            }
            other => (other, true),
        },
    };
    let file = file.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) if writable => Error::new(
            libc::ELOOP,
            format!("{}: is a symbolic link; an image is written only through its own name, never through a link", path.display()),
        ),
        _ => Error::io(e, path.display()),
    })?;
    let block_size = if is_direct { dio_alignment(&file) } else { 512 };
    Ok(ImageFile { file, path: path.to_path_buf(), writable, direct: is_direct, block_size })
}

/// The O_DIRECT offset alignment the kernel reports (statx DIOALIGN), at
/// least one sector; 4096 when the kernel cannot tell, which is always safe.
fn dio_alignment(file: &File) -> u32 {
    // SAFETY: statx fills the zeroed struct; the path is empty and
    // AT_EMPTY_PATH makes it describe the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx)
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        stx.stx_dio_offset_align.max(512)
    } else {
        4096
    }
}
