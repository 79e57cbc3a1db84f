//! `C (m × n) [+]= A (m × k) · B (k × n)` with A and B rounded to bf16 and every product
//! accumulated in f32, on AVX512-BF16's `vdpbf16ps` (AMD Zen 4/5, Intel Cooper Lake, Sapphire
//! Rapids and later). The frozen base's products in LoRA training (`compute = "bf16"`) run
//! here; LoRA's own small products, their gradients and the optimizer stay f32.
//!
//! Why our own: the `gemm` crate has no bf16-input kernel on x86, and `vdpbf16ps` does two
//! multiply-adds per f32 lane, twice the f32 FMA rate. PyTorch's `--autocast bf16` gets the same
//! from oneDNN.
//!
//! Layout: `vdpbf16ps` multiplies *pairs* of bf16 in each 32-bit lane, so both operands are
//! packed as pairs along k. A is row-major pairs (`a[i·k2 + p] = (A[i][2p], A[i][2p+1])`);
//! B is packed pair-rows (`b[p·ldb + j] = (B[2p][j], B[2p+1][j])`), the first element in the low
//! 16 bits. An odd k is padded with a zero pair half. The micro-kernel holds an `MR × 32` tile
//! of C in 16 zmm registers: per pair step, two loads of B, `MR` broadcasts of A, `2·MR`
//! `vdpbf16ps`.

/// Rows of C per micro-tile.
const MR: usize = 8;
/// Columns of C per micro-tile (two zmm of f32).
pub const NR: usize = 32;
/// Most pairs of k per cache block (B's strip: 384 · 32 · 4 = 48 KiB, about L1); k is split
/// into equal blocks so that no block is a short remainder (each block re-reads C's tile).
const KC: usize = 384;
/// Rows of A per cache block (128 · 256 · 4 = 128 KiB, in L2).
const MC: usize = 128;

/// Whether this CPU runs the bf16 kernels (`vdpbf16ps`); the caller falls back to f32 otherwise.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 bits of `x` rounded to nearest even, in the high half of a u32 (low half garbage):
/// the integer form of `vcvtne2ps2bf16`, which vectorises anywhere. NaNs with only low mantissa
/// bits set would round to infinity; weights and activations here are finite.
#[inline(always)]
fn rne_high(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7fff + ((b >> 16) & 1))
}

/// One pair: `lo` in the low 16 bits, `hi` in the high 16 bits.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (rne_high(lo) >> 16) | (rne_high(hi) & 0xffff_0000)
}

/// Pairs per row for `k` values.
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// A (m × k, row-major f32) as bf16 pairs, `m × pairs(k)` u32 into `out`.
pub fn pack_a(a: &[f32], (m, k): (usize, usize), out: &mut Vec<u32>) {
    out.resize(m * pairs(k), 0);
    pack_a_into(a, (m, k), out);
}

/// [`pack_a`] into a slice of exactly `m × pairs(k)` words.
pub fn pack_a_into(a: &[f32], (m, k): (usize, usize), out: &mut [u32]) {
    assert_eq!(a.len(), m * k, "pack_a: A is not {m}×{k}");
    let k2 = pairs(k);
    assert_eq!(out.len(), m * k2, "pack_a: out is not {m}×{k2}");
    for (row, dst) in a
        .chunks_exact(k.max(1))
        .zip(out.chunks_exact_mut(k2.max(1)))
    {
        convert_pairs(row, dst);
    }
}

/// One row of f32 as bf16 pairs (`dst.len() == pairs(src.len())`).
fn convert_pairs(src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F/BW/BF16 (checked by `available`).
        unsafe { x86::convert_pairs(src, dst) };
        return;
    }
    convert_pairs_scalar(src, dst);
}

fn convert_pairs_scalar(src: &[f32], dst: &mut [u32]) {
    for (p, d) in dst.iter_mut().enumerate() {
        *d = pair(src[2 * p], src.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

/// Columns of a packed B for `n` columns of C: `n` rounded up to [`NR`] (the padding is zero).
pub fn packed_cols(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

/// B = Wᵀ for `w` (rows × k, row-major: a tile of a weight's output rows), packed as
/// `pairs(k) × packed_cols(rows)` into `out` (the forward product y = x Wᵀ).
pub fn pack_bt(w: &[f32], (rows, k): (usize, usize), out: &mut Vec<u32>) {
    out.clear();
    out.resize(pairs(k) * packed_cols(rows), 0);
    pack_bt_into(w, (rows, k), out);
}

/// [`pack_bt`] into a buffer of exactly `pairs(k) × packed_cols(rows)` words whose padding
/// columns are already zero (a fresh buffer).
pub fn pack_bt_into(w: &[f32], (rows, k): (usize, usize), out: &mut [u32]) {
    assert_eq!(w.len(), rows * k, "pack_bt: W is not {rows}×{k}");
    let (k2, ldb) = (pairs(k), packed_cols(rows));
    assert_eq!(out.len(), k2 * ldb, "pack_bt: output is not {k2}×{ldb}");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F/BW (checked by `available`).
        unsafe { x86::pack_bt(w, (rows, k), out, ldb) };
        return;
    }
    pack_bt_scalar(w, (rows, k), out, ldb);
}

/// [`pack_bt`]'s loop: 16 rows of W at a time, so each pair row of B gets 16 contiguous words.
#[inline(always)]
fn pack_bt_scalar(w: &[f32], (rows, k): (usize, usize), out: &mut [u32], ldb: usize) {
    let k2 = pairs(k);
    for j0 in (0..rows).step_by(16) {
        let j1 = (j0 + 16).min(rows);
        for p in 0..k2 {
            let dst = &mut out[p * ldb + j0..p * ldb + j1];
            for (jj, d) in dst.iter_mut().enumerate() {
                let row = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
                *d = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
            }
        }
    }
}

/// B = W for `w` (rows × k, row-major: a tile of a weight's rows, reduced over in the input
/// gradient dx = dy W), packed as `pairs(rows) × packed_cols(k)` into `out`.
pub fn pack_b(w: &[f32], (rows, k): (usize, usize), out: &mut Vec<u32>) {
    out.clear();
    out.resize(pairs(rows) * packed_cols(k), 0);
    pack_b_into(w, (rows, k), out);
}

/// [`pack_b`] into a buffer of exactly `pairs(rows) × packed_cols(k)` words whose padding
/// columns are already zero (a fresh buffer).
pub fn pack_b_into(w: &[f32], (rows, k): (usize, usize), out: &mut [u32]) {
    assert_eq!(w.len(), rows * k, "pack_b: W is not {rows}×{k}");
    let ldb = packed_cols(k);
    assert_eq!(out.len(), pairs(rows) * ldb, "pack_b: output size");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F/BW (checked by `available`).
        unsafe { x86::pack_b(w, (rows, k), out, ldb) };
        return;
    }
    pack_b_scalar(w, (rows, k), out, ldb);
}

/// [`pack_b`]'s loop: pair row p interleaves W's rows 2p (low halves) and 2p + 1 (high).
#[inline(always)]
fn pack_b_scalar(w: &[f32], (rows, k): (usize, usize), out: &mut [u32], ldb: usize) {
    for p in 0..pairs(rows) {
        let dst = &mut out[p * ldb..p * ldb + k];
        let lo = &w[2 * p * k..(2 * p + 1) * k];
        if 2 * p + 1 < rows {
            let hi = &w[(2 * p + 1) * k..(2 * p + 2) * k];
            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(l, h);
            }
        } else {
            for (d, &l) in dst.iter_mut().zip(lo) {
                *d = pair(l, 0.0);
            }
        }
    }
}

/// `c[i·ldc + j] [+]= Σ_p a·b` for i < m, j < n, p < k2: A's pairs at `a[i·lda + p]` (packed by
/// [`pack_a`]), B's at `b[p·ldb + j]` (packed by [`pack_bt`] / [`pack_b`]; ldb ≥ n, a multiple
/// of [`NR`]).
///
/// # Safety
/// `c` points to a region where element (i, j) at `i·ldc + j` is writable for i < m, j < n,
/// and nothing else reads or writes those elements meanwhile. The CPU has the features
/// [`available`] checks (panics otherwise).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    (a, lda): (&[u32], usize),
    (b, ldb): (&[u32], usize),
    (m, n, k2): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(available(), "bf16 gemm on a CPU without AVX512-BF16");
    assert!(lda >= k2, "bf16 gemm: lda {lda} < {k2} pairs");
    assert!(
        m == 0 || a.len() >= (m - 1) * lda + k2,
        "bf16 gemm: A holds {} < {m} rows of {lda}",
        a.len()
    );
    assert!(
        ldb % NR == 0 && ldb >= n,
        "bf16 gemm: ldb {ldb} for {n} columns"
    );
    assert!(
        b.len() >= k2 * ldb,
        "bf16 gemm: B holds {} < {k2}×{ldb}",
        b.len()
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: features asserted above; operand extents asserted above; the caller guarantees
    // C's region.
    unsafe {
        x86::gemm((a, lda), (b, ldb), (m, n, k2), c, ldc, accumulate)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, MC, MR, NR};
    use std::arch::x86_64::*;

    /// [`super::convert_pairs`] 32 values at a time with `vcvtne2ps2bf16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn convert_pairs(src: &[f32], dst: &mut [u32]) {
        let n = src.len();
        assert_eq!(dst.len(), n.div_ceil(2));
        let mut i = 0;
        while i < n {
            let left = n - i;
            let lo_mask: __mmask16 = if left >= 16 {
                0xffff
            } else {
                (1u32 << left) as u16 - 1
            };
            let hi_left = left.saturating_sub(16);
            let hi_mask: __mmask16 = if hi_left >= 16 {
                0xffff
            } else {
                ((1u32 << hi_left) - 1) as u16
            };
            // SAFETY: masked loads touch only src[i..i + left.min(32)], in bounds.
            let (lo, hi) = unsafe {
                (
                    _mm512_maskz_loadu_ps(lo_mask, src.as_ptr().add(i)),
                    _mm512_maskz_loadu_ps(hi_mask, src.as_ptr().wrapping_add(i + 16)),
                )
            };
            // 32 bf16: the first 16 from `lo` in the low half.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let words = left.min(32).div_ceil(2);
            let m: __mmask16 = if words >= 16 {
                0xffff
            } else {
                ((1u32 << words) - 1) as u16
            };
            // SAFETY: writes dst[i/2 .. i/2 + words], in bounds (dst has ceil(n/2) words).
            unsafe { _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i / 2).cast(), m, v) };
            i += 32;
        }
    }

    /// [`super::pack_bt_scalar`] compiled for AVX-512 (the loop vectorises).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_bt(w: &[f32], dims: (usize, usize), out: &mut [u32], ldb: usize) {
        super::pack_bt_scalar(w, dims, out, ldb)
    }

    /// [`super::pack_b_scalar`] compiled for AVX-512 (the loop vectorises).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_b(w: &[f32], dims: (usize, usize), out: &mut [u32], ldb: usize) {
        super::pack_b_scalar(w, dims, out, ldb)
    }

    /// See [`super::gemm`]: blocks of KC pairs × MC rows, then MR × NR micro-tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn gemm(
        (a, lda): (&[u32], usize),
        (b, ldb): (&[u32], usize),
        (m, n, k2): (usize, usize, usize),
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        if k2 == 0 && !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is in C's region (caller's contract).
                    unsafe { *c.add(i * ldc + j) = 0.0 };
                }
            }
            return;
        }
        let block = k2.div_ceil(k2.div_ceil(KC).max(1)).max(1);
        for p0 in (0..k2).step_by(block) {
            let kc = block.min(k2 - p0);
            let add = accumulate || p0 > 0;
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                for j0 in (0..n).step_by(NR) {
                    let nr = NR.min(n - j0);
                    for i in (i0..i0 + mc).step_by(MR) {
                        let mr = MR.min(i0 + mc - i);
                        // SAFETY: A rows i..i+mr and pairs p0..p0+kc lie in `a` (m rows of lda);
                        // B pairs p0..p0+kc, columns j0..j0+NR lie in `b` (k2 × ldb, ldb a
                        // multiple of NR ≥ n); C's elements (i.., j0..) with mr rows and nr
                        // columns are in the caller's region.
                        unsafe {
                            tile(
                                a.as_ptr().add(i * lda + p0),
                                lda,
                                b.as_ptr().add(p0 * ldb + j0),
                                ldb,
                                kc,
                                c.add(i * ldc + j0),
                                ldc,
                                (mr, nr),
                                add,
                            )
                        };
                    }
                }
            }
        }
    }

    /// One MR × NR tile of C over `kc` pairs. Rows past `mr` read A row 0 again (their results
    /// are discarded); columns past `nr` are B's zero padding.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a: *const u32,
        lda: usize,
        b: *const u32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        (mr, nr): (usize, usize),
        accumulate: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        let rows: [usize; MR] = std::array::from_fn(|r| if r < mr { r * lda } else { 0 });
        for p in 0..kc {
            // SAFETY: in bounds per the caller (B row p, 32 columns; A rows < mr, pair p).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * ldb).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * ldb + 16).cast()));
                for r in 0..MR {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(rows[r] + p) as i32));
                    acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], av, b0);
                    acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], av, b1);
                }
            }
        }
        let m0: __mmask16 = if nr >= 16 {
            0xffff
        } else {
            ((1u32 << nr) - 1) as u16
        };
        let r1 = nr.saturating_sub(16);
        let m1: __mmask16 = if r1 >= 16 {
            0xffff
        } else {
            ((1u32 << r1) - 1) as u16
        };
        for r in 0..mr {
            // SAFETY: row r < mr, columns < nr of C (masked), in the caller's region.
            unsafe {
                let row = c.add(r * ldc);
                let (mut v0, mut v1) = (acc[2 * r], acc[2 * r + 1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32() as f64)
            .collect()
    }

    #[test]
    fn conversion_rounds_to_nearest_even_like_half() {
        for n in [0, 1, 2, 15, 16, 17, 31, 32, 33, 64, 95] {
            let mut src = rand(n, n as u64 + 3);
            if n > 4 {
                // Ties and specials.
                src[0] = f32::from_bits(0x3f80_8000); // exactly halfway: rounds to even
                src[1] = f32::from_bits(0x3f81_8000);
                src[2] = -0.0;
                // (Not subnormals: `vcvtne2ps2bf16` flushes them to zero, half keeps them.)
                src[3] = f32::from_bits(0x3f82_8000); // halfway, odd: rounds up
            }
            let mut got = vec![0u32; pairs(n)];
            convert_pairs(&src, &mut got);
            // half's conversion is the reference rounding.
            let h = |i: usize| {
                src.get(i)
                    .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32)
            };
            let want: Vec<u32> = (0..pairs(n))
                .map(|p| h(2 * p) | h(2 * p + 1) << 16)
                .collect();
            assert_eq!(got, want, "n = {n}");
        }
    }

    /// Both packings against a naive f64 GEMM of the bf16-rounded operands, over odd shapes.
    #[test]
    fn products_equal_a_naive_gemm_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 33, 5),
            (9, 31, 64),
            (33, 70, 577),
            (130, 65, 576),
            (17, 1536, 33),
        ] {
            let x = rand(m * k, 1 + m as u64);
            let w = rand(n * k, 2 + n as u64);
            let (xr, wr) = (round(&x), round(&w));
            // Forward: y = x Wᵀ.
            let want: Vec<f64> = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    (0..k).map(|l| xr[i * k + l] * wr[j * k + l]).sum()
                })
                .collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            pack_a(&x, (m, k), &mut a);
            pack_bt(&w, (n, k), &mut b);
            let mut y = vec![0.5f32; m * n];
            // SAFETY: y is m × n with row stride n, exclusively borrowed.
            unsafe {
                gemm(
                    (&a, pairs(k)),
                    (&b, packed_cols(n)),
                    (m, n, pairs(k)),
                    y.as_mut_ptr(),
                    n,
                    false,
                )
            };
            close(&y, &want, k, "forward");
            // SAFETY: as above.
            unsafe {
                gemm(
                    (&a, pairs(k)),
                    (&b, packed_cols(n)),
                    (m, n, pairs(k)),
                    y.as_mut_ptr(),
                    n,
                    true,
                )
            };
            let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
            close(&y, &twice, k, "accumulate");
            // Input gradient: dx (m × k) = dy (m × n) W (n × k).
            let dy = rand(m * n, 3 + k as u64);
            let dyr = round(&dy);
            let want: Vec<f64> = (0..m * k)
                .map(|e| {
                    let (i, l) = (e / k, e % k);
                    (0..n).map(|j| dyr[i * n + j] * wr[j * k + l]).sum()
                })
                .collect();
            pack_a(&dy, (m, n), &mut a);
            pack_b(&w, (n, k), &mut b);
            let mut dx = vec![-1f32; m * k];
            // SAFETY: dx is m × k with row stride k, exclusively borrowed.
            unsafe {
                gemm(
                    (&a, pairs(n)),
                    (&b, packed_cols(k)),
                    (m, k, pairs(n)),
                    dx.as_mut_ptr(),
                    k,
                    false,
                )
            };
            close(&dx, &want, n, "backward");
        }
    }

    /// f32 accumulation of exact bf16 products: the only error is the f32 sum's rounding.
    fn close(got: &[f32], want: &[f64], terms: usize, what: &str) {
        let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 * scale * (terms as f64).sqrt().max(1.0);
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }
}
