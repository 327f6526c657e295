//! One error type for the whole crate. It carries an errno so that the ublk
//! frontend can complete a failed request with the right code, and a
//! human-readable message so the CLI can say what went wrong; callers that
//! must tell one failure from another by more than its errno ask its
//! [`ErrorKind`], never its message text.

use std::fmt;
use std::io;

#[derive(Clone, Debug)]
pub struct Error {
    errno: i32,
    kind: ErrorKind,
    msg: String,
}

/// What a caller may decide on besides the errno, set by the constructor
/// that makes the error and kept through `context`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Nothing beyond the errno.
    #[default]
    Other,
    /// A file opened as a ploop image has no ploop signature (callers
    /// then say what it looks like instead).
    NotPloop,
    /// A descriptor change failed after its rename, and putting the old
    /// one back failed too: either may be the one on disk, so every file
    /// either names must be kept.
    DescriptorUncertain,
    /// Writing or syncing an image opened for writing failed: pages of
    /// the file the writeback held may be lost, whatever a later sync
    /// through another opening says.
    WritebackFailed,
    /// A change refused before it touched anything: a sync of the top
    /// failed earlier, and the device takes no writes until a restart.
    WritesRefused,
    /// A daemon answered no to a request, or none could be reached:
    /// nothing was started (a client may undo what it prepared for it).
    Refused,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        Error { errno, kind: ErrorKind::Other, msg: msg.into() }
    }
    /// Bad input from the caller (a request out of range, a bad argument).
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, msg)
    }
    /// An image whose on-disk structures are inconsistent.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(libc::EUCLEAN, msg)
    }
    /// A structure from a file too large to hold in memory.
    pub fn too_large(what: impl std::fmt::Display, bytes: u64) -> Self {
        Self::new(libc::ENOMEM, format!("{what}: {bytes} bytes of metadata do not fit in memory"))
    }
    /// A file without a ploop signature, opened as ploop (EUCLEAN, as any
    /// damaged image).
    pub fn not_ploop(msg: impl Into<String>) -> Self {
        Error { kind: ErrorKind::NotPloop, ..Self::corrupt(msg) }
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(libc::EOPNOTSUPP, msg)
    }
    pub fn io(err: io::Error, what: impl fmt::Display) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        Self::new(errno, format!("{what}: {err}"))
    }
    pub fn errno(&self) -> i32 {
        self.errno
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.msg
    }
    /// The same error, of kind `kind`.
    pub fn of_kind(self, kind: ErrorKind) -> Self {
        Error { kind, ..self }
    }
    /// Prefix the message with where it happened, keeping the errno.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error { msg: format!("{what}: {}", self.msg), ..self }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        Self::new(errno, err.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(err: nix::Error) -> Self {
        Self::new(err as i32, err.desc())
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        io::Error::new(io::Error::from_raw_os_error(err.errno).kind(), err.msg)
    }
}
