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
