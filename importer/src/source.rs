//! Where image bytes come from, as the user names them: a path, `-` for standard input, or
//! an `http(s)://` URL.
//!
//! Sources are blocking readers on purpose: decompression and decoding run on blocking
//! threads, and the HTTP client streams the body without buffering it. Timeouts are idle
//! timeouts (no bytes for a while), never a total timeout, because disk images are large.

use std::fmt;
use std::io::{self, Read};
use std::sync::mpsc;

use std::borrow::Cow;

use bytes::Bytes;
use dvcr_formats::View;
use dvcr_formats::view::check_range;
use std::path::PathBuf;
use std::time::Duration;

/// How long a connection may stay silent before the transfer is abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many redirects an HTTP source follows.
pub const MAX_REDIRECTS: usize = 10;

/// Why a source could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The location is neither a path, `-`, nor an http(s) URL.
    #[error("{0}")]
    Invalid(String),
    /// The HTTP server answered with an error status.
    #[error("{url} answered HTTP {status}{hint}")]
    HttpStatus {
        /// The URL asked for.
        url: String,
        /// The status code.
        status: u16,
        /// What the user can do.
        hint: &'static str,
    },
    /// The HTTP request failed before an answer.
    #[error("fetching {url} failed: {source}")]
    Http {
        /// The URL asked for.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
}

impl SourceError {
    /// Whether retrying later may help (network trouble, server errors), as opposed to a
    /// request that will fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Invalid(_) => false,
            SourceError::HttpStatus { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            SourceError::Http { .. } => true,
        }
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

/// An HTTP response body as a blocking reader.
///
/// The transfer runs on its own thread with a small async runtime (the HTTP client is
/// async); chunks reach the reader over a bounded channel, so a slow consumer slows the
/// download instead of growing memory.
#[derive(Debug)]
pub struct HttpBody {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// `Content-Length`, when the server sent one.
    pub length: Option<u64>,
    /// The server said it answers `Range` requests for this resource (`Accept-Ranges:
    /// bytes`), at the URL it finally answered from (after redirects).
    pub ranges_at: Option<String>,
}

impl Read for HttpBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.recv() {
                Ok(chunk) => self.current = chunk?,
                // The transfer thread ended after the last chunk.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Chunks buffered between the transfer thread and the reader.
const CHANNEL_CHUNKS: usize = 64;

/// Sends a GET for `url` and returns the streaming body once the status is a success.
pub fn open_http(url: &str) -> Result<HttpBody, SourceError> {
    let (head_tx, head_rx) = mpsc::sync_channel::<Result<Head, SourceError>>(1);
    let (chunk_tx, chunk_rx) = mpsc::sync_channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let owned = url.to_owned();
    let spawned = std::thread::Builder::new()
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
            runtime.block_on(transfer(owned, head_tx, chunk_tx));
        });
    if let Err(e) = spawned {
        return Err(SourceError::Invalid(format!(
            "cannot start the HTTP client thread: {e}"
        )));
    }
    let head = head_rx.recv().map_err(|_| {
        SourceError::Invalid(format!(
            "the HTTP client for {url} stopped before an answer"
        ))
    })??;
    Ok(HttpBody {
        chunks: chunk_rx,
        current: Bytes::new(),
        length: head.length,
        ranges_at: head.ranges_at,
    })
}

/// What the response head said.
struct Head {
    length: Option<u64>,
    ranges_at: Option<String>,
}

fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        .connect_timeout(Duration::from_secs(30))
        // Per read: an idle timeout, never a limit on the whole (huge) body.
        .read_timeout(IDLE_TIMEOUT)
        .user_agent(concat!("dvcr/", env!("CARGO_PKG_VERSION")))
        .build()
}

async fn transfer(
    url: String,
    head: mpsc::SyncSender<Result<Head, SourceError>>,
    chunks: mpsc::SyncSender<io::Result<Bytes>>,
) {
    let client = match client() {
        Ok(c) => c,
        Err(source) => {
            let _ = head.send(Err(SourceError::Http { url, source }));
            return;
        }
    };
    let mut response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(source) => {
            let _ = head.send(Err(SourceError::Http { url, source }));
            return;
        }
    };
    let status = response.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 | 403 => {
                ": the server wants credentials or refuses access; check the URL's permissions"
            }
            404 | 410 => ": no image at this URL; check the address",
            s if s >= 500 => ": the server failed; try again later",
            _ => "",
        };
        let _ = head.send(Err(SourceError::HttpStatus {
            url,
            status: status.as_u16(),
            hint,
        }));
        return;
    }
    let ranges = response
        .headers()
        .get(reqwest::header::ACCEPT_RANGES)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
    let answered = Head {
        length: response.content_length(),
        ranges_at: ranges.then(|| response.url().to_string()),
    };
    if head.send(Ok(answered)).is_err() {
        return;
    }
    loop {
        let next = match response.chunk().await {
            Ok(Some(chunk)) => Ok(chunk),
            Ok(None) => return,
            Err(e) => Err(io::Error::other(format!(
                "the download of {url} broke off: {e}"
            ))),
        };
        let failed = next.is_err();
        // A blocking send from the runtime's only thread is fine: nothing else runs on it.
        if chunks.send(next).is_err() || failed {
            return;
        }
    }
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

type RangeRequest = (u64, usize, mpsc::SyncSender<Result<Vec<u8>, String>>);

impl HttpRanges {
    /// Random access to `url`, whose length is `len` bytes.
    pub fn new(url: &str, len: u64) -> Result<Self, SourceError> {
        let (tx, rx) = mpsc::channel::<RangeRequest>();
        let owned = url.to_owned();
        std::thread::Builder::new()
            .name("http-ranges".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let Ok(client) = client() else { return };
                while let Ok((offset, len, reply)) = rx.recv() {
                    let answer = runtime.block_on(fetch_range(&client, &owned, offset, len));
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

async fn fetch_range(
    client: &reqwest::Client,
    url: &str,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    let last = offset + len as u64 - 1;
    let response = client
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={offset}-{last}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
        return Err(format!(
            "asked for bytes {offset}-{last} the server answered HTTP {} instead of 206",
            response.status().as_u16()
        ));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if body.len() != len {
        return Err(format!(
            "asked for {len} bytes at {offset} the server sent {}",
            body.len()
        ));
    }
    Ok(body.to_vec())
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
        let (reply, answer) = mpsc::sync_channel(1);
        let failed = |e: String| {
            dvcr_formats::Error::io(
                format!("reading {what} from {} by a range request", self.url),
                io::Error::other(e),
            )
        };
        self.requests
            .send((offset, len, reply))
            .map_err(|_| failed("the HTTP client thread stopped".into()))?;
        let bytes = answer
            .recv()
            .map_err(|_| failed("the HTTP client thread stopped".into()))?
            .map_err(failed)?;
        Ok(Cow::Owned(bytes))
    }
}

/// A blocking reader for standard input.
pub fn stdin() -> impl Read + Send + 'static {
    std::io::stdin()
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
        assert!(!e(404).is_transient());
    }
}
