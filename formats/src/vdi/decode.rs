//! Single-pass decoding of VDI images (dynamic and static).
//!
//! A VDI keeps its header and block map at the start and the data area after them, so one
//! forward pass suffices: the header and map are parsed from the stream's head, the map is
//! turned around (data block → guest block) and sorted, and the data area then streams past
//! block by block, each allocated block written at its guest offset. Unallocated and
//! discarded (zero) blocks are never written: the target reads them as zeros. A static image
//! is the same with every block allocated, in order.

use super::{BLOCK_BYTES, parse};
use crate::ImageInfo;
use crate::align::PageBuf;
use crate::decode::Job;
use crate::error::{ErrorKind, Result};
use crate::view::View;

/// Most blocks read and written at once, when consecutive data blocks hold consecutive guest
/// blocks (as in every image `qemu-img convert` writes): 4 MiB runs.
const RUN_BLOCKS: u32 = 4;

/// Decodes the VDI image in `job`'s stream into its output; returns what [`super::probe`]
/// reports for it.
pub fn decode(job: &mut Job<'_>) -> Result<ImageInfo> {
    let parse_map = |view: &dyn View| {
        // (data block, guest block) for every map entry that names a data block.
        let mut map: Vec<(u32, u32)> = Vec::new();
        let header = parse(view, &mut |guest, data| map.push((data, guest)))?;
        Ok((header, map))
    };
    let (header, mut map) = match (job.stream.parse_head(parse_map), &job.random) {
        // A block map beyond what a stream keeps: a local file can still be read there.
        (Err(e), Some(random)) if e.kind() == ErrorKind::NeedsRandomAccess => parse_map(random)?,
        (parsed, _) => parsed?,
    };
    job.out.set_size(header.size)?;
    // In data-area order, so that the stream only moves forwards; `parse` refused data
    // blocks named twice, so no two entries overlap.
    map.sort_unstable();

    let mut buf = PageBuf::default();
    let mut i = 0;
    while let Some(&(data, guest)) = map.get(i) {
        let mut run = 1u32;
        while run < RUN_BLOCKS && map.get(i + run as usize) == Some(&(data + run, guest + run)) {
            run += 1;
        }
        i += run as usize;
        // Data blocks are below `allocated` and guest blocks below the map's length, both
        // at most 2^22: none of this overflows.
        let guest_at = u64::from(guest) * BLOCK_BYTES;
        let len = u64::from(run) * BLOCK_BYTES;
        // The last block may reach past the virtual size (which need not be a whole number
        // of blocks); qemu never reads past it.
        let keep = header.size.saturating_sub(guest_at).min(len) as usize;
        if keep == 0 {
            continue;
        }
        let at = header.data_at + u64::from(data) * BLOCK_BYTES;
        job.stream.skip_to(at, "a VDI data block")?;
        buf.ensure(keep);
        job.stream
            .read_exact(&mut buf[..keep], "a VDI data block")?;
        job.out.write(guest_at, &buf[..keep])?;
        job.stream.release_head();
    }
    // Every allocated block must be in the file, mapped or not, as the probe demands of a
    // file: a download that stopped short is not a good image.
    let data_end = header.data_at + u64::from(header.allocated) * BLOCK_BYTES;
    if data_end > job.stream.pos() {
        job.stream
            .skip_to(data_end, "the end of the VDI's data area")?;
    }
    Ok(header.info)
}

#[cfg(test)]
mod tests {
    use crate::ErrorKind;
    use crate::decode::{Decoded, Options, decode};
    use crate::sink::MemorySink;
    use std::io::Cursor;

    const MIB: usize = 1 << 20;

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// A hand-made dynamic VDI of `blocks` MiB: the block map at 0x200, the data area at
    /// 1 MiB, `map[i]` the entry of guest block i, data block n filled with byte n + 1.
    fn vdi(map: &[u32], allocated: u32) -> Vec<u8> {
        let data_at = MIB;
        let mut image = vec![0u8; data_at + allocated as usize * MIB];
        image[..17].copy_from_slice(b"<<< test VDI >>>\n");
        put_u32(&mut image, 0x40, 0xbeda_107f);
        put_u32(&mut image, 0x44, 0x0001_0001);
        put_u32(&mut image, 0x48, 0x180);
        put_u32(&mut image, 0x4c, 1);
        put_u32(&mut image, 0x154, 0x200);
        put_u32(&mut image, 0x158, data_at as u32);
        put_u32(&mut image, 0x168, 512);
        image[0x170..0x178].copy_from_slice(&(map.len() as u64 * MIB as u64).to_le_bytes());
        put_u32(&mut image, 0x178, MIB as u32);
        put_u32(&mut image, 0x180, map.len() as u32);
        put_u32(&mut image, 0x184, allocated);
        for (i, &entry) in map.iter().enumerate() {
            put_u32(&mut image, 0x200 + i * 4, entry);
        }
        for n in 0..allocated as usize {
            image[data_at + n * MIB..data_at + (n + 1) * MIB].fill(n as u8 + 1);
        }
        image
    }

    fn run(image: Vec<u8>) -> (crate::Result<Decoded>, MemorySink) {
        let sink = MemorySink::new(1 << 30);
        let result = decode(
            Box::new(Cursor::new(image)),
            None,
            &sink,
            &Options::default(),
        );
        (result, sink)
    }

    #[test]
    fn blocks_stored_out_of_order_land_at_their_guest_offsets() {
        const U: u32 = u32::MAX;
        const Z: u32 = u32::MAX - 1;
        let (decoded, sink) = run(vdi(&[2, U, 0, Z, 1, U], 3));
        let decoded = decoded.map_err(|e| e.to_string());
        assert_eq!(
            decoded.as_ref().map(|d| d.info.virtual_size),
            Ok(6 * MIB as u64)
        );
        let disk = sink.contents();
        let expected: [u8; 6] = [3, 0, 1, 0, 2, 0];
        for (i, &byte) in expected.iter().enumerate() {
            assert!(
                disk[i * MIB..(i + 1) * MIB].iter().all(|&b| b == byte),
                "guest block {i}"
            );
        }
        // Only the three allocated blocks were written.
        assert_eq!(decoded.map(|d| d.data_bytes), Ok(3 * MIB as u64));
    }

    #[test]
    fn a_data_block_named_twice_is_corruption_not_a_panic() {
        let (decoded, _) = run(vdi(&[0, 1, 0], 2));
        assert_eq!(decoded.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_map_entry_beyond_the_allocated_blocks_is_corruption() {
        let (decoded, _) = run(vdi(&[0, 5], 2));
        assert_eq!(decoded.err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    }

    #[test]
    fn a_truncated_data_area_is_an_error_wherever_it_is_cut() {
        let image = vdi(&[1, 0, u32::MAX, 2], 3);
        for cut in [
            100,
            0x1c8,
            0x210,
            MIB - 1,
            MIB + 5,
            2 * MIB,
            image.len() - 1,
        ] {
            let (decoded, _) = run(image[..cut].to_vec());
            assert_eq!(
                decoded.err().map(|e| e.kind()),
                Some(ErrorKind::Truncated),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn no_single_byte_corruption_of_the_metadata_panics_the_decoder() {
        let mut image = vdi(&[u32::MAX, 0], 1);
        let (decoded, _) = run(image.clone());
        assert!(decoded.is_ok());
        for at in (0x40..0x50).chain(0x154..0x190).chain(0x200..0x208) {
            let original = image[at];
            for value in [0x00, 0xff, original ^ 0x01, original ^ 0x80] {
                image[at] = value;
                // Errors are expected; panics are not.
                let _ = run(image.clone());
            }
            image[at] = original;
        }
    }

    #[test]
    fn hostile_headers_end_in_errors_not_panics() {
        let base = vdi(&[0, 1], 2);
        for (at, value) in [
            (0x154, u32::MAX),
            (0x158, u32::MAX - 511),
            (0x180, u32::MAX),
            (0x184, u32::MAX),
            (0x184, 0),
            (0x178, 0),
        ] {
            let mut image = base.clone();
            put_u32(&mut image, at, value);
            let (decoded, _) = run(image);
            assert!(decoded.is_err(), "field {at:#x} = {value:#x} was accepted");
        }
    }
}
