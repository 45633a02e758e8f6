//! Shared support for the registry's black-box tests: the real `dvcr serve` binary started on
//! a free loopback port with its own storage root, a tiny HTTP/1.1 client that can send
//! exactly what the distribution spec describes (fixed-length and chunked bodies, any header,
//! early answers from the server), digests, and helpers that push blobs and manifests.
//!
//! The client is hand-written on `std::net::TcpStream` on purpose: the tests must control the
//! bytes on the wire (Content-Range without `bytes`, chunked transfer-encoding, HEAD answers
//! whose Content-Length has no body), and the crate has no HTTP client among its dependencies.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};

/// The binary under test.
pub const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");

/// Media types used by the tests.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const EMPTY_JSON: &str = "application/vnd.oci.empty.v1+json";

/// A running `dvcr serve` on 127.0.0.1 with a fresh storage root; killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`, as printed by the server.
    pub addr: String,
    /// The storage root (`--root`).
    pub root: PathBuf,
    log: PathBuf,
    /// Arguments and environment every start of this registry gets (the bucket with S3).
    storage_args: Vec<String>,
    storage_env: Vec<(String, String)>,
    /// The S3 server behind the registry, when it runs on one.
    pub s3: Option<std::sync::Arc<S3Server>>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry with default settings.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a registry with extra `dvcr serve` arguments. With `DVCR_TEST_S3=1` in the
    /// environment, the registry keeps its data in a bucket of a fresh `s3s-fs` server
    /// instead of under its root (CI runs the conformance and client suites both ways).
    pub fn start_with(extra: &[&str]) -> Self {
        if std::env::var("DVCR_TEST_S3").is_ok_and(|v| v == "1") {
            let server = std::sync::Arc::new(S3Server::start());
            server.create_bucket("dvcr");
            return Self::start_on_s3(&server, "dvcr", extra);
        }
        Self::start_inner(extra, Vec::new(), Vec::new(), None)
    }

    /// Starts a registry on `bucket` of `server` (several may share one bucket).
    pub fn start_on_s3(server: &std::sync::Arc<S3Server>, bucket: &str, extra: &[&str]) -> Self {
        let (args, env) = server.serve_settings(bucket);
        Self::start_inner(extra, args, env, Some(std::sync::Arc::clone(server)))
    }

    fn start_inner(
        extra: &[&str],
        storage_args: Vec<String>,
        storage_env: Vec<(String, String)>,
        s3: Option<std::sync::Arc<S3Server>>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dvcr-registry-test-")
            .tempdir()
            .expect("creating a temp dir");
        let root = dir.path().join("root");
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(DVCR);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--root")
            .arg(&root)
            .args(&storage_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("creating the server log"));
        // The tests set every option on the command line: a DVCR_* variable of the caller's
        // environment must not change what they test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DVCR_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("DVCR_LOG", "info");
        cmd.envs(storage_env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().expect("starting dvcr serve");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dvcr serve printed no `listening on` line; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line is {line:?}, not `listening on ADDR`"))
            .trim()
            .to_string();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "the line must carry the real bound address, got {addr:?}"
        );
        Self {
            child,
            addr,
            root,
            log,
            storage_args,
            storage_env,
            s3,
            _dir: dir,
        }
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to `path` (a path, or an absolute URL of this server, e.g. a `Location`).
    pub fn req(&self, method: &str, path: &str) -> Request {
        Request {
            addr: self.addr.clone(),
            method: method.to_string(),
            path: self.path_of(path),
            headers: Vec::new(),
            body: Body::None,
        }
    }

    /// The request-target for `location`, which may be absolute or relative.
    pub fn path_of(&self, location: &str) -> String {
        if let Some(rest) = location.strip_prefix("http://") {
            let slash = rest.find('/').unwrap_or(rest.len());
            assert_eq!(
                &rest[..slash],
                self.addr,
                "an absolute Location must point at this server"
            );
            rest[slash..].to_string()
        } else {
            assert!(
                location.starts_with('/'),
                "relative Location must be an absolute path: {location:?}"
            );
            location.to_string()
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pushes `data` as a blob of `repo` (POST then PUT) and returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let post = self
            .req("POST", &format!("/v2/{repo}/blobs/uploads/"))
            .send();
        assert_eq!(post.status, 202, "POST upload: {post:?}");
        let loc = post.location();
        let put = self
            .req("PUT", &with_query(&loc, &format!("digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send();
        assert_eq!(put.status, 201, "PUT upload: {put:?}");
        digest
    }

    /// PUTs a manifest and returns the response (no status check).
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.req("PUT", &format!("/v2/{repo}/manifests/{reference}"))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
    }

    /// PUTs a manifest, asserts 201 and returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let r = self.put_manifest(repo, reference, media_type, body);
        assert_eq!(r.status, 201, "manifest PUT {repo}:{reference}: {r:?}");
        sha256(body)
    }

    /// Pushes a small OCI image (config and one layer) tagged `tag` and returns
    /// (manifest bytes, manifest digest).
    pub fn push_image(&self, repo: &str, tag: &str, seed: u64) -> (Vec<u8>, String) {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
        let layer = noise(3000 + seed as usize, seed);
        let config_digest = self.push_blob(repo, config.as_bytes());
        let layer_digest = self.push_blob(repo, &layer);
        let manifest = image_manifest(
            (OCI_CONFIG, &config_digest, config.len()),
            &[(OCI_LAYER, &layer_digest, layer.len())],
        );
        let digest = self.push_manifest(repo, tag, OCI_MANIFEST, &manifest);
        (manifest, digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what the server said (the temp dir goes away with it).
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(4096)..];
            eprintln!("--- dvcr serve log (last 4 KiB) ---\n{tail}");
        }
    }
}

/// An OCI image manifest referencing `config` and `layers` (media type, digest, size).
pub fn image_manifest(config: (&str, &str, usize), layers: &[(&str, &str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(m, d, s)| json!({"mediaType": m, "digest": d, "size": s}))
        .collect();
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.0, "digest": config.1, "size": config.2},
        "layers": layers,
    }))
    .unwrap()
}

/// Appends `param` to a URL or path that may already have a query.
pub fn with_query(location: &str, param: &str) -> String {
    if location.contains('?') {
        format!("{location}&{param}")
    } else {
        format!("{location}?{param}")
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha512:<hex>` of `data`.
pub fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(data)))
}

/// `sha256:<hex>` of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).expect("opening a file to hash");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).expect("reading a file to hash");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    dvcr_tests::noise(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
}

/// A digest of nothing pushed anywhere.
pub fn unknown_digest() -> String {
    sha256(b"this blob was never pushed to any repository")
}

/// What a request sends as its body.
#[derive(Debug)]
enum Body {
    None,
    Bytes(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
#[derive(Debug)]
pub struct Request {
    addr: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Request {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A fixed-length body (Content-Length is added unless already set).
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Body::Bytes(body);
        self
    }

    /// A body sent with `Transfer-Encoding: chunked`, one HTTP chunk per element.
    pub fn chunked(mut self, chunks: Vec<Vec<u8>>) -> Self {
        self.body = Body::Chunked(chunks);
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Response {
        let stream = TcpStream::connect(&self.addr).expect("connecting to the registry");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: dvcr-conformance-test\r\n",
            self.method, self.path, self.addr
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut payload = Vec::new();
        match &self.body {
            Body::None => {
                if matches!(self.method.as_str(), "POST" | "PUT" | "PATCH")
                    && !self.has_header("Content-Length")
                {
                    head.push_str("Content-Length: 0\r\n");
                }
            }
            Body::Bytes(b) => {
                if !self.has_header("Content-Length") {
                    head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                }
                payload = b.clone();
            }
            Body::Chunked(chunks) => {
                head.push_str("Transfer-Encoding: chunked\r\n");
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    payload.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    payload.extend_from_slice(c);
                    payload.extend_from_slice(b"\r\n");
                }
                payload.extend_from_slice(b"0\r\n\r\n");
            }
        }
        head.push_str("\r\n");
        // Write from another thread while this one reads: the server may answer (413, 404)
        // before it has read the body, and that answer must still be seen.
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let _ = writer.write_all(head.as_bytes());
            let _ = writer.write_all(&payload);
            let _ = writer.flush();
        });
        let response = read_response(stream, self.method == "HEAD")
            .unwrap_or_else(|e| panic!("{} {}: reading the response: {e}", self.method, self.path));
        let _ = sender.join();
        response
    }
}

/// A complete HTTP response.
#[derive(Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.len() > 2000 {
            format!("<{} bytes>", self.body.len())
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        write!(f, "HTTP {} {:?} {}", self.status, self.headers, body)
    }
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The header `name`, which must be present.
    pub fn must(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    /// The `Location` header, which must be present.
    pub fn location(&self) -> String {
        self.must("Location").to_string()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// The `code` of each error in an OCI error body, which must have the spec's shape.
    pub fn error_codes(&self) -> Vec<String> {
        let v = self.json();
        let errors = v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no `errors` array in {self:?}"));
        assert!(!errors.is_empty(), "empty `errors` array in {self:?}");
        errors
            .iter()
            .map(|e| {
                let code = e["code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("error without a string code in {self:?}"));
                assert!(
                    !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                    "code {code:?} is not uppercase letters and underscores"
                );
                code.to_string()
            })
            .collect()
    }

    /// Asserts the status and that the first OCI error code is one of `codes`.
    pub fn assert_error(&self, status: u16, codes: &[&str]) {
        assert_eq!(self.status, status, "{self:?}");
        let got = self.error_codes();
        assert!(
            codes.contains(&got[0].as_str()),
            "expected error code {codes:?}, got {got:?}: {self:?}"
        );
    }
}

fn read_response(stream: TcpStream, head_only: bool) -> std::io::Result<Response> {
    let mut r = BufReader::with_capacity(1 << 20, stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(
                "connection closed before a status line",
            ));
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let _version = parts.next();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Err(std::io::Error::other(
                    "connection closed inside the headers",
                ));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| std::io::Error::other(format!("bad header {h:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue; // 100 Continue and friends: the real answer follows.
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if head_only || status == 204 || status == 304 {
            // No body, whatever Content-Length says.
        } else if find("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let size = size
                    .trim_end()
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let n = usize::from_str_radix(&size, 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        let mut t = String::new();
                        if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + n, 0);
                r.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
            }
        } else if let Some(len) = find("Content-Length") {
            let len: usize = len
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad Content-Length {len:?}")))?;
            body.resize(len, 0);
            r.read_exact(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
        }
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}

/// Runs a command, panicking with its output when it fails or cannot start.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {shown}: {e} (is the tool installed? .ci/install-tools installs it)")
    });
    assert!(
        out.status.success(),
        "{shown} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---- Added for the GC and metrics tests (registry_gc.rs, registry_metrics.rs). ----

impl Registry {
    /// Stops the server (SIGKILL) but keeps its storage root.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server if it runs, and starts a new one on the same root with `extra`
    /// arguments; `addr` changes.
    pub fn restart(&mut self, extra: &[&str]) {
        self.stop();
        let mut cmd = Command::new(DVCR);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--root")
            .arg(&self.root)
            .args(&self.storage_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&self.log)
                    .expect("opening the server log"),
            );
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DVCR_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("DVCR_LOG", "info");
        cmd.envs(self.storage_env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().expect("restarting dvcr serve");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        self.child = child;
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("dvcr serve did not restart; its log:\n{}", self.log()));
        self.addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line is {line:?}"))
            .trim()
            .to_string();
    }

    /// Where the storage keeps a blob's bytes (`<root>/blobs/<alg>/<xx>/<hex>`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("a digest");
        self.root.join("blobs").join(alg).join(&hex[..2]).join(hex)
    }

    /// GETs a blob and asserts that its bytes hash to `digest`.
    pub fn pull_blob_verified(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = self
            .req("GET", &format!("/v2/{repo}/blobs/{digest}"))
            .send();
        assert_eq!(r.status, 200, "GET blob {repo}@{digest}: {r:?}");
        let actual = if digest.starts_with("sha512:") {
            sha512(&r.body)
        } else {
            sha256(&r.body)
        };
        assert_eq!(actual, digest, "blob {repo}@{digest} came back different");
        r.body
    }

    /// Pulls a manifest by tag or digest and every blob it names, verifying each digest;
    /// returns the manifest bytes.
    pub fn pull_image_verified(&self, repo: &str, reference: &str) -> Vec<u8> {
        let r = self
            .req("GET", &format!("/v2/{repo}/manifests/{reference}"))
            .header(
                "Accept",
                &format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}"),
            )
            .send();
        assert_eq!(r.status, 200, "GET manifest {repo}:{reference}: {r:?}");
        let m = r.json();
        let mut blobs: Vec<String> = Vec::new();
        if let Some(c) = m["config"]["digest"].as_str() {
            blobs.push(c.to_string());
        }
        for l in m["layers"].as_array().into_iter().flatten() {
            blobs.push(l["digest"].as_str().expect("layer digest").to_string());
        }
        for b in blobs {
            self.pull_blob_verified(repo, &b);
        }
        r.body
    }
}

// ---- A real S3-compatible server for the object storage backend. ----

/// A running `s3s-fs` (an S3 server on a directory that checks SigV4 signatures) on a free
/// loopback port; killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The directory it serves (a bucket is a directory in it).
    pub dir: tempfile::TempDir,
}

/// The credentials the test server accepts.
pub const S3_ACCESS_KEY: &str = "dvcr-test-access";
pub const S3_SECRET_KEY: &str = "dvcr-test-secret-key-0123456789";

impl S3Server {
    /// Starts `s3s-fs` (installed by `.ci/install-tools`).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dvcr-s3-test-")
            .tempdir()
            .expect("creating a temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("creating the S3 data dir");
        let bin = std::env::var("S3S_FS").unwrap_or_else(|_| "s3s-fs".to_owned());
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&data)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (cargo install --locked s3s-fs --version 0.14.1 --features binary)")
            });
        let stdout = child.stdout.take().expect("s3s-fs stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(at) = line.find("http://") {
                    let url: String = line[at..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = tx.send(url);
                    sent = true;
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("s3s-fs printed no `server is running at` line")
            });
        Self {
            child,
            endpoint,
            dir,
        }
    }

    /// Creates a bucket (a directory of the served root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.dir.path().join("data").join(name))
            .expect("creating the bucket");
    }

    /// The `dvcr serve` arguments and environment that put a registry on `bucket`.
    pub fn serve_settings(&self, bucket: &str) -> (Vec<String>, Vec<(String, String)>) {
        (
            vec![
                "--s3-bucket".to_owned(),
                bucket.to_owned(),
                "--s3-endpoint".to_owned(),
                self.endpoint.clone(),
            ],
            vec![
                ("AWS_ACCESS_KEY_ID".to_owned(), S3_ACCESS_KEY.to_owned()),
                ("AWS_SECRET_ACCESS_KEY".to_owned(), S3_SECRET_KEY.to_owned()),
            ],
        )
    }

    /// Every object key of a bucket (relative paths of files, without s3s-fs' own metadata).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let root = self.dir.path().join("data").join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if !rel.starts_with(".") && !rel.contains("/.") {
                        out.push(rel);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `Upload-Offset` a `HEAD` of an upload URL answers (the bytes the server has taken),
/// asked with the real curl.
pub fn upload_offset(url: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-sS", "-I", url])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("upload-offset")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Upload-Offset in {text}"))
}
