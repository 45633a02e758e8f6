//! The one error type of `dvcr-formats`: a small, stable [`ErrorKind`] that callers branch
//! on, plus a message written for the person who brought the image.
//!
//! Messages say what is wrong with the image and, where there is one, what to do about it
//! ("run `qemu-img check -r all`", "flatten it with `qemu-img convert`").

use std::fmt;
use std::io;

/// What class of problem an [`Error`] is. Stable: callers (the importer's permanent/transient
/// split, the CLI's exit codes) branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading the source failed (transient from the image's point of view).
    Io,
    /// The bytes are not a valid image of the format their magic claims.
    InvalidFormat,
    /// A valid image that uses a feature this project refuses (backing files, encryption...).
    Unsupported,
    /// The image says of itself that it is damaged, or its tables contradict each other.
    Corrupt,
    /// A length, offset or count points outside the image or beyond sane limits.
    OutOfBounds,
    /// The image ends before its own headers or tables do.
    Truncated,
    /// A single pass over a stream cannot reach bytes the image needs; random access would.
    NeedsRandomAccess,
    /// Internal to streaming probes: bytes at this range have not been seen yet.
    #[doc(hidden)]
    Pending,
}

/// An error with a stable [`ErrorKind`] and a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// For [`ErrorKind::Pending`]: the byte range the parser asked for.
    pending: Option<(u64, usize)>,
    #[source]
    source: Option<io::Error>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl Error {
    /// An error of `kind` with a message for the user.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            pending: None,
            source: None,
        }
    }

    /// A read failure, with what was being read.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            message: context.into(),
            pending: None,
            source: Some(source),
        }
    }

    pub(crate) fn pending(offset: u64, len: usize) -> Self {
        Self {
            kind: ErrorKind::Pending,
            message: format!("bytes {offset}..+{len} have not been read yet"),
            pending: Some((offset, len)),
            source: None,
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn pending_range(&self) -> Option<(u64, usize)> {
        self.pending
    }

    /// True for problems with the image itself (retrying cannot help); false for I/O errors.
    pub fn is_permanent(&self) -> bool {
        !matches!(self.kind, ErrorKind::Io | ErrorKind::Pending)
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an error of the given kind with `format!` arguments.
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}
pub(crate) use err;
