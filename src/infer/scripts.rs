//! Unicode scripts in generated text: measuring *script drift* (a Spanish task answered with
//! Han characters, as DeepSeek-R1 distills are known to do) and preventing it with
//! `--allowed-scripts`, which masks tokens that would write letters of any other script.
//!
//! Why the masking works on bytes: byte-level BPE vocabularies split a CJK character over
//! several tokens, and a token holding half a character decodes to U+FFFD. So each token is
//! judged by its raw bytes appended to the bytes still pending from earlier tokens: a complete
//! character of a disallowed script rejects it, and so does an unfinished character that no
//! allowed character can complete.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokenizers::DecoderWrapper;
use unicode_script::{Script, UnicodeScript};

use crate::model::TextTokenizer;
use crate::{Error, Result};

/// Scripts that never count as drift and are always allowed: digits, punctuation and spaces
/// (Common), combining marks (Inherited), unassigned code points.
fn neutral(s: Script) -> bool {
    matches!(s, Script::Common | Script::Inherited | Script::Unknown)
}

/// The scripts of the letters in `text` (Common and Inherited left out), by full name.
pub fn scripts_in(text: &str) -> BTreeSet<&'static str> {
    text.chars()
        .map(|c| c.script())
        .filter(|s| !neutral(*s))
        .map(Script::full_name)
        .collect()
}

/// Scripts present in `output` but in none of `context` (the prompt and the references).
pub fn drift(output: &str, context: &[&str]) -> BTreeSet<&'static str> {
    let seen: BTreeSet<&str> = context.iter().flat_map(|c| scripts_in(c)).collect();
    scripts_in(output)
        .into_iter()
        .filter(|s| !seen.contains(s))
        .collect()
}

/// Parses `Latin,Common` into scripts (full names such as `Han`, `Cyrillic`, or ISO 15924 codes
/// such as `Latn`, any case).
pub fn parse_scripts(list: &str) -> Result<Vec<Script>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let mut title: String = name.to_lowercase();
            if let Some(f) = title.get_mut(0..1) {
                f.make_ascii_uppercase();
            }
            Script::from_full_name(&title)
                .or_else(|| Script::from_full_name(name))
                .or_else(|| Script::from_short_name(&title))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown script {name:?} in --allowed-scripts; use Unicode script names \
                         such as Latin, Cyrillic, Greek, Han, Arabic, Devanagari (Common is \
                         always allowed)"
                    ))
                })
        })
        .collect()
}

/// GPT-2's byte ↔ printable character table, inverted: the byte each vocabulary character
/// stands for.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (char::from_u32(c).unwrap(), b as u8))
        .collect()
}

/// The raw bytes of every token: byte-level BPE characters mapped back to bytes, SentencePiece
/// pieces with `▁` as a space and `<0xNN>` byte fallbacks. Special tokens get `None`.
pub(crate) fn token_bytes(tok: &TextTokenizer) -> Vec<Option<Vec<u8>>> {
    let inner = &tok.inner;
    let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
    let table = byte_level_decoder();
    let specials: BTreeSet<u32> = inner
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    (0..inner.get_vocab_size(true) as u32)
        .map(|id| {
            if specials.contains(&id) {
                return None;
            }
            let piece = inner.id_to_token(id)?;
            if byte_level {
                piece.chars().map(|c| table.get(&c).copied()).collect()
            } else if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
            } else {
                Some(piece.replace('▁', " ").into_bytes())
            }
        })
        .collect()
}

/// What stands for token `id` where it has no bytes of text (a special token): its name, or
/// `<[id]>` when the vocabulary has none.
pub(crate) fn token_name(tok: &TextTokenizer, id: u32) -> String {
    tok.inner
        .id_to_token(id)
        .unwrap_or_else(|| format!("<[{id}]>"))
}

/// Masks tokens whose text would contain letters outside the allowed scripts.
pub struct ScriptFilter {
    allowed: Vec<Script>,
    bytes: Vec<Option<Vec<u8>>>,
    /// Whether an unfinished character (its leading bytes) can still become an allowed one.
    tails: Mutex<HashMap<Vec<u8>, bool>>,
}

impl std::fmt::Debug for ScriptFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScriptFilter({:?})", self.allowed)
    }
}

impl ScriptFilter {
    /// A filter for `tokenizer`'s vocabulary allowing `allowed` (plus Common and Inherited).
    pub fn new(tokenizer: &TextTokenizer, allowed: Vec<Script>) -> Self {
        Self {
            allowed,
            bytes: token_bytes(tokenizer),
            tails: Mutex::new(HashMap::new()),
        }
    }

    fn script_ok(&self, c: char) -> bool {
        let s = c.script();
        neutral(s) || self.allowed.contains(&s)
    }

    /// Whether the leading bytes of an unfinished UTF-8 character can still complete to an
    /// allowed character.
    fn tail_ok(&self, tail: &[u8]) -> bool {
        if let Some(&v) = self.tails.lock().unwrap().get(tail) {
            return v;
        }
        let len = match tail[0] {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return true,
        };
        let missing = len - tail.len();
        let mut buf = tail.to_vec();
        buf.resize(len, 0x80);
        let ok = (0..1u32 << (6 * missing)).any(|k| {
            for i in 0..missing {
                buf[len - 1 - i] = 0x80 | ((k >> (6 * i)) & 0x3F) as u8;
            }
            std::str::from_utf8(&buf)
                .ok()
                .and_then(|s| s.chars().next())
                .is_some_and(|c| self.script_ok(c))
        });
        self.tails.lock().unwrap().insert(tail.to_vec(), ok);
        ok
    }

    /// Whether appending `token` to the not-yet-decodable bytes `pending` keeps the text within
    /// the allowed scripts.
    pub fn allows(&self, pending: &[u8], token: u32) -> bool {
        let Some(Some(tb)) = self.bytes.get(token as usize) else {
            return true; // special tokens (end of turn, …) and ids beyond the vocabulary
        };
        let mut all = pending.to_vec();
        all.extend_from_slice(tb);
        let mut rest: &[u8] = &all;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => return s.chars().all(|c| self.script_ok(c)),
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    let good = std::str::from_utf8(good).unwrap_or_default();
                    if !good.chars().all(|c| self.script_ok(c)) {
                        return false;
                    }
                    match e.error_len() {
                        // Invalid bytes decode to U+FFFD: not a letter of any script.
                        Some(n) => rest = &bad[n..],
                        None => return self.tail_ok(bad),
                    }
                }
            }
        }
    }

    /// The bytes that stay pending after `token`: an unfinished character at the end.
    pub fn pending_after(&self, pending: &[u8], token: u32) -> Vec<u8> {
        let Some(Some(tb)) = self.bytes.get(token as usize) else {
            return Vec::new();
        };
        let mut all = pending.to_vec();
        all.extend_from_slice(tb);
        let mut rest: &[u8] = &all;
        loop {
            match std::str::from_utf8(rest) {
                Ok(_) => return Vec::new(),
                Err(e) => match e.error_len() {
                    Some(n) => rest = &rest[e.valid_up_to() + n..],
                    None => return rest[e.valid_up_to()..].to_vec(),
                },
            }
        }
    }

    /// Picks a token with `pick` (which sees the logits), rejecting and masking picks the
    /// filter refuses, up to the whole vocabulary; returns the first allowed pick.
    pub fn choose(
        &self,
        logits: &[f32],
        pending: &[u8],
        mut pick: impl FnMut(&mut [f32]) -> u32,
    ) -> u32 {
        let mut masked = logits.to_vec();
        loop {
            let mut work = masked.clone();
            let id = pick(&mut work);
            if self.allows(pending, id) || masked.iter().all(|l| *l == f32::NEG_INFINITY) {
                return id;
            }
            masked[id as usize] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_counts_scripts_absent_from_the_context() {
        let d = drift("hablo 我说", &["Conjugate: hablar", "hablo"]);
        assert_eq!(d.into_iter().collect::<Vec<_>>(), vec!["Han"]);
        assert!(drift("¡Hola! 123", &["hola"]).is_empty());
        // Cyrillic in the prompt makes it expected.
        assert!(drift("привет", &["say привет"]).is_empty());
    }

    #[test]
    fn script_names_parse_in_any_case_or_as_codes() {
        assert_eq!(
            parse_scripts("latin, HAN,Cyrl").unwrap(),
            vec![Script::Latin, Script::Han, Script::Cyrillic]
        );
        let e = parse_scripts("Latin,Klingon").unwrap_err().to_string();
        assert!(e.contains("Klingon"), "{e}");
    }

    #[test]
    fn gpt2_byte_table_is_a_bijection() {
        let t = byte_level_decoder();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'a'], b'a');
        let bytes: BTreeSet<u8> = t.values().copied().collect();
        assert_eq!(bytes.len(), 256);
    }
}
