//! `dvcr serve --upload-key-file`: `curl -T` uploads straight into the registry, with URLs
//! minted by `dvcr upload-url`, end to end with the real curl and `qemu-img compare`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{DVCR, Registry, upload_offset};
use dvcr_tests::{Scratch, mixed_raw, qemu_img, run};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn upload_url(registry: &Registry, dest: &str) -> Value {
    let out = run(Command::new(DVCR).args([
        "upload-url",
        "--server",
        &registry.url(""),
        "--dest",
        dest,
        "--ttl",
        "10m",
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The external URL of a fresh upload URL pair for `dest`.
fn external_url(registry: &Registry, dest: &str) -> String {
    upload_url(registry, dest)["external"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_served_upload_url_takes_curl_t_once_and_the_image_converts_back_equal() {
    let scratch = Scratch::new();
    // The embedded default serves uploads, with a key it makes under its root.
    let registry = Registry::start();
    assert!(registry.root.join("upload.key").is_file());
    let raw = mixed_raw(&scratch, "source.raw", 32 << 20);
    let qcow2 = scratch.path("image.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);

    let urls = upload_url(&registry, "vi/ns/upload:uid-1");
    let url = urls["external"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&registry.url("/upload/")), "{urls}");
    assert_eq!(urls["inCluster"], urls["external"]);

    // Readiness, then a wrong and a tampered token are refused.
    assert_eq!(curl(&[&registry.url("/upload")]).0, 200);
    assert_eq!(
        curl(&["-T", s(&qcow2), &registry.url("/upload/garbage")]).0,
        401
    );
    // A changed first character of the signature (the last character may carry unused
    // base64 bits, and changing it can make the token malformed rather than wrong).
    let at = url.rfind('.').unwrap() + 1;
    let first = &url[at..=at];
    let tampered = format!(
        "{}{}{}",
        &url[..at],
        if first == "A" { "B" } else { "A" },
        &url[at + 1..]
    );
    assert_eq!(curl(&["-T", s(&qcow2), &tampered]).0, 403);

    let (code, body) = curl(&["-T", s(&qcow2), &url]);
    assert_eq!(code, 200, "{body}");
    let (code, status) = curl(&[&format!("{url}/status")]);
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["phase"], "Ready", "{status}");
    assert_eq!(status["format"], "qcow2");

    // The image is in the registry: back onto a disk, equal to the source.
    assert_stored_equal(&registry, "vi/ns/upload:uid-1", &raw, &scratch);

    // The image is stored: the URL takes no second upload.
    assert_eq!(curl(&["-T", s(&qcow2), &url]).0, 409);
}

#[test]
fn an_explicit_upload_key_is_refused_next_to_authentication() {
    let scratch = Scratch::new();
    let key = scratch.path("upload.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let htpasswd = scratch.path("htpasswd");
    std::fs::write(&htpasswd, "").unwrap();
    let out = Command::new(DVCR)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--root",
            s(&scratch.path("root")),
            "--htpasswd",
            s(&htpasswd),
            "--upload-key-file",
            s(&key),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--upload-key-file cannot be combined"),
        "{err}"
    );
}

fn status(url: &str) -> Value {
    serde_json::from_str(&curl(&[&format!("{url}/status")]).1).unwrap()
}

fn has_tag(registry: &Registry, repo: &str, tag: &str) -> bool {
    let (code, _) = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &registry.url(&format!("/v2/{repo}/manifests/{tag}")),
    ]);
    code == 200
}

/// Imports `repo_tag` back to a raw file and compares it with `original` (qemu-img compare).
fn assert_stored_equal(registry: &Registry, repo_tag: &str, original: &Path, scratch: &Scratch) {
    let disk = scratch.path(&format!("{}.raw", repo_tag.replace(['/', ':'], "-")));
    run(Command::new(DVCR)
        .args(["import", "--from"])
        .arg(format!("docker://{}/{repo_tag}", registry.addr))
        .args(["--to", s(&disk), "--insecure"]));
    run(Command::new("qemu-img").args(["compare", s(original), s(&disk)]));
}

#[test]
fn served_uploads_resume_after_a_cut_refuse_a_truncated_image_and_unpack_a_gzip_one() {
    let scratch = Scratch::new();
    let registry = Registry::start();
    let raw = mixed_raw(&scratch, "source.raw", 48 << 20);
    let qcow2 = scratch.path("image.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    let size = std::fs::metadata(&qcow2).unwrap().len();

    // Cut in the middle (a slow curl killed), then resumed from the offset the server gives.
    let url = external_url(&registry, "vi/ns/resumed:uid-2");
    let mut slow = Command::new("curl")
        .args(["-sS", "--limit-rate", "2M", "-T", s(&qcow2), &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status(&url)["received"].as_u64().unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "no bytes arrived");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    slow.kill().unwrap();
    slow.wait().unwrap();
    let answer = loop {
        let offset = upload_offset(&url);
        assert!(offset > 0 && offset < size, "offset {offset} of {size}");
        let (code, body) = curl(&["-C", &offset.to_string(), "-T", s(&qcow2), &url]);
        if code == 200 {
            break body;
        }
        // Until the server notices the broken connection: busy, or a newer offset.
        assert!(code == 503 || code == 416, "{code}: {body}");
        assert!(
            std::time::Instant::now() < deadline,
            "could not resume: {code}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["phase"], "Ready", "{answer}");
    assert_eq!(answer["received"], size);
    assert_stored_equal(&registry, "vi/ns/resumed:uid-2", &qcow2, &scratch);

    // A truncated qcow2: refused, nothing tagged.
    let all = std::fs::read(&qcow2).unwrap();
    let truncated = scratch.path("truncated.qcow2");
    std::fs::write(&truncated, &all[..all.len() / 3]).unwrap();
    let url = external_url(&registry, "vi/ns/truncated:uid-3");
    let (code, body) = curl(&["-T", s(&truncated), &url]);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("truncated"), "{body}");
    assert_eq!(status(&url)["phase"], "Failed");
    assert!(!has_tag(&registry, "vi/ns/truncated", "uid-3"));

    // A gzip-compressed upload is measured on scratch and stored as the qcow2 inside.
    let gz = scratch.path("image.qcow2.gz");
    run(Command::new("gzip").args(["-1", "-k", s(&qcow2)]));
    let url = external_url(&registry, "vi/ns/packed:uid-4");
    let (code, body) = curl(&["-T", s(&gz), &url]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(status(&url)["format"], "qcow2");
    assert_stored_equal(&registry, "vi/ns/packed:uid-4", &qcow2, &scratch);
}
