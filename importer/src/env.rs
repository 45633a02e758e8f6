//! The job contract: an import described entirely by environment variables, as the
//! platform's controllers start the importer pod.
//!
//! | variable | meaning |
//! |---|---|
//! | `IMPORTER_SOURCE` | `http`, `registry`, `dvcr`, `blockDevice`, `filesystem` or `blank` |
//! | `IMPORTER_ENDPOINT` | the URL, `docker://image`, or DVCR reference; for `blockDevice` the device (default `/dev/xvda`), for `filesystem` the mount point or file (default `/data/disk.img`); for `blank` the size |
//! | `IMPORTER_DESTINATION_ENDPOINT` | the DVCR image to create (`host/repo:tag`) |
//! | `IMPORTER_DESTINATION_PATH` | instead of DVCR: a block device or a filesystem mount (`disk.img` inside) |
//! | `IMPORTER_DESTINATION_FORMAT` | `raw` (default) or `qcow2`, for a disk destination |
//! | `IMPORTER_DESTINATION_SIZE` | the disk's size (bytes or with K/M/G/T), at least the unpacked size |
//! | `IMPORTER_DESTINATION_IS_ZERO` | `true`: the block device already reads zero |
//! | `IMPORTER_CHECKSUMS` | `sha256:<hex>,md5:<hex>` |
//! | `IMPORTER_ACCESS_KEY_ID` / `IMPORTER_SECRET_KEY` | basic auth for HTTP |
//! | `IMPORTER_AUTH_CONFIG` / `IMPORTER_DESTINATION_AUTH_CONFIG` | docker `config.json` paths |
//! | `IMPORTER_CERT_DIR` | extra CA certificates (PEM files) for the source |
//! | `IMPORTER_DESTINATION_CERT_DIR` | extra CA certificates (PEM files) for DVCR |
//! | `IMPORTER_INSECURE_TLS` | `true`: the source registry may use any certificate or plain HTTP |
//! | `DESTINATION_INSECURE_TLS` | `true`: DVCR may use any certificate or plain HTTP |
//! | `IMPORTER_SCRATCH_DIR` | scratch space (default: the system temp dir) |
//! | `IMPORTER_SCRATCH_LIMIT` | the most scratch bytes (only compressed sources into DVCR use any) |
//! | `IMPORTER_PLATFORM` | `os/arch[/variant]` picked from an image index (default `linux/amd64`) |
//! | `OWNER_UID` | the `ownerUID` label of the gauges |
//! | `IMPORTER_METRICS_ADDR` | where the gauges are served (default `0.0.0.0:8443`) |
//! | `IMPORTER_TERMINATION_LOG` | the final report's file (default `/dev/termination-log`) |

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::ImportError;
use crate::oci::{Platform, Reference, RegistryOptions};
use crate::pipeline::{Destination, DiskFormat, Job, Source};
use crate::source::HttpOptions;

/// Where the job reports, besides doing the import.
#[derive(Debug, Clone)]
pub struct Reporting {
    /// `OWNER_UID`.
    pub owner_uid: String,
    /// Where `/metrics` is served; `None` when disabled (`IMPORTER_METRICS_ADDR=off`).
    pub metrics_addr: Option<SocketAddr>,
    /// The termination-message file.
    pub termination_log: PathBuf,
}

/// Parses a Kubernetes quantity as bytes, the way a PVC's size is written: decimal
/// suffixes `k`, `M`, `G`, `T`, `P` (powers of 1000) and binary ones `Ki`, `Mi`, `Gi`, `Ti`,
/// `Pi` (powers of 1024); plain numbers are bytes. Used for the job's environment, which
/// the platform fills from Kubernetes objects.
pub fn parse_quantity(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return None,
    };
    value.checked_mul(factor).filter(|&b| b <= 1 << 56)
}

/// Parses a size as command-line flags take it, like `qemu-img`: plain bytes or with a
/// K/M/G/T/P suffix in binary units (`G`, `Gi` and `GiB` are all 2^30).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        "p" | "pb" | "pi" | "pib" => 50,
        _ => return None,
    };
    if number.contains('.') {
        let value: f64 = number.parse().ok()?;
        let bytes = value * (1u64 << shift) as f64;
        return (0.0..=(1u64 << 56) as f64)
            .contains(&bytes)
            .then_some(bytes as u64);
    }
    let value: u64 = number.parse().ok()?;
    value.checked_mul(1u64 << shift).filter(|&b| b <= 1 << 56)
}

fn truthy(v: Option<String>) -> bool {
    v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Builds the job and its reporting from variables (`get` is `std::env::var` in the job,
/// a map in tests).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<(Job, Reporting), ImportError> {
    let var = |name: &str| {
        get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let required =
        |name: &str| var(name).ok_or_else(|| ImportError::config(format!("{name} is not set")));
    let kind = required("IMPORTER_SOURCE")?;
    let cert_dir = var("IMPORTER_CERT_DIR").map(PathBuf::from);
    let platform = match var("IMPORTER_PLATFORM") {
        Some(p) => Platform::parse(&p).map_err(|e| ImportError::config(e.to_string()))?,
        None => Platform::default(),
    };
    let source_registry = RegistryOptions {
        auth_config: var("IMPORTER_AUTH_CONFIG").map(PathBuf::from),
        ca_dir: cert_dir.clone(),
        insecure: truthy(var("IMPORTER_INSECURE_TLS")),
        platform: platform.clone(),
        local: None,
    };
    let source = match kind.as_str() {
        "http" => {
            let url = required("IMPORTER_ENDPOINT")?;
            let basic_auth = match (var("IMPORTER_ACCESS_KEY_ID"), get("IMPORTER_SECRET_KEY")) {
                (Some(user), Some(password)) => Some((user, password)),
                (Some(_), None) => {
                    return Err(ImportError::config(
                        "IMPORTER_ACCESS_KEY_ID is set but IMPORTER_SECRET_KEY is not",
                    ));
                }
                _ => None,
            };
            Source::Http {
                url,
                options: HttpOptions {
                    basic_auth,
                    ca_dir: cert_dir,
                    insecure_tls: truthy(var("IMPORTER_INSECURE_TLS")),
                    ..HttpOptions::default()
                },
            }
        }
        "registry" | "dvcr" => {
            let endpoint = required("IMPORTER_ENDPOINT")?;
            let mut options = source_registry;
            if kind == "dvcr" {
                // DVCR is reached like the destination: its credentials and TLS settings.
                if options.auth_config.is_none() {
                    options.auth_config =
                        var("IMPORTER_DESTINATION_AUTH_CONFIG").map(PathBuf::from);
                }
                options.insecure |= truthy(var("DESTINATION_INSECURE_TLS"));
            }
            Source::Registry {
                reference: Reference::parse(&endpoint)
                    .map_err(|e| ImportError::config(e.to_string()))?,
                options,
            }
        }
        "blockDevice" => Source::Path(PathBuf::from(
            var("IMPORTER_ENDPOINT").unwrap_or_else(|| "/dev/xvda".into()),
        )),
        "filesystem" => Source::Path(PathBuf::from(
            var("IMPORTER_ENDPOINT").unwrap_or_else(|| "/data/disk.img".into()),
        )),
        "blank" => {
            let text = var("IMPORTER_ENDPOINT")
                .or_else(|| var("IMPORTER_DESTINATION_SIZE"))
                .ok_or_else(|| {
                    ImportError::config(
                        "a blank disk needs its size in IMPORTER_ENDPOINT or IMPORTER_DESTINATION_SIZE",
                    )
                })?;
            Source::Blank(parse_quantity(&text).ok_or_else(|| {
                ImportError::config(format!("{text:?} is not a size (e.g. 10Gi or 1073741824)"))
            })?)
        }
        other => {
            return Err(ImportError::config(format!(
                "IMPORTER_SOURCE={other:?} is not one of http, registry, dvcr, blockDevice, filesystem, blank"
            )));
        }
    };
    let destination = if let Some(endpoint) = var("IMPORTER_DESTINATION_ENDPOINT") {
        Destination::Registry {
            reference: Reference::parse(&endpoint)
                .map_err(|e| ImportError::config(e.to_string()))?,
            options: RegistryOptions {
                auth_config: var("IMPORTER_DESTINATION_AUTH_CONFIG").map(PathBuf::from),
                ca_dir: var("IMPORTER_DESTINATION_CERT_DIR").map(PathBuf::from),
                insecure: truthy(var("DESTINATION_INSECURE_TLS")),
                platform,
                local: None,
            },
        }
    } else if let Some(path) = var("IMPORTER_DESTINATION_PATH") {
        let format = match var("IMPORTER_DESTINATION_FORMAT").as_deref() {
            None | Some("raw") => DiskFormat::Raw,
            Some("qcow2") => DiskFormat::Qcow2,
            Some(other) => {
                return Err(ImportError::config(format!(
                    "IMPORTER_DESTINATION_FORMAT={other:?}: use raw or qcow2"
                )));
            }
        };
        let size = match var("IMPORTER_DESTINATION_SIZE") {
            Some(t) => Some(parse_quantity(&t).ok_or_else(|| {
                ImportError::config(format!(
                    "IMPORTER_DESTINATION_SIZE={t:?} is not a size (e.g. 10Gi)"
                ))
            })?),
            None => None,
        };
        Destination::Disk {
            path: PathBuf::from(path),
            format,
            size,
            target_is_zero: truthy(var("IMPORTER_DESTINATION_IS_ZERO")),
        }
    } else {
        return Err(ImportError::config(
            "neither IMPORTER_DESTINATION_ENDPOINT (a DVCR image) nor IMPORTER_DESTINATION_PATH (a disk) is set",
        ));
    };
    let mut job = Job::new(source, destination);
    if let Some(spec) = var("IMPORTER_CHECKSUMS") {
        job.checksums =
            crate::checksum::parse(&spec).map_err(|e| ImportError::config(e.to_string()))?;
    }
    job.scratch_dir = var("IMPORTER_SCRATCH_DIR").map(PathBuf::from);
    job.scratch_limit = match var("IMPORTER_SCRATCH_LIMIT") {
        Some(t) => Some(parse_size(&t).ok_or_else(|| {
            ImportError::config(format!(
                "IMPORTER_SCRATCH_LIMIT={t:?} is not a size (e.g. 20Gi)"
            ))
        })?),
        None => None,
    };
    let metrics_addr = match var("IMPORTER_METRICS_ADDR").as_deref() {
        Some("off") => None,
        Some(addr) => Some(addr.parse().map_err(|_| {
            ImportError::config(format!(
                "IMPORTER_METRICS_ADDR={addr:?} is not host:port (e.g. 0.0.0.0:8443) or off"
            ))
        })?),
        None => Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
    };
    let reporting = Reporting {
        owner_uid: var("OWNER_UID").unwrap_or_default(),
        metrics_addr,
        termination_log: var("IMPORTER_TERMINATION_LOG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/termination-log")),
    };
    Ok((job, reporting))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn an_http_import_into_dvcr_reads_every_contract_variable() {
        let (job, reporting) = from_env(env(&[
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_ENDPOINT", "https://example.com/disk.qcow2"),
            (
                "IMPORTER_DESTINATION_ENDPOINT",
                "dvcr.example:5000/vi/ns/name:uid",
            ),
            ("IMPORTER_CHECKSUMS", "md5:098f6bcd4621d373cade4e832627b4f6"),
            ("IMPORTER_ACCESS_KEY_ID", "user"),
            ("IMPORTER_SECRET_KEY", "secret"),
            ("IMPORTER_CERT_DIR", "/certs"),
            ("DESTINATION_INSECURE_TLS", "true"),
            ("OWNER_UID", "1234-abcd"),
        ]))
        .unwrap();
        match &job.source {
            Source::Http { url, options } => {
                assert_eq!(url, "https://example.com/disk.qcow2");
                assert_eq!(
                    options.basic_auth,
                    Some(("user".to_owned(), "secret".to_owned()))
                );
                assert_eq!(options.ca_dir, Some(PathBuf::from("/certs")));
            }
            other => panic!("{other:?}"),
        }
        match &job.destination {
            Destination::Registry { reference, options } => {
                assert_eq!(reference.registry, "dvcr.example:5000");
                assert_eq!(reference.repository, "vi/ns/name");
                assert!(options.insecure);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(job.checksums.len(), 1);
        assert_eq!(reporting.owner_uid, "1234-abcd");
        assert_eq!(
            reporting.termination_log,
            PathBuf::from("/dev/termination-log")
        );
        assert_eq!(reporting.metrics_addr.unwrap().port(), 8443);
    }

    #[test]
    fn a_block_device_source_defaults_to_the_contract_device() {
        let (job, _) = from_env(env(&[
            ("IMPORTER_SOURCE", "blockDevice"),
            ("IMPORTER_DESTINATION_PATH", "/data"),
            ("IMPORTER_DESTINATION_FORMAT", "qcow2"),
            ("IMPORTER_DESTINATION_SIZE", "10Gi"),
        ]))
        .unwrap();
        assert!(matches!(&job.source, Source::Path(p) if p == &PathBuf::from("/dev/xvda")));
        match &job.destination {
            Destination::Disk { format, size, .. } => {
                assert_eq!(*format, DiskFormat::Qcow2);
                assert_eq!(*size, Some(10 << 30));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_or_wrong_variables_are_named_in_the_error() {
        for (pairs, needle) in [
            (vec![], "IMPORTER_SOURCE is not set"),
            (vec![("IMPORTER_SOURCE", "ftp")], "not one of"),
            (
                vec![
                    ("IMPORTER_SOURCE", "http"),
                    ("IMPORTER_ENDPOINT", "http://x/"),
                ],
                "neither IMPORTER_DESTINATION_ENDPOINT",
            ),
            (
                vec![
                    ("IMPORTER_SOURCE", "blank"),
                    ("IMPORTER_ENDPOINT", "ten gigs"),
                    ("IMPORTER_DESTINATION_PATH", "/data"),
                ],
                "is not a size",
            ),
            (
                vec![
                    ("IMPORTER_SOURCE", "http"),
                    ("IMPORTER_ENDPOINT", "http://x/"),
                    ("IMPORTER_DESTINATION_PATH", "/data"),
                    ("IMPORTER_CHECKSUMS", "sha256:abc"),
                ],
                "64 hex digits",
            ),
        ] {
            let e = from_env(env(&pairs)).unwrap_err();
            assert!(!e.transient);
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn quantities_are_read_as_kubernetes_writes_them() {
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("10G"), Some(10_000_000_000));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("2048"), Some(2048));
        assert_eq!(parse_quantity("1.5Gi"), None);
        assert_eq!(parse_quantity("10GB"), None);
        assert_eq!(parse_quantity("99999Pi"), None);
    }

    #[test]
    fn sizes_accept_kubernetes_quantities() {
        assert_eq!(parse_size("10Gi"), Some(10 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1073741824"), Some(1 << 30));
        assert_eq!(parse_size("1.5Ki"), Some(1536));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("99999999999P"), None);
    }
}
