//! VDI images made by qemu-img and qemu-io decode, from a file and from a stream, to the
//! disk qemu reads from them; damaged ones end in an error.

// A failed fixture step must stop the test loudly.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

use dvcr_formats::{Format, Options, probe_path};
use dvcr_tests::{
    Feed, Scratch, Wrapper, assert_same_as_qemu, decode_to_raw, decodes_like_qemu, mixed_raw,
    qemu_img, qemu_io, write,
};

/// `qemu-img convert -O vdi [-o OPTIONS] SRC NAME` in the scratch dir.
fn convert(s: &Scratch, src: &Path, name: &str, options: Option<&str>) -> PathBuf {
    let out = s.path(name);
    let mut args = vec!["convert", "-q", "-O", "vdi"];
    if let Some(o) = options {
        args.extend(["-o", o]);
    }
    let (src, shown) = (src.to_string_lossy(), out.to_string_lossy());
    args.extend([&*src, &*shown]);
    qemu_img(&args);
    out
}

/// Decodes like qemu and checks the reported info is the probe's.
fn check(s: &Scratch, image: &Path) {
    let decoded = decodes_like_qemu(s, image, "vdi");
    let probed = probe_path(image).expect("probing the image");
    assert_eq!(decoded.info, probed.info);
    assert_eq!(decoded.info.format, Format::Vdi);
}

#[test]
fn a_dynamic_vdi_converted_by_qemu_img_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 24 << 20);
    let image = convert(&s, &raw, "a.vdi", None);
    check(&s, &image);
}

#[test]
fn a_static_vdi_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 13 << 20);
    let image = convert(&s, &raw, "static.vdi", Some("static=on"));
    check(&s, &image);
    let decoded = decodes_like_qemu(&s, &image, "vdi");
    assert_eq!(
        decoded
            .info
            .details
            .get("subformat")
            .map(ToString::to_string),
        Some("static".to_owned())
    );
}

#[test]
fn a_vdi_written_out_of_order_with_an_odd_size_decodes_like_qemu() {
    let s = Scratch::new();
    let image = s.path("random.vdi");
    // 40 MiB + 7 sectors: the last block is mostly outside the disk.
    let size = (40 << 20) + 7 * 512;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        &image.to_string_lossy(),
        &size.to_string(),
    ]);
    let end = size - 4096;
    qemu_io(
        "vdi",
        &image,
        &[
            "write -P 0xab 30M 1M",
            &format!("write -P 0xcd {end} 4096"),
            "write -P 0x11 0 64k",
            "write -P 0x22 10M 3M",
            "write -P 0x33 31000k 8k",
            &format!("write -P 0x44 {} 512", size - 512),
            "write -z 12M 512k",
        ],
    );
    check(&s, &image);
}

#[test]
fn a_vdi_in_xz_or_bzip2_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 9 << 20);
    let image = convert(&s, &raw, "a.vdi", None);
    for w in [Wrapper::Xz, Wrapper::Bzip2] {
        let wrapped = write(&s, &format!("a.vdi.{}", w.name()), &w.compress(&image));
        let (decoded, out) = decode_to_raw(&s, &wrapped, Feed::Stream, &Options::default())
            .unwrap_or_else(|e| panic!("{}: {e}", w.name()));
        assert_eq!(decoded.compression.len(), 1, "{}", w.name());
        assert_eq!(decoded.info.format, Format::Vdi);
        assert_same_as_qemu(&image, "vdi", &out);
    }
}

#[test]
fn a_truncated_vdi_ends_in_an_error_from_a_file_and_a_stream() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 6 << 20);
    let image = convert(&s, &raw, "a.vdi", None);
    let bytes = std::fs::read(&image).expect("reading the image");
    for cut in [0x100, 0x300, 1 << 20, (3 << 20) + 5, bytes.len() - 1] {
        let cut_image = write(&s, &format!("cut-{cut}.vdi"), &bytes[..cut]);
        for feed in [Feed::File, Feed::Stream] {
            let result = decode_to_raw(&s, &cut_image, feed, &Options::default());
            assert_eq!(
                result.err().map(|e| e.kind()),
                Some(dvcr_formats::ErrorKind::Truncated),
                "cut at {cut}, {feed:?}"
            );
        }
    }
}

#[test]
fn a_block_map_beyond_the_streamed_head_is_read_from_a_file_but_needs_one_from_a_stream() {
    let s = Scratch::new();
    // A VirtualBox-style layout pushed far out: the map at 80 MiB, the data at 81 MiB,
    // guest block 2 in data block 0 and guest block 0 in data block 1.
    let (map_at, data_at): (u32, u32) = (80 << 20, 81 << 20);
    let mut header = vec![0u8; 0x200];
    header[..17].copy_from_slice(b"<<< test VDI >>>\n");
    let fields: [(usize, u32); 11] = [
        (0x40, 0xbeda_107f),
        (0x44, 0x0001_0001),
        (0x48, 0x180),
        (0x4c, 1),
        (0x154, map_at),
        (0x158, data_at),
        (0x168, 512),
        (0x170, 4 << 20),
        (0x178, 1 << 20),
        (0x180, 4),
        (0x184, 2),
    ];
    for (at, value) in fields {
        header[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    let mut bytes = header;
    bytes.resize(map_at as usize, 0);
    for entry in [1u32, u32::MAX, 0, u32::MAX - 1] {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    bytes.resize(data_at as usize, 0);
    bytes.extend(dvcr_tests::noise(2 << 20, 3));
    let image = write(&s, "far.vdi", &bytes);
    let (decoded, out) =
        decode_to_raw(&s, &image, Feed::File, &Options::default()).expect("decoding from the file");
    assert_eq!(decoded.info.format, Format::Vdi);
    assert_same_as_qemu(&image, "vdi", &out);
    let streamed = decode_to_raw(&s, &image, Feed::Stream, &Options::default());
    assert_eq!(
        streamed.err().map(|e| e.kind()),
        Some(dvcr_formats::ErrorKind::NeedsRandomAccess)
    );
}
