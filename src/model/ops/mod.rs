//! Ops with hand-written backward, one per file beside its reference test (llm.c style). Each
//! exists because candle's fused version has no backward (it silently detaches gradients) or
//! because the composition of differentiable ops costs memory and passes that training pays for
//! at every step.

pub mod attention;
pub mod bf16_gemm;
pub mod block_dot;
pub mod cpu;
pub mod cross_entropy;
pub mod frozen_matmul;
pub mod geglu;
pub mod gemm_bench;
pub mod layer_norm;
pub mod linear_cross_entropy;
pub mod lora_linear;
pub mod packed;
pub mod packed_matmul;
pub mod quant_dot;
pub mod rms_norm;
pub mod rope;
pub mod row_attention;
pub mod rows_dot;
pub mod rows_quant;
pub mod softmax;
pub mod swiglu;

/// This CPU as the benchmarks report it: model name and the instruction sets the kernels
/// dispatch on (decided at run time, so one binary runs everywhere).
pub fn cpu_description() -> serde_json::Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = Some(&info)
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[allow(unused_mut)]
    let mut features: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(if is_x86_feature_detected!($f) { features.push($f); })*};
        }
        probe!(
            "avx2",
            "fma",
            "avxvnni",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avx512bf16"
        );
        // AMX detection is not stable in std; the kernel's flag list says it.
        if info.split_whitespace().any(|f| f == "amx_bf16") {
            features.push("amx-bf16");
        }
    }
    serde_json::json!({"model": model, "features": features})
}

/// The kernel the frozen base's training products take: `avx512bf16` (`bf16_gemm.rs`) when
/// `bf16` compute is asked for and available, else the `gemm` crate's f32 kernels.
pub fn matmul_kernel(bf16: bool) -> &'static str {
    if bf16 && bf16_gemm::available() {
        "avx512bf16"
    } else if cfg!(target_arch = "x86_64") {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            return "avx512f (f32, gemm crate)";
        }
        "avx2 (f32, gemm crate)"
    } else {
        "f32 (gemm crate)"
    }
}

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
