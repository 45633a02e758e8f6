//! Fuzzes format detection over a single streaming pass: the first byte chooses the chunk
//! size, the rest is the image. Detection must never panic, and must agree with random
//! access detection whenever the stream succeeds.
#![no_main]

use dvcr_formats::{SliceView, StreamProbe, detect::detect};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, image)) = data.split_first() else { return };
    let chunk = usize::from(first) * 97 + 1;
    let mut probe = StreamProbe::new();
    for piece in image.chunks(chunk) {
        probe.feed(piece);
    }
    let streamed = probe.finish();
    let direct = detect(&SliceView(image));
    if let (Ok(s), Ok(d)) = (&streamed, &direct) {
        assert_eq!(s, d, "a stream and random access disagree");
    }
});
