//! Model files are untrusted input: seeded mutations of the default GGUF's header and metadata
//! (bytes flipped in the header, known numeric fields — counts, lengths, ids, dimensions,
//! alignment — set to hostile values, truncations) and of chat templates (real templates
//! mutated, plus hostile ones that loop, double strings or lists, or recurse). Every case must
//! end in a result or a one-line error — no panic, no abort (the address space is capped so a
//! runaway allocation fails the run), no hang (a watchdog fails a case that runs for minutes).
//! Same seed, same cases: a failure names its seed to reproduce.
//!
//! The GGUF cases run `gguf::inspect` (header, metadata, configuration, tokenizer, template:
//! everything `Model::load` checks before reading a weight) on a sparse copy of the file whose
//! tensor data is holes, so a case costs milliseconds; a handful run the full `Model::load`.
//! Below them, one test per defect found by probing, feeding the exact input.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use afinar::model::chat_template::{ChatTemplate, Message, RenderLimits};
use afinar::model::{gguf, Model, TextSide};
use afinar::rng::Rng;
use candle_core::Device;

/// Runs `f`, failing the test on a panic or on a run longer than the watchdog; returns the
/// error message (checked to be one line) or `None` on success.
fn one_line_or_ok<T>(label: &str, f: impl FnOnce() -> afinar::Result<T>) -> Option<String> {
    let t = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "{label}: {took:?} (a hang?)"
    );
    if took > Duration::from_millis(500) {
        eprintln!("{label}: {took:?}");
    }
    match result {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "{label}: not one line: {:?}",
                msg.chars().take(2000).collect::<String>()
            );
            Some(msg)
        }
        Err(_) => panic!("{label}: panicked"),
    }
}

// ---------------------------------------------------------------------------------------------
// A small GGUF header walker (test side), to find where each key's value and each tensor's
// fields lie so mutations can target them.

#[derive(Debug, Clone)]
struct Kv {
    key: String,
    /// Offset of the value type (u32), then the value.
    type_at: usize,
    value_type: u32,
    end: usize,
}

#[derive(Debug, Clone)]
struct Field {
    at: usize,
    width: usize,
}

struct Layout {
    kvs: Vec<Kv>,
    /// Offsets of tensor dims, dtypes and data offsets.
    tensor_fields: Vec<Field>,
    /// End of the tensor table (the header).
    end: usize,
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn skip_value(b: &[u8], at: usize, t: u32) -> usize {
    match t {
        0 | 1 | 7 => at + 1,
        2 | 3 => at + 2,
        4..=6 => at + 4,
        10..=12 => at + 8,
        8 => at + 8 + rd_u64(b, at) as usize,
        9 => {
            let (et, n) = (rd_u32(b, at), rd_u64(b, at + 4));
            let mut p = at + 12;
            for _ in 0..n {
                p = skip_value(b, p, et);
            }
            p
        }
        _ => panic!("unknown type {t}"),
    }
}

fn layout(b: &[u8]) -> Layout {
    let (nt, nkv) = (rd_u64(b, 8), rd_u64(b, 16));
    let mut p = 24;
    let mut kvs = Vec::new();
    for _ in 0..nkv {
        let klen = rd_u64(b, p) as usize;
        let key = String::from_utf8_lossy(&b[p + 8..p + 8 + klen]).into_owned();
        let type_at = p + 8 + klen;
        let value_type = rd_u32(b, type_at);
        let end = skip_value(b, type_at + 4, value_type);
        kvs.push(Kv {
            key,
            type_at,
            value_type,
            end,
        });
        p = end;
    }
    let mut tensor_fields = Vec::new();
    for _ in 0..nt {
        p += 8 + rd_u64(b, p) as usize;
        let nd = rd_u32(b, p) as usize;
        tensor_fields.push(Field { at: p, width: 4 });
        p += 4;
        for _ in 0..nd {
            tensor_fields.push(Field { at: p, width: 8 });
            p += 8;
        }
        tensor_fields.push(Field { at: p, width: 4 });
        tensor_fields.push(Field {
            at: p + 4,
            width: 8,
        });
        p += 12;
    }
    Layout {
        kvs,
        tensor_fields,
        end: p,
    }
}

/// The default GGUF's header bytes, their layout and the file's full length.
fn base() -> &'static (Vec<u8>, Layout, u64) {
    static BASE: OnceLock<(Vec<u8>, Layout, u64)> = OnceLock::new();
    BASE.get_or_init(|| {
        use std::io::Read;
        let path = common::smollm2_path();
        let len = std::fs::metadata(&path).unwrap().len();
        let mut head = vec![0u8; 16 << 20];
        let mut f = std::fs::File::open(&path).unwrap();
        let n = f.read(&mut head).unwrap();
        let mut got = n;
        while got < head.len() {
            let k = f.read(&mut head[got..]).unwrap();
            if k == 0 {
                break;
            }
            got += k;
        }
        let l = layout(&head[..got]);
        head.truncate(l.end);
        (head, l, len)
    })
}

/// Writes `header` followed by holes standing for the tensor data (a sparse file: no disk used,
/// nothing to read), `extra` bytes longer or shorter than the original data region.
fn write_sparse(dir: &Path, name: &str, header: &[u8], data_len_delta: i64) -> PathBuf {
    let (orig, _, len) = base();
    let data = *len as i64 - orig.len() as i64 + data_len_delta;
    let path = dir.join(name);
    std::fs::write(&path, header).unwrap();
    let total = (header.len() as i64 + data.max(0)) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(total.max(header.len() as u64))
        .unwrap();
    path
}

/// The header with `key`'s value replaced by `value_type` and `value` bytes; the length change
/// is kept a multiple of 32 so the data section stays aligned.
fn set_kv(key: &str, value_type: u32, value: &[u8]) -> (Vec<u8>, i64) {
    let (orig, l, _) = base();
    let kv = l
        .kvs
        .iter()
        .find(|k| k.key == key)
        .unwrap_or_else(|| panic!("no {key}"));
    let mut out = orig[..kv.type_at].to_vec();
    out.extend_from_slice(&value_type.to_le_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(&orig[kv.end..]);
    // The data region is unchanged; 64 bytes of slack cover the new padding before it.
    (out, 64)
}

/// The header with a new key inserted first.
fn insert_kv(key: &str, value_type: u32, value: &[u8]) -> (Vec<u8>, i64) {
    let (orig, _, _) = base();
    let mut out = orig[..24].to_vec();
    out[16..24].copy_from_slice(&(rd_u64(orig, 16) + 1).to_le_bytes());
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&value_type.to_le_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(&orig[24..]);
    // The data region is unchanged; 64 bytes of slack cover the new padding before it.
    (out, 64)
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// One seeded mutation of the header.
fn mutate_gguf(rng: &mut Rng) -> (Vec<u8>, i64) {
    let (orig, l, _) = base();
    let mut v = orig.clone();
    let mut delta = 0i64;
    const HOSTILE: &[u64] = &[
        0,
        1,
        2,
        3,
        31,
        33,
        255,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 40,
        u64::MAX,
        u64::MAX - 7,
    ];
    let put = |v: &mut Vec<u8>, at: usize, width: usize, x: u64| {
        if at + width <= v.len() {
            v[at..at + width].copy_from_slice(&x.to_le_bytes()[..width]);
        }
    };
    for _ in 0..1 + rng.below(3) {
        let x = HOSTILE[rng.below(HOSTILE.len() as u64) as usize];
        match rng.below(7) {
            // Tensor / metadata counts.
            0 => put(&mut v, 8 + 8 * rng.below(2) as usize, 8, x),
            // A scalar metadata value (ids, dims, counts, epsilons, RoPE base…), or the length
            // of a string / array.
            1 | 2 => {
                let kv = &l.kvs[rng.below(l.kvs.len() as u64) as usize];
                let at = kv.type_at + 4;
                match kv.value_type {
                    4 | 5 => put(&mut v, at, 4, x),
                    10 | 11 => put(&mut v, at, 8, x),
                    _ if at + 8 > v.len() => {}
                    6 => {
                        let f = [f32::NAN, 0.0, -1.0, f32::INFINITY, 1e-30, 1e30]
                            [rng.below(6) as usize];
                        v[at..at + 4].copy_from_slice(&f.to_le_bytes());
                    }
                    8 => put(&mut v, at, 8, x),
                    9 => put(&mut v, at + 4 * rng.below(2) as usize, 4, x),
                    _ => v[at] ^= 1 << rng.below(8),
                }
            }
            // A value's type.
            3 => {
                let kv = &l.kvs[rng.below(l.kvs.len() as u64) as usize];
                let t = rng.below(14);
                put(&mut v, kv.type_at, 4, t);
            }
            // A tensor's dims, dtype or offset.
            4 => {
                let f = &l.tensor_fields[rng.below(l.tensor_fields.len() as u64) as usize];
                put(&mut v, f.at, f.width, x);
            }
            // Flipped bits anywhere in the metadata before the big token arrays, or anywhere.
            5 => {
                let span = if rng.below(2) == 0 { 4096 } else { v.len() };
                if !v.is_empty() {
                    let at = rng.below(span.min(v.len()) as u64) as usize;
                    v[at] ^= 1 << rng.below(8);
                }
            }
            // Truncation of the header, or of the data.
            _ => {
                if rng.below(2) == 0 {
                    v.truncate(rng.below(v.len().max(1) as u64) as usize);
                    delta = -(1 << 40);
                } else {
                    delta = -(rng.below(1 << 20) as i64) - 1;
                }
            }
        }
    }
    (v, delta)
}

#[test]
fn mutated_gguf_headers_end_in_a_result_or_a_one_line_error() {
    common::cap_memory(8 << 30);
    let dir = tempfile::tempdir().unwrap();
    // The unmutated header inspects cleanly, so errors below come from the mutations.
    let (orig, _, _) = base();
    let clean = write_sparse(dir.path(), "clean.gguf", orig, 0);
    assert_eq!(one_line_or_ok("clean", || gguf::inspect(&clean)), None);
    let (mut ok, mut errors) = (0, 0);
    let t = Instant::now();
    for seed in 0..300u64 {
        let mut rng = Rng::new(7_000 + seed);
        let (bytes, delta) = mutate_gguf(&mut rng);
        let path = write_sparse(dir.path(), "m.gguf", &bytes, delta);
        let label = format!("gguf seed {}", 7_000 + seed);
        match one_line_or_ok(&label, || gguf::inspect(&path)) {
            None => ok += 1,
            Some(msg) => {
                assert!(
                    msg.contains("m.gguf") && msg.len() < 2000,
                    "{label}: names no file or is long: {}",
                    msg.chars().take(2000).collect::<String>()
                );
                errors += 1;
            }
        }
        // A few cases go through the text side and the full load (weights are holes: zeros).
        if seed % 60 == 0 {
            one_line_or_ok(&label, || TextSide::load(path.to_str().unwrap()));
            one_line_or_ok(&label, || Model::load(path.to_str().unwrap(), &Device::Cpu));
        }
    }
    eprintln!("{ok} inspected, {errors} errors in {:?}", t.elapsed());
    assert!(ok >= 5 && errors > 100, "{ok} inspected, {errors} errors");
}

// ---------------------------------------------------------------------------------------------
// Chat templates.

const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// Templates that loop, double, recurse or allocate without end.
const HOSTILE: &[(&str, &str)] = &[
    ("nested loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}"),
    ("silent nested loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% set x = a %}{% endfor %}{% endfor %}"),
    ("string doubling", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    ("string doubling with +", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}"),
    ("list doubling", "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}"),
    ("list doubling joined", "{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | join('') }}"),
    ("repeated big string", "{% set s = 'x' * 100000000 %}{% set ns = namespace(s=s) %}{% for i in range(10) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    ("list repeat", "{{ ([1] * 100000000) * 100000000 }}"),
    ("macro recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("macro doubling", "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ d('ab', 60) }}"),
    ("output flood", "{% for a in range(100000) %}{% for b in range(1000) %}0123456789abcdef{% endfor %}{% endfor %}"),
    ("self include", "{% include 'chat' %}"),
    ("recursive loop", "{% for m in [[[[[]]]]] recursive %}{{ loop(m) }}{{ loop([m]) }}{% endfor %}"),
    ("huge range", "{{ range(10000000000) | length }}"),
    ("big string per iteration", "{% for i in range(100000) %}{% set x = 'x' * 60000000 %}{% endfor %}"),
    ("join of repeats", "{{ (['x' * 1000000] * 1000000) | join(',') }}"),
    ("method join of repeats", "{{ ','.join(['x' * 1000000] * 1000000) }}"),
    ("replace flood", "{% set s = 'a' * 1000000 %}{{ s.replace('a', s) }}{{ s | replace('a', s) }}"),
    ("center flood", "{{ 'x'.center(100000000000) }}"),
    ("indent flood", "{{ ('x\n' * 1000) | indent(100000000) }}"),
    ("format flood", "{{ '%100000000000s' | format('x') }}"),
    ("tojson indent flood", "{{ messages | tojson(indent=100000000000) }}"),
];

fn conversation(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            Message::new(role, format!("Message number {i}: conjugate 'hablar'."))
        })
        .collect()
}

fn real_templates() -> Vec<(&'static str, String)> {
    let smollm2 = gguf::inspect(&common::smollm2_path())
        .unwrap()
        .chat_template
        .expect("SmolLM2 has a template");
    let mut v = vec![
        ("smollm2", smollm2),
        ("qwen2", QWEN2.into()),
        ("llama3", LLAMA3.into()),
        ("mistral", MISTRAL.into()),
    ];
    // The families' real templates (tests/fixtures/templates).
    for name in [
        "qwen3",
        "gemma3",
        "smollm3",
        "phi3",
        "deepseek-r1-distill-qwen",
    ] {
        let path = common::root().join(format!("tests/fixtures/templates/{name}.jinja"));
        v.push((name, std::fs::read_to_string(path).unwrap()));
    }
    v
}

/// One seeded mutation of a template's text.
fn mutate_template(t: &str, rng: &mut Rng) -> String {
    const NASTY: &[&str] = &[
        "{%",
        "%}",
        "{{",
        "}}",
        "{#",
        "#}",
        "for",
        "endfor",
        "if",
        "endif",
        " recursive",
        "loop(",
        "~",
        "+",
        "*",
        "range(",
        ")",
        "(",
        "'",
        "\"",
        "\\",
        "\n",
        "ns.s",
        "messages",
        "|join",
        "|length",
        "* 100000000",
        "{% for x in range(99999) %}",
        "{% endfor %}",
        "\u{0}",
    ];
    let mut v: Vec<char> = t.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = if v.is_empty() {
            0
        } else {
            rng.below(v.len() as u64) as usize
        };
        match rng.below(4) {
            0 if !v.is_empty() => {
                let end = (at + 1 + rng.below(12) as usize).min(v.len());
                v.drain(at..end);
            }
            1 if !v.is_empty() => {
                let end = (at + 1 + rng.below(80) as usize).min(v.len());
                let chunk: Vec<char> = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ => {
                let n = NASTY[rng.below(NASTY.len() as u64) as usize];
                v.splice(at..at, n.chars());
            }
        }
    }
    v.into_iter().collect()
}

#[test]
fn mutated_and_hostile_templates_end_in_a_result_or_a_one_line_error() {
    common::cap_memory(8 << 30);
    let messages = conversation(4);
    let (mut ok, mut errors) = (0, 0);
    for (name, source) in real_templates() {
        for case in 0..60u64 {
            let seed = 9_000 + 100 * name.len() as u64 + case;
            let mut rng = Rng::new(seed);
            let text = mutate_template(&source, &mut rng);
            let label = format!("{name} template seed {seed}");
            let result = one_line_or_ok(&label, || {
                ChatTemplate::new(&text, Some("<s>"), Some("</s>"))?
                    .with_origin("mutated.gguf (GGUF key tokenizer.chat_template)")
                    .render(&messages, true)
            });
            match result {
                None => ok += 1,
                Some(_) => errors += 1,
            }
        }
    }
    for (name, source) in HOSTILE {
        let msg = one_line_or_ok(name, || {
            ChatTemplate::new(source, None, None)?
                .with_origin("hostile.gguf (GGUF key tokenizer.chat_template)")
                .render(&messages, true)
        });
        let msg = msg.unwrap_or_else(|| panic!("{name}: rendered"));
        eprintln!("{name}: {msg}");
        assert!(
            msg.contains("hostile.gguf (GGUF key tokenizer.chat_template)")
                || msg.contains("could not parse"),
            "{name}: {msg}"
        );
    }
    assert!(ok > 20 && errors > 20, "{ok} rendered, {errors} errors");
}

#[test]
fn real_templates_render_ten_thousand_turns() {
    let messages = conversation(10_000);
    for (name, source) in real_templates() {
        let t = ChatTemplate::new(&source, Some("<s>"), Some("</s>")).unwrap();
        let out = t
            .render(&messages, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.contains("Message number 9999"), "{name}");
    }
}

#[test]
fn real_templates_render_within_a_quarter_of_their_limits() {
    // Room to spare: ordinary templates fit in a quarter of each limit, short or long.
    for (name, source) in real_templates() {
        let t = ChatTemplate::new(&source, Some("<s>"), Some("</s>")).unwrap();
        for n in [1, 2, 100, 10_000] {
            let messages = conversation(n);
            let full = RenderLimits::for_messages(&messages);
            let quarter = RenderLimits {
                fuel: full.fuel / 4,
                output_bytes: full.output_bytes / 4,
                build_bytes: full.build_bytes / 4,
            };
            t.render_with_limits(&messages, true, quarter)
                .unwrap_or_else(|e| panic!("{name}, {n} messages: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One test per defect, with the exact input.

fn inspect_err(name: &str, header: (Vec<u8>, i64)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sparse(dir.path(), name, &header.0, header.1);
    let msg = one_line_or_ok(name, || gguf::inspect(&path)).expect("an error");
    assert!(msg.contains(name), "names the file: {msg}");
    msg
}

#[test]
fn alignment_zero_is_an_error_naming_the_key() {
    // candle's reader divides by it.
    let msg = inspect_err(
        "align0.gguf",
        insert_kv("general.alignment", 4, &0u32.to_le_bytes()),
    );
    assert!(
        msg.contains("'general.alignment' = 0") && msg.contains("power of two"),
        "{msg}"
    );
    let msg = inspect_err(
        "align3.gguf",
        insert_kv("general.alignment", 4, &3u32.to_le_bytes()),
    );
    assert!(msg.contains("'general.alignment' = 3"), "{msg}");
}

#[test]
fn bos_id_beyond_the_vocabulary_is_an_error_naming_the_key() {
    let msg = inspect_err(
        "bos.gguf",
        set_kv("tokenizer.ggml.bos_token_id", 4, &49_200u32.to_le_bytes()),
    );
    assert!(
        msg.contains("'tokenizer.ggml.bos_token_id'")
            && msg.contains("49200 is outside the vocabulary of 49152"),
        "{msg}"
    );
}

#[test]
fn huge_block_count_is_an_error_naming_the_key() {
    let msg = inspect_err(
        "blocks.gguf",
        set_kv("llama.block_count", 10, &(1u64 << 40).to_le_bytes()),
    );
    assert!(
        msg.contains("'llama.block_count' = 1099511627776")
            && msg.contains("tensors for 30 blocks"),
        "{msg}"
    );
}

#[test]
fn block_count_other_than_the_tensors_present_is_an_error() {
    let msg = inspect_err(
        "fewer.gguf",
        set_kv("llama.block_count", 4, &29u32.to_le_bytes()),
    );
    assert!(
        msg.contains("'llama.block_count' = 29") && msg.contains("tensors of block 29"),
        "{msg}"
    );
    let msg = inspect_err(
        "more.gguf",
        set_kv("llama.block_count", 4, &31u32.to_le_bytes()),
    );
    assert!(
        msg.contains("'llama.block_count' = 31") && msg.contains("block 30 is missing"),
        "{msg}"
    );
}

#[test]
fn nan_or_zero_rope_theta_is_an_error_naming_the_key() {
    for (name, theta) in [("nan.gguf", f32::NAN), ("zero.gguf", 0.0)] {
        let msg = inspect_err(
            name,
            set_kv("llama.rope.freq_base", 6, &theta.to_le_bytes()),
        );
        assert!(
            msg.contains("'llama.rope.freq_base'") && msg.contains("finite positive"),
            "{msg}"
        );
    }
}

#[test]
fn looping_and_doubling_templates_from_a_gguf_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "loop.gguf",
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "template instructions",
        ),
        (
            "double.gguf",
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "more text than its budget",
        ),
    ];
    for (name, template, want) in cases {
        let (header, delta) = set_kv("tokenizer.chat_template", 8, &gguf_string(template));
        let path = write_sparse(dir.path(), name, &header, delta);
        let text = TextSide::load(path.to_str().unwrap()).unwrap();
        let t = text.chat_template.as_ref().unwrap();
        let msg = one_line_or_ok(name, || t.render(&conversation(2), true)).expect("an error");
        assert!(
            msg.contains(&format!("{name} (GGUF key tokenizer.chat_template)"))
                && msg.contains(want),
            "{msg}"
        );
    }
}

#[test]
fn unknown_pre_tokenizer_is_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let (header, delta) = set_kv("tokenizer.ggml.pre", 8, &gguf_string("mystery-bpe"));
    let path = write_sparse(dir.path(), "pre.gguf", &header, delta);
    let info = gguf::inspect(&path).unwrap();
    assert!(
        info.tokenizer
            .notes
            .iter()
            .any(|n| n.contains("'tokenizer.ggml.pre' = 'mystery-bpe'")),
        "{:?}",
        info.tokenizer.notes
    );
}
