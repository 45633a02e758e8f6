//! The importer's error: a small stable kind, whether retrying can help, and a message a
//! user can act on (the whole cause chain, flattened once here so every caller prints the
//! same words).

use std::fmt;

/// What part of an import failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The job was configured wrongly (a bad URL, a missing variable, a size too small).
    Config,
    /// Fetching the source failed.
    Source,
    /// The bytes do not match the checksum the user gave.
    Checksum,
    /// The image is damaged, unsupported or unsafe.
    Image,
    /// Writing the destination (registry or disk) failed.
    Destination,
}

impl ErrorKind {
    /// A short stable name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Source => "source",
            ErrorKind::Checksum => "checksum",
            ErrorKind::Image => "image",
            ErrorKind::Destination => "destination",
        }
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub struct ImportError {
    /// What failed.
    pub kind: ErrorKind,
    /// Whether running the job again may succeed (network trouble, a registry restarting),
    /// as opposed to failing the same way (bad checksum, unsupported image).
    pub transient: bool,
    message: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The messages of `e` and its causes on one line, joined with ": ", skipping a cause whose
/// message an earlier one already quotes. The one way errors are shown on a line in this
/// project (job results, logs, the CLI).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(e);
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = cause(err);
    }
    parts.join(": ")
}

/// The error behind `e`. `io::Error::source` skips the error an `io::Error` wraps (it
/// returns that error's source), so an `io::Error` is looked into instead.
pub(crate) fn cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match e.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        None => e.source(),
    }
}

impl ImportError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, transient: bool, message: impl Into<String>) -> Self {
        Self {
            kind,
            transient,
            message: message.into(),
        }
    }

    /// A permanent configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, false, message)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Classifies an error from decoding or probing. A checksum mismatch or a broken
    /// download surfaces here as the reader's error inside the decoder's.
    pub fn from_formats(e: dvcr_formats::Error) -> Self {
        use dvcr_formats::ErrorKind as K;
        let message = chain(&e);
        if crate::checksum::find_mismatch(&e).is_some() {
            return Self::new(ErrorKind::Checksum, false, message);
        }
        if let Some(source) = find::<crate::SourceError>(&e) {
            return Self::new(ErrorKind::Source, source.is_transient(), message);
        }
        if let Some(oci) = find::<crate::oci::OciError>(&e) {
            return Self::new(ErrorKind::Source, oci.is_transient(), message);
        }
        match e.kind() {
            K::Io => Self::new(ErrorKind::Source, true, message),
            _ => Self::new(ErrorKind::Image, false, message),
        }
    }

    /// Classifies a source error.
    pub fn from_source(e: crate::SourceError) -> Self {
        let transient = e.is_transient();
        Self::new(ErrorKind::Source, transient, chain(&e))
    }

    /// Classifies a registry error, on the source side or the destination side.
    pub fn from_oci(e: crate::oci::OciError, kind: ErrorKind) -> Self {
        let transient = e.is_transient();
        Self::new(kind, transient, chain(&e))
    }

    /// A failure writing the destination; I/O trouble is worth a retry.
    pub fn destination(e: &(dyn std::error::Error + 'static)) -> Self {
        if crate::checksum::find_mismatch(e).is_some() {
            return Self::new(ErrorKind::Checksum, false, chain(e));
        }
        // A registry that refuses the push (400, 413, denied) refuses it again on retry.
        if let Some(oci) = find::<crate::oci::OciError>(e) {
            return Self::new(ErrorKind::Destination, oci.is_transient(), chain(e));
        }
        if let Some(io) = find::<std::io::Error>(e)
            && let Some(oci) = crate::oci::OciError::from_io(io)
        {
            return Self::new(ErrorKind::Destination, oci.is_transient(), chain(e));
        }
        Self::new(ErrorKind::Destination, true, chain(e))
    }
}

/// Finds an error of type `T` in the chain of `e`, looking inside `io::Error`s too.
pub fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        current = cause(err);
    }
    None
}
