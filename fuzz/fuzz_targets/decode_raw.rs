//! Fuzzes the decode entry point with arbitrary bytes (any format, any wrapper): whatever the
//! first bytes claim, decoding into a bounded in-memory disk must return, never panic.
#![no_main]

use dvcr_formats::Options;
use dvcr_formats::sink::MemorySink;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let opts = Options {
        pending_memory: 1 << 20,
        threads: 1,
        ..Options::default()
    };
    let sink = MemorySink::new(64 << 20);
    let _ = dvcr_formats::decode(
        Box::new(std::io::Cursor::new(data.to_vec())),
        None,
        &sink,
        &opts,
    );
});
