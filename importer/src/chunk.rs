//! Sources that lend their bytes instead of copying them out.
//!
//! An HTTP body or an upload arrives as buffers the network stack filled already. Read
//! through [`Read`], each byte is copied once more into the caller's buffer before it is
//! hashed and sent on. [`ChunkRead`] lets such a source hand its buffers on as they are
//! (shared, reference-counted [`Bytes`]): the way into DVCR then costs no copy of ours
//! between the socket that received the image and the socket that sends the layer.
//!
//! Sources without buffers of their own (files, decompressors, standard input) read into
//! pooled buffers through [`Copying`], which is what every source did before.

use std::collections::VecDeque;
use std::io::{self, Read};

use bytes::{Buf, Bytes, BytesMut};

/// Sets glibc's allocator up for a server whose request bodies arrive in chunks that are
/// passed on as they are (the registry, the uploader). Call it before any work starts.
///
/// - A 64 MiB trim threshold: bodies are received into the HTTP server's own read buffers
///   (up to ~400 KiB each, a few in flight) and freed once written or sent on; kept, they
///   are reused, instead of handed back to the kernel and faulted in anew for the next
///   chunks (measured on a 2 GiB push: 5-10% less registry CPU; on a 2 GiB upload through
///   `dvcr-uploader`: 10% less uploader CPU, the page faults gone from its profile; peak
///   RSS +1-5 MiB).
/// - A fixed 4 MiB mmap threshold: S3 part buffers (8 or 128 MiB) are mapped and returned
///   when sent (with glibc's adaptive threshold they end up on the heap after the first free
///   and stay: peak RSS 72 MiB for one 1 GiB push, 42 MiB with a fixed threshold), while
///   1 MiB buffers of blob reads stay on the heap and are reused (at a 1 MiB threshold each
///   was mapped and faulted in anew: pulls took twice as long).
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator tuning; it is called before the server starts
    // its work, takes plain integers, and a refusal (0) leaves the defaults.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// A byte stream that can also lend its next bytes as a shared buffer.
pub trait ChunkRead: Read + Send {
    /// The next bytes of the stream, at most `max` of them; an empty buffer at the end.
    /// Mixing this with [`Read::read`] is allowed: both go on where the other stopped.
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes>;
}

/// A boxed [`ChunkRead`], as sources travel through the pipeline.
pub type BoxChunkRead = Box<dyn ChunkRead>;

impl ChunkRead for BoxChunkRead {
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        (**self).read_chunk(max)
    }
}

/// Any reader as a [`ChunkRead`]: each chunk is read (to the full `max`, unless the stream
/// ends) into a buffer from a small pool.
pub struct Copying<R> {
    inner: R,
    pool: ChunkPool,
}

impl<R> std::fmt::Debug for Copying<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copying").finish_non_exhaustive()
    }
}

impl<R: Read + Send> Copying<R> {
    /// Lends the bytes of `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pool: ChunkPool::default(),
        }
    }
}

impl<R: Read + Send> Read for Copying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: Read + Send> ChunkRead for Copying<R> {
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let mut buf = self.pool.take(max);
        let n = read_full(&mut self.inner, &mut buf)?;
        buf.truncate(n);
        let chunk = buf.freeze();
        if n > 0 {
            self.pool.lend(chunk.clone());
        }
        Ok(chunk)
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Some bytes already taken from a stream (to look at its head), then the rest of it.
pub struct Replay {
    head: VecDeque<Bytes>,
    rest: BoxChunkRead,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("head", &self.head.iter().map(Bytes::len).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl Replay {
    /// `head`, then what `rest` has left.
    pub fn new(head: impl IntoIterator<Item = Bytes>, rest: BoxChunkRead) -> Self {
        Self {
            head: head.into_iter().filter(|b| !b.is_empty()).collect(),
            rest,
        }
    }
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(front) = self.head.front_mut() else {
            return self.rest.read(buf);
        };
        let n = buf.len().min(front.len());
        buf[..n].copy_from_slice(&front.split_to(n));
        if front.is_empty() {
            self.head.pop_front();
        }
        Ok(n)
    }
}

impl ChunkRead for Replay {
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let Some(front) = self.head.front_mut() else {
            return self.rest.read_chunk(max);
        };
        let chunk = front.split_to(max.min(front.len()));
        if front.is_empty() {
            self.head.pop_front();
        }
        Ok(chunk)
    }
}

/// Buffers lent out as chunks, taken back once every holder dropped them: the copy loop
/// then reuses warm memory instead of faulting in fresh pages for every chunk.
#[derive(Default)]
struct ChunkPool {
    lent: VecDeque<Bytes>,
}

impl ChunkPool {
    /// Chunks kept track of (the upload queues a few; more are simply allocated).
    const KEEP: usize = 8;

    /// A buffer of `len` bytes.
    fn take(&mut self, len: usize) -> BytesMut {
        if let Some(front) = self.lent.front()
            && front.is_unique()
            && let Some(chunk) = self.lent.pop_front()
            && let Ok(mut buf) = chunk.try_into_mut()
        {
            buf.resize(len, 0);
            return buf;
        }
        // Page-aligned, where the kernel copies into fastest (`dvcr_formats::align`).
        let page = dvcr_formats::align::PAGE;
        let mut buf = BytesMut::with_capacity(len + page);
        let pad = buf.as_ptr().align_offset(page).min(page);
        buf.resize(pad, 0);
        buf.advance(pad);
        buf.resize(len, 0);
        buf
    }

    fn lend(&mut self, chunk: Bytes) {
        if self.lent.len() == Self::KEEP {
            self.lent.pop_front();
        }
        self.lent.push_back(chunk);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn drain(r: &mut dyn ChunkRead, max: usize) -> (Vec<u8>, Vec<usize>) {
        let (mut all, mut sizes) = (Vec::new(), Vec::new());
        loop {
            let chunk = r.read_chunk(max).unwrap();
            if chunk.is_empty() {
                return (all, sizes);
            }
            sizes.push(chunk.len());
            all.extend_from_slice(&chunk);
        }
    }

    #[test]
    fn copying_lends_full_chunks_of_any_reader_and_an_empty_one_at_the_end() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // A reader that answers in dribbles: chunks are still filled to `max`.
        let dribble = io::Cursor::new(data.clone());
        struct Dribble<R>(R);
        impl<R: Read> Read for Dribble<R> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7);
                self.0.read(&mut buf[..n])
            }
        }
        let mut r = Copying::new(Dribble(dribble));
        let (all, sizes) = drain(&mut r, 4096);
        assert_eq!(all, data);
        assert_eq!(sizes, vec![4096, 4096, 10_000 - 8192]);
    }

    #[test]
    fn copying_reuses_a_buffer_once_every_holder_dropped_it() {
        let data = vec![5u8; 64 << 10];
        let mut r = Copying::new(io::Cursor::new(data));
        let first = r.read_chunk(16 << 10).unwrap();
        let first_at = first.as_ptr();
        drop(first);
        let second = r.read_chunk(16 << 10).unwrap();
        assert_eq!(
            second.as_ptr(),
            first_at,
            "the dropped buffer is taken again"
        );
        let third = r.read_chunk(16 << 10).unwrap();
        assert_ne!(third.as_ptr(), second.as_ptr(), "a held buffer is not");
        assert!(second.iter().chain(third.iter()).all(|&b| b == 5));
    }

    #[test]
    fn copying_reads_into_page_aligned_buffers() {
        let mut r = Copying::new(io::Cursor::new(vec![1u8; 3 << 20]));
        let held: Vec<Bytes> = (0..3).map(|_| r.read_chunk(1 << 20).unwrap()).collect();
        for chunk in &held {
            assert_eq!(chunk.len(), 1 << 20);
            assert_eq!(chunk.as_ptr() as usize % dvcr_formats::align::PAGE, 0);
        }
    }

    #[test]
    fn replay_gives_the_head_again_then_the_rest_through_either_interface() {
        let rest: BoxChunkRead = Box::new(Copying::new(io::Cursor::new(b"world".to_vec())));
        let head = [
            Bytes::from_static(b"hel"),
            Bytes::new(),
            Bytes::from_static(b"lo "),
        ];
        let mut r = Replay::new(head, rest);
        let mut two = [0u8; 2];
        assert_eq!(r.read(&mut two).unwrap(), 2);
        assert_eq!(&two, b"he");
        assert_eq!(&r.read_chunk(100).unwrap()[..], b"l");
        assert_eq!(&r.read_chunk(2).unwrap()[..], b"lo");
        let (tail, _) = drain(&mut r, 100);
        assert_eq!(tail, b" world");
    }
}
