//! GGUF export: afinar loads what it writes (same logits, same greedy tokens as the source), the
//! metadata is what llama.cpp's converter writes, and llama.cpp itself (through node-llama-cpp's
//! prebuilt binary, tests/llamacpp) generates the same tokens from the exported files as afinar
//! does from the source model, and stops at the chat's end-of-turn token.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use afinar::export::gguf::{self, GgufDtype};
use afinar::export::peft;
use afinar::infer::{generate, GenerateOptions};
use afinar::model::{Message, Model};
use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use serde_json::{json, Value};

/// Chat prompts for the generation checks; the first ones end well before 32 tokens.
const PROMPTS: &[(&str, &str)] = &[
    ("", "What is the capital of France?"),
    ("You are terse.", "Say hi."),
    ("", "Write a short poem about the sea."),
];

fn chat(system: &str, user: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if !system.is_empty() {
        m.push(Message::new("system", system));
    }
    m.push(Message::new("user", user));
    m
}

/// A folder for this test binary's exports, kept for its lifetime.
fn out_dir() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// SmolLM2 exported as `dtype` (written once per test binary).
fn exported(dtype: GgufDtype) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = out_dir().join(format!("smollm2.{dtype}.gguf"));
    if !path.exists() {
        let t = std::time::Instant::now();
        gguf::write_model(common::smollm2(), dtype, &path).unwrap();
        let mb = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
        eprintln!(
            "exported SmolLM2 as {dtype}: {mb:.1} MB in {:.1?}",
            t.elapsed()
        );
    }
    path
}

/// A seeded random LoRA adapter on SmolLM2's q/v projections (as tests/serve.rs makes one),
/// large enough to change the answers; and its GGUF.
fn adapter() -> &'static (PathBuf, PathBuf) {
    static A: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    A.get_or_init(|| {
        let dir = out_dir().join("adapter");
        common::random_adapter(&dir, &["q_proj", "k_proj", "v_proj"], 0.5);
        let gguf_path = out_dir().join("adapter.gguf");
        gguf::write_lora(common::smollm2(), &dir, &gguf_path).unwrap();
        (dir, gguf_path)
    })
}

/// Greedy generation of up to `n` tokens for each prompt (what `afinar generate --chat
/// --temperature 0` runs): (prompt ids, generated ids, stopped at an end token).
fn afinar_greedy(model: &Model, n: usize) -> Vec<(Vec<u32>, Vec<u32>, bool)> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    PROMPTS
        .iter()
        .map(|(s, u)| {
            let prompt = model.encode_chat(&chat(s, u), true).unwrap();
            let g = generate(model, &prompt, &opts, |_| {}).unwrap();
            let stopped = g.tokens.len() < n;
            (prompt, g.tokens, stopped)
        })
        .collect()
}

/// Every position's logits, one after another.
fn all_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    common::position_logits(model, ids).concat()
}

#[test]
fn f32_export_loads_back_with_the_same_logits_and_tokens() {
    // The source in f32 too, so both sides take the same kernels (the Q4_1 file held packed
    // sums its products in another order: ~1e-5 apart).
    let src = &Model::load_with(
        common::smollm2_path().to_str().unwrap(),
        &Device::Cpu,
        afinar::model::BaseDtype::F32,
    )
    .unwrap();
    let back = Model::load(exported(GgufDtype::F32).to_str().unwrap(), &Device::Cpu).unwrap();
    let ids = src.encode_chat(&chat("", PROMPTS[0].1), true).unwrap();
    let d = common::max_abs_diff(&all_logits(src, &ids), &all_logits(&back, &ids));
    assert!(d <= 1e-5, "f32 export changes logits by {d}");
    assert_eq!(afinar_greedy(src, 32), afinar_greedy(&back, 32));
    assert_eq!(back.file_dtype, "F32");
}

#[test]
fn f16_and_bf16_exports_keep_logits_within_their_precision() {
    let src = common::smollm2();
    let ids = src.encode_chat(&chat("", PROMPTS[0].1), true).unwrap();
    let reference = all_logits(src, &ids);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, tol) in [(GgufDtype::F16, 2e-3), (GgufDtype::Bf16, 2e-2)] {
        let back = Model::load(exported(dtype).to_str().unwrap(), &Device::Cpu).unwrap();
        let d = common::max_abs_diff(&reference, &all_logits(&back, &ids)) / scale;
        eprintln!("{dtype}: max logit difference {d:.2e} of the largest logit");
        assert!(d <= tol, "{dtype} export changes logits by {d} (relative)");
        let (a, b) = (afinar_greedy(src, 16), afinar_greedy(&back, 16));
        assert_eq!(a, b, "{dtype} export changes greedy tokens");
    }
}

/// The metadata llama.cpp reads: end-of-turn EOS, BOS as SmolLM2's tokenizer adds it (not at
/// all), its pre-tokenizer, its template, tied embeddings, and llama-quantize's type choices.
#[test]
fn metadata_and_tensor_types_are_what_llama_cpp_expects() {
    let src = common::smollm2();
    let source = afinar::model::gguf::read_header(&common::smollm2_path()).unwrap();
    let path = exported(GgufDtype::Q4_0);
    let mut f = std::fs::File::open(&path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let md = &c.metadata;
    let s = |k: &str| md[k].to_string().unwrap().clone();
    let u = |k: &str| md[k].to_u32().unwrap();
    assert_eq!(s("general.architecture"), "llama");
    assert_eq!(u("general.alignment"), 32);
    assert_eq!(u("general.file_type"), 2);
    let tok = &src.tokenizer.inner;
    assert_eq!(
        u("tokenizer.ggml.eos_token_id"),
        tok.token_to_id("<|im_end|>").unwrap()
    );
    assert_eq!(
        u("tokenizer.ggml.bos_token_id"),
        tok.token_to_id("<|im_start|>").unwrap()
    );
    assert!(!md["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
    assert_eq!(s("tokenizer.ggml.model"), "gpt2");
    assert_eq!(
        s("tokenizer.ggml.pre"),
        source.metadata["tokenizer.ggml.pre"]
            .to_string()
            .unwrap()
            .as_str()
    );
    assert_eq!(
        s("tokenizer.chat_template"),
        src.chat_template.as_ref().unwrap().source
    );
    for key in [
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
    ] {
        assert_eq!(u(key), source.metadata[key].to_u32().unwrap(), "{key}");
    }
    // The vocabulary, merges and token types are the source file's.
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ] {
        let (a, b) = (
            md[key].to_vec().unwrap(),
            source.metadata[key].to_vec().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{key}");
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{key}");
    }
    let types: HashMap<&str, String> = c
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.as_str(), format!("{:?}", i.ggml_dtype)))
        .collect();
    assert!(
        !types.contains_key("output.weight"),
        "tied embeddings: no output.weight"
    );
    assert_eq!(types["token_embd.weight"], "Q8_0");
    assert_eq!(types["blk.0.attn_q.weight"], "Q4_0");
    assert_eq!(types["blk.29.ffn_down.weight"], "Q4_0");
    assert_eq!(types["blk.0.attn_norm.weight"], "F32");
    assert_eq!(types["output_norm.weight"], "F32");
    assert_eq!(c.tensor_infos.len(), 1 + 30 * 9 + 1);

    // afinar reads the quantized files back. Their logits move with the quantization step
    // (max/127 for Q8_0, max/8 for Q4_0: about 16 times coarser) and keep the source's top token
    // at most positions.
    let ids = src.encode_chat(&chat("", PROMPTS[0].1), true).unwrap();
    let a = all_logits(src, &ids);
    let v = src.config().vocab_size;
    let mean = |x: &[f32]| x.iter().map(|x| x.abs()).sum::<f32>() / x.len() as f32;
    let argmax = |l: &[f32]| (0..v).max_by(|&i, &j| l[i].total_cmp(&l[j])).unwrap();
    for (dtype, max_rel, min_agree) in [(GgufDtype::Q8_0, 0.1, 0.85), (GgufDtype::Q4_0, 1.0, 0.5)] {
        let back = Model::load(exported(dtype).to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(back.file_dtype, dtype.to_string().to_uppercase());
        let b = all_logits(&back, &ids);
        let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let rel = mean(&diff) / mean(&a);
        let agree = (0..ids.len())
            .filter(|&p| argmax(&a[p * v..(p + 1) * v]) == argmax(&b[p * v..(p + 1) * v]))
            .count() as f32
            / ids.len() as f32;
        eprintln!("{dtype}: mean logit difference {rel:.3} of the mean logit; top-1 agrees at {:.0}% of positions", agree * 100.0);
        assert!(
            rel < max_rel,
            "{dtype} export changes logits by {rel} (relative mean)"
        );
        assert!(
            agree >= min_agree,
            "{dtype} export keeps the top token at only {agree} of positions"
        );
    }
}

/// The small fixtures round-trip exactly, with no download: Qwen2 (attention biases, no Q/K
/// permutation) and Mistral (written as llama, Q/K rows permuted and restored by the loader).
#[test]
fn tiny_models_round_trip_exactly() {
    for name in ["tiny-qwen2", "tiny-mistral"] {
        let dir = common::root().join("tests/fixtures").join(name);
        let src = Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
        let path = out_dir().join(format!("{name}.gguf"));
        gguf::write_model(&src, GgufDtype::F32, &path).unwrap();
        let back = Model::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
        let ids: Vec<u32> = (1..40)
            .map(|i| (i * 7) % src.config().vocab_size as u32)
            .collect();
        let d = common::max_abs_diff(&all_logits(&src, &ids), &all_logits(&back, &ids));
        assert!(d <= 1e-5, "{name}: logits differ by {d}");
        let text = "Hello, world! 123";
        assert_eq!(
            src.tokenizer.encode(text, true).unwrap(),
            back.tokenizer.encode(text, true).unwrap(),
            "{name}: tokenizer"
        );
        assert_eq!(
            src.tokenizer.end_token_ids, back.tokenizer.end_token_ids,
            "{name}"
        );
    }
}

#[test]
fn an_adapter_for_another_base_is_refused() {
    let (dir, _) = adapter();
    let tiny = Model::load(common::tiny_spec(), &Device::Cpu).unwrap();
    let out = out_dir().join("wrong.gguf");
    let err = gguf::write_lora(&tiny, dir, &out).unwrap_err().to_string();
    assert!(
        err.contains("does not fit") && err.contains("smollm2"),
        "{err}"
    );
    assert!(!out.exists());
    assert!("q4_k"
        .parse::<GgufDtype>()
        .unwrap_err()
        .to_string()
        .contains("q8_0"));
}

/// Runs tests/llamacpp/generate.mjs on a job; its JSON answer.
fn llama_cpp(model: &Path, lora: Option<&Path>, max_tokens: usize) -> Vec<Value> {
    let job = json!({
        "model": model, "lora": lora, "max_tokens": max_tokens,
        "chats": PROMPTS.iter().map(|(s, u)| {
            let mut m = vec![];
            if !s.is_empty() { m.push(json!({"role": "system", "content": s})); }
            m.push(json!({"role": "user", "content": u}));
            m
        }).collect::<Vec<_>>(),
    });
    let job_path = out_dir().join(format!(
        "job-{}.json",
        model.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&job_path, job.to_string()).unwrap();
    let v = common::llama_cpp_json("generate.mjs", &[&job_path]);
    v["results"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    common::ids(v)
}

/// llama.cpp (node-llama-cpp's prebuilt CPU build) runs the exports: the chat prompt its Jinja
/// wrapper renders from the GGUF's template has the ids afinar's has; f32 and f16 give
/// afinar's greedy 32 tokens, Q8_0 its first 16 (or the first divergence is reported), the
/// LoRA GGUF over the f32 base the tokens of afinar with the PEFT adapter; generation stops
/// at `<|im_end|>` where afinar stops.
#[test]
fn llama_cpp_generates_what_afinar_generates() {
    if !common::llama_cpp_ready() {
        return;
    }
    let src = common::smollm2();
    let im_end = src.tokenizer.inner.token_to_id("<|im_end|>").unwrap();
    let expected = afinar_greedy(src, 32);
    assert!(
        expected.iter().any(|(_, _, stopped)| *stopped),
        "no prompt ends before 32 tokens: the stop check would prove nothing"
    );
    let check = |label: &str, got: &[Value], want: &[(Vec<u32>, Vec<u32>, bool)], n: usize| {
        for ((prompt, tokens, stopped), g) in want.iter().zip(got) {
            assert_eq!(&ids(&g["prompt"]), prompt, "{label}: prompt ids");
            let mine = &tokens[..tokens.len().min(n)];
            let theirs = ids(&g["tokens"]);
            let theirs = &theirs[..theirs.len().min(n)];
            assert_eq!(theirs, mine, "{label}: greedy tokens");
            if *stopped && tokens.len() < n {
                assert_eq!(
                    g["end"].as_u64(),
                    Some(im_end as u64),
                    "{label}: stop token"
                );
            }
        }
    };
    for dtype in [GgufDtype::F32, GgufDtype::F16] {
        let got = llama_cpp(&exported(dtype), None, 32);
        check(&format!("{dtype}"), &got, &expected, 32);
    }
    for dtype in [GgufDtype::Q8_0, GgufDtype::Q4_0] {
        first_divergence_is_a_near_tie(dtype);
    }

    let (adapter_dir, lora_gguf) = adapter();
    let mut tuned = Model::load("smollm2", &Device::Cpu).unwrap();
    peft::load(adapter_dir, &mut tuned.transformer, "smollm2").unwrap();
    let want = afinar_greedy(&tuned, 32);
    assert_ne!(want, expected, "the adapter should change the answers");
    let got = llama_cpp(&exported(GgufDtype::F32), Some(lora_gguf), 32);
    check("f32 + LoRA GGUF", &got, &want, 32);
}

/// llama.cpp multiplies quantized weights by activations it quantizes to 8 bits as well, where
/// afinar computes in f32 from the same (dequantized) weights: greedy decoding of the two may
/// part at a near-tie. Each prompt's first 16 tokens agree, or the first divergence is
/// reported and must be a near-tie in afinar's logits (a wrongly written block would part
/// early with a wide margin).
fn first_divergence_is_a_near_tie(dtype: GgufDtype) {
    let path = exported(dtype);
    let model = Model::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
    let got = llama_cpp(&path, None, 16);
    for ((prompt, mine, _), g) in afinar_greedy(&model, 16).iter().zip(&got) {
        assert_eq!(&ids(&g["prompt"]), prompt, "{dtype}: prompt ids");
        let theirs = ids(&g["tokens"]);
        let Some(k) = (0..16).find(|&k| mine.get(k) != theirs.get(k)) else {
            eprintln!("{dtype}: llama.cpp gives afinar's first 16 tokens");
            continue;
        };
        let (Some(&a), Some(&b)) = (mine.get(k), theirs.get(k)) else {
            panic!("{dtype}: one side stopped at token {k}: afinar {mine:?}, llama.cpp {theirs:?}");
        };
        let ctx: Vec<u32> = prompt.iter().chain(&mine[..k]).copied().collect();
        let logits = all_logits(&model, &ctx);
        let last = &logits[logits.len() - model.config().vocab_size..];
        let margin = last[a as usize] - last[b as usize];
        eprintln!(
            "{dtype}: llama.cpp diverges from afinar at token {k} ({b} instead of {a}); afinar's logit margin there: {margin:.4}"
        );
        assert!(
            margin < 0.25,
            "{dtype}: divergence at token {k} where afinar's margin is {margin}"
        );
    }
}

/// A model with an adapter still attached is exported with it merged (W + s·BA): the file
/// alone gives the tuned model's logits.
#[test]
fn an_attached_adapter_is_merged_into_the_export() {
    let (adapter_dir, _) = adapter();
    let mut tuned = Model::load("smollm2", &Device::Cpu).unwrap();
    peft::load(adapter_dir, &mut tuned.transformer, "smollm2").unwrap();
    let path = out_dir().join("tuned.f32.gguf");
    gguf::write_model(&tuned, GgufDtype::F32, &path).unwrap();
    let back = Model::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
    let ids = tuned.encode_chat(&chat("", PROMPTS[1].1), true).unwrap();
    let (a, b) = (all_logits(&tuned, &ids), all_logits(&back, &ids));
    let d = common::max_abs_diff(&a, &b);
    assert!(
        d <= 1e-3,
        "merged export differs from the tuned model by {d}"
    );
    let base = all_logits(common::smollm2(), &ids);
    assert!(
        common::max_abs_diff(&a, &base) > 0.1,
        "the adapter should matter"
    );
}

/// Llama 3 RoPE scaling travels as `rope_freqs.weight` (computed as llama.cpp's converter does);
/// afinar reads it back to the same rotation: logits over 120 positions match.
#[test]
fn llama3_rope_scaling_round_trips_as_rope_freqs() {
    use afinar::model::config::Llama3RopeScaling;
    use afinar::model::{ChatTemplate, ModelSource, Transformer};
    let dir = common::root().join("tests/fixtures/tiny-mistral");
    let mut hf = afinar::model::hf::load(&dir, &Device::Cpu, Default::default()).unwrap();
    // An original context of 64 puts this fixture's 8 frequencies in all three bands.
    hf.config.rope_scaling = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    let scaled = Model {
        source: ModelSource::HfDir(dir.clone()),
        transformer: Transformer::from_weights(hf.config, hf.weights, None).unwrap(),
        chat_template: ChatTemplate::for_model(hf.chat_template, &hf.tokenizer).unwrap(),
        tokenizer: hf.tokenizer,
        file_dtype: hf.file_dtype,
    };
    let plain = Model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let path = out_dir().join("tiny-llama3-rope.gguf");
    gguf::write_model(&scaled, GgufDtype::F32, &path).unwrap();
    let back = Model::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..120).map(|i| (i * 13 + 5) % 320).collect();
    let a = all_logits(&scaled, &ids);
    let d = common::max_abs_diff(&a, &all_logits(&back, &ids));
    assert!(d <= 1e-5, "rope_freqs round trip changes logits by {d}");
    assert!(
        common::max_abs_diff(&a, &all_logits(&plain, &ids)) > 1e-3,
        "the scaling should matter at these positions"
    );
}
