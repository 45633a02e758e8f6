//! `dvcr-uploader` end to end: the real binary in front of a real `dvcr serve`, fed by the
//! real `curl` (plain, with a progress bar, multipart, cut off and resumed), with
//! `qemu-img` images converted back out of the registry and compared with `qemu-img
//! compare`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{DVCR, OCI_MANIFEST, Registry, upload_offset};
use dvcr_tests::{Scratch, mixed_raw, qemu_img};
use serde_json::Value;

const UPLOADER: &str = env!("CARGO_BIN_EXE_dvcr-uploader");

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A running `dvcr-uploader serve`; killed when dropped.
struct Uploader {
    child: Child,
    addr: String,
    key: PathBuf,
    termination_log: PathBuf,
    spool: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Uploader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Uploader {
    fn start(registry: &Registry, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dvcr-uploader-test-")
            .tempdir()
            .unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "a-test-key-of-more-than-16-bytes\n").unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let termination_log = dir.path().join("termination-log");
        let log = std::fs::File::create(dir.path().join("uploader.log")).unwrap();
        let mut child = Command::new(UPLOADER)
            .args(["serve", "--listen", "127.0.0.1:0", "--key-file", s(&key)])
            .args(if extra.contains(&"--disk") {
                vec![]
            } else {
                vec!["--registry", &registry.addr, "--insecure"]
            })
            .args(["--spool-dir", s(&spool)])
            .args(["--termination-log", s(&termination_log)])
            .args(extra)
            .env("DVCR_LOG", "info")
            .env_remove("UPLOADER_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("dvcr-uploader printed no `listening on` line");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            addr,
            key,
            termination_log,
            spool,
            _dir: dir,
        }
    }

    /// A signed URL for `dest` valid for `ttl`, as `dvcr-uploader url` prints it.
    fn url(&self, dest: &str, ttl: &str) -> String {
        let base = format!("http://{}", self.addr);
        let out = Command::new(UPLOADER)
            .args([
                "url",
                "--key-file",
                s(&self.key),
                "--dest",
                dest,
                "--ttl",
                ttl,
            ])
            .args(["--external-base", &base, "--in-cluster-base", &base])
            .output()
            .unwrap();
        assert!(out.status.success(), "dvcr-uploader url: {out:?}");
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["external"], json["inCluster"]);
        json["external"].as_str().unwrap().to_owned()
    }

    fn status(&self) -> Value {
        let out = curl(&["-sS", &format!("http://{}/status", self.addr)]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until the status satisfies `done`, returning it.
    fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "waiting for {what}: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn report(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.termination_log).unwrap()).unwrap()
    }
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl").args(args).output().unwrap()
}

/// Runs curl with `args`, returning the HTTP status code and the body.
fn curl_code(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `curl -T` of `image` to `url` at `rate` bytes per second (curl's `--limit-rate`), running.
fn slow_upload(image: &Path, url: &str, rate: &str) -> std::process::Child {
    Command::new("curl")
        .args(["-sS", "--limit-rate", rate, "-T", s(image), url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A qcow2 image with data and zero runs (virtual 64 MiB, about 12 MiB of clusters).
fn qcow2_image(scratch: &Scratch) -> PathBuf {
    let raw = mixed_raw(scratch, "source.raw", 64 << 20);
    let qcow2 = scratch.path("image.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    qcow2
}

fn has_tag(registry: &Registry, repo: &str, tag: &str) -> bool {
    let r = registry
        .req("GET", &format!("/v2/{repo}/manifests/{tag}"))
        .header("Accept", OCI_MANIFEST)
        .send();
    r.status == 200
}

/// Converts the DVCR artifact back to a raw file with `dvcr import` and compares it with
/// `original` using `qemu-img compare`.
fn assert_artifact_equals(registry: &Registry, repo_tag: &str, original: &Path, scratch: &Scratch) {
    let out_file = scratch.path(&format!("{}.raw", repo_tag.replace(['/', ':'], "-")));
    let out = Command::new(DVCR)
        .args(["import", "--from"])
        .arg(format!("docker://{}/{repo_tag}", registry.addr))
        .args(["--to", s(&out_file), "--insecure", "--json"])
        .env_remove("DVCR_SCRATCH_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "dvcr import back: {out:?}");
    let cmp = Command::new("qemu-img")
        .args(["compare", s(original), s(&out_file)])
        .output()
        .unwrap();
    assert!(cmp.status.success(), "qemu-img compare: {cmp:?}");
}

#[test]
fn a_curl_upload_of_a_qcow2_is_stored_and_converts_back_equal_and_later_uploads_conflict() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    assert_eq!(up.status()["phase"], "WaitForUserUpload");
    let (code, _) = curl_code(&[&format!("http://{}/upload", up.addr)]);
    assert_eq!(code, 200, "GET /upload is the readiness probe");
    let url = up.url("vi/ns/disk:uid-1", "1h");

    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["phase"], "Ready");
    assert_eq!(answer["format"], "qcow2");
    assert_eq!(answer["unpacked"], 64 << 20);
    assert_eq!(answer["cdrom"], false);
    let status: Value =
        serde_json::from_slice(&curl(&["-sS", &format!("{url}/status")]).stdout).unwrap();
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["progress"], 100.0);

    let report = up.report();
    assert_eq!(report["source-image-format"], "qcow2");
    assert_eq!(report["source-image-virtual-size"], 64 << 20);
    assert!(report.get("error-message").is_none(), "{report}");
    assert!(has_tag(&registry, "vi/ns/disk", "uid-1"));
    assert_artifact_equals(&registry, "vi/ns/disk:uid-1", &image, &scratch);

    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 409, "an upload after the image is stored: {body}");
    let size = std::fs::metadata(&image).unwrap().len();
    assert_eq!(upload_offset(&url), size);
}

#[test]
fn a_progress_bar_upload_piped_through_cat_is_stored() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/bar:uid-2", "1h");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl --progress-bar -T '{}' '{url}' | cat",
            s(&image)
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"phase\":\"Ready\""), "{stdout}");
    assert!(has_tag(&registry, "vi/ns/bar", "uid-2"));
    assert_artifact_equals(&registry, "vi/ns/bar:uid-2", &image, &scratch);
}

#[test]
fn a_multipart_form_upload_stores_the_file_part() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/form:uid-3", "1h");
    let (code, body) = curl_code(&[
        "-F",
        "note=not the image",
        "-F",
        &format!("file=@{}", s(&image)),
        &url,
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"format\":\"qcow2\""), "{body}");
    assert_artifact_equals(&registry, "vi/ns/form:uid-3", &image, &scratch);
}

#[test]
fn an_upload_streams_through_the_pipeline_without_a_copy_on_disk() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/direct:uid-9", "1h");
    let mut slow = slow_upload(&image, &url, "2M");
    up.wait_status("several MiB to arrive", |s| {
        s["phase"] == "Provisioning" && s["received"].as_u64().unwrap_or(0) > 4 << 20
    });
    let files: Vec<_> = std::fs::read_dir(&up.spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.is_empty(),
        "received bytes went to the spool directory: {files:?}"
    );
    assert!(slow.wait().unwrap().success());
    assert!(has_tag(&registry, "vi/ns/direct", "uid-9"));
}

#[test]
fn an_upload_cut_in_the_middle_resumes_from_the_head_offset_and_a_second_upload_meanwhile_is_refused()
 {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let size = std::fs::metadata(&image).unwrap().len();
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/resumed:uid-4", "1h");

    let mut slow = slow_upload(&image, &url, "1M");
    up.wait_status("bytes to arrive", |s| {
        s["phase"] == "Provisioning" && s["received"].as_u64().unwrap_or(0) > 0
    });
    // While bytes flow, another upload is refused.
    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 503, "{body}");
    slow.kill().unwrap();
    slow.wait().unwrap();

    // The client asks how much arrived and sends the rest; until the server has noticed
    // the broken connection it answers 503 (still busy) or 416 (a newer offset).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (offset, body) = loop {
        let offset = upload_offset(&url);
        assert!(offset > 0 && offset < size, "offset {offset} of {size}");
        let (code, body) = curl_code(&["-C", &offset.to_string(), "-T", s(&image), &url]);
        if code == 200 {
            break (offset, body);
        }
        assert!(code == 503 || code == 416, "{code}: {body}");
        assert!(Instant::now() < deadline, "could not resume: {code} {body}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["phase"], "Ready", "resumed at {offset}: {answer}");
    assert_eq!(answer["received"], size);
    let report = up.report();
    assert_eq!(
        report["bytes-read"], size,
        "every byte reached the pipeline exactly once"
    );
    assert_artifact_equals(&registry, "vi/ns/resumed:uid-4", &image, &scratch);
}

#[test]
fn a_resume_from_the_wrong_offset_is_answered_416_with_the_offset() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let size = std::fs::metadata(&image).unwrap().len();
    let half = size / 2;
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/pieces:uid-5", "1h");
    let first = scratch.path("first-half");
    let all = std::fs::read(&image).unwrap();
    std::fs::write(&first, &all[..half as usize]).unwrap();
    let (code, body) = curl_code(&[
        "-T",
        s(&first),
        "-H",
        &format!("Content-Range: bytes 0-{}/{size}", half - 1),
        &url,
    ]);
    assert_eq!(code, 204, "a first piece is acknowledged: {body}");
    assert_eq!(upload_offset(&url), half);
    let (code, body) = curl_code(&["-C", "1000", "-T", s(&image), &url]);
    assert_eq!(code, 416, "{body}");
    assert!(
        body.contains(&format!("{half} bytes have arrived")),
        "{body}"
    );
    // The rest as a chunked stream with an open-ended range, as the crate docs show.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tail -c +{} '{}' | curl -sS -T - -H 'Content-Range: bytes {half}-*/*' '{url}'",
            half + 1,
            s(&image)
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"phase\":\"Ready\""), "{out:?}");
    assert_artifact_equals(&registry, "vi/ns/pieces:uid-5", &image, &scratch);
}

/// Sends only the request head of a large PUT and returns the status line the server
/// answers without having seen a byte of the body.
fn status_line_without_body(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000000000\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).expect("an answer before the body");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_wrong_or_missing_token_is_refused_before_the_body_is_read() {
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/secret:uid-6", "1h");
    let path = url.split_once(&up.addr).unwrap().1.to_owned();
    // The signature of another destination's token does not fit this destination.
    let other = up.url("vi/ns/other:uid-6", "1h");
    let other_sig = other.rsplit_once('.').unwrap().1;
    let forged = format!("{}.{other_sig}", path.rsplit_once('.').unwrap().0);
    let line = status_line_without_body(&up.addr, &forged);
    assert!(line.contains(" 403 "), "{line}");
    let line = status_line_without_body(&up.addr, "/upload/not-a-token");
    assert!(line.contains(" 401 "), "{line}");
    let line = status_line_without_body(&up.addr, "/upload");
    assert!(line.contains(" 401 "), "{line}");
    let (code, body) = curl_code(&[
        "-T",
        "/etc/hostname",
        &format!("http://{}{forged}", up.addr),
    ]);
    assert_eq!(code, 403);
    assert!(body.contains("signature does not match"), "{body}");
    assert_eq!(up.status()["phase"], "WaitForUserUpload");
    assert_eq!(up.status()["received"], 0);
}

#[test]
fn an_expired_upload_url_is_refused_with_its_expiry() {
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/late:uid-7", "0s");
    let (code, body) = curl_code(&["-T", "/etc/hostname", &url]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("the upload URL expired at 20"), "{body}");
    assert_eq!(up.status()["phase"], "WaitForUserUpload");
}

#[test]
fn a_wrong_checksum_fails_the_upload_and_publishes_nothing() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let up = Uploader::start(&registry, &["--checksum", &wrong]);
    let url = up.url("vi/ns/bad:uid-8", "1h");
    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("checksum mismatch"), "{body}");
    let status = up.status();
    assert_eq!(status["phase"], "Failed");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{status}"
    );
    assert!(!has_tag(&registry, "vi/ns/bad", "uid-8"));
    let report = up.report();
    assert!(
        report["error-message"]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{report}"
    );
}

#[test]
fn an_upload_larger_than_max_size_is_refused_with_413() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &["--max-size", "1M"]);
    let url = up.url("vi/ns/big:uid-9", "1h");
    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("--max-size"), "{body}");
    // Chunked, so the size is only found out while streaming.
    let (code, body) = curl_code(&["-H", "Transfer-Encoding: chunked", "-T", s(&image), &url]);
    assert_eq!(code, 413, "{body}");
    assert_eq!(up.status()["phase"], "Failed");
    assert!(!has_tag(&registry, "vi/ns/big", "uid-9"));
}

#[test]
fn no_upload_within_the_wait_timeout_fails_and_exits_zero_after_the_report() {
    let registry = Registry::start();
    let mut up = Uploader::start(&registry, &["--wait-timeout", "2s"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the uploader did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    let report = up.report();
    assert!(
        report["error-message"]
            .as_str()
            .unwrap()
            .contains("no upload started within 2s"),
        "{report}"
    );
}

#[test]
fn an_unsafe_or_truncated_image_is_refused_with_422_and_nothing_is_published() {
    let scratch = Scratch::new();
    let base = scratch.path("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "64M"]);
    let overlay = scratch.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    let registry = Registry::start();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/overlay:uid-10", "1h");
    let (code, body) = curl_code(&["-T", s(&overlay), &url]);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("backing file"), "{body}");
    assert_eq!(up.status()["phase"], "Failed");
    assert!(!has_tag(&registry, "vi/ns/overlay", "uid-10"));

    let image = qcow2_image(&scratch);
    let all = std::fs::read(&image).unwrap();
    let truncated = scratch.path("truncated.qcow2");
    std::fs::write(&truncated, &all[..all.len() / 3]).unwrap();
    let up = Uploader::start(&registry, &[]);
    let url = up.url("vi/ns/truncated:uid-11", "1h");
    let (code, body) = curl_code(&["-T", s(&truncated), &url]);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("truncated"), "{body}");
    let status = up.status();
    assert_eq!(status["phase"], "Failed", "{status}");
    assert!(!has_tag(&registry, "vi/ns/truncated", "uid-11"));
    assert!(up.report()["error-message"].is_string());
}

#[test]
fn an_upload_not_resumed_within_the_wait_timeout_fails_and_publishes_nothing() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let size = std::fs::metadata(&image).unwrap().len();
    let half = size / 2;
    let first = scratch.path("first-half");
    std::fs::write(&first, &std::fs::read(&image).unwrap()[..half as usize]).unwrap();
    let registry = Registry::start();
    let up = Uploader::start(&registry, &["--wait-timeout", "3s"]);
    let url = up.url("vi/ns/abandoned:uid-12", "1h");
    let (code, body) = curl_code(&[
        "-T",
        s(&first),
        "-H",
        &format!("Content-Range: bytes 0-{}/{size}", half - 1),
        &url,
    ]);
    assert_eq!(code, 204, "{body}");
    let status = up.wait_status("the abandoned upload to fail", |s| s["phase"] == "Failed");
    assert!(
        status["error"].as_str().unwrap().contains("not resumed"),
        "{status}"
    );
    let (code, body) = curl_code(&["-C", &half.to_string(), "-T", s(&image), &url]);
    assert_eq!(code, 409, "{body}");
    assert!(!has_tag(&registry, "vi/ns/abandoned", "uid-12"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !up.termination_log.exists() {
        assert!(Instant::now() < deadline, "no final report");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        up.report()["error-message"]
            .as_str()
            .unwrap()
            .contains("not resumed")
    );
}

#[test]
fn an_upload_to_a_disk_target_is_written_as_a_raw_disk() {
    let scratch = Scratch::new();
    let image = qcow2_image(&scratch);
    let disk = scratch.path("pvc-disk.img");
    let registry = Registry::start();
    let up = Uploader::start(&registry, &["--disk", s(&disk)]);
    let url = up.url("vi/ns/pvc:uid-13", "1h");
    let (code, body) = curl_code(&["-T", s(&image), &url]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"format\":\"qcow2\""), "{body}");
    let cmp = Command::new("qemu-img")
        .args(["compare", s(&image), s(&disk)])
        .output()
        .unwrap();
    assert!(cmp.status.success(), "qemu-img compare: {cmp:?}");
    assert!(!has_tag(&registry, "vi/ns/pvc", "uid-13"));
}
