//! Chat templates: the model's own Jinja template rendered with `minijinja`, configured like
//! Hugging Face's `apply_chat_template` (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `strftime_now`, Python-style `tojson`). Data preparation, generation and
//! the server all render conversations through this one type.
//!
//! Templates come from model files, i.e. untrusted input, so every render runs under limits
//! proportional to the conversation: minijinja fuel (instructions), a recursion limit and a cap
//! on the output's size; the vendored minijinja also bounds string and list concatenation (see
//! `vendor/minijinja/PATCHED.md`). Exceeding one is an error naming the template's origin.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Instructions any render may execute, on top of [`FUEL_PER_MESSAGE`] and [`FUEL_PER_BYTE`].
/// Real templates (SmolLM2, Qwen2, Llama 3, Mistral) take a few dozen per message.
pub const FUEL_BASE: u64 = 200_000;
/// Extra instructions allowed per message of the conversation.
pub const FUEL_PER_MESSAGE: u64 = 2_000;
/// Extra instructions allowed per byte of the messages (templates that walk content).
pub const FUEL_PER_BYTE: u64 = 4;
/// Output any render may write, on top of 4 bytes per input byte and [`OUTPUT_PER_MESSAGE`].
pub const OUTPUT_BASE: usize = 1 << 20;
/// Extra output (markup) allowed per message.
pub const OUTPUT_PER_MESSAGE: usize = 4 << 10;
/// Text any render may build by concatenation, repetition and joins, on top of 16 bytes per
/// input byte and [`BUILD_PER_MESSAGE`] (templates build each turn's text a few times).
pub const BUILD_BASE: usize = 64 << 20;
/// Extra text built allowed per message.
pub const BUILD_PER_MESSAGE: usize = 16 << 10;
/// minijinja's recursion budget (a loop or `if` costs 1, a macro call or include about 10).
pub const RECURSION_LIMIT: usize = 200;

/// A compiled chat template with the special tokens it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    /// Where the template came from, for errors: a file and key, e.g.
    /// `model.gguf (GGUF key tokenizer.chat_template)`.
    pub origin: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; errors name the template problem.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(|state, value, method, args| {
            guard_method(value, method, args)?;
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        // Filters whose output can dwarf their input, bounded like concatenation.
        env.add_filter("join", join_filter);
        env.add_filter("replace", |s: String, from: String, to: String| {
            replace_guarded(&s, &from, &to)
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                Error::Template(format!(
                    "could not parse the model's chat template: {}",
                    one_line(&e.to_string())
                ))
            })?;
        Ok(Self {
            env,
            source: source.to_string(),
            origin: "the chat template".to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The same template, naming `origin` (file and key) in its errors.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// The template of a model, if it has one, compiled with its tokenizer's special tokens.
    pub fn for_model(source: Option<String>, tok: &super::TextTokenizer) -> Result<Option<Self>> {
        source
            .map(|t| Self::new(&t, tok.bos_token.as_deref(), tok.eos_token.as_deref()))
            .transpose()
    }

    /// [`for_model`](Self::for_model) for the template read from `model`, whose file and key
    /// every error (parse or render) names.
    pub fn for_source(
        source: Option<String>,
        tok: &super::TextTokenizer,
        model: &super::ModelSource,
    ) -> Result<Option<Self>> {
        let origin = origin(model);
        match Self::for_model(source, tok) {
            Ok(t) => Ok(t.map(|t| t.with_origin(origin))),
            Err(e) => Err(Error::Template(format!("{origin}: {e}"))),
        }
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer starts. Runs under [`RenderLimits::for_messages`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_limits(
            messages,
            add_generation_prompt,
            RenderLimits::for_messages(messages),
        )
    }

    /// Whether the template leaves out an assistant turn's reasoning (its text up to
    /// `</think>`), at least when a user turn follows, as DeepSeek-R1's (always) and Qwen3's
    /// (before the last question) do: a model trained on such turns sees their answers only.
    pub fn drops_reasoning(&self) -> bool {
        let probe = [
            Message::new("user", "q"),
            Message::new(
                "assistant",
                "<think>\nafinar-probe-reasoning\n</think>\n\nafinar-probe-answer",
            ),
            Message::new("user", "q2"),
        ];
        self.render(&probe, false).is_ok_and(|t| {
            t.contains("afinar-probe-answer") && !t.contains("afinar-probe-reasoning")
        })
    }

    /// [`render`](Self::render) under explicit limits.
    pub fn render_with_limits(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        // Fuel lives in the environment; a clone per render keeps `render(&self)` shareable
        // across threads (the environment holds only Arcs and the compiled template).
        let mut env = self.env.clone();
        env.set_fuel(Some(limits.fuel));
        let tmpl = env.get_template("chat").expect("template added in new()");
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: limits.output_bytes,
            exceeded: false,
        };
        let result = minijinja::build_limits::with_build_budget(limits.build_bytes, || {
            tmpl.render_captured_to(
                minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                },
                &mut out,
            )
        });
        let origin = &self.origin;
        match result {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| {
                Error::Template(format!("{origin}: rendering produced invalid UTF-8"))
            }),
            Err(_) if out.exceeded => Err(Error::Template(format!(
                "{origin}: rendering exceeded the output limit of {} bytes for {} messages \
                 (a template that loops or doubles text?); fix or replace the template",
                limits.output_bytes,
                messages.len()
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::Template(format!(
                "{origin}: rendering exceeded the limit of {} template instructions for {} \
                 messages (a template that loops without end?); fix or replace the template",
                limits.fuel,
                messages.len()
            ))),
            Err(e) => Err(Error::Template(format!(
                "{origin}: rendering failed: {}",
                one_line(&error_chain(&e))
            ))),
        }
    }
}

/// Where a model's template is read from: the GGUF key, `chat_template.jinja`, or the
/// `chat_template` key of `tokenizer_config.json` (as `hf::load_text_side` reads it).
pub fn origin(model: &super::ModelSource) -> String {
    match model {
        super::ModelSource::Gguf(path) => {
            format!("{} (GGUF key tokenizer.chat_template)", path.display())
        }
        super::ModelSource::HfDir(dir) => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                jinja.display().to_string()
            } else {
                format!(
                    "{} (key chat_template)",
                    dir.join("tokenizer_config.json").display()
                )
            }
        }
    }
}

/// Bounds on one render: instructions (minijinja fuel) and output bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    pub fuel: u64,
    pub output_bytes: usize,
    /// Bytes all string concatenation, repetition and joins of the render may build.
    pub build_bytes: usize,
}

impl RenderLimits {
    /// Limits proportional to the conversation, so a 10,000-turn conversation renders while a
    /// template that loops or doubles its output stops within a bounded time and memory.
    pub fn for_messages(messages: &[Message]) -> Self {
        let n = messages.len();
        let bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        Self {
            fuel: FUEL_BASE
                .saturating_add(FUEL_PER_MESSAGE.saturating_mul(n as u64))
                .saturating_add(FUEL_PER_BYTE.saturating_mul(bytes as u64)),
            output_bytes: OUTPUT_BASE
                .saturating_add(OUTPUT_PER_MESSAGE.saturating_mul(n))
                .saturating_add(bytes.saturating_mul(4)),
            build_bytes: BUILD_BASE
                .saturating_add(BUILD_PER_MESSAGE.saturating_mul(n))
                .saturating_add(bytes.saturating_mul(16)),
        }
    }
}

fn too_large(what: &str) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{what} would build a string too large"),
    )
}

/// Appends `piece`, charging the render's build budget and keeping within minijinja's
/// concatenation cap.
fn push_bounded(
    out: &mut String,
    piece: &str,
    what: &str,
) -> std::result::Result<(), minijinja::Error> {
    minijinja::build_limits::charge_build(piece.len())?;
    if out.len() + piece.len() > minijinja::build_limits::MAX_CONCAT_STRING_LEN {
        return Err(too_large(what));
    }
    out.push_str(piece);
    Ok(())
}

/// `join` with its output bounded (the builtin grows without limit).
fn join_filter(
    value: Value,
    joiner: Option<String>,
) -> std::result::Result<Value, minijinja::Error> {
    let joiner = joiner.unwrap_or_default();
    let mut out = String::new();
    for (i, item) in value.try_iter()?.enumerate() {
        if i > 0 {
            push_bounded(&mut out, &joiner, "join")?;
        }
        match item.as_str() {
            Some(s) => push_bounded(&mut out, s, "join")?,
            None => push_bounded(&mut out, &item.to_string(), "join")?,
        }
    }
    Ok(Value::from(out))
}

/// `replace` with its output size checked before it is built.
fn replace_guarded(s: &str, from: &str, to: &str) -> std::result::Result<Value, minijinja::Error> {
    let hits = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let len = s.len().saturating_add(hits.saturating_mul(to.len()));
    minijinja::build_limits::charge_build(len)?;
    if len > minijinja::build_limits::MAX_CONCAT_STRING_LEN {
        return Err(too_large("replace"));
    }
    Ok(Value::from(s.replace(from, to)))
}

/// Checks the Python string methods (minijinja-contrib's pycompat) whose output can dwarf
/// their input before they run: `join`, `replace`, and padding to a width.
fn guard_method(
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<(), minijinja::Error> {
    let Some(s) = value.as_str() else {
        return Ok(());
    };
    let size = match method {
        "join" => {
            let Some(items) = args.first() else {
                return Ok(());
            };
            let mut total = 0usize;
            for (i, item) in items.try_iter()?.enumerate() {
                let n = item.as_str().map_or(0, str::len);
                total = total
                    .saturating_add(n)
                    .saturating_add(if i > 0 { s.len() } else { 0 });
            }
            total
        }
        "replace" => match (
            args.first().and_then(|v| v.as_str()),
            args.get(1).and_then(|v| v.as_str()),
        ) {
            (Some(from), Some(to)) => {
                let hits = if from.is_empty() {
                    s.chars().count() + 1
                } else {
                    s.matches(from).count()
                };
                s.len().saturating_add(hits.saturating_mul(to.len()))
            }
            _ => 0,
        },
        "center" | "ljust" | "rjust" | "zfill" => args
            .first()
            .and_then(|w| w.as_usize())
            .unwrap_or(0)
            .saturating_mul(4),
        "expandtabs" => s
            .len()
            .saturating_mul(args.first().and_then(|w| w.as_usize()).unwrap_or(8).max(1)),
        _ => 0,
    };
    minijinja::build_limits::charge_build(size)?;
    if size > minijinja::build_limits::MAX_CONCAT_STRING_LEN {
        return Err(too_large(&format!("str.{method}")));
    }
    Ok(())
}

/// A writer that refuses to grow past `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The error and its root cause (an include's failure sits in the source), without minijinja's
/// multi-line source excerpt.
fn error_chain(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    let mut root = None;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        root = Some(cause);
        source = cause.source();
    }
    if let Some(root) = root {
        out.push_str(": ");
        out.push_str(&root.to_string());
    }
    out
}

/// minijinja's alternate error format spans lines (source excerpt); errors here are one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '-' || c == '~'))
        .take(3)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Python's `json.dumps(value, ensure_ascii=False)` with optional `indent`, as templates expect
/// (minijinja's own `tojson` is compact and HTML-escaped, which changes the prompt).
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > 64) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: indent above 64",
        ));
    }
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `strftime_now(fmt)` for templates that print today's date (Llama 3.2): %d %m %Y %y %b %B %H %M %S.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t =
            ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", None, None).unwrap();
        let env = &t.env;
        let out = env
            .render_str(
                "{{ x | tojson }}",
                minijinja::context! { x => serde_json::json!({"a": [1, "é"], "b": {}}) },
            )
            .unwrap();
        assert_eq!(out, r#"{"a": [1, "é"], "b": {}}"#);
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
