//! The training recipe replayed on the data: were the labels cut away by max lengths?

use serde_json::json;

use crate::finding::Finding;
use crate::tokenizer::recipe::{Encoded, Recipe};

/// One replayed row, with where it came from.
pub struct ReplayedRow<'a> {
    pub source: &'a str,
    pub line: usize,
    pub encoded: &'a Encoded,
    pub prompt_len: usize,
}

/// `data_labels_truncated` / `data_no_labels` and the length table.
pub fn check_labels(rows: &[ReplayedRow], recipe: &Recipe) -> Vec<Finding> {
    let mut out = Vec::new();
    let n = rows.len();
    let cut: Vec<&ReplayedRow> = rows.iter().filter(|r| r.encoded.supervised() < r.encoded.labels_before_cut).collect();
    let none: Vec<&ReplayedRow> = rows.iter().filter(|r| r.encoded.supervised() == 0).collect();
    let lines = |v: &[&ReplayedRow]| v.iter().take(20).map(|r| format!("{}:{}", r.source, r.line)).collect::<Vec<_>>();
    let limits = format!(
        "max_input_length={} + max_output_length={}",
        recipe.max_input_length.map(|x| x.to_string()).unwrap_or("-".into()),
        recipe.max_output_length.map(|x| x.to_string()).unwrap_or("-".into())
    );
    let lengths = length_table(rows);
    if !cut.is_empty() {
        let lost: usize = cut.iter().map(|r| r.encoded.labels_before_cut - r.encoded.supervised()).sum();
        let total: usize = rows.iter().map(|r| r.encoded.labels_before_cut).sum();
        let share = cut.len() as f64 / n.max(1) as f64;
        let msg = format!(
            "labels truncated in {} of {n} rows ({:.0}%) by {limits}: {lost} of {total} supervised tokens are cut (sequences are kept up to {} tokens; the longest is {}). Raise max_input_length/max_output_length",
            cut.len(),
            share * 100.0,
            recipe.max_length().unwrap_or(0),
            lengths["total"]["max"],
        );
        let f = if share >= 0.1 {
            Finding::error("data_labels_truncated", msg)
        } else {
            Finding::warning("data_labels_truncated", msg)
        };
        out.push(f.with_evidence(json!({
            "rows_truncated": cut.len(), "rows": n, "tokens_lost": lost, "tokens_total": total,
            "max_input_length": recipe.max_input_length, "max_output_length": recipe.max_output_length,
            "lines": lines(&cut), "lengths": lengths,
        })));
    }
    if !none.is_empty() {
        out.push(
            Finding::error(
                "data_no_labels",
                format!(
                    "{} of {n} rows have no supervised token left under {limits}: they train nothing (first: {})",
                    none.len(),
                    lines(&none)[0]
                ),
            )
            .with_evidence(json!({"rows": none.len(), "lines": lines(&none)})),
        );
    }
    out
}

/// p50/p90/p99/max of prompt, target and total token lengths (before the cut).
pub fn length_table(rows: &[ReplayedRow]) -> serde_json::Value {
    let stats = |mut v: Vec<usize>| {
        v.sort_unstable();
        let q = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
        json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v.last().copied().unwrap_or(0)})
    };
    json!({
        "prompt": stats(rows.iter().map(|r| r.prompt_len).collect()),
        "target": stats(rows.iter().map(|r| r.encoded.labels_before_cut).collect()),
        "total": stats(rows.iter().map(|r| r.encoded.full_length).collect()),
    })
}
