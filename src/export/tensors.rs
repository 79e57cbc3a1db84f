//! Where the writers take a model from: its description ([`ModelInfo`]) and its weights one
//! tensor at a time ([`TensorSource`]). `afinar export` streams them from the checkpoint on disk
//! with the adapter merged tensor by tensor ([`Streamed`]), so it never holds the model whole;
//! a model already in memory (full fine-tuning's save, tests) is written through [`Loaded`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::peft::{self, AdapterConfig};
use crate::model::layout;
use crate::model::stream::ModelStream;
use crate::model::transformer::Linear;
use crate::model::{ChatTemplate, Model, ModelConfig, ModelSource, TextTokenizer};
use crate::{Error, Result};

/// What the writers need to know of a model besides its weights.
#[derive(Clone, Copy)]
pub struct ModelInfo<'a> {
    pub source: &'a ModelSource,
    pub config: &'a ModelConfig,
    pub tokenizer: &'a TextTokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
}

impl<'a> ModelInfo<'a> {
    /// The description of a loaded model.
    pub fn of(model: &'a Model) -> Self {
        Self {
            source: &model.source,
            config: model.config(),
            tokenizer: &model.tokenizer,
            chat_template: model.chat_template.as_ref(),
        }
    }

    /// Renders a conversation with the model's template, or errors if it has none (as
    /// [`Model::render_chat`]).
    pub fn render_chat(
        &self,
        messages: &[crate::model::Message],
        generation: bool,
    ) -> Result<String> {
        let t = self.chat_template.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: the model has no chat template; use plain prompts (without --chat)",
                self.source.path().display()
            ))
        })?;
        t.render(messages, generation)
    }
}

/// A model's weights in Hugging Face naming, read one tensor at a time.
pub trait TensorSource {
    /// Every tensor to write, `(name, shape)`, in name order.
    fn tensors(&self) -> Vec<(String, Vec<usize>)>;
    /// The shape of tensor `name`, or None when the model has no such tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Tensor `name` in f32, row-major, with any adapter merged (W + s·B·A), into `out`
    /// (resized to fit; its allocation is reused from one tensor to the next).
    fn read_into(&self, name: &str, out: &mut Vec<f32>) -> Result<()>;
    /// [`TensorSource::read_into`] a new vector.
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        self.read_into(name, &mut v)?;
        Ok(v)
    }
    /// llama.cpp's `rope_freqs.weight` carried by a GGUF source, if any.
    fn rope_freqs(&self) -> Result<Option<Vec<f32>>>;
}

/// The tensors a model of configuration `c` is made of, with their shapes, in name order; the
/// output head only when `head` (untied models whose checkpoint has one).
pub fn expected_tensors(c: &ModelConfig, head: bool) -> Vec<(String, Vec<usize>)> {
    layout::tensors(c, head)
        .into_iter()
        .map(|t| (t.hf, t.shape))
        .collect()
}

/// A LoRA delta for one projection: `s · B · A`.
struct Delta {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// A checkpoint on disk, optionally with a PEFT adapter merged into each projection as it is
/// read: the source `afinar export` writes from. Only one tensor is in memory at a time (plus the
/// adapter, which is small).
pub struct Streamed {
    pub stream: ModelStream,
    tensors: Vec<(String, Vec<usize>)>,
    lora: HashMap<String, Delta>,
}

impl Streamed {
    /// Opens `stream`, checks that it has every tensor its configuration asks for, and reads the
    /// adapter in `adapter` (if any), checking it fits; `model_name` names the model in errors.
    pub fn open(
        stream: ModelStream,
        adapter: Option<&Path>,
        model_name: &str,
    ) -> Result<(Self, Option<AdapterConfig>)> {
        let c = &stream.config;
        let head = !c.tie_word_embeddings && stream.get("lm_head.weight").is_some();
        let tensors = expected_tensors(c, head);
        for (name, shape) in &tensors {
            stream.expect(name, shape)?;
        }
        let mut lora = HashMap::new();
        let cfg = match adapter {
            None => None,
            Some(dir) => {
                let (cfg, mut t) = peft::read(dir, c.architecture, &Device::Cpu)?;
                let misfit = peft::misfit(dir, &cfg, model_name);
                for i in 0..c.num_layers {
                    for (module, _, out, inp) in layout::projections(c) {
                        let name = format!("model.layers.{i}.{module}");
                        let a = t.remove(&format!("{}{name}.lora_A.weight", peft::PREFIX));
                        let b = t.remove(&format!("{}{name}.lora_B.weight", peft::PREFIX));
                        let (Some(a), Some(b)) = (a, b) else { continue };
                        if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
                            return Err(misfit(format!(
                                "{name} is {out}×{inp} but the adapter has A {:?} and B {:?}",
                                a.dims(),
                                b.dims()
                            )));
                        }
                        let delta = Delta {
                            a: a.to_dtype(DType::F32)?,
                            b: b.to_dtype(DType::F32)?,
                            scale: cfg.scale(),
                        };
                        lora.insert(format!("{name}.weight"), delta);
                    }
                }
                if lora.is_empty() {
                    return Err(misfit(
                        "none of its module names match the model's layers".into(),
                    ));
                }
                if let Some(extra) = t.keys().next() {
                    return Err(misfit(format!("tensor {extra} has no matching module")));
                }
                Some(cfg)
            }
        };
        Ok((
            Self {
                stream,
                tensors,
                lora,
            },
            cfg,
        ))
    }
}

impl TensorSource for Streamed {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
    }

    fn read_into(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        self.stream.read_into(name, out)?;
        if let Some(d) = self.lora.get(name) {
            super::merge::add_delta(out, &d.b, &d.a, d.scale)?;
        }
        Ok(())
    }

    fn rope_freqs(&self) -> Result<Option<Vec<f32>>> {
        self.stream.rope_freqs()
    }
}

/// One weight of a loaded model.
#[derive(Clone, Copy)]
enum Held<'a> {
    Tensor(&'a Tensor),
    /// A matrix as the model holds it (f32 or packed), read in f32.
    Weight(&'a crate::model::Weight),
    /// A projection's weight, with its attached adapter (if any) merged in when read.
    Linear(&'a Linear),
}

/// A model in memory as a [`TensorSource`] (adapters still attached are merged as tensors are
/// read).
pub struct Loaded<'a> {
    model: &'a Model,
    held: HashMap<String, Held<'a>>,
}

impl<'a> Loaded<'a> {
    pub fn new(model: &'a Model) -> Self {
        let m = &model.transformer;
        let mut held = HashMap::new();
        held.insert(
            "model.embed_tokens.weight".into(),
            Held::Weight(&m.embed_tokens),
        );
        for (name, t) in m.final_norms() {
            held.insert(name.into(), Held::Tensor(t));
        }
        if let Some(h) = &m.lm_head {
            held.insert("lm_head.weight".into(), Held::Weight(h));
        }
        for (i, l) in m.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, t) in l.norms() {
                held.insert(format!("{p}.{name}"), Held::Tensor(t));
            }
            for (module, lin) in l.linears() {
                held.insert(format!("{p}.{module}.weight"), Held::Linear(lin));
                if let Some(b) = &lin.bias {
                    held.insert(format!("{p}.{module}.bias"), Held::Tensor(b));
                }
            }
        }
        Self { model, held }
    }
}

impl TensorSource for Loaded<'_> {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .held
            .keys()
            .map(|n| (n.clone(), self.shape(n).unwrap_or_default()))
            .collect();
        v.sort();
        v
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        Some(match self.held.get(name)? {
            Held::Tensor(t) => t.dims().to_vec(),
            Held::Weight(w) => {
                let (r, c) = w.dims2().ok()?;
                vec![r, c]
            }
            Held::Linear(l) => {
                let (r, c) = l.weight.dims2().ok()?;
                vec![r, c]
            }
        })
    }

    fn read_into(&self, name: &str, out: &mut Vec<f32>) -> Result<()> {
        let held = self.held.get(name).ok_or_else(|| {
            Error::bad_file(self.model.source.path(), format!("missing tensor '{name}'"))
        })?;
        let t = match held {
            Held::Tensor(t) => (*t).clone(),
            Held::Weight(w) => w.to_f32()?,
            Held::Linear(l) => match &l.lora {
                None => l.weight.to_f32()?,
                Some(ad) => {
                    let ba = ad.b.as_tensor().matmul(ad.a.as_tensor())?;
                    (l.weight.to_f32()? + (ba * ad.scale)?)?
                }
            },
        };
        *out = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(())
    }

    fn rope_freqs(&self) -> Result<Option<Vec<f32>>> {
        let ModelSource::Gguf(path) = &self.model.source else {
            return Ok(None);
        };
        let content = crate::model::gguf::read_header(path)?;
        if !content.tensor_infos.contains_key("rope_freqs.weight") {
            return Ok(None);
        }
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let t = content
            .tensor(&mut f, "rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        Ok(Some(t.to_vec1::<f32>()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed base plus adapter reads, tensor by tensor, what the loaded model with the
    /// same adapter attached gives (the merge done per row chunk equals `W + s·B·A`).
    #[test]
    fn streamed_merge_equals_the_loaded_models() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let base = root.join("tiny-qwen2");
        let adapter = root.join("tiny-qwen2-lora");
        let spec = base.to_str().unwrap();
        let mut model = Model::load(spec, &Device::Cpu).unwrap();
        peft::load(&adapter, &mut model.transformer, spec).unwrap();
        let loaded = Loaded::new(&model);
        let stream = ModelStream::open(&model.source).unwrap();
        let (streamed, cfg) = Streamed::open(stream, Some(&adapter), spec).unwrap();
        assert!(cfg.is_some());
        assert!(!streamed.lora.is_empty());
        assert_eq!(streamed.tensors(), loaded.tensors());
        for (name, _) in loaded.tensors() {
            let (a, b) = (streamed.read(&name).unwrap(), loaded.read(&name).unwrap());
            let d = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= 1e-6, "{name}: {d}");
        }
        // An adapter whose shapes do not fit is refused with the loader's message.
        let dir = tempfile::tempdir().unwrap();
        let (cfg, mut t) = peft::read(
            &adapter,
            crate::model::config::Architecture::Qwen2,
            &Device::Cpu,
        )
        .unwrap();
        let key = t
            .keys()
            .find(|k| k.ends_with("lora_A.weight"))
            .unwrap()
            .clone();
        let a = &t[&key];
        let wider = Tensor::zeros((a.dims()[0], a.dims()[1] + 1), a.dtype(), &Device::Cpu).unwrap();
        t.insert(key, wider);
        candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("adapter_config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let stream = ModelStream::open(&model.source).unwrap();
        let err = Streamed::open(stream, Some(dir.path()), "tiny")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("adapter does not fit the model tiny"), "{err}");
    }
}
