//! The decoders' output: guest data at guest offsets, handed to a [`Sink`].
//!
//! A decoder calls [`Output::write`] for every range of the guest disk that holds data, in
//! whatever order the image stores it (ascending for most formats; qcow2 after random writes
//! or snapshots stores clusters out of order). Ranges the decoder never writes read as zero:
//! unallocated clusters, zero flags and unmapped blocks are simply not written, and the
//! target writer ([`crate::sparse`]) makes sure they read as zero (a fresh sparse file does
//! already; a block device is zeroed there unless the caller says it reads zero).
//!
//! [`Output`] checks every write against the virtual size the image declared, so a hostile
//! table can never make a writer touch bytes outside the disk, and counts what was written.
//!
//! [`write_behind`] runs the target writer on a thread of its own. A decoder that reads into
//! buffers from a [`SharedPool`] lends them with [`Sink::write_shared`]: the writer thread
//! writes the data from the decoder's own buffer, so every guest byte is copied twice in
//! all (into the buffer by the read, into the target by the write), as `qemu-img` does.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::align::PageBuf;
use crate::error::{Result, err};

/// A decoder's read buffer that a sink may keep a reference to after a write returns
/// (see [`Sink::write_shared`]). The decoder reuses it once it holds the only reference.
pub type Shared = Arc<PageBuf>;

/// Where decoded guest data goes. Implementations take `&self` so that several decoding
/// threads can write at once (positional writes need no shared cursor).
pub trait Sink: Sync {
    /// The guest disk is `size` bytes. Called once, before any write when the image's header
    /// says it, or after the last write for a raw stream whose length is only known at the
    /// end. A sink refuses a size it cannot hold (a smaller requested size, a smaller device).
    fn set_size(&self, size: u64) -> Result<()>;

    /// Writes guest bytes `data` at guest offset `offset`. Each guest byte is written at
    /// most once; writes may come in any order and from several threads.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Writes guest bytes `buf[range]` at guest offset `offset`, as [`Sink::write_at`] does.
    /// A sink that writes later, on another thread, keeps a reference to `buf` instead of
    /// copying the bytes (the write-behind sink: one copy of every guest byte fewer).
    fn write_shared(&self, offset: u64, buf: &Shared, range: Range<usize>) -> Result<()> {
        let data = buf.get(range).ok_or_else(bad_range)?;
        self.write_at(offset, data)
    }
}

/// Read buffers a decoder lends to its sink ([`Sink::write_shared`]) and takes back for the
/// next read once the sink has let go of them. The sink bounds how many it holds at once
/// (the write-behind sink: its queue), so the buffers in use are bounded too.
#[derive(Debug, Default)]
pub struct SharedPool {
    bufs: Vec<Shared>,
}

/// Buffers kept for reuse: what the write-behind sink holds at most (its queue, the batch it
/// is gathering and the one its thread writes), and the one being filled.
const POOL_KEEP: usize = BEHIND_DEPTH + 3;

impl SharedPool {
    /// A buffer of at least `len` bytes that nobody else holds: a returned one when there
    /// is one, else a new one.
    pub fn take(&mut self, len: usize) -> Shared {
        let free = self
            .bufs
            .iter()
            .position(|b| Arc::strong_count(b) == 1 && b.len() >= len);
        match free {
            Some(i) => self.bufs.swap_remove(i),
            None => Arc::new(PageBuf::new(len)),
        }
    }

    /// Keeps `buf` for a later [`SharedPool::take`] (when the pool is not full).
    pub fn give(&mut self, buf: Shared) {
        if self.bufs.len() < POOL_KEEP {
            self.bufs.push(buf);
        }
    }

    /// The bytes of `buf` to fill: a buffer just taken is held by nobody else, so this
    /// fails only on a decoder bug (a buffer filled while lent).
    pub fn fill(buf: &mut Shared) -> Result<&mut PageBuf> {
        Arc::get_mut(buf).ok_or_else(|| {
            err!(
                Io,
                "a buffer lent to the sink is still in use (a decoder bug)"
            )
        })
    }
}

fn bad_range() -> crate::Error {
    err!(Io, "a write names bytes outside its buffer (a decoder bug)")
}

/// A decoder's handle on its sink: bounds-checked, counting writes.
#[derive(Debug)]
pub struct Output<'a, S: Sink + ?Sized> {
    sink: &'a S,
    size: Option<u64>,
    written: AtomicU64,
}

impl<'a, S: Sink + ?Sized> Output<'a, S> {
    /// Wraps `sink`; the size is unknown until [`Output::set_size`].
    pub fn new(sink: &'a S) -> Self {
        Self {
            sink,
            size: None,
            written: AtomicU64::new(0),
        }
    }

    /// Declares the guest disk size (passed on to the sink). Writes beyond it are refused.
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        self.sink.set_size(size)?;
        self.size = Some(size);
        Ok(())
    }

    /// The declared guest size, if any yet.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Writes `data` at guest offset `offset`, refusing anything past the declared size.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check(offset, data.len())?;
        self.sink.write_at(offset, data)?;
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `buf[range]` at guest offset `offset` (see [`Sink::write_shared`]), refusing
    /// anything past the declared size.
    pub fn write_shared(&self, offset: u64, buf: &Shared, range: Range<usize>) -> Result<()> {
        let len = range.len();
        if len == 0 {
            return Ok(());
        }
        self.check(offset, len)?;
        self.sink.write_shared(offset, buf, range)?;
        self.written.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if let Some(size) = self.size
            && end.is_none_or(|end| end > size)
        {
            return Err(err!(
                Corrupt,
                "the image maps {len} bytes of data at guest offset {offset}, beyond its own virtual size of {size} bytes; the image is damaged"
            ));
        }
        Ok(())
    }

    /// Guest bytes handed to the sink so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Whether every byte of `data` is zero, comparing a machine word at a time (about ten times
/// a byte loop: zero detection must keep up with page-cache reads).
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: `align_to` only reinterprets the aligned middle of the slice as u64s, which have
    // no invalid bit patterns; the unaligned ends are checked byte by byte.
    let (prefix, words, suffix) = unsafe { data.align_to::<u64>() };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |acc, &w| acc | w) == 0)
}

/// A sink that keeps the guest disk in memory: for tests and fuzzing, with a size cap.
#[derive(Debug, Default)]
pub struct MemorySink {
    /// The disk, grown as writes arrive.
    pub disk: std::sync::Mutex<Vec<u8>>,
    /// The size declared with [`Sink::set_size`].
    pub size: AtomicU64,
    /// The largest disk it agrees to hold.
    pub limit: u64,
}

impl MemorySink {
    /// An empty disk that refuses sizes above `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// The disk: written bytes, zeros elsewhere, at the declared size.
    pub fn contents(&self) -> Vec<u8> {
        let mut disk = self.disk.lock().map(|d| d.clone()).unwrap_or_default();
        disk.resize(self.size.load(Ordering::Relaxed) as usize, 0);
        disk
    }
}

impl Sink for MemorySink {
    fn set_size(&self, size: u64) -> Result<()> {
        if size > self.limit {
            return Err(err!(
                OutOfBounds,
                "the disk is {size} bytes, more than this in-memory sink holds ({})",
                self.limit
            ));
        }
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        if end > self.limit {
            return Err(err!(OutOfBounds, "a write ends past {}", self.limit));
        }
        let mut disk = self
            .disk
            .lock()
            .map_err(|_| err!(Io, "the in-memory disk is poisoned"))?;
        if disk.len() < end as usize {
            disk.resize(end as usize, 0);
        }
        disk[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut block = vec![0u8; 65536 + 3];
        assert!(is_zero(&block));
        assert!(is_zero(&block[1..]));
        for at in [0, 1, 7, 8, 4095, 65535, 65538] {
            block[at] = 1;
            assert!(!is_zero(&block), "byte {at}");
            assert!(!is_zero(&block[..=at]), "prefix to {at}");
            block[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn write_behind_delivers_every_non_zero_byte_from_several_threads() {
        let sink = MemorySink::new(64 << 20);
        let result = write_behind(&sink, |behind| {
            behind.set_size(32 << 20)?;
            std::thread::scope(|scope| {
                for t in 0..4u64 {
                    scope.spawn(move || {
                        for i in 0..64u64 {
                            let at = (t * 64 + i) * 100_000;
                            let data = vec![(t * 64 + i) as u8 | 1; 70_000];
                            assert!(behind.write_at(at, &data).is_ok());
                            // Zero blocks are skipped, not written over data.
                            assert!(behind.write_at(at + 80_000, &[0u8; 8192]).is_ok());
                        }
                    });
                }
            });
            Ok(())
        });
        assert!(result.is_ok(), "{result:?}");
        let disk = sink.contents();
        assert_eq!(disk.len(), 32 << 20);
        for k in 0..256u64 {
            let at = (k * 100_000) as usize;
            assert!(
                disk[at..at + 70_000].iter().all(|&b| b == k as u8 | 1),
                "run {k}"
            );
            assert!(
                disk[at + 70_000..at + 100_000].iter().all(|&b| b == 0),
                "gap {k}"
            );
        }
    }

    #[test]
    fn write_behind_reports_the_targets_error() {
        let sink = MemorySink::new(1 << 20);
        let result = write_behind(&sink, |behind| {
            behind.write_at(0, &[1u8; 4096])?;
            behind.write_at(2 << 20, &[1u8; 4096])?;
            Ok(())
        });
        assert_eq!(result.err().map(|e| e.kind()), Some(ErrorKind::OutOfBounds));
        let refused = write_behind(&sink, |behind| behind.set_size(4 << 20));
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(ErrorKind::OutOfBounds)
        );
    }

    /// A sink that records whether every write it got was page-aligned in memory
    /// whenever its guest offset was.
    #[derive(Default)]
    struct AlignmentCheck {
        inner: MemorySink,
        misaligned: AtomicU64,
        writes: AtomicU64,
    }

    impl Sink for AlignmentCheck {
        fn set_size(&self, size: u64) -> Result<()> {
            self.inner.set_size(size)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if offset as usize % BEHIND_ALIGN != data.as_ptr() as usize % BEHIND_ALIGN {
                self.misaligned.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.write_at(offset, data)
        }
    }

    #[test]
    fn write_behind_delivers_every_non_zero_byte_at_its_offset_and_aligned_like_the_guest() {
        let size = 24usize << 20;
        let mut expected = vec![0u8; size];
        let check = AlignmentCheck {
            inner: MemorySink::new(size as u64),
            ..AlignmentCheck::default()
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Unaligned and aligned writes, runs longer than a batch, zeros inside data.
        let mut writes = vec![(0usize, 9usize << 20), (10 << 20, 3), (11 << 20, 5 << 20)];
        for _ in 0..200 {
            let off = (next() % (size as u64 - 70_000)) as usize;
            writes.push((off, 1 + (next() % 65_536) as usize));
        }
        let result = write_behind(&check, |sink| {
            sink.set_size(size as u64)?;
            for &(off, len) in &writes {
                let mut data: Vec<u8> = (0..len).map(|i| (next() >> (i % 8)) as u8 | 1).collect();
                if len > 8192 {
                    data[4096..8192].fill(0);
                }
                expected[off..off + len].copy_from_slice(&data);
                sink.write_at(off as u64, &data)?;
            }
            Ok(())
        });
        assert!(result.is_ok());
        assert_eq!(check.inner.contents(), expected);
        assert_eq!(check.misaligned.load(Ordering::Relaxed), 0);
        // Adjacent runs were merged: far fewer writes than 4 KiB blocks of data.
        assert!(check.writes.load(Ordering::Relaxed) < 2000);
    }

    #[test]
    fn write_behind_writes_lent_buffers_where_they_are_and_lets_go_of_them() {
        let sink = AlignmentCheck {
            inner: MemorySink::new(16 << 20),
            ..AlignmentCheck::default()
        };
        let mut pool = SharedPool::default();
        let mut expected = vec![0u8; 16 << 20];
        let result = write_behind(&sink, |behind| {
            behind.set_size(16 << 20)?;
            for round in 0..8usize {
                let mut shared = pool.take(1 << 20);
                let buf = Arc::get_mut(&mut shared).ok_or_else(bad_range)?;
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i / 4096 + round) as u8 | 1;
                }
                // A zero block in the middle is skipped; two runs that follow each other
                // on the disk and in the buffer become one write.
                buf[8192..12288].fill(0);
                let guest = (round as u64 * 2 + 1) << 20;
                behind.write_shared(guest, &shared, 0..300_000)?;
                behind.write_shared(guest + 300_000, &shared, 300_000..(1 << 20))?;
                let at = guest as usize;
                expected[at..at + (1 << 20)].copy_from_slice(&shared);
                pool.give(shared);
            }
            Ok(())
        });
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(sink.inner.contents(), expected);
        // 8 buffers, each written as two runs around its zero block.
        assert_eq!(sink.writes.load(Ordering::Relaxed), 16);
        assert_eq!(sink.misaligned.load(Ordering::Relaxed), 0);
        // The sink holds none of them once the writes are done, and the pool hands them
        // out again instead of allocating.
        assert!(pool.bufs.iter().all(|b| Arc::strong_count(b) == 1));
        let kept: Vec<*const PageBuf> = pool.bufs.iter().map(Arc::as_ptr).collect();
        assert!(kept.contains(&Arc::as_ptr(&pool.take(1 << 20))));
    }

    #[test]
    fn a_shared_pool_never_hands_out_a_buffer_someone_still_holds() {
        let mut pool = SharedPool::default();
        let first = pool.take(4096);
        let held = Arc::clone(&first);
        pool.give(first);
        let second = pool.take(4096);
        assert!(!Arc::ptr_eq(&held, &second));
        drop(held);
        pool.give(second);
        let mut third = pool.take(4096);
        assert!(Arc::get_mut(&mut third).is_some());
    }

    #[test]
    fn a_shared_write_past_the_declared_size_or_its_buffer_is_refused() {
        let sink = MemorySink::new(1 << 20);
        let mut out = Output::new(&sink);
        out.set_size(8192).ok();
        let buf: Shared = Arc::new(PageBuf::new(8192));
        let kind = out
            .write_shared(4096, &buf, 0..8192)
            .err()
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Corrupt));
        let kind = sink
            .write_shared(0, &buf, 4096..9000)
            .err()
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Io));
        assert!(out.write_shared(0, &buf, 0..8192).is_ok());
        assert_eq!(out.written(), 8192);
    }

    #[test]
    fn output_refuses_writes_past_the_declared_size() {
        let sink = MemorySink::new(1 << 20);
        let mut out = Output::new(&sink);
        out.set_size(4096).ok();
        assert!(out.write(0, &[1; 4096]).is_ok());
        let kind = out.write(4000, &[1; 200]).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Corrupt));
        let kind = out.write(u64::MAX - 2, &[1; 200]).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Corrupt));
        assert_eq!(out.written(), 4096);
    }
}

/// Bytes a write-behind batch holds.
const BEHIND_BATCH: usize = 4 << 20;
/// Batches in flight (memory: this many times [`BEHIND_BATCH`]).
const BEHIND_DEPTH: usize = 3;
/// Data in a batch sits at the same offset within a page as on the guest disk, so that
/// page-aligned guest runs are page-aligned in memory too (whole-page copies into the page
/// cache; and a target with `O_DIRECT` could take them as they are: measured here at queue
/// depth one it lost to buffered writes with `sync_file_range` writeback, so none does).
const BEHIND_ALIGN: usize = 4096;
/// A batch buffer's capacity: the batch, plus the padding that alignment costs.
const BEHIND_CAPACITY: usize = BEHIND_BATCH + 2 * BEHIND_ALIGN;

/// Runs `work` with a sink that hands its writes to a thread of its own, which writes them
/// to `inner`: copying into the page cache (or the device queue) then runs on another core
/// than decoding. Only non-zero 4 KiB blocks are handed over (zero blocks are never written
/// by the target writers anyway), in batches of a few MiB with bounded memory: copied into
/// the batch from [`Sink::write_at`], referred to in the decoder's buffer from
/// [`Sink::write_shared`]. Every write has reached `inner` (or its error is returned) and
/// every lent buffer has been let go when this returns.
pub fn write_behind<R>(
    inner: &(dyn Sink + '_),
    work: impl FnOnce(&dyn Sink) -> Result<R>,
) -> Result<R> {
    use std::sync::mpsc;
    let failure: std::sync::Mutex<Option<crate::Error>> = std::sync::Mutex::new(None);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (failure, failed) = (&failure, &failed);
    let fail = move |e: crate::Error| {
        failed.store(true, Ordering::Relaxed);
        if let Ok(mut slot) = failure.lock() {
            slot.get_or_insert(e);
        }
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Behind>(BEHIND_DEPTH);
        let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(BEHIND_DEPTH + 1);
        for _ in 0..BEHIND_DEPTH {
            let _ = free_tx.send(Vec::with_capacity(BEHIND_CAPACITY));
        }
        let writer = scope.spawn(move || {
            for message in rx {
                match message {
                    Behind::Write { buf, items } => {
                        if !failed.load(Ordering::Relaxed)
                            && let Err(e) = write_items(inner, &buf, &items)
                        {
                            fail(e);
                        }
                        let mut buf = buf;
                        buf.clear();
                        let _ = free_tx.send(buf);
                    }
                    Behind::Shared { buf, items } => {
                        if !failed.load(Ordering::Relaxed)
                            && let Err(e) = write_items(inner, &buf, &items)
                        {
                            fail(e);
                        }
                        // Dropping `buf` hands it back to the decoder that lent it.
                    }
                    Behind::SetSize(size, reply) => {
                        let _ = reply.send(inner.set_size(size));
                    }
                }
            }
        });
        let sink = BehindSink {
            tx: Some(tx),
            free: std::sync::Mutex::new(free_rx),
            current: std::sync::Mutex::new(Pending::default()),
            failed,
        };
        let result = work(&sink);
        let flushed = sink.flush();
        drop(sink);
        if writer.join().is_err() {
            return Err(err!(Io, "the writer thread stopped unexpectedly"));
        }
        if let Some(e) = failure.lock().ok().and_then(|mut slot| slot.take()) {
            return Err(e);
        }
        let value = result?;
        flushed?;
        Ok(value)
    })
}

enum Behind {
    /// Data in `buf`.
    Write {
        buf: Vec<u8>,
        items: Vec<Item>,
    },
    /// Data in a decoder's buffer, written where it is.
    Shared {
        buf: Shared,
        items: Vec<Item>,
    },
    SetSize(u64, std::sync::mpsc::SyncSender<Result<()>>),
}

/// A run of guest data in a batch buffer: (guest offset, start in the buffer, length).
type Item = (u64, usize, usize);

/// Writes a batch's runs, held in `buf`, to `inner`; stops at the first error.
fn write_items(inner: &(dyn Sink + '_), buf: &[u8], items: &[Item]) -> Result<()> {
    for &(offset, start, len) in items {
        let data = buf.get(start..start + len).ok_or_else(bad_range)?;
        inner.write_at(offset, data)?;
    }
    Ok(())
}

#[derive(Default)]
struct Pending {
    buf: Option<Vec<u8>>,
    items: Vec<Item>,
    /// Runs in a decoder's buffer, sent when the next write names another buffer.
    shared: Option<(Shared, Vec<Item>)>,
}

struct BehindSink<'s> {
    tx: Option<std::sync::mpsc::SyncSender<Behind>>,
    free: std::sync::Mutex<std::sync::mpsc::Receiver<Vec<u8>>>,
    current: std::sync::Mutex<Pending>,
    failed: &'s std::sync::atomic::AtomicBool,
}

impl BehindSink<'_> {
    fn stopped() -> crate::Error {
        err!(Io, "the writer thread stopped")
    }

    fn send(&self, message: Behind) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(Self::stopped)?
            .send(message)
            .map_err(|_| Self::stopped())
    }

    /// Sends what is batched.
    fn flush_locked(&self, current: &mut Pending) -> Result<()> {
        self.flush_shared(current)?;
        if let Some(buf) = current.buf.take() {
            let items = std::mem::take(&mut current.items);
            if items.is_empty() {
                // Nothing in it: keep the buffer for the next batch.
                current.buf = Some(buf);
                return Ok(());
            }
            self.send(Behind::Write { buf, items })?;
        }
        Ok(())
    }

    /// Sends the runs batched in a decoder's buffer.
    fn flush_shared(&self, current: &mut Pending) -> Result<()> {
        match current.shared.take() {
            Some((buf, items)) if !items.is_empty() => self.send(Behind::Shared { buf, items }),
            _ => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        let mut current = self.current.lock().map_err(|_| Self::stopped())?;
        self.flush_locked(&mut current)
    }

    /// Appends one non-zero run to the batch, sending full batches.
    fn push(&self, current: &mut Pending, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if current.buf.is_none() {
                let buf = self
                    .free
                    .lock()
                    .map_err(|_| Self::stopped())?
                    .recv()
                    .map_err(|_| Self::stopped())?;
                current.buf = Some(buf);
            }
            let Some(buf) = current.buf.as_mut() else {
                return Err(Self::stopped());
            };
            // Continue the previous run when this one follows it on the guest disk and in
            // the buffer (one large write instead of many); else pad so that the data sits
            // at its guest offset's position within a page.
            let follows = current
                .items
                .last()
                .is_some_and(|&(o, st, l)| o + l as u64 == offset && st + l == buf.len());
            if !follows {
                let addr = buf.as_ptr() as usize + buf.len();
                let want = (offset % BEHIND_ALIGN as u64) as usize;
                let pad = (want + BEHIND_ALIGN - addr % BEHIND_ALIGN) % BEHIND_ALIGN;
                if buf.len() + pad < BEHIND_CAPACITY {
                    buf.resize(buf.len() + pad, 0);
                }
            }
            // Never past the capacity (the buffer must not move); a run split between
            // batches is split at a page boundary of the guest disk, so that the rest is
            // aligned in the next batch too.
            let room = BEHIND_CAPACITY.saturating_sub(buf.len());
            let mut take = room.min(data.len());
            if take < data.len() {
                let end = offset + take as u64;
                take -= (end % BEHIND_ALIGN as u64) as usize;
            }
            if take == 0 {
                self.flush_locked(current)?;
                continue;
            }
            let start = buf.len();
            buf.extend_from_slice(&data[..take]);
            if follows && let Some(last) = current.items.last_mut() {
                last.2 += take;
            } else {
                current.items.push((offset, start, take));
            }
            offset += take as u64;
            data = &data[take..];
        }
        Ok(())
    }
}

impl Sink for BehindSink<'_> {
    fn set_size(&self, size: u64) -> Result<()> {
        // Writes batched so far reach the target before its size changes.
        self.flush()?;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.send(Behind::SetSize(size, reply))?;
        answer.recv().map_err(|_| Self::stopped())?
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(err!(Io, "writing the target failed"));
        }
        let mut current = self.current.lock().map_err(|_| Self::stopped())?;
        for_non_zero_runs(offset, data, |run| {
            self.push(&mut current, offset + run.start as u64, &data[run])
        })
    }

    fn write_shared(&self, offset: u64, buf: &Shared, range: Range<usize>) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(err!(Io, "writing the target failed"));
        }
        let data = buf.get(range.clone()).ok_or_else(bad_range)?;
        let mut current = self.current.lock().map_err(|_| Self::stopped())?;
        if current
            .shared
            .as_ref()
            .is_some_and(|(held, _)| !Arc::ptr_eq(held, buf))
        {
            self.flush_shared(&mut current)?;
        }
        let (_, items) = current
            .shared
            .get_or_insert_with(|| (Arc::clone(buf), Vec::new()));
        for_non_zero_runs(offset, data, |run| {
            let guest = offset + run.start as u64;
            let start = range.start + run.start;
            match items.last_mut() {
                // Continues the previous run on the guest disk and in the buffer.
                Some(last) if last.0 + last.2 as u64 == guest && last.1 + last.2 == start => {
                    last.2 += run.len();
                }
                _ => items.push((guest, start, run.len())),
            }
            Ok(())
        })
    }
}

/// Calls `f` with every run of `data` (placed at guest offset `offset`) that is not made of
/// zero 4 KiB blocks of the guest disk: only those are handed to the target.
fn for_non_zero_runs(
    offset: u64,
    data: &[u8],
    mut f: impl FnMut(Range<usize>) -> Result<()>,
) -> Result<()> {
    const BLOCK: u64 = 4096;
    let mut pos = 0usize;
    let mut run: Option<usize> = None;
    while pos < data.len() {
        let guest = offset + pos as u64;
        let end = (pos + (BLOCK - guest % BLOCK) as usize).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run) {
            (true, Some(start)) => {
                f(start..pos)?;
                run = None;
            }
            (false, None) => run = Some(pos),
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run {
        f(start..data.len())?;
    }
    Ok(())
}
