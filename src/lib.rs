//! afinar: fine-tune open language models on your own data and serve the result.
//!
//! The crate follows the pipeline a user walks through, one folder per step: `data` (load,
//! template, tokenize, split, pack), `model` (weights, tokenizer, chat template, fused ops),
//! `train`, `eval`, `infer` (sampling, generation) and `export` (PEFT adapters, merged models);
//! `serve` (the OpenAI-compatible server); `quickstart` runs them all in one go.

pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod export;
pub mod fs;
pub mod infer;
pub mod model;
pub mod quickstart;
pub mod rng;
pub mod serve;
pub mod train;

pub use error::{Error, Result};
