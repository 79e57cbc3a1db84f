//! Greedy generation for many prompts at once, as evaluation needs: prompts are left-padded to
//! one length, padding is masked out of attention, and each decode step runs every row through
//! the weights once. On a CPU, decoding one row is bound by reading the weights; a batch of 16
//! reads them once for 16 tokens.

use candle_core::Tensor;

use super::generate::FinishReason;
use super::sampling::argmax;
use super::scripts::ScriptFilter;
use crate::model::transformer::Cache;
use crate::model::Model;
use crate::{Error, Result};

/// One finished row.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Greedy continuations of `prompts`, `batch_size` at a time, each at most `max_new_tokens`
/// long and ending at the model's end tokens; `filter` restricts the scripts written.
/// `on_done` is called with the number of finished prompts after each batch.
pub fn greedy_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    batch_size: usize,
    filter: Option<&ScriptFilter>,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<Completion>> {
    // Similar lengths together waste less padding; the order is restored at the end.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut done: Vec<(usize, Completion)> = Vec::with_capacity(prompts.len());
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        for (i, c) in chunk
            .iter()
            .zip(one_batch(model, &rows, max_new_tokens, filter)?)
        {
            done.push((*i, c));
        }
        on_done(done.len());
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, c)| c).collect())
}

fn one_batch(
    model: &Model,
    rows: &[&[u32]],
    max_new_tokens: usize,
    filter: Option<&ScriptFilter>,
) -> Result<Vec<Completion>> {
    let device = model.transformer.device();
    let b = rows.len();
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if rows.iter().any(|r| r.is_empty()) {
        return Err(Error::InvalidArgument("a prompt is empty".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if len >= ctx {
        return Err(Error::InvalidArgument(format!(
            "a prompt has {len} tokens, the model's context is {ctx}"
        )));
    }
    let budget = max_new_tokens.min(ctx - len);
    let pad = model.tokenizer.end_token_ids.first().copied().unwrap_or(0);
    // Left padding: row r's real tokens occupy the last rows[r].len() columns.
    let starts: Vec<usize> = rows.iter().map(|r| len - r.len()).collect();
    let mut ids = Vec::with_capacity(b * len);
    let mut pos = Vec::with_capacity(b * len);
    for (r, row) in rows.iter().enumerate() {
        ids.extend(std::iter::repeat_n(pad, starts[r]).chain(row.iter().copied()));
        pos.extend(std::iter::repeat_n(0u32, starts[r]).chain(0..row.len() as u32));
    }
    // Prefill mask (b, 1, 1, len, len): causal, padding never attended to by real tokens (a
    // padding position sees only itself, so no row is empty).
    let mut mask = vec![f32::NEG_INFINITY; b * len * len];
    for (r, &s) in starts.iter().enumerate() {
        for i in 0..len {
            let row = &mut mask[(r * len + i) * len..(r * len + i + 1) * len];
            if i < s {
                row[i] = 0.0;
            } else {
                row[s..=i].fill(0.0);
            }
        }
    }
    let mut cache = Cache::new(&model.transformer);
    let mut input = Tensor::from_vec(ids, (b, len), device)?;
    let mut positions = Tensor::from_vec(pos, (b, len), device)?;
    let mut mask_t = Tensor::from_vec(mask, (b, 1, 1, len, len), device)?;
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); b];
    let mut finished: Vec<Option<FinishReason>> = vec![None; b];
    for step in 0..budget {
        let hidden = model.transformer.forward_hidden(
            &input,
            &positions,
            Some(&mask_t),
            Some(&mut cache),
        )?;
        let t = hidden.dim(1)?;
        let logits = model
            .transformer
            .logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (r, l) in logits.iter().enumerate() {
            if finished[r].is_some() {
                next.push(pad);
                continue;
            }
            let id = match filter {
                Some(f) => {
                    let id = f.choose(l, &pending[r], |l| argmax(l));
                    pending[r] = f.pending_after(&pending[r], id);
                    id
                }
                None => argmax(l),
            };
            if model.tokenizer.end_token_ids.contains(&id) {
                finished[r] = Some(FinishReason::Stop);
            } else {
                tokens[r].push(id);
            }
            next.push(id);
        }
        if finished.iter().all(Option::is_some) || step + 1 == budget {
            break;
        }
        // The next step: one token per row at its own position, seeing every real key.
        let total = len + step + 1;
        let mut m = vec![0f32; b * total];
        for (r, &s) in starts.iter().enumerate() {
            m[r * total..r * total + s].fill(f32::NEG_INFINITY);
        }
        input = Tensor::from_vec(next, (b, 1), device)?;
        let p: Vec<u32> = rows.iter().map(|r| (r.len() + step) as u32).collect();
        positions = Tensor::from_vec(p, (b, 1), device)?;
        mask_t = Tensor::from_vec(m, (b, 1, 1, 1, total), device)?;
    }
    tokens
        .into_iter()
        .zip(finished)
        .map(|(toks, f)| {
            Ok(Completion {
                text: model.tokenizer.decode(&toks, true)?,
                tokens: toks,
                finish_reason: f.unwrap_or(FinishReason::Length),
            })
        })
        .collect()
}
