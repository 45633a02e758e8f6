//! The HTTP API: one dispatcher routes every `/v2/...` path from the right (names contain
//! `/`), checks the name, read-only mode and authorization, then calls the handler of the
//! endpoint. Handlers live in one file per resource.

mod blobs;
mod listing;
mod manifests;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::auth::{Access, Action, Auth};
use super::error::{ApiError, Code};
use super::metrics::{self, Metrics};
use super::names::{self, Route};
use super::storage::Storage;

/// `Docker-Distribution-API-Version`, sent on every `/v2/` response.
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
/// `Docker-Content-Digest`.
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// `Docker-Upload-UUID`.
pub const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
/// `Dvcr-Upload-Digest`: on an upload session's answers, the digest of the bytes received so
/// far. A client that streams a blob it has not hashed (the importer, whose bytes this
/// registry hashes anyway to verify them) completes the upload with it: one hash pass, not
/// two. Other clients ignore it.
pub const UPLOAD_DIGEST: HeaderName = HeaderName::from_static("dvcr-upload-digest");
/// `OCI-Subject`.
pub const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
/// `OCI-Filters-Applied`.
pub const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// Limits applied by the handlers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest manifest accepted (413 above).
    pub max_manifest_bytes: usize,
    /// A request body that sends nothing for this long is aborted (the upload session stays).
    pub idle_timeout: Duration,
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The storage.
    pub storage: Storage,
    /// The authorizer.
    pub auth: Auth,
    /// Refuse every write.
    pub read_only: bool,
    /// Limits.
    pub limits: Limits,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
}

/// Shared state handle.
pub type Shared = Arc<AppState>;

/// Handler result: a response or an API error.
pub type ApiResult = Result<Response, ApiError>;

/// The router: `/healthz`, `/metrics` (unauthenticated), `/auth/token` when tokens are
/// enabled, and the `/v2/` API; every request is counted and timed.
pub fn router(state: Shared) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::handler));
    if state.auth.has_token_endpoint() {
        router = router.route("/auth/token", get(token));
    }
    router
        .fallback(dispatch)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn token(State(state): State<Shared>, req: Request) -> Response {
    let query = req.uri().query().unwrap_or("").to_owned();
    state.auth.token(req.headers(), &query)
}

async fn dispatch(State(state): State<Shared>, req: Request) -> Response {
    let mut resp = match route_request(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// The repository and actions a route needs.
fn access(route: &Route<'_>, method: &Method) -> Vec<Action> {
    match (route, method) {
        (Route::Base, _) => Vec::new(),
        (_, &Method::GET | &Method::HEAD) => match route {
            // Reading an upload's status is part of pushing.
            Route::Upload { .. } => vec![Action::Push],
            _ => vec![Action::Pull],
        },
        (Route::Upload { .. } | Route::StartUpload { .. }, _) => vec![Action::Push],
        (_, &Method::DELETE) => vec![Action::Delete],
        _ => vec![Action::Push],
    }
}

fn route_name<'a>(route: &Route<'a>) -> Option<&'a str> {
    match *route {
        Route::Base | Route::Catalog => None,
        Route::Tags { name }
        | Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::StartUpload { name }
        | Route::Upload { name, .. }
        | Route::Referrers { name, .. } => Some(name),
    }
}

async fn route_request(state: &Shared, req: Request) -> ApiResult {
    let not_found =
        || ApiError::new(Code::Unsupported, "no such endpoint").with_status(StatusCode::NOT_FOUND);
    let raw = req.uri().path().to_owned();
    let rest = match raw.strip_prefix("/v2") {
        Some("") => "",
        Some(r) => r.strip_prefix('/').ok_or_else(not_found)?,
        None => return Err(not_found()),
    };
    // Routed on the raw path: no legal name, tag or digest contains `%`, and decoding first
    // would let `a%2Fb` name the repository `a/b` under a second spelling that prefix-based
    // access rules could miss. A `%` left in a name is refused by its grammar.
    let route = names::route(rest).ok_or_else(not_found)?;
    let method = req.method().clone();
    let query = req
        .uri()
        .query()
        .map(names::parse_query)
        .unwrap_or_default();

    let allowed: &[Method] = match route {
        Route::Base | Route::Catalog | Route::Tags { .. } | Route::Referrers { .. } => {
            &[Method::GET, Method::HEAD]
        }
        Route::Manifest { .. } => &[Method::GET, Method::HEAD, Method::PUT, Method::DELETE],
        Route::Blob { .. } => &[Method::GET, Method::HEAD, Method::DELETE],
        Route::StartUpload { .. } => &[Method::POST],
        Route::Upload { .. } => &[Method::GET, Method::PATCH, Method::PUT, Method::DELETE],
    };
    if !allowed.contains(&method) {
        return Err(ApiError::new(
            Code::Unsupported,
            format!("{method} is not supported here"),
        ));
    }

    let name = route_name(&route);
    if let Some(name) = name {
        names::validate_name(name).map_err(|e| ApiError::new(Code::NameInvalid, e.to_string()))?;
    }
    let writes = !matches!(method, Method::GET | Method::HEAD);
    if writes && state.read_only {
        return Err(ApiError::new(
            Code::Unsupported,
            "this registry is read-only",
        ));
    }
    let access_needed = Access {
        repository: name.map(str::to_owned),
        actions: access(&route, &method),
    };
    if let Err(resp) = state.auth.authorize(req.headers(), &access_needed) {
        return Ok(resp);
    }

    let head = method == Method::HEAD;
    match route {
        Route::Base => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{}",
        )
            .into_response()),
        Route::Catalog => listing::catalog(state, &query).await,
        Route::Tags { name } => listing::tags(state, name, &query).await,
        Route::Referrers { name, digest } => listing::referrers(state, name, digest, &query).await,
        Route::Blob { name, digest } => match method {
            Method::DELETE => blobs::delete(state, name, digest).await,
            _ => blobs::get(state, name, digest, req.headers(), head).await,
        },
        Route::Manifest { name, reference } => match method {
            Method::PUT => {
                // From the blob checks to the revision write: a garbage collection waits for
                // this push to finish before it marks (see `gc`).
                let _ticket = state.storage.write_ticket();
                // With several replicas on a bucket: the same, through a pin object.
                let _pin = state.storage.pin().await?;
                manifests::put(state, name, reference, req).await
            }
            Method::DELETE => manifests::delete(state, name, reference).await,
            _ => manifests::get(state, name, reference, head).await,
        },
        Route::StartUpload { name } => uploads::start(state, name, &query, req).await,
        Route::Upload { name, id } => match method {
            Method::GET => uploads::status(state, name, id).await,
            Method::PATCH => uploads::patch(state, name, id, req).await,
            Method::PUT => uploads::put(state, name, id, &query, req).await,
            _ => uploads::cancel(state, name, id).await,
        },
    }
}

/// The first value of a query parameter.
pub fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A response with headers built from (name, value) strings; invalid values are skipped
/// (they come from validated names and digests, so this never happens in practice).
pub fn respond(status: StatusCode, headers: &[(HeaderName, String)], body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().insert(k.clone(), v);
        }
    }
    resp
}

/// Why reading a request body stopped early.
#[derive(Debug)]
pub enum BodyError {
    /// Nothing arrived for the idle timeout.
    Idle,
    /// The connection failed or the client went away.
    Broken(String),
    /// The body is larger than allowed.
    TooLarge,
}

/// The next data chunk of a body: Ok(None) at the end; waits at most `idle` for it.
pub async fn next_chunk(body: &mut Body, idle: Duration) -> Result<Option<Bytes>, BodyError> {
    loop {
        // A frame already buffered is taken without arming a timer: clients that send small
        // frames (skopeo: 32 KiB) would otherwise cost a timer entry per frame.
        let mut pending = body.frame();
        let ready = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut pending).poll(cx) {
                std::task::Poll::Ready(frame) => Some(frame),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        let next = match ready {
            Some(frame) => frame,
            None => match tokio::time::timeout(idle, pending).await {
                Err(_) => return Err(BodyError::Idle),
                Ok(frame) => frame,
            },
        };
        let frame = match next {
            None => return Ok(None),
            Some(Err(e)) => return Err(BodyError::Broken(e.to_string())),
            Some(Ok(frame)) => frame,
        };
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            return Ok(Some(data));
        }
    }
}

/// Reads a whole (small) body, refusing more than `max` bytes.
pub async fn read_limited(
    body: &mut Body,
    max: usize,
    idle: Duration,
) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(body, idle).await? {
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
