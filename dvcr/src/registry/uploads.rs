//! The upload endpoints inside `dvcr serve` (`--upload-key`): the same routes and protocol
//! as `dvcr-uploader` (see `dvcr_uploader`), for every image at once, so a single-machine
//! DVCR takes `curl -T` uploads without a pod per upload.
//!
//! - `POST /upload-urls` with `{"dest": "vi/ns/name:uid", "ttl": "1h"}` mints a signed,
//!   expiring URL pair (`{"external", "inCluster", "token", "expiresAt"}`); `dvcr upload-url`
//!   is its client. The bases default to the address the request came to.
//! - `/upload/<token>` (and `/status` below it) goes to the uploader of the token's
//!   destination, created on first use: it receives, resumes and stores exactly as
//!   `dvcr-uploader` does, pushing the artifact into this registry in the process: the
//!   OCI client's requests go to the registry's own routes ([`InProcessRegistry`]), so an
//!   upload gets every check an HTTP push gets, and its bytes pass from the request body to
//!   the blob writer as they arrived, without a loopback connection (which cost two kernel
//!   copies per byte and, on two cores, a third of the upload's CPU time).
//!
//! Only for a registry without authentication: the in-process push has no credentials of
//! its own, and minting URLs would need an authorization model of its own (`serve` refuses
//! the combination at startup; use `dvcr-uploader` next to an authenticated DVCR).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use dvcr_importer::oci::{InProcess, LocalRegistry, RegistryOptions};
use dvcr_uploader::{Config, Signer, Target, Uploader};
use tower::ServiceExt;

/// The registry's routes as the OCI client's transport: requests are answered in the process,
/// on the registry's runtime, with bodies streamed both ways.
pub struct InProcessRegistry {
    app: Router,
    runtime: tokio::runtime::Handle,
}

impl InProcessRegistry {
    /// Serves `app` (the registry API, without the upload routes) on the current runtime.
    pub fn new(app: Router) -> Self {
        Self {
            app,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

/// Response body frames in flight from the registry to the client.
const RESPONSE_FRAMES: usize = 4;

impl InProcess for InProcessRegistry {
    fn call(
        &self,
        request: axum::http::Request<reqwest::Body>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = axum::http::Response<reqwest::Body>> + Send>,
    > {
        let app = self.app.clone();
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<bytes::Bytes, axum::Error>>(RESPONSE_FRAMES);
        let answered = self.runtime.spawn(async move {
            let response = match app.oneshot(request.map(Body::new)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let (parts, body) = response.into_parts();
            // The body is forwarded by a task of its own; the head goes back now.
            tokio::spawn(async move {
                let mut frames = body.into_data_stream();
                while let Some(frame) = futures_util::StreamExt::next(&mut frames).await {
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            });
            parts
        });
        Box::pin(async move {
            let body =
                reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|frame| (frame, rx))
                }));
            match answered.await {
                Ok(parts) => axum::http::Response::from_parts(parts, body),
                Err(e) => {
                    let mut response = axum::http::Response::new(reqwest::Body::from(format!(
                        "the registry stopped answering: {e}"
                    )));
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    response
                }
            }
        })
    }
}

/// Upload state of a running registry.
#[derive(Debug)]
pub struct Uploads {
    signer: Signer,
    /// `host:port` the registry answers on (it names the repository; requests go to `local`).
    registry: String,
    /// The registry, in the process.
    local: LocalRegistry,
    spool_dir: PathBuf,
    external_base: Option<String>,
    in_cluster_base: Option<String>,
    /// One uploader per destination (an image takes one upload).
    uploaders: Mutex<HashMap<String, Uploader>>,
}

/// Settings of the upload endpoints.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    /// The HMAC key file; `None`: `<root>/upload.key`, created when missing.
    pub key_file: Option<PathBuf>,
    /// Public base URL of upload URLs (default: the request's host).
    pub external_base: Option<String>,
    /// In-cluster base URL (default: the external one).
    pub in_cluster_base: Option<String>,
}

impl Uploads {
    /// Upload state for a registry answering on `registry` with its storage under `root`.
    pub fn new(
        settings: &UploadSettings,
        registry: String,
        local: InProcessRegistry,
        root: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let key_file = match &settings.key_file {
            Some(path) => path.clone(),
            None => default_key(root)?,
        };
        let signer = dvcr_uploader::token::load_key(&key_file).map_err(anyhow::Error::msg)?;
        let spool_dir = root.join("upload-spool");
        std::fs::create_dir_all(&spool_dir)?;
        Ok(Self {
            signer,
            registry,
            local: LocalRegistry(Arc::new(local)),
            spool_dir,
            external_base: settings.external_base.clone(),
            in_cluster_base: settings.in_cluster_base.clone(),
            uploaders: Mutex::new(HashMap::new()),
        })
    }

    /// The uploader for `destination`, created on first use.
    fn uploader(&self, destination: &str) -> Result<Uploader, String> {
        let mut map = self
            .uploaders
            .lock()
            .map_err(|_| "the upload table is poisoned".to_owned())?;
        if let Some(u) = map.get(destination) {
            return Ok(u.clone());
        }
        // A scratch directory per destination: uploads of different images never meet.
        let dir = self.spool_dir.join(hex::encode(destination.as_bytes()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let uploader = Uploader::new(Config {
            signer: self.signer.clone(),
            target: Target::Registry {
                registry: self.registry.clone(),
                options: RegistryOptions {
                    insecure: true,
                    local: Some(self.local.clone()),
                    ..RegistryOptions::default()
                },
            },
            checksums: Vec::new(),
            max_size: None,
            spool_dir: dir,
            termination_log: None,
            wait_timeout: None,
        });
        map.insert(destination.to_owned(), uploader.clone());
        Ok(uploader)
    }
}

/// `<root>/upload.key`, created (owner-only) with 32 random bytes in hex when missing, so
/// upload URLs stay valid across restarts.
fn default_key(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("upload.key");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(root)?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            file.write_all(hex::encode(random).as_bytes())?;
            file.sync_all()?;
        }
        // Another replica created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(anyhow::anyhow!("creating {}: {e}", path.display())),
    }
    Ok(path)
}

fn text(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// The routes, to merge into the registry's router.
pub fn router(uploads: Arc<Uploads>) -> Router {
    Router::new()
        .route("/upload", get(|| async { "ready\n" }))
        .route("/upload-urls", post(mint))
        .route("/upload/{token}", any(forward))
        .route("/upload/{token}/status", get(forward))
        .with_state(uploads)
}

/// The body of `POST /upload-urls`.
#[derive(Debug, serde::Deserialize)]
struct MintRequest {
    dest: String,
    #[serde(default)]
    ttl: Option<String>,
}

async fn mint(
    State(uploads): State<Arc<Uploads>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let request: MintRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{\"dest\": \"vi/ns/name:uid\", \"ttl\": \"1h\"}}: {e}"),
            );
        }
    };
    let ttl = match dvcr_uploader::token::parse_duration(request.ttl.as_deref().unwrap_or("1h")) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let from_request = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| format!("http://{host}"));
    let external = uploads.external_base.clone().or(from_request);
    let in_cluster = uploads.in_cluster_base.clone().or_else(|| external.clone());
    match dvcr_uploader::token::mint(
        &uploads.signer,
        &request.dest,
        ttl,
        external.as_deref(),
        in_cluster.as_deref(),
    ) {
        Ok(json) => (StatusCode::OK, axum::Json(json)).into_response(),
        Err(e) => text(StatusCode::BAD_REQUEST, e),
    }
}

/// Checks the token, then hands the request to its destination's uploader.
async fn forward(
    State(uploads): State<Arc<Uploads>>,
    Path(token): Path<String>,
    req: Request<Body>,
) -> Response {
    let claims = match uploads.signer.verify(&token, std::time::SystemTime::now()) {
        Ok(c) => c,
        // Checked before a byte of the body is read, answered as dvcr-uploader does.
        Err(e @ dvcr_uploader::TokenError::Malformed(_)) => {
            return text(StatusCode::UNAUTHORIZED, e);
        }
        Err(e) => return text(StatusCode::FORBIDDEN, e),
    };
    // The uploader's router matches the path again: it must not see this router's
    // captured path parameters (kept in the request's extensions).
    let (mut parts, body) = req.into_parts();
    parts.extensions = axum::http::Extensions::new();
    let req = Request::from_parts(parts, body);
    match uploads.uploader(&claims.destination) {
        Ok(uploader) => match dvcr_uploader::router(uploader).oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
