//! Softmax over the last dimension with a hand-written backward: dx = y ⊙ (dy − Σ dy ⊙ y).
//!
//! Why our own op: candle's `softmax_last_dim` has no backward (it silently detaches), and the
//! differentiable composition (max, sub, exp, sum, div) keeps four score-sized tensors alive per
//! attention layer. This one keeps only its output.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, from_vec, rows_per_task, to_vec};

struct Softmax;

fn softmax_rows(x: &[f32], cols: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(cols * rows_per_task(cols))
        .zip(x.par_chunks(cols * rows_per_task(cols)))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(cols).zip(xc.chunks(cols)) {
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - max).exp();
                    sum += *o as f64;
                }
                let inv = (1.0 / sum) as f32;
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
    y
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l.shape().dims().last().copied().unwrap_or(1);
        Ok((
            CpuStorage::F32(softmax_rows(f32_slice(s, l)?, cols)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let cols = y.dims().last().copied().unwrap_or(1);
        let (yv, dyv) = (to_vec(y)?, to_vec(dy)?);
        let mut dx = vec![0f32; yv.len()];
        let chunk = cols * rows_per_task(cols);
        dx.par_chunks_mut(chunk)
            .zip(yv.par_chunks(chunk).zip(dyv.par_chunks(chunk)))
            .for_each(|(dc, (yc, gc))| {
                for ((d, yr), gr) in dc
                    .chunks_mut(cols)
                    .zip(yc.chunks(cols))
                    .zip(gc.chunks(cols))
                {
                    let dot = yr
                        .iter()
                        .zip(gr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32;
                    for ((o, &a), &b) in d.iter_mut().zip(yr).zip(gr) {
                        *o = a * (b - dot);
                    }
                }
            });
        Ok(Some(from_vec(dx, y.shape(), y)?))
    }
}

/// `softmax(scale · x + mask)` over the last dimension, for attention: `x` is (b, h, t, T)
/// scores, `mask` (b or 1, t, T) additive, shared by every head. Fusing the scale and the mask
/// saves two score-sized passes and tensors per layer; the backward is the softmax's, times
/// `scale` (the mask is constant).
struct MaskedSoftmax {
    scale: f32,
    heads: usize,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = (f32_slice(xs, xl)?, f32_slice(ms, ml)?);
        let dims = xl.shape().dims();
        let (t, cols) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let per_batch = self.heads * t;
        let mask_batches = m.len() / (t * cols);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let (bi, i) = (r / per_batch, r % t);
                let mb = if mask_batches == 1 { 0 } else { bi };
                let mr = &m[(mb * t + i) * cols..(mb * t + i + 1) * cols];
                let mut max = f32::NEG_INFINITY;
                for ((o, &v), &k) in yr.iter_mut().zip(xr).zip(mr) {
                    *o = v * self.scale + k;
                    max = max.max(*o);
                }
                let mut sum = 0f64;
                for o in yr.iter_mut() {
                    *o = (*o - max).exp();
                    sum += *o as f64;
                }
                let inv = (1.0 / sum) as f32;
                yr.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _m: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = Softmax
            .bwd(y, y, dy)?
            .map(|d| d * self.scale as f64)
            .transpose()?;
        Ok((dx, None))
    }
}

/// `softmax(scale · scores + mask)` for attention scores (b, h, t, T) and an additive mask
/// (b or 1, t, T) shared by the heads; differentiable in the scores.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, h, t, total) = scores.dims4()?;
    let mask = mask.reshape(((), t, total))?;
    if !scores.device().is_cpu() || scores.dtype() != candle_core::DType::F32 {
        let x = (scores * scale)?.broadcast_add(&mask.unsqueeze(1)?)?;
        return softmax_last_dim(&x);
    }
    scores.contiguous()?.apply_op2(
        &mask.contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
            heads: h,
        },
    )
}

/// Softmax over the last dimension, differentiable. Falls back to the composition of candle ops
/// off the CPU.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?);
    }
    x.contiguous()?.apply_op1(Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut x = Tensor::randn(0f32, 2., (3, 5, 7), &dev)?;
        // A masked entry, as attention has.
        x = x.slice_assign(
            &[0..1, 0..1, 6..7],
            &Tensor::new(&[[[f32::NEG_INFINITY]]], &dev)?,
        )?;
        let y = softmax_last_dim(&x)?;
        let max = x.max_keepdim(2)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        let reference = e.broadcast_div(&e.sum_keepdim(2)?)?;
        assert!((y - reference)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 6), &dev)?)?;
        fd_check(&v, softmax_last_dim)
    }

    #[test]
    fn masked_softmax_matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t) = (2, 3, 4);
        let scores = Tensor::randn(0f32, 1., (b, h, t, t), &dev)?;
        let causal: Vec<f32> = (0..b * t * t)
            .map(|k| {
                if k % t > (k / t) % t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(causal, (b, 1, 1, t, t), &dev)?;
        let got = masked_softmax(&scores, &mask, 0.5)?;
        let x = (&scores * 0.5)?.broadcast_add(&mask.reshape((b, 1, t, t))?)?;
        let max = x.max_keepdim(3)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        let want = e.broadcast_div(&e.sum_keepdim(3)?)?;
        assert!((got - want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        fd_check(&Var::from_tensor(&scores)?, |s| {
            masked_softmax(s, &mask, 0.5)
        })
    }
}
