//! Presenting an evaluation: the terminal table and a self-contained HTML report (inline CSS
//! and SVG, no scripts or external assets, so it opens offline and can be mailed as one file).

use std::fmt::Write as _;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};

use super::{EvalReport, Metric};

fn fmt_value(name: &str, v: f64) -> String {
    match name {
        "exact_match" | "accuracy" => format!("{:.1}%", 100.0 * v),
        "chrf" => format!("{v:.1}"),
        "perplexity" => format!("{v:.2}"),
        _ => format!("{v:.4}"),
    }
}

fn metric_names(r: &EvalReport) -> Vec<String> {
    let mut names: Vec<String> = Metric::ALL
        .iter()
        .map(|m| m.name().to_string())
        .filter(|n| r.results.values().any(|s| s.metrics.contains_key(n)))
        .collect();
    // Drift is measured whenever text was generated.
    let generated = Metric::ALL
        .iter()
        .filter(|m| m.needs_generation())
        .any(|m| r.results.values().any(|s| s.counts.contains_key(m.name())));
    if generated {
        names.push("script_drift".into());
    }
    names
}

fn value_of(r: &EvalReport, label: &str, name: &str) -> Option<f64> {
    let s = r.results.get(label)?;
    if name == "script_drift" {
        return Some(s.script_drift.share);
    }
    s.metrics.get(name).copied()
}

fn shown(name: &str, v: Option<f64>) -> String {
    match (name, v) {
        ("script_drift", Some(v)) => format!("{:.1}%", 100.0 * v),
        (_, Some(v)) => fmt_value(name, v),
        (_, None) => "-".into(),
    }
}

/// The terminal table: one row per metric, one column per model (and the change when two),
/// then a line saying what the generation metrics were computed over.
pub fn table(r: &EvalReport) -> String {
    let labels: Vec<&String> = r.results.keys().collect();
    let mut header = vec!["metric".to_string()];
    header.extend(labels.iter().map(|l| l.to_string()));
    if labels.len() == 2 {
        header.push("change".into());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(header);
    for name in metric_names(r) {
        let vals: Vec<Option<f64>> = labels.iter().map(|l| value_of(r, l, &name)).collect();
        let mut row = vec![name.clone()];
        row.extend(vals.iter().map(|v| shown(&name, *v)));
        if let [Some(a), Some(b)] = vals[..] {
            let d = b - a;
            row.push(match name.as_str() {
                "exact_match" | "accuracy" | "script_drift" => format!("{:+.1} pt", 100.0 * d),
                _ => format!("{d:+.3}"),
            });
        }
        t.add_row(row);
    }
    for i in 1..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    format!(
        "{t}\n({} generated examples; exact match and accuracy in % of them, chrF 0–100, \
         ROUGE-L 0–1)\n",
        r.examples.len()
    )
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// Horizontal bars for the metrics on a 0–1 scale (chrF divided by 100), one colour per model.
fn bar_chart(r: &EvalReport) -> String {
    let labels: Vec<&String> = r.results.keys().collect();
    let names: Vec<&str> = ["exact_match", "accuracy", "chrf", "rouge_l"]
        .into_iter()
        .filter(|n| labels.iter().any(|l| value_of(r, l, n).is_some()))
        .collect();
    if names.is_empty() {
        return String::new();
    }
    let colours = ["#9aa5b1", "#2f7d4f", "#b5651d"];
    let row_h = 18.0;
    let group_h = row_h * labels.len() as f64 + 14.0;
    let height = group_h * names.len() as f64 + 30.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}" role="img" aria-label="metrics">"#
    );
    for (gi, name) in names.iter().enumerate() {
        let y0 = gi as f64 * group_h + 10.0;
        let _ = write!(
            svg,
            r#"<text x="0" y="{}" font-size="13">{name}</text>"#,
            y0 + row_h
        );
        for (li, l) in labels.iter().enumerate() {
            let v = value_of(r, l, name).unwrap_or(0.0);
            let frac = if *name == "chrf" { v / 100.0 } else { v }.clamp(0.0, 1.0);
            let y = y0 + li as f64 * row_h;
            let _ = write!(
                svg,
                r#"<rect x="110" y="{y}" width="{:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{}" font-size="12">{} {}</text>"#,
                frac * 420.0,
                row_h - 3.0,
                colours[li % colours.len()],
                116.0 + frac * 420.0,
                y + row_h - 6.0,
                escape(l),
                shown(name, Some(v)),
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The training run's curves (train loss, validation loss, learning rate on a second axis),
/// drawn as the run's `loss.png` is, if the report has them.
fn loss_curve(r: &EvalReport) -> String {
    if r.training_curve.len() < 2 {
        return String::new();
    }
    crate::train::plot::loss_curve_svg(&r.training_curve).unwrap_or_default()
}

/// The self-contained HTML report.
pub fn html(r: &EvalReport) -> String {
    let labels: Vec<&String> = r.results.keys().collect();
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>afinar evaluation</h1><p class=meta>{}</p>",
        escape(&format!(
            "model {} · adapter {} · split {} · {} examples · greedy decoding",
            r.settings["model"].as_str().unwrap_or("?"),
            r.settings["adapter"].as_str().unwrap_or("none"),
            r.settings["split"].as_str().unwrap_or("?"),
            r.examples.len()
        ))
    );
    body.push_str("<h2>Metrics</h2><table><tr><th>metric</th>");
    for l in &labels {
        let _ = write!(body, "<th>{}</th>", escape(l));
    }
    body.push_str("</tr>");
    for name in metric_names(r) {
        let _ = write!(body, "<tr><td>{}</td>", escape(&name));
        for l in &labels {
            let _ = write!(
                body,
                "<td class=num>{}</td>",
                escape(&shown(&name, value_of(r, l, &name)))
            );
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    body.push_str(&bar_chart(r));
    let curve = loss_curve(r);
    if !curve.is_empty() {
        body.push_str("<h2>Training loss</h2>");
        body.push_str(&curve);
    }
    // Examples where the models disagree come first; at most 25 shown.
    let mut rows: Vec<&super::ExampleResult> = r.examples.iter().collect();
    let differs = |e: &super::ExampleResult| {
        let mut o = e.outputs.values();
        let first = o.next();
        o.any(|x| Some(x) != first)
    };
    rows.sort_by_key(|e| !differs(e));
    let title = if labels.len() > 1 {
        "Examples where the outputs differ"
    } else {
        "Examples"
    };
    let _ = write!(
        body,
        "<h2>{title}</h2><table class=ex><tr><th>prompt</th><th>reference</th>"
    );
    for l in &labels {
        let _ = write!(body, "<th>{}</th>", escape(l));
    }
    body.push_str("</tr>");
    for e in rows.iter().take(25) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td>",
            escape(&e.prompt),
            escape(&e.references.join(" | "))
        );
        for l in &labels {
            let ok = e
                .scores
                .get(*l)
                .and_then(|s| s.get("exact_match"))
                .is_some_and(|v| *v > 0.5);
            let _ = write!(
                body,
                "<td class={}>{}</td>",
                if ok { "ok" } else { "no" },
                escape(e.outputs.get(*l).map_or("", String::as_str))
            );
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>afinar evaluation</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
th{{background:#f3f3f3}}.num{{text-align:right;font-variant-numeric:tabular-nums}}
.meta{{color:#666}}.ex td{{white-space:pre-wrap;max-width:300px}}.ok{{background:#eaf6ee}}.no{{background:#fdf0ee}}
</style></head><body>
{body}
</body></html>
"#
    )
}
