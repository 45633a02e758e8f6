//! Where a read buffer sits decides how fast the kernel fills it.
//!
//! The kernel copies file, pipe and socket data into user memory with `rep movsb`. On CPUs
//! with fast short `rep movsb` (FSRM), that copy slows down about five-fold when the
//! destination lies 1 to 31 bytes past the source modulo 4 KiB (the hardware takes the
//! stores for possible aliases of the loads that follow). Measured on this project's
//! machine (AMD EPYC, kernel 6.18), reading 512 MiB from the page cache with `pread` into a
//! 4 MiB buffer: 0.31 s at 1, 8 or 16 bytes past the page offset of the data, 0.055-0.065 s
//! at 0 and at 32 bytes or more. glibc places every large `malloc` block 16 bytes into its
//! page, and page-cache data starts at its file offset modulo 4 KiB: a plain `vec![0; 4 MiB]`
//! read from offset 0 is the slow case exactly.
//!
//! glibc's `memcpy` uses `rep movsb` for mid-sized copies too, with the same penalty: moving
//! the bytes somewhere else in user space only helps if that copy is placed well as well.
//!
//! [`slow_copy`] tells when a read would be slow, and [`PageBuf`] is a buffer that starts on
//! a page: the decoders read into those, and a stream read in order then lands at the same
//! offset within the page as its source. [`read_placed`] is the safety net for a caller's
//! buffer that sits badly anyway: the kernel fills a small bounce buffer placed 64 bytes
//! past the source's page offset, and the copy on to the caller's buffer then runs 1 to 63
//! bytes *backwards* modulo a page, which is fast (a copy from a buffer that stays in the
//! cache costs a fraction of what the slow kernel copy loses).

use std::io;

/// The page size the placement rule is about.
pub const PAGE: usize = 4096;

/// Destinations this many bytes (or fewer, but not zero) past the source, modulo a page,
/// are slow. 31 measured; a margin to 64 costs nothing.
const SLOW_BELOW: u64 = 64;
/// Where the bounce buffer's bytes sit relative to the source's page offset.
const BOUNCE_SHIFT: usize = SLOW_BELOW as usize;

/// Whether the kernel copying stream bytes that start at `offset` (a file offset, or the
/// count of bytes a pipe delivered so far) into memory at `dst` takes the slow path.
pub fn slow_copy(dst: *const u8, offset: u64) -> bool {
    let distance = (dst as usize as u64).wrapping_sub(offset) % PAGE as u64;
    distance != 0 && distance < SLOW_BELOW
}

/// A zeroed byte buffer that starts on a page boundary.
pub struct PageBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len).finish()
    }
}

impl Default for PageBuf {
    /// An empty buffer (no allocation of note until [`PageBuf::ensure`]).
    fn default() -> Self {
        Self::new(0)
    }
}

impl PageBuf {
    /// Makes the buffer at least `len` bytes long. Contents are not kept when it grows.
    pub fn ensure(&mut self, len: usize) {
        if self.len < len {
            *self = Self::new(len);
        }
    }

    /// `len` zero bytes, page-aligned.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + PAGE];
        // `align_offset` may give up (usize::MAX) only for exotic pointers; a start of 0 is
        // then merely a slower buffer, never a wrong one.
        let start = match storage.as_ptr().align_offset(PAGE) {
            at if at < PAGE => at,
            _ => 0,
        };
        Self {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Reads below this size are left as they are: the slow copy costs little on them.
const MIN_PLACED: usize = 16 << 10;
/// The bounce buffer: large enough for one read call to move a lot, small enough to stay
/// in the CPU cache for the copy out.
const BOUNCE: usize = 256 << 10;

/// Reads into `buf` with `read`, which has the kernel copy stream bytes starting at
/// `offset`; returns what `read` returned. When that copy would be slow ([`slow_copy`]),
/// the kernel fills `bounce` (allocated on first use) instead, 64 bytes past the source's
/// page offset, and the bytes are copied on from there: the read may then return less
/// than `buf.len()` (at most 256 KiB), as any read may.
pub fn read_placed(
    bounce: &mut Option<PageBuf>,
    buf: &mut [u8],
    offset: u64,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    if buf.len() < MIN_PLACED || !slow_copy(buf.as_ptr(), offset) {
        return read(buf);
    }
    let bounce = bounce.get_or_insert_with(|| PageBuf::new(BOUNCE + PAGE));
    let at = ((offset % PAGE as u64) as usize + BOUNCE_SHIFT) % PAGE;
    let len = buf.len().min(BOUNCE);
    let n = read(&mut bounce[at..at + len])?.min(len);
    buf[..n].copy_from_slice(&bounce[at..at + n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slow_copy_flags_destinations_just_past_the_source_in_its_page() {
        let page = 1 << 20; // any page-aligned address
        let at = |addr: usize| addr as *const u8;
        assert!(!slow_copy(at(page), 0));
        assert!(slow_copy(at(page + 16), 0), "malloc's +16 from offset 0");
        assert!(slow_copy(at(page + 1), 0));
        assert!(!slow_copy(at(page + 64), 0));
        assert!(!slow_copy(at(page + 16), 16), "the same place in the page");
        assert!(slow_copy(at(page + 4096 + 20), 8192 + 4));
        assert!(
            !slow_copy(at(page), 16),
            "16 bytes before the source is fine"
        );
    }

    #[test]
    fn page_bufs_start_on_a_page_and_are_zeroed() {
        for len in [0, 1, 4096, 100_000] {
            let b = PageBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn a_badly_placed_buffer_is_filled_through_the_bounce_buffer_with_the_same_bytes() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut storage = PageBuf::new(512 << 10);
        let bad = &mut storage[16..16 + (300 << 10)];
        let mut bounce = None;
        let mut seen = None;
        let n = read_placed(&mut bounce, bad, 0, |into| {
            seen = Some(into.as_ptr() as usize % PAGE);
            let n = into.len().min(data.len());
            into[..n].copy_from_slice(&data[..n]);
            Ok(n)
        })
        .unwrap();
        assert_eq!(seen, Some(64), "the kernel copies 64 bytes past the source");
        assert_eq!(n, BOUNCE, "one bounce buffer's worth");
        assert_eq!(&bad[..n], &data[..n]);

        // From offset 100 the bounce buffer is used 164 bytes into its page.
        let n = read_placed(
            &mut bounce,
            &mut storage[116..116 + (64 << 10)],
            100,
            |into| {
                seen = Some(into.as_ptr() as usize % PAGE);
                into.fill(9);
                Ok(into.len())
            },
        )
        .unwrap();
        assert_eq!((seen, n), (Some(164), 64 << 10));
        // The copy on to the caller's buffer then goes backwards within a page: fast.
        let bounce_at = bounce.as_ref().unwrap().as_ptr() as usize + 164;
        assert!(!slow_copy(storage[116..].as_ptr(), bounce_at as u64));
        assert!(storage[116..116 + n].iter().all(|&b| b == 9));
    }

    #[test]
    fn a_well_placed_or_small_buffer_is_read_into_directly() {
        let mut storage = PageBuf::new(256 << 10);
        let mut bounce = None;
        let start = storage.as_ptr() as usize;
        for (range, offset) in [(0..(128 << 10), 0), (100..1100, 0), (64..(128 << 10), 0)] {
            let buf = &mut storage[range];
            let want = buf.as_ptr() as usize;
            read_placed(&mut bounce, buf, offset, |into| {
                assert_eq!(into.as_ptr() as usize, want);
                Ok(into.len())
            })
            .unwrap();
        }
        assert!(bounce.is_none(), "no bounce buffer was needed");
        assert_eq!(start % PAGE, 0);
    }
}
