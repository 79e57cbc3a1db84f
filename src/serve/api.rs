//! The OpenAI wire format: requests parsed field by field (so a wrong type names its field),
//! validated with messages that say what is allowed; and the response shapes OpenAI clients
//! expect, one struct each (fields in the order OpenAI writes them; serde_json keeps it).

use serde::Serialize;

use super::scheduler::TokenLogprob;
use serde_json::{Map, Value};

use crate::data::read::json_kind as type_name;
use crate::model::Message;

/// An error as OpenAI returns it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 invalid_request_error about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 404 for a model name that is not served.
    pub fn unknown_model(name: &str, served: &[String]) -> Self {
        Self {
            status: 404,
            message: format!(
                "The model `{name}` does not exist; this server has: {}",
                served.join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            message: "Incorrect or missing API key: send `Authorization: Bearer KEY`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 500 for a failure inside generation (never expected; reported, not panicked).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

/// Generation settings shared by both endpoints, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: u64,
    pub stream: bool,
    /// Streaming: send a last chunk with `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// `response_format`: constrain the answer to JSON.
    pub format: Option<ResponseFormat>,
    /// Log-probabilities asked for, with this many alternatives per token (chat: `logprobs`
    /// true and `top_logprobs`; completions: `logprobs` N).
    pub logprobs: Option<usize>,
    /// Answers to generate (`n`): each a request of its own, with seeds `seed`, `seed` + 1, …
    pub n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, bias from -100 to 100) added to the logits before
    /// sampling; the ids are checked against the model's vocabulary when the request starts.
    pub logit_bias: Vec<(u32, f32)>,
}

/// Most answers one request may ask for (`n`).
pub const MAX_N: usize = 16;

/// Most `logit_bias` entries one request may carry (each is applied at every step).
pub const MAX_LOGIT_BIAS: usize = 4096;

/// `logit_bias`: an object from token ids (as strings) to biases from -100 to 100.
fn logit_bias(m: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let key = Some("logit_bias");
    let map = match m.get("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ApiError::invalid(
                key,
                format!(
                    "`logit_bias` must be an object from token ids to biases (got {})",
                    type_name(other)
                ),
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            key,
            format!(
                "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}",
                map.len()
            ),
        ));
    }
    map.iter()
        .map(|(id, v)| {
            let id: u32 = id.parse().map_err(|_| {
                ApiError::invalid(
                    key,
                    format!(
                        "`logit_bias` keys must be token ids (got {:?})",
                        id.chars().take(40).collect::<String>()
                    ),
                )
            })?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(ApiError::invalid(
                    key,
                    format!("`logit_bias` values must be numbers between -100 and 100 (token {id}: {v})"),
                )),
            }
        })
        .collect()
}

/// What `response_format` asks for (`text` is no constraint, `None` in [`Settings`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// JSON valid under the schema (`{"type": "json_schema", "json_schema": {"schema": …}}`).
    JsonSchema(Value),
}

fn response_format(m: &Map<String, Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let key = "response_format";
    let Some(v) = m.get(key) else {
        return Ok(None);
    };
    let bad = |msg: &str| Err(ApiError::invalid(Some(key), msg.to_string()));
    let o = match v {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => return bad(r#"`response_format` must be an object such as {"type": "json_object"}"#),
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => match o.get("json_schema") {
            Some(Value::Object(js)) => match js.get("schema") {
                None | Some(Value::Null) => Ok(Some(ResponseFormat::JsonObject)),
                Some(schema @ Value::Object(_)) => {
                    Ok(Some(ResponseFormat::JsonSchema(schema.clone())))
                }
                Some(_) => bad("`response_format.json_schema.schema` must be a JSON Schema object"),
            },
            _ => bad("`response_format` of type json_schema needs a `json_schema` object with a `schema`"),
        },
        _ => bad(r#"`response_format.type` must be "text", "json_object" or "json_schema""#),
    }
}

/// A chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub settings: Settings,
    pub messages: Vec<Message>,
}

/// A (legacy) text completion request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub settings: Settings,
    pub prompt: String,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid(None, "the body must be a JSON object")),
    }
}

fn number(m: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(Some(v))
            } else {
                Err(ApiError::invalid(
                    Some(key),
                    format!("`{key}` must be between {lo} and {hi} (got {n})"),
                ))
            }
        }
        Some(other) => Err(ApiError::invalid(
            Some(key),
            format!("`{key}` must be a number (got {})", type_name(other)),
        )),
    }
}

fn integer(m: &Map<String, Value>, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if (lo..=hi).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                Some(key),
                format!("`{key}` must be an integer from {lo} to {hi} (got {n})"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            Some(key),
            format!("`{key}` must be an integer (got {})", type_name(other)),
        )),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            Some(key),
            format!("`{key}` must be true or false (got {})", type_name(other)),
        )),
    }
}

fn settings(m: &Map<String, Value>) -> Result<Settings, ApiError> {
    let model = match m.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err(ApiError::invalid(
                Some("model"),
                format!(
                    "`model` must be a non-empty string (got {})",
                    type_name(other)
                ),
            ))
        }
    };
    let max_tokens = match integer(m, "max_completion_tokens", 1, i64::from(u32::MAX))? {
        Some(v) => Some(v),
        None => integer(m, "max_tokens", 1, i64::from(u32::MAX))?,
    };
    let n = integer(m, "n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    unimplemented_fields(m)?;
    let stop = match m.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "`stop` must be a string or an array of up to 4 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "stop sequences must not be empty",
        ));
    }
    let include_usage = match m.get("stream_options") {
        Some(Value::Object(o)) => boolean(o, "include_usage")?,
        _ => false,
    };
    Ok(Settings {
        model,
        max_tokens: max_tokens.map(|v| v as usize),
        temperature: number(m, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: number(m, "top_p", 0.0, 1.0)?
            .map(|p| {
                if p > 0.0 {
                    Ok(p as f32)
                } else {
                    Err(ApiError::invalid(Some("top_p"), "`top_p` must be > 0"))
                }
            })
            .transpose()?,
        stop,
        seed: integer(m, "seed", i64::MIN, i64::MAX)?.unwrap_or(0) as u64,
        stream: boolean(m, "stream")?,
        include_usage,
        format: response_format(m)?,
        logprobs: None,
        n,
        presence_penalty: number(m, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        frequency_penalty: number(m, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        logit_bias: logit_bias(m)?,
    })
}

/// Refuses fields afinar does not implement yet, naming the field, rather than answering 200
/// as if they had been applied. Values that mean "off" (`best_of` 1, empty
/// `tools`, `tool_choice: "none"`, `echo: false`) are accepted.
fn unimplemented_fields(m: &Map<String, Value>) -> Result<(), ApiError> {
    let off = |key: &str, v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty() || (key == "tool_choice" && s == "none"),
        Value::Number(n) => match key {
            "best_of" => n.as_f64() == Some(1.0),
            _ => false,
        },
        Value::Bool(true) => false,
    };
    for key in [
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "best_of",
        "echo",
        "suffix",
    ] {
        if let Some(v) = m.get(key) {
            if !off(key, v) {
                return Err(ApiError::invalid(
                    Some(key),
                    format!(
                        "`{key}` is not implemented by this server yet; remove it from the request"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Text of a message's `content`: a string, or OpenAI's array of `{"type": "text", "text"}`.
fn content(v: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (p.get("type"), p.get("text")) {
                (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => Ok(s.as_str()),
                _ => Err(ApiError::invalid(
                    Some(&param),
                    "only text content parts ({\"type\": \"text\", \"text\": …}) are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        Some(Value::Null) | None => Err(ApiError::invalid(
            Some(&param),
            format!("`{param}` is missing"),
        )),
        Some(other) => Err(ApiError::invalid(
            Some(&param),
            format!("`{param}` must be a string (got {})", type_name(other)),
        )),
    }
}

/// Parses and validates a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let m = object(body)?;
    let settings = settings(&m)?;
    let list = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(Some("messages"), "`messages` is empty"))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(Some("messages"), "`messages` is missing"))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("`messages` must be an array (got {})", type_name(other)),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let role = match msg.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ApiError::invalid(
                    Some(&format!("messages[{i}].role")),
                    format!("`messages[{i}].role` must be a string"),
                ))
            }
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    Some(&format!("messages[{i}].role")),
                    format!(
                        "unknown role `{other}` in messages[{i}]; use system, user or assistant"
                    ),
                ))
            }
        };
        messages.push(Message::new(role, content(msg.get("content"), i)?));
    }
    let mut settings = settings;
    let top = integer(&m, "top_logprobs", 0, 20)?.map(|n| n as usize);
    settings.logprobs = match (boolean(&m, "logprobs")?, top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
    };
    Ok(ChatRequest { settings, messages })
}

/// Parses and validates a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let m = object(body)?;
    let settings = settings(&m)?;
    let prompt = match m.get("prompt") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(Some("prompt"), "`prompt` is empty"))
        }
        _ => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must be a non-empty string",
            ))
        }
    };
    let mut settings = settings;
    settings.logprobs = match m.get("logprobs") {
        Some(Value::Bool(false)) => None,
        _ => integer(&m, "logprobs", 0, 5)?.map(|n| n as usize),
    };
    Ok(CompletionRequest { settings, prompt })
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// The counts, with their total.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `{"error": {"message", "type", "param", "code"}}`; `param` and `code` are null when unset.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    /// Always "list".
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

/// One entry of [`ModelList`].
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    /// Always "model".
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

impl<'a> ModelList<'a> {
    /// The list of `ids`, all created at `created` and owned by afinar.
    pub fn new(ids: impl IntoIterator<Item = &'a str>, created: u64) -> Self {
        Self {
            object: "list",
            data: ids
                .into_iter()
                .map(|id| ModelCard {
                    id,
                    object: "model",
                    created,
                    owned_by: "afinar",
                })
                .collect(),
        }
    }
}

/// Who answers and when: the fields every response and chunk starts with.
#[derive(Debug, Clone)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A whole (non-streamed) `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    /// Always "chat.completion".
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChoice<'a>>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'static str,
    /// `{"content": [...]}` when log-probabilities were asked for, else null.
    pub logprobs: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    /// Always "assistant".
    pub role: &'static str,
    pub content: &'a str,
}

impl<'a> ChatCompletion<'a> {
    /// The answers (one per `n`) and the request's usage.
    pub fn new(h: &'a Header, choices: Vec<ChatChoice<'a>>, usage: Usage) -> Self {
        Self {
            id: &h.id,
            object: "chat.completion",
            created: h.created,
            model: &h.model,
            choices,
            usage,
        }
    }
}

impl<'a> ChatChoice<'a> {
    /// Choice `index` of an answer (`n` > 1 gives several).
    pub fn new(index: u32, text: &'a str, reason: &'static str, logprobs: Option<Value>) -> Self {
        Self {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: text,
            },
            finish_reason: reason,
            logprobs,
        }
    }
}

/// One streamed `chat.completion.chunk`: a delta, the finish reason, or (last, when asked for)
/// only the usage with no choices.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    /// Always "chat.completion.chunk".
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message; empty (`{}`) in the chunk that carries the finish reason.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

impl<'a> ChatChunk<'a> {
    fn with(h: &'a Header, choices: Vec<ChunkChoice<'a>>, usage: Option<Usage>) -> Self {
        Self {
            id: &h.id,
            object: "chat.completion.chunk",
            created: h.created,
            model: &h.model,
            choices,
            usage,
        }
    }

    /// The first chunk: the assistant role with empty content.
    pub fn role(h: &'a Header) -> Self {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        Self::with(h, vec![ChunkChoice::new(delta, None)], None)
    }

    /// A piece of text (`Some`) with its tokens' log-probabilities if asked for, or the end
    /// with its reason (text `None`).
    pub fn delta(
        h: &'a Header,
        text: Option<&'a str>,
        reason: Option<&'static str>,
        logprobs: Option<Value>,
    ) -> Self {
        let delta = Delta {
            role: None,
            content: text,
        };
        let mut choice = ChunkChoice::new(delta, reason);
        choice.logprobs = logprobs;
        Self::with(h, vec![choice], None)
    }

    /// The usage-only last chunk (`stream_options.include_usage`).
    pub fn usage(h: &'a Header, usage: Usage) -> Self {
        Self::with(h, vec![], Some(usage))
    }

    /// The same chunk for choice `index` (`n` > 1).
    pub fn at(mut self, index: u32) -> Self {
        self.choices.iter_mut().for_each(|c| c.index = index);
        self
    }
}

impl<'a> ChunkChoice<'a> {
    fn new(delta: Delta<'a>, finish_reason: Option<&'static str>) -> Self {
        Self {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }
    }
}

/// A legacy `text_completion`: the whole response, a streamed chunk (the same shape, with
/// `finish_reason` null until the end and no `usage`), or the usage-only last chunk.
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    /// Always "text_completion".
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    /// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` when asked for, else null.
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

impl<'a> TextCompletion<'a> {
    /// A response or chunk of `choices`, with the usage (None in chunks).
    pub fn of(h: &'a Header, choices: Vec<TextChoice<'a>>, usage: Option<Usage>) -> Self {
        Self {
            id: &h.id,
            object: "text_completion",
            created: h.created,
            model: &h.model,
            choices,
            usage,
        }
    }

    /// `text` as the one choice, with its finish reason (None while streaming) and usage (None
    /// in chunks).
    pub fn new(
        h: &'a Header,
        text: &'a str,
        reason: Option<&'static str>,
        usage: Option<Usage>,
        logprobs: Option<Value>,
    ) -> Self {
        let choice = TextChoice {
            index: 0,
            text,
            logprobs,
            finish_reason: reason,
        };
        Self::of(h, vec![choice], usage)
    }

    /// The same response or chunk for choice `index` (`n` > 1).
    pub fn at(mut self, index: u32) -> Self {
        self.choices.iter_mut().for_each(|c| c.index = index);
        self
    }

    /// The usage-only last chunk (`stream_options.include_usage`).
    pub fn usage(h: &'a Header, usage: Usage) -> Self {
        Self::of(h, vec![], Some(usage))
    }
}

/// `GET /health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// Always "ok".
    pub status: &'static str,
}

/// A token's text for log-probability entries (its raw bytes, lossily as UTF-8).
fn token_entry(table: &[Vec<u8>], token: u32, logprob: f32) -> Value {
    let bytes = table.get(token as usize).cloned().unwrap_or_default();
    serde_json::json!({
        "token": String::from_utf8_lossy(&bytes),
        "logprob": logprob,
        "bytes": bytes,
    })
}

/// Chat's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
pub fn chat_logprobs(table: &[Vec<u8>], lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = token_entry(table, t.token, t.logprob);
            e["top_logprobs"] = t
                .top
                .iter()
                .map(|&(tok, lp)| token_entry(table, tok, lp))
                .collect();
            e
        })
        .collect();
    serde_json::json!({ "content": content })
}

/// Completions' `logprobs`: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
/// offsets counted in characters from `offset`.
pub fn text_logprobs(table: &[Vec<u8>], lps: &[TokenLogprob], offset: usize) -> Value {
    let text =
        |t: u32| String::from_utf8_lossy(table.get(t as usize).map_or(&[][..], |b| b)).into_owned();
    let mut at = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for t in lps {
        offsets.push(at);
        at += text(t.token).chars().count();
    }
    serde_json::json!({
        "tokens": lps.iter().map(|t| text(t.token)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| {
            t.top.iter().map(|&(tok, lp)| (text(tok), Value::from(lp))).collect::<Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    //! Each response struct serializes to exactly the bytes of the `json!` literal it replaced
    //! (serde_json keeps insertion order, so field order is part of the check).
    use super::*;
    use serde_json::json;

    fn same(typed: &impl Serialize, literal: Value) {
        assert_eq!(
            serde_json::to_string(typed).unwrap(),
            literal.to_string(),
            "typed response differs from the OpenAI shape"
        );
    }

    #[test]
    fn response_structs_match_the_openai_shapes() {
        let h = Header {
            id: "chatcmpl-1f".into(),
            created: 1_700_000_000,
            model: "smollm2".into(),
        };
        let u = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            total_tokens: 7,
        };
        let (id, created, model) = (&h.id, h.created, &h.model);
        same(
            &ChatCompletion::new(&h, vec![ChatChoice::new(0, "Hi!", "stop", None)], u),
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop", "logprobs": null}],
                "usage": u,
            }),
        );
        same(
            &ChatChunk::role(&h),
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
        );
        for (text, reason) in [(Some("Hi"), None), (None, Some("length"))] {
            same(
                &ChatChunk::delta(&h, text, reason, None),
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": text.map_or(json!({}), |t| json!({"content": t})),
                                 "finish_reason": reason}]}),
            );
        }
        same(
            &ChatChunk::usage(&h, u),
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": u}),
        );
        same(
            &TextCompletion::new(&h, "four", Some("stop"), Some(u), None),
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": "four", "logprobs": null, "finish_reason": "stop"}],
                "usage": u,
            }),
        );
        same(
            &TextCompletion::new(&h, "fo", None, None, None),
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": "fo", "logprobs": null, "finish_reason": null}]}),
        );
        same(
            &TextCompletion::usage(&h, u),
            json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": u}),
        );
        same(
            &ModelList::new(["smollm2", "rand"], created),
            json!({"object": "list", "data": [
                {"id": "smollm2", "object": "model", "created": created, "owned_by": "afinar"},
                {"id": "rand", "object": "model", "created": created, "owned_by": "afinar"},
            ]}),
        );
        for e in [
            ApiError::invalid(Some("n"), "only n = 1"),
            ApiError::unauthorized(),
        ] {
            same(
                &e.body(),
                json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}),
            );
        }
        same(&Health { status: "ok" }, json!({"status": "ok"}));
    }
}
