//! The phases of a training run, as plain functions over one plain struct: open (or resume)
//! the run, choose what trains, next micro-batches, fit the time budget, after-step bookkeeping
//! and the output. `train()` in `mod.rs` calls them in order; nothing here loops.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Var;

use super::checkpoint::{self, TrainState};
use super::config::{Method, TrainConfig, AUTO_MAX_EPOCHS, AUTO_MIN_STEPS};
use super::optim::{self, AdamW, AdamWConfig};
use super::{lora, plot, split_loss, unfreeze_all, Metrics};
use crate::data;
use crate::data::cache::TokenFile;
use crate::export::peft::{self, AdapterConfig};
use crate::model::{Model, TextSide};
use crate::rng::Rng;
use crate::{Error, Result};

/// Steps timed before a `max_minutes` budget is turned into a step count.
const BUDGET_PROBE_STEPS: usize = 3;

/// Keys whose change makes a checkpoint meaningless for this run.
const RESUME_KEYS: &[&str] = &[
    "model",
    "data",
    "val",
    "test",
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

/// Everything the loop reads and updates, opened by [`open`].
pub struct Run {
    /// The settled configuration (a time budget becomes `max_steps` after the probe steps).
    pub cfg: TrainConfig,
    pub model: Model,
    /// The base model's source path, recorded in checkpoints and the adapter.
    pub base_model: String,
    pub opt: AdamW,
    pub train_file: TokenFile,
    pub val_file: TokenFile,
    /// Step, data position, best validation loss: what a checkpoint restores.
    pub state: TrainState,
    pub total_steps: usize,
    /// The peak learning rate (`lr`, or what "auto" picked for this model).
    pub peak_lr: f64,
    /// Whether the over-fitting warning has been printed (once per run).
    pub warned_overfit: bool,
    /// This epoch's sequence order.
    pub order: Vec<usize>,
    pub metrics: MetricsLog,
    /// When the run started, moved back by the time already spent before a resume.
    pub start: Instant,
    pub last_loss: f64,
    pub last_val: Option<f64>,
    /// This process's lock on the run directory, held until the run ends.
    pub lock: super::lock::RunLock,
}

impl Run {
    fn out(&self) -> &Path {
        &self.cfg.out
    }
}

/// What one optimiser step produced.
pub struct StepOutcome {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens per second of this step alone (forward, backward and optimiser).
    pub tokens_per_sec: f64,
}

/// `metrics.jsonl` (one [`Metrics`] line per step) and the same lines in memory for the plot.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    pub history: Vec<Metrics>,
}

impl MetricsLog {
    /// Rewrites the file with `history` (the steps up to a resumed checkpoint, or none).
    fn create(path: PathBuf, history: Vec<Metrics>) -> Result<Self> {
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut log = Self {
            path,
            file,
            history: Vec::new(),
        };
        for m in history {
            log.push(m)?;
        }
        Ok(log)
    }

    fn push(&mut self, m: Metrics) -> Result<()> {
        writeln!(
            self.file,
            "{}",
            serde_json::to_string(&m).unwrap_or_default()
        )
        .map_err(|e| Error::io(&self.path, e))?;
        self.history.push(m);
        Ok(())
    }
}

/// Phase 1: opens a new run or resumes one — settles and saves the configuration, prepares the
/// data, loads the model on the configured device, chooses what trains, builds the optimiser
/// and restores the last checkpoint when resuming.
pub fn open(cfg: &TrainConfig, resume: bool) -> Result<Run> {
    // Before anything is written: one run per directory.
    let lock = super::lock::RunLock::acquire(&cfg.out)?;
    checkpoint::remove_stale_temporaries(&cfg.out);
    let cfg = settle_config(cfg, resume)?;
    let device = cfg.device.open()?;

    // Data: prepared (or reused) inside the run directory.
    let text = TextSide::load(&cfg.model)?;
    let prepared = data::prepare_cached(
        &cfg.prepare_options()?,
        &cfg.model,
        &text,
        &cfg.out.join("data"),
    )?;
    let train_file = prepared.split("train")?;
    let val_file = prepared.split("validation")?;
    if train_file.sequences() == 0 {
        return Err(Error::Data("the training split is empty".into()));
    }

    let mut model = Model::load_with(&cfg.model, &device, cfg.held_base()?)?;
    model.transformer.bf16_compute = cfg.compute.bf16();
    // One line saying what runs, so a log tells which arithmetic produced its losses.
    eprintln!(
        "base held as {}; its products in {} (compute = \"{}\"){}",
        crate::model::weights::held_summary(&model.transformer.held_formats()),
        crate::model::ops::matmul_kernel(model.transformer.bf16_compute),
        cfg.compute,
        if cfg.gradient_checkpointing {
            "; gradient checkpointing"
        } else {
            ""
        }
    );
    let base_model = model.source.path().display().to_string();
    let adam = AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(choose_trainables(&cfg, &mut model)?, adam)?;

    let steps_per_epoch = train_file
        .sequences()
        .div_ceil(cfg.batch_size * cfg.grad_accum);
    let passes = cfg.passes(steps_per_epoch);
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        passes * steps_per_epoch
    };
    let peak_lr = cfg.learning_rate(model.config().parameter_count());
    eprintln!(
        "{}",
        schedule_line(
            &cfg,
            steps_per_epoch,
            passes,
            total_steps,
            peak_lr,
            model.config()
        )
    );
    if let Some(w) = undertraining_warning(&cfg, train_file.sequences(), total_steps) {
        eprintln!("{w}");
    }

    let metrics_path = cfg.out.join("metrics.jsonl");
    let (state, history) = if resume {
        restore(&cfg.out, &metrics_path, &base_model, &mut opt)?
    } else {
        (fresh_state(&base_model), Vec::new())
    };
    Ok(Run {
        order: epoch_order(train_file.sequences(), cfg.seed, state.epoch),
        start: Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_s),
        last_loss: f64::NAN,
        last_val: state.best_val_loss,
        metrics: MetricsLog::create(metrics_path, history)?,
        lock,
        cfg,
        model,
        base_model,
        opt,
        train_file,
        val_file,
        state,
        total_steps,
        peak_lr,
        warned_overfit: false,
    })
}

/// The run's length and learning rate, saying which were picked by "auto", e.g. "schedule: 5
/// passes (auto: ≥ 150 steps, ≤ 5 passes) × 34 steps = 170 optimizer steps of 1 × 512 tokens;
/// lr 1e-3 (auto: LoRA, model under 1B parameters), cosine, 10 warm-up steps".
fn schedule_line(
    cfg: &TrainConfig,
    steps_per_epoch: usize,
    passes: usize,
    total_steps: usize,
    lr: f64,
    model: &crate::model::ModelConfig,
) -> String {
    let length = if cfg.max_steps > 0 {
        format!("{total_steps} optimizer steps (max_steps; an epoch is {steps_per_epoch})")
    } else {
        let why = match cfg.epochs.set() {
            Some(_) => String::new(),
            None => format!(" (auto: ≥ {AUTO_MIN_STEPS} steps, ≤ {AUTO_MAX_EPOCHS} passes)"),
        };
        format!(
            "{passes} pass{}{why} × {steps_per_epoch} steps = {total_steps} optimizer steps",
            if passes == 1 { "" } else { "es" }
        )
    };
    let lr_why = match cfg.lr.set() {
        Some(_) => String::new(),
        None => format!(
            " (auto: {})",
            TrainConfig::auto_lr(cfg.method, model.parameter_count()).1
        ),
    };
    format!(
        "schedule: {length} of {} × {} tokens; lr {lr:e}{lr_why}, {}, {} warm-up steps",
        cfg.batch_size * cfg.grad_accum,
        cfg.max_seq_len,
        format!("{:?}", cfg.schedule).to_lowercase(),
        cfg.warmup(total_steps)
    )
}

/// Below this many optimizer steps a run is likely to learn little (the recipe study in
/// `bench/recipes/`: a packed epoch of a few thousand short examples is only ~75 steps).
pub const FEW_STEPS: usize = 100;

/// A warning, with the change to make, when the run is likely under-trained: its epochs come to
/// fewer than [`FEW_STEPS`] optimizer steps.
pub fn undertraining_warning(
    cfg: &TrainConfig,
    sequences: usize,
    total_steps: usize,
) -> Option<String> {
    // An explicit max_steps or time budget is the user's own choice of length.
    if total_steps >= FEW_STEPS || cfg.max_steps > 0 || cfg.max_minutes > 0.0 {
        return None;
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let fix = if sequences.div_ceil(per_step) * AUTO_MAX_EPOCHS >= FEW_STEPS
        && cfg.epochs.set().is_some()
    {
        "set epochs = \"auto\" (more passes over this small dataset)".to_string()
    } else if cfg.batch_size > 1 {
        format!(
            "lower batch_size (now {}) for more, smaller steps, or add data",
            cfg.batch_size
        )
    } else {
        format!(
            "lower max_seq_len (now {}) for more, smaller steps, or add data",
            cfg.max_seq_len
        )
    };
    Some(format!(
        "warning: only {total_steps} optimizer steps ({sequences} packed sequences, {per_step} per \
         step): the model may learn little; {fix}"
    ))
}

/// A warning when validation loss has risen above its best for two evaluations in a row: the
/// model is memorising the training data. Says which step was best and how to stop there.
pub fn overfitting_warning(history: &[Metrics]) -> Option<String> {
    let vals: Vec<(usize, f64)> = history
        .iter()
        .filter_map(|m| m.val_loss.map(|v| (m.step, v)))
        .collect();
    let (best_step, best) = vals.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))?;
    let n = vals.len();
    if n < 3 || best_step >= vals[n - 2].0 {
        return None;
    }
    let (last_step, last) = vals[n - 1];
    let rising = vals[n - 1].1 > vals[n - 2].1 && vals[n - 2].1 > best;
    (rising && last > best * 1.01).then(|| {
        format!(
            "warning: validation loss rose from {best:.4} (step {best_step}) to {last:.4} (step \
             {last_step}): the model is over-fitting; train for about {best_step} steps \
             (max_steps = {best_step}), fewer epochs, or set early_stopping_patience = 2"
        )
    })
}

/// The configuration this run uses, written to `out/config.toml`. A resume must agree with the
/// saved configuration on every key that shapes the model, the data or the batch order, and
/// keeps the step count a time budget was turned into.
fn settle_config(cfg: &TrainConfig, resume: bool) -> Result<TrainConfig> {
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
    crate::fs::write_atomic(&config_path, cfg.to_toml().as_bytes())?;
    Ok(cfg)
}

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

/// Phase 2: what trains — LoRA adapters attached to the frozen model, or every weight
/// unfrozen. Returns (name, variable, takes weight decay).
fn choose_trainables(cfg: &TrainConfig, model: &mut Model) -> Result<Vec<(String, Var, bool)>> {
    match cfg.method {
        Method::Lora => {
            let spec = lora::LoraSpec {
                rank: cfg.lora_rank,
                alpha: cfg.lora_alpha,
                rslora: cfg.rslora,
                dropout: cfg.lora_dropout as f32,
                targets: cfg.targets(),
            };
            Ok(
                lora::attach(&mut model.transformer, &spec, lora::kaiming_a(cfg.seed))?
                    .into_iter()
                    .map(|(n, v)| (n, v, true))
                    .collect(),
            )
        }
        Method::Full => unfreeze_all(&mut model.transformer),
    }
}

fn fresh_state(base_model: &str) -> TrainState {
    TrainState {
        step: 0,
        epoch: 0,
        position: 0,
        best_val_loss: None,
        evals_without_improvement: 0,
        tokens_seen: 0,
        elapsed_s: 0.0,
        base_model: base_model.to_string(),
    }
}

/// The newest complete checkpoint's state (weights and moments go into `opt`) and the metrics
/// up to it; the steps after it are redone.
fn restore(
    out: &Path,
    metrics_path: &Path,
    base_model: &str,
    opt: &mut AdamW,
) -> Result<(TrainState, Vec<Metrics>)> {
    let ckpt = checkpoint::list(out)?.pop().ok_or_else(|| {
        Error::Resume(format!(
            "cannot resume {}: it has no complete checkpoint",
            out.display()
        ))
    })?;
    let state = checkpoint::load(&ckpt, opt)?;
    if state.base_model != base_model {
        return Err(Error::Resume(format!(
            "cannot resume: the run was trained on {} but the model is now {base_model}",
            state.base_model
        )));
    }
    let history = std::fs::read_to_string(metrics_path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
                .filter(|m| m.step <= state.step)
                .collect()
        })
        .unwrap_or_default();
    eprintln!("resuming {} from step {}", out.display(), state.step);
    Ok((state, history))
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

/// Phase 3: the sequences of this step, `grad_accum` micro-batches of `batch_size`, crossing
/// into the next epoch (and its order) when this one runs out.
pub fn next_micro_batches(run: &mut Run) -> Vec<Vec<usize>> {
    let (batch_size, grad_accum) = (run.cfg.batch_size, run.cfg.grad_accum);
    let mut micro = Vec::with_capacity(grad_accum);
    for _ in 0..grad_accum {
        let mut seqs = Vec::with_capacity(batch_size);
        while seqs.len() < batch_size {
            if run.state.position >= run.order.len() {
                run.state.epoch += 1;
                run.state.position = 0;
                run.order = epoch_order(run.train_file.sequences(), run.cfg.seed, run.state.epoch);
            }
            seqs.push(run.order[run.state.position]);
            run.state.position += 1;
        }
        micro.push(seqs);
    }
    micro
}

/// This step's LoRA dropout key: a function of (seed, step), so a resumed run draws the same
/// masks.
pub fn dropout_key(run: &Run) -> u64 {
    crate::rng::stable_hash(&(run.state.step as u64).to_le_bytes(), run.cfg.seed)
}

/// The learning rate of the step about to be taken.
pub fn learning_rate(run: &Run) -> f64 {
    let c = &run.cfg;
    optim::lr_at(
        run.state.step,
        run.total_steps,
        c.warmup(run.total_steps),
        run.peak_lr,
        c.min_lr.min(run.peak_lr),
        c.schedule,
    )
}

/// A NaN or infinite loss, or one that has grown by orders of magnitude (a hundredfold over
/// the lowest so far, or three times what guessing uniformly over the vocabulary costs), ends
/// the run before the update, naming the step and where the last checkpoint is.
pub fn check_loss(run: &Run, loss: f64) -> Result<()> {
    let where_ = || {
        format!(
            "The last good checkpoint (if any) is in {}",
            run.out().join("checkpoints").display()
        )
    };
    let step = run.state.step + 1;
    if !loss.is_finite() {
        return Err(Error::Training(format!(
            "loss is {loss} at step {step}; stopping. {}",
            where_()
        )));
    }
    let lowest = run
        .metrics
        .history
        .iter()
        .map(|m| m.loss)
        .filter(|l| l.is_finite())
        .fold(f64::INFINITY, f64::min);
    let uniform = (run.model.config().vocab_size.max(2) as f64).ln();
    if (lowest.is_finite() && loss > 100.0 * lowest.max(1e-3)) || loss > 3.0 * uniform {
        return Err(Error::Training(format!(
            "loss {loss:.3} at step {step} has diverged (lowest so far {lowest:.3}; a uniform \
             guess costs {uniform:.2}); stopping — lower lr or raise warmup_steps. {}",
            where_()
        )));
    }
    Ok(())
}

/// Phase 4: after the probe steps, turns a `max_minutes` budget into a step count, leaving
/// room for validations and checkpoints, and records it as `max_steps` in config.toml so a
/// resume follows the same schedule. Returns whether the total changed.
pub fn fit_time_budget(run: &mut Run) -> Result<bool> {
    if !(run.cfg.max_minutes > 0.0 && run.state.step == BUDGET_PROBE_STEPS.min(run.total_steps)) {
        return Ok(false);
    }
    let per_step = run.start.elapsed().as_secs_f64() / run.state.step as f64;
    let fits = (run.cfg.max_minutes * 60.0 * 0.92 / per_step) as usize;
    run.total_steps = run.total_steps.min(fits.max(run.state.step));
    run.cfg.max_steps = run.total_steps;
    run.cfg.max_minutes = 0.0;
    crate::fs::write_atomic(&run.out().join("config.toml"), run.cfg.to_toml().as_bytes())?;
    Ok(true)
}

/// What the bookkeeping after a step decided.
pub struct AfterStep {
    /// The validation loss, when this step validated.
    pub val_loss: Option<f64>,
    /// Early stopping: validation has not improved for `early_stopping_patience` evaluations.
    pub stop: bool,
    /// A warning to print (over-fitting), at most once per run.
    pub warning: Option<String>,
}

/// Phase 5: bookkeeping after a step — validation (every `eval_every` steps and at the end),
/// the metrics line, the loss plot, the early-stopping test and the checkpoint.
pub fn after_step(run: &mut Run, step: &StepOutcome) -> Result<AfterStep> {
    let cfg = &run.cfg;
    let state = &mut run.state;
    run.last_loss = step.loss;
    let is_last = state.step == run.total_steps;
    let mut val_loss = None;
    let mut warning = None;
    if (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) || is_last {
        val_loss = split_loss(
            &run.model.transformer,
            &run.val_file,
            cfg.batch_size,
            cfg.eval_batches,
        )?;
        if let Some(v) = val_loss {
            run.last_val = Some(v);
            if state.best_val_loss.is_none_or(|b| v < b) {
                state.best_val_loss = Some(v);
                state.evals_without_improvement = 0;
            } else {
                state.evals_without_improvement += 1;
            }
        }
    }
    state.elapsed_s = run.start.elapsed().as_secs_f64();
    run.metrics.push(Metrics {
        step: state.step,
        loss: step.loss,
        val_loss,
        lr: step.lr,
        grad_norm: step.grad_norm,
        tokens_per_sec: step.tokens_per_sec,
        elapsed_s: state.elapsed_s,
    })?;
    if val_loss.is_some() {
        let _ = plot::loss_curve(&cfg.out.join("loss.png"), &run.metrics.history);
        if !run.warned_overfit {
            if let Some(w) = overfitting_warning(&run.metrics.history) {
                run.warned_overfit = true;
                warning = Some(w);
            }
        }
    }
    let stop = cfg.early_stopping_patience > 0
        && state.evals_without_improvement >= cfg.early_stopping_patience;
    if (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every)) || is_last || stop {
        checkpoint::save(&cfg.out, &run.opt, state, cfg.keep_checkpoints)?;
    }
    Ok(AfterStep {
        val_loss,
        stop,
        warning,
    })
}

/// Phase 6: the result — a PEFT adapter in `out/adapter`, or a full Hugging Face model
/// directory in `out/model`. Returns its path.
pub fn write_output(run: &Run) -> Result<PathBuf> {
    let cfg = &run.cfg;
    match cfg.method {
        Method::Lora => {
            let dir = cfg.out.join("adapter");
            let arch = run.model.config().architecture;
            let vars: Vec<(String, Var)> = run
                .opt
                .params
                .iter()
                .map(|p| (p.name.clone(), p.var.clone()))
                .collect();
            let acfg = AdapterConfig {
                lora_dropout: cfg.lora_dropout,
                use_rslora: cfg.rslora,
                base_model_name_or_path: Some(run.base_model.clone()),
                ..AdapterConfig::lora(
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    lora::attached_modules(arch, &vars),
                )
            };
            peft::save(&dir, arch, &acfg, &vars)?;
            Ok(dir)
        }
        Method::Full => {
            let dir = cfg.out.join("model");
            crate::export::hf::save(&dir, &run.model)?;
            Ok(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: usize, val_loss: Option<f64>) -> Metrics {
        Metrics {
            step,
            loss: 1.0,
            val_loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_sec: 1.0,
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn few_steps_warn_with_the_change_to_make() {
        let cfg = TrainConfig::load(None, &["data=x".into(), "epochs=1".into()]).unwrap();
        // 3,000 short examples packed into 75 sequences of 512: 75 steps at batch 1.
        let w = undertraining_warning(&cfg, 75, 75).unwrap();
        assert!(w.contains("only 75 optimizer steps"), "{w}");
        assert!(w.contains("epochs = \"auto\""), "{w}");
        // Data so small that AUTO_MAX_EPOCHS passes stay short: smaller steps or more data.
        let w = undertraining_warning(&cfg, 15, 15).unwrap();
        assert!(w.contains("lower max_seq_len (now 512)"), "{w}");
        let b4 = TrainConfig::load(None, &["data=x".into(), "batch_size=4".into()]).unwrap();
        let w = undertraining_warning(&b4, 40, 10).unwrap();
        assert!(w.contains("lower batch_size (now 4)"), "{w}");
        assert_eq!(undertraining_warning(&cfg, 1000, FEW_STEPS), None);
        // max_steps or a time budget set the length on purpose: no warning.
        let steps = TrainConfig::load(None, &["data=x".into(), "max_steps=20".into()]).unwrap();
        assert_eq!(undertraining_warning(&steps, 1000, 20), None);
        let budget = TrainConfig::load(None, &["data=x".into(), "max_minutes=5".into()]).unwrap();
        assert_eq!(undertraining_warning(&budget, 20, 10), None);
    }

    #[test]
    fn validation_loss_rising_twice_past_its_best_warns_once_it_happens() {
        let h = |vals: &[(usize, f64)]| -> Vec<Metrics> {
            vals.iter().map(|&(s, v)| metrics(s, Some(v))).collect()
        };
        // Falling, or one noisy rise: nothing.
        assert_eq!(
            overfitting_warning(&h(&[(50, 2.0), (100, 1.5), (150, 1.2)])),
            None
        );
        assert_eq!(
            overfitting_warning(&h(&[(50, 2.0), (100, 1.5), (150, 1.6)])),
            None
        );
        // Two rises in a row past the best, by more than 1 %.
        let mut hist = h(&[(50, 2.0), (100, 1.5), (150, 1.6), (200, 1.8)]);
        hist.insert(1, metrics(75, None));
        let w = overfitting_warning(&hist).unwrap();
        assert!(
            w.contains("from 1.5000 (step 100) to 1.8000 (step 200)"),
            "{w}"
        );
        assert!(w.contains("max_steps = 100"), "{w}");
        // Rising, but still within 1 % of the best: noise.
        assert_eq!(
            overfitting_warning(&h(&[(50, 1.5), (100, 1.502), (150, 1.505)])),
            None
        );
    }
}
