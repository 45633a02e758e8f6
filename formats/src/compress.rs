//! Compression wrappers around disk images: gzip (multi-member), xz (multi-stream), zstd
//! (multi-frame, skippable frames) and bzip2 (multi-stream), possibly nested.
//!
//! Users download `*.img.gz` and `*.qcow2.xz` from vendor sites; the platform stores what is
//! inside. Detection looks only at the first bytes of the stream; unwrapping is streaming
//! with large buffers, so memory stays flat whatever the image size.

use std::fmt;
use std::io::{self, BufReader, Read};

use crate::error::{Error, Result, err};

/// Bytes needed to recognise any wrapper.
pub const MAGIC_LEN: usize = 16;

/// How many wrappers deep [`unwrap`] goes before giving up (`.gz` inside `.xz` inside...).
pub const MAX_NESTING: usize = 4;

/// Read buffer for the compressed side of each decoder.
const DECODER_BUFFER: usize = 1 << 20;

/// A compression wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (RFC 1952), any number of members.
    Gzip,
    /// xz (LZMA2), any number of streams.
    Xz,
    /// Zstandard, any number of frames, skippable frames allowed.
    Zstd,
    /// bzip2, any number of streams.
    Bzip2,
}

impl Compression {
    /// The usual name, as in the `gzip`, `xz`, `zstd` and `bzip2` commands.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names the wrapper whose magic starts `head`, if any.
///
/// The checks are tighter than the bare magic where the format allows, so that a raw disk
/// whose first sector happens to start with `1f 8b` is not taken for gzip.
pub fn detect(head: &[u8]) -> Option<Compression> {
    // gzip: ID1 ID2, CM = 8 (deflate), reserved FLG bits clear.
    if head.len() >= 4 && head[0] == 0x1f && head[1] == 0x8b && head[2] == 8 && head[3] & 0xe0 == 0
    {
        return Some(Compression::Gzip);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Some(Compression::Xz);
    }
    if head.len() >= 4 {
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        // A zstd frame, or a skippable frame (0x184D2A50..=0x184D2A5F) in front of one.
        if magic == 0xFD2F_B528 || magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            return Some(Compression::Zstd);
        }
    }
    // bzip2: "BZh" + block size digit + the block magic (pi) or the end-of-stream magic.
    if head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && (head[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
            || head[4..10] == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
    {
        return Some(Compression::Bzip2);
    }
    None
}

/// A reader that hands back bytes it already peeked at, then continues with the inner reader.
#[derive(Debug)]
pub struct Prefixed<R> {
    prefix: Vec<u8>,
    pos: usize,
    inner: R,
}

impl<R: Read> Prefixed<R> {
    /// Reads up to `n` bytes from `inner` (fewer only at end of stream) so they can be
    /// inspected with [`Prefixed::peeked`] before being read again.
    pub fn peek(mut inner: R, n: usize) -> io::Result<Self> {
        let mut prefix = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            match inner.read(&mut prefix[filled..]) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        prefix.truncate(filled);
        Ok(Self {
            prefix,
            pos: 0,
            inner,
        })
    }

    /// The peeked bytes.
    pub fn peeked(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }
}

impl<R: Read> Read for Prefixed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// A boxed reader that can move to a blocking worker thread.
pub type BoxRead = Box<dyn Read + Send>;

/// Wraps `reader` in the decoder for `compression`.
pub fn decoder(compression: Compression, reader: BoxRead) -> BoxRead {
    let buffered = BufReader::with_capacity(DECODER_BUFFER, reader);
    match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buffered)),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(buffered) {
            Ok(d) => Box::new(d),
            // Creating a zstd context only fails when memory is exhausted: report it on read.
            Err(e) => Box::new(FailingReader(Some(e))),
        },
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
    }
}

#[derive(Debug)]
struct FailingReader(Option<io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| io::Error::other("decoder unavailable")))
    }
}

/// Peels off every compression wrapper of `reader`, outermost first, and returns the
/// innermost stream with the peeked bytes still unread, plus the wrappers found.
pub fn unwrap(reader: BoxRead) -> Result<(Prefixed<BoxRead>, Vec<Compression>)> {
    let mut chain = Vec::new();
    let mut current =
        Prefixed::peek(reader, MAGIC_LEN).map_err(|e| Error::io("reading the image", e))?;
    while let Some(c) = detect(current.peeked()) {
        if chain.len() == MAX_NESTING {
            return Err(err!(
                Unsupported,
                "the image is wrapped in more than {MAX_NESTING} layers of compression; unpack it first"
            ));
        }
        chain.push(c);
        let inner = decoder(c, Box::new(current));
        current = Prefixed::peek(inner, MAGIC_LEN).map_err(|e| decompress_error(&chain, e))?;
    }
    Ok((current, chain))
}

/// Turns a decoder's read error into a message naming the wrapper that failed.
pub fn decompress_error(chain: &[Compression], e: io::Error) -> Error {
    match chain.last() {
        Some(c) if e.kind() != io::ErrorKind::Interrupted => Error::new(
            crate::ErrorKind::InvalidFormat,
            format!("the {c} data is damaged or truncated ({e}); download the image again"),
        ),
        _ => Error::io("reading the image", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_names_every_wrapper_by_its_magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0, 0, 0]), Some(Compression::Gzip));
        assert_eq!(
            detect(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]),
            Some(Compression::Xz)
        );
        assert_eq!(
            detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            detect(&[0x5a, 0x2a, 0x4d, 0x18, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(detect(b"BZh91AY&SY"), Some(Compression::Bzip2));
    }

    #[test]
    fn detect_treats_near_misses_as_uncompressed() {
        assert_eq!(
            detect(&[0x1f, 0x8b, 7, 0]),
            None,
            "gzip with a method other than deflate"
        );
        assert_eq!(detect(b"BZh0"), None);
        assert_eq!(detect(b"BZh9notpi!"), None);
        assert_eq!(detect(b"QFI\xfb"), None);
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn prefixed_reader_returns_peeked_bytes_then_the_rest() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut r = Prefixed::peek(&data[..], 10).map_err(|e| e.to_string());
        let mut out = Vec::new();
        if let Ok(r) = r.as_mut() {
            assert_eq!(r.peeked(), &data[..10]);
            r.read_to_end(&mut out).ok();
        }
        assert_eq!(out, data);
    }

    #[test]
    fn unwrap_refuses_a_damaged_gzip_stream_with_a_clear_message() {
        let mut bad = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        bad.extend_from_slice(&[0xff; 64]);
        let result = unwrap(Box::new(io::Cursor::new(bad)));
        let message = match result {
            Ok((mut r, _)) => {
                let mut sink = Vec::new();
                r.read_to_end(&mut sink)
                    .map(|_| String::new())
                    .unwrap_or_else(|e| e.to_string())
            }
            Err(e) => e.to_string(),
        };
        assert!(!message.is_empty(), "damaged gzip must not decode cleanly");
    }
}
