//! Drives the model over many sequences: teacher-forced log-probs of the target tokens, and
//! greedy generation. Base and adapter rows of the same sample share a batch (unmerged side path).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::model::glm::{Cache, Glm, PassInput};
use crate::model::lora::RowSelection;
use crate::model::profile;
use crate::tokenizer::recipe::IGNORE;

/// A variant is a row selection: `None` = base, `Some(k)` = adapter k attached to the model.
pub type Variant = Option<usize>;

/// Limits for one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Rows scored together, and rows decoded together.
    pub max_rows: usize,
    /// rows × padded length of one forward pass over whole sequences (scoring, prefill): bounds
    /// the attention scores held at once.
    pub max_tokens: usize,
    /// Positions whose vocabulary-wide logits are held at once (the output projection is
    /// 151,552 wide in GLM-4).
    pub max_logit_rows: usize,
    /// rows × (prompt + new tokens) of the KV caches kept for one decode group: bounds the memory
    /// held between scoring a prompt and generating from it.
    pub max_cache_tokens: usize,
    /// Scoring passes run together, layer by layer, at the start (`Glm::forward_many`): while a
    /// streamed load's weights still arrive, the device then has work for each layer as it lands.
    /// 1: one pass at a time. Changes the order of the work, not its numbers.
    pub first_passes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_rows: 64,
            max_tokens: 16384,
            max_logit_rows: 4096,
            max_cache_tokens: 1 << 16,
            first_passes: 1,
        }
    }
}

impl BatchLimits {
    /// Half of every limit (at least 1): what to retry with after running out of device memory.
    /// `None` when every limit is already at its minimum.
    pub fn halved(self) -> Option<Self> {
        let h = |x: usize| (x / 2).max(1);
        let next = BatchLimits {
            max_rows: h(self.max_rows),
            max_tokens: h(self.max_tokens),
            max_logit_rows: h(self.max_logit_rows),
            max_cache_tokens: h(self.max_cache_tokens),
            first_passes: self.first_passes,
        };
        let same = next.max_rows == self.max_rows
            && next.max_tokens == self.max_tokens
            && next.max_logit_rows == self.max_logit_rows
            && next.max_cache_tokens == self.max_cache_tokens;
        (!same).then_some(next)
    }
}

impl std::fmt::Display for BatchLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows, {} tokens per pass, {} logit rows, {} cached positions",
            self.max_rows, self.max_tokens, self.max_logit_rows, self.max_cache_tokens
        )
    }
}

/// Whether an error is the device running out of memory (worth retrying with smaller batches).
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}");
    m.contains("OUT_OF_MEMORY") || m.contains("out of memory")
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

/// How wide a batch of `(head, tail)` items is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Width {
    /// `max(head + tail)`: a scoring pass, each row its head then its tail, right-aligned
    /// (`lay_out`).
    Total,
    /// `max head + max tail`: a decode group's caches, prompts (heads) right-aligned, then room
    /// for the new tokens (tails).
    HeadTail,
}

impl Width {
    /// The width of items whose longest head, tail and head + tail are `longest` (`Longest::of`).
    fn of(self, longest: Longest) -> usize {
        match self {
            Width::Total => longest.total,
            Width::HeadTail => longest.head + longest.tail,
        }
    }
}

/// The longest head, tail and head + tail of some items.
#[derive(Clone, Copy, Default)]
struct Longest {
    head: usize,
    tail: usize,
    total: usize,
}

impl Longest {
    fn with(self, (h, t): (usize, usize)) -> Self {
        Longest { head: self.head.max(h), tail: self.tail.max(t), total: self.total.max(h + t) }
    }

    fn of(items: impl Iterator<Item = (usize, usize)>) -> Self {
        items.fold(Longest::default(), Longest::with)
    }
}

/// Groups item indices into batches of `per_item` rows each, by length: each batch within the
/// limits, `width` wide. Items are packed in two orders, longest first and longest head first
/// (for `HeadTail` widths, where prompts vary more than the new tokens, rows with close heads pad
/// less), and the plan with fewer laid-out tokens is kept. Batches run widest first: the one that
/// needs the most memory runs first, so an out-of-memory retry wastes little.
fn plan(lengths: &[(usize, usize)], per_item: usize, lim: BatchLimits, width: Width) -> Vec<Vec<usize>> {
    let wide = |b: &Vec<usize>| width.of(Longest::of(b.iter().map(|&i| lengths[i])));
    let laid_out = |p: &Vec<Vec<usize>>| p.iter().map(|b| b.len() * wide(b)).sum::<usize>();
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i].0 + lengths[i].1), i));
    let by_total = pack(lengths, &order, per_item, lim, width);
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i].0), std::cmp::Reverse(lengths[i].1), i));
    let by_head = pack(lengths, &order, per_item, lim, width);
    let mut best = if laid_out(&by_head) < laid_out(&by_total) { by_head } else { by_total };
    best.sort_by_key(|b| std::cmp::Reverse(wide(b)));
    best
}

/// Packs items in `order` into batches within the limits (a new batch when the next item would
/// break one).
fn pack(
    lengths: &[(usize, usize)],
    order: &[usize],
    per_item: usize,
    lim: BatchLimits,
    width: Width,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = Longest::default();
    for &i in order {
        let (h, t) = lengths[i];
        let rows = (cur.len() + 1) * per_item;
        let wide = width.of(longest.with((h, t)));
        if !cur.is_empty()
            && (rows > lim.max_rows.max(per_item) || rows * wide > lim.max_tokens.max((h + t) * per_item))
        {
            out.push(std::mem::take(&mut cur));
            longest = Longest::default();
        }
        cur.push(i);
        longest = longest.with((h, t));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Lays rows out as `[pad… head tail]`, right-aligned (each row's head and tail together, so a
/// batch is as wide as its longest row): returns the [B, W] ids and each row's left padding.
fn lay_out(rows: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let longest = rows.iter().map(|r| r.0.len() + r.1.len()).max().unwrap_or(0);
    // On GPUs the width is padded (on the left) to a multiple of 8: cuBLAS's fast tensor-core
    // kernels need 16-byte aligned rows, and the attention GEMMs have the width as a leading
    // dimension (10× slower at a width of 1010 than at 1016 on an H200).
    let align = if device.is_cuda() { 8 } else { 1 };
    let w = longest.next_multiple_of(align);
    let mut ids = Vec::with_capacity(rows.len() * w);
    let mut pads = Vec::with_capacity(rows.len());
    for (h, t) in rows {
        let p = w - h.len() - t.len();
        pads.push(p);
        ids.extend(std::iter::repeat_n(pad_id, p));
        ids.extend_from_slice(h);
        ids.extend_from_slice(t);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), w), device)?, pads))
}

/// The gather index that keeps each row's prompt from a pass's KV cache, right-aligned at `width`
/// (`Cache::keep_windows`): row r's prompt is at columns pads[r].. of `t`, and goes to columns
/// width - heads[r].. of `width`. Columns before it are padding (masked; read from column 0 where
/// the window starts before the row, so that they hold finite values).
/// Per (row, kv head, column), the flat row index into the cache's [rows·kvh·t, D] layer.
fn prompt_windows(pads: &[usize], heads: &[usize], width: usize, t: usize, kvh: usize) -> Vec<u32> {
    let mut idx = Vec::with_capacity(pads.len() * kvh * width);
    for (r, (&p, &h)) in pads.iter().zip(heads).enumerate() {
        let end = p + h; // one past the prompt's last column
        for head in 0..kvh {
            let base = (r * kvh + head) * t;
            idx.extend((0..width).map(|c| (base + (end + c).saturating_sub(width)) as u32));
        }
    }
    idx
}

/// Per item: positions up to the last label (nothing after it needs to be fed).
fn used_lengths(items: &[(Vec<u32>, Vec<i64>)]) -> Vec<usize> {
    items.iter().map(|(_, l)| l.iter().rposition(|&x| x != IGNORE).map(|p| p + 1).unwrap_or(0)).collect()
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
    let used = used_lengths(items);
    let todo: Vec<usize> = (0..items.len()).filter(|&i| used[i] > 1).collect();
    let lengths: Vec<(usize, usize)> = todo.iter().map(|&i| (0, used[i])).collect();
    for batch in plan(&lengths, variants.len(), lim, Width::Total) {
        let batch: Vec<(usize, usize)> = batch.iter().map(|&b| (todo[b], 0)).collect();
        score_batches(model, items, &used, &[batch], variants, lim, false, &mut out)?;
    }
    Ok(out)
}

/// Tests of the out-of-memory retry run on CPU: GLM4_VERIFY_SIMULATE_OOM_TOKENS=N makes a pass over
/// more than N tokens fail as a CUDA allocation would.
fn simulated_oom(tokens: usize) -> Result<()> {
    let limit = std::env::var("GLM4_VERIFY_SIMULATE_OOM_TOKENS").ok().and_then(|v| v.parse::<usize>().ok());
    if limit.is_some_and(|n| tokens > n) {
        bail!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (simulated for a pass over {tokens} tokens)");
    }
    Ok(())
}

/// Whether scoring passes run the last layer's MLP only where hidden states are read (on by
/// default; GLM4_VERIFY_PRUNE=0 runs it everywhere, for comparisons).
fn prune_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLM4_VERIFY_PRUNE").map_or(true, |v| v != "0"))
}

/// What a scoring batch leaves for generation: its rows' KV caches over their prompts.
struct Pending {
    cache: Cache,
    pads: Vec<usize>,
    sel: Vec<Variant>,
    /// (variant index, item index) per row
    which: Vec<(usize, usize)>,
    /// Each row's first generated token (argmax after the prompt's last token).
    first: Vec<u32>,
}

/// Where a batch's prompts are in its pass's KV cache (rows right-aligned: each prompt ends where
/// its target starts), to keep them, right-aligned at the longest, for generation.
struct Prompts {
    /// Each row's prompt length.
    heads: Vec<usize>,
    /// The longest prompt: the kept cache's length.
    width: usize,
    /// `Cache::keep_windows`'s gather index (on the device).
    window: Tensor,
}

/// A scoring batch laid out, its positions and targets on the device, ready for its forward pass.
struct Prepared {
    ids: Tensor,
    pads: Vec<usize>,
    row_sel: RowSelection,
    sel: Vec<Variant>,
    /// (variant index, item index) per row
    which: Vec<(usize, usize)>,
    /// With kept caches: the pass's cache, and where the prompts are in it.
    kept: Option<(Cache, Prompts)>,
    /// Flat positions whose hidden states the pass returns (all when empty and not pruned).
    wanted: Vec<u32>,
    /// Indices into the returned hidden states: where each target is predicted, the targets, and
    /// each row's prompt end (with `keep`).
    at: Tensor,
    targets: Tensor,
    last: Tensor,
    /// (variant index, item index) per target
    owner: Vec<(usize, usize)>,
}

/// Lays out one batch of `(item, head length)` rows (one row per variant). With `keep`, the rows'
/// heads are the generation prompts and their KV caches are kept.
fn prepare_batch(
    model: &Glm,
    items: &[(Vec<u32>, Vec<i64>)],
    used: &[usize],
    batch: &[(usize, usize)],
    variants: &[Variant],
    keep: bool,
) -> Result<Prepared> {
    crate::stop::check()?;
    let mut rows: Vec<(&[u32], &[u32])> = Vec::new();
    let mut sel = Vec::new();
    let mut which = Vec::new();
    // Variant-major: each adapter's rows are one run, so the LoRA side path runs on those rows
    // only (none for the base rows) and needs no per-row mask.
    for (vi, v) in variants.iter().enumerate() {
        for &(i, head) in batch {
            rows.push(items[i].0[..used[i]].split_at(head));
            sel.push(*v);
            which.push((vi, i));
        }
    }
    let pad_id = model.cfg.pad_id.unwrap_or(0);
    let (ids, pads) = lay_out(&rows, pad_id, model.device())?;
    let t = ids.dims()[1];
    simulated_oom(rows.len() * t)?;
    let row_sel = RowSelection::new(sel.clone(), model.device(), model.dtype());
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
    // With the prompts' caches kept, also the prompt's last position (the first generated token).
    let heads: Vec<usize> = rows.iter().map(|r| r.0.len()).collect();
    let mut last: Vec<u32> =
        if keep { (0..rows.len()).map(|r| (r * t + pads[r] + heads[r] - 1) as u32).collect() } else { vec![] };
    // The last layer's MLP runs only where hidden states are read: positions then index its rows.
    let mut wanted = Vec::new();
    if prune_enabled() {
        wanted = at.iter().chain(&last).copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let slot = |p: &mut u32| -> Result<()> {
            *p = wanted.binary_search(p).map_err(|_| anyhow::anyhow!("internal: position {p} not kept"))? as u32;
            Ok(())
        };
        at.iter_mut().try_for_each(slot)?;
        last.iter_mut().try_for_each(slot)?;
    }
    // One upload of positions, targets and prompt ends, before the pass is queued: a copy from the
    // host waits for the device's queue, so the pass then runs to its one read-back without a gap.
    let (n_at, n_last) = (at.len(), last.len());
    let width = heads.iter().copied().max().unwrap_or(0);
    let window = if keep { prompt_windows(&pads, &heads, width, t, model.cfg.num_kv_heads) } else { vec![] };
    let n_win = window.len();
    let idx = Tensor::from_vec([at, tgt, last, window].concat(), 2 * n_at + n_last + n_win, model.device())?;
    Ok(Prepared {
        ids,
        pads,
        row_sel,
        sel,
        which,
        kept: if keep {
            let window = idx.narrow(0, 2 * n_at + n_last, n_win)?;
            Some((model.new_cache(t), Prompts { heads, width, window }))
        } else {
            None
        },
        wanted,
        at: idx.narrow(0, 0, n_at)?,
        targets: idx.narrow(0, n_at, n_at)?,
        last: idx.narrow(0, 2 * n_at, n_last)?,
        owner,
    })
}

/// Scores batches of `(item, head length)` rows (see `prepare_batch`): their forward passes run
/// together, layer by layer (`Glm::forward_many`), then each batch's log-probs are read back.
/// With `keep`, each batch's prompt caches come back for generation.
#[allow(clippy::too_many_arguments)]
fn score_batches(
    model: &Glm,
    items: &[(Vec<u32>, Vec<i64>)],
    used: &[usize],
    batches: &[Vec<(usize, usize)>],
    variants: &[Variant],
    lim: BatchLimits,
    keep: bool,
    out: &mut [Vec<Vec<f32>>],
) -> Result<Vec<Pending>> {
    profile::phase("score");
    let mut preps =
        batches.iter().map(|b| prepare_batch(model, items, used, b, variants, keep)).collect::<Result<Vec<_>>>()?;
    let t0 = std::time::Instant::now();
    let inputs = preps
        .iter_mut()
        .map(|p| PassInput {
            ids: &p.ids,
            pad: &p.pads,
            sel: &p.row_sel,
            cache: p.kept.as_mut().map(|(c, _)| c),
            keep: prune_enabled().then_some(p.wanted.as_slice()),
        })
        .collect();
    let hidden = model.forward_many(inputs)?;
    // Every batch's log-probs and first tokens are queued before the first read-back.
    let chunk = lim.max_logit_rows.max(1);
    let mut queued = Vec::with_capacity(preps.len());
    for (p, h) in preps.iter().zip(&hidden) {
        let n_at = p.at.dim(0)?;
        let mut lps = Vec::new();
        for start in (0..n_at).step_by(chunk) {
            let n = chunk.min(n_at - start);
            lps.push(model.target_log_probs(h, &p.at.narrow(0, start, n)?, &p.targets.narrow(0, start, n)?)?);
        }
        let first = if keep { Some(model.logits_at_t(h, &p.last)?.argmax(1)?) } else { None };
        queued.push((lps, first));
    }
    drop(hidden);
    profile::tally("score: queue forward", t0.elapsed().as_secs_f64());
    let mut kept = Vec::new();
    for (p, (lps, first)) in preps.into_iter().zip(queued) {
        let t1 = std::time::Instant::now();
        let picked: Vec<f32> = if lps.is_empty() { vec![] } else { Tensor::cat(&lps, 0)?.to_vec1()? };
        profile::tally("score: wait", t1.elapsed().as_secs_f64());
        for (x, &(vi, i)) in picked.into_iter().zip(&p.owner) {
            out[vi][i].push(x);
        }
        let (Some((mut cache, pr)), Some(first)) = (p.kept, first) else { continue };
        let first = first.to_vec1()?;
        cache.keep_windows(&pr.window, pr.width)?;
        // Each prompt now ends at the cache's last position.
        let pads = pr.heads.iter().map(|h| pr.width - h).collect();
        kept.push(Pending { cache, pads, sel: p.sel, which: p.which, first });
    }
    Ok(kept)
}

/// What `score_and_generate` measured, per variant and item.
pub struct Outputs {
    pub scores: Vec<Vec<Vec<f32>>>,
    pub gens: Vec<Vec<Vec<u32>>>,
    /// Per item: all its numbers are in (false only for a stopped run).
    pub complete: Vec<bool>,
    /// Why the run stopped early (Ctrl-C, --timeout): what finished before is kept.
    pub stopped: Option<String>,
    /// Seconds in teacher-forced passes (which include the prompts' prefill).
    pub score_s: f64,
    /// Seconds in decoding, plus the prefill of prompts that could not share the scoring pass.
    pub generate_s: f64,
}

/// Scores every item and generates from every prompt, sharing the work where a prompt is a prefix
/// of the scored sequence (the usual case: the prompt is the conversation up to the answer that is
/// scored): the scoring pass keeps its KV cache over the prompt, and generation starts decoding
/// from it instead of prefilling the prompt again. Results as `score_targets` and `generate`.
/// A stop (Ctrl-C, --timeout) ends it early with what finished (see `Outputs::complete`).
pub fn score_and_generate(
    model: &Glm,
    items: &[(Vec<u32>, Vec<i64>)],
    prompts: &[Vec<u32>],
    max_new: &[usize],
    variants: &[Variant],
    lim: BatchLimits,
    gen: GenOptions,
) -> Result<Outputs> {
    let n = items.len();
    if prompts.len() != n || max_new.len() != n {
        bail!("{n} items, {} prompts, {} generation lengths", prompts.len(), max_new.len());
    }
    let mut o = Outputs {
        scores: vec![vec![Vec::new(); n]; variants.len()],
        gens: vec![vec![Vec::new(); n]; variants.len()],
        complete: vec![false; n],
        stopped: None,
        score_s: 0.0,
        generate_s: 0.0,
    };
    let r = run_all(model, items, prompts, max_new, variants, lim, gen, &mut o);
    match r {
        Err(e) if crate::stop::is_stop(&e) => o.stopped = Some(format!("{e}")),
        other => other?,
    }
    Ok(o)
}

#[allow(clippy::too_many_arguments)]
fn run_all(
    model: &Glm,
    items: &[(Vec<u32>, Vec<i64>)],
    prompts: &[Vec<u32>],
    max_new: &[usize],
    variants: &[Variant],
    lim: BatchLimits,
    gen: GenOptions,
    o: &mut Outputs,
) -> Result<()> {
    let n = items.len();
    let used = used_lengths(items);
    let needs_gen = |i: usize| max_new[i] > 0 && !prompts[i].is_empty();
    let shared: Vec<bool> = (0..n)
        .map(|i| {
            let p = &prompts[i];
            needs_gen(i) && used[i] > 1 && p.len() <= used[i] && items[i].0.starts_with(p)
        })
        .collect();
    for (i, c) in o.complete.iter_mut().enumerate() {
        *c = used[i] <= 1 && !needs_gen(i); // nothing to run
    }

    // Shared items: scored whole (prompt, then target), the prompts' caches kept, decoded in groups.
    let todo: Vec<usize> = (0..n).filter(|&i| shared[i]).collect();
    let lengths: Vec<(usize, usize)> = todo.iter().map(|&i| (prompts[i].len(), used[i] - prompts[i].len())).collect();
    let mut pending: Vec<Pending> = Vec::new();
    let (mut rows, mut longest, mut steps) = (0usize, 0usize, 0usize);
    let flush = |pending: Vec<Pending>, o: &mut Outputs| -> Result<()> {
        let t = std::time::Instant::now();
        let done: Vec<usize> = pending.iter().flat_map(|p| p.which.iter().map(|&(_, i)| i)).collect();
        decode_group(model, pending, max_new, gen, &mut o.gens)?;
        profile::mark_memory("decode group done", model.device());
        crate::device::release_freed_memory(model.device());
        o.generate_s += t.elapsed().as_secs_f64();
        for i in done {
            o.complete[i] = true;
        }
        Ok(())
    };
    let batches: Vec<Vec<(usize, usize)>> = plan(&lengths, variants.len(), lim, Width::Total)
        .into_iter()
        .map(|b| b.iter().map(|&b| (todo[b], prompts[todo[b]].len())).collect())
        .collect();
    let mut next = 0;
    while next < batches.len() {
        // The first passes run together (`BatchLimits::first_passes`) as far as one decode group
        // holds them; then one at a time.
        let want = if next == 0 { lim.first_passes.max(1) } else { 1 };
        let (mut g_rows, mut g_len, mut g_steps, mut end) = (0usize, 0usize, 0usize, next);
        while end < batches.len() && end - next < want {
            let b = &batches[end];
            let n_rows = g_rows + b.len() * variants.len();
            let n_len = g_len.max(b.iter().map(|&(_, h)| h).max().unwrap_or(0));
            let n_steps = g_steps.max(b.iter().map(|&(i, _)| max_new[i]).max().unwrap_or(0));
            if end > next && (n_rows > lim.max_rows || n_rows * (n_len + n_steps) > lim.max_cache_tokens) {
                break;
            }
            (g_rows, g_len, g_steps, end) = (n_rows, n_len, n_steps, end + 1);
        }
        let group = &batches[next..end];
        next = end;
        let grown = (rows + g_rows) * (longest.max(g_len) + steps.max(g_steps));
        if !pending.is_empty() && (rows + g_rows > lim.max_rows || grown > lim.max_cache_tokens) {
            flush(std::mem::take(&mut pending), o)?;
            (rows, longest, steps) = (0, 0, 0);
        }
        let t = std::time::Instant::now();
        let p = score_batches(model, items, &used, group, variants, lim, true, &mut o.scores)?;
        if o.score_s == 0.0 {
            profile::mark("first scoring pass done");
        }
        o.score_s += t.elapsed().as_secs_f64();
        profile::mark_memory("scoring passes queued", model.device());
        pending.extend(p);
        (rows, longest, steps) = (rows + g_rows, longest.max(g_len), steps.max(g_steps));
    }
    if !pending.is_empty() {
        flush(pending, o)?;
    }

    // The rest: plain scoring, and generation with its own prefill.
    let rest: Vec<usize> = (0..n).filter(|&i| !shared[i] && used[i] > 1).collect();
    let lengths: Vec<(usize, usize)> = rest.iter().map(|&i| (0, used[i])).collect();
    for batch in plan(&lengths, variants.len(), lim, Width::Total) {
        let t = std::time::Instant::now();
        let batch: Vec<(usize, usize)> = batch.iter().map(|&b| (rest[b], 0)).collect();
        score_batches(model, items, &used, std::slice::from_ref(&batch), variants, lim, false, &mut o.scores)?;
        o.score_s += t.elapsed().as_secs_f64();
        for &(i, _) in &batch {
            o.complete[i] = !needs_gen(i);
        }
    }
    let t = std::time::Instant::now();
    let capped: Vec<usize> = (0..n).map(|i| if shared[i] { 0 } else { max_new[i] }).collect();
    let g = generate(model, prompts, &capped, variants, lim, gen)?;
    for (vi, per) in g.into_iter().enumerate() {
        for (i, ids) in per.into_iter().enumerate() {
            if !shared[i] {
                o.gens[vi][i] = ids;
            }
        }
    }
    for i in (0..n).filter(|&i| !shared[i] && needs_gen(i)) {
        o.complete[i] = true;
    }
    o.generate_s += t.elapsed().as_secs_f64();
    Ok(())
}

/// Stacks pending caches and decodes all their rows together, reordered by variant (one gather
/// per layer) so that each adapter's rows are one run for the LoRA side path.
fn decode_group(
    model: &Glm,
    parts: Vec<Pending>,
    max_new: &[usize],
    gen: GenOptions,
    out: &mut [Vec<Vec<u32>>],
) -> Result<()> {
    let steps = parts.iter().flat_map(|p| p.which.iter().map(|&(_, i)| max_new[i])).max().unwrap_or(0);
    let (mut pads, mut sel, mut which, mut first, mut caches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in parts {
        caches.push(p.cache);
        pads.push(p.pads);
        sel.extend(p.sel);
        which.extend(p.which);
        first.extend(p.first);
    }
    profile::mark_memory("decode group: before stacking its caches", model.device());
    let (mut cache, shifts) = Cache::stack(caches, steps)?;
    profile::mark_memory("decode group: caches stacked", model.device());
    let mut pads: Vec<usize> =
        pads.into_iter().zip(shifts).flat_map(|(ps, s)| ps.into_iter().map(move |p| p + s)).collect();
    let mut order: Vec<usize> = (0..which.len()).collect();
    order.sort_by_key(|&r| which[r].0);
    if order.iter().enumerate().any(|(i, &r)| i != r) {
        cache.select_rows(&order)?;
        pads = permute(&pads, &order);
        sel = permute(&sel, &order);
        which = permute(&which, &order);
        first = permute(&first, &order);
    }
    decode(model, cache, &pads, &sel, &which, first, max_new, gen, out)
}

/// `v` reordered: element i is `v[order[i]]`.
fn permute<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
    order.iter().map(|&r| v[r]).collect()
}

/// Greedy decoding from a filled cache: `next` holds each row's first new token.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Glm,
    mut cache: Cache,
    pads: &[usize],
    sel: &[Variant],
    which: &[(usize, usize)],
    mut next: Vec<u32>,
    max_new: &[usize],
    gen: GenOptions,
    out: &mut [Vec<Vec<u32>>],
) -> Result<()> {
    profile::phase("decode");
    let eos = &model.cfg.eos_ids;
    let steps = which.iter().map(|&(_, i)| max_new[i]).max().unwrap_or(0);
    let sel = RowSelection::new(sel.to_vec(), model.device(), model.dtype());
    let mut done = vec![false; which.len()];
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
        let t0 = std::time::Instant::now();
        let input = Tensor::from_vec(next, (which.len(), 1), model.device())?;
        let hidden = model.forward(&input, pads, &sel, Some(&mut cache))?;
        let ids = model.last_logits(&hidden)?.argmax(1)?;
        let t1 = std::time::Instant::now();
        next = ids.to_vec1()?;
        // Host time queueing a step against waiting for it: a step that waits ~0 is bound by the host.
        profile::tally("decode: queue", (t1 - t0).as_secs_f64());
        profile::tally("decode: wait", t1.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Greedy generation for every prompt and variant: new token ids (ending with the eos token when
/// one was produced). `max_new[i]` caps item i. Rows decode together within `max_rows` and
/// `max_cache_tokens`; their prompts are prefilled in chunks of at most `max_tokens` tokens.
pub fn generate(
    model: &Glm,
    prompts: &[Vec<u32>],
    max_new: &[usize],
    variants: &[Variant],
    lim: BatchLimits,
    gen: GenOptions,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let mut out = vec![vec![Vec::new(); prompts.len()]; variants.len()];
    let todo: Vec<usize> = (0..prompts.len()).filter(|&i| max_new[i] > 0 && !prompts[i].is_empty()).collect();
    let lengths: Vec<(usize, usize)> = todo.iter().map(|&i| (prompts[i].len(), max_new[i])).collect();
    // Decode batches are bounded by rows and cache size: one decode step reads the weights once for all rows.
    let decode_lim = BatchLimits { max_tokens: lim.max_cache_tokens, ..lim };
    for batch in plan(&lengths, variants.len(), decode_lim, Width::HeadTail) {
        crate::stop::check()?;
        let mut rows: Vec<(&[u32], &[u32])> = Vec::new();
        let mut sel = Vec::new();
        let mut which = Vec::new();
        // Variant-major: each adapter's rows are one run for the LoRA side path.
        for (vi, v) in variants.iter().enumerate() {
            for &b in &batch {
                let i = todo[b];
                rows.push((&prompts[i], &[]));
                sel.push(*v);
                which.push((vi, i));
            }
        }
        let steps = which.iter().map(|&(_, i)| max_new[i]).max().unwrap_or(0);
        profile::phase("prefill");
        let (ids, pads) = lay_out(&rows, model.cfg.pad_id.unwrap_or(0), model.device())?;
        let t = ids.dims()[1];
        // Prefill in row chunks that fit the token budget, then stack their caches.
        let chunk = (lim.max_tokens / t.max(1)).clamp(1, rows.len());
        let mut caches = Vec::new();
        let mut first = Vec::new();
        for start in (0..rows.len()).step_by(chunk) {
            let n = chunk.min(rows.len() - start);
            let sel_c = RowSelection::new(sel[start..start + n].to_vec(), model.device(), model.dtype());
            let mut cache = model.new_cache(t);
            let hidden = model.forward(&ids.narrow(0, start, n)?, &pads[start..start + n], &sel_c, Some(&mut cache))?;
            first.extend(model.last_logits(&hidden)?.argmax(1)?.to_vec1::<u32>()?);
            caches.push(cache);
        }
        let (cache, _) = Cache::stack(caches, steps)?;
        decode(model, cache, &pads, &sel, &which, first, max_new, gen, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_every_batch_within_its_limits_widest_first() {
        let lengths: Vec<(usize, usize)> = (0..40).map(|i| (5 + i % 7, 10 + (i * 13) % 17)).collect();
        let lim =
            BatchLimits { max_rows: 12, max_tokens: 300, max_logit_rows: 1, max_cache_tokens: 1, first_passes: 1 };
        for width in [Width::Total, Width::HeadTail] {
            let batches = plan(&lengths, 2, lim, width);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..40).collect::<Vec<_>>(), "every item exactly once");
            let mut last = usize::MAX;
            for b in &batches {
                let heads = b.iter().map(|&i| lengths[i].0);
                let tails = b.iter().map(|&i| lengths[i].1);
                let totals = b.iter().map(|&i| lengths[i].0 + lengths[i].1);
                let w = match width {
                    Width::Total => totals.max().unwrap(),
                    Width::HeadTail => heads.max().unwrap() + tails.max().unwrap(),
                };
                assert!(b.len() * 2 <= 12 && b.len() * 2 * w <= 300, "{b:?} is {w} wide");
                assert!(w <= last, "widest first");
                last = w;
            }
            // One item wider than the token budget still gets a batch of its own.
            assert_eq!(plan(&[(500, 500)], 2, lim, width), vec![vec![0]]);
        }
    }

    #[test]
    fn plan_keeps_the_order_that_pads_less() {
        // Heads vary more than tails: for decode groups (heads right-aligned, then the new
        // tokens) grouping by head pads less than grouping by total length.
        // By total (112, 111, 110, 109): [0, 1] and [2, 3], 632 tokens laid out; by head: 450.
        let lengths = vec![(100, 12), (50, 61), (98, 12), (52, 57)];
        let lim =
            BatchLimits { max_rows: 2, max_tokens: 10_000, max_logit_rows: 1, max_cache_tokens: 1, first_passes: 1 };
        let mut batches = plan(&lengths, 1, lim, Width::HeadTail);
        batches.iter_mut().for_each(|b| b.sort());
        assert_eq!(batches, vec![vec![1, 3], vec![0, 2]]);
        // Scoring passes lay each row out whole (right-aligned): by total, [0, 1] and [2, 3] are
        // 2·112 + 2·110 = 444 tokens laid out; by head, [0, 2] and [1, 3]: 2·112 + 2·111 = 446.
        let mut batches = plan(&lengths, 1, lim, Width::Total);
        batches.iter_mut().for_each(|b| b.sort());
        assert_eq!(batches, vec![vec![0, 1], vec![2, 3]]);
        // Plain scoring (no heads): longest first, as before.
        let plain = vec![(0, 5), (0, 9), (0, 7), (0, 8)];
        assert_eq!(plan(&plain, 1, lim, Width::Total), vec![vec![1, 3], vec![2, 0]]);
    }

    #[test]
    fn halving_reaches_one_row_then_stops() {
        let mut lim =
            BatchLimits { max_rows: 6, max_tokens: 100, max_logit_rows: 3, max_cache_tokens: 40, first_passes: 1 };
        let mut steps = 0;
        while let Some(next) = lim.halved() {
            lim = next;
            steps += 1;
        }
        assert_eq!((lim.max_rows, lim.max_tokens, lim.max_logit_rows, lim.max_cache_tokens), (1, 1, 1, 1));
        assert_eq!(steps, 6); // 100, 50, 25, 12, 6, 3, 1
    }

    #[test]
    fn lay_out_right_aligns_rows() {
        let rows: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4]), (&[5], &[6, 7, 8, 9])];
        let (ids, pads) = lay_out(&rows, 0, &Device::Cpu).unwrap();
        assert_eq!(pads, vec![1, 0]);
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9]]);
    }

    #[test]
    fn prompt_windows_right_align_each_prompt() {
        // Two rows of a 5-wide pass (as lay_out_right_aligns_rows), one kv head: prompts [1, 2, 3]
        // at columns 1..4 and [5] at column 0; kept 3 wide, they end at column 2. Row 1's padding
        // columns read its column 0 (finite values, masked).
        let idx = prompt_windows(&[1, 0], &[3, 1], 3, 5, 1);
        assert_eq!(idx, vec![1, 2, 3, 5, 5, 5]);
        // With two kv heads each head's rows follow the row's previous head.
        let idx = prompt_windows(&[1, 0], &[3, 1], 3, 5, 2);
        assert_eq!(idx, vec![1, 2, 3, 6, 7, 8, 10, 10, 10, 15, 15, 15]);
    }
}
