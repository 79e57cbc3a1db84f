//! The `afinar` command line. Each subcommand is one step of the pipeline: `data` (prepare,
//! inspect) → `info` (model) → `train` → `eval` → `generate` / `chat` / `score` / `serve` (infer
//! and deploy); `quickstart` chains data → train → eval, and `bench` measures speed.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};

use afinar::infer::scripts::{parse_scripts, ScriptFilter};
use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::{source::DEFAULT_MODEL, Message, Model, TextSide};

#[derive(Parser)]
#[command(
    name = "afinar",
    version,
    about = "Fine-tune open LLMs on your own data and serve them: one binary, no Python."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, size, tokenizer and chat template.
    Info {
        #[command(flatten)]
        model: ModelArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Chat with a model in the terminal (/reset starts over, /exit quits).
    Chat {
        #[command(flatten)]
        model: ModelArg,
        /// System message for the conversation.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Prepare or inspect a dataset (load, template, tokenize, split, pack, cache).
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Score a text: per-token log-probabilities and perplexity (with --json, also the
    /// last position's logits, which tests/golden/check_peft_adapter.py compares with PEFT).
    Score {
        #[command(flatten)]
        model: ModelArg,
        /// The text to score.
        #[arg(long, short)]
        prompt: String,
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune a model (LoRA by default) from a TOML config, flags and --set overrides.
    Train(TrainArgs),
    /// Evaluate a model or adapter on a split: loss, perplexity and generation metrics, with
    /// --compare-base side by side with the base model.
    Eval(EvalArgs),
    /// The whole pipeline on the bundled Spanish conjugation data (or --data): fetch the model,
    /// prepare, evaluate the base model, train LoRA (~10 min), evaluate again, report.
    Quickstart(QuickstartArgs),
    /// Serve the model and adapters over an OpenAI-compatible HTTP API, with a chat page at /.
    Serve(ServeArgs),
    /// Measure speed; prints a `RESULT {json}` line last, as ../shared/bench does.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file (see configs/ for documented examples).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set lr=1e-4 (repeatable).
    #[arg(long = "set")]
    set: Vec<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    model: Option<String>,
    /// Training data file or folder (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long)]
    lora_rank: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// No progress bar (for logs).
    #[arg(long)]
    quiet: bool,
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
            put(
                "data",
                Some(format!(
                    "{:?}",
                    self.data
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                )),
            );
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

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Data file(s) or folder; defaults to the training data of the adapter's run.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Split to evaluate: test, validation or train.
    #[arg(long, default_value = "test")]
    split: String,
    /// Comma-separated metrics: loss, perplexity, exact_match, accuracy, chrf, rouge_l.
    #[arg(
        long,
        default_value = "loss,perplexity,exact_match,accuracy,chrf,rouge_l"
    )]
    metrics: String,
    /// Generate for the first N examples of the split only (0 = all); loss covers the split.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Prompts generated together (greedy decoding, left-padded).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Also evaluate the base model and show both side by side.
    #[arg(long)]
    compare_base: bool,
    /// Write every metric with its count and the settings to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Directory for examples.jsonl (default: RUN/eval for an adapter from `afinar train`,
    /// else ./eval).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only let generation write letters of these Unicode scripts, e.g. Latin (Common —
    /// digits, punctuation, spaces — and Inherited are always allowed).
    #[arg(long)]
    allowed_scripts: Option<String>,
    /// System message for conversations without one (default: the adapter's run's setting).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// A .gguf file, a Hugging Face model directory, a Hub repo id, or the alias smollm2; served
    /// under this name.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// A LoRA adapter served as its own model id: NAME=DIR (repeatable).
    #[arg(long = "adapter", value_parser = parse_kv)]
    adapters: Vec<(String, String)>,
    /// Address to bind; 127.0.0.1 keeps the server local (use 0.0.0.0 to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health and the page.
    #[arg(long, env = "AFINAR_API_KEY")]
    api_key: Option<String>,
    /// Generations running at once; later requests wait in arrival order.
    #[arg(long, default_value_t = 2)]
    max_concurrent: usize,
    /// Cap (and default) for max_tokens.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Only let the model write letters of these Unicode scripts (e.g. Latin).
    #[arg(long)]
    allowed_scripts: Option<String>,
}

#[derive(Args)]
struct QuickstartArgs {
    /// Training time budget in minutes (the step count that fits, at most one epoch).
    #[arg(long, conflicts_with = "steps")]
    minutes: Option<f64>,
    /// Train exactly this many steps instead of a time budget.
    #[arg(long)]
    steps: Option<usize>,
    /// Your own data instead of the bundled conjugation set (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Model (default: the recipe's, smollm2).
    #[arg(long, short)]
    model: Option<String>,
    /// Run directory.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Test examples generated for, before and after (0 = the whole test split).
    #[arg(long, default_value_t = 200)]
    eval_limit: usize,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Override any key of configs/quickstart.toml, e.g. --set lr=5e-4 (repeatable).
    #[arg(long = "set")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Load, template, tokenize, split, pack and cache a dataset for a model.
    Prepare {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        data: DataArgs,
        /// Output directory (manifest.json, train/validation/test .bin and .examples.jsonl).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show what a prepared directory (or, prepared in memory, a data file) holds.
    Inspect {
        /// A directory written by `data prepare`, or a data file / folder.
        path: PathBuf,
        /// Model whose tokenizer is used when PATH is raw data.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Split whose first example is rendered with its loss mask.
        #[arg(long, default_value = "train")]
        split: String,
    },
}

/// Dataset options shared by `data prepare` (and, later, `train`).
#[derive(Args)]
struct DataArgs {
    /// Data file or directory (repeatable): .jsonl/.json(.gz/.zst), .csv/.tsv, .parquet, .txt, or a folder.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Shape of the records.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    format: afinar::data::Format,
    /// Map one of our field names to yours, e.g. --map instruction=question (repeatable).
    #[arg(long = "map", value_parser = parse_kv)]
    map: Vec<(String, String)>,
    /// Field whose value keeps related examples in the same split (e.g. --split-key verb).
    #[arg(long)]
    split_key: Option<String>,
    /// Train/validation/test fractions.
    #[arg(long, default_value = "0.9,0.05,0.05")]
    split: String,
    /// Your own validation file(s) instead of a fraction of --data.
    #[arg(long)]
    val: Vec<PathBuf>,
    /// Your own test file(s) instead of a fraction of --data.
    #[arg(long)]
    test: Vec<PathBuf>,
    /// Seed of the split and of the packing order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Maximum tokens per training sequence.
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// One example per sequence (padding) instead of packing several.
    #[arg(long, conflicts_with = "pack")]
    pad: bool,
    /// Pack several examples per sequence (the default).
    #[arg(long)]
    pack: bool,
    /// Drop examples longer than --max-seq-len instead of truncating them.
    #[arg(long)]
    drop_long: bool,
    /// Make any bad record fatal instead of skipping and counting it.
    #[arg(long)]
    strict: bool,
    /// System message for conversations that have none (instead of the template's default).
    #[arg(long)]
    system: Option<String>,
}

impl DataArgs {
    fn options(&self) -> Result<afinar::data::PrepareOptions> {
        Ok(afinar::data::PrepareOptions {
            data: self.data.clone(),
            val: self.val.clone(),
            test: self.test.clone(),
            format: self.format,
            fields: afinar::data::FieldMap(self.map.iter().cloned().collect()),
            split_key: self.split_key.clone(),
            split: self.split.parse()?,
            seed: self.seed,
            max_seq_len: self.max_seq_len,
            packing: if self.pad {
                afinar::data::Packing::Pad
            } else {
                afinar::data::Packing::Pack
            },
            overlong: if self.drop_long {
                afinar::data::Overlong::Drop
            } else {
                afinar::data::Overlong::Truncate
            },
            strict: self.strict,
            system: self.system.clone(),
        })
    }
}

fn parse_format(s: &str) -> std::result::Result<afinar::data::Format, String> {
    s.parse()
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected OURS=YOURS, got '{s}'"))
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One LoRA training step (r=16 on the 7 projections, batch 4 × 256 random tokens), as
    /// ../shared/bench/peft_baseline.py lora measures PEFT.
    Train {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// LoRA target modules.
        #[arg(
            long,
            default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        )]
        targets: String,
        /// Only the RESULT line, no per-step timings (for ab.py).
        #[arg(long)]
        json: bool,
    },
    /// Prefill (512-token prompt) and greedy decode (32-token prompt + 128 new tokens).
    Infer {
        #[command(flatten)]
        model: ModelArg,
        /// Timed repetitions (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the result object to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct ModelArg {
    /// A .gguf file, a Hugging Face model directory, a Hub repo id (org/name), or the alias smollm2.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// A LoRA adapter directory (PEFT format, e.g. RUN/adapter from `afinar train`).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

impl ModelArg {
    fn load(&self, device: &Device) -> Result<Model> {
        let mut m = Model::load(&self.model, device)?;
        if let Some(dir) = &self.adapter {
            afinar::export::peft::load(dir, &mut m.transformer, &self.model)?;
        }
        Ok(m)
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f32>,
    /// Penalise tokens already present (1.0 = off), as Hugging Face's repetition_penalty.
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Only let the model write letters of these Unicode scripts, e.g. Latin or Latin,Greek
    /// (Common — digits, punctuation, spaces — and Inherited are always allowed).
    #[arg(long)]
    allowed_scripts: Option<String>,
}

impl SamplingArgs {
    fn options(&self, model: &Model) -> Result<GenerateOptions> {
        let scripts = match &self.allowed_scripts {
            Some(list) => Some(std::sync::Arc::new(ScriptFilter::new(
                &model.tokenizer,
                parse_scripts(list)?,
            ))),
            None => None,
        };
        Ok(GenerateOptions {
            scripts,
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
            },
            stop_at_end_token: true,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt text.
    #[arg(long, short)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// System message (implies --chat).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// glibc's malloc hands large buffers back to the OS on every free, so each training step pays
/// for fresh zeroed pages again (a fifth of CPU time in a profile here). Keeping freed memory in
/// the process, as `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=…` would,
/// removes that cost; the peak footprint is unchanged.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none()
        && std::env::var_os("AFINAR_DEFAULT_MALLOC").is_none()
    {
        // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    // Die quietly on a closed pipe (`afinar data inspect DIR | head`) as other Unix tools do,
    // instead of panicking in print!.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, as ripgrep does.
            eprintln!("afinar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = Device::Cpu;
    match cli.command {
        Command::Info { model, json } => {
            let m = model.load(&device)?;
            let info = m.info();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
        }
        Command::Generate(args) => cmd_generate(args, &device)?,
        Command::Chat {
            model,
            system,
            sampling,
        } => cmd_chat(&model, system, &sampling, &device)?,
        Command::Data {
            what: DataCommand::Prepare { model, data, out },
        } => {
            let text = TextSide::load(&model.model)?;
            let opts = data.options()?;
            let prepared = afinar::data::prepare_cached(&opts, &model.model, &text, &out)?;
            let m = &prepared.manifest;
            if prepared.reused {
                eprintln!("inputs unchanged: reusing {}", out.display());
            } else {
                eprintln!(
                    "prepared {} records in {:.2} s → {}",
                    m.records,
                    m.prepare_seconds,
                    out.display()
                );
            }
            print!(
                "{}",
                afinar::data::inspect::summary(&m.splits, &m.report, m.records)
            );
        }
        Command::Data {
            what: DataCommand::Inspect { path, model, split },
        } => inspect(&path, &model, &split)?,
        Command::Score {
            model,
            prompt,
            json,
        } => {
            let m = model.load(&device)?;
            let ids = m.tokenizer.encode(&prompt, true)?;
            if ids.len() < 2 {
                anyhow::bail!("the text must have at least two tokens to score");
            }
            let input = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
            let logits: Vec<Vec<f32>> =
                m.transformer.forward(&input, None)?.squeeze(0)?.to_vec2()?;
            let logprobs: Vec<f64> = (1..ids.len())
                .map(|i| {
                    let row = &logits[i - 1];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let lse = max
                        + row
                            .iter()
                            .map(|&v| (v as f64 - max).exp())
                            .sum::<f64>()
                            .ln();
                    row[ids[i] as usize] as f64 - lse
                })
                .collect();
            let ppl = (-logprobs.iter().sum::<f64>() / logprobs.len() as f64).exp();
            if json {
                let out = serde_json::json!({"ids": ids, "logprobs": logprobs, "perplexity": ppl,
                                             "last_logits": logits.last()});
                println!("{out}");
            } else {
                println!("{} tokens, perplexity {ppl:.3}", ids.len());
            }
        }
        Command::Train(args) => {
            let mut overrides = args.overrides();
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
            let cfg = afinar::train::TrainConfig::load(config_file.as_deref(), &overrides)?;
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
        }
        Command::Eval(args) => cmd_eval(args)?,
        Command::Quickstart(args) => cmd_quickstart(args)?,
        Command::Serve(args) => afinar::serve::serve(&afinar::serve::ServeOptions {
            model: args.model,
            name: None,
            adapters: args
                .adapters
                .into_iter()
                .map(|(k, v)| (k, PathBuf::from(v)))
                .collect(),
            host: args.host,
            port: args.port,
            api_key: args.api_key,
            max_concurrent: args.max_concurrent,
            max_tokens: args.max_tokens,
            max_body_bytes: args.max_body_bytes,
            allowed_scripts: scripts_arg(args.allowed_scripts.as_deref())?,
        })?,
        Command::Bench {
            what:
                BenchCommand::Train {
                    model,
                    batch,
                    seq,
                    rank,
                    warmup,
                    steps,
                    targets,
                    json,
                },
        } => {
            let r = afinar::train::bench::run(&afinar::train::bench::BenchTrain {
                model: model.model,
                batch,
                seq,
                rank,
                warmup,
                steps,
                full: false,
                targets,
                verbose: !json,
            })?;
            println!("RESULT {r}");
        }
        Command::Bench {
            what: BenchCommand::Infer { model, runs, json },
        } => bench_infer(&model.model, runs, json, &device)?,
    }
    Ok(())
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
    use afinar::eval::{self, metrics, EvalOptions};
    let metrics = metrics::parse_list(&args.metrics).map_err(anyhow::Error::msg)?;
    let run = args.model.adapter.as_deref().and_then(eval::run_dir_of);
    // The adapter's run fixes the data settings (split, seed, template options), so the test
    // split is the one training never saw.
    let mut prepare = match &run {
        Some(dir) => afinar::train::TrainConfig::load(Some(&dir.join("config.toml")), &[])?
            .prepare_options()?,
        None => afinar::data::PrepareOptions::default(),
    };
    if !args.data.is_empty() {
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
    let out = args.out.clone().unwrap_or_else(|| match &run {
        Some(dir) => dir.join("eval"),
        None => PathBuf::from("eval"),
    });
    let opts = EvalOptions {
        model: args.model.model.clone(),
        adapter: args.model.adapter.clone(),
        prepare,
        split: args.split.clone(),
        metrics,
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size,
        compare_base: args.compare_base,
        allowed_scripts: scripts_arg(args.allowed_scripts.as_deref())?,
        data_dir: match &run {
            Some(dir) => dir.join("data"),
            None => out.join("data"),
        },
        out: out.clone(),
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

fn cmd_quickstart(args: QuickstartArgs) -> Result<()> {
    let mut set = vec![format!("out={:?}", args.out.display().to_string())];
    if let Some(m) = &args.model {
        set.push(format!("model={m:?}"));
    }
    if !args.data.is_empty() {
        let files: Vec<String> = args.data.iter().map(|p| p.display().to_string()).collect();
        set.push(format!("data={files:?}"));
        // The bundled set's grouping field; other data may not have it.
        set.push("split_key=\"\"".into());
    }
    if let Some(m) = args.minutes {
        set.push(format!("max_minutes={m}"));
    }
    if let Some(n) = args.steps {
        set.push(format!("max_steps={n}"));
        set.push("max_minutes=0".into());
    }
    set.extend(args.set.iter().cloned());
    let r = afinar::quickstart::run(&afinar::quickstart::QuickstartOptions {
        set,
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
    println!("\nreport   {}", r.report_html.display());
    println!("metrics  {}", r.report_json.display());
    println!("adapter  {} (PEFT format)", r.adapter.display());
    println!("\nchat with the tuned model:");
    println!(
        "  afinar chat --model {} --adapter {}{system} --temperature 0",
        c.model,
        r.adapter.display()
    );
    println!("one answer:");
    println!(
        "  afinar generate --model {} --adapter {}{system} --temperature 0 --prompt {}",
        c.model,
        r.adapter.display(),
        shell_quote(&example)
    );
    println!("serve it (OpenAI-compatible API and a chat page at http://127.0.0.1:8080/):");
    println!(
        "  afinar serve --model {} --adapter tuned={}",
        c.model,
        r.adapter.display()
    );
    println!("evaluate it again, side by side with the base model:");
    println!(
        "  afinar eval --model {} --adapter {} --compare-base --limit {} --report report.html",
        c.model,
        r.adapter.display(),
        args.eval_limit
    );
    Ok(())
}

/// The scripts of an `--allowed-scripts` list (none when the flag is absent).
fn scripts_arg(list: Option<&str>) -> Result<Vec<unicode_script::Script>> {
    Ok(list.map(parse_scripts).transpose()?.unwrap_or_default())
}

/// Quotes `s` for a POSIX shell command line: '…', or bash's $'…' when it holds newlines.
fn shell_quote(s: &str) -> String {
    if s.contains(['\n', '\t']) {
        let body: String = s
            .chars()
            .map(|c| match c {
                '\n' => "\\n".to_string(),
                '\t' => "\\t".to_string(),
                '\\' => "\\\\".to_string(),
                '\'' => "\\'".to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("$'{body}'")
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Prints the first example of a split with its loss-carrying text marked.
fn print_first_example(
    tok: &afinar::model::TextTokenizer,
    split: &str,
    ids: &[u32],
    labels: &[u8],
) {
    use afinar::data::inspect;
    println!(
        "\nfirst {split} example, loss-carrying text in {}…{}:",
        inspect::LOSS_OPEN,
        inspect::LOSS_CLOSE
    );
    println!("{}", inspect::render_masked(tok, ids, labels));
}

fn inspect(path: &std::path::Path, model: &str, split: &str) -> Result<()> {
    use afinar::data::{inspect, PreparedDir};
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
        let opts = afinar::data::PrepareOptions {
            data: vec![path.to_path_buf()],
            ..Default::default()
        };
        let p = afinar::data::prepare(&opts, &text)?;
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

fn print_info(i: &afinar::model::ModelInfo) {
    println!("source          {}", i.source);
    println!("architecture    {}", i.architecture);
    println!(
        "parameters      {} ({:.1} M)",
        i.parameters,
        i.parameters as f64 / 1e6
    );
    println!(
        "file dtype      {} (computed in {})",
        i.file_dtype, i.compute_dtype
    );
    println!(
        "vocabulary      {} (tokenizer: {})",
        i.vocab_size, i.tokenizer_vocab_size
    );
    println!("context length  {}", i.context_length);
    println!(
        "layers          {} × hidden {}, {} heads ({} key/value)",
        i.layers, i.hidden_size, i.attention_heads, i.kv_heads
    );
    println!("tied embeddings {}", i.tied_embeddings);
    println!(
        "bos token       {}",
        i.bos_token.as_deref().unwrap_or("(none)")
    );
    println!(
        "eos token       {}",
        i.eos_token.as_deref().unwrap_or("(none)")
    );
    println!("end tokens      {}", i.end_tokens.join(" "));
    println!(
        "chat template   {}",
        if i.chat_template { "yes" } else { "no" }
    );
    for n in &i.notes {
        println!("note            {n}");
    }
}

fn cmd_generate(args: GenerateArgs, device: &Device) -> Result<()> {
    let model = args.model.load(device)?;
    let opts = args.sampling.options(&model)?;
    opts.sampling.validate()?;
    let prompt = if args.chat || args.system.is_some() {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", args.prompt.clone()));
        model.encode_chat(&messages, true)?
    } else {
        model.tokenizer.encode(&args.prompt, true)?
    };
    let mut out = std::io::stdout().lock();
    let json = args.json;
    let g = generate(&model, &prompt, &opts, |piece| {
        if !json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        println!();
    }
    Ok(())
}

fn cmd_chat(
    spec: &ModelArg,
    system: Option<String>,
    sampling: &SamplingArgs,
    device: &Device,
) -> Result<()> {
    let model = spec.load(device)?;
    if model.chat_template.is_none() {
        anyhow::bail!(
            "{}: the model has no chat template; use `afinar generate` with a plain prompt",
            spec.model
        );
    }
    let opts = sampling.options(&model)?;
    opts.sampling.validate()?;
    let base: Vec<Message> = system
        .map(|s| vec![Message::new("system", s)])
        .unwrap_or_default();
    let mut history = base.clone();
    eprintln!(
        "Chatting with {} — /reset starts over, /exit quits.",
        model.source.path().display()
    );
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = base.clone();
                println!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = model.encode_chat(&history, true)?;
        let g = generate(&model, &prompt, &opts, |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
        history.push(Message::new("assistant", g.text.trim().to_string()));
    }
    Ok(())
}

/// Deterministic pseudo-random token ids below `vocab`, avoiding the first 16 (special) ids.
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = afinar::rng::Rng::new(seed);
    (0..n)
        .map(|_| 16 + (rng.next_u64() % (vocab as u64 - 16)) as u32)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_infer(
    spec: &str,
    runs: usize,
    json: Option<std::path::PathBuf>,
    device: &Device,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let model = Model::load(spec, device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    let runs = runs.max(1);

    // Prefill: one forward over 512 tokens, all-position logits and last-position logits.
    let ids = random_ids(512, vocab, 8);
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let mut all_s = Vec::new();
    let mut last_s = Vec::new();
    for i in 0..=runs {
        let t = std::time::Instant::now();
        model
            .transformer
            .forward(&input, None)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let a = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        model
            .transformer
            .forward_last(&input, None)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let l = t.elapsed().as_secs_f64();
        eprintln!(
            "prefill run {i}: all-logits {:.1} tok/s, last-logits {:.1} tok/s",
            512.0 / a,
            512.0 / l
        );
        if i > 0 {
            all_s.push(a);
            last_s.push(l);
        }
    }

    // Decode: 32-token prompt, 128 greedy tokens, end tokens ignored.
    let prompt = random_ids(32, vocab, 7);
    let opts = GenerateOptions {
        max_new_tokens: 128,
        sampling: SamplingParams::default(),
        stop_at_end_token: false,
        scripts: None,
    };
    let mut walls = Vec::new();
    let mut after_first = Vec::new();
    for i in 0..=runs {
        let t = std::time::Instant::now();
        let g = generate(&model, &prompt, &opts, |_| {})?;
        let wall = t.elapsed().as_secs_f64();
        eprintln!(
            "decode run {i}: {:.1} new tok/s ({} tokens in {wall:.2} s)",
            g.generated_tokens as f64 / wall,
            g.generated_tokens
        );
        if i > 0 {
            walls.push(g.generated_tokens as f64 / wall);
            after_first.push((g.generated_tokens - 1) as f64 / (wall - g.prefill_secs));
        }
    }
    let result = serde_json::json!({
        "mode": "infer",
        "model": model.source.path().display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "malloc": std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "default".into()),
        "load_s": load_s,
        "prefill": {"prompt_tokens": 512, "tokens_per_s": 512.0 / median(all_s),
                    "last_logits": {"tokens_per_s": 512.0 / median(last_s)}},
        "decode": {"prompt_tokens": 32, "new_tokens": 128, "new_tokens_per_s": median(walls),
                   "decode_tokens_per_s": median(after_first)},
        "peak_rss_mib": peak_rss_mib(),
    });
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("RESULT {result}");
    Ok(())
}

use afinar::train::bench::peak_rss_mib;
