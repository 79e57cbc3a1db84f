//! Q4_0: blocks of 32 values as one f16 scale `d = x_max / -8` (x_max the value of largest
//! magnitude, sign kept) and 32 nibbles `min(15, trunc(x / d + 8.5))`, the first 16 values in
//! the low nibbles and the last 16 in the high ones (18 bytes), as ggml's
//! `quantize_row_q4_0_ref`.

use super::BLOCK;

/// Bytes of one Q4_0 block.
pub const BLOCK_BYTES: usize = 2 + BLOCK / 2;

/// Appends the Q4_0 blocks of `x` (its length a multiple of 32) to `out`.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() / BLOCK * BLOCK_BYTES, 0);
    quantize_into(x, &mut out[start..]);
}

/// Writes the Q4_0 blocks of `x` (its length a multiple of 32) into `out` (exactly
/// `x.len() / 32 * 18` bytes).
pub fn quantize_into(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % BLOCK, 0);
    debug_assert_eq!(out.len(), x.len() / BLOCK * BLOCK_BYTES);
    for (block, o) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        // The first value of largest magnitude, as ggml's strict `amax < fabsf(v)`.
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let nibble = |v: f32| ((v * id + 8.5) as u8).min(15);
        let (lo, hi) = block.split_at(BLOCK / 2);
        for ((q, &a), &b) in o[2..].iter_mut().zip(lo).zip(hi) {
            *q = nibble(a) | (nibble(b) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_equal_ggml_reference() {
        for (input, expected) in super::super::golden::cases("q4_0") {
            let mut out = Vec::new();
            super::quantize(&input, &mut out);
            assert_eq!(out, expected, "input starting {:?}", &input[..4]);
        }
    }
}
