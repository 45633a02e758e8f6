//! Helpers the format modules' unit tests share: a scratch directory of a test's own, the
//! real `qemu-img` (which makes and inspects the images the decoders are checked on), and
//! detection run both ways (random access and one pass) on hand-made bytes.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::detect::detect;
use crate::probe::probe_reader;
use crate::view::SliceView;
use crate::{ErrorKind, Format, ImageInfo};

/// A directory of one test's own under the system temp dir, removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// A fresh directory whose name carries `tag`, the process id and a counter.
    pub(crate) fn new(tag: &str) -> std::io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dvcr-{tag}-{}-{n}", std::process::id()));
        // Left over from a killed run with the same pid: start afresh.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// `name` inside the directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the real qemu-img; its stdout, or why it failed (with its stderr).
pub(crate) fn qemu_img(args: &[&str]) -> Result<String, String> {
    let out = Command::new("/usr/bin/qemu-img")
        .args(args)
        .output()
        .map_err(|e| format!("running qemu-img {args:?} (install qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The format and virtual size `qemu-img info` reports for `path`; with `format`, read as
/// that format, else as the one qemu-img detects.
pub(crate) fn qemu_info(path: &Path, format: Option<&str>) -> Result<(String, u64), String> {
    let shown = path.to_string_lossy();
    let mut args = vec!["info", "--output=json"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.push(&shown);
    let json = qemu_img(&args)?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let found = value["format"]
        .as_str()
        .ok_or_else(|| format!("no format in {json}"))?;
    let size = value["virtual-size"]
        .as_u64()
        .ok_or_else(|| format!("no virtual-size in {json}"))?;
    Ok((found.to_owned(), size))
}

/// What detecting an image found: its format and virtual size, or the error's kind and
/// message.
pub(crate) type Outcome = Result<(Format, u64), (ErrorKind, String)>;

fn outcome(result: crate::Result<ImageInfo>) -> Outcome {
    result
        .map(|i| (i.format, i.virtual_size))
        .map_err(|e| (e.kind(), e.message().to_owned()))
}

/// Detection by random access and over a one-pass stream; asserts that they agree.
pub(crate) fn both_ways(bytes: &[u8]) -> Outcome {
    let random = outcome(detect(&SliceView(bytes)));
    let streamed = outcome(probe_reader(Cursor::new(bytes.to_vec())).map(|p| p.info));
    assert_eq!(random, streamed, "random access and streaming disagree");
    random
}

/// Asserts that `bytes` are refused both ways, with `kind` and a message containing `words`.
pub(crate) fn assert_refused(bytes: &[u8], kind: ErrorKind, words: &str) {
    match both_ways(bytes) {
        Err((k, message)) => {
            assert_eq!(k, kind, "wrong kind for: {message}");
            assert!(
                message.contains(words),
                "{message:?} does not mention {words:?}"
            );
        }
        Ok(found) => panic!("accepted as {found:?}, expected a {kind:?} refusal"),
    }
}
