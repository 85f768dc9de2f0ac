//! Device memory of a run's batches, and batch limits that fit a memory budget.
//!
//! Beyond the weights a run holds, at any time: the KV caches kept from scoring passes for
//! decoding (up to `max_cache_tokens` positions, freed after their decode group), and either one
//! scoring pass (its layer's intermediates, plus the residual streams and KV caches of the passes
//! run together with it), the logits of `max_logit_rows` positions, or a decode step. The costs
//! come from the model's shape; the engine's drops keep a pass at ~H + 3·I values per token in
//! its MLP (`Glm::layer`).

use candle_core::DType;

use super::engine::BatchLimits;
use crate::model::ModelConfig;

/// Bytes per unit of each kind of memory a batch takes.
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// One cached position: keys and values of every layer.
    pub cache_position: u64,
    /// One token of the pass running a layer: its residual stream, the MLP's input (with LoRA
    /// columns), the fused gate/up output and the SwiGLU output.
    pub pass_token: u64,
    /// One token of a pass waiting for its turn at a layer (`first_passes` > 1): its residual
    /// stream, its last MLP output and its KV cache.
    pub held_token: u64,
    /// One position's logits (f32).
    pub logit_row: u64,
    pub layers: u64,
}

impl Costs {
    pub fn of(cfg: &ModelConfig, dtype: DType) -> Self {
        let e = dtype.size_in_bytes() as u64;
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        // LoRA columns (the side path's h) and alignment: at most a few hundred per row.
        let room = 256;
        let cache_position = 2 * (cfg.num_layers * cfg.num_kv_heads * cfg.head_dim) as u64 * e;
        Costs {
            cache_position,
            pass_token: (2 * h + 3 * i + 3 * room) * e,
            held_token: 2 * h * e + cache_position,
            logit_row: cfg.vocab_size as u64 * 4,
            layers: cfg.num_layers.max(1) as u64,
        }
    }

    /// With attention the eager way (no flash kernel): a pass also holds its scores, [rows, heads,
    /// T, T] in the model dtype, and a copy while they are scaled and masked: per token, twice
    /// `heads · longest` values for rows of at most `longest` tokens.
    pub fn with_attention_scores(mut self, cfg: &ModelConfig, dtype: DType, longest: usize) -> Self {
        self.pass_token += 2 * (cfg.num_heads * longest * dtype.size_in_bytes()) as u64;
        self
    }

    /// Bytes of one scoring group at its peak: `first` passes of `tokens`, one of them in a
    /// layer; or, after them, their caches and a chunk of logits.
    fn scoring(&self, tokens: u64, first: u64, logit_rows: u64) -> u64 {
        let layer = first * tokens * self.held_token + tokens * self.pass_token;
        let logits = first * tokens * self.cache_position + logit_rows * self.logit_row;
        layer.max(logits)
    }

    /// Bytes of a decode group beyond its caches: a layer's caches copied while the group is
    /// stacked, and each row's step (intermediates, and logits in two precisions).
    fn decoding(&self, cache_tokens: u64, rows: u64) -> u64 {
        cache_tokens * self.cache_position / self.layers + rows * (self.pass_token + 2 * self.logit_row)
    }
}

/// Estimated peak bytes, beyond the weights, of batches within `lim`.
pub fn peak(lim: &BatchLimits, c: &Costs) -> u64 {
    let caches = lim.max_cache_tokens as u64 * c.cache_position;
    let rows = lim.max_rows.min(lim.max_cache_tokens) as u64;
    let scoring = c.scoring(lim.max_tokens as u64, lim.first_passes.max(1) as u64, lim.max_logit_rows as u64);
    caches + scoring.max(c.decoding(lim.max_cache_tokens as u64, rows))
}

/// The largest limits within `cap` whose estimated peak fits in `bytes`: when `cap` does not
/// fit, scoring passes run one at a time, a pass takes at most a third of the bytes (in
/// multiples of 512 tokens), logits a tenth, and the KV caches kept for decoding the rest.
/// None when not even a 512-token pass and 1,024 cached positions fit.
pub fn fit(cap: BatchLimits, c: &Costs, bytes: u64) -> Option<BatchLimits> {
    if peak(&cap, c) <= bytes {
        return Some(cap);
    }
    let mut lim = BatchLimits { first_passes: 1, ..cap };
    if peak(&lim, c) <= bytes {
        return Some(lim);
    }
    const STEP: u64 = 512;
    let tokens = (bytes / 3 / (c.held_token + c.pass_token) / STEP * STEP).min(cap.max_tokens as u64);
    let logit_rows = (bytes / 10 / c.logit_row).clamp(1, cap.max_logit_rows as u64);
    let scoring = c.scoring(tokens, 1, logit_rows);
    let rows = cap.max_rows as u64;
    // Caches and the rest of a scoring pass, or caches, one layer's copy and the decode step.
    let by_scoring = bytes.saturating_sub(scoring) / c.cache_position;
    let by_decoding =
        bytes.saturating_sub(rows * (c.pass_token + 2 * c.logit_row)) * c.layers / (c.cache_position * (c.layers + 1));
    let cache_tokens = by_scoring.min(by_decoding).min(cap.max_cache_tokens as u64);
    if tokens < STEP || cache_tokens < 1024 {
        return None;
    }
    lim.max_tokens = tokens as usize;
    lim.max_logit_rows = logit_rows as usize;
    lim.max_cache_tokens = cache_tokens as usize;
    Some(lim)
}

/// The fewest bytes `fit` fits batches within `cap` in.
pub fn least(cap: BatchLimits, c: &Costs) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64 << 50);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fit(cap, c, mid).is_some() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Parses a memory size: a number with an optional unit (B, KB, MB, GB, TB, or KiB, MiB, GiB,
/// TiB; case-insensitive; GB when none): "20GB", "21.5 GiB", "24000MB", "20".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| format!("{s:?}: expected a size such as 20GB or 21.5GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "gb" | "g" => 1e9,
        "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => return Err(format!("{s:?}: unknown unit {u:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = x * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("{s:?}: expected a positive size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GLM-4-9B's shape.
    fn glm4_9b() -> ModelConfig {
        let v = serde_json::json!({
            "architectures": ["Glm4ForCausalLM"], "vocab_size": 151552, "hidden_size": 4096,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
            "intermediate_size": 13696, "rms_norm_eps": 1.5625e-07, "partial_rotary_factor": 0.5,
            "attention_bias": true, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329
        });
        ModelConfig::from_json(&v).unwrap()
    }

    fn gpu_default() -> BatchLimits {
        BatchLimits {
            max_rows: 512,
            max_tokens: 12288,
            max_logit_rows: 1024,
            max_cache_tokens: 1 << 18,
            first_passes: 3,
        }
    }

    #[test]
    fn costs_of_glm4_9b() {
        let c = Costs::of(&glm4_9b(), DType::BF16);
        // 40 layers × (k + v) × 2 heads × 128 × 2 bytes.
        assert_eq!(c.cache_position, 40_960);
        // The default GPU limits: 10.7 GB of caches plus ~3 GB for the first three passes.
        let p = peak(&gpu_default(), &c) as f64 / 1e9;
        assert!((13.0..16.0).contains(&p), "{p} GB");
    }

    #[test]
    fn fit_keeps_limits_that_fit_and_shrinks_the_rest_within_the_budget() {
        let c = Costs::of(&glm4_9b(), DType::BF16);
        let cap = gpu_default();
        // An H200's room: the defaults as they are.
        let big = fit(cap, &c, 100_000_000_000).unwrap();
        assert_eq!((big.max_tokens, big.max_cache_tokens, big.first_passes), (12288, 1 << 18, 3));
        // Budgets from 1.5 to 12 GB: within them, and the smaller the budget the smaller the limits.
        let mut last: Option<BatchLimits> = None;
        for gb in [12.0, 8.0, 4.0, 3.0, 2.0, 1.5] {
            let bytes = (gb * 1e9) as u64;
            let lim = fit(cap, &c, bytes).unwrap();
            assert!(peak(&lim, &c) <= bytes, "{gb} GB: {lim} needs {}", peak(&lim, &c));
            assert!(lim.max_tokens.is_multiple_of(512) && lim.max_tokens <= cap.max_tokens);
            if let Some(l) = last {
                assert!(lim.max_cache_tokens <= l.max_cache_tokens && lim.max_tokens <= l.max_tokens, "{gb} GB");
            }
            last = Some(lim);
        }
        // 2 GB (a 24 GB card after 18.8 GB of weights and the CUDA context): ~30k cached positions.
        let lim = fit(cap, &c, 2_000_000_000).unwrap();
        assert!((20_000..40_000).contains(&lim.max_cache_tokens), "{lim}");
        assert_eq!(lim.first_passes, 1);
        // Too little for a pass and a few rows' caches.
        assert!(fit(cap, &c, 100_000_000).is_none());
        let least = least(cap, &c);
        assert!(fit(cap, &c, least).is_some() && fit(cap, &c, least - 1).is_none());
        assert!((200_000_000..1_000_000_000).contains(&least), "{least}");
    }

    #[test]
    fn eager_attention_scores_shrink_the_passes() {
        let cfg = glm4_9b();
        let flash = Costs::of(&cfg, DType::BF16);
        let eager = flash.with_attention_scores(&cfg, DType::BF16, 1000);
        // 2 · 32 heads · 1000 keys · 2 bytes per token on top.
        assert_eq!(eager.pass_token - flash.pass_token, 128_000);
        let bytes = 4_000_000_000;
        let (a, b) = (fit(gpu_default(), &flash, bytes).unwrap(), fit(gpu_default(), &eager, bytes).unwrap());
        assert!(b.max_tokens < a.max_tokens, "{a} / {b}");
        assert!(peak(&b, &eager) <= bytes);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("20GB"), Ok(20_000_000_000));
        assert_eq!(parse_size("20"), Ok(20_000_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("24000mb"), Ok(24_000_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("20 bananas").is_err());
        assert!(parse_size("0").is_err());
    }
}
