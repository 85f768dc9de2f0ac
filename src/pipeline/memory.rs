//! Batch limits, the GPU memory budget they are fitted to, and the out-of-memory retry.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use serde_json::json;

use crate::device;
use crate::finding::Finding;
use crate::model;
use crate::score::budget;
use crate::score::engine::{is_out_of_memory, BatchLimits};

use super::Options;

/// Runs `f`; when the device runs out of memory, again with every batch limit halved, down to one
/// row at a time (each retry is an info finding in the report). Then a clear error.
pub(super) fn with_memory_retry<T>(
    mut lim: BatchLimits,
    dev: &Device,
    findings: &mut Vec<Finding>,
    mut f: impl FnMut(BatchLimits) -> Result<T>,
) -> Result<T> {
    loop {
        match f(lim) {
            Err(e) if is_out_of_memory(&e) => match lim.halved() {
                Some(smaller) => {
                    device::release_freed_memory(dev);
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
pub(super) fn limits(opts: &Options, dev: &Device, cfg: &model::ModelConfig) -> Result<BatchLimits> {
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
pub(super) const CUDA_CONTEXT: u64 = 750_000_000;

/// On CUDA, `caps` shrunk to the memory budget (`--gpu-memory`, or 95% of the card's), returned
/// with it. The budget comes from the card's size (or the flag), not from the memory free at the
/// start, so that the same inputs on the same card give the same batches (and bits) every run.
/// When the budget shrinks the batches, the input embedding's table moves to host memory first.
/// `longest`: the longest row, for attention's scores where they are held (no flash kernel).
#[cfg_attr(not(feature = "cuda"), allow(unused_mut, unused_variables))]
pub(super) fn fit_memory(
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
        device::release_freed_memory(dev);
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
/// benchmark under `--gpu-memory 21.67GB`, 0.4–1.0 GB past the memory in use and two runs in
/// seventeen 25 MiB over before the pool was trimmed between decode groups; 0.4–0.5 GB since).
pub(super) fn over_budget(budget: u64, pool_reserved: u64) -> Option<Finding> {
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
