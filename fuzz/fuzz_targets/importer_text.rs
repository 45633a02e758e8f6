//! Fuzzes the importer's parsers of text that comes from users, job environments and
//! registries: checksum specs (`IMPORTER_CHECKSUMS`), sizes (`IMPORTER_DESTINATION_SIZE`),
//! platforms, and the labels of a DVCR artifact's config blob (read back when one DVCR
//! image is copied to another). Nothing may panic; what parses must be consistent.
#![no_main]

use dvcr_importer::artifact::labels_of;
use dvcr_importer::checksum;
use dvcr_importer::env::parse_size;
use dvcr_importer::oci::Platform;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(labels) = labels_of(data) {
        // Labels read back must write out and read back the same.
        let again = dvcr_importer::artifact::config_json(&labels, "sha256:00");
        assert_eq!(labels_of(&again), Some(labels));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = checksum::parse(text) {
        // Every parsed checksum prints back in a form that parses to the same list.
        let printed: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(checksum::parse(&printed.join(",")).ok(), Some(list));
    }
    if let Some(size) = parse_size(text) {
        assert!(size <= 1 << 56);
    }
    let _ = Platform::parse(text);
});
