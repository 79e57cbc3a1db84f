//! GGUF export: a model as a llama.cpp model file (`write_from`, streamed tensor by tensor;
//! `write_model` for a model in memory) and a PEFT LoRA adapter
//! as a llama.cpp LoRA file (`write_lora`), with the metadata llama.cpp's own converters
//! (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`) write, so llama.cpp, Ollama and LM
//! Studio run the file as they would a converted one, and afinar loads it back unchanged.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::gguf_file::{self, GgmlType, MetaValue, TensorPlan};
use super::tensors::{Loaded, ModelInfo, TensorSource};
use crate::model::layout::{self, Role};
use crate::model::{
    Architecture, ChatTemplate, Message, Model, ModelConfig, ModelSource, TextTokenizer,
};
use crate::{Error, Result};

/// Tensor storage type of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl GgufDtype {
    /// Every type, in the order `--help` lists them.
    pub const ALL: [GgufDtype; 5] = [
        GgufDtype::F32,
        GgufDtype::F16,
        GgufDtype::Bf16,
        GgufDtype::Q8_0,
        GgufDtype::Q4_0,
    ];

    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::Bf16 => "bf16",
            GgufDtype::Q8_0 => "q8_0",
            GgufDtype::Q4_0 => "q4_0",
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            GgufDtype::F32 => GgmlType::F32,
            GgufDtype::F16 => GgmlType::F16,
            GgufDtype::Bf16 => GgmlType::Bf16,
            GgufDtype::Q8_0 => GgmlType::Q8_0,
            GgufDtype::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// llama.cpp's `llama_ftype` (`general.file_type`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q4_0 => 2,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    fn quantized(self) -> bool {
        matches!(self, GgufDtype::Q8_0 | GgufDtype::Q4_0)
    }
}

impl FromStr for GgufDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        GgufDtype::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "GGUF dtype '{s}' is not supported; use one of f32, f16, bf16, q8_0, q4_0"
                ))
            })
    }
}

impl fmt::Display for GgufDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Writes `model` (its transformer as loaded — an adapter still attached is merged, W + s·BA in
/// f32) as a GGUF v3 file.
pub fn write_model(model: &Model, dtype: GgufDtype, path: &Path) -> Result<()> {
    write_from(&ModelInfo::of(model), &Loaded::new(model), dtype, path)
}

/// Writes the model described by `info` with the weights of `src` as a GGUF v3 file: the header
/// and tensor table from the shapes alone, then each tensor read, permuted (llama's Q/K),
/// quantized and written in turn, so one tensor is in memory at a time.
pub fn write_from(
    info: &ModelInfo,
    src: &dyn TensorSource,
    dtype: GgufDtype,
    path: &Path,
) -> Result<()> {
    let c = info.config;
    let arch = gguf_arch(c.architecture);
    let mut meta = vec![
        kv("general.architecture", MetaValue::Str(arch.into())),
        kv("general.type", MetaValue::Str("model".into())),
        kv("general.name", MetaValue::Str(model_name(info.source))),
        kv("general.file_type", MetaValue::U32(dtype.file_type())),
    ];
    if dtype.quantized() {
        meta.push(kv("general.quantization_version", MetaValue::U32(2)));
    }
    let u = |x: usize| MetaValue::U32(x as u32);
    meta.extend([
        kv(&format!("{arch}.vocab_size"), u(c.vocab_size)),
        kv(
            &format!("{arch}.context_length"),
            u(c.max_position_embeddings),
        ),
        kv(&format!("{arch}.embedding_length"), u(c.hidden_size)),
        kv(&format!("{arch}.block_count"), u(c.num_layers)),
        kv(
            &format!("{arch}.feed_forward_length"),
            u(c.intermediate_size),
        ),
        kv(&format!("{arch}.attention.head_count"), u(c.num_heads)),
        kv(
            &format!("{arch}.attention.head_count_kv"),
            u(c.num_kv_heads),
        ),
        kv(
            &format!("{arch}.rope.freq_base"),
            MetaValue::F32(c.rope_theta as f32),
        ),
        kv(
            &format!(
                "{arch}.attention.{}",
                match c.architecture.layer_norm() {
                    true => "layer_norm_epsilon",
                    false => "layer_norm_rms_epsilon",
                }
            ),
            MetaValue::F32(c.rms_norm_eps as f32),
        ),
        kv(&format!("{arch}.rope.dimension_count"), u(c.rotary_dim())),
    ]);
    if c.head_dim * c.num_heads != c.hidden_size {
        meta.push(kv(&format!("{arch}.attention.key_length"), u(c.head_dim)));
        meta.push(kv(&format!("{arch}.attention.value_length"), u(c.head_dim)));
    }
    meta.extend(family_meta(c, arch)?);
    meta.extend(tokenizer_meta(
        info.tokenizer,
        info.chat_template,
        c.vocab_size,
    )?);

    let shape = |hf: &str| {
        src.shape(hf)
            .ok_or_else(|| Error::bad_file(info.source.path(), format!("missing tensor '{hf}'")))
    };
    let mut items: Vec<Item> = Vec::new();
    let tied = src.shape("lm_head.weight").is_none();
    items.push(Item::new(
        "token_embd.weight",
        Src::Hf("model.embed_tokens.weight".into()),
        shape("model.embed_tokens.weight")?,
        weight_type(dtype, "token_embd.weight", c.hidden_size, tied),
    ));
    if let Some(l) = &c.longrope {
        // Phi-3's LongRoPE as llama.cpp's converter writes it: both factor sets as tensors.
        for (name, f) in [
            ("rope_factors_long.weight", &l.long_factor),
            ("rope_factors_short.weight", &l.short_factor),
        ] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            let n = v.len();
            items.push(Item::new(name, Src::Data(v), vec![n], GgmlType::F32));
        }
    }
    if let Some(factors) = rope_freq_factors(c, src)? {
        let n = factors.len();
        items.push(Item::new(
            "rope_freqs.weight",
            Src::Data(factors),
            vec![n],
            GgmlType::F32,
        ));
    }
    for i in 0..c.num_layers {
        for t in layout::layer_tensors(c, i) {
            let shape = shape(&t.hf)?;
            let module = t.gguf.split('.').nth(2).unwrap_or_default().to_string();
            let ty = match t.role {
                Role::Matrix => weight_type(dtype, &t.gguf, shape[1], tied),
                Role::Norm | Role::Bias => GgmlType::F32,
            };
            let mut item = Item::new(&t.gguf, Src::Hf(t.hf), shape, ty);
            if t.role != Role::Norm {
                item.permute = qk_heads(c, &module);
            }
            item.add_one = layout::gguf_adds_one(c.architecture, &t.gguf);
            items.push(item);
        }
    }
    let mut output_norm = Item::new(
        "output_norm.weight",
        Src::Hf("model.norm.weight".into()),
        shape("model.norm.weight")?,
        GgmlType::F32,
    );
    output_norm.add_one = layout::gguf_adds_one(c.architecture, "output_norm.weight");
    items.push(output_norm);
    if let Some(b) = src.shape("model.norm.bias") {
        items.push(Item::new(
            "output_norm.bias",
            Src::Hf("model.norm.bias".into()),
            b,
            GgmlType::F32,
        ));
    }
    if let Some(head) = src.shape("lm_head.weight") {
        items.push(Item::new(
            "output.weight",
            Src::Hf("lm_head.weight".into()),
            head,
            weight_type(dtype, "output.weight", c.hidden_size, false),
        ));
    }
    write_items(path, &meta, items, Some(src))
}

/// Writes a PEFT LoRA adapter directory as a llama.cpp LoRA GGUF for `base` (the model it was
/// trained on): `blk.N.attn_q.weight.lora_a` (r × in) and `.lora_b` (out × r) in f32, the
/// Q/K row permutation applied to `lora_b` for llama, as `convert_lora_to_gguf.py` writes them.
pub fn write_lora(base: &Model, adapter_dir: &Path, path: &Path) -> Result<()> {
    write_lora_for(&ModelInfo::of(base), &Loaded::new(base), adapter_dir, path)
}

/// [`write_lora`] for a base described by `info` whose weight shapes `base` gives (no weight is
/// read).
pub fn write_lora_for(
    info: &ModelInfo,
    base: &dyn TensorSource,
    adapter_dir: &Path,
    path: &Path,
) -> Result<()> {
    let (cfg, mut tensors) =
        super::peft::read(adapter_dir, info.config.architecture, &Device::Cpu)?;
    let base_name = model_name(info.source);
    let misfit = super::peft::misfit(adapter_dir, &cfg, &base_name);
    let c = info.config;
    let mut items = Vec::new();
    let mut lora = Vec::new();
    for i in 0..c.num_layers {
        for &(hf_module, module) in layout::projection_names(c.architecture) {
            let hf = format!("base_model.model.model.layers.{i}.{hf_module}");
            let a = tensors.remove(&format!("{hf}.lora_A.weight"));
            let b = tensors.remove(&format!("{hf}.lora_B.weight"));
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => return Err(misfit(format!("{hf} has only one of lora_A and lora_B"))),
            };
            let w = format!("model.layers.{i}.{hf_module}.weight");
            let (out, inp) = match base.shape(&w).as_deref() {
                Some(&[out, inp]) => (out, inp),
                _ => return Err(misfit(format!("the model has no 2-D {w}"))),
            };
            if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
                return Err(misfit(format!(
                    "{hf} is {out}×{inp} but the adapter has A {:?} and B {:?} (r = {})",
                    a.dims(),
                    b.dims(),
                    cfg.r
                )));
            }
            lora.push((format!("blk.{i}.{module}.weight"), module, a, b));
        }
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(misfit(format!(
            "tensor {extra} has no matching module (only LoRA on the attention and MLP projections is exported)"
        )));
    }
    if lora.is_empty() {
        return Err(misfit("the adapter holds no LoRA tensors".into()));
    }
    for (name, module, a, b) in lora {
        let (a_shape, b_shape) = (a.dims().to_vec(), b.dims().to_vec());
        items.push(Item::new(
            &format!("{name}.lora_a"),
            Src::Tensor(a),
            a_shape,
            GgmlType::F32,
        ));
        let mut ib = Item::new(
            &format!("{name}.lora_b"),
            Src::Tensor(b),
            b_shape,
            GgmlType::F32,
        );
        ib.permute = qk_heads(c, module);
        items.push(ib);
    }
    // llama.cpp scales by alpha / r, r read from lora_a; rsLoRA's alpha / √r becomes
    // (alpha·√r) / r, as convert_lora_to_gguf.py writes it.
    let alpha = if cfg.use_rslora {
        cfg.lora_alpha * (cfg.r as f64).sqrt()
    } else {
        cfg.lora_alpha
    };
    let adapter_name = adapter_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let meta = vec![
        kv(
            "general.architecture",
            MetaValue::Str(gguf_arch(c.architecture).into()),
        ),
        kv("general.type", MetaValue::Str("adapter".into())),
        kv(
            "general.name",
            MetaValue::Str(format!("{base_name} LoRA {adapter_name}")),
        ),
        kv("general.file_type", MetaValue::U32(0)),
        kv("adapter.type", MetaValue::Str("lora".into())),
        kv("adapter.lora.alpha", MetaValue::F32(alpha as f32)),
    ];
    write_items(path, &meta, items, None)
}

/// Where a tensor's values come from.
enum Src {
    /// The model's tensor of this Hugging Face name.
    Hf(String),
    /// A small tensor held here (an adapter matrix).
    Tensor(Tensor),
    Data(Vec<f32>),
}

/// One tensor to write: what and how; `permute` = heads for llama's Q/K row order; `add_one`
/// for Gemma's norms, which llama.cpp stores as 1 + w.
struct Item {
    plan: TensorPlan,
    src: Src,
    permute: Option<usize>,
    add_one: bool,
}

impl Item {
    fn new(name: &str, src: Src, shape: Vec<usize>, ty: GgmlType) -> Self {
        let ty = if shape.len() < 2 { GgmlType::F32 } else { ty };
        Self {
            plan: TensorPlan {
                name: name.to_string(),
                shape,
                ty,
            },
            src,
            permute: None,
            add_one: false,
        }
    }

    /// The values in row-major order into `v` (one f32 copy of this tensor, in a buffer reused
    /// from tensor to tensor).
    fn values(&self, src: Option<&dyn TensorSource>, v: &mut Vec<f32>) -> Result<()> {
        match &self.src {
            Src::Data(d) => d.clone_into(v),
            Src::Hf(name) => src
                .expect("model tensors are written with their source")
                .read_into(name, v)?,
            Src::Tensor(t) => {
                *v = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        }
        if v.len() != self.plan.elems() {
            return Err(Error::Unsupported(format!(
                "GGUF writer: tensor {} has {} values for shape {:?} (a bug in afinar's export)",
                self.plan.name,
                v.len(),
                self.plan.shape
            )));
        }
        if self.permute.is_some() {
            *v = permuted(std::mem::take(v), self.permute, &self.plan.shape);
        }
        if self.add_one {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(())
    }
}

fn write_items(
    path: &Path,
    meta: &[(String, MetaValue)],
    items: Vec<Item>,
    src: Option<&dyn TensorSource>,
) -> Result<()> {
    let plan: Vec<TensorPlan> = items.iter().map(|i| i.plan.clone()).collect();
    let mut v = Vec::new();
    gguf_file::write(path, meta, &plan, |i, w| {
        let item = &items[i];
        item.values(src, &mut v)?;
        w.encode(item.plan.ty, &v)
    })
}

/// llama.cpp's `permute(w, n_head)` on rows: (n_head, 2, d/2, …) → (n_head, d/2, 2, …), so its
/// interleaved RoPE sees Hugging Face's half-split layout. `src/model/gguf.rs` undoes it.
fn permuted(v: Vec<f32>, heads: Option<usize>, shape: &[usize]) -> Vec<f32> {
    let Some(heads) = heads else { return v };
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let half = rows / heads / 2;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let src = (h * 2 * half + i * half + j) * cols;
                let dst = (h * 2 * half + j * 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&v[src..src + cols]);
            }
        }
    }
    out
}

/// Heads to permute Q/K rows by (the families llama.cpp runs with interleaved RoPE; the others
/// use the half-split RoPE as is).
fn qk_heads(c: &crate::model::ModelConfig, module: &str) -> Option<usize> {
    if !c.architecture.gguf_permutes_qk() {
        return None;
    }
    match module {
        "attn_q" => Some(c.num_heads),
        "attn_k" => Some(c.num_kv_heads),
        _ => None,
    }
}

/// The GGUF architecture name: Mistral is `llama` in llama.cpp, as its converter writes it.
fn gguf_arch(a: Architecture) -> &'static str {
    match a {
        Architecture::Llama | Architecture::Mistral => "llama",
        other => other.name(),
    }
}

/// The keys only some families have, as llama.cpp's converter writes them: Gemma 3's window,
/// the sliding layers' RoPE base, its linear scaling (SmolLM3's RoPE-less layers are fixed in
/// llama.cpp: every 4th, which is what its configs say).
fn family_meta(c: &crate::model::ModelConfig, arch: &str) -> Result<Vec<(String, MetaValue)>> {
    let mut meta = Vec::new();
    if matches!(c.architecture, Architecture::Mistral | Architecture::Phi3) {
        if let Some(w) = c.sliding_window.filter(|&w| w < c.max_position_embeddings) {
            tracing::warn!(
                "llama.cpp applies no sliding window to {}: past {w} tokens the GGUF attends \
                 over the whole context, unlike the model",
                c.architecture.name()
            );
        }
    }
    if let Some(l) = &c.longrope {
        meta.push(kv(
            &format!("{arch}.rope.scaling.original_context_length"),
            MetaValue::U32(l.original_max_position_embeddings as u32),
        ));
        meta.push(kv(
            &format!("{arch}.rope.scaling.attn_factor"),
            MetaValue::F32(l.attention_factor as f32),
        ));
    }
    if c.architecture != Architecture::Gemma3 {
        return Ok(meta);
    }
    if let Some(w) = c.sliding_window {
        // llama.cpp reads no pattern from the converter's files: every 6th layer is global.
        let default: Vec<bool> = (0..c.num_layers).map(|i| i % 6 < 5).collect();
        if c.sliding_layers != default {
            return Err(Error::Unsupported(format!(
                "this Gemma 3 slides on layers {:?}; llama.cpp assumes every 6th layer global",
                c.sliding_layers
            )));
        }
        meta.push(kv(
            &format!("{arch}.attention.sliding_window"),
            MetaValue::U32(w as u32),
        ));
    }
    if let Some(t) = c.rope_local_theta {
        meta.push(kv(
            &format!("{arch}.rope.freq_base_swa"),
            MetaValue::F32(t as f32),
        ));
    }
    if let Some(f) = c.rope_linear_factor {
        meta.push(kv(
            &format!("{arch}.rope.scaling.type"),
            MetaValue::Str("linear".into()),
        ));
        meta.push(kv(
            &format!("{arch}.rope.scaling.factor"),
            MetaValue::F32(f as f32),
        ));
    }
    if c.query_pre_attn_scalar != Some(c.head_dim as f64) {
        return Err(Error::Unsupported(format!(
            "query_pre_attn_scalar {:?} differs from head_dim {}; llama.cpp scales by head_dim",
            c.query_pre_attn_scalar, c.head_dim
        )));
    }
    Ok(meta)
}

/// Storage type of a 2-D weight, following `llama-quantize` for Q4_0/Q8_0: the output head
/// (the token embedding when it is tied) gets Q8_0 when its rows are not a multiple of 256
/// (llama-quantize's Q6_K otherwise, a k-quant afinar does not write: Q8_0 there too, slightly
/// larger and more precise); rows that do not fill 32-value blocks stay f16.
fn weight_type(dtype: GgufDtype, name: &str, cols: usize, tied: bool) -> GgmlType {
    let is_head = name == "output.weight" || (tied && name == "token_embd.weight");
    let ty = if dtype == GgufDtype::Q4_0 && is_head {
        GgmlType::Q8_0
    } else {
        dtype.ggml()
    };
    if ty.fits(cols) {
        ty
    } else {
        GgmlType::F16
    }
}

/// Llama 3 RoPE scaling as the per-frequency divisors llama.cpp reads from `rope_freqs.weight`
/// (computed as `convert_hf_to_gguf.py` does), or the ones the source GGUF carried.
fn rope_freq_factors(c: &ModelConfig, src: &dyn TensorSource) -> Result<Option<Vec<f32>>> {
    if let Some(s) = &c.rope_scaling {
        let d = c.head_dim;
        let old = s.original_max_position_embeddings as f64;
        let (low, high) = (old / s.low_freq_factor, old / s.high_freq_factor);
        let factors = (0..d / 2)
            .map(|i| {
                let freq = 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < high {
                    1.0
                } else if wavelen > low {
                    s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    1.0 / ((1.0 - smooth) / s.factor + smooth)
                };
                f as f32
            })
            .collect();
        return Ok(Some(factors));
    }
    src.rope_freqs()
}

fn kv(key: &str, v: MetaValue) -> (String, MetaValue) {
    (key.to_string(), v)
}

/// `general.name`: the source file or folder name without extension or quantization suffix.
fn model_name(source: &ModelSource) -> String {
    let p = source.path();
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    match source {
        ModelSource::Gguf(_) => name.split('.').next().unwrap_or(&name).to_string(),
        ModelSource::HfDir(_) => name,
    }
}

// llama.cpp token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// `tokenizer.*` metadata: the vocabulary as llama.cpp's converter writes it (gpt2 byte-level
/// BPE with merges, or `llama` SentencePiece with scores), special ids, BOS as the tokenizer
/// adds it, and the chat template. EOS is the chat's end-of-turn token, so llama.cpp stops
/// where afinar stops.
fn tokenizer_meta(
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>> {
    let json: Value = serde_json::from_str(
        &tok.inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?,
    )?;
    let m = &json["model"];
    if m["type"].as_str() != Some("BPE") {
        return Err(Error::Unsupported(format!(
            "GGUF export: tokenizer model {} is not supported (only BPE: byte-level or SentencePiece)",
            m["type"]
        )));
    }
    let spm = m["byte_fallback"].as_bool() == Some(true);
    let vocab = tok.inner.get_vocab(true);
    let n = vocab
        .values()
        .map(|&i| i as usize + 1)
        .max()
        .unwrap_or(0)
        .max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, &i) in &vocab {
        tokens[i as usize] = Some(t.clone());
    }
    let added = tok.inner.get_added_tokens_decoder();
    let unk = m["unk_token"].as_str();
    let mut types = Vec::with_capacity(n);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            None => {
                types.push(USER_DEFINED);
                format!("[PAD{i}]")
            }
            Some(t) => {
                types.push(match added.get(&(i as u32)) {
                    _ if Some(t.as_str()) == unk => UNKNOWN,
                    Some(a) if a.special => CONTROL,
                    Some(_) => USER_DEFINED,
                    None if spm && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') => BYTE,
                    None => NORMAL,
                });
                t
            }
        })
        .collect();
    let id = |name: &Option<String>| name.as_deref().and_then(|t| tok.inner.token_to_id(t));
    let bos = id(&tok.bos_token);
    let eos = template
        .and_then(|t| end_of_turn(tok, t))
        .or_else(|| tok.eos_id());
    let add_bos = match bos {
        Some(b) => tok.encode("a", true)?.first() == Some(&b),
        None => false,
    };
    let mut meta = vec![kv(
        "tokenizer.ggml.model",
        MetaValue::Str(if spm { "llama" } else { "gpt2" }.into()),
    )];
    if !spm {
        meta.push(kv(
            "tokenizer.ggml.pre",
            MetaValue::Str(pre_tokenizer(&json).into()),
        ));
    }
    let scores = spm.then(|| {
        // SentencePiece merges by score: later pieces rank lower, control and byte pieces 0.
        (0..n)
            .map(|i| if types[i] == NORMAL { -(i as f32) } else { 0.0 })
            .collect::<Vec<_>>()
    });
    meta.push(kv("tokenizer.ggml.tokens", MetaValue::StrArray(tokens)));
    if let Some(s) = scores {
        meta.push(kv("tokenizer.ggml.scores", MetaValue::F32Array(s)));
    }
    meta.push(kv("tokenizer.ggml.token_type", MetaValue::I32Array(types)));
    if !spm {
        let merges = m["merges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| match x {
                        Value::String(s) => Some(s.clone()),
                        Value::Array(p) => {
                            Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        meta.push(kv("tokenizer.ggml.merges", MetaValue::StrArray(merges)));
    }
    let u = |x: u32| MetaValue::U32(x);
    if let Some(b) = bos {
        meta.push(kv("tokenizer.ggml.bos_token_id", u(b)));
    }
    if let Some(e) = eos {
        meta.push(kv("tokenizer.ggml.eos_token_id", u(e)));
    }
    if let Some(u_id) = unk.and_then(|t| tok.inner.token_to_id(t)) {
        meta.push(kv("tokenizer.ggml.unknown_token_id", u(u_id)));
    }
    let pad = json["padding"]["pad_id"].as_u64().map(|p| p as u32).or(eos);
    if let Some(p) = pad {
        meta.push(kv("tokenizer.ggml.padding_token_id", u(p)));
    }
    meta.push(kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos)));
    meta.push(kv("tokenizer.ggml.add_eos_token", MetaValue::Bool(false)));
    if spm {
        let prepend = json["normalizer"].to_string().contains("\"Prepend\"")
            || json["pre_tokenizer"].to_string().contains("\"Metaspace\"");
        meta.push(kv(
            "tokenizer.ggml.add_space_prefix",
            MetaValue::Bool(prepend),
        ));
    }
    if let Some(t) = template {
        meta.push(kv(
            "tokenizer.chat_template",
            MetaValue::Str(t.source.clone()),
        ));
    }
    Ok(meta)
}

/// The end token the chat template writes after an assistant answer (`<|im_end|>` for ChatML,
/// `<|eot_id|>` for Llama 3): the token generation must stop at.
fn end_of_turn(tok: &TextTokenizer, t: &ChatTemplate) -> Option<u32> {
    const ANSWER: &str = "ANSWER_7f3a";
    let text = t
        .render(
            &[
                Message::new("user", "Hi"),
                Message::new("assistant", ANSWER),
            ],
            false,
        )
        .ok()?;
    let tail = &text[text.rfind(ANSWER)? + ANSWER.len()..];
    tok.end_token_ids
        .iter()
        .filter_map(|&id| {
            let s = tok.inner.id_to_token(id)?;
            tail.find(s.as_str()).map(|pos| (pos, id))
        })
        .min()
        .map(|(_, id)| id)
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its pre-tokenizer: the
/// split regex (Llama 3, Qwen2) or SmolLM's digit splitting, else GPT-2's (`gpt-2`).
fn pre_tokenizer(json: &Value) -> &'static str {
    let pre = json["pre_tokenizer"].to_string();
    // The regexes as they appear JSON-escaped: Llama 3 groups digits by three, Qwen2 one by one.
    for (needle, name) in [(r"\\p{N}{1,3}", "llama-bpe"), (r"|\\p{N}|", "qwen2")] {
        if pre.contains(needle) {
            return name;
        }
    }
    if pre.contains("\"Digits\"") && pre.contains("\"individual_digits\":true") {
        return "smollm";
    }
    // llama.cpp's name for GPT-2's own split (it rejects "gpt2").
    "gpt-2"
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in GgufDtype::ALL {
            assert_eq!(d.to_string().parse::<GgufDtype>().unwrap(), d);
        }
        assert!("q4_k".parse::<GgufDtype>().is_err());
    }

    /// The writer's permutation is the inverse of the loader's `unpermute`.
    #[test]
    fn permutation_matches_llama_cpp() {
        // 2 heads of 4 rows (d/2 = 2), 1 column: llama.cpp's permute gives, per head,
        // rows [0, 2, 1, 3].
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let p = permuted(v, Some(2), &[8, 1]);
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn llama_quantize_rules() {
        assert_eq!(
            weight_type(GgufDtype::Q4_0, "token_embd.weight", 576, true),
            GgmlType::Q8_0
        );
        assert_eq!(
            weight_type(GgufDtype::Q4_0, "token_embd.weight", 576, false),
            GgmlType::Q4_0
        );
        assert_eq!(
            weight_type(GgufDtype::Q4_0, "blk.0.ffn_down.weight", 1536, true),
            GgmlType::Q4_0
        );
        assert_eq!(
            weight_type(GgufDtype::Q8_0, "blk.0.attn_q.weight", 100, true),
            GgmlType::F16
        );
    }

    /// A SentencePiece (`llama`) vocabulary survives metadata → tokenizer → metadata: the
    /// rebuilt tokenizer encodes like the original, byte fallback included.
    #[test]
    fn sentencepiece_vocab_round_trips_through_metadata() {
        use crate::model::tokenizer::GgufVocab;
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![UNKNOWN, CONTROL, CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        for p in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
            "▁wor", "ld", "▁world",
        ] {
            tokens.push(p.into());
            types.push(NORMAL);
        }
        let n = tokens.len();
        let scores = (0..n)
            .map(|i| if types[i] == NORMAL { -(i as f32) } else { 0.0 })
            .collect();
        let vocab = |tokens, types, scores| GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            merges: None,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            add_bos: Some(true),
            add_space_prefix: Some(true),
        };
        let p = Path::new("test.gguf");
        let tok = vocab(tokens.clone(), types.clone(), scores)
            .build(p)
            .unwrap();
        let meta: HashMap<String, MetaValue> =
            tokenizer_meta(&tok, None, n).unwrap().into_iter().collect();
        assert_eq!(meta["tokenizer.ggml.model"], MetaValue::Str("llama".into()));
        assert_eq!(meta["tokenizer.ggml.tokens"], MetaValue::StrArray(tokens));
        assert_eq!(
            meta["tokenizer.ggml.token_type"],
            MetaValue::I32Array(types)
        );
        assert_eq!(meta["tokenizer.ggml.add_bos_token"], MetaValue::Bool(true));
        assert_eq!(
            meta["tokenizer.ggml.add_space_prefix"],
            MetaValue::Bool(true)
        );
        assert_eq!(meta["tokenizer.ggml.eos_token_id"], MetaValue::U32(2));
        let (MetaValue::StrArray(t2), MetaValue::I32Array(ty2), MetaValue::F32Array(s2)) = (
            meta["tokenizer.ggml.tokens"].clone(),
            meta["tokenizer.ggml.token_type"].clone(),
            meta["tokenizer.ggml.scores"].clone(),
        ) else {
            panic!("wrong metadata types")
        };
        let back = vocab(t2, ty2, s2).build(p).unwrap();
        for text in ["hello world", "hello wörld", "world hello  he"] {
            assert_eq!(
                tok.encode(text, true).unwrap(),
                back.encode(text, true).unwrap(),
                "{text}"
            );
        }
        assert_eq!(tok.encode("hello world", true).unwrap()[0], 1, "BOS added");
    }

    /// The pre-tokenizer name survives llama.cpp name → afinar tokenizer → llama.cpp name.
    #[test]
    fn pre_tokenizer_names_round_trip() {
        use crate::model::tokenizer::GgufVocab;
        for pre in ["llama-bpe", "qwen2", "smollm", "gpt-2"] {
            let v = GgufVocab {
                model: "gpt2".into(),
                pre: Some(pre.into()),
                tokens: vec!["a".into(), "b".into(), "ab".into()],
                token_types: None,
                scores: None,
                merges: Some(vec!["a b".into()]),
                bos_id: None,
                eos_id: None,
                unk_id: None,
                add_bos: None,
                add_space_prefix: None,
            };
            let tok = v.build(Path::new("t.gguf")).unwrap();
            let json: Value = serde_json::from_str(&tok.inner.to_string(false).unwrap()).unwrap();
            assert_eq!(pre_tokenizer(&json), pre);
        }
    }
}
