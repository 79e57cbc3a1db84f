//! The shapes a training example comes in — alpaca, chat (OpenAI fine-tuning JSONL), ShareGPT,
//! prompt/completion, raw text — detected from each record's fields (or forced), with user
//! field names mapped onto ours, all turned into one [`Example`] type.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{Map, Value};

use super::read::{RawRecord, RawValue};

/// A dataset shape; `Auto` detects it per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Alpaca,
    Chat,
    ShareGpt,
    Completion,
    Text,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "alpaca" => Self::Alpaca,
            "chat" | "messages" | "openai" => Self::Chat,
            "sharegpt" => Self::ShareGpt,
            "completion" | "prompt-completion" => Self::Completion,
            "text" => Self::Text,
            other => {
                return Err(format!(
                "unknown format '{other}' (valid: auto, alpaca, chat, sharegpt, completion, text)"
            ))
            }
        })
    }
}

/// The canonical spelling `FromStr` reads (the train config writes `format` with it).
impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Alpaca => "alpaca",
            Self::Chat => "chat",
            Self::ShareGpt => "sharegpt",
            Self::Completion => "completion",
            Self::Text => "text",
        })
    }
}

/// One turn of a conversation; `train` is false for turns that must carry no loss (every
/// non-assistant turn, and assistant turns with OpenAI's `"weight": 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    pub train: bool,
}

/// A training example in one of the three forms the tokenizer stage handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Rendered with the model's chat template; loss on assistant turns.
    Chat(Vec<Turn>),
    /// Raw prompt followed by the completion and EOS; loss on the completion and EOS.
    Completion { prompt: String, completion: String },
    /// Continued pre-training text; loss everywhere, EOS appended.
    Text(String),
}

/// An example with what the later stages need to know about its origin.
#[derive(Debug, Clone)]
pub struct Item {
    pub example: Example,
    /// `file:line`, for messages.
    pub location: String,
    /// Text fields whose value was a number or boolean, read as its JSON text (`7`, `true`).
    pub coerced: Vec<String>,
    /// Split key: the `--split-key` field's value if set and present, else the content.
    pub split_key: String,
    /// Reference answers for evaluation (alpaca `output` plus any `answers`).
    pub references: Vec<String>,
}

/// Maps our field names (`instruction`, `input`, `output`, `messages`, `conversations`,
/// `prompt`, `completion`, `text`, `system`, `answers`) to the user's.
#[derive(Debug, Clone, Default)]
pub struct FieldMap(pub HashMap<String, String>);

impl FieldMap {
    fn name<'a>(&'a self, ours: &'a str) -> &'a str {
        self.0.get(ours).map_or(ours, String::as_str)
    }
    fn get<'a>(&self, obj: &'a Map<String, Value>, ours: &str) -> Option<&'a Value> {
        obj.get(self.name(ours))
    }
    /// A text field: a string; a number or boolean is read as its JSON text and its name noted
    /// in `coerced` (the caller says so, or refuses it with --strict); an array or object is an
    /// error naming the field and what it holds.
    fn string(
        &self,
        obj: &Map<String, Value>,
        ours: &str,
        coerced: &mut Vec<String>,
    ) -> Result<Option<String>, Rejection> {
        let name = self.name(ours);
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                coerced.push(name.to_string());
                Ok(Some(v.to_string()))
            }
            Some(other) => Err((
                "wrong field type",
                format!(
                    "field '{name}' must be a string, found {}",
                    super::read::json_kind(other)
                ),
            )),
        }
    }
}

/// Why a record was not turned into an example: (reason kind, full message).
pub type Rejection = (&'static str, String);

/// Converts a raw record. `split_key_field` names the field that groups examples for splitting.
pub fn to_item(
    rec: &RawRecord,
    format: Format,
    fields: &FieldMap,
    split_key_field: Option<&str>,
) -> Result<Item, Rejection> {
    let loc = rec.location();
    let mut coerced = Vec::new();
    let (example, references, obj) = match &rec.value {
        RawValue::Text(t) => {
            if format != Format::Auto && format != Format::Text {
                return Err((
                    "plain text in a structured format",
                    format!("{loc}: a plain text file cannot be read as {format:?}"),
                ));
            }
            (Example::Text(t.clone()), vec![], None)
        }
        RawValue::Object(obj) => {
            let (ex, refs) = object_to_example(obj, format, fields, &mut coerced)
                .map_err(|(k, m)| (k, format!("{loc}: {m}")))?;
            (ex, refs, Some(obj))
        }
    };
    if is_empty(&example) {
        return Err(("empty example", format!("{loc}: the example has no text")));
    }
    let split_key = split_key_field
        .and_then(|f| obj.and_then(|o| o.get(f)))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| content_key(&example));
    Ok(Item {
        example,
        coerced,
        location: loc,
        split_key,
        references,
    })
}

fn is_empty(ex: &Example) -> bool {
    match ex {
        Example::Chat(turns) => turns.iter().all(|t| t.content.trim().is_empty()),
        Example::Completion { prompt, completion } => prompt.is_empty() && completion.is_empty(),
        Example::Text(t) => t.trim().is_empty(),
    }
}

/// The example's content as one string: the default split key, so duplicates share a split.
fn content_key(ex: &Example) -> String {
    match ex {
        Example::Chat(turns) => turns
            .iter()
            .map(|t| format!("{}\u{1}{}\u{2}", t.role, t.content))
            .collect(),
        Example::Completion { prompt, completion } => format!("{prompt}\u{1}{completion}"),
        Example::Text(t) => t.clone(),
    }
}

fn detect(obj: &Map<String, Value>, f: &FieldMap) -> Option<Format> {
    let has = |k: &str| f.get(obj, k).is_some();
    if has("messages") {
        Some(Format::Chat)
    } else if has("conversations") {
        Some(Format::ShareGpt)
    } else if has("instruction") && has("output") {
        Some(Format::Alpaca)
    } else if has("prompt") && has("completion") {
        Some(Format::Completion)
    } else if has("text") {
        Some(Format::Text)
    } else {
        None
    }
}

fn fields_of(obj: &Map<String, Value>) -> String {
    let names: Vec<&str> = obj.keys().map(String::as_str).collect();
    format!("[{}]", names.join(", "))
}

fn object_to_example(
    obj: &Map<String, Value>,
    format: Format,
    f: &FieldMap,
    coerced: &mut Vec<String>,
) -> Result<(Example, Vec<String>), Rejection> {
    let format = match format {
        Format::Auto => detect(obj, f).ok_or_else(|| {
            (
                "unrecognised record shape",
                format!(
                    "record has fields {}; expected messages (chat), conversations (ShareGPT), instruction+output (alpaca), \
                     prompt+completion, or text — or map yours with --map",
                    fields_of(obj)
                ),
            )
        })?,
        other => other,
    };
    let missing = |fmt: &str, field: &str| {
        (
            "missing fields",
            format!(
                "{fmt} record needs '{}' but has fields {}",
                f.name(field),
                fields_of(obj)
            ),
        )
    };
    match format {
        Format::Alpaca => {
            let instruction = f
                .string(obj, "instruction", coerced)?
                .ok_or_else(|| missing("alpaca", "instruction"))?;
            let output = f
                .string(obj, "output", coerced)?
                .ok_or_else(|| missing("alpaca", "output"))?;
            let input = f.string(obj, "input", coerced)?.unwrap_or_default();
            let user = if input.trim().is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            let mut turns = Vec::new();
            if let Some(sys) = f.string(obj, "system", coerced)?.filter(|s| !s.is_empty()) {
                turns.push(Turn {
                    role: "system".into(),
                    content: sys,
                    train: false,
                });
            }
            turns.push(Turn {
                role: "user".into(),
                content: user,
                train: false,
            });
            turns.push(Turn {
                role: "assistant".into(),
                content: output.clone(),
                train: true,
            });
            let mut refs = vec![output];
            if let Some(Value::Array(a)) = f.get(obj, "answers") {
                refs.extend(a.iter().filter_map(|v| v.as_str().map(str::to_string)));
            }
            Ok((Example::Chat(turns), refs))
        }
        Format::Chat => {
            let msgs = match f.get(obj, "messages") {
                Some(Value::Array(a)) => a,
                Some(_) => {
                    return Err((
                        "wrong field type",
                        format!(
                            "'{}' must be an array of {{role, content}}",
                            f.name("messages")
                        ),
                    ))
                }
                None => return Err(missing("chat", "messages")),
            };
            let turns = conversation(msgs, "role", "content", |r| match r {
                "system" | "developer" => Some("system"),
                "user" => Some("user"),
                "assistant" => Some("assistant"),
                _ => None,
            })?;
            let refs = last_assistant(&turns);
            Ok((Example::Chat(turns), refs))
        }
        Format::ShareGpt => {
            let msgs = match f.get(obj, "conversations") {
                Some(Value::Array(a)) => a,
                Some(_) => {
                    return Err((
                        "wrong field type",
                        format!(
                            "'{}' must be an array of {{from, value}}",
                            f.name("conversations")
                        ),
                    ))
                }
                None => return Err(missing("ShareGPT", "conversations")),
            };
            let turns = conversation(msgs, "from", "value", |r| match r {
                "system" => Some("system"),
                "human" | "user" => Some("user"),
                "gpt" | "assistant" | "chatgpt" | "bing" | "bard" => Some("assistant"),
                _ => None,
            })?;
            let refs = last_assistant(&turns);
            Ok((Example::Chat(turns), refs))
        }
        Format::Completion => {
            let prompt = f
                .string(obj, "prompt", coerced)?
                .ok_or_else(|| missing("completion", "prompt"))?;
            let completion = f
                .string(obj, "completion", coerced)?
                .ok_or_else(|| missing("completion", "completion"))?;
            Ok((
                Example::Completion {
                    prompt,
                    completion: completion.clone(),
                },
                vec![completion],
            ))
        }
        Format::Text => {
            let text = f
                .string(obj, "text", coerced)?
                .ok_or_else(|| missing("text", "text"))?;
            Ok((Example::Text(text), vec![]))
        }
        Format::Auto => unreachable!(),
    }
}

fn last_assistant(turns: &[Turn]) -> Vec<String> {
    turns
        .iter()
        .rev()
        .find(|t| t.role == "assistant")
        .map(|t| vec![t.content.clone()])
        .unwrap_or_default()
}

fn conversation(
    msgs: &[Value],
    role_key: &str,
    content_key: &str,
    role: impl Fn(&str) -> Option<&'static str>,
) -> Result<Vec<Turn>, Rejection> {
    let mut turns = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err((
                "malformed message",
                format!("message {} is not an object", i + 1),
            ));
        };
        let raw_role = obj.get(role_key).and_then(Value::as_str).ok_or_else(|| {
            (
                "malformed message",
                format!(
                    "message {} has no '{role_key}' (fields {})",
                    i + 1,
                    fields_of(obj)
                ),
            )
        })?;
        let r = role(raw_role).ok_or_else(|| {
            (
                "unknown role",
                format!(
                    "message {}: unknown role '{raw_role}' (expected system, user or assistant)",
                    i + 1
                ),
            )
        })?;
        let content = match obj.get(content_key) {
            Some(Value::String(s)) => s.clone(),
            // OpenAI's content parts: concatenate the text parts.
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Some(Value::Null) | None => {
                return Err((
                    "malformed message",
                    format!("message {} has no '{content_key}'", i + 1),
                ));
            }
            Some(_) => {
                return Err((
                    "wrong field type",
                    format!("message {}: '{content_key}' must be a string", i + 1),
                ))
            }
        };
        let weight = obj.get("weight").and_then(Value::as_f64).unwrap_or(1.0);
        turns.push(Turn {
            role: r.to_string(),
            content,
            train: r == "assistant" && weight > 0.0,
        });
    }
    if !turns.iter().any(|t| t.role == "assistant") {
        return Err((
            "no assistant turn",
            "the conversation has no assistant message to learn from".to_string(),
        ));
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn rec(v: Value) -> RawRecord {
        RawRecord {
            file: Arc::new(PathBuf::from("d.jsonl")),
            line: 3,
            value: RawValue::Object(v.as_object().unwrap().clone()),
        }
    }

    #[test]
    fn detects_each_shape() {
        let f = FieldMap::default();
        let cases = [
            (
                serde_json::json!({"instruction": "a", "input": "b", "output": "c"}),
                "alpaca",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
                "chat",
            ),
            (
                serde_json::json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
                "sharegpt",
            ),
            (
                serde_json::json!({"prompt": "p", "completion": "c"}),
                "completion",
            ),
            (serde_json::json!({"text": "t"}), "text"),
        ];
        for (v, name) in cases {
            let item = to_item(&rec(v), Format::Auto, &f, None).unwrap();
            let got = match &item.example {
                Example::Chat(t) if t[0].content == "a\n\nb" => "alpaca",
                Example::Chat(t) if t.len() == 2 && t[1].role == "assistant" && t[1].train => {
                    "chat"
                }
                Example::Completion { .. } => "completion",
                Example::Text(_) => "text",
                _ => "?",
            };
            let want = if name == "sharegpt" { "chat" } else { name };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn missing_fields_name_what_the_record_had() {
        let f = FieldMap::default();
        let err = to_item(
            &rec(serde_json::json!({"instruction": "a", "answer": "b"})),
            Format::Alpaca,
            &f,
            None,
        )
        .unwrap_err();
        assert_eq!(err.0, "missing fields");
        assert!(
            err.1.starts_with(
                "d.jsonl:3: alpaca record needs 'output' but has fields [instruction, answer]"
            ),
            "{}",
            err.1
        );
        let err = to_item(&rec(serde_json::json!({"q": "a"})), Format::Auto, &f, None).unwrap_err();
        assert!(err.1.contains("record has fields [q]"), "{}", err.1);
    }

    #[test]
    fn field_map_and_weights_and_roles() {
        let mut f = FieldMap::default();
        f.0.insert("instruction".into(), "question".into());
        f.0.insert("output".into(), "answer".into());
        let item = to_item(
            &rec(serde_json::json!({"question": "q", "answer": "a", "answers": ["b"]})),
            Format::Auto,
            &f,
            None,
        )
        .unwrap();
        assert_eq!(item.references, vec!["a", "b"]);
        let v = serde_json::json!({"messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "x", "weight": 0}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "y"}]});
        let Example::Chat(turns) = to_item(&rec(v), Format::Auto, &FieldMap::default(), None)
            .unwrap()
            .example
        else {
            panic!()
        };
        assert_eq!(
            turns.iter().map(|t| t.train).collect::<Vec<_>>(),
            vec![false, false, false, false, true]
        );
        let bad = serde_json::json!({"messages": [{"role": "wizard", "content": "u"}]});
        let err = to_item(&rec(bad), Format::Auto, &FieldMap::default(), None).unwrap_err();
        assert!(err.1.contains("unknown role 'wizard'"), "{}", err.1);
    }

    #[test]
    fn split_key_field_groups_examples() {
        let f = FieldMap::default();
        let a = to_item(
            &rec(serde_json::json!({"prompt": "1", "completion": "x", "verb": "tener"})),
            Format::Auto,
            &f,
            Some("verb"),
        )
        .unwrap();
        let b = to_item(
            &rec(serde_json::json!({"prompt": "2", "completion": "y", "verb": "tener"})),
            Format::Auto,
            &f,
            Some("verb"),
        )
        .unwrap();
        assert_eq!(a.split_key, b.split_key);
    }
}
