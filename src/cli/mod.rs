//! The `afinar` command line: the clap `Cli` and its commands, one file per command. Each file
//! holds the command's arguments and a short `run` that calls the library and prints; shared
//! argument groups live in [`args`].

use clap::{Parser, Subcommand};

pub mod args;
pub mod bench;
pub mod chat;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod plan;
pub mod quickstart;
pub mod score;
pub mod serve;
pub mod train;

#[derive(Parser)]
#[command(
    name = "afinar",
    version,
    about = "Fine-tune open LLMs on your own data and serve them: one binary, no Python."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show a model's architecture, size, tokenizer and chat template.
    Info(info::InfoArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (/reset starts over, /exit quits).
    Chat(chat::ChatArgs),
    /// Prepare or inspect a dataset (load, template, tokenize, split, pack, cache).
    Data(data::DataCommandArgs),
    /// Score a text: per-token log-probabilities and perplexity (with --json, also the
    /// last position's logits, which tests/golden/check_peft_adapter.py compares with PEFT).
    Score(score::ScoreArgs),
    /// Fine-tune a model (LoRA by default) from a TOML config, flags and --set overrides.
    Train(train::TrainArgs),
    /// Before training: the memory (part by part) and time per epoch a run will need on this
    /// machine, calibrated by real steps, and the settings that make it fit when it does not.
    Plan(plan::PlanArgs),
    /// Evaluate a model or adapter: a data file whole, or a split of the adapter's run, for
    /// loss, perplexity and generation metrics; with --compare-base side by side with the base
    /// model.
    Eval(eval::EvalArgs),
    /// The whole pipeline on the bundled Spanish conjugation data (or --data): fetch the model,
    /// prepare, evaluate the base model, train LoRA (~10 min), evaluate again, report.
    Quickstart(quickstart::QuickstartArgs),
    /// Export the model (adapter merged) for other tools: a Hugging Face folder, a GGUF, a LoRA
    /// GGUF or an Ollama folder, each loaded back and checked token for token.
    Export(export::ExportArgs),
    /// Serve the model and adapters over an OpenAI-compatible HTTP API, with a chat page at /.
    Serve(serve::ServeArgs),
    /// Measure speed; prints a `RESULT {json}` line last, as ../shared/bench does.
    Bench(bench::BenchArgs),
}
