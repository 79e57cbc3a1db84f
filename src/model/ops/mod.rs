//! Ops with hand-written backward, one per file beside its reference test (llm.c style). Each
//! exists because candle's fused version has no backward (it silently detaches gradients) or
//! because the composition of differentiable ops costs memory and passes that training pays for
//! at every step.

pub mod attention;
pub mod block_dot;
pub mod cpu;
pub mod cross_entropy;
pub mod frozen_matmul;
pub mod linear_cross_entropy;
pub mod lora_linear;
pub mod packed;
pub mod packed_matmul;
pub mod quant_dot;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

/// Whether the fused CPU kernels can take `t`: f32 data in CPU memory. Anything else (a CUDA
/// tensor, another dtype) takes each op's `*_reference` composition of candle ops, which all
/// have a backward, so training stays correct on any device, only slower. The kernels read CPU
/// storage, so this check must guard every call into them.
pub fn fusable(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Checks the gradient of `L = Σ f(x) ⊙ c` (c a fixed random tensor) with respect to `x`
/// against central finite differences in f32 (step 1e-2, tolerance 2e-2 relative).
#[cfg(test)]
pub(crate) fn fd_check(
    x: &candle_core::Var,
    f: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
) -> candle_core::Result<()> {
    use candle_core::Tensor;
    let y = f(x.as_tensor())?;
    let c = Tensor::randn(0f32, 1., y.shape(), y.device())?;
    let loss = |t: &Tensor| -> candle_core::Result<f64> {
        f(t)?
            .mul(&c)?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()
    };
    let grads = (y * &c)?.sum_all()?.backward()?;
    let g: Vec<f32> = grads.get(x).expect("gradient").flatten_all()?.to_vec1()?;
    let x0: Vec<f32> = x.as_tensor().flatten_all()?.to_vec1()?;
    let h = 1e-2f32;
    for i in 0..x0.len() {
        let mut p = x0.clone();
        p[i] += h;
        let mut m = x0.clone();
        m[i] -= h;
        let tp = Tensor::from_vec(p, x.shape(), x.device())?;
        let tm = Tensor::from_vec(m, x.shape(), x.device())?;
        let fd = (loss(&tp)? - loss(&tm)?) / (2.0 * h as f64);
        let err = (fd - g[i] as f64).abs();
        assert!(
            err <= 2e-2 * fd.abs().max(0.1),
            "element {i}: backward {} vs finite difference {fd}",
            g[i]
        );
    }
    Ok(())
}
