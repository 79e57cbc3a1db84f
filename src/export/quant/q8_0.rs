//! Q8_0: blocks of 32 values as one f16 scale `d = max|x| / 127` and 32 signed bytes
//! `round(x / d)` (34 bytes), as ggml's `quantize_row_q8_0_ref`.

use super::BLOCK;

/// Bytes of one Q8_0 block.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// Appends the Q8_0 blocks of `x` (its length a multiple of 32) to `out`.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    debug_assert_eq!(x.len() % BLOCK, 0);
    out.reserve(x.len() / BLOCK * BLOCK_BYTES);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        // `f32::round` rounds half away from zero, as C's `roundf`.
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
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
