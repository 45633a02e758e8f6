//! Garbage collection, black-box: images pushed to a real `dvcr serve`, then `dvcr gc` run
//! offline on its root (server stopped), or the online collector of
//! `dvcr serve --gc-interval` running while clients push and pull.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// An image whose layers are given: (manifest digest, config digest, layer digests).
fn push_image_with(reg: &Registry, repo: &str, tag: &str, seed: u64, layers: &[&[u8]]) -> Image {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let config_digest = reg.push_blob(repo, config.as_bytes());
    let mut descs = Vec::new();
    let mut digests = Vec::new();
    for l in layers {
        let d = reg.push_blob(repo, l);
        descs.push((OCI_LAYER, d.clone(), l.len()));
        digests.push(d);
    }
    let descs: Vec<(&str, &str, usize)> =
        descs.iter().map(|(m, d, s)| (*m, d.as_str(), *s)).collect();
    let manifest = image_manifest((OCI_CONFIG, &config_digest, config.len()), &descs);
    let digest = reg.push_manifest(repo, tag, OCI_MANIFEST, &manifest);
    Image {
        manifest,
        digest,
        config: config_digest,
        config_len: config.len(),
        layers: digests,
    }
}

#[derive(Debug, Clone)]
struct Image {
    manifest: Vec<u8>,
    digest: String,
    config: String,
    config_len: usize,
    layers: Vec<String>,
}

/// A layer that several images share over time (index `i` picks one of five).
fn recycled(i: u64) -> Vec<u8> {
    noise(4000, 5000 + i % 5)
}

/// Runs `dvcr gc` on `root` with `args` and returns its JSON report.
fn gc(root: &std::path::Path, args: &[&str]) -> Value {
    let out = run(Command::new(DVCR)
        .arg("gc")
        .arg("--root")
        .arg(root)
        .arg("--json")
        .args(args)
        .env_remove("DVCR_ROOT"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dvcr gc printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn delete_manifest(reg: &Registry, repo: &str, digest: &str) {
    let r = reg
        .req("DELETE", &format!("/v2/{repo}/manifests/{digest}"))
        .send();
    assert_eq!(r.status, 202, "DELETE manifest: {r:?}");
}

/// Every file under `<root>/blobs`.
fn blob_files(reg: &Registry) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![reg.root.join("blobs")];
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
    out.sort();
    out
}

#[test]
fn gc_frees_the_unshared_blobs_of_a_deleted_image_and_the_other_image_still_pulls_byte_identical() {
    let mut reg = Registry::start();
    let shared = noise(50_000, 1);
    let only_a = noise(70_000, 2);
    let only_b = noise(30_000, 3);
    let a = push_image_with(&reg, "vm/disks", "a", 10, &[&shared, &only_a]);
    let b = push_image_with(&reg, "vm/disks", "b", 20, &[&shared, &only_b]);
    delete_manifest(&reg, "vm/disks", &a.digest);
    reg.stop();

    let report = gc(&reg.root, &["--grace", "0s"]);
    // The deleted image's manifest, config and unshared layer.
    assert_eq!(report["blobs_deleted"], 3, "{report}");
    assert_eq!(
        report["bytes_freed"].as_u64().unwrap(),
        (a.manifest.len() + a.config_len + only_a.len()) as u64,
        "{report}"
    );
    assert_eq!(report["dry_run"], false);
    for gone in [&a.digest, &a.config, &a.layers[1]] {
        assert!(!reg.blob_file(gone).exists(), "{gone} should be freed");
    }
    for kept in [&b.digest, &b.config, &b.layers[0], &b.layers[1]] {
        assert!(reg.blob_file(kept).exists(), "{kept} must stay");
    }

    reg.restart(&[]);
    let manifest = reg.pull_image_verified("vm/disks", "b");
    assert_eq!(
        manifest, b.manifest,
        "the manifest must come back byte-exact"
    );
    assert_eq!(reg.pull_blob_verified("vm/disks", &b.layers[0]), shared);
    assert_eq!(reg.pull_blob_verified("vm/disks", &b.layers[1]), only_b);
    let freed = reg
        .req("HEAD", &format!("/v2/vm/disks/blobs/{}", a.layers[1]))
        .send();
    assert_eq!(freed.status, 404, "a freed blob is unknown: {freed:?}");
    // The freed layer can be pushed again and used.
    let again = push_image_with(&reg, "vm/disks", "a", 10, &[&shared, &only_a]);
    assert_eq!(again.digest, a.digest);
    reg.pull_image_verified("vm/disks", "a");
}

#[test]
fn an_uploaded_but_unreferenced_blob_younger_than_the_grace_period_survives() {
    let mut reg = Registry::start();
    let orphan = noise(10_000, 7);
    let digest = reg.push_blob("uploads/pending", &orphan);
    reg.stop();

    let report = gc(&reg.root, &["--grace", "1h"]);
    assert_eq!(report["blobs_deleted"], 0, "{report}");
    assert_eq!(report["blobs_in_grace"], 1, "{report}");
    assert!(reg.blob_file(&digest).exists());

    // Without a grace period it is garbage.
    let report = gc(&reg.root, &["--grace", "0s"]);
    assert_eq!(report["blobs_deleted"], 1, "{report}");
    assert!(!reg.blob_file(&digest).exists());
}

#[test]
fn a_dry_run_reports_what_it_would_free_and_deletes_nothing() {
    let mut reg = Registry::start();
    let a = push_image_with(&reg, "r", "a", 1, &[&noise(5000, 1)]);
    push_image_with(&reg, "r", "b", 2, &[&noise(6000, 2)]);
    delete_manifest(&reg, "r", &a.digest);
    reg.stop();
    let before = blob_files(&reg);
    let repos_before = std::fs::read_dir(reg.root.join("repositories/r/_layers/sha256"))
        .unwrap()
        .count();

    let report = gc(&reg.root, &["--grace", "0s", "--dry-run"]);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["blobs_deleted"], 3, "{report}");
    assert!(report["bytes_freed"].as_u64().unwrap() > 5000);
    assert_eq!(blob_files(&reg), before, "a dry run must delete nothing");
    assert_eq!(
        std::fs::read_dir(reg.root.join("repositories/r/_layers/sha256"))
            .unwrap()
            .count(),
        repos_before
    );
}

#[test]
fn untagged_manifests_stay_unless_asked_and_then_go_with_their_blobs() {
    let mut reg = Registry::start();
    let layer = noise(4000, 5);
    let untagged = push_image_with(&reg, "r", "temp", 5, &[&layer]);
    let kept = push_image_with(&reg, "r", "keep", 6, &[&noise(4100, 6)]);
    let r = reg.req("DELETE", "/v2/r/manifests/temp").send();
    assert_eq!(r.status, 202, "{r:?}");
    reg.stop();

    let report = gc(&reg.root, &["--grace", "0s"]);
    assert_eq!(
        report["blobs_deleted"], 0,
        "untagged revisions are roots: {report}"
    );

    let report = gc(&reg.root, &["--grace", "0s", "--delete-untagged"]);
    assert_eq!(report["manifests_deleted"], 1, "{report}");
    assert_eq!(report["blobs_deleted"], 3, "{report}");
    reg.restart(&[]);
    let gone = reg
        .req("GET", &format!("/v2/r/manifests/{}", untagged.digest))
        .send();
    assert_eq!(gone.status, 404, "{gone:?}");
    reg.pull_image_verified("r", "keep");
    reg.pull_image_verified("r", &kept.digest);
}

#[test]
fn offline_gc_refuses_to_run_while_a_server_uses_the_root() {
    let reg = Registry::start();
    let out = Command::new(DVCR)
        .arg("gc")
        .arg("--root")
        .arg(&reg.root)
        .env_remove("DVCR_ROOT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dvcr serve"), "{stderr}");
}

/// Prints the server log when the test fails, to show what the server saw.
struct LogOnPanic(Arc<Registry>);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("server log:\n{}", self.0.log());
        }
    }
}

/// Scrapes one unlabelled sample from `/metrics`.
fn scrape(reg: &Registry, name: &str) -> f64 {
    let text = String::from_utf8(reg.req("GET", "/metrics").send().body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn online_gc_during_concurrent_pushes_never_fails_a_push_or_breaks_a_pulled_image() {
    let reg = Arc::new(Registry::start_with(&[
        "--gc-interval",
        "150ms",
        "--gc-grace",
        "2s",
    ]));
    let _log = LogOnPanic(reg.clone());
    let shared = Arc::new(noise(20_000, 99));
    // An image nobody deletes: pulled again and again while the collector runs.
    let keeper = push_image_with(&reg, "stable/image", "v1", 1, &[&shared, &noise(9000, 1)]);

    let stop = Arc::new(AtomicBool::new(false));
    let pushes = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for (t, repo) in ["push/one", "push/two"].into_iter().enumerate() {
        let (reg, stop, shared, pushes) =
            (reg.clone(), stop.clone(), shared.clone(), pushes.clone());
        threads.push(std::thread::spawn(move || {
            let mut live: Vec<Image> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let seed = 1000 * (t as u64 + 1) + i;
                // Like docker: skip the upload of a layer the registry already has.
                let head = reg
                    .req("HEAD", &format!("/v2/{repo}/blobs/{}", sha256(&shared)))
                    .send();
                let unique = noise(3000 + (i as usize % 7) * 100, seed);
                let img = if head.status == 200 {
                    let config = format!(r#"{{"os":"linux","seed":{seed}}}"#);
                    let c = reg.push_blob(repo, config.as_bytes());
                    let u = reg.push_blob(repo, &unique);
                    let rl = reg.push_blob(repo, &recycled(i));
                    let shared_digest = sha256(&shared);
                    let manifest = image_manifest(
                        (OCI_CONFIG, &c, config.len()),
                        &[
                            (OCI_LAYER, &shared_digest, shared.len()),
                            (OCI_LAYER, &u, unique.len()),
                            (OCI_LAYER, &rl, recycled(i).len()),
                        ],
                    );
                    let r = reg.put_manifest(repo, &format!("t{}", i % 3), OCI_MANIFEST, &manifest);
                    assert_eq!(r.status, 201, "manifest push {i} failed during GC: {r:?}");
                    Image {
                        digest: sha256(&manifest),
                        manifest,
                        config: c,
                        config_len: config.len(),
                        layers: vec![shared_digest, u, rl],
                    }
                } else {
                    push_image_with(
                        &reg,
                        repo,
                        &format!("t{}", i % 3),
                        seed,
                        &[&shared, &unique, &recycled(i)],
                    )
                };
                pushes.fetch_add(1, Ordering::Relaxed);
                live.push(img);
                // Keep two images; delete older ones so the collector has work.
                if live.len() > 2 {
                    let old = live.remove(0);
                    let r = reg
                        .req("DELETE", &format!("/v2/{repo}/manifests/{}", old.digest))
                        .send();
                    assert!(r.status == 202 || r.status == 404, "{r:?}");
                }
                i += 1;
            }
            live
        }));
    }
    {
        // Garbage made all the time, in repositories that then go quiet: the collector frees
        // it while the others push, and its layers are the ones the pushers recycle.
        let (reg, stop) = (reg.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let repo = format!("junk/r{k}");
                let img = push_image_with(
                    &reg,
                    &repo,
                    "x",
                    90_000 + k,
                    &[&recycled(k), &noise(2000, 90_000 + k)],
                );
                delete_manifest(&reg, &repo, &img.digest);
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Vec::new()
        }));
    }
    {
        let (reg, stop, keeper) = (reg.clone(), stop.clone(), keeper.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let m = reg.pull_image_verified("stable/image", "v1");
                assert_eq!(m, keeper.manifest);
                std::thread::sleep(Duration::from_millis(20));
            }
            Vec::new()
        }));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut survivors = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        let live = t
            .join()
            .unwrap_or_else(|_| panic!("client thread {i} failed"));
        survivors.push(live);
    }
    assert!(
        pushes.load(Ordering::Relaxed) >= 10,
        "too few pushes to mean anything"
    );

    // Everything live is complete and byte-identical.
    for (repo, live) in ["push/one", "push/two"].iter().zip(&survivors) {
        for img in live {
            let m = reg.pull_image_verified(repo, &img.digest);
            assert_eq!(m, img.manifest);
        }
    }
    reg.pull_image_verified("stable/image", "v1");
    assert!(scrape(&reg, "dvcr_gc_runs_total") >= 3.0);
    assert!(
        scrape(&reg, "dvcr_gc_freed_bytes_total") > 0.0,
        "the collector freed nothing while clients pushed; log:\n{}",
        reg.log()
    );
    assert!(!reg.log().contains("panicked"), "{}", reg.log());
}
