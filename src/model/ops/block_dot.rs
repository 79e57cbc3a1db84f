//! Decoding products `y = x Wᵀ` for a few rows of f32 x against a packed W, exact: each block
//! of W is dequantized in registers and multiplied with x in f32, so the result equals the
//! tiled path (dequantize, then GEMM) up to the order of the sums.
//!
//! Why our own, and why not only llama.cpp's integer dot products (`quant_dot.rs`): decoding
//! one token is bound by reading W, not by arithmetic, so f32 multiply-adds on blocks unpacked
//! in registers cost about the same time as 8-bit integer dots while adding no rounding of the
//! activations. Rounding them moved the default model's logits by up to 0.25 and flipped its
//! answer to "What is the capital of France?" at a near tie. Q8_0, Q4_0 and Q4_1 have AVX2
//! kernels; every other format (bf16, f16, k-quants) dequantizes one row into a buffer and
//! takes a vectorised dot product.

use candle_core::quantized::GgmlDType;
use candle_core::Result;
use half::f16;
use rayon::prelude::*;

use super::cpu::dot;
use super::packed::PackedRef;
use super::rows_dot::{dot_rows as rows_dot, WRow};

const QK: usize = 32;

/// `y (m × n) = x (m × k) · Wᵀ` for any packed W, output rows of W split over rayon's pool.
pub fn matmul_wt(
    x: &[f32],
    w: PackedRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
) -> Result<()> {
    let kernel = Kernel::pick(w.dtype);
    // Σx per block of each x row (Q4_1's minimum multiplies it).
    let sums: Vec<Vec<f32>> = if w.dtype == GgmlDType::Q4_1 {
        x.chunks_exact(k)
            .map(|r| r.chunks(QK).map(|c| c.iter().sum()).collect())
            .collect()
    } else {
        vec![Vec::new(); m]
    };
    let rb = w.row_bytes();
    by_output_rows(y, m, n, |j, out, row| {
        let wr = &w.bytes[j * rb..(j + 1) * rb];
        if w.dtype == GgmlDType::BF16 {
            // Each bf16 row loaded once for all rows of x (`rows_dot.rs`).
            rows_dot(WRow::Bf16(wr), x, out);
            return Ok(());
        }
        match kernel {
            Some(kern) => {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = kern.dot(wr, &x[r * k..(r + 1) * k], &sums[r]);
                }
            }
            None => {
                row.resize(k, 0f32);
                w.dequantize_rows(j, j + 1, row)?;
                for (r, o) in out.iter_mut().enumerate() {
                    *o = dot(row, &x[r * k..(r + 1) * k]);
                }
            }
        }
        Ok(())
    })
}

/// Calls `f(j, outputs, scratch)` for every output column j (a row of W) with its m outputs
/// (and a buffer reused within a task), split over rayon's pool, then scatters them into
/// y (m × n). Shared by the exact and the 8-bit decoding products.
pub(super) fn by_output_rows(
    y: &mut [f32],
    m: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32], &mut Vec<f32>) -> Result<()> + Sync,
) -> Result<()> {
    by_output_rows_grouped(y, m, n, m, |j, _, out, scratch| f(j, out, scratch))
}

/// [`by_output_rows`] taking x's rows `group` at a time: within a task, every W row of the
/// task meets the first `group` rows of x, then every one meets the next, … `f(j, r0, outputs,
/// scratch)` gets W row j's outputs for x rows r0.. (as many as `outputs` holds).
///
/// Why: a W row multiplied with all m rows of x at once streams all of x through the cache for
/// each W row; past ~8 rows of a wide x (16 × 1536 f32 = 98 KB) that no longer fits in L1 and a
/// step of 16 sequences cost 2.5× one of 8. A group of x rows stays in L1 while the task's W rows
/// (a few tens of KB of blocks) are read once per group from L2. Each output is still one call's
/// dot product, so the values do not change.
pub(super) fn by_output_rows_grouped(
    y: &mut [f32],
    m: usize,
    n: usize,
    group: usize,
    f: impl Fn(usize, usize, &mut [f32], &mut Vec<f32>) -> Result<()> + Sync,
) -> Result<()> {
    // Column-major scratch: each W row's m outputs are contiguous, so tasks own disjoint
    // chunks; 64 rows per task keeps scheduling cost far below the work.
    let mut t = vec![0f32; n * m];
    let group = group.clamp(1, m.max(1));
    t.par_chunks_mut(64 * m)
        .enumerate()
        .try_for_each(|(c, chunk)| -> Result<()> {
            let mut scratch = Vec::new();
            for r0 in (0..m).step_by(group) {
                let r1 = (r0 + group).min(m);
                for (i, out) in chunk.chunks_mut(m).enumerate() {
                    f(c * 64 + i, r0, &mut out[r0..r1], &mut scratch)?;
                }
            }
            Ok(())
        })?;
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = t[j * m + i];
        }
    }
    Ok(())
}

/// A row kernel for one block format, the SIMD version when the CPU has it.
#[derive(Clone, Copy)]
struct Kernel {
    dtype: GgmlDType,
    avx2: bool,
}

impl Kernel {
    /// The kernel for `dtype`, or `None` for formats without one (they dequantize a row).
    fn pick(dtype: GgmlDType) -> Option<Self> {
        if !matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Some(Self { dtype, avx2 })
    }

    /// Σⱼ W[j]·x[j] over one row of W (its bytes); `sums` are x's block sums.
    fn dot(self, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2, FMA and F16C were detected on this CPU (`pick`); the kernels check
            // that `w` holds the blocks `x` needs before reading.
            return unsafe {
                match self.dtype {
                    GgmlDType::Q8_0 => avx2::dot_q8_0(w, x),
                    GgmlDType::Q4_0 => avx2::dot_q4_0(w, x),
                    _ => avx2::dot_q4_1(w, x, sums),
                }
            };
        }
        match self.dtype {
            GgmlDType::Q8_0 => scalar::dot_q8_0(w, x),
            GgmlDType::Q4_0 => scalar::dot_q4_0(w, x),
            _ => scalar::dot_q4_1(w, x, sums),
        }
    }
}

/// Block layouts (ggml): Q8_0 = d:f16, q:[i8; 32] (34 bytes); Q4_0 = d:f16, 16 bytes of
/// nibbles, low nibbles are elements 0..16 and high nibbles 16..32, value = d·(nibble − 8)
/// (18 bytes); Q4_1 = d:f16, m:f16, nibbles as Q4_0, value = d·nibble + m (20 bytes).
mod scalar {
    use super::{f16, QK};

    fn half(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    fn nibble(q: &[u8], i: usize) -> f32 {
        (if i < 16 { q[i] & 0x0F } else { q[i - 16] >> 4 }) as f32
    }

    pub fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (wb, xb) in w.chunks_exact(34).zip(x.chunks_exact(QK)) {
            let s: f32 = (0..QK).map(|i| wb[2 + i] as i8 as f32 * xb[i]).sum();
            acc += half(wb, 0) * s;
        }
        acc
    }

    pub fn dot_q4_0(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (wb, xb) in w.chunks_exact(18).zip(x.chunks_exact(QK)) {
            let s: f32 = (0..QK).map(|i| (nibble(&wb[2..], i) - 8.0) * xb[i]).sum();
            acc += half(wb, 0) * s;
        }
        acc
    }

    pub fn dot_q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let mut acc = 0f32;
        for ((wb, xb), s) in w.chunks_exact(20).zip(x.chunks_exact(QK)).zip(sums) {
            let dot: f32 = (0..QK).map(|i| nibble(&wb[4..], i) * xb[i]).sum();
            acc += half(wb, 0) * dot + half(wb, 2) * s;
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::QK;
    use std::arch::x86_64::*;

    /// The f16 at byte `at` of `b` as f32 (F16C).
    #[inline(always)]
    unsafe fn half(b: &[u8], at: usize) -> f32 {
        let h = u16::from_le_bytes([*b.get_unchecked(at), *b.get_unchecked(at + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// Σ of the 8 lanes of `v` (also used by `rows_quant.rs`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::model::ops) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ of 32 signed bytes (16 in `lo`, 16 in `hi`) times 32 f32 at `x`, in 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot32(lo: __m128i, hi: __m128i, x: *const f32) -> __m256 {
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let mut s = _mm256_mul_ps(f(lo), _mm256_loadu_ps(x));
        s = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x.add(8)), s);
        s = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(x.add(16)), s);
        _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x.add(24)), s)
    }

    /// 16 bytes of nibbles at `p` → (elements 0..16, elements 16..32) as bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
        let t = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        (_mm_and_si128(t, m), _mm_and_si128(_mm_srli_epi16(t, 4), m))
    }

    /// # Safety
    /// AVX2, FMA and F16C are available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
        let blocks = x.len() / QK;
        assert!(w.len() >= blocks * 34);
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let wb = w.as_ptr().add(b * 34 + 2);
            let lo = _mm_loadu_si128(wb as *const __m128i);
            let hi = _mm_loadu_si128(wb.add(16) as *const __m128i);
            let s = dot32(lo, hi, x.as_ptr().add(b * QK));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w, b * 34)), s, acc);
        }
        hsum(acc)
    }

    /// # Safety
    /// AVX2, FMA and F16C are available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0(w: &[u8], x: &[f32]) -> f32 {
        let blocks = x.len() / QK;
        assert!(w.len() >= blocks * 18);
        let eight = _mm_set1_epi8(8);
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let (lo, hi) = nibbles(w.as_ptr().add(b * 18 + 2));
            let (lo, hi) = (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
            let s = dot32(lo, hi, x.as_ptr().add(b * QK));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w, b * 18)), s, acc);
        }
        hsum(acc)
    }

    /// # Safety
    /// AVX2, FMA and F16C are available; `sums` has one entry per block of `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let blocks = x.len() / QK;
        assert!(w.len() >= blocks * 20 && sums.len() >= blocks);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (b, sum) in sums[..blocks].iter().enumerate() {
            // Nibbles are 0..15: as signed bytes they are the same values.
            let (lo, hi) = nibbles(w.as_ptr().add(b * 20 + 4));
            let s = dot32(lo, hi, x.as_ptr().add(b * QK));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w, b * 20)), s, acc);
            mins += half(w, b * 20 + 2) * sum;
        }
        hsum(acc) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::packed::packed_ref;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every kernel variant (scalar, and AVX2 where the CPU has it) and the row fallback equal
    /// the f64 product of the dequantized weight with the f32 activations.
    #[test]
    fn decode_products_equal_the_dequantized_product() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (3, 70, 512);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::BF16,
            GgmlDType::F16,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&Tensor::randn(0f32, 1., (n, k), &dev)?, dtype)?;
            let wd: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let p = packed_ref(&q)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
                .flatten_all()?
                .to_vec1()?;
            let mut y = vec![0f32; m * n];
            matmul_wt(&x, p, (m, n, k), &mut y)?;
            let mut variants: Vec<Kernel> = Vec::new();
            if let Some(best) = Kernel::pick(dtype) {
                variants.push(Kernel {
                    avx2: false,
                    ..best
                });
                if best.avx2 {
                    variants.push(best);
                }
            }
            let rb = p.row_bytes();
            for i in 0..m {
                let xs = &x[i * k..(i + 1) * k];
                let sums: Vec<f32> = xs.chunks(QK).map(|c| c.iter().sum()).collect();
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| xs[l] as f64 * wd[j * k + l] as f64).sum();
                    let row = &p.bytes[j * rb..(j + 1) * rb];
                    let each = variants.iter().map(|kern| kern.dot(row, xs, &sums));
                    for got in std::iter::once(y[i * n + j]).chain(each) {
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                            "{dtype:?} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
