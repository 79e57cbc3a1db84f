//! `afinar quickstart`: the whole pipeline on the bundled data (or --data), then the commands
//! to chat with, serve and evaluate the result — written so they run as printed.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::args::{shell_quote, shell_word};
use afinar::quickstart::{on_path_as, QuickstartOptions};
use afinar::train::TrainConfig;

#[derive(Args)]
pub struct QuickstartArgs {
    /// Training time budget in minutes (the step count that fits, at most what `epochs` gives).
    #[arg(long, conflicts_with = "steps")]
    pub minutes: Option<f64>,
    /// Train exactly this many steps instead of a time budget.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Your own data instead of the bundled conjugation set (repeatable).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Model (default: the recipe's, smollm2).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Run directory.
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Test examples generated for, before and after (0 = the whole test split).
    #[arg(long, default_value_t = 200)]
    pub eval_limit: usize,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Override any key of configs/quickstart.toml, e.g. --set lr=5e-4 (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
}

impl QuickstartArgs {
    /// The recipe, then --set, then the flags (flags win), validated.
    fn config(&self) -> Result<TrainConfig> {
        let mut cfg = afinar::quickstart::recipe(&self.set)?;
        cfg.out = self.out.clone();
        if let Some(m) = &self.model {
            cfg.model = m.clone();
        }
        if !self.data.is_empty() {
            cfg.data = self.data.clone();
            // The bundled set's grouping field; other data may not have it.
            if !self
                .set
                .iter()
                .any(|s| s.trim_start().starts_with("split_key"))
            {
                cfg.split_key.clear();
            }
        }
        if let Some(m) = self.minutes {
            cfg.max_minutes = m;
        }
        if let Some(n) = self.steps {
            cfg.max_steps = n;
            cfg.max_minutes = 0.0;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(args: QuickstartArgs) -> Result<()> {
    let r = afinar::quickstart::run(&QuickstartOptions {
        config: args.config()?,
        eval_limit: args.eval_limit,
        max_new_tokens: args.max_new_tokens,
        batch_size: 16,
    })?;
    eprintln!(
        "\n[6/6] before and after (test split{})",
        if r.config.split_key.is_empty() {
            String::new()
        } else {
            format!(
                ": its {} values never appear in training",
                r.config.split_key
            )
        }
    );
    print!("{}", afinar::eval::report::table(&r.report));
    let c = &r.config;
    let system = if c.system.is_empty() {
        String::new()
    } else {
        format!(" --system {}", shell_quote(&c.system))
    };
    // A prompt the tuned model answers correctly, else the first one.
    let examples = &r.report.examples;
    let example = examples
        .iter()
        .find(|e| {
            e.scores
                .get("tuned")
                .and_then(|s| s.get("exact_match"))
                .is_some_and(|v| *v > 0.5)
        })
        .or(examples.first())
        .map_or("Hola".to_string(), |e| e.prompt.clone());
    let afinar = this_program();
    let model = shell_word(&c.model);
    let adapter = shell_word(&r.adapter.display().to_string());
    println!("\nreport   {}", r.report_html.display());
    println!("metrics  {}", r.report_json.display());
    println!("adapter  {} (PEFT format)", r.adapter.display());
    println!("\nchat with the tuned model:");
    println!("  {afinar} chat --model {model} --adapter {adapter}{system} --temperature 0");
    println!("one answer:");
    println!(
        "  {afinar} generate --model {model} --adapter {adapter}{system} --temperature 0 \
         --prompt {}",
        shell_quote(&example)
    );
    println!("serve it (OpenAI-compatible API and a chat page at http://127.0.0.1:8080/):");
    println!("  {afinar} serve --model {model} --adapter tuned={adapter}");
    println!("evaluate it again, side by side with the base model:");
    println!(
        "  {afinar} eval --model {model} --adapter {adapter} --compare-base --limit {} \
         --report report.html",
        args.eval_limit
    );
    let out = |name: &str| shell_word(&display(&c.out.join(name)));
    println!("export it, merged, for Ollama, llama.cpp / LM Studio, transformers / vLLM:");
    println!(
        "  {afinar} export --model {model} --adapter {adapter} --to ollama --dtype q8_0 --out {}",
        out("export-ollama")
    );
    println!(
        "  {afinar} export --model {model} --adapter {adapter} --to gguf --dtype q8_0 --out {}",
        out("export.gguf")
    );
    println!(
        "  {afinar} export --model {model} --adapter {adapter} --to hf --out {}",
        out("export-hf")
    );
    println!("  (then: ollama create tuned -f Modelfile in the Ollama folder; llama-server -m the .gguf; see README, Use it elsewhere)");
    Ok(())
}

/// How to start this program from a shell: `afinar` when that name on PATH is this very
/// executable (after `cargo install --path .`), else this executable's path (after
/// `cargo run -- quickstart`, where no `afinar` may be on PATH, or another one).
fn this_program() -> String {
    match std::env::current_exe() {
        Ok(exe) if !on_path_as("afinar", &exe, std::env::var_os("PATH").as_deref()) => {
            shell_word(&display(&exe))
        }
        _ => "afinar".to_string(),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
