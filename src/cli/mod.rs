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
    ///
    /// Loads the model as training would, attaches LoRA and times real optimizer steps (one
    /// warm-up, two timed) on random tokens at the configured batch × sequence length, measuring
    /// its own peak RSS. Prints the base weights as held and in the other formats, LoRA
    /// parameters, gradients and AdamW moments, activations, the LM-head logits block, the KV
    /// cache of evaluation, and the time per step and per epoch (from --data, prepared as
    /// training prepares it, or --tokens N). When the run does not fit in the available memory
    /// (MemAvailable, or --memory GB), prints --set settings that do: base_dtype=q8_0/q4_0, a
    /// smaller batch_size with grad_accum keeping the sequences per step, a shorter
    /// max_seq_len. Takes the --config, --set and flags of `afinar train`.
    ///
    /// Example: afinar plan --data data/conjugation/conjugation.jsonl --set batch_size=8
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
