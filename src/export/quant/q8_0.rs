//! Q8_0: blocks of 32 values as one f16 scale `d = max|x| / 127` and 32 signed bytes
//! `round(x / d)` (34 bytes), as ggml's `quantize_row_q8_0_ref`.

use super::BLOCK;

/// Bytes of one Q8_0 block.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// Appends the Q8_0 blocks of `x` (its length a multiple of 32) to `out`.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() / BLOCK * BLOCK_BYTES, 0);
    quantize_into(x, &mut out[start..]);
}

/// Writes the Q8_0 blocks of `x` (its length a multiple of 32) into `out` (exactly
/// `x.len() / 32 * 34` bytes).
pub fn quantize_into(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % BLOCK, 0);
    debug_assert_eq!(out.len(), x.len() / BLOCK * BLOCK_BYTES);
    for (block, o) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        // `f32::round` rounds half away from zero, as C's `roundf`.
        for (q, v) in o[2..].iter_mut().zip(block) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_equal_ggml_reference() {
        for (input, expected) in super::super::golden::cases("q8_0") {
            let mut out = Vec::new();
            super::quantize(&input, &mut out);
            assert_eq!(out, expected, "input starting {:?}", &input[..4]);
        }
    }
}
