//! The decoder-only transformer shared by every supported family (Llama, Mistral, Qwen2/3,
//! SmolLM3, Gemma 3: see [`Architecture`] for what each changes), written for training as well
//! as inference.
//!
//! Only differentiable candle ops are used: candle's fused `rms_norm`, `softmax_last_dim`, `sdpa`
//! and `rope*` have no backward and silently detach gradients, so they must not appear on any path
//! that training takes. Fused kernels with hand-written backward belong in their own files.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::kv_cache::KvCache;

use super::config::{Activation, Architecture, LayerRope, ModelConfig};
use super::ops;
use super::ops::attention::{AttentionMask, Heads};
use super::ops::frozen_matmul::frozen_matmul;
use super::ops::lora_linear::{linear_reference, lora_linear, lora_linear_reference};
use super::ops::packed_matmul::MatmulMode;
use super::weights::{Weight, Weights};
use crate::Result;

/// A low-rank adapter on a [`Linear`]: `y += scale · (dropout(x) Aᵀ) Bᵀ`, A (rank, in),
/// B (out, rank).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: LoraDropout,
}

/// LoRA dropout with masks that are a pure function of (key, adapter id): the trainer sets the
/// key for each micro-batch (0 = off, as in evaluation), so a run and its resumed copy draw the
/// same masks.
#[derive(Debug, Clone, Default)]
pub struct LoraDropout {
    pub p: f32,
    pub id: u64,
    pub key: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl LoraDropout {
    /// The mask for an input of `n` elements, scaled by 1/(1 − p); `None` when dropout is off.
    fn mask(&self, n: usize) -> Option<std::sync::Arc<Vec<f32>>> {
        let key = self.key.load(std::sync::atomic::Ordering::Relaxed);
        if self.p <= 0.0 || key == 0 {
            return None;
        }
        let mut rng = crate::rng::Rng::new(crate::rng::derive_seed(key, self.id));
        let keep = 1.0 / (1.0 - self.p);
        let mask = (0..n)
            .map(|_| {
                if (rng.next_f64() as f32) < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Some(std::sync::Arc::new(mask))
    }
}

/// Which kernels a forward pass takes (see [`Transformer::fused`] and
/// [`Transformer::quantized_dot`]).
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    pub fused: bool,
    pub mode: MatmulMode,
}

/// A dense layer `y = x Wᵀ + b` with the weight in PyTorch layout (out, in), optionally with a
/// LoRA adapter. A weight that is not a variable is frozen: its backward computes only dx. The
/// weight is f32 or packed (bf16, f16, GGUF blocks; then always frozen).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    fn load(w: &mut Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.take_weight(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    /// Applies the layer to `x` of shape (..., in); one 2-D GEMM over all leading dimensions.
    /// `k.fused` false takes the composition of candle ops (see [`Transformer::fused`]).
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp;
        // A reshape is a graph node whose backward copies the gradient: none for 2-D inputs.
        let x = if dims.len() == 2 {
            x.clone()
        } else {
            x.reshape((rows, inp))?
        };
        // The fused kernels serve frozen weights only; they fall back to the composition
        // themselves off the CPU.
        let fused = k.fused && !self.weight.is_variable();
        let mask = self
            .lora
            .as_ref()
            .and_then(|l| l.dropout.mask(x.elem_count()));
        let y = match &self.lora {
            Some(l) if fused => lora_linear(
                &x,
                &self.weight,
                self.bias.as_ref(),
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
                mask,
                k.mode,
            )?,
            Some(l) => lora_linear_reference(
                &x,
                &self.weight,
                self.bias.as_ref(),
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
                mask.as_deref(),
            )?,
            None if fused => {
                let y = frozen_matmul(&x, &self.weight, k.mode)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            None => linear_reference(&x, &self.weight, self.bias.as_ref())?,
        };
        if dims.len() == 2 {
            return Ok(y);
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// RMSNorm `x / sqrt(mean(x²) + eps) * w`, differentiable (fused, hand-written backward, unless
/// `fused` is false).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    Ok(if fused {
        ops::rms_norm::rms_norm(x, weight, eps)?
    } else {
        ops::rms_norm::rms_norm_reference(x, weight, eps)?
    })
}

/// How a model normalises: the epsilon, and whether the weights are Gemma's offsets (the norm
/// multiplies by 1 + w).
#[derive(Debug, Clone, Copy)]
pub struct NormKind {
    pub eps: f64,
    pub offset: bool,
    /// LayerNorm (mean removed, with a bias: Falcon) instead of RMSNorm.
    pub layer_norm: bool,
}

impl NormKind {
    pub fn of(c: &ModelConfig) -> Self {
        Self {
            eps: c.rms_norm_eps,
            offset: c.architecture.norm_offset(),
            layer_norm: c.architecture.layer_norm(),
        }
    }

    /// The norm of `x` with weight `w` and, for a LayerNorm, bias `b`.
    pub fn apply_biased(
        self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        fused: bool,
    ) -> Result<Tensor> {
        match (self.layer_norm, b) {
            (true, Some(b)) => Ok(ops::layer_norm::layer_norm(x, w, b, self.eps)?),
            _ => self.apply(x, w, fused),
        }
    }

    /// RMSNorm of `x` over its last dimension with stored weight `w`.
    pub fn apply(self, x: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
        if self.offset {
            rms_norm(x, &(w + 1.0)?, self.eps, fused)
        } else {
            rms_norm(x, w, self.eps, fused)
        }
    }

    /// RMSNorm of each head of `x` (rows, heads·d) with weight `w` (d): Qwen3's and Gemma's
    /// query/key norms.
    pub fn per_head(self, x: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let d = w.dim(0)?;
        let y = self.apply(&x.reshape((rows * width / d, d))?, w, fused)?;
        Ok(y.reshape((rows, width))?)
    }
}

/// Hugging Face's "rotate half" RoPE: `x·cos + rotate_half(x)·sin` (fused, hand-written backward,
/// unless `fused` is false).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
    Ok(if fused {
        ops::rope::apply_rope(x, cos, sin)?
    } else {
        ops::rope::apply_rope_reference(x, cos, sin)?
    })
}

/// RoPE on heads of `head_dim` values, of which the tables' width turns (all, or Phi's
/// partial rotary).
pub fn apply_rope_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
    fused: bool,
) -> Result<Tensor> {
    Ok(if fused {
        ops::rope::apply_rope_partial(x, cos, sin, head_dim)?
    } else {
        ops::rope::apply_rope_partial_reference(x, cos, sin, head_dim)?
    })
}

/// The query, key and value projections: three, or Phi-3's one `qkv_proj` whose output is
/// q | k | v (kept fused, as its checkpoints, adapters and llama.cpp have it).
#[derive(Debug, Clone)]
pub enum Qkv {
    Split {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused(Linear),
}

/// One attention block: projections, RoPE and grouped-query attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3), applied before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// The factor scores are multiplied by (`head_dim^-1/2`, or Gemma's own).
    pub(crate) scale: f64,
}

impl Attention {
    /// Queries and keys of `x` (b·t, hidden), normalised per head where the model does so;
    /// before RoPE.
    pub(crate) fn project(
        &self,
        x: &Tensor,
        norm: NormKind,
        kern: Kernels,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = match &self.qkv {
            Qkv::Split {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward(x, kern)?,
                k_proj.forward(x, kern)?,
                v_proj.forward(x, kern)?,
            ),
            Qkv::Fused(l) => self.split_qkv(&l.forward(x, kern)?)?,
        };
        self.normed(q, k, v, norm, kern.fused)
    }

    /// q, k, v of a fused projection's output (rows, (h + 2·kvh)·d).
    pub(crate) fn split_qkv(&self, y: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        Ok((
            y.narrow(1, 0, q)?.contiguous()?,
            y.narrow(1, q, kv)?.contiguous()?,
            y.narrow(1, q + kv, kv)?.contiguous()?,
        ))
    }

    /// Applies the per-head query/key norms, where the model has them.
    pub(crate) fn normed(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        norm: NormKind,
        fused: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                norm.per_head(&q, qn, fused)?,
                norm.per_head(&k, kn, fused)?,
                v,
            ),
            _ => (q, k, v),
        })
    }

    /// `x` is (b·t, hidden); `rope` None for a layer without rotary embedding.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        rope: Option<&(Tensor, Tensor)>,
        mask: Option<&AttentionMask>,
        cache: Option<&mut KvCache>,
        norm: NormKind,
        kern: Kernels,
    ) -> Result<Tensor> {
        let fused = kern.fused;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Everything stays 2-D, (b·t, heads·d), the layout the projections write: no copies,
        // and no reshape nodes whose backward would copy the gradient.
        let (q, k, v) = self.project(x, norm, kern)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (
                apply_rope_heads(&q, cos, sin, d, fused)?,
                apply_rope_heads(&k, cos, sin, d, fused)?,
            ),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some(c) => {
                let (k, v) =
                    c.append(&k.reshape((b, (), kvh * d))?, &v.reshape((b, (), kvh * d))?)?;
                (k.contiguous()?, v.contiguous()?)
            }
            None => (k, v),
        };
        let heads = Heads {
            batch: b,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let scale = self.scale;
        let out = if fused {
            ops::attention::attention(&q, &k, &v, mask, scale, heads)?
        } else {
            ops::attention::attention_unfused(&q, &k, &v, mask, scale, heads)?
        };
        self.o_proj.forward(&out, kern)
    }
}

/// The gate and up projections: two, or Phi-3's one `gate_up_proj` whose output is gate | up,
/// or Falcon's single `up_proj` without a gate (`down(act(up(x)))`).
#[derive(Debug, Clone)]
pub enum GateUp {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
    Plain(Linear),
}

/// `act(x)` alone, for an MLP without a gate (candle's ops: exact GELU is differentiable there).
pub(crate) fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Silu => x.silu()?,
    })
}

/// The gated feed-forward block: `down(act(gate(x)) · up(x))` (SwiGLU, or Gemma's GELU-tanh).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
    pub activation: Activation,
}

/// gate and up of a fused projection's output (rows, 2·ff).
pub(crate) fn split_gate_up(y: &Tensor) -> Result<(Tensor, Tensor)> {
    let ff = y.dim(1)? / 2;
    Ok((
        y.narrow(1, 0, ff)?.contiguous()?,
        y.narrow(1, ff, ff)?.contiguous()?,
    ))
}

/// `act(gate) · up`, differentiable (fused, hand-written backward, unless `fused` is false).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation, fused: bool) -> Result<Tensor> {
    Ok(match (act, fused) {
        (Activation::Gelu, _) => (gate.gelu_erf()? * up)?,
        (Activation::Silu, true) => ops::swiglu::swiglu(gate, up)?,
        (Activation::Silu, false) => ops::swiglu::swiglu_reference(gate, up)?,
        (Activation::GeluTanh, true) => ops::geglu::geglu(gate, up)?,
        (Activation::GeluTanh, false) => ops::geglu::geglu_reference(gate, up)?,
    })
}

impl Mlp {
    fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let act = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                let (gate, up) = (gate_proj.forward(x, k)?, up_proj.forward(x, k)?);
                gated(&gate, &up, self.activation, k.fused)?
            }
            GateUp::Fused(l) => {
                let (gate, up) = split_gate_up(&l.forward(x, k)?)?;
                gated(&gate, &up, self.activation, k.fused)?
            }
            GateUp::Plain(l) => activate(&l.forward(x, k)?, self.activation)?,
        };
        self.down_proj.forward(&act, k)
    }
}

/// One decoder layer (pre-norm attention and MLP with residuals).
#[derive(Debug, Clone)]
pub struct Block {
    /// Normalises the attention's input (`input_layernorm`), with Falcon's LayerNorm bias.
    pub attn_norm: Tensor,
    pub attn_norm_bias: Option<Tensor>,
    pub self_attn: Attention,
    /// Normalises the MLP's input (`post_attention_layernorm`; Gemma's
    /// `pre_feedforward_layernorm`); None in Falcon's parallel block, whose MLP reads the
    /// attention's normalised input.
    pub ffn_norm: Option<Tensor>,
    pub mlp: Mlp,
    /// Gemma's norms of the attention's and the MLP's outputs, before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub attn_post_norm: Option<Tensor>,
    pub ffn_post_norm: Option<Tensor>,
}

impl Block {
    /// Every projection of the block with its Hugging Face name within the layer
    /// (`self_attn.q_proj`, `mlp.gate_up_proj`, …), in the order of [`super::layout`].
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut v = match &self.self_attn.qkv {
            Qkv::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                ("self_attn.q_proj", q_proj),
                ("self_attn.k_proj", k_proj),
                ("self_attn.v_proj", v_proj),
            ],
            Qkv::Fused(l) => vec![("self_attn.qkv_proj", l)],
        };
        v.push(("self_attn.o_proj", &self.self_attn.o_proj));
        match &self.mlp.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                v.extend([("mlp.gate_proj", gate_proj), ("mlp.up_proj", up_proj)])
            }
            GateUp::Fused(l) => v.push(("mlp.gate_up_proj", l)),
            GateUp::Plain(l) => v.push(("mlp.up_proj", l)),
        }
        v.push(("mlp.down_proj", &self.mlp.down_proj));
        v
    }

    /// [`Block::linears`], mutable (adapters are attached through it).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut v = match &mut self.self_attn.qkv {
            Qkv::Split {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                ("self_attn.q_proj", q_proj),
                ("self_attn.k_proj", k_proj),
                ("self_attn.v_proj", v_proj),
            ],
            Qkv::Fused(l) => vec![("self_attn.qkv_proj", l)],
        };
        v.push(("self_attn.o_proj", &mut self.self_attn.o_proj));
        match &mut self.mlp.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                v.extend([("mlp.gate_proj", gate_proj), ("mlp.up_proj", up_proj)])
            }
            GateUp::Fused(l) => v.push(("mlp.gate_up_proj", l)),
            GateUp::Plain(l) => v.push(("mlp.up_proj", l)),
        }
        v.push(("mlp.down_proj", &mut self.mlp.down_proj));
        v
    }

    /// Every norm weight (and LayerNorm bias) of the block with its Hugging Face name within
    /// the layer (`input_layernorm.weight`, `self_attn.q_norm.weight`, …), as `layout` names
    /// them.
    pub fn norms(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("input_layernorm.weight", &self.attn_norm)];
        v.extend(
            self.attn_norm_bias
                .iter()
                .map(|b| ("input_layernorm.bias", b)),
        );
        match (&self.attn_post_norm, &self.ffn_post_norm, &self.ffn_norm) {
            (Some(a), Some(f), Some(n)) => v.extend([
                ("post_attention_layernorm.weight", a),
                ("pre_feedforward_layernorm.weight", n),
                ("post_feedforward_layernorm.weight", f),
            ]),
            (_, _, Some(n)) => v.push(("post_attention_layernorm.weight", n)),
            _ => {}
        }
        if let (Some(q), Some(k)) = (&self.self_attn.q_norm, &self.self_attn.k_norm) {
            v.extend([
                ("self_attn.q_norm.weight", q),
                ("self_attn.k_norm.weight", k),
            ]);
        }
        v
    }

    /// [`Block::norms`], mutable (full fine-tuning turns them into variables).
    pub fn norms_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![("input_layernorm.weight", &mut self.attn_norm)];
        v.extend(
            self.attn_norm_bias
                .iter_mut()
                .map(|b| ("input_layernorm.bias", b)),
        );
        match (
            &mut self.attn_post_norm,
            &mut self.ffn_post_norm,
            &mut self.ffn_norm,
        ) {
            (Some(a), Some(f), Some(n)) => v.extend([
                ("post_attention_layernorm.weight", a),
                ("pre_feedforward_layernorm.weight", n),
                ("post_feedforward_layernorm.weight", f),
            ]),
            (_, _, Some(n)) => v.push(("post_attention_layernorm.weight", n)),
            _ => {}
        }
        if let (Some(q), Some(k)) = (&mut self.self_attn.q_norm, &mut self.self_attn.k_norm) {
            v.extend([
                ("self_attn.q_norm.weight", q),
                ("self_attn.k_norm.weight", k),
            ]);
        }
        v
    }
}

/// Per-layer key/value cache for incremental decoding.
pub struct Cache {
    pub(crate) layers: Vec<KvCache>,
}

impl Cache {
    /// An empty cache for `model`.
    pub fn new(model: &Transformer) -> Self {
        Self {
            layers: (0..model.config.num_layers)
                .map(|_| KvCache::new(1, 512))
                .collect(),
        }
    }

    /// Tokens already held.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.current_seq_len())
    }

    /// Forgets everything (a new conversation).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }

    /// Appends copies of the keys and values of `other`'s first `n` tokens (a shared prompt
    /// prefix); this cache must be empty. The copies are this cache's own: candle's caches
    /// write in place, so two caches must never share a buffer.
    pub fn copy_prefix_from(&mut self, other: &Cache, n: usize) -> Result<()> {
        if self.seq_len() != 0 || n > other.seq_len() {
            return Err(crate::Error::InvalidArgument(format!(
                "cannot copy {n} tokens of a cache holding {} into one holding {}",
                other.seq_len(),
                self.seq_len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            if let (Some(k), Some(v)) = (theirs.k()?, theirs.v()?) {
                mine.append(&k.narrow(1, 0, n)?, &v.narrow(1, 0, n)?)?;
            }
        }
        Ok(())
    }
}

/// RoPE tables, attention masks and kernels shared by every block of one pass.
pub struct LayerContext {
    batch: usize,
    rope: RopeTables,
    mask: Option<AttentionMask>,
    /// The mask of the sliding layers (the causal one limited to the window), when any slides.
    window_mask: Option<AttentionMask>,
    kern: Kernels,
}

/// cos/sin tables of one pass: the global ones, and the sliding layers' own (Gemma 3).
pub(crate) struct RopeTables {
    pub global: (Tensor, Tensor),
    pub local: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    /// The tables layer `kind` takes (None: the layer has no RoPE).
    pub fn pick(&self, kind: LayerRope) -> Option<&(Tensor, Tensor)> {
        match kind {
            LayerRope::Global => Some(&self.global),
            LayerRope::Local => Some(self.local.as_ref().unwrap_or(&self.global)),
            LayerRope::None => None,
        }
    }
}

/// A decoder of any supported family with its language-model head.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub config: ModelConfig,
    pub embed_tokens: Weight,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// The final LayerNorm's bias (Falcon).
    pub norm_bias: Option<Tensor>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Weight>,
    inv_freq: Tensor,
    /// LongRoPE's long-factor inverse frequencies, for calls past the original context.
    inv_freq_long: Option<Tensor>,
    /// The sliding layers' inverse frequencies, when they have their own base (Gemma 3).
    inv_freq_local: Option<Tensor>,
    /// Key of the current LoRA dropout masks (0 = no dropout); set by the trainer.
    pub lora_dropout_key: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Use the fused CPU kernels of `model::ops` (the default). False forces every op onto its
    /// reference composition of candle ops, as on a non-CPU device, where the kernels are
    /// skipped anyway: for checking the two paths against each other, and for a device whose
    /// kernels are not trusted.
    pub fused: bool,
    /// Decode with 8-bit integer dot products on GGUF-quantized weights (activations quantized
    /// per block, as llama.cpp does) when a product has at most a few rows: ~15–25 % faster
    /// decoding here, logits within ~1 % (`--int8-dot`). Off by default: every product is then
    /// exact in f32 against the dequantized weights (blocks unpacked in registers), so
    /// generation equals transformers' on the same weights.
    pub quantized_dot: bool,
    /// Multiply the frozen base's matrices in bf16 with f32 accumulation (AVX512-BF16) for
    /// products of more than a few rows: training's `compute = "bf16"`. Off by default (exact
    /// f32); ignored on CPUs without the instructions.
    pub bf16_compute: bool,
}

impl Transformer {
    /// Builds the model from f32 weights in Hugging Face naming. `rope_freq_factors` are the
    /// per-frequency divisors some GGUF files store (`rope_freqs.weight`).
    pub fn from_weights(
        config: ModelConfig,
        mut w: Weights,
        rope_freq_factors: Option<Vec<f32>>,
    ) -> Result<Self> {
        let c = &config;
        let (hs, hd) = (c.hidden_size, c.head_dim);
        let embed_tokens = w.take_weight("model.embed_tokens.weight", &[c.vocab_size, hs])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        let arch = c.architecture;
        let (q_out, kv_out, ab) = (c.num_heads * hd, c.num_kv_heads * hd, c.attention_bias);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
                Linear::load(&mut w, &format!("{p}.{name}"), out, inp, bias)
            };
            let qkv = if arch.fused_projections() {
                Qkv::Fused(lin("self_attn.qkv_proj", q_out + 2 * kv_out, hs, ab)?)
            } else {
                Qkv::Split {
                    q_proj: lin("self_attn.q_proj", q_out, hs, ab)?,
                    k_proj: lin("self_attn.k_proj", kv_out, hs, ab)?,
                    v_proj: lin("self_attn.v_proj", kv_out, hs, ab)?,
                }
            };
            let self_attn = Attention {
                qkv,
                o_proj: lin("self_attn.o_proj", hs, q_out, false)?,
                q_norm: None,
                k_norm: None,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: hd,
                scale: c.attention_scale(),
            };
            let ff = c.intermediate_size;
            let gate_up = if !arch.gated_mlp() {
                GateUp::Plain(lin("mlp.up_proj", ff, hs, false)?)
            } else if arch.fused_projections() {
                GateUp::Fused(lin("mlp.gate_up_proj", 2 * ff, hs, false)?)
            } else {
                GateUp::Split {
                    gate_proj: lin("mlp.gate_proj", ff, hs, false)?,
                    up_proj: lin("mlp.up_proj", ff, hs, false)?,
                }
            };
            let mlp = Mlp {
                gate_up,
                down_proj: lin("mlp.down_proj", hs, ff, false)?,
                activation: arch.activation(),
            };
            let mut norm = |name: &str, n: usize| w.take(&format!("{p}.{name}"), &[n]);
            let mut block = Block {
                attn_norm: norm("input_layernorm.weight", hs)?,
                attn_norm_bias: match arch.layer_norm() {
                    true => Some(norm("input_layernorm.bias", hs)?),
                    false => None,
                },
                self_attn,
                ffn_norm: match (arch.parallel_block(), arch.sandwich_norms()) {
                    (true, _) => None,
                    (false, true) => Some(norm("pre_feedforward_layernorm.weight", hs)?),
                    (false, false) => Some(norm("post_attention_layernorm.weight", hs)?),
                },
                mlp,
                attn_post_norm: None,
                ffn_post_norm: None,
            };
            if arch.sandwich_norms() {
                block.attn_post_norm = Some(norm("post_attention_layernorm.weight", hs)?);
                block.ffn_post_norm = Some(norm("post_feedforward_layernorm.weight", hs)?);
            }
            if arch.qk_norm() {
                block.self_attn.q_norm = Some(norm("self_attn.q_norm.weight", hd)?);
                block.self_attn.k_norm = Some(norm("self_attn.k_norm.weight", hd)?);
            }
            layers.push(block);
        }
        let norm = w.take("model.norm.weight", &[hs])?;
        let norm_bias = match arch.layer_norm() {
            true => Some(w.take("model.norm.bias", &[hs])?),
            false => None,
        };
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            w.take_weight_optional("lm_head.weight", &[c.vocab_size, hs])?
        };
        let device = embed_tokens.device();
        let factors = rope_freq_factors.as_deref();
        let inv_freq_long = match c.longrope {
            Some(_) => Some(inv_freq(c, c.rope_theta, factors, true, &device)?),
            None => None,
        };
        let inv_freq = inv_freq(c, c.rope_theta, factors, false, &device)?;
        let inv_freq_local = match c.rope_local_theta {
            Some(theta) => Some(inv_freq_plain(c.rotary_dim(), theta, &device)?),
            None => None,
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            norm_bias,
            lm_head,
            inv_freq,
            inv_freq_long,
            inv_freq_local,
            lora_dropout_key: Default::default(),
            fused: true,
            quantized_dot: false,
            bf16_compute: false,
        })
    }

    /// Every projection of every layer with its Hugging Face module name
    /// (`model.layers.0.self_attn.q_proj`), for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, lin) in l.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// The final norm's weight (and LayerNorm bias) by Hugging Face name.
    pub fn final_norms(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("model.norm.weight", &self.norm)];
        v.extend(self.norm_bias.iter().map(|b| ("model.norm.bias", b)));
        v
    }

    /// [`Transformer::final_norms`], mutable.
    pub fn final_norms_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![("model.norm.weight", &mut self.norm)];
        v.extend(self.norm_bias.iter_mut().map(|b| ("model.norm.bias", b)));
        v
    }

    /// The device the activations live on (that of the first norm, always a tensor).
    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// Every weight matrix (embedding, head, projections) as held.
    fn matrices(&self) -> Vec<&Weight> {
        let mut out = vec![&self.embed_tokens];
        out.extend(self.lm_head.as_ref());
        for l in &self.layers {
            out.extend(l.linears().into_iter().map(|(_, lin)| &lin.weight));
        }
        out
    }

    /// Format (`Q4_1`, `BF16`, `F32`) → number of matrices held in it.
    pub fn held_formats(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for w in self.matrices() {
            *m.entry(w.format()).or_insert(0) += 1;
        }
        m
    }

    /// Bytes of all weights in memory: matrices as held, norms and biases in f32 (adapters
    /// not counted).
    pub fn weight_bytes(&self) -> usize {
        let f32s = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n: usize = self.matrices().iter().map(|w| w.bytes()).sum();
        n += f32s(&self.norm) + self.norm_bias.as_ref().map_or(0, f32s);
        for l in &self.layers {
            n += l.norms().iter().map(|(_, t)| f32s(t)).sum::<usize>();
            for (_, lin) in l.linears() {
                n += lin.bias.as_ref().map_or(0, f32s);
            }
        }
        n
    }

    /// The kernels this model's forward passes take.
    pub fn kernels(&self) -> Kernels {
        Kernels {
            fused: self.fused,
            mode: MatmulMode {
                quantized_dot: self.quantized_dot,
                bf16: self.bf16_compute,
            },
        }
    }

    /// cos/sin tables for `positions` (shape (b, t), u32), shaped (b, t, 1, head_dim). LongRoPE
    /// takes its long factors for the whole call when the largest position reaches the original
    /// context, as transformers decides per call.
    pub(crate) fn rope_tables(&self, positions: &Tensor) -> Result<RopeTables> {
        let long = match &self.config.longrope {
            Some(l) => {
                let max = positions.flatten_all()?.max(0)?.to_scalar::<u32>()?;
                max as usize >= l.original_max_position_embeddings
            }
            None => false,
        };
        self.rope_tables_rows(positions, &vec![long; positions.dim(0)?])
    }

    /// Like [`Self::rope_tables`], with LongRoPE's choice made per row of `positions` (`long`,
    /// one flag per row): the serving engine puts many sequences' tokens in one call, each
    /// deciding as it would alone.
    pub(crate) fn rope_tables_rows(&self, positions: &Tensor, long: &[bool]) -> Result<RopeTables> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        // (1, 1, d/2), or (b, 1, d/2) when the rows differ.
        let global = match &self.inv_freq_long {
            Some(li) if long.iter().all(|&l| l) => li.reshape((1, 1, ()))?,
            Some(li) if long.iter().any(|&l| l) => {
                let pick: Vec<u32> = long.iter().map(|&l| u32::from(l)).collect();
                let pick = Tensor::from_vec(pick, b, pos.device())?;
                Tensor::stack(&[&self.inv_freq, li], 0)?
                    .index_select(&pick, 0)?
                    .unsqueeze(1)?
            }
            _ => self.inv_freq.reshape((1, 1, ()))?,
        };
        // LongRoPE scales cos and sin (Phi-3's attention factor); 1 otherwise.
        let scale = self
            .config
            .longrope
            .as_ref()
            .map_or(1.0, |l| l.attention_factor);
        let table = |inv: &Tensor| -> Result<(Tensor, Tensor)> {
            let freqs = pos.broadcast_mul(inv)?;
            let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(2)?;
            if scale == 1.0 {
                return Ok((emb.cos()?, emb.sin()?));
            }
            Ok(((emb.cos()? * scale)?, (emb.sin()? * scale)?))
        };
        let local = match &self.inv_freq_local {
            Some(inv) => Some(table(&inv.reshape((1, 1, ()))?)?),
            None => None,
        };
        Ok(RopeTables {
            global: table(&global)?,
            local,
        })
    }

    /// The embeddings of `ids` (n,), scaled by √hidden where the model does so (Gemma).
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed_tokens.embedding(ids)?;
        Ok(match self.config.architecture {
            Architecture::Gemma3 => (x * (self.config.hidden_size as f64).sqrt())?,
            _ => x,
        })
    }

    /// The mask of the sliding layers: `mask` (or none, for one new token) with every key more
    /// than the window behind its query hidden, for `t` new tokens after `past`; None when no
    /// layer slides.
    fn window_mask(
        &self,
        mask: Option<&Tensor>,
        t: usize,
        past: usize,
    ) -> Result<Option<AttentionMask>> {
        let Some(w) = self
            .config
            .sliding_window
            .filter(|_| self.config.any_window())
        else {
            return Ok(None);
        };
        let total = past + t;
        let data: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if past + i >= j + w {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let win = Tensor::from_vec(data, (1, 1, 1, t, total), self.device())?;
        let m = match mask {
            Some(m) => m.broadcast_add(&win)?,
            None => win,
        };
        Ok(Some(AttentionMask::new(&m)?))
    }

    /// Runs the decoder on `ids` (b, t) at `positions` (b, t) and returns the final normalised
    /// hidden states (b, t, hidden). `mask` is additive, broadcastable to (b, 1, 1, t, total):
    /// `None` means no masking (a single new token).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        // Every kernel below splits its work over rayon's pool. Called from outside the pool,
        // each of the ~250 parallel calls of a decoding step would hand its work to a pool
        // thread and put this one to sleep (two context switches each, half the decode time
        // measured here); entering the pool once per pass makes the inner calls cheap. Only
        // for small passes (decoding): a training pass stays on the calling thread, so its
        // activations are allocated and freed in one malloc arena with its backward's buffers
        // (across threads, glibc kept each arena's peak: +1.5 GB measured).
        if rayon::current_thread_index().is_none() && ids.elem_count() <= 64 {
            return rayon::scope(|_| self.forward_hidden(ids, positions, mask, cache));
        }
        let (b, t) = ids.dims2()?;
        // (b·t, hidden) until the end: see `Attention::forward`.
        let mut x = self.embed(&ids.flatten_all()?)?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let ctx = LayerContext {
            batch: b,
            rope: self.rope_tables(positions)?,
            mask: mask.map(AttentionMask::new).transpose()?,
            window_mask: self.window_mask(mask, t, past)?,
            kern: self.kernels(),
        };
        for i in 0..self.layers.len() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.block(i, &x, &ctx, kv)?;
        }
        self.final_norm(&x)?
            .reshape((b, t, self.config.hidden_size))
            .map_err(Into::into)
    }

    /// Decoder block `i` on `x` (b·t, hidden): attention and MLP, each with its residual.
    fn block(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        kv: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (layer, fused) = (&self.layers[i], ctx.kern.fused);
        let (c, norm) = (&self.config, NormKind::of(&self.config));
        let mask = match c.layer_window(i) {
            Some(_) => ctx.window_mask.as_ref(),
            None => ctx.mask.as_ref(),
        };
        let h = norm.apply_biased(x, &layer.attn_norm, layer.attn_norm_bias.as_ref(), fused)?;
        let rope = ctx.rope.pick(c.layer_rope(i));
        let mut attn = layer
            .self_attn
            .forward(&h, ctx.batch, rope, mask, kv, norm, ctx.kern)?;
        if let Some(w) = &layer.attn_post_norm {
            attn = norm.apply(&attn, w, fused)?;
        }
        let Some(ffn_norm) = &layer.ffn_norm else {
            // Falcon's parallel block: the MLP reads the same normalised input.
            return Ok(((x + attn)? + layer.mlp.forward(&h, ctx.kern)?)?);
        };
        let x = (x + attn)?;
        let h = norm.apply(&x, ffn_norm, fused)?;
        let mut out = layer.mlp.forward(&h, ctx.kern)?;
        if let Some(w) = &layer.ffn_post_norm {
            out = norm.apply(&out, w, fused)?;
        }
        Ok((x + out)?)
    }

    /// What a training pass over the layers needs besides the hidden states, for running them
    /// one at a time (activation checkpointing): the embedded `ids` (b·t, hidden) and the
    /// context every block takes.
    pub fn layer_inputs(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, LayerContext)> {
        let x = self.embed(&ids.flatten_all()?)?;
        let ctx = LayerContext {
            batch: ids.dim(0)?,
            rope: self.rope_tables(positions)?,
            mask: Some(AttentionMask::new(mask)?),
            window_mask: self.window_mask(Some(mask), ids.dim(1)?, 0)?,
            kern: self.kernels(),
        };
        Ok((x, ctx))
    }

    /// Decoder block `i` without a cache (see [`Transformer::layer_inputs`]).
    pub fn layer(&self, i: usize, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        self.block(i, x, ctx, None)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        NormKind::of(&self.config).apply_biased(x, &self.norm, self.norm_bias.as_ref(), self.fused)
    }

    /// Projects hidden states (..., hidden) to vocabulary logits (..., vocab).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = Linear {
            weight: self
                .lm_head
                .clone()
                .unwrap_or_else(|| self.embed_tokens.clone()),
            bias: None,
            lora: None,
        };
        head.forward(hidden, self.kernels())
    }

    /// Negative log-likelihood of `targets` (n, u32) under the head's logits of `hidden`
    /// (n, hidden), one value per row; differentiable in `hidden` when `with_grad`. A frozen head
    /// takes the fused head + cross-entropy op, which never holds all n rows' logits; a trained
    /// head, or `fused` false, the logits and the cross-entropy.
    pub fn head_nll(&self, hidden: &Tensor, targets: &Tensor, with_grad: bool) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(if !self.fused {
            ops::cross_entropy::cross_entropy_reference(&self.logits(hidden)?, targets)?
        } else if !head.is_variable() {
            ops::linear_cross_entropy::linear_cross_entropy(
                hidden,
                head,
                targets,
                with_grad,
                self.bf16_compute,
            )?
        } else {
            ops::cross_entropy::cross_entropy(&self.logits(hidden)?, targets)?
        })
    }

    /// Causal forward pass over `ids` (b, t) continuing after what `cache` holds (if any);
    /// returns the logits of every position (b, t, vocab).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let hidden = self.forward_causal(ids, cache)?;
        self.logits(&hidden)
    }

    /// Like [`Transformer::forward`] but returns only the last position's logits (b, vocab):
    /// what generation needs, without the cost of the full vocabulary projection.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let hidden = self.forward_causal(ids, cache)?;
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    fn forward_causal(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let positions =
            Tensor::arange(past as u32, (past + t) as u32, self.device())?.unsqueeze(0)?;
        // One new token sees everything before it, unless a window hides the oldest.
        let mask = if t > 1 || self.config.any_window() {
            Some(causal_mask(t, past, self.device())?)
        } else {
            None
        };
        self.forward_hidden(ids, &positions, mask.as_ref(), cache)
    }
}

/// Additive causal mask (1, 1, 1, t, past + t): query i sees keys 0..=past + i.
pub fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let total = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, 1, t, total), device)?)
}

/// Unscaled RoPE inverse frequencies `theta^(-2i/d)`.
fn inv_freq_plain(d: usize, theta: f64, device: &Device) -> Result<Tensor> {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32))
        .collect();
    Ok(Tensor::from_vec(inv, d / 2, device)?)
}

/// RoPE inverse frequencies as Hugging Face computes them, with Llama 3 or linear scaling if
/// configured.
fn inv_freq(
    c: &ModelConfig,
    theta: f64,
    factors: Option<&[f32]>,
    long: bool,
    device: &Device,
) -> Result<Tensor> {
    let d = c.rotary_dim();
    let mut inv: Vec<f32> = inv_freq_plain(d, theta, device)?.to_vec1()?;
    if let Some(l) = &c.longrope {
        let factors = if long {
            &l.long_factor
        } else {
            &l.short_factor
        };
        for (f, k) in inv.iter_mut().zip(factors) {
            *f /= *k as f32;
        }
    }
    if let Some(f) = c.rope_linear_factor {
        inv.iter_mut().for_each(|x| *x /= f as f32);
    }
    if let Some(s) = &c.rope_scaling {
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor as f32;
        let high_wavelen = old / s.high_freq_factor as f32;
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= s.factor as f32;
            } else if wavelen >= high_wavelen {
                let smooth = (old / wavelen - s.low_freq_factor as f32)
                    / (s.high_freq_factor - s.low_freq_factor) as f32;
                *f = (1.0 - smooth) * *f / s.factor as f32 + smooth * *f;
            }
        }
    } else if let Some(factors) = factors {
        for (f, k) in inv.iter_mut().zip(factors) {
            *f /= *k;
        }
    }
    Ok(Tensor::from_vec(inv, d / 2, device)?)
}
