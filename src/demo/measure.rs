//! How far an adapter moved the model toward its training targets, measured on the saved files:
//! for tuning the demo and for its tests (the tool's own pipeline makes the real report).

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};

use crate::adapter::{match_to_base, Adapter};
use crate::data::read_jsonl;
use crate::model;
use crate::score::engine::{generate, score_targets, BatchLimits, GenOptions};
use crate::tokenizer::recipe::{encode, prompt_and_answer, Recipe};
use crate::tokenizer::GlmTokenizer;

#[derive(Debug, Clone)]
pub struct Measurement {
    pub samples: usize,
    pub target_tokens: usize,
    /// Adapter pairs that matched a module of the base.
    pub matched_modules: usize,
    pub mean_logprob_base: f64,
    pub mean_logprob_tuned: f64,
    /// Samples whose greedy answer (up to the end token) is exactly the reference answer.
    pub exact_base: usize,
    pub exact_tuned: usize,
    /// Greedy answers with the adapter.
    pub generations: Vec<String>,
}

/// Scores base and base + adapter on `data` with the labels of `config` (a lora.yaml).
pub fn measure(base: &Path, adapter: &Path, data: &Path, config: &Path) -> Result<Measurement> {
    let tok = GlmTokenizer::from_dir(base)?;
    let mut glm = model::load_dir(base, DType::F32, &Device::Cpu)?;
    let ad = Adapter::open(adapter)?;
    let matched = match_to_base(&ad, &glm.cfg)?;
    glm.attach(&[matched.deltas])?;
    let recipe = Recipe::from_file(config)?;
    let rows = read_jsonl(data)?;
    let mut items = Vec::new();
    let mut prompts = Vec::new();
    let mut answers = Vec::new();
    for row in &rows {
        let e = encode(&tok, &row.messages, &recipe)?;
        items.push((e.input_ids, e.labels));
        if let Some((p, a)) = prompt_and_answer(&tok, &row.messages)? {
            prompts.push(p);
            answers.push(a);
        }
    }
    let variants = [None, Some(0)];
    let lp = score_targets(&glm, &items, &variants, BatchLimits::default())?;
    let target_tokens: usize = lp[0].iter().map(Vec::len).sum();
    let mean = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|&x| x as f64).sum::<f64>() / target_tokens.max(1) as f64;
    let max_new = vec![48; prompts.len()];
    let gens = generate(&glm, &prompts, &max_new, &variants, BatchLimits::default(), GenOptions::default())?;
    let texts = |g: &Vec<Vec<u32>>| -> Result<Vec<String>> {
        g.iter()
            .map(|ids| {
                let end = ids.iter().position(|t| glm.cfg.eos_ids.contains(t)).unwrap_or(ids.len());
                tok.decode(&ids[..end], true)
            })
            .collect()
    };
    let (base_text, tuned_text) = (texts(&gens[0])?, texts(&gens[1])?);
    let exact = |t: &[String]| t.iter().zip(&answers).filter(|(g, a)| g.trim() == a.trim()).count();
    Ok(Measurement {
        samples: items.len(),
        target_tokens,
        matched_modules: matched.matched_modules.len(),
        mean_logprob_base: mean(&lp[0]),
        mean_logprob_tuned: mean(&lp[1]),
        exact_base: exact(&base_text),
        exact_tuned: exact(&tuned_text),
        generations: tuned_text,
    })
}
