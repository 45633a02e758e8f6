//! `dvcr-tests`: real-tool fixtures shared by the integration tests of every crate.
//!
//! Images are made by the real `qemu-img` / `qemu-io`, ISOs by `genisoimage`, wrappers by the
//! real `gzip`, `xz`, `zstd` and `bzip2` commands, and `qemu-img info` is the oracle. A
//! missing tool is a test failure with the package to install, not a silent skip: `.ci/run`
//! installs them all.

// Test support: a failed fixture step must stop the test loudly, with the tool's output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A scratch directory removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A new empty directory under the system temp dir.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("dvcr-test-")
                .tempdir()
                .expect("creating a scratch dir"),
        }
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs a command and returns its output, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {shown}: {e} (is the tool installed? .ci/run installs it)")
    });
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A loop device over a file, detached when dropped: a real block device for tests of
/// block-device sources and targets.
#[derive(Debug)]
pub struct Loop {
    /// Its path, `/dev/loopN`.
    pub device: String,
}

impl Loop {
    /// Attaches `file`; `None` (with the reason on stderr) where this machine has no loop
    /// devices to give, as in an unprivileged container.
    pub fn attach(file: &Path) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping: no loop device here ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Self {
            device: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// `qemu-img ARGS...`.
pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-io -f FORMAT -c CMD... IMAGE`: writes patterns into an image.
pub fn qemu_io(format: &str, image: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg(format);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(image));
}

/// What `qemu-img info --output=json [-f FORMAT]` says: (format, virtual size).
pub fn qemu_info(image: &Path, format: Option<&str>) -> (String, u64) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = run(cmd.arg(image));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON");
    (
        v["format"].as_str().expect("format").to_owned(),
        v["virtual-size"].as_u64().expect("virtual-size"),
    )
}

/// A compression wrapper, made by the real command-line tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapper {
    /// `gzip`
    Gzip,
    /// `xz`
    Xz,
    /// `zstd`
    Zstd,
    /// `bzip2`
    Bzip2,
}

impl Wrapper {
    /// Every wrapper.
    pub const ALL: [Wrapper; 4] = [Wrapper::Gzip, Wrapper::Xz, Wrapper::Zstd, Wrapper::Bzip2];

    /// The name `dvcr inspect` reports.
    pub fn name(self) -> &'static str {
        match self {
            Wrapper::Gzip => "gzip",
            Wrapper::Xz => "xz",
            Wrapper::Zstd => "zstd",
            Wrapper::Bzip2 => "bzip2",
        }
    }

    fn command(self) -> Command {
        let mut cmd = match self {
            Wrapper::Gzip => Command::new("gzip"),
            Wrapper::Xz => {
                let mut c = Command::new("xz");
                c.args(["-T1", "-1"]);
                c
            }
            Wrapper::Zstd => {
                let mut c = Command::new("zstd");
                c.arg("-q");
                c
            }
            Wrapper::Bzip2 => Command::new("bzip2"),
        };
        cmd.args(["-c"]);
        cmd
    }

    /// Compresses `data` with the tool; returns the compressed bytes.
    pub fn compress(self, data: &Path) -> Vec<u8> {
        let input = fs::File::open(data).expect("opening the image to compress");
        let out = run(self.command().stdin(Stdio::from(input)));
        out.stdout
    }

    /// Compresses `data` as two members / streams / frames, concatenated, as parallel
    /// compressors (pigz, pbzip2, pixz, zstdmt) and `cat a.gz b.gz` produce.
    pub fn compress_in_two(self, data: &Path, scratch: &Scratch) -> Vec<u8> {
        let bytes = fs::read(data).expect("reading the image");
        let (a, b) = bytes.split_at(bytes.len() / 2);
        let mut out = Vec::new();
        for (i, half) in [a, b].into_iter().enumerate() {
            let part = scratch.path(&format!("half-{i}"));
            fs::write(&part, half).expect("writing a half");
            out.extend(self.compress(&part));
        }
        out
    }
}

/// Writes `bytes` to `name` in the scratch dir and returns the path.
pub fn write(scratch: &Scratch, name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch.path(name);
    fs::write(&p, bytes).expect("writing a test file");
    p
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for tests.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Patches `bytes` at `offset` in the file at `path`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening for a patch");
    f.write_all_at(bytes, offset).expect("patching");
}

/// How a test feeds an image to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The file, with random access available to the decoder.
    File,
    /// The same bytes as a forward-only stream (as from standard input or HTTP).
    Stream,
    /// The same bytes lent in chunks of awkward, changing sizes (as the importer lends an
    /// HTTP body to its check), through [`dvcr_formats::decode_lent`]. Uncompressed images
    /// only.
    Lent,
}

/// A file lent in chunks whose sizes cycle through odd values from 1 byte to 1 MiB + 1.
#[derive(Debug)]
pub struct AwkwardChunks {
    file: fs::File,
    buf: Vec<u8>,
    turn: usize,
}

impl AwkwardChunks {
    const SIZES: [usize; 7] = [65_536 + 1, 1, 300_007, 4_093, (1 << 20) + 1, 12_288, 511];

    pub fn new(file: fs::File) -> Self {
        Self {
            file,
            buf: vec![0; (1 << 20) + 1],
            turn: 0,
        }
    }
}

impl std::io::Read for AwkwardChunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.file, buf)
    }
}

impl dvcr_formats::Lend for AwkwardChunks {
    fn lend(&mut self, max: usize) -> std::io::Result<&[u8]> {
        let want = Self::SIZES[self.turn % Self::SIZES.len()].min(max);
        self.turn += 1;
        let mut have = 0;
        while have < want {
            match std::io::Read::read(&mut self.file, &mut self.buf[have..want])? {
                0 => break,
                n => have += n,
            }
        }
        Ok(&self.buf[..have])
    }
}

/// Opens `image` as a decoder source: the bytes, and random access to them when `feed` is
/// [`Feed::File`].
pub fn open_image(
    image: &Path,
    feed: Feed,
) -> (
    dvcr_formats::compress::BoxRead,
    Option<dvcr_formats::RandomAccess>,
) {
    let file = fs::File::open(image).expect("opening the image");
    let random = match feed {
        Feed::File => {
            let len = file.metadata().expect("image metadata").len();
            Some(Box::new(dvcr_formats::FileView::new(
                file.try_clone().expect("cloning the file handle"),
                len,
            )) as dvcr_formats::RandomAccess)
        }
        Feed::Stream | Feed::Lent => None,
    };
    (Box::new(file), random)
}

/// Decodes `image` with `dvcr-formats` into a sparse raw file and returns the decode
/// summary and the raw file's path.
pub fn decode_to_raw(
    scratch: &Scratch,
    image: &Path,
    feed: Feed,
    opts: &dvcr_formats::Options,
) -> dvcr_formats::Result<(dvcr_formats::Decoded, PathBuf)> {
    use dvcr_formats::sparse::{DiskWriter, TargetOptions};
    let out = scratch.path(&format!(
        "{}.{feed:?}.raw",
        image
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image")
    ));
    let writer = DiskWriter::create(&out, TargetOptions::default())?;
    let decoded = if feed == Feed::Lent {
        let file = fs::File::open(image).expect("opening the image");
        dvcr_formats::decode_lent(Box::new(AwkwardChunks::new(file)), &writer, opts)?
    } else {
        let (file, random) = open_image(image, feed);
        dvcr_formats::decode(file, random, &writer, opts)?
    };
    writer.finish()?;
    Ok((decoded, out))
}

/// Asserts that `qemu-img compare` finds `raw` identical to `image` read as `format`, and
/// that the raw file is exactly the virtual size qemu reports.
pub fn assert_same_as_qemu(image: &Path, format: &str, raw: &Path) {
    let (_, size) = qemu_info(image, Some(format));
    let raw_len = fs::metadata(raw).expect("raw output metadata").len();
    assert_eq!(
        raw_len,
        size,
        "{} decoded to {raw_len} bytes, qemu says {size}",
        image.display()
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .expect("running qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare says {} differs from its decoded copy: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Decodes `image` from a file, from a stream and (uncompressed images) from lent chunks, and
/// checks each against qemu.
pub fn decodes_like_qemu(scratch: &Scratch, image: &Path, format: &str) -> dvcr_formats::Decoded {
    let mut last = None;
    let mut magic = [0u8; dvcr_formats::compress::MAGIC_LEN];
    let magic_len = std::io::Read::read(
        &mut fs::File::open(image).expect("opening the image"),
        &mut magic,
    )
    .expect("reading the image's first bytes");
    let plain = dvcr_formats::compress::detect(&magic[..magic_len]).is_none();
    let feeds: &[Feed] = if plain {
        &[Feed::File, Feed::Stream, Feed::Lent]
    } else {
        &[Feed::File, Feed::Stream]
    };
    for &feed in feeds {
        let (decoded, raw) = decode_to_raw(scratch, image, feed, &dvcr_formats::Options::default())
            .unwrap_or_else(|e| panic!("decoding {} ({feed:?}) failed: {e}", image.display()));
        assert_same_as_qemu(image, format, &raw);
        fs::remove_file(&raw).ok();
        last = Some(decoded);
    }
    last.expect("decoded")
}

/// A raw file of `size` bytes with incompressible data, a compressible run and zero runs at
/// spread offsets: the usual source for `qemu-img convert` fixtures.
pub fn mixed_raw(scratch: &Scratch, name: &str, size: usize) -> PathBuf {
    let mut data = vec![0u8; size];
    let noise_len = (size / 8).max(1);
    let n = noise(noise_len, 11);
    data[..noise_len].copy_from_slice(&n);
    let mid = size / 2;
    let run_end = (mid + size / 16).min(size);
    data[mid..run_end].fill(0x42);
    // A lone non-zero sector near the end, after a long zero run.
    if size >= 4096 {
        data[size - 3000] = 0x99;
    }
    write(scratch, name, &data)
}

/// A small HTTP/1.1 file server on loopback for tests: `GET` and `HEAD`, with single
/// `Range: bytes=a-b` requests answered 206 and `Accept-Ranges: bytes` advertised (unless
/// `ranges` is false). Returns the URL of `path`; the server lives as long as the test
/// process. Requests are counted in the returned counter.
pub fn serve_file(
    path: &Path,
    ranges: bool,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = listener.local_addr().expect("local address");
    let file_path = path.to_path_buf();
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&requests);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let file_path = file_path.clone();
            let counter = std::sync::Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let method = line.split(' ').next().unwrap_or("").to_owned();
                    let mut range: Option<(u64, Option<u64>)> = None;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.split_once('-').unwrap_or((v, ""));
                            range = a.parse().ok().map(|a| (a, b.parse().ok()));
                        }
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    let mut file = fs::File::open(&file_path).expect("served file");
                    let len = file.metadata().expect("metadata").len();
                    let (status, start, end) = match range {
                        Some((a, b)) if ranges && a < len => (
                            "206 Partial Content",
                            a,
                            b.map_or(len, |b| (b + 1).min(len)),
                        ),
                        _ => ("200 OK", 0, len),
                    };
                    let mut head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n",
                        end - start
                    );
                    if ranges {
                        head.push_str("Accept-Ranges: bytes\r\n");
                    }
                    if status.starts_with("206") {
                        head.push_str(&format!(
                            "Content-Range: bytes {start}-{}/{len}\r\n",
                            end - 1
                        ));
                    }
                    head.push_str("\r\n");
                    if stream.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    if method == "GET" {
                        file.seek(SeekFrom::Start(start)).expect("seek");
                        let mut body = file.take(end - start);
                        if std::io::copy(&mut body, &mut stream).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("image");
    (format!("http://{addr}/{name}"), requests)
}
