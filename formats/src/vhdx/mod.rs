//! VHDX (Hyper-V virtual hard disk, version 2): header, region table and metadata parsing and
//! validation.
//!
//! The specification of record is Microsoft's MS-VHDX. A VHDX file opens with a 1 MiB header
//! section: the file type identifier, two copies of the header (at 64 KiB and 128 KiB; the
//! current one is the intact copy with the larger sequence number) and the region table (at
//! 192 KiB), which locates the block allocation table (BAT) and the metadata region. The
//! metadata region holds the items that give the virtual size, the block size and the sector
//! sizes. This module reads exactly those structures, checks every offset and length taken from
//! them, and refuses what cannot be imported safely: a log that still has to be replayed, a
//! differencing disk (its data lives partly in a parent file) and anything marked required that
//! it does not understand. The virtual size it reports is the one `qemu-img info` reports.
//!
//! Reads follow file order (headers, region table, metadata table, then the items by offset)
//! because a single-pass stream probe can only keep a range that is still ahead of it. The BAT
//! itself is not read here; [`Layout`] says where it is and how many entries it must hold.

pub mod decode;

use std::fmt;

use crate::error::{Result, err};
use crate::view::{Fields, View};
use crate::{Format, ImageInfo, MAX_VIRTUAL_SIZE};

/// The file type identifier at offset 0.
pub const FILE_IDENTIFIER: &[u8; 8] = b"vhdxfile";

const MIB: u64 = 1 << 20;
/// The header section (identifier, headers, region tables) fills the first MiB.
const HEADER_SECTION_LEN: u64 = MIB;
/// The two copies of the header, first and second.
const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes covered by a header's checksum.
const HEADER_LEN: usize = 4 << 10;
/// The region table. A second copy follows at 256 KiB; see [`read_regions`] for why it is not read.
const REGION_TABLE_OFFSET: u64 = 192 << 10;
/// Bytes covered by the region table's checksum.
const REGION_TABLE_LEN: usize = 64 << 10;
/// The metadata table at the start of the metadata region; items follow it.
const METADATA_TABLE_LEN: usize = 64 << 10;
/// Both tables hold at most this many entries (which is what fits in 64 KiB).
const MAX_ENTRIES: u32 = 2047;
/// Bytes per region table or metadata table entry.
const ENTRY_LEN: usize = 32;
/// Region table entries start after its 16-byte header.
const REGION_ENTRIES_AT: usize = 16;
/// Metadata table entries start after its 32-byte header.
const METADATA_ENTRIES_AT: usize = 32;
/// Block sizes the specification allows (powers of two in between).
const MIN_BLOCK_SIZE: u32 = 1 << 20;
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Sectors described by one sector bitmap block (1 MiB of bits); sets the chunk ratio.
const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Bytes per BAT entry.
const BAT_ENTRY_LEN: u64 = 8;

/// Region table entry flag: a reader that does not know the region must refuse the file.
const REGION_REQUIRED: u32 = 1;
/// Metadata table entry flag (bit 2): a reader that does not know the item must refuse the file.
const ITEM_REQUIRED: u32 = 1 << 2;
/// File parameters flag: payload blocks stay allocated (what qemu calls a fixed image).
const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk, whose unwritten sectors come from a parent.
const HAS_PARENT: u32 = 1 << 1;

/// A GUID as VHDX stores it: the first three fields little-endian, the last eight bytes in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The GUID written `data1-data2-data3-data4` in its usual text form.
    pub const fn new(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        let a = data1.to_le_bytes();
        let b = data2.to_le_bytes();
        let c = data3.to_le_bytes();
        let d = data4;
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    /// Whether this is the nil GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9]
        )?;
        b[10..].iter().try_for_each(|byte| write!(f, "{byte:02X}"))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The GUIDs that name regions and metadata items.
pub mod guid {
    use super::Guid;

    /// Region: the block allocation table.
    pub const BAT: Guid = Guid::new(
        0x2DC2_7766,
        0xF623,
        0x4200,
        [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
    );
    /// Region: the metadata region.
    pub const METADATA: Guid = Guid::new(
        0x8B7C_A206,
        0x4790,
        0x4B9A,
        [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
    );
    /// Item: block size and flags.
    pub const FILE_PARAMETERS: Guid = Guid::new(
        0xCAA1_6737,
        0xFA36,
        0x4D43,
        [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
    );
    /// Item: the virtual disk size in bytes.
    pub const VIRTUAL_DISK_SIZE: Guid = Guid::new(
        0x2FA5_4224,
        0xCD1B,
        0x4876,
        [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
    );
    /// Item: the logical sector size (512 or 4096).
    pub const LOGICAL_SECTOR_SIZE: Guid = Guid::new(
        0x8141_BF1D,
        0xA96F,
        0x4709,
        [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
    );
    /// Item: the physical sector size.
    pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::new(
        0xCDA3_48C7,
        0x445D,
        0x4471,
        [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
    );
    /// Item: the SCSI page 83 identifier of the disk.
    pub const PAGE_83_DATA: Guid = Guid::new(
        0xBECA_12AB,
        0xB2E6,
        0x4523,
        [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
    );
    /// Item: where a differencing disk's parent is.
    pub const PARENT_LOCATOR: Guid = Guid::new(
        0xA8D3_5F2B,
        0xB30B,
        0x454D,
        [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
    );
}

/// A byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Span {
    /// One past the last byte (saturating, though parsed spans never overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// A validated VHDX layout: what a decoder needs, every offset checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Guest-visible size in bytes (a multiple of the logical sector size).
    pub virtual_size: u64,
    /// Bytes per payload block: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// As the image declares it (reported, not relied on).
    pub physical_sector_size: u32,
    /// Payload blocks are all allocated up front (a "fixed" image).
    pub leave_blocks_allocated: bool,
    /// The sequence number of the current header.
    pub sequence_number: u64,
    /// The log region (empty when the header declares none); it holds nothing to replay.
    pub log: Span,
    /// The block allocation table region.
    pub bat: Span,
    /// The metadata region.
    pub metadata: Span,
}

impl Layout {
    /// Payload blocks per sector bitmap block; the BAT interleaves one bitmap entry after each
    /// chunk of this many payload entries.
    pub fn chunk_ratio(&self) -> u64 {
        chunk_ratio(self.logical_sector_size, self.block_size)
    }

    /// Payload blocks needed to cover the virtual size.
    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }

    /// BAT entries the disk uses (payload entries plus interleaved bitmap entries).
    pub fn bat_entries(&self) -> u64 {
        bat_entries(self.virtual_size, self.block_size, self.logical_sector_size)
    }

    /// What the probe (and the decoder) report for this layout.
    pub fn info(&self) -> ImageInfo {
        ImageInfo::new(Format::Vhdx, self.virtual_size)
            .with("subformat", self.subformat())
            .with("block-size", self.block_size)
            .with("logical-sector-size", self.logical_sector_size)
            .with("physical-sector-size", self.physical_sector_size)
    }

    /// `fixed` or `dynamic`, as `qemu-img create -o subformat=` names them.
    pub fn subformat(&self) -> &'static str {
        if self.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

/// Payload blocks per sector bitmap block. Both sizes are validated powers of two with
/// `block_size <= 2^28` and `logical_sector_size >= 2^9`, so the ratio is a power of two >= 16.
fn chunk_ratio(logical_sector_size: u32, block_size: u32) -> u64 {
    SECTORS_PER_BITMAP_BLOCK * u64::from(logical_sector_size) / u64::from(block_size).max(1)
}

/// BAT entries of a non-differencing disk: one per payload block, plus one sector bitmap entry
/// after every full chunk except a trailing one (the last chunk's bitmap entry may be omitted).
fn bat_entries(virtual_size: u64, block_size: u32, logical_sector_size: u32) -> u64 {
    let data_blocks = virtual_size.div_ceil(u64::from(block_size).max(1));
    match data_blocks.checked_sub(1) {
        Some(last) => {
            data_blocks.saturating_add(last / chunk_ratio(logical_sector_size, block_size).max(1))
        }
        None => 0,
    }
}

/// The CRC-32C of a header or region table, computed with its checksum field (bytes 4..8)
/// taken as zero, as the specification defines it.
pub fn checksum(bytes: &[u8]) -> u32 {
    let before = bytes.get(..4).unwrap_or(bytes);
    let after = bytes.get(8..).unwrap_or_default();
    crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(before), &[0; 4]),
        after,
    )
}

/// Whether the first bytes of an image are a VHDX file type identifier.
pub(crate) fn matches(head: &[u8]) -> bool {
    head.starts_with(FILE_IDENTIFIER)
}

/// Validates a VHDX image and reports its virtual size and properties.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    Ok(parse(view)?.info())
}

/// Runs the probe over arbitrary bytes, for the fuzz target.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = probe(&crate::view::SliceView(data));
}

/// Parses and validates the VHDX image behind `view`.
pub fn parse(view: &dyn View) -> Result<Layout> {
    let identifier = view.read(0, FILE_IDENTIFIER.len(), "the VHDX file type identifier")?;
    if *identifier != FILE_IDENTIFIER[..] {
        return Err(err!(
            InvalidFormat,
            "not a VHDX image: the file type identifier \"vhdxfile\" is missing"
        ));
    }
    let header = current_header(view)?;
    let log = check_header(&header)?;
    let regions = read_regions(view, log)?;
    let items = read_metadata_table(view, regions.metadata)?;
    let values = read_items(view, regions.metadata, &items)?;
    validate(header, log, regions, values)
}

/// The fields of a header that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    sequence: u64,
    log_guid: Guid,
    version: u16,
    log_length: u32,
    log_offset: u64,
}

/// One copy of the header as found on disk.
enum HeaderCopy {
    /// Signature and checksum are right; the raw bytes are kept to compare the two copies.
    Intact(Header, Vec<u8>),
    /// What is wrong with it.
    Damaged(&'static str),
}

/// Reads the header copy at `offset`.
fn read_header_copy(view: &dyn View, offset: u64, what: &str) -> Result<HeaderCopy> {
    let bytes = view.read(offset, HEADER_LEN, what)?;
    let f = Fields::new(&bytes, "VHDX header");
    if f.array::<4>(0)? != *b"head" {
        return Ok(HeaderCopy::Damaged("its signature is not \"head\""));
    }
    if f.u32_le(4)? != checksum(&bytes) {
        return Ok(HeaderCopy::Damaged("its CRC-32C checksum does not match"));
    }
    let header = Header {
        sequence: f.u64_le(8)?,
        log_guid: Guid(f.array(48)?),
        version: f.u16_le(66)?,
        log_length: f.u32_le(68)?,
        log_offset: f.u64_le(72)?,
    };
    Ok(HeaderCopy::Intact(header, bytes.into_owned()))
}

/// The current header: the intact copy with the larger sequence number.
fn current_header(view: &dyn View) -> Result<Header> {
    let [first_at, second_at] = HEADER_OFFSETS;
    let first = read_header_copy(view, first_at, "the first VHDX header")?;
    let second = read_header_copy(view, second_at, "the second VHDX header")?;
    match (first, second) {
        (HeaderCopy::Intact(a, raw_a), HeaderCopy::Intact(b, raw_b)) => {
            if a.sequence > b.sequence {
                Ok(a)
            } else if b.sequence > a.sequence || raw_a == raw_b {
                Ok(b)
            } else {
                // qemu refuses this too: with equal sequence numbers nothing says which
                // of two different copies was written last.
                Err(err!(
                    Corrupt,
                    "both VHDX headers carry sequence number {} but differ, so neither can be trusted as the current one; \
                     the image is damaged, export or download it again",
                    a.sequence
                ))
            }
        }
        (HeaderCopy::Intact(a, _), HeaderCopy::Damaged(_)) => Ok(a),
        (HeaderCopy::Damaged(_), HeaderCopy::Intact(b, _)) => Ok(b),
        (HeaderCopy::Damaged(why_first), HeaderCopy::Damaged(why_second)) => Err(err!(
            Corrupt,
            "neither VHDX header is intact (the one at 64 KiB: {why_first}; the one at 128 KiB: {why_second}); \
             the image is damaged, export or download it again"
        )),
    }
}

/// Checks the current header and returns its log region (empty when it has none).
fn check_header(header: &Header) -> Result<Span> {
    if header.version != 1 {
        return Err(err!(
            Unsupported,
            "the VHDX header declares format version {}, but only version 1 is defined; the image is damaged or \
             comes from an unknown tool: export it again as a plain VHDX (or raw) and import that",
            header.version
        ));
    }
    if !header.log_guid.is_zero() {
        // qemu opens such an image read-only only when the log holds no entries; telling
        // would mean walking the whole log region, so any declared log is refused.
        return Err(err!(
            Unsupported,
            "the VHDX image has a log (GUID {}) that may hold writes not yet applied to the disk, so its contents \
             cannot be trusted as they are; replay the log with `qemu-img check -r all IMAGE` (or attach the disk \
             once in Hyper-V) and import it again; if the header still names a log afterwards, rewrite the image \
             with `qemu-img convert -O vhdx IMAGE clean.vhdx`",
            header.log_guid
        ));
    }
    let log = Span {
        offset: header.log_offset,
        length: u64::from(header.log_length),
    };
    if !log.offset.is_multiple_of(MIB) || !log.length.is_multiple_of(MIB) {
        return Err(err!(
            Corrupt,
            "the VHDX log region (offset {}, {} bytes) is not aligned to 1 MiB; the image is damaged, export or \
             download it again",
            log.offset,
            log.length
        ));
    }
    if log.offset.checked_add(log.length).is_none() {
        return Err(err!(
            OutOfBounds,
            "the VHDX log region lies at offset {}, beyond any possible image",
            log.offset
        ));
    }
    // The log is not checked against the end of the file: with no log GUID it holds nothing
    // to read, and qemu accepts such images.
    Ok(log)
}

/// Where the BAT and the metadata live.
#[derive(Debug, Clone, Copy)]
struct Regions {
    bat: Span,
    metadata: Span,
}

/// Reads and checks the region table and returns the BAT and metadata regions.
///
/// Only the first copy is read: qemu reads only that one, so an image whose first copy is
/// damaged cannot be opened by qemu even when the second is intact, and is refused here too.
fn read_regions(view: &dyn View, log: Span) -> Result<Regions> {
    let table = view.read(
        REGION_TABLE_OFFSET,
        REGION_TABLE_LEN,
        "the VHDX region table",
    )?;
    let f = Fields::new(&table, "VHDX region table");
    if f.array::<4>(0)? != *b"regi" {
        return Err(err!(
            Corrupt,
            "the VHDX region table at 192 KiB has no \"regi\" signature; the image is damaged, export or download it again"
        ));
    }
    if f.u32_le(4)? != checksum(&table) {
        return Err(err!(
            Corrupt,
            "the VHDX region table's CRC-32C checksum does not match; the image is damaged, export or download it again"
        ));
    }
    let count = f.u32_le(8)?;
    if count > MAX_ENTRIES {
        return Err(err!(
            OutOfBounds,
            "the VHDX region table claims {count} entries, more than the {MAX_ENTRIES} it can hold; the image is \
             damaged or hostile"
        ));
    }

    let mut bat = None;
    let mut metadata = None;
    // Everything that occupies the file, to check that nothing overlaps.
    let mut spans = vec![(
        Span {
            offset: 0,
            length: HEADER_SECTION_LEN,
        },
        "header section".to_owned(),
    )];
    if log.length > 0 {
        spans.push((log, "log region".to_owned()));
    }
    for index in 0..count as usize {
        let at = REGION_ENTRIES_AT + index * ENTRY_LEN;
        let id = Guid(f.array(at)?);
        let span = Span {
            offset: f.u64_le(at + 16)?,
            length: u64::from(f.u32_le(at + 24)?),
        };
        let required = f.u32_le(at + 28)? & REGION_REQUIRED != 0;
        let (name, slot) = match id {
            guid::BAT => ("block allocation table".to_owned(), Some(&mut bat)),
            guid::METADATA => ("metadata region".to_owned(), Some(&mut metadata)),
            _ if required => {
                return Err(err!(
                    Unsupported,
                    "the VHDX image has a region {id} marked as required that this importer does not know; export the \
                     disk again as a plain VHDX (or raw) with the tool that wrote it and import that"
                ));
            }
            _ => (format!("region {id}"), None),
        };
        if !span.offset.is_multiple_of(MIB) || !span.length.is_multiple_of(MIB) {
            return Err(err!(
                Corrupt,
                "the VHDX {name} (offset {}, {} bytes) is not aligned to 1 MiB; the image is damaged, export or \
                 download it again",
                span.offset,
                span.length
            ));
        }
        let Some(end) = span.offset.checked_add(span.length) else {
            return Err(err!(
                OutOfBounds,
                "the VHDX {name} lies at offset {}, beyond any possible image",
                span.offset
            ));
        };
        if view.len_known() && end > view.len() {
            return Err(err!(
                Truncated,
                "the VHDX {name} (bytes {}..{end}) lies beyond the end of the image at byte {}; the image is \
                 truncated, download it again",
                span.offset,
                view.len()
            ));
        }
        if let Some(slot) = slot {
            if slot.is_some() {
                return Err(err!(
                    Corrupt,
                    "the VHDX region table lists the {name} twice; the image is damaged, export or download it again"
                ));
            }
            if span.length == 0 {
                return Err(err!(
                    Corrupt,
                    "the VHDX {name} is empty; the image is damaged, export or download it again"
                ));
            }
            *slot = Some(span);
        }
        if span.length > 0 {
            spans.push((span, name));
        }
    }
    check_overlaps(spans)?;

    let missing = |name: &str| {
        err!(
            Corrupt,
            "the VHDX region table has no {name}, which every VHDX file needs; the image is damaged, export or \
             download it again"
        )
    };
    Ok(Regions {
        bat: bat.ok_or_else(|| missing("block allocation table"))?,
        metadata: metadata.ok_or_else(|| missing("metadata region"))?,
    })
}

/// Refuses spans (with their names) that share bytes.
fn check_overlaps(mut spans: Vec<(Span, String)>) -> Result<()> {
    spans.sort_by_key(|(span, _)| (span.offset, span.end()));
    // Sorted by start, a span overlaps an earlier one exactly when it starts before the
    // furthest end seen so far.
    let mut furthest: Option<&(Span, String)> = None;
    for current in &spans {
        if let Some(previous) = furthest
            && current.0.offset < previous.0.end()
        {
            return Err(err!(
                Corrupt,
                "the VHDX {} (bytes {}..{}) and {} (bytes {}..{}) overlap; the image is damaged, export or \
                     download it again",
                previous.1,
                previous.0.offset,
                previous.0.end(),
                current.1,
                current.0.offset,
                current.0.end()
            ));
        }
        if furthest.is_none_or(|previous| current.0.end() > previous.0.end()) {
            furthest = Some(current);
        }
    }
    Ok(())
}

/// A metadata item this module knows.
struct ItemSpec {
    id: Guid,
    name: &'static str,
    /// Bytes the item must have.
    min_len: u32,
    /// Whether every VHDX file must have it (qemu refuses files without it).
    needed: bool,
}

/// The known items, in the order of [`Items`].
const ITEM_SPECS: [ItemSpec; 6] = [
    ItemSpec {
        id: guid::FILE_PARAMETERS,
        name: "file parameters",
        min_len: 8,
        needed: true,
    },
    ItemSpec {
        id: guid::VIRTUAL_DISK_SIZE,
        name: "virtual disk size",
        min_len: 8,
        needed: true,
    },
    ItemSpec {
        id: guid::LOGICAL_SECTOR_SIZE,
        name: "logical sector size",
        min_len: 4,
        needed: true,
    },
    ItemSpec {
        id: guid::PHYSICAL_SECTOR_SIZE,
        name: "physical sector size",
        min_len: 4,
        needed: true,
    },
    ItemSpec {
        id: guid::PAGE_83_DATA,
        name: "page 83 data",
        min_len: 16,
        needed: true,
    },
    ItemSpec {
        id: guid::PARENT_LOCATOR,
        name: "parent locator",
        min_len: 0,
        needed: false,
    },
];

/// Offsets (relative to the metadata region) of the known items, in the order of [`ITEM_SPECS`].
type Items = [Option<u32>; 6];

/// Reads the metadata table and returns where each known item lies.
fn read_metadata_table(view: &dyn View, region: Span) -> Result<Items> {
    let table = view.read(region.offset, METADATA_TABLE_LEN, "the VHDX metadata table")?;
    let f = Fields::new(&table, "VHDX metadata table");
    if f.array::<8>(0)? != *b"metadata" {
        return Err(err!(
            Corrupt,
            "the VHDX metadata table at byte {} has no \"metadata\" signature; the image is damaged, export or \
             download it again",
            region.offset
        ));
    }
    let count = f.u16_le(10)?;
    if u32::from(count) > MAX_ENTRIES {
        return Err(err!(
            OutOfBounds,
            "the VHDX metadata table claims {count} entries, more than the {MAX_ENTRIES} it can hold; the image is \
             damaged or hostile"
        ));
    }
    let mut items: Items = [None; 6];
    for index in 0..usize::from(count) {
        let at = METADATA_ENTRIES_AT + index * ENTRY_LEN;
        let id = Guid(f.array(at)?);
        let offset = f.u32_le(at + 16)?;
        let length = f.u32_le(at + 20)?;
        let required = f.u32_le(at + 24)? & ITEM_REQUIRED != 0;
        let Some((spec, slot)) = ITEM_SPECS
            .iter()
            .zip(items.iter_mut())
            .find(|(spec, _)| spec.id == id)
        else {
            if required {
                return Err(err!(
                    Unsupported,
                    "the VHDX image has a metadata item {id} marked as required that this importer does not know; \
                     export the disk again as a plain VHDX (or raw) with the tool that wrote it and import that"
                ));
            }
            continue;
        };
        let name = spec.name;
        if slot.is_some() {
            return Err(err!(
                Corrupt,
                "the VHDX metadata table lists the {name} item twice; the image is damaged, export or download it again"
            ));
        }
        if length < spec.min_len {
            return Err(err!(
                Corrupt,
                "the VHDX {name} metadata item is {length} bytes, less than its {} bytes; the image is damaged, \
                 export or download it again",
                spec.min_len
            ));
        }
        // Items follow the 64 KiB table and must end inside the region.
        let end = u64::from(offset) + u64::from(length);
        if (offset as usize) < METADATA_TABLE_LEN || end > region.length {
            return Err(err!(
                OutOfBounds,
                "the VHDX {name} metadata item (bytes {offset}..{end} of the metadata region) lies outside the \
                 {} bytes after the metadata table; the image is damaged or hostile",
                region.length.saturating_sub(METADATA_TABLE_LEN as u64)
            ));
        }
        *slot = Some(offset);
    }
    for (spec, slot) in ITEM_SPECS.iter().zip(&items) {
        if spec.needed && slot.is_none() {
            return Err(err!(
                Corrupt,
                "the VHDX metadata has no {} item, which every VHDX file needs; the image is damaged, export or \
                 download it again",
                spec.name
            ));
        }
    }
    Ok(items)
}

/// The values of the items that decide the layout.
#[derive(Debug, Default)]
struct Values {
    block_size: u32,
    file_flags: u32,
    virtual_size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
}

/// Reads the value items in file order.
fn read_items(view: &dyn View, region: Span, items: &Items) -> Result<Values> {
    // The first four specs are the items with values; the rest are only checked for presence.
    let mut order: Vec<(u32, usize)> = items
        .iter()
        .take(4)
        .enumerate()
        .filter_map(|(i, at)| Some(((*at)?, i)))
        .collect();
    order.sort_unstable();
    let mut values = Values::default();
    for (offset, index) in order {
        let Some(spec) = ITEM_SPECS.get(index) else {
            continue;
        };
        let what = format!("the VHDX {} metadata item", spec.name);
        let at = region
            .offset
            .checked_add(offset.into())
            .ok_or_else(|| err!(OutOfBounds, "{what} lies beyond any possible image"))?;
        let bytes = view.read(at, spec.min_len as usize, &what)?;
        let f = Fields::new(&bytes, "VHDX metadata item");
        match spec.id {
            guid::FILE_PARAMETERS => {
                values.block_size = f.u32_le(0)?;
                values.file_flags = f.u32_le(4)?;
            }
            guid::VIRTUAL_DISK_SIZE => values.virtual_size = f.u64_le(0)?,
            guid::LOGICAL_SECTOR_SIZE => values.logical_sector_size = f.u32_le(0)?,
            _ => values.physical_sector_size = f.u32_le(0)?,
        }
    }
    Ok(values)
}

/// Checks the item values against each other and the regions, and builds the layout.
fn validate(header: Header, log: Span, regions: Regions, v: Values) -> Result<Layout> {
    if v.file_flags & HAS_PARENT != 0 {
        return Err(err!(
            Unsupported,
            "the VHDX image is a differencing disk: it holds only changes against a parent disk, which is not part \
             of the import; merge it into its parent first (Hyper-V `Merge-VHD`, or Edit Disk > Merge) and import \
             the merged disk"
        ));
    }
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&v.block_size) || !v.block_size.is_power_of_two()
    {
        return Err(err!(
            InvalidFormat,
            "the VHDX block size {} is not a power of two from 1 MiB to 256 MiB; the image is damaged, export or \
             download it again",
            v.block_size
        ));
    }
    if !matches!(v.logical_sector_size, 512 | 4096) {
        return Err(err!(
            InvalidFormat,
            "the VHDX logical sector size {} is neither 512 nor 4096; the image is damaged, export or download it again",
            v.logical_sector_size
        ));
    }
    if v.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(err!(
            OutOfBounds,
            "the VHDX virtual size {} bytes is beyond the {MAX_VIRTUAL_SIZE} byte limit; the image is damaged or hostile",
            v.virtual_size
        ));
    }
    if !v
        .virtual_size
        .is_multiple_of(u64::from(v.logical_sector_size))
    {
        return Err(err!(
            InvalidFormat,
            "the VHDX virtual size {} bytes is not a multiple of its {} byte logical sectors; the image is damaged, \
             export or download it again",
            v.virtual_size,
            v.logical_sector_size
        ));
    }
    let layout = Layout {
        virtual_size: v.virtual_size,
        block_size: v.block_size,
        logical_sector_size: v.logical_sector_size,
        physical_sector_size: v.physical_sector_size,
        leave_blocks_allocated: v.file_flags & LEAVE_BLOCKS_ALLOCATED != 0,
        sequence_number: header.sequence,
        log,
        bat: regions.bat,
        metadata: regions.metadata,
    };
    let needed = layout.bat_entries();
    let room = layout.bat.length / BAT_ENTRY_LEN;
    if needed > room {
        return Err(err!(
            Corrupt,
            "the VHDX block allocation table has room for {room} entries but a {} byte disk in {} byte blocks needs \
             {needed}; the image is damaged, export or download it again",
            layout.virtual_size,
            layout.block_size
        ));
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::testing::{Scratch, qemu_img, qemu_info};
    use crate::view::SliceView;
    use std::path::{Path, PathBuf};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    // The layout of images made by `Spec::build`, which mirrors what qemu writes.
    const H1: usize = 64 << 10;
    const H2: usize = 128 << 10;
    const RT1: usize = 192 << 10;
    const RT2: usize = 256 << 10;
    const LOG: usize = 1 << 20;
    pub(super) const BAT: usize = 2 << 20;
    const META: usize = 3 << 20;
    pub(super) const FILE_LEN: usize = 4 << 20;
    /// Metadata table entry `i` (items in the order file parameters, size, page 83, logical, physical).
    const fn meta_entry(i: usize) -> usize {
        META + 32 + 32 * i
    }
    const ITEMS: usize = META + (64 << 10);
    const FILE_PARAMS: usize = ITEMS;
    const SIZE: usize = ITEMS + 8;
    const LOGICAL: usize = ITEMS + 32;
    const PHYSICAL: usize = ITEMS + 36;
    /// Region table entry `i` (0: BAT, 1: metadata).
    const fn region_entry(i: usize) -> usize {
        RT1 + 16 + 32 * i
    }

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn put_u16(img: &mut [u8], at: usize, v: u16) {
        put(img, at, &v.to_le_bytes());
    }

    fn put_u32(img: &mut [u8], at: usize, v: u32) {
        put(img, at, &v.to_le_bytes());
    }

    pub(super) fn put_u64(img: &mut [u8], at: usize, v: u64) {
        put(img, at, &v.to_le_bytes());
    }

    /// Recomputes the checksums of both headers and both region tables (where their signature
    /// is present), so that a change reaches the code behind the checksum test.
    pub(super) fn seal(img: &mut [u8]) {
        for (at, len) in [
            (H1, HEADER_LEN),
            (H2, HEADER_LEN),
            (RT1, REGION_TABLE_LEN),
            (RT2, REGION_TABLE_LEN),
        ] {
            if img.len() >= at + len && matches!(&img[at..at + 4], b"head" | b"regi") {
                let sum = checksum(&img[at..at + len]);
                put_u32(img, at + 4, sum);
            }
        }
    }

    fn table_entry(id: Guid, a: u64, b: u32, c: u32) -> Vec<u8> {
        let mut e = id.0.to_vec();
        e.extend_from_slice(&a.to_le_bytes());
        e.extend_from_slice(&b.to_le_bytes());
        e.extend_from_slice(&c.to_le_bytes());
        e
    }

    fn meta_item(id: Guid, offset: u32, length: u32, flags: u32) -> Vec<u8> {
        let mut e = id.0.to_vec();
        for field in [offset, length, flags, 0] {
            e.extend_from_slice(&field.to_le_bytes());
        }
        e
    }

    /// A hand-made VHDX laid out as qemu lays them out.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Spec {
        pub(super) size: u64,
        pub(super) block_size: u32,
        pub(super) logical: u32,
        pub(super) physical: u32,
        pub(super) flags: u32,
    }

    impl Spec {
        pub(super) fn dynamic(size: u64) -> Self {
            Self {
                size,
                block_size: 32 << 20,
                logical: 512,
                physical: 4096,
                flags: 0,
            }
        }

        pub(super) fn build(self) -> Vec<u8> {
            let mut img = vec![0u8; FILE_LEN];
            put(&mut img, 0, FILE_IDENTIFIER);
            for (at, sequence) in [(H1, 7u64), (H2, 8)] {
                put(&mut img, at, b"head");
                put_u64(&mut img, at + 8, sequence);
                put(&mut img, at + 16, &[0x11; 16]);
                put(&mut img, at + 32, &[0x22; 16]);
                put_u16(&mut img, at + 66, 1);
                put_u32(&mut img, at + 68, 1 << 20);
                put_u64(&mut img, at + 72, LOG as u64);
            }
            for at in [RT1, RT2] {
                put(&mut img, at, b"regi");
                put_u32(&mut img, at + 8, 2);
                put(
                    &mut img,
                    at + 16,
                    &table_entry(guid::BAT, BAT as u64, 1 << 20, 1),
                );
                put(
                    &mut img,
                    at + 48,
                    &table_entry(guid::METADATA, META as u64, 1 << 20, 1),
                );
            }
            put(&mut img, META, b"metadata");
            put_u16(&mut img, META + 10, 5);
            let entries = [
                (guid::FILE_PARAMETERS, 0, 8, 4),
                (guid::VIRTUAL_DISK_SIZE, 8, 8, 6),
                (guid::PAGE_83_DATA, 16, 16, 6),
                (guid::LOGICAL_SECTOR_SIZE, 32, 4, 6),
                (guid::PHYSICAL_SECTOR_SIZE, 36, 4, 6),
            ];
            for (i, (id, offset, length, flags)) in entries.into_iter().enumerate() {
                put(
                    &mut img,
                    meta_entry(i),
                    &meta_item(id, (64 << 10) + offset, length, flags),
                );
            }
            put_u32(&mut img, FILE_PARAMS, self.block_size);
            put_u32(&mut img, FILE_PARAMS + 4, self.flags);
            put_u64(&mut img, SIZE, self.size);
            put(&mut img, ITEMS + 16, &[0x33; 16]);
            put_u32(&mut img, LOGICAL, self.logical);
            put_u32(&mut img, PHYSICAL, self.physical);
            seal(&mut img);
            img
        }
    }

    /// Probes with random access and as a stream, checks that both agree, and returns the result.
    fn probe_both(bytes: &[u8]) -> Result<ImageInfo> {
        let direct = crate::detect::detect(&SliceView(bytes));
        let streamed =
            crate::probe::probe_reader(std::io::Cursor::new(bytes.to_vec())).map(|p| p.info);
        match (&direct, &streamed) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "random access and streaming disagree"),
            (Err(a), Err(b)) => assert_eq!(
                (a.kind(), a.message()),
                (b.kind(), b.message()),
                "random access and streaming refuse differently"
            ),
            _ => panic!("random access gave {direct:?} but streaming gave {streamed:?}"),
        }
        direct
    }

    /// Asserts that both probes refuse `bytes` with `kind` and a message containing `needle`.
    #[track_caller]
    fn assert_refused(bytes: &[u8], kind: ErrorKind, needle: &str) {
        match probe_both(bytes) {
            Ok(info) => panic!("expected a {kind:?} refusal mentioning {needle:?}, got {info:?}"),
            Err(e) => {
                assert_eq!(e.kind(), kind, "unexpected kind for: {e}");
                assert!(
                    e.message().contains(needle),
                    "{:?} does not contain {needle:?}",
                    e.message()
                );
            }
        }
    }

    /// A built image changed by `change`, with its checksums recomputed.
    fn sealed(spec: Spec, change: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut img = spec.build();
        change(&mut img);
        seal(&mut img);
        img
    }

    fn default_image(change: impl FnOnce(&mut [u8])) -> Vec<u8> {
        sealed(Spec::dynamic(10 << 20), change)
    }

    /// The virtual size `qemu-img info` reports for a vhdx file.
    fn qemu_virtual_size(path: &Path) -> std::result::Result<u64, Box<dyn std::error::Error>> {
        let (format, size) = qemu_info(path, Some("vhdx"))?;
        assert_eq!(format, "vhdx");
        Ok(size)
    }

    /// Checks both probes against `qemu-img info` for the vhdx file at `path`.
    fn assert_matches_qemu(path: &Path, subformat: &str, block_size: Option<u64>) -> TestResult {
        let bytes = std::fs::read(path)?;
        let info = probe_both(&bytes)?;
        assert_eq!(info.format, Format::Vhdx);
        assert_eq!(
            info.virtual_size,
            qemu_virtual_size(path)?,
            "virtual size of {}",
            path.display()
        );
        assert_eq!(
            info.details
                .get("subformat")
                .map(|d| d.to_string())
                .as_deref(),
            Some(subformat)
        );
        assert_eq!(
            info.details
                .get("logical-sector-size")
                .map(|d| d.to_string())
                .as_deref(),
            Some("512")
        );
        if let Some(block_size) = block_size {
            assert_eq!(info.details.get("block-size"), Some(&block_size.into()));
        }
        Ok(())
    }

    fn create(
        dir: &Scratch,
        name: &str,
        size: &str,
        options: &str,
    ) -> std::result::Result<PathBuf, Box<dyn std::error::Error>> {
        let path = dir.path(name);
        let shown = path.to_str().ok_or("non-UTF-8 temporary path")?;
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", options, shown, size])?;
        Ok(path)
    }

    #[test]
    fn probe_matches_qemu_for_dynamic_images_of_several_sizes() -> TestResult {
        let dir = Scratch::new("vhdx-dynamic")?;
        for (i, size) in ["0", "10M", "1G", "3G", "3221229568", "1T"]
            .into_iter()
            .enumerate()
        {
            let path = create(&dir, &format!("{i}.vhdx"), size, "subformat=dynamic")?;
            assert_matches_qemu(&path, "dynamic", None)?;
        }
        Ok(())
    }

    #[test]
    fn probe_matches_qemu_for_fixed_images() -> TestResult {
        let dir = Scratch::new("vhdx-fixed")?;
        for (i, size) in ["16M", "5243392"].into_iter().enumerate() {
            let path = create(&dir, &format!("{i}.vhdx"), size, "subformat=fixed")?;
            assert_matches_qemu(&path, "fixed", None)?;
        }
        Ok(())
    }

    #[test]
    fn probe_matches_qemu_for_explicit_block_and_log_sizes() -> TestResult {
        let dir = Scratch::new("vhdx-options")?;
        let cases = [
            ("1G", "block_size=1M", 1u64 << 20),
            ("3G", "block_size=256M", 256 << 20),
            ("100M", "block_size=2M,log_size=4M", 2 << 20),
            ("20G", "block_size=64M,log_size=2M", 64 << 20),
        ];
        for (i, (size, options, block_size)) in cases.into_iter().enumerate() {
            let path = create(&dir, &format!("{i}.vhdx"), size, options)?;
            assert_matches_qemu(&path, "dynamic", Some(block_size))?;
        }
        Ok(())
    }

    #[test]
    fn probe_matches_qemu_for_an_image_converted_from_raw_data() -> TestResult {
        let dir = Scratch::new("vhdx-convert")?;
        let mut raw = vec![0u8; 20 << 20];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for range in [0..5 << 20, 12 << 20..14 << 20, (20 << 20) - 4096..20 << 20] {
            for byte in &mut raw[range] {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
        }
        let raw_path = dir.path("data.raw");
        std::fs::write(&raw_path, &raw)?;
        let vhdx_path = dir.path("data.vhdx");
        let (from, to) = (
            raw_path.to_str().ok_or("path")?,
            vhdx_path.to_str().ok_or("path")?,
        );
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "block_size=1M",
            from,
            to,
        ])?;
        assert_matches_qemu(&vhdx_path, "dynamic", Some(1 << 20))?;
        Ok(())
    }

    #[test]
    fn hand_made_images_read_the_same_in_qemu() -> TestResult {
        let dir = Scratch::new("vhdx-hand-made")?;
        for spec in [
            Spec::dynamic(10 << 20),
            Spec {
                flags: LEAVE_BLOCKS_ALLOCATED,
                ..Spec::dynamic(1 << 30)
            },
        ] {
            let path = dir.path("hand.vhdx");
            std::fs::write(&path, spec.build())?;
            assert_eq!(qemu_virtual_size(&path)?, spec.size);
            assert_eq!(probe_both(&spec.build())?.virtual_size, spec.size);
        }
        Ok(())
    }

    /// Puts one log entry (a header with no descriptors) at the log offset and names its log
    /// GUID in both headers: qemu then has a log to replay.
    fn with_replayable_log(img: &mut [u8]) {
        let log_guid = [0x44u8; 16];
        for at in [H1, H2] {
            put(img, at + 48, &log_guid);
        }
        let mut entry = vec![0u8; 4096];
        put(&mut entry, 0, b"loge");
        put_u32(&mut entry, 8, 4096);
        put_u64(&mut entry, 16, 1);
        put(&mut entry, 32, &log_guid);
        put_u64(&mut entry, 48, FILE_LEN as u64);
        put_u64(&mut entry, 56, FILE_LEN as u64);
        let sum = checksum(&entry);
        put_u32(&mut entry, 4, sum);
        put(img, LOG, &entry);
    }

    #[test]
    fn probe_refuses_a_header_with_a_log_to_replay() {
        let img = default_image(|img| put(img, H2 + 48, &[0x44; 16]));
        assert_refused(&img, ErrorKind::Unsupported, "qemu-img check -r all");
        let img = default_image(with_replayable_log);
        assert_refused(&img, ErrorKind::Unsupported, "log");
    }

    #[test]
    fn the_advice_for_a_log_to_replay_works_with_qemu() -> TestResult {
        let dir = Scratch::new("vhdx-log")?;
        let path = dir.path("log.vhdx");
        std::fs::write(&path, default_image(with_replayable_log))?;
        let shown = path.to_str().ok_or("path")?;
        let refusal = qemu_img(&["info", "-f", "vhdx", shown])
            .err()
            .unwrap_or_default();
        assert!(
            refusal.contains("log"),
            "qemu-img info should refuse the unreplayed log, said {refusal:?}"
        );
        qemu_img(&["check", "-q", "-r", "all", "-f", "vhdx", shown])?;
        let repaired = std::fs::read(&path)?;
        assert_eq!(probe_both(&repaired)?.virtual_size, 10 << 20);
        Ok(())
    }

    #[test]
    fn matches_only_the_vhdx_file_identifier() {
        assert!(matches(b"vhdxfile\0\0"));
        assert!(!matches(b"vhdxfil"));
        assert!(!matches(b"conectix"));
    }

    #[test]
    fn probe_reads_a_hand_made_image_with_its_details() -> TestResult {
        let info = probe_both(&Spec::dynamic(10 << 20).build())?;
        assert_eq!((info.format, info.virtual_size), (Format::Vhdx, 10 << 20));
        assert_eq!(info.details.get("subformat"), Some(&"dynamic".into()));
        assert_eq!(info.details.get("block-size"), Some(&(32u64 << 20).into()));
        assert_eq!(
            info.details.get("logical-sector-size"),
            Some(&512u64.into())
        );
        assert_eq!(
            info.details.get("physical-sector-size"),
            Some(&4096u64.into())
        );
        let layout = parse(&SliceView(&Spec::dynamic(10 << 20).build()))?;
        assert_eq!(
            (layout.bat, layout.metadata),
            (
                Span {
                    offset: 2 << 20,
                    length: 1 << 20
                },
                Span {
                    offset: 3 << 20,
                    length: 1 << 20
                }
            )
        );
        assert_eq!(
            (
                layout.sequence_number,
                layout.data_blocks(),
                layout.bat_entries()
            ),
            (8, 1, 1)
        );
        Ok(())
    }

    #[test]
    fn probe_accepts_4096_byte_logical_sectors() -> TestResult {
        let img = Spec {
            logical: 4096,
            ..Spec::dynamic(1 << 30)
        }
        .build();
        let info = probe_both(&img)?;
        assert_eq!(info.virtual_size, 1 << 30);
        assert_eq!(
            info.details.get("logical-sector-size"),
            Some(&4096u64.into())
        );
        Ok(())
    }

    #[test]
    fn guids_print_in_their_usual_text_form() {
        assert_eq!(
            guid::BAT.to_string(),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
        assert_eq!(guid::METADATA.0[..4], [0x06, 0xA2, 0x7C, 0x8B]);
    }

    #[test]
    fn probe_uses_the_header_with_the_higher_sequence_number() -> TestResult {
        // The older copy names a log; it is ignored while the newer copy is current.
        let img = default_image(|img| put(img, H1 + 48, &[0x44; 16]));
        assert_eq!(probe_both(&img)?.virtual_size, 10 << 20);
        let img = default_image(|img| {
            put(img, H1 + 48, &[0x44; 16]);
            put_u64(img, H1 + 8, 9);
        });
        assert_refused(&img, ErrorKind::Unsupported, "log");
        Ok(())
    }

    #[test]
    fn probe_falls_back_to_the_other_header_when_one_checksum_is_bad() -> TestResult {
        for at in [H1, H2] {
            let mut img = Spec::dynamic(10 << 20).build();
            img[at + 4] ^= 1;
            assert_eq!(probe_both(&img)?.virtual_size, 10 << 20);
        }
        Ok(())
    }

    #[test]
    fn probe_refuses_when_both_header_checksums_are_bad() {
        let mut img = Spec::dynamic(10 << 20).build();
        img[H1 + 4] ^= 1;
        img[H2 + 100] ^= 1;
        assert_refused(&img, ErrorKind::Corrupt, "neither VHDX header is intact");
        let img = default_image(|img| {
            put(img, H1, b"HEAD");
            put(img, H2, b"xxxx");
        });
        assert_refused(&img, ErrorKind::Corrupt, "signature");
    }

    #[test]
    fn probe_refuses_headers_with_equal_sequence_numbers_that_differ() -> TestResult {
        let img = default_image(|img| {
            put_u64(img, H1 + 8, 8);
            put(img, H1 + 16, &[0x55; 16]);
        });
        assert_refused(&img, ErrorKind::Corrupt, "sequence number 8");
        // Identical copies are fine, as in qemu.
        let img = default_image(|img| put_u64(img, H1 + 8, 8));
        assert_eq!(probe_both(&img)?.virtual_size, 10 << 20);
        Ok(())
    }

    #[test]
    fn probe_refuses_an_unknown_header_version() {
        let img = default_image(|img| put_u16(img, H2 + 66, 2));
        assert_refused(&img, ErrorKind::Unsupported, "version 2");
    }

    #[test]
    fn probe_refuses_a_misaligned_or_overlapping_log() {
        let img = default_image(|img| {
            put_u64(img, H2 + 72, (1 << 20) + 4096);
        });
        assert_refused(&img, ErrorKind::Corrupt, "log region");
        let img = default_image(|img| put_u64(img, H2 + 72, BAT as u64));
        assert_refused(&img, ErrorKind::Corrupt, "overlap");
        let img = default_image(|img| put_u64(img, H2 + 72, 0));
        assert_refused(&img, ErrorKind::Corrupt, "header section");
    }

    #[test]
    fn probe_refuses_a_region_table_with_a_bad_checksum_or_signature() -> TestResult {
        let mut img = Spec::dynamic(10 << 20).build();
        img[RT1 + 5000] ^= 1;
        assert_refused(&img, ErrorKind::Corrupt, "checksum");
        let img = default_image(|img| put(img, RT1, b"rego"));
        assert_refused(&img, ErrorKind::Corrupt, "\"regi\"");
        // The second copy is not consulted, as in qemu.
        let mut img = Spec::dynamic(10 << 20).build();
        img[RT2 + 5000] ^= 1;
        assert_eq!(probe_both(&img)?.virtual_size, 10 << 20);
        Ok(())
    }

    #[test]
    fn probe_refuses_a_region_table_with_too_many_entries() {
        let img = default_image(|img| put_u32(img, RT1 + 8, 2048));
        assert_refused(&img, ErrorKind::OutOfBounds, "2048 entries");
    }

    #[test]
    fn probe_refuses_regions_that_lie_beyond_the_end_of_the_file() {
        let img = default_image(|img| put_u64(img, region_entry(0) + 16, 16 << 20));
        assert_refused(&img, ErrorKind::Truncated, "block allocation table");
        let img = default_image(|img| put_u64(img, region_entry(1) + 16, 16 << 20));
        assert_refused(&img, ErrorKind::Truncated, "metadata region");
        let img = default_image(|img| put_u64(img, region_entry(1) + 16, u64::MAX - (1 << 20) + 1));
        assert_refused(&img, ErrorKind::OutOfBounds, "beyond any possible image");
    }

    #[test]
    fn probe_refuses_unaligned_or_empty_regions() {
        let img = default_image(|img| put_u64(img, region_entry(0) + 16, (2 << 20) + 4096));
        assert_refused(&img, ErrorKind::Corrupt, "not aligned to 1 MiB");
        let img = default_image(|img| put_u32(img, region_entry(1) + 24, 65536));
        assert_refused(&img, ErrorKind::Corrupt, "not aligned to 1 MiB");
        let img = default_image(|img| put_u32(img, region_entry(0) + 24, 0));
        assert_refused(&img, ErrorKind::Corrupt, "is empty");
    }

    #[test]
    fn probe_refuses_overlapping_regions() {
        let img = default_image(|img| put_u64(img, region_entry(0) + 16, META as u64));
        assert_refused(&img, ErrorKind::Corrupt, "overlap");
        let img = default_image(|img| put_u64(img, region_entry(0) + 16, 0));
        assert_refused(&img, ErrorKind::Corrupt, "header section");
    }

    #[test]
    fn probe_refuses_an_unknown_required_region_but_skips_an_optional_one() -> TestResult {
        let other = Guid::new(0x1234_5678, 1, 2, [3; 8]);
        let with_region = |flags: u32| {
            default_image(|img| {
                put_u32(img, RT1 + 8, 3);
                put(img, region_entry(2), &table_entry(other, 1 << 20, 0, flags));
            })
        };
        assert_refused(
            &with_region(1),
            ErrorKind::Unsupported,
            "12345678-0001-0002-0303-030303030303",
        );
        assert_eq!(probe_both(&with_region(0))?.virtual_size, 10 << 20);
        Ok(())
    }

    #[test]
    fn probe_refuses_a_missing_or_repeated_bat_or_metadata_region() {
        let img = default_image(|img| put_u32(img, RT1 + 8, 1));
        assert_refused(&img, ErrorKind::Corrupt, "no metadata region");
        let img = default_image(|img| {
            put(img, region_entry(0), &[0; 16]);
            put_u32(img, region_entry(0) + 28, 0);
        });
        assert_refused(&img, ErrorKind::Corrupt, "no block allocation table");
        let img = default_image(|img| {
            put_u32(img, RT1 + 8, 3);
            put(
                img,
                region_entry(2),
                &table_entry(guid::BAT, 1 << 20, 1 << 20, 1),
            );
        });
        assert_refused(&img, ErrorKind::Corrupt, "twice");
    }

    #[test]
    fn probe_refuses_a_damaged_metadata_table() {
        let img = default_image(|img| put(img, META, b"metadat\0"));
        assert_refused(&img, ErrorKind::Corrupt, "\"metadata\" signature");
        let img = default_image(|img| put_u16(img, META + 10, 2048));
        assert_refused(&img, ErrorKind::OutOfBounds, "2048 entries");
    }

    #[test]
    fn probe_refuses_missing_metadata_items() {
        let names = [
            "file parameters",
            "virtual disk size",
            "page 83 data",
            "logical sector size",
            "physical sector size",
        ];
        for (i, name) in names.into_iter().enumerate() {
            // An unknown optional item in its place.
            let img = default_image(|img| {
                put(img, meta_entry(i), &[0xee; 16]);
                put_u32(img, meta_entry(i) + 24, 0);
            });
            assert_refused(&img, ErrorKind::Corrupt, &format!("no {name} item"));
        }
    }

    #[test]
    fn probe_refuses_repeated_metadata_items() {
        let img = default_image(|img| {
            put_u16(img, META + 10, 6);
            put(
                img,
                meta_entry(5),
                &meta_item(guid::VIRTUAL_DISK_SIZE, 64 << 10, 8, 6),
            );
        });
        assert_refused(&img, ErrorKind::Corrupt, "virtual disk size item twice");
    }

    #[test]
    fn probe_refuses_an_unknown_required_metadata_item_but_skips_an_optional_one() -> TestResult {
        let other = Guid::new(0xABCD_EF01, 1, 2, [3; 8]);
        let with_item = |flags: u32| {
            default_image(|img| {
                put_u16(img, META + 10, 6);
                put(img, meta_entry(5), &meta_item(other, 64 << 10, 8, flags));
            })
        };
        assert_refused(
            &with_item(ITEM_REQUIRED),
            ErrorKind::Unsupported,
            "ABCDEF01-0001-0002",
        );
        assert_eq!(probe_both(&with_item(2))?.virtual_size, 10 << 20);
        Ok(())
    }

    #[test]
    fn probe_refuses_a_differencing_disk() {
        let img = Spec {
            flags: HAS_PARENT,
            ..Spec::dynamic(10 << 20)
        }
        .build();
        assert_refused(&img, ErrorKind::Unsupported, "Merge-VHD");
    }

    #[test]
    fn probe_reports_leave_blocks_allocated_as_fixed() -> TestResult {
        let img = Spec {
            flags: LEAVE_BLOCKS_ALLOCATED,
            ..Spec::dynamic(10 << 20)
        }
        .build();
        assert_eq!(
            probe_both(&img)?.details.get("subformat"),
            Some(&"fixed".into())
        );
        Ok(())
    }

    #[test]
    fn probe_refuses_bad_block_sizes() {
        for block_size in [0, 512 << 10, 3 << 20, 512 << 20, u32::MAX] {
            let img = Spec {
                block_size,
                ..Spec::dynamic(10 << 20)
            }
            .build();
            assert_refused(
                &img,
                ErrorKind::InvalidFormat,
                &format!("block size {block_size} "),
            );
        }
    }

    #[test]
    fn probe_refuses_bad_logical_sector_sizes() {
        for logical in [0, 1024, 8192] {
            let img = Spec {
                logical,
                ..Spec::dynamic(10 << 20)
            }
            .build();
            assert_refused(
                &img,
                ErrorKind::InvalidFormat,
                &format!("logical sector size {logical} "),
            );
        }
    }

    #[test]
    fn probe_refuses_a_size_that_is_not_a_multiple_of_the_logical_sector_size() {
        let img = Spec::dynamic((10 << 20) + 100).build();
        assert_refused(&img, ErrorKind::InvalidFormat, "not a multiple");
        let img = Spec {
            logical: 4096,
            ..Spec::dynamic((10 << 20) + 512)
        }
        .build();
        assert_refused(&img, ErrorKind::InvalidFormat, "4096 byte logical sectors");
    }

    #[test]
    fn probe_refuses_a_size_above_the_limit() {
        let img = Spec {
            block_size: 256 << 20,
            ..Spec::dynamic(MAX_VIRTUAL_SIZE + 512)
        }
        .build();
        assert_refused(&img, ErrorKind::OutOfBounds, "limit");
        let img = Spec::dynamic(u64::MAX).build();
        assert_refused(&img, ErrorKind::OutOfBounds, "limit");
    }

    #[test]
    fn probe_refuses_a_bat_too_small_for_the_disk() -> TestResult {
        // 1 MiB of BAT holds 131072 entries; with 1 MiB blocks and 512-byte sectors a chunk
        // is 4096 blocks, so 131041 blocks need 131041 + 31 = 131072 entries: exactly full.
        let fits = Spec {
            block_size: 1 << 20,
            ..Spec::dynamic(131_041 << 20)
        }
        .build();
        assert_eq!(probe_both(&fits)?.virtual_size, 131_041 << 20);
        let too_big = Spec {
            block_size: 1 << 20,
            ..Spec::dynamic(131_042 << 20)
        }
        .build();
        assert_refused(&too_big, ErrorKind::Corrupt, "room for 131072 entries");
        Ok(())
    }

    #[test]
    fn bat_entry_counts_follow_the_chunk_ratio() {
        assert_eq!(bat_entries(0, 1 << 20, 512), 0);
        assert_eq!(bat_entries(1, 1 << 20, 512), 1);
        assert_eq!(bat_entries(4096 << 20, 1 << 20, 512), 4096);
        assert_eq!(bat_entries(4097 << 20, 1 << 20, 512), 4098);
        assert_eq!(chunk_ratio(512, 256 << 20), 16);
        assert_eq!(chunk_ratio(4096, 1 << 20), 32768);
    }

    #[test]
    fn probe_refuses_metadata_items_outside_their_region() {
        // Offset inside the table, past the region, straddling its end, and too short.
        let img = default_image(|img| put_u32(img, meta_entry(1) + 16, 4096));
        assert_refused(
            &img,
            ErrorKind::OutOfBounds,
            "virtual disk size metadata item",
        );
        let img = default_image(|img| put_u32(img, meta_entry(1) + 16, 1 << 20));
        assert_refused(&img, ErrorKind::OutOfBounds, "outside");
        let img = default_image(|img| put_u32(img, meta_entry(1) + 16, (1 << 20) - 4));
        assert_refused(&img, ErrorKind::OutOfBounds, "outside");
        let img = default_image(|img| put_u32(img, meta_entry(1) + 16, u32::MAX));
        assert_refused(&img, ErrorKind::OutOfBounds, "outside");
        let img = default_image(|img| put_u32(img, meta_entry(0) + 20, 4));
        assert_refused(
            &img,
            ErrorKind::Corrupt,
            "file parameters metadata item is 4 bytes",
        );
    }

    #[test]
    fn probe_reports_truncation_at_each_structure() {
        let img = Spec::dynamic(10 << 20).build();
        let cuts = [
            (H1 + 100, "first VHDX header"),
            (H2 + 100, "second VHDX header"),
            (RT1 + 100, "region table"),
            (BAT + 4096, "block allocation table"),
            (META + 100, "metadata region"),
            (ITEMS + 4, "metadata region"),
        ];
        for (len, needle) in cuts {
            assert_refused(&img[..len], ErrorKind::Truncated, needle);
        }
        // Not even the identifier: then it is not a VHDX at all but too short for anything.
        assert_eq!(
            probe(&SliceView(&img[..4])).err().map(|e| e.kind()),
            Some(ErrorKind::Truncated)
        );
    }

    #[test]
    fn probe_refuses_an_image_without_the_identifier() {
        let img = default_image(|img| put(img, 0, b"vhdxfilf"));
        assert_eq!(
            probe(&SliceView(&img)).err().map(|e| e.kind()),
            Some(ErrorKind::InvalidFormat)
        );
    }

    #[test]
    fn probe_never_panics_on_truncated_images() {
        let img = Spec::dynamic(10 << 20).build();
        let mut cuts: Vec<usize> = (0..=RT2).step_by(509).collect();
        cuts.extend((META..ITEMS + 64).step_by(4093));
        cuts.extend(ITEMS..ITEMS + 48);
        for len in cuts {
            let outcome = probe(&SliceView(&img[..len]));
            assert!(outcome.is_err(), "a {len} byte prefix was accepted");
        }
    }

    #[test]
    fn probe_never_panics_on_single_byte_corruptions() {
        let original = Spec::dynamic(3 << 30).build();
        let mut img = original.clone();
        let areas = [
            0..16,
            H1..H1 + 96,
            H2..H2 + 96,
            RT1..RT1 + 96,
            META..META + 32 + 5 * 32,
            ITEMS..ITEMS + 48,
        ];
        for at in areas.into_iter().flatten() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                img[at] = original[at] ^ value;
                seal(&mut img);
                let _ = probe(&SliceView(&img));
                img[at] = original[at];
            }
        }
        seal(&mut img);
        assert_eq!(img, original);
    }

    #[test]
    fn fuzz_accepts_arbitrary_bytes() {
        fuzz(&[]);
        fuzz(b"vhdxfile");
        fuzz(&Spec::dynamic(10 << 20).build()[..RT2]);
        let mut noise = vec![0u8; 300 << 10];
        put(&mut noise, 0, FILE_IDENTIFIER);
        fuzz(&noise);
    }
}
