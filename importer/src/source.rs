//! Where image bytes come from, as the user names them: a path, `-` for standard input, or
//! an `http(s)://` URL, and the HTTP(S) client that fetches the last kind.
//!
//! Sources are blocking readers on purpose: decompression and decoding run on blocking
//! threads, and the HTTP client streams the body without buffering it. The HTTP side is built
//! for multi-gigabyte downloads over imperfect networks:
//!
//! - Timeouts are idle timeouts (no bytes for a while), never a total timeout.
//! - A body that breaks off (dropped connection, stall, early end) is resumed with a `Range`
//!   request where the server allows it, instead of starting over or, worse, ending short.
//! - Redirects are followed by hand, so the user's credentials can go along on every hop
//!   and a downgrade from https to plain http is refused.
//! - Extra CA certificates come from a directory (a mounted Kubernetes secret or config map).
//!
//! Errors say whether trying again later may help ([`SourceError::is_transient`]).

use std::borrow::Cow;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use dvcr_formats::View;
use dvcr_formats::view::check_range;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::mpsc as async_mpsc;

use crate::error::{cause, chain};

/// How long a connection may stay silent before the transfer is abandoned (or resumed).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many redirects an HTTP source follows.
pub const MAX_REDIRECTS: usize = 10;
/// How many times in a row a broken download is resumed without new bytes arriving.
pub const RESUME_ATTEMPTS: u32 = 5;

/// The first pause before a resume attempt; it doubles with every failed attempt.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest pause between resume attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// CA files are a few kilobytes; anything this large is not one.
const CA_FILE_LIMIT: u64 = 4 << 20;
/// Chunks buffered between the transfer thread and the reader.
const CHANNEL_CHUNKS: usize = 64;

/// Why a source could not be opened or read.
///
/// Read errors of an [`HttpBody`] carry one of these inside the [`io::Error`];
/// [`SourceError::find_in`] digs it out again.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The location is neither a path, `-`, nor a usable http(s) URL, or the client could
    /// not be set up.
    #[error("{0}")]
    Invalid(String),
    /// The HTTP server answered with an error status.
    #[error("{url} answered HTTP {status}{hint}")]
    HttpStatus {
        /// The URL that answered (after redirects).
        url: String,
        /// The status code.
        status: u16,
        /// What the user can do.
        hint: &'static str,
    },
    /// The HTTP request failed before an answer (DNS, connection refused or reset).
    #[error("fetching {url} failed: {detail}; check the address and the network, then try again")]
    Http {
        /// The URL asked for.
        url: String,
        /// What went wrong, with its causes.
        detail: String,
    },
    /// The TLS handshake failed, usually because the server's certificate is not trusted.
    #[error(
        "the TLS connection to {url} failed: {detail}; if the server's certificate comes from a \
         private CA, put that CA's PEM certificate in the CA certificate directory"
    )]
    Tls {
        /// The URL asked for.
        url: String,
        /// What went wrong, with its causes.
        detail: String,
    },
    /// A file in the CA certificate directory cannot be used.
    #[error("cannot use {} as extra CA certificates: {detail}", path.display())]
    CaCertificates {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it and what to do.
        detail: String,
    },
    /// The server redirected more often than allowed.
    #[error(
        "too many redirects ({max}) starting at {url}: the server redirects in a loop or \
         through too many hops; check the URL"
    )]
    TooManyRedirects {
        /// The redirect limit.
        max: usize,
        /// The URL the chain started at.
        url: String,
    },
    /// A redirect that is not followed: no usable `Location`, another scheme, or a
    /// downgrade from https to plain http.
    #[error("not following the redirect from {url}: {detail}")]
    Redirect {
        /// The URL that answered with the redirect.
        url: String,
        /// Why the redirect is refused.
        detail: String,
    },
    /// No bytes arrived for the idle timeout, and the download could not be resumed.
    #[error(
        "no data from {url} for {} s after {received} bytes{}{resume}; the server or the \
         network stalled, try again later",
        .idle.as_secs_f32(),
        of_total(*.expected)
    )]
    IdleTimeout {
        /// The URL that went silent.
        url: String,
        /// The idle timeout that ran out.
        idle: Duration,
        /// Body bytes that had arrived.
        received: u64,
        /// The body's full length, when known.
        expected: Option<u64>,
        /// Why resuming did not help (empty when it was not tried).
        resume: String,
    },
    /// The body broke off and could not be resumed. Never reported as a clean end.
    #[error(
        "the download of {url} broke off after {received} bytes{}: {detail}; try again later",
        of_total(*.expected)
    )]
    Broken {
        /// The URL the body came from.
        url: String,
        /// Body bytes that had arrived.
        received: u64,
        /// The body's full length, when known.
        expected: Option<u64>,
        /// What happened, and why resuming did not help.
        detail: String,
    },
}

fn of_total(expected: Option<u64>) -> String {
    expected.map(|t| format!(" of {t}")).unwrap_or_default()
}

impl SourceError {
    /// Whether retrying later may help (network trouble, server errors, stalls and broken
    /// transfers), as opposed to a request that will fail the same way again (a missing
    /// resource, refused credentials, a redirect loop, a bad URL, an untrusted certificate).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::HttpStatus { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            SourceError::Http { .. }
            | SourceError::IdleTimeout { .. }
            | SourceError::Broken { .. } => true,
            SourceError::Invalid(_)
            | SourceError::Tls { .. }
            | SourceError::CaCertificates { .. }
            | SourceError::TooManyRedirects { .. }
            | SourceError::Redirect { .. } => false,
        }
    }

    /// The source error somewhere in `err`'s chain, such as the one inside an
    /// [`io::Error`] from [`HttpBody::read`], so callers can ask [`Self::is_transient`].
    pub fn find_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a SourceError> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<SourceError>() {
                return Some(found);
            }
            next = cause(e);
        }
        None
    }

    /// The I/O error kind a read failing with this error reports.
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            SourceError::IdleTimeout { .. } => io::ErrorKind::TimedOut,
            SourceError::Broken { .. } => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        }
    }

    fn into_io(self) -> io::Error {
        io::Error::new(self.io_kind(), self)
    }
}

/// A place image bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A file or block device.
    Path(PathBuf),
    /// Standard input.
    Stdin,
    /// An http or https URL.
    Http(String),
}

impl Location {
    /// Parses what the user typed: `-`, an `http://` or `https://` URL, or a path.
    pub fn parse(spec: &str) -> Result<Self, SourceError> {
        if spec == "-" {
            return Ok(Location::Stdin);
        }
        let lower = spec.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Ok(Location::Http(spec.to_owned()));
        }
        if let Some((scheme, _)) = spec.split_once("://") {
            return Err(SourceError::Invalid(format!(
                "unsupported source scheme {scheme}:// in {spec}; give a file path, - for standard input, or an http(s) URL"
            )));
        }
        Ok(Location::Path(PathBuf::from(spec)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Stdin => f.write_str("standard input"),
            Location::Http(u) => f.write_str(u),
        }
    }
}

/// How HTTP(S) sources are fetched.
#[derive(Clone)]
pub struct HttpOptions {
    /// User name and password sent as HTTP Basic auth, on every hop of a redirect chain.
    pub basic_auth: Option<(String, String)>,
    /// A directory whose PEM certificates are trusted in addition to the built-in roots
    /// (files named `*.crt`, `*.pem`, `*.cer` must hold certificates; other files are used
    /// when they do and skipped otherwise).
    pub ca_dir: Option<PathBuf>,
    /// Accept any server certificate. Only for servers the user controls.
    pub insecure_tls: bool,
    /// How long the server may send nothing (no answer, no body bytes) before the transfer
    /// counts as stalled. There is no limit on the whole transfer.
    pub idle_timeout: Duration,
    /// How many redirects are followed.
    pub max_redirects: usize,
    /// How many resume attempts in a row are made after the body breaks off, before the
    /// read fails; the count starts again whenever new bytes arrive.
    pub resume_attempts: u32,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            basic_auth: None,
            ca_dir: None,
            insecure_tls: false,
            idle_timeout: IDLE_TIMEOUT,
            max_redirects: MAX_REDIRECTS,
            resume_attempts: RESUME_ATTEMPTS,
        }
    }
}

impl fmt::Debug for HttpOptions {
    // The password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOptions")
            .field(
                "basic_auth",
                &self
                    .basic_auth
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("ca_dir", &self.ca_dir)
            .field("insecure_tls", &self.insecure_tls)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_redirects", &self.max_redirects)
            .field("resume_attempts", &self.resume_attempts)
            .finish()
    }
}

/// An HTTP response body as a blocking reader.
///
/// The transfer runs on its own thread with a small async runtime (the HTTP client is
/// async); chunks reach the reader over a bounded channel, so a slow consumer slows the
/// download instead of growing memory. A break in the body is resumed on that thread, out
/// of the reader's sight; what the reader sees is either every byte or an error, never a
/// short body that looks complete.
///
/// Read it from a plain thread (or `spawn_blocking`), never from async code: reads block.
#[derive(Debug)]
pub struct HttpBody {
    url: String,
    chunks: async_mpsc::Receiver<Message>,
    current: Bytes,
    delivered: u64,
    finished: Finished,
    resumes: Arc<AtomicU32>,
    /// `Content-Length`, when the server sent one.
    pub length: Option<u64>,
    /// The server said it answers `Range` requests for this resource (`Accept-Ranges:
    /// bytes`), at the URL it finally answered from (after redirects).
    pub ranges_at: Option<String>,
}

/// What the transfer thread sends the reader.
#[derive(Debug)]
enum Message {
    Chunk(Bytes),
    /// Every byte was sent.
    End,
    /// The transfer failed for good.
    Failed(SourceError),
}

/// How the body ended, for reads after the end.
#[derive(Debug)]
enum Finished {
    No,
    Complete,
    Failed(io::ErrorKind, String),
}

impl HttpBody {
    /// How many times the download was resumed after breaking off.
    pub fn resumes(&self) -> u32 {
        self.resumes.load(Ordering::Relaxed)
    }

    fn fail(&mut self, error: SourceError) -> io::Error {
        self.finished = Finished::Failed(error.io_kind(), error.to_string());
        error.into_io()
    }
}

impl Read for HttpBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || !self.fill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

impl crate::chunk::ChunkRead for HttpBody {
    /// The body's bytes as the HTTP client received them: no copy.
    fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        if max == 0 || !self.fill()? {
            return Ok(Bytes::new());
        }
        Ok(self.current.split_to(max.min(self.current.len())))
    }
}

impl HttpBody {
    /// Waits for the next bytes unless some are at hand; false at the end of the body.
    fn fill(&mut self) -> io::Result<bool> {
        while self.current.is_empty() {
            match &self.finished {
                Finished::No => {}
                Finished::Complete => return Ok(false),
                Finished::Failed(kind, message) => {
                    return Err(io::Error::new(*kind, message.clone()));
                }
            }
            match self.chunks.blocking_recv() {
                Some(Message::Chunk(chunk)) => {
                    self.delivered += chunk.len() as u64;
                    self.current = chunk;
                }
                Some(Message::End) => match self.length {
                    // The transfer thread checks this too; a short body must never pass as
                    // a complete one.
                    Some(length) if self.delivered < length => {
                        let error = self.short(format!(
                            "the body ended before the {length} bytes announced"
                        ));
                        return Err(self.fail(error));
                    }
                    _ => self.finished = Finished::Complete,
                },
                Some(Message::Failed(error)) => return Err(self.fail(error)),
                None => {
                    let error = self.short("the HTTP client thread stopped unexpectedly".into());
                    return Err(self.fail(error));
                }
            }
        }
        Ok(true)
    }

    fn short(&self, detail: String) -> SourceError {
        SourceError::Broken {
            url: self.url.clone(),
            received: self.delivered,
            expected: self.length,
            detail,
        }
    }
}

/// Sends a GET for `url` with the default [`HttpOptions`] and returns the streaming body
/// once the status is a success.
pub fn open_http(url: &str) -> Result<HttpBody, SourceError> {
    open_http_with(url, &HttpOptions::default())
}

/// Sends a GET for `url` and returns the streaming body once the status is a success.
///
/// Blocks until the response head arrives (or the idle timeout runs out). Reads the CA
/// directory, so call it from a thread that may block.
pub fn open_http_with(url: &str, opts: &HttpOptions) -> Result<HttpBody, SourceError> {
    let start = parse_url(url)?;
    let shown_url = shown(&start);
    let fetcher = Fetcher::new(opts)?;
    let (head_tx, head_rx) = mpsc::sync_channel::<Result<Head, SourceError>>(1);
    let (chunk_tx, chunk_rx) = async_mpsc::channel::<Message>(CHANNEL_CHUNKS);
    let resumes = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&resumes);
    std::thread::Builder::new()
        .name("http-source".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = head_tx.send(Err(SourceError::Invalid(format!(
                        "cannot start the HTTP client: {e}"
                    ))));
                    return;
                }
            };
            runtime.block_on(transfer(fetcher, start, head_tx, chunk_tx, counter));
        })
        .map_err(|e| SourceError::Invalid(format!("cannot start the HTTP client thread: {e}")))?;
    let head = head_rx.recv().map_err(|_| {
        SourceError::Invalid(format!(
            "the HTTP client for {shown_url} stopped before an answer"
        ))
    })??;
    Ok(HttpBody {
        url: shown_url,
        chunks: chunk_rx,
        current: Bytes::new(),
        delivered: 0,
        finished: Finished::No,
        resumes,
        length: head.length,
        ranges_at: head.ranges_at,
    })
}

/// `url` for messages and logs, with a password in it masked.
fn shown(url: &Url) -> String {
    if url.password().is_none() {
        return url.to_string();
    }
    let mut masked = url.clone();
    let _ = masked.set_password(Some("redacted"));
    masked.to_string()
}

fn parse_url(url: &str) -> Result<Url, SourceError> {
    let parsed = Url::parse(url).map_err(|e| {
        SourceError::Invalid(format!(
            "{url} is not a valid URL ({e}); give an http:// or https:// address"
        ))
    })?;
    match parsed.scheme() {
        "http" | "https" if parsed.host().is_some() => Ok(parsed),
        "http" | "https" => Err(SourceError::Invalid(format!(
            "{} names no host; give an address like https://host/path/disk.qcow2",
            shown(&parsed)
        ))),
        other => Err(SourceError::Invalid(format!(
            "{} uses the {other}:// scheme; only http:// and https:// are supported",
            shown(&parsed)
        ))),
    }
}

/// What the response head said.
struct Head {
    length: Option<u64>,
    ranges_at: Option<String>,
}

/// One HTTP client set up from [`HttpOptions`]. Requests follow redirects by hand.
#[derive(Clone)]
struct Fetcher {
    client: reqwest::Client,
    opts: Arc<HttpOptions>,
}

/// The part of a resource a request asks for.
struct RangeAsk<'a> {
    from: u64,
    /// The last byte, inclusive; `None` for "to the end".
    to: Option<u64>,
    /// `If-Range`: the validator of the copy the earlier bytes came from.
    if_range: Option<&'a HeaderValue>,
}

impl Fetcher {
    /// Builds the client; reads the CA directory (blocking).
    fn new(opts: &HttpOptions) -> Result<Self, SourceError> {
        let mut builder = reqwest::Client::builder()
            // Redirects are followed in `get`, which keeps the credentials on every hop
            // and refuses downgrades.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.idle_timeout)
            .user_agent(concat!("dvcr/", env!("CARGO_PKG_VERSION")));
        if let Some(dir) = &opts.ca_dir {
            for cert in extra_roots(dir)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if opts.insecure_tls {
            tracing::warn!("TLS certificates are not verified for this download (insecure TLS)");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder.build().map_err(|e| {
            SourceError::Invalid(format!("cannot set up the HTTP client: {}", chain(&e)))
        })?;
        Ok(Self {
            client,
            opts: Arc::new(opts.clone()),
        })
    }

    /// GETs `start`, following redirects, and returns the first answer that is neither a
    /// redirect nor an error status. `received` is only for the idle-timeout error.
    async fn get(
        &self,
        start: &Url,
        range: Option<&RangeAsk<'_>>,
        received: u64,
    ) -> Result<reqwest::Response, SourceError> {
        let idle = self.opts.idle_timeout;
        let mut url = start.clone();
        let mut hops = 0usize;
        loop {
            let mut request = self.client.get(url.clone());
            // The credentials go along on every hop, to whatever host the chain leads:
            // the user gave them for this download, and image servers commonly redirect to
            // a storage host that wants them too. `redirect_target` refuses any hop from
            // https to plain http, so they never travel in the clear unless the user's own
            // URL was plain http.
            if let Some((user, password)) = &self.opts.basic_auth {
                request = request.basic_auth(user, Some(password));
            }
            if let Some(range) = range {
                let spec = match range.to {
                    Some(to) => format!("bytes={}-{to}", range.from),
                    None => format!("bytes={}-", range.from),
                };
                request = request.header(header::RANGE, spec);
                if let Some(validator) = range.if_range {
                    request = request.header(header::IF_RANGE, validator.clone());
                }
            }
            let response = match tokio::time::timeout(idle, request.send()).await {
                Err(_) => {
                    return Err(SourceError::IdleTimeout {
                        url: shown(&url),
                        idle,
                        received,
                        expected: None,
                        resume: String::new(),
                    });
                }
                Ok(Err(e)) => return Err(request_failed(&url, e)),
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                hops += 1;
                if hops > self.opts.max_redirects {
                    return Err(SourceError::TooManyRedirects {
                        max: self.opts.max_redirects,
                        url: shown(start),
                    });
                }
                let next = redirect_target(&url, response.headers())?;
                tracing::debug!(from = %shown(&url), to = %shown(&next), status = status.as_u16(), "following a redirect");
                url = next;
                continue;
            }
            if status.is_success() {
                return Ok(response);
            }
            return Err(status_error(&url, status, self.opts.basic_auth.is_some()));
        }
    }
}

/// Where a redirect answer points, if it may be followed.
fn redirect_target(from: &Url, headers: &HeaderMap) -> Result<Url, SourceError> {
    let refuse = |detail: String| SourceError::Redirect {
        url: shown(from),
        detail,
    };
    let location = headers
        .get(header::LOCATION)
        .ok_or_else(|| refuse("the answer has no Location header".into()))?
        .to_str()
        .map_err(|_| refuse("the Location header is not plain ASCII".into()))?;
    let next = from.join(location).map_err(|e| {
        refuse(format!(
            "the Location {location:?} is not a valid URL ({e})"
        ))
    })?;
    match next.scheme() {
        "https" => Ok(next),
        "http" if from.scheme() == "https" => Err(refuse(format!(
            "it leads from https to plain http ({}), where the image (and any credentials) \
             would travel unencrypted and unauthenticated; use a URL that stays on https",
            shown(&next)
        ))),
        "http" => Ok(next),
        other => Err(refuse(format!(
            "it leads to the unsupported scheme {other}:// ({})",
            shown(&next)
        ))),
    }
}

fn status_error(url: &Url, status: StatusCode, auth_given: bool) -> SourceError {
    let hint = match status.as_u16() {
        401 if auth_given => {
            ": the server refused the credentials; check the user name and password"
        }
        401 => ": the server wants credentials; give a user name and password",
        403 => ": the server refuses access; check the URL's permissions and the credentials",
        404 | 410 => ": no image at this URL; check the address",
        407 => ": a proxy wants credentials; check the proxy settings",
        408 | 429 => ": the server is busy; try again later",
        416 => ": the server cannot serve the byte range asked for",
        s if s >= 500 => ": the server failed; try again later",
        _ => "",
    };
    SourceError::HttpStatus {
        url: shown(url),
        status: status.as_u16(),
        hint,
    }
}

/// Classifies a request that got no answer.
fn request_failed(url: &Url, e: reqwest::Error) -> SourceError {
    let builder = e.is_builder();
    let tls = is_tls_failure(&e);
    let detail = chain(&e.without_url());
    if builder {
        SourceError::Invalid(format!("cannot request {}: {detail}", shown(url)))
    } else if tls {
        SourceError::Tls {
            url: shown(url),
            detail,
        }
    } else {
        SourceError::Http {
            url: shown(url),
            detail,
        }
    }
}

/// Whether a failed request failed in the TLS handshake. The TLS stack reports handshake
/// failures (an untrusted or mismatched certificate, a peer that does not speak TLS) as an
/// `InvalidData` I/O error; nothing else on the way to a connection does.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::InvalidData)
        {
            return true;
        }
        next = cause(err);
    }
    false
}

/// The certificates of every PEM file in `dir`, each checked on its own so that a bad one
/// is named.
fn extra_roots(dir: &Path) -> Result<Vec<reqwest::Certificate>, SourceError> {
    let bad = |path: &Path, detail: String| SourceError::CaCertificates {
        path: path.to_owned(),
        detail,
    };
    let entries = fs::read_dir(dir).map_err(|e| {
        bad(
            dir,
            format!("cannot list the directory ({e}); give a readable directory of PEM files"),
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| bad(dir, format!("cannot list the directory ({e})")))?;
        paths.push(entry.path());
    }
    paths.sort();
    let mut roots = Vec::new();
    for path in paths {
        let named = path
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| ["crt", "pem", "cer"].contains(&x.to_ascii_lowercase().as_str()));
        // `metadata` follows symlinks: Kubernetes mounts files as links into `..data/`.
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) => return Err(bad(&path, format!("cannot read it ({e})"))),
        };
        if !meta.is_file() {
            continue;
        }
        if meta.len() > CA_FILE_LIMIT {
            if named {
                return Err(bad(
                    &path,
                    format!(
                        "it has {} bytes, far more than a certificate file; remove it from the directory",
                        meta.len()
                    ),
                ));
            }
            tracing::debug!(path = %path.display(), "skipping a large file in the CA directory");
            continue;
        }
        let bytes = fs::read(&path).map_err(|e| bad(&path, format!("cannot read it ({e})")))?;
        let certs = match reqwest::Certificate::from_pem_bundle(&bytes) {
            Ok(certs) => certs,
            Err(e) if named => {
                return Err(bad(
                    &path,
                    format!(
                        "it is not valid PEM ({e}); give PEM certificates (-----BEGIN CERTIFICATE-----)"
                    ),
                ));
            }
            Err(_) => {
                tracing::debug!(path = %path.display(), "skipping a non-PEM file in the CA directory");
                continue;
            }
        };
        if certs.is_empty() {
            if named {
                return Err(bad(
                    &path,
                    "it holds no PEM certificate; give PEM certificates (-----BEGIN CERTIFICATE-----)"
                        .into(),
                ));
            }
            tracing::debug!(path = %path.display(), "skipping a file without certificates in the CA directory");
            continue;
        }
        // The client checks certificates only when it is built; a probe per file names
        // the file at fault.
        let mut probe = reqwest::Client::builder().tls_built_in_root_certs(false);
        for cert in &certs {
            probe = probe.add_root_certificate(cert.clone());
        }
        if let Err(e) = probe.build() {
            return Err(bad(
                &path,
                format!(
                    "it holds a certificate that cannot be a trust root ({}); replace it with the CA's PEM certificate",
                    chain(&e)
                ),
            ));
        }
        tracing::debug!(path = %path.display(), count = certs.len(), "trusting extra CA certificates");
        roots.extend(certs);
    }
    if roots.is_empty() {
        tracing::warn!(dir = %dir.display(), "the CA certificate directory holds no certificates");
    }
    Ok(roots)
}

/// The pause before resume attempt `attempt` (counting from 1).
fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_CAP)
}

/// Why the body stopped before its end.
enum Break {
    /// No bytes for the idle timeout.
    Idle,
    /// The connection failed.
    Dropped(String),
    /// The body ended before the announced length.
    Short,
}

/// A body in flight and what is needed to resume it.
struct Download {
    fetcher: Fetcher,
    /// Where the body came from (after redirects); resumes ask there.
    at: Url,
    /// The full length, once known.
    total: Option<u64>,
    /// `Accept-Ranges` of the first answer: bytes, none, or not said.
    ranges: Option<bool>,
    /// A strong `ETag` or the `Last-Modified` of the first answer, for `If-Range`.
    validator: Option<HeaderValue>,
    received: u64,
    /// Resume attempts since bytes last arrived.
    attempts: u32,
    resumes: Arc<AtomicU32>,
}

async fn transfer(
    fetcher: Fetcher,
    start: Url,
    head: mpsc::SyncSender<Result<Head, SourceError>>,
    chunks: async_mpsc::Sender<Message>,
    resumes: Arc<AtomicU32>,
) {
    let response = match fetcher.get(&start, None, 0).await {
        Ok(r) => r,
        Err(e) => {
            let _ = head.send(Err(e));
            return;
        }
    };
    let headers = response.headers();
    let ranges = headers
        .get(header::ACCEPT_RANGES)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().eq_ignore_ascii_case("bytes"));
    let validator = headers
        .get(header::ETAG)
        // A weak ETag must not be used in If-Range (RFC 9110, 13.1.5).
        .filter(|etag| !etag.as_bytes().starts_with(b"W/"))
        .or_else(|| headers.get(header::LAST_MODIFIED))
        .cloned();
    let at = response.url().clone();
    let total = response.content_length();
    let answered = Head {
        length: total,
        ranges_at: (ranges == Some(true)).then(|| at.to_string()),
    };
    // The head channel holds one message; this send never blocks.
    if head.send(Ok(answered)).is_err() {
        return;
    }
    let mut download = Download {
        fetcher,
        at,
        total,
        ranges,
        validator,
        received: 0,
        attempts: 0,
        resumes,
    };
    let last = match download.pump(response, &chunks).await {
        Ok(true) => Message::End,
        // The reader is gone.
        Ok(false) => return,
        Err(e) => Message::Failed(e),
    };
    let _ = chunks.send(last).await;
}

impl Download {
    /// Passes the body to the reader, resuming it when it breaks off. `Ok(true)` when every
    /// byte was passed, `Ok(false)` when the reader went away.
    async fn pump(
        &mut self,
        mut response: reqwest::Response,
        chunks: &async_mpsc::Sender<Message>,
    ) -> Result<bool, SourceError> {
        let idle = self.fetcher.opts.idle_timeout;
        loop {
            let next = tokio::select! {
                _ = chunks.closed() => return Ok(false),
                next = tokio::time::timeout(idle, response.chunk()) => next,
            };
            let broke = match next {
                Err(_) => Break::Idle,
                Ok(Err(e)) => Break::Dropped(chain(&e.without_url())),
                Ok(Ok(Some(chunk))) => {
                    self.received += chunk.len() as u64;
                    if let Some(total) = self.total
                        && self.received > total
                    {
                        return Err(SourceError::Broken {
                            url: shown(&self.at),
                            received: self.received,
                            expected: self.total,
                            detail: "the server sent more bytes than the length it announced"
                                .into(),
                        });
                    }
                    self.attempts = 0;
                    if chunks.send(Message::Chunk(chunk)).await.is_err() {
                        return Ok(false);
                    }
                    continue;
                }
                Ok(Ok(None)) => match self.total {
                    Some(total) if self.received < total => Break::Short,
                    _ => return Ok(true),
                },
            };
            // Let the broken connection go before asking for the rest.
            drop(response);
            response = tokio::select! {
                _ = chunks.closed() => return Ok(false),
                resumed = self.resume(broke) => resumed?,
            };
        }
    }

    /// Asks for the rest of the body after a break; the answer, or why there is none.
    async fn resume(&mut self, broke: Break) -> Result<reqwest::Response, SourceError> {
        let idle = self.fetcher.opts.idle_timeout;
        let limit = self.fetcher.opts.resume_attempts;
        let cause = match &broke {
            Break::Idle => format!("no data for {} s", idle.as_secs_f32()),
            Break::Dropped(detail) => detail.clone(),
            Break::Short => "the connection ended early".into(),
        };
        let idled = matches!(broke, Break::Idle);
        let fail = |this: &Self, note: String| {
            if idled {
                SourceError::IdleTimeout {
                    url: shown(&this.at),
                    idle,
                    received: this.received,
                    expected: this.total,
                    resume: note,
                }
            } else {
                SourceError::Broken {
                    url: shown(&this.at),
                    received: this.received,
                    expected: this.total,
                    detail: format!("{cause}{note}"),
                }
            }
        };
        if self.ranges == Some(false) {
            let note = "; the server does not take range requests (Accept-Ranges: none), so \
                        the download cannot resume";
            return Err(fail(self, note.into()));
        }
        if limit == 0 {
            return Err(fail(self, "; resuming is turned off".into()));
        }
        let mut last = String::new();
        while self.attempts < limit {
            self.attempts += 1;
            tracing::warn!(
                url = %shown(&self.at),
                received = self.received,
                expected = ?self.total,
                attempt = self.attempts,
                cause = %cause,
                "the download broke off; resuming with a range request"
            );
            tokio::time::sleep(backoff(self.attempts)).await;
            let ask = RangeAsk {
                from: self.received,
                to: None,
                if_range: self.validator.as_ref(),
            };
            let response = match self.fetcher.get(&self.at, Some(&ask), self.received).await {
                Ok(r) => r,
                Err(e) if e.is_transient() => {
                    last = e.to_string();
                    continue;
                }
                Err(e) => return Err(fail(self, format!("; resuming failed: {e}"))),
            };
            match resumed_total(&response, self.received, self.total) {
                Ok(total) => {
                    self.total = total.or(self.total);
                    self.resumes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(url = %shown(&self.at), from = self.received, "the download resumed");
                    return Ok(response);
                }
                Err(why) => return Err(fail(self, format!("; cannot resume: {why}"))),
            }
        }
        Err(fail(
            self,
            format!("; {limit} resume attempts failed, the last with: {last}"),
        ))
    }
}

/// Checks the answer to `Range: bytes=<from>-`: a 206 whose `Content-Range` starts exactly
/// at `from` and, when the full length is known, has that length. Returns the full length
/// the answer names.
fn resumed_total(
    response: &reqwest::Response,
    from: u64,
    total: Option<u64>,
) -> Result<Option<u64>, String> {
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => {
            return Err(
                "the server sent the whole resource again (HTTP 200) instead of the rest (206): \
                 it does not take range requests, or the resource changed since the download began"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "the server answered HTTP {} instead of 206",
                other.as_u16()
            ));
        }
    }
    let (first, last, length) = content_range(response.headers())?;
    if first != from {
        return Err(format!(
            "asked for the bytes from {from}, the server sent bytes from {first}"
        ));
    }
    match (total, length) {
        (Some(total), Some(length)) if total != length => Err(format!(
            "the resource's length changed from {total} to {length} bytes"
        )),
        (Some(total), _) if last >= total => Err(format!(
            "the server sent bytes up to {last}, beyond the resource's {total} bytes"
        )),
        (Some(total), None) => Err(format!(
            "the server did not confirm the resource's length ({total} bytes)"
        )),
        _ => Ok(length),
    }
}

/// Parses `Content-Range: bytes <first>-<last>/<length or *>`; the numbers are checked
/// against each other.
fn content_range(headers: &HeaderMap) -> Result<(u64, u64, Option<u64>), String> {
    let raw = headers
        .get(header::CONTENT_RANGE)
        .ok_or("the partial answer has no Content-Range header")?;
    let bad = || format!("the Content-Range {raw:?} is not valid");
    let text = raw.to_str().map_err(|_| bad())?;
    let spec = text.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, length) = spec.split_once('/').ok_or_else(bad)?;
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let first: u64 = first.trim().parse().map_err(|_| bad())?;
    let last: u64 = last.trim().parse().map_err(|_| bad())?;
    let length = match length.trim() {
        "*" => None,
        n => Some(n.parse::<u64>().map_err(|_| bad())?),
    };
    if last < first || length.is_some_and(|l| last >= l) {
        return Err(bad());
    }
    Ok((first, last, length))
}

/// Random access to an HTTP resource by `Range` requests, for the few reads a decoder makes
/// behind the stream (a qcow2 L2 table that comes after the data it maps) instead of keeping
/// everything it passed in scratch space.
///
/// Requests go to a thread of its own with one HTTP client, so connections are reused.
#[derive(Debug)]
pub struct HttpRanges {
    url: String,
    len: u64,
    requests: mpsc::Sender<RangeRequest>,
}

type RangeRequest = (u64, usize, mpsc::SyncSender<Result<Vec<u8>, SourceError>>);

impl HttpRanges {
    /// Random access to `url`, whose length is `len` bytes, with the default
    /// [`HttpOptions`].
    pub fn new(url: &str, len: u64) -> Result<Self, SourceError> {
        Self::with_options(url, len, &HttpOptions::default())
    }

    /// Random access to `url`, whose length is `len` bytes. Reads the CA directory, so call
    /// it from a thread that may block.
    pub fn with_options(url: &str, len: u64, opts: &HttpOptions) -> Result<Self, SourceError> {
        let start = parse_url(url)?;
        let fetcher = Fetcher::new(opts)?;
        let (tx, rx) = mpsc::channel::<RangeRequest>();
        std::thread::Builder::new()
            .name("http-ranges".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(rt) => rt,
                    Err(e) => {
                        // Every request gets the reason.
                        while let Ok((_, _, reply)) = rx.recv() {
                            let _ = reply.send(Err(SourceError::Invalid(format!(
                                "cannot start the HTTP client: {e}"
                            ))));
                        }
                        return;
                    }
                };
                while let Ok((offset, want, reply)) = rx.recv() {
                    let answer = runtime.block_on(fetch_range(&fetcher, &start, len, offset, want));
                    let _ = reply.send(answer);
                }
            })
            .map_err(|e| {
                SourceError::Invalid(format!("cannot start the HTTP client thread: {e}"))
            })?;
        Ok(Self {
            url: url.to_owned(),
            len,
            requests: tx,
        })
    }
}

/// `want` bytes at `offset` of `url` (whose length is `len`), retrying transient failures.
async fn fetch_range(
    fetcher: &Fetcher,
    url: &Url,
    len: u64,
    offset: u64,
    want: usize,
) -> Result<Vec<u8>, SourceError> {
    let mut attempt = 0;
    loop {
        match fetch_range_once(fetcher, url, len, offset, want).await {
            Err(e) if e.is_transient() && attempt < fetcher.opts.resume_attempts => {
                attempt += 1;
                tracing::warn!(url = %shown(url), offset, error = %e, attempt, "a range request failed; trying again");
                tokio::time::sleep(backoff(attempt)).await;
            }
            other => return other,
        }
    }
}

async fn fetch_range_once(
    fetcher: &Fetcher,
    url: &Url,
    len: u64,
    offset: u64,
    want: usize,
) -> Result<Vec<u8>, SourceError> {
    let last = offset + want as u64 - 1;
    let ask = RangeAsk {
        from: offset,
        to: Some(last),
        if_range: None,
    };
    let mut response = fetcher.get(url, Some(&ask), 0).await?;
    let at = shown(response.url());
    let broken = |received: usize, detail: String| SourceError::Broken {
        url: at.clone(),
        received: received as u64,
        expected: Some(want as u64),
        detail: format!("reading bytes {offset}-{last} by a range request: {detail}"),
    };
    if response.status() != StatusCode::PARTIAL_CONTENT {
        return Err(SourceError::Invalid(format!(
            "{at} answered HTTP {} instead of 206 to a request for bytes {offset}-{last}: the \
             server does not take range requests",
            response.status().as_u16()
        )));
    }
    let (first, end, length) = content_range(response.headers())
        .map_err(|e| SourceError::Invalid(format!("{at}: {e}")))?;
    if first != offset || end != last || length.is_some_and(|l| l != len) {
        return Err(SourceError::Invalid(format!(
            "{at} sent bytes {first}-{end} of {} for a request for bytes {offset}-{last} of \
             {len}: the resource changed or the server is broken",
            length.map_or_else(|| "*".to_owned(), |l| l.to_string())
        )));
    }
    let idle = fetcher.opts.idle_timeout;
    // `want` is bounded by the decoder's read limit, and checked against `len` by the caller.
    let mut body = Vec::with_capacity(want);
    loop {
        match tokio::time::timeout(idle, response.chunk()).await {
            Err(_) => {
                return Err(SourceError::IdleTimeout {
                    url: at.clone(),
                    idle,
                    received: body.len() as u64,
                    expected: Some(want as u64),
                    resume: String::new(),
                });
            }
            Ok(Err(e)) => return Err(broken(body.len(), chain(&e.without_url()))),
            Ok(Ok(Some(chunk))) => {
                if chunk.len() > want - body.len() {
                    return Err(broken(
                        body.len(),
                        "the server sent more than it was asked for".into(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) if body.len() == want => return Ok(body),
            Ok(Ok(None)) => return Err(broken(body.len(), "the answer ended early".into())),
        }
    }
}

impl View for HttpRanges {
    fn len(&self) -> u64 {
        self.len
    }

    fn cheap(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> dvcr_formats::Result<Cow<'_, [u8]>> {
        check_range(self.len, offset, len, what)?;
        if len == 0 {
            return Ok(Cow::Owned(Vec::new()));
        }
        let context = || format!("reading {what} from {} by a range request", self.url);
        let stopped = || {
            dvcr_formats::Error::io(
                context(),
                io::Error::other("the HTTP client thread stopped"),
            )
        };
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send((offset, len, reply))
            .map_err(|_| stopped())?;
        let bytes = answer
            .recv()
            .map_err(|_| stopped())?
            .map_err(|e| dvcr_formats::Error::io(context(), e.into_io()))?;
        Ok(Cow::Owned(bytes))
    }
}

/// A blocking reader for standard input. A pipe is read as `formats` reads pipes (a larger
/// pipe buffer, reads placed where the kernel copies fast); anything else (a terminal)
/// through the standard library.
pub fn stdin() -> Box<dyn Read + Send> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let pipe = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(fs::File::from)
        .filter(|f| {
            f.metadata()
                .is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        });
    match pipe {
        Some(file) => Box::new(dvcr_formats::stream::SequentialFile::new(file)),
        None => Box::new(io::stdin()),
    }
}

/// A local file or block device opened as a source, read from its start.
pub struct LocalFile {
    /// Forwards, once: direct I/O for large cold files, holes of a sparse file not read.
    pub reader: dvcr_formats::stream::SequentialFile,
    /// The same bytes by offset (a seekable source spares a decoder the scratch space).
    pub random: Option<dvcr_formats::RandomAccess>,
    /// The file's length, or the device's capacity.
    pub length: Option<u64>,
}

impl fmt::Debug for LocalFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalFile")
            .field("reader", &self.reader)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl LocalFile {
    /// Opens `file` (a regular file or block device; anything else is read as a stream).
    pub fn new(file: fs::File) -> io::Result<Self> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata()?;
        let length = if meta.file_type().is_block_device() {
            Some(file.try_clone()?.seek(io::SeekFrom::End(0))?)
        } else if meta.is_file() {
            Some(meta.len())
        } else {
            None
        };
        let random = length.and_then(|len| {
            let clone = file.try_clone().ok()?;
            Some(Box::new(dvcr_formats::FileView::new(clone, len)) as dvcr_formats::RandomAccess)
        });
        Ok(Self {
            reader: dvcr_formats::stream::SequentialFile::new(file),
            random,
            length,
        })
    }
}

/// Standard input as a file of its own, when it is one: a regular file or block device
/// redirected in (`dvcr convert - < image.qcow2`) and not yet read from. Such a source is
/// read exactly as a path would be (direct I/O, holes skipped, random access instead of
/// scratch space), so `-` costs nothing against naming the file. `None` for a pipe, a
/// terminal, a socket, or a file already partly consumed by someone before us (its bytes
/// from the current offset on are the input then, and are read as a stream).
pub fn stdin_file() -> Option<fs::File> {
    use std::io::Seek;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let fd = io::stdin().as_fd().try_clone_to_owned().ok()?;
    let mut file = fs::File::from(fd);
    let kind = file.metadata().ok()?.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return None;
    }
    // The duplicate shares the offset with descriptor 0: only a file nobody has read from
    // yet is the whole input.
    (file.stream_position().ok()? == 0).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parse_tells_paths_stdin_and_urls_apart() {
        assert_eq!(Location::parse("-").ok(), Some(Location::Stdin));
        assert_eq!(
            Location::parse("disk.qcow2").ok(),
            Some(Location::Path("disk.qcow2".into()))
        );
        assert_eq!(
            Location::parse("HTTPS://example.org/a.img").ok(),
            Some(Location::Http("HTTPS://example.org/a.img".into()))
        );
    }

    #[test]
    fn location_parse_refuses_unknown_schemes_with_advice() {
        let message = Location::parse("ftp://host/a.img")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("ftp://"), "{message}");
        assert!(message.contains("http(s) URL"), "{message}");
    }

    #[test]
    fn server_errors_are_transient_and_not_found_is_not() {
        let e = |status| SourceError::HttpStatus {
            url: String::new(),
            status,
            hint: "",
        };
        assert!(e(503).is_transient());
        assert!(e(429).is_transient());
        assert!(e(408).is_transient());
        assert!(!e(404).is_transient());
        assert!(!e(401).is_transient());
    }

    fn headers(content_range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(content_range) {
            h.insert(header::CONTENT_RANGE, v);
        }
        h
    }

    #[test]
    fn content_range_reads_first_last_and_length() {
        assert_eq!(
            content_range(&headers("bytes 10-19/100")),
            Ok((10, 19, Some(100)))
        );
        assert_eq!(content_range(&headers("bytes 10-19/*")), Ok((10, 19, None)));
    }

    #[test]
    fn content_range_refuses_inconsistent_or_malformed_values() {
        for bad in [
            "bytes 19-10/100",
            "bytes 10-100/100",
            "bytes 10-19",
            "items 10-19/100",
            "bytes -5/100",
            "bytes 1-99999999999999999999999/100",
        ] {
            assert!(content_range(&headers(bad)).is_err(), "{bad} was accepted");
        }
        assert!(content_range(&HeaderMap::new()).is_err());
    }

    #[test]
    fn backoff_doubles_from_200_ms_and_stops_at_5_s() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(5), Duration::from_millis(3200));
        assert_eq!(backoff(6), Duration::from_secs(5));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn a_redirect_from_https_to_http_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("http://example.org/a.img"),
        );
        let from = Url::parse("https://example.org/a.img").unwrap_or_else(|e| panic!("{e}"));
        let refused = redirect_target(&from, &h).err();
        assert!(
            matches!(&refused, Some(SourceError::Redirect { detail, .. }) if detail.contains("plain http")),
            "{refused:?}"
        );
        assert!(refused.is_some_and(|e| !e.is_transient()));
    }

    #[test]
    fn relative_redirects_resolve_against_the_current_url() {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("../b/c.img"));
        let from = Url::parse("http://example.org/a/x/y.img").unwrap_or_else(|e| panic!("{e}"));
        let next = redirect_target(&from, &h).map(|u| u.to_string()).ok();
        assert_eq!(next.as_deref(), Some("http://example.org/a/b/c.img"));
    }

    #[test]
    fn a_source_error_is_found_inside_an_io_error() {
        let io = SourceError::Broken {
            url: "http://h/x".into(),
            received: 5,
            expected: Some(10),
            detail: "gone".into(),
        }
        .into_io();
        let found = SourceError::find_in(&io);
        assert!(found.is_some_and(SourceError::is_transient), "{io}");
        assert!(io.to_string().contains("after 5 bytes of 10"), "{io}");
    }

    #[test]
    fn a_password_in_a_url_is_masked_in_messages() {
        let url =
            Url::parse("https://user:s3cret@example.org/a.img").unwrap_or_else(|e| panic!("{e}"));
        let error = status_error(&url, StatusCode::NOT_FOUND, false).to_string();
        assert!(
            error.contains("https://user:redacted@example.org/a.img"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn debug_output_hides_the_password() {
        let opts = HttpOptions {
            basic_auth: Some(("user".into(), "s3cret".into())),
            ..HttpOptions::default()
        };
        let shown = format!("{opts:?}");
        assert!(shown.contains("user"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
