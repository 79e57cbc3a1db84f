//! `afinar data prepare` and `afinar data inspect`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Subcommand};

use super::args::{DataArgs, ModelArg};
use afinar::data::{self, inspect, PrepareOptions, PreparedDir};
use afinar::model::{source::DEFAULT_MODEL, TextSide, TextTokenizer};

#[derive(Args)]
pub struct DataCommandArgs {
    #[command(subcommand)]
    pub what: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Load, template, tokenize, split, pack and cache a dataset for a model.
    Prepare(Box<PrepareArgs>),
    /// Show what a prepared directory (or, prepared in memory, a data file) holds.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output directory (manifest.json, train/validation/test .bin and .examples.jsonl).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A directory written by `data prepare`, or a data file / folder.
    pub path: PathBuf,
    /// Model whose tokenizer is used when PATH is raw data.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Split whose first example is rendered with its loss mask.
    #[arg(long, default_value = "train")]
    pub split: String,
}

pub fn run(args: DataCommandArgs) -> Result<()> {
    match args.what {
        DataCommand::Prepare(a) => prepare(*a),
        DataCommand::Inspect(a) => inspect_path(&a.path, &a.model, &a.split),
    }
}

fn prepare(args: PrepareArgs) -> Result<()> {
    let text = TextSide::load(&args.model.model)?;
    let opts = args.data.options()?;
    let prepared = data::prepare_cached(&opts, &args.model.model, &text, &args.out)?;
    let m = &prepared.manifest;
    if prepared.reused {
        eprintln!("inputs unchanged: reusing {}", args.out.display());
    } else {
        eprintln!(
            "prepared {} records in {:.2} s → {}",
            m.records,
            m.prepare_seconds,
            args.out.display()
        );
    }
    print!("{}", inspect::summary(&m.splits, &m.report, m.records));
    Ok(())
}

fn inspect_path(path: &Path, model: &str, split: &str) -> Result<()> {
    if path.join("manifest.json").is_file() {
        let dir = PreparedDir::open(path)?;
        let m = &dir.manifest;
        let text = TextSide::load(&m.model)?;
        println!(
            "prepared for model {} (max-seq-len {})",
            m.model, m.settings["max_seq_len"]
        );
        print!("{}", inspect::summary(&m.splits, &m.report, m.records));
        let tokens = dir.split(split)?;
        if tokens.examples() > 0 {
            let r = tokens.example_range(0);
            print_first_example(
                &text.tokenizer,
                split,
                &tokens.ids()[r.clone()],
                &tokens.labels()[r],
            );
        }
    } else {
        let text = TextSide::load(model)?;
        let opts = PrepareOptions {
            data: vec![path.to_path_buf()],
            ..Default::default()
        };
        let p = data::prepare(&opts, &text)?;
        let splits = p
            .splits
            .iter()
            .map(|(k, v)| (k.clone(), v.stats.clone()))
            .collect();
        print!("{}", inspect::summary(&splits, &p.report, p.records));
        if let Some(s) = p.splits.get(split).filter(|s| s.packed.examples() > 0) {
            let r = s.packed.example_offsets[0] as usize..s.packed.example_offsets[1] as usize;
            print_first_example(
                &text.tokenizer,
                split,
                &s.packed.ids[r.clone()],
                &s.packed.labels[r],
            );
        }
    }
    Ok(())
}

/// Prints the first example of a split with its loss-carrying text marked.
fn print_first_example(tok: &TextTokenizer, split: &str, ids: &[u32], labels: &[u8]) {
    println!(
        "\nfirst {split} example, loss-carrying text in {}…{}:",
        inspect::LOSS_OPEN,
        inspect::LOSS_CLOSE
    );
    println!("{}", inspect::render_masked(tok, ids, labels));
}
