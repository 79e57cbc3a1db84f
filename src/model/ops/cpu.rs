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

/// Runs `f` on a tensor's f32 data without copying it when it is contiguous on the CPU (the
/// backward passes read their saved inputs this way), else on a contiguous copy.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (s, l) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(c), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            return Ok(f(&c.as_slice::<f32>()?[a..b]));
        }
    }
    Ok(f(&to_vec(t)?))
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
