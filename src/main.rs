//! The `afinar` command line. Each subcommand is one step of the pipeline: `data` (prepare,
//! inspect) → `info` (model) → `train` → `eval` → `generate` / `chat` / `score` / `serve` (infer
//! and deploy) → `export`; `quickstart` chains data → train → eval, and `bench` measures speed. Each
//! command lives in its own file under `cli/`; this file only sets the process up and dispatches.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::{Cli, Command};

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

/// candle runs its element-wise ops (the gradient additions of every backward pass among them)
/// on its own worker pool, beside rayon's, and the two compete for the same cores.
/// - After each job its workers spin 25,000 times before sleeping, taking a core from the
///   rayon threads running the GEMMs: a 200-spin limit made a training step 16 % faster on
///   2 cores.
/// - On 4 threads or fewer the pool costs more than it saves (wake-ups for additions that are
///   bound by memory anyway): it is turned off there (`CANDLE_NUM_THREADS=1`), about 10 % more
///   on 2 cores.
///
/// Explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` or `CANDLE_NUM_THREADS` values are left alone.
fn tune_candle_pool() {
    // Both are read by candle when its pool first starts, after this (no thread exists yet).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && threads <= 4 {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    tune_malloc();
    tune_candle_pool();
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
    let result = match Cli::parse().command {
        Command::Info(args) => cli::info::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Chat(args) => cli::chat::run(args),
        Command::Data(args) => cli::data::run(args),
        Command::Score(args) => cli::score::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Quickstart(args) => cli::quickstart::run(args),
        Command::Export(args) => cli::export::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Bench(args) => cli::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, as ripgrep does.
            eprintln!("afinar: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status says what kind of problem it was, for scripts: 2 a flag or config value
/// (as clap's own usage errors), 3 an input file (dataset, model, template), 4 a failure while
/// running (training diverged, server, resume, I/O), 1 anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    use afinar::Error as E;
    match e.downcast_ref::<E>() {
        Some(E::InvalidArgument(_) | E::Config(_) | E::Unsupported(_)) => 2,
        Some(
            E::Data(_)
            | E::BadFile { .. }
            | E::ModelSource(_)
            | E::UnsupportedArchitecture { .. }
            | E::Template(_)
            | E::Tokenizer(_),
        ) => 3,
        Some(
            E::Training(_) | E::Server(_) | E::Resume(_) | E::Io { .. } | E::Candle(_) | E::Json(_),
        ) => 4,
        _ => 1,
    }
}
