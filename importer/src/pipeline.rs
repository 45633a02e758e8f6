//! One import: a source read once (metered, checksummed in the same pass) into a DVCR
//! artifact or a disk.
//!
//! - To a disk (a PVC's block device or `disk.img`): the single-pass decoders of
//!   `dvcr-formats` write straight into the target; nothing touches scratch space unless an
//!   image keeps its tables after the data they map and the source has no random access.
//! - To DVCR: the image is stored as it is (after unwrapping gzip/xz/zstd/bzip2, so nodes
//!   can use it as a containerDisk) in a tar layer streamed to the registry while it is
//!   hashed; the format is probed from the same bytes on the way. A tar header needs the
//!   file's size first, so only a compressed source (whose unpacked size is unknown until
//!   its end) goes through scratch space, and that is reported. Raw and ISO images go into
//!   a zstd-compressed layer so their zero runs cost almost nothing in DVCR. The manifest
//!   is pushed last, after the layer and config blobs were verified by the registry.
//! - DVCR to DVCR in the same registry: the blobs are mounted, not copied.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dvcr_formats::compress::{self, BoxRead};
use dvcr_formats::sink::write_behind;
use dvcr_formats::sparse::qcow2::Qcow2Writer;
use dvcr_formats::sparse::{DiskWriter, TargetOptions, Written};
use dvcr_formats::stream::SequentialFile;
use dvcr_formats::{Options, RandomAccess, StreamProbe};
use sha2::{Digest, Sha256};

use crate::artifact::{self, Descriptor, Labels};
use crate::checksum::{Expected, Verifying};
use crate::chunk::{BoxChunkRead, ChunkRead, Copying, Replay, read_full};
use crate::error::{ErrorKind, ImportError};
use crate::oci::{BlobWriter, Client, Reference, RegistryOptions};
use crate::report::{Meter, Progress};
use crate::source::{self, HttpOptions};

/// Where the image comes from.
pub enum Source {
    /// An http(s) URL.
    Http {
        /// The URL.
        url: String,
        /// Auth, CA, timeouts.
        options: HttpOptions,
    },
    /// The file under `disk/` of an image in a container registry (DVCR included).
    Registry {
        /// The image.
        reference: Reference,
        /// Auth, CA, platform.
        options: RegistryOptions,
    },
    /// An existing disk: a block device, a file, or a directory holding `disk.img`.
    Path(PathBuf),
    /// Standard input.
    Stdin,
    /// An empty disk of this many bytes.
    Blank(u64),
    /// Bytes from elsewhere (an upload's body), with their length when known.
    Reader {
        /// The bytes (any reader fits, wrapped in [`Copying`]).
        reader: BoxChunkRead,
        /// Their length, when announced.
        length: Option<u64>,
        /// How to name the source in messages.
        name: String,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Http { url, .. } => write!(f, "http {url}"),
            Source::Registry { reference, .. } => write!(f, "registry {reference}"),
            Source::Path(p) => write!(f, "path {}", p.display()),
            Source::Stdin => f.write_str("standard input"),
            Source::Blank(size) => write!(f, "blank disk of {size} bytes"),
            Source::Reader { name, length, .. } => write!(f, "{name} ({length:?} bytes)"),
        }
    }
}

/// The format of a disk target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    /// A raw disk: block device or sparse file.
    #[default]
    Raw,
    /// A qcow2 file (filesystem volumes that prefer it).
    Qcow2,
}

/// Where the image goes.
#[derive(Debug)]
pub enum Destination {
    /// A DVCR artifact.
    Registry {
        /// The image to create (repository and tag).
        reference: Reference,
        /// Auth, CA.
        options: RegistryOptions,
    },
    /// A disk: a block device, a file, or a directory (then `<dir>/disk.img`).
    Disk {
        /// The target.
        path: PathBuf,
        /// Raw or qcow2.
        format: DiskFormat,
        /// The disk's size; at least the image's unpacked size.
        size: Option<u64>,
        /// The block device already reads zero everywhere.
        target_is_zero: bool,
    },
}

/// One import, fully described.
#[derive(Debug)]
pub struct Job {
    /// Where from.
    pub source: Source,
    /// Where to.
    pub destination: Destination,
    /// Checksums of the source bytes as downloaded.
    pub checksums: Vec<Expected>,
    /// Scratch space for data that has to be measured or placed before it can be written.
    pub scratch_dir: Option<PathBuf>,
    /// The most scratch bytes a compressed source into DVCR may use (its unpacked data
    /// must be measured before the tar header is written); `None`: the free space.
    pub scratch_limit: Option<u64>,
    /// Memory for not-yet-placed data before it spills to scratch.
    pub pending_memory: usize,
    /// Bytes read so far (for gauges and progress bars).
    pub progress: Arc<Progress>,
}

impl Job {
    /// A job with default limits.
    pub fn new(source: Source, destination: Destination) -> Self {
        Self {
            source,
            destination,
            checksums: Vec::new(),
            scratch_dir: None,
            scratch_limit: None,
            pending_memory: 16 << 20,
            progress: Arc::new(Progress::new()),
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outcome {
    /// The image's format.
    pub format: String,
    /// Unpacked size.
    pub virtual_size: u64,
    /// Bytes of the image as stored (the disk file in DVCR; the source's image bytes for a
    /// disk target).
    pub stored_size: u64,
    /// True exactly for ISO images.
    pub cdrom: bool,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Scratch-space bytes used.
    pub scratch_bytes: u64,
    /// Bytes written to a disk target (zero blocks skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// The disk's final size, for a disk target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    /// The manifest digest, for a DVCR target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// The blobs were mounted from the source repository, not copied.
    pub mounted: bool,
    /// Where the result is.
    pub destination: String,
}

/// A source opened for reading.
struct Opened {
    reader: BoxChunkRead,
    random: Option<RandomAccess>,
    length: Option<u64>,
    name: String,
}

/// Runs `job` to the end. Nothing is published unless everything succeeded: the DVCR tag
/// is pushed last; a disk file appears under its name only when complete and fsynced.
pub fn run(job: Job) -> Result<Outcome, ImportError> {
    let Job {
        source,
        destination,
        checksums,
        scratch_dir,
        scratch_limit,
        pending_memory,
        progress,
    } = job;
    // DVCR to DVCR without moving data: only when the source is read with the same
    // credentials as the destination (a mount reads with the destination's, which must not
    // open another tenant's image to someone who could not pull it), and only when no
    // checksum asks for the bytes to be read.
    if let (
        Source::Registry {
            reference,
            options: from_options,
        },
        Destination::Registry {
            reference: to,
            options,
        },
    ) = (&source, &destination)
        && reference.registry == to.registry
        && from_options.auth_config == options.auth_config
        && checksums.is_empty()
        && let Some(outcome) = copy_within_registry(reference, to, from_options, options)?
    {
        return Ok(outcome);
    }
    if let Source::Blank(size) = source {
        return blank(size, destination, &progress);
    }
    let opened = open(source)?;
    progress.set_total(opened.length);
    let name = opened.name.clone();
    let reader: BoxChunkRead = Box::new(
        Verifying::new(Meter::new(opened.reader, Arc::clone(&progress)), checksums)
            .map_err(|e| ImportError::new(ErrorKind::Source, true, e.to_string()))?,
    );
    let opened = Opened { reader, ..opened };
    let outcome = match destination {
        Destination::Disk {
            path,
            format,
            size,
            target_is_zero,
        } => to_disk(
            opened,
            &path,
            format,
            TargetOptions {
                size,
                target_is_zero,
            },
            &Options {
                scratch_dir,
                pending_memory,
                refuse_cdrom: true,
                ..Options::default()
            },
            &progress,
        ),
        Destination::Registry { reference, options } => to_registry(
            opened,
            &reference,
            options,
            (scratch_dir.as_deref(), scratch_limit),
            &progress,
        ),
    };
    outcome.map_err(|e| e.context(format!("importing {name}")))
}

fn open(source: Source) -> Result<Opened, ImportError> {
    match source {
        Source::Http { url, options } => {
            let body = source::open_http_with(&url, &options).map_err(ImportError::from_source)?;
            let length = body.length;
            // A server answering Range requests spares scratch space for images whose
            // tables come after their data.
            let random = match (&body.ranges_at, length) {
                (Some(at), Some(len)) => source::HttpRanges::with_options(at, len, &options)
                    .ok()
                    .map(|r| Box::new(r) as RandomAccess),
                _ => None,
            };
            Ok(Opened {
                reader: Box::new(body),
                random,
                length,
                name: url,
            })
        }
        Source::Registry { reference, options } => {
            let client =
                Client::new(options).map_err(|e| ImportError::from_oci(e, ErrorKind::Source))?;
            let disk = client
                .open_disk(&reference)
                .map_err(|e| ImportError::from_oci(e, ErrorKind::Source))?;
            let length = Some(disk.size());
            Ok(Opened {
                reader: Box::new(Copying::new(disk)),
                random: None,
                length,
                name: reference.to_string(),
            })
        }
        Source::Path(path) => open_path(&path),
        // A file redirected to standard input is read as if named.
        Source::Stdin => match source::stdin_file() {
            Some(file) => open_file(file, "standard input".into()),
            None => Ok(Opened {
                reader: Box::new(Copying::new(source::stdin())),
                random: None,
                length: None,
                name: "standard input".into(),
            }),
        },
        Source::Reader {
            reader,
            length,
            name,
        } => Ok(Opened {
            reader,
            random: None,
            length,
            name,
        }),
        Source::Blank(_) => Err(ImportError::config("a blank disk has no source to open")),
    }
}

/// The disk file of a path: itself, or `disk.img` inside a directory (a filesystem PVC's
/// mount point).
pub fn disk_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("disk.img")
    } else {
        path.to_owned()
    }
}

fn open_path(path: &Path) -> Result<Opened, ImportError> {
    let path = disk_path(path);
    let name = path.display().to_string();
    let file = File::open(&path).map_err(|e| {
        ImportError::new(
            ErrorKind::Source,
            false,
            format!("opening {name}: {e}; check that the volume is mounted and readable"),
        )
    })?;
    open_file(file, name)
}

/// A local file or block device, read from its start: forwards once (direct I/O, holes not
/// read) and, being seekable, by random access too.
fn open_file(file: File, name: String) -> Result<Opened, ImportError> {
    let local = source::LocalFile::new(file)
        .map_err(|e| ImportError::new(ErrorKind::Source, true, format!("{name}: {e}")))?;
    Ok(Opened {
        // Holes of a sparse file are not read at all; zero blocks are skipped downstream.
        reader: Box::new(Copying::new(local.reader)),
        random: local.random,
        length: local.length,
        name,
    })
}

fn to_disk(
    opened: Opened,
    path: &Path,
    format: DiskFormat,
    target: TargetOptions,
    opts: &Options,
    progress: &Progress,
) -> Result<Outcome, ImportError> {
    let path = disk_path(path);
    let Opened { reader, random, .. } = opened;
    let reader: BoxRead = reader;
    let decode = |sink: &dyn dvcr_formats::Sink| {
        write_behind(sink, |behind| {
            dvcr_formats::decode(reader, random, behind, opts)
        })
        .map_err(ImportError::from_formats)
    };
    let dest_err = |e: dvcr_formats::Error| {
        if e.kind() == dvcr_formats::ErrorKind::Io {
            ImportError::destination(&e)
        } else {
            ImportError::new(ErrorKind::Config, false, dvcr_formats_message(&e))
        }
    };
    let (decoded, written): (dvcr_formats::Decoded, Written) = match format {
        DiskFormat::Raw => {
            let writer = DiskWriter::create(&path, target).map_err(dest_err)?;
            let decoded = decode(&writer)?;
            (decoded, writer.finish().map_err(dest_err)?)
        }
        DiskFormat::Qcow2 => {
            let writer = Qcow2Writer::create(&path, target).map_err(dest_err)?;
            let decoded = decode(&writer)?;
            (decoded, writer.finish().map_err(dest_err)?)
        }
    };
    Ok(Outcome {
        format: artifact::format_label(decoded.info.format).to_owned(),
        virtual_size: decoded.info.virtual_size,
        stored_size: decoded.image_bytes,
        cdrom: decoded.info.format.is_cdrom(),
        bytes_read: progress.read(),
        scratch_bytes: decoded.scratch_bytes,
        bytes_written: Some(written.bytes_written),
        disk_size: Some(written.disk_size),
        manifest_digest: None,
        mounted: false,
        destination: path.display().to_string(),
    })
}

fn dvcr_formats_message(e: &dvcr_formats::Error) -> String {
    crate::error::chain(e)
}

fn blank(
    size: u64,
    destination: Destination,
    progress: &Arc<Progress>,
) -> Result<Outcome, ImportError> {
    if size == 0 {
        return Err(ImportError::config(
            "a blank disk needs a size greater than zero",
        ));
    }
    match destination {
        Destination::Disk {
            path,
            format,
            size: requested,
            target_is_zero,
        } => {
            let target = TargetOptions {
                size: Some(requested.unwrap_or(size).max(size)),
                target_is_zero,
            };
            let reader: BoxChunkRead = Box::new(Copying::new(io::empty()));
            let opened = Opened {
                reader,
                random: None,
                length: Some(0),
                name: "a blank disk".into(),
            };
            // An empty raw stream decodes to a zero-length disk, which the requested size
            // grows: the writer makes the file sparse or zeroes the device as told.
            let mut outcome =
                to_disk(opened, &path, format, target, &Options::default(), progress)?;
            outcome.format = "raw".into();
            outcome.virtual_size = size;
            Ok(outcome)
        }
        Destination::Registry { reference, options } => {
            progress.set_total(Some(size));
            let opened = Opened {
                reader: Box::new(Copying::new(Meter::new(
                    io::repeat(0).take(size),
                    Arc::clone(progress),
                ))),
                random: None,
                length: Some(size),
                name: "a blank disk".into(),
            };
            to_registry(opened, &reference, options, (None, None), progress)
        }
    }
}

/// A writer that counts, and hashes unless the registry names the blob, what passes
/// through it.
struct Hashing<W> {
    inner: W,
    hash: Option<Sha256>,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = self.hash.as_mut() {
            h.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Some(Sha256::new()),
            len: 0,
        }
    }

    /// Counts without hashing.
    fn counting(inner: W) -> Self {
        Self {
            inner,
            hash: None,
            len: 0,
        }
    }

    fn digest(&self) -> Option<String> {
        let h = self.hash.clone()?;
        Some(format!("sha256:{}", hex::encode(h.finalize())))
    }
}

/// A blob writer that hashes what it sends, or only counts it when the registry names the
/// blob (DVCR hashes every byte it receives to verify it; hashing here too would be a second
/// full pass on the same machine, measured at a third of the importer's CPU time).
fn blob_hashing(upload: BlobWriter) -> Hashing<BlobWriter> {
    if upload.registry_names_blob() {
        Hashing::counting(upload)
    } else {
        Hashing::new(upload)
    }
}

/// The layer being written: plain tar, or tar inside zstd (then the uncompressed tar is
/// hashed too, for the config's diff ID).
enum Layer {
    Plain(Hashing<BlobWriter>),
    Zstd(Hashing<zstd::stream::write::Encoder<'static, Hashing<BlobWriter>>>),
}

impl Layer {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Layer::Plain(w) => w.write_all(data),
            Layer::Zstd(w) => w.write_all(data),
        }
    }

    /// Writes a chunk the caller will not touch again: a plain layer hands it to the
    /// upload as it is, without a copy.
    fn write_chunk(&mut self, chunk: bytes::Bytes) -> io::Result<()> {
        match self {
            Layer::Plain(w) => {
                if let Some(h) = w.hash.as_mut() {
                    h.update(&chunk);
                }
                w.len += chunk.len() as u64;
                w.inner.write_chunk(chunk)
            }
            Layer::Zstd(w) => w.write_all(&chunk),
        }
    }

    /// Ends the layer: (diff ID, blob digest, blob size, the inner writer). A digest is
    /// `None` when the registry names the blob; a plain layer's diff ID is its digest.
    fn finish(self) -> io::Result<(Option<String>, Option<String>, u64, BlobWriter)> {
        match self {
            Layer::Plain(w) => {
                let d = w.digest();
                Ok((d.clone(), d, w.len, w.inner))
            }
            Layer::Zstd(w) => {
                let diff_id = w.digest();
                let blob = w.inner.finish()?;
                let digest = blob.digest();
                Ok((diff_id, digest, blob.len, blob.inner))
            }
        }
    }
}

/// A sink that drops what it is given: the decoder run only to check an image.
struct NullSink;

impl dvcr_formats::Sink for NullSink {
    fn set_size(&self, _size: u64) -> dvcr_formats::Result<()> {
        Ok(())
    }

    fn write_at(&self, _offset: u64, _data: &[u8]) -> dvcr_formats::Result<()> {
        Ok(())
    }
}

/// Batches in flight to the validating decoder.
const VALIDATE_DEPTH: usize = 4;
/// Chunks are handed to the validating decoder in batches of about this many bytes: it has
/// little to do for most of them, and a wake-up per chunk (8-400 KiB each) cost more than
/// its work.
const VALIDATE_BATCH: usize = 2 << 20;

/// The single-pass decoder run over the same chunks as the upload, on a thread of its own,
/// writing nowhere: it finds what a header-only probe cannot (tables pointing past the end
/// of a truncated file, clusters that do not inflate, overlapping extents).
struct Validator {
    tx: Option<std::sync::mpsc::SyncSender<Vec<bytes::Bytes>>>,
    /// Chunks gathered for the next batch, and their bytes.
    batch: Vec<bytes::Bytes>,
    batch_len: usize,
    thread: std::thread::JoinHandle<dvcr_formats::Result<dvcr_formats::Decoded>>,
}

/// The receiving end, for the decoder: it lends the chunks (the qcow2 decoder looks at
/// them where they are; a copy into its buffer measured 9% of the importer's CPU time) and
/// reads them for the other decoders.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<bytes::Bytes>>,
    /// The rest of the batch being read, in order.
    queued: std::vec::IntoIter<bytes::Bytes>,
    current: bytes::Bytes,
    /// The bytes lent last (kept alive until the next call).
    lent: bytes::Bytes,
}

impl ChunkReader {
    /// Makes `current` non-empty; false at the end.
    fn fill(&mut self) -> bool {
        while self.current.is_empty() {
            if let Some(chunk) = self.queued.next() {
                self.current = chunk;
                continue;
            }
            match self.rx.recv() {
                Ok(batch) => self.queued = batch.into_iter(),
                Err(_) => return false,
            }
        }
        true
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.fill() {
            return Ok(0);
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

impl dvcr_formats::Lend for ChunkReader {
    fn lend(&mut self, max: usize) -> io::Result<&[u8]> {
        self.lent = if self.fill() {
            let n = max.min(self.current.len());
            self.current.split_to(n)
        } else {
            bytes::Bytes::new()
        };
        Ok(&self.lent)
    }
}

impl Validator {
    fn start(opts: Options) -> Result<Self, ImportError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(VALIDATE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("validate".into())
            .spawn(move || {
                let reader = ChunkReader {
                    rx,
                    queued: Vec::new().into_iter(),
                    current: bytes::Bytes::new(),
                    lent: bytes::Bytes::new(),
                };
                dvcr_formats::decode_lent(Box::new(reader), &NullSink, &opts)
            })
            .map_err(|e| {
                ImportError::new(
                    ErrorKind::Destination,
                    true,
                    format!("cannot start a thread: {e}"),
                )
            })?;
        Ok(Self {
            tx: Some(tx),
            batch: Vec::new(),
            batch_len: 0,
            thread,
        })
    }

    /// Passes the next chunk; false when the decoder has stopped (with an error).
    fn feed(&mut self, chunk: bytes::Bytes) -> bool {
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        self.batch_len < VALIDATE_BATCH || self.send()
    }

    /// Hands the gathered chunks to the decoder; false when it has stopped.
    fn send(&mut self) -> bool {
        self.batch_len = 0;
        let batch = std::mem::take(&mut self.batch);
        self.tx.as_ref().is_some_and(|tx| tx.send(batch).is_ok())
    }

    /// Ends the stream and waits for the decoder's verdict.
    fn finish(mut self) -> dvcr_formats::Result<dvcr_formats::Decoded> {
        if !self.batch.is_empty() {
            // A decoder that stopped early gives its error below.
            let _ = self.send();
        }
        self.tx = None;
        self.thread.join().unwrap_or_else(|_| {
            Err(dvcr_formats::Error::new(
                dvcr_formats::ErrorKind::Io,
                "the image check stopped unexpectedly",
            ))
        })
    }
}

/// Read size through the DVCR path.
const CHUNK: usize = 1 << 20;

fn to_registry(
    opened: Opened,
    reference: &Reference,
    options: RegistryOptions,
    (scratch_dir, scratch_limit): (Option<&Path>, Option<u64>),
    progress: &Progress,
) -> Result<Outcome, ImportError> {
    let Opened {
        mut reader, length, ..
    } = opened;
    // The first bytes say whether the image is compressed and which kind it is. They are
    // taken as chunks, to be sent on as they are when nothing has to be unpacked.
    let mut first = Vec::new();
    let mut first_len = 0;
    while first_len < dvcr_formats::detect::HEAD_LEN {
        let chunk = reader.read_chunk(CHUNK).map_err(read_error)?;
        if chunk.is_empty() {
            break;
        }
        first_len += chunk.len();
        first.push(chunk);
    }
    let mut head = Vec::with_capacity(first_len.min(dvcr_formats::detect::HEAD_LEN));
    for chunk in &first {
        let want = dvcr_formats::detect::HEAD_LEN - head.len();
        head.extend_from_slice(&chunk[..want.min(chunk.len())]);
    }
    let replay = Replay::new(first, reader);

    let mut scratch_bytes = 0;
    let plain = compress::detect(&head[..head.len().min(compress::MAGIC_LEN)]).is_none();
    let (mut data, size, head): (BoxChunkRead, u64, Vec<u8>) = match length {
        // The common case: the bytes as they came are the entry, of a known size.
        Some(len) if plain => (Box::new(replay), len, head),
        _ => {
            // The entry's size is hidden by a compression wrapper, or was never announced:
            // the unpacked image is measured on scratch space first.
            let (mut inner, _) =
                compress::unwrap(Box::new(replay)).map_err(ImportError::from_formats)?;
            let mut head = vec![0u8; dvcr_formats::detect::HEAD_LEN];
            let head_len = read_full(&mut inner, &mut head).map_err(read_error)?;
            head.truncate(head_len);
            let raw_like = artifact::compress_layer(dvcr_formats::detect::sniff(&head));
            let (file, len, written) =
                spill(&head, &mut inner, scratch_dir, scratch_limit, raw_like)?;
            scratch_bytes = written;
            (Box::new(Copying::new(SequentialFile::new(file))), len, head)
        }
    };
    let sniffed = dvcr_formats::detect::sniff(&head);
    let raw_like = artifact::compress_layer(sniffed);
    // The file's name is settled from the head (the probe confirms the format at the end).
    let file_name = artifact::file_name(sniffed);

    let client =
        Client::new(options).map_err(|e| ImportError::from_oci(e, ErrorKind::Destination))?;
    let upload = client
        .upload_blob(reference)
        .map_err(|e| ImportError::from_oci(e, ErrorKind::Destination))?;
    let mut layer = if raw_like {
        let encoder = zstd::stream::write::Encoder::new(blob_hashing(upload), 1)
            .map_err(|e| ImportError::new(ErrorKind::Destination, false, e.to_string()))?;
        Layer::Zstd(Hashing::new(encoder))
    } else {
        Layer::Plain(blob_hashing(upload))
    };
    let mut probe = StreamProbe::new();
    let write_err =
        |e: io::Error| ImportError::destination(&e).context("streaming the layer to the registry");
    layer
        .write_all(&artifact::layer_prefix(file_name, size))
        .map_err(write_err)?;
    // Images with tables are decoded on the way (into nothing) by a thread of their own:
    // a truncated or damaged image whose header is fine fails here, before anything is
    // published, instead of when a disk is made from it.
    let mut validator = if raw_like {
        None
    } else {
        Some(Validator::start(Options {
            scratch_dir: scratch_dir.map(Path::to_path_buf),
            ..Options::default()
        })?)
    };
    // Chunks go to the check and the upload as they are: an HTTP body's own buffers (8-400
    // KiB each), or buffers a local source was read into once. Joining the small ones into
    // 1 MiB buffers (fewer chunks downstream, one copy) measured 9% more importer CPU.
    let mut copied = 0u64;
    loop {
        let chunk = data.read_chunk(CHUNK).map_err(read_error)?;
        let n = chunk.len();
        if n == 0 {
            break;
        }
        copied += n as u64;
        if copied > size {
            return Err(ImportError::new(
                ErrorKind::Source,
                true,
                format!("the source sent more than the {size} bytes it announced"),
            ));
        }
        probe.feed(&chunk);
        if let Some(v) = validator.as_mut()
            && !v.feed(chunk.clone())
            && let Some(v) = validator.take()
        {
            // The decoder stopped early: the image is damaged.
            return Err(v.finish().map_or_else(ImportError::from_formats, |_| {
                ImportError::new(ErrorKind::Image, false, "checking the image stopped early")
            }));
        }
        layer.write_chunk(chunk).map_err(write_err)?;
    }
    if copied != size {
        return Err(ImportError::new(
            ErrorKind::Source,
            true,
            format!("the source ended after {copied} of the {size} bytes it announced"),
        ));
    }
    let info = probe.finish().map_err(ImportError::from_formats)?;
    if let Some(v) = validator.take() {
        let checked = v.finish().map_err(ImportError::from_formats)?;
        scratch_bytes += checked.scratch_bytes;
    }
    layer
        .write_all(&artifact::layer_suffix(size))
        .map_err(write_err)?;
    let (diff_id, layer_digest, layer_size, upload) = layer.finish().map_err(write_err)?;
    let layer_digest = match layer_digest {
        Some(digest) => upload.finish(&digest).map(|()| digest),
        None => upload.finish_named(),
    }
    .map_err(|e| ImportError::from_oci(e, ErrorKind::Destination))?;
    // Without a diff ID of its own the layer is plain: its bytes are the tar.
    let diff_id = diff_id.unwrap_or_else(|| layer_digest.clone());

    let labels = Labels {
        stored_size: size,
        virtual_size: info.virtual_size,
        format: artifact::format_label(info.format).to_owned(),
    };
    let config = artifact::config_json(&labels, &diff_id);
    let config_digest = client
        .push_blob_bytes(reference, &config)
        .map_err(|e| ImportError::from_oci(e, ErrorKind::Destination))?;
    let manifest = artifact::manifest_json(
        &Descriptor {
            media_type: artifact::CONFIG_MEDIA_TYPE.into(),
            digest: config_digest,
            size: config.len() as u64,
        },
        &Descriptor {
            media_type: if raw_like {
                artifact::LAYER_TAR_ZSTD
            } else {
                artifact::LAYER_TAR
            }
            .into(),
            digest: layer_digest,
            size: layer_size,
        },
    );
    let manifest_digest = client
        .put_manifest(reference, artifact::MANIFEST_MEDIA_TYPE, &manifest)
        .map_err(|e| ImportError::from_oci(e, ErrorKind::Destination))?;
    Ok(Outcome {
        format: labels.format,
        virtual_size: info.virtual_size,
        stored_size: size,
        cdrom: info.format.is_cdrom(),
        bytes_read: progress.read(),
        scratch_bytes,
        bytes_written: None,
        disk_size: None,
        manifest_digest: Some(manifest_digest),
        mounted: false,
        destination: reference.to_string(),
    })
}

/// Classifies a read error of the source (a broken download, a checksum mismatch at the end,
/// damaged compressed data).
fn read_error(e: io::Error) -> ImportError {
    if crate::checksum::find_mismatch(&e).is_some() {
        return ImportError::new(ErrorKind::Checksum, false, crate::error::chain(&e));
    }
    if let Some(source) = crate::error::find::<crate::SourceError>(&e) {
        return ImportError::new(
            ErrorKind::Source,
            source.is_transient(),
            crate::error::chain(&e),
        );
    }
    if let Some(oci) = crate::oci::OciError::from_io(&e) {
        return ImportError::new(
            ErrorKind::Source,
            oci.is_transient(),
            crate::error::chain(&e),
        );
    }
    if e.kind() == io::ErrorKind::InvalidData {
        return ImportError::new(ErrorKind::Image, false, crate::error::chain(&e));
    }
    ImportError::new(ErrorKind::Source, true, crate::error::chain(&e))
}

/// The scratch limit was reached (inside an `io::Error` from the spill loop).
#[derive(Debug, thiserror::Error)]
#[error("the scratch limit was reached")]
struct ScratchLimit;

/// Zero blocks skipped when spilling a raw image to scratch (they become holes).
const SPILL_BLOCK: usize = 64 << 10;

/// Measures a stream whose length is unknown by writing it to an unlinked scratch file:
/// returns the file (at its start), the stream's length and the bytes actually written
/// (zero blocks of raw-like images are left as holes).
fn spill(
    head: &[u8],
    rest: &mut impl Read,
    dir: Option<&Path>,
    limit: Option<u64>,
    raw_like: bool,
) -> Result<(File, u64, u64), ImportError> {
    let scratch_err = |e: io::Error| {
        if let (Some(limit), Some(ScratchLimit)) = (
            limit,
            e.get_ref()
                .and_then(|inner| inner.downcast_ref::<ScratchLimit>()),
        ) {
            return ImportError::new(
                ErrorKind::Config,
                false,
                format!(
                    "the unpacked image needs more than the {limit} bytes of scratch space allowed \
                     (--scratch-limit, IMPORTER_SCRATCH_LIMIT); raise the limit, or give the image \
                     uncompressed so that its size is known before it is stored"
                ),
            );
        }
        // A full scratch disk fails the same way on every retry.
        let full = matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        );
        ImportError::new(
            if full {
                ErrorKind::Config
            } else {
                ErrorKind::Destination
            },
            !full,
            format!(
                "writing scratch space (needed to measure a compressed image before storing it): {e}; \
                 give a scratch directory with room for the unpacked image"
            ),
        )
    };
    let mut file = match dir {
        Some(d) => tempfile::tempfile_in(d),
        None => tempfile::tempfile(),
    }
    .map_err(scratch_err)?;
    let mut len = 0u64;
    let mut written = 0u64;
    {
        let mut put = |file: &mut File, data: &[u8]| -> io::Result<()> {
            for block in data.chunks(SPILL_BLOCK) {
                if raw_like && dvcr_formats::sink::is_zero(block) {
                    file.seek(io::SeekFrom::Current(block.len() as i64))?;
                } else {
                    if limit.is_some_and(|l| written + block.len() as u64 > l) {
                        return Err(io::Error::other(ScratchLimit));
                    }
                    file.write_all(block)?;
                    written += block.len() as u64;
                }
                len += block.len() as u64;
            }
            Ok(())
        };
        put(&mut file, head).map_err(scratch_err)?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match rest.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            put(&mut file, &buf[..n]).map_err(scratch_err)?;
        }
    }
    file.set_len(len).map_err(scratch_err)?;
    file.rewind().map_err(scratch_err)?;
    Ok((file, len, written))
}

/// DVCR to DVCR in one registry: mounts the layer and config into the new repository and
/// pushes the same manifest, so no disk bytes move. `None` when the source is not a
/// one-layer DVCR artifact or the registry will not mount (then the data is streamed).
fn copy_within_registry(
    from: &Reference,
    to: &Reference,
    from_options: &RegistryOptions,
    options: &RegistryOptions,
) -> Result<Option<Outcome>, ImportError> {
    let src_err = |e| ImportError::from_oci(e, ErrorKind::Source);
    let dst_err = |e| ImportError::from_oci(e, ErrorKind::Destination);
    // The source is read with its own credentials; the mount needs the destination's.
    let reader = Client::new(from_options.clone()).map_err(src_err)?;
    let client = Client::new(options.clone()).map_err(dst_err)?;
    let (media_type, manifest, _) = reader.get_manifest(from).map_err(src_err)?;
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&manifest) else {
        return Ok(None);
    };
    let descriptor = |v: &serde_json::Value| -> Option<(String, u64)> {
        Some((
            v.get("digest")?.as_str()?.to_owned(),
            v.get("size")?.as_u64()?,
        ))
    };
    let Some((config_digest, config_size)) = parsed.get("config").and_then(descriptor) else {
        return Ok(None);
    };
    let layers: Vec<(String, u64)> = match parsed.get("layers").and_then(|l| l.as_array()) {
        Some(l) if l.len() == 1 => l.iter().filter_map(descriptor).collect(),
        _ => return Ok(None),
    };
    if layers.len() != 1 || config_size > 1 << 20 {
        return Ok(None);
    }
    let config = reader
        .get_blob_bytes(from, &config_digest, 1 << 20)
        .map_err(src_err)?;
    let Some(labels) = artifact::labels_of(&config) else {
        return Ok(None);
    };
    for digest in [&config_digest, &layers[0].0] {
        if !client
            .mount_blob(to, &from.repository, digest)
            .map_err(dst_err)?
        {
            return Ok(None);
        }
    }
    let digest = client
        .put_manifest(to, &media_type, &manifest)
        .map_err(dst_err)?;
    Ok(Some(Outcome {
        cdrom: labels.format == "iso",
        format: labels.format,
        virtual_size: labels.virtual_size,
        stored_size: labels.stored_size,
        bytes_read: 0,
        scratch_bytes: 0,
        bytes_written: None,
        disk_size: None,
        manifest_digest: Some(digest),
        mounted: true,
        destination: to.to_string(),
    }))
}
