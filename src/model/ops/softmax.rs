//! The element-wise exponentials of training, vectorised: e^x, log-sum-exp and softmax over a
//! row (attention's scores, the LM head's 49,152 logits), and [`wide_fn`], which compiles a loop for
//! the CPU's widest vector instructions.
//!
//! Why our own: libm's `expf` is an opaque call, so a loop over 50 million logits runs it one
//! value at a time; [`exp`] inlines and vectorises. And the binary is built for the x86-64
//! baseline (4 f32 lanes) so that it runs on every CPU; [`wide_fn`] recompiles a loop for AVX-512
//! (16 lanes) or AVX2 (8 lanes) and picks one at run time.

/// Defines `fn name(args) -> R { body }` compiled three times: for AVX-512F, for AVX2 + FMA and
/// for the baseline, and picks one per call (std caches the CPUID check, so that costs one
/// load). The body is an `#[inline(always)]` function inlined into each variant, so its loops
/// (those calling [`exp`], sums over a row) vectorise 16, 8 or 4 lanes wide. A generic
/// closure-taking wrapper is not enough: LLVM then keeps a large closure out of line, compiled
/// for the baseline.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (and so AVX2 and FMA), checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

/// e^x in f32 for the kernels' hot loops (softmax, cross-entropy, SiLU).
///
/// Range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 Taylor polynomial for e^r
/// (relative error < 2e-7, as `expf`'s rounding), and 2^n built in the exponent bits. Below
/// −87.3 it returns 0 (so −∞ masks give exact zeros), and above 88 it saturates at e^88 rather
/// than +∞.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.3, 88.0);
    // Round to nearest by adding and subtracting 1.5·2²³ (f32::round is a libm call without
    // SSE4.1, which the baseline x86-64 target lacks).
    const SHIFT: f32 = 12_582_912.0;
    let n = (xc * LOG2E + SHIFT) - SHIFT;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// Lanes of the partial sums: one AVX-512 register (two AVX2 ones, four SSE ones). A single
/// running sum is a serial chain the compiler may not reorder, so it would not vectorise.
const LANES: usize = 16;

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// Σ e^(x − max) over a row, in lanes, then in f64; each e^(x − max) is written back into the
/// row.
#[inline(always)]
fn sum_exp(row: &mut [f32], max: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp(*v - max);
            *v = e;
            *a += e;
        }
    }
    let mut tail = 0f64;
    for v in chunks.into_remainder() {
        let e = exp(*v - max);
        *v = e;
        tail += e as f64;
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

wide_fn! {
/// log Σ exp over a row (the max subtracted first).
pub fn log_sum_exp(row: &[f32]) -> f32 {
        let max = max_of(row);
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += exp(v - max);
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| exp(v - max) as f64)
            .sum();
        max + ((acc.iter().map(|&a| a as f64).sum::<f64>() + tail).ln() as f32)
}
}

wide_fn! {
/// Replaces a row by its softmax and returns its log-sum-exp, with one exponential per element
/// (softmax = e^(x − max) / Σ). A row of only −∞ becomes zeros (not NaN) and returns −∞.
pub fn softmax_lse(row: &mut [f32]) -> f32 {
        let max = max_of(row);
        if max == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = 0.0);
            return f32::NEG_INFINITY;
        }
        let sum = sum_exp(row, max);
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
        max + sum.ln() as f32
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// Both row functions against f64 over odd lengths (lane remainders) and −∞ entries.
    #[test]
    fn softmax_and_log_sum_exp_match_f64() {
        let mut rng = crate::rng::Rng::new(5);
        for n in [1usize, 7, 16, 33, 576, 1537] {
            let mut row: Vec<f32> = (0..n)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 40.0)
                .collect();
            if n > 2 {
                row[1] = f32::NEG_INFINITY;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let lse = max + sum.ln();
            let got = log_sum_exp(&row) as f64;
            assert!(
                (got - lse).abs() < 1e-5 * lse.abs().max(1.0),
                "n={n}: {got} vs {lse}"
            );
            let mut soft = row.clone();
            let l = softmax_lse(&mut soft) as f64;
            assert!(
                (l - lse).abs() < 1e-5 * lse.abs().max(1.0),
                "n={n}: {l} vs {lse}"
            );
            for (p, &v) in soft.iter().zip(&row) {
                let want = (v as f64 - max).exp() / sum;
                assert!((*p as f64 - want).abs() < 1e-6, "n={n}: p {p} vs {want}");
            }
        }
        let mut masked = vec![f32::NEG_INFINITY; 5];
        assert_eq!(softmax_lse(&mut masked), f32::NEG_INFINITY);
        assert!(masked.iter().all(|&p| p == 0.0));
    }
}
