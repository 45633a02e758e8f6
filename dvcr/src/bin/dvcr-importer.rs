//! `dvcr-importer`: the one-shot import job as the platform runs it, configured only by
//! the contract's environment variables (see `dvcr_importer::env`).
//!
//! It serves the progress gauges while it works, writes the final report as one line of
//! JSON to the termination-message file, and exits 0 on success and on permanent errors
//! (the report carries the error, so the controller shows it instead of restarting the
//! pod), non-zero on transient errors (so the Job retries).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use dvcr_importer::report::{FinalReport, serve_gauges};

/// What `--help` prints: the job takes no arguments, only the environment.
const HELP: &str = "\
dvcr-importer: one import, configured only by environment variables (the platform's job
contract); the final report is one JSON line in IMPORTER_TERMINATION_LOG.

Variables (the full table: importer/src/env.rs):
  IMPORTER_SOURCE                 http | registry | dvcr | blockDevice | filesystem | blank
  IMPORTER_ENDPOINT               the URL, image reference, device, path, or blank size
  IMPORTER_DESTINATION_ENDPOINT   the DVCR image to create (host/repo:tag), or
  IMPORTER_DESTINATION_PATH       a block device or a filesystem mount (disk.img inside)
  IMPORTER_DESTINATION_FORMAT     raw (default) | qcow2
  IMPORTER_DESTINATION_SIZE       the disk size (Kubernetes quantity)
  IMPORTER_DESTINATION_IS_ZERO    true: the block device reads zero
  IMPORTER_CHECKSUMS              sha256:<hex>,md5:<hex>,...
  IMPORTER_ACCESS_KEY_ID, IMPORTER_SECRET_KEY      basic auth for HTTP
  IMPORTER_AUTH_CONFIG, IMPORTER_DESTINATION_AUTH_CONFIG   docker config.json files
  IMPORTER_CERT_DIR               extra CA certificates for the source
  IMPORTER_DESTINATION_CERT_DIR   extra CA certificates for DVCR
  IMPORTER_INSECURE_TLS, DESTINATION_INSECURE_TLS  any certificate or plain HTTP
  IMPORTER_SCRATCH_DIR, IMPORTER_SCRATCH_LIMIT     scratch space for compressed sources
  IMPORTER_PLATFORM               os/arch[/variant] from an image index
  OWNER_UID                       the ownerUID label of the gauges
  IMPORTER_METRICS_ADDR           where /metrics is served (default 0.0.0.0:8443; off)
  IMPORTER_TERMINATION_LOG        the report file (default /dev/termination-log)
  DVCR_LOG                        log filter (default info)

Exit status: 0 on success and on permanent errors (in the report), non-zero on transient
errors (the Job retries). For interactive use, see `dvcr import --help`.
";

fn main() -> ExitCode {
    // The job takes no arguments; answer the usual questions instead of starting an
    // import that fails for want of its variables.
    if let Some(arg) = std::env::args().nth(1) {
        return match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                ExitCode::SUCCESS
            }
            "-V" | "--version" => {
                println!("dvcr-importer {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            other => {
                eprintln!(
                    "dvcr-importer takes no arguments (got {other:?}): it is configured by \
                     IMPORTER_* environment variables; --help lists them"
                );
                ExitCode::from(2)
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DVCR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        logs.init();
    } else {
        logs.json().init();
    }

    let (job, reporting) = match dvcr_importer::env::from_env(|k| std::env::var(k).ok()) {
        Ok(parsed) => parsed,
        Err(e) => {
            // A misconfiguration (often the user's input: a checksum, an image reference)
            // does not heal on retry: report it like any permanent error.
            tracing::error!(error = %e, "the job is misconfigured");
            let log = std::env::var_os("IMPORTER_TERMINATION_LOG")
                .filter(|v| !v.is_empty())
                .map_or_else(|| "/dev/termination-log".into(), std::path::PathBuf::from);
            let report = FinalReport {
                error_message: Some(e.to_string()),
                ..FinalReport::default()
            };
            return match report.write_to(&log) {
                Ok(()) => ExitCode::SUCCESS,
                Err(write) => {
                    eprintln!(
                        "error: {e}; the report could not be written to {}: {write}",
                        log.display()
                    );
                    ExitCode::from(2)
                }
            };
        }
    };
    let progress = Arc::clone(&job.progress);
    if let Some(addr) = reporting.metrics_addr {
        match serve_gauges(addr, &reporting.owner_uid, Arc::clone(&progress)) {
            Ok(bound) => tracing::info!(%bound, "serving progress gauges on /metrics"),
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve the progress gauges"),
        }
    }
    tracing::info!(source = ?job.source, destination = ?job.destination, "import starting");
    let result = dvcr_importer::run(job);
    let elapsed = progress.elapsed();
    let mut report = FinalReport {
        duration: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        average_speed: progress.average_speed(),
        bytes_read: progress.read(),
        ..FinalReport::default()
    };
    let code = match &result {
        Ok(outcome) => {
            report.source_image_size = outcome.stored_size;
            report.source_image_virtual_size = outcome.virtual_size;
            report.source_image_format = outcome.format.clone();
            report.cdrom = outcome.cdrom;
            report.scratch_bytes = outcome.scratch_bytes;
            report.destination = outcome.destination.clone();
            tracing::info!(?outcome, seconds = elapsed.as_secs_f64(), "import done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            report.error_message = Some(e.to_string());
            if e.transient {
                tracing::error!(error = %e, kind = e.kind.name(), "import failed; a retry may succeed");
                ExitCode::FAILURE
            } else {
                tracing::error!(error = %e, kind = e.kind.name(), "import failed for good");
                ExitCode::SUCCESS
            }
        }
    };
    if let Err(e) = report.write_to(&reporting.termination_log) {
        // Without the report the outcome is lost: let the Job see a failure either way.
        tracing::error!(path = %reporting.termination_log.display(), error = %e, "cannot write the final report");
        return ExitCode::FAILURE;
    }
    code
}
