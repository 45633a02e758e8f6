//! `dvcr inspect`: what is this image? Human output by default, one JSON object with
//! `--json` (on success and on refusal, so scripts always get something to parse).

use std::process::ExitCode;

use dvcr_formats::{Error as FormatError, Probed, probe_path_with, probe_reader};
use dvcr_importer::source::{self, Location};
use serde::Serialize;

use crate::ui::{bar_style, binary_size, chain, error_kind, progress_bar};

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
            Failed::Image(e) => error_kind(e.kind()),
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

fn probe(spec: &str) -> Result<Probed, Failed> {
    let progress = progress_bar();
    let result = match Location::parse(spec)? {
        Location::Path(path) => probe_path_with(&path, |file| Box::new(progress.wrap_read(file)))?,
        Location::Stdin => match source::stdin_file() {
            // A file redirected in is probed as if named: headers and tables only.
            Some(file) => dvcr_formats::probe_file_with(file, "standard input", |file| {
                Box::new(progress.wrap_read(file))
            })?,
            None => probe_reader(progress.wrap_read(source::stdin()))?,
        },
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
