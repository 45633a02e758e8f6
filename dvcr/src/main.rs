//! The `dvcr` command: one binary for every job of the project.
//!
//! `serve` runs DVCR (the registry), `import` fills DVCR or a disk from any source in one
//! pass, `convert` turns any image into a ready disk, `inspect` names an image's format and
//! sizes, and `gc` frees unreachable blobs. `dvcr-importer` (the job binary) is `import`
//! configured by the platform's environment variables.

mod convert;
mod import;
mod inspect;
mod registry;
mod ui;
mod upload_url;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dvcr: a disk-image pipeline for Kubernetes virtualization (registry, importer, uploader).
#[derive(Debug, Parser)]
#[command(name = "dvcr", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `debug`, `dvcr_formats=trace`).
    #[arg(long, global = true, env = "DVCR_LOG", default_value = "warn")]
    log: String,

    /// Log format on stderr: `auto` is human-readable on a terminal and JSON lines
    /// otherwise (for log collectors).
    #[arg(long, global = true, env = "DVCR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Detect a disk image's format, virtual size, compression and cdrom flag.
    ///
    /// Reads a file (only its headers, unless it is compressed), standard input (`-`) or an
    /// http(s) URL (one streaming pass). Refuses unsafe images (backing files, encryption,
    /// external data, damaged tables) with an explanation and exit code 1.
    Inspect(inspect::Args),

    /// Convert a disk image to a ready raw disk (sparse file or block device) or qcow2 file.
    ///
    /// Reads the source once, from a file, standard input (`-`) or an http(s) URL; unwraps
    /// gzip/xz/zstd/bzip2; decodes qcow2, vmdk, vdi, vhd, vhdx, iso or raw on the way; writes
    /// only non-zero data and fsyncs before it reports success.
    Convert(convert::Args),

    /// Import an image into DVCR or onto a disk, in one streaming pass.
    ///
    /// From an http(s) URL (checksums verified on the way, resumed after a dropped
    /// connection), a container image (docker://host/repo:tag, the file under /disk/), an
    /// existing disk or file, standard input, or blank:<size>; to a DVCR artifact
    /// (docker://host/repo:tag, the tag pushed last) or a disk (block device, file, or a
    /// directory's disk.img), fsynced before success.
    Import(import::Args),

    /// Serve the registry: OCI Distribution v1.1 over HTTP(S), storing under --root.
    ///
    /// Prints `listening on <addr>` once bound, then serves until SIGTERM or SIGINT.
    Serve(registry::ServeArgs),

    /// Free the registry's blobs that no manifest reaches (offline: the server must be
    /// stopped; `dvcr serve --gc-interval` collects online).
    ///
    /// Keeps every manifest (tagged or not, unless --delete-untagged) with its config,
    /// layers, index children and referrers, and every blob younger than --grace.
    Gc(registry::gc::GcArgs),

    /// Ask a running `dvcr serve --upload-key-file ...` for a signed, expiring upload URL.
    ///
    /// Prints `{"external": ..., "inCluster": ..., "token": ..., "expiresAt": ...}`; both URLs
    /// take `curl -T image.qcow2 URL` (and `curl -C N -T` to resume).
    UploadUrl(upload_url::Args),
}

/// How diagnostics are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into());
    let json = match cli.log_format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Import(args) => import::run(&args),
        Command::Serve(args) => registry::run(&args),
        Command::Gc(args) => registry::gc::run(&args),
        Command::UploadUrl(args) => upload_url::run(&args),
    }
}
