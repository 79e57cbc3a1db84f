//! afinar: fine-tune open language models on your own data and serve the result.
//!
//! The crate follows the pipeline a user walks through, one folder per step:
//! `model` (load weights, tokenizer and chat template), `infer` (sampling and generation).
//! Data preparation, training, evaluation, serving and export follow the same pattern.

pub mod data;
pub mod error;
pub mod export;
pub mod infer;
pub mod model;
pub mod train;

pub use error::{Error, Result};
