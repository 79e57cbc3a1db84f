//! `afinar quickstart`: the whole pipeline in one command, as a newcomer's first run and a
//! template for their own — fetch the model, prepare the data, evaluate the base model, train a
//! LoRA adapter, evaluate it on the same examples, and report before/after.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::eval::{self, EvalOptions, EvalReport, Metric};
use crate::train::{self, TrainConfig};
use crate::Result;

/// The recipe, kept in the repository where users read it.
pub const RECIPE: &str = include_str!("../configs/quickstart.toml");

/// What to run.
#[derive(Debug, Clone)]
pub struct QuickstartOptions {
    /// The training configuration: [`recipe`] with the user's overrides applied, validated.
    pub config: TrainConfig,
    /// Test examples generated for, before and after (0 = the whole test split).
    pub eval_limit: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

/// What a finished quickstart leaves behind.
#[derive(Debug)]
pub struct QuickstartResult {
    pub report: EvalReport,
    pub config: TrainConfig,
    pub adapter: PathBuf,
    pub report_html: PathBuf,
    pub report_json: PathBuf,
}

/// The bundled conjugation set, in the binary, so `afinar quickstart` also runs outside the
/// repository (after `cargo install`).
const BUNDLED_PATH: &str = "data/conjugation/conjugation.jsonl";
const BUNDLED_DATA: &[u8] = include_bytes!("../data/conjugation/conjugation.jsonl");
const BUNDLED_LICENSE: &[u8] = include_bytes!("../data/conjugation/LICENSE-apertium-eng-spa.txt");

/// When the recipe's bundled data file is not where it is named (the command runs outside the
/// repository), writes the copy held in the binary into the run directory and uses that.
fn use_bundled_data(cfg: &mut TrainConfig) -> Result<()> {
    let named = Path::new(BUNDLED_PATH);
    if cfg.data.iter().all(|p| p != named) || named.is_file() {
        return Ok(());
    }
    let dir = cfg.out.join("bundled");
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
    let copy = dir.join("conjugation.jsonl");
    if std::fs::read(&copy).ok().as_deref() != Some(BUNDLED_DATA) {
        crate::fs::write_atomic(&copy, BUNDLED_DATA)?;
        crate::fs::write_atomic(&dir.join("LICENSE-apertium-eng-spa.txt"), BUNDLED_LICENSE)?;
    }
    for p in cfg.data.iter_mut().filter(|p| p.as_path() == named) {
        *p = copy.clone();
    }
    Ok(())
}

/// The recipe with `--set key=value` overrides, not yet validated (callers set more fields, then
/// validate).
pub fn recipe(set: &[String]) -> Result<TrainConfig> {
    TrainConfig::read_text(Some((RECIPE, "configs/quickstart.toml".into())), set)
}

/// Runs the six steps, printing each as it starts.
pub fn run(opts: &QuickstartOptions) -> Result<QuickstartResult> {
    let mut cfg = opts.config.clone();
    let out = cfg.out.clone();
    use_bundled_data(&mut cfg)?;
    let step = |n: usize, what: &str| eprintln!("\n[{n}/6] {what}");

    step(1, &format!("model: {}", cfg.model));
    let source = crate::model::source::resolve(&cfg.model)?;
    eprintln!("      {}", source.path().display());

    step(2, "data: prepare (template, tokenize, split, pack)");
    let text = crate::model::TextSide::load(&cfg.model)?;
    let prepared = crate::data::prepare_cached(
        &cfg.prepare_options()?,
        &cfg.model,
        &text,
        &out.join("data"),
    )?;
    for (name, s) in &prepared.manifest.splits {
        eprintln!(
            "      {name}: {} examples, {} label tokens",
            s.examples, s.label_tokens
        );
    }

    let eval_opts = |adapter: Option<PathBuf>| -> Result<EvalOptions> {
        Ok(EvalOptions {
            model: cfg.model.clone(),
            base_dtype: cfg.held_base()?,
            adapter,
            prepare: cfg.prepare_options()?,
            split: Some("test".into()),
            metrics: vec![
                Metric::Loss,
                Metric::Perplexity,
                Metric::ExactMatch,
                Metric::Chrf,
            ],
            limit: opts.eval_limit,
            max_new_tokens: opts.max_new_tokens,
            batch_size: opts.batch_size,
            compare_base: false,
            allowed_scripts: vec![],
            out: out.join("eval"),
            data_dir: out.join("data"),
            device: cfg.device,
        })
    };
    let progress = |m: &str| eprintln!("      {m}");

    step(3, "evaluate the base model on the test split");
    let base = eval::evaluate(&eval_opts(None)?, progress)?;
    eprint!("{}", indent(&eval::report::table(&base)));

    step(4, "train a LoRA adapter");
    let summary = train::train(&cfg, false, true)?;
    eprintln!(
        "      {} steps, final loss {:.3}, validation loss {}, {:.0} tokens/s",
        summary.steps,
        summary.final_loss,
        summary
            .final_val_loss
            .map_or("-".into(), |v| format!("{v:.3}")),
        summary.tokens_per_sec
    );

    step(5, "evaluate the tuned adapter on the same examples");
    let adapter = summary.output.clone();
    let tuned = eval::evaluate(&eval_opts(Some(adapter.clone()))?, progress)?;
    let report = base.merge(tuned);
    let report_html = out.join("report.html");
    let report_json = out.join("eval.json");
    crate::fs::write_atomic(&report_html, eval::report::html(&report).as_bytes())?;
    let json = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
    crate::fs::write_atomic(&report_json, json.as_bytes())?;
    let lines: String = report
        .examples
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
        .collect();
    crate::fs::write_atomic(&out.join("eval").join("examples.jsonl"), lines.as_bytes())?;

    Ok(QuickstartResult {
        report,
        config: cfg,
        adapter,
        report_html,
        report_json,
    })
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("      {l}\n")).collect()
}

/// Whether running `name` through the search path `path` (the `PATH` variable's value) starts
/// the program `exe` — the first `name` found there is the same file once links are resolved.
/// The quickstart then prints its follow-up commands as `afinar …`, else with `exe`'s path, so
/// they run as printed after `cargo run -- quickstart` too.
pub fn on_path_as(name: &str, exe: &Path, path: Option<&OsStr>) -> bool {
    let (Ok(exe), Some(path)) = (exe.canonicalize(), path) else {
        return false;
    };
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .and_then(|found| found.canonicalize().ok())
        .is_some_and(|found| found == exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn on_path_only_when_the_first_match_is_this_program() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("real-afinar");
        std::fs::write(&exe, "").unwrap();
        let linked = dir.path().join("linked");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&linked).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(&exe, linked.join("afinar")).unwrap();
        std::fs::write(other.join("afinar"), "").unwrap();
        let path = |dirs: &[&Path]| std::env::join_paths(dirs).unwrap();

        assert!(on_path_as("afinar", &exe, Some(&path(&[&linked]))));
        // Another `afinar` earlier in PATH is the one a shell runs.
        assert!(!on_path_as("afinar", &exe, Some(&path(&[&other, &linked]))));
        assert!(on_path_as("afinar", &exe, Some(&path(&[&linked, &other]))));
        assert!(!on_path_as("afinar", &exe, Some(&path(&[dir.path()]))));
        assert!(!on_path_as("afinar", &exe, None));
    }
}
