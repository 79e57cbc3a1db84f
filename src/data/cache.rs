//! The token cache: one binary file per split that training memory-maps, written to a temporary
//! name, fsynced and renamed so an interrupted run never leaves a half file.
//!
//! Layout (little-endian, every section 8-byte aligned):
//! `b"AFNRTOK1"`, n_tokens u64, n_examples u64, n_sequences u64, then
//! ids `u32 × n_tokens`, labels `u8 × n_tokens`, example offsets `u64 × (n_examples + 1)`,
//! sequence offsets `u64 × (n_sequences + 1)` (see [`Packed`]).

use std::path::Path;

use memmap2::Mmap;

use super::pack::Packed;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"AFNRTOK1";
const HEADER: usize = 32;

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Serialises a split.
pub fn write(path: &Path, p: &Packed) -> Result<()> {
    let n = p.ids.len();
    let mut buf = Vec::with_capacity(
        HEADER + pad8(4 * n) + pad8(n) + 8 * (p.example_offsets.len() + p.sequence_offsets.len()),
    );
    buf.extend_from_slice(MAGIC);
    for v in [n as u64, p.examples() as u64, p.sequences() as u64] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    for id in &p.ids {
        buf.extend_from_slice(&id.to_le_bytes());
    }
    buf.resize(pad8(buf.len()), 0);
    buf.extend_from_slice(&p.labels);
    buf.resize(pad8(buf.len()), 0);
    for v in p.example_offsets.iter().chain(&p.sequence_offsets) {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    crate::fs::write_atomic(path, &buf)
}

/// A memory-mapped split.
pub struct TokenFile {
    mmap: Mmap,
    n_tokens: usize,
    n_examples: usize,
    n_sequences: usize,
}

impl TokenFile {
    /// Maps `path`, checking the header and the size.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; afinar replaces cache files by rename, never in place.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        if mmap.len() < HEADER || &mmap[..8] != MAGIC {
            return Err(Error::bad_file(
                path,
                "not an afinar token cache (bad magic); run `afinar data prepare` again",
            ));
        }
        let word =
            |i: usize| u64::from_le_bytes(mmap[8 + 8 * i..16 + 8 * i].try_into().unwrap()) as usize;
        let (n_tokens, n_examples, n_sequences) = (word(0), word(1), word(2));
        let t = Self {
            mmap,
            n_tokens,
            n_examples,
            n_sequences,
        };
        let need = t.seq_start() + 8 * (n_sequences + 1);
        if t.mmap.len() != need {
            return Err(Error::bad_file(
                path,
                format!(
                    "token cache is {} bytes, expected {need} (truncated?)",
                    t.mmap.len()
                ),
            ));
        }
        Ok(t)
    }

    fn labels_start(&self) -> usize {
        HEADER + pad8(4 * self.n_tokens)
    }
    fn ex_start(&self) -> usize {
        self.labels_start() + pad8(self.n_tokens)
    }
    fn seq_start(&self) -> usize {
        self.ex_start() + 8 * (self.n_examples + 1)
    }

    fn slice<T>(&self, start: usize, len: usize) -> &[T] {
        // SAFETY: the mapping is page-aligned, `start` is a multiple of 8 (≥ align_of::<T>()
        // for u8/u32/u64), the length was checked in `open`, and the values are plain integers
        // stored little-endian, which is the byte order of every platform afinar builds for.
        unsafe { std::slice::from_raw_parts(self.mmap.as_ptr().add(start).cast::<T>(), len) }
    }

    /// All token ids.
    pub fn ids(&self) -> &[u32] {
        self.slice(HEADER, self.n_tokens)
    }
    /// 1 where the token carries loss.
    pub fn labels(&self) -> &[u8] {
        self.slice(self.labels_start(), self.n_tokens)
    }
    /// Token offsets of the examples (`n_examples + 1` values).
    pub fn example_offsets(&self) -> &[u64] {
        self.slice(self.ex_start(), self.n_examples + 1)
    }
    /// Example offsets of the sequences (`n_sequences + 1` values).
    pub fn sequence_offsets(&self) -> &[u64] {
        self.slice(self.seq_start(), self.n_sequences + 1)
    }
    /// Number of examples.
    pub fn examples(&self) -> usize {
        self.n_examples
    }
    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.n_sequences
    }
    /// Token range of example `e`.
    pub fn example_range(&self, e: usize) -> std::ops::Range<usize> {
        let o = self.example_offsets();
        o[e] as usize..o[e + 1] as usize
    }

    /// Copies the content back into a [`Packed`] (for tests and small splits).
    pub fn to_packed(&self) -> Packed {
        Packed {
            ids: self.ids().to_vec(),
            labels: self.labels().to_vec(),
            example_offsets: self.example_offsets().to_vec(),
            sequence_offsets: self.sequence_offsets().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let p = Packed {
            ids: vec![1, 2, 3, 4, 5],
            labels: vec![0, 1, 1, 0, 1],
            example_offsets: vec![0, 2, 5],
            sequence_offsets: vec![0, 2],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        write(&path, &p).unwrap();
        let t = TokenFile::open(&path).unwrap();
        assert_eq!(t.to_packed(), p);
        assert_eq!(t.example_range(1), 2..5);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = TokenFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
