//! Step 7 (export): the tuned model in the formats other tools load. PEFT adapters
//! ([`peft`]); a merged Hugging Face directory ([`hf`], LoRA folded in by [`merge`]); GGUF and
//! LoRA GGUF ([`gguf`]); an Ollama folder ([`ollama`]). [`export`] writes the targets asked for,
//! each under a temporary name renamed into place only after the [`identity`] self-check passed.

pub mod card;
pub mod gguf;
pub mod gguf_file;
pub mod hf;
pub mod identity;
pub mod merge;
pub mod ollama;
pub mod peft;
pub mod quant;
pub mod tensors;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::model::stream::ModelStream;
use crate::model::{Model, TextSide};
use crate::{Error, Result};
use gguf::GgufDtype;
use tensors::ModelInfo;

/// What `afinar export --to` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A merged Hugging Face directory.
    Hf,
    /// A merged GGUF file.
    Gguf,
    /// The adapter alone as a LoRA GGUF (llama.cpp `--lora`).
    GgufLora,
    /// A folder with the merged GGUF and a Modelfile.
    Ollama,
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hf" => Ok(Self::Hf),
            "gguf" => Ok(Self::Gguf),
            "gguf-lora" => Ok(Self::GgufLora),
            "ollama" => Ok(Self::Ollama),
            other => Err(Error::InvalidArgument(format!(
                "--to {other}: expected hf, gguf, gguf-lora or ollama"
            ))),
        }
    }
}

impl Target {
    /// The name used on the command line and as the artefact's name inside a multi-target
    /// output folder.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hf => "hf",
            Self::Gguf => "gguf",
            Self::GgufLora => "gguf-lora",
            Self::Ollama => "ollama",
        }
    }

    fn file_name(self, dtype: GgufDtype) -> String {
        match self {
            Self::Hf => "hf".into(),
            Self::Gguf => format!("model-{dtype}.gguf"),
            Self::GgufLora => "adapter.gguf".into(),
            Self::Ollama => "ollama".into(),
        }
    }
}

/// One `afinar export` invocation.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub targets: Vec<Target>,
    /// The artefact itself for one target; a folder holding one per target otherwise.
    pub out: PathBuf,
    /// Weight type: f32/f16/bf16 for hf; any [`GgufDtype`] for GGUF targets.
    pub dtype: Option<String>,
    pub overwrite: bool,
    /// Write even when a check fails (unknown template, identity mismatch).
    pub force: bool,
    /// Greedy tokens compared per probe in the identity check.
    pub check_tokens: usize,
    /// Conversations from the run's test split the identity check uses (built-in probes when
    /// the run has none).
    pub check_prompts: usize,
}

/// Writes every target of `req`, calling `report` with one line per finished target (where it
/// went and its identity verdict) as soon as it is in place.
///
/// The weights are streamed from the checkpoint one tensor at a time, the adapter merged into
/// each projection as it is read ([`tensors::Streamed`]): the model is never loaded whole for
/// writing. Every target is written under a temporary name first; then, unless
/// `--check-prompts 0`, the source model (base + adapter) is loaded once and each written file
/// is loaded back and checked ([`identity`]) before it is renamed into place.
pub fn export(req: &ExportRequest, device: &Device, mut report: impl FnMut(&str)) -> Result<()> {
    if req.targets.is_empty() {
        return Err(Error::InvalidArgument(
            "nothing to export: give --to hf, gguf, gguf-lora or ollama".into(),
        ));
    }
    let gguf_dtype: GgufDtype = req.dtype.as_deref().unwrap_or("f16").parse()?;
    if req.targets.contains(&Target::GgufLora) && req.adapter.is_none() {
        return Err(Error::InvalidArgument(
            "--to gguf-lora writes an adapter: give --adapter DIR (a PEFT adapter, e.g. RUN/adapter)".into(),
        ));
    }
    refuse_existing(&req.out, req.overwrite)?;
    let text = TextSide::load(&req.model)?;
    let stream = ModelStream::open(&text.source)?;
    let (merged, adapter_cfg) =
        tensors::Streamed::open(stream, req.adapter.as_deref(), &req.model)?;
    if let (Some(dir), Some(cfg)) = (&req.adapter, &adapter_cfg) {
        if let Some(base) = &cfg.base_model_name_or_path {
            if !same_model(base, &req.model) && !req.force {
                return Err(Error::InvalidArgument(format!(
                    "{}: the adapter was trained on {base}, not {}; export it with --model {base} (or pass --force if both are the same model)",
                    dir.display(),
                    req.model
                )));
            }
        }
    }
    let config = merged.stream.config.clone();
    let info = ModelInfo {
        source: &text.source,
        config: &config,
        tokenizer: &text.tokenizer,
        chat_template: text.chat_template.as_ref(),
    };
    let run = card::RunInfo::find(req.adapter.as_deref(), &req.model);
    let (probes, probe_source) = match run.as_ref().and_then(|r| r.test_probes(req.check_prompts)) {
        Some(p) => (p, "the run's test split"),
        None => (
            identity::builtin_probes(run.as_ref().and_then(|r| r.system.as_deref())),
            "built-in probes",
        ),
    };
    let multi = req.targets.len() > 1;
    if multi {
        std::fs::create_dir_all(&req.out).map_err(|e| Error::io(&req.out, e))?;
    }
    let mut written: Vec<(Target, PathBuf, PathBuf)> = Vec::new();
    let result = (|| -> Result<()> {
        for &target in &req.targets {
            let dest = if multi {
                req.out.join(target.file_name(gguf_dtype))
            } else {
                req.out.clone()
            };
            if multi {
                refuse_existing(&dest, req.overwrite)?;
            }
            let tmp = crate::fs::tmp_name(&dest);
            remove_any(&tmp)?;
            written.push((target, dest, tmp.clone()));
            write_target(target, req, &info, &merged, run.as_ref(), gguf_dtype, &tmp)?;
        }
        // The writers' buffers are gone; only the check's models are held from here on.
        drop(merged);
        let source = match req.check_prompts {
            0 => None,
            _ => Some(load_source(req, device)?),
        };
        for (target, dest, tmp) in &written {
            let line = match &source {
                None if *target == Target::GgufLora => LORA_LINE.to_string(),
                None => SKIPPED.to_string(),
                Some(source) => check_target(*target, req, source, &probes, gguf_dtype, tmp)?,
            };
            remove_any(dest)?;
            std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
            report(&format!(
                "{} → {}: {line} (prompts: {probe_source})",
                target.name(),
                dest.display()
            ));
        }
        Ok(())
    })();
    if result.is_err() {
        for (_, _, tmp) in &written {
            let _ = remove_any(tmp);
        }
    }
    result
}

/// The source model for the identity check: the base with the adapter attached (not merged).
fn load_source(req: &ExportRequest, device: &Device) -> Result<Model> {
    let mut source = Model::load(&req.model, device)?;
    if let Some(dir) = &req.adapter {
        peft::load(dir, &mut source.transformer, &req.model)?;
    }
    Ok(source)
}

/// Writes `target` at `tmp` from the streamed, merged weights.
fn write_target(
    target: Target,
    req: &ExportRequest,
    info: &ModelInfo,
    merged: &tensors::Streamed,
    run: Option<&card::RunInfo>,
    gguf_dtype: GgufDtype,
    tmp: &Path,
) -> Result<()> {
    match target {
        Target::Hf => {
            let opts = hf::HfOptions {
                dtype: hf_dtype(hf_flag(req), &merged.stream.file_dtype)?,
                end_of_turn: identity::end_of_turn_of(info.tokenizer, info.chat_template)?
                    .map(|e| e.1),
                card: Some(card::model_card(req, run)),
                ..hf::HfOptions::default()
            };
            hf::save_from(tmp, info, merged, &opts)
        }
        Target::Gguf => gguf::write_from(info, merged, gguf_dtype, tmp),
        Target::GgufLora => {
            let adapter = req.adapter.as_deref().expect("checked in export");
            gguf::write_lora_for(info, merged, adapter, tmp)
        }
        Target::Ollama => {
            let system = run.and_then(|r| r.system.as_deref());
            let mf = ollama::modelfile_for(*info, "model.gguf", system, req.force)?;
            std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
            crate::fs::write_atomic(&tmp.join("Modelfile"), mf.text.as_bytes())?;
            gguf::write_from(info, merged, gguf_dtype, &tmp.join("model.gguf"))
        }
    }
}

/// The identity verdict of the target written at `tmp`.
fn check_target(
    target: Target,
    req: &ExportRequest,
    source: &Model,
    probes: &[Vec<crate::model::Message>],
    gguf_dtype: GgufDtype,
    tmp: &Path,
) -> Result<String> {
    match target {
        Target::Hf => {
            let back = Model::load(&tmp.display().to_string(), source.transformer.device())?;
            let v = identity::check("hf", source, &back, probes, req.check_tokens, true)?;
            identity::enforce(&v, req.force)?;
            Ok(v.line)
        }
        Target::Gguf => gguf_identity(req, source, tmp, probes, gguf_dtype),
        Target::GgufLora => Ok(LORA_LINE.into()),
        Target::Ollama => gguf_identity(req, source, &tmp.join("model.gguf"), probes, gguf_dtype),
    }
}

/// The line of a written LoRA GGUF (it has no check of its own: llama.cpp applies it).
const LORA_LINE: &str = "LoRA GGUF written (load it over the base GGUF with llama-server --lora)";

/// Loads a written GGUF back and runs the identity check: exact for f32/f16/bf16, a report of
/// the first divergence for quantized files.
fn gguf_identity(
    req: &ExportRequest,
    source: &Model,
    path: &Path,
    probes: &[Vec<crate::model::Message>],
    dtype: GgufDtype,
) -> Result<String> {
    let back = Model::load(&path.display().to_string(), source.transformer.device())?;
    let exact = !matches!(dtype, GgufDtype::Q8_0 | GgufDtype::Q4_0);
    let v = identity::check("gguf", source, &back, probes, req.check_tokens, exact)?;
    identity::enforce(&v, req.force)?;
    Ok(v.line)
}

/// The line of a target written with `--check-prompts 0`.
const SKIPPED: &str = "written; token-identity check skipped (--check-prompts 0)";

/// The `--dtype` that applies to the hf target: a quantized type asked for alongside a GGUF
/// target is that target's, and the hf folder keeps its default.
fn hf_flag(req: &ExportRequest) -> Option<&str> {
    let dtype = req.dtype.as_deref()?;
    let quantized = matches!(dtype.to_ascii_lowercase().as_str(), "q8_0" | "q4_0");
    let gguf_too = req
        .targets
        .iter()
        .any(|t| matches!(t, Target::Gguf | Target::Ollama));
    (!(quantized && gguf_too)).then_some(dtype)
}

/// The hf weight type: `--dtype` when given, else the source's own (bf16/f16 stay, anything
/// else — f32, a quantized GGUF — is written in f32).
fn hf_dtype(flag: Option<&str>, file_dtype: &str) -> Result<DType> {
    match flag.map(str::to_ascii_lowercase).as_deref() {
        Some("f32") => Ok(DType::F32),
        Some("f16") => Ok(DType::F16),
        Some("bf16") => Ok(DType::BF16),
        Some(other) => Err(Error::InvalidArgument(format!(
            "--dtype {other} is a GGUF type; --to hf writes f32, f16 or bf16"
        ))),
        None => Ok(match file_dtype.to_ascii_uppercase().as_str() {
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            _ => DType::F32,
        }),
    }
}

/// Whether two model specs name the same model: equal strings, or paths to the same file or
/// folder; an alias against a path is resolved. Two different names that are not paths here are
/// different models.
fn same_model(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let canon = |s: &str| std::fs::canonicalize(s).ok();
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => false,
        // One side is a name, the other a path: the alias `smollm2` is resolved as `--model`
        // would; a Hub id is not fetched for this (the shape check then decides).
        (Some(path), None) | (None, Some(path)) => {
            let name = if canon(a).is_some() { b } else { a };
            if name != crate::model::source::DEFAULT_MODEL {
                return true;
            }
            crate::model::source::ensure_default_model()
                .ok()
                .and_then(|p| std::fs::canonicalize(p).ok())
                == Some(path)
        }
    }
}

/// Errors when `path` is a non-empty folder or an existing file, unless `overwrite`.
fn refuse_existing(path: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    let occupied = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .next()
            .is_some()
    } else {
        path.exists()
    };
    if occupied {
        return Err(Error::InvalidArgument(format!(
            "{}: already exists and is not empty; choose another --out or pass --overwrite",
            path.display()
        )));
    }
    Ok(())
}

fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        return Ok(());
    };
    r.map_err(|e| Error::io(path, e))
}
