//! Attention for inference, one query row at a time: `o = softmax(scale · q Kᵀ) V` over keys
//! `start..len` of the query's own sequence (`start` > 0 in a sliding window), per head (grouped-query: head `h` reads key/value
//! head `h / (heads / kv_heads)`).
//!
//! Why our own, beside `attention.rs`: a serving step mixes rows of many sequences, each with its
//! own keys and length, decoding or reading a prompt. The training op takes one batch of equal
//! lengths and a mask, runs a GEMM per head whose summation order depends on the number of query
//! rows, and keeps the probabilities for a backward pass inference never runs. Here every query
//! row is computed on its own, in a fixed order, so a sequence's result does not depend on the
//! rows beside it or on how its prompt was split into chunks (what makes batched output equal
//! output alone, and a reused prompt prefix equal one computed afresh).

use rayon::prelude::*;

use super::attention::Heads;
use super::cpu::dot;

/// One query row and what it attends to.
pub struct Query<'a> {
    /// (heads · head_dim) values.
    pub q: &'a [f32],
    /// The sequence's keys and values, (≥ len, kv_heads · head_dim) each.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Keys visible to this query: `start..len` (len = its position + 1; start = 0 unless a
    /// sliding window hides the oldest).
    pub start: usize,
    pub len: usize,
}

/// Writes each query's output, (heads · head_dim) values, into the rows of `out`.
pub fn row_attention(queries: &[Query], heads: Heads, scale: f32, out: &mut [f32]) {
    let Heads {
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        ..
    } = heads;
    assert_eq!(out.len(), queries.len() * h * d, "row_attention: out size");
    let group = h / kvh;
    out.par_chunks_mut(h * d).zip(queries).for_each(|(o, qr)| {
        let s0 = qr.start.min(qr.len);
        let mut p = vec![0f32; qr.len - s0];
        for head in 0..h {
            let kh = head / group;
            let q = &qr.q[head * d..(head + 1) * d];
            let mut max = f32::NEG_INFINITY;
            for (j, pj) in (s0..).zip(p.iter_mut()) {
                let key = &qr.k[j * kvh * d + kh * d..j * kvh * d + (kh + 1) * d];
                *pj = scale * dot(q, key);
                max = max.max(*pj);
            }
            let mut sum = 0f32;
            for pj in p.iter_mut() {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            let oh = &mut o[head * d..(head + 1) * d];
            oh.fill(0.0);
            for (j, pj) in (s0..).zip(p.iter()) {
                let val = &qr.v[j * kvh * d + kh * d..j * kvh * d + (kh + 1) * d];
                let w = pj / sum;
                oh.iter_mut().zip(val).for_each(|(o, v)| *o += w * v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::attention::{attention, AttentionMask};
    use crate::model::transformer::causal_mask;
    use candle_core::{Device, Tensor};

    /// Every row of a causal prompt pass equals the training op's (up to rounding), with the
    /// whole context and with a sliding window of 3, and a row's output does not depend on the
    /// other queries.
    #[test]
    fn rows_equal_the_fused_op_on_a_causal_pass() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (t, h, kvh, d) = (7, 6, 2, 16);
        let heads = Heads {
            batch: 1,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let q = Tensor::randn(0f32, 1., (t, h * d), &dev)?;
        let k = Tensor::randn(0f32, 1., (t, kvh * d), &dev)?;
        let v = Tensor::randn(0f32, 1., (t, kvh * d), &dev)?;
        let scale = 0.25f32;
        let (qv, kv, vv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            q.flatten_all()?.to_vec1()?,
            k.flatten_all()?.to_vec1()?,
            v.flatten_all()?.to_vec1()?,
        );
        for window in [t, 3] {
            let causal = causal_mask(t, 0, &dev).unwrap();
            let outside: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..t).map(move |j| {
                        if i >= j + window {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = causal.broadcast_add(&Tensor::from_vec(outside, (1, 1, 1, t, t), &dev)?)?;
            let mask = AttentionMask::new(&mask)?;
            let want: Vec<f32> = attention(&q, &k, &v, Some(&mask), scale as f64, heads)?
                .flatten_all()?
                .to_vec1()?;
            let queries: Vec<Query> = (0..t)
                .map(|i| Query {
                    q: &qv[i * h * d..(i + 1) * h * d],
                    k: &kv,
                    v: &vv,
                    start: (i + 1).saturating_sub(window),
                    len: i + 1,
                })
                .collect();
            let mut got = vec![0f32; t * h * d];
            row_attention(&queries, heads, scale, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "window {window}: {a} vs {b}");
            }
            // The last row alone: bit for bit.
            let mut one = vec![0f32; h * d];
            row_attention(&queries[t - 1..], heads, scale, &mut one);
            assert_eq!(one, got[(t - 1) * h * d..]);
        }
        Ok(())
    }
}
