//! Where each tensor of a model lives: its Hugging Face name, its GGUF name (as llama.cpp's
//! converter writes it) and its shape, for every architecture. One table that the loaders, the
//! exporters and full fine-tuning all read, so a family's tensors are named in one place.

use super::config::{Architecture, ModelConfig};

/// What a tensor is, which decides how it is stored and trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A 2-D weight (embedding, head, projection).
    Matrix,
    /// An RMSNorm weight (1-D, f32, no weight decay).
    Norm,
    /// A projection's bias (1-D, f32, no weight decay).
    Bias,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub hf: String,
    pub gguf: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

/// The seven projections of a layer: (Hugging Face module, GGUF module), in the converter's
/// order.
const SPLIT: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Phi-3's four: q, k, v in one, gate and up in one (llama.cpp keeps both fused, gate first in
/// `ffn_up`).
const FUSED: [(&str, &str); 4] = [
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Falcon's four, by afinar's names for them (its checkpoints' names are in [`FALCON_NAMES`]).
const FALCON: [(&str, &str); 4] = [
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// The projections of a layer of an `a` model: (Hugging Face module, GGUF module).
pub fn projection_names(a: Architecture) -> &'static [(&'static str, &'static str)] {
    match a {
        Architecture::Falcon => &FALCON,
        _ if a.fused_projections() => &FUSED,
        _ => &SPLIT,
    }
}

/// afinar's tensor-name pieces and Falcon's checkpoint ones (`transformer.h.0.…`): afinar
/// names every family's tensors as Llama's, and translates Falcon's where checkpoints and
/// adapters are read and written.
const FALCON_NAMES: [(&str, &str); 7] = [
    ("model.embed_tokens.", "transformer.word_embeddings."),
    ("model.norm.", "transformer.ln_f."),
    ("model.layers.", "transformer.h."),
    ("self_attn.qkv_proj", "self_attention.query_key_value"),
    ("self_attn.o_proj", "self_attention.dense"),
    ("mlp.up_proj", "mlp.dense_h_to_4h"),
    ("mlp.down_proj", "mlp.dense_4h_to_h"),
];

/// Falcon's projection modules: afinar's name, the checkpoint's.
const FALCON_MODULES: [(&str, &str); 4] = [
    ("qkv_proj", "query_key_value"),
    ("o_proj", "dense"),
    ("up_proj", "dense_h_to_4h"),
    ("down_proj", "dense_4h_to_h"),
];

/// The checkpoint's (and PEFT adapter's) name of afinar's tensor `name`.
pub fn checkpoint_name(a: Architecture, name: &str) -> String {
    if a != Architecture::Falcon {
        return name.to_string();
    }
    FALCON_NAMES
        .iter()
        .fold(name.to_string(), |n, (ours, theirs)| {
            n.replacen(ours, theirs, 1)
        })
}

/// afinar's name of the checkpoint's (or PEFT adapter's) tensor `name`.
pub fn internal_name(a: Architecture, name: &str) -> String {
    if a != Architecture::Falcon {
        return name.to_string();
    }
    FALCON_NAMES
        .iter()
        .fold(name.to_string(), |n, (ours, theirs)| {
            n.replacen(theirs, ours, 1)
        })
}

/// The checkpoint's name of a projection module (`q_proj`; Falcon's `query_key_value` for
/// `qkv_proj`), for LoRA targets and an adapter's `target_modules`.
pub fn checkpoint_module(a: Architecture, module: &str) -> &str {
    match a {
        Architecture::Falcon => FALCON_MODULES
            .iter()
            .find(|(ours, _)| *ours == module)
            .map_or(module, |(_, theirs)| theirs),
        _ => module,
    }
}

/// Each projection of a layer with its shape: (Hugging Face module, GGUF module, out, in).
pub fn projections(c: &ModelConfig) -> Vec<(&'static str, &'static str, usize, usize)> {
    let (hs, q, kv, ff) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    projection_names(c.architecture)
        .iter()
        .map(|&(hf, gg)| {
            let (out, inp) = match hf {
                "self_attn.q_proj" => (q, hs),
                "self_attn.k_proj" | "self_attn.v_proj" => (kv, hs),
                "self_attn.qkv_proj" => (q + 2 * kv, hs),
                "self_attn.o_proj" => (hs, q),
                "mlp.gate_proj" | "mlp.up_proj" => (ff, hs),
                "mlp.gate_up_proj" => (2 * ff, hs),
                _ => (hs, ff),
            };
            (hf, gg, out, inp)
        })
        .collect()
}

/// The block norms of an architecture (Hugging Face module, GGUF module), hidden-sized. The
/// first normalises the attention's input and the one named `ffn_norm` the MLP's input; Gemma
/// also normalises both outputs.
pub fn block_norms(a: Architecture) -> &'static [(&'static str, &'static str)] {
    if a.parallel_block() {
        &[("input_layernorm", "attn_norm")]
    } else if a.sandwich_norms() {
        &[
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        ]
    } else {
        &[
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ]
    }
}

/// The per-head query and key norms (head-sized), where the architecture has them.
pub fn qk_norms(a: Architecture) -> &'static [(&'static str, &'static str)] {
    if a.qk_norm() {
        &[
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
        ]
    } else {
        &[]
    }
}

/// Every tensor of a model of configuration `c`, sorted by Hugging Face name; the output head
/// only when `head` (untied models whose checkpoint has one).
pub fn tensors(c: &ModelConfig, head: bool) -> Vec<TensorSpec> {
    let hs = c.hidden_size;
    let spec = |hf: String, gguf: String, shape: Vec<usize>, role| TensorSpec {
        hf,
        gguf,
        shape,
        role,
    };
    let mut out = vec![
        spec(
            "model.embed_tokens.weight".into(),
            "token_embd.weight".into(),
            vec![c.vocab_size, hs],
            Role::Matrix,
        ),
        spec(
            "model.norm.weight".into(),
            "output_norm.weight".into(),
            vec![hs],
            Role::Norm,
        ),
    ];
    if c.architecture.layer_norm() {
        out.push(spec(
            "model.norm.bias".into(),
            "output_norm.bias".into(),
            vec![hs],
            Role::Bias,
        ));
    }
    if head {
        out.push(spec(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![c.vocab_size, hs],
            Role::Matrix,
        ));
    }
    for i in 0..c.num_layers {
        out.extend(layer_tensors(c, i));
    }
    out.sort_by(|x, y| x.hf.cmp(&y.hf));
    out
}

/// The tensors of layer `i`: block norms, query/key norms, then each projection with its bias.
pub fn layer_tensors(c: &ModelConfig, i: usize) -> Vec<TensorSpec> {
    let (a, hs) = (c.architecture, c.hidden_size);
    let spec = |hf: String, gguf: String, shape: Vec<usize>, role| TensorSpec {
        hf,
        gguf,
        shape,
        role,
    };
    let mut out = Vec::new();
    let (p, b) = (format!("model.layers.{i}"), format!("blk.{i}"));
    for (hf, gg) in block_norms(a) {
        out.push(spec(
            format!("{p}.{hf}.weight"),
            format!("{b}.{gg}.weight"),
            vec![hs],
            Role::Norm,
        ));
        if a.layer_norm() {
            out.push(spec(
                format!("{p}.{hf}.bias"),
                format!("{b}.{gg}.bias"),
                vec![hs],
                Role::Bias,
            ));
        }
    }
    for (hf, gg) in qk_norms(a) {
        out.push(spec(
            format!("{p}.{hf}.weight"),
            format!("{b}.{gg}.weight"),
            vec![c.head_dim],
            Role::Norm,
        ));
    }
    for (hf, gg, rows, cols) in projections(c) {
        out.push(spec(
            format!("{p}.{hf}.weight"),
            format!("{b}.{gg}.weight"),
            vec![rows, cols],
            Role::Matrix,
        ));
        if c.attention_bias && hf.starts_with("self_attn.") && hf != "self_attn.o_proj" {
            out.push(spec(
                format!("{p}.{hf}.bias"),
                format!("{b}.{gg}.bias"),
                vec![rows],
                Role::Bias,
            ));
        }
    }
    out
}

/// The Hugging Face name of GGUF tensor `name` in an `a` model, or None for tensors afinar does
/// not load (`rope_freqs.weight`, unknown extras).
pub fn hf_name(a: Architecture, name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output_norm.bias" => Some("model.norm.bias"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, field) = rest.split_once('.')?;
    let (module, kind) = field.rsplit_once('.')?;
    let hf = projection_names(a)
        .iter()
        .chain(block_norms(a))
        .chain(qk_norms(a))
        .find(|(_, g)| *g == module)?
        .0;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Whether GGUF files store this norm as 1 + w (llama.cpp's converter adds Gemma's offset; the
/// Hugging Face checkpoint stores w).
pub fn gguf_adds_one(a: Architecture, gguf_name: &str) -> bool {
    a.norm_offset() && gguf_name.ends_with("norm.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(a: Architecture) -> ModelConfig {
        ModelConfig {
            architecture: a,
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            ..Default::default()
        }
    }

    #[test]
    fn every_gguf_name_maps_back_to_its_hf_name() {
        for a in [
            Architecture::Llama,
            Architecture::Qwen3,
            Architecture::Gemma3,
            Architecture::Phi3,
            Architecture::Falcon,
        ] {
            let c = config(a);
            for t in tensors(&c, true) {
                assert_eq!(hf_name(a, &t.gguf).as_deref(), Some(t.hf.as_str()), "{a:?}");
            }
        }
        // The same GGUF name is a different module in Gemma.
        assert_eq!(
            hf_name(Architecture::Gemma3, "blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name(Architecture::Llama, "blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name(Architecture::Llama, "blk.0.attn_q_norm.weight"),
            None
        );
        // Falcon's checkpoint names and afinar's translate both ways.
        let f = Architecture::Falcon;
        for t in tensors(&config(f), true) {
            assert_eq!(internal_name(f, &checkpoint_name(f, &t.hf)), t.hf);
        }
        assert_eq!(
            checkpoint_name(f, "model.layers.3.self_attn.o_proj.weight"),
            "transformer.h.3.self_attention.dense.weight"
        );
        assert_eq!(checkpoint_module(f, "up_proj"), "dense_h_to_4h");
    }
}
