//! Suites (suites/*.yaml): data, sampling, generation settings and the verdict gates.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Thresholds of the verdict rules (README: "Verdict rules").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// no_effect: |mean Δ log p per target token| below this ...
    pub no_effect_max_change_per_token: f64,
    /// ... and at least this share of samples generate the same text as the base.
    pub no_effect_min_identical_generations: f64,
    /// regressed: mean Δ log p per answer token below this (negative).
    pub regressed_below_gain_per_token: f64,
    /// pass: mean Δ log p per answer token (formatting tokens excluded) at least this.
    pub min_answer_gain_per_token: f64,
    /// pass: share of samples whose answer tokens gained.
    pub min_improved_fraction: f64,
    /// pass: mean similarity(generation, target) tuned − base at least this.
    pub min_similarity_gain: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            no_effect_max_change_per_token: 0.01,
            no_effect_min_identical_generations: 0.9,
            regressed_below_gain_per_token: -0.05,
            min_answer_gain_per_token: 0.1,
            min_improved_fraction: 0.6,
            min_similarity_gain: 0.0,
        }
    }
}

/// Tolerances of the baseline regression gate (`--baseline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Regression {
    pub max_logprob_drop_per_token: f64,
    pub max_similarity_drop: f64,
}

impl Default for Regression {
    fn default() -> Self {
        Regression { max_logprob_drop_per_token: 0.05, max_similarity_drop: 0.05 }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Suite {
    pub name: Option<String>,
    /// Data files or directories, relative to the suite file.
    pub data: Vec<PathBuf>,
    pub config: Option<PathBuf>,
    pub samples: Option<usize>,
    pub seed: Option<u64>,
    pub max_new_tokens: Option<usize>,
    pub batch_size: Option<usize>,
    /// As `--gpu-memory`: "22GB", "20GiB" (CUDA only).
    pub gpu_memory: Option<String>,
    pub gates: Gates,
    pub regression: Regression,
    /// The file the suite was read from (None: built in).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The built-in default suite (same as suites/default.yaml).
pub const DEFAULT_SUITE: &str = include_str!("../suites/default.yaml");

impl Suite {
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let s: Suite = serde_yaml::from_str(text).with_context(|| format!("invalid suite {origin}"))?;
        s.validate().with_context(|| format!("invalid suite {origin}"))?;
        Ok(s)
    }

    /// Gates that are NaN or infinite would pass or fail everything; counts of 0 measure nothing.
    fn validate(&self) -> Result<()> {
        let (g, r) = (&self.gates, &self.regression);
        for (name, x) in [
            ("gates.no_effect_max_change_per_token", g.no_effect_max_change_per_token),
            ("gates.no_effect_min_identical_generations", g.no_effect_min_identical_generations),
            ("gates.regressed_below_gain_per_token", g.regressed_below_gain_per_token),
            ("gates.min_answer_gain_per_token", g.min_answer_gain_per_token),
            ("gates.min_improved_fraction", g.min_improved_fraction),
            ("gates.min_similarity_gain", g.min_similarity_gain),
            ("regression.max_logprob_drop_per_token", r.max_logprob_drop_per_token),
            ("regression.max_similarity_drop", r.max_similarity_drop),
        ] {
            if !x.is_finite() {
                bail!("{name} is {x}: gates and tolerances must be finite numbers");
            }
        }
        for (name, x) in
            [("samples", self.samples), ("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size)]
        {
            if x == Some(0) {
                bail!("{name} is 0: expected a positive number (or leave it out)");
            }
        }
        if let Some(m) = &self.gpu_memory {
            crate::score::budget::parse_size(m).map_err(|e| anyhow::anyhow!("gpu_memory {e}"))?;
        }
        Ok(())
    }

    /// Reads a suite file; relative paths in it are taken relative to the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read suite {}", path.display()))?;
        let mut s = Self::parse(&text, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new("."));
        s.data = s.data.iter().map(|d| if d.is_absolute() { d.clone() } else { dir.join(d) }).collect();
        s.config = s.config.map(|c| if c.is_absolute() { c } else { dir.join(c) });
        if s.name.is_none() {
            s.name = path.file_stem().map(|n| n.to_string_lossy().into_owned());
        }
        s.source = Some(path.to_path_buf());
        Ok(s)
    }

    pub fn builtin() -> Self {
        Self::parse(DEFAULT_SUITE, "suites/default.yaml").unwrap_or_default()
    }
}
