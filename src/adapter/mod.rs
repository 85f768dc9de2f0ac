//! PEFT LoRA adapters: adapter_config.json, adapter_model.safetensors / .bin, key normalisation
//! and matching against the modules of a base model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use crate::model::config::{Layout, ModelConfig};
use crate::model::glm::Target;
use crate::model::lora::LoraDelta;
use crate::model::weights::Weights;

/// The parts of adapter_config.json that change the arithmetic.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub fan_in_fan_out: bool,
    pub target_modules: Vec<String>,
    /// A regex string instead of a list.
    pub target_regex: Option<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
    pub modules_to_save: Vec<String>,
}

impl AdapterConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&v).with_context(|| format!("unusable adapter config {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let peft_type = v.get("peft_type").and_then(|p| p.as_str()).unwrap_or("LORA");
        if !peft_type.eq_ignore_ascii_case("LORA") {
            bail!("peft_type {peft_type:?} is not supported: glm4-verify verifies LoRA adapters (peft_type \"LORA\")");
        }
        if v.get("use_dora").and_then(|b| b.as_bool()).unwrap_or(false) {
            bail!("use_dora is true: DoRA adapters are not supported yet; merge the adapter with PEFT (merge_and_unload) and pass the merged directory as --adapter");
        }
        if v.get("lora_bias").and_then(|b| b.as_bool()).unwrap_or(false) {
            bail!("lora_bias is true: LoRA bias terms are not supported; merge the adapter with PEFT and pass the merged directory");
        }
        let r = match v.get("r") {
            Some(x) => x.as_u64().ok_or_else(|| anyhow!("\"r\" must be a positive integer, found {x}"))? as usize,
            None => bail!("missing \"r\" (the LoRA rank)"),
        };
        if r == 0 {
            bail!("\"r\" is 0: a LoRA of rank 0 has no weights");
        }
        let lora_alpha = match v.get("lora_alpha") {
            Some(x) => x.as_f64().ok_or_else(|| anyhow!("\"lora_alpha\" must be a number, found {x}"))?,
            None => bail!("missing \"lora_alpha\""),
        };
        let map_usize = |key: &str| -> Result<BTreeMap<String, usize>> {
            let mut out = BTreeMap::new();
            if let Some(obj) = v.get(key).and_then(|o| o.as_object()) {
                for (k, x) in obj {
                    let n = x
                        .as_u64()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| anyhow!("{key}[{k:?}] must be a positive integer"))?;
                    out.insert(k.clone(), n as usize);
                }
            }
            Ok(out)
        };
        let mut alpha_pattern = BTreeMap::new();
        if let Some(obj) = v.get("alpha_pattern").and_then(|o| o.as_object()) {
            for (k, x) in obj {
                alpha_pattern
                    .insert(k.clone(), x.as_f64().ok_or_else(|| anyhow!("alpha_pattern[{k:?}] must be a number"))?);
            }
        }
        let (target_modules, target_regex) = match v.get("target_modules") {
            Some(Value::Array(a)) => (a.iter().filter_map(|x| x.as_str().map(String::from)).collect(), None),
            Some(Value::String(s)) => (vec![], Some(s.clone())),
            _ => (vec![], None),
        };
        let layers_to_transform = match v.get("layers_to_transform") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
            Some(Value::Array(a)) => Some(a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect()),
            _ => None,
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: v.get("use_rslora").and_then(|b| b.as_bool()).unwrap_or(false),
            rank_pattern: map_usize("rank_pattern")?,
            alpha_pattern,
            fan_in_fan_out: v.get("fan_in_fan_out").and_then(|b| b.as_bool()).unwrap_or(false),
            target_modules,
            target_regex,
            layers_to_transform,
            base_model_name_or_path: v.get("base_model_name_or_path").and_then(|b| b.as_str()).map(String::from),
            modules_to_save: v
                .get("modules_to_save")
                .and_then(|m| m.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default(),
        })
    }

    /// PEFT's pattern lookup: the first key (longest first here, to be deterministic) that matches the
    /// end of the module name at a `.` boundary.
    fn pattern<'a, T>(map: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
        keys.into_iter().find(|k| module == k.as_str() || module.ends_with(&format!(".{k}"))).and_then(|k| map.get(k))
    }

    pub fn rank_for(&self, module: &str) -> usize {
        *Self::pattern(&self.rank_pattern, module).unwrap_or(&self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        *Self::pattern(&self.alpha_pattern, module).unwrap_or(&self.lora_alpha)
    }

    /// LoRA scaling: alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let a = self.alpha_for(module);
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }

    pub fn scaling(&self) -> f64 {
        self.scaling_for("")
    }
}

/// One LoRA pair as found in the file, keyed by its normalised module name.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Module name without `base_model.model.` and adapter name, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// [r, in] as stored
    pub a: Tensor,
    /// [out, r] as stored
    pub b: Tensor,
    pub key_a: String,
    pub key_b: String,
}

/// A module of the base that a LoRA pair can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleSlot {
    pub layer: usize,
    pub target: Target,
    /// Rows of the internal fused linear's output this module writes (q/k/v share Qkv).
    pub out_start: usize,
    pub out_len: usize,
    pub in_len: usize,
}

/// All LoRA-able module names of a base, in its own naming, with where they live internally.
pub fn base_modules(cfg: &ModelConfig) -> BTreeMap<String, ModuleSlot> {
    let mut m = BTreeMap::new();
    let (h, q, kv, ffn) = (cfg.hidden_size, cfg.q_out(), cfg.kv_out(), cfg.intermediate_size);
    for i in 0..cfg.num_layers {
        let slot = |target, out_start, out_len, in_len| ModuleSlot { layer: i, target, out_start, out_len, in_len };
        match cfg.layout {
            Layout::Chatglm => {
                let p = format!("transformer.encoder.layers.{i}.");
                m.insert(format!("{p}self_attention.query_key_value"), slot(Target::Qkv, 0, q + 2 * kv, h));
                m.insert(format!("{p}self_attention.dense"), slot(Target::O, 0, h, q));
                m.insert(format!("{p}mlp.dense_h_to_4h"), slot(Target::GateUp, 0, 2 * ffn, h));
                m.insert(format!("{p}mlp.dense_4h_to_h"), slot(Target::Down, 0, h, ffn));
            }
            Layout::Glm | Layout::Glm4 => {
                let p = format!("model.layers.{i}.");
                m.insert(format!("{p}self_attn.q_proj"), slot(Target::Qkv, 0, q, h));
                m.insert(format!("{p}self_attn.k_proj"), slot(Target::Qkv, q, kv, h));
                m.insert(format!("{p}self_attn.v_proj"), slot(Target::Qkv, q + kv, kv, h));
                m.insert(format!("{p}self_attn.o_proj"), slot(Target::O, 0, h, q));
                m.insert(format!("{p}mlp.gate_up_proj"), slot(Target::GateUp, 0, 2 * ffn, h));
                m.insert(format!("{p}mlp.down_proj"), slot(Target::Down, 0, h, ffn));
            }
        }
    }
    m
}

/// An adapter directory read from disk (tensors on CPU in f32).
pub struct Adapter {
    pub dir: PathBuf,
    pub weights_file: PathBuf,
    pub config: AdapterConfig,
    pub pairs: Vec<LoraPair>,
    /// The adapter name found in the keys (`default` when absent).
    pub adapter_names: BTreeSet<String>,
    /// Keys that are neither lora_A nor lora_B weights (modules_to_save, embeddings...).
    pub other_keys: Vec<String>,
    /// lora_A without lora_B or the reverse.
    pub unpaired: Vec<String>,
    /// Number of tensors in the file.
    pub tensors: usize,
    pub file_bytes: u64,
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!(
                "{} has no adapter_config.json: --adapter takes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), \
                 a training output directory with checkpoint-N subdirectories, or a merged model directory",
                dir.display()
            );
        }
        let config = AdapterConfig::read(&cfg_path)?;
        let st = dir.join("adapter_model.safetensors");
        let bin = dir.join("adapter_model.bin");
        let (weights_file, raw) = if st.is_file() {
            (st.clone(), read_safetensors_file(&st)?)
        } else if bin.is_file() {
            let t = candle_core::pickle::read_all(&bin)
                .map_err(|e| anyhow!("cannot read PyTorch file {}: {e}", bin.display()))?;
            (bin.clone(), t)
        } else {
            bail!("{} has no adapter_model.safetensors or adapter_model.bin", dir.display());
        };
        let file_bytes = std::fs::metadata(&weights_file).map(|m| m.len()).unwrap_or(0);
        if raw.is_empty() {
            bail!(
                "{} holds no tensors ({file_bytes} bytes): the adapter was not saved. DeepSpeed ZeRO-3 writes an empty \
                 adapter unless the weights are gathered on save (stage3_gather_16bit_weights_on_model_save: true)",
                weights_file.display()
            );
        }
        let tensors = raw.len();
        let mut a_map = BTreeMap::new();
        let mut b_map = BTreeMap::new();
        let mut adapter_names = BTreeSet::new();
        let mut other_keys = Vec::new();
        for (key, t) in raw {
            match split_lora_key(&key) {
                Some((module, ab, name)) => {
                    adapter_names.insert(name);
                    let t = t.to_dtype(DType::F32)?;
                    if ab == 'A' {
                        a_map.insert(module, (key, t));
                    } else {
                        b_map.insert(module, (key, t));
                    }
                }
                None => other_keys.push(key),
            }
        }
        let mut pairs = Vec::new();
        let mut unpaired = Vec::new();
        for (module, (key_a, a)) in a_map {
            match b_map.remove(&module) {
                Some((key_b, b)) => pairs.push(LoraPair { module, a, b, key_a, key_b }),
                None => unpaired.push(key_a),
            }
        }
        unpaired.extend(b_map.into_values().map(|(k, _)| k));
        Ok(Adapter {
            dir: dir.to_path_buf(),
            weights_file,
            config,
            pairs,
            adapter_names,
            other_keys,
            unpaired,
            tensors,
            file_bytes,
        })
    }
}

fn read_safetensors_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let w = Weights::open(&[path.to_path_buf()])?;
    let mut names: Vec<String> = w.names().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let dt = w.dtype(&n).unwrap_or(DType::F32);
            let t = w.load(&n, dt, &Device::Cpu)?;
            Ok((n, t))
        })
        .collect()
}

/// `base_model.model.X.lora_A.default.weight` → (`X`, 'A', "default"). Also accepts keys without the
/// `base_model.model.` prefix or the adapter name (older PEFT), and a doubled prefix.
pub fn split_lora_key(key: &str) -> Option<(String, char, String)> {
    let key = key.strip_suffix(".weight")?;
    let (pos, ab) =
        [(".lora_A", 'A'), (".lora_B", 'B')].iter().find_map(|(pat, ab)| key.rfind(pat).map(|p| (p, *ab)))?;
    let module = &key[..pos];
    let rest = &key[pos + ".lora_A".len()..];
    let name = rest.strip_prefix('.').unwrap_or("default");
    if name.contains('.') {
        return None;
    }
    let mut module = module;
    while let Some(m) = module.strip_prefix("base_model.model.") {
        module = m;
    }
    Some((module.to_string(), ab, if name.is_empty() { "default".into() } else { name.to_string() }))
}

/// How an adapter's pairs map onto a base.
#[derive(Debug, Clone)]
pub struct Matched {
    /// (layer, target, delta) ready for `Glm::merge` / `Glm::attach`.
    pub deltas: Vec<(usize, Target, LoraDelta)>,
    /// Modules matched (one per pair).
    pub matched_modules: Vec<String>,
    pub unmatched_modules: Vec<String>,
    /// (module, what is wrong)
    pub shape_mismatch: Vec<(String, String)>,
}

/// Matches pairs to base modules by name and checks their shapes.
pub fn match_to_base(adapter: &Adapter, cfg: &ModelConfig) -> Result<Matched> {
    let slots = base_modules(cfg);
    let mut out =
        Matched { deltas: vec![], matched_modules: vec![], unmatched_modules: vec![], shape_mismatch: vec![] };
    for p in &adapter.pairs {
        let Some(slot) = slots.get(&p.module) else {
            out.unmatched_modules.push(p.module.clone());
            continue;
        };
        if let Some(layers) = &adapter.config.layers_to_transform {
            if !layers.contains(&slot.layer) {
                continue;
            }
        }
        let (&[ra, ina], &[outb, rb]) = (p.a.dims(), p.b.dims()) else {
            let (key, dims) = if p.a.rank() != 2 { (&p.key_a, p.a.dims()) } else { (&p.key_b, p.b.dims()) };
            out.shape_mismatch.push((p.module.clone(), format!("{key} has shape {dims:?}; LoRA weights are matrices")));
            continue;
        };
        let r_cfg = adapter.config.rank_for(&p.module);
        let problem = if ra != rb {
            Some(format!("lora_A has rank {ra} but lora_B has rank {rb}"))
        } else if ina != slot.in_len || outb != slot.out_len {
            Some(format!(
                "LoRA gives a [{outb} x {ina}] delta, the base module is [{} x {}]",
                slot.out_len, slot.in_len
            ))
        } else if ra != r_cfg {
            Some(format!("tensors have rank {ra}, adapter_config.json says r = {r_cfg} (rank_pattern?)"))
        } else {
            None
        };
        if let Some(problem) = problem {
            out.shape_mismatch.push((p.module.clone(), problem));
            continue;
        }
        out.matched_modules.push(p.module.clone());
        out.deltas.push((
            slot.layer,
            slot.target,
            LoraDelta {
                out_start: slot.out_start,
                a: p.a.clone(),
                b: p.b.clone(),
                scale: adapter.config.scaling_for(&p.module),
            },
        ));
    }
    Ok(out)
}
