//! The decoders' input: an image read once, forwards, from a possibly non-seekable stream.
//!
//! A [`Stream`] hands out the image's bytes in order and remembers nothing of them, except a
//! *head*: the first bytes, which a decoder asks to keep while it parses headers and tables
//! that the format puts at the start (qcow2's header cluster, a VDI block map, a VHD BAT...).
//! [`Stream::parse_head`] runs one of the header parsers of this crate over the head and,
//! when the parser asks for bytes further on, reads forward into the head (up to
//! [`MAX_HEAD`]) and runs it again. Data is then read on from where the decoder is: bytes still
//! in the head are served from it, later ones straight from the source into the caller's
//! buffer, with no copy.
//!
//! Reading on a separate thread ([`ReadAhead`]) lets decompression of a wrapper (`.gz`,
//! `.xz`) run on one core while decoding and writing run on the other.

use std::borrow::Cow;
use std::io::{self, Read};
use std::sync::mpsc;
use std::thread;

use crate::align::{PageBuf, read_placed};
use crate::compress::{self, BoxRead, Compression};
use crate::direct::{DirectFile, Prefer};
use crate::error::{Error, ErrorKind, Result, err};
use crate::view::{View, check_range};

/// The most bytes a decoder may keep as head while parsing metadata at the start of an
/// image: VHDX puts its metadata at 2-3 MiB; VDI maps and VHD BATs of the largest disks
/// qemu accepts fit too.
pub const MAX_HEAD: usize = 64 << 20;

/// A source that can lend the bytes it already holds (the importer's HTTP body chunks): a
/// decoder that works on chunks looks at them where they are instead of copying them into a
/// buffer of its own. It is a reader too, for everything else.
pub trait Lend: Read + Send {
    /// The next bytes of the stream, at most `max` (and at least one unless the stream has
    /// ended: empty means the end). They count as read.
    fn lend(&mut self, max: usize) -> io::Result<&[u8]>;
}

/// Where a [`Stream`]'s bytes come from.
enum Source {
    Read(BoxRead),
    Lend(Box<dyn Lend>),
}

impl Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Read(r) => r.read(buf),
            Source::Lend(l) => l.read(buf),
        }
    }
}

/// An image read once from start to end. See the module docs.
pub struct Stream {
    inner: Source,
    compression: Vec<Compression>,
    /// Bytes `0..head.len()` of the image, kept for parsing.
    head: Vec<u8>,
    /// Whether `head` has been given up (after [`Stream::release_head`]).
    released: bool,
    /// The next byte a decoder reads.
    pos: u64,
    /// Bytes pulled from `inner` so far.
    pulled: u64,
    /// `inner` reported its end.
    eof: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("compression", &self.compression)
            .field("head", &self.head.len())
            .field("pos", &self.pos)
            .field("pulled", &self.pulled)
            .field("eof", &self.eof)
            .finish()
    }
}

impl Stream {
    /// A stream over the image bytes `inner` (already unwrapped from `compression`, which is
    /// only used to name the wrapper when reading fails).
    pub fn new(inner: BoxRead, compression: Vec<Compression>) -> Self {
        Self::with_source(Source::Read(inner), compression)
    }

    /// A stream over uncompressed image bytes from a source that lends them
    /// ([`Stream::lend`]).
    pub fn lending(inner: Box<dyn Lend>) -> Self {
        Self::with_source(Source::Lend(inner), Vec::new())
    }

    fn with_source(inner: Source, compression: Vec<Compression>) -> Self {
        Self {
            inner,
            compression,
            head: Vec::new(),
            released: false,
            pos: 0,
            pulled: 0,
            eof: false,
        }
    }

    /// The compression wrappers around the image, outermost first.
    pub fn compression(&self) -> &[Compression] {
        &self.compression
    }

    /// The offset of the next byte [`Stream::read`] returns.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Whether the image has ended and every byte was read.
    pub fn at_end(&self) -> bool {
        self.eof && self.pos == self.pulled
    }

    /// Reads from the source, mapping decoder failures to a message naming the wrapper.
    fn pull(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.eof || buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.inner.read(buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.pulled += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.compression.is_empty() => {
                    return Err(Error::io("reading the image", e));
                }
                Err(e) => return Err(compress::decompress_error(&self.compression, e)),
            }
        }
    }

    /// Makes the head hold at least the first `len` bytes (fewer only when the image is
    /// shorter). Only possible before data past the head has been read.
    pub fn fill_head(&mut self, len: usize) -> Result<&[u8]> {
        if len > MAX_HEAD {
            return Err(err!(
                NeedsRandomAccess,
                "the image keeps metadata {len} bytes into the file, beyond the {MAX_HEAD} bytes a \
                 single pass keeps; give the uncompressed file itself (random access) instead of a stream"
            ));
        }
        if self.released || self.pulled > self.head.len() as u64 {
            return Err(err!(
                NeedsRandomAccess,
                "the decoder needs the first {len} bytes again after the stream moved past them"
            ));
        }
        let mut head = std::mem::take(&mut self.head);
        let result = (|| {
            while head.len() < len && !self.eof {
                let have = head.len();
                // Grow geometrically so that a series of small asks costs few reads.
                let want = len.max(have.saturating_mul(2)).clamp(64 << 10, MAX_HEAD);
                head.resize(want, 0);
                let n = self.pull(&mut head[have..]);
                head.truncate(have + *n.as_ref().unwrap_or(&0));
                n?;
            }
            Ok(())
        })();
        self.head = head;
        result?;
        Ok(&self.head[..len.min(self.head.len())])
    }

    /// Runs `parse` over the head, reading further into it whenever the parser asks for bytes
    /// not read yet (up to [`MAX_HEAD`]). The parser sees an unknown length until the image
    /// has ended, exactly as the streaming probe shows it.
    pub fn parse_head<T>(&mut self, parse: impl Fn(&dyn View) -> Result<T>) -> Result<T> {
        loop {
            let view = HeadView {
                head: &self.head,
                len: self.eof.then_some(self.pulled),
            };
            match parse(&view) {
                Err(e) if e.kind() == ErrorKind::Pending => {
                    let (offset, want) = e.pending_range().unwrap_or((0, 0));
                    let end = offset
                        .checked_add(want as u64)
                        .and_then(|e| usize::try_from(e).ok())
                        .unwrap_or(usize::MAX);
                    let before = self.head.len();
                    self.fill_head(end)?;
                    if self.head.len() == before && !self.eof {
                        return Err(err!(
                            NeedsRandomAccess,
                            "the image's metadata cannot be read in one pass"
                        ));
                    }
                }
                other => return other,
            }
        }
    }

    /// The head kept so far.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Gives up the head: bytes before the current position can no longer be read.
    pub fn release_head(&mut self) {
        if self.pos >= self.head.len() as u64 {
            self.head = Vec::new();
            self.released = true;
        }
    }

    /// Reads up to `buf.len()` bytes at the current position; 0 only at the end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.pos < self.head.len() as u64 && !self.released {
            let from = self.pos as usize;
            let n = buf.len().min(self.head.len() - from);
            buf[..n].copy_from_slice(&self.head[from..from + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let n = self.pull(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    /// The next bytes, at most `max`, without a copy: from the head while the position is in
    /// it, else lent by the source. `None` when the source does not lend (then
    /// [`Stream::read`]); an empty slice at the end.
    pub fn lend(&mut self, max: usize) -> Result<Option<&[u8]>> {
        if self.pos < self.head.len() as u64 && !self.released {
            if !matches!(self.inner, Source::Lend(_)) {
                return Ok(None);
            }
            let from = self.pos as usize;
            let n = max.min(self.head.len() - from);
            self.pos += n as u64;
            return Ok(Some(&self.head[from..from + n]));
        }
        let Source::Lend(lender) = &mut self.inner else {
            return Ok(None);
        };
        if self.eof || max == 0 {
            return Ok(Some(&[]));
        }
        let bytes = lender
            .lend(max)
            .map_err(|e| Error::io("reading the image", e))?;
        if bytes.is_empty() {
            self.eof = true;
        }
        let n = bytes.len().min(max) as u64;
        self.pulled += n;
        self.pos += n;
        Ok(Some(&bytes[..n as usize]))
    }

    /// Fills `buf` as far as the image goes; returns how many bytes that was.
    pub fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(filled)
    }

    /// Reads exactly `buf.len()` bytes; the image ending first is a [`ErrorKind::Truncated`]
    /// error naming `what` was being read.
    pub fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let at = self.pos;
        let n = self.read_full(buf)?;
        if n < buf.len() {
            return Err(err!(
                Truncated,
                "the image is truncated: it ends at byte {} inside {what} (bytes {at}..{}); download it again",
                at + n as u64,
                at + buf.len() as u64
            ));
        }
        Ok(())
    }

    /// Reads and discards bytes up to `offset`. Going backwards is impossible in one pass:
    /// that is a [`ErrorKind::NeedsRandomAccess`] error naming `what` lies there.
    pub fn skip_to(&mut self, offset: u64, what: &str) -> Result<()> {
        if offset < self.pos {
            return Err(err!(
                NeedsRandomAccess,
                "{what} lies at byte {offset}, which a single pass over the stream has already passed \
                 (now at {}); give the uncompressed file itself (random access) instead of a stream",
                self.pos
            ));
        }
        while self.pos < offset {
            // A lending source is passed over without a copy.
            let want = ((offset - self.pos) as usize).min(1 << 20);
            match self.lend(want)? {
                Some([]) => {
                    return Err(err!(
                        Truncated,
                        "the image is truncated: it ends at byte {} before {what} at byte {offset}; download it again",
                        self.pos
                    ));
                }
                Some(_) => continue,
                None => break,
            }
        }
        let mut scratch = PageBuf::new((offset - self.pos).min(1 << 20) as usize);
        while self.pos < offset {
            let want = ((offset - self.pos) as usize).min(scratch.len());
            let n = self.read(&mut scratch[..want])?;
            if n == 0 {
                return Err(err!(
                    Truncated,
                    "the image is truncated: it ends at byte {} before {what} at byte {offset}; download it again",
                    self.pos
                ));
            }
        }
        Ok(())
    }

    /// Reads to the end, discarding; returns how many bytes that was.
    pub fn drain(&mut self) -> Result<u64> {
        let mut total = 0u64;
        loop {
            match self.lend(1 << 20)? {
                Some([]) => return Ok(total),
                Some(lent) => total += lent.len() as u64,
                None => break,
            }
        }
        let mut scratch = PageBuf::new(1 << 20);
        loop {
            let n = self.read(&mut scratch)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    }
}

/// The head of a [`Stream`] as a [`View`]: bytes beyond it are "not read yet" until the image
/// has ended, after which they are past the end.
#[derive(Debug)]
pub struct HeadView<'a> {
    head: &'a [u8],
    len: Option<u64>,
}

impl<'a> HeadView<'a> {
    /// A view over `head`; `len` is the image's length once known.
    pub fn new(head: &'a [u8], len: Option<u64>) -> Self {
        Self { head, len }
    }
}

impl View for HeadView<'_> {
    fn len(&self) -> u64 {
        self.len.unwrap_or(u64::MAX)
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        check_range(self.len(), offset, len, what)?;
        let end = offset + len as u64;
        if end <= self.head.len() as u64 {
            return Ok(Cow::Borrowed(&self.head[offset as usize..end as usize]));
        }
        Err(Error::pending(offset, len))
    }
}

/// A file read once from start to end, fast: holes of a sparse file read as zero without
/// I/O, and several large reads are in flight at once.
///
/// A regular file is read through the page cache with the kernel asked to fetch well ahead
/// of the reader (`POSIX_FADV_WILLNEED` over a moving window), as `qemu-img` reads it. A
/// large block device that is not in the cache is read with direct I/O (the `direct`
/// module): a few threads read 2 MiB chunks into a small pool of aligned buffers. Pipes are
/// read in order, with a larger pipe buffer.
///
/// Why not direct I/O for files too: on this project's VM disk, with read buffers placed
/// where the kernel copies fast (`crate::align`), cold 2 GiB qcow2 and 4.7 GB VHDX images
/// converted 15-40% faster buffered than with the direct reader (3 alternating runs each,
/// `drop_caches` before every run): the kernel's readahead keeps the device busier than three
/// reader threads, and the direct reader's copy out of its buffers costs user time.
/// Dropping the pages behind the reader (`POSIX_FADV_DONTNEED` every 16 or 256 MiB, to keep
/// the image out of the cache) cost another 25-50% of wall time, so the kernel reclaims
/// them as it does any clean cache.
#[derive(Debug)]
pub struct SequentialFile {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Direct(DirectFile),
    Buffered(BufferedFile),
}

impl SequentialFile {
    /// Reads `file` from its start.
    pub fn new(file: std::fs::File) -> Self {
        match file.metadata() {
            Ok(meta) if meta.is_file() => Self::with(file, None),
            _ => Self::with(file, Some(Prefer::Auto)),
        }
    }

    /// Reads `file` from its start; `direct` says when to try direct I/O (`None`: never).
    fn with(file: std::fs::File, direct: Option<Prefer>) -> Self {
        let mode = match direct.and_then(|prefer| DirectFile::open(&file, prefer)) {
            Some(direct) => Mode::Direct(direct),
            None => Mode::Buffered(BufferedFile::new(file)),
        };
        Self { mode }
    }

    /// Whether the file is read with direct I/O.
    pub fn is_direct(&self) -> bool {
        matches!(self.mode, Mode::Direct(_))
    }
}

impl Read for SequentialFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.mode {
            Mode::Direct(direct) => direct.read(buf),
            Mode::Buffered(buffered) => buffered.read(buf),
        }
    }
}

/// [`SequentialFile`] reading through the page cache, with the kernel asked to fetch well
/// ahead of the reader: several large reads are in flight at once, as a parallel reader
/// would have, without threads or memory of our own. On virtual disks this is the
/// difference between a queue depth of one and a busy device.
#[derive(Debug)]
struct BufferedFile {
    file: std::fs::File,
    pos: u64,
    advised: u64,
    /// `pos..hole_end` is a hole of the file (reads as zero without any I/O).
    hole_end: u64,
    /// `hole_end..data_end` holds data; past it, ask the file system again.
    data_end: u64,
    len: u64,
    /// A pipe or socket: read in order, without offsets, holes or prefetch.
    pipe: bool,
    /// For reads into a badly placed buffer (see [`crate::align`]).
    bounce: Option<PageBuf>,
}

/// How far ahead of the reader the kernel is asked to read.
const PREFETCH_WINDOW: u64 = 64 << 20;
/// Each prefetch request.
const PREFETCH_STEP: u64 = 16 << 20;

impl BufferedFile {
    /// Reads `file` from its start.
    fn new(file: std::fs::File) -> Self {
        use std::os::unix::fs::FileTypeExt;
        advise(&file, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        // Only regular files have holes to skip; a block device is all data.
        let meta = file.metadata().ok();
        let regular = meta.as_ref().filter(|m| m.is_file());
        let pipe = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_fifo() || m.file_type().is_socket());
        if meta.as_ref().is_some_and(|m| m.file_type().is_fifo()) {
            grow_pipe(&file);
        }
        Self {
            file,
            pos: 0,
            advised: 0,
            hole_end: 0,
            data_end: if regular.is_some() { 0 } else { u64::MAX },
            len: regular.map_or(u64::MAX, |m| m.len()),
            pipe,
            bounce: None,
        }
    }

    /// Finds where the hole (if any) at `pos` ends and the data after it ends, with
    /// `SEEK_DATA`/`SEEK_HOLE`. A file system without them reports everything as data.
    fn map_at(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let Ok(at) = i64::try_from(self.pos) else {
            (self.hole_end, self.data_end) = (self.pos, u64::MAX);
            return;
        };
        // SAFETY: lseek takes plain integers; the descriptor is owned by `self.file`. The
        // file offset it moves is not used: reads are positional.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let past_data = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            if past_data && self.len != u64::MAX {
                // No data after `pos`: the rest of the file is a hole.
                (self.hole_end, self.data_end) = (self.len, self.len);
            } else {
                (self.hole_end, self.data_end) = (self.pos, u64::MAX);
            }
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        self.hole_end = data as u64;
        self.data_end = if hole > data { hole as u64 } else { u64::MAX };
    }
}

impl BufferedFile {
    /// Keeps the kernel reading up to [`PREFETCH_WINDOW`] ahead of the reader, over data
    /// only: advising a hole would make the kernel zero page-cache pages for it (a memset
    /// and page insert per 4 KiB that the reader then never asks for).
    fn prefetch(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        self.advised = self.advised.max(self.pos);
        let until = self.pos.saturating_add(PREFETCH_WINDOW).min(self.len);
        while self.advised < until {
            let (mut start, mut end) = (self.advised, u64::MAX);
            if self.len != u64::MAX
                && let Ok(at) = i64::try_from(self.advised)
            {
                // SAFETY: lseek takes plain integers; the descriptor is owned by
                // `self.file`; reads are positional, so the moved offset is unused.
                let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
                if data < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                        // Only a hole remains.
                        self.advised = self.len;
                        return;
                    }
                } else {
                    // SAFETY: as above.
                    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
                    start = data as u64;
                    if hole > data {
                        end = hole as u64;
                    }
                }
            }
            let step = PREFETCH_STEP.min(end.saturating_sub(start)).max(1);
            advise(&self.file, start, step, libc::POSIX_FADV_WILLNEED);
            self.advised = start.saturating_add(step);
        }
    }
}

/// The pipe capacity asked for: a reader that takes 64 KiB (the default) per wakeup spends
/// its time switching with the writer; 1 MiB is what an unprivileged process may set.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Asks for a larger pipe buffer; only a hint, failures are ignored.
fn grow_pipe(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_SETPIPE_SZ) takes plain integers; the descriptor is owned by `file`.
    unsafe {
        libc::fcntl(file.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
    }
}

fn advise(file: &std::fs::File, offset: u64, len: u64, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise takes plain integers; the descriptor is owned by `file`. It is
    // only a hint: failures are ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, advice);
    }
}

impl Read for BufferedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pipe {
            // Pipe data sits in the pipe's pages at its stream offset (for writers that
            // write whole pages, as `cat` and `curl` do), which places it like file data.
            let file = &mut self.file;
            let n = read_placed(&mut self.bounce, buf, self.pos, |b| file.read(b))?;
            self.pos += n as u64;
            return Ok(n);
        }
        if self.pos >= self.data_end {
            self.map_at();
        }
        if self.pos < self.hole_end {
            // Holes read as zero: fill the buffer instead of asking the kernel to zero
            // page-cache pages and copy them (several times faster on sparse images).
            let n = buf.len().min((self.hole_end - self.pos) as usize);
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        self.prefetch();
        let left = self.data_end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let (file, pos) = (&self.file, self.pos);
        let n = read_placed(&mut self.bounce, &mut buf[..want], pos, |b| {
            file.read_at(b, pos)
        })?;
        self.pos += n as u64;
        // At the end (n == 0) everything read so far goes.
        Ok(n)
    }
}

/// A reader that pulls from its source on a thread of its own, a few large chunks ahead, so
/// that decompressing a wrapper and decoding the image use two cores.
pub struct ReadAhead {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    recycle: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    done: bool,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("done", &self.done)
            .finish()
    }
}

/// Chunk size of [`ReadAhead`].
const AHEAD_CHUNK: usize = 1 << 20;
/// Chunks in flight.
const AHEAD_DEPTH: usize = 4;

impl ReadAhead {
    /// Starts reading `inner` on a new thread.
    pub fn new(mut inner: BoxRead) -> Self {
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(AHEAD_DEPTH);
        let (recycle, spare) = mpsc::sync_channel::<Vec<u8>>(AHEAD_DEPTH + 2);
        let spawned = thread::Builder::new()
            .name("dvcr-read-ahead".into())
            .spawn(move || {
                loop {
                    let mut buf = spare
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(AHEAD_CHUNK));
                    buf.resize(AHEAD_CHUNK, 0);
                    let mut filled = 0;
                    let result = loop {
                        match inner.read(&mut buf[filled..]) {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                filled += n;
                                if filled == buf.len() {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    buf.truncate(filled);
                    let end = filled == 0;
                    if filled > 0 && tx.send(Ok(buf)).is_err() {
                        return;
                    }
                    if let Err(e) = result {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    if end {
                        return;
                    }
                }
            });
        let (rx, done) = match spawned {
            Ok(_) => (rx, false),
            Err(e) => {
                // No thread: report it on the first read.
                let (tx, rx) = mpsc::sync_channel(1);
                let _ = tx.send(Err(e));
                (rx, false)
            }
        };
        Self {
            rx,
            recycle,
            current: Vec::new(),
            at: 0,
            done,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(next)) => {
                    let old = std::mem::replace(&mut self.current, next);
                    let _ = self.recycle.try_send(old);
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Fields;

    fn stream(data: Vec<u8>) -> Stream {
        Stream::new(Box::new(io::Cursor::new(data)), Vec::new())
    }

    #[test]
    fn parse_head_reads_forward_until_the_parser_is_satisfied() {
        let mut data = vec![0u8; 3 << 20];
        data[0..8].copy_from_slice(&(2u64 << 20).to_be_bytes());
        data[2 << 20] = 0x77;
        let mut s = stream(data);
        let got = s.parse_head(|view| {
            let head = view.read(0, 8, "pointer")?;
            let at = Fields::new(&head, "pointer").u64_be(0)?;
            Ok(view.read(at, 1, "target")?[0])
        });
        assert_eq!(got.ok(), Some(0x77));
        assert!(s.head().len() > 2 << 20);
    }

    #[test]
    fn reads_after_parsing_replay_the_head_then_continue_from_the_source() {
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 249) as u8).collect();
        let mut s = stream(data.clone());
        s.fill_head(100_000).map(|_| ()).ok();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 77_777];
        loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, data);
        assert!(s.at_end());
    }

    #[test]
    fn skipping_backwards_is_refused_as_needing_random_access() {
        let mut s = stream(vec![1u8; 10_000]);
        let mut buf = [0u8; 5000];
        s.read_exact(&mut buf, "data").ok();
        let kind = s.skip_to(100, "a table").err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::NeedsRandomAccess));
    }

    #[test]
    fn a_short_stream_is_truncated_not_a_panic() {
        let mut s = stream(vec![1u8; 100]);
        let mut buf = [0u8; 200];
        let kind = s.read_exact(&mut buf, "the header").err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Truncated));
        let mut s = stream(vec![1u8; 100]);
        let kind = s.skip_to(1000, "a table").err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Truncated));
    }

    #[test]
    fn a_sparse_file_reads_back_exactly_holes_and_all() {
        use std::io::{Seek, SeekFrom, Write};
        let Ok(mut file) = tempfile::tempfile() else {
            return;
        };
        let mut expected = vec![0u8; 40 << 20];
        for (at, len, byte) in [
            (0usize, 5000usize, 1u8),
            (9 << 20, 3 << 20, 2),
            (30 << 20, 4096, 3),
        ] {
            expected[at..at + len].fill(byte);
            assert!(file.seek(SeekFrom::Start(at as u64)).is_ok());
            assert!(file.write_all(&expected[at..at + len]).is_ok());
        }
        assert!(file.set_len(expected.len() as u64).is_ok());
        let mut reader = SequentialFile::new(file);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1_000_003];
        loop {
            let n = reader.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "holes and data come back in place");
    }

    /// Deterministic bytes that do not repeat in any pattern a reader could get right by
    /// accident (xorshift).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// A temporary file holding `len` bytes: `data` ranges of noise at their offsets, holes
    /// (never written) between them. Returns the file and what it reads as.
    fn sparse_file(len: usize, data: &[(usize, usize)]) -> (std::fs::File, Vec<u8>) {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = tempfile::tempfile().unwrap();
        let mut expected = vec![0u8; len];
        for (i, &(at, n)) in data.iter().enumerate() {
            expected[at..at + n].copy_from_slice(&noise(n, 0x9e37_79b9_7f4a_7c15 + i as u64));
            file.seek(SeekFrom::Start(at as u64)).unwrap();
            file.write_all(&expected[at..at + n]).unwrap();
        }
        file.set_len(len as u64).unwrap();
        (file, expected)
    }

    fn read_all_in(reader: &mut SequentialFile, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn reopen(file: &std::fs::File) -> std::fs::File {
        std::fs::File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(file)
        ))
        .unwrap()
    }

    /// 9 MiB + 123 bytes: data with an unaligned end, a hole with unaligned edges in the
    /// middle, data again up to an end that is not a multiple of 4 KiB.
    const ODD_LEN: usize = (9 << 20) + 123;
    const ODD_DATA: [(usize, usize); 3] = [
        (0, (1 << 20) + 4001),
        ((5 << 20) + 777, 3000),
        ((7 << 20) + 5, (2 << 20) + 118),
    ];

    #[test]
    fn a_file_read_with_direct_io_returns_exactly_its_bytes_whatever_the_read_size() {
        let (file, expected) = sparse_file(ODD_LEN, &ODD_DATA);
        for chunk in [1, 4095, (1 << 20) + 7] {
            let mut reader = SequentialFile::with(reopen(&file), Some(Prefer::Direct));
            assert!(
                reader.is_direct(),
                "the temporary directory's file system takes O_DIRECT"
            );
            let out = read_all_in(&mut reader, chunk);
            assert_eq!(
                out.len(),
                expected.len(),
                "length with reads of {chunk} bytes"
            );
            assert!(out == expected, "bytes differ with reads of {chunk} bytes");
            assert_eq!(
                reader.read(&mut [0u8; 10]).unwrap(),
                0,
                "the end stays the end"
            );
        }
    }

    #[test]
    fn a_file_ending_in_a_hole_reads_with_direct_io_as_zeros_up_to_its_length() {
        let (file, expected) = sparse_file((40 << 20) + 1, &[(3, 5000), (20 << 20, 1 << 20)]);
        let mut reader = SequentialFile::with(file, Some(Prefer::Direct));
        assert!(reader.is_direct());
        let out = read_all_in(&mut reader, 3 << 20);
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "holes and data come back in place");
    }

    #[test]
    fn the_buffered_fallback_returns_the_same_bytes_as_direct_io() {
        let (file, expected) = sparse_file(ODD_LEN, &ODD_DATA);
        let mut direct = SequentialFile::with(reopen(&file), Some(Prefer::Direct));
        let mut buffered = SequentialFile::with(file, None);
        assert!(direct.is_direct() && !buffered.is_direct());
        let (a, b) = (
            read_all_in(&mut direct, 65_537),
            read_all_in(&mut buffered, 65_537),
        );
        assert!(a == expected && b == expected);
    }

    #[test]
    fn small_files_and_pipes_are_read_buffered() {
        let (file, expected) = sparse_file(1 << 20, &[(0, 1 << 20)]);
        let mut small = SequentialFile::with(file, Some(Prefer::Direct));
        assert!(!small.is_direct());
        assert!(read_all_in(&mut small, 100_000) == expected);

        let (rx, mut tx) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            tx.write_all(&noise(3 << 20, 7)).unwrap();
        });
        let rx = std::fs::File::from(std::os::fd::OwnedFd::from(rx));
        let mut pipe = SequentialFile::with(rx, Some(Prefer::Direct));
        assert!(!pipe.is_direct());
        assert!(read_all_in(&mut pipe, 100_000) == noise(3 << 20, 7));
        writer.join().unwrap();
    }

    /// Reads everything into a buffer placed 16 bytes into a page (where malloc puts large
    /// blocks, and where the kernel copies slowly from page-aligned data).
    fn read_all_misplaced(reader: &mut SequentialFile, chunk: usize) -> Vec<u8> {
        let mut storage = crate::align::PageBuf::new(chunk + 16);
        let buf = &mut storage[16..];
        assert!(crate::align::slow_copy(buf.as_ptr(), 0));
        let mut out = Vec::new();
        loop {
            let n = reader.read(buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn buffered_reads_into_a_badly_placed_buffer_give_every_byte_in_order() {
        let (file, expected) = sparse_file(5 << 20, &[(4096, 3 << 20), (4 << 20, 100_000)]);
        let mut reader = SequentialFile::with(file, None);
        assert!(read_all_misplaced(&mut reader, 1 << 20) == expected);

        let (rx, mut tx) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            tx.write_all(&noise(3 << 20, 11)).unwrap();
        });
        let rx = std::fs::File::from(std::os::fd::OwnedFd::from(rx));
        let mut pipe = SequentialFile::with(rx, None);
        assert!(read_all_misplaced(&mut pipe, 700_000) == noise(3 << 20, 11));
        writer.join().unwrap();
    }

    #[test]
    fn a_pipe_read_as_a_sequential_file_gets_a_larger_buffer() {
        use std::os::fd::AsRawFd;
        let (rx, _tx) = std::io::pipe().unwrap();
        let rx = std::fs::File::from(std::os::fd::OwnedFd::from(rx));
        let fd = rx.as_raw_fd();
        // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity; `rx` owns the descriptor.
        let before = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
        let _reader = SequentialFile::new(rx);
        // SAFETY: as above; the reader keeps the descriptor open.
        let after = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
        assert!(before < PIPE_SIZE, "{before}");
        assert_eq!(after, PIPE_SIZE);
    }

    #[test]
    fn a_cold_regular_file_is_read_buffered_and_a_cold_block_device_would_not_be() {
        let len = 64 << 20;
        let (file, expected) = sparse_file(len, &[(0, len)]);
        file.sync_all().unwrap();
        advise(&file, 0, 0, libc::POSIX_FADV_DONTNEED);
        // The automatic choice takes direct I/O for a cold file where it is offered (block
        // devices, which this test cannot make)...
        assert!(SequentialFile::with(reopen(&file), Some(Prefer::Auto)).is_direct());
        // ... but a regular file is read through the cache.
        let mut reader = SequentialFile::new(reopen(&file));
        assert!(
            !reader.is_direct(),
            "regular files read faster through the cache"
        );
        assert!(read_all_in(&mut reader, 1 << 20) == expected);
    }

    #[test]
    fn dropping_a_direct_reader_halfway_stops_its_threads_promptly() {
        let (file, expected) = sparse_file(32 << 20, &[(0, 32 << 20)]);
        let mut reader = SequentialFile::with(file, Some(Prefer::Direct));
        let mut buf = vec![0u8; 1 << 20];
        reader.read_exact(&mut buf).unwrap();
        assert!(buf[..] == expected[..1 << 20]);
        let (done, dropped) = mpsc::channel();
        std::thread::spawn(move || {
            drop(reader);
            done.send(()).unwrap();
        });
        let waited = dropped.recv_timeout(std::time::Duration::from_secs(10));
        assert!(waited.is_ok(), "the reader threads did not stop");
    }

    #[test]
    fn a_failed_direct_read_is_an_error_on_that_read_and_every_later_one() {
        let (file, expected) = sparse_file(32 << 20, &[(0, 32 << 20)]);
        let mut reader = SequentialFile::with(file, Some(Prefer::Direct));
        let Mode::Direct(direct) = &mut reader.mode else {
            panic!("the temporary directory's file system takes O_DIRECT");
        };
        direct.fail_at = Some((9 << 20) + 1);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let error = loop {
            match reader.read(&mut buf) {
                Ok(0) => panic!("the whole file was read despite the failure"),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(
            error.to_string().contains("injected read failure"),
            "{error}"
        );
        // Everything before the chunk holding the failed offset came through intact.
        assert_eq!(out.len(), 8 << 20);
        assert!(out[..] == expected[..8 << 20]);
        let again = reader.read(&mut buf).err().map(|e| e.to_string());
        assert!(again.is_some_and(|e| e.contains("injected read failure")));
    }

    #[test]
    fn a_file_cut_short_while_read_with_direct_io_ends_where_it_was_cut() {
        let (file, expected) = sparse_file(32 << 20, &[(0, 32 << 20)]);
        let mut reader = SequentialFile::with(reopen(&file), Some(Prefer::Direct));
        assert!(reader.is_direct());
        let mut out = vec![0u8; 1 << 20];
        reader.read_exact(&mut out).unwrap();
        file.set_len(2 << 20).unwrap();
        let rest = read_all_in(&mut reader, 1 << 20);
        out.extend_from_slice(&rest);
        // Chunks read before the cut still count; nothing after the cut is invented.
        assert!(out.len() < 32 << 20, "read {} bytes", out.len());
        assert!(out[..] == expected[..out.len()]);
    }

    #[test]
    fn read_ahead_delivers_every_byte_in_order() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
        let mut r = ReadAhead::new(Box::new(io::Cursor::new(data.clone())));
        let mut out = Vec::new();
        r.read_to_end(&mut out).ok();
        assert_eq!(out, data);
    }
}
