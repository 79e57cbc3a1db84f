//! The families beyond Llama/Qwen2/Mistral (Qwen3, Gemma 3, SmolLM3, Llama 3 with its RoPE
//! scaling, Mistral with its sliding window) against transformers and PEFT, on small random
//! checkpoints made by `tests/golden/make_families.py`: logits and greedy tokens (through the
//! one-sequence path and the serving path), PEFT adapters, LoRA gradients, the real chat
//! templates, and GGUF exports run by llama.cpp.

mod common;

use std::path::Path;

use afinar::export::gguf::{self, GgufDtype};
use afinar::export::peft;
use afinar::infer::{generate, GenerateOptions, SamplingParams};
use afinar::model::config::Architecture;
use afinar::model::decode::{forward_rows, Row};
use afinar::model::layout;
use afinar::model::transformer::Cache;
use afinar::model::{Message, Model};
use afinar::train::lora::{self, LoraSpec, ALL_LINEAR, FUSED_LINEAR};
use afinar::train::optim::{AdamW, AdamWConfig};
use afinar::train::step_gradients;
use candle_core::Device;
use common::{floats, golden, ids, max_abs_diff, root};
use serde_json::{json, Value};

fn families() -> Vec<Value> {
    golden("families.json")["families"]
        .as_array()
        .unwrap()
        .clone()
}

fn load(f: &Value) -> Model {
    let dir = root().join(f["path"].as_str().unwrap());
    Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap()
}

/// The fixture `tests/fixtures/tiny-NAME`.
fn fixture(name: &str) -> Model {
    load(&json!({ "path": format!("tests/fixtures/tiny-{name}") }))
}

/// The ids that carry loss in an encoded example.
fn labelled_ids(e: &afinar::data::Encoded) -> Vec<u32> {
    e.ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l)
        .map(|(&i, _)| i)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

/// One step of the serving engine's batched path (`forward_rows`) for one sequence: `tokens`
/// after what `cache` holds; the last token's logits.
fn engine_step(model: &Model, tokens: &[u32], cache: &mut Cache) -> Vec<f32> {
    let t = &model.transformer;
    let mut rows = [Row {
        model: t,
        tokens,
        cache,
        logits: true,
    }];
    forward_rows(t, &mut rows).unwrap().remove(0).unwrap()
}

/// The engine's logits after `prompt` fed in chunks of 5, as the server feeds a long prompt.
fn engine_prefill(model: &Model, prompt: &[u32], cache: &mut Cache) -> Vec<f32> {
    let mut logits = Vec::new();
    for chunk in prompt.chunks(5) {
        logits = engine_step(model, chunk, cache);
    }
    logits
}

/// Greedy decoding through the serving engine's batched path, the prompt fed in chunks of 5.
fn greedy_rows(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = Cache::new(&model.transformer);
    let mut logits = engine_prefill(model, prompt, &mut cache);
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        logits = engine_step(model, &[next], &mut cache);
    }
    out
}

#[test]
fn families_match_transformers() {
    for f in families() {
        let name = f["family"].as_str().unwrap();
        let model = load(&f);
        let want_arch =
            Architecture::parse(f["architecture"].as_str().unwrap(), Path::new("x")).unwrap();
        assert_eq!(model.config().architecture, want_arch, "{name}");
        // Every end id of the config (Llama 3 and Gemma 3 list several) ends a generation.
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(f["path"].as_str().unwrap()).join("config.json"))
                .unwrap(),
        )
        .unwrap();
        let ends = match &config["eos_token_id"] {
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            v => vec![v.as_u64().unwrap() as u32],
        };
        for id in ends {
            assert!(
                model.tokenizer.end_token_ids.contains(&id),
                "{name}: end id {id} not in {:?}",
                model.tokenizer.end_token_ids
            );
        }
        for rec in f["prompts"].as_array().unwrap() {
            let text = rec["text"].as_str().unwrap();
            let prompt = ids(&rec["ids"]);
            assert_eq!(
                model.tokenizer.encode(text, false).unwrap(),
                prompt,
                "{name}: tokenizer ids of {text:?}"
            );
            let logits = common::position_logits(&model, &prompt);
            for (pos, want) in rec["logits"].as_array().unwrap().iter().enumerate() {
                let d = max_abs_diff(&logits[pos], &floats(want));
                assert!(d <= 1e-3, "{name}: position {pos} differs by {d}");
            }
            let want = ids(&rec["greedy_16"]);
            let opts = GenerateOptions {
                max_new_tokens: 16,
                sampling: SamplingParams::default(),
                stop_at_end_token: false,
                scripts: None,
            };
            let out = generate(&model, &prompt, &opts, |_| {}).unwrap();
            assert_eq!(out.tokens, want, "{name}: greedy");
            assert_eq!(
                greedy_rows(&model, &prompt, 16),
                want,
                "{name}: serving path"
            );
        }
    }
}

/// PEFT's saved adapter (random A and B) gives PEFT's logits here.
#[test]
fn peft_adapters_give_pefts_logits() {
    for f in families() {
        let name = f["family"].as_str().unwrap();
        let mut model = load(&f);
        let dir = root().join(f["adapter"]["path"].as_str().unwrap());
        peft::load(&dir, &mut model.transformer, name).unwrap();
        let prompt = ids(&f["prompts"][0]["ids"]);
        let logits = common::position_logits(&model, &prompt);
        for (pos, want) in f["adapter"]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let d = max_abs_diff(&logits[pos], &floats(want));
            assert!(d <= 1e-3, "{name}: adapter logits at {pos} differ by {d}");
        }
    }
}

/// Loss and dL/dB of every adapter matrix against PEFT's on the same batch and A; then one
/// step, the adapter saved and loaded back on a fresh model gives the trained model's logits.
#[test]
fn lora_gradients_match_peft_and_adapters_round_trip() {
    for f in families() {
        let name = f["family"].as_str().unwrap();
        let g = &f["lora_grads"];
        let mut model = load(&f);
        // Every name LoRA may target, in make_families.py's order (A's formula indexes it).
        let modules: Vec<&str> = ALL_LINEAR.iter().chain(&FUSED_LINEAR).copied().collect();
        let spec = LoraSpec {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            dropout: 0.0,
            targets: modules.iter().map(|s| s.to_string()).collect(),
        };
        let arch = model.config().architecture;
        let vars = lora::attach(&mut model.transformer, &spec, |name, r, n_in| {
            let layer: f64 = name.split('.').nth(2).unwrap().parse().unwrap();
            let module = layout::checkpoint_module(arch, name.rsplit('.').next().unwrap());
            let mi = modules.iter().position(|m| *m == module).unwrap() as f64;
            (0..r * n_in)
                .map(|k| (0.02 * (0.37 * k as f64 + 1.3 * layer + 0.7 * mi).sin()) as f32)
                .collect()
        })
        .unwrap();
        let seqs: Vec<Vec<u32>> = g["ids"].as_array().unwrap().iter().map(ids).collect();
        let tmp = tempfile::tempdir().unwrap();
        let file = common::token_file(tmp.path(), &seqs, None);
        let opt = AdamW::new(
            vars.iter()
                .map(|(n, v)| (n.clone(), v.clone(), true))
                .collect(),
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )
        .unwrap();
        let (grads, loss, _) =
            step_gradients(&model.transformer, &opt, &file, &[vec![0, 1]], 0, false).unwrap();
        let want_loss = g["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() / want_loss < 1e-4,
            "{name}: loss {loss} vs PEFT {want_loss}"
        );
        let grads = grads.unwrap();
        let mut checked = 0;
        for (p, grad) in opt.params.iter().zip(&grads) {
            let Some(want) = g["grad_norms"].get(layout::checkpoint_name(arch, &p.name)) else {
                continue;
            };
            let want = want.as_f64().unwrap();
            let got = common::l2_norm(grad);
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1e-6) + 1e-7,
                "{name}: {}: |dL/dB| = {got}, PEFT {want}",
                p.name
            );
            checked += 1;
        }
        assert_eq!(
            checked,
            g["grad_norms"].as_object().unwrap().len(),
            "{name}"
        );
        // One plain gradient step on every B, then save and reload.
        for (p, grad) in opt.params.iter().zip(&grads) {
            let v = &p.var;
            v.set(&(v.as_tensor() - (grad * 10.0).unwrap()).unwrap())
                .unwrap();
        }
        let prompt = ids(&f["prompts"][1]["ids"]);
        let trained = common::position_logits(&model, &prompt);
        let cfg = peft::AdapterConfig::lora(4, 8.0, spec.targets.clone());
        let out = tmp.path().join("adapter");
        peft::save(&out, arch, &cfg, &vars).unwrap();
        let mut fresh = load(&f);
        assert_ne!(
            common::position_logits(&fresh, &prompt),
            trained,
            "{name}: the step changed nothing"
        );
        peft::load(&out, &mut fresh.transformer, name).unwrap();
        assert_eq!(
            common::position_logits(&fresh, &prompt),
            trained,
            "{name}: reloaded adapter"
        );
    }
}

/// The families' real chat templates render here byte for byte as `apply_chat_template` does.
#[test]
fn real_chat_templates_render_like_transformers() {
    let mut rendered = 0;
    for f in families() {
        let name = f["family"].as_str().unwrap();
        let model = load(&f);
        for c in f["chat"].as_array().unwrap() {
            let messages: Vec<Message> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let gen = c["add_generation_prompt"].as_bool().unwrap();
            let got = model.render_chat(&messages, gen).unwrap();
            assert_eq!(
                got,
                c["text"].as_str().unwrap(),
                "{name}, generation prompt {gen}"
            );
            rendered += 1;
        }
    }
    assert!(rendered >= 12, "only {rendered} renderings checked");
}

/// Each family's f32 GGUF export loads back here with the same logits, and llama.cpp's own code
/// (node-llama-cpp's prebuilt CPU build) picks transformers' greedy tokens from it.
#[test]
fn gguf_exports_load_back_and_run_in_llama_cpp() {
    let have_node = common::llama_cpp_ready();
    let tmp = tempfile::tempdir().unwrap();
    for f in families() {
        let name = f["family"].as_str().unwrap();
        if name == "mistral-swa" {
            // llama.cpp runs Mistral as `llama`, which has no sliding window: the export warns.
            continue;
        }
        let model = load(&f);
        let path = tmp.path().join(format!("{name}.gguf"));
        gguf::write_model(&model, GgufDtype::F32, &path).unwrap();
        let back = Model::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
        let (a, b) = (model.config(), back.config());
        assert_eq!(
            (
                &a.sliding_layers,
                a.sliding_window,
                a.rope_local_theta,
                &a.no_rope_layers
            ),
            (
                &b.sliding_layers,
                b.sliding_window,
                b.rope_local_theta,
                &b.no_rope_layers
            ),
            "{name}: per-layer attention through GGUF"
        );
        let prompts: Vec<Vec<u32>> = f["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| ids(&r["ids"]))
            .collect();
        for p in &prompts {
            let (a, b) = (
                common::position_logits(&model, p),
                common::position_logits(&back, p),
            );
            let d = max_abs_diff(a.last().unwrap(), b.last().unwrap());
            assert!(d <= 1e-5, "{name}: GGUF round trip differs by {d}");
        }
        if !have_node {
            continue;
        }
        let job = tmp.path().join(format!("{name}.json"));
        std::fs::write(
            &job,
            json!({"model": path, "max_tokens": 16, "prompts": prompts}).to_string(),
        )
        .unwrap();
        let v = common::llama_cpp_json("greedy_ids.mjs", &[&job]);
        for (rec, got) in f["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(v["results"].as_array().unwrap())
        {
            assert_eq!(
                ids(got),
                ids(&rec["greedy_16"]),
                "{name}: llama.cpp greedy tokens"
            );
        }
    }
}

/// LongRoPE past the original context, as transformers does it (tests/golden/make_longrope.py):
/// a forward call whose largest position reaches `original_max_position_embeddings` rotates with
/// the long factors, so an 80-token prompt (original context 64) takes them throughout, while a
/// cached generation that crosses 64 keeps its short-rotated keys and rotates each later token
/// with the long ones. Both the one-sequence path and the serving engine follow it step by step.
#[test]
fn phi3_longrope_takes_the_long_factors_past_the_original_context() {
    let g = golden("longrope.json");
    let model = fixture("phi3");
    let long = &g["long"];
    let all = common::position_logits(&model, &ids(&long["ids"]));
    for (p, want) in long["positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(long["logits"].as_array().unwrap())
    {
        let p = p.as_u64().unwrap() as usize;
        let d = max_abs_diff(&all[p], &floats(want));
        assert!(d <= 1e-3, "80-token prompt, position {p}: differs by {d}");
    }

    let cached = &g["cached"];
    let prompt = ids(&cached["prompt"]);
    let steps = cached["step_logits"].as_array().unwrap();
    let t = &model.transformer;
    let check = |path: &str, k: usize, got: &[f32], want: &Value| {
        let d = max_abs_diff(got, &floats(want));
        assert!(
            d <= 1e-3,
            "{path}: step {k} (position {}) differs by {d}",
            prompt.len() + k
        );
    };
    // The one-sequence path: the prompt in one call, then a token per call.
    let mut cache = Cache::new(t);
    let last = |ids: &[u32], cache: &mut Cache| -> Vec<f32> {
        let x = candle_core::Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        t.forward_last(&x, Some(cache))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let got = last(&prompt, &mut cache);
    check("one sequence", 0, &got, &g["short"]["last_logits"]);
    for (k, next) in ids(&cached["greedy_16"]).into_iter().enumerate() {
        check("one sequence", k + 1, &last(&[next], &mut cache), &steps[k]);
    }
    // The serving engine: the prompt in chunks of 5, then a token per step.
    let mut cache = Cache::new(t);
    let got = engine_prefill(&model, &prompt, &mut cache);
    check("engine", 0, &got, &g["short"]["last_logits"]);
    for (k, next) in ids(&cached["greedy_16"]).into_iter().enumerate() {
        check(
            "engine",
            k + 1,
            &engine_step(&model, &[next], &mut cache),
            &steps[k],
        );
    }
}

/// Family keys and tensors in a GGUF are untrusted input too: Gemma 3's per-layer window
/// pattern of the wrong length, a Phi-3 file with the short LongRoPE factors but not the long
/// ones, or with too few factors, each end in a one-line error naming the file and what is wrong.
#[test]
fn hostile_family_ggufs_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let export = |family: &str| {
        let model = fixture(family);
        let path = tmp.path().join(format!("{family}.gguf"));
        gguf::write_model(&model, GgufDtype::F32, &path).unwrap();
        (std::fs::read(&path).unwrap(), model.config().num_layers)
    };
    let err = |name: &str, bytes: &[u8]| -> String {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let msg = match afinar::model::gguf::inspect(&path) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(!msg.contains('\n') && msg.contains(name), "{msg}");
        msg
    };
    let find = |b: &[u8], s: &str| b.windows(s.len()).position(|w| w == s.as_bytes()).unwrap();

    // Gemma 3: a pattern of one flag for six layers. The key-value pair is 64 bytes, so the
    // tensor data stays aligned after it.
    let (orig, layers) = export("gemma3");
    let key = "gemma3.attention.sliding_window_pattern";
    let mut kv = (key.len() as u64).to_le_bytes().to_vec();
    kv.extend_from_slice(key.as_bytes());
    kv.extend_from_slice(&9u32.to_le_bytes()); // array
    kv.extend_from_slice(&7u32.to_le_bytes()); // of bool
    kv.extend_from_slice(&1u64.to_le_bytes());
    kv.push(1);
    assert_eq!(kv.len() % 32, 0);
    let mut b = orig[..24].to_vec();
    let n_kv = u64::from_le_bytes(orig[16..24].try_into().unwrap());
    b[16..24].copy_from_slice(&(n_kv + 1).to_le_bytes());
    b.extend_from_slice(&kv);
    b.extend_from_slice(&orig[24..]);
    let msg = err("pattern.gguf", &b);
    assert!(
        msg.contains(key) && msg.contains(&format!("1 flags for {layers} layers")),
        "{msg}"
    );

    // Phi-3: the long factors renamed away (same length, so nothing else moves).
    let (orig, _) = export("phi3");
    let mut b = orig.clone();
    let at = find(&b, "rope_factors_long.weight");
    b[at..at + 24].copy_from_slice(b"rope_factors_lonx.weight");
    let msg = err("nolong.gguf", &b);
    assert!(msg.contains("no 'rope_factors_long.weight'"), "{msg}");

    // Phi-3: one short factor fewer than the rotary dimensions need (the tensor's only dim).
    let mut b = orig;
    let dim_at = find(&b, "rope_factors_short.weight") + 25 + 4;
    let dim = u64::from_le_bytes(b[dim_at..dim_at + 8].try_into().unwrap());
    b[dim_at..dim_at + 8].copy_from_slice(&(dim - 1).to_le_bytes());
    let msg = err("short.gguf", &b);
    assert!(
        msg.contains(&format!(
            "longrope factors have {} and {dim} entries",
            dim - 1
        )),
        "{msg}"
    );
}

/// DeepSeek-R1-Distill's template drops everything up to `</think>` from assistant turns and
/// opens the generation prompt with `<think>\n`, which its rendering of a past turn lacks: the
/// loss still falls on exactly the answer and its end token, with or without reasoning in the
/// data, in the first turn and in a later one.
#[test]
fn deepseek_r1_template_labels_the_answer_only() {
    use afinar::data::shapes::{Example, Turn};
    use afinar::data::{Encoder, Outcome, Overlong};
    use afinar::model::ChatTemplate;
    let model = fixture("qwen2");
    let source = std::fs::read_to_string(
        root().join("tests/fixtures/templates/deepseek-r1-distill-qwen.jinja"),
    )
    .unwrap();
    let template = ChatTemplate::new(
        &source,
        Some("<｜begin▁of▁sentence｜>"),
        Some("<｜end▁of▁sentence｜>"),
    )
    .unwrap();
    assert!(template.drops_reasoning());
    let enc = Encoder::new(&model.tokenizer, Some(&template), 512, Overlong::Drop);
    let turn = |role: &str, content: &str, train: bool| Turn {
        role: role.into(),
        content: content.into(),
        train,
    };
    for (reasoning, answer) in [
        ("<think>\nEl pingüino comió.\n</think>\n\n", "Hello, world!"),
        ("", "Tuve."),
    ] {
        let ex = Example::Chat(vec![
            turn("user", "¿qué tal?", false),
            turn("assistant", &format!("{reasoning}{answer}"), true),
            turn("user", "¿Y nosotros?", false),
            turn("assistant", &format!("{reasoning}{answer} Tuvimos."), true),
        ]);
        let parts = match enc.encode(&ex) {
            Outcome::Ok { parts, .. } => parts,
            Outcome::Rejected(r) => panic!("rejected: {r:?}"),
            _ => panic!("not encoded"),
        };
        let labelled = labelled_ids(&parts[0]);
        let text = model.tokenizer.decode(&labelled, false).unwrap();
        // What the template keeps: the text after `</think>` ("\n\n" included), or all.
        let kept = reasoning.rsplit("</think>").next().unwrap();
        assert_eq!(
            text,
            format!(
                "{kept}{answer}<｜end▁of▁sentence｜>{kept}{answer} Tuvimos.<｜end▁of▁sentence｜>"
            ),
            "reasoning {reasoning:?}"
        );
    }
}

/// The SentencePiece path (`tokenizer.ggml.model = llama`: pieces marked with `▁`, merges
/// recovered from scores, byte fallback): afinar's ids for a varied corpus equal transformers'
/// GGUF converter's (tests/golden/make_spm.py) and llama.cpp's own tokenizer's on the same file.
#[test]
fn sentencepiece_gguf_tokenizes_like_transformers_and_llama_cpp() {
    let g = golden("spm.json");
    let path = root().join(g["file"].as_str().unwrap());
    let (tok, _) = afinar::model::gguf::load_text_side(&path).unwrap();
    let cases = g["tokenizer"].as_array().unwrap();
    let mine: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| tok.encode(c["text"].as_str().unwrap(), true).unwrap())
        .collect();
    for (c, got) in cases.iter().zip(&mine) {
        let text = c["text"].as_str().unwrap();
        // transformers' Metaspace adds no "▁" before text that starts with a space, where
        // SentencePiece's dummy prefix (and llama.cpp, checked below) always adds one.
        if !text.starts_with(' ') {
            assert_eq!(got, &ids(&c["ids"]), "transformers, {text:?}");
        }
    }
    assert!(
        mine.iter().flatten().any(|&id| (3..259).contains(&id)),
        "no byte-fallback token: the corpus should exercise it"
    );
    if !common::llama_cpp_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("texts.json");
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    std::fs::write(&job, serde_json::to_string(&texts).unwrap()).unwrap();
    let v = common::llama_cpp_json("tokenize.mjs", &[&path, &job]);
    for ((text, got), theirs) in texts.iter().zip(&mine).zip(v["ids"].as_array().unwrap()) {
        assert_eq!(got, &ids(theirs), "llama.cpp, {text:?}");
    }
}

/// GPT-2's byte-to-character table, which byte-level BPE vocabularies (and GGUF's `gpt2` kind)
/// spell their tokens with.
fn byte_chars() -> Vec<char> {
    let kept = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if kept(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A tiktoken file (base64 bytes and rank per line) as the token strings and merges of a
/// byte-level BPE, the way transformers' `TikTokenConverter` (and so Llama 3's `tokenizer.json`
/// and the GGUFs made from it) lays it out: for each token in rank order, every split of it into
/// two tokens, ordered by the halves' ranks.
fn tiktoken_as_bpe(file: &[u8]) -> (Vec<String>, Vec<String>) {
    use base64::Engine;
    let text = std::str::from_utf8(file).unwrap();
    let mut by_rank: Vec<Vec<u8>> = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (b64, rank) = line.split_once(' ').unwrap();
        let rank: usize = rank.parse().unwrap();
        assert_eq!(rank, by_rank.len(), "ranks in order");
        by_rank.push(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        );
    }
    let rank: std::collections::HashMap<&[u8], usize> = by_rank
        .iter()
        .enumerate()
        .map(|(r, t)| (t.as_slice(), r))
        .collect();
    let chars = byte_chars();
    let spell = |b: &[u8]| b.iter().map(|&x| chars[x as usize]).collect::<String>();
    let mut merges = Vec::new();
    for t in by_rank.iter().filter(|t| t.len() > 1) {
        let mut local: Vec<(usize, usize, usize)> = (1..t.len())
            .filter_map(|k| Some((*rank.get(&t[..k])?, *rank.get(&t[k..])?, k)))
            .collect();
        local.sort();
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, k)| format!("{} {}", spell(&t[..k]), spell(&t[k..]))),
        );
    }
    (by_rank.iter().map(|t| spell(t)).collect(), merges)
}

/// Llama 3's real tokenizer, fetched from Meta's `llama-models` wheel on PyPI (Hugging Face is
/// unreachable): laid out as a GGUF vocabulary the way llama.cpp's converter writes one
/// (`gpt2` kind, `llama-bpe` pre-tokenizer, merges, 256 control tokens, BOS added), afinar's
/// GGUF tokenizer gives the ids of Meta's own tiktoken encoder (tests/golden/
/// make_llama3_tokenizer.py) on a varied corpus, and so does llama.cpp's tokenizer on the same file.
#[test]
fn llama3_real_tokenizer_matches_meta_and_llama_cpp() {
    use afinar::export::gguf_file::{self, MetaValue};
    let g = golden("llama3_tokenizer.json");
    let file = common::pypi_member(
        "llama-models==0.3.0",
        g["member"].as_str().unwrap(),
        g["sha256"].as_str().unwrap(),
    );
    let (mut tokens, merges) = tiktoken_as_bpe(&file);
    assert_eq!(tokens.len() as u64, g["base_tokens"].as_u64().unwrap());
    let mut types = vec![1i32; tokens.len()];
    for t in g["special_tokens"].as_array().unwrap() {
        tokens.push(t.as_str().unwrap().to_string());
        types.push(3);
    }
    let bos = g["bos"].as_u64().unwrap() as u32;
    let eot = g["eot"].as_u64().unwrap() as u32;
    let kv = |k: &str, v: MetaValue| (k.to_string(), v);
    let meta = vec![
        kv("general.architecture", MetaValue::Str("llama".into())),
        kv("llama.block_count", MetaValue::U32(1)),
        kv("llama.context_length", MetaValue::U32(131072)),
        kv("llama.embedding_length", MetaValue::U32(64)),
        kv("llama.feed_forward_length", MetaValue::U32(128)),
        kv("llama.attention.head_count", MetaValue::U32(2)),
        kv("llama.attention.head_count_kv", MetaValue::U32(2)),
        kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        ),
        kv("llama.rope.freq_base", MetaValue::F32(500_000.0)),
        kv("llama.vocab_size", MetaValue::U32(tokens.len() as u32)),
        kv("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        kv("tokenizer.ggml.pre", MetaValue::Str("llama-bpe".into())),
        kv("tokenizer.ggml.tokens", MetaValue::StrArray(tokens)),
        kv("tokenizer.ggml.token_type", MetaValue::I32Array(types)),
        kv("tokenizer.ggml.merges", MetaValue::StrArray(merges)),
        kv("tokenizer.ggml.bos_token_id", MetaValue::U32(bos)),
        kv("tokenizer.ggml.eos_token_id", MetaValue::U32(eot)),
        kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("llama3-vocab.gguf");
    gguf_file::write(&path, &meta, &[], |_, _| Ok(())).unwrap();

    let (tok, _) = afinar::model::gguf::load_text_side(&path).unwrap();
    let cases = g["tokenizer"].as_array().unwrap();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&c["ids"]), "{text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_with_bos"]),
            "with BOS, {text:?}"
        );
        assert_eq!(tok.decode(&ids(&c["ids"]), false).unwrap(), text);
    }
    if !common::llama_cpp_ready() {
        return;
    }
    let job = tmp.path().join("texts.json");
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    std::fs::write(&job, serde_json::to_string(&texts).unwrap()).unwrap();
    let v = common::llama_cpp_json("tokenize.mjs", &[&path, &job]);
    for (c, theirs) in cases.iter().zip(v["ids"].as_array().unwrap()) {
        assert_eq!(
            ids(theirs),
            ids(&c["ids_with_bos"]),
            "llama.cpp, {:?}",
            c["text"]
        );
    }
}

/// Phi-3's template ends a conversation with the end-of-text token after the last turn, which a
/// following turn replaces: each answer is still labelled up to its `<|end|>`, in a one-turn
/// and a two-turn conversation.
#[test]
fn phi3_template_labels_each_answer() {
    use afinar::data::shapes::{Example, Turn};
    use afinar::data::{Encoder, Outcome, Overlong};
    let model = fixture("phi3");
    let enc = Encoder::new(
        &model.tokenizer,
        model.chat_template.as_ref(),
        512,
        Overlong::Drop,
    );
    let turn = |role: &str, content: &str, train: bool| Turn {
        role: role.into(),
        content: content.into(),
        train,
    };
    let one = vec![
        turn("system", "You are a terse assistant.", false),
        turn("user", "Hi!", false),
        turn("assistant", "Hello! How can I help?", true),
    ];
    let mut two = one.clone();
    two.extend([
        turn("user", "¿qué tal?", false),
        turn("assistant", "Tuve.", true),
    ]);
    for (ex, want) in [
        (one, "Hello! How can I help?<|end|>"),
        (two, "Hello! How can I help?<|end|>Tuve.<|end|>"),
    ] {
        let parts = match enc.encode(&Example::Chat(ex)) {
            Outcome::Ok { parts, .. } => parts,
            Outcome::Rejected(r) => panic!("rejected: {r:?}"),
            _ => panic!("not encoded"),
        };
        let labelled = labelled_ids(&parts[0]);
        assert_eq!(model.tokenizer.decode(&labelled, false).unwrap(), want);
    }
}

/// Hostile values of the families' config keys end in a one-line error naming the key.
#[test]
fn bad_family_config_keys_name_the_key() {
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny-gemma3/config.json")).unwrap(),
    )
    .unwrap();
    let phi: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny-phi3/config.json")).unwrap(),
    )
    .unwrap();
    let falcon: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny-falcon/config.json")).unwrap(),
    )
    .unwrap();
    let smollm3: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny-smollm3/config.json")).unwrap(),
    )
    .unwrap();
    let cases: Vec<(Value, &str, Value, &str)> = vec![
        (
            base.clone(),
            "layer_types",
            json!(["sliding_attention"]),
            "layer_types has 1 entries",
        ),
        (
            base.clone(),
            "final_logit_softcapping",
            json!(30.0),
            "soft-capping",
        ),
        (
            phi.clone(),
            "partial_rotary_factor",
            json!(1.5),
            "partial_rotary_factor",
        ),
        (
            phi.clone(),
            "rope_parameters",
            json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                   "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
            "longrope factors have 1 and 1 entries",
        ),
        (
            falcon.clone(),
            "new_decoder_architecture",
            json!(true),
            "new_decoder_architecture",
        ),
        (falcon.clone(), "alibi", json!(true), "alibi"),
        (
            json!({"model_type": "gemma2"}),
            "x",
            json!(0),
            "only Gemma 3",
        ),
        (
            smollm3,
            "no_rope_layers",
            json!([1, 1]),
            "no_rope_layers has 2 entries for 4 layers",
        ),
        (base.clone(), "mlp_bias", json!(true), "mlp_bias = true"),
        (
            falcon.clone(),
            "multi_query",
            json!(false),
            "multi_query = false",
        ),
        (falcon.clone(), "bias", json!(true), "bias = true"),
        (
            falcon.clone(),
            "activation",
            json!("relu"),
            "an activation other than gelu",
        ),
    ];
    for (mut config, key, value, want) in cases {
        config[key] = value;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = afinar::model::ModelConfig::from_hf_json(&dir.path().join("config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{key}: {err}");
        assert!(!err.contains('\n'), "{key}: one line: {err}");
    }
}
