//! The training configuration: one TOML file with defaults for everything, every key
//! overridable with `--set key=value`. Unknown keys are errors that suggest the nearest valid key;
//! out-of-range values are errors that say the range.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::Schedule;
use crate::data::{Format, SplitFractions};
use crate::device::DeviceSpec;
use crate::model::BaseDtype;
use crate::{Error, Result};

/// How the model is trained: LoRA adapters on a frozen base, or every weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Lora,
    Full,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(Method::Lora),
            "full" => Ok(Method::Full),
            _ => Err(Error::Config(format!(
                "method = '{s}': use \"lora\" or \"full\""
            ))),
        }
    }
}

/// Arithmetic of the frozen base's products (`compute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// bf16 where the CPU has bf16 dot-product instructions, f32 elsewhere.
    Auto,
    F32,
    Bf16,
}

impl Compute {
    /// Whether the base's products run in bf16 on this machine (`bf16` on a CPU without the
    /// instructions runs f32: the kernels fall back).
    pub fn bf16(self) -> bool {
        match self {
            Compute::F32 => false,
            Compute::Auto | Compute::Bf16 => crate::model::ops::bf16_gemm::available(),
        }
    }

    /// "bf16" or "f32": what [`Compute::bf16`] picks here.
    pub fn resolved(self) -> &'static str {
        if self.bf16() {
            "bf16"
        } else {
            "f32"
        }
    }
}

impl std::str::FromStr for Compute {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Compute::Auto),
            "f32" => Ok(Compute::F32),
            "bf16" => Ok(Compute::Bf16),
            _ => Err(Error::Config(format!(
                "compute = '{s}': use \"auto\" (bf16 where the CPU has bf16 instructions), \"f32\" or \"bf16\""
            ))),
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compute::Auto => "auto",
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Lora => "lora",
            Method::Full => "full",
        })
    }
}

/// A key that is a value the user chose or `"auto"`: afinar picks it when the run starts, from
/// the model and the data (the log says what it picked). TOML spells it `lr = "auto"` or
/// `lr = 2e-4`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Auto<T> {
    Auto,
    Set(T),
}

impl<T: Copy> Auto<T> {
    /// The value the user set, or what `pick` chooses for "auto".
    pub fn or_else(self, pick: impl FnOnce() -> T) -> T {
        match self {
            Auto::Auto => pick(),
            Auto::Set(v) => v,
        }
    }

    /// The value the user set, if any.
    pub fn set(self) -> Option<T> {
        match self {
            Auto::Auto => None,
            Auto::Set(v) => Some(v),
        }
    }
}

impl<T: std::fmt::Display> std::fmt::Display for Auto<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auto::Auto => f.write_str("auto"),
            Auto::Set(v) => v.fmt(f),
        }
    }
}

impl<T: std::str::FromStr> std::str::FromStr for Auto<T> {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(Auto::Auto);
        }
        s.trim()
            .parse()
            .map(Auto::Set)
            .map_err(|_| format!("'{s}': give a number or \"auto\""))
    }
}

impl<T: Serialize> Serialize for Auto<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => s.serialize_str("auto"),
            Auto::Set(v) => v.serialize(s),
        }
    }
}

impl<'de, T: serde::de::DeserializeOwned + std::str::FromStr> Deserialize<'de> for Auto<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => s.parse().map_err(D::Error::custom),
            v => T::deserialize(v.clone())
                .map(Auto::Set)
                .map_err(|_| D::Error::custom(format!("{v}: give a number or \"auto\""))),
        }
    }
}

/// Warm-up steps under `warmup_steps = "auto"` (for a run of at least 100 steps).
pub const AUTO_WARMUP_STEPS: usize = 10;
/// `epochs = "auto"`: passes over the data until the run has at least this many optimizer
/// steps (chosen by the recipe study in `bench/recipes/`)…
pub const AUTO_MIN_STEPS: usize = 150;
/// …but never more passes than this: past it a small dataset is memorised, not learnt (5 beat
/// 3 on the study's 300-example task: 39.5 % against 30.5 % exact match).
pub const AUTO_MAX_EPOCHS: usize = 5;

/// The linear layers that get LoRA adapters: `all-linear` or a list of module names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraTargets {
    AllLinear,
    /// Some of [`super::lora::ALL_LINEAR`], checked when parsed; never empty.
    Modules(Vec<String>),
}

impl LoraTargets {
    /// The target module names.
    pub fn modules(&self) -> Vec<String> {
        match self {
            LoraTargets::AllLinear => super::lora::ALL_LINEAR
                .iter()
                .chain(&super::lora::FUSED_LINEAR)
                .map(|s| s.to_string())
                .collect(),
            LoraTargets::Modules(list) => list.clone(),
        }
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        use super::lora::ALL_LINEAR as ALL;
        if s.trim() == "all-linear" {
            return Ok(LoraTargets::AllLinear);
        }
        let list: Vec<String> = s
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for t in &list {
            if !ALL.contains(&t.as_str()) && !super::lora::FUSED_LINEAR.contains(&t.as_str()) {
                return Err(Error::Config(format!(
                    "lora_targets: unknown module '{t}' (use all-linear or some of {},{})",
                    ALL.join(","),
                    super::lora::FUSED_LINEAR.join(",")
                )));
            }
        }
        if list.is_empty() {
            return Err(Error::Config("lora_targets is empty".into()));
        }
        Ok(LoraTargets::Modules(list))
    }
}

impl std::fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraTargets::AllLinear => f.write_str("all-linear"),
            LoraTargets::Modules(list) => f.write_str(&list.join(",")),
        }
    }
}

/// Serde for the typed keys that TOML spells as one string: written with `Display`, read with
/// `FromStr`, so the file keeps its spelling and a bad value gets the type's own message.
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `split` as TOML spells it ("0.9,0.05,0.05"), with an error that names the key.
mod split_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::data::SplitFractions;

    pub fn serialize<S: Serializer>(v: &SplitFractions, s: S) -> Result<S::Ok, S::Error> {
        let [a, b, c] = v.0;
        s.collect_str(&format_args!("{a},{b},{c}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SplitFractions, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "split = '{s}': give two or three fractions summing to 1, e.g. \"0.8,0.1,0.1\""
            ))
        })
    }
}

/// Every training setting. Field docs are the documentation of the config keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base model: .gguf file, Hugging Face directory, Hub repo id, or `smollm2`.
    pub model: String,
    /// Data files or folders (any format `afinar data prepare` reads).
    pub data: Vec<PathBuf>,
    /// The user's own validation files (as `data prepare --val`): when set, the validation
    /// split is these files, not a fraction of `data`.
    pub val: Vec<PathBuf>,
    /// The user's own test files (as `data prepare --test`): when set, the test split is these
    /// files, not a fraction of `data`.
    pub test: Vec<PathBuf>,
    /// Record shape: auto, alpaca, chat, sharegpt, completion, text.
    #[serde(with = "as_text")]
    pub format: Format,
    /// Train/validation/test fractions, spelled "0.9,0.05,0.05" (two fractions = no test).
    #[serde(with = "split_text")]
    pub split: SplitFractions,
    /// Field that keeps related examples in one split (e.g. "verb"); empty = none.
    pub split_key: String,
    /// Maximum tokens per packed training sequence.
    pub max_seq_len: usize,
    /// System message for conversations that have none ("" = the chat template's default).
    pub system: String,
    /// Run directory: config, metrics, checkpoints, final adapter.
    pub out: PathBuf,
    /// Where to train: "cpu", "cuda" or "cuda:N" (a CUDA device needs a `--features cuda`
    /// build).
    #[serde(with = "as_text")]
    pub device: DeviceSpec,
    /// "lora" or "full".
    #[serde(with = "as_text")]
    pub method: Method,
    /// How the frozen base's matrices are held: "auto" (as the file has them: bf16 stays bf16,
    /// a GGUF stays quantized), "f32", "bf16", "q8_0" or "q4_0". Full fine-tuning needs f32
    /// ("auto" gives it f32).
    #[serde(with = "as_text")]
    pub base_dtype: BaseDtype,
    /// Keep only each layer's input during the forward pass and recompute the layer in the
    /// backward (LoRA only): about a third more compute, and activation memory of one layer
    /// instead of all (a 7B model at 4 × 256 tokens: ~10 GB less).
    pub gradient_checkpointing: bool,
    /// Arithmetic of the frozen base's products: "auto" (bf16 where the CPU has AVX512-BF16,
    /// f32 elsewhere), "f32" or "bf16". bf16 rounds activations and base weights to bf16 and
    /// accumulates in f32, as PyTorch's bf16 autocast does; LoRA weights, their gradients and
    /// the optimizer stay f32.
    #[serde(with = "as_text")]
    pub compute: Compute,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Dropout on the LoRA input, in [0, 1).
    pub lora_dropout: f64,
    /// "all-linear" or a comma-separated list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[serde(with = "as_text")]
    pub lora_targets: LoraTargets,
    /// Scale by alpha/sqrt(rank) instead of alpha/rank.
    pub rslora: bool,
    /// Passes over the training split (ignored when max_steps > 0). "auto": enough passes for
    /// [`AUTO_MIN_STEPS`] optimizer steps, at most [`AUTO_MAX_EPOCHS`] (a small dataset is seen
    /// several times, a large one once).
    pub epochs: Auto<usize>,
    /// Optimiser steps; 0 = as many as `epochs` take.
    pub max_steps: usize,
    /// Time budget in minutes (0 = none): after the first steps, the step count becomes what
    /// fits in it (never more than epochs/max_steps give) and is saved as max_steps, so the
    /// schedule is known and a resume is exact.
    pub max_minutes: f64,
    /// Sequences per micro-batch. The default, one packed sequence of 512 tokens (about what
    /// TRL's 8 unpacked short examples hold), came from the recipe study (`bench/recipes/`):
    /// with packing, a step of 4 × 512 holds ~35 short examples, too few steps per epoch; 1 × 512
    /// beat 2 × 512 on every task tried.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate. "auto": by method and model size (see [`TrainConfig::auto_lr`]).
    pub lr: Auto<f64>,
    pub min_lr: f64,
    /// Steps of linear warm-up to the peak lr. "auto": 10, but at most a tenth of the run, so
    /// a short run reaches its peak (with a fixed 10, a 9-step run never did).
    pub warmup_steps: Auto<usize>,
    /// cosine, linear or constant (after warm-up).
    pub schedule: Schedule,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm; 0 = no clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Validation loss every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation (0 = the whole validation split).
    pub eval_batches: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints kept (the most recent ones).
    pub keep_checkpoints: usize,
    /// Stop after this many validations without improvement (0 = never).
    pub early_stopping_patience: usize,
    /// When stderr is not a terminal (scripts, CI, nohup): a plain progress line every N steps
    /// (and at least every 30 s); 0 = only the time rule. On a terminal a progress bar is drawn.
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: "smollm2".into(),
            data: vec![],
            val: vec![],
            test: vec![],
            format: Format::Auto,
            split: SplitFractions([0.9, 0.05, 0.05]),
            split_key: String::new(),
            max_seq_len: 512,
            system: String::new(),
            out: PathBuf::from("runs/afinar"),
            device: DeviceSpec::Cpu,
            method: Method::Lora,
            base_dtype: BaseDtype::Auto,
            gradient_checkpointing: false,
            compute: Compute::Auto,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_targets: LoraTargets::AllLinear,
            rslora: false,
            epochs: Auto::Auto,
            max_steps: 0,
            max_minutes: 0.0,
            batch_size: 1,
            grad_accum: 1,
            lr: Auto::Auto,
            min_lr: 0.0,
            warmup_steps: Auto::Auto,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 50,
            eval_batches: 8,
            save_every: 100,
            keep_checkpoints: 2,
            early_stopping_patience: 0,
            log_every: 10,
        }
    }
}

fn known_keys() -> Vec<String> {
    match toml::Value::try_from(TrainConfig::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => vec![],
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

fn check_keys(table: &toml::Table, origin: &str) -> Result<()> {
    let known = known_keys();
    for key in table.keys() {
        if !known.contains(key) {
            let nearest = known
                .iter()
                .min_by_key(|k| distance(key, k))
                .cloned()
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "{origin}: unknown key '{key}' (did you mean '{nearest}'?)"
            )));
        }
    }
    Ok(())
}

impl TrainConfig {
    /// How the run holds the base: as configured for LoRA; f32 for full fine-tuning, which
    /// refuses a packed format (it updates every weight and needs f32 master weights).
    pub fn held_base(&self) -> Result<BaseDtype> {
        match (self.method, self.base_dtype) {
            (Method::Lora, b) => Ok(b),
            (Method::Full, BaseDtype::Auto | BaseDtype::F32) => Ok(BaseDtype::F32),
            (Method::Full, b) => Err(Error::Config(format!(
                "base_dtype = \"{b}\" with method = \"full\": full fine-tuning updates every weight and \
                 needs them in f32; use base_dtype = \"auto\" or \"f32\", or method = \"lora\" (which \
                 trains over a {b} base)"
            ))),
        }
    }

    /// Defaults, then the TOML file (if any), then each `key=value` override in order;
    /// validated.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let config = Self::read(file, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Like [`TrainConfig::load`] without the final [`TrainConfig::validate`], for callers that
    /// set more fields first (the CLI's flags) and validate the result.
    pub fn read(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?),
            None => None,
        };
        Self::read_text(
            text.as_deref().zip(file.map(|p| p.display().to_string())),
            overrides,
        )
    }

    /// Like [`TrainConfig::load`] with the TOML given as (text, where it came from).
    pub fn load_text(toml_text: Option<(&str, String)>, overrides: &[String]) -> Result<Self> {
        let config = Self::read_text(toml_text, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// [`TrainConfig::load_text`] without validation.
    pub fn read_text(toml_text: Option<(&str, String)>, overrides: &[String]) -> Result<Self> {
        let mut table = match toml::Value::try_from(Self::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => unreachable!("the default config serialises to a table"),
        };
        if let Some((text, origin)) = toml_text {
            let user: toml::Table = text
                .parse()
                .map_err(|e| Error::Config(format!("{origin}: invalid TOML: {e}")))?;
            check_keys(&user, &origin)?;
            table.extend(user);
        }
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("--set '{o}': expected key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            // A TOML value if it parses as one (numbers, booleans, arrays), else a string.
            let value = format!("v = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.to_string()));
            let one: toml::Table = [(k.to_string(), value)].into_iter().collect();
            check_keys(&one, "--set")?;
            table.extend(one);
        }
        // `data`, `val` and `test` may be given as one string.
        for key in ["data", "val", "test"] {
            if let Some(toml::Value::String(s)) = table.get(key).cloned() {
                table.insert(key.into(), toml::Value::Array(vec![toml::Value::String(s)]));
            }
        }
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(format!("config: {}", e.message())))?;
        Ok(config)
    }

    /// Range and consistency checks with messages that say what is allowed.
    pub fn validate(&self) -> Result<()> {
        self.held_base()?;
        if self.gradient_checkpointing && self.method == Method::Full {
            return Err(Error::Config(
                "gradient_checkpointing = true is for method = \"lora\" (full fine-tuning keeps every \
                 activation); set it to false"
                    .into(),
            ));
        }
        let bad = |m: String| Err(Error::Config(m));
        if self.lora_rank == 0 || self.lora_rank > 1024 {
            return bad(format!(
                "lora_rank = {} is out of range (1..=1024)",
                self.lora_rank
            ));
        }
        if self.lora_alpha <= 0.0 {
            return bad(format!("lora_alpha = {} must be > 0", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout = {} is out of range [0, 1)",
                self.lora_dropout
            ));
        }
        if let Some(lr) = self.lr.set() {
            if !(lr > 0.0 && lr < 1.0) {
                return bad(format!("lr = {lr} is out of range (0, 1)"));
            }
        }
        // Under an "auto" lr, min_lr is capped at the lr picked when the run starts.
        if self.min_lr < 0.0 || self.min_lr > self.lr.set().unwrap_or(1.0) {
            return bad(format!("min_lr = {} must be in [0, lr]", self.min_lr));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be ≥ 1".into());
        }
        if self.max_seq_len < 8 || self.max_seq_len > 1 << 20 {
            return bad(format!(
                "max_seq_len = {} is out of range (8..=1048576)",
                self.max_seq_len
            ));
        }
        if self.epochs == Auto::Set(0) && self.max_steps == 0 {
            return bad("set epochs ≥ 1 (or \"auto\") or max_steps ≥ 1".into());
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} = {v} is out of range [0, 1)"));
            }
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 || self.adam_eps <= 0.0 {
            return bad("weight_decay and max_grad_norm must be ≥ 0, adam_eps > 0".into());
        }
        if !(self.max_minutes.is_finite() && self.max_minutes >= 0.0) {
            return bad(format!("max_minutes = {} must be ≥ 0", self.max_minutes));
        }
        if self.data.is_empty() {
            return bad("no training data: set data = [\"file.jsonl\"] or --data".into());
        }
        Ok(())
    }

    /// The peak learning rate of this run on a model of `params` parameters: `lr`, or for
    /// "auto" what [`TrainConfig::auto_lr`] picks.
    pub fn learning_rate(&self, params: usize) -> f64 {
        self.lr.or_else(|| Self::auto_lr(self.method, params).0)
    }

    /// The "auto" learning rate. LoRA: 1e-3 below 1B parameters (the recipe study in
    /// `bench/recipes/` measured it on SmolLM2-135M: 2e-4 leaves a packed run under-trained),
    /// 2e-4 from 1B up (the value LoRA recipes for 1–8B models use; not measured here). Full
    /// fine-tuning: 2e-5, TRL's default (every weight moves; LoRA's rates would wreck the model).
    /// Returns the rate and the rule that picked it, for the run's log.
    pub fn auto_lr(method: Method, params: usize) -> (f64, &'static str) {
        match method {
            Method::Full => (2e-5, "full fine-tuning"),
            Method::Lora if params < 1_000_000_000 => (1e-3, "LoRA, model under 1B parameters"),
            Method::Lora => (2e-4, "LoRA, model of 1B parameters or more"),
        }
    }

    /// Passes over a training split of `steps_per_epoch` optimizer steps: `epochs`, or for
    /// "auto" enough for [`AUTO_MIN_STEPS`] steps, between 1 and [`AUTO_MAX_EPOCHS`].
    pub fn passes(&self, steps_per_epoch: usize) -> usize {
        self.epochs.or_else(|| {
            AUTO_MIN_STEPS
                .div_ceil(steps_per_epoch.max(1))
                .clamp(1, AUTO_MAX_EPOCHS)
        })
    }

    /// Warm-up steps of a run of `total_steps`: `warmup_steps`, or for "auto"
    /// [`AUTO_WARMUP_STEPS`] capped at a tenth of the run (at least 1).
    pub fn warmup(&self, total_steps: usize) -> usize {
        self.warmup_steps
            .or_else(|| AUTO_WARMUP_STEPS.min(total_steps.div_ceil(10)).max(1))
    }

    /// The LoRA target module names.
    pub fn targets(&self) -> Vec<String> {
        self.lora_targets.modules()
    }

    /// The data settings: what `afinar eval` reuses so its split and templating are training's.
    pub fn prepare_options(&self) -> Result<crate::data::PrepareOptions> {
        Ok(crate::data::PrepareOptions {
            data: self.data.clone(),
            val: self.val.clone(),
            test: self.test.clone(),
            format: self.format,
            split_key: (!self.split_key.is_empty()).then(|| self.split_key.clone()),
            split: self.split,
            seed: self.seed,
            max_seq_len: self.max_seq_len,
            system: (!self.system.is_empty()).then(|| self.system.clone()),
            ..Default::default()
        })
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_unknown_keys_suggest_the_nearest() {
        let c = TrainConfig::load(
            None,
            &[
                "data=x.jsonl".into(),
                "lr=1e-3".into(),
                "lora_rank=8".into(),
                "schedule=linear".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.lr, Auto::Set(1e-3));
        assert_eq!(c.lora_rank, 8);
        assert_eq!(c.schedule, Schedule::Linear);
        assert_eq!(c.data, vec![PathBuf::from("x.jsonl")]);
        let err = TrainConfig::load(None, &["data=x".into(), "lora_rnk=8".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--set: unknown key 'lora_rnk' (did you mean 'lora_rank'?)"
        );
        let err = TrainConfig::load(None, &["data=x".into(), "lr=5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lr = 5 is out of range"), "{err}");
        let err = TrainConfig::load(None, &["data=x".into(), "lora_targets=q_proj,attn".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown module 'attn'"), "{err}");
        let err = TrainConfig::load(None, &["data=x".into(), "max_minutes=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_minutes = -1 must be ≥ 0"), "{err}");
    }

    #[test]
    fn auto_keys_read_as_auto_or_a_number_and_resolve_by_model_and_data() {
        let d = TrainConfig::load(None, &["data=x".into()]).unwrap();
        assert_eq!((d.lr, d.epochs), (Auto::Auto, Auto::Auto));
        let text = d.to_toml();
        assert!(text.contains("lr = \"auto\"") && text.contains("epochs = \"auto\""));
        assert_eq!(toml::from_str::<TrainConfig>(&text).unwrap(), d);
        // LoRA: 1e-3 under 1B parameters, 2e-4 from 1B; full fine-tuning 2e-5.
        assert_eq!(d.learning_rate(134_515_008), 1e-3);
        assert_eq!(d.learning_rate(1_543_714_304), 2e-4);
        let full = TrainConfig::load(None, &["data=x".into(), "method=full".into()]).unwrap();
        assert_eq!(full.learning_rate(134_515_008), 2e-5);
        // Passes: enough for AUTO_MIN_STEPS steps, within [1, AUTO_MAX_EPOCHS].
        assert_eq!(d.passes(10), AUTO_MAX_EPOCHS);
        assert_eq!(d.passes(AUTO_MIN_STEPS / 2), 2);
        assert_eq!(d.passes(AUTO_MIN_STEPS), 1);
        assert_eq!(d.passes(0), AUTO_MAX_EPOCHS);

        let set = TrainConfig::load(
            None,
            &["data=x".into(), "lr=5e-4".into(), "epochs=2".into()],
        )
        .unwrap();
        assert_eq!((set.lr, set.epochs), (Auto::Set(5e-4), Auto::Set(2)));
        assert_eq!((set.learning_rate(1), set.passes(10)), (5e-4, 2));
        let text = set.to_toml();
        assert!(
            text.contains("lr = 0.0005") && text.contains("epochs = 2"),
            "{text}"
        );
        assert_eq!(toml::from_str::<TrainConfig>(&text).unwrap(), set);
        // A number given as text (the CLI's --epochs) and "auto" in a file both read.
        let quoted = TrainConfig::load_text(
            Some((
                "data = \"x\"\nepochs = \"3\"\nlr = \"auto\"\n",
                "t.toml".into(),
            )),
            &[],
        )
        .unwrap();
        assert_eq!((quoted.epochs, quoted.lr), (Auto::Set(3), Auto::Auto));
        assert_eq!("auto".parse::<Auto<usize>>(), Ok(Auto::Auto));
        assert_eq!(" 4 ".parse::<Auto<usize>>(), Ok(Auto::Set(4)));

        let err = |set: &str| {
            TrainConfig::load(None, &["data=x".into(), set.into()])
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("epochs=many").contains("give a number or \"auto\""),
            "{}",
            err("epochs=many")
        );
        assert!(
            err("epochs=-1").contains("give a number or \"auto\""),
            "{}",
            err("epochs=-1")
        );
        assert!(err("epochs=0").contains("set epochs ≥ 1"));
        assert!(err("lr=2").contains("lr = 2 is out of range"));
        assert!(err("min_lr=-1").contains("min_lr = -1 must be in [0, lr]"));
        let e = TrainConfig::load(
            None,
            &["data=x".into(), "lr=1e-4".into(), "min_lr=2e-4".into()],
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("min_lr = 0.0002 must be in [0, lr]"));
    }

    #[test]
    fn toml_files_are_checked_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, "data = [\"a.jsonl\"]\nbatch_sise = 4\n").unwrap();
        let err = TrainConfig::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            err.ends_with("unknown key 'batch_sise' (did you mean 'batch_size'?)"),
            "{err}"
        );
    }

    #[test]
    fn typed_keys_keep_their_toml_spelling_and_their_errors() {
        let c = TrainConfig::load(
            None,
            &[
                "data=x.jsonl".into(),
                "val=v.jsonl".into(),
                "test=[\"t1.jsonl\", \"t2.jsonl\"]".into(),
                "method=full".into(),
                "format=sharegpt".into(),
                "split=0.8,0.2".into(),
                "lora_targets=q_proj, v_proj".into(),
                "device=cpu".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.method, Method::Full);
        assert_eq!(c.format, Format::ShareGpt);
        assert_eq!(c.split, SplitFractions([0.8, 0.2, 0.0]));
        assert_eq!(c.device, DeviceSpec::Cpu);
        assert_eq!(c.val, vec![PathBuf::from("v.jsonl")]);
        assert_eq!(c.test.len(), 2);
        assert_eq!(c.targets(), vec!["q_proj", "v_proj"]);
        let text = c.to_toml();
        for line in [
            "method = \"full\"",
            "format = \"sharegpt\"",
            "split = \"0.8,0.2,0\"",
            "lora_targets = \"q_proj,v_proj\"",
            "device = \"cpu\"",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // What a run directory holds loads back to the same configuration.
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let d = TrainConfig::default().to_toml();
        assert!(d.contains("split = \"0.9,0.05,0.05\""), "{d}");
        assert!(d.contains("lora_targets = \"all-linear\""), "{d}");
        let prep = c.prepare_options().unwrap();
        assert_eq!(
            (prep.val, prep.test.len()),
            (vec![PathBuf::from("v.jsonl")], 2)
        );

        let err = |set: &str| {
            TrainConfig::load(None, &["data=x".into(), set.into()])
                .unwrap_err()
                .to_string()
        };
        assert!(err("method=lroa").contains("method = 'lroa': use \"lora\" or \"full\""));
        assert!(err("format=csv").contains("unknown format 'csv'"));
        assert!(err("split=0.5,0.1").contains("split = '0.5,0.1': give two or three fractions"));
        assert!(err("device=tpu").contains("cpu, cuda or cuda:N"));
        assert!(err("lora_targets=").contains("lora_targets is empty"));
    }

    #[test]
    fn auto_warmup_is_ten_steps_at_most_a_tenth_of_the_run() {
        let mut c = TrainConfig::default();
        assert_eq!(c.warmup(170), 10);
        assert_eq!(c.warmup(9), 1);
        assert_eq!(c.warmup(45), 5);
        c.warmup_steps = Auto::Set(20);
        assert_eq!(
            c.warmup(9),
            20,
            "a number is taken as given, as transformers does"
        );
    }
}
