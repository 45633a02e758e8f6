//! Target writers: where decoded guest data lands.
//!
//! - [`DiskWriter`] writes a raw disk: a regular file (created empty, set to the virtual size
//!   so that everything not written is a hole, only non-zero blocks written) or a block
//!   device (written in place; ranges the image does not fill are zeroed at the end with
//!   `BLKZEROOUT`, unless the caller says the device already reads zero).
//! - [`qcow2::Qcow2Writer`] writes a qcow2 file, for filesystem volumes that prefer it.
//!
//! Both are [`Sink`]s and take positional writes from several threads. Both grow the disk to
//! a requested size larger than the image's and refuse a smaller one, and both `fsync`
//! before their `finish` reports success: a caller that reports a disk ready only after
//! `finish` returned never reports unflushed data. File targets are written under a
//! temporary name beside the target and renamed over it only then, so a failed or
//! interrupted conversion never leaves something that looks like a finished disk.

pub mod qcow2;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, err};
use crate::sink::{Sink, is_zero};

/// Zero detection granularity: a block of this size that is all zeros is not written.
pub const ZERO_BLOCK: usize = 4096;

/// How to open a target.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetOptions {
    /// Make the disk this many bytes (at least the image's virtual size).
    pub size: Option<u64>,
    /// A block device target already reads zero everywhere (a fresh thin LV, a device just
    /// discarded with a guarantee): skip zeroing what the image does not fill.
    pub target_is_zero: bool,
}

/// What a finished write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Written {
    /// The disk's final size in bytes.
    pub disk_size: u64,
    /// Bytes actually written (non-zero blocks, plus metadata for qcow2 targets).
    pub bytes_written: u64,
    /// Bytes zeroed on a block device.
    pub bytes_zeroed: u64,
}

/// The kind of a raw target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A regular file we created: it reads zero wherever nothing was written.
    File,
    /// A block device (or an existing file treated like one): may hold old data.
    Device { capacity: u64 },
}

/// A raw disk target: a sparse file or a block device. See the module docs.
#[derive(Debug)]
pub struct DiskWriter {
    file: File,
    path: PathBuf,
    kind: Kind,
    opts: TargetOptions,
    /// The image's virtual size, once declared.
    size: Mutex<Option<u64>>,
    /// Non-zero ranges written, when the target has to be zeroed elsewhere at the end.
    covered: Option<Mutex<Coverage>>,
    written: AtomicU64,
    /// A file target is written under a temporary name beside `path` and renamed over it
    /// only when complete; dropped unfinished, it is removed.
    partial: Option<tempfile::TempPath>,
}

impl DiskWriter {
    /// Opens `path` as a target: a block device is written in place; anything else is
    /// created (or truncated) as a regular sparse file.
    pub fn create(path: &Path, opts: TargetOptions) -> Result<Self> {
        let shown = path.display();
        let is_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_device {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io(format!("opening the block device {shown}"), e))?;
            let capacity = file
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io(format!("measuring the block device {shown}"), e))?;
            return Ok(Self::with_kind(file, path, Kind::Device { capacity }, opts));
        }
        let (file, partial) = create_partial(path)?;
        let mut writer = Self::with_kind(file, path, Kind::File, opts);
        writer.partial = Some(partial);
        Ok(writer)
    }

    /// Opens an existing regular file as if it were a block device of its current length:
    /// written in place, with old contents zeroed where the image has none. For testing the
    /// device path without a device, and for preallocated disk images.
    pub fn open_in_place(path: &Path, opts: TargetOptions) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let capacity = file
            .metadata()
            .map_err(|e| Error::io(format!("measuring {}", path.display()), e))?
            .len();
        Ok(Self::with_kind(file, path, Kind::Device { capacity }, opts))
    }

    fn with_kind(file: File, path: &Path, kind: Kind, opts: TargetOptions) -> Self {
        let needs_zeroing = matches!(kind, Kind::Device { .. }) && !opts.target_is_zero;
        Self {
            file,
            path: path.to_path_buf(),
            kind,
            opts,
            size: Mutex::new(None),
            covered: needs_zeroing.then(|| Mutex::new(Coverage::default())),
            written: AtomicU64::new(0),
            partial: None,
        }
    }

    /// The final disk size: the requested size, or the image's.
    fn disk_size(&self) -> Result<u64> {
        let size = *self
            .size
            .lock()
            .map_err(|_| err!(Io, "a writer thread failed"))?;
        match (size, self.opts.size) {
            (_, Some(requested)) => Ok(requested),
            (Some(size), None) => Ok(size),
            (None, None) => Err(err!(
                InvalidFormat,
                "the image never declared its size; nothing was written"
            )),
        }
    }

    /// Zeroes what needs it, sets the final length, and flushes everything to stable
    /// storage. Only after this returns is the disk complete.
    pub fn finish(self) -> Result<Written> {
        let disk_size = self.disk_size()?;
        let shown = self.path.display();
        let mut zeroed = 0;
        match self.kind {
            Kind::File => {
                self.file
                    .set_len(disk_size)
                    .map_err(|e| Error::io(format!("setting the size of {shown}"), e))?;
            }
            Kind::Device { .. } => {
                if let Some(covered) = &self.covered {
                    let covered = covered
                        .lock()
                        .map_err(|_| err!(Io, "a writer thread failed"))?;
                    for (start, end) in covered.gaps(disk_size) {
                        zero_range(&self.file, start, end - start)
                            .map_err(|e| Error::io(format!("zeroing {shown}"), e))?;
                        zeroed += end - start;
                    }
                }
            }
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("flushing {shown} to stable storage"), e))?;
        if let Some(partial) = self.partial {
            publish(partial, &self.path)?;
        }
        Ok(Written {
            disk_size,
            bytes_written: self.written.load(Ordering::Relaxed),
            bytes_zeroed: zeroed,
        })
    }
}

impl Sink for DiskWriter {
    fn set_size(&self, size: u64) -> Result<()> {
        check_requested_size(size, self.opts.size)?;
        let disk = self.opts.size.unwrap_or(size);
        match self.kind {
            Kind::Device { capacity } if capacity < disk => {
                return Err(err!(
                    OutOfBounds,
                    "the disk needs {disk} bytes but {} holds only {capacity}; give a larger volume",
                    self.path.display()
                ));
            }
            Kind::Device { .. } => {}
            Kind::File => self.file.set_len(disk).map_err(|e| {
                Error::io(format!("setting the size of {}", self.path.display()), e)
            })?,
        }
        *self
            .size
            .lock()
            .map_err(|_| err!(Io, "a writer thread failed"))? = Some(size);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        // Split at ZERO_BLOCK boundaries of the guest disk; write each run of non-zero
        // blocks with one positional write.
        let mut pos = 0usize;
        let mut run_start: Option<usize> = None;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let to_boundary = ZERO_BLOCK - (guest % ZERO_BLOCK as u64) as usize;
            let end = (pos + to_boundary).min(data.len());
            let zero = is_zero(&data[pos..end]);
            match (zero, run_start) {
                (true, Some(start)) => {
                    self.write_run(offset + start as u64, &data[start..pos])?;
                    run_start = None;
                }
                (false, None) => run_start = Some(pos),
                _ => {}
            }
            pos = end;
        }
        if let Some(start) = run_start {
            self.write_run(offset + start as u64, &data[start..])?;
        }
        Ok(())
    }
}

impl DiskWriter {
    fn write_run(&self, offset: u64, data: &[u8]) -> Result<()> {
        if let Kind::Device { capacity } = self.kind
            && offset + data.len() as u64 > capacity
        {
            return Err(err!(
                OutOfBounds,
                "the image writes past the end of {} ({capacity} bytes); give a larger volume",
                self.path.display()
            ));
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        let before = self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        write_back_as_written(&self.file, before, before + data.len() as u64);
        if let Some(covered) = &self.covered {
            covered
                .lock()
                .map_err(|_| err!(Io, "a writer thread failed"))?
                .add(offset, offset + data.len() as u64);
        }
        Ok(())
    }
}

/// Bytes written between two nudges to the kernel to start writing dirty pages back.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Call after each write to a file that will be fsynced at the end (a disk, a blob), with
/// the bytes written to it before and after the write: every [`WRITEBACK_EVERY`] bytes it
/// starts writing back what is dirty, without waiting. The disk then works while the data
/// still arrives, so the final `fsync` has little left to do and dirty memory stays
/// bounded. Only a hint (a no-op on tmpfs): failures are ignored.
pub fn write_back_as_written(file: &File, before: u64, after: u64) {
    if before / WRITEBACK_EVERY == after / WRITEBACK_EVERY {
        return;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes plain integers; the descriptor is owned by `file`.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Creates a temporary file beside `path`, for a target that must not be visible under its
/// name before it is complete.
pub fn create_partial(path: &Path) -> Result<(File, tempfile::TempPath)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a file in {}", dir.display()), e))?;
    Ok(temp.into_parts())
}

/// Renames a complete temporary file over `path` and makes the rename durable.
pub fn publish(partial: tempfile::TempPath, path: &Path) -> Result<()> {
    partial.persist(path).map_err(|e| {
        Error::io(
            format!("renaming the finished disk to {}", path.display()),
            e.error,
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The rename is only durable once the directory is flushed too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("flushing the directory {}", dir.display()), e))
}

/// Refuses a requested disk size smaller than the image.
pub fn check_requested_size(virtual_size: u64, requested: Option<u64>) -> Result<()> {
    match requested {
        Some(requested) if requested < virtual_size => Err(err!(
            OutOfBounds,
            "the requested disk size {requested} bytes is smaller than the image's virtual size of \
             {virtual_size} bytes; ask for at least {virtual_size} bytes (shrinking would cut off data)"
        )),
        _ => Ok(()),
    }
}

/// Makes `len` bytes at `offset` read zero: `BLKZEROOUT` on a block device, a zero-range
/// fallocate on a file, and plain zero writes where neither is supported.
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads a `[u64; 2]` (start, length) from the pointer, which points to
    // a live local array; on a descriptor that is not a block device it fails with ENOTTY.
    let r = unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    if let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) {
        // SAFETY: fallocate takes plain integers; the descriptor is owned by `file`.
        let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, off, l) };
        if r == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Ranges written so far, merged: what is left over at the end must be zeroed.
#[derive(Debug, Default)]
struct Coverage {
    /// start -> end, non-overlapping, non-adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl Coverage {
    fn add(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.ranges.remove(&s);
        }
        // Merge with ranges that start inside [start, end].
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// The ranges in `0..size` not covered.
    fn gaps(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for (&s, &e) in &self.ranges {
            if s >= size {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < size {
            out.push((at, size));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn coverage_merges_overlapping_and_adjacent_ranges_and_reports_the_gaps() {
        let mut c = Coverage::default();
        c.add(100, 200);
        c.add(300, 400);
        c.add(200, 250);
        c.add(50, 120);
        c.add(390, 500);
        assert_eq!(c.ranges.len(), 2);
        assert_eq!(c.gaps(600), vec![(0, 50), (250, 300), (500, 600)]);
        assert_eq!(c.gaps(80), vec![(0, 50)]);
    }

    #[test]
    fn a_file_target_is_sparse_and_only_non_zero_blocks_are_written() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let path = dir.path().join("disk.img");
        let w = DiskWriter::create(&path, TargetOptions::default());
        let Ok(w) = w else {
            panic!("cannot create a target")
        };
        assert!(w.set_size(1 << 20).is_ok());
        let mut data = vec![0u8; 3 * ZERO_BLOCK];
        data[ZERO_BLOCK + 5] = 9;
        assert!(w.write_at(8192, &data).is_ok());
        let done = w.finish().ok();
        assert_eq!(
            done.map(|d| (d.disk_size, d.bytes_written)),
            Some((1 << 20, ZERO_BLOCK as u64))
        );
        let disk = std::fs::read(&path).unwrap_or_default();
        assert_eq!(disk.len(), 1 << 20);
        assert_eq!(disk[8192 + ZERO_BLOCK + 5], 9);
        assert_eq!(disk.iter().filter(|&&b| b != 0).count(), 1);
    }

    #[test]
    fn a_file_target_appears_under_its_name_only_when_finished() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let path = dir.path().join("disk.img");
        assert!(std::fs::write(&path, b"old contents").is_ok());
        let w = DiskWriter::create(&path, TargetOptions::default());
        let Ok(w) = w else { panic!("create") };
        assert!(w.set_size(4096).is_ok());
        assert!(w.write_at(0, &[5u8; 4096]).is_ok());
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(&b"old contents"[..])
        );
        drop(w);
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(&b"old contents"[..])
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).map(|d| d.count()).ok(),
            Some(1),
            "the unfinished file is removed"
        );
        let w = DiskWriter::create(&path, TargetOptions::default());
        let Ok(w) = w else { panic!("create") };
        assert!(w.set_size(4096).is_ok());
        assert!(w.write_at(0, &[5u8; 4096]).is_ok());
        assert!(w.finish().is_ok());
        assert_eq!(std::fs::read(&path).ok(), Some(vec![5u8; 4096]));
    }

    #[test]
    fn an_in_place_target_has_old_data_zeroed_where_the_image_has_none() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let path = dir.path().join("dev.img");
        assert!(std::fs::write(&path, vec![0xeeu8; 1 << 20]).is_ok());
        let w = DiskWriter::open_in_place(&path, TargetOptions::default());
        let Ok(w) = w else { panic!("open") };
        assert!(w.set_size(512 << 10).is_ok());
        assert!(w.write_at(4096, &[7u8; 4096]).is_ok());
        assert!(w.write_at(65536, &[0u8; 4096]).is_ok());
        let done = w.finish().ok();
        assert_eq!(done.map(|d| d.bytes_zeroed), Some((512 << 10) - 4096));
        let disk = std::fs::read(&path).unwrap_or_default();
        assert!(disk[..4096].iter().all(|&b| b == 0));
        assert!(disk[4096..8192].iter().all(|&b| b == 7));
        assert!(disk[8192..512 << 10].iter().all(|&b| b == 0));
        assert!(
            disk[512 << 10..].iter().all(|&b| b == 0xee),
            "beyond the disk stays"
        );
    }

    #[test]
    fn a_requested_size_smaller_than_the_image_is_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let opts = TargetOptions {
            size: Some(1000),
            ..TargetOptions::default()
        };
        let w = DiskWriter::create(&dir.path().join("d"), opts);
        let kind = w
            .ok()
            .and_then(|w| w.set_size(4096).err())
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
    }

    #[test]
    fn a_device_smaller_than_the_disk_is_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let path = dir.path().join("small");
        assert!(std::fs::write(&path, vec![0u8; 4096]).is_ok());
        let w = DiskWriter::open_in_place(&path, TargetOptions::default());
        let kind = w
            .ok()
            .and_then(|w| w.set_size(8192).err())
            .map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::OutOfBounds));
    }
}
