//! Products of one block-quantized weight row (Q8_0, Q4_0, Q4_1: the formats of the GGUF files
//! users serve) with several activation rows: each block of 32 weights is unpacked once, in
//! registers, and multiplied into every row's accumulators.
//!
//! Why our own: batched decoding multiplies every weight row with one activation row per
//! sequence. The one-row kernels of `block_dot.rs` unpack the row again for each sequence (a
//! step of 8 sequences cost 6× one of 1), and dequantizing rows into a buffer with candle's
//! scalar code cost 4× the one-row kernel for a lone sequence. Here unpacking is shared and a
//! lone sequence costs what it did.
//!
//! Every row's sum is formed in the same order whatever the number of rows (two accumulators
//! over the parts of each block, then one fixed reduction), so a sequence gets the same logits
//! alone and batched, bit for bit. (AVX-512, AVX2 and the portable path each sum in their own
//! order: a machine always takes the same one.)

use candle_core::quantized::GgmlDType;
use half::f16;

const QK: usize = 32;

/// Whether [`dot_rows`] takes blocks of `dtype`.
pub fn supported(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1)
}

/// Bytes of one block.
fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q8_0 => 34,
        GgmlDType::Q4_0 => 18,
        _ => 20,
    }
}

/// Rows of x a caller should hand [`dot_rows`] at a time so that they stay in L1 across many
/// weight rows (see `block_dot::by_output_rows_grouped`): one AVX-512 group, two AVX2 ones.
pub const X_ROWS_IN_CACHE: usize = 8;

/// Rows of x multiplied together (two accumulators each, within AVX2's 16 registers).
const GROUP: usize = 4;
/// The same with AVX-512's 32 registers (and blocks unpacked into two vectors, not four).
const GROUP_512: usize = 8;

/// `out[r] = w · x[r·k .. (r+1)·k]` for every r < out.len(), with `w` one row of blocks of
/// `dtype` (see [`supported`]) holding k = out.len()-th of x's length values.
pub fn dot_rows(dtype: GgmlDType, w: &[u8], x: &[f32], out: &mut [f32]) {
    assert!(
        supported(dtype),
        "rows_quant: {dtype:?} is not a supported block format"
    );
    let k = w.len() / block_bytes(dtype) * QK;
    assert_eq!(w.len() % block_bytes(dtype), 0, "rows_quant: partial block");
    assert_eq!(
        x.len(),
        out.len() * k,
        "rows_quant: x is not {}×{k}",
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
        for (g, o) in out.chunks_mut(GROUP_512).enumerate() {
            let xs = &x[g * GROUP_512 * k..(g * GROUP_512 + o.len()) * k];
            // SAFETY: AVX-512F and F16C were detected on this CPU; `w` holds k / 32 whole
            // blocks and `xs` o.len() rows of k values (both checked above), and the kernel
            // reads nothing beyond them.
            unsafe { avx512::dot_group(dtype, w, xs, k, o) };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        for (g, o) in out.chunks_mut(GROUP).enumerate() {
            let xs = &x[g * GROUP * k..(g * GROUP + o.len()) * k];
            // SAFETY: AVX2, FMA and F16C were detected on this CPU; `w` holds k / 32 whole
            // blocks and `xs` o.len() rows of k values (both checked above), and the kernel
            // reads nothing beyond them.
            unsafe { avx2::dot_group(dtype, w, xs, k, o) };
        }
        return;
    }
    for (g, o) in out.chunks_mut(GROUP).enumerate() {
        let xs = &x[g * GROUP * k..(g * GROUP + o.len()) * k];
        portable_group(dtype, w, xs, k, o);
    }
}

/// One block's 32 weights as f32 (the portable path's unpacking).
fn unpack(dtype: GgmlDType, blk: &[u8]) -> [f32; QK] {
    let half = |at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
    let mut v = [0f32; QK];
    match dtype {
        GgmlDType::Q8_0 => {
            let d = half(0);
            for (i, o) in v.iter_mut().enumerate() {
                *o = d * (blk[2 + i] as i8 as f32);
            }
        }
        GgmlDType::Q4_0 => {
            let d = half(0);
            for i in 0..16 {
                v[i] = d * ((blk[2 + i] & 0x0F) as i32 - 8) as f32;
                v[i + 16] = d * ((blk[2 + i] >> 4) as i32 - 8) as f32;
            }
        }
        _ => {
            let (d, m) = (half(0), half(2));
            for i in 0..16 {
                v[i] = d * (blk[4 + i] & 0x0F) as f32 + m;
                v[i + 16] = d * (blk[4 + i] >> 4) as f32 + m;
            }
        }
    }
    v
}

/// The portable path: the same accumulation pattern in plain arrays (8 lanes, quarters 0 and
/// 2 into the first accumulator, 1 and 3 into the second).
fn portable_group(dtype: GgmlDType, w: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
    let bs = block_bytes(dtype);
    let mut acc = [[[0f32; 8]; 2]; GROUP];
    for b in 0..k / QK {
        let v = unpack(dtype, &w[b * bs..(b + 1) * bs]);
        for (r, a) in acc.iter_mut().enumerate().take(out.len()) {
            let xb = &xs[r * k + b * QK..r * k + (b + 1) * QK];
            for q in 0..4 {
                for l in 0..8 {
                    a[q % 2][l] += v[q * 8 + l] * xb[q * 8 + l];
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        let s: [f32; 8] = std::array::from_fn(|l| a[0][l] + a[1][l]);
        *o = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    }
}

/// The f16 at `p` as f32 (F16C; called only from the kernels below, which require it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let h = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::block_dot::avx2::hsum;
    use super::{block_bytes, half, GgmlDType, GROUP, QK};
    use std::arch::x86_64::*;

    /// The block at `p` as four vectors of 8 weights (elements 0–7, 8–15, 16–23, 24–31).
    #[inline(always)]
    unsafe fn unpack(dtype: GgmlDType, p: *const u8) -> [__m256; 4] {
        match dtype {
            GgmlDType::Q8_0 => {
                let d = _mm256_set1_ps(half(p));
                let q = |o: usize| {
                    let b = _mm_loadl_epi64(p.add(2 + o) as *const __m128i);
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)))
                };
                [q(0), q(8), q(16), q(24)]
            }
            GgmlDType::Q4_0 => {
                let d = _mm256_set1_ps(half(p));
                let raw = _mm_loadu_si128(p.add(2) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let eight = _mm256_set1_epi32(8);
                let q = |v: __m128i| {
                    let i = _mm256_sub_epi32(_mm256_cvtepu8_epi32(v), eight);
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(i))
                };
                [
                    q(lo),
                    q(_mm_srli_si128(lo, 8)),
                    q(hi),
                    q(_mm_srli_si128(hi, 8)),
                ]
            }
            _ => {
                let d = _mm256_set1_ps(half(p));
                let m = _mm256_set1_ps(half(p.add(2)));
                let raw = _mm_loadu_si128(p.add(4) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let q =
                    |v: __m128i| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), m);
                [
                    q(lo),
                    q(_mm_srli_si128(lo, 8)),
                    q(hi),
                    q(_mm_srli_si128(hi, 8)),
                ]
            }
        }
    }

    /// [`dot_group_m`] for `out.len()` ≤ [`GROUP`] rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_group(dtype: GgmlDType, w: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        match out.len() {
            1 => dot_group_m::<1>(dtype, w, xs, k, out),
            2 => dot_group_m::<2>(dtype, w, xs, k, out),
            3 => dot_group_m::<3>(dtype, w, xs, k, out),
            _ => dot_group_m::<GROUP>(dtype, w, xs, k, out),
        }
    }

    /// M rows at once; a constant M keeps the 2·M accumulators in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // a0, a1 and out indexed in lockstep
    unsafe fn dot_group_m<const M: usize>(
        dtype: GgmlDType,
        w: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let bs = block_bytes(dtype);
        let mut a0 = [_mm256_setzero_ps(); M];
        let mut a1 = [_mm256_setzero_ps(); M];
        let x = xs.as_ptr();
        for b in 0..k / QK {
            let v = unpack(dtype, w.as_ptr().add(b * bs));
            for r in 0..M {
                let xp = x.add(r * k + b * QK);
                a0[r] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xp), a0[r]);
                a1[r] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp.add(8)), a1[r]);
                a0[r] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xp.add(16)), a0[r]);
                a1[r] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp.add(24)), a1[r]);
            }
        }
        for r in 0..M {
            out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{block_bytes, half, GgmlDType, GROUP_512, QK};
    use std::arch::x86_64::*;

    /// The block at `p` as two vectors of 16 weights (elements 0–15, 16–31).
    #[inline(always)]
    unsafe fn unpack(dtype: GgmlDType, p: *const u8) -> [__m512; 2] {
        match dtype {
            GgmlDType::Q8_0 => {
                let d = _mm512_set1_ps(half(p));
                let q = |o: usize| {
                    let b = _mm_loadu_si128(p.add(2 + o) as *const __m128i);
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)))
                };
                [q(0), q(16)]
            }
            GgmlDType::Q4_0 => {
                let d = _mm512_set1_ps(half(p));
                let raw = _mm_loadu_si128(p.add(2) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let eight = _mm512_set1_epi32(8);
                let q = |v: __m128i| {
                    let i = _mm512_sub_epi32(_mm512_cvtepu8_epi32(v), eight);
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(i))
                };
                [
                    q(_mm_and_si128(raw, mask)),
                    q(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)),
                ]
            }
            _ => {
                let d = _mm512_set1_ps(half(p));
                let m = _mm512_set1_ps(half(p.add(2)));
                let raw = _mm_loadu_si128(p.add(4) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let q =
                    |v: __m128i| _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), m);
                [
                    q(_mm_and_si128(raw, mask)),
                    q(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)),
                ]
            }
        }
    }

    /// [`dot_group_m`] for `out.len()` ≤ [`GROUP_512`] rows.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_group(dtype: GgmlDType, w: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        match out.len() {
            1 => dot_group_m::<1>(dtype, w, xs, k, out),
            2 => dot_group_m::<2>(dtype, w, xs, k, out),
            3 => dot_group_m::<3>(dtype, w, xs, k, out),
            4 => dot_group_m::<4>(dtype, w, xs, k, out),
            5 => dot_group_m::<5>(dtype, w, xs, k, out),
            6 => dot_group_m::<6>(dtype, w, xs, k, out),
            7 => dot_group_m::<7>(dtype, w, xs, k, out),
            _ => dot_group_m::<GROUP_512>(dtype, w, xs, k, out),
        }
    }

    /// M rows at once; a constant M keeps the 2·M accumulators in registers.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn dot_group_m<const M: usize>(
        dtype: GgmlDType,
        w: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        // One loop per format, so the format's test is not repeated for every block (it took
        // ~5 % of a serving profile).
        let (w, bs) = (w.as_ptr(), block_bytes(dtype));
        match dtype {
            GgmlDType::Q8_0 => blocks::<M>(|b| unpack(GgmlDType::Q8_0, w.add(b * bs)), xs, k, out),
            GgmlDType::Q4_0 => blocks::<M>(|b| unpack(GgmlDType::Q4_0, w.add(b * bs)), xs, k, out),
            _ => blocks::<M>(|b| unpack(GgmlDType::Q4_1, w.add(b * bs)), xs, k, out),
        }
    }

    /// The loop of [`dot_group_m`] with `block(b)` giving block b's weights.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // a0, a1 and out indexed in lockstep
    unsafe fn blocks<const M: usize>(
        block: impl Fn(usize) -> [__m512; 2],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let mut a0 = [_mm512_setzero_ps(); M];
        let mut a1 = [_mm512_setzero_ps(); M];
        let x = xs.as_ptr();
        for b in 0..k / QK {
            let v = block(b);
            for r in 0..M {
                let xp = x.add(r * k + b * QK);
                a0[r] = _mm512_fmadd_ps(v[0], _mm512_loadu_ps(xp), a0[r]);
                a1[r] = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xp.add(16)), a1[r]);
            }
        }
        for r in 0..M {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::packed::packed_ref;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    #[test]
    fn rows_equal_dequantized_products_and_do_not_depend_on_the_others() -> candle_core::Result<()>
    {
        let dev = Device::Cpu;
        let (m, n, k) = (7, 5, 96);
        let x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
            .flatten_all()?
            .to_vec1()?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let wt = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let q = QTensor::quantize(&wt, dtype)?;
            let wd: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let p = packed_ref(&q)?;
            let rb = p.row_bytes();
            for j in 0..n {
                let wr = &p.bytes[j * rb..(j + 1) * rb];
                // The unpacking equals candle's dequantization.
                for b in 0..k / QK {
                    let bs = block_bytes(dtype);
                    let v = unpack(dtype, &wr[b * bs..(b + 1) * bs]);
                    assert_eq!(
                        &v[..],
                        &wd[j * k + b * QK..j * k + (b + 1) * QK],
                        "{dtype:?}"
                    );
                }
                let mut all = vec![0f32; m];
                dot_rows(dtype, wr, &x, &mut all);
                for r in 0..m {
                    let want: f64 = (0..k)
                        .map(|l| wd[j * k + l] as f64 * x[r * k + l] as f64)
                        .sum();
                    assert!(
                        (all[r] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?}"
                    );
                    let mut one = [0f32];
                    dot_rows(dtype, wr, &x[r * k..(r + 1) * k], &mut one);
                    assert_eq!(one[0].to_bits(), all[r].to_bits(), "{dtype:?} row {r}");
                }
                let mut port = vec![0f32; m];
                for (g, o) in port.chunks_mut(GROUP).enumerate() {
                    portable_group(
                        dtype,
                        wr,
                        &x[g * GROUP * k..(g * GROUP + o.len()) * k],
                        k,
                        o,
                    );
                }
                for (a, b) in port.iter().zip(&all) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dtype:?}: {a} vs {b}"
                    );
                }
            }
        }
        Ok(())
    }
}
