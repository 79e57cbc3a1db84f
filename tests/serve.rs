//! `afinar serve` as clients see it: the real binary on a free port, the real default model, an
//! HTTP client over loopback. OpenAI's response shapes, streaming that adds up to the
//! non-streamed answer, adapters by name, authentication, limits, and every kind of bad request
//! answered with a 4xx JSON error. One server (with an adapter) is shared by the tests that need
//! no special flags; the API-key test starts its own.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use afinar::export::peft;
use serde_json::{json, Value};

/// A running server, killed on drop; `log` collects what it prints to stderr.
struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .arg("serve")
        .args(["--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let base = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(addr) = line.trim().strip_prefix("afinar: listening on ") {
            break addr.to_string();
        }
    };
    // Keep draining stderr (so the server never blocks on a full pipe) into `log`.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in err.lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    Server { child, base, log }
}

/// (status, JSON body) of a request; 4xx/5xx are returned, not raised.
fn call(method: &str, url: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

fn chat_body(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "temperature": 0, "max_tokens": 24,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    .to_string()
}

/// The server most tests share: the default model plus a random adapter named `rand`, with a small
/// body limit so that an oversized body still fits the socket buffers and the client reads the
/// 413 instead of a broken pipe. Started once per test binary; killed when the binary exits.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter");
        common::random_adapter(&adapter, &["q_proj", "v_proj"], 1.0);
        let spec = format!("rand={}", adapter.display());
        let server = start(&[
            "--adapter",
            &spec,
            "--max-tokens",
            "64",
            "--max-body-bytes",
            "65536",
        ]);
        let pid = server.child.id() as libc::pid_t;
        SHARED_PID.store(pid, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: registers a plain extern "C" function with no captured state; it only reads an
        // atomic and sends a signal, both async-signal-safe.
        unsafe { libc::atexit(kill_shared) };
        Shared {
            server,
            adapter,
            _dir: dir,
        }
    })
}

struct Shared {
    server: Server,
    adapter: PathBuf,
    _dir: tempfile::TempDir,
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }
}

/// Statics are never dropped, so the shared server is killed when the test binary exits.
static SHARED_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_shared() {
    let pid = SHARED_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) on the pid of the child this binary started; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The chat request the tests ask: ids of the prompt and the library's own greedy answer.
fn library_answer(model: &afinar::model::Model) -> String {
    let ids = model
        .encode_chat(
            &[afinar::model::Message::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let opts = afinar::infer::GenerateOptions {
        max_new_tokens: 24,
        ..Default::default()
    };
    afinar::infer::generate(model, &ids, &opts, |_| {})
        .unwrap()
        .text
}

#[test]
fn health_and_models_by_name() {
    let s = shared();
    let (st, v) = call("GET", &s.url("/health"), None, None);
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")));
    let (st, v) = call("GET", &s.url("/v1/models"), None, None);
    assert_eq!(st, 200);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "rand"]);
}

/// Non-streaming: OpenAI's object, greedy text equal to `afinar generate`'s; streaming: SSE
/// chunks that add up to the same text, then [DONE].
#[test]
fn chat_completion_whole_and_streamed_equals_the_library() {
    let s = shared();
    let (st, v) = call(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(&chat_body("smollm2", false)),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(matches!(
        v["choices"][0]["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(text, library_answer(common::smollm2()));

    let resp = ureq::post(&s.url("/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string(&chat_body("smollm2", true))
        .unwrap();
    assert!(resp.content_type().starts_with("text/event-stream"));
    let mut streamed = String::new();
    let mut lines = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            lines.push(d.to_string());
            if d != "[DONE]" {
                let c: Value = serde_json::from_str(d).unwrap();
                assert_eq!(c["object"], "chat.completion.chunk");
                if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                    streamed.push_str(t);
                }
            }
        }
    }
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    assert!(lines.len() > 3, "several chunks: {lines:?}");
    assert_eq!(streamed, text);
}

/// The adapter by name answers exactly as the library does for base + adapter (and not as the
/// base model); an unknown name is a 404 in OpenAI's shape.
#[test]
fn adapter_by_name_and_unknown_model() {
    let s = shared();
    let (st, v) = call(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(&chat_body("rand", false)),
    );
    assert_eq!(st, 200, "{v}");
    let mut tuned = common::smollm2().clone();
    peft::load(&s.adapter, &mut tuned.transformer, "smollm2").unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(answer, library_answer(&tuned));
    assert_ne!(answer, library_answer(common::smollm2()));
    assert_eq!(v["model"], "rand");
    let (st, v) = call(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(&chat_body("gpt-4", false)),
    );
    assert_eq!(st, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
}

/// Text completions, and a stop sequence that ends the answer.
#[test]
fn text_completion_with_a_stop_sequence() {
    let s = shared();
    let body = json!({"model": "smollm2", "prompt": "One, two, three,", "max_tokens": 12,
                      "temperature": 0, "stop": [","]})
    .to_string();
    let (st, v) = call("POST", &s.url("/v1/completions"), None, Some(&body));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().contains(','),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

/// Bad requests: 4xx with a JSON error naming the problem, never a 5xx.
#[test]
fn bad_requests_get_a_4xx_json_error() {
    let s = shared();
    let url = |p: &str| s.url(p);
    let bad: &[(&str, &str)] = &[
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"messages": "hi"}"#, "must be an array"),
        (r#"{"messages": []}"#, "is empty"),
        (
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            "unknown role",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            "must be a string",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            "must be a number",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 9}"#,
            "between 0 and 2",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#,
            "max_tokens",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e300}"#,
            "max_tokens",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "top_p": 0}"#,
            "top_p",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 17}"#,
            "from 1 to 16",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
            "true or false",
        ),
    ];
    for (body, want) in bad {
        let (st, v) = call("POST", &url("/v1/chat/completions"), None, Some(body));
        assert_eq!(st, 400, "{body} → {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
    }
    // Prompt + max_tokens beyond the context.
    let long = "word ".repeat(9000);
    let body =
        json!({"messages": [{"role": "user", "content": long}], "max_tokens": 64}).to_string();
    let (st, v) = call("POST", &url("/v1/chat/completions"), None, Some(&body));
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("context"),
        "{v}"
    );
    // A body over the limit is refused (4xx).
    let huge = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(100_000));
    let (st, v) = call("POST", &url("/v1/completions"), None, Some(&huge));
    assert_eq!(st, 413, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{v}"
    );
    // Unknown endpoint.
    let (st, v) = call("GET", &url("/v1/nothing"), None, None);
    assert_eq!(st, 404);
    assert!(v["error"]["message"].is_string());
}

/// Several clients at once: all served.
#[test]
fn several_clients_at_once() {
    let s = shared();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let u = s.url("/v1/chat/completions");
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": format!("Count to {}", i + 2)}],
                                  "max_tokens": 8, "temperature": 0}).to_string();
                call("POST", &u, None, Some(&body)).0
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
}

/// Continuous batching: requests of different lengths, on the base model and on the adapter,
/// sent all at once get token for token the answers each gets alone; `/metrics` shows that they
/// were decoded together (steps of more than one sequence) and counts every token.
#[test]
fn batched_answers_equal_each_alone_and_metrics_count_them() {
    let s = shared();
    let asks: Vec<(&str, &str, u64)> = vec![
        ("smollm2", "What is the capital of France?", 24),
        ("rand", "Name three colours.", 16),
        (
            "smollm2",
            "Write one sentence about the sea, please, in plain words.",
            32,
        ),
        ("rand", "What is the capital of France?", 24),
        ("smollm2", "Count to five.", 20),
        ("smollm2", "Name three colours.", 12),
    ];
    let ask = |(model, q, n): (&str, &str, u64)| {
        let body = json!({"model": model, "temperature": 0, "max_tokens": n,
                          "messages": [{"role": "user", "content": q}]})
        .to_string();
        let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
        assert_eq!(st, 200, "{v}");
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let alone: Vec<(String, u64)> = asks.iter().map(|a| ask(*a)).collect();
    let before = metric(&s.url("/metrics"), "afinar_completion_tokens_total");
    let together: Vec<(String, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = asks.iter().map(|a| sc.spawn(move || ask(*a))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    let text = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let after = metric(&s.url("/metrics"), "afinar_completion_tokens_total");
    let sent: u64 = together.iter().map(|(_, n)| n).sum();
    assert!(
        after - before >= sent,
        "{before} → {after}, {sent} sent\n{text}"
    );
    // Steps that decoded one sequence are fewer than all steps: some decoded several at once.
    let ones = metric(&s.url("/metrics"), "afinar_batch_size_bucket{le=\"1\"}");
    let all = metric(&s.url("/metrics"), "afinar_batch_size_count");
    assert!(ones < all, "no batched step:\n{text}");
    assert!(text.contains("# TYPE afinar_time_to_first_token_seconds histogram"));
}

/// `response_format`: 20 sampled answers (temperature 1, seeded) under a JSON schema all parse
/// and validate; `json_object` gives an object; a schema the engine rejects is a 400 naming
/// `response_format`.
#[test]
fn json_schema_answers_always_parse_and_validate() {
    let s = shared();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..20)
            .map(|seed| {
                let schema = schema.clone();
                sc.spawn(move || {
                    let body = json!({
                        "model": if seed % 2 == 0 { "smollm2" } else { "rand" },
                        "temperature": 1, "seed": seed, "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "person", "schema": schema}}
                    })
                    .to_string();
                    let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
                    assert_eq!(st, 200, "{v}");
                    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
                    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
                    serde_json::from_str::<Value>(text)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        let o = a
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {a}"));
        assert!(
            o.keys()
                .all(|k| ["name", "age", "ok"].contains(&k.as_str())),
            "{a}"
        );
        assert!(o["name"].as_str().unwrap().chars().count() <= 10, "{a}");
        let age = o["age"].as_i64().unwrap_or_else(|| panic!("age: {a}"));
        assert!((0..=120).contains(&age), "{a}");
        assert!(o.get("ok").is_none_or(Value::is_boolean), "{a}");
    }
    // Not all the same answer: sampling still samples.
    assert!(answers.iter().any(|a| a != &answers[0]));
    let body = json!({"temperature": 0, "max_tokens": 48,
                      "messages": [{"role": "user", "content": "Give me a JSON object about Paris."}],
                      "response_format": {"type": "json_object"}})
    .to_string();
    let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    let body = json!({"messages": [{"role": "user", "content": "hi"}],
                      "response_format": {"type": "json_schema", "json_schema":
                          {"name": "x", "schema": {"type": "string", "pattern": "(("}}}})
    .to_string();
    let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format", "{v}");
}

/// `logprobs`: a completion's token log-probabilities equal `afinar score`'s over the same
/// tokens, the greedy token tops its alternatives, and chat
/// answers carry them per token. Presence and frequency penalties change a repetitive answer.
#[test]
fn logprobs_equal_the_library_and_penalties_apply() {
    let s = shared();
    let m = common::smollm2();
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
                      "logprobs": 3})
    .to_string();
    let (st, v) = call("POST", &s.url("/v1/completions"), None, Some(&body));
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let got: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    // The library's greedy tokens and one forward pass over prompt + answer.
    let prompt = m
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let opts = afinar::infer::GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let g = afinar::infer::generate(m, &prompt, &opts, |_| {}).unwrap();
    assert_eq!(got.len(), g.tokens.len(), "{v}");
    // `afinar score` of prompt + answer: its log-probability of each answer token.
    let ids: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
    let scored = afinar::infer::score::score_ids(m, ids).unwrap();
    for (i, &tok) in g.tokens.iter().enumerate() {
        let want = scored.logprobs[prompt.len() - 1 + i];
        assert_eq!(scored.ids[prompt.len() + i], tok);
        assert!(
            (got[i] - want).abs() < 2e-3,
            "token {i}: {} vs {want}",
            got[i]
        );
        // Greedy: the chosen token is the most likely of the three alternatives.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3, "{lp}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - got[i]).abs() < 1e-6, "{lp}");
    }
    // Chat: one entry per token, each with its alternatives.
    let body = json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2})
    .to_string();
    let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    assert!(
        content
            .iter()
            .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2
                && e["logprob"].as_f64().unwrap() <= 0.0),
        "{v}"
    );
    // Penalties: a repetitive answer changes.
    let ask = |p: f64| {
        let body =
            json!({"messages": [{"role": "user", "content": "Write the word cat ten times."}],
                          "max_tokens": 24, "temperature": 0, "presence_penalty": p,
                          "frequency_penalty": p})
            .to_string();
        let (st, v) = call("POST", &s.url("/v1/chat/completions"), None, Some(&body));
        assert_eq!(st, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(ask(0.0), ask(1.5));

    // logit_bias: -100 bans the greedy first token (the answer then starts with a less likely
    // one under the raw logits); +100 on a token makes every token that one.
    let complete = |bias: Value| {
        let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                          "logprobs": 1, "logit_bias": bias})
        .to_string();
        let (st, v) = call("POST", &s.url("/v1/completions"), None, Some(&body));
        assert_eq!(st, 200, "{v}");
        v["choices"][0].clone()
    };
    let banned = complete(json!({ g.tokens[0].to_string(): -100 }));
    let first = banned["logprobs"]["token_logprobs"][0].as_f64().unwrap();
    assert!(
        first < got[0] - 1e-3,
        "{banned}: {first} vs greedy {}",
        got[0]
    );
    let blue = m.tokenizer.encode(" blue", false).unwrap()[0];
    let forced = complete(json!({ blue.to_string(): 100 }));
    assert_eq!(
        forced["text"].as_str().unwrap(),
        m.tokenizer.decode(&[blue; 4], false).unwrap(),
        "{forced}"
    );
}

/// `n`: three sampled answers in one request, choice i equal to a request of its own with seed
/// + i; streamed, each choice's deltas add up to the same answer; usage counts the prompt once.
#[test]
fn n_answers_equal_separate_seeded_requests() {
    let s = shared();
    let ask = |n: u64, seed: u64, stream: bool| {
        json!({"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12,
               "temperature": 1, "seed": seed, "n": n, "stream": stream,
               "stream_options": {"include_usage": true}})
        .to_string()
    };
    let (st, v) = call(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(&ask(3, 40, false)),
    );
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    let mut tokens = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        let (_, one) = call(
            "POST",
            &s.url("/v1/chat/completions"),
            None,
            Some(&ask(1, 40 + i as u64, false)),
        );
        assert_eq!(
            c["message"]["content"], one["choices"][0]["message"]["content"],
            "choice {i}"
        );
        assert_eq!(v["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
        tokens += one["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        tokens,
        "{v}"
    );
    // Streamed: the deltas of each index add up to its answer.
    let text = ureq::post(&s.url("/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string(&ask(3, 40, true))
        .unwrap()
        .into_string()
        .unwrap();
    let mut streamed = vec![String::new(); 3];
    let mut finished = 0;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            streamed[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
            finished += usize::from(!c["finish_reason"].is_null());
        }
    }
    assert_eq!(finished, 3, "{text}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            streamed[i],
            c["message"]["content"].as_str().unwrap(),
            "choice {i}"
        );
    }
}

/// A sample's value from the Prometheus text at `url`.
fn metric(url: &str, name: &str) -> u64 {
    let text = ureq::get(url).call().unwrap().into_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
        .parse::<f64>()
        .unwrap() as u64
}

/// A streaming client that leaves after the first chunk stops its generation (its own server,
/// so the answer may be long: 64 tokens fit in the socket's buffers before the client leaves,
/// and the server would finish without ever seeing it go).
#[test]
fn a_client_leaving_mid_stream_stops_its_generation() {
    let s = start(&["--max-tokens", "4096"]);
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 4000, "temperature": 1, "seed": 3, "stream": true})
    .to_string();
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.base))
        .set("Content-Type", "application/json")
        .send_string(&body)
        .unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    drop(reader);
    let mut stopped = false;
    for _ in 0..400 {
        if s.log
            .lock()
            .unwrap()
            .contains("client went away; generation stopped after")
        {
            stopped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(stopped, "server log: {}", s.log.lock().unwrap());
}

/// The chat page: embedded, no external assets, model text never parsed as HTML.
#[test]
fn chat_page_is_self_contained() {
    let s = shared();
    let page = ureq::get(&s.url("/")).call().unwrap();
    assert!(page.content_type().starts_with("text/html"));
    let html = page.into_string().unwrap();
    assert!(html.contains("/v1/chat/completions") && html.contains("textContent"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    assert!(
        !html.contains("innerHTML"),
        "model text is never parsed as HTML"
    );
}

#[test]
fn api_key_guards_everything_but_health() {
    let s = start(&["--api-key", "sekret"]);
    let url = |p: &str| format!("{}{p}", s.base);
    assert_eq!(call("GET", &url("/health"), None, None).0, 200);
    let (st, v) = call("GET", &url("/v1/models"), None, None);
    assert_eq!(st, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(call("GET", &url("/v1/models"), Some("wrong"), None).0, 401);
    assert_eq!(call("GET", &url("/v1/models"), Some("sekret"), None).0, 200);
    let body = chat_body("smollm2", false);
    assert_eq!(
        call("POST", &url("/v1/chat/completions"), None, Some(&body)).0,
        401
    );
    assert_eq!(
        call(
            "POST",
            &url("/v1/chat/completions"),
            Some("sekret"),
            Some(&body)
        )
        .0,
        200
    );
}

/// The official `openai` Python package against the server (installed by `.ci/run`; installed
/// here with pip when missing).
#[test]
fn official_openai_python_client() {
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has("python3") {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status();
    }
    assert!(
        has("python3"),
        "the openai package is needed: python3 -m pip install openai"
    );
    let out = Command::new("python3")
        .arg(common::root().join("tests/clients/openai_client.py"))
        .arg(&shared().server.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The chat page driven in headless Chromium (Debian's `chromium` and npm's `playwright-core`,
/// both installed by `.ci/run`, which sets AFINAR_REQUIRE_WEB_TEST=1 so that missing tools fail
/// the test there instead of skipping it).
#[test]
fn chat_page_in_headless_chromium() {
    let web = common::root().join("tests/web");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = Path::new(&chromium).exists() && web.join("node_modules/playwright-core").is_dir();
    if !ready {
        assert!(
            std::env::var_os("AFINAR_REQUIRE_WEB_TEST").is_none(),
            "needs {chromium} and `npm install` in tests/web (see .ci/run)"
        );
        eprintln!("skipped: needs {chromium} and `npm install` in tests/web (see .ci/run)");
        return;
    }
    let out = Command::new("node")
        .arg(web.join("chat.test.mjs"))
        .arg(&shared().server.base)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
