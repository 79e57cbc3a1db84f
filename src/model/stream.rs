//! A model's weights one tensor at a time: the tensor table of a checkpoint (Hugging Face names,
//! shapes, stored types) read from its headers alone, and any one tensor read and converted to
//! f32 on demand. Export streams a model through this instead of loading it whole, so its peak
//! memory is one tensor, not the model (twice).
//!
//! Safetensors tensors are read with positioned reads of their byte range rather than through a
//! whole-file mmap: every touched page of a mapping counts in the process's resident set. GGUF
//! tensors are read and dequantized one at a time, renamed and un-permuted exactly as
//! [`super::gguf::load`] does.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::Value;

use super::config::ModelConfig;
use super::source::ModelSource;
use crate::{Error, Result};

/// Largest safetensors JSON header accepted (the format's own reader caps it at 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Values converted per parallel task when reading a safetensors tensor.
const READ_CHUNK: usize = 1 << 20;

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTensor {
    /// Row-major (PyTorch order) dimensions.
    pub shape: Vec<usize>,
    /// The type stored in the file: `F32`, `F16`, `BF16`, or a GGUF type such as `Q8_0`.
    pub dtype: String,
    loc: Loc,
}

impl StreamTensor {
    /// Number of values.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loc {
    /// In safetensors file `file` (an index into `ModelStream::files`), from byte `offset`,
    /// stored as `dtype`.
    Safetensors {
        file: usize,
        offset: u64,
        dtype: Stored,
    },
    /// In the GGUF file under this name.
    Gguf { name: String },
}

/// Safetensors storage types afinar reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    F32,
    F16,
    Bf16,
}

impl Stored {
    fn size(self) -> usize {
        match self {
            Stored::F32 => 4,
            Stored::F16 | Stored::Bf16 => 2,
        }
    }
}

/// The weights of a model source, read one tensor at a time.
pub struct ModelStream {
    /// The checkpoint (for error messages and `general.name`).
    pub source: ModelSource,
    /// The configuration from `config.json` or the GGUF metadata.
    pub config: ModelConfig,
    /// Storage type of the weights, as [`super::Model::file_dtype`] reports it.
    pub file_dtype: String,
    tensors: BTreeMap<String, StreamTensor>,
    files: Vec<PathBuf>,
    gguf: Option<Content>,
}

impl ModelStream {
    /// Reads the configuration and tensor tables of `source`; no weights are read.
    pub fn open(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::HfDir(dir) => Self::open_hf(dir),
            ModelSource::Gguf(path) => Self::open_gguf(path),
        }
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config = super::hf::read_config(dir)?;
        let arch = config.architecture;
        let files = super::hf::safetensors_files(dir)?;
        let mut tensors = BTreeMap::new();
        let mut file_dtype = String::new();
        for (i, path) in files.iter().enumerate() {
            for (name, t) in safetensors_table(path, i)? {
                if file_dtype.is_empty() && t.shape.len() > 1 {
                    file_dtype = t.dtype.clone();
                }
                // afinar's names for every family (Falcon's checkpoints name theirs).
                tensors.insert(super::layout::internal_name(arch, &name), t);
            }
        }
        Ok(Self {
            source: ModelSource::HfDir(dir.to_path_buf()),
            config,
            file_dtype,
            tensors,
            files,
            gguf: None,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let content = super::gguf::read_header(path)?;
        let info = super::gguf::inspect(path)?;
        let mut tensors = BTreeMap::new();
        for (name, t) in &content.tensor_infos {
            let Some(hf) = super::layout::hf_name(info.config.architecture, name) else {
                continue;
            };
            tensors.insert(
                hf,
                StreamTensor {
                    shape: t.shape.dims().to_vec(),
                    dtype: format!("{:?}", t.ggml_dtype),
                    loc: Loc::Gguf { name: name.clone() },
                },
            );
        }
        Ok(Self {
            source: ModelSource::Gguf(path.to_path_buf()),
            config: info.config,
            file_dtype: info.file_dtype,
            tensors,
            files: vec![path.to_path_buf()],
            gguf: Some(content),
        })
    }

    /// Every tensor afinar uses, by Hugging Face name, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &StreamTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The tensor called `name` (Hugging Face naming), if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&StreamTensor> {
        self.tensors.get(name)
    }

    /// Checks that `name` exists with `shape`, with the messages the loader gives.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::bad_file(self.source.path(), format!("missing tensor '{name}'"))
        })?;
        if t.shape != shape {
            return Err(Error::bad_file(
                self.source.path(),
                format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            ));
        }
        Ok(())
    }

    /// Tensor `name` in f32, row-major, in Hugging Face layout (Q/K rows of a llama GGUF
    /// un-permuted, as the loader gives them).
    pub fn read(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        self.read_into(name, &mut v)?;
        Ok(v)
    }

    /// [`ModelStream::read`] into `out` (resized to the tensor; its allocation is reused, so a
    /// stream of tensors does not fault fresh pages in for each).
    pub fn read_into(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::bad_file(self.source.path(), format!("missing tensor '{name}'"))
        })?;
        match &t.loc {
            Loc::Safetensors {
                file,
                offset,
                dtype,
            } => read_safetensors(&self.files[*file], *offset, *dtype, t.elems(), out),
            Loc::Gguf { name: gguf_name } => {
                *out = self.read_gguf(gguf_name, t.elems())?;
                Ok(())
            }
        }
    }

    /// Tensor `name` of a safetensors checkpoint as stored (f32, f16 or bf16), on `device`.
    /// The loader holds each matrix from this one tensor at a time, so loading never has the
    /// whole file in memory beside the held weights (a whole-file read or mmap did: 6.2 GB to
    /// hold a bf16 1.5B model as Q4_0).
    pub fn read_stored(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::bad_file(self.source.path(), format!("missing tensor '{name}'"))
        })?;
        let Loc::Safetensors {
            file,
            offset,
            dtype,
        } = &t.loc
        else {
            return Err(Error::bad_file(
                self.source.path(),
                format!("tensor '{name}' is not in a safetensors file"),
            ));
        };
        let path = &self.files[*file];
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let shape = t.shape.as_slice();
        let n = t.elems();
        let tensor = match dtype {
            Stored::F32 => Tensor::from_vec(
                read_le(&f, path, *offset, n, 0f32, |x| {
                    f32::from_bits(u32::from_le(x.to_bits()))
                })?,
                shape,
                device,
            )?,
            Stored::Bf16 => Tensor::from_vec(
                read_le(&f, path, *offset, n, half::bf16::ZERO, |x| {
                    half::bf16::from_bits(u16::from_le(x.to_bits()))
                })?,
                shape,
                device,
            )?,
            Stored::F16 => Tensor::from_vec(
                read_le(&f, path, *offset, n, half::f16::ZERO, |x| {
                    half::f16::from_bits(u16::from_le(x.to_bits()))
                })?,
                shape,
                device,
            )?,
        };
        Ok(tensor)
    }

    /// llama.cpp's `rope_freqs.weight` of a GGUF source (Llama 3 RoPE scaling), if present.
    pub fn rope_freqs(&self) -> Result<Option<Vec<f32>>> {
        match &self.gguf {
            Some(c) if c.tensor_infos.contains_key("rope_freqs.weight") => {
                let n = c.tensor_infos["rope_freqs.weight"].shape.elem_count();
                self.read_gguf("rope_freqs.weight", n).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn read_gguf(&self, gguf_name: &str, elems: usize) -> Result<Vec<f32>> {
        let content = self
            .gguf
            .as_ref()
            .expect("a GGUF location comes with its header");
        let path = &self.files[0];
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let qt = content
            .tensor(&mut f, gguf_name, &Device::Cpu)
            .map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "tensor '{gguf_name}': {} (the file is truncated or corrupt; download it again)",
                        crate::error::candle_message(&e)
                    ),
                )
            })?;
        let t = qt.dequantize(&Device::Cpu)?;
        let c = &self.config;
        let a = c.architecture;
        let t = if a.gguf_permutes_qk() && gguf_name.ends_with("attn_q.weight") {
            super::gguf::unpermute(&t, c.num_heads)?
        } else if a.gguf_permutes_qk() && gguf_name.ends_with("attn_k.weight") {
            super::gguf::unpermute(&t, c.num_kv_heads)?
        } else if super::layout::gguf_adds_one(a, gguf_name) {
            (t - 1.0)?
        } else {
            t
        };
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(v.len(), elems);
        Ok(v)
    }
}

/// The tensor table of one safetensors file, validated against the file's length.
fn safetensors_table(path: &Path, file: usize) -> Result<Vec<(String, StreamTensor)>> {
    let bad =
        |why: String| Error::bad_file(path, format!("not a readable safetensors file: {why}"));
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || 8 + n > len {
        return Err(bad(format!(
            "header length {n} does not fit the file ({len} bytes)"
        )));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact_at(&mut head, 8)
        .map_err(|e| Error::io(path, e))?;
    let json: serde_json::Map<String, Value> =
        serde_json::from_slice(&head).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = v["dtype"].as_str().unwrap_or_default().to_string();
        let dtype = match dtype_name.as_str() {
            "F32" => Stored::F32,
            "F16" => Stored::F16,
            "BF16" => Stored::Bf16,
            other => {
                return Err(bad(format!(
                    "tensor '{name}' is stored as {other:?}; afinar reads F32, F16 and BF16"
                )))
            }
        };
        let shape: Option<Vec<usize>> = v["shape"].as_array().and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let offsets: Option<Vec<u64>> = v["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            return Err(bad(format!(
                "tensor '{name}' lacks a shape or data_offsets"
            )));
        };
        let elems = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(dtype.size()));
        let fits = match (offsets.as_slice(), elems) {
            ([a, b], Some(bytes)) => {
                a <= b
                    && b - a == bytes as u64
                    && data_start.checked_add(*b).is_some_and(|e| e <= len)
            }
            _ => false,
        };
        if !fits {
            return Err(bad(format!(
                "tensor '{name}' of shape {shape:?} ({dtype_name}) does not match its data_offsets {offsets:?} or lies past the end of the file"
            )));
        }
        out.push((
            name,
            StreamTensor {
                shape,
                dtype: dtype_name,
                loc: Loc::Safetensors {
                    file,
                    offset: data_start + offsets[0],
                    dtype,
                },
            },
        ));
    }
    Ok(out)
}

/// Fills `dst` with the bytes of `path` from `offset` (values as the file stores them).
fn read_pod<T: Copy>(f: &File, path: &Path, offset: u64, dst: &mut [T]) -> Result<()> {
    // SAFETY: `dst` is a live, exclusively borrowed slice; viewing its memory as
    // `size_of_val(dst)` bytes is in bounds, u8 has alignment 1, and `T` is only ever f32, bf16
    // or f16 here, for which every bit pattern is a valid value.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(dst))
    };
    f.read_exact_at(bytes, offset)
        .map_err(|e| Error::io(path, e))
}

/// `n` values stored little-endian from `offset` of `path`; `from_le` fixes one value's byte
/// order on a big-endian machine (never called on a little-endian one).
fn read_le<T: Copy>(
    f: &File,
    path: &Path,
    offset: u64,
    n: usize,
    zero: T,
    from_le: impl Fn(T) -> T,
) -> Result<Vec<T>> {
    let mut v = vec![zero; n];
    read_pod(f, path, offset, &mut v)?;
    if cfg!(target_endian = "big") {
        v.iter_mut().for_each(|x| *x = from_le(*x));
    }
    Ok(v)
}

thread_local! {
    /// Each reading thread's buffer for 16-bit values on their way to f32 (reused, so reading a
    /// model does not allocate and fault in fresh pages per chunk).
    static RAW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads `elems` values of type `dtype` from byte `offset` of `path` into `out` as f32, in
/// parallel chunks (positioned reads are independent, so two threads read and convert at once).
fn read_safetensors(
    path: &Path,
    offset: u64,
    dtype: Stored,
    elems: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // Not cleared first: every value is overwritten below.
    out.resize(elems, 0.0);
    let size = dtype.size();
    out.par_chunks_mut(READ_CHUNK)
        .enumerate()
        .try_for_each(|(i, dst)| -> Result<()> {
            let at = offset + (i * READ_CHUNK * size) as u64;
            match dtype {
                Stored::F32 => {
                    read_pod(&f, path, at, dst)?;
                    if cfg!(target_endian = "big") {
                        for v in dst.iter_mut() {
                            *v = f32::from_bits(u32::from_le(v.to_bits()));
                        }
                    }
                }
                Stored::F16 | Stored::Bf16 => RAW.with_borrow_mut(|raw| -> Result<()> {
                    raw.resize(dst.len() * 2, 0);
                    f.read_exact_at(raw, at).map_err(|e| Error::io(path, e))?;
                    let halves = raw
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]));
                    if dtype == Stored::Bf16 {
                        for (d, h) in dst.iter_mut().zip(halves) {
                            *d = f32::from_bits(u32::from(h) << 16);
                        }
                    } else {
                        for (d, h) in dst.iter_mut().zip(halves) {
                            *d = half::f16::from_bits(h).to_f32();
                        }
                    }
                    Ok(())
                })?,
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// Every tensor the loader holds, read through the stream, is the same f32 values; the
    /// stream lists no tensor the loader does not use.
    fn assert_matches_loader(source: ModelSource) {
        let model =
            Model::load_source(source.clone(), &Device::Cpu, crate::model::BaseDtype::F32).unwrap();
        let stream = ModelStream::open(&source).unwrap();
        assert_eq!(stream.config.num_layers, model.config().num_layers);
        assert_eq!(stream.file_dtype, model.file_dtype);
        let loaded = crate::export::hf::named_tensors(&model).unwrap();
        let names: Vec<&str> = stream.tensors().map(|(n, _)| n).collect();
        assert_eq!(names, loaded.keys().map(String::as_str).collect::<Vec<_>>());
        for (name, t) in &loaded {
            let want = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            stream.expect(name, t.dims()).unwrap();
            assert_eq!(stream.read(name).unwrap(), want, "{name}");
        }
        let err = stream.expect("model.norm.weight", &[3]).unwrap_err();
        assert!(err.to_string().contains("expected [3]"), "{err}");
    }

    #[test]
    fn hf_tensors_equal_the_loaders() {
        for name in ["tiny-qwen2", "tiny-mistral"] {
            assert_matches_loader(ModelSource::HfDir(fixture(name)));
        }
    }

    /// A llama-architecture GGUF (Q/K rows permuted in the file) reads back un-permuted, as the
    /// loader gives it.
    #[test]
    fn gguf_tensors_equal_the_loaders() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tiny-mistral", "tiny-qwen2"] {
            let model = Model::load(fixture(name).to_str().unwrap(), &Device::Cpu).unwrap();
            let path = dir.path().join(format!("{name}.gguf"));
            crate::export::gguf::write_model(&model, crate::export::gguf::GgufDtype::F16, &path)
                .unwrap();
            assert_matches_loader(ModelSource::Gguf(path));
        }
    }

    #[test]
    fn bad_safetensors_fail_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(fixture("tiny-qwen2")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        let st = dir.path().join("model-00002-of-00002.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        let source = ModelSource::HfDir(dir.path().to_path_buf());
        // Truncated: the last tensor lies past the end.
        std::fs::write(&st, &bytes[..bytes.len() - 10]).unwrap();
        let err = ModelStream::open(&source).err().unwrap().to_string();
        assert!(err.contains("past the end"), "{err}");
        assert_eq!(err.lines().count(), 1);
        // A header length beyond the file.
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&st, &b).unwrap();
        let err = ModelStream::open(&source).err().unwrap().to_string();
        assert!(err.contains("header length"), "{err}");
        // A header that is not JSON.
        let mut b = bytes.clone();
        b[8] = b'#';
        std::fs::write(&st, &b).unwrap();
        let err = ModelStream::open(&source).err().unwrap().to_string();
        assert!(err.contains("not JSON"), "{err}");
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    }
}
