//! Grouped-query attention `O = softmax(scale · Q Kᵀ + mask) V` as one op with a hand-written
//! backward:
//! dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale · dS K, dK = scale · dSᵀ Q, dV = Pᵀ dO.
//!
//! Why our own op: as a composition, attention costs four layout copies per layer (Q, K, V into
//! head-major order and the output back), two batched matmuls, the softmax and, in the backward,
//! candle's gradient bookkeeping for each of those nodes. This op reads Q (b, t, h, d) and K, V
//! (b, T, kvh, d) in the layout the projections write, calls the GEMM kernel with strides, and
//! writes the output in the layout the output projection reads: no copies. It keeps the
//! probabilities P for the backward (one (b, h, t, T) buffer), as the composition did.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{exp, f32_slice, gemm, with_f32};

/// An additive attention mask (b or 1, t, T) shared by every head, read once per forward pass.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    tensor: Tensor,
    data: Option<Arc<Vec<f32>>>,
}

impl AttentionMask {
    /// Wraps an additive mask broadcastable to (b, 1, t, T) (e.g. shaped (b, 1, 1, t, T)).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let data = if mask.device().is_cpu() && mask.dtype() == candle_core::DType::F32 {
            Some(Arc::new(mask.flatten_all()?.to_vec1::<f32>()?))
        } else {
            None
        };
        Ok(Self {
            tensor: mask.clone(),
            data,
        })
    }
}

/// Raw pointer that parallel tasks may share because each writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer; a method so closures capture the whole `Shared` (which is `Send`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    total: usize,
    h: usize,
    kvh: usize,
    d: usize,
}

struct Attention {
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
    dims: Dims,
    /// P from the forward pass, for the backward.
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl Attention {
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Dims {
            b,
            t,
            total,
            h,
            kvh,
            d,
        } = self.dims;
        let n_rep = h / kvh;
        let mut out = vec![0f32; b * t * h * d];
        let mut probs = vec![0f32; b * h * t * total];
        let out_ptr = Shared(out.as_mut_ptr());
        let mask = self.mask.as_deref();
        let mask_batches = mask.map_or(1, |m| m.len() / (t * total));
        probs
            .par_chunks_mut(t * total)
            .enumerate()
            .for_each(|(bh, p)| {
                let (bi, hi) = (bh / h, bh % h);
                let g = hi / n_rep;
                let qp = q[(bi * t * h + hi) * d..].as_ptr();
                let kp = k[(bi * total * kvh + g) * d..].as_ptr();
                let vp = v[(bi * total * kvh + g) * d..].as_ptr();
                unsafe {
                    // S = scale · Q Kᵀ
                    gemm(
                        (t, total, d),
                        (p.as_mut_ptr(), total, 1),
                        false,
                        (qp, h * d, 1),
                        (kp, 1, kvh * d),
                        self.scale,
                        false,
                    );
                }
                let mrows = mask.map(|m| {
                    let mb = if mask_batches == 1 { 0 } else { bi };
                    &m[mb * t * total..(mb + 1) * t * total]
                });
                for (i, row) in p.chunks_mut(total).enumerate() {
                    if let Some(mr) = mrows {
                        row.iter_mut()
                            .zip(&mr[i * total..(i + 1) * total])
                            .for_each(|(s, m)| *s += m);
                    }
                    softmax_in_place(row);
                }
                unsafe {
                    // O = P V, written at (bi, ·, hi, ·)
                    gemm(
                        (t, d, total),
                        (out_ptr.get().add((bi * t * h + hi) * d), h * d, 1),
                        false,
                        (p.as_ptr(), total, 1),
                        (vp, kvh * d, 1),
                        1.0,
                        false,
                    );
                }
            });
        (out, probs)
    }

    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], dout: &[f32], probs: &[f32]) -> Grads {
        let Dims {
            b,
            t,
            total,
            h,
            kvh,
            d,
        } = self.dims;
        let n_rep = h / kvh;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let (dqp, dkp, dvp) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        // One task per (batch, KV head): the query heads of a group accumulate into the same
        // dK and dV rows, so they run in one task.
        (0..b * kvh).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kvh, bg % kvh);
            let kvo = (bi * total * kvh + g) * d;
            let mut ds = vec![0f32; t * total];
            for hi in g * n_rep..(g + 1) * n_rep {
                let qo = (bi * t * h + hi) * d;
                let p = &probs[(bi * h + hi) * t * total..(bi * h + hi + 1) * t * total];
                unsafe {
                    // dP = dO Vᵀ
                    gemm(
                        (t, total, d),
                        (ds.as_mut_ptr(), total, 1),
                        false,
                        (dout[qo..].as_ptr(), h * d, 1),
                        (v[kvo..].as_ptr(), 1, kvh * d),
                        1.0,
                        false,
                    );
                }
                for (dr, pr) in ds.chunks_mut(total).zip(p.chunks(total)) {
                    let dot = dr
                        .iter()
                        .zip(pr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32;
                    dr.iter_mut()
                        .zip(pr)
                        .for_each(|(x, &pv)| *x = pv * (*x - dot) * self.scale);
                }
                unsafe {
                    // dQ = dS K
                    gemm(
                        (t, d, total),
                        (dqp.get().add(qo), h * d, 1),
                        false,
                        (ds.as_ptr(), total, 1),
                        (k[kvo..].as_ptr(), kvh * d, 1),
                        1.0,
                        false,
                    );
                    // dK += dSᵀ Q
                    gemm(
                        (total, d, t),
                        (dkp.get().add(kvo), kvh * d, 1),
                        true,
                        (ds.as_ptr(), 1, total),
                        (q[qo..].as_ptr(), h * d, 1),
                        1.0,
                        false,
                    );
                    // dV += Pᵀ dO
                    gemm(
                        (total, d, t),
                        (dvp.get().add(kvo), kvh * d, 1),
                        true,
                        (p.as_ptr(), 1, total),
                        (dout[qo..].as_ptr(), h * d, 1),
                        1.0,
                        false,
                    );
                }
            }
        });
        Grads { dq, dk, dv }
    }
}

struct Grads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Softmax of one row in place (a row of only −∞ gives zeros, not NaN).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let mut sum = 0f64;
    for x in row.iter_mut() {
        *x = exp(*x - max);
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, probs) = self.forward(f32_slice(qs, ql)?, f32_slice(ks, kl)?, f32_slice(vs, vl)?);
        *self.probs.lock().unwrap() = Some(Arc::new(probs));
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs =
            self.probs.lock().unwrap().clone().ok_or_else(|| {
                candle_core::Error::Msg("fused attention: no forward pass".into())
            })?;
        let g = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(dout, |dy| self.backward(q, k, v, dy, &probs))
                })
            })
        })????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(g.dq, q.shape(), dev)?),
            Some(Tensor::from_vec(g.dk, k.shape(), dev)?),
            Some(Tensor::from_vec(g.dv, v.shape(), dev)?),
        ))
    }
}

/// Head counts and batch size, which the (b·t, heads·d) layout does not carry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Attention of `q` over `k`, `v`, laid out (b, t, h, d) and (b, T, kvh, d) whatever their
/// rank (the model passes (b·t, h·d)), with an additive `mask` (b or 1, t, T) or none (every
/// key visible); the output has `q`'s shape and layout. Differentiable in q, k and v. Off the
/// CPU, the composition of candle ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttentionMask>,
    scale: f64,
    heads: Heads,
) -> Result<Tensor> {
    let Heads {
        batch: b,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    } = heads;
    let t = q.elem_count() / (b * h * d);
    let total = k.elem_count() / (b * kvh * d);
    let mask_data = mask.and_then(|m| m.data.clone());
    if !q.device().is_cpu()
        || q.dtype() != candle_core::DType::F32
        || (mask.is_some() && mask_data.is_none())
    {
        let out = attention_reference(
            &q.reshape((b, t, h, d))?,
            &k.reshape((b, total, kvh, d))?,
            &v.reshape((b, total, kvh, d))?,
            mask.map(|m| &m.tensor),
            scale,
        )?;
        return out.reshape(q.shape());
    }
    let op = Attention {
        scale: scale as f32,
        mask: mask_data,
        dims: Dims {
            b,
            t,
            total,
            h,
            kvh,
            d,
        },
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention as a composition of candle ops (the CUDA path and the test reference).
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let (_, total, kvh, _) = k.dims4()?;
    let n_rep = h / kvh;
    // The n_rep query heads that share one KV head are stacked along the sequence axis, so one
    // batched matmul serves them all without copying K and V.
    let q = q
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, kvh, n_rep * t, d))?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, h, t, total))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.reshape(((), 1, t, total))?)?,
        None => scores,
    };
    let max = scores.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
    let probs = probs.reshape((b, kvh, n_rep * t, total))?;
    probs
        .matmul(&v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::fd_check;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Block-diagonal causal mask for two packed sequences per row, as training builds it.
    fn packed_mask(b: usize, t: usize, dev: &Device) -> Result<Tensor> {
        let data: Vec<f32> = (0..b * t * t)
            .map(|k| {
                let (i, j) = ((k / t) % t, k % t);
                let same = (i < t / 2) == (j < t / 2);
                if j <= i && same {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Tensor::from_vec(data, (b, 1, 1, t, t), dev)
    }

    #[test]
    fn matches_reference_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, kvh, d) = (2, 5, 4, 2, 6);
        let q = Tensor::randn(0f32, 1., (b, t, h, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, t, kvh, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, t, kvh, d), &dev)?;
        let mask = packed_mask(b, t, &dev)?;
        let m = AttentionMask::new(&mask)?;
        let scale = 0.4;
        let hd = Heads {
            batch: b,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let got = attention(&q, &k, &v, Some(&m), scale, hd)?;
        let want = attention_reference(&q, &k, &v, Some(&mask), scale)?;
        assert!(max_diff(&got, &want) < 1e-5);
        // Without a mask, and with more keys than queries (a KV cache).
        let k2 = Tensor::randn(0f32, 1., (b, t + 3, kvh, d), &dev)?;
        let v2 = Tensor::randn(0f32, 1., (b, t + 3, kvh, d), &dev)?;
        let got = attention(&q, &k2, &v2, None, scale, hd)?;
        let want = attention_reference(&q, &k2, &v2, None, scale)?;
        assert!(max_diff(&got, &want) < 1e-5);
        // The model's (b·t, heads·d) layout gives the same numbers.
        let flat = |x: &Tensor| x.reshape((b * x.dim(1).unwrap(), ())).unwrap();
        let got = attention(&flat(&q), &flat(&k), &flat(&v), Some(&m), scale, hd)?;
        let want = attention_reference(&q, &k, &v, Some(&mask), scale)?;
        assert!(max_diff(&got.reshape(want.shape())?, &want) < 1e-5);

        fd_check(&Var::from_tensor(&q)?, |x| {
            attention(x, &k, &v, Some(&m), scale, hd)
        })?;
        fd_check(&Var::from_tensor(&k)?, |x| {
            attention(&q, x, &v, Some(&m), scale, hd)
        })?;
        fd_check(&Var::from_tensor(&v)?, |x| {
            attention(&q, &k, x, Some(&m), scale, hd)
        })
    }
}
