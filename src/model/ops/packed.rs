//! Weight matrices held in the format they came in (bf16, f16, and GGUF's block formats Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants), read a tile of rows at a time.
//!
//! The block types and their dequantization and dot products are candle's
//! (`candle_core::quantized::k_quants`), which follow ggml's; this file only reaches into a
//! [`QTensor`]'s bytes by row, so that the kernels in `packed_matmul.rs` never build a whole f32
//! copy of a matrix.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;

/// Calls the generic function `$f::<T>($args…)` with `T` the block type of `$dtype`, or bails
/// for the formats weights never come in (Q8_1, Q8_K: activation formats only).
macro_rules! with_block_type {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            GgmlDType::F32 => $f::<f32>($($arg),*),
            GgmlDType::F16 => $f::<half::f16>($($arg),*),
            GgmlDType::BF16 => $f::<half::bf16>($($arg),*),
            GgmlDType::Q4_0 => $f::<candle_core::quantized::k_quants::BlockQ4_0>($($arg),*),
            GgmlDType::Q4_1 => $f::<candle_core::quantized::k_quants::BlockQ4_1>($($arg),*),
            GgmlDType::Q5_0 => $f::<candle_core::quantized::k_quants::BlockQ5_0>($($arg),*),
            GgmlDType::Q5_1 => $f::<candle_core::quantized::k_quants::BlockQ5_1>($($arg),*),
            GgmlDType::Q8_0 => $f::<candle_core::quantized::k_quants::BlockQ8_0>($($arg),*),
            GgmlDType::Q2K => $f::<candle_core::quantized::k_quants::BlockQ2K>($($arg),*),
            GgmlDType::Q3K => $f::<candle_core::quantized::k_quants::BlockQ3K>($($arg),*),
            GgmlDType::Q4K => $f::<candle_core::quantized::k_quants::BlockQ4K>($($arg),*),
            GgmlDType::Q5K => $f::<candle_core::quantized::k_quants::BlockQ5K>($($arg),*),
            GgmlDType::Q6K => $f::<candle_core::quantized::k_quants::BlockQ6K>($($arg),*),
            other => candle_core::bail!("weights in {other:?} are not supported"),
        }
    };
}
pub(crate) use with_block_type;

/// A borrowed (rows × cols) matrix in a packed format: row r is `bytes[r·row_bytes ..]`.
#[derive(Clone, Copy)]
pub struct PackedRef<'a> {
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> PackedRef<'a> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Rows `r0..r1` dequantized into `out` ((r1 − r0) × cols f32).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
        let rb = self.row_bytes();
        assert!(
            r0 <= r1 && r1 <= self.rows,
            "rows {r0}..{r1} of {}",
            self.rows
        );
        assert_eq!(
            out.len(),
            (r1 - r0) * self.cols,
            "dequantize_rows: output size"
        );
        let bytes = &self.bytes[r0 * rb..r1 * rb];
        with_block_type!(self.dtype, to_float(bytes, out))
    }

    /// The blocks of the whole matrix as `T` (the caller has matched `dtype` to `T`).
    pub fn blocks<T: GgmlType>(&self) -> &'a [T] {
        cast::<T>(self.bytes)
    }
}

/// The packed view of a CPU [`QTensor`] holding a 2-D matrix.
pub fn packed_ref(q: &QTensor) -> Result<PackedRef<'_>> {
    let (rows, cols) = q.shape().dims2()?;
    let bytes = match q.data()? {
        std::borrow::Cow::Borrowed(b) => b,
        std::borrow::Cow::Owned(_) => {
            candle_core::bail!("packed weights must be in CPU memory")
        }
    };
    let p = PackedRef {
        dtype: q.dtype(),
        rows,
        cols,
        bytes,
    };
    if cols % q.dtype().block_size() != 0 || bytes.len() != rows * p.row_bytes() {
        candle_core::bail!(
            "packed weight {rows}×{cols} in {:?} has {} bytes",
            q.dtype(),
            bytes.len()
        );
    }
    Ok(p)
}

fn to_float<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    T::to_float(cast::<T>(bytes), out);
    Ok(())
}

/// `bytes` as a slice of `T` blocks.
fn cast<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(bytes.len() % size, 0, "packed bytes are not whole blocks");
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "packed bytes are not aligned for their block type"
    );
    // SAFETY: length and alignment are checked above; the block types are plain `repr(C)`
    // structs of integers and halves (candle reads GGUF files into them the same way), for
    // which every bit pattern is a valid value; the slice borrows `bytes` for its lifetime.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

/// Row-major (rows × cols) f32 data converted to `dtype` (for `--base-dtype` conversions and
/// tests); rows are whole blocks.
pub fn quantize(data: &[f32], rows: usize, cols: usize, dtype: GgmlDType) -> Result<QTensor> {
    let t = candle_core::Tensor::from_slice(data, (rows, cols), &candle_core::Device::Cpu)?;
    QTensor::quantize(&t, dtype)
}

/// A new QTensor with rows taken from `q` in the order `order` (a permutation of its rows):
/// llama.cpp's Q/K row permutation undone without dequantizing.
pub fn permute_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let p = packed_ref(q)?;
    assert_eq!(order.len(), p.rows, "permute_rows: one index per row");
    let rb = p.row_bytes();
    let mut bytes = Vec::with_capacity(p.bytes.len());
    for &r in order {
        bytes.extend_from_slice(&p.bytes[r * rb..(r + 1) * rb]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        &candle_core::Device::Cpu,
        p.dtype,
    )?;
    QTensor::new(storage, (p.rows, p.cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn formats() -> [GgmlDType; 12] {
        [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ]
    }

    #[test]
    fn row_tiles_equal_candles_whole_dequantization() -> Result<()> {
        let (rows, cols) = (7, 512);
        let x = Tensor::randn(0f32, 1., (rows, cols), &Device::Cpu)?;
        for dtype in formats() {
            let q = QTensor::quantize(&x, dtype)?;
            let whole: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let p = packed_ref(&q)?;
            for (r0, r1) in [(0, 7), (2, 5), (6, 7), (3, 3)] {
                let mut out = vec![0f32; (r1 - r0) * cols];
                p.dequantize_rows(r0, r1, &mut out)?;
                assert_eq!(
                    out,
                    whole[r0 * cols..r1 * cols],
                    "{dtype:?} rows {r0}..{r1}"
                );
            }
        }
        Ok(())
    }

    /// Every block format against ggml's reference dequantization (the `gguf` Python
    /// package's, golden values from tests/golden/make_dequant_golden.py) on random blocks.
    #[test]
    fn dequantization_equals_ggml_reference() -> Result<()> {
        use base64::Engine;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/ggml_dequant.json"
        );
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
        };
        let mut seen = Vec::new();
        for case in g["cases"].as_array().unwrap() {
            let name = case["format"].as_str().unwrap();
            let dtype = match name {
                "Q4_0" => GgmlDType::Q4_0,
                "Q4_1" => GgmlDType::Q4_1,
                "Q5_0" => GgmlDType::Q5_0,
                "Q5_1" => GgmlDType::Q5_1,
                "Q8_0" => GgmlDType::Q8_0,
                "Q2_K" => GgmlDType::Q2K,
                "Q3_K" => GgmlDType::Q3K,
                "Q4_K" => GgmlDType::Q4K,
                "Q5_K" => GgmlDType::Q5K,
                "Q6_K" => GgmlDType::Q6K,
                other => panic!("unknown format {other}"),
            };
            let (rows, cols) = (
                case["rows"].as_u64().unwrap() as usize,
                case["cols"].as_u64().unwrap() as usize,
            );
            let bytes = b64(&case["bytes_b64"]);
            let want: Vec<f32> = b64(&case["values_f32_b64"])
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &Device::Cpu,
                dtype,
            )?;
            let q = QTensor::new(storage, (rows, cols))?;
            let mut got = vec![0f32; rows * cols];
            packed_ref(&q)?.dequantize_rows(0, rows, &mut got)?;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} element {i}: {g} vs ggml {w}"
                );
            }
            seen.push(name.to_string());
        }
        assert_eq!(seen.len(), 10, "every format checked: {seen:?}");
        Ok(())
    }

    #[test]
    fn permuting_rows_moves_them_whole() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (4, 64), &Device::Cpu)?;
        let q = QTensor::quantize(&x, GgmlDType::Q4_0)?;
        let whole: Vec<Vec<f32>> = q.dequantize(&Device::Cpu)?.to_vec2()?;
        let p: Vec<Vec<f32>> = permute_rows(&q, &[2, 0, 3, 1])?
            .dequantize(&Device::Cpu)?
            .to_vec2()?;
        assert_eq!(
            p,
            vec![
                whole[2].clone(),
                whole[0].clone(),
                whole[3].clone(),
                whole[1].clone()
            ]
        );
        Ok(())
    }
}
