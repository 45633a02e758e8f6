//! The one error type of the registry client: a small, stable kind that callers branch on
//! (retry, report as permanent, ask for credentials) plus a message that names the image
//! and says what the user can do.

use std::fmt;
use std::io;

/// What went wrong, in the few classes the importer acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OciErrorKind {
    /// The repository, tag, manifest or blob does not exist.
    NotFound,
    /// The registry wants credentials, or refused the ones given (HTTP 401).
    Unauthorized,
    /// The credentials are valid but lack the right (HTTP 403).
    Denied,
    /// A bad reference, image, manifest or layer, an image without a disk, or a request
    /// the registry refused as malformed; retrying will not help.
    Invalid,
    /// Bytes whose digest (or size) differ from what the manifest or reference promised.
    Digest,
    /// Network trouble, a timeout, HTTP 5xx, 408 or 429: retrying later may help.
    Transient,
}

impl fmt::Display for OciErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OciErrorKind::NotFound => "not found",
            OciErrorKind::Unauthorized => "unauthorized",
            OciErrorKind::Denied => "denied",
            OciErrorKind::Invalid => "invalid",
            OciErrorKind::Digest => "digest mismatch",
            OciErrorKind::Transient => "transient",
        })
    }
}

/// An error of the registry client: a kind and an actionable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OciError {
    kind: OciErrorKind,
    message: String,
}

impl OciError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: OciErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An [`OciErrorKind::Invalid`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(OciErrorKind::Invalid, message)
    }

    /// An [`OciErrorKind::Digest`] error.
    pub fn digest(message: impl Into<String>) -> Self {
        Self::new(OciErrorKind::Digest, message)
    }

    /// An [`OciErrorKind::Transient`] error.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(OciErrorKind::Transient, message)
    }

    /// The class of the error.
    pub fn kind(&self) -> OciErrorKind {
        self.kind
    }

    /// The message alone (what [`fmt::Display`] prints).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying later may help (network trouble, server errors, rate limits).
    pub fn is_transient(&self) -> bool {
        self.kind == OciErrorKind::Transient
    }

    /// The same error with `context` put in front of its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }

    /// The registry error carried inside an I/O error (as [`super::DiskReader`] returns
    /// them), looked for through the chain of sources.
    pub fn from_io(error: &io::Error) -> Option<&OciError> {
        crate::error::find(error.get_ref()?)
    }

    /// This error as an I/O error that still carries it (see [`OciError::from_io`]).
    pub fn into_io(self) -> io::Error {
        let kind = match self.kind {
            OciErrorKind::NotFound => io::ErrorKind::NotFound,
            OciErrorKind::Unauthorized | OciErrorKind::Denied => io::ErrorKind::PermissionDenied,
            OciErrorKind::Invalid | OciErrorKind::Digest => io::ErrorKind::InvalidData,
            OciErrorKind::Transient => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// An I/O error met while reading registry data, kept as the registry error it carries
    /// when it carries one, else classed as network trouble (`Transient`) or bad data.
    pub(crate) fn from_io_error(error: io::Error, what: impl fmt::Display) -> Self {
        if let Some(inner) = Self::from_io(&error) {
            return inner.clone();
        }
        let kind = match error.kind() {
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => OciErrorKind::Invalid,
            io::ErrorKind::UnexpectedEof => OciErrorKind::Invalid,
            _ => OciErrorKind::Transient,
        };
        Self::new(kind, format!("{what}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_survives_a_trip_through_io_error() {
        let e = OciError::digest("layer sha256:ab is corrupt");
        let io = e.clone().into_io();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
        assert_eq!(OciError::from_io(&io), Some(&e));
        let wrapped = io::Error::other(io);
        assert_eq!(OciError::from_io(&wrapped), Some(&e));
        assert_eq!(wrapped.to_string(), "layer sha256:ab is corrupt");
    }

    #[test]
    fn only_transient_errors_are_transient() {
        assert!(OciError::transient("x").is_transient());
        assert!(!OciError::invalid("x").is_transient());
        assert_eq!(
            OciError::invalid("bad")
                .context("docker://a/b:c")
                .to_string(),
            "docker://a/b:c: bad"
        );
    }
}
