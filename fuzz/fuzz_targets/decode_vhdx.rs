//! Fuzzes the single-pass VHDX decoder: errors are fine, panics and unbounded allocations
//! are not. Arbitrary bytes would almost never get past the checksummed headers and region
//! table, so the input is spread over a valid skeleton instead: the first byte picks the
//! block and sector size, the next eight the virtual size, the next 2 KiB are the start of
//! the block allocation table (states and offsets as the fuzzer likes) and the rest is the
//! payload area after the metadata.
#![no_main]

use std::io::Cursor;

use dvcr_formats::decode::{Options, decode};
use dvcr_formats::sink::MemorySink;
use dvcr_formats::vhdx::{FILE_IDENTIFIER, checksum, guid};

const MIB: usize = 1 << 20;
/// Region layout of the skeleton: header section, BAT, metadata, then payload.
const BAT: usize = MIB;
const METADATA: usize = 2 * MIB;
const PAYLOAD: usize = 3 * MIB;
/// BAT bytes taken from the input.
const BAT_BYTES: usize = 2048;

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Writes the checksum of the `len` bytes at `at` into their bytes 4..8.
fn seal(image: &mut [u8], at: usize, len: usize) {
    let sum = checksum(&image[at..at + len]);
    put(image, at + 4, &sum.to_le_bytes());
}

fn skeleton(data: &[u8]) -> Vec<u8> {
    let (&shape, rest) = data.split_first().unwrap_or((&0, &[]));
    let (size, rest) = rest.split_at(rest.len().min(8));
    let (bat, payload) = rest.split_at(rest.len().min(BAT_BYTES));
    let mut size_le = [0u8; 8];
    size_le[..size.len()].copy_from_slice(size);
    // Up to 96 MiB, so that some disks are refused by the 64 MiB sink and most are not.
    let virtual_size = u64::from_le_bytes(size_le) % (96 << 20);
    let block_size = (MIB as u32) << ((shape & 0x0f) % 9);
    let logical: u32 = if shape & 0x80 != 0 { 4096 } else { 512 };
    let virtual_size = virtual_size / u64::from(logical) * u64::from(logical);

    let mut image = vec![0u8; PAYLOAD + payload.len()];
    put(&mut image, 0, FILE_IDENTIFIER);
    for (at, sequence) in [(64 << 10, 1u64), (128 << 10, 2)] {
        put(&mut image, at, b"head");
        put(&mut image, at + 8, &sequence.to_le_bytes());
        put(&mut image, at + 66, &1u16.to_le_bytes());
        seal(&mut image, at, 4 << 10);
    }
    let region_table = 192 << 10;
    put(&mut image, region_table, b"regi");
    put(&mut image, region_table + 8, &2u32.to_le_bytes());
    for (i, (id, offset)) in [(guid::BAT, BAT), (guid::METADATA, METADATA)]
        .into_iter()
        .enumerate()
    {
        let at = region_table + 16 + 32 * i;
        put(&mut image, at, &id.0);
        put(&mut image, at + 16, &(offset as u64).to_le_bytes());
        put(&mut image, at + 24, &(MIB as u32).to_le_bytes());
        put(&mut image, at + 28, &1u32.to_le_bytes());
    }
    seal(&mut image, region_table, 64 << 10);

    put(&mut image, METADATA, b"metadata");
    put(&mut image, METADATA + 10, &5u16.to_le_bytes());
    let items = [
        (guid::FILE_PARAMETERS, 0u32, 8u32),
        (guid::VIRTUAL_DISK_SIZE, 8, 8),
        (guid::PAGE_83_DATA, 16, 16),
        (guid::LOGICAL_SECTOR_SIZE, 32, 4),
        (guid::PHYSICAL_SECTOR_SIZE, 36, 4),
    ];
    for (i, (id, offset, length)) in items.into_iter().enumerate() {
        let at = METADATA + 32 + 32 * i;
        put(&mut image, at, &id.0);
        put(&mut image, at + 16, &((64 << 10) + offset).to_le_bytes());
        put(&mut image, at + 20, &length.to_le_bytes());
    }
    let values = METADATA + (64 << 10);
    put(&mut image, values, &block_size.to_le_bytes());
    put(&mut image, values + 8, &virtual_size.to_le_bytes());
    put(&mut image, values + 32, &logical.to_le_bytes());
    put(&mut image, values + 36, &4096u32.to_le_bytes());

    put(&mut image, BAT, bat);
    put(&mut image, PAYLOAD, payload);
    image
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let sink = MemorySink::new(64 << 20);
    let _ = decode(
        Box::new(Cursor::new(skeleton(data))),
        None,
        &sink,
        &Options::default(),
    );
});
