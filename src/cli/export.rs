//! `afinar export`: the model (with its adapter merged) as a Hugging Face folder, a GGUF, a
//! LoRA GGUF or an Ollama folder, each checked by loading it back (token identity).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::ModelArg;
use afinar::export::{export, ExportRequest, Target};

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// What to write: hf (merged safetensors folder), gguf (merged GGUF), gguf-lora (the adapter
    /// for llama.cpp --lora) or ollama (GGUF + Modelfile). Repeat for several.
    #[arg(long = "to", required = true, value_parser = parse_target)]
    pub to: Vec<Target>,
    /// Output: the folder or file for one --to; a folder holding one of each for several.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type: f32, f16 or bf16 for hf (default: the model's own); f32, f16, bf16, q8_0 or
    /// q4_0 for GGUF (default f16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace an existing, non-empty output.
    #[arg(long)]
    pub overwrite: bool,
    /// Write even when a check fails (unrecognised chat template, token identity mismatch).
    #[arg(long)]
    pub force: bool,
    /// Greedy tokens compared per probe prompt in the token-identity check.
    #[arg(long, default_value_t = 16)]
    pub check_tokens: usize,
    /// Conversations from the run's test split (else built-in probes) the check uses; 0 skips
    /// the check (it loads the export back and decodes with both models, which for a large
    /// model takes longer than the export itself).
    #[arg(long, default_value_t = 4)]
    pub check_prompts: usize,
}

fn parse_target(s: &str) -> std::result::Result<Target, String> {
    s.parse().map_err(|e: afinar::Error| e.to_string())
}

pub fn run(args: ExportArgs) -> Result<()> {
    let device = args.model.device.open()?;
    let req = ExportRequest {
        model: args.model.model.clone(),
        adapter: args.model.adapter.clone(),
        targets: args.to,
        out: args.out,
        dtype: args.dtype,
        overwrite: args.overwrite,
        force: args.force,
        check_tokens: args.check_tokens,
        check_prompts: args.check_prompts,
    };
    export(&req, &device, |line| println!("{line}"))?;
    Ok(())
}
