//! A model as a Hugging Face directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`), the output of full fine-tuning, loadable by transformers and by
//! afinar itself.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use crate::model::config::Architecture;
use crate::model::Model;
use crate::{Error, Result};

/// Writes `model` (weights as they are now) to `dir`.
pub fn save(dir: &Path, model: &Model) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let m = &model.transformer;
    let c = &m.config;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), m.embed_tokens.clone());
    tensors.insert("model.norm.weight".into(), m.norm.clone());
    if let Some(h) = &m.lm_head {
        tensors.insert("lm_head.weight".into(), h.clone());
    }
    for (i, l) in m.layers.iter().enumerate() {
        tensors.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.clone(),
        );
        tensors.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.clone(),
        );
    }
    let mut m2 = m.clone();
    for (name, lin) in m2.linears_mut() {
        tensors.insert(format!("{name}.weight"), lin.weight.clone());
        if let Some(b) = &lin.bias {
            tensors.insert(format!("{name}.bias"), b.clone());
        }
    }
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(|e| Error::io(dir, e))?;
    let arch = match c.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let config = json!({
        "architectures": [arch.1], "model_type": arch.0, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
        "sliding_window": c.sliding_window, "hidden_act": "silu", "torch_dtype": "float32",
    });
    let write = |name: &str, v: &serde_json::Value| {
        crate::fs::write_atomic(
            &dir.join(name),
            serde_json::to_string_pretty(v)
                .unwrap_or_default()
                .as_bytes(),
        )
    };
    write("config.json", &config)?;
    let tok = &model.tokenizer;
    let tok_json: serde_json::Value =
        serde_json::to_value(&tok.inner).map_err(|e| Error::Tokenizer(e.to_string()))?;
    write("tokenizer.json", &tok_json)?;
    write(
        "tokenizer_config.json",
        &json!({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "chat_template": model.chat_template.as_ref().map(|t| t.source.clone())}),
    )?;
    Ok(())
}
