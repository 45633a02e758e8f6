//! The per-image upload server: the routes, the one upload slot, and the importer
//! pipeline fed from the request bodies.
//!
//! One server receives one image. The first accepted request creates the upload: a spool
//! (the in-memory queue of received bytes) and an importer pipeline (on its own thread)
//! reading it as bytes arrive. Requests after a broken connection resume it where it
//! stopped; a request while bytes are flowing gets 503; once the image is stored every
//! upload gets 409. See the crate docs for the protocol.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use dvcr_importer::checksum::Expected;
use dvcr_importer::oci::{Reference, RegistryOptions};
use dvcr_importer::report::{FinalReport, Progress};
use dvcr_importer::{Destination, DiskFormat, ErrorKind, ImportError, Job, Outcome, Source};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

use crate::multipart::{self, FilePart};
use crate::spool::Spool;
use crate::token::{Claims, Signer};

/// The header carrying how many bytes of the upload were received.
pub const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
/// The header carrying the upload's total size, once known.
pub const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
/// Where uploaded images go.
#[derive(Debug, Clone)]
pub enum Target {
    /// DVCR: `<registry>/<token destination>`.
    Registry {
        /// `host:port` of the registry.
        registry: String,
        /// TLS and credentials.
        options: RegistryOptions,
    },
    /// A disk file or block device (or a directory, then `disk.img` inside it).
    Disk(PathBuf),
}

/// The server's settings.
#[derive(Debug)]
pub struct Config {
    /// Checks upload tokens.
    pub signer: Signer,
    /// Where the image goes.
    pub target: Target,
    /// Checksums the uploaded bytes must have.
    pub checksums: Vec<Expected>,
    /// Largest accepted upload in bytes.
    pub max_size: Option<u64>,
    /// Where scratch data goes: a compressed upload (unknown unpacked size) is measured
    /// there before it is stored, as any import of one is.
    pub spool_dir: PathBuf,
    /// Where the final report goes.
    pub termination_log: Option<PathBuf>,
    /// How long to wait for an upload to start before failing.
    pub wait_timeout: Option<Duration>,
}

/// Where the image is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// No upload has started yet.
    WaitForUserUpload,
    /// Bytes are arriving or being stored.
    Provisioning,
    /// The image is stored.
    Ready,
    /// The upload failed; `error` says why.
    Failed,
}

impl Phase {
    fn is_final(self) -> bool {
        matches!(self, Phase::Ready | Phase::Failed)
    }
}

/// What `GET /status` answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// Percent of the upload read by the pipeline (0 while the size is unknown).
    pub progress: f64,
    /// Bytes of the image as stored once ready; bytes received so far before that.
    pub stored: u64,
    /// The unpacked (virtual) size once ready, else 0.
    pub unpacked: u64,
    /// Bytes received from the client.
    pub received: u64,
    /// The image format once known.
    pub format: Option<String>,
    /// True for ISO images.
    pub cdrom: bool,
    /// Why the upload failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct Failure {
    status: StatusCode,
    message: String,
}

#[derive(Debug)]
struct Upload {
    destination: String,
    spool: Arc<Spool>,
    total: Option<u64>,
    /// A request is writing (or the upload is complete and being stored).
    active: bool,
    multipart: bool,
    /// Requests that wrote to this upload so far (to tell a later break-off apart).
    requests: u64,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    upload: Option<Upload>,
    outcome: Option<Outcome>,
    failure: Option<Failure>,
    /// The pipeline's result is recorded and the report written.
    settled: bool,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    inner: Mutex<Inner>,
    progress: Arc<Progress>,
    changed: watch::Sender<u64>,
    exit: watch::Sender<bool>,
}

/// The server's state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Uploader(Arc<Shared>);

fn text(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

fn with_offset(mut response: Response, offset: u64) -> Response {
    response
        .headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    response
}

/// A refused request: a status, a message for the user, and the offset to resume from
/// when that helps.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
    offset: Option<u64>,
}

fn refusal(status: StatusCode, message: impl std::fmt::Display) -> Refusal {
    Refusal {
        status,
        message: message.to_string(),
        offset: None,
    }
}

impl Refusal {
    fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let r = text(self.status, self.message);
        match self.offset {
            Some(o) => with_offset(r, o),
            None => r,
        }
    }
}

fn status_of(e: &ImportError) -> StatusCode {
    match e.kind {
        ErrorKind::Checksum | ErrorKind::Image => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Source => StatusCode::BAD_REQUEST,
        ErrorKind::Config => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Destination => StatusCode::BAD_GATEWAY,
    }
}

/// A parsed `Content-Range: bytes START-END/TOTAL` (END and TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    end: Option<u64>,
    total: Option<u64>,
}

fn parse_content_range(value: &str) -> Result<ContentRange, String> {
    let bad = |why: &str| {
        format!(
            "Content-Range {value:?} {why}; write it as `bytes N-*/*` or `bytes N-M/TOTAL` with N the Upload-Offset from `curl -I URL`"
        )
    };
    let rest = value
        .trim()
        .strip_prefix("bytes ")
        .ok_or_else(|| bad("does not start with `bytes `"))?;
    let (span, total) = rest.split_once('/').ok_or_else(|| bad("has no `/`"))?;
    let (start, end) = span.split_once('-').ok_or_else(|| bad("has no `-`"))?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad("has a bad number"));
    let start = num(start)?;
    let end = match end.trim() {
        "*" => None,
        e => Some(num(e)?),
    };
    let total = match total.trim() {
        "*" => None,
        t => Some(num(t)?),
    };
    if let Some(e) = end {
        if e < start {
            return Err(bad("ends before it starts"));
        }
        if let Some(t) = total
            && e >= t
        {
            return Err(bad("ends beyond the total"));
        }
    }
    Ok(ContentRange { start, end, total })
}

/// Clears `active` when a request stops writing, unless it completed the upload; an
/// upload left incomplete fails if it is not resumed within `--wait-timeout`.
struct ActiveGuard(Uploader);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        let Some(u) = &mut inner.upload else {
            return;
        };
        if u.spool.is_complete() {
            return;
        }
        u.active = false;
        let requests = u.requests;
        drop(inner);
        let Some(timeout) = self.0.0.config.wait_timeout else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.0.clone();
        runtime.spawn(async move {
            tokio::time::sleep(timeout).await;
            let abandoned = {
                let inner = this.lock();
                inner.phase == Phase::Provisioning
                    && inner
                        .upload
                        .as_ref()
                        .is_some_and(|u| !u.active && u.requests == requests)
            };
            if abandoned {
                let _ = this.fail(
                    StatusCode::GONE,
                    format!(
                        "the upload broke off and was not resumed within {}s (--wait-timeout); start a new upload",
                        timeout.as_secs()
                    ),
                );
            }
        });
    }
}

impl Uploader {
    /// A server in `WaitForUserUpload`.
    pub fn new(config: Config) -> Self {
        Self(Arc::new(Shared {
            config,
            inner: Mutex::new(Inner {
                phase: Phase::WaitForUserUpload,
                upload: None,
                outcome: None,
                failure: None,
                settled: false,
            }),
            progress: Arc::new(Progress::new()),
            changed: watch::channel(0).0,
            exit: watch::channel(false).0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.0.changed.send_modify(|n| *n += 1);
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let inner = self.lock();
        let received = inner.upload.as_ref().map_or(0, |u| u.spool.received());
        let received = match (&inner.upload, inner.phase) {
            (Some(u), Phase::Ready) => u.total.unwrap_or(received),
            _ => received,
        };
        Status {
            phase: inner.phase,
            progress: if inner.phase == Phase::Ready {
                100.0
            } else {
                self.0.progress.percent()
            },
            stored: inner.outcome.as_ref().map_or(received, |o| o.stored_size),
            unpacked: inner.outcome.as_ref().map_or(0, |o| o.virtual_size),
            received,
            format: inner.outcome.as_ref().map(|o| o.format.clone()),
            cdrom: inner.outcome.as_ref().is_some_and(|o| o.cdrom),
            error: inner.failure.as_ref().map(|f| f.message.clone()),
        }
    }

    /// Resolves when the server should stop: no upload started within the wait timeout
    /// (the report is written by then).
    pub async fn exit_requested(&self) {
        let mut rx = self.0.exit.subscribe();
        let _ = rx.wait_for(|&exit| exit).await;
    }

    /// Starts the `--wait-timeout` clock (call once, inside the runtime).
    pub fn spawn_wait_timeout(&self) {
        let Some(timeout) = self.0.config.wait_timeout else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let failed = {
                let mut inner = this.lock();
                if inner.phase == Phase::WaitForUserUpload && inner.upload.is_none() {
                    inner.phase = Phase::Failed;
                    inner.failure = Some(Failure {
                        status: StatusCode::GONE,
                        message: format!(
                            "no upload started within {}s (--wait-timeout); ask for a new upload",
                            timeout.as_secs()
                        ),
                    });
                    true
                } else {
                    false
                }
            };
            if failed {
                tracing::error!(
                    seconds = timeout.as_secs(),
                    "no upload started in time; exiting"
                );
                this.write_report(None).await;
                this.notify();
                this.0.exit.send_replace(true);
            }
        });
    }

    /// Marks the upload failed (keeping an earlier failure) and stops the pipeline.
    fn fail(&self, status: StatusCode, message: String) -> Response {
        let mut inner = self.lock();
        if !inner.phase.is_final() {
            inner.phase = Phase::Failed;
            inner.failure = Some(Failure {
                status,
                message: message.clone(),
            });
        }
        if let Some(u) = &inner.upload {
            u.spool.fail(message.clone());
        }
        drop(inner);
        tracing::warn!(%status, error = %message, "the upload failed");
        self.notify();
        text(status, message)
    }

    /// [`Uploader::fail`], then waits (a bounded time) for the pipeline to stop and the
    /// final report to be written, so the answer, the status and the report agree.
    async fn fail_settled(&self, status: StatusCode, message: String) -> Response {
        let response = self.fail(status, message);
        let mut rx = self.0.changed.subscribe();
        let wait = async {
            loop {
                {
                    let inner = self.lock();
                    if inner.settled || inner.upload.is_none() {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .is_err()
        {
            tracing::warn!("the import did not stop within 60s after the upload failed");
        }
        response
    }

    fn failure_response(&self) -> Option<Response> {
        let inner = self.lock();
        match (inner.phase, &inner.failure) {
            (Phase::Failed, Some(f)) => Some(text(f.status, &f.message)),
            _ => None,
        }
    }

    fn destination_for(&self, claims: &Claims) -> Result<Destination, Refusal> {
        match &self.0.config.target {
            Target::Disk(path) => Ok(Destination::Disk {
                path: path.clone(),
                format: DiskFormat::Raw,
                size: None,
                target_is_zero: false,
            }),
            Target::Registry { registry, options } => {
                let reference = Reference::parse(&format!("{registry}/{}", claims.destination))
                    .map_err(|e| {
                        refusal(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "the upload URL's destination {:?} is not an image name: {e}",
                                claims.destination
                            ),
                        )
                    })?;
                Ok(Destination::Registry {
                    reference,
                    options: options.clone(),
                })
            }
        }
    }

    /// Starts the pipeline reading `spool` on its own thread.
    fn start_pipeline(&self, spool: Arc<Spool>, destination: Destination, length: Option<u64>) {
        let config = &self.0.config;
        let mut job = Job::new(
            Source::Reader {
                reader: Box::new(spool.reader()),
                length,
                name: "the upload".into(),
            },
            destination,
        );
        job.checksums = config.checksums.clone();
        job.scratch_dir = Some(config.spool_dir.clone());
        job.progress = Arc::clone(&self.0.progress);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("upload-import".into())
            .spawn(move || {
                let _ = tx.send(dvcr_importer::run(job));
            });
        let this = self.clone();
        if let Err(e) = spawned {
            let message = format!("cannot start the import thread: {e}");
            let _ = this.fail(StatusCode::INTERNAL_SERVER_ERROR, message.clone());
            tokio::spawn(async move { this.settle(Err(ImportError::config(message))).await });
            return;
        }
        tokio::spawn(async move {
            let result = rx.await.unwrap_or_else(|_| {
                Err(ImportError::new(
                    ErrorKind::Config,
                    true,
                    "the import thread stopped without an answer (it panicked)",
                ))
            });
            this.settle(result).await;
        });
    }

    /// Records the pipeline's result and writes the report.
    async fn settle(&self, result: Result<Outcome, ImportError>) {
        {
            let mut inner = self.lock();
            match &result {
                Ok(outcome) if inner.phase != Phase::Failed => {
                    inner.phase = Phase::Ready;
                    inner.outcome = Some(outcome.clone());
                    tracing::info!(?outcome, "the upload is stored");
                }
                Ok(_) => {}
                Err(e) => {
                    if inner.phase != Phase::Failed {
                        inner.phase = Phase::Failed;
                        inner.failure = Some(Failure {
                            status: status_of(e),
                            message: e.to_string(),
                        });
                    }
                    tracing::error!(error = %e, kind = e.kind.name(), "the upload failed");
                }
            }
        }
        self.write_report(result.ok()).await;
        self.lock().settled = true;
        self.notify();
    }

    async fn write_report(&self, outcome: Option<Outcome>) {
        let Some(path) = self.0.config.termination_log.clone() else {
            return;
        };
        let progress = &self.0.progress;
        let mut report = FinalReport {
            duration: u64::try_from(progress.elapsed().as_nanos()).unwrap_or(u64::MAX),
            average_speed: progress.average_speed(),
            bytes_read: progress.read(),
            ..FinalReport::default()
        };
        match outcome {
            Some(o) => {
                report.source_image_size = o.stored_size;
                report.source_image_virtual_size = o.virtual_size;
                report.source_image_format = o.format;
                report.cdrom = o.cdrom;
                report.scratch_bytes = o.scratch_bytes;
                report.destination = o.destination;
            }
            None => report.error_message = self.lock().failure.as_ref().map(|f| f.message.clone()),
        }
        let written = tokio::task::spawn_blocking(move || report.write_to(&path)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the final report"),
            Err(e) => tracing::error!(error = %e, "cannot write the final report"),
        }
    }

    async fn wait_final(&self) -> Response {
        let mut rx = self.0.changed.subscribe();
        loop {
            {
                let inner = self.lock();
                match inner.phase {
                    Phase::Ready => break,
                    Phase::Failed => {
                        let f = inner.failure.clone().unwrap_or(Failure {
                            status: StatusCode::INTERNAL_SERVER_ERROR,
                            message: "the upload failed".into(),
                        });
                        return text(f.status, f.message);
                    }
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        let body = serde_json::to_string(&self.status()).unwrap_or_default();
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body}\n"),
        )
            .into_response()
    }

    fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        self.0
            .config
            .signer
            .verify(token, SystemTime::now())
            .map_err(|e| {
                let status = if e.is_unauthenticated() {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::FORBIDDEN
                };
                tracing::warn!(%status, error = %e, "refused an upload URL");
                refusal(status, e)
            })
    }

    /// Claims the upload slot for a request starting at `start`; returns the spool and
    /// whether the upload is new.
    fn claim(
        &self,
        claims: &Claims,
        start: u64,
        total: Option<u64>,
        multipart: bool,
    ) -> Result<(Arc<Spool>, bool), Refusal> {
        let mut inner = self.lock();
        match inner.phase {
            Phase::Ready => {
                return Err(refusal(
                    StatusCode::CONFLICT,
                    "the image was already uploaded and stored; nothing more is accepted here",
                ));
            }
            Phase::Failed => {
                let why = inner
                    .failure
                    .as_ref()
                    .map_or("unknown", |f| f.message.as_str());
                return Err(refusal(
                    StatusCode::CONFLICT,
                    format!("this upload already failed ({why}); start a new upload"),
                ));
            }
            _ => {}
        }
        match &mut inner.upload {
            Some(u) if u.active => Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "another upload to this URL is running; wait for it, or resume after it broke off (`curl -I URL` shows how much arrived)",
            )),
            Some(u) if u.destination != claims.destination => Err(refusal(
                StatusCode::CONFLICT,
                format!(
                    "this server is receiving the image {}; it takes one image only",
                    u.destination
                ),
            )),
            Some(u) => {
                let received = u.spool.received();
                if start != received {
                    return Err(refusal(
                            StatusCode::RANGE_NOT_SATISFIABLE,
                            format!(
                                "{received} bytes have arrived; send the rest from there: `curl -C {received} -T FILE URL` (Content-Range: bytes {received}-*/*)"
                            ),
                        )
                    .at(received));
                }
                if multipart || u.multipart {
                    return Err(refusal(
                            StatusCode::RANGE_NOT_SATISFIABLE,
                            "a multipart upload cannot be resumed; send the file as a raw body (`curl -C N -T FILE URL`)",
                        )
                    .at(received));
                }
                if let (Some(a), Some(b)) = (u.total, total)
                    && a != b
                {
                    return Err(refusal(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the upload was announced as {a} bytes, this request says {b}; resume the same file"
                        ),
                    ));
                }
                u.total = u.total.or(total);
                u.active = true;
                u.requests += 1;
                Ok((Arc::clone(&u.spool), false))
            }
            None => {
                if start != 0 {
                    return Err(refusal(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "nothing has arrived yet; send the file from byte 0",
                    )
                    .at(0));
                }
                let spool = Arc::new(Spool::new());
                inner.upload = Some(Upload {
                    destination: claims.destination.clone(),
                    spool: Arc::clone(&spool),
                    total,
                    active: true,
                    multipart,
                    requests: 1,
                });
                inner.phase = Phase::Provisioning;
                Ok((spool, true))
            }
        }
    }

    async fn receive(&self, token: &str, headers: &HeaderMap, body: Body) -> Response {
        // The token is checked before a byte of the body is read: a refused client that
        // sent `Expect: 100-continue` never sends it at all.
        let claims = match self.verify(token) {
            Ok(c) => c,
            Err(r) => return r.into_response(),
        };
        let header_text = |name: HeaderName| -> Result<Option<String>, Refusal> {
            match headers.get(&name) {
                None => Ok(None),
                Some(v) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
                    refusal(
                        StatusCode::BAD_REQUEST,
                        format!("the {name} header is not text"),
                    )
                }),
            }
        };
        let parsed = (|| {
            let length = match header_text(header::CONTENT_LENGTH)? {
                None => None,
                Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                    refusal(
                        StatusCode::BAD_REQUEST,
                        "the Content-Length is not a number",
                    )
                })?),
            };
            let range = match header_text(header::CONTENT_RANGE)? {
                None => None,
                Some(v) => {
                    Some(parse_content_range(&v).map_err(|e| refusal(StatusCode::BAD_REQUEST, e))?)
                }
            };
            let boundary = match header_text(header::CONTENT_TYPE)?
                .as_deref()
                .and_then(multipart::boundary)
            {
                None => None,
                Some(b) => Some(b.map_err(|e| refusal(StatusCode::BAD_REQUEST, e))?),
            };
            Ok::<_, Refusal>((length, range, boundary))
        })();
        let (length, range, boundary) = match parsed {
            Ok(p) => p,
            Err(r) => return r.into_response(),
        };
        if boundary.is_some() && range.is_some() {
            return text(
                StatusCode::BAD_REQUEST,
                "a multipart body cannot carry a Content-Range; resume with a raw body (`curl -C N -T FILE URL`)",
            );
        }
        if let (Some(r), Some(len)) = (range, length)
            && let Some(end) = r.end
        {
            // `end >= start` was checked; the span is at most u64::MAX + 1 bytes.
            let span = end - r.start;
            if span.checked_add(1) != Some(len) {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the Content-Range covers bytes {}-{end} but the Content-Length is {len}; send exactly the bytes the range names",
                        r.start
                    ),
                )
                .into_response();
            }
        }
        let start = range.map_or(0, |r| r.start);
        let total = match (range, &boundary) {
            (Some(r), _) => r.total,
            (None, Some(_)) => None,
            (None, None) => length,
        };
        let max_size = self.0.config.max_size;
        if let (Some(max), Some(t)) = (max_size, total)
            && t > max
        {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is {t} bytes, more than the {max} bytes this URL accepts (--max-size)"
                ),
            );
        }
        let destination = match self.destination_for(&claims) {
            Ok(d) => d,
            Err(r) => return r.into_response(),
        };
        let (spool, new) = match self.claim(&claims, start, total, boundary.is_some()) {
            Ok(c) => c,
            Err(r) => return r.into_response(),
        };
        let _guard = ActiveGuard(self.clone());
        if total.is_some() {
            self.0.progress.set_total(total);
        }
        if new {
            tracing::info!(destination = %claims.destination, ?total, "an upload started");
            self.start_pipeline(Arc::clone(&spool), destination, total);
        } else {
            tracing::info!(destination = %claims.destination, offset = start, "an upload resumed");
        }
        self.stream_body(&spool, start, boundary, body).await
    }

    async fn stream_body(
        &self,
        spool: &Spool,
        start: u64,
        boundary: Option<String>,
        body: Body,
    ) -> Response {
        let max_size = self.0.config.max_size;
        let mut part = boundary.as_deref().map(FilePart::new);
        let mut extracted = Vec::new();
        let mut written = start;
        let mut stream = body.into_data_stream();
        let declared = self.lock().upload.as_ref().and_then(|u| u.total);
        loop {
            let chunk = match stream.next().await {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    // What was received stays with the pipeline, which waits for the rest.
                    let kept = written;
                    tracing::warn!(error = %e, received = kept, "the upload broke off; it can be resumed");
                    return with_offset(
                        text(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "the upload broke off after {kept} bytes ({e}); resume with `curl -C {kept} -T FILE URL`"
                            ),
                        ),
                        kept,
                    );
                }
            };
            if let Some(r) = self.failure_response() {
                return r;
            }
            let data: Bytes = match &mut part {
                Some(p) => {
                    extracted.clear();
                    if let Err(e) = p.push(&chunk, &mut extracted) {
                        return self
                            .fail_settled(StatusCode::BAD_REQUEST, e.to_string())
                            .await;
                    }
                    Bytes::copy_from_slice(&extracted)
                }
                None => chunk,
            };
            let next = written.saturating_add(data.len() as u64);
            if let Some(max) = max_size
                && next > max
            {
                return self.fail_settled(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the upload is larger than the {max} bytes this URL accepts (--max-size); nothing was stored"
                    ),
                )
                .await;
            }
            if let Some(t) = declared
                && next > t
            {
                return self
                    .fail_settled(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the body is longer than the {t} bytes announced; nothing was stored"
                        ),
                    )
                    .await;
            }
            if let Err(why) = spool.push(data).await {
                // The upload failed, or the pipeline stopped and is about to say why.
                if let Some(r) = self.failure_response() {
                    return r;
                }
                tracing::warn!(error = %why, "the received bytes were not taken");
                return self.wait_final().await;
            }
            written = next;
        }
        if let Some(p) = &part
            && !p.is_done()
        {
            return self
                .fail_settled(
                    StatusCode::BAD_REQUEST,
                    multipart::MultipartError::Incomplete.to_string(),
                )
                .await;
        }
        let total = {
            let mut inner = self.lock();
            match inner.upload.as_mut() {
                Some(u) => *u.total.get_or_insert(written),
                None => written,
            }
        };
        if written < total {
            // A part of a larger upload: acknowledge and wait for the next request.
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut()
                .insert(UPLOAD_OFFSET, HeaderValue::from(written));
            r.headers_mut()
                .insert(UPLOAD_LENGTH, HeaderValue::from(total));
            return r;
        }
        self.0.progress.set_total(Some(total));
        spool.complete();
        tracing::info!(bytes = total, "every byte arrived; storing the image");
        self.wait_final().await
    }

    fn offset_headers(&self) -> (u64, Option<u64>) {
        let inner = self.lock();
        match &inner.upload {
            None => (0, None),
            Some(u) if inner.phase == Phase::Ready => {
                (u.total.unwrap_or_else(|| u.spool.received()), u.total)
            }
            Some(u) => (u.spool.received(), u.total),
        }
    }
}

async fn upload(
    State(state): State<Uploader>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.receive(&token, &headers, body).await
}

async fn offset(State(state): State<Uploader>, Path(token): Path<String>) -> Response {
    if let Err(r) = state.verify(&token) {
        // HEAD answers carry no body; the status says enough.
        return r.status.into_response();
    }
    let (offset, total) = state.offset_headers();
    let mut r = StatusCode::OK.into_response();
    let h = r.headers_mut();
    h.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    if let Some(t) = total {
        h.insert(UPLOAD_LENGTH, HeaderValue::from(t));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn ready_with_token(State(state): State<Uploader>, Path(token): Path<String>) -> Response {
    match state.verify(&token) {
        Ok(_) => text(
            StatusCode::OK,
            "ready for an upload: PUT, POST or PATCH here",
        ),
        Err(r) => r.into_response(),
    }
}

fn status_json(state: &Uploader) -> Response {
    let body = serde_json::to_string(&state.status()).unwrap_or_default();
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("{body}\n"),
    )
        .into_response()
}

async fn status_with_token(State(state): State<Uploader>, Path(token): Path<String>) -> Response {
    match state.verify(&token) {
        Ok(_) => status_json(&state),
        Err(r) => r.into_response(),
    }
}

async fn status(State(state): State<Uploader>) -> Response {
    status_json(&state)
}

async fn ready() -> Response {
    text(StatusCode::OK, "ready")
}

async fn tokenless() -> Response {
    text(
        StatusCode::UNAUTHORIZED,
        "uploads need a signed URL (/upload/<token>); ask for one with `dvcr-uploader url --dest ...`",
    )
}

/// The upload routes: `GET /healthz`, `GET /upload` (readiness), `PUT|POST|PATCH|HEAD|GET
/// /upload/{token}`, `GET /upload/{token}/status`, `GET /status`.
pub fn router(state: Uploader) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/upload",
            get(ready).put(tokenless).post(tokenless).patch(tokenless),
        )
        .route(
            "/upload/{token}",
            get(ready_with_token)
                .head(offset)
                .put(upload)
                .post(upload)
                .patch(upload),
        )
        .route("/upload/{token}/status", get(status_with_token))
        .route("/status", get(status))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn content_ranges_are_parsed_and_checked() {
        assert_eq!(
            parse_content_range("bytes 10-*/*").unwrap(),
            ContentRange {
                start: 10,
                end: None,
                total: None
            }
        );
        assert_eq!(
            parse_content_range("bytes 10-19/20").unwrap(),
            ContentRange {
                start: 10,
                end: Some(19),
                total: Some(20)
            }
        );
        assert!(parse_content_range("bytes 10-9/20").is_err());
        assert!(parse_content_range("bytes 10-20/20").is_err());
        assert!(parse_content_range("10-20/30").is_err());
    }
}
