//! TEMPORARY STUB: the GGUF writer is being built on another branch with exactly this API; the
//! merge replaces this file. Until then every GGUF target answers `Unsupported`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::{Error, Result};

/// Storage type of the weights in a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl FromStr for GgufDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(Error::InvalidArgument(format!(
                "--dtype {other}: expected f32, f16, bf16, q8_0 or q4_0"
            ))),
        }
    }
}

impl fmt::Display for GgufDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

/// Writes `model` (adapters already merged) as a GGUF file.
pub fn write_model(_model: &crate::model::Model, _dtype: GgufDtype, _path: &Path) -> Result<()> {
    Err(Error::Unsupported("GGUF export is being built".into()))
}

/// Writes the adapter in `adapter_dir` as a LoRA GGUF over `base`.
pub fn write_lora(_base: &crate::model::Model, _adapter_dir: &Path, _path: &Path) -> Result<()> {
    Err(Error::Unsupported("GGUF export is being built".into()))
}
