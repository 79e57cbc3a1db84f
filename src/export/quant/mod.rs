//! ggml's block quantizations, written byte for byte as ggml's reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) write them, plus the plain casts. Each
//! quantizer is checked against golden blocks from the `gguf` Python package
//! (`tests/golden/make_quant_golden.py`).

pub mod q4_0;
pub mod q8_0;

/// Values per block of Q8_0 and Q4_0.
pub const BLOCK: usize = 32;

/// Appends `x` as little-endian f32.
pub fn f32_bytes(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() * 4, 0);
    f32_into(x, &mut out[start..]);
}

/// Writes `x` as little-endian f32 into `out` (exactly 4 bytes a value).
pub fn f32_into(x: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(4).zip(x) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Appends `x` as IEEE half precision, rounded to nearest even as ggml's `GGML_FP32_TO_FP16`.
pub fn f16_bytes(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() * 2, 0);
    f16_into(x, &mut out[start..]);
}

/// [`f16_bytes`] into `out` (exactly 2 bytes a value).
pub fn f16_into(x: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
    }
}

/// Appends `x` as bfloat16, rounded to nearest even as ggml's `GGML_FP32_TO_BF16`.
pub fn bf16_bytes(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() * 2, 0);
    bf16_into(x, &mut out[start..]);
}

/// [`bf16_bytes`] into `out` (exactly 2 bytes a value).
pub fn bf16_into(x: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
    }
}

/// `max |x|` of a block (0 for zeros; NaN ignored, as `f32::max` does), in eight independent
/// lanes so the compiler keeps it in vector registers.
#[inline(always)]
pub(crate) fn abs_max(block: &[f32; BLOCK]) -> f32 {
    let mut m = [0f32; 8];
    for chunk in block.chunks_exact(8) {
        for k in 0..8 {
            m[k] = m[k].max(chunk[k].abs());
        }
    }
    m.into_iter().fold(0f32, f32::max)
}

#[cfg(test)]
pub(crate) mod golden {
    //! The golden cases of `tests/golden/ggml_quants.json`.

    /// (input, expected bytes) for `kind` ("q8_0" or "q4_0").
    pub fn cases(kind: &str) -> Vec<(Vec<f32>, Vec<u8>)> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ggml_quants.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let input = c["input"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                let hex = c[kind].as_str().unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                (input, bytes)
            })
            .collect()
    }
}
