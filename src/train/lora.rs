//! Attaching LoRA adapters to a model's projections, initialised as PEFT does: A from
//! Kaiming-uniform (bound 1/√in), B zero, so training starts from the base model exactly.

use candle_core::{Tensor, Var};

use crate::model::config::Architecture;
use crate::model::layout;
use crate::model::transformer::{LoraAdapter, LoraDropout, Transformer};
use crate::rng::Rng;
use crate::Result;

/// Phi-3's fused projections and Falcon's by their checkpoint names, which `all-linear` also
/// covers.
pub const FUSED_LINEAR: [&str; 6] = [
    "qkv_proj",
    "gate_up_proj",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
];

/// The projections LoRA can target (`all-linear`, with [`FUSED_LINEAR`]), in the order of a
/// layer.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// How adapters are shaped and scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// Module names, e.g. `q_proj`, `down_proj`.
    pub targets: Vec<String>,
    /// Dropout on the adapter's input (0 = none).
    pub dropout: f32,
}

impl LoraSpec {
    /// `alpha / rank`, or `alpha / √rank` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Adds adapters to every targeted projection and returns the trainable variables with their
/// PEFT-style names (`model.layers.0.self_attn.q_proj.lora_A.weight`). `init_a` gives A's
/// values for a module name and shape; [`kaiming_a`] is PEFT's default. Dropout masks follow
/// `dropout_key` (see [`LoraDropout`]).
pub fn attach(
    model: &mut Transformer,
    spec: &LoraSpec,
    mut init_a: impl FnMut(&str, usize, usize) -> Vec<f32>,
) -> Result<Vec<(String, Var)>> {
    let scale = spec.scale();
    let key = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    model.lora_dropout_key = key.clone();
    let mut vars = Vec::new();
    let arch = model.config.architecture;
    for (name, lin) in model.linears_mut() {
        // A target names the module as afinar does or as the checkpoint does (Falcon's
        // `query_key_value` is afinar's `qkv_proj`).
        let module = name.rsplit('.').next().unwrap_or_default();
        let theirs = layout::checkpoint_module(arch, module);
        if !spec.targets.iter().any(|t| t == module || t == theirs) {
            continue;
        }
        let (out, inp) = lin.weight.dims2()?;
        let device = lin.weight.device().clone();
        let a = Var::from_tensor(&Tensor::from_vec(
            init_a(&name, spec.rank, inp),
            (spec.rank, inp),
            &device,
        )?)?;
        let b = Var::zeros((out, spec.rank), candle_core::DType::F32, &device)?;
        vars.push((format!("{name}.lora_A.weight"), a.clone()));
        vars.push((format!("{name}.lora_B.weight"), b.clone()));
        let id = vars.len() as u64;
        let dropout = LoraDropout {
            p: spec.dropout,
            id,
            key: key.clone(),
        };
        lin.lora = Some(LoraAdapter {
            a,
            b,
            scale,
            dropout,
        });
    }
    if vars.is_empty() {
        let have: Vec<String> = model
            .linears_mut()
            .into_iter()
            .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_string))
            .take(9)
            .collect();
        return Err(crate::Error::Config(format!(
            "lora_targets {} name no projection of this model; its projections are {}",
            spec.targets.join(","),
            have.join(",")
        )));
    }
    Ok(vars)
}

/// The module names (`q_proj`) that `vars` adapt, as an `arch` checkpoint names them, for the
/// adapter's `target_modules`.
pub fn attached_modules(arch: Architecture, vars: &[(String, Var)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, _) in vars {
        if let Some(m) = name.split('.').rev().nth(2) {
            let m = layout::checkpoint_module(arch, m);
            if !out.iter().any(|o| o == m) {
                out.push(m.to_string());
            }
        }
    }
    out
}

/// PEFT's default A: uniform in ±1/√in, drawn from a seeded generator.
pub fn kaiming_a(seed: u64) -> impl FnMut(&str, usize, usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    move |_, rows, cols| {
        let bound = 1.0 / (cols as f64).sqrt();
        (0..rows * cols)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    }
}
