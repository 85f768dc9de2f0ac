//! Adapter diagnostics from the files and the base weights: never trained, NaN, keys or shapes
//! that do not fit the base, effect size, and whether a bf16 merge would keep the delta.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde_json::json;

use crate::adapter::{base_modules, Adapter, Matched};
use crate::finding::Finding;
use crate::model::config::{Layout, ModelConfig};
use crate::model::glm::{Glm, Target};
use crate::model::weights::Weights;

/// Per matched module: ‖s·B·A‖ / ‖W‖ and the share of ΔW elements that survive a bf16 merge.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleEffect {
    pub module: String,
    pub relative_norm: f64,
    pub bf16_survival: f64,
}

/// Checks that need only the adapter files (and the base's config for names).
pub fn check_files(adapter: &Adapter, matched: &Matched, base: &ModelConfig) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    let nb = adapter.pairs.len();
    // lora_B all zero: PEFT initialises B = 0, so an adapter that never trained has no effect.
    let mut zero = Vec::new();
    let mut nonfinite = Vec::new();
    for p in &adapter.pairs {
        let (a_finite, _) = scan(&p.a)?;
        let (b_finite, b_zero) = scan(&p.b)?;
        if b_zero {
            zero.push(p.key_b.clone());
        }
        for (k, finite) in [(&p.key_a, a_finite), (&p.key_b, b_finite)] {
            if !finite {
                nonfinite.push(k.clone());
            }
        }
    }
    if nb > 0 && zero.len() == nb {
        out.push(
            Finding::error(
                "adapter_lora_b_zero",
                format!("every lora_B tensor is zero ({nb} of {nb}): the adapter was never trained (PEFT initialises B to zero), or the trained weights were not saved"),
            )
            .with_evidence(json!({"zero_lora_b": nb, "lora_b": nb})),
        );
    } else if !zero.is_empty() {
        out.push(
            Finding::warning(
                "adapter_lora_b_zero",
                format!("{} of {nb} lora_B tensors are zero: those modules did not train", zero.len()),
            )
            .with_evidence(json!({"zero_lora_b": zero.len(), "lora_b": nb, "tensors": first(&zero, 20)})),
        );
    }
    if !nonfinite.is_empty() {
        out.push(
            Finding::error(
                "adapter_nonfinite",
                format!(
                    "{} adapter tensors contain NaN or Inf (first: {}); training diverged (fp16 overflow?) — use an earlier checkpoint or train in bf16/fp32",
                    nonfinite.len(),
                    nonfinite[0]
                ),
            )
            .with_evidence(json!({"tensors": first(&nonfinite, 20), "count": nonfinite.len()})),
        );
    }
    if !adapter.unpaired.is_empty() {
        out.push(
            Finding::error(
                "adapter_shape_mismatch",
                format!(
                    "{} LoRA tensors have no partner (lora_A without lora_B or the reverse), e.g. {}",
                    adapter.unpaired.len(),
                    adapter.unpaired[0]
                ),
            )
            .with_evidence(json!({"tensors": first(&adapter.unpaired, 20)})),
        );
    }
    let non_default: Vec<&String> = adapter.adapter_names.iter().filter(|n| n.as_str() != "default").collect();
    if !matched.unmatched_modules.is_empty() {
        let n = matched.unmatched_modules.len();
        let reason = unmatched_reason(&matched.unmatched_modules, base, &non_default);
        let severity_all = matched.matched_modules.is_empty();
        let msg = format!(
            "{} of {} adapter modules ({} tensors) match a module of the base: {reason}",
            matched.matched_modules.len(),
            nb,
            2 * n,
        );
        let f = if severity_all {
            Finding::error("adapter_keys_unmatched", msg)
        } else {
            Finding::warning("adapter_keys_unmatched", msg)
        };
        out.push(f.with_evidence(json!({
            "matched_modules": matched.matched_modules.len(),
            "unmatched_modules": n,
            "unmatched_tensors": 2 * n,
            "examples": first(&matched.unmatched_modules, 5),
            "base_layout": base.layout.as_str(),
            "reason": reason,
        })));
    }
    if !non_default.is_empty() {
        out.push(Finding::warning(
            "adapter_keys_unmatched",
            format!(
                "the keys carry adapter name {:?} instead of \"default\": PEFT's from_pretrained loads them under \"default\" only when saved by save_pretrained; glm4-verify reads them anyway",
                non_default[0]
            ),
        ).with_evidence(json!({"adapter_names": non_default})));
    }
    if !matched.shape_mismatch.is_empty() {
        let (m, why) = &matched.shape_mismatch[0];
        out.push(
            Finding::error(
                "adapter_shape_mismatch",
                format!("{} adapter modules do not fit the base; {m}: {why}. Was the adapter trained on another model size?", matched.shape_mismatch.len()),
            )
            .with_evidence(json!({"modules": matched.shape_mismatch.iter().take(20).map(|(m, w)| json!({"module": m, "problem": w})).collect::<Vec<_>>()})),
        );
    }
    // Target modules the config lists but the file lacks.
    let listed: Vec<&String> = adapter.config.target_modules.iter().collect();
    let missing: Vec<&&String> = listed
        .iter()
        .filter(|t| !adapter.pairs.iter().any(|p| p.module == ***t || p.module.ends_with(&format!(".{t}"))))
        .collect();
    if !missing.is_empty() && !adapter.pairs.is_empty() {
        out.push(
            Finding::warning(
                "adapter_keys_unmatched",
                format!("adapter_config.json targets {missing:?} but the weights file has no LoRA tensors for them"),
            )
            .with_evidence(json!({"missing_targets": missing})),
        );
    }
    if !adapter.other_keys.is_empty() {
        out.push(
            Finding::warning(
                "adapter_extra_tensors",
                format!(
                    "{} tensors are not LoRA weights (e.g. {}); modules_to_save / embedding updates are not applied by glm4-verify",
                    adapter.other_keys.len(),
                    adapter.other_keys[0]
                ),
            )
            .with_evidence(json!({"tensors": first(&adapter.other_keys, 20)})),
        );
    }
    Ok(out)
}

/// The likely reason adapter module names do not match the base.
fn unmatched_reason(unmatched: &[String], base: &ModelConfig, non_default: &[&String]) -> String {
    let chatglm_names = ["query_key_value", "dense_h_to_4h", "dense_4h_to_h", "self_attention"];
    let hf_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "self_attn"];
    let has = |names: &[&str]| unmatched.iter().any(|m| names.iter().any(|n| m.contains(n)));
    let base_desc = match base.layout {
        Layout::Chatglm => "the base uses ChatGLM names (glm-4-9b-chat: query_key_value, dense_h_to_4h)",
        Layout::Glm => "the base is GlmForCausalLM (glm-4-9b-chat-hf: q_proj/k_proj/v_proj, gate_up_proj)",
        Layout::Glm4 => "the base is Glm4ForCausalLM (GLM-4-0414: q_proj/k_proj/v_proj, gate_up_proj)",
    };
    if base.layout != Layout::Chatglm && has(&chatglm_names) {
        return format!("the adapter uses ChatGLM names (e.g. {}), {base_desc}; use the adapter with the base it was trained on (glm-4-9b-chat), or retrain on this one", unmatched[0]);
    }
    if base.layout == Layout::Chatglm && has(&hf_names) {
        return format!(
            "the adapter uses -hf names (e.g. {}), {base_desc}; use the -hf base the adapter was trained on",
            unmatched[0]
        );
    }
    if unmatched.iter().any(|m| m.starts_with("model.model.") || m.starts_with("base_model.")) {
        return format!("a doubled model prefix (e.g. {}): the adapter was saved from a wrapped model", unmatched[0]);
    }
    if let Some(n) = non_default.first() {
        return format!("keys carry adapter name {n:?} and do not name base modules (e.g. {})", unmatched[0]);
    }
    let layer_out = unmatched
        .iter()
        .any(|m| m.split('.').find_map(|p| p.parse::<usize>().ok()).is_some_and(|l| l >= base.num_layers));
    if layer_out {
        return format!(
            "layer indices past the base's {} layers (e.g. {}): the adapter is for a larger model",
            base.num_layers, unmatched[0]
        );
    }
    let example = base_modules(base).keys().next().cloned().unwrap_or_default();
    format!("names like {} are not modules of this base (its modules look like {example})", unmatched[0])
}

/// Effect size per module and bf16 merge survival; `adapter_merge_vanishes` when a bf16 merge
/// would leave (almost) the base.
/// `weight(layer, target)` gives the base's (fused) weight of a linear.
pub fn check_effect(
    weight: &dyn Fn(usize, Target) -> Result<Tensor>,
    matched: &Matched,
) -> Result<(Vec<ModuleEffect>, Vec<Finding>)> {
    // Modules of one shape (sampled rows, in, rank) are computed together, a chunk at a time,
    // and everything is read back once: per module, the ~30 small operations below and their
    // waits for the device cost ~0.3 s on a 9B model's 280 modules.
    let mut groups: std::collections::BTreeMap<(usize, usize, usize), Vec<usize>> = Default::default();
    for (i, (_, _, d)) in matched.deltas.iter().enumerate() {
        let (r, inp) = d.a.dims2()?;
        groups.entry((d.b.dims()[0].min(EFFECT_ROWS), inp, r)).or_default().push(i);
    }
    let mut parts = Vec::new(); // [5, modules of a chunk] each
    let mut order = Vec::new(); // module index of each column
    let mut picks = std::collections::HashMap::new(); // sampled row indices per (weight rows, rows) on the device
    for ((rows, inp, _), members) in groups {
        let Some(&(layer, target, _)) = members.first().map(|&i| &matched.deltas[i]) else { continue };
        let dev = weight(layer, target)?.device().clone();
        // One upload of the group's factors: a copy from pageable host memory waits for everything
        // queued on the device before it, so per-module copies would serialise host and device.
        let (a, b, scale) = group_factors(matched, &members, rows, &dev)?;
        let per = (EFFECT_CHUNK_BYTES / (rows * inp * 4).max(1)).max(1);
        for (c, chunk) in members.chunks(per).enumerate() {
            let (at, n) = (c * per, chunk.len());
            let factors = (a.narrow(0, at, n)?, b.narrow(0, at, n)?, scale.narrow(0, at, n)?);
            parts.push(effect_stats(weight, matched, chunk, rows, &mut picks, factors)?);
            order.extend_from_slice(chunk);
        }
    }
    crate::model::profile::mark("effect check: queued");
    let mut stats = vec![[0f64; 5]; matched.deltas.len()];
    if !parts.is_empty() {
        let all = Tensor::cat(&parts, 1)?.to_vec2::<f64>()?;
        crate::model::profile::mark("effect check: read back");
        for (col, &m) in order.iter().enumerate() {
            for (k, row) in all.iter().enumerate() {
                stats[m][k] = row[col];
            }
        }
    }
    let mut effects = Vec::new();
    let (mut changed, mut total, mut err_sq, mut delta_sq) = (0f64, 0f64, 0f64, 0f64);
    for (stats, name) in stats.iter().zip(&matched.matched_modules) {
        let [w_sq, d_sq, ne, nz, e_sq] = *stats;
        if !d_sq.is_finite() {
            continue; // adapter_nonfinite reports it; NaN would make every number below NaN
        }
        let (wn, dn) = (w_sq.sqrt(), d_sq.sqrt());
        err_sq += e_sq;
        delta_sq += d_sq;
        changed += ne;
        total += nz;
        effects.push(ModuleEffect {
            module: name.clone(),
            relative_norm: if wn > 0.0 { dn / wn } else { f64::INFINITY },
            bf16_survival: if nz > 0.0 { ne / nz } else { 0.0 },
        });
    }
    let mut out = Vec::new();
    if total > 0.0 {
        let share = changed / total;
        let median_rel = median(effects.iter().map(|e| e.relative_norm).collect());
        // Relative error of the delta a bf16 merge would keep: ≥ 0.5 means it is mostly rounding.
        let merge_error = if delta_sq > 0.0 { (err_sq / delta_sq).sqrt() } else { 1.0 };
        // Per layer and module: ‖s·B·A‖/‖W‖ and the share of ΔW elements a bf16 merge keeps.
        let ev = json!({"bf16_changed_fraction": share, "bf16_merge_relative_error": merge_error,
                        "median_relative_norm": median_rel, "modules": effects.len(), "per_module": effects});
        if share < 0.01 || merge_error >= 0.5 {
            out.push(
                Finding::error(
                    "adapter_merge_vanishes",
                    format!(
                        "merged into bf16 weights the delta is below bf16 resolution (median ‖ΔW‖/‖W‖ = {median_rel:.1e}, bf16 keeps ~2^-9): only {:.1}% of the touched weights change and what a merge keeps is {:.0}% rounding error; a merged bf16 model would be (almost) the base",
                        share * 100.0,
                        merge_error * 100.0
                    ),
                )
                .with_evidence(ev),
            );
        } else {
            out.push(Finding::info(
                "adapter_effect_size",
                format!(
                    "median ‖s·B·A‖/‖W‖ = {median_rel:.2e}; a bf16 merge changes {:.1}% of the touched weights with {:.1}% error",
                    share * 100.0,
                    merge_error * 100.0
                ),
            ).with_evidence(ev));
        }
    }
    Ok((effects, out))
}

/// Rows of a module's weight that `check_effect` looks at (all of them below this): on a 9B model
/// the full ΔW of every module is ~9 G elements, seconds of work for a ratio a sample estimates well.
const EFFECT_ROWS: usize = 512;
/// Size of one f32 intermediate of the modules computed together (a few are live at once).
const EFFECT_CHUNK_BYTES: usize = 256 << 20;

/// `rows` evenly spaced of `len` (all of them when len <= rows).
fn sample_rows(len: usize, rows: usize) -> Vec<u32> {
    (0..rows.min(len)).map(|k| (k * len / rows.min(len)) as u32).collect()
}

/// The modules' s [G, 1, 1], A [G, r, in] and sampled rows of B [G, rows, r] (f32), on `dev`.
fn group_factors(
    matched: &Matched,
    idx: &[usize],
    rows: usize,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut as_, mut bs, mut scales) = (Vec::new(), Vec::new(), Vec::new());
    for &i in idx {
        let d = &matched.deltas[i].2;
        let b = d.b.to_dtype(DType::F32)?;
        let len = b.dim(0)?;
        let at = sample_rows(len, rows);
        bs.push(if len == rows { b } else { b.index_select(&Tensor::from_vec(at, rows, b.device())?, 0)? });
        as_.push(d.a.to_dtype(DType::F32)?);
        scales.push(d.scale as f32);
    }
    let g = idx.len();
    Ok((
        Tensor::stack(&as_, 0)?.to_device(dev)?,
        Tensor::stack(&bs, 0)?.to_device(dev)?,
        Tensor::from_vec(scales, (g, 1, 1), dev)?,
    ))
}

/// ‖W‖², ‖ΔW‖², kept and touched element counts and ‖kept − ΔW‖² → [5, modules] f64, for modules
/// `idx` of one shape, on `rows` evenly spaced rows each, on the base weights' device (copying
/// them to the host would cost a full model read). `factors`: their s, A and B (`group_factors`).
fn effect_stats(
    weight: &dyn Fn(usize, Target) -> Result<Tensor>,
    matched: &Matched,
    idx: &[usize],
    rows: usize,
    picks: &mut std::collections::HashMap<(usize, usize), Tensor>,
    (a, b, scale): (Tensor, Tensor, Tensor),
) -> Result<Tensor> {
    let mut ws = Vec::new();
    for &i in idx {
        let (layer, target, d) = &matched.deltas[i];
        let len = d.b.dims()[0];
        let w = weight(*layer, *target)?.narrow(0, d.out_start, len)?;
        let w = if len == rows {
            w
        } else {
            let at = match picks.get(&(len, rows)) {
                Some(t) => t.clone(),
                None => {
                    let t = Tensor::from_vec(sample_rows(len, rows), rows, w.device())?;
                    picks.insert((len, rows), t.clone());
                    t
                }
            };
            crate::model::gather_rows(&w, &at)?
        };
        ws.push(w.to_dtype(DType::F32)?);
    }
    let w = Tensor::stack(&ws, 0)?; // [G, rows, in]
                                    // s·B·A in f32, as PEFT's get_delta_weight.
    let dw = b.matmul(&a)?.broadcast_mul(&scale)?;
    // What a bf16 merge keeps: bf16(W + ΔW) − bf16(W) against ΔW. Elements whose delta is under
    // half a bf16 step of the weight vanish; the rest are rounded to whole steps.
    let wb = w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let kept = ((&w + &dw)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)? - wb)?;
    let sums = |t: Tensor| -> Result<Tensor> { Ok(row_sums(&t)?.to_dtype(DType::F64)?.sum(1)?) }; // [G]
    Ok(Tensor::stack(
        &[
            sums(w.sqr()?)?,
            sums(dw.sqr()?)?,
            sums(kept.ne(0f32)?.to_dtype(DType::F32)?)?,
            sums(dw.ne(0f32)?.to_dtype(DType::F32)?)?,
            sums((&kept - &dw)?.sqr()?)?,
        ],
        0,
    )?)
}

/// Per-row sums of a [rows, in] tensor, kept on its device (candle's CUDA sum over a whole tensor
/// runs in one thread block, which takes seconds on a 9B model's weights).
fn row_sums(t: &Tensor) -> Result<Tensor> {
    Ok(t.sum(candle_core::D::Minus1)?)
}

/// (every value finite, every value zero) of an adapter tensor, in one pass over its values.
fn scan(t: &Tensor) -> Result<(bool, bool)> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter().fold((true, true), |(finite, zero), &x| (finite && x.is_finite(), zero && x == 0.0)))
}

fn first(v: &[String], n: usize) -> Vec<&String> {
    v.iter().take(n).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The base weight of a linear for `check_effect`, from the model in memory.
pub fn weight_from_model(model: &Glm) -> impl Fn(usize, Target) -> Result<Tensor> + '_ {
    move |layer, t| model.target_weight(layer, t)
}

/// The base weight of a linear for `check_effect`, read from the checkpoint files one tensor at a
/// time (no full model load: a fast pre-flight).
pub fn weight_from_files<'a>(w: &'a Weights, cfg: &'a ModelConfig) -> impl Fn(usize, Target) -> Result<Tensor> + 'a {
    move |layer, t| {
        let dev = candle_core::Device::Cpu;
        let ld = |n: String| w.load(&n, DType::F32, &dev);
        Ok(match (cfg.layout, t) {
            (Layout::Chatglm, Target::Qkv) => {
                ld(format!("transformer.encoder.layers.{layer}.self_attention.query_key_value.weight"))?
            }
            (Layout::Chatglm, Target::O) => {
                ld(format!("transformer.encoder.layers.{layer}.self_attention.dense.weight"))?
            }
            (Layout::Chatglm, Target::GateUp) => {
                ld(format!("transformer.encoder.layers.{layer}.mlp.dense_h_to_4h.weight"))?
            }
            (Layout::Chatglm, Target::Down) => {
                ld(format!("transformer.encoder.layers.{layer}.mlp.dense_4h_to_h.weight"))?
            }
            (_, Target::Qkv) => Tensor::cat(
                &["q", "k", "v"]
                    .map(|x| ld(format!("model.layers.{layer}.self_attn.{x}_proj.weight")))
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
            (_, Target::O) => ld(format!("model.layers.{layer}.self_attn.o_proj.weight"))?,
            (_, Target::GateUp) => ld(format!("model.layers.{layer}.mlp.gate_up_proj.weight"))?,
            (_, Target::Down) => ld(format!("model.layers.{layer}.mlp.down_proj.weight"))?,
        })
    }
}
