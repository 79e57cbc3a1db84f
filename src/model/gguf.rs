//! GGUF files (llama.cpp's format): configuration, weights in Hugging Face layout (held in their
//! block format or converted, see [`BaseDtype`]), tokenizer and chat template, all from the one
//! file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::config::{Architecture, ModelConfig};
use super::layout::{self, hf_name};
use super::ops::packed;
use super::tokenizer::{GgufVocab, TextTokenizer};
use super::weights::{BaseDtype, Weight, Weights};
use crate::{Error, Result};

/// Everything afinar reads from a GGUF file.
pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<String>,
    /// Storage type of the bulk of the weights, e.g. "Q4_1".
    pub file_dtype: String,
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// Checks the magic bytes so a wrong file gets a clear message, not a parser error.
pub fn is_gguf(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(_) => Ok(false),
    }
}

/// Reads only the header (metadata and tensor table), not the weights, after checking it with
/// [`prescan`] (candle's reader divides by a zero alignment) and checking every tensor's
/// dtype, shape, alignment and extent against the file ([`check_tensor_table`]).
pub fn read_header(path: &Path) -> Result<Content> {
    if !is_gguf(path)? {
        return Err(Error::bad_file(
            path,
            "not a GGUF file (the first bytes are not 'GGUF'); pass a .gguf file or a Hugging Face model directory",
        ));
    }
    let raw = prescan(path)?;
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let content = Content::read(&mut reader).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "corrupt or truncated GGUF header: {}",
                crate::error::candle_message(&e)
            ),
        )
    })?;
    check_tensor_table(&content, &raw, path)?;
    Ok(content)
}

/// What [`inspect`] reads from a GGUF file: everything but the weights, validated.
pub struct GgufInspection {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<String>,
    /// Storage type of the bulk of the weights, e.g. "Q4_1".
    pub file_dtype: String,
    pub tensor_count: usize,
}

/// Reads and validates the header, metadata, configuration and tokenizer of a GGUF file
/// without reading its weights: what `load` checks before it reads a single tensor, in
/// milliseconds. Every problem is a one-line error naming the file and the GGUF key.
pub fn inspect(path: &Path) -> Result<GgufInspection> {
    inspect_content(&read_header(path)?, path)
}

fn inspect_content(content: &Content, path: &Path) -> Result<GgufInspection> {
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let vocab = read_vocab(&meta)?;
    let config = read_config(&meta, content, &vocab)?;
    let tokenizer = vocab.build(path)?;
    let mut dtype_counts: HashMap<String, usize> = HashMap::new();
    for info in content.tensor_infos.values() {
        *dtype_counts
            .entry(format!("{:?}", info.ggml_dtype))
            .or_default() += info.shape.elem_count();
    }
    let file_dtype = dtype_counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(d, _)| d)
        .unwrap_or_default();
    Ok(GgufInspection {
        config,
        tokenizer,
        chat_template: meta.opt_string("tokenizer.chat_template"),
        file_dtype,
        tensor_count: content.tensor_infos.len(),
    })
}

/// Reads only the tokenizer and chat template.
pub fn load_text_side(path: &Path) -> Result<(TextTokenizer, Option<String>)> {
    let content = read_header(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let tokenizer = read_vocab(&meta)?.build(path)?;
    Ok((tokenizer, meta.opt_string("tokenizer.chat_template")))
}

/// Loads a GGUF model onto `device`, its matrices held as `base` says (see [`BaseDtype`]).
pub fn load(path: &Path, device: &Device, base: BaseDtype) -> Result<GgufModel> {
    let content = read_header(path)?;
    let GgufInspection {
        config,
        tokenizer,
        chat_template,
        file_dtype,
        ..
    } = inspect_content(&content, path)?;
    let architecture = config.architecture;

    // Weights: each matrix held as `base` says (norms in f32), renamed to Hugging Face's
    // convention.
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let mut tensors = HashMap::new();
    let mut rope_freq_factors = None;
    for name in content.tensor_infos.keys() {
        if name != "rope_freqs.weight" && hf_name(architecture, name).is_none() {
            continue;
        }
        let qt = content.tensor(&mut reader, name, device).map_err(|e| {
            Error::bad_file(
                path,
                format!(
                    "tensor '{name}': {} (the file is truncated or corrupt; download it again)",
                    crate::error::candle_message(&e)
                ),
            )
        })?;
        if name == "rope_freqs.weight" {
            rope_freq_factors = Some(qt.dequantize(device)?.to_vec1::<f32>()?);
            continue;
        }
        let Some(hf_name) = hf_name(architecture, name) else {
            continue;
        };
        // llama.cpp stores Q and K rows of llama-architecture models permuted for its
        // interleaved RoPE; undo it so weights (and LoRA targets) have Hugging Face layout.
        let heads = if !architecture.gguf_permutes_qk() {
            None
        } else if name.ends_with("attn_q.weight") {
            Some(config.num_heads)
        } else if name.ends_with("attn_k.weight") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        let w = if qt.shape().rank() == 2 && base.keeps(qt.dtype(), device) {
            let qt = match heads {
                Some(h) => {
                    let (rows, _) = qt.shape().dims2()?;
                    packed::permute_rows(&qt, &unpermute_order(rows, h))?
                }
                None => qt,
            };
            super::weights::hold_packed(qt)?
        } else {
            let t = qt.dequantize(device)?;
            let t = match heads {
                Some(h) => unpermute(&t, h)?,
                // The file holds Gemma's norms as 1 + w; the model holds w.
                None if layout::gguf_adds_one(architecture, name) => (t - 1.0)?,
                None => t,
            };
            if t.rank() == 2 {
                super::weights::hold(t, base)?
            } else {
                Weight::Dense(t)
            }
        };
        tensors.insert(hf_name, w);
    }
    Ok(GgufModel {
        config,
        weights: Weights {
            tensors,
            origin: path.to_path_buf(),
        },
        tokenizer,
        chat_template,
        file_dtype,
        rope_freq_factors,
    })
}

/// Inverse of llama.cpp's `permute(w, n_head)`: (n_head, d/2, 2, in) → (n_head, 2, d/2, in).
pub(crate) fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// Row order of [`unpermute`]: new row (h, j, i) of (n_head, 2, d/2) is old row (h, i, j).
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let d = rows / n_head;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                order.push(h * d + i * 2 + j);
            }
        }
    }
    order
}

// ---------------------------------------------------------------------------------------------
// Validation of untrusted headers and metadata. Everything below runs before a tensor is read,
// so a crafted file ends in a one-line error naming the key instead of a panic, an abort or an
// allocation of terabytes.

/// Largest `general.alignment` accepted (llama.cpp writes 32; the spec asks a power of two).
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Longest metadata key (the GGUF spec's limit).
const MAX_KEY_BYTES: usize = 65_535;
/// Deepest nesting of arrays in metadata values.
const MAX_VALUE_DEPTH: usize = 8;
/// Most elements one tensor may have (2^40, about 4 TB in f32; far beyond any file afinar loads).
const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;
/// Most layers a configuration may declare.
const MAX_LAYERS: usize = 4096;
/// Longest context accepted from `{arch}.context_length`.
const MAX_CONTEXT: usize = 1 << 24;
/// Longest single token (bytes); SentencePiece merge recovery is quadratic in it.
const MAX_TOKEN_BYTES: usize = 4096;

/// The raw header fields [`prescan`] checks.
#[derive(Debug, Clone, Copy)]
pub struct RawHeader {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata_count: u64,
    pub alignment: u64,
    pub file_size: u64,
}

/// A bounded reader over the file: every read checks the bytes left, so no length from the file
/// is trusted before it is compared with the file's size.
struct Scan<R> {
    r: R,
    pos: u64,
    size: u64,
    path: std::path::PathBuf,
}

impl<R: Read + std::io::Seek> Scan<R> {
    fn fail(&self, what: &str) -> Error {
        Error::bad_file(
            &self.path,
            format!(
                "corrupt or truncated GGUF header: {what} (at byte {}, file has {})",
                self.pos, self.size
            ),
        )
    }
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.size.saturating_sub(self.pos) {
            return Err(self.fail(&format!("{what} needs {n} bytes")));
        }
        Ok(())
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.fail(&format!("{what}: {e}")))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }
    fn len(&mut self, version: u32, what: &str) -> Result<u64> {
        if version == 1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        let n_i64 = i64::try_from(n).map_err(|_| self.fail(what))?;
        self.r
            .seek_relative(n_i64)
            .map_err(|e| self.fail(&format!("{what}: {e}")))?;
        self.pos += n;
        Ok(())
    }
    fn string(&mut self, version: u32, what: &str) -> Result<Vec<u8>> {
        let n = self.len(version, what)?;
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| self.fail(&format!("{what}: {e}")))?;
        self.pos += n;
        Ok(v)
    }
}

/// A key from the file as it may appear in a one-line message: control characters escaped,
/// at most 80 characters.
pub(crate) fn printable(key: &str) -> String {
    let escaped: String = key.escape_debug().collect();
    if escaped.chars().count() > 80 {
        format!("{}…", escaped.chars().take(80).collect::<String>())
    } else {
        escaped
    }
}

/// Size on disk of a fixed-size GGUF metadata type (`None` for strings and arrays).
fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Walks the header of a GGUF file with bounded reads: version, counts against the file size,
/// every metadata key and value (types, string and array lengths), and `general.alignment`
/// (a power of two; candle's reader divides by it). Nothing is allocated from an unchecked length.
pub fn prescan(path: &Path) -> Result<RawHeader> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut s = Scan {
        r: BufReader::new(file),
        pos: 0,
        size,
        path: path.to_path_buf(),
    };
    let _magic = s.bytes::<4>("magic")?;
    let version = s.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(Error::bad_file(
            path,
            format!("GGUF version {version} is not supported (1 to 3 are)"),
        ));
    }
    let tensor_count = s.len(version, "tensor count")?;
    let metadata_count = s.len(version, "metadata count")?;
    let prefix = if version == 1 { 4 } else { 8 };
    // Smallest possible entries: a key (length prefix + type + 1-byte value), a tensor
    // (name prefix + n_dims + dtype + offset).
    let min = metadata_count
        .saturating_mul(prefix + 5)
        .saturating_add(tensor_count.saturating_mul(prefix + 16));
    if min > size {
        return Err(Error::bad_file(
            path,
            format!(
                "corrupt GGUF header: it declares {tensor_count} tensors and {metadata_count} metadata keys, \
                 which cannot fit in a file of {size} bytes (it is truncated or corrupt)"
            ),
        ));
    }
    let mut alignment = None;
    for i in 0..metadata_count {
        let klen_at = s.pos;
        let key = s.string(version, &format!("metadata key #{i}"))?;
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::bad_file(
                path,
                format!(
                    "corrupt GGUF header: metadata key #{i} (at byte {klen_at}) is {} bytes long; keys are at most {MAX_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        let key = printable(&String::from_utf8_lossy(&key));
        let value_type = s.u32(&format!("type of GGUF key '{key}'"))?;
        if key == "general.alignment" {
            let v: i64 = match value_type {
                0 => i64::from(s.bytes::<1>(&key)?[0]),
                1 => i64::from(s.bytes::<1>(&key)?[0] as i8),
                2 => i64::from(u16::from_le_bytes(s.bytes::<2>(&key)?)),
                3 => i64::from(i16::from_le_bytes(s.bytes::<2>(&key)?)),
                4 => i64::from(s.u32(&key)?),
                5 => i64::from(s.u32(&key)? as i32),
                _ => {
                    return Err(Error::bad_file(
                        path,
                        format!("GGUF key 'general.alignment' has value type {value_type}; it must be a uint32"),
                    ))
                }
            };
            if v <= 0 || !(v as u64).is_power_of_two() || v as u64 > MAX_ALIGNMENT {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "GGUF key 'general.alignment' = {v}: it must be a power of two from 1 to {MAX_ALIGNMENT}"
                    ),
                ));
            }
            alignment = Some(v as u64);
            continue;
        }
        skip_value(&mut s, version, value_type, &key, 0)?;
    }
    Ok(RawHeader {
        version,
        tensor_count,
        metadata_count,
        alignment: alignment.unwrap_or(32),
        file_size: size,
    })
}

fn skip_value<R: Read + std::io::Seek>(
    s: &mut Scan<R>,
    version: u32,
    value_type: u32,
    key: &str,
    depth: usize,
) -> Result<()> {
    let what = format!("value of GGUF key '{key}'");
    if let Some(n) = fixed_size(value_type) {
        return s.skip(n, &what);
    }
    match value_type {
        8 => {
            let n = s.len(version, &what)?;
            s.skip(n, &what)
        }
        9 => {
            if depth >= MAX_VALUE_DEPTH {
                return Err(Error::bad_file(
                    &s.path,
                    format!("GGUF key '{key}': arrays nested deeper than {MAX_VALUE_DEPTH}"),
                ));
            }
            let elem = s.u32(&what)?;
            let n = s.len(version, &what)?;
            let prefix = if version == 1 { 4 } else { 8 };
            let min = match (fixed_size(elem), elem) {
                (Some(k), _) => k,
                (None, 8) => prefix,
                (None, 9) => 4 + prefix,
                _ => {
                    return Err(Error::bad_file(
                        &s.path,
                        format!("GGUF key '{key}': unknown array element type {elem}"),
                    ))
                }
            };
            let bytes = n.saturating_mul(min);
            if bytes > s.size.saturating_sub(s.pos) {
                return Err(Error::bad_file(
                    &s.path,
                    format!(
                        "GGUF key '{key}': array of {n} elements cannot fit in the {} bytes left in the file (it is truncated or corrupt)",
                        s.size.saturating_sub(s.pos)
                    ),
                ));
            }
            if fixed_size(elem).is_some() {
                return s.skip(bytes, &what);
            }
            for _ in 0..n {
                skip_value(s, version, elem, key, depth + 1)?;
            }
            Ok(())
        }
        other => Err(Error::bad_file(
            &s.path,
            format!("GGUF key '{key}' has unknown value type {other}"),
        )),
    }
}

/// Checks every tensor of the table: known dtype, at most 4 non-zero dimensions whose product
/// fits, rows a whole number of quantization blocks, offset aligned, and data inside the file.
pub fn check_tensor_table(content: &Content, raw: &RawHeader, path: &Path) -> Result<()> {
    let data_start = content.tensor_data_offset;
    for (name, info) in &content.tensor_infos {
        let bad = |why: String| {
            Err(Error::bad_file(
                path,
                format!("tensor '{}': {why}", printable(name)),
            ))
        };
        let dims = info.shape.dims();
        if dims.is_empty() || dims.len() > 4 || dims.contains(&0) {
            return bad(format!(
                "shape {dims:?} (1 to 4 non-zero dimensions expected)"
            ));
        }
        let mut elems: u64 = 1;
        for &d in dims {
            elems = match elems.checked_mul(d as u64) {
                Some(e) if e <= MAX_TENSOR_ELEMENTS => e,
                _ => return bad(format!("shape {dims:?} has more than 2^40 elements")),
            };
        }
        let block = info.ggml_dtype.block_size() as u64;
        let row = *dims.last().expect("non-empty") as u64;
        if !row.is_multiple_of(block) {
            return bad(format!(
                "rows of {row} elements are not a whole number of {:?} blocks of {block}",
                info.ggml_dtype
            ));
        }
        let bytes = elems / block * info.ggml_dtype.type_size() as u64;
        if !info.offset.is_multiple_of(raw.alignment) {
            return bad(format!(
                "offset {} is not a multiple of general.alignment {}",
                info.offset, raw.alignment
            ));
        }
        let end = data_start
            .checked_add(info.offset)
            .and_then(|o| o.checked_add(bytes));
        if !matches!(end, Some(e) if e <= raw.file_size) {
            return bad(format!(
                "{bytes} bytes at offset {} run past the end of the file ({} bytes); the file is truncated or corrupt",
                info.offset, raw.file_size
            ));
        }
    }
    Ok(())
}

/// The model configuration from `{arch}.*` metadata, checked against itself and against the
/// tensors present: block count, heads, head size, vocabulary and every layer's shapes.
fn read_config(meta: &Meta, content: &Content, vocab: &GgufVocab) -> Result<ModelConfig> {
    let path = meta.path;
    let arch_name = meta.string("general.architecture")?;
    let architecture = Architecture::parse(&printable(&arch_name), path)?;
    let a = arch_name.as_str();
    let key = |k: &str| format!("{a}.{k}");
    let bad = |k: &str, why: String| Error::bad_file(path, format!("GGUF key '{k}': {why}"));
    let positive = |k: &str| -> Result<usize> {
        let k = key(k);
        match meta.usize(&k)? {
            0 => Err(bad(&k, "is 0; it must be positive".into())),
            v => Ok(v),
        }
    };
    let hidden_size = positive("embedding_length")?;
    let num_heads = positive("attention.head_count")?;
    let num_kv_heads = match meta.opt_usize(&key("attention.head_count_kv"))? {
        Some(0) => {
            return Err(bad(
                &key("attention.head_count_kv"),
                "is 0; it must be positive".into(),
            ))
        }
        Some(v) => v,
        None => num_heads,
    };
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(
            &key("attention.head_count_kv"),
            format!("{num_kv_heads} does not divide attention.head_count {num_heads}"),
        ));
    }
    let key_length = meta.opt_usize(&key("attention.key_length"))?;
    let value_length = meta.opt_usize(&key("attention.value_length"))?;
    let rope_dims = meta.opt_usize(&key("rope.dimension_count"))?;
    // Phi-3 turns only part of each head: its rotary dims are not the head size.
    let partial = architecture == Architecture::Phi3;
    let head_dim = match key_length.or(rope_dims.filter(|_| !partial)) {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
        None => {
            return Err(bad(
                &key("attention.head_count"),
                format!("{num_heads} does not divide embedding_length {hidden_size} and attention.key_length is absent"),
            ))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(
            &key("attention.key_length"),
            format!("head size {head_dim}: it must be positive and even (RoPE)"),
        ));
    }
    if let Some(v) = value_length.filter(|&v| v != head_dim) {
        return Err(bad(
            &key("attention.value_length"),
            format!("{v} differs from the key length {head_dim}; afinar needs them equal"),
        ));
    }
    let partial_rotary_factor = match rope_dims.filter(|&r| r != head_dim) {
        Some(r) if partial && r < head_dim && r > 0 && r % 2 == 0 => {
            Some(r as f64 / head_dim as f64)
        }
        Some(r) => {
            return Err(bad(
                &key("rope.dimension_count"),
                format!("{r} differs from the head size {head_dim}; partial RoPE is Phi-3's only"),
            ))
        }
        None => None,
    };
    let num_layers = positive("block_count")?;
    let intermediate_size = positive("feed_forward_length")?;
    let finite_positive = |k: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(bad(k, format!("{v}: it must be a finite positive number")))
        }
    };
    let eps_key = match architecture.layer_norm() {
        true => key("attention.layer_norm_epsilon"),
        false => key("attention.layer_norm_rms_epsilon"),
    };
    let rms_norm_eps = finite_positive(&eps_key, meta.f64(&eps_key)?)?;
    if rms_norm_eps >= 1.0 {
        return Err(bad(
            &eps_key,
            format!("{rms_norm_eps}: a norm epsilon must be below 1"),
        ));
    }
    let theta_key = key("rope.freq_base");
    let rope_theta = finite_positive(&theta_key, meta.opt_f64(&theta_key)?.unwrap_or(10_000.0))?;
    let ctx_key = key("context_length");
    let max_position_embeddings = match meta.opt_usize(&ctx_key)?.unwrap_or(2048) {
        v if v == 0 || v > MAX_CONTEXT => {
            return Err(bad(
                &ctx_key,
                format!("{v}: it must be from 1 to {MAX_CONTEXT}"),
            ))
        }
        v => v,
    };

    // Shapes against the tensors present (candle lists GGUF dims outermost first).
    let tensors = &content.tensor_infos;
    let shape = |name: &str| tensors.get(name).map(|t| t.shape.dims().to_vec());
    let embd = shape("token_embd.weight")
        .ok_or_else(|| Error::bad_file(path, "GGUF file has no tensor 'token_embd.weight'"))?;
    let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => embd[0],
    };
    if embd != [vocab_size, hidden_size] {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor 'token_embd.weight' has shape {embd:?}, but {a}.vocab_size (or the tensor's rows) and \
                 {a}.embedding_length say [{vocab_size}, {hidden_size}]"
            ),
        ));
    }
    if vocab.tokens.len() > vocab_size {
        return Err(bad(
            "tokenizer.ggml.tokens",
            format!(
                "{} tokens, more than the {vocab_size} rows of the embedding",
                vocab.tokens.len()
            ),
        ));
    }
    check_blocks(
        tensors.keys().map(String::as_str),
        num_layers,
        &key("block_count"),
        path,
    )?;
    if num_layers > MAX_LAYERS {
        return Err(bad(
            &key("block_count"),
            format!("{num_layers}: more than {MAX_LAYERS}"),
        ));
    }
    let mut config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings,
        tie_word_embeddings: false,
        attention_bias: architecture == Architecture::Qwen2,
        partial_rotary_factor,
        ..Default::default()
    };
    family_config(meta, content, &mut config)?;
    // Every tensor of the layout but the optional head, by its GGUF name (the embedding is
    // checked above).
    let expect: Vec<(String, Vec<usize>)> = layout::tensors(&config, false)
        .into_iter()
        .filter(|t| t.gguf != "token_embd.weight")
        .map(|t| (t.gguf, t.shape))
        .collect();
    for (name, want) in &expect {
        match shape(name) {
            None => {
                return Err(Error::bad_file(
                    path,
                    format!("GGUF file has no tensor '{name}' ({a}.block_count = {num_layers})"),
                ))
            }
            Some(got) if &got != want => {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor '{name}' has shape {got:?}, but the {a}.* metadata implies {want:?}"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let has_output = match shape("output.weight") {
        Some(got) if got != [vocab_size, hidden_size] => {
            return Err(Error::bad_file(
                path,
                format!(
                "tensor 'output.weight' has shape {got:?}, expected [{vocab_size}, {hidden_size}]"
            ),
            ))
        }
        other => other.is_some(),
    };
    if let Some(got) = shape("rope_freqs.weight").filter(|g| g != &[head_dim / 2]) {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor 'rope_freqs.weight' has shape {got:?}, expected [{}]",
                head_dim / 2
            ),
        ));
    }
    config.tie_word_embeddings = !has_output;
    config.validate(path)?;
    Ok(config)
}

/// The keys of the families beyond Llama's, as llama.cpp reads them: Gemma 3's window, its
/// pattern (an array of per-layer flags, or every 6th layer global), the sliding layers' RoPE
/// base and linear scaling; SmolLM3's RoPE-less layers (every 4th, fixed in llama.cpp).
fn family_config(meta: &Meta, content: &Content, c: &mut ModelConfig) -> Result<()> {
    let a = meta.string("general.architecture")?;
    let key = |k: &str| format!("{a}.{k}");
    match c.architecture {
        Architecture::Gemma3 => {
            // llama.cpp scales scores by head_dim^-1/2 (27B aside), as the 1B and 270M
            // configs' query_pre_attn_scalar does.
            c.query_pre_attn_scalar = Some(c.head_dim as f64);
            c.rope_local_theta = Some(
                meta.opt_f64(&key("rope.freq_base_swa"))?
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .unwrap_or(10_000.0),
            );
            if let Some(w) = meta.opt_usize(&key("attention.sliding_window"))? {
                if w > 0 {
                    c.sliding_window = Some(w);
                    c.sliding_layers =
                        match meta.opt_bool_array(&key("attention.sliding_window_pattern"))? {
                            Some(v) if v.len() == c.num_layers => v,
                            Some(v) => {
                                return Err(Error::bad_file(
                                    meta.path,
                                    format!(
                                        "GGUF key '{}': {} flags for {} layers",
                                        key("attention.sliding_window_pattern"),
                                        v.len(),
                                        c.num_layers
                                    ),
                                ))
                            }
                            None => (0..c.num_layers).map(|i| i % 6 < 5).collect(),
                        };
                }
            }
            if meta.opt_string(&key("rope.scaling.type")).as_deref() == Some("linear") {
                let f = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if !(f.is_finite() && f > 0.0) {
                    return Err(Error::bad_file(
                        meta.path,
                        format!(
                            "GGUF key '{}': {f} is not a positive factor",
                            key("rope.scaling.factor")
                        ),
                    ));
                }
                c.rope_linear_factor = Some(f);
            }
        }
        Architecture::SmolLM3 => {
            c.no_rope_layers = (0..c.num_layers).map(|i| (i + 1) % 4 == 0).collect();
        }
        Architecture::Phi3 => {
            // LongRoPE: the factors are tensors, the attention factor a key.
            let infos = &content.tensor_infos;
            if infos.contains_key("rope_factors_short.weight") {
                let mut f = File::open(meta.path).map_err(|e| Error::io(meta.path, e))?;
                let mut read = |name: &str| -> Result<Vec<f64>> {
                    if !infos.contains_key(name) {
                        return Err(Error::bad_file(
                            meta.path,
                            format!("GGUF file has no '{name}'"),
                        ));
                    }
                    let t = content
                        .tensor(&mut f, name, &Device::Cpu)?
                        .dequantize(&Device::Cpu)?;
                    Ok(t.flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(f64::from)
                        .collect())
                };
                let short_factor = read("rope_factors_short.weight")?;
                let long_factor = read("rope_factors_long.weight")?;
                c.longrope = Some(super::config::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: meta
                        .opt_usize(&key("rope.scaling.original_context_length"))?
                        .unwrap_or(c.max_position_embeddings),
                    attention_factor: meta
                        .opt_f64(&key("rope.scaling.attn_factor"))?
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .unwrap_or(1.0),
                });
            }
        }
        _ => {}
    }
    Ok(())
}

/// The `blk.N.*` tensors present must be exactly blocks 0..`block_count`: a count larger than
/// the tensors (or absurdly large) and tensors beyond the count are both errors.
pub fn check_blocks<'a>(
    names: impl Iterator<Item = &'a str>,
    block_count: usize,
    key: &str,
    path: &Path,
) -> Result<()> {
    let mut present = std::collections::BTreeSet::new();
    for name in names {
        let Some(rest) = name.strip_prefix("blk.") else {
            continue;
        };
        let idx = rest
            .split_once('.')
            .and_then(|(n, _)| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor '{}': no block number", printable(name)),
                )
            })?;
        if idx >= block_count {
            return Err(Error::bad_file(
                path,
                format!(
                    "GGUF key '{key}' = {block_count}, but the file has tensors of block {idx} ('{}')",
                    printable(name)
                ),
            ));
        }
        present.insert(idx);
    }
    if present.len() != block_count {
        let missing = (0..block_count)
            .find(|i| !present.contains(i))
            .unwrap_or(block_count);
        return Err(Error::bad_file(
            path,
            format!(
                "GGUF key '{key}' = {block_count}, but the file has tensors for {} blocks (block {missing} is missing)",
                present.len()
            ),
        ));
    }
    Ok(())
}

fn read_vocab(meta: &Meta) -> Result<GgufVocab> {
    let path = meta.path;
    let bad = |k: &str, why: String| Error::bad_file(path, format!("GGUF key '{k}': {why}"));
    let array = |key: &str| -> Result<Option<&Vec<Value>>> {
        match meta.md.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_vec()
                .map(Some)
                .map_err(|_| bad(key, "is not an array".into())),
        }
    };
    let strings = |key: &str| -> Result<Option<Vec<String>>> {
        array(key)?
            .map(|v| {
                v.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.to_string()
                            .cloned()
                            .map_err(|_| bad(key, format!("element {i} is not a string")))
                    })
                    .collect()
            })
            .transpose()
    };
    let tokens = strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
        Error::bad_file(
            path,
            "GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)",
        )
    })?;
    let n = tokens.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens", "is empty".into()));
    }
    if let Some((i, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > MAX_TOKEN_BYTES)
    {
        return Err(bad(
            "tokenizer.ggml.tokens",
            format!(
                "token {i} is {} bytes long (more than {MAX_TOKEN_BYTES})",
                t.len()
            ),
        ));
    }
    let same_len = |key: &str, len: usize| -> Result<()> {
        if len != n {
            return Err(bad(key, format!("has {len} entries for {n} tokens")));
        }
        Ok(())
    };
    let token_types = match array("tokenizer.ggml.token_type")? {
        None => None,
        Some(v) => {
            same_len("tokenizer.ggml.token_type", v.len())?;
            Some(
                v.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.to_i32().map_err(|_| {
                            bad(
                                "tokenizer.ggml.token_type",
                                format!("element {i} is not an int32"),
                            )
                        })
                    })
                    .collect::<Result<Vec<i32>>>()?,
            )
        }
    };
    let scores = match array("tokenizer.ggml.scores")? {
        None => None,
        Some(v) => {
            same_len("tokenizer.ggml.scores", v.len())?;
            Some(
                v.iter()
                    .enumerate()
                    .map(|(i, x)| match x.to_f32() {
                        Ok(f) if !f.is_nan() => Ok(f),
                        _ => Err(bad(
                            "tokenizer.ggml.scores",
                            format!("element {i} is not a float32 number"),
                        )),
                    })
                    .collect::<Result<Vec<f32>>>()?,
            )
        }
    };
    let id = |key: &str| -> Result<Option<u32>> {
        match meta.opt_usize(key)? {
            Some(i) if i >= n => Err(bad(
                key,
                format!("token id {i} is outside the vocabulary of {n} tokens"),
            )),
            Some(i) => Ok(Some(i as u32)),
            None => Ok(None),
        }
    };
    for key in [
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.seperator_token_id",
        "tokenizer.ggml.separator_token_id",
    ] {
        id(key)?;
    }
    let flag = |key: &str| meta.md.get(key).and_then(|v| v.to_bool().ok());
    Ok(GgufVocab {
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.opt_string("tokenizer.ggml.pre"),
        tokens,
        token_types,
        scores,
        merges: strings("tokenizer.ggml.merges")?,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        unk_id: id("tokenizer.ggml.unknown_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
    })
}

/// Typed access to GGUF metadata with errors that name the file and key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::bad_file(self.path, format!("GGUF metadata has no '{key}'"))
    }
    fn bad(&self, key: &str, why: &str) -> Error {
        Error::bad_file(self.path, format!("GGUF key '{key}': {why}"))
    }
    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key).ok_or_else(|| self.missing(key))
    }
    fn opt_string(&self, key: &str) -> Option<String> {
        self.md.get(key).and_then(|v| v.to_string().ok().cloned())
    }
    /// A non-negative integer of any integer type; a negative or non-integer value is an error.
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n: Option<i128> = match v {
            Value::U8(x) => Some((*x).into()),
            Value::I8(x) => Some((*x).into()),
            Value::U16(x) => Some((*x).into()),
            Value::I16(x) => Some((*x).into()),
            Value::U32(x) => Some((*x).into()),
            Value::I32(x) => Some((*x).into()),
            Value::U64(x) => Some((*x).into()),
            Value::I64(x) => Some((*x).into()),
            _ => None,
        };
        match n {
            None => Err(self.bad(key, "is not an integer")),
            Some(n) if n < 0 => Err(self.bad(key, &format!("{n} is negative"))),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| self.bad(key, &format!("{n} is too large"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.bad(key, "is not a float")),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    /// An array of booleans (or of 0/1 integers); None when absent or not an array.
    fn opt_bool_array(&self, key: &str) -> Result<Option<Vec<bool>>> {
        let Some(Value::Array(items)) = self.md.get(key) else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                Value::U8(x) => Ok(*x != 0),
                Value::I32(x) => Ok(*x != 0),
                Value::U32(x) => Ok(*x != 0),
                _ => Err(self.bad(key, "is not an array of booleans")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
