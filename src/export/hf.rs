//! A model as a Hugging Face directory (`config.json`, `model.safetensors` — sharded with
//! `model.safetensors.index.json` past [`SHARD_BYTES`] — `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`), the output of full fine-tuning and of
//! `afinar export --to hf`, loadable by transformers, vLLM and afinar itself.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::gguf_file::{self, GgmlType};
use super::tensors::{Loaded, ModelInfo, TensorSource};
use crate::model::config::Architecture;
use crate::model::Model;
use crate::{Error, Result};

/// Largest safetensors file written before the weights are split into shards (transformers'
/// own default for `save_pretrained` is 5 GB; 2 GB keeps every shard under 32-bit size limits).
pub const SHARD_BYTES: usize = 2_000_000_000;

/// How to write the directory.
#[derive(Debug, Clone)]
pub struct HfOptions {
    /// Storage type of the weights: F32, F16 or BF16.
    pub dtype: DType,
    /// Split the weights into files of at most this many bytes.
    pub shard_bytes: usize,
    /// The id generation stops at and `eos_token` names: the chat's end-of-turn token (e.g.
    /// `<|im_end|>`), so chat clients stop where the tuned model stopped in afinar.
    pub end_of_turn: Option<String>,
    /// Text of `README.md` (the model card), if any.
    pub card: Option<String>,
}

impl Default for HfOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            shard_bytes: SHARD_BYTES,
            end_of_turn: None,
            card: None,
        }
    }
}

/// Writes `model` (weights as they are now) to `dir` in f32, as full fine-tuning saves it.
pub fn save(dir: &Path, model: &Model) -> Result<()> {
    save_with(dir, model, &HfOptions::default())
}

/// The tensors of `model` under their Hugging Face names. Adapters still attached are ignored:
/// merge them first ([`super::merge::merge_lora`]). Packed matrices come out in f32.
pub fn named_tensors(model: &Model) -> Result<BTreeMap<String, Tensor>> {
    let m = &model.transformer;
    let mut tensors = BTreeMap::new();
    tensors.insert("model.embed_tokens.weight".into(), m.embed_tokens.to_f32()?);
    for (name, t) in m.final_norms() {
        tensors.insert(name.into(), t.clone());
    }
    if let Some(h) = &m.lm_head {
        tensors.insert("lm_head.weight".into(), h.to_f32()?);
    }
    for (i, l) in m.layers.iter().enumerate() {
        for (name, t) in l.norms() {
            tensors.insert(format!("model.layers.{i}.{name}"), t.clone());
        }
    }
    let mut m2 = m.clone();
    for (name, lin) in m2.linears_mut() {
        tensors.insert(format!("{name}.weight"), lin.weight.to_f32()?);
        if let Some(b) = &lin.bias {
            tensors.insert(format!("{name}.bias"), b.clone());
        }
    }
    Ok(tensors)
}

/// Writes `model` to `dir` as `opts` asks. Each file is written under a temporary name and
/// renamed, so an interrupted export never leaves a torn file under its final name.
pub fn save_with(dir: &Path, model: &Model, opts: &HfOptions) -> Result<()> {
    save_from(dir, &ModelInfo::of(model), &Loaded::new(model), opts)
}

/// Writes the model described by `info` with the weights of `src` to `dir` as `opts` asks,
/// streaming the weights one tensor at a time.
pub fn save_from(
    dir: &Path,
    info: &ModelInfo,
    src: &dyn TensorSource,
    opts: &HfOptions,
) -> Result<()> {
    if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "hf export writes f32, f16 or bf16 weights, not {:?}",
            opts.dtype
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_weights(dir, src, opts, info.config.architecture)?;
    let c = info.config;
    let arch = match c.architecture {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Architecture::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Architecture::SmolLM3 => ("smollm3", "SmolLM3ForCausalLM"),
        Architecture::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
        Architecture::Phi3 => ("phi3", "Phi3ForCausalLM"),
        Architecture::Falcon => ("falcon", "FalconForCausalLM"),
    };
    let tok = info.tokenizer;
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tok.inner.token_to_id(t));
    let eos_token = opts.end_of_turn.clone().or_else(|| tok.eos_token.clone());
    // The end-of-turn id first, then every other id that ended a generation in afinar.
    let mut stop_ids: Vec<u32> = id_of(&eos_token).into_iter().collect();
    for id in &tok.end_token_ids {
        if !stop_ids.contains(id) {
            stop_ids.push(*id);
        }
    }
    let mut config = json!({
        "architectures": [arch.1], "model_type": arch.0, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
        "sliding_window": c.sliding_window, "hidden_act": "silu",
        "torch_dtype": dtype_name(opts.dtype),
        "bos_token_id": id_of(&tok.bos_token), "eos_token_id": stop_ids.first(),
    });
    config_family_keys(c, &mut config);
    if let Some(r) = &c.rope_scaling {
        config["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        });
    }
    write_json(dir, "config.json", &config)?;
    let tok_json: serde_json::Value =
        serde_json::to_value(&tok.inner).map_err(|e| Error::Tokenizer(e.to_string()))?;
    write_json(dir, "tokenizer.json", &tok_json)?;
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token, "eos_token": eos_token,
            "model_max_length": c.max_position_embeddings,
            "chat_template": info.chat_template.map(|t| t.source.clone()),
        }),
    )?;
    write_json(
        dir,
        "generation_config.json",
        &json!({"bos_token_id": id_of(&tok.bos_token), "eos_token_id": stop_ids}),
    )?;
    if let Some(card) = &opts.card {
        crate::fs::write_atomic(&dir.join("README.md"), card.as_bytes())?;
    }
    Ok(())
}

/// The safetensors writer creates its file private (0600); a model folder is meant to be shared
/// (copied into a serving container, uploaded), so it gets the usual 0644.
/// The keys of `config.json` only some families have: which layers slide, skip RoPE, their
/// RoPE base, Gemma's activation and score scale.
fn config_family_keys(c: &crate::model::ModelConfig, config: &mut serde_json::Value) {
    let a = c.architecture;
    // No padding id: some config classes default to one beyond a small vocabulary (SmolLM3).
    config["pad_token_id"] = json!(null);
    config["use_sliding_window"] = json!(c.sliding_window.is_some());
    if !c.sliding_layers.is_empty() {
        let types: Vec<&str> = c
            .sliding_layers
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        config["layer_types"] = json!(types);
    }
    if !c.no_rope_layers.is_empty() {
        let v: Vec<u32> = c
            .no_rope_layers
            .iter()
            .map(|&none| u32::from(!none))
            .collect();
        config["no_rope_layers"] = json!(v);
    }
    if let Some(t) = c.rope_local_theta {
        config["rope_local_base_freq"] = json!(t);
    }
    if let Some(q) = c.query_pre_attn_scalar {
        // transformers' config class wants an integer (Gemma 3 uses 256 or head_dim).
        config["query_pre_attn_scalar"] = if q.fract() == 0.0 {
            json!(q as u64)
        } else {
            json!(q)
        };
    }
    if let Some(f) = c.rope_linear_factor {
        config["rope_scaling"] = json!({"rope_type": "linear", "factor": f});
    }
    if let Some(f) = c.partial_rotary_factor {
        config["partial_rotary_factor"] = json!(f);
    }
    if let Some(l) = &c.longrope {
        config["original_max_position_embeddings"] = json!(l.original_max_position_embeddings);
        config["rope_scaling"] = json!({
            "rope_type": "longrope", "short_factor": l.short_factor, "long_factor": l.long_factor,
            "original_max_position_embeddings": l.original_max_position_embeddings,
            "attention_factor": l.attention_factor,
        });
    }
    if a == Architecture::Falcon {
        // FalconConfig's own keys: the variant afinar runs (see config.rs).
        let obj = config.as_object_mut().expect("config is an object");
        for k in [
            "head_dim",
            "num_key_value_heads",
            "intermediate_size",
            "rms_norm_eps",
        ] {
            obj.remove(k);
        }
        obj.extend([
            ("layer_norm_epsilon".into(), json!(c.rms_norm_eps)),
            ("ffn_hidden_size".into(), json!(c.intermediate_size)),
            ("multi_query".into(), json!(true)),
            ("parallel_attn".into(), json!(true)),
            ("new_decoder_architecture".into(), json!(false)),
            ("bias".into(), json!(false)),
            ("alibi".into(), json!(false)),
            ("activation".into(), json!("gelu")),
        ]);
        obj.remove("hidden_act");
    }
    if a.activation() == crate::model::config::Activation::GeluTanh {
        config["hidden_act"] = json!("gelu_pytorch_tanh");
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
    }
}

fn readable_by_all(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    crate::fs::write_atomic(&dir.join(name), serde_json::to_string_pretty(v)?.as_bytes())
}

/// `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with an index when the
/// weights pass `opts.shard_bytes`. Each file's header is written from the shapes, then its
/// tensors are read, cast and written one at a time.
fn write_weights(
    dir: &Path,
    src: &dyn TensorSource,
    opts: &HfOptions,
    arch: Architecture,
) -> Result<()> {
    let tensors = src.tensors();
    let elem = opts.dtype.size_in_bytes();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut sizes = vec![0usize];
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * elem;
        let last = sizes.len() - 1;
        if sizes[last] > 0 && sizes[last] + bytes > opts.shard_bytes {
            shards.push(vec![]);
            sizes.push(0);
        }
        let last = sizes.len() - 1;
        shards[last].push((name, shape));
        sizes[last] += bytes;
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (i, part) in shards.iter().enumerate() {
        for (name, _) in part {
            weight_map.insert(
                crate::model::layout::checkpoint_name(arch, name),
                json!(file_name(i)),
            );
        }
        let path = dir.join(file_name(i));
        let tmp = crate::fs::tmp_name(&path);
        let written = write_safetensors(&tmp, part, src, opts.dtype, arch)
            .and_then(|()| readable_by_all(&tmp));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    if n > 1 {
        let index = json!({
            "metadata": {"total_size": sizes.iter().sum::<usize>()},
            "weight_map": weight_map,
        });
        write_json(dir, "model.safetensors.index.json", &index)?;
    }
    Ok(())
}

/// One safetensors file at `path` holding `tensors` (read from `src`) as `dtype`: the JSON header
/// (offsets from the shapes, padded with spaces to 8 bytes as the format's writer pads it), then
/// each tensor's little-endian values in header order.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    src: &dyn TensorSource,
    dtype: DType,
    arch: Architecture,
) -> Result<()> {
    let (ty, name) = match dtype {
        DType::F16 => (GgmlType::F16, "F16"),
        DType::BF16 => (GgmlType::Bf16, "BF16"),
        _ => (GgmlType::F32, "F32"),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (n, shape) in tensors {
        let bytes = ty.bytes(shape.iter().product());
        header.insert(
            crate::model::layout::checkpoint_name(arch, n),
            json!({"dtype": name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    gguf_file::write_through(file, path, |w| {
        let mut prefix = (head.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(&head);
        w.put(prefix)?;
        let mut v = Vec::new();
        for (n, shape) in tensors {
            src.read_into(n, &mut v)?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Unsupported(format!(
                    "hf writer: tensor {n} has {} values for shape {shape:?} (a bug in afinar's export)",
                    v.len()
                )));
            }
            w.encode(ty, &v)?;
        }
        Ok(())
    })?;
    Ok(())
}
