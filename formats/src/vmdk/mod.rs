//! VMware VMDK: the single-file sparse subformats (monolithicSparse and streamOptimized), and
//! recognition of descriptor files so that they can be refused with a useful message.
//!
//! A sparse VMDK starts with a one-sector `KDMV` header giving the capacity (in sectors), the
//! grain (cluster) size, the grain directory and the embedded text descriptor. A
//! streamOptimized image written by VMware's own tools does not know where its grain
//! directory will end up when it writes the header, so it stores all-ones there and repeats
//! the header, with the real values, in a footer in the last 1.5 KiB of the file: that copy
//! is authoritative. Every multi-file layout (monolithicFlat, twoGbMaxExtent*, vmfs...) is a
//! small text descriptor naming other files; a single source cannot serve those, so they are
//! recognised and refused with the names of the files they need.
//!
//! The virtual size is `capacity * 512`, exactly what `qemu-img info` reports. The checks
//! follow qemu's (version at most 3, grains of at most 1 GiB, at most 512 entries per grain
//! table, at most 32 Mi grain directory entries, header overhead inside the file) and add a
//! few of the specification's own (grain size a power of two, newline-detection characters
//! intact, tables and descriptor inside the file) so that a later decoder can trust what the
//! probe accepted.

pub mod decode;

use crate::error::{Result, err};
use crate::view::{Fields, SliceView, View};
use crate::{Format, ImageInfo, MAX_VIRTUAL_SIZE};

/// Bytes per VMDK sector: every offset and size in the header counts these.
const SECTOR: u64 = 512;
/// Magic of a hosted sparse extent (monolithicSparse, streamOptimized).
const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// Magic of the old ESX "COWD" sparse extent (vmfsSparse), a delta disk format.
const COWD_MAGIC: &[u8; 4] = b"COWD";
/// What the first line of a descriptor file says.
const DESCRIPTOR_SIGNATURE: &[u8] = b"# Disk DescriptorFile";
/// The header occupies the first sector.
const HEADER_LEN: usize = 512;
/// Footer: a footer marker sector, a header copy sector and an end-of-stream marker sector.
const FOOTER_LEN: u64 = 3 * SECTOR;
/// `gdOffset` value meaning "the grain directory is at the end; read the footer".
const GD_AT_END: u64 = u64::MAX;

/// Header flag: the newline-detection characters are valid.
const FLAG_NEWLINE_CHECK: u32 = 1;
/// Header flag: a redundant (backup) grain directory exists.
const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Header flag: the stream has markers (streamOptimized). Bit 16 says grains are compressed,
/// but qemu (and this probe) go by `compressAlgorithm` instead.
const FLAG_MARKERS: u32 = 1 << 17;

/// `compressAlgorithm`: none.
const COMPRESS_NONE: u16 = 0;
/// `compressAlgorithm`: deflate (zlib), the only one VMware and qemu write.
const COMPRESS_DEFLATE: u16 = 1;
/// Marker type of the sector that precedes the footer's header copy.
const MARKER_FOOTER: u32 = 3;
/// Marker type of the end-of-stream marker.
const MARKER_END_OF_STREAM: u32 = 0;

/// The characters at bytes 73..77 that a text-mode (newline converting) transfer would alter.
const NEWLINE_CHECK: [u8; 4] = *b"\n \r\n";

/// qemu refuses grains above 1 GiB (in sectors).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// qemu refuses grain tables of more than 512 entries; the specification fixes 512.
const MAX_GTES_PER_GT: u32 = 512;
/// qemu refuses grain directories of more than 32 Mi entries.
const MAX_GD_ENTRIES: u64 = 32 << 20;
/// The largest descriptor (embedded or a descriptor file) read; qemu reads at most 1 MiB too.
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Descriptor values longer than this are cut short in reports and messages.
const MAX_SHOWN: usize = 100;
/// How many extent file names a refusal lists before summarising the rest.
const NAMES_SHOWN: usize = 3;

/// Whether the first bytes of an image are a vmdk image: a sparse extent header (`KDMV`), an
/// old ESX sparse extent (`COWD`, refused later), or a text descriptor file.
pub(crate) fn matches(head: &[u8]) -> bool {
    head.starts_with(SPARSE_MAGIC) || head.starts_with(COWD_MAGIC) || looks_like_descriptor(head)
}

/// Whether `head` is the start of a text descriptor: the `# Disk DescriptorFile` signature
/// after optional whitespace, or, as qemu accepts it, comment and blank lines followed by a
/// `version=1`, `2` or `3` line.
fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = head.trim_ascii_start();
    if text
        .get(..DESCRIPTOR_SIGNATURE.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(DESCRIPTOR_SIGNATURE))
    {
        return true;
    }
    for line in text.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

/// Validates a vmdk image and computes its virtual size. Descriptor files, delta disks and
/// old ESX extents are refused with what to do instead.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    let magic = view.read(0, SPARSE_MAGIC.len(), "the vmdk magic")?;
    if magic.as_ref() == SPARSE_MAGIC {
        probe_sparse(view)
    } else if magic.as_ref() == COWD_MAGIC {
        Err(err!(
            Unsupported,
            "this vmdk is an ESX vmfsSparse (COWD) extent, normally one piece of a snapshot chain \
             described by another file: it cannot be imported on its own; flatten the disk with \
             `qemu-img convert -O vmdk -o subformat=streamOptimized disk.vmdk out.vmdk` run on its \
             descriptor, and import the result"
        ))
    } else {
        probe_descriptor_file(view)
    }
}

/// Runs [`probe`] over arbitrary bytes and ignores the outcome (for a fuzzing target).
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = matches(data);
    let _ = probe(&SliceView(data));
}

/// The fields of a sparse extent header (the one at the start or the footer's copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SparseHeader {
    version: u32,
    flags: u32,
    /// Virtual size in sectors.
    capacity: u64,
    /// Grain (cluster) size in sectors.
    grain: u64,
    /// Embedded descriptor offset, in sectors (0: none).
    descriptor_offset: u64,
    /// Embedded descriptor size, in sectors.
    descriptor_size: u64,
    gtes_per_gt: u32,
    rgd_offset: u64,
    gd_offset: u64,
    /// Sectors of metadata before the first grain (qemu's "grain offset").
    overhead: u64,
    unclean_shutdown: bool,
    newline_check: [u8; 4],
    compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses a header sector that starts with the `KDMV` magic.
    fn parse(bytes: &[u8], what: &'static str) -> Result<Self> {
        let f = Fields::new(bytes, what);
        Ok(Self {
            version: f.u32_le(4)?,
            flags: f.u32_le(8)?,
            capacity: f.u64_le(12)?,
            grain: f.u64_le(20)?,
            descriptor_offset: f.u64_le(28)?,
            descriptor_size: f.u64_le(36)?,
            gtes_per_gt: f.u32_le(44)?,
            rgd_offset: f.u64_le(48)?,
            gd_offset: f.u64_le(56)?,
            overhead: f.u64_le(64)?,
            unclean_shutdown: f.u8(72)? != 0,
            newline_check: f.array(73)?,
            compress_algorithm: f.u16_le(77)?,
        })
    }

    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// What qemu calls the subformat: it goes by the compression algorithm alone.
    fn subformat(&self) -> &'static str {
        if self.compress_algorithm == COMPRESS_DEFLATE {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
    }
}

/// Probes a sparse extent (`KDMV`): header, footer when the grain directory is at the end,
/// limits, table and descriptor placement, embedded descriptor.
fn probe_sparse(view: &dyn View) -> Result<ImageInfo> {
    sparse_layout(view, false).map(|(info, _)| info)
}

/// What the decoder needs to know of a sparse extent, taken from the authoritative header
/// and checked by the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Virtual size in sectors (at most [`MAX_VIRTUAL_SIZE`] bytes).
    pub capacity: u64,
    /// Grain size in sectors: a power of two, at most 1 GiB.
    pub grain: u64,
    /// Entries per grain table (1..=512).
    pub gtes_per_gt: u32,
    /// Sector of the grain directory; [`GD_AT_END`] when only the footer, not read yet,
    /// knows it.
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Grains are deflate-compressed (`compressAlgorithm` 1; qemu's test for streamOptimized).
    pub compressed: bool,
    /// Every grain is preceded by a `{lba, size}` marker and metadata by typed markers.
    pub markers: bool,
    /// Grain table entry 1 means "this grain reads as zeros" (flags bit 2).
    pub zeroed_grains: bool,
}

impl Layout {
    /// The grain size in bytes (at most 1 GiB, checked by the probe).
    pub fn grain_bytes(&self) -> u64 {
        self.grain * SECTOR
    }

    /// The virtual size in bytes (checked by the probe).
    pub fn virtual_size(&self) -> u64 {
        self.capacity * SECTOR
    }

    /// Whether the grain directory is only known to the footer.
    pub fn gd_at_end(&self) -> bool {
        self.gd_offset == GD_AT_END
    }
}

/// Header flag: grain table entry 1 stands for a grain of zeros.
const FLAG_ZEROED_GRAINS: u32 = 1 << 2;

/// The probe of a sparse extent, returning the decoder's [`Layout`] along with the info.
///
/// With `defer_footer`, an image whose header puts the grain directory at the end and whose
/// length is not known yet (a stream) is described by the header at the start instead of
/// the footer, which a single pass only reaches at the end: the layout's `gd_offset` then
/// stays [`GD_AT_END`], and the caller must probe again once the footer has been read.
pub(crate) fn sparse_layout(view: &dyn View, defer_footer: bool) -> Result<(ImageInfo, Layout)> {
    let first = view.read(0, HEADER_LEN, "the vmdk header")?;
    let primary = SparseHeader::parse(&first, "vmdk header")?;

    // qemu reads a sparse header with no capacity but a descriptor as a descriptor file; the
    // only such images in practice are zero-sized disks, which qemu then cannot open either.
    if primary.capacity == 0 && primary.descriptor_offset != 0 {
        return Err(err!(
            Unsupported,
            "this vmdk declares a capacity of 0 sectors, so its embedded descriptor would have to \
             stand in for the disk (qemu-img cannot open it either): there is no disk data to \
             import; create an empty disk of the size you need instead"
        ));
    }

    let gd_at_end = primary.gd_offset == GD_AT_END;
    let deferred = gd_at_end && defer_footer && !view.len_known();
    let header = if gd_at_end && !deferred {
        read_footer(view)?
    } else {
        primary
    };
    // A deferred header has no grain directory to check yet.
    check_header(view, &header, !deferred)?;

    let grain_bytes = header
        .grain
        .checked_mul(SECTOR)
        .ok_or_else(|| grain_too_large(header.grain))?;
    let virtual_size = header
        .capacity
        .checked_mul(SECTOR)
        .ok_or_else(|| capacity_too_large(header.capacity))?;

    let descriptor = read_embedded_descriptor(view, &header)?;
    if let Some(parent) = descriptor.as_ref().and_then(|d| d.parent.as_deref()) {
        return Err(err!(
            Unsupported,
            "this vmdk is a delta (snapshot) disk whose contents depend on its parent \"{parent}\": \
             flatten it with `qemu-img convert -O vmdk -o subformat=streamOptimized disk.vmdk out.vmdk` \
             next to its parent, and import the result"
        ));
    }

    let mut info = ImageInfo::new(Format::Vmdk, virtual_size)
        .with("subformat", header.subformat())
        .with("version", header.version)
        .with("cluster-size", grain_bytes)
        .with("compressed", header.compress_algorithm == COMPRESS_DEFLATE)
        .with("markers", header.has(FLAG_MARKERS))
        .with("grain-directory-at-end", gd_at_end)
        .with("unclean-shutdown", header.unclean_shutdown);
    if let Some(create_type) = descriptor.and_then(|d| d.create_type) {
        info = info.with("create-type", create_type);
    }
    let layout = Layout {
        capacity: header.capacity,
        grain: header.grain,
        gtes_per_gt: header.gtes_per_gt,
        gd_offset: header.gd_offset,
        overhead: header.overhead,
        compressed: header.compress_algorithm == COMPRESS_DEFLATE,
        markers: header.has(FLAG_MARKERS),
        zeroed_grains: header.has(FLAG_ZEROED_GRAINS),
    };
    Ok((info, layout))
}

/// Reads and checks the footer of an image whose header puts the grain directory at the end,
/// and returns the footer's header copy, which replaces the one at the start.
fn read_footer(view: &dyn View) -> Result<SparseHeader> {
    let len = view.len();
    if view.len_known() && !len.is_multiple_of(SECTOR) {
        return Err(err!(
            Truncated,
            "this stream-optimized vmdk keeps its real header in a footer at the end, but the file \
             is {len} bytes, not a whole number of 512-byte sectors: it is truncated; download it again"
        ));
    }
    let start = len.checked_sub(FOOTER_LEN).ok_or_else(|| {
        err!(
            Truncated,
            "this stream-optimized vmdk keeps its real header in a 1536-byte footer at the end, \
             but the file is only {len} bytes: it is truncated; download it again"
        )
    })?;
    let footer = view.read(start, FOOTER_LEN as usize, "the vmdk footer")?;
    let f = Fields::new(&footer, "vmdk footer");
    let valid = f.u32_le(8)? == 0
        && f.u32_le(12)? == MARKER_FOOTER
        && f.slice(512, SPARSE_MAGIC.len())? == SPARSE_MAGIC
        && f.u64_le(1024)? == 0
        && f.u32_le(1032)? == 0
        && f.u32_le(1036)? == MARKER_END_OF_STREAM;
    if !valid {
        return Err(err!(
            Corrupt,
            "this stream-optimized vmdk says its grain directory is at the end, but its last 1536 \
             bytes are not a valid footer (footer marker, header copy, end-of-stream marker): the \
             image is truncated or damaged; download it again or re-export it"
        ));
    }
    let header = SparseHeader::parse(f.slice(512, HEADER_LEN)?, "vmdk footer header")?;
    if header.gd_offset == GD_AT_END {
        return Err(err!(
            Corrupt,
            "the footer of this stream-optimized vmdk does not say where the grain directory is \
             either: the image is damaged; re-export it"
        ));
    }
    Ok(header)
}

fn grain_too_large(grain: u64) -> crate::error::Error {
    err!(
        OutOfBounds,
        "the vmdk declares grains of {grain} sectors, more than the {MAX_GRAIN_SECTORS} (1 GiB) \
         qemu accepts: the image is damaged or hostile"
    )
}

fn capacity_too_large(capacity: u64) -> crate::error::Error {
    err!(
        OutOfBounds,
        "the vmdk declares a capacity of {capacity} sectors, above the {} bytes this importer \
         accepts: the image is damaged or hostile",
        MAX_VIRTUAL_SIZE
    )
}

/// Checks the (authoritative) header's version, encoding and limits, and (with `tables`) that
/// its tables lie inside the image when its length is known.
fn check_header(view: &dyn View, h: &SparseHeader, tables: bool) -> Result<()> {
    if !(1..=3).contains(&h.version) {
        return Err(err!(
            Unsupported,
            "vmdk version {} is not supported (versions 1 to 3 are): the image is damaged or from a \
             newer tool; re-export it as a streamOptimized or monolithicSparse vmdk, or convert it \
             to qcow2",
            h.version
        ));
    }
    if h.has(FLAG_NEWLINE_CHECK) && h.newline_check != NEWLINE_CHECK {
        return Err(err!(
            Corrupt,
            "the vmdk header's newline-detection characters were altered, which happens when a \
             file is copied in text mode (FTP ASCII, line-ending conversion): the image is damaged; \
             copy it again in binary mode"
        ));
    }
    if !matches!(h.compress_algorithm, COMPRESS_NONE | COMPRESS_DEFLATE) {
        return Err(err!(
            Unsupported,
            "the vmdk uses compression algorithm {}, unknown (only deflate exists): the image is \
             damaged or from an unknown tool; convert it with `qemu-img convert -O qcow2`",
            h.compress_algorithm
        ));
    }
    if h.gtes_per_gt == 0 {
        return Err(err!(
            InvalidFormat,
            "the vmdk declares grain tables of 0 entries: the header is damaged; download the image again"
        ));
    }
    if h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(err!(
            OutOfBounds,
            "the vmdk declares grain tables of {} entries, more than the {MAX_GTES_PER_GT} allowed: \
             the image is damaged or hostile",
            h.gtes_per_gt
        ));
    }
    if h.grain == 0 {
        return Err(err!(
            InvalidFormat,
            "the vmdk declares a grain size of 0 sectors: the header is damaged; download the image again"
        ));
    }
    if h.grain > MAX_GRAIN_SECTORS {
        return Err(grain_too_large(h.grain));
    }
    if !h.grain.is_power_of_two() {
        return Err(err!(
            InvalidFormat,
            "the vmdk declares a grain size of {} sectors, not a power of two: the header is \
             damaged; convert the image with `qemu-img convert -O qcow2` if qemu can still read it",
            h.grain
        ));
    }
    let virtual_size = h
        .capacity
        .checked_mul(SECTOR)
        .filter(|&size| size <= MAX_VIRTUAL_SIZE);
    if virtual_size.is_none() {
        return Err(capacity_too_large(h.capacity));
    }

    let sectors_per_gde = h.grain.saturating_mul(u64::from(h.gtes_per_gt));
    let gd_entries = h.capacity.div_ceil(sectors_per_gde);
    if gd_entries > MAX_GD_ENTRIES {
        return Err(err!(
            OutOfBounds,
            "the vmdk's grain directory would need {gd_entries} entries, more than the \
             {MAX_GD_ENTRIES} allowed: the image is damaged or hostile"
        ));
    }
    // Entries are 32-bit sector numbers.
    let gd_bytes = gd_entries * 4;
    if tables && gd_entries > 0 && h.gd_offset == 0 {
        return Err(err!(
            Corrupt,
            "the vmdk's grain directory offset is 0, on top of the header: the image is damaged; \
             download it again"
        ));
    }
    if tables && gd_entries > 0 {
        check_table(view, "grain directory", h.gd_offset, gd_bytes)?;
        if h.has(FLAG_REDUNDANT_GD) && h.rgd_offset != 0 {
            check_table(view, "redundant grain directory", h.rgd_offset, gd_bytes)?;
        }
    }

    if view.len_known() {
        let len = view.len();
        let needed = h.overhead.checked_mul(SECTOR);
        if needed.is_none_or(|needed| needed > len) {
            return Err(err!(
                Truncated,
                "the vmdk is truncated: its header says data starts after {} sectors of metadata but \
                 the file is only {len} bytes; download it again",
                h.overhead
            ));
        }
    }
    Ok(())
}

/// Checks that `bytes` of a table at sector `offset` lie inside the image (when its length is
/// known: a stream's length is only known at its end, when the probe runs once more).
fn check_table(view: &dyn View, what: &str, offset: u64, bytes: u64) -> Result<()> {
    let start = offset.checked_mul(SECTOR);
    let end = start.and_then(|s| s.checked_add(bytes));
    let Some((start, end)) = start.zip(end) else {
        return Err(err!(
            OutOfBounds,
            "the vmdk's {what} is at sector {offset}, beyond any possible image: the image is damaged or hostile"
        ));
    };
    if view.len_known() && end > view.len() {
        return Err(err!(
            OutOfBounds,
            "the vmdk's {what} lies at bytes {start}..{end}, beyond the end of the image ({} bytes): \
             the image is truncated or damaged; download it again",
            view.len()
        ));
    }
    Ok(())
}

/// Reads the descriptor embedded in a sparse extent, if it has one.
fn read_embedded_descriptor(view: &dyn View, h: &SparseHeader) -> Result<Option<Descriptor>> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let bytes = h
        .descriptor_size
        .checked_mul(SECTOR)
        .filter(|&b| b <= MAX_DESCRIPTOR)
        .ok_or_else(|| {
            err!(
                OutOfBounds,
                "the vmdk's embedded descriptor is declared as {} sectors, more than the {} bytes \
             allowed: the image is damaged or hostile",
                h.descriptor_size,
                MAX_DESCRIPTOR
            )
        })?;
    check_table(view, "embedded descriptor", h.descriptor_offset, bytes)?;
    // check_table proved the product fits.
    let start = h.descriptor_offset.saturating_mul(SECTOR);
    let text = view.read(start, bytes as usize, "the vmdk embedded descriptor")?;
    Ok(Some(Descriptor::parse(&text)))
}

/// A descriptor file: always refused, with the files it names.
fn probe_descriptor_file(view: &dyn View) -> Result<ImageInfo> {
    // A stream's length is unknown until its end: ask for the cap, which the head holds.
    let len = view.len().min(MAX_DESCRIPTOR) as usize;
    let text = view.read(0, len, "the vmdk descriptor")?;
    let d = Descriptor::parse(&text);
    let kind = d
        .create_type
        .as_deref()
        .map(|t| format!(" (createType \"{t}\")"))
        .unwrap_or_default();
    let convert = "convert it with `qemu-img convert -O vmdk -o subformat=streamOptimized disk.vmdk out.vmdk` \
                   run next to its extent files, and import the single file out.vmdk";
    if d.file_count > 0 {
        let mut names = d
            .files
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        if d.file_count > d.files.len() {
            names.push_str(&format!(" and {} more", d.file_count - d.files.len()));
        }
        let plural = if d.file_count == 1 { "" } else { "s" };
        return Err(err!(
            Unsupported,
            "this vmdk is a descriptor{kind} that refers to {} extent file{plural} ({names}) holding \
             the disk data: a single-file image is needed; {convert}",
            d.file_count
        ));
    }
    if d.zero_extents > 0 {
        return Err(err!(
            Unsupported,
            "this vmdk is a descriptor{kind} whose only extents are ZERO extents ({} sectors of \
             zeros, no data): there is nothing to import; create an empty disk of that size instead",
            d.total_sectors
        ));
    }
    Err(err!(
        InvalidFormat,
        "this vmdk is a descriptor{kind} that lists no extents: it is incomplete or damaged; export \
         the disk again as a single streamOptimized vmdk"
    ))
}

/// What a text descriptor says that matters here. Every value is bounded: names are cut short
/// and only a few are kept.
#[derive(Debug, Default)]
struct Descriptor {
    create_type: Option<String>,
    /// A non-empty `parentFileNameHint`: the disk is a delta over another file.
    parent: Option<String>,
    /// The first few extent file names, cleaned up for display.
    files: Vec<String>,
    /// How many extent lines name a file.
    file_count: usize,
    /// How many ZERO extents there are.
    zero_extents: usize,
    /// Sum of all extents' sectors (saturating: only shown in messages).
    total_sectors: u64,
}

impl Descriptor {
    /// Parses descriptor text: `key = "value"` lines and extent lines
    /// (`RW <sectors> <TYPE> "file" [offset]`). The text ends at the first NUL, as the
    /// embedded descriptor is padded with them.
    fn parse(bytes: &[u8]) -> Self {
        let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
        let mut d = Descriptor::default();
        for line in text.split(|&b| b == b'\n') {
            let line = line.trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            if let Some(extent) = ExtentLine::parse(line) {
                d.total_sectors = d.total_sectors.saturating_add(extent.sectors);
                match extent.file {
                    Some(file) => {
                        d.file_count += 1;
                        if d.files.len() < NAMES_SHOWN {
                            d.files.push(shown(file));
                        }
                    }
                    None if extent.kind == b"ZERO" => d.zero_extents += 1,
                    None => {}
                }
                continue;
            }
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = line.split_at(eq);
            let (key, value) = (
                key.trim_ascii(),
                unquote(value.get(1..).unwrap_or_default().trim_ascii()),
            );
            if key.eq_ignore_ascii_case(b"createType") && d.create_type.is_none() {
                d.create_type = Some(shown(value));
            } else if key.eq_ignore_ascii_case(b"parentFileNameHint") && !value.is_empty() {
                d.parent = Some(shown(value));
            }
        }
        d
    }
}

/// One extent line of a descriptor.
#[derive(Debug)]
struct ExtentLine<'a> {
    sectors: u64,
    kind: &'a [u8],
    file: Option<&'a [u8]>,
}

impl<'a> ExtentLine<'a> {
    /// Parses `ACCESS SECTORS TYPE ["file" [offset]]`, or `None` for any other line.
    fn parse(line: &'a [u8]) -> Option<Self> {
        let (access, rest) = split_token(line);
        if !matches!(access, b"RW" | b"RDONLY" | b"NOACCESS") {
            return None;
        }
        let (sectors, rest) = split_token(rest);
        // Longer than u64's 20 digits cannot be a count; `parse` also refuses overflow.
        let sectors = std::str::from_utf8(sectors)
            .ok()
            .filter(|s| s.len() <= 20)?
            .parse::<u64>()
            .ok()?;
        let (kind, rest) = split_token(rest);
        if kind.is_empty() || !kind.iter().all(u8::is_ascii_alphabetic) {
            return None;
        }
        let file = rest.strip_prefix(b"\"").map(|quoted| {
            let end = quoted
                .iter()
                .position(|&b| b == b'"')
                .unwrap_or(quoted.len());
            &quoted[..end]
        });
        Some(Self {
            sectors,
            kind,
            file,
        })
    }
}

/// The first whitespace-separated token of `s` and what follows it (leading blanks removed).
fn split_token(s: &[u8]) -> (&[u8], &[u8]) {
    let s = s.trim_ascii_start();
    let end = s
        .iter()
        .position(u8::is_ascii_whitespace)
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim_ascii_start())
}

/// `value` without one pair of surrounding double quotes.
fn unquote(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value)
}

/// Untrusted text made safe to show: control characters replaced, length bounded.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(MAX_SHOWN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_SHOWN {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::testing::{self, Scratch};
    use std::path::{Path, PathBuf};

    /// A scratch directory of the test's own, removed when dropped.
    fn scratch(name: &str) -> Scratch {
        check(
            Scratch::new(&format!("vmdk-{name}")),
            "creating a scratch directory",
        )
    }

    fn check<T, E: std::fmt::Display>(result: std::result::Result<T, E>, what: &str) -> T {
        match result {
            Ok(value) => value,
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// Runs the real qemu-img; its stdout.
    fn qemu_img(args: &[&str]) -> String {
        check(testing::qemu_img(args), "qemu-img")
    }

    fn path_str(path: &Path) -> &str {
        match path.to_str() {
            Some(s) => s,
            None => panic!("non-UTF-8 temp path {}", path.display()),
        }
    }

    /// `qemu-img info`'s format and virtual size for a file.
    fn qemu_info(path: &Path) -> (String, u64) {
        check(testing::qemu_info(path, None), "qemu-img info")
    }

    fn create(dir: &Scratch, subformat: &str, size: &str) -> PathBuf {
        let path = dir.path(&format!("{subformat}-{size}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            path_str(&path),
            size,
        ]);
        path
    }

    fn read(path: &Path) -> Vec<u8> {
        check(std::fs::read(path), "reading a test image")
    }

    /// Format and virtual size through random access and through the streaming probe, which
    /// must agree.
    fn both_paths(bytes: &[u8]) -> (Format, u64) {
        let direct = check(
            crate::detect::detect(&SliceView(bytes)),
            "detecting by random access",
        );
        let streamed = check(
            crate::probe::probe_reader(std::io::Cursor::new(bytes.to_vec())),
            "probing a stream",
        );
        assert_eq!(streamed.info, direct, "stream and random access disagree");
        (direct.format, direct.virtual_size)
    }

    /// Asserts that both paths agree with `qemu-img info` on the image at `path`.
    fn agrees_with_qemu(path: &Path) -> ImageInfo {
        let (format, size) = qemu_info(path);
        let bytes = read(path);
        assert_eq!(format, "vmdk");
        assert_eq!(
            both_paths(&bytes),
            (Format::Vmdk, size),
            "{}",
            path.display()
        );
        check(probe(&SliceView(&bytes)), "probing")
    }

    fn detail(info: &ImageInfo, key: &str) -> Option<String> {
        info.details.get(key).map(ToString::to_string)
    }

    /// The error kind and message of a probe that must fail.
    fn refusal(bytes: &[u8]) -> (ErrorKind, String) {
        match probe(&SliceView(bytes)) {
            Ok(info) => panic!("expected a refusal, got {info:?}"),
            Err(e) => (e.kind(), e.message().to_owned()),
        }
    }

    fn assert_refused(bytes: &[u8], kind: ErrorKind, words: &str) {
        let (got, message) = refusal(bytes);
        assert_eq!(got, kind, "{message}");
        assert!(
            message.contains(words),
            "message {message:?} does not mention {words:?}"
        );
    }

    fn put_u16(bytes: &mut [u8], at: usize, value: u16) {
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// A hand-made 1 MiB monolithicSparse image of 64 KiB: header, descriptor at sector 1
    /// (20 sectors), redundant GD at 21, GD at 22, grain tables after, data from sector 128.
    fn handmade() -> Vec<u8> {
        let mut b = vec![0u8; 64 << 10];
        b[..4].copy_from_slice(SPARSE_MAGIC);
        put_u32(&mut b, 4, 1);
        put_u32(&mut b, 8, FLAG_NEWLINE_CHECK | FLAG_REDUNDANT_GD);
        put_u64(&mut b, 12, 2048);
        put_u64(&mut b, 20, 128);
        put_u64(&mut b, 28, 1);
        put_u64(&mut b, 36, 20);
        put_u32(&mut b, 44, 512);
        put_u64(&mut b, 48, 21);
        put_u64(&mut b, 56, 22);
        put_u64(&mut b, 64, 128);
        b[73..77].copy_from_slice(&NEWLINE_CHECK);
        let text = b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                     createType=\"monolithicSparse\"\n\n# Extent description\nRW 2048 SPARSE \"hand.vmdk\"\n";
        b[512..512 + text.len()].copy_from_slice(text);
        put_u32(&mut b, 21 * 512, 23);
        put_u32(&mut b, 22 * 512, 27);
        b
    }

    #[test]
    fn matches_recognises_sparse_headers_and_descriptor_files_but_not_raw_data() {
        assert!(matches(b"KDMV\x01\0\0\0"));
        assert!(matches(b"COWD\x01\0\0\0"));
        assert!(matches(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(matches(b"\n  \r\n# Disk DescriptorFile\r\nversion=1\r\n"));
        assert!(matches(b"# written by hand\n\nversion=2\n"));
        assert!(!matches(&[0u8; 4096]));
        assert!(!matches(b"# a shell script\necho version=1\n"));
        assert!(!matches(b""));
    }

    #[test]
    fn probe_agrees_with_qemu_on_empty_sparse_images_of_odd_sizes() {
        let dir = scratch("sizes");
        for subformat in ["monolithicSparse", "streamOptimized"] {
            for size in ["100M", "1073742336", "3000000000", "1000"] {
                let info = agrees_with_qemu(&create(&dir, subformat, size));
                assert_eq!(detail(&info, "subformat").as_deref(), Some(subformat));
                assert_eq!(detail(&info, "create-type").as_deref(), Some(subformat));
                assert_eq!(detail(&info, "cluster-size").as_deref(), Some("65536"));
            }
        }
    }

    #[test]
    fn probe_agrees_with_qemu_on_images_converted_from_raw_data() {
        let dir = scratch("convert");
        let raw = dir.path("data.raw");
        let mut data = vec![0u8; (5 << 20) + 512];
        let mut state = 0x2545_f491_u32;
        for (i, byte) in data.iter_mut().enumerate().take(3 << 20) {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *byte = if i % 3 == 0 {
                state as u8
            } else {
                (i / 4096) as u8
            };
        }
        check(std::fs::write(&raw, &data), "writing raw data");
        for subformat in ["streamOptimized", "monolithicSparse"] {
            let out = dir.path(&format!("{subformat}.vmdk"));
            let option = format!("subformat={subformat}");
            qemu_img(&[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &option,
                path_str(&raw),
                path_str(&out),
            ]);
            let info = agrees_with_qemu(&out);
            assert_eq!(info.virtual_size, data.len() as u64);
            let compressed = detail(&info, "compressed");
            assert_eq!(
                compressed.as_deref(),
                Some(if subformat == "streamOptimized" {
                    "true"
                } else {
                    "false"
                })
            );
        }
    }

    /// A qemu streamOptimized image rewritten the way VMware writes them: header gdOffset all
    /// ones (and, to prove which copy counts, a wrong capacity), real header in a footer.
    fn gd_at_end(dir: &Scratch) -> (Vec<u8>, u64) {
        let raw = dir.path("data.raw");
        let data: Vec<u8> = (0..(2u32 << 20) + 1024).map(|i| (i % 251) as u8).collect();
        check(std::fs::write(&raw, &data), "writing raw data");
        let out = dir.path("qemu.vmdk");
        let args = [
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            path_str(&raw),
            path_str(&out),
        ];
        qemu_img(&args);
        let mut bytes = read(&out);
        let real_header = bytes[..512].to_vec();
        let mut marker = [0u8; 512];
        put_u64(&mut marker, 0, 1);
        put_u32(&mut marker, 12, MARKER_FOOTER);
        bytes.extend_from_slice(&marker);
        bytes.extend_from_slice(&real_header);
        bytes.extend_from_slice(&[0u8; 512]);
        put_u64(&mut bytes, 56, GD_AT_END);
        put_u64(&mut bytes, 12, 4 * 2048 * 1024);
        (bytes, data.len() as u64)
    }

    #[test]
    fn probe_takes_the_header_from_the_footer_when_the_grain_directory_is_at_the_end() {
        let dir = scratch("gd-at-end");
        let (bytes, size) = gd_at_end(&dir);
        assert_eq!(both_paths(&bytes), (Format::Vmdk, size));
        let path = dir.path("vmware-style.vmdk");
        check(std::fs::write(&path, &bytes), "writing the rewritten image");
        assert_eq!(qemu_info(&path), ("vmdk".to_owned(), size));
        let info = check(probe(&SliceView(&bytes)), "probing");
        assert_eq!(
            detail(&info, "grain-directory-at-end").as_deref(),
            Some("true")
        );
        assert_eq!(
            detail(&info, "subformat").as_deref(),
            Some("streamOptimized")
        );
    }

    #[test]
    fn probe_refuses_a_grain_directory_at_the_end_without_a_valid_footer() {
        let dir = scratch("bad-footer");
        let (mut bytes, _) = gd_at_end(&dir);
        let len = bytes.len();
        bytes[len - 1024..len - 1020].copy_from_slice(b"XXXX");
        assert_refused(&bytes, ErrorKind::Corrupt, "not a valid footer");
        let mut eos = gd_at_end(&dir).0;
        put_u32(&mut eos, len - 512 + 12, 7);
        assert_refused(&eos, ErrorKind::Corrupt, "footer");
        let mut short = handmade();
        put_u64(&mut short, 56, GD_AT_END);
        short.truncate(1024);
        assert_refused(&short, ErrorKind::Truncated, "footer");
        let mut twice = gd_at_end(&dir).0;
        put_u64(&mut twice, len - 1024 + 56, GD_AT_END);
        assert_refused(&twice, ErrorKind::Corrupt, "grain directory");
    }

    #[test]
    fn probe_accepts_the_handmade_image_with_its_details() {
        let info = check(
            probe(&SliceView(&handmade())),
            "probing the hand-made image",
        );
        assert_eq!((info.format, info.virtual_size), (Format::Vmdk, 1 << 20));
        assert_eq!(
            detail(&info, "create-type").as_deref(),
            Some("monolithicSparse")
        );
        assert_eq!(detail(&info, "version").as_deref(), Some("1"));
        assert_eq!(both_paths(&handmade()), (Format::Vmdk, 1 << 20));
    }

    #[test]
    fn probe_refuses_an_unsupported_version() {
        for version in [0, 4, u32::MAX] {
            let mut b = handmade();
            put_u32(&mut b, 4, version);
            assert_refused(&b, ErrorKind::Unsupported, &format!("version {version}"));
        }
    }

    #[test]
    fn probe_refuses_an_absurd_capacity() {
        for capacity in [u64::MAX, MAX_VIRTUAL_SIZE / 512 + 1] {
            let mut b = handmade();
            put_u64(&mut b, 12, capacity);
            assert_refused(&b, ErrorKind::OutOfBounds, "capacity");
        }
    }

    #[test]
    fn probe_refuses_zero_huge_and_non_power_of_two_grains() {
        let cases = [
            (0, ErrorKind::InvalidFormat, "grain size of 0"),
            (MAX_GRAIN_SECTORS * 2, ErrorKind::OutOfBounds, "grains of"),
            (u64::MAX, ErrorKind::OutOfBounds, "grains of"),
            (100, ErrorKind::InvalidFormat, "power of two"),
        ];
        for (grain, kind, words) in cases {
            let mut b = handmade();
            put_u64(&mut b, 20, grain);
            assert_refused(&b, kind, words);
        }
    }

    #[test]
    fn probe_refuses_zero_or_huge_grain_tables() {
        let mut b = handmade();
        put_u32(&mut b, 44, 4096);
        assert_refused(&b, ErrorKind::OutOfBounds, "grain tables of 4096 entries");
        put_u32(&mut b, 44, 0);
        assert_refused(&b, ErrorKind::InvalidFormat, "grain tables of 0 entries");
    }

    #[test]
    fn probe_refuses_a_grain_directory_with_too_many_entries() {
        let mut b = handmade();
        put_u64(&mut b, 12, 1 << 40);
        put_u64(&mut b, 20, 1);
        put_u32(&mut b, 44, 1);
        assert_refused(&b, ErrorKind::OutOfBounds, "grain directory would need");
    }

    #[test]
    fn probe_refuses_grain_directories_beyond_the_file() {
        let mut b = handmade();
        put_u64(&mut b, 56, 1000);
        assert_refused(&b, ErrorKind::OutOfBounds, "grain directory lies at bytes");
        put_u64(&mut b, 56, u64::MAX / 2);
        assert_refused(&b, ErrorKind::OutOfBounds, "grain directory");
        put_u64(&mut b, 56, 0);
        assert_refused(&b, ErrorKind::Corrupt, "offset is 0");
        let mut rgd = handmade();
        put_u64(&mut rgd, 48, 5000);
        assert_refused(&rgd, ErrorKind::OutOfBounds, "redundant grain directory");
    }

    #[test]
    fn probe_refuses_a_descriptor_beyond_the_file_or_over_the_cap() {
        let mut b = handmade();
        put_u64(&mut b, 28, 200);
        assert_refused(
            &b,
            ErrorKind::OutOfBounds,
            "embedded descriptor lies at bytes",
        );
        put_u64(&mut b, 28, u64::MAX);
        assert_refused(&b, ErrorKind::OutOfBounds, "embedded descriptor");
        let mut big = handmade();
        put_u64(&mut big, 36, 4096);
        assert_refused(
            &big,
            ErrorKind::OutOfBounds,
            "embedded descriptor is declared as 4096 sectors",
        );
        put_u64(&mut big, 36, u64::MAX);
        assert_refused(&big, ErrorKind::OutOfBounds, "embedded descriptor");
    }

    #[test]
    fn probe_refuses_a_header_shorter_than_a_sector() {
        let b = handmade();
        assert_refused(&b[..300], ErrorKind::Truncated, "truncated");
        assert_refused(&b[..3], ErrorKind::Truncated, "truncated");
    }

    #[test]
    fn probe_refuses_metadata_that_runs_past_the_end_of_the_file() {
        let mut b = handmade();
        put_u64(&mut b, 64, 4096);
        assert_refused(&b, ErrorKind::Truncated, "4096 sectors of metadata");
    }

    #[test]
    fn probe_refuses_a_header_damaged_by_a_text_mode_transfer() {
        let mut b = handmade();
        b[75] = b'\n';
        assert_refused(&b, ErrorKind::Corrupt, "text mode");
    }

    #[test]
    fn probe_refuses_an_unknown_compression_algorithm() {
        let mut b = handmade();
        put_u16(&mut b, 77, 7);
        assert_refused(&b, ErrorKind::Unsupported, "compression algorithm 7");
    }

    #[test]
    fn probe_refuses_a_delta_disk_that_names_a_parent() {
        let mut b = handmade();
        let hint = b"parentFileNameHint=\"base.vmdk\"\n";
        // Right after the text, before the NUL padding that ends it.
        let at = b[512..]
            .iter()
            .position(|&c| c == 0)
            .map_or(0, |end| 512 + end);
        b[at..at + hint.len()].copy_from_slice(hint);
        assert_refused(&b, ErrorKind::Unsupported, "parent \"base.vmdk\"");
    }

    #[test]
    fn probe_refuses_a_zero_capacity_image_like_qemu() {
        let dir = scratch("zero");
        let bytes = read(&create(&dir, "monolithicSparse", "0"));
        assert_refused(&bytes, ErrorKind::Unsupported, "capacity of 0 sectors");
    }

    #[test]
    fn probe_refuses_an_esx_cowd_extent() {
        let mut b = vec![0u8; 2048];
        b[..4].copy_from_slice(COWD_MAGIC);
        assert_refused(&b, ErrorKind::Unsupported, "COWD");
    }

    #[test]
    fn probe_refuses_a_descriptor_that_names_extent_files() {
        let dir = scratch("descriptors");
        let flat = read(&create(&dir, "monolithicFlat", "10M"));
        let (kind, message) = match crate::detect::detect(&SliceView(&flat)) {
            Ok(info) => panic!("expected a refusal, got {info:?}"),
            Err(e) => (e.kind(), e.message().to_owned()),
        };
        assert_eq!(kind, ErrorKind::Unsupported);
        assert!(
            message.contains("\"monolithicFlat-10M-flat.vmdk\""),
            "{message}"
        );
        assert!(message.contains("qemu-img convert"), "{message}");

        let split = read(&create(&dir, "twoGbMaxExtentSparse", "7G"));
        assert_refused(&split, ErrorKind::Unsupported, "refers to 4 extent files");
        assert_refused(
            &split,
            ErrorKind::Unsupported,
            "\"twoGbMaxExtentSparse-7G-s001.vmdk\"",
        );
        assert_refused(&split, ErrorKind::Unsupported, "and 1 more");
        let streamed = crate::probe::probe_reader(std::io::Cursor::new(split))
            .err()
            .map(|e| e.kind());
        assert_eq!(streamed, Some(ErrorKind::Unsupported));
    }

    #[test]
    fn probe_refuses_descriptors_with_only_zero_extents_or_none() {
        let zero = b"  # Disk DescriptorFile\nversion=1\ncreateType=\"custom\"\nRW 2048 ZERO\nRW 10 ZERO\n";
        assert!(matches(zero));
        assert_refused(
            zero,
            ErrorKind::Unsupported,
            "only extents are ZERO extents (2058 sectors",
        );
        let none = b"# Disk DescriptorFile\nversion=1\n";
        assert_refused(none, ErrorKind::InvalidFormat, "lists no extents");
        let hostile =
            b"# Disk DescriptorFile\nRW 99999999999999999999999 FLAT \"a\x07b\" 0\nRW 1 FLAT \"";
        assert_refused(hostile, ErrorKind::Unsupported, "1 extent file (\"\")");
    }

    #[test]
    fn descriptor_names_are_cleaned_and_bounded() {
        let long = vec![b'a'; 500];
        let mut line = b"RW 5 FLAT \"".to_vec();
        line.extend_from_slice(&long);
        line.extend_from_slice(b"\x1b[31m\" 0\n");
        let d = Descriptor::parse(&line);
        assert_eq!(d.file_count, 1);
        assert_eq!(d.files.first().map(String::len), Some(MAX_SHOWN + 3));
        assert_eq!(shown(b"x\x1by"), "x?y");
    }

    #[test]
    fn probe_never_panics_on_truncated_or_corrupted_headers() {
        let dir = scratch("no-panic");
        let real = read(&create(&dir, "streamOptimized", "100M"));
        for len in 0..=1536 {
            let _ = probe(&SliceView(&real[..len]));
            let _ = crate::detect::detect(&SliceView(&real[..len]));
        }
        let (footered, _) = gd_at_end(&dir);
        for cut in 0..=1536 {
            let _ = probe(&SliceView(&footered[..footered.len() - cut]));
        }
        for base in [real, handmade(), footered] {
            let len = base.len();
            let positions = (0..80).chain(len.saturating_sub(1536)..len.saturating_sub(1536) + 80);
            for at in positions {
                for value in [0x00, 0x01, 0x7f, 0x80, 0xff, base[at] ^ 0xff] {
                    let mut bytes = base.clone();
                    bytes[at] = value;
                    fuzz(&bytes);
                }
            }
        }
    }
}
