//! qcow2 (QEMU copy-on-write, versions 2 and 3): header parsing and validation.
//!
//! The specification of record is QEMU's `docs/interop/qcow2.rst`. This module reads the
//! header and its extensions, refuses what cannot be imported safely (backing files name a
//! path on the importing host, encryption needs keys we do not have, external data files
//! live elsewhere, the corrupt bit means QEMU itself stopped trusting the image) and checks
//! every table the header points at against the image's length and sane limits before any
//! later stage trusts it. The single-pass decoder builds on [`Header`].

pub mod decode;

use crate::error::{Result, err};
use crate::view::{Fields, View};
use crate::{Format, ImageInfo, MAX_VIRTUAL_SIZE};

/// `QFI\xfb`.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Incompatible feature bits (header offset 72, version 3).
pub mod incompatible {
    /// Refcounts may be stale; data is intact. Accepted: reading needs no refcounts.
    pub const DIRTY: u64 = 1 << 0;
    /// QEMU found an inconsistency and marked the image: refused.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in another file: refused.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// The compression type field is valid (zstd clusters).
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 16-byte L2 entries with 32 subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Bits this project can read.
    pub const SUPPORTED: u64 = DIRTY | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Header extension types.
mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// The smallest and largest cluster sizes QEMU allows: 512 B and 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// QEMU's cap on the L1 table: 32 MiB of entries.
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table: 8 MiB.
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU's cap on internal snapshots.
const MAX_SNAPSHOTS: u32 = 65536;
/// The longest backing file name QEMU writes.
const MAX_BACKING_NAME: u32 = 1023;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterCompression {
    /// Raw deflate (the default).
    Deflate,
    /// Zstandard frames.
    Zstd,
}

/// A validated qcow2 header: everything a decoder needs, all offsets checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters of refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
    /// Compatible feature bits (bit 0: lazy refcounts).
    pub compatible_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Bytes of header before the extensions.
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: ClusterCompression,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 16 bytes with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
}

/// Whether the image starts with the qcow2 magic.
pub(crate) fn matches(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// Parses and validates the header of the qcow2 image behind `view`.
pub fn parse(view: &dyn View) -> Result<Header> {
    let fixed = view.read(0, 72, "the qcow2 header")?;
    let f = Fields::new(&fixed, "qcow2 header");
    if f.array::<4>(0)? != *MAGIC {
        return Err(err!(
            InvalidFormat,
            "not a qcow2 image: the magic QFI\\xfb is missing"
        ));
    }
    let version = f.u32_be(4)?;
    if !(2..=3).contains(&version) {
        return Err(err!(
            Unsupported,
            "qcow2 version {version} is not supported (only 2 and 3 are); convert it with `qemu-img convert -O qcow2`"
        ));
    }
    let cluster_bits = f.u32_be(20)?;
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(err!(
            InvalidFormat,
            "the qcow2 cluster size 2^{cluster_bits} is outside 512 B..2 MiB; the image is damaged"
        ));
    }
    let cluster_size = 1u64 << cluster_bits;

    let (incompatible_features, compatible_features, refcount_order, header_length) =
        if version == 3 {
            let v3 = view.read(0, 104, "the qcow2 version 3 header")?;
            let f = Fields::new(&v3, "qcow2 header");
            (f.u64_be(72)?, f.u64_be(80)?, f.u32_be(96)?, f.u32_be(100)?)
        } else {
            (0, 0, 4, 72)
        };
    if version == 3
        && (header_length < 104
            || !header_length.is_multiple_of(8)
            || u64::from(header_length) > cluster_size)
    {
        return Err(err!(
            InvalidFormat,
            "the qcow2 header length {header_length} is invalid (at least 104, a multiple of 8, within the first cluster); the image is damaged"
        ));
    }
    if refcount_order > 6 {
        return Err(err!(
            InvalidFormat,
            "the qcow2 refcount order {refcount_order} is above 6; the image is damaged"
        ));
    }

    // Extensions come before the feature checks so that refusals can name features.
    let extensions = read_extensions(view, header_length, cluster_size)?;

    let crypt_method = f.u32_be(32)?;
    match crypt_method {
        0 => {}
        1 => {
            return Err(err!(
                Unsupported,
                "the qcow2 image is encrypted with AES, which cannot be imported; decrypt it first: \
                 `qemu-img convert --object secret,id=s,data=PASSWORD --image-opts driver=qcow2,file.filename=IMAGE,encrypt.key-secret=s -O qcow2 plain.qcow2`"
            ));
        }
        2 => {
            return Err(err!(
                Unsupported,
                "the qcow2 image is encrypted with LUKS, which cannot be imported; decrypt it first: \
                 `qemu-img convert --object secret,id=s,data=PASSWORD --image-opts driver=qcow2,file.filename=IMAGE,encrypt.key-secret=s -O qcow2 plain.qcow2`"
            ));
        }
        other => {
            return Err(err!(
                Unsupported,
                "the qcow2 image uses unknown encryption method {other}; it cannot be imported"
            ));
        }
    }
    if extensions.luks {
        return Err(err!(
            Unsupported,
            "the qcow2 image carries a LUKS encryption header, which cannot be imported; decrypt it first with `qemu-img convert`"
        ));
    }

    let backing_file_offset = f.u64_be(8)?;
    if backing_file_offset != 0 {
        let len = f.u32_be(16)?;
        let name = if len == 0
            || len > MAX_BACKING_NAME
            || backing_file_offset.saturating_add(len.into()) > cluster_size
        {
            format!(
                "a backing file whose name lies at {backing_file_offset}+{len} (outside the header cluster)"
            )
        } else {
            let raw = view.read(
                backing_file_offset,
                len as usize,
                "the qcow2 backing file name",
            )?;
            String::from_utf8_lossy(&raw).into_owned()
        };
        return Err(err!(
            Unsupported,
            "qcow2 backing files are not supported: the image refers to {name}; flatten it into one file with \
             `qemu-img convert -O qcow2 IMAGE flat.qcow2` on the machine that has the backing file"
        ));
    }

    if incompatible_features & incompatible::CORRUPT != 0 {
        return Err(err!(
            Corrupt,
            "the qcow2 image is marked corrupt by QEMU; repair it with `qemu-img check -r all IMAGE` and import it again"
        ));
    }
    if incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0
        || extensions.data_file.is_some()
    {
        let name = extensions.data_file.as_deref().unwrap_or("another file");
        return Err(err!(
            Unsupported,
            "the qcow2 image keeps its data in an external data file ({name}), which cannot be imported; \
             make a self-contained image with `qemu-img convert -O qcow2 IMAGE single.qcow2`"
        ));
    }
    let unknown = incompatible_features & !incompatible::SUPPORTED;
    if unknown != 0 {
        let names: Vec<String> = (0..64)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(
                |bit| match extensions.feature_names.iter().find(|(b, _)| *b == bit) {
                    Some((_, name)) => format!("bit {bit} ({name})"),
                    None => format!("bit {bit}"),
                },
            )
            .collect();
        return Err(err!(
            Unsupported,
            "the qcow2 image uses incompatible features this importer does not know: {}; \
             convert it with `qemu-img convert -O qcow2 -o compat=1.1` to a plain image",
            names.join(", ")
        ));
    }

    let compression = if incompatible_features & incompatible::COMPRESSION_TYPE != 0 {
        if header_length <= 104 {
            return Err(err!(
                InvalidFormat,
                "the qcow2 compression-type feature is set but the header has no compression type field; the image is damaged"
            ));
        }
        let b = view.read(104, 1, "the qcow2 compression type")?;
        match b.first() {
            Some(0) => ClusterCompression::Deflate,
            Some(1) => ClusterCompression::Zstd,
            other => {
                return Err(err!(
                    Unsupported,
                    "the qcow2 compression type {} is unknown (0 zlib and 1 zstd are supported)",
                    other.copied().unwrap_or_default()
                ));
            }
        }
    } else {
        ClusterCompression::Deflate
    };

    let header = Header {
        version,
        cluster_bits,
        size: f.u64_be(24)?,
        l1_size: f.u32_be(36)?,
        l1_table_offset: f.u64_be(40)?,
        refcount_table_offset: f.u64_be(48)?,
        refcount_table_clusters: f.u32_be(56)?,
        nb_snapshots: f.u32_be(60)?,
        snapshots_offset: f.u64_be(64)?,
        incompatible_features,
        compatible_features,
        refcount_order,
        header_length,
        compression,
    };
    validate_tables(&header, view)?;
    Ok(header)
}

/// What the header extensions say that matters here.
#[derive(Debug, Default)]
struct Extensions {
    luks: bool,
    data_file: Option<String>,
    feature_names: Vec<(u32, String)>,
}

/// Walks the header extensions, which must end within the first cluster.
fn read_extensions(view: &dyn View, header_length: u32, cluster_size: u64) -> Result<Extensions> {
    let mut out = Extensions::default();
    let start = u64::from(header_length);
    // Everything after the header up to the end of the first cluster (or of the image).
    let end = if view.len_known() {
        cluster_size.min(view.len())
    } else {
        cluster_size
    };
    if end <= start + 8 {
        return Ok(out);
    }
    let area = view.read(start, (end - start) as usize, "the qcow2 header extensions")?;
    let f = Fields::new(&area, "qcow2 header extensions");
    let mut at = 0usize;
    while at + 8 <= area.len() {
        let kind = f.u32_be(at)?;
        let len = f.u32_be(at + 4)? as usize;
        if kind == ext::END {
            return Ok(out);
        }
        let data = f.slice(at + 8, len).map_err(|_| {
            err!(InvalidFormat, "a qcow2 header extension (type {kind:#x}, {len} bytes) runs past the first cluster; the image is damaged")
        })?;
        match kind {
            ext::FULL_DISK_ENCRYPTION => out.luks = true,
            ext::EXTERNAL_DATA_FILE => {
                out.data_file = Some(String::from_utf8_lossy(data).into_owned())
            }
            ext::FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    if entry[0] == 0 {
                        let name = entry[2..].split(|&b| b == 0).next().unwrap_or_default();
                        out.feature_names.push((
                            u32::from(entry[1]),
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
            }
            // The backing format only matters with a backing file, which is refused above.
            ext::BACKING_FORMAT => {}
            _ => {}
        }
        // Each extension's data is padded to a multiple of 8 bytes.
        at = at + 8 + len.div_ceil(8) * 8;
    }
    Err(err!(
        InvalidFormat,
        "the qcow2 header extensions have no end marker within the first cluster; the image is damaged"
    ))
}

/// Checks sizes and every table offset against sane limits and the image's length.
fn validate_tables(h: &Header, view: &dyn View) -> Result<()> {
    let cluster = h.cluster_size();
    if h.size > MAX_VIRTUAL_SIZE {
        return Err(err!(
            OutOfBounds,
            "the qcow2 virtual size {} bytes is beyond the {} byte limit; the image is damaged or hostile",
            h.size,
            MAX_VIRTUAL_SIZE
        ));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(err!(
            OutOfBounds,
            "the qcow2 L1 table has {} entries, more than QEMU allows ({}); the image is damaged or hostile",
            h.l1_size,
            MAX_L1_BYTES / 8
        ));
    }
    // Each L1 entry maps one L2 table's worth of clusters; the table must cover the disk.
    let per_l1 = cluster * h.l2_entries();
    let needed = h.size.div_ceil(per_l1);
    if u64::from(h.l1_size) < needed {
        return Err(err!(
            Corrupt,
            "the qcow2 L1 table has {} entries but a {} byte disk needs {needed}; the image is damaged",
            h.l1_size,
            h.size
        ));
    }
    check_table(
        view,
        "L1 table",
        h.l1_table_offset,
        l1_bytes,
        cluster,
        h.l1_size > 0,
    )?;

    let refcount_bytes = u64::from(h.refcount_table_clusters) * cluster;
    if refcount_bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(err!(
            OutOfBounds,
            "the qcow2 refcount table is {refcount_bytes} bytes, more than QEMU allows ({MAX_REFCOUNT_TABLE_BYTES}); the image is damaged or hostile"
        ));
    }
    check_table(
        view,
        "refcount table",
        h.refcount_table_offset,
        refcount_bytes,
        cluster,
        true,
    )?;

    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(err!(
            OutOfBounds,
            "the qcow2 image claims {} internal snapshots, more than QEMU allows ({MAX_SNAPSHOTS}); the image is damaged or hostile",
            h.nb_snapshots
        ));
    }
    // A snapshot table entry is at least 40 bytes.
    check_table(
        view,
        "snapshot table",
        h.snapshots_offset,
        u64::from(h.nb_snapshots) * 40,
        cluster,
        h.nb_snapshots > 0,
    )?;
    Ok(())
}

/// A table must be cluster-aligned, non-zero when it exists, and end within the image.
fn check_table(
    view: &dyn View,
    name: &str,
    offset: u64,
    bytes: u64,
    cluster: u64,
    present: bool,
) -> Result<()> {
    if !present {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(cluster) {
        return Err(err!(
            Corrupt,
            "the qcow2 {name} offset {offset} is not a non-zero multiple of the cluster size {cluster}; the image is damaged"
        ));
    }
    let end = offset.checked_add(bytes).ok_or_else(|| {
        err!(
            OutOfBounds,
            "the qcow2 {name} lies beyond any possible image"
        )
    })?;
    if view.len_known() && end > view.len() {
        return Err(err!(
            Truncated,
            "the qcow2 {name} (bytes {offset}..{end}) lies beyond the end of the image at byte {}; the image is truncated, download it again",
            view.len()
        ));
    }
    Ok(())
}

/// Validates a qcow2 image and reports its virtual size and properties.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    let h = parse(view)?;
    Ok(ImageInfo::new(Format::Qcow2, h.size)
        .with("compat", if h.version == 2 { "0.10" } else { "1.1" })
        .with("cluster-size", h.cluster_size())
        .with(
            "compression-type",
            match h.compression {
                ClusterCompression::Deflate => "zlib",
                ClusterCompression::Zstd => "zstd",
            },
        )
        .with("extended-l2", h.extended_l2())
        .with("refcount-bits", 1u64 << h.refcount_order)
        .with("lazy-refcounts", h.compatible_features & 1 != 0)
        .with("dirty", h.incompatible_features & incompatible::DIRTY != 0)
        .with("snapshots", h.nb_snapshots))
}

/// Runs the probe over arbitrary bytes, for the fuzz target.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = probe(&crate::view::SliceView(data));
}
