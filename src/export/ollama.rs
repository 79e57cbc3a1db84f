//! An Ollama model folder: the merged GGUF beside a `Modelfile` that never relies on Ollama's
//! template auto-detection. The chat template is recognised from its Jinja source (ChatML,
//! Llama 3, Mistral) and written out in Ollama's Go-template syntax; the template is proven
//! equivalent on a probe conversation before anything is written (an unrecognised or
//! non-equivalent template is an error unless `force`), every end token becomes a
//! `PARAMETER stop`, and the system message training used (or the template's own default)
//! becomes `SYSTEM`, so the deployed model sees the prompt it was trained on.

use super::tensors::ModelInfo;
use crate::model::{Message, Model};
use crate::{Error, Result};

/// Chat-template families afinar can write for Ollama.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    ChatMl,
    Llama3,
    Mistral,
}

impl Family {
    /// Recognises the family from the Jinja source.
    pub fn detect(jinja: &str) -> Option<Family> {
        if jinja.contains("<|im_start|>") {
            Some(Family::ChatMl)
        } else if jinja.contains("<|start_header_id|>") {
            Some(Family::Llama3)
        } else if jinja.contains("[INST]") {
            Some(Family::Mistral)
        } else {
            None
        }
    }
}

/// The literal text around each turn: `pre + content + post`. `system` is None when the format
/// has no system turn (Mistral). `generation` opens the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Turns {
    pub system: Option<(String, String)>,
    pub user: (String, String),
    pub assistant: (String, String),
    pub generation: String,
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

impl Turns {
    /// The turns of `family`; Mistral's spacing (which varies between its template versions) is
    /// read from `render`ed probes.
    fn of(family: Family, probe: &Probe) -> Result<Turns> {
        Ok(match family {
            Family::ChatMl => Turns {
                system: Some(pair("<|im_start|>system\n", "<|im_end|>\n")),
                user: pair("<|im_start|>user\n", "<|im_end|>\n"),
                assistant: pair("<|im_start|>assistant\n", "<|im_end|>\n"),
                generation: "<|im_start|>assistant\n".into(),
            },
            Family::Llama3 => {
                let h = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
                Turns {
                    system: Some((h("system"), "<|eot_id|>".into())),
                    user: (h("user"), "<|eot_id|>".into()),
                    assistant: (h("assistant"), "<|eot_id|>".into()),
                    generation: h("assistant"),
                }
            }
            Family::Mistral => {
                let (u, a) = (Probe::USER, Probe::ANSWER);
                let one = probe.render(&[Message::new("user", u)], false)?;
                let two = probe.render(
                    &[Message::new("user", u), Message::new("assistant", a)],
                    false,
                )?;
                let split = |text: &str, mid: &str| -> Option<(String, String)> {
                    let p = text.find(mid)?;
                    Some(pair(&text[..p], &text[p + mid.len()..]))
                };
                let user = split(&one, u);
                let asst = two.strip_prefix(one.as_str()).and_then(|t| split(t, a));
                let (Some(user), Some(assistant)) = (user, asst) else {
                    return Err(Error::Template(
                        "the Mistral-style chat template could not be read from probe renderings; pass --force to export without an Ollama template check".into(),
                    ));
                };
                Turns {
                    system: None,
                    user,
                    assistant,
                    generation: String::new(),
                }
            }
        })
    }

    /// What the Go template renders for `messages` with `system` as Ollama's `.System`.
    pub fn render(&self, system: Option<&str>, messages: &[Message]) -> String {
        let mut out = String::new();
        if let (Some(s), Some((pre, post))) = (system.filter(|s| !s.is_empty()), &self.system) {
            out += &format!("{pre}{s}{post}");
        }
        for m in messages {
            let (pre, post) = match m.role.as_str() {
                "user" => &self.user,
                "assistant" => &self.assistant,
                _ => continue,
            };
            out += &format!("{pre}{}{post}", m.content);
        }
        out + &self.generation
    }

    /// The same, in Ollama's Go-template syntax (`.System`, `range .Messages`, `.Role`,
    /// `.Content`). Ollama puts the Modelfile's `SYSTEM` (or the request's system message) in
    /// `.System`; system entries in `.Messages` are skipped, as Ollama's own templates do.
    pub fn go_template(&self) -> String {
        let mut t = String::new();
        if let Some((pre, post)) = &self.system {
            t += &format!("{{{{- if .System }}}}{pre}{{{{ .System }}}}{post}{{{{ end }}}}\n");
        }
        t += "{{- range .Messages }}\n";
        let (up, us) = &self.user;
        t += &format!("{{{{- if eq .Role \"user\" }}}}{up}{{{{ .Content }}}}{us}{{{{ end }}}}\n");
        let (ap, as_) = &self.assistant;
        t += &format!(
            "{{{{- if eq .Role \"assistant\" }}}}{ap}{{{{ .Content }}}}{as_}{{{{ end }}}}\n"
        );
        t += "{{- end }}";
        t += &self.generation;
        t
    }
}

/// Renders the model's Jinja template, with the leading BOS removed for the families whose BOS
/// llama.cpp and Ollama add from the GGUF's `add_bos_token` (Llama 3, Mistral). ChatML models
/// have no BOS of their own; some (SmolLM2) name `<|im_start|>` as theirs, which must stay.
struct Probe<'a> {
    model: ModelInfo<'a>,
    strip_bos: bool,
}

impl Probe<'_> {
    const USER: &'static str = "\u{2063}QUESTION\u{2063}";
    const ANSWER: &'static str = "\u{2063}ANSWER\u{2063}";

    fn render(&self, messages: &[Message], generation: bool) -> Result<String> {
        let text = self.model.render_chat(messages, generation)?;
        Ok(match self.model.tokenizer.bos_token.as_deref() {
            Some(b) if self.strip_bos && !b.is_empty() => {
                text.strip_prefix(b).map(str::to_string).unwrap_or(text)
            }
            _ => text,
        })
    }
}

/// A `Modelfile` and what was decided writing it.
#[derive(Debug, Clone)]
pub struct Modelfile {
    pub text: String,
    pub family: Option<Family>,
    /// The `SYSTEM` line's message, if any.
    pub system: Option<String>,
    /// The template's turns (None when the family was not recognised and `force` was given).
    pub turns: Option<Turns>,
}

/// The Modelfile for `model` whose weights are `gguf_name` beside it. `system` is the default
/// system message training used (the run's `system` key); when None, a default the template
/// writes by itself (SmolLM2, Qwen2) is kept. `force` writes a raw `{{ .Prompt }}` template for
/// an unrecognised family and skips the equivalence check.
pub fn modelfile(
    model: &Model,
    gguf_name: &str,
    system: Option<&str>,
    force: bool,
) -> Result<Modelfile> {
    modelfile_for(ModelInfo::of(model), gguf_name, system, force)
}

/// [`modelfile`] for a model known by its description alone (tokenizer and template).
pub fn modelfile_for(
    model: ModelInfo,
    gguf_name: &str,
    system: Option<&str>,
    force: bool,
) -> Result<Modelfile> {
    let source = model.chat_template.map(|t| t.source.as_str());
    let family = source.and_then(Family::detect);
    let probe = Probe {
        model,
        strip_bos: family != Some(Family::ChatMl),
    };
    let mut text = format!("# Written by afinar export.\nFROM ./{gguf_name}\n");
    let mut turns = None;
    let mut system = system.filter(|s| !s.is_empty()).map(str::to_string);
    match family {
        Some(f) => {
            let t = Turns::of(f, &probe)?;
            if system.is_none() {
                system = template_default_system(&probe, &t)?;
            }
            if system.is_some() && t.system.is_none() && !force {
                return Err(Error::Unsupported(format!(
                    "the model's chat template ({f:?}) has no system turn, but training used a system message; pass --force to export without it"
                )));
            }
            let conv = probe_conversation(system.as_deref());
            let want = probe.render(&conv, true)?;
            let got = t.render(system.as_deref(), &conv);
            if want != got && !force {
                return Err(Error::Template(format!(
                    "the Ollama template written for the {f:?} family does not reproduce the model's chat template on a probe conversation (Jinja {want:?}, Ollama {got:?}); pass --force to write it anyway"
                )));
            }
            text += &format!("TEMPLATE \"\"\"{}\"\"\"\n", t.go_template());
            turns = Some(t);
        }
        None if force => {
            text += "# The chat template was not recognised: prompts are passed through as they are.\nTEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n";
        }
        None => {
            return Err(Error::Unsupported(match source {
                Some(_) => "the model's chat template is not one afinar can write for Ollama (ChatML, Llama 3, Mistral); pass --force to write a Modelfile with a raw {{ .Prompt }} template".into(),
                None => "the model has no chat template, so Ollama would guess one; pass --force to write a Modelfile with a raw {{ .Prompt }} template".into(),
            }));
        }
    }
    for id in &model.tokenizer.end_token_ids {
        if let Some(tok) = model.tokenizer.inner.id_to_token(*id) {
            text += &format!("PARAMETER stop \"{}\"\n", tok.replace('"', "\\\""));
        }
    }
    if let Some(s) = &system {
        text += &format!("SYSTEM \"\"\"{s}\"\"\"\n");
    }
    Ok(Modelfile {
        text,
        family,
        system,
        turns,
    })
}

/// The three-turn probe conversation (system, user, assistant, user).
pub fn probe_conversation(system: Option<&str>) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new("system", s));
    }
    m.push(Message::new(
        "user",
        "¿Cómo se conjuga «hablar» en presente?",
    ));
    m.push(Message::new("assistant", "Hablo, hablas, habla."));
    m.push(Message::new("user", "¿Y en pretérito?"));
    m
}

/// The system message a template inserts when the conversation has none (SmolLM2's "You are a
/// helpful AI assistant named SmolLM…", Qwen2's "You are a helpful assistant.").
fn template_default_system(probe: &Probe, t: &Turns) -> Result<Option<String>> {
    let Some((pre, post)) = &t.system else {
        return Ok(None);
    };
    let text = probe.render(&[Message::new("user", Probe::USER)], true)?;
    let Some(rest) = text.strip_prefix(pre.as_str()) else {
        return Ok(None);
    };
    Ok(rest.find(post.as_str()).map(|end| rest[..end].to_string()))
}
