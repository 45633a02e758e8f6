//! Manifests and indexes as registries serve them (OCI image manifest and index, Docker
//! schema2 manifest and manifest list), parsed from untrusted bytes into what the puller
//! needs: layers with their digests, sizes and compression, or the index entry for a
//! platform. Docker schema1 is refused with advice, never half-understood.

use std::fmt;

use serde::Deserialize;

use super::error::OciError;
use super::reference::{parse_digest, shown};

/// The largest manifest or index fetched or pushed.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The most layers (or index entries) an image may list.
const MAX_ENTRIES: usize = 10_000;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema1 (refused).
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker schema1, signed (refused).
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header of a manifest request: every kind this client understands.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A platform an image is built for (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`, `windows`, …
    pub os: String,
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `v7`, `v8`, …; when set, index entries must match it.
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// Parses `os/architecture[/variant]`.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok_part = |p: &&str| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok_part) {
            return Err(OciError::invalid(format!(
                "{} is not a platform; write os/architecture[/variant], e.g. linux/amd64",
                shown(text)
            )));
        }
        Ok(Self {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A reference to content: media type, digest (checked syntax), size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The media type (may be empty when the manifest left it out).
    pub media_type: String,
    /// `sha256:<hex>` or `sha512:<hex>`.
    pub digest: String,
    /// The size in bytes.
    pub size: u64,
    /// For index entries: the platform the manifest is for.
    pub platform: Option<Platform>,
}

/// An image manifest: a config and layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    /// The manifest's media type.
    pub media_type: String,
    /// The image config.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// An image index or manifest list: one manifest per platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The index's media type.
    pub media_type: String,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
}

/// What a manifest request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// An image.
    Image(ImageManifest),
    /// An index to pick a platform from.
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    fs_layers: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Option<String>,
    size: Option<serde_json::Value>,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
}

/// The media type of a `Content-Type` value: parameters dropped, lowercase.
pub fn bare_media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parses a manifest or index from untrusted bytes; `content_type` is what the registry
/// said (parameters allowed), consulted when the body has no `mediaType`.
pub fn parse_manifest(content_type: Option<&str>, bytes: &[u8]) -> Result<Manifest, OciError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(OciError::invalid(format!(
            "the manifest is {} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
            bytes.len()
        )));
    }
    let header_type = content_type.map(bare_media_type).unwrap_or_default();
    if header_type == DOCKER_SCHEMA1 || header_type == DOCKER_SCHEMA1_SIGNED {
        return Err(schema1());
    }
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| OciError::invalid(format!("the manifest is not valid manifest JSON: {e}")))?;
    let version = raw.schema_version.as_ref().and_then(|v| v.as_u64());
    if version == Some(1) || raw.fs_layers.is_some() {
        return Err(schema1());
    }
    if raw.schema_version.is_some() && version != Some(2) {
        return Err(OciError::invalid(format!(
            "the manifest has schemaVersion {}, not 2",
            raw.schema_version
                .as_ref()
                .map(|v| shown(&v.to_string()))
                .unwrap_or_default()
        )));
    }
    let body_type = raw.media_type.as_deref().map(bare_media_type);
    let media_type = match body_type {
        Some(t) if !t.is_empty() => t,
        _ if is_known(&header_type) => header_type,
        _ if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        _ if raw.layers.is_some() || raw.config.is_some() => OCI_MANIFEST.to_owned(),
        _ => {
            return Err(OciError::invalid(
                "the manifest has no mediaType, no layers and no manifests: it is not an image",
            ));
        }
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let entries = raw.manifests.ok_or_else(|| {
                OciError::invalid(format!("the {media_type} has no `manifests` list"))
            })?;
            if entries.len() > MAX_ENTRIES {
                return Err(OciError::invalid(format!(
                    "the index lists {} manifests (at most {MAX_ENTRIES})",
                    entries.len()
                )));
            }
            let manifests = entries
                .into_iter()
                .enumerate()
                .map(|(i, d)| descriptor(d, &format!("manifests[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Manifest::Index(Index {
                media_type,
                manifests,
            }))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| OciError::invalid(format!("the {media_type} has no `config`")))?;
            let config = descriptor(config, "config")?;
            let entries = raw.layers.unwrap_or_default();
            if entries.len() > MAX_ENTRIES {
                return Err(OciError::invalid(format!(
                    "the manifest lists {} layers (at most {MAX_ENTRIES})",
                    entries.len()
                )));
            }
            let layers = entries
                .into_iter()
                .enumerate()
                .map(|(i, d)| descriptor(d, &format!("layers[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Manifest::Image(ImageManifest {
                media_type,
                config,
                layers,
            }))
        }
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => Err(schema1()),
        other => Err(OciError::invalid(format!(
            "the manifest's media type {} is not an image manifest or index (OCI or Docker schema2)",
            shown(other)
        ))),
    }
}

fn is_known(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST
    )
}

fn schema1() -> OciError {
    OciError::invalid(
        "the image has a Docker schema 1 manifest, which is not supported: push it again with a current docker, podman or skopeo (they write schema 2 or OCI)",
    )
}

fn descriptor(raw: RawDescriptor, what: &str) -> Result<Descriptor, OciError> {
    let digest = raw
        .digest
        .ok_or_else(|| OciError::invalid(format!("{what} has no digest")))?;
    let digest = parse_digest(&digest).map_err(|e| OciError::invalid(format!("{what}: {e}")))?;
    let size = match raw.size {
        Some(v) => v.as_u64().ok_or_else(|| {
            OciError::invalid(format!(
                "{what} has size {}, not a non-negative integer",
                shown(&v.to_string())
            ))
        })?,
        None => return Err(OciError::invalid(format!("{what} has no size"))),
    };
    let platform = raw.platform.map(|p| Platform {
        os: p.os.unwrap_or_default().to_ascii_lowercase(),
        architecture: p.architecture.unwrap_or_default().to_ascii_lowercase(),
        variant: p
            .variant
            .filter(|v| !v.is_empty())
            .map(|v| v.to_ascii_lowercase()),
    });
    Ok(Descriptor {
        media_type: raw
            .media_type
            .map(|m| bare_media_type(&m))
            .unwrap_or_default(),
        digest,
        size,
        platform,
    })
}

/// The variant an architecture has when an entry does not say.
fn default_variant(architecture: &str) -> Option<&'static str> {
    match architecture {
        "arm64" => Some("v8"),
        _ => None,
    }
}

/// The entry of `index` for `want`: os and architecture equal, and the variant when one is
/// wanted. Without a wanted variant, an entry without one is preferred. An index with a
/// single entry that names no platform (as image layouts often write) is that entry.
pub fn select_platform<'a>(index: &'a Index, want: &Platform) -> Result<&'a Descriptor, OciError> {
    let manifests: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.media_type.is_empty()
                || d.media_type == OCI_MANIFEST
                || d.media_type == DOCKER_MANIFEST
        })
        .collect();
    let matching: Vec<&Descriptor> = manifests
        .iter()
        .copied()
        .filter(|d| {
            let Some(p) = &d.platform else { return false };
            if p.os != want.os || p.architecture != want.architecture {
                return false;
            }
            match &want.variant {
                None => true,
                Some(v) => {
                    p.variant.as_deref().or(default_variant(&p.architecture)) == Some(v.as_str())
                }
            }
        })
        .collect();
    if let Some(best) = matching
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.variant.is_none()))
        .or(matching.first())
    {
        return Ok(best);
    }
    if manifests.len() == 1 && manifests[0].platform.is_none() {
        return Ok(manifests[0]);
    }
    let available: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| p.to_string())
        .collect();
    Err(OciError::invalid(format!(
        "the image index has no manifest for {want} (it has {}): push an image for {want} or choose one of those platforms",
        if available.is_empty() {
            "no platform-specific images".to_owned()
        } else {
            available.join(", ")
        }
    )))
}

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`+gzip`, Docker's `tar.gzip`).
    Gzip,
    /// zstd (`+zstd`).
    Zstd,
    /// The media type does not say: look at the first bytes.
    Detect,
}

/// The compression a layer media type declares; refuses media types that cannot be a
/// filesystem layer (encrypted layers, configs, artifacts).
pub fn layer_compression(media_type: &str) -> Result<Compression, OciError> {
    let m = bare_media_type(media_type);
    let compression = match m.as_str() {
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar"
        | "application/octet-stream"
        | "application/x-tar"
        | "application/tar"
        | "application/gzip"
        | "application/x-gzip"
        | "application/zstd"
        | "" => Compression::Detect,
        other => {
            return Err(OciError::invalid(format!(
                "a layer has the media type {}, which is not a (tar, tar+gzip or tar+zstd) filesystem layer",
                shown(other)
            )));
        }
    };
    Ok(compression)
}

/// The compression the first bytes of a layer show.
pub fn sniff(prefix: &[u8]) -> Compression {
    if prefix.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn index(entries: &[(&str, Option<&str>)]) -> Index {
        let manifests = entries
            .iter()
            .enumerate()
            .map(|(i, (p, variant))| {
                let mut platform = Platform::parse(p).unwrap_or_default();
                platform.variant = variant.map(str::to_owned);
                Descriptor {
                    media_type: OCI_MANIFEST.into(),
                    digest: d(i as u8),
                    size: 10,
                    platform: Some(platform),
                }
            })
            .collect();
        Index {
            media_type: OCI_INDEX.into(),
            manifests,
        }
    }

    #[test]
    fn an_index_resolves_to_the_wanted_platform() {
        let idx = index(&[("linux/arm64", Some("v8")), ("linux/amd64", None)]);
        let got = select_platform(&idx, &Platform::default()).map(|d| d.digest.clone());
        assert_eq!(got.ok(), Some(d(1)));
        let arm = Platform::parse("linux/arm64/v8").unwrap_or_default();
        assert_eq!(
            select_platform(&idx, &arm).map(|d| d.digest.clone()).ok(),
            Some(d(0))
        );
        let s390 = Platform::parse("linux/s390x").unwrap_or_default();
        let e = select_platform(&idx, &s390).err().map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(
            e.contains("linux/arm64/v8") && e.contains("linux/amd64"),
            "{e}"
        );
    }

    #[test]
    fn manifests_are_classified_by_body_header_or_shape() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":5}}]}}"#,
            d(1),
            d(2)
        );
        match parse_manifest(Some(DOCKER_MANIFEST), image.as_bytes()) {
            Ok(Manifest::Image(m)) => {
                assert_eq!(m.media_type, DOCKER_MANIFEST);
                assert_eq!(m.layers[0].size, 5);
            }
            other => panic!("{other:?}"),
        }
        let list = format!(r#"{{"manifests":[{{"digest":"{}","size":1}}]}}"#, d(3));
        assert!(matches!(
            parse_manifest(Some("application/json"), list.as_bytes()),
            Ok(Manifest::Index(_))
        ));
    }

    #[test]
    fn schema1_and_broken_manifests_are_refused_clearly() {
        let e = parse_manifest(None, br#"{"schemaVersion":1,"fsLayers":[]}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("schema 1"), "{e}");
        for bad in [
            &b"{"[..],
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            br#"{"layers":[{"digest":"sha256:00","size":1}],"config":{"digest":"sha256:00","size":1}}"#,
            br#"{"manifests":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":-1}]}"#,
        ] {
            assert!(parse_manifest(None, bad).is_err());
        }
    }

    #[test]
    fn layer_compression_comes_from_the_media_type_or_the_magic_bytes() {
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").ok(),
            Some(Compression::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").ok(),
            Some(Compression::Zstd)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar").ok(),
            Some(Compression::Detect)
        );
        assert!(layer_compression("application/vnd.oci.image.layer.v1.tar+encrypted").is_err());
        assert_eq!(sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(sniff(b"disk/"), Compression::None);
    }
}
