//! config.json of the three GLM-4 layouts, normalised to one `ModelConfig`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// Which checkpoint layout (tensor names) a model directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// THUDM/glm-4-9b-chat (remote code): `transformer.encoder.layers.N.self_attention.query_key_value`...
    Chatglm,
    /// GlmForCausalLM (glm-4-9b-chat-hf): `model.layers.N.self_attn.q_proj`...
    Glm,
    /// Glm4ForCausalLM (GLM-4-0414): as `Glm` plus post-attention / post-MLP norms.
    Glm4,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Chatglm => "chatglm",
            Layout::Glm => "glm",
            Layout::Glm4 => "glm4",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub layout: Layout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    /// Number of leading dims of each head that RoPE rotates (interleaved pairs).
    pub rotary_dim: usize,
    pub qkv_bias: bool,
    pub tie_word_embeddings: bool,
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    /// The context length (max_position_embeddings, or seq_length for ChatGLM), when given.
    pub max_positions: Option<usize>,
}

impl ModelConfig {
    pub fn q_out(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_out(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}: a model directory needs config.json", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&v).with_context(|| format!("unusable model config {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        if !v.is_object() {
            bail!("expected a JSON object with the model's hyperparameters (hidden_size, num_hidden_layers, ...)");
        }
        let arch = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let layout = if model_type == "chatglm" || arch.starts_with("ChatGLM") {
            Layout::Chatglm
        } else if model_type == "glm4" || arch == "Glm4ForCausalLM" {
            Layout::Glm4
        } else if model_type == "glm" || arch == "GlmForCausalLM" {
            Layout::Glm
        } else {
            bail!(
                "unknown model layout (model_type {model_type:?}, architectures {arch:?}); glm4-verify reads \
                 ChatGLM (glm-4-9b-chat), GlmForCausalLM (glm-4-9b-chat-hf) and Glm4ForCausalLM (GLM-4-0414)"
            );
        };
        let cfg = match layout {
            Layout::Chatglm => {
                let hidden = usize_field(v, "hidden_size")?;
                let heads = usize_field(v, "num_attention_heads")?;
                let head_dim = match opt_usize(v, "kv_channels")? {
                    Some(d) => d,
                    None => split_heads(hidden, heads)?,
                };
                let mqa = opt_bool(v, "multi_query_attention")?.unwrap_or(false);
                let kv = if mqa { usize_field(v, "multi_query_group_num")? } else { heads };
                let rope_ratio = opt_f64(v, "rope_ratio")?.unwrap_or(1.0);
                ModelConfig {
                    layout,
                    vocab_size: usize_field(v, "padded_vocab_size")?,
                    hidden_size: hidden,
                    num_layers: usize_field(v, "num_layers")?,
                    num_heads: heads,
                    num_kv_heads: kv,
                    head_dim,
                    intermediate_size: usize_field(v, "ffn_hidden_size")?,
                    rms_eps: opt_f64(v, "layernorm_epsilon")?.unwrap_or(1e-5),
                    rope_theta: 10000.0 * rope_ratio,
                    rotary_dim: head_dim / 2,
                    qkv_bias: opt_bool(v, "add_qkv_bias")?.unwrap_or(false)
                        || opt_bool(v, "add_bias_linear")?.unwrap_or(false),
                    tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
                    eos_ids: ids_field(v.get("eos_token_id")),
                    pad_id: v.get("pad_token_id").and_then(|p| p.as_u64()).map(|p| p as u32),
                    max_positions: opt_usize(v, "seq_length")?,
                }
            }
            Layout::Glm | Layout::Glm4 => {
                let hidden = usize_field(v, "hidden_size")?;
                let heads = usize_field(v, "num_attention_heads")?;
                let head_dim = match opt_usize(v, "head_dim")? {
                    Some(d) => d,
                    None => split_heads(hidden, heads)?,
                };
                let rope = v.get("rope_parameters").filter(|r| !r.is_null());
                // Top-level keys first (transformers < 5), then rope_parameters.
                let nested = |key: &str| -> Result<Option<f64>> {
                    match opt_f64(v, key)? {
                        Some(x) => Ok(Some(x)),
                        None => rope
                            .map(|r| opt_f64(r, key).context("in \"rope_parameters\""))
                            .transpose()
                            .map(Option::flatten),
                    }
                };
                let theta = nested("rope_theta")?.unwrap_or(10000.0);
                if let Some(kind) = rope.and_then(|r| r.get("rope_type")).and_then(|t| t.as_str()) {
                    if kind != "default" {
                        bail!("rope_type {kind:?} is not supported (only \"default\")");
                    }
                }
                let factor = nested("partial_rotary_factor")?.unwrap_or(0.5);
                ModelConfig {
                    layout,
                    vocab_size: usize_field(v, "vocab_size")?,
                    hidden_size: hidden,
                    num_layers: usize_field(v, "num_hidden_layers")?,
                    num_heads: heads,
                    num_kv_heads: opt_usize(v, "num_key_value_heads")?.unwrap_or(heads),
                    head_dim,
                    intermediate_size: usize_field(v, "intermediate_size")?,
                    rms_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-5),
                    rope_theta: theta,
                    rotary_dim: (head_dim as f64 * factor) as usize,
                    qkv_bias: opt_bool(v, "attention_bias")?.unwrap_or(true),
                    tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
                    eos_ids: ids_field(v.get("eos_token_id")),
                    pad_id: v.get("pad_token_id").and_then(|p| p.as_u64()).map(|p| p as u32),
                    max_positions: opt_usize(v, "max_position_embeddings")?,
                }
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let c = self;
        for (name, val) in [
            ("number of layers", c.num_layers),
            ("hidden size", c.hidden_size),
            ("attention heads", c.num_heads),
            ("key/value heads", c.num_kv_heads),
            ("head dim", c.head_dim),
            ("intermediate size", c.intermediate_size),
            ("vocabulary size", c.vocab_size),
        ] {
            if val == 0 {
                bail!("{name} is 0");
            }
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            bail!("{} attention heads are not a multiple of {} key/value heads", c.num_heads, c.num_kv_heads);
        }
        if c.rotary_dim == 0 || !c.rotary_dim.is_multiple_of(2) || c.rotary_dim > c.head_dim {
            bail!("rotary dim {} does not fit head dim {}", c.rotary_dim, c.head_dim);
        }
        if let Some(p) = c.pad_id.filter(|&p| p as usize >= c.vocab_size) {
            bail!("pad_token_id {p} is outside the vocabulary of {} tokens", c.vocab_size);
        }
        if !(c.rms_eps.is_finite() && c.rms_eps > 0.0 && c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            bail!("norm epsilon {} or rope theta {} is not a positive number", c.rms_eps, c.rope_theta);
        }
        // Guard against absurd sizes from a corrupt config before allocating anything.
        if c.hidden_size > 1 << 20 || c.num_layers > 4096 || c.vocab_size > 1 << 24 || c.intermediate_size > 1 << 22 {
            bail!("sizes are implausible (hidden {}, layers {}, vocab {})", c.hidden_size, c.num_layers, c.vocab_size);
        }
        Ok(())
    }
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("\"{key}\" must be a non-negative integer, found {x}")),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| anyhow!("\"{key}\" must be a number, found {x}")),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| anyhow!("\"{key}\" must be true or false, found {x}")),
    }
}

/// head_dim when the config does not give it: hidden_size split evenly over the heads.
fn split_heads(hidden: usize, heads: usize) -> Result<usize> {
    if heads > 0 && !hidden.is_multiple_of(heads) {
        bail!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and no head_dim is given");
    }
    Ok(hidden.checked_div(heads).unwrap_or(0)) // 0 heads: `validate` says so
}

fn usize_field(v: &Value, key: &str) -> Result<usize> {
    opt_usize(v, key)?.ok_or_else(|| anyhow!("missing \"{key}\""))
}

fn ids_field(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}
