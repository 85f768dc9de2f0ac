//! The report of a run: one struct, several renderers.

pub mod html;
pub mod junit;
pub mod markdown;
pub mod text;

use serde::{Deserialize, Serialize};

use crate::finding::Finding;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    NoEffect,
    Regressed,
    Fail,
    /// Stopped (Ctrl-C, --timeout) before every sample was measured: never a pass.
    Incomplete,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::NoEffect => "no_effect",
            Verdict::Regressed => "regressed",
            Verdict::Fail => "fail",
            Verdict::Incomplete => "incomplete",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseInfo {
    pub path: String,
    pub layout: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub path: String,
    /// "lora" (PEFT adapter) or "merged" (a merged model directory).
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<f64>,
    pub matched_modules: usize,
    pub tensors: usize,
    /// Set when a training output directory was given and one checkpoint of it was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub samples: usize,
    pub target_tokens: usize,
    pub mean_logprob_per_token_base: f64,
    pub mean_logprob_per_token_tuned: f64,
    /// Share of samples whose answer tokens gained log-probability.
    pub improved_fraction: f64,
    pub identical_generation_fraction: f64,
    pub mean_similarity_base: f64,
    pub mean_similarity_tuned: f64,
    /// Target tokens that are not formatting (whitespace-only or special tokens).
    pub answer_tokens: usize,
    pub mean_answer_gain_per_token: f64,
    /// Share of target tokens whose log-probability rose.
    pub token_gain_fraction: f64,
    pub median_token_gain: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SampleReport {
    pub source: String,
    pub line: usize,
    pub target_tokens: usize,
    pub logprob_base: f64,
    pub logprob_tuned: f64,
    pub target: String,
    pub generation_base: String,
    pub generation_tuned: String,
    pub similarity_base: f64,
    pub similarity_tuned: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub load_s: f64,
    pub score_s: f64,
    pub generate_s: f64,
    pub total_s: f64,
}

/// GPU memory of the run, GB (1e9 bytes): after loading the models and adapters, and at its peak
/// (the CUDA memory pool's high-water marks: in use by tensors, and reserved from the driver; the
/// CUDA context and libraries, ~0.5 GB more in nvidia-smi, are not counted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GpuMemory {
    pub after_load_gb: f64,
    pub peak_used_gb: f64,
    pub peak_reserved_gb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub verdict: Verdict,
    /// One line: why this verdict (the finding that explains it, or the gate that failed).
    pub cause: String,
    pub base: BaseInfo,
    pub adapter: AdapterInfo,
    pub findings: Vec<Finding>,
    pub summary: Summary,
    pub samples: Vec<SampleReport>,
    /// What was run: data files, recipe, suite, device (for baselines and reproducibility).
    pub run: serde_json::Value,
    pub timings: Timings,
    /// On CUDA only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<GpuMemory>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// Output formats of a single run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Junit,
    Markdown,
    /// One self-contained page (inline CSS and SVG plots).
    Html,
}

/// Renders reports (one per adapter) in a format.
pub fn render(reports: &[Report], format: Format, color: bool) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => {
            let mut s = if reports.len() == 1 {
                serde_json::to_string_pretty(&reports[0])?
            } else {
                serde_json::to_string_pretty(
                    &serde_json::json!({"schema_version": SCHEMA_VERSION, "reports": reports}),
                )?
            };
            s.push('\n');
            s
        }
        Format::Text => reports.iter().map(|r| text::render(r, color)).collect::<Vec<_>>().join("\n"),
        Format::Markdown => reports.iter().map(markdown::render).collect::<Vec<_>>().join("\n"),
        Format::Junit => junit::render(reports)?,
        Format::Html => html::render_all(reports)?,
    })
}

/// Writes `text` to `path` atomically (temporary file + rename): a killed run leaves no half report.
pub fn write_atomic(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write the report {}: {e}", path.display())
    })
}
