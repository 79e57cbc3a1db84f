//! Scoring a text: the log-probability the model gives each token after the first, and the
//! perplexity over them. `afinar score` prints it; with `--json`, also the last position's
//! logits, which tests/golden/check_peft_adapter.py compares with PEFT.

use candle_core::Tensor;
use serde::Serialize;

use crate::model::ops::softmax::log_sum_exp;
use crate::model::Model;
use crate::{Error, Result};

/// A scored text.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// The token ids of the text (with the tokenizer's special tokens).
    pub ids: Vec<u32>,
    /// `logprobs[i]` = log p(ids[i + 1] | ids[..=i]); one fewer than `ids`.
    pub logprobs: Vec<f64>,
    /// exp of the mean negative log-probability.
    pub perplexity: f64,
    /// The logits at the last position (the next token's distribution).
    pub last_logits: Vec<f32>,
}

/// Runs `text` through `model` once and scores every token after the first.
pub fn score(model: &Model, text: &str) -> Result<Score> {
    score_ids(model, model.tokenizer.encode(text, true)?)
}

/// [`score`] of token ids (for text whose tokens are already known, such as a prompt and the
/// tokens generated after it).
pub fn score_ids(model: &Model, ids: Vec<u32>) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "the text to score has {} token(s); give at least two (a longer --prompt)",
            ids.len()
        )));
    }
    let input = Tensor::new(ids.as_slice(), model.transformer.device())?.unsqueeze(0)?;
    let logits: Vec<Vec<f32>> = model
        .transformer
        .forward(&input, None)?
        .squeeze(0)?
        .to_vec2()?;
    let logprobs = token_logprobs(&logits, &ids);
    Ok(Score {
        perplexity: perplexity(&logprobs),
        last_logits: logits.last().cloned().unwrap_or_default(),
        ids,
        logprobs,
    })
}

/// log-softmax of row `i - 1` at `ids[i]`, for every `i ≥ 1`.
fn token_logprobs(logits: &[Vec<f32>], ids: &[u32]) -> Vec<f64> {
    (1..ids.len())
        .map(|i| {
            let row = &logits[i - 1];
            row[ids[i] as usize] as f64 - log_sum_exp(row) as f64
        })
        .collect()
}

/// exp of the mean negative log-probability (1 when there is none).
fn perplexity(logprobs: &[f64]) -> f64 {
    if logprobs.is_empty() {
        return 1.0;
    }
    (-logprobs.iter().sum::<f64>() / logprobs.len() as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn logprobs_of_known_rows() {
        // Uniform over 4 → ln ¼; [ln 3, 0] → p = ¾ and ¼.
        let logits = vec![vec![0.0; 4], vec![3f32.ln(), 0.0]];
        let lp = token_logprobs(&logits, &[9, 2, 1]);
        assert!((lp[0] - 0.25f64.ln()).abs() < 1e-6, "{lp:?}");
        assert!((lp[1] - 0.25f64.ln()).abs() < 1e-6, "{lp:?}");
        assert!((perplexity(&lp) - 4.0).abs() < 1e-4);
        let lp = token_logprobs(&logits, &[9, 2, 0]);
        assert!((lp[1] - 0.75f64.ln()).abs() < 1e-6, "{lp:?}");
    }

    #[test]
    fn score_matches_candle_log_softmax_on_a_tiny_model() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-qwen2");
        let model = Model::load(dir, &Device::Cpu).unwrap();
        let s = score(&model, "the cat sat on the mat, and then it slept").unwrap();
        assert_eq!(s.logprobs.len(), s.ids.len() - 1);
        let input = Tensor::new(s.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.transformer.forward(&input, None).unwrap();
        let reference: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, lp) in s.logprobs.iter().enumerate() {
            let want = reference[i][s.ids[i + 1] as usize] as f64;
            assert!((lp - want).abs() < 1e-4, "token {i}: {lp} vs {want}");
        }
        let mean_nll = -s.logprobs.iter().sum::<f64>() / s.logprobs.len() as f64;
        assert!((s.perplexity.ln() - mean_nll).abs() < 1e-9);
        assert_eq!(s.last_logits.len(), model.config().vocab_size);
        assert!(matches!(score(&model, ""), Err(Error::InvalidArgument(_))));
    }
}
