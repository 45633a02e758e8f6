//! Fuzzes the single-pass qcow2 decoder: arbitrary bytes behind a qcow2 magic are decoded
//! into a bounded in-memory disk as a stream (the harder case: nothing can be read twice). Decoding
//! must return, never panic, and never grow memory without bound.
#![no_main]

use dvcr_formats::Options;
use dvcr_formats::sink::MemorySink;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = b"QFI\xfb".to_vec();
    image.extend_from_slice(data);
    let opts = Options {
        pending_memory: 1 << 20,
        threads: 1,
        ..Options::default()
    };
    let sink = MemorySink::new(64 << 20);
    let _ = dvcr_formats::decode(Box::new(std::io::Cursor::new(image)), None, &sink, &opts);
});
