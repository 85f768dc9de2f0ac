//! LoRA application: merged into the weight, or as an unmerged side path selectable per batch row.
//!
//! Every LoRA-able linear of the model holds the deltas of all attached adapters stacked:
//! `a` = [ΣR, in] (scaling folded in), `b` = [out, ΣR]. A row of the batch that uses adapter k
//! keeps only adapter k's R columns of `x·aᵀ` (a 0/1 mask), so base rows and rows of several
//! adapters run in one pass over one copy of the base weights.

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
    /// [out, ΣR] in the model dtype.
    pub b: Tensor,
    pub segments: Vec<Segment>,
}

impl LoraStack {
    /// Stacks the deltas of several adapters: `per_adapter[k]` holds adapter k's deltas on this linear.
    pub fn build(out: usize, per_adapter: &[Vec<LoraDelta>], dtype: DType, device: &Device) -> Result<Option<Self>> {
        let mut a_rows = Vec::new();
        let mut b_cols: Vec<Tensor> = Vec::new();
        let mut segments = Vec::new();
        let mut start = 0;
        for (k, deltas) in per_adapter.iter().enumerate() {
            let seg_start = start;
            for d in deltas {
                let (len, r) = d.b.dims2()?;
                a_rows.push((d.a.to_dtype(DType::F32)? * d.scale)?);
                // Place B in its output rows, zero elsewhere (block-diagonal for fused q/k/v parts).
                let dev = d.b.device();
                let mut parts = Vec::new();
                if d.out_start > 0 {
                    parts.push(Tensor::zeros((d.out_start, r), DType::F32, dev)?);
                }
                parts.push(d.b.to_dtype(DType::F32)?);
                if d.out_start + len < out {
                    parts.push(Tensor::zeros((out - d.out_start - len, r), DType::F32, dev)?);
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
        Ok(Some(LoraStack {
            a: Tensor::cat(&a_rows, 0)?.to_dtype(dtype)?.to_device(device)?,
            b: Tensor::cat(&b_cols, 1)?.to_dtype(dtype)?.to_device(device)?,
            segments,
        }))
    }

    pub fn rank(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
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
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in]
    pub weight: Tensor,
    /// [out]
    pub bias: Option<Tensor>,
    pub lora: Option<LoraStack>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: [B, T, in] → [B, T, out]
    pub fn forward(&self, x: &Tensor, sel: &RowSelection) -> Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let x2 = x.reshape((b * t, inp))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut y = y.reshape((b, t, self.out_features()))?;
        if let Some(stack) = &self.lora {
            let h = match sel.mask(stack)? {
                Mask::Skip => None,
                Mask::All => Some(x2.matmul(&stack.a.t()?)?),
                Mask::Rows(m) => {
                    let h = x2.matmul(&stack.a.t()?)?.reshape((b, t, stack.rank()))?;
                    Some(h.broadcast_mul(&m)?.reshape((b * t, stack.rank()))?)
                }
            };
            if let Some(h) = h {
                let d = h.matmul(&stack.b.t()?)?.reshape((b, t, self.out_features()))?;
                y = (y + d)?;
            }
        }
        Ok(y)
    }

    /// Merges deltas into the weight (W + s·B·A in f32, then cast back), as `merge_and_unload`.
    pub fn merge(&mut self, deltas: &[LoraDelta]) -> Result<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let dtype = self.weight.dtype();
        let mut w = self.weight.to_dtype(DType::F32)?;
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
