//! The DVCR registry: an OCI Distribution v1.1 server built for multi-gigabyte blobs.
//!
//! `dvcr serve` binds, prints exactly one line `listening on <addr>` on standard output, and
//! serves plain HTTP/1.1 and h2c, or TLS when a certificate and key are given, until SIGTERM
//! or SIGINT (then it stops accepting and lets requests in flight finish, for up to 30 s).
//!
//! Layers: [`names`] validates what comes from the URL, [`api`] speaks HTTP, [`storage`] keeps
//! the bytes (the filesystem today; it is a struct with methods so that an S3 backend can be
//! added behind the same methods), [`auth`] decides who may do what, [`tls`] loads
//! certificates, [`gc`] frees unreferenced blobs (offline or on a schedule), [`metrics`]
//! serves Prometheus metrics on `/metrics`.

pub mod api;
pub mod auth;
pub mod error;
pub mod gc;
pub mod metrics;
pub mod names;
pub mod s3;
pub mod storage;
pub mod tls;
pub mod uploads;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use self::api::{AppState, Limits};
use self::auth::{Auth, AuthConfig};
use self::storage::{Storage, StorageOptions};

/// Arguments of `dvcr serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (`host:port`; port 0 picks a free port, printed at startup).
    #[arg(long, env = "DVCR_LISTEN", default_value = "127.0.0.1:5000")]
    listen: String,

    /// Storage directory (blobs, manifests, tags, upload sessions).
    #[arg(long, env = "DVCR_ROOT", default_value = "./dvcr-data")]
    root: PathBuf,

    /// htpasswd file with bcrypt entries: enables Basic authentication.
    #[arg(long, env = "DVCR_HTPASSWD")]
    htpasswd: Option<PathBuf>,

    /// Access policy file: which user may pull, push or delete under which prefix.
    #[arg(long, env = "DVCR_AUTH_POLICY")]
    auth_policy: Option<PathBuf>,

    /// Allow pulls without credentials when authentication is enabled.
    #[arg(long, env = "DVCR_ANONYMOUS_PULL")]
    anonymous_pull: bool,

    /// Public URL of this registry's `/auth/token` endpoint: enables Bearer tokens.
    #[arg(long, env = "DVCR_TOKEN_REALM")]
    token_realm: Option<String>,

    /// Key file used to sign Bearer tokens.
    #[arg(long, env = "DVCR_TOKEN_KEY")]
    token_key: Option<PathBuf>,

    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "DVCR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DVCR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Refuse every write (405 UNSUPPORTED).
    #[arg(long, env = "DVCR_READ_ONLY")]
    read_only: bool,

    /// Upload sessions idle this long (seconds) are removed.
    #[arg(long, env = "DVCR_UPLOAD_EXPIRY", default_value_t = 24 * 3600)]
    upload_expiry_secs: u64,

    /// A request body that sends nothing for this long (seconds) is aborted; the upload
    /// session stays open for a resume.
    #[arg(long, env = "DVCR_IDLE_TIMEOUT", default_value_t = 300)]
    idle_timeout_secs: u64,

    /// At most this many upload sessions are open at once (429 TOOMANYREQUESTS above).
    #[arg(long, env = "DVCR_MAX_UPLOADS", default_value_t = 1024)]
    max_uploads: usize,

    /// Collect garbage online this often (e.g. `1h`); off when not given.
    #[arg(long, env = "DVCR_GC_INTERVAL", value_parser = gc::parse_duration)]
    gc_interval: Option<Duration>,

    /// Online collection: unreferenced blobs younger than this stay.
    #[arg(long, env = "DVCR_GC_GRACE", value_parser = gc::parse_duration, default_value = "1h")]
    gc_grace: Duration,

    /// Online collection: also delete untagged manifests nothing reaches.
    #[arg(long, env = "DVCR_GC_DELETE_UNTAGGED")]
    gc_delete_untagged: bool,

    /// The HMAC key (at least 16 bytes) that signs upload URLs for the `curl -T` endpoints
    /// (`/upload/<token>`, `POST /upload-urls`); default: `<root>/upload.key`, created with
    /// a random key. The endpoints are on unless --no-uploads, and off with --htpasswd or
    /// --read-only (an explicit key file with those is an error).
    #[arg(long, env = "DVCR_UPLOAD_KEY_FILE")]
    upload_key_file: Option<PathBuf>,

    /// Do not serve the upload endpoints.
    #[arg(long, env = "DVCR_NO_UPLOADS", conflicts_with = "upload_key_file")]
    no_uploads: bool,

    /// Public base URL of minted upload URLs (default: the host the request came to).
    #[arg(long, env = "DVCR_UPLOAD_EXTERNAL_BASE")]
    upload_external_base: Option<String>,

    /// In-cluster base URL of minted upload URLs (default: the public one).
    #[arg(long, env = "DVCR_UPLOAD_IN_CLUSTER_BASE")]
    upload_in_cluster_base: Option<String>,

    /// S3-compatible object storage instead of --root.
    #[command(flatten)]
    s3: s3::S3Args,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` to bind.
    pub listen: String,
    /// Storage root.
    pub root: PathBuf,
    /// The bucket, when the registry lives in S3 (`root` is then local scratch only).
    pub s3: Option<s3::S3Config>,
    /// Authentication.
    pub auth: AuthConfig,
    /// TLS certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Refuse writes.
    pub read_only: bool,
    /// Request limits.
    pub limits: Limits,
    /// Most open upload sessions.
    pub max_uploads: usize,
    /// Idle upload sessions are removed after this.
    pub upload_expiry: Duration,
    /// Online garbage collection: every this long, with these options.
    pub gc: Option<(Duration, gc::GcOptions)>,
    /// Upload endpoints, when enabled.
    pub uploads: Option<uploads::UploadSettings>,
}

/// Largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How long a new connection may take to send its request headers (and its TLS handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long requests in flight may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl From<&ServeArgs> for Config {
    fn from(a: &ServeArgs) -> Self {
        Config {
            listen: a.listen.clone(),
            root: a.root.clone(),
            s3: a.s3.config(),
            auth: AuthConfig {
                htpasswd: a.htpasswd.clone(),
                policy: a.auth_policy.clone(),
                anonymous_pull: a.anonymous_pull,
                token_realm: a.token_realm.clone(),
                token_key: a.token_key.clone(),
                service: "dvcr".to_owned(),
            },
            tls: a.tls_cert.clone().zip(a.tls_key.clone()),
            read_only: a.read_only,
            limits: Limits {
                max_manifest_bytes: MAX_MANIFEST_BYTES,
                idle_timeout: Duration::from_secs(a.idle_timeout_secs.max(1)),
            },
            max_uploads: a.max_uploads.max(1),
            upload_expiry: Duration::from_secs(a.upload_expiry_secs.max(60)),
            gc: a.gc_interval.map(|interval| {
                (
                    interval,
                    gc::GcOptions {
                        grace: a.gc_grace,
                        dry_run: false,
                        delete_untagged: a.gc_delete_untagged,
                        upload_expiry: Duration::from_secs(a.upload_expiry_secs.max(60)),
                    },
                )
            }),
            uploads: (!a.no_uploads).then(|| uploads::UploadSettings {
                key_file: a.upload_key_file.clone(),
                external_base: a.upload_external_base.clone(),
                in_cluster_base: a.upload_in_cluster_base.clone(),
            }),
        }
    }
}

/// `dvcr serve`: runs the registry until SIGTERM/SIGINT.
pub fn run(args: &ServeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dvcr serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(Config::from(args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dvcr serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds, prints `listening on <addr>`, and serves until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    dvcr_importer::chunk::tune_allocator();
    // Without an htpasswd file this is the open authorizer (and settings that need users
    // are refused).
    let auth = Auth::new(&config.auth).context("loading the authentication configuration")?;
    let tls = match &config.tls {
        Some((cert, key)) => {
            Some(tls::acceptor(cert, key).context("loading the TLS certificate and key")?)
        }
        None => None,
    };
    let options = StorageOptions {
        max_uploads: config.max_uploads,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let (storage, _root_lock) = match &config.s3 {
        Some(s3) => {
            let storage = Storage::open_s3(&config.root, options, s3)
                .await
                .with_context(|| format!("opening the storage in bucket {}", s3.bucket))?;
            (storage, None)
        }
        None => {
            let storage = Storage::open(&config.root, options)
                .await
                .with_context(|| format!("opening the storage at {}", config.root.display()))?;
            let lock = gc::RootLock::shared(&config.root)?;
            let root = config.root.clone();
            let (blobs, bytes) = tokio::task::spawn_blocking(move || gc::usage(&root))
                .await?
                .context("measuring the storage")?;
            metrics.set_storage(blobs, bytes);
            (storage, Some(lock))
        }
    };
    storage.set_metrics(Arc::clone(&metrics));
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let state = Arc::new(AppState {
        storage: storage.clone(),
        auth,
        read_only: config.read_only,
        limits: config.limits.clone(),
        metrics: Arc::clone(&metrics),
    });
    let mut app = api::router(state);
    let closed = config.auth.htpasswd.is_some() || config.read_only;
    if let Some(settings) = &config.uploads
        && closed
        && settings.key_file.is_some()
    {
        anyhow::bail!(
            "--upload-key-file cannot be combined with --htpasswd or --read-only: the upload \
             endpoints push into this registry without credentials; run dvcr-uploader next to \
             an authenticated DVCR instead"
        );
    }
    if let Some(settings) = config.uploads.as_ref().filter(|_| !closed) {
        let loopback = std::net::SocketAddr::new(
            if addr.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                addr.ip()
            },
            addr.port(),
        );
        let local = uploads::InProcessRegistry::new(app.clone());
        let state = uploads::Uploads::new(settings, loopback.to_string(), local, &config.root)
            .context("setting up the upload endpoints")?;
        app = app.merge(uploads::router(Arc::new(state)));
    }
    let app = app.layer(tower_http::trace::TraceLayer::new_for_http());

    let collector = config.gc.clone().map(|(interval, options)| {
        tokio::spawn(gc::periodic(
            storage.clone(),
            options,
            interval,
            Arc::clone(&metrics),
        ))
    });
    let storage_for_shutdown = storage.clone();
    let janitor = tokio::spawn(janitor(storage, config.upload_expiry));

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, root = %config.root.display(), tls = tls.is_some(), "registry started");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let stop = stop_rx.clone();
        let alive = alive_tx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, app, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => serve_connection(tls_stream, app, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(alive);
        });
    }
    tracing::info!("shutting down: finishing requests in flight");
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, alive_rx.recv()).await;
    janitor.abort();
    if let Some(c) = collector {
        c.abort();
    }
    if let Some(s3) = storage_for_shutdown.s3() {
        // A collection stopped mid-way must not leave its lock to block every replica.
        s3.release_gc_lock().await;
    }
    Ok(())
}

/// Serves one connection (HTTP/1.1 or HTTP/2) until it closes or the server stops.
async fn serve_connection<I>(io: I, app: axum::Router, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let service = TowerToHyperService::new(app);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Removes expired upload sessions now and then.
async fn janitor(storage: Storage, expiry: Duration) {
    let period = (expiry / 4).clamp(Duration::from_secs(60), Duration::from_secs(600));
    loop {
        tokio::time::sleep(period).await;
        let removed = storage.expire_uploads(expiry).await;
        if removed > 0 {
            tracing::info!(removed, "expired upload sessions removed");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
