//! Fuzzes the single-pass VHD decoder with arbitrary bytes: errors are fine, panics and
//! unbounded allocations are not. The footer cookie is written in and the checksums of the
//! footer copy and of the dynamic header it points to are made right, so that inputs get past
//! them to the block table and the blocks.
#![no_main]

use std::io::Cursor;

use dvcr_formats::decode::{Options, decode};
use dvcr_formats::sink::MemorySink;

/// The VHD checksum: ones' complement of the byte sum, the field at `at` counted as zeros.
fn seal(bytes: &mut [u8], at: usize) {
    bytes[at..at + 4].fill(0);
    let sum = bytes
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    bytes[at..at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    if image.len() >= 512 {
        image[..8].copy_from_slice(b"conectix");
        let header_at = u64::from_be_bytes(image[16..24].try_into().unwrap_or([0xff; 8]));
        seal(&mut image[..512], 64);
        if let Ok(at) = usize::try_from(header_at)
            && let Some(header) = at.checked_add(1024).and_then(|end| image.get_mut(at..end))
        {
            seal(header, 36);
        }
    }
    let sink = MemorySink::new(64 << 20);
    let _ = decode(
        Box::new(Cursor::new(image)),
        None,
        &sink,
        &Options::default(),
    );
});
