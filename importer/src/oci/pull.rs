//! Pulling the disk out of a container image: resolve the manifest (an index picks the
//! platform), then walk the layers from the top down to the first regular file under
//! `disk/` that no upper layer whited out, and stream it.
//!
//! The walk runs on a thread of its own (tar parsing and decompression are CPU work and
//! the `tar` crate's entries borrow the archive), and hands the disk's bytes to
//! [`DiskReader`] over a bounded channel. Every layer read is read to its end so its digest
//! is verified: the upper layers passed through before the disk is found, and the disk's
//! layer after the disk entry, whose digest error (or a second disk file) then arrives as a
//! read error before the end is reported, never as a clean end of file.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read};
use std::rc::Rc;
use std::sync::mpsc;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header;

use super::Client;
use super::error::{OciError, OciErrorKind};
use super::manifest::{
    self, ACCEPT_MANIFESTS, Compression, Descriptor, ImageManifest, MAX_MANIFEST_BYTES, Manifest,
};
use super::reference::{Reference, parse_digest, shown};
use super::transport::{BlobReader, Call, Core, Hasher, header_text, pull_scope, read_small};

/// Bytes per chunk handed to the reader.
const DISK_CHUNK: usize = 256 << 10;
/// Chunks in flight between the walker and the reader.
const DISK_CHUNKS: usize = 16;
/// The most tar metadata (headers, long names, PAX records) between two entries' data.
const MAX_TAR_METADATA: u64 = 1 << 20;
/// How much of a layer is still read after a decoding error to tell corruption (digest)
/// from a malformed layer.
const MAX_DRAIN_AFTER_ERROR: u64 = 64 << 20;

/// What the walker hands the reader.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    /// The disk's bytes are all sent and its layer is verified.
    End,
    Failed(io::Error),
}

/// The disk file found.
#[derive(Debug)]
struct Found {
    file_name: String,
    size: u64,
    layer_digest: String,
}

/// The disk file of an image as a blocking reader. The bytes are those of the tar entry;
/// the end is reported only after the whole layer has been read and its digest verified.
/// Errors carry an [`OciError`] (see [`OciError::from_io`]).
#[derive(Debug)]
pub struct DiskReader {
    pieces: mpsc::Receiver<Piece>,
    current: Bytes,
    size: u64,
    file_name: String,
    manifest_digest: String,
    layer_digest: String,
    delivered: u64,
    state: ReadState,
}

#[derive(Debug)]
enum ReadState {
    Open,
    Done,
    Failed(OciError),
}

impl DiskReader {
    /// The size of the disk file (its tar entry), in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's name under `disk/` (`disk.qcow2`).
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// The digest of the image manifest (of the platform's manifest for an index).
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The digest of the layer holding the disk.
    pub fn layer_digest(&self) -> &str {
        &self.layer_digest
    }

    fn fail(&mut self, e: OciError) -> io::Error {
        self.state = ReadState::Failed(e.clone());
        e.into_io()
    }
}

impl Read for DiskReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current.split_to(n));
                return Ok(n);
            }
            match &self.state {
                ReadState::Done => return Ok(0),
                ReadState::Failed(e) => return Err(e.clone().into_io()),
                ReadState::Open => {}
            }
            if buf.is_empty() {
                return Ok(0);
            }
            match self.pieces.recv() {
                Ok(Piece::Data(chunk)) => {
                    self.delivered += chunk.len() as u64;
                    if self.delivered > self.size {
                        let e = OciError::invalid(format!(
                            "the layer {} gave more than the {} bytes of disk/{}",
                            self.layer_digest, self.size, self.file_name
                        ));
                        return Err(self.fail(e));
                    }
                    self.current = chunk;
                }
                Ok(Piece::End) => {
                    if self.delivered != self.size {
                        let e = OciError::invalid(format!(
                            "the layer {} ended disk/{} after {} of {} bytes",
                            self.layer_digest, self.file_name, self.delivered, self.size
                        ));
                        return Err(self.fail(e));
                    }
                    self.state = ReadState::Done;
                    return Ok(0);
                }
                Ok(Piece::Failed(e)) => {
                    let inner = OciError::from_io(&e)
                        .cloned()
                        .unwrap_or_else(|| OciError::invalid(e.to_string()));
                    self.state = ReadState::Failed(inner);
                    return Err(e);
                }
                Err(mpsc::RecvError) => {
                    let e = OciError::transient(format!(
                        "the pull of disk/{} from layer {} stopped unexpectedly",
                        self.file_name, self.layer_digest
                    ));
                    return Err(self.fail(e));
                }
            }
        }
    }
}

impl Client {
    /// The raw manifest (or index) of `r`: media type, bytes, digest. At most 4 MiB; the
    /// digest is verified when `r` names one (and against `Docker-Content-Digest`
    /// otherwise).
    pub fn get_manifest(&self, r: &Reference) -> Result<(String, Vec<u8>, String), OciError> {
        let core = self.core();
        let r = r.clone();
        self.run(async move {
            let reference = r.reference().to_owned();
            fetch_manifest(&core, &r, &reference).await
        })
    }

    /// A small blob (a config) of `r`'s repository, at most `limit` bytes, digest verified.
    pub fn get_blob_bytes(
        &self,
        r: &Reference,
        digest: &str,
        limit: u64,
    ) -> Result<Vec<u8>, OciError> {
        let digest = parse_digest(digest).map_err(OciError::invalid)?;
        let core = self.core();
        let r = r.clone();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.run(async move {
            let what = format!("fetching blob {digest} of {}/{}", r.registry, r.repository);
            let url = core
                .url(&r.registry, &format!("{}/blobs/{digest}", r.repository))
                .await
                .map_err(|e| e.context(&what))?;
            let call = Call::new(Method::GET, url, vec![pull_scope(&r.repository)]);
            let resp = core.send_ok(&r.registry, &call, &what).await?;
            let body = read_small(resp, limit, &what).await?;
            let actual = Hasher::digest_like(&digest, &body);
            if actual != digest {
                return Err(OciError::digest(format!(
                    "{what}: the bytes the registry sent hash to {actual}"
                )));
            }
            Ok(body)
        })
    }

    /// The image manifest of `r` for the client's platform, and its digest.
    pub fn resolve_image(&self, r: &Reference) -> Result<(ImageManifest, String), OciError> {
        let core = self.core();
        let r = r.clone();
        let platform = self.inner.platform.clone();
        self.run(async move {
            let reference = r.reference().to_owned();
            let (media_type, bytes, digest) = fetch_manifest(&core, &r, &reference).await?;
            let parsed = manifest::parse_manifest(Some(&media_type), &bytes)
                .map_err(|e| e.context(format!("the manifest of {r}")))?;
            let index = match parsed {
                Manifest::Image(m) => return Ok((m, digest)),
                Manifest::Index(index) => index,
            };
            let entry = manifest::select_platform(&index, &platform)
                .map_err(|e| e.context(&r))?
                .clone();
            tracing::debug!(image = %r, platform = %platform, manifest = %entry.digest, "index resolved");
            let (media_type, bytes, digest) = fetch_manifest(&core, &r, &entry.digest).await?;
            if bytes.len() as u64 != entry.size {
                return Err(OciError::digest(format!(
                    "the manifest {} of {r} is {} bytes, its index says {}",
                    entry.digest,
                    bytes.len(),
                    entry.size
                )));
            }
            match manifest::parse_manifest(Some(&media_type), &bytes)
                .map_err(|e| e.context(format!("the manifest {} of {r}", entry.digest)))?
            {
                Manifest::Image(m) => Ok((m, digest)),
                Manifest::Index(_) => Err(OciError::invalid(format!(
                    "the index of {r} points at another index for {platform}; nested indexes are not supported"
                ))),
            }
        })
    }

    /// Opens the disk file of the image `r`: the single regular file under `disk/` of the
    /// topmost layer that has one, whiteouts of upper layers honoured.
    pub fn open_disk(&self, r: &Reference) -> Result<DiskReader, OciError> {
        let (image, manifest_digest) = self.resolve_image(r)?;
        let (head_tx, head_rx) = mpsc::sync_channel(1);
        let (data_tx, data_rx) = mpsc::sync_channel(DISK_CHUNKS);
        let walker = Walker {
            client: self.clone(),
            reference: r.clone(),
            layers: image.layers,
            head: Some(head_tx),
            data: data_tx,
        };
        std::thread::Builder::new()
            .name("oci-pull".into())
            .spawn(move || walker.run())
            .map_err(|e| OciError::transient(format!("cannot start a thread to pull {r}: {e}")))?;
        let found: Found = head_rx.recv().map_err(|_| {
            OciError::transient(format!("the pull of {r} stopped before finding the disk"))
        })??;
        tracing::info!(image = %r, file = %found.file_name, size = found.size, layer = %found.layer_digest, "disk found in the image");
        Ok(DiskReader {
            pieces: data_rx,
            current: Bytes::new(),
            size: found.size,
            file_name: found.file_name,
            manifest_digest,
            layer_digest: found.layer_digest,
            delivered: 0,
            state: ReadState::Open,
        })
    }
}

/// GETs a manifest by tag or digest, bounded and verified.
async fn fetch_manifest(
    core: &Core,
    r: &Reference,
    reference: &str,
) -> Result<(String, Vec<u8>, String), OciError> {
    let shown_ref = if reference.contains(':') {
        format!("{}@{reference}", r.repository)
    } else {
        format!("{}:{reference}", r.repository)
    };
    let what = format!("fetching the manifest of {shown_ref} from {}", r.registry);
    let url = core
        .url(
            &r.registry,
            &format!("{}/manifests/{reference}", r.repository),
        )
        .await
        .map_err(|e| e.context(&what))?;
    let call = Call::new(Method::GET, url, vec![pull_scope(&r.repository)])
        .header(header::ACCEPT, ACCEPT_MANIFESTS);
    let resp = core.send_ok(&r.registry, &call, &what).await?;
    let media_type = header_text(resp.headers(), "content-type")
        .map(manifest::bare_media_type)
        .unwrap_or_default();
    let header_digest = header_text(resp.headers(), "docker-content-digest")
        .and_then(|d| parse_digest(d.trim()).ok());
    let body = read_small(resp, MAX_MANIFEST_BYTES, &what).await?;
    let digest = if reference.contains(':') {
        let actual = Hasher::digest_like(reference, &body);
        if actual != reference {
            return Err(OciError::digest(format!(
                "{what}: the registry sent a manifest whose digest is {actual}: it was changed on the way or the registry is broken"
            )));
        }
        actual
    } else {
        Hasher::digest_like("sha256:", &body)
    };
    if let Some(claimed) = header_digest {
        let actual = Hasher::digest_like(&claimed, &body);
        if actual != claimed {
            return Err(OciError::digest(format!(
                "{what}: the registry says the manifest is {claimed} but its bytes hash to {actual}"
            )));
        }
    }
    // A registry that does not say (or says plain JSON): the body's own `mediaType`.
    let media_type = if media_type.is_empty()
        || media_type == "application/json"
        || media_type == "application/octet-stream"
    {
        #[derive(serde::Deserialize)]
        struct Typed {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        serde_json::from_slice::<Typed>(&body)
            .ok()
            .and_then(|t| t.media_type)
            .map(|t| manifest::bare_media_type(&t))
            .filter(|t| !t.is_empty())
            .unwrap_or(media_type)
    } else {
        media_type
    };
    Ok((media_type, body, digest))
}

/// A name in a layer, as far as the disk is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    /// `disk` itself.
    DiskDir,
    /// `.wh.disk`: the directory is deleted.
    DiskWhiteout,
    /// `disk/.wh..wh..opq`: lower layers' `disk/` is hidden.
    Opaque,
    /// `disk/.wh.<name>`.
    Whiteout(String),
    /// `disk/<name>`.
    File(String),
}

/// Classifies a tar path (`disk/x`, `./disk/x`, `/disk/x`).
fn classify(raw: &[u8]) -> Option<Name> {
    let text = String::from_utf8_lossy(raw);
    let mut p: &str = &text;
    loop {
        if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        } else if let Some(rest) = p.strip_prefix('/') {
            p = rest;
        } else {
            break;
        }
    }
    let p = p.trim_end_matches('/');
    if p == "disk" {
        return Some(Name::DiskDir);
    }
    if p == ".wh.disk" {
        return Some(Name::DiskWhiteout);
    }
    let rest = p.strip_prefix("disk/")?;
    let rest = rest.trim_start_matches("./");
    if rest.is_empty() || rest == "." {
        return Some(Name::DiskDir);
    }
    if rest.contains('/') {
        return None;
    }
    if rest == ".wh..wh..opq" {
        return Some(Name::Opaque);
    }
    if let Some(name) = rest.strip_prefix(".wh.") {
        return Some(Name::Whiteout(name.to_owned()));
    }
    Some(Name::File(rest.to_owned()))
}

/// Checks the disk file's name, which callers may use as a file name.
fn check_file_name(name: &str, what: &str) -> Result<(), OciError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c.is_control());
    if ok {
        Ok(())
    } else {
        Err(OciError::invalid(format!(
            "{what}: the disk file name {} is not usable (it must be UTF-8 without control characters, 1-255 bytes)",
            shown(name)
        )))
    }
}

/// Metadata-read budget shared by the walker and the reader under the tar parser.
#[derive(Debug, Default)]
struct Budget {
    metered: Cell<bool>,
    left: Cell<u64>,
}

/// The reader the tar parser reads from: while the parser looks for the next entry, reads
/// are limited (a GNU long name or PAX record is read whole into memory by the `tar`
/// crate, so its untrusted size must be bounded); entry data is not limited.
struct Metered {
    inner: Decoder,
    budget: Rc<Budget>,
}

impl Read for Metered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.budget.metered.get() {
            return self.inner.read(buf);
        }
        let left = self.budget.left.get();
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the tar headers between two entries are larger than {MAX_TAR_METADATA} bytes"
                ),
            ));
        }
        let max = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.budget.left.set(left - n as u64);
        Ok(n)
    }
}

/// The compressed bytes and what was peeked of them.
type Raw = io::Chain<io::Cursor<Vec<u8>>, BlobReader>;

/// A layer's decompressor over its verified blob.
enum Decoder {
    Plain(Box<Raw>),
    Gzip(Box<flate2::read::MultiGzDecoder<Raw>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, io::BufReader<Raw>>>),
}

impl Decoder {
    fn new(mut blob: BlobReader, compression: Compression) -> io::Result<Self> {
        let mut prefix = Vec::new();
        let kind = if compression == Compression::Detect {
            let mut head = [0u8; 4];
            let mut got = 0;
            while got < head.len() {
                match blob.read(&mut head[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            prefix.extend_from_slice(&head[..got]);
            manifest::sniff(&prefix)
        } else {
            compression
        };
        let raw = io::Cursor::new(prefix).chain(blob);
        Ok(match kind {
            Compression::Gzip => Decoder::Gzip(Box::new(flate2::read::MultiGzDecoder::new(raw))),
            Compression::Zstd => Decoder::Zstd(Box::new(zstd::stream::read::Decoder::new(raw)?)),
            Compression::None | Compression::Detect => Decoder::Plain(Box::new(raw)),
        })
    }

    /// The compressed stream, for reading it to its end.
    fn into_raw(self) -> BlobReader {
        match self {
            Decoder::Plain(raw) => (*raw).into_inner().1,
            Decoder::Gzip(d) => (*d).into_inner().into_inner().1,
            Decoder::Zstd(d) => (*d).finish().into_inner().into_inner().1,
        }
    }
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// How a layer ended for the walk.
enum Outcome {
    /// The disk was in it and has been sent.
    Streamed,
    /// The reader went away.
    Stopped,
    /// No disk here: what it deletes below.
    Passed {
        whiteouts: HashSet<String>,
        hides_lower: bool,
    },
}

/// The walk over the layers, on its own thread.
struct Walker {
    client: Client,
    reference: Reference,
    layers: Vec<Descriptor>,
    head: Option<mpsc::SyncSender<Result<Found, OciError>>>,
    data: mpsc::SyncSender<Piece>,
}

impl Walker {
    fn run(mut self) {
        if let Err(e) = self.walk() {
            tracing::debug!(image = %self.reference, error = %e, "disk pull failed");
            match self.head.take() {
                Some(head) => {
                    let _ = head.send(Err(e));
                }
                None => {
                    let _ = self.data.send(Piece::Failed(e.into_io()));
                }
            }
        }
    }

    fn walk(&mut self) -> Result<(), OciError> {
        let hint = format!(
            "the image {} has no regular file under disk/: push the disk image as /disk/<file>",
            self.reference
        );
        if self.layers.is_empty() {
            return Err(OciError::invalid(format!("{hint} (it has no layers)")));
        }
        let mut deleted: HashSet<String> = HashSet::new();
        let layers = self.layers.clone();
        for (i, layer) in layers.iter().enumerate().rev() {
            let what = format!(
                "layer {} of {} ({}) of {}",
                i + 1,
                layers.len(),
                layer.digest,
                self.reference
            );
            match self.scan_layer(layer, &deleted, &what)? {
                Outcome::Streamed | Outcome::Stopped => return Ok(()),
                Outcome::Passed {
                    whiteouts,
                    hides_lower,
                } => {
                    if hides_lower {
                        return Err(OciError::invalid(format!(
                            "{hint} (layer {} deletes disk/ of the layers below it)",
                            i + 1
                        )));
                    }
                    deleted.extend(whiteouts);
                }
            }
        }
        Err(OciError::invalid(hint))
    }

    /// Reads one layer to its end; streams the disk if it is here.
    fn scan_layer(
        &mut self,
        layer: &Descriptor,
        deleted: &HashSet<String>,
        what: &str,
    ) -> Result<Outcome, OciError> {
        let compression =
            manifest::layer_compression(&layer.media_type).map_err(|e| e.context(what))?;
        let core = self.client.core();
        let blob = core.open_blob(
            self.client.handle(),
            &self.reference.registry,
            &self.reference.repository,
            layer,
            what.to_owned(),
        )?;
        let decoder = Decoder::new(blob, compression).map_err(|e| layer_error(e, what))?;
        let plain = matches!(decoder, Decoder::Plain(_));
        let budget = Rc::new(Budget::default());
        let mut archive = tar::Archive::new(Metered {
            inner: decoder,
            budget: budget.clone(),
        });
        let mut scan = Scan {
            plain,
            whiteouts: HashSet::new(),
            hides_lower: false,
            streamed: None,
        };
        let result = self.scan_entries(&mut archive, &budget, layer, deleted, what, &mut scan);
        budget.metered.set(false);
        let mut decoder = archive.into_inner().inner;
        match result {
            Ok(true) => {}
            Ok(false) => return Ok(Outcome::Stopped),
            Err(e) => return Err(verdict_after_error(decoder.into_raw(), e)),
        }
        // The rest of the decompressed stream (tar padding), then of the compressed one:
        // reading the blob to its end is what verifies its digest.
        if let Err(e) = io::copy(&mut decoder, &mut io::sink()) {
            return Err(verdict_after_error(
                decoder.into_raw(),
                layer_error(e, what),
            ));
        }
        let mut raw = decoder.into_raw();
        io::copy(&mut raw, &mut io::sink()).map_err(|e| layer_error(e, what))?;
        if scan.streamed.is_some() {
            if self.data.send(Piece::End).is_err() {
                return Ok(Outcome::Stopped);
            }
            return Ok(Outcome::Streamed);
        }
        Ok(Outcome::Passed {
            whiteouts: scan.whiteouts,
            hides_lower: scan.hides_lower,
        })
    }

    /// Goes through a layer's entries; `Ok(false)` when the reader went away.
    fn scan_entries(
        &mut self,
        archive: &mut tar::Archive<Metered>,
        budget: &Budget,
        layer: &Descriptor,
        deleted: &HashSet<String>,
        what: &str,
        scan: &mut Scan,
    ) -> Result<bool, OciError> {
        let mut entries = archive.entries().map_err(|e| layer_error(e, what))?;
        loop {
            budget.left.set(MAX_TAR_METADATA);
            budget.metered.set(true);
            let next = entries.next();
            budget.metered.set(false);
            let Some(entry) = next else {
                return Ok(true);
            };
            let mut entry = entry.map_err(|e| layer_error(e, what))?;
            let kind = entry.header().entry_type();
            let raw_path = entry.path_bytes().into_owned();
            match classify(&raw_path) {
                // `disk` as a file or link replaces the directory below.
                Some(Name::DiskDir) if !kind.is_dir() => scan.hides_lower = true,
                Some(Name::DiskDir) => {}
                Some(Name::DiskWhiteout) | Some(Name::Opaque) => scan.hides_lower = true,
                Some(Name::Whiteout(name)) => {
                    scan.whiteouts.insert(name);
                }
                Some(Name::File(name)) if deleted.contains(&name) => {
                    tracing::debug!(%what, file = %name, "disk file deleted by an upper layer; skipped");
                }
                Some(Name::File(name)) if kind.is_file() || kind.is_contiguous() => {
                    if let Some(first) = &scan.streamed {
                        return Err(OciError::invalid(format!(
                            "{what}: it holds more than one regular file under disk/ ({} and {}): a disk image holds exactly one; push an image with a single /disk/<file>",
                            shown(first),
                            shown(&name)
                        )));
                    }
                    if std::str::from_utf8(&raw_path).is_err() {
                        return Err(OciError::invalid(format!(
                            "{what}: the disk file name is not UTF-8; rename it"
                        )));
                    }
                    check_file_name(&name, what)?;
                    let size = entry.size();
                    if scan.plain && size > layer.size {
                        return Err(OciError::invalid(format!(
                            "{what}: disk/{name} claims {size} bytes in a layer of {}",
                            layer.size
                        )));
                    }
                    let found = Found {
                        file_name: name.clone(),
                        size,
                        layer_digest: layer.digest.clone(),
                    };
                    if let Some(head) = self.head.take()
                        && head.send(Ok(found)).is_err()
                    {
                        return Ok(false);
                    }
                    scan.streamed = Some(name.clone());
                    if !self.stream_entry(&mut entry, size, &name, what)? {
                        return Ok(false);
                    }
                    continue;
                }
                Some(Name::File(name)) => {
                    tracing::warn!(%what, file = %name, kind = ?kind, "an entry under disk/ is not a regular file; skipped");
                }
                None => {}
            }
            // Read what is left of the entry here, so the parser's next step reads headers
            // only (and its budget covers headers only).
            io::copy(&mut entry, &mut io::sink()).map_err(|e| layer_error(e, what))?;
        }
    }

    /// Sends `size` bytes of `entry`; `Ok(false)` when the reader went away.
    fn stream_entry(
        &mut self,
        entry: &mut impl Read,
        size: u64,
        name: &str,
        what: &str,
    ) -> Result<bool, OciError> {
        let mut left = size;
        while left > 0 {
            let want = left.min(DISK_CHUNK as u64) as usize;
            let mut chunk = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                match entry.read(&mut chunk[filled..]) {
                    Ok(0) => {
                        return Err(OciError::invalid(format!(
                            "{what}: the layer ends inside disk/{name} after {} of {size} bytes",
                            size - left + filled as u64
                        )));
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(layer_error(e, what)),
                }
            }
            left -= want as u64;
            if self.data.send(Piece::Data(Bytes::from(chunk))).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// What one layer's entries showed.
struct Scan {
    /// The layer is an uncompressed tar, so no entry can be larger than the blob.
    plain: bool,
    whiteouts: HashSet<String>,
    hides_lower: bool,
    streamed: Option<String>,
}

/// An error reading a layer: the registry error it carries, or a malformed layer.
fn layer_error(e: io::Error, what: &str) -> OciError {
    if let Some(inner) = OciError::from_io(&e) {
        return inner.clone();
    }
    OciError::invalid(format!(
        "{what}: the layer is not a valid tar (or compressed tar): {e}"
    ))
}

/// After a decoding error, reads a little more of the blob: when the blob ends within that
/// and its digest is wrong, corruption is the real cause and is reported instead.
fn verdict_after_error(raw: BlobReader, error: OciError) -> OciError {
    if error.kind() != OciErrorKind::Invalid {
        return error;
    }
    let mut limited = raw.take(MAX_DRAIN_AFTER_ERROR);
    match io::copy(&mut limited, &mut io::sink()) {
        Err(e) => match OciError::from_io(&e) {
            Some(inner) if inner.kind() == OciErrorKind::Digest => inner.clone(),
            _ => error,
        },
        Ok(_) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_classified_with_any_prefix() {
        assert_eq!(classify(b"disk/"), Some(Name::DiskDir));
        assert_eq!(classify(b"./disk"), Some(Name::DiskDir));
        assert_eq!(
            classify(b"/disk/disk.img"),
            Some(Name::File("disk.img".into()))
        );
        assert_eq!(
            classify(b"./disk/disk.qcow2"),
            Some(Name::File("disk.qcow2".into()))
        );
        assert_eq!(
            classify(b"disk/.wh.disk.img"),
            Some(Name::Whiteout("disk.img".into()))
        );
        assert_eq!(classify(b"disk/.wh..wh..opq"), Some(Name::Opaque));
        assert_eq!(classify(b".wh.disk"), Some(Name::DiskWhiteout));
        assert_eq!(classify(b"disk/sub/file"), None);
        assert_eq!(classify(b"etc/passwd"), None);
        assert_eq!(classify(b"diskette/x"), None);
    }
}
