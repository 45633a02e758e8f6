//! The spool: received bytes are appended to a file as they arrive, and the importer
//! pipeline reads that file as it grows.
//!
//! The spool is what makes uploads resumable without sending anything twice: the
//! offset a client resumes from is the spool's *durable* length (fsynced before it is
//! published). Bytes are written by a [`SpoolWriter`] on a thread of its own and fsynced by
//! another, so receiving never waits for the disk to flush; the pipeline's [`TailReader`]
//! reads what was written (from the page cache), waiting for more until the upload is
//! complete (end of file) or failed (an error). A request that breaks off makes every
//! written byte durable before it answers with the offset to resume from, so a resumed
//! request never rewrites bytes the pipeline has already read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;

/// The shared state of one upload's spool file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    state: Mutex<SpoolState>,
    grown: Condvar,
}

#[derive(Debug, Default)]
struct SpoolState {
    /// Bytes written to the file (the reader may read them).
    written: u64,
    /// Bytes fsynced (a client may resume after them).
    durable: u64,
    complete: bool,
    failed: Option<String>,
}

impl Spool {
    /// A spool backed by `path` (created empty by the caller).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            state: Mutex::new(SpoolState::default()),
            grown: Condvar::new(),
        }
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // A poisoned lock only means a reader panicked; the counters are still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes fsynced to the spool file.
    pub fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// Records that the first `len` bytes are on disk (fsynced) and wakes the reader.
    pub fn publish(&self, len: u64) {
        let mut s = self.lock();
        s.durable = s.durable.max(len);
        s.written = s.written.max(len);
        self.grown.notify_all();
    }

    /// Records that the first `len` bytes are written (not yet fsynced) and wakes the reader.
    pub fn advance(&self, len: u64) {
        let mut s = self.lock();
        s.written = s.written.max(len);
        self.grown.notify_all();
    }

    /// Goes back to `len` durable bytes before a resumed request overwrites the rest.
    pub fn rewind(&self, len: u64) {
        let mut s = self.lock();
        s.written = len;
        s.durable = s.durable.min(len);
    }

    /// Records that every byte has arrived: the reader sees the end after the last one.
    pub fn complete(&self) {
        self.lock().complete = true;
        self.grown.notify_all();
    }

    /// Whether [`Spool::complete`] was called.
    pub fn is_complete(&self) -> bool {
        self.lock().complete
    }

    /// Makes the reader fail with `why` (the upload was refused or abandoned).
    pub fn fail(&self, why: impl Into<String>) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(why.into());
        }
        self.grown.notify_all();
    }

    /// A reader of the spool from byte 0 that waits for more bytes until the upload is
    /// complete.
    pub fn reader(self: &Arc<Self>) -> io::Result<TailReader> {
        Ok(TailReader {
            file: File::open(&self.path)?,
            spool: Arc::clone(self),
            pos: 0,
        })
    }
}

/// A blocking reader that follows the spool file as it grows. Never use it on an async
/// reactor thread: it blocks until bytes arrive.
#[derive(Debug)]
pub struct TailReader {
    spool: Arc<Spool>,
    file: File,
    pos: u64,
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut s = self.spool.lock();
            loop {
                if let Some(why) = &s.failed {
                    return Err(io::Error::other(why.clone()));
                }
                if s.written > self.pos {
                    break s.written - self.pos;
                }
                if s.complete {
                    return Ok(0);
                }
                s = self.spool.grown.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let want = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool file is shorter than the bytes recorded as received",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Bytes gathered before they cross to the writer thread.
const GATHER: usize = 1 << 20;
/// Gathered batches queued for the writer thread (with [`GATHER`], the memory a slow disk
/// can make the upload hold).
const QUEUE: usize = 4;
/// Written bytes not yet fsynced after which the sync thread flushes.
const SYNC_EVERY: u64 = 16 << 20;
/// A slow upload's bytes are flushed at least this often (the offset a client can resume
/// from, and the progress it is shown, lag no more than this).
const SYNC_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// Appends an upload's bytes to its spool file on a thread of its own, and fsyncs them on
/// another (published as durable when the flush covering them ends). Call
/// [`SpoolWriter::finish`] to make every byte durable; dropping it instead stops both threads
/// (what was written stays, what was fsynced stays durable).
#[derive(Debug)]
pub struct SpoolWriter {
    tx: Option<tokio::sync::mpsc::Sender<Vec<Bytes>>>,
    gathered: Vec<Bytes>,
    gathered_len: usize,
    writer: Option<JoinHandle<io::Result<u64>>>,
    syncer: Arc<Syncer>,
    sync_thread: Option<JoinHandle<()>>,
    file: Arc<File>,
    spool: Arc<Spool>,
}

/// What the sync thread is asked to do.
#[derive(Debug, Default)]
struct SyncRequest {
    /// Written length the next flush should cover.
    wanted: u64,
    /// Length covered by the last flush.
    done: u64,
    stop: bool,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Syncer {
    state: Mutex<SyncRequest>,
    wake: Condvar,
}

impl Syncer {
    fn lock(&self) -> MutexGuard<'_, SyncRequest> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }
}

impl SpoolWriter {
    /// Starts appending to `file` (positioned at `start`, the spool's durable length).
    pub fn start(file: File, spool: Arc<Spool>, start: u64) -> io::Result<Self> {
        let file = Arc::new(file);
        let syncer = Arc::new(Syncer::default());
        {
            let mut s = syncer.lock();
            s.wanted = start;
            s.done = start;
        }
        let sync_thread = {
            let (file, spool, syncer) =
                (Arc::clone(&file), Arc::clone(&spool), Arc::clone(&syncer));
            std::thread::Builder::new()
                .name("spool-sync".into())
                .spawn(move || sync_loop(&file, &spool, &syncer))?
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(QUEUE);
        let spawned = {
            let (file, spool, syncer) =
                (Arc::clone(&file), Arc::clone(&spool), Arc::clone(&syncer));
            std::thread::Builder::new()
                .name("spool-write".into())
                .spawn(move || -> io::Result<u64> {
                    let mut written = start;
                    let mut out: &File = &file;
                    while let Some(frames) = rx.blocking_recv() {
                        for f in &frames {
                            out.write_all(f)?;
                            written += f.len() as u64;
                        }
                        spool.advance(written);
                        let mut s = syncer.lock();
                        if written - s.wanted >= SYNC_EVERY {
                            s.wanted = written;
                            syncer.wake.notify_all();
                        }
                    }
                    Ok(written)
                })
        };
        let writer = match spawned {
            Ok(w) => w,
            Err(e) => {
                syncer.stop();
                return Err(e);
            }
        };
        Ok(Self {
            tx: Some(tx),
            gathered: Vec::new(),
            gathered_len: 0,
            writer: Some(writer),
            syncer,
            sync_thread: Some(sync_thread),
            file,
            spool,
        })
    }

    /// Queues `data` (waits while the writer is behind). An error when the writer stopped:
    /// [`SpoolWriter::finish`] then says why.
    pub async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.gathered_len += data.len();
        self.gathered.push(data);
        if self.gathered_len >= GATHER {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> io::Result<()> {
        let frames = std::mem::take(&mut self.gathered);
        self.gathered_len = 0;
        let sent = match &self.tx {
            Some(tx) => tx.send(frames).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(io::Error::other("the spool writer stopped"))
        }
    }

    /// Writes what is queued, fsyncs the file and publishes every byte as durable: the
    /// spool's length, or the first error (of the writes or of a flush).
    pub async fn finish(mut self) -> io::Result<u64> {
        if !self.gathered.is_empty() {
            // A stopped writer reports its error when joined.
            let _ = self.send().await;
        }
        self.tx = None;
        let writer = self.writer.take();
        let sync_thread = self.sync_thread.take();
        let (file, spool, syncer) = (
            Arc::clone(&self.file),
            Arc::clone(&self.spool),
            Arc::clone(&self.syncer),
        );
        tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let joined = match writer {
                Some(w) => w
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the spool writer panicked"))),
                None => Err(io::Error::other("the spool writer is gone")),
            };
            syncer.stop();
            if let Some(t) = sync_thread {
                let _ = t.join();
            }
            let written = joined?;
            if let Some(e) = syncer.lock().error.take() {
                return Err(io::Error::other(e));
            }
            file.sync_data()?;
            spool.publish(written);
            Ok(written)
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread; the sync thread is told to stop. Neither
        // is joined here (this may run on the reactor).
        self.tx = None;
        self.syncer.stop();
    }
}

/// The sync thread: flushes whenever the writer asked for it or [`SYNC_PERIOD`] passed with
/// bytes written, publishing what each flush covered, until told to stop.
fn sync_loop(file: &File, spool: &Spool, syncer: &Syncer) {
    loop {
        let target = {
            let mut s = syncer.lock();
            loop {
                if s.stop {
                    return;
                }
                if s.wanted > s.done {
                    break s.wanted;
                }
                let (next, waited) = syncer
                    .wake
                    .wait_timeout(s, SYNC_PERIOD)
                    .unwrap_or_else(|p| p.into_inner());
                s = next;
                if waited.timed_out() {
                    // Bytes written since the last flush, however few.
                    let written = spool.lock().written;
                    if written > s.done {
                        s.wanted = s.wanted.max(written);
                    }
                }
            }
        };
        // Everything written before this call is covered by it.
        match file.sync_data() {
            Ok(()) => {
                spool.publish(target);
                syncer.lock().done = target;
            }
            Err(e) => {
                syncer.lock().error = Some(format!("cannot sync the spool file: {e}"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn the_reader_waits_for_published_bytes_and_ends_on_completion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut file = File::create(&path).unwrap();
        let spool = Arc::new(Spool::new(path));
        let mut reader = spool.reader().unwrap();
        let handle = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        file.write_all(b"hello ").unwrap();
        // Written but not published: the reader must not see these yet.
        file.write_all(b"world").unwrap();
        spool.publish(6);
        std::thread::sleep(std::time::Duration::from_millis(50));
        spool.publish(11);
        spool.complete();
        assert_eq!(handle.join().unwrap(), b"hello world");
    }

    #[test]
    fn written_bytes_reach_the_reader_before_they_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut file = File::create(&path).unwrap();
        let spool = Arc::new(Spool::new(path));
        let mut reader = spool.reader().unwrap();
        file.write_all(b"abcdef").unwrap();
        spool.advance(4);
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
        assert_eq!(spool.durable(), 0, "advance must not claim durability");
        spool.publish(6);
        assert_eq!(spool.durable(), 6);
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spool_writer_appends_every_byte_and_finishes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"0123").unwrap();
        let spool = Arc::new(Spool::new(path.clone()));
        spool.publish(4);
        let mut reader = spool.reader().unwrap();
        let read_all = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        let mut writer = SpoolWriter::start(file, Arc::clone(&spool), 4).unwrap();
        // 40 MiB in uneven frames: several gathered batches and at least two flushes.
        let mut expected = b"0123".to_vec();
        for i in 0..700u32 {
            let frame: Vec<u8> = (0..60_000u32).map(|j| (i * 7 + j) as u8).collect();
            expected.extend_from_slice(&frame);
            writer.write(Bytes::from(frame)).await.unwrap();
        }
        let len = writer.finish().await.unwrap();
        assert_eq!(len, expected.len() as u64);
        assert_eq!(spool.durable(), len);
        spool.complete();
        assert_eq!(read_all.join().unwrap(), expected);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn a_failed_spool_makes_the_reader_fail_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        File::create(&path).unwrap();
        let spool = Arc::new(Spool::new(path));
        let mut reader = spool.reader().unwrap();
        spool.fail("the upload is larger than --max-size");
        let err = reader.read(&mut [0; 8]).unwrap_err();
        assert!(err.to_string().contains("--max-size"));
    }
}
