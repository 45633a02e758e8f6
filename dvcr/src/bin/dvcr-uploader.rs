//! `dvcr-uploader`: the per-image upload server (`serve`) and the signed upload URLs it
//! accepts (`url`). The protocol and `curl` recipes are in the `dvcr_uploader` crate docs.
//!
//! `serve` prints `listening on ADDR` as its first line of standard output, receives one
//! image, writes the importer's final report to `--termination-log`, and exits 0 after
//! `--wait-timeout` without an upload (the report carries the reason) or on SIGTERM.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dvcr_importer::oci::RegistryOptions;
use dvcr_uploader::{Config, Signer, Target, Uploader};

#[derive(Debug, Parser)]
#[command(
    name = "dvcr-uploader",
    version,
    about = "Receive one disk image by HTTP upload"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the upload endpoints until the image is stored (or nothing came in time).
    Serve(Serve),
    /// Print signed upload URLs as JSON: {"external": ..., "inCluster": ...}.
    Url(Url),
}

#[derive(Debug, Args)]
struct Key {
    /// A file holding the HMAC key that signs upload URLs (at least 16 bytes).
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// The HMAC key itself (used when --key-file is not given).
    #[arg(
        long = "key",
        env = "UPLOADER_KEY",
        hide_env_values = true,
        hide = true
    )]
    key: Option<String>,
}

impl Key {
    fn signer(&self) -> anyhow::Result<Signer> {
        let key = match (&self.key_file, &self.key) {
            (Some(path), _) => {
                return dvcr_uploader::token::load_key(path).map_err(anyhow::Error::msg);
            }
            (None, Some(key)) => key.trim().as_bytes().to_vec(),
            (None, None) => bail!("no signing key: give --key-file PATH or set UPLOADER_KEY"),
        };
        Ok(Signer::new(&key)?)
    }
}

#[derive(Debug, Args)]
struct Serve {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    key: Key,
    /// The DVCR registry (host:port); the image goes to <registry>/<token destination>.
    #[arg(long, required_unless_present = "disk", conflicts_with = "disk")]
    registry: Option<String>,
    /// Allow plain HTTP and any certificate when talking to the registry.
    #[arg(long)]
    insecure: bool,
    /// A docker config.json with credentials for the registry.
    #[arg(long, value_name = "PATH")]
    auth_config: Option<PathBuf>,
    /// Write the image to this disk (file, block device or directory) instead of DVCR.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Where scratch data goes: a compressed upload is measured there before it is stored
    /// (received bytes themselves go straight through the pipeline).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Checksums the upload must match: algorithm:hex[,algorithm:hex].
    #[arg(long)]
    checksum: Option<String>,
    /// Largest accepted upload (bytes, or with K, M, G, T suffixes: 1024-based).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Fail when no upload started within this time (e.g. 10m, 90s, 1h; 0 = never).
    #[arg(long, default_value = "10m")]
    wait_timeout: String,
    /// Where the final report (one line of JSON) is written.
    #[arg(long, value_name = "PATH")]
    termination_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Url {
    #[command(flatten)]
    key: Key,
    /// The image the URL uploads to: repository:tag, e.g. vi/ns/name:uid.
    #[arg(long)]
    dest: String,
    /// How long the URL stays valid (e.g. 1h, 30m, 600s).
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// The public base URL, e.g. https://uploads.example.com.
    #[arg(long)]
    external_base: Option<String>,
    /// The in-cluster base URL, e.g. http://uploader.ns.svc.
    #[arg(long)]
    in_cluster_base: Option<String>,
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    dvcr_uploader::token::parse_duration(text).map_err(anyhow::Error::msg)
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    dvcr_importer::env::parse_size(text)
        .with_context(|| format!("{text:?} is not a size; write e.g. 512M or 10G (1024-based)"))
}

fn url(args: &Url) -> anyhow::Result<()> {
    let signer = args.key.signer()?;
    let json = dvcr_uploader::token::mint(
        &signer,
        &args.dest,
        parse_duration(&args.ttl)?,
        args.external_base.as_deref(),
        args.in_cluster_base.as_deref(),
    )?;
    println!("{json}");
    Ok(())
}

fn serve(args: Serve) -> anyhow::Result<()> {
    let signer = args.key.signer()?;
    let target = match (&args.registry, &args.disk) {
        (_, Some(disk)) => Target::Disk(disk.clone()),
        (Some(registry), None) => Target::Registry {
            registry: registry.clone(),
            options: RegistryOptions {
                auth_config: args.auth_config.clone(),
                insecure: args.insecure,
                ..RegistryOptions::default()
            },
        },
        (None, None) => bail!("give --registry HOST:PORT or --disk PATH"),
    };
    let checksums = match &args.checksum {
        Some(spec) => dvcr_importer::checksum::parse(spec)?,
        None => Vec::new(),
    };
    let max_size = args.max_size.as_deref().map(parse_size).transpose()?;
    let wait = parse_duration(&args.wait_timeout)?;
    let spool_dir = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    if !spool_dir.is_dir() {
        bail!(
            "the spool directory {} does not exist; create it or give --spool-dir",
            spool_dir.display()
        );
    }
    let uploader = Uploader::new(Config {
        signer,
        target,
        checksums,
        max_size,
        spool_dir,
        termination_log: args.termination_log.clone(),
        wait_timeout: (!wait.is_zero()).then_some(wait),
    });
    dvcr_importer::chunk::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let bound = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {bound}")?;
            out.flush()?;
        }
        tracing::info!(%bound, "serving uploads");
        uploader.spawn_wait_timeout();
        let app = dvcr_uploader::router(uploader.clone());
        let stop = async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = uploader.exit_requested() => tracing::info!("exiting: no upload came in time"),
                _ = tokio::signal::ctrl_c() => tracing::info!("exiting on interrupt"),
                () = terminated => tracing::info!("exiting on SIGTERM"),
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .context("serving")
    })
}

fn main() -> ExitCode {
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Url(args) => url(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
