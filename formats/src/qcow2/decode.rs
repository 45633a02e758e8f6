//! Single-pass qcow2 decoding: clusters are written to the guest disk as they stream past.
//!
//! qcow2 maps guest clusters through two levels of tables (L1 → L2 → host cluster), and
//! nothing forces the tables to come before the data they map: `qemu-img convert -c` writes a
//! few compressed clusters before the L2 table that maps them, `qemu-img resize` moves the L1
//! table after the data, and after an internal snapshot L2 tables are copied on write. So the
//! decoder walks the image in host order, chunk by chunk, and for each chunk:
//!
//! 1. parses the L1 table and the wanted L2 tables that lie in it (tables found in a chunk
//!    can point at tables in the same chunk, so this repeats until nothing new appears);
//!    a mapping to bytes already passed is served from the [`Pending`] store, or from random
//!    access to the file when the source is a local file;
//! 2. writes the data clusters mapped into the chunk, in contiguous runs, and hands the
//!    compressed clusters to a pool of decompression threads (clusters are independent);
//! 3. keeps the bytes no known table claims in [`Pending`] (bounded memory, then scratch),
//!    because a later table may still map them; once the L1 and every L2 table it names
//!    have been read, nothing more can be claimed, and the store is dropped.
//!
//! Zero clusters, zero subclusters and unallocated clusters are never written: the target
//! reads zero there. Every table entry is checked (alignment, range, the virtual size)
//! before it is used; a compressed cluster that inflates to more or less than a cluster is
//! refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

use super::{ClusterCompression, Header};
use crate::ImageInfo;
use crate::decode::Job;
use crate::error::{Error, Result, err};
use crate::pending::Pending;
use crate::sink::{Output, Shared, SharedPool, Sink};
use crate::view::View;

/// Bytes read from the stream at a time (a multiple of every cluster size, 512 B..2 MiB).
/// The write-behind sink holds a few read buffers while it writes their data clusters out,
/// so this size times about six is what reading costs in memory (2 MiB: 4 MiB was no faster
/// and cost 8 MiB more at the peak).
const CHUNK: u64 = 2 << 20;
/// Compressed bytes handed to a decompression thread at a time.
const BATCH: usize = 1 << 20;
/// Inflated bytes per buffer lent to the sink (each decompression thread has a few).
const INFLATED: usize = 1 << 20;
/// The largest bytes a compressed cluster descriptor can span: (2^(cluster_bits-8) sectors,
/// the most the sector field holds for 2 MiB clusters, plus one) — checked per image.
const L2_ENTRY_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// Decodes the qcow2 image in `job` into its output. See the module docs.
pub fn decode(job: &mut Job<'_>) -> Result<ImageInfo> {
    let header = job.stream.parse_head(|view| super::parse(view))?;
    let info = job.stream.parse_head(|view| super::probe(view))?;
    job.out.set_size(header.size)?;
    let Job {
        stream,
        random,
        out,
        opts,
        scratch_bytes,
    } = job;
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let threads = opts.threads.max(1);
    let (tx, rx) = mpsc::sync_channel::<Batch>(threads * 2);
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        let out: &Output<'_, dyn Sink + '_> = &*out;
        for _ in 0..threads {
            let rx = &rx;
            let failed = &failed;
            let first_error = &first_error;
            let header = &header;
            scope.spawn(move || {
                let mut inflater = Inflater::new(header);
                let mut pool = SharedPool::default();
                loop {
                    let batch = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok(batch) = batch else { return };
                    if failed.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Err(e) = batch.run(&mut inflater, out, &mut pool) {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                    }
                }
            });
        }
        let random = random.as_deref().map(|r| r as &dyn View);
        let mut decoder = Decoder::new(&header, random, out, opts, tx, &failed);
        let result = decoder.run(stream);
        *scratch_bytes += decoder.pending.scratch_bytes();
        // Dropping the decoder closes the channel: the threads finish the queue and stop.
        drop(decoder);
        result
    });
    if let Some(e) = first_error.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(e);
    }
    result?;
    Ok(info)
}

/// A run of contiguous data clusters ahead in the stream: host bytes `host..host+len` are
/// guest bytes `guest..guest+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    guest: u64,
    len: u64,
    /// Part of it was already read: the image ended inside it (the rest reads zero).
    started: bool,
}

/// A compressed cluster: at most `max_len` bytes from its host offset inflate to one
/// cluster, of which `out_len` bytes (less at the end of the disk) go to `guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Compressed {
    guest: u64,
    max_len: u64,
    out_len: u32,
}

/// Compressed clusters for one decompression thread: their bytes back to back.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<u8>,
    /// (guest offset, start in data, end in data, bytes to write)
    items: Vec<(u64, usize, usize, u32)>,
}

impl Batch {
    fn push(&mut self, guest: u64, bytes: &[u8], out_len: u32) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.items.push((guest, start, self.data.len(), out_len));
    }

    /// Inflates the clusters into buffers lent to the sink (a few clusters each), which
    /// writes them from there: no copy of the inflated bytes.
    fn run(
        &self,
        inflater: &mut Inflater,
        out: &Output<'_, dyn Sink + '_>,
        pool: &mut SharedPool,
    ) -> Result<()> {
        let cluster = inflater.cluster;
        for group in self.items.chunks((INFLATED / cluster).max(1)) {
            // One byte more than the clusters: the inflater notices a cluster that inflates
            // past its end by writing into the next one's first byte (inflated after it).
            let mut shared = pool.take(group.len() * cluster + 1);
            let buf = SharedPool::fill(&mut shared)?;
            for (i, &(guest, start, end, _)) in group.iter().enumerate() {
                let at = i * cluster;
                inflater.inflate(
                    &self.data[start..end],
                    guest,
                    &mut buf[at..at + cluster + 1],
                )?;
            }
            for (i, &(guest, _, _, out_len)) in group.iter().enumerate() {
                let at = i * cluster;
                out.write_shared(guest, &shared, at..at + out_len as usize)?;
            }
            pool.give(shared);
        }
        Ok(())
    }
}

/// A reusable decompressor for one thread.
struct Inflater {
    kind: ClusterCompression,
    cluster: usize,
    deflate: flate2::Decompress,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

impl Inflater {
    fn new(header: &Header) -> Self {
        let cluster = header.cluster_size() as usize;
        Self {
            kind: header.compression,
            cluster,
            deflate: flate2::Decompress::new(false),
            zstd: None,
        }
    }

    /// Inflates one compressed cluster (whose descriptor may cover a few bytes more than
    /// its stream: they are ignored, as QEMU does) into `dst`, a cluster and one byte more
    /// (to notice data that inflates past the cluster).
    fn inflate(&mut self, src: &[u8], guest: u64, dst: &mut [u8]) -> Result<()> {
        let produced = match self.kind {
            ClusterCompression::Deflate => {
                self.deflate.reset(false);
                let status = self
                    .deflate
                    .decompress(src, dst, flate2::FlushDecompress::Finish);
                if let Err(e) = status {
                    return Err(err!(
                        Corrupt,
                        "the compressed qcow2 cluster for guest offset {guest} is damaged ({e}); the image is corrupt, download it again"
                    ));
                }
                self.deflate.total_out() as usize
            }
            ClusterCompression::Zstd => self.inflate_zstd(src, guest, dst)?,
        };
        if produced > self.cluster {
            return Err(err!(
                Corrupt,
                "the compressed qcow2 cluster for guest offset {guest} inflates past the cluster size of {} bytes; the image is corrupt",
                self.cluster
            ));
        }
        if produced < self.cluster {
            return Err(err!(
                Corrupt,
                "the compressed qcow2 cluster for guest offset {guest} inflates to {produced} bytes, less than a cluster of {}; the image is corrupt or truncated",
                self.cluster
            ));
        }
        Ok(())
    }

    fn inflate_zstd(&mut self, src: &[u8], guest: u64, dst: &mut [u8]) -> Result<usize> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let damaged = |e: std::io::Error| {
            err!(
                Corrupt,
                "the zstd-compressed qcow2 cluster for guest offset {guest} is damaged ({e}); the image is corrupt"
            )
        };
        let decoder = match &mut self.zstd {
            Some(d) => {
                d.reinit().map_err(damaged)?;
                d
            }
            None => self
                .zstd
                .insert(zstd::stream::raw::Decoder::new().map_err(damaged)?),
        };
        let mut input = InBuffer::around(src);
        let mut output = OutBuffer::around(dst);
        loop {
            let (in_before, out_before) = (input.pos(), output.pos());
            let hint = decoder.run(&mut input, &mut output).map_err(damaged)?;
            let full = output.pos() == output.capacity();
            let stuck = input.pos() == in_before && output.pos() == out_before;
            if hint == 0 || full || stuck || input.pos() == src.len() {
                break;
            }
        }
        Ok(output.pos())
    }
}

/// The decoding state. See the module docs.
struct Decoder<'a, 'o> {
    h: &'a Header,
    cluster: u64,
    random: Option<&'a dyn View>,
    /// Random access is cheap (a local file): tables are read up front and nothing is kept
    /// pending. Otherwise (HTTP ranges) it only replaces spilling to scratch.
    upfront: bool,
    out: &'a Output<'o, dyn Sink + 'o>,
    tx: Option<mpsc::SyncSender<Batch>>,
    batch: Batch,
    failed: &'a AtomicBool,
    /// The L1 table, once read; its bytes while they stream past.
    l1: Option<Vec<u64>>,
    l1_bytes: Vec<u8>,
    /// L2 tables named by the L1 and not read yet: host offset -> L1 indexes naming it.
    l2_wanted: BTreeMap<u64, Vec<u64>>,
    /// L2 tables read, by host offset (a table the stream passes is not taken for data).
    l2_seen: BTreeSet<u64>,
    /// An L2 table cut by the end of a chunk (lent chunks end anywhere): its host offset
    /// and its bytes so far. It stays in `l2_wanted` until complete.
    l2_partial: Option<(u64, Vec<u8>)>,
    /// Data clusters ahead: (host offset, guest offset) -> run.
    runs: BTreeMap<(u64, u64), Run>,
    /// Compressed clusters ahead: (host byte offset, guest offset) -> cluster.
    compressed: BTreeMap<(u64, u64), Compressed>,
    /// A compressed cluster whose bytes continue into the next chunk.
    partial: Vec<(Compressed, Vec<u8>)>,
    /// Bytes nobody has claimed yet, while a table may still claim them.
    pending: Pending,
    /// Where the stream is: everything before was processed.
    pos: u64,
}

impl<'a, 'o> Decoder<'a, 'o> {
    fn new(
        h: &'a Header,
        random: Option<&'a dyn View>,
        out: &'a Output<'o, dyn Sink + 'o>,
        opts: &crate::decode::Options,
        tx: mpsc::SyncSender<Batch>,
        failed: &'a AtomicBool,
    ) -> Self {
        Self {
            h,
            cluster: h.cluster_size(),
            random,
            upfront: random.is_some_and(|r| r.cheap()),
            out,
            tx: Some(tx),
            batch: Batch::default(),
            failed,
            l1: None,
            l1_bytes: Vec::new(),
            l2_wanted: BTreeMap::new(),
            l2_seen: BTreeSet::new(),
            l2_partial: None,
            runs: BTreeMap::new(),
            compressed: BTreeMap::new(),
            partial: Vec::new(),
            pending: Pending::new(opts.pending_memory, opts.scratch_dir.clone())
                .discarding_over_limit(random.is_some()),
            pos: 0,
        }
    }

    /// Whether bytes not claimed by now may still be claimed by a table read later.
    fn may_still_claim(&self) -> bool {
        self.l1.is_none() || !self.l2_wanted.is_empty()
    }

    fn run(&mut self, stream: &mut crate::stream::Stream) -> Result<()> {
        if self.h.l1_size == 0 {
            self.l1 = Some(Vec::new());
        }
        // With random access, tables are read directly, wherever they are.
        if self.upfront && self.h.l1_size > 0 {
            let bytes = self.read_behind(self.h.l1_table_offset, self.l1_len(), "the L1 table")?;
            self.parse_l1(&bytes)?;
        }
        // Read buffers are lent to the sink, which writes data clusters from them where they
        // are (no copy) and lets go of them when written.
        let mut pool = SharedPool::default();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(()); // the thread's error is reported by the caller
            }
            // A source that lends its own buffers is looked at in place (chunks of any
            // size); others are read into ours, 4 MiB at a time.
            let n = match stream.lend(CHUNK as usize)? {
                Some(lent) => {
                    if lent.is_empty() {
                        break;
                    }
                    self.chunk(lent, None)?;
                    lent.len()
                }
                None => {
                    let mut shared = pool.take(CHUNK as usize);
                    let buf = SharedPool::fill(&mut shared)?;
                    let n = stream.read_full(&mut buf[..CHUNK as usize])?;
                    if n == 0 {
                        break;
                    }
                    self.chunk(&shared[..n], Some(&shared))?;
                    pool.give(shared);
                    if n < CHUNK as usize {
                        self.pos += n as u64;
                        break;
                    }
                    n
                }
            };
            self.pos += n as u64;
            if !self.may_still_claim()
                && self.runs.is_empty()
                && self.compressed.is_empty()
                && self.partial.is_empty()
            {
                // Nothing more to write: the rest (refcounts, snapshots) is drained by the
                // caller, which still reads it for byte counts and checksums.
                break;
            }
        }
        self.finish()
    }

    fn l1_len(&self) -> usize {
        self.h.l1_size as usize * 8
    }

    /// Processes the image bytes `chunk` at `self.pos`. `shared` is the buffer `chunk` begins
    /// (when it was read into one): data is handed to the sink from there without a copy.
    fn chunk(&mut self, chunk: &[u8], shared: Option<&Shared>) -> Result<()> {
        let start = self.pos;
        let end = start + chunk.len() as u64;
        // Spans of this chunk that are metadata or data (not to be kept as pending).
        let mut claimed: Vec<(u64, u64)> = vec![(0, self.cluster.min(end))];

        // 1. Tables.
        if self.l1.is_none() {
            let l1_start = self.h.l1_table_offset;
            let l1_end = l1_start + self.l1_len() as u64;
            if l1_start < end && l1_end > start {
                let from = l1_start.max(start);
                let to = l1_end.min(end);
                self.l1_bytes
                    .extend_from_slice(&chunk[(from - start) as usize..(to - start) as usize]);
                claimed.push((from, to));
                if to == l1_end {
                    let bytes = std::mem::take(&mut self.l1_bytes);
                    self.parse_l1(&bytes)?;
                }
            }
        }
        // The rest of a table cut by the previous chunk's end (or begun before this chunk
        // and named by the L1 just read).
        if let Some((host, mut bytes)) = self.l2_partial.take() {
            let take = (self.cluster as usize - bytes.len()).min(chunk.len());
            bytes.extend_from_slice(&chunk[..take]);
            claimed.push((start, start + take as u64));
            if bytes.len() == self.cluster as usize {
                self.read_l2(host, &bytes)?;
            } else {
                self.l2_partial = Some((host, bytes));
            }
        }
        loop {
            let here: Vec<u64> = self
                .l2_wanted
                .range(start..end)
                .map(|(&k, _)| k)
                .filter(|&k| self.l2_partial.as_ref().is_none_or(|(p, _)| *p != k))
                .collect();
            if here.is_empty() {
                break;
            }
            for host in here {
                let from = (host - start) as usize;
                let to = from + self.cluster as usize;
                match chunk.get(from..to) {
                    Some(table) => self.read_l2(host, table)?,
                    // The table goes on in the next chunk (or the image ends inside it,
                    // which `finish` reports as truncation).
                    None => {
                        claimed.push((host, end));
                        self.l2_partial = Some((host, chunk[from..].to_vec()));
                    }
                }
            }
        }
        for &host in self.l2_seen.range(start..end) {
            claimed.push((host, host + self.cluster));
        }

        // 2. Data.
        let runs: Vec<((u64, u64), Run)> = self
            .runs
            .range((start, 0)..(end, 0))
            .map(|(&k, &v)| (k, v))
            .collect();
        for ((host, guest), run) in runs {
            self.runs.remove(&(host, guest));
            let run_end = host + run.len;
            let to = run_end.min(end);
            let range = (host - start) as usize..(to - start) as usize;
            match shared {
                Some(buf) => self.out.write_shared(guest, buf, range)?,
                None => self.out.write(guest, &chunk[range])?,
            }
            claimed.push((host, to));
            if to < run_end {
                let rest = to - host;
                self.runs.insert(
                    (to, guest + rest),
                    Run {
                        guest: guest + rest,
                        len: run.len - rest,
                        started: true,
                    },
                );
            }
        }
        for (c, mut bytes) in std::mem::take(&mut self.partial) {
            let want = c.max_len as usize - bytes.len();
            let take = want.min(chunk.len());
            bytes.extend_from_slice(&chunk[..take]);
            claimed.push((start, start + take as u64));
            if bytes.len() == c.max_len as usize {
                self.submit(c, &bytes)?;
            } else {
                self.partial.push((c, bytes));
            }
        }
        let here: Vec<((u64, u64), Compressed)> = self
            .compressed
            .range((start, 0)..(end, 0))
            .map(|(&k, &v)| (k, v))
            .collect();
        for ((host, guest), c) in here {
            let tail = self.claim_of_compressed(host, c.max_len);
            claimed.push((host, tail.min(end)));
            self.compressed.remove(&(host, guest));
            let from = (host - start) as usize;
            if host + c.max_len <= end {
                let to = from + c.max_len as usize;
                self.submit(c, &chunk[from..to])?;
            } else {
                self.partial.push((c, chunk[from..].to_vec()));
            }
        }

        // 3. What nobody claimed may be claimed later.
        if self.may_still_claim() && !self.upfront {
            claimed.push((
                self.h.refcount_table_offset,
                self.h.refcount_table_offset
                    + u64::from(self.h.refcount_table_clusters) * self.cluster,
            ));
            claimed.sort_unstable();
            let mut at = start;
            for (s, e) in claimed {
                let (s, e) = (s.max(start), e.min(end));
                if s >= e {
                    continue;
                }
                if s > at {
                    self.pending
                        .put(at, &chunk[(at - start) as usize..(s - start) as usize])?;
                }
                at = at.max(e);
            }
            if at < end {
                self.pending.put(at, &chunk[(at - start) as usize..])?;
            }
        } else {
            self.pending.clear();
        }
        if self.batch.data.len() >= BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// How far a compressed cluster at `host` claims its bytes: its descriptor rounds its end
    /// up to a sector, so the last sector may hold the start of the next compressed cluster.
    /// That sector is claimed only if a known compressed cluster starts in it; otherwise it
    /// stays pending, in case a table read later maps a cluster there.
    fn claim_of_compressed(&self, host: u64, max_len: u64) -> u64 {
        let end = host + max_len;
        let last_sector = ((end - 1) & !511).max(host);
        let next_known = self
            .compressed
            .range((host + 1, 0)..(end, 0))
            .next()
            .is_some();
        if next_known { end } else { last_sector }
    }

    fn submit(&mut self, c: Compressed, bytes: &[u8]) -> Result<()> {
        self.batch.push(c.guest, bytes, c.out_len);
        if self.batch.data.len() >= BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.items.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        match &self.tx {
            Some(tx) => tx
                .send(batch)
                .map_err(|_| err!(Io, "the decompression threads stopped")),
            None => Ok(()),
        }
    }

    /// Reads `len` bytes the stream has passed: from random access or the pending store.
    fn read_behind(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        if !self.upfront && self.pending.read(offset, &mut out)? {
            return Ok(out);
        }
        if let Some(random) = self.random {
            let file_len = random.len();
            // The image may end inside the last data cluster: the rest reads zero.
            let have = file_len.saturating_sub(offset).min(len as u64) as usize;
            if have == 0 && len > 0 {
                return Err(err!(
                    Truncated,
                    "the qcow2 {what} at byte {offset} lies beyond the end of the image at byte {file_len}; download it again"
                ));
            }
            let mut at = 0;
            while at < have {
                let n = (have - at).min(crate::view::MAX_READ);
                let bytes = random.read(offset + at as u64, n, what)?;
                out[at..at + n].copy_from_slice(&bytes);
                at += n;
            }
            return Ok(out);
        }
        Err(err!(
            NeedsRandomAccess,
            "the qcow2 {what} at byte {offset} was mapped only after a single pass over the stream \
             had used those bytes for something else; the image is unusual or damaged: \
             give the uncompressed file itself (random access) instead of a stream"
        ))
    }

    fn parse_l1(&mut self, bytes: &[u8]) -> Result<()> {
        let per_l1 = self.cluster * self.h.l2_entries();
        let mut l1 = Vec::with_capacity(bytes.len() / 8);
        let mut wanted = Vec::new();
        for (index, raw) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(raw.try_into().unwrap_or_default());
            l1.push(entry);
            let l2 = entry & L2_ENTRY_MASK;
            if l2 == 0 || index as u64 * per_l1 >= self.h.size {
                continue;
            }
            if !l2.is_multiple_of(self.cluster) {
                return Err(err!(
                    Corrupt,
                    "the qcow2 L1 entry {index} points to an L2 table at {l2:#x}, which is not cluster-aligned; the image is damaged"
                ));
            }
            wanted.push((l2, index as u64));
        }
        self.l1 = Some(l1);
        for (l2, index) in wanted {
            let straddles = l2 < self.pos && self.pos < l2 + self.cluster;
            if straddles && !self.upfront && self.l2_partial.is_none() {
                // The table goes on into the chunk at hand (chunks end anywhere): its
                // first bytes were kept, the rest is taken from the chunk.
                let mut bytes = vec![0u8; (self.pos - l2) as usize];
                if self.pending.read(l2, &mut bytes)? {
                    self.l2_partial = Some((l2, bytes));
                    self.l2_wanted.entry(l2).or_default().push(index);
                    continue;
                }
            }
            if self.l2_partial.as_ref().is_some_and(|(p, _)| *p == l2) {
                self.l2_wanted.entry(l2).or_default().push(index);
            } else if l2 < self.pos || self.upfront {
                let table = self.read_behind(l2, self.cluster as usize, "L2 table")?;
                self.parse_l2(index, &table)?;
                self.l2_seen.insert(l2);
            } else {
                self.l2_wanted.entry(l2).or_default().push(index);
            }
        }
        Ok(())
    }

    fn read_l2(&mut self, host: u64, table: &[u8]) -> Result<()> {
        let indexes = self.l2_wanted.remove(&host).unwrap_or_default();
        for index in indexes {
            self.parse_l2(index, table)?;
        }
        self.l2_seen.insert(host);
        Ok(())
    }

    /// Registers the mappings of the L2 table for L1 entry `index`.
    fn parse_l2(&mut self, index: u64, table: &[u8]) -> Result<()> {
        let cluster = self.cluster;
        let size = self.h.size;
        let extended = self.h.extended_l2();
        let entry_len = if extended { 16 } else { 8 };
        let first_guest = index * cluster * self.h.l2_entries();
        let cluster_bits = self.h.cluster_bits;
        for (j, raw) in table.chunks_exact(entry_len).enumerate() {
            let guest = first_guest + j as u64 * cluster;
            if guest >= size {
                break;
            }
            let entry = u64::from_be_bytes(raw[..8].try_into().unwrap_or_default());
            let out_len = (size - guest).min(cluster);
            if entry & COMPRESSED != 0 {
                // Bits 0..x-1: host byte offset; x..61: additional sectors.
                let x = 62 - (cluster_bits - 8);
                let host = entry & ((1u64 << x) - 1);
                let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
                let max_len = (sectors + 1) * 512 - (host & 511);
                self.map_compressed(
                    host,
                    Compressed {
                        guest,
                        max_len,
                        out_len: out_len as u32,
                    },
                )?;
                continue;
            }
            let host = entry & L2_ENTRY_MASK;
            if extended {
                let bitmap = u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
                let alloc = bitmap as u32;
                let zero = (bitmap >> 32) as u32;
                if alloc & zero != 0 {
                    return Err(err!(
                        Corrupt,
                        "the qcow2 extended L2 entry for guest offset {guest} marks subclusters both allocated and zero; the image is damaged"
                    ));
                }
                if host == 0 {
                    if alloc != 0 {
                        return Err(err!(
                            Corrupt,
                            "the qcow2 extended L2 entry for guest offset {guest} has allocated subclusters but no host cluster; the image is damaged"
                        ));
                    }
                    continue;
                }
                self.check_host(host, guest)?;
                let sub = cluster / 32;
                // Runs of allocated subclusters, each one contiguous write.
                let mut i = 0u64;
                while i < 32 {
                    if alloc & (1 << i) == 0 {
                        i += 1;
                        continue;
                    }
                    let first = i;
                    while i < 32 && alloc & (1 << i) != 0 {
                        i += 1;
                    }
                    let g = guest + first * sub;
                    if g >= size {
                        break;
                    }
                    let len = ((i - first) * sub).min(size - g);
                    self.map_data(host + first * sub, g, len)?;
                }
                continue;
            }
            if entry & ZERO != 0 || host == 0 {
                continue;
            }
            self.check_host(host, guest)?;
            self.map_data(host, guest, out_len)?;
        }
        Ok(())
    }

    fn check_host(&self, host: u64, guest: u64) -> Result<()> {
        if !host.is_multiple_of(self.cluster) {
            return Err(err!(
                Corrupt,
                "the qcow2 L2 entry for guest offset {guest} points to host offset {host:#x}, which is not cluster-aligned; the image is damaged"
            ));
        }
        if host < self.cluster {
            return Err(err!(
                Corrupt,
                "the qcow2 L2 entry for guest offset {guest} points into the image header; the image is damaged"
            ));
        }
        Ok(())
    }

    fn map_data(&mut self, host: u64, guest: u64, len: u64) -> Result<()> {
        let (mut host, mut guest, mut len) = (host, guest, len);
        if host < self.pos {
            // Bytes the stream has passed; a run may also go on into the chunk at hand
            // (chunks end anywhere), and that part streams past like any other.
            let behind = (self.pos - host).min(len);
            let mut at = 0;
            while at < behind {
                let n = (behind - at).min(CHUNK);
                let bytes = self.read_behind(host + at, n as usize, "data cluster")?;
                self.out.write(guest + at, &bytes)?;
                at += n;
            }
            self.pending.forget(host, behind);
            if behind == len {
                return Ok(());
            }
            (host, guest, len) = (host + behind, guest + behind, len - behind);
        }
        // Extend the previous run when both sides continue it (the common case).
        if let Some((&(h, g), run)) = self.runs.range(..(host, guest)).next_back()
            && h + run.len == host
            && g + run.len == guest
            && !run.started
        {
            let merged = run.len + len;
            self.runs.insert(
                (h, g),
                Run {
                    len: merged,
                    ..*run
                },
            );
            return Ok(());
        }
        self.runs.insert(
            (host, guest),
            Run {
                guest,
                len,
                started: false,
            },
        );
        Ok(())
    }

    fn map_compressed(&mut self, host: u64, c: Compressed) -> Result<()> {
        if host < self.cluster {
            return Err(err!(
                Corrupt,
                "the qcow2 compressed cluster for guest offset {} points into the image header; the image is damaged",
                c.guest
            ));
        }
        if host < self.pos {
            let behind = self.pos - host;
            if behind < c.max_len && self.random.is_none() {
                // The cluster goes on into the chunk at hand: its first bytes were kept,
                // the rest is taken as the chunk is processed.
                let mut bytes = vec![0u8; behind as usize];
                if self.pending.read(host, &mut bytes)? {
                    self.pending.forget(host, behind);
                    self.partial.push((c, bytes));
                    return Ok(());
                }
            }
            let bytes = self.read_behind_compressed(host, c.max_len)?;
            return self.submit(c, &bytes);
        }
        self.compressed.insert((host, c.guest), c);
        Ok(())
    }

    /// A compressed cluster behind the stream: its descriptor may reach past the end of the
    /// image, or past what was kept of its last sector (a neighbour claimed it), so take the
    /// bytes that are there; the inflater tells whether they hold the whole cluster.
    fn read_behind_compressed(&self, host: u64, max_len: u64) -> Result<Vec<u8>> {
        let bytes = if self.upfront {
            Vec::new()
        } else {
            self.pending.read_prefix(host, max_len as usize)?
        };
        if bytes.len() as u64 == max_len {
            return Ok(bytes);
        }
        if let Some(random) = self.random {
            let len = max_len.min(random.len().saturating_sub(host));
            return self.read_behind(host, len as usize, "compressed cluster");
        }
        if bytes.is_empty() {
            return self.read_behind(host, max_len as usize, "compressed cluster");
        }
        Ok(bytes)
    }

    /// At the end of the image: everything mapped must have been seen.
    fn finish(&mut self) -> Result<()> {
        let end = self.pos;
        if self.l1.is_none() {
            return Err(err!(
                Truncated,
                "the qcow2 L1 table at byte {} lies beyond the end of the image at byte {end}; the image is truncated, download it again",
                self.h.l1_table_offset
            ));
        }
        if let Some((&host, _)) = self.l2_wanted.iter().next() {
            return Err(err!(
                Truncated,
                "the qcow2 L2 table at byte {host} lies beyond the end of the image at byte {end}; the image is truncated, download it again"
            ));
        }
        if let Some((&(host, _), _)) = self.runs.iter().find(|(_, r)| !r.started) {
            return Err(err!(
                Truncated,
                "a qcow2 data cluster at byte {host} lies beyond the end of the image at byte {end}; the image is truncated, download it again"
            ));
        }
        if let Some((&(host, _), _)) = self.compressed.iter().next() {
            return Err(err!(
                Truncated,
                "a compressed qcow2 cluster at byte {host} lies beyond the end of the image at byte {end}; the image is truncated, download it again"
            ));
        }
        // The last compressed cluster's descriptor may reach past the end of the file.
        for (c, bytes) in std::mem::take(&mut self.partial) {
            self.batch.push(c.guest, &bytes, c.out_len);
        }
        self.flush_batch()?;
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::decode::{Options, decode as decode_any};
    use crate::sink::MemorySink;
    use std::io::Write;

    const C: usize = 64 << 10;
    const L1_AT: usize = 2 * C;
    const L2_AT: usize = 3 * C;
    const DATA_AT: usize = 4 * C;

    /// A hand-made qcow2 v3 image of 1 MiB with 64 KiB clusters: refcount table at 1 C,
    /// L1 at 2 C (one entry, pointing at the L2 at 3 C), `l2` entries, then `data` at 4 C.
    fn image(l2: &[(usize, u64)], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; DATA_AT];
        b[0..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(L1_AT as u64).to_be_bytes());
        b[48..56].copy_from_slice(&(C as u64).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b[L1_AT..L1_AT + 8].copy_from_slice(&(L2_AT as u64).to_be_bytes());
        for &(index, entry) in l2 {
            let at = L2_AT + index * 8;
            b[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn run(bytes: Vec<u8>) -> (Result<crate::Decoded>, MemorySink) {
        let sink = MemorySink::new(64 << 20);
        let r = decode_any(
            Box::new(std::io::Cursor::new(bytes)),
            None,
            &sink,
            &Options::default(),
        );
        (r, sink)
    }

    /// Lends `bytes` in chunks of the sizes `sizes` cycles through (as HTTP bodies arrive),
    /// or, with `cuts`, in chunks that end at those image offsets.
    struct Chunks {
        bytes: Vec<u8>,
        at: usize,
        sizes: &'static [usize],
        cuts: &'static [usize],
        turn: usize,
    }

    impl std::io::Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl crate::Lend for Chunks {
        fn lend(&mut self, max: usize) -> std::io::Result<&[u8]> {
            let size = if self.cuts.is_empty() {
                self.sizes[self.turn % self.sizes.len()]
            } else {
                let at = self.at;
                self.cuts
                    .iter()
                    .find(|&&c| c > at)
                    .map_or(usize::MAX, |c| c - at)
            };
            self.turn += 1;
            let n = size.min(max).min(self.bytes.len() - self.at);
            self.at += n;
            Ok(&self.bytes[self.at - n..self.at])
        }
    }

    fn run_lent(bytes: Vec<u8>, sizes: &'static [usize]) -> (Result<crate::Decoded>, MemorySink) {
        run_chunks(bytes, sizes, &[])
    }

    /// Decodes from chunks that end at the image offsets `cuts` (and where the head ends).
    fn run_cut(bytes: Vec<u8>, cuts: &'static [usize]) -> (Result<crate::Decoded>, MemorySink) {
        run_chunks(bytes, &[1 << 20], cuts)
    }

    fn run_chunks(
        bytes: Vec<u8>,
        sizes: &'static [usize],
        cuts: &'static [usize],
    ) -> (Result<crate::Decoded>, MemorySink) {
        let sink = MemorySink::new(64 << 20);
        let source = Chunks {
            bytes,
            at: 0,
            sizes,
            cuts,
            turn: 0,
        };
        let r = crate::decode_lent(Box::new(source), &sink, &Options::default());
        (r, sink)
    }

    /// Chunk sizes that cut tables, clusters and compressed data at odd places.
    const AWKWARD: [&[usize]; 4] = [
        &[1],
        &[4093, 65_537, 7],
        &[C / 2 + 3, 2 * C + 1, 300_000],
        &[L2_AT + 100, 17, C - 1],
    ];

    #[test]
    fn lent_chunks_of_any_size_decode_like_one_read_through_a_buffer() {
        let (entries, data) = plain_and_compressed();
        let bytes = image(&entries, &data);
        let (read, read_sink) = run(bytes.clone());
        let read = read.map(|d| (d.image_bytes, d.data_bytes));
        assert!(read.is_ok(), "{read:?}");
        for sizes in AWKWARD {
            let (lent, lent_sink) = run_lent(bytes.clone(), sizes);
            assert_eq!(
                lent.map(|d| (d.image_bytes, d.data_bytes)).ok(),
                read.as_ref().ok().copied(),
                "chunks of {sizes:?}"
            );
            assert!(
                lent_sink.contents() == read_sink.contents(),
                "chunks of {sizes:?} gave another disk"
            );
        }
    }

    /// `image(entries, data)` with its L2 table moved after the data (as `qemu-img convert
    /// -c` and copy-on-write after a snapshot lay it out).
    fn image_with_l2_last(entries: &[(usize, u64)], data: &[u8]) -> Vec<u8> {
        let mut b = image(entries, data);
        b.resize(b.len().next_multiple_of(C), 0);
        let moved = b.len();
        let table = b[L2_AT..L2_AT + C].to_vec();
        b[L2_AT..L2_AT + C].fill(0);
        b.extend_from_slice(&table);
        b[L1_AT..L1_AT + 8].copy_from_slice(&(moved as u64).to_be_bytes());
        b
    }

    #[test]
    fn clusters_the_stream_passed_in_part_when_their_table_came_decode_from_lent_chunks() {
        let (entries, data) = plain_and_compressed();
        let bytes = image_with_l2_last(&entries, &data);
        let (read, read_sink) = run(bytes.clone());
        assert!(read.is_ok(), "{read:?}");
        assert!(
            read_sink.contents()[5 * C..6 * C]
                .iter()
                .all(|&b| b == 0x6b)
        );
        // The first chunk ends inside the plain cluster, or inside the compressed one; the
        // second holds the rest of it and the L2 table that maps it.
        static CUT_IN_DATA: [usize; 1] = [DATA_AT + 100];
        static CUT_IN_PACKED: [usize; 1] = [DATA_AT + C + 100];
        for sizes in [&CUT_IN_DATA[..], &CUT_IN_PACKED[..]] {
            let (lent, lent_sink) = run_cut(bytes.clone(), sizes);
            assert!(lent.is_ok(), "chunks of {sizes:?}: {lent:?}");
            assert!(
                lent_sink.contents() == read_sink.contents(),
                "chunks of {sizes:?} gave another disk"
            );
        }
    }

    #[test]
    fn an_l2_table_begun_before_the_chunk_that_holds_the_l1_decodes_from_lent_chunks() {
        // L1 after the L2 table, in the chunk that also holds the L2 table's end.
        let entries = [(2, DATA_AT as u64)];
        let mut bytes = image(&entries, &[0x5a; C]);
        let l1 = bytes[L1_AT..L1_AT + 8].to_vec();
        bytes[L1_AT..L1_AT + 8].fill(0);
        let moved_l1 = bytes.len();
        bytes.extend_from_slice(&l1);
        bytes.resize(moved_l1 + C, 0);
        bytes[40..48].copy_from_slice(&(moved_l1 as u64).to_be_bytes());
        let (read, read_sink) = run(bytes.clone());
        assert!(read.is_ok(), "{read:?}");
        static CUT_IN_L2: [usize; 1] = [L2_AT + 100];
        let (lent, lent_sink) = run_cut(bytes, &CUT_IN_L2);
        assert!(lent.is_ok(), "{lent:?}");
        assert!(lent_sink.contents() == read_sink.contents());
        assert!(
            lent_sink.contents()[2 * C..3 * C]
                .iter()
                .all(|&b| b == 0x5a)
        );
    }

    #[test]
    fn an_image_cut_inside_its_l2_table_is_truncated_whatever_the_chunks() {
        let bytes = image(&[(2, DATA_AT as u64)], &[0x5a; C]);
        for cut in [L2_AT + 1, L2_AT + C / 2, L2_AT + C - 1] {
            for sizes in AWKWARD {
                let (r, _) = run_lent(bytes[..cut].to_vec(), sizes);
                let e = r.err().map(|e| (e.kind(), e.to_string()));
                assert!(
                    matches!(&e, Some((ErrorKind::Truncated, m)) if m.contains("L2 table")),
                    "cut at {cut}, chunks of {sizes:?}: {e:?}"
                );
            }
        }
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).ok();
        e.finish().unwrap_or_default()
    }

    /// L2 entries and data of a plain cluster of 0x5a (guest cluster 2, at `DATA_AT`) and a
    /// deflated cluster of 0x6b (guest cluster 5, right after it).
    fn plain_and_compressed() -> (Vec<(usize, u64)>, Vec<u8>) {
        let packed = deflate(&vec![0x6bu8; C]);
        let mut data = vec![0x5au8; C];
        data.extend_from_slice(&packed);
        let entries = vec![
            (2, DATA_AT as u64),
            (5, compressed_entry(DATA_AT + C, packed.len())),
        ];
        (entries, data)
    }

    fn compressed_entry(host: usize, len: usize) -> u64 {
        let x = 62 - (16 - 8);
        let sectors = ((host + len - 1) / 512 - host / 512) as u64;
        COMPRESSED | (sectors << x) | host as u64
    }

    #[test]
    fn a_hand_made_image_maps_plain_and_compressed_clusters() {
        let (entries, data) = plain_and_compressed();
        let (r, sink) = run(image(&entries, &data));
        assert!(r.is_ok(), "{r:?}");
        let disk = sink.contents();
        assert!(disk[2 * C..3 * C].iter().all(|&b| b == 0x5a));
        assert!(disk[5 * C..6 * C].iter().all(|&b| b == 0x6b));
        assert!(disk[..2 * C].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_compressed_cluster_that_inflates_past_a_cluster_is_refused() {
        let packed = deflate(&vec![1u8; 2 * C]);
        let entries = [(0, compressed_entry(DATA_AT, packed.len()))];
        let (r, _) = run(image(&entries, &packed));
        let e = r.err().map(|e| (e.kind(), e.to_string()));
        assert!(
            matches!(&e, Some((ErrorKind::Corrupt, m)) if m.contains("inflates past")),
            "{e:?}"
        );
    }

    #[test]
    fn a_compressed_cluster_that_inflates_short_is_refused() {
        let packed = deflate(&vec![1u8; C / 2]);
        let entries = [(0, compressed_entry(DATA_AT, packed.len()))];
        let (r, _) = run(image(&entries, &packed));
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn garbage_in_a_compressed_cluster_is_refused() {
        let garbage = vec![0xffu8; 3000];
        let entries = [(0, compressed_entry(DATA_AT, garbage.len()))];
        let (r, _) = run(image(&entries, &garbage));
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_data_cluster_inside_the_header_or_off_the_cluster_grid_is_refused() {
        let (r, _) = run(image(&[(0, 0)], &[]));
        assert!(r.is_ok(), "an empty entry is unallocated");
        let (r, _) = run(image(&[(0, 512)], &[]));
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_data_cluster_beyond_the_end_is_reported_as_truncation() {
        let (r, _) = run(image(&[(1, 40 * C as u64)], &[]));
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Truncated));
    }

    #[test]
    fn an_l2_table_that_is_the_l1_table_itself_ends_without_a_panic_or_a_hang() {
        let mut bytes = image(&[], &[0x11; C]);
        // The L1 entry points at the L1 table: its own entry then reads as a data mapping of
        // guest cluster 0 to the L1 cluster.
        bytes[L1_AT..L1_AT + 8].copy_from_slice(&(L1_AT as u64).to_be_bytes());
        let (r, sink) = run(bytes);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sink.contents().len(), 1 << 20);
    }

    #[test]
    fn an_l1_entry_that_is_not_cluster_aligned_is_refused() {
        let mut bytes = image(&[], &[]);
        bytes[L1_AT..L1_AT + 8].copy_from_slice(&((L2_AT + 512) as u64).to_be_bytes());
        let (r, _) = run(bytes);
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn every_truncation_of_a_hand_made_image_ends_in_an_error_not_a_panic() {
        let (entries, data) = plain_and_compressed();
        let full = image(&entries, &data);
        for cut in (0..full.len()).step_by(4093) {
            let (r, _) = run(full[..cut].to_vec());
            let (lent, _) = run_lent(full[..cut].to_vec(), AWKWARD[2]);
            if cut > L2_AT {
                assert!(r.is_err(), "cut at {cut} decoded");
                assert!(lent.is_err(), "cut at {cut} decoded from lent chunks");
            }
        }
    }

    #[test]
    fn byte_corruptions_of_the_tables_never_panic() {
        let (entries, data) = plain_and_compressed();
        let full = image(&entries, &data);
        let spots = (0..112).chain(L1_AT..L1_AT + 16).chain(L2_AT..L2_AT + 48);
        for at in spots {
            for value in [0xffu8, 0x80, 0x01] {
                let mut bytes = full.clone();
                bytes[at] ^= value;
                let _ = run_lent(bytes.clone(), AWKWARD[1]);
                let _ = run(bytes);
            }
        }
    }
}
