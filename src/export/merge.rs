//! Folds LoRA adapters into the weights they adapt: `W' = W + s·B·A`, computed in f32 and cast
//! back to the weight's dtype, so the merged model needs no adapter at inference and any tool
//! that reads plain weights (transformers, llama.cpp) runs the tuned model.

use candle_core::DType;

use crate::model::transformer::Transformer;
use crate::model::Weight;
use crate::Result;

/// Merges every attached adapter of `model` into its weight and detaches it. Returns the number
/// of projections merged (0 when none had an adapter, e.g. a full fine-tuning run).
pub fn merge_lora(model: &mut Transformer) -> Result<usize> {
    let mut merged = 0;
    for (_, lin) in model.linears_mut() {
        let Some(lora) = lin.lora.take() else {
            continue;
        };
        // A packed base comes out merged in f32 (requantizing would add a second rounding).
        let w = lin.weight.to_f32()?;
        let a = lora.a.as_tensor().to_dtype(DType::F32)?;
        let b = lora.b.as_tensor().to_dtype(DType::F32)?;
        let delta = (b.matmul(&a)? * lora.scale)?;
        lin.weight = Weight::Dense((w + delta)?.detach());
        merged += 1;
    }
    Ok(merged)
}
