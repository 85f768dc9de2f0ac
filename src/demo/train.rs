//! Training with candle's autograd: the base model with all weights as `Var`s, then LoRA adapters
//! (only A and B are `Var`s) through the model's unmerged side path.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::rng::Rng;
use crate::adapter::{base_modules, ModuleSlot};
use crate::model::config::ModelConfig;
use crate::model::glm::{Glm, Target};
use crate::model::lora::{LoraDelta, RowSelection};
use crate::tokenizer::recipe::IGNORE;

/// A Var of `shape` filled by `f`.
fn var_from(shape: &[usize], mut f: impl FnMut() -> f32) -> Result<Var> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| f()).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)?)
}

/// The base weights under their Hugging Face names, initialised as transformers does for GLM:
/// linears and embeddings N(0, 0.02²), biases 0, RMSNorm weights 1.
pub fn init_base(cfg: &ModelConfig, rng: &mut Rng) -> Result<Vec<(String, Var)>> {
    let (v, h, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.q_out(), cfg.kv_out());
    let mut out = Vec::new();
    let mut normal = |name: String, shape: &[usize]| -> Result<()> {
        out.push((name, var_from(shape, || (0.02 * rng.normal()) as f32)?));
        Ok(())
    };
    normal("model.embed_tokens.weight".into(), &[v, h])?;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}.");
        normal(format!("{p}self_attn.q_proj.weight"), &[q, h])?;
        normal(format!("{p}self_attn.k_proj.weight"), &[kv, h])?;
        normal(format!("{p}self_attn.v_proj.weight"), &[kv, h])?;
        normal(format!("{p}self_attn.o_proj.weight"), &[h, q])?;
        normal(format!("{p}mlp.gate_up_proj.weight"), &[2 * f, h])?;
        normal(format!("{p}mlp.down_proj.weight"), &[h, f])?;
    }
    normal("lm_head.weight".into(), &[v, h])?;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}.");
        for (x, n) in [("q", q), ("k", kv), ("v", kv)] {
            out.push((format!("{p}self_attn.{x}_proj.bias"), var_from(&[n], || 0.0)?));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("{p}{norm}.weight"), var_from(&[h], || 1.0)?));
        }
    }
    out.push(("model.norm.weight".into(), var_from(&[h], || 1.0)?));
    Ok(out)
}

/// A left-padded batch and the positions whose next token is supervised.
pub struct Batch {
    /// [B, T] u32
    ids: Tensor,
    pads: Vec<usize>,
    /// Flat indices b·T + t of the positions that predict a label.
    at: Vec<u32>,
    /// [N] u32, the label each position of `at` predicts.
    targets: Tensor,
}

impl Batch {
    /// Rows of (input_ids, labels aligned with them, IGNORE where not trained), finetune_demo style:
    /// position j-1 predicts label j. None when no row has a label.
    pub fn new(rows: &[(&[u32], &[i64])], pad_id: u32) -> Result<Option<Self>> {
        // Nothing after a row's last label is needed.
        let used: Vec<usize> =
            rows.iter().map(|(_, l)| l.iter().rposition(|&x| x != IGNORE).map_or(0, |p| p + 1)).collect();
        let t = used.iter().copied().max().unwrap_or(0);
        let (mut ids, mut pads, mut at, mut targets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, ((x, labels), &n)) in rows.iter().zip(&used).enumerate() {
            let pad = t - n;
            pads.push(pad);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(&x[..n]);
            for j in 1..n {
                if labels[j] != IGNORE {
                    at.push((r * t + pad + j - 1) as u32);
                    targets.push(labels[j] as u32);
                }
            }
        }
        if at.is_empty() {
            return Ok(None);
        }
        let n = targets.len();
        Ok(Some(Batch {
            ids: Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu)?,
            pads,
            at,
            targets: Tensor::from_vec(targets, n, &Device::Cpu)?,
        }))
    }

    /// Mean cross-entropy over the supervised positions; every row uses adapter `adapter`.
    pub fn loss(&self, glm: &Glm, adapter: Option<usize>) -> Result<Tensor> {
        let sel = RowSelection::new(vec![adapter; self.pads.len()], glm.device(), glm.dtype());
        let hidden = glm.forward(&self.ids, &self.pads, &sel, None)?; // [B, T, H]
        let logits = glm.logits_at(&hidden, &self.at)?; // [N, V]
        Ok(candle_nn::loss::cross_entropy(&logits, &self.targets)?)
    }
}

/// Optimiser settings of one training run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub steps: usize,
    pub lr: f64,
    /// Rows per step (sequences drawn in shuffled order); 0 = all rows every step.
    pub batch: usize,
}

impl Schedule {
    /// Linear decay to a tenth: a steadier end for short runs.
    fn lr_at(&self, step: usize) -> f64 {
        self.lr * (1.0 - 0.9 * step as f64 / self.steps.max(1) as f64)
    }
}

fn adamw(vars: Vec<Var>, lr: f64) -> Result<AdamW> {
    Ok(AdamW::new(vars, ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?)
}

/// Pretrains all base weights on plain sequences (next-token loss on every token). Returns the
/// mean loss of the last tenth of the steps.
pub fn pretrain(
    cfg: &ModelConfig,
    params: &[(String, Var)],
    seqs: &[Vec<u32>],
    s: Schedule,
    rng: &mut Rng,
) -> Result<f32> {
    let pad_id = cfg.pad_id.unwrap_or(0);
    let labels: Vec<Vec<i64>> = seqs.iter().map(|x| x.iter().map(|&t| t as i64).collect()).collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    let mut opt = adamw(params.iter().map(|(_, v)| v.clone()).collect(), s.lr)?;
    let per = if s.batch == 0 { seqs.len() } else { s.batch.min(seqs.len()) };
    let mut cursor = order.len();
    let mut tail = Vec::new();
    for step in 0..s.steps {
        if cursor + per > order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let rows: Vec<(&[u32], &[i64])> =
            order[cursor..cursor + per].iter().map(|&i| (seqs[i].as_slice(), labels[i].as_slice())).collect();
        cursor += per;
        let Some(batch) = Batch::new(&rows, pad_id)? else { continue };
        // The model is rebuilt every step: loading concatenates q/k/v into a fused weight, a copy
        // that would not see the optimiser's in-place updates of the Vars.
        let map: HashMap<String, Tensor> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let mut glm = Glm::load(cfg.clone(), &map, DType::F32, &Device::Cpu)?;
        glm.differentiable = true;
        let loss = batch.loss(&glm, None)?;
        opt.set_learning_rate(s.lr_at(step));
        opt.backward_step(&loss)?;
        if step + s.steps.div_ceil(10) >= s.steps {
            tail.push(loss.to_scalar::<f32>()?);
        }
    }
    Ok(tail.iter().sum::<f32>() / tail.len().max(1) as f32)
}

/// The LoRA pair of one base module (Hugging Face name), as PEFT initialises it.
pub struct LoraModule {
    pub name: String,
    pub slot: ModuleSlot,
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
}

/// PEFT's init for every LoRA-able module: A ~ U(±1/√in) (kaiming_uniform with a = √5), B = 0.
pub fn init_lora(cfg: &ModelConfig, r: usize, rng: &mut Rng) -> Result<Vec<LoraModule>> {
    let mut out = Vec::new();
    for (name, slot) in base_modules(cfg) {
        let bound = 1.0 / (slot.in_len as f64).sqrt();
        let a = var_from(&[r, slot.in_len], || ((2.0 * rng.uniform() - 1.0) * bound) as f32)?;
        let b = var_from(&[slot.out_len, r], || 0.0)?;
        out.push(LoraModule { name, slot, a, b });
    }
    Ok(out)
}

/// The modules as deltas for `Glm::attach`, sharing the Vars' storage (gradients flow to them).
pub fn deltas(mods: &[LoraModule], scale: f64) -> Vec<(usize, Target, LoraDelta)> {
    mods.iter()
        .map(|m| {
            let d = LoraDelta {
                out_start: m.slot.out_start,
                a: m.a.as_tensor().clone(),
                b: m.b.as_tensor().clone(),
                scale,
            };
            (m.slot.layer, m.slot.target, d)
        })
        .collect()
}

/// Trains A and B of `mods` on (input_ids, labels) rows, the base frozen; full batch every step.
/// Returns the last step's loss; `glm` is left without adapters.
pub fn train_lora(
    glm: &mut Glm,
    mods: &[LoraModule],
    scale: f64,
    rows: &[(Vec<u32>, Vec<i64>)],
    s: Schedule,
) -> Result<f32> {
    let pad_id = glm.cfg.pad_id.unwrap_or(0);
    // Rows without a label (cut away by truncation) would only pad the batch.
    let refs: Vec<(&[u32], &[i64])> = rows
        .iter()
        .filter(|(_, l)| l.iter().any(|&x| x != IGNORE))
        .map(|(x, l)| (x.as_slice(), l.as_slice()))
        .collect();
    let Some(batch) = Batch::new(&refs, pad_id)? else {
        bail!("no row has a supervised token: nothing to train on");
    };
    let vars = mods.iter().flat_map(|m| [m.a.clone(), m.b.clone()]).collect();
    let mut opt = adamw(vars, s.lr)?;
    let was = glm.differentiable;
    glm.differentiable = true;
    let mut last = f32::NAN;
    for step in 0..s.steps {
        // attach() folds the scale into A and stacks the deltas: a new graph from the Vars each step.
        glm.attach(&[deltas(mods, scale)])?;
        let loss = batch.loss(glm, Some(0))?;
        opt.set_learning_rate(s.lr_at(step));
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()?;
    }
    glm.differentiable = was;
    glm.attach(&[])?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    fn tiny() -> ModelConfig {
        let v = crate::demo::save::model_config(40, &[0, 1, 2], 0);
        ModelConfig::from_json(&v).expect("config")
    }

    /// The loss reaches every A and B through `Glm::attach` (HostStack::build scales, zero-pads and
    /// concatenates them: all differentiable ops, and a same-dtype `to_dtype` keeps the graph).
    #[test]
    fn gradients_reach_every_lora_var() {
        let cfg = tiny();
        let params = init_base(&cfg, &mut Rng::derive(1, 1)).unwrap();
        // A frozen base, as loaded from disk: plain tensors, not Vars.
        let map: HashMap<String, Tensor> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        let mut glm = Glm::load(cfg.clone(), &map, DType::F32, &Device::Cpu).unwrap();
        glm.differentiable = true;
        let mods = init_lora(&cfg, 4, &mut Rng::derive(1, 2)).unwrap();
        let ids: Vec<u32> = (3..15).collect();
        let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let batch = Batch::new(&[(&ids, &labels)], 0).unwrap().unwrap();
        let norm = |g: Option<&Tensor>| g.map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
        // B = 0: only B gets a gradient at first (dL/dA = Bᵀ·…).
        glm.attach(&[deltas(&mods, 2.0)]).unwrap();
        let grads = batch.loss(&glm, Some(0)).unwrap().backward().unwrap();
        for m in &mods {
            assert!(norm(grads.get(m.b.as_tensor())).unwrap() > 0.0, "{}: no gradient for B", m.name);
            assert_eq!(norm(grads.get(m.a.as_tensor())), Some(0.0), "{}", m.name);
        }
        // Base weights are plain tensors: no gradient.
        assert!(grads.get(&map["model.embed_tokens.weight"]).is_none());
        // After one step B is non-zero and A gets a gradient too.
        train_lora(&mut glm, &mods, 2.0, &[(ids.clone(), labels.clone())], Schedule { steps: 1, lr: 1e-2, batch: 0 })
            .unwrap();
        glm.differentiable = true;
        glm.attach(&[deltas(&mods, 2.0)]).unwrap();
        let grads = batch.loss(&glm, Some(0)).unwrap().backward().unwrap();
        for m in &mods {
            assert!(norm(grads.get(m.a.as_tensor())).unwrap() > 0.0, "{}: no gradient for A", m.name);
        }
    }

    /// Pretraining lowers the loss (gradients reach the base Vars through the fused q/k/v concat).
    #[test]
    fn pretraining_learns() {
        let cfg = tiny();
        let params = init_base(&cfg, &mut Rng::derive(2, 1)).unwrap();
        let seqs: Vec<Vec<u32>> = (0..8).map(|i| (0..10).map(|j| 3 + ((i + j) % 5) as u32).collect()).collect();
        let first =
            pretrain(&cfg, &params, &seqs, Schedule { steps: 1, lr: 0.0, batch: 8 }, &mut Rng::derive(0, 0)).unwrap();
        let last =
            pretrain(&cfg, &params, &seqs, Schedule { steps: 60, lr: 1e-2, batch: 8 }, &mut Rng::derive(0, 0)).unwrap();
        assert!(last < first * 0.5, "loss {first} -> {last}");
    }
}
