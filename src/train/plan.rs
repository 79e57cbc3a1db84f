//! `afinar plan`: what a training run will need before it starts — memory, part by part, and
//! time per epoch on this machine — and, when it does not fit, the settings that make it fit.
//!
//! How it knows: the weights are measured on the loaded model (and computed from the shapes for
//! the other base formats); LoRA parameters, gradients and AdamW moments from the shapes; the
//! fused LM-head + cross-entropy op's row block (256 rows × vocab f32 logits) and the attention
//! probabilities kept for the backward (one (b, heads, s, s) f32 buffer per layer) from the
//! shapes too. The rest of the activations, which grow with batch × sequence length, and the
//! step time are calibrated: the process loads the model, attaches LoRA exactly as training
//! does, and runs real optimizer steps (one warm-up, two timed) on random tokens at the
//! configured batch × sequence length — or at a smaller one when that could not fit — measuring
//! its own peak RSS (VmHWM, reset through `/proc/self/clear_refs`) and the median step time.
//! Everything else is linear in the tokens of a micro-batch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::config::{Method, TrainConfig};
use super::lora::{self, LoraSpec};
use super::optim::{self, AdamW, AdamWConfig};
use super::step_gradients;
use crate::data::cache::{self, TokenFile};
use crate::data::Packed;
use crate::model::{BaseDtype, Model, ModelConfig, TextSide};
use crate::rng::Rng;
use crate::{Error, Result};

/// Rows whose logits the fused LM-head + cross-entropy op holds at once (its `ROWS`).
pub const LM_HEAD_ROWS: usize = 256;

/// New tokens an evaluation generates at most per answer (`afinar eval`'s default), for the KV
/// cache estimate.
pub const EVAL_NEW_TOKENS: usize = 256;

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The run's configuration (model, data, batch, sequence length, LoRA, base format…).
    pub cfg: TrainConfig,
    /// Training tokens per epoch when no data is given (packed into `max_seq_len` sequences).
    pub tokens: Option<u64>,
    /// Memory to plan for, in bytes; `None` reads `MemAvailable` from /proc/meminfo.
    pub memory_bytes: Option<u64>,
    /// Calibrate at this (batch, sequence length) instead of the configured one.
    pub calibrate_at: Option<(usize, usize)>,
    /// Progress lines on stderr.
    pub verbose: bool,
}

/// Bytes, part by part, of a training run's peak resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Program, tokenizer, allocator and everything else the process holds besides the parts
    /// below (measured: RSS after loading, minus the weights).
    pub runtime: u64,
    /// The base model's weights as held (matrices in their format, norms and biases f32).
    pub weights: u64,
    /// Trainable parameters (LoRA A and B, or every weight in full fine-tuning), f32.
    pub trainable: u64,
    /// Their gradients, f32.
    pub gradients: u64,
    /// AdamW's two moments, f32.
    pub optimizer: u64,
    /// Activations kept for the backward: calibrated bytes per token × batch × sequence length
    /// plus the attention probabilities (layers × heads × batch × seq² f32).
    pub activations: u64,
    /// Of which the attention probabilities.
    pub attention: u64,
    /// The fused LM-head + cross-entropy op's logits block (256 rows × vocab f32).
    pub lm_head_block: u64,
    /// Sum of the above: what training holds at its peak.
    pub training: u64,
    /// Peak RSS while loading (a conversion at load can pass through more than the model
    /// holds afterwards); measured for the held format, 0 (unknown) for the others.
    pub load_peak: u64,
    /// The expected peak RSS of the run: the larger of `training` and `load_peak`.
    pub peak: u64,
    /// KV cache of one evaluation generation (prompt up to `max_seq_len` + 256 new tokens), on
    /// top of runtime + weights in `afinar eval`; not part of the training peak.
    pub eval_kv_cache: u64,
}

/// The base weights' size in each format the model could be held in.
#[derive(Debug, Clone, Serialize)]
pub struct WeightFormats {
    /// Format (`Q4_1`, `F32`, …) → number of matrices held in it, as loaded.
    pub held: std::collections::BTreeMap<String, usize>,
    /// Bytes as held (measured).
    pub held_bytes: u64,
    pub f32: u64,
    pub bf16: u64,
    pub q8_0: u64,
    pub q4_0: u64,
}

/// What the calibration measured.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub batch: usize,
    pub seq: usize,
    /// Seconds of each timed step (forward, backward, clipping, AdamW), the warm-up excluded.
    pub steps_s: Vec<f64>,
    /// Median seconds of forward + backward of one micro-batch.
    pub fwd_bwd_s: f64,
    /// Median seconds of gradient clipping + the AdamW update.
    pub optimizer_s: f64,
    /// Resident memory after loading the model, before LoRA.
    pub rss_loaded: u64,
    /// Peak resident memory while loading.
    pub load_peak: u64,
    /// Resident memory with LoRA and the optimizer ready, before the steps.
    pub rss_ready: u64,
    /// Peak resident memory during the steps.
    pub step_peak: u64,
    /// Activation bytes per token of a micro-batch (besides the attention probabilities).
    pub activation_bytes_per_token: f64,
}

/// Time per optimizer step and per epoch.
#[derive(Debug, Clone, Serialize)]
pub struct Time {
    /// Seconds per optimizer step (`grad_accum` micro-batches of batch × seq, then AdamW).
    pub step_s: f64,
    /// Tokens per second of training.
    pub tokens_per_s: f64,
    /// Training sequences per epoch (`None` without data or `--tokens`).
    pub sequences: Option<u64>,
    /// Training tokens per epoch.
    pub tokens: Option<u64>,
    pub steps_per_epoch: Option<u64>,
    pub epoch_s: Option<f64>,
    /// Optimizer steps of the whole run (`max_steps`, or epochs × steps per epoch).
    pub total_steps: Option<u64>,
    /// Seconds of the whole run's steps, validation passes excluded.
    pub total_s: Option<f64>,
}

/// A set of changes that makes the run fit.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    /// The changes as `--set` arguments (`key=value`).
    pub set: Vec<String>,
    /// Expected peak RSS of training with them (a load peak above it is reported apart).
    pub peak: u64,
    /// Expected seconds per optimizer step with them.
    pub step_s: f64,
    /// Expected seconds per epoch with them (when the data size is known).
    pub epoch_s: Option<f64>,
    /// What it changes, in words.
    pub note: String,
}

/// The plan of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The model as resolved (file or folder).
    pub model: String,
    pub method: String,
    pub base_dtype: String,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub grad_accum: usize,
    pub lora_rank: usize,
    pub trainable_params: u64,
    pub memory: Memory,
    pub weights: WeightFormats,
    /// Memory planned for (MemAvailable, or `--memory`).
    pub available: u64,
    /// Whether `memory.peak` fits in `available`.
    pub fits: bool,
    pub time: Time,
    pub calibration: Calibration,
    /// Settings that make the run fit (empty when it fits).
    pub suggestions: Vec<Suggestion>,
}

/// Bytes per weight of a matrix held in `d` (GGUF blocks of 32: Q8_0 34 bytes, Q4_0 18).
pub fn bytes_per_weight(d: BaseDtype) -> f64 {
    match d {
        BaseDtype::Auto | BaseDtype::F32 => 4.0,
        BaseDtype::Bf16 => 2.0,
        BaseDtype::Q8_0 => 34.0 / 32.0,
        BaseDtype::Q4_0 => 18.0 / 32.0,
    }
}

/// (rows, cols) of every weight matrix: embeddings, an untied head, and the seven projections
/// of each layer.
pub fn matrix_shapes(c: &ModelConfig) -> Vec<(usize, usize)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut v = vec![(c.vocab_size, h)];
    if !c.tie_word_embeddings {
        v.push((c.vocab_size, h));
    }
    for _ in 0..c.num_layers {
        v.extend([(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]);
    }
    v
}

/// Bytes of the weights with every matrix held in `d` (norms and biases f32).
pub fn weight_bytes_as(c: &ModelConfig, d: BaseDtype) -> u64 {
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let elems: usize = matrix_shapes(c).iter().map(|(r, k)| r * k).sum();
    let mut f32s = (2 * c.num_layers + 1) * c.hidden_size;
    if c.attention_bias {
        f32s += c.num_layers * (q + 2 * kv);
    }
    (elems as f64 * bytes_per_weight(d)).round() as u64 + 4 * f32s as u64
}

/// LoRA parameters of rank `rank` on the `targets` projections of every layer.
pub fn lora_params(c: &ModelConfig, targets: &[String], rank: usize) -> u64 {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let per_layer: usize = targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "qkv_proj" | "query_key_value" => h + q + 2 * kv,
            "gate_up_proj" => h + 2 * i,
            "dense" => q + h,
            "dense_h_to_4h" | "dense_4h_to_h" => h + i,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            "gate_proj" | "up_proj" | "down_proj" => h + i,
            _ => 0,
        })
        .sum();
    (per_layer * rank * c.num_layers) as u64
}

/// The attention probabilities kept for the backward: one (batch, heads, seq, seq) f32 buffer
/// per layer.
pub fn attention_bytes(c: &ModelConfig, batch: usize, seq: usize) -> u64 {
    (c.num_layers * c.num_heads * batch * seq * seq * 4) as u64
}

/// The attention probabilities alive at once: every layer's, or one layer's with gradient
/// checkpointing (each layer is recomputed, and its probabilities freed, in turn).
fn attention_alive(c: &ModelConfig, batch: usize, seq: usize, checkpointed: bool) -> u64 {
    let all = attention_bytes(c, batch, seq);
    if checkpointed {
        all / c.num_layers.max(1) as u64
    } else {
        all
    }
}

/// The fused LM-head + cross-entropy op's logits block.
pub fn lm_head_block_bytes(c: &ModelConfig) -> u64 {
    (LM_HEAD_ROWS * c.vocab_size * 4) as u64
}

/// KV cache of one generation of `ctx` tokens: keys and values of every layer in f32, grown by
/// 512 positions at a time.
pub fn kv_cache_bytes(c: &ModelConfig, ctx: usize) -> u64 {
    let positions = ctx.div_ceil(512) * 512;
    (c.num_layers * 2 * c.num_kv_heads * c.head_dim * positions * 4) as u64
}

/// Resident memory of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kb("VmRSS:") * 1024
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kb("VmHWM:") * 1024
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0), so that a later [`peak_rss_bytes`]
/// measures only what follows. Returns false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Returns the allocator's free memory to the OS (glibc's `malloc_trim`; nothing elsewhere).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The memory and time model behind a plan: the measured constants and the shapes, evaluated
/// at any batch, sequence length, accumulation and base format.
#[derive(Debug, Clone)]
struct Model2 {
    config: ModelConfig,
    /// Runtime bytes (see [`Memory::runtime`]).
    runtime: u64,
    weights_held: u64,
    held: BaseDtype,
    trainable: u64,
    load_peak: u64,
    act_per_token: f64,
    /// Seconds of forward + backward per token of a micro-batch (at the calibration shape).
    fwd_bwd_per_token: f64,
    optimizer_s: f64,
    /// Calibrated with gradient checkpointing (only one layer's attention probabilities live).
    checkpointed: bool,
}

impl Model2 {
    fn weights(&self, d: BaseDtype) -> u64 {
        if d == self.held {
            self.weights_held
        } else {
            weight_bytes_as(&self.config, d)
        }
    }

    fn attention(&self, batch: usize, seq: usize) -> u64 {
        attention_alive(&self.config, batch, seq, self.checkpointed)
    }

    /// This model with gradient checkpointing on, estimated from a calibration without it:
    /// each layer's input kept (hidden f32 per token per layer) plus one layer's activations,
    /// and the forward computed twice (a third more time; the forward is about a third of a
    /// step).
    fn with_checkpointing(&self) -> Model2 {
        let c = &self.config;
        let layers = c.num_layers.max(1) as f64;
        Model2 {
            config: c.clone(),
            act_per_token: 4.0 * (c.hidden_size as f64) * layers + self.act_per_token / layers,
            fwd_bwd_per_token: self.fwd_bwd_per_token * 4.0 / 3.0,
            checkpointed: true,
            ..*self
        }
    }

    fn memory(&self, batch: usize, seq: usize, d: BaseDtype) -> Memory {
        let c = &self.config;
        let weights = self.weights(d);
        let attention = self.attention(batch, seq);
        let activations = (self.act_per_token * (batch * seq) as f64).round() as u64 + attention;
        let lm_head_block = lm_head_block_bytes(c);
        let (trainable, gradients, optimizer) =
            (self.trainable, self.trainable, 2 * self.trainable);
        let sum = self.runtime
            + weights
            + trainable
            + gradients
            + optimizer
            + activations
            + lm_head_block;
        // Loading converts matrices one at a time; its own peak only matters for the held format.
        let load_peak = if d == self.held { self.load_peak } else { 0 };
        Memory {
            runtime: self.runtime,
            weights,
            trainable,
            gradients,
            optimizer,
            activations,
            attention,
            lm_head_block,
            training: sum,
            load_peak,
            peak: sum.max(load_peak),
            eval_kv_cache: kv_cache_bytes(c, seq + EVAL_NEW_TOKENS),
        }
    }

    fn step_s(&self, batch: usize, seq: usize, grad_accum: usize) -> f64 {
        self.fwd_bwd_per_token * (batch * seq) as f64 * grad_accum as f64 + self.optimizer_s
    }
}

/// Plans a run: loads the model, runs the calibration steps, and evaluates the memory and time
/// model at the configured settings and at the settings that would make it fit.
pub fn plan(opts: &PlanOptions) -> Result<Plan> {
    let cfg = &opts.cfg;
    let held = cfg.held_base()?;
    let available = match opts.memory_bytes {
        Some(b) => b,
        None => mem_available().ok_or_else(|| {
            Error::InvalidArgument(
                "cannot read MemAvailable from /proc/meminfo; give the memory to plan for with \
                 --memory GB"
                    .into(),
            )
        })?,
    };
    let (sequences, tokens) = data_size(opts)?;

    // Load, as training does, and measure.
    let log = |s: String| {
        if opts.verbose {
            eprintln!("{s}");
        }
    };
    log(format!("plan: loading {} (base {held})", cfg.model));
    let device = cfg.device.open()?;
    reset_peak_rss();
    let mut model = Model::load_with(&cfg.model, &device, held)?;
    model.transformer.bf16_compute = cfg.compute.bf16();
    let load_peak = peak_rss_bytes();
    // Conversions at load free large buffers that the tuned allocator keeps resident; a run
    // reuses them for activations. Handing them back here lets the RSS below measure what the
    // model really holds (the load's own peak stays in the estimate as a floor).
    release_free_memory();
    let rss_loaded = rss_bytes();
    let config = model.config().clone();
    let weights_held = model.transformer.weight_bytes() as u64;
    let held_formats = model.transformer.held_formats();

    let vars: Vec<(String, candle_core::Var, bool)> = match cfg.method {
        Method::Lora => {
            let spec = LoraSpec {
                rank: cfg.lora_rank,
                alpha: cfg.lora_alpha,
                rslora: cfg.rslora,
                dropout: cfg.lora_dropout as f32,
                targets: cfg.targets(),
            };
            lora::attach(&mut model.transformer, &spec, lora::kaiming_a(cfg.seed))?
                .into_iter()
                .map(|(n, v)| (n, v, true))
                .collect()
        }
        Method::Full => super::unfreeze_all(&mut model.transformer)?,
    };
    let trainable_params: u64 = vars.iter().map(|(_, v, _)| v.elem_count() as u64).sum();
    let trainable = 4 * trainable_params;
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let rss_ready = rss_bytes();
    // Zeroed buffers (LoRA B, the moments) are not resident until written, so the parts that
    // train are counted from their shapes, over the RSS of the loaded model.
    let runtime = rss_loaded.saturating_sub(weights_held);

    // Calibration shape: the configured one unless a first guess says it would not fit.
    let lm_head_block = lm_head_block_bytes(&config);
    let (cal_batch, cal_seq) = opts.calibrate_at.unwrap_or_else(|| {
        let guess = |b: usize, s: usize| {
            rss_loaded
                + 4 * trainable
                + lm_head_block
                + (prior_bytes_per_token(&config) * (b * s) as f64) as u64
                + attention_bytes(&config, b, s)
        };
        let (mut b, mut s) = (cfg.batch_size, cfg.max_seq_len);
        // The steps run here, whatever machine `--memory` plans for.
        let room = mem_available().unwrap_or(available) * 9 / 10;
        while guess(b, s) > room && (b > 1 || s > 64) {
            if b > 1 {
                b = b.div_ceil(2);
            } else {
                s = (s / 2).max(64);
            }
        }
        (b, s)
    });
    log(format!(
        "plan: calibrating with 1 warm-up + 2 timed steps of {cal_batch} × {cal_seq} tokens"
    ));
    let checkpointing = cfg.gradient_checkpointing && cfg.method == Method::Lora;
    let dir = std::env::temp_dir().join(format!("afinar-plan-{}", std::process::id()));
    let file = random_batch(&dir, cal_batch, cal_seq, config.vocab_size)?;
    let batch: Vec<usize> = (0..cal_batch).collect();
    let peak_reset = reset_peak_rss();
    let (mut steps_s, mut fwd_bwd, mut opt_s) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        let t = Instant::now();
        let (grads, _, _) = step_gradients(
            &model.transformer,
            &opt,
            &file,
            std::slice::from_ref(&batch),
            0,
            checkpointing,
        )?;
        let t_fb = t.elapsed().as_secs_f64();
        if let Some(mut g) = grads {
            optim::clip_grad_norm(&mut g, cfg.max_grad_norm)?;
            opt.step(&g, cfg.learning_rate(config.parameter_count()))?;
        }
        let total = t.elapsed().as_secs_f64();
        log(format!(
            "plan: step {}: {total:.2} s{}",
            i + 1,
            if i == 0 { " (warm-up)" } else { "" }
        ));
        if i > 0 {
            steps_s.push(total);
            fwd_bwd.push(t_fb);
            opt_s.push(total - t_fb);
        }
    }
    drop(file);
    let _ = std::fs::remove_dir_all(&dir);
    let step_peak = peak_rss_bytes();
    // Without a reset, the peak may be the load's; then the steps' own peak is unknown and the
    // activations are counted from what is resident now, a lower bound.
    let step_peak_used = if peak_reset { step_peak } else { rss_bytes() };
    let cal_tokens = (cal_batch * cal_seq) as f64;
    let act_measured = step_peak_used.saturating_sub(rss_loaded + 4 * trainable + lm_head_block)
        as f64
        - attention_alive(&config, cal_batch, cal_seq, checkpointing) as f64;
    let act_per_token = act_measured.max(0.0) / cal_tokens;
    let (fwd_bwd_s, optimizer_s) = (median(fwd_bwd), median(opt_s));

    let m = Model2 {
        config: config.clone(),
        runtime,
        weights_held,
        held: effective(held, &held_formats),
        trainable,
        load_peak,
        act_per_token,
        fwd_bwd_per_token: fwd_bwd_s / cal_tokens,
        optimizer_s,
        checkpointed: checkpointing,
    };
    let (b, s, ga) = (cfg.batch_size, cfg.max_seq_len, cfg.grad_accum);
    let memory = m.memory(b, s, m.held);
    let fits = memory.peak <= available;
    let time = time_of(&m, cfg, b, s, ga, sequences, tokens);
    let suggestions = if fits {
        Vec::new()
    } else {
        suggest(&m, cfg, available, sequences, tokens)
    };
    let weights = WeightFormats {
        held: held_formats,
        held_bytes: weights_held,
        f32: m.weights(BaseDtype::F32),
        bf16: m.weights(BaseDtype::Bf16),
        q8_0: m.weights(BaseDtype::Q8_0),
        q4_0: m.weights(BaseDtype::Q4_0),
    };
    Ok(Plan {
        model: model.source.path().display().to_string(),
        method: cfg.method.to_string(),
        base_dtype: held.to_string(),
        batch_size: b,
        max_seq_len: s,
        grad_accum: ga,
        lora_rank: cfg.lora_rank,
        trainable_params,
        memory,
        weights,
        available,
        fits,
        time,
        calibration: Calibration {
            batch: cal_batch,
            seq: cal_seq,
            steps_s,
            fwd_bwd_s,
            optimizer_s,
            rss_loaded,
            load_peak,
            rss_ready,
            step_peak,
            activation_bytes_per_token: act_per_token,
        },
        suggestions,
    })
}

/// The base format the loaded matrices are actually in, when they are all in one the model
/// knows how to compute for other formats (so that converting to it is a no-op).
fn effective(held: BaseDtype, formats: &std::collections::BTreeMap<String, usize>) -> BaseDtype {
    if held != BaseDtype::Auto {
        return held;
    }
    let only = |name: &str| formats.len() == 1 && formats.contains_key(name);
    if only("F32") {
        BaseDtype::F32
    } else if only("BF16") {
        BaseDtype::Bf16
    } else if only("Q8_0") {
        BaseDtype::Q8_0
    } else if only("Q4_0") {
        BaseDtype::Q4_0
    } else {
        BaseDtype::Auto
    }
}

/// A first guess of activation bytes per token, before anything is measured: about 16 f32
/// vectors of the hidden size and 6 of the MLP size per layer (what this implementation keeps
/// for the backward, to within a factor of two), used only to pick a calibration shape.
fn prior_bytes_per_token(c: &ModelConfig) -> f64 {
    (c.num_layers * 4 * (16 * c.hidden_size + 6 * c.intermediate_size)) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Training sequences and tokens of one epoch: from the data, prepared exactly as training
/// prepares it (reusing the run directory's cache when it is current), or from `--tokens`.
fn data_size(opts: &PlanOptions) -> Result<(Option<u64>, Option<u64>)> {
    let cfg = &opts.cfg;
    if !cfg.data.is_empty() {
        let text = TextSide::load(&cfg.model)?;
        let run_cache = cfg.out.join("data");
        let (dir, temporary) = if run_cache.join("manifest.json").is_file() {
            (run_cache, false)
        } else {
            (
                std::env::temp_dir().join(format!("afinar-plan-data-{}", std::process::id())),
                true,
            )
        };
        let prepared =
            crate::data::prepare_cached(&cfg.prepare_options()?, &cfg.model, &text, &dir);
        let sizes = prepared.and_then(|p| {
            let train = p.split("train")?;
            Ok((train.sequences() as u64, train.ids().len() as u64))
        });
        if temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (seqs, toks) = sizes?;
        return Ok((Some(seqs), Some(toks)));
    }
    Ok(match opts.tokens {
        Some(n) => (Some(n.div_ceil(cfg.max_seq_len as u64)), Some(n)),
        None => (None, None),
    })
}

/// A token file of `batch` sequences of `seq` random tokens, every token after the first a
/// target: the worst case of a packed batch, as `bench train` uses.
fn random_batch(dir: &Path, batch: usize, seq: usize, vocab: usize) -> Result<TokenFile> {
    let mut rng = Rng::new(1);
    let mut p = Packed {
        example_offsets: vec![0],
        sequence_offsets: vec![0],
        ..Default::default()
    };
    for i in 0..batch {
        for j in 0..seq {
            p.ids.push((rng.next_u64() % vocab as u64) as u32);
            p.labels.push(u8::from(j > 0));
        }
        p.example_offsets.push(p.ids.len() as u64);
        p.sequence_offsets.push((i + 1) as u64);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path: PathBuf = dir.join("batch.bin");
    cache::write(&path, &p)?;
    TokenFile::open(&path)
}

/// Time per step and per epoch at `batch` × `seq` with `grad_accum`.
fn time_of(
    m: &Model2,
    cfg: &TrainConfig,
    batch: usize,
    seq: usize,
    grad_accum: usize,
    sequences: Option<u64>,
    tokens: Option<u64>,
) -> Time {
    let step_s = m.step_s(batch, seq, grad_accum);
    // The number of sequences depends on the packing length; with another max_seq_len the
    // same tokens fill proportionally more (or fewer) sequences.
    let sequences = sequences.map(|n| {
        if seq == cfg.max_seq_len {
            n
        } else {
            (n * cfg.max_seq_len as u64).div_ceil(seq as u64)
        }
    });
    let steps_per_epoch = sequences.map(|n| n.div_ceil((batch * grad_accum) as u64));
    let total_steps = if cfg.max_steps > 0 {
        Some(cfg.max_steps as u64)
    } else {
        steps_per_epoch.map(|s| s * cfg.passes(s as usize) as u64)
    };
    Time {
        step_s,
        tokens_per_s: (batch * seq * grad_accum) as f64 / step_s,
        sequences,
        tokens,
        steps_per_epoch,
        epoch_s: steps_per_epoch.map(|s| s as f64 * step_s),
        total_steps,
        total_s: total_steps.map(|s| s as f64 * step_s),
    }
}

/// Settings that fit in `available`, each as `--set` strings: a packed base format, a smaller
/// micro-batch with the same tokens per step through gradient accumulation, a shorter
/// `max_seq_len`, and, when none alone fits, them combined.
fn suggest(
    m: &Model2,
    cfg: &TrainConfig,
    available: u64,
    sequences: Option<u64>,
    tokens: Option<u64>,
) -> Vec<Suggestion> {
    let (b0, s0, ga0) = (cfg.batch_size, cfg.max_seq_len, cfg.grad_accum);
    let mut out = Vec::new();
    let candidate =
        |set: Vec<String>, b: usize, s: usize, ga: usize, d: BaseDtype, note: String| {
            // Training's own peak: a load peaking higher is solved apart (convert ahead).
            let mem = m.memory(b, s, d);
            (mem.training <= available).then(|| {
                let t = time_of(m, cfg, b, s, ga, sequences, tokens);
                Suggestion {
                    set,
                    peak: mem.training,
                    step_s: t.step_s,
                    epoch_s: t.epoch_s,
                    note,
                }
            })
        };
    let lora = cfg.method == Method::Lora;
    // A packed base: Q8_0 first (closer to the original), then Q4_0.
    let mut smaller_bases = Vec::new();
    if lora {
        for d in [BaseDtype::Q8_0, BaseDtype::Q4_0] {
            if m.weights(d) < m.weights(m.held) {
                smaller_bases.push(d);
                out.extend(candidate(
                    vec![format!("base_dtype={d}")],
                    b0,
                    s0,
                    ga0,
                    d,
                    format!(
                        "hold the base as {d}: weights {} instead of {}",
                        human(m.weights(d)),
                        human(m.weights(m.held))
                    ),
                ));
            }
        }
    }
    // Gradient checkpointing: the same batch, a layer's activations instead of all of them.
    if lora && !m.checkpointed {
        let ck = m.with_checkpointing();
        let mem = ck.memory(b0, s0, m.held);
        if mem.training <= available {
            let t = time_of(&ck, cfg, b0, s0, ga0, sequences, tokens);
            out.push(Suggestion {
                set: vec!["gradient_checkpointing=true".into()],
                peak: mem.training,
                step_s: t.step_s,
                epoch_s: t.epoch_s,
                note: "recompute each layer in the backward: activations of one layer, about a third more time".into(),
            });
        }
    }
    // A smaller micro-batch, the same tokens per optimizer step.
    let fit_batch = |d: BaseDtype, s: usize| {
        let mut b = b0;
        while b > 1 {
            b = b.div_ceil(2);
            if m.memory(b, s, d).training <= available {
                return Some(b);
            }
        }
        None
    };
    if let Some(b) = fit_batch(m.held, s0) {
        let ga = (b0 * ga0).div_ceil(b);
        out.extend(candidate(
            vec![format!("batch_size={b}"), format!("grad_accum={ga}")],
            b,
            s0,
            ga,
            m.held,
            format!(
                "micro-batches of {b} accumulated {ga}×: the same {} sequences per step",
                b * ga
            ),
        ));
    }
    // Shorter sequences (packing makes more of them; the tokens per epoch stay).
    let fit_seq = |d: BaseDtype, b: usize| {
        let mut s = s0;
        while s > 64 {
            s = (s / 2).max(64);
            if m.memory(b, s, d).training <= available {
                return Some(s);
            }
        }
        None
    };
    if let Some(s) = fit_seq(m.held, b0) {
        out.extend(candidate(
            vec![format!("max_seq_len={s}")],
            b0,
            s,
            ga0,
            m.held,
            format!("sequences of {s} tokens; longer examples are truncated"),
        ));
    }
    if out.is_empty() {
        // Everything together: the smallest base, micro-batch 1, then shorter sequences.
        let d = smaller_bases.last().copied().unwrap_or(m.held);
        let ga = b0 * ga0;
        let mut set = Vec::new();
        if d != m.held {
            set.push(format!("base_dtype={d}"));
        }
        if b0 > 1 {
            set.extend(["batch_size=1".to_string(), format!("grad_accum={ga}")]);
        }
        let s = if m.memory(1, s0, d).training <= available {
            s0
        } else {
            fit_seq(d, 1).unwrap_or(0)
        };
        if s > 0 {
            if s != s0 {
                set.push(format!("max_seq_len={s}"));
            }
            out.extend(candidate(set, 1, s, ga, d, "all of them together".into()));
        }
    }
    out
}

/// Bytes for people: "538 MB", "3.21 GB" (decimal units, as `free -h --si`).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Seconds for people: "4.2 s", "12 min 5 s", "3 h 20 min".
pub fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2_shapes() -> ModelConfig {
        ModelConfig {
            architecture: crate::model::config::Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 1e5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            ..Default::default()
        }
    }

    #[test]
    fn weight_bytes_follow_block_sizes() {
        let c = smollm2_shapes();
        let f32 = weight_bytes_as(&c, BaseDtype::F32);
        // 134.5M weights in f32 (SmolLM2-135M): 538 MB.
        assert!((f32 as f64 / 1e6 - 538.1).abs() < 1.0, "{f32}");
        let q4 = weight_bytes_as(&c, BaseDtype::Q4_0);
        let q8 = weight_bytes_as(&c, BaseDtype::Q8_0);
        let bf16 = weight_bytes_as(&c, BaseDtype::Bf16);
        assert!(q4 < q8 && q8 < bf16 && bf16 < f32);
        // Matrices dominate: the ratios are those of the formats' bytes per weight.
        assert!((q4 as f64 / f32 as f64 - 18.0 / 128.0).abs() < 0.01);
    }

    #[test]
    fn lora_counts_match_the_shapes() {
        let c = smollm2_shapes();
        let all: Vec<String> = lora::ALL_LINEAR.iter().map(|s| s.to_string()).collect();
        // Per layer: q 576+576, k 576+192, v 576+192, o 576+576, gate/up/down 3 × (576+1536).
        assert_eq!(
            lora_params(&c, &all, 16),
            30 * 16 * (1152 + 768 * 2 + 1152 + 3 * 2112)
        );
        assert_eq!(lora_params(&c, &["q_proj".into()], 8), 30 * 8 * 1152);
    }

    #[test]
    fn suggestions_fit_and_keep_tokens_per_step() {
        let c = smollm2_shapes();
        let m = Model2 {
            runtime: 200_000_000,
            weights_held: weight_bytes_as(&c, BaseDtype::F32),
            held: BaseDtype::F32,
            trainable: 4 * lora_params(&c, &["q_proj".into()], 16),
            load_peak: 0,
            act_per_token: 2e6,
            fwd_bwd_per_token: 1e-3,
            optimizer_s: 0.01,
            checkpointed: false,
            config: c,
        };
        let cfg = TrainConfig {
            batch_size: 8,
            max_seq_len: 1024,
            ..TrainConfig::default()
        };
        let need = m.memory(8, 1024, BaseDtype::F32).peak;
        let available = need / 3;
        let s = suggest(&m, &cfg, available, Some(1000), Some(1_000_000));
        assert!(!s.is_empty());
        for x in &s {
            assert!(x.peak <= available, "{x:?}");
        }
        let batch = s
            .iter()
            .find(|x| x.set.iter().any(|k| k.starts_with("batch_size=")))
            .expect("a batch-size suggestion");
        let get = |k: &str| -> usize {
            batch
                .set
                .iter()
                .find_map(|x| x.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(get("batch_size=") * get("grad_accum="), 8);
        // Checkpointing keeps the batch: a third more time, far fewer activations.
        let ck = s
            .iter()
            .find(|x| x.set == ["gradient_checkpointing=true"])
            .expect("a checkpointing suggestion");
        let plain = m.step_s(8, 1024, 1);
        assert!((ck.step_s - (plain - 0.01) * 4.0 / 3.0 - 0.01).abs() < 1e-9);
        assert!(ck.peak < need / 4, "{ck:?}");
        // Nothing to suggest when it fits.
        assert!(m.memory(8, 1024, BaseDtype::F32).peak <= need);
    }
}
