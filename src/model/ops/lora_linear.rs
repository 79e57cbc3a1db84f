//! A frozen linear layer with a LoRA adapter as one op:
//! y = x Wᵀ + b + s · (x ⊙ m) Aᵀ Bᵀ. With u = (x ⊙ m) Aᵀ and v = dy B, its backward is
//! dx = dy W + s · (v A) ⊙ m, dA = s · vᵀ (x ⊙ m), dB = s · dyᵀ u  (m: the dropout mask, or 1).
//!
//! Why our own op: composed from candle ops, each adapted projection is eight graph nodes, and
//! the LoRA branch writes three output-sized tensors (the product, its scaled copy, the sum) in
//! the forward and as many again in the backward, plus candle's zero-filled gradient buffers.
//! Here the branch is accumulated into the base product inside the GEMM, and the backward
//! writes only dx, dA and dB. The small (rows × rank) product u is kept for the backward
//! (rank/out of y's size).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{f32_slice, gemm, mat, view};
use super::frozen_matmul::detached;
use super::packed_matmul::{matmul_w, matmul_wt, weight_view, MatmulMode, WeightRef};
use crate::model::weights::Weight;

#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    inp: usize,
    out: usize,
    rank: usize,
}

struct LoraLinear {
    /// (out, in), frozen.
    weight: Weight,
    mode: MatmulMode,
    /// (out), frozen.
    bias: Option<Vec<f32>>,
    scale: f32,
    /// Dropout mask over x (rows × in), already scaled by 1/(1 − p).
    mask: Option<Arc<Vec<f32>>>,
    /// u from the forward pass, for the backward.
    u: Mutex<Option<Vec<f32>>>,
}

impl LoraLinear {
    /// x ⊙ m, borrowed when there is no dropout.
    fn dropped<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => x.iter().zip(m.iter()).map(|(a, b)| a * b).collect(),
            None => x.into(),
        }
    }

    /// u = (x ⊙ m) Aᵀ.
    fn down(&self, xd: &[f32], a: &[f32], d: Dims) -> Vec<f32> {
        let mut u = vec![0f32; d.rows * d.rank];
        gemm(
            (d.rows, d.rank, d.inp),
            (&mut u, d.rank, 1),
            false,
            mat(xd, d.inp, 1),
            mat(a, 1, d.inp),
            1.0,
            true,
        );
        u
    }

    fn forward(&self, x: &[f32], w: WeightRef, a: &[f32], b: &[f32], d: Dims) -> Result<Vec<f32>> {
        let mut y = vec![0f32; d.rows * d.out];
        let u = self.down(&self.dropped(x), a, d);
        // y = x Wᵀ
        matmul_wt(x, w, (d.rows, d.out, d.inp), &mut y, false, self.mode)?;
        // y += s · u Bᵀ
        gemm(
            (d.rows, d.out, d.rank),
            (&mut y, d.out, 1),
            true,
            mat(&u, d.rank, 1),
            mat(b, 1, d.rank),
            self.scale,
            true,
        );
        *self.u.lock().unwrap() = Some(u);
        if let Some(bias) = &self.bias {
            for row in y.chunks_mut(d.out) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
        Ok(y)
    }

    /// (dx, dA, dB).
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &[f32],
        w: WeightRef,
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        d: Dims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let xd = self.dropped(x);
        let u = match self.u.lock().unwrap().take() {
            Some(u) if u.len() == d.rows * d.rank => u,
            _ => self.down(&xd, a, d),
        };
        let mut v = vec![0f32; d.rows * d.rank];
        let mut dx = vec![0f32; d.rows * d.inp];
        let mut da = vec![0f32; d.rank * d.inp];
        let mut db = vec![0f32; d.out * d.rank];
        // dx = dy W
        matmul_w(dy, w, (d.rows, d.out, d.inp), &mut dx, false, self.mode)?;
        // v = dy B
        gemm(
            (d.rows, d.rank, d.out),
            (&mut v, d.rank, 1),
            false,
            mat(dy, d.out, 1),
            mat(b, d.rank, 1),
            1.0,
            true,
        );
        // dA = s · vᵀ (x ⊙ m)
        gemm(
            (d.rank, d.inp, d.rows),
            (&mut da, d.inp, 1),
            false,
            mat(&v, 1, d.rank),
            mat(&xd, d.inp, 1),
            self.scale,
            true,
        );
        // dB = s · dyᵀ u
        gemm(
            (d.out, d.rank, d.rows),
            (&mut db, d.rank, 1),
            false,
            mat(dy, 1, d.out),
            mat(&u, d.rank, 1),
            self.scale,
            true,
        );
        // dx += s · (v A) ⊙ m
        match &self.mask {
            None => {
                gemm(
                    (d.rows, d.inp, d.rank),
                    (&mut dx, d.inp, 1),
                    true,
                    mat(&v, d.rank, 1),
                    mat(a, d.inp, 1),
                    self.scale,
                    true,
                );
            }
            Some(m) => {
                let mut t = vec![0f32; d.rows * d.inp];
                gemm(
                    (d.rows, d.inp, d.rank),
                    (&mut t, d.inp, 1),
                    false,
                    mat(&v, d.rank, 1),
                    mat(a, d.inp, 1),
                    self.scale,
                    true,
                );
                for ((o, t), m) in dx.iter_mut().zip(&t).zip(m.iter()) {
                    *o += t * m;
                }
            }
        }
        Ok((dx, da, db))
    }

    fn dims(&self, x: &Layout, a: &Layout) -> Result<Dims> {
        let (rows, inp) = x.shape().dims2()?;
        let (out, inp_w) = self.weight.dims2().map_err(candle_core::Error::wrap)?;
        let (rank, inp_a) = a.shape().dims2()?;
        if inp_w != inp || inp_a != inp {
            candle_core::bail!("lora-linear: x has {inp} columns, W {inp_w}, A {inp_a}");
        }
        Ok(Dims {
            rows,
            inp,
            out,
            rank,
        })
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, al)?;
        let (x, a, b) = (f32_slice(xs, xl)?, f32_slice(as_, al)?, f32_slice(bs, bl)?);
        let w = weight_view(&self.weight)?;
        let y = self.forward(x, w.get(), a, b, d)?;
        Ok((CpuStorage::F32(y), Shape::from((d.rows, d.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.layout(), a.layout())?;
        let (xv, av, bv, gv) = (view(x)?, view(a)?, view(b)?, view(dy)?);
        let w = weight_view(&self.weight)?;
        let (dx, da, db) = self.backward(&xv, w.get(), &av, &bv, &gv, d)?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, a.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// `x Wᵀ + bias + scale · (x ⊙ mask) Aᵀ Bᵀ` for `x` (rows, in), a frozen `weight` (out, in) and
/// `bias` (out), and adapter matrices `a` (rank, in), `b` (out, rank); differentiable in x, A
/// and B. `mask` is LoRA dropout's (rows × in, scaled by 1/(1 − p)). Off the CPU (or not f32),
/// [`lora_linear_reference`].
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Arc<Vec<f32>>>,
    mode: MatmulMode,
) -> Result<Tensor> {
    if !super::fusable(x) {
        return lora_linear_reference(x, weight, bias, a, b, scale, mask.as_deref());
    }
    let op = LoraLinear {
        weight: detached(weight),
        mode,
        bias: bias.map(|t| t.to_vec1::<f32>()).transpose()?,
        scale: scale as f32,
        mask,
        u: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The same layer as a composition of candle ops (any device; the test reference). A weight
/// that is a variable trains (full fine-tuning); otherwise it is detached.
pub fn lora_linear_reference(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Vec<f32>>,
) -> Result<Tensor> {
    let y = linear_reference(x, weight, bias)?;
    let xd = match mask {
        Some(m) => (x * Tensor::from_slice(m, x.shape(), x.device())?)?,
        None => x.clone(),
    };
    y + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?
}

/// `x Wᵀ + bias` with candle's ops; a weight that is not a variable is detached (and
/// dequantized whole if packed).
pub fn linear_reference(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let w = match weight {
        Weight::Dense(t) if t.is_variable() => t.clone(),
        w => w.to_f32().map_err(candle_core::Error::wrap)?.detach(),
    };
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp, out, rank) = (5, 7, 6, 3);
        let x = Tensor::randn(0f32, 1., (rows, inp), &dev)?;
        let w = Tensor::randn(0f32, 1., (out, inp), &dev)?;
        let bias = Tensor::randn(0f32, 1., out, &dev)?;
        let a = Tensor::randn(0f32, 1., (rank, inp), &dev)?;
        let b = Tensor::randn(0f32, 1., (out, rank), &dev)?;
        let keep: Vec<f32> = (0..rows * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let m = Tensor::from_vec(keep.clone(), (rows, inp), &dev)?;
        let mask = Some(Arc::new(keep));
        let s = 0.7;
        let w = Weight::Dense(w);
        let mode = MatmulMode::default();
        let got = lora_linear(&x, &w, Some(&bias), &a, &b, s, mask.clone(), mode)?;
        let want = (x.matmul(&w.to_f32().unwrap().t()?)?.broadcast_add(&bias)?
            + ((&x * &m)?.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let f = |x: &Tensor, a: &Tensor, b: &Tensor| {
            lora_linear(x, &w, Some(&bias), a, b, s, mask.clone(), mode)
        };
        fd_check(&Var::from_tensor(&x)?, |t| f(t, &a, &b))?;
        fd_check(&Var::from_tensor(&a)?, |t| f(&x, t, &b))?;
        fd_check(&Var::from_tensor(&b)?, |t| f(&x, &a, t))
    }
}
