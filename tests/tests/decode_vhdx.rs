//! VHDX images made by qemu decode to the disk qemu reads, from a file and from a stream; a
//! damaged block allocation table is refused, never a panic.

// Fixture helpers: a failed step must stop the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use dvcr_formats::{ErrorKind, FileView, Format, Options, vhdx};
use dvcr_tests::{
    Feed, Scratch, Wrapper, assert_same_as_qemu, decode_to_raw, decodes_like_qemu, mixed_raw,
    patch, qemu_img, qemu_io, write,
};

/// Where qemu puts the block allocation table (checked by `qemu_puts_the_bat_at_2_mib`).
const BAT: u64 = 2 << 20;

/// `qemu-img convert -O vhdx [-o OPTIONS]` of a 40 MiB mixed raw disk.
fn converted(s: &Scratch, name: &str, options: Option<&str>) -> PathBuf {
    let raw = mixed_raw(s, &format!("{name}.raw"), 40 << 20);
    let image = s.path(name);
    let mut args = vec!["convert", "-O", "vhdx"];
    if let Some(options) = options {
        args.extend(["-o", options]);
    }
    let (raw, image_str) = (raw.to_str().unwrap(), image.to_str().unwrap());
    args.extend([raw, image_str]);
    qemu_img(&args);
    image
}

/// `qemu-img create -f vhdx [-o OPTIONS] IMAGE SIZE` then the `qemu-io` commands.
fn created(s: &Scratch, name: &str, options: &str, size: u64, writes: &[&str]) -> PathBuf {
    let image = s.path(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([image.to_str().unwrap(), &size]);
    qemu_img(&args);
    qemu_io("vhdx", &image, writes);
    image
}

/// The BAT entry `index` of the image at `path`.
fn bat_entry(path: &Path, index: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let at = (BAT + 8 * index) as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The layout the header parser finds in the image at `path`.
fn layout(path: &Path) -> vhdx::Layout {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    vhdx::parse(&FileView::new(file, len)).unwrap()
}

/// Decodes `image` from a file and a stream; both must fail with `kind` and a message
/// containing `needle`.
#[track_caller]
fn assert_refused(s: &Scratch, image: &Path, kind: ErrorKind, needle: &str) {
    for feed in [Feed::File, Feed::Stream] {
        match decode_to_raw(s, image, feed, &Options::default()) {
            Ok(_) => panic!("{} was decoded ({feed:?})", image.display()),
            Err(e) => {
                assert_eq!(e.kind(), kind, "{feed:?}: {e}");
                assert!(e.message().contains(needle), "{feed:?}: {e}");
            }
        }
    }
}

#[test]
fn qemu_puts_the_bat_at_2_mib_and_the_metadata_at_3_mib() {
    let s = Scratch::new();
    let image = converted(&s, "d.vhdx", None);
    let layout = layout(&image);
    assert_eq!((layout.bat.offset, layout.metadata.offset), (BAT, 3 << 20));
    // The first block of a converted image is present (state 6), after the metadata.
    let first = bat_entry(&image, 0);
    assert_eq!(first & 7, 6);
    assert!(first >> 20 >= 4, "first block at {} MiB", first >> 20);
}

#[test]
fn a_dynamic_vhdx_converted_by_qemu_decodes_like_qemu() {
    let s = Scratch::new();
    let image = converted(&s, "d.vhdx", None);
    let decoded = decodes_like_qemu(&s, &image, "vhdx");
    assert_eq!(decoded.info.format, Format::Vhdx);
    assert_eq!(decoded.info.virtual_size, 40 << 20);
    // Zero blocks of the source are not allocated, so less than the disk is data.
    assert!(decoded.data_bytes < 40 << 20, "{}", decoded.data_bytes);
}

#[test]
fn a_fixed_vhdx_decodes_like_qemu() {
    let s = Scratch::new();
    let image = converted(&s, "f.vhdx", Some("subformat=fixed"));
    let decoded = decodes_like_qemu(&s, &image, "vhdx");
    assert_eq!(decoded.info.details.get("subformat"), Some(&"fixed".into()));
}

#[test]
fn vhdx_images_with_1_mib_and_32_mib_blocks_decode_like_qemu() {
    let s = Scratch::new();
    for block_size in ["1M", "32M"] {
        let name = format!("b{block_size}.vhdx");
        let image = converted(&s, &name, Some(&format!("block_size={block_size}")));
        let decoded = decodes_like_qemu(&s, &image, "vhdx");
        let expected = if block_size == "1M" {
            1u64 << 20
        } else {
            32 << 20
        };
        assert_eq!(
            decoded.info.details.get("block-size"),
            Some(&expected.into()),
            "{block_size}"
        );
    }
}

#[test]
fn vhdx_images_with_a_larger_log_decode_like_qemu() {
    let s = Scratch::new();
    for (log_size, bat_mib) in [("1M", 2), ("8M", 9)] {
        let name = format!("log{log_size}.vhdx");
        let image = converted(&s, &name, Some(&format!("log_size={log_size}")));
        // A larger log pushes the BAT and metadata further into the file.
        assert_eq!(layout(&image).bat.offset, bat_mib << 20, "{log_size}");
        let decoded = decodes_like_qemu(&s, &image, "vhdx");
        assert_eq!(decoded.info.virtual_size, 40 << 20, "{log_size}");
    }
}

#[test]
fn a_fixed_vhdx_written_by_qemu_io_decodes_like_qemu() {
    let s = Scratch::new();
    // qemu marks the unwritten blocks of a new fixed image ZERO; written ones become present.
    let image = created(
        &s,
        "fixed-rw.vhdx",
        "subformat=fixed,block_size=1M",
        10 << 20,
        &["write -P 0x11 3M 4k", "write -P 0x12 0 1M"],
    );
    assert_eq!(bat_entry(&image, 1) & 7, 2, "a zero block");
    let decoded = decodes_like_qemu(&s, &image, "vhdx");
    assert_eq!(decoded.data_bytes, 2 << 20);
}

#[test]
fn random_writes_stored_out_of_guest_order_decode_like_qemu() {
    let s = Scratch::new();
    // An odd size (not a multiple of the block size), written last block first so that the
    // file holds the blocks in reverse guest order, with a write ending at the last sector.
    let size = (19 << 20) + 7 * 512;
    let image = created(
        &s,
        "rw.vhdx",
        "block_size=1M",
        size,
        &[
            &format!("write -P 0xe1 {} 1536", size - 1536),
            "write -P 0xa5 12M 3000k",
            "write -P 0x11 0 4k",
            "write -P 0x22 1020k 8k",
            "write -z 5M 1M",
            "write -P 0x33 18M 100k",
        ],
    );
    // Block 0 went in after blocks 19, 12.. : the file order is not the guest order.
    assert!(bat_entry(&image, 0) >> 20 > bat_entry(&image, 19) >> 20);
    let decoded = decodes_like_qemu(&s, &image, "vhdx");
    assert_eq!(decoded.info.virtual_size, size);
}

#[test]
fn an_odd_sized_vhdx_with_data_in_its_last_partial_block_decodes_like_qemu() {
    let s = Scratch::new();
    let size = (70 << 20) + 512;
    let image = created(
        &s,
        "tail.vhdx",
        "",
        size,
        &[
            &format!("write -P 0x5a {} 512", size - 512),
            "write -P 0x6b 0 1M",
        ],
    );
    decodes_like_qemu(&s, &image, "vhdx");
}

#[test]
fn a_disk_larger_than_one_chunk_maps_blocks_past_the_sector_bitmap_entry() {
    let s = Scratch::new();
    // With 1 MiB blocks a chunk is 4096 blocks (4 GiB); blocks 4096 and on sit one BAT entry
    // further along, after the first sector bitmap entry.
    let image = created(
        &s,
        "big.vhdx",
        "block_size=1M",
        (4 << 30) + (3 << 20),
        &[
            "write -P 0x71 4095M 1M",
            "write -P 0x72 4096M 1M",
            "write -P 0x73 4098M 512k",
        ],
    );
    assert_eq!(bat_entry(&image, 4096) & 7, 0, "the bitmap entry");
    assert_eq!(bat_entry(&image, 4097) & 7, 6, "guest block 4096");
    let decoded = decodes_like_qemu(&s, &image, "vhdx");
    assert_eq!(decoded.data_bytes, 3 << 20);
}

#[test]
fn a_vhdx_wrapped_in_gzip_or_xz_decodes_like_qemu() {
    let s = Scratch::new();
    let image = converted(&s, "w.vhdx", None);
    for wrapper in [Wrapper::Gzip, Wrapper::Xz] {
        let wrapped = write(
            &s,
            &format!("w.vhdx.{}", wrapper.name()),
            &wrapper.compress(&image),
        );
        let (decoded, raw) = decode_to_raw(&s, &wrapped, Feed::Stream, &Options::default())
            .unwrap_or_else(|e| panic!("{}: {e}", wrapper.name()));
        assert_eq!(decoded.compression.len(), 1, "{}", wrapper.name());
        assert_eq!(decoded.info.format, Format::Vhdx);
        assert_same_as_qemu(&image, "vhdx", &raw);
    }
}

#[test]
fn a_bat_entry_beyond_the_end_of_the_file_is_refused() {
    let s = Scratch::new();
    let image = converted(&s, "beyond.vhdx", Some("block_size=1M"));
    patch(&image, BAT + 8, &((1u64 << 40) | 6).to_le_bytes());
    assert_refused(&s, &image, ErrorKind::Truncated, "truncated");
}

#[test]
fn a_bat_entry_pointing_into_the_bat_is_refused() {
    let s = Scratch::new();
    let image = converted(&s, "overlap.vhdx", Some("block_size=1M"));
    patch(&image, BAT + 8, &(BAT | 6).to_le_bytes());
    assert_refused(
        &s,
        &image,
        ErrorKind::Corrupt,
        "inside the block allocation table",
    );
}

#[test]
fn a_partially_present_bat_entry_is_refused() {
    let s = Scratch::new();
    let image = converted(&s, "partial.vhdx", Some("block_size=1M"));
    let entry = bat_entry(&image, 0);
    patch(&image, BAT, &((entry & !7) | 7).to_le_bytes());
    assert_refused(&s, &image, ErrorKind::Unsupported, "differencing");
}

#[test]
fn two_bat_entries_on_the_same_block_are_refused() {
    let s = Scratch::new();
    let image = converted(&s, "twice.vhdx", Some("block_size=1M"));
    let entry = bat_entry(&image, 0);
    patch(&image, BAT + 8 * 30, &entry.to_le_bytes());
    assert_refused(&s, &image, ErrorKind::Corrupt, "same file bytes");
}
