//! Which format an image is, decided from its own bytes, and dispatch to the format's
//! parser for validation and the virtual size.
//!
//! Order matters: formats with a magic at offset 0 first, then the VHD footer at the end
//! (a fixed VHD is raw data followed by a footer, so it must be tried before ISO and raw),
//! then ISO 9660 / UDF, then raw.

use crate::error::Result;
use crate::view::View;
use crate::{Format, ImageInfo, iso, qcow2, vdi, vhd, vhdx, vmdk};

/// How many leading bytes [`detect`] looks at to recognise a magic at the start
/// (the ISO volume descriptors end before this).
pub const HEAD_LEN: usize = 64 << 10;

/// Detects the format of the image behind `view`, validates it and computes its virtual
/// size. Refusals (backing files, encryption, damage) are errors.
pub fn detect(view: &dyn View) -> Result<ImageInfo> {
    let head_len = HEAD_LEN.min(usize::try_from(view.len()).unwrap_or(HEAD_LEN));
    let head = view.read(0, head_len, "the first bytes of the image")?;
    if qcow2::matches(&head) {
        return qcow2::probe(view);
    }
    if vmdk::matches(&head) {
        return vmdk::probe(view);
    }
    if vdi::matches(&head) {
        return vdi::probe(view);
    }
    if vhdx::matches(&head) {
        return vhdx::probe(view);
    }
    if vhd::matches(&head) {
        return vhd::probe(view);
    }
    if let Some(info) = vhd::probe_fixed(view)? {
        return Ok(info);
    }
    if iso::matches(&head) {
        return iso::probe(view);
    }
    Ok(raw(view.len(), &head))
}

/// The format the first bytes of an image name by their magic, without validating
/// anything: qcow2, vmdk, vdi, vhdx, dynamic vhd, ISO; `Raw` for anything else (including a
/// fixed VHD, whose footer is at the end). For choosing how to store an image before the
/// probe that reads all of it has confirmed the format.
pub fn sniff(head: &[u8]) -> Format {
    if qcow2::matches(head) {
        Format::Qcow2
    } else if vmdk::matches(head) {
        Format::Vmdk
    } else if vdi::matches(head) {
        Format::Vdi
    } else if vhdx::matches(head) {
        Format::Vhdx
    } else if vhd::matches(head) {
        Format::Vpc
    } else if iso::matches(head) {
        Format::Iso
    } else {
        Format::Raw
    }
}

/// The virtual size of raw bytes: the length rounded up to whole 512-byte sectors, as QEMU
/// presents a raw file to a guest (and as `qemu-img info` reports it).
pub fn raw_virtual_size(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

/// A raw image: its virtual size is its length in whole sectors. Partition tables are
/// reported as hints.
fn raw(len: u64, head: &[u8]) -> ImageInfo {
    let info = ImageInfo::new(Format::Raw, raw_virtual_size(len));
    if head.get(512..520) == Some(b"EFI PART") {
        info.with("partition-table", "gpt")
    } else if head.get(510..512) == Some(&[0x55, 0xaa]) {
        info.with("partition-table", "mbr")
    } else {
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::SliceView;

    #[test]
    fn detect_treats_unknown_bytes_as_raw_rounded_up_to_whole_sectors() {
        let data = vec![7u8; 3000];
        let info = detect(&SliceView(&data)).map_err(|e| e.to_string());
        assert_eq!(
            info.as_ref().map(|i| (i.format, i.virtual_size)),
            Ok((Format::Raw, 3072))
        );
    }

    #[test]
    fn detect_reports_an_mbr_as_a_raw_partition_table_hint() {
        let mut data = vec![0u8; 4096];
        data[510] = 0x55;
        data[511] = 0xaa;
        let info = detect(&SliceView(&data)).ok();
        let table = info.and_then(|i| i.details.get("partition-table").map(|d| d.to_string()));
        assert_eq!(table.as_deref(), Some("mbr"));
    }

    #[test]
    fn detect_accepts_an_empty_image_as_raw() {
        let info = detect(&SliceView(&[]))
            .ok()
            .map(|i| (i.format, i.virtual_size));
        assert_eq!(info, Some((Format::Raw, 0)));
    }
}
