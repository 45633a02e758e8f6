//! VirtualBox VDI images: header parsing, validation, and the virtual size exactly as
//! `qemu-img info` reports it.
//!
//! A VDI starts with a 64-byte text banner, the little-endian signature `0xbeda107f` at
//! 0x40, the version and the header proper. The header locates the block map (one 32-bit
//! entry per 1 MiB block of the disk, naming the block's place in the data area, or
//! "unallocated") and the data area. Version 1.1 is what VirtualBox and qemu write, and the
//! only one qemu opens.
//!
//! The virtual size is the header's disk size rounded up to whole sectors, as qemu does (some
//! converters write sizes that are not a multiple of 512). Checks follow qemu's (version,
//! sector size, block size, alignment, link and parent UUIDs, the block map's room for the
//! disk) and go further: image types that need a parent are refused, the block map and the
//! allocated blocks must lie inside the file, and every map entry must name an allocated block,
//! no block twice. [`decode`] streams the data area using the same parser.

pub mod decode;

use crate::error::{Result, err};
use crate::view::{Fields, View};
use crate::{Format, ImageInfo, MAX_VIRTUAL_SIZE};

/// The signature at [`SIGNATURE_AT`], little-endian.
const SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();
const SIGNATURE_AT: usize = 0x40;
/// Version 1.1: major in the high half.
const VERSION_1_1: u32 = 0x0001_0001;
/// The header size field counts from here (after banner, signature, version and itself).
const HEADER_START: u64 = 0x48;
/// The smallest version 1.1 header, which holds every field read here (larger headers add
/// fields after these).
const MIN_HEADER_SIZE: u32 = 0x180;
/// Bytes read from the start: banner, pre-header and the fields of the smallest header.
const HEADER_READ: usize = 0x1c8;

/// Image types.
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;

const SECTOR: u64 = 512;
/// The only block size qemu (and VirtualBox by default) uses.
const BLOCK_SIZE: u32 = 1 << 20;
/// The most blocks accepted: 4 Mi (a 4 TiB disk, a 16 MiB block map). qemu allows more
/// (about 2^29 blocks), but every map entry is validated here, and a larger map would not fit
/// the metadata a streaming probe keeps.
const MAX_BLOCKS: u32 = 1 << 22;
/// Block map entries that name no block: never written, and discarded (both read as zeros).
const UNALLOCATED: u32 = u32::MAX;
const DISCARDED: u32 = u32::MAX - 1;
/// The block map is read in pieces of this many bytes, each well under the view's read limit.
const MAP_CHUNK: usize = 1 << 20;

/// Whether the first bytes of an image are a VDI (the signature at 0x40).
pub(crate) fn matches(head: &[u8]) -> bool {
    head.get(SIGNATURE_AT..SIGNATURE_AT + 4) == Some(&SIGNATURE[..])
}

/// Validates a VDI image and computes its virtual size.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    parse(view, &mut |_, _| {}).map(|header| header.info)
}

/// What the decoder needs of a validated VDI besides its block map.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// What [`probe`] reports.
    pub info: ImageInfo,
    /// The virtual size in bytes.
    pub size: u64,
    /// Where block 0 of the data area starts.
    pub data_at: u64,
    /// Blocks in the data area (each map entry names one of them).
    pub allocated: u32,
}

/// The size of every block, in bytes (the only one accepted).
pub(crate) const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;

/// Validates a VDI image like [`probe`], calling `visit(guest_block, data_block)` for every
/// block map entry that names a block of the data area. Every data block is named at most
/// once: a second entry naming it is corruption.
pub(crate) fn parse(view: &dyn View, visit: &mut dyn FnMut(u32, u32)) -> Result<Header> {
    let bytes = view.read(0, HEADER_READ, "the VDI header")?;
    let h = Fields::new(&bytes, "VDI header");
    if h.array::<4>(SIGNATURE_AT)? != SIGNATURE {
        return Err(err!(
            InvalidFormat,
            "the image lacks the VDI signature at offset 0x40; it is not a VDI or is damaged"
        ));
    }
    let version = h.u32_le(0x44)?;
    if version != VERSION_1_1 {
        return Err(err!(
            Unsupported,
            "the VDI has header version {}.{}, and only 1.1 is supported; convert it with a \
             current VirtualBox (`VBoxManage clonemedium`) first",
            version >> 16,
            version & 0xffff
        ));
    }
    let header_size = h.u32_le(0x48)?;
    if header_size < MIN_HEADER_SIZE {
        return Err(err!(
            InvalidFormat,
            "the VDI header declares {header_size} bytes, fewer than the {MIN_HEADER_SIZE} of a \
             version 1.1 header: the file is damaged; download it again"
        ));
    }
    let image_type = h.u32_le(0x4c)?;
    let subformat = match image_type {
        TYPE_NORMAL => "dynamic",
        TYPE_FIXED => "static",
        TYPE_UNDO | TYPE_DIFF => {
            return Err(err!(
                Unsupported,
                "the VDI is a {} image that needs its parent; clone it into a standalone image \
                 first (`VBoxManage clonemedium` of the snapshot, or `qemu-img convert`)",
                if image_type == TYPE_UNDO {
                    "undo"
                } else {
                    "differencing"
                }
            ));
        }
        other => {
            return Err(err!(
                InvalidFormat,
                "the VDI declares image type {other} (1 dynamic, 2 static expected): the file is \
                 damaged or not a VDI"
            ));
        }
    };
    // A non-null link or parent UUID also means a snapshot that needs its parent; qemu
    // refuses those.
    for (at, which) in [(0x1a8, "link"), (0x1b8, "parent")] {
        if h.slice(at, 16)?.iter().any(|&b| b != 0) {
            return Err(err!(
                Unsupported,
                "the VDI names a {which} image (a snapshot that needs its parent); clone it into \
                 a standalone image first (`VBoxManage clonemedium` or `qemu-img convert`)"
            ));
        }
    }

    let sector_size = h.u32_le(0x168)?;
    if u64::from(sector_size) != SECTOR {
        return Err(err!(
            Unsupported,
            "the VDI declares {sector_size}-byte sectors; only 512 is supported; convert the \
             image to raw or qcow2 with VirtualBox first"
        ));
    }
    let block_size = h.u32_le(0x178)?;
    if block_size != BLOCK_SIZE {
        return Err(err!(
            Unsupported,
            "the VDI uses {block_size}-byte blocks; only 1 MiB blocks are supported (as in \
             qemu); convert the image with `VBoxManage clonemedium` first"
        ));
    }
    let block_extra = h.u32_le(0x17c)?;
    if block_extra != 0 {
        // qemu ignores this field and would read every block at the wrong place.
        return Err(err!(
            Unsupported,
            "the VDI keeps {block_extra} extra bytes in front of each block, which qemu cannot \
             read; convert the image with `VBoxManage clonemedium` first"
        ));
    }

    let map_at = u64::from(h.u32_le(0x154)?);
    let data_at = u64::from(h.u32_le(0x158)?);
    for (offset, what) in [(map_at, "block map"), (data_at, "data area")] {
        if !offset.is_multiple_of(SECTOR) {
            return Err(err!(
                InvalidFormat,
                "the VDI's {what} offset {offset:#x} is not a multiple of 512: the header is \
                 damaged; download the image again"
            ));
        }
    }

    let blocks = h.u32_le(0x180)?;
    let allocated = h.u32_le(0x184)?;
    if blocks > MAX_BLOCKS {
        return Err(err!(
            Unsupported,
            "the VDI has {blocks} blocks, more than the {MAX_BLOCKS} (4 TiB) supported; convert \
             it to qcow2 or raw first"
        ));
    }
    if allocated > blocks {
        return Err(err!(
            Corrupt,
            "the VDI claims {allocated} allocated blocks out of {blocks}: the header is damaged; \
             download the image again"
        ));
    }

    let disk_size = h.u64_le(0x170)?;
    if disk_size > MAX_VIRTUAL_SIZE {
        return Err(err!(
            OutOfBounds,
            "the VDI declares a {disk_size}-byte disk, beyond the {MAX_VIRTUAL_SIZE} bytes \
             accepted: the header is damaged"
        ));
    }
    // Rounded up like qemu; cannot overflow below MAX_VIRTUAL_SIZE.
    let size = disk_size.next_multiple_of(SECTOR);
    let room = u64::from(blocks) * u64::from(BLOCK_SIZE);
    if size > room {
        return Err(err!(
            Corrupt,
            "the VDI declares a {size}-byte disk but its block map has room for only {room} \
             bytes: the header is damaged; download the image again"
        ));
    }

    // Layout: header, then the block map, then the data area.
    let header_end = HEADER_START + u64::from(header_size);
    let map_len = u64::from(blocks) * 4;
    let map_end = map_at + map_len;
    if map_at < header_end || map_end > data_at {
        return Err(err!(
            Corrupt,
            "the VDI's block map (bytes {map_at}..{map_end}) overlaps its header (ending at \
             {header_end}) or its data area (from {data_at}): the file is damaged; download it \
             again"
        ));
    }
    if view.len_known() {
        let len = view.len();
        if data_at > len {
            return Err(err!(
                Truncated,
                "the VDI is truncated: its data area starts at byte {data_at} but the file has \
                 only {len} bytes; download it again"
            ));
        }
        let data_end = data_at + u64::from(allocated) * u64::from(BLOCK_SIZE);
        if data_end > len {
            return Err(err!(
                Truncated,
                "the VDI is truncated: its {allocated} allocated blocks end at byte {data_end} \
                 but the file has only {len} bytes; download it again"
            ));
        }
    }

    // One bit per data block, to find entries that share a block. qemu would read the same
    // data for both guest blocks; that only happens in damaged or crafted images, and a
    // single pass could not hand the block out twice without keeping it.
    let mut taken = vec![0u64; (allocated as usize).div_ceil(64)];
    let mut used: u64 = 0;
    let mut done: u64 = 0;
    while done < map_len {
        let piece = (map_len - done).min(MAP_CHUNK as u64) as usize;
        let chunk = view.read(map_at + done, piece, "the VDI block map")?;
        for (i, entry) in chunk.chunks_exact(4).enumerate() {
            let &[a, b, c, d] = entry else { continue };
            let block = u32::from_le_bytes([a, b, c, d]);
            if block == UNALLOCATED || block == DISCARDED {
                continue;
            }
            if block >= allocated {
                return Err(err!(
                    Corrupt,
                    "the VDI's block map sends block {} to data block {block}, but only \
                     {allocated} are allocated: the file is damaged; download it again",
                    done / 4 + i as u64
                ));
            }
            let guest = done / 4 + i as u64;
            let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
            // In bounds: block < allocated.
            if taken[word] & bit != 0 {
                return Err(err!(
                    Corrupt,
                    "the VDI's block map sends block {guest} to data block {block}, which an \
                     earlier block already uses: the file is damaged; download it again or \
                     repair it with `VBoxManage repairhd`"
                ));
            }
            taken[word] |= bit;
            // Below MAX_BLOCKS: the map has `blocks` entries.
            visit(guest as u32, block);
            used += 1;
        }
        done += piece as u64;
    }

    let info = ImageInfo::new(Format::Vdi, size)
        .with("subformat", subformat)
        .with("block-size", block_size)
        .with("allocated-blocks", used);
    Ok(Header {
        info,
        size,
        data_at,
        allocated,
    })
}

/// Runs the probe on arbitrary bytes and ignores the outcome: the entry point of the fuzz
/// targets, which look for panics only.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = probe(&crate::view::SliceView(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::detect::detect;
    use crate::probe::{StreamProbe, probe_path};
    use crate::testing::{Scratch, assert_refused, both_ways, qemu_img, qemu_info};
    use crate::view::SliceView;
    use std::path::Path;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn qemu_create(path: &Path, static_: bool, size: &str) -> std::result::Result<(), String> {
        let options = if static_ { "static=on" } else { "static=off" };
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vdi",
            "-o",
            options,
            &path.to_string_lossy(),
            size,
        ])
        .map(drop)
    }

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// A hand-made VDI: `disk_size` bytes, the block map at `map_at`, the data area at the
    /// next sector after the map (or `data_at` when larger), the first `allocated` blocks
    /// stored in order.
    struct Layout {
        disk_size: u64,
        map_at: u32,
        data_at: u32,
        allocated: u32,
        image_type: u32,
    }

    impl Layout {
        fn dynamic(disk_size: u64, allocated: u32) -> Self {
            Self {
                disk_size,
                map_at: 0x200,
                data_at: 0,
                allocated,
                image_type: TYPE_NORMAL,
            }
        }

        fn build(&self) -> Vec<u8> {
            let blocks = self.disk_size.div_ceil(u64::from(BLOCK_SIZE)) as u32;
            let map_end = self.map_at as usize + blocks as usize * 4;
            let data_at = map_end.next_multiple_of(512).max(self.data_at as usize);
            let mut image = vec![0u8; data_at + self.allocated as usize * BLOCK_SIZE as usize];
            image[..17].copy_from_slice(b"<<< test VDI >>>\n");
            image[SIGNATURE_AT..SIGNATURE_AT + 4].copy_from_slice(&SIGNATURE);
            put_u32(&mut image, 0x44, VERSION_1_1);
            put_u32(&mut image, 0x48, MIN_HEADER_SIZE);
            put_u32(&mut image, 0x4c, self.image_type);
            put_u32(&mut image, 0x154, self.map_at);
            put_u32(&mut image, 0x158, data_at as u32);
            put_u32(&mut image, 0x168, 512);
            put_u64(&mut image, 0x170, self.disk_size);
            put_u32(&mut image, 0x178, BLOCK_SIZE);
            put_u32(&mut image, 0x180, blocks);
            put_u32(&mut image, 0x184, self.allocated);
            image[0x188..0x198].fill(0x5a);
            for i in 0..blocks {
                let entry = if i < self.allocated { i } else { UNALLOCATED };
                put_u32(&mut image, self.map_at as usize + i as usize * 4, entry);
            }
            image
        }
    }

    /// A 10 MiB dynamic image with three allocated blocks, altered by `edit`.
    fn edited(edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let mut image = Layout::dynamic(10 << 20, 3).build();
        edit(&mut image);
        image
    }

    fn detail(info: &ImageInfo, key: &str) -> Option<String> {
        info.details.get(key).map(ToString::to_string)
    }

    #[test]
    fn vdis_made_by_qemu_img_have_the_size_qemu_img_reports() -> TestResult {
        let scratch = Scratch::new("vdi-sizes")?;
        let sizes = [
            "0",
            "1",
            "511",
            "513",
            "1M",
            "1048577",
            "100M",
            "1073742336",
            "5G",
        ];
        for (static_, subformat) in [(false, "dynamic"), (true, "static")] {
            for size in sizes {
                let path = scratch.path(&format!("{size}-{subformat}.vdi"));
                qemu_create(&path, static_, size)?;
                let (format, expected) = qemu_info(&path, None)?;
                assert_eq!(format, "vdi");
                let info = if std::fs::metadata(&path)?.len() <= 16 << 20 {
                    let bytes = std::fs::read(&path)?;
                    assert_eq!(
                        both_ways(&bytes),
                        Ok((Format::Vdi, expected)),
                        "{size} {subformat}"
                    );
                    probe(&SliceView(&bytes))?
                } else {
                    // Large static images are sparse files: read their headers only.
                    probe_path(&path)?.info
                };
                assert_eq!(
                    (info.format, info.virtual_size),
                    (Format::Vdi, expected),
                    "{size}"
                );
                assert_eq!(detail(&info, "subformat").as_deref(), Some(subformat));
                assert_eq!(detail(&info, "block-size").as_deref(), Some("1048576"));
            }
        }
        Ok(())
    }

    #[test]
    fn qemu_img_rounds_tiny_sizes_up_to_a_sector() -> TestResult {
        // Observed with qemu-img 10.0: `create -f vdi x.vdi 1` makes a 512-byte disk, 513
        // bytes a 1024-byte one, 1048577 bytes a 1049088-byte one.
        let scratch = Scratch::new("vdi-tiny")?;
        for (size, expected) in [("1", 512), ("513", 1024), ("1048577", 1_049_088)] {
            let path = scratch.path(&format!("{size}.vdi"));
            qemu_create(&path, false, size)?;
            assert_eq!(
                both_ways(&std::fs::read(&path)?),
                Ok((Format::Vdi, expected))
            );
        }
        Ok(())
    }

    #[test]
    fn a_disk_size_off_the_sector_grid_is_rounded_up_like_qemu() -> TestResult {
        let scratch = Scratch::new("vdi-odd")?;
        let image = Layout::dynamic((100 << 20) - 100, 0).build();
        let path = scratch.path("odd.vdi");
        std::fs::write(&path, &image)?;
        assert_eq!(qemu_info(&path, None)?, ("vdi".to_owned(), 100 << 20));
        assert_eq!(both_ways(&image), Ok((Format::Vdi, 100 << 20)));
        Ok(())
    }

    #[test]
    fn hand_made_images_are_accepted_by_qemu_img_with_the_same_size() -> TestResult {
        let scratch = Scratch::new("vdi-hand-made")?;
        let far = Layout {
            disk_size: 300 << 20,
            map_at: 1 << 20,
            data_at: 2 << 20,
            allocated: 2,
            image_type: TYPE_NORMAL,
        };
        let fixed = Layout {
            image_type: TYPE_FIXED,
            ..Layout::dynamic(4 << 20, 4)
        };
        for (name, layout) in [
            ("dynamic", Layout::dynamic(10 << 20, 3)),
            ("far", far),
            ("fixed", fixed),
        ] {
            let image = layout.build();
            let path = scratch.path(&format!("{name}.vdi"));
            std::fs::write(&path, &image)?;
            let (format, expected) = qemu_info(&path, None)?;
            assert_eq!(format, "vdi");
            assert_eq!(both_ways(&image), Ok((Format::Vdi, expected)), "{name}");
        }
        Ok(())
    }

    #[test]
    fn streaming_in_small_chunks_reaches_a_block_map_beyond_the_kept_head() -> TestResult {
        // VirtualBox-style layout: the map at 1 MiB, the data at 2 MiB.
        let layout = Layout {
            disk_size: 300 << 20,
            map_at: 1 << 20,
            data_at: 2 << 20,
            allocated: 2,
            image_type: TYPE_NORMAL,
        };
        let image = layout.build();
        let mut stream = StreamProbe::new();
        for piece in image.chunks(4096) {
            stream.feed(piece);
        }
        let info = stream.finish()?;
        assert_eq!((info.format, info.virtual_size), (Format::Vdi, 300 << 20));
        assert_eq!(detail(&info, "allocated-blocks").as_deref(), Some("2"));
        assert_eq!(both_ways(&image), Ok((Format::Vdi, 300 << 20)));
        Ok(())
    }

    #[test]
    fn other_versions_and_short_headers_are_refused() {
        assert_refused(
            &edited(|i| put_u32(i, 0x44, 0x0001_0000)),
            ErrorKind::Unsupported,
            "version 1.0",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x44, 0x0002_0001)),
            ErrorKind::Unsupported,
            "version 2.1",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x48, 0x100)),
            ErrorKind::InvalidFormat,
            "fewer than",
        );
    }

    #[test]
    fn undo_and_differencing_images_are_refused_as_needing_a_parent() {
        assert_refused(
            &edited(|i| put_u32(i, 0x4c, TYPE_UNDO)),
            ErrorKind::Unsupported,
            "undo image",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x4c, TYPE_DIFF)),
            ErrorKind::Unsupported,
            "differencing",
        );
        assert_refused(
            &edited(|i| i[0x1a8] = 1),
            ErrorKind::Unsupported,
            "link image",
        );
        assert_refused(
            &edited(|i| i[0x1c7] = 1),
            ErrorKind::Unsupported,
            "parent image",
        );
    }

    #[test]
    fn unknown_image_types_are_invalid() {
        for image_type in [0, 5, u32::MAX] {
            let image = edited(|i| put_u32(i, 0x4c, image_type));
            assert_refused(
                &image,
                ErrorKind::InvalidFormat,
                &format!("image type {image_type}"),
            );
        }
    }

    #[test]
    fn sector_and_block_sizes_other_than_qemus_are_unsupported() {
        assert_refused(
            &edited(|i| put_u32(i, 0x168, 4096)),
            ErrorKind::Unsupported,
            "4096-byte sectors",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x178, 2 << 20)),
            ErrorKind::Unsupported,
            "1 MiB blocks",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x178, 0)),
            ErrorKind::Unsupported,
            "0-byte blocks",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x17c, 512)),
            ErrorKind::Unsupported,
            "extra bytes",
        );
    }

    #[test]
    fn unaligned_offsets_are_refused() {
        assert_refused(
            &edited(|i| put_u32(i, 0x154, 0x201)),
            ErrorKind::InvalidFormat,
            "block map offset 0x201",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x158, 0x401)),
            ErrorKind::InvalidFormat,
            "data area offset 0x401",
        );
    }

    #[test]
    fn block_counts_beyond_the_limit_or_the_map_are_refused() {
        assert_refused(
            &edited(|i| put_u32(i, 0x180, MAX_BLOCKS + 1)),
            ErrorKind::Unsupported,
            "4 TiB",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x180, u32::MAX)),
            ErrorKind::Unsupported,
            "blocks",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x184, 11)),
            ErrorKind::Corrupt,
            "11 allocated blocks out of 10",
        );
    }

    #[test]
    fn a_disk_larger_than_its_block_map_or_the_limit_is_refused() {
        let image = edited(|i| put_u64(i, 0x170, (10 << 20) + 1));
        assert_refused(&image, ErrorKind::Corrupt, "room for only 10485760 bytes");
        assert_refused(
            &edited(|i| put_u64(i, 0x170, u64::MAX)),
            ErrorKind::OutOfBounds,
            "beyond",
        );
        let image = edited(|i| put_u64(i, 0x170, MAX_VIRTUAL_SIZE + 1));
        assert_refused(&image, ErrorKind::OutOfBounds, "beyond");
    }

    #[test]
    fn a_block_map_overlapping_the_header_or_the_data_is_corruption() {
        assert_refused(
            &edited(|i| put_u32(i, 0x154, 0)),
            ErrorKind::Corrupt,
            "overlaps its header",
        );
        assert_refused(
            &edited(|i| put_u32(i, 0x158, 0)),
            ErrorKind::Corrupt,
            "data area",
        );
        // The header claims to reach past the block map.
        assert_refused(
            &edited(|i| put_u32(i, 0x48, 0x400)),
            ErrorKind::Corrupt,
            "overlaps its header",
        );
    }

    #[test]
    fn missing_data_is_reported_as_truncation() {
        let image = Layout::dynamic(10 << 20, 3).build();
        assert_refused(
            &image[..image.len() - 1],
            ErrorKind::Truncated,
            "3 allocated blocks end at byte",
        );
        assert_refused(
            &image[..0x200],
            ErrorKind::Truncated,
            "data area starts at byte 1024",
        );
        assert_refused(&image[..0x100], ErrorKind::Truncated, "VDI header");
        let far = edited(|i| put_u32(i, 0x158, 0x7fff_fe00));
        assert_refused(&far, ErrorKind::Truncated, "data area starts");
    }

    #[test]
    fn map_entries_must_name_allocated_blocks() {
        let image = edited(|i| put_u32(i, 0x200 + 5 * 4, 3));
        assert_refused(&image, ErrorKind::Corrupt, "sends block 5 to data block 3");
        // Discarded blocks read as zeros and are fine.
        let image = edited(|i| put_u32(i, 0x200 + 5 * 4, DISCARDED));
        assert_eq!(both_ways(&image), Ok((Format::Vdi, 10 << 20)));
    }

    #[test]
    fn a_data_block_named_by_two_map_entries_is_corruption() {
        let image = edited(|i| put_u32(i, 0x200 + 7 * 4, 1));
        assert_refused(&image, ErrorKind::Corrupt, "block 7 to data block 1");
    }

    #[test]
    fn probe_refuses_bytes_without_the_signature() {
        let image = edited(|i| i[SIGNATURE_AT] ^= 1);
        let refused = probe(&SliceView(&image)).err().map(|e| e.kind());
        assert_eq!(refused, Some(ErrorKind::InvalidFormat));
        // detect() does not take it for a VDI at all.
        assert_eq!(both_ways(&image).map(|(format, _)| format), Ok(Format::Raw));
    }

    #[test]
    fn matches_wants_the_signature_at_0x40() {
        let image = Layout::dynamic(1 << 20, 0).build();
        assert!(matches(&image));
        assert!(!matches(&image[..0x43]));
        assert!(!matches(&[0u8; 0x200]));
    }

    #[test]
    fn no_truncation_of_a_real_vdi_panics() -> TestResult {
        let scratch = Scratch::new("vdi-truncate")?;
        for static_ in [false, true] {
            let path = scratch.path(&format!("{static_}.vdi"));
            qemu_create(&path, static_, "2M")?;
            let bytes = std::fs::read(&path)?;
            for len in (0..=2048).chain((2048..=bytes.len()).step_by(4093)) {
                let _ = detect(&SliceView(&bytes[..len.min(bytes.len())]));
                let _ = probe(&SliceView(&bytes[..len.min(bytes.len())]));
            }
        }
        Ok(())
    }

    #[test]
    fn no_single_byte_corruption_of_a_real_vdi_panics() -> TestResult {
        let scratch = Scratch::new("vdi-corrupt")?;
        for static_ in [false, true] {
            let path = scratch.path(&format!("{static_}.vdi"));
            qemu_create(&path, static_, "3M")?;
            let mut bytes = std::fs::read(&path)?;
            for at in 0..0x400.min(bytes.len()) {
                let original = bytes[at];
                for value in [0x00, 0xff, original ^ 0x01, original ^ 0x80] {
                    bytes[at] = value;
                    let _ = detect(&SliceView(&bytes));
                    let _ = probe(&SliceView(&bytes));
                }
                bytes[at] = original;
            }
        }
        Ok(())
    }

    #[test]
    fn fuzz_survives_arbitrary_bytes() {
        fuzz(&[]);
        fuzz(&[0xff; 0x1c8]);
        fuzz(&edited(|i| {
            put_u32(i, 0x154, 0xffff_fe00);
            put_u32(i, 0x158, 0xffff_fe00);
        }));
        fuzz(&edited(|i| i.truncate(0x1c8)));
    }
}
