//! Prometheus metrics, black-box: pushes and pulls against a real `dvcr serve`, then
//! `GET /metrics` parsed as the OpenMetrics text it is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;

/// One scrape: (metric name, labels) -> value.
#[derive(Debug)]
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Scrape {
    fn take(reg: &Registry) -> Self {
        let r = reg.req("GET", "/metrics").send();
        assert_eq!(r.status, 200, "{r:?}");
        let ct = r.must("Content-Type");
        assert!(
            ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
            "{ct}"
        );
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples.push((name.to_string(), labels, value.parse().unwrap()));
        }
        Self { samples, text }
    }

    /// The value of the series `name` whose labels include `labels` (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn requests(&self, method: &str, route: &str, status: &str) -> f64 {
        self.get(
            "dvcr_http_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    }
}

#[test]
fn counters_and_gauges_reflect_pushes_pulls_and_garbage_collection() {
    let mut reg = Registry::start();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = noise(123_456, 4);
    let c = reg.push_blob("m/img", &config);
    let l = reg.push_blob("m/img", &layer);
    let manifest = image_manifest(
        (OCI_CONFIG, &c, config.len()),
        &[(OCI_LAYER, &l, layer.len())],
    );
    let m = reg.push_manifest("m/img", "v1", OCI_MANIFEST, &manifest);
    for _ in 0..2 {
        reg.pull_blob_verified("m/img", &l);
    }
    let part = reg
        .req("GET", &format!("/v2/m/img/blobs/{l}"))
        .header("Range", "bytes=0-99")
        .send();
    assert_eq!(part.status, 206);
    let missing = reg
        .req("HEAD", &format!("/v2/m/img/blobs/{}", unknown_digest()))
        .send();
    assert_eq!(missing.status, 404);
    reg.req("GET", "/v2/").send();
    reg.req("GET", "/v2/m/img/tags/list").send();

    let s = Scrape::take(&reg);
    assert_eq!(s.requests("POST", "upload", "202"), 2.0, "{}", s.text);
    assert_eq!(s.requests("PUT", "upload", "201"), 2.0, "{}", s.text);
    assert_eq!(s.requests("PUT", "manifest", "201"), 1.0, "{}", s.text);
    assert_eq!(s.requests("GET", "blob", "200"), 2.0, "{}", s.text);
    assert_eq!(s.requests("GET", "blob", "206"), 1.0, "{}", s.text);
    assert_eq!(s.requests("HEAD", "blob", "404"), 1.0, "{}", s.text);
    assert_eq!(s.requests("GET", "ping", "200"), 1.0, "{}", s.text);
    assert_eq!(s.requests("GET", "tags", "200"), 1.0, "{}", s.text);
    // No raw path, name or digest ever becomes a label.
    assert!(
        !s.text.contains("m/img") && !s.text.contains("sha256:"),
        "{}",
        s.text
    );
    let routes = [
        "ping",
        "blob",
        "upload",
        "manifest",
        "tags",
        "referrers",
        "catalog",
        "token",
        "other",
    ];
    for (_, labels, _) in &s.samples {
        if let Some(r) = labels.get("route") {
            assert!(routes.contains(&r.as_str()), "route label {r}");
        }
    }
    assert_eq!(
        s.get(
            "dvcr_http_request_duration_seconds_count",
            &[("route", "upload")]
        ),
        4.0
    );
    assert_eq!(
        s.get("dvcr_blob_bytes_received_total", &[]),
        (config.len() + layer.len()) as f64
    );
    assert_eq!(
        s.get("dvcr_blob_bytes_sent_total", &[]),
        (2 * layer.len() + 100) as f64
    );
    assert_eq!(s.get("dvcr_upload_duration_seconds_count", &[]), 2.0);
    let stored = (config.len() + layer.len() + manifest.len()) as f64;
    assert_eq!(s.get("dvcr_storage_blobs", &[]), 3.0, "{}", s.text);
    assert_eq!(s.get("dvcr_storage_bytes", &[]), stored, "{}", s.text);
    assert_eq!(s.get("dvcr_gc_runs_total", &[]), 0.0);

    // A restart measures the storage again; an online collection brings the gauges down.
    reg.restart(&["--gc-interval", "200ms", "--gc-grace", "0s"]);
    let s = Scrape::take(&reg);
    assert_eq!(s.get("dvcr_storage_blobs", &[]), 3.0, "{}", s.text);
    assert_eq!(s.get("dvcr_storage_bytes", &[]), stored, "{}", s.text);
    let r = reg
        .req("DELETE", &format!("/v2/m/img/manifests/{m}"))
        .send();
    assert_eq!(r.status, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let s = loop {
        let s = Scrape::take(&reg);
        if s.get("dvcr_storage_blobs", &[]) == 0.0 || std::time::Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(s.get("dvcr_storage_blobs", &[]), 0.0, "{}", s.text);
    assert_eq!(s.get("dvcr_storage_bytes", &[]), 0.0, "{}", s.text);
    assert_eq!(
        s.get("dvcr_gc_freed_bytes_total", &[]),
        stored,
        "{}",
        s.text
    );
    assert!(s.get("dvcr_gc_runs_total", &[]) >= 1.0);
}

#[test]
fn metrics_need_no_credentials_even_when_the_registry_does() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    // A bcrypt entry made by the real `htpasswd -B` (cost 4 keeps the test fast).
    let out = std::process::Command::new("htpasswd")
        .args(["-nbBC", "4", "user", "secret"])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        eprintln!("skipped: htpasswd (apache2-utils) is not installed");
        return;
    };
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = Registry::start_with(&["--htpasswd", htpasswd.to_str().unwrap()]);
    assert_eq!(reg.req("GET", "/v2/").send().status, 401);
    let s = Scrape::take(&reg);
    assert_eq!(s.requests("GET", "ping", "401"), 1.0, "{}", s.text);
}
