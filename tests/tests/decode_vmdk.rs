//! Sparse vmdk images (streamOptimized and monolithicSparse) made by qemu-img and qemu-io,
//! and rewritten in VMware's layout, decode to the disk qemu reads, from a file and a stream; damaged ones end in an error.

// A failed fixture step must stop the test loudly.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use dvcr_formats::{ErrorKind, Options};
use dvcr_tests::{
    Feed, Scratch, Wrapper, decode_to_raw, decodes_like_qemu, mixed_raw, qemu_img, qemu_io, write,
};

const SUBFORMATS: [&str; 2] = ["streamOptimized", "monolithicSparse"];

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// `qemu-img convert -O vmdk -o subformat=SUBFORMAT raw out`.
fn convert(scratch: &Scratch, raw: &Path, subformat: &str) -> PathBuf {
    let out = scratch.path(&format!("{subformat}.vmdk"));
    let option = format!("subformat={subformat}");
    qemu_img(&["convert", "-O", "vmdk", "-o", &option, s(raw), s(&out)]);
    out
}

/// `qemu-img create -f vmdk -o OPTIONS name size`.
fn create(scratch: &Scratch, name: &str, options: &str, size: &str) -> PathBuf {
    let out = scratch.path(name);
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", options, s(&out), size]);
    out
}

/// The error kind of a decode that must fail.
fn refusal(scratch: &Scratch, image: &Path, feed: Feed) -> ErrorKind {
    match decode_to_raw(scratch, image, feed, &Options::default()) {
        Ok((decoded, _)) => panic!("{} decoded ({feed:?}): {decoded:?}", image.display()),
        Err(e) => e.kind(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A metadata marker sector: `{numSectors, size 0, type}`.
fn marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    put_u64(&mut m, 0, sectors);
    put_u32(&mut m, 12, kind);
    m
}

/// Rewrites a qemu streamOptimized image the way VMware writes one: header with the grain
/// directory "at the end", descriptor, the grains, then grain tables, the grain directory
/// and the footer, each behind its marker, and an end-of-stream marker. Returns the bytes.
fn vmware_style(qemu_image: &Path) -> Vec<u8> {
    let q = fs::read(qemu_image).expect("reading the qemu image");
    let capacity = u64_at(&q, 12);
    let grain = u64_at(&q, 20);
    let descriptor =
        (u64_at(&q, 28) * 512) as usize..((u64_at(&q, 28) + u64_at(&q, 36)) * 512) as usize;
    let gtes = u64::from(u32_at(&q, 44));
    let overhead = 64u64;
    let mut out = vec![0u8; (overhead * 512) as usize];
    out[descriptor.clone()].copy_from_slice(&q[descriptor]);

    // The grains, in qemu's order, up to its end-of-stream (zero) sector.
    let mut gt_entries = vec![0u32; capacity.div_ceil(grain) as usize];
    let mut at = (u64_at(&q, 64) * 512) as usize;
    while at + 12 <= q.len() && u32_at(&q, at + 8) != 0 {
        let total = (12 + u32_at(&q, at + 8) as usize).next_multiple_of(512);
        let lba = u64_at(&q, at);
        gt_entries[(lba / grain) as usize] = (out.len() / 512) as u32;
        out.extend_from_slice(&q[at..at + total]);
        at += total;
    }

    // Grain tables (only those that map something), then the directory.
    let gt_sectors = (gtes * 4).div_ceil(512);
    let mut gd = Vec::new();
    for table in gt_entries.chunks(gtes as usize) {
        if table.iter().all(|&e| e == 0) {
            gd.push(0u32);
            continue;
        }
        out.extend_from_slice(&marker(gt_sectors, 1));
        gd.push((out.len() / 512) as u32);
        let mut bytes = vec![0u8; (gt_sectors * 512) as usize];
        for (i, e) in table.iter().enumerate() {
            put_u32(&mut bytes, i * 4, *e);
        }
        out.extend_from_slice(&bytes);
    }
    let gd_sectors = (gd.len() as u64 * 4).div_ceil(512);
    out.extend_from_slice(&marker(gd_sectors, 2));
    let gd_offset = (out.len() / 512) as u64;
    let mut bytes = vec![0u8; (gd_sectors * 512) as usize];
    for (i, e) in gd.iter().enumerate() {
        put_u32(&mut bytes, i * 4, *e);
    }
    out.extend_from_slice(&bytes);

    let mut header = q[..512].to_vec();
    put_u32(&mut header, 8, u32_at(&q, 8) & !2); // no redundant directory
    put_u64(&mut header, 48, 0);
    put_u64(&mut header, 56, gd_offset);
    put_u64(&mut header, 64, overhead);
    out.extend_from_slice(&marker(1, 3));
    out.extend_from_slice(&header);
    out.extend_from_slice(&marker(0, 0));
    put_u64(&mut header, 56, u64::MAX);
    out[..512].copy_from_slice(&header);
    out
}

#[test]
fn vmdk_images_converted_by_qemu_decode_like_qemu() {
    let s = Scratch::new();
    // An odd size: the last grain is partial.
    let raw = mixed_raw(&s, "a.raw", (24 << 20) + 3 * 512);
    for subformat in SUBFORMATS {
        let image = convert(&s, &raw, subformat);
        let decoded = decodes_like_qemu(&s, &image, "vmdk");
        assert_eq!(decoded.info.format, dvcr_formats::Format::Vmdk);
        assert_eq!(decoded.info.virtual_size, (24 << 20) + 3 * 512);
        assert_eq!(
            decoded
                .info
                .details
                .get("subformat")
                .map(ToString::to_string),
            Some(subformat.to_owned())
        );
    }
}

#[test]
fn a_stream_optimized_vmdk_written_by_qemu_io_across_reopens_decodes_like_qemu() {
    let s = Scratch::new();
    // 1000005 KiB: the last 64 KiB grain holds 5 KiB.
    let image = create(&s, "so.vmdk", "subformat=streamOptimized", "1000005k");
    // streamOptimized takes whole, new grains only; each qemu-io run appends its grains
    // behind zero padding that reads like an end-of-stream marker.
    qemu_io(
        "vmdk",
        &image,
        &[
            "write -P 0xab 10M 64k",
            "write -P 0xcd 1M 128k",
            "write -P 0x77 1024000000 5120",
        ],
    );
    qemu_io("vmdk", &image, &["write -P 0x11 0 64k"]);
    qemu_io("vmdk", &image, &["write -P 0x22 900M 64k"]);
    let decoded = decodes_like_qemu(&s, &image, "vmdk");
    assert_eq!(decoded.info.virtual_size, 1_024_005_120);
    assert_eq!(decoded.data_bytes, 5 * 65536 + 5120);
}

#[test]
fn a_monolithic_sparse_vmdk_written_by_qemu_io_decodes_like_qemu() {
    let s = Scratch::new();
    let image = create(
        &s,
        "ms.vmdk",
        "subformat=monolithicSparse,zeroed_grain=on",
        "100000007b",
    );
    qemu_io(
        "vmdk",
        &image,
        &[
            "write -P 0xab 10M 1M",
            "write -P 0xcd 3000k 7k",
            "write -P 0x55 0 512",
            "write -P 0x66 99999744 263",
            "write -P 0x77 50M 64k",
            "write -z 10M 64k",
        ],
    );
    qemu_io(
        "vmdk",
        &image,
        &["write -P 0x99 5M 192k", "write -P 0xee 10M 4k"],
    );
    let decoded = decodes_like_qemu(&s, &image, "vmdk");
    assert_eq!(decoded.info.virtual_size, 100_000_256);
}

#[test]
fn vmdk_images_in_gzip_and_zstd_decode_from_a_stream_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 16 << 20);
    for subformat in SUBFORMATS {
        let image = convert(&s, &raw, subformat);
        for w in [Wrapper::Gzip, Wrapper::Zstd] {
            let wrapped = write(
                &s,
                &format!("{subformat}.vmdk.{}", w.name()),
                &w.compress(&image),
            );
            let (decoded, out) = decode_to_raw(&s, &wrapped, Feed::Stream, &Options::default())
                .unwrap_or_else(|e| panic!("{subformat} in {}: {e}", w.name()));
            assert_eq!(decoded.compression.len(), 1);
            dvcr_tests::assert_same_as_qemu(&image, "vmdk", &out);
        }
    }
}

#[test]
fn a_vmware_style_stream_optimized_vmdk_with_its_directory_at_the_end_decodes_like_qemu() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", (12 << 20) + 512);
    let qemu = convert(&s, &raw, "streamOptimized");
    let image = write(&s, "vmware.vmdk", &vmware_style(&qemu));
    let decoded = decodes_like_qemu(&s, &image, "vmdk");
    assert_eq!(
        decoded
            .info
            .details
            .get("grain-directory-at-end")
            .map(ToString::to_string)
            .as_deref(),
        Some("true")
    );
    assert_eq!(decoded.info.virtual_size, (12 << 20) + 512);
}

#[test]
fn a_footer_that_contradicts_the_header_decodes_from_a_file_but_not_from_a_stream() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 4 << 20);
    let qemu = convert(&s, &raw, "streamOptimized");
    let mut bytes = vmware_style(&qemu);
    // The header at the start claims twice the capacity; qemu believes the footer.
    let capacity = u64_at(&bytes, 12);
    put_u64(&mut bytes, 12, capacity * 2);
    let image = write(&s, "contradicts.vmdk", &bytes);
    let (_, out) = decode_to_raw(&s, &image, Feed::File, &Options::default())
        .unwrap_or_else(|e| panic!("decoding from the file: {e}"));
    dvcr_tests::assert_same_as_qemu(&image, "vmdk", &out);
    assert_eq!(
        refusal(&s, &image, Feed::Stream),
        ErrorKind::NeedsRandomAccess
    );
}

#[test]
fn truncated_vmdk_images_fail_to_decode_from_a_file_and_a_stream() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 8 << 20);
    for subformat in SUBFORMATS {
        let full = fs::read(convert(&s, &raw, subformat)).expect("reading the image");
        let first_grain = (u64_at(&full, 64) * 512) as usize;
        for cut in [
            300,
            4000,
            first_grain - 100,
            first_grain + 1000,
            first_grain + 70_000,
        ] {
            let image = write(&s, &format!("{subformat}-{cut}.vmdk"), &full[..cut]);
            for feed in [Feed::File, Feed::Stream] {
                let kind = refusal(&s, &image, feed);
                assert!(
                    matches!(kind, ErrorKind::Truncated | ErrorKind::OutOfBounds),
                    "{subformat} cut at {cut} ({feed:?}): {kind:?}"
                );
            }
        }
    }
    // The VMware layout must end with its footer: cut anywhere in the grains, it fails.
    let vmware = vmware_style(&convert(&s, &raw, "streamOptimized"));
    for cut in [64 * 512 + 1000, vmware.len() / 2, vmware.len() - 512] {
        let image = write(&s, &format!("vmware-{cut}.vmdk"), &vmware[..cut]);
        for feed in [Feed::File, Feed::Stream] {
            let kind = refusal(&s, &image, feed);
            assert!(
                matches!(kind, ErrorKind::Truncated | ErrorKind::Corrupt),
                "vmware cut at {cut} ({feed:?}): {kind:?}"
            );
        }
    }
}

#[test]
fn corrupted_grain_markers_and_table_entries_fail_to_decode() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 8 << 20);
    // A grain marker placing its grain past the disk, in the VMware layout.
    let mut vmware = vmware_style(&convert(&s, &raw, "streamOptimized"));
    put_u64(&mut vmware, 64 * 512, 1 << 40);
    let image = write(&s, "bad-lba.vmdk", &vmware);
    assert_eq!(refusal(&s, &image, Feed::Stream), ErrorKind::Corrupt);

    // A monolithicSparse grain table entry pointing far past the end of the file.
    let ms = convert(&s, &raw, "monolithicSparse");
    let mut bytes = fs::read(&ms).expect("reading the image");
    let gd = (u64_at(&bytes, 56) * 512) as usize;
    let gt = (u32_at(&bytes, gd) as usize) * 512;
    put_u32(&mut bytes, gt, 0x7fff_0000);
    let image = write(&s, "bad-gte.vmdk", &bytes);
    for feed in [Feed::File, Feed::Stream] {
        let kind = refusal(&s, &image, feed);
        assert!(
            matches!(kind, ErrorKind::Truncated | ErrorKind::OutOfBounds),
            "{feed:?}: {kind:?}"
        );
    }
    // Two guest grains sharing one host grain.
    let mut shared = fs::read(&ms).expect("reading the image");
    let first = u32_at(&shared, gt);
    put_u32(&mut shared, gt + 4, first);
    let image = write(&s, "shared.vmdk", &shared);
    assert_eq!(refusal(&s, &image, Feed::Stream), ErrorKind::Corrupt);
}
