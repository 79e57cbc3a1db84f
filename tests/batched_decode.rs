//! Batched inference (`model::decode::forward_rows`, what the server's continuous batching runs):
//! sequences of different lengths, on the base model and on an adapter, joining and leaving the
//! batch at different steps, get token for token what each gets alone; a prompt fed in chunks
//! (or partly from another sequence's cache) gives bit for bit the logits of one pass; and each
//! row's logits match the ordinary forward pass. On the tiny Qwen2 fixture (biases on q/k/v, tied head) with
//! its real LoRA adapter, with the base held in f32 and in bf16.

mod common;

use afinar::infer::sampling::argmax;
use afinar::model::decode::{forward_rows, Row};
use afinar::model::transformer::Cache;
use afinar::model::{BaseDtype, Model};
use candle_core::{Device, Tensor};

fn models(dtype: BaseDtype) -> (Model, Model) {
    let base = Model::load_with(common::tiny_spec(), &Device::Cpu, dtype).unwrap();
    let mut tuned = base.clone();
    let dir = common::root().join("tests/fixtures/tiny-qwen2-lora");
    afinar::export::peft::load(&dir, &mut tuned.transformer, common::tiny_spec()).unwrap();
    (base, tuned)
}

fn prompts(m: &Model) -> Vec<Vec<u32>> {
    [
        "hello",
        "the quick brown fox jumps over the lazy dog, twice",
        "a b c",
        "once upon a time there was a model",
    ]
    .iter()
    .map(|t| m.tokenizer.encode(t, true).unwrap())
    .collect()
}

/// Prefill with the ordinary pass; the first greedy token.
fn prefill(m: &Model, prompt: &[u32], cache: &mut Cache) -> u32 {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<f32> = m
        .transformer
        .forward_last(&ids, Some(cache))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    argmax(&logits)
}

const STEPS: usize = 12;

/// One pass of `forward_rows`: (model, tokens, cache) per row, logits after each row's last token.
fn pass(base: &Model, rows: Vec<(&Model, &[u32], &mut Cache)>) -> Vec<Vec<f32>> {
    let mut rows: Vec<Row> = rows
        .into_iter()
        .map(|(m, tokens, cache)| Row {
            model: &m.transformer,
            tokens,
            cache,
            logits: true,
        })
        .collect();
    forward_rows(&base.transformer, &mut rows)
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect()
}

/// Greedy tokens of one sequence decoded alone (a batch of one).
fn alone(base: &Model, m: &Model, prompt: &[u32]) -> Vec<u32> {
    let mut cache = Cache::new(&m.transformer);
    let mut tok = prefill(m, prompt, &mut cache);
    let mut out = vec![tok];
    for _ in 0..STEPS {
        tok = argmax(&pass(base, vec![(m, &[tok], &mut cache)])[0]);
        out.push(tok);
    }
    out
}

#[test]
fn batched_rows_equal_each_row_alone_for_base_and_adapter() {
    for dtype in [BaseDtype::F32, BaseDtype::Bf16] {
        let (base, tuned) = models(dtype);
        let ps = prompts(&base);
        // (model, prompt, step at which it joins): rows join late, and finish at different steps.
        let plan: Vec<(&Model, &Vec<u32>, usize)> = vec![
            (&base, &ps[0], 0),
            (&tuned, &ps[1], 0),
            (&base, &ps[2], 3),
            (&tuned, &ps[0], 5),
            (&tuned, &ps[3], 1),
            (&base, &ps[1], 0),
        ];
        let want: Vec<Vec<u32>> = plan.iter().map(|(m, p, _)| alone(&base, m, p)).collect();
        // Each must differ from the others somewhere, or the test proves little.
        assert_ne!(want[0], want[3], "{dtype:?}: the adapter changes nothing");
        let mut caches: Vec<Cache> = plan
            .iter()
            .map(|(m, _, _)| Cache::new(&m.transformer))
            .collect();
        let mut got: Vec<Vec<u32>> = vec![vec![]; plan.len()];
        for step in 0..STEPS + 6 {
            // Joiners prefill now; everyone running decodes one token together.
            for (i, (m, p, join)) in plan.iter().enumerate() {
                if *join == step {
                    got[i].push(prefill(m, p, &mut caches[i]));
                }
            }
            let mut who = vec![];
            let mut rows = vec![];
            let last: Vec<[u32; 1]> = got
                .iter()
                .map(|g| [g.last().copied().unwrap_or(0)])
                .collect();
            for (i, c) in caches.iter_mut().enumerate() {
                let (m, _, join) = plan[i];
                if join <= step && got[i].len() <= STEPS {
                    who.push(i);
                    rows.push((m, &last[i][..], c));
                }
            }
            let logits = pass(&base, rows);
            for (i, l) in who.into_iter().zip(logits) {
                got[i].push(argmax(&l));
            }
        }
        assert_eq!(got, want, "{dtype:?}");
    }
}

#[test]
fn a_prompt_in_chunks_or_from_a_copied_prefix_gives_the_same_logits_bit_for_bit() {
    for dtype in [BaseDtype::F32, BaseDtype::Bf16] {
        let (base, tuned) = models(dtype);
        let p = &prompts(&base)[1];
        for m in [&base, &tuned] {
            let mut whole = Cache::new(&m.transformer);
            let want = pass(&base, vec![(m, p, &mut whole)]).remove(0);
            // In chunks of 3, each chunk batched with another sequence's decoding step.
            let mut chunked = Cache::new(&m.transformer);
            let mut other = Cache::new(&base.transformer);
            pass(&base, vec![(&base, &p[..2], &mut other)]);
            let mut got = vec![];
            for c in p.chunks(3) {
                got = pass(&base, vec![(&base, &[7], &mut other), (m, c, &mut chunked)]).remove(1);
            }
            assert_eq!(got, want, "{dtype:?} chunked");
            // The first 5 tokens' keys and values copied from the whole pass's cache.
            let mut copied = Cache::new(&m.transformer);
            copied.copy_prefix_from(&whole, 5).unwrap();
            let got = pass(&base, vec![(m, &p[5..], &mut copied)]).remove(0);
            assert_eq!(got, want, "{dtype:?} from a copied prefix");
        }
    }
}

#[test]
fn a_decoded_row_matches_the_ordinary_forward_pass() {
    for dtype in [BaseDtype::F32, BaseDtype::Bf16] {
        let (base, tuned) = models(dtype);
        let ps = prompts(&base);
        for m in [&base, &tuned] {
            let p = &ps[1];
            // The ordinary pass over the whole prompt: the last position's logits.
            let ids = Tensor::new(p.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want: Vec<f32> = m
                .transformer
                .forward_last(&ids, None)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            // All but the last token by the ordinary pass, the last one batched with another row.
            let mut cache = Cache::new(&m.transformer);
            prefill(m, &p[..p.len() - 1], &mut cache);
            let mut other = Cache::new(&base.transformer);
            prefill(&base, &ps[3], &mut other);
            let got = &pass(
                &base,
                vec![
                    (&base, &[5], &mut other),
                    (m, &p[p.len() - 1..], &mut cache),
                ],
            )[1];
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{dtype:?}: max |Δlogit| {err}");
        }
    }
}

/// Timings of a decoding step at several batch sizes and of a 40-token prefill on the default
/// model (not a test: `cargo test --release --test batched_decode -- --ignored --nocapture`).
#[test]
#[ignore]
fn step_timings() {
    let m = common::smollm2();
    let prompt: Vec<u32> = m.tokenizer.encode("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined movable metal type, oil-based ink and a wooden press adapted from those used for wine.", true).unwrap();
    let prompt = &prompt.repeat(3)[..40];
    for _ in 0..2 {
        let mut cache = Cache::new(&m.transformer);
        let t = std::time::Instant::now();
        prefill(m, prompt, &mut cache);
        eprintln!(
            "prefill 40 (ordinary pass): {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let mut cache = Cache::new(&m.transformer);
        let t = std::time::Instant::now();
        pass(m, vec![(m, prompt, &mut cache)]);
        eprintln!(
            "prefill 40 (rows): {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    for b in [1usize, 4, 8, 16] {
        let mut caches: Vec<Cache> = (0..b).map(|_| Cache::new(&m.transformer)).collect();
        for c in caches.iter_mut() {
            prefill(m, prompt, c);
        }
        let t = std::time::Instant::now();
        let steps = 8;
        for _ in 0..steps {
            pass(m, caches.iter_mut().map(|c| (m, &[5u32][..], c)).collect());
        }
        let dt = t.elapsed().as_secs_f64() / steps as f64;
        eprintln!(
            "batch {b}: {:.1} ms/step, {:.0} tokens/s",
            dt * 1e3,
            b as f64 / dt
        );
    }
}
