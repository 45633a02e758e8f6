//! `dvcr serve` against the OCI Distribution Specification v1.1, black box: every case of the
//! conformance workflows (Pull, Push, Content Discovery, Content Management) and the edges
//! real clients trip on (ranges, streamed and out-of-order chunks, mounts, referrers, tag
//! pagination, names routed from the right, the error JSON), written from `spec.md` and
//! `../shared/docs/registry.md`. Each test starts its own server on a free loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};

const REPO: &str = "vi/ns/name";

// ---------------------------------------------------------------------------------------------
// Base
// ---------------------------------------------------------------------------------------------

#[test]
fn the_base_endpoint_answers_200_with_the_api_version_header() {
    let reg = Registry::start();
    let r = reg.req("GET", "/v2/").send();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("Docker-Distribution-API-Version"),
        Some("registry/2.0")
    );
}

// ---------------------------------------------------------------------------------------------
// Pull
// ---------------------------------------------------------------------------------------------

#[test]
fn a_pushed_blob_is_fetched_by_get_and_head_with_its_digest_and_length() {
    let reg = Registry::start();
    let data = noise(70_000, 1);
    let digest = reg.push_blob(REPO, &data);

    let head = reg
        .req("HEAD", &format!("/v2/{REPO}/blobs/{digest}"))
        .send();
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("Content-Length"), Some("70000"), "{head:?}");
    assert_eq!(head.header("Docker-Content-Digest"), Some(digest.as_str()));
    assert!(head.body.is_empty());

    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert_eq!(get.status, 200);
    assert_eq!(get.header("Docker-Content-Digest"), Some(digest.as_str()));
    assert_eq!(get.header("Content-Length"), Some("70000"));
    assert!(get.body == data, "GET returned different bytes");
}

#[test]
fn an_unknown_blob_is_404_blob_unknown_on_get_and_404_on_head() {
    let reg = Registry::start();
    reg.push_blob(REPO, b"something so the repository exists");
    let d = unknown_digest();
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{d}")).send();
    get.assert_error(404, &["BLOB_UNKNOWN"]);
    let head = reg.req("HEAD", &format!("/v2/{REPO}/blobs/{d}")).send();
    assert_eq!(head.status, 404, "{head:?}");
}

#[test]
fn a_manifest_is_pulled_by_tag_and_by_digest_byte_exact_with_its_media_type() {
    let reg = Registry::start();
    let (manifest, digest) = reg.push_image(REPO, "v1", 1);
    for reference in ["v1", digest.as_str()] {
        let get = reg
            .req("GET", &format!("/v2/{REPO}/manifests/{reference}"))
            .header("Accept", OCI_MANIFEST)
            .send();
        assert_eq!(get.status, 200, "{get:?}");
        assert!(
            get.body == manifest,
            "manifest is not byte-exact by {reference}"
        );
        assert_eq!(get.header("Content-Type"), Some(OCI_MANIFEST));
        assert_eq!(get.header("Docker-Content-Digest"), Some(digest.as_str()));

        let head = reg
            .req("HEAD", &format!("/v2/{REPO}/manifests/{reference}"))
            .header("Accept", OCI_MANIFEST)
            .send();
        assert_eq!(head.status, 200, "{head:?}");
        assert_eq!(head.header("Docker-Content-Digest"), Some(digest.as_str()));
        assert_eq!(
            head.header("Content-Length"),
            Some(manifest.len().to_string().as_str())
        );
        assert_eq!(head.header("Content-Type"), Some(OCI_MANIFEST));
    }
}

#[test]
fn an_unknown_manifest_is_404_manifest_unknown_by_tag_and_by_digest() {
    let reg = Registry::start();
    reg.push_image(REPO, "v1", 1);
    for reference in ["nonexistent".to_string(), unknown_digest()] {
        let get = reg
            .req("GET", &format!("/v2/{REPO}/manifests/{reference}"))
            .send();
        get.assert_error(404, &["MANIFEST_UNKNOWN"]);
        let head = reg
            .req("HEAD", &format!("/v2/{REPO}/manifests/{reference}"))
            .send();
        assert_eq!(head.status, 404, "{head:?}");
    }
}

#[test]
fn a_repository_never_pushed_is_404_for_manifests_and_tags() {
    let reg = Registry::start();
    let m = reg.req("GET", "/v2/never/pushed/manifests/latest").send();
    assert_eq!(m.status, 404, "{m:?}");
    let codes = m.error_codes();
    assert!(
        codes[0] == "NAME_UNKNOWN" || codes[0] == "MANIFEST_UNKNOWN",
        "{codes:?}"
    );
    let t = reg.req("GET", "/v2/never/pushed/tags/list").send();
    t.assert_error(404, &["NAME_UNKNOWN"]);
}

#[test]
fn single_range_requests_on_a_blob_answer_206_with_content_range() {
    let reg = Registry::start();
    let data = noise(10_000, 2);
    let digest = reg.push_blob(REPO, &data);
    let path = format!("/v2/{REPO}/blobs/{digest}");
    for (range, start, end) in [
        ("bytes=10-19", 10usize, 19usize),
        ("bytes=9000-", 9000, 9999),
        ("bytes=-50", 9950, 9999),
        ("bytes=9990-20000", 9990, 9999),
        ("bytes=0-0", 0, 0),
    ] {
        let r = reg.req("GET", &path).header("Range", range).send();
        assert_eq!(r.status, 206, "{range}: {r:?}");
        assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes {start}-{end}/10000").as_str()),
            "{range}"
        );
        assert_eq!(
            r.header("Content-Length"),
            Some((end - start + 1).to_string().as_str()),
            "{range}"
        );
        assert!(r.body == data[start..=end], "{range}: wrong bytes");
    }
}

#[test]
fn an_unsatisfiable_blob_range_answers_416() {
    let reg = Registry::start();
    let data = noise(1000, 3);
    let digest = reg.push_blob(REPO, &data);
    let r = reg
        .req("GET", &format!("/v2/{REPO}/blobs/{digest}"))
        .header("Range", "bytes=1000-")
        .send();
    assert_eq!(r.status, 416, "{r:?}");
    if let Some(cr) = r.header("Content-Range") {
        assert_eq!(cr, "bytes */1000");
    }
}

#[test]
fn a_blob_is_never_sent_with_a_content_encoding() {
    let reg = Registry::start();
    let data = vec![b'a'; 100_000]; // very compressible
    let digest = reg.push_blob(REPO, &data);
    let r = reg
        .req("GET", &format!("/v2/{REPO}/blobs/{digest}"))
        .header("Accept-Encoding", "gzip, deflate, br, zstd")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Encoding"), None, "{r:?}");
    assert!(r.body == data);
}

#[test]
fn a_blob_of_one_repository_is_not_readable_through_another_until_mounted() {
    let reg = Registry::start();
    let digest = reg.push_blob("team-a/app", b"private layer of team a");
    reg.push_blob("team-b/app", b"so that team b exists");
    let r = reg
        .req("GET", &format!("/v2/team-b/app/blobs/{digest}"))
        .send();
    assert_eq!(r.status, 404, "blobs are scoped to their repository: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// Push: monolithic
// ---------------------------------------------------------------------------------------------

#[test]
fn post_answers_202_with_a_session_location_uuid_and_empty_range() {
    let reg = Registry::start();
    let r = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    assert_eq!(r.status, 202, "{r:?}");
    let loc = r.location();
    assert!(!loc.is_empty());
    let uuid = r.must("Docker-Upload-UUID");
    assert!(
        loc.contains(uuid),
        "the Location {loc} holds the session id {uuid}"
    );
    assert_eq!(r.header("Range"), Some("0-0"));
    reg.path_of(&loc); // relative, or absolute on this server
}

#[test]
fn post_then_put_pushes_a_blob_monolithically() {
    let reg = Registry::start();
    let data = noise(123_457, 4);
    let digest = sha256(&data);
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    assert_eq!(post.status, 202);
    let put = reg
        .req(
            "PUT",
            &with_query(&post.location(), &format!("digest={digest}")),
        )
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(put.header("Docker-Content-Digest"), Some(digest.as_str()));
    let blob_url = put.location();
    let get = reg.req("GET", &blob_url).send();
    assert_eq!(get.status, 200, "the PUT Location is a pullable blob URL");
    assert!(get.body == data);
    assert!(
        blob_url.ends_with(&format!("/v2/{REPO}/blobs/{digest}")),
        "{blob_url}"
    );
}

#[test]
fn a_single_post_with_digest_and_body_creates_the_blob() {
    let reg = Registry::start();
    let data = noise(5000, 5);
    let digest = sha256(&data);
    let r = reg
        .req(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?digest={digest}"),
        )
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send();
    assert_eq!(r.status, 201, "{r:?}");
    let get = reg.req("GET", &r.location()).send();
    assert_eq!(get.status, 200);
    assert!(get.body == data);
}

#[test]
fn an_empty_blob_is_pushed_and_pulled() {
    let reg = Registry::start();
    let digest = reg.push_blob(REPO, b"");
    assert_eq!(
        digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let head = reg
        .req("HEAD", &format!("/v2/{REPO}/blobs/{digest}"))
        .send();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some("0"));
}

#[test]
fn a_sha512_digest_is_accepted_for_a_blob() {
    let reg = Registry::start();
    let data = noise(4096, 6);
    let digest = sha512(&data);
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    let put = reg
        .req(
            "PUT",
            &with_query(&post.location(), &format!("digest={digest}")),
        )
        .body(data.clone())
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert_eq!(get.status, 200, "{get:?}");
    assert!(get.body == data);
}

#[test]
fn a_put_whose_digest_does_not_match_the_bytes_is_400_digest_invalid_and_stores_nothing() {
    let reg = Registry::start();
    let data = noise(4096, 7);
    let wrong = sha256(b"other bytes");
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    let put = reg
        .req(
            "PUT",
            &with_query(&post.location(), &format!("digest={wrong}")),
        )
        .body(data.clone())
        .send();
    put.assert_error(400, &["DIGEST_INVALID"]);
    for d in [wrong, sha256(&data)] {
        let head = reg.req("HEAD", &format!("/v2/{REPO}/blobs/{d}")).send();
        assert_eq!(head.status, 404, "nothing stored under {d}");
    }

    let single = reg
        .req(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?digest={}", sha256(b"x")),
        )
        .body(b"y".to_vec())
        .send();
    single.assert_error(400, &["DIGEST_INVALID"]);
}

#[test]
fn a_malformed_digest_on_put_is_400_digest_invalid() {
    let reg = Registry::start();
    for bad in [
        "sha256:zz",
        "sha256:1234",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nonsense",
    ] {
        let post = reg
            .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
            .send();
        let put = reg
            .req(
                "PUT",
                &with_query(&post.location(), &format!("digest={bad}")),
            )
            .body(b"data".to_vec())
            .send();
        assert_eq!(put.status, 400, "{bad}: {put:?}");
        let codes = put.error_codes();
        assert!(
            codes[0] == "DIGEST_INVALID" || codes[0] == "UNSUPPORTED",
            "{bad}: {codes:?}"
        );
    }
}

#[test]
fn a_put_without_a_digest_is_refused() {
    let reg = Registry::start();
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    let put = reg
        .req("PUT", &post.location())
        .body(b"data".to_vec())
        .send();
    assert_eq!(put.status, 400, "{put:?}");
    let codes = put.error_codes();
    assert!(
        codes[0] == "DIGEST_INVALID" || codes[0] == "BLOB_UPLOAD_INVALID",
        "{codes:?}"
    );
}

#[test]
fn two_concurrent_pushes_of_the_same_blob_both_succeed() {
    let reg = Registry::start();
    let data = noise(8 << 20, 8);
    let digest = sha256(&data);
    std::thread::scope(|s| {
        let pushes: Vec<_> = (0..2)
            .map(|_| s.spawn(|| reg.push_blob(REPO, &data)))
            .collect();
        for p in pushes {
            assert_eq!(p.join().unwrap(), digest);
        }
    });
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert_eq!(get.status, 200);
    assert!(get.body == data);
}

// ---------------------------------------------------------------------------------------------
// Push: streamed and chunked
// ---------------------------------------------------------------------------------------------

#[test]
fn a_streamed_patch_with_chunked_transfer_encoding_then_put_creates_the_blob() {
    let reg = Registry::start();
    let data = noise(3 << 20, 9);
    let digest = sha256(&data);
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    assert_eq!(post.status, 202);
    let chunks: Vec<Vec<u8>> = data.chunks(100_000).map(<[u8]>::to_vec).collect();
    let patch = reg
        .req("PATCH", &post.location())
        .header("Content-Type", "application/octet-stream")
        .chunked(chunks)
        .send();
    assert_eq!(patch.status, 202, "{patch:?}");
    assert_eq!(
        patch.header("Range"),
        Some(format!("0-{}", data.len() - 1).as_str())
    );
    let put = reg
        .req(
            "PUT",
            &with_query(&patch.location(), &format!("digest={digest}")),
        )
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(put.header("Docker-Content-Digest"), Some(digest.as_str()));
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert!(get.body == data);
}

#[test]
fn a_streamed_patch_with_content_length_then_put_creates_the_blob() {
    let reg = Registry::start();
    let data = noise(200_000, 10);
    let digest = sha256(&data);
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .send();
    let patch = reg
        .req("PATCH", &post.location())
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send();
    assert_eq!(patch.status, 202, "{patch:?}");
    assert_eq!(patch.header("Range"), Some("0-199999"));
    let put = reg
        .req(
            "PUT",
            &with_query(&patch.location(), &format!("digest={digest}")),
        )
        .send();
    assert_eq!(put.status, 201, "{put:?}");
}

/// POST with `Content-Length: 0`, then PATCHes of `chunks` with their Content-Range.
fn chunked_session(reg: &Registry) -> String {
    let post = reg
        .req("POST", &format!("/v2/{REPO}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send();
    assert_eq!(post.status, 202, "{post:?}");
    post.location()
}

fn patch_range(reg: &Registry, loc: &str, data: &[u8], start: usize, end: usize) -> Response {
    reg.req("PATCH", loc)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", &format!("{start}-{end}"))
        .body(data[start..=end].to_vec())
        .send()
}

#[test]
fn chunks_patched_in_order_with_content_range_and_a_final_put_chunk_complete_the_blob() {
    let reg = Registry::start();
    let data = noise(2500, 11);
    let digest = sha256(&data);
    let mut loc = chunked_session(&reg);
    for (start, end) in [(0, 999), (1000, 1999)] {
        let r = patch_range(&reg, &loc, &data, start, end);
        assert_eq!(r.status, 202, "{start}-{end}: {r:?}");
        assert_eq!(r.header("Range"), Some(format!("0-{end}").as_str()));
        loc = r.location();
    }
    let status = reg.req("GET", &loc).send();
    assert_eq!(status.status, 204, "{status:?}");
    assert_eq!(status.header("Range"), Some("0-1999"));
    assert!(status.header("Location").is_some());
    let put = reg
        .req(
            "PUT",
            &with_query(&status.location(), &format!("digest={digest}")),
        )
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "2000-2499")
        .body(data[2000..].to_vec())
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    let get = reg.req("GET", &put.location()).send();
    assert!(get.body == data);
}

#[test]
fn a_first_chunk_that_does_not_start_at_zero_is_refused_with_416() {
    let reg = Registry::start();
    let data = noise(2000, 12);
    let loc = chunked_session(&reg);
    let r = patch_range(&reg, &loc, &data, 1000, 1999);
    assert_eq!(r.status, 416, "{r:?}");
}

#[test]
fn a_chunk_that_leaves_a_gap_is_refused_with_416_and_the_session_goes_on() {
    let reg = Registry::start();
    let data = noise(3000, 13);
    let digest = sha256(&data);
    let loc = chunked_session(&reg);
    let first = patch_range(&reg, &loc, &data, 0, 999);
    assert_eq!(first.status, 202);
    let gap = patch_range(&reg, &first.location(), &data, 2000, 2999);
    assert_eq!(gap.status, 416, "{gap:?}");
    let status = reg.req("GET", &first.location()).send();
    assert_eq!(status.status, 204);
    assert_eq!(
        status.header("Range"),
        Some("0-999"),
        "the refused chunk left no trace"
    );
    let second = patch_range(&reg, &status.location(), &data, 1000, 2999);
    assert_eq!(second.status, 202, "{second:?}");
    let put = reg
        .req(
            "PUT",
            &with_query(&second.location(), &format!("digest={digest}")),
        )
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert!(get.body == data);
}

#[test]
fn a_replayed_chunk_is_refused_with_416() {
    let reg = Registry::start();
    let data = noise(2000, 14);
    let loc = chunked_session(&reg);
    let first = patch_range(&reg, &loc, &data, 0, 999);
    assert_eq!(first.status, 202);
    let replay = patch_range(&reg, &first.location(), &data, 0, 999);
    assert_eq!(replay.status, 416, "{replay:?}");
    let overlap = patch_range(&reg, &first.location(), &data, 500, 1499);
    assert_eq!(overlap.status, 416, "{overlap:?}");
    let status = reg.req("GET", &first.location()).send();
    assert_eq!(status.header("Range"), Some("0-999"));
}

#[test]
fn a_content_range_that_disagrees_with_the_body_length_is_refused() {
    let reg = Registry::start();
    let loc = chunked_session(&reg);
    let r = reg
        .req("PATCH", &loc)
        .header("Content-Range", "0-99")
        .body(vec![7u8; 50])
        .send();
    assert!(
        r.status == 400 || r.status == 416,
        "a 50-byte body claiming 100 bytes: {r:?}"
    );
    let status = reg.req("GET", &loc).send();
    assert_eq!(status.status, 204);
    assert_eq!(status.header("Range"), Some("0-0"), "nothing was kept");
}

#[test]
fn the_status_of_a_fresh_upload_session_is_204_with_location_and_range() {
    let reg = Registry::start();
    let loc = chunked_session(&reg);
    let r = reg.req("GET", &loc).send();
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("Range"), Some("0-0"));
    assert!(r.header("Location").is_some());
    assert!(r.header("Docker-Upload-UUID").is_some());
}

#[test]
fn cancelling_an_upload_answers_204_and_forgets_the_session() {
    let reg = Registry::start();
    let data = noise(1000, 15);
    let loc = chunked_session(&reg);
    let first = patch_range(&reg, &loc, &data, 0, 499);
    assert_eq!(first.status, 202);
    let del = reg.req("DELETE", &first.location()).send();
    assert_eq!(del.status, 204, "{del:?}");
    let status = reg.req("GET", &first.location()).send();
    status.assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
    let patch = patch_range(&reg, &first.location(), &data, 500, 999);
    patch.assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
    let put = reg
        .req(
            "PUT",
            &with_query(&first.location(), &format!("digest={}", sha256(&data))),
        )
        .send();
    put.assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
}

#[test]
fn an_unknown_upload_session_is_404_blob_upload_unknown() {
    let reg = Registry::start();
    reg.push_blob(REPO, b"repository exists");
    let path = format!("/v2/{REPO}/blobs/uploads/0b5f6d1c-95a7-4a5c-9d06-2f3d8c9e7f10");
    reg.req("GET", &path)
        .send()
        .assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
    reg.req("PATCH", &path)
        .body(b"x".to_vec())
        .send()
        .assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
    reg.req("DELETE", &path)
        .send()
        .assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
}

#[test]
fn an_upload_session_cannot_be_used_through_another_repository() {
    let reg = Registry::start();
    let post = reg.req("POST", "/v2/owner/repo/blobs/uploads/").send();
    assert_eq!(post.status, 202);
    let uuid = post.must("Docker-Upload-UUID").to_string();
    let r = reg
        .req("PATCH", &format!("/v2/intruder/repo/blobs/uploads/{uuid}"))
        .body(b"x".to_vec())
        .send();
    r.assert_error(404, &["BLOB_UPLOAD_UNKNOWN"]);
}

#[test]
fn an_upload_id_with_path_characters_is_refused() {
    let reg = Registry::start();
    for id in ["..%2F..%2Fetc", "%2e%2e", "a%00b"] {
        let r = reg
            .req("GET", &format!("/v2/{REPO}/blobs/uploads/{id}"))
            .send();
        assert!(
            r.status == 404 || r.status == 400,
            "upload id {id:?}: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Push: mount
// ---------------------------------------------------------------------------------------------

#[test]
fn mounting_a_blob_from_another_repository_answers_201_with_its_location() {
    let reg = Registry::start();
    let data = noise(9000, 16);
    let digest = reg.push_blob("source/repo", &data);
    let r = reg
        .req(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?mount={digest}&from=source/repo"),
        )
        .send();
    assert_eq!(r.status, 201, "{r:?}");
    let loc = r.location();
    assert!(
        loc.ends_with(&format!("/v2/{REPO}/blobs/{digest}")),
        "{loc}"
    );
    if let Some(d) = r.header("Docker-Content-Digest") {
        assert_eq!(d, digest);
    }
    let get = reg.req("GET", &loc).send();
    assert_eq!(get.status, 200);
    assert!(get.body == data);
}

#[test]
fn mounting_an_unknown_blob_answers_202_with_a_working_upload_session() {
    let reg = Registry::start();
    reg.push_blob("source/repo", b"exists");
    let data = noise(5000, 17);
    let digest = sha256(&data);
    let r = reg
        .req(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?mount={digest}&from=source/repo"),
        )
        .send();
    assert_eq!(r.status, 202, "{r:?}");
    let put = reg
        .req(
            "PUT",
            &with_query(&r.location(), &format!("digest={digest}")),
        )
        .body(data.clone())
        .send();
    assert_eq!(put.status, 201, "{put:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    assert!(get.body == data);
}

#[test]
fn mounting_from_an_invalid_repository_name_does_not_mount() {
    let reg = Registry::start();
    let digest = reg.push_blob("source/repo", b"exists");
    let r = reg
        .req(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?mount={digest}&from=../../source/repo"),
        )
        .send();
    assert_ne!(r.status, 201, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Push: manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_manifest_put_by_tag_answers_201_with_location_and_digest() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{}");
    let manifest = image_manifest((OCI_CONFIG, &config, 2), &[]);
    let r = reg.put_manifest(REPO, "latest", OCI_MANIFEST, &manifest);
    assert_eq!(
        r.status, 201,
        "a manifest with no layers is accepted: {r:?}"
    );
    let digest = sha256(&manifest);
    assert_eq!(r.header("Docker-Content-Digest"), Some(digest.as_str()));
    let get = reg.req("GET", &r.location()).send();
    assert_eq!(get.status, 200, "the Location is a pullable manifest URL");
    assert!(get.body == manifest);
}

#[test]
fn the_same_manifest_put_under_several_tags_is_one_digest() {
    let reg = Registry::start();
    let (manifest, digest) = reg.push_image(REPO, "test0", 1);
    for t in ["test1", "test2", "test3"] {
        assert_eq!(reg.push_manifest(REPO, t, OCI_MANIFEST, &manifest), digest);
    }
    let tags = reg
        .req("GET", &format!("/v2/{REPO}/tags/list"))
        .send()
        .json();
    assert_eq!(tags["tags"], json!(["test0", "test1", "test2", "test3"]));
}

#[test]
fn a_manifest_put_by_digest_answers_201_and_is_untagged() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{\"a\":1}");
    let manifest = image_manifest((OCI_CONFIG, &config, 7), &[]);
    let digest = sha256(&manifest);
    let r = reg.put_manifest(REPO, &digest, OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("Docker-Content-Digest"), Some(digest.as_str()));
    let get = reg
        .req("GET", &format!("/v2/{REPO}/manifests/{digest}"))
        .send();
    assert_eq!(get.status, 200);
    let tags = reg.req("GET", &format!("/v2/{REPO}/tags/list")).send();
    assert_eq!(tags.status, 200, "{tags:?}");
    assert_eq!(tags.json()["tags"].as_array().map_or(0, Vec::len), 0);
}

#[test]
fn a_manifest_put_by_a_digest_its_bytes_do_not_have_is_400() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{}");
    let manifest = image_manifest((OCI_CONFIG, &config, 2), &[]);
    let r = reg.put_manifest(REPO, &unknown_digest(), OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 400, "{r:?}");
    let codes = r.error_codes();
    assert!(
        codes[0] == "DIGEST_INVALID" || codes[0] == "MANIFEST_INVALID",
        "{codes:?}"
    );
    let r = reg.put_manifest(REPO, "sha256:totallywrong", OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 400, "{r:?}");
    r.error_codes();
}

#[test]
fn a_manifest_that_references_a_missing_blob_is_400_manifest_blob_unknown() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{}");
    let missing = unknown_digest();
    let missing_layer = image_manifest((OCI_CONFIG, &config, 2), &[(OCI_LAYER, &missing, 10)]);
    reg.put_manifest(REPO, "v1", OCI_MANIFEST, &missing_layer)
        .assert_error(400, &["MANIFEST_BLOB_UNKNOWN"]);
    let missing_config = image_manifest((OCI_CONFIG, &missing, 2), &[]);
    reg.put_manifest(REPO, "v1", OCI_MANIFEST, &missing_config)
        .assert_error(400, &["MANIFEST_BLOB_UNKNOWN"]);
    let get = reg.req("GET", &format!("/v2/{REPO}/manifests/v1")).send();
    assert_eq!(get.status, 404, "a refused manifest leaves no tag");
}

#[test]
fn an_index_that_references_a_missing_manifest_is_400_manifest_blob_unknown() {
    let reg = Registry::start();
    reg.push_blob(REPO, b"repository exists");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": unknown_digest(), "size": 100}]
    }))
    .unwrap();
    reg.put_manifest(REPO, "idx", OCI_INDEX, &index)
        .assert_error(400, &["MANIFEST_BLOB_UNKNOWN"]);
}

#[test]
fn a_manifest_that_is_not_json_is_400_manifest_invalid() {
    let reg = Registry::start();
    for body in [&b"not json at all"[..], b"{\"schemaVersion\": 2", b"[]"] {
        reg.put_manifest(REPO, "bad", OCI_MANIFEST, body)
            .assert_error(400, &["MANIFEST_INVALID"]);
    }
}

#[test]
fn a_schema1_manifest_is_refused() {
    let reg = Registry::start();
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 1, "name": REPO, "tag": "old", "architecture": "amd64",
        "fsLayers": [{"blobSum": unknown_digest()}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": []
    }))
    .unwrap();
    for media_type in [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    ] {
        let r = reg.put_manifest(REPO, "old", media_type, &body);
        assert!(r.status == 400 || r.status == 415, "{media_type}: {r:?}");
        let codes = r.error_codes();
        assert!(
            codes[0] == "MANIFEST_INVALID" || codes[0] == "UNSUPPORTED",
            "{codes:?}"
        );
    }
    let get = reg.req("GET", &format!("/v2/{REPO}/manifests/old")).send();
    assert_eq!(get.status, 404);
}

#[test]
fn docker_schema2_manifests_lists_and_oci_indexes_are_stored_with_their_media_type() {
    let reg = Registry::start();
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}";
    let layer = noise(4000, 18);
    let cd = reg.push_blob(REPO, config);
    let ld = reg.push_blob(REPO, &layer);
    let docker = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": cd, "size": config.len()},
        "layers": [{"mediaType": DOCKER_LAYER, "digest": ld, "size": layer.len()}]
    }))
    .unwrap();
    let dd = reg.push_manifest(REPO, "docker", DOCKER_MANIFEST, &docker);
    let entry = json!({"mediaType": DOCKER_MANIFEST, "digest": dd, "size": docker.len(),
        "platform": {"architecture": "amd64", "os": "linux"}});
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [entry]
    }))
    .unwrap();
    reg.push_manifest(REPO, "list", DOCKER_LIST, &list);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]
    }))
    .unwrap();
    reg.push_manifest(REPO, "index", OCI_INDEX, &index);
    for (tag, mt, body) in [
        ("docker", DOCKER_MANIFEST, &docker),
        ("list", DOCKER_LIST, &list),
        ("index", OCI_INDEX, &index),
    ] {
        let get = reg
            .req("GET", &format!("/v2/{REPO}/manifests/{tag}"))
            .header(
                "Accept",
                &format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"),
            )
            .send();
        assert_eq!(get.status, 200, "{tag}: {get:?}");
        assert_eq!(get.header("Content-Type"), Some(mt), "{tag}");
        assert!(&get.body == body, "{tag} is not byte-exact");
    }
}

/// An OCI manifest of exactly `size` bytes (padded with an annotation), config only.
fn manifest_of_size(config: &str, size: usize) -> Vec<u8> {
    let mut v = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
        "layers": [],
        "annotations": {"pad": ""}
    });
    let base = serde_json::to_vec(&v).unwrap().len();
    v["annotations"]["pad"] = Value::String("p".repeat(size - base));
    let body = serde_json::to_vec(&v).unwrap();
    assert_eq!(body.len(), size);
    body
}

#[test]
fn a_manifest_of_nearly_4_mib_is_accepted_and_one_above_4_mib_is_413() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{}");
    let big = manifest_of_size(&config, (4 << 20) - 1024);
    let r = reg.put_manifest(REPO, "big", OCI_MANIFEST, &big);
    assert_eq!(r.status, 201, "{r:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/manifests/big")).send();
    assert!(get.body == big);

    let too_big = manifest_of_size(&config, (4 << 20) + 1024);
    let r = reg.put_manifest(REPO, "too-big", OCI_MANIFEST, &too_big);
    assert_eq!(r.status, 413, "{r:?}");
    let get = reg
        .req("GET", &format!("/v2/{REPO}/manifests/too-big"))
        .send();
    assert_eq!(get.status, 404);
}

#[test]
fn a_manifest_with_a_missing_subject_is_accepted_and_answers_oci_subject() {
    let reg = Registry::start();
    let empty = reg.push_blob(REPO, b"{}");
    let subject = unknown_digest();
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": EMPTY_JSON, "digest": empty, "size": 2},
        "layers": [{"mediaType": EMPTY_JSON, "digest": empty, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1234}
    }))
    .unwrap();
    let r = reg.put_manifest(REPO, &sha256(&referrer), OCI_MANIFEST, &referrer);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("OCI-Subject"), Some(subject.as_str()));
}

// ---------------------------------------------------------------------------------------------
// Content discovery: tags
// ---------------------------------------------------------------------------------------------

fn push_tags(reg: &Registry, tags: &[&str]) {
    let (manifest, _) = reg.push_image(REPO, tags[0], 1);
    for t in &tags[1..] {
        reg.push_manifest(REPO, t, OCI_MANIFEST, &manifest);
    }
}

fn tag_page(reg: &Registry, query: &str) -> (Vec<String>, Option<String>) {
    let r = reg
        .req("GET", &format!("/v2/{REPO}/tags/list{query}"))
        .send();
    assert_eq!(r.status, 200, "{query}: {r:?}");
    let v = r.json();
    assert_eq!(v["name"], REPO);
    let tags = v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("tags is not a list: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (tags, r.header("Link").map(str::to_string))
}

const SHUFFLED: [&str; 5] = ["v2", "latest", "beta-1", "v10", "alpha"];
const SORTED: [&str; 5] = ["alpha", "beta-1", "latest", "v10", "v2"];

#[test]
fn tags_are_listed_in_lexical_order() {
    let reg = Registry::start();
    push_tags(&reg, &SHUFFLED);
    let (tags, link) = tag_page(&reg, "");
    assert_eq!(tags, SORTED);
    assert_eq!(link, None, "the whole list has no next page");
}

#[test]
fn tags_paginate_with_n_and_a_link_header_to_the_next_page() {
    let reg = Registry::start();
    push_tags(&reg, &SHUFFLED);
    let mut query = "?n=2".to_string();
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let (tags, link) = tag_page(&reg, &query);
        pages += 1;
        assert!(tags.len() <= 2, "{tags:?}");
        all.extend(tags.clone());
        let Some(link) = link else {
            break;
        };
        assert_eq!(tags.len(), 2, "a page with a Link is full");
        // RFC 5988: `<url>; rel="next"`
        let (target, rel) = link
            .split_once(';')
            .unwrap_or_else(|| panic!("Link {link:?}"));
        assert_eq!(rel.trim(), "rel=\"next\"", "{link}");
        let target = target.trim().trim_start_matches('<').trim_end_matches('>');
        let path = reg.path_of(target);
        let prefix = format!("/v2/{REPO}/tags/list");
        assert!(path.starts_with(&prefix), "{path}");
        query = path[prefix.len()..].to_string();
        assert!(query.contains("n=2"), "the next link keeps n: {query}");
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(all, SORTED);
    assert_eq!(pages, 3);
}

#[test]
fn tags_after_last_exclude_it_and_n_limits_the_count() {
    let reg = Registry::start();
    push_tags(&reg, &SHUFFLED);
    assert_eq!(tag_page(&reg, "?n=2&last=beta-1").0, ["latest", "v10"]);
    assert_eq!(tag_page(&reg, "?last=beta-1").0, ["latest", "v10", "v2"]);
    assert_eq!(tag_page(&reg, "?last=v2").0, Vec::<String>::new());
    // `last` need not be an existing tag: the list starts after it lexically.
    assert_eq!(
        tag_page(&reg, "?last=b").0,
        ["beta-1", "latest", "v10", "v2"]
    );
    assert_eq!(tag_page(&reg, "?n=10").0, SORTED);
}

#[test]
fn tags_with_n_zero_are_an_empty_list_without_a_link() {
    let reg = Registry::start();
    push_tags(&reg, &SHUFFLED);
    let (tags, link) = tag_page(&reg, "?n=0");
    assert!(tags.is_empty(), "{tags:?}");
    assert_eq!(link, None);
}

#[test]
fn a_tag_list_query_with_a_non_numeric_n_is_refused() {
    let reg = Registry::start();
    push_tags(&reg, &SHUFFLED);
    let r = reg
        .req("GET", &format!("/v2/{REPO}/tags/list?n=lots"))
        .send();
    assert_eq!(r.status, 400, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Content discovery: referrers
// ---------------------------------------------------------------------------------------------

struct Referrers {
    subject: String,
    sbom: String,
    signature: String,
    index: String,
    index_untyped: String,
}

/// Pushes an image and four referrers of it: an artifact manifest with `artifactType`, one
/// whose type comes from its config media type, an index with `artifactType` and one without.
fn push_referrers(reg: &Registry) -> Referrers {
    let (subject_manifest, subject) = reg.push_image(REPO, "v1", 1);
    let sub = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_manifest.len()});
    let empty = reg.push_blob(REPO, b"{}");
    let sbom_layer = reg.push_blob(REPO, b"{\"sbom\":true}");
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": EMPTY_JSON, "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/json", "digest": sbom_layer, "size": 13}],
        "subject": sub,
        "annotations": {"org.example.kind": "sbom", "org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
    }))
    .unwrap();
    let sig_config = reg.push_blob(REPO, b"{\"sig\":1}");
    let signature = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.signature.v1", "digest": sig_config, "size": 9},
        "layers": [],
        "subject": sub,
        "annotations": {"org.example.kind": "signature"}
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle.v1",
        "manifests": [],
        "subject": sub,
        "annotations": {"org.example.kind": "bundle"}
    }))
    .unwrap();
    let index_untyped = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [],
        "subject": sub,
        "annotations": {"org.example.kind": "plain-index"}
    }))
    .unwrap();
    let mut out = Vec::new();
    for (body, mt) in [
        (&sbom, OCI_MANIFEST),
        (&signature, OCI_MANIFEST),
        (&index, OCI_INDEX),
        (&index_untyped, OCI_INDEX),
    ] {
        let d = sha256(body);
        let r = reg.put_manifest(REPO, &d, mt, body);
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.header("OCI-Subject"), Some(subject.as_str()), "{r:?}");
        out.push(d);
    }
    Referrers {
        subject,
        sbom: out[0].clone(),
        signature: out[1].clone(),
        index: out[2].clone(),
        index_untyped: out[3].clone(),
    }
}

fn referrers(reg: &Registry, digest: &str, query: &str) -> (Response, Vec<Value>) {
    let r = reg
        .req("GET", &format!("/v2/{REPO}/referrers/{digest}{query}"))
        .send();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Content-Type"), Some(OCI_INDEX));
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let manifests = v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("manifests must be a list, even empty: {v}"))
        .clone();
    (r, manifests)
}

#[test]
fn referrers_list_every_manifest_whose_subject_is_the_digest_with_type_and_annotations() {
    let reg = Registry::start();
    let refs = push_referrers(&reg);
    let (_, manifests) = referrers(&reg, &refs.subject, "");
    assert_eq!(manifests.len(), 4, "{manifests:?}");
    let find = |d: &str| {
        manifests
            .iter()
            .find(|m| m["digest"] == d)
            .unwrap_or_else(|| panic!("{d} missing from {manifests:?}"))
            .clone()
    };
    let sbom = find(&refs.sbom);
    assert_eq!(sbom["mediaType"], OCI_MANIFEST);
    assert_eq!(sbom["artifactType"], "application/vnd.example.sbom.v1");
    assert_eq!(sbom["annotations"]["org.example.kind"], "sbom");
    assert_eq!(
        sbom["annotations"]["org.opencontainers.image.created"],
        "2024-01-01T00:00:00Z"
    );
    assert!(sbom["size"].as_u64().unwrap() > 0);
    let sig = find(&refs.signature);
    assert_eq!(
        sig["artifactType"], "application/vnd.example.signature.v1",
        "without artifactType, the config media type is the type"
    );
    assert_eq!(sig["annotations"]["org.example.kind"], "signature");
    let idx = find(&refs.index);
    assert_eq!(idx["mediaType"], OCI_INDEX);
    assert_eq!(idx["artifactType"], "application/vnd.example.bundle.v1");
    let plain = find(&refs.index_untyped);
    assert!(
        plain.get("artifactType").is_none(),
        "an index without artifactType has none: {plain}"
    );
    assert_eq!(plain["annotations"]["org.example.kind"], "plain-index");
    for m in &manifests {
        let d = m["digest"].as_str().unwrap();
        let get = reg.req("GET", &format!("/v2/{REPO}/manifests/{d}")).send();
        assert_eq!(
            m["size"].as_u64(),
            Some(get.body.len() as u64),
            "size of {d}"
        );
    }
}

#[test]
fn referrers_filtered_by_artifact_type_list_only_those_and_say_so() {
    let reg = Registry::start();
    let refs = push_referrers(&reg);
    let (r, manifests) = referrers(
        &reg,
        &refs.subject,
        "?artifactType=application%2Fvnd.example.sbom.v1",
    );
    assert_eq!(r.header("OCI-Filters-Applied"), Some("artifactType"));
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    assert_eq!(manifests[0]["digest"], refs.sbom.as_str());

    let (r, manifests) = referrers(
        &reg,
        &refs.subject,
        "?artifactType=application/vnd.example.signature.v1",
    );
    assert_eq!(r.header("OCI-Filters-Applied"), Some("artifactType"));
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["digest"], refs.signature.as_str());

    let (r, manifests) = referrers(&reg, &refs.subject, "?artifactType=application/none");
    assert_eq!(r.header("OCI-Filters-Applied"), Some("artifactType"));
    assert!(manifests.is_empty());

    let (r, _) = referrers(&reg, &refs.subject, "");
    assert_eq!(
        r.header("OCI-Filters-Applied"),
        None,
        "no filter asked, none applied"
    );
}

#[test]
fn referrers_of_an_unknown_digest_are_an_empty_index() {
    let reg = Registry::start();
    reg.push_image(REPO, "v1", 1);
    let (_, manifests) = referrers(&reg, &unknown_digest(), "");
    assert!(manifests.is_empty());
}

#[test]
fn referrers_with_a_malformed_digest_are_400() {
    let reg = Registry::start();
    reg.push_image(REPO, "v1", 1);
    let r = reg
        .req("GET", &format!("/v2/{REPO}/referrers/sha256:nothex"))
        .send();
    assert_eq!(r.status, 400, "{r:?}");
}

#[test]
fn a_referrer_pushed_before_its_subject_is_listed_once_the_subject_exists() {
    let reg = Registry::start();
    let config = br#"{"architecture":"amd64","os":"linux","seed":1}"#;
    let cd = reg.push_blob(REPO, config);
    let subject_manifest = image_manifest((OCI_CONFIG, &cd, config.len()), &[]);
    let subject = sha256(&subject_manifest);
    let empty = reg.push_blob(REPO, b"{}");
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": EMPTY_JSON, "digest": empty, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_manifest.len()}
    }))
    .unwrap();
    let rd = reg.push_manifest(REPO, &sha256(&referrer), OCI_MANIFEST, &referrer);
    let (_, before) = referrers(&reg, &subject, "");
    assert_eq!(before.len(), 1, "listed even before the subject exists");
    reg.push_manifest(REPO, "v1", OCI_MANIFEST, &subject_manifest);
    let (_, after) = referrers(&reg, &subject, "");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["digest"], rd.as_str());
}

#[test]
fn a_deleted_referrer_leaves_the_referrers_list() {
    let reg = Registry::start();
    let refs = push_referrers(&reg);
    let del = reg
        .req("DELETE", &format!("/v2/{REPO}/manifests/{}", refs.sbom))
        .send();
    assert_eq!(del.status, 202, "{del:?}");
    let (_, manifests) = referrers(&reg, &refs.subject, "");
    assert_eq!(manifests.len(), 3);
    assert!(manifests.iter().all(|m| m["digest"] != refs.sbom.as_str()));
}

#[test]
fn referrers_are_scoped_to_their_repository() {
    let reg = Registry::start();
    let refs = push_referrers(&reg);
    reg.push_image("other/repo", "v1", 1);
    let r = reg
        .req("GET", &format!("/v2/other/repo/referrers/{}", refs.subject))
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["manifests"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// Content management
// ---------------------------------------------------------------------------------------------

#[test]
fn deleting_a_manifest_by_digest_answers_202_then_404_for_it_and_its_tags() {
    let reg = Registry::start();
    let (manifest, digest) = reg.push_image(REPO, "tagtest0", 1);
    reg.push_manifest(REPO, "tagtest1", OCI_MANIFEST, &manifest);
    let keep = reg.push_image(REPO, "keep", 2).1;
    let del = reg
        .req("DELETE", &format!("/v2/{REPO}/manifests/{digest}"))
        .send();
    assert_eq!(del.status, 202, "{del:?}");
    for reference in [digest.as_str(), "tagtest0", "tagtest1"] {
        let get = reg
            .req("GET", &format!("/v2/{REPO}/manifests/{reference}"))
            .send();
        get.assert_error(404, &["MANIFEST_UNKNOWN"]);
    }
    assert_eq!(tag_page(&reg, "").0, ["keep"]);
    let again = reg
        .req("DELETE", &format!("/v2/{REPO}/manifests/{digest}"))
        .send();
    again.assert_error(404, &["MANIFEST_UNKNOWN"]);
    let other = reg
        .req("GET", &format!("/v2/{REPO}/manifests/{keep}"))
        .send();
    assert_eq!(other.status, 200);
}

#[test]
fn deleting_a_tag_answers_202_and_keeps_the_manifest_and_its_other_tags() {
    let reg = Registry::start();
    let (manifest, digest) = reg.push_image(REPO, "old", 1);
    reg.push_manifest(REPO, "stable", OCI_MANIFEST, &manifest);
    let del = reg
        .req("DELETE", &format!("/v2/{REPO}/manifests/old"))
        .send();
    assert_eq!(del.status, 202, "{del:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/manifests/old")).send();
    get.assert_error(404, &["MANIFEST_UNKNOWN"]);
    assert_eq!(tag_page(&reg, "").0, ["stable"]);
    for reference in ["stable", digest.as_str()] {
        let get = reg
            .req("GET", &format!("/v2/{REPO}/manifests/{reference}"))
            .send();
        assert_eq!(get.status, 200, "{reference}");
    }
    let again = reg
        .req("DELETE", &format!("/v2/{REPO}/manifests/old"))
        .send();
    assert_eq!(again.status, 404, "{again:?}");
}

#[test]
fn deleting_a_blob_answers_202_then_404() {
    let reg = Registry::start();
    let digest = reg.push_blob(REPO, b"to be deleted");
    let del = reg
        .req("DELETE", &format!("/v2/{REPO}/blobs/{digest}"))
        .send();
    assert_eq!(del.status, 202, "{del:?}");
    let get = reg.req("GET", &format!("/v2/{REPO}/blobs/{digest}")).send();
    get.assert_error(404, &["BLOB_UNKNOWN"]);
    let head = reg
        .req("HEAD", &format!("/v2/{REPO}/blobs/{digest}"))
        .send();
    assert_eq!(head.status, 404);
    let again = reg
        .req("DELETE", &format!("/v2/{REPO}/blobs/{digest}"))
        .send();
    again.assert_error(404, &["BLOB_UNKNOWN"]);
}

#[test]
fn deleting_a_blob_in_one_repository_leaves_it_in_another() {
    let reg = Registry::start();
    let data = b"shared layer".to_vec();
    let digest = reg.push_blob("first/repo", &data);
    reg.push_blob("second/repo", &data);
    let del = reg
        .req("DELETE", &format!("/v2/first/repo/blobs/{digest}"))
        .send();
    assert_eq!(del.status, 202);
    let get = reg
        .req("GET", &format!("/v2/second/repo/blobs/{digest}"))
        .send();
    assert_eq!(get.status, 200, "{get:?}");
    assert!(get.body == data);
}

// ---------------------------------------------------------------------------------------------
// Names, tags and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn a_three_segment_name_works_for_push_pull_tags_and_referrers() {
    let reg = Registry::start();
    let name = "vi/ns/disk.image_v2-x";
    let (manifest, digest) = reg.push_image(name, "v1", 3);
    let get = reg.req("GET", &format!("/v2/{name}/manifests/v1")).send();
    assert!(get.body == manifest);
    let tags = reg
        .req("GET", &format!("/v2/{name}/tags/list"))
        .send()
        .json();
    assert_eq!(tags, json!({"name": name, "tags": ["v1"]}));
    let r = reg
        .req("GET", &format!("/v2/{name}/referrers/{digest}"))
        .send();
    assert_eq!(r.status, 200);
}

#[test]
fn names_with_segments_called_blobs_manifests_or_tags_are_routed_from_the_right() {
    let reg = Registry::start();
    for name in [
        "vi/manifests/x",
        "a/blobs/uploads",
        "tags/list/referrers",
        "v2/blobs",
    ] {
        let data = format!("layer of {name}").into_bytes();
        let digest = reg.push_blob(name, &data);
        let get = reg.req("GET", &format!("/v2/{name}/blobs/{digest}")).send();
        assert_eq!(get.status, 200, "{name}: {get:?}");
        assert!(get.body == data);
        let (manifest, _) = reg.push_image(name, "latest", 4);
        let m = reg
            .req("GET", &format!("/v2/{name}/manifests/latest"))
            .send();
        assert!(m.body == manifest, "{name}");
        let tags = reg
            .req("GET", &format!("/v2/{name}/tags/list"))
            .send()
            .json();
        assert_eq!(tags["name"], name);
    }
}

#[test]
fn invalid_repository_names_are_400_name_invalid() {
    let reg = Registry::start();
    let long = format!("a/{}", "b".repeat(255));
    for name in [
        "Upper/case",
        "a..b",
        "-leading",
        "trailing-",
        "a//b",
        "a/.hidden",
        "a/_x",
        long.as_str(),
    ] {
        let post = reg
            .req("POST", &format!("/v2/{name}/blobs/uploads/"))
            .send();
        assert_eq!(post.status, 400, "{name}: {post:?}");
        assert_eq!(post.error_codes()[0], "NAME_INVALID", "{name}");
        let put = reg.put_manifest(name, "v1", OCI_MANIFEST, b"{}");
        put.assert_error(400, &["NAME_INVALID"]);
    }
}

#[test]
fn names_with_dot_dot_or_encoded_slashes_never_reach_outside_the_storage() {
    let reg = Registry::start();
    let digest = reg.push_blob("victim/repo", b"secret");
    for name in [
        "../victim/repo",
        "a/../victim/repo",
        "%2e%2e/victim/repo",
        "a%2F..%2F..%2Fvictim/repo",
    ] {
        let r = reg.req("GET", &format!("/v2/{name}/blobs/{digest}")).send();
        assert!(r.status == 400 || r.status == 404, "{name}: {r:?}");
        let post = reg
            .req("POST", &format!("/v2/{name}/blobs/uploads/"))
            .send();
        assert!(post.status == 400 || post.status == 404, "{name}: {post:?}");
    }
    let entries: Vec<_> = std::fs::read_dir(reg.root.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut entries = entries;
    entries.sort();
    assert_eq!(
        entries,
        ["root", "server.log"],
        "nothing written beside the root"
    );
}

/// RFC 3986 section 2.2: a percent-encoded reserved character is data, not a delimiter, so
/// `victim%2frepo` is not `victim/repo` (and `%` is no name character). Decoding it first
/// would give one repository two spellings, which prefix-based access policies miss.
#[test]
fn a_percent_encoded_slash_in_a_name_is_not_a_path_separator() {
    let reg = Registry::start();
    let digest = reg.push_blob("victim/repo", b"secret");
    for name in ["victim%2frepo", "victim%2Frepo"] {
        let r = reg.req("GET", &format!("/v2/{name}/blobs/{digest}")).send();
        assert!(r.status == 400 || r.status == 404, "{name}: {r:?}");
    }
}

#[test]
fn invalid_tags_are_refused_on_manifest_put() {
    let reg = Registry::start();
    let config = reg.push_blob(REPO, b"{}");
    let manifest = image_manifest((OCI_CONFIG, &config, 2), &[]);
    let long = "t".repeat(129);
    for tag in [".dot", "-dash", long.as_str(), "has%20space", "a+b"] {
        let r = reg.put_manifest(REPO, tag, OCI_MANIFEST, &manifest);
        assert_eq!(r.status, 400, "{tag}: {r:?}");
        let codes = r.error_codes();
        assert!(
            ["MANIFEST_INVALID", "TAG_INVALID", "NAME_INVALID"].contains(&codes[0].as_str()),
            "{tag}: {codes:?}"
        );
    }
    let ok = "T".repeat(128);
    let r = reg.put_manifest(REPO, &ok, OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 201, "a 128-character tag is valid: {r:?}");
    let r = reg.put_manifest(REPO, "_under.score-1", OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 201, "{r:?}");
}

#[test]
fn error_bodies_have_the_oci_json_shape() {
    let reg = Registry::start();
    let d = unknown_digest();
    reg.push_blob(REPO, b"exists");
    for r in [
        reg.req("GET", &format!("/v2/{REPO}/blobs/{d}")).send(),
        reg.req("GET", &format!("/v2/{REPO}/manifests/nope")).send(),
        reg.req("POST", "/v2/BAD/blobs/uploads/").send(),
    ] {
        assert!(
            r.header("Content-Type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{r:?}"
        );
        let v = r.json();
        let errors = v["errors"].as_array().expect("errors array");
        assert_eq!(errors.len(), 1, "{v}");
        let e = errors[0].as_object().unwrap();
        assert!(e["code"].is_string(), "{v}");
        assert!(e["message"].is_string(), "{v}");
        assert!(e.contains_key("detail"), "{v}");
        r.error_codes();
    }
}

#[test]
fn unknown_methods_and_paths_are_refused_without_a_panic() {
    let reg = Registry::start();
    for (method, path) in [
        ("GET", "/v2/x"),
        ("GET", "/v3/"),
        ("PUT", "/v2/x/blobs/sha256:abc"),
        ("POST", "/v2/x/manifests/latest"),
        ("GET", "/v2/x/blobs/notadigest"),
        ("GET", "/v2//blobs/uploads/"),
    ] {
        let r = reg.req(method, path).send();
        assert!((400..500).contains(&r.status), "{method} {path}: {r:?}");
    }
    let ping = reg.req("GET", "/v2/").send();
    assert_eq!(ping.status, 200, "the server is still up");
    assert!(!reg.log().contains("panicked"), "{}", reg.log());
}
