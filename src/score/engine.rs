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
    /// Rows scored together, and rows decoded together.
    pub max_rows: usize,
    /// rows × padded length of one forward pass over whole sequences (scoring, prefill): bounds
    /// the attention scores held at once.
    pub max_tokens: usize,
    /// Positions whose vocabulary-wide logits are held at once (the output projection is
    /// 151,552 wide in GLM-4).
    pub max_logit_rows: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_rows: 64, max_tokens: 16384, max_logit_rows: 4096 }
    }
}

/// Generation settings.
#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    /// Stop a row at the model's end tokens (off only for benchmarks that need fixed lengths).
    pub stop_at_eos: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions { stop_at_eos: true }
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
        crate::stop::check()?;
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
        let mut picked: Vec<f32> = Vec::with_capacity(at.len());
        for (at, tgt) in at.chunks(lim.max_logit_rows.max(1)).zip(tgt.chunks(lim.max_logit_rows.max(1))) {
            let lp = model.log_probs_at(&hidden, at)?;
            let idx = Tensor::from_slice(tgt, (tgt.len(), 1), model.device())?;
            picked.extend(lp.gather(&idx, 1)?.flatten_all()?.to_vec1::<f32>()?);
        }
        for (p, (vi, i)) in picked.into_iter().zip(owner) {
            out[vi][i].push(p);
        }
    }
    Ok(out)
}

/// Greedy generation for every prompt and variant: new token ids (ending with the eos token when
/// one was produced). `max_new[i]` caps item i. Up to `max_rows` rows decode together; their
/// prompts are prefilled in chunks of at most `max_tokens` tokens.
pub fn generate(
    model: &Glm,
    prompts: &[Vec<u32>],
    max_new: &[usize],
    variants: &[Variant],
    lim: BatchLimits,
    gen: GenOptions,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut out = vec![vec![Vec::new(); prompts.len()]; variants.len()];
    let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let eos = &model.cfg.eos_ids;
    let pad_id = model.cfg.pad_id.unwrap_or(0);
    // Decode batches are bounded by rows only: one decode step reads the weights once for all rows.
    let decode_lim = BatchLimits { max_tokens: usize::MAX, ..lim };
    for batch in plan(&lengths, variants.len(), decode_lim) {
        crate::stop::check()?;
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
        let t = ids.dims()[1];
        // Prefill in row chunks that fit the token budget, then stack their caches.
        let chunk = (lim.max_tokens / t.max(1)).clamp(1, rows.len());
        let mut caches = Vec::new();
        let mut last = Vec::new();
        for start in (0..rows.len()).step_by(chunk) {
            let n = chunk.min(rows.len() - start);
            let sel_c = RowSelection::new(sel[start..start + n].to_vec(), model.device(), model.dtype());
            let mut cache = model.new_cache(t + steps);
            let hidden = model.forward(&ids.narrow(0, start, n)?, &pads[start..start + n], &sel_c, Some(&mut cache))?;
            last.push(model.last_logits(&hidden)?.argmax(1)?);
            caches.push(cache);
        }
        let mut cache = if caches.len() == 1 { caches.remove(0) } else { model.concat_caches(caches, t + steps)? };
        let sel = RowSelection::new(sel, model.device(), model.dtype());
        let mut next: Vec<u32> = Tensor::cat(&last, 0)?.to_vec1()?;
        let mut done = vec![false; rows.len()];
        for step in 0..steps {
            for (r, &tok) in next.iter().enumerate() {
                let (vi, i) = which[r];
                if done[r] || step >= max_new[i] {
                    done[r] = true;
                    continue;
                }
                out[vi][i].push(tok);
                if gen.stop_at_eos && eos.contains(&tok) {
                    done[r] = true;
                }
            }
            if done.iter().all(|d| *d) || step + 1 == steps {
                break;
            }
            crate::stop::check()?;
            let input = Tensor::from_vec(next, (rows.len(), 1), model.device())?;
            let hidden = model.forward(&input, &pads, &sel, Some(&mut cache))?;
            next = model.last_logits(&hidden)?.argmax(1)?.to_vec1()?;
        }
    }
    Ok(out)
}
