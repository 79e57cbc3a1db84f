//! Base weights held as they come: bf16/f16 safetensors and GGUF block formats are read by the
//! kernels without an f32 copy, and must give what their f32 conversion gives. Tiny fixtures
//! only (no download); the default model's Q4_1 against transformers and PEFT is in
//! smollm2_parity.rs and train.rs.

mod common;

use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::{BaseDtype, Model, Weight};
use afinar::train::lora::{attach, kaiming_a, LoraSpec};
use candle_core::{DType, Device, Tensor};
use common::{example, packed_batch, rel_diff, root};

const MODELS: [&str; 2] = ["tests/fixtures/tiny-qwen2", "tests/fixtures/tiny-mistral"];

fn load(path: &str, base: BaseDtype) -> Model {
    Model::load_with(root().join(path).to_str().unwrap(), &Device::Cpu, base).unwrap()
}

/// The same model with every packed matrix replaced by its dequantized f32 copy: the
/// reference the packed kernels must match.
fn dequantized(m: &Model) -> Model {
    let mut d = m.clone();
    let t = &mut d.transformer;
    let dense = |w: &mut Weight| *w = Weight::Dense(w.to_f32().unwrap());
    dense(&mut t.embed_tokens);
    if let Some(h) = t.lm_head.as_mut() {
        dense(h);
    }
    for (_, lin) in t.linears_mut() {
        dense(&mut lin.weight);
    }
    d
}

/// A copy of a fixture with its weights stored as `dtype` (bf16 or f16) safetensors.
fn sixteen_bit_copy(path: &str, dtype: DType, dir: &std::path::Path) {
    let src = root().join(path);
    // One unsharded file whatever the fixture has.
    let mut tensors = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        if name.ends_with(".safetensors") {
            for (n, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                tensors.insert(n, t.to_dtype(dtype).unwrap());
            }
        } else if name.ends_with(".json") && !name.ends_with(".index.json") {
            std::fs::copy(&p, dir.join(name)).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.transformer.forward(&input, None).unwrap()
}

#[test]
fn sixteen_bit_safetensors_stay_sixteen_bit_and_match_their_f32_conversion() {
    for path in MODELS {
        for dtype in [DType::BF16, DType::F16] {
            let dir = tempfile::tempdir().unwrap();
            sixteen_bit_copy(path, dtype, dir.path());
            let spec = dir.path().to_str().unwrap();
            let held = Model::load(spec, &Device::Cpu).unwrap();
            let name = format!("{dtype:?}").to_uppercase();
            assert_eq!(
                held.transformer.held_formats().get(&name),
                Some(&(7 * 2 + 1 + usize::from(!held.config().tie_word_embeddings))),
                "{path}: every matrix held as {name}: {:?}",
                held.transformer.held_formats()
            );
            let f32m = Model::load_with(spec, &Device::Cpu, BaseDtype::F32).unwrap();
            assert!(held.transformer.weight_bytes() < f32m.transformer.weight_bytes() * 6 / 10);
            let vocab = held.config().vocab_size;
            let ids = example(4, 23, vocab);
            let d = rel_diff(&logits(&held, &ids), &logits(&f32m, &ids));
            assert!(d <= 1e-3, "{path} {name}: logits differ by {d}");
            // Greedy decoding (the exact block path) gives the f32 model's tokens.
            let opts = GenerateOptions {
                max_new_tokens: 12,
                sampling: SamplingParams::default(),
                stop_at_end_token: false,
                scripts: None,
            };
            let a = generate(&held, &ids, &opts, |_| {}).unwrap().tokens;
            let b = generate(&f32m, &ids, &opts, |_| {}).unwrap().tokens;
            assert_eq!(a, b, "{path} {name}: greedy tokens");
        }
    }
}

/// LoRA over a Q8_0 and a Q4_0 base (`base_dtype` conversions): loss and every LoRA gradient
/// equal those over the same weights dequantized to f32 (the path proven against PEFT).
#[test]
fn lora_gradients_over_a_quantized_base_equal_the_dequantized_ones() {
    for path in MODELS {
        for base in [BaseDtype::Q8_0, BaseDtype::Q4_0] {
            let packed = load(path, base);
            let formats = packed.transformer.held_formats();
            assert!(formats.keys().all(|f| f != "F32"), "{path}: {formats:?}");
            let mut models = [packed.clone(), dequantized(&packed)];
            let vocab = packed.config().vocab_size;
            let batch = packed_batch(&[
                vec![example(1, 9, vocab), example(2, 14, vocab)],
                vec![example(3, 17, vocab)],
            ]);
            let spec = LoraSpec {
                rank: 4,
                alpha: 8.0,
                rslora: false,
                targets: afinar::train::lora::ALL_LINEAR.map(String::from).to_vec(),
                dropout: 0.0,
            };
            let mut results = Vec::new();
            for m in models.iter_mut() {
                let vars = attach(&mut m.transformer, &spec, kaiming_a(3)).unwrap();
                // B = 0 would make every A gradient zero: give B fixed values.
                for (i, (_, v)) in vars.iter().enumerate() {
                    if i % 2 == 1 {
                        let n = v.elem_count();
                        let vals: Vec<f32> =
                            (0..n).map(|k| 0.05 * ((k * 7 + i) as f32).sin()).collect();
                        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                    }
                }
                let loss = afinar::train::batch_nll(&m.transformer, &batch, true).unwrap();
                let grads = loss.backward().unwrap();
                let g: Vec<Tensor> = vars
                    .iter()
                    .map(|(_, v)| grads.get(v).unwrap().clone())
                    .collect();
                results.push((loss.to_scalar::<f32>().unwrap(), g, vars));
            }
            let (lp, gp, vars) = &results[0];
            let (ld, gd, _) = &results[1];
            assert!(
                (lp - ld).abs() / ld.abs() <= 1e-5,
                "{path} {base}: loss {lp} vs {ld}"
            );
            for ((name, _), (a, b)) in vars.iter().zip(gp.iter().zip(gd)) {
                let d = rel_diff(a, b);
                assert!(d <= 1e-4, "{path} {base}: {name} gradients differ by {d}");
            }
        }
    }
}

#[test]
fn full_fine_tuning_refuses_a_packed_base_and_says_what_to_do() {
    let cfg = afinar::train::TrainConfig {
        method: afinar::train::Method::Full,
        base_dtype: BaseDtype::Q4_0,
        ..Default::default()
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("full fine-tuning") && err.contains("base_dtype = \"auto\" or \"f32\""),
        "{err}"
    );
    let ok = afinar::train::TrainConfig {
        method: afinar::train::Method::Full,
        ..Default::default()
    };
    assert_eq!(ok.held_base().unwrap(), BaseDtype::F32);
}

#[test]
fn base_dtype_names_parse_and_bad_ones_list_the_choices() {
    for s in ["auto", "f32", "bf16", "q8_0", "Q4_0"] {
        let b: BaseDtype = s.parse().unwrap();
        assert_eq!(b.to_string(), s.to_ascii_lowercase());
    }
    let err = "q5_k".parse::<BaseDtype>().unwrap_err().to_string();
    assert!(err.contains("q4_0") && err.contains("auto"), "{err}");
}

/// Activation checkpointing (what makes a 7B step fit): the loss and every LoRA gradient equal
/// the plain backward's, with dropout on, over a packed base.
#[test]
fn checkpointed_gradients_equal_the_plain_ones() {
    for path in MODELS {
        let mut model = load(path, BaseDtype::Q8_0);
        let vocab = model.config().vocab_size;
        let spec = LoraSpec {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: afinar::train::lora::ALL_LINEAR.map(String::from).to_vec(),
            dropout: 0.1,
        };
        let vars = attach(&mut model.transformer, &spec, kaiming_a(5)).unwrap();
        for (i, (_, v)) in vars.iter().enumerate() {
            if i % 2 == 1 {
                let n = v.elem_count();
                let vals: Vec<f32> = (0..n).map(|k| 0.05 * ((k * 3 + i) as f32).cos()).collect();
                v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        model
            .transformer
            .lora_dropout_key
            .store(11, std::sync::atomic::Ordering::Relaxed);
        let batch = packed_batch(&[
            vec![example(6, 12, vocab), example(7, 9, vocab)],
            vec![example(8, 19, vocab)],
        ]);
        let t = &model.transformer;
        let plain = (afinar::train::batch_nll(t, &batch, true).unwrap() / 7.0).unwrap();
        let store = plain.backward().unwrap();
        let refs: Vec<&candle_core::Var> = vars.iter().map(|(_, v)| v).collect();
        let (loss, grads) = afinar::train::checkpointed_gradients(t, &batch, 7, &refs).unwrap();
        let want = plain.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - want).abs() <= 1e-6 * want.abs(),
            "{path}: loss {loss} vs {want}"
        );
        for ((name, v), g) in vars.iter().zip(&grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{path}: no gradient for {name}"));
            let d = rel_diff(g, store.get(v.as_tensor()).unwrap());
            assert!(d <= 1e-5, "{path}: {name} differs by {d}");
        }
    }
}
