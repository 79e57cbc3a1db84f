//! Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, in
//! Hugging Face's order, with a seeded RNG of our own so a seed gives the same text on every
//! platform and crate version.

use crate::rng::Rng;
use crate::{Error, Result};

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// Hugging Face's `repetition_penalty` (1.0 = off) over prompt and generated tokens.
    pub repeat_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning (negative temperature, top-p outside (0, 1], …).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be ≥ 0 (got {})",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top-p must be in (0, 1] (got {p})"));
            }
        }
        if self.top_k == Some(0) {
            return bad("top-k must be ≥ 1".into());
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(format!(
                "repeat penalty must be > 0 (got {})",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// Picks tokens according to [`SamplingParams`].
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// Chooses a token from `logits` (modified in place); `history` holds the prompt and the
    /// tokens generated so far, for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            apply_repeat_penalty(logits, history, p.repeat_penalty);
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, highest first; top-k and top-p cut the tail.
        let idx = top_indices(logits, p.top_k.unwrap_or(logits.len()));
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, &pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (n, &pr) in probs.iter().enumerate() {
            r -= pr;
            if r < 0.0 {
                return idx[n];
            }
        }
        idx[probs.len() - 1]
    }
}

/// The indices of the `k` highest logits, highest first (equal logits: lower index first).
pub fn top_indices(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    if k < logits.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Hugging Face's repetition penalty: positive logits divided, negative ones multiplied.
pub fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let v = &mut logits[t];
            *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn repeat_penalty_matches_hugging_face() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repeat_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits = vec![0.5, 0.2, 2.0, 1.9];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 2);
        }
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params.clone()));
        assert_ne!(a, draw(SamplingParams { seed: 8, ..params }));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities ≈ [0.64, 0.24, 0.09, 0.03]: top-p 0.6 leaves only the first.
        let logits = vec![3.0, 2.0, 1.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.6),
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = vec![0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let params = SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut logits.clone(), &[]) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.02, "{freq}");
    }

    #[test]
    fn invalid_params_are_rejected() {
        let bad = SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top-p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
