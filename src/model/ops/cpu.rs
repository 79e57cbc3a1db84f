//! Small helpers shared by the fused CPU kernels: contiguous f32 views of op arguments, and a
//! one-shot op that turns a closure over slices into a tensor (used for hand-written backward
//! passes, which are never differentiated again).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// The f32 data of a contiguous argument.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: argument must be contiguous"),
    }
}

/// Contiguous f32 data of a tensor, copied out (for backward passes).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// A tensor of `shape` from a freshly computed buffer on `like`'s device.
pub fn from_vec(v: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

/// Rows per parallel task so each task has at least ~16k elements of work.
pub fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// A tensor's f32 data for a backward pass: borrowed (the storage stays read-locked while the
/// view lives) when contiguous on the CPU, else a contiguous copy.
pub enum F32View<'a> {
    Borrowed(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl std::ops::Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32View::Borrowed(s, r) => match &**s {
                candle_core::Storage::Cpu(c) => &c.as_slice::<f32>().unwrap_or_default()[r.clone()],
                _ => &[],
            },
            F32View::Owned(v) => v,
        }
    }
}

/// The f32 data of `t` without a copy where possible (see [`F32View`]).
pub fn view(t: &Tensor) -> Result<F32View<'_>> {
    let (s, l) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(c), Some((a, b))) = (&*s, l.contiguous_offsets()) {
        if c.as_slice::<f32>().is_ok() {
            return Ok(F32View::Borrowed(s, a..b));
        }
    }
    drop(s);
    Ok(F32View::Owned(to_vec(t)?))
}

/// The u32 targets of a cross-entropy op, checked: contiguous, one per row, inside the
/// vocabulary. `op` names the op in the error.
pub fn targets<'a>(
    op: &str,
    ts: &'a CpuStorage,
    tl: &Layout,
    rows: usize,
    vocab: usize,
) -> Result<&'a [u32]> {
    let t = match tl.contiguous_offsets() {
        Some((a, b)) => &ts.as_slice::<u32>()?[a..b],
        None => candle_core::bail!("{op}: targets must be contiguous"),
    };
    if t.len() != rows {
        candle_core::bail!("{op}: {rows} rows but {} targets", t.len());
    }
    if let Some(bad) = t.iter().find(|&&x| x as usize >= vocab) {
        candle_core::bail!("{op}: target {bad} is outside the vocabulary ({vocab})");
    }
    Ok(t)
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`, every operand given as (pointer, row
/// stride, column stride) so transposed and interleaved views need no copy. `parallel` spreads
/// one product over the thread pool; kernels that already run one product per task pass false.
///
/// # Safety
/// The pointers must cover the strided extents given, and `dst` must not alias the operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    parallel: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        if accumulate { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        if parallel {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        },
    )
}

/// e^x in f32 for the kernels' hot loops (softmax, cross-entropy, SiLU).
///
/// Why our own: libm's `expf` is an opaque call, so a loop over 50 million logits runs it one
/// value at a time; this inlines and vectorises. Range reduction x = n·ln2 + r, |r| ≤ ln2/2,
/// then a degree-6 Taylor polynomial for e^r (relative error < 2e-7, as `expf`'s rounding), and
/// 2^n built in the exponent bits. Below −87.3 it returns 0 (so −∞ masks give exact zeros), and
/// above 88 it saturates at e^88 rather than +∞.
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

/// log Σ exp over a row (the max subtracted first), summed in lanes of 8 so the loop vectorises,
/// then in f64.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
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

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }
}
