//! Rotary position embedding, Hugging Face's rotate-half form: `y = x·cos + rot(x)·sin` with
//! rot(x) = [−x₂, x₁], and a hand-written backward: dx = dy·cos + rotᵀ(dy·sin), rotᵀ(z) = [z₂, −z₁].
//! Partial rotary (Phi-3/Phi-4-mini): only each head's first `r` dims (the tables' width) turn;
//! the rest pass through.
//!
//! Why our own op: candle's `rope` has no backward (it silently detaches), and the composition
//! (narrow, neg, cat, two products, a sum) writes six query/key-sized tensors per layer.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, from_vec, view};

/// x laid out (b, t, h, d), as the projections write it; cos and sin (b or 1, t, 1, r), r ≤ d.
struct Rope {
    t: usize,
    h: usize,
    d: usize,
    r: usize,
}

fn rope_rows(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    &Rope { t, h, d, r }: &Rope,
    inverse: bool,
) -> Vec<f32> {
    let half = r / 2;
    let table_batches = cos.len() / (t * r);
    let mut y = x.to_vec();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let (bi, ti) = (row / (t * h), (row / h) % t);
            let tb = if table_batches == 1 { 0 } else { bi };
            let off = (tb * t + ti) * r;
            let (c, s) = (&cos[off..off + r], &sin[off..off + r]);
            for i in 0..half {
                let (a, b) = (xr[i], xr[i + half]);
                if inverse {
                    // dx = dy·cos + rotᵀ(dy·sin)
                    yr[i] = a * c[i] + b * s[i + half];
                    yr[i + half] = b * c[i + half] - a * s[i];
                } else {
                    yr[i] = a * c[i] - b * s[i];
                    yr[i + half] = b * c[i + half] + a * s[i + half];
                }
            }
        });
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = rope_rows(
            f32_slice(xs, xl)?,
            f32_slice(cs, cl)?,
            f32_slice(ss, sl)?,
            self,
            false,
        );
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = rope_rows(&view(dy)?, &view(cos)?, &view(sin)?, self, true);
        Ok((Some(from_vec(dx, dy.shape(), dy)?), None, None))
    }
}

/// Applies RoPE to `x`, shaped (b, t, h, d) or (b·t, h·d), with tables (b or 1, t, 1, d);
/// differentiable in `x` (the tables are constants). Off the CPU, the composition of candle ops.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !super::fusable(x) {
        return apply_rope_reference(x, cos, sin);
    }
    apply_rope_partial(x, cos, sin, cos.dim(3)?)
}

/// [`apply_rope`] on heads of `head_dim` values, of which the first `cos.dim(3)` turn.
pub fn apply_rope_partial(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
) -> Result<Tensor> {
    if !super::fusable(x) {
        return apply_rope_partial_reference(x, cos, sin, head_dim);
    }
    let (t, h, d, r) = rope_dims(x, cos, head_dim)?;
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { t, h, d, r })
}

/// (t, heads, head_dim, rotary dims) of `x` given tables (b or 1, t, 1, r).
fn rope_dims(x: &Tensor, cos: &Tensor, d: usize) -> Result<(usize, usize, usize, usize)> {
    let (_, t, _, r) = cos.dims4()?;
    if r > d || r % 2 != 0 {
        candle_core::bail!("rope: {r} rotary dims for heads of {d}");
    }
    let h = if x.rank() == 4 {
        x.dim(2)?
    } else {
        x.dim(candle_core::D::Minus1)? / d
    };
    Ok((t, h, d, r))
}

/// The same RoPE as a composition of candle ops (any device; the test reference).
pub fn apply_rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply_rope_partial_reference(x, cos, sin, cos.dim(3)?)
}

/// [`apply_rope_partial`] as a composition of candle ops.
pub fn apply_rope_partial_reference(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
) -> Result<Tensor> {
    let (t, h, d, r) = rope_dims(x, cos, head_dim)?;
    let x4 = x.reshape(((), t, h, d))?;
    let rot = x4.narrow(candle_core::D::Minus1, 0, r)?;
    let half = r / 2;
    let x1 = rot.narrow(candle_core::D::Minus1, 0, half)?;
    let x2 = rot.narrow(candle_core::D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], candle_core::D::Minus1)?;
    let mut y = (rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    if r < d {
        y = Tensor::cat(
            &[&y, &x4.narrow(candle_core::D::Minus1, r, d - r)?],
            candle_core::D::Minus1,
        )?;
    }
    y.reshape(x.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 4, 3, 6), &dev)?;
        let ang = Tensor::randn(0f32, 1., (2, 4, 1, 6), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let x1 = x.narrow(D::Minus1, 0, 3)?;
        let x2 = x.narrow(D::Minus1, 3, 3)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let want = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        let got = apply_rope(&x, &cos, &sin)?;
        assert!((got - want.clone())?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        // The same data as (b·t, h·d), the layout the model uses.
        let flat = apply_rope(&x.reshape((8, 18))?, &cos, &sin)?;
        assert!(
            (flat.reshape(want.shape())? - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                < 1e-6
        );
        fd_check(&Var::from_tensor(&x)?, |t| apply_rope(t, &cos, &sin))
    }

    /// Partial rotary: the first 4 of each head's 10 dims turn, the rest pass through.
    #[test]
    fn partial_rotary_matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 4, 3, 10), &dev)?;
        let ang = Tensor::randn(0f32, 1., (1, 4, 1, 4), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let want = apply_rope_partial_reference(&x, &cos, &sin, 10)?;
        let got = apply_rope_partial(&x.reshape((8, 30))?, &cos, &sin, 10)?;
        let d = (got.reshape(want.shape())? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        let pass = (want.narrow(D::Minus1, 4, 6)? - x.narrow(D::Minus1, 4, 6)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(pass, 0.0, "the unrotated dims pass through");
        fd_check(&Var::from_tensor(&x)?, |t| {
            apply_rope_partial(t, &cos, &sin, 10)
        })
    }
}
