//! `dvcr import --from SRC --to DEST`: the importer on the command line, with a progress bar
//! on a terminal and a one-line JSON summary for scripts.
//!
//! SRC: an `http(s)://` URL, `docker://host/repo:tag` (any registry, DVCR included), a file
//! or block device (an existing disk), `-` for standard input, or `blank:<size>`.
//! DEST: `docker://host/repo:tag` (a DVCR artifact), or a block device, file, or directory
//! (then `<dir>/disk.img`) for a disk.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dvcr_importer::oci::{Platform, Reference, RegistryOptions};
use dvcr_importer::report::Progress;
use dvcr_importer::source::HttpOptions;
use dvcr_importer::{Destination, DiskFormat, ImportError, Job, Source};

use crate::ui::{bar_style, binary_size, progress_bar};

/// Arguments of `dvcr import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the image comes from: an http(s) URL, docker://host/repo:tag, a file or block
    /// device, `-` for standard input, or blank:<size>.
    #[arg(long)]
    from: String,

    /// Where it goes: docker://host/repo:tag (stored as a DVCR artifact), or a block
    /// device, a file, or a directory (`disk.img` inside) to fill as a disk.
    #[arg(long)]
    to: String,

    /// Checksums of the source as downloaded, e.g. sha256:<hex>,md5:<hex>; a mismatch fails
    /// the import and nothing is published.
    #[arg(long)]
    checksum: Option<String>,

    /// Disk target: raw (block device or sparse file) or qcow2.
    #[arg(long, default_value = "raw")]
    target_format: String,

    /// Disk target: its size (e.g. 20G), at least the image's unpacked size.
    #[arg(long)]
    size: Option<String>,

    /// Disk target: the block device already reads zero everywhere.
    #[arg(long)]
    target_is_zero: bool,

    /// HTTP basic auth user for the source (the password from DVCR_SOURCE_PASSWORD).
    #[arg(long)]
    user: Option<String>,

    /// docker config.json with credentials for the source registry.
    #[arg(long)]
    auth_config: Option<PathBuf>,

    /// docker config.json with credentials for the destination registry.
    #[arg(long)]
    dest_auth_config: Option<PathBuf>,

    /// Directory of extra CA certificates (PEM) for the source.
    #[arg(long)]
    ca_dir: Option<PathBuf>,

    /// The source may use any certificate (and a registry plain HTTP).
    #[arg(long)]
    insecure: bool,

    /// The destination registry may use any certificate or plain HTTP.
    #[arg(long)]
    dest_insecure: bool,

    /// Platform to pick from a multi-platform image, os/arch[/variant].
    #[arg(long, default_value = "linux/amd64")]
    platform: String,

    /// Scratch directory (only compressed sources into DVCR, and images whose tables come
    /// after their data when the source has no random access, use it).
    #[arg(long, env = "DVCR_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,

    /// The most scratch space to use (e.g. 50G); a compressed source whose unpacked image
    /// is larger fails with a clear error instead of filling the disk.
    #[arg(long)]
    scratch_limit: Option<String>,

    /// Print a one-line JSON summary on standard output.
    #[arg(long)]
    json: bool,
}

fn strip_docker(s: &str) -> Option<&str> {
    s.strip_prefix("docker://")
}

fn job(args: &Args) -> Result<Job, ImportError> {
    let platform =
        Platform::parse(&args.platform).map_err(|e| ImportError::config(e.to_string()))?;
    let source = if let Some(reference) = strip_docker(&args.from) {
        Source::Registry {
            reference: Reference::parse(reference)
                .map_err(|e| ImportError::config(e.to_string()))?,
            options: RegistryOptions {
                auth_config: args.auth_config.clone(),
                ca_dir: args.ca_dir.clone(),
                insecure: args.insecure,
                platform: platform.clone(),
                local: None,
            },
        }
    } else if let Some(size) = args.from.strip_prefix("blank:") {
        Source::Blank(dvcr_importer::env::parse_size(size).ok_or_else(|| {
            ImportError::config(format!("blank:{size}: not a size (e.g. blank:10G)"))
        })?)
    } else if args.from == "-" {
        Source::Stdin
    } else if args.from.starts_with("http://") || args.from.starts_with("https://") {
        let basic_auth = match &args.user {
            Some(user) => Some((
                user.clone(),
                std::env::var("DVCR_SOURCE_PASSWORD").map_err(|_| {
                    ImportError::config("--user needs the password in DVCR_SOURCE_PASSWORD")
                })?,
            )),
            None => None,
        };
        Source::Http {
            url: args.from.clone(),
            options: HttpOptions {
                basic_auth,
                ca_dir: args.ca_dir.clone(),
                insecure_tls: args.insecure,
                ..HttpOptions::default()
            },
        }
    } else {
        Source::Path(PathBuf::from(&args.from))
    };
    let destination = if let Some(reference) = strip_docker(&args.to) {
        Destination::Registry {
            reference: Reference::parse(reference)
                .map_err(|e| ImportError::config(e.to_string()))?,
            options: RegistryOptions {
                auth_config: args.dest_auth_config.clone(),
                ca_dir: None,
                insecure: args.dest_insecure,
                platform,
                local: None,
            },
        }
    } else {
        Destination::Disk {
            path: PathBuf::from(&args.to),
            format: match args.target_format.as_str() {
                "raw" => DiskFormat::Raw,
                "qcow2" => DiskFormat::Qcow2,
                other => {
                    return Err(ImportError::config(format!(
                        "--target-format {other}: use raw or qcow2"
                    )));
                }
            },
            size: match &args.size {
                Some(s) => Some(dvcr_importer::env::parse_size(s).ok_or_else(|| {
                    ImportError::config(format!("--size {s}: not a size (e.g. 20G)"))
                })?),
                None => None,
            },
            target_is_zero: args.target_is_zero,
        }
    };
    let mut job = Job::new(source, destination);
    if let Some(spec) = &args.checksum {
        job.checksums =
            dvcr_importer::checksum::parse(spec).map_err(|e| ImportError::config(e.to_string()))?;
    }
    job.scratch_dir = args.scratch_dir.clone();
    if let Some(limit) = &args.scratch_limit {
        job.scratch_limit = Some(dvcr_importer::env::parse_size(limit).ok_or_else(|| {
            ImportError::config(format!("--scratch-limit {limit}: not a size (e.g. 50G)"))
        })?);
    }
    Ok(job)
}

/// Runs `dvcr import`.
pub fn run(args: &Args) -> ExitCode {
    let result = job(args).and_then(|mut job| {
        let progress = Arc::new(Progress::new());
        job.progress = Arc::clone(&progress);
        let bar = progress_bar();
        // The bar is updated ten times a second until `done` is dropped, which wakes the
        // ticker at once (a plain sleep kept every import up to 100 ms past its end).
        let (done, stop) = std::sync::mpsc::channel::<()>();
        let ticker = {
            let (bar, progress) = (bar.clone(), Arc::clone(&progress));
            std::thread::spawn(move || {
                let mut sized = false;
                loop {
                    if let (false, Some(total)) = (sized, progress.total()) {
                        bar.set_length(total);
                        bar.set_style(bar_style());
                        sized = true;
                    }
                    bar.set_position(progress.read());
                    match stop.recv_timeout(Duration::from_millis(100)) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })
        };
        let outcome = dvcr_importer::run(job);
        drop(done);
        let _ = ticker.join();
        bar.finish_and_clear();
        outcome.map(|o| (o, progress.elapsed()))
    });
    match result {
        Ok((outcome, elapsed)) => {
            if args.json {
                let mut value = serde_json::to_value(&outcome).unwrap_or_default();
                value["seconds"] = serde_json::json!(elapsed.as_secs_f64());
                println!("{value}");
            } else {
                eprintln!(
                    "{}: {} {} ({} stored{}{}), {:.1}s",
                    outcome.destination,
                    outcome.format,
                    binary_size(outcome.virtual_size),
                    binary_size(outcome.stored_size),
                    if outcome.mounted { ", mounted" } else { "" },
                    if outcome.scratch_bytes > 0 {
                        format!(", {} scratch", binary_size(outcome.scratch_bytes))
                    } else {
                        String::new()
                    },
                    elapsed.as_secs_f64()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"error": e.message(), "kind": e.kind.name(), "transient": e.transient})
                );
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
