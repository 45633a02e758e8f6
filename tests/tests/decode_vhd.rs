//! VHD images (qemu's `vpc`) made by qemu-img and qemu-io decode, from a file and from a
//! stream, to the disk qemu reads from them; damaged ones end in an error.

// A failed fixture step must stop the test loudly.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

use dvcr_formats::{ErrorKind, Format, Options, probe_path};
use dvcr_tests::{
    Feed, Scratch, Wrapper, assert_same_as_qemu, decode_to_raw, decodes_like_qemu, mixed_raw,
    qemu_img, qemu_io, write,
};

/// `qemu-img convert -O vpc [-o OPTIONS] SRC NAME` in the scratch dir.
fn convert(s: &Scratch, src: &Path, name: &str, options: Option<&str>) -> PathBuf {
    let out = s.path(name);
    let mut args = vec!["convert", "-q", "-O", "vpc"];
    if let Some(o) = options {
        args.extend(["-o", o]);
    }
    let (src, shown) = (src.to_string_lossy(), out.to_string_lossy());
    args.extend([&*src, &*shown]);
    qemu_img(&args);
    out
}

/// Decodes like qemu and checks the reported info is the probe's; returns the subformat.
fn check(s: &Scratch, image: &Path) -> String {
    let decoded = decodes_like_qemu(s, image, "vpc");
    let probed = probe_path(image).expect("probing the image");
    assert_eq!(decoded.info, probed.info);
    assert_eq!(decoded.info.format, Format::Vpc);
    decoded
        .info
        .details
        .get("subformat")
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[test]
fn a_dynamic_vhd_converted_by_qemu_img_decodes_like_qemu() {
    let s = Scratch::new();
    // Not a whole number of 2 MiB blocks, and rounded to a CHS geometry by qemu.
    let raw = mixed_raw(&s, "a.raw", 23 << 20);
    let image = convert(&s, &raw, "a.vhd", None);
    assert_eq!(check(&s, &image), "dynamic");
}

#[test]
fn a_dynamic_vhd_with_a_forced_size_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", (11 << 20) + 3 * 512);
    let image = convert(&s, &raw, "forced.vhd", Some("force_size=on"));
    assert_eq!(check(&s, &image), "dynamic");
}

#[test]
fn a_fixed_vhd_decodes_like_qemu() {
    let s = Scratch::new();
    for (name, options) in [
        ("fixed.vhd", "subformat=fixed"),
        ("fixed-forced.vhd", "subformat=fixed,force_size=on"),
    ] {
        let raw = mixed_raw(&s, "a.raw", (9 << 20) + 512);
        let image = convert(&s, &raw, name, Some(options));
        assert_eq!(check(&s, &image), "fixed", "{options}");
    }
}

#[test]
fn a_vhd_written_out_of_order_with_an_odd_size_decodes_like_qemu() {
    let s = Scratch::new();
    for (name, options) in [
        ("random.vhd", "force_size=off"),
        ("forced.vhd", "force_size=on"),
    ] {
        let image = s.path(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            options,
            &image.to_string_lossy(),
            "37748736", // 36 MiB
        ]);
        let (_, size) = dvcr_tests::qemu_info(&image, Some("vpc"));
        qemu_io(
            "vpc",
            &image,
            &[
                "write -P 0xab 30M 1M",
                &format!("write -P 0xcd {} 4096", size - 4096),
                "write -P 0x11 0 64k",
                "write -P 0x22 9M 5M",
                "write -P 0x33 31000k 8k",
                &format!("write -P 0x44 {} 512", size - 512),
                "write -z 12M 512k",
            ],
        );
        assert_eq!(check(&s, &image), "dynamic", "{options}");
    }
}

#[test]
fn a_vhd_in_xz_or_bzip2_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 9 << 20);
    let image = convert(&s, &raw, "a.vhd", None);
    for w in [Wrapper::Xz, Wrapper::Bzip2] {
        let wrapped = write(&s, &format!("a.vhd.{}", w.name()), &w.compress(&image));
        let (decoded, out) = decode_to_raw(&s, &wrapped, Feed::Stream, &Options::default())
            .unwrap_or_else(|e| panic!("{}: {e}", w.name()));
        assert_eq!(decoded.compression.len(), 1, "{}", w.name());
        assert_eq!(decoded.info.format, Format::Vpc);
        assert_same_as_qemu(&image, "vpc", &out);
    }
}

/// The VHD checksum of `bytes`, the field at `field_at` counted as zeros.
fn checksum(bytes: &[u8], field_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field_at..field_at + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// A dynamic VHD with `block_size`-byte blocks and 8 entries, its BAT at `table_at`, block
/// 0 allocated right after the BAT's sector: 512 bytes of 0x01 (where the bitmap of a 4 KiB
/// block would be), then 0x02.
fn hand_made_vhd(block_size: u32, table_at: usize) -> Vec<u8> {
    let size = 8 * u64::from(block_size);
    let mut footer = vec![0u8; 512];
    footer[..8].copy_from_slice(b"conectix");
    footer[8..12].copy_from_slice(&2u32.to_be_bytes());
    footer[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    footer[16..24].copy_from_slice(&512u64.to_be_bytes());
    footer[28..32].copy_from_slice(b"qem2");
    footer[40..48].copy_from_slice(&size.to_be_bytes());
    footer[48..56].copy_from_slice(&size.to_be_bytes());
    footer[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    footer[60..64].copy_from_slice(&3u32.to_be_bytes());
    let sum = checksum(&footer, 64);
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    let mut header = vec![0u8; 1024];
    header[..8].copy_from_slice(b"cxsparse");
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    header[16..24].copy_from_slice(&(table_at as u64).to_be_bytes());
    header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    header[28..32].copy_from_slice(&8u32.to_be_bytes());
    header[32..36].copy_from_slice(&block_size.to_be_bytes());
    let sum = checksum(&header, 36);
    header[36..40].copy_from_slice(&sum.to_be_bytes());
    let mut bat = vec![0xffu8; 512];
    bat[..4].copy_from_slice(&(table_at as u32 / 512 + 1).to_be_bytes());
    let gap = vec![0u8; table_at - 1536];
    let mut image = [footer.clone(), header, gap, bat, vec![1u8; 512]].concat();
    image.extend(std::iter::repeat_n(2u8, block_size as usize));
    image.extend_from_slice(&footer);
    image
}

#[test]
fn blocks_under_4_kib_have_no_sector_bitmap_exactly_as_qemu_reads_them() {
    let s = Scratch::new();
    for block_size in [512u32, 1024, 2048, 4096, 8192] {
        let image = write(
            &s,
            &format!("small-{block_size}.vhd"),
            &hand_made_vhd(block_size, 1536),
        );
        check(&s, &image);
    }
}

#[test]
fn a_truncated_vhd_ends_in_an_error_from_a_file_and_a_stream() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 6 << 20);
    let image = convert(&s, &raw, "a.vhd", None);
    let bytes = std::fs::read(&image).expect("reading the image");
    let len = bytes.len();
    for cut in [100, 700, 1600, 1 << 20, (3 << 20) + 5, len - 512, len - 1] {
        let cut_image = write(&s, &format!("cut-{cut}.vhd"), &bytes[..cut]);
        for feed in [Feed::File, Feed::Stream] {
            let result = decode_to_raw(&s, &cut_image, feed, &Options::default());
            assert_eq!(
                result.err().map(|e| e.kind()),
                Some(ErrorKind::Truncated),
                "cut at {cut}, {feed:?}"
            );
        }
    }
}

#[test]
fn a_block_table_beyond_the_streamed_head_is_read_from_a_file_but_needs_one_from_a_stream() {
    let s = Scratch::new();
    // The BAT at 80 MiB, beyond the 64 MiB a stream keeps.
    let image = write(&s, "far.vhd", &hand_made_vhd(1 << 20, 80 << 20));
    let (decoded, out) =
        decode_to_raw(&s, &image, Feed::File, &Options::default()).expect("decoding from the file");
    assert_eq!(decoded.info.format, Format::Vpc);
    assert_same_as_qemu(&image, "vpc", &out);
    let streamed = decode_to_raw(&s, &image, Feed::Stream, &Options::default());
    assert_eq!(
        streamed.err().map(|e| e.kind()),
        Some(ErrorKind::NeedsRandomAccess)
    );
}
