//! Garbage collection: frees the blobs no manifest reaches.
//!
//! `dvcr gc --root DIR` runs it offline (it refuses to run while a `dvcr serve` uses the
//! root: the two take a shared/exclusive `flock` on `<root>/.lock`), and
//! `dvcr serve --gc-interval 1h` runs it in the background of a live registry.
//!
//! # What is kept
//! Mark: in every repository, every manifest revision (tagged or not; with
//! `--delete-untagged`, only the tagged ones, what their indexes list, their referrers, and
//! untagged revisions younger than the grace period), and, by content, everything a kept
//! manifest names: its own bytes, its config and layers, and the children of an index,
//! followed recursively. Sweep: a blob that is not marked is deleted only when its
//! modification time is older than the grace period (a blob commit, a mount and a manifest
//! push refresh it), together with the repository `_layers` links that point at it. Links to
//! blobs that stay are kept even when no manifest of their repository names them: they are
//! empty files, and they are how an upload that was not yet referenced stays visible to its
//! repository. Expired upload sessions are removed too.
//!
//! # Writes in flight
//! A live registry keeps writing while the collector runs. Three rules make that safe:
//! - The grace period covers blobs uploaded (or mounted) but not yet referenced.
//! - A collection starts a new *generation* and waits until every reference-creating write of
//!   an older generation (manifest PUT, blob commit, mount; each holds a [`WriteTicket`]) has
//!   finished: from then on, the revisions the mark walk reads include them.
//! - An unreferenced blob linked into a repository with an upload session open, or with
//!   upload or mount activity within the grace period, stays: a multi-layer push keeps its
//!   first layers while it uploads the last ones, however long that takes. (A repository
//!   that is pushed to all the time has its garbage collected once it has been quiet for
//!   the grace period; an abandoned session counts until it expires.)
//! - While a collection runs, every write that is about to rely on an existing blob or
//!   revision first *protects* it ([`Coordinator::protect`]), then checks that it exists; the
//!   sweep deletes only under the same lock, and skips what is protected. So either the
//!   delete comes first and the write sees the blob missing (a clean `BLOB_UNKNOWN`, never a
//!   manifest pointing at nothing), or the protection comes first and the blob stays.
//!
//! Known limits: the coordination is in-process, so with several `dvcr serve` replicas on one
//! shared root only the grace period protects the writes of the other replicas (run the
//! online collector with a generous grace there). A client that saw an old, unreferenced blob with `HEAD` *before* a
//! collection started and pushes the manifest naming it *after* the collection deleted it
//! gets `MANIFEST_BLOB_UNKNOWN` and has to push the blob again; that needs a blob left
//! unreferenced for longer than the grace period.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::metrics::Metrics;
use super::names::Digest;
use super::storage::{Storage, StorageOptions};

/// Largest manifest the mark phase reads (the API accepts 4 MiB).
const MAX_MANIFEST_READ: u64 = 16 << 20;

/// How deep index children are followed (indexes of indexes are legal, loops are not).
const MAX_DEPTH: usize = 16;

/// How long a collection waits for older writes in flight before it gives up this run.
const WRITER_WAIT: Duration = Duration::from_secs(600);

/// What a collection can fail with.
#[derive(Debug, Error)]
pub enum GcError {
    /// Another collection is running on this storage.
    #[error("a garbage collection is already running")]
    AlreadyRunning,
    /// Writes that started before the collection did not finish in time.
    #[error("writes in flight did not finish within {0:?}; nothing was deleted, try again")]
    WritersBusy(Duration),
    /// A filesystem failure.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Coordinates the collector with the writes of a live registry (see the module doc).
#[derive(Debug, Default)]
pub struct Coordinator {
    state: Mutex<CoordState>,
    drained: tokio::sync::Notify,
    running: AtomicBool,
}

#[derive(Debug, Default)]
struct CoordState {
    /// A collection is between its start and its end: writes record what they rely on.
    active: bool,
    generation: u64,
    /// Writes in flight per generation.
    inflight: HashMap<u64, usize>,
    /// Blobs (`<digest>`) and revisions (`<repository>@<digest>`) writes rely on.
    protected: HashSet<String>,
    /// Open upload sessions per repository.
    uploads: HashMap<String, usize>,
    /// Last upload or mount activity per repository.
    activity: HashMap<String, SystemTime>,
}

/// Held by a write that creates references (manifest PUT, blob commit, mount) for its whole
/// duration; a collection waits for the tickets of older generations before it marks.
#[derive(Debug)]
pub struct WriteTicket {
    coordinator: Arc<Coordinator>,
    generation: u64,
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        let mut s = self.coordinator.lock();
        if let Some(n) = s.inflight.get_mut(&self.generation) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.inflight.remove(&self.generation);
            }
        }
        drop(s);
        self.coordinator.drained.notify_waiters();
    }
}

impl Coordinator {
    fn lock(&self) -> MutexGuard<'_, CoordState> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket for a reference-creating write; keep it until the write is done.
    pub fn ticket(self: &Arc<Self>) -> WriteTicket {
        let mut s = self.lock();
        let generation = s.generation;
        *s.inflight.entry(generation).or_default() += 1;
        WriteTicket {
            coordinator: Arc::clone(self),
            generation,
        }
    }

    /// Records that a write is about to rely on `key` (a blob digest, or
    /// `<repository>@<digest>` for a revision); call it before checking that it exists.
    pub fn protect(&self, key: impl FnOnce() -> String) {
        let mut s = self.lock();
        if s.active {
            s.protected.insert(key());
        }
    }

    /// An upload session of `repository` was opened.
    pub fn upload_opened(&self, repository: &str) {
        let mut s = self.lock();
        *s.uploads.entry(repository.to_owned()).or_default() += 1;
        s.activity.insert(repository.to_owned(), SystemTime::now());
    }

    /// An upload session of `repository` was committed, cancelled or expired.
    pub fn upload_closed(&self, repository: &str) {
        let mut s = self.lock();
        if let Some(n) = s.uploads.get_mut(repository) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.uploads.remove(repository);
            }
        }
        s.activity.insert(repository.to_owned(), SystemTime::now());
    }

    /// A blob was mounted into `repository`.
    pub fn repository_written(&self, repository: &str) {
        self.lock()
            .activity
            .insert(repository.to_owned(), SystemTime::now());
    }

    /// Key of a revision in the protected set.
    pub fn revision_key(repository: &str, digest: &Digest) -> String {
        format!("{repository}@{digest}")
    }

    /// Starts a collection: from now on writes record what they rely on; returns the
    /// generation whose writes must be waited for.
    fn begin(&self) -> Result<u64, GcError> {
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(GcError::AlreadyRunning);
        }
        let mut s = self.lock();
        s.active = true;
        s.protected.clear();
        s.generation += 1;
        Ok(s.generation)
    }

    /// Ends a collection.
    fn end(&self) {
        let mut s = self.lock();
        s.active = false;
        s.protected.clear();
        drop(s);
        self.running.store(false, Ordering::Release);
    }

    /// Waits until no write of a generation older than `generation` is in flight.
    async fn wait_for_writers(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.drained.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().inflight.keys().any(|g| *g < generation) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Runs `delete` unless `key` is protected, holding the lock so that no write can start
    /// relying on it meanwhile; None when protected.
    fn unless_protected<T>(&self, key: &str, delete: impl FnOnce() -> T) -> Option<T> {
        self.unless_claimed(key, &[], Duration::ZERO, delete)
    }

    /// Like [`unless_protected`](Self::unless_protected), and also None when one of
    /// `repositories` has an upload open or had upload activity within `grace`: a push in
    /// progress there may still name the blob in its manifest.
    fn unless_claimed<T>(
        &self,
        key: &str,
        repositories: &[String],
        grace: Duration,
        delete: impl FnOnce() -> T,
    ) -> Option<T> {
        let s = self.lock();
        let busy = |r: &String| {
            s.uploads.contains_key(r) || s.activity.get(r).is_some_and(|t| age(Ok(*t)) < grace)
        };
        if s.protected.contains(key) || repositories.iter().any(busy) {
            return None;
        }
        let out = delete();
        drop(s);
        Some(out)
    }

    /// Forgets repository activity older than `grace`.
    fn prune_activity(&self, grace: Duration) {
        self.lock().activity.retain(|_, t| age(Ok(*t)) < grace);
    }
}

/// Ends the collection when dropped (also on an early return or a panic).
struct Running<'a>(&'a Coordinator);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// What a collection may do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced blobs (and, with `delete_untagged`, untagged revisions) younger than
    /// this stay: they may belong to a push in progress.
    pub grace: Duration,
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Also delete untagged manifest revisions no tag, index or subject reaches.
    pub delete_untagged: bool,
    /// Upload sessions idle this long are removed.
    pub upload_expiry: Duration,
}

/// What a collection did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Repositories walked.
    pub repositories: usize,
    /// Manifest revisions kept.
    pub manifests: usize,
    /// Untagged manifest revisions deleted (`--delete-untagged`).
    pub manifests_deleted: usize,
    /// Blob files found (manifests included).
    pub blobs_scanned: usize,
    /// Blobs some kept manifest reaches.
    pub blobs_referenced: usize,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub blobs_in_grace: usize,
    /// Blobs deleted.
    pub blobs_deleted: usize,
    /// Bytes of the deleted blobs.
    pub bytes_freed: u64,
    /// Bytes of the blobs that stay.
    pub bytes_kept: u64,
    /// Repository links removed with their blobs.
    pub links_removed: usize,
    /// Unreferenced blobs a write claimed during the sweep (kept).
    pub blobs_claimed: usize,
    /// Expired upload sessions removed.
    pub uploads_expired: usize,
    /// Wall time of the run.
    pub seconds: f64,
}

fn age(modified: io::Result<SystemTime>) -> Duration {
    match modified {
        Ok(t) => SystemTime::now().duration_since(t).unwrap_or_default(),
        // No mtime: treat as young, never delete on a guess.
        Err(_) => Duration::ZERO,
    }
}

fn not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Entries of a directory (none when it does not exist).
fn entries(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.collect(),
        Err(e) if not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The digests stored under `<dir>/<alg>/<hex>`, with their files.
fn digests_in(dir: &Path) -> io::Result<Vec<(Digest, PathBuf)>> {
    let mut out = Vec::new();
    for alg in entries(dir)? {
        let Some(alg_name) = alg.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        for e in entries(&alg.path())? {
            let Some(hex) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Ok(d) = Digest::parse(&format!("{alg_name}:{hex}")) {
                out.push((d, e.path()));
            }
        }
    }
    Ok(out)
}

/// The storage layout as the collector walks it (see the `storage` module doc).
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn blob(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.root.join("repositories").join(name)
    }

    /// Reads a manifest's bytes as JSON (None when missing, too large or not JSON).
    fn manifest_json(&self, d: &Digest) -> Option<Value> {
        let mut bytes = Vec::new();
        File::open(self.blob(d))
            .ok()?
            .take(MAX_MANIFEST_READ)
            .read_to_end(&mut bytes)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// The digest of a descriptor object.
fn descriptor_digest(v: &Value) -> Option<Digest> {
    Digest::parse(v.get("digest")?.as_str()?).ok()
}

/// What a manifest names: the blobs it needs (its config and layers) and, for an index, the
/// child manifests to follow. Both collectors (filesystem and S3) mark with it.
pub(super) fn references(json: &Value) -> (Vec<Digest>, Vec<Digest>) {
    let list = |key: &str| -> Vec<Digest> {
        json.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(descriptor_digest)
            .collect()
    };
    let mut blobs = list("layers");
    blobs.extend(json.get("config").and_then(descriptor_digest));
    (blobs, list("manifests"))
}

/// What the mark phase has reached: every digest, and the manifests already read.
#[derive(Default)]
struct Marks {
    marked: HashSet<Digest>,
    parsed: HashSet<Digest>,
}

impl Marks {
    fn contains(&self, d: &Digest) -> bool {
        self.marked.contains(d)
    }
}

/// Marks a manifest, its config, layers and (recursively) index children.
fn mark_manifest(layout: &Layout, d: &Digest, marks: &mut Marks, depth: usize) {
    marks.marked.insert(d.clone());
    if !marks.parsed.insert(d.clone()) || depth > MAX_DEPTH {
        return;
    }
    let Some(json) = layout.manifest_json(d) else {
        return;
    };
    let (blobs, children) = references(&json);
    marks.marked.extend(blobs);
    for m in children {
        mark_manifest(layout, &m, marks, depth + 1);
    }
}

/// One repository's revisions: digest, age, subject.
struct RevisionInfo {
    digest: Digest,
    age: Duration,
    subject: Option<Digest>,
    path: PathBuf,
}

fn revisions(layout: &Layout, repo: &str) -> io::Result<Vec<RevisionInfo>> {
    let dir = layout.repo(repo).join("_manifests/revisions");
    let mut out = Vec::new();
    for (digest, path) in digests_in(&dir)? {
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if not_found(&e) => continue,
            Err(e) => return Err(e),
        };
        let subject = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| Digest::parse(v.get("subject")?.as_str()?).ok());
        out.push(RevisionInfo {
            digest,
            age: age(meta.modified()),
            subject,
            path,
        });
    }
    Ok(out)
}

fn tag_targets(layout: &Layout, repo: &str) -> io::Result<HashSet<Digest>> {
    let mut out = HashSet::new();
    for e in entries(&layout.repo(repo).join("_manifests/tags"))? {
        if let Ok(text) = fs::read_to_string(e.path())
            && let Ok(d) = Digest::parse(text.trim())
        {
            out.insert(d);
        }
    }
    Ok(out)
}

/// The revisions of a repository to keep when untagged ones may go: the tagged ones, what
/// their indexes list, referrers of kept ones, and young ones; the rest is returned apart.
fn split_untagged(
    layout: &Layout,
    repo: &str,
    revs: Vec<RevisionInfo>,
    grace: Duration,
) -> io::Result<(Vec<RevisionInfo>, Vec<RevisionInfo>)> {
    let tagged = tag_targets(layout, repo)?;
    let mut keep: HashSet<Digest> = revs
        .iter()
        .filter(|r| tagged.contains(&r.digest) || r.age < grace)
        .map(|r| r.digest.clone())
        .collect();
    // Fixpoint over "listed by a kept index" and "refers to a kept subject".
    loop {
        let mut reach = Marks::default();
        for d in &keep {
            mark_manifest(layout, d, &mut reach, 0);
        }
        let before = keep.len();
        for r in &revs {
            if reach.contains(&r.digest) || r.subject.as_ref().is_some_and(|s| keep.contains(s)) {
                keep.insert(r.digest.clone());
            }
        }
        if keep.len() == before {
            break;
        }
    }
    Ok(revs.into_iter().partition(|r| keep.contains(&r.digest)))
}

/// Deletes an untagged revision (and its referrer entry) unless a write claimed it, it got
/// a tag, or it was rewritten meanwhile.
fn delete_revision(
    layout: &Layout,
    coordinator: &Coordinator,
    repo: &str,
    rev: &RevisionInfo,
    grace: Duration,
) -> io::Result<bool> {
    let key = Coordinator::revision_key(repo, &rev.digest);
    coordinator
        .unless_protected(&key, || {
            if age(fs::metadata(&rev.path).and_then(|m| m.modified())) < grace
                || tag_targets(layout, repo)?.contains(&rev.digest)
            {
                return Ok(false);
            }
            match fs::remove_file(&rev.path) {
                Ok(()) => {}
                Err(e) if not_found(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
            if let Some(subject) = &rev.subject {
                let name = format!("{}-{}", rev.digest.algorithm().as_str(), rev.digest.hex());
                let _ = fs::remove_file(
                    layout
                        .repo(repo)
                        .join("_referrers")
                        .join(subject.algorithm().as_str())
                        .join(subject.hex())
                        .join(name),
                );
            }
            Ok(true)
        })
        .unwrap_or(Ok(false))
}

/// Counts the blobs under `<root>/blobs` and their bytes (for the storage gauges).
pub fn usage(root: &Path) -> io::Result<(u64, u64)> {
    let (mut count, mut bytes) = (0u64, 0u64);
    for alg in entries(&root.join("blobs"))? {
        for prefix in entries(&alg.path())? {
            for blob in entries(&prefix.path())? {
                if let Ok(m) = blob.metadata()
                    && m.is_file()
                {
                    count += 1;
                    bytes += m.len();
                }
            }
        }
    }
    Ok((count, bytes))
}

/// Runs one collection over `storage` (see the module doc).
pub async fn collect(
    storage: &Storage,
    options: &GcOptions,
    metrics: Option<&Metrics>,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    if let Some(s3) = storage.s3() {
        return collect_s3(s3, options, metrics, started).await;
    }
    let coordinator = Arc::clone(storage.coordinator());
    let generation = coordinator.begin()?;
    let running = Running(&coordinator);
    if !coordinator.wait_for_writers(generation, WRITER_WAIT).await {
        return Err(GcError::WritersBusy(WRITER_WAIT));
    }
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    if !options.dry_run {
        report.uploads_expired = storage.expire_uploads(options.upload_expiry).await;
    }
    let repos = storage
        .catalog()
        .await
        .map_err(|e| GcError::Io(io::Error::other(e)))?;
    let layout = Layout {
        root: storage.root().to_path_buf(),
    };
    let (opts, coord) = (options.clone(), Arc::clone(&coordinator));
    let mut report =
        tokio::task::spawn_blocking(move || mark_and_sweep(&layout, &coord, &repos, &opts, report))
            .await
            .map_err(|e| GcError::Io(io::Error::other(e)))??;
    coordinator.prune_activity(options.grace);
    drop(running);
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(m) = metrics {
        m.gc_finished(&report);
    }
    Ok(report)
}

fn mark_and_sweep(
    layout: &Layout,
    coordinator: &Coordinator,
    repos: &[String],
    options: &GcOptions,
    mut report: GcReport,
) -> Result<GcReport, GcError> {
    // Mark.
    let mut marked = Marks::default();
    let mut links: HashMap<Digest, Vec<(String, PathBuf)>> = HashMap::new();
    report.repositories = repos.len();
    for repo in repos {
        let revs = revisions(layout, repo)?;
        let keep = if options.delete_untagged {
            let (keep, drop) = split_untagged(layout, repo, revs, options.grace)?;
            for rev in &drop {
                if options.dry_run {
                    report.manifests_deleted += 1;
                } else if delete_revision(layout, coordinator, repo, rev, options.grace)? {
                    tracing::info!(repository = %repo, digest = %rev.digest, "untagged manifest deleted");
                    report.manifests_deleted += 1;
                } else {
                    // Claimed or refreshed meanwhile: it stays, and so does what it names.
                    mark_manifest(layout, &rev.digest, &mut marked, 0);
                    report.manifests += 1;
                }
            }
            keep
        } else {
            revs
        };
        report.manifests += keep.len();
        for rev in &keep {
            mark_manifest(layout, &rev.digest, &mut marked, 0);
        }
        for (digest, path) in digests_in(&layout.repo(repo).join("_layers"))? {
            links.entry(digest).or_default().push((repo.clone(), path));
        }
    }

    // Sweep.
    let grace = options.grace;
    for (digest, path) in all_blobs(&layout.root)? {
        let meta = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        report.blobs_scanned += 1;
        if marked.contains(&digest) {
            report.blobs_referenced += 1;
            report.bytes_kept += meta.len();
            continue;
        }
        if age(meta.modified()) < grace {
            report.blobs_in_grace += 1;
            report.bytes_kept += meta.len();
            continue;
        }
        let blob_links = links.get(&digest).map(Vec::as_slice).unwrap_or(&[]);
        if options.dry_run {
            report.blobs_deleted += 1;
            report.bytes_freed += meta.len();
            report.links_removed += blob_links.len();
            continue;
        }
        let repos: Vec<String> = blob_links.iter().map(|(r, _)| r.clone()).collect();
        let outcome = coordinator.unless_claimed(&digest.to_string(), &repos, grace, || {
            // Re-check under the lock: a commit may have refreshed it since the walk.
            let meta = fs::metadata(&path)?;
            if age(meta.modified()) < grace {
                return Ok::<_, io::Error>(None);
            }
            fs::remove_file(&path)?;
            let mut removed = 0;
            for (_, link) in blob_links {
                if fs::remove_file(link).is_ok() {
                    removed += 1;
                }
            }
            Ok(Some((meta.len(), removed)))
        });
        match outcome {
            Some(Ok(Some((size, removed)))) => {
                tracing::debug!(%digest, size, "blob freed");
                report.blobs_deleted += 1;
                report.bytes_freed += size;
                report.links_removed += removed;
            }
            Some(Ok(None)) | None => {
                report.blobs_claimed += 1;
                report.bytes_kept += meta.len();
            }
            Some(Err(e)) if not_found(&e) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(report)
}

/// Every blob under `<root>/blobs/<alg>/<xx>/<hex>`.
fn all_blobs(root: &Path) -> io::Result<Vec<(Digest, PathBuf)>> {
    let mut out = Vec::new();
    for alg in entries(&root.join("blobs"))? {
        let Some(alg_name) = alg.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        for prefix in entries(&alg.path())? {
            for blob in entries(&prefix.path())? {
                let Some(hex) = blob.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if let Ok(d) = Digest::parse(&format!("{alg_name}:{hex}")) {
                    out.push((d, blob.path()));
                }
            }
        }
    }
    Ok(out)
}

/// An advisory lock on `<root>/.lock`: `dvcr serve` holds it shared, offline `dvcr gc`
/// exclusive, so the offline collector never runs under a live registry.
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

impl RootLock {
    fn take(root: &Path, exclusive: bool) -> io::Result<Option<Self>> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))?;
        let mode = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Self { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// The lock of a serving registry; Err when an offline collection holds the root.
    pub fn shared(root: &Path) -> anyhow::Result<Self> {
        Self::take(root, false)?.ok_or_else(|| {
            anyhow::anyhow!(
                "`dvcr gc` is running on {}: wait for it to finish",
                root.display()
            )
        })
    }

    /// The lock of an offline collection; Err when a registry serves the root.
    pub fn exclusive(root: &Path) -> anyhow::Result<Self> {
        Self::take(root, true)?.ok_or_else(|| {
            anyhow::anyhow!(
                "a `dvcr serve` (or another `dvcr gc`) is using {}: stop it, or let the server \
                 collect online with `dvcr serve --gc-interval`",
                root.display()
            )
        })
    }
}

/// Parses a duration: `1h`, `30m`, `10s`, `500ms`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 1h, 30m, 10s, 500ms)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => return Err(format!("unknown duration unit {other:?} (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{s:?}: {e}"))
}

/// Arguments of `dvcr gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Storage directory of the registry (the `--root` of `dvcr serve`, which must not be
    /// running; use `dvcr serve --gc-interval` for a live registry).
    #[arg(long, env = "DVCR_ROOT", default_value = "./dvcr-data")]
    root: PathBuf,

    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,

    /// Unreferenced blobs younger than this stay (pushes in progress).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    grace: Duration,

    /// Also delete untagged manifests that no tag, index or subject reaches (older than
    /// the grace period).
    #[arg(long)]
    delete_untagged: bool,

    /// Upload sessions idle this long are removed.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    upload_expiry: Duration,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Collect in this S3 bucket instead of --root (live replicas may keep serving).
    #[command(flatten)]
    s3: super::s3::S3Args,
}

/// `dvcr gc`: one offline collection.
pub fn run(args: &GcArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dvcr gc: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_offline(args)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                let verb = if report.dry_run {
                    "would delete"
                } else {
                    "deleted"
                };
                println!(
                    "{verb} {} blobs ({} bytes) and {} untagged manifests; kept {} referenced \
                     blobs and {} within the grace period ({} bytes); {} manifests in {} \
                     repositories; {} expired uploads removed",
                    report.blobs_deleted,
                    report.bytes_freed,
                    report.manifests_deleted,
                    report.blobs_referenced,
                    report.blobs_in_grace,
                    report.bytes_kept,
                    report.manifests,
                    report.repositories,
                    report.uploads_expired,
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dvcr gc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_offline(args: &GcArgs) -> anyhow::Result<GcReport> {
    let options = GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
        delete_untagged: args.delete_untagged,
        upload_expiry: args.upload_expiry,
    };
    if let Some(s3) = args.s3.config() {
        let scratch = std::env::temp_dir().join("dvcr-gc");
        let storage = Storage::open_s3(
            &scratch,
            StorageOptions {
                max_uploads: usize::MAX,
            },
            &s3,
        )
        .await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            r = collect(&storage, &options, None) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; nothing more is deleted")),
            _ = terminate.recv() => Err(anyhow::anyhow!("terminated; nothing more is deleted")),
        };
        // Stopped mid-way: the lock goes now rather than blocking writes until it is stale.
        if let Some(s3) = storage.s3() {
            s3.release_gc_lock().await;
        }
        return result;
    }
    if !args.root.join("blobs").is_dir() {
        anyhow::bail!(
            "{} is not a registry storage (no blobs directory)",
            args.root.display()
        );
    }
    let _lock = RootLock::exclusive(&args.root)?;
    let storage = Storage::open(
        &args.root,
        StorageOptions {
            max_uploads: usize::MAX,
        },
    )
    .await?;
    Ok(collect(&storage, &options, None).await?)
}

/// One collection on an S3 bucket (the protocol is in [`super::s3`]'s module doc).
async fn collect_s3(
    s3: &super::s3::S3Store,
    options: &GcOptions,
    metrics: Option<&Metrics>,
    started: Instant,
) -> Result<GcReport, GcError> {
    if options.delete_untagged {
        tracing::warn!(
            "--delete-untagged is not supported on S3 storage yet: untagged manifests stay"
        );
    }
    let mut report = s3
        .collect(
            options.grace,
            options.dry_run,
            options.upload_expiry,
            WRITER_WAIT,
        )
        .await
        .map_err(|e| match e {
            super::storage::StorageError::Busy(m) if m.contains("already running") => {
                GcError::AlreadyRunning
            }
            other => GcError::Io(io::Error::other(other)),
        })?;
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(m) = metrics
        && !options.dry_run
    {
        m.set_storage(
            (report.blobs_referenced + report.blobs_in_grace) as u64,
            report.bytes_kept,
        );
    }
    Ok(report)
}

/// The online collector of `dvcr serve --gc-interval`: one collection per `interval`.
pub async fn periodic(
    storage: Storage,
    options: GcOptions,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; start one interval after startup.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match collect(&storage, &options, Some(&metrics)).await {
            Ok(r) => tracing::info!(
                blobs_deleted = r.blobs_deleted,
                bytes_freed = r.bytes_freed,
                manifests_deleted = r.manifests_deleted,
                blobs_referenced = r.blobs_referenced,
                blobs_in_grace = r.blobs_in_grace,
                uploads_expired = r.uploads_expired,
                seconds = r.seconds,
                "garbage collection finished"
            ),
            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[tokio::test]
    async fn a_collection_waits_for_older_writers_and_protects_what_newer_ones_claim() {
        let c = Arc::new(Coordinator::default());
        let old = c.ticket();
        let generation = c.begin().unwrap();
        assert!(matches!(c.begin(), Err(GcError::AlreadyRunning)));
        assert!(
            !c.wait_for_writers(generation, Duration::from_millis(20))
                .await
        );
        let newer = c.ticket();
        drop(old);
        assert!(c.wait_for_writers(generation, Duration::from_secs(1)).await);
        c.protect(|| "sha256:x".to_owned());
        assert_eq!(c.unless_protected("sha256:x", || ()), None);
        assert_eq!(c.unless_protected("sha256:y", || 7), Some(7));
        drop(newer);
        c.end();
        c.protect(|| "sha256:z".to_owned());
        assert!(c.lock().protected.is_empty());
    }
}
