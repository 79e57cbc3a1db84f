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

use super::cpu::{f32_slice, gemm, gemm_shared, mat, view, SharedMut};
use super::softmax::softmax_lse;

/// An additive attention mask (b or 1, t, T) shared by every head, read once per forward pass.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    tensor: Tensor,
    data: Option<Arc<MaskData>>,
}

/// The mask's values and, per query row, the range of keys it does not mask out (causal and
/// packed masks hide most keys: the kernels skip what lies outside).
#[derive(Debug)]
struct MaskData {
    values: Vec<f32>,
    /// (first visible key, one past the last) per row of every mask batch.
    ranges: Vec<(usize, usize)>,
}

impl AttentionMask {
    /// Wraps an additive mask broadcastable to (b, 1, t, T) (e.g. shaped (b, 1, 1, t, T)).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let data = if mask.device().is_cpu() && mask.dtype() == candle_core::DType::F32 {
            let total = mask.dim(candle_core::D::Minus1)?;
            let values = mask.flatten_all()?.to_vec1::<f32>()?;
            let ranges = values
                .chunks(total)
                .map(|row| {
                    let lo = row.iter().position(|m| *m > f32::NEG_INFINITY);
                    let hi = row.iter().rposition(|m| *m > f32::NEG_INFINITY);
                    match (lo, hi) {
                        (Some(lo), Some(hi)) => (lo, hi + 1),
                        _ => (0, 0),
                    }
                })
                .collect();
            Some(Arc::new(MaskData { values, ranges }))
        } else {
            None
        };
        Ok(Self {
            tensor: mask.clone(),
            data,
        })
    }
}

/// Query rows handled together: each block multiplies only the keys some row of it can see.
const ROW_BLOCK: usize = 32;

/// Up to this many query rows, scores and outputs are plain dot products (no GEMM calls).
const DIRECT_ROWS: usize = 4;

/// Attention with fewer score entries than this runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;

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
    mask: Option<Arc<MaskData>>,
    dims: Dims,
    /// P from the forward pass, for the backward.
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl Attention {
    /// The blocks of query rows of batch row `bi`: (rows, first key, one past the last key).
    fn blocks(&self, bi: usize) -> Vec<(std::ops::Range<usize>, usize, usize)> {
        let Dims { t, total, .. } = self.dims;
        (0..t)
            .step_by(ROW_BLOCK)
            .map(|r0| {
                let rows = r0..(r0 + ROW_BLOCK).min(t);
                let (k0, k1) = match &self.mask {
                    None => (0, total),
                    Some(m) => {
                        let batches = m.ranges.len() / t;
                        let mb = if batches == 1 { 0 } else { bi };
                        rows.clone()
                            .map(|i| m.ranges[mb * t + i])
                            .filter(|(lo, hi)| lo < hi)
                            .fold((total, 0), |(a, b), (lo, hi)| (a.min(lo), b.max(hi)))
                    }
                };
                (rows, k0, k1)
            })
            .collect()
    }

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
        let out_ptr = SharedMut::new(&mut out);
        let mask = self.mask.as_deref();
        let mask_batches = mask.map_or(1, |m| m.values.len() / (t * total));
        let head = |(bh, p): (usize, &mut [f32])| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / n_rep;
            let kvo = (bi * total * kvh + g) * d;
            let mrows = mask.map(|m| {
                let mb = if mask_batches == 1 { 0 } else { bi };
                &m.values[mb * t * total..(mb + 1) * t * total]
            });
            for (rows, k0, k1) in self.blocks(bi) {
                if k0 >= k1 {
                    continue; // nothing visible: P and O stay zero
                }
                let (r0, n, w) = (rows.start, rows.len(), k1 - k0);
                let qo = (bi * t * h + hi) * d + r0 * h * d;
                if t <= DIRECT_ROWS {
                    // Decoding: a handful of rows; plain dot products cost less than GEMM calls.
                    for i in rows.clone() {
                        let qr = &q[(bi * t + i) * h * d + hi * d..][..d];
                        let row = &mut p[i * total + k0..i * total + k1];
                        for (jj, sc) in row.iter_mut().enumerate() {
                            let kr = &k[kvo + (k0 + jj) * kvh * d..][..d];
                            *sc = super::cpu::dot(qr, kr) * self.scale;
                        }
                        masked_softmax(row, mrows.map(|m| &m[i * total + k0..i * total + k1]));
                        // SAFETY: this task is head hi of batch row bi, the only one that touches
                        // the d elements of (bi, i, hi, ·).
                        let or = unsafe { out_ptr.slice_mut((bi * t + i) * h * d + hi * d, d) };
                        for (jj, &pj) in row.iter().enumerate() {
                            let vr = &v[kvo + (k0 + jj) * kvh * d..][..d];
                            or.iter_mut().zip(vr).for_each(|(o, x)| *o += pj * x);
                        }
                    }
                    continue;
                }
                // S = scale · Q Kᵀ on the visible columns
                gemm(
                    (n, w, d),
                    (&mut p[r0 * total + k0..], total, 1),
                    false,
                    mat(&q[qo..], h * d, 1),
                    mat(&k[kvo + k0 * kvh * d..], 1, kvh * d),
                    self.scale,
                    false,
                );
                for i in rows.clone() {
                    let row = &mut p[i * total + k0..i * total + k1];
                    masked_softmax(row, mrows.map(|m| &m[i * total + k0..i * total + k1]));
                }
                // O = P V, written at (bi, rows, hi, ·).
                // SAFETY: those elements belong to head hi of batch row bi, which only this task
                // writes; P, V and the output are distinct buffers.
                unsafe {
                    gemm_shared(
                        (n, d, w),
                        (out_ptr, qo, h * d, 1),
                        false,
                        mat(&p[r0 * total + k0..], total, 1),
                        mat(&v[kvo + k0 * kvh * d..], kvh * d, 1),
                        1.0,
                        false,
                    );
                }
            }
        };
        // Decoding one token is a few thousand multiply-adds per head: spreading that over the
        // thread pool costs more than it saves.
        if b * h * t * total < SERIAL_BELOW {
            probs.chunks_mut(t * total).enumerate().for_each(head);
        } else {
            probs.par_chunks_mut(t * total).enumerate().for_each(head);
        }
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
            SharedMut::new(&mut dq),
            SharedMut::new(&mut dk),
            SharedMut::new(&mut dv),
        );
        // One task per (batch, KV head): the query heads of a group accumulate into the same
        // dK and dV rows, so they run in one task.
        (0..b * kvh).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kvh, bg % kvh);
            let kvo = (bi * total * kvh + g) * d;
            let blocks = self.blocks(bi);
            let mut ds = vec![0f32; t * total];
            for hi in g * n_rep..(g + 1) * n_rep {
                let p = &probs[(bi * h + hi) * t * total..(bi * h + hi + 1) * t * total];
                for (rows, k0, k1) in &blocks {
                    let (k0, k1) = (*k0, *k1);
                    if k0 >= k1 {
                        continue;
                    }
                    let (r0, n, w) = (rows.start, rows.len(), k1 - k0);
                    let qo = (bi * t * h + hi) * d + r0 * h * d;
                    let (pb, kb, vb) = (r0 * total + k0, kvo + k0 * kvh * d, kvo + k0 * kvh * d);
                    // dP = dO Vᵀ
                    gemm(
                        (n, w, d),
                        (&mut ds[pb..], total, 1),
                        false,
                        mat(&dout[qo..], h * d, 1),
                        mat(&v[vb..], 1, kvh * d),
                        1.0,
                        false,
                    );
                    for i in rows.clone() {
                        let (dr, pr) = (
                            &mut ds[i * total + k0..i * total + k1],
                            &p[i * total + k0..i * total + k1],
                        );
                        let dot = dr
                            .iter()
                            .zip(pr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>() as f32;
                        dr.iter_mut()
                            .zip(pr)
                            .for_each(|(x, &pv)| *x = pv * (*x - dot) * self.scale);
                    }
                    // SAFETY: this task is (batch row bi, KV group g). dQ's rows at (bi, rows, hi, ·)
                    // belong to query head hi of group g, and dK's and dV's at (bi, keys, g, ·)
                    // to group g: no other task writes them, and dS, Q, K, P, dO are other
                    // buffers.
                    unsafe {
                        // dQ = dS K
                        gemm_shared(
                            (n, d, w),
                            (dqp, qo, h * d, 1),
                            false,
                            mat(&ds[pb..], total, 1),
                            mat(&k[kb..], kvh * d, 1),
                            1.0,
                            false,
                        );
                        // dK += dSᵀ Q
                        gemm_shared(
                            (w, d, n),
                            (dkp, kb, kvh * d, 1),
                            true,
                            mat(&ds[pb..], 1, total),
                            mat(&q[qo..], h * d, 1),
                            1.0,
                            false,
                        );
                        // dV += Pᵀ dO
                        gemm_shared(
                            (w, d, n),
                            (dvp, vb, kvh * d, 1),
                            true,
                            mat(&p[pb..], 1, total),
                            mat(&dout[qo..], h * d, 1),
                            1.0,
                            false,
                        );
                    }
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

/// Adds the mask's row (if any) to the scores, then takes the softmax in place.
fn masked_softmax(row: &mut [f32], mask: Option<&[f32]>) {
    if let Some(m) = mask {
        row.iter_mut().zip(m).for_each(|(s, m)| *s += m);
    }
    softmax_lse(row);
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
        let (qv, kv, vv, gv) = (view(q)?, view(k)?, view(v)?, view(dout)?);
        let g = self.backward(&qv, &kv, &vv, &gv, &probs);
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
    if !super::fusable(q) || (mask.is_some() && mask_data.is_none()) {
        return attention_unfused(q, k, v, mask, scale, heads);
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

/// [`attention`] with the same arguments as a composition of candle ops: the path off the CPU,
/// and the one a model told not to use the fused kernels takes.
pub fn attention_unfused(
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
    let out = attention_reference(
        &q.reshape((b, t, h, d))?,
        &k.reshape((b, total, kvh, d))?,
        &v.reshape((b, total, kvh, d))?,
        mask.map(|m| &m.tensor),
        scale,
    )?;
    out.reshape(q.shape())
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
                let cut = t - 6;
                let same = (i < cut) == (j < cut);
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
        // t spans two row blocks, and the packed mask starts a new sequence inside the second.
        let (b, t, h, kvh, d) = (2, ROW_BLOCK + 9, 4, 2, 6);
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
        // One new token over a cache (the direct path), with and without a mask.
        let q1 = q.narrow(1, 0, 1)?.contiguous()?;
        let got = attention(&q1, &k2, &v2, None, scale, hd)?;
        let want = attention_reference(&q1, &k2, &v2, None, scale)?;
        assert!(max_diff(&got, &want) < 1e-5);
        let m1: Vec<f32> = (0..b * (t + 3))
            .map(|j| if j % 5 == 1 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let m1 = Tensor::from_vec(m1, (b, 1, 1, 1, t + 3), &dev)?;
        let got = attention(&q1, &k2, &v2, Some(&AttentionMask::new(&m1)?), scale, hd)?;
        let want = attention_reference(&q1, &k2, &v2, Some(&m1), scale)?;
        assert!(max_diff(&got, &want) < 1e-5);
        // The model's (b·t, heads·d) layout gives the same numbers.
        let flat = |x: &Tensor| x.reshape((b * x.dim(1).unwrap(), ())).unwrap();
        let got = attention(&flat(&q), &flat(&k), &flat(&v), Some(&m), scale, hd)?;
        let want = attention_reference(&q, &k, &v, Some(&mask), scale)?;
        assert!(max_diff(&got.reshape(want.shape())?, &want) < 1e-5);

        // Large enough for the parallel path: forward and gradients against the reference's.
        let (bl, tl) = (2, 150);
        let ql = Var::from_tensor(&Tensor::randn(0f32, 1., (bl, tl, h, d), &dev)?)?;
        let kl = Var::from_tensor(&Tensor::randn(0f32, 1., (bl, tl, kvh, d), &dev)?)?;
        let vl = Var::from_tensor(&Tensor::randn(0f32, 1., (bl, tl, kvh, d), &dev)?)?;
        assert!(bl * h * tl * tl >= SERIAL_BELOW);
        let ml = packed_mask(bl, tl, &dev)?;
        let hl = Heads { batch: bl, ..hd };
        let c = Tensor::randn(0f32, 1., (bl, tl, h, d), &dev)?;
        let got = attention(&ql, &kl, &vl, Some(&AttentionMask::new(&ml)?), scale, hl)?;
        let want = attention_reference(&ql, &kl, &vl, Some(&ml), scale)?;
        assert!(max_diff(&got, &want) < 1e-5);
        let g1 = (got * &c)?.sum_all()?.backward()?;
        let g2 = (want * &c)?.sum_all()?.backward()?;
        for v in [&ql, &kl, &vl] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-4);
        }

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
