//! Fuzzes the single-pass vmdk decoder with arbitrary bytes fed as a stream: damaged headers,
//! grain tables, grain markers and zlib data must end in an error, never a panic, never an
//! allocation beyond what the bytes and the 64 MiB sink justify. The `KDMV` magic is written
//! in so that inputs reach the sparse-extent decoder.
#![no_main]

use std::io::Cursor;

use dvcr_formats::sink::MemorySink;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    if let Some(magic) = image.get_mut(..4) {
        magic.copy_from_slice(b"KDMV");
    }
    let sink = MemorySink::new(64 << 20);
    let _ = dvcr_formats::decode(
        Box::new(Cursor::new(image)),
        None,
        &sink,
        &dvcr_formats::Options::default(),
    );
});
