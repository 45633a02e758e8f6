//! `dvcr-formats`: everything this project knows about disk image formats, with no network
//! and no async runtime.
//!
//! - [`compress`] unwraps gzip, xz, zstd and bzip2 (nested) from a byte stream;
//! - [`detect`] names the format from the image's own bytes and dispatches to the format
//!   modules ([`qcow2`], [`vmdk`], [`vdi`], [`vhd`], [`vhdx`], [`iso`]), each of which parses
//!   and validates its headers and computes the virtual size exactly as `qemu-img info` does;
//! - [`probe`] runs detection over a single pass of a stream (keeping only the few
//!   metadata ranges a parser asks for) or over random access to a file.
//!
//! - [`decode`] turns an image stream into guest data in one pass ([`stream`] in, [`sink`]
//!   out), with one decoder per format beside its header parser;
//! - [`sparse`] writes that data to a sparse file, a block device or a qcow2 file.
//!
//! Every length, offset and count read from an image is checked before it is used; a bad
//! image ends in an [`Error`] whose message says what is wrong and what to do.

pub mod align;
pub mod compress;
pub mod decode;
pub mod detect;
mod direct;
pub mod error;
pub mod iso;
pub mod pending;
pub mod probe;
pub mod qcow2;
pub mod sink;
pub mod sparse;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod view;
pub mod vmdk;

use std::collections::BTreeMap;
use std::fmt;

pub use compress::Compression;
pub use decode::{Decoded, Options, RandomAccess, decode, decode_lent};
pub use error::{Error, ErrorKind, Result};
pub use probe::{Probed, StreamProbe, probe_file_with, probe_path, probe_path_with, probe_reader};
pub use sink::{Output, Sink};
pub use stream::Lend;
pub use view::{FileView, SliceView, View};

/// The largest virtual size any probe accepts: 64 PiB. Far beyond any real VM disk, and low
/// enough that sizes computed from it cannot overflow `u64`.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// A disk image format, named as `qemu-img` names it (plus `iso`, which qemu calls raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
    /// VMware: monolithicSparse or streamOptimized (descriptor files are refused).
    Vmdk,
    /// VirtualBox.
    Vdi,
    /// Microsoft VHD (Virtual PC), dynamic or fixed; qemu calls it `vpc`.
    Vpc,
    /// Microsoft VHDX, dynamic or fixed.
    Vhdx,
    /// An ISO 9660 or UDF optical disc image.
    Iso,
    /// Anything else: the bytes are the disk.
    Raw,
}

impl Format {
    /// The name `qemu-img` prints (and `iso`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Iso => "iso",
            Format::Raw => "raw",
        }
    }

    /// Whether the image is a CD-ROM (the platform's `cdrom` field): exactly the ISOs.
    pub fn is_cdrom(self) -> bool {
        self == Format::Iso
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One format-specific fact about an image (cluster size, subformat...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Detail {
    /// A number (sizes in bytes).
    Number(u64),
    /// A word or name.
    Text(String),
    /// A flag.
    Flag(bool),
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Detail::Number(n) => write!(f, "{n}"),
            Detail::Text(s) => f.write_str(s),
            Detail::Flag(b) => write!(f, "{b}"),
        }
    }
}

impl From<u64> for Detail {
    fn from(v: u64) -> Self {
        Detail::Number(v)
    }
}
impl From<u32> for Detail {
    fn from(v: u32) -> Self {
        Detail::Number(v.into())
    }
}
impl From<bool> for Detail {
    fn from(v: bool) -> Self {
        Detail::Flag(v)
    }
}
impl From<&str> for Detail {
    fn from(v: &str) -> Self {
        Detail::Text(v.to_owned())
    }
}
impl From<String> for Detail {
    fn from(v: String) -> Self {
        Detail::Text(v)
    }
}

/// What a probe found: the format, the virtual (unpacked) size and format details.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// The format.
    pub format: Format,
    /// The guest-visible disk size in bytes, as `qemu-img info` reports it.
    pub virtual_size: u64,
    /// Format-specific facts, by name.
    pub details: BTreeMap<&'static str, Detail>,
}

impl ImageInfo {
    /// An image of `format` and `virtual_size` with no details yet.
    pub fn new(format: Format, virtual_size: u64) -> Self {
        Self {
            format,
            virtual_size,
            details: BTreeMap::new(),
        }
    }

    /// Adds a detail (builder style).
    #[must_use]
    pub fn with(mut self, key: &'static str, value: impl Into<Detail>) -> Self {
        self.details.insert(key, value.into());
        self
    }
}
