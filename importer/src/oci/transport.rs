//! The HTTP side of the registry client: one `reqwest` client per purpose, the scheme and
//! authentication of each registry (found by pinging `/v2/` once), requests that answer a
//! 401 challenge by fetching a token (or sending Basic credentials) and trying again, the
//! mapping of HTTP answers to [`OciError`] kinds, and blob downloads as blocking readers
//! that verify the digest and size of every byte before they report the end.
//!
//! Two HTTP clients: reqwest's `read_timeout` runs from the moment a request is sent until
//! its response head arrives, so the client with the 60 s idle timeout serves requests with
//! small bodies and downloads (whose body reads each reset it), and a client without it
//! sends streamed uploads, whose idle time is watched by the uploader itself (see
//! `push.rs`), and the PUT that completes an upload (a registry may hash or copy gigabytes
//! before it answers). TCP and HTTP/2 keep-alives notice a dead peer on both.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest as _;

use super::auth::{AuthConfig, Challenge, Credential, parse_www_authenticate};
use super::error::{OciError, OciErrorKind};
use super::manifest::Descriptor;

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transfer may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of an error body or token answer read.
const MAX_SMALL_BODY: usize = 1 << 20;
/// How often a broken blob download is resumed with a `Range` request.
const MAX_RESUMES: u32 = 3;
/// Chunks buffered between a download task and its blocking reader.
const DOWNLOAD_CHUNKS: usize = 32;

/// What a registry needs, learned once from `GET /v2/`.
#[derive(Debug, Clone)]
struct RegistryState {
    /// `https://host/` or `http://host/`.
    base: Url,
    /// How it asked us to authenticate, if it did.
    challenge: Option<Challenge>,
}

#[derive(Debug)]
struct CachedToken {
    value: String,
    expires: Instant,
}

/// The shared state of a client: HTTP clients, credentials, what each registry wants.
#[derive(Debug)]
pub(crate) struct Core {
    http: reqwest::Client,
    upload: reqwest::Client,
    insecure: bool,
    auth: AuthConfig,
    registries: Mutex<HashMap<String, RegistryState>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Requests go to this registry in the process, not over the network.
    local: Option<super::LocalRegistry>,
}

/// One request, re-sendable (the body is in memory) for the authentication retry.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The method.
    pub method: Method,
    /// The URL (on the registry, or a `Location` it gave).
    pub url: Url,
    /// Token scopes (`repository:<name>:pull[,push]`).
    pub scopes: Vec<String>,
    /// Extra headers.
    pub headers: HeaderMap,
    /// The body, when there is one.
    pub body: Option<Bytes>,
}

impl Call {
    /// A bodyless `method` request for `url` with `scopes`.
    pub fn new(method: Method, url: Url, scopes: Vec<String>) -> Self {
        Self {
            method,
            url,
            scopes,
            headers: HeaderMap::new(),
            body: None,
        }
    }

    /// Adds a header (values come from this crate, so a bad one is a bug, skipped).
    pub fn header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }
}

/// `repository:<name>:pull`.
pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// `repository:<name>:pull,push`.
pub(crate) fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// The TLS roots and trust settings both HTTP clients share.
fn builder(ca_certs: &[reqwest::Certificate], insecure: bool) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_keepalive_interval(Duration::from_secs(10))
        .tcp_keepalive_retries(6u32)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false)
        .redirect(reqwest::redirect::Policy::limited(10))
        .user_agent(concat!("dvcr/", env!("CARGO_PKG_VERSION")));
    for cert in ca_certs {
        b = b.add_root_certificate(cert.clone());
    }
    if insecure {
        b = b.danger_accept_invalid_certs(true);
    }
    b
}

/// Every PEM certificate in the files of `dir` (files ending in `.key` are skipped; files
/// without a certificate are skipped; a file that has one that does not parse is an error).
fn load_ca_dir(dir: &Path) -> Result<Vec<reqwest::Certificate>, OciError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        OciError::invalid(format!(
            "cannot read the CA certificate directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    let mut certs = Vec::new();
    for path in names {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Kubernetes mounts add `..data` links; the files themselves are links into it.
        if name.starts_with('.') || name.ends_with(".key") {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > 16 << 20 {
            continue;
        }
        let pem = std::fs::read(&path).map_err(|e| {
            OciError::invalid(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            tracing::debug!(file = %path.display(), "no PEM certificate in this file; skipped");
            continue;
        }
        let found = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            OciError::invalid(format!(
                "the CA file {} has a PEM certificate that does not parse: {e}",
                path.display()
            ))
        })?;
        tracing::debug!(file = %path.display(), count = found.len(), "CA certificates added");
        certs.extend(found);
    }
    Ok(certs)
}

impl Core {
    /// HTTP clients with the options' trust settings and credentials.
    pub fn new(
        auth: AuthConfig,
        ca_dir: Option<&Path>,
        insecure: bool,
        local: Option<super::LocalRegistry>,
    ) -> Result<Self, OciError> {
        let certs = match ca_dir {
            Some(dir) => load_ca_dir(dir)?,
            None => Vec::new(),
        };
        let http = builder(&certs, insecure)
            .read_timeout(IDLE_TIMEOUT)
            .build()
            .map_err(|e| OciError::invalid(format!("cannot set up the HTTP client: {e}")))?;
        let upload = builder(&certs, insecure)
            .build()
            .map_err(|e| OciError::invalid(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            http,
            upload,
            insecure,
            auth,
            registries: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            local,
        })
    }

    /// Sends a request over the network, or to the registry in the process.
    async fn execute(&self, rb: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
        let Some(local) = &self.local else {
            return rb.send().await;
        };
        let request = hyper::http::Request::<reqwest::Body>::try_from(rb.build()?)?;
        Ok(reqwest::Response::from(local.0.call(request).await))
    }

    /// `<base>/v2/<path>` on `registry`, pinging it first if it is new.
    pub async fn url(&self, registry: &str, path: &str) -> Result<Url, OciError> {
        let base = self.state(registry).await?.base;
        base.join(&format!("v2/{path}")).map_err(|e| {
            OciError::invalid(format!("cannot form a URL for {registry}/v2/{path}: {e}"))
        })
    }

    /// What `registry` wants, pinging `/v2/` the first time.
    async fn state(&self, registry: &str) -> Result<RegistryState, OciError> {
        if let Some(s) = lock(&self.registries).get(registry) {
            return Ok(s.clone());
        }
        let schemes: &[&str] = if self.insecure {
            &["https", "http"]
        } else {
            &["https"]
        };
        let mut failures = Vec::new();
        for scheme in schemes {
            let base = Url::parse(&format!("{scheme}://{registry}/")).map_err(|e| {
                OciError::invalid(format!("{registry} is not a registry address: {e}"))
            })?;
            let ping = base.join("v2/").map_err(|e| {
                OciError::invalid(format!("{registry} is not a registry address: {e}"))
            })?;
            match self.execute(self.http.get(ping.clone())).await {
                Ok(resp) => {
                    let challenge = pick_challenge(resp.headers());
                    match resp.status() {
                        s if s.is_success() || s == StatusCode::UNAUTHORIZED => {}
                        s => {
                            tracing::debug!(%ping, status = s.as_u16(), "the registry ping answered oddly; going on")
                        }
                    }
                    let state = RegistryState { base, challenge };
                    tracing::debug!(registry, base = %state.base, challenge = ?state.challenge, "registry found");
                    lock(&self.registries).insert(registry.to_owned(), state.clone());
                    return Ok(state);
                }
                Err(e) => {
                    tracing::debug!(%ping, error = %crate::error::chain(&e), "registry ping failed");
                    failures.push(network_error(&e, &format!("cannot reach {ping}")));
                }
            }
        }
        let mut error = failures
            .pop()
            .unwrap_or_else(|| OciError::transient(format!("cannot reach {registry}")));
        if self.insecure && !failures.is_empty() {
            error = error.context(format!("over https and http, {registry}"));
        } else if !self.insecure && error.is_transient() {
            error = OciError::new(
                error.kind(),
                format!(
                    "{error}; if {registry} serves plain HTTP or a certificate signed by a private CA, add its CA certificate to the certificate directory or allow insecure access"
                ),
            );
        }
        Err(error)
    }

    /// Sends `call`, answering a 401 challenge once (token or Basic) and sending again.
    pub async fn send(&self, registry: &str, call: &Call) -> Result<reqwest::Response, OciError> {
        self.state(registry).await?;
        let mut scopes = call.scopes.clone();
        let mut fresh_token = false;
        for attempt in 0..2 {
            let mut rb = self
                .http
                .request(call.method.clone(), call.url.clone())
                .headers(call.headers.clone());
            if let Some(auth) = self
                .authorization(registry, &call.url, &scopes, fresh_token)
                .await?
            {
                rb = rb.header(header::AUTHORIZATION, auth);
            }
            if let Some(body) = &call.body {
                rb = rb.body(body.clone());
            }
            let resp = self.execute(rb).await.map_err(|e| {
                network_error(&e, &format!("{} {}", call.method, redact(&call.url)))
            })?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                if attempt == 1 && resp.status() != StatusCode::UNAUTHORIZED {
                    // The wider token worked: later requests for the same scopes use it too.
                    self.alias_token(registry, &scopes, &call.scopes);
                }
                return Ok(resp);
            }
            let Some(challenge) = pick_challenge(resp.headers()) else {
                return Ok(resp);
            };
            let previous = lock(&self.registries)
                .get(registry)
                .and_then(|s| s.challenge.clone());
            match &challenge {
                Challenge::Basic => {
                    let have_creds =
                        matches!(self.auth.lookup(registry), Some(Credential::Basic { .. }));
                    // Basic credentials sent already and refused: no point sending them again.
                    if !have_creds || previous == Some(Challenge::Basic) {
                        return Ok(resp);
                    }
                }
                Challenge::Bearer { scope, .. } => {
                    if let Some(scope) = scope {
                        for s in scope.split(' ').filter(|s| !s.is_empty()) {
                            if !scopes.iter().any(|have| have == s) {
                                scopes.push(s.to_owned());
                            }
                        }
                    }
                    fresh_token = true;
                }
            }
            if let Some(state) = lock(&self.registries).get_mut(registry) {
                state.challenge = Some(challenge);
            }
        }
        Err(OciError::invalid("unreachable: the retry loop ended"))
    }

    /// Sends a streamed body with the authorization known so far (a stream cannot be sent
    /// twice, so the 401 dance must have happened on an earlier request), on the client
    /// without a read timeout.
    pub async fn send_stream(
        &self,
        registry: &str,
        method: Method,
        url: Url,
        scopes: &[String],
        headers: HeaderMap,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, OciError> {
        let mut rb = self
            .upload
            .request(method.clone(), url.clone())
            .headers(headers)
            .body(body);
        if let Some(auth) = self.authorization(registry, &url, scopes, false).await? {
            rb = rb.header(header::AUTHORIZATION, auth);
        }
        self.execute(rb)
            .await
            .map_err(|e| network_error(&e, &format!("{method} {}", redact(&url))))
    }

    /// [`Core::send`] for a call that must succeed: a failure to send, or an answer that is
    /// not a success, becomes an error about `what` (with the registry's own message).
    pub async fn send_ok(
        &self,
        registry: &str,
        call: &Call,
        what: &str,
    ) -> Result<reqwest::Response, OciError> {
        let resp = self
            .send(registry, call)
            .await
            .map_err(|e| e.context(what))?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, what, registry).await);
        }
        Ok(resp)
    }

    /// Like [`Core::send`] but on the client without a read timeout, for a request whose
    /// answer may take long (the PUT that completes a multi-gigabyte upload).
    pub async fn send_slow(
        &self,
        registry: &str,
        call: &Call,
    ) -> Result<reqwest::Response, OciError> {
        let mut rb = self
            .upload
            .request(call.method.clone(), call.url.clone())
            .headers(call.headers.clone());
        if let Some(auth) = self
            .authorization(registry, &call.url, &call.scopes, false)
            .await?
        {
            rb = rb.header(header::AUTHORIZATION, auth);
        }
        if let Some(body) = &call.body {
            rb = rb.body(body.clone());
        }
        let resp = self
            .execute(rb)
            .await
            .map_err(|e| network_error(&e, &format!("{} {}", call.method, redact(&call.url))))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            // The token may have expired during a long upload: once more with a fresh one.
            drop(resp);
            return self.send(registry, call).await;
        }
        Ok(resp)
    }

    /// The `Authorization` value for `url` on `registry`, fetching a token when needed.
    async fn authorization(
        &self,
        registry: &str,
        url: &Url,
        scopes: &[String],
        fresh: bool,
    ) -> Result<Option<HeaderValue>, OciError> {
        if !same_origin(url, registry) {
            return Ok(None);
        }
        let challenge = lock(&self.registries)
            .get(registry)
            .and_then(|s| s.challenge.clone());
        let value = match challenge {
            None => return Ok(None),
            Some(Challenge::Basic) => match self.auth.lookup(registry) {
                Some(Credential::Basic { username, password }) => {
                    use base64::Engine;
                    let raw = format!("{username}:{password}");
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    )
                }
                _ => return Ok(None),
            },
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self
                    .token(registry, &realm, service.as_deref(), scopes, fresh)
                    .await?;
                format!("Bearer {token}")
            }
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            OciError::invalid(format!(
                "the credentials for {registry} hold characters that cannot go in an HTTP header"
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// A token for `scopes` from `realm`, cached until it expires.
    async fn token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        fresh: bool,
    ) -> Result<String, OciError> {
        let key = token_key(registry, realm, service, scopes);
        if !fresh
            && let Some(t) = lock(&self.tokens).get(&key)
            && t.expires > Instant::now()
        {
            return Ok(t.value.clone());
        }
        let url = Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                OciError::invalid(format!(
                    "{registry} sends clients for tokens to {}, which is not an http(s) URL",
                    super::reference::shown(realm)
                ))
            })?;
        let what = format!("getting a token for {registry} from {}", redact(&url));
        let credential = self.auth.lookup(registry);
        let rb = match credential {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form: Vec<(&str, &str)> = vec![
                    ("grant_type", "refresh_token"),
                    ("client_id", "dvcr"),
                    ("refresh_token", refresh),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                let joined = scopes.join(" ");
                if !joined.is_empty() {
                    form.push(("scope", &joined));
                }
                self.http.post(url.clone()).form(&form)
            }
            other => {
                let mut query: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = service {
                    query.push(("service", s));
                }
                for s in scopes {
                    query.push(("scope", s));
                }
                let rb = self.http.get(url.clone()).query(&query);
                match other {
                    Some(Credential::Basic { username, password }) => {
                        rb.basic_auth(username, Some(password))
                    }
                    _ => rb,
                }
            }
        };
        let resp = rb.send().await.map_err(|e| network_error(&e, &what))?;
        if !resp.status().is_success() {
            let mut e = self.status_error(resp, &what, registry).await;
            if e.kind() == OciErrorKind::Unauthorized {
                e = OciError::new(
                    OciErrorKind::Unauthorized,
                    format!(
                        "{what}: the token service refused {}",
                        self.credentials_hint(registry)
                    ),
                );
            }
            return Err(e);
        }
        let body = read_small(resp, MAX_SMALL_BODY, &what).await?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| OciError::invalid(format!("{what}: the answer is not token JSON: {e}")))?;
        let token = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| OciError::invalid(format!("{what}: the answer holds no token")))?;
        // Tokens live at least 60 s (the distribution spec's default); renew a little early.
        let life = answer.expires_in.unwrap_or(60).clamp(60, 24 * 3600);
        lock(&self.tokens).insert(
            key,
            CachedToken {
                value: token.clone(),
                expires: Instant::now() + Duration::from_secs(life - 10),
            },
        );
        Ok(token)
    }

    /// Files the token cached for `from` scopes under `to` scopes as well.
    fn alias_token(&self, registry: &str, from: &[String], to: &[String]) {
        if from == to {
            return;
        }
        let challenge = lock(&self.registries)
            .get(registry)
            .and_then(|s| s.challenge.clone());
        let Some(Challenge::Bearer { realm, service, .. }) = challenge else {
            return;
        };
        let mut tokens = lock(&self.tokens);
        let found = tokens
            .get(&token_key(registry, &realm, service.as_deref(), from))
            .map(|t| CachedToken {
                value: t.value.clone(),
                expires: t.expires,
            });
        if let Some(t) = found {
            tokens.insert(token_key(registry, &realm, service.as_deref(), to), t);
        }
    }

    /// Says which credentials were used for `registry`, for messages.
    pub fn credentials_hint(&self, registry: &str) -> String {
        match (self.auth.lookup(registry), self.auth.source()) {
            (Some(_), Some(path)) => format!(
                "the credentials for {registry} from {}: check the user name and password and their rights",
                path.display()
            ),
            (Some(_), None) => format!(
                "the credentials for {registry}: check the user name and password and their rights"
            ),
            (None, Some(path)) => format!(
                "anonymous access ({} has no entry for {registry}): add credentials for it",
                path.display()
            ),
            (None, None) => format!(
                "anonymous access: give a docker config.json with credentials for {registry}"
            ),
        }
    }

    /// The error for a response that is not a success, with the registry's error code and
    /// message when its body has them.
    pub async fn status_error(
        &self,
        resp: reqwest::Response,
        what: &str,
        registry: &str,
    ) -> OciError {
        let status = resp.status();
        let body = read_small(resp, 64 << 10, what).await.unwrap_or_default();
        let detail = registry_error_text(&body);
        let code = status.as_u16();
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        match code {
            401 => OciError::new(
                OciErrorKind::Unauthorized,
                format!(
                    "{what}: the registry answered HTTP 401{detail}; it refused {}",
                    self.credentials_hint(registry)
                ),
            ),
            403 => OciError::new(
                OciErrorKind::Denied,
                format!(
                    "{what}: the registry answered HTTP 403{detail}: the credentials for {registry} lack the right for this; ask for access"
                ),
            ),
            404 => OciError::new(
                OciErrorKind::NotFound,
                format!(
                    "{what}: not found (HTTP 404{detail}); check the repository, tag or digest"
                ),
            ),
            408 | 429 | 500..=599 => OciError::transient(format!(
                "{what}: the registry answered HTTP {code}{detail}; try again later"
            )),
            400 if detail.contains("DIGEST_INVALID") || detail.contains("SIZE_INVALID") => {
                OciError::digest(format!(
                    "{what}: the registry refused the digest (HTTP 400{detail}): the bytes sent do not hash to it"
                ))
            }
            _ => OciError::invalid(format!("{what}: the registry answered HTTP {code}{detail}")),
        }
    }

    /// Opens a blob for reading on a task of `runtime`; blocks until the registry answered.
    pub fn open_blob(
        self: &std::sync::Arc<Self>,
        runtime: &tokio::runtime::Handle,
        registry: &str,
        repository: &str,
        layer: &Descriptor,
        what: String,
    ) -> Result<BlobReader, OciError> {
        let (head_tx, head_rx) = mpsc::sync_channel::<Result<(), OciError>>(1);
        let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(DOWNLOAD_CHUNKS);
        let core = self.clone();
        let registry = registry.to_owned();
        let path = format!("{repository}/blobs/{}", layer.digest);
        let scopes = vec![pull_scope(repository)];
        let task_what = what.clone();
        let size = layer.size;
        runtime.spawn(async move {
            core.download(&registry, &path, scopes, size, task_what, head_tx, chunk_tx)
                .await;
        });
        head_rx.recv().map_err(|_| {
            OciError::transient(format!("{what}: the download stopped before an answer"))
        })??;
        Ok(BlobReader {
            chunks: chunk_rx,
            current: Bytes::new(),
            hasher: Hasher::for_digest(&layer.digest),
            digest: layer.digest.clone(),
            size: layer.size,
            seen: 0,
            state: ReadState::Open,
            what,
        })
    }

    /// Streams one blob into `chunks`, resuming with `Range` after a broken connection.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        registry: &str,
        path: &str,
        scopes: Vec<String>,
        size: u64,
        what: String,
        head: mpsc::SyncSender<Result<(), OciError>>,
        chunks: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    ) {
        let url = match self.url(registry, path).await {
            Ok(u) => u,
            Err(e) => {
                let _ = head.send(Err(e.context(&what)));
                return;
            }
        };
        let mut resp = match self
            .send(
                registry,
                &Call::new(Method::GET, url.clone(), scopes.clone()),
            )
            .await
        {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let _ = head.send(Err(self.status_error(r, &what, registry).await));
                return;
            }
            Err(e) => {
                let _ = head.send(Err(e.context(&what)));
                return;
            }
        };
        if head.send(Ok(())).is_err() {
            return;
        }
        let mut received: u64 = 0;
        let mut resumes = 0;
        // Bytes of a resumed answer to drop because the server sent them from the start.
        let mut skip: u64 = 0;
        loop {
            match resp.chunk().await {
                Ok(Some(mut chunk)) => {
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64) as usize;
                        skip -= n as u64;
                        let _ = chunk.split_to(n);
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    received += chunk.len() as u64;
                    if send_chunk(&chunks, Ok(chunk)).await.is_err() {
                        return;
                    }
                    // More than promised: the reader reports it; stop fetching.
                    if received > size {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let error = network_error(&e, &format!("{what}: the download broke off"));
                    if resumes >= MAX_RESUMES || received == 0 || received >= size {
                        let _ = send_chunk(&chunks, Err(error.into_io())).await;
                        return;
                    }
                    resumes += 1;
                    tracing::warn!(%what, received, attempt = resumes, error = %error, "blob download broke off; resuming");
                    let call = Call::new(Method::GET, url.clone(), scopes.clone())
                        .header(header::RANGE, &format!("bytes={received}-"));
                    match self.send(registry, &call).await {
                        Ok(r) if r.status() == StatusCode::PARTIAL_CONTENT => {
                            let start = r
                                .headers()
                                .get(header::CONTENT_RANGE)
                                .and_then(|v| v.to_str().ok())
                                .and_then(content_range_start);
                            if start != Some(received) {
                                let e = OciError::transient(format!(
                                    "{what}: resuming at byte {received}, the registry answered a different range"
                                ));
                                let _ = send_chunk(&chunks, Err(e.into_io())).await;
                                return;
                            }
                            resp = r;
                        }
                        Ok(r) if r.status() == StatusCode::OK => {
                            skip = received;
                            resp = r;
                        }
                        Ok(r) => {
                            let e = self.status_error(r, &what, registry).await;
                            let _ = send_chunk(&chunks, Err(e.into_io())).await;
                            return;
                        }
                        Err(e) => {
                            let _ = send_chunk(&chunks, Err(e.context(&what).into_io())).await;
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The token cache key of a registry, token service and scopes.
fn token_key(registry: &str, realm: &str, service: Option<&str>, scopes: &[String]) -> String {
    format!(
        "{registry}\n{realm}\n{}\n{}",
        service.unwrap_or(""),
        scopes.join(" ")
    )
}

/// Hands a chunk to the blocking reader, waiting while its buffer is full.
async fn send_chunk(
    tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    item: io::Result<Bytes>,
) -> Result<(), ()> {
    tx.send(item).await.map_err(|_| ())
}

/// `bytes N-M/T` → N.
fn content_range_start(value: &str) -> Option<u64> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

/// The challenge to answer among the `WWW-Authenticate` headers: Bearer over Basic.
fn pick_challenge(headers: &HeaderMap) -> Option<Challenge> {
    let mut all = Vec::new();
    for value in headers.get_all(header::WWW_AUTHENTICATE) {
        if let Ok(text) = value.to_str() {
            all.extend(parse_www_authenticate(text));
        }
    }
    all.iter()
        .find(|c| matches!(c, Challenge::Bearer { .. }))
        .or(all.first())
        .cloned()
}

/// Whether `url` points at `registry` (`host[:port]`).
fn same_origin(url: &Url, registry: &str) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let (reg_host, reg_port) = match registry.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().ok()),
        _ => (registry, None),
    };
    host.eq_ignore_ascii_case(reg_host)
        && match reg_port {
            Some(p) => url.port_or_known_default() == Some(p),
            None => url.port().is_none(),
        }
}

/// A URL without its query (upload locations may carry state tokens) for messages.
pub(crate) fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    shown.to_string()
}

/// The error for a request that got no answer: network trouble is transient, a refused
/// certificate is not (it will be refused again).
pub(crate) fn network_error(e: &reqwest::Error, what: &str) -> OciError {
    let chain = crate::error::chain(e);
    let lower = chain.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") {
        return OciError::invalid(format!(
            "{what}: the TLS certificate was refused ({chain}); add the registry's CA certificate to the certificate directory, or allow insecure access"
        ));
    }
    let why = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    OciError::transient(format!("{what}: {why}: {chain}"))
}

/// `CODE: message` of each error in an OCI error body, or a short piece of other text.
fn registry_error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(body) {
        return parsed
            .errors
            .iter()
            .take(3)
            .map(|e| {
                let code: String = e.code.as_deref().unwrap_or("").chars().take(64).collect();
                let msg: String = e
                    .message
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect();
                if msg.is_empty() {
                    code
                } else {
                    format!("{code}: {msg}")
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    text.trim().to_owned()
}

/// Reads at most `limit` bytes of a small body; more is an error.
pub(crate) async fn read_small(
    mut resp: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, OciError> {
    if let Some(len) = content_length(resp.headers())
        && len > limit as u64
    {
        return Err(OciError::invalid(format!(
            "{what}: the answer is {len} bytes, more than the {limit} accepted"
        )));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(OciError::invalid(format!(
                        "{what}: the answer is more than the {limit} bytes accepted"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(network_error(&e, what)),
        }
    }
}

/// The `Content-Length` header (reqwest's own accessor reports 0 for HEAD answers).
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A header's text.
pub(crate) fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// Locks a mutex, going on with the data of a holder that panicked (the maps stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A digest function matching a digest's algorithm.
#[derive(Debug, Clone)]
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// The hasher for `digest` (`sha512:` or else sha256).
    pub fn for_digest(digest: &str) -> Self {
        if digest.starts_with("sha512:") {
            Hasher::Sha512(sha2::Sha512::new())
        } else {
            Hasher::Sha256(sha2::Sha256::new())
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// `algorithm:hex` of everything fed.
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        }
    }

    /// `algorithm:hex` of `data`, with the algorithm of `like`.
    pub fn digest_like(like: &str, data: &[u8]) -> String {
        let mut h = Self::for_digest(like);
        h.update(data);
        h.finish()
    }
}

#[derive(Debug)]
enum ReadState {
    Open,
    Verified,
    Failed(OciError),
}

/// A blob's bytes as a blocking reader. The end is reported only once every byte has been
/// read and the size and digest match the descriptor; otherwise the read fails with an
/// [`OciErrorKind::Digest`] error (carried in the `io::Error`, see [`OciError::from_io`]).
#[derive(Debug)]
pub(crate) struct BlobReader {
    chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    hasher: Hasher,
    digest: String,
    size: u64,
    seen: u64,
    state: ReadState,
    what: String,
}

impl BlobReader {
    fn fail(&mut self, e: OciError) -> io::Error {
        self.state = ReadState::Failed(e.clone());
        e.into_io()
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &self.state {
                ReadState::Verified => return Ok(0),
                ReadState::Failed(e) => return Err(e.clone().into_io()),
                ReadState::Open => {}
            }
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                let chunk = self.current.split_to(n);
                buf[..n].copy_from_slice(&chunk);
                self.hasher.update(&chunk);
                self.seen += n as u64;
                return Ok(n);
            }
            if buf.is_empty() {
                return Ok(0);
            }
            // A blocking wait: this reader runs on a blocking thread, never on the runtime.
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => {
                    if self.seen + (chunk.len() as u64) > self.size {
                        let e = OciError::digest(format!(
                            "{}: the registry sent more than the {} bytes the manifest gives for {}",
                            self.what, self.size, self.digest
                        ));
                        return Err(self.fail(e));
                    }
                    self.current = chunk;
                }
                Some(Err(e)) => {
                    let e = OciError::from_io_error(e, &self.what);
                    return Err(self.fail(e));
                }
                None => {
                    if self.seen != self.size {
                        let e = OciError::digest(format!(
                            "{}: the registry sent {} bytes, the manifest gives {} for {}",
                            self.what, self.seen, self.size, self.digest
                        ));
                        return Err(self.fail(e));
                    }
                    let hasher = std::mem::replace(&mut self.hasher, Hasher::for_digest(""));
                    let actual = hasher.finish();
                    if actual != self.digest {
                        let e = OciError::digest(format!(
                            "{}: the bytes the registry sent hash to {actual}, not {}: the blob is corrupt in the registry or was changed on the way; push the image again",
                            self.what, self.digest
                        ));
                        return Err(self.fail(e));
                    }
                    self.state = ReadState::Verified;
                    return Ok(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_on_the_registry_get_credentials_and_others_do_not() {
        let u = |s: &str| Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(same_origin(&u("https://reg.example/v2/"), "reg.example"));
        assert!(same_origin(
            &u("http://127.0.0.1:5000/v2/"),
            "127.0.0.1:5000"
        ));
        assert!(same_origin(
            &u("https://reg.example/v2/"),
            "reg.example:443"
        ));
        assert!(!same_origin(&u("https://s3.example/blob"), "reg.example"));
        assert!(!same_origin(
            &u("http://127.0.0.1:5001/v2/"),
            "127.0.0.1:5000"
        ));
        assert!(same_origin(&u("http://[::1]:5000/v2/"), "[::1]:5000"));
    }

    #[test]
    fn registry_error_bodies_become_short_text() {
        let text = registry_error_text(
            br#"{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch","detail":{}}]}"#,
        );
        assert_eq!(text, "DIGEST_INVALID: digest mismatch");
        assert_eq!(
            registry_error_text(b"<html>\nbad\n</html>"),
            "<html>bad</html>"
        );
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("100-199"), None);
    }
}
