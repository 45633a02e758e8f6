//! Fuzzes the single-pass VDI decoder with arbitrary bytes (the VDI signature written in, so
//! that inputs reach it): errors are fine, panics and unbounded allocations are not.
#![no_main]

use std::io::Cursor;

use dvcr_formats::decode::{Options, decode};
use dvcr_formats::sink::MemorySink;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    if let Some(signature) = image.get_mut(0x40..0x44) {
        signature.copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
    }
    let sink = MemorySink::new(64 << 20);
    let _ = decode(
        Box::new(Cursor::new(image)),
        None,
        &sink,
        &Options::default(),
    );
});
