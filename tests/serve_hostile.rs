//! The server against hostile and careless clients, on a loopback port with the tiny fixture
//! (offline): idle, half-sent and short-bodied connections are timed out and bounded while
//! `/health` keeps answering; a foreign `Host` (DNS rebinding), a non-JSON body and a
//! cross-origin preflight are refused unless `--cors` allows the origin; the API key; OpenAI
//! fields the server does not implement; the default `max_tokens`. Durations are watchdogs
//! against hangs, never assertions about speed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use afinar::serve::{app, ServeOptions};
use common::tiny_spec;
use serde_json::{json, Value};

/// Serves `opts` (the tiny fixture unless changed); returns the address.
fn serve(opts: ServeOptions) -> SocketAddr {
    common::serve_in_process(&opts)
}

fn options() -> ServeOptions {
    ServeOptions {
        max_tokens: 4,
        ..ServeOptions::new(tiny_spec())
    }
}

/// One raw HTTP/1.1 exchange (`Connection: close`): (status, headers lowercased, body).
fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {out:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// A request with these extra header lines and body.
fn request(method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        r.push_str("Host: 127.0.0.1\r\n");
    }
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r
}

fn json_post(addr: SocketAddr, path: &str, body: &Value, extra: &[&str]) -> (u16, Value) {
    let mut headers = vec!["Content-Type: application/json"];
    headers.extend_from_slice(extra);
    let (status, _, text) = raw(addr, &request("POST", path, &headers, &body.to_string()));
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

/// `/health` answers 200 within the watchdog (retrying while the server sheds load).
fn health_answers(addr: SocketAddr) {
    let watchdog = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ =
            s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 200") && out.contains(r#"{"status":"ok"}"#) {
            return;
        }
        assert!(
            Instant::now() < watchdog,
            "/health stopped answering: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the server closed `s` (EOF or a reset, possibly after an error response).
fn closed_by_server(s: &mut TcpStream) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(String::new()),
        Err(_) => None, // still open after the watchdog
    }
}

#[test]
fn idle_half_sent_and_short_bodied_connections_are_timed_out_while_health_answers() {
    let addr = serve(ServeOptions {
        read_timeout: Duration::from_secs(2),
        max_connections: 400,
        ..options()
    });
    let body = json!({"prompt": "one two", "max_tokens": 1}).to_string();
    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(addr).unwrap();
        match i % 3 {
            0 => {} // connects and says nothing
            1 => s
                .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
                .unwrap(),
            _ => {
                // Promises 1000 bytes, sends the JSON's first ten.
                let head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(&body.as_bytes()[..10]).unwrap();
            }
        }
        held.push((i, s));
    }
    // All 300 are open (the limit is 400): the server still answers.
    health_answers(addr);
    // Every one of them is closed by the server; a short body gets a 408 first.
    for (i, s) in &mut held {
        let out = closed_by_server(s)
            .unwrap_or_else(|| panic!("connection {i} was held open past its read timeout"));
        if *i % 3 == 2 {
            assert!(out.starts_with("HTTP/1.1 408"), "connection {i}: {out:?}");
            assert!(out.contains("Content-Length"), "{out}");
        }
    }
    health_answers(addr);
}

#[test]
fn connections_past_the_limit_get_503_and_health_recovers() {
    let addr = serve(ServeOptions {
        read_timeout: Duration::from_secs(2),
        max_connections: 8,
        ..options()
    });
    let mut idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The limit is reached: the next connection is told so, not left hanging.
    std::thread::sleep(Duration::from_millis(200));
    let (status, _, body) = raw(addr, &request("GET", "/health", &[], ""));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-connections"), "{body}");
    // The idle ones are timed out, which frees the slots.
    for s in &mut idle {
        assert!(
            closed_by_server(s).is_some(),
            "an idle connection was held open"
        );
    }
    health_answers(addr);
}

#[test]
fn foreign_host_names_are_refused_on_loopback() {
    let addr = serve(options());
    for host in ["evil.example", "evil.example:8080", "192.168.1.20"] {
        let line = format!("Host: {host}");
        let (status, _, body) = raw(addr, &request("GET", "/v1/models", &[&line], ""));
        assert_eq!(status, 403, "{host}: {body}");
        assert!(body.contains("DNS rebinding"), "{body}");
        let (status, _, _) = raw(addr, &request("GET", "/", &[&line], ""));
        assert_eq!(status, 403, "the page too");
    }
    let port = addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let line = format!("Host: {host}");
        let (status, _, body) = raw(addr, &request("GET", "/v1/models", &[&line], ""));
        assert_eq!(status, 200, "{host}: {body}");
    }
}

#[test]
fn only_json_bodies_are_served() {
    let addr = serve(options());
    let body = json!({"prompt": "one two", "max_tokens": 1}).to_string();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let line = ct.map(|c| format!("Content-Type: {c}"));
        let headers: Vec<&str> = line.iter().map(String::as_str).collect();
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let (status, _, text) = raw(addr, &request("POST", path, &headers, &body));
            assert_eq!(status, 415, "{ct:?} {path}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("application/json"),
                "{v}"
            );
        }
    }
    let headers = ["Content-Type: Application/JSON; charset=utf-8"];
    let (status, _, text) = raw(addr, &request("POST", "/v1/completions", &headers, &body));
    assert_eq!(status, 200, "{text}");
}

#[test]
fn cors_headers_only_for_the_origins_given() {
    let preflight = |addr, origin: &str| {
        let o = format!("Origin: {origin}");
        raw(
            addr,
            &request(
                "OPTIONS",
                "/v1/chat/completions",
                &[
                    &o,
                    "Access-Control-Request-Method: POST",
                    "Access-Control-Request-Headers: content-type",
                ],
                "",
            ),
        )
    };
    let addr = serve(options());
    let (status, head, _) = preflight(addr, "http://localhost:3000");
    assert_eq!(status, 403);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    let (status, head, _) = raw(
        addr,
        &request("GET", "/v1/models", &["Origin: http://localhost:3000"], ""),
    );
    assert_eq!(status, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    let addr = serve(ServeOptions {
        cors: vec!["http://localhost:3000".into()],
        ..options()
    });
    let (status, head, _) = preflight(addr, "http://localhost:3000");
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: http://localhost:3000"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization, content-type"),
        "{head}"
    );
    let (status, head, _) = preflight(addr, "http://evil.example");
    assert_eq!(status, 403);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    let (status, head, _) = raw(
        addr,
        &request("GET", "/v1/models", &["Origin: http://localhost:3000"], ""),
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("access-control-allow-origin: http://localhost:3000"),
        "{head}"
    );
    let (_, head, _) = raw(
        addr,
        &request("GET", "/v1/models", &["Origin: http://evil.example"], ""),
    );
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    let Err(e) = app(&ServeOptions {
        cors: vec!["localhost:3000".into()],
        ..options()
    }) else {
        panic!("an origin without a scheme is refused");
    };
    assert!(e.to_string().contains("--cors localhost:3000"), "{e}");
}

#[test]
fn api_key_bearer_in_any_case_and_no_empty_key() {
    for key in ["", "  "] {
        let Err(e) = app(&ServeOptions {
            api_key: Some(key.into()),
            ..options()
        }) else {
            panic!("an empty key is refused");
        };
        let msg = e.to_string();
        assert!(msg.contains("--api-key") && !msg.contains('\n'), "{msg}");
    }
    let addr = serve(ServeOptions {
        api_key: Some("s3cret".into()),
        ..options()
    });
    let models = |auth: Option<&str>| {
        let line = auth.map(|a| format!("Authorization: {a}"));
        let headers: Vec<&str> = line.iter().map(String::as_str).collect();
        raw(addr, &request("GET", "/v1/models", &headers, "")).0
    };
    for ok in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        assert_eq!(models(Some(ok)), 200, "{ok}");
    }
    for bad in [
        None,
        Some("Bearer s3cre"),
        Some("Bearer s3cret!"),
        Some("Basic s3cret"),
        Some("s3cret"),
    ] {
        assert_eq!(models(bad), 401, "{bad:?}");
    }
    assert_eq!(raw(addr, &request("GET", "/health", &[], "")).0, 200);
}

#[test]
fn unimplemented_fields_are_refused_by_name() {
    let addr = serve(options());
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let text = json!({"prompt": "one two", "max_tokens": 1});
    let with = |base: &Value, key: &str, v: Value| {
        let mut b = base.clone();
        b[key] = v;
        b
    };
    let refused = [
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("response_format", json!({"type": "xml"})),
        ("best_of", json!(2)),
        ("echo", json!(true)),
        ("n", json!(17)),
    ];
    for (key, v) in refused {
        for (path, base) in [("/v1/chat/completions", &chat), ("/v1/completions", &text)] {
            let (status, body) = json_post(addr, path, &with(base, key, v.clone()), &[]);
            assert_eq!(status, 400, "{key}={v} {path}: {body}");
            assert_eq!(body["error"]["param"], key, "{body}");
        }
    }
    // Values of implemented fields that make no sense: 400 naming the field, saying why.
    let chat_path = "/v1/chat/completions";
    for (path, base, key, v, why) in [
        (
            chat_path,
            &chat,
            "top_logprobs",
            json!(2),
            "needs `logprobs: true`",
        ),
        (
            "/v1/completions",
            &text,
            "logprobs",
            json!(6),
            "from 0 to 5",
        ),
        (
            chat_path,
            &chat,
            "response_format",
            json!("json"),
            "must be an object",
        ),
        (
            chat_path,
            &chat,
            "logit_bias",
            json!({"cat": 5}),
            "keys must be token ids",
        ),
        (
            "/v1/completions",
            &text,
            "logit_bias",
            json!({"42": 101}),
            "between -100 and 100",
        ),
        (
            chat_path,
            &chat,
            "logit_bias",
            json!({"42": "5"}),
            "between -100 and 100",
        ),
        (
            chat_path,
            &chat,
            "logit_bias",
            json!([42]),
            "must be an object",
        ),
        (
            chat_path,
            &chat,
            "logit_bias",
            json!({"4000000000": 1}),
            "outside the model's vocabulary",
        ),
        (
            chat_path,
            &chat,
            "response_format",
            json!({"type": "xml"}),
            r#""text", "json_object" or "json_schema""#,
        ),
        (
            chat_path,
            &chat,
            "response_format",
            json!({"type": "json_schema"}),
            "needs a `json_schema` object",
        ),
        (
            chat_path,
            &chat,
            "response_format",
            json!({"type": "json_schema", "json_schema": {"schema": 5}}),
            "must be a JSON Schema object",
        ),
    ] {
        let (status, body) = json_post(addr, path, &with(base, key, v.clone()), &[]);
        assert_eq!(
            (status, &body["error"]["param"]),
            (400, &json!(key)),
            "{key}={v}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{key}={v}: {message}");
    }
    for (key, v) in [
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-2.5)),
    ] {
        let (status, body) = json_post(addr, "/v1/chat/completions", &with(&chat, key, v), &[]);
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("between -2 and 2"),
            "{body}"
        );
    }
    // Values that mean "off" are fine.
    let off = [
        ("logprobs", json!(false)),
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("best_of", json!(1)),
        ("echo", json!(false)),
        ("logit_bias", json!({})),
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("n", json!(1)),
    ];
    for (key, v) in off {
        let (status, body) = json_post(
            addr,
            "/v1/chat/completions",
            &with(&chat, key, v.clone()),
            &[],
        );
        assert_eq!(status, 200, "{key}={v}: {body}");
    }
}

#[test]
fn default_max_tokens_is_what_fits_in_the_context() {
    // A cap far beyond the fixture's 256-token context: without max_tokens the request is
    // served (up to the context), not refused for a budget the client never asked for.
    let addr = serve(ServeOptions {
        max_tokens: 100_000,
        ..options()
    });
    let (status, v) = json_post(
        addr,
        "/v1/completions",
        &json!({"prompt": "one two", "temperature": 0}),
        &[],
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() <= 256, "{v}");
    // An explicit max_tokens beyond the context is still an error that says so.
    let (status, v) = json_post(
        addr,
        "/v1/completions",
        &json!({"prompt": "one two", "max_tokens": 1000}),
        &[],
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
}

#[test]
fn serve_refuses_an_empty_api_key_in_one_line() {
    for (flag, env) in [(Some(""), None), (None, Some(""))] {
        let mut cmd = common::afinar_cmd();
        cmd.args(["serve", "--model", tiny_spec(), "--port", "0"]);
        if let Some(f) = flag {
            cmd.args(["--api-key", f]);
        }
        if let Some(e) = env {
            cmd.env("AFINAR_API_KEY", e);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag:?} {env:?}: started");
        assert!(err.contains("--api-key"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
