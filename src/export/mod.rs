//! Step 7 (export): formats other tools load. PEFT adapters today; merged safetensors and GGUF
//! follow.

pub mod gguf;
pub mod gguf_file;
pub mod hf;
pub mod peft;
pub mod quant;
