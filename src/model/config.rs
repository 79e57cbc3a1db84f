//! The architecture hyper-parameters every supported model shares, read from `config.json` or
//! from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The architectures afinar implements. Mistral is the Llama graph with a sliding-window hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// Names accepted in `config.json` (`model_type`) and GGUF (`general.architecture`).
    pub const SUPPORTED: &'static str = "llama (Llama 2/3, SmolLM, SmolLM2), mistral, qwen2";

    /// Parses a `model_type` / GGUF architecture name.
    pub fn parse(name: &str, path: &Path) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
                supported: Self::SUPPORTED.to_string(),
            }),
        }
    }

    /// The lower-case name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Llama 3.1-style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters of a decoder-only transformer of the Llama/Qwen2 family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    /// Mistral's sliding attention window; afinar attends over the full context (see `info`).
    pub sliding_window: Option<usize>,
    pub rope_scaling: Option<Llama3RopeScaling>,
}

impl ModelConfig {
    /// Number of parameters implied by the shapes (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * per_layer + h
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a valid model config.json: {e}")))?;
        let arch_name = raw
            .model_type
            .clone()
            .ok_or_else(|| Error::bad_file(path, "config.json has no 'model_type'"))?;
        let architecture = Architecture::parse(&arch_name, path)?;
        let need = |v: Option<usize>, field: &str| {
            v.ok_or_else(|| Error::bad_file(path, format!("config.json has no '{field}'")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        // transformers 5 writes `rope_parameters` (theta and scaling together); older
        // versions write `rope_theta` and `rope_scaling` separately.
        let rope = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        let rope_theta = raw
            .rope_theta
            .or(raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            Some(s) if s.rope_type.as_deref().or(s.kind.as_deref()) == Some("llama3") => {
                Some(Llama3RopeScaling {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                })
            }
            Some(s)
                if matches!(
                    s.rope_type.as_deref().or(s.kind.as_deref()),
                    Some("default") | None
                ) =>
            {
                None
            }
            Some(s) => {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "rope_scaling type {:?} is not supported (supported: llama3, default)",
                        s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("?")
                    ),
                ))
            }
            None => None,
        };
        let config = Self {
            architecture,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => raw.attention_bias.unwrap_or(false),
            },
            sliding_window: match architecture {
                Architecture::Mistral => raw.sliding_window,
                _ => None,
            },
            rope_scaling,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the shapes are consistent, so later tensor errors cannot be the first symptom.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| Err(Error::bad_file(path, why));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("model has zero heads or layers".into());
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad(format!(
                "hidden_size {}, vocab_size {} and intermediate_size {} must all be positive",
                self.hidden_size, self.vocab_size, self.intermediate_size
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope_theta {} must be a finite positive number",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!(
                "rms_norm_eps {} must be a finite number between 0 and 1",
                self.rms_norm_eps
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; RoPE needs it even",
                self.head_dim
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeScaling>,
}
