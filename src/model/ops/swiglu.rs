//! SwiGLU `y = silu(g) ⊙ u` with a hand-written backward:
//! dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = dy ⊙ silu(g).
//!
//! Why our own op: it replaces three element-wise passes and their saved intermediates (the
//! MLP's widest activations) with one.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, from_vec, view};
use super::softmax::{exp, wide_fn};

/// An element-wise gated activation `y = f(g) ⊙ u` with its hand-written backward, as chunk
/// kernels: SwiGLU here, GEGLU in `geglu.rs`. One op shape for both, so each file holds only
/// its formulas.
pub(super) struct Gated {
    pub name: &'static str,
    /// y = f(g) ⊙ u over one chunk.
    pub forward: fn(&mut [f32], &[f32], &[f32]),
    /// (dg, du) from (g, u, dy) over one chunk.
    pub backward: GatedBackward,
}

/// A gated op's backward chunk kernel: (dg, du, g, u, dy).
pub(super) type GatedBackward = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);

const CHUNK: usize = 16_384;

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(gs, gl)?, f32_slice(us, ul)?);
        if g.len() != u.len() {
            candle_core::bail!("{}: gate and up differ in size", self.name);
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(yc, (gc, uc))| (self.forward)(yc, gc, uc));
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gv, uv, dv) = (view(g)?, view(u)?, view(dy)?);
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                gv.par_chunks(CHUNK)
                    .zip(uv.par_chunks(CHUNK))
                    .zip(dv.par_chunks(CHUNK)),
            )
            .for_each(|((dgc, duc), ((gc, uc), dc))| (self.backward)(dgc, duc, gc, uc, dc));
        Ok((
            Some(from_vec(dg, g.shape(), g)?),
            Some(from_vec(du, u.shape(), u)?),
        ))
    }
}

wide_fn! {
/// y = silu(g) ⊙ u over one chunk.
fn silu_mul(y: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        *o = a / (1.0 + exp(-a)) * b;
    }
}
}

wide_fn! {
/// dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))) and du = dy ⊙ silu(g) over one chunk.
fn silu_mul_backward(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    let ins = g.iter().zip(u).zip(dy);
    for ((dg, du), ((&g, &u), &d)) in dg.iter_mut().zip(du.iter_mut()).zip(ins) {
        let s = 1.0 / (1.0 + exp(-g));
        *dg = d * u * s * (1.0 + g * (1.0 - s));
        *du = d * g * s;
    }
}
}

/// `silu(gate) ⊙ up`, differentiable in both. Off the CPU, candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !super::fusable(gate) {
        return swiglu_reference(gate, up);
    }
    let op = Gated {
        name: "fused-swiglu",
        forward: silu_mul,
        backward: silu_mul_backward,
    };
    gate.contiguous()?.apply_op2(&up.contiguous()?, op)
}

/// The same `silu(gate) ⊙ up` with candle's ops (any device; the test reference).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 2., (3, 9), &dev)?;
        let u = Tensor::randn(0f32, 1., (3, 9), &dev)?;
        let d = (swiglu(&g, &u)? - (g.silu()? * &u)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        fd_check(&Var::from_tensor(&g)?, |t| swiglu(t, &u))?;
        fd_check(&Var::from_tensor(&u)?, |t| swiglu(&g, t))
    }
}
