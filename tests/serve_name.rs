//! The id a served model answers to (`ServeOptions::name`): a short name by default, never a
//! filesystem path; the old full `--model` spec still accepted in requests. Drives the library's
//! router on a loopback port with a tiny fixture model (no download).

mod common;

use afinar::serve::{app, served_name, ServeOptions};
use common::root;
use serde_json::{json, Value};

/// Serves `opts` on a free loopback port; returns the base URL.
fn serve(opts: &ServeOptions) -> String {
    format!("http://{}", common::serve_in_process(opts))
}

fn options(model: &str, name: Option<&str>) -> ServeOptions {
    ServeOptions {
        name: name.map(str::to_string),
        max_concurrent: 1,
        max_tokens: 8,
        max_body_bytes: 1 << 16,
        ..ServeOptions::new(model)
    }
}

fn ids(base: &str) -> Vec<String> {
    let v: Value = ureq::get(&format!("{base}/v1/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// (status, body) of a 3-token completion asking for `model`.
fn complete(base: &str, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "prompt": "one two", "max_tokens": 3, "temperature": 0});
    match ureq::post(&format!("{base}/v1/completions")).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn short_names_for_files_directories_and_aliases() {
    let dir = root().join("tests/fixtures/tiny-qwen2");
    assert_eq!(served_name(dir.to_str().unwrap()), "tiny-qwen2");
    assert_eq!(served_name(&format!("{}/", dir.display())), "tiny-qwen2");
    assert_eq!(
        served_name(dir.join("..").join("tiny-mistral").to_str().unwrap()),
        "tiny-mistral"
    );
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("SmolLM2-135M.Q4_1.gguf");
    std::fs::write(&gguf, b"").unwrap();
    assert_eq!(served_name(gguf.to_str().unwrap()), "SmolLM2-135M.Q4_1");
    assert_eq!(served_name("smollm2"), "smollm2");
    assert_eq!(
        served_name("HuggingFaceTB/SmolLM2-135M-Instruct"),
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
}

#[test]
fn served_id_is_the_short_name_or_the_given_name_and_the_full_spec_still_works() {
    let spec = root().join("tests/fixtures/tiny-qwen2");
    let spec = spec.to_str().unwrap();

    let base = serve(&options(spec, None));
    assert_eq!(ids(&base), ["tiny-qwen2"]);
    let (st, v) = complete(&base, "tiny-qwen2");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "tiny-qwen2");
    // Clients written against the old behaviour send the path: still served, under the new id.
    let (st, v) = complete(&base, spec);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "tiny-qwen2");

    let base = serve(&options(spec, Some("house-model")));
    assert_eq!(ids(&base), ["house-model"]);
    let (st, v) = complete(&base, "house-model");
    assert_eq!((st, v["model"].as_str()), (200, Some("house-model")));
    assert_eq!(complete(&base, spec).0, 200);
    let (st, v) = complete(&base, "tiny-qwen2");
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("house-model"));

    let Err(err) = app(&options(spec, Some(" "))) else {
        panic!("an empty name is refused");
    };
    assert!(err.to_string().contains("--name"), "{err}");
}
