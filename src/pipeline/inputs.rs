//! What the command line's paths are: an adapter or merged checkpoint, the base, the data files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Options;

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
