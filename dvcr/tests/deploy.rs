//! The deployment files (`Dockerfile`, `deploy/`) checked against the code they deploy.
//!
//! - Every manifest, and every kustomize overlay as `kubectl kustomize` renders it, passes
//!   the Kubernetes schema with the pinned `kubernetes-validate` (strict: unknown fields are
//!   errors; a kind without a schema counts as a failure, not a warning).
//! - The import Jobs set only variables the importer reads, and every one an import needs.
//! - Every flag and `DVCR_*` variable given to `dvcr` and `dvcr-uploader` is accepted by the
//!   real binary, and the filesystem registry and the uploader start with exactly the
//!   manifests' settings and answer their probes.
//! - The Dockerfile builds every `[[bin]]` of this crate, copies only what exists and the
//!   build context keeps, and runs as the non-root uid the artifacts are owned by.
//!
//! Each checker returns its findings, and a test feeds it a broken copy too, so a checker
//! that stopped looking would fail. Tools: `kubectl` (render only, no cluster), `python3`
//! with PyYAML and `kubernetes-validate` (all installed by `.ci/install-tools`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");
const UPLOADER: &str = env!("CARGO_BIN_EXE_dvcr-uploader");

/// The Kubernetes versions the manifests must be valid for: the oldest supported and the
/// newest the pinned validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Variables `dvcr serve` reads that are not flags: the S3 client's credentials.
const SERVE_EXTRA_ENV: [&str; 2] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn output(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e} (bash .ci/install-tools installs it)"))
}

/// Runs a command with `input` on stdin.
fn output_with_input(cmd: &mut Command, input: &str, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e} (bash .ci/install-tools installs it)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The YAML documents of a stream, as JSON (by PyYAML, which kubernetes-validate brings).
fn documents(yaml: &str) -> Vec<Value> {
    let out = output_with_input(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ]),
        yaml,
        "python3 with PyYAML",
    );
    assert!(
        out.status.success(),
        "YAML does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kubectl kustomize DIR`: the overlay as `kubectl apply -k` would send it.
fn render(dir: &Path) -> String {
    let out = output(Command::new("kubectl").arg("kustomize").arg(dir), "kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The kustomize directories under `deploy/` (each holds a kustomization.yaml).
fn kustomize_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The plain manifests at the top of `deploy/` (applied with `kubectl apply -f`).
fn plain_manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every manifest set: (name, YAML), rendered overlays included.
fn manifest_sets() -> Vec<(String, String)> {
    let mut sets = Vec::new();
    for dir in kustomize_dirs() {
        let name = format!("kubectl kustomize {}", dir.display());
        sets.push((name, render(&dir)));
    }
    for file in plain_manifests() {
        sets.push((
            file.display().to_string(),
            std::fs::read_to_string(&file).unwrap(),
        ));
    }
    sets
}

/// What the validator says about a YAML stream: `Err` with its output unless it passed
/// every document (a kind it has no schema for is a failure here, not its warning).
fn validate(yaml: &str, version: &str) -> Result<(), String> {
    let docs = documents(yaml).len();
    let out = output_with_input(
        Command::new("python3").args(["-m", "kubernetes_validate", "--strict", "-k", version, "-"]),
        yaml,
        "kubernetes-validate",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count();
    if out.status.success() && passed == docs && docs > 0 {
        Ok(())
    } else {
        Err(format!(
            "{} of {docs} documents passed (exit {}):\n{text}",
            passed, out.status
        ))
    }
}

#[test]
fn every_manifest_and_rendered_overlay_passes_the_kubernetes_schema() {
    let sets = manifest_sets();
    let names: Vec<&str> = sets.iter().map(|(n, _)| n.as_str()).collect();
    for must in [
        "deploy/base",
        "deploy/s3",
        "importer-job.yaml",
        "uploader.yaml",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(must)),
            "{must} is missing from {names:?}"
        );
    }
    for (name, yaml) in &sets {
        for version in KUBERNETES_VERSIONS {
            if let Err(e) = validate(yaml, version) {
                panic!("{name} is not valid for Kubernetes {version}: {e}");
            }
        }
    }
}

#[test]
fn the_schema_check_rejects_an_unknown_field_and_an_unknown_kind() {
    let base = render(&repo().join("deploy/base"));
    let mut docs = documents(&base);
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] =
        json!({"path": "/healthz", "port": 5000});
    // JSON is YAML: one document per object.
    let typo: Vec<String> = docs.iter().map(Value::to_string).collect();
    let typo = typo.join("\n---\n");
    let err = validate(&typo, KUBERNETES_VERSIONS[1]).unwrap_err();
    assert!(err.contains("httpGett"), "{err}");

    let unknown_kind = "apiVersion: apps/v1\nkind: Deploymentt\nmetadata: {name: x}\n";
    assert!(validate(unknown_kind, KUBERNETES_VERSIONS[1]).is_err());
}

#[test]
fn every_file_of_a_kustomize_directory_is_part_of_its_kustomization() {
    for dir in kustomize_dirs() {
        let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let k = &documents(&kustomization)[0];
        let mut used: BTreeSet<String> = BTreeSet::new();
        for field in ["resources", "components"] {
            for r in k[field].as_array().into_iter().flatten() {
                used.insert(r.as_str().unwrap().to_owned());
            }
        }
        for p in k["patches"].as_array().into_iter().flatten() {
            if let Some(path) = p["path"].as_str() {
                used.insert(path.to_owned());
            }
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    used.contains(&name),
                    "{}/{name} is neither a resource nor a patch of its kustomization: it would never be applied",
                    dir.display()
                );
            }
        }
        for r in &used {
            assert!(
                dir.join(r).exists(),
                "{} names {r}, which does not exist",
                dir.display()
            );
        }
    }
}

// --- the importer's environment -----------------------------------------------------------

/// Every `"UPPER_CASE"` string literal of a Rust file's code before its unit tests.
fn upper_case_literals(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or("");
    let mut names = BTreeSet::new();
    for piece in code.split('"').skip(1).step_by(2) {
        if piece.len() > 3
            && piece.contains('_')
            && piece
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            names.insert(piece.to_owned());
        }
    }
    names
}

/// The variables the import Job's binary reads: the contract's (`importer/src/env.rs`) and
/// the binary's own (`DVCR_LOG`, the report path before the contract parsed).
fn importer_variables() -> BTreeSet<String> {
    let mut names = upper_case_literals(&read("importer/src/env.rs"));
    names.extend(upper_case_literals(&read("dvcr/src/bin/dvcr-importer.rs")));
    names
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .filter(|v| !v.is_empty())
}

fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Pod" => Some(&doc["spec"]),
        "Job" | "Deployment" => Some(&doc["spec"]["template"]["spec"]),
        _ => None,
    }
}

/// What is wrong with an import Job, as the importer would find out at run time.
fn importer_job_problems(job: &Value, known: &BTreeSet<String>) -> Vec<String> {
    let name = job["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    let mut problems = Vec::new();
    let mut bad = |what: String| problems.push(format!("Job {name}: {what}"));
    let spec = &job["spec"]["template"]["spec"];
    if spec["restartPolicy"] != "Never" {
        bad("restartPolicy must be Never (each attempt keeps its report)".into());
    }
    if !job["spec"]["backoffLimit"].is_u64() {
        bad("backoffLimit is not set".into());
    }
    if spec["securityContext"]["runAsNonRoot"] != true {
        bad("the pod does not set runAsNonRoot".into());
    }
    let Some(container) = spec["containers"].get(0) else {
        bad("no container".into());
        return problems;
    };
    if container["command"] != json!(["dvcr-importer"]) {
        bad(format!(
            "command {} is not [dvcr-importer]",
            container["command"]
        ));
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap_or("");
        if !known.contains(var) {
            bad(format!("the importer does not read {var}"));
        }
    }
    if container["envFrom"].is_array() {
        bad("envFrom hides the variables from review; list them under env".into());
    }
    let source = env_value(container, "IMPORTER_SOURCE");
    match source {
        None => bad("IMPORTER_SOURCE is not set".into()),
        Some(s)
            if ![
                "http",
                "registry",
                "dvcr",
                "blockDevice",
                "filesystem",
                "blank",
            ]
            .contains(&s) =>
        {
            bad(format!("IMPORTER_SOURCE={s} is not a source kind"));
        }
        Some(s) => {
            if ["http", "registry", "dvcr"].contains(&s)
                && env_value(container, "IMPORTER_ENDPOINT").is_none()
            {
                bad(format!("IMPORTER_SOURCE={s} needs IMPORTER_ENDPOINT"));
            }
        }
    }
    let to_dvcr = env_value(container, "IMPORTER_DESTINATION_ENDPOINT");
    let to_disk = env_value(container, "IMPORTER_DESTINATION_PATH");
    if to_dvcr.is_some() == to_disk.is_some() {
        bad(
            "set exactly one of IMPORTER_DESTINATION_ENDPOINT and IMPORTER_DESTINATION_PATH".into(),
        );
    }
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountPath"].as_str())
        .chain(
            container["volumeDevices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["devicePath"].as_str()),
        )
        .collect();
    for var in ["IMPORTER_DESTINATION_PATH", "IMPORTER_SCRATCH_DIR"] {
        if let Some(path) = env_value(container, var)
            && !mounts.contains(&path)
        {
            bad(format!("{var}={path} is not a mounted volume or device"));
        }
    }
    let report = env_value(container, "IMPORTER_TERMINATION_LOG").unwrap_or("/dev/termination-log");
    let message_path = container["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    if report != message_path {
        bad(format!(
            "the report goes to {report} but the termination message is read from {message_path}"
        ));
    }
    let metrics = env_value(container, "IMPORTER_METRICS_ADDR").unwrap_or("0.0.0.0:8443");
    if metrics != "off" {
        let port = metrics
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u64>().ok());
        let declared = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["containerPort"].as_u64() == port);
        if !declared {
            bad(format!(
                "the metrics port of {metrics} is not a containerPort"
            ));
        }
    }
    problems
}

fn importer_jobs() -> Vec<Value> {
    documents(&read("deploy/importer-job.yaml"))
        .into_iter()
        .filter(|d| d["kind"] == "Job")
        .collect()
}

#[test]
fn the_import_jobs_set_only_variables_the_importer_reads_and_all_it_needs() {
    let known = importer_variables();
    for must in [
        "IMPORTER_SOURCE",
        "IMPORTER_ENDPOINT",
        "OWNER_UID",
        "DVCR_LOG",
    ] {
        assert!(known.contains(must), "{must} not found in {known:?}");
    }
    let jobs = importer_jobs();
    let destinations: BTreeSet<&str> = jobs
        .iter()
        .flat_map(|j| {
            ["IMPORTER_DESTINATION_ENDPOINT", "IMPORTER_DESTINATION_PATH"]
                .into_iter()
                .filter(|v| env_value(&j["spec"]["template"]["spec"]["containers"][0], v).is_some())
        })
        .collect();
    assert_eq!(
        destinations.len(),
        2,
        "a template for DVCR and one for a PVC"
    );
    for job in &jobs {
        let problems = importer_job_problems(job, &known);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn the_import_job_check_finds_a_misspelt_variable_a_missing_one_and_an_unmounted_path() {
    let known = importer_variables();
    let job = importer_jobs()
        .into_iter()
        .find(|j| {
            env_value(
                &j["spec"]["template"]["spec"]["containers"][0],
                "IMPORTER_DESTINATION_PATH",
            )
            .is_some()
        })
        .unwrap();
    let mut broken = job.clone();
    let env = broken["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    env.retain(|e| e["name"] != "IMPORTER_ENDPOINT");
    env.push(json!({"name": "IMPORTER_SORCE_URL", "value": "x"}));
    for e in env.iter_mut() {
        if e["name"] == "IMPORTER_DESTINATION_PATH" {
            e["value"] = json!("/disk");
        }
    }
    let problems = importer_job_problems(&broken, &known).join("\n");
    assert!(
        problems.contains("does not read IMPORTER_SORCE_URL"),
        "{problems}"
    );
    assert!(problems.contains("needs IMPORTER_ENDPOINT"), "{problems}");
    assert!(problems.contains("/disk is not a mounted"), "{problems}");
}

// --- flags and variables of dvcr and dvcr-uploader ----------------------------------------

/// A container that runs one of our binaries: the binary, its arguments, and the variables
/// it gets (`env` and the keys of the ConfigMaps of `envFrom`, found in `docs`).
#[derive(Debug)]
struct Invocation {
    origin: String,
    binary: &'static str,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
    container: Value,
}

fn invocations(origin: &str, docs: &[Value]) -> Vec<Invocation> {
    let mut found = Vec::new();
    for doc in docs {
        let Some(spec) = pod_spec(doc) else { continue };
        for container in spec["containers"].as_array().into_iter().flatten() {
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            };
            let command = strings(&container["command"]);
            // The image's ENTRYPOINT is ["dvcr"] (the Dockerfile test checks it).
            let program = command.first().map_or("dvcr", String::as_str);
            let binary = match program {
                "dvcr" => DVCR,
                "dvcr-uploader" => UPLOADER,
                _ => continue,
            };
            let mut args: Vec<String> = command.iter().skip(1).cloned().collect();
            args.extend(strings(&container["args"]));
            let mut env: Vec<(String, Option<String>)> = Vec::new();
            for from in container["envFrom"].as_array().into_iter().flatten() {
                let name = &from["configMapRef"]["name"];
                let map = docs
                    .iter()
                    .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == *name)
                    .unwrap_or_else(|| {
                        panic!("{origin}: envFrom names ConfigMap {name}, which is not in it")
                    });
                for (k, v) in map["data"].as_object().into_iter().flatten() {
                    env.push((k.clone(), v.as_str().map(str::to_owned)));
                }
            }
            for e in container["env"].as_array().into_iter().flatten() {
                env.push((
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().map(str::to_owned),
                ));
            }
            found.push(Invocation {
                origin: format!("{origin} {} {}", doc["kind"], doc["metadata"]["name"]),
                binary,
                args,
                env,
                container: container.clone(),
            });
        }
    }
    found
}

fn all_invocations() -> Vec<Invocation> {
    manifest_sets()
        .iter()
        .flat_map(|(name, yaml)| invocations(name, &documents(yaml)))
        .collect()
}

/// `<binary> <args> --help`: clap refuses an unknown flag, or a value it cannot parse,
/// before it prints the help.
fn accepts(binary: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The `[env: NAME=]` variables of a help text.
fn help_variables(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_flag_and_variable_the_manifests_give_dvcr_and_the_uploader_is_accepted() {
    let found = all_invocations();
    let origins: Vec<&str> = found.iter().map(|i| i.origin.as_str()).collect();
    assert!(
        origins.iter().any(|o| o.contains("deploy/base")),
        "{origins:?}"
    );
    assert!(
        origins.iter().any(|o| o.contains("deploy/s3")),
        "{origins:?}"
    );
    assert!(
        origins.iter().any(|o| o.contains("uploader.yaml")),
        "{origins:?}"
    );
    for inv in &found {
        let help = accepts(inv.binary, &inv.args).unwrap_or_else(|e| {
            panic!(
                "{}: `{} {}` is refused:\n{e}",
                inv.origin,
                inv.binary,
                inv.args.join(" ")
            )
        });
        let mut known = help_variables(&help);
        known.insert("DVCR_LOG".into());
        if inv.args.first().map(String::as_str) == Some("serve") && inv.binary == DVCR {
            known.extend(SERVE_EXTRA_ENV.map(str::to_owned));
        }
        for (name, _) in &inv.env {
            assert!(
                known.contains(name),
                "{}: {name} is not a variable `{} {}` reads (it reads {known:?})",
                inv.origin,
                inv.binary,
                inv.args.first().map_or("", String::as_str)
            );
        }
    }
}

#[test]
fn the_flag_check_refuses_an_unknown_flag_and_a_bad_value() {
    let ok = accepts(DVCR, &["serve".into(), "--root".into(), "/x".into()]);
    assert!(ok.is_ok(), "{ok:?}");
    let unknown = accepts(DVCR, &["serve".into(), "--rooot".into(), "/x".into()]);
    assert!(unknown.unwrap_err().contains("--rooot"));
    let bad = accepts(
        UPLOADER,
        &["serve".into(), "--listen".into(), "nowhere".into()],
    );
    assert!(bad.unwrap_err().contains("nowhere"));
    assert!(!help_variables(&accepts(DVCR, &["serve".into()]).unwrap()).is_empty());
}

/// A server started from a manifest's container, on loopback; killed when dropped.
struct Started {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `inv` as the manifest says, with each mounted path moved into a scratch
/// directory and `--listen` moved to a free loopback port; waits for `listening on`.
fn start(inv: &Invocation, files: &[(&str, &str)]) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let mounts: Vec<String> = inv.container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .collect();
    let local = |value: &str| -> String {
        for m in &mounts {
            if let Some(rest) = value.strip_prefix(m.as_str()) {
                let moved = dir.path().join(m.trim_start_matches('/'));
                std::fs::create_dir_all(&moved).unwrap();
                return format!("{}{rest}", moved.display());
            }
        }
        value.to_owned()
    };
    for (path, content) in files {
        let p = PathBuf::from(local(path));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let mut args = Vec::new();
    let mut it = inv.args.iter();
    while let Some(a) = it.next() {
        args.push(local(a));
        if a == "--listen" {
            it.next();
            args.push("127.0.0.1:0".into());
        }
    }
    let mut cmd = Command::new(inv.binary);
    cmd.args(&args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in &inv.env {
        if let Some(v) = v {
            cmd.env(k, local(v));
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!(
            "{}: `{} {}` did not start",
            inv.origin,
            inv.binary,
            args.join(" ")
        );
    };
    Started {
        child,
        addr,
        _dir: dir,
    }
}

/// The HTTP status of `GET http://addr/path` (by the real curl).
fn get_status(addr: &str, path: &str) -> String {
    let url = format!("http://{addr}{path}");
    let out = output(
        Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]),
        "curl",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probe_paths(container: &Value) -> Vec<String> {
    ["readinessProbe", "livenessProbe", "startupProbe"]
        .iter()
        .filter_map(|p| container[p]["httpGet"]["path"].as_str())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_filesystem_registry_starts_with_the_base_settings_and_answers_its_probes() {
    let docs = documents(&render(&repo().join("deploy/base")));
    let found = invocations("deploy/base", &docs);
    let [inv] = found.as_slice() else {
        panic!("one dvcr container expected: {found:?}")
    };
    let paths = probe_paths(&inv.container);
    assert!(
        paths.len() >= 2,
        "readiness and liveness over HTTP: {paths:?}"
    );
    let server = start(inv, &[]);
    for path in &paths {
        assert_eq!(get_status(&server.addr, path), "200", "probe {path}");
    }
    // The probes are not a catch-all: an unknown path is refused.
    assert_eq!(get_status(&server.addr, "/readyz-nonexistent"), "404");
}

#[test]
fn the_uploader_pod_starts_with_its_settings_and_answers_its_probes() {
    let docs = documents(&read("deploy/uploader.yaml"));
    let found = invocations("deploy/uploader.yaml", &docs);
    let [inv] = found.as_slice() else {
        panic!("one dvcr-uploader container expected: {found:?}")
    };
    let key_file = inv
        .args
        .iter()
        .skip_while(|a| *a != "--key-file")
        .nth(1)
        .expect("the uploader is given --key-file");
    let paths = probe_paths(&inv.container);
    assert!(paths.contains(&"/upload".to_owned()), "{paths:?}");
    let server = start(inv, &[(key_file, "0123456789abcdef0123456789abcdef\n")]);
    for path in &paths {
        assert_eq!(get_status(&server.addr, path), "200", "probe {path}");
    }
}

// --- the Dockerfile ------------------------------------------------------------------------

/// The Dockerfile's instructions: (KEYWORD, rest), continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut joined = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && joined.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            joined.push_str(head);
            joined.push(' ');
            continue;
        }
        joined.push_str(t);
        let full = std::mem::take(&mut joined);
        if let Some((kw, rest)) = full.split_once(char::is_whitespace) {
            out.push((kw.to_ascii_uppercase(), rest.trim().to_owned()));
        }
    }
    out
}

/// The `[[bin]]` names of dvcr/Cargo.toml.
fn bin_names() -> Vec<String> {
    let manifest = read("dvcr/Cargo.toml");
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_bin = t == "[[bin]]";
        } else if in_bin && let Some(v) = t.strip_prefix("name") {
            names.push(
                v.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_owned(),
            );
        }
    }
    names
}

/// The workspace members of the root Cargo.toml.
fn workspace_members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dockerfile_builds_every_binary_and_runs_them_as_uid_107() {
    let instructions = dockerfile();
    let of = |kw: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let runs = of("RUN").join("\n");
    assert!(
        runs.contains("cargo build --release --locked -p dvcr --bins"),
        "{runs}"
    );
    let bins = bin_names();
    for known in ["dvcr", "dvcr-importer", "dvcr-uploader"] {
        assert!(bins.iter().any(|b| b == known), "{known} not in {bins:?}");
    }
    let copies = of("COPY");
    let into_image = copies
        .iter()
        .find(|c| c.contains("/usr/local/bin/"))
        .expect("a COPY into /usr/local/bin");
    for bin in &bins {
        assert!(
            runs.contains(&format!("target/release/{bin} "))
                || runs.contains(&format!("target/release/{bin}\n")),
            "{bin} is not taken from the build: {runs}"
        );
        assert!(
            into_image
                .split_whitespace()
                .any(|w| w.ends_with(&format!("/{bin}"))),
            "{bin} is not copied into the image: {into_image}"
        );
    }

    // The last USER is numeric, not root, and the uid the artifacts' disk files belong to.
    let user = *of("USER").last().expect("a USER instruction");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let uid: u32 = uid.parse().expect("a numeric uid (runAsNonRoot needs one)");
    let gid: u32 = gid.parse().expect("a numeric gid");
    assert!(uid != 0 && gid != 0);
    let artifact = read("importer/src/artifact.rs");
    assert!(
        artifact.contains(&format!("const OWNER: u64 = {uid};")),
        "the image's uid {uid} differs from the artifact owner"
    );

    // The entrypoint and default command the manifests rely on.
    assert_eq!(of("ENTRYPOINT").last().copied(), Some(r#"["dvcr"]"#));
    let cmd = *of("CMD").last().unwrap();
    assert!(cmd.contains(r#""--listen", "0.0.0.0:5000""#), "{cmd}");
    assert_eq!(of("EXPOSE").last().copied(), Some("5000"));
    let cmd_args: Vec<String> = serde_json::from_str(cmd).unwrap();
    accepts(DVCR, &cmd_args).unwrap();

    // The builder is the workspace's Rust version on bookworm, like the runtime base.
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let args = of("ARG").join("\n");
    assert!(
        args.contains(&format!("RUST_IMAGE=rust:{rust_version}-bookworm")),
        "{args}"
    );
    assert!(
        args.contains("RUNTIME_IMAGE=debian:bookworm-slim"),
        "{args}"
    );
}

#[test]
fn every_file_the_dockerfile_copies_exists_and_is_in_the_build_context() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let excluded = |path: &str| {
        ignored.iter().any(|pattern| {
            if let Some(suffix) = pattern.strip_prefix("**/*") {
                path.ends_with(suffix)
            } else {
                path == pattern || path.starts_with(&format!("{pattern}/"))
            }
        })
    };
    let mut sources = BTreeSet::new();
    for (kw, rest) in dockerfile() {
        if kw != "COPY" || rest.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            sources.insert(src.trim_start_matches("./").to_owned());
        }
    }
    // Every workspace member's manifest and sources are copied, or cargo cannot load it.
    for member in workspace_members() {
        assert!(
            sources.contains(&format!("{member}/Cargo.toml")),
            "{member}/Cargo.toml"
        );
        assert!(sources.contains(&member), "{member}");
    }
    for src in &sources {
        assert!(repo().join(src).exists(), "COPY {src}: no such file");
        assert!(
            !excluded(src),
            "COPY {src}: .dockerignore leaves it out of the context"
        );
    }
    assert!(excluded("target") && excluded("dvcr/tests/x.qcow2"));
}
