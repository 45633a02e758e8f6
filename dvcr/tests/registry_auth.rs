//! `dvcr serve` with authentication and TLS, end to end: the real binary, an htpasswd file made
//! by Apache's `htpasswd -B`, raw requests with curl, the token flow, a namespace policy,
//! anonymous pull, and HTTPS with a self-signed certificate made by openssl.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");
/// `hello`, and its digest.
const BLOB: &str = "hello";
const BLOB_DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// Whether a tool is on PATH; tests that need a missing one say so and pass.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// A temporary directory with the files of one server.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// An htpasswd file with bcrypt entries made by the real `htpasswd -nbB`.
    fn htpasswd(&self, users: &[(&str, &str)]) -> PathBuf {
        let mut text = String::new();
        for (user, password) in users {
            let out = Command::new("htpasswd")
                .args(["-nbB", "-C", "5", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is needed");
            assert!(out.status.success());
            text.push_str(String::from_utf8(out.stdout).unwrap().trim());
            text.push('\n');
        }
        let path = self.path("htpasswd");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A running `dvcr serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(dir: &Dir, args: &[&str], scheme: &str) -> Server {
        Server::start_on(dir, "127.0.0.1:0", args, scheme)
    }

    fn start_on(dir: &Dir, listen: &str, args: &[&str], scheme: &str) -> Server {
        let mut child = Command::new(DVCR)
            .args(["serve", "--listen", listen, "--root"])
            .arg(dir.path("root"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting dvcr serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep reading so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("dvcr serve printed no `listening on` line")
            });
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let port = addr.rsplit(':').next().unwrap();
        // Through 127.0.0.1, which the test certificate names.
        Server {
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP exchange as curl saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Runs curl with `args` (method, URL, credentials...) and parses the last response.
fn curl(args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let text = std::fs::read_to_string(&headers).unwrap();
    // With interim responses (100 Continue) several blocks are dumped: keep the last.
    let last = text
        .split("\r\n\r\n")
        .filter(|block| !block.trim().is_empty())
        .last()
        .unwrap_or_default();
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read_to_string(&body).unwrap_or_default(),
    }
}

/// Pushes [`BLOB`] to `repository` in one monolithic POST.
fn push_blob(server: &Server, repository: &str, auth: &[&str]) -> Reply {
    let url = server.url(&format!(
        "/v2/{repository}/blobs/uploads/?digest={BLOB_DIGEST}"
    ));
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        BLOB,
    ];
    args.extend_from_slice(auth);
    args.push(&url);
    curl(&args)
}

fn pull_blob(server: &Server, repository: &str, auth: &[&str]) -> Reply {
    let url = server.url(&format!("/v2/{repository}/blobs/{BLOB_DIGEST}"));
    let mut args = auth.to_vec();
    args.push(&url);
    curl(&args)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn without_credentials_the_registry_answers_401_with_a_basic_challenge_and_oci_error() {
    if !have("htpasswd") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("alice", "pw")]);
    let server = Server::start(&dir, &["--htpasswd", s(&htpasswd)], "http");
    for path in [
        "/v2/",
        "/v2/a/b/tags/list",
        &format!("/v2/a/blobs/{BLOB_DIGEST}"),
    ] {
        let reply = curl(&[&server.url(path)]);
        assert_eq!(reply.status, 401, "{path}: {reply:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Basic realm=\"dvcr\"")
        );
        assert_eq!(reply.error_code(), "UNAUTHORIZED");
        assert!(reply.json()["errors"][0]["message"].is_string());
    }
}

#[test]
fn basic_credentials_made_by_htpasswd_are_accepted_and_wrong_ones_refused() {
    if !have("htpasswd") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("alice", "s3cret"), ("bob", "other")]);
    let server = Server::start(&dir, &["--htpasswd", s(&htpasswd)], "http");
    assert_eq!(
        curl(&["-u", "alice:s3cret", &server.url("/v2/")]).status,
        200
    );
    assert_eq!(curl(&["-u", "bob:other", &server.url("/v2/")]).status, 200);
    let wrong = curl(&["-u", "alice:other", &server.url("/v2/")]);
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error_code(), "UNAUTHORIZED");
    assert_eq!(
        curl(&["-u", "mallory:s3cret", &server.url("/v2/")]).status,
        401
    );
    // Without a policy an authenticated user may push and pull anything.
    assert_eq!(
        push_blob(&server, "vi/ns1/disk", &["-u", "alice:s3cret"]).status,
        201
    );
    let pulled = pull_blob(&server, "vi/ns1/disk", &["-u", "bob:other"]);
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.body, BLOB);
}

#[test]
fn a_pusher_limited_to_its_namespace_gets_403_denied_elsewhere() {
    if !have("htpasswd") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("importer-ns1", "pw"), ("nodes", "pw")]);
    let policy = dir.write(
        "policy",
        "importer-ns1  vi/ns1/  pull,push,delete\nnodes  *  pull\n",
    );
    let server = Server::start(
        &dir,
        &["--htpasswd", s(&htpasswd), "--auth-policy", s(&policy)],
        "http",
    );
    let pusher = ["-u", "importer-ns1:pw"];
    assert_eq!(push_blob(&server, "vi/ns1/x", &pusher).status, 201);
    let denied = push_blob(&server, "vi/ns2/x", &pusher);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.error_code(), "DENIED");
    assert_eq!(pull_blob(&server, "vi/ns2/x", &pusher).status, 403);
    // The reader pulls everything and pushes nothing.
    let nodes = ["-u", "nodes:pw"];
    assert_eq!(pull_blob(&server, "vi/ns1/x", &nodes).status, 200);
    assert_eq!(push_blob(&server, "vi/ns1/y", &nodes).status, 403);
}

#[test]
fn anonymous_pull_lets_clients_without_credentials_pull_but_not_push() {
    if !have("htpasswd") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("alice", "pw")]);
    let server = Server::start(
        &dir,
        &["--htpasswd", s(&htpasswd), "--anonymous-pull"],
        "http",
    );
    assert_eq!(
        push_blob(&server, "cvi/disk", &["-u", "alice:pw"]).status,
        201
    );
    let pulled = pull_blob(&server, "cvi/disk", &[]);
    assert_eq!(pulled.status, 200, "{pulled:?}");
    assert_eq!(pulled.body, BLOB);
    let push = push_blob(&server, "cvi/disk", &[]);
    assert_eq!(push.status, 401);
    assert_eq!(
        push.header("www-authenticate"),
        Some("Basic realm=\"dvcr\"")
    );
    // Sent credentials are checked even where anonymous access would do.
    assert_eq!(
        pull_blob(&server, "cvi/disk", &["-u", "alice:wrong"]).status,
        401
    );
}

#[test]
fn the_token_flow_grants_the_allowed_scopes_and_the_token_works_as_bearer() {
    if !have("htpasswd") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("importer-ns1", "pw")]);
    let policy = dir.write("policy", "importer-ns1 vi/ns1/ pull,push\n* cvi/ pull\n");
    let key = dir.path("token.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    // Clients fetch tokens from the realm; curl is told the URL, so any realm will do here.
    let realm = "https://registry.example/auth/token";
    let server = Server::start(
        &dir,
        &[
            "--htpasswd",
            s(&htpasswd),
            "--auth-policy",
            s(&policy),
            "--token-realm",
            realm,
            "--token-key",
            s(&key),
        ],
        "http",
    );

    let challenge = curl(&[&server.url("/v2/vi/ns1/x/tags/list")]);
    assert_eq!(challenge.status, 401);
    let www = challenge.header("www-authenticate").unwrap();
    assert!(
        www.starts_with(&format!("Bearer realm=\"{realm}\",service=\"")),
        "{www}"
    );
    assert!(www.contains("scope=\"repository:vi/ns1/x:pull\""), "{www}");
    assert_eq!(challenge.error_code(), "UNAUTHORIZED");

    // Asking for more than allowed is not an error: the token holds the intersection.
    let token_url = server.url(
        "/auth/token?service=dvcr&scope=repository:vi/ns1/x:pull,push,delete\
         &scope=repository:vi/ns2/x:pull,push",
    );
    let reply = curl(&["-u", "importer-ns1:pw", &token_url]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let json = reply.json();
    let token = json["token"].as_str().unwrap().to_owned();
    assert_eq!(json["access_token"], json["token"]);
    assert!(json["expires_in"].as_u64().unwrap() > 0);
    assert!(json["issued_at"].as_str().unwrap().ends_with('Z'));
    let bearer = format!("Authorization: Bearer {token}");

    assert_eq!(curl(&["-H", &bearer, &server.url("/v2/")]).status, 200);
    assert_eq!(push_blob(&server, "vi/ns1/x", &["-H", &bearer]).status, 201);
    assert_eq!(pull_blob(&server, "vi/ns1/x", &["-H", &bearer]).status, 200);
    // Not granted and not allowed: 403.
    let denied = push_blob(&server, "vi/ns2/x", &["-H", &bearer]);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.error_code(), "DENIED");
    // Allowed but not in this token: 401 asking for a token with that scope.
    let narrower = curl(&[
        "-u",
        "importer-ns1:pw",
        &server.url("/auth/token?service=dvcr&scope=repository:vi/ns1/x:pull"),
    ])
    .json();
    let narrow = format!(
        "Authorization: Bearer {}",
        narrower["token"].as_str().unwrap()
    );
    let more = push_blob(&server, "vi/ns1/x", &["-H", &narrow]);
    assert_eq!(more.status, 401);
    assert!(
        more.header("www-authenticate")
            .unwrap()
            .contains("error=\"insufficient_scope\""),
        "{more:?}"
    );
    // A tampered token is refused.
    let tampered = format!("Authorization: Bearer {}x", token);
    assert_eq!(curl(&["-H", &tampered, &server.url("/v2/")]).status, 401);

    // No credentials: an anonymous token with the anonymous scopes only.
    let anonymous = curl(&[&server.url(
        "/auth/token?service=dvcr&scope=repository:cvi/a:pull,push&scope=repository:vi/ns1/x:pull",
    )]);
    assert_eq!(anonymous.status, 200);
    let anon = format!(
        "Authorization: Bearer {}",
        anonymous.json()["token"].as_str().unwrap()
    );
    assert_eq!(pull_blob(&server, "vi/ns1/x", &["-H", &anon]).status, 401);
    assert_eq!(
        curl(&["-H", &anon, &server.url("/v2/cvi/a/tags/list")]).status,
        404
    );
    // Wrong credentials at the token endpoint: 401, never an anonymous token.
    assert_eq!(curl(&["-u", "importer-ns1:bad", &token_url]).status, 401);
}

/// A self-signed certificate for 127.0.0.1 and its key, made by openssl.
fn self_signed(dir: &Dir) -> (PathBuf, PathBuf) {
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[test]
fn https_with_a_self_signed_certificate_serves_h2_and_http11() {
    if !have("htpasswd") || !have("curl") || !have("openssl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("alice", "pw")]);
    let (cert, key) = self_signed(&dir);
    let server = Server::start(
        &dir,
        &[
            "--htpasswd",
            s(&htpasswd),
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
        ],
        "https",
    );
    let url = server.url("/v2/");
    let reply = curl(&["--cacert", s(&cert), "-u", "alice:pw", &url]);
    assert_eq!(reply.status, 200);
    assert_eq!(curl(&["--cacert", s(&cert), &url]).status, 401);
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_version}", flag])
            .args(["--cacert", s(&cert), "-u", "alice:pw", &url])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), version, "{flag}");
    }
    // Without the CA the client refuses the certificate: it really is TLS.
    let out = Command::new("curl").args(["-sS", &url]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn an_htpasswd_file_with_an_md5_entry_stops_the_server_naming_the_line() {
    if !have("htpasswd") {
        return;
    }
    let dir = Dir::new();
    let bcrypt = Command::new("htpasswd")
        .args(["-nbB", "-C", "5", "good", "pw"])
        .output()
        .unwrap();
    let md5 = Command::new("htpasswd")
        .args(["-nbm", "legacy", "pw"])
        .output()
        .unwrap();
    let htpasswd = dir.write(
        "htpasswd",
        &format!(
            "{}\n{}\n",
            String::from_utf8(bcrypt.stdout).unwrap().trim(),
            String::from_utf8(md5.stdout).unwrap().trim()
        ),
    );
    let out = Command::new(DVCR)
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path("root"))
        .arg("--htpasswd")
        .arg(&htpasswd)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2", htpasswd.display())),
        "{stderr}"
    );
    assert!(stderr.contains("MD5"), "{stderr}");
}

/// Writes an OCI image layout with one image (tag `v1`) holding `/disk/disk.img`, and returns
/// the layer's digest.
fn oci_layout(dir: &Dir, layout: &Path) -> String {
    use sha2::Digest as _;
    let sha = |bytes: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let src = dir.path("image-src");
    std::fs::create_dir_all(src.join("disk")).unwrap();
    let disk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("disk/disk.img"), &disk).unwrap();
    let tar = dir.path("layer.tar");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("disk")
        .output()
        .unwrap();
    assert!(out.status.success());
    let layer = std::fs::read(&tar).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [sha(&layer)] }
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": sha(&layer), "size": layer.len() }]
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha(&manifest), "size": manifest.len(),
                        "annotations": { "org.opencontainers.image.ref.name": "v1" } }]
    });
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for blob in [&layer, &config, &manifest] {
        let digest = sha(blob);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), blob).unwrap();
    }
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    sha(&layer)
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo")
        .args(["--insecure-policy", "--command-timeout", "60s"])
        .args(args)
        .output()
        .expect("running skopeo")
}

#[test]
fn skopeo_pushes_and_pulls_over_tls_with_bearer_tokens_within_its_namespace() {
    if !have("htpasswd") || !have("openssl") || !have("skopeo") || !have("curl") {
        return;
    }
    let dir = Dir::new();
    let htpasswd = dir.htpasswd(&[("importer-ns1", "pw1"), ("nodes", "pw2")]);
    let policy = dir.write(
        "policy",
        "importer-ns1 vi/ns1/ pull,push,delete\nnodes * pull\n* cvi/ pull\n",
    );
    let (cert, key) = self_signed(&dir);
    // containers/image reads the CA certificates of a registry from `*.crt` in a folder.
    let certs = dir.path("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cert, certs.join("ca.crt")).unwrap();
    // The realm must name the server itself: take a free port first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let realm = format!("https://{listen}/auth/token");
    let server = Server::start_on(
        &dir,
        &listen,
        &[
            "--htpasswd",
            s(&htpasswd),
            "--auth-policy",
            s(&policy),
            "--token-realm",
            &realm,
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
        ],
        "https",
    );
    let challenge = curl(&["--cacert", s(&cert), &server.url("/v2/")]);
    assert!(
        challenge
            .header("www-authenticate")
            .unwrap()
            .starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{challenge:?}"
    );

    let layout = dir.path("layout");
    let layer = oci_layout(&dir, &layout);
    let source = format!("oci:{}:v1", s(&layout));
    let pushed = skopeo(&[
        "copy",
        "--dest-creds",
        "importer-ns1:pw1",
        "--dest-cert-dir",
        s(&certs),
        &source,
        &format!("docker://{listen}/vi/ns1/disk:v1"),
    ]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );

    // Another namespace: denied.
    let denied = skopeo(&[
        "copy",
        "--dest-creds",
        "importer-ns1:pw1",
        "--dest-cert-dir",
        s(&certs),
        &source,
        &format!("docker://{listen}/vi/ns2/disk:v1"),
    ]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr).to_lowercase();
    assert!(
        stderr.contains("denied") || stderr.contains("403"),
        "{stderr}"
    );

    // The reader pulls it back, byte for byte.
    let out = dir.path("pulled");
    let pulled = skopeo(&[
        "copy",
        "--src-creds",
        "nodes:pw2",
        "--src-cert-dir",
        s(&certs),
        &format!("docker://{listen}/vi/ns1/disk:v1"),
        &format!("oci:{}:v1", s(&out)),
    ]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    // skopeo compresses an uncompressed layer on its way to a registry: compare the tar
    // inside the layer the pulled manifest names.
    let blob = |digest: &str| {
        out.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let pulled_layer = &manifest["layers"][0];
    let path = blob(pulled_layer["digest"].as_str().unwrap());
    let tar = if pulled_layer["mediaType"]
        .as_str()
        .unwrap()
        .ends_with("gzip")
    {
        Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap()
            .stdout
    } else {
        std::fs::read(&path).unwrap()
    };
    assert_eq!(
        tar,
        std::fs::read(dir.path("layer.tar")).unwrap(),
        "{layer}"
    );

    // Without credentials skopeo gets an anonymous token, which does not reach vi/ns1/.
    let anonymous = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        s(&certs),
        &format!("docker://{listen}/vi/ns1/disk:v1"),
    ]);
    assert!(!anonymous.status.success());
}
