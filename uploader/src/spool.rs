//! The spool: received bytes are appended to a file as they arrive, and the importer
//! pipeline reads that file as it grows.
//!
//! The spool is what makes uploads resumable without sending anything twice: the
//! offset a client resumes from is the spool's *durable* length (fsynced before it is
//! published), and the pipeline's [`TailReader`] only ever sees durable bytes, waiting for
//! more until the upload is complete (end of file) or failed (an error).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The shared state of one upload's spool file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    state: Mutex<SpoolState>,
    grown: Condvar,
}

#[derive(Debug, Default)]
struct SpoolState {
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
        self.grown.notify_all();
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
                if s.durable > self.pos {
                    break s.durable - self.pos;
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
