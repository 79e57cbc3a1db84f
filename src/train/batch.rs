//! Training batches from packed sequences: token ids, positions that restart at each example,
//! a block-diagonal causal mask so attention never crosses an example, and the (position,
//! next token) pairs that carry loss.

use candle_core::{Device, Tensor};

use crate::data::cache::TokenFile;
use crate::Result;

/// One micro-batch, ready for the model.
pub struct Batch {
    /// (b, t) u32
    pub ids: Tensor,
    /// (b, t) u32, restarting at 0 at every example
    pub positions: Tensor,
    /// (b, 1, 1, t, t) additive f32 mask
    pub mask: Tensor,
    /// Flat indices into (b·t) of positions whose next token is a target.
    pub target_positions: Tensor,
    /// The target token ids, one per entry of `target_positions`.
    pub targets: Tensor,
    pub n_targets: usize,
    /// Real (non-padding) tokens in the batch.
    pub n_tokens: usize,
}

/// Number of loss-carrying targets in `sequences`, without building tensors (the accumulated
/// batch's denominator is needed before its first micro-batch runs).
pub fn count_targets(file: &TokenFile, sequences: &[usize]) -> usize {
    let labels = file.labels();
    let (ex, seq) = (file.example_offsets(), file.sequence_offsets());
    let mut n = 0;
    for &s in sequences {
        for e in seq[s] as usize..seq[s + 1] as usize {
            let (a, b) = (ex[e] as usize, ex[e + 1] as usize);
            // Token p+1 is a target of position p inside the same example.
            n += labels[a + 1.min(b - a)..b]
                .iter()
                .filter(|&&l| l != 0)
                .count();
        }
    }
    n
}

/// Builds the batch of `sequences` (indices into the file's sequences), padded to the longest.
pub fn make_batch(file: &TokenFile, sequences: &[usize], device: &Device) -> Result<Batch> {
    let (ids_all, labels) = (file.ids(), file.labels());
    let (ex, seq) = (file.example_offsets(), file.sequence_offsets());
    let span = |s: usize| {
        (
            ex[seq[s] as usize] as usize,
            ex[seq[s + 1] as usize] as usize,
        )
    };
    let t = sequences
        .iter()
        .map(|&s| span(s).1 - span(s).0)
        .max()
        .unwrap_or(1)
        .max(1);
    let b = sequences.len();
    let mut ids = vec![0u32; b * t];
    let mut pos = vec![0u32; b * t];
    let mut mask = vec![f32::NEG_INFINITY; b * t * t];
    let mut target_positions = Vec::new();
    let mut targets = Vec::new();
    let mut n_tokens = 0;
    for (bi, &s) in sequences.iter().enumerate() {
        let (start, end) = span(s);
        let len = end - start;
        n_tokens += len;
        // Segment id of every position: the example it belongs to; padding gets its own.
        let mut seg = vec![usize::MAX; t];
        for e in seq[s] as usize..seq[s + 1] as usize {
            let (a, z) = (ex[e] as usize - start, ex[e + 1] as usize - start);
            for p in a..z {
                seg[p] = e;
                pos[bi * t + p] = (p - a) as u32;
                ids[bi * t + p] = ids_all[start + p];
                if p + 1 < z && labels[start + p + 1] != 0 {
                    target_positions.push((bi * t + p) as u32);
                    targets.push(ids_all[start + p + 1]);
                }
            }
        }
        for (p, slot) in seg.iter_mut().enumerate().skip(len) {
            *slot = usize::MAX - p;
        }
        for i in 0..t {
            let row = &mut mask[(bi * t + i) * t..(bi * t + i + 1) * t];
            for j in 0..=i {
                if seg[j] == seg[i] {
                    row[j] = 0.0;
                }
            }
        }
    }
    let n_targets = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(pos, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, 1, 1, t, t), device)?,
        target_positions: Tensor::from_vec(target_positions, n_targets, device)?,
        targets: Tensor::from_vec(targets, n_targets, device)?,
        n_targets,
        n_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pack::Packed;

    #[test]
    fn positions_restart_and_attention_stays_inside_examples() -> Result<()> {
        // One sequence with two examples: [10 11 12] (targets 11, 12) and [20 21] (target 21).
        let p = Packed {
            ids: vec![10, 11, 12, 20, 21],
            labels: vec![0, 1, 1, 0, 1],
            example_offsets: vec![0, 3, 5],
            sequence_offsets: vec![0, 2],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        crate::data::cache::write(&path, &p)?;
        let f = TokenFile::open(&path)?;
        let b = make_batch(&f, &[0], &Device::Cpu)?;
        assert_eq!(b.positions.to_vec2::<u32>()?, vec![vec![0, 1, 2, 0, 1]]);
        assert_eq!(b.targets.to_vec1::<u32>()?, vec![11, 12, 21]);
        assert_eq!(b.target_positions.to_vec1::<u32>()?, vec![0, 1, 3]);
        assert_eq!(count_targets(&f, &[0]), 3);
        let m: Vec<f32> = b.mask.flatten_all()?.to_vec1()?;
        let visible = |i: usize, j: usize| m[i * 5 + j] == 0.0;
        assert!(visible(2, 0) && visible(2, 2) && !visible(2, 3));
        assert!(
            visible(4, 3) && !visible(4, 2) && !visible(3, 4),
            "no attention across examples or to the future"
        );
        Ok(())
    }
}
