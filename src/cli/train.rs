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
    /// Passes over the data, or "auto" (enough for 150 optimizer steps, at most 5).
    #[arg(long)]
    pub epochs: Option<afinar::train::config::Auto<usize>>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate (default "auto": by method and model size).
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
    /// Your own validation file(s) instead of a fraction of --data (repeatable).
    #[arg(long)]
    pub val: Vec<PathBuf>,
    /// Your own test file(s) instead of a fraction of --data (repeatable).
    #[arg(long)]
    pub test: Vec<PathBuf>,
    /// Where to train: cpu, cuda or cuda:N (config key `device`).
    #[arg(long, value_parser = super::args::parse_device)]
    pub device: Option<afinar::device::DeviceSpec>,
    /// How the frozen base is held: auto (as the file has it), f32, bf16, q8_0 or q4_0
    /// (config key `base_dtype`; e.g. q4_0 to fit a large bf16 model in memory).
    #[arg(long, value_parser = super::args::parse_base_dtype)]
    pub base_dtype: Option<afinar::model::BaseDtype>,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Sets the fields the flags name, over the config file and --set (flags win).
    fn apply(&self, cfg: &mut TrainConfig) {
        if let Some(v) = &self.model {
            cfg.model = v.clone();
        }
        if !self.data.is_empty() {
            cfg.data = self.data.clone();
        }
        if !self.val.is_empty() {
            cfg.val = self.val.clone();
        }
        if !self.test.is_empty() {
            cfg.test = self.test.clone();
        }
        if let Some(v) = &self.out {
            cfg.out = v.clone();
        }
        if let Some(v) = self.device {
            cfg.device = v;
        }
        if let Some(v) = self.base_dtype {
            cfg.base_dtype = v;
        }
        let set = |field: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        if let Some(v) = self.epochs {
            cfg.epochs = v;
        }
        set(&mut cfg.max_steps, self.max_steps);
        set(&mut cfg.batch_size, self.batch_size);
        set(&mut cfg.max_seq_len, self.max_seq_len);
        set(&mut cfg.lora_rank, self.lora_rank);
        if let Some(v) = self.lr {
            cfg.lr = afinar::train::config::Auto::Set(v);
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    // Resuming reads the run's own config unless another is given, and writes back into it.
    let config_file = match &args.resume {
        Some(dir) => Some(
            args.config
                .clone()
                .unwrap_or_else(|| dir.join("config.toml")),
        ),
        None => args.config.clone(),
    };
    let mut cfg = TrainConfig::read(config_file.as_deref(), &args.set)?;
    args.apply(&mut cfg);
    if let Some(dir) = &args.resume {
        cfg.out = dir.clone();
    }
    cfg.validate()?;
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
