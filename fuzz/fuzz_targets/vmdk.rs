//! Fuzzes the vmdk header parser with arbitrary bytes: it must return, never panic,
//! never allocate without bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dvcr_formats::vmdk::fuzz(data);
});
