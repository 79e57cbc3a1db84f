//! The language-model head and the cross-entropy in one op, a chunk of rows at a time (as
//! Liger-Kernel's fused linear cross-entropy): nll_r = logsumexp(h_r Wᵀ) − h_r·W[t_r], and, in the
//! same pass, dh_r = (softmax(h_r Wᵀ) − onehot(t_r)) W, which the backward only scales by dnll_r.
//!
//! Why our own op: with a 49k vocabulary the logits of a 4 × 256 batch are 200 MB; written out,
//! read for the loss, read again for the softmax gradient, and the 200 MB gradient written and
//! read by the GEMM. Here the logits of 64 rows (12 MB) live only while their row block is
//! processed. The head weight must be frozen (LoRA, or full fine-tuning with tied embeddings
//! frozen is not supported: callers fall back to the unfused path for a trainable head).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, targets, view};
use super::frozen_matmul::detached;
use super::packed_matmul::{
    bf16_panels_bytes, dequantize_all, matmul_w, matmul_w_panels, matmul_wt, matmul_wt_panels,
    weight_view, Bf16Panels, MatmulMode, WeightRef,
};
use super::softmax::{log_sum_exp, softmax_lse};
use crate::model::weights::Weight;

/// Rows whose logits are held at once.
const ROWS: usize = 256;

/// Largest head whose bf16 conversion (both packings) or f32 dequantization is kept for a
/// whole pass: 256 MiB. A 49,152 × 576 head takes 108 MiB; a 151,936 × 1,536 one would take
/// 890 MiB and is converted per block instead.
const PANEL_CACHE_BYTES: usize = 256 << 20;

struct LinearCrossEntropy {
    /// (vocab, hidden), frozen; f32 or packed (a tile of vocabulary rows is dequantized at a
    /// time, per row block).
    weight: Weight,
    /// Compute dh in the forward pass (training); off for evaluation.
    with_grad: bool,
    /// Products in bf16 (see [`MatmulMode::bf16`]); never quantized dot products.
    mode: MatmulMode,
    /// dh (rows × hidden), unscaled, for the backward.
    dh: Mutex<Option<Vec<f32>>>,
}

impl LinearCrossEntropy {
    fn run(&self, h: &[f32], t: &[u32], w: WeightRef, hs: usize, vocab: usize) -> Result<Vec<f32>> {
        let n = t.len();
        let mut nll = vec![0f32; n];
        let mut dh = if self.with_grad {
            vec![0f32; n * hs]
        } else {
            Vec::new()
        };
        let mut logits = vec![0f32; ROWS.min(n) * vocab];
        // In bf16 every block of rows would convert the whole head again, forward and backward:
        // convert it once per pass where that copy is small.
        let cache = n > ROWS
            && self.mode.takes_bf16(ROWS)
            && bf16_panels_bytes((vocab, hs)) <= PANEL_CACHE_BYTES;
        let fwd = match cache {
            true => Some(Bf16Panels::build(w, (vocab, hs), false)?),
            false => None,
        };
        let bwd = match cache && self.with_grad {
            true => Some(Bf16Panels::build(w, (vocab, hs), true)?),
            false => None,
        };
        // In f32 a packed head is likewise dequantized once per pass, not once per block.
        let dense = match w {
            WeightRef::Packed(p) if !cache && n > ROWS && vocab * hs * 4 <= PANEL_CACHE_BYTES => {
                Some(dequantize_all(p, (vocab, hs))?)
            }
            _ => None,
        };
        let w = match &dense {
            Some(d) => WeightRef::F32(d),
            None => w,
        };
        for r0 in (0..n).step_by(ROWS) {
            let m = ROWS.min(n - r0);
            let z = &mut logits[..m * vocab];
            let hr = &h[r0 * hs..(r0 + m) * hs];
            // z = h Wᵀ
            match &fwd {
                Some(p) if self.mode.takes_bf16(m) => matmul_wt_panels(hr, p, m, z, false),
                _ => matmul_wt(hr, w, (m, vocab, hs), z, false, self.mode)?,
            }
            let with_grad = self.with_grad;
            z.par_chunks_mut(vocab)
                .zip(nll[r0..r0 + m].par_iter_mut())
                .zip(t[r0..r0 + m].par_iter())
                .for_each(|((row, out), &ti)| {
                    let zt = row[ti as usize];
                    if with_grad {
                        // One exponential per logit: the row becomes softmax − onehot.
                        *out = softmax_lse(row) - zt;
                        row[ti as usize] -= 1.0;
                    } else {
                        *out = log_sum_exp(row) - zt;
                    }
                });
            if with_grad {
                // dh = (softmax − onehot) W
                let dhr = &mut dh[r0 * hs..(r0 + m) * hs];
                match &bwd {
                    Some(p) if self.mode.takes_bf16(m) => matmul_w_panels(z, p, m, dhr, false),
                    _ => matmul_w(z, w, (m, vocab, hs), dhr, false, self.mode)?,
                }
            }
        }
        if self.with_grad {
            *self.dh.lock().unwrap() = Some(dh);
        }
        Ok(nll)
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs_: &CpuStorage,
        hl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, hs) = hl.shape().dims2()?;
        let (vocab, hs2) = self.weight.dims2().map_err(candle_core::Error::wrap)?;
        if hs != hs2 {
            candle_core::bail!("linear-cross-entropy: hidden {hs} but head weight has {hs2}");
        }
        let t = targets("linear-cross-entropy", ts, tl, n, vocab)?;
        let h = f32_slice(hs_, hl)?;
        let w = weight_view(&self.weight)?;
        let nll = self.run(h, t, w.get(), hs, vocab)?;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _t: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.dh.lock().unwrap();
        let Some(dh) = guard.as_ref() else {
            candle_core::bail!("linear-cross-entropy: backward without a training forward pass");
        };
        let hs = h.dim(1)?;
        let g = view(dy)?;
        let mut out = vec![0f32; dh.len()];
        out.par_chunks_mut(hs)
            .zip(dh.par_chunks(hs))
            .zip(g.par_iter())
            .for_each(|((o, d), &s)| o.iter_mut().zip(d).for_each(|(o, d)| *o = d * s));
        Ok((Some(Tensor::from_vec(out, h.shape(), h.device())?), None))
    }
}

/// Negative log-likelihood of `targets` (n, u32) under the logits `hidden · weightᵀ`, one value
/// per row, for `hidden` (n, hs) and a frozen head `weight` (vocab, hs); differentiable in
/// `hidden` when `with_grad` (training); the head's products in bf16 when `bf16` (training's
/// `compute = "bf16"`). Off the CPU (or not f32), [`linear_cross_entropy_reference`].
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Weight,
    targets: &Tensor,
    with_grad: bool,
    bf16: bool,
) -> Result<Tensor> {
    if !super::fusable(hidden) {
        return linear_cross_entropy_reference(hidden, weight, targets);
    }
    hidden.contiguous()?.apply_op2(
        &targets.contiguous()?,
        LinearCrossEntropy {
            weight: detached(weight),
            with_grad,
            mode: MatmulMode {
                quantized_dot: false,
                bf16,
            },
            dh: Mutex::new(None),
        },
    )
}

/// The same loss as the head's logits and the reference cross-entropy (any device; the test
/// reference). The head weight is detached: it is frozen here as in the fused op.
pub fn linear_cross_entropy_reference(
    hidden: &Tensor,
    weight: &Weight,
    targets: &Tensor,
) -> Result<Tensor> {
    let w = weight.to_f32().map_err(candle_core::Error::wrap)?;
    let logits = hidden.matmul(&w.detach().t()?)?;
    super::cross_entropy::cross_entropy_reference(&logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::cross_entropy::cross_entropy;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_head_plus_cross_entropy_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        // More rows than one block, so the chunking is exercised.
        let (n, hs, vocab) = (ROWS + 5, 6, 11);
        let h = Tensor::randn(0f32, 1., (n, hs), &dev)?;
        let wt = Tensor::randn(0f32, 1., (vocab, hs), &dev)?;
        let w = Weight::Dense(wt.clone());
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % vocab as u32).collect();
        let t = Tensor::from_vec(t, n, &dev)?;
        let want = cross_entropy(&h.matmul(&wt.t()?)?, &t)?;
        let got = linear_cross_entropy(&h, &w, &t, true, false)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let eval_only = linear_cross_entropy(&h, &w, &t, false, false)?;
        assert!((eval_only - want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let small = h.narrow(0, 0, 4)?;
        let ts = t.narrow(0, 0, 4)?;
        fd_check(&Var::from_tensor(&small)?, |x| {
            linear_cross_entropy(x, &w, &ts, true, false)
        })?;
        let bad = Tensor::from_vec(vec![vocab as u32; n], n, &dev)?;
        assert!(linear_cross_entropy(&h, &w, &bad, true, false).is_err());
        Ok(())
    }
}
