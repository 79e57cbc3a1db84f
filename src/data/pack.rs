//! Packing: several examples per sequence of `max_seq_len`, kept apart at train time by
//! positions that restart at each example and block-diagonal causal attention. Padding mode puts
//! one example per sequence. Written here rather than taken from a library because the layout
//! (flat ids + example and sequence offsets) is exactly what the memory-mapped cache stores.

use crate::rng::Rng;

use super::encode::Encoded;

/// How examples are laid out into training sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Pack,
    Pad,
}

/// Examples laid out flat: `ids`/`labels` of all examples in sequence order;
/// example `e` is `example_offsets[e]..example_offsets[e+1]` (token indices) and sequence `s`
/// holds examples `sequence_offsets[s]..sequence_offsets[s+1]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub labels: Vec<u8>,
    pub example_offsets: Vec<u64>,
    pub sequence_offsets: Vec<u64>,
}

impl Packed {
    /// Number of examples.
    pub fn examples(&self) -> usize {
        self.example_offsets.len().saturating_sub(1)
    }
    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.sequence_offsets.len().saturating_sub(1)
    }
}

/// Shuffles `examples` with `seed` (so a sequence mixes examples from across the dataset), then
/// fills each sequence greedily. Every example must already fit in `max_seq_len`.
pub fn pack(mut examples: Vec<Encoded>, max_seq_len: usize, mode: Packing, seed: u64) -> Packed {
    let mut rng = Rng::new(seed);
    for i in (1..examples.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        examples.swap(i, j);
    }
    let total: usize = examples.iter().map(|e| e.ids.len()).sum();
    let mut out = Packed {
        ids: Vec::with_capacity(total),
        labels: Vec::with_capacity(total),
        example_offsets: vec![0],
        sequence_offsets: vec![0],
    };
    let mut current = 0usize;
    for (n, ex) in examples.iter().enumerate() {
        let starts_new = match mode {
            Packing::Pad => n > 0,
            Packing::Pack => current + ex.ids.len() > max_seq_len && current > 0,
        };
        if starts_new {
            out.sequence_offsets.push(n as u64);
            current = 0;
        }
        out.ids.extend_from_slice(&ex.ids);
        out.labels.extend(ex.labels.iter().map(|&l| u8::from(l)));
        out.example_offsets.push(out.ids.len() as u64);
        current += ex.ids.len();
    }
    if !examples.is_empty() {
        out.sequence_offsets.push(examples.len() as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, tag: u32) -> Encoded {
        Encoded {
            ids: vec![tag; n],
            labels: vec![true; n],
        }
    }

    #[test]
    fn packs_without_exceeding_the_length_and_keeps_every_token() {
        let exs: Vec<Encoded> = (0..50).map(|i| ex(1 + (i * 7) % 20, i as u32)).collect();
        let total: usize = exs.iter().map(|e| e.ids.len()).sum();
        let p = pack(exs, 32, Packing::Pack, 3);
        assert_eq!(p.ids.len(), total);
        assert_eq!(p.examples(), 50);
        for s in 0..p.sequences() {
            let (a, b) = (
                p.sequence_offsets[s] as usize,
                p.sequence_offsets[s + 1] as usize,
            );
            let len = p.example_offsets[b] - p.example_offsets[a];
            assert!(len <= 32, "sequence {s} has {len} tokens");
            assert!(b > a);
        }
        assert!(p.sequences() < 50, "examples share sequences");
        // Deterministic for a seed.
        let again = pack(
            (0..50).map(|i| ex(1 + (i * 7) % 20, i as u32)).collect(),
            32,
            Packing::Pack,
            3,
        );
        assert_eq!(p, again);
    }

    #[test]
    fn pad_mode_is_one_example_per_sequence() {
        let p = pack(vec![ex(3, 1), ex(4, 2)], 8, Packing::Pad, 0);
        assert_eq!(p.sequence_offsets, vec![0, 1, 2]);
    }
}
