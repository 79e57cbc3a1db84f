//! What an export knows about the training run behind it (`RUN/config.toml`,
//! `RUN/metrics.jsonl`, `RUN/eval.json` beside `RUN/adapter` or `RUN/model`) and the short
//! model card (`README.md`) written with a merged Hugging Face export.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ExportRequest;
use crate::model::{Message, TextSide};
use crate::train::TrainConfig;

/// The parts of a training run an export reports or needs.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub dir: PathBuf,
    /// The default system message training used (the run's `system` key), if any.
    pub system: Option<String>,
    pub base_model: Option<String>,
    pub method: Option<String>,
    pub data: Vec<PathBuf>,
    pub steps: Option<u64>,
    pub final_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// `RUN/eval.json` as written by `afinar eval` / the quickstart.
    pub eval: Option<serde_json::Value>,
}

impl RunInfo {
    /// The run whose output is `adapter` (or, for full fine-tuning, the model directory
    /// `model`): the parent folder when it holds a `config.toml`. None for a plain model.
    pub fn find(adapter: Option<&Path>, model: &str) -> Option<RunInfo> {
        let output = adapter.unwrap_or(Path::new(model));
        let dir = output.parent()?;
        let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
        let cfg: toml::Value = toml::from_str(&text).ok()?;
        let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let mut info = RunInfo {
            dir: dir.to_path_buf(),
            system: s("system").filter(|s| !s.is_empty()),
            base_model: s("model"),
            method: s("method"),
            data: cfg
                .get("data")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(PathBuf::from))
                        .collect()
                })
                .unwrap_or_default(),
            ..RunInfo::default()
        };
        if let Ok(m) = std::fs::read_to_string(dir.join("metrics.jsonl")) {
            let rows: Vec<serde_json::Value> = m
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            info.steps = rows.last().and_then(|r| r["step"].as_u64());
            info.final_loss = rows.last().and_then(|r| r["loss"].as_f64());
            info.final_val_loss = rows.iter().rev().find_map(|r| r["val_loss"].as_f64());
        }
        info.eval = std::fs::read_to_string(dir.join("eval.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        Some(info)
    }
}

impl RunInfo {
    /// Up to `n` conversations of the run's test split (prepared as training prepared them, from
    /// the run's own data cache `RUN/data`), for the token-identity check. None when the run's
    /// data is not readable from here or its test split has no chat examples.
    pub fn test_probes(&self, n: usize) -> Option<Vec<Vec<Message>>> {
        let cfg = TrainConfig::load(Some(&self.dir.join("config.toml")), &[]).ok()?;
        let prep = cfg.prepare_options().ok()?;
        let text = TextSide::load(&cfg.model).ok()?;
        let prepared =
            crate::data::prepare_cached(&prep, &cfg.model, &text, &self.dir.join("data")).ok()?;
        let probes: Vec<Vec<Message>> = prepared
            .eval_examples("test")
            .ok()?
            .into_iter()
            .filter(|e| !e.messages.is_empty())
            .take(n)
            .map(|e| e.messages)
            .collect();
        (!probes.is_empty()).then_some(probes)
    }
}

/// SHA-256 of a file, hex; None when it cannot be read.
fn sha256_file(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(format!("{:x}", h.finalize()))
}

/// The model card: base, adapter, data files with their hashes, steps, final losses, and the
/// eval table when the run has one.
pub fn model_card(req: &ExportRequest, run: Option<&RunInfo>) -> String {
    let mut c = String::from("---\nlibrary_name: transformers\ntags: [afinar");
    c += if req.adapter.is_some() {
        ", lora, merged]\n"
    } else {
        "]\n"
    };
    c += "---\n\n# Fine-tuned with afinar\n\n";
    let base = run
        .and_then(|r| r.base_model.clone())
        .unwrap_or_else(|| req.model.clone());
    c += &format!("- Base model: `{base}`\n");
    if let Some(a) = &req.adapter {
        c += &format!(
            "- LoRA adapter `{}`, merged into the weights (W + s·B·A in f32)\n",
            a.display()
        );
    }
    if let Some(r) = run {
        if let Some(m) = &r.method {
            c += &format!("- Method: {m}\n");
        }
        if let Some(s) = r.steps {
            c += &format!("- Steps: {s}\n");
        }
        if let Some(l) = r.final_loss {
            c += &format!("- Final training loss: {l:.4}\n");
        }
        if let Some(l) = r.final_val_loss {
            c += &format!("- Final validation loss: {l:.4}\n");
        }
        if let Some(s) = &r.system {
            c += &format!("- System message used in training: {s:?}\n");
        }
        if !r.data.is_empty() {
            c += "\n## Data\n\n| file | sha256 |\n|---|---|\n";
            for d in &r.data {
                let hash = sha256_file(d).unwrap_or_else(|| "(not readable here)".into());
                c += &format!("| `{}` | `{hash}` |\n", d.display());
            }
        }
        if let Some(table) = r.eval.as_ref().and_then(eval_table) {
            c += "\n## Evaluation\n\n";
            c += &table;
        }
    }
    c += "\nStops at the chat's end-of-turn token (see `generation_config.json`). Written by `afinar export --to hf`.\n";
    c
}

/// A Markdown table of the metrics in `eval.json` (as `afinar eval --json` and the quickstart
/// write it: `{"base": {"metrics": …}, "tuned": {…}}`, or `{"metrics": …}` for one model).
fn eval_table(eval: &serde_json::Value) -> Option<String> {
    let root = eval.as_object()?;
    let rows: Vec<(String, &serde_json::Map<String, serde_json::Value>)> =
        match root.get("metrics").and_then(|m| m.as_object()) {
            Some(m) => vec![("model".to_string(), m)],
            None => root
                .iter()
                .filter_map(|(label, v)| Some((label.clone(), v.get("metrics")?.as_object()?)))
                .collect(),
        };
    let mut cols: Vec<&String> = Vec::new();
    for (_, metrics) in &rows {
        for (k, v) in *metrics {
            if v.is_number() && !cols.contains(&k) {
                cols.push(k);
            }
        }
    }
    if cols.is_empty() {
        return None;
    }
    let names: Vec<&str> = cols.iter().map(|c| c.as_str()).collect();
    let mut t = format!(
        "| model | {} |\n|---|{}\n",
        names.join(" | "),
        "---|".repeat(cols.len())
    );
    for (label, metrics) in &rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|k| {
                metrics
                    .get(k.as_str())
                    .and_then(|v| v.as_f64())
                    .map_or(String::new(), |v| format!("{v:.4}"))
            })
            .collect();
        t += &format!("| {label} | {} |\n", cells.join(" | "));
    }
    Some(t)
}
