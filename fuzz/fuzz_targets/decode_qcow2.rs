//! Fuzzes the single-pass qcow2 decoder: arbitrary bytes behind a qcow2 magic are decoded
//! into a bounded in-memory disk as a stream (the harder case: nothing can be read twice),
//! once read through the decoder's buffer and once lent in chunks whose sizes the input's
//! first byte picks (chunks end anywhere, inside tables and clusters). Decoding must return,
//! never panic, and never grow memory without bound.
#![no_main]

use std::io::Read;

use dvcr_formats::Options;
use dvcr_formats::sink::MemorySink;

/// Lends its bytes in chunks of `step` bytes.
struct Chunks {
    bytes: Vec<u8>,
    at: usize,
    step: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.bytes.len() - self.at);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl dvcr_formats::Lend for Chunks {
    fn lend(&mut self, max: usize) -> std::io::Result<&[u8]> {
        let n = self.step.min(max).min(self.bytes.len() - self.at);
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut image = b"QFI\xfb".to_vec();
    image.extend_from_slice(data);
    let opts = Options {
        pending_memory: 1 << 20,
        threads: 1,
        ..Options::default()
    };
    let sink = MemorySink::new(64 << 20);
    let _ = dvcr_formats::decode(Box::new(std::io::Cursor::new(image.clone())), None, &sink, &opts);
    let step = 1 + usize::from(data.first().copied().unwrap_or(0)) * 509;
    let sink = MemorySink::new(64 << 20);
    let lent = Chunks {
        bytes: image,
        at: 0,
        step,
    };
    let _ = dvcr_formats::decode_lent(Box::new(lent), &sink, &opts);
});
