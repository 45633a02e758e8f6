//! Bytes of a stream whose role is not known yet, kept until a later table says what they are.
//!
//! A single pass over a qcow2 image can meet a data cluster before the L2 table that maps it
//! (compressed images written by `qemu-img convert -c`, images after `qemu-img resize`, L2
//! tables copied on write after a snapshot). Such bytes are kept here, by their offset in the
//! image, in memory up to a bound and then in an unlinked scratch file, so memory stays
//! bounded whatever the image. Readers copy ranges out; [`Pending::clear`] forgets everything
//! once no table can still claim them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

#[derive(Debug)]
enum Place {
    Memory(Vec<u8>),
    /// Offset in the scratch file.
    Scratch(u64),
}

#[derive(Debug)]
struct Entry {
    len: usize,
    place: Place,
}

/// See the module docs.
#[derive(Debug)]
pub struct Pending {
    entries: BTreeMap<u64, Entry>,
    memory: usize,
    memory_limit: usize,
    scratch_dir: Option<PathBuf>,
    scratch: Option<File>,
    scratch_len: u64,
    /// Over the memory limit, drop bytes instead of spilling them (the caller can read them
    /// again by random access).
    discard: bool,
}

impl Pending {
    /// A store that keeps up to `memory_limit` bytes in memory and spills the rest to an
    /// unlinked file in `scratch_dir` (the system temp dir when `None`).
    pub fn new(memory_limit: usize, scratch_dir: Option<PathBuf>) -> Self {
        Self {
            entries: BTreeMap::new(),
            memory: 0,
            memory_limit,
            scratch_dir,
            scratch: None,
            scratch_len: 0,
            discard: false,
        }
    }

    /// Over the memory limit, forget bytes instead of spilling them to scratch: for callers
    /// that can read them again by random access.
    #[must_use]
    pub fn discarding_over_limit(mut self, discard: bool) -> Self {
        self.discard = discard;
        self
    }

    /// Bytes written to scratch so far.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_len
    }

    /// Bytes held in memory now.
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// Keeps `data`, the image's bytes at `offset`. Ranges must not overlap earlier ones.
    pub fn put(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let place = if self.memory + data.len() <= self.memory_limit {
            self.memory += data.len();
            Place::Memory(data.to_vec())
        } else if self.discard {
            return Ok(());
        } else {
            let at = self.scratch_len;
            self.scratch_file()?
                .write_all_at(data, at)
                .map_err(|e| Error::io("writing to the scratch file", e))?;
            self.scratch_len += data.len() as u64;
            Place::Scratch(at)
        };
        self.entries.insert(
            offset,
            Entry {
                len: data.len(),
                place,
            },
        );
        Ok(())
    }

    fn scratch_file(&mut self) -> Result<&File> {
        if self.scratch.is_none() {
            let file = match &self.scratch_dir {
                Some(dir) => tempfile::tempfile_in(dir),
                None => tempfile::tempfile(),
            }
            .map_err(|e| {
                Error::io(
                    "creating a scratch file (set --scratch-dir to a directory with room)",
                    e,
                )
            })?;
            self.scratch = Some(file);
        }
        self.scratch
            .as_ref()
            .ok_or_else(|| crate::error::err!(Io, "no scratch file"))
    }

    /// Copies the image's bytes `offset..offset+len` into `out` if every one of them is kept;
    /// `Ok(false)` when some are not.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<bool> {
        let end = offset + out.len() as u64;
        let mut at = offset;
        // The entry that starts at or before `offset`, then the ones after it.
        let first = self
            .entries
            .range(..=offset)
            .next_back()
            .map(|(&k, _)| k)
            .unwrap_or(offset);
        for (&start, entry) in self.entries.range(first..end) {
            let entry_end = start + entry.len as u64;
            if entry_end <= at {
                continue;
            }
            if start > at {
                return Ok(false);
            }
            let from = (at - start) as usize;
            let take = (entry_end.min(end) - at) as usize;
            let dst = &mut out[(at - offset) as usize..(at - offset) as usize + take];
            match &entry.place {
                Place::Memory(bytes) => dst.copy_from_slice(&bytes[from..from + take]),
                Place::Scratch(file_at) => {
                    let file = self
                        .scratch
                        .as_ref()
                        .ok_or_else(|| crate::error::err!(Io, "the scratch file is gone"))?;
                    file.read_exact_at(dst, file_at + from as u64)
                        .map_err(|e| Error::io("reading the scratch file", e))?;
                }
            }
            at += take as u64;
            if at == end {
                return Ok(true);
            }
        }
        Ok(at == end)
    }

    /// The longest run of kept bytes starting at `offset`, at most `max` of them (empty when
    /// the byte at `offset` is not kept).
    pub fn read_prefix(&self, offset: u64, max: usize) -> Result<Vec<u8>> {
        let mut len = 0u64;
        let mut at = offset;
        let end = offset + max as u64;
        let first = self
            .entries
            .range(..=offset)
            .next_back()
            .map(|(&k, _)| k)
            .unwrap_or(offset);
        for (&start, entry) in self.entries.range(first..end) {
            let entry_end = start + entry.len as u64;
            if entry_end <= at {
                continue;
            }
            if start > at {
                break;
            }
            at = entry_end.min(end);
            len = at - offset;
            if at == end {
                break;
            }
        }
        let mut out = vec![0u8; len as usize];
        if len > 0 && !self.read(offset, &mut out)? {
            return Ok(Vec::new());
        }
        Ok(out)
    }

    /// Forgets the entries that lie wholly inside `offset..offset+len` (data that was used
    /// and cannot be needed again).
    pub fn forget(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let inside: Vec<u64> = self
            .entries
            .range(offset..end)
            .filter(|(k, e)| *k + e.len as u64 <= end)
            .map(|(&k, _)| k)
            .collect();
        for k in inside {
            if let Some(Entry {
                place: Place::Memory(bytes),
                ..
            }) = self.entries.remove(&k)
            {
                self.memory -= bytes.len();
            }
        }
    }

    /// Forgets everything (the scratch file is unlinked already and goes with its handle).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.memory = 0;
        self.scratch = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_back_across_entries_in_memory_and_in_scratch() {
        let mut p = Pending::new(100, None);
        let a: Vec<u8> = (0..80u8).collect();
        let b: Vec<u8> = (80..200u8).collect();
        assert!(p.put(1000, &a).is_ok());
        assert!(p.put(1080, &b).is_ok());
        assert_eq!(p.scratch_bytes(), 120, "the second entry spilled");
        let mut out = vec![0u8; 100];
        assert_eq!(p.read(1050, &mut out).ok(), Some(true));
        assert_eq!(out, (50..150u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_range_with_a_hole_is_not_readable() {
        let mut p = Pending::new(1 << 20, None);
        assert!(p.put(0, &[1; 10]).is_ok());
        assert!(p.put(20, &[2; 10]).is_ok());
        let mut out = [0u8; 25];
        assert_eq!(p.read(0, &mut out).ok(), Some(false));
        let mut out = [0u8; 5];
        assert_eq!(p.read(22, &mut out).ok(), Some(true));
        assert_eq!(p.read(30, &mut out).ok(), Some(false));
    }

    #[test]
    fn forgetting_releases_memory_of_whole_entries_only() {
        let mut p = Pending::new(1 << 20, None);
        assert!(p.put(0, &[1; 10]).is_ok());
        assert!(p.put(10, &[2; 10]).is_ok());
        p.forget(0, 15);
        assert_eq!(p.memory_bytes(), 10);
        let mut out = [0u8; 10];
        assert_eq!(p.read(10, &mut out).ok(), Some(true));
    }
}
