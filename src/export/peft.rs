//! LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), written and read, so
//! adapters trained here load in Python PEFT and the other way round.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::config::Architecture;
use crate::model::layout;
use crate::model::transformer::{LoraAdapter, Transformer};
use crate::{Error, Result};

/// What PEFT puts before a module's name in adapter tensor keys.
pub(crate) const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `adapter_config.json` that afinar writes and reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    /// `CAUSAL_LM`; PEFT writes null when the adapter was made without a task type.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
}

impl AdapterConfig {
    /// A LoRA adapter's config as PEFT writes it for inference: rank `r`, `alpha`, on
    /// `target_modules`; no dropout, no rsLoRA, no recorded base (set those fields after).
    pub fn lora(r: usize, alpha: f64, target_modules: Vec<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules,
            use_rslora: false,
            bias: "none".into(),
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            inference_mode: true,
        }
    }

    /// The factor the delta B·A is scaled by: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

fn none() -> String {
    "none".into()
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Writes `vars` (afinar names, `model.layers.…lora_A.weight`) of an `arch` model as a PEFT
/// adapter directory, under the names the model's checkpoints use.
pub fn save(
    dir: &Path,
    arch: Architecture,
    config: &AdapterConfig,
    vars: &[(String, Var)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| {
            let n = layout::checkpoint_name(arch, n);
            (format!("{PREFIX}{n}"), v.as_tensor().clone())
        })
        .collect();
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("adapter_model.safetensors")).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_string_pretty(config)?;
    crate::fs::write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
}

/// Reads a PEFT LoRA adapter directory for an `arch` model: its `adapter_config.json` (LoRA
/// only) and the tensors of `adapter_model.safetensors` by their PEFT names with afinar's module
/// names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), on `device`.
pub fn read(
    dir: &Path,
    arch: Architecture,
    device: &candle_core::Device,
) -> Result<(
    AdapterConfig,
    std::collections::HashMap<String, candle_core::Tensor>,
)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        Error::bad_file(
            dir,
            format!("not a PEFT adapter directory (adapter_config.json: {e})"),
        )
    })?;
    let cfg: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e.to_string()))?;
    if cfg.peft_type != "LORA" {
        return Err(Error::bad_file(
            &cfg_path,
            format!("peft_type {} is not supported (only LORA)", cfg.peft_type),
        ));
    }
    let weights_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, device)
        .map_err(|e| Error::bad_file(&weights_path, crate::error::candle_message(&e)))?;
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| (layout::internal_name(arch, &n), t))
        .collect();
    Ok((cfg, tensors))
}

/// Loads a PEFT LoRA adapter into `model` (frozen: for inference and evaluation). Errors name
/// the adapter, the base it was trained on and `model_name` when shapes or module names do not
/// fit.
pub fn load(dir: &Path, model: &mut Transformer, model_name: &str) -> Result<AdapterConfig> {
    let (cfg, mut tensors) = read(dir, model.config.architecture, model.device())?;
    let scale = cfg.scale();
    let misfit = misfit(dir, &cfg, model_name);
    let mut attached = 0;
    for (name, lin) in model.linears_mut() {
        let a = tensors.remove(&format!("{PREFIX}{name}.lora_A.weight"));
        let b = tensors.remove(&format!("{PREFIX}{name}.lora_B.weight"));
        let (Some(a), Some(b)) = (a, b) else { continue };
        let (out, inp) = lin.weight.dims2()?;
        if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
            return Err(misfit(format!(
                "{name} is {out}×{inp} but the adapter has A {:?} and B {:?}",
                a.dims(),
                b.dims()
            )));
        }
        lin.lora = Some(LoraAdapter {
            a: Var::from_tensor(&a.to_dtype(candle_core::DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(candle_core::DType::F32)?)?,
            scale,
            dropout: Default::default(),
        });
        attached += 1;
    }
    if attached == 0 {
        return Err(misfit(
            "none of its module names match the model's layers".into(),
        ));
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(misfit(format!("tensor {extra} has no matching module")));
    }
    Ok(cfg)
}

/// The error for an adapter at `dir` that does not fit `model_name`: what does not fit, and the
/// base the adapter was trained on (shared by loading, streaming and the LoRA GGUF writer).
pub(crate) fn misfit<'a>(
    dir: &'a Path,
    cfg: &AdapterConfig,
    model_name: &'a str,
) -> impl Fn(String) -> Error + 'a {
    let trained_on = cfg
        .base_model_name_or_path
        .clone()
        .unwrap_or_else(|| "an unrecorded base model".into());
    move |what: String| {
        Error::bad_file(
            dir,
            format!(
                "adapter does not fit the model {model_name}: {what} (the adapter was trained on {trained_on})"
            ),
        )
    }
}
