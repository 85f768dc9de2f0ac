//! LoRA application: merged into the weight, or as an unmerged side path selectable per batch row.
//!
//! Every LoRA-able linear of the model holds the deltas of all attached adapters stacked:
//! `a` = [ΣR, in] (scaling folded in), `b` = [out, ΣR]. A row of the batch that uses adapter k
//! keeps only adapter k's R columns of `x·aᵀ`, so base rows and rows of several adapters run in one
//! pass over one copy of the base weights. On CUDA, where each adapter's rows are a few contiguous
//! runs (the engine lays rows out by variant), `x·aᵀ` is computed on those rows only; otherwise a
//! 0/1 mask zeroes the other adapters' columns.

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// One low-rank delta on (part of) a fused linear: rows `out_start..out_start+b.rows` of its output.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub out_start: usize,
    /// [r, in], f32
    pub a: Tensor,
    /// [len, r], f32
    pub b: Tensor,
    pub scale: f64,
}

impl LoraDelta {
    /// s·B·A, computed in f32 as PEFT's `get_delta_weight` does: [len, in].
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.to_dtype(DType::F32)?.matmul(&self.a.to_dtype(DType::F32)?)? * self.scale)?)
    }
}

/// Columns `start..start+len` of the stacked rank dimension belong to adapter `adapter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    pub adapter: usize,
    pub start: usize,
    pub len: usize,
}

/// The stacked unmerged deltas of one linear.
#[derive(Debug, Clone)]
pub struct LoraStack {
    /// [ΣR, in] in the model dtype, scale folded in.
    pub a: Tensor,
    /// [out, width] in the model dtype: ΣR columns, then zeros up to `width`.
    pub b: Tensor,
    pub segments: Vec<Segment>,
    /// Columns the side path adds to the linear's input. On CUDA, ΣR padded so that in + width is
    /// a multiple of 64: cuBLAS's kernels run k in steps of 64, and k = 4096 + 8 costs 5–10% of a
    /// GEMM's speed against k = 4096 + 64 (examples/gemm_shapes on an H200).
    pub width: usize,
}

impl LoraStack {
    /// Host stacks (`HostStack::build`) on the device in `dtype`. They go in one copy: a copy from
    /// pageable memory waits behind everything queued on the copy engine (a streamed load's
    /// weights), so one copy instead of two per linear. `flat`: the stacks already laid out for
    /// that copy (`HostStack::flatten`), used when in `dtype`.
    pub fn upload_all(
        stacks: Vec<Option<HostStack>>,
        flat: Option<FlatStacks>,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<Option<Self>>> {
        let moved = if device.is_cuda() {
            let flat = match flat {
                Some(f) if f.dtype == dtype => f,
                _ => HostStack::flatten(&stacks, dtype)?,
            };
            let all = flat.all.to_device(device)?;
            let mut at = 0;
            let mut parts = Vec::new();
            for h in stacks.iter().flatten() {
                for t in [&h.a, &h.b] {
                    let n = t.elem_count();
                    parts.push(all.narrow(0, at, n)?.reshape(t.shape())?);
                    at += n;
                }
            }
            parts
        } else {
            let parts = stacks.iter().flatten().flat_map(|h| [&h.a, &h.b]);
            parts.map(|t| t.to_dtype(dtype)?.to_device(device)).collect::<candle_core::Result<_>>()?
        };
        let mut moved = moved.into_iter();
        let mut next = || moved.next().ok_or_else(|| anyhow::anyhow!("LoRA stacks: a tensor went missing"));
        let mut out = Vec::with_capacity(stacks.len());
        for h in stacks {
            let Some(HostStack { segments, .. }) = h else {
                out.push(None);
                continue;
            };
            let (a, mut b) = (next()?, next()?);
            let (rows, rank) = b.dims2()?;
            let width = side_width(a.dim(1)?, rank, device);
            if width > rank {
                // Padded on the device: the zeros are most of B's columns.
                b = Tensor::cat(&[&b, &Tensor::zeros((rows, width - rank), dtype, device)?], 1)?;
            }
            out.push(Some(LoraStack { a, b, segments, width }));
        }
        Ok(out)
    }

    pub fn rank(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// One linear's stacked deltas on the host, in f32, before they go to the device (`LoraStack::upload_all`).
pub struct HostStack {
    /// [ΣR, in], scale folded in.
    a: Tensor,
    /// [out, ΣR]
    b: Tensor,
    segments: Vec<Segment>,
}

impl HostStack {
    /// Stacks `per_adapter[k]`, adapter k's deltas on a linear of `out` outputs; None when no adapter
    /// has a delta there. Host work only, so it can run before the device is ready.
    pub fn build(out: usize, per_adapter: &[Vec<LoraDelta>]) -> Result<Option<Self>> {
        let mut a_rows = Vec::new();
        let mut b_cols: Vec<Tensor> = Vec::new();
        let mut segments = Vec::new();
        let mut start = 0;
        let cpu = &Device::Cpu;
        for (k, deltas) in per_adapter.iter().enumerate() {
            let seg_start = start;
            for d in deltas {
                let (len, r) = d.b.dims2()?;
                a_rows.push((d.a.to_device(cpu)?.to_dtype(DType::F32)? * d.scale)?);
                // Place B in its output rows, zero elsewhere (block-diagonal for fused q/k/v parts).
                let mut parts = Vec::new();
                if d.out_start > 0 {
                    parts.push(Tensor::zeros((d.out_start, r), DType::F32, cpu)?);
                }
                parts.push(d.b.to_device(cpu)?.to_dtype(DType::F32)?);
                if d.out_start + len < out {
                    parts.push(Tensor::zeros((out - d.out_start - len, r), DType::F32, cpu)?);
                }
                b_cols.push(Tensor::cat(&parts, 0)?);
                start += r;
            }
            if start > seg_start {
                segments.push(Segment { adapter: k, start: seg_start, len: start - seg_start });
            }
        }
        if segments.is_empty() {
            return Ok(None);
        }
        Ok(Some(HostStack { a: Tensor::cat(&a_rows, 0)?, b: Tensor::cat(&b_cols, 1)?, segments }))
    }

    /// `stacks` laid out for `LoraStack::upload_all` in `dtype` (host work: a thread can do it
    /// before the device is ready, when the run's dtype can be foreseen).
    pub fn flatten(stacks: &[Option<HostStack>], dtype: DType) -> Result<FlatStacks> {
        let parts: Vec<Tensor> = stacks
            .iter()
            .flatten()
            .flat_map(|h| [&h.a, &h.b])
            .map(|t| t.flatten_all()?.to_dtype(dtype))
            .collect::<candle_core::Result<_>>()?;
        let all = if parts.is_empty() { Tensor::zeros(0, dtype, &Device::Cpu)? } else { Tensor::cat(&parts, 0)? };
        Ok(FlatStacks { dtype, all })
    }
}

/// Every stack's A then B, in a dtype, one after the other in one host buffer: what
/// `LoraStack::upload_all` copies to the device.
pub struct FlatStacks {
    dtype: DType,
    /// 1-D, on the host
    all: Tensor,
}

/// The side path's columns for a linear of `inp` inputs and stacked rank `rank` (`LoraStack::width`).
pub fn side_width(inp: usize, rank: usize, device: &Device) -> usize {
    if device.is_cuda() {
        (inp + rank).next_multiple_of(64) - inp
    } else {
        rank
    }
}

/// Which adapter each batch row uses (`None` = the base model), with cached row masks.
pub struct RowSelection {
    rows: Vec<Option<usize>>,
    device: Device,
    dtype: DType,
    masks: RefCell<HashMap<Vec<Segment>, Tensor>>,
}

impl RowSelection {
    pub fn new(rows: Vec<Option<usize>>, device: &Device, dtype: DType) -> Self {
        RowSelection { rows, device: device.clone(), dtype, masks: RefCell::new(HashMap::new()) }
    }

    pub fn rows(&self) -> &[Option<usize>] {
        &self.rows
    }

    /// The row ranges that use each of the stack's adapters, when they are at most `MAX_RUNS`
    /// contiguous runs (`None` otherwise: the per-row mask is cheaper then). Base rows and rows of
    /// adapters the stack has no delta for are in no run.
    pub fn runs(&self, stack: &LoraStack) -> Option<Vec<(std::ops::Range<usize>, Segment)>> {
        const MAX_RUNS: usize = 8;
        let mut out: Vec<(std::ops::Range<usize>, Segment)> = Vec::new();
        let mut start = 0;
        while start < self.rows.len() {
            let row = self.rows[start];
            let end = start + self.rows[start..].iter().take_while(|r| **r == row).count();
            if let Some(seg) = row.and_then(|k| stack.segments.iter().find(|s| s.adapter == k)) {
                if out.len() == MAX_RUNS {
                    return None;
                }
                out.push((start..end, *seg));
            }
            start = end;
        }
        Some(out)
    }

    /// How the rows use a stack: not at all, all with its only adapter, or per row ([B, 1, ΣR] mask).
    fn mask(&self, stack: &LoraStack) -> Result<Mask> {
        let used: Vec<bool> = stack.segments.iter().map(|s| self.rows.contains(&Some(s.adapter))).collect();
        if !used.iter().any(|u| *u) {
            return Ok(Mask::Skip);
        }
        if stack.segments.len() == 1 && self.rows.iter().all(|r| *r == Some(stack.segments[0].adapter)) {
            return Ok(Mask::All);
        }
        let mut cache = self.masks.borrow_mut();
        if let Some(m) = cache.get(&stack.segments) {
            return Ok(Mask::Rows(m.clone()));
        }
        let total = stack.rank();
        let mut m = vec![0f32; self.rows.len() * total];
        for (b, row) in self.rows.iter().enumerate() {
            for s in &stack.segments {
                if *row == Some(s.adapter) {
                    m[b * total + s.start..b * total + s.start + s.len].fill(1.0);
                }
            }
        }
        let t = Tensor::from_vec(m, (self.rows.len(), 1, total), &self.device)?.to_dtype(self.dtype)?;
        cache.insert(stack.segments.clone(), t.clone());
        Ok(Mask::Rows(t))
    }
}

enum Mask {
    Skip,
    All,
    Rows(Tensor),
}

/// A linear layer y = x·Wᵀ + bias (+ LoRA side path).
///
/// With adapters attached the weight is stored augmented, [W | B] of shape [out, in + width], and the
/// side path rides the main GEMM: y = [x | h]·[W | B]ᵀ with h = (x·Aᵀ) masked per row. One GEMM
/// with f32 accumulation instead of a second low-rank GEMM and two passes over [N, out].
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in], or [out, in + width] when `lora` is set.
    weight: Tensor,
    in_features: usize,
    /// [out]
    pub bias: Option<Tensor>,
    lora: Option<LoraStack>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::with_room(weight, bias, 0)
    }

    /// A linear whose weight [out, in + room] has `room` columns left for a LoRA stack of that
    /// width (`set_lora` writes it there).
    pub fn with_room(weight: Tensor, bias: Option<Tensor>, room: usize) -> Result<Self> {
        let (_, cols) = weight.dims2()?;
        if room > cols {
            anyhow::bail!("room for {room} side-path columns in a weight of {cols}");
        }
        Ok(Linear { weight, in_features: cols - room, bias, lora: None })
    }

    /// Bytes of its tensors on the device (weight with its room, bias, LoRA stack).
    pub fn bytes(&self) -> usize {
        let stack = self.lora.as_ref().map_or(0, |s| super::tensor_bytes(&s.a) + super::tensor_bytes(&s.b));
        super::tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, super::tensor_bytes) + stack
    }

    /// Columns of the weight after the base's.
    fn room(&self) -> usize {
        self.weight.dims()[1] - self.in_features
    }

    /// Whether `set_lora(stack)` writes into the weight's room (or needs nothing) rather than
    /// rebuilding the weight from the base's values.
    pub fn fits(&self, stack: Option<&LoraStack>) -> bool {
        self.room() == stack.map_or(0, |s| s.width)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The base weight [out, in] (a view when the weight has side-path columns).
    pub fn base_weight(&self) -> Result<Tensor> {
        Ok(if self.room() > 0 { self.weight.narrow(1, 0, self.in_features)? } else { self.weight.clone() })
    }

    /// Attaches stacked adapters (or removes them with None): their B goes into the weight's room
    /// when it fits (`fits`), else the weight is rebuilt as [W | B].
    pub fn set_lora(&mut self, stack: Option<LoraStack>) -> Result<()> {
        match &stack {
            Some(s) if self.fits(Some(s)) => self.weight.slice_set(&s.b, 1, self.in_features)?,
            None if self.fits(None) => {}
            _ => {
                let base = if self.room() > 0 { self.base_weight()?.contiguous()? } else { self.weight.clone() };
                self.weight = match &stack {
                    Some(s) => Tensor::cat(&[&base, &s.b], 1)?,
                    None => base,
                };
            }
        }
        self.lora = stack;
        Ok(())
    }

    /// x: [B, T, in] → [B, T, out]. With adapters attached, x may instead be rows of `input_width()`
    /// values, [x | 0], written so by the kernel that produced x: the side path's columns are then
    /// filled in place; otherwise [x | h | 0] is built here.
    pub fn forward(&self, x: &Tensor, sel: &RowSelection) -> Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let x2 = x.reshape((b * t, inp))?;
        let input = match &self.lora {
            None => x2,
            Some(stack) if inp == self.in_features + stack.width => {
                self.fill_h(&x2, stack, sel, t)?;
                x2
            }
            Some(stack) => self.lora_input(&x2, stack, sel, t)?,
        };
        self.gemm(&input, b, t, x.device())
    }

    /// As `forward` for attention's heads-first output x [B, nh, T, D], merged to [B, T, nh·D] first
    /// (on CUDA by a kernel that leaves room for the LoRA columns).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn forward_heads(&self, x: &Tensor, sel: &RowSelection, fused: bool) -> Result<Tensor> {
        let (b, nh, t, d) = x.dims4()?;
        #[cfg(feature = "cuda")]
        if let (Some(ld), true) = (self.input_width(), fused) {
            let merged = super::profile::section("attention: merge heads", x.device(), || {
                Ok(super::cuda_ops::merge_heads(x, ld)?.reshape((b, t, ld))?)
            })?;
            return self.forward(&merged, sel);
        }
        let merged = super::profile::section("attention: merge heads", x.device(), || {
            Ok(x.transpose(1, 2)?.reshape((b, t, nh * d))?)
        })?;
        self.forward(&merged, sel)
    }

    /// With adapters attached, the row width of an input that has room for the side path's columns
    /// ([x | h | 0], k a multiple of 64 on CUDA): what a kernel producing this linear's input writes.
    pub fn input_width(&self) -> Option<usize> {
        self.lora.as_ref().map(|s| self.in_features + s.width)
    }

    /// Fills h = x·Aᵀ (masked per row) into rows [x | 0] of `input_width()` values, in place (CUDA).
    /// Where the rows of each adapter are a few contiguous runs (the engine lays scoring batches
    /// and decoding groups out by variant), h is computed on those rows only, with that adapter's
    /// columns of A: base rows cost nothing and no mask is needed.
    #[allow(unused_variables)]
    fn fill_h(&self, xh: &Tensor, stack: &LoraStack, sel: &RowSelection, t: usize) -> Result<()> {
        super::profile::section("lora", xh.device(), || {
            #[cfg(feature = "cuda")]
            {
                if let Some(runs) = sel.runs(stack) {
                    for (rows, seg) in runs {
                        let x = xh.narrow(0, rows.start * t, rows.len() * t)?;
                        super::cuda_gemm::lora_h_(&x, &stack.a.narrow(0, seg.start, seg.len)?, seg.start)?;
                    }
                    return Ok(());
                }
                let mask = sel.mask(stack)?;
                if !matches!(mask, Mask::Skip) {
                    super::cuda_gemm::lora_h_(xh, &stack.a, 0)?;
                }
                if let Mask::Rows(m) = mask {
                    super::cuda_ops::lora_mask_(xh, &m, self.in_features, t)?;
                }
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            anyhow::bail!("LoRA columns are filled in place only on CUDA")
        })
    }

    /// [x | h | 0] for x [N, in]: its masked x·Aᵀ, zeros up to the stack's width (candle's ops).
    fn lora_input(&self, x: &Tensor, stack: &LoraStack, sel: &RowSelection, t: usize) -> Result<Tensor> {
        let dev = x.device();
        super::profile::section("lora", dev, || {
            let (n, _) = x.dims2()?;
            let b = n / t;
            let r = stack.rank();
            let h = match sel.mask(stack)? {
                Mask::Skip => Tensor::zeros((n, r), x.dtype(), dev)?,
                Mask::All => x.matmul(&stack.a.t()?)?,
                Mask::Rows(m) => x.matmul(&stack.a.t()?)?.reshape((b, t, r))?.broadcast_mul(&m)?.reshape((n, r))?,
            };
            if stack.width > r {
                let pad = Tensor::zeros((n, stack.width - r), x.dtype(), dev)?;
                return Ok(Tensor::cat(&[x, &h, &pad], 1)?);
            }
            Ok(Tensor::cat(&[x, &h], 1)?)
        })
    }

    /// input [B·T, in (+ width)] · weightᵀ (+ bias) → [B, T, out]
    fn gemm(&self, input: &Tensor, b: usize, t: usize, dev: &Device) -> Result<Tensor> {
        // Room left for adapters that were never attached: the base's columns only.
        let weight =
            if self.lora.is_none() && self.room() > 0 { &self.base_weight()?.contiguous()? } else { &self.weight };
        super::profile::section("gemm", dev, || {
            #[cfg(feature = "cuda")]
            if dev.is_cuda() && matches!(input.dtype(), DType::BF16 | DType::F16) && lt_requested() {
                let y = super::cuda_gemm::linear(&input.contiguous()?, weight, self.bias.as_ref())?;
                return Ok(y.reshape((b, t, self.out_features()))?);
            }
            let mut y = input.matmul(&weight.t()?)?;
            if let Some(bias) = &self.bias {
                y = y.broadcast_add(bias)?;
            }
            Ok(y.reshape((b, t, self.out_features()))?)
        })
    }

    /// Merges deltas into the weight (W + s·B·A in f32, then cast back), as `merge_and_unload`.
    pub fn merge(&mut self, deltas: &[LoraDelta]) -> Result<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        if self.lora.is_some() {
            anyhow::bail!("cannot merge into a linear that has adapters attached");
        }
        let dtype = self.weight.dtype();
        let mut w = self.base_weight()?.to_dtype(DType::F32)?;
        for d in deltas {
            let dw = d.delta_weight()?.to_device(w.device())?;
            let len = dw.dims()[0];
            let cur = w.narrow(0, d.out_start, len)?;
            let merged = (cur + dw)?;
            w = w.slice_assign(&[d.out_start..d.out_start + len, 0..w.dims()[1]], &merged)?;
        }
        self.weight = w.to_dtype(dtype)?;
        Ok(())
    }
}

/// The linears' bf16/f16 GEMMs run through cuBLASLt (src/model/cuda_gemm.rs) unless
/// GLM4_VERIFY_GEMM=cublas asks for candle's matmul (to compare the two).
#[cfg(feature = "cuda")]
fn lt_requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLM4_VERIFY_GEMM").map_or(true, |v| v != "cublas"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(segments: Vec<Segment>) -> LoraStack {
        let r: usize = segments.iter().map(|s| s.len).sum();
        let a = Tensor::zeros((r, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, r), DType::F32, &Device::Cpu).unwrap();
        LoraStack { a, b, segments, width: r }
    }

    #[test]
    fn runs_are_each_adapters_contiguous_rows() {
        let s0 = Segment { adapter: 0, start: 0, len: 2 };
        let s2 = Segment { adapter: 2, start: 2, len: 3 };
        let st = stack(vec![s0, s2]);
        // Adapter 1 has no delta on this linear: its rows, like the base rows, are in no run.
        let sel = RowSelection::new(
            vec![None, None, Some(0), Some(0), Some(1), Some(2), Some(2), Some(2)],
            &Device::Cpu,
            DType::F32,
        );
        assert_eq!(sel.runs(&st), Some(vec![(2..4, s0), (5..8, s2)]));
        let base = RowSelection::new(vec![None; 3], &Device::Cpu, DType::F32);
        assert_eq!(base.runs(&st), Some(vec![]));
        // Interleaved rows make too many runs: the mask is used instead.
        let mixed: Vec<Option<usize>> = (0..20).map(|i| (i % 2 == 1).then_some(0)).collect();
        assert_eq!(RowSelection::new(mixed, &Device::Cpu, DType::F32).runs(&st), None);
    }
}
