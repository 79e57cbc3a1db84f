//! A named set of tensors in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`),
//! whichever file format they came from, and [`Weight`]: a matrix held in f32 or in the format
//! it came in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A weight matrix (out, in): f32 (trainable in full fine-tuning), or packed — bf16, f16 or a
/// GGUF block format — and then frozen, read by the kernels a tile of rows at a time.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Packed(Arc<QTensor>),
}

impl Weight {
    /// (rows, cols).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Dense(t) => t.dims2()?,
            Weight::Packed(q) => q.shape().dims2()?,
        })
    }

    /// The size of dimension `i`.
    pub fn dim(&self, i: usize) -> Result<usize> {
        let (r, c) = self.dims2()?;
        Ok(if i == 0 { r } else { c })
    }

    /// Whether it trains (an f32 variable in full fine-tuning).
    pub fn is_variable(&self) -> bool {
        matches!(self, Weight::Dense(t) if t.is_variable())
    }

    /// The f32 tensor when dense.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Packed(_) => None,
        }
    }

    /// The whole matrix in f32 (a dequantized copy when packed): for the reference paths,
    /// export and tests, never for the kernels.
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(DType::F32)?,
            Weight::Packed(q) => q.dequantize(&q.device())?,
        })
    }

    /// The device it lives on.
    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) => t.device().clone(),
            Weight::Packed(q) => q.device(),
        }
    }

    /// Its storage format as GGUF names it (`F32`, `BF16`, `Q4_0`, …).
    pub fn format(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
            Weight::Packed(q) => format_name(q.dtype()),
        }
    }

    /// Bytes it occupies in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Packed(q) => q.storage_size_in_bytes(),
        }
    }

    /// Rows `ids` (any shape, u32) as f32 vectors: shape (ids…, cols). Not differentiable in
    /// a packed weight (it is frozen).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.embedding(ids)?,
            Weight::Packed(q) => q.embedding(ids)?,
        })
    }
}

/// How the base model's matrices are held in memory (`--base-dtype`, train key `base_dtype`).
/// Norms and biases are always f32; LoRA weights, their gradients and optimizer moments too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    /// As they come: bf16/f16 safetensors stay 16-bit, GGUF tensors stay in their block
    /// format, f32 stays f32. Off the CPU, f32 (the packed kernels are CPU kernels).
    #[default]
    Auto,
    F32,
    Bf16,
    Q8_0,
    Q4_0,
}

impl BaseDtype {
    /// The format it converts to (`None` for `Auto`).
    fn target(self) -> Option<GgmlDType> {
        match self {
            BaseDtype::Auto => None,
            BaseDtype::F32 => Some(GgmlDType::F32),
            BaseDtype::Bf16 => Some(GgmlDType::BF16),
            BaseDtype::Q8_0 => Some(GgmlDType::Q8_0),
            BaseDtype::Q4_0 => Some(GgmlDType::Q4_0),
        }
    }

    /// Whether a matrix stored in the file as `d` is held exactly as read.
    pub fn keeps(self, d: GgmlDType, device: &Device) -> bool {
        device.is_cpu() && d != GgmlDType::F32 && self.target().is_none_or(|t| t == d)
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => BaseDtype::Auto,
            "f32" => BaseDtype::F32,
            "bf16" => BaseDtype::Bf16,
            "q8_0" => BaseDtype::Q8_0,
            "q4_0" => BaseDtype::Q4_0,
            _ => {
                return Err(Error::Config(format!(
                    "base_dtype = '{s}': use \"auto\" (as the file holds them), \"f32\", \"bf16\", \"q8_0\" or \"q4_0\""
                )))
            }
        })
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BaseDtype::Auto => "auto",
            BaseDtype::F32 => "f32",
            BaseDtype::Bf16 => "bf16",
            BaseDtype::Q8_0 => "q8_0",
            BaseDtype::Q4_0 => "q4_0",
        })
    }
}

/// A matrix read from a file as `q`, for which [`BaseDtype::keeps`] was true.
pub fn hold_packed(q: QTensor) -> Result<Weight> {
    Ok(Weight::Packed(Arc::new(q)))
}

/// A 2-D matrix read as a tensor (any dtype), held as `base` says.
pub fn hold(t: Tensor, base: BaseDtype) -> Result<Weight> {
    if !t.device().is_cpu() {
        return Ok(Weight::Dense(t.to_dtype(DType::F32)?));
    }
    let target = match (base.target(), t.dtype()) {
        (Some(g), _) => g,
        (None, DType::BF16) => GgmlDType::BF16,
        (None, DType::F16) => GgmlDType::F16,
        (None, _) => GgmlDType::F32,
    };
    let cols = t.dims().last().copied().unwrap_or(0);
    if target == GgmlDType::F32 || cols % target.block_size() != 0 {
        return Ok(Weight::Dense(t.to_dtype(DType::F32)?));
    }
    Ok(Weight::Packed(Arc::new(QTensor::quantize(&t, target)?)))
}

/// How matrices are held, as `afinar info` and training's opening line say it:
/// "210 × Q4_1, 1 × Q8_0" from [`crate::model::Transformer::held_formats`].
pub fn held_summary(held: &std::collections::BTreeMap<String, usize>) -> String {
    held.iter()
        .map(|(f, n)| format!("{n} × {f}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// GGUF's name of a format (`Q4_K` rather than candle's `Q4K`).
pub fn format_name(d: GgmlDType) -> String {
    let s = format!("{d:?}").to_uppercase();
    match s.strip_suffix('K') {
        Some(head) if s.starts_with('Q') => format!("{head}_K"),
        _ => s,
    }
}

/// Tensors by Hugging Face name, plus the file they came from for error messages.
pub struct Weights {
    pub tensors: HashMap<String, Weight>,
    pub origin: PathBuf,
}

impl Weights {
    /// Removes and returns a tensor in f32 (dequantized if it was packed), checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.take_weight(name, shape)? {
            Weight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            p => p.to_f32(),
        }
    }

    /// Removes and returns a tensor as held (packed matrices stay packed), checking its shape.
    pub fn take_weight(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::bad_file(&self.origin, format!("missing tensor '{name}'")))?;
        let dims: Vec<usize> = match &t {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Packed(q) => q.shape().dims().to_vec(),
        };
        if dims != shape {
            return Err(Error::bad_file(
                &self.origin,
                format!("tensor '{name}' has shape {dims:?}, expected {shape:?}"),
            ));
        }
        Ok(t)
    }

    /// Removes and returns a tensor as held, if present.
    pub fn take_weight_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Weight>> {
        if self.tensors.contains_key(name) {
            self.take_weight(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_follow_gguf() {
        assert_eq!(format_name(GgmlDType::Q4K), "Q4_K");
        assert_eq!(format_name(GgmlDType::Q8_0), "Q8_0");
        assert_eq!(format_name(GgmlDType::BF16), "BF16");
    }
}
