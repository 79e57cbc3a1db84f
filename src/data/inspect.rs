//! `afinar data inspect`: what a prepared dataset holds — examples per split, token-length
//! percentiles, truncated and skipped counts with reasons, the share of tokens that carry loss,
//! and one example rendered with its loss mask made visible.

use std::collections::BTreeMap;
use std::fmt::Write;

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

/// The summary text for split statistics and the report.
pub fn summary(splits: &BTreeMap<String, SplitStats>, report: &Report, records: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "records parsed: {records}");
    let _ = writeln!(
        s,
        "{:<11} {:>9} {:>9} {:>11} {:>10}  lengths min/p50/p90/p99/max",
        "split", "examples", "sequences", "tokens", "loss share"
    );
    for name in SPLITS {
        if let Some(st) = splits.get(name) {
            let share = if st.tokens > 0 {
                st.label_tokens as f64 / st.tokens as f64
            } else {
                0.0
            };
            let p = st.length_percentiles;
            let _ = writeln!(
                s,
                "{name:<11} {:>9} {:>9} {:>11} {:>9.1}%  {}/{}/{}/{}/{}",
                st.examples,
                st.sequences,
                st.tokens,
                100.0 * share,
                p[0],
                p[1],
                p[2],
                p[3],
                p[4]
            );
        }
    }
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
