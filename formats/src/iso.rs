//! ISO 9660 and UDF optical disc images (installer media, cloud-init seeds).
//!
//! `qemu-img` sees an ISO as raw; the platform needs to know it is one, because an ISO is
//! attached as a CD-ROM (`cdrom: true`) and can never become a VirtualDisk. The virtual size
//! is the byte length in whole sectors, as qemu reports it; the volume size the primary descriptor declares is
//! reported as a detail and must fit in the image.

use crate::error::{Result, err};
use crate::view::{Fields, View};
use crate::{Format, ImageInfo};

/// Sector size of the volume recognition area.
const SECTOR: usize = 2048;
/// The volume descriptors start at sector 16.
const FIRST_DESCRIPTOR: usize = 16 * SECTOR;
/// How many descriptors are examined for a UDF bridge or a pure UDF volume.
const DESCRIPTORS: usize = 16;

/// The identifier of a descriptor in the volume recognition area, if any.
fn identifier(head: &[u8], index: usize) -> Option<&[u8]> {
    let at = FIRST_DESCRIPTOR + index * SECTOR + 1;
    head.get(at..at + 5)
}

/// Whether the first bytes hold an ISO 9660 primary descriptor or UDF recognition area.
pub(crate) fn matches(head: &[u8]) -> bool {
    (0..DESCRIPTORS).any(|i| {
        matches!(
            identifier(head, i),
            Some(b"CD001" | b"BEA01" | b"NSR02" | b"NSR03")
        )
    })
}

/// Validates an ISO image and reports its volume facts.
pub fn probe(view: &dyn View) -> Result<ImageInfo> {
    // The recognition area may be cut short by the end of a tiny image; never ask past it.
    let wanted = (FIRST_DESCRIPTOR + DESCRIPTORS * SECTOR) as u64;
    let area_len = wanted
        .min(view.len())
        .max((FIRST_DESCRIPTOR + SECTOR) as u64) as usize;
    let area = view.read(0, area_len, "the ISO volume descriptors")?;
    let ids: Vec<&[u8]> = (0..DESCRIPTORS)
        .filter_map(|i| identifier(&area, i))
        .collect();
    let iso9660 = ids.first() == Some(&&b"CD001"[..]);
    let udf = ids.iter().any(|id| matches!(*id, b"NSR02" | b"NSR03"));
    let filesystem = match (iso9660, udf) {
        (true, true) => "iso9660+udf",
        (true, false) => "iso9660",
        _ => "udf",
    };
    let mut info = ImageInfo::new(Format::Iso, crate::detect::raw_virtual_size(view.len()))
        .with("filesystem", filesystem);
    if iso9660 {
        let pvd = Fields::new(
            &area[FIRST_DESCRIPTOR..FIRST_DESCRIPTOR + SECTOR],
            "ISO primary volume descriptor",
        );
        if pvd.u8(0)? != 1 {
            return Err(err!(
                InvalidFormat,
                "the first ISO 9660 volume descriptor is not a primary descriptor; the ISO is damaged"
            ));
        }
        let blocks = u64::from(pvd.u32_le(80)?);
        let block_size = u64::from(pvd.u16_le(128)?);
        if !matches!(block_size, 512 | 1024 | 2048) {
            return Err(err!(
                InvalidFormat,
                "the ISO declares a logical block size of {block_size} bytes (512, 1024 or 2048 expected); the ISO is damaged"
            ));
        }
        let volume = blocks * block_size;
        if view.len_known() && volume > view.len() {
            return Err(err!(
                Truncated,
                "the ISO is truncated: its volume is {volume} bytes but the file has {}; download it again",
                view.len()
            ));
        }
        let label = String::from_utf8_lossy(pvd.slice(40, 32)?)
            .trim_end()
            .to_owned();
        info = info.with("volume-size", volume).with("label", label);
    }
    Ok(info)
}

/// Runs the probe over arbitrary bytes, for the fuzz target.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = probe(&crate::view::SliceView(data));
}
