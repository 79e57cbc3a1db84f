//! Decoding products `y = x Wᵀ` for a few rows of x against a block-quantized W, the way
//! llama.cpp computes them: x is quantized to 8 bits per block of 32 (scale d, and for formats
//! with a per-block minimum the block sum d·Σq), and each output is a sum of integer block dot
//! products scaled by the two block scales. W is read once, at its packed size: decoding is
//! bound by memory bandwidth, and a Q4 weight is an eighth of f32's bytes.
//!
//! Why our own: candle's `k_quants::matmul` has no SIMD kernel for Q4_1 (the default model's
//! format: its scalar loop ran at a third of f32 speed here) and runs on its own spinning
//! thread pool, which fights rayon's on a 2-core machine. Q8_0, Q4_0 and Q4_1 (the formats of
//! most small GGUF files and of afinar's export) have AVX2 kernels here, chosen at run time,
//! with a portable scalar version as the reference and the fallback; the k-quants use candle's
//! block dot products (which have AVX2 kernels) on rayon's pool.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::GgmlDType;
use candle_core::Result;
use half::f16;

use super::block_dot::by_output_rows;
use super::packed::{with_block_type, PackedRef};

/// Elements per activation block (all three formats use 32).
const QK: usize = 32;

/// One row of x quantized per block of 32: x ≈ d·q.
pub struct QuantRow {
    d: Vec<f32>,
    /// d·Σq per block (Q4_1's minimum multiplies it).
    sum: Vec<f32>,
    q: Vec<i8>,
}

/// Quantizes `x` (a multiple of 32 long) as ggml's `quantize_row_q8_1` does: d = max|x|/127,
/// q = round(x/d).
pub fn quantize_row(x: &[f32]) -> QuantRow {
    let blocks = x.len() / QK;
    let mut r = QuantRow {
        d: Vec::with_capacity(blocks),
        sum: Vec::with_capacity(blocks),
        q: vec![0; x.len()],
    };
    for (xb, qb) in x.chunks_exact(QK).zip(r.q.chunks_exact_mut(QK)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut s = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
            s += *q as i32;
        }
        r.d.push(d);
        r.sum.push(d * s as f32);
    }
    r
}

/// Whether [`matmul_wt`] takes this format at `k` columns.
pub fn supported(d: GgmlDType, k: usize) -> bool {
    match d {
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1 => k.is_multiple_of(QK),
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
            k.is_multiple_of(256)
        }
        _ => false,
    }
}

/// `y (m × n) = x (m × k) · Wᵀ` for a block-quantized W (see [`supported`]), outputs split over
/// rayon's pool.
pub fn matmul_wt(
    x: &[f32],
    w: PackedRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
) -> Result<()> {
    match w.dtype {
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let rows: Vec<QuantRow> = x.chunks_exact(k).map(quantize_row).collect();
            let kernel = Kernel::pick(w.dtype);
            let rb = w.row_bytes();
            by_output_rows(y, m, n, |j, out, _| {
                let wr = &w.bytes[j * rb..(j + 1) * rb];
                for (o, r) in out.iter_mut().zip(&rows) {
                    *o = kernel.dot(wr, r);
                }
                Ok(())
            })
        }
        d => with_block_type!(d, candle_rows(x, w, (m, n, k), y)),
    }
}

/// The k-quants through candle's block dot products (AVX2 where the CPU has it).
fn candle_rows<T: GgmlType>(
    x: &[f32],
    w: PackedRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
) -> Result<()> {
    let bpr = k / T::BLCK_SIZE;
    let mut acts = vec![T::VecDotType::zeros(); m * bpr];
    for (xr, ar) in x.chunks_exact(k).zip(acts.chunks_exact_mut(bpr)) {
        T::VecDotType::from_float(xr, ar);
    }
    let blocks: &[T] = w.blocks();
    by_output_rows(y, m, n, |j, out, _| {
        let wr = &blocks[j * bpr..(j + 1) * bpr];
        for (o, a) in out.iter_mut().zip(acts.chunks_exact(bpr)) {
            *o = T::vec_dot(k, wr, a);
        }
        Ok(())
    })
}

/// A row dot product for one format, the SIMD version when the CPU has it.
#[derive(Clone, Copy)]
struct Kernel {
    dtype: GgmlDType,
    avx2: bool,
    vnni: bool,
}

impl Kernel {
    fn pick(dtype: GgmlDType) -> Self {
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        #[cfg(target_arch = "x86_64")]
        let vnni = avx2 && is_x86_feature_detected!("avxvnni");
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2, vnni) = (false, false);
        Self { dtype, avx2, vnni }
    }

    /// Σ over blocks of one W row (its bytes) against a quantized x row.
    fn dot(self, w: &[u8], x: &QuantRow) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.vnni {
            // SAFETY: as below, and AVX-VNNI was detected too.
            return unsafe {
                match self.dtype {
                    GgmlDType::Q8_0 => vnni::dot_q8_0(w, x),
                    GgmlDType::Q4_0 => vnni::dot_q4_0(w, x),
                    _ => vnni::dot_q4_1(w, x),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2, FMA and F16C were detected on this CPU (`pick`); the kernels read
            // only inside `w` and `x` (block counts are taken from x and checked against w).
            return unsafe {
                match self.dtype {
                    GgmlDType::Q8_0 => avx2::dot_q8_0(w, x),
                    GgmlDType::Q4_0 => avx2::dot_q4_0(w, x),
                    _ => avx2::dot_q4_1(w, x),
                }
            };
        }
        match self.dtype {
            GgmlDType::Q8_0 => scalar::dot_q8_0(w, x),
            GgmlDType::Q4_0 => scalar::dot_q4_0(w, x),
            _ => scalar::dot_q4_1(w, x),
        }
    }
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Block layouts (ggml): Q8_0 = d:f16, q:[i8; 32] (34 bytes); Q4_0 = d:f16, 16 bytes of
/// nibbles, low nibbles are elements 0..16 and high nibbles 16..32, value = nibble − 8
/// (18 bytes); Q4_1 = d:f16, m:f16, nibbles as Q4_0, value = d·nibble + m (20 bytes).
mod scalar {
    use super::{half, QuantRow, QK};

    pub fn dot_q8_0(w: &[u8], x: &QuantRow) -> f32 {
        let mut acc = 0f32;
        for (b, wb) in w.chunks_exact(34).enumerate() {
            let q = &x.q[b * QK..(b + 1) * QK];
            let s: i32 = (0..QK).map(|i| wb[2 + i] as i8 as i32 * q[i] as i32).sum();
            acc += half(wb, 0) * x.d[b] * s as f32;
        }
        acc
    }

    fn nibbles(wb: &[u8], i: usize) -> i32 {
        if i < 16 {
            (wb[i] & 0x0F) as i32
        } else {
            (wb[i - 16] >> 4) as i32
        }
    }

    pub fn dot_q4_0(w: &[u8], x: &QuantRow) -> f32 {
        let mut acc = 0f32;
        for (b, wb) in w.chunks_exact(18).enumerate() {
            let q = &x.q[b * QK..(b + 1) * QK];
            let s: i32 = (0..QK)
                .map(|i| (nibbles(&wb[2..], i) - 8) * q[i] as i32)
                .sum();
            acc += half(wb, 0) * x.d[b] * s as f32;
        }
        acc
    }

    pub fn dot_q4_1(w: &[u8], x: &QuantRow) -> f32 {
        let mut acc = 0f32;
        for (b, wb) in w.chunks_exact(20).enumerate() {
            let q = &x.q[b * QK..(b + 1) * QK];
            let s: i32 = (0..QK).map(|i| nibbles(&wb[4..], i) * q[i] as i32).sum();
            acc += half(wb, 0) * x.d[b] * s as f32 + half(wb, 2) * x.sum[b];
        }
        acc
    }
}

/// The x86 kernels, generated twice: for AVX2 (`maddubs` + `madd`: two instructions per 32
/// byte products) and for AVX-VNNI (`vpdpbusd`: one).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($features:literal, |$u:ident, $s:ident| $sum:block) => {
        use super::{QuantRow, QK};
        use std::arch::x86_64::*;

        /// The f16 at `p` as f32 (F16C).
        #[inline(always)]
        unsafe fn half(b: &[u8], at: usize) -> f32 {
            let h = u16::from_le_bytes([*b.get_unchecked(at), *b.get_unchecked(at + 1)]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
        }

        /// Σ of 32 products of unsigned bytes `u` (≤ 128) and signed bytes `s`, as 8 i32 lanes
        /// converted to f32.
        #[target_feature(enable = $features)]
        unsafe fn sum_u8_i8($u: __m256i, $s: __m256i) -> __m256 {
            $sum
        }

        /// Σ of 32 products of signed bytes: |a| against b with a's sign moved onto it.
        #[target_feature(enable = $features)]
        unsafe fn sum_i8_i8(a: __m256i, b: __m256i) -> __m256 {
            sum_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
        }

        #[target_feature(enable = $features)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// 16 bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
        #[target_feature(enable = $features)]
        unsafe fn nibbles(p: *const u8) -> __m256i {
            let t = _mm_loadu_si128(p as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }

        /// # Safety
        /// AVX2, FMA and F16C are available; `w` holds at least as many 34-byte blocks as `x` has.
        #[target_feature(enable = $features)]
        pub unsafe fn dot_q8_0(w: &[u8], x: &QuantRow) -> f32 {
            let blocks = x.d.len();
            assert!(w.len() >= blocks * 34 && x.q.len() >= blocks * QK);
            let mut acc = _mm256_setzero_ps();
            for b in 0..blocks {
                let wb = w.as_ptr().add(b * 34);
                let a = _mm256_loadu_si256(wb.add(2) as *const __m256i);
                let q = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                let d = _mm256_set1_ps(half(w, b * 34) * x.d[b]);
                acc = _mm256_fmadd_ps(d, sum_i8_i8(a, q), acc);
            }
            hsum(acc)
        }

        /// # Safety
        /// AVX2, FMA and F16C are available; `w` holds at least as many 18-byte blocks as `x` has.
        #[target_feature(enable = $features)]
        pub unsafe fn dot_q4_0(w: &[u8], x: &QuantRow) -> f32 {
            let blocks = x.d.len();
            assert!(w.len() >= blocks * 18 && x.q.len() >= blocks * QK);
            let mut acc = _mm256_setzero_ps();
            for b in 0..blocks {
                let wb = w.as_ptr().add(b * 18);
                let a = _mm256_sub_epi8(nibbles(wb.add(2)), _mm256_set1_epi8(8));
                let q = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                let d = _mm256_set1_ps(half(w, b * 18) * x.d[b]);
                acc = _mm256_fmadd_ps(d, sum_i8_i8(a, q), acc);
            }
            hsum(acc)
        }

        /// # Safety
        /// AVX2, FMA and F16C are available; `w` holds at least as many 20-byte blocks as `x` has.
        #[target_feature(enable = $features)]
        pub unsafe fn dot_q4_1(w: &[u8], x: &QuantRow) -> f32 {
            let blocks = x.d.len();
            assert!(w.len() >= blocks * 20 && x.q.len() >= blocks * QK);
            // Two accumulators: consecutive blocks do not wait on each other's multiply-add.
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut mins = 0f32;
            for b in 0..blocks {
                let wb = w.as_ptr().add(b * 20);
                let u = nibbles(wb.add(4));
                let q = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                let d = _mm256_set1_ps(half(w, b * 20) * x.d[b]);
                acc[b & 1] = _mm256_fmadd_ps(d, sum_u8_i8(u, q), acc[b & 1]);
                mins += half(w, b * 20 + 2) * x.sum[b];
            }
            hsum(_mm256_add_ps(acc[0], acc[1])) + mins
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    x86_kernels!("avx2,fma,f16c", |u, s| {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    });
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    x86_kernels!("avx2,fma,f16c,avxvnni", |u, s| {
        _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::packed::packed_ref;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every kernel (SIMD and scalar) against the f64 product of the dequantized weight and the
    /// dequantized activations: equal up to f32 rounding, since both sides see the same
    /// quantized values.
    #[test]
    fn kernels_equal_the_product_of_dequantized_operands() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (3, 70, 576);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&Tensor::randn(0f32, 1., (n, k), &dev)?, dtype)?;
            let wd: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let p = packed_ref(&q)?;
            let mut x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
                .flatten_all()?
                .to_vec1()?;
            x[5] = 0.0; // a block with a zero is fine; an all-zero block too:
            x[k..k + 32].iter_mut().for_each(|v| *v = 0.0);
            let rows: Vec<QuantRow> = x.chunks_exact(k).map(quantize_row).collect();
            let xd: Vec<Vec<f64>> = rows
                .iter()
                .map(|r| (0..k).map(|i| r.q[i] as f64 * r.d[i / QK] as f64).collect())
                .collect();
            let mut y = vec![0f32; m * n];
            matmul_wt(&x, p, (m, n, k), &mut y)?;
            // Every variant this CPU can run: scalar, AVX2, AVX-VNNI.
            let best = Kernel::pick(dtype);
            let mut kernels = vec![Kernel {
                dtype,
                avx2: false,
                vnni: false,
            }];
            if best.avx2 {
                kernels.push(Kernel {
                    vnni: false,
                    ..best
                });
            }
            if best.vnni {
                kernels.push(best);
            }
            let rb = p.row_bytes();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| xd[i][l] * wd[j * k + l] as f64).sum();
                    let row = &p.bytes[j * rb..(j + 1) * rb];
                    let each = kernels.iter().map(|kern| kern.dot(row, &rows[i]));
                    for got in std::iter::once(y[i * n + j]).chain(each) {
                        assert!(
                            (got as f64 - want).abs() < 1e-3 * want.abs().max(1.0),
                            "{dtype:?} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn activation_blocks_round_like_ggml() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.5).collect();
        let r = quantize_row(&x);
        assert_eq!(r.d[0], 10.0 / 127.0);
        assert_eq!(r.q[0], -127);
        assert_eq!(r.q[20], 0);
        let s: i32 = r.q[..32].iter().map(|&q| q as i32).sum();
        assert_eq!(r.sum[0], r.d[0] * s as f32);
    }
}
