//! The DVCR artifact: a container image whose one layer is a tar holding the directory
//! `disk/` and exactly one regular file `disk/<file>`, a config carrying the image's sizes
//! and format as labels, and an OCI manifest tying them together.
//!
//! The tar is produced as a stream (headers here, the file's bytes straight from the
//! source), so its entry size must be known before the data: the caller knows it from the
//! source, or measures it in scratch space first. Headers are ustar, with a PAX `size`
//! record for files of 8 GiB and more; the entry is padded to 512 bytes and the archive
//! ends with two zero blocks, so GNU tar, containerd and podman unpack it without warnings.
//! Entries are owned by 107:107, the user KubeVirt runs QEMU as, so the file works as a
//! containerDisk.

use dvcr_formats::Format;
use serde_json::json;

/// OCI image manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// An uncompressed tar layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// A zstd-compressed tar layer (raw and ISO disks, whose zero runs would otherwise be
/// stored byte for byte).
pub const LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The labels of the contract.
pub const LABEL_SIZE: &str = "source-image-size";
/// Unpacked bytes.
pub const LABEL_VIRTUAL_SIZE: &str = "source-image-virtual-size";
/// qcow2, raw, iso, vmdk, vdi, vhd, vhdx.
pub const LABEL_FORMAT: &str = "source-image-format";

/// Owner of the entries: KubeVirt's qemu user.
const OWNER: u64 = 107;
/// A tar block.
pub const BLOCK: usize = 512;
/// ustar's size field holds 11 octal digits.
const USTAR_MAX_SIZE: u64 = 0o77_777_777_777;

/// The file name under `disk/` for an image of `format`.
pub fn file_name(format: Format) -> &'static str {
    match format {
        Format::Qcow2 => "disk.qcow2",
        Format::Vmdk => "disk.vmdk",
        Format::Vdi => "disk.vdi",
        Format::Vpc => "disk.vhd",
        Format::Vhdx => "disk.vhdx",
        Format::Iso => "disk.iso",
        _ => "disk.img",
    }
}

/// The format as the platform names it in labels and reports (`vhd` where qemu says `vpc`).
pub fn format_label(format: Format) -> &'static str {
    match format {
        Format::Vpc => "vhd",
        other => other.name(),
    }
}

/// Whether the layer for `format` is worth compressing: raw-like disks store their empty
/// space as zeros; every other format already leaves it out.
pub fn compress_layer(format: Format) -> bool {
    matches!(format, Format::Raw | Format::Iso)
}

fn header(path: &str, size: u64, kind: tar::EntryType, mode: u32) -> [u8; BLOCK] {
    let mut h = tar::Header::new_ustar();
    // The paths are ours and short; set_path only fails on over-long or non-UTF-8 names.
    let _ = h.set_path(path);
    h.set_size(size.min(USTAR_MAX_SIZE));
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(OWNER);
    h.set_gid(OWNER);
    h.set_mtime(0);
    h.set_cksum();
    let mut out = [0u8; BLOCK];
    out.copy_from_slice(h.as_bytes());
    out
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `len` counts the whole record.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while (len.to_string().len() + body.len()) != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

/// Everything of the layer that comes before the disk file's bytes: the `disk/` directory
/// entry and the file's header (with a PAX size record when ustar cannot hold the size).
pub fn layer_prefix(file: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * BLOCK);
    out.extend_from_slice(&header("disk/", 0, tar::EntryType::Directory, 0o755));
    let path = format!("disk/{file}");
    if size > USTAR_MAX_SIZE {
        let record = pax_record("size", &size.to_string());
        out.extend_from_slice(&header(
            &format!("disk/PaxHeaders/{file}"),
            record.len() as u64,
            tar::EntryType::XHeader,
            0o644,
        ));
        let mut data = record.into_bytes();
        data.resize(data.len().div_ceil(BLOCK) * BLOCK, 0);
        out.extend_from_slice(&data);
    }
    out.extend_from_slice(&header(&path, size, tar::EntryType::Regular, 0o644));
    out
}

/// Everything after the file's bytes: padding to a whole block, then two zero blocks.
pub fn layer_suffix(size: u64) -> Vec<u8> {
    let pad = (BLOCK as u64 - size % BLOCK as u64) as usize % BLOCK;
    vec![0u8; pad + 2 * BLOCK]
}

/// The size of the uncompressed layer for a file of `size` bytes.
pub fn layer_len(file: &str, size: u64) -> u64 {
    layer_prefix(file, size).len() as u64 + size + layer_suffix(size).len() as u64
}

/// What the labels say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    /// Bytes of the disk file.
    pub stored_size: u64,
    /// Unpacked size.
    pub virtual_size: u64,
    /// The format name.
    pub format: String,
}

/// The image config: linux/amd64 (containerDisks are pulled by nodes), the labels, and the
/// layer's diff ID (SHA-256 of the uncompressed tar).
pub fn config_json(labels: &Labels, diff_id: &str) -> Vec<u8> {
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Labels": {
                LABEL_SIZE: labels.stored_size.to_string(),
                LABEL_VIRTUAL_SIZE: labels.virtual_size.to_string(),
                LABEL_FORMAT: labels.format,
            }
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    config.to_string().into_bytes()
}

/// Reads the labels back from a config (for a copy between DVCR images).
pub fn labels_of(config: &[u8]) -> Option<Labels> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let labels = v.get("config")?.get("Labels")?;
    let number = |k: &str| labels.get(k)?.as_str()?.parse::<u64>().ok();
    Some(Labels {
        stored_size: number(LABEL_SIZE)?,
        virtual_size: number(LABEL_VIRTUAL_SIZE)?,
        format: labels.get(LABEL_FORMAT)?.as_str()?.to_owned(),
    })
}

/// A blob as the manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// The OCI manifest of the artifact.
pub fn manifest_json(config: &Descriptor, layer: &Descriptor) -> Vec<u8> {
    let d = |d: &Descriptor| json!({"mediaType": d.media_type, "digest": d.digest, "size": d.size});
    json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": d(config),
        "layers": [d(layer)],
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;

    fn layer(file: &str, data: &[u8]) -> Vec<u8> {
        let mut out = layer_prefix(file, data.len() as u64);
        out.extend_from_slice(data);
        out.extend_from_slice(&layer_suffix(data.len() as u64));
        out
    }

    #[test]
    fn the_layer_holds_the_disk_directory_and_one_file_with_its_bytes() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let bytes = layer("disk.qcow2", &data);
        assert_eq!(bytes.len() as u64, layer_len("disk.qcow2", 1000));
        assert_eq!(bytes.len() % BLOCK, 0);
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            seen.push((path, entry.header().uid().unwrap(), content));
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "disk/");
        assert_eq!(seen[1].0, "disk/disk.qcow2");
        assert_eq!(seen[1].1, 107);
        assert_eq!(seen[1].2, data);
        // Two zero blocks end the archive.
        assert!(bytes[bytes.len() - 2 * BLOCK..].iter().all(|&b| b == 0));
    }

    #[test]
    fn files_of_eight_gib_and_more_get_a_pax_size_record() {
        let size = 10u64 << 30;
        let prefix = layer_prefix("disk.img", size);
        let mut archive = tar::Archive::new(&prefix[..]);
        let mut entries = archive.entries().unwrap();
        let _dir = entries.next().unwrap().unwrap();
        // The file entry's header parses with the PAX size applied.
        let file = entries.next().unwrap().unwrap();
        assert_eq!(file.path().unwrap().to_string_lossy(), "disk/disk.img");
        assert_eq!(file.size(), size);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for value in ["1", "12345678901", &"9".repeat(95)] {
            let r = pax_record("size", value);
            let (len, _) = r.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{r:?}");
        }
    }

    #[test]
    fn labels_read_back_from_the_config() {
        let labels = Labels {
            stored_size: 5,
            virtual_size: 1 << 30,
            format: "qcow2".into(),
        };
        let config = config_json(&labels, "sha256:00");
        assert_eq!(labels_of(&config), Some(labels));
    }
}
