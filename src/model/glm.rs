//! The GLM-4 decoder in candle, one internal form for the three checkpoint layouts.
//!
//! Per layer: RMSNorm → attention (fused q/k/v with bias, grouped-query, RoPE on the first
//! `rotary_dim` dims of each head in interleaved pairs) → [GLM-4-0414: post-attention norm] →
//! residual; RMSNorm → SwiGLU MLP from a fused gate/up projection → [0414: post-MLP norm] → residual.
//! Batches are left-padded: row b has `pad[b]` pad tokens first, positions count from its first real token.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::config::{Layout, ModelConfig};
use super::lora::{Linear, LoraDelta, LoraStack, RowSelection};
use super::profile;
use super::weights::TensorSource;
use super::Pending;

/// The LoRA-able linears of a layer, in the model's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Target {
    /// The linear's weight shape [out, in] in a model of config `c`.
    fn dims(self, c: &ModelConfig) -> [usize; 2] {
        match self {
            Target::Qkv => [c.q_out() + 2 * c.kv_out(), c.hidden_size],
            Target::O => [c.hidden_size, c.q_out()],
            Target::GateUp => [2 * c.intermediate_size, c.hidden_size],
            Target::Down => [c.hidden_size, c.intermediate_size],
        }
    }
}

struct Layer {
    input_norm: Tensor,
    post_attn_norm: Tensor,
    /// Glm4 (0414) only.
    post_self_attn_norm: Option<Tensor>,
    post_mlp_norm: Option<Tensor>,
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
}

impl Layer {
    fn linear(&self, t: Target) -> &Linear {
        match t {
            Target::Qkv => &self.qkv,
            Target::O => &self.o,
            Target::GateUp => &self.gate_up,
            Target::Down => &self.down,
        }
    }

    fn linear_mut(&mut self, t: Target) -> &mut Linear {
        match t {
            Target::Qkv => &mut self.qkv,
            Target::O => &mut self.o,
            Target::GateUp => &mut self.gate_up,
            Target::Down => &mut self.down,
        }
    }
}

pub struct Glm {
    /// Weights still arriving (a streamed load); see `Drop`.
    pending: Option<Arc<dyn Pending>>,
    pub cfg: ModelConfig,
    /// [vocab, H] on the device; [0, H] once moved to host memory (`embedding_to_host`).
    embed: Tensor,
    #[cfg(feature = "cuda")]
    host_embed: Option<super::cuda_ops::HostRows>,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Tensor,
    /// [rotary_dim / 2], f32
    inv_freq: Tensor,
    device: Device,
    dtype: DType,
    adapters: usize,
    /// Use plain tensor ops instead of candle's fused kernels (which have no backward pass), so
    /// gradients flow: the demo trains LoRA adapters through this forward.
    pub differentiable: bool,
}

impl Drop for Glm {
    /// A streamed load's copies write the model's tensors: they end before the tensors are freed
    /// (others may hold the load's progress longer than the model).
    fn drop(&mut self) {
        if let Some(p) = &self.pending {
            p.finished();
        }
    }
}

/// Positions the last layer keeps after attention (`Glm::forward_at`): flat indices [N] u32 and
/// each one's row selection.
struct Keep {
    idx: Tensor,
    sel: RowSelection,
}

/// The inputs of one forward pass (`Glm::forward_many`).
pub struct PassInput<'a> {
    /// [B, T] token ids
    pub ids: &'a Tensor,
    /// Each row's left padding over the whole sequence (cache + ids).
    pub pad: &'a [usize],
    pub sel: &'a RowSelection,
    pub cache: Option<&'a mut Cache>,
    /// Flat positions whose hidden states are returned (as `Glm::forward_at`); None: all.
    pub keep: Option<&'a [u32]>,
}

/// A forward pass under way: the residual stream after the layers run so far.
struct Pass<'a> {
    ctx: Step<'a>,
    x: Tensor,
    /// The last layer's MLP output, not yet added to `x` (see `Glm::layer`).
    pending: Option<Tensor>,
    cache: Option<&'a mut Cache>,
    keep: Option<Keep>,
    /// `keep` was empty: the output is [0, 1, H].
    empty: bool,
    /// The cache's length after the pass.
    len: usize,
}

/// What every layer of one forward pass shares: RoPE tables, attention mask, row selection.
struct Step<'a> {
    /// [B, T, rotary_dim/2]
    cos: Tensor,
    sin: Tensor,
    /// [B, 1, T, S] additive, in the model dtype (unfused attention only)
    mask: Option<Tensor>,
    /// [B] u32: each row's left padding, for the fused kernel that masks as it goes
    pads: Option<Tensor>,
    sel: &'a RowSelection,
}

/// Keys and values of the positions already run, per layer: [B, kv_heads, capacity, head_dim]
/// buffers filled up to `len`. Rows are left-padded, so every row has the same `len`.
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
    capacity: usize,
}

impl Cache {
    /// Writes k, v [B, kvh, T, D] at `len` in layer `i`'s buffers; returns the keys and values of
    /// positions 0..len+T (views into the buffers).
    fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if self.len + t > self.capacity {
            bail!("KV cache of {} positions cannot take {} more after {}", self.capacity, t, self.len);
        }
        if self.kv[i].is_none() {
            let z = Tensor::zeros((b, h, self.capacity, d), k.dtype(), k.device())?;
            self.kv[i] = Some((z.clone(), z.zeros_like()?));
        }
        let Some((kb, vb)) = &self.kv[i] else { bail!("KV cache layer {i} missing") };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        let n = self.len + t;
        Ok((kb.narrow(2, 0, n)?, vb.narrow(2, 0, n)?))
    }

    /// Keeps a window of `len` positions per row, gathered by `idx` ([rows·kvh·len] u32: for each
    /// row, kv head and kept position, its flat index into the layer's [rows·kvh·capacity, D]
    /// rows), copied out of the larger buffers so that they can be freed. Used to keep each row's
    /// prompt, right-aligned, from a pass over prompts and targets.
    pub fn keep_windows(&mut self, idx: &Tensor, len: usize) -> Result<()> {
        for (k, v) in self.kv.iter_mut().flatten() {
            let (b, h, cap, d) = k.dims4()?;
            if idx.dim(0)? != b * h * len {
                bail!("KV cache windows: {} indices for {b} rows × {h} heads × {len} positions", idx.dim(0)?);
            }
            *k = k.reshape((b * h * cap, d))?.index_select(idx, 0)?.reshape((b, h, len, d))?;
            *v = v.reshape((b * h * cap, d))?.index_select(idx, 0)?.reshape((b, h, len, d))?;
        }
        self.len = len;
        self.capacity = len;
        Ok(())
    }

    /// Reorders the rows: row i becomes old row `order[i]` (one gather per layer, each layer's old
    /// buffers freed as it is replaced).
    pub fn select_rows(&mut self, order: &[usize]) -> Result<()> {
        let Some(dev) = self.kv.iter().flatten().next().map(|(k, _)| k.device().clone()) else { return Ok(()) };
        let idx: Vec<u32> = order.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, order.len(), &dev)?;
        for (k, v) in self.kv.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    /// Stacks caches of row groups into one, right-aligned at the longest: a part of length L
    /// gets `len - L` more left padding (returned per part), then room for `extra` positions.
    /// Layer by layer, each part's layer freed once copied: the stack costs one layer's worth of
    /// memory on top of the parts, not a second copy of all of them.
    pub fn stack(mut parts: Vec<Cache>, extra: usize) -> Result<(Cache, Vec<usize>)> {
        let len = parts.iter().map(|c| c.len).max().unwrap_or(0);
        let shifts: Vec<usize> = parts.iter().map(|c| len - c.len).collect();
        let layers = parts.first().map(|c| c.kv.len()).unwrap_or(0);
        let capacity = len + extra;
        let mut kv = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for (p, &shift) in parts.iter_mut().zip(&shifts) {
                let Some((k, v)) = p.kv[i].take() else { bail!("KV cache part without layer {i}") };
                let place = |x: &Tensor| -> Result<Tensor> {
                    let (b, h, _, d) = x.dims4()?;
                    let x = x.narrow(2, 0, p.len)?;
                    let left = Tensor::zeros((b, h, shift, d), x.dtype(), x.device())?;
                    let right = Tensor::zeros((b, h, extra, d), x.dtype(), x.device())?;
                    Ok(Tensor::cat(&[&left, &x, &right], 2)?)
                };
                ks.push(place(&k)?);
                vs.push(place(&v)?);
            }
            kv.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        Ok((Cache { kv, len, capacity }, shifts))
    }
}

/// The input embedding's tensor name in a checkpoint of `layout`.
pub fn embed_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Chatglm => "transformer.embedding.word_embeddings.weight",
        _ => "model.embed_tokens.weight",
    }
}

/// Where the input embedding lies in a checkpoint's files: its file's map, byte range and dtype
/// (for `Glm::embedding_to_host`).
pub fn embedding_in(
    weights: &super::weights::Weights,
    layout: Layout,
) -> Option<(Arc<memmap2::Mmap>, std::ops::Range<usize>, DType)> {
    let name = embed_name(layout);
    let dtype = weights.dtype(name)?;
    weights.raw(name).ok().map(|(map, range, _)| (map, range, dtype))
}

impl Glm {
    /// Loads a model directory's weights in `dtype` onto `device`.
    pub fn load(cfg: ModelConfig, weights: &dyn TensorSource, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_room(cfg, weights, dtype, device, &HashMap::new())
    }

    /// As `load`, with `room[(layer, target)]` columns after each row of those linears' weights
    /// for the LoRA side path (what `attach` will need: `lora::side_width`), so attaching writes
    /// the adapters' columns in place instead of copying every weight. The weights load in parts
    /// (`TensorSource::begin_part`): 0 the embedding, 1 + i layer i, then the final norm and output layer.
    pub fn load_with_room(
        cfg: ModelConfig,
        weights: &dyn TensorSource,
        dtype: DType,
        device: &Device,
        room: &HashMap<(usize, Target), usize>,
    ) -> Result<Self> {
        let c = &cfg;
        let h = c.hidden_size;
        let ld = |name: &str, shape: &[usize]| weights.load_shaped(name, shape, dtype, device);
        let lin = |layer: usize, t: Target, parts: &[(&str, &[usize])], bias: Option<Tensor>| {
            let extra = room.get(&(layer, t)).copied().unwrap_or(0);
            Linear::with_room(weights.load_stacked(parts, extra, dtype, device)?, bias, extra)
        };
        // A linear stored as one tensor, without bias.
        let one = |layer: usize, t: Target, name: String| lin(layer, t, &[(&name, &t.dims(c))], None);
        let last_part = c.num_layers + 1;
        weights.begin_part(0);
        let embed_name = embed_name(c.layout);
        let (norm_name, head_name) = match c.layout {
            Layout::Chatglm => ("transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"),
            _ => ("model.norm.weight", "lm_head.weight"),
        };
        let embed = ld(embed_name, &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !weights.contains(head_name) {
            embed.clone()
        } else {
            weights.begin_part(last_part);
            ld(head_name, &[c.vocab_size, h])?
        };
        let [qkv_out, _] = Target::Qkv.dims(c);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            weights.begin_part(1 + i);
            let layer = match c.layout {
                Layout::Chatglm => {
                    let p = format!("transformer.encoder.layers.{i}.");
                    let bias_name = format!("{p}self_attention.query_key_value.bias");
                    Layer {
                        input_norm: ld(&format!("{p}input_layernorm.weight"), &[h])?,
                        post_attn_norm: ld(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                        post_self_attn_norm: None,
                        post_mlp_norm: None,
                        qkv: lin(
                            i,
                            Target::Qkv,
                            &[(&format!("{p}self_attention.query_key_value.weight"), &[qkv_out, h])],
                            if c.qkv_bias { Some(ld(&bias_name, &[qkv_out])?) } else { None },
                        )?,
                        o: one(i, Target::O, format!("{p}self_attention.dense.weight"))?,
                        gate_up: one(i, Target::GateUp, format!("{p}mlp.dense_h_to_4h.weight"))?,
                        down: one(i, Target::Down, format!("{p}mlp.dense_4h_to_h.weight"))?,
                    }
                }
                Layout::Glm | Layout::Glm4 => {
                    let p = format!("model.layers.{i}.");
                    // q, k and v stacked into one [q_out + 2·kv_out, h] weight (and bias).
                    let proj = |suffix: &str, dims: fn(usize, usize) -> Vec<usize>| -> Vec<(String, Vec<usize>)> {
                        [("q", c.q_out()), ("k", c.kv_out()), ("v", c.kv_out())]
                            .iter()
                            .map(|(x, out)| (format!("{p}self_attn.{x}_proj.{suffix}"), dims(*out, h)))
                            .collect()
                    };
                    let bias = if c.qkv_bias {
                        Some(weights.load_stacked(&named(&proj("bias", |o, _| vec![o])), 0, dtype, device)?)
                    } else {
                        None
                    };
                    let qkv_weights = proj("weight", |o, h| vec![o, h]);
                    let glm4 = c.layout == Layout::Glm4;
                    Layer {
                        input_norm: ld(&format!("{p}input_layernorm.weight"), &[h])?,
                        post_attn_norm: ld(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                        post_self_attn_norm: if glm4 {
                            Some(ld(&format!("{p}post_self_attn_layernorm.weight"), &[h])?)
                        } else {
                            None
                        },
                        post_mlp_norm: if glm4 {
                            Some(ld(&format!("{p}post_mlp_layernorm.weight"), &[h])?)
                        } else {
                            None
                        },
                        qkv: lin(i, Target::Qkv, &named(&qkv_weights), bias)?,
                        o: one(i, Target::O, format!("{p}self_attn.o_proj.weight"))?,
                        gate_up: one(i, Target::GateUp, format!("{p}mlp.gate_up_proj.weight"))?,
                        down: one(i, Target::Down, format!("{p}mlp.down_proj.weight"))?,
                    }
                }
            };
            layers.push(layer);
        }
        weights.begin_part(last_part);
        let final_norm = ld(norm_name, &[h])?;
        // RoPE frequencies in f32 whatever the model dtype: bf16 positions are wrong past 256.
        let half = c.rotary_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / c.rotary_dim as f32)).collect();
        let inv_freq = Tensor::from_vec(inv, half, device)?;
        Ok(Glm {
            pending: None,
            cfg,
            embed,
            #[cfg(feature = "cuda")]
            host_embed: None,
            layers,
            final_norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            dtype,
            adapters: 0,
            differentiable: false,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Weights still arriving from a streamed load (`model::load_streamed`).
    pub fn set_pending(&mut self, pending: Arc<dyn Pending>) {
        self.pending = Some(pending);
    }

    /// Makes the device wait for part `p` of the weights (see `load_with_room`), if still arriving.
    fn ready(&self, p: usize) -> Result<()> {
        match &self.pending {
            Some(w) => w.wait(p),
            None => Ok(()),
        }
    }

    /// Makes the device wait for every weight: later work may read any of them.
    pub fn wait_for_weights(&self) -> Result<()> {
        self.ready(self.layers.len() + 1)
    }

    /// The streamed load still under way, if any (to wait for it elsewhere).
    pub fn pending_weights(&self) -> Option<Arc<dyn Pending>> {
        self.pending.clone()
    }

    /// When the last weight of a streamed load arrived on the device (waits for it); None for a
    /// model loaded at once.
    pub fn weights_arrived(&self) -> Option<std::time::Instant> {
        self.pending.as_ref().and_then(|w| w.finished())
    }

    /// Bytes of the model's tensors (weights, adapters' stacks) on its device.
    pub fn bytes(&self) -> usize {
        let b = super::tensor_bytes;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let norms = [Some(&l.input_norm), Some(&l.post_attn_norm), l.post_self_attn_norm.as_ref()];
                let norms: usize = norms.into_iter().chain([l.post_mlp_norm.as_ref()]).flatten().map(b).sum();
                norms + [&l.qkv, &l.o, &l.gate_up, &l.down].iter().map(|x| x.bytes()).sum::<usize>()
            })
            .sum();
        let head = if self.lm_head.id() == self.embed.id() { 0 } else { b(&self.lm_head) };
        b(&self.embed) + head + b(&self.final_norm) + layers
    }

    /// Moves the input embedding's table to host memory, read there by the lookups (one row per
    /// token over the bus: a few MB per pass), freeing its GPU memory (1.24 GB on GLM-4-9B) for
    /// batches. `file`: where the table lies in a memory-mapped checkpoint and its dtype there;
    /// in the run's dtype, its pages are used in place, else copied from the device. Not for a
    /// table shared with the output layer (tied embeddings). Returns the bytes freed on the device.
    #[cfg(feature = "cuda")]
    pub fn embedding_to_host(
        &mut self,
        file: Option<(Arc<memmap2::Mmap>, std::ops::Range<usize>, DType)>,
    ) -> Result<usize> {
        let Device::Cuda(dev) = &self.device else { return Ok(0) };
        if self.host_embed.is_some() || self.lm_head.id() == self.embed.id() {
            return Ok(0);
        }
        // The device's table (read by a copy, or freed below) must have arrived first.
        self.ready(0)?;
        let (rows, cols) = self.embed.dims2()?;
        let in_place = file
            .filter(|(_, r, dt)| *dt == self.dtype && r.len() == rows * cols * self.dtype.size_in_bytes())
            .and_then(|(map, r, _)| super::cuda_ops::HostRows::from_file(map, r, cols, self.dtype, dev).ok());
        let table = match in_place {
            Some(t) => t,
            None => super::cuda_ops::HostRows::from_device(&self.embed)?,
        };
        let freed = table.bytes();
        self.host_embed = Some(table);
        self.embed = Tensor::zeros((0, self.cfg.hidden_size), self.dtype, &self.device)?;
        Ok(freed)
    }

    /// Whether the input embedding's table is in host memory (`embedding_to_host`).
    pub fn embedding_on_host(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.host_embed.is_some() {
            return true;
        }
        false
    }

    /// Embeddings of token ids [N] u32 → [N, H].
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(t) = &self.host_embed {
            return Ok(t.gather(ids)?);
        }
        Ok(self.embed.embedding(ids)?)
    }

    /// Number of adapters attached for the unmerged side path.
    pub fn adapters(&self) -> usize {
        self.adapters
    }

    /// Base weight [out, in] of a target linear (for effect-size and merge checks).
    pub fn target_weight(&self, layer: usize, t: Target) -> Result<Tensor> {
        self.wait_for_weights()?;
        let l = self.layers.get(layer).with_context(|| format!("no layer {layer}"))?;
        match t {
            Target::Qkv => l.qkv.base_weight(),
            Target::O => l.o.base_weight(),
            Target::GateUp => l.gate_up.base_weight(),
            Target::Down => l.down.base_weight(),
        }
    }

    /// Merges deltas into the weights. `deltas[(layer, target)]`.
    pub fn merge(&mut self, deltas: &[(usize, Target, LoraDelta)]) -> Result<()> {
        self.wait_for_weights()?;
        for (layer, t, d) in deltas {
            let l = self.layers.get_mut(*layer).with_context(|| format!("no layer {layer}"))?;
            l.linear_mut(*t).merge(std::slice::from_ref(d))?;
        }
        Ok(())
    }

    /// Attaches adapters for the unmerged side path; adapter k of `adapters` becomes index k
    /// in `RowSelection`. Replaces any adapters attached before. Where the weights were loaded
    /// with room for these adapters (`load_with_room` with `side_room(adapters)`), their columns are
    /// written in place and the weights need not have arrived yet.
    pub fn attach(&mut self, adapters: &[Vec<(usize, Target, LoraDelta)>]) -> Result<()> {
        self.attach_prepared(PreparedAdapters::new(&self.cfg, adapters)?)
    }

    /// `attach` with the host's share of the work done beforehand (`PreparedAdapters::new`).
    pub fn attach_prepared(&mut self, prepared: PreparedAdapters) -> Result<()> {
        let PreparedAdapters { count, keys, stacks, flat } = prepared;
        if keys.iter().any(|(l, _)| *l >= self.layers.len()) {
            bail!("adapters prepared for a model of more layers than this one ({})", self.layers.len());
        }
        let stacks: Vec<_> = keys
            .into_iter()
            .zip(LoraStack::upload_all(stacks, flat, self.dtype, &self.device)?)
            .map(|((l, t), s)| (l, t, s))
            .collect();
        profile::mark("adapter stacks copied");
        // A linear whose room does not fit its stack is rebuilt from its base weight: wait for it.
        if stacks.iter().any(|(li, t, s)| !self.layers[*li].linear(*t).fits(s.as_ref())) {
            self.wait_for_weights()?;
        }
        for (li, t, stack) in stacks {
            self.layers[li].linear_mut(t).set_lora(stack)?;
        }
        self.adapters = count;
        Ok(())
    }

    /// An empty KV cache with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Cache {
        Cache { kv: (0..self.layers.len()).map(|_| None).collect(), len: 0, capacity }
    }

    /// Hidden states of the last layer (before the final norm): [B, T, H] for tokens `ids` [B, T].
    /// `pad[b]` = left padding of row b counted over the whole sequence (cache + ids).
    pub fn forward(
        &self,
        ids: &Tensor,
        pad: &[usize],
        sel: &RowSelection,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        self.forward_one(PassInput { ids, pad, sel, cache, keep: None })
    }

    /// As `forward`, but the hidden states only at flat positions `keep` (b·T + t, ascending):
    /// [N, 1, H]. The last layer's MLP, most of its work, runs on those positions only (its
    /// attention, and every KV cache, still covers all of them): scoring needs the hidden state
    /// where a target is predicted, not at every prompt token.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        pad: &[usize],
        sel: &RowSelection,
        cache: Option<&mut Cache>,
        keep: &[u32],
    ) -> Result<Tensor> {
        if keep.is_empty() && cache.is_none() {
            return Ok(Tensor::zeros((0, 1, self.cfg.hidden_size), self.dtype, &self.device)?);
        }
        self.forward_one(PassInput { ids, pad, sel, cache, keep: Some(keep) })
    }

    fn forward_one(&self, input: PassInput<'_>) -> Result<Tensor> {
        let mut out = self.forward_many(vec![input])?;
        out.pop().ok_or_else(|| anyhow::anyhow!("internal: a forward pass without its output"))
    }

    /// Several forward passes (each as `forward`, or `forward_at` with `keep`) run layer by layer:
    /// every pass through layer 0, then every pass through layer 1, and so on. The same work and
    /// the same numbers as one pass after the other, in another order: while a streamed load's
    /// weights still arrive, the device has every pass's work for a layer as soon as it lands,
    /// instead of idling between layers.
    pub fn forward_many(&self, inputs: Vec<PassInput<'_>>) -> Result<Vec<Tensor>> {
        self.ready(0)?;
        let mut passes = inputs.into_iter().map(|i| self.begin(i)).collect::<Result<Vec<_>>>()?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            self.ready(1 + i)?;
            // Each pass's stream moves through the layer (freed as soon as the layer is done with it).
            passes = passes
                .into_iter()
                .map(|mut p| {
                    let kv = p.cache.as_deref_mut().map(|c| (c, i));
                    let keep = p.keep.as_ref().filter(|_| i == last);
                    let (nx, d) = self.layer(layer, p.x, p.pending.take(), &p.ctx, kv, keep)?;
                    (p.x, p.pending) = (nx, Some(d));
                    Ok(p)
                })
                .collect::<Result<Vec<_>>>()?;
        }
        passes.into_iter().map(|p| self.finish(p)).collect()
    }

    /// A pass's embeddings and what its layers share.
    fn begin<'a>(&self, input: PassInput<'a>) -> Result<Pass<'a>> {
        let PassInput { ids, pad, sel, cache, keep } = input;
        let (b, t) = ids.dims2()?;
        if pad.len() != b || sel.rows().len() != b {
            bail!("batch of {b} rows with {} paddings and {} row selections", pad.len(), sel.rows().len());
        }
        // No position kept: the layers run in full (the cache still fills) and the output is empty.
        let (keep, empty) = match keep {
            Some([]) => (None, true),
            Some(k) => {
                if let Some(&p) = k.iter().find(|&&p| p as usize >= b * t) {
                    bail!("position {p} is outside a batch of {b} × {t}");
                }
                let rows = sel.rows();
                let kept_sel: Vec<_> = k.iter().map(|&p| rows.get(p as usize / t).copied().flatten()).collect();
                let idx = Tensor::from_slice(k, k.len(), &self.device)?;
                (Some(Keep { idx, sel: RowSelection::new(kept_sel, &self.device, self.dtype) }), false)
            }
            None => (None, false),
        };
        let offset = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let dev = &self.device;
        let (ctx, x) = profile::section("embed_rope", dev, || {
            let (cos, sin) = self.rope(pad, offset, t)?;
            let (mask, pads) = if self.fused() {
                let p: Vec<u32> = pad.iter().map(|&p| p as u32).collect();
                (None, Some(Tensor::from_vec(p, b, dev)?))
            } else {
                (Some(self.mask(pad, offset, t)?), None)
            };
            let ctx = Step { cos, sin, mask, pads, sel };
            Ok((ctx, self.embed_tokens(&ids.flatten_all()?)?.reshape((b, t, self.cfg.hidden_size))?))
        })?;
        Ok(Pass { ctx, x, pending: None, cache, keep, empty, len: offset + t })
    }

    /// A pass's last hidden states, after its last layer.
    fn finish(&self, p: Pass<'_>) -> Result<Tensor> {
        let mut x = p.x;
        if let Some(d) = p.pending {
            x = profile::section("norm_residual", &self.device, || Ok((x + d)?))?;
        }
        if let Some(c) = p.cache {
            c.len = p.len;
        }
        if p.empty {
            return Ok(Tensor::zeros((0, 1, self.cfg.hidden_size), self.dtype, &self.device)?);
        }
        Ok(x)
    }

    /// Logits (f32) at chosen flat positions of hidden [B, T, H] → [N, V].
    pub fn logits_at(&self, hidden: &Tensor, at: &[u32]) -> Result<Tensor> {
        self.logits_at_t(hidden, &Tensor::from_slice(at, at.len(), &self.device)?)
    }

    /// As `logits_at`, the positions already on the device ([N] u32): nothing waits for the device.
    pub fn logits_at_t(&self, hidden: &Tensor, at: &Tensor) -> Result<Tensor> {
        profile::section("logits", &self.device, || Ok(self.logits_at_inner(hidden, at)?.to_dtype(DType::F32)?))
    }

    fn logits_at_inner(&self, hidden: &Tensor, at: &Tensor) -> Result<Tensor> {
        self.wait_for_weights()?;
        let h = hidden.dim(D::Minus1)?;
        let flat = hidden.reshape(((), h))?;
        let rows = super::gather_rows(&flat, at)?;
        let rows = self.rms_norm(&rows, &self.final_norm)?;
        Ok(rows.matmul(&self.lm_head.t()?)?)
    }

    /// log p(targets[i]) at flat positions `at[i]` of hidden [B, T, H] → [N] f32: log-softmax (in
    /// f32) of the logits there, read at the target. Positions and targets are on the device ([N]
    /// u32 each): a copy from the host waits for everything queued before it, so callers upload
    /// them before the forward pass and the pass runs to its read-back without a gap.
    pub fn target_log_probs(&self, hidden: &Tensor, at: &Tensor, targets: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            // The logits in the model dtype (their f32 cast is exact) read once by one kernel.
            let logits = profile::section("logits", &self.device, || self.logits_at_inner(hidden, at))?;
            return profile::section("log_softmax", &self.device, || {
                Ok(super::cuda_ops::target_log_probs(&logits, targets)?)
            });
        }
        let logits = self.logits_at_t(hidden, at)?;
        let lp =
            profile::section("log_softmax", &self.device, || Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?))?;
        Ok(lp.gather(&targets.unsqueeze(1)?.contiguous()?, 1)?.flatten_all()?)
    }

    /// One decoder layer. `x` is the residual stream and `pending` the previous layer's MLP output,
    /// not yet added: the add runs fused with this layer's first norm. Returns the new pair; with
    /// `keep`, only at those positions ([N, 1, H]) after attention.
    fn layer(
        &self,
        l: &Layer,
        stream: Tensor,
        pending: Option<Tensor>,
        ctx: &Step,
        kv: Option<(&mut Cache, usize)>,
        keep: Option<&Keep>,
    ) -> Result<(Tensor, Tensor)> {
        let mut sel = ctx.sel;
        let dev = &self.device;
        // Each intermediate is dropped as soon as it is used (the pool reuses its memory for the
        // next one): a scoring pass holds ~H + 3·I values per token at its peak instead of ~8·H + 3·I.
        // On CUDA the norms and SwiGLU write rows with room for the next linear's LoRA columns.
        let (mut x, h) = profile::section("norm_residual", dev, || {
            self.add_norm(&stream, pending.as_ref(), &l.input_norm, l.qkv.input_width())
        })?;
        drop((stream, pending));
        let mut a = self.attention(l, &h, ctx, kv)?;
        drop(h);
        if let Some(k) = keep {
            let pick = |t: &Tensor| -> Result<Tensor> {
                let h = t.dim(D::Minus1)?;
                Ok(super::gather_rows(&t.reshape(((), h))?, &k.idx)?.unsqueeze(1)?)
            };
            (x, a, sel) = (pick(&x)?, pick(&a)?, &k.sel);
        }
        let (sum, h) = profile::section("norm_residual", dev, || {
            if let Some(n) = &l.post_self_attn_norm {
                a = self.rms_norm(&a, n)?;
            }
            self.add_norm(&x, Some(&a), &l.post_attn_norm, l.gate_up.input_width())
        })?;
        drop((x, a));
        let gu = l.gate_up.forward(&h, sel)?;
        drop(h);
        let m = self.cfg.intermediate_size;
        let act = profile::section("swiglu", dev, || self.swiglu(&gu, m, l.down.input_width()))?;
        drop(gu);
        let mut d = l.down.forward(&act, sel)?;
        drop(act);
        if let Some(n) = &l.post_mlp_norm {
            d = profile::section("norm_residual", dev, || self.rms_norm(&d, n))?;
        }
        Ok((sum, d))
    }

    /// (x + a, RMSNorm(x + a)·w), or (x, RMSNorm(x)·w) without `a`; one kernel on CUDA, whose norm
    /// rows are `ld` values long (zeros after the norm: room for the next linear's LoRA columns).
    #[allow(unused_variables)]
    fn add_norm(&self, x: &Tensor, a: Option<&Tensor>, w: &Tensor, ld: Option<usize>) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if self.fused_norm() {
            let eps = self.cfg.rms_eps as f32;
            return Ok(match a {
                Some(a) => super::cuda_ops::add_rms_norm(x, a, w, eps, ld)?,
                None => (x.clone(), super::cuda_ops::rms_norm(x, w, eps, ld)?),
            });
        }
        let x = match a {
            Some(a) => (x + a)?,
            None => x.clone(),
        };
        let h = self.rms_norm(&x, w)?;
        Ok((x, h))
    }

    fn attention(&self, l: &Layer, x: &Tensor, ctx: &Step, kv: Option<(&mut Cache, usize)>) -> Result<Tensor> {
        let (cos, sin, sel) = (&ctx.cos, &ctx.sin, ctx.sel);
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, kvh, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let qkv = l.qkv.forward(x, sel)?; // [B, T, (nh + 2·kvh)·D]
        let dev = &self.device;
        // Sub-sections so the profile shows where attention time goes.
        let (q, k, v) = profile::section("attention: heads + rope", dev, || {
            #[cfg(feature = "cuda")]
            if self.fused() {
                return Ok(super::cuda_ops::qkv_rope(&qkv, cos, sin, (nh, kvh, d), c.rotary_dim)?);
            }
            let heads = |start: usize, n: usize| -> Result<Tensor> {
                Ok(qkv.narrow(D::Minus1, start * d, n * d)?.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
            };
            let q = self.apply_rope(&heads(0, nh)?, cos, sin)?; // [B, nh, T, D]
            let k = self.apply_rope(&heads(nh, kvh)?, cos, sin)?; // [B, kvh, T, D]
            Ok((q, k, heads(nh + kvh, kvh)?))
        })?;
        let (k, v) = match kv {
            Some((cache, i)) => profile::section("attention: kv cache", dev, || cache.append(i, &k, &v))?,
            None => (k, v),
        };
        #[cfg(feature = "cuda")]
        if let (Some(pads), true) = (&ctx.pads, flash_enabled() && super::cuda_ops::flash_fits(d, self.dtype)) {
            // One kernel writes the o projection's input rows (no scores tensor); when decoding, one
            // block takes all the query heads of a key/value head, so the cache is read once for them.
            let ld = l.o.input_width().unwrap_or(nh * d);
            let scale = (1.0 / (d as f64).sqrt()) as f32;
            let rows = profile::section("attention: flash", dev, || {
                Ok(super::cuda_ops::flash_attention(&q, &k, &v, pads, scale, ld)?)
            })?;
            return l.o.forward(&rows.reshape((b, t, ld))?, sel);
        }
        let s = k.dim(2)?;
        // Grouped-query attention without copying K/V: heads j·g..(j+1)·g share kv head j.
        let g = nh / kvh;
        let q = q.reshape((b, kvh, g * t, d))?;
        let scores = profile::section("attention: q·kᵀ", dev, || Ok(q.matmul(&k.t()?)?))?; // [B, kvh, g·T, S]
        let scale = 1.0 / (d as f64).sqrt();
        let probs = profile::section("attention: softmax", dev, || match (&ctx.mask, &ctx.pads) {
            // As transformers' eager attention: scores, scale and mask in the model dtype,
            // softmax accumulated in f32 (candle's bf16/f16 softmax kernel accumulates in f32).
            (Some(mask), _) => {
                let scores = (scores.reshape((b, nh, t, s))? * scale)?.broadcast_add(mask)?;
                self.softmax(&scores)
            }
            // The same arithmetic in one in-place pass, the mask computed from the paddings.
            (None, Some(pads)) => {
                self.masked_softmax_(&scores.reshape((b, nh, t, s))?, pads, s - t, scale)?;
                Ok(scores.clone())
            }
            (None, None) => bail!("attention without a mask"),
        })?;
        let out = profile::section("attention: p·v", dev, || {
            Ok(probs.reshape((b, kvh, g * t, s))?.matmul(&v)?) // [B, kvh, g·T, D]
        })?;
        l.o.forward_heads(&out.reshape((b, nh, t, d))?, sel, self.fused())
    }

    /// RoPE on the first rotary_dim dims of each head, interleaved pairs (GPT-J style).
    fn apply_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let rd = self.cfg.rotary_dim;
        let d = self.cfg.head_dim;
        if rd == d {
            return self.rope_i(x, cos, sin);
        }
        let rot = self.rope_i(&x.narrow(D::Minus1, 0, rd)?.contiguous()?, cos, sin)?;
        Ok(Tensor::cat(&[rot, x.narrow(D::Minus1, rd, d - rd)?], D::Minus1)?)
    }

    /// cos/sin [B, T, rotary_dim/2] for positions counted from each row's first real token.
    fn rope(&self, pad: &[usize], offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let b = pad.len();
        let mut pos = Vec::with_capacity(b * t);
        for &p in pad {
            for j in 0..t {
                pos.push((offset + j).saturating_sub(p) as f32);
            }
        }
        let pos = Tensor::from_vec(pos, (b, t, 1), &self.device)?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        Ok((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?))
    }

    /// Additive mask [B, 1, T, S] in the model dtype: a query sees keys at or before it and not in padding.
    fn mask(&self, pad: &[usize], offset: usize, t: usize) -> Result<Tensor> {
        let b = pad.len();
        let s = offset + t;
        let neg = -1e30f32;
        let causal: Vec<f32> =
            (0..t).flat_map(|i| (0..s).map(move |j| if j <= offset + i { 0.0 } else { neg })).collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, s), &self.device)?;
        let padm: Vec<f32> = pad.iter().flat_map(|&p| (0..s).map(move |j| if j < p { neg } else { 0.0 })).collect();
        let padm = Tensor::from_vec(padm, (b, 1, 1, s), &self.device)?;
        Ok(causal.broadcast_add(&padm)?.to_dtype(self.dtype)?)
    }

    /// Whether the fused CUDA kernels run (kernels/fused.cu): on CUDA devices, outside training,
    /// unless GLM4_VERIFY_UNFUSED=1 asks for candle's own ops (to compare the two).
    fn fused(&self) -> bool {
        cfg!(feature = "cuda") && self.device.is_cuda() && !self.differentiable && !unfused_requested()
    }

    /// Whether attention runs the flash kernel, which holds no [B, heads, T, S] scores.
    pub fn uses_flash(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.fused() && flash_enabled() && super::cuda_ops::flash_fits(self.cfg.head_dim, self.dtype) {
            return true;
        }
        false
    }

    /// Whether norms run as the fused kernel (its 16-byte loads need a hidden size in whole packs).
    #[cfg(feature = "cuda")]
    fn fused_norm(&self) -> bool {
        self.fused() && super::cuda_ops::row_kernel_fits(self.cfg.hidden_size, self.dtype)
    }

    /// silu(gate) · up of the fused gate/up output [.., 2m] → [.., m] (on CUDA rows of `ld` values,
    /// zeros after the m: room for the down projection's LoRA columns).
    #[allow(unused_variables)]
    fn swiglu(&self, gu: &Tensor, m: usize, ld: Option<usize>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            return Ok(super::cuda_ops::swiglu(&gu.contiguous()?, ld)?);
        }
        Ok((candle_nn::ops::silu(&gu.narrow(D::Minus1, 0, m)?)? * gu.narrow(D::Minus1, m, m)?)?)
    }

    #[allow(unused_variables)]
    fn masked_softmax_(&self, scores: &Tensor, pads: &Tensor, offset: usize, scale: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        return Ok(super::cuda_ops::masked_softmax_(scores, pads, offset, scale as f32)?);
        #[cfg(not(feature = "cuda"))]
        bail!("the fused attention kernel needs the cuda build")
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_eps as f32;
        #[cfg(feature = "cuda")]
        if self.fused_norm() {
            return Ok(super::cuda_ops::rms_norm(x, w, eps, None)?);
        }
        Ok(if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, w, eps)?
        } else {
            candle_nn::ops::rms_norm(x, w, eps)?
        })
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.differentiable {
            candle_nn::ops::softmax(x, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(x)?
        })
    }

    /// Interleaved RoPE. x: [B, H, T, d], cos/sin: [B, T, d/2].
    fn rope_i(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if !self.differentiable {
            return Ok(candle_nn::rotary_emb::rope_i(x, cos, sin)?);
        }
        let (b, h, t, d) = x.dims4()?;
        let cos = cos.reshape((b, 1, t, d / 2, 1))?;
        let sin = sin.reshape((b, 1, t, d / 2, 1))?;
        let x = x.reshape((b, h, t, d / 2, 2))?;
        let (x0, x1) = (x.narrow(D::Minus1, 0, 1)?, x.narrow(D::Minus1, 1, 1)?);
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))?)
    }

    /// Embedding row count (vocabulary size).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// The last position's logits of every row of hidden [B, T, H] → [B, V] f32.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        self.wait_for_weights()?;
        if t == 1 {
            // Decoding: every row is a last position (no index to copy to the device).
            let rows = self.rms_norm(&hidden.reshape((b, h))?, &self.final_norm)?;
            return profile::section("logits", &self.device, || {
                Ok(rows.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
            });
        }
        let at: Vec<u32> = (0..b).map(|i| (i * t + t - 1) as u32).collect();
        self.logits_at(hidden, &at)
    }
}

/// The flash kernel for attention, unless GLM4_VERIFY_FLASH=0 (to compare with the eager path).
#[cfg(feature = "cuda")]
fn flash_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("GLM4_VERIFY_FLASH").is_none_or(|v| v != "0"))
}

/// Adapters stacked per linear on the host (f32), ready for `Glm::attach_prepared`: the work that
/// needs neither the device nor the weights, done while they get ready.
pub struct PreparedAdapters {
    count: usize,
    /// (layer, linear) of each stack, every linear of the model in order.
    keys: Vec<(usize, Target)>,
    stacks: Vec<Option<super::lora::HostStack>>,
    /// The stacks laid out for the upload in a foreseen dtype (`in_dtype`).
    flat: Option<super::lora::FlatStacks>,
}

impl PreparedAdapters {
    /// `adapters[k]`: adapter k's deltas (as `Glm::attach` takes them) on a model of config `cfg`.
    pub fn new(cfg: &ModelConfig, adapters: &[Vec<(usize, Target, LoraDelta)>]) -> Result<Self> {
        let mut keys = Vec::new();
        let mut stacks = Vec::new();
        for li in 0..cfg.num_layers {
            for t in [Target::Qkv, Target::O, Target::GateUp, Target::Down] {
                let [out, _] = t.dims(cfg);
                let per: Vec<Vec<LoraDelta>> = adapters
                    .iter()
                    .map(|ds| ds.iter().filter(|(l, tt, _)| *l == li && *tt == t).map(|(_, _, d)| d.clone()).collect())
                    .collect();
                keys.push((li, t));
                stacks.push(super::lora::HostStack::build(out, &per)?);
            }
        }
        Ok(PreparedAdapters { count: adapters.len(), keys, stacks, flat: None })
    }

    /// Also lays the stacks out for a CUDA upload in `dtype`, the run's likely dtype: attaching in
    /// that dtype then only copies them (converting ~40 MB of stacks on a 9B model takes tens of
    /// milliseconds of the host, which otherwise come after the device has started).
    pub fn in_dtype(mut self, dtype: DType) -> Result<Self> {
        self.flat = Some(super::lora::HostStack::flatten(&self.stacks, dtype)?);
        Ok(self)
    }
}

/// The columns each linear's input gains on the side path of `adapters` (as `attach` takes them):
/// the room `Glm::load_with_room` leaves for them. Linears no adapter targets are not listed.
pub fn side_room(
    adapters: &[Vec<(usize, Target, LoraDelta)>],
    device: &Device,
) -> Result<HashMap<(usize, Target), usize>> {
    let mut rank: HashMap<(usize, Target), (usize, usize)> = HashMap::new(); // (in, ΣR)
    for (layer, t, d) in adapters.iter().flatten() {
        let (r, inp) = d.a.dims2()?;
        rank.entry((*layer, *t)).or_insert((inp, 0)).1 += r;
    }
    Ok(rank.into_iter().map(|(k, (inp, r))| (k, super::lora::side_width(inp, r, device))).collect())
}

/// (name, shape) pairs as `TensorSource::load_stacked` takes them.
fn named(v: &[(String, Vec<usize>)]) -> Vec<(&str, &[usize])> {
    v.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect()
}

/// GLM4_VERIFY_UNFUSED=1, read once (the forward pass asks per layer).
fn unfused_requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("GLM4_VERIFY_UNFUSED").is_some_and(|v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer cache of `rows` rows and `len` positions, keys base, base + 1, … (values × 10).
    fn cache_of(rows: usize, len: usize, base: f32) -> Cache {
        let mut c = Cache { kv: vec![None], len: 0, capacity: len };
        let keys: Vec<f32> = (0..rows * len).map(|i| base + i as f32).collect();
        let k = Tensor::from_vec(keys, (rows, 1, len, 1), &Device::Cpu).unwrap();
        c.append(0, &k, &(&k * 10.0).unwrap()).unwrap();
        c.len = len;
        c
    }

    #[test]
    fn stack_right_aligns_the_parts_and_leaves_room_for_new_positions() {
        let (c, shifts) = Cache::stack(vec![cache_of(2, 3, 1.0), cache_of(1, 5, 100.0)], 2).unwrap();
        assert_eq!(shifts, vec![2, 0]);
        assert_eq!((c.len, c.capacity), (5, 7));
        let Some((k, v)) = &c.kv[0] else { panic!("layer 0 missing") };
        let rows = |t: &Tensor| -> Vec<Vec<f32>> { t.squeeze(3).unwrap().squeeze(1).unwrap().to_vec2().unwrap() };
        let want = vec![
            vec![0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0],
            vec![0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0],
            vec![100.0, 101.0, 102.0, 103.0, 104.0, 0.0, 0.0],
        ];
        assert_eq!(rows(k), want);
        let want_v: Vec<Vec<f32>> = want.iter().map(|r| r.iter().map(|x| x * 10.0).collect()).collect();
        assert_eq!(rows(v), want_v);
    }
}
