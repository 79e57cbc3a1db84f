//! Per-row cross-entropy `nll_r = logsumexp(z_r) − z_r[t_r]` with a hand-written backward:
//! dz_r = (softmax(z_r) − onehot(t_r)) · dnll_r, recomputed from the logits.
//!
//! Why our own op: over a 49k vocabulary the differentiable composition (max, sub, exp, sum,
//! log, gather) keeps four logits-sized tensors per batch; this keeps none.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, from_vec, targets, view};
use super::softmax::{exp, log_sum_exp};

/// Keeps each row's log-sum-exp from the forward pass, so the backward makes one pass.
#[derive(Default)]
struct CrossEntropy {
    lse: std::sync::Mutex<Vec<f32>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = f32_slice(zs, zl)?;
        let (n, v) = zl.shape().dims2()?;
        let t = targets("fused-cross-entropy", ts, tl, n, v)?;
        let lses: Vec<f32> = z.par_chunks(v).map(log_sum_exp).collect();
        let nll: Vec<f32> = lses
            .iter()
            .zip(z.chunks(v).zip(t))
            .map(|(l, (row, &ti))| l - row[ti as usize])
            .collect();
        *self.lse.lock().unwrap() = lses;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (zv, dv) = (view(z)?, view(dy)?);
        let tv: Vec<u32> = t.to_vec1()?;
        let v = z.dim(1)?;
        let saved = self.lse.lock().unwrap();
        let mut dz = vec![0f32; zv.len()];
        dz.par_chunks_mut(v)
            .zip(zv.par_chunks(v))
            .enumerate()
            .for_each(|(r, (d, row))| {
                let l = saved.get(r).copied().unwrap_or_else(|| log_sum_exp(row));
                for (o, &x) in d.iter_mut().zip(row) {
                    *o = exp(x - l) * dv[r];
                }
                d[tv[r] as usize] -= dv[r];
            });
        Ok((Some(from_vec(dz, z.shape(), z)?), None))
    }
}

/// Negative log-likelihood of `targets` (n, u32) under `logits` (n, vocab), one value per row,
/// differentiable in the logits. Off the CPU, the composition of candle ops.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !super::fusable(logits) {
        return cross_entropy_reference(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy::default())
}

/// The same negative log-likelihood as a composition of candle ops (any device; the test
/// reference).
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    (lse - shifted.gather(&targets.unsqueeze(1)?, 1)?)?.squeeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 3., (4, 11), &dev)?;
        let t = Tensor::new(&[3u32, 0, 10, 3], &dev)?;
        let max = z.max_keepdim(1)?;
        let shifted = z.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let reference = (lse - shifted.gather(&t.unsqueeze(1)?, 1)?)?.squeeze(1)?;
        let d = (cross_entropy(&z, &t)? - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        fd_check(&Var::from_tensor(&z)?, |x| cross_entropy(x, &t))?;
        assert!(cross_entropy(&z, &Tensor::new(&[3u32, 0, 11, 3], &dev)?).is_err());
        Ok(())
    }
}
