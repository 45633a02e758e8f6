//! Checksums the user gave for a source (`sha256:<hex>,md5:<hex>`), computed in the same
//! pass over the bytes as they are downloaded and checked when the stream ends.
//!
//! Hashing runs on a thread of its own, fed copies of the chunks over a bounded channel:
//! MD5 and SHA-512 are slower than a loopback download, so hashing inline would make the
//! slowest hash the speed of the whole import. A mismatch ends the stream with an error
//! (never a clean end), so nothing downstream publishes a result built from wrong bytes.

use std::fmt;
use std::io::{self, Read};
use std::sync::mpsc;
use std::thread::JoinHandle;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// A hash algorithm users may give a checksum in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (legacy, still common on download pages).
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The name used in specs (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the digest in hex digits.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "md5" => Some(Algorithm::Md5),
            "sha1" => Some(Algorithm::Sha1),
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// One expected checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The digest in lowercase hex.
    pub hex: String,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// A checksum specification that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error(
    "checksum {spec:?}: {problem}; give them as algorithm:hex separated by commas, e.g. sha256:9f86…,md5:d41d…"
)]
pub struct BadSpec {
    spec: String,
    problem: String,
}

/// Parses `"sha256:<hex>,md5:<hex>"` (whitespace around entries is ignored; an empty spec
/// means no checksums). One algorithm may appear once.
pub fn parse(spec: &str) -> Result<Vec<Expected>, BadSpec> {
    let mut out: Vec<Expected> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |problem: String| BadSpec {
            spec: part.to_owned(),
            problem,
        };
        let (name, hex) = part
            .split_once(':')
            .ok_or_else(|| bad("missing the algorithm: prefix".into()))?;
        let algorithm = Algorithm::parse(name).ok_or_else(|| {
            bad(format!(
                "unknown algorithm {name:?} (md5, sha1, sha256 and sha512 are supported)"
            ))
        })?;
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "a {} digest is {} hex digits",
                algorithm.name(),
                algorithm.hex_len()
            )));
        }
        if out.iter().any(|e| e.algorithm == algorithm) {
            return Err(bad(format!("{} is given twice", algorithm.name())));
        }
        out.push(Expected { algorithm, hex });
    }
    Ok(out)
}

/// The downloaded bytes do not match a checksum the user gave: a permanent failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "checksum mismatch: expected {expected}, the downloaded bytes have {algorithm}:{actual}; the file at the source is not the one the checksum describes"
)]
pub struct Mismatch {
    /// What the user gave.
    pub expected: Expected,
    /// The algorithm's name.
    pub algorithm: &'static str,
    /// What the bytes hash to.
    pub actual: String,
}

enum Hasher {
    Md5(Md5),
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(a: Algorithm) -> Self {
        match a {
            Algorithm::Md5 => Hasher::Md5(Md5::new()),
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Chunks in flight to the hashing thread.
const DEPTH: usize = 8;

/// A reader that hashes everything read through it and, at the end of the stream, checks
/// the digests: a mismatch is returned as an error from the final `read` instead of the end.
pub struct Verifying<R> {
    inner: R,
    tx: Option<mpsc::SyncSender<Piece>>,
    spare: mpsc::Receiver<Vec<u8>>,
    worker: Option<JoinHandle<Vec<(Expected, String)>>>,
    done: bool,
    failed: Option<Mismatch>,
}

impl<R> fmt::Debug for Verifying<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifying")
            .field("done", &self.done)
            .finish()
    }
}

impl<R> Verifying<R> {
    /// Wraps `inner`; with no checksums it only passes bytes through.
    pub fn new(inner: R, expected: Vec<Expected>) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Piece>(DEPTH);
        let (spare_tx, spare) = mpsc::sync_channel::<Vec<u8>>(DEPTH + 2);
        let worker = if expected.is_empty() {
            None
        } else {
            Some(
                std::thread::Builder::new()
                    .name("checksums".into())
                    .spawn(move || {
                        let mut hashers: Vec<(Expected, Hasher)> = expected
                            .into_iter()
                            .map(|e| {
                                let h = Hasher::new(e.algorithm);
                                (e, h)
                            })
                            .collect();
                        for piece in rx {
                            let bytes: &[u8] = match &piece {
                                Piece::Copied(v) => v,
                                Piece::Lent(b) => b,
                            };
                            for (_, h) in &mut hashers {
                                h.update(bytes);
                            }
                            if let Piece::Copied(v) = piece {
                                let _ = spare_tx.try_send(v);
                            }
                        }
                        hashers.into_iter().map(|(e, h)| (e, h.hex())).collect()
                    })?,
            )
        };
        Ok(Self {
            inner,
            tx: worker.is_some().then_some(tx),
            spare,
            worker,
            done: false,
            failed: None,
        })
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tx = None;
        let Some(worker) = self.worker.take() else {
            return Ok(());
        };
        let results = worker
            .join()
            .map_err(|_| io::Error::other("the checksum thread stopped unexpectedly"))?;
        for (expected, actual) in results {
            if expected.hex != actual {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    Mismatch {
                        algorithm: expected.algorithm.name(),
                        expected,
                        actual,
                    },
                ));
            }
        }
        Ok(())
    }
}

/// Bytes on their way to the checksum thread: a copy (its buffer comes back for reuse), or
/// a chunk the source lent, shared as it is.
enum Piece {
    Copied(Vec<u8>),
    Lent(bytes::Bytes),
}

impl<R> Verifying<R> {
    /// The stream ended: the verdict, once. A mismatch stays an error on every later read:
    /// never a clean end.
    fn at_end(&mut self) -> io::Result<()> {
        if !self.done {
            self.done = true;
            if let Err(e) = self.finish() {
                self.failed = find_mismatch(&e).cloned();
                return Err(e);
            }
        }
        match &self.failed {
            Some(m) => Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())),
            None => Ok(()),
        }
    }

    fn hash(&self, piece: Piece) -> io::Result<()> {
        match &self.tx {
            Some(tx) => tx
                .send(piece)
                .map_err(|_| io::Error::other("the checksum thread stopped unexpectedly")),
            None => Ok(()),
        }
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return self.at_end().map(|()| 0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return self.at_end().map(|()| 0);
        }
        if self.tx.is_some() {
            let mut chunk = self.spare.try_recv().unwrap_or_default();
            chunk.clear();
            chunk.extend_from_slice(&buf[..n]);
            self.hash(Piece::Copied(chunk))?;
        }
        Ok(n)
    }
}

impl<R: crate::chunk::ChunkRead> crate::chunk::ChunkRead for Verifying<R> {
    fn read_chunk(&mut self, max: usize) -> io::Result<bytes::Bytes> {
        if self.done {
            return self.at_end().map(|()| bytes::Bytes::new());
        }
        let chunk = self.inner.read_chunk(max)?;
        if chunk.is_empty() {
            return self.at_end().map(|()| chunk);
        }
        if self.tx.is_some() {
            self.hash(Piece::Lent(chunk.clone()))?;
        }
        Ok(chunk)
    }
}

/// Finds a checksum mismatch in an error chain (the decoders wrap read errors).
pub fn find_mismatch<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Mismatch> {
    crate::error::find(e)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn several_checksums_parse_in_any_case_with_spaces() {
        let list = parse(" SHA256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08 , md5:098f6bcd4621d373cade4e832627b4f6").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].algorithm, Algorithm::Sha256);
        assert!(list[0].hex.starts_with("9f86d0"));
        assert_eq!(list[1].algorithm, Algorithm::Md5);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn malformed_checksums_are_refused_with_the_reason() {
        for (spec, reason) in [
            ("sha256", "missing the algorithm"),
            ("crc32:abcd", "unknown algorithm"),
            ("md5:abc", "32 hex digits"),
            ("md5:zz8f6bcd4621d373cade4e832627b4f6", "32 hex digits"),
            (
                "md5:098f6bcd4621d373cade4e832627b4f6,md5:098f6bcd4621d373cade4e832627b4f6",
                "given twice",
            ),
        ] {
            let e = parse(spec).unwrap_err().to_string();
            assert!(e.contains(reason), "{spec}: {e}");
        }
    }

    fn read_all(data: &[u8], spec: &str) -> io::Result<Vec<u8>> {
        let mut r = Verifying::new(data, parse(spec).unwrap())?;
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn matching_checksums_of_every_algorithm_let_the_stream_end_cleanly() {
        let spec = "md5:098f6bcd4621d373cade4e832627b4f6,\
            sha1:a94a8fe5ccb19ba61c4c0873d391e987982fbbd3,\
            sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,\
            sha512:ee26b0dd4af7e749aa1a8ee3c10ae9923f618980772e473f8819a5d4940e0db27ac185f8a0e1d5f84f88bc887fd67b143732c304cc5fa9ad8e6f57f50028a8ff";
        assert_eq!(read_all(b"test", spec).unwrap(), b"test");
    }

    #[test]
    fn a_mismatch_ends_the_stream_with_an_error_naming_both_digests() {
        let e = read_all(
            b"tesT",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        )
        .unwrap_err();
        let m = find_mismatch(&e).unwrap();
        assert_eq!(m.actual.len(), 64);
        assert_eq!(m.algorithm, "sha256");
        assert!(e.to_string().contains("expected sha256:9f86d0"), "{e}");
    }
}
