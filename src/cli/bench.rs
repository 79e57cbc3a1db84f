//! `afinar bench train` and `afinar bench infer`: speed, ending with a `RESULT {json}` line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::args::ModelArg;
use afinar::infer::bench::BenchInfer;
use afinar::train::bench::BenchTrain;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One LoRA training step (r=16 on the 7 projections, batch 4 × 256 random tokens), as
    /// ../shared/bench/peft_baseline.py lora measures PEFT.
    Train(TrainBenchArgs),
    /// Prefill (512-token prompt) and greedy decode (32-token prompt + 128 new tokens).
    Infer(InferBenchArgs),
    /// The frozen-base products of a training step, f32 against bf16, in GFLOP/s, and the
    /// bf16 micro-kernel's in-cache peak.
    Gemm(GemmBenchArgs),
}

#[derive(Args)]
pub struct GemmBenchArgs {
    /// Rows of x (batch × sequence).
    #[arg(long, default_value_t = 1024)]
    pub rows: usize,
    /// Weight shapes as OUTxIN, comma-separated (default: SmolLM2-135M's projections and head).
    #[arg(long, default_value = "576x576,192x576,1536x576,576x1536,49152x576")]
    pub shapes: String,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

#[derive(Args)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// LoRA target modules.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: String,
    /// Only the RESULT line, no per-step timings (for ab.py).
    #[arg(long)]
    pub json: bool,
    /// Activation checkpointing: recompute each layer in the backward (LoRA only).
    #[arg(long)]
    pub checkpointing: bool,
    /// Arithmetic of the base's products: auto (bf16 where the CPU has AVX512-BF16), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub compute: afinar::train::Compute,
}

#[derive(Args)]
pub struct InferBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also write the result object to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let result = match args.what {
        BenchCommand::Train(a) => afinar::train::bench::run(&BenchTrain {
            base_dtype: a.model.base_dtype,
            checkpointing: a.checkpointing,
            compute: a.compute,
            model: a.model.model,
            batch: a.batch,
            seq: a.seq,
            rank: a.rank,
            warmup: a.warmup,
            steps: a.steps,
            full: false,
            targets: a.targets,
            verbose: !a.json,
        })?,
        BenchCommand::Gemm(a) => {
            let shapes = a
                .shapes
                .split(',')
                .map(|s| {
                    let (n, k) = s
                        .trim()
                        .split_once('x')
                        .context("a shape is OUTxIN, e.g. 576x1536")?;
                    Ok((n.parse()?, k.parse()?))
                })
                .collect::<Result<Vec<(usize, usize)>>>()?;
            afinar::model::ops::gemm_bench::run(a.rows, &shapes, a.runs)
        }
        BenchCommand::Infer(a) => {
            let device = a.model.device.open()?;
            let r = afinar::infer::bench::run(
                &BenchInfer {
                    base_dtype: a.model.base_dtype,
                    int8_dot: a.model.int8_dot,
                    model: a.model.model,
                    runs: a.runs,
                    verbose: true,
                },
                &device,
            )?;
            if let Some(path) = &a.json {
                std::fs::write(path, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            r
        }
    };
    println!("RESULT {result}");
    Ok(())
}
