//! Argument groups and helpers more than one command uses: the model (and adapter) to load, the
//! sampling flags, the dataset flags of `data prepare`, and small parsers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use afinar::data::{FieldMap, Format, Overlong, Packing, PrepareOptions};
use afinar::device::DeviceSpec;
use afinar::infer::scripts::{parse_scripts, ScriptFilter};
use afinar::infer::{GenerateOptions, SamplingParams};
use afinar::model::{source::DEFAULT_MODEL, BaseDtype, Model};

#[derive(Args)]
pub struct ModelArg {
    /// A .gguf file, a Hugging Face model directory, a Hub repo id (org/name), or the alias smollm2.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// A LoRA adapter directory (PEFT format, e.g. RUN/adapter from `afinar train`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// How the base's weight matrices are held: auto (as the file has them: bf16 stays bf16, a
    /// GGUF stays quantized), f32, bf16, q8_0 or q4_0 (converted at load, e.g. to fit memory).
    #[arg(long, default_value = "auto", value_parser = parse_base_dtype)]
    pub base_dtype: BaseDtype,
    /// Decode with 8-bit integer dot products on GGUF-quantized weights, as llama.cpp does
    /// (faster; logits move by up to ~1 %, which can flip near ties). Default: exact f32.
    #[arg(long)]
    pub int8_dot: bool,
}

/// `--base-dtype` for clap.
pub fn parse_base_dtype(s: &str) -> std::result::Result<BaseDtype, String> {
    s.parse().map_err(|e: afinar::Error| e.to_string())
}

impl ModelArg {
    /// Loads the model on its device, with the adapter applied when one is given.
    pub fn load(&self) -> Result<Model> {
        let device = self.device.open()?;
        let mut m = Model::load_with(&self.model, &device, self.base_dtype)?;
        m.transformer.quantized_dot = self.int8_dot;
        if let Some(dir) = &self.adapter {
            afinar::export::peft::load(dir, &mut m.transformer, &self.model)?;
        }
        Ok(m)
    }
}

#[derive(Args)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalise tokens already present (1.0 = off), as Hugging Face's repetition_penalty.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Only let the model write letters of these Unicode scripts, e.g. Latin or Latin,Greek
    /// (Common — digits, punctuation, spaces — and Inherited are always allowed).
    #[arg(long)]
    pub allowed_scripts: Option<String>,
}

impl SamplingArgs {
    /// The generation options these flags ask for, checked.
    pub fn options(&self, model: &Model) -> Result<GenerateOptions> {
        let scripts = match &self.allowed_scripts {
            Some(list) => Some(Arc::new(ScriptFilter::new(
                &model.tokenizer,
                parse_scripts(list)?,
            ))),
            None => None,
        };
        let opts = GenerateOptions {
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
        };
        opts.sampling.validate()?;
        Ok(opts)
    }
}

/// Dataset options shared by `data prepare` (and, later, `train`).
#[derive(Args)]
pub struct DataArgs {
    /// Data file or directory (repeatable): .jsonl/.json(.gz/.zst), .csv/.tsv, .parquet, .txt, or a folder.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Shape of the records.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: Format,
    /// Map one of our field names to yours, e.g. --map instruction=question (repeatable).
    #[arg(long = "map", value_parser = parse_kv)]
    pub map: Vec<(String, String)>,
    /// Field whose value keeps related examples in the same split (e.g. --split-key verb).
    #[arg(long)]
    pub split_key: Option<String>,
    /// Train/validation/test fractions.
    #[arg(long, default_value = "0.9,0.05,0.05")]
    pub split: String,
    /// Your own validation file(s) instead of a fraction of --data.
    #[arg(long)]
    pub val: Vec<PathBuf>,
    /// Your own test file(s) instead of a fraction of --data.
    #[arg(long)]
    pub test: Vec<PathBuf>,
    /// Seed of the split and of the packing order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Maximum tokens per training sequence.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// One example per sequence (padding) instead of packing several.
    #[arg(long, conflicts_with = "pack")]
    pub pad: bool,
    /// Pack several examples per sequence (the default).
    #[arg(long)]
    pub pack: bool,
    /// Drop examples longer than --max-seq-len instead of truncating them.
    #[arg(long)]
    pub drop_long: bool,
    /// Make any bad record fatal instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
    /// Largest record (a JSONL line, CSV row or text file) in MB; larger ones are skipped and
    /// reported.
    #[arg(long, default_value_t = 16.0)]
    pub max_record_mb: f64,
    /// System message for conversations that have none (instead of the template's default).
    #[arg(long)]
    pub system: Option<String>,
}

impl DataArgs {
    /// The library's preparation options for these flags.
    pub fn options(&self) -> Result<PrepareOptions> {
        Ok(PrepareOptions {
            data: self.data.clone(),
            val: self.val.clone(),
            test: self.test.clone(),
            format: self.format,
            fields: FieldMap(self.map.iter().cloned().collect()),
            split_key: self.split_key.clone(),
            split: self.split.parse()?,
            seed: self.seed,
            max_seq_len: self.max_seq_len,
            packing: if self.pad {
                Packing::Pad
            } else {
                Packing::Pack
            },
            overlong: if self.drop_long {
                Overlong::Drop
            } else {
                Overlong::Truncate
            },
            strict: self.strict,
            limits: afinar::data::Limits {
                max_record_bytes: (self.max_record_mb * (1 << 20) as f64) as usize,
                ..Default::default()
            },
            system: self.system.clone(),
        })
    }
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse()
}

/// `KEY=VALUE` (spaces around either trimmed), for --map and --adapter NAME=DIR.
pub fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected OURS=YOURS, got '{s}'"))
}

/// The scripts of an `--allowed-scripts` list (none when the flag is absent).
pub fn scripts_arg(list: Option<&str>) -> Result<Vec<unicode_script::Script>> {
    Ok(list.map(parse_scripts).transpose()?.unwrap_or_default())
}

/// Quotes `s` for a POSIX shell command line: '…', or bash's $'…' when it holds newlines.
pub fn shell_quote(s: &str) -> String {
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

/// `s` as one shell word: as it is when it holds only characters no POSIX shell treats
/// specially (paths like runs/quickstart/adapter stay readable), else quoted by [`shell_quote`].
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        s.to_string()
    } else {
        shell_quote(s)
    }
}

/// clap's parser for `--device`.
pub fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    s.parse().map_err(|e: afinar::Error| e.to_string())
}
