//! `glm4-verify compare`: several checkpoints of one run against one base load; pick the best.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::checks;
use crate::pipeline::{self, checkpoints, Options};
use crate::report::{Report, Summary, Verdict, SCHEMA_VERSION};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointResult {
    pub path: String,
    pub step: Option<u64>,
    pub verdict: Verdict,
    pub cause: String,
    pub summary: Summary,
    /// Last training loss logged at or before this step (trainer_state.json), when present.
    pub train_loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Best {
    pub path: String,
    pub step: Option<u64>,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub schema_version: u32,
    pub checkpoints: Vec<CheckpointResult>,
    pub best: Option<Best>,
    /// (step, loss) of the whole training run, for the plot.
    pub loss_curve: Vec<(u64, f64)>,
    /// Model loads this run needed (1 = the base once, however many checkpoints).
    pub model_loads: usize,
    /// The full report of every checkpoint (findings and samples).
    pub reports: Vec<Report>,
}

impl CompareReport {
    pub fn any_passed(&self) -> bool {
        self.checkpoints.iter().any(|c| c.verdict == Verdict::Pass)
    }
}

/// `out/` with checkpoint-N directories, or explicit adapter directories.
pub fn expand(args: &[PathBuf]) -> Result<Vec<(Option<u64>, PathBuf)>> {
    if args.len() == 1 {
        let cps = checkpoints(&args[0]);
        if !cps.is_empty() {
            return Ok(cps.into_iter().map(|(n, p)| (Some(n), p)).collect());
        }
    }
    if args.is_empty() {
        bail!("compare needs a training output directory (checkpoint-N/ inside) or two or more adapter directories");
    }
    Ok(args.iter().map(|p| (step_of(p), p.clone())).collect())
}

fn step_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}

pub fn compare(dirs: &[PathBuf], opts: &Options) -> Result<CompareReport> {
    let list = expand(dirs)?;
    let loads_before = crate::model::loads();
    let mut o = opts.clone();
    o.adapters = list.iter().map(|(_, p)| p.clone()).collect();
    let reports = pipeline::verify(&o)?;
    let model_loads = crate::model::loads() - loads_before;
    // The training log of the run: the last checkpoint's trainer_state.json covers all steps.
    let loss_curve = list
        .iter()
        .rev()
        .find_map(|(_, p)| checks::train::find_trainer_state(p))
        .and_then(|ts| checks::train::loss_curve(&ts).ok())
        .unwrap_or_default();
    let checkpoints: Vec<CheckpointResult> = list
        .iter()
        .zip(&reports)
        .map(|((step, _), r)| CheckpointResult {
            path: r.adapter.path.clone(),
            step: *step,
            verdict: r.verdict,
            cause: r.cause.clone(),
            summary: r.summary.clone(),
            train_loss: step.and_then(|s| loss_curve.iter().rfind(|(k, _)| *k <= s).map(|(_, l)| *l)),
        })
        .collect();
    let best = pick_best(&checkpoints);
    Ok(CompareReport { schema_version: SCHEMA_VERSION, checkpoints, best, loss_curve, model_loads, reports })
}

/// The passing checkpoint whose answer tokens gained most (ties: higher generation similarity).
fn pick_best(cs: &[CheckpointResult]) -> Option<Best> {
    let key = |c: &CheckpointResult| (c.summary.mean_answer_gain_per_token, c.summary.mean_similarity_tuned);
    let best = cs
        .iter()
        .filter(|c| c.verdict == Verdict::Pass)
        .max_by(|a, b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal))?;
    let passing = cs.iter().filter(|c| c.verdict == Verdict::Pass).count();
    Some(Best {
        path: best.path.clone(),
        step: best.step,
        why: format!(
            "highest answer-token gain ({:+.3} nats/token, generation similarity {:.2}) of the {passing} passing checkpoint(s)",
            best.summary.mean_answer_gain_per_token, best.summary.mean_similarity_tuned
        ),
    })
}

pub fn render_text(c: &CompareReport, markdown: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let (l, sep) = if markdown { ("| ", " | ") } else { ("", "  ") };
    if markdown {
        let _ = writeln!(o, "## glm4-verify compare\n");
        let _ = writeln!(o, "| step | verdict | gain/token | improved | similarity | identical | train loss | path |\n|---:|---|---:|---:|---:|---:|---:|---|");
    } else {
        let _ = writeln!(
            o,
            "{:>8}{sep}{:<10}{sep}{:>10}{sep}{:>8}{sep}{:>10}{sep}{:>9}{sep}{:>10}{sep}path",
            "step", "verdict", "gain/token", "improved", "similarity", "identical", "train loss"
        );
    }
    for ch in &c.checkpoints {
        let s = &ch.summary;
        let step = ch.step.map(|x| x.to_string()).unwrap_or("-".into());
        let loss = ch.train_loss.map(|x| format!("{x:.4}")).unwrap_or("-".into());
        let _ = writeln!(
            o,
            "{l}{step:>8}{sep}{:<10}{sep}{:>+10.3}{sep}{:>7.0}%{sep}{:>10.2}{sep}{:>8.0}%{sep}{loss:>10}{sep}{}{}",
            ch.verdict.as_str(),
            s.mean_answer_gain_per_token,
            s.improved_fraction * 100.0,
            s.mean_similarity_tuned,
            s.identical_generation_fraction * 100.0,
            ch.path,
            if markdown { " |" } else { "" }
        );
    }
    match &c.best {
        Some(b) => {
            let _ = writeln!(
                o,
                "\nbest: {} (step {}): {}",
                b.path,
                b.step.map(|s| s.to_string()).unwrap_or("-".into()),
                b.why
            );
        }
        None => {
            let _ = writeln!(o, "\nno checkpoint passes");
        }
    }
    for ch in &c.checkpoints {
        if ch.verdict != Verdict::Pass {
            let _ = writeln!(o, "  {}: {}", ch.path, ch.cause);
        }
    }
    let _ = writeln!(o, "(base loaded once for {} checkpoints: {} model load(s))", c.checkpoints.len(), c.model_loads);
    o
}
