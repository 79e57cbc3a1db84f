//! The model's tokenizer as a `tokenizers::Tokenizer`, either read from `tokenizer.json` or built
//! from GGUF metadata, plus the special tokens generation and templating need.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// A tokenizer with the special tokens afinar needs around it.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    /// BOS token text (exposed to chat templates as `bos_token`).
    pub bos_token: Option<String>,
    /// EOS token text (exposed to chat templates as `eos_token`).
    pub eos_token: Option<String>,
    /// Ids that end a generation: EOS plus known end-of-turn tokens present in the vocabulary.
    pub end_token_ids: Vec<u32>,
    /// Warnings about how the tokenizer was built (e.g. an unknown GGUF pre-tokenizer), shown
    /// by `afinar info`.
    pub notes: Vec<String>,
}

/// End-of-turn tokens used by common chat templates; each present in the vocabulary stops
/// generation.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

impl TextTokenizer {
    /// Wraps a tokenizer, collecting the end ids from `eos` and the known end-of-turn tokens.
    pub fn new(inner: Tokenizer, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        let mut end_token_ids = Vec::new();
        let specials: Vec<&str> = eos_token
            .iter()
            .map(|s| s.as_str())
            .chain(END_OF_TURN.iter().copied())
            .collect();
        for tok in specials {
            if let Some(id) = inner.token_to_id(tok) {
                if !end_token_ids.contains(&id) {
                    end_token_ids.push(id);
                }
            }
        }
        Self {
            inner,
            bos_token,
            eos_token,
            end_token_ids,
            notes: Vec::new(),
        }
    }

    /// Reads `tokenizer.json`.
    pub fn from_file(path: &Path, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::bad_file(path, format!("not a valid tokenizer.json: {e}")))?;
        Ok(Self::new(inner, bos, eos))
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` (no post-processor) where special-token text inside the `plain`
    /// byte ranges is ordinary text: only the special tokens outside them (a chat template's own
    /// markup) become control tokens. This is how message content is kept from forging turns
    /// (`<|im_end|>\n<|im_start|>system` typed by a user stays characters). The pieces between
    /// markup control tokens are encoded one by one, as the tokenizer itself does between
    /// special tokens. `plain` must be sorted, disjoint and on character boundaries.
    pub fn encode_with_plain_spans(
        &self,
        text: &str,
        plain: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let decoder = self.inner.get_added_tokens_decoder();
        let mut specials: Vec<(&str, u32)> = decoder
            .iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content.as_str(), *id))
            .collect();
        // Longest first, so the longest special token at a position wins (as the tokenizer's
        // own leftmost-longest matching does).
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        // (start, end, id) of each control token in the markup between the plain ranges.
        let mut cuts: Vec<(usize, usize, u32)> = Vec::new();
        let mut from = 0;
        let bounds = plain
            .iter()
            .map(|r| (r.start, r.end))
            .chain([(text.len(), text.len())]);
        for (start, end) in bounds {
            let markup = text.get(from..start).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "plain range {start}..{end} is not inside the text or not sorted"
                ))
            })?;
            let mut i = 0;
            while i < markup.len() {
                let rest = &markup[i..];
                if let Some((s, id)) = specials.iter().find(|(s, _)| rest.starts_with(s)) {
                    cuts.push((from + i, from + i + s.len(), *id));
                    i += s.len();
                } else {
                    i += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
            from = end;
        }
        let mut as_text = self.inner.clone();
        as_text.set_encode_special_tokens(true);
        let mut ids = Vec::new();
        let encode_text = |piece: &str, ids: &mut Vec<u32>| -> Result<()> {
            if !piece.is_empty() {
                let enc = as_text
                    .encode(piece, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Ok(())
        };
        let mut at = 0;
        for (start, end, id) in cuts {
            encode_text(&text[at..start], &mut ids)?;
            ids.push(id);
            at = end;
        }
        encode_text(&text[at..], &mut ids)?;
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the EOS token, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }
}

/// Turns generated ids into text piece by piece, holding back incomplete UTF-8 sequences and
/// re-decoding only a short window (as text-generation-inference does) so each step is O(1).
pub struct TokenStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TokenStream<'a> {
    /// A stream with no tokens yet.
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let text = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }
}

/// Tokenizer data found in a GGUF file's `tokenizer.ggml.*` metadata.
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Option<Vec<i32>>,
    pub scores: Option<Vec<f32>>,
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// `tokenizer.ggml.pre` values [`GgufVocab::build`] implements (others fall back to GPT-2's).
const KNOWN_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "llama-bpe",
    "llama3",
    "falcon3",
    "qwen2",
    "deepseek-r1-qwen",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
];

/// Most work (sum of squared token lengths) SentencePiece merge recovery may take.
const MAX_MERGE_WORK: usize = 1 << 32;

/// Regex of the `llama-bpe` (Llama 3) pre-tokenizer.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Regex of the `qwen2` pre-tokenizer (digits one by one).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl GgufVocab {
    /// Builds the equivalent of the model's `tokenizer.json` and loads it.
    pub fn build(&self, path: &Path) -> Result<TextTokenizer> {
        let json = match self.model.as_str() {
            "gpt2" => self.byte_level_json(path)?,
            "llama" => self.sentencepiece_json(path)?,
            other => {
                return Err(Error::bad_file(
                    path,
                    format!("GGUF key 'tokenizer.ggml.model' = '{}': tokenizer kind not supported (supported: gpt2 BPE, llama SentencePiece)", super::gguf::printable(other)),
                ))
            }
        };
        let inner: Tokenizer = serde_json::from_value::<Tokenizer>(json).map_err(|e| {
            Error::bad_file(
                path,
                format!("could not build the tokenizer from GGUF metadata: {e}"),
            )
        })?;
        let name = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize).cloned());
        let mut tok = TextTokenizer::new(inner, name(self.bos_id), name(self.eos_id));
        if let Some(note) = self.unknown_pre_note() {
            tracing::warn!("{}: {note}", path.display());
            tok.notes.push(note);
        }
        Ok(tok)
    }

    /// A warning when `tokenizer.ggml.pre` names a pre-tokenizer afinar does not know: the
    /// GPT-2 default is used, and text may split differently from the original model.
    fn unknown_pre_note(&self) -> Option<String> {
        let pre = self.pre.as_deref()?;
        if self.model != "gpt2" || KNOWN_PRE.contains(&pre) {
            return None;
        }
        Some(format!(
            "GGUF key 'tokenizer.ggml.pre' = '{}' is not a pre-tokenizer afinar knows \
             (known: {}); GPT-2's is used, so tokens may differ from the original model's",
            super::gguf::printable(pre),
            KNOWN_PRE.join(", ")
        ))
    }

    fn token_type(&self, id: usize) -> i32 {
        self.token_types
            .as_ref()
            .and_then(|t| t.get(id).copied())
            .unwrap_or(1)
    }

    /// Control and user-defined tokens become added tokens, matched whole in any text.
    fn added_tokens(&self) -> Vec<Value> {
        (0..self.tokens.len())
            .filter(|&i| {
                let t = self.token_type(i);
                t == TOKEN_TYPE_CONTROL
                    || t == TOKEN_TYPE_USER_DEFINED
                    || (t == TOKEN_TYPE_UNKNOWN && self.model == "llama")
            })
            .map(|i| {
                json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false,
                       "special": self.token_type(i) != TOKEN_TYPE_USER_DEFINED})
            })
            .collect()
    }

    fn vocab_map(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            m.entry(t.clone()).or_insert(json!(i));
        }
        m
    }

    fn bos_post_processor(&self, default_add_bos: bool) -> Value {
        match (self.add_bos.unwrap_or(default_add_bos), self.bos_id) {
            (true, Some(id)) => {
                let bos = &self.tokens[id as usize];
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}})
            }
            _ => Value::Null,
        }
    }

    /// GPT-2 style byte-level BPE; the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`.
    fn byte_level_json(&self, path: &Path) -> Result<Value> {
        let merges = self
            .merges
            .as_ref()
            .ok_or_else(|| Error::bad_file(path, "gpt2 tokenizer without tokenizer.ggml.merges"))?;
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                json!([a, b])
            })
            .collect();
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre = self.pre.as_deref().unwrap_or("default");
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "llama-bpe" | "llama3" | "falcon3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]}),
                true,
            ),
            "qwen2" | "deepseek-r1-qwen" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}),
                false,
            ),
            // SmolLM, StarCoder and friends split every digit, then apply GPT-2's regex.
            "smollm" | "starcoder" | "refact" | "codeshell" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            _ => (Value::Null, byte_level(true), false),
        };
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.bos_post_processor(false),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": self.vocab_map(), "merges": merges}
        }))
    }

    /// SentencePiece BPE (Llama 2, Mistral): merges are recovered from the piece scores the way
    /// Hugging Face's converter does, with byte fallback for unknown characters.
    fn sentencepiece_json(&self, path: &Path) -> Result<Value> {
        let scores = self.scores.as_ref().ok_or_else(|| {
            Error::bad_file(path, "llama tokenizer without tokenizer.ggml.scores")
        })?;
        let work: usize = self
            .tokens
            .iter()
            .map(|t| t.len().saturating_mul(t.len()))
            .fold(0, usize::saturating_add);
        if work > MAX_MERGE_WORK {
            return Err(Error::bad_file(
                path,
                "GGUF key 'tokenizer.ggml.tokens': the tokens are too long to recover SentencePiece merges from",
            ));
        }
        let vocab: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut merges: Vec<(usize, usize, f32)> = Vec::new();
        for (piece, &id) in &vocab {
            let mut local = Vec::new();
            for (split, _) in piece.char_indices().skip(1) {
                if let (Some(&l), Some(&r)) =
                    (vocab.get(&piece[..split]), vocab.get(&piece[split..]))
                {
                    local.push((l, r, scores.get(id).copied().unwrap_or(0.0)));
                }
            }
            merges.extend(local);
        }
        merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        let merges: Vec<Value> = merges
            .iter()
            .map(|(l, r, _)| json!([self.tokens[*l], self.tokens[*r]]))
            .collect();
        let unk = self.unk_id.map(|i| self.tokens[i as usize].clone());
        let mut normalizers = Vec::new();
        if self.add_space_prefix.unwrap_or(true) {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": self.bos_post_processor(true),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "ignore_merges": false, "vocab": self.vocab_map(), "merges": merges}
        }))
    }
}
