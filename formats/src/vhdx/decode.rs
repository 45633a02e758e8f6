//! Single-pass decoding of VHDX images (dynamic and fixed).
//!
//! A VHDX keeps its guest data in payload blocks (1 to 256 MiB) placed anywhere after the
//! 1 MiB header section; the block allocation table (BAT) says, per block, whether it holds
//! data and at which 1 MiB-aligned file offset. Images written by qemu and Hyper-V put the
//! BAT and the metadata region at the start of the file (qemu: BAT at 2 MiB, metadata at
//! 3 MiB) and the blocks after them, but in the order the blocks were first written, not in
//! guest order. So the decoder parses the headers from the head of the stream, reads the
//! whole BAT, collects the blocks that hold data, sorts them by file offset and then copies
//! them in one forward pass, each to its guest offset.
//!
//! What each BAT state reads as follows QEMU's `block/vhdx.c` (the reference for `qemu-img
//! convert`): NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED (and the 0.95 draft's UNMAPPED, 5) read
//! as zeros and are not written; FULLY_PRESENT reads the block from the file;
//! PARTIALLY_PRESENT only exists in differencing disks (refused); state 4 is undefined and
//! refused, as qemu fails to read it. Sector bitmap entries only matter to differencing
//! disks and are skipped.
//!
//! Every block is checked before anything is copied: it must not overlap the header
//! section, log, BAT or metadata region (qemu refuses those images too), nor another block,
//! and must end inside the file when its length is known. A block that lies behind the
//! stream position (possible only when the BAT is too large to keep in the head) is read
//! through random access when the source is a local file, and is otherwise a
//! [`ErrorKind::NeedsRandomAccess`](crate::ErrorKind::NeedsRandomAccess) error.

use super::{BAT_ENTRY_LEN, HEADER_SECTION_LEN, Layout, MIB, Span};
use crate::ImageInfo;
use crate::align::PageBuf;
use crate::decode::Job;
use crate::error::{Result, err};
use crate::stream::MAX_HEAD;
use crate::view::{MAX_READ, View};

/// Bytes copied per read: large enough that per-call costs vanish, small enough to stay in
/// cache-friendly, bounded memory.
const COPY_CHUNK: usize = 4 << 20;
/// Bytes of BAT read per step when it does not fit in the head (a multiple of the entry size).
const BAT_CHUNK: usize = 4 << 20;
/// The state field of a BAT entry: bits 0..2.
const STATE_MASK: u64 = 7;
/// The file offset field of a BAT entry: bits 20..63, in bytes (already a multiple of 1 MiB).
const OFFSET_MASK: u64 = !(MIB - 1);
/// The largest file offset accepted, as in qemu (offsets are signed 64-bit there).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Payload block states (MS-VHDX 2.5.1.1) that read as zeros.
const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
const PAYLOAD_BLOCK_ZERO: u64 = 2;
const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
/// UNMAPPED as the 0.95 draft of the specification numbered it; qemu reads it as zeros.
const PAYLOAD_BLOCK_UNMAPPED_V095: u64 = 5;
/// The block holds data, all of it in this file.
const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
/// Part of the block is in a parent disk: differencing disks only.
const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;

/// A payload block that holds data: `len` bytes at file offset `file` are guest bytes at
/// `guest` (`len` is the block size, less for a last block cut by the virtual size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    file: u64,
    guest: u64,
    len: u64,
}

impl Block {
    /// One past the last file byte; blocks are checked not to overflow before this is used.
    fn file_end(&self) -> u64 {
        self.file.saturating_add(self.len)
    }
}

/// Decodes the VHDX image in `job`'s stream into its output.
pub fn decode(job: &mut Job<'_>) -> Result<ImageInfo> {
    let layout = job.stream.parse_head(|view| super::parse(view))?;
    job.out.set_size(layout.virtual_size)?;
    let mut blocks = read_bat(job, &layout)?;
    let file_len = job.random.as_ref().map(|view| view.len());
    check_blocks(&layout, &mut blocks, file_len)?;
    copy_blocks(job, &blocks)?;
    Ok(layout.info())
}

/// Reads the BAT entries the disk uses and returns the blocks that hold data, in BAT order.
///
/// A BAT that ends within [`MAX_HEAD`] is read into the head, so that blocks placed before it
/// can still be replayed from there; a larger one is read with random access when there is
/// some, else forwards from the stream.
fn read_bat(job: &mut Job<'_>, layout: &Layout) -> Result<Vec<Block>> {
    // At most `bat.length` (a u32), as the parser checked that the BAT region holds them all.
    let len = layout.bat_entries().saturating_mul(BAT_ENTRY_LEN);
    let start = layout.bat.offset;
    let end = start.saturating_add(len);
    let what = "the VHDX block allocation table";
    let truncated = |at: u64| {
        err!(
            Truncated,
            "the image is truncated: it ends at byte {at}, inside {what} (bytes {start}..{end}); download it again"
        )
    };
    let mut blocks = Vec::new();
    if len == 0 {
        return Ok(blocks);
    }
    if let Ok(end_in_head) = usize::try_from(end)
        && end_in_head <= MAX_HEAD
    {
        let head = job.stream.fill_head(end_in_head)?;
        let bytes = usize::try_from(start)
            .ok()
            .and_then(|start| head.get(start..end_in_head))
            .ok_or_else(|| truncated(head.len() as u64))?;
        scan_entries(layout, 0, bytes, &mut blocks)?;
    } else if let Some(view) = &job.random {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BAT_CHUNK.min(MAX_READ) as u64) as usize;
            let bytes = view.read(start + done, n, what)?;
            scan_entries(layout, done / BAT_ENTRY_LEN, &bytes, &mut blocks)?;
            done += n as u64;
        }
    } else {
        job.stream.skip_to(start, what)?;
        let mut buf = vec![0u8; len.min(BAT_CHUNK as u64) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let bytes = &mut buf[..n];
            job.stream.read_exact(bytes, what)?;
            scan_entries(layout, done / BAT_ENTRY_LEN, bytes, &mut blocks)?;
            done += n as u64;
        }
    }
    Ok(blocks)
}

/// Adds the blocks that hold data among the BAT entries in `bytes`, the first of which is
/// entry number `first`.
fn scan_entries(layout: &Layout, first: u64, bytes: &[u8], blocks: &mut Vec<Block>) -> Result<()> {
    // After every `chunk_ratio` payload entries comes one sector bitmap entry.
    let period = layout.chunk_ratio().saturating_add(1);
    let block_size = u64::from(layout.block_size);
    for (i, raw) in bytes.chunks_exact(BAT_ENTRY_LEN as usize).enumerate() {
        let index = first + i as u64;
        if index % period == period - 1 {
            // Sector bitmaps only say which sectors a differencing disk's parent supplies.
            continue;
        }
        let mut le = [0u8; 8];
        le.copy_from_slice(raw);
        let entry = u64::from_le_bytes(le);
        // Entries come from a BAT no longer than `bat_entries()`, so the block number is
        // below `data_blocks()` and the guest offset below the virtual size.
        let number = index - index / period;
        let guest = number.saturating_mul(block_size);
        match entry & STATE_MASK {
            PAYLOAD_BLOCK_NOT_PRESENT
            | PAYLOAD_BLOCK_UNDEFINED
            | PAYLOAD_BLOCK_ZERO
            | PAYLOAD_BLOCK_UNMAPPED
            | PAYLOAD_BLOCK_UNMAPPED_V095 => {}
            PAYLOAD_BLOCK_FULLY_PRESENT => blocks.push(Block {
                file: entry & OFFSET_MASK,
                guest,
                len: block_size.min(layout.virtual_size.saturating_sub(guest)),
            }),
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                return Err(err!(
                    Unsupported,
                    "the VHDX block allocation table marks the block at guest offset {guest} as partially present, \
                     which only a differencing disk may do (its other sectors come from a parent disk); merge the \
                     disk into its parent first (Hyper-V `Merge-VHD`) and import the merged disk"
                ));
            }
            state => {
                return Err(err!(
                    Corrupt,
                    "the VHDX block allocation table gives the block at guest offset {guest} the undefined state \
                     {state}; the image is damaged, export or download it again"
                ));
            }
        }
    }
    Ok(())
}

/// Sorts `blocks` by file offset and refuses blocks that overlap the header section, the
/// log, the BAT, the metadata region or each other, lie beyond any possible file, or (when
/// `file_len` is known) beyond the end of the file.
///
/// Overlapping blocks are refused although qemu would read them: no tool writes them, and a
/// table that maps many guest blocks onto the same bytes turns a small file into a large disk.
fn check_blocks(layout: &Layout, blocks: &mut [Block], file_len: Option<u64>) -> Result<()> {
    blocks.sort_unstable_by_key(|block| block.file);
    let header = Span {
        offset: 0,
        length: HEADER_SECTION_LEN,
    };
    let regions = [
        (header, "header section"),
        (layout.log, "log region"),
        (layout.bat, "block allocation table"),
        (layout.metadata, "metadata region"),
    ];
    let mut previous: Option<&Block> = None;
    for block in blocks.iter() {
        let Some(end) = block
            .file
            .checked_add(block.len)
            .filter(|&end| end <= MAX_FILE_OFFSET)
        else {
            return Err(err!(
                OutOfBounds,
                "the VHDX block allocation table places the block at guest offset {} at file offset {}, beyond \
                 any possible image; the image is damaged or hostile",
                block.guest,
                block.file
            ));
        };
        for (region, name) in regions {
            if region.length > 0 && block.file < region.end() && region.offset < end {
                return Err(err!(
                    Corrupt,
                    "the VHDX block allocation table places the block at guest offset {} at file bytes {}..{end}, \
                     inside the {name} (bytes {}..{}); the image is damaged, export or download it again",
                    block.guest,
                    block.file,
                    region.offset,
                    region.end()
                ));
            }
        }
        if let Some(len) = file_len
            && end > len
        {
            return Err(err!(
                Truncated,
                "the VHDX block at guest offset {} lies at file bytes {}..{end}, beyond the end of the image at \
                 byte {len}; the image is truncated, download it again",
                block.guest,
                block.file
            ));
        }
        if let Some(previous) = previous
            && block.file < previous.file_end()
        {
            return Err(err!(
                Corrupt,
                "the VHDX block allocation table places the blocks at guest offsets {} and {} on the same file \
                 bytes ({}..{} and {}..{end}); the image is damaged, export or download it again",
                previous.guest,
                block.guest,
                previous.file,
                previous.file_end(),
                block.file
            ));
        }
        previous = Some(block);
    }
    Ok(())
}

/// Copies the blocks (sorted by file offset, not overlapping) to their guest offsets,
/// joining blocks that follow each other both in the file and on the guest disk into one run.
fn copy_blocks(job: &mut Job<'_>, blocks: &[Block]) -> Result<()> {
    let mut buf = PageBuf::default();
    let mut rest = blocks.iter();
    let Some(&first) = rest.next() else {
        return Ok(());
    };
    let mut run = first;
    for block in rest {
        if block.file == run.file_end() && Some(block.guest) == run.guest.checked_add(run.len) {
            run.len += block.len;
        } else {
            copy_run(job, run, &mut buf)?;
            run = *block;
        }
    }
    copy_run(job, run, &mut buf)
}

/// Copies one run of file bytes to its guest offset: from the stream when it lies ahead,
/// through random access when the stream has passed it.
fn copy_run(job: &mut Job<'_>, run: Block, buf: &mut PageBuf) -> Result<()> {
    let Block {
        mut file,
        mut guest,
        mut len,
    } = run;
    let what = || {
        format!(
            "the VHDX payload data for guest bytes {}..{}",
            run.guest,
            run.guest + run.len
        )
    };
    let pos = job.stream.pos();
    if file < pos {
        let behind = (pos - file).min(len);
        let Some(view) = &job.random else {
            return Err(err!(
                NeedsRandomAccess,
                "{} lies at file byte {file}, before the block allocation table that a single pass over the \
                 stream had to read first (now at byte {pos}); give the uncompressed file itself (random access) \
                 instead of a stream",
                what()
            ));
        };
        let what = what();
        let mut done = 0u64;
        while done < behind {
            let n = (behind - done).min(MAX_READ as u64) as usize;
            let data = view.read(file + done, n, &what)?;
            job.out.write(guest + done, &data)?;
            done += n as u64;
        }
        file += behind;
        guest += behind;
        len -= behind;
    }
    if len == 0 {
        return Ok(());
    }
    let what = what();
    job.stream.skip_to(file, &what)?;
    buf.ensure(COPY_CHUNK);
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        let data = &mut buf[..n];
        job.stream.read_exact(data, &what)?;
        job.out.write(guest, data)?;
        guest += n as u64;
        len -= n as u64;
        // Once past the head (the header section, BAT and metadata) its memory can go.
        job.stream.release_head();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::sink::MemorySink;
    use crate::vhdx::tests::{BAT, FILE_LEN, Spec, put_u64};
    use std::io::Write;

    const BLOCK: usize = 1 << 20;

    /// A dynamic image with 1 MiB blocks and `size` bytes whose BAT holds `entries` (entry
    /// index, raw value); `data` is appended after the 4 MiB of headers and regions.
    fn image(size: u64, entries: &[(usize, u64)], data: &[u8]) -> Vec<u8> {
        let mut img = Spec {
            block_size: BLOCK as u32,
            ..Spec::dynamic(size)
        }
        .build();
        for &(index, value) in entries {
            put_u64(&mut img, BAT + 8 * index, value);
        }
        img.extend_from_slice(data);
        img
    }

    /// A present entry for the block at file offset `mib` MiB.
    fn present(mib: u64) -> u64 {
        (mib << 20) | PAYLOAD_BLOCK_FULLY_PRESENT
    }

    /// One MiB filled with `byte`.
    fn fill(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK]
    }

    /// Decodes `img` as a stream (and, when `file` is set, from a file with random access).
    fn run(img: &[u8], file: bool) -> Result<(ImageInfo, Vec<u8>)> {
        let sink = MemorySink::new(1 << 30);
        let random = if file {
            let mut tmp = tempfile::tempfile().map_err(|e| crate::Error::io("temp file", e))?;
            tmp.write_all(img)
                .map_err(|e| crate::Error::io("temp file", e))?;
            Some(Box::new(crate::FileView::new(tmp, img.len() as u64)) as crate::RandomAccess)
        } else {
            None
        };
        let decoded = crate::decode::decode(
            Box::new(std::io::Cursor::new(img.to_vec())),
            random,
            &sink,
            &crate::Options::default(),
        )?;
        Ok((decoded.info, sink.contents()))
    }

    /// Asserts that both a stream and a file refuse `img` with `kind`, mentioning `needle`.
    #[track_caller]
    fn assert_refused(img: &[u8], kind: ErrorKind, needle: &str) {
        for file in [false, true] {
            match run(img, file) {
                Ok(_) => panic!("expected a {kind:?} refusal mentioning {needle:?} (file: {file})"),
                Err(e) => {
                    assert_eq!(e.kind(), kind, "{e} (file: {file})");
                    assert!(e.message().contains(needle), "{e} (file: {file})");
                }
            }
        }
    }

    #[test]
    fn present_blocks_are_copied_to_their_guest_offsets_whatever_their_file_order() -> Result<()> {
        // Guest blocks 3, 0 and 1 stored in that order; 1 follows 0 in both file and guest.
        let mut data = fill(0x33);
        data.extend(fill(0xa0));
        data.extend(fill(0xa1));
        let entries = [(3, present(4)), (0, present(5)), (1, present(6)), (2, 2)];
        let img = image(5 << 20, &entries, &data);
        for file in [false, true] {
            let (info, disk) = run(&img, file)?;
            assert_eq!(info, crate::vhdx::probe(&crate::SliceView(&img))?);
            assert_eq!(disk.len(), 5 << 20);
            assert!(disk[..BLOCK].iter().all(|&b| b == 0xa0));
            assert!(disk[BLOCK..2 * BLOCK].iter().all(|&b| b == 0xa1));
            assert!(disk[2 * BLOCK..3 * BLOCK].iter().all(|&b| b == 0));
            assert!(disk[3 * BLOCK..4 * BLOCK].iter().all(|&b| b == 0x33));
            assert!(disk[4 * BLOCK..].iter().all(|&b| b == 0));
        }
        Ok(())
    }

    #[test]
    fn zero_like_states_write_nothing_even_with_an_offset() -> Result<()> {
        let states = [0, 1, 2, 3, 5];
        let entries: Vec<(usize, u64)> = states
            .iter()
            .enumerate()
            .map(|(i, &state)| (i, ((4 + i as u64) << 20) | state))
            .collect();
        let data = fill(0x77).repeat(states.len());
        let img = image(5 << 20, &entries, &data);
        let (_, disk) = run(&img, false)?;
        assert!(disk.iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn the_last_block_is_cut_at_the_virtual_size_and_may_end_the_file_early() -> Result<()> {
        // 1.5 MiB disk: block 1 holds only 512 KiB of guest data, and the file ends there.
        let mut data = fill(0x10);
        data.extend(vec![0x11; BLOCK / 2]);
        let img = image(3 << 19, &[(0, present(4)), (1, present(5))], &data);
        for file in [false, true] {
            let (_, disk) = run(&img, file)?;
            assert_eq!(disk.len(), 3 << 19);
            assert!(disk[..BLOCK].iter().all(|&b| b == 0x10));
            assert!(disk[BLOCK..].iter().all(|&b| b == 0x11));
        }
        Ok(())
    }

    #[test]
    fn sector_bitmap_entries_are_skipped_when_mapping_blocks() -> Result<()> {
        // With 1 MiB blocks and 512-byte sectors a chunk is 4096 blocks: entry 4096 is a sector
        // bitmap and entry 4097 maps guest block 4096. (Scanned directly: decoding a 4 GiB disk
        // into memory would take 4 GiB.)
        let img = image(4098 << 20, &[], &[]);
        let layout = crate::vhdx::parse(&crate::SliceView(&img))?;
        assert_eq!(layout.bat_entries(), 4099);
        let mut bat = vec![0u8; 4099 * 8];
        for (index, mib) in [(4095, 4), (4096, 5), (4097, 6), (4098, 7)] {
            bat[index * 8..index * 8 + 8].copy_from_slice(&present(mib).to_le_bytes());
        }
        let mut blocks = Vec::new();
        // In two pieces, as a BAT read in chunks arrives.
        scan_entries(&layout, 0, &bat[..4096 * 8], &mut blocks)?;
        scan_entries(&layout, 4096, &bat[4096 * 8..], &mut blocks)?;
        let mapped: Vec<(u64, u64)> = blocks
            .iter()
            .map(|b| (b.file >> 20, b.guest >> 20))
            .collect();
        assert_eq!(mapped, [(4, 4095), (6, 4096), (7, 4097)]);
        Ok(())
    }

    #[test]
    fn a_partially_present_block_is_refused_as_differencing() {
        let img = image(2 << 20, &[(0, (4 << 20) | 7)], &fill(1));
        assert_refused(&img, ErrorKind::Unsupported, "partially present");
    }

    #[test]
    fn the_undefined_state_four_is_refused() {
        let img = image(2 << 20, &[(1, (4 << 20) | 4)], &fill(1));
        assert_refused(&img, ErrorKind::Corrupt, "state 4");
    }

    #[test]
    fn blocks_inside_the_headers_bat_or_metadata_are_refused() {
        for (mib, needle) in [
            (0, "header section"),
            (1, "log region"),
            (2, "block allocation table"),
            (3, "metadata region"),
        ] {
            let img = image(2 << 20, &[(0, present(mib))], &fill(1));
            assert_refused(&img, ErrorKind::Corrupt, needle);
        }
    }

    #[test]
    fn blocks_beyond_the_end_of_the_file_are_refused() {
        let img = image(2 << 20, &[(0, present(4)), (1, present(9))], &fill(1));
        assert_refused(&img, ErrorKind::Truncated, "truncated");
        // A block cut short by the end of the file.
        let img = image(2 << 20, &[(0, present(4))], &fill(1)[..1000]);
        assert_refused(&img, ErrorKind::Truncated, "truncated");
    }

    #[test]
    fn blocks_beyond_any_possible_file_are_refused() {
        let img = image(2 << 20, &[(0, !1)], &fill(1));
        assert_refused(&img, ErrorKind::OutOfBounds, "beyond any possible image");
        let img = image(2 << 20, &[(0, present(1 << 43))], &fill(1));
        assert_refused(&img, ErrorKind::OutOfBounds, "beyond any possible image");
    }

    #[test]
    fn two_blocks_on_the_same_file_bytes_are_refused() {
        let img = image(2 << 20, &[(0, present(4)), (1, present(4))], &fill(1));
        assert_refused(&img, ErrorKind::Corrupt, "same file bytes");
    }

    #[test]
    fn an_image_cut_inside_its_bat_is_refused_as_truncated() {
        let img = image(2 << 20, &[], &[]);
        assert_refused(&img[..BAT + 4], ErrorKind::Truncated, "truncated");
    }

    #[test]
    fn an_empty_disk_decodes_to_nothing() -> Result<()> {
        let img = image(0, &[], &[]);
        let (info, disk) = run(&img, false)?;
        assert_eq!((info.virtual_size, disk.len()), (0, 0));
        Ok(())
    }

    #[test]
    fn blocks_before_a_bat_beyond_the_head_need_random_access() -> Result<()> {
        // Move the BAT past what the head keeps, with a block between the metadata and it.
        let mut img = image(2 << 20, &[], &fill(0x42));
        let bat_at = MAX_HEAD + (1 << 20);
        img.resize(bat_at + (1 << 20), 0);
        put_u64(&mut img, bat_at, present(4));
        let region_entry = (192 << 10) + 16;
        put_u64(&mut img, region_entry + 16, bat_at as u64);
        crate::vhdx::tests::seal(&mut img);
        let stream = run(&img, false).err().map(|e| e.kind());
        assert_eq!(stream, Some(ErrorKind::NeedsRandomAccess));
        let (_, disk) = run(&img, true)?;
        assert!(disk[..BLOCK].iter().all(|&b| b == 0x42));
        assert!(disk[BLOCK..].iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn decoding_never_panics_on_single_byte_bat_corruptions() {
        let mut data = fill(0x10);
        data.extend(fill(0x20));
        let original = image(2 << 20, &[(0, present(5)), (1, present(4))], &data);
        let mut img = original.clone();
        for at in BAT..BAT + 16 {
            for value in [0x01, 0x07, 0x10, 0x80, 0xff] {
                img[at] = original[at] ^ value;
                let _ = run(&img, false);
                img[at] = original[at];
            }
        }
        assert_eq!(img.len(), FILE_LEN + 2 * BLOCK);
    }
}
