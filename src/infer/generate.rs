//! Token-by-token generation: one prefill of the prompt, then one cached decode step per token,
//! streaming text as soon as it forms whole characters.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use super::sampling::{Sampler, SamplingParams};
use super::scripts::ScriptFilter;
use crate::model::tokenizer::TokenStream;
use crate::model::transformer::Cache;
use crate::model::Model;
use crate::{Error, Result};

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's end tokens (EOS, end-of-turn). Benchmarks turn this off.
    pub stop_at_end_token: bool,
    /// Only write letters of these scripts (`--allowed-scripts`).
    pub scripts: Option<std::sync::Arc<ScriptFilter>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            stop_at_end_token: true,
            scripts: None,
        }
    }
}

/// Why generation stopped, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end token was produced.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

/// The result of [`generate`].
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated ids, without the end token.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub tokens_per_sec: f64,
    pub finish_reason: FinishReason,
    /// Seconds spent on the prompt (prefill) and on the first token.
    #[serde(skip)]
    pub prefill_secs: f64,
}

/// Generates a continuation of `prompt`, calling `on_text` with each new piece of text.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_until(model, prompt, opts, |piece| {
        on_text(piece);
        true
    })
}

/// Like [`generate`], but stops (with finish reason `stop`) as soon as `on_text` returns false:
/// a stop sequence was seen, or the client went away.
pub fn generate_until(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    opts.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens, the model's context is {ctx}",
            prompt.len()
        )));
    }
    let budget = opts.max_new_tokens.min(ctx - prompt.len());
    let device = model.transformer.device();
    let mut cache = Cache::new(&model.transformer);
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = TokenStream::new(&model.tokenizer);
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let start = Instant::now();
    let mut prefill_secs = 0.0;
    let mut finish_reason = FinishReason::Length;
    let mut pending: Vec<u8> = Vec::new();
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    for step in 0..budget {
        let logits = model.transformer.forward_last(&input, Some(&mut cache))?;
        let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = match &opts.scripts {
            Some(f) => {
                let id = f.choose(&logits, &pending, |l| sampler.sample(l, &history));
                pending = f.pending_after(&pending, id);
                id
            }
            None => sampler.sample(&mut logits, &history),
        };
        if step == 0 {
            prefill_secs = start.elapsed().as_secs_f64();
        }
        if opts.stop_at_end_token && model.tokenizer.end_token_ids.contains(&next) {
            finish_reason = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        history.push(next);
        if let Some(piece) = stream.push(next)? {
            text.push_str(&piece);
            if !on_text(&piece) {
                finish_reason = FinishReason::Stop;
                break;
            }
        }
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Flush what the stream held back (an incomplete character at the very end).
    let full = model.tokenizer.decode(&tokens, true)?;
    if let Some(rest) = full.strip_prefix(text.as_str()) {
        if !rest.is_empty() {
            on_text(rest);
        }
    }
    let text = full;
    Ok(Generation {
        text,
        generated_tokens: tokens.len(),
        tokens,
        prompt_tokens: prompt.len(),
        tokens_per_sec: if elapsed > 0.0 {
            history.len().saturating_sub(prompt.len()) as f64 / elapsed
        } else {
            0.0
        },
        finish_reason,
        prefill_secs,
    })
}
