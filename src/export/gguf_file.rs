//! The GGUF container (version 3), written with afinar's own code: the format is small (a header
//! of typed key/values, a tensor table, then the aligned tensor data), so a dependency would buy
//! little. Tensors are streamed one at a time into a temporary file beside the target, which is
//! renamed over it only once complete: a failed or interrupted export leaves no half-written
//! file under the final name.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

use super::quant::{self, BLOCK};
use crate::{Error, Result};

/// Alignment of the tensor data (`general.alignment`, GGUF's default).
pub const ALIGNMENT: usize = 32;

/// A metadata value (the GGUF value types afinar writes).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// Storage types of tensors (ggml's `ggml_type` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl GgmlType {
    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    /// Bytes of `n` values (a multiple of 32 for the block types).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => n * 4,
            GgmlType::F16 | GgmlType::Bf16 => n * 2,
            GgmlType::Q8_0 => n / BLOCK * quant::q8_0::BLOCK_BYTES,
            GgmlType::Q4_0 => n / BLOCK * quant::q4_0::BLOCK_BYTES,
        }
    }

    /// Whether rows of `cols` values can be stored in this type.
    pub fn fits(self, cols: usize) -> bool {
        match self {
            GgmlType::Q8_0 | GgmlType::Q4_0 => cols.is_multiple_of(BLOCK),
            _ => true,
        }
    }

    /// Appends `x` (row-major, rows a multiple of the block size) encoded in this type.
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.bytes(x.len()), 0);
        self.encode_par(x, &mut out[start..]);
    }

    /// Writes `x` encoded in this type into `out` (exactly [`GgmlType::bytes`] long), in
    /// parallel over runs of [`PAR_VALUES`] values (whole blocks, so the bytes are those of the
    /// sequential encoding).
    pub fn encode_par(self, x: &[f32], out: &mut [u8]) {
        use rayon::prelude::*;
        let out_chunk = self.bytes(PAR_VALUES);
        x.par_chunks(PAR_VALUES)
            .zip(out.par_chunks_mut(out_chunk))
            .for_each(|(x, o)| self.encode_into(x, o));
    }

    /// Writes `x` encoded in this type into `out` (exactly [`GgmlType::bytes`] long).
    pub fn encode_into(self, x: &[f32], out: &mut [u8]) {
        match self {
            GgmlType::F32 => quant::f32_into(x, out),
            GgmlType::F16 => quant::f16_into(x, out),
            GgmlType::Bf16 => quant::bf16_into(x, out),
            GgmlType::Q8_0 => quant::q8_0::quantize_into(x, out),
            GgmlType::Q4_0 => quant::q4_0::quantize_into(x, out),
        }
    }
}

/// Values encoded per parallel task (a multiple of the block size).
pub const PAR_VALUES: usize = 32 * 1024;

/// Values encoded and written per slab by [`TensorWriter::encode`]: bounds the encoded bytes held
/// at once, whatever the tensor's size.
const SLAB_VALUES: usize = 1 << 22;

/// Encoded slabs queued for the writing thread (each at most [`SLAB_VALUES`] values encoded).
const QUEUED_SLABS: usize = 2;

/// Where encoded tensor data goes: a thread that writes it to the file (buffered) while the
/// caller reads and encodes the next slab, so the kernel's copy into the page cache overlaps the
/// quantization instead of following it. Write errors end the thread and are returned by
/// [`write_through`].
pub struct TensorWriter<'a> {
    tx: &'a SyncSender<Vec<u8>>,
    free: &'a Receiver<Vec<u8>>,
    written: usize,
}

impl TensorWriter<'_> {
    /// Encodes `x` (row-major; rows a multiple of the block size for the block types) as `ty`
    /// and writes it.
    pub fn encode(&mut self, ty: GgmlType, x: &[f32]) -> Result<()> {
        for slab in x.chunks(SLAB_VALUES) {
            // A buffer the writer is done with, so pages are reused rather than faulted in anew;
            // not cleared, so no bytes are zeroed that are about to be overwritten.
            let mut buf = self.free.try_recv().unwrap_or_default();
            buf.resize(ty.bytes(slab.len()), 0);
            ty.encode_par(slab, &mut buf);
            self.put(buf)?;
        }
        Ok(())
    }

    /// Writes `bytes` as they are.
    pub fn put(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.written += bytes.len();
        self.tx
            .send(bytes)
            .map_err(|_| Error::Unsupported("the file writer stopped".into()))
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.written
    }
}

/// Runs `produce` with a [`TensorWriter`] whose bytes a second thread writes to `file` (the file
/// at `path`, for error messages); returns the file, flushed, once `produce` and the writes are
/// done. A write error is reported in preference to the producer's error it caused.
pub fn write_through(
    file: File,
    path: &Path,
    produce: impl FnOnce(&mut TensorWriter) -> Result<()>,
) -> Result<File> {
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED_SLABS);
        let (free_tx, free_rx) = channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> std::io::Result<File> {
            let mut w = BufWriter::with_capacity(1 << 20, file);
            for buf in rx {
                w.write_all(&buf)?;
                let _ = free_tx.send(buf);
            }
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())
        });
        let mut tw = TensorWriter {
            tx: &tx,
            free: &free_rx,
            written: 0,
        };
        let produced = produce(&mut tw);
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        match (produced, written) {
            (_, Err(e)) => Err(Error::io(path, e)),
            (Err(e), Ok(_)) => Err(e),
            (Ok(()), Ok(file)) => Ok(file),
        }
    })
}

/// One tensor of the file: its GGUF name, its shape in row-major (PyTorch) order and its type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorPlan {
    /// Number of values.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Writes a GGUF file at `path`: `meta` in order, the tensor table of `plan` (offsets computed
/// from the shapes alone), then the tensors' data, which `data(i, writer)` writes for tensor `i`
/// (called once per tensor, in order), so only one tensor need be in memory at a time.
pub fn write(
    path: &Path,
    meta: &[(String, MetaValue)],
    plan: &[TensorPlan],
    mut data: impl FnMut(usize, &mut TensorWriter) -> Result<()>,
) -> Result<()> {
    let tmp = crate::fs::tmp_name(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let io = |e: std::io::Error| Error::io(&tmp, e);
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64 + 1).to_le_bytes());
        put_kv(
            &mut head,
            "general.alignment",
            &MetaValue::U32(ALIGNMENT as u32),
        );
        for (k, v) in meta {
            put_kv(&mut head, k, v);
        }
        let mut offset = 0usize;
        for t in plan {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            // ggml lists dimensions innermost first.
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad_to(t.ty.bytes(t.elems()));
        }
        head.resize(pad_to(head.len()), 0);
        let head_len = head.len();
        let mut file = write_through(file, &tmp, |w| {
            w.put(head)?;
            for (i, t) in plan.iter().enumerate() {
                let start = w.written();
                data(i, w)?;
                let written = w.written() - start;
                let want = t.ty.bytes(t.elems());
                if written != want {
                    return Err(Error::Unsupported(format!(
                        "GGUF writer: tensor {} encoded to {written} bytes, expected {want} (a bug in afinar's export)",
                        t.name
                    )));
                }
                w.put(vec![0u8; pad_to(want) - want])?;
            }
            Ok(())
        })?;
        let len = file.stream_position().map_err(io)?;
        debug_assert_eq!(len as usize, head_len + offset);
        file.sync_all().map_err(io)?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn pad_to(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

// GGUF value type ids.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_kv(out: &mut Vec<u8>, key: &str, v: &MetaValue) {
    put_str(out, key);
    let array_head = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend_from_slice(&T_ARRAY.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        MetaValue::U32(x) => {
            out.extend_from_slice(&T_U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::I32(x) => {
            out.extend_from_slice(&T_I32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::F32(x) => {
            out.extend_from_slice(&T_F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::Bool(x) => {
            out.extend_from_slice(&T_BOOL.to_le_bytes());
            out.push(*x as u8);
        }
        MetaValue::Str(s) => {
            out.extend_from_slice(&T_STRING.to_le_bytes());
            put_str(out, s);
        }
        MetaValue::StrArray(items) => {
            array_head(out, T_STRING, items.len());
            for s in items {
                put_str(out, s);
            }
        }
        MetaValue::I32Array(items) => {
            array_head(out, T_I32, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        MetaValue::F32Array(items) => {
            array_head(out, T_F32, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value};

    /// candle's GGUF reader (the one afinar loads with) reads back what the writer wrote.
    #[test]
    fn candle_reads_back_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::Str("llama".into()),
            ),
            ("a.u32".into(), MetaValue::U32(7)),
            ("a.f32".into(), MetaValue::F32(1e-5)),
            ("a.bool".into(), MetaValue::Bool(true)),
            (
                "a.strs".into(),
                MetaValue::StrArray(vec!["x".into(), "yz".into()]),
            ),
            ("a.ints".into(), MetaValue::I32Array(vec![1, -3])),
        ];
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let plan = vec![
            TensorPlan {
                name: "w".into(),
                shape: vec![2, 32],
                ty: GgmlType::Q8_0,
            },
            TensorPlan {
                name: "n".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            TensorPlan {
                name: "h".into(),
                shape: vec![2, 32],
                ty: GgmlType::F16,
            },
        ];
        write(&path, &meta, &plan, |i, w| match i {
            0 => w.encode(GgmlType::Q8_0, &x),
            1 => w.encode(GgmlType::F32, &[1.0, 2.0, 3.0]),
            _ => w.encode(GgmlType::F16, &x),
        })
        .unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let mut f = std::fs::File::open(&path).unwrap();
        let c = Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(c.metadata["general.alignment"].to_u32().unwrap(), 32);
        assert!(matches!(&c.metadata["a.strs"], Value::Array(v) if v.len() == 2));
        let dev = candle_core::Device::Cpu;
        let n = c
            .tensor(&mut f, "n", &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        assert_eq!(n.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        let h = c
            .tensor(&mut f, "h", &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        assert_eq!(h.dims(), &[2, 32]);
        let h = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in h.iter().zip(&x) {
            assert!((a - b).abs() <= b.abs() * 1e-3, "{a} vs {b}");
        }
        let w = c
            .tensor(&mut f, "w", &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in w.iter().zip(&x) {
            // Half a step, plus the f16 rounding of the scale.
            assert!((a - b).abs() <= 4.3 / 127.0 * 0.6, "{a} vs {b}");
        }
    }

    /// The parallel, slab-wise encoding gives the bytes of the sequential one, on a tensor of
    /// several slabs and a ragged last task.
    #[test]
    fn parallel_encoding_equals_sequential() {
        let n = SLAB_VALUES + PAR_VALUES * 3 + 32 * 5;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0) * if i % 97 == 0 { 40.0 } else { 1.0 })
            .collect();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Bf16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
        ] {
            let mut seq = vec![0u8; ty.bytes(n)];
            ty.encode_into(&x, &mut seq);
            let mut par = Vec::new();
            ty.encode(&x, &mut par);
            assert!(seq == par, "{ty:?}");
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let plan = vec![TensorPlan {
            name: "n".into(),
            shape: vec![3],
            ty: GgmlType::F32,
        }];
        let err = write(&path, &[], &plan, |_, _| {
            Err(Error::Unsupported("stop".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
