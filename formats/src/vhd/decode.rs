//! Single-pass decoding of VHD images that start with a footer copy: dynamic disks (and the
//! rare fixed disk whose footer copy is at offset 0). A fixed disk with its footer only at
//! the end looks like raw data and is decoded by the raw decoder in [`mod@crate::decode`].
//!
//! A dynamic disk keeps its footer copy, dynamic header and block allocation table (BAT) at
//! the start, so the decoder parses them from the stream's head, sorts the allocated blocks
//! by their place in the file and streams past them, writing each block's data at guest
//! offset `index × block_size`. Like qemu's vpc driver (which reads every sector of an
//! allocated block from the file and never consults the sector bitmap) it ignores the
//! bitmap, and trims the last block to the virtual size, which comes from the CHS geometry
//! for images made by qemu or Virtual PC and can be smaller than the blocks cover.
//! Unallocated blocks are never written. The trailing footer is read and checked last.
//!
//! Blocks that overlap an earlier one in the file (only in damaged or crafted images) are
//! read with random access when the source is a local file, and refused otherwise.

use std::borrow::Cow;

use super::{COOKIE, FOOTER_LEN, Layout, SECTOR, parse};
use crate::ImageInfo;
use crate::align::PageBuf;
use crate::decode::Job;
use crate::error::{ErrorKind, Result, err};
use crate::view::{MAX_READ, View};

/// The largest piece read and written at once: blocks (2 MiB in qemu's and Windows' images)
/// go in one piece, larger ones and fixed disks in pieces of this size.
const CHUNK: u64 = 4 << 20;

/// Decodes the VHD image in `job`'s stream into its output; returns what [`super::probe`]
/// reports for it.
pub fn decode(job: &mut Job<'_>) -> Result<ImageInfo> {
    let parse_table = |view: &dyn View| {
        // (sector of the block's bitmap, block index) for every allocated BAT entry.
        let mut blocks: Vec<(u32, u32)> = Vec::new();
        let layout = parse(view, &mut |index, sector| blocks.push((sector, index)))?;
        Ok((layout, blocks))
    };
    let (layout, mut blocks) = match (job.stream.parse_head(parse_table), &job.random) {
        // A block table beyond what a stream keeps: a local file can still be read there.
        (Err(e), Some(random)) if e.kind() == ErrorKind::NeedsRandomAccess => parse_table(random)?,
        (parsed, _) => parsed?,
    };
    match layout {
        Layout::Fixed { info } => fixed(job, info),
        Layout::Dynamic {
            info,
            block_size,
            bitmap_len,
            blocks_end,
        } => {
            job.out.set_size(info.virtual_size)?;
            // In file order, so that the stream only moves forwards.
            blocks.sort_unstable();
            let block_size = u64::from(block_size);
            let mut buf = PageBuf::default();
            for &(sector, index) in &blocks {
                // index < 2^22 and block_size <= 2^28; sector < 2^32: no overflow.
                let guest_at = u64::from(index) * block_size;
                let keep = info.virtual_size.saturating_sub(guest_at).min(block_size);
                if keep == 0 {
                    // Past the virtual size: qemu never reads it.
                    continue;
                }
                let data_at = u64::from(sector) * SECTOR + bitmap_len;
                copy(job, data_at, guest_at, keep, &mut buf)?;
            }
            // The probe demands every allocated block inside the file; so does a stream.
            if blocks_end > job.stream.pos() {
                job.stream
                    .skip_to(blocks_end, "the end of the VHD's last block")?;
            }
            check_footer(job, &mut buf)?;
            Ok(info)
        }
    }
}

/// Copies `len` bytes at image offset `from` to guest offset `to`: from the stream when it
/// has not passed `from` yet, else with random access when there is some.
fn copy(job: &mut Job<'_>, from: u64, to: u64, len: u64, buf: &mut PageBuf) -> Result<()> {
    buf.ensure(len.min(CHUNK) as usize);
    if from >= job.stream.pos() {
        job.stream.skip_to(from, "a VHD data block")?;
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(CHUNK) as usize;
            job.stream
                .read_exact(&mut buf[..piece], "a VHD data block")?;
            job.out.write(to + done, &buf[..piece])?;
            done += piece as u64;
        }
        job.stream.release_head();
        return Ok(());
    }
    let Some(random) = &job.random else {
        return Err(err!(
            NeedsRandomAccess,
            "the VHD stores a block at byte {from}, overlapping an earlier block that a single \
             pass has already read (now at byte {}); the image is damaged or unusual: give the \
             uncompressed file itself (random access) instead of a stream, or repair it with \
             `qemu-img convert -O vpc`",
            job.stream.pos()
        ));
    };
    let mut done = 0;
    while done < len {
        let piece = (len - done).min(MAX_READ as u64) as usize;
        // `from + done` stays below 2^42: a sector number times 512 plus a block.
        let data: Cow<'_, [u8]> = random.read(from + done, piece, "a VHD data block")?;
        job.out.write(to + done, &data)?;
        done += piece as u64;
    }
    Ok(())
}

/// Reads the rest of the image and checks that its last 512 bytes are the footer, as the
/// probe does for a file: without it the download stopped short.
fn check_footer(job: &mut Job<'_>, buf: &mut PageBuf) -> Result<()> {
    if buf.len() < FOOTER_LEN {
        buf.ensure(CHUNK as usize);
    }
    let mut tail: Vec<u8> = Vec::with_capacity(2 * FOOTER_LEN);
    loop {
        let n = job.stream.read(buf)?;
        if n == 0 {
            break;
        }
        let read = &buf[..n];
        if n >= FOOTER_LEN {
            tail.clear();
            tail.extend_from_slice(&read[n - FOOTER_LEN..]);
        } else {
            tail.extend_from_slice(read);
            let excess = tail.len().saturating_sub(FOOTER_LEN);
            tail.drain(..excess);
        }
    }
    if tail.len() < FOOTER_LEN || !tail.starts_with(COOKIE) {
        return Err(err!(
            Truncated,
            "the dynamic VHD does not end with its footer: the file is truncated or damaged; \
             download it again"
        ));
    }
    Ok(())
}

/// A fixed disk whose footer copy starts the image: qemu reads guest byte `n` at image byte
/// `n`, footer copy included, so the first `virtual_size` bytes are copied as they are.
fn fixed(job: &mut Job<'_>, info: ImageInfo) -> Result<ImageInfo> {
    let size = info.virtual_size;
    job.out.set_size(size)?;
    let mut buf = PageBuf::default();
    copy(job, 0, 0, size, &mut buf)?;
    // The footer after the data, as the probe demands of a file (size <= 2040 GiB).
    job.stream
        .skip_to(size + FOOTER_LEN as u64, "the fixed VHD's footer")?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use crate::ErrorKind;
    use crate::decode::{Decoded, Options, decode};
    use crate::sink::MemorySink;
    use std::io::Cursor;

    const MIB: usize = 1 << 20;
    const BLOCK: usize = 2 << 20;

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    fn checksum(bytes: &[u8], field_at: usize) -> u32 {
        let sum = bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| !(field_at..field_at + 4).contains(i))
            .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
        !sum
    }

    /// A footer with creator "qem2" (current size trusted) for a `size`-byte disk.
    fn footer(size: u64, disk_type: u32, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        put_u32(&mut f, 8, 2);
        put_u32(&mut f, 12, 0x0001_0000);
        put_u64(&mut f, 16, data_offset);
        f[28..32].copy_from_slice(b"qem2");
        put_u64(&mut f, 40, size);
        put_u64(&mut f, 48, size);
        f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        put_u32(&mut f, 60, disk_type);
        let sum = checksum(&f, 64);
        put_u32(&mut f, 64, sum);
        f
    }

    /// A dynamic VHD of `size` bytes with 2 MiB blocks, its BAT at 1536; `bat[i]` is the
    /// entry of block i, or `None` for "the n-th stored block" in the order given by
    /// `stored`: stored block n sits after the BAT in slot n and its data is byte n + 1.
    fn vhd(size: u64, bat: &[u32], stored: usize) -> Vec<u8> {
        vhd_with(BLOCK, size, bat, stored)
    }

    /// [`vhd`] with `block`-byte blocks (4 KiB or more, so that each has a bitmap sector).
    fn vhd_with(block: usize, size: u64, bat: &[u32], stored: usize) -> Vec<u8> {
        let table_at = 1536;
        let first = table_at + (bat.len() * 4).next_multiple_of(512);
        let slot = 512 + block;
        let mut image = vec![0u8; first + stored * slot];
        image[..512].copy_from_slice(&footer(size, 3, 512));
        image[512..520].copy_from_slice(b"cxsparse");
        put_u64(&mut image, 520, u64::MAX);
        put_u64(&mut image, 528, table_at as u64);
        put_u32(&mut image, 536, 0x0001_0000);
        put_u32(&mut image, 540, bat.len() as u32);
        put_u32(&mut image, 544, block as u32);
        let sum = checksum(&image[512..1536], 36);
        put_u32(&mut image, 548, sum);
        for (i, &entry) in bat.iter().enumerate() {
            put_u32(&mut image, table_at + i * 4, entry);
        }
        for n in 0..stored {
            let at = first + n * slot;
            image[at..at + 512].fill(0xff);
            image[at + 512..at + slot].fill(n as u8 + 1);
        }
        let tail = image[..512].to_vec();
        image.extend_from_slice(&tail);
        image
    }

    /// The BAT entry of stored slot `n` in an image from [`vhd`] with `entries` entries.
    fn slot(entries: usize, n: usize) -> u32 {
        ((1536 + (entries * 4).next_multiple_of(512) + n * (512 + BLOCK)) / 512) as u32
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
    fn blocks_stored_out_of_order_land_at_their_guest_offsets_trimmed_to_the_size() {
        const U: u32 = u32::MAX;
        // 7 MiB: the last block is half outside the disk.
        let size = 7 * MIB as u64;
        let image = vhd(size, &[slot(4, 2), U, slot(4, 0), slot(4, 1)], 3);
        let (decoded, sink) = run(image);
        let decoded = decoded.map_err(|e| e.to_string());
        assert_eq!(decoded.as_ref().map(|d| d.info.virtual_size), Ok(size));
        let disk = sink.contents();
        assert_eq!(disk.len(), 7 * MIB);
        for (i, byte) in [3u8, 0, 1, 2].into_iter().enumerate() {
            let block = &disk[i * BLOCK..((i + 1) * BLOCK).min(disk.len())];
            assert!(block.iter().all(|&b| b == byte), "block {i}");
        }
        assert_eq!(decoded.map(|d| d.data_bytes), Ok(5 * MIB as u64));
    }

    #[test]
    fn overlapping_blocks_in_a_stream_need_random_access_not_a_panic() {
        let image = vhd(4 * MIB as u64, &[slot(2, 0), slot(2, 0) + 1], 2);
        let (decoded, _) = run(image);
        assert_eq!(
            decoded.err().map(|e| e.kind()),
            Some(ErrorKind::NeedsRandomAccess)
        );
    }

    #[test]
    fn a_block_named_twice_is_read_again_with_random_access() -> crate::Result<()> {
        let image = vhd(4 * MIB as u64, &[slot(2, 0), slot(2, 0)], 1);
        let dir = std::env::temp_dir().join(format!("dvcr-vhd-decode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io("mkdir", e))?;
        let path = dir.join("twice.vhd");
        std::fs::write(&path, &image).map_err(|e| crate::Error::io("write", e))?;
        let file = std::fs::File::open(&path).map_err(|e| crate::Error::io("open", e))?;
        let view = crate::view::FileView::new(
            file.try_clone().map_err(|e| crate::Error::io("clone", e))?,
            image.len() as u64,
        );
        let sink = MemorySink::new(1 << 30);
        let decoded = decode(
            Box::new(file),
            Some(Box::new(view)),
            &sink,
            &Options::default(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        decoded?;
        assert!(sink.contents().iter().all(|&b| b == 1));
        Ok(())
    }

    #[test]
    fn a_truncated_image_is_an_error_wherever_it_is_cut() {
        let image = vhd(6 * MIB as u64, &[slot(3, 1), slot(3, 0), u32::MAX], 2);
        let len = image.len();
        for cut in [
            100,
            600,
            1540,
            2048,
            3000,
            MIB,
            BLOCK + 4000,
            len - 512,
            len - 1,
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
    fn hostile_block_tables_end_in_errors_not_panics() {
        let entries = 3;
        for entry in [0, 1, 3, 4, u32::MAX - 1, slot(entries, 5), 0x8000_0000] {
            let image = vhd(6 * MIB as u64, &[entry, slot(entries, 0), u32::MAX], 1);
            let (decoded, _) = run(image);
            assert!(decoded.is_err(), "BAT entry {entry:#x} was accepted");
        }
    }

    #[test]
    fn no_single_byte_corruption_of_the_metadata_panics_the_decoder() {
        // 4 KiB blocks: block 1 stored first, block 3 second.
        let first = (1536 + 512) / 512;
        let bat = [u32::MAX, first, u32::MAX, first + 9];
        let mut image = vhd_with(4096, 16384, &bat, 2);
        let (decoded, _) = run(image.clone());
        assert!(decoded.is_ok());
        for at in (0..100).chain(512..600).chain(1536..1552) {
            let original = image[at];
            for value in [0x00, 0xff, original ^ 0x01, original ^ 0x80] {
                image[at] = value;
                // Errors are expected (the checksums); panics are not.
                let _ = run(image.clone());
            }
            image[at] = original;
        }
    }

    #[test]
    fn a_fixed_footer_copy_at_the_start_decodes_from_offset_zero_like_qemu() {
        let mut image = vec![7u8; 8192];
        let f = footer(8192, 2, u64::MAX);
        image[..512].copy_from_slice(&f);
        image.extend_from_slice(&f);
        let (decoded, sink) = run(image.clone());
        assert_eq!(decoded.ok().map(|d| d.info.virtual_size), Some(8192));
        assert_eq!(sink.contents(), image[..8192]);
    }
}
