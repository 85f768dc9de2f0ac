//! `glm4-verify demo`: real artefacts to verify, built in a few seconds with no files and no network.
//!
//! A byte-level BPE tokenizer with the GLM-4 special tokens, a tiny GlmForCausalLM pretrained on a
//! built-in corpus, a finetune_demo data set + lora.yaml, and LoRA adapters trained with candle's
//! autograd on finetune_demo's labels: a good one and the classic failures (never trained, trained
//! on truncated labels, saved under the other layout's module names). Layout of `dir`:
//!
//! ```text
//! base/                 config.json, generation_config.json, model.safetensors, tokenizer.json,
//!                       tokenizer_config.json, chat_template.jinja
//! data/train.jsonl      {"messages": [user, assistant]} rows: facts the base does not know
//! lora.yaml             finetune_demo config the good adapter was trained with
//! lora-truncated.yaml   max_input_length so small that most labels are cut
//! adapters/{good,untrained,truncated,wrong-keys}/   adapter_config.json + adapter_model.safetensors
//! ```

mod corpus;
pub mod measure;
mod rng;
mod save;
mod tokenizer;
mod train;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::Message;
use crate::model::{self, ModelConfig};
use crate::tokenizer::recipe::{encode, Recipe};
use crate::tokenizer::GlmTokenizer;
use rng::Rng;
use train::LoraModule;
pub use train::Schedule;

/// What the demo builds and how long it trains.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tokenizer size, the 14 special tokens included (fewer if the corpus has fewer merges).
    pub vocab: usize,
    /// General corpus: 8 sentences and 2 conversations per group.
    pub corpus_groups: usize,
    /// Rows of data/train.jsonl.
    pub facts: usize,
    pub pretrain: Schedule,
    pub lora: Schedule,
    pub rank: usize,
    pub alpha: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            vocab: 768,
            corpus_groups: 200,
            facts: 24,
            pretrain: Schedule { steps: 200, lr: 6e-3, batch: 32 },
            lora: Schedule { steps: 200, lr: 1e-2, batch: 0 },
            rank: 8,
            alpha: 32,
        }
    }
}

/// The files of a built demo. Adapters: (name, directory, the verdict a verifier must reach:
/// pass | no_effect | fail | regressed).
#[derive(Debug, Clone)]
pub struct DemoFiles {
    pub base: PathBuf,
    /// data/train.jsonl
    pub data: PathBuf,
    /// lora.yaml
    pub config: PathBuf,
    /// lora-truncated.yaml
    pub truncated_config: PathBuf,
    pub adapters: Vec<(String, PathBuf, String)>,
    /// One line per stage: what was built, final training loss, seconds.
    pub log: Vec<String>,
}

/// Asks candle for one CPU thread unless the user chose a count (CANDLE_NUM_THREADS or
/// RAYON_NUM_THREADS). With the demo's tiny tensors, candle's pools cost more than they give: its
/// elementwise pool spin-waits at a barrier (a disaster when other processes hold the cores), and
/// without RAYON_NUM_THREADS every matmul re-reads /proc/cpuinfo to count cores. Measured on a loaded
/// 2-core machine: build 46 s with the defaults, 13 s with one thread. Call it before any candle work
/// and before other threads start (it sets environment variables, which candle reads lazily).
pub fn prefer_single_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// Builds the demo into `dir` with the real settings.
pub fn build(dir: &Path, seed: u64) -> Result<DemoFiles> {
    build_with(dir, seed, &Settings::default())
}

pub fn build_with(dir: &Path, seed: u64, s: &Settings) -> Result<DemoFiles> {
    let mut log = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |log: &mut Vec<String>, what: String| {
        log.push(format!("{what} ({:.1} s)", clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    let base = dir.join("base");
    let data_dir = dir.join("data");
    let adapters = dir.join("adapters");
    for d in [&base, &data_dir, &adapters] {
        save::create_dir(d)?;
    }

    // Tokenizer: trained on the general corpus and the questions (answers reuse their words).
    let general = corpus::general(seed, s.corpus_groups);
    let facts = corpus::facts(seed, s.facts);
    let tok_corpus: Vec<String> = general.iter().cloned().chain(facts.iter().map(|f| f.question.clone())).collect();
    let tok = tokenizer::train(&tok_corpus, s.vocab)?;
    tokenizer::save(&tok, &base)?;
    let id = |name: &str| tok.token_to_id(name).ok_or_else(|| anyhow!("the trained tokenizer lost {name}"));
    let eos = [id("<|endoftext|>")?, id("<|user|>")?, id("<|observation|>")?];
    let pad = eos[0];
    let vocab = tok.get_vocab_size(true);
    lap(&mut log, format!("tokenizer: byte-level BPE, {vocab} tokens"));

    // Base model.
    let cfg_json = save::model_config(vocab, &eos, pad);
    save::json_file(&base.join("config.json"), &cfg_json)?;
    save::json_file(&base.join("generation_config.json"), &save::generation_config(&eos, pad))?;
    let cfg = ModelConfig::from_json(&cfg_json)?;
    let params = train::init_base(&cfg, &mut Rng::derive(seed, 2))?;
    let gt = GlmTokenizer::from_dir(&base)?;
    let mut seqs = general.iter().map(|t| gt.encode(t)).collect::<Result<Vec<_>>>()?;
    for (q, a) in corpus::chats(seed, s.corpus_groups) {
        let conv = [message("user", &q), message("assistant", &a)];
        seqs.push(encode(&gt, &conv, &Recipe::default())?.input_ids);
    }
    let loss = train::pretrain(&cfg, &params, &seqs, s.pretrain, &mut Rng::derive(seed, 3))?;
    let tensors: Vec<(String, Tensor)> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save::safetensors(&base.join("model.safetensors"), &tensors)?;
    lap(&mut log, format!("base model: {} steps on {} sequences, loss {loss:.2}", s.pretrain.steps, seqs.len()));

    // Data and configs.
    let data = data_dir.join("train.jsonl");
    let rows: Vec<Vec<Message>> =
        facts.iter().map(|f| vec![message("user", &f.question), message("assistant", &f.answer)]).collect();
    let jsonl: String = rows
        .iter()
        .map(|r| Ok(serde_json::to_string(&serde_json::json!({ "messages": r }))? + "\n"))
        .collect::<Result<_>>()?;
    tokenizer::write(&data, &jsonl)?;
    let full = Recipe { combine: false, max_input_length: Some(64), max_output_length: Some(64) };
    // Cut right after the shortest generation prompt: at most one label ("\n") survives anywhere.
    let mut shortest = usize::MAX;
    for r in &rows {
        shortest = shortest.min(gt.apply_chat_template(&r[..1], true)?.len());
    }
    let cut = Recipe { combine: false, max_input_length: Some(shortest), max_output_length: Some(0) };
    let (l, r, a) = (s.lora, s.rank, s.alpha);
    let batch = if l.batch == 0 { rows.len() } else { l.batch };
    let config = dir.join("lora.yaml");
    let truncated_config = dir.join("lora-truncated.yaml");
    tokenizer::write(&config, &save::lora_yaml(64, 64, l.steps, l.lr, batch, r, a))?;
    tokenizer::write(&truncated_config, &save::lora_yaml(shortest, 0, l.steps, l.lr, batch, r, a))?;
    let encode_all = |recipe: &Recipe| -> Result<Vec<(Vec<u32>, Vec<i64>)>> {
        rows.iter().map(|m| encode(&gt, m, recipe).map(|e| (e.input_ids, e.labels))).collect()
    };
    let (items, cut_items) = (encode_all(&full)?, encode_all(&cut)?);
    let kept = cut_items.iter().filter(|(_, l)| l.iter().any(|&x| x >= 0)).count();
    lap(&mut log, format!("data: {} rows; lora-truncated.yaml leaves labels in {kept} of them", rows.len()));

    // Adapters, trained on the saved base as a user's trainer would load it.
    let mut glm = model::load_dir(&base, DType::F32, &Device::Cpu)?;
    let scale = a as f64 / r as f64;
    let adapter_cfg = save::adapter_config(r, a, &save::TARGET_MODULES, "../../base");
    let good = train::init_lora(&cfg, r, &mut Rng::derive(seed, 4))?;
    save_adapter(&adapters.join("untrained"), &good, &adapter_cfg, |k| k.to_string())?;
    let loss = train::train_lora(&mut glm, &good, scale, &items, l)?;
    save_adapter(&adapters.join("good"), &good, &adapter_cfg, |k| k.to_string())?;
    lap(&mut log, format!("adapters/good: LoRA r={r} alpha={a}, {} steps, loss {loss:.3}", l.steps));

    let truncated = train::init_lora(&cfg, r, &mut Rng::derive(seed, 5))?;
    let loss = train::train_lora(&mut glm, &truncated, scale, &cut_items, l)?;
    save_adapter(&adapters.join("truncated"), &truncated, &adapter_cfg, |k| k.to_string())?;
    lap(&mut log, format!("adapters/truncated: trained on lora-truncated.yaml labels, loss {loss:.3}"));

    let chatglm_modules = ["query", "key", "value", "dense", "dense_h_to_4h", "dense_4h_to_h"];
    let wrong_cfg = save::adapter_config(r, a, &chatglm_modules, "../../base");
    save_adapter(&adapters.join("wrong-keys"), &good, &wrong_cfg, chatglm_name)?;

    // The truncated adapter only learned to put a line break after <|assistant|> (the one label
    // left in a few rows): verified with lora-truncated.yaml it fails on the truncation finding (on
    // the full targets it does worse than the base: regressed).
    let adapters = [("good", "pass"), ("untrained", "no_effect"), ("truncated", "fail"), ("wrong-keys", "no_effect")]
        .iter()
        .map(|(n, v)| (n.to_string(), adapters.join(n), v.to_string()))
        .collect();
    Ok(DemoFiles { base, data, config, truncated_config, adapters, log })
}

fn message(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into(), tools: None }
}

/// Saves `mods` as a PEFT adapter: `base_model.model.<module>.lora_{A,B}.weight`, module names
/// passed through `rename`.
fn save_adapter(
    dir: &Path,
    mods: &[LoraModule],
    cfg: &serde_json::Value,
    rename: impl Fn(&str) -> String,
) -> Result<()> {
    save::create_dir(dir)?;
    let mut tensors = Vec::new();
    for m in mods {
        let key = format!("base_model.model.{}", rename(&m.name));
        tensors.push((format!("{key}.lora_A.weight"), m.a.as_tensor().clone()));
        tensors.push((format!("{key}.lora_B.weight"), m.b.as_tensor().clone()));
    }
    if tensors.is_empty() {
        bail!("no LoRA modules to save");
    }
    save::safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    save::json_file(&dir.join("adapter_config.json"), cfg)
}

/// `model.layers.N.self_attn.q_proj` → `transformer.encoder.layers.N.self_attention.query`: the
/// names glm-4-9b-chat (ChatGLM layout) uses, which a GlmForCausalLM base does not have.
fn chatglm_name(module: &str) -> String {
    const RENAME: [(&str, &str); 7] = [
        ("model.layers.", "transformer.encoder.layers."),
        ("self_attn.q_proj", "self_attention.query"),
        ("self_attn.k_proj", "self_attention.key"),
        ("self_attn.v_proj", "self_attention.value"),
        ("self_attn.o_proj", "self_attention.dense"),
        ("mlp.gate_up_proj", "mlp.dense_h_to_4h"),
        ("mlp.down_proj", "mlp.dense_4h_to_h"),
    ];
    RENAME.iter().fold(module.to_string(), |k, (a, b)| k.replace(a, b))
}
