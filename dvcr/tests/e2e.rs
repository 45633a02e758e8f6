//! End to end, one test per user path, driving only the real binaries (`dvcr serve`,
//! `dvcr upload-url`, `dvcr-importer`) and the real tools around them (`curl`, `nginx`,
//! `skopeo`, `qemu-img`, `qemu-io`, GNU `tar`):
//!
//! - a presigned `curl -T` upload into DVCR, followed until `Ready`, then written to a PVC by
//!   an importer job;
//! - an importer job configured only by environment variables from HTTP (nginx) into DVCR,
//!   and a second one from DVCR onto a PVC;
//! - an image with its disk under `/disk/`, pushed by skopeo from a `docker save` style
//!   tarball and written to a PVC by an importer job.
//!
//! A PVC is a directory standing for the volume's mount point: the job writes `disk.img`
//! inside it. Every PVC is compared with its source by `qemu-img compare`.
//!
//! Each path is a function taking the DVCR it runs against, and DVCR is started by one
//! function, [`start_dvcr`], so the same paths can run against other storage backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{DOCKER_MANIFEST, DVCR, OCI_MANIFEST, Registry, sha256, sha256_file};
use dvcr_tests::{Scratch, qemu_img, qemu_io, run};
use serde_json::{Value, json};

const IMPORTER: &str = env!("CARGO_BIN_EXE_dvcr-importer");

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------
// DVCR under test.

/// A running DVCR: the real `dvcr serve`, stopped when dropped.
#[derive(Debug)]
struct Dvcr {
    registry: Registry,
}

impl Dvcr {
    /// `127.0.0.1:PORT`.
    fn addr(&self) -> &str {
        &self.registry.addr
    }

    /// `http://ADDR` + `path`.
    fn url(&self, path: &str) -> String {
        self.registry.url(path)
    }

    /// `ADDR/repo:tag`, an image reference as the importer's environment takes it.
    fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr())
    }

    /// The server's log so far (shown when an assertion fails).
    fn log(&self) -> String {
        self.registry.log()
    }

    /// Whether `repo:tag` resolves to a manifest.
    fn has_tag(&self, repo_tag: &str) -> bool {
        let (repo, tag) = repo_tag.rsplit_once(':').unwrap();
        let r = self
            .registry
            .req("GET", &format!("/v2/{repo}/manifests/{tag}"))
            .header("Accept", &format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}"))
            .send();
        r.status == 200
    }
}

/// Starts DVCR with its defaults (filesystem storage under a fresh root, the upload
/// endpoints on) plus `extra_args` for `dvcr serve`, and waits until it listens.
fn start_dvcr(extra_args: &[&str]) -> Dvcr {
    Dvcr {
        registry: Registry::start_with(extra_args),
    }
}

// ---------------------------------------------------------------------------------------
// Images, PVCs, jobs.

/// A qcow2 image of `virtual_size` bytes made by `qemu-img create`, with data written by
/// `qemu-io` (`write ...` commands).
fn qcow2_with_writes(scratch: &Scratch, name: &str, virtual_size: u64, writes: &[&str]) -> PathBuf {
    let image = scratch.path(name);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        s(&image),
        &virtual_size.to_string(),
    ]);
    qemu_io("qcow2", &image, writes);
    image
}

/// A new empty directory in `scratch` (a filesystem PVC's mount point, a web root, a
/// job's working directory).
fn empty_dir(scratch: &Scratch, name: &str) -> PathBuf {
    let dir = scratch.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `qemu-img compare` of the raw disk a job wrote with its source image; when the disk is
/// larger, the rest must read as zeros.
fn assert_same_disk(disk: &Path, source: &Path, source_format: &str) {
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            source_format,
            s(disk),
            s(source),
        ])
        .output()
        .expect("running qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        disk.display(),
        source.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What an importer job left behind.
#[derive(Debug)]
struct JobResult {
    status: ExitStatus,
    /// The termination-log file, parsed (it must hold exactly one line of JSON).
    report: Value,
    stderr: String,
}

/// Runs `dvcr-importer` as a Kubernetes Job runs it: no arguments, nothing inherited, only
/// the environment variables in `env` plus the termination-log path (inside `scratch`) and
/// a loopback metrics address (so jobs running at once do not fight over port 8443).
fn run_job(scratch: &Scratch, name: &str, env: &[(&str, &str)]) -> JobResult {
    let termination_log = scratch.path(&format!("{name}.termination-log"));
    let workdir = empty_dir(scratch, &format!("{name}.workdir"));
    let mut cmd = Command::new(IMPORTER);
    cmd.env_clear()
        .current_dir(&workdir)
        .env("IMPORTER_TERMINATION_LOG", &termination_log)
        .env("IMPORTER_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running dvcr-importer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = std::fs::read_to_string(&termination_log).unwrap_or_else(|e| {
        panic!(
            "job {name} wrote no termination log ({e}); exit {}, stderr:\n{stderr}",
            out.status
        )
    });
    assert_eq!(
        text.lines().count(),
        1,
        "job {name}: the termination log must be one line of JSON: {text:?}"
    );
    assert!(text.ends_with('\n'), "job {name}: {text:?}");
    let report = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("job {name}: the termination log is not JSON ({e}): {text:?}"));
    JobResult {
        status: out.status,
        report,
        stderr,
    }
}

impl JobResult {
    /// Asserts the job succeeded: exit code 0 and a report without an error.
    fn assert_succeeded(&self, name: &str) {
        assert_eq!(
            self.status.code(),
            Some(0),
            "job {name} exit status; stderr:\n{}",
            self.stderr
        );
        assert!(
            self.report.get("error-message").is_none(),
            "job {name} reported an error: {}\n{}",
            self.report,
            self.stderr
        );
    }

    /// Asserts the contract's keys of the final report and their values, and where the
    /// job says the image went.
    fn assert_report(
        &self,
        name: &str,
        stored: u64,
        virtual_size: u64,
        format: &str,
        destination: &str,
    ) {
        let r = &self.report;
        for key in [
            "source-image-size",
            "source-image-virtual-size",
            "duration",
            "average-speed",
            "bytes-read",
        ] {
            assert!(
                r[key].is_u64(),
                "job {name}: `{key}` must be an unsigned number: {r}"
            );
        }
        assert_eq!(r["source-image-size"], stored, "job {name}: {r}");
        assert_eq!(
            r["source-image-virtual-size"], virtual_size,
            "job {name}: {r}"
        );
        assert_eq!(r["source-image-format"], format, "job {name}: {r}");
        assert_eq!(r["cdrom"], false, "job {name}: {r}");
        assert!(
            r["duration"].as_u64().unwrap() > 0,
            "job {name}: the duration is nanoseconds and an import takes some: {r}"
        );
        assert_eq!(
            r["bytes-read"], stored,
            "job {name}: the image is read once: {r}"
        );
        assert_eq!(r["destination"], destination, "job {name}: {r}");
    }
}

// ---------------------------------------------------------------------------------------
// curl.

/// Runs curl `args` (with `-sS`), returning the HTTP status code and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `GET URL/status` of an upload URL, parsed.
fn upload_status(url: &str) -> Value {
    let (code, body) = curl(&[&format!("{url}/status")]);
    assert_eq!(code, 200, "GET {url}/status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("status is not JSON ({e}): {body}"))
}

// ---------------------------------------------------------------------------------------
// nginx.

/// nginx in the foreground (one process, no master), serving `root` on a free loopback
/// port, with its pid, logs and temp files in its own directory; killed when dropped.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl std::fmt::Debug for Nginx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nginx on 127.0.0.1:{}", self.port)
    }
}

impl Nginx {
    fn serve(dir: &Path, root: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut last_error = String::new();
        // The free port may be taken by someone else before nginx binds it: retry.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let d = dir.display();
            let conf = format!(
                "daemon off;\n\
                 master_process off;\n\
                 worker_processes 1;\n\
                 pid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\n\
                 events {{ worker_connections 32; }}\n\
                 http {{\n\
                 \x20 access_log {d}/access.log;\n\
                 \x20 client_body_temp_path {d}/tmp-body;\n\
                 \x20 proxy_temp_path {d}/tmp-proxy;\n\
                 \x20 fastcgi_temp_path {d}/tmp-fastcgi;\n\
                 \x20 uwsgi_temp_path {d}/tmp-uwsgi;\n\
                 \x20 scgi_temp_path {d}/tmp-scgi;\n\
                 \x20 types {{ }}\n\
                 \x20 default_type application/octet-stream;\n\
                 \x20 server {{\n\
                 \x20   listen 127.0.0.1:{port};\n\
                 \x20   root {root};\n\
                 \x20 }}\n\
                 }}\n",
                root = root.display()
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot run nginx (apt-get install nginx, or .ci/install-tools)");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child,
                        port,
                        dir: dir.to_owned(),
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_error = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        }
        panic!("nginx did not start; its error log:\n{last_error}");
    }

    fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }

    /// The access log so far.
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A `docker save` style tarball.

/// Writes `bytes` as `blobs/sha256/<hex>` under `dir` and returns the digest and the
/// path relative to `dir`.
fn put_blob(dir: &Path, bytes: &[u8]) -> (String, String) {
    let digest = sha256(bytes);
    let rel = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let path = dir.join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    (digest, rel)
}

/// A tarball laid out as `docker save` of Docker 25 and later writes it for an image built
/// `FROM scratch` with `ADD disk.qcow2 /disk/`: the uncompressed layer, the image config and
/// an OCI manifest under `blobs/sha256/`, `index.json` and `oci-layout`, and the legacy
/// `manifest.json` and `repositories` that `docker load` and skopeo's `docker-archive:`
/// read. The layer tar is written by GNU tar in the ustar format Docker uses, with the
/// directory `disk/` and the file `disk/<file_name>`.
fn docker_save_tarball(scratch: &Scratch, disk: &Path, file_name: &str, repo_tag: &str) -> PathBuf {
    let rootfs = scratch.path("docker-rootfs");
    std::fs::create_dir_all(rootfs.join("disk")).unwrap();
    std::fs::copy(disk, rootfs.join("disk").join(file_name)).unwrap();
    let layer_tar = scratch.path("docker-layer.tar");
    run(Command::new("tar")
        .args([
            "--format=ustar",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .args([
            "--mtime=2024-05-01 12:00:00Z",
            "--sort=name",
            "--mode=u+rw,go+r",
        ])
        .args(["-C", s(&rootfs), "-cf", s(&layer_tar), "disk"]));

    let save = scratch.path("docker-save");
    std::fs::create_dir_all(&save).unwrap();
    let layer = std::fs::read(&layer_tar).unwrap();
    let (layer_digest, layer_path) = put_blob(&save, &layer);
    assert_eq!(layer_digest, sha256_file(&layer_tar));
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-05-01T12:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "2024-05-01T12:00:00Z", "created_by": "ADD disk.qcow2 /disk/ # buildkit"}],
    }))
    .unwrap();
    let (config_digest, config_path) = put_blob(&save, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let (manifest_digest, _) = put_blob(&save, &manifest);
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": format!("docker.io/{repo_tag}"),
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(save.join("index.json"), index.to_string()).unwrap();
    std::fs::write(save.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let legacy = json!([{
        "Config": config_path,
        "RepoTags": [repo_tag],
        "Layers": [layer_path],
    }]);
    std::fs::write(save.join("manifest.json"), legacy.to_string()).unwrap();
    let top_layer = layer_digest.trim_start_matches("sha256:");
    std::fs::write(
        save.join("repositories"),
        json!({ repo: { tag: top_layer } }).to_string(),
    )
    .unwrap();

    let tarball = scratch.path("docker-save.tar");
    run(Command::new("tar")
        .args([
            "--format=ustar",
            "--sort=name",
            "-C",
            s(&save),
            "-cf",
            s(&tarball),
        ])
        .args([
            "blobs",
            "index.json",
            "manifest.json",
            "oci-layout",
            "repositories",
        ]));
    tarball
}

// ---------------------------------------------------------------------------------------
// The user paths, each against a given DVCR.

/// Upload: `dvcr upload-url` mints a presigned URL, `curl -T` sends the qcow2 to it, the
/// status goes to Ready, and an importer job (environment only) writes the image from DVCR
/// onto a PVC equal to the file sent.
fn presigned_curl_upload_to_a_pvc(dvcr: &Dvcr) {
    let scratch = Scratch::new();
    let image = qcow2_with_writes(
        &scratch,
        "image.qcow2",
        64 * MIB,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x3c 5M 1536k",
            "write -z 6M 64k",
            "write -P 0x81 33554432 4096",
            "write -P 0xe7 63M 1M",
        ],
    );
    let image_size = std::fs::metadata(&image).unwrap().len();
    let repo_tag = "vi/e2e/uploaded:uid-0001";

    // The URL, as the virtualization controller asks for it.
    let out = Command::new(DVCR)
        .args(["upload-url", "--server", &dvcr.url(""), "--dest", repo_tag])
        .args(["--ttl", "15m"])
        .env_remove("DVCR_LOG")
        .output()
        .expect("running dvcr upload-url");
    assert!(
        out.status.success(),
        "dvcr upload-url: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dvcr.log()
    );
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = urls["external"]
        .as_str()
        .unwrap_or_else(|| panic!("no external URL in {urls}"))
        .to_owned();
    assert!(url.starts_with(&dvcr.url("/upload/")), "{urls}");
    assert!(urls["inCluster"].is_string(), "{urls}");
    assert!(
        !dvcr.has_tag(repo_tag),
        "nothing is stored before the upload"
    );
    let before = upload_status(&url);
    assert_eq!(before["phase"], "WaitForUserUpload", "{before}");

    // The user's `curl -T`, while the status is followed until Ready.
    let mut upload = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-T", s(&image), &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running curl");
    let deadline = Instant::now() + Duration::from_secs(120);
    let phases = ["WaitForUserUpload", "Provisioning", "Ready"];
    let mut reached = 0;
    let ready = loop {
        let status = upload_status(&url);
        let phase = status["phase"].as_str().unwrap_or_default();
        let Some(rank) = phases.iter().position(|p| *p == phase) else {
            panic!("unexpected upload status {status}\n{}", dvcr.log());
        };
        assert!(
            rank >= reached,
            "the phase went back to {phase} after {}: {status}",
            phases[reached]
        );
        reached = rank;
        if phase == "Ready" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the upload is not Ready after 2 minutes: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let curl_status = upload.wait().unwrap();
    let mut answer = String::new();
    upload
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut answer)
        .unwrap();
    let mut curl_err = String::new();
    upload
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut curl_err)
        .unwrap();
    assert!(curl_status.success(), "curl -T: {curl_err}");
    let (body, code) = answer.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "curl -T answer: {body}");
    let answered: Value = serde_json::from_str(body).unwrap();
    assert_eq!(answered["phase"], "Ready", "{answered}");

    assert_eq!(ready["format"], "qcow2", "{ready}");
    assert_eq!(ready["cdrom"], false, "{ready}");
    assert_eq!(ready["received"], image_size, "{ready}");
    assert_eq!(ready["stored"], image_size, "{ready}");
    assert_eq!(ready["unpacked"], 64 * MIB, "{ready}");
    assert_eq!(ready["progress"], 100.0, "{ready}");
    assert!(ready["error"].is_null(), "{ready}");
    assert!(dvcr.has_tag(repo_tag), "the upload is stored as {repo_tag}");

    // The disk: DVCR onto a filesystem PVC, by environment only.
    let volume = empty_dir(&scratch, "pvc");
    let source = dvcr.image(repo_tag);
    let job = run_job(
        &scratch,
        "dvcr-to-pvc",
        &[
            ("IMPORTER_SOURCE", "dvcr"),
            ("IMPORTER_ENDPOINT", &source),
            ("IMPORTER_DESTINATION_PATH", s(&volume)),
            ("DESTINATION_INSECURE_TLS", "true"),
            ("OWNER_UID", "e2e-upload-uid"),
        ],
    );
    job.assert_succeeded("dvcr-to-pvc");
    let disk = volume.join("disk.img");
    job.assert_report("dvcr-to-pvc", image_size, 64 * MIB, "qcow2", s(&disk));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * MIB);
    assert_same_disk(&disk, &image, "qcow2");

    // The URL takes no second upload.
    let (code, body) = curl(&["-T", s(&image), &url]);
    assert_eq!(code, 409, "a second upload: {body}");
}

/// HTTP: nginx serves a qcow2; one importer job (environment only) stores it in DVCR with
/// its checksum checked, a second one writes it from DVCR onto a PVC larger than the image.
fn http_to_dvcr_to_a_pvc(dvcr: &Dvcr) {
    let scratch = Scratch::new();
    let www = empty_dir(&scratch, "www");
    let image = qcow2_with_writes(
        &scratch,
        "www/fedora-cloud.qcow2",
        128 * MIB,
        &[
            "write -P 0x11 0 2M",
            "write -P 0x22 3M 64k",
            "write -P 0x33 40M 1M",
            "write -z 40M 128k",
            "write -P 0x44 100000256 8192",
            "write -P 0x55 127M 1M",
        ],
    );
    let image_size = std::fs::metadata(&image).unwrap().len();
    let nginx = Nginx::serve(&scratch.path("nginx"), &www);
    let url = nginx.url("fedora-cloud.qcow2");
    let checksum = sha256_file(&image);
    let repo_tag = "cvi/e2e-http:uid-0002";
    let dest = dvcr.image(repo_tag);

    let job1 = run_job(
        &scratch,
        "http-to-dvcr",
        &[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", &url),
            ("IMPORTER_DESTINATION_ENDPOINT", &dest),
            ("DESTINATION_INSECURE_TLS", "true"),
            ("IMPORTER_CHECKSUMS", &checksum),
            ("OWNER_UID", "e2e-http-uid"),
        ],
    );
    job1.assert_succeeded("http-to-dvcr");
    job1.assert_report(
        "http-to-dvcr",
        image_size,
        128 * MIB,
        "qcow2",
        &format!("docker://{dest}"),
    );
    assert!(
        job1.report["average-speed"].as_u64().unwrap() > 0,
        "bytes came over HTTP: {}",
        job1.report
    );
    assert!(
        nginx.access_log().contains("/fedora-cloud.qcow2"),
        "the job read the image from nginx: {}",
        nginx.access_log()
    );
    assert!(dvcr.has_tag(repo_tag), "the job stored {repo_tag}");

    let volume = empty_dir(&scratch, "pvc");
    let job2 = run_job(
        &scratch,
        "dvcr-to-pvc",
        &[
            ("IMPORTER_SOURCE", "dvcr"),
            ("IMPORTER_ENDPOINT", &dest),
            ("IMPORTER_DESTINATION_PATH", s(&volume)),
            ("IMPORTER_DESTINATION_SIZE", "160Mi"),
            ("DESTINATION_INSECURE_TLS", "true"),
            ("OWNER_UID", "e2e-http-uid"),
        ],
    );
    job2.assert_succeeded("dvcr-to-pvc");
    let disk = volume.join("disk.img");
    job2.assert_report("dvcr-to-pvc", image_size, 128 * MIB, "qcow2", s(&disk));
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        160 * MIB,
        "the disk has the PVC's size"
    );
    assert_same_disk(&disk, &image, "qcow2");
}

/// Container image: a `docker save` tarball with the disk under `/disk/`, pushed by skopeo,
/// written from the registry onto a PVC by an importer job (environment only).
fn docker_archive_by_skopeo_to_a_pvc(dvcr: &Dvcr) {
    let scratch = Scratch::new();
    let image = qcow2_with_writes(
        &scratch,
        "disk.qcow2",
        96 * MIB,
        &[
            "write -P 0x6b 0 1M",
            "write -P 0x9d 48M 2M",
            "write -P 0xf0 95M 1M",
        ],
    );
    let image_size = std::fs::metadata(&image).unwrap().len();
    let tarball = docker_save_tarball(&scratch, &image, "disk.qcow2", "disks/e2e:v1");
    let repo_tag = "disks/e2e:v1";
    run(Command::new("skopeo")
        .args(["--insecure-policy", "--command-timeout", "120s", "copy"])
        .arg("--dest-tls-verify=false")
        .arg(format!("docker-archive:{}", s(&tarball)))
        .arg(format!("docker://{}", dvcr.image(repo_tag))));
    assert!(dvcr.has_tag(repo_tag), "skopeo pushed {repo_tag}");

    let volume = empty_dir(&scratch, "pvc");
    let source = format!("docker://{}", dvcr.image(repo_tag));
    let job = run_job(
        &scratch,
        "registry-to-pvc",
        &[
            ("IMPORTER_SOURCE", "registry"),
            ("IMPORTER_ENDPOINT", &source),
            ("IMPORTER_INSECURE_TLS", "true"),
            ("IMPORTER_DESTINATION_PATH", s(&volume)),
            ("OWNER_UID", "e2e-registry-uid"),
        ],
    );
    job.assert_succeeded("registry-to-pvc");
    let disk = volume.join("disk.img");
    job.assert_report("registry-to-pvc", image_size, 96 * MIB, "qcow2", s(&disk));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 * MIB);
    assert_same_disk(&disk, &image, "qcow2");
}

// ---------------------------------------------------------------------------------------
// The tests: each path against the default DVCR.

#[test]
fn a_presigned_curl_upload_reaches_ready_and_lands_on_a_pvc() {
    presigned_curl_upload_to_a_pvc(&start_dvcr(&[]));
}

#[test]
fn an_importer_job_configured_by_env_goes_from_http_to_dvcr_to_a_pvc_file() {
    http_to_dvcr_to_a_pvc(&start_dvcr(&[]));
}

#[test]
fn a_disk_image_pushed_by_skopeo_from_a_docker_save_tarball_is_imported_to_a_pvc() {
    docker_archive_by_skopeo_to_a_pvc(&start_dvcr(&[]));
}

/// The same three paths with DVCR keeping its data in an S3 bucket (a real `s3s-fs`
/// server checking SigV4), as a multi-node cluster runs it.
#[test]
fn every_user_path_works_with_dvcr_on_s3_object_storage() {
    let server = std::sync::Arc::new(common::S3Server::start());
    server.create_bucket("dvcr");
    let dvcr = Dvcr {
        registry: Registry::start_on_s3(&server, "dvcr", &[]),
    };
    presigned_curl_upload_to_a_pvc(&dvcr);
    http_to_dvcr_to_a_pvc(&dvcr);
    docker_archive_by_skopeo_to_a_pvc(&dvcr);
    let keys = server.keys("dvcr");
    assert!(
        keys.iter().filter(|k| k.starts_with("d/")).count() >= 6,
        "three images (disk, config, manifest each) live in the bucket: {keys:?}"
    );
}

/// The job binary takes no arguments: `--help` lists every variable the importer reads
/// (names taken from its source), `--version` answers, and anything else is refused
/// without starting an import.
#[test]
fn the_importer_job_binary_lists_its_variables_and_refuses_arguments() {
    let bin = env!("CARGO_BIN_EXE_dvcr-importer");
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../importer/src/env.rs"),
    )
    .unwrap();
    let mut names: Vec<&str> = source
        .split('"')
        .filter(|s| {
            (s.starts_with("IMPORTER_") || *s == "DESTINATION_INSECURE_TLS" || *s == "OWNER_UID")
                && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        assert!(text.contains(name), "--help does not mention {name}");
    }
    let version = Command::new(bin).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("dvcr-importer "));
    let wrong = Command::new(bin)
        .arg("--source=http")
        .env("IMPORTER_TERMINATION_LOG", "/nonexistent/dir/report")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("takes no arguments"));
}
