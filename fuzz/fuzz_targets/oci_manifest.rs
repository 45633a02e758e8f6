//! Fuzzes the registry client's parsers of untrusted text: manifests and indexes (with the
//! platform picked from an index), `WWW-Authenticate` challenges, docker `config.json`
//! credentials and image references. The first byte picks the `Content-Type` the registry
//! claims; the rest is the body, also read as text for the other parsers. Nothing may
//! panic, and a parsed manifest must keep the limits the parser promises.
#![no_main]

use dvcr_importer::oci::auth::{AuthConfig, parse_www_authenticate};
use dvcr_importer::oci::manifest::{
    self, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, Manifest, OCI_INDEX, OCI_MANIFEST,
    Platform,
};
use dvcr_importer::oci::reference::Reference;

const CONTENT_TYPES: [Option<&str>; 7] = [
    None,
    Some(OCI_MANIFEST),
    Some(OCI_INDEX),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_LIST),
    Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
    Some("application/json; charset=utf-8"),
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(first) % CONTENT_TYPES.len()];
    match manifest::parse_manifest(content_type, body) {
        Ok(Manifest::Image(image)) => {
            assert!(body.len() <= MAX_MANIFEST_BYTES);
            for layer in &image.layers {
                let _ = manifest::layer_compression(&layer.media_type);
                assert!(layer.digest.starts_with("sha256:") || layer.digest.starts_with("sha512:"));
            }
        }
        Ok(Manifest::Index(index)) => {
            for platform in [
                Platform::default(),
                Platform {
                    os: "linux".into(),
                    architecture: "arm64".into(),
                    variant: Some("v8".into()),
                },
            ] {
                if let Ok(entry) = manifest::select_platform(&index, &platform) {
                    assert!(index.manifests.contains(entry));
                }
            }
        }
        Err(_) => {}
    }
    let _ = manifest::sniff(body);
    let text = String::from_utf8_lossy(body);
    let _ = parse_www_authenticate(&text);
    let _ = AuthConfig::parse(body).map(|c| c.lookup("registry.example:5000").is_some());
    if let Ok(r) = Reference::parse(&text) {
        // What was accepted prints as a reference that parses to the same thing.
        let again = Reference::parse(&r.to_string());
        assert_eq!(again.ok().as_ref(), Some(&r), "{r}");
    }
    let _ = Platform::parse(&text);
});
