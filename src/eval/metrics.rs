//! Generation metrics, each a pure function of an output and its references (the best reference
//! counts, as in SQuAD and sacrebleu): exact match after normalisation, label accuracy, chrF and
//! ROUGE-L.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use unicode_normalization::UnicodeNormalization;

/// A metric `afinar eval` can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Mean negative log-likelihood per label token of the split.
    Loss,
    /// exp(loss).
    Perplexity,
    /// Share of outputs equal to a reference after [`normalize`], in [0, 1].
    ExactMatch,
    /// Share of outputs whose label (the known label they start with) is the reference's.
    Accuracy,
    /// sacrebleu's sentence chrF (character 6-grams, β = 2), 0–100, averaged over examples.
    Chrf,
    /// ROUGE-L F1 on words, in [0, 1], averaged over examples.
    RougeL,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 6] = [
        Metric::Loss,
        Metric::Perplexity,
        Metric::ExactMatch,
        Metric::Accuracy,
        Metric::Chrf,
        Metric::RougeL,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::Perplexity => "perplexity",
            Metric::ExactMatch => "exact_match",
            Metric::Accuracy => "accuracy",
            Metric::Chrf => "chrf",
            Metric::RougeL => "rouge_l",
        }
    }

    /// True for metrics that need generated text (the others need only a forward pass).
    pub fn needs_generation(self) -> bool {
        !matches!(self, Metric::Loss | Metric::Perplexity)
    }

    /// True when a larger value is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Loss | Metric::Perplexity)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let key = s.trim().to_lowercase().replace('-', "_");
        let alias = match key.as_str() {
            "ppl" => "perplexity",
            "em" | "exact" => "exact_match",
            "acc" => "accuracy",
            "rouge" | "rougel" => "rouge_l",
            other => other,
        };
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == alias)
            .ok_or_else(|| {
                format!(
                    "unknown metric {s:?}; valid metrics: {}",
                    Metric::ALL.map(Metric::name).join(", ")
                )
            })
    }
}

/// Parses a comma-separated metric list (`loss,exact_match`), keeping the given order.
pub fn parse_list(s: &str) -> Result<Vec<Metric>, String> {
    let mut out: Vec<Metric> = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let m: Metric = part.parse()?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no metric given; valid metrics: {}",
            Metric::ALL.map(Metric::name).join(", ")
        ));
    }
    Ok(out)
}

/// Normal form for exact match: Unicode NFKC, lower case, inner whitespace runs collapsed to
/// one space, surrounding whitespace and punctuation removed. Accents are kept: in Spanish
/// "habló" and "hablo" are different answers.
pub fn normalize(s: &str) -> String {
    let folded: String = s.nfkc().collect::<String>().to_lowercase();
    let words: Vec<&str> = folded.split_whitespace().collect();
    let joined = words.join(" ");
    joined
        .trim_matches(|c: char| c.is_whitespace() || is_punctuation(c))
        .to_string()
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            c,
            '¡' | '¿'
                | '«'
                | '»'
                | '…'
                | '“'
                | '”'
                | '‘'
                | '’'
                | '–'
                | '—'
                | '·'
                | '。'
                | '、'
                | '，'
                | '！'
                | '？'
                | '：'
                | '；'
        )
}

/// 1.0 if the output equals any reference after [`normalize`], else 0.0.
pub fn exact_match(output: &str, references: &[String]) -> f64 {
    let o = normalize(output);
    f64::from(u8::from(references.iter().any(|r| normalize(r) == o)))
}

/// The label an output names: the longest of `labels` (normalised) that the normalised output
/// starts with at a word boundary. Models often add words after the label ("positive, because
/// …"); exact match would count that as wrong, accuracy does not.
pub fn predicted_label<'a>(output: &str, labels: &'a [String]) -> Option<&'a str> {
    let o = normalize(output);
    labels
        .iter()
        .filter(|l| {
            !l.is_empty()
                && o.starts_with(l.as_str())
                && o[l.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !c.is_alphanumeric())
        })
        .max_by_key(|l| l.len())
        .map(String::as_str)
}

/// The normalised distinct references of an evaluation set: the label set for [`accuracy`].
pub fn label_set<'a>(references: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = references.into_iter().map(|r| normalize(r)).collect();
    v.sort();
    v.dedup();
    v
}

/// 1.0 if the label the output names is one of the references' labels, else 0.0.
pub fn accuracy(output: &str, references: &[String], labels: &[String]) -> f64 {
    let Some(p) = predicted_label(output, labels) else {
        return 0.0;
    };
    f64::from(u8::from(references.iter().any(|r| normalize(r) == p)))
}

fn char_ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut m = HashMap::new();
    if chars.len() >= n {
        for w in chars.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// sacrebleu's sentence-level chrF (character n-grams up to 6, β = 2, whitespace ignored),
/// 0–100, best over the references: the mean over n of the F_β of n-gram precision and recall,
/// over the orders that both texts have.
pub fn chrf(output: &str, references: &[String]) -> f64 {
    references
        .iter()
        .map(|r| chrf_one(output, r))
        .fold(0.0, f64::max)
}

fn chrf_one(hyp: &str, reference: &str) -> f64 {
    const ORDER: usize = 6;
    const BETA2: f64 = 4.0;
    const EPS: f64 = 1e-16;
    let h: Vec<char> = hyp.chars().filter(|c| !c.is_whitespace()).collect();
    let r: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let (mut score, mut effective) = (0.0, 0usize);
    for n in 1..=ORDER {
        let (hg, rg) = (char_ngrams(&h, n), char_ngrams(&r, n));
        let n_hyp: usize = hg.values().sum();
        let n_ref: usize = rg.values().sum();
        let matches: usize = hg
            .iter()
            .map(|(g, c)| (*c).min(rg.get(g).copied().unwrap_or(0)))
            .sum();
        let prec = if n_hyp > 0 {
            matches as f64 / n_hyp as f64
        } else {
            EPS
        };
        let rec = if n_ref > 0 {
            matches as f64 / n_ref as f64
        } else {
            EPS
        };
        let denom = BETA2 * prec + rec;
        score += if denom > 0.0 {
            (1.0 + BETA2) * prec * rec / denom
        } else {
            EPS
        };
        if n_hyp > 0 && n_ref > 0 {
            effective += 1;
        }
    }
    if effective == 0 {
        0.0
    } else {
        100.0 * score / effective as f64
    }
}

/// Lower-cased words: maximal runs of letters and digits (any script).
fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ROUGE-L F1 over words (longest common subsequence), in [0, 1], best over the references.
pub fn rouge_l(output: &str, references: &[String]) -> f64 {
    let h = words(output);
    references
        .iter()
        .map(|r| {
            let r = words(r);
            let l = lcs(&h, &r);
            if l == 0 {
                return 0.0;
            }
            let (p, rc) = (l as f64 / h.len() as f64, l as f64 / r.len() as f64);
            2.0 * p * rc / (p + rc)
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalisation_folds_case_width_space_and_punctuation_but_keeps_accents() {
        assert_eq!(normalize("  ¡Hablé!  "), "hablé");
        assert_eq!(normalize("Yo   HABLO."), "yo hablo");
        // NFKC: full-width letters and a decomposed é (e + combining acute) fold.
        assert_eq!(normalize("ＡＢＣ"), "abc");
        assert_eq!(normalize("habl\u{0065}\u{0301}"), "hablé");
        assert_ne!(normalize("hablé"), normalize("hable"));
    }

    #[test]
    fn exact_match_takes_any_reference() {
        assert_eq!(exact_match("Tomo.", &refs(&["tomo"])), 1.0);
        assert_eq!(exact_match("tomó", &refs(&["tomo"])), 0.0);
        assert_eq!(exact_match("Paris", &refs(&["London", "paris "])), 1.0);
        assert_eq!(exact_match("tomo, claro", &refs(&["tomo"])), 0.0);
    }

    #[test]
    fn accuracy_reads_the_label_at_the_start() {
        let labels = label_set(&refs(&["positive", "negative", "neutral"]));
        assert_eq!(
            accuracy("Positive, clearly.", &refs(&["positive"]), &labels),
            1.0
        );
        assert_eq!(accuracy("negative", &refs(&["positive"]), &labels), 0.0);
        // A label must end at a word boundary: "neutrality" is not "neutral".
        assert_eq!(predicted_label("neutrality", &labels), None);
        assert_eq!(
            accuracy("I think positive", &refs(&["positive"]), &labels),
            0.0
        );
    }

    #[test]
    fn chrf_matches_hand_computed_values() {
        assert!((chrf("ab", &refs(&["ab"])) - 100.0).abs() < 1e-9);
        // n=1: P=R=2/3 → F=2/3; n=2: 1/2; n=3: no match → 0; orders 4–6 absent.
        let want = 100.0 * (2.0 / 3.0 + 0.5) / 3.0;
        assert!((chrf("abc", &refs(&["abd"])) - want).abs() < 1e-9);
        // Whitespace is ignored; the best reference counts.
        assert!((chrf("a b", &refs(&["zz", "ab"])) - 100.0).abs() < 1e-9);
        // No shared n-gram: only sacrebleu's epsilon smoothing remains.
        assert!(chrf("xyz", &refs(&["abc"])) < 1e-9);
    }

    #[test]
    fn rouge_l_matches_hand_computed_values() {
        // LCS of "the cat sat" and "the cat was sat" is 3: P = 1, R = 3/4, F = 6/7.
        let f = rouge_l("The cat sat.", &refs(&["the cat was sat"]));
        assert!((f - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(rouge_l("", &refs(&["x"])), 0.0);
        // Words of any script; the best reference counts.
        assert!((rouge_l("東京 です", &refs(&["no", "東京 です"])) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn unknown_metric_lists_the_valid_ones() {
        let e = parse_list("loss,bleu").unwrap_err();
        assert!(e.contains("\"bleu\"") && e.contains("exact_match") && e.contains("rouge_l"));
        assert_eq!(
            parse_list("em, ppl,loss").unwrap(),
            vec![Metric::ExactMatch, Metric::Perplexity, Metric::Loss]
        );
    }
}
