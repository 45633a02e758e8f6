//! `dvcr convert`: any supported image, from a file, standard input or an http(s) URL, to a
//! ready raw disk (sparse file or block device) or a qcow2 file, in one pass over the source.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dvcr_formats::sparse::qcow2::Qcow2Writer;
use dvcr_formats::sparse::{DiskWriter, TargetOptions, Written};
use dvcr_formats::{Decoded, Options, RandomAccess, Sink};
use dvcr_importer::source::{self, Location};
use serde::Serialize;

use crate::ui::{bar_style, binary_size, chain, error_kind, progress_bar};

/// Arguments of `dvcr convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: a file or block device, `-` for standard input, or an http(s) URL. Any
    /// format `dvcr inspect` accepts, bare or compressed.
    src: String,

    /// The target: a block device (written in place) or a file (created or replaced).
    dst: PathBuf,

    /// Write a raw disk (sparse file or block device) or a qcow2 file.
    #[arg(long, value_enum, default_value_t = TargetFormat::Raw)]
    target_format: TargetFormat,

    /// Make the disk this large (bytes, or with a K/M/G/T suffix, binary units); at least
    /// the image's virtual size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,

    /// The block device target already reads zero everywhere: skip zeroing the ranges the
    /// image leaves empty. Never needed for files.
    #[arg(long)]
    target_is_zero: bool,

    /// Directory for scratch files (data that arrives before the tables that place it);
    /// defaults to the system temp dir.
    #[arg(long, env = "DVCR_SCRATCH_DIR")]
    scratch_dir: Option<PathBuf>,

    /// Memory for data that arrives before the tables that place it, before it spills to
    /// the scratch dir (or, for a source that allows random access, is read again later).
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    pending_memory: u64,

    /// Print a one-line JSON summary on standard output.
    #[arg(long)]
    json: bool,
}

/// What the target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetFormat {
    /// A raw disk: sparse file or block device.
    Raw,
    /// A qcow2 file.
    Qcow2,
}

/// The `--json` summary.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Summary {
    format: &'static str,
    virtual_size: u64,
    cdrom: bool,
    compression: Option<&'static str>,
    target_format: &'static str,
    disk_size: u64,
    /// Bytes read from the source as stored (compressed).
    bytes_read: u64,
    /// Bytes of the image inside the compression.
    image_bytes: u64,
    /// Bytes written to the target (zero blocks skipped).
    bytes_written: u64,
    /// Bytes zeroed on a block device.
    bytes_zeroed: u64,
    scratch_bytes: u64,
    seconds: f64,
}

/// Runs `dvcr convert`.
pub fn run(args: &Args) -> ExitCode {
    let started = Instant::now();
    match convert(args) {
        Ok((decoded, written, read)) => {
            let seconds = started.elapsed().as_secs_f64();
            if args.json {
                let summary = Summary {
                    format: decoded.info.format.name(),
                    virtual_size: decoded.info.virtual_size,
                    cdrom: decoded.info.format.is_cdrom(),
                    compression: decoded.compression.first().map(|c| c.name()),
                    target_format: match args.target_format {
                        TargetFormat::Raw => "raw",
                        TargetFormat::Qcow2 => "qcow2",
                    },
                    disk_size: written.disk_size,
                    bytes_read: read,
                    image_bytes: decoded.image_bytes,
                    bytes_written: written.bytes_written,
                    bytes_zeroed: written.bytes_zeroed,
                    scratch_bytes: decoded.scratch_bytes,
                    seconds,
                };
                println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            } else {
                eprintln!(
                    "{}: {} {} -> {} ({} written, {:.1}s)",
                    args.dst.display(),
                    decoded.info.format,
                    binary_size(decoded.info.virtual_size),
                    binary_size(written.disk_size),
                    binary_size(written.bytes_written),
                    seconds
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let message = chain(e.as_ref());
            if args.json {
                let kind = e
                    .downcast_ref::<dvcr_formats::Error>()
                    .map(|e| error_kind(e.kind()))
                    .unwrap_or("source");
                let failure = serde_json::json!({"error": message, "kind": kind});
                println!("{failure}");
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Counts bytes read from the source, for the summary.
struct Counted<R> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn convert(args: &Args) -> anyhow::Result<(Decoded, Written, u64)> {
    let progress = progress_bar();
    let location = Location::parse(&args.src)?;
    let (reader, random, length): Opened = match &location {
        Location::Path(path) => {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            open_file(file)?
        }
        // A file redirected to standard input is read as if named.
        Location::Stdin => match source::stdin_file() {
            Some(file) => open_file(file).context("standard input")?,
            None => (Box::new(source::stdin()), None, None),
        },
        Location::Http(url) => {
            let body = source::open_http(url)?;
            let len = body.length;
            // A server that answers Range requests spares the scratch space: what a
            // decoder needs again is fetched again.
            let random = match (&body.ranges_at, len) {
                (Some(at), Some(len)) => {
                    Some(Box::new(source::HttpRanges::new(at, len)?) as RandomAccess)
                }
                _ => None,
            };
            (Box::new(body), random, len)
        }
    };
    if let Some(len) = length {
        progress.set_length(len);
        progress.set_style(bar_style());
    }
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = Box::new(Counted {
        inner: progress.wrap_read(reader),
        count: std::sync::Arc::clone(&count),
    });
    let opts = Options {
        scratch_dir: args.scratch_dir.clone(),
        pending_memory: usize::try_from(args.pending_memory).unwrap_or(usize::MAX),
        ..Options::default()
    };
    let target = TargetOptions {
        size: args.size,
        target_is_zero: args.target_is_zero,
    };
    let result = match args.target_format {
        TargetFormat::Raw => {
            let writer = DiskWriter::create(&args.dst, target)?;
            let decoded = decode_into(reader, random, &writer, &opts, args)?;
            (decoded, writer.finish()?)
        }
        TargetFormat::Qcow2 => {
            let writer = Qcow2Writer::create(&args.dst, target)?;
            let decoded = decode_into(reader, random, &writer, &opts, args)?;
            (decoded, writer.finish()?)
        }
    };
    progress.finish_and_clear();
    Ok((
        result.0,
        result.1,
        count.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

/// A source: read forwards, random access when it allows it, its length when known.
type Opened = (Box<dyn Read + Send>, Option<RandomAccess>, Option<u64>);

/// A local file or block device as a source: read once forwards (direct I/O, holes skipped)
/// and, since it is seekable, open to random access too, which spares the scratch space.
fn open_file(file: File) -> anyhow::Result<Opened> {
    let local = source::LocalFile::new(file)?;
    Ok((Box::new(local.reader), local.random, local.length))
}

fn decode_into(
    reader: Box<dyn Read + Send>,
    random: Option<RandomAccess>,
    sink: &dyn Sink,
    opts: &Options,
    args: &Args,
) -> anyhow::Result<Decoded> {
    // Writes go to a thread of their own, so that copying into the target runs on another
    // core than decoding. On failure the writer is dropped unfinished: a file target never
    // appears under its name (and an existing file there is left as it was).
    dvcr_formats::sink::write_behind(sink, |behind| {
        dvcr_formats::decode(reader, random, behind, opts)
    })
    .map_err(|e| anyhow::Error::new(e).context(args.src.clone()))
}

/// Parses `1048576`, `512K`, `10G`, `1.5T`, `20GiB` (binary units, as qemu-img reads them).
fn parse_size(text: &str) -> Result<u64, String> {
    dvcr_importer::env::parse_size(text).ok_or_else(|| {
        format!("{text:?} is not a size (e.g. 10G or 1073741824; units K, M, G, T, P are binary)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_plain_bytes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999P").is_err());
    }
}
