//! Templating and tokenization with answer-only labels.
//!
//! Conversations are rendered with the model's own chat template. Assistant spans are found by
//! rendering prefixes of the conversation (the text before turn i with the generation prompt,
//! and the text through turn i), which works with stock templates that lack `{% generation %}`
//! markers. Loss goes to the assistant's tokens and the end-of-turn token that closes them, so a
//! tuned model learns to stop; everything else is masked.

use crate::model::{ChatTemplate, Message, TextTokenizer};

use super::shapes::{Example, Rejection, Turn};

/// Token ids with a per-token loss mask (`labels[i]`: token i is a prediction target).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl Encoded {
    /// Number of tokens carrying loss.
    pub fn label_count(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlong {
    Truncate,
    Drop,
}

/// The outcome of encoding one example.
#[derive(Debug)]
pub enum Outcome {
    /// One example (chat, completion) or several windows (long text).
    Ok {
        parts: Vec<Encoded>,
        truncated: bool,
    },
    /// Longer than `max_seq_len` with [`Overlong::Drop`].
    TooLong,
    /// Nothing to learn from (e.g. the answer was cut off).
    NoLabels,
    Rejected(Rejection),
}

/// Turns examples into tokens for one model.
pub struct Encoder<'a> {
    tok: &'a TextTokenizer,
    template: Option<&'a ChatTemplate>,
    /// BOS id when the tokenizer adds one by itself (templates may already write it).
    bos: Option<u32>,
    eos: Option<u32>,
    /// Text of tokens that close an assistant turn (EOS, `<|im_end|>`, `<|eot_id|>`, …).
    end_markers: Vec<String>,
    /// The tokenizer's special tokens as text (`<|im_end|>`, …), longest first.
    specials: Vec<String>,
    pub max_seq_len: usize,
    pub overlong: Overlong,
}

impl<'a> Encoder<'a> {
    /// An encoder for `tok` and `template` (needed for conversations).
    pub fn new(
        tok: &'a TextTokenizer,
        template: Option<&'a ChatTemplate>,
        max_seq_len: usize,
        overlong: Overlong,
    ) -> Self {
        let with = tok.encode("a", true).unwrap_or_default();
        let without = tok.encode("a", false).unwrap_or_default();
        let bos = (with.len() > without.len()).then(|| with[0]);
        let end_markers = tok
            .end_token_ids
            .iter()
            .filter_map(|&id| tok.inner.id_to_token(id))
            .collect();
        let mut specials: Vec<String> = tok
            .inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self {
            tok,
            template,
            bos,
            eos: tok.eos_id(),
            end_markers,
            specials,
            max_seq_len,
            overlong,
        }
    }

    /// Encodes one example.
    pub fn encode(&self, ex: &Example) -> Outcome {
        match ex {
            Example::Chat(turns) => match self.encode_chat(turns) {
                Ok(enc) => self.finish(enc),
                Err(r) => Outcome::Rejected(r),
            },
            Example::Completion { prompt, completion } => {
                match self.encode_completion(prompt, completion) {
                    Ok(enc) => self.finish(enc),
                    Err(r) => Outcome::Rejected(r),
                }
            }
            Example::Text(text) => match self.encode_text(text) {
                Ok(parts) => Outcome::Ok {
                    parts,
                    truncated: false,
                },
                Err(r) => Outcome::Rejected(r),
            },
        }
    }

    fn finish(&self, mut enc: Encoded) -> Outcome {
        let mut truncated = false;
        if enc.ids.len() > self.max_seq_len {
            match self.overlong {
                Overlong::Drop => return Outcome::TooLong,
                Overlong::Truncate => {
                    enc.ids.truncate(self.max_seq_len);
                    enc.labels.truncate(self.max_seq_len);
                    truncated = true;
                }
            }
        }
        if enc.label_count() == 0 {
            return Outcome::NoLabels;
        }
        Outcome::Ok {
            parts: vec![enc],
            truncated,
        }
    }

    fn tokenize(&self, text: &str) -> Result<tokenizers::Encoding, Rejection> {
        self.tok
            .inner
            .encode(text, false)
            .map_err(|e| ("tokenizer error", e.to_string()))
    }

    /// Prepends BOS when the tokenizer expects one and the text does not start with it, so
    /// there is exactly one.
    fn with_bos(&self, mut enc: Encoded) -> Encoded {
        if let Some(bos) = self.bos {
            if enc.ids.first() != Some(&bos) {
                enc.ids.insert(0, bos);
                enc.labels.insert(0, false);
            }
            // A template that writes BOS while the text also starts with it: keep one.
            while enc.ids.len() > 1 && enc.ids[1] == bos && enc.ids[0] == bos {
                enc.ids.remove(0);
                enc.labels.remove(0);
            }
        }
        enc
    }

    fn encode_chat(&self, turns: &[Turn]) -> Result<Encoded, Rejection> {
        let template = self.template.ok_or_else(|| {
            (
                "model has no chat template",
                "the model has no chat template; use the completion or text format".to_string(),
            )
        })?;
        // Special-token text inside a message would be tokenized as a control token (a forged
        // turn end, a second system turn), while `afinar serve` encodes message content as plain
        // text: training on it would teach the model something it never sees when served.
        for (i, t) in turns.iter().enumerate() {
            let first = self
                .specials
                .iter()
                .filter_map(|s| t.content.find(s.as_str()).map(|at| (at, s)))
                .min_by_key(|&(at, _)| at);
            if let Some((_, s)) = first {
                return Err((
                    "special-token text in a message",
                    format!(
                        "message {} contains {s:?}, which the tokenizer reads as a control token; \
                         remove it from the text",
                        i + 1
                    ),
                ));
            }
        }
        let msgs: Vec<Message> = turns
            .iter()
            .map(|t| Message::new(t.role.clone(), t.content.clone()))
            .collect();
        let render = |m: &[Message], gen: bool| {
            template
                .render(m, gen)
                .map_err(|e| ("chat template error", e.to_string()))
        };
        let full = render(&msgs, false)?;
        let enc = self.tokenize(&full)?;
        let offsets = enc.get_offsets();
        // Tokens past max_seq_len are cut (or the example dropped), so only turns that start
        // before the text those tokens cover need locating: a 10,000-turn conversation cut to
        // 128 tokens renders a few prefixes, not 10,000 (each of which is as long as its turn
        // index), which kept preparation quadratic.
        let limit = offsets
            .get(self.max_seq_len)
            .map_or(full.len(), |&(start, _)| start);
        let mut spans = Vec::new();
        for (i, turn) in turns.iter().enumerate() {
            if !turn.train {
                continue;
            }
            // The turn starts where the generation prompt ends. A template may add more to the
            // prompt than the turn keeps (DeepSeek-R1's opens the answer with "<think>\n" but
            // writes past turns without it): then the prompt's header is the part of it the
            // conversation goes on with.
            let prompt = render(&msgs[..i], true)?;
            let start = if full.starts_with(&prompt) {
                prompt.len()
            } else {
                let plain = render(&msgs[..i], false)?;
                if !full.starts_with(&plain) || !prompt.starts_with(&plain) {
                    return Err(not_prefix_stable(i));
                }
                plain.len() + common_prefix(&prompt[plain.len()..], &full[plain.len()..])
            };
            if start >= limit {
                break;
            }
            // It ends after its own end token (the first after the answer: message content
            // holds none, checked above), within the text its own rendering shares with the
            // conversation's: a template may close a conversation with text a following turn
            // replaces (Phi-3's eos after the last turn).
            let through = render(&msgs[..=i], false)?;
            if through.len() < start || !through.is_char_boundary(start) {
                return Err(not_prefix_stable(i));
            }
            let shared = start + common_prefix(&through[start..], &full[start..]);
            let cut = self
                .end_markers
                .iter()
                .filter_map(|m| {
                    full[start..shared]
                        .find(m.as_str())
                        .map(|p| start + p + m.len())
                })
                .min();
            let end = match cut {
                Some(end) => end,
                None if shared == through.len() => shared,
                None => return Err(not_prefix_stable(i)),
            };
            spans.push((start, end));
        }
        // Spans are ascending and disjoint, token offsets ascending: one linear sweep.
        let mut k = 0;
        let labels = offsets
            .iter()
            .map(|&(s, _)| {
                while k < spans.len() && spans[k].1 <= s {
                    k += 1;
                }
                k < spans.len() && s >= spans[k].0
            })
            .collect();
        Ok(self.with_bos(Encoded {
            ids: enc.get_ids().to_vec(),
            labels,
        }))
    }

    fn encode_completion(&self, prompt: &str, completion: &str) -> Result<Encoded, Rejection> {
        let p = self.tokenize(prompt)?;
        let c = self.tokenize(completion)?;
        let mut ids = p.get_ids().to_vec();
        let mut labels = vec![false; ids.len()];
        ids.extend_from_slice(c.get_ids());
        labels.extend(std::iter::repeat_n(true, c.get_ids().len()));
        if let Some(eos) = self.eos {
            ids.push(eos);
            labels.push(true);
        }
        Ok(self.with_bos(Encoded { ids, labels }))
    }

    /// Text: EOS appended, loss everywhere, split into windows of `max_seq_len`.
    fn encode_text(&self, text: &str) -> Result<Vec<Encoded>, Rejection> {
        let mut ids = self.tokenize(text)?.get_ids().to_vec();
        if let Some(eos) = self.eos {
            ids.push(eos);
        }
        let window = self.max_seq_len - usize::from(self.bos.is_some());
        Ok(ids
            .chunks(window)
            .filter(|c| c.len() > 1)
            .map(|c| {
                let mut labels = vec![true; c.len()];
                labels[0] = self.bos.is_some();
                self.with_bos(Encoded {
                    ids: c.to_vec(),
                    labels,
                })
            })
            .collect())
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

fn not_prefix_stable(i: usize) -> Rejection {
    (
        "template is not prefix-stable",
        format!(
            "rendering the first {i} turns does not give a prefix of the whole conversation; \
             cannot locate assistant turn {}",
            i + 1
        ),
    )
}
