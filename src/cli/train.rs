//! `afinar train`: fine-tune from a TOML config, flags and --set overrides, or resume a run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use afinar::train::TrainConfig;

#[derive(Args)]
pub struct TrainArgs {
    /// TOML config file (see configs/ for documented examples).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key, e.g. --set lr=1e-4 (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub model: Option<String>,
    /// Training data file or folder (repeatable).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The flags as `key=value` overrides, after any --set.
    fn overrides(&self) -> Vec<String> {
        let mut o = self.set.clone();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                o.push(format!("{k}={v}"));
            }
        };
        put("model", self.model.as_ref().map(|m| format!("{m:?}")));
        if !self.data.is_empty() {
            let files: Vec<String> = self.data.iter().map(|p| p.display().to_string()).collect();
            put("data", Some(format!("{files:?}")));
        }
        put(
            "out",
            self.out
                .as_ref()
                .map(|p| format!("{:?}", p.display().to_string())),
        );
        put("epochs", self.epochs.map(|v| v.to_string()));
        put("max_steps", self.max_steps.map(|v| v.to_string()));
        put("lr", self.lr.map(|v| format!("{v:e}")));
        put("batch_size", self.batch_size.map(|v| v.to_string()));
        put("max_seq_len", self.max_seq_len.map(|v| v.to_string()));
        put("lora_rank", self.lora_rank.map(|v| v.to_string()));
        put("seed", self.seed.map(|v| v.to_string()));
        o
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides();
    // Resuming reads the run's own config unless another is given, and writes back into it.
    let config_file = match &args.resume {
        Some(dir) => {
            overrides.push(format!("out={:?}", dir.display().to_string()));
            Some(
                args.config
                    .clone()
                    .unwrap_or_else(|| dir.join("config.toml")),
            )
        }
        None => args.config.clone(),
    };
    let cfg = TrainConfig::load(config_file.as_deref(), &overrides)?;
    let summary = afinar::train::train(&cfg, args.resume.is_some(), !args.quiet)?;
    eprintln!(
        "trained {} steps: loss {:.4}{}, {:.0} tokens/s → {}",
        summary.steps,
        summary.final_loss,
        summary
            .final_val_loss
            .map_or(String::new(), |v| format!(", validation loss {v:.4}")),
        summary.tokens_per_sec,
        summary.output.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
