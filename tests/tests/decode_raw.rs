//! Raw, ISO and wrapped raw images decode to identical disks, from a file and a stream.

use dvcr_tests::{Scratch, Wrapper, decodes_like_qemu, mixed_raw, write};

#[test]
fn a_raw_image_decodes_to_the_same_disk_from_a_file_and_a_stream() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 24 << 20);
    let decoded = decodes_like_qemu(&s, &raw, "raw");
    assert_eq!(decoded.info.format, dvcr_formats::Format::Raw);
}

#[test]
fn a_raw_image_of_odd_length_is_padded_to_whole_sectors_like_qemu() {
    let s = Scratch::new();
    let raw = write(&s, "odd.raw", &dvcr_tests::noise(1_000_003, 5));
    decodes_like_qemu(&s, &raw, "raw");
}

#[test]
fn a_raw_image_in_every_wrapper_decodes_to_the_same_disk() {
    let s = Scratch::new();
    let raw = mixed_raw(&s, "a.raw", 8 << 20);
    for w in Wrapper::ALL {
        let wrapped = write(&s, &format!("a.raw.{}", w.name()), &w.compress(&raw));
        let (decoded, out) = dvcr_tests::decode_to_raw(
            &s,
            &wrapped,
            dvcr_tests::Feed::Stream,
            &dvcr_formats::Options::default(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", w.name()));
        assert_eq!(decoded.compression.len(), 1, "{}", w.name());
        dvcr_tests::assert_same_as_qemu(&raw, "raw", &out);
    }
}

#[test]
fn an_iso_image_is_copied_as_a_cdrom_from_a_file_and_a_stream() {
    let s = Scratch::new();
    let content = s.path("iso-content");
    std::fs::create_dir_all(&content).expect("content dir");
    std::fs::write(content.join("blob.bin"), dvcr_tests::noise(3_000_000, 4)).expect("file");
    let iso = s.path("a.iso");
    dvcr_tests::run(
        std::process::Command::new("genisoimage")
            .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
            .arg(&iso)
            .arg(&content),
    );
    let decoded = decodes_like_qemu(&s, &iso, "raw");
    assert_eq!(decoded.info.format, dvcr_formats::Format::Iso);
    assert!(decoded.info.format.is_cdrom());
}
