//! Step 7 (inference): sampling and token-by-token generation with a KV cache.

pub mod batch;
pub mod generate;
pub mod sampling;
pub mod scripts;

pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use sampling::{Sampler, SamplingParams};
