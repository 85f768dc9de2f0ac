//! `--baseline previous.json`: fail when a metric dropped against an earlier run of the same suite.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::finding::Finding;
use crate::report::{Report, Verdict, SCHEMA_VERSION};
use crate::suite::Regression;

/// Reads a baseline report and refuses one that cannot be compared with `current`.
pub fn load(path: &Path, current: &Report) -> Result<Report> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read baseline {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("baseline {} is not a JSON report", path.display()))?;
    let sv = v.get("schema_version").cloned().unwrap_or(serde_json::Value::Null);
    if sv != SCHEMA_VERSION {
        bail!(
            "baseline {} has schema_version {sv}, this glm4-verify writes {SCHEMA_VERSION}: regenerate the baseline with this version",
            path.display()
        );
    }
    let base: Report = serde_json::from_value(v)
        .with_context(|| format!("baseline {} is not a single-adapter glm4-verify JSON report", path.display()))?;
    if base.verdict == Verdict::Incomplete {
        bail!(
            "baseline {} is the report of a run that stopped early (verdict incomplete): make the baseline from a complete run",
            path.display()
        );
    }
    if base.run.get("suite") != current.run.get("suite") {
        bail!(
            "baseline {} was made with suite {} and this run uses {}: compare runs of the same suite",
            path.display(),
            base.run["suite"],
            current.run["suite"]
        );
    }
    let key =
        |r: &Report| r.samples.iter().map(|s| (file_name(&s.source), s.line, s.target.clone())).collect::<Vec<_>>();
    if key(&base) != key(current) {
        bail!(
            "baseline {} was measured on other data ({} samples from {}; now {} from {}): compare runs on the same data set and sampling",
            path.display(),
            base.samples.len(),
            base.run["data"],
            current.samples.len(),
            current.run["data"]
        );
    }
    Ok(base)
}

fn file_name(p: &str) -> String {
    Path::new(p).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Compares metric by metric and sample by sample; on a drop past tolerance, adds a
/// `baseline_regressed` finding and turns the verdict into `fail`.
pub fn apply(current: &mut Report, base: &Report, tol: &Regression) {
    let (c, b) = (&current.summary, &base.summary);
    let dlp = c.mean_logprob_per_token_tuned - b.mean_logprob_per_token_tuned;
    let dsim = c.mean_similarity_tuned - b.mean_similarity_tuned;
    let by_key: HashMap<(String, usize), &crate::report::SampleReport> =
        base.samples.iter().map(|s| ((file_name(&s.source), s.line), s)).collect();
    let mut worse = Vec::new();
    for s in &current.samples {
        let Some(p) = by_key.get(&(file_name(&s.source), s.line)) else { continue };
        let n = s.target_tokens.max(1) as f64;
        let d = (s.logprob_tuned - p.logprob_tuned) / n;
        let ds = s.similarity_tuned - p.similarity_tuned;
        if d < -tol.max_logprob_drop_per_token || ds < -tol.max_similarity_drop {
            worse.push(
                json!({"source": s.source, "line": s.line, "logprob_change_per_token": d, "similarity_change": ds,
                              "generation_before": p.generation_tuned, "generation_now": s.generation_tuned}),
            );
        }
    }
    let mut failed = Vec::new();
    if dlp < -tol.max_logprob_drop_per_token {
        failed
            .push(format!("log p per target token fell by {:.3} (tolerance {})", -dlp, tol.max_logprob_drop_per_token));
    }
    if dsim < -tol.max_similarity_drop {
        failed.push(format!("generation similarity fell by {:.3} (tolerance {})", -dsim, tol.max_similarity_drop));
    }
    let evidence = json!({
        "logprob_per_token_change": dlp, "similarity_change": dsim,
        "verdict_before": base.verdict, "samples_worse": worse.len(), "worse": worse.iter().take(20).collect::<Vec<_>>(),
    });
    if failed.is_empty() {
        current.findings.push(
            Finding::info(
                "baseline_ok",
                format!(
                    "within tolerance of the baseline: log p/token {dlp:+.3}, similarity {dsim:+.3}; {} samples worse",
                    worse.len()
                ),
            )
            .with_evidence(evidence),
        );
        return;
    }
    let msg = format!("regressed against the baseline: {}; {} samples got worse", failed.join("; "), worse.len());
    current.findings.push(Finding::error("baseline_regressed", msg.clone()).with_evidence(evidence));
    if current.verdict == Verdict::Pass {
        current.verdict = Verdict::Fail;
        current.cause = format!("not a pass: {msg}");
    }
}
