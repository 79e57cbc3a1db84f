//! The optimiser step: AdamW with decoupled weight decay, the learning-rate schedule, and
//! clipping by global norm. This is the one place that sees every gradient at once — where a
//! data-parallel all-reduce (NCCL through cudarc) will go when training spans several GPUs.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

/// A trainable tensor with its AdamW moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// Weight decay applies (not to norms, biases or embeddings' scales).
    pub decay: bool,
}

/// AdamW hyper-parameters (PyTorch's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over a list of parameters.
pub struct AdamW {
    pub params: Vec<Param>,
    pub config: AdamWConfig,
    /// Steps taken (for bias correction).
    pub t: u64,
}

impl AdamW {
    /// An optimiser with zero moments for `vars` (name, variable, decay?).
    pub fn new(vars: Vec<(String, Var, bool)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var, decay)| {
                let m = var.as_tensor().zeros_like()?;
                let v = m.clone();
                Ok(Param {
                    name,
                    var,
                    m,
                    v,
                    decay,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            config,
            t: 0,
        })
    }

    /// One update with `grads` (same order as `params`) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut w = p.var.as_tensor().clone();
            if p.decay && c.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&p.m / bc1)? / denom)?;
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (0 = no clipping);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Learning-rate schedules after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up to `lr`, then the schedule down
/// to `min_lr`.
pub fn lr_at(
    step: usize,
    total: usize,
    warmup: usize,
    lr: f64,
    min_lr: f64,
    schedule: Schedule,
) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => lr,
        Schedule::Linear => min_lr + (lr - min_lr) * (1.0 - progress),
        Schedule::Cosine => {
            min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_pytorch_on_a_hand_computed_step() -> Result<()> {
        // torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        // with w = [1.0, -2.0], grad = [0.5, -0.25]: after one step w = [0.899, -1.898].
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone(), true)], cfg)?;
        opt.step(&[Tensor::new(&[0.5f32, -0.25], &Device::Cpu)?], 0.1)?;
        let w: Vec<f32> = var.as_tensor().to_vec1()?;
        assert!(
            (w[0] - 0.899).abs() < 1e-5 && (w[1] + 1.898).abs() < 1e-5,
            "{w:?}"
        );
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu)?,
            Tensor::new(&[4.0f32], &Device::Cpu)?,
        ];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        let after = clip_grad_norm(&mut g, 0.0)?;
        assert!((after - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(lr_at(0, 100, 10, 1.0, 0.0, Schedule::Cosine), 0.1);
        assert_eq!(lr_at(9, 100, 10, 1.0, 0.0, Schedule::Cosine), 1.0);
        assert!((lr_at(10, 100, 10, 1.0, 0.0, Schedule::Cosine) - 1.0).abs() < 1e-12);
        assert!(lr_at(99, 100, 10, 1.0, 0.0, Schedule::Cosine) < 0.01);
        assert!((lr_at(55, 100, 10, 1.0, 0.0, Schedule::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(80, 100, 10, 1.0, 0.0, Schedule::Constant), 1.0);
    }
}
