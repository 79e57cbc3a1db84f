//! Step 7 (inference): sampling and token-by-token generation with a KV cache, scoring a text,
//! and the inference benchmark.

pub mod batch;
pub mod bench;
pub mod constrain;
pub mod generate;
pub mod sampling;
pub mod score;
pub mod scripts;

pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use sampling::{Sampler, SamplingParams};
pub use score::{score, Score};
