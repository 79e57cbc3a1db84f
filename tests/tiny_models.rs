//! Qwen2 (bf16, sharded, tied, q/k/v biases) and Mistral (f32) checkpoints in Hugging Face layout
//! against transformers, on small random models made by `tests/golden/make_golden.py`.

mod common;

use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::{Message, Model};
use candle_core::Device;
use common::{floats, golden, ids, max_abs_diff, root};

#[test]
fn tiny_models_match_transformers() {
    let g = golden("tiny_models.json");
    for m in g["models"].as_array().unwrap() {
        let dir = root().join(m["path"].as_str().unwrap());
        let model = Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(
            model.config().architecture.name(),
            m["architecture"].as_str().unwrap()
        );
        for rec in m["prompts"].as_array().unwrap() {
            let text = rec["text"].as_str().unwrap();
            let prompt = ids(&rec["ids"]);
            assert_eq!(
                model.tokenizer.encode(text, false).unwrap(),
                prompt,
                "tokenizer ids of {text:?}"
            );
            let logits = common::position_logits(&model, &prompt);
            for (pos, want) in rec["logits"].as_array().unwrap().iter().enumerate() {
                let want = floats(want);
                let d = max_abs_diff(&logits[pos], &want);
                assert!(
                    d <= 1e-3,
                    "{}: position {pos} differs by {d}",
                    dir.display()
                );
            }
            let opts = GenerateOptions {
                max_new_tokens: 16,
                sampling: SamplingParams::default(),
                stop_at_end_token: false,
                scripts: None,
            };
            let out = generate(&model, &prompt, &opts, |_| {}).unwrap();
            assert_eq!(
                out.tokens,
                ids(&rec["greedy_16"]),
                "{}: greedy",
                dir.display()
            );
        }
        let messages = vec![
            Message::new("user", "Hi!"),
            Message::new("assistant", "Hello! How can I help?"),
            Message::new("user", "Tell me a joke about cats."),
        ];
        assert_eq!(
            model.render_chat(&messages, true).unwrap(),
            m["chat"].as_str().unwrap()
        );
    }
}

#[test]
fn mistral_info_states_its_sliding_window() {
    let dir = root().join("tests/fixtures/tiny-mistral");
    let model = Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let info = model.info();
    assert_eq!(info.architecture, "mistral");
    assert!(
        info.notes
            .iter()
            .any(|n| n.contains("sliding attention window of 4096 tokens on 2 of 2 layers")),
        "{:?}",
        info.notes
    );
    assert!(!info.tied_embeddings);
}
