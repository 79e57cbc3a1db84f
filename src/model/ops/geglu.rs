//! GEGLU `y = gelu_tanh(g) ⊙ u` (Gemma's `gelu_pytorch_tanh` gate) with a hand-written backward:
//! with z = c(g + 0.044715 g³), c = √(2/π) and t = tanh z,
//! gelu(g) = ½ g (1 + t), gelu'(g) = ½ (1 + t) + ½ g (1 − t²) c (1 + 3·0.044715 g²);
//! dg = dy ⊙ u ⊙ gelu'(g), du = dy ⊙ gelu(g).
//!
//! Why our own op: as SwiGLU's, it replaces candle's element-wise chain (and its saved
//! intermediates, the MLP's widest activations) with one pass forward and one backward.

use candle_core::{Result, Tensor};

use super::softmax::{exp, wide_fn};
use super::swiglu::Gated;

const C: f32 = 0.797_884_6; // √(2/π)
const K: f32 = 0.044_715;

/// tanh through one exponential: 1 − 2 / (e^{2z} + 1) (±1 at the extremes, no NaN).
#[inline(always)]
fn tanh(z: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * z) + 1.0)
}

wide_fn! {
/// y = gelu_tanh(g) ⊙ u over one chunk.
fn gelu_mul(y: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        let t = tanh(C * (a + K * a * a * a));
        *o = 0.5 * a * (1.0 + t) * b;
    }
}
}

wide_fn! {
/// dg = dy ⊙ u ⊙ gelu'(g) and du = dy ⊙ gelu(g) over one chunk.
fn gelu_mul_backward(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    let ins = g.iter().zip(u).zip(dy);
    for ((dg, du), ((&g, &u), &d)) in dg.iter_mut().zip(du.iter_mut()).zip(ins) {
        let t = tanh(C * (g + K * g * g * g));
        let gelu = 0.5 * g * (1.0 + t);
        let slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * K * g * g);
        *dg = d * u * slope;
        *du = d * gelu;
    }
}
}

/// `gelu_tanh(gate) ⊙ up`, differentiable in both. Off the CPU, candle's ops.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !super::fusable(gate) {
        return geglu_reference(gate, up);
    }
    let op = Gated {
        name: "fused-geglu",
        forward: gelu_mul,
        backward: gelu_mul_backward,
    };
    gate.contiguous()?.apply_op2(&up.contiguous()?, op)
}

/// The same with candle's ops (its `gelu` is the tanh approximation; any device; the test
/// reference).
pub fn geglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.gelu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        // Wide enough to reach both saturated ends of tanh.
        let g = Tensor::randn(0f32, 4., (3, 9), &dev)?;
        let u = Tensor::randn(0f32, 1., (3, 9), &dev)?;
        let d = (geglu(&g, &u)? - geglu_reference(&g, &u)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        // An independent check of the reference: gelu_tanh(1) = 0.841192.
        let one = Tensor::new(&[1f32], &dev)?;
        let v = geglu(&one, &one)?.to_vec1::<f32>()?[0];
        assert!((v - 0.841_192).abs() < 1e-5, "{v}");
        fd_check(&Var::from_tensor(&g)?, |t| geglu(t, &u))?;
        fd_check(&Var::from_tensor(&u)?, |t| geglu(&g, t))
    }
}
