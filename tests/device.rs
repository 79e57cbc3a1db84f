//! The device seam: off the CPU every fused op falls back to its reference composition of
//! candle ops. No GPU here, so `Transformer::fused = false` forces that path on the CPU, and a
//! whole LoRA training step (forward, loss, backward) and greedy generation must agree with the
//! fused kernels. Runs on the tiny fixture models (no download).

mod common;

use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::Model;
use afinar::train::lora::{attach, kaiming_a, LoraSpec};
use candle_core::{Device, Tensor};
use common::{example, packed_batch, rel_diff, root};

const MODELS: [&str; 2] = ["tests/fixtures/tiny-qwen2", "tests/fixtures/tiny-mistral"];

fn load(path: &str) -> Model {
    Model::load(root().join(path).to_str().unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn reference_path_gives_the_fused_loss_and_lora_gradients() {
    for path in MODELS {
        let mut model = load(path);
        let vocab = model.config().vocab_size;
        let spec = LoraSpec {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: afinar::train::lora::ALL_LINEAR.map(String::from).to_vec(),
            dropout: 0.1,
        };
        let vars = attach(&mut model.transformer, &spec, kaiming_a(3)).unwrap();
        // B starts at zero, which would make every A gradient zero: give it values.
        for (i, (_, v)) in vars.iter().enumerate() {
            if i % 2 == 1 {
                let r = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap();
                v.set(&r).unwrap();
            }
        }
        // Dropout on, with the same key (so the same masks) for both passes.
        model
            .transformer
            .lora_dropout_key
            .store(7, std::sync::atomic::Ordering::Relaxed);
        let batch = packed_batch(&[
            vec![example(1, 9, vocab), example(2, 14, vocab)],
            vec![example(3, 17, vocab)],
        ]);

        let step = |fused: bool, model: &mut Model| {
            model.transformer.fused = fused;
            let loss = afinar::train::batch_nll(&model.transformer, &batch, true).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = vars
                .iter()
                .map(|(name, v)| {
                    grads
                        .get(v)
                        .unwrap_or_else(|| panic!("{path}: no gradient for {name}"))
                        .clone()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let (loss_f, grads_f) = step(true, &mut model);
        let (loss_r, grads_r) = step(false, &mut model);
        assert!(loss_f.is_finite() && loss_f > 0.0, "{path}: loss {loss_f}");
        let dl = (loss_f - loss_r).abs() / loss_r.abs();
        assert!(
            dl <= 1e-4,
            "{path}: fused loss {loss_f} vs reference {loss_r}"
        );
        for ((name, _), (gf, gr)) in vars.iter().zip(grads_f.iter().zip(&grads_r)) {
            let m = gr
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m > 0.0, "{path}: {name} has a zero gradient");
            let d = rel_diff(gf, gr);
            assert!(
                d <= 1e-4,
                "{path}: {name} gradients differ by {d} (relative)"
            );
        }
    }
}

#[test]
fn reference_path_generates_the_same_tokens() {
    for path in MODELS {
        let mut model = load(path);
        let vocab = model.config().vocab_size;
        let prompt = example(5, 11, vocab);
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: SamplingParams::default(),
            stop_at_end_token: false,
            scripts: None,
        };
        let fused = generate(&model, &prompt, &opts, |_| {}).unwrap().tokens;
        model.transformer.fused = false;
        let reference = generate(&model, &prompt, &opts, |_| {}).unwrap().tokens;
        assert_eq!(fused.len(), 12, "{path}");
        assert_eq!(fused, reference, "{path}: greedy tokens differ");
    }
}
