//! Black-box tests of `dvcr serve`: the real binary on a temporary root, spoken to over plain
//! HTTP/1.1 (a minimal client on `std::net::TcpStream`, so every header and byte on the wire
//! is the test's own).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dvcr_tests::Scratch;
use sha2::{Digest as _, Sha256};

/// A running `dvcr serve`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(root: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dvcr"))
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting dvcr serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    /// SIGKILL: no chance to clean up.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Response {
        request(&self.addr, method, path, headers, body)
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], Body::None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request body.
enum Body<'a> {
    None,
    /// Sent with Content-Length.
    Bytes(&'a [u8]),
    /// Sent with `Transfer-Encoding: chunked`, one HTTP chunk per slice.
    Chunked(Vec<&'a [u8]>),
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn write_head(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Body<'_>,
) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Body::None => {}
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
}

fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write_head(&mut stream, method, path, headers, &body);
    match &body {
        Body::None => {}
        // A server may answer early (413) and close: the response tells what happened.
        Body::Bytes(b) => {
            let _ = stream.write_all(b);
        }
        Body::Chunked(parts) => {
            for p in parts {
                if !p.is_empty() {
                    stream
                        .write_all(format!("{:x}\r\n", p.len()).as_bytes())
                        .unwrap();
                    stream.write_all(p).unwrap();
                    stream.write_all(b"\r\n").unwrap();
                }
            }
            stream.write_all(b"0\r\n\r\n").unwrap();
        }
    }
    read_response(stream, method == "HEAD")
}

fn read_response(stream: TcpStream, head: bool) -> Response {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head || status == 204 || status == 304 {
        return resp;
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            reader.read_exact(&mut resp.body[start..]).unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().unwrap();
        resp.body.resize(len, 0);
        reader.read_exact(&mut resp.body).unwrap();
    } else {
        reader.read_to_end(&mut resp.body).unwrap();
    }
    resp
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn start_upload(server: &Server, name: &str) -> String {
    let r = server.request(
        "POST",
        &format!("/v2/{name}/blobs/uploads/"),
        &[],
        Body::None,
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.header("range"), Some("0-0"));
    assert!(r.header("docker-upload-uuid").is_some());
    r.header("location").unwrap().to_owned()
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

/// POST, one streamed (chunked) PATCH, PUT ?digest: what docker and podman do.
fn push_streamed(server: &Server, name: &str, blob: &[u8]) -> Response {
    let loc = start_upload(server, name);
    let parts: Vec<&[u8]> = blob.chunks(100_000).collect();
    let r = server.request("PATCH", &loc, &[], Body::Chunked(parts));
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", blob.len() - 1).as_str())
    );
    let loc = r.header("location").unwrap().to_owned();
    server.request("PUT", &with_digest(&loc, &digest(blob)), &[], Body::None)
}

fn assert_blob(server: &Server, name: &str, blob: &[u8]) {
    let d = digest(blob);
    let path = format!("/v2/{name}/blobs/{d}");
    let head = server.request("HEAD", &path, &[], Body::None);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.header("content-length"),
        Some(blob.len().to_string().as_str())
    );
    assert_eq!(head.header("docker-content-digest"), Some(d.as_str()));
    let get = server.get(&path);
    assert_eq!(get.status, 200);
    assert_eq!(get.header("docker-content-digest"), Some(d.as_str()));
    assert!(get.body == blob, "the blob read back differs");
}

fn blob_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("blobs")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn blobs_pushed_streamed_monolithic_and_chunked_read_back_identically_with_ranges() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);

    let streamed = data(3 << 20, 1);
    let r = push_streamed(&server, "repo", &streamed);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(digest(&streamed).as_str())
    );
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/repo/blobs/{}", digest(&streamed)).as_str())
    );
    assert_blob(&server, "repo", &streamed);

    let monolithic = data(1 << 20, 2);
    let r = server.request(
        "POST",
        &format!("/v2/repo/blobs/uploads/?digest={}", digest(&monolithic)),
        &[("Content-Type", "application/octet-stream")],
        Body::Bytes(&monolithic),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_blob(&server, "repo", &monolithic);

    // Ranged chunks, the last one carried by the PUT.
    let chunked = data(2_500_000, 3);
    let mut loc = start_upload(&server, "repo");
    let bounds = [0, 1_000_000, 2_000_000];
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let range = format!("{a}-{}", b - 1);
        let r = server.request(
            "PATCH",
            &loc,
            &[("Content-Range", &range)],
            Body::Bytes(&chunked[a..b]),
        );
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.header("range"), Some(format!("0-{}", b - 1).as_str()));
        loc = r.header("location").unwrap().to_owned();
    }
    let status = server.get(&loc);
    assert_eq!(status.status, 204);
    assert_eq!(status.header("range"), Some("0-1999999"));
    let r = server.request(
        "PUT",
        &with_digest(&loc, &digest(&chunked)),
        &[("Content-Range", "2000000-2499999")],
        Body::Bytes(&chunked[2_000_000..]),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_blob(&server, "repo", &chunked);

    // Ranges: N-M, N-, -N, unsatisfiable.
    let path = format!("/v2/repo/blobs/{}", digest(&chunked));
    let size = chunked.len();
    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=2499990-", 2_499_990, size - 1),
        ("bytes=-7", size - 7, size - 1),
    ] {
        let r = server.request("GET", &path, &[("Range", range)], Body::None);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{size}").as_str())
        );
        assert_eq!(r.body, &chunked[start..=end]);
    }
    let r = server.request(
        "GET",
        &path,
        &[("Range", &format!("bytes={size}-"))],
        Body::None,
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );

    // A repository that never received the blob cannot serve it.
    let r = server.request(
        "HEAD",
        &format!("/v2/other/blobs/{}", digest(&chunked)),
        &[],
        Body::None,
    );
    assert_eq!(r.status, 404);
    let r = server.get(&format!("/v2/other/blobs/{}", digest(&chunked)));
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
}

#[test]
fn out_of_order_and_replayed_chunks_are_refused_with_416() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let blob = data(300, 4);
    let loc = start_upload(&server, "repo");
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "100-199")],
        Body::Bytes(&blob[100..200]),
    );
    assert_eq!(r.status, 416, "a gap: {r:?}");
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "0-99")],
        Body::Bytes(&blob[..100]),
    );
    assert_eq!(r.status, 202);
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "0-99")],
        Body::Bytes(&blob[..100]),
    );
    assert_eq!(r.status, 416, "a replay: {r:?}");
    assert_eq!(r.header("range"), Some("0-99"));
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "100-299")],
        Body::Bytes(&blob[100..]),
    );
    assert_eq!(r.status, 202);
    let r = server.request("PUT", &with_digest(&loc, &digest(&blob)), &[], Body::None);
    assert_eq!(r.status, 201);
    assert_blob(&server, "repo", &blob);
    // The session is gone.
    let r = server.get(&loc);
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn every_upload_answer_names_the_bytes_received_so_far_in_dvcr_upload_digest() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let blob = data(250_000, 12);
    let named = |r: &Response| r.header("dvcr-upload-digest").map(str::to_owned);
    let r = server.request("POST", "/v2/repo/blobs/uploads/", &[], Body::None);
    assert_eq!(r.status, 202);
    assert_eq!(named(&r), Some(digest(b"")), "a new session holds nothing");
    let loc = r.header("location").unwrap().to_owned();
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "0-99999")],
        Body::Bytes(&blob[..100_000]),
    );
    assert_eq!(r.status, 202);
    assert_eq!(named(&r), Some(digest(&blob[..100_000])));
    // A refused chunk leaves the session, and its name, as they were.
    let r = server.request(
        "PATCH",
        &loc,
        &[("Content-Range", "50000-59999")],
        Body::Bytes(&blob[50_000..60_000]),
    );
    assert_eq!(r.status, 416);
    assert_eq!(named(&r), Some(digest(&blob[..100_000])));
    let parts: Vec<&[u8]> = blob[100_000..].chunks(40_000).collect();
    let r = server.request("PATCH", &loc, &[], Body::Chunked(parts));
    assert_eq!(r.status, 202);
    assert_eq!(named(&r), Some(digest(&blob)));
    let loc = r.header("location").unwrap().to_owned();
    let r = server.get(&loc);
    assert_eq!(r.status, 204);
    assert_eq!(named(&r), Some(digest(&blob)), "the status names them too");
    let r = server.request("PUT", &with_digest(&loc, &digest(&blob)), &[], Body::None);
    assert_eq!(r.status, 201);
    assert_blob(&server, "repo", &blob);
}

#[test]
fn a_digest_mismatch_is_refused_and_leaves_no_blob() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let blob = data(5000, 5);
    let claimed = digest(b"something else");
    let loc = start_upload(&server, "repo");
    let r = server.request("PUT", &with_digest(&loc, &claimed), &[], Body::Bytes(&blob));
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");
    for d in [&claimed, &digest(&blob)] {
        let r = server.request("HEAD", &format!("/v2/repo/blobs/{d}"), &[], Body::None);
        assert_eq!(r.status, 404, "{d}");
    }
    assert!(blob_files(&root.path("root")).is_empty());

    // A monolithic POST with the wrong digest too.
    let r = server.request(
        "POST",
        &format!("/v2/repo/blobs/uploads/?digest={claimed}"),
        &[],
        Body::Bytes(&blob),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");
    assert!(blob_files(&root.path("root")).is_empty());
}

#[test]
fn two_concurrent_pushes_of_the_same_blob_both_succeed() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let blob = data(8 << 20, 6);
    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| push_streamed(&server, "repo", &blob).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, [201, 201]);
    assert_blob(&server, "repo", &blob);
    assert_eq!(blob_files(&root.path("root")).len(), 1);
    // A third push of the same bytes: its copy is freed after the answer, and soon.
    assert_eq!(push_streamed(&server, "repo", &blob).status, 201);
    let leftovers = || {
        ["uploads", "tmp"]
            .iter()
            .map(|d| {
                std::fs::read_dir(root.path("root").join(d))
                    .unwrap()
                    .count()
            })
            .sum::<usize>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while leftovers() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(leftovers(), 0, "no upload data is left behind");
    assert_eq!(blob_files(&root.path("root")).len(), 1);
}

fn push_blob(server: &Server, name: &str, blob: &[u8]) {
    let r = server.request(
        "POST",
        &format!("/v2/{name}/blobs/uploads/?digest={}", digest(blob)),
        &[],
        Body::Bytes(blob),
    );
    assert_eq!(r.status, 201, "{r:?}");
}

fn image_manifest(config: &[u8], layer: &[u8], subject: Option<(&str, usize)>) -> Vec<u8> {
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer), "size": layer.len()}],
    });
    if let Some((d, size)) = subject {
        m["subject"] = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": size});
        m["artifactType"] = serde_json::json!("application/vnd.example.sbom");
        m["annotations"] = serde_json::json!({"org.example": "yes"});
    }
    serde_json::to_vec_pretty(&m).unwrap()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn a_manifest_referencing_a_missing_blob_is_refused() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let (config, layer) = (b"{}".to_vec(), data(1000, 7));
    let manifest = image_manifest(&config, &layer, None);
    let ct = [("Content-Type", OCI_MANIFEST)];
    push_blob(&server, "repo", &config);
    let r = server.request("PUT", "/v2/repo/manifests/v1", &ct, Body::Bytes(&manifest));
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(server.get("/v2/repo/manifests/v1").status, 404);

    push_blob(&server, "repo", &layer);
    let r = server.request("PUT", "/v2/repo/manifests/v1", &ct, Body::Bytes(&manifest));
    assert_eq!(r.status, 201, "{r:?}");
    let md = digest(&manifest);
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    for reference in ["v1", md.as_str()] {
        let r = server.get(&format!("/v2/repo/manifests/{reference}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, manifest, "stored byte-exact");
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    }

    // A by-digest push whose bytes hash differently.
    let r = server.request(
        "PUT",
        &format!("/v2/repo/manifests/{}", digest(b"x")),
        &ct,
        Body::Bytes(&manifest),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "DIGEST_INVALID");

    // A referrer: OCI-Subject on the push, listed by the referrers API with its artifactType.
    let referrer = image_manifest(&config, &layer, Some((&md, manifest.len())));
    let r = server.request(
        "PUT",
        &format!("/v2/repo/manifests/{}", digest(&referrer)),
        &ct,
        Body::Bytes(&referrer),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("oci-subject"), Some(md.as_str()));
    let r = server.get(&format!(
        "/v2/repo/referrers/{md}?artifactType=application%2Fvnd.example.sbom"
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let index = r.json();
    assert_eq!(index["manifests"][0]["digest"], digest(&referrer));
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    assert_eq!(index["manifests"][0]["annotations"]["org.example"], "yes");
    let r = server.get(&format!("/v2/repo/referrers/{md}?artifactType=other"));
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 0);

    // Schema1 is refused; deletes answer 202 and then 404.
    let schema1 = br#"{"schemaVersion":1,"name":"repo","tag":"old","fsLayers":[],"history":[]}"#;
    let r = server.request(
        "PUT",
        "/v2/repo/manifests/old",
        &[(
            "Content-Type",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        )],
        Body::Bytes(schema1),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "MANIFEST_INVALID");
    assert_eq!(
        server
            .request("DELETE", "/v2/repo/manifests/v1", &[], Body::None)
            .status,
        202
    );
    assert_eq!(server.get("/v2/repo/manifests/v1").status, 404);
    assert_eq!(
        server
            .request(
                "DELETE",
                &format!("/v2/repo/manifests/{md}"),
                &[],
                Body::None
            )
            .status,
        202
    );
    assert_eq!(server.get(&format!("/v2/repo/manifests/{md}")).status, 404);
    assert_eq!(
        server
            .request(
                "DELETE",
                &format!("/v2/repo/blobs/{}", digest(&layer)),
                &[],
                Body::None
            )
            .status,
        202
    );
    assert_eq!(
        server
            .get(&format!("/v2/repo/blobs/{}", digest(&layer)))
            .status,
        404
    );
}

#[test]
fn tags_are_listed_sorted_in_pages_linked_by_next() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let (config, layer) = (b"{}".to_vec(), data(100, 8));
    push_blob(&server, "vi/ns/name", &config);
    push_blob(&server, "vi/ns/name", &layer);
    let manifest = image_manifest(&config, &layer, None);
    for tag in ["c", "a", "e", "b", "d"] {
        let r = server.request(
            "PUT",
            &format!("/v2/vi/ns/name/manifests/{tag}"),
            &[("Content-Type", OCI_MANIFEST)],
            Body::Bytes(&manifest),
        );
        assert_eq!(r.status, 201);
    }
    let all = server.get("/v2/vi/ns/name/tags/list");
    assert_eq!(
        all.json(),
        serde_json::json!({"name": "vi/ns/name", "tags": ["a", "b", "c", "d", "e"]})
    );
    assert!(all.header("link").is_none());

    let mut path = "/v2/vi/ns/name/tags/list?n=2".to_owned();
    let mut seen = Vec::new();
    loop {
        let r = server.get(&path);
        assert_eq!(r.status, 200);
        for t in r.json()["tags"].as_array().unwrap() {
            seen.push(t.as_str().unwrap().to_owned());
        }
        match r.header("link") {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                path = link[1..link.find('>').unwrap()].to_owned();
            }
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    let r = server.get("/v2/vi/ns/name/tags/list?n=10&last=b");
    assert_eq!(r.json()["tags"], serde_json::json!(["c", "d", "e"]));
    assert_eq!(
        server.get("/v2/unknown/tags/list").error_code(),
        "NAME_UNKNOWN"
    );
}

#[test]
fn names_with_three_segments_work_and_invalid_names_are_refused() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &[]);
    let blob = data(4096, 9);
    let r = push_streamed(&server, "vi/ns/name", &blob);
    assert_eq!(r.status, 201);
    assert_blob(&server, "vi/ns/name", &blob);
    push_blob(&server, "vi/ns", &blob);
    let catalog = server.get("/v2/_catalog");
    assert_eq!(
        catalog.json()["repositories"],
        serde_json::json!(["vi/ns", "vi/ns/name"])
    );
    let page = server.get("/v2/_catalog?n=1");
    assert_eq!(page.json()["repositories"], serde_json::json!(["vi/ns"]));
    assert!(page.header("link").unwrap().contains("last=vi%2Fns"));

    // Mount from one repository into another.
    let r = server.request(
        "POST",
        &format!(
            "/v2/other/blobs/uploads/?mount={}&from=vi/ns/name",
            digest(&blob)
        ),
        &[],
        Body::None,
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_blob(&server, "other", &blob);
    let r = server.request(
        "POST",
        &format!(
            "/v2/third/blobs/uploads/?mount={}&from=nowhere",
            digest(&blob)
        ),
        &[],
        Body::None,
    );
    assert_eq!(r.status, 202, "an impossible mount opens a session");

    for bad in ["Upper/case", "a..b", "x/-y", "trailing-"] {
        let r = server.request(
            "POST",
            &format!("/v2/{bad}/blobs/uploads/"),
            &[],
            Body::None,
        );
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.error_code(), "NAME_INVALID");
    }
    let long = vec!["a"; 130].join("/");
    let r = server.get(&format!("/v2/{long}/tags/list"));
    assert_eq!(r.error_code(), "NAME_INVALID");
    let r = server.get("/v2/");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    let r = server.get("/healthz");
    assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
}

#[test]
fn read_only_mode_refuses_writes() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &["--read-only"]);
    let r = server.request("POST", "/v2/repo/blobs/uploads/", &[], Body::None);
    assert_eq!(r.status, 405);
    assert_eq!(r.error_code(), "UNSUPPORTED");
    assert_eq!(server.get("/v2/").status, 200);
}

#[test]
fn a_server_killed_mid_upload_exposes_no_partial_blob_and_the_upload_can_be_redone() {
    let root = Scratch::new();
    let dir = root.path("root");
    let server = Server::start(&dir, &[]);
    let done = data(1 << 20, 10);
    assert_eq!(push_streamed(&server, "repo", &done).status, 201);

    // Several uploads in flight, each stopped part-way through its streamed PATCH.
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| data(6 << 20, 20 + i)).collect();
    let mut streams = Vec::new();
    let mut locations = Vec::new();
    for blob in &blobs {
        let loc = start_upload(&server, "repo");
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        write_head(&mut stream, "PATCH", &loc, &[], &Body::Chunked(Vec::new()));
        for part in blob[..4 << 20].chunks(256 << 10) {
            stream
                .write_all(format!("{:x}\r\n", part.len()).as_bytes())
                .unwrap();
            stream.write_all(part).unwrap();
            stream.write_all(b"\r\n").unwrap();
        }
        streams.push(stream);
        locations.push(loc);
    }
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    drop(streams);

    let server = Server::start(&dir, &[]);
    assert_blob(&server, "repo", &done);
    for (blob, loc) in blobs.iter().zip(&locations) {
        let d = digest(blob);
        assert_eq!(
            server
                .request("HEAD", &format!("/v2/repo/blobs/{d}"), &[], Body::None)
                .status,
            404
        );
        assert!(
            !blob_files(&dir).iter().any(|p| p.ends_with(&d[7..])),
            "no partial blob under its digest"
        );
        // The interrupted session survived: resume it from where it stands.
        let status = server.get(loc);
        assert_eq!(status.status, 204, "{status:?}");
        let range = status.header("range").unwrap();
        let have: usize = range.split('-').nth(1).unwrap().parse::<usize>().unwrap() + 1;
        let have = if range == "0-0" { 0 } else { have };
        assert!(
            have > 0 && have <= 4 << 20,
            "the bytes received before the crash are kept: {range}"
        );
        let r = server.request(
            "PUT",
            &with_digest(loc, &d),
            &[("Content-Range", &format!("{have}-{}", blob.len() - 1))],
            Body::Bytes(&blob[have..]),
        );
        assert_eq!(r.status, 201, "resuming after {have} bytes: {r:?}");
        assert_blob(&server, "repo", blob);
    }
    // A fresh upload of the same bytes works too.
    assert_eq!(push_streamed(&server, "repo", &blobs[0]).status, 201);
    for p in blob_files(&dir) {
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            p.file_name().unwrap().to_str().unwrap(),
            "every blob verifies"
        );
    }
}

#[test]
fn a_stalled_body_is_cut_after_the_idle_timeout_and_the_upload_resumes() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &["--idle-timeout-secs", "1"]);
    let blob = data(300_000, 11);
    let loc = start_upload(&server, "repo");
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write_head(&mut stream, "PATCH", &loc, &[], &Body::Chunked(Vec::new()));
    stream
        .write_all(format!("{:x}\r\n", 100_000).as_bytes())
        .unwrap();
    stream.write_all(&blob[..100_000]).unwrap();
    stream.write_all(b"\r\n").unwrap();
    // Then nothing: the server answers on its own.
    let r = read_response(stream, false);
    assert_eq!(r.status, 408, "{r:?}");
    let status = server.get(&loc);
    assert_eq!(status.status, 204);
    assert_eq!(
        status.header("range"),
        Some("0-99999"),
        "the bytes before the stall are kept"
    );
    let r = server.request(
        "PUT",
        &with_digest(&loc, &digest(&blob)),
        &[("Content-Range", "100000-299999")],
        Body::Bytes(&blob[100_000..]),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_blob(&server, "repo", &blob);
}

#[test]
fn too_many_open_uploads_and_oversized_manifests_are_refused() {
    let root = Scratch::new();
    let server = Server::start(&root.path("root"), &["--max-uploads", "2"]);
    let first = start_upload(&server, "repo");
    start_upload(&server, "repo");
    let r = server.request("POST", "/v2/repo/blobs/uploads/", &[], Body::None);
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    assert_eq!(
        server.request("DELETE", &first, &[], Body::None).status,
        204
    );
    start_upload(&server, "repo");

    let index = |len: usize| {
        let head = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"annotations":{"x":""#;
        let tail = br#""}}"#;
        let mut m = head.to_vec();
        m.resize(len - tail.len(), b'a');
        m.extend_from_slice(tail);
        m
    };
    let ct = [("Content-Type", "application/vnd.oci.image.index.v1+json")];
    // Refused from the announced length, before any byte of the body is read (sending the
    // body too would race the server's close with a reset).
    let too_big = ((4 << 20) + 1).to_string();
    let r = server.request(
        "PUT",
        "/v2/repo/manifests/big",
        &[ct[0], ("Content-Length", &too_big)],
        Body::None,
    );
    assert_eq!(r.status, 413);
    let fits = index(4 << 20);
    let r = server.request("PUT", "/v2/repo/manifests/fits", &ct, Body::Bytes(&fits));
    assert_eq!(
        r.status,
        201,
        "a 4 MiB manifest fits: {:?}",
        String::from_utf8_lossy(&r.body)
    );
}
