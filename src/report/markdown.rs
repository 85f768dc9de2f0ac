//! Markdown report, for a PR comment or $GITHUB_STEP_SUMMARY.

use std::fmt::Write;

use super::{Report, Verdict};

pub fn render(r: &Report) -> String {
    let s = &r.summary;
    let mut o = String::new();
    let icon = match r.verdict {
        Verdict::Pass => "✅",
        Verdict::Incomplete => "⚠️",
        _ => "❌",
    };
    let _ = writeln!(o, "## {icon} glm4-verify: `{}` — **{}**\n", r.adapter.path, r.verdict.as_str());
    let _ = writeln!(o, "{}\n", esc(&r.cause));
    let _ = writeln!(o, "| metric | base | tuned |\n|---|---:|---:|");
    let _ = writeln!(
        o,
        "| log p per target token | {:.3} | {:.3} |",
        s.mean_logprob_per_token_base, s.mean_logprob_per_token_tuned
    );
    let _ = writeln!(o, "| generation similarity | {:.2} | {:.2} |", s.mean_similarity_base, s.mean_similarity_tuned);
    let _ = writeln!(
        o,
        "\n{} samples, {} target tokens; answer-token gain {:+.3}/token; {:.0}% of samples improved; generations identical to base in {:.0}%.\n",
        s.samples,
        s.target_tokens,
        s.mean_answer_gain_per_token,
        s.improved_fraction * 100.0,
        s.identical_generation_fraction * 100.0
    );
    if !r.findings.is_empty() {
        let _ = writeln!(o, "| severity | code | message |\n|---|---|---|");
        for f in &r.findings {
            let _ = writeln!(o, "| {:?} | `{}` | {} |", f.severity, f.code, esc(&f.message));
        }
    }
    o
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}
