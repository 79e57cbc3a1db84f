//! `afinar plan` against reality: its estimated peak RSS and step time are within 15 % of a
//! separate process training the same configuration (`afinar bench train`: same model, base
//! format, batch × sequence length, LoRA r=16 on all linear layers), and what it suggests when
//! a run does not fit does fit by its own model. Needs the default model (SmolLM2-135M).

mod common;

use common::{afinar_cmd, root};
use serde_json::Value;

/// Runs `afinar ARGS` and parses the JSON object it prints (after `RESULT ` for bench).
fn json_of(args: &[&str]) -> Value {
    let out = afinar_cmd().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "afinar {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = match stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")) {
        Some(line) => line.to_string(),
        None => stdout.to_string(),
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("afinar {args:?}: {e}: {stdout}"))
}

/// One measuring test at a time: timings taken while another test trains on the same cores
/// would not compare.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The plan of batch × seq over `base` and a measurement of the same in another process.
fn estimate_and_measure(base: &str, batch: usize, seq: usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (b, s) = (batch.to_string(), seq.to_string());
    let plan = json_of(&[
        "plan",
        "--base-dtype",
        base,
        "--batch-size",
        &b,
        "--max-seq-len",
        &s,
        "--tokens",
        "100000",
        "--json",
    ]);
    let bench = json_of(&[
        "bench",
        "train",
        "--base-dtype",
        base,
        "--batch",
        &b,
        "--seq",
        &s,
        "--warmup",
        "1",
        "--steps",
        "2",
        "--json",
    ]);
    let est_peak = plan["memory"]["peak"].as_f64().unwrap();
    let est_step = plan["time"]["step_s"].as_f64().unwrap();
    let real_peak = bench["peak_rss_mib"].as_f64().unwrap() * (1u64 << 20) as f64;
    let real_step = bench["step"]["median_s"].as_f64().unwrap();
    let peak_err = est_peak / real_peak - 1.0;
    let step_err = est_step / real_step - 1.0;
    eprintln!(
        "base {base}, {batch} × {seq}: peak RSS estimated {:.0} MB, measured {:.0} MB ({:+.1} %); \
         step estimated {est_step:.3} s, measured {real_step:.3} s ({:+.1} %)",
        est_peak / 1e6,
        real_peak / 1e6,
        100.0 * peak_err,
        100.0 * step_err
    );
    assert!(
        peak_err.abs() <= 0.15,
        "peak RSS off by {:+.1} %",
        100.0 * peak_err
    );
    // Step times on a shared machine move by ±15 % between runs, so time is only checked for
    // a plan that is wrong by design (the wrong compute, checkpointing's recomputation
    // forgotten): within a factor of two. The line above reports the figure.
    let ratio = est_step / real_step;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "step time off by {:+.1} %",
        100.0 * step_err
    );
    // The parts add up to the peak, and the weights are the model's as held.
    let m = &plan["memory"];
    let parts: f64 = [
        "runtime",
        "weights",
        "trainable",
        "gradients",
        "optimizer",
        "activations",
        "lm_head_block",
    ]
    .iter()
    .map(|k| m[*k].as_f64().unwrap())
    .sum();
    assert!(parts <= est_peak + 1.0, "{m}");
    assert_eq!(m["weights"], plan["weights"]["held_bytes"]);
}

#[test]
fn plan_matches_a_real_run_as_the_gguf_comes() {
    estimate_and_measure("auto", 2, 128);
}

#[test]
fn plan_matches_a_real_run_over_an_f32_base() {
    estimate_and_measure("f32", 2, 128);
}

/// With less memory than the run needs, every suggestion fits by the plan's own model, a
/// smaller micro-batch keeps the sequences per step, and a packed base is offered over f32.
/// With --data, the epoch is the prepared training split.
#[test]
fn plan_suggests_settings_that_fit() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = root().join("data/conjugation/conjugation.jsonl");
    let data = data.to_str().unwrap();
    let common_args = [
        "plan",
        "--base-dtype",
        "f32",
        "--batch-size",
        "4",
        "--max-seq-len",
        "256",
        "--calibrate-at",
        "2x128",
        "--data",
        data,
        "--json",
    ];
    let roomy = json_of(&[&common_args[..], &["--memory", "1000"]].concat());
    assert_eq!(roomy["fits"], true);
    assert_eq!(roomy["suggestions"].as_array().unwrap().len(), 0);
    let t = &roomy["time"];
    let seqs = t["sequences"].as_u64().unwrap();
    assert!(seqs > 10, "{t}");
    assert_eq!(t["steps_per_epoch"].as_u64().unwrap(), seqs.div_ceil(4));
    assert!(t["tokens"].as_u64().unwrap() > seqs * 128, "{t}");

    // Less than it needs, more than the base held as Q4_0 would need.
    let peak = roomy["memory"]["peak"].as_f64().unwrap();
    let saving =
        roomy["weights"]["f32"].as_f64().unwrap() - roomy["weights"]["q4_0"].as_f64().unwrap();
    let gb = (peak - saving / 2.0) / 1e9;
    let tight = json_of(&[&common_args[..], &["--memory", &format!("{gb:.3}")]].concat());
    assert_eq!(tight["fits"], false, "{}", tight["memory"]);
    let available = tight["available"].as_f64().unwrap();
    let sugg = tight["suggestions"].as_array().unwrap();
    assert!(!sugg.is_empty());
    for s in sugg {
        assert!(s["peak"].as_f64().unwrap() <= available, "{s}");
    }
    let sets: Vec<String> = sugg
        .iter()
        .flat_map(|s| s["set"].as_array().unwrap().iter())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(sets.contains(&"base_dtype=q4_0".to_string()), "{sets:?}");
    for s in sugg {
        let set: Vec<&str> = s["set"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let get = |k: &str| {
            set.iter()
                .find_map(|x| x.strip_prefix(k))
                .map(|v| v.parse::<usize>().unwrap())
        };
        if let Some(b) = get("batch_size=") {
            assert_eq!(b * get("grad_accum=").unwrap(), 4, "{set:?}");
        }
    }
}
