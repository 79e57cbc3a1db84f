//! Batched inference over independent sequences: each row of a pass is a sequence feeding one
//! token (decoding) or a chunk of its prompt, with its own KV cache, positions and LoRA adapter
//! (or none), all in one pass over the weights.
//!
//! Decoding one token on a CPU is bound by reading the weights; with several sequences in one
//! pass, every projection reads its weight once for all of them (the serving scheduler's
//! continuous batching rests on this), and a prompt's chunk rides along in the same pass.
//! Attention stays per sequence (each has its own keys and values), and so do the adapters'
//! low-rank products: the base product is shared, each token adds its own adapter's
//! `scale · B (A x)`.
//!
//! Every token is computed exactly as it would be alone: row-exact products
//! (`packed_matmul::matmul_wt_rows`), attention one query at a time (`ops::row_attention`),
//! per-token adapters. So a sequence gets the same tokens whichever others share its steps, and
//! however its prompt was split into chunks or taken from a cached prefix.

use candle_core::{Device, Tensor};

use super::ops;
use super::ops::attention::Heads;
use super::ops::cpu::{dot, view};
use super::ops::packed_matmul::{matmul_wt_rows, weight_view};
use super::ops::row_attention::{row_attention, Query};
use super::transformer::{
    activate, apply_rope_heads, gated, split_gate_up, Cache, GateUp, Linear, NormKind, Qkv,
    Transformer,
};
use crate::Result;

/// One sequence's part of a pass.
pub struct Row<'a> {
    /// The sequence's model: the base, or a clone of it carrying an adapter (the clones share
    /// the base's weights; only their `lora` differs).
    pub model: &'a Transformer,
    /// The tokens to feed, at the positions after what `cache` holds: the last token chosen
    /// (decoding) or the next chunk of the prompt.
    pub tokens: &'a [u32],
    /// What the sequence has seen so far; the new tokens' keys and values are appended.
    pub cache: &'a mut Cache,
    /// Whether the next-token logits after the last token are wanted.
    pub logits: bool,
}

/// Runs every row's tokens through the model and returns, for each row that asked, the logits
/// after its last token. `base` supplies the shared weights; every row's model must be `base`
/// or a clone of it.
pub fn forward_rows(base: &Transformer, rows: &mut [Row]) -> Result<Vec<Option<Vec<f32>>>> {
    let device = base.device().clone();
    if rows.is_empty() {
        return Ok(vec![]);
    }
    if rows.iter().any(|r| r.tokens.is_empty()) {
        return Err(crate::Error::InvalidArgument("a row has no tokens".into()));
    }
    if !device.is_cpu() || !base.fused {
        // The row-exact kernels are CPU kernels: elsewhere each row takes the usual pass.
        return rows
            .iter_mut()
            .map(|r| {
                let ids = Tensor::new(r.tokens, &device)?.unsqueeze(0)?;
                let logits = r.model.forward_last(&ids, Some(r.cache))?;
                Ok(match r.logits {
                    true => Some(logits.squeeze(0)?.to_vec1()?),
                    false => None,
                })
            })
            .collect();
    }
    // Entered once, as `forward_hidden` does: the kernels below then split their work without a
    // hand-over to the pool per call.
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| forward_rows(base, rows));
    }
    let c = &base.config;
    let (norm, kern) = (NormKind::of(c), base.kernels());
    // Token-level views: ids, positions and each token's model, rows one after another.
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    let mut models: Vec<&Transformer> = Vec::new();
    let mut pasts = Vec::with_capacity(rows.len());
    for r in rows.iter() {
        let past = r.cache.seq_len();
        pasts.push(past);
        ids.extend_from_slice(r.tokens);
        positions.extend((past..past + r.tokens.len()).map(|p| p as u32));
        models.extend(std::iter::repeat_n(r.model, r.tokens.len()));
    }
    let n = ids.len();
    // LongRoPE decides per sequence, by the largest position it reaches in this step.
    let long: Vec<bool> = match &c.longrope {
        Some(l) => rows
            .iter()
            .zip(&pasts)
            .flat_map(|(r, &past)| {
                let long = past + r.tokens.len() > l.original_max_position_embeddings;
                std::iter::repeat_n(long, r.tokens.len())
            })
            .collect(),
        None => vec![false; n],
    };
    let rope = base.rope_tables_rows(&Tensor::from_vec(positions, (n, 1), &device)?, &long)?;
    let mut x = base.embed(&Tensor::from_vec(ids, n, &device)?)?;
    for i in 0..base.layers.len() {
        let layer = &base.layers[i];
        let a = &layer.self_attn;
        let (h, kvh, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let lin = |x: &Tensor, name: &str| rows_linear(x, &models, i, name, kern.mode, &device);
        let hn = norm.apply_biased(&x, &layer.attn_norm, layer.attn_norm_bias.as_ref(), true)?;
        let (q, k, v) = match &a.qkv {
            Qkv::Split { .. } => (
                lin(&hn, "self_attn.q_proj")?,
                lin(&hn, "self_attn.k_proj")?,
                lin(&hn, "self_attn.v_proj")?,
            ),
            Qkv::Fused(_) => a.split_qkv(&lin(&hn, "self_attn.qkv_proj")?)?,
        };
        let (mut q, mut k, v) = a.normed(q, k, v, norm, true)?;
        if let Some((cos, sin)) = rope.pick(c.layer_rope(i)) {
            q = apply_rope_heads(&q, cos, sin, d, true)?;
            k = apply_rope_heads(&k, cos, sin, d, true)?;
        }
        let window = c.layer_window(i);
        // Each sequence's new keys and values join its cache; then every token attends to its
        // own sequence up to itself.
        let mut kvs = Vec::with_capacity(rows.len());
        let mut off = 0;
        for r in rows.iter_mut() {
            let t = r.tokens.len();
            let (kc, vc) = r.cache.layers[i].append(
                &k.narrow(0, off, t)?.reshape((1, t, kvh * d))?,
                &v.narrow(0, off, t)?.reshape((1, t, kvh * d))?,
            )?;
            kvs.push((kc.contiguous()?, vc.contiguous()?));
            off += t;
        }
        let qs = view(&q)?;
        let views = kvs
            .iter()
            .map(|(k, v)| Ok((view(k)?, view(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut queries = Vec::with_capacity(n);
        let mut tok = 0;
        for ((r, past), (kv, vv)) in rows.iter().zip(&pasts).zip(&views) {
            for j in 0..r.tokens.len() {
                let len = past + j + 1;
                queries.push(Query {
                    q: &qs[tok * h * d..(tok + 1) * h * d],
                    k: kv,
                    v: vv,
                    start: window.map_or(0, |w| len.saturating_sub(w)),
                    len,
                });
                tok += 1;
            }
        }
        let mut out = vec![0f32; n * h * d];
        let scale = a.scale as f32;
        row_attention(
            &queries,
            Heads {
                batch: 1,
                heads: h,
                kv_heads: kvh,
                head_dim: d,
            },
            scale,
            &mut out,
        );
        drop(queries);
        let out = Tensor::from_vec(out, (n, h * d), &device)?;
        let mut attn = lin(&out, "self_attn.o_proj")?;
        if let Some(w) = &layer.attn_post_norm {
            attn = norm.apply(&attn, w, true)?;
        }
        // Falcon's parallel block feeds the MLP the attention's input; the others the
        // normalised residual after attention.
        let hn = match &layer.ffn_norm {
            Some(w) => {
                x = (x + &attn)?;
                norm.apply(&x, w, true)?
            }
            None => hn,
        };
        let act = match &layer.mlp.gate_up {
            GateUp::Split { .. } => {
                let (gate, up) = (lin(&hn, "mlp.gate_proj")?, lin(&hn, "mlp.up_proj")?);
                gated(&gate, &up, layer.mlp.activation, true)?
            }
            GateUp::Fused(_) => {
                let (gate, up) = split_gate_up(&lin(&hn, "mlp.gate_up_proj")?)?;
                gated(&gate, &up, layer.mlp.activation, true)?
            }
            GateUp::Plain(_) => activate(&lin(&hn, "mlp.up_proj")?, layer.mlp.activation)?,
        };
        let mut ffn = lin(&act, "mlp.down_proj")?;
        if let Some(w) = &layer.ffn_post_norm {
            ffn = norm.apply(&ffn, w, true)?;
        }
        if layer.ffn_norm.is_none() {
            x = (x + attn)?;
        }
        x = (x + ffn)?;
    }
    // The head, for the last token of each row that wants logits.
    let mut last = Vec::new();
    let mut off = 0;
    for r in rows.iter() {
        off += r.tokens.len();
        if r.logits {
            last.push((off - 1) as u32);
        }
    }
    let mut out: Vec<Option<Vec<f32>>> = Vec::with_capacity(rows.len());
    if last.is_empty() {
        out.resize(rows.len(), None);
        return Ok(out);
    }
    let m = last.len();
    let x = x.index_select(&Tensor::from_vec(last, m, &device)?, 0)?;
    let x = norm.apply_biased(&x, &base.norm, base.norm_bias.as_ref(), true)?;
    let head = base.lm_head.as_ref().unwrap_or(&base.embed_tokens);
    let (vocab, hidden) = head.dims2()?;
    let mut logits = vec![0f32; m * vocab];
    let w = weight_view(head)?;
    matmul_wt_rows(
        &view(&x)?,
        w.get(),
        (m, vocab, hidden),
        &mut logits,
        kern.mode,
    )?;
    let mut each = logits.chunks(vocab);
    for r in rows.iter() {
        out.push(match r.logits {
            true => each.next().map(<[f32]>::to_vec),
            false => None,
        });
    }
    Ok(out)
}

/// The projection `name` (`self_attn.q_proj`) of layer `layer` for token rows `x` (b, in),
/// `models` giving each row's model: the base weight's product for all rows at once, plus the
/// bias, plus each row's own adapter.
fn rows_linear(
    x: &Tensor,
    models: &[&Transformer],
    layer: usize,
    name: &str,
    mode: ops::packed_matmul::MatmulMode,
    device: &Device,
) -> Result<Tensor> {
    let base = projection(models[0], layer, name)?;
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
    // Runs of tokens of the same model share one borrow of its adapter.
    let mut r0 = 0;
    while r0 < b {
        let m = models[r0];
        let r1 = r0
            + models[r0..]
                .iter()
                .take_while(|o| std::ptr::eq(**o, m))
                .count();
        if let Some(l) = &projection(m, layer, name)?.lora {
            let (a, bm) = (view(l.a.as_tensor())?, view(l.b.as_tensor())?);
            let rank = l.a.dim(0)?;
            let scale = l.scale as f32;
            for r in r0..r1 {
                let xr = &xs[r * k..(r + 1) * k];
                let t: Vec<f32> = (0..rank).map(|j| dot(&a[j * k..(j + 1) * k], xr)).collect();
                for (o, y) in y[r * n..(r + 1) * n].iter_mut().enumerate() {
                    *y += scale * dot(&bm[o * rank..(o + 1) * rank], &t);
                }
            }
        }
        r0 = r1;
    }
    Ok(Tensor::from_vec(y, (b, n), device)?)
}

/// Projection `name` of layer `layer` of `m`.
fn projection<'m>(m: &'m Transformer, layer: usize, name: &str) -> Result<&'m Linear> {
    let found = m.layers[layer]
        .linears()
        .into_iter()
        .find(|(n, _)| *n == name);
    found.map(|(_, l)| l).ok_or_else(|| {
        crate::Error::InvalidArgument(format!("layer {layer} has no projection {name}"))
    })
}
