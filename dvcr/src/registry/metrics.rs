//! Prometheus metrics, served in the OpenMetrics text format on `GET /metrics`.
//!
//! The endpoint is not authenticated (like `/healthz`): it tells request counts and storage
//! sizes, never names, tags or digests. Every label has a small fixed set of values (the
//! `route` label is one of ping, blob, upload, manifest, tags, referrers, catalog, token and
//! other, never the raw path; unknown methods are `other`), so
//! a client cannot grow the series without bound.
//!
//! Request durations are measured until the response headers are ready: a blob download
//! streams its body afterwards, which `dvcr_blob_bytes_sent_total` accounts for as the bytes
//! leave. Upload durations run from the session's start (POST) to its commit.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::api::Shared;
use super::gc::GcReport;
use super::names::{self, Route};

/// The values of the `route` label.
#[cfg(test)]
const ROUTES: [&str; 9] = [
    "ping",
    "blob",
    "upload",
    "manifest",
    "tags",
    "referrers",
    "catalog",
    "token",
    "other",
];

/// `Content-Type` of the exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

fn request_buckets() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric of the registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    bytes_received: Counter,
    bytes_sent: Counter,
    upload_duration: Histogram,
    storage_bytes: Gauge,
    storage_blobs: Gauge,
    upload_sessions: Gauge,
    gc_runs: Counter,
    gc_freed_bytes: Counter,
    gc_freed_blobs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                request_buckets,
            );
        let bytes_received = Counter::default();
        let bytes_sent = Counter::default();
        // 10 ms .. ~43 min.
        let upload_duration = Histogram::new(exponential_buckets(0.01, 4.0, 12));
        let storage_bytes = Gauge::default();
        let storage_blobs = Gauge::default();
        let upload_sessions = Gauge::default();
        let gc_runs = Counter::default();
        let gc_freed_bytes = Counter::default();
        let gc_freed_blobs = Counter::default();
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "dvcr_http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "dvcr_http_request_duration_seconds",
            "Time to the response headers, by route",
            request_duration.clone(),
        );
        registry.register(
            "dvcr_blob_bytes_received",
            "Blob bytes received in upload request bodies",
            bytes_received.clone(),
        );
        registry.register(
            "dvcr_blob_bytes_sent",
            "Blob bytes sent in download response bodies",
            bytes_sent.clone(),
        );
        registry.register(
            "dvcr_upload_duration_seconds",
            "Blob uploads from the session start to the commit",
            upload_duration.clone(),
        );
        registry.register(
            "dvcr_storage_bytes",
            "Bytes of the blobs in the storage (manifests included)",
            storage_bytes.clone(),
        );
        registry.register(
            "dvcr_storage_blobs",
            "Blobs in the storage (manifests included)",
            storage_blobs.clone(),
        );
        registry.register(
            "dvcr_upload_sessions",
            "Open upload sessions",
            upload_sessions.clone(),
        );
        registry.register(
            "dvcr_gc_runs",
            "Garbage collections completed",
            gc_runs.clone(),
        );
        registry.register(
            "dvcr_gc_freed_bytes",
            "Bytes freed by garbage collection",
            gc_freed_bytes.clone(),
        );
        registry.register(
            "dvcr_gc_freed_blobs",
            "Blobs deleted by garbage collection",
            gc_freed_blobs.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            bytes_received,
            bytes_sent,
            upload_duration,
            storage_bytes,
            storage_blobs,
            upload_sessions,
            gc_runs,
            gc_freed_bytes,
            gc_freed_blobs,
        }
    }

    /// Sets the storage gauges (after the startup walk).
    pub fn set_storage(&self, blobs: u64, bytes: u64) {
        self.storage_blobs
            .set(i64::try_from(blobs).unwrap_or(i64::MAX));
        self.storage_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A new blob (or manifest) file appeared in the storage.
    pub fn blob_stored(&self, bytes: u64) {
        self.storage_blobs.inc();
        self.storage_bytes
            .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An upload session was committed after `elapsed`.
    pub fn upload_finished(&self, elapsed: Duration) {
        self.upload_duration.observe(elapsed.as_secs_f64());
    }

    /// A garbage collection finished.
    pub fn gc_finished(&self, report: &GcReport) {
        self.gc_runs.inc();
        if report.dry_run {
            return;
        }
        self.gc_freed_bytes.inc_by(report.bytes_freed);
        self.gc_freed_blobs.inc_by(report.blobs_deleted as u64);
        self.storage_blobs
            .dec_by(i64::try_from(report.blobs_deleted).unwrap_or(0));
        self.storage_bytes
            .dec_by(i64::try_from(report.bytes_freed).unwrap_or(0));
    }

    /// The exposition text.
    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `route` label of a request path.
pub fn route_label(path: &str) -> &'static str {
    if path == "/auth/token" {
        return "token";
    }
    let rest = match path.strip_prefix("/v2") {
        Some("") => "",
        Some(r) => match r.strip_prefix('/') {
            Some(r) => r,
            None => return "other",
        },
        None => return "other",
    };
    match names::route(rest) {
        Some(Route::Base) => "ping",
        Some(Route::Catalog) => "catalog",
        Some(Route::Tags { .. }) => "tags",
        Some(Route::Manifest { .. }) => "manifest",
        Some(Route::Blob { .. }) => "blob",
        Some(Route::StartUpload { .. } | Route::Upload { .. }) => "upload",
        Some(Route::Referrers { .. }) => "referrers",
        None => "other",
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts a body's data bytes into `counter` as they pass.
fn counted(body: Body, counter: Counter) -> Body {
    Body::new(body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    }))
}

/// Middleware: counts and times every request, and the blob bytes in and out.
pub async fn track(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let metrics = &state.metrics;
    let started = Instant::now();
    let route = route_label(req.uri().path());
    let method = req.method().clone();
    let req = if route == "upload" {
        let counter = metrics.bytes_received.clone();
        req.map(|b| counted(b, counter))
    } else {
        req
    };
    let resp = next.run(req).await;
    let status = resp.status();
    metrics
        .request_duration
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method_label(&method),
            route,
            status: status.as_u16(),
        })
        .inc();
    if route == "blob"
        && method == Method::GET
        && (status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT)
    {
        let counter = metrics.bytes_sent.clone();
        resp.map(|b| counted(b, counter))
    } else {
        resp
    }
}

/// `GET /metrics`.
pub async fn handler(State(state): State<Shared>) -> Response {
    let metrics = &state.metrics;
    metrics
        .upload_sessions
        .set(i64::try_from(state.storage.open_uploads()).unwrap_or(i64::MAX));
    match metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_from_a_fixed_set_never_the_path() {
        assert_eq!(route_label("/v2/"), "ping");
        assert_eq!(route_label("/v2"), "ping");
        assert_eq!(route_label("/v2/_catalog"), "catalog");
        assert_eq!(route_label("/v2/a/b/tags/list"), "tags");
        assert_eq!(route_label("/v2/a/manifests/latest"), "manifest");
        assert_eq!(route_label("/v2/a/blobs/sha256:abc"), "blob");
        assert_eq!(route_label("/v2/a/blobs/uploads/"), "upload");
        assert_eq!(route_label("/v2/a/blobs/uploads/some-id"), "upload");
        assert_eq!(route_label("/v2/a/referrers/sha256:abc"), "referrers");
        assert_eq!(route_label("/auth/token"), "token");
        assert_eq!(route_label("/metrics"), "other");
        assert_eq!(route_label("/v2x/whatever"), "other");
        for path in ["/v2/", "/v2/a/blobs/x", "/nope", "/v2/a/b/c/d"] {
            assert!(ROUTES.contains(&route_label(path)));
        }
    }

    #[test]
    fn the_exposition_names_every_metric() {
        let m = Metrics::new();
        m.set_storage(3, 300);
        m.blob_stored(20);
        m.upload_finished(Duration::from_millis(5));
        let text = m.encode().unwrap();
        for name in [
            "dvcr_blob_bytes_received_total 0",
            "dvcr_blob_bytes_sent_total 0",
            "dvcr_storage_bytes 320",
            "dvcr_storage_blobs 4",
            "dvcr_upload_duration_seconds_count 1",
            "dvcr_gc_runs_total 0",
            "dvcr_gc_freed_bytes_total 0",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
    }
}
