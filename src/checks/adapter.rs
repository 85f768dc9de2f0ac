//! Adapter diagnostics from the files and the base weights: never trained, NaN, keys or shapes
//! that do not fit the base, effect size, and whether a bf16 merge would keep the delta.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde_json::json;

use crate::adapter::{base_modules, Adapter, Matched};
use crate::finding::Finding;
use crate::model::config::{Layout, ModelConfig};
use crate::model::glm::Target;
use crate::model::lora::LoraDelta;
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

/// Reads rows of a base linear's (fused) weight for `check_effect`: (layer, target, row indices)
/// → those rows, f32, row after row.
pub type WeightRows<'a> = dyn Fn(usize, Target, &[usize]) -> Result<Vec<f32>> + Sync + 'a;

/// Effect size per module and bf16 merge survival; `adapter_merge_vanishes` when a bf16 merge
/// would leave (almost) the base. Works on the host, on `EFFECT_ROWS` sampled rows of each
/// module's weight read from the checkpoint files, so it needs neither the model nor the device:
/// a run does it on another thread while the device scores.
pub fn check_effect(weight_rows: &WeightRows, matched: &Matched) -> Result<(Vec<ModuleEffect>, Vec<Finding>)> {
    let stats =
        crate::par::map(&matched.deltas, |d| module_stats(weight_rows, d)).into_iter().collect::<Result<Vec<_>>>()?;
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

/// Rows of a module's weight that `check_effect` looks at: at least this many, and enough for
/// `EFFECT_ELEMS` values (all rows of smaller modules). On a 9B model the full ΔW of every module
/// is ~9 G elements, seconds of work for ratios a sample estimates well (128 rows of 4096 values).
const EFFECT_ROWS: usize = 128;
const EFFECT_ELEMS: usize = 1 << 19;

/// `rows` evenly spaced of `len` (all of them when len <= rows).
fn sample_rows(len: usize, rows: usize) -> Vec<usize> {
    let n = rows.min(len);
    (0..n).map(|k| k * len / n).collect()
}

/// ‖W‖², ‖ΔW‖², kept and touched element counts and ‖kept − ΔW‖² of one module, on evenly spaced
/// rows of its weight (see `EFFECT_ROWS`). ΔW = s·B·A in f32, as PEFT's get_delta_weight; what a bf16
/// merge keeps is bf16(W + ΔW) − bf16(W): elements whose delta is under half a bf16 step of the
/// weight vanish, the rest are rounded to whole steps.
fn module_stats(weight_rows: &WeightRows, (layer, target, d): &(usize, Target, LoraDelta)) -> Result<[f64; 5]> {
    let (r, inp) = d.a.dims2()?;
    let a = d.a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // [r, in]
    let b = d.b.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [len, r]
    let rows = sample_rows(b.len(), (EFFECT_ELEMS / inp.max(1)).max(EFFECT_ROWS));
    let at: Vec<usize> = rows.iter().map(|&k| d.out_start + k).collect();
    let w = weight_rows(*layer, *target, &at)?;
    if w.len() != rows.len() * inp {
        anyhow::bail!("layer {layer} {target:?}: {} weight values for {} rows of {inp}", w.len(), rows.len());
    }
    let s = d.scale as f32;
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let mut st = [0f64; 5];
    let mut dw = vec![0f32; inp];
    for (&k, wr) in rows.iter().zip(w.chunks_exact(inp)) {
        let br = b.get(k).filter(|br| br.len() == r).ok_or_else(|| anyhow::anyhow!("lora_B row {k} of {r} values"))?;
        dw.fill(0.0);
        for (bk, ak) in br.iter().zip(a.chunks_exact(inp)) {
            for (x, &y) in dw.iter_mut().zip(ak) {
                *x += bk * y;
            }
        }
        for (&x, &wv) in dw.iter().zip(wr) {
            let dv = x * s;
            let kept = bf16(wv + dv) - bf16(wv);
            st[0] += (wv * wv) as f64;
            st[1] += (dv * dv) as f64;
            st[2] += (kept != 0.0) as u8 as f64;
            st[3] += (dv != 0.0) as u8 as f64;
            st[4] += ((kept - dv) * (kept - dv)) as f64;
        }
    }
    Ok(st)
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

/// Rows of a base linear's (fused) weight for `check_effect`, read from the checkpoint files
/// (only those rows: no model load, a pre-flight or a thread beside the run).
pub fn weight_rows_from_files<'a>(
    w: &'a Weights,
    cfg: &'a ModelConfig,
) -> impl Fn(usize, Target, &[usize]) -> Result<Vec<f32>> + Sync + 'a {
    move |layer, t, rows| {
        let name = |x: &str| match cfg.layout {
            Layout::Chatglm => format!("transformer.encoder.layers.{layer}.{x}.weight"),
            _ => format!("model.layers.{layer}.{x}.weight"),
        };
        match (cfg.layout, t) {
            (Layout::Chatglm, Target::Qkv) => w.rows_f32(&name("self_attention.query_key_value"), rows),
            (Layout::Chatglm, Target::O) => w.rows_f32(&name("self_attention.dense"), rows),
            (Layout::Chatglm, Target::GateUp) => w.rows_f32(&name("mlp.dense_h_to_4h"), rows),
            (Layout::Chatglm, Target::Down) => w.rows_f32(&name("mlp.dense_4h_to_h"), rows),
            (_, Target::Qkv) => {
                // q, k and v are stored apart: row i of the fused weight is in one of them (one
                // read per run of rows in the same part).
                let (q, kv) = (cfg.q_out(), cfg.kv_out());
                let part = |i: usize| {
                    if i < q {
                        ("q", 0)
                    } else if i < q + kv {
                        ("k", q)
                    } else {
                        ("v", q + kv)
                    }
                };
                let mut out = Vec::new();
                for run in rows.chunk_by(|&a, &b| part(a).0 == part(b).0) {
                    let (p, start) = part(run[0]);
                    let local: Vec<usize> = run.iter().map(|&i| i - start).collect();
                    out.extend(w.rows_f32(&name(&format!("self_attn.{p}_proj")), &local)?);
                }
                Ok(out)
            }
            (_, Target::O) => w.rows_f32(&name("self_attn.o_proj"), rows),
            (_, Target::GateUp) => w.rows_f32(&name("mlp.gate_up_proj"), rows),
            (_, Target::Down) => w.rows_f32(&name("mlp.down_proj"), rows),
        }
    }
}
