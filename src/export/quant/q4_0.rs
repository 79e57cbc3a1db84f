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
        let block: &[f32; BLOCK] = block.try_into().expect("chunks_exact");
        let d = signed_abs_max(block) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let nibble = |v: f32| nibble(v * id + 8.5);
        let (lo, hi) = block.split_at(BLOCK / 2);
        for ((q, &a), &b) in o[2..].iter_mut().zip(lo).zip(hi) {
            *q = nibble(a) | (nibble(b) << 4);
        }
    }
}

/// The reference's `min(15, (int8_t)x)` as `(x as u8).min(15)` does it, for every f32: clamped to
/// [0, 15] in floating point (NaN to 0, as the saturating cast gives), then truncated. The
/// saturating float-to-int cast compiles to scalar code with fix-ups per value; this vectorizes.
#[inline(always)]
fn nibble(x: f32) -> u8 {
    // `>`/`<` select as maxps/minps do: a NaN fails the first test and becomes 0.
    let x = if x > 0.0 { x } else { 0.0 };
    let x = if x < 15.0 { x } else { 15.0 };
    // SAFETY: x is in [0, 15] (not NaN, not infinite), so its truncation fits an i32.
    unsafe { x.to_int_unchecked::<i32>() as u8 }
}

/// The first value of largest magnitude, sign kept, as ggml's strict `amax < fabsf(v)` scan
/// finds it (0 for a block of zeros). The magnitude comes from vectorizable max/min lanes; only
/// a block holding both `m` and `-m` is scanned for which comes first.
fn signed_abs_max(block: &[f32; BLOCK]) -> f32 {
    let (mut hi, mut lo) = ([f32::NEG_INFINITY; 8], [f32::INFINITY; 8]);
    for chunk in block.chunks_exact(8) {
        for k in 0..8 {
            hi[k] = hi[k].max(chunk[k]);
            lo[k] = lo[k].min(chunk[k]);
        }
    }
    let hi = hi.into_iter().fold(f32::NEG_INFINITY, f32::max);
    let lo = lo.into_iter().fold(f32::INFINITY, f32::min);
    if !(hi > 0.0 || lo < 0.0) {
        // Zeros (and NaN, which no comparison selects): the scan never moves off its initial 0.
        return 0.0;
    }
    if hi > -lo {
        hi
    } else if -lo > hi {
        lo
    } else {
        scan(block)
    }
}

/// ggml's scan itself.
fn scan(block: &[f32; BLOCK]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[cfg(test)]
mod tests {
    /// The vectorizable nibble equals the reference's saturating cast on a sweep of floats.
    #[test]
    fn nibble_equals_the_saturating_cast() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            15.0,
            16.0,
            15.999,
            -0.5,
        ];
        for x in (0..u32::MAX)
            .step_by(4093)
            .map(f32::from_bits)
            .chain(specials)
        {
            assert_eq!(super::nibble(x), (x as u8).min(15), "{x:e}");
        }
    }

    /// The vectorized search for the signed maximum equals ggml's scan on blocks built to hit
    /// its cases: ties of +m and -m in either order, zeros, negative zeros, NaN, infinities.
    #[test]
    fn signed_abs_max_equals_the_scan() {
        let mut rng = 0x9e37_79b9_u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            rng
        };
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
            -2.5,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for _ in 0..20_000 {
            let mut b = [0f32; super::BLOCK];
            for v in b.iter_mut() {
                let r = next();
                *v = match r % 4 {
                    0 => specials[(r >> 8) as usize % specials.len()],
                    1 => 0.0,
                    _ => ((r >> 8) as f32 / (1 << 24) as f32 - 0.5) * 4.0,
                };
            }
            let (a, b2) = (super::signed_abs_max(&b), super::scan(&b));
            assert_eq!(a.to_bits(), b2.to_bits(), "{b:?}");
        }
    }

    #[test]
    fn blocks_equal_ggml_reference() {
        for (input, expected) in super::super::golden::cases("q4_0") {
            let mut out = Vec::new();
            super::quantize(&input, &mut out);
            assert_eq!(out, expected, "input starting {:?}", &input[..4]);
        }
    }
}
