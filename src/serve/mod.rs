//! Step 7 (deploy): an OpenAI-compatible HTTP server — chat and text completions, streamed as
//! Server-Sent Events or whole, the base model and each LoRA adapter by name — and the web chat
//! page at `/`, embedded in the binary.
//!
//! Requests are parsed and validated on the async runtime; each generation runs on a blocking
//! thread once a permit of a FIFO semaphore (`--max-concurrent`) is free, so requests are served
//! in arrival order and `/health` answers while the CPU is busy. Text reaches the handler through
//! a channel; when the client goes away the channel closes and the generation stops at its next
//! token.

pub mod api;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use unicode_script::Script;

use crate::infer::generate::generate_until;
use crate::infer::scripts::ScriptFilter;
use crate::infer::{FinishReason, GenerateOptions, SamplingParams};
use crate::model::Model;
use crate::{Error, Result};
use api::{ApiError, Settings, Usage};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    /// (name, PEFT adapter directory) pairs, each served as its own model id.
    pub adapters: Vec<(String, PathBuf)>,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Generations running at once; later requests wait in arrival order.
    pub max_concurrent: usize,
    /// Upper bound on `max_tokens` (and its default).
    pub max_tokens: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    pub allowed_scripts: Vec<Script>,
}

/// One servable model id.
struct Served {
    id: String,
    model: Model,
}

struct AppState {
    models: Vec<Served>,
    api_key: Option<String>,
    permits: Arc<Semaphore>,
    max_tokens: usize,
    filter: Option<Arc<ScriptFilter>>,
    created: u64,
    max_body_bytes: usize,
}

impl AppState {
    /// The index of the model a request names (the base when it names none).
    fn find(&self, name: &str) -> std::result::Result<usize, ApiError> {
        if name.is_empty() {
            return Ok(0);
        }
        self.models
            .iter()
            .position(|m| m.id == name)
            .ok_or_else(|| {
                ApiError::unknown_model(
                    name,
                    &self.models.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                )
            })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k.trim() == key)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

/// Loads the models and builds the router (also what the tests drive).
pub fn app(opts: &ServeOptions) -> Result<Router> {
    let device = candle_core::Device::Cpu;
    let base = Model::load(&opts.model, &device)?;
    let mut models = Vec::new();
    for (name, dir) in &opts.adapters {
        if name.is_empty() || name == &opts.model || models.iter().any(|m: &Served| &m.id == name) {
            return Err(Error::InvalidArgument(format!(
                "--adapter {name}={}: the name must be unique and differ from the base model's",
                dir.display()
            )));
        }
        // Weights are shared: the clone holds the same tensors, plus the adapter's.
        let mut m = base.clone();
        crate::export::peft::load(dir, &mut m.transformer, &opts.model)?;
        models.push(Served {
            id: name.clone(),
            model: m,
        });
    }
    let filter = (!opts.allowed_scripts.is_empty()).then(|| {
        Arc::new(ScriptFilter::new(
            &base.tokenizer,
            opts.allowed_scripts.clone(),
        ))
    });
    models.insert(
        0,
        Served {
            id: opts.model.clone(),
            model: base,
        },
    );
    let state = Arc::new(AppState {
        models,
        api_key: opts.api_key.clone(),
        permits: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
        max_tokens: opts.max_tokens.max(1),
        filter,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        max_body_bytes: opts.max_body_bytes,
    });
    Ok(Router::new()
        .route("/", get(page))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: 404,
                message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /health".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        // Bodies are read (and limited) by the handlers, so an oversized one gets a JSON error.
        .layer(DefaultBodyLimit::disable())
        .with_state(state))
}

/// Serves until the process is stopped; prints the address it listens on.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let router = app(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Server(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Server(format!("cannot listen on {addr}: {e}")))?;
        let local: SocketAddr = listener
            .local_addr()
            .map_err(|e| Error::Server(e.to_string()))?;
        eprintln!("afinar: listening on http://{local}");
        axum::serve(listener, router)
            .await
            .map_err(|e| Error::Server(format!("server error: {e}")))
    })
}

const PAGE: &str = include_str!("web/index.html");

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
}

async fn list_models(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    if !st.authorized(&headers) {
        return Err(ApiError::unauthorized());
    }
    let data: Vec<_> = st
        .models
        .iter()
        .map(
            |m| json!({"id": m.id, "object": "model", "created": st.created, "owned_by": "afinar"}),
        )
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// What the generation thread sends.
enum Piece {
    Text(String),
    Done(FinishReason, Usage),
    Failed(String),
}

/// Holds back text that could be the start of a stop sequence, and ends at the first match.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Text that can be sent now, and whether a stop sequence was reached.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }
}

/// Starts a generation for `prompt` on `served` after taking a permit; returns the receiver
/// of its pieces.
async fn start(
    st: &Arc<AppState>,
    model_index: usize,
    prompt: Vec<u32>,
    s: &Settings,
) -> std::result::Result<mpsc::Receiver<Piece>, ApiError> {
    let served = &st.models[model_index];
    let ctx = served.model.config().max_position_embeddings;
    let max_new = s.max_tokens.unwrap_or(st.max_tokens).min(st.max_tokens);
    if prompt.len() + max_new > ctx {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "the prompt has {} tokens and max_tokens is {max_new}: together more than the model's context of {ctx} tokens; shorten the conversation or lower max_tokens",
                prompt.len()
            ),
        ));
    }
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p.filter(|p| *p < 1.0),
            seed: s.seed,
            ..Default::default()
        },
        stop_at_end_token: true,
        scripts: st.filter.clone(),
    };
    opts.sampling
        .validate()
        .map_err(|e| ApiError::invalid(None, e.to_string()))?;
    let permit = st
        .permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, rx) = mpsc::channel(256);
    let st = st.clone();
    let stops = s.stop.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let model = &st.models[model_index].model;
        let mut matcher = StopMatcher {
            stops,
            held: String::new(),
        };
        let mut hit_stop = false;
        let mut gone = false;
        let result = generate_until(model, &prompt, &opts, |piece| {
            let (out, stop) = matcher.push(piece);
            hit_stop |= stop;
            gone = !(out.is_empty() || tx.blocking_send(Piece::Text(out)).is_ok());
            !gone && !stop
        });
        if gone {
            if let Ok(g) = &result {
                eprintln!(
                    "afinar: client went away; generation stopped after {} tokens",
                    g.generated_tokens
                );
            }
            return;
        }
        let last = match result {
            Ok(g) => {
                if !hit_stop && !matcher.held.is_empty() {
                    let _ = tx.blocking_send(Piece::Text(std::mem::take(&mut matcher.held)));
                }
                let reason = if hit_stop {
                    FinishReason::Stop
                } else {
                    g.finish_reason
                };
                Piece::Done(
                    reason,
                    Usage {
                        prompt_tokens: g.prompt_tokens,
                        completion_tokens: g.generated_tokens,
                        total_tokens: g.prompt_tokens + g.generated_tokens,
                    },
                )
            }
            Err(e) => Piece::Failed(e.to_string()),
        };
        let _ = tx.blocking_send(last);
    });
    Ok(rx)
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn new_id(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{n:x}")
}

/// Collects a whole generation (non-streaming requests).
async fn collect(
    mut rx: mpsc::Receiver<Piece>,
) -> std::result::Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(r, u) => return Ok((text, r, u)),
            Piece::Failed(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::internal("generation ended without a result"))
}

/// SSE stream of chunks built by `chunk(delta text, finish reason)`, then `[DONE]`.
fn sse(
    rx: mpsc::Receiver<Piece>,
    first: Option<serde_json::Value>,
    chunk: impl Fn(Option<&str>, Option<FinishReason>, Option<Usage>) -> serde_json::Value
        + Send
        + Sync
        + 'static,
    include_usage: bool,
) -> Response {
    let head: Vec<std::result::Result<Event, Infallible>> = first
        .into_iter()
        .map(|v| Ok(Event::default().data(v.to_string())))
        .collect();
    let chunk = Arc::new(chunk);
    let body = futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
        let chunk = chunk.clone();
        let out = async move {
            if done {
                return None;
            }
            let events: Vec<std::result::Result<Event, Infallible>> = match rx.recv().await {
                Some(Piece::Text(t)) => vec![Ok(
                    Event::default().data(chunk(Some(&t), None, None).to_string())
                )],
                Some(Piece::Done(r, u)) => {
                    let mut v = vec![Ok(
                        Event::default().data(chunk(None, Some(r), None).to_string())
                    )];
                    if include_usage {
                        v.push(Ok(
                            Event::default().data(chunk(None, None, Some(u)).to_string())
                        ));
                    }
                    v.push(Ok(Event::default().data("[DONE]")));
                    return Some((v, (rx, true)));
                }
                Some(Piece::Failed(e)) => {
                    let err = ApiError::internal(e).body();
                    return Some((
                        vec![
                            Ok(Event::default().data(err.to_string())),
                            Ok(Event::default().data("[DONE]")),
                        ],
                        (rx, true),
                    ));
                }
                None => return None,
            };
            Some((events, (rx, false)))
        };
        out
    });
    use futures_util::StreamExt;
    let stream = futures_util::stream::iter(head).chain(body.flat_map(futures_util::stream::iter));
    Sse::new(stream).into_response()
}

/// Reads a request body up to the configured limit (413 with a JSON error beyond it).
async fn read_body(st: &AppState, body: Body) -> std::result::Result<Bytes, ApiError> {
    axum::body::to_bytes(body, st.max_body_bytes)
        .await
        .map_err(|_| ApiError {
            status: 413,
            message: format!(
                "the request body is larger than {} bytes (--max-body-bytes)",
                st.max_body_bytes
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        })
}

/// Authentication first, then the body (within the limit), then `inner`; every error becomes
/// an OpenAI-shaped response.
async fn handle<F, Fut>(st: Arc<AppState>, headers: &HeaderMap, body: Body, inner: F) -> Response
where
    F: FnOnce(Arc<AppState>, Bytes) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Response, ApiError>>,
{
    if !st.authorized(headers) {
        return ApiError::unauthorized().into_response();
    }
    match read_body(&st, body).await {
        Ok(body) => inner(st, body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(st, &headers, body, chat_inner).await
}

async fn chat_inner(st: Arc<AppState>, body: Bytes) -> std::result::Result<Response, ApiError> {
    let req = api::parse_chat(&body)?;
    let index = st.find(&req.settings.model)?;
    let served = &st.models[index];
    let model_id = served.id.clone();
    let prompt = served
        .model
        .encode_chat(&req.messages, true)
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let rx = start(&st, index, prompt, &req.settings).await?;
    let id = new_id("chatcmpl");
    let created = st.created;
    if req.settings.stream {
        let (id2, model2) = (id.clone(), model_id.clone());
        let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
        return Ok(sse(
            rx,
            Some(first),
            move |text, reason, usage| match usage {
                Some(u) => {
                    json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "choices": [], "usage": u})
                }
                None => {
                    json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": 0, "delta": text.map_or(json!({}), |t| json!({"content": t})),
                                 "finish_reason": reason.map(reason_str)}]})
                }
            },
            req.settings.include_usage,
        ));
    }
    let (text, reason, usage) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason_str(reason), "logprobs": null}],
        "usage": usage,
    }))
    .into_response())
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(st, &headers, body, completions_inner).await
}

async fn completions_inner(
    st: Arc<AppState>,
    body: Bytes,
) -> std::result::Result<Response, ApiError> {
    let req = api::parse_completion(&body)?;
    let index = st.find(&req.settings.model)?;
    let served = &st.models[index];
    let model_id = served.id.clone();
    let prompt = served
        .model
        .tokenizer
        .encode(&req.prompt, true)
        .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    let rx = start(&st, index, prompt, &req.settings).await?;
    let id = new_id("cmpl");
    let created = st.created;
    if req.settings.stream {
        let (id2, model2) = (id.clone(), model_id.clone());
        return Ok(sse(
            rx,
            None,
            move |text, reason, usage| match usage {
                Some(u) => {
                    json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "choices": [], "usage": u})
                }
                None => {
                    json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                    "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason.map(reason_str)}]})
                }
            },
            req.settings.include_usage,
        ));
    }
    let (text, reason, usage) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason_str(reason)}],
        "usage": usage,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_sequences_are_held_back_and_cut() {
        let mut m = StopMatcher {
            stops: vec!["END".into()],
            held: String::new(),
        };
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D and more"), (String::new(), true));
        let mut m = StopMatcher {
            stops: vec!["\n\n".into()],
            held: String::new(),
        };
        assert_eq!(m.push("a\n"), ("a".to_string(), false));
        assert_eq!(m.push("b"), ("\nb".to_string(), false));
    }
}
