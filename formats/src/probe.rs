//! Probing an image in a single pass over a stream, or by random access to a file.
//!
//! A [`StreamProbe`] is fed every byte of the (decompressed) image once, in order, and keeps
//! only what a parser can need: the first [`KEEP_HEAD`] bytes, the last [`KEEP_TAIL`] bytes
//! (VHD and VMDK footers live there), and the metadata ranges the parser asks for further
//! on. Once the head is in, the parser is run against what has been kept; when it asks for
//! bytes that have not streamed past yet, the probe registers that range, keeps it when it
//! passes, and runs the parser again. At the end the parser runs once more with the real
//! length, which is when sizes and offsets are checked against the end of the image.
//!
//! Memory stays bounded: head, tail and at most [`MAX_CAPTURED`] bytes of captured ranges,
//! whatever the size of the image. The importer feeds the same probe from its pipeline, so
//! detection never costs a second read.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ImageInfo;
use crate::compress::{self, BoxRead, Compression};
use crate::detect::detect;
use crate::error::{Error, ErrorKind, Result, err};
use crate::view::{FileView, View, check_range};

/// Leading bytes a stream probe keeps: enough for every format's fixed headers (VHDX keeps
/// its headers and region tables in the first 320 KiB; VMDK descriptors follow the header).
pub const KEEP_HEAD: usize = 1 << 20;

/// Trailing bytes a stream probe keeps: VHD footers (512 bytes) and VMDK footers (1.5 KiB).
pub const KEEP_TAIL: usize = 64 << 10;

/// The most bytes of further metadata ranges a stream probe keeps.
pub const MAX_CAPTURED: usize = 16 << 20;

/// Read size used by [`probe_reader`].
const CHUNK: usize = 1 << 20;

#[derive(Debug)]
struct Capture {
    offset: u64,
    len: usize,
    data: Vec<u8>,
}

impl Capture {
    fn complete(&self) -> bool {
        self.data.len() == self.len
    }

    fn next_offset(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    /// Appends what `chunk` (which starts at stream offset `start`) holds of the bytes this
    /// capture still waits for. Returns true when that completed the capture.
    fn fill(&mut self, start: u64, chunk: &[u8]) -> bool {
        let want = self.next_offset();
        let end = start + chunk.len() as u64;
        if self.complete() || want < start || want >= end {
            return false;
        }
        let from = (want - start) as usize;
        let take = (self.len - self.data.len()).min(chunk.len() - from);
        self.data.extend_from_slice(&chunk[from..from + take]);
        self.complete()
    }
}

/// Detects an image's format from a single pass over its bytes. See the module docs.
#[derive(Debug, Default)]
pub struct StreamProbe {
    head: Vec<u8>,
    tail: Vec<u8>,
    pos: u64,
    captures: Vec<Capture>,
    captured: usize,
    /// The early parser finished (or failed for good): nothing more to capture.
    settled: bool,
}

impl StreamProbe {
    /// A probe that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many bytes have been fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Feeds the next bytes of the image.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let start = self.pos;
        if self.head.len() < KEEP_HEAD {
            let take = (KEEP_HEAD - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.push_tail(chunk);
        self.pos += chunk.len() as u64;

        let head_done_now = start < KEEP_HEAD as u64 && self.pos >= KEEP_HEAD as u64;
        let mut completed = false;
        for capture in &mut self.captures {
            completed |= capture.fill(start, chunk);
        }
        if (head_done_now || completed) && !self.settled {
            self.run_early(start, chunk);
        }
    }

    fn push_tail(&mut self, chunk: &[u8]) {
        if chunk.len() >= KEEP_TAIL {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - KEEP_TAIL..]);
            return;
        }
        self.tail.extend_from_slice(chunk);
        // Trim lazily so that small chunks cost an amortised copy, not a shift each time.
        if self.tail.len() >= 2 * KEEP_TAIL {
            self.tail.drain(..self.tail.len() - KEEP_TAIL);
        }
    }

    /// Runs the parser on what has been kept, registering the ranges it asks for.
    fn run_early(&mut self, start: u64, chunk: &[u8]) {
        loop {
            let pending = match detect(&KeptView {
                probe: self,
                final_len: None,
            }) {
                Err(e) if e.kind() == ErrorKind::Pending => e.pending_range(),
                // Found, or refused: the final run with the real length decides.
                _ => None,
            };
            let Some((offset, len)) = pending else {
                self.settled = true;
                return;
            };
            let known = self
                .captures
                .iter()
                .any(|c| c.offset == offset && c.len == len);
            if known || self.captured + len > MAX_CAPTURED {
                // Still waiting for it, or too much to keep: leave it to the final run.
                return;
            }
            self.captured += len;
            let mut capture = Capture {
                offset,
                len,
                data: Vec::new(),
            };
            // Whatever of the range is still at hand: the head, then the current chunk.
            if capture.offset < self.head.len() as u64 {
                let from = capture.offset as usize;
                let take = len.min(self.head.len() - from);
                capture
                    .data
                    .extend_from_slice(&self.head[from..from + take]);
            }
            capture.fill(start, chunk);
            let done = capture.complete();
            self.captures.push(capture);
            if !done {
                return;
            }
        }
    }

    /// Ends the stream: detects, validates and sizes the image with its real length.
    pub fn finish(self) -> Result<ImageInfo> {
        let len = self.pos;
        detect(&KeptView {
            probe: &self,
            final_len: Some(len),
        })
        .map_err(|e| match e.pending_range() {
            Some((offset, want)) => err!(
                NeedsRandomAccess,
                "the image keeps metadata at bytes {offset}..{} that a single pass over a stream \
                 had already passed when the image pointed to it; give the uncompressed file \
                 itself (random access) instead of a stream",
                offset + want as u64
            ),
            None => e,
        })
    }
}

/// The bytes a [`StreamProbe`] kept, as a [`View`]. Before the end of the stream the length is
/// unknown (`u64::MAX`) and the tail is not yet the tail.
struct KeptView<'a> {
    probe: &'a StreamProbe,
    final_len: Option<u64>,
}

impl View for KeptView<'_> {
    fn len(&self) -> u64 {
        self.final_len.unwrap_or(u64::MAX)
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        check_range(self.len(), offset, len, what)?;
        let end = offset + len as u64;
        let p = self.probe;
        if end <= p.head.len() as u64 {
            return Ok(Cow::Borrowed(&p.head[offset as usize..end as usize]));
        }
        if let Some(c) = p
            .captures
            .iter()
            .find(|c| c.complete() && c.offset <= offset && end <= c.offset + c.len as u64)
        {
            let from = (offset - c.offset) as usize;
            return Ok(Cow::Borrowed(&c.data[from..from + len]));
        }
        if let Some(total) = self.final_len {
            let tail_start = total - p.tail.len() as u64;
            if offset >= tail_start {
                let from = (offset - tail_start) as usize;
                return Ok(Cow::Borrowed(&p.tail[from..from + len]));
            }
        }
        Err(Error::pending(offset, len))
    }
}

/// What a probe found, with the wrappers around the image and byte counts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Probed {
    /// Format, virtual size and details.
    #[serde(flatten)]
    pub info: ImageInfo,
    /// Compression wrappers, outermost first.
    pub compression: Vec<Compression>,
    /// Bytes of the source as stored (compressed), read or known.
    pub source_size: u64,
    /// Bytes of the image inside the wrappers (equal to `source_size` when uncompressed).
    pub image_size: u64,
}

#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Probes a stream read once from start to end: unwraps compression, detects and validates
/// the format, and measures the image.
pub fn probe_reader(reader: impl Read + Send + 'static) -> Result<Probed> {
    let count = Arc::new(AtomicU64::new(0));
    let counting: BoxRead = Box::new(Counting {
        inner: reader,
        count: Arc::clone(&count),
    });
    let (mut inner, compression) = compress::unwrap(counting)?;
    let mut probe = StreamProbe::new();
    let mut buf = crate::align::PageBuf::new(CHUNK);
    loop {
        match inner.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => probe.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if compression.is_empty() => return Err(Error::io("reading the image", e)),
            Err(e) => return Err(compress::decompress_error(&compression, e)),
        }
    }
    let image_size = probe.position();
    let info = probe.finish()?;
    Ok(Probed {
        info,
        compression,
        source_size: count.load(Ordering::Relaxed),
        image_size,
    })
}

/// Probes a file or block device: by random access when it is not compressed (only the
/// headers and tables are read), else in one streaming pass through the decompressor.
pub fn probe_path(path: &Path) -> Result<Probed> {
    probe_path_with(path, |file| Box::new(file))
}

/// [`probe_path`], with `wrap` put around the file when it has to be streamed (to show
/// progress, say).
pub fn probe_path_with(path: &Path, wrap: impl FnOnce(File) -> BoxRead) -> Result<Probed> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| Error::io(format!("opening {shown}"), e))?;
    probe_file_with(file, &shown.to_string(), wrap)
}

/// [`probe_path_with`] for a file already open (standard input redirected from a file, say),
/// read from its start; `shown` names it in errors.
pub fn probe_file_with(
    mut file: File,
    shown: &str,
    wrap: impl FnOnce(File) -> BoxRead,
) -> Result<Probed> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the metadata of {shown}"), e))?;
    let kind = meta.file_type();
    let len = if kind.is_file() {
        meta.len()
    } else if kind.is_block_device() {
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("measuring {shown}"), e))?
    } else {
        // A pipe or character device: no random access.
        return probe_reader(wrap(file));
    };
    let mut magic = [0u8; compress::MAGIC_LEN];
    let have = (len as usize).min(magic.len());
    file.read_exact_at(&mut magic[..have], 0)
        .map_err(|e| Error::io(format!("reading {shown}"), e))?;
    if compress::detect(&magic[..have]).is_some() {
        return probe_reader(wrap(file));
    }
    let info = detect(&FileView::new(file, len))?;
    Ok(Probed {
        info,
        compression: Vec::new(),
        source_size: len,
        image_size: len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;

    #[test]
    fn stream_probe_measures_a_raw_stream_fed_in_uneven_chunks() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut probe = StreamProbe::new();
        for piece in data.chunks(77_777) {
            probe.feed(piece);
        }
        let info = probe.finish().ok().map(|i| (i.format, i.virtual_size));
        assert_eq!(info, Some((Format::Raw, 3_000_320)));
    }

    #[test]
    fn stream_probe_keeps_exactly_the_last_bytes_as_tail() {
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        let mut probe = StreamProbe::new();
        for piece in data.chunks(1000) {
            probe.feed(piece);
        }
        assert!(probe.tail.len() >= KEEP_TAIL);
        let view = KeptView {
            probe: &probe,
            final_len: Some(data.len() as u64),
        };
        let last = view
            .read(data.len() as u64 - 512, 512, "footer")
            .map(|b| b.into_owned())
            .ok();
        assert_eq!(last.as_deref(), Some(&data[data.len() - 512..]));
    }

    #[test]
    fn capture_fill_takes_only_the_bytes_it_waits_for() {
        let mut c = Capture {
            offset: 10,
            len: 5,
            data: Vec::new(),
        };
        assert!(!c.fill(0, &[1; 12]));
        assert_eq!(c.data.len(), 2);
        assert!(c.fill(12, &[2; 100]));
        assert_eq!(c.data, vec![1, 1, 2, 2, 2]);
    }
}
