//! The default model against transformers: logits, greedy continuations, tokenizer and chat
//! template, using golden values from `tests/golden/make_golden.py`.

mod common;

use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::Message;
use base64::Engine;
use candle_core::Tensor;
use common::{floats, golden, ids, max_abs_diff, smollm2};

fn f32_from_b64(s: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn logits_match_transformers() {
    let model = smollm2();
    let g = golden("smollm2.json");
    for rec in g["logits"].as_array().unwrap() {
        let prompt = ids(&rec["ids"]);
        let input = Tensor::new(prompt.as_slice(), model.transformer.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .transformer
            .forward(&input, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let last = f32_from_b64(rec["last_logits_f32_b64"].as_str().unwrap());
        let d = max_abs_diff(logits.last().unwrap(), &last);
        assert!(
            d <= 1e-3,
            "last-position logits differ by {d} for {prompt:?}"
        );
        let sample = ids(&rec["sample_vocab_ids"]);
        for (pos, want) in rec["sampled_logits"].as_array().unwrap().iter().enumerate() {
            let want = floats(want);
            let got: Vec<f32> = sample.iter().map(|&i| logits[pos][i as usize]).collect();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-3, "position {pos}: logits differ by {d}");
        }
    }
}

fn greedy_opts() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 32,
        sampling: SamplingParams::default(),
        stop_at_end_token: false,
        scripts: None,
    }
}

/// The default model, held in its file's Q4_1 with every product exact in f32 against the
/// dequantized weights: what transformers computes after dequantizing.
fn exact() -> afinar::model::Model {
    let model = smollm2().clone();
    assert!(!model.transformer.quantized_dot, "exact by default");
    model
}

/// The Q4_1 weights are held packed; with exact products, greedy decoding equals transformers'
/// over the dequantized weights token for token.
#[test]
fn greedy_continuation_matches_transformers() {
    let model = exact();
    let g = golden("smollm2.json");
    for rec in g["logits"].as_array().unwrap() {
        let prompt = ids(&rec["ids"]);
        let out = generate(&model, &prompt, &greedy_opts(), |_| {}).unwrap();
        assert_eq!(
            out.tokens,
            ids(&rec["greedy_32"]),
            "greedy continuation of {prompt:?}"
        );
    }
}

/// Decoding with integer dot products (`--int8-dot`: activations quantized per block, as
/// llama.cpp does) is checked against the exact path: the next-token logits stay within 5 % of
/// their scale, and greedy decoding follows the exact tokens until a near tie of the exact
/// logits (margin under 0.1).
#[test]
fn int8_dot_decoding_tracks_the_exact_path() {
    let mut fast = smollm2().clone();
    fast.transformer.quantized_dot = true;
    let fast = &fast;
    let exact = exact();
    let g = golden("smollm2.json");
    let last_logits = |m: &afinar::model::Model, ids: &[u32]| -> Vec<f32> {
        // Prefill all but the last token, then decode one: the decode step is what differs.
        let dev = m.transformer.device();
        let mut cache = afinar::model::transformer::Cache::new(&m.transformer);
        let head = Tensor::new(&ids[..ids.len() - 1], dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.transformer.forward_last(&head, Some(&mut cache)).unwrap();
        let tail = Tensor::new(&ids[ids.len() - 1..], dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = m.transformer.forward_last(&tail, Some(&mut cache)).unwrap();
        l.squeeze(0).unwrap().to_vec1().unwrap()
    };
    let mut worst = 0f32;
    for rec in g["logits"].as_array().unwrap() {
        let prompt = ids(&rec["ids"]);
        let want = ids(&rec["greedy_32"]);
        let a = last_logits(fast, &prompt);
        let b = last_logits(&exact, &prompt);
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        worst = worst.max(max_abs_diff(&a, &b) / scale);
        let got = generate(fast, &prompt, &greedy_opts(), |_| {})
            .unwrap()
            .tokens;
        if let Some(i) = got.iter().zip(&want).position(|(x, y)| x != y) {
            let mut ctx = prompt.clone();
            ctx.extend_from_slice(&want[..i]);
            let l = last_logits(&exact, &ctx);
            let margin = l[want[i] as usize] - l[got[i] as usize];
            assert!(
                margin < 0.1,
                "{prompt:?}: token {i} is {} with dot products but {} exactly, a margin of {margin}",
                got[i],
                want[i]
            );
        }
    }
    assert!(
        worst < 0.05,
        "decode-step logits differ by up to {worst} of their largest magnitude"
    );
}

#[test]
fn tokenizer_matches_transformers() {
    let model = smollm2();
    let g = golden("smollm2.json");
    for rec in g["tokenizer"].as_array().unwrap() {
        let text = rec["text"].as_str().unwrap();
        let got = model.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, ids(&rec["ids"]), "ids of {text:?}");
        let got = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            got,
            ids(&rec["ids_with_special"]),
            "ids with special tokens of {text:?}"
        );
        assert_eq!(
            model.tokenizer.decode(&ids(&rec["ids"]), false).unwrap(),
            text,
            "decode round-trip"
        );
    }
}

#[test]
fn chat_template_matches_transformers() {
    let model = smollm2();
    let g = golden("smollm2.json");
    for rec in g["chat"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(rec["messages"].clone()).unwrap();
        let add = rec["add_generation_prompt"].as_bool().unwrap();
        let got = model.render_chat(&messages, add).unwrap();
        assert_eq!(got, rec["text"].as_str().unwrap());
    }
}

#[test]
fn generation_stops_at_end_of_turn() {
    let model = smollm2();
    let prompt = model
        .encode_chat(&[Message::new("user", "Say hi.")], true)
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 200,
        ..Default::default()
    };
    let out = generate(model, &prompt, &opts, |_| {}).unwrap();
    assert_eq!(
        out.finish_reason,
        afinar::infer::FinishReason::Stop,
        "{out:?}"
    );
    assert!(!out.text.contains("<|im_end|>"));
    assert!(out.generated_tokens < 200);
}

#[test]
fn streamed_text_equals_final_text() {
    let model = smollm2();
    let prompt = model
        .encode_chat(
            &[Message::new(
                "user",
                "Escribe una frase con acentos y un emoji.",
            )],
            true,
        )
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 48,
        sampling: SamplingParams {
            temperature: 0.8,
            seed: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = generate(model, &prompt, &opts, |p| streamed.push_str(p)).unwrap();
    assert_eq!(streamed, out.text);
    let again = generate(model, &prompt, &opts, |_| {}).unwrap();
    assert_eq!(again.tokens, out.tokens, "same seed, same tokens");
}
