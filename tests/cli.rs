//! The `afinar` binary as users run it: bad inputs give one clear line and a non-zero exit,
//! never a panic. Offline (tiny fixture models, in `cargo test-fast`); what needs the default
//! model (generate, chat, info on SmolLM2, a truncated real GGUF) is in tests/cli_smollm2.rs.

mod common;

use std::process::{Command, Stdio};

use common::{afinar, expect_error, root, tiny_spec, write_conjugation};

#[test]
fn missing_path_is_a_clear_error() {
    expect_error(
        std::path::Path::new("/nonexistent/model.gguf"),
        "no such file or directory",
    );
}

#[test]
fn text_file_passed_as_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "this is just text\n").unwrap();
    expect_error(&p, "not a GGUF file");
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("neox");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 64}"#,
    )
    .unwrap();
    expect_error(&model, "unsupported architecture 'gpt_neox'");
}

#[test]
fn directory_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-tokenizer");
    std::fs::create_dir(&model).unwrap();
    let src = root().join("tests/fixtures/tiny-mistral");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    expect_error(&model, "tokenizer.json is missing");
}

#[test]
fn bad_sampling_values_are_rejected() {
    let (code, _, err) = afinar(&[
        "generate",
        "--model",
        tiny_spec(),
        "--prompt",
        "hi",
        "--top-p",
        "2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("top-p must be in (0, 1]"), "{err}");
}

#[test]
fn hub_repo_offline_uses_the_cache_or_says_it_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let run = |repo: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_afinar"))
            .args(["info", "--json", "--model", repo])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run("acme/not-cached");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("acme/not-cached") && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Lay out a cached snapshot as huggingface_hub does: hub/models--org--name/{refs/main,snapshots/<sha>/}.
    let repo_dir = home.path().join("hub").join("models--acme--tiny");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo_dir.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), sha).unwrap();
    let src = root().join("tests/fixtures/tiny-mistral");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let (code, out, err) = run("acme/tiny");
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "mistral");
}

#[test]
fn data_prepare_then_inspect_the_bundled_conjugation_set() {
    let out = tempfile::tempdir().unwrap();
    let data = root().join("data/conjugation/conjugation.jsonl");
    let (code, stdout, err) = afinar(&[
        "data",
        "prepare",
        "--model",
        tiny_spec(),
        "--data",
        data.to_str().unwrap(),
        "--split-key",
        "verb",
        "--max-seq-len",
        "256",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("records parsed: 5280"), "{stdout}");
    assert!(stdout.contains("nothing skipped or truncated"), "{stdout}");
    let (code, stdout, err) = afinar(&[
        "data",
        "inspect",
        out.path().to_str().unwrap(),
        "--split",
        "test",
    ]);
    assert_eq!(code, 0, "{err}");
    // The rendered example shows the answer and its end-of-turn inside the loss marks.
    assert!(stdout.contains("<|im_start|>assistant\n«"), "{stdout}");
    assert!(stdout.contains("<|im_end|>»"), "{stdout}");
    let (code, _, err) = afinar(&[
        "data",
        "prepare",
        "--model",
        tiny_spec(),
        "--data",
        "/nope.jsonl",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("/nope.jsonl: no such file or directory"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    // As in `afinar info | head -1`: the reader goes away before afinar prints.
    let mut child = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(["info", "--model", tiny_spec()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_of_a_data_file_covers_every_row_unless_a_split_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("my_test.jsonl");
    write_conjugation(&data, 0..40);
    let model = root().join("tests/fixtures/tiny-qwen2");
    let eval = |extra: &[&str], name: &str| {
        let json = dir.path().join(format!("{name}.json"));
        let out = dir.path().join(name);
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--metrics",
            "loss,exact_match",
            "--max-new-tokens",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend(extra);
        let (code, _, err) = afinar(&args);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (v, err)
    };

    // The whole file: all 40 rows generated for, and said so.
    let (v, err) = eval(&[], "whole");
    assert_eq!(v["counts"]["exact_match"], 40, "{v}");
    assert_eq!(v["settings"]["split"], "all", "{v}");
    assert_eq!(v["settings"]["split_examples"], 40, "{v}");
    assert!(
        err.contains("every row of") && err.contains("40 examples"),
        "{err}"
    );

    // Asked for: the test share of the default 0.9/0.05/0.05 fractions only.
    let (v, err) = eval(&["--split", "test"], "split");
    let n = v["counts"]["exact_match"].as_u64().unwrap();
    assert!((1..20).contains(&n), "{v}");
    assert_eq!(v["settings"]["split"], "test", "{v}");
    assert!(
        err.contains("the test split of") && err.contains(&format!("{n} of 40 records")),
        "{err}"
    );
}

#[test]
fn help_lists_every_command_and_each_command_its_flags() {
    let (code, out, err) = afinar(&["--help"]);
    assert_eq!(code, 0, "{err}");
    for c in [
        "info",
        "generate",
        "chat",
        "data",
        "score",
        "train",
        "eval",
        "quickstart",
        "serve",
        "export",
        "bench",
    ] {
        assert!(out.contains(&format!("\n  {c} ")), "{c} missing: {out}");
    }
    for (args, flag) in [
        (&["data", "prepare", "--help"][..], "--split-key"),
        (&["data", "inspect", "--help"][..], "--split"),
        (&["bench", "infer", "--help"][..], "--runs"),
        (&["bench", "train", "--help"][..], "--targets"),
        (&["eval", "--help"][..], "--compare-base"),
        (&["generate", "--help"][..], "--allowed-scripts"),
        (&["serve", "--help"][..], "--max-body-bytes"),
        (&["train", "--help"][..], "--resume"),
        (&["quickstart", "--help"][..], "--eval-limit"),
        (&["export", "--help"][..], "--overwrite"),
        (&["train", "--help"][..], "--device"),
        (&["serve", "--help"][..], "--cors"),
        (&["data", "prepare", "--help"][..], "--max-record-mb"),
    ] {
        let (code, out, err) = afinar(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(flag), "{args:?} lacks {flag}: {out}");
    }
}

#[test]
fn the_exit_status_says_what_kind_of_problem_it_was() {
    let (code, _, _) = afinar(&[
        "generate",
        "--model",
        tiny_spec(),
        "--prompt",
        "hi",
        "--top-p",
        "2",
    ]);
    assert_eq!(code, 2, "a bad flag value");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("notes.gguf");
    std::fs::write(&fake, "this is just text\n").unwrap();
    let (code, _, _) = afinar(&["info", "--model", fake.to_str().unwrap()]);
    assert_eq!(code, 3, "a bad input file");
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"q\": 1}\n").unwrap();
    let (code, _, err) = afinar(&[
        "data",
        "prepare",
        "--model",
        tiny_spec(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "a dataset with nothing usable: {err}");
}
