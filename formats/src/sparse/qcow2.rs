//! A qcow2 target writer: decoded guest data out as a qcow2 (version 3, compat 1.1) file.
//!
//! Some volumes (filesystem-backed storage classes) prefer qcow2 to a raw file: it stays
//! small on filesystems without sparse-file support and keeps its allocation map through
//! copies. The writer produces 64 KiB clusters, 16-bit refcounts, no compression, no backing
//! file, that `qemu-img check` finds clean.
//!
//! # Layout, and why
//! - Cluster 0: the header, written **last** (after everything else is flushed): a file cut
//!   short by a crash has no qcow2 magic and cannot be mistaken for a complete image.
//! - The L1 table right after the header when the size is declared before the first write
//!   (every format but raw); a raw stream only learns its size at the end, and then the L1
//!   table goes after the data instead.
//! - L2 tables and data clusters in the order the guest data arrives, appended to the end of
//!   the file. An L2 table's cluster is reserved when the first cluster it maps is
//!   allocated, so it precedes its data, as in `qemu-img convert` output: a single-pass
//!   reader of this file (dvcr itself) finds every L2 table before the data it maps.
//! - At [`Qcow2Writer::finish`]: the L2 tables, the L1 table, then the refcount table and
//!   refcount blocks at the end, covering every cluster including themselves.
//!
//! Every cluster of the file is in use exactly once (no cluster is ever freed or shared), so
//! every refcount is 1 and every L1/L2 entry carries the COPIED flag.
//!
//! # Zero clusters
//! A guest cluster whose data is all zero is never allocated: it reads as zero through the
//! unallocated L2 entry. A cluster that receives its data in several writes (512-byte VHD
//! sectors, 4 KiB subclusters) is allocated on its first non-zero write; the rest of a fresh
//! host cluster reads as zero because clusters are only ever appended past the end of the
//! file, where nothing was ever written. Zero 4 KiB blocks inside an allocated cluster are
//! skipped too, leaving holes in the file.
//!
//! # Memory
//! The L2 tables stay in memory until `finish`: one 64 KiB table per 512 MiB of guest disk
//! that holds any data, that is at most 128 KiB per GiB of virtual size (128 MiB for a 1 TiB
//! disk), plus 24 bytes of bookkeeping per 512 MiB. Nothing is kept per guest byte.
//!
//! # Concurrency
//! [`Sink::write_at`] may be called from several threads. Cluster allocation (a counter and
//! the L2 tables) is under one mutex, taken once per call; the data itself is written with
//! positional writes after the lock is released.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{TargetOptions, Written, ZERO_BLOCK, check_requested_size};
use crate::error::{Error, Result, err};
use crate::sink::{Sink, is_zero};

/// log2 of the cluster size: 64 KiB clusters, qemu's default.
const CLUSTER_BITS: u32 = 16;
/// Bytes per cluster.
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries of an L2 table (8 bytes each, one cluster per table).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Guest bytes one L2 table maps: 512 MiB.
const L2_SPAN: u64 = L2_ENTRIES * CLUSTER;
/// log2 of the refcount width in bits: 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// Clusters one refcount block counts: 32768, so one block per 2 GiB of file.
const REFCOUNTS_PER_BLOCK: u64 = (CLUSTER * 8) >> REFCOUNT_ORDER;
/// Refcount block pointers per refcount table cluster.
const POINTERS_PER_CLUSTER: u64 = CLUSTER / 8;
/// qemu refuses L1 tables larger than 32 MiB (`QCOW_MAX_L1_SIZE`): 4 Mi entries, so with
/// 64 KiB clusters the virtual size is at most 2 PiB.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// The largest disk this writer makes.
pub const MAX_DISK_SIZE: u64 = MAX_L1_ENTRIES * L2_SPAN;
/// Host offsets in L1/L2 entries are bits 9..55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": set on every L1 and L2 entry this writer makes.
const COPIED: u64 = 1 << 63;
/// The header: the version 3 fields up to and including `compression_type` (byte 104),
/// padded to a multiple of 8 as the specification requires.
const HEADER_LEN: usize = 112;

/// A qcow2 file target. See the module docs.
#[derive(Debug)]
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    opts: TargetOptions,
    state: Mutex<State>,
    /// Bytes written to the file so far (data and metadata).
    written: AtomicU64,
    /// The file is written under a temporary name beside `path` and renamed over it only
    /// when complete; dropped unfinished, it is removed.
    partial: tempfile::TempPath,
}

/// Allocation state, under the writer's mutex.
#[derive(Debug)]
struct State {
    /// The disk size, once declared: the requested size or the image's, in whole sectors.
    disk_size: Option<u64>,
    /// Where the L1 table lives, once placed.
    l1_offset: Option<u64>,
    /// The first host cluster not allocated yet: the file grows only here.
    next_cluster: u64,
    /// L2 tables by L1 index; `None` where no guest cluster of that 512 MiB holds data.
    l2: Vec<Option<L2Table>>,
    /// The end of the furthest guest range written: a later size must cover it.
    written_end: u64,
}

/// One L2 table, kept in memory until `finish`.
#[derive(Debug)]
struct L2Table {
    /// The host cluster reserved for it.
    host: u64,
    /// Entries as they go on disk (host offset | COPIED), 0 for unallocated.
    entries: Box<[u64]>,
}

/// Where the refcount structures go at the end of a file of `clusters` clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefcountLayout {
    /// Clusters of the refcount table (its first cluster at the old end of file).
    table_clusters: u64,
    /// Refcount blocks, right after the table.
    blocks: u64,
}

impl RefcountLayout {
    /// The smallest table and block count that cover `clusters` existing clusters plus the
    /// table and blocks themselves. Adding blocks can need more blocks and table clusters,
    /// so it iterates until nothing changes (two or three rounds at most).
    fn covering(clusters: u64) -> Self {
        let mut layout = Self {
            table_clusters: 0,
            blocks: 0,
        };
        loop {
            let total = clusters + layout.table_clusters + layout.blocks;
            let blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let next = Self {
                table_clusters: blocks.div_ceil(POINTERS_PER_CLUSTER).max(1),
                blocks,
            };
            if next == layout {
                return layout;
            }
            layout = next;
        }
    }

    /// All clusters of the file once the refcount structures are appended.
    fn total(self, clusters: u64) -> u64 {
        clusters + self.table_clusters + self.blocks
    }
}

/// L1 entries for a disk of `disk_size` bytes.
fn l1_entries(disk_size: u64) -> u64 {
    disk_size.div_ceil(L2_SPAN)
}

/// Clusters of the L1 table for a disk of `disk_size` bytes; at least one, so that the L1
/// offset of even an empty disk points at a cluster of its own.
fn l1_clusters(disk_size: u64) -> u64 {
    (l1_entries(disk_size) * 8).div_ceil(CLUSTER).max(1)
}

impl Qcow2Writer {
    /// Creates the regular file `path` as a qcow2 target (under a temporary name until
    /// [`Qcow2Writer::finish`]; an existing file there is replaced only then). A block device is
    /// refused: the layout appends clusters past the end of the file and relies on them
    /// reading zero, which only holds for a fresh file.
    pub fn create(path: &Path, opts: TargetOptions) -> Result<Self> {
        let shown = path.display();
        let is_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_device {
            return Err(err!(
                Unsupported,
                "{shown} is a block device; a qcow2 target must be a regular file (write a raw disk to a block device)"
            ));
        }
        let (file, partial) = super::create_partial(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            opts,
            state: Mutex::new(State {
                disk_size: None,
                l1_offset: None,
                // Cluster 0 is the header's.
                next_cluster: 1,
                l2: Vec::new(),
                written_end: 0,
            }),
            written: AtomicU64::new(0),
            partial,
        })
    }

    /// Writes the L2 tables, the L1 table, the refcount structures and (after flushing all
    /// of them) the header, and flushes again. Only after this returns is the image complete.
    pub fn finish(self) -> Result<Written> {
        let state = self
            .state
            .into_inner()
            .map_err(|_| err!(Io, "a writer thread failed"))?;
        let Some(disk_size) = state.disk_size else {
            return Err(err!(
                InvalidFormat,
                "the image never declared its size; nothing was written"
            ));
        };
        let io = |what: &str, e| Error::io(format!("{what} {}", self.path.display()), e);
        let mut next = state.next_cluster;
        let l1_offset = match state.l1_offset {
            Some(offset) => offset,
            None => {
                let offset = next * CLUSTER;
                next += l1_clusters(disk_size);
                offset
            }
        };
        let mut metadata = 0u64;

        // L2 tables, and the L1 table that points at them.
        let l1_len = l1_entries(disk_size) as usize;
        let mut l1 = vec![0u64; l1_len];
        let mut buf = vec![0u8; CLUSTER as usize];
        for (index, table) in state.l2.iter().enumerate() {
            let Some(table) = table else { continue };
            let Some(entry) = l1.get_mut(index) else {
                // set_size refuses a size smaller than what was written, so every table
                // is inside the L1 table.
                return Err(err!(OutOfBounds, "guest data beyond the end of the disk"));
            };
            *entry = (table.host * CLUSTER) | COPIED;
            encode_be(&table.entries, &mut buf);
            self.file
                .write_all_at(&buf, table.host * CLUSTER)
                .map_err(|e| io("writing an L2 table of", e))?;
            metadata += CLUSTER;
        }
        let mut l1_bytes = vec![0u8; l1_len * 8];
        encode_be(&l1, &mut l1_bytes);
        self.file
            .write_all_at(&l1_bytes, l1_offset)
            .map_err(|e| io("writing the L1 table of", e))?;
        metadata += l1_bytes.len() as u64;

        // Refcount table and blocks at the end: every cluster, themselves included, is 1.
        let layout = RefcountLayout::covering(next);
        let total = layout.total(next);
        let table_offset = next * CLUSTER;
        let first_block = next + layout.table_clusters;
        let pointers: Vec<u64> = (0..layout.blocks)
            .map(|i| (first_block + i) * CLUSTER)
            .collect();
        let mut table_bytes = vec![0u8; pointers.len() * 8];
        encode_be(&pointers, &mut table_bytes);
        self.file
            .write_all_at(&table_bytes, table_offset)
            .map_err(|e| io("writing the refcount table of", e))?;
        metadata += table_bytes.len() as u64;
        for block in 0..layout.blocks {
            let counted = (total - block * REFCOUNTS_PER_BLOCK).min(REFCOUNTS_PER_BLOCK) as usize;
            fill_refcount_block(&mut buf, counted);
            self.file
                .write_all_at(&buf, (first_block + block) * CLUSTER)
                .map_err(|e| io("writing a refcount block of", e))?;
            metadata += CLUSTER;
        }
        self.file
            .set_len(total * CLUSTER)
            .map_err(|e| io("setting the size of", e))?;

        // Everything the header points at is on stable storage before the header is.
        self.file
            .sync_data()
            .map_err(|e| io("flushing to stable storage", e))?;
        let header = Header {
            disk_size,
            l1_offset,
            l1_entries: l1_len as u32,
            refcount_table_offset: table_offset,
            refcount_table_clusters: layout.table_clusters as u32,
        }
        .encode();
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| io("writing the header of", e))?;
        metadata += header.len() as u64;
        self.file
            .sync_all()
            .map_err(|e| io("flushing to stable storage", e))?;
        super::publish(self.partial, &self.path)?;
        Ok(Written {
            disk_size,
            bytes_written: self.written.load(Ordering::Relaxed) + metadata,
            bytes_zeroed: 0,
        })
    }
}

/// A slice of `data` to write at a host offset.
#[derive(Debug, Clone, Copy)]
struct Segment {
    host: u64,
    start: usize,
    end: usize,
}

impl Sink for Qcow2Writer {
    fn set_size(&self, size: u64) -> Result<()> {
        check_requested_size(size, self.opts.size)?;
        let requested = self.opts.size.unwrap_or(size);
        // qemu reads a qcow2's size in whole 512-byte sectors, as `qemu-img create` rounds.
        let disk = requested
            .checked_next_multiple_of(512)
            .filter(|&d| d <= MAX_DISK_SIZE)
            .ok_or_else(|| {
                err!(
                    Unsupported,
                    "a disk of {requested} bytes is larger than a qcow2 target can hold ({MAX_DISK_SIZE} bytes); write a raw disk instead"
                )
            })?;
        let mut state = self.lock()?;
        match state.disk_size {
            Some(known) if known == disk => return Ok(()),
            Some(known) => {
                return Err(err!(
                    InvalidFormat,
                    "the image declared its size twice ({known} and {disk} bytes)"
                ));
            }
            None => {}
        }
        if state.written_end > disk {
            return Err(err!(
                Corrupt,
                "the image wrote data up to byte {} but declares a size of {size} bytes; the image is damaged",
                state.written_end
            ));
        }
        state.disk_size = Some(disk);
        // Nothing allocated yet: the L1 table goes right after the header.
        if state.next_cluster == 1 {
            state.l1_offset = Some(CLUSTER);
            state.next_cluster += l1_clusters(disk);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // Checked before any offset arithmetic below; the disk's own size under the lock.
        let out_of_bounds = |limit: u64| {
            err!(
                OutOfBounds,
                "a write of {} bytes at guest offset {offset} ends past the disk's {limit} bytes",
                data.len()
            )
        };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_DISK_SIZE)
            .ok_or_else(|| out_of_bounds(MAX_DISK_SIZE))?;

        // 1. Non-zero runs of guest-aligned ZERO_BLOCKs, found before taking the lock.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let block_end =
                (pos + ZERO_BLOCK - (guest % ZERO_BLOCK as u64) as usize).min(data.len());
            if !is_zero(&data[pos..block_end]) {
                match runs.last_mut() {
                    Some(run) if run.1 == pos => run.1 = block_end,
                    _ => runs.push((pos, block_end)),
                }
            }
            pos = block_end;
        }

        // 2. Host clusters for them, under the lock; contiguous pieces merged.
        let mut segments: Vec<Segment> = Vec::with_capacity(runs.len());
        {
            let mut state = self.lock()?;
            if let Some(size) = state.disk_size
                && end > size
            {
                return Err(out_of_bounds(size));
            }
            state.written_end = state.written_end.max(end);
            for &(start, stop) in &runs {
                let mut pos = start;
                while pos < stop {
                    let guest = offset + pos as u64;
                    let within = guest % CLUSTER;
                    let piece_end = (pos + (CLUSTER - within) as usize).min(stop);
                    let host = state.host_cluster(guest / CLUSTER)? * CLUSTER + within;
                    match segments.last_mut() {
                        Some(s) if s.end == pos && s.host + (s.end - s.start) as u64 == host => {
                            s.end = piece_end;
                        }
                        _ => segments.push(Segment {
                            host,
                            start: pos,
                            end: piece_end,
                        }),
                    }
                    pos = piece_end;
                }
            }
        }

        // 3. The data, without the lock.
        for s in segments {
            self.file
                .write_all_at(&data[s.start..s.end], s.host)
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
            let len = (s.end - s.start) as u64;
            let before = self.written.fetch_add(len, Ordering::Relaxed);
            super::write_back_as_written(&self.file, before, before + len);
        }
        Ok(())
    }
}

impl Qcow2Writer {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| err!(Io, "a writer thread failed"))
    }
}

impl State {
    /// The host cluster of guest cluster `guest`, allocated (with its L2 table) if needed.
    fn host_cluster(&mut self, guest: u64) -> Result<u64> {
        let l1_index = (guest / L2_ENTRIES) as usize;
        let l2_index = (guest % L2_ENTRIES) as usize;
        if self.l2.len() <= l1_index {
            self.l2.resize_with(l1_index + 1, || None);
        }
        let table = match &mut self.l2[l1_index] {
            Some(table) => table,
            slot @ None => {
                let host = allocate(&mut self.next_cluster)?;
                slot.insert(L2Table {
                    host,
                    entries: vec![0u64; L2_ENTRIES as usize].into_boxed_slice(),
                })
            }
        };
        let entry = table.entries[l2_index];
        if entry != 0 {
            return Ok((entry & OFFSET_MASK) / CLUSTER);
        }
        let host = allocate(&mut self.next_cluster)?;
        table.entries[l2_index] = (host * CLUSTER) | COPIED;
        Ok(host)
    }
}

/// Takes the next host cluster. Host offsets are 56-bit in L1/L2 entries; a disk within
/// [`MAX_DISK_SIZE`] never comes near, but the bound is checked rather than assumed.
fn allocate(next: &mut u64) -> Result<u64> {
    let host = *next;
    if (host + 1) * CLUSTER > OFFSET_MASK {
        return Err(err!(
            OutOfBounds,
            "the qcow2 file would grow past the format's 64 PiB limit"
        ));
    }
    *next += 1;
    Ok(host)
}

/// `values` as big-endian bytes into the front of `out` (which is at least 8 per value);
/// the rest of `out` is zeroed.
fn encode_be(values: &[u64], out: &mut [u8]) {
    let (used, rest) = out.split_at_mut(values.len() * 8);
    for (chunk, v) in used.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    rest.fill(0);
}

/// A refcount block whose first `counted` clusters have refcount 1 and the rest 0.
fn fill_refcount_block(block: &mut [u8], counted: usize) {
    let (ones, zeros) = block.split_at_mut(counted * 2);
    for pair in ones.chunks_exact_mut(2) {
        pair.copy_from_slice(&1u16.to_be_bytes());
    }
    zeros.fill(0);
}

/// The fields of the header this writer sets; the others are zero.
#[derive(Debug, Clone, Copy)]
struct Header {
    disk_size: u64,
    l1_offset: u64,
    l1_entries: u32,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
}

impl Header {
    /// The version 3 header. Zero fields: backing file (none), encryption (none), snapshots
    /// (none), incompatible/compatible/autoclear features (none: not dirty, no extended L2),
    /// compression type (deflate, never used). No header extensions follow: the zero bytes
    /// after the header read as the end-of-extensions marker.
    fn encode(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.disk_size.to_be_bytes());
        put(36, &self.l1_entries.to_be_bytes());
        put(40, &self.l1_offset.to_be_bytes());
        put(48, &self.refcount_table_offset.to_be_bytes());
        put(56, &self.refcount_table_clusters.to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &(HEADER_LEN as u32).to_be_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn the_refcount_layout_covers_every_cluster_including_itself() {
        for clusters in [
            1,
            2,
            REFCOUNTS_PER_BLOCK - 2,
            REFCOUNTS_PER_BLOCK - 1,
            REFCOUNTS_PER_BLOCK,
            5 * REFCOUNTS_PER_BLOCK + 17,
            POINTERS_PER_CLUSTER * REFCOUNTS_PER_BLOCK - 3,
            POINTERS_PER_CLUSTER * REFCOUNTS_PER_BLOCK + 1,
        ] {
            let l = RefcountLayout::covering(clusters);
            let total = l.total(clusters);
            assert!(l.blocks * REFCOUNTS_PER_BLOCK >= total, "{clusters}: {l:?}");
            assert!(
                l.table_clusters * POINTERS_PER_CLUSTER >= l.blocks,
                "{clusters}"
            );
            // Minimal: one block fewer would not cover the file.
            assert!((l.blocks - 1) * REFCOUNTS_PER_BLOCK < total, "{clusters}");
        }
    }

    #[test]
    fn the_refcount_layout_grows_a_block_when_it_no_longer_fits_in_the_last_one() {
        // 32766 clusters + 1 table + 1 block = exactly one full block.
        let l = RefcountLayout::covering(REFCOUNTS_PER_BLOCK - 2);
        assert_eq!((l.table_clusters, l.blocks), (1, 1));
        // One more cluster and the block must count itself in a second block.
        let l = RefcountLayout::covering(REFCOUNTS_PER_BLOCK - 1);
        assert_eq!((l.table_clusters, l.blocks), (1, 2));
    }

    #[test]
    fn the_l1_table_has_one_entry_per_512_mib_and_at_least_one_cluster() {
        assert_eq!(L2_SPAN, 512 << 20);
        assert_eq!(l1_entries(0), 0);
        assert_eq!(l1_clusters(0), 1);
        assert_eq!(l1_entries(1), 1);
        assert_eq!(l1_entries(512 << 20), 1);
        assert_eq!(l1_entries((512 << 20) + 512), 2);
        // 8192 entries fill one cluster: 4 TiB.
        assert_eq!(l1_clusters(4 << 40), 1);
        assert_eq!(l1_clusters((4 << 40) + 512), 2);
        assert_eq!(l1_entries(MAX_DISK_SIZE), MAX_L1_ENTRIES);
    }

    #[test]
    fn the_header_has_the_version_3_fields_at_their_offsets() {
        let h = Header {
            disk_size: 0x1234_5600,
            l1_offset: 0x10000,
            l1_entries: 3,
            refcount_table_offset: 0x50000,
            refcount_table_clusters: 1,
        }
        .encode();
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        assert_eq!(&h[..4], b"QFI\xfb");
        assert_eq!(be32(4), 3);
        assert_eq!(be64(8), 0, "no backing file");
        assert_eq!(be32(20), 16);
        assert_eq!(be64(24), 0x1234_5600);
        assert_eq!(be32(32), 0, "no encryption");
        assert_eq!((be32(36), be64(40)), (3, 0x10000));
        assert_eq!((be64(48), be32(56)), (0x50000, 1));
        assert_eq!(be64(72), 0, "no incompatible features");
        assert_eq!(be32(96), 4);
        assert_eq!(be32(100), 112);
        assert_eq!(h[104], 0, "deflate compression type");
    }

    #[test]
    fn a_refcount_block_counts_one_for_the_used_clusters_only() {
        let mut block = vec![0xffu8; CLUSTER as usize];
        fill_refcount_block(&mut block, 3);
        assert_eq!(&block[..8], &[0, 1, 0, 1, 0, 1, 0, 0]);
        assert!(block[6..].iter().all(|&b| b == 0));
    }

    fn writer(dir: &tempfile::TempDir, opts: TargetOptions) -> Qcow2Writer {
        match Qcow2Writer::create(&dir.path().join("t.qcow2"), opts) {
            Ok(w) => w,
            Err(e) => panic!("creating a target: {e}"),
        }
    }

    #[test]
    fn partial_writes_into_one_cluster_share_one_host_cluster_after_its_l2_table() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let w = writer(&dir, TargetOptions::default());
        assert!(w.set_size(1 << 30).is_ok());
        assert!(w.write_at(512, &[1u8; 512]).is_ok());
        assert!(w.write_at(70_000, &[0u8; 512]).is_ok(), "a zero write");
        assert!(w.write_at(4096, &[2u8; 4096]).is_ok());
        let state = w.lock().ok();
        let state = state.as_deref();
        // Header, one L1 cluster, the L2 table, one data cluster.
        assert_eq!(state.map(|s| s.next_cluster), Some(4));
        assert_eq!(state.map(|s| s.l1_offset), Some(Some(CLUSTER)));
        let table = state.and_then(|s| s.l2[0].as_ref());
        assert_eq!(table.map(|t| t.host), Some(2));
        assert_eq!(table.map(|t| t.entries[0]), Some((3 * CLUSTER) | COPIED));
        assert_eq!(
            table.map(|t| t.entries[1]),
            Some(0),
            "zero data allocates nothing"
        );
    }

    #[test]
    fn a_size_declared_after_the_writes_puts_the_l1_table_after_the_data() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let w = writer(&dir, TargetOptions::default());
        assert!(w.write_at(0, &[7u8; 100_000]).is_ok());
        assert!(w.set_size(100_352).is_ok());
        let placed = w.lock().ok().map(|s| (s.l1_offset, s.next_cluster));
        assert_eq!(placed, Some((None, 4)));
        let done = w.finish().ok();
        assert_eq!(done.map(|d| d.disk_size), Some(100_352));
    }

    #[test]
    fn a_size_smaller_than_the_data_already_written_is_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let w = writer(&dir, TargetOptions::default());
        assert!(w.write_at(0, &[7u8; 8192]).is_ok());
        let kind = w.set_size(4096).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Corrupt));
    }

    #[test]
    fn writes_past_the_disk_and_a_smaller_requested_size_are_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let w = writer(&dir, TargetOptions::default());
        assert!(w.set_size(1 << 20).is_ok());
        let kind = w.write_at((1 << 20) - 1, &[1, 2]).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
        let kind = w.write_at(u64::MAX, &[1]).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
        let kind = w.write_at(u64::MAX - 1, &[1, 2]).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
        let unsized_writer = writer(&dir, TargetOptions::default());
        let kind = unsized_writer
            .write_at(u64::MAX - 1, &[1, 2, 3])
            .err()
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
        let small = TargetOptions {
            size: Some(4096),
            ..TargetOptions::default()
        };
        let kind = writer(&dir, small).set_size(8192).err().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
    }

    #[test]
    fn a_disk_beyond_the_qcow2_limit_is_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let kind = writer(&dir, TargetOptions::default())
            .set_size(MAX_DISK_SIZE + 1)
            .err()
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Unsupported));
    }
}
