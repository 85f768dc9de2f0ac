//! The GLM-4 model: config (three layouts), weights (mmap safetensors), forward, LoRA application.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_gemm;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
pub mod glm;
pub mod lora;
pub mod profile;
#[cfg(feature = "cuda")]
mod upload;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

pub use config::{Layout, ModelConfig};
pub use glm::{Glm, Target};

static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &candle_core::Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// How many model directories this process has loaded (compare reports it: the base loads once).
pub fn loads() -> usize {
    LOADS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Rows `idx` ([N] u32) of `src` [R, C] → [N, C]: on CUDA without the host copy (and the wait for
/// the device's queue) that candle's index_select makes at every call.
pub fn gather_rows(src: &candle_core::Tensor, idx: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() && matches!(src.dtype(), DType::BF16 | DType::F16 | DType::F32) {
        return Ok(cuda_ops::gather_rows(&src.contiguous()?, &idx.contiguous()?)?);
    }
    Ok(src.index_select(idx, 0)?)
}

/// Weights still on their way to the device (a streamed load, `load_streamed`).
pub trait Pending: Send + Sync {
    /// Makes the device's later work wait until part `p` of the model has arrived (parts: the
    /// embedding, each layer, the final norm and output layer); the host waits only until that
    /// part's copies are queued.
    fn wait(&self, p: usize) -> Result<()>;
    /// When the last weight arrived (waits for it); None if the copies failed.
    fn finished(&self) -> Option<Instant>;
}

/// Loads a model directory (config.json + safetensors) in `dtype` on `device`.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Glm> {
    load_from(dir, &weights::Weights::open_dir(dir)?, dtype, device)
}

/// As `load_dir`, with the directory's weights already opened.
pub fn load_from(dir: &Path, weights: &weights::Weights, dtype: DType, device: &Device) -> Result<Glm> {
    let m = load_streamed(dir, weights, dtype, device, &HashMap::new())?;
    m.wait_for_weights()?;
    Ok(m)
}

/// As `load_from`, but on CUDA it returns while the weights are still being copied, layer after
/// layer: the model's forward pass makes the device wait for each layer (`Pending`), so the
/// first batch runs alongside the upload. `room[(layer, target)]` columns are left after each
/// row of those linears' weights for the LoRA side path (`lora::side_width`; `Glm::attach` fills
/// them).
pub fn load_streamed(
    dir: &Path,
    weights: &weights::Weights,
    dtype: DType,
    device: &Device,
    room: &HashMap<(usize, Target), usize>,
) -> Result<Glm> {
    LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut cfg = ModelConfig::from_dir(dir)?;
    add_generation_eos(dir, &mut cfg);
    let context = || format!("cannot load the model in {}", dir.display());
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let src = upload::Streamed::new(weights, d);
        let mut m = Glm::load_with_room(cfg, &src, dtype, device, room).with_context(context)?;
        m.set_pending(src.start().with_context(context)?);
        return Ok(m);
    }
    Glm::load_with_room(cfg, weights, dtype, device, room).with_context(context)
}

/// generation_config.json may list more end tokens than config.json (glm-4-9b-chat does).
fn add_generation_eos(dir: &Path, cfg: &mut ModelConfig) {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else { return };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return };
    let ids: Vec<u32> = match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    };
    for id in ids {
        if !cfg.eos_ids.contains(&id) {
            cfg.eos_ids.push(id);
        }
    }
}
