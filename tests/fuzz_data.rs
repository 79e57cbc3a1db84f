//! Seeded fuzzing of dataset inputs: a few hundred mutations (flipped, inserted, deleted and
//! duplicated bytes, truncations, stray quotes, braces, NULs and invalid UTF-8) of JSONL, JSON,
//! CSV, TSV, text, gzip, zstd and Parquet files, each prepared with the tiny fixture's tokenizer.
//! Every case must end in a result or a one-line error — no panic, no abort (the address space
//! is capped so a runaway allocation fails the run), and no hang (a watchdog fails a case that
//! runs for minutes). Same seed, same cases: a failure names its seed and file to reproduce.

mod common;

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use afinar::data::{self, PrepareOptions, SplitFractions};
use afinar::rng::Rng;
use common::{conjugation_head, root, tiny_text, write};

/// Cases per base file.
const CASES: usize = 40;

fn base_files() -> Vec<(&'static str, Vec<u8>)> {
    let jsonl = conjugation_head(12);
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(["instruction", "input", "output"])
        .unwrap();
    for r in &rows {
        let f = |k: &str| r[k].as_str().unwrap().to_string();
        csv.write_record([f("instruction"), f("input"), f("output")])
            .unwrap();
    }
    let csv = csv.into_inner().unwrap();
    let chat = br#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
{"prompt": "The sky is", "completion": " blue."}
{"text": "Plain text for continued pre-training."}
"#
    .to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(jsonl.as_bytes()).unwrap();
    let mut zst = Vec::new();
    ruzstd::encoding::compress(
        jsonl.as_bytes(),
        &mut zst,
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    vec![
        ("a.jsonl", jsonl.clone().into_bytes()),
        ("chat.jsonl", chat),
        ("a.json", serde_json::to_vec_pretty(&rows).unwrap()),
        ("a.csv", csv.clone()),
        (
            "a.tsv",
            String::from_utf8(csv)
                .unwrap()
                .replace(',', "\t")
                .into_bytes(),
        ),
        ("a.txt", b"A short story.\nIt has two lines.\n".to_vec()),
        ("a.jsonl.gz", gz.finish().unwrap()),
        ("a.jsonl.zst", zst),
        (
            "a.parquet",
            std::fs::read(root().join("tests/fixtures/data/alpaca.parquet")).unwrap(),
        ),
    ]
}

/// One seeded mutation of `bytes`.
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    const NASTY: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b"\n",
        b"\r\n",
        b"\t",
        b"\0",
        b"\xff",
        b"\xc3",
        b"\xef\xbb\xbf",
        b"\\",
        b"null",
        b"1e999",
        b"-0",
        b"\"\"\"",
    ];
    let mut v = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = if v.is_empty() {
            0
        } else {
            rng.below(v.len() as u64) as usize
        };
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 => {
                let n = NASTY[rng.below(NASTY.len() as u64) as usize];
                v.splice(at..at, n.iter().copied());
            }
            2 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16) as usize).min(v.len());
                v.drain(at..end);
            }
            3 => v.truncate(at),
            4 if !v.is_empty() => {
                let end = (at + 1 + rng.below(64) as usize).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ => {
                let b = rng.below(256) as u8;
                v.insert(at.min(v.len()), b);
            }
        }
    }
    v
}

#[test]
fn mutated_inputs_end_in_a_result_or_a_one_line_error() {
    common::cap_memory(8 << 30);
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_text();
    let (mut ok, mut errors) = (0, 0);
    for (name, base) in base_files() {
        for case in 0..CASES {
            let seed = 1_000 * name.len() as u64 + case as u64;
            let mut rng = Rng::new(seed);
            let bytes = mutate(&base, &mut rng);
            let path = write(dir.path(), name, &bytes);
            for strict in [false, true] {
                let opts = PrepareOptions {
                    data: vec![path.clone()],
                    split: SplitFractions([0.8, 0.1, 0.1]),
                    max_seq_len: 64,
                    strict,
                    ..Default::default()
                };
                let t = Instant::now();
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| data::prepare(&opts, text)));
                let took = t.elapsed();
                assert!(
                    took < Duration::from_secs(60),
                    "{name} seed {seed}: {took:?} (a hang?)"
                );
                match result {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => {
                        let msg = e.to_string();
                        assert!(
                            !msg.is_empty() && !msg.contains('\n'),
                            "{name} seed {seed} strict {strict}: not one line: {msg:?}"
                        );
                        errors += 1;
                    }
                    Err(_) => panic!("{name} seed {seed} strict {strict}: panicked"),
                }
            }
        }
    }
    // Both outcomes occur: the mutations neither all break the files nor all leave them valid.
    assert!(ok > 50 && errors > 50, "{ok} prepared, {errors} errors");
}
