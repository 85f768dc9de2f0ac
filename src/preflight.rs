//! `glm4-verify check` (static diagnostics without a model run) and `inspect-data` (the label view).

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::adapter::{match_to_base, Adapter};
use crate::checks;
use crate::checks::labels::ReplayedRow;
use crate::finding::{Finding, Severity};
use crate::model::weights::Weights;
use crate::model::ModelConfig;
use crate::pipeline::{data_files, data_paths, resolve_adapter, resolve_base, AdapterInput, Options};
use crate::report::Format;
use crate::tokenizer::recipe::{encode, prompt_and_answer, Encoded, Recipe, IGNORE};
use crate::tokenizer::GlmTokenizer;

/// Every finding the files alone support: adapters against the base, data, labels, training logs.
pub fn check(opts: &Options) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let inputs: Vec<AdapterInput> = opts.adapters.iter().map(|a| resolve_adapter(a)).collect::<Result<_>>()?;
    let first = inputs.first().map(|i| i.dir().to_path_buf());
    let base_dir = resolve_base(opts.base.as_deref(), first.as_deref())?;
    let cfg = ModelConfig::from_dir(&base_dir)?;
    let weights = Weights::open_dir(&base_dir)?;
    for input in &inputs {
        if let AdapterInput::Lora { dir, .. } = input {
            let a = Adapter::open(dir)?;
            let m = match_to_base(&a, &cfg)?;
            out.extend(tag(dir, checks::adapter::check_files(&a, &m, &cfg)?));
            let (_, eff) = checks::adapter::check_effect(&checks::adapter::weight_rows_from_files(&weights, &cfg), &m)?;
            out.extend(tag(dir, eff));
            if let Some(ts) = checks::train::find_trainer_state(dir) {
                out.extend(checks::train::check_trainer_state(&ts)?);
            }
        }
    }
    let config = opts.config.clone().or(opts.suite.config.clone());
    let (data, origin) = data_paths(opts);
    if !data.is_empty() {
        let tok = GlmTokenizer::from_dir(&base_dir)?;
        let recipe = match &config {
            Some(c) => Recipe::from_file(c)?,
            None => Recipe::default(),
        };
        for f in data_files(&data, &origin, config.as_deref(), &opts.split)? {
            let (rows, fs) = checks::data_format::scan_jsonl(&f)?;
            out.extend(fs);
            out.extend(checks::data_format::check_rows(&rows));
            let (encoded, prompts) = replay(&tok, &rows, &recipe)?;
            let name = f.display().to_string();
            let replayed: Vec<ReplayedRow> = rows
                .iter()
                .zip(&encoded)
                .zip(&prompts)
                .map(|((r, e), &p)| ReplayedRow { source: &name, line: r.line, encoded: e, prompt_len: p })
                .collect();
            out.extend(checks::labels::check_labels(&replayed, &recipe));
        }
    }
    Ok(out)
}

fn replay(tok: &GlmTokenizer, rows: &[crate::data::Row], recipe: &Recipe) -> Result<(Vec<Encoded>, Vec<usize>)> {
    let mut enc = Vec::new();
    let mut prompts = Vec::new();
    for r in rows {
        let at = || format!("{}:{}", r.source.display(), r.line);
        enc.push(encode(tok, &r.messages, recipe).with_context(at)?);
        prompts.push(prompt_and_answer(tok, &r.messages).with_context(at)?.map(|(p, _)| p.len()).unwrap_or(0));
    }
    Ok((enc, prompts))
}

fn tag(dir: &Path, fs: Vec<Finding>) -> Vec<Finding> {
    fs.into_iter()
        .map(|mut f| {
            if let serde_json::Value::Object(m) = &mut f.evidence {
                m.insert("adapter".into(), dir.display().to_string().into());
            }
            f
        })
        .collect()
}

pub fn render(findings: &[Finding], format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({"schema_version": 1, "findings": findings}))? + "\n"
        }
        _ => {
            let mut o = String::new();
            let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
            let _ = writeln!(o, "{} findings, {errors} errors", findings.len());
            for f in findings {
                let _ = writeln!(o, "  {:<7} {}: {}", format!("{:?}", f.severity).to_lowercase(), f.code, f.message);
            }
            o
        }
    })
}

/// The label view of a few rows: trained tokens highlighted (green on a terminal, ⟦…⟧ otherwise),
/// then the length table and label findings over the whole file.
pub fn inspect_data(data: &Path, config: Option<&Path>, tokenizer: &Path, rows: usize, color: bool) -> Result<String> {
    let tok = GlmTokenizer::from_dir(tokenizer)?;
    let recipe = match config {
        Some(c) => Recipe::from_file(c)?,
        None => Recipe::default(),
    };
    let (all, fs) = checks::data_format::scan_jsonl(data)?;
    if all.is_empty() {
        return Err(checks::data_format::no_usable_rows(&[data.to_path_buf()], &fs));
    }
    let (encoded, prompts) = replay(&tok, &all, &recipe)?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{}: {} rows; recipe combine={} max_input_length={:?} max_output_length={:?} (cut at {:?} tokens)\n",
        data.display(),
        all.len(),
        recipe.combine,
        recipe.max_input_length,
        recipe.max_output_length,
        recipe.max_length()
    );
    for (r, e) in all.iter().zip(&encoded).take(rows) {
        let _ = writeln!(
            o,
            "line {}: {} tokens, {} trained{}",
            r.line,
            e.input_ids.len(),
            e.supervised(),
            if e.supervised() < e.labels_before_cut {
                format!(" ({} of {} cut by max length)", e.labels_before_cut - e.supervised(), e.labels_before_cut)
            } else {
                String::new()
            }
        );
        // Group runs of trained / masked tokens and decode each run.
        let mut i = 0;
        let mut line = String::new();
        while i < e.input_ids.len() {
            let trained = e.labels[i] != IGNORE;
            let mut j = i;
            while j < e.input_ids.len() && (e.labels[j] != IGNORE) == trained {
                j += 1;
            }
            let text = tok.decode(&e.input_ids[i..j], false)?.replace('\n', "↵");
            let piece = match (trained, color) {
                (true, true) => format!("\x1b[1;32m{text}\x1b[0m"),
                (true, false) => format!("⟦{text}⟧"),
                (false, true) => format!("\x1b[2m{text}\x1b[0m"),
                (false, false) => text,
            };
            line.push_str(&piece);
            i = j;
        }
        let _ = writeln!(o, "  {line}\n");
    }
    let name = data.display().to_string();
    let replayed: Vec<ReplayedRow> = all
        .iter()
        .zip(&encoded)
        .zip(&prompts)
        .map(|((r, e), &p)| ReplayedRow { source: &name, line: r.line, encoded: e, prompt_len: p })
        .collect();
    let table = checks::labels::length_table(&replayed);
    let _ = writeln!(o, "token lengths      p50    p90    p99    max");
    for k in ["prompt", "target", "total"] {
        let t = &table[k];
        let _ = writeln!(o, "  {k:<14} {:>6} {:>6} {:>6} {:>6}", t["p50"], t["p90"], t["p99"], t["max"]);
    }
    if !color {
        let _ = writeln!(o, "\n⟦…⟧ marks trained tokens (labels); everything else is masked (-100).");
    }
    for f in fs.iter().chain(checks::labels::check_labels(&replayed, &recipe).iter()) {
        let _ = writeln!(o, "{:?} {}: {}", f.severity, f.code, f.message);
    }
    Ok(o)
}
