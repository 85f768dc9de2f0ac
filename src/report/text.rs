//! Terminal report: verdict and cause first, then key numbers, then the worst samples.

use std::fmt::Write;

use super::{Report, Verdict};
use crate::finding::Severity;

pub fn render(r: &Report, color: bool) -> String {
    let paint = |code: &str, s: &str| if color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() };
    let mut o = String::new();
    let v = match r.verdict {
        Verdict::Pass => paint("1;32", "PASS"),
        Verdict::NoEffect => paint("1;31", "NO EFFECT"),
        Verdict::Regressed => paint("1;31", "REGRESSED"),
        Verdict::Fail => paint("1;31", "FAIL"),
        Verdict::Incomplete => paint("1;33", "INCOMPLETE"),
    };
    let _ = writeln!(o, "{v}  {}", r.adapter.path);
    let _ = writeln!(o, "  {}", r.cause);
    if let Some(n) = &r.adapter.note {
        let _ = writeln!(o, "  note: {n}");
    }
    let s = &r.summary;
    let _ = writeln!(o, "\n  base     {} ({})", r.base.path, r.base.layout);
    match r.adapter.kind.as_str() {
        "lora" => {
            let _ = writeln!(
                o,
                "  adapter  LoRA r={} alpha={} scaling={:.3}; {} modules matched, {} tensors",
                r.adapter.rank.unwrap_or(0),
                r.adapter.alpha.unwrap_or(0.0),
                r.adapter.scaling.unwrap_or(0.0),
                r.adapter.matched_modules,
                r.adapter.tensors
            );
        }
        _ => {
            let _ = writeln!(o, "  adapter  merged model directory");
        }
    }
    let _ =
        writeln!(o, "\n  samples {}  target tokens {} (answer tokens {})", s.samples, s.target_tokens, s.answer_tokens);
    let _ = writeln!(
        o,
        "  log p per target token   base {:>8.3}   tuned {:>8.3}   change {:+.3}",
        s.mean_logprob_per_token_base,
        s.mean_logprob_per_token_tuned,
        s.mean_logprob_per_token_tuned - s.mean_logprob_per_token_base
    );
    let _ = writeln!(
        o,
        "  answer tokens            gain {:+.3}/token; {:.0}% of samples improved; {:.0}% of tokens gained (median {:+.3})",
        s.mean_answer_gain_per_token,
        s.improved_fraction * 100.0,
        s.token_gain_fraction * 100.0,
        s.median_token_gain
    );
    let _ = writeln!(
        o,
        "  generation similarity    base {:.2}   tuned {:.2}   identical to base in {:.0}% of samples",
        s.mean_similarity_base,
        s.mean_similarity_tuned,
        s.identical_generation_fraction * 100.0
    );
    if !r.findings.is_empty() {
        let _ = writeln!(o, "\n  findings");
        for f in &r.findings {
            let sev = match f.severity {
                Severity::Error => paint("31", "error"),
                Severity::Warning => paint("33", "warn "),
                Severity::Info => paint("2", "info "),
            };
            let _ = writeln!(o, "    {sev} {}: {}", f.code, f.message);
        }
    }
    let mut worst: Vec<&super::SampleReport> = r.samples.iter().filter(|x| x.target_tokens > 0).collect();
    worst.sort_by(|a, b| gain(a).total_cmp(&gain(b)));
    if !worst.is_empty() {
        let _ = writeln!(o, "\n  worst samples (log p gain per token)");
        for x in worst.iter().take(3) {
            let _ = writeln!(o, "    {}:{}  {:+.3}", x.source, x.line, gain(x));
            let _ = writeln!(o, "      target  {}", one_line(&x.target));
            let _ =
                writeln!(o, "      base    {}  (similarity {:.2})", one_line(&x.generation_base), x.similarity_base);
            let _ =
                writeln!(o, "      tuned   {}  (similarity {:.2})", one_line(&x.generation_tuned), x.similarity_tuned);
        }
    }
    let t = &r.timings;
    let _ = writeln!(
        o,
        "\n  time: load {:.2}s, score {:.2}s, generate {:.2}s, total {:.2}s",
        t.load_s, t.score_s, t.generate_s, t.total_s
    );
    if let Some(m) = &r.gpu_memory {
        let _ = writeln!(
            o,
            "  GPU memory: {} after load, peak {} in use ({} reserved)",
            size(m.after_load_gb),
            size(m.peak_used_gb),
            size(m.peak_reserved_gb)
        );
    }
    o
}

/// GB with one decimal, or MB below 1 GB (small models would all read 0.0 GB).
fn size(gb: f64) -> String {
    if gb < 1.0 {
        format!("{:.1} MB", gb * 1e3)
    } else {
        format!("{gb:.1} GB")
    }
}

fn gain(x: &super::SampleReport) -> f64 {
    (x.logprob_tuned - x.logprob_base) / x.target_tokens.max(1) as f64
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', "\\n");
    if s.chars().count() > 100 {
        format!("{}…", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_in_gb_or_mb() {
        assert_eq!(super::size(35.21), "35.2 GB");
        assert_eq!(super::size(0.0386), "38.6 MB");
    }
}
