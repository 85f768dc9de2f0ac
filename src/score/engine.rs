//! Drives the model over many sequences: teacher-forced log-probs of the target tokens, and
//! greedy generation. Base and adapter rows of the same sample share a batch (unmerged side path).

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::glm::Glm;
use crate::model::lora::RowSelection;
use crate::tokenizer::recipe::IGNORE;

/// A variant is a row selection: `None` = base, `Some(k)` = adapter k attached to the model.
pub type Variant = Option<usize>;

/// Limits for one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_rows: usize,
    /// rows × padded length
    pub max_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_rows: 64, max_tokens: 16384 }
    }
}

/// Groups item indices (sorted by length) into batches of `per_item` rows each.
fn plan(lengths: &[usize], per_item: usize, lim: BatchLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        let rows = (cur.len() + 1) * per_item;
        let longest = cur.iter().map(|&j| lengths[j]).max().unwrap_or(0).max(lengths[i]);
        if !cur.is_empty()
            && (rows > lim.max_rows.max(per_item) || rows * longest > lim.max_tokens.max(longest * per_item))
        {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Left-pads rows into a [B, T] id tensor; returns it with the pad counts.
fn left_pad(rows: &[&[u32]], pad_id: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut pads = Vec::with_capacity(rows.len());
    for r in rows {
        let p = t - r.len();
        pads.push(p);
        ids.extend(std::iter::repeat_n(pad_id, p));
        ids.extend_from_slice(r);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, pads))
}

/// Per variant, per item: log p(label_j | input_<j) for every supervised position j (labels aligned
/// with input_ids, finetune_demo style). Items with no label get an empty list.
pub fn score_targets(
    model: &Glm,
    items: &[(Vec<u32>, Vec<i64>)],
    variants: &[Variant],
    lim: BatchLimits,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let mut out = vec![vec![Vec::new(); items.len()]; variants.len()];
    // Only positions up to the last label matter; nothing after it is fed.
    let used: Vec<usize> =
        items.iter().map(|(_, l)| l.iter().rposition(|&x| x != IGNORE).map(|p| p + 1).unwrap_or(0)).collect();
    let todo: Vec<usize> = (0..items.len()).filter(|&i| used[i] > 1).collect();
    let lengths: Vec<usize> = todo.iter().map(|&i| used[i]).collect();
    let pad_id = model.cfg.pad_id.unwrap_or(0);
    for batch in plan(&lengths, variants.len(), lim) {
        let mut rows: Vec<&[u32]> = Vec::new();
        let mut sel = Vec::new();
        let mut which = Vec::new();
        for &bi in &batch {
            let i = todo[bi];
            for (vi, v) in variants.iter().enumerate() {
                rows.push(&items[i].0[..used[i]]);
                sel.push(*v);
                which.push((vi, i));
            }
        }
        let (ids, pads) = left_pad(&rows, pad_id, model.device())?;
        let t = ids.dims()[1];
        let sel = RowSelection::new(sel, model.device(), model.dtype());
        let hidden = model.forward(&ids, &pads, &sel, None)?;
        // Logits only where a label follows: position j-1 predicts label j.
        let mut at = Vec::new();
        let mut tgt = Vec::new();
        let mut owner = Vec::new();
        for (r, &(vi, i)) in which.iter().enumerate() {
            let labels = &items[i].1;
            for (j, &label) in labels.iter().enumerate().take(used[i]).skip(1) {
                if label != IGNORE {
                    at.push((r * t + pads[r] + j - 1) as u32);
                    tgt.push(label as u32);
                    owner.push((vi, i));
                }
            }
        }
        if at.is_empty() {
            continue;
        }
        let lp = model.log_probs_at(&hidden, &at)?;
        let idx = Tensor::from_vec(tgt, (at.len(), 1), model.device())?;
        let picked: Vec<f32> = lp.gather(&idx, 1)?.flatten_all()?.to_vec1()?;
        for (p, (vi, i)) in picked.into_iter().zip(owner) {
            out[vi][i].push(p);
        }
    }
    Ok(out)
}

/// Greedy generation for every prompt and variant: new token ids (ending with the eos token when
/// one was produced). `max_new[i]` caps item i.
pub fn generate(
    model: &Glm,
    prompts: &[Vec<u32>],
    max_new: &[usize],
    variants: &[Variant],
    lim: BatchLimits,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut out = vec![vec![Vec::new(); prompts.len()]; variants.len()];
    let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let eos = &model.cfg.eos_ids;
    let pad_id = model.cfg.pad_id.unwrap_or(0);
    for batch in plan(&lengths, variants.len(), lim) {
        let mut rows: Vec<&[u32]> = Vec::new();
        let mut sel = Vec::new();
        let mut which = Vec::new();
        for &i in &batch {
            for (vi, v) in variants.iter().enumerate() {
                rows.push(&prompts[i]);
                sel.push(*v);
                which.push((vi, i));
            }
        }
        let steps = batch.iter().map(|&i| max_new[i]).max().unwrap_or(0);
        if steps == 0 {
            continue;
        }
        let (ids, pads) = left_pad(&rows, pad_id, model.device())?;
        let sel = RowSelection::new(sel, model.device(), model.dtype());
        let mut cache = model.new_cache(ids.dims()[1] + steps);
        let mut done = vec![false; rows.len()];
        let mut input = ids;
        for step in 0..steps {
            let hidden = model.forward(&input, &pads, &sel, Some(&mut cache))?;
            let next: Vec<u32> = model.last_logits(&hidden)?.argmax(1)?.to_vec1()?;
            for (r, &tok) in next.iter().enumerate() {
                let (vi, i) = which[r];
                if done[r] || step >= max_new[i] {
                    done[r] = true;
                    continue;
                }
                out[vi][i].push(tok);
                if eos.contains(&tok) {
                    done[r] = true;
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            input = Tensor::from_vec(next, (rows.len(), 1), model.device())?;
        }
    }
    Ok(out)
}
