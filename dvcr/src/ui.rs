//! What the `dvcr` subcommands share in front of a person or a script: progress bars on
//! terminals (hidden in jobs), sizes in binary units, error chains in one line, and the
//! stable names of error kinds used in JSON output.

use std::io::IsTerminal;
use std::time::Duration;

use dvcr_formats::ErrorKind;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The error and its causes in one line (the importer's rendering, shared by every binary).
pub use dvcr_importer::error::chain;

/// The stable name of an error kind in JSON output.
pub fn error_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Io => "io",
        ErrorKind::InvalidFormat => "invalid-format",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::OutOfBounds => "out-of-bounds",
        ErrorKind::Truncated => "truncated",
        ErrorKind::NeedsRandomAccess => "needs-random-access",
        _ => "other",
    }
}

/// A spinner on a terminal (stderr) that counts bytes read; invisible otherwise.
pub fn progress_bar() -> ProgressBar {
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

pub fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// `10 GiB`, `1.5 MiB`, `512 B`.
pub fn binary_size(n: u64) -> String {
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
