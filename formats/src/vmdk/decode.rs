//! Single-pass decoding of sparse vmdk images: monolithicSparse and streamOptimized.
//!
//! Two ways through the file, chosen by where the grain directory is:
//!
//! - **By the tables** (monolithicSparse, and streamOptimized as qemu writes it): the grain
//!   directory and grain tables sit between the header and the first grain, so they are read
//!   as they stream past, the allocated grains are sorted by their place in the file, and the
//!   rest of the file is read once, each grain (inflated, for streamOptimized) written at its
//!   guest offset. The tables are authoritative: qemu appends grains after a reopen behind
//!   zero padding that reads like an end-of-stream marker, and only the tables see them.
//! - **By the markers** (streamOptimized as VMware writes it, `gdOffset` all ones or a grain
//!   directory after the grains): every grain carries its guest sector in a
//!   `{u64 lba; u32 size}` marker, so the grains are decoded in file order, metadata markers
//!   skipped, until the end-of-stream marker. The footer, authoritative for such images, is
//!   only reached at the end of a stream: the header at the start gives the capacity, and
//!   the footer is checked against it once read.
//!
//! Inflating grains is the expensive part; grains are independent, so they are inflated on
//! `opts.threads` worker threads fed through a bounded queue, each with its own reused
//! `Decompress` state and output buffer. Metadata or grains that lie behind the stream's
//! position are read from the kept head, or by random access when the source is a local
//! file; otherwise the decode fails with a [`crate::ErrorKind::NeedsRandomAccess`] error.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;

use flate2::{Decompress, FlushDecompress, Status};

use super::{
    Layout, MARKER_END_OF_STREAM, MARKER_FOOTER, SECTOR, SPARSE_MAGIC, probe, sparse_layout,
};
use crate::ImageInfo;
use crate::decode::Job;
use crate::error::{Error, Result, err};
use crate::sink::{Output, Sink};
use crate::stream::Stream;
use crate::view::{MAX_READ, View, check_range};

/// Largest read and write of raw grain data.
const CHUNK: usize = 4 << 20;
/// Largest output buffer of one inflater: grains of up to 1 GiB are inflated in pieces.
const INFLATE_CHUNK: usize = 1 << 20;
/// Bytes skipped per read when moving forward over padding and metadata.
const SKIP_CHUNK: usize = 64 << 10;
/// The sorted grain map packs a grain index into 32 bits.
const MAX_GRAINS: u64 = 1 << 32;
/// The most allocated grains a grain map holds (8 bytes each: 512 MiB; with 64 KiB grains
/// that is 4 TiB of data).
const MAX_MAPPED: usize = 64 << 20;
/// Marker type of a grain table.
const MARKER_GT: u32 = 1;
/// Marker type of a grain directory.
const MARKER_GD: u32 = 2;
/// Size of a grain marker's `{u64 lba; u32 size}` header.
const GRAIN_MARKER: usize = 12;

/// Decodes the vmdk image in `job`'s stream into its output.
pub fn decode(job: &mut Job<'_>) -> Result<ImageInfo> {
    if !job.stream.head().starts_with(SPARSE_MAGIC) {
        // Descriptor files and COWD extents: the probe says why they cannot be imported.
        job.stream.parse_head(probe)?;
        return Err(err!(
            InvalidFormat,
            "this vmdk is not a sparse extent and cannot be decoded"
        ));
    }
    let (info, layout) = match &job.random {
        Some(random) => sparse_layout(random, false)?,
        None => job.stream.parse_head(|view| sparse_layout(view, true))?,
    };
    job.out.set_size(info.virtual_size)?;
    if layout.compressed && !layout.markers {
        return Err(err!(
            Unsupported,
            "this vmdk has compressed grains without grain markers, a layout no VMware tool or \
             qemu writes: convert it with `qemu-img convert -O qcow2` and import the result"
        ));
    }
    let by_markers =
        layout.compressed && (layout.gd_at_end() || layout.gd_offset >= layout.overhead);
    let Job {
        stream,
        random,
        out,
        opts,
        ..
    } = job;
    let mut reader = Reader::new(
        stream,
        random.as_deref().map(|r| r as &dyn View),
        by_markers,
    );
    let geometry = Geometry {
        grain: layout.grain_bytes(),
        size: layout.virtual_size(),
    };
    if by_markers {
        with_inflaters(out, opts.threads, geometry, |grains| {
            by_marker_stream(&mut reader, &layout, grains)
        })?;
        if layout.gd_at_end() {
            // Only a stream gets here: the file path read the footer first.
            return check_footer(&mut reader, &layout);
        }
        return Ok(info);
    }
    if layout.gd_at_end() {
        return Err(err!(
            NeedsRandomAccess,
            "this vmdk keeps its grain directory at the end of the file but has no grain markers \
             to decode it in one pass: give the uncompressed file itself (random access) instead \
             of a stream"
        ));
    }
    let map = read_grain_map(&mut reader, &layout)?;
    if layout.compressed {
        with_inflaters(out, opts.threads, geometry, |grains| {
            compressed_by_map(&mut reader, &map, &layout, grains)
        })?;
    } else {
        raw_by_map(&mut reader, &map, &layout, out)?;
    }
    Ok(info)
}

/// Grain size and virtual size in bytes: where inflated grains go and where they stop.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    grain: u64,
    size: u64,
}

/// Forward reads from the stream, with the kept head and random access for what lies
/// behind, and (for the marker path) the last bytes read, where a footer would be.
struct Reader<'j> {
    stream: &'j mut Stream,
    random: Option<&'j dyn View>,
    scratch: Vec<u8>,
    /// The last [`super::FOOTER_LEN`] bytes read, when tracked.
    tail: Option<Vec<u8>>,
}

impl<'j> Reader<'j> {
    fn new(stream: &'j mut Stream, random: Option<&'j dyn View>, track_tail: bool) -> Self {
        Self {
            stream,
            random,
            scratch: Vec::new(),
            tail: track_tail.then(Vec::new),
        }
    }

    fn pos(&self) -> u64 {
        self.stream.pos()
    }

    fn track(&mut self, data: &[u8]) {
        let Some(tail) = &mut self.tail else { return };
        let keep = super::FOOTER_LEN as usize;
        if data.len() >= keep {
            tail.clear();
            tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            tail.extend_from_slice(data);
            let excess = tail.len().saturating_sub(keep);
            tail.drain(..excess);
        }
    }

    /// Reads as much of `buf` as the image holds; returns how much that was.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.stream.read_full(buf)?;
        self.track(&buf[..n]);
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.stream.read_exact(buf, what)?;
        self.track(buf);
        Ok(())
    }

    /// Appends `len` bytes read at the current position to `buf`, growing it as data
    /// arrives so that a hostile length costs no more memory than the image supplies.
    fn read_append(&mut self, buf: &mut Vec<u8>, len: usize, what: &str) -> Result<()> {
        let end = buf.len().saturating_add(len);
        while buf.len() < end {
            let at = buf.len();
            buf.resize(at + (end - at).min(CHUNK), 0);
            let read = self.read_exact(&mut buf[at..], what);
            if read.is_err() {
                buf.truncate(at);
            }
            read?;
        }
        Ok(())
    }

    /// Reads forward to `offset`, discarding.
    fn skip_to(&mut self, offset: u64, what: &str) -> Result<()> {
        if offset < self.pos() {
            // The stream's own refusal says what cannot be reached.
            return self.stream.skip_to(offset, what);
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; SKIP_CHUNK];
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            while self.pos() < offset {
                let want = (offset - self.pos()).min(SKIP_CHUNK as u64) as usize;
                let n = self.read_full(&mut scratch[..want])?;
                if n < want {
                    return Err(err!(
                        Truncated,
                        "the vmdk is truncated: it ends at byte {} before {what} at byte {offset}; \
                         download it again",
                        self.pos()
                    ));
                }
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    /// Fills `buf` with the image's bytes at `offset`: from the stream when they are still
    /// ahead, else from the kept head or by random access.
    fn fetch(&mut self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        if offset >= self.pos() {
            self.skip_to(offset, what)?;
            return self.read_exact(buf, what);
        }
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| {
            err!(
                OutOfBounds,
                "{what} lies at byte {offset}, beyond any possible image"
            )
        })?;
        let head = self.stream.head();
        if end <= head.len() as u64 {
            buf.copy_from_slice(&head[offset as usize..end as usize]);
            return Ok(());
        }
        let Some(random) = self.random else {
            return self.stream.skip_to(offset, what);
        };
        for (i, piece) in buf.chunks_mut(MAX_READ).enumerate() {
            let at = offset + (i * MAX_READ) as u64;
            piece.copy_from_slice(&random.read(at, piece.len(), what)?);
        }
        Ok(())
    }

    /// Reads the rest of the image (keeping its tail).
    fn drain(&mut self) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(SKIP_CHUNK, 0);
        let result = (|| -> Result<()> {
            while self.read_full(&mut scratch)? > 0 {}
            Ok(())
        })();
        self.scratch = scratch;
        result
    }
}

// ---------------------------------------------------------------------------------------
// By the markers

/// Decodes the grains in file order from their markers until the end-of-stream marker.
fn by_marker_stream(
    reader: &mut Reader<'_>,
    layout: &Layout,
    grains: &mut Grains<'_>,
) -> Result<()> {
    let first = layout.overhead.checked_mul(SECTOR).ok_or_else(|| {
        err!(
            OutOfBounds,
            "the vmdk's grains start at sector {}, beyond any possible image",
            layout.overhead
        )
    })?;
    reader.skip_to(first, "the first grain")?;
    let max_compressed = max_compressed(layout.grain_bytes());
    let mut sector = [0u8; SECTOR as usize];
    loop {
        let at = reader.pos();
        let n = reader.read_full(&mut sector)?;
        if n < sector.len() {
            return Err(err!(
                Truncated,
                "the stream-optimized vmdk is truncated: it ends at byte {} without its \
                 end-of-stream marker; download it again",
                at + n as u64
            ));
        }
        let value = u64_at(&sector, 0);
        let size = u32_at(&sector, 8);
        if size == 0 {
            let kind = u32_at(&sector, 12);
            match kind {
                MARKER_END_OF_STREAM => return Ok(()),
                MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                    let end = value
                        .checked_mul(SECTOR)
                        .and_then(|b| b.checked_add(at + SECTOR))
                        .ok_or_else(|| {
                            err!(
                                OutOfBounds,
                                "a metadata marker at byte {at} of the vmdk declares {value} \
                                 sectors, beyond any possible image: the image is damaged"
                            )
                        })?;
                    reader.skip_to(end, "the metadata after a marker")?;
                }
                _ => {
                    return Err(err!(
                        Corrupt,
                        "the stream-optimized vmdk has a marker of unknown type {kind} at byte \
                         {at}: the image is damaged; download it again or re-export it"
                    ));
                }
            }
            continue;
        }
        let lba = value;
        if lba >= layout.capacity || !lba.is_multiple_of(layout.grain) {
            return Err(err!(
                Corrupt,
                "the grain marker at byte {at} of the vmdk places a grain at sector {lba}, \
                 {}: the image is damaged; download it again or re-export it",
                if lba >= layout.capacity {
                    format!("beyond the disk's {} sectors", layout.capacity)
                } else {
                    format!("not on a {}-sector grain boundary", layout.grain)
                }
            ));
        }
        let size = u64::from(size);
        if size > max_compressed {
            return Err(too_big(at, size, layout.grain_bytes()));
        }
        // Proven small above: at most two grains plus a sector.
        let size = size as usize;
        let total = (GRAIN_MARKER + size).next_multiple_of(SECTOR as usize);
        let mut buf = grains.buffer();
        buf.clear();
        buf.extend_from_slice(&sector);
        reader.read_append(&mut buf, total - sector.len(), "a compressed grain")?;
        grains.submit(lba * SECTOR, buf, GRAIN_MARKER..GRAIN_MARKER + size)?;
    }
}

/// After a stream whose header put the grain directory at the end: probes the image again
/// with its footer, which is authoritative, and refuses a footer that disagrees with the
/// header the grains were decoded by.
fn check_footer(reader: &mut Reader<'_>, layout: &Layout) -> Result<ImageInfo> {
    reader.drain()?;
    let view = EndView {
        head: reader.stream.head(),
        tail: reader.tail.as_deref().unwrap_or_default(),
        len: reader.stream.pos(),
    };
    let (info, footer) = sparse_layout(&view, false)?;
    if (footer.capacity, footer.grain) != (layout.capacity, layout.grain) {
        return Err(err!(
            NeedsRandomAccess,
            "the header at the start of this stream-optimized vmdk says {} sectors in grains of \
             {}, but its footer, which counts, says {} sectors in grains of {}: a single pass \
             decoded by the wrong one; give the uncompressed file itself (random access), so \
             that the footer is read first",
            layout.capacity,
            layout.grain,
            footer.capacity,
            footer.grain
        ));
    }
    Ok(info)
}

/// The head and the tail of an image whose length is known: what a probe of a
/// stream-optimized vmdk reads (header, descriptor, footer).
#[derive(Debug)]
struct EndView<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    len: u64,
}

impl View for EndView<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Cow<'_, [u8]>> {
        check_range(self.len, offset, len, what)?;
        let end = offset + len as u64;
        if end <= self.head.len() as u64 {
            return Ok(Cow::Borrowed(&self.head[offset as usize..end as usize]));
        }
        let tail_start = self.len - self.tail.len() as u64;
        if offset >= tail_start {
            let from = (offset - tail_start) as usize;
            return Ok(Cow::Borrowed(&self.tail[from..from + len]));
        }
        Err(err!(
            NeedsRandomAccess,
            "{what} at byte {offset} of the vmdk was not kept while streaming; give the \
             uncompressed file itself (random access) instead of a stream"
        ))
    }
}

// ---------------------------------------------------------------------------------------
// By the tables

/// Reads the grain directory and the grain tables and returns the allocated grains, each
/// packed as `host sector << 32 | grain index`, sorted by host sector (file order).
fn read_grain_map(reader: &mut Reader<'_>, layout: &Layout) -> Result<Vec<u64>> {
    let grains = layout.capacity.div_ceil(layout.grain);
    if grains > MAX_GRAINS {
        return Err(err!(
            Unsupported,
            "this vmdk has {grains} grains of {} sectors, more than the {MAX_GRAINS} this decoder \
             maps: convert it with `qemu-img convert -O qcow2` and import the result",
            layout.grain
        ));
    }
    let per_gt = u64::from(layout.gtes_per_gt);
    // Both bounded by the probe: at most 32 Mi directory entries of 4 bytes.
    let gd_entries = grains.div_ceil(per_gt);
    let mut gd = vec![0u8; (gd_entries * 4) as usize];
    // The probe checked that the directory's place fits in a u64.
    reader.fetch(
        layout.gd_offset.saturating_mul(SECTOR),
        &mut gd,
        "the grain directory",
    )?;
    // (table sector, directory index), read in file order.
    let mut tables: Vec<(u32, u32)> = gd
        .chunks_exact(4)
        .enumerate()
        .filter_map(|(i, e)| {
            let sector = u32_at(e, 0);
            (sector != 0).then_some((sector, i as u32))
        })
        .collect();
    tables.sort_unstable();
    if let Some(w) = tables.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(err!(
            Corrupt,
            "grain directory entries {} and {} of the vmdk both point to the grain table at \
             sector {}: the image is damaged; run `qemu-img check` on it",
            w[0].1,
            w[1].1,
            w[0].0
        ));
    }
    let mut map = Vec::new();
    let mut gt = vec![0u8; layout.gtes_per_gt as usize * 4];
    for (sector, index) in tables {
        reader.fetch(u64::from(sector) * SECTOR, &mut gt, "a grain table")?;
        let first = u64::from(index) * per_gt;
        for (j, entry) in gt.chunks_exact(4).enumerate() {
            let grain = first + j as u64;
            let host = u32_at(entry, 0);
            // Entries past the capacity (the last table's tail) map nothing.
            if grain >= grains || host == 0 || (host == 1 && layout.zeroed_grains) {
                continue;
            }
            if map.len() >= MAX_MAPPED {
                return Err(err!(
                    OutOfBounds,
                    "this vmdk maps more than {MAX_MAPPED} grains, more than this decoder keeps \
                     track of: convert it with `qemu-img convert -O qcow2` and import the result"
                ));
            }
            // `grain` < MAX_GRAINS = 2^32, checked above.
            map.push(u64::from(host) << 32 | grain);
        }
    }
    map.sort_unstable();
    if let Some(w) = map.windows(2).find(|w| w[0] >> 32 == w[1] >> 32) {
        return Err(err!(
            Corrupt,
            "the vmdk maps guest grains {} and {} to the same grain at sector {}: the image is \
             damaged; run `qemu-img check` on it",
            w[0] & 0xffff_ffff,
            w[1] & 0xffff_ffff,
            w[0] >> 32
        ));
    }
    Ok(map)
}

/// Host sector and grain index of a packed map entry.
fn unpack(entry: u64) -> (u64, u64) {
    (entry >> 32, entry & 0xffff_ffff)
}

/// Copies uncompressed grains to their guest offsets, coalescing grains that are contiguous
/// both in the file and on the disk into large reads and writes.
fn raw_by_map(
    reader: &mut Reader<'_>,
    map: &[u64],
    layout: &Layout,
    out: &Output<'_, dyn Sink + '_>,
) -> Result<()> {
    let grain = layout.grain_bytes();
    let size = layout.virtual_size();
    let mut buf = Vec::new();
    let mut i = 0;
    while let Some(&entry) = map.get(i) {
        let (host, index) = unpack(entry);
        let mut n = 1u64;
        while map
            .get(i + n as usize)
            .is_some_and(|&next| unpack(next) == (host + n * layout.grain, index + n))
        {
            n += 1;
        }
        i += n as usize;
        // Grain indexes are below capacity / grain: the guest offset is inside the disk, and
        // the run is cut at its end (the last grain may be partial).
        let guest = index * grain;
        let len = (n * grain).min(size - guest);
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(CHUNK as u64) as usize;
            buf.resize(piece, 0);
            reader.fetch(host * SECTOR + done, &mut buf, "a grain")?;
            out.write(guest + done, &buf)?;
            done += piece as u64;
        }
    }
    Ok(())
}

/// Inflates compressed grains found through the grain tables.
fn compressed_by_map(
    reader: &mut Reader<'_>,
    map: &[u64],
    layout: &Layout,
    grains: &mut Grains<'_>,
) -> Result<()> {
    let max_compressed = max_compressed(layout.grain_bytes());
    let mut marker = [0u8; GRAIN_MARKER];
    for &entry in map {
        let (host, index) = unpack(entry);
        let at = host * SECTOR;
        reader.fetch(at, &mut marker, "a grain marker")?;
        let size = u64::from(u32_at(&marker, 8));
        if size == 0 {
            return Err(err!(
                Corrupt,
                "the vmdk's grain table points to byte {at}, which holds a metadata marker, not \
                 a grain: the image is damaged; run `qemu-img check` on it"
            ));
        }
        if size > max_compressed {
            return Err(too_big(at, size, layout.grain_bytes()));
        }
        let mut buf = grains.buffer();
        buf.clear();
        // Proven small above.
        let size = size as usize;
        let data_at = at + GRAIN_MARKER as u64;
        if data_at >= reader.pos() {
            reader.skip_to(data_at, "a compressed grain")?;
            reader.read_append(&mut buf, size, "a compressed grain")?;
        } else {
            buf.resize(size, 0);
            reader.fetch(data_at, &mut buf, "a compressed grain")?;
        }
        grains.submit(index * layout.grain_bytes(), buf, 0..size)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Inflating grains

/// The most compressed bytes a grain may take: deflate's worst case is a few bytes per
/// 16 KiB over the input; twice the grain leaves room for any encoder.
fn max_compressed(grain: u64) -> u64 {
    grain.saturating_mul(2).saturating_add(4096)
}

fn too_big(at: u64, size: u64, grain: u64) -> Error {
    err!(
        Corrupt,
        "the grain at byte {at} of the vmdk declares {size} compressed bytes for a grain of \
         {grain} bytes: the image is damaged; download it again or re-export it"
    )
}

/// One zlib inflater with its output buffer, reused for every grain.
struct Inflater {
    z: Decompress,
    buf: Vec<u8>,
}

impl Inflater {
    fn new(geometry: Geometry) -> Self {
        Self {
            z: Decompress::new(true),
            buf: vec![0u8; (geometry.grain as usize).min(INFLATE_CHUNK)],
        }
    }

    /// Inflates one grain's zlib stream and writes it at `guest`, cut at the disk's end. A
    /// grain that inflates beyond the grain size, or whose stream is damaged or incomplete,
    /// is an error.
    fn inflate(
        &mut self,
        input: &[u8],
        guest: u64,
        geometry: Geometry,
        out: &Output<'_, dyn Sink + '_>,
    ) -> Result<()> {
        self.z.reset(true);
        let mut done = 0u64;
        loop {
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            let rest = input.get(before_in as usize..).unwrap_or_default();
            let status = self
                .z
                .decompress(rest, &mut self.buf, FlushDecompress::Finish)
                .map_err(|e| {
                    err!(
                        Corrupt,
                        "the compressed grain for guest offset {guest} of the vmdk is damaged \
                         ({e}): download the image again or re-export it"
                    )
                })?;
            let produced = self.z.total_out() - before_out;
            let consumed = self.z.total_in() - before_in;
            if done + produced > geometry.grain {
                return Err(err!(
                    Corrupt,
                    "the compressed grain for guest offset {guest} of the vmdk inflates to more \
                     than the grain size of {} bytes: the image is damaged or hostile",
                    geometry.grain
                ));
            }
            let start = guest + done;
            if start < geometry.size {
                let keep = produced.min(geometry.size - start) as usize;
                out.write(start, &self.buf[..keep])?;
            }
            done += produced;
            if status == Status::StreamEnd {
                return Ok(());
            }
            if produced == 0 && consumed == 0 {
                return Err(err!(
                    Corrupt,
                    "the compressed grain for guest offset {guest} of the vmdk ends before its \
                     zlib stream does: the image is damaged; download it again or re-export it"
                ));
            }
        }
    }
}

/// A compressed grain waiting for an inflater: `buf[data]` inflates to guest offset `guest`.
struct Work {
    guest: u64,
    buf: Vec<u8>,
    data: Range<usize>,
}

/// Where the grain readers hand compressed grains: inflated at once, or queued for workers.
enum Grains<'a> {
    Inline {
        inflater: Inflater,
        spare: Vec<u8>,
        geometry: Geometry,
        out: &'a Output<'a, dyn Sink + 'a>,
    },
    Pool {
        queue: mpsc::SyncSender<Work>,
        spare: mpsc::Receiver<Vec<u8>>,
        failed: &'a AtomicBool,
    },
}

impl Grains<'_> {
    /// A buffer to read a compressed grain into (recycled from inflated ones).
    fn buffer(&mut self) -> Vec<u8> {
        match self {
            Grains::Inline { spare, .. } => std::mem::take(spare),
            Grains::Pool { spare, .. } => spare.try_recv().unwrap_or_default(),
        }
    }

    /// Inflates `buf[data]` to guest offset `guest`, now or on a worker.
    fn submit(&mut self, guest: u64, buf: Vec<u8>, data: Range<usize>) -> Result<()> {
        match self {
            Grains::Inline {
                inflater,
                spare,
                geometry,
                out,
            } => {
                let input = buf.get(data).unwrap_or_default();
                inflater.inflate(input, guest, *geometry, out)?;
                *spare = buf;
                Ok(())
            }
            Grains::Pool { queue, failed, .. } => {
                let stopped = || err!(Io, "a grain decompression worker stopped");
                if failed.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
                queue.send(Work { guest, buf, data }).map_err(|_| stopped())
            }
        }
    }
}

/// Runs `body` with a [`Grains`] that inflates on `threads` workers (inline for one), and
/// returns the first error of either.
fn with_inflaters<'o>(
    out: &'o Output<'o, dyn Sink + 'o>,
    threads: usize,
    geometry: Geometry,
    body: impl FnOnce(&mut Grains<'_>) -> Result<()>,
) -> Result<()> {
    let inline = || Grains::Inline {
        inflater: Inflater::new(geometry),
        spare: Vec::new(),
        geometry,
        out,
    };
    if threads <= 1 {
        return body(&mut inline());
    }
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    let (queue, work) = mpsc::sync_channel::<Work>(threads * 2);
    let work = Mutex::new(work);
    let (recycle, spare) = mpsc::sync_channel::<Vec<u8>>(threads * 4);
    let result = thread::scope(|s| {
        let mut started = 0;
        for _ in 0..threads {
            let recycle = recycle.clone();
            let (work, failure, failed) = (&work, &failure, &failed);
            let spawned = thread::Builder::new()
                .name("dvcr-vmdk-inflate".into())
                .spawn_scoped(s, move || {
                    let mut inflater = Inflater::new(geometry);
                    loop {
                        let next = match work.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(w) = next else { return };
                        if !failed.load(Ordering::Relaxed) {
                            let input = w.buf.get(w.data.clone()).unwrap_or_default();
                            if let Err(e) = inflater.inflate(input, w.guest, geometry, out) {
                                if let Ok(mut slot) = failure.lock() {
                                    slot.get_or_insert(e);
                                }
                                failed.store(true, Ordering::Relaxed);
                            }
                        }
                        let _ = recycle.try_send(w.buf);
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        drop(recycle);
        if started == 0 {
            drop(queue);
            return body(&mut inline());
        }
        let mut grains = Grains::Pool {
            queue,
            spare,
            failed: &failed,
        };
        let result = body(&mut grains);
        // Closing the queue lets the workers finish what is queued and stop.
        drop(grains);
        result
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    result
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::super::{
        FLAG_MARKERS, FLAG_NEWLINE_CHECK, FLAG_ZEROED_GRAINS, GD_AT_END, NEWLINE_CHECK,
    };
    use super::*;
    use crate::decode::{Decoded, Options};
    use crate::error::ErrorKind;
    use crate::sink::MemorySink;
    use std::io::{Cursor, Write};

    /// Grain of the hand-made images: 8 sectors (4 KiB).
    const GRAIN: usize = 4096;

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("compressing in memory");
        enc.finish().expect("compressing in memory")
    }

    /// A sparse extent header: `capacity` sectors in 8-sector grains.
    fn header(
        capacity: u64,
        flags: u32,
        gd_offset: u64,
        overhead: u64,
        compressed: bool,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(SPARSE_MAGIC);
        put_u32(&mut h, 4, 3);
        put_u32(&mut h, 8, flags | FLAG_NEWLINE_CHECK);
        put_u64(&mut h, 12, capacity);
        put_u64(&mut h, 20, (GRAIN / 512) as u64);
        put_u32(&mut h, 44, 512);
        put_u64(&mut h, 56, gd_offset);
        put_u64(&mut h, 64, overhead);
        h[73..77].copy_from_slice(&NEWLINE_CHECK);
        if compressed {
            h[77] = 1;
        }
        h
    }

    fn sector_marker(sectors: u64, kind: u32) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        put_u64(&mut m, 0, sectors);
        put_u32(&mut m, 12, kind);
        m
    }

    /// A grain marker with `compressed` data, padded to whole sectors.
    fn grain(lba: u64, compressed: &[u8]) -> Vec<u8> {
        let mut g = vec![0u8; 12];
        put_u64(&mut g, 0, lba);
        put_u32(&mut g, 8, compressed.len() as u32);
        g.extend_from_slice(compressed);
        g.resize(g.len().next_multiple_of(512), 0);
        g
    }

    /// The guest data of the hand-made stream-optimized image: 20 sectors, a full grain of
    /// pattern at 0, nothing at 4 KiB, a partial last grain (2 KiB) at 8 KiB.
    fn stream_disk() -> Vec<u8> {
        let mut disk = vec![0u8; 20 * 512];
        for (i, b) in disk[..GRAIN].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        disk[2 * GRAIN..].fill(0x5a);
        disk
    }

    /// A VMware-style stream-optimized image of [`stream_disk`], with `grains` in place of
    /// its two grains: header (directory at the end), grains, a grain table, the directory,
    /// the footer and the end-of-stream marker.
    fn stream_image_with(grains: &[Vec<u8>]) -> Vec<u8> {
        let flags = FLAG_MARKERS | 1 << 16;
        let mut b = header(20, flags, GD_AT_END, 1, true);
        for g in grains {
            b.extend_from_slice(g);
        }
        b.extend_from_slice(&sector_marker(4, MARKER_GT));
        b.extend_from_slice(&[0u8; 4 * 512]);
        b.extend_from_slice(&sector_marker(1, MARKER_GD));
        let gd = (b.len() / 512) as u64;
        b.extend_from_slice(&[0u8; 512]);
        b.extend_from_slice(&sector_marker(1, MARKER_FOOTER));
        b.extend_from_slice(&header(20, flags, gd, 1, true));
        b.extend_from_slice(&sector_marker(0, MARKER_END_OF_STREAM));
        b
    }

    fn stream_image() -> Vec<u8> {
        let disk = stream_disk();
        stream_image_with(&[
            grain(0, &zlib(&disk[..GRAIN])),
            grain(16, &zlib(&disk[2 * GRAIN..])),
        ])
    }

    /// The guest data of the hand-made monolithicSparse image: four grains, the first and
    /// last with data, the third a zero grain (entry 1), the second unallocated.
    fn sparse_disk() -> Vec<u8> {
        let mut disk = vec![0u8; 4 * GRAIN];
        disk[..GRAIN].fill(0x11);
        disk[3 * GRAIN..].fill(0x33);
        disk
    }

    /// A monolithicSparse image of [`sparse_disk`]: header, directory at sector 1, table at
    /// 2..6, grains from sector 8, the last grain stored before the first; `gt` replaces
    /// the table's entries.
    fn sparse_image_with(gt: [u32; 4]) -> Vec<u8> {
        let mut b = header(32, FLAG_ZEROED_GRAINS, 1, 8, false);
        b.resize(8 * 512, 0);
        put_u32(&mut b, 512, 2);
        for (i, e) in gt.iter().enumerate() {
            put_u32(&mut b, 1024 + 4 * i, *e);
        }
        let disk = sparse_disk();
        b.extend_from_slice(&disk[3 * GRAIN..]);
        b.extend_from_slice(&disk[..GRAIN]);
        b
    }

    fn sparse_image() -> Vec<u8> {
        sparse_image_with([16, 0, 1, 8])
    }

    fn run(bytes: &[u8], threads: usize) -> (Result<Decoded>, Vec<u8>) {
        let sink = MemorySink::new(1 << 30);
        let opts = Options {
            threads,
            ..Options::default()
        };
        let result =
            crate::decode::decode(Box::new(Cursor::new(bytes.to_vec())), None, &sink, &opts);
        (result, sink.contents())
    }

    /// Decodes `bytes` from a temporary file, with random access.
    fn run_file(bytes: &[u8]) -> (Result<Decoded>, Vec<u8>) {
        let mut file = tempfile::tempfile().expect("a temp file");
        file.write_all(bytes).expect("writing the temp file");
        let view: crate::RandomAccess = Box::new(crate::FileView::new(
            file.try_clone().expect("cloning"),
            bytes.len() as u64,
        ));
        let source = Box::new(std::io::BufReader::new(Cursor::new(bytes.to_vec())));
        let sink = MemorySink::new(1 << 30);
        let result = crate::decode::decode(source, Some(view), &sink, &Options::default());
        (result, sink.contents())
    }

    fn refused(bytes: &[u8], threads: usize) -> (ErrorKind, String) {
        match run(bytes, threads).0 {
            Ok(d) => panic!("expected a refusal, got {d:?}"),
            Err(e) => (e.kind(), e.message().to_owned()),
        }
    }

    #[test]
    fn a_handmade_stream_optimized_image_decodes_to_its_grains_on_one_or_more_threads() {
        for threads in [1, 2, 4] {
            let (result, disk) = run(&stream_image(), threads);
            let decoded = result.expect("decoding");
            assert_eq!(decoded.info.virtual_size, 20 * 512);
            assert_eq!(disk, stream_disk(), "{threads} threads");
            assert_eq!(decoded.data_bytes, (GRAIN + 2048) as u64);
        }
    }

    #[test]
    fn a_grain_that_inflates_beyond_the_grain_size_is_refused() {
        let disk = stream_disk();
        let big = grain(0, &zlib(&vec![7u8; GRAIN + 1]));
        let image = stream_image_with(&[big, grain(16, &zlib(&disk[2 * GRAIN..]))]);
        for threads in [1, 2] {
            let (kind, message) = refused(&image, threads);
            assert_eq!(kind, ErrorKind::Corrupt, "{message}");
            assert!(message.contains("inflates to more"), "{message}");
        }
    }

    #[test]
    fn damaged_or_incomplete_zlib_data_is_refused() {
        let disk = stream_disk();
        let mut bad = zlib(&disk[..GRAIN]);
        bad[0] ^= 0x55;
        let short = zlib(&disk[..GRAIN]);
        for data in [bad, short[..short.len() / 2].to_vec()] {
            let image = stream_image_with(&[grain(0, &data)]);
            for threads in [1, 2] {
                let (kind, message) = refused(&image, threads);
                assert_eq!(kind, ErrorKind::Corrupt, "{message}");
            }
        }
    }

    #[test]
    fn corrupted_grain_markers_are_refused() {
        let disk = stream_disk();
        let data = zlib(&disk[..GRAIN]);
        let cases = [
            (grain(3, &data), "grain boundary"),
            (grain(24, &data), "beyond the disk"),
            (grain(u64::MAX, &data), "beyond the disk"),
            (sector_marker(0, 9), "unknown type 9"),
            (
                sector_marker(u64::MAX, MARKER_GT),
                "beyond any possible image",
            ),
        ];
        for (g, words) in cases {
            let (_, message) = refused(&stream_image_with(&[g]), 1);
            assert!(message.contains(words), "{message:?} lacks {words:?}");
        }
        let mut huge = grain(0, &data);
        put_u32(&mut huge, 8, u32::MAX);
        let (kind, message) = refused(&stream_image_with(&[huge]), 1);
        assert_eq!(kind, ErrorKind::Corrupt, "{message}");
    }

    #[test]
    fn a_stream_optimized_image_without_its_end_of_stream_marker_is_truncated() {
        // Header, a free sector, a grain, the directory behind its marker, and no more.
        let mut b = header(20, FLAG_MARKERS, 4, 2, true);
        b.extend_from_slice(&[0u8; 512]);
        b.extend_from_slice(&grain(0, &zlib(&[1u8; GRAIN])));
        b.extend_from_slice(&sector_marker(1, MARKER_GD));
        b.extend_from_slice(&[0u8; 512]);
        let (kind, message) = refused(&b, 1);
        assert_eq!(kind, ErrorKind::Truncated, "{message}");
        assert!(message.contains("end-of-stream"), "{message}");
    }

    #[test]
    fn a_footer_that_contradicts_the_header_is_refused_from_a_stream_and_used_from_a_file() {
        let disk = stream_disk();
        // A long metadata run makes the image outgrow the head a stream keeps.
        let mut padding = sector_marker(200, MARKER_GT);
        padding.resize(201 * 512, 0);
        let mut image = stream_image_with(&[
            grain(0, &zlib(&disk[..GRAIN])),
            grain(16, &zlib(&disk[2 * GRAIN..])),
            padding,
        ]);
        // Header at the start: 40 sectors; the footer (authoritative) says 20.
        put_u64(&mut image, 12, 40);
        let (kind, message) = refused(&image, 1);
        assert_eq!(kind, ErrorKind::NeedsRandomAccess, "{message}");
        let (result, out) = run_file(&image);
        assert_eq!(
            result.expect("decoding from a file").info.virtual_size,
            20 * 512
        );
        assert_eq!(out, disk);
    }

    #[test]
    fn a_handmade_monolithic_sparse_image_decodes_skipping_unallocated_and_zero_grains() {
        let (result, disk) = run(&sparse_image(), 2);
        let decoded = result.expect("decoding");
        assert_eq!(disk, sparse_disk());
        assert_eq!(decoded.data_bytes, 2 * GRAIN as u64);
    }

    #[test]
    fn without_the_zeroed_grain_flag_entry_1_reads_sector_1_like_qemu() {
        let mut image = sparse_image();
        put_u32(&mut image, 8, FLAG_NEWLINE_CHECK);
        let (result, disk) = run(&image, 1);
        result.expect("decoding");
        assert_eq!(disk[2 * GRAIN..3 * GRAIN], image[512..512 + GRAIN]);
    }

    #[test]
    fn contiguous_grains_are_copied_in_one_run() {
        // Grains 0..4 stored in order: one read, one write.
        let mut b = header(32, 0, 1, 8, false);
        b.resize(8 * 512, 0);
        put_u32(&mut b, 512, 2);
        for i in 0..4u32 {
            put_u32(&mut b, 1024 + 4 * i as usize, 8 + 8 * i);
        }
        let disk: Vec<u8> = (0..4 * GRAIN).map(|i| (i / 512) as u8 | 1).collect();
        b.extend_from_slice(&disk);
        let (result, out) = run(&b, 1);
        result.expect("decoding");
        assert_eq!(out, disk);
    }

    #[test]
    fn grain_table_entries_beyond_the_file_or_shared_between_grains_are_refused() {
        let (kind, _) = refused(&sparse_image_with([16, 0, 0, 4000]), 1);
        assert_eq!(kind, ErrorKind::Truncated);
        let (kind, message) = refused(&sparse_image_with([16, 16, 0, 8]), 1);
        assert_eq!(kind, ErrorKind::Corrupt, "{message}");
        assert!(message.contains("same grain"), "{message}");
        let (kind, message) = refused(&sparse_image_with([u32::MAX, 0, 0, 0]), 1);
        assert!(
            matches!(kind, ErrorKind::Truncated | ErrorKind::OutOfBounds),
            "{kind:?}: {message}"
        );
    }

    #[test]
    fn a_grain_behind_its_table_needs_random_access_from_a_stream_but_not_from_a_file() {
        // The table at sector 300, past the 64 KiB head; the grain it maps at sector 200.
        let mut b = header(32, 0, 1, 8, false);
        b.resize(300 * 512 + 2048, 0);
        put_u32(&mut b, 512, 300);
        put_u32(&mut b, 300 * 512, 200);
        b[200 * 512..200 * 512 + GRAIN].fill(0x42);
        let (kind, message) = refused(&b, 1);
        assert_eq!(kind, ErrorKind::NeedsRandomAccess, "{message}");
        let (result, disk) = run_file(&b);
        result.expect("decoding from a file");
        assert!(disk[..GRAIN].iter().all(|&x| x == 0x42));
        assert!(disk[GRAIN..].iter().all(|&x| x == 0));
    }

    #[test]
    fn truncated_or_corrupted_handmade_images_never_panic() {
        for base in [stream_image(), sparse_image()] {
            for cut in (4..base.len()).step_by(37) {
                let (result, _) = run(&base[..cut], 1);
                assert!(result.is_err(), "cut at {cut} decoded");
            }
            for at in (0..base.len()).step_by(7) {
                for value in [0x00, 0x01, 0x80, 0xff] {
                    let mut bytes = base.clone();
                    bytes[at] = value;
                    let _ = run(&bytes, 2);
                }
            }
        }
    }
}
