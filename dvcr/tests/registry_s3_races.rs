//! Failure and race scenarios of the S3 storage backend against a real S3 server
//! (`s3s-fs`): a ranged chunk that breaks off after its first multipart part leaves no
//! multipart upload behind; while one request appends to a session on one replica, another
//! request of the same session on another replica is refused and changes nothing, so no two
//! requests write parts of one upload and the published blob has exactly the accepted
//! bytes; and a replica stopped during its online collection leaves no `gc/lock` behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{Registry, S3Server, noise, sha256};

fn s3() -> Arc<S3Server> {
    let server = Arc::new(S3Server::start());
    server.create_bucket("dvcr");
    server
}

/// Multipart uploads (and their parts) the S3 server still holds: s3s-fs keeps each as
/// `.upload-<id>.json` and `.upload_id-<id>.part-<n>` files in its root.
fn open_multipart_files(server: &S3Server) -> Vec<String> {
    std::fs::read_dir(server.dir.path().join("data"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect()
}

fn start_session(reg: &Registry, repo: &str) -> String {
    let post = reg
        .req("POST", &format!("/v2/{repo}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send();
    assert_eq!(post.status, 202, "{post:?}");
    post.location()
}

/// A request whose body is sent in two steps: the head and `first` now, the rest later.
struct SlowRequest {
    stream: TcpStream,
}

impl SlowRequest {
    fn open(reg: &Registry, method: &str, location: &str, headers: &[(&str, String)]) -> Self {
        let stream = TcpStream::connect(&reg.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            reg.path_of(location),
            reg.addr
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut req = SlowRequest { stream };
        req.stream.write_all(head.as_bytes()).unwrap();
        req
    }

    /// Sends more of the body; a server that already answered (and closed) may refuse it.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
        let _ = self.stream.flush();
    }

    /// Sends the rest of the body; the status and the `Range` header of the answer.
    fn finish(mut self, rest: &[u8]) -> (u16, Option<String>, String) {
        self.send(rest);
        let mut text = Vec::new();
        // A server that answered early may reset the connection after its answer.
        let _ = self.stream.read_to_end(&mut text);
        let text = String::from_utf8_lossy(&text).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let range = text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("range").then(|| v.trim().to_owned())
        });
        (status, range, text)
    }
}

#[test]
fn a_ranged_chunk_that_breaks_off_after_its_first_part_leaves_no_multipart_upload_behind() {
    let server = s3();
    let reg = Registry::start_on_s3(&server, "dvcr", &[]);
    let location = start_session(&reg, "r");
    // The chunk announces 10 MiB but brings 9: the first 8 MiB part was sent to a new
    // multipart upload before the shortfall showed, and the session is rolled back.
    let data = noise(9 << 20, 21);
    let short = reg
        .req("PATCH", &location)
        .header("Content-Range", &format!("0-{}", (10 << 20) - 1))
        .chunked(data.chunks(1 << 20).map(<[u8]>::to_vec).collect())
        .send();
    short.assert_error(400, &["SIZE_INVALID"]);
    let st = reg.req("GET", &location).send();
    assert_eq!(st.header("Range"), Some("0-0"), "{st:?}");

    // The client sends the chunk again, whole, and completes the upload.
    let digest = sha256(&data);
    let again = reg
        .req("PATCH", &location)
        .header("Content-Range", &format!("0-{}", data.len() - 1))
        .body(data.clone())
        .send();
    assert_eq!(again.status, 202, "{again:?}");
    let put = reg
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={digest}")),
        )
        .header("Content-Length", "0")
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(reg.pull_blob_verified("r", &digest), data);

    // Nothing of the upload is left in the bucket, multipart uploads included (an
    // incomplete multipart upload is billed storage that no listing of objects shows).
    assert_eq!(open_multipart_files(&server), Vec::<String>::new());
}

#[test]
fn a_chunk_sent_to_another_replica_while_one_is_appending_is_refused_and_changes_nothing() {
    let server = s3();
    let a = Registry::start_on_s3(&server, "dvcr", &[]);
    let b = Registry::start_on_s3(&server, "dvcr", &[]);
    let location = start_session(&a, "r");
    let data = noise(1000, 22);
    let ranged = |len: usize| {
        vec![
            ("Content-Range", format!("0-{}", len - 1)),
            ("Content-Length", len.to_string()),
        ]
    };
    // A client sends the chunk to replica a, which is slow to receive it; the client gives
    // up waiting and sends the same chunk to replica b: refused while a appends.
    let mut slow = SlowRequest::open(&a, "PATCH", &location, &ranged(data.len()));
    slow.send(&data[..500]);
    std::thread::sleep(Duration::from_millis(700));
    let fast = b
        .req("PATCH", &location)
        .header("Content-Range", &format!("0-{}", data.len() - 1))
        .body(data.clone())
        .send();
    fast.assert_error(409, &["BLOB_UPLOAD_INVALID"]);
    assert!(
        String::from_utf8_lossy(&fast.body).contains("another request is appending"),
        "{fast:?}"
    );
    // Replica a's request completes the chunk; b's refusal changed nothing.
    let (status, range, text) = slow.finish(&data[500..]);
    assert_eq!(status, 202, "{text}");
    assert_eq!(range.as_deref(), Some("0-999"));
    let st = b.req("GET", &location).send();
    assert_eq!(st.header("Range"), Some("0-999"));
    let put = b
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={}", sha256(&data))),
        )
        .header("Content-Length", "0")
        .send();
    assert_eq!(put.status, 201, "{put:?}");
}

#[test]
fn two_requests_of_one_session_on_two_replicas_cannot_mix_their_bytes_into_the_published_blob() {
    let server = s3();
    let a = Registry::start_on_s3(&server, "dvcr", &[]);
    let b = Registry::start_on_s3(&server, "dvcr", &[]);
    let location = start_session(&a, "r");
    // First chunk: one full 8 MiB part and a 10-byte tail.
    let first = noise((8 << 20) + 10, 23);
    let r = a
        .req("PATCH", &location)
        .header("Content-Range", &format!("0-{}", first.len() - 1))
        .body(first.clone())
        .send();
    assert_eq!(r.status, 202, "{r:?}");

    // Two requests continue the session at once from the same saved state, on two
    // replicas: the honest ranged chunk on b, and other bytes, streamed, on a. Without a
    // claim on the session both would write part number 2 of the same multipart upload;
    // the second to start must be refused instead.
    let honest = noise(9 << 20, 24);
    let other = noise(9 << 20, 25);
    let hold = 64 << 10;
    let start = first.len();
    let mut on_b = SlowRequest::open(
        &b,
        "PATCH",
        &location,
        &[
            (
                "Content-Range",
                format!("{start}-{}", start + honest.len() - 1),
            ),
            ("Content-Length", honest.len().to_string()),
        ],
    );
    on_b.send(&honest[..honest.len() - hold]);
    std::thread::sleep(Duration::from_millis(1500));
    let mut on_a = SlowRequest::open(
        &a,
        "PATCH",
        &location,
        &[("Content-Length", other.len().to_string())],
    );
    on_a.send(&other[..other.len() - hold]);
    std::thread::sleep(Duration::from_millis(1500));

    // b's request ends first and wins the session; a's loses.
    let (status_b, range_b, text_b) = on_b.finish(&honest[honest.len() - hold..]);
    assert_eq!(status_b, 202, "{text_b}");
    let all_len = first.len() + honest.len();
    assert_eq!(range_b, Some(format!("0-{}", all_len - 1)));
    let (status_a, _, text_a) = on_a.finish(&other[other.len() - hold..]);
    assert_eq!(
        status_a, 409,
        "the second request must be refused: {text_a}"
    );

    // The upload completes with what b accepted, and the blob published under that digest
    // has exactly those bytes.
    let mut all = first.clone();
    all.extend_from_slice(&honest);
    let digest = sha256(&all);
    let put = b
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={digest}")),
        )
        .header("Content-Length", "0")
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    let got = b.req("GET", &format!("/v2/r/blobs/{digest}")).send();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body.len(), all.len());
    assert!(
        got.body == all,
        "the blob served as {digest} has other bytes (sha256 {})",
        sha256(&got.body)
    );
}

#[test]
fn a_replica_stopped_while_its_online_collection_waits_leaves_no_lock_that_blocks_every_write() {
    let server = s3();
    let bucket = server.dir.path().join("data").join("dvcr");
    // A write in flight elsewhere (its pin) keeps the collection waiting, lock held.
    std::fs::create_dir_all(bucket.join("gc/pins")).unwrap();
    std::fs::write(bucket.join("gc/pins/in-flight"), b"").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (args, env) = server.serve_settings("dvcr");
    let mut cmd = std::process::Command::new(common::DVCR);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--gc-interval",
        "1s",
        "--root",
    ])
    .arg(dir.path())
    .args(&args)
    .envs(env)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DVCR_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let lock = bucket.join("gc/lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !lock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the online collection never took its lock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A rolling update stops the replica (SIGTERM, as Kubernetes does).
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = child.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    std::fs::remove_file(bucket.join("gc/pins/in-flight")).unwrap();
    // Otherwise every push, commit and mount on every replica waits for it, then fails,
    // for LOCK_TTL (6 h).
    assert!(
        !lock.exists(),
        "the stopped replica left gc/lock behind: {:?}",
        std::fs::read_to_string(&lock)
    );
}
