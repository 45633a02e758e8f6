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

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, err};

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
        let end = offset.checked_add(data.len() as u64);
        if let Some(size) = self.size
            && end.is_none_or(|end| end > size)
        {
            return Err(err!(
                Corrupt,
                "the image maps {} bytes of data at guest offset {offset}, beyond its own virtual size of {size} bytes; the image is damaged",
                data.len()
            ));
        }
        self.sink.write_at(offset, data)?;
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
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
