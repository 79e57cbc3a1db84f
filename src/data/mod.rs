//! Steps 1 and 2 of the pipeline: load the user's dataset in any common shape, template and
//! tokenize it with answer-only labels, split it deterministically, pack it, and cache the
//! tokens in a memory-mappable file that training reuses.
//!
//! read (files → raw records) → shapes (records → examples) → split → encode (template,
//! tokenize, label mask) → pack → cache.

pub mod cache;
pub mod encode;
pub mod inspect;
pub mod pack;
pub mod read;
pub mod report;
pub mod shapes;
pub mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{Message, TextSide};
use crate::{Error, Result};
pub use encode::{Encoded, Encoder, Outcome, Overlong};
pub use pack::{Packed, Packing};
pub use read::Limits;
pub use report::Report;
pub use shapes::{Example, FieldMap, Format, Item};
pub use split::{SplitFractions, SPLITS};

/// Everything `afinar data prepare` can be told.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub data: Vec<PathBuf>,
    /// Own validation / test files instead of a fraction of `data`.
    pub val: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
    pub format: Format,
    pub fields: FieldMap,
    /// Field whose value keeps related examples in one split (e.g. all forms of one verb).
    pub split_key: Option<String>,
    pub split: SplitFractions,
    pub seed: u64,
    pub max_seq_len: usize,
    pub packing: Packing,
    pub overlong: Overlong,
    pub strict: bool,
    /// Size bounds on records and decompressed files.
    pub limits: read::Limits,
    /// System message given to conversations that have none (Axolotl's
    /// `default_system_message`); `None` leaves the template's own default.
    pub system: Option<String>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            data: vec![],
            val: vec![],
            test: vec![],
            format: Format::Auto,
            fields: FieldMap::default(),
            split_key: None,
            split: SplitFractions([0.9, 0.05, 0.05]),
            seed: 42,
            max_seq_len: 1024,
            packing: Packing::Pack,
            overlong: Overlong::Truncate,
            strict: false,
            limits: read::Limits::default(),
            system: None,
        }
    }
}

/// An example kept for evaluation: the conversation up to the answer, and the references.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalExample {
    pub location: String,
    /// Chat turns before the last assistant answer (chat shapes), or empty.
    pub messages: Vec<Message>,
    /// Raw prompt (completion shape), or empty.
    pub prompt: String,
    pub references: Vec<String>,
}

/// One prepared split.
#[derive(Debug, Clone, Default)]
pub struct SplitData {
    pub packed: Packed,
    pub eval_examples: Vec<EvalExample>,
    pub stats: SplitStats,
}

/// Counts and token statistics of a split.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitStats {
    pub examples: usize,
    pub sequences: usize,
    pub tokens: usize,
    pub label_tokens: usize,
    /// Example lengths in tokens: min, p50, p90, p99, max.
    pub length_percentiles: [usize; 5],
}

impl SplitStats {
    fn of(p: &Packed) -> Self {
        let mut lens: Vec<usize> = p
            .example_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect();
        lens.sort_unstable();
        let pct = |q: f64| {
            if lens.is_empty() {
                0
            } else {
                lens[((lens.len() - 1) as f64 * q).round() as usize]
            }
        };
        Self {
            examples: p.examples(),
            sequences: p.sequences(),
            tokens: p.ids.len(),
            label_tokens: p.labels.iter().map(|&l| l as usize).sum(),
            length_percentiles: [pct(0.0), pct(0.5), pct(0.9), pct(0.99), pct(1.0)],
        }
    }
}

/// The result of preparing a dataset.
pub struct Prepared {
    pub splits: BTreeMap<String, SplitData>,
    pub report: Report,
    /// Records read (before shape checks).
    pub records: usize,
    pub seconds: f64,
}

/// Reads, templates, tokenizes, splits and packs the dataset for `text` (the model's tokenizer
/// and chat template).
pub fn prepare(opts: &PrepareOptions, text: &TextSide) -> Result<Prepared> {
    let start = Instant::now();
    if opts.data.is_empty() {
        return Err(Error::InvalidArgument("no --data given".into()));
    }
    if opts.max_seq_len < 8 {
        return Err(Error::InvalidArgument(format!(
            "--max-seq-len {} is too small (minimum 8)",
            opts.max_seq_len
        )));
    }
    let mut report = Report::default();
    // Which split each source's records go to: None = by hash.
    let mut sources: Vec<(&PathBuf, Option<usize>)> = Vec::new();
    let own_eval = !opts.val.is_empty() || !opts.test.is_empty();
    for p in &opts.data {
        sources.push((p, own_eval.then_some(0)));
    }
    for p in &opts.val {
        sources.push((p, Some(1)));
    }
    for p in &opts.test {
        sources.push((p, Some(2)));
    }
    let mut records = Vec::new();
    for (path, fixed) in sources {
        let recs = read::read_path(path, opts.strict, opts.limits, &mut report)?;
        records.extend(recs.into_iter().map(|r| (r, fixed)));
    }
    let n_records = records.len();
    tracing::info!(
        "read {n_records} records in {:.2}s",
        start.elapsed().as_secs_f64()
    );

    // Shapes, in parallel; rejections reported in input order.
    let converted: Vec<_> = records
        .par_iter()
        .map(|(r, fixed)| {
            (
                shapes::to_item(r, opts.format, &opts.fields, opts.split_key.as_deref()),
                *fixed,
            )
        })
        .collect();
    let mut items: Vec<(Item, usize)> = Vec::with_capacity(converted.len());
    for (res, fixed) in converted {
        match res {
            Ok(mut item) => {
                if !item.coerced.is_empty() {
                    let msg = format!(
                        "{}: field {} holds a number or boolean, read as text",
                        item.location,
                        item.coerced
                            .iter()
                            .map(|f| format!("'{f}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if opts.strict {
                        return Err(Error::Data(format!(
                            "{msg} (--strict takes text fields only: quote the value)"
                        )));
                    }
                    report.note("number or boolean read as text", msg);
                }
                if let (Some(sys), Example::Chat(turns)) = (&opts.system, &mut item.example) {
                    if turns.first().is_none_or(|t| t.role != "system") {
                        turns.insert(
                            0,
                            shapes::Turn {
                                role: "system".into(),
                                content: sys.clone(),
                                train: false,
                            },
                        );
                    }
                }
                let split = fixed.unwrap_or_else(|| opts.split.assign(&item.split_key, opts.seed));
                items.push((item, split));
            }
            Err((kind, msg)) => {
                if opts.strict {
                    return Err(Error::Data(format!("{msg} (--strict)")));
                }
                report.skip(kind, msg);
            }
        }
    }

    if text
        .chat_template
        .as_ref()
        .is_some_and(|t| t.drops_reasoning())
    {
        for (item, _) in &items {
            let Example::Chat(turns) = &item.example else {
                continue;
            };
            if turns
                .iter()
                .any(|t| t.role == "assistant" && t.content.contains("</think>"))
            {
                report.note(
                    "examples with assistant reasoning (text up to </think>) that the chat template leaves out of some turns (DeepSeek-R1: all, Qwen3: those before the last question); those turns train on their answers",
                    format!("{}: assistant reasoning not in the rendered text", item.location),
                );
            }
        }
    }
    let encoder = Encoder::new(
        &text.tokenizer,
        text.chat_template.as_ref(),
        opts.max_seq_len,
        opts.overlong,
    );
    let outcomes: Vec<Outcome> = items
        .par_iter()
        .map(|(item, _)| encoder.encode(&item.example))
        .collect();
    let mut per_split: [Vec<Encoded>; 3] = Default::default();
    let mut evals: [Vec<EvalExample>; 3] = Default::default();
    for ((item, split), outcome) in items.iter().zip(outcomes) {
        match outcome {
            Outcome::Ok { parts, truncated } => {
                report.truncated += usize::from(truncated);
                per_split[*split].extend(parts);
                if *split > 0 {
                    evals[*split].push(eval_example(item));
                }
            }
            Outcome::TooLong => report.dropped_too_long += 1,
            Outcome::NoLabels => {
                report.zero_label_examples += 1;
                report.skip(
                    "no loss tokens",
                    format!(
                        "{}: no answer token left after templating and truncation",
                        item.location
                    ),
                );
            }
            Outcome::Rejected((kind, msg)) => {
                let msg = format!("{}: {msg}", item.location);
                if opts.strict {
                    return Err(Error::Data(format!("{msg} (--strict)")));
                }
                report.skip(kind, msg);
            }
        }
    }
    let kept: usize = per_split.iter().map(Vec::len).sum();
    if kept == 0 {
        let why = if report.zero_label_examples > 0 {
            format!(
                "all {} examples have no answer token left after templating and truncation to \
                 max_seq_len = {} (nothing to learn): the prompts, with the template's system \
                 text, fill it; raise max_seq_len (e.g. --max-seq-len {})",
                report.zero_label_examples,
                opts.max_seq_len,
                (opts.max_seq_len * 4).max(512)
            )
        } else if report.skipped > 0 {
            format!(
                "all {} records were skipped ({}); first: {}",
                report.skipped,
                report.summary_lines().join("; "),
                report.samples.first().map_or("", String::as_str)
            )
        } else {
            "the dataset is empty".to_string()
        };
        return Err(Error::Data(format!(
            "{}: {why}",
            opts.data
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut splits = BTreeMap::new();
    for (i, (encs, ev)) in per_split.into_iter().zip(evals).enumerate() {
        // Validation and test are packed like training: attention never crosses examples and
        // positions restart, so their loss is the same as one example at a time, with less padding.
        let packed = pack::pack(
            encs,
            opts.max_seq_len,
            opts.packing,
            opts.seed.wrapping_add(i as u64),
        );
        let stats = SplitStats::of(&packed);
        splits.insert(
            SPLITS[i].to_string(),
            SplitData {
                packed,
                eval_examples: ev,
                stats,
            },
        );
    }
    Ok(Prepared {
        splits,
        report,
        records: n_records,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn eval_example(item: &Item) -> EvalExample {
    let (messages, prompt) = match &item.example {
        Example::Chat(turns) => {
            let last = turns
                .iter()
                .rposition(|t| t.role == "assistant")
                .unwrap_or(turns.len());
            (
                turns[..last]
                    .iter()
                    .map(|t| Message::new(t.role.clone(), t.content.clone()))
                    .collect(),
                String::new(),
            )
        }
        Example::Completion { prompt, .. } => (vec![], prompt.clone()),
        Example::Text(_) => (vec![], String::new()),
    };
    EvalExample {
        location: item.location.clone(),
        messages,
        prompt,
        references: item.references.clone(),
    }
}

/// What `manifest.json` records about a prepared dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub afinar_version: String,
    /// Hash of everything that determines the output; equal keys mean the cache can be reused.
    pub key: String,
    pub model: String,
    pub sources: Vec<SourceFile>,
    pub tokenizer_hash: String,
    pub template_hash: String,
    pub settings: serde_json::Value,
    pub records: usize,
    pub splits: BTreeMap<String, SplitStats>,
    pub report: Report,
    pub prepare_seconds: f64,
}

/// A source file as the manifest records it (size and modification time decide reuse).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceFile {
    pub path: String,
    pub size: u64,
    pub modified_ns: u128,
}

fn source_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(Error::InvalidArgument(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
        // The same walk as the reader's, so the cache key covers exactly the files read.
        let files = if p.is_dir() {
            read::walk(p)?.files
        } else {
            vec![p.clone()]
        };
        for f in files {
            let md = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?;
            let modified_ns = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            out.push(SourceFile {
                path: f.display().to_string(),
                size: md.len(),
                modified_ns,
            });
        }
    }
    Ok(out)
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

fn settings_json(opts: &PrepareOptions) -> serde_json::Value {
    serde_json::json!({
        "format": format!("{:?}", opts.format).to_lowercase(),
        "fields": opts.fields.0.iter().collect::<BTreeMap<_, _>>(),
        "split_key": opts.split_key,
        "split": opts.split.0,
        "val": opts.val, "test": opts.test,
        "seed": opts.seed,
        "max_seq_len": opts.max_seq_len,
        "packing": format!("{:?}", opts.packing).to_lowercase(),
        "overlong": format!("{:?}", opts.overlong).to_lowercase(),
        "strict": opts.strict,
        "max_record_bytes": opts.limits.max_record_bytes,
        "system": opts.system,
    })
}

/// The manifest a preparation with these inputs would have (without results): used to decide
/// whether the cache in `out` is still valid.
fn manifest_key(
    opts: &PrepareOptions,
    model: &str,
    text: &TextSide,
) -> Result<(String, Vec<SourceFile>, String, String)> {
    let mut all = opts.data.clone();
    all.extend(opts.val.iter().cloned());
    all.extend(opts.test.iter().cloned());
    let sources = source_files(&all)?;
    let tok_json = serde_json::to_string(&text.tokenizer.inner)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let tokenizer_hash = hex(crate::rng::stable_hash(tok_json.as_bytes(), 0));
    let template = text
        .chat_template
        .as_ref()
        .map_or("", |t| t.source.as_str());
    let template_hash = hex(crate::rng::stable_hash(template.as_bytes(), 0));
    let key_material = serde_json::json!({
        "v": env!("CARGO_PKG_VERSION"), "model": model, "sources": sources, "tok": tokenizer_hash,
        "tmpl": template_hash, "settings": settings_json(opts),
    });
    let key = hex(crate::rng::stable_hash(
        key_material.to_string().as_bytes(),
        0,
    ));
    Ok((key, sources, tokenizer_hash, template_hash))
}

/// A prepared dataset on disk: manifest plus memory-mapped splits.
pub struct PreparedDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// True when an existing cache was reused.
    pub reused: bool,
}

impl PreparedDir {
    /// Opens the memory-mapped tokens of a split.
    pub fn split(&self, name: &str) -> Result<cache::TokenFile> {
        cache::TokenFile::open(&self.dir.join(format!("{name}.bin")))
    }

    /// Reads the evaluation examples of a split (validation, test).
    pub fn eval_examples(&self, name: &str) -> Result<Vec<EvalExample>> {
        let path = self.dir.join(format!("{name}.examples.jsonl"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| Error::bad_file(&path, format!("line {}: {e}", i + 1)))
            })
            .collect()
    }

    /// Opens a prepared directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::bad_file(dir, format!("not a prepared dataset (manifest.json: {e}); run `afinar data prepare --out {}`", dir.display()))
        })?;
        let manifest =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            reused: true,
        })
    }
}

/// Prepares into `out`, or reuses what is there if inputs, tokenizer, template and settings are
/// unchanged. The manifest is written last, so its presence means the cache is complete.
pub fn prepare_cached(
    opts: &PrepareOptions,
    model: &str,
    text: &TextSide,
    out: &Path,
) -> Result<PreparedDir> {
    let (key, sources, tokenizer_hash, template_hash) = manifest_key(opts, model, text)?;
    if let Ok(existing) = PreparedDir::open(out) {
        let complete = SPLITS
            .iter()
            .all(|s| out.join(format!("{s}.bin")).is_file());
        if existing.manifest.key == key && complete {
            return Ok(existing);
        }
    }
    let prepared = prepare(opts, text)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_file(out.join("manifest.json"));
    for (name, split) in &prepared.splits {
        cache::write(&out.join(format!("{name}.bin")), &split.packed)?;
        let mut jsonl = String::new();
        for ex in &split.eval_examples {
            jsonl.push_str(&serde_json::to_string(ex)?);
            jsonl.push('\n');
        }
        crate::fs::write_atomic(
            &out.join(format!("{name}.examples.jsonl")),
            jsonl.as_bytes(),
        )?;
    }
    let manifest = Manifest {
        afinar_version: env!("CARGO_PKG_VERSION").to_string(),
        key,
        model: model.to_string(),
        sources,
        tokenizer_hash,
        template_hash,
        settings: settings_json(opts),
        records: prepared.records,
        splits: prepared
            .splits
            .iter()
            .map(|(k, v)| (k.clone(), v.stats.clone()))
            .collect(),
        report: prepared.report,
        prepare_seconds: prepared.seconds,
    };
    let json = serde_json::to_string_pretty(&manifest)?;
    crate::fs::write_atomic(&out.join("manifest.json"), json.as_bytes())?;
    Ok(PreparedDir {
        dir: out.to_path_buf(),
        manifest,
        reused: false,
    })
}
