//! `afinar plan`: the memory and time a training run will need, before it starts, and the
//! settings that make it fit when it does not.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use afinar::train::plan::{self, duration, human, Plan, PlanOptions};
use afinar::train::TrainConfig;

#[derive(Args)]
pub struct PlanArgs {
    /// TOML config file, as for `afinar train`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key, e.g. --set max_seq_len=1024 (repeatable).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Model (config key `model`; default smollm2).
    #[arg(long)]
    pub model: Option<String>,
    /// Training data file or folder (repeatable): prepared as training prepares it, for the
    /// number of sequences per epoch.
    #[arg(long, conflicts_with = "tokens")]
    pub data: Vec<PathBuf>,
    /// Training tokens per epoch, instead of --data.
    #[arg(long)]
    pub tokens: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// How the frozen base is held: auto, f32, bf16, q8_0 or q4_0 (config key `base_dtype`).
    #[arg(long, value_parser = super::args::parse_base_dtype)]
    pub base_dtype: Option<afinar::model::BaseDtype>,
    /// Plan for this much memory, in GB (e.g. another machine's), instead of MemAvailable.
    #[arg(long)]
    pub memory: Option<f64>,
    /// Calibrate at this batch × sequence length (e.g. 1x128) instead of the configured one.
    #[arg(long, value_parser = parse_shape)]
    pub calibrate_at: Option<(usize, usize)>,
    /// Print the plan as one JSON object only.
    #[arg(long)]
    pub json: bool,
}

fn parse_shape(s: &str) -> std::result::Result<(usize, usize), String> {
    let (b, q) = s
        .split_once(['x', 'X', '*', '×'])
        .ok_or_else(|| format!("expected BATCHxSEQ such as 1x128, got '{s}'"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("expected BATCHxSEQ such as 1x128, got '{s}'"))
    };
    Ok((n(b)?, n(q)?))
}

pub fn run(args: PlanArgs) -> Result<()> {
    let mut cfg = TrainConfig::read(args.config.as_deref(), &args.set)?;
    if let Some(v) = &args.model {
        cfg.model = v.clone();
    }
    if !args.data.is_empty() {
        cfg.data = args.data.clone();
    }
    if let Some(v) = args.base_dtype {
        cfg.base_dtype = v;
    }
    for (field, v) in [
        (&mut cfg.batch_size, args.batch_size),
        (&mut cfg.grad_accum, args.grad_accum),
        (&mut cfg.max_seq_len, args.max_seq_len),
        (&mut cfg.lora_rank, args.lora_rank),
    ] {
        if let Some(v) = v {
            *field = v;
        }
    }
    // A plan needs no data (--tokens, or none for the step time only): validate the rest.
    let mut check = cfg.clone();
    if check.data.is_empty() {
        check.data = vec![PathBuf::from("-")];
    }
    check.validate()?;
    if let Some(gb) = args.memory {
        anyhow::ensure!(
            gb.is_finite() && gb > 0.0,
            afinar::Error::InvalidArgument(format!("--memory {gb}: give a size in GB, > 0"))
        );
    }
    let p = plan::plan(&PlanOptions {
        cfg,
        tokens: args.tokens,
        memory_bytes: args.memory.map(|gb| (gb * 1e9) as u64),
        calibrate_at: args.calibrate_at,
        verbose: !args.json,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", render(&p));
    }
    Ok(())
}

/// The plan for people.
fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let m = &p.memory;
    let w = &p.weights;
    let held: Vec<String> = w.held.iter().map(|(f, n)| format!("{n} {f}")).collect();
    let _ = writeln!(
        o,
        "plan: {} — {} r={}, base {}, batch {} × {} tokens, grad_accum {} ({} trainable parameters)",
        p.model,
        p.method,
        p.lora_rank,
        p.base_dtype,
        p.batch_size,
        p.max_seq_len,
        p.grad_accum,
        p.trainable_params
    );
    let _ = writeln!(o, "\nmemory (peak RSS of training)");
    let row = |o: &mut String, name: &str, b: u64, note: String| {
        let line = format!("  {name:<24}{:>10}  {note}", human(b));
        let _ = writeln!(o, "{}", line.trim_end());
    };
    row(
        &mut o,
        "base weights",
        m.weights,
        format!(
            "held as {} (f32 {}, bf16 {}, q8_0 {}, q4_0 {})",
            held.join(", "),
            human(w.f32),
            human(w.bf16),
            human(w.q8_0),
            human(w.q4_0)
        ),
    );
    row(&mut o, "trainable (f32)", m.trainable, String::new());
    row(&mut o, "gradients (f32)", m.gradients, String::new());
    row(&mut o, "AdamW moments (f32)", m.optimizer, String::new());
    row(
        &mut o,
        "activations",
        m.activations,
        format!(
            "{} × {} tokens × {:.2} MB + attention probabilities {}",
            p.batch_size,
            p.max_seq_len,
            p.calibration.activation_bytes_per_token / 1e6,
            human(m.attention)
        ),
    );
    row(
        &mut o,
        "LM-head block",
        m.lm_head_block,
        "256 rows × vocab f32 logits".into(),
    );
    row(
        &mut o,
        "runtime",
        m.runtime,
        "program, tokenizer, allocator".into(),
    );
    let _ = writeln!(o, "  {:<24}{:>10}", "", "-------");
    row(&mut o, "training", m.training, String::new());
    if m.load_peak > m.training || m.load_peak > p.available {
        row(
            &mut o,
            "loading",
            m.load_peak,
            "measured: converting at load passes through more than training holds".into(),
        );
    }
    row(
        &mut o,
        "peak",
        m.peak,
        format!(
            "of {} available: {}",
            human(p.available),
            if p.fits { "fits" } else { "DOES NOT FIT" }
        ),
    );
    row(
        &mut o,
        "eval KV cache",
        m.eval_kv_cache,
        format!(
            "per generation in `afinar eval` ({} + 256 tokens)",
            p.max_seq_len
        ),
    );
    let t = &p.time;
    let c = &p.calibration;
    let _ = writeln!(
        o,
        "\ntime (calibrated: 2 steps of {} × {} after a warm-up, {:.2} s median)",
        c.batch,
        c.seq,
        c.fwd_bwd_s + c.optimizer_s
    );
    let _ = writeln!(
        o,
        "  per step      {} ({:.0} tokens/s)",
        duration(t.step_s),
        t.tokens_per_s
    );
    match (t.sequences, t.steps_per_epoch, t.epoch_s) {
        (Some(seqs), Some(steps), Some(epoch)) => {
            let _ = writeln!(
                o,
                "  per epoch     {} ({} steps, {seqs} sequences, {} tokens)",
                duration(epoch),
                steps,
                t.tokens.unwrap_or(0)
            );
            if let (Some(n), Some(s)) = (t.total_steps, t.total_s) {
                let _ = writeln!(
                    o,
                    "  whole run     {} ({n} steps, validation excluded)",
                    duration(s)
                );
            }
        }
        _ => {
            let _ = writeln!(o, "  per epoch     give --data or --tokens N");
        }
    }
    if !p.fits && p.base_dtype != "auto" && m.load_peak > p.available {
        let _ = writeln!(
            o,
            "\nloading peaks at {} (converting as it loads): convert once ahead, then plan and train \
             over the file:\n  \
             afinar export --model {} --to gguf --dtype {} --out model.{}.gguf",
            human(m.load_peak),
            super::args::shell_word(&p.model),
            p.base_dtype,
            p.base_dtype
        );
    }
    if !p.fits {
        if p.suggestions.is_empty() {
            let _ = writeln!(
                o,
                "\nnothing found that fits in {}: a smaller model, or a machine with more memory",
                human(p.available)
            );
        } else {
            let _ = writeln!(o, "\nto fit in {}:", human(p.available));
            for s in &p.suggestions {
                let sets: Vec<String> = s.set.iter().map(|k| format!("--set {k}")).collect();
                let _ = writeln!(
                    o,
                    "  {:<48} peak {}, {} a step{}  ({})",
                    sets.join(" "),
                    human(s.peak),
                    duration(s.step_s),
                    s.epoch_s
                        .map_or(String::new(), |e| format!(", {} an epoch", duration(e))),
                    s.note
                );
            }
        }
    }
    o
}
