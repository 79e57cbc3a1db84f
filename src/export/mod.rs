//! Step 7 (export): formats other tools load. PEFT adapters today; merged safetensors and GGUF
//! follow.

pub mod hf;
pub mod peft;
