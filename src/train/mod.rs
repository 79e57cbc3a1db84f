//! Step 5 of the pipeline: fine-tuning. The loop below reads top to bottom — prepare data,
//! load the model, attach adapters (or unfreeze everything), then for each step: micro-batches,
//! loss normalised over the whole accumulated batch, backward, clip, AdamW, metrics, validation,
//! checkpoints.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod lora;
pub mod optim;
pub mod plot;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use serde::Serialize;

use crate::data;
use crate::data::cache::TokenFile;
use crate::export::peft::{self, AdapterConfig};
use crate::model::{Model, TextSide, Transformer};
use crate::rng::Rng;
use crate::{Error, Result};
pub use config::TrainConfig;
use optim::{AdamW, AdamWConfig};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Metrics {
    pub step: usize,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub elapsed_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    pub output: PathBuf,
    pub tokens_per_sec: f64,
    pub stopped_early: bool,
}

/// Sum of negative log-likelihoods of the batch's targets (differentiable when `with_grad`),
/// computing logits only at positions that carry loss (see [`Transformer::head_nll`]).
pub fn batch_nll(model: &Transformer, b: &batch::Batch, with_grad: bool) -> Result<Tensor> {
    let hidden = model.forward_hidden(&b.ids, &b.positions, Some(&b.mask), None)?;
    let h = hidden.dim(D::Minus1)?;
    let picked = hidden
        .reshape(((), h))?
        .index_select(&b.target_positions, 0)?;
    let nll = model.head_nll(&picked, &b.targets, with_grad)?;
    Ok(nll.sum_all()?)
}

/// Mean loss per target token over the first `max_batches` batches of a split (0 = all).
pub fn split_loss(
    model: &Transformer,
    file: &TokenFile,
    batch_size: usize,
    max_batches: usize,
) -> Result<Option<f64>> {
    let (mut sum, mut n) = (0f64, 0usize);
    let seqs: Vec<usize> = (0..file.sequences()).collect();
    let limit = if max_batches == 0 {
        usize::MAX
    } else {
        max_batches
    };
    for chunk in seqs.chunks(batch_size.max(1)).take(limit) {
        let b = batch::make_batch(file, chunk, model.device())?;
        if b.n_targets == 0 {
            continue;
        }
        sum += batch_nll(model, &b, false)?.detach().to_scalar::<f32>()? as f64;
        n += b.n_targets;
    }
    Ok((n > 0).then(|| sum / n as f64))
}

/// The sequence order of an epoch: a seeded shuffle, the same on every run and after resume.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = Rng::new(crate::rng::derive_seed(seed, epoch as u64));
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}

/// Steps timed before a `max_minutes` budget is turned into a step count.
const BUDGET_PROBE_STEPS: usize = 3;

/// Keys whose change makes a checkpoint meaningless for this run.
const RESUME_KEYS: &[&str] = &[
    "model",
    "data",
    "format",
    "split",
    "split_key",
    "max_seq_len",
    "system",
    "method",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "rslora",
    "batch_size",
    "grad_accum",
    "seed",
];

fn incompatible(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    let (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) =
        (toml::Value::try_from(saved), toml::Value::try_from(now))
    else {
        return vec![];
    };
    RESUME_KEYS
        .iter()
        .filter(|k| a.get(**k) != b.get(**k))
        .map(|k| {
            format!(
                "{k}: {} in the run, {} now",
                a.get(*k).map_or("-".into(), |v| v.to_string()),
                b.get(*k).map_or("-".into(), |v| v.to_string())
            )
        })
        .collect()
}

/// Runs training. With `resume`, `cfg` must agree with the run's saved configuration on every
/// key that shapes the model, the data or the order of batches.
pub fn train(cfg: &TrainConfig, resume: bool, show_progress: bool) -> Result<TrainSummary> {
    let device = Device::Cpu;
    let mut cfg = cfg.clone();
    let out = cfg.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let config_path = out.join("config.toml");
    if resume {
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            Error::bad_file(
                &out,
                format!("cannot resume: no config.toml in the run directory ({e})"),
            )
        })?;
        let saved: TrainConfig =
            toml::from_str(&text).map_err(|e| Error::bad_file(&config_path, e.to_string()))?;
        let diffs = incompatible(&saved, &cfg);
        if !diffs.is_empty() {
            return Err(Error::Resume(format!(
                "cannot resume {}: the configuration differs ({})",
                out.display(),
                diffs.join("; ")
            )));
        }
        // A time budget was turned into a step count at the start of the run: keep it.
        if cfg.max_minutes > 0.0 && saved.max_minutes == 0.0 && saved.max_steps > 0 {
            cfg.max_steps = saved.max_steps;
            cfg.max_minutes = 0.0;
        }
    }
    cache_write(&config_path, cfg.to_toml().as_bytes())?;

    // Data: prepared (or reused) inside the run directory.
    let text = TextSide::load(&cfg.model)?;
    let opts = cfg.prepare_options()?;
    let prepared = data::prepare_cached(&opts, &cfg.model, &text, &out.join("data"))?;
    let train_file = prepared.split("train")?;
    let val_file = prepared.split("validation")?;
    if train_file.sequences() == 0 {
        return Err(Error::Data("the training split is empty".into()));
    }

    // Model and trainable parameters.
    let mut model = Model::load(&cfg.model, &device)?;
    let base_model = model.source.path().display().to_string();
    let trainables: Vec<(String, Var, bool)> = if cfg.method == "lora" {
        let spec = lora::LoraSpec {
            rank: cfg.lora_rank,
            alpha: cfg.lora_alpha,
            rslora: cfg.rslora,
            dropout: cfg.lora_dropout as f32,
            targets: cfg.targets()?,
        };
        lora::attach(&mut model.transformer, &spec, lora::kaiming_a(cfg.seed))?
            .into_iter()
            .map(|(n, v)| (n, v, true))
            .collect()
    } else {
        unfreeze_all(&mut model.transformer)?
    };
    let adam = AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(trainables, adam)?;

    let seqs_per_step = cfg.batch_size * cfg.grad_accum;
    let steps_per_epoch = train_file.sequences().div_ceil(seqs_per_step);
    let mut total_steps = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        cfg.epochs * steps_per_epoch
    };

    let mut state = checkpoint::TrainState {
        step: 0,
        epoch: 0,
        position: 0,
        best_val_loss: None,
        evals_without_improvement: 0,
        tokens_seen: 0,
        elapsed_s: 0.0,
        base_model: base_model.clone(),
    };
    let metrics_path = out.join("metrics.jsonl");
    let mut history: Vec<Metrics> = Vec::new();
    if resume {
        let ckpt = checkpoint::list(&out)?.pop().ok_or_else(|| {
            Error::Resume(format!(
                "cannot resume {}: it has no complete checkpoint",
                out.display()
            ))
        })?;
        state = checkpoint::load(&ckpt, &mut opt)?;
        if state.base_model != base_model {
            return Err(Error::Resume(format!(
                "cannot resume: the run was trained on {} but the model is now {base_model}",
                state.base_model
            )));
        }
        // Keep the metrics up to the checkpoint; the steps after it are redone.
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            history = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
                .filter(|m| m.step <= state.step)
                .collect();
        }
        eprintln!("resuming {} from step {}", out.display(), state.step);
    }
    let mut metrics_file =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    for m in &history {
        writeln!(
            metrics_file,
            "{}",
            serde_json::to_string(m).unwrap_or_default()
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
    }

    let bar = progress_bar(total_steps, state.step, show_progress);
    let mut order = epoch_order(train_file.sequences(), cfg.seed, state.epoch);
    let start = Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_s);
    let mut last_loss = f64::NAN;
    let mut last_val = state.best_val_loss;
    let mut stopped_early = false;
    let mut recent_tok_s = 0.0;
    while state.step < total_steps {
        let step_start = Instant::now();
        // The sequences of this step, crossing into the next epoch if needed.
        let mut micro: Vec<Vec<usize>> = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            let mut seqs = Vec::with_capacity(cfg.batch_size);
            while seqs.len() < cfg.batch_size {
                if state.position >= order.len() {
                    state.epoch += 1;
                    state.position = 0;
                    order = epoch_order(train_file.sequences(), cfg.seed, state.epoch);
                }
                seqs.push(order[state.position]);
                state.position += 1;
            }
            micro.push(seqs);
        }
        // This step's dropout masks: a function of (seed, step), so a resumed run draws the same.
        let dropout_key = crate::rng::stable_hash(&(state.step as u64).to_le_bytes(), cfg.seed);
        let (grads, loss_sum, tokens) =
            step_gradients(&model.transformer, &opt, &train_file, &micro, dropout_key)?;
        if !loss_sum.is_finite() {
            return Err(Error::Training(format!(
                "loss is {loss_sum} at step {}; stopping. The last good checkpoint (if any) is in {}",
                state.step + 1,
                out.join("checkpoints").display()
            )));
        }
        let lr = optim::lr_at(
            state.step,
            total_steps,
            cfg.warmup_steps,
            cfg.lr,
            cfg.min_lr,
            cfg.schedule,
        );
        let mut grad_norm = 0.0;
        if let Some(mut g) = grads {
            grad_norm = optim::clip_grad_norm(&mut g, cfg.max_grad_norm)?;
            opt.step(&g, lr)?;
        }
        state.step += 1;
        state.tokens_seen += tokens as u64;
        if cfg.max_minutes > 0.0 && state.step == BUDGET_PROBE_STEPS.min(total_steps) {
            // Fit the run into the time budget, leaving room for validations and checkpoints,
            // and record the result as max_steps so a resume follows the same schedule.
            let per_step = start.elapsed().as_secs_f64() / state.step as f64;
            let fits = (cfg.max_minutes * 60.0 * 0.92 / per_step) as usize;
            total_steps = total_steps.min(fits.max(state.step));
            cfg.max_steps = total_steps;
            cfg.max_minutes = 0.0;
            cache_write(&config_path, cfg.to_toml().as_bytes())?;
            bar.set_length(total_steps as u64);
        }
        last_loss = loss_sum;
        let tok_s = tokens as f64 / step_start.elapsed().as_secs_f64();
        recent_tok_s = if recent_tok_s == 0.0 {
            tok_s
        } else {
            0.8 * recent_tok_s + 0.2 * tok_s
        };
        let mut val_loss = None;
        let is_last = state.step == total_steps;
        if (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) || is_last {
            val_loss = split_loss(
                &model.transformer,
                &val_file,
                cfg.batch_size,
                cfg.eval_batches,
            )?;
            if let Some(v) = val_loss {
                last_val = Some(v);
                if state.best_val_loss.is_none_or(|b| v < b) {
                    state.best_val_loss = Some(v);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
            }
        }
        state.elapsed_s = start.elapsed().as_secs_f64();
        let m = Metrics {
            step: state.step,
            loss: loss_sum,
            val_loss,
            lr,
            grad_norm,
            tokens_per_sec: tok_s,
            elapsed_s: state.elapsed_s,
        };
        writeln!(
            metrics_file,
            "{}",
            serde_json::to_string(&m).unwrap_or_default()
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
        history.push(m);
        if val_loss.is_some() {
            let _ = plot::loss_curve(&out.join("loss.png"), &history);
        }
        bar.set_position(state.step as u64);
        bar.set_message(format!(
            "loss {loss_sum:.4}{} lr {lr:.2e} {recent_tok_s:.0} tok/s",
            last_val.map_or(String::new(), |v| format!(" val {v:.4}"))
        ));
        let stop = cfg.early_stopping_patience > 0
            && state.evals_without_improvement >= cfg.early_stopping_patience;
        if (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every)) || is_last || stop {
            checkpoint::save(&out, &opt, &state, cfg.keep_checkpoints)?;
        }
        if stop {
            stopped_early = true;
            bar.println(format!(
                "early stop at step {}: validation loss has not improved for {} evaluations",
                state.step, state.evals_without_improvement
            ));
            break;
        }
    }
    bar.finish();

    // The result: a PEFT adapter, or a full Hugging Face model directory.
    let output = if cfg.method == "lora" {
        let dir = out.join("adapter");
        let vars: Vec<(String, Var)> = opt
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        let acfg = AdapterConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: cfg.lora_rank,
            lora_alpha: cfg.lora_alpha,
            lora_dropout: cfg.lora_dropout,
            target_modules: cfg.targets()?,
            use_rslora: cfg.rslora,
            bias: "none".into(),
            fan_in_fan_out: false,
            base_model_name_or_path: Some(base_model),
            inference_mode: true,
        };
        peft::save(&dir, &acfg, &vars)?;
        dir
    } else {
        let dir = out.join("model");
        crate::export::hf::save(&dir, &model)?;
        dir
    };
    Ok(TrainSummary {
        steps: state.step,
        final_loss: last_loss,
        final_val_loss: last_val,
        output,
        tokens_per_sec: state.tokens_seen as f64 / state.elapsed_s.max(1e-9),
        stopped_early,
    })
}

/// Gradients of one optimiser step over `micro` batches (lists of sequence indices), in the
/// order of `opt.params`, with the loss normalised by the label tokens of the whole accumulated
/// batch — so N micro-batches give exactly the gradient of one batch N times larger. Returns
/// (gradients, loss, tokens); gradients are `None` when no micro-batch has a target.
/// `dropout_key` seeds this step's LoRA dropout masks (0 = no dropout).
pub fn step_gradients(
    model: &Transformer,
    opt: &AdamW,
    file: &TokenFile,
    micro: &[Vec<usize>],
    dropout_key: u64,
) -> Result<(Option<Vec<Tensor>>, f64, usize)> {
    let denom: usize = micro.iter().map(|s| batch::count_targets(file, s)).sum();
    let mut grads: Option<Vec<Tensor>> = None;
    let mut loss_sum = 0f64;
    let mut tokens = 0usize;
    for (i, seqs) in micro.iter().enumerate() {
        let key = if dropout_key == 0 {
            0
        } else {
            crate::rng::derive_seed(dropout_key, i as u64) | 1
        };
        model
            .lora_dropout_key
            .store(key, std::sync::atomic::Ordering::Relaxed);
        let b = batch::make_batch(file, seqs, model.device())?;
        tokens += b.n_tokens;
        if b.n_targets == 0 {
            continue;
        }
        let loss = (batch_nll(model, &b, true)? / denom as f64)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let store = loss.backward()?;
        let g: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| {
                store.get(p.var.as_tensor()).cloned().ok_or_else(|| {
                    Error::Training(format!(
                        "parameter {} received no gradient (a detached op?)",
                        p.name
                    ))
                })
            })
            .collect::<Result<_>>()?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc
                .iter()
                .zip(&g)
                .map(|(a, b)| a.add(b))
                .collect::<candle_core::Result<_>>()?,
        });
    }
    model
        .lora_dropout_key
        .store(0, std::sync::atomic::Ordering::Relaxed);
    Ok((grads, loss_sum, tokens))
}

fn cache_write(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fs::write_atomic(path, bytes)
}

/// Turns every weight into a variable for full fine-tuning; weight decay skips norms and biases.
pub fn unfreeze_all(m: &mut Transformer) -> Result<Vec<(String, Var, bool)>> {
    let mut out = Vec::new();
    let mut var = |name: String, t: &mut Tensor, decay: bool| -> Result<()> {
        let v = Var::from_tensor(t)?;
        *t = v.as_tensor().clone();
        out.push((name, v, decay));
        Ok(())
    };
    var(
        "model.embed_tokens.weight".into(),
        &mut m.embed_tokens,
        true,
    )?;
    var("model.norm.weight".into(), &mut m.norm, false)?;
    if let Some(h) = m.lm_head.as_mut() {
        var("lm_head.weight".into(), h, true)?;
    }
    for (i, l) in m.layers.iter_mut().enumerate() {
        var(
            format!("model.layers.{i}.input_layernorm.weight"),
            &mut l.input_layernorm,
            false,
        )?;
        var(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            &mut l.post_attention_layernorm,
            false,
        )?;
    }
    for (name, lin) in m.linears_mut() {
        var(format!("{name}.weight"), &mut lin.weight, true)?;
        if let Some(b) = lin.bias.as_mut() {
            var(format!("{name}.bias"), b, false)?;
        }
    }
    Ok(out)
}

fn progress_bar(total: usize, at: usize, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    bar
}
