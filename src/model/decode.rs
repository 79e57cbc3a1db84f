//! Batched decoding of independent sequences: one new token for each of several sequences, each
//! with its own KV cache, position and LoRA adapter (or none), in one pass over the weights.
//!
//! Decoding one token on a CPU is bound by reading the weights; with several sequences in one
//! pass, every projection reads its weight once for all of them (the serving scheduler's
//! continuous batching rests on this). Attention stays per sequence (each has its own keys and
//! values), and so do the adapters' low-rank products: the base product is shared, each row adds
//! its own adapter's `scale · B (A x)`.
//!
//! Every row is computed exactly as it would be alone (row-exact products, per-row attention and
//! adapters), so a sequence gets the same tokens whichever others share its steps.

use candle_core::{Device, Tensor};

use super::ops;
use super::ops::attention::Heads;
use super::ops::cpu::{dot, view};
use super::ops::packed_matmul::{matmul_wt_rows, weight_view};
use super::transformer::{apply_rope, rms_norm, Block, Cache, Linear, Transformer};
use crate::Result;

/// One sequence's place in a decoding step.
pub struct DecodeRow<'a> {
    /// The sequence's model: the base, or a clone of it carrying an adapter (the clones share
    /// the base's weights; only their `lora` differs).
    pub model: &'a Transformer,
    /// The token to feed (the last one chosen).
    pub token: u32,
    /// What the sequence has seen so far; the new token's keys and values are appended.
    pub cache: &'a mut Cache,
}

/// Feeds each row's token at the position after what its cache holds and returns each row's
/// next-token logits (rows × vocab). `base` supplies the shared weights; every row's model must
/// be `base` or a clone of it.
pub fn decode_rows(base: &Transformer, rows: &mut [DecodeRow]) -> Result<Vec<Vec<f32>>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let device = base.device().clone();
    if !device.is_cpu() || !base.fused {
        // The row-exact products are CPU kernels: elsewhere each row takes the usual pass.
        return rows
            .iter_mut()
            .map(|r| {
                let ids = Tensor::new(&[r.token], &device)?.unsqueeze(0)?;
                let logits = r.model.forward_last(&ids, Some(r.cache))?;
                Ok(logits.squeeze(0)?.to_vec1()?)
            })
            .collect();
    }
    // Entered once, as `forward_hidden` does: the kernels below then split their work without a
    // hand-over to the pool per call.
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| decode_rows(base, rows));
    }
    let c = &base.config;
    let b = rows.len();
    let (eps, kern) = (c.rms_norm_eps, base.kernels());
    let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
    let positions: Vec<u32> = rows.iter().map(|r| r.cache.seq_len() as u32).collect();
    let rope = base.rope_tables(&Tensor::from_vec(positions, (b, 1), &device)?)?;
    let models: Vec<&Transformer> = rows.iter().map(|r| r.model).collect();
    let mut x = base
        .embed_tokens
        .embedding(&Tensor::from_vec(ids, b, &device)?)?;
    for i in 0..base.layers.len() {
        let layer = &base.layers[i];
        let a = &layer.self_attn;
        let (h, kvh, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let lin = |x: &Tensor, pick: fn(&Block) -> &Linear| {
            rows_linear(x, &models, i, pick, kern.mode, &device)
        };
        let hn = rms_norm(&x, &layer.input_layernorm, eps, true)?;
        let q = apply_rope(&lin(&hn, |l| &l.self_attn.q_proj)?, &rope.0, &rope.1, true)?;
        let k = apply_rope(&lin(&hn, |l| &l.self_attn.k_proj)?, &rope.0, &rope.1, true)?;
        let v = lin(&hn, |l| &l.self_attn.v_proj)?;
        let heads = Heads {
            batch: 1,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for (r, row) in rows.iter_mut().enumerate() {
            let (kc, vc) = row.cache.layers[i].append(
                &k.narrow(0, r, 1)?.reshape((1, 1, kvh * d))?,
                &v.narrow(0, r, 1)?.reshape((1, 1, kvh * d))?,
            )?;
            let (kc, vc) = (kc.contiguous()?, vc.contiguous()?);
            outs.push(ops::attention::attention(
                &q.narrow(0, r, 1)?,
                &kc,
                &vc,
                None,
                scale,
                heads,
            )?);
        }
        let attn = lin(&Tensor::cat(&outs, 0)?, |l| &l.self_attn.o_proj)?;
        x = (x + attn)?;
        let hn = rms_norm(&x, &layer.post_attention_layernorm, eps, true)?;
        let gate = lin(&hn, |l| &l.mlp.gate_proj)?;
        let up = lin(&hn, |l| &l.mlp.up_proj)?;
        let act = ops::swiglu::swiglu(&gate, &up)?;
        x = (x + lin(&act, |l| &l.mlp.down_proj)?)?;
    }
    let x = rms_norm(&x, &base.norm, eps, true)?;
    let head = base.lm_head.as_ref().unwrap_or(&base.embed_tokens);
    let (vocab, hidden) = head.dims2()?;
    let mut logits = vec![0f32; b * vocab];
    let w = weight_view(head)?;
    matmul_wt_rows(
        &view(&x)?,
        w.get(),
        (b, vocab, hidden),
        &mut logits,
        kern.mode,
    )?;
    Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
}

/// The projection `pick` of layer `layer` for rows `x` (b, in): the base weight's product for
/// all rows at once, plus the bias, plus each row's own adapter.
fn rows_linear(
    x: &Tensor,
    models: &[&Transformer],
    layer: usize,
    pick: fn(&Block) -> &Linear,
    mode: ops::packed_matmul::MatmulMode,
    device: &Device,
) -> Result<Tensor> {
    let base = pick(&models[0].layers[layer]);
    let (n, k) = base.weight.dims2()?;
    let b = models.len();
    let xs = view(x)?;
    let mut y = vec![0f32; b * n];
    matmul_wt_rows(
        &xs,
        weight_view(&base.weight)?.get(),
        (b, n, k),
        &mut y,
        mode,
    )?;
    if let Some(bias) = &base.bias {
        let bias = view(bias)?;
        for row in y.chunks_mut(n) {
            row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b);
        }
    }
    for (r, m) in models.iter().enumerate() {
        if let Some(l) = &pick(&m.layers[layer]).lora {
            let (a, bm) = (view(l.a.as_tensor())?, view(l.b.as_tensor())?);
            let rank = l.a.dim(0)?;
            let xr = &xs[r * k..(r + 1) * k];
            let t: Vec<f32> = (0..rank).map(|j| dot(&a[j * k..(j + 1) * k], xr)).collect();
            let scale = l.scale as f32;
            for (o, y) in y[r * n..(r + 1) * n].iter_mut().enumerate() {
                *y += scale * dot(&bm[o * rank..(o + 1) * rank], &t);
            }
        }
    }
    Ok(Tensor::from_vec(y, (b, n), device)?)
}
