//! The S3-compatible object storage backend: the registry's state in a bucket, shared by any
//! number of `dvcr serve` replicas.
//!
//! [`super::storage::Storage`] hands every operation here when the registry was started with
//! `--s3-bucket`; the HTTP layer cannot tell the two backends apart. We drive the bucket
//! through the `object_store` crate (SigV4, retries, multipart and conditional requests).
//!
//! # Layout (keys under `--s3-prefix`)
//! ```text
//! b/<alg>/<hex>                         {"size", "object"}: the blob exists; its bytes are in `object`
//! d/<uuid>                              blob bytes, written once by one upload, never moved
//! r/<name>/_l/<alg>/<hex>               empty: the repository may serve the blob (a layer link)
//! r/<name>/_m/<alg>/<hex>               {"mediaType", "subject"?}: a manifest revision
//! r/<name>/_t/<tag>                     "<alg>:<hex>": what the tag points at
//! r/<name>/_r/<alg>/<subject hex>/<alg>-<hex>   a referrer's descriptor
//! u/<uuid>/state                        an upload session (JSON, below)
//! u/<uuid>/tail-<offset>                received bytes not yet in a multipart part
//! gc/lock, gc/pins/<uuid>               garbage collection coordination (below)
//! ```
//! The same shape as the filesystem layout, with short names: servers that keep keys as file
//! names (s3s-fs, gateways) limit a name to 255 bytes, and a key holds a repository name, a
//! 128-character SHA-512 digest or tag, and for referrers two digests. Repository name
//! components start with `[a-z0-9]`, so the `_`-prefixed parts never collide with them.
//!
//! # No copy on commit
//! S3 cannot rename, and a server-side copy is limited to 5 GB per request. So a blob's bytes
//! are written once, by a multipart upload into `d/<upload uuid>`, and the blob becomes
//! visible by creating the small pointer `b/<alg>/<hex>` with `If-None-Match: *` after
//! its digest was verified. Two uploads of one blob race on that create: one wins, the other
//! deletes its own bytes.
//!
//! # Upload sessions across replicas
//! Everything about a session lives in `u/<uuid>/state`: the repository, the offset, the
//! multipart upload id and the ETags of its parts, the key of the tail object, and the running
//! SHA-256 *state* (the serialized hasher), so the replica that receives the next chunk goes on
//! hashing where the previous one stopped, and the digest is known at commit without reading
//! the blob back. Every change replaces the state with `If-Match: <ETag>` of the version it
//! read. A request that appends first *claims* the session: it saves a lease (its id and an
//! expiry, [`LEASE`]) that way, renews it before every part it sends, and releases it with
//! the final save. Another request finding a live lease is refused (409) before it writes
//! anything, so two requests never write parts of one multipart upload; a request that
//! lost its lease (stalled past it while another took over) fails at its next renewal. A
//! ranged chunk that arrives short or long is not saved; a failed request puts the state
//! back as it found it, keeping a multipart upload it started (the next chunk overwrites
//! its parts). Once the bytes are assembled into their object the state says so, and a
//! retried `PUT` does not assemble again. Leases compare the replicas' clocks: keep them
//! within a minute of each other (NTP).
//!
//! Parts: 8 MiB for the first 1000 parts, 128 MiB after (S3 allows 10 000 parts of at least
//! 5 MiB but the last): blobs up to 1.13 TiB. An upload holds the part it fills and at most
//! two small parts or one large part on the wire (24 MiB, or 256 MiB past 7.8 GiB), and all
//! uploads of a replica together hold at most [`PART_MEMORY`] on the wire. Bytes of a chunk
//! that do not fill a part are kept in a tail object and prepended to the next chunk, so
//! clients may send chunks of any size.
//!
//! # Garbage collection with several replicas
//! A write that is about to rely on an existing blob or manifest (a manifest push, a mount, a
//! commit of a blob that already exists) first writes a *pin* `gc/pins/<uuid>` and then
//! checks that no live `gc/lock` exists (while one does, it polls the lock, writing no pins,
//! and waits for the collection to end). A collection first creates `gc/lock` (create-only),
//! then waits until no live pin exists, and only then marks and sweeps. S3 is strongly
//! consistent, so one of the two sides always sees the other's object: a write never
//! interleaves with a sweep. Pins older than [`PIN_TTL`] belong to crashed writers and are
//! removed. The collector refreshes its lock every 20 s with a compare-and-swap, and
//! releases it when it ends, is interrupted, or its replica shuts down; a lock not refreshed
//! for [`LOCK_TTL`] (a killed collector) is stale, and the next collector takes it over with
//! a compare-and-swap (one of two wins). The sweep also keeps what the grace period covers:
//! blobs whose pointer or any repository link is younger than it (uploads not yet
//! referenced).
//!
//! Multipart uploads are aborted when their session is cancelled, fails a digest or expires;
//! one left by a replica killed between creating it and saving its id is not listed by
//! anyone, so give the bucket an `AbortIncompleteMultipartUpload` lifecycle rule (7 days).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    GetOptions, GetRange, ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256, Sha512};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::gc::GcReport;
use super::names::{Algorithm, Digest, Reference};
use super::storage::{Commit, Manifest, Result, StorageError};

/// Parts of the first [`SMALL_PARTS`] get this size.
const SMALL_PART: usize = 8 << 20;
/// How many parts are [`SMALL_PART`]s.
const SMALL_PARTS: usize = 1000;
/// The size of every later part.
const LARGE_PART: usize = 128 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: usize = 10_000;
/// Small parts sent at once by one upload (large ones go one at a time).
const PARTS_IN_FLIGHT: usize = 2;
/// Largest manifest or small JSON object read whole.
const MAX_SMALL_OBJECT: u64 = 16 << 20;
/// A pin older than this belongs to a crashed writer.
pub const PIN_TTL: Duration = Duration::from_secs(600);
/// A collection lock not refreshed for this long belongs to a stopped collector (the
/// collector refreshes it every [`LOCK_REFRESH`]).
pub const LOCK_TTL: Duration = Duration::from_secs(90);
/// How often a running collection refreshes its lock.
const LOCK_REFRESH: Duration = Duration::from_secs(20);
/// How long a write waits for a running collection before it answers an error.
const PIN_WAIT: Duration = Duration::from_secs(120);
/// How long a request's claim on an upload session lasts; renewed while it writes parts.
/// (Replicas' clocks must agree to well within this.)
const LEASE: Duration = Duration::from_secs(300);
/// Bytes of multipart parts on the wire at once, all uploads of this replica together.
const PART_MEMORY: usize = 512 << 20;

/// Where the registry's bucket is.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// Keep the registry in this S3 bucket instead of under --root (which then holds only
    /// local scratch). Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    /// (and AWS_SESSION_TOKEN).
    #[arg(long, env = "DVCR_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// The S3 endpoint for S3-compatible servers (MinIO, Ceph RGW, ...), e.g.
    /// http://minio:9000; default: AWS for the region.
    #[arg(long, env = "DVCR_S3_ENDPOINT", requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region.
    #[arg(long, env = "DVCR_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// A key prefix inside the bucket (several registries may share one bucket).
    #[arg(long, env = "DVCR_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// Answer blob GETs with a redirect (307) to a presigned URL of the bucket, so the bytes
    /// do not pass through the registry (clients must reach the S3 endpoint).
    #[arg(long, env = "DVCR_S3_REDIRECT", requires = "s3_bucket")]
    pub s3_redirect: bool,
}

/// The bucket and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL, if not AWS.
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Key prefix (empty, or ending without a slash; one is added).
    pub prefix: String,
    /// Serve blob GETs by presigned redirect.
    pub redirect: bool,
}

impl S3Args {
    /// The configuration, when a bucket was given.
    pub fn config(&self) -> Option<S3Config> {
        self.s3_bucket.as_ref().map(|bucket| S3Config {
            bucket: bucket.clone(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            prefix: self.s3_prefix.trim_matches('/').to_owned(),
            redirect: self.s3_redirect,
        })
    }
}

fn io(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::Io(std::io::Error::other(e))
}

fn already_running() -> StorageError {
    StorageError::Busy("a garbage collection is already running on the bucket".into())
}

fn s3_error(what: &str, e: object_store::Error) -> StorageError {
    io(format!("object storage: {what}: {e}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn age(meta: &ObjectMeta) -> Duration {
    let modified = meta.last_modified.timestamp().max(0) as u64;
    Duration::from_secs(now_secs().saturating_sub(modified))
}

fn part_size(index: usize) -> usize {
    if index < SMALL_PARTS {
        SMALL_PART
    } else {
        LARGE_PART
    }
}

/// `b/<alg>/<hex>`: where a blob's bytes are.
#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    size: u64,
    object: String,
}

/// What a blob's pointer says about it.
#[derive(Debug)]
enum Existing {
    /// No pointer.
    None,
    /// A pointer whose object exists.
    Intact,
    /// A pointer whose object is gone (a crash, a lost race); its version.
    Broken(UpdateVersion),
}

/// `r/<name>/_m/...`.
#[derive(Debug, Serialize, Deserialize)]
struct Revision {
    #[serde(rename = "mediaType")]
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
}

/// `u/<uuid>/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadState {
    repository: String,
    started: u64,
    offset: u64,
    /// The multipart upload into `d/<uuid>`, once the first part was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multipart: Option<String>,
    /// ETags of the parts, in order.
    #[serde(default)]
    parts: Vec<String>,
    /// The tail object and its length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail: Option<String>,
    #[serde(default)]
    tail_len: u64,
    /// Hex of the serialized SHA-256 state after `offset` bytes.
    sha256: String,
    /// The request appending to the session, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<Lease>,
    /// The bytes were written as `d/<uuid>` (the multipart upload is complete).
    #[serde(default)]
    assembled: bool,
}

/// A request's claim on a session: no other request appends until `until` (unix seconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    request: String,
    until: u64,
}

/// An upload session as loaded from the bucket (and the version it was loaded at).
#[derive(Debug, Clone)]
pub struct S3Session {
    state: UploadState,
    version: UpdateVersion,
}

impl S3Session {
    /// Bytes received so far.
    pub fn offset(&self) -> u64 {
        self.state.offset
    }

    /// The repository the session uploads into.
    pub fn repository(&self) -> &str {
        &self.state.repository
    }

    /// Whether the bytes were already assembled into their object.
    pub fn assembled(&self) -> bool {
        self.state.assembled
    }

    /// SHA-256 of the bytes received so far (`None` when the saved state is damaged).
    pub fn received_sha256(&self) -> Option<[u8; 32]> {
        load_hasher(&self.state.sha256)
            .ok()
            .map(|h| h.finalize().into())
    }

    /// When the session started.
    pub fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.state.started)
    }
}

fn save_hasher(h: &Sha256) -> String {
    hex::encode(h.serialize())
}

fn load_hasher(text: &str) -> Result<Sha256> {
    let bytes = hex::decode(text).map_err(|_| io("the upload's hash state is damaged"))?;
    let state = SerializedState::<Sha256>::try_from(bytes.as_slice())
        .map_err(|_| io("the upload's hash state has the wrong size"))?;
    Sha256::deserialize(&state).map_err(|_| io("the upload's hash state is damaged"))
}

/// What the S3 writer task ends with.
#[derive(Debug)]
pub struct WriteOutcome {
    /// The session as it now stands in the bucket.
    pub session: S3Session,
    /// Whether this request's bytes were added to it.
    pub advanced: bool,
    /// The first failure.
    pub error: Option<StorageError>,
}

/// A write in flight that relies on existing objects; removes its pin when dropped.
#[derive(Debug)]
pub struct Pin {
    store: Option<S3Store>,
    key: Path,
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            let key = self.key.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = store.store.delete(&key).await;
                });
            }
        }
    }
}

/// A blob's bytes in the bucket.
#[derive(Debug)]
pub struct S3Blob {
    store: S3Store,
    key: Path,
}

impl S3Blob {
    /// The bytes `start..start+len` as a stream.
    pub async fn stream(
        self,
        start: u64,
        len: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>> {
        if len == 0 {
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..start + len)),
            ..Default::default()
        };
        let got = self
            .store
            .store
            .get_opts(&self.key, options)
            .await
            .map_err(|e| s3_error("reading a blob", e))?;
        Ok(got
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed())
    }

    /// A presigned URL of the bytes, valid for an hour, when redirects are enabled.
    pub async fn redirect(&self) -> Result<Option<String>> {
        if !self.store.redirect {
            return Ok(None);
        }
        let url = self
            .store
            .store
            .signed_url(reqwest::Method::GET, &self.key, Duration::from_secs(3600))
            .await
            .map_err(|e| s3_error("presigning a blob URL", e))?;
        Ok(Some(url.to_string()))
    }
}

/// The bucket: cheap to clone.
#[derive(Debug, Clone)]
pub struct S3Store {
    store: Arc<AmazonS3>,
    prefix: String,
    redirect: bool,
    /// Permits of one MiB each for parts in flight ([`PART_MEMORY`]).
    part_budget: Arc<tokio::sync::Semaphore>,
    /// The collection lock, while this process holds it.
    gc_lock: Arc<std::sync::Mutex<HeldLock>>,
}

impl S3Store {
    /// Connects (lazily: the first request proves the settings) to the bucket.
    pub fn connect(config: &S3Config) -> Result<Self> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .map_err(|e| s3_error("configuring the bucket", e))?;
        let prefix = if config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", config.prefix)
        };
        Ok(S3Store {
            store: Arc::new(store),
            prefix,
            redirect: config.redirect,
            part_budget: Arc::new(tokio::sync::Semaphore::new(PART_MEMORY >> 20)),
            gc_lock: Arc::default(),
        })
    }

    fn path(&self, rel: &str) -> Path {
        Path::from(format!("{}{rel}", self.prefix))
    }

    /// The key relative to the prefix (for listings).
    fn relative<'a>(&self, path: &'a Path) -> &'a str {
        let s = path.as_ref();
        s.strip_prefix(self.prefix.as_str()).unwrap_or(s)
    }

    /// Checks that the bucket can be listed, written and deleted from (at startup, so a
    /// wrong setting or read-only credentials fail early rather than at the first push).
    pub async fn check(&self) -> Result<()> {
        let hint = "check --s3-bucket, --s3-endpoint, --s3-region and the credentials";
        self.store
            .list_with_delimiter(Some(&self.path("r")))
            .await
            .map_err(|e| s3_error(&format!("listing the bucket ({hint})"), e))?;
        let probe = self.path(&format!("gc/probe-{}", Uuid::new_v4()));
        self.store
            .put(&probe, Bytes::from_static(b"dvcr").into())
            .await
            .map_err(|e| s3_error(&format!("writing to the bucket ({hint})"), e))?;
        self.store
            .delete(&probe)
            .await
            .map_err(|e| s3_error(&format!("deleting from the bucket ({hint})"), e))
    }

    // ---- small objects ----

    async fn get_small(&self, key: &Path) -> Result<Option<(Bytes, ObjectMeta)>> {
        match self.store.get(key).await {
            Ok(got) => {
                let meta = got.meta.clone();
                if meta.size > MAX_SMALL_OBJECT {
                    return Err(io(format!(
                        "object {key} is {} bytes, too large",
                        meta.size
                    )));
                }
                let bytes = got.bytes().await.map_err(|e| s3_error("reading", e))?;
                Ok(Some((bytes, meta)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("reading", e)),
        }
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &Path,
    ) -> Result<Option<(T, ObjectMeta)>> {
        match self.get_small(key).await? {
            None => Ok(None),
            Some((bytes, meta)) => {
                let v = serde_json::from_slice(&bytes)
                    .map_err(|e| io(format!("object {key} is damaged: {e}")))?;
                Ok(Some((v, meta)))
            }
        }
    }

    async fn put(&self, key: &Path, bytes: impl Into<PutPayload>) -> Result<()> {
        self.store
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| s3_error("writing", e))
    }

    /// Create-only put: false when the object already exists.
    async fn create(&self, key: &Path, bytes: impl Into<PutPayload>) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(key, bytes.into(), options).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(s3_error("creating", e)),
        }
    }

    async fn exists(&self, key: &Path) -> Result<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("checking", e)),
        }
    }

    async fn delete_quiet(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("deleting", e)),
        }
    }

    /// Every object under a prefix (a directory-like key without the trailing slash).
    async fn list_all(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let prefix = self.path(rel);
        let mut stream = self.store.list(Some(&prefix));
        while let Some(item) = stream.next().await {
            out.push(item.map_err(|e| s3_error("listing", e))?);
        }
        Ok(out)
    }

    // ---- keys ----

    fn blob_key(&self, d: &Digest) -> Path {
        self.path(&format!("b/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    fn repo(repository: &str) -> String {
        format!("r/{repository}")
    }

    /// `r/<name>/<part>/<alg>/<hex>`: a per-repository record of a digest.
    fn repo_digest_key(&self, repository: &str, part: &str, d: &Digest) -> Path {
        self.path(&format!(
            "{}/{part}/{}/{}",
            Self::repo(repository),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    fn link_key(&self, repository: &str, d: &Digest) -> Path {
        self.repo_digest_key(repository, "_l", d)
    }

    fn revision_key(&self, repository: &str, d: &Digest) -> Path {
        self.repo_digest_key(repository, "_m", d)
    }

    fn tags_rel(repository: &str) -> String {
        format!("{}/_t", Self::repo(repository))
    }

    fn referrers_rel(repository: &str, subject: &Digest) -> String {
        format!(
            "{}/_r/{}/{}",
            Self::repo(repository),
            subject.algorithm().as_str(),
            subject.hex()
        )
    }

    fn state_key(&self, id: Uuid) -> Path {
        self.path(&format!("u/{id}/state"))
    }

    fn data_key(&self, id: Uuid) -> Path {
        self.path(&format!("d/{id}"))
    }

    // ---- GC pins ----

    /// Pins the objects a write is about to rely on (see the module doc); waits while a
    /// collection runs.
    pub async fn pin(&self) -> Result<Pin> {
        let deadline = tokio::time::Instant::now() + PIN_WAIT;
        loop {
            // While a collection runs, only its lock is polled: pins written and removed in
            // a loop would keep the collection from ever seeing none.
            if self.gc_running().await? {
                if tokio::time::Instant::now() > deadline {
                    return Err(StorageError::Busy(
                        "a garbage collection is running on the bucket; retry in a minute".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let key = self.path(&format!("gc/pins/{}", Uuid::new_v4()));
            self.put(&key, Bytes::new()).await?;
            let pin = Pin {
                store: Some(self.clone()),
                key,
            };
            if !self.gc_running().await? {
                return Ok(pin);
            }
        }
    }

    /// Whether a live collection lock exists.
    async fn gc_running(&self) -> Result<bool> {
        Ok(self
            .exists(&self.path("gc/lock"))
            .await?
            .is_some_and(|lock| age(&lock) < LOCK_TTL))
    }

    // ---- blobs ----

    /// The pointer of a blob; its `object` must be a data key (`d/<uuid>`), whatever the
    /// bucket holds.
    async fn pointer(&self, d: &Digest) -> Result<Option<(Pointer, ObjectMeta)>> {
        let found: Option<(Pointer, ObjectMeta)> = self.get_json(&self.blob_key(d)).await?;
        if let Some((p, _)) = &found
            && !valid_data_key(&p.object)
        {
            return Err(io(format!(
                "the pointer of blob {d} names {:?}, not a data object: the bucket was \
                 changed by something else than dvcr",
                p.object
            )));
        }
        Ok(found)
    }

    /// The size of a blob the repository may serve.
    pub async fn blob_size(&self, repository: &str, d: &Digest) -> Result<u64> {
        let unknown = || StorageError::BlobUnknown(d.to_string());
        if self.exists(&self.link_key(repository, d)).await?.is_none() {
            return Err(unknown());
        }
        match self.pointer(d).await? {
            Some((p, _)) => Ok(p.size),
            None => Err(unknown()),
        }
    }

    /// Opens a blob the repository may serve.
    pub async fn open_blob(&self, repository: &str, d: &Digest) -> Result<(S3Blob, u64)> {
        let unknown = || StorageError::BlobUnknown(d.to_string());
        if self.exists(&self.link_key(repository, d)).await?.is_none() {
            return Err(unknown());
        }
        let (p, _) = self.pointer(d).await?.ok_or_else(unknown)?;
        Ok((
            S3Blob {
                store: self.clone(),
                key: self.path(&p.object),
            },
            p.size,
        ))
    }

    /// Unlinks a blob from a repository.
    pub async fn delete_blob(&self, repository: &str, d: &Digest) -> Result<()> {
        let key = self.link_key(repository, d);
        if self.exists(&key).await?.is_none() {
            return Err(StorageError::BlobUnknown(d.to_string()));
        }
        self.delete_quiet(&key).await
    }

    /// Links a blob `from` may serve into `to`.
    pub async fn mount_blob(&self, from: &str, to: &str, d: &Digest) -> Result<bool> {
        let _pin = self.pin().await?;
        match self.blob_size(from, d).await {
            Ok(_) => {
                self.put(&self.link_key(to, d), Bytes::new()).await?;
                Ok(true)
            }
            Err(StorageError::BlobUnknown(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---- uploads ----

    /// A new session.
    pub async fn start_upload(&self, repository: &str) -> Result<(Uuid, S3Session)> {
        let id = Uuid::new_v4();
        let state = UploadState {
            repository: repository.to_owned(),
            started: now_secs(),
            offset: 0,
            multipart: None,
            parts: Vec::new(),
            tail: None,
            tail_len: 0,
            sha256: save_hasher(&Sha256::new()),
            lease: None,
            assembled: false,
        };
        let json = serde_json::to_vec(&state).map_err(io)?;
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = self
            .store
            .put_opts(&self.state_key(id), json.into(), options)
            .await
            .map_err(|e| s3_error("creating an upload session", e))?;
        Ok((
            id,
            S3Session {
                state,
                version: UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                },
            },
        ))
    }

    /// Loads a session; None when it does not exist (any more).
    pub async fn load_session(&self, id: Uuid) -> Result<Option<S3Session>> {
        Ok(self
            .get_json::<UploadState>(&self.state_key(id))
            .await?
            .map(|(state, meta)| S3Session {
                state,
                version: UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                },
            }))
    }

    /// Replaces the session state if nobody else did since `session` was loaded.
    async fn save_session(&self, id: Uuid, session: &mut S3Session) -> Result<()> {
        let json = serde_json::to_vec(&session.state).map_err(io)?;
        let options = PutOptions {
            mode: PutMode::Update(session.version.clone()),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.state_key(id), json.into(), options)
            .await
        {
            Ok(put) => {
                session.version = UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                };
                Ok(())
            }
            Err(object_store::Error::Precondition { .. }) => Err(StorageError::UploadBusy(
                format!("upload {id} was changed by another request at the same time"),
            )),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::UploadUnknown(format!(
                "{id} (finished or cancelled meanwhile)"
            ))),
            Err(e) => Err(s3_error("saving an upload session", e)),
        }
    }

    /// Starts the task that appends a request's bytes to the session; with `limit` (a
    /// ranged chunk) the bytes count only if exactly that many arrive.
    pub fn writer(
        &self,
        id: Uuid,
        session: S3Session,
        limit: Option<u64>,
    ) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<WriteOutcome>) {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let store = self.clone();
        let handle = tokio::spawn(async move {
            let mut working = session.clone();
            match store.append(id, &mut working, rx, limit).await {
                Ok(advanced) => WriteOutcome {
                    session: working,
                    advanced,
                    error: None,
                },
                Err(e) => WriteOutcome {
                    // `append` left the session as it started (or as another request made
                    // it): the version is the one to go on from.
                    session: working,
                    advanced: false,
                    error: Some(e),
                },
            }
        });
        (tx, handle)
    }

    /// Appends one request's bytes. The request first claims the session with a lease (a
    /// compare-and-swap on the state), renews it while it writes parts, and never writes a
    /// part without a live lease: two requests of one session on two replicas cannot both
    /// write parts. Returns whether the session advanced.
    async fn append(
        &self,
        id: Uuid,
        session: &mut S3Session,
        rx: mpsc::Receiver<Bytes>,
        limit: Option<u64>,
    ) -> Result<bool> {
        if let Some(lease) = &session.state.lease
            && lease.until > now_secs()
        {
            return Err(StorageError::UploadBusy(format!(
                "another request is appending to upload {id}; retry when it is done (GET the \
                 upload for its offset)"
            )));
        }
        let request = Uuid::new_v4().to_string();
        session.state.lease = Some(Lease {
            request: request.clone(),
            until: now_secs() + LEASE.as_secs(),
        });
        self.save_session(id, session).await?;
        let start = session.state.clone();
        let outcome = self.append_leased(id, session, rx, limit).await;
        match outcome {
            Ok(true) => Ok(true),
            Ok(false) | Err(_) => {
                // Back to where the request started, keeping a multipart upload it created
                // (its parts are overwritten by the next chunk), and the lease released. If
                // another request took the session over meanwhile, leave it to that one.
                let mut back = start;
                back.multipart = session.state.multipart.clone();
                back.lease = None;
                let saved = session.state.lease.as_ref().map(|l| l.request.as_str())
                    == Some(request.as_str());
                if saved {
                    session.state = back;
                    let _ = self.save_session(id, session).await;
                }
                outcome.map(|_| false)
            }
        }
    }

    async fn renew_lease(&self, id: Uuid, session: &mut S3Session) -> Result<()> {
        let until = session.state.lease.as_ref().map_or(0, |l| l.until);
        if until.saturating_sub(now_secs()) < LEASE.as_secs() * 2 / 3 {
            if let Some(lease) = session.state.lease.as_mut() {
                lease.until = now_secs() + LEASE.as_secs();
            }
            self.save_session(id, session).await?;
        }
        Ok(())
    }

    async fn append_leased(
        &self,
        id: Uuid,
        session: &mut S3Session,
        mut rx: mpsc::Receiver<Bytes>,
        limit: Option<u64>,
    ) -> Result<bool> {
        let old_tail = session.state.tail.clone();
        let mut hasher = Some(load_hasher(&session.state.sha256)?);
        // Each part is filled in a buffer of exactly its size (no growth, no shared
        // over-allocation), so an upload holds what the module doc says.
        let mut buf = BytesMut::with_capacity(part_size(session.state.parts.len()));
        if let Some(tail) = &old_tail {
            let bytes = self.read_tail(id, tail, session.state.tail_len).await?;
            buf.extend_from_slice(&bytes);
        }
        // Bytes at the front of `buf` that the hasher already saw (the old tail).
        let mut hashed = buf.len();
        let mut received: u64 = 0;
        let data_key = self.data_key(id);
        let mut unsaved_multipart = false;
        let mut in_flight: std::collections::VecDeque<
            tokio::task::JoinHandle<object_store::Result<PartId>>,
        > = std::collections::VecDeque::new();
        let mut parts = session.state.parts.clone();

        let result: Result<bool> = async {
            while let Some(chunk) = rx.recv().await {
                received += chunk.len() as u64;
                let mut rest: &[u8] = &chunk;
                while !rest.is_empty() {
                    let index = parts.len() + in_flight.len();
                    let size = part_size(index);
                    let take = size.saturating_sub(buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if buf.len() < size {
                        continue;
                    }
                    // The last part number stays free for the tail at commit.
                    if index + 1 >= MAX_PARTS {
                        return Err(StorageError::TooLarge(
                            "the blob is larger than an S3 multipart upload holds (10 000 \
                             parts, about 1.13 TiB)"
                                .into(),
                        ));
                    }
                    let next = BytesMut::with_capacity(part_size(index + 1));
                    let part = std::mem::replace(&mut buf, next).freeze();
                    let fresh = part.slice(hashed.min(part.len())..);
                    hashed = hashed.saturating_sub(part.len());
                    hasher = Some(hash_on_thread(hasher.take(), fresh).await?);
                    let mp = match &session.state.multipart {
                        Some(mp) => mp.clone(),
                        None => {
                            let mp = self
                                .store
                                .create_multipart(&data_key)
                                .await
                                .map_err(|e| s3_error("starting a multipart upload", e))?;
                            unsaved_multipart = true;
                            session.state.multipart = Some(mp.clone());
                            // Recorded at once, so that a cancel or an expiry can abort it
                            // even if this replica dies mid-request.
                            self.save_session(id, session).await?;
                            unsaved_multipart = false;
                            mp
                        }
                    };
                    let limit = if size > SMALL_PART {
                        1
                    } else {
                        PARTS_IN_FLIGHT
                    };
                    while in_flight.len() >= limit {
                        parts.push(join_part(in_flight.pop_front()).await?);
                    }
                    // Never a part without a live lease (see `append`).
                    self.renew_lease(id, session).await?;
                    let permit = self.part_memory(size).await?;
                    let (store, key) = (Arc::clone(&self.store), data_key.clone());
                    in_flight.push_back(tokio::spawn(async move {
                        let put = store.put_part(&key, &mp, index, part.into()).await;
                        drop(permit);
                        put
                    }));
                }
            }
            while let Some(handle) = in_flight.pop_front() {
                parts.push(join_part(Some(handle)).await?);
            }
            if limit.is_some_and(|l| received != l) {
                // A ranged chunk that is short or long counts for nothing.
                return Ok(false);
            }
            let rest = buf.split().freeze();
            let fresh = rest.slice(hashed.min(rest.len())..);
            hasher = Some(hash_on_thread(hasher.take(), fresh).await?);
            let offset = session.state.offset + received;
            session.state.tail = None;
            session.state.tail_len = rest.len() as u64;
            if !rest.is_empty() {
                let tail = format!("u/{id}/tail-{offset}");
                self.put(&self.path(&tail), rest).await?;
                session.state.tail = Some(tail);
            }
            session.state.parts = parts.clone();
            session.state.offset = offset;
            if let Some(h) = &hasher {
                session.state.sha256 = save_hasher(h);
            }
            session.state.lease = None;
            self.save_session(id, session).await?;
            Ok(true)
        }
        .await;
        match result {
            Ok(true) => {
                // Keep the tail the request started from (a failed ranged chunk rolls back to
                // it) and the new one; older ones are no longer reachable.
                let keep = [old_tail.as_deref(), session.state.tail.as_deref()];
                self.remove_tails(id, &keep).await;
                Ok(true)
            }
            other => {
                for handle in in_flight {
                    handle.abort();
                }
                // A multipart upload that made it into the saved state stays for the next
                // request (or the expiry); one that did not is aborted now.
                if unsaved_multipart && let Some(mp) = session.state.multipart.take() {
                    let _ = self.store.abort_multipart(&data_key, &mp).await;
                }
                other
            }
        }
    }

    /// Waits until `size` more bytes of parts may be held in memory (all uploads together).
    async fn part_memory(&self, size: usize) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let mib = u32::try_from(size >> 20).unwrap_or(u32::MAX).max(1);
        Arc::clone(&self.part_budget)
            .acquire_many_owned(mib)
            .await
            .map_err(io)
    }

    /// Reads a tail object, checking that it is one of this session's and has its length.
    async fn read_tail(&self, id: Uuid, key: &str, len: u64) -> Result<Bytes> {
        let valid = key
            .strip_prefix(&format!("u/{id}/tail-"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
        if !valid || len >= LARGE_PART as u64 {
            return Err(io(format!(
                "upload {id} is damaged (tail {key:?} of {len} bytes); start the upload again"
            )));
        }
        let got = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| s3_error("reading the upload's tail", e))?;
        if got.meta.size != len {
            return Err(io(format!(
                "upload {id} is damaged (its tail has {} bytes, not {len}); start the upload \
                 again",
                got.meta.size
            )));
        }
        got.bytes()
            .await
            .map_err(|e| s3_error("reading the upload's tail", e))
    }

    /// Deletes the session's tail objects but those in `keep`.
    async fn remove_tails(&self, id: Uuid, keep: &[Option<&str>]) {
        let Ok(objects) = self.list_all(&format!("u/{id}")).await else {
            return;
        };
        for meta in objects {
            let rel = self.relative(&meta.location);
            if rel.contains("/tail-") && !keep.contains(&Some(rel)) {
                let _ = self.delete_quiet(&meta.location).await;
            }
        }
    }

    /// Goes back to `checkpoint` after a chunk this request added (`current`, saved by it)
    /// turned out invalid; the checkpoint's tail object is still there, and parts written
    /// since are overwritten by the next chunk. If another request changed the session
    /// since, nothing is touched.
    pub async fn rollback(
        &self,
        id: Uuid,
        current: &S3Session,
        checkpoint: S3Session,
    ) -> Result<S3Session> {
        let mut restored = checkpoint;
        restored.version = current.version.clone();
        restored.state.multipart = current.state.multipart.clone();
        restored.state.lease = None;
        match self.save_session(id, &mut restored).await {
            Ok(()) => Ok(restored),
            Err(StorageError::UploadBusy(_)) => Ok(current.clone()),
            Err(e) => Err(e),
        }
    }

    /// Whether a blob exists with its bytes.
    async fn intact_pointer(&self, d: &Digest) -> Result<Existing> {
        Ok(match self.pointer(d).await? {
            None => Existing::None,
            Some((p, meta)) => {
                if self.exists(&self.path(&p.object)).await?.is_some() {
                    Existing::Intact
                } else {
                    Existing::Broken(UpdateVersion {
                        e_tag: meta.e_tag,
                        version: meta.version,
                    })
                }
            }
        })
    }

    /// Makes `object` (already written, verified) the bytes of blob `d`: creates its pointer,
    /// or replaces a broken one with a compare-and-swap. When another writer's pointer won,
    /// `object` is deleted; a create whose automatic retry found our own pointer keeps it.
    async fn publish_pointer(
        &self,
        d: &Digest,
        existing: Existing,
        object: &str,
        size: u64,
    ) -> Result<()> {
        let pointer = Pointer {
            size,
            object: object.to_owned(),
        };
        let json = serde_json::to_vec(&pointer).map_err(io)?;
        let key = self.blob_key(d);
        let published = match existing {
            Existing::Broken(version) => {
                let options = PutOptions {
                    mode: PutMode::Update(version),
                    ..Default::default()
                };
                self.store
                    .put_opts(&key, json.into(), options)
                    .await
                    .is_ok()
            }
            Existing::None | Existing::Intact => self.create(&key, json).await?,
        };
        if !published {
            let winner = self.pointer(d).await?.map(|(p, _)| p.object);
            if winner.as_deref() != Some(object) {
                let _ = self.delete_quiet(&self.path(object)).await;
            }
        }
        Ok(())
    }

    /// Verifies and publishes the blob; the session is removed unless a step failed that a
    /// retry of the `PUT` can redo.
    pub async fn commit(&self, id: Uuid, session: &mut S3Session, d: &Digest) -> Result<Commit> {
        if let Some(lease) = &session.state.lease
            && lease.until > now_secs()
        {
            return Err(StorageError::UploadBusy(format!(
                "another request is appending to upload {id}; retry when it is done"
            )));
        }
        let data_key = self.data_key(id);
        // The digest, from the saved hash state (SHA-256) or by reading the bytes (SHA-512).
        let actual = match d.algorithm() {
            Algorithm::Sha256 => Digest::from_bytes(
                Algorithm::Sha256,
                &load_hasher(&session.state.sha256)?.finalize(),
            ),
            Algorithm::Sha512 => {
                self.assemble(id, session).await?;
                self.hash_object_sha512(&data_key).await?
            }
        };
        if &actual != d {
            self.discard(id, &session.state).await;
            return Ok(Commit::Mismatch(actual));
        }
        let _pin = self.pin().await?;
        let size = session.state.offset;
        match self.intact_pointer(d).await? {
            Existing::Intact => {
                // Same digest, same bytes: keep the existing ones.
                self.discard(id, &session.state).await;
            }
            existing => {
                self.assemble(id, session).await?;
                self.publish_pointer(d, existing, &format!("d/{id}"), size)
                    .await?;
                self.remove_session_objects(id, &session.state).await;
            }
        }
        self.put(&self.link_key(&session.state.repository, d), Bytes::new())
            .await?;
        Ok(Commit::Done(size))
    }

    /// Writes the received bytes as `d/<id>` (completing the multipart upload) once; the
    /// session records it, so a retried `PUT` does not try again.
    async fn assemble(&self, id: Uuid, session: &mut S3Session) -> Result<()> {
        if session.state.assembled {
            return Ok(());
        }
        let state = &session.state;
        let data_key = self.data_key(id);
        let tail = match &state.tail {
            Some(t) => self.read_tail(id, t, state.tail_len).await?,
            None => Bytes::new(),
        };
        match &state.multipart {
            None => self.put(&data_key, tail).await?,
            Some(mp) => {
                let mut parts: Vec<PartId> = state
                    .parts
                    .iter()
                    .map(|e| PartId {
                        content_id: e.clone(),
                    })
                    .collect();
                if !tail.is_empty() {
                    let part = self
                        .store
                        .put_part(&data_key, mp, parts.len(), tail.into())
                        .await
                        .map_err(|e| s3_error("writing the last part", e))?;
                    parts.push(part);
                }
                self.store
                    .complete_multipart(&data_key, mp, parts)
                    .await
                    .map_err(|e| s3_error("completing a multipart upload", e))?;
            }
        }
        session.state.assembled = true;
        self.save_session(id, session).await
    }

    async fn hash_object_sha512(&self, key: &Path) -> Result<Digest> {
        let got = self
            .store
            .get(key)
            .await
            .map_err(|e| s3_error("reading an upload", e))?;
        let mut stream = got.into_stream();
        let mut hasher = Sha512::new();
        let mut pending = BytesMut::new();
        loop {
            let next = stream.next().await;
            let done = next.is_none();
            if let Some(chunk) = next {
                pending.extend_from_slice(&chunk.map_err(|e| s3_error("reading an upload", e))?);
            }
            if pending.len() >= SMALL_PART || (done && !pending.is_empty()) {
                let data = pending.split().freeze();
                hasher = tokio::task::spawn_blocking(move || {
                    hasher.update(&data);
                    hasher
                })
                .await
                .map_err(io)?;
            }
            if done {
                break;
            }
        }
        Ok(Digest::from_bytes(Algorithm::Sha512, &hasher.finalize()))
    }

    /// Drops everything an unfinished upload holds.
    async fn discard(&self, id: Uuid, state: &UploadState) {
        if let Some(mp) = &state.multipart {
            let _ = self.store.abort_multipart(&self.data_key(id), mp).await;
        }
        // A SHA-512 check may have assembled the bytes already.
        let _ = self.delete_quiet(&self.data_key(id)).await;
        self.remove_session_objects(id, state).await;
    }

    async fn remove_session_objects(&self, id: Uuid, state: &UploadState) {
        if let Some(tail) = &state.tail {
            let _ = self.delete_quiet(&self.path(tail)).await;
        }
        self.remove_tails(id, &[]).await;
        let _ = self.delete_quiet(&self.state_key(id)).await;
    }

    /// Cancels a session.
    pub async fn cancel(&self, id: Uuid, session: &S3Session) -> Result<()> {
        if let Some(mp) = &session.state.multipart {
            let _ = self.store.abort_multipart(&self.data_key(id), mp).await;
        }
        self.remove_session_objects(id, &session.state).await;
        Ok(())
    }

    /// Removes sessions whose state was not saved for `max_idle` (by any replica).
    pub async fn expire_uploads(&self, max_idle: Duration) -> usize {
        let Ok(objects) = self.list_all("u").await else {
            return 0;
        };
        let mut removed = 0;
        for meta in objects {
            let rel = self.relative(&meta.location).to_owned();
            let Some(id) = rel
                .strip_prefix("u/")
                .and_then(|r| r.strip_suffix("/state"))
                .and_then(|r| Uuid::parse_str(r).ok())
            else {
                // Tails are removed with their session; orphans age out with it too.
                if age(&meta) > max_idle * 2 && rel.contains("/tail-") {
                    let _ = self.delete_quiet(&meta.location).await;
                }
                continue;
            };
            if age(&meta) <= max_idle {
                continue;
            }
            if let Ok(Some(session)) = self.load_session(id).await {
                tracing::info!(upload = %id, repository = %session.state.repository, "upload session expired");
                if self.cancel(id, &session).await.is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    // ---- manifests ----

    /// Whether the repository has this manifest.
    pub async fn has_manifest(&self, repository: &str, d: &Digest) -> Result<bool> {
        Ok(self
            .exists(&self.revision_key(repository, d))
            .await?
            .is_some())
    }

    /// Stores a manifest and its tag and referrer records.
    pub async fn put_manifest(
        &self,
        repository: &str,
        m: &Manifest,
        tag: Option<&str>,
        subject: Option<(&Digest, serde_json::Value)>,
    ) -> Result<()> {
        let existing = self.intact_pointer(&m.digest).await?;
        if !matches!(existing, Existing::Intact) {
            let object = format!("d/{}", Uuid::new_v4());
            self.put(&self.path(&object), m.bytes.clone()).await?;
            self.publish_pointer(&m.digest, existing, &object, m.bytes.len() as u64)
                .await?;
        }
        self.put(&self.link_key(repository, &m.digest), Bytes::new())
            .await?;
        let revision = Revision {
            media_type: m.media_type.clone(),
            subject: subject.as_ref().map(|(d, _)| d.to_string()),
        };
        self.put(
            &self.revision_key(repository, &m.digest),
            serde_json::to_vec(&revision).map_err(io)?,
        )
        .await?;
        if let Some((subject, descriptor)) = subject {
            let name = format!("{}-{}", m.digest.algorithm().as_str(), m.digest.hex());
            let key = self.path(&format!(
                "{}/{name}",
                Self::referrers_rel(repository, subject)
            ));
            self.put(&key, serde_json::to_vec(&descriptor).map_err(io)?)
                .await?;
        }
        if let Some(tag) = tag {
            let key = self.path(&format!("{}/{tag}", Self::tags_rel(repository)));
            self.put(&key, m.digest.to_string()).await?;
        }
        Ok(())
    }

    async fn resolve_tag(&self, repository: &str, tag: &str) -> Result<Digest> {
        let unknown = || StorageError::ManifestUnknown(tag.to_owned());
        let key = self.path(&format!("{}/{tag}", Self::tags_rel(repository)));
        let (bytes, _) = self.get_small(&key).await?.ok_or_else(unknown)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| unknown())?;
        Digest::parse(text.trim()).map_err(|_| unknown())
    }

    async fn read_revision(&self, repository: &str, d: &Digest) -> Result<Revision> {
        self.get_json::<Revision>(&self.revision_key(repository, d))
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| StorageError::ManifestUnknown(d.to_string()))
    }

    /// A manifest by tag or digest.
    pub async fn get_manifest(&self, repository: &str, reference: &Reference) -> Result<Manifest> {
        let digest = match reference {
            Reference::Tag(t) => self.resolve_tag(repository, t).await?,
            Reference::Digest(d) => d.clone(),
        };
        let revision = self.read_revision(repository, &digest).await?;
        let unknown = || StorageError::ManifestUnknown(digest.to_string());
        let (pointer, _) = self.pointer(&digest).await?.ok_or_else(unknown)?;
        let (bytes, _) = self
            .get_small(&self.path(&pointer.object))
            .await?
            .ok_or_else(unknown)?;
        Ok(Manifest {
            digest,
            media_type: revision.media_type,
            bytes,
        })
    }

    /// Removes a tag.
    pub async fn delete_tag(&self, repository: &str, tag: &str) -> Result<()> {
        let key = self.path(&format!("{}/{tag}", Self::tags_rel(repository)));
        if self.exists(&key).await?.is_none() {
            return Err(StorageError::ManifestUnknown(tag.to_owned()));
        }
        self.delete_quiet(&key).await
    }

    /// Removes a manifest, its tags and its referrer record.
    pub async fn delete_manifest(&self, repository: &str, d: &Digest) -> Result<()> {
        let revision = self.read_revision(repository, d).await?;
        self.delete_quiet(&self.revision_key(repository, d)).await?;
        if let Some(subject) = revision
            .subject
            .as_deref()
            .and_then(|x| Digest::parse(x).ok())
        {
            let name = format!("{}-{}", d.algorithm().as_str(), d.hex());
            let key = self.path(&format!(
                "{}/{name}",
                Self::referrers_rel(repository, &subject)
            ));
            let _ = self.delete_quiet(&key).await;
        }
        let text = d.to_string();
        for meta in self.list_all(&Self::tags_rel(repository)).await? {
            if let Some((bytes, _)) = self.get_small(&meta.location).await?
                && std::str::from_utf8(&bytes).is_ok_and(|t| t.trim() == text)
            {
                let _ = self.delete_quiet(&meta.location).await;
            }
        }
        Ok(())
    }

    async fn repo_exists(&self, repository: &str) -> Result<bool> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.path(&Self::repo(repository))))
            .await
            .map_err(|e| s3_error("listing", e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .any(|p| matches!(p.filename(), Some("_m") | Some("_l"))))
    }

    /// The repository's tags, sorted.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>> {
        if !self.repo_exists(repository).await? {
            return Err(StorageError::NameUnknown(repository.to_owned()));
        }
        let mut tags: Vec<String> = self
            .list_all(&Self::tags_rel(repository))
            .await?
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// Every repository name, sorted.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.path("r"), String::new(), 0usize)];
        while let Some((prefix, name, depth)) = stack.pop() {
            if depth > 128 {
                continue;
            }
            let listing = self
                .store
                .list_with_delimiter(Some(&prefix))
                .await
                .map_err(|e| s3_error("listing", e))?;
            let mut is_repo = false;
            for child in &listing.common_prefixes {
                let Some(part) = child.filename() else {
                    continue;
                };
                if part == "_m" || part == "_l" {
                    is_repo = true;
                } else if !part.starts_with('_') {
                    let full = if name.is_empty() {
                        part.to_owned()
                    } else {
                        format!("{name}/{part}")
                    };
                    stack.push((child.clone(), full, depth + 1));
                }
            }
            if is_repo && !name.is_empty() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Referrer descriptors of `subject`.
    pub async fn referrers(
        &self,
        repository: &str,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for meta in self
            .list_all(&Self::referrers_rel(repository, subject))
            .await?
        {
            let Some(digest) = meta
                .location
                .filename()
                .and_then(|n| n.split_once('-'))
                .and_then(|(a, h)| Digest::parse(&format!("{a}:{h}")).ok())
            else {
                continue;
            };
            if !self.has_manifest(repository, &digest).await? {
                continue;
            }
            if let Some((bytes, _)) = self.get_small(&meta.location).await?
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        Ok(out)
    }
}

/// The collection lock this process holds: refreshed every [`LOCK_REFRESH`] by a task of its
/// own with a compare-and-swap, so a collector that stops (killed, or its replica shut
/// down) leaves a lock that goes stale in [`LOCK_TTL`], and a collector that stalled past
/// it learns that it lost the lock instead of clobbering a newer one.
#[derive(Debug, Default)]
pub struct HeldLock {
    refresher: Option<tokio::task::AbortHandle>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl S3Store {
    fn held_lock(&self) -> std::sync::MutexGuard<'_, HeldLock> {
        self.gc_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn take_gc_lock(&self) -> Result<()> {
        let key = self.path("gc/lock");
        let body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({ "started": now_secs() })).map_err(io)?,
        );
        let put = |mode: PutMode| {
            let (store, key, body) = (Arc::clone(&self.store), key.clone(), body.clone());
            async move {
                let options = PutOptions {
                    mode,
                    ..Default::default()
                };
                store.put_opts(&key, body.into(), options).await
            }
        };
        let taken = match put(PutMode::Create).await {
            Ok(r) => r,
            Err(object_store::Error::AlreadyExists { .. }) => {
                let meta = self.exists(&key).await?;
                match meta {
                    // Taken over with a compare-and-swap: of two collectors that both saw
                    // the stale lock, one wins.
                    Some(meta) if age(&meta) >= LOCK_TTL => {
                        tracing::warn!("taking over a stale garbage collection lock");
                        put(PutMode::Update(UpdateVersion {
                            e_tag: meta.e_tag,
                            version: meta.version,
                        }))
                        .await
                        .map_err(|_| already_running())?
                    }
                    _ => return Err(already_running()),
                }
            }
            Err(e) => return Err(s3_error("taking the garbage collection lock", e)),
        };
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (store, flag) = (self.clone(), Arc::clone(&lost));
        let mut version = UpdateVersion {
            e_tag: taken.e_tag,
            version: taken.version,
        };
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_REFRESH).await;
                let options = PutOptions {
                    mode: PutMode::Update(version.clone()),
                    ..Default::default()
                };
                match store
                    .store
                    .put_opts(&store.path("gc/lock"), body.clone().into(), options)
                    .await
                {
                    Ok(r) => {
                        version = UpdateVersion {
                            e_tag: r.e_tag,
                            version: r.version,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the garbage collection lock");
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        *self.held_lock() = HeldLock {
            refresher: Some(refresher.abort_handle()),
            lost,
        };
        Ok(())
    }

    fn lock_lost(&self) -> bool {
        self.held_lock()
            .lost
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Releases the collection lock if this process holds it (also at shutdown, when the
    /// collector was stopped mid-way).
    pub async fn release_gc_lock(&self) {
        let held = std::mem::take(&mut *self.held_lock());
        if let Some(refresher) = held.refresher {
            refresher.abort();
            if !held.lost.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = self.delete_quiet(&self.path("gc/lock")).await;
            }
        }
    }

    /// Waits until no live pin exists (stale ones are removed).
    async fn wait_for_pins(&self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut live = 0;
            for meta in self.list_all("gc/pins").await? {
                if age(&meta) >= PIN_TTL {
                    let _ = self.delete_quiet(&meta.location).await;
                } else {
                    live += 1;
                }
            }
            if live == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StorageError::Busy(format!(
                    "{live} writes in flight did not finish within {limit:?}; nothing was deleted"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The manifest JSON of a digest, through its pointer.
    async fn manifest_json(&self, d: &Digest) -> Result<Option<serde_json::Value>> {
        let Some((pointer, _)) = self.pointer(d).await? else {
            return Ok(None);
        };
        if pointer.size > MAX_SMALL_OBJECT {
            return Ok(None);
        }
        Ok(self
            .get_small(&self.path(&pointer.object))
            .await?
            .and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok()))
    }

    /// One mark-and-sweep over the bucket, safe with live replicas (module doc).
    pub async fn collect(
        &self,
        grace: Duration,
        dry_run: bool,
        upload_expiry: Duration,
        writer_wait: Duration,
    ) -> Result<GcReport> {
        self.take_gc_lock().await?;
        let result = self
            .collect_locked(grace, dry_run, upload_expiry, writer_wait)
            .await;
        self.release_gc_lock().await;
        result
    }

    async fn collect_locked(
        &self,
        grace: Duration,
        dry_run: bool,
        upload_expiry: Duration,
        writer_wait: Duration,
    ) -> Result<GcReport> {
        self.wait_for_pins(writer_wait).await?;
        let mut sweep = GcReport {
            dry_run,
            ..GcReport::default()
        };
        if !dry_run {
            sweep.uploads_expired = self.expire_uploads(upload_expiry).await;
        }
        // Mark: every revision of every repository, followed through indexes.
        let mut repositories = std::collections::HashSet::new();
        let mut revisions = Vec::new();
        let mut links: std::collections::HashMap<Digest, Vec<ObjectMeta>> = Default::default();
        for meta in self.list_all("r").await? {
            let rel = self.relative(&meta.location).to_owned();
            let Some(rest) = rel.strip_prefix("r/") else {
                continue;
            };
            let (repo, kind, digest) = if let Some((repo, tail)) = rest.split_once("/_l/") {
                (repo, "layer", tail)
            } else if let Some((repo, tail)) = rest.split_once("/_m/") {
                (repo, "revision", tail)
            } else {
                continue;
            };
            let Some(d) = tail_digest(digest) else {
                continue;
            };
            repositories.insert(repo.to_owned());
            if kind == "layer" {
                links.entry(d).or_default().push(meta);
            } else {
                revisions.push(d);
            }
        }
        sweep.repositories = repositories.len();
        sweep.manifests = revisions.len();
        let mut marked = std::collections::HashSet::new();
        let mut parsed = std::collections::HashSet::new();
        let mut stack: Vec<(Digest, usize)> = revisions.into_iter().map(|d| (d, 0)).collect();
        while let Some((d, depth)) = stack.pop() {
            marked.insert(d.clone());
            if depth > 16 || !parsed.insert(d.clone()) {
                continue;
            }
            let Some(json) = self.manifest_json(&d).await? else {
                continue;
            };
            let (blobs, children) = super::gc::references(&json);
            marked.extend(blobs);
            stack.extend(children.into_iter().map(|m| (m, depth + 1)));
        }
        // Sweep the pointers; then the data objects no pointer names.
        let mut named = std::collections::HashSet::new();
        let data: std::collections::HashMap<String, ObjectMeta> = self
            .list_all("d")
            .await?
            .into_iter()
            .map(|m| (self.relative(&m.location).to_owned(), m))
            .collect();
        for meta in self.list_all("b").await? {
            let rel = self.relative(&meta.location).to_owned();
            let Some(d) = rel.strip_prefix("b/").and_then(tail_digest) else {
                continue;
            };
            sweep.blobs_scanned += 1;
            let Some((pointer, _)) = self.get_json::<Pointer>(&meta.location).await? else {
                continue;
            };
            named.insert(pointer.object.clone());
            if marked.contains(&d) {
                sweep.blobs_referenced += 1;
                sweep.bytes_kept += pointer.size;
                continue;
            }
            let young_link = links
                .get(&d)
                .is_some_and(|ls| ls.iter().any(|l| age(l) < grace));
            if age(&meta) < grace || young_link {
                sweep.blobs_in_grace += 1;
                sweep.bytes_kept += pointer.size;
                continue;
            }
            sweep.blobs_deleted += 1;
            sweep.bytes_freed += pointer.size;
            if dry_run {
                continue;
            }
            if self.lock_lost() {
                return Err(StorageError::Busy(
                    "the collection lost its lock (stalled past its lifetime); stopped".into(),
                ));
            }
            for link in links.get(&d).into_iter().flatten() {
                self.delete_quiet(&link.location).await?;
            }
            self.delete_quiet(&meta.location).await?;
            self.delete_quiet(&self.path(&pointer.object)).await?;
        }
        if !dry_run {
            // Bytes of uploads that never became a blob (a crash between the multipart
            // completion and the pointer).
            for (rel, meta) in &data {
                if !named.contains(rel) && age(meta) >= grace {
                    self.delete_quiet(&meta.location).await?;
                }
            }
        }
        Ok(sweep)
    }
}

/// Whether `key` is `d/<uuid>`.
fn valid_data_key(key: &str) -> bool {
    key.strip_prefix("d/")
        .is_some_and(|id| Uuid::parse_str(id).is_ok())
}

/// `<alg>/<hex>` at the end of a key, as a digest.
fn tail_digest(tail: &str) -> Option<Digest> {
    let (alg, hex) = tail.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

async fn hash_on_thread(hasher: Option<Sha256>, data: Bytes) -> Result<Sha256> {
    let mut hasher = hasher.unwrap_or_default();
    if data.is_empty() {
        return Ok(hasher);
    }
    tokio::task::spawn_blocking(move || {
        hasher.update(&data);
        hasher
    })
    .await
    .map_err(io)
}

async fn join_part(
    handle: Option<tokio::task::JoinHandle<object_store::Result<PartId>>>,
) -> Result<String> {
    let handle = handle.ok_or_else(|| io("no part in flight"))?;
    let part = handle
        .await
        .map_err(io)?
        .map_err(|e| s3_error("writing a part", e))?;
    Ok(part.content_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_that_a_tebibyte_fits_in_ten_thousand() {
        let mut total: u64 = 0;
        for i in 0..MAX_PARTS {
            total += part_size(i) as u64;
        }
        assert!(total > 1 << 40, "{total}");
        assert!(part_size(0) >= 5 << 20);
    }

    #[test]
    fn a_saved_hash_state_goes_on_where_it_stopped() {
        let mut h = Sha256::new();
        h.update(b"hello ");
        let saved = save_hasher(&h);
        let mut restored = load_hasher(&saved).unwrap();
        restored.update(b"world");
        assert_eq!(restored.finalize(), Sha256::digest(b"hello world"));
        assert!(load_hasher("zz").is_err());
        assert!(load_hasher("00").is_err());
    }
}
