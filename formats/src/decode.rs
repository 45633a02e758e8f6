//! Single-pass decoding: an image stream in, guest data out, every byte of the source read
//! once.
//!
//! [`decode`] unwraps compression (on a thread of its own, so that a `.gz` or `.xz` wrapper
//! and the decoding underneath use both cores), recognises the format from the first bytes
//! and hands the [`Job`] to that format's decoder, which parses its metadata from the head of
//! the stream and then writes guest data to the [`Output`] as the data streams past.
//! Raw and ISO images are copied; zero blocks are left to the target writer, which skips
//! them. A fixed VHD looks like raw until its last 512 bytes, so the raw decoder holds those
//! back and decides at the end.

use std::path::PathBuf;

use crate::align::PageBuf;
use crate::compress::{self, BoxRead, Compression};
use crate::detect::{HEAD_LEN, raw_virtual_size};
use crate::error::{Result, err};
use crate::sink::{Output, Sink};
use crate::stream::{HeadView, Lend, ReadAhead, Stream};
use crate::view::View;
use crate::{Format, ImageInfo, iso, qcow2, vdi, vhd, vhdx, vmdk};

/// How a decode may use memory, scratch space and threads.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for scratch files (clusters whose place is not known yet, beyond
    /// `pending_memory`); the system temp dir when `None`.
    pub scratch_dir: Option<PathBuf>,
    /// Bytes of not-yet-mapped data kept in memory before spilling to scratch.
    pub pending_memory: usize,
    /// Threads that decompress compressed clusters (qcow2, streamOptimized vmdk).
    pub threads: usize,
    /// Refuse ISO images before writing a byte: a disk (VirtualDisk) cannot be made from
    /// a CD-ROM image.
    pub refuse_cdrom: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            scratch_dir: None,
            pending_memory: 16 << 20,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 8),
            refuse_cdrom: false,
        }
    }
}

/// What a decode did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Decoded {
    /// Format, virtual size and details, as the probe reports them.
    #[serde(flatten)]
    pub info: ImageInfo,
    /// Compression wrappers, outermost first.
    pub compression: Vec<Compression>,
    /// Bytes of the image read (inside the wrappers).
    pub image_bytes: u64,
    /// Guest data bytes handed to the target writer (before it skips zero blocks).
    pub data_bytes: u64,
    /// Bytes spilled to scratch files.
    pub scratch_bytes: u64,
}

/// Everything a format decoder works with.
pub struct Job<'a> {
    /// The image, read once.
    pub stream: Stream,
    /// Random access to the same bytes, when the source allows it (an uncompressed local
    /// file, an HTTP server answering Range requests): decoders use it instead of spilling
    /// to scratch. [`View::cheap`] tells a local file from a network round trip per read.
    pub random: Option<RandomAccess>,
    /// Where guest data goes.
    pub out: Output<'a, dyn Sink + 'a>,
    /// Limits.
    pub opts: &'a Options,
    /// Bytes spilled to scratch so far (decoders add to it).
    pub scratch_bytes: u64,
}

impl std::fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("stream", &self.stream)
            .field("random", &self.random.is_some())
            .field("opts", &self.opts)
            .finish()
    }
}

/// Random access to the bytes of an image, shareable with decoding threads.
pub type RandomAccess = Box<dyn View + Send + Sync>;

/// Decodes the image read from `source` into `sink`, in one pass. `random` is random access
/// to the same bytes when the source allows it (ignored when the bytes turn out to be
/// compressed: offsets inside a compressed stream cannot be reached directly).
pub fn decode(
    source: BoxRead,
    random: Option<RandomAccess>,
    sink: &dyn Sink,
    opts: &Options,
) -> Result<Decoded> {
    let (inner, compression) = compress::unwrap(source)?;
    // Unwrapping runs a few chunks ahead on a thread of its own, so that decompression and
    // decoding use two cores. An uncompressed source is read directly: a second thread
    // would only add a copy between cores (measured: 3x slower from the page cache), and
    // files get their I/O overlap from `stream::SequentialFile` (direct reads on reader
    // threads for a cold file, kernel prefetch for a cached one).
    let (inner, random): (BoxRead, _) = if compression.is_empty() {
        (Box::new(inner), random)
    } else {
        (Box::new(ReadAhead::new(Box::new(inner))), None)
    };
    decode_stream(Stream::new(inner, compression), random, sink, opts)
}

/// Decodes an image (its bytes as they are: no compression wrapper is looked for) from a
/// source that lends them: the qcow2 decoder looks at the source's own chunks instead of
/// copying them into its buffer. The importer checks images it streams into DVCR this way.
pub fn decode_lent(source: Box<dyn Lend>, sink: &dyn Sink, opts: &Options) -> Result<Decoded> {
    decode_stream(Stream::lending(source), None, sink, opts)
}

fn decode_stream(
    stream: Stream,
    random: Option<RandomAccess>,
    sink: &dyn Sink,
    opts: &Options,
) -> Result<Decoded> {
    let compression = stream.compression().to_vec();
    let mut job = Job {
        stream,
        random,
        out: Output::new(sink),
        opts,
        scratch_bytes: 0,
    };
    let head = job.stream.fill_head(HEAD_LEN)?.to_vec();
    let info = if qcow2::matches(&head) {
        qcow2::decode::decode(&mut job)?
    } else if vmdk::matches(&head) {
        vmdk::decode::decode(&mut job)?
    } else if vdi::matches(&head) {
        vdi::decode::decode(&mut job)?
    } else if vhdx::matches(&head) {
        vhdx::decode::decode(&mut job)?
    } else if vhd::matches(&head) {
        vhd::decode::decode(&mut job)?
    } else {
        raw(&mut job, &head)?
    };
    // Whatever follows the last mapped byte (refcount blocks, snapshots, footers) is read
    // too, so that byte counts and checksums of the caller cover the whole image.
    job.stream.drain()?;
    Ok(Decoded {
        info,
        compression,
        image_bytes: job.stream.pos(),
        data_bytes: job.out.written(),
        scratch_bytes: job.scratch_bytes,
    })
}

/// Chunk size of the raw copy.
const RAW_CHUNK: usize = 4 << 20;
/// A fixed VHD's footer: the raw decoder holds back this many trailing bytes.
const FOOTER: usize = 512;

/// Copies a raw image (or ISO, or fixed VHD) to the output.
fn raw(job: &mut Job<'_>, head: &[u8]) -> Result<ImageInfo> {
    let is_iso = iso::matches(head);
    if is_iso && job.opts.refuse_cdrom {
        return Err(err!(
            Unsupported,
            "the image is an ISO (a CD-ROM image), and a disk cannot be made from one; \
             attach the image to the VM as a CD-ROM instead"
        ));
    }
    let mut buf = PageBuf::new(RAW_CHUNK + FOOTER);
    // `buf[..held]` are bytes read but not written yet: at most the last FOOTER bytes.
    let mut held = 0usize;
    let mut at = 0u64; // guest offset of buf[0]
    loop {
        let n = job.stream.read_full(&mut buf[held..])?;
        let have = held + n;
        if n == 0 {
            break;
        }
        let write = have.saturating_sub(FOOTER);
        job.out.write(at, &buf[..write])?;
        buf.copy_within(write..have, 0);
        held = have - write;
        at += write as u64;
    }
    let len = at + held as u64;
    let tail = &buf[..held];
    if held == FOOTER && tail.starts_with(b"conectix") {
        let view = TailView { tail, len };
        if let Some(info) = vhd::probe_fixed(&view)? {
            job.out.set_size(info.virtual_size)?;
            return Ok(info);
        }
    }
    job.out.write(at, tail)?;
    let info = if is_iso {
        iso::probe(&HeadView::new(head, Some(len)))?
    } else if len <= head.len() as u64 {
        crate::detect::detect(&crate::view::SliceView(&head[..len as usize]))?
    } else {
        let mut info = ImageInfo::new(Format::Raw, raw_virtual_size(len));
        if let Ok(probed) = crate::detect::detect(&crate::view::SliceView(head)) {
            info.details = probed.details;
        }
        info
    };
    job.out.set_size(info.virtual_size)?;
    Ok(info)
}

/// The last bytes of an image whose length is known.
#[derive(Debug)]
struct TailView<'a> {
    tail: &'a [u8],
    len: u64,
}

impl View for TailView<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        crate::view::check_range(self.len, offset, len, what)?;
        let start = self.len - self.tail.len() as u64;
        if offset < start {
            return Err(err!(
                NeedsRandomAccess,
                "{what} at byte {offset} was not kept while streaming"
            ));
        }
        let from = (offset - start) as usize;
        Ok(std::borrow::Cow::Borrowed(&self.tail[from..from + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::MemorySink;
    use std::io::Cursor;

    fn run(data: Vec<u8>) -> (Result<Decoded>, MemorySink) {
        let sink = MemorySink::new(1 << 30);
        let result = decode(
            Box::new(Cursor::new(data)),
            None,
            &sink,
            &Options::default(),
        );
        (result, sink)
    }

    #[test]
    fn raw_bytes_come_out_unchanged_padded_to_whole_sectors() {
        let data: Vec<u8> = (0..9_000_001u32).map(|i| (i % 251) as u8).collect();
        let (decoded, sink) = run(data.clone());
        let decoded = decoded.map_err(|e| e.to_string());
        assert_eq!(
            decoded
                .as_ref()
                .map(|d| (d.info.format, d.info.virtual_size)),
            Ok((Format::Raw, 9_000_448))
        );
        let disk = sink.contents();
        assert_eq!(&disk[..data.len()], &data[..]);
        assert!(disk[data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_gzipped_raw_stream_is_unwrapped_and_copied() {
        use std::io::Write;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 7 % 13) as u8).collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).ok();
        let gz = enc.finish().unwrap_or_default();
        let (decoded, sink) = run(gz);
        let decoded = decoded.map_err(|e| e.to_string());
        assert_eq!(
            decoded.as_ref().map(|d| d.compression.clone()),
            Ok(vec![Compression::Gzip])
        );
        assert_eq!(&sink.contents()[..data.len()], &data[..]);
    }

    #[test]
    fn an_empty_stream_is_an_empty_raw_disk() {
        let (decoded, _) = run(Vec::new());
        assert_eq!(decoded.ok().map(|d| d.info.virtual_size), Some(0));
    }
}
