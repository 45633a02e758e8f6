//! Pushing to a registry: blobs streamed from a blocking producer ([`BlobWriter`]: POST a
//! session, one PATCH whose body is fed ~1 MiB chunks over a bounded channel, PUT
//! `?digest=`), cross-repository mounts (DVCR to DVCR without moving data), small blobs in
//! one request, and manifests.
//!
//! A registry that answers upload sessions with `Dvcr-Upload-Digest` (DVCR does) names the
//! blob itself: it hashes every byte anyway to verify it, so the writer can complete with
//! that digest ([`BlobWriter::finish_named`]) instead of hashing the stream a second time.
//! The session's `Range` must then account for exactly the bytes sent.
//!
//! The streamed PATCH goes through the HTTP client without a read timeout (reqwest's would
//! count the whole upload); instead a watchdog fails the upload when the registry takes no
//! bytes for [`IDLE_TIMEOUT`] while some are waiting, or gives no answer for ten idle
//! timeouts after the last byte went out.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::Client;
use super::error::OciError;
use super::manifest::MAX_MANIFEST_BYTES;
use super::reference::{Reference, check_repository, parse_digest, shown};
use super::transport::{
    Call, Core, Hasher, IDLE_TIMEOUT, content_length, header_text, pull_scope, push_scope, redact,
};

/// Bytes per PATCH body chunk.
const UPLOAD_CHUNK: usize = 1 << 20;
/// The pieces a chunk is handed to the HTTP client in.
const FRAME: usize = 64 << 10;
/// Chunks waiting between [`BlobWriter::write`] and the request.
const UPLOAD_CHUNKS: usize = 4;
/// How long the registry may take to answer once the whole body was sent.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

impl Client {
    /// The size of blob `digest` in `repo_ref`'s repository, or `None` when it is not there.
    pub fn blob_exists(&self, repo_ref: &Reference, digest: &str) -> Result<Option<u64>, OciError> {
        let digest = parse_digest(digest).map_err(OciError::invalid)?;
        let core = self.core();
        let r = repo_ref.clone();
        self.run(async move {
            let what = format!("checking for blob {digest} in {}", repo_view(&r));
            let url = core
                .url(&r.registry, &format!("{}/blobs/{digest}", r.repository))
                .await
                .map_err(|e| e.context(&what))?;
            let call = Call::new(Method::HEAD, url, vec![pull_scope(&r.repository)]);
            let resp = core
                .send(&r.registry, &call)
                .await
                .map_err(|e| e.context(&what))?;
            match resp.status() {
                s if s.is_success() => match content_length(resp.headers()) {
                    Some(len) => Ok(Some(len)),
                    None => {
                        tracing::warn!(%what, "the registry answered HEAD without Content-Length");
                        Ok(Some(0))
                    }
                },
                StatusCode::NOT_FOUND => Ok(None),
                _ => Err(core.status_error(resp, &what, &r.registry).await),
            }
        })
    }

    /// Mounts blob `digest` from `from_repository` into `to`'s repository (same registry):
    /// `true` when the registry linked it (201), `false` when it offered an upload instead
    /// (202; that session is cancelled).
    pub fn mount_blob(
        &self,
        to: &Reference,
        from_repository: &str,
        digest: &str,
    ) -> Result<bool, OciError> {
        let digest = parse_digest(digest).map_err(OciError::invalid)?;
        check_repository(from_repository).map_err(|e| {
            OciError::invalid(format!("cannot mount from {}: {e}", shown(from_repository)))
        })?;
        let core = self.core();
        let to = to.clone();
        let from = from_repository.to_owned();
        self.run(async move {
            let what = format!("mounting blob {digest} from {from} into {}", repo_view(&to));
            let mut url = core
                .url(&to.registry, &format!("{}/blobs/uploads/", to.repository))
                .await
                .map_err(|e| e.context(&what))?;
            url.set_query(Some(&format!("mount={digest}&from={from}")));
            let call = Call::new(
                Method::POST,
                url.clone(),
                vec![push_scope(&to.repository), pull_scope(&from)],
            )
            .body(Bytes::new());
            let resp = core
                .send(&to.registry, &call)
                .await
                .map_err(|e| e.context(&what))?;
            match resp.status() {
                StatusCode::CREATED => Ok(true),
                StatusCode::ACCEPTED => {
                    if let Ok(session) = location(&resp, &url, &what) {
                        cancel_session(&core, &to, session).await;
                    }
                    tracing::debug!(%what, "the registry did not mount the blob");
                    Ok(false)
                }
                _ => Err(core.status_error(resp, &what, &to.registry).await),
            }
        })
    }

    /// Starts an upload to `to`'s repository; write the blob into the returned writer and
    /// [`BlobWriter::finish`] it with its digest.
    pub fn upload_blob(&self, to: &Reference) -> Result<BlobWriter, OciError> {
        let core = self.core();
        let r = to.clone();
        let (location, named) = self.run(async move { start_upload(&core, &r).await })?;
        Ok(BlobWriter {
            client: self.clone(),
            reference: to.clone(),
            location,
            names_blobs: named,
            named: None,
            buffer: BytesMut::with_capacity(UPLOAD_CHUNK),
            stream: None,
            written: 0,
            finished: false,
        })
    }

    /// Pushes a small blob (a config) in one request after the session POST; returns its
    /// `sha256:` digest.
    pub fn push_blob_bytes(&self, to: &Reference, bytes: &[u8]) -> Result<String, OciError> {
        let digest = Hasher::digest_like("sha256:", bytes);
        let core = self.core();
        let r = to.clone();
        let body = Bytes::copy_from_slice(bytes);
        let d = digest.clone();
        self.run(async move {
            let (session, _) = start_upload(&core, &r).await?;
            let what = format!(
                "uploading blob {d} ({} bytes) to {}",
                body.len(),
                repo_view(&r)
            );
            let call = Call::new(
                Method::PUT,
                with_digest(session, &d),
                vec![push_scope(&r.repository)],
            )
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
            let resp = core.send_ok(&r.registry, &call, &what).await?;
            check_answered_digest(resp.headers(), &d, &what)?;
            Ok(d)
        })?;
        Ok(digest)
    }

    /// PUTs a manifest to the tag of `to` (or its digest when it has no tag); returns the
    /// manifest's digest (`sha256:`, or the algorithm of `to`'s digest).
    pub fn put_manifest(
        &self,
        to: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, OciError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(OciError::invalid(format!(
                "the manifest for {to} is {} bytes, more than the {MAX_MANIFEST_BYTES} registries accept",
                bytes.len()
            )));
        }
        let digest = match &to.digest {
            Some(d) => {
                let actual = Hasher::digest_like(d, bytes);
                if &actual != d {
                    return Err(OciError::digest(format!(
                        "the manifest pushed to {to} hashes to {actual}, not the digest in the reference"
                    )));
                }
                actual
            }
            None => Hasher::digest_like("sha256:", bytes),
        };
        let target = to.tag.clone().unwrap_or_else(|| digest.clone());
        if HeaderValue::from_str(media_type).is_err() || media_type.is_empty() {
            return Err(OciError::invalid(format!(
                "the manifest media type {} cannot be sent",
                shown(media_type)
            )));
        }
        let core = self.core();
        let r = to.clone();
        let body = Bytes::copy_from_slice(bytes);
        let media_type = media_type.to_owned();
        let d = digest.clone();
        self.run(async move {
            let what = format!("pushing the manifest {d} to {r}");
            let url = core
                .url(&r.registry, &format!("{}/manifests/{target}", r.repository))
                .await
                .map_err(|e| e.context(&what))?;
            let call = Call::new(Method::PUT, url, vec![push_scope(&r.repository)])
                .header(header::CONTENT_TYPE, &media_type)
                .body(body);
            let resp = core.send_ok(&r.registry, &call, &what).await?;
            check_answered_digest(resp.headers(), &d, &what)?;
            Ok(())
        })?;
        Ok(digest)
    }
}

/// `registry/repository`, for messages about a repository.
fn repo_view(r: &Reference) -> String {
    format!("{}/{}", r.registry, r.repository)
}

/// The name of the header in which DVCR gives the digest of an upload's bytes so far.
const UPLOAD_DIGEST: &str = "dvcr-upload-digest";

/// The `sha256:` digest a registry gives in `Dvcr-Upload-Digest`, if it gives a valid one.
fn named_digest(headers: &HeaderMap) -> Option<String> {
    let text = header_text(headers, UPLOAD_DIGEST)?.trim();
    let digest = parse_digest(text).ok()?;
    digest.starts_with("sha256:").then_some(digest)
}

/// The empty blob's digest: what a registry that names blobs says of a new session.
const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// POSTs a new upload session: its location, and whether the registry names blobs (answers
/// with `Dvcr-Upload-Digest`, the empty blob's digest for a new session).
async fn start_upload(core: &Core, r: &Reference) -> Result<(Url, bool), OciError> {
    let what = format!("starting an upload to {}", repo_view(r));
    let url = core
        .url(&r.registry, &format!("{}/blobs/uploads/", r.repository))
        .await
        .map_err(|e| e.context(&what))?;
    let call =
        Call::new(Method::POST, url.clone(), vec![push_scope(&r.repository)]).body(Bytes::new());
    let resp = core
        .send(&r.registry, &call)
        .await
        .map_err(|e| e.context(&what))?;
    if resp.status() != StatusCode::ACCEPTED {
        if resp.status().is_success() {
            return Err(OciError::invalid(format!(
                "{what}: the registry answered HTTP {} instead of 202 with an upload session",
                resp.status().as_u16()
            )));
        }
        return Err(core.status_error(resp, &what, &r.registry).await);
    }
    let names = named_digest(resp.headers()).is_some_and(|d| d == EMPTY_SHA256);
    Ok((location(&resp, &url, &what)?, names))
}

/// The `Location` of an answer, resolved against the request's URL.
fn location(resp: &reqwest::Response, request: &Url, what: &str) -> Result<Url, OciError> {
    let text = header_text(resp.headers(), "location").ok_or_else(|| {
        OciError::invalid(format!(
            "{what}: the registry answered HTTP {} without a Location",
            resp.status().as_u16()
        ))
    })?;
    let url = request.join(text.trim()).map_err(|e| {
        OciError::invalid(format!(
            "{what}: the registry's Location {} is not a URL: {e}",
            shown(text)
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OciError::invalid(format!(
            "{what}: the registry's Location {} is not http(s)",
            shown(text)
        )));
    }
    Ok(url)
}

/// `location` with `digest=<digest>` added to its query.
fn with_digest(mut location: Url, digest: &str) -> Url {
    let query = match location.query() {
        Some(q) if !q.is_empty() => format!("{q}&digest={digest}"),
        _ => format!("digest={digest}"),
    };
    location.set_query(Some(&query));
    location
}

/// Fails when the registry's `Docker-Content-Digest` names other bytes than ours.
fn check_answered_digest(headers: &HeaderMap, digest: &str, what: &str) -> Result<(), OciError> {
    if let Some(answered) = header_text(headers, "docker-content-digest") {
        let answered = answered.trim();
        if answered.split(':').next() == digest.split(':').next() && answered != digest {
            return Err(OciError::digest(format!(
                "{what}: the registry stored {} instead of {digest}",
                shown(answered)
            )));
        }
    }
    Ok(())
}

/// DELETEs an upload session, best effort.
async fn cancel_session(core: &Core, r: &Reference, session: Url) {
    let shown = redact(&session);
    let call = Call::new(Method::DELETE, session, vec![push_scope(&r.repository)]);
    match core.send(&r.registry, &call).await {
        Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND => {
            tracing::debug!(session = %shown, "upload session cancelled");
        }
        Ok(resp) => {
            tracing::debug!(session = %shown, status = resp.status().as_u16(), "cancelling an upload session failed");
        }
        Err(e) => {
            tracing::debug!(session = %shown, error = %e, "cancelling an upload session failed")
        }
    }
}

/// How the streamed body moves, for the watchdog.
#[derive(Debug)]
struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the last chunk queued or taken.
    last: AtomicU64,
    queued: AtomicU64,
    taken: AtomicU64,
    /// The writer has sent everything (the channel is closed).
    closed: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Why the upload is stuck, if it is.
    fn stalled(&self) -> Option<String> {
        let idle = Duration::from_millis(
            (self.start.elapsed().as_millis() as u64)
                .saturating_sub(self.last.load(Ordering::Relaxed)),
        );
        let waiting = self.queued.load(Ordering::Relaxed) > self.taken.load(Ordering::Relaxed);
        if waiting && idle > IDLE_TIMEOUT {
            return Some(format!(
                "the registry took no data for {} s",
                idle.as_secs()
            ));
        }
        if self.closed.load(Ordering::Relaxed) && !waiting && idle > ANSWER_TIMEOUT {
            return Some(format!(
                "the registry gave no answer {} s after the whole blob was sent",
                idle.as_secs()
            ));
        }
        None
    }
}

/// The PATCH request in flight.
#[derive(Debug)]
struct Streaming {
    chunks: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    result: std::sync::mpsc::Receiver<Result<Patched, OciError>>,
    task: tokio::task::JoinHandle<()>,
    progress: Arc<Progress>,
}

/// A blob upload in progress: `write` the bytes, then [`BlobWriter::finish`] with the
/// digest. Dropping it without `finish` (or [`BlobWriter::abort`]) cancels the session.
/// Memory stays bounded: about 1 MiB buffered here and four chunks queued.
#[derive(Debug)]
pub struct BlobWriter {
    client: Client,
    reference: Reference,
    location: Url,
    /// The registry names blobs (`Dvcr-Upload-Digest`).
    names_blobs: bool,
    /// The registry's digest after the body was sent, with the bytes it said it holds.
    named: Option<(Option<String>, Option<u64>)>,
    buffer: BytesMut,
    stream: Option<Streaming>,
    written: u64,
    finished: bool,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the registry names the blob (then [`BlobWriter::finish_named`] completes the
    /// upload and the caller need not hash what it writes).
    pub fn registry_names_blob(&self) -> bool {
        self.names_blobs
    }

    /// Starts the PATCH whose body is the channel.
    fn start_stream(&mut self) -> &Streaming {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(UPLOAD_CHUNKS);
        let (result_tx, result_rx) = std::sync::mpsc::sync_channel(1);
        let progress = Arc::new(Progress::new());
        let core = self.client.core();
        let r = self.reference.clone();
        let url = self.location.clone();
        let p = progress.clone();
        let task = self.client.handle().spawn(async move {
            let result = patch(&core, &r, url, rx, p).await;
            let _ = result_tx.send(result);
        });
        self.stream.insert(Streaming {
            chunks: tx,
            result: result_rx,
            task,
            progress,
        })
    }

    /// Queues one chunk, waiting while the queue is full.
    fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        if self.stream.is_none() {
            self.start_stream();
        }
        let Some(stream) = self.stream.as_ref() else {
            return Err(io::Error::other("the upload stream is gone"));
        };
        stream.progress.queued.fetch_add(1, Ordering::Relaxed);
        stream.progress.touch();
        // A blocking wait: writers run on blocking threads, never on the runtime.
        if stream.chunks.blocking_send(Ok(chunk)).is_ok() {
            return Ok(());
        }
        // The request ended early: its result says why.
        let e = match stream.result.recv() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => OciError::invalid(format!(
                "uploading to {}: the registry answered before the whole blob was sent",
                repo_view(&self.reference)
            )),
            Err(_) => OciError::transient(format!(
                "uploading to {}: the upload stopped unexpectedly",
                repo_view(&self.reference)
            )),
        };
        Err(e.into_io())
    }

    /// Completes the upload: the rest of the body, then `PUT ?digest=`. The registry
    /// verifies the digest; a mismatch is an [`super::OciErrorKind::Digest`] error.
    pub fn finish(mut self, digest: &str) -> Result<(), OciError> {
        let digest = parse_digest(digest).map_err(OciError::invalid)?;
        let what = format!(
            "completing the upload of {digest} ({} bytes) to {}",
            self.written,
            repo_view(&self.reference)
        );
        let session = self.send_rest(&what)?;
        self.complete(session, digest, what)
    }

    /// Completes the upload under the digest the registry gives for the bytes it received
    /// (only when [`BlobWriter::registry_names_blob`]); returns that digest. Fails when the
    /// registry does not name them or says it holds another number of bytes than were sent.
    pub fn finish_named(mut self) -> Result<String, OciError> {
        let what = format!(
            "completing the upload of {} bytes to {}",
            self.written,
            repo_view(&self.reference)
        );
        if !self.names_blobs {
            return Err(OciError::invalid(format!(
                "{what}: the registry does not name uploaded blobs (no Dvcr-Upload-Digest)"
            )));
        }
        let session = self.send_rest(&what)?;
        let (digest, received) = match self.named.take() {
            Some(answer) => answer,
            // Nothing was sent: the session is as new.
            None => (Some(EMPTY_SHA256.to_owned()), Some(0)),
        };
        let Some(digest) = digest else {
            return Err(OciError::invalid(format!(
                "{what}: the registry answered without Dvcr-Upload-Digest; nothing was published"
            )));
        };
        if received != Some(self.written) {
            let held = received.map_or_else(|| "no Range".to_owned(), |n| format!("{n} bytes"));
            return Err(OciError::transient(format!(
                "{what}: the registry holds {held} of the {} sent; nothing was published, try again",
                self.written
            )));
        }
        self.complete(session, digest.clone(), what)?;
        Ok(digest)
    }

    /// Sends what is buffered and ends the body: the session's next location.
    fn send_rest(&mut self, what: &str) -> Result<Url, OciError> {
        if !self.buffer.is_empty() {
            let rest = self.buffer.split().freeze();
            self.send(rest)
                .map_err(|e| OciError::from_io_error(e, what))?;
        }
        let session = match self.stream.take() {
            Some(stream) => {
                stream.progress.closed.store(true, Ordering::Relaxed);
                stream.progress.touch();
                drop(stream.chunks);
                let result = stream.result.recv().unwrap_or_else(|_| {
                    Err(OciError::transient(format!(
                        "{what}: the upload stopped unexpectedly"
                    )))
                });
                match result {
                    Ok(patched) => {
                        self.named = Some((patched.digest, patched.received));
                        patched.location
                    }
                    Err(e) => {
                        // The session may still exist: Drop cancels it.
                        return Err(e);
                    }
                }
            }
            None => self.location.clone(),
        };
        self.location = session.clone();
        Ok(session)
    }

    /// `PUT ?digest=` on the session.
    fn complete(&mut self, session: Url, digest: String, what: String) -> Result<(), OciError> {
        let core = self.client.core();
        let r = self.reference.clone();
        let d = digest.clone();
        let w = what.clone();
        self.client.run(async move {
            let call = Call::new(
                Method::PUT,
                with_digest(session, &d),
                vec![push_scope(&r.repository)],
            )
            .body(Bytes::new());
            let resp = core
                .send_slow(&r.registry, &call)
                .await
                .map_err(|e| e.context(&w))?;
            if !resp.status().is_success() {
                return Err(core.status_error(resp, &w, &r.registry).await);
            }
            check_answered_digest(resp.headers(), &d, &w)
        })?;
        self.finished = true;
        tracing::debug!(digest = %digest, bytes = self.written, repository = %repo_view(&self.reference), "blob uploaded");
        Ok(())
    }

    /// Stops the upload and cancels the session (best effort), waiting for the DELETE.
    pub fn abort(mut self) {
        self.cancel(true);
    }

    fn cancel(&mut self, wait: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(stream) = self.stream.take() {
            stream.task.abort();
        }
        let core = self.client.core();
        let r = self.reference.clone();
        let session = self.location.clone();
        if wait {
            let _ = self.client.run(async move {
                cancel_session(&core, &r, session).await;
                Ok(())
            });
        } else {
            self.client.handle().spawn(async move {
                cancel_session(&core, &r, session).await;
            });
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.cancel(false);
    }
}

impl BlobWriter {
    /// Sends `chunk` as it is (after anything buffered): no copy, for callers that read into
    /// buffers of their own and give them away.
    pub fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::other(
                "the upload is already finished or aborted",
            ));
        }
        if !self.buffer.is_empty() {
            let rest = self.buffer.split().freeze();
            self.send(rest)?;
        }
        let len = chunk.len() as u64;
        if len > 0 {
            self.send(chunk)?;
        }
        self.written += len;
        Ok(())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.finished {
            return Err(io::Error::other(
                "the upload is already finished or aborted",
            ));
        }
        self.buffer.extend_from_slice(buf);
        while self.buffer.len() >= UPLOAD_CHUNK {
            let chunk = self.buffer.split_to(UPLOAD_CHUNK).freeze();
            self.send(chunk)?;
        }
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            let chunk = self.buffer.split().freeze();
            self.send(chunk)?;
        }
        Ok(())
    }
}

/// A streamed PATCH's answer.
#[derive(Debug)]
struct Patched {
    /// Where the session goes on.
    location: Url,
    /// `Dvcr-Upload-Digest`, if given.
    digest: Option<String>,
    /// The bytes the session holds by its `Range` (`0-<last>`), if given.
    received: Option<u64>,
}

/// The number of bytes a session's `Range: 0-<last>` says it holds (a non-empty session:
/// `0-0` is one byte here).
fn range_received(headers: &HeaderMap) -> Option<u64> {
    let text = header_text(headers, "range")?.trim();
    let text = text.strip_prefix("bytes=").unwrap_or(text);
    let (first, last) = text.split_once('-')?;
    if first.trim() != "0" {
        return None;
    }
    last.trim().parse::<u64>().ok()?.checked_add(1)
}

/// The streamed PATCH: the channel is the body; returns the next location.
async fn patch(
    core: &Core,
    r: &Reference,
    url: Url,
    chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    progress: Arc<Progress>,
) -> Result<Patched, OciError> {
    let what = format!("uploading a blob to {}", repo_view(r));
    let p = progress.clone();
    // Chunks go out in frames of 64 KiB, so the watchdog sees progress on a slow link too;
    // a chunk counts as taken once its last frame is.
    let state = (chunks, p, Bytes::new());
    let body = futures_util::stream::unfold(state, |(mut rx, p, mut current)| async move {
        if current.is_empty() {
            match rx.recv().await? {
                Ok(chunk) => current = chunk,
                Err(e) => return Some((Err(e), (rx, p, current))),
            }
        }
        let frame = current.split_to(current.len().min(FRAME));
        if current.is_empty() {
            p.taken.fetch_add(1, Ordering::Relaxed);
        }
        p.touch();
        Some((Ok(frame), (rx, p, current)))
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let scopes = [push_scope(&r.repository)];
    let send = core.send_stream(
        &r.registry,
        Method::PATCH,
        url.clone(),
        &scopes,
        headers,
        reqwest::Body::wrap_stream(body),
    );
    tokio::pin!(send);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let resp = loop {
        tokio::select! {
            resp = &mut send => break resp.map_err(|e| e.context(&what))?,
            _ = tick.tick() => {
                if let Some(why) = progress.stalled() {
                    return Err(OciError::transient(format!("{what}: {why}; try again later")));
                }
            }
        }
    };
    if !resp.status().is_success() {
        return Err(core.status_error(resp, &what, &r.registry).await);
    }
    Ok(Patched {
        location: location(&resp, &url, &what)?,
        digest: named_digest(resp.headers()),
        received: range_received(resp.headers()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_appended_to_a_location_with_or_without_a_query() {
        let u = |s: &str| Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            with_digest(u("http://r/v2/a/blobs/uploads/x"), &d).as_str(),
            format!("http://r/v2/a/blobs/uploads/x?digest={d}")
        );
        assert_eq!(
            with_digest(u("http://r/v2/a/blobs/uploads/x?_state=abc"), &d).as_str(),
            format!("http://r/v2/a/blobs/uploads/x?_state=abc&digest={d}")
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                *k,
                HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}")),
            );
        }
        h
    }

    #[test]
    fn a_session_range_counts_the_bytes_the_registry_holds() {
        assert_eq!(range_received(&headers(&[("range", "0-1023")])), Some(1024));
        assert_eq!(
            range_received(&headers(&[("range", "bytes=0-9")])),
            Some(10)
        );
        assert_eq!(range_received(&headers(&[("range", "5-9")])), None);
        assert_eq!(range_received(&headers(&[("range", "0-x")])), None);
        assert_eq!(range_received(&headers(&[])), None);
    }

    #[test]
    fn only_a_well_formed_sha256_upload_digest_names_a_blob() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(named_digest(&headers(&[(UPLOAD_DIGEST, &d)])), Some(d));
        let short = format!("sha256:{}", "ab".repeat(31));
        assert_eq!(named_digest(&headers(&[(UPLOAD_DIGEST, &short)])), None);
        let other = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(named_digest(&headers(&[(UPLOAD_DIGEST, &other)])), None);
        assert_eq!(named_digest(&headers(&[])), None);
    }

    #[test]
    fn the_empty_digest_constant_is_the_hash_of_nothing() {
        assert_eq!(Hasher::digest_like("sha256:", b""), EMPTY_SHA256);
    }
}
