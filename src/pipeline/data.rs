//! The data rows read, checked, sampled and encoded for a run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use crate::checks;
use crate::checks::labels::ReplayedRow;
use crate::data::Row;
use crate::finding::Finding;
use crate::tokenizer::recipe::{encode, prompt_and_answer, Encoded, Recipe, IGNORE};
use crate::tokenizer::GlmTokenizer;

use super::inputs::{data_files, data_paths};
use super::Options;

/// One data row prepared for scoring.
pub(super) struct Prepared {
    pub(super) row: Row,
    pub(super) encoded: Encoded,
    pub(super) prompt: Vec<u32>,
    pub(super) answer: String,
}

/// The tokenizer (the base's, or the adapter's where the base has none), the recipe, and the
/// data files read, checked and prepared, with the data's findings.
pub(super) fn read_data(
    opts: &Options,
    base_dir: &Path,
    first_lora: Option<&Path>,
    vocab_size: usize,
    context: Option<usize>,
    config: Option<&Path>,
) -> Result<DataRead> {
    // An adapter saved with its tokenizer may stand in for the base's; otherwise the base's error stands.
    let has_tokenizer = |d: &Path| d.join("tokenizer.json").is_file() || d.join("tokenizer.model").is_file();
    let tok = match (GlmTokenizer::from_dir(base_dir), first_lora.filter(|d| has_tokenizer(d))) {
        (Ok(t), _) => t,
        (Err(_), Some(d)) => GlmTokenizer::from_dir(d)?,
        (Err(e), None) => return Err(e),
    };
    // Ids past the embedding would fail deep in the model (or read garbage on a GPU).
    if let Some(max) = tok.inner.get_vocab(true).into_values().max().filter(|&m| m as usize >= vocab_size) {
        bail!(
            "{} has token ids up to {max}, but the model in {} has only {vocab_size} (vocab_size in config.json): the tokenizer belongs to another model",
            tok.source.display(),
            base_dir.display(),
        );
    }
    let recipe = match config {
        Some(c) => Recipe::from_file(c)?,
        None => Recipe::default(),
    };
    let mut findings = Vec::new();
    let (data, origin) = data_paths(opts);
    let files = data_files(&data, &origin, config, &opts.split)?;
    let prepared = prepare_data(&tok, &files, &recipe, opts, context, &mut findings)?;
    Ok(DataRead { tok, recipe, files, prepared, findings })
}

/// What `read_data` gives.
pub(super) struct DataRead {
    pub(super) tok: GlmTokenizer,
    pub(super) recipe: Recipe,
    pub(super) files: Vec<PathBuf>,
    pub(super) prepared: Vec<Prepared>,
    pub(super) findings: Vec<Finding>,
}

/// Reads, checks, samples and encodes the data.
pub(super) fn prepare_data(
    tok: &GlmTokenizer,
    files: &[PathBuf],
    recipe: &Recipe,
    opts: &Options,
    context: Option<usize>,
    findings: &mut Vec<Finding>,
) -> Result<Vec<Prepared>> {
    let mut rows = Vec::new();
    for f in files {
        let (r, fs) = checks::data_format::scan_jsonl(f)?;
        findings.extend(fs);
        findings.extend(checks::data_format::check_rows(&r));
        rows.extend(r);
    }
    if rows.is_empty() {
        return Err(checks::data_format::no_usable_rows(files, findings));
    }
    // Replay the recipe on every row (label checks want all of them), then sample.
    let mut prepared = Vec::new();
    for row in rows {
        let Some((prompt, answer)) =
            prompt_and_answer(tok, &row.messages).with_context(|| format!("{}:{}", row.source.display(), row.line))?
        else {
            continue; // no assistant turn: reported by data_format
        };
        let encoded =
            encode(tok, &row.messages, recipe).with_context(|| format!("{}:{}", row.source.display(), row.line))?;
        prepared.push(Prepared { row, encoded, prompt, answer });
    }
    let sources: Vec<String> = prepared.iter().map(|p| p.row.source.display().to_string()).collect();
    let replayed: Vec<ReplayedRow> = prepared
        .iter()
        .zip(&sources)
        .map(|(p, s)| ReplayedRow { source: s, line: p.row.line, encoded: &p.encoded, prompt_len: p.prompt.len() })
        .collect();
    findings.extend(checks::labels::check_labels(&replayed, recipe));
    if let Some(ctx) = context {
        prepared = fit_context(prepared, ctx, findings)?;
    }
    let limit = opts.samples.or(opts.suite.samples);
    match limit {
        Some(n) if n < prepared.len() => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
            prepared.shuffle(&mut rng);
            prepared.truncate(n);
            prepared.sort_by(|a, b| (&a.row.source, a.row.line).cmp(&(&b.row.source, b.row.line)));
        }
        None if prepared.len() > 256 => prepared.truncate(256),
        _ => {}
    }
    Ok(prepared)
}

/// Keeps the rows the model can take whole: scored sequence and generation prompt within its
/// context. Longer rows say nothing about the adapter, and their attention would not fit in memory.
pub(super) fn fit_context(prepared: Vec<Prepared>, ctx: usize, findings: &mut Vec<Finding>) -> Result<Vec<Prepared>> {
    let total = prepared.len();
    let (fit, long): (Vec<Prepared>, Vec<Prepared>) =
        prepared.into_iter().partition(|p| p.encoded.input_ids.len() <= ctx && p.prompt.len() < ctx);
    if long.is_empty() {
        return Ok(fit);
    }
    let at: Vec<String> = long
        .iter()
        .map(|p| {
            let n = p.encoded.input_ids.len().max(p.prompt.len());
            format!("{}:{} ({n} tokens)", p.row.source.display(), p.row.line)
        })
        .collect();
    let more = if at.len() > 5 { ", ..." } else { "" };
    let msg = format!(
        "{} of {total} rows are longer than the model's context of {ctx} tokens (config.json) and are not scored: {}{more}",
        long.len(),
        at[..at.len().min(5)].join(", ")
    );
    if fit.is_empty() {
        bail!("{msg}; pass --config with the max_input_length/max_output_length of the training, or shorter rows");
    }
    let evidence = json!({"rows": long.len(), "context": ctx, "lines": at.iter().take(20).collect::<Vec<_>>()});
    findings.push(Finding::warning("data_too_long", msg).with_evidence(evidence));
    Ok(fit)
}

/// Tokens that only format the answer: special tokens and whitespace-only pieces.
/// Per target token of each sample: true for formatting tokens (whitespace-only or special). Each
/// distinct token is decoded once (a sample's targets repeat tokens, and samples share them).
pub(super) fn formatting_masks(tok: &GlmTokenizer, prepared: &[Prepared]) -> Vec<Vec<bool>> {
    let specials: Vec<u32> = crate::tokenizer::SPECIALS.iter().filter_map(|s| tok.special(s).ok()).collect();
    let mut known: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
    let mut formatting = |id: u32| {
        *known.entry(id).or_insert_with(|| {
            specials.contains(&id) || tok.decode(&[id], false).map(|s| s.trim().is_empty()).unwrap_or(false)
        })
    };
    prepared
        .iter()
        .map(|p| p.encoded.labels.iter().skip(1).filter(|&&l| l != IGNORE).map(|&l| formatting(l as u32)).collect())
        .collect()
}
