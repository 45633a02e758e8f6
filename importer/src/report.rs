//! How an import tells the platform how it is going and how it ended: a byte meter over
//! the source, the Prometheus gauges the controller scrapes about once a second
//! (`registry_progress`, `registry_average_speed`, `registry_current_speed`, labelled
//! `ownerUID`), and the one-line JSON final report written to the termination-message file.

use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Bytes read from the source so far, and how many there are in all when known.
#[derive(Debug)]
pub struct Progress {
    read: AtomicU64,
    /// 0 when unknown.
    total: AtomicU64,
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Starts the clock.
    pub fn new() -> Self {
        Self {
            read: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Records the size of the source once known.
    pub fn set_total(&self, total: Option<u64>) {
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
    }

    /// The size of the source, when known.
    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Counts bytes read.
    pub fn add(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Percent of the source read (0 while the size is unknown), at most 100.
    pub fn percent(&self) -> f64 {
        match self.total() {
            Some(total) => (self.read() as f64 * 100.0 / total as f64).min(100.0),
            None => 0.0,
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes per second since the start.
    pub fn average_speed(&self) -> u64 {
        let secs = self.elapsed().as_secs_f64();
        if secs <= 0.0 {
            0
        } else {
            (self.read() as f64 / secs) as u64
        }
    }
}

/// Counts every byte read through it into a [`Progress`].
pub struct Meter<R> {
    inner: R,
    progress: Arc<Progress>,
}

impl<R> fmt::Debug for Meter<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("progress", &self.progress)
            .finish()
    }
}

impl<R> Meter<R> {
    /// Meters `inner`.
    pub fn new(inner: R, progress: Arc<Progress>) -> Self {
        Self { inner, progress }
    }
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

impl<R: crate::chunk::ChunkRead> crate::chunk::ChunkRead for Meter<R> {
    fn read_chunk(&mut self, max: usize) -> io::Result<bytes::Bytes> {
        let chunk = self.inner.read_chunk(max)?;
        self.progress.add(chunk.len() as u64);
        Ok(chunk)
    }
}

/// The label set of every gauge: the owner's UID, under the name the platform expects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct OwnerLabel {
    ownerUID: String,
}

/// The three gauges of the contract, for one owner.
#[derive(Debug)]
pub struct Gauges {
    registry: Registry,
    progress: Family<OwnerLabel, Gauge<f64, AtomicU64>>,
    average: Family<OwnerLabel, Gauge<f64, AtomicU64>>,
    current: Family<OwnerLabel, Gauge<f64, AtomicU64>>,
    label: OwnerLabel,
}

impl Gauges {
    /// Gauges labelled `ownerUID=<owner_uid>`.
    pub fn new(owner_uid: &str) -> Self {
        let mut registry = Registry::default();
        let progress = Family::<OwnerLabel, Gauge<f64, AtomicU64>>::default();
        let average = Family::<OwnerLabel, Gauge<f64, AtomicU64>>::default();
        let current = Family::<OwnerLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "registry_progress",
            "Percent of the source image read",
            progress.clone(),
        );
        registry.register(
            "registry_average_speed",
            "Average download speed since the start, bytes per second",
            average.clone(),
        );
        registry.register(
            "registry_current_speed",
            "Download speed over the last second, bytes per second",
            current.clone(),
        );
        let label = OwnerLabel {
            ownerUID: owner_uid.to_owned(),
        };
        // Present from the first scrape, at zero.
        progress.get_or_create(&label).set(0.0);
        average.get_or_create(&label).set(0.0);
        current.get_or_create(&label).set(0.0);
        Self {
            registry,
            progress,
            average,
            current,
            label,
        }
    }

    /// Sets the gauges from a sample of `progress`; `current` is bytes/s over the last
    /// sampling interval.
    pub fn update(&self, progress: &Progress, current: f64) {
        self.progress
            .get_or_create(&self.label)
            .set(progress.percent());
        self.average
            .get_or_create(&self.label)
            .set(progress.average_speed() as f64);
        self.current.get_or_create(&self.label).set(current);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` (and `/healthz`) on `addr` from a thread of its own, sampling
/// `progress` once a second, until the process exits. Returns the bound address.
pub fn serve_gauges(
    addr: SocketAddr,
    owner_uid: &str,
    progress: Arc<Progress>,
) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let gauges = Arc::new(Gauges::new(owner_uid));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::warn!("cannot start the metrics server runtime");
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let sampler = Arc::clone(&gauges);
                tokio::spawn(async move {
                    let mut last = (Instant::now(), progress.read());
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let now = (Instant::now(), progress.read());
                        let secs = now.0.duration_since(last.0).as_secs_f64();
                        let current = if secs > 0.0 {
                            now.1.saturating_sub(last.1) as f64 / secs
                        } else {
                            0.0
                        };
                        sampler.update(&progress, current);
                        last = now;
                    }
                });
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let gauges = Arc::clone(&gauges);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let gauges = Arc::clone(&gauges);
                            async move { Ok::<_, std::convert::Infallible>(answer(&req, &gauges)) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        })?;
    Ok(bound)
}

fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    gauges: &Gauges,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, kind, body) = match req.uri().path() {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gauges.encode(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// The longest error message kept in the final report.
const MAX_ERROR_BYTES: usize = 2048;

/// The final report, one line of JSON in the termination-message file. The first six keys
/// are the platform's contract; the rest tell more without changing those.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct FinalReport {
    /// Bytes of the image as stored (in DVCR: the disk file; else the source as read).
    pub source_image_size: u64,
    /// The unpacked (virtual) size.
    pub source_image_virtual_size: u64,
    /// qcow2, raw, iso, vmdk, vdi, vhd, vhdx.
    pub source_image_format: String,
    /// Nanoseconds the import took.
    pub duration: u64,
    /// Bytes per second over the whole import.
    pub average_speed: u64,
    /// Why the import failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// True exactly when the format is iso.
    pub cdrom: bool,
    /// Scratch-space bytes used.
    pub scratch_bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Where the result went (image reference or path).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination: String,
}

impl FinalReport {
    /// Writes the report as one line to `path` (replacing what is there).
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        // Kubernetes keeps at most 4096 bytes of a termination message: a long error is
        // cut (on a character boundary) so that the line stays whole, valid JSON.
        let mut report = self.clone();
        if let Some(message) = &mut report.error_message
            && message.len() > MAX_ERROR_BYTES
        {
            let mut cut = MAX_ERROR_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        let mut line = serde_json::to_string(&report).map_err(io::Error::other)?;
        line.push('\n');
        std::fs::write(path, line)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_gauges_carry_the_owner_label_and_the_contract_names() {
        let progress = Progress::new();
        progress.set_total(Some(200));
        progress.add(50);
        let gauges = Gauges::new("0a1b-uid");
        gauges.update(&progress, 1234.0);
        let text = gauges.encode();
        assert!(
            text.contains("registry_progress{ownerUID=\"0a1b-uid\"} 25.0"),
            "{text}"
        );
        assert!(
            text.contains("registry_current_speed{ownerUID=\"0a1b-uid\"} 1234.0"),
            "{text}"
        );
        assert!(text.contains("registry_average_speed{ownerUID=\"0a1b-uid\"}"));
    }

    #[test]
    fn the_final_report_uses_the_contract_keys_and_omits_an_absent_error() {
        let report = FinalReport {
            source_image_size: 10,
            source_image_virtual_size: 20,
            source_image_format: "qcow2".into(),
            duration: 5,
            average_speed: 2,
            ..FinalReport::default()
        };
        let v: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(v["source-image-size"], 10);
        assert_eq!(v["source-image-virtual-size"], 20);
        assert_eq!(v["source-image-format"], "qcow2");
        assert_eq!(v["duration"], 5);
        assert_eq!(v["average-speed"], 2);
        assert!(v.get("error-message").is_none());
    }

    #[test]
    fn a_long_error_is_cut_so_the_report_fits_a_termination_message() {
        let report = FinalReport {
            error_message: Some("é".repeat(5000)),
            ..FinalReport::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        report.write_to(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() < 4096, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert!(v["error-message"].as_str().unwrap().ends_with("..."));
    }

    #[test]
    fn progress_is_a_percent_of_the_known_total_and_zero_while_unknown() {
        let p = Progress::new();
        p.add(30);
        assert_eq!(p.percent(), 0.0);
        p.set_total(Some(60));
        assert_eq!(p.percent(), 50.0);
        p.add(100);
        assert_eq!(p.percent(), 100.0);
    }
}
