//! Step 5 of the pipeline: fine-tuning. `train()` reads top to bottom: open (or resume) the
//! run — data, model, what trains, optimiser — then for each step: micro-batches, loss
//! normalised over the whole accumulated batch, backward, the optimiser step, the time budget,
//! bookkeeping (validation, metrics, plot, early stop, checkpoint); then the output. The phases
//! are plain functions in [`run`]; the gradients and the optimiser step are here.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod lock;
pub mod lora;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod run;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, Var, D};
use serde::Serialize;

use crate::data::cache::TokenFile;
use crate::model::Transformer;
use crate::model::Weight;
use crate::{Error, Result};
pub use config::{Compute, LoraTargets, Method, TrainConfig};
use optim::AdamW;
use progress::Progress;

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

/// The loss of batch `b` divided by `denom`, and the gradient of each of `vars` (LoRA
/// matrices; `None` for a variable outside the layers), computed with activation
/// checkpointing: a forward pass without a graph keeps each layer's input; the head's loss is
/// differentiated with respect to the last one; then, from the top, each layer is run again
/// from its saved input with a graph and differentiated against the gradient arriving from
/// above (the gradient of Σ layer(x) ⊙ g), which gives its variables' gradients and the
/// gradient passed down. LoRA dropout masks are a function of (key, adapter), so the rerun
/// draws the same ones.
pub fn checkpointed_gradients(
    model: &Transformer,
    b: &batch::Batch,
    denom: usize,
    vars: &[&Var],
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let (mut x, ctx) = model.layer_inputs(&b.ids, &b.positions, &b.mask)?;
    x = x.detach();
    let mut inputs = Vec::with_capacity(model.layers.len());
    for i in 0..model.layers.len() {
        let next = model.layer(i, &x, &ctx)?.detach();
        inputs.push(std::mem::replace(&mut x, next));
    }
    let mut found: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut collect = |store: &candle_core::backprop::GradStore| {
        for (slot, v) in found.iter_mut().zip(vars) {
            if let Some(g) = store.get(v.as_tensor()) {
                *slot = Some(g.clone());
            }
        }
    };
    // The head: loss of the final hidden states, differentiated with respect to them.
    let top = Var::from_tensor(&x)?;
    let picked = model
        .final_norm(top.as_tensor())?
        .index_select(&b.target_positions, 0)?;
    let loss = (model.head_nll(&picked, &b.targets, true)?.sum_all()? / denom as f64)?;
    let store = loss.backward()?;
    collect(&store);
    let mut g = store
        .get(top.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Training("checkpointing: no gradient reached the head".into()))?;
    for (i, input) in inputs.iter().enumerate().rev() {
        let xv = Var::from_tensor(input)?;
        let y = model.layer(i, xv.as_tensor(), &ctx)?;
        let store = (y * &g)?.sum_all()?.backward()?;
        collect(&store);
        g = store.get(xv.as_tensor()).cloned().ok_or_else(|| {
            Error::Training(format!("checkpointing: no gradient reached layer {i}"))
        })?;
    }
    Ok((loss.to_scalar::<f32>()? as f64, found))
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

/// Runs training. With `resume`, `cfg` must agree with the run's saved configuration on every
/// key that shapes the model, the data or the order of batches.
pub fn train(cfg: &TrainConfig, resume: bool, show_progress: bool) -> Result<TrainSummary> {
    let mut run = run::open(cfg, resume)?;
    let mut progress = Progress::new(
        run.total_steps,
        run.state.step,
        show_progress,
        run.cfg.log_every,
    );
    let mut stopped_early = false;
    while run.state.step < run.total_steps {
        let step_start = Instant::now();
        let micro = run::next_micro_batches(&mut run);
        let (grads, loss, tokens) = step_gradients(
            &run.model.transformer,
            &run.opt,
            &run.train_file,
            &micro,
            run::dropout_key(&run),
            run.cfg.gradient_checkpointing,
        )?;
        run::check_loss(&run, loss)?;
        let lr = run::learning_rate(&run);
        let grad_norm = optimiser_step(
            &mut run.opt,
            grads,
            lr,
            run.cfg.max_grad_norm,
            run.state.step + 1,
        )?;
        run.state.step += 1;
        run.state.tokens_seen += tokens as u64;
        if run::fit_time_budget(&mut run)? {
            progress.set_total(run.total_steps);
        }
        let tokens_per_sec = tokens as f64 / step_start.elapsed().as_secs_f64();
        let outcome = run::StepOutcome {
            loss,
            lr,
            grad_norm,
            tokens_per_sec,
        };
        let after = run::after_step(&mut run, &outcome)?;
        progress.step(run.state.step, loss, lr, tokens_per_sec, run.last_val);
        if let Some(w) = after.warning {
            progress.println(w);
        }
        if after.stop {
            stopped_early = true;
            progress.println(format!(
                "early stop at step {}: validation loss has not improved for {} evaluations",
                run.state.step, run.state.evals_without_improvement
            ));
            break;
        }
    }
    progress.finish();
    Ok(TrainSummary {
        steps: run.state.step,
        final_loss: run.last_loss,
        final_val_loss: run.last_val,
        output: run::write_output(&run)?,
        tokens_per_sec: run.state.tokens_seen as f64 / run.state.elapsed_s.max(1e-9),
        stopped_early,
    })
}

/// The optimiser step: the one place that sees every gradient of the step — clipped to the
/// global norm, then AdamW. Returns the norm before clipping (0 when no micro-batch had a
/// target and nothing was updated).
fn optimiser_step(
    opt: &mut AdamW,
    grads: Option<Vec<Tensor>>,
    lr: f64,
    max_grad_norm: f64,
    step: usize,
) -> Result<f64> {
    let Some(mut grads) = grads else {
        return Ok(0.0);
    };
    // Data-parallel training would all-reduce (NCCL) `grads` across devices here.
    let norm = optim::clip_grad_norm(&mut grads, max_grad_norm)?;
    if !norm.is_finite() {
        // Checked before the update, so the weights (and the last checkpoint) stay finite.
        return Err(Error::Training(format!(
            "the gradient norm is {norm} at step {step}; stopping before the update (lower lr, \
             or check the data). The last checkpoint is intact"
        )));
    }
    opt.step(&grads, lr)?;
    Ok(norm)
}

/// Gradients of one optimiser step over `micro` batches (lists of sequence indices), in the
/// order of `opt.params`, with the loss normalised by the label tokens of the whole accumulated
/// batch — so N micro-batches give exactly the gradient of one batch N times larger. Returns
/// (gradients, loss, tokens); gradients are `None` when no micro-batch has a target.
/// `dropout_key` seeds this step's LoRA dropout masks (0 = no dropout).
/// With `checkpointing`, each micro-batch keeps only the layers' inputs and recomputes one
/// layer at a time in the backward ([`checkpointed_gradients`]): the same gradients for a
/// third more compute and one layer's activations instead of all of them.
pub fn step_gradients(
    model: &Transformer,
    opt: &AdamW,
    file: &TokenFile,
    micro: &[Vec<usize>],
    dropout_key: u64,
    checkpointing: bool,
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
        let vars: Vec<&Var> = opt.params.iter().map(|p| &p.var).collect();
        let (loss, found) = if checkpointing {
            checkpointed_gradients(model, &b, denom, &vars)?
        } else {
            let loss = (batch_nll(model, &b, true)? / denom as f64)?;
            let store = loss.backward()?;
            let found = vars
                .iter()
                .map(|v| store.get(v.as_tensor()).cloned())
                .collect();
            (loss.to_scalar::<f32>()? as f64, found)
        };
        loss_sum += loss;
        let g: Vec<Tensor> = found
            .into_iter()
            .zip(&opt.params)
            .map(|(g, p)| {
                g.ok_or_else(|| {
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

/// Turns every weight into a variable for full fine-tuning; weight decay skips norms and biases.
/// Every matrix must be f32 (a packed base has no master weights to update).
pub fn unfreeze_all(m: &mut Transformer) -> Result<Vec<(String, Var, bool)>> {
    let mut out = Vec::new();
    let mut var = |name: String, t: &mut Tensor, decay: bool| -> Result<()> {
        let v = Var::from_tensor(t)?;
        *t = v.as_tensor().clone();
        out.push((name, v, decay));
        Ok(())
    };
    let dense = |name: &str, w: &mut Weight| -> Result<Tensor> {
        match w {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Packed(_) => Err(crate::Error::Config(format!(
                "full fine-tuning updates every weight and needs them in f32, but {name} is held as {}; \
                 load the base with base_dtype = \"f32\" (or train a LoRA, which works over any base)",
                w.format()
            ))),
        }
    };
    let mut vars_of = |name: String, w: &mut Weight, decay: bool| -> Result<()> {
        let mut t = dense(&name, w)?;
        var(name, &mut t, decay)?;
        *w = Weight::Dense(t);
        Ok(())
    };
    vars_of(
        "model.embed_tokens.weight".into(),
        &mut m.embed_tokens,
        true,
    )?;
    if let Some(h) = m.lm_head.as_mut() {
        vars_of("lm_head.weight".into(), h, true)?;
    }
    for (name, lin) in m.linears_mut() {
        vars_of(format!("{name}.weight"), &mut lin.weight, true)?;
    }
    for (name, t) in m.final_norms_mut() {
        var(name.into(), t, false)?;
    }
    for (i, l) in m.layers.iter_mut().enumerate() {
        for (name, t) in l.norms_mut() {
            var(format!("model.layers.{i}.{name}"), t, false)?;
        }
    }
    for (name, lin) in m.linears_mut() {
        if let Some(b) = lin.bias.as_mut() {
            var(format!("{name}.bias"), b, false)?;
        }
    }
    Ok(out)
}
