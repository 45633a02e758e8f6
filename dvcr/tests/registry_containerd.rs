//! `dvcr serve` with containerd, the runtime that pulls the DVCR artifact on the nodes: a
//! private `containerd` daemon (its own root, state and socket in a temp dir; the CRI plugin
//! and the snapshotters that need special filesystems disabled) pulls images with
//! `ctr images pull --plain-http`, once by tag (OCI manifest) and once by digest (Docker
//! schema2), unpacks them with the `native` snapshotter (plain directories: no overlayfs or
//! other kernel feature needed), and the test compares what containerd holds with what was
//! pushed: the manifest digest it resolved, every blob byte for byte (`ctr content get`), the
//! image in an exported OCI archive, and `disk/disk.img` in the unpacked snapshot owned by
//! uid/gid 107 as a KubeVirt containerDisk needs.
//!
//! Tools come from `.ci/install-tools` (Debian: containerd, which brings `ctr` and runc; tar
//! and gzip). A missing `containerd` or `ctr` is a failure that names it. The daemon must run
//! as root: when the test is not root, or the daemon cannot boot in this sandbox, the test
//! prints why and returns, unless `DVCR_REQUIRE_CONTAINERD=1` makes that a failure (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dvcr_tests::Scratch;
use serde_json::{Value, json};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The Go name of this machine's architecture, as containerd matches it against the config.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Prints why the test cannot run here and whether that is allowed; panics when
/// `DVCR_REQUIRE_CONTAINERD=1`.
fn skip(why: &str) {
    let required = std::env::var("DVCR_REQUIRE_CONTAINERD").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "containerd cannot run here and DVCR_REQUIRE_CONTAINERD=1: {why}"
    );
    eprintln!("SKIPPED: containerd cannot run here: {why}");
}

/// A private containerd daemon; killed (SIGTERM, then SIGKILL) when dropped.
struct Containerd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts the daemon and waits until it answers on its socket; Err(reason) when it does
    /// not boot (the reason quotes its log).
    fn start() -> Result<Self, String> {
        // A short path: a unix socket path is limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("dvcr-ctrd-")
            .tempdir_in("/tmp")
            .expect("creating the containerd dir");
        let root = dir.path().join("root");
        let socket = dir.path().join("c.sock");
        let log = dir.path().join("containerd.log");
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
temp = "{tmp}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
                root = s(&root),
                state = s(&dir.path().join("state")),
                tmp = s(&dir.path().join("tmp")),
                socket = s(&socket),
                opt = s(&dir.path().join("opt")),
            ),
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run containerd: {e} (.ci/install-tools installs it: Debian package containerd)")
            });
        let mut daemon = Self {
            child,
            socket,
            root,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                return Err(format!(
                    "containerd exited with {status}; its log:\n{}",
                    daemon.log_text()
                ));
            }
            if daemon.socket.exists() {
                let out = daemon.ctr_output(&["version"]);
                if out.status.success() {
                    return Ok(daemon);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd did not answer on {} within 20 s; its log:\n{}",
                    daemon.socket.display(),
                    daemon.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "dvcr-test"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr` against this daemon, whatever its result.
    fn ctr_output(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().unwrap_or_else(|e| {
            panic!("cannot run ctr: {e} (.ci/install-tools installs it: Debian package containerd)")
        })
    }

    /// Runs `ctr` against this daemon and asserts success; returns its output.
    fn ctr(&self, args: &[&str]) -> Output {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gzipped layer tar with `disk/` and `disk/disk.img` (owner 107:107, as KubeVirt expects).
struct DiskLayer {
    disk: Vec<u8>,
    tar_digest: String,
    gz: Vec<u8>,
}

fn disk_layer(scratch: &Scratch, name: &str, size: usize, seed: u64) -> DiskLayer {
    let src = scratch.path(&format!("{name}-src"));
    fs::create_dir_all(src.join("disk")).unwrap();
    let disk = noise(size, seed);
    fs::write(src.join("disk/disk.img"), &disk).unwrap();
    let tar = scratch.path(&format!("{name}.tar"));
    run(Command::new("tar")
        .args([
            "--format=gnu",
            "--owner=107",
            "--group=107",
            "--numeric-owner",
        ])
        .args(["--mtime=2024-01-01 00:00:00Z", "--sort=name", "-C", s(&src)])
        .args(["-cf", s(&tar), "disk"]));
    run(Command::new("gzip").args(["-n", "-1", "-k", "-f", s(&tar)]));
    DiskLayer {
        disk,
        tar_digest: sha256_file(&tar),
        gz: fs::read(scratch.path(&format!("{name}.tar.gz"))).unwrap(),
    }
}

/// Pushes config, layer and manifest (`manifest_type`, with `config_type` and `layer_type`)
/// to `repo:tag`; returns (manifest digest, config digest, layer digest, config bytes).
fn push_disk_image(
    reg: &Registry,
    repo: &str,
    tag: &str,
    layer: &DiskLayer,
    types: (&str, &str, &str),
) -> (String, String, String, Vec<u8>) {
    let (manifest_type, config_type, layer_type) = types;
    let config = serde_json::to_vec(&json!({
        "architecture": go_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {
            "source-image-format": "raw",
            "source-image-size": layer.disk.len().to_string(),
            "source-image-virtual-size": layer.disk.len().to_string(),
        }},
        "rootfs": {"type": "layers", "diff_ids": [layer.tar_digest]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "dvcr test"}]
    }))
    .unwrap();
    let config_digest = reg.push_blob(repo, &config);
    let layer_digest = reg.push_blob(repo, &layer.gz);
    let mut manifest: Value = serde_json::from_slice(&image_manifest(
        (config_type, &config_digest, config.len()),
        &[(layer_type, &layer_digest, layer.gz.len())],
    ))
    .unwrap();
    manifest["mediaType"] = json!(manifest_type);
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap();
    let manifest_digest = reg.push_manifest(repo, tag, manifest_type, &manifest);
    (manifest_digest, config_digest, layer_digest, config)
}

/// Finds `disk/disk.img` in the native snapshotter's snapshots.
fn unpacked_disks(containerd_root: &Path) -> Vec<PathBuf> {
    let snapshots = containerd_root.join("io.containerd.snapshotter.v1.native/snapshots");
    let mut found = Vec::new();
    for entry in
        fs::read_dir(&snapshots).unwrap_or_else(|e| panic!("reading {}: {e}", snapshots.display()))
    {
        let disk = entry.unwrap().path().join("disk/disk.img");
        if disk.is_file() {
            found.push(disk);
        }
    }
    found
}

/// Asserts that containerd's content store holds exactly `expected` under `digest`.
fn assert_content(daemon: &Containerd, digest: &str, expected: &[u8], what: &str) {
    let got = daemon.ctr(&["content", "get", digest]).stdout;
    assert!(
        got == expected,
        "containerd's {what} {digest} differs from what was pushed ({} bytes, expected {})",
        got.len(),
        expected.len()
    );
}

#[test]
fn containerd_pulls_and_unpacks_disk_images_by_tag_and_by_digest() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("the containerd daemon needs root and this test does not run as root");
        return;
    }
    let daemon = match Containerd::start() {
        Ok(d) => d,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let reg = Registry::start();
    let scratch = Scratch::new();

    // An OCI image with a 20 MiB disk, pulled by tag.
    let big = disk_layer(&scratch, "big", 20 << 20, 11);
    let (manifest_digest, config_digest, layer_digest, config) = push_disk_image(
        &reg,
        "vi/ns/img",
        "v1",
        &big,
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
    );
    let by_tag = format!("{}/vi/ns/img:v1", reg.addr);
    let pull = daemon.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--http-dump",
        "--snapshotter",
        "native",
        &by_tag,
    ]);
    // The request lines of containerd's HTTP dump (the dump may hold binary bodies).
    let dump: String = String::from_utf8_lossy(&pull.stderr)
        .lines()
        .filter(|l| l.contains(" /v2/"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        dump.contains("HEAD /v2/vi/ns/img/manifests/v1 "),
        "containerd resolves the tag with HEAD:\n{dump}"
    );
    assert!(
        dump.contains(&format!("GET /v2/vi/ns/img/blobs/{layer_digest} ")),
        "containerd fetched the layer blob:\n{dump}"
    );

    let list = String::from_utf8(daemon.ctr(&["images", "ls"]).stdout).unwrap();
    let line = list
        .lines()
        .find(|l| l.starts_with(&format!("{by_tag} ")))
        .unwrap_or_else(|| panic!("{by_tag} is not among containerd's images:\n{list}"));
    assert!(
        line.contains(&manifest_digest) && line.contains(OCI_MANIFEST),
        "containerd resolved {by_tag} to the pushed manifest {manifest_digest}: {line}"
    );
    let manifest = reg
        .req("GET", &format!("/v2/vi/ns/img/manifests/{manifest_digest}"))
        .send()
        .body;
    assert_content(&daemon, &manifest_digest, &manifest, "manifest");
    assert_content(&daemon, &config_digest, &config, "config");
    assert_content(&daemon, &layer_digest, &big.gz, "layer");

    // The unpacked layer is what a containerDisk container would see.
    let disks = unpacked_disks(&daemon.root);
    assert_eq!(disks.len(), 1, "one unpacked disk/disk.img: {disks:?}");
    assert!(
        fs::read(&disks[0]).unwrap() == big.disk,
        "the unpacked disk/disk.img is the pushed disk"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&disks[0]).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (107, 107), "owner of disk.img");
    }

    // The image exported again is the same manifest and blobs.
    let archive = scratch.path("export.tar");
    daemon.ctr(&["images", "export", s(&archive), &by_tag]);
    let exported = scratch.path("export");
    fs::create_dir_all(&exported).unwrap();
    run(Command::new("tar").args(["-xf", s(&archive), "-C", s(&exported)]));
    let index: Value =
        serde_json::from_slice(&fs::read(exported.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        manifest_digest.as_str(),
        "{index}"
    );
    let blob = |d: &str| exported.join("blobs/sha256").join(&d["sha256:".len()..]);
    assert!(fs::read(blob(&layer_digest)).unwrap() == big.gz);
    assert!(fs::read(blob(&config_digest)).unwrap() == config);

    // A Docker schema2 image, pulled by digest only.
    let small = disk_layer(&scratch, "small", 1 << 20, 12);
    let (docker_digest, docker_config_digest, docker_layer_digest, docker_config) = push_disk_image(
        &reg,
        "vi/ns/docker",
        "v2",
        &small,
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
    );
    let by_digest = format!("{}/vi/ns/docker@{docker_digest}", reg.addr);
    daemon.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &by_digest,
    ]);
    let list = String::from_utf8(daemon.ctr(&["images", "ls"]).stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with(&format!("{by_digest} ")) && l.contains(DOCKER_MANIFEST)),
        "{by_digest} is among containerd's images as schema2:\n{list}"
    );
    assert_content(&daemon, &docker_config_digest, &docker_config, "config");
    assert_content(&daemon, &docker_layer_digest, &small.gz, "layer");
    let disks = unpacked_disks(&daemon.root);
    assert_eq!(disks.len(), 2, "two unpacked disks: {disks:?}");
    assert!(
        disks.iter().any(|d| fs::read(d).unwrap() == small.disk),
        "the schema2 image's disk is unpacked"
    );
}
