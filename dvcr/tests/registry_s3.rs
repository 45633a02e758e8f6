//! The registry on S3-compatible object storage, against a real S3 server (`s3s-fs`, which
//! checks SigV4 signatures): several replicas on one bucket sharing upload sessions, blobs
//! assembled from multipart parts without a copy, presigned redirects, and garbage
//! collection that waits for writes in flight on other replicas. (The conformance and client
//! suites also run on S3 in CI with `DVCR_TEST_S3=1`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Registry, S3Server, image_manifest, noise, sha256,
};

fn s3() -> Arc<S3Server> {
    let server = Arc::new(S3Server::start());
    server.create_bucket("dvcr");
    server
}

/// Sends `data` to an open session in chunks of `chunk` bytes, alternating between the
/// replicas; returns the upload's location.
fn chunked_upload(replicas: &[&Registry], repo: &str, data: &[u8], chunk: usize) -> String {
    let post = replicas[0]
        .req("POST", &format!("/v2/{repo}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send();
    assert_eq!(post.status, 202, "{post:?}");
    let mut location = post.location();
    for (i, piece) in data.chunks(chunk).enumerate() {
        let reg = replicas[(i + 1) % replicas.len()];
        let start = i * chunk;
        let end = start + piece.len() - 1;
        let r = reg
            .req("PATCH", &location)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", &format!("{start}-{end}"))
            .body(piece.to_vec())
            .send();
        assert_eq!(r.status, 202, "chunk {i} on replica {}: {r:?}", reg.addr);
        assert_eq!(r.header("Range"), Some(format!("0-{end}").as_str()));
        location = r.location();
    }
    location
}

#[test]
fn two_replicas_on_one_bucket_serve_one_chunked_upload_alternately_and_both_serve_the_result() {
    let server = s3();
    let a = Registry::start_on_s3(&server, "dvcr", &[]);
    let b = Registry::start_on_s3(&server, "dvcr", &[]);
    // 21 MiB in odd-sized chunks: two full 8 MiB parts, tails carried between requests and
    // replicas, and a last part of 5 MiB.
    let data = noise(21 << 20, 7);
    let digest = sha256(&data);
    let location = chunked_upload(&[&a, &b], "vm/disk", &data, (3 << 20) + 4097);

    // The status of the session is the same from either replica.
    for reg in [&a, &b] {
        let st = reg.req("GET", &location).send();
        assert_eq!(st.status, 204, "{st:?}");
        assert_eq!(
            st.header("Range"),
            Some(format!("0-{}", data.len() - 1).as_str())
        );
    }
    let put = a
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={digest}")),
        )
        .header("Content-Length", "0")
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    for reg in [&a, &b] {
        assert_eq!(reg.pull_blob_verified("vm/disk", &digest), data);
        let ranged = reg
            .req("GET", &format!("/v2/vm/disk/blobs/{digest}"))
            .header("Range", "bytes=8388600-8388615")
            .send();
        assert_eq!(ranged.status, 206, "{ranged:?}");
        assert_eq!(ranged.body, data[8388600..=8388615]);
    }

    // A manifest pushed to one replica is served, tagged and listed by the other.
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = b.push_blob("vm/disk", config);
    let manifest = image_manifest(
        (OCI_CONFIG, &config_digest, config.len()),
        &[(OCI_LAYER, &digest, data.len())],
    );
    b.push_manifest("vm/disk", "v1", OCI_MANIFEST, &manifest);
    assert_eq!(a.pull_image_verified("vm/disk", "v1"), manifest);
    let tags = a.req("GET", "/v2/vm/disk/tags/list").send().json();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    let catalog = b.req("GET", "/v2/_catalog").send().json();
    assert_eq!(catalog["repositories"], serde_json::json!(["vm/disk"]));

    // The blob's bytes were written once, as one object; no upload state is left.
    let keys = server.keys("dvcr");
    let data_objects: Vec<_> = keys.iter().filter(|k| k.starts_with("d/")).collect();
    assert_eq!(data_objects.len(), 3, "disk, config, manifest: {keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("u/")),
        "upload state left behind: {keys:?}"
    );
}

#[test]
fn a_chunk_that_does_not_continue_the_session_is_refused_by_the_other_replica_too() {
    let server = s3();
    let a = Registry::start_on_s3(&server, "dvcr", &[]);
    let b = Registry::start_on_s3(&server, "dvcr", &[]);
    let data = noise(1000, 3);
    let location = chunked_upload(&[&a, &b], "r", &data, 400);
    let r = a
        .req("PATCH", &location)
        .header("Content-Range", "2000-2099")
        .body(vec![1; 100])
        .send();
    assert_eq!(r.status, 416, "{r:?}");
    assert_eq!(r.header("Range"), Some("0-999"));
    // The refused chunk changed nothing: the next one continues at 1000 on the other replica.
    let next = b
        .req("PATCH", &location)
        .header("Content-Range", "1000-1099")
        .header("Content-Length", "100")
        .body(vec![2; 100])
        .send();
    assert_eq!(next.status, 202, "{next:?}");
    let st = a.req("GET", &location).send();
    assert_eq!(st.header("Range"), Some("0-1099"));
    let mut all = data.clone();
    all.extend_from_slice(&[2; 100]);
    let put = b
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={}", sha256(&all))),
        )
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(a.pull_blob_verified("r", &sha256(&all)), all);
}

#[test]
fn a_wrong_digest_on_object_storage_publishes_nothing_and_leaves_no_objects() {
    let server = s3();
    let reg = Registry::start_on_s3(&server, "dvcr", &[]);
    let data = noise(9 << 20, 11);
    let location = chunked_upload(&[&reg], "r", &data, 5 << 20);
    let claimed = sha256(b"something else");
    let put = reg
        .req(
            "PUT",
            &common::with_query(&location, &format!("digest={claimed}")),
        )
        .send();
    put.assert_error(400, &["DIGEST_INVALID"]);
    let head = reg
        .req("HEAD", &format!("/v2/r/blobs/{}", sha256(&data)))
        .send();
    assert_eq!(head.status, 404);
    let keys = server.keys("dvcr");
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("d/") || k.starts_with("b/") || k.starts_with("u/")),
        "{keys:?}"
    );
}

#[test]
fn blob_gets_redirect_to_a_presigned_url_of_the_bucket_when_asked() {
    let server = s3();
    let reg = Registry::start_on_s3(&server, "dvcr", &["--s3-redirect"]);
    let data = noise(3 << 20, 5);
    let digest = reg.push_blob("r", &data);
    let r = reg.req("GET", &format!("/v2/r/blobs/{digest}")).send();
    assert_eq!(r.status, 307, "{r:?}");
    let url = r.must("Location").to_owned();
    assert!(url.starts_with(&server.endpoint), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blob");
    let curl = Command::new("curl")
        .args(["-sS", "-f", "-o"])
        .arg(&out)
        .arg(&url)
        .status()
        .unwrap();
    assert!(curl.success());
    assert_eq!(common::sha256_file(&out), digest);
    // A tampered signature is refused by the bucket.
    let at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &url[at..=at] == "0" { "1" } else { "0" };
    let bad = format!("{}{flipped}{}", &url[..at], &url[at + 1..]);
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&status.stdout), "403");
}

fn gc(server: &S3Server, extra: &[&str]) -> Command {
    let (args, env) = server.serve_settings("dvcr");
    let mut cmd = Command::new(common::DVCR);
    cmd.arg("gc").args(&args).args(extra).envs(env);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DVCR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn garbage_collection_on_the_bucket_frees_only_unreferenced_blobs_and_waits_for_writes_in_flight() {
    let server = s3();
    let reg = Registry::start_on_s3(&server, "dvcr", &[]);
    let (manifest, _) = reg.push_image("keep/me", "v1", 1);
    let orphan = reg.push_blob("keep/me", &noise(10 << 20, 9));
    let bucket = server.dir.path().join("data").join("dvcr");

    // A write in flight on some replica (its pin) holds the collection back.
    std::fs::create_dir_all(bucket.join("gc/pins")).unwrap();
    let pin = bucket.join("gc/pins/in-flight");
    std::fs::write(&pin, b"").unwrap();
    let mut running = gc(&server, &["--grace", "0s", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        running.try_wait().unwrap().is_none(),
        "the collection must wait for the pin"
    );
    assert_eq!(
        reg.req("HEAD", &format!("/v2/keep/me/blobs/{orphan}"))
            .send()
            .status,
        200
    );
    std::fs::remove_file(&pin).unwrap();
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["blobs_deleted"], 1, "{report}");
    assert_eq!(report["bytes_freed"], 10 << 20, "{report}");

    assert_eq!(
        reg.req("HEAD", &format!("/v2/keep/me/blobs/{orphan}"))
            .send()
            .status,
        404
    );
    assert_eq!(reg.pull_image_verified("keep/me", "v1"), manifest);
    assert!(
        !server.keys("dvcr").iter().any(|k| k.starts_with("gc/")),
        "the lock and pins are gone"
    );

    // While a collection holds the lock, a manifest push on a replica waits for it.
    std::fs::write(bucket.join("gc/lock"), b"{}").unwrap();
    let lock = bucket.join("gc/lock");
    let remover = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::remove_file(lock).unwrap();
    });
    let started = Instant::now();
    reg.push_manifest("keep/me", "v2", OCI_MANIFEST, &manifest);
    assert!(started.elapsed() >= Duration::from_millis(1000));
    remover.join().unwrap();

    // A second collection while one runs is refused.
    std::fs::write(bucket.join("gc/lock"), b"{}").unwrap();
    let out = gc(&server, &["--grace", "0s"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A lock nobody refreshed for longer than its lifetime (its collector was killed) is
    // taken over, and the collection runs.
    let stale = Command::new("touch")
        .args(["-d", "5 minutes ago"])
        .arg(bucket.join("gc/lock"))
        .status()
        .unwrap();
    assert!(stale.success());
    let out = gc(&server, &["--grace", "0s"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bucket.join("gc/lock").exists());
}

#[test]
fn a_registry_with_wrong_bucket_credentials_refuses_to_start_with_a_clear_error() {
    let server = s3();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::DVCR)
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path())
        .args(["--s3-bucket", "dvcr", "--s3-endpoint", &server.endpoint])
        .env("AWS_ACCESS_KEY_ID", common::S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bucket dvcr"), "{err}");
    assert!(err.contains("credentials"), "{err}");
}
