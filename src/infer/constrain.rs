//! Structured output: decoding constrained to JSON, or to JSON matching a schema (OpenAI's
//! `response_format`), so the answer always parses. The grammar engine is llguidance, the one
//! llama.cpp and vLLM use, not a home-made one: each step it gives the set of tokens that keep
//! the text a prefix of some valid document; every other token's logit becomes −∞ before
//! sampling, and the model's end token is allowed only once the document is complete.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::infer::scripts::{token_bytes, token_name};
use crate::model::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// Compiles grammars for one tokenizer (building its token trie takes a moment: once per model).
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

/// The token environment llguidance walks: every token's bytes in a trie.
struct Env {
    trie: TokTrie,
    tokenizer: TextTokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).unwrap_or_default()
        })
    }
}

impl Grammars {
    /// The grammar compiler for `tokenizer`, whose model has `vocab` logits (at least the
    /// tokenizer's size; the rest are never allowed).
    pub fn new(tokenizer: &TextTokenizer, vocab: usize) -> Result<Self> {
        let eos = tokenizer.end_token_ids.clone();
        let Some(&first) = eos.first() else {
            return Err(Error::InvalidArgument(
                "the model has no end token, which constrained output needs to stop".into(),
            ));
        };
        let mut words: Vec<Vec<u8>> = token_bytes(tokenizer)
            .into_iter()
            .enumerate()
            .map(|(id, b)| {
                // Special tokens are named behind llguidance's marker byte, so no text can
                // spell them.
                b.unwrap_or_else(|| {
                    let name = token_name(tokenizer, id as u32);
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat()
                })
            })
            .collect();
        while words.len() < vocab {
            let name = format!("<[{}]>", words.len());
            words.push([&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat());
        }
        let mut info = TokRxInfo::new(words.len() as u32, first);
        info.tok_end_of_turn = eos.get(1).copied();
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::InvalidArgument(format!("constrained output: {e}")))?;
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// A constraint to JSON matching `schema`, or to any JSON object when `schema` is `None`.
    /// A schema llguidance cannot compile is an error naming what it rejected.
    pub fn json(&self, schema: Option<&Value>) -> Result<Constraint> {
        let mut schema = schema
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        // Compact JSON: free whitespace lets a small model wander in blank lines.
        if let Value::Object(o) = &mut schema {
            o.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| Error::InvalidArgument(format!("the JSON schema: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidArgument(format!("the JSON schema: {e}")));
        }
        Ok(Constraint { matcher })
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logits of every token the grammar forbids next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| Error::InvalidArgument(format!("constrained output: {e}")))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::InvalidArgument(format!("constrained output: {e}")))
    }

    /// An independent copy in the same state (the `n` answers of one request).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }

    /// Whether the document is complete and nothing more may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
