//! The token-identity self-check that ends every export: the exported artefact, loaded back
//! through afinar's own loader, must turn the same conversations into the same ids (one BOS, the
//! same end-of-turn id as stop) and greedily decode the same tokens as the source model. These
//! are the failures users meet most after fine-tuning (wrong template, base EOS instead of the
//! chat's end-of-turn, doubled BOS), caught before the file leaves the machine.

use crate::infer::{generate, GenerateOptions, SamplingParams};
use crate::model::{ChatTemplate, Message, Model, TextTokenizer};
use crate::{Error, Result};

/// Conversations probed when the run gives none.
pub fn builtin_probes(system: Option<&str>) -> Vec<Vec<Message>> {
    [
        "Hola, ¿cómo estás?",
        "What is 2 + 3?",
        "Name three colours.",
    ]
    .iter()
    .map(|q| {
        let mut m = Vec::new();
        if let Some(s) = system {
            m.push(Message::new("system", s));
        }
        m.push(Message::new("user", *q));
        m
    })
    .collect()
}

/// The token the chat template writes right after an assistant's answer (`<|im_end|>`,
/// `<|eot_id|>`, `</s>`): what a deployed chat model must stop at. None without a template or
/// when the template writes nothing after the answer.
pub fn end_of_turn(model: &Model) -> Result<Option<(u32, String)>> {
    end_of_turn_of(&model.tokenizer, model.chat_template.as_ref())
}

/// [`end_of_turn`] from a tokenizer and template alone (no weights needed).
pub fn end_of_turn_of(
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Option<(u32, String)>> {
    let Some(t) = template else {
        return Ok(None);
    };
    let marker = "\u{2063}ANSWER\u{2063}";
    let text = t.render(
        &[
            Message::new("user", "hi"),
            Message::new("assistant", marker),
        ],
        false,
    )?;
    let Some(pos) = text.rfind(marker) else {
        return Ok(None);
    };
    let rest = &text[pos + marker.len()..];
    let ids = tokenizer.encode(rest, false)?;
    Ok(ids.first().and_then(|&id| {
        let tok = tokenizer.inner.id_to_token(id)?;
        tokenizer.end_token_ids.contains(&id).then_some((id, tok))
    }))
}

/// The outcome for one target: `ok` false carries the reason in `line`.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    pub line: String,
}

/// Compares `exported` (the artefact loaded back) with `source` (base + adapter) on `probes`:
/// prompt ids, BOS count, end-of-turn id, and `greedy_tokens` greedily decoded tokens.
/// `target` names the artefact in the verdict line. With `exact` false (quantized weights) a
/// divergence in decoding is reported with the source's logit margin there instead of failing.
pub fn check(
    target: &str,
    source: &Model,
    exported: &Model,
    probes: &[Vec<Message>],
    greedy_tokens: usize,
    exact: bool,
) -> Result<Verdict> {
    let fail = |why: String| Verdict {
        ok: false,
        line: format!("{target}: token identity FAILED: {why}"),
    };
    let src_eot = end_of_turn(source)?;
    let exp_eot = end_of_turn(exported)?;
    if src_eot.as_ref().map(|e| e.0) != exp_eot.as_ref().map(|e| e.0) {
        return Ok(fail(format!(
            "end-of-turn token differs: source {src_eot:?}, exported {exp_eot:?}"
        )));
    }
    if let Some((id, tok)) = &exp_eot {
        if !exported.tokenizer.end_token_ids.contains(id) {
            return Ok(fail(format!("the exported model does not stop at {tok}")));
        }
    }
    let bos = exported
        .tokenizer
        .bos_token
        .as_deref()
        .and_then(|b| exported.tokenizer.inner.token_to_id(b));
    let opts = GenerateOptions {
        max_new_tokens: greedy_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let mut tokens = 0;
    let mut divergences = Vec::new();
    for (i, msgs) in probes.iter().enumerate() {
        let (a, b) = (probe_ids(source, msgs)?, probe_ids(exported, msgs)?);
        if a != b {
            let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            return Ok(fail(format!(
                "prompt {i}: ids differ from position {at} ({} vs {} tokens)",
                a.len(),
                b.len()
            )));
        }
        if let Some(bos) = bos {
            if b.len() > 1 && b[0] == bos && b[1] == bos {
                return Ok(fail(format!("prompt {i}: BOS appears twice")));
            }
        }
        let ga = generate(source, &a, &opts, |_| {})?;
        let gb = generate(exported, &b, &opts, |_| {})?;
        if ga.tokens != gb.tokens {
            let at = ga
                .tokens
                .iter()
                .zip(&gb.tokens)
                .take_while(|(x, y)| x == y)
                .count();
            let what = format!(
                "prompt {i}: greedy decoding diverges at token {at} of {}",
                ga.tokens.len().max(gb.tokens.len())
            );
            if exact {
                return Ok(fail(what));
            }
            let note = match margin_at(source, &a, &ga.tokens, &gb.tokens, at)? {
                Some(margin) => format!("source logit margin there {margin:.4}"),
                None if ga.tokens.len() == at => "the source stopped there".into(),
                None => "the export stopped there".into(),
            };
            divergences.push(format!("{what} ({note})"));
        }
        tokens += ga.tokens.len();
    }
    let eot = exp_eot.map_or("none".into(), |(id, t)| format!("{t} ({id})"));
    let decoding = if divergences.is_empty() {
        format!("{tokens} greedy tokens identical")
    } else {
        divergences.join("; ")
    };
    Ok(Verdict {
        ok: true,
        line: format!(
            "token identity ok: {} prompts, same ids, one BOS, stops at {eot}; {decoding}",
            probes.len()
        ),
    })
}

/// How much the source preferred its own token over the exported model's choice at the first
/// divergence `at`: logit(source token) − logit(exported token), from the source's logits;
/// `None` when one of them had already stopped.
fn margin_at(
    source: &Model,
    prompt: &[u32],
    a: &[u32],
    b: &[u32],
    at: usize,
) -> Result<Option<f32>> {
    let (Some(&ta), Some(&tb)) = (a.get(at), b.get(at)) else {
        return Ok(None);
    };
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&a[..at]);
    let t = candle_core::Tensor::new(ids.as_slice(), source.transformer.device())?.unsqueeze(0)?;
    let logits: Vec<f32> = source
        .transformer
        .forward_last(&t, None)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    Ok(Some(logits[ta as usize] - logits[tb as usize]))
}

/// An error for a failed verdict, unless `force`.
pub fn enforce(v: &Verdict, force: bool) -> Result<()> {
    if v.ok || force {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "{} (nothing was written; pass --force to write it anyway, or --dtype f32 for exact weights)",
            v.line
        )))
    }
}

/// A probe's prompt ids: its conversation through the chat template, or, for a model without
/// one (a base model such as Falcon-7B), its messages' text on lines of their own.
fn probe_ids(model: &Model, msgs: &[Message]) -> Result<Vec<u32>> {
    if model.chat_template.is_some() {
        return model.encode_chat(msgs, true);
    }
    let text: Vec<&str> = msgs.iter().map(|m| m.content.as_str()).collect();
    model.tokenizer.encode(&text.join("\n"), true)
}
