//! A named set of f32 tensors in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`),
//! whichever file format they came from.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use crate::{Error, Result};

/// Tensors by Hugging Face name, plus the file they came from for error messages.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub origin: PathBuf,
}

impl Weights {
    /// Removes and returns a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::bad_file(&self.origin, format!("missing tensor '{name}'")))?;
        if t.dims() != shape {
            return Err(Error::bad_file(
                &self.origin,
                format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t)
    }

    /// Removes and returns a tensor if present.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
