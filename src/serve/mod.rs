//! Step 7 (deploy): an OpenAI-compatible HTTP server — chat and text completions, streamed as
//! Server-Sent Events or whole, the base model and each LoRA adapter by name — and the web chat
//! page at `/`, embedded in the binary.
//!
//! Requests are parsed and validated on the async runtime, then handed to the [`scheduler`]
//! thread, which owns the decoding: continuous batching of up to `--max-concurrent` requests
//! (base and adapters together), later ones waiting in arrival order, so `/health` answers while
//! the CPU is busy. Text reaches the handler through a channel; when the client goes away the
//! channel closes and the request leaves the batch at the next step. `/metrics` reports the
//! counters in Prometheus' format.
//!
//! Clients are untrusted: [`conn`] bounds connections and header read time, `read_body` the
//! body's, [`guard`] checks `Host`, CORS origins, the body type and the API key, and message
//! content is tokenized as text (`Model::encode_chat`), so it cannot forge turns.

pub mod api;
pub mod conn;
pub mod guard;
pub mod metrics;
pub mod scheduler;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::mpsc;
use unicode_script::Script;

use crate::infer::scripts::ScriptFilter;
use crate::infer::{FinishReason, GenerateOptions, SamplingParams};
use crate::model::Model;
use crate::{Error, Result};
use api::{
    ApiError, ChatChunk, ChatCompletion, Header, ResponseFormat, Settings, TextCompletion, Usage,
};
use metrics::Metrics;
use scheduler::{Job, Piece, Served};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The `--model` spec: a .gguf file, a Hugging Face directory, a Hub id or an alias.
    pub model: String,
    /// The id the base model is served as (`/v1/models`, a request's `model`); `None` gives
    /// [`served_name`] of `model`. Requests naming the full `model` spec are accepted too.
    pub name: Option<String>,
    /// Where the model computes.
    pub device: crate::device::DeviceSpec,
    /// How the base's matrices are held (see [`crate::model::BaseDtype`]).
    pub base_dtype: crate::model::BaseDtype,
    /// 8-bit integer dot products for decoding (see [`crate::model::Transformer::quantized_dot`]).
    pub int8_dot: bool,
    /// (name, PEFT adapter directory) pairs, each served as its own model id.
    pub adapters: Vec<(String, PathBuf)>,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests decoded together (continuous batching); later ones wait in arrival order.
    pub max_concurrent: usize,
    /// Upper bound on `max_tokens` (and its default).
    pub max_tokens: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    pub allowed_scripts: Vec<Script>,
    /// Origins allowed to call the API from a web page (`--cors`); none sends no CORS headers.
    pub cors: Vec<String>,
    /// Connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and then its body.
    pub read_timeout: Duration,
}

impl ServeOptions {
    /// The defaults of `afinar serve` for `model` (loopback, a free port, no key).
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            name: None,
            device: crate::device::DeviceSpec::Cpu,
            base_dtype: crate::model::BaseDtype::Auto,
            int8_dot: false,
            adapters: vec![],
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            max_concurrent: 8,
            max_tokens: 512,
            max_body_bytes: 1 << 20,
            allowed_scripts: vec![],
            cors: vec![],
            max_connections: 256,
            read_timeout: Duration::from_secs(30),
        }
    }

    /// The connection limits of [`conn::serve_connections`].
    pub fn conn_limits(&self) -> conn::ConnLimits {
        conn::ConnLimits {
            max_connections: self.max_connections,
            header_timeout: self.read_timeout,
        }
    }
}

struct AppState {
    /// The base model first, then the adapters.
    models: Arc<Vec<Served>>,
    /// The base model's `--model` spec, which requests may name instead of its id.
    base_spec: String,
    api_key: Option<String>,
    /// Where requests go: the scheduler thread, which owns the decoding.
    jobs: std::sync::mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    max_tokens: usize,
    filter: Option<Arc<ScriptFilter>>,
    created: u64,
    max_body_bytes: usize,
    /// Time allowed for a request body to arrive in full.
    body_timeout: Duration,
}

impl AppState {
    /// The index of the model a request names (the base when it names none).
    fn find(&self, name: &str) -> std::result::Result<usize, ApiError> {
        if name.is_empty() || name == self.base_spec {
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
        self.api_key
            .as_deref()
            .is_none_or(|key| guard::bearer_matches(headers, key))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

/// The id a `--model` spec is served as when no name is given: the spec as typed for an alias
/// or a Hub id (`smollm2`, `org/name`), the file stem of a .gguf file
/// (`/models/SmolLM2-135M.Q4_1.gguf` → `SmolLM2-135M.Q4_1`), the directory's own name for a
/// Hugging Face directory. Never a whole filesystem path, which clients would have to send back.
pub fn served_name(spec: &str) -> String {
    let path = std::path::Path::new(spec);
    let short = if path.is_file() {
        path.file_stem().map(|n| n.to_os_string())
    } else if path.is_dir() {
        // `.` or `dir/..` have no usable last component until made absolute.
        std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_os_string()))
    } else {
        None
    };
    short.map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned())
}

/// Loads the models and builds the router (also what the tests drive).
pub fn app(opts: &ServeOptions) -> Result<Router> {
    let base_id = match &opts.name {
        Some(n) if n.trim().is_empty() => {
            return Err(Error::InvalidArgument(
                "--name: the served model name must not be empty".into(),
            ))
        }
        Some(n) => n.clone(),
        None => served_name(&opts.model),
    };
    if opts.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(Error::InvalidArgument(
            "--api-key (or AFINAR_API_KEY) is empty: give a key, or leave it unset to serve without one".into(),
        ));
    }
    if let Some(bad) = opts
        .cors
        .iter()
        .find(|o| o.as_str() != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
    {
        return Err(Error::InvalidArgument(format!(
            "--cors {bad}: give an origin such as http://localhost:3000 (scheme, host and port), or *"
        )));
    }
    let device = opts.device.open()?;
    let mut base = Model::load_with(&opts.model, &device, opts.base_dtype)?;
    base.transformer.quantized_dot = opts.int8_dot;
    let mut models = Vec::new();
    for (name, dir) in &opts.adapters {
        if name.is_empty()
            || name == &opts.model
            || name == &base_id
            || models.iter().any(|m: &Served| &m.id == name)
        {
            return Err(Error::InvalidArgument(format!(
                "--adapter {name}={}: the name must be unique and differ from the base model's",
                dir.display()
            )));
        }
        // Weights are shared: the clone holds the same tensors, plus the adapter's.
        let mut m = base.clone();
        crate::export::peft::load(dir, &mut m.transformer, &opts.model)?;
        models.push(Served::new(name.clone(), m));
    }
    let filter = (!opts.allowed_scripts.is_empty()).then(|| {
        Arc::new(ScriptFilter::new(
            &base.tokenizer,
            opts.allowed_scripts.clone(),
        ))
    });
    models.insert(0, Served::new(base_id, base));
    let models = Arc::new(models);
    let metrics = Arc::new(Metrics::default());
    let jobs = scheduler::spawn(models.clone(), opts.max_concurrent, metrics.clone())
        .map_err(|e| Error::Server(format!("cannot start the scheduler thread: {e}")))?;
    let state = Arc::new(AppState {
        models,
        base_spec: opts.model.clone(),
        api_key: opts.api_key.clone(),
        jobs,
        metrics,
        max_tokens: opts.max_tokens.max(1),
        filter,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        max_body_bytes: opts.max_body_bytes,
        body_timeout: opts.read_timeout,
    });
    let checks = Arc::new(guard::Guard::new(&opts.host, opts.cors.clone()));
    Ok(Router::new()
        .route("/", get(page))
        .route("/health", get(|| async { Json(api::Health { status: "ok" }) }))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(metrics_text))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: 404,
                message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        // Bodies are read (and limited) by the handlers, so an oversized one gets a JSON error.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(checks, guard::check))
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
        conn::serve_connections(listener, router, opts.conn_limits()).await;
        Ok(())
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

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !st.authorized(&headers) {
        return ApiError::unauthorized().into_response();
    }
    Json(api::ModelList::new(
        st.models.iter().map(|m| m.id.as_str()),
        st.created,
    ))
    .into_response()
}

/// The counters in Prometheus' text format.
async fn metrics_text(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !st.authorized(&headers) {
        return ApiError::unauthorized().into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// Queues a generation of `prompt` on model `model_index` with the scheduler; returns the
/// receiver of its pieces.
async fn start(
    st: &Arc<AppState>,
    model_index: usize,
    prompt: Vec<u32>,
    s: &Settings,
) -> std::result::Result<mpsc::UnboundedReceiver<(usize, Piece)>, ApiError> {
    let served = &st.models[model_index];
    let ctx = served.model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            None,
            format!(
                "the prompt has {} tokens, which leaves no room in the model's context of {ctx} tokens; shorten it",
                prompt.len()
            ),
        ));
    }
    let vocab = served.model.config().vocab_size;
    if let Some((id, _)) = s.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!("`logit_bias`: token {id} is outside the model's vocabulary of {vocab} tokens"),
        ));
    }
    // Without max_tokens: what fits in the context, capped by --max-tokens.
    let max_new = s
        .max_tokens
        .unwrap_or(ctx - prompt.len())
        .min(st.max_tokens);
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
    let constraint = match s.format.clone() {
        None => None,
        Some(format) => Some(
            blocking(st, move |st| {
                let grammars = st.models[model_index]
                    .grammars()
                    .map_err(|e| ApiError::invalid(Some("response_format"), e))?;
                let schema = match &format {
                    ResponseFormat::JsonObject => None,
                    ResponseFormat::JsonSchema(v) => Some(v),
                };
                grammars
                    .json(schema)
                    .map_err(|e| ApiError::invalid(Some("response_format"), e.to_string()))
            })
            .await?,
        ),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let arrived = std::time::Instant::now();
    // `n` answers: one job each, seeds seed, seed + 1, …; the first computes the prompt and the
    // others take it from the prefix cache.
    for index in 0..s.n.max(1) {
        let mut opts = opts.clone();
        opts.sampling.seed = opts.sampling.seed.wrapping_add(index as u64);
        let job = Job {
            constraint: constraint.as_ref().map(|c| c.fork()),
            logprobs: s.logprobs,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logit_bias: s.logit_bias.clone(),
            model: model_index,
            prompt: prompt.clone(),
            opts,
            stops: s.stop.clone(),
            tx: tx.clone(),
            index,
            arrived,
        };
        st.jobs
            .send(job)
            .map_err(|_| ApiError::internal("the scheduler has stopped; restart the server"))?;
    }
    Ok(rx)
}

/// Runs `f` (tokenization, template rendering: CPU work that grows with the prompt) on a
/// blocking thread, so a large prompt never stalls the async workers that answer `/health`.
async fn blocking<T: Send + 'static>(
    st: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> std::result::Result<T, ApiError> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(&st))
        .await
        .map_err(|e| ApiError::internal(format!("tokenization failed: {e}")))?
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

/// One whole answer (non-streaming requests).
#[derive(Default)]
struct Collected {
    text: String,
    reason: Option<FinishReason>,
    completion_tokens: usize,
    logprobs: Vec<scheduler::TokenLogprob>,
}

/// Collects the `n` answers of a request and their total usage (the prompt counted once).
async fn collect(
    mut rx: mpsc::UnboundedReceiver<(usize, Piece)>,
    n: usize,
) -> std::result::Result<(Vec<Collected>, Usage), ApiError> {
    let mut out: Vec<Collected> = (0..n).map(|_| Collected::default()).collect();
    let mut done = 0;
    while let Some((i, p)) = rx.recv().await {
        let c = &mut out[i];
        match p {
            Piece::Text(t, lps) => {
                c.text.push_str(&t);
                c.logprobs.extend(lps);
            }
            Piece::Done(reason, usage) => {
                c.reason = Some(reason);
                c.completion_tokens = usage.completion_tokens;
                done += 1;
                if done == n {
                    let completion = out.iter().map(|c| c.completion_tokens).sum();
                    return Ok((out, Usage::new(usage.prompt_tokens, completion)));
                }
            }
            Piece::Failed(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::internal("generation ended without a result"))
}

/// A response struct as JSON text (the structs always serialize: string keys, no maps).
fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("response structs serialize")
}

/// What one streamed chunk carries: the choice's index, text and its tokens'
/// log-probabilities, the finish reason, or the usage.
type ChunkFn = dyn Fn(
        usize,
        Option<&str>,
        &[scheduler::TokenLogprob],
        Option<FinishReason>,
        Option<Usage>,
    ) -> String
    + Send
    + Sync;

/// SSE stream of the chunks of `n` answers, each the JSON text `chunk(index, delta text,
/// log-probabilities, finish reason, usage)` returns, after `first` if given, then (when all
/// are done) the usage if asked for and `[DONE]`.
fn sse(
    rx: mpsc::UnboundedReceiver<(usize, Piece)>,
    n: usize,
    first: Vec<String>,
    chunk: Box<ChunkFn>,
    include_usage: bool,
) -> Response {
    let head: Vec<std::result::Result<Event, Infallible>> = first
        .into_iter()
        .map(|v| Ok(Event::default().data(v)))
        .collect();
    let chunk = Arc::new(chunk);
    // (receiver, answers done, their completion tokens, finished)
    let state = (rx, 0usize, 0usize, false);
    let body = futures_util::stream::unfold(state, move |(mut rx, done, ct, end)| {
        let chunk = chunk.clone();
        async move {
            if end {
                return None;
            }
            let (i, piece) = rx.recv().await?;
            let event = |s: String| Ok(Event::default().data(s));
            Some(match piece {
                Piece::Text(t, lps) => (
                    vec![event(chunk(i, Some(&t), &lps, None, None))],
                    (rx, done, ct, false),
                ),
                Piece::Done(r, u) => {
                    let (done, ct) = (done + 1, ct + u.completion_tokens);
                    let mut v = vec![event(chunk(i, None, &[], Some(r), None))];
                    let end = done == n;
                    if end {
                        if include_usage {
                            let usage = Usage::new(u.prompt_tokens, ct);
                            v.push(event(chunk(i, None, &[], None, Some(usage))));
                        }
                        v.push(event("[DONE]".into()));
                    }
                    (v, (rx, done, ct, end))
                }
                Piece::Failed(e) => {
                    let err = to_json(&ApiError::internal(e).body());
                    (
                        vec![event(err), event("[DONE]".into())],
                        (rx, done, ct, true),
                    )
                }
            })
        }
    });
    use futures_util::StreamExt;
    let stream = futures_util::stream::iter(head).chain(body.flat_map(futures_util::stream::iter));
    Sse::new(stream).into_response()
}

/// Bytes of an oversized body read and discarded before the 413 is sent (see [`read_body`]).
const DRAIN_BYTES: usize = 8 << 20;

/// Reads a request body up to the configured limit (413 with a JSON error beyond it).
///
/// Past the limit the rest is read and dropped (up to [`DRAIN_BYTES`] more) before answering:
/// a server that answers and closes while the client is still sending resets the connection,
/// and the client then sees a broken pipe instead of the 413.
async fn read_body(st: &AppState, body: Body) -> std::result::Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let limit = st.max_body_bytes;
    let mut stream = body.into_data_stream();
    let (mut buf, mut seen) = (Vec::new(), 0usize);
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            return Err(ApiError {
                status: 408,
                message: format!(
                    "the request body did not arrive within {} s (was Content-Length larger than the body sent?)",
                    st.body_timeout.as_secs_f32()
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("request_timeout"),
            });
        };
        let Some(chunk) = next else { break };
        let chunk = chunk
            .map_err(|e| ApiError::invalid(None, format!("cannot read the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > limit.saturating_add(DRAIN_BYTES) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError {
            status: 413,
            message: format!("the request body is larger than {limit} bytes (--max-body-bytes)"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        });
    }
    Ok(buf.into())
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
    let messages = req.messages;
    let prompt = blocking(&st, move |st| {
        st.models[index]
            .model
            .encode_chat(&messages, true)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))
    })
    .await?;
    let served = &st.models[index];
    let rx = start(&st, index, prompt, &req.settings).await?;
    let h = Header {
        id: new_id("chatcmpl"),
        created: st.created,
        model: served.id.clone(),
    };
    let table = req.settings.logprobs.map(|_| served.token_table());
    let n = req.settings.n.max(1);
    if req.settings.stream {
        let first = (0..n)
            .map(|i| to_json(&ChatChunk::role(&h).at(i as u32)))
            .collect();
        return Ok(sse(
            rx,
            n,
            first,
            Box::new(move |i, text, lps, reason, usage| match usage {
                Some(u) => to_json(&ChatChunk::usage(&h, u)),
                None => {
                    let lp = table.as_ref().map(|t| api::chat_logprobs(t, lps));
                    let lp = lp.filter(|_| text.is_some());
                    to_json(&ChatChunk::delta(&h, text, reason.map(reason_str), lp).at(i as u32))
                }
            }),
            req.settings.include_usage,
        ));
    }
    let (answers, usage) = collect(rx, n).await?;
    let choices = answers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = table.as_ref().map(|t| api::chat_logprobs(t, &c.logprobs));
            let reason = reason_str(c.reason.unwrap_or(FinishReason::Stop));
            api::ChatChoice::new(i as u32, &c.text, reason, lp)
        })
        .collect();
    Ok(Json(ChatCompletion::new(&h, choices, usage)).into_response())
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
    let text = req.prompt;
    let prompt = blocking(&st, move |st| {
        st.models[index]
            .model
            .tokenizer
            .encode(&text, true)
            .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
    })
    .await?;
    let served = &st.models[index];
    let rx = start(&st, index, prompt, &req.settings).await?;
    let h = Header {
        id: new_id("cmpl"),
        created: st.created,
        model: served.id.clone(),
    };
    let table = req.settings.logprobs.map(|_| served.token_table());
    let n = req.settings.n.max(1);
    if req.settings.stream {
        let offsets: Vec<std::sync::atomic::AtomicUsize> = (0..n)
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect();
        return Ok(sse(
            rx,
            n,
            vec![],
            Box::new(move |i, text, lps, reason, usage| match usage {
                Some(u) => to_json(&TextCompletion::usage(&h, u)),
                None => {
                    let at = offsets[i].fetch_add(
                        text.map_or(0, |t| t.chars().count()),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let lp = table.as_ref().map(|t| api::text_logprobs(t, lps, at));
                    let lp = lp.filter(|_| text.is_some());
                    let text = text.unwrap_or("");
                    to_json(
                        &TextCompletion::new(&h, text, reason.map(reason_str), None, lp)
                            .at(i as u32),
                    )
                }
            }),
            req.settings.include_usage,
        ));
    }
    let (answers, usage) = collect(rx, n).await?;
    let choices = answers
        .iter()
        .enumerate()
        .map(|(i, c)| api::TextChoice {
            index: i as u32,
            text: &c.text,
            logprobs: table
                .as_ref()
                .map(|t| api::text_logprobs(t, &c.logprobs, 0)),
            finish_reason: Some(reason_str(c.reason.unwrap_or(FinishReason::Stop))),
        })
        .collect();
    Ok(Json(TextCompletion::of(&h, choices, Some(usage))).into_response())
}
