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

/// Rows of the delta computed per matrix product in [`add_delta`] (bounds its scratch memory to
/// a slice of the weight, whatever the weight's size).
const DELTA_ROWS: usize = 256;

/// Adds `scale · B · A` to the row-major weight `w` (out × in) in place, `DELTA_ROWS` rows at a
/// time: the merge of one projection as it is streamed, without a second copy of the weight.
pub fn add_delta(
    w: &mut [f32],
    b: &candle_core::Tensor,
    a: &candle_core::Tensor,
    scale: f64,
) -> Result<()> {
    let (out, _) = b.dims2()?;
    let (_, inp) = a.dims2()?;
    if w.len() != out * inp {
        return Err(crate::Error::Unsupported(format!(
            "LoRA merge: a weight of {} values for a {out}×{inp} delta (a bug in afinar's export)",
            w.len()
        )));
    }
    for (i, rows) in w.chunks_mut(DELTA_ROWS * inp).enumerate() {
        let n = rows.len() / inp;
        let delta = (b.narrow(0, i * DELTA_ROWS, n)?.matmul(a)? * scale)?;
        let delta = delta.flatten_all()?.to_vec1::<f32>()?;
        for (x, d) in rows.iter_mut().zip(delta) {
            *x += d;
        }
    }
    Ok(())
}
