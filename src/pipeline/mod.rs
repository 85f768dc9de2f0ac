//! `glm4-verify --adapter ...`: load once, check, score, generate, conclude.
//!
//! `inputs`: what the paths on the command line are; `data`: the rows read, checked and encoded;
//! `memory`: batch limits and the GPU memory budget; here: the run itself.

mod data;
mod inputs;
mod memory;

pub use inputs::{checkpoints, data_files, data_paths, resolve_adapter, resolve_base, AdapterInput};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use serde_json::json;

use crate::adapter::{match_to_base, Adapter};
use crate::checks;
use crate::device;
use crate::finding::Finding;
use crate::model;
use crate::model::profile::{mark, section};
use crate::report::{AdapterInfo, BaseInfo, GpuMemory, Report, Timings, SCHEMA_VERSION};
use crate::score::engine::{score_and_generate, GenOptions, Variant};
use crate::score::metrics::{summarize, Measured};
use crate::suite::Suite;
use crate::verdict;

use data::{formatting_masks, read_data, DataRead};
use memory::{fit_memory, limits, over_budget, with_memory_retry};

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
    let fitted = if embedding_on_host {
        "batches fitted to the memory budget, embedding in host memory"
    } else {
        "batch limits set"
    };
    model::profile::mark_memory(fitted, &dev);
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
