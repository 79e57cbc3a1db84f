//! What was skipped while reading and preparing a dataset, and why: nothing is lost silently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How many locations are kept verbatim per reason (all are counted).
const SAMPLES_PER_REASON: usize = 5;

/// Skipped inputs, counted by reason, with the first locations of each.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    pub skipped: usize,
    /// reason kind → count
    pub by_reason: BTreeMap<String, usize>,
    /// `file:line: message` of the first few of each reason.
    pub samples: Vec<String>,
    /// Examples cut to `max_seq_len` (kept) or dropped for length.
    pub truncated: usize,
    pub dropped_too_long: usize,
    /// Conversations whose assistant turns carry no token after templating.
    pub zero_label_examples: usize,
    /// Inputs kept but changed or worth knowing about (e.g. a number read as text), by kind.
    #[serde(default)]
    pub notes: BTreeMap<String, usize>,
}

impl Report {
    /// Records one skipped input. `kind` is a short reason ("malformed JSON"); `message` the full
    /// `file:line: …` text.
    pub fn skip(&mut self, kind: &str, message: String) {
        self.skipped += 1;
        let n = self.by_reason.entry(kind.to_string()).or_default();
        *n += 1;
        if *n <= SAMPLES_PER_REASON {
            tracing::debug!("{message}");
            self.samples.push(message);
        }
    }

    /// Records an input that was kept but changed (it is not a skip): counted by `kind`, the
    /// first few messages kept with the samples.
    pub fn note(&mut self, kind: &str, message: String) {
        let n = self.notes.entry(kind.to_string()).or_default();
        *n += 1;
        if *n <= SAMPLES_PER_REASON {
            self.samples.push(message);
        }
    }

    /// Adds another report's counts to this one.
    pub fn merge(&mut self, other: Report) {
        self.skipped += other.skipped;
        for (k, v) in other.by_reason {
            *self.by_reason.entry(k).or_default() += v;
        }
        for s in other.samples {
            if self.samples.len() < 100 {
                self.samples.push(s);
            }
        }
        self.truncated += other.truncated;
        self.dropped_too_long += other.dropped_too_long;
        self.zero_label_examples += other.zero_label_examples;
        for (k, v) in other.notes {
            *self.notes.entry(k).or_default() += v;
        }
    }

    /// One line per reason, for the summary.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .by_reason
            .iter()
            .map(|(k, v)| format!("skipped {v}: {k}"))
            .collect();
        for (k, v) in &self.notes {
            lines.push(format!("{k}: {v}"));
        }
        if self.truncated > 0 {
            lines.push(format!("truncated to max-seq-len: {}", self.truncated));
        }
        if self.dropped_too_long > 0 {
            lines.push(format!(
                "dropped (longer than max-seq-len): {}",
                self.dropped_too_long
            ));
        }
        if self.zero_label_examples > 0 {
            lines.push(format!(
                "examples with no loss tokens (kept, contribute nothing): {}",
                self.zero_label_examples
            ));
        }
        lines
    }
}
