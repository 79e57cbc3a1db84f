//! `afinar eval`: loss, perplexity and generation metrics for a model or an adapter, on a data
//! file (whole) or on a split of the adapter's training run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{scripts_arg, ModelArg};
use afinar::data::PrepareOptions;
use afinar::eval::{self, metrics, EvalOptions};
use afinar::train::TrainConfig;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Data file(s) or folder, evaluated whole (every row) unless --split is given; defaults to
    /// the training data of the adapter's run.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Split to evaluate: test, validation or train, cut with the adapter's run's fractions and
    /// seed. Default: test without --data; with --data, no split (every row).
    #[arg(long)]
    pub split: Option<String>,
    /// Comma-separated metrics: loss, perplexity, exact_match, accuracy, chrf, rouge_l.
    #[arg(
        long,
        default_value = "loss,perplexity,exact_match,accuracy,chrf,rouge_l"
    )]
    pub metrics: String,
    /// Generate for the first N examples of the split only (0 = all); loss covers the split.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompts generated together (greedy decoding, left-padded).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also evaluate the base model and show both side by side.
    #[arg(long)]
    pub compare_base: bool,
    /// Write every metric with its count and the settings to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Directory for examples.jsonl (default: RUN/eval for an adapter from `afinar train`,
    /// else ./eval).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only let generation write letters of these Unicode scripts, e.g. Latin (Common —
    /// digits, punctuation, spaces — and Inherited are always allowed).
    #[arg(long)]
    pub allowed_scripts: Option<String>,
    /// System message for conversations without one (default: the adapter's run's setting).
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let metrics = metrics::parse_list(&args.metrics).map_err(anyhow::Error::msg)?;
    let run = args.model.adapter.as_deref().and_then(eval::run_dir_of);
    // The adapter's run fixes the data settings (split, seed, template options), so its test
    // split is the one training never saw.
    let mut prepare = match &run {
        Some(dir) => TrainConfig::load(Some(&dir.join("config.toml")), &[])?.prepare_options()?,
        None => PrepareOptions::default(),
    };
    let own_data = !args.data.is_empty();
    if own_data {
        prepare.data = args.data.clone();
    }
    if prepare.data.is_empty() {
        anyhow::bail!(
            "no data: give --data FILE (or an --adapter from `afinar train`, whose data is used)"
        );
    }
    if args.system.is_some() {
        prepare.system = args.system.clone();
    }
    // A file of the user's own is evaluated whole; the run's data only on its held-out split.
    let split = match (&args.split, own_data) {
        (Some(s), _) => Some(s.clone()),
        (None, true) => None,
        (None, false) => Some("test".to_string()),
    };
    let out = args.out.clone().unwrap_or_else(|| match &run {
        Some(dir) => dir.join("eval"),
        None => PathBuf::from("eval"),
    });
    let opts = EvalOptions {
        model: args.model.model.clone(),
        base_dtype: args.model.base_dtype,
        adapter: args.model.adapter.clone(),
        prepare,
        split,
        metrics,
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size,
        compare_base: args.compare_base,
        allowed_scripts: scripts_arg(args.allowed_scripts.as_deref())?,
        // The run's prepared data is reused for its own data; other data is cached beside the
        // examples, leaving the run's cache as training left it.
        data_dir: match &run {
            Some(dir) if !own_data => dir.join("data"),
            _ => out.join("data"),
        },
        out: out.clone(),
        device: args.model.device,
    };
    let report = eval::evaluate(&opts, |m| eprintln!("{m}"))?;
    print!("{}", eval::report::table(&report));
    eprintln!("examples → {}", out.join("examples.jsonl").display());
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("metrics → {}", p.display());
    }
    if let Some(p) = &args.report {
        std::fs::write(p, eval::report::html(&report))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("report → {}", p.display());
    }
    Ok(())
}
