//! Hugging Face model directories: `config.json`, `tokenizer.json`, optional
//! `tokenizer_config.json` / `chat_template.jinja` / `generation_config.json`, and one or several
//! `*.safetensors` files (f32, f16 or bf16; read one tensor at a time and held as `BaseDtype`
//! says).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use super::config::ModelConfig;
use super::source::ModelSource;
use super::stream::ModelStream;
use super::tokenizer::TextTokenizer;
use super::weights::{hold, BaseDtype, Weight, Weights};
use crate::{Error, Result};

/// Everything afinar reads from a Hugging Face model directory.
pub struct HfModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<String>,
    /// Storage type of the weights, e.g. "BF16".
    pub file_dtype: String,
}

/// Loads a model directory onto `device`, its matrices held as `base` says.
pub fn load(dir: &Path, device: &Device, base: BaseDtype) -> Result<HfModel> {
    let stream = ModelStream::open(&ModelSource::HfDir(dir.to_path_buf()))?;
    let (tokenizer, chat_template) = load_text_side(dir)?;
    let mut tensors = HashMap::new();
    // One tensor read at a time and held at once, so the peak is the held model plus one
    // tensor (and its f32 copy while it is quantized), never the file beside the model.
    for (name, t) in stream.tensors() {
        let x = stream.read_stored(name, device)?;
        let w = if t.shape.len() == 2 {
            hold(x, base)?
        } else {
            Weight::Dense(x.to_dtype(DType::F32)?)
        };
        tensors.insert(name.to_string(), w);
    }
    Ok(HfModel {
        config: stream.config.clone(),
        weights: Weights {
            tensors,
            origin: dir.to_path_buf(),
        },
        tokenizer,
        chat_template,
        file_dtype: stream.file_dtype.clone(),
    })
}

/// The configuration of a model directory, or an error saying it is not one.
pub(crate) fn read_config(dir: &Path) -> Result<ModelConfig> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::bad_file(
            dir,
            "not a model directory: config.json is missing (expected config.json, tokenizer.json and *.safetensors)",
        ));
    }
    ModelConfig::from_hf_json(&config_path)
}

/// Reads only the tokenizer (with special tokens) and the chat template of a model directory.
pub fn load_text_side(dir: &Path) -> Result<(TextTokenizer, Option<String>)> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::bad_file(
            dir,
            "tokenizer.json is missing; copy the model's tokenizer.json into this directory",
        ));
    }
    let tok_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let special = |key: &str| -> Option<String> {
        match tok_config.as_ref()?.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let mut tokenizer =
        TextTokenizer::from_file(&tokenizer_path, special("bos_token"), special("eos_token"))?;
    // generation_config.json (or config.json) may name further end tokens (Llama 3 lists three).
    for file in ["generation_config.json", "config.json"] {
        let Some(gen) = read_json_opt(&dir.join(file))? else {
            continue;
        };
        let ids: Vec<u32> = match gen.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => vec![],
        };
        for id in ids {
            if !tokenizer.end_token_ids.contains(&id) && (id as usize) < tokenizer.vocab_size() {
                tokenizer.end_token_ids.push(id);
            }
        }
    }
    let chat_template = chat_template(dir, tok_config.as_ref())?;
    Ok((tokenizer, chat_template))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

/// The template from `chat_template.jinja` (transformers ≥ 4.43 writes it) or
/// `tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
fn chat_template(dir: &Path, tok_config: Option<&Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    Ok(match tok_config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// The weight files: those listed in `model.safetensors.index.json`, else `model.safetensors`,
/// else every `*.safetensors` in the directory.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if let Some(idx) = read_json_opt(&index)? {
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::bad_file(&index, "no 'weight_map' object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(Error::bad_file(
                &index,
                format!("lists {} which does not exist", missing.display()),
            ));
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(Error::bad_file(
            dir,
            "no *.safetensors weight files in this directory",
        ));
    }
    Ok(all)
}
