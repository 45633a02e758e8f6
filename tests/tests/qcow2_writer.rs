//! The qcow2 target writer makes images that `qemu-img check` finds clean and `qemu-img
//! compare` finds identical to their source, whatever the order and alignment of the writes.

// Test helpers: a failed fixture step must stop the test loudly.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use dvcr_formats::sink::Sink;
use dvcr_formats::sparse::qcow2::Qcow2Writer;
use dvcr_formats::sparse::{TargetOptions, Written};
use dvcr_tests::{Feed, Scratch, mixed_raw, noise, qemu_img, qemu_io, write};

/// Decodes `image` with `dvcr_formats::decode` into a new qcow2 file.
fn decode_to_qcow2(
    s: &Scratch,
    image: &Path,
    feed: Feed,
    opts: TargetOptions,
) -> dvcr_formats::Result<(Written, PathBuf)> {
    let out = s.path(&format!(
        "{}.{feed:?}.qcow2",
        image
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image")
    ));
    let writer = Qcow2Writer::create(&out, opts)?;
    let (file, random) = dvcr_tests::open_image(image, feed);
    dvcr_formats::decode(file, random, &writer, &dvcr_formats::Options::default())?;
    let written = writer.finish()?;
    Ok((written, out))
}

/// `qemu-img check` exits 0 only when it finds no corruption and no leaked cluster.
fn assert_clean(qcow2: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(qcow2)
        .output()
        .expect("running qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check finds {} damaged: {}{}",
        qcow2.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` finds the qcow2 identical to `source` read as `format` (a larger
/// qcow2 must read zero past the source's end).
fn assert_identical(source: &Path, format: &str, qcow2: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "qcow2"])
        .arg(source)
        .arg(qcow2)
        .output()
        .expect("running qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare finds {} different from {}: {}{}",
        qcow2.display(),
        source.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json -f qcow2`.
fn info(qcow2: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2", path_str(qcow2)]);
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

/// The ranges `qemu-img map --output=json` reports as holding data: (start, length).
fn data_extents(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output=json", "-f", format, path_str(image)]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map JSON");
    map.as_array()
        .expect("a map is an array")
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

/// A xorshift generator for reproducible shuffles and piece sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `disk` into `writer` as pieces of unaligned random lengths, in shuffled order,
/// from four threads, as a decoder of an out-of-order format with sub-cluster writes would.
/// Only the ranges in `extents` are written (all of the disk when `None`).
fn write_shuffled(writer: &Qcow2Writer, disk: &[u8], extents: Option<&[(u64, u64)]>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let whole = [(0, disk.len() as u64)];
    let mut pieces = Vec::new();
    for &(start, len) in extents.unwrap_or(&whole) {
        let mut at = start;
        while at < start + len {
            let n = (1 + rng.below(150_000)).min(start + len - at);
            pieces.push((at as usize, (at + n) as usize));
            at += n;
        }
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let pieces = &pieces;
    std::thread::scope(|scope| {
        for t in 0..4 {
            scope.spawn(move || {
                for &(a, b) in pieces.iter().skip(t).step_by(4) {
                    writer
                        .write_at(a as u64, &disk[a..b])
                        .unwrap_or_else(|e| panic!("writing {a}..{b}: {e}"));
                }
            });
        }
    });
}

/// Noise with zero runs of assorted lengths (whole clusters, single 4 KiB blocks, a few
/// bytes) at assorted offsets, and one lone non-zero byte in a zero cluster.
fn patchy_disk(len: usize, seed: u64) -> Vec<u8> {
    let mut disk = noise(len, seed);
    let mut rng = Rng(seed ^ 0x5eed);
    for _ in 0..200 {
        let at = rng.below(len as u64) as usize;
        let n = match rng.below(3) {
            0 => 65536 * (1 + rng.below(8) as usize),
            1 => 4096,
            _ => 1 + rng.below(700) as usize,
        };
        disk[at..(at + n).min(len)].fill(0);
    }
    let lone = len / 3 / 65536 * 65536;
    disk[lone..lone + 65536].fill(0);
    disk[lone + 777] = 0x5a;
    disk
}

#[test]
fn a_raw_image_converts_to_a_qcow2_that_qemu_finds_clean_and_identical() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "mixed.raw", (40 << 20) + 7 * 512);
    for feed in [Feed::File, Feed::Stream] {
        let (written, qcow2) = decode_to_qcow2(&s, &raw, feed, TargetOptions::default())
            .unwrap_or_else(|e| panic!("{feed:?}: {e}"));
        assert_eq!(written.disk_size, (40 << 20) + 7 * 512);
        assert_clean(&qcow2);
        assert_identical(&raw, "raw", &qcow2);
        let info = info(&qcow2);
        assert_eq!(info["virtual-size"].as_u64(), Some((40 << 20) + 7 * 512));
        assert_eq!(info["cluster-size"].as_u64(), Some(65536));
        let specific = &info["format-specific"]["data"];
        assert_eq!(specific["compat"].as_str(), Some("1.1"));
        assert_eq!(specific["refcount-bits"].as_u64(), Some(16));
        assert!(info["backing-filename"].is_null());
    }
}

#[test]
fn a_sparse_raw_image_spanning_several_l2_tables_converts_identically() {
    let s = Scratch::new();
    let raw = s.path("big.raw");
    let size: u64 = (1536 << 20) + 65536 + 512;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&raw).expect("creating the raw image");
        f.set_len(size).expect("sizing the raw image");
        let patches = [
            (0, 200),
            (511 << 20, 5200),
            ((512 << 20) - 100, 10_200),
            (1 << 30, 15_200),
            (size - 300, 300),
        ];
        for (i, (at, len)) in patches.into_iter().enumerate() {
            f.write_all_at(&noise(len, i as u64), at)
                .expect("patching the raw image");
        }
    }
    let (_, qcow2) =
        decode_to_qcow2(&s, &raw, Feed::File, TargetOptions::default()).expect("decoding");
    assert_clean(&qcow2);
    assert_identical(&raw, "raw", &qcow2);
    // Data in 5 guest clusters (the write at 512 MiB - 100 spans two): 6 data clusters.
    let map = data_extents(&qcow2, "qcow2");
    let data: u64 = map.iter().map(|&(_, len)| len).sum();
    assert_eq!(data, 6 * 65536 - (65536 - (size % 65536)));
}

#[test]
fn unaligned_writes_from_several_threads_in_any_order_give_a_clean_identical_qcow2() {
    let s = Scratch::new();
    let disk = patchy_disk((24 << 20) + 3 * 512, 21);
    let reference = write(&s, "reference.raw", &disk);
    let qcow2 = s.path("threads.qcow2");
    let writer = Qcow2Writer::create(&qcow2, TargetOptions::default()).expect("creating");
    writer.set_size(disk.len() as u64).expect("sizing");
    write_shuffled(&writer, &disk, None, 77);
    let written = writer.finish().expect("finishing");
    assert_eq!(written.disk_size, disk.len() as u64);
    assert_clean(&qcow2);
    assert_identical(&reference, "raw", &qcow2);
}

#[test]
fn a_qcow2_image_with_unaligned_random_writes_converts_to_an_identical_qcow2() {
    let s = Scratch::new();
    let source = s.path("random.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&source), "96M"]);
    qemu_io(
        "qcow2",
        &source,
        &[
            "write -P 0xab 1000 5000",
            "write -P 0x11 70000000 1234567",
            "write -P 0x22 3333 100",
            "write -P 0x33 40000001 65536",
            "write -P 0x44 100663000 296",
            "write -P 0x55 20971520 4194304",
            "write -z 21000000 300000",
        ],
    );
    // The guest data as qemu reads it, written extent by extent in the order and with the
    // unaligned piece sizes of a decoder (the qcow2 decoder has its own test below).
    let raw = s.path("random.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path_str(&source),
        path_str(&raw),
    ]);
    let disk = fs::read(&raw).expect("reading the raw copy");
    let extents = data_extents(&source, "qcow2");
    assert!(
        extents.len() >= 5,
        "qemu-io allocated clusters: {extents:?}"
    );
    let qcow2 = s.path("copy.qcow2");
    let writer = Qcow2Writer::create(&qcow2, TargetOptions::default()).expect("creating");
    writer.set_size(disk.len() as u64).expect("sizing");
    write_shuffled(&writer, &disk, Some(&extents), 5);
    writer.finish().expect("finishing");
    assert_clean(&qcow2);
    assert_identical(&source, "qcow2", &qcow2);
}

#[test]
fn a_qcow2_image_decodes_into_a_qcow2_identical_to_it() {
    let s = Scratch::new();
    let source = s.path("random.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&source), "64M"]);
    qemu_io(
        "qcow2",
        &source,
        &[
            "write -P 0xab 1000 5000",
            "write -P 0x11 30000000 1234567",
            "write -P 0x22 600 100",
            "write -P 0x33 7000000 70000",
        ],
    );
    for feed in [Feed::File, Feed::Stream] {
        let (_, qcow2) = decode_to_qcow2(&s, &source, feed, TargetOptions::default())
            .unwrap_or_else(|e| panic!("{feed:?}: {e}"));
        assert_clean(&qcow2);
        assert_identical(&source, "qcow2", &qcow2);
    }
}

#[test]
fn a_requested_size_larger_than_the_image_gives_a_qcow2_of_that_size_whose_tail_reads_zero() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "small.raw", 8 << 20);
    let requested: u64 = (3 << 30) + 512;
    let opts = TargetOptions {
        size: Some(requested),
        ..TargetOptions::default()
    };
    let (written, qcow2) = decode_to_qcow2(&s, &raw, Feed::Stream, opts).expect("decoding");
    assert_eq!(written.disk_size, requested);
    assert_eq!(info(&qcow2)["virtual-size"].as_u64(), Some(requested));
    assert_clean(&qcow2);
    // compare requires the part past the smaller image to read zero; read it outright too.
    assert_identical(&raw, "raw", &qcow2);
    qemu_io(
        "qcow2",
        &qcow2,
        &[
            &format!("read -P 0 {} {}", 8 << 20, 1 << 20),
            &format!("read -P 0 {} 512", requested - 512),
        ],
    );
    assert!(
        data_extents(&qcow2, "qcow2")
            .iter()
            .all(|&(start, len)| start + len <= 8 << 20)
    );
}

#[test]
fn a_requested_size_smaller_than_the_image_is_refused() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "big.raw", 4 << 20);
    let opts = TargetOptions {
        size: Some(1 << 20),
        ..TargetOptions::default()
    };
    let kind = decode_to_qcow2(&s, &raw, Feed::File, opts)
        .err()
        .map(|e| e.kind());
    assert_eq!(kind, Some(dvcr_formats::ErrorKind::OutOfBounds));
}

#[test]
fn an_all_zero_image_allocates_no_data_clusters() {
    let s = Scratch::new();
    let raw = write(&s, "zero.raw", &vec![0u8; 64 << 20]);
    let (written, qcow2) =
        decode_to_qcow2(&s, &raw, Feed::Stream, TargetOptions::default()).expect("decoding");
    assert_clean(&qcow2);
    assert_identical(&raw, "raw", &qcow2);
    // Header, L1 table, refcount table, one refcount block.
    let len = fs::metadata(&qcow2).expect("metadata").len();
    assert_eq!(len, 4 * 65536);
    assert!(written.bytes_written < 4 * 65536);
    assert_eq!(data_extents(&qcow2, "qcow2"), Vec::<(u64, u64)>::new());
}

#[test]
fn a_size_that_is_not_whole_sectors_is_rounded_up_like_qemu_img_create() {
    let s = Scratch::new();
    let qcow2 = s.path("odd.qcow2");
    let writer = Qcow2Writer::create(&qcow2, TargetOptions::default()).expect("creating");
    writer.set_size(1_000_001).expect("sizing");
    writer.write_at(999_990, &[0xee; 11]).expect("writing");
    let written = writer.finish().expect("finishing");
    assert_eq!(written.disk_size, 1_000_448);
    assert_eq!(info(&qcow2)["virtual-size"].as_u64(), Some(1_000_448));
    assert_clean(&qcow2);
    qemu_io(
        "qcow2",
        &qcow2,
        &["read -P 0xee 999990 11", "read -P 0 1000001 447"],
    );
}

#[test]
fn a_qcow2_written_here_decodes_again_from_a_stream_to_the_same_disk() {
    let s = Scratch::new();
    let disk = patchy_disk((12 << 20) + 512, 8);
    let reference = write(&s, "reference.raw", &disk);
    // Size declared first (L1 after the header) and last (raw streams: L1 after the data).
    let (_, size_last) =
        decode_to_qcow2(&s, &reference, Feed::Stream, TargetOptions::default()).expect("raw");
    let size_first = s.path("size-first.qcow2");
    let writer = Qcow2Writer::create(&size_first, TargetOptions::default()).expect("creating");
    writer.set_size(disk.len() as u64).expect("sizing");
    write_shuffled(&writer, &disk, None, 3);
    writer.finish().expect("finishing");
    for qcow2 in [size_first, size_last] {
        let (_, again) = decode_to_qcow2(&s, &qcow2, Feed::Stream, TargetOptions::default())
            .unwrap_or_else(|e| panic!("decoding {} again: {e}", qcow2.display()));
        assert_clean(&again);
        assert_identical(&reference, "raw", &again);
    }
}
