//! Checkpoints that survive a crash: everything is written into a temporary directory, fsynced,
//! then renamed into place, so a kill at any moment leaves either the old set or the new one.
//! A checkpoint holds the trainable weights, the AdamW moments, and the loop state (step, data
//! position, best validation loss), enough to resume bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use crate::{Error, Result};

/// The loop's position and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    pub epoch: usize,
    /// Index of the next sequence in this epoch's order.
    pub position: usize,
    pub best_val_loss: Option<f64>,
    pub evals_without_improvement: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// The base model this run adapts (its source path).
    pub base_model: String,
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Removes temporary checkpoint directories a killed or failed save left behind (the caller
/// holds the run's lock, so none belongs to a live process).
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".tmp") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Writes checkpoint `step` under `dir/checkpoints/`, then keeps only the newest `keep`. A
/// failed write removes its temporary directory; a full disk says so.
pub fn save(dir: &Path, opt: &AdamW, state: &TrainState, keep: usize) -> Result<PathBuf> {
    let root = dir.join("checkpoints");
    let final_dir = root.join(format!("step-{:07}", state.step));
    save_into(&root, opt, state, keep, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(root.join(tmp_name(state.step)));
        let text = e.to_string();
        if text.contains("os error 28") || text.contains("No space left") {
            Error::Training(format!(
                "no space left on the device holding {} while writing checkpoint {}; free some \
                 space and --resume (the previous checkpoint is intact)",
                dir.display(),
                final_dir.display()
            ))
        } else {
            e
        }
    })
}

fn tmp_name(step: usize) -> String {
    format!(".step-{step:07}.tmp{}", std::process::id())
}

fn save_into(
    root: &Path,
    opt: &AdamW,
    state: &TrainState,
    keep: usize,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name = format!("step-{:07}", state.step);
    let tmp = root.join(tmp_name(state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    for p in &opt.params {
        weights.insert(p.name.clone(), p.var.as_tensor().clone());
        moments.insert(format!("m.{}", p.name), p.m.clone());
        moments.insert(format!("v.{}", p.name), p.v.clone());
    }
    moments.insert("t".into(), Tensor::new(&[opt.t as f64], &Device::Cpu)?);
    let files = [
        (tmp.join("trainable.safetensors"), weights),
        (tmp.join("optimizer.safetensors"), moments),
    ];
    for (path, tensors) in &files {
        candle_core::safetensors::save(tensors, path)?;
        fsync(path)?;
    }
    let state_path = tmp.join("state.json");
    let json = serde_json::to_string_pretty(state)?;
    std::fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
    fsync(&state_path)?;
    sync_dir(&tmp);
    let final_dir = root.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(root);
    let all = list(dir)?;
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first (temporary directories are ignored).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let root = dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(vec![]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Restores weights and moments into `opt` and returns the loop state.
pub fn load(ckpt: &Path, opt: &mut AdamW) -> Result<TrainState> {
    let state_path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, e.to_string()))?;
    let dev = opt
        .params
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(Device::Cpu);
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = ckpt.join(name);
        candle_core::safetensors::load(&p, &dev)
            .map_err(|e| Error::bad_file(&p, crate::error::candle_message(&e)))
    };
    let weights = read("trainable.safetensors")?;
    let moments = read("optimizer.safetensors")?;
    for p in opt.params.iter_mut() {
        let missing = |what: &str| {
            Error::bad_file(
                ckpt,
                format!(
                    "checkpoint has no {what} for '{}': it belongs to another configuration",
                    p.name
                ),
            )
        };
        let w = weights.get(&p.name).ok_or_else(|| missing("weights"))?;
        if w.dims() != p.var.dims() {
            return Err(Error::bad_file(
                ckpt,
                format!(
                    "'{}' has shape {:?} in the checkpoint, {:?} in this run",
                    p.name,
                    w.dims(),
                    p.var.dims()
                ),
            ));
        }
        p.var.set(w)?;
        p.m = moments
            .get(&format!("m.{}", p.name))
            .ok_or_else(|| missing("first moment"))?
            .clone();
        p.v = moments
            .get(&format!("v.{}", p.name))
            .ok_or_else(|| missing("second moment"))?
            .clone();
    }
    opt.t = moments
        .get("t")
        .map(|t| t.to_vec1::<f64>().map(|v| v[0] as u64))
        .transpose()?
        .unwrap_or(state.step as u64);
    Ok(state)
}
