//! RMSNorm `y = x · r · w`, r = 1/√(mean(x²) + ε), with a hand-written backward:
//! dx = r·(w⊙dy) − x·r³/n·Σ(w⊙dy⊙x), dw = Σ_rows dy⊙x·r.
//!
//! Why our own op: candle's `rms_norm` has no backward (it silently detaches); the composition
//! of differentiable ops keeps five activation-sized tensors per norm.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, from_vec, rows_per_task, view};

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        let chunk = n * rows_per_task(n);
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
                    let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let r = (1.0 / (ms + self.eps as f64).sqrt()) as f32;
                    for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                        *o = v * r * g;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, gv) = (view(x)?, view(w)?, view(dy)?);
        let n = wv.len();
        let chunk = n * rows_per_task(n);
        let mut dx = vec![0f32; xv.len()];
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
            .map(|(dc, (xc, gc))| {
                let mut dw = vec![0f32; n];
                for ((d, xr), gr) in dc.chunks_mut(n).zip(xc.chunks(n)).zip(gc.chunks(n)) {
                    let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let r64 = 1.0 / (ms + self.eps as f64).sqrt();
                    let r = r64 as f32;
                    let dot: f64 = xr
                        .iter()
                        .zip(gr)
                        .zip(wv.iter())
                        .map(|((&a, &b), &c)| a as f64 * b as f64 * c as f64)
                        .sum();
                    let k = (r64 * r64 * r64 * dot / n as f64) as f32;
                    for i in 0..n {
                        d[i] = r * wv[i] * gr[i] - xr[i] * k;
                        dw[i] += gr[i] * xr[i] * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; n];
        for part in dw_parts {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok((
            Some(from_vec(dx, x.shape(), x)?),
            Some(from_vec(dw, w.shape(), w)?),
        ))
    }
}

/// RMSNorm over the last dimension, differentiable in x and w. Off the CPU, the composition of
/// candle ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::fusable(x) {
        return rms_norm_reference(x, w, eps);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// The same RMSNorm as a composition of candle ops (any device; the test reference).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let var = x.sqr()?.mean_keepdim(2)?;
        let reference = x.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?;
        let d = (rms_norm(&x, &w, 1e-5)? - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let xv = Var::from_tensor(&x)?;
        fd_check(&xv, |t| rms_norm(t, &w, 1e-5))?;
        let wv = Var::from_tensor(&w)?;
        fd_check(&wv, |t| rms_norm(&x, t, 1e-5))
    }
}
