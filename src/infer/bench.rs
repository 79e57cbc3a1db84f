//! `afinar bench infer`: prefill (one forward over a 512-token prompt, all-position and
//! last-position logits) and greedy decode (a 32-token prompt, 128 new tokens, end tokens
//! ignored), median of the timed runs after one warm-up, as `crate::train::bench` measures a
//! training step.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::{generate, GenerateOptions, SamplingParams};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::bench::peak_rss_mib;
use crate::Result;

/// Options of the benchmark.
pub struct BenchInfer {
    /// Model spec (path, repo id or alias).
    pub model: String,
    /// Timed repetitions (after one warm-up); at least 1.
    pub runs: usize,
    /// Print each run's speed on stderr.
    pub verbose: bool,
    /// How the base's matrices are held.
    pub base_dtype: crate::model::BaseDtype,
    /// 8-bit integer dot products for decoding.
    pub int8_dot: bool,
}

const PREFILL_TOKENS: usize = 512;
const DECODE_PROMPT: usize = 32;
const DECODE_NEW: usize = 128;

/// Runs the benchmark on `device` and returns its `RESULT` object.
pub fn run(b: &BenchInfer, device: &Device) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let mut model = Model::load_with(&b.model, device, b.base_dtype)?;
    model.transformer.quantized_dot = b.int8_dot;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    let runs = b.runs.max(1);
    let say = |line: String| {
        if b.verbose {
            eprintln!("{line}");
        }
    };

    // Prefill: one forward over the prompt, all-position logits and last-position logits.
    let ids = random_ids(PREFILL_TOKENS, vocab, 8);
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let n = PREFILL_TOKENS as f64;
    let mut all_s = Vec::new();
    let mut last_s = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        model
            .transformer
            .forward(&input, None)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        model
            .transformer
            .forward_last(&input, None)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let l = t.elapsed().as_secs_f64();
        say(format!(
            "prefill run {i}: all-logits {:.1} tok/s, last-logits {:.1} tok/s",
            n / a,
            n / l
        ));
        if i > 0 {
            all_s.push(a);
            last_s.push(l);
        }
    }

    // Decode: greedy, end tokens ignored so every run writes the same number of tokens.
    let prompt = random_ids(DECODE_PROMPT, vocab, 7);
    let opts = GenerateOptions {
        max_new_tokens: DECODE_NEW,
        sampling: SamplingParams::default(),
        stop_at_end_token: false,
        scripts: None,
    };
    let mut walls = Vec::new();
    let mut after_first = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let g = generate(&model, &prompt, &opts, |_| {})?;
        let wall = t.elapsed().as_secs_f64();
        say(format!(
            "decode run {i}: {:.1} new tok/s ({} tokens in {wall:.2} s)",
            g.generated_tokens as f64 / wall,
            g.generated_tokens
        ));
        if i > 0 {
            walls.push(g.generated_tokens as f64 / wall);
            after_first.push((g.generated_tokens - 1) as f64 / (wall - g.prefill_secs));
        }
    }
    Ok(json!({
        "mode": "infer",
        "model": model.source.path().display().to_string(),
        "threads": rayon::current_num_threads(),
        "malloc": std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "default".into()),
        "held": model.transformer.held_formats(),
        "int8_dot": b.int8_dot,
        "load_s": load_s,
        "prefill": {"prompt_tokens": PREFILL_TOKENS, "tokens_per_s": n / median(all_s),
                    "last_logits": {"tokens_per_s": n / median(last_s)}},
        "decode": {"prompt_tokens": DECODE_PROMPT, "new_tokens": DECODE_NEW,
                   "new_tokens_per_s": median(walls), "decode_tokens_per_s": median(after_first)},
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Deterministic pseudo-random token ids below `vocab`, avoiding the first 16 (special) ids.
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| 16 + (rng.next_u64() % (vocab as u64 - 16)) as u32)
        .collect()
}

/// The middle value (the upper one of an even count); `v` must not be empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_skip_special_ids_and_repeat_per_seed() {
        let a = random_ids(1000, 50, 3);
        assert!(a.iter().all(|&i| (16..50).contains(&i)));
        assert_eq!(a, random_ids(1000, 50, 3));
        assert_ne!(a, random_ids(1000, 50, 4));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
    }
}
