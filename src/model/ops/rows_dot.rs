//! Dot products of one weight row with several activation rows: `out[r] = Σₗ w[l]·x[r][l]`,
//! the weight row (f32 or bf16) loaded and widened once for up to eight rows of x.
//!
//! Why our own: batched decoding multiplies every weight row with one activation row per
//! sequence. A dot product per (weight row, sequence) pair loads and converts the weight row
//! again for each sequence, which made a step of 8 sequences cost 7× one of 1 (measured: 65
//! tokens/s for 8 clients against 55 for one). Here each chunk of the weight row is loaded once
//! and multiplied into every sequence's accumulators.
//!
//! Every row's sum is formed in the same order whatever the number of rows (two 16-lane
//! accumulators over alternate chunks of 16, then one fixed reduction), so a sequence gets the
//! same logits alone and batched, bit for bit.

/// One row of W: f32 values, or bf16 values as little-endian bytes.
#[derive(Clone, Copy)]
pub enum WRow<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u8]),
}

impl WRow<'_> {
    fn len(&self) -> usize {
        match self {
            WRow::F32(w) => w.len(),
            WRow::Bf16(b) => b.len() / 2,
        }
    }

    /// Element `i` as f32 (the reference path).
    fn get(&self, i: usize) -> f32 {
        match self {
            WRow::F32(w) => w[i],
            WRow::Bf16(b) => {
                f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
            }
        }
    }
}

/// Rows of x multiplied together (one accumulator pair each).
const GROUP: usize = 8;
/// Lanes per accumulator.
const LANES: usize = 16;

/// `out[r] = w · x[r·k .. (r+1)·k]` for every r < out.len(), k = w's length.
pub fn dot_rows(w: WRow, x: &[f32], out: &mut [f32]) {
    let k = w.len();
    assert_eq!(
        x.len(),
        out.len() * k,
        "dot_rows: x is not {}×{k}",
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        for (g, o) in out.chunks_mut(GROUP).enumerate() {
            let xs = &x[g * GROUP * k..(g * GROUP + o.len()) * k];
            // SAFETY: AVX-512F was detected on this CPU; `xs` holds o.len() rows of k values
            // (checked above) and every read of w and xs stays inside them (full chunks read
            // directly, the last partial chunk copied into zero-padded buffers).
            unsafe { avx512::dot_group(w, xs, k, o) };
        }
        return;
    }
    for (g, o) in out.chunks_mut(GROUP).enumerate() {
        let xs = &x[g * GROUP * k..(g * GROUP + o.len()) * k];
        lanes_group(w, xs, k, o);
    }
}

/// The portable path: the same two 16-lane accumulators per row, in plain arrays.
fn lanes_group(w: WRow, xs: &[f32], k: usize, out: &mut [f32]) {
    let mut acc = [[[0f32; LANES]; 2]; GROUP];
    let mut wc = [0f32; LANES];
    for (c, start) in (0..k).step_by(LANES).enumerate() {
        let n = LANES.min(k - start);
        wc.iter_mut()
            .enumerate()
            .for_each(|(l, v)| *v = if l < n { w.get(start + l) } else { 0.0 });
        for (r, a) in acc.iter_mut().enumerate().take(out.len()) {
            let xr = &xs[r * k + start..r * k + start + n];
            for l in 0..n {
                a[c % 2][l] += wc[l] * xr[l];
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        let mut s = [0f32; LANES];
        for l in 0..LANES {
            s[l] = a[0][l] + a[1][l];
        }
        *o = reduce(&s);
    }
}

/// Pairwise sum of 16 lanes (the order `_mm512_reduce_add_ps` uses need not match: each path
/// only has to agree with itself).
fn reduce(s: &[f32; LANES]) -> f32 {
    let mut v = *s;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            v[i] += v[i + w];
        }
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{WRow, GROUP, LANES};

    use std::arch::x86_64::*;

    /// 16 elements of w from `start` (all present) as f32.
    #[inline(always)]
    unsafe fn load_w(w: WRow, start: usize) -> __m512 {
        match w {
            WRow::F32(w) => _mm512_loadu_ps(w.as_ptr().add(start)),
            WRow::Bf16(b) => {
                let h = _mm256_loadu_si256(b.as_ptr().add(2 * start) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
        }
    }

    /// [`dot_group_m`] for `out.len()` ≤ [`GROUP`] rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_group(w: WRow, xs: &[f32], k: usize, out: &mut [f32]) {
        match out.len() {
            1 => dot_group_m::<1>(w, xs, k, out),
            2 => dot_group_m::<2>(w, xs, k, out),
            3 => dot_group_m::<3>(w, xs, k, out),
            4 => dot_group_m::<4>(w, xs, k, out),
            5 => dot_group_m::<5>(w, xs, k, out),
            6 => dot_group_m::<6>(w, xs, k, out),
            7 => dot_group_m::<7>(w, xs, k, out),
            _ => dot_group_m::<GROUP>(w, xs, k, out),
        }
    }

    /// M rows at once: a constant M lets the compiler keep all 2·M accumulators in registers
    /// (with a run-time count they lived on the stack, and every multiply-add waited on a
    /// store and a load).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // a0, a1 and out indexed in lockstep
    unsafe fn dot_group_m<const M: usize>(w: WRow, xs: &[f32], k: usize, out: &mut [f32]) {
        let mut a0 = [_mm512_setzero_ps(); M];
        let mut a1 = [_mm512_setzero_ps(); M];
        let full = k / LANES;
        let x = xs.as_ptr();
        let mut c = 0;
        while c + 1 < full {
            let (s0, s1) = (c * LANES, (c + 1) * LANES);
            let (w0, w1) = (load_w(w, s0), load_w(w, s1));
            for r in 0..M {
                a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.add(r * k + s0)), a0[r]);
                a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(r * k + s1)), a1[r]);
            }
            c += 2;
        }
        if c < full {
            let s0 = c * LANES;
            let w0 = load_w(w, s0);
            for r in 0..M {
                a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.add(r * k + s0)), a0[r]);
            }
        }
        let rest = k - full * LANES;
        if rest > 0 {
            let start = full * LANES;
            let mut wb = [0f32; LANES];
            for (l, v) in wb.iter_mut().enumerate().take(rest) {
                *v = w.get(start + l);
            }
            let wv = _mm512_loadu_ps(wb.as_ptr());
            for r in 0..M {
                let mut xb = [0f32; LANES];
                xb[..rest].copy_from_slice(&xs[r * k + start..r * k + k]);
                let xv = _mm512_loadu_ps(xb.as_ptr());
                if full.is_multiple_of(2) {
                    a0[r] = _mm512_fmadd_ps(wv, xv, a0[r]);
                } else {
                    a1[r] = _mm512_fmadd_ps(wv, xv, a1[r]);
                }
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

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }

    #[test]
    fn rows_equal_their_reference_and_do_not_depend_on_the_others() {
        let mut rng = crate::rng::Rng::new(5);
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        for k in [1, 15, 16, 17, 64, 100, 576] {
            let m = 11;
            let x = rand(m * k);
            let wf = rand(k);
            let wb = bf16_bytes(&wf);
            for w in [WRow::F32(&wf), WRow::Bf16(&wb)] {
                let mut all = vec![0f32; m];
                dot_rows(w, &x, &mut all);
                for r in 0..m {
                    // f64 reference on the same (rounded) weights.
                    let want: f64 = (0..k).map(|l| w.get(l) as f64 * x[r * k + l] as f64).sum();
                    let scale: f64 = (0..k)
                        .map(|l| (w.get(l) as f64 * x[r * k + l] as f64).abs())
                        .sum::<f64>()
                        .max(1e-6);
                    assert!(
                        ((all[r] as f64 - want) / scale).abs() < 1e-6,
                        "k {k} row {r}"
                    );
                    let mut one = [0f32];
                    dot_rows(w, &x[r * k..(r + 1) * k], &mut one);
                    assert_eq!(one[0].to_bits(), all[r].to_bits(), "k {k} row {r}");
                }
                // The portable path agrees with the vector one to rounding.
                let mut port = vec![0f32; m];
                for (g, o) in port.chunks_mut(GROUP).enumerate() {
                    lanes_group(w, &x[g * GROUP * k..(g * GROUP + o.len()) * k], k, o);
                }
                for (a, b) in port.iter().zip(&all) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "k {k}: {a} vs {b}");
                }
            }
        }
    }
}
