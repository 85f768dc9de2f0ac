//! `glm4-verify --adapter ...`: load once, check, score, generate, conclude.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use crate::adapter::{match_to_base, Adapter};
use crate::checks;
use crate::checks::labels::ReplayedRow;
use crate::data::Row;
use crate::device;
use crate::finding::Finding;
use crate::model;
use crate::model::profile::{mark, section};
use crate::report::{AdapterInfo, BaseInfo, GpuMemory, Report, Timings, SCHEMA_VERSION};
use crate::score::budget;
use crate::score::engine::{is_out_of_memory, score_and_generate, BatchLimits, GenOptions, Variant};
use crate::score::metrics::{summarize, Measured};
use crate::suite::Suite;
use crate::tokenizer::recipe::{encode, prompt_and_answer, Encoded, Recipe, IGNORE};
use crate::tokenizer::GlmTokenizer;
use crate::verdict;

/// Everything a run needs; `main` fills it from flags and the suite.
#[derive(Debug, Clone)]
pub struct Options {
    pub adapters: Vec<PathBuf>,
    pub base: Option<String>,
    pub data: Vec<PathBuf>,
    pub config: Option<PathBuf>,
    pub suite: Suite,
    pub samples: Option<usize>,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    pub max_new_tokens: Option<usize>,
    pub batch_size: Option<usize>,
    /// The most GPU memory the run may take, bytes (CUDA context included); None: the suite's, else
    /// 95% of the card's.
    pub gpu_memory: Option<u64>,
    /// Which data_config file a data directory is read through: train, val or test.
    pub split: String,
    /// Generate exactly max-new-tokens per row (benchmarks).
    pub ignore_eos: bool,
    /// Show a progress spinner on stderr (main turns it on for terminals unless --quiet).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            adapters: vec![],
            base: None,
            data: vec![],
            config: None,
            suite: Suite::builtin(),
            samples: None,
            seed: 0,
            device: "auto".into(),
            dtype: "auto".into(),
            max_new_tokens: None,
            batch_size: None,
            gpu_memory: None,
            split: "train".into(),
            ignore_eos: false,
            progress: false,
        }
    }
}

/// What `--adapter DIR` turned out to be.
#[derive(Debug, Clone)]
pub enum AdapterInput {
    Lora { dir: PathBuf, note: Option<String> },
    Merged { dir: PathBuf },
}

impl AdapterInput {
    pub fn dir(&self) -> &Path {
        match self {
            AdapterInput::Lora { dir, .. } | AdapterInput::Merged { dir } => dir,
        }
    }
}

/// checkpoint-N subdirectories of a training output directory, sorted by N.
pub fn checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
                    e.path().is_dir().then_some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A PEFT adapter directory, a training output directory (its highest checkpoint-N), or a merged model.
pub fn resolve_adapter(dir: &Path) -> Result<AdapterInput> {
    if !dir.exists() {
        bail!("--adapter {}: no such directory", dir.display());
    }
    if dir.join("adapter_config.json").is_file() {
        return Ok(AdapterInput::Lora { dir: dir.to_path_buf(), note: None });
    }
    let cps = checkpoints(dir);
    if let Some((n, last)) = cps.last() {
        if last.join("adapter_config.json").is_file() {
            let note = format!(
                "{} is a training output directory: using its highest checkpoint, checkpoint-{n} (of {})",
                dir.display(),
                cps.len()
            );
            return Ok(AdapterInput::Lora { dir: last.clone(), note: Some(note) });
        }
    }
    if dir.join("config.json").is_file() {
        return Ok(AdapterInput::Merged { dir: dir.to_path_buf() });
    }
    bail!(
        "--adapter {}: neither a PEFT adapter (adapter_config.json), a training output (checkpoint-N/), nor a merged model (config.json + weights)",
        dir.display()
    )
}

/// `--base`, or base_model_name_or_path of the adapter: a local directory (absolute, relative to the
/// working directory, or to the adapter and its parents) or a Hugging Face id in the local cache.
pub fn resolve_base(arg: Option<&str>, adapter: Option<&Path>) -> Result<PathBuf> {
    let (name, from) = match arg {
        Some(b) => (b.to_string(), "--base".to_string()),
        None => {
            let Some(a) = adapter else { bail!("no --base given and no adapter to read it from") };
            let cfg = a.join("adapter_config.json");
            let v: serde_json::Value = std::fs::read_to_string(&cfg)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(serde_json::Value::Null);
            match v.get("base_model_name_or_path").and_then(|b| b.as_str()) {
                Some(b) if !b.is_empty() => (b.to_string(), format!("base_model_name_or_path in {}", cfg.display())),
                _ => bail!(
                    "{} names no base model (base_model_name_or_path is empty): pass --base DIR or --base ORG/NAME",
                    cfg.display()
                ),
            }
        }
    };
    let mut tried = Vec::new();
    let p = PathBuf::from(&name);
    let mut candidates = vec![p.clone()];
    if p.is_relative() {
        if let Some(a) = adapter {
            candidates.extend(a.ancestors().take(4).map(|d| d.join(&p)));
        }
    }
    for c in candidates {
        if c.join("config.json").is_file() {
            return Ok(c);
        }
        let why = if c.is_dir() { " (a directory, but without config.json)" } else { "" };
        tried.push(format!("{}{why}", c.display()));
    }
    if let Some(found) = hf_cache_lookup(&name, &mut tried) {
        return Ok(found);
    }
    bail!(
        "cannot find the base model {name:?} (from {from}); tried:\n  {}\nPass --base with a local model directory (config.json + safetensors), or download it first (huggingface-cli download {name})",
        tried.join("\n  ")
    )
}

/// models--ORG--NAME/snapshots/<rev>/ in HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub.
fn hf_cache_lookup(id: &str, tried: &mut Vec<String>) -> Option<PathBuf> {
    if !id.contains('/') || id.starts_with('/') || id.starts_with('.') {
        return None;
    }
    let mut roots = Vec::new();
    if let Ok(c) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(c));
    }
    if let Ok(h) = std::env::var("HF_HOME") {
        roots.push(PathBuf::from(h).join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    let folder = format!("models--{}", id.replace('/', "--"));
    for root in roots {
        let repo = root.join(&folder);
        let snaps = repo.join("snapshots");
        // refs/main names the revision the hub client considers current.
        if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
            let s = snaps.join(rev.trim());
            if s.join("config.json").is_file() {
                return Some(s);
            }
        }
        let mut all: Vec<PathBuf> = std::fs::read_dir(&snaps)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("config.json").is_file()).collect())
            .unwrap_or_default();
        all.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        if let Some(s) = all.pop() {
            return Some(s);
        }
        tried.push(format!("{} (Hugging Face cache)", snaps.display()));
    }
    None
}

/// The data paths of a run (`--data`, else the suite's `data:`) and where they were named.
pub fn data_paths(opts: &Options) -> (Vec<PathBuf>, String) {
    if !opts.data.is_empty() {
        return (opts.data.clone(), "--data".into());
    }
    let origin = match &opts.suite.source {
        Some(p) => format!("suite {}: data", p.display()),
        None => "the suite's data".into(),
    };
    (opts.suite.data.clone(), origin)
}

/// Data files: jsonl files as given, or a directory read through lora.yaml's data_config.
/// `origin` names where the paths came from, for messages (`--data`, a suite).
pub fn data_files(data: &[PathBuf], origin: &str, config: Option<&Path>, split: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in data {
        if d.is_dir() {
            let key = match split {
                "train" => "train_file",
                "val" => "val_file",
                "test" => "test_file",
                other => bail!("--split {other}: expected train, val or test"),
            };
            let from_cfg = match config {
                Some(c) => data_config_file(c, key)?,
                None => None,
            };
            let name = from_cfg.unwrap_or_else(|| format!("{split}.jsonl"));
            let f = d.join(&name);
            if !f.is_file() {
                bail!(
                    "{origin} {}: a data directory is read through lora.yaml's data_config.{key}; {} does not exist (pass --config lora.yaml, or a .jsonl file)",
                    d.display(),
                    f.display()
                );
            }
            out.push(f);
        } else if d.is_file() {
            out.push(d.clone());
        } else {
            bail!("{origin} {}: no such file or directory", d.display());
        }
    }
    if out.is_empty() {
        bail!("no data: pass --data FILE.jsonl (finetune_demo format) or a suite with data");
    }
    Ok(out)
}

/// `data_config.<key>` of a lora.yaml: the file a data directory is read through.
fn data_config_file(config: &Path, key: &str) -> Result<Option<String>> {
    let text = std::fs::read_to_string(config).with_context(|| format!("cannot read config {}", config.display()))?;
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", config.display()))?;
    match v.get("data_config").and_then(|d| d.get(key)) {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(serde_yaml::Value::String(s)) => Ok(Some(s.clone())),
        Some(x) => bail!(
            "{}: data_config.{key} must be a file name, found {}",
            config.display(),
            serde_yaml::to_string(x).unwrap_or_default().trim()
        ),
    }
}

/// One data row prepared for scoring.
struct Prepared {
    row: Row,
    encoded: Encoded,
    prompt: Vec<u32>,
    answer: String,
}

/// The tokenizer (the base's, or the adapter's where the base has none), the recipe, and the
/// data files read, checked and prepared, with the data's findings.
fn read_data(
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
struct DataRead {
    tok: GlmTokenizer,
    recipe: Recipe,
    files: Vec<PathBuf>,
    prepared: Vec<Prepared>,
    findings: Vec<Finding>,
}

/// Reads, checks, samples and encodes the data.
fn prepare_data(
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
fn fit_context(prepared: Vec<Prepared>, ctx: usize, findings: &mut Vec<Finding>) -> Result<Vec<Prepared>> {
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
fn formatting_masks(tok: &GlmTokenizer, prepared: &[Prepared]) -> Vec<Vec<bool>> {
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

/// Runs the verification of every adapter against one base load.
pub fn verify(opts: &Options) -> Result<Vec<Report>> {
    let t0 = Instant::now();
    if opts.adapters.is_empty() {
        bail!("no --adapter given: pass a PEFT adapter directory, a training output directory or a merged model directory");
    }
    let inputs: Vec<AdapterInput> = opts.adapters.iter().map(|a| resolve_adapter(a)).collect::<Result<_>>()?;
    let first_lora = inputs.iter().find_map(|i| match i {
        AdapterInput::Lora { dir, .. } => Some(dir.clone()),
        _ => None,
    });
    let base_dir = resolve_base(opts.base.as_deref(), first_lora.as_deref().or(Some(inputs[0].dir())))?;
    let base_cfg = model::ModelConfig::from_dir(&base_dir)?;
    let context = base_cfg.max_positions;
    let config = opts.config.clone().or(opts.suite.config.clone());
    // The tokenizer and the data are read on another thread while the device starts (the CUDA
    // context); their errors come after the device's, before the model loads.
    let data_job = {
        let (opts, base_dir, first_lora, config) = (opts.clone(), base_dir.clone(), first_lora.clone(), config.clone());
        let vocab = base_cfg.vocab_size;
        std::thread::spawn(move || {
            read_data(&opts, &base_dir, first_lora.as_deref(), vocab, context, config.as_deref())
        })
    };
    // The adapters too: their files and the base's config are all they need; their stacks are
    // converted to the dtype a GPU run will most likely take (bf16; checked once the device is up).
    let adapters_job = {
        let (inputs, cfg) = (inputs.clone(), base_cfg.clone());
        let likely = likely_gpu_dtype(&opts.device, &opts.dtype);
        std::thread::spawn(move || read_adapters(&inputs, &cfg, likely))
    };
    // And the base's safetensors mapped (their pages mapped in ahead: tens of ms on a 9B model).
    let weights_job = {
        let dir = base_dir.clone();
        std::thread::spawn(move || model::weights::Weights::open_dir(&dir))
    };
    let dev = device::select(&opts.device)?;
    mark("device ready");
    let dinfo = device::info(&dev);
    let mut dtype = device::dtype(&opts.dtype, &dinfo)?;
    let mut cpu_dtype_note = None;
    let base_weights = weights_job
        .join()
        .map_err(|_| anyhow::anyhow!("mapping the base weights failed unexpectedly (a thread panicked)"))??;
    if opts.dtype == "auto" && matches!(dev, Device::Cpu) {
        let w = &base_weights;
        if let Some(ckpt) = w.main_dtype() {
            let f32_bytes = w.total_bytes() / ckpt.size_in_bytes() * 4;
            (dtype, cpu_dtype_note) = device::cpu_auto_dtype(ckpt, f32_bytes, device::available_memory());
        }
    }
    let DataRead { tok, recipe, files, prepared, findings: mut common } =
        data_job.join().map_err(|_| anyhow::anyhow!("reading the data failed unexpectedly (a thread panicked)"))??;
    mark("data read");
    // Precision: the device, the run's dtype, and what training asked for.
    let (tb, tf) = match &config {
        Some(c) => std::fs::read_to_string(c)
            .ok()
            .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
            .map(|v| checks::hardware::read_training_precision_from_yaml(&v))
            .unwrap_or((None, None)),
        None => (None, None),
    };
    // Without lora.yaml's training_args, the run's own training_args.json / DeepSpeed config says it.
    let (tb, tf) = match (tb, tf, &first_lora) {
        (None, None, Some(dir)) => checks::train::training_precision(dir)
            .or_else(|| dir.parent().and_then(checks::train::training_precision))
            .map(|p| p.flags())
            .unwrap_or((None, None)),
        other => (other.0, other.1),
    };
    common.extend(checks::hardware::check_precision(&dinfo, device::dtype_name(dtype), tb, tf));
    if let Some(why) = cpu_dtype_note {
        common.push(Finding::info("hardware_cpu_dtype", why));
    }

    crate::model::profile::phase("load");
    let progress = Progress::new(opts.progress);
    progress.stage(format!("loading {}", base_dir.display()));
    let t_load = Instant::now();
    let Adapters { lora_slots, mut per_adapter, attach, stacked, effect_jobs } = adapters_job
        .join()
        .map_err(|_| anyhow::anyhow!("reading the adapters failed unexpectedly (a thread panicked)"))??;
    mark("adapter checks done");
    // The weights stream to the GPU on their own thread, with room for the adapters' columns; the
    // device waits for each layer as the first pass reaches it.
    let room = model::glm::side_room(&attach, &dev)?;
    let mut base = section("weights", &dev, || model::load_streamed(&base_dir, &base_weights, dtype, &dev, &room))?;
    mark("weights queued");
    // The adapters' effect checks read sampled rows of the base weights from the files, on other
    // threads, while the device scores: they need neither the device nor the model.
    let (effect_slots, jobs): (Vec<(usize, usize)>, Vec<_>) =
        effect_jobs.into_iter().map(|(r, at, m)| ((r, at), m)).unzip();
    // Where the input embedding lies in the files, for a tight memory budget (`fit_memory`).
    let embed_file = model::glm::embedding_in(&base_weights, base_cfg.layout);
    let effect_job = {
        let (cfg, upload) = (base_cfg.clone(), base.pending_weights());
        std::thread::spawn(move || -> Result<Vec<Vec<Finding>>> {
            // After the weights' upload, whose threads read the same files: the check has all of
            // scoring to finish in, the upload is what the first pass waits for.
            if let Some(u) = upload {
                u.finished();
            }
            let rows = checks::adapter::weight_rows_from_files(&base_weights, &cfg);
            jobs.iter().map(|m| Ok(checks::adapter::check_effect(&rows, m)?.1)).collect()
        })
    };
    section("attach adapters", &dev, || base.attach_prepared(stacked))?;
    mark("adapters attached");
    let layout = base.cfg.layout.as_str().to_string();
    let mut load_s = t_load.elapsed().as_secs_f64();
    let used_after_load = device::gpu_memory(&dev).map(|(now, _, _)| now);

    let caps = limits(opts, &dev, &base.cfg)?;
    let longest = prepared.iter().map(|p| p.encoded.input_ids.len()).max().unwrap_or(0);
    let (lim, budget) = fit_memory(opts, &dev, &mut base, caps, dtype, longest, embed_file)?;
    let embedding_on_host = base.embedding_on_host();
    mark(if embedding_on_host {
        "batches fitted to the memory budget, embedding in host memory"
    } else {
        "batch limits set"
    });
    let gen_opts = GenOptions { stop_at_eos: !opts.ignore_eos };
    let items: Vec<(Vec<u32>, Vec<i64>)> =
        prepared.iter().map(|p| (p.encoded.input_ids.clone(), p.encoded.labels.clone())).collect();
    let prompts: Vec<Vec<u32>> = prepared.iter().map(|p| p.prompt.clone()).collect();
    let max_new: Vec<usize> = prepared
        .iter()
        .map(|p| {
            opts.max_new_tokens
                .or(opts.suite.max_new_tokens)
                .unwrap_or_else(|| tok.encode(&p.answer).map(|t| t.len()).unwrap_or(64) + 16)
                .min(context.map_or(usize::MAX, |c| c - p.prompt.len()))
        })
        .collect();

    // Base rows and every LoRA adapter's rows in the same batches.
    let mut variants: Vec<Variant> = vec![None];
    variants.extend((0..attach.len()).map(Some));
    progress.stage(format!(
        "scoring and generating: {} samples × {} variants (teacher-forced, then greedy)",
        items.len(),
        variants.len()
    ));
    // Generation continues from the scoring pass's prompt caches (see score_and_generate).
    // The reports' formatting masks (host work) meanwhile.
    let (out, masks) = std::thread::scope(|s| {
        let masks = s.spawn(|| formatting_masks(&tok, &prepared));
        let out = with_memory_retry(lim, &dev, &mut common, |lim| {
            score_and_generate(&base, &items, &prompts, &max_new, &variants, lim, gen_opts)
        });
        (out, masks.join())
    });
    let out = out?;
    let masks = masks.map_err(|_| anyhow!("marking formatting tokens failed unexpectedly (a thread panicked)"))?;
    let (mut lp, mut gens, mut score_s, mut generate_s) = (out.scores, out.gens, out.score_s, out.generate_s);
    // A stopped run (Ctrl-C, --timeout) reports the samples that finished, as incomplete.
    let (base_complete, mut stopped) = (out.complete, out.stopped);
    mark("scored and generated");
    // A streamed load ends when its last weight is on the device, while the first pass runs.
    if let Some(t) = base.weights_arrived() {
        load_s = load_s.max(t.duration_since(t_load).as_secs_f64());
    }
    let effects = effect_job
        .join()
        .map_err(|_| anyhow!("the adapter effect check failed unexpectedly (a thread panicked)"))??;
    for ((report, at), found) in effect_slots.into_iter().zip(effects) {
        let fs = &mut per_adapter[report].0;
        fs.splice(at.min(fs.len())..at.min(fs.len()), found);
    }
    mark("effect check joined");
    drop(base);
    mark("base model freed");
    progress.finish();

    // Merged models: one more model each (compared with the base's numbers).
    let mut merged_results = Vec::new();
    for input in &inputs {
        if let AdapterInput::Merged { dir } = input {
            if stopped.is_some() {
                merged_results.push((vec![vec![]; items.len()], vec![vec![]; items.len()], vec![false; items.len()]));
                continue;
            }
            let t = Instant::now();
            let w = model::weights::Weights::open_dir(dir)?;
            #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
            let mut m = model::load_from(dir, &w, dtype, &dev)?;
            // Within the same budget as the base: its embedding in host memory too.
            #[cfg(feature = "cuda")]
            if let (true, Device::Cuda(c)) = (embedding_on_host, &dev) {
                if m.embedding_to_host(model::glm::embedding_in(&w, m.cfg.layout)).unwrap_or(0) > 0 {
                    device::pool::release_freed_memory(c);
                }
            }
            load_s += t.elapsed().as_secs_f64();
            let mut out = with_memory_retry(lim, &dev, &mut common, |lim| {
                score_and_generate(&m, &items, &prompts, &max_new, &[None], lim, gen_opts)
            })?;
            score_s += out.score_s;
            generate_s += out.generate_s;
            stopped = stopped.or(out.stopped);
            let done = out.complete.iter().zip(&base_complete).map(|(a, b)| *a && *b).collect();
            merged_results.push((out.scores.remove(0), out.gens.remove(0), done));
        }
    }
    if let Some(why) = &stopped {
        if !base_complete.iter().any(|c| *c) {
            return Err(crate::stop::Stopped(format!(
                "{why}: the run is incomplete and no sample finished, so no report was written"
            ))
            .into());
        }
    }

    let base_lp = lp.remove(0);
    if let Some(i) = base_lp.iter().position(|l| l.iter().any(|x| !x.is_finite())) {
        let at = format!("{}:{}", prepared[i].row.source.display(), prepared[i].row.line);
        let why = match model::weights::Weights::open_dir(&base_dir)?.first_nonfinite()? {
            Some(t) => {
                format!("tensor {t} holds NaN or Inf: the checkpoint is corrupt (a diverged or overflowed save?)")
            }
            None if dtype == DType::F32 => "its weights are finite, but the activations overflow even in f32".into(),
            None => format!(
                "its weights are finite, so the activations overflow {}: run with --dtype f32",
                device::dtype_name(dtype)
            ),
        };
        bail!("the base model {} gives NaN/Inf log-probabilities ({at}); {why}", base_dir.display());
    }
    let base_gen = gens.remove(0);
    let mut lora_iter = lp.into_iter().zip(gens).map(|(l, g)| (l, g, base_complete.clone()));
    let mut merged_iter = merged_results.into_iter();
    let run = json!({
        "data": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "config": config.as_ref().map(|c| c.display().to_string()),
        "recipe": recipe,
        "suite": opts.suite.name,
        "samples": opts.samples.or(opts.suite.samples),
        "seed": opts.seed,
        "split": opts.split,
        "device": dinfo.name,
        "dtype": device::dtype_name(dtype),
        "gpu_memory_budget_gb": budget.map(|b| b as f64 / 1e9),
        "batch_limits": lim.to_string(),
        "embedding_in_host_memory": embedding_on_host,
    });
    let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
    if let (Some(b), Some((_, _, reserved))) = (budget, device::gpu_memory(&dev)) {
        common.extend(over_budget(b, reserved));
    }
    let mut reports = Vec::new();
    for ((mut fs, info), slot) in per_adapter.into_iter().zip(&lora_slots) {
        let (tl, tg, done) = match slot {
            Some(_) => lora_iter.next(),
            None => merged_iter.next(),
        }
        .ok_or_else(|| anyhow!("internal: missing results for {}", info.path))?;
        let measured: Vec<Measured> = prepared
            .iter()
            .enumerate()
            .filter(|(i, _)| done[*i])
            .map(|(i, p)| Measured {
                source: p.row.source.display().to_string(),
                line: p.row.line,
                target: p.answer.clone(),
                lp_base: base_lp[i].clone(),
                lp_tuned: tl[i].clone(),
                formatting: masks[i].clone(),
                gen_base: decode(&base_gen[i]),
                gen_tuned: decode(&tg[i]),
                gen_base_ids: base_gen[i].clone(),
                gen_tuned_ids: tg[i].clone(),
            })
            .collect();
        let (summary, samples) = summarize(&measured);
        // A merged model runs alone: NaN in it shows only in its own numbers.
        if let Some(i) = tl.iter().position(|l| l.iter().any(|x| !x.is_finite())) {
            if !fs.iter().any(|f| f.code == "adapter_nonfinite") {
                let at = format!("{}:{}", prepared[i].row.source.display(), prepared[i].row.line);
                let msg = format!(
                    "the tuned model gives NaN/Inf log-probabilities ({at}): its weights hold NaN/Inf, or it overflows {}; check the checkpoint, or run with --dtype f32",
                    device::dtype_name(dtype)
                );
                fs.push(Finding::error("adapter_nonfinite", msg));
            }
        }
        let mut findings = common.clone();
        findings.append(&mut fs);
        let (mut v, mut cause) = verdict::decide(&summary, &findings, &opts.suite.gates);
        if let Some(why) = &stopped {
            let n = done.iter().filter(|d| **d).count();
            cause = format!(
                "{why}: the run stopped after {n} of {} samples; the numbers cover those only, and there is no verdict",
                prepared.len()
            );
            findings.push(Finding::error("run_incomplete", cause.clone()));
            v = crate::report::Verdict::Incomplete;
        }
        if matches!(v, crate::report::Verdict::NoEffect) {
            findings.push(Finding::error("behavior_no_effect", cause.clone()));
        } else if matches!(v, crate::report::Verdict::Regressed) {
            findings.push(Finding::error("behavior_regressed", cause.clone()));
        }
        reports.push(Report {
            schema_version: SCHEMA_VERSION,
            verdict: v,
            cause,
            base: BaseInfo { path: base_dir.display().to_string(), layout: layout.clone() },
            adapter: info,
            findings,
            summary,
            samples,
            run: run.clone(),
            timings: Timings { load_s, score_s, generate_s, total_s: t0.elapsed().as_secs_f64() },
            gpu_memory: device::gpu_memory(&dev).map(|(_, used, reserved)| GpuMemory {
                after_load_gb: used_after_load.unwrap_or(0) as f64 / 1e9,
                peak_used_gb: used as f64 / 1e9,
                peak_reserved_gb: reserved as f64 / 1e9,
            }),
        });
    }
    mark("reports built");
    Ok(reports)
}

/// The adapters as the run uses them: read and checked (all but the effect check) from their files.
struct Adapters {
    /// Per `--adapter`: its index among the LoRA adapters attached to the base, None for a merged model.
    lora_slots: Vec<Option<usize>>,
    per_adapter: Vec<(Vec<Finding>, AdapterInfo)>,
    /// What `Glm::attach` takes (an adapter that is not applied has no deltas).
    attach: Vec<Vec<(usize, model::Target, model::lora::LoraDelta)>>,
    /// The same, stacked per linear on the host.
    stacked: model::glm::PreparedAdapters,
    /// (report, position among its findings, matched pairs) of each effect check to run.
    effect_jobs: Vec<(usize, usize, crate::adapter::Matched)>,
}

/// The dtype a run on a GPU takes for `--device`, `--dtype`, as far as it is known before the device
/// starts (`device::dtype` for a GPU of unknown capability: `auto` is bf16); None for a CPU run.
fn likely_gpu_dtype(device_arg: &str, dtype_arg: &str) -> Option<candle_core::DType> {
    if !cfg!(feature = "cuda") || device_arg == "cpu" {
        return None;
    }
    let gpu = checks::hardware::DeviceInfo { name: String::new(), compute_capability: None, is_cuda: true };
    device::dtype(dtype_arg, &gpu).ok()
}

/// Reads the `--adapter` inputs against the base's config and stacks their deltas per linear in the
/// likely dtype (no device needed: runs while it starts).
fn read_adapters(
    inputs: &[AdapterInput],
    base_cfg: &model::ModelConfig,
    likely_dtype: Option<candle_core::DType>,
) -> Result<Adapters> {
    let mut lora_slots: Vec<Option<usize>> = Vec::new();
    let mut per_adapter: Vec<(Vec<Finding>, AdapterInfo)> = Vec::new();
    let mut attach = Vec::new();
    let mut effect_jobs = Vec::new();
    for input in inputs {
        match input {
            AdapterInput::Lora { dir, note } => {
                let a = Adapter::open(dir)?;
                let m = match_to_base(&a, base_cfg)?;
                let mut fs = checks::adapter::check_files(&a, &m, base_cfg)?;
                // The effect check comes later, from another thread; its findings go here.
                effect_jobs.push((per_adapter.len(), fs.len(), m.clone()));
                if let Some(ts) = checks::train::find_trainer_state(dir)
                    .or_else(|| dir.parent().and_then(checks::train::find_trainer_state))
                {
                    match checks::train::check_trainer_state(&ts) {
                        Ok(f) => fs.extend(f),
                        Err(e) => fs.push(Finding::warning("train_state_unreadable", format!("{e:#}"))),
                    }
                }
                let info = AdapterInfo {
                    path: dir.display().to_string(),
                    kind: "lora".into(),
                    rank: Some(a.config.r),
                    alpha: Some(a.config.lora_alpha),
                    scaling: Some(a.config.scaling()),
                    matched_modules: m.matched_modules.len(),
                    tensors: a.tensors,
                    note: note.clone(),
                };
                lora_slots.push(Some(attach.len()));
                // Base and adapter rows share batches, and 0·NaN = NaN: a NaN adapter would poison
                // every row. It is not applied; its finding says so.
                match fs.iter_mut().find(|f| f.code == "adapter_nonfinite") {
                    Some(f) => {
                        f.message.push_str("; not applied in this run, so its numbers are the base's");
                        attach.push(vec![]);
                    }
                    None => attach.push(m.deltas),
                }
                per_adapter.push((fs, info));
            }
            AdapterInput::Merged { dir } => {
                lora_slots.push(None);
                per_adapter.push((
                    vec![],
                    AdapterInfo { path: dir.display().to_string(), kind: "merged".into(), ..Default::default() },
                ));
            }
        }
    }
    let mut stacked = model::glm::PreparedAdapters::new(base_cfg, &attach)?;
    if let Some(dtype) = likely_dtype {
        stacked = stacked.in_dtype(dtype)?;
    }
    Ok(Adapters { lora_slots, per_adapter, attach, stacked, effect_jobs })
}

/// Runs `f`; when the device runs out of memory, again with every batch limit halved, down to one
/// row at a time (each retry is an info finding in the report). Then a clear error.
fn with_memory_retry<T>(
    mut lim: BatchLimits,
    dev: &Device,
    findings: &mut Vec<Finding>,
    mut f: impl FnMut(BatchLimits) -> Result<T>,
) -> Result<T> {
    loop {
        match f(lim) {
            Err(e) if is_out_of_memory(&e) => match lim.halved() {
                Some(smaller) => {
                    #[cfg(feature = "cuda")]
                    if let Device::Cuda(c) = dev {
                        device::pool::release_freed_memory(c);
                    }
                    findings.push(Finding::info(
                        "gpu_out_of_memory_retried",
                        format!("the device ran out of memory with batches of {lim}; retried with {smaller}"),
                    ));
                    lim = smaller;
                }
                None => bail!(
                    "the device runs out of memory even one row at a time ({}): the model and one sequence do not fit; use a GPU with more memory, --dtype bf16, shorter --max-input-length / fewer --max-new-tokens, or --device cpu ({e:#})",
                    device::memory_summary(dev)
                ),
            },
            other => return other,
        }
    }
}

/// Batch limits: `--batch-size` rows, or a size that fits the device.
fn limits(opts: &Options, dev: &Device, cfg: &model::ModelConfig) -> Result<BatchLimits> {
    let rows = opts.batch_size.or(opts.suite.batch_size);
    let mut lim = match dev {
        Device::Cpu => BatchLimits {
            max_rows: rows.unwrap_or(32),
            max_tokens: 8192,
            max_logit_rows: 1024,
            max_cache_tokens: 1 << 16,
            first_passes: 1,
        },
        // Scoring passes of ~12k tokens: on the 9B benchmark (H200) 0.1 s faster in all than ~8k
        // (9.23-9.28 s against 9.33-9.41, alternately; ~4k: 9.76-9.83 s), with the same peak memory
        // (the decode group's caches set it); without flash attention (GLM4_VERIFY_FLASH=0, other
        // head sizes) the scores ([B, heads, T, T] bf16) stay near 0.8 GB at T = 1000. Decoding is bound
        // by a fixed cost per step (one read of the weights and ~1,400 kernel launches), so many rows
        // decode together: up to 2^18 cached positions (10.7 GB on GLM-4-9B, 40 KB each). A fixed
        // budget, not one read from the free memory, so that the same inputs give the same batches
        // (and bits) on every run; where it does not fit, the out-of-memory retry halves it.
        // The first three passes run layer by layer together: on GLM-4-9B an H200 runs a layer of
        // three passes at least as long as a layer's weights take to arrive (~14 ms), so the device
        // does not wait for the streamed load between layers (measured with ~8k-token passes).
        _ => BatchLimits {
            max_rows: rows.unwrap_or(512),
            max_tokens: 12288,
            max_logit_rows: 1024,
            max_cache_tokens: 1 << 18,
            first_passes: 3,
        },
    };
    // Tuning knob for memory/speed trade-offs (benchmarks): GLM4_VERIFY_LIMITS="tokens=8192,cache=32768,logits=256,first=3".
    if let Ok(spec) = std::env::var("GLM4_VERIFY_LIMITS") {
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let n: usize = v.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                anyhow!("GLM4_VERIFY_LIMITS: {part:?} is not key=positive number (keys: rows, tokens, logits, cache, first)")
            })?;
            match k.trim() {
                "rows" => lim.max_rows = n,
                "tokens" => lim.max_tokens = n,
                "logits" => lim.max_logit_rows = n,
                "cache" => lim.max_cache_tokens = n,
                "first" => lim.first_passes = n,
                other => bail!("GLM4_VERIFY_LIMITS: unknown key {other:?} (keys: rows, tokens, logits, cache, first)"),
            }
        }
    }
    // candle's CUDA kernels index elements with 32-bit integers: no activation may reach 2^31
    // elements (past that they fault instead of running out of memory).
    const MAX_ELEMS: usize = (1 << 31) - 1;
    let widest = (2 * cfg.intermediate_size).max(cfg.q_out() + 2 * cfg.kv_out()).max(cfg.hidden_size) + 256;
    lim.max_tokens = lim.max_tokens.min(MAX_ELEMS / widest).max(1);
    lim.max_logit_rows = lim.max_logit_rows.min(MAX_ELEMS / cfg.vocab_size.max(1)).max(1);
    Ok(lim)
}

/// GPU memory beyond the tensors: the CUDA context, cuBLAS's and the kernels' modules (~0.73 GB
/// on an H200 with CUDA 13, nvidia-smi against the pool's peak).
const CUDA_CONTEXT: u64 = 750_000_000;

/// On CUDA, `caps` shrunk to the memory budget (`--gpu-memory`, or 95% of the card's), returned
/// with it. The budget comes from the card's size (or the flag), not from the memory free at the
/// start, so that the same inputs on the same card give the same batches (and bits) every run.
/// When the budget shrinks the batches, the input embedding's table moves to host memory first.
/// `longest`: the longest row, for attention's scores where they are held (no flash kernel).
#[cfg_attr(not(feature = "cuda"), allow(unused_mut, unused_variables))]
fn fit_memory(
    opts: &Options,
    dev: &Device,
    base: &mut model::Glm,
    caps: BatchLimits,
    dtype: DType,
    longest: usize,
    embed_file: Option<(std::sync::Arc<memmap2::Mmap>, std::ops::Range<usize>, DType)>,
) -> Result<(BatchLimits, Option<u64>)> {
    let Some(total) = device::gpu_total_memory(dev) else { return Ok((caps, None)) };
    let from_suite = opts.suite.gpu_memory.as_deref().and_then(|m| budget::parse_size(m).ok());
    let asked = opts.gpu_memory.or(from_suite);
    let budget = asked.unwrap_or(total / 20 * 19);
    let mut costs = budget::Costs::of(&base.cfg, dtype);
    if !base.uses_flash() {
        costs = costs.with_attention_scores(&base.cfg, dtype, longest);
    }
    // The pool's reserve ran up to 14% past the tensors' estimate (fragmentation; BENCHMARKS.md).
    let work = |model: u64| budget.saturating_sub(model + CUDA_CONTEXT) / 7 * 6;
    let mut fitted = budget::fit(caps, &costs, work(base.bytes() as u64));
    #[cfg(feature = "cuda")]
    // A table that cannot move (no page-locked memory to be had) stays, with smaller batches.
    if fitted != Some(caps) && base.embedding_to_host(embed_file).unwrap_or(0) > 0 {
        // The table's device memory goes back to the driver rather than stay in the pool, whose
        // reserve grew past the budget in one of three runs when batches were to reuse it.
        if let Device::Cuda(c) = dev {
            device::pool::release_freed_memory(c);
        }
        fitted = budget::fit(caps, &costs, work(base.bytes() as u64));
    }
    match fitted {
        Some(lim) => Ok((lim, Some(budget))),
        None if asked.is_some() => {
            let model = base.bytes() as u64;
            let least = budget::least(caps, &costs) / 6 * 7 + model + CUDA_CONTEXT;
            bail!(
                "a GPU memory budget of {:.2} GB (--gpu-memory, or the suite's gpu_memory) is too little: the model takes {:.2} GB on the GPU, the CUDA context ~{:.2} GB \
                 and the smallest batches ~{:.2} GB more; give at least {:.2} GB",
                budget as f64 / 1e9,
                model as f64 / 1e9,
                CUDA_CONTEXT as f64 / 1e9,
                (least - model - CUDA_CONTEXT) as f64 / 1e9,
                least as f64 / 1e9
            )
        }
        // A card too small for the model fails at its load; near that, the out-of-memory retry.
        None => Ok((caps, Some(budget))),
    }
}

/// A warning when the CUDA memory pool's peak reserve and the context took more than the budget:
/// the fit leaves room for the pool's fragmentation, which varies from run to run (on the 9B
/// benchmark under `--gpu-memory 21.67GB`, 0.4–1.0 GB past the memory in use; two runs in
/// seventeen went 25 MiB over).
fn over_budget(budget: u64, pool_reserved: u64) -> Option<Finding> {
    let took = pool_reserved + CUDA_CONTEXT;
    (took > budget).then(|| {
        Finding::warning(
            "gpu_memory_over_budget",
            format!(
                "the run took ~{:.2} GB of GPU memory (the CUDA memory pool's peak {:.2} GB and ~{:.2} GB of CUDA context) \
                 against a budget of {:.2} GB (--gpu-memory, the suite's gpu_memory, or 95% of the card): the pool's \
                 fragmentation varies from run to run; where the budget is a hard limit, leave a few hundred MB more",
                took as f64 / 1e9,
                pool_reserved as f64 / 1e9,
                CUDA_CONTEXT as f64 / 1e9,
                budget as f64 / 1e9
            ),
        )
        .with_evidence(json!({ "budget_bytes": budget, "pool_peak_reserved_bytes": pool_reserved, "cuda_context_bytes": CUDA_CONTEXT }))
    })
}

/// A spinner on stderr naming the stage running (indicatif); nothing when off.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(on: bool) -> Self {
        Progress(on.then(|| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        }))
    }

    fn stage(&self, msg: String) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg);
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_past_its_gpu_memory_budget_is_a_warning() {
        // The fifteenth session's run at 20,691 MiB: the pool's reserve 20.97 GB against 21.67 GB.
        let f = over_budget(21_670_000_000, 20_971_520_000).expect("over the budget");
        assert_eq!((f.code.as_str(), f.severity), ("gpu_memory_over_budget", crate::finding::Severity::Warning));
        assert!(f.message.contains("21.67 GB"), "{}", f.message);
        // Its usual runs: 20.43-20.90 GB of reserve.
        assert!(over_budget(21_670_000_000, 20_904_411_136).is_none());
        assert!(over_budget(21_670_000_000, 20_434_649_088).is_none());
    }
}
