//! `dvcr inspect`: what is this image? Human output by default, one JSON object with
//! `--json` (on success and on refusal, so scripts always get something to parse).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use dvcr_formats::{Error as FormatError, ErrorKind, Probed, probe_path_with, probe_reader};
use dvcr_importer::source::{self, Location};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Arguments of `dvcr inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: a file or block device, `-` for standard input, or an http(s) URL.
    image: String,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The JSON answer, with the field names of `qemu-img info --output=json` where they exist.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Report<'a> {
    format: &'a str,
    virtual_size: u64,
    cdrom: bool,
    /// The outermost wrapper, or null.
    compression: Option<&'a str>,
    /// Every wrapper, outermost first.
    compression_layers: Vec<&'a str>,
    source_size: u64,
    image_size: u64,
    details: &'a std::collections::BTreeMap<&'static str, dvcr_formats::Detail>,
}

#[derive(Debug, Serialize)]
struct Failure<'a> {
    error: &'a str,
    kind: &'a str,
}

/// Why inspecting failed: the source, or the image.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Image(#[from] FormatError),
}

impl Failed {
    fn kind(&self) -> &'static str {
        match self {
            Failed::Source(_) => "source",
            Failed::Image(e) => match e.kind() {
                ErrorKind::Io => "io",
                ErrorKind::InvalidFormat => "invalid-format",
                ErrorKind::Unsupported => "unsupported",
                ErrorKind::Corrupt => "corrupt",
                ErrorKind::OutOfBounds => "out-of-bounds",
                ErrorKind::Truncated => "truncated",
                ErrorKind::NeedsRandomAccess => "needs-random-access",
                _ => "other",
            },
        }
    }
}

/// Runs `dvcr inspect`.
pub fn run(args: &Args) -> ExitCode {
    match probe(&args.image) {
        Ok(probed) => {
            if args.json {
                println!("{}", json(&probed));
            } else {
                print!("{}", human(&probed));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let message = format!("{}: {}", args.image, chain(&e));
            if args.json {
                let failure = Failure {
                    error: &message,
                    kind: e.kind(),
                };
                println!("{}", serde_json::to_string(&failure).unwrap_or_default());
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn probe(spec: &str) -> Result<Probed, Failed> {
    let progress = progress_bar();
    let result = match Location::parse(spec)? {
        Location::Path(path) => probe_path_with(&path, |file| Box::new(progress.wrap_read(file)))?,
        Location::Stdin => probe_reader(progress.wrap_read(source::stdin()))?,
        Location::Http(url) => {
            let body = source::open_http(&url)?;
            if let Some(len) = body.length {
                progress.set_length(len);
                progress.set_style(bar_style());
            }
            probe_reader(progress.wrap_read(body))?
        }
    };
    progress.finish_and_clear();
    Ok(result)
}

/// A spinner on a terminal (stderr) that counts bytes read; invisible otherwise.
fn progress_bar() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} reading {bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn json(p: &Probed) -> String {
    let layers: Vec<&str> = p.compression.iter().map(|c| c.name()).collect();
    let report = Report {
        format: p.info.format.name(),
        virtual_size: p.info.virtual_size,
        cdrom: p.info.format.is_cdrom(),
        compression: layers.first().copied(),
        compression_layers: layers.clone(),
        source_size: p.source_size,
        image_size: p.image_size,
        details: &p.info.details,
    };
    serde_json::to_string(&report).unwrap_or_default()
}

fn human(p: &Probed) -> String {
    let compression = if p.compression.is_empty() {
        "none".to_owned()
    } else {
        p.compression
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(" > ")
    };
    let mut out = format!(
        "format:           {}\nvirtual size:     {} ({} bytes)\ncompression:      {}\ncdrom:            {}\nsource size:      {} ({} bytes)\n",
        p.info.format,
        binary_size(p.info.virtual_size),
        p.info.virtual_size,
        compression,
        p.info.format.is_cdrom(),
        binary_size(p.source_size),
        p.source_size,
    );
    if !p.compression.is_empty() {
        out.push_str(&format!(
            "image size:       {} ({} bytes)\n",
            binary_size(p.image_size),
            p.image_size
        ));
    }
    for (key, value) in &p.info.details {
        out.push_str(&format!("{:<18}{}\n", format!("{key}:"), value));
    }
    out
}

/// `10 GiB`, `1.5 MiB`, `512 B`.
fn binary_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_size_prints_whole_units_without_decimals() {
        assert_eq!(binary_size(10 << 30), "10 GiB");
        assert_eq!(binary_size(1536 * 1024), "1.50 MiB");
        assert_eq!(binary_size(512), "512 B");
    }
}
