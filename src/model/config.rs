//! The architecture hyper-parameters every supported model shares, read from `config.json` or
//! from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The architectures afinar implements: Llama's decoder and what each family changes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    #[default]
    /// Llama 2/3.x, SmolLM/SmolLM2, Falcon3, DeepSeek-R1-Distill-Llama.
    Llama,
    /// Llama with a sliding attention window on every layer.
    Mistral,
    /// Llama with q/k/v biases (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen).
    Qwen2,
    /// Llama with a per-head RMSNorm on queries and keys before RoPE, and an explicit head size.
    Qwen3,
    /// Llama whose layers listed in `no_rope_layers` skip RoPE.
    SmolLM3,
    /// Gemma 3 text: norms as x·(1 + w), four norms per block, embeddings scaled by √hidden,
    /// GELU-tanh MLP, q/k norms, sliding-window layers with their own RoPE base.
    Gemma3,
    /// Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj`, partial rotary, LongRoPE.
    Phi3,
    /// Classic Falcon (7B): attention and MLP in parallel from one LayerNorm (with bias),
    /// multi-query attention through one fused `query_key_value`, a plain GELU MLP, and
    /// checkpoint names of its own (`transformer.h.N.…`).
    Falcon,
}

impl Architecture {
    /// Names accepted in `config.json` (`model_type`) and GGUF (`general.architecture`).
    pub const SUPPORTED: &'static str = "llama (Llama 2/3.x, SmolLM, SmolLM2, Falcon3), mistral, \
         qwen2 (Qwen2.5, DeepSeek-R1-Distill-Qwen), qwen3, smollm3, gemma3 (gemma3_text), \
         phi3 (Phi-3, Phi-4-mini), falcon (multi-query, parallel attention: Falcon-7B)";

    /// Parses a `model_type` / GGUF architecture name.
    pub fn parse(name: &str, path: &Path) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "smollm3" => Ok(Self::SmolLM3),
            "gemma3" | "gemma3_text" => Ok(Self::Gemma3),
            "phi3" => Ok(Self::Phi3),
            "falcon" | "RefinedWebModel" | "RefinedWeb" => Ok(Self::Falcon),
            other => Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
                supported: format!("{}{}", Self::SUPPORTED, missing_note(other)),
            }),
        }
    }

    /// The lower-case name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::SmolLM3 => "smollm3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
            Self::Falcon => "falcon",
        }
    }

    /// Gemma's RMSNorm multiplies by (1 + w): the checkpoints store w.
    pub fn norm_offset(self) -> bool {
        self == Self::Gemma3
    }

    /// Gemma's block norms the attention and MLP outputs too (four norms, not two).
    pub fn sandwich_norms(self) -> bool {
        self == Self::Gemma3
    }

    /// Per-head RMSNorm on queries and keys (`q_norm`, `k_norm`).
    pub fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }

    /// One projection for q, k and v and one for gate and up (Phi-3), as the checkpoints hold
    /// them.
    pub fn fused_projections(self) -> bool {
        matches!(self, Self::Phi3 | Self::Falcon)
    }

    /// LayerNorm with a bias (Falcon) instead of RMSNorm.
    pub fn layer_norm(self) -> bool {
        self == Self::Falcon
    }

    /// Attention and MLP read the same normalised input and add to one residual (Falcon).
    pub fn parallel_block(self) -> bool {
        self == Self::Falcon
    }

    /// `down(act(gate) · up)`; false for Falcon's plain `down(act(up))`.
    pub fn gated_mlp(self) -> bool {
        self != Self::Falcon
    }

    /// Whether llama.cpp's GGUF files hold this family's Q/K rows permuted for its interleaved
    /// RoPE (the families its converter writes through `LlamaModel`).
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral | Self::SmolLM3)
    }

    /// The MLP's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            Self::Falcon => Activation::Gelu,
            _ => Activation::Silu,
        }
    }
}

/// What an unsupported architecture would need, for the error message.
fn missing_note(arch: &str) -> &'static str {
    match arch {
        "phimoe" | "phi" => {
            "; of Microsoft's families only phi3 (Phi-3, Phi-4-mini) is implemented"
        }
        "gemma" | "gemma2" => "; Gemma 1/2 (logit soft-capping) is not implemented, only Gemma 3",
        _ => "",
    }
}

/// The gate activation of the gated MLP `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen, Mistral).
    Silu,
    /// GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU (erf), Falcon's `gelu`.
    Gelu,
}

/// Which RoPE table a layer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRope {
    /// `rope_theta` (with any scaling).
    Global,
    /// The sliding layers' own base (Gemma 3's `rope_local_base_freq`).
    Local,
    /// No rotary embedding (SmolLM3's `no_rope_layers`).
    None,
}

/// Llama 3.1-style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// LongRoPE (Phi-3 128k, Phi-4-mini): each RoPE frequency divided by its factor, and cos/sin
/// scaled by `attention_factor`. As in transformers, a forward call takes `long_factor` when its
/// largest position reaches `original_max_position_embeddings`, `short_factor` otherwise; keys
/// already cached keep the rotation they were cached with.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

/// Hyper-parameters of a decoder-only transformer of the Llama family and its relatives.
#[derive(Debug, Clone, PartialEq, Default)]
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
    /// The sliding attention window: a query sees the last `w` positions (itself included).
    pub sliding_window: Option<usize>,
    /// Which layers slide (`layer_types`); empty means every layer, when there is a window.
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding layers, when they have their own (Gemma 3).
    pub rope_local_theta: Option<f64>,
    /// Layers without RoPE (SmolLM3); empty means none.
    pub no_rope_layers: Vec<bool>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` (Gemma) instead of
    /// `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Fraction of each head that RoPE turns (Phi-4-mini: 0.75); 1 when absent.
    pub partial_rotary_factor: Option<f64>,
    /// Phi-3's LongRoPE frequency factors.
    pub longrope: Option<LongRope>,
    /// Linear RoPE position scaling of the global layers (Gemma 3 4B and up: `factor`).
    pub rope_linear_factor: Option<f64>,
}

impl ModelConfig {
    /// Number of parameters implied by the shapes (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let a = self.architecture;
        let norms = if a.sandwich_norms() { 4 * h } else { 2 * h }
            + if a.qk_norm() { 2 * self.head_dim } else { 0 };
        let per_layer = attn + mlp + norms;
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
        if raw.mlp_bias == Some(true) {
            return Err(Error::bad_file(path, "mlp_bias = true is not supported"));
        }
        if raw.final_logit_softcapping.is_some() || raw.attn_logit_softcapping.is_some() {
            return Err(Error::bad_file(
                path,
                "logit soft-capping (Gemma 2) is not supported",
            ));
        }
        if architecture == Architecture::Falcon {
            check_falcon(&raw, path)?;
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        // transformers 5 writes `rope_parameters` (theta and scaling together; Gemma 3 one
        // entry per layer type); older versions write `rope_theta` and `rope_scaling`.
        let per_type = |t: &str| -> Result<Option<HfRopeScaling>> {
            let Some(v) = raw.rope_parameters.as_ref().and_then(|r| r.get(t)) else {
                return Ok(None);
            };
            serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::bad_file(path, format!("rope_parameters.{t}: {e}")))
        };
        let (global, local) = match per_type("full_attention")? {
            Some(g) => (Some(g), per_type("sliding_attention")?),
            None => {
                let flat: Option<HfRopeScaling> = match &raw.rope_parameters {
                    Some(v) => Some(
                        serde_json::from_value(v.clone())
                            .map_err(|e| Error::bad_file(path, format!("rope_parameters: {e}")))?,
                    ),
                    None => None,
                };
                (flat, None)
            }
        };
        let rope = raw.rope_scaling.as_ref().or(global.as_ref());
        let rope_theta = raw
            .rope_theta
            .or(global.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(match architecture {
                Architecture::Gemma3 => 1_000_000.0,
                _ => 10_000.0,
            });
        let mut rope_linear_factor = None;
        let mut longrope = None;
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
            Some(s) if s.rope_type.as_deref().or(s.kind.as_deref()) == Some("linear") => {
                rope_linear_factor = Some(s.factor.unwrap_or(1.0));
                None
            }
            Some(s)
                if matches!(
                    s.rope_type.as_deref().or(s.kind.as_deref()),
                    Some("longrope") | Some("su")
                ) =>
            {
                let (Some(short), Some(long)) = (&s.short_factor, &s.long_factor) else {
                    return Err(Error::bad_file(
                        path,
                        "longrope scaling without short_factor and long_factor",
                    ));
                };
                let max_pos = raw.max_position_embeddings.unwrap_or(2048);
                let orig = s
                    .original_max_position_embeddings
                    .or(raw.original_max_position_embeddings)
                    .unwrap_or(max_pos);
                let factor = s.factor.unwrap_or(max_pos as f64 / orig.max(1) as f64);
                let attention_factor = s.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
                });
                longrope = Some(LongRope {
                    short_factor: short.clone(),
                    long_factor: long.clone(),
                    original_max_position_embeddings: orig,
                    attention_factor,
                });
                None
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
                    "rope_scaling type {:?} is not supported (supported: llama3, linear, default)",
                    s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("?")
                ),
                ))
            }
            None => None,
        };
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        // A list with one entry per layer must have as many as there are layers.
        let per_layer = |len: usize, key: &str| {
            if len == num_layers {
                return Ok(());
            }
            Err(Error::bad_file(
                path,
                format!("{key} has {len} entries for {num_layers} layers"),
            ))
        };
        // A window applies unless the config turns it off (Qwen2/3 and SmolLM3 carry a size
        // with `use_sliding_window: false`); `layer_types` says which layers slide (Gemma 3;
        // its older configs give a pattern: every 6th layer global).
        let sliding_window = raw
            .sliding_window
            .filter(|_| raw.use_sliding_window != Some(false));
        let sliding_layers = match (&raw.layer_types, sliding_window) {
            (_, None) => vec![],
            (Some(types), Some(_)) => {
                per_layer(types.len(), "layer_types")?;
                types.iter().map(|t| t == "sliding_attention").collect()
            }
            (None, Some(_)) if architecture == Architecture::Gemma3 => {
                let every = raw.sliding_window_pattern.unwrap_or(6).max(1);
                (0..num_layers).map(|i| (i + 1) % every != 0).collect()
            }
            (None, Some(_)) => vec![],
        };
        let no_rope_layers = match (&raw.no_rope_layers, architecture) {
            (Some(v), _) => {
                per_layer(v.len(), "no_rope_layers")?;
                v.iter().map(|&r| r == 0).collect()
            }
            (None, Architecture::SmolLM3) => (0..num_layers).map(|i| (i + 1) % 4 == 0).collect(),
            (None, _) => vec![],
        };
        let rope_local_theta = match architecture {
            Architecture::Gemma3 => Some(
                raw.rope_local_base_freq
                    .or(local.as_ref().and_then(|l| l.rope_theta))
                    .unwrap_or(10_000.0),
            ),
            _ => None,
        };
        let config = Self {
            architecture,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: match architecture {
                Architecture::Falcon => raw.ffn_hidden_size.unwrap_or(4 * hidden_size),
                _ => need(raw.intermediate_size, "intermediate_size")?,
            },
            num_layers,
            num_heads,
            num_kv_heads: match architecture {
                Architecture::Falcon => 1,
                _ => raw.num_key_value_heads.unwrap_or(num_heads),
            },
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.or(raw.layer_norm_epsilon).unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(matches!(
                architecture,
                Architecture::Gemma3 | Architecture::Falcon
            )),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => raw.attention_bias.unwrap_or(false),
            },
            sliding_window,
            sliding_layers,
            rope_local_theta,
            no_rope_layers,
            query_pre_attn_scalar: match architecture {
                Architecture::Gemma3 => Some(raw.query_pre_attn_scalar.unwrap_or(256.0)),
                _ => None,
            },
            rope_scaling,
            partial_rotary_factor: raw
                .partial_rotary_factor
                .or(global.as_ref().and_then(|g| g.partial_rotary_factor))
                .filter(|&f| f != 1.0),
            longrope,
            rope_linear_factor,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// The attention window of layer `i`, if it slides.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let w = self.sliding_window?;
        (self.sliding_layers.is_empty() || self.sliding_layers.get(i) == Some(&true)).then_some(w)
    }

    /// The RoPE table layer `i` takes.
    pub fn layer_rope(&self, i: usize) -> LayerRope {
        if self.no_rope_layers.get(i) == Some(&true) {
            LayerRope::None
        } else if self.rope_local_theta.is_some() && self.layer_window(i).is_some() {
            LayerRope::Local
        } else {
            LayerRope::Global
        }
    }

    /// The factor attention scores are multiplied by.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// The dimensions of each head RoPE turns (all but under partial rotary).
    pub fn rotary_dim(&self) -> usize {
        match self.partial_rotary_factor {
            Some(f) => ((self.head_dim as f64 * f) as usize) & !1,
            None => self.head_dim,
        }
    }

    /// Whether any layer's attention slides (the masks then differ per layer).
    pub fn any_window(&self) -> bool {
        (0..self.num_layers).any(|i| self.layer_window(i).is_some())
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
        if let Some(f) = self.partial_rotary_factor {
            if !(f > 0.0 && f <= 1.0) || self.rotary_dim() == 0 {
                return bad(format!("partial_rotary_factor {f} must be in (0, 1]"));
            }
        }
        if let Some(l) = &self.longrope {
            let n = self.rotary_dim() / 2;
            if l.short_factor.len() != n || l.long_factor.len() != n {
                return bad(format!(
                    "longrope factors have {} and {} entries; the rotary dims need {n}",
                    l.short_factor.len(),
                    l.long_factor.len()
                ));
            }
            if l.short_factor
                .iter()
                .chain(&l.long_factor)
                .any(|f| !(f.is_finite() && *f > 0.0))
            {
                return bad("longrope factors must be finite and positive".into());
            }
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

/// The Falcon variants afinar runs: Falcon-7B's (multi-query, parallel attention, no biases,
/// RoPE, GELU); the others name what differs.
fn check_falcon(raw: &HfConfig, path: &Path) -> Result<()> {
    let unsupported = [
        (
            raw.new_decoder_architecture == Some(true),
            "new_decoder_architecture (Falcon-40B/180B)",
        ),
        (
            raw.multi_query == Some(false),
            "multi_query = false (per-head interleaved query_key_value)",
        ),
        (raw.parallel_attn == Some(false), "parallel_attn = false"),
        (raw.bias == Some(true), "bias = true"),
        (raw.alibi == Some(true), "alibi (Falcon-RW)"),
        (
            raw.activation.as_deref().is_some_and(|a| a != "gelu"),
            "an activation other than gelu",
        ),
    ];
    match unsupported.iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(Error::bad_file(
            path,
            format!("Falcon with {what} is not supported; afinar runs Falcon-7B's layout"),
        )),
        None => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    attention_factor: Option<f64>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    partial_rotary_factor: Option<f64>,
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
    #[serde(alias = "n_layer")]
    num_hidden_layers: Option<usize>,
    #[serde(alias = "n_head")]
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    no_rope_layers: Option<Vec<u32>>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    query_pre_attn_scalar: Option<f64>,
    mlp_bias: Option<bool>,
    // Falcon's.
    layer_norm_epsilon: Option<f64>,
    ffn_hidden_size: Option<usize>,
    multi_query: Option<bool>,
    new_decoder_architecture: Option<bool>,
    parallel_attn: Option<bool>,
    bias: Option<bool>,
    alibi: Option<bool>,
    activation: Option<String>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<serde_json::Value>,
}
