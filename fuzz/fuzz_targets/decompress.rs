//! Fuzzes compression detection and unwrapping plus the stream probe on arbitrary bytes
//! (damaged gzip, xz, zstd and bzip2 streams): errors are fine, panics are not.
#![no_main]

use std::io::Cursor;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dvcr_formats::probe_reader(Cursor::new(data.to_vec()));
});
