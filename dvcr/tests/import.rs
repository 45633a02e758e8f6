//! `dvcr import` and the `dvcr-importer` job end to end: real images from `qemu-img`, served
//! over HTTP, stored in a real `dvcr serve`, pulled back with `skopeo`, unpacked with GNU
//! tar, written to disk files and compared with `qemu-img compare`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{DVCR, Registry};
use dvcr_tests::{Loop, Scratch, mixed_raw, qemu_img, serve_file};
use serde_json::Value;

const IMPORTER: &str = env!("CARGO_BIN_EXE_dvcr-importer");

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `dvcr import ARGS --json` and returns the exit status and the JSON line.
fn import(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(DVCR)
        .arg("import")
        .args(args)
        .arg("--json")
        .env_remove("DVCR_SCRATCH_DIR")
        .output()
        .expect("running dvcr import");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!("dvcr import printed no JSON line; stdout: {stdout} stderr: {stderr}")
    });
    (out.status.success(), json, stderr)
}

fn import_ok(args: &[&str]) -> Value {
    let (ok, json, stderr) = import(args);
    assert!(ok, "dvcr import {args:?} failed: {json} {stderr}");
    json
}

fn qemu_compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", s(a), s(b)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {a:?} {b:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image with mixed data and zero runs (virtual 64 MiB).
fn qcow2_image(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let raw = mixed_raw(scratch, "source.raw", 64 << 20);
    let qcow2 = scratch.path("image.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    (raw, qcow2)
}

fn docker(registry: &Registry, repo_tag: &str) -> String {
    format!("docker://{}/{repo_tag}", registry.addr)
}

/// Copies an image out of the registry with skopeo into a `dir:` layout and returns its
/// manifest and directory.
fn skopeo_pull(
    registry: &Registry,
    repo_tag: &str,
    scratch: &Scratch,
    name: &str,
) -> (Value, PathBuf) {
    let dir = scratch.path(name);
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            &docker(registry, repo_tag),
            &format!("dir:{}", s(&dir)),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    (manifest, dir)
}

/// Unpacks the single layer of a `dir:` copy with GNU tar, insisting on no warnings, and
/// returns the unpack directory.
fn untar_layer(manifest: &Value, dir: &Path, scratch: &Scratch, name: &str) -> PathBuf {
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let digest = layers[0]["digest"].as_str().unwrap();
    let blob = dir.join(digest.trim_start_matches("sha256:"));
    let out_dir = scratch.path(name);
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut tar = Command::new("tar");
    tar.arg("-x");
    if layers[0]["mediaType"].as_str().unwrap().ends_with("+zstd") {
        tar.arg("--zstd");
    }
    let out = tar
        .args(["-f", s(&blob), "-C", s(&out_dir)])
        .output()
        .unwrap();
    assert!(out.status.success(), "GNU tar failed: {out:?}");
    assert!(
        out.stderr.is_empty(),
        "GNU tar warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<_> = std::fs::read_dir(out_dir.join("disk"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "exactly one file under disk/: {files:?}");
    out_dir
}

fn config_labels(dir: &Path, manifest: &Value) -> Value {
    let digest = manifest["config"]["digest"].as_str().unwrap();
    let config: Value = serde_json::from_slice(
        &std::fs::read(dir.join(digest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    config["config"]["Labels"].clone()
}

#[test]
fn an_http_qcow2_lands_in_dvcr_as_a_one_file_layer_that_skopeo_and_gnu_tar_unpack() {
    let scratch = Scratch::new();
    let (raw, qcow2) = qcow2_image(&scratch);
    let (url, _) = serve_file(&qcow2, true);
    let registry = Registry::start();
    let json = import_ok(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/disk:uid-1"),
        "--dest-insecure",
    ]);
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["virtual-size"], 64 << 20);
    assert_eq!(
        json["scratch-bytes"], 0,
        "a sized uncompressed source needs no scratch"
    );
    let size = std::fs::metadata(&qcow2).unwrap().len();
    assert_eq!(json["stored-size"], size);

    let (manifest, dir) = skopeo_pull(&registry, "vi/ns/disk:uid-1", &scratch, "pulled");
    let labels = config_labels(&dir, &manifest);
    assert_eq!(labels["source-image-format"], "qcow2");
    assert_eq!(labels["source-image-size"], size.to_string());
    assert_eq!(
        labels["source-image-virtual-size"],
        (64u64 << 20).to_string()
    );
    let out = untar_layer(&manifest, &dir, &scratch, "unpacked");
    let disk = out.join("disk/disk.qcow2");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        std::fs::read(&qcow2).unwrap()
    );
    qemu_compare(&disk, &raw);
}

#[test]
fn an_image_in_dvcr_fills_a_disk_file_equal_to_the_source() {
    let scratch = Scratch::new();
    let (raw, qcow2) = qcow2_image(&scratch);
    let registry = Registry::start();
    import_ok(&[
        "--from",
        s(&qcow2),
        "--to",
        &docker(&registry, "vi/ns/disk:uid-2"),
        "--dest-insecure",
    ]);
    // A filesystem volume: the disk is disk.img inside the mount point, grown to --size.
    let pvc = scratch.path("pvc");
    std::fs::create_dir_all(&pvc).unwrap();
    let json = import_ok(&[
        "--from",
        &docker(&registry, "vi/ns/disk:uid-2"),
        "--to",
        s(&pvc),
        "--insecure",
        "--size",
        "80M",
    ]);
    assert_eq!(json["disk-size"], 80 << 20);
    let disk = pvc.join("disk.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 80 << 20);
    // The first 64 MiB are the image; the growth reads zero.
    let out = Command::new("qemu-img")
        .args(["compare", s(&raw), s(&disk)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn dvcr_to_dvcr_in_one_registry_mounts_the_blobs_instead_of_copying() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    let registry = Registry::start();
    import_ok(&[
        "--from",
        s(&qcow2),
        "--to",
        &docker(&registry, "vi/ns/a:1"),
        "--dest-insecure",
    ]);
    let json = import_ok(&[
        "--from",
        &docker(&registry, "vi/ns/a:1"),
        "--to",
        &docker(&registry, "cvi/b:2"),
        "--insecure",
        "--dest-insecure",
    ]);
    assert_eq!(json["mounted"], true, "{json}");
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["bytes-read"], 0);
    let (a, _) = skopeo_pull(&registry, "vi/ns/a:1", &scratch, "a");
    let (b, _) = skopeo_pull(&registry, "cvi/b:2", &scratch, "b");
    assert_eq!(a["layers"], b["layers"]);
}

#[test]
fn a_sparse_raw_disk_is_stored_compressed_and_unpacks_to_the_same_bytes() {
    let scratch = Scratch::new();
    // 256 MiB virtual with 4 MiB of data: the layer must be far smaller than the disk.
    let raw = scratch.path("disk.raw");
    qemu_img(&["create", "-f", "raw", s(&raw), "256M"]);
    dvcr_tests::qemu_io(
        "raw",
        &raw,
        &["write -P 0x5a 1M 2M", "write -P 0x33 200M 2M"],
    );
    let registry = Registry::start();
    let json = import_ok(&[
        "--from",
        s(&raw),
        "--to",
        &docker(&registry, "vd/ns/blank:3"),
        "--dest-insecure",
    ]);
    assert_eq!(json["format"], "raw");
    assert_stored_compressed(&registry, "vd/ns/blank:3", &scratch, &raw);
}

/// Pulls `repo_tag` with skopeo and checks that its layer is zstd-compressed tar, under 8 MiB
/// (the raw disks of these tests hold at most 4 MiB of data), and unpacks with GNU tar to a
/// `disk/disk.img` equal to `source`.
fn assert_stored_compressed(registry: &Registry, repo_tag: &str, scratch: &Scratch, source: &Path) {
    let (manifest, dir) = skopeo_pull(registry, repo_tag, scratch, "pulled");
    let layer = &manifest["layers"][0];
    assert!(
        layer["mediaType"].as_str().unwrap().ends_with("tar+zstd"),
        "{layer}"
    );
    assert!(
        layer["size"].as_u64().unwrap() < 8 << 20,
        "a disk with at most 4 MiB of data stored {} bytes",
        layer["size"]
    );
    let out = untar_layer(&manifest, &dir, scratch, "unpacked");
    qemu_compare(&out.join("disk/disk.img"), source);
}

#[test]
fn an_existing_block_device_goes_into_dvcr_without_its_zeros_and_onto_a_disk_equal_to_it() {
    let scratch = Scratch::new();
    // A 64 MiB device with 3 MiB of data. A block device has no holes: its zeros are read
    // like data, and must not be stored as data.
    let backing = scratch.path("device.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&backing), "64M"]);
    dvcr_tests::qemu_io(
        "raw",
        &backing,
        &["write -P 0x6b 4M 2M", "write -P 0x1f 60M 1M"],
    );
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let registry = Registry::start();
    let json = import_ok(&[
        "--from",
        &dev.device,
        "--to",
        &docker(&registry, "vd/ns/from-device:1"),
        "--dest-insecure",
    ]);
    assert_eq!(json["format"], "raw");
    assert_eq!(json["virtual-size"], 64 << 20);
    assert_stored_compressed(&registry, "vd/ns/from-device:1", &scratch, &backing);
    // The same device straight onto a disk file.
    let copy = scratch.path("copy.img");
    let json = import_ok(&["--from", &dev.device, "--to", s(&copy)]);
    assert_eq!(json["disk-size"], 64 << 20);
    qemu_compare(&copy, &backing);
}

#[test]
fn a_gzipped_image_is_stored_unwrapped_after_measuring_it_in_scratch() {
    let scratch = Scratch::new();
    let (raw, qcow2) = qcow2_image(&scratch);
    let gz = scratch.path("image.qcow2.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", s(&qcow2), s(&gz)))
        .status()
        .unwrap();
    assert!(status.success());
    let (url, _) = serve_file(&gz, true);
    let registry = Registry::start();
    let json = import_ok(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/gz:4"),
        "--dest-insecure",
        "--scratch-dir",
        s(&scratch.path("")),
    ]);
    assert_eq!(json["format"], "qcow2");
    assert!(json["scratch-bytes"].as_u64().unwrap() > 0, "{json}");
    // Scratch space is bounded: a limit below the unpacked size fails clearly, and
    // publishes nothing.
    let (ok, failed, _) = import(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/gz:limited"),
        "--dest-insecure",
        "--scratch-limit",
        "1M",
    ]);
    assert!(!ok);
    assert!(
        failed["error"].as_str().unwrap().contains("scratch space"),
        "{failed}"
    );
    assert_eq!(
        registry
            .req("GET", "/v2/vi/ns/gz/manifests/limited")
            .send()
            .status,
        404
    );
    let (manifest, dir) = skopeo_pull(&registry, "vi/ns/gz:4", &scratch, "pulled");
    let out = untar_layer(&manifest, &dir, &scratch, "unpacked");
    // The stored file is the qcow2 itself, never the .gz wrapper.
    assert_eq!(
        std::fs::read(out.join("disk/disk.qcow2")).unwrap(),
        std::fs::read(&qcow2).unwrap()
    );
    qemu_compare(&out.join("disk/disk.qcow2"), &raw);
}

#[test]
fn a_checksum_mismatch_fails_the_import_and_publishes_no_tag() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    let (url, _) = serve_file(&qcow2, true);
    let registry = Registry::start();
    let (ok, json, _) = import(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/bad:5"),
        "--dest-insecure",
        "--checksum",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ]);
    assert!(!ok);
    assert_eq!(json["kind"], "checksum", "{json}");
    assert_eq!(json["transient"], false);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch")
    );
    let answer = registry.req("GET", "/v2/vi/ns/bad/manifests/5").send();
    assert_eq!(answer.status, 404, "no tag may point at a failed import");

    // The right checksum (and a second algorithm at once) passes.
    let sha = common::sha256_file(&qcow2);
    let md5 =
        String::from_utf8(Command::new("md5sum").arg(&qcow2).output().unwrap().stdout).unwrap();
    let md5 = md5.split_whitespace().next().unwrap().to_owned();
    import_ok(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/bad:5"),
        "--dest-insecure",
        "--checksum",
        &format!("{sha},md5:{md5}"),
    ]);
}

#[test]
fn a_disk_refuses_an_iso_and_a_size_below_the_image() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    let (ok, json, _) = import(&[
        "--from",
        s(&qcow2),
        "--to",
        s(&scratch.path("small.img")),
        "--size",
        "32M",
    ]);
    assert!(!ok);
    assert!(
        json["error"].as_str().unwrap().contains("smaller"),
        "{json}"
    );
    assert!(
        !scratch.path("small.img").exists(),
        "nothing half-written is left"
    );

    let iso_dir = scratch.path("iso-src");
    std::fs::create_dir_all(&iso_dir).unwrap();
    std::fs::write(iso_dir.join("hello.txt"), b"hello").unwrap();
    let iso = scratch.path("cd.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-o", s(&iso), s(&iso_dir)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, json, _) = import(&["--from", s(&iso), "--to", s(&scratch.path("cd.img"))]);
    assert!(!ok);
    assert!(json["error"].as_str().unwrap().contains("ISO"), "{json}");
    assert!(!scratch.path("cd.img").exists());
}

#[test]
fn a_blank_disk_is_sparse_and_reads_zero() {
    let scratch = Scratch::new();
    let disk = scratch.path("blank.img");
    let json = import_ok(&["--from", "blank:1G", "--to", s(&disk)]);
    assert_eq!(json["disk-size"], 1 << 30);
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "a blank disk takes no space");
    let zero = scratch.path("zero.raw");
    qemu_img(&["create", "-f", "raw", s(&zero), "1G"]);
    qemu_compare(&disk, &zero);
}

fn run_importer(envs: &[(&str, &str)], log: &Path) -> (Output, Value) {
    let mut cmd = Command::new(IMPORTER);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("IMPORTER_") || k == "OWNER_UID" || k == "DESTINATION_INSECURE_TLS" {
            cmd.env_remove(k);
        }
    }
    cmd.env("IMPORTER_TERMINATION_LOG", log)
        .env("IMPORTER_METRICS_ADDR", "127.0.0.1:0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running dvcr-importer");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(
        text.lines().count(),
        1,
        "one line of JSON: {text:?} {out:?}"
    );
    (out, serde_json::from_str(text.trim()).unwrap())
}

#[test]
fn the_importer_job_reads_the_contract_environment_and_writes_the_final_report() {
    let scratch = Scratch::new();
    let (raw, qcow2) = qcow2_image(&scratch);
    let (url, _) = serve_file(&qcow2, true);
    let registry = Registry::start();
    let log = scratch.path("termination-log");
    let dest = format!("{}/vi/ns/job:uid-6", registry.addr);
    let (out, report) = run_importer(
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &url),
            ("IMPORTER_DESTINATION_ENDPOINT", &dest),
            ("DESTINATION_INSECURE_TLS", "true"),
            ("OWNER_UID", "owner-1"),
        ],
        &log,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&qcow2).unwrap().len();
    assert_eq!(report["source-image-size"], size);
    assert_eq!(report["source-image-virtual-size"], 64 << 20);
    assert_eq!(report["source-image-format"], "qcow2");
    assert!(report["duration"].as_u64().unwrap() > 0);
    assert!(report["average-speed"].as_u64().unwrap() > 0);
    assert!(report.get("error-message").is_none(), "{report}");

    // DVCR to a filesystem PVC, by environment only.
    let pvc = scratch.path("pvc");
    std::fs::create_dir_all(&pvc).unwrap();
    let (out, report) = run_importer(
        &[
            ("IMPORTER_SOURCE", "dvcr"),
            ("IMPORTER_ENDPOINT", &dest),
            ("IMPORTER_DESTINATION_PATH", s(&pvc)),
            ("DESTINATION_INSECURE_TLS", "true"),
        ],
        &log,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["source-image-format"], "qcow2");
    qemu_compare(&pvc.join("disk.img"), &raw);
}

#[test]
fn a_permanent_failure_exits_zero_with_the_error_and_a_transient_one_exits_non_zero() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    let (url, _) = serve_file(&qcow2, true);
    let log = scratch.path("termination-log");
    let (out, report) = run_importer(
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &url),
            ("IMPORTER_DESTINATION_PATH", s(&scratch.path("disk.img"))),
            ("IMPORTER_CHECKSUMS", "md5:00000000000000000000000000000000"),
        ],
        &log,
    );
    assert!(
        out.status.success(),
        "a bad checksum is reported, not retried"
    );
    assert!(
        report["error-message"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{report}"
    );
    assert!(
        !scratch.path("disk.img").exists(),
        "no disk from wrong bytes"
    );

    // Nothing listens on this port: a network failure the Job should retry.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (out, report) = run_importer(
        &[
            ("IMPORTER_SOURCE", "http"),
            (
                "IMPORTER_ENDPOINT",
                &format!("http://127.0.0.1:{port}/disk.qcow2"),
            ),
            ("IMPORTER_DESTINATION_PATH", s(&scratch.path("disk.img"))),
        ],
        &log,
    );
    assert!(!out.status.success(), "a transient failure exits non-zero");
    assert!(report["error-message"].as_str().is_some());

    // A malformed checksum in the job's environment is the user's input: reported, not retried.
    let (out, report) = run_importer(
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &url),
            ("IMPORTER_DESTINATION_PATH", s(&scratch.path("disk.img"))),
            ("IMPORTER_CHECKSUMS", "sha256:not-hex"),
        ],
        &log,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        report["error-message"]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{report}"
    );
}

#[test]
fn the_importer_serves_the_progress_gauges_with_the_owner_label() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    // A slow source keeps the job running while the gauges are scraped.
    let data = std::fs::read(&qcow2).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow.qcow2", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .unwrap();
        for chunk in data.chunks(data.len() / 20 + 1) {
            if stream.write_all(chunk).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
    });
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = scratch.path("termination-log");
    let mut child = Command::new(IMPORTER)
        .env("IMPORTER_SOURCE", "http")
        .env("IMPORTER_ENDPOINT", &url)
        .env("IMPORTER_DESTINATION_PATH", s(&scratch.path("disk.img")))
        .env("IMPORTER_TERMINATION_LOG", &log)
        .env("IMPORTER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("OWNER_UID", "uid-42")
        .spawn()
        .unwrap();
    let mut scraped = String::new();
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let out = Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{metrics_port}/metrics")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let progress = text
            .lines()
            .find(|l| l.starts_with("registry_progress{ownerUID=\"uid-42\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok());
        if progress.is_some_and(|p| p > 0.0 && p < 100.0) {
            scraped = text;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(
        scraped.contains("registry_average_speed{ownerUID=\"uid-42\"}")
            && scraped.contains("registry_current_speed{ownerUID=\"uid-42\"}"),
        "gauges seen mid-import: {scraped}"
    );
}

#[test]
fn every_format_and_wrapper_goes_into_dvcr_and_back_onto_a_disk_equal_to_the_source() {
    let scratch = Scratch::new();
    let raw = mixed_raw(&scratch, "source.raw", 48 << 20);
    let registry = Registry::start();
    let mut images: Vec<(String, PathBuf, &str)> = Vec::new();
    for (format, options, label) in [
        ("qcow2", "compat=1.1", "qcow2"),
        ("qcow2", "compat=0.10", "qcow2"),
        ("vmdk", "subformat=streamOptimized", "vmdk"),
        ("vmdk", "subformat=monolithicSparse", "vmdk"),
        ("vdi", "static=off", "vdi"),
        ("vpc", "subformat=dynamic", "vhd"),
        ("vhdx", "subformat=dynamic", "vhdx"),
    ] {
        let image = scratch.path(&format!("image-{format}-{}.img", options.replace('=', "-")));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            "-o",
            options,
            s(&raw),
            s(&image),
        ]);
        images.push((format!("{format} {options}"), image, label));
    }
    // Raw goes into DVCR in a zstd layer, and comes back out of it.
    images.push(("raw".into(), raw.clone(), "raw"));
    // Compressed sources: unwrapped (and measured in scratch) before they are stored.
    let qcow2 = images[0].1.clone();
    for wrapper in dvcr_tests::Wrapper::ALL {
        let wrapped = dvcr_tests::write(
            &scratch,
            &format!("image.qcow2.{}", wrapper.name()),
            &wrapper.compress(&qcow2),
        );
        images.push((format!("qcow2 in {}", wrapper.name()), wrapped, "qcow2"));
    }
    for (i, (what, image, label)) in images.iter().enumerate() {
        let (url, _) = serve_file(image, true);
        let repo = format!("vi/ns/fmt{i}:uid");
        let json = import_ok(&[
            "--from",
            &url,
            "--to",
            &docker(&registry, &repo),
            "--dest-insecure",
        ]);
        assert_eq!(json["format"], *label, "{what}: {json}");
        // VHD rounds the size up to its CHS geometry, as qemu does; the rest is exact.
        let virtual_size = json["virtual-size"].as_u64().unwrap();
        if *label == "vhd" {
            assert!(
                (48 << 20..(48 << 20) + (1 << 20)).contains(&virtual_size),
                "{what}"
            );
        } else {
            assert_eq!(virtual_size, 48 << 20, "{what}");
        }
        let disk = scratch.path(&format!("disk{i}.img"));
        import_ok(&[
            "--from",
            &docker(&registry, &repo),
            "--to",
            s(&disk),
            "--insecure",
        ]);
        qemu_compare(&raw, &disk);
        // Straight from HTTP onto a disk too.
        let direct = scratch.path(&format!("direct{i}.img"));
        import_ok(&["--from", &url, "--to", s(&direct)]);
        qemu_compare(&raw, &direct);
        std::fs::remove_file(&disk).unwrap();
        std::fs::remove_file(&direct).unwrap();
    }
}

#[test]
fn a_truncated_image_with_a_sound_header_is_refused_and_nothing_is_published() {
    let scratch = Scratch::new();
    let (_, qcow2) = qcow2_image(&scratch);
    let bytes = std::fs::read(&qcow2).unwrap();
    let cut = dvcr_tests::write(&scratch, "cut.qcow2", &bytes[..bytes.len() / 2]);
    let (url, _) = serve_file(&cut, true);
    let registry = Registry::start();
    let (ok, json, _) = import(&[
        "--from",
        &url,
        "--to",
        &docker(&registry, "vi/ns/cut:1"),
        "--dest-insecure",
    ]);
    assert!(!ok, "a truncated image must not be stored: {json}");
    assert_eq!(json["kind"], "image", "{json}");
    assert_eq!(json["transient"], false);
    assert_eq!(
        registry
            .req("GET", "/v2/vi/ns/cut/manifests/1")
            .send()
            .status,
        404
    );
}
