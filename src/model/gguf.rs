//! GGUF files (llama.cpp's format): configuration, weights dequantized to f32 in Hugging Face
//! layout, tokenizer and chat template, all from the one file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::config::{Architecture, ModelConfig};
use super::tokenizer::{GgufVocab, TextTokenizer};
use super::weights::Weights;
use crate::{Error, Result};

/// Everything afinar reads from a GGUF file.
pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<String>,
    /// Storage type of the bulk of the weights, e.g. "Q4_1".
    pub file_dtype: String,
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// Checks the magic bytes so a wrong file gets a clear message, not a parser error.
pub fn is_gguf(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(_) => Ok(false),
    }
}

/// Reads only the header (metadata and tensor table), not the weights.
pub fn read_header(path: &Path) -> Result<Content> {
    if !is_gguf(path)? {
        return Err(Error::bad_file(
            path,
            "not a GGUF file (the first bytes are not 'GGUF'); pass a .gguf file or a Hugging Face model directory",
        ));
    }
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    Content::read(&mut reader).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "corrupt or truncated GGUF header: {}",
                crate::error::candle_message(&e)
            ),
        )
    })
}

/// Reads only the tokenizer and chat template.
pub fn load_text_side(path: &Path) -> Result<(TextTokenizer, Option<String>)> {
    let content = read_header(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let tokenizer = read_vocab(&meta)?.build(path)?;
    Ok((tokenizer, meta.opt_string("tokenizer.chat_template")))
}

/// Loads a GGUF model onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<GgufModel> {
    let content = read_header(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch_name = meta.string("general.architecture")?;
    let architecture = Architecture::parse(&arch_name, path)?;
    let a = arch_name.as_str();
    let vocab = read_vocab(&meta)?;
    let hidden_size = meta.usize(&format!("{a}.embedding_length"))?;
    let num_heads = meta.usize(&format!("{a}.attention.head_count"))?;
    let head_dim = meta
        .opt_usize(&format!("{a}.attention.key_length"))
        .or(meta.opt_usize(&format!("{a}.rope.dimension_count")))
        .unwrap_or(hidden_size / num_heads.max(1));
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig {
        architecture,
        vocab_size: meta
            .opt_usize(&format!("{a}.vocab_size"))
            .unwrap_or(vocab.tokens.len()),
        hidden_size,
        intermediate_size: meta.usize(&format!("{a}.feed_forward_length"))?,
        num_layers: meta.usize(&format!("{a}.block_count"))?,
        num_heads,
        num_kv_heads: meta
            .opt_usize(&format!("{a}.attention.head_count_kv"))
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: meta.f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta
            .opt_f64(&format!("{a}.rope.freq_base"))
            .unwrap_or(10_000.0),
        max_position_embeddings: meta
            .opt_usize(&format!("{a}.context_length"))
            .unwrap_or(2048),
        tie_word_embeddings: !has_output,
        attention_bias: architecture == Architecture::Qwen2,
        sliding_window: None,
        rope_scaling: None,
    };
    config.validate(path)?;
    let tokenizer = vocab.build(path)?;
    let chat_template = meta.opt_string("tokenizer.chat_template");

    // Weights: dequantize each tensor to f32 and rename it to Hugging Face's convention.
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let mut tensors = HashMap::new();
    let mut dtype_counts: HashMap<String, usize> = HashMap::new();
    let mut rope_freq_factors = None;
    for (name, info) in &content.tensor_infos {
        let qt = content.tensor(&mut reader, name, device).map_err(|e| {
            Error::bad_file(
                path,
                format!(
                    "tensor '{name}': {} (the file is truncated or corrupt; download it again)",
                    crate::error::candle_message(&e)
                ),
            )
        })?;
        *dtype_counts
            .entry(format!("{:?}", info.ggml_dtype))
            .or_default() += info.shape.elem_count();
        let t = qt.dequantize(device)?;
        if name == "rope_freqs.weight" {
            rope_freq_factors = Some(t.to_vec1::<f32>()?);
            continue;
        }
        let Some(hf_name) = hf_name(name) else {
            continue;
        };
        // llama.cpp stores Q and K rows of llama-architecture models permuted for its
        // interleaved RoPE; undo it so weights (and LoRA targets) have Hugging Face layout.
        let t = if architecture != Architecture::Qwen2 && name.ends_with("attn_q.weight") {
            unpermute(&t, config.num_heads)?
        } else if architecture != Architecture::Qwen2 && name.ends_with("attn_k.weight") {
            unpermute(&t, config.num_kv_heads)?
        } else {
            t
        };
        tensors.insert(hf_name, t);
    }
    let file_dtype = dtype_counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| d)
        .unwrap_or_default();
    Ok(GgufModel {
        config,
        weights: Weights {
            tensors,
            origin: path.to_path_buf(),
        },
        tokenizer,
        chat_template,
        file_dtype,
        rope_freq_factors,
    })
}

/// Inverse of llama.cpp's `permute(w, n_head)`: (n_head, d/2, 2, in) → (n_head, 2, d/2, in).
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// GGUF tensor name → Hugging Face name (`None` for tensors afinar does not use).
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, field) = rest.split_once('.')?;
    let (module, kind) = field.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn read_vocab(meta: &Meta) -> Result<GgufVocab> {
    let strings = |key: &str| -> Option<Vec<String>> {
        meta.md.get(key)?.to_vec().ok().map(|v| {
            v.iter()
                .filter_map(|x| x.to_string().ok().cloned())
                .collect()
        })
    };
    let tokens = strings("tokenizer.ggml.tokens").ok_or_else(|| {
        Error::bad_file(
            meta.path,
            "GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)",
        )
    })?;
    let ints = |key: &str| -> Option<Vec<i32>> {
        meta.md
            .get(key)?
            .to_vec()
            .ok()
            .map(|v| v.iter().filter_map(|x| x.to_i32().ok()).collect())
    };
    let floats = |key: &str| -> Option<Vec<f32>> {
        meta.md
            .get(key)?
            .to_vec()
            .ok()
            .map(|v| v.iter().filter_map(|x| x.to_f32().ok()).collect())
    };
    let id = |key: &str| meta.opt_usize(key).map(|v| v as u32);
    let flag = |key: &str| meta.md.get(key).and_then(|v| v.to_bool().ok());
    Ok(GgufVocab {
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.opt_string("tokenizer.ggml.pre"),
        tokens,
        token_types: ints("tokenizer.ggml.token_type"),
        scores: floats("tokenizer.ggml.scores"),
        merges: strings("tokenizer.ggml.merges"),
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
    })
}

/// Typed access to GGUF metadata with errors that name the file and key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::bad_file(self.path, format!("GGUF metadata has no '{key}'"))
    }
    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key).ok_or_else(|| self.missing(key))
    }
    fn opt_string(&self, key: &str) -> Option<String> {
        self.md.get(key).and_then(|v| v.to_string().ok().cloned())
    }
    fn opt_usize(&self, key: &str) -> Option<usize> {
        let v = self.md.get(key)?;
        v.to_u64()
            .ok()
            .map(|x| x as usize)
            .or_else(|| v.to_u32().ok().map(|x| x as usize))
            .or_else(|| v.to_i32().ok().map(|x| x.max(0) as usize))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key).ok_or_else(|| self.missing(key))
    }
    fn opt_f64(&self, key: &str) -> Option<f64> {
        let v = self.md.get(key)?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key).ok_or_else(|| self.missing(key))
    }
}
