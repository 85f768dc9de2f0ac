//! Findings + behaviour + gates → verdict and the cause named in one line.

use crate::finding::{Finding, Severity};
use crate::report::{Summary, Verdict};
use crate::suite::Gates;

/// Error findings that explain an adapter with no effect, most telling first.
const NO_EFFECT_CAUSES: [&str; 5] = [
    "adapter_keys_unmatched",
    "adapter_lora_b_zero",
    "adapter_nonfinite",
    "adapter_shape_mismatch",
    "adapter_merge_vanishes",
];
/// Error findings that explain an adapter that learned the wrong thing or too little.
const FAIL_CAUSES: [&str; 8] = [
    "data_labels_truncated",
    "data_no_labels",
    "train_loss_nonfinite",
    "train_grad_norm_zero",
    "train_lr_zero",
    "adapter_nonfinite",
    "adapter_keys_unmatched",
    "data_format",
];

pub fn decide(s: &Summary, findings: &[Finding], gates: &Gates) -> (Verdict, String) {
    let change = s.mean_logprob_per_token_tuned - s.mean_logprob_per_token_base;
    let cause_of = |codes: &[&str]| -> Option<String> {
        codes.iter().find_map(|c| {
            findings.iter().find(|f| f.code == *c && f.severity == Severity::Error).map(|f| f.message.clone())
        })
    };
    if s.target_tokens == 0 {
        let why = cause_of(&FAIL_CAUSES).unwrap_or_else(|| "no sample has a target token to score".into());
        return (Verdict::Fail, format!("not a pass: nothing to measure — {why}"));
    }
    if change.abs() < gates.no_effect_max_change_per_token
        && s.identical_generation_fraction >= gates.no_effect_min_identical_generations
    {
        let why = cause_of(&NO_EFFECT_CAUSES).unwrap_or_else(|| {
            format!(
                "log p per target token changed by {change:+.4} and {:.0}% of generations are identical to the base",
                s.identical_generation_fraction * 100.0
            )
        });
        return (Verdict::NoEffect, format!("no effect: {why}"));
    }
    let gain = if s.answer_tokens > 0 { s.mean_answer_gain_per_token } else { change };
    if gain < gates.regressed_below_gain_per_token {
        let why = cause_of(&FAIL_CAUSES)
            .unwrap_or_else(|| format!("the answer tokens lost {:.3} nats of log p per token", -gain));
        return (Verdict::Regressed, format!("regressed: {why}"));
    }
    if let Some(why) = cause_of(&FAIL_CAUSES).or_else(|| cause_of(&NO_EFFECT_CAUSES)) {
        return (Verdict::Fail, format!("not a pass: {why}"));
    }
    let sim_gain = s.mean_similarity_tuned - s.mean_similarity_base;
    let mut unmet = Vec::new();
    if gain < gates.min_answer_gain_per_token {
        unmet.push(format!(
            "answer tokens gained {gain:+.3} nats/token (gate ≥ {}); formatting tokens alone do not count",
            gates.min_answer_gain_per_token
        ));
    }
    if s.improved_fraction < gates.min_improved_fraction {
        unmet.push(format!(
            "{:.0}% of samples improved (gate ≥ {:.0}%)",
            s.improved_fraction * 100.0,
            gates.min_improved_fraction * 100.0
        ));
    }
    if sim_gain < gates.min_similarity_gain {
        unmet.push(format!("generation similarity changed by {sim_gain:+.3} (gate ≥ {:+})", gates.min_similarity_gain));
    }
    if !unmet.is_empty() {
        return (Verdict::Fail, format!("not a pass: {}", unmet.join("; ")));
    }
    (
        Verdict::Pass,
        format!(
            "pass: answer tokens gained {gain:+.3} nats/token, {:.0}% of samples improved, generation similarity {:.2} → {:.2}",
            s.improved_fraction * 100.0,
            s.mean_similarity_base,
            s.mean_similarity_tuned
        ),
    )
}
