//! Evaluation and the quickstart on the real default model: batched greedy decoding agrees with
//! one-at-a-time decoding, `--allowed-scripts` keeps other scripts out, a shortened quickstart
//! writes its files and improves test loss, and bad inputs give clear errors.

mod common;

use std::collections::BTreeMap;

use afinar::eval::{report, DriftSummary, EvalReport, Scores};
use afinar::infer::batch::greedy_batch;
use afinar::infer::scripts::{parse_scripts, scripts_in, ScriptFilter};
use afinar::infer::{generate, GenerateOptions};
use afinar::model::Message;
use common::{afinar, root, smollm2, write_conjugation};

fn chat_prompt(text: &str) -> Vec<u32> {
    smollm2()
        .encode_chat(&[Message::new("user", text)], true)
        .unwrap()
}

#[test]
fn batched_greedy_equals_one_prompt_at_a_time() {
    let model = smollm2();
    // Different lengths, so the batch is left-padded.
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea, please, in simple words.",
    ]
    .iter()
    .map(|p| chat_prompt(p))
    .collect();
    let batched = greedy_batch(model, &prompts, 12, 8, None, |_| {}).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    for (p, b) in prompts.iter().zip(&batched) {
        let single = generate(model, p, &opts, |_| {}).unwrap();
        assert_eq!(single.tokens, b.tokens, "{:?} vs {:?}", single.text, b.text);
    }
}

#[test]
fn allowed_scripts_keep_han_out_of_the_answer() {
    let model = smollm2();
    let prompt = chat_prompt("Write the Chinese word for water.");
    let opts = GenerateOptions {
        max_new_tokens: 30,
        ..Default::default()
    };
    let free = generate(model, &prompt, &opts, |_| {}).unwrap();
    // Without the option this model writes Han here; otherwise the test proves nothing.
    assert!(scripts_in(&free.text).contains("Han"), "{}", free.text);
    let filter = ScriptFilter::new(&model.tokenizer, parse_scripts("Latin").unwrap());
    let opts = GenerateOptions {
        scripts: Some(std::sync::Arc::new(filter)),
        ..opts
    };
    let kept = generate(model, &prompt, &opts, |_| {}).unwrap();
    assert!(!kept.text.is_empty());
    assert!(
        scripts_in(&kept.text).iter().all(|s| *s == "Latin"),
        "{}",
        kept.text
    );
    // The batched path (evaluation) applies it too.
    let filter = ScriptFilter::new(&model.tokenizer, parse_scripts("Latin").unwrap());
    let b = greedy_batch(model, &[prompt], 30, 4, Some(&filter), |_| {}).unwrap();
    assert!(scripts_in(&b[0].text).iter().all(|s| *s == "Latin"));
}

fn scores(loss: f64, exact_match: f64) -> Scores {
    Scores {
        model: "m".into(),
        adapter: None,
        metrics: BTreeMap::from([("loss".into(), loss), ("exact_match".into(), exact_match)]),
        counts: BTreeMap::from([("loss".into(), 100), ("exact_match".into(), 4)]),
        script_drift: DriftSummary::default(),
        seconds: 1.0,
    }
}

#[test]
fn eval_table_shows_both_models_and_the_change() {
    let r = EvalReport {
        results: BTreeMap::from([
            ("base".to_string(), scores(2.5, 0.25)),
            ("tuned".to_string(), scores(1.25, 0.75)),
        ]),
        examples: vec![],
        settings: serde_json::json!({}),
        training_curve: vec![],
    };
    let t = report::table(&r);
    let row = |name: &str| -> Vec<String> {
        let line = t
            .lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no {name} row in {t}"));
        line.split(['│', '┆'])
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    assert_eq!(row("metric"), ["metric", "base", "tuned", "change"], "{t}");
    assert_eq!(row("loss"), ["loss", "2.5000", "1.2500", "-1.250"], "{t}");
    assert_eq!(
        row("exact_match"),
        ["exact_match", "25.0%", "75.0%", "+50.0 pt"],
        "{t}"
    );
    // Generation ran, so drift is shown too.
    assert_eq!(row("script_drift")[1], "0.0%", "{t}");
    assert!(t.trim_end().ends_with("ROUGE-L 0–1)"), "{t}");
}

#[test]
fn shortened_quickstart_then_eval_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("conj.jsonl");
    write_conjugation(&data, 0..240);
    let out = dir.path().join("run");
    let (code, stdout, err) = afinar(&[
        "quickstart",
        "--steps",
        "4",
        "--eval-limit",
        "6",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "max_seq_len=128",
        "--set",
        "eval_batches=1",
    ]);
    assert_eq!(code, 0, "{err}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "report.html",
        "eval.json",
        "eval/examples.jsonl",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // The follow-up commands run as printed: no `afinar` on PATH is this build, so they start
    // with its path.
    let exe = env!("CARGO_BIN_EXE_afinar");
    let chat = format!(
        "  {exe} chat --model smollm2 --adapter {}",
        out.join("adapter").display()
    );
    assert!(stdout.contains(&chat), "{chat:?} not in {stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let (base, tuned) = (&v["base"]["metrics"], &v["tuned"]["metrics"]);
    let (bl, tl) = (
        base["loss"].as_f64().unwrap(),
        tuned["loss"].as_f64().unwrap(),
    );
    assert!(tl < bl, "tuned test loss {tl} should be below base {bl}");
    let em = tuned["exact_match"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&em));
    assert_eq!(v["tuned"]["counts"]["exact_match"], 6);
    let examples = std::fs::read_to_string(out.join("eval/examples.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(examples.lines().next().unwrap()).unwrap();
    assert!(first["outputs"]["base"].is_string() && first["outputs"]["tuned"].is_string());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("exact_match") && !html.contains("<script"));

    // `afinar eval` on the run's adapter: data settings come from the run.
    let adapter = out.join("adapter");
    let json = dir.path().join("e.json");
    let (code, table, err) = afinar(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--compare-base",
        "--limit",
        "3",
        "--max-new-tokens",
        "8",
        "--metrics",
        "loss,exact_match,rouge_l",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("base") && table.contains("tuned"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["base"]["metrics"]["rouge_l"].is_number(), "{v}");
    assert_eq!(v["settings"]["split"], "test");
    // Same split as the quickstart: the same tuned loss.
    let again = v["tuned"]["metrics"]["loss"].as_f64().unwrap();
    assert!((again - tl).abs() < 1e-4, "{again} vs {tl}");

    // An adapter that does not fit the model: both named.
    let mistral = root().join("tests/fixtures/tiny-mistral");
    let (code, _, err) = afinar(&[
        "eval",
        "--model",
        mistral.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("e2").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("adapter does not fit the model"), "{err}");
    assert!(err.contains(mistral.to_str().unwrap()), "{err}");
    assert!(err.contains(adapter.to_str().unwrap()), "{err}");

    // A metric that does not exist: the valid ones are listed.
    let (code, _, err) = afinar(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--metrics",
        "loss,bleu",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown metric \"bleu\""), "{err}");
    assert!(err.contains("exact_match") && err.contains("chrf"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A split that does not exist: the valid ones are listed.
    let (code, _, err) = afinar(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--split",
        "dev",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown split \"dev\"") && err.contains("validation"),
        "{err}"
    );

    // An empty test split (asked for: a file alone is evaluated whole).
    let tiny = dir.path().join("tiny.jsonl");
    write_conjugation(&tiny, 0..2);
    let (code, _, err) = afinar(&[
        "eval",
        "--data",
        tiny.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        dir.path().join("e3").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("test split") && err.contains("is empty"),
        "{err}"
    );
}
