//! Random access to an image's metadata, whatever the image comes from.
//!
//! Header parsers never do I/O of their own: they ask a [`View`] for the bytes at an offset.
//! A [`SliceView`] answers from memory (tests, fuzzing), a [`FileView`] with `pread`, and the
//! streaming probe ([`crate::probe::StreamProbe`]) from what it kept of a single pass. The
//! streaming view answers "not read yet" for bytes still ahead in the stream; the probe then
//! keeps them when they pass by and runs the parser again.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, ErrorKind, Result, err};

/// The most one parser read may ask for. Image headers and the tables a probe reads are
/// far smaller; a larger request means an untrusted length went unchecked.
pub const MAX_READ: usize = 4 << 20;

/// Random access to the bytes of an image (after any compression was unwrapped).
pub trait View {
    /// The image's length in bytes. A streaming view that has not reached the end yet
    /// answers `u64::MAX`.
    fn len(&self) -> u64;

    /// Whether the length is the real one (false while a stream is still being read).
    fn len_known(&self) -> bool {
        self.len() != u64::MAX
    }

    /// Whether the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether reads are cheap (a local file or memory) rather than a network round trip
    /// each: decoders read tables up front only from cheap views, and use others only
    /// where the alternative is spilling to scratch.
    fn cheap(&self) -> bool {
        true
    }

    /// Exactly `len` bytes at `offset`, or an error naming `what` was being read.
    /// Reading past the end is a [`ErrorKind::Truncated`] error.
    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>>;
}

/// Checks a read request against the view's length and the read limit.
pub fn check_range(view_len: u64, offset: u64, len: usize, what: &str) -> Result<()> {
    if len > MAX_READ {
        return Err(err!(
            OutOfBounds,
            "{what} would need {len} bytes of metadata, more than the {MAX_READ} allowed: the image is damaged or hostile"
        ));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= view_len => Ok(()),
        Some(end) => Err(err!(
            Truncated,
            "the image is truncated: {what} needs bytes {offset}..{end} but the image ends at byte {view_len}; download it again"
        )),
        None => Err(err!(
            OutOfBounds,
            "{what} lies at offset {offset}, beyond any possible image"
        )),
    }
}

impl<T: View + ?Sized> View for Box<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }

    fn cheap(&self) -> bool {
        (**self).cheap()
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        (**self).read(offset, len, what)
    }
}

/// A view of bytes in memory.
#[derive(Debug, Clone, Copy)]
pub struct SliceView<'a>(pub &'a [u8]);

impl View for SliceView<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        check_range(self.len(), offset, len, what)?;
        let start = offset as usize;
        Ok(Cow::Borrowed(&self.0[start..start + len]))
    }
}

/// A view of a regular file or block device, read with `pread`.
#[derive(Debug)]
pub struct FileView {
    file: File,
    len: u64,
}

impl FileView {
    /// Wraps an open file whose length is `len` bytes.
    pub fn new(file: File, len: u64) -> Self {
        Self { file, len }
    }
}

impl View for FileView {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        check_range(self.len, offset, len, what)?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(format!("reading {what} at offset {offset}"), e))?;
        Ok(Cow::Owned(buf))
    }
}

/// Typed little- and big-endian field access on a header buffer, with every access
/// bounds-checked: a short buffer is a [`ErrorKind::Truncated`] error, never a panic.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

macro_rules! field_fns {
    ($($name:ident: $ty:ty = $conv:ident;)*) => {$(
        #[doc = concat!("The `", stringify!($ty), "` at byte `at` (", stringify!($conv), ").")]
        pub fn $name(&self, at: usize) -> Result<$ty> {
            Ok(<$ty>::$conv(self.array(at)?))
        }
    )*};
}

impl<'a> Fields<'a> {
    /// Field access over `bytes`, which hold `what` (named in errors).
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    /// `N` bytes at `at`.
    pub fn array<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        self.bytes
            .get(at..at.saturating_add(N))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Truncated,
                    format!("the image is truncated inside its {}", self.what),
                )
            })
    }

    /// `len` bytes at `at`.
    pub fn slice(&self, at: usize, len: usize) -> Result<&'a [u8]> {
        self.bytes.get(at..at.saturating_add(len)).ok_or_else(|| {
            Error::new(
                ErrorKind::Truncated,
                format!("the image is truncated inside its {}", self.what),
            )
        })
    }

    /// The byte at `at`.
    pub fn u8(&self, at: usize) -> Result<u8> {
        Ok(self.array::<1>(at)?[0])
    }

    field_fns! {
        u16_le: u16 = from_le_bytes;
        u32_le: u32 = from_le_bytes;
        u64_le: u64 = from_le_bytes;
        u16_be: u16 = from_be_bytes;
        u32_be: u32 = from_be_bytes;
        u64_be: u64 = from_be_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_view_reports_reads_past_the_end_as_truncation() {
        let data = [0u8; 16];
        let view = SliceView(&data);
        let error = view.read(8, 16, "the header").err().map(|e| e.kind());
        assert_eq!(error, Some(ErrorKind::Truncated));
        assert_eq!(view.read(8, 8, "the header").map(|b| b.len()).ok(), Some(8));
    }

    #[test]
    fn slice_view_refuses_reads_above_the_metadata_limit() {
        let data = [0u8; 16];
        let error = SliceView(&data)
            .read(0, MAX_READ + 1, "a table")
            .err()
            .map(|e| e.kind());
        assert_eq!(error, Some(ErrorKind::OutOfBounds));
    }

    #[test]
    fn offsets_that_overflow_are_out_of_bounds_not_a_panic() {
        let error = check_range(100, u64::MAX - 2, 8, "a table")
            .err()
            .map(|e| e.kind());
        assert_eq!(error, Some(ErrorKind::OutOfBounds));
    }

    #[test]
    fn fields_read_both_endiannesses_and_refuse_short_buffers() {
        let bytes = [0x01, 0x02, 0x03, 0x04];
        let f = Fields::new(&bytes, "test header");
        assert_eq!(f.u32_be(0).ok(), Some(0x0102_0304));
        assert_eq!(f.u32_le(0).ok(), Some(0x0403_0201));
        assert_eq!(f.u16_be(2).ok(), Some(0x0304));
        assert_eq!(
            f.u32_le(1).err().map(|e| e.kind()),
            Some(ErrorKind::Truncated)
        );
        assert_eq!(
            f.u64_le(usize::MAX - 2).err().map(|e| e.kind()),
            Some(ErrorKind::Truncated)
        );
    }
}
