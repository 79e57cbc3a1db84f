//! LayerNorm `y = (x − mean(x)) / sqrt(var(x) + eps) · w + b` over the last dimension (Falcon's
//! norms), as a composition of candle ops, so its gradient comes from candle's autograd.
//!
//! Not a fused kernel yet: only Falcon uses it, where the norms are a small part of a step. Its
//! test checks it against the formula in f64 and against finite differences.

use candle_core::{Result, Tensor, D};

/// LayerNorm of `x` (…, n) with weight and bias (n).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_formula_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f32, 2., (3, 7), &dev)?;
        let w = Tensor::randn(1f32, 0.3, 7, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 7, &dev)?;
        let got: Vec<Vec<f32>> = layer_norm(&x, &w, &b, 1e-5)?.to_vec2()?;
        let (xv, wv, bv): (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) =
            (x.to_vec2()?, w.to_vec1()?, b.to_vec1()?);
        for (row, out) in xv.iter().zip(&got) {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            for j in 0..row.len() {
                let want =
                    (row[j] as f64 - mean) / (var + 1e-5).sqrt() * wv[j] as f64 + bv[j] as f64;
                assert!((out[j] as f64 - want).abs() < 1e-5, "{} vs {want}", out[j]);
            }
        }
        fd_check(&Var::from_tensor(&x)?, |t| layer_norm(t, &w, &b, 1e-5))?;
        fd_check(&Var::from_tensor(&w)?, |t| layer_norm(&x, t, &b, 1e-5))
    }
}
