//! `afinar export` on the tiny Qwen2 fixture with a fixed LoRA adapter
//! (tests/fixtures/tiny-qwen2-lora, written by tests/golden/export_hf_transformers.py): the
//! merged Hugging Face folder reloads with base + adapter's logits, transformers reads it the
//! same way (golden file), shards and rsLoRA merge right, bad input fails in one line, and the
//! Ollama Modelfile's Go template, run by a small interpreter here, renders what the Jinja
//! template renders.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use afinar::export::{hf, merge, ollama, peft};
use afinar::model::chat_template::ChatTemplate;
use afinar::model::{Message, Model};
use candle_core::{Device, Tensor};
use common::{afinar, golden, ids, max_abs_diff, root, tiny_spec};

fn adapter() -> PathBuf {
    root().join("tests/fixtures/tiny-qwen2-lora")
}

/// The tiny model with the fixture adapter attached (not merged).
fn base_plus_adapter(adapter: &Path) -> Model {
    let mut m = Model::load(tiny_spec(), &Device::Cpu).unwrap();
    peft::load(adapter, &mut m.transformer, tiny_spec()).unwrap();
    m
}

/// Logits at every position, flattened.
fn logits(m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.transformer
        .forward(&t, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

fn golden_messages(g: &serde_json::Value) -> Vec<Message> {
    g["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn export_hf(out: &Path, extra: &[&str]) -> (i32, String, String) {
    let a = adapter();
    let mut args = vec![
        "export",
        "--model",
        tiny_spec(),
        "--adapter",
        a.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    afinar(&args)
}

#[test]
fn merged_hf_folder_reloads_with_base_plus_adapter_logits_and_matches_transformers() {
    let g = golden("export_hf.json");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (code, stdout, err) = export_hf(&out, &["--dtype", "f32"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("token identity ok"), "{stdout}");
    assert!(stdout.contains("stops at <|im_end|>"), "{stdout}");

    let source = base_plus_adapter(&adapter());
    let exported = Model::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let want = ids(&g["ids"]);
    // The ids afinar's training used for this conversation are the ones transformers' own
    // tokenizer + chat template give from the exported folder.
    assert_eq!(
        source.encode_chat(&golden_messages(&g), true).unwrap(),
        want
    );
    assert_eq!(
        exported.encode_chat(&golden_messages(&g), true).unwrap(),
        want
    );

    let src = logits(&source, &want);
    let exp = logits(&exported, &want);
    let d = max_abs_diff(&flat(&src), &flat(&exp));
    assert!(d <= 1e-4, "afinar reload vs base + adapter: max |Δ| {d}");
    // The merge changed the model (the adapter is not a no-op).
    let base = Model::load(tiny_spec(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&flat(&logits(&base, &want)), &flat(&src)) > 1e-2);

    let from = g["logits_from"].as_u64().unwrap() as usize;
    let gold: Vec<f32> = g["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let d = max_abs_diff(&flat(&src[from..]), &gold);
    assert!(
        d <= 1e-3,
        "transformers on the merged folder vs afinar base + adapter: max |Δ| {d}"
    );
    assert_eq!(g["eos_token"], "<|im_end|>");

    let read = |n: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(n)).unwrap()).unwrap()
    };
    let im_end = source.tokenizer.inner.token_to_id("<|im_end|>").unwrap();
    assert_eq!(read("tokenizer_config.json")["eos_token"], "<|im_end|>");
    assert_eq!(read("generation_config.json")["eos_token_id"][0], im_end);
    assert!(read("tokenizer_config.json")["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("tiny-qwen2") && card.contains("merged"),
        "{card}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no temporary left beside the output");
}

#[test]
fn rslora_and_plain_scales_merge_to_the_adapters_forward() {
    for rslora in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(adapter().join(f), dir.path().join(f)).unwrap();
        }
        let cfg_path = dir.path().join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["use_rslora"] = rslora.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let source = base_plus_adapter(dir.path());
        let mut merged = source.clone();
        assert_eq!(merge::merge_lora(&mut merged.transformer).unwrap(), 14);
        let ids: Vec<u32> = (5..60).collect();
        let d = max_abs_diff(&flat(&logits(&source, &ids)), &flat(&logits(&merged, &ids)));
        assert!(d <= 1e-4, "rslora={rslora}: merged vs adapter max |Δ| {d}");
    }
}

#[test]
fn weights_past_the_shard_size_are_split_with_an_index_and_reload() {
    let mut source = base_plus_adapter(&adapter());
    merge::merge_lora(&mut source.transformer).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = hf::HfOptions {
        shard_bytes: 60_000,
        ..hf::HfOptions::default()
    };
    hf::save_with(dir.path(), &source, &opts).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "{files:?}");
    assert!(!dir.path().join("model.safetensors").exists());
    let back = Model::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (5..40).collect();
    let d = max_abs_diff(&flat(&logits(&source, &ids)), &flat(&logits(&back, &ids)));
    assert!(d <= 1e-6, "sharded reload max |Δ| {d}");
}

fn one_line_error(code: i32, err: &str, want: &str) {
    assert_ne!(code, 0, "should fail: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(want), "expected {want:?} in {err:?}");
}

#[test]
fn bad_input_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // An output folder that exists and is not empty.
    let out = dir.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let (code, _, err) = export_hf(&out, &["--dtype", "f32"]);
    one_line_error(code, &err, "--overwrite");
    assert!(out.join("keep.txt").exists());
    let (code, _, err) = export_hf(&out, &["--dtype", "f32", "--overwrite"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("config.json").exists() && !out.join("keep.txt").exists());

    // An adapter trained on another base of the same shapes.
    let mistral = root().join("tests/fixtures/tiny-mistral");
    let a = adapter();
    let (code, _, err) = afinar(&[
        "export",
        "--model",
        mistral.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        dir.path().join("m").to_str().unwrap(),
    ]);
    one_line_error(code, &err, "trained on");
    assert!(!dir.path().join("m").exists());

    // A LoRA GGUF needs an adapter; a GGUF type is not an hf weight type.
    let (code, _, err) = afinar(&[
        "export",
        "--model",
        tiny_spec(),
        "--to",
        "gguf-lora",
        "--out",
        dir.path().join("l.gguf").to_str().unwrap(),
    ]);
    one_line_error(code, &err, "--adapter");
    let (code, _, err) = export_hf(&dir.path().join("q"), &["--dtype", "q4_0"]);
    one_line_error(code, &err, "f32, f16 or bf16");
    let (code, _, err) = export_hf(&dir.path().join("x"), &["--to", "onnx"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("hf, gguf, gguf-lora or ollama"), "{err}");
}

// --- Ollama templates --------------------------------------------------------------------

/// A value the Go-template subset below works on.
#[derive(Clone)]
enum V {
    Str(String),
    List(Vec<HashMap<String, V>>),
}

enum Node {
    Text(String),
    Field(String),
    If(String, Vec<Node>),
    Range(String, Vec<Node>),
}

/// Splits a Go template into text and actions, applying `{{-` / `-}}` whitespace trimming.
fn lex(src: &str) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let end = rest[start..].find("}}").expect("unclosed action") + start;
        let mut action = &rest[start + 2..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end().to_string();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        out.push((false, text));
        out.push((true, action.trim().to_string()));
        rest = &rest[end + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    out.push((false, text.to_string()));
    out
}

fn parse(tokens: &mut std::vec::IntoIter<(bool, String)>) -> Vec<Node> {
    let mut nodes = Vec::new();
    while let Some((action, s)) = tokens.next() {
        if !action {
            nodes.push(Node::Text(s));
        } else if s == "end" {
            return nodes;
        } else if let Some(c) = s.strip_prefix("if ") {
            nodes.push(Node::If(c.to_string(), parse(tokens)));
        } else if let Some(c) = s.strip_prefix("range ") {
            nodes.push(Node::Range(c.to_string(), parse(tokens)));
        } else if let Some(f) = s.strip_prefix('.') {
            nodes.push(Node::Field(f.to_string()));
        } else {
            panic!("action not in the test's Go-template subset: {s}");
        }
    }
    nodes
}

fn field(dot: &HashMap<String, V>, name: &str) -> String {
    match dot.get(name.trim_start_matches('.')) {
        Some(V::Str(s)) => s.clone(),
        Some(V::List(l)) if !l.is_empty() => "non-empty".into(),
        _ => String::new(),
    }
}

fn truth(cond: &str, dot: &HashMap<String, V>) -> bool {
    let parts: Vec<&str> = cond.splitn(3, ' ').collect();
    match parts.as_slice() {
        [f] => !field(dot, f).is_empty(),
        [op, f, lit] => {
            let eq = field(dot, f) == lit.trim_matches('"');
            match *op {
                "eq" => eq,
                "ne" => !eq,
                _ => panic!("operator {op}"),
            }
        }
        _ => panic!("condition {cond}"),
    }
}

fn exec(nodes: &[Node], dot: &HashMap<String, V>, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Field(f) => out.push_str(&field(dot, f)),
            Node::If(c, body) => {
                if truth(c, dot) {
                    exec(body, dot, out)
                }
            }
            Node::Range(f, body) => {
                if let Some(V::List(items)) = dot.get(f.trim_start_matches('.')) {
                    for item in items {
                        exec(body, item, out);
                    }
                }
            }
        }
    }
}

/// Renders `template` as Ollama would: `.System` from the Modelfile's SYSTEM (or a system
/// message), `.Messages` the conversation.
fn go_render(template: &str, system: Option<&str>, messages: &[Message]) -> String {
    let mut tokens = lex(template).into_iter();
    let nodes = parse(&mut tokens);
    let msg = |m: &Message| {
        HashMap::from([
            ("Role".to_string(), V::Str(m.role.clone())),
            ("Content".to_string(), V::Str(m.content.clone())),
        ])
    };
    let dot = HashMap::from([
        (
            "System".to_string(),
            V::Str(system.unwrap_or_default().to_string()),
        ),
        (
            "Messages".to_string(),
            V::List(messages.iter().map(msg).collect()),
        ),
    ]);
    let mut out = String::new();
    exec(&nodes, &dot, &mut out);
    out
}

/// The TEMPLATE and SYSTEM of a Modelfile.
fn template_and_system(modelfile: &str) -> (String, Option<String>) {
    let quoted = |key: &str| {
        let start = modelfile.find(&format!("{key} \"\"\""))? + key.len() + 4;
        let end = modelfile[start..].find("\"\"\"")? + start;
        Some(modelfile[start..end].to_string())
    };
    (quoted("TEMPLATE").expect("TEMPLATE"), quoted("SYSTEM"))
}

fn with_template(src: &str, bos: &str, eos: &str) -> Model {
    let mut m = Model::load(tiny_spec(), &Device::Cpu).unwrap();
    m.tokenizer.bos_token = Some(bos.into());
    m.tokenizer.eos_token = Some(eos.into());
    m.chat_template = Some(ChatTemplate::new(src, Some(bos), Some(eos)).unwrap());
    m
}

/// The Jinja rendering; for Llama 3 and Mistral without the BOS text, which llama.cpp and Ollama
/// add as a token from the GGUF's add_bos_token.
fn jinja(m: &Model, messages: &[Message]) -> String {
    let text = m.render_chat(messages, true).unwrap();
    if text.starts_with("<|im_start|>") {
        return text;
    }
    let bos = m.tokenizer.bos_token.clone().unwrap_or_default();
    text.strip_prefix(bos.as_str())
        .map(str::to_string)
        .unwrap_or(text)
}

/// For a model and the system message training used: the Modelfile's template and SYSTEM,
/// rendered as Ollama does for a conversation without a system message (Ollama inserts SYSTEM),
/// equal the Jinja template on the same conversation with the system message.
fn assert_equivalent(m: &Model, run_system: Option<&str>) -> String {
    let mf = ollama::modelfile(m, "model.gguf", run_system, false).unwrap();
    let (template, system) = template_and_system(&mf.text);
    let conv = ollama::probe_conversation(None);
    let mut with_system = conv.clone();
    if let Some(s) = &system {
        with_system.insert(0, Message::new("system", s.clone()));
    }
    let want = jinja(m, &with_system);
    assert_eq!(
        go_render(&template, system.as_deref(), &conv),
        want,
        "{}",
        mf.text
    );
    // A request that brings its own system message: Ollama puts it in .System (for formats
    // that have a system turn).
    if mf.turns.as_ref().is_some_and(|t| t.system.is_none()) {
        return mf.text;
    }
    let asked = ollama::probe_conversation(Some("Responde en verso."));
    let want = jinja(m, &asked);
    assert_eq!(
        go_render(&template, Some("Responde en verso."), &asked),
        want
    );
    assert!(mf
        .text
        .starts_with("# Written by afinar export.\nFROM ./model.gguf\n"));
    mf.text
}

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn modelfile_templates_render_what_the_jinja_templates_render() {
    // ChatML (the fixture's own template), with the run's system message.
    let tiny = Model::load(tiny_spec(), &Device::Cpu).unwrap();
    let text = assert_equivalent(&tiny, Some("Eres un profesor de español."));
    assert!(text.contains("PARAMETER stop \"<|im_end|>\""), "{text}");
    assert!(
        text.contains("SYSTEM \"\"\"Eres un profesor de español.\"\"\""),
        "{text}"
    );
    // ChatML whose template adds its own default system message (SmolLM2): kept as SYSTEM.
    let smol = with_template(SMOLLM2, "<|im_start|>", "<|im_end|>");
    let text = assert_equivalent(&smol, None);
    assert!(text.contains("named SmolLM"), "{text}");
    // Llama 3, BOS left to the tokenizer.
    let llama = with_template(LLAMA3, "<|begin_of_text|>", "<|eot_id|>");
    let text = assert_equivalent(&llama, Some("You are terse."));
    assert!(
        text.contains("<|start_header_id|>{{ .Role }}") || text.contains("<|start_header_id|>user")
    );
    // Mistral: no system turn.
    let mistral = with_template(MISTRAL, "<s>", "</s>");
    let text = assert_equivalent(&mistral, None);
    assert!(!text.contains("SYSTEM"), "{text}");
    let err = ollama::modelfile(&mistral, "model.gguf", Some("Be brief."), false).unwrap_err();
    assert!(err.to_string().contains("no system turn"), "{err}");
}

#[test]
fn an_unknown_template_needs_force() {
    let odd = with_template(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:",
        "",
        "",
    );
    let err = ollama::modelfile(&odd, "model.gguf", None, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    let mf = ollama::modelfile(&odd, "model.gguf", None, true).unwrap();
    assert!(
        mf.text.contains("TEMPLATE \"\"\"{{ .Prompt }}\"\"\""),
        "{}",
        mf.text
    );
}

#[test]
fn a_training_run_exports_with_its_test_split_card_and_system_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_conjugation(&dir.path().join("conj.jsonl"), 0..200);
    let run = dir.path().join("run");
    let (code, _, err) = afinar(&[
        "train",
        "--model",
        tiny_spec(),
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "2",
        "--set",
        &format!("data=[{:?}]", data.display().to_string()),
        "--set",
        "system=\"Eres un profesor.\"",
    ]);
    assert_eq!(code, 0, "{err}");
    let out = dir.path().join("hf");
    let adapter = run.join("adapter");
    let (code, stdout, err) = afinar(&[
        "export",
        "--model",
        tiny_spec(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("token identity ok: 4 prompts"), "{stdout}");
    assert!(stdout.contains("the run's test split"), "{stdout}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(&data).unwrap()))
    };
    assert!(card.contains("- Steps: 2"), "{card}");
    assert!(card.contains(&sha), "{card}");
    assert!(card.contains("Final training loss"), "{card}");

    // The Ollama Modelfile carries the run's system message.
    let info = afinar::export::card::RunInfo::find(Some(&adapter), tiny_spec()).unwrap();
    assert_eq!(info.system.as_deref(), Some("Eres un profesor."));
    let source = base_plus_adapter(&adapter);
    let mf = ollama::modelfile(&source, "model.gguf", info.system.as_deref(), false).unwrap();
    assert!(
        mf.text.contains("SYSTEM \"\"\"Eres un profesor.\"\"\""),
        "{}",
        mf.text
    );
}

#[cfg(unix)]
#[test]
fn a_disk_that_fills_mid_write_leaves_nothing_under_the_final_name() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let a = adapter();
    let mut cmd = common::afinar_cmd();
    cmd.args(["export", "--model", tiny_spec(), "--adapter"])
        .arg(&a)
        .args(["--to", "hf", "--dtype", "f32", "--out"])
        .arg(&out);
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec. A file
    // size limit of 64 KiB makes the weights' write fail with EFBIG part-way, as a full disk
    // would; SIGXFSZ is ignored so the write returns an error instead of killing the process.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    one_line_error(o.status.code().unwrap_or(-1), &err, "safetensors");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}
