//! `afinar data inspect`: what a prepared dataset holds — examples per split, token-length
//! percentiles, truncated and skipped counts with reasons, the share of tokens that carry loss,
//! and one example rendered with its loss mask made visible.

use std::collections::BTreeMap;
use std::fmt::Write;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};

use crate::model::TextTokenizer;

use super::report::Report;
use super::{SplitStats, SPLITS};

/// Marks around text that carries loss in [`render_masked`].
pub const LOSS_OPEN: &str = "«";
pub const LOSS_CLOSE: &str = "»";

/// The text of `ids` with the loss-carrying runs wrapped in « ».
pub fn render_masked(tok: &TextTokenizer, ids: &[u32], labels: &[u8]) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let on = labels[start] != 0;
        let mut end = start;
        while end < ids.len() && (labels[end] != 0) == on {
            end += 1;
        }
        let text = tok.decode(&ids[start..end], false).unwrap_or_default();
        if on {
            out.push_str(LOSS_OPEN);
            out.push_str(&text);
            out.push_str(LOSS_CLOSE);
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    out
}

/// The summary text for split statistics and the report: a table of the splits (examples,
/// packed sequences, tokens, the share of tokens that carry loss, example lengths), then what
/// was skipped or truncated and why.
pub fn summary(splits: &BTreeMap<String, SplitStats>, report: &Report, records: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "records parsed: {records}");
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header([
        "split",
        "examples",
        "sequences",
        "tokens",
        "loss share",
        "lengths min/p50/p90/p99/max",
    ]);
    for name in SPLITS {
        if let Some(st) = splits.get(name) {
            let share = if st.tokens > 0 {
                st.label_tokens as f64 / st.tokens as f64
            } else {
                0.0
            };
            let p = st.length_percentiles;
            table.add_row([
                name.to_string(),
                st.examples.to_string(),
                st.sequences.to_string(),
                st.tokens.to_string(),
                format!("{:.1}%", 100.0 * share),
                format!("{}/{}/{}/{}/{}", p[0], p[1], p[2], p[3], p[4]),
            ]);
        }
    }
    for i in 1..5 {
        if let Some(c) = table.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let _ = writeln!(s, "{table}");
    let lines = report.summary_lines();
    if lines.is_empty() {
        let _ = writeln!(s, "nothing skipped or truncated");
    }
    for l in lines {
        let _ = writeln!(s, "{l}");
    }
    for sample in report.samples.iter().take(10) {
        let _ = writeln!(s, "  e.g. {sample}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_one_aligned_row_per_split() {
        let stats = |examples: usize| SplitStats {
            examples,
            sequences: examples / 2,
            tokens: 100 * examples,
            label_tokens: 25 * examples,
            length_percentiles: [3, 10, 20, 30, 40],
        };
        let splits: BTreeMap<String, SplitStats> = [("train", 90), ("test", 5), ("validation", 5)]
            .into_iter()
            .map(|(n, e)| (n.to_string(), stats(e)))
            .collect();
        let text = summary(&splits, &Report::default(), 100);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "records parsed: 100");
        let rows: Vec<&&str> = lines.iter().filter(|l| l.contains("25.0%")).collect();
        // In SPLITS order, each with its numbers, all the same width.
        assert_eq!(rows.len(), 3, "{text}");
        assert!(
            rows[0].contains("train") && rows[0].contains("9000"),
            "{text}"
        );
        assert!(
            rows[1].contains("validation") && rows[2].contains("test"),
            "{text}"
        );
        assert!(rows[0].contains("3/10/20/30/40"), "{text}");
        let width = |l: &str| l.chars().count();
        assert!(
            lines[1..5].iter().all(|l| width(l) == width(lines[1])),
            "{text}"
        );
        assert!(text.contains("nothing skipped or truncated"), "{text}");
    }
}
