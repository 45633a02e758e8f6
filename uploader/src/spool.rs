//! The hand-over between an upload's requests and its importer pipeline: a bounded queue of
//! received bytes, in memory.
//!
//! Requests push the body's frames as they arrive ([`Spool::push`], waiting while the queue
//! holds [`CAPACITY`] bytes); the pipeline, on a thread of its own, reads them in order
//! through a [`TailReader`], which waits for more until the upload is complete (end of
//! stream) or failed (an error). Nothing is written to disk on the way: the bytes go through
//! the pipeline once, into DVCR or onto the disk (a compressed upload, whose unpacked size is
//! unknown, is measured in the pipeline's scratch directory as any import is).
//!
//! Resuming needs no file either: the pipeline and its state (hashes, the image check, the
//! blob upload) live as long as the server, so after a broken connection the client asks
//! how many bytes were received ([`Spool::received`]) and sends the rest, which the pipeline
//! reads on from where it was. Nothing received is ever asked for again.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Semaphore;

/// Bytes received but not yet read by the pipeline, at most: what a slow pipeline makes an
/// upload hold in memory.
pub const CAPACITY: usize = 8 << 20;

/// The shared state of one upload's received bytes.
#[derive(Debug)]
pub struct Spool {
    state: Mutex<SpoolState>,
    grown: Condvar,
    /// Free room in the queue, in bytes: a push takes some, a read gives it back.
    room: Semaphore,
}

#[derive(Debug, Default)]
struct SpoolState {
    /// Frames not yet read, each with the room it took.
    queue: VecDeque<(Bytes, u32)>,
    /// Bytes pushed so far (the offset a client resumes from).
    received: u64,
    complete: bool,
    failed: Option<String>,
    /// The reader was dropped (the pipeline stopped).
    abandoned: bool,
}

impl Default for Spool {
    fn default() -> Self {
        Self::new()
    }
}

impl Spool {
    /// An empty spool.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(SpoolState::default()),
            grown: Condvar::new(),
            room: Semaphore::new(CAPACITY),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // A poisoned lock only means a reader panicked; the counters are still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// Queues `data` for the pipeline, waiting while the queue is full. An error (saying
    /// why) when the upload failed or the pipeline stopped reading: `data` was not taken.
    pub async fn push(&self, data: Bytes) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        // A frame larger than the queue takes all of it.
        let take = u32::try_from(data.len().min(CAPACITY)).unwrap_or(u32::MAX);
        let permit = self.room.acquire_many(take).await;
        let mut s = self.lock();
        if let Some(why) = &s.failed {
            return Err(why.clone());
        }
        if s.abandoned {
            return Err("the import pipeline stopped reading".into());
        }
        match permit {
            // The room is given back by the reader, not when this permit drops.
            Ok(p) => p.forget(),
            Err(_) => return Err("the upload was closed".into()),
        }
        s.received += data.len() as u64;
        s.queue.push_back((data, take));
        self.grown.notify_all();
        Ok(())
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

    /// Makes the reader fail with `why` (the upload was refused or abandoned), and any
    /// waiting or later push too.
    pub fn fail(&self, why: impl Into<String>) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(why.into());
        }
        s.queue.clear();
        drop(s);
        self.room.close();
        self.grown.notify_all();
    }

    /// The reader of the received bytes, from byte 0; there is one per upload.
    pub fn reader(self: &Arc<Self>) -> TailReader {
        TailReader {
            spool: Arc::clone(self),
        }
    }
}

/// A blocking reader of the bytes pushed to a [`Spool`], in order. Never use it on an async
/// reactor thread: it blocks until bytes arrive. Dropping it makes pushes fail.
#[derive(Debug)]
pub struct TailReader {
    spool: Arc<Spool>,
}

impl TailReader {
    /// Takes up to `max` bytes off the front of the queue, as they arrived (no copy), waiting
    /// for more while the upload goes on; empty at the end of the upload.
    fn take(&mut self, max: usize) -> io::Result<Bytes> {
        let mut s = self.spool.lock();
        loop {
            if let Some(why) = &s.failed {
                return Err(io::Error::other(why.clone()));
            }
            if let Some((front, room)) = s.queue.front_mut() {
                let taken = front.split_to(max.min(front.len()));
                if front.is_empty() {
                    let room = *room;
                    s.queue.pop_front();
                    self.spool.room.add_permits(room as usize);
                }
                return Ok(taken);
            }
            if s.complete {
                return Ok(Bytes::new());
            }
            s = self.spool.grown.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let taken = self.take(buf.len())?;
        buf[..taken.len()].copy_from_slice(&taken);
        Ok(taken.len())
    }
}

impl dvcr_importer::chunk::ChunkRead for TailReader {
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        if max == 0 {
            return Ok(Bytes::new());
        }
        self.take(max)
    }
}

impl Drop for TailReader {
    fn drop(&mut self) {
        let mut s = self.spool.lock();
        s.abandoned = true;
        s.queue.clear();
        drop(s);
        // Wakes a push waiting for room that will never come.
        self.spool.room.close();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_gets_every_pushed_byte_in_order_and_ends_on_completion() {
        let spool = Arc::new(Spool::new());
        let mut reader = spool.reader();
        let handle = std::thread::spawn(move || {
            let mut all = Vec::new();
            // Odd read sizes across frame boundaries.
            let mut buf = vec![0u8; 7919];
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&buf[..n]);
            }
        });
        // 40 MiB in uneven frames: five times the queue, so pushes wait for the reader.
        let mut expected = Vec::new();
        for i in 0..700u32 {
            let frame: Vec<u8> = (0..60_000u32).map(|j| (i * 7 + j) as u8).collect();
            expected.extend_from_slice(&frame);
            spool.push(Bytes::from(frame)).await.unwrap();
        }
        assert_eq!(spool.received(), expected.len() as u64);
        spool.complete();
        assert_eq!(handle.join().unwrap(), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_larger_than_the_queue_still_passes() {
        let spool = Arc::new(Spool::new());
        let mut reader = spool.reader();
        let handle = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all.len()
        });
        spool
            .push(Bytes::from(vec![1u8; CAPACITY + 12345]))
            .await
            .unwrap();
        spool.push(Bytes::from_static(b"tail")).await.unwrap();
        spool.complete();
        assert_eq!(handle.join().unwrap(), CAPACITY + 12345 + 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_spool_fails_the_reader_and_a_waiting_push_with_the_reason() {
        let spool = Arc::new(Spool::new());
        let mut reader = spool.reader();
        // Fill the queue so the next push waits.
        spool.push(Bytes::from(vec![0u8; CAPACITY])).await.unwrap();
        let waiting = {
            let spool = Arc::clone(&spool);
            tokio::spawn(async move { spool.push(Bytes::from_static(b"more")).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        spool.fail("the upload is larger than --max-size");
        let pushed = waiting.await.unwrap();
        assert!(pushed.unwrap_err().contains("--max-size"));
        let err = reader.read(&mut [0; 8]).unwrap_err();
        assert!(err.to_string().contains("--max-size"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_waiting_for_a_pipeline_that_stopped_fails_instead_of_hanging() {
        let spool = Arc::new(Spool::new());
        let reader = spool.reader();
        spool.push(Bytes::from(vec![0u8; CAPACITY])).await.unwrap();
        let waiting = {
            let spool = Arc::clone(&spool);
            tokio::spawn(async move { spool.push(Bytes::from_static(b"more")).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(reader);
        let pushed = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the push must not hang")
            .unwrap();
        assert!(pushed.unwrap_err().contains("stopped"));
    }
}
