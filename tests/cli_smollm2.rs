//! The `afinar` binary on the default model (SmolLM2, fetched once): `generate --json`, `chat`,
//! `info`, and a real GGUF cut short. The offline CLI tests are in tests/cli.rs.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{afinar, expect_error, smollm2_path};

#[test]
fn truncated_gguf_header_and_body() {
    let src = std::fs::read(smollm2_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let header = dir.path().join("cut-header.gguf");
    std::fs::write(&header, &src[..100_000]).unwrap();
    expect_error(&header, "truncated");
    let body = dir.path().join("cut-body.gguf");
    std::fs::write(&body, &src[..src.len() / 2]).unwrap();
    expect_error(&body, "truncated");
}

#[test]
fn generate_json_reports_tokens_and_reason() {
    let (code, out, err) = afinar(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "text",
        "tokens",
        "prompt_tokens",
        "generated_tokens",
        "tokens_per_sec",
        "finish_reason",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(
        v["tokens"].as_array().unwrap().len() as u64,
        v["generated_tokens"].as_u64().unwrap()
    );
}

#[test]
fn chat_keeps_history_and_handles_commands() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(["chat", "--temperature", "0", "--max-new-tokens", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Spain?\n/reset\nHi\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(stdout.contains("(conversation reset)"), "{stdout}");
    assert!(stdout.contains("Madrid"), "{stdout}");
}

#[test]
fn info_describes_the_default_model() {
    let (code, out, err) = afinar(&["info", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["vocab_size"], 49152);
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(v["file_dtype"], "Q4_1");
    assert_eq!(v["chat_template"], true);
    assert_eq!(v["eos_token"], "<|im_end|>");
}
