//! Step 6 of the pipeline: evaluation. Loss and perplexity over the label tokens of a split
//! (templated exactly as in training), then greedy generations for the split's examples scored
//! against their references, for the base model and/or the base with an adapter.

pub mod metrics;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use unicode_script::Script;

use crate::data::{self, EvalExample, PrepareOptions, SplitFractions};
use crate::infer::batch::greedy_batch;
use crate::infer::scripts::{drift, ScriptFilter};
use crate::model::{Model, TextSide};
use crate::train::{split_loss, Metrics as TrainMetrics};
use crate::{Error, Result};
pub use metrics::Metric;

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: String,
    pub adapter: Option<PathBuf>,
    /// Data settings; the same as training's so the split and the templating match.
    pub prepare: PrepareOptions,
    /// The split of `prepare` to evaluate (`test`, `validation`, `train`), or `None` for every
    /// row of `prepare.data`: a file given for evaluation is evaluated whole, not cut by the
    /// training run's split fractions.
    pub split: Option<String>,
    pub metrics: Vec<Metric>,
    /// Generate for the first N examples of the split (0 = all). Loss covers the whole split.
    pub limit: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Evaluate the base model too, side by side with base + adapter.
    pub compare_base: bool,
    /// Restrict generated text to these scripts (plus Common and Inherited); empty = no limit.
    pub allowed_scripts: Vec<Script>,
    /// Directory for `examples.jsonl`.
    pub out: PathBuf,
    /// Prepared-data cache (a training run's `RUN/data` is reused when the settings match).
    pub data_dir: PathBuf,
    /// Where the models compute.
    pub device: crate::device::DeviceSpec,
    /// How the base's matrices are held (see [`crate::model::BaseDtype`]).
    pub base_dtype: crate::model::BaseDtype,
}

/// Script drift over a model's outputs: letters of scripts that appear in neither the prompt
/// nor the references.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriftSummary {
    /// Share of outputs with drift, in [0, 1].
    pub share: f64,
    pub outputs: usize,
    /// Outputs containing each drifted script.
    pub by_script: BTreeMap<String, usize>,
}

/// One model's results.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub model: String,
    pub adapter: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    /// What each metric was computed over (label tokens for loss, examples for the others).
    pub counts: BTreeMap<String, usize>,
    pub script_drift: DriftSummary,
    pub seconds: f64,
}

/// One evaluated example, with every model's output and scores.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleResult {
    pub location: String,
    /// The last user message (chat) or the raw prompt.
    pub prompt: String,
    pub references: Vec<String>,
    pub outputs: BTreeMap<String, String>,
    pub scores: BTreeMap<String, BTreeMap<String, f64>>,
    pub drift: BTreeMap<String, Vec<String>>,
}

/// A finished evaluation: results per label (`base`, `tuned`), the examples, and the training
/// curve when the adapter came from `afinar train`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub results: BTreeMap<String, Scores>,
    pub examples: Vec<ExampleResult>,
    pub settings: serde_json::Value,
    #[serde(skip)]
    pub training_curve: Vec<TrainMetrics>,
}

impl EvalReport {
    /// Puts two evaluations of the same examples side by side (the quickstart evaluates the
    /// base before training and the adapter after).
    pub fn merge(mut self, other: EvalReport) -> EvalReport {
        self.results.extend(other.results);
        for (a, b) in self.examples.iter_mut().zip(other.examples) {
            a.outputs.extend(b.outputs);
            a.scores.extend(b.scores);
            a.drift.extend(b.drift);
        }
        if let (Some(s), serde_json::Value::Object(o)) =
            (self.settings.as_object_mut(), other.settings)
        {
            if let Some(a) = o.get("adapter") {
                s.insert("adapter".into(), a.clone());
            }
        }
        if self.training_curve.is_empty() {
            self.training_curve = other.training_curve;
        }
        self
    }

    /// The JSON other tools read: `{"metrics": …}` for one model, `{"base": {…}, "tuned": {…}}`
    /// side by side; each with counts and script drift, plus the settings used.
    pub fn to_json(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        if self.results.len() == 1 {
            if let Some(s) = self.results.values().next() {
                if let serde_json::Value::Object(m) = serde_json::to_value(s).unwrap_or_default() {
                    root.extend(m);
                }
            }
        } else {
            for (label, s) in &self.results {
                root.insert(label.clone(), serde_json::to_value(s).unwrap_or_default());
            }
        }
        root.insert("settings".into(), self.settings.clone());
        serde_json::Value::Object(root)
    }
}

/// The training run an adapter directory belongs to (`RUN/adapter` → `RUN`), if it has one.
pub fn run_dir_of(adapter: &Path) -> Option<PathBuf> {
    let run = adapter.parent()?;
    run.join("config.toml").is_file().then(|| run.to_path_buf())
}

/// Turns an example into prompt tokens and the text shown in reports; `None` when the example
/// has no prompt (raw text).
fn prompt_of(model: &Model, ex: &EvalExample) -> Result<Option<(Vec<u32>, String)>> {
    if !ex.messages.is_empty() {
        let shown = ex
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or_else(String::new, |m| m.content.clone());
        return Ok(Some((model.encode_chat(&ex.messages, true)?, shown)));
    }
    if !ex.prompt.is_empty() {
        return Ok(Some((
            model.tokenizer.encode(&ex.prompt, true)?,
            ex.prompt.clone(),
        )));
    }
    Ok(None)
}

/// The name `settings.split` gives an evaluation of every row.
pub const ALL_ROWS: &str = "all";

/// The data settings to prepare and the split holding the rows to evaluate: for `split: None`,
/// every row of `prepare.data` goes to the test split (no fractions, no own val/test files).
fn rows_to_evaluate(opts: &EvalOptions) -> (PrepareOptions, &str) {
    match &opts.split {
        Some(name) => (opts.prepare.clone(), name.as_str()),
        None => (
            PrepareOptions {
                val: vec![],
                test: vec![],
                split_key: None,
                split: SplitFractions([0.0, 0.0, 1.0]),
                ..opts.prepare.clone()
            },
            "test",
        ),
    }
}

/// Runs the evaluation. `progress` receives one line per phase.
pub fn evaluate(opts: &EvalOptions, mut progress: impl FnMut(&str)) -> Result<EvalReport> {
    let device = opts.device.open()?;
    if let Some(name) = &opts.split {
        if !data::SPLITS.contains(&name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown split {name:?}; choose one of {}",
                data::SPLITS.join(", ")
            )));
        }
    }
    let (prepare, split_name) = rows_to_evaluate(opts);
    let text = TextSide::load(&opts.model)?;
    let prepared = data::prepare_cached(&prepare, &opts.model, &text, &opts.data_dir)?;
    let file = prepared.split(split_name)?;
    let mut examples = prepared.eval_examples(split_name)?;
    let sources = prepare
        .data
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // What is evaluated, in words, for the progress lines and errors.
    let what = match &opts.split {
        None => format!("every row of {sources}"),
        Some(name) => format!("the {name} split of {sources}"),
    };
    if file.sequences() == 0 || examples.is_empty() {
        return Err(Error::Data(match &opts.split {
            None => format!("{sources}: no example to evaluate"),
            Some(name) => format!(
                "the {name} split of {sources} is empty; give more data, a larger {name} \
                 fraction, or --data FILE alone to evaluate a whole file"
            ),
        }));
    }
    progress(&match &opts.split {
        None => format!("evaluating {what}: {} examples", examples.len()),
        Some(_) => {
            let [a, b, c] = prepare.split.0;
            let how = if prepare.val.is_empty() && prepare.test.is_empty() {
                format!("fractions {a}/{b}/{c}, seed {}", prepare.seed)
            } else {
                "own validation/test files".to_string()
            };
            format!(
                "evaluating {what}: {} of {} records ({how})",
                examples.len(),
                prepared.manifest.records
            )
        }
    });
    let split_examples = examples.len();
    examples.retain(|e| !e.references.is_empty());
    if opts.limit > 0 {
        examples.truncate(opts.limit);
    }

    let mut model = Model::load_with(&opts.model, &device, opts.base_dtype)?;
    let filter = (!opts.allowed_scripts.is_empty())
        .then(|| ScriptFilter::new(&model.tokenizer, opts.allowed_scripts.clone()));
    let mut prompts = Vec::new();
    let mut kept = Vec::new();
    for ex in &examples {
        if let Some((ids, shown)) = prompt_of(&model, ex)? {
            prompts.push(ids);
            kept.push((ex, shown));
        }
    }
    let wants_generation = opts.metrics.iter().any(|m| m.needs_generation());
    if wants_generation && kept.is_empty() {
        return Err(Error::Data(format!(
            "the {split_name} split of {sources} has no example with a prompt and a reference \
             (raw text?); use --metrics loss,perplexity"
        )));
    }
    let labels = metrics::label_set(kept.iter().flat_map(|(e, _)| e.references.iter()));

    let mut plan: Vec<(&str, bool)> = Vec::new();
    match (&opts.adapter, opts.compare_base) {
        (Some(_), true) => plan.extend([("base", false), ("tuned", true)]),
        (Some(_), false) => plan.push(("tuned", true)),
        (None, _) => plan.push(("base", false)),
    }
    let mut results = BTreeMap::new();
    let mut rows: Vec<ExampleResult> = kept
        .iter()
        .map(|(e, shown)| ExampleResult {
            location: e.location.clone(),
            prompt: shown.clone(),
            references: e.references.clone(),
            outputs: BTreeMap::new(),
            scores: BTreeMap::new(),
            drift: BTreeMap::new(),
        })
        .collect();
    for (label, with_adapter) in plan {
        let start = Instant::now();
        let mut adapter_name = None;
        if with_adapter {
            if let Some(dir) = &opts.adapter {
                crate::export::peft::load(dir, &mut model.transformer, &opts.model)?;
                adapter_name = Some(dir.display().to_string());
            }
        }
        let mut values = BTreeMap::new();
        let mut counts = BTreeMap::new();
        if opts
            .metrics
            .iter()
            .any(|m| matches!(m, Metric::Loss | Metric::Perplexity))
        {
            progress(&format!("{label}: loss over {what}"));
            let bs = opts.batch_size.clamp(1, 8);
            if let Some(loss) = split_loss(&model.transformer, &file, bs, 0)? {
                let all: Vec<usize> = (0..file.sequences()).collect();
                let tokens = crate::train::batch::count_targets(&file, &all);
                for m in &opts.metrics {
                    match m {
                        Metric::Loss => {
                            values.insert(m.name().to_string(), loss);
                            counts.insert(m.name().to_string(), tokens);
                        }
                        Metric::Perplexity => {
                            values.insert(m.name().to_string(), loss.exp());
                            counts.insert(m.name().to_string(), tokens);
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut drift_summary = DriftSummary::default();
        if wants_generation {
            let n = prompts.len();
            progress(&format!("{label}: generating for {n} examples"));
            let outs = greedy_batch(
                &model,
                &prompts,
                opts.max_new_tokens,
                opts.batch_size,
                filter.as_ref(),
                |done| progress(&format!("{label}: {done}/{n} generated")),
            )?;
            let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
            for (row, out) in rows.iter_mut().zip(&outs) {
                let refs = &row.references;
                let mut s = BTreeMap::new();
                for m in opts.metrics.iter().filter(|m| m.needs_generation()) {
                    let v = match m {
                        Metric::ExactMatch => metrics::exact_match(&out.text, refs),
                        Metric::Accuracy => metrics::accuracy(&out.text, refs, &labels),
                        Metric::Chrf => metrics::chrf(&out.text, refs),
                        Metric::RougeL => metrics::rouge_l(&out.text, refs),
                        Metric::Loss | Metric::Perplexity => continue,
                    };
                    *sums.entry(m.name()).or_default() += v;
                    s.insert(m.name().to_string(), v);
                }
                let mut context: Vec<&str> = vec![row.prompt.as_str()];
                context.extend(refs.iter().map(String::as_str));
                let d: Vec<String> = drift(&out.text, &context)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                for script in &d {
                    *drift_summary.by_script.entry(script.clone()).or_default() += 1;
                }
                if !d.is_empty() {
                    drift_summary.outputs += 1;
                }
                row.outputs.insert(label.to_string(), out.text.clone());
                row.scores.insert(label.to_string(), s);
                row.drift.insert(label.to_string(), d);
            }
            drift_summary.share = drift_summary.outputs as f64 / n.max(1) as f64;
            for (name, sum) in sums {
                values.insert(name.to_string(), sum / n as f64);
                counts.insert(name.to_string(), n);
            }
        }
        results.insert(
            label.to_string(),
            Scores {
                model: model.source.path().display().to_string(),
                adapter: adapter_name,
                metrics: values,
                counts,
                script_drift: drift_summary,
                seconds: start.elapsed().as_secs_f64(),
            },
        );
    }

    let training_curve = opts
        .adapter
        .as_deref()
        .and_then(run_dir_of)
        .and_then(|run| std::fs::read_to_string(run.join("metrics.jsonl")).ok())
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default();
    let settings = serde_json::json!({
        "model": opts.model,
        "adapter": opts.adapter.as_ref().map(|p| p.display().to_string()),
        "data": prepare.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "split": opts.split.as_deref().unwrap_or(ALL_ROWS),
        "split_examples": split_examples,
        "examples": rows.len(),
        "limit": opts.limit,
        "metrics": opts.metrics.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "max_new_tokens": opts.max_new_tokens,
        "decoding": "greedy",
        "allowed_scripts": opts.allowed_scripts.iter().map(|s| s.full_name()).collect::<Vec<_>>(),
        "system": opts.prepare.system,
        "afinar_version": env!("CARGO_PKG_VERSION"),
    });
    let report = EvalReport {
        results,
        examples: rows,
        settings,
        training_curve,
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let lines: String = report
        .examples
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
        .collect();
    crate::fs::write_atomic(&opts.out.join("examples.jsonl"), lines.as_bytes())?;
    Ok(report)
}
