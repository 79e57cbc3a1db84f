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
        let block: &[f32; BLOCK] = block.try_into().expect("chunks_exact");
        let d = super::abs_max(block) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for (q, v) in o[2..].iter_mut().zip(block) {
            *q = round_half_away(v * id) as u8;
        }
    }
}

/// `x.round() as i8` — C's `roundf` (half away from zero), saturated, NaN to 0 — for every f32,
/// in a form that vectorizes: `f32::round` is a libm call on baseline x86-64 and the saturating
/// cast scalar code with fix-ups. Adding the largest float below one half with `x`'s sign, then
/// truncating, rounds exactly (it is how LLVM lowers `round` where SSE4.1 is available).
#[inline(always)]
fn round_half_away(x: f32) -> i8 {
    const BELOW_HALF: f32 = 0.499_999_97; // 0.5 - 2^-25
    let t = x + BELOW_HALF.copysign(x);
    let t = if t.is_nan() { 0.0 } else { t };
    let t = if t > -128.0 { t } else { -128.0 };
    let t = if t < 127.0 { t } else { 127.0 };
    // SAFETY: t is in [-128, 127] (not NaN, not infinite), so its truncation fits an i32.
    unsafe { t.to_int_unchecked::<i32>() as i8 }
}

#[cfg(test)]
mod tests {
    /// The branch-free rounding equals `round() as i8` on a sweep of bit patterns below 200, on
    /// the floats next to every half (where rounding could go wrong) and on special values.
    #[test]
    fn rounding_equals_roundf() {
        let limit = 200f32.to_bits();
        let halves = (0..200u32).flat_map(|k| {
            let h = (k as f32 + 0.5).to_bits();
            [h - 1, h, h + 1]
        });
        for bits in (0..limit).step_by(31).chain(halves) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(super::round_half_away(x), x.round() as i8, "{x:e}");
            }
        }
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e9, -1e9] {
            assert_eq!(super::round_half_away(x), x.round() as i8, "{x}");
        }
    }

    #[test]
    fn blocks_equal_ggml_reference() {
        for (input, expected) in super::super::golden::cases("q8_0") {
            let mut out = Vec::new();
            super::quantize(&input, &mut out);
            assert_eq!(out, expected, "input starting {:?}", &input[..4]);
        }
    }
}
