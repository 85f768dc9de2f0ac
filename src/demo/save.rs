//! Writing the demo's artefacts in the formats transformers, PEFT and finetune_demo use.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::tokenizer::write;

/// Writes f32 tensors as safetensors with `{"format": "pt"}` metadata, which transformers expects.
pub fn safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let data: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Ok((name.clone(), t.dims().to_vec(), data.iter().flat_map(|x| x.to_le_bytes()).collect()))
        })
        .collect::<Result<_>>()?;
    let views = bytes
        .iter()
        .map(|(name, shape, b)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// The tiny model's config.json (transformers' GlmConfig, glm-4-9b-chat-hf layout).
pub fn model_config(vocab: usize, eos: &[u32], pad: u32) -> Value {
    json!({
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "attention_bias": true,
        "attention_dropout": 0.0,
        "bos_token_id": null,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 160,
        "max_position_embeddings": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": vocab,
    })
}

pub fn generation_config(eos: &[u32], pad: u32) -> Value {
    json!({"_from_model_config": true, "eos_token_id": eos, "pad_token_id": pad})
}

pub const TARGET_MODULES: [&str; 6] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"];

/// PEFT's adapter_config.json for a LoRA adapter (the keys PEFT writes that matter when loading).
pub fn adapter_config(r: usize, alpha: usize, target_modules: &[&str], base: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "revision": null,
    })
}

pub fn json_file(path: &Path, v: &Value) -> Result<()> {
    write(path, &(serde_json::to_string_pretty(v)? + "\n"))
}

/// finetune_demo's lora.yaml: data, label lengths, the trainer settings used, and the LoRA config.
pub fn lora_yaml(max_in: usize, max_out: usize, steps: usize, lr: f64, batch: usize, r: usize, alpha: usize) -> String {
    let modules = TARGET_MODULES.map(|m| format!("\"{m}\"")).join(", ");
    format!(
        "data_config:\n  train_file: train.jsonl\n  num_proc: 1\ncombine: false\n\
         max_input_length: {max_in}\nmax_output_length: {max_out}\n\
         training_args:\n  output_dir: ./output\n  max_steps: {steps}\n  learning_rate: {lr}\n  \
         per_device_train_batch_size: {batch}\n  lr_scheduler_type: linear\n  bf16: false\n\
         peft_config:\n  peft_type: LORA\n  task_type: CAUSAL_LM\n  r: {r}\n  lora_alpha: {alpha}\n  \
         lora_dropout: 0.0\n  target_modules: [{modules}]\n"
    )
}

pub fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}
