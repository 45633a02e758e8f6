//! Reading a large local file or block device once, forwards, with direct I/O (`O_DIRECT`).
//!
//! `stream::SequentialFile` uses it for block devices; regular files read faster buffered
//! with readahead on the VM disks measured (see there).
//!
//! Buffered reads of a cold file cost the kernel a page-cache insertion per 4 KiB and fill
//! the cache with an image nobody reads again. [`DirectFile`] reopens the file with
//! `O_DIRECT` and has a few reader threads fetch large aligned chunks into a small pool of
//! buffers ahead of the caller, which copies out of them: the device sees several large
//! requests at once and the page cache is left alone.
//!
//! The caller's thread plans the reads: it maps data and holes with `SEEK_DATA`/`SEEK_HOLE`
//! (holes read as zero without I/O), rounds each data range out to the alignment, and keeps
//! [`DEPTH`] chunks in flight. Memory stays at `(DEPTH + 1) * CHUNK` bytes whatever the size
//! of the file.
//!
//! [`DirectFile::open`] declines (and the caller reads buffered instead) when direct I/O does
//! not fit: a small file, not a regular file or block device, a file system that refuses
//! `O_DIRECT`, or a file that is mostly in the page cache already (direct reads would go to
//! the device for bytes memory holds).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// Offsets, lengths and buffer addresses of direct reads are multiples of this: 4 KiB covers
/// every logical block size in common use (512 and 4096).
const ALIGN: usize = 4096;
/// One read request.
const CHUNK: usize = 2 << 20;
/// Chunks being read or queued for a reader while the caller copies out of one more:
/// 16 MiB of buffers in all.
const DEPTH: usize = 7;
/// Threads issuing reads: this many requests reach the device at once. On a virtual disk
/// shared with other work (convert of a 2 GiB qcow2 and a 5 GB VHDX, cold cache, medians of
/// 3 noisy runs), 3 readers of 2 MiB with 7 chunks queued did best, ahead of 2 readers of
/// 4 MiB, 2 or 7 of 2 MiB, 8 of 1 MiB, and 64 MiB windows.
const READERS: usize = 3;
/// Smaller files are read buffered: the threads would cost more than they save.
const MIN_DIRECT_LEN: u64 = 8 << 20;

/// How the caller wants a file read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefer {
    /// Direct I/O when it fits (see the module docs).
    Auto,
    /// Direct I/O whenever the file and its file system allow it, cached or not.
    #[cfg_attr(not(test), allow(dead_code))]
    Direct,
}

/// A buffer whose usable part starts at an [`ALIGN`]ed address: an over-allocated vector
/// and an offset into it.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        if start >= ALIGN {
            return Err(io::Error::other("cannot align a direct I/O buffer"));
        }
        Ok(Self { storage, start })
    }

    fn len(&self) -> usize {
        self.storage.len() - ALIGN
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len()]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.storage[self.start..self.start + len]
    }
}

/// A read for a reader thread: fill `buf[..len]` from `offset`, answer on `reply`.
struct Job {
    buf: AlignedBuf,
    offset: u64,
    len: usize,
    reply: SyncSender<Done>,
    /// Tests: fail this read as a device would.
    #[cfg(test)]
    fail: bool,
}

/// A finished read: the buffer back, and how many bytes the file had there.
type Done = (AlignedBuf, io::Result<usize>);

/// What the caller reads next, in file order.
enum Segment {
    /// A hole of this many bytes: zeros, no I/O.
    Zero(u64),
    /// A chunk being read; at most `want` of its bytes belong to the file.
    Data { reply: Receiver<Done>, want: usize },
}

/// A file read from start to end with direct I/O. See the module docs.
pub(crate) struct DirectFile {
    file: Arc<File>,
    /// The file's length when opened; bytes past it are never returned.
    len: u64,
    /// Reads are planned up to here.
    planned: u64,
    /// `planned..data_end` is data (rounded out to [`ALIGN`]); past it, map again.
    data_end: u64,
    segments: VecDeque<Segment>,
    /// Data segments in `segments`.
    in_flight: usize,
    /// Idle buffers, and how many exist in all.
    pool: Vec<AlignedBuf>,
    buffers: usize,
    /// The chunk being copied out: its buffer, bytes valid, bytes already copied.
    current: Option<AlignedBuf>,
    current_len: usize,
    current_at: usize,
    /// Zeros still to return for the current hole.
    zeros: u64,
    /// A read failed: every later read fails too, with this.
    failed: Option<(io::ErrorKind, String)>,
    jobs: Option<SyncSender<Job>>,
    readers: Vec<JoinHandle<()>>,
    /// Tests: the read covering this offset fails.
    #[cfg(test)]
    pub(crate) fail_at: Option<u64>,
}

impl std::fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("len", &self.len)
            .field("planned", &self.planned)
            .field("in_flight", &self.in_flight)
            .field("failed", &self.failed)
            .finish()
    }
}

impl DirectFile {
    /// Reopens `file` for direct reading from its start, or `None` when it is better (or
    /// only possible) read buffered.
    pub(crate) fn open(file: &File, prefer: Prefer) -> Option<Self> {
        let meta = file.metadata().ok()?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return None;
        }
        if kind.is_file()
            && (meta.len() < MIN_DIRECT_LEN
                || (prefer == Prefer::Auto && mostly_cached(file, meta.len())))
        {
            return None;
        }
        // A new open file description: the caller's descriptor keeps its buffered mode
        // (and whoever shares it, e.g. random access to the same file, is unaffected).
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()?;
        let len = if kind.is_file() {
            meta.len()
        } else {
            let end = seek_end(&direct)?;
            if end < MIN_DIRECT_LEN {
                return None;
            }
            end
        };
        // Some file systems accept O_DIRECT at open time and refuse the reads (EINVAL):
        // try one before committing to it.
        let mut probe = AlignedBuf::new(ALIGN).ok()?;
        read_chunk(&direct, probe.bytes_mut(), 0).ok()?;

        let (jobs, queue) = mpsc::sync_channel::<Job>(DEPTH);
        let queue = Arc::new(Mutex::new(queue));
        let file = Arc::new(direct);
        let mut readers = Vec::with_capacity(READERS);
        for i in 0..READERS {
            let (file, queue) = (Arc::clone(&file), Arc::clone(&queue));
            let spawned = thread::Builder::new()
                .name(format!("dvcr-direct-{i}"))
                .spawn(move || reader(&file, &queue));
            match spawned {
                Ok(handle) => readers.push(handle),
                // Fewer threads only means fewer requests at once.
                Err(_) if !readers.is_empty() => break,
                Err(_) => return None,
            }
        }
        Some(Self {
            file,
            len,
            planned: 0,
            data_end: if kind.is_file() { 0 } else { u64::MAX },
            segments: VecDeque::new(),
            in_flight: 0,
            pool: Vec::new(),
            buffers: 0,
            current: None,
            current_len: 0,
            current_at: 0,
            zeros: 0,
            failed: None,
            jobs: Some(jobs),
            readers,
            #[cfg(test)]
            fail_at: None,
        })
    }

    /// Finds the data range at or after `planned`; a hole before it becomes a zero segment.
    /// Both ends are rounded out to [`ALIGN`] (the bytes around data read as they are).
    fn map(&mut self) {
        let fd = self.file.as_raw_fd();
        let Ok(at) = i64::try_from(self.planned) else {
            self.data_end = u64::MAX;
            return;
        };
        // SAFETY: lseek takes plain integers; the descriptor is owned by `self.file`, whose
        // offset is not used for reading (reads are positional).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                // Nothing but a hole up to the end.
                self.segments
                    .push_back(Segment::Zero(self.len.saturating_sub(self.planned)));
                self.planned = self.len;
            }
            // Anything else: a file system without the calls; it is all data.
            self.data_end = u64::MAX;
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let start = align_down(data as u64).min(self.len);
        if start > self.planned {
            self.segments.push_back(Segment::Zero(start - self.planned));
            self.planned = start;
        }
        self.data_end = if hole > data {
            align_up(hole as u64)
        } else {
            u64::MAX
        };
    }

    /// Keeps [`DEPTH`] chunks in flight (fewer near the end of the file).
    fn plan(&mut self) -> io::Result<()> {
        while self.in_flight < DEPTH && self.planned < self.len {
            if self.planned >= self.data_end {
                self.map();
                continue;
            }
            let buf = match self.pool.pop() {
                Some(buf) => buf,
                None if self.buffers <= DEPTH => {
                    self.buffers += 1;
                    AlignedBuf::new(CHUNK)?
                }
                None => return Err(io::Error::other("direct read buffers leaked")),
            };
            // `planned` is aligned; so is `data_end` unless it is unbounded. Past the end
            // of the file the read comes back short.
            let until = self.data_end.min(align_up(self.len));
            let len = (until - self.planned).min(CHUNK as u64) as usize;
            let want = (self.len - self.planned).min(len as u64) as usize;
            let (reply, answer) = mpsc::sync_channel(1);
            let job = Job {
                buf,
                offset: self.planned,
                len,
                reply,
                #[cfg(test)]
                fail: self
                    .fail_at
                    .is_some_and(|at| at >= self.planned && at - self.planned < len as u64),
            };
            let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(stopped());
            }
            self.segments.push_back(Segment::Data {
                reply: answer,
                want,
            });
            self.in_flight += 1;
            self.planned += want as u64;
        }
        Ok(())
    }

    /// Moves to the next segment; false at the end of the file.
    fn advance(&mut self) -> io::Result<bool> {
        if let Some(buf) = self.current.take() {
            self.pool.push(buf);
        }
        (self.current_len, self.current_at) = (0, 0);
        self.plan()?;
        match self.segments.pop_front() {
            None => Ok(false),
            Some(Segment::Zero(n)) => {
                self.zeros = n;
                Ok(true)
            }
            Some(Segment::Data { reply, want }) => {
                self.in_flight -= 1;
                let (buf, got) = reply.recv().map_err(|_| stopped())?;
                let got = got?;
                self.current = Some(buf);
                self.current_len = got.min(want);
                if got < want {
                    // The file became shorter while being read: it ends here.
                    self.abandon();
                    self.planned = self.len;
                } else {
                    // Keep the device busy while the caller copies this chunk out.
                    self.plan()?;
                }
                Ok(true)
            }
        }
    }

    /// Forgets the segments planned: their buffers go with their answers.
    fn abandon(&mut self) {
        self.buffers -= self.in_flight;
        self.in_flight = 0;
        self.segments.clear();
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.current_at < self.current_len
                && let Some(current) = &self.current
            {
                let n = buf.len().min(self.current_len - self.current_at);
                let from = &current.bytes()[self.current_at..self.current_at + n];
                buf[..n].copy_from_slice(from);
                self.current_at += n;
                return Ok(n);
            }
            if self.zeros > 0 {
                let n = buf
                    .len()
                    .min(usize::try_from(self.zeros).unwrap_or(usize::MAX));
                buf[..n].fill(0);
                self.zeros -= n as u64;
                return Ok(n);
            }
            if !self.advance()? {
                return Ok(0);
            }
        }
    }
}

impl io::Read for DirectFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_inner(buf).inspect_err(|e| {
            self.failed = Some((e.kind(), format!("an earlier read failed: {e}")));
        })
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        // Closing the queue ends every reader once its current read (if any) is done;
        // answers nobody waits for are dropped with their channels.
        self.jobs = None;
        self.abandon();
        for handle in self.readers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A reader thread: runs jobs from the shared queue until it closes.
fn reader(file: &File, queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(mut job) = job else {
            return;
        };
        let got = read_chunk(file, &mut job.buf.bytes_mut()[..job.len], job.offset);
        #[cfg(test)]
        let got = if job.fail {
            Err(io::Error::other("injected read failure"))
        } else {
            got
        };
        // The caller may have gone: then nobody needs the answer.
        let _ = job.reply.send((job.buf, got));
    }
}

/// Fills `buf` from `offset` with direct reads; fewer bytes only at the end of the file.
fn read_chunk(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                // An unaligned count is the end of the file; the next offset would be
                // refused anyway.
                if filled % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn stopped() -> io::Error {
    io::Error::other("the direct I/O reader threads stopped")
}

fn align_down(n: u64) -> u64 {
    n & !(ALIGN as u64 - 1)
}

fn align_up(n: u64) -> u64 {
    n.saturating_add(ALIGN as u64 - 1) & !(ALIGN as u64 - 1)
}

/// The size of a block device, from its end.
fn seek_end(file: &File) -> Option<u64> {
    // SAFETY: lseek takes plain integers; the descriptor is owned by `file`, whose offset
    // is not used for reading.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    u64::try_from(end).ok()
}

/// Whether at least half of the file's `len` bytes are in the page cache already (then
/// buffered reads serve them from memory). Asks `cachestat(2)` (Linux 6.5); a kernel
/// without it answers no.
fn mostly_cached(file: &File, len: u64) -> bool {
    cached_bytes(file).is_some_and(|cached| cached.saturating_mul(2) >= len)
}

/// `struct cachestat_range` of `cachestat(2)`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `cachestat(2)`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The number of `cachestat(2)`, the same on the architectures with the common syscall
/// table (the libc crate does not name it for all of them yet).
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const SYS_CACHESTAT: Option<libc::c_long> = Some(451);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
const SYS_CACHESTAT: Option<libc::c_long> = None;

/// Bytes of `file` in the page cache, or `None` when the kernel cannot tell.
pub(crate) fn cached_bytes(file: &File) -> Option<u64> {
    let number = SYS_CACHESTAT?;
    // `len: 0` asks about the whole file.
    let range = CachestatRange { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live, properly aligned
    // `#[repr(C)]` values of the kernel's layout; the descriptor is owned by `file`.
    let done = unsafe {
        libc::syscall(
            number,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if done != 0 {
        return None;
    }
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).ok().filter(|&p| p > 0)?;
    Some(stat.nr_cache.saturating_mul(page))
}
