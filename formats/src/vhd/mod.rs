//! Microsoft VHD (Virtual PC) images, which qemu calls `vpc`: footer and dynamic disk header
//! parsing, validation, and the virtual size exactly as `qemu-img info -f vpc` reports it.
//!
//! Every VHD ends with a 512-byte big-endian footer (cookie `conectix`). A *dynamic* disk also
//! keeps a copy of the footer at offset 0, followed by a dynamic disk header (cookie
//! `cxsparse`) that locates the block allocation table (BAT). A *fixed* disk is the raw disk
//! data followed by the footer alone, which is why [`detect`](crate::detect) looks for it at
//! the end of the image before it falls back to ISO or raw. Differencing disks need a parent
//! and are refused.
//!
//! The virtual size follows qemu 10, observed with `qemu-img info -f vpc`: the CHS geometry
//! (cylinders × heads × sectors × 512) is used only when the creator application is `vpc ` or
//! `qemu` (the two writers that round the size to a geometry) and the geometry is not the
//! maximum 65535/16/255; otherwise the footer's current size, rounded down to whole sectors.
//! qemu refuses disks over 2040 GiB, and so does this module. [`decode`] streams dynamic
//! disks using the same parser.

pub mod decode;

use crate::error::{Result, err};
use crate::view::{Fields, View};
use crate::{Format, ImageInfo, MAX_VIRTUAL_SIZE};

/// The footer's cookie.
const COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
const SPARSE_COOKIE: &[u8; 8] = b"cxsparse";
/// Length of the footer (and of its copy at the start of a dynamic disk).
const FOOTER_LEN: usize = 512;
/// Length of the dynamic disk header.
const SPARSE_HEADER_LEN: usize = 1024;
/// VHD sizes and BAT entries count 512-byte sectors.
const SECTOR: u64 = 512;

/// Footer disk types.
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

/// The data offset of a fixed disk: there is no dynamic header to point to.
const NO_DATA_OFFSET: u64 = u64::MAX;

/// Sectors in the largest CHS geometry (65535 × 16 × 255). qemu reads a footer carrying it
/// as "the geometry cannot express this size" and uses the current size instead.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// Creator applications whose current size qemu ignores in favour of the CHS geometry
/// (they round the disk to a geometry when they create it).
const GEOMETRY_CREATORS: [&[u8; 4]; 2] = [b"vpc ", b"qemu"];
/// The largest disk qemu opens: 2040 GiB, in sectors ("File too large" beyond).
const MAX_SECTORS: u64 = 0xff00_0000;
const _: () = assert!(MAX_SECTORS * SECTOR <= MAX_VIRTUAL_SIZE);

/// The smallest block a dynamic disk may have: one sector (qemu's own limit).
const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block accepted. Real writers use 2 MiB (qemu, Windows) or 512 KiB; anything
/// beyond 256 MiB is damage or an attempt to make a reader buffer absurd blocks.
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// The most BAT entries accepted: 4 Mi entries (a 16 MiB table), enough to cover qemu's
/// 2040 GiB limit with blocks as small as 512 KiB.
const MAX_TABLE_ENTRIES: u32 = 1 << 22;
/// A BAT entry for a block that holds no data (reads as zeros).
const UNALLOCATED: u32 = u32::MAX;
/// The BAT is read in pieces of this many bytes, each well under the view's read limit.
const BAT_CHUNK: usize = 1 << 20;

/// The fields of a VHD footer this module uses.
#[derive(Debug, Clone, Copy)]
struct Footer {
    data_offset: u64,
    creator_app: [u8; 4],
    current_size: u64,
    cylinders: u16,
    heads: u8,
    sectors: u8,
    disk_type: u32,
}

impl Footer {
    /// Parses and checksums a footer; `what` says which copy it is, for messages.
    fn parse(bytes: &[u8], what: &'static str) -> Result<Self> {
        let f = Fields::new(bytes, what);
        if f.array::<8>(0)? != *COOKIE {
            return Err(err!(
                InvalidFormat,
                "the {what} lacks the VHD cookie \"conectix\"; the file is not a VHD or is damaged"
            ));
        }
        let stored = f.u32_be(64)?;
        let computed = checksum(f.slice(0, FOOTER_LEN)?, 64);
        if stored != computed {
            return Err(err!(
                Corrupt,
                "the {what} has checksum {stored:#010x} but its bytes sum to {computed:#010x}: \
                 the file is damaged; download it again or repair it with the tool that made it"
            ));
        }
        Ok(Self {
            data_offset: f.u64_be(16)?,
            creator_app: f.array::<4>(28)?,
            current_size: f.u64_be(48)?,
            cylinders: f.u16_be(56)?,
            heads: f.u8(58)?,
            sectors: f.u8(59)?,
            disk_type: f.u32_be(60)?,
        })
    }

    /// The virtual size in bytes as qemu computes it (see the module docs), and which field
    /// it came from.
    fn virtual_size(&self) -> Result<(u64, &'static str)> {
        let geometry = u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors);
        let trusts_geometry =
            GEOMETRY_CREATORS.contains(&&self.creator_app) && geometry != MAX_GEOMETRY_SECTORS;
        let (sectors, source) = if trusts_geometry {
            (geometry, "geometry")
        } else {
            (self.current_size / SECTOR, "current-size")
        };
        if sectors > MAX_SECTORS {
            return Err(err!(
                Unsupported,
                "the VHD declares a {}-byte disk, larger than the 2040 GiB qemu can open; \
                 convert it to qcow2 or raw with the tool that made it",
                // Cannot overflow: either current_size / 512 or below 2^32 sectors.
                sectors * SECTOR
            ));
        }
        Ok((sectors * SECTOR, source))
    }

    /// The creator application, printable (trailing spaces and NULs dropped).
    fn creator(&self) -> String {
        let text: String = self
            .creator_app
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    ' '
                }
            })
            .collect();
        text.trim_end().to_owned()
    }

    /// The details every VHD reports.
    fn info(&self, size: u64, source: &'static str, subformat: &'static str) -> ImageInfo {
        ImageInfo::new(Format::Vpc, size)
            .with("subformat", subformat)
            .with("creator-app", self.creator())
            .with("size-source", source)
            .with(
                "geometry",
                format!("{}/{}/{}", self.cylinders, self.heads, self.sectors),
            )
    }
}

/// The VHD checksum: the ones' complement of the sum of all bytes, the 4-byte checksum field
/// at `field_at` counted as zeros.
fn checksum(bytes: &[u8], field_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field_at..field_at + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// Whether the first bytes of an image are a VHD footer copy (the start of a dynamic VHD).
pub(crate) fn matches(head: &[u8]) -> bool {
    head.starts_with(COOKIE)
}

/// Validates a VHD image whose footer copy is at offset 0 (a dynamic disk, normally) and
/// computes its virtual size.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    parse(view, &mut |_, _| {}).map(|layout| match layout {
        Layout::Fixed { info } | Layout::Dynamic { info, .. } => info,
    })
}

/// A validated VHD whose footer copy starts the image: what the decoder needs besides the
/// block allocation table.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// A fixed disk: guest byte `n` is image byte `n` (here including the footer copy at 0,
    /// exactly as qemu reads it).
    Fixed {
        /// What [`probe`] reports.
        info: ImageInfo,
    },
    /// A dynamic disk.
    Dynamic {
        /// What [`probe`] reports.
        info: ImageInfo,
        /// Bytes of guest data per block.
        block_size: u32,
        /// Bytes of sector bitmap in front of each block's data, as qemu computes it.
        bitmap_len: u64,
        /// Where the last allocated block ends (0 without blocks).
        blocks_end: u64,
    },
}

/// Validates a VHD like [`probe`], calling `visit(block_index, sector)` for every allocated
/// entry of a dynamic disk's block allocation table (the block's sector bitmap starts at
/// byte `sector * 512`).
pub(crate) fn parse(view: &dyn View, visit: &mut dyn FnMut(u32, u32)) -> Result<Layout> {
    let bytes = view.read(0, FOOTER_LEN, "the VHD footer copy")?;
    let footer = Footer::parse(&bytes, "VHD footer copy at the start of the image")?;
    match footer.disk_type {
        TYPE_DYNAMIC => dynamic(view, &footer, visit),
        // A footer at offset 0 that says "fixed": qemu takes it at its word; so do we, with
        // the fixed-disk checks.
        TYPE_FIXED => fixed(view, &footer).map(|info| Layout::Fixed { info }),
        other => Err(bad_type(other)),
    }
}

/// The sector bitmap in front of each block of `block_size` bytes, computed as qemu's vpc
/// driver does: one bit per sector, rounded to whole sectors, but counted in whole bytes
/// first, so that blocks under 4 KiB get no bitmap at all (qemu then reads their data from
/// where the bitmap is; observed with qemu-img 10.0).
pub(crate) fn bitmap_len(block_size: u32) -> u64 {
    (u64::from(block_size) / (8 * SECTOR)).next_multiple_of(SECTOR)
}

/// Looks for a fixed VHD's footer in the last 512 bytes: `Ok(None)` when the image is
/// shorter than a footer or its last 512 bytes do not start with the `conectix` cookie.
///
/// A trailing `conectix` footer that fails its checksum is an error ([`Corrupt`]), not
/// "raw": a raw disk whose last sector happens to begin with that cookie is vanishingly
/// unlikely, while a damaged VHD treated as raw would hand the guest a disk 512 bytes too
/// large with a footer for data. qemu refuses such a file as a VHD too.
///
/// [`Corrupt`]: crate::ErrorKind::Corrupt
pub fn probe_fixed(view: &dyn View) -> Result<Option<ImageInfo>> {
    let Some(offset) = view.len().checked_sub(FOOTER_LEN as u64) else {
        return Ok(None);
    };
    let bytes = view.read(offset, FOOTER_LEN, "the VHD footer at the end of the image")?;
    if !bytes.starts_with(COOKIE) {
        return Ok(None);
    }
    let footer = Footer::parse(&bytes, "VHD footer at the end of the image")?;
    match footer.disk_type {
        TYPE_FIXED => fixed(view, &footer).map(Some),
        // qemu only accepts a fixed disk from the trailing footer; a dynamic disk must start
        // with the footer copy that locates its header.
        TYPE_DYNAMIC => Err(err!(
            Corrupt,
            "the image ends with a dynamic VHD footer but lacks the copy of it that must start \
             the file: the file is damaged; download it again"
        )),
        other => Err(bad_type(other)),
    }
}

/// The refusal for a disk type that is neither fixed nor dynamic.
fn bad_type(disk_type: u32) -> crate::Error {
    if disk_type == TYPE_DIFFERENCING {
        err!(
            Unsupported,
            "the VHD is a differencing disk that needs its parent image; merge it into a \
             standalone image first (for example `qemu-img convert -O vpc child.vhd merged.vhd` \
             with the parent next to it)"
        )
    } else {
        err!(
            InvalidFormat,
            "the VHD footer declares disk type {disk_type} (2 fixed, 3 dynamic expected); \
             the file is damaged or not a VHD"
        )
    }
}

/// Validates a fixed disk: the data, then the footer.
fn fixed(view: &dyn View, footer: &Footer) -> Result<ImageInfo> {
    if footer.data_offset != NO_DATA_OFFSET {
        return Err(err!(
            InvalidFormat,
            "the fixed VHD's footer has data offset {:#x} where a fixed disk has none \
             (0xffffffffffffffff): the footer is damaged; recreate the image",
            footer.data_offset
        ));
    }
    let (size, source) = footer.virtual_size()?;
    if view.len_known() {
        // The size is at most 2040 GiB, so adding the footer cannot overflow.
        let needed = size + FOOTER_LEN as u64;
        if view.len() < needed {
            return Err(err!(
                Truncated,
                "the fixed VHD is truncated: its footer declares {size} bytes of disk data but \
                 the file holds only {} bytes including the footer; download it again",
                view.len()
            ));
        }
    }
    Ok(footer.info(size, source, "fixed"))
}

/// Validates a dynamic disk: the dynamic header, its block allocation table, and that the
/// blocks and the trailing footer are inside the file.
fn dynamic(view: &dyn View, footer: &Footer, visit: &mut dyn FnMut(u32, u32)) -> Result<Layout> {
    let (size, source) = footer.virtual_size()?;
    let header_at = footer.data_offset;
    if header_at < FOOTER_LEN as u64 {
        return Err(err!(
            InvalidFormat,
            "the VHD footer puts the dynamic disk header at offset {header_at}, inside the \
             footer copy: the file is damaged; download it again"
        ));
    }
    // The end of the region the footer at the end does not occupy; `None` while streaming.
    // (A header cut off by the end of the file is reported by the read itself.)
    let data_end = view
        .len_known()
        .then(|| view.len().saturating_sub(FOOTER_LEN as u64));
    let bytes = view.read(header_at, SPARSE_HEADER_LEN, "the VHD dynamic disk header")?;
    let h = Fields::new(&bytes, "VHD dynamic disk header");
    if h.array::<8>(0)? != *SPARSE_COOKIE {
        return Err(err!(
            InvalidFormat,
            "the dynamic VHD has no \"cxsparse\" header at offset {header_at} where its footer \
             points: the file is damaged; download it again"
        ));
    }
    let stored = h.u32_be(36)?;
    let computed = checksum(h.slice(0, SPARSE_HEADER_LEN)?, 36);
    if stored != computed {
        return Err(err!(
            Corrupt,
            "the VHD dynamic disk header has checksum {stored:#010x} but its bytes sum to \
             {computed:#010x}: the file is damaged; download it again"
        ));
    }
    let table_at = h.u64_be(16)?;
    let entries = h.u32_be(28)?;
    let block_size = h.u32_be(32)?;

    if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
        return Err(err!(
            InvalidFormat,
            "the dynamic VHD declares a block size of {block_size} bytes, not a power of two \
             of at least 512: the header is damaged; download it again"
        ));
    }
    if block_size > MAX_BLOCK_SIZE {
        return Err(err!(
            OutOfBounds,
            "the dynamic VHD declares {block_size}-byte blocks, beyond the {MAX_BLOCK_SIZE} \
             bytes accepted; convert it to a fixed VHD, qcow2 or raw first"
        ));
    }
    if entries > MAX_TABLE_ENTRIES {
        return Err(err!(
            OutOfBounds,
            "the dynamic VHD declares {entries} block table entries, beyond the \
             {MAX_TABLE_ENTRIES} accepted: the header is damaged or hostile"
        ));
    }
    let covered = u64::from(entries) * u64::from(block_size);
    if covered < size {
        return Err(err!(
            Corrupt,
            "the dynamic VHD's block table covers only {covered} bytes of its {size}-byte disk: \
             the header is damaged; download it again"
        ));
    }

    // At most 16 MiB: the entry count is bounded above.
    let table_len = u64::from(entries) * 4;
    let Some(table_end) = table_at.checked_add(table_len) else {
        return Err(err!(
            OutOfBounds,
            "the dynamic VHD's block table lies at offset {table_at}, beyond any possible image"
        ));
    };
    let header_end = header_at.saturating_add(SPARSE_HEADER_LEN as u64);
    if table_at < FOOTER_LEN as u64 || (table_at < header_end && header_at < table_end) {
        return Err(err!(
            Corrupt,
            "the dynamic VHD's block table (bytes {table_at}..{table_end}) overlaps its footer \
             copy or header: the file is damaged; download it again"
        ));
    }
    if let Some(end) = data_end {
        if table_at >= view.len() {
            return Err(err!(
                OutOfBounds,
                "the dynamic VHD's block table lies at offset {table_at}, beyond the end of the \
                 {}-byte file: the header is damaged; download the image again",
                view.len()
            ));
        }
        if table_end > end {
            return Err(err!(
                Truncated,
                "the dynamic VHD is truncated: its block table needs bytes {table_at}..{table_end} \
                 and the footer after them, but the file has only {} bytes; download it again",
                view.len()
            ));
        }
    }

    // Each allocated block is a sector bitmap followed by the block's data.
    let bitmap_len = bitmap_len(block_size);
    let mut allocated: u64 = 0;
    let mut last_end: Option<(u64, u64)> = None;
    let mut done: u64 = 0;
    while done < table_len {
        let piece = (table_len - done).min(BAT_CHUNK as u64) as usize;
        let chunk = view.read(table_at + done, piece, "the VHD block allocation table")?;
        for (i, entry) in chunk.chunks_exact(4).enumerate() {
            let &[a, b, c, d] = entry else { continue };
            let sector = u32::from_be_bytes([a, b, c, d]);
            if sector == UNALLOCATED {
                continue;
            }
            allocated += 1;
            // Below MAX_TABLE_ENTRIES: the table has `entries` entries.
            visit((done / 4 + i as u64) as u32, sector);
            // A sector number is below 2^32, so the end stays far below u64::MAX.
            let end = u64::from(sector) * SECTOR + bitmap_len + u64::from(block_size);
            if last_end.is_none_or(|(_, e)| end > e) {
                last_end = Some((done / 4 + i as u64, end));
            }
        }
        done += piece as u64;
    }

    if let (Some(file_end), Some((index, end))) = (data_end, last_end)
        && end > file_end
    {
        return Err(err!(
            Truncated,
            "the dynamic VHD is truncated: block {index} ends at byte {end} but the file's \
             data ends at byte {file_end}; download it again"
        ));
    }
    if let Some(end) = data_end {
        // Every VHD ends with its footer; its absence means the download stopped short.
        let tail = view.read(end, FOOTER_LEN, "the VHD footer at the end of the image")?;
        if !tail.starts_with(COOKIE) {
            return Err(err!(
                Truncated,
                "the dynamic VHD does not end with its footer: the file is truncated or \
                 damaged; download it again"
            ));
        }
    }

    let info = footer
        .info(size, source, "dynamic")
        .with("block-size", block_size)
        .with("allocated-blocks", allocated);
    Ok(Layout::Dynamic {
        info,
        block_size,
        bitmap_len,
        blocks_end: last_end.map_or(0, |(_, end)| end),
    })
}

/// Runs both probes on arbitrary bytes and ignores the outcome: the entry point of the
/// fuzz targets, which look for panics only.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let view = crate::view::SliceView(data);
    let _ = probe(&view);
    let _ = probe_fixed(&view);
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

    /// The virtual size `qemu-img info -f vpc` reports for `path`.
    fn qemu_vpc_size(path: &Path) -> std::result::Result<u64, String> {
        qemu_info(path, Some("vpc")).map(|(_, size)| size)
    }

    /// Creates a VHD with qemu-img; `options` as for `-o`.
    fn qemu_create(path: &Path, options: &str, size: &str) -> std::result::Result<(), String> {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            options,
            &path.to_string_lossy(),
            size,
        ])
        .map(drop)
    }

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    /// Recomputes the checksum of the footer at `at`.
    fn seal_footer(bytes: &mut [u8], at: usize) {
        let sum = checksum(&bytes[at..at + FOOTER_LEN], 64);
        put_u32(bytes, at + 64, sum);
    }

    /// Recomputes the checksum of the dynamic header at `at`.
    fn seal_header(bytes: &mut [u8], at: usize) {
        let sum = checksum(&bytes[at..at + SPARSE_HEADER_LEN], 36);
        put_u32(bytes, at + 36, sum);
    }

    /// A footer as qemu's `force_size=on` writes it (creator "qem2", maximum geometry).
    fn footer(size: u64, disk_type: u32, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; FOOTER_LEN];
        f[..8].copy_from_slice(COOKIE);
        put_u32(&mut f, 8, 2);
        put_u32(&mut f, 12, 0x0001_0000);
        put_u64(&mut f, 16, data_offset);
        f[28..32].copy_from_slice(b"qem2");
        put_u64(&mut f, 40, size);
        put_u64(&mut f, 48, size);
        f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        put_u32(&mut f, 60, disk_type);
        seal_footer(&mut f, 0);
        f
    }

    /// Where the hand-made dynamic images keep their header.
    const HEADER_AT: usize = 512;

    /// A dynamic VHD of `size` bytes with 2 MiB blocks, its BAT at `table_at` (a multiple of
    /// 512, at least 1536); the first `allocated` blocks hold data (zeros).
    fn dynamic_vhd(size: u64, table_at: usize, allocated: u32) -> Vec<u8> {
        let block_size: u32 = 2 << 20;
        let entries = size.div_ceil(u64::from(block_size)) as u32;
        let table_len = (entries as usize * 4).next_multiple_of(512);
        let first_block = table_at + table_len;
        let block_len = 512 + block_size as usize;
        let mut image = vec![0u8; first_block + allocated as usize * block_len];
        image[..FOOTER_LEN].copy_from_slice(&footer(size, TYPE_DYNAMIC, HEADER_AT as u64));
        let h = HEADER_AT;
        image[h..h + 8].copy_from_slice(SPARSE_COOKIE);
        put_u64(&mut image, h + 8, u64::MAX);
        put_u64(&mut image, h + 16, table_at as u64);
        put_u32(&mut image, h + 24, 0x0001_0000);
        put_u32(&mut image, h + 28, entries);
        put_u32(&mut image, h + 32, block_size);
        seal_header(&mut image, h);
        image[table_at..first_block].fill(0xff);
        for i in 0..allocated as usize {
            let sector = ((first_block + i * block_len) / 512) as u32;
            put_u32(&mut image, table_at + i * 4, sector);
        }
        let tail = image[..FOOTER_LEN].to_vec();
        image.extend_from_slice(&tail);
        image
    }

    /// A fixed VHD: `size` bytes of data, then the footer.
    fn fixed_vhd(size: usize) -> Vec<u8> {
        let mut image = vec![0u8; size];
        image.extend_from_slice(&footer(size as u64, TYPE_FIXED, NO_DATA_OFFSET));
        image
    }

    /// Applies `edit` to both footers of a dynamic image (or the only footer of a fixed one,
    /// when `head` is false) and reseals them.
    fn edit_footers(image: &mut [u8], head: bool, edit: impl Fn(&mut [u8])) {
        let tail = image.len() - FOOTER_LEN;
        edit(&mut image[tail..]);
        seal_footer(image, tail);
        if head {
            edit(&mut image[..FOOTER_LEN]);
            seal_footer(image, 0);
        }
    }

    /// Applies `edit` to the dynamic header of a hand-made image and reseals it.
    fn edit_header(image: &mut [u8], edit: impl Fn(&mut [u8])) {
        edit(&mut image[HEADER_AT..HEADER_AT + SPARSE_HEADER_LEN]);
        seal_header(image, HEADER_AT);
    }

    fn detail(info: &ImageInfo, key: &str) -> Option<String> {
        info.details.get(key).map(ToString::to_string)
    }

    #[test]
    fn dynamic_vhds_made_by_qemu_img_have_the_size_qemu_img_reports() -> TestResult {
        let scratch = Scratch::new("vhd-dynamic")?;
        for size in ["0", "1M", "10M", "100M", "1G", "3G", "127G", "2040G"] {
            for force in ["off", "on"] {
                let path = scratch.path(&format!("{size}-{force}.vhd"));
                qemu_create(
                    &path,
                    &format!("subformat=dynamic,force_size={force}"),
                    size,
                )?;
                let expected = qemu_vpc_size(&path)?;
                let bytes = std::fs::read(&path)?;
                assert_eq!(
                    both_ways(&bytes),
                    Ok((Format::Vpc, expected)),
                    "{size} force_size={force}"
                );
                let info = probe(&SliceView(&bytes))?;
                assert_eq!(detail(&info, "subformat").as_deref(), Some("dynamic"));
                let creator = if force == "on" { "qem2" } else { "qemu" };
                assert_eq!(detail(&info, "creator-app").as_deref(), Some(creator));
                assert_eq!(detail(&info, "block-size").as_deref(), Some("2097152"));
            }
        }
        Ok(())
    }

    #[test]
    fn qemu_rounds_to_a_geometry_unless_told_to_force_the_size() -> TestResult {
        // Observed with qemu-img 10.0: `create -f vpc x.vhd 10M` makes a 10514432-byte disk
        // (302/4/17 sectors), `-o force_size=on` exactly 10 MiB.
        let scratch = Scratch::new("vhd-rounding")?;
        for (force, expected) in [("off", 10_514_432), ("on", 10_485_760)] {
            let path = scratch.path(&format!("{force}.vhd"));
            qemu_create(&path, &format!("force_size={force}"), "10M")?;
            let bytes = std::fs::read(&path)?;
            assert_eq!(both_ways(&bytes), Ok((Format::Vpc, expected)));
        }
        Ok(())
    }

    #[test]
    fn probe_fixed_reads_the_size_from_the_trailing_footer() -> TestResult {
        let scratch = Scratch::new("vhd-fixed")?;
        for size in ["1M", "10M", "33M"] {
            for force in ["off", "on"] {
                let path = scratch.path(&format!("{size}-{force}.vhd"));
                qemu_create(&path, &format!("subformat=fixed,force_size={force}"), size)?;
                let expected = qemu_vpc_size(&path)?;
                let bytes = std::fs::read(&path)?;
                // detect() must find the trailing footer before falling back to raw.
                assert_eq!(
                    both_ways(&bytes),
                    Ok((Format::Vpc, expected)),
                    "{size} force_size={force}"
                );
                let info = probe_fixed(&SliceView(&bytes))?;
                assert_eq!(info.as_ref().map(|i| i.virtual_size), Some(expected));
                assert_eq!(
                    info.as_ref()
                        .and_then(|i| detail(i, "subformat"))
                        .as_deref(),
                    Some("fixed")
                );
            }
        }
        Ok(())
    }

    #[test]
    fn large_fixed_vhds_are_sized_by_random_access_like_qemu_img() -> TestResult {
        // qemu-img makes these sparse, so they cost no disk space.
        let scratch = Scratch::new("vhd-large-fixed")?;
        for size in ["3G", "127G", "2040G"] {
            for force in ["off", "on"] {
                let path = scratch.path(&format!("{size}-{force}.vhd"));
                qemu_create(&path, &format!("subformat=fixed,force_size={force}"), size)?;
                let expected = qemu_vpc_size(&path)?;
                let probed = probe_path(&path)?;
                assert_eq!(
                    (probed.info.format, probed.info.virtual_size),
                    (Format::Vpc, expected)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn only_vpc_and_qemu_creators_have_their_geometry_trusted_like_qemu() -> TestResult {
        // 302/4/17 sectors = 10514432 bytes; current size 10 MiB.
        let scratch = Scratch::new("vhd-creators")?;
        let cases: [(&[u8; 4], [u8; 4], u64); 7] = [
            (b"qemu", [0x01, 0x2e, 4, 17], 10_514_432),
            (b"vpc ", [0x01, 0x2e, 4, 17], 10_514_432),
            (b"qemu", [0xff, 0xff, 16, 255], 10_485_760),
            (b"win ", [0x01, 0x2e, 4, 17], 10_485_760),
            (b"qem2", [0x01, 0x2e, 4, 17], 10_485_760),
            (b"abcd", [0x01, 0x2e, 4, 17], 10_485_760),
            (b"QEMU", [0x01, 0x2e, 4, 17], 10_485_760),
        ];
        for (i, (creator, geometry, expected)) in cases.into_iter().enumerate() {
            // A table for 12 MiB, so that it covers the geometry's size too.
            let mut image = dynamic_vhd(12 << 20, 1536, 0);
            edit_footers(&mut image, true, |f| {
                put_u64(f, 48, 10 << 20);
                f[28..32].copy_from_slice(creator);
                f[56..60].copy_from_slice(&geometry);
            });
            let path = scratch.path(&format!("{i}.vhd"));
            std::fs::write(&path, &image)?;
            assert_eq!(qemu_vpc_size(&path)?, expected, "qemu for {creator:?}");
            assert_eq!(
                both_ways(&image),
                Ok((Format::Vpc, expected)),
                "{creator:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn the_current_size_is_rounded_down_to_whole_sectors_like_qemu() -> TestResult {
        let scratch = Scratch::new("vhd-odd-size")?;
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u64(f, 48, (10 << 20) - 100));
        let path = scratch.path("odd.vhd");
        std::fs::write(&path, &image)?;
        assert_eq!(qemu_vpc_size(&path)?, (10 << 20) - 512);
        assert_eq!(both_ways(&image), Ok((Format::Vpc, (10 << 20) - 512)));
        Ok(())
    }

    #[test]
    fn hand_made_images_are_accepted_by_qemu_img_with_the_same_size() -> TestResult {
        let scratch = Scratch::new("vhd-hand-made")?;
        let images = [
            ("dynamic.vhd", dynamic_vhd(100 << 20, 1536, 2)),
            ("far-table.vhd", dynamic_vhd(64 << 20, 3 << 20, 1)),
            ("fixed.vhd", fixed_vhd(3 << 20)),
        ];
        for (name, image) in images {
            let path = scratch.path(name);
            std::fs::write(&path, &image)?;
            let expected = qemu_vpc_size(&path)?;
            assert_eq!(both_ways(&image), Ok((Format::Vpc, expected)), "{name}");
        }
        Ok(())
    }

    #[test]
    fn streaming_in_small_chunks_reaches_a_block_table_beyond_the_kept_head() -> TestResult {
        let image = dynamic_vhd(64 << 20, 3 << 20, 1);
        let mut stream = StreamProbe::new();
        for piece in image.chunks(4096) {
            stream.feed(piece);
        }
        let info = stream.finish()?;
        assert_eq!((info.format, info.virtual_size), (Format::Vpc, 64 << 20));
        assert_eq!(detail(&info, "allocated-blocks").as_deref(), Some("1"));
        assert_eq!(both_ways(&image), Ok((Format::Vpc, 64 << 20)));
        Ok(())
    }

    #[test]
    fn allocated_blocks_are_counted_and_must_lie_inside_the_file() -> TestResult {
        let image = dynamic_vhd(10 << 20, 1536, 2);
        let info = probe(&SliceView(&image))?;
        assert_eq!(detail(&info, "allocated-blocks").as_deref(), Some("2"));
        // Cut inside the second block, keeping a footer at the end.
        let mut cut = image[..image.len() - FOOTER_LEN - 4096].to_vec();
        cut.extend_from_slice(&image[..FOOTER_LEN]);
        assert_refused(&cut, ErrorKind::Truncated, "block 1 ends at byte");
        Ok(())
    }

    #[test]
    fn a_dynamic_vhd_without_its_trailing_footer_is_truncated() {
        let image = dynamic_vhd(10 << 20, 1536, 0);
        let mut cut = image[..image.len() - FOOTER_LEN].to_vec();
        cut.extend_from_slice(&[0u8; FOOTER_LEN]);
        assert_refused(&cut, ErrorKind::Truncated, "does not end with its footer");
    }

    #[test]
    fn differencing_disks_are_refused_with_advice_to_merge() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u32(f, 60, TYPE_DIFFERENCING));
        assert_refused(&image, ErrorKind::Unsupported, "qemu-img convert");
        let mut fixed = fixed_vhd(4096);
        edit_footers(&mut fixed, false, |f| put_u32(f, 60, TYPE_DIFFERENCING));
        assert_refused(&fixed, ErrorKind::Unsupported, "differencing");
    }

    #[test]
    fn unknown_disk_types_are_invalid() {
        for disk_type in [0, 1, 5, 9, u32::MAX] {
            let mut image = dynamic_vhd(10 << 20, 1536, 0);
            edit_footers(&mut image, true, |f| put_u32(f, 60, disk_type));
            assert_refused(
                &image,
                ErrorKind::InvalidFormat,
                &format!("disk type {disk_type}"),
            );
            let mut fixed = fixed_vhd(4096);
            edit_footers(&mut fixed, false, |f| put_u32(f, 60, disk_type));
            assert_refused(&fixed, ErrorKind::InvalidFormat, "disk type");
        }
    }

    #[test]
    fn a_bad_footer_checksum_is_corruption_at_either_end() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        image[50] ^= 1;
        assert_refused(&image, ErrorKind::Corrupt, "damaged");
        let mut fixed = fixed_vhd(4096);
        let at = fixed.len() - FOOTER_LEN + 50;
        fixed[at] ^= 1;
        assert_refused(&fixed, ErrorKind::Corrupt, "checksum");
    }

    #[test]
    fn a_missing_or_damaged_dynamic_header_is_refused() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| h[..8].copy_from_slice(b"cxspars_"));
        assert_refused(&image, ErrorKind::InvalidFormat, "cxsparse");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        image[HEADER_AT + 40] ^= 1;
        assert_refused(
            &image,
            ErrorKind::Corrupt,
            "dynamic disk header has checksum",
        );

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u64(f, 16, 256));
        assert_refused(&image, ErrorKind::InvalidFormat, "inside the footer copy");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u64(f, 16, 1 << 40));
        assert_refused(&image, ErrorKind::Truncated, "dynamic disk header");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u64(f, 16, u64::MAX - 10));
        assert_refused(&image, ErrorKind::OutOfBounds, "dynamic disk header");
    }

    #[test]
    fn block_sizes_that_are_not_powers_of_two_or_are_absurd_are_refused() {
        for (block_size, kind) in [
            (0, ErrorKind::InvalidFormat),
            (256, ErrorKind::InvalidFormat),
            (3 << 20, ErrorKind::InvalidFormat),
            (1 << 31, ErrorKind::OutOfBounds),
        ] {
            let mut image = dynamic_vhd(10 << 20, 1536, 0);
            edit_header(&mut image, |h| put_u32(h, 32, block_size));
            assert_refused(&image, kind, "block");
        }
    }

    #[test]
    fn block_tables_beyond_the_file_or_too_large_are_refused() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u64(h, 16, 1 << 30));
        assert_refused(&image, ErrorKind::OutOfBounds, "beyond the end");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u64(h, 16, u64::MAX - 8));
        assert_refused(&image, ErrorKind::OutOfBounds, "beyond any possible image");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u64(h, 16, 1024));
        assert_refused(&image, ErrorKind::Corrupt, "overlaps");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u32(h, 28, 1000));
        assert_refused(&image, ErrorKind::Truncated, "block table needs bytes");

        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u32(h, 28, MAX_TABLE_ENTRIES + 1));
        assert_refused(&image, ErrorKind::OutOfBounds, "block table entries");
    }

    #[test]
    fn a_block_table_too_small_for_the_disk_is_corruption() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut image, |h| put_u32(h, 28, 4));
        assert_refused(&image, ErrorKind::Corrupt, "covers only 8388608 bytes");
    }

    #[test]
    fn disks_over_2040_gib_are_refused_like_qemu() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        edit_footers(&mut image, true, |f| put_u64(f, 48, (2040 << 30) + 512));
        assert_refused(&image, ErrorKind::Unsupported, "2040 GiB");
        let mut fixed = fixed_vhd(4096);
        edit_footers(&mut fixed, false, |f| put_u64(f, 48, u64::MAX));
        assert_refused(&fixed, ErrorKind::Unsupported, "2040 GiB");
    }

    #[test]
    fn fixed_footers_need_no_data_offset_and_all_their_data() {
        let mut fixed = fixed_vhd(4096);
        edit_footers(&mut fixed, false, |f| put_u64(f, 16, 512));
        assert_refused(&fixed, ErrorKind::InvalidFormat, "data offset");
        let mut short = fixed_vhd(4096);
        edit_footers(&mut short, false, |f| put_u64(f, 48, 8192));
        assert_refused(&short, ErrorKind::Truncated, "declares 8192 bytes");
        // A footer copy at the start that says "fixed" gets the same checks.
        let mut copied = fixed_vhd(4096);
        let tail = copied[copied.len() - FOOTER_LEN..].to_vec();
        copied[..FOOTER_LEN].copy_from_slice(&tail);
        assert_eq!(both_ways(&copied), Ok((Format::Vpc, 4096)));
        copied.truncate(4096);
        assert_refused(&copied, ErrorKind::Truncated, "fixed VHD is truncated");
    }

    #[test]
    fn a_dynamic_footer_at_the_end_without_its_copy_at_the_start_is_corruption() {
        let mut image = dynamic_vhd(10 << 20, 1536, 0);
        image[..FOOTER_LEN].fill(0);
        assert_refused(&image, ErrorKind::Corrupt, "lacks the copy");
    }

    #[test]
    fn a_truncated_footer_or_header_is_reported_as_truncation() {
        let image = dynamic_vhd(10 << 20, 1536, 0);
        assert_refused(&image[..100], ErrorKind::Truncated, "VHD footer copy");
        assert_refused(&image[..1000], ErrorKind::Truncated, "dynamic disk header");
    }

    #[test]
    fn probe_fixed_ignores_images_without_a_trailing_footer() -> TestResult {
        assert!(probe_fixed(&SliceView(&[]))?.is_none());
        assert!(probe_fixed(&SliceView(&[0u8; 511]))?.is_none());
        assert!(probe_fixed(&SliceView(COOKIE))?.is_none());
        assert!(probe_fixed(&SliceView(&[7u8; 4096]))?.is_none());
        assert_eq!(both_ways(&[7u8; 4096]), Ok((Format::Raw, 4096)));
        Ok(())
    }

    #[test]
    fn the_sector_bitmap_is_sized_like_qemu_with_none_under_4_kib_blocks() {
        assert_eq!(bitmap_len(512), 0);
        assert_eq!(bitmap_len(2048), 0);
        assert_eq!(bitmap_len(4096), 512);
        assert_eq!(bitmap_len(2 << 20), 512);
        assert_eq!(bitmap_len(4 << 20), 1024);
        assert_eq!(bitmap_len(MAX_BLOCK_SIZE), 65536);
    }

    #[test]
    fn matches_wants_the_cookie_at_offset_zero() {
        assert!(matches(b"conectix\0\0\0\x02"));
        assert!(!matches(b"conecti"));
        assert!(!matches(b"\0conectix"));
        assert!(!matches(&[]));
    }

    #[test]
    fn no_truncation_of_a_real_dynamic_vhd_panics() -> TestResult {
        let scratch = Scratch::new("vhd-truncate")?;
        let path = scratch.path("d.vhd");
        qemu_create(&path, "subformat=dynamic", "10M")?;
        let bytes = std::fs::read(&path)?;
        for len in 0..=bytes.len() {
            let view = SliceView(&bytes[..len]);
            let _ = detect(&view);
            let _ = probe(&view);
            let _ = probe_fixed(&view);
        }
        Ok(())
    }

    #[test]
    fn no_single_byte_corruption_of_a_real_vhd_panics() -> TestResult {
        let scratch = Scratch::new("vhd-corrupt")?;
        for subformat in ["dynamic", "fixed"] {
            let path = scratch.path(&format!("{subformat}.vhd"));
            qemu_create(&path, &format!("subformat={subformat}"), "1M")?;
            let mut bytes = std::fs::read(&path)?;
            let len = bytes.len();
            let metadata = if subformat == "dynamic" {
                0..len.min(2048)
            } else {
                0..0
            };
            for at in metadata.chain(len - FOOTER_LEN..len) {
                let original = bytes[at];
                for value in [0x00, 0xff, original ^ 0x01, original ^ 0x80] {
                    bytes[at] = value;
                    let view = SliceView(&bytes);
                    let _ = detect(&view);
                    let _ = probe(&view);
                    let _ = probe_fixed(&view);
                }
                bytes[at] = original;
            }
        }
        Ok(())
    }

    #[test]
    fn fuzz_survives_arbitrary_bytes() {
        fuzz(&[]);
        fuzz(COOKIE);
        fuzz(&[0xff; 2048]);
        let mut hostile = dynamic_vhd(10 << 20, 1536, 0);
        edit_header(&mut hostile, |h| {
            put_u64(h, 16, u64::MAX);
            put_u32(h, 28, u32::MAX);
        });
        fuzz(&hostile);
    }
}
