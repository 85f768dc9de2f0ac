//! Fused CUDA kernels (kernels/fused.cu) as candle ops, used by the forward pass on CUDA devices
//! instead of chains of candle ops that each pass over a large tensor.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor,
};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "glm4_verify_fused";

/// The `name` and the CPU refusal of a CUDA-only candle op.
macro_rules! cuda_only {
    (op1, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($name, " runs on CUDA only"))
        }
    };
    (op2, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($name, " runs on CUDA only"))
        }
    };
    (op3, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!($name, " runs on CUDA only"))
        }
    };
    (inplace2, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!(concat!($name, " runs on CUDA only"))
        }
    };
}

pub(crate) use cuda_only;

/// Runs `$body` with `$t` the Rust type of `$dtype` (bf16, f16 or f32).
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            d => candle_core::bail!("fused kernels take f32, bf16 or f16, not {d:?}"),
        }
    };
}
pub(crate) use by_dtype;

/// A contiguous input as a typed device view; `align` elements of alignment for 16-byte loads.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
    align: usize,
) -> candle_core::Result<CudaView<'a, T>> {
    let (a, b) = contiguous(l, what)?;
    if !a.is_multiple_of(align) {
        candle_core::bail!("{what}: input offset {a} is not a multiple of {align} elements");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Elements of T in 16 bytes (the kernels' vector loads).
fn pack(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => candle_core::bail!("fused kernels take f32, bf16 or f16, not {d:?}"),
    }
}

fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

/// silu(gate) · up for a fused gate/up output [.., 2m] → [.., m], or [.., ld] with zeros after the
/// m values (room for the down projection's LoRA columns).
pub fn swiglu(gu: &Tensor, ld: Option<usize>) -> candle_core::Result<Tensor> {
    gu.apply_op1_no_bwd(&SwiGlu { ld })
}

struct SwiGlu {
    ld: Option<usize>,
}

impl SwiGlu {
    fn go<T: CudaDType + DeviceRepr>(
        &self,
        s: &CudaStorage,
        l: &Layout,
        rows: usize,
        m: usize,
        ld: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device().clone();
        // The kernel's 16-byte loads (used when m is whole packs) need a pack-aligned start.
        let align = if m.is_multiple_of(pack(s.dtype())) { pack(s.dtype()) } else { 1 };
        let src = view::<T>(s, l, "swiglu", align)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * ld)? };
        let func = dev.get_or_load_custom_func(&format!("swiglu_{}", suffix(s.dtype())?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.clamp(1, 1 << 30) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        let (rows, m, ld) = (rows as i64, m as i64, ld as i64);
        b.arg(&src);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&m);
        b.arg(&ld);
        // SAFETY: argument types match the kernel's signature; one block per row.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for SwiGlu {
    cuda_only!(op1, "fused-swiglu");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let two_m = dims.pop().unwrap_or(0);
        let m = two_m / 2;
        let rows = l.shape().elem_count() / two_m.max(1);
        let ld = self.ld.unwrap_or(m);
        if ld < m {
            candle_core::bail!("swiglu: rows of {ld} for {m} values");
        }
        let out = by_dtype!(s.dtype(), T => self.go::<T>(s, l, rows, m, ld)?);
        dims.push(ld);
        Ok((out, Shape::from(dims)))
    }
}

/// In place over scores [B, H, T, S] (contiguous): × scale, causal + left-padding mask (`pad` [B]
/// u32 on the device, `offset` = positions already cached), softmax over S in f32.
pub fn masked_softmax_(scores: &Tensor, pad: &Tensor, offset: usize, scale: f32) -> candle_core::Result<()> {
    scores.inplace_op2(pad, &MaskedSoftmax { offset, scale })
}

struct MaskedSoftmax {
    offset: usize,
    scale: f32,
}

impl MaskedSoftmax {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        x: &mut CudaSlice<T>,
        (start, end): (usize, usize),
        pad: &CudaView<u32>,
        dev: &CudaDevice,
        dims: (usize, usize, usize, usize),
        name: &str,
    ) -> candle_core::Result<()> {
        let (b, h, t, s) = dims;
        let mut x = x.slice_mut(start..end);
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // Rows of up to 12k keys stay in shared memory (48 KB): read once, exp taken once.
        let cached = s <= 12 * 1024;
        let smem = if cached { (s * 4) as u32 } else { 0 };
        let cfg = LaunchConfig { grid_dim: ((b * h * t) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem };
        let mut bld = func.builder();
        let (h, t, s, off, cached) = (h as i32, t as i32, s as i32, self.offset as i32, cached as i32);
        bld.arg(&mut x);
        bld.arg(pad);
        bld.arg(&h);
        bld.arg(&t);
        bld.arg(&s);
        bld.arg(&off);
        bld.arg(&self.scale);
        bld.arg(&cached);
        // SAFETY: argument types match the kernel's signature; one block per row of S elements.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp2 for MaskedSoftmax {
    cuda_only!(inplace2, "fused-masked-softmax");

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout, p: &CudaStorage, pl: &Layout) -> candle_core::Result<()> {
        let offs = contiguous(l, "masked softmax")?;
        let (pstart, pend) = contiguous(pl, "masked softmax pads")?;
        let (b, h, t, sl) = l.shape().dims4()?;
        if pend - pstart != b {
            candle_core::bail!("masked softmax: {} pads for {b} rows", pend - pstart);
        }
        let dev = s.device().clone();
        let pad = p.as_cuda_slice::<u32>()?.slice(pstart..pend);
        let name = format!("masked_softmax_{}", suffix(s.dtype())?);
        let dims = (b, h, t, sl);
        match s.dtype() {
            DType::BF16 => self.run(s.as_cuda_slice_mut::<bf16>()?, offs, &pad, &dev, dims, &name),
            DType::F16 => self.run(s.as_cuda_slice_mut::<f16>()?, offs, &pad, &dev, dims, &name),
            _ => self.run(s.as_cuda_slice_mut::<f32>()?, offs, &pad, &dev, dims, &name),
        }
    }
}

/// Splits qkv [B, T, (nh + 2·kvh)·D] into q [B, nh, T, D], k, v [B, kvh, T, D] (contiguous), with
/// interleaved RoPE on the first `rd` dims of q and k heads (cos/sin [B, T, rd/2], model dtype).
pub fn qkv_rope(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: (usize, usize, usize),
    rd: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (nh, kvh, d) = heads;
    let (b, t, _) = qkv.dims3()?;
    let flat = qkv.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &QkvRope { nh, kvh, d, rd })?;
    let (q_len, kv_len) = (b * nh * t * d, b * kvh * t * d);
    let q = flat.narrow(0, 0, q_len)?.reshape((b, nh, t, d))?;
    let k = flat.narrow(0, q_len, kv_len)?.reshape((b, kvh, t, d))?;
    let v = flat.narrow(0, q_len + kv_len, kv_len)?.reshape((b, kvh, t, d))?;
    Ok((q, k, v))
}

struct QkvRope {
    nh: usize,
    kvh: usize,
    d: usize,
    rd: usize,
}

impl QkvRope {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        x: (&CudaSlice<T>, (usize, usize)),
        cos: (&CudaSlice<T>, (usize, usize)),
        sin: (&CudaSlice<T>, (usize, usize)),
        dev: &CudaDevice,
        (b, t): (usize, usize),
        name: &str,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = b * t * (self.nh + 2 * self.kvh) * self.d;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (x, cos, sin) =
            (x.0.slice(x.1 .0..x.1 .1), cos.0.slice(cos.1 .0..cos.1 .1), sin.0.slice(sin.1 .0..sin.1 .1));
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // One block per token (the kernel strides over more than 2^31 - 1).
        let grid = (b * t).clamp(1, i32::MAX as usize) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut bld = func.builder();
        let ints = [b, t, self.nh, self.kvh, self.d, self.rd].map(|v| v as i32);
        bld.arg(&x);
        bld.arg(&cos);
        bld.arg(&sin);
        bld.arg(&out);
        for v in &ints {
            bld.arg(v);
        }
        // SAFETY: argument types match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(out)
    }
}

/// The three inputs of `QkvRope` with their contiguous offsets.
type Inputs<'a> = (&'a CudaStorage, (usize, usize), &'a CudaStorage, (usize, usize), &'a CudaStorage, (usize, usize));

impl QkvRope {
    fn typed<T: CudaDType + DeviceRepr>(
        &self,
        (x, xo, c, co, s, so): Inputs,
        dev: &CudaDevice,
        bt: (usize, usize),
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let out = self.run(
            (x.as_cuda_slice::<T>()?, xo),
            (c.as_cuda_slice::<T>()?, co),
            (s.as_cuda_slice::<T>()?, so),
            dev,
            bt,
            name,
        )?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for QkvRope {
    cuda_only!(op3, "fused-qkv-rope");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, t, w) = xl.shape().dims3()?;
        if w != (self.nh + 2 * self.kvh) * self.d
            || self.rd > self.d
            || !self.d.is_multiple_of(2)
            || !self.rd.is_multiple_of(2)
        {
            candle_core::bail!(
                "qkv/rope: width {w} for {} + 2·{} heads of {} ({} rotary)",
                self.nh,
                self.kvh,
                self.d,
                self.rd
            );
        }
        if cl.shape().elem_count() != b * t * self.rd / 2 || sl.shape().elem_count() != b * t * self.rd / 2 {
            candle_core::bail!("qkv/rope: cos/sin of {:?} for [{b}, {t}, {}]", cl.dims(), self.rd / 2);
        }
        let (xo, co, so) =
            (contiguous(xl, "qkv/rope")?, contiguous(cl, "qkv/rope cos")?, contiguous(sl, "qkv/rope sin")?);
        if !xo.0.is_multiple_of(2) {
            // The kernel reads (x0, x1) pairs as one aligned value.
            candle_core::bail!("qkv/rope: input starts at odd offset {}", xo.0);
        }
        let dev = x.device().clone();
        let name = format!("qkv_rope_{}", suffix(x.dtype())?);
        let n = b * t * (self.nh + 2 * self.kvh) * self.d;
        let args = (x, xo, c, co, s, so);
        let out = match x.dtype() {
            DType::BF16 => self.typed::<bf16>(args, &dev, (b, t), &name)?,
            DType::F16 => self.typed::<f16>(args, &dev, (b, t), &name)?,
            _ => self.typed::<f32>(args, &dev, (b, t), &name)?,
        };
        Ok((out, Shape::from(n)))
    }
}

/// Whether rows of `cols` elements suit the vectorised row kernels (add_rms_norm).
pub fn row_kernel_fits(cols: usize, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16 | DType::F32) && cols.is_multiple_of(pack(dtype))
}

/// RMSNorm of x [.., H] with weight [H], rounded as transformers' Glm4RMSNorm; with `ld`, rows of
/// ld values, zeros after the H (room for the next linear's LoRA columns).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, ld: Option<usize>) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &AddRmsNorm { eps, ld })
}

/// (x + a, RMSNorm(x + a)) for x, a [.., H]: the residual add fused with the next norm (whose rows
/// are `ld` values long with `ld`, as `rms_norm`).
pub fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f32,
    ld: Option<usize>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let flat = x.apply_op3_no_bwd(a, w, &AddRmsNorm { eps, ld })?;
    let n = x.elem_count();
    let mut dims = x.dims().to_vec();
    if let (Some(last), Some(ld)) = (dims.last_mut(), ld) {
        *last = ld;
    }
    let norm = flat.narrow(0, n, flat.elem_count() - n)?.reshape(dims)?;
    Ok((flat.narrow(0, 0, n)?.reshape(x.shape())?, norm))
}

struct AddRmsNorm {
    eps: f32,
    ld: Option<usize>,
}

impl AddRmsNorm {
    /// Checks shapes and returns (rows, cols).
    fn dims(&self, xl: &Layout, wl: &Layout, dtype: DType) -> candle_core::Result<(usize, usize)> {
        let cols = *xl.dims().last().unwrap_or(&0);
        let ld = self.ld.unwrap_or(cols);
        if wl.shape().elem_count() != cols || !row_kernel_fits(cols, dtype) || !row_kernel_fits(ld, dtype) || ld < cols
        {
            candle_core::bail!("rms norm: weight of {:?} for rows of {cols} in {ld} ({dtype:?})", wl.dims());
        }
        Ok((xl.shape().elem_count() / cols.max(1), cols))
    }

    /// Runs the kernel; returns the output ([sum | norm] with `a`, else norm) and the norm's row width.
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        x: (&CudaStorage, &Layout),
        a: Option<(&CudaStorage, &Layout)>,
        w: (&CudaStorage, &Layout),
        (rows, cols): (usize, usize),
    ) -> candle_core::Result<(CudaStorage, usize)> {
        let dev = x.0.device().clone();
        let v = pack(x.0.dtype());
        let xv = view::<T>(x.0, x.1, "rms norm", v)?;
        let wv = view::<T>(w.0, w.1, "rms norm weight", v)?;
        let av = a.map(|(s, l)| view::<T>(s, l, "residual", v)).transpose()?;
        let n = rows * cols;
        let name = format!("add_rms_norm_{}", suffix(x.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let ld = self.ld.unwrap_or(cols);
        let sum_len = if av.is_some() { n } else { 0 };
        // SAFETY: every element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(sum_len + rows * ld)? };
        let (cols_i, ld_i, null) = (cols as i32, ld as i32, 0u64);
        {
            let (mut sum, mut norm) = out.split_at_mut(sum_len);
            let mut b = func.builder();
            b.arg(&xv);
            match &av {
                Some(a) => b.arg(a),
                None => b.arg(&null),
            };
            b.arg(&wv);
            if av.is_some() {
                b.arg(&mut sum);
            } else {
                b.arg(&null);
            }
            b.arg(&mut norm);
            b.arg(&cols_i);
            b.arg(&self.eps);
            b.arg(&ld_i);
            // SAFETY: argument types match the kernel's signature; one block per row.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ld))
    }
}

impl CustomOp2 for AddRmsNorm {
    cuda_only!(op2, "fused-rms-norm");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = self.dims(xl, wl, x.dtype())?;
        let (out, ld) = by_dtype!(x.dtype(), T => self.go::<T>((x, xl), None, (w, wl), dims)?);
        let mut shape = xl.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = ld;
        }
        Ok((out, Shape::from(shape)))
    }
}

impl CustomOp3 for AddRmsNorm {
    cuda_only!(op3, "fused-add-rms-norm");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if al.dims() != xl.dims() {
            candle_core::bail!("add + rms norm: {:?} + {:?}", xl.dims(), al.dims());
        }
        let dims = self.dims(xl, wl, x.dtype())?;
        let (out, ld) = by_dtype!(x.dtype(), T => self.go::<T>((x, xl), Some((a, al)), (w, wl), dims)?);
        Ok((out, Shape::from(dims.0 * (dims.1 + ld))))
    }
}

/// Attention's heads-first output x [B, nh, t, hd] as token rows [B·t, ld]: the heads side by side,
/// then zeros (room for the o projection's LoRA columns).
pub fn merge_heads(x: &Tensor, ld: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MergeHeads { ld })
}

struct MergeHeads {
    ld: usize,
}

impl MergeHeads {
    fn go<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, nh, t, hd) = l.shape().dims4()?;
        let ld = self.ld;
        if ld < nh * hd {
            candle_core::bail!("merge heads: rows of {ld} for {nh} heads of {hd}");
        }
        let dev = s.device().clone();
        let v = pack(s.dtype());
        let align = if hd.is_multiple_of(v) && ld.is_multiple_of(v) { v } else { 1 };
        let xv = view::<T>(s, l, "merge heads", align)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(b * t * ld)? };
        let func = dev.get_or_load_custom_func(&format!("merge_heads_{}", suffix(s.dtype())?), MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: ((b * t).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let ints = [nh as i32, hd as i32, t as i32, ld as i32];
        let mut bld = func.builder();
        bld.arg(&xv);
        bld.arg(&out);
        for i in &ints {
            bld.arg(i);
        }
        // SAFETY: argument types match the kernel's signature; one block per token row.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b * t, ld))))
    }
}

impl CustomOp1 for MergeHeads {
    cuda_only!(op1, "fused-merge-heads");

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(s.dtype(), T => self.go::<T>(s, l))
    }
}

/// In place over xh [N, ld] (N = B·t token rows): zeroes the LoRA columns xh[:, in, in + R) where
/// mask [B, 1, R] (model dtype) is 0 for the token's batch row.
pub fn lora_mask_(xh: &Tensor, mask: &Tensor, inp: usize, t: usize) -> candle_core::Result<()> {
    xh.inplace_op2(&mask.contiguous()?, &LoraMask { inp, t })
}

struct LoraMask {
    inp: usize,
    t: usize,
}

impl InplaceOp2 for LoraMask {
    cuda_only!(inplace2, "fused-lora-mask");

    fn cuda_fwd(&self, xh: &mut CudaStorage, xl: &Layout, m: &CudaStorage, ml: &Layout) -> candle_core::Result<()> {
        let (n, ld) = xl.shape().dims2()?;
        let (b, _, r) = ml.shape().dims3()?;
        if self.t == 0 || n != b * self.t || self.inp + r > ld {
            candle_core::bail!("lora mask: {:?} for rows {:?} with {} columns of x", ml.dims(), xl.dims(), self.inp);
        }
        let (start, end) = contiguous(xl, "lora mask input")?;
        let dev = xh.device().clone();
        let name = format!("lora_mask_{}", suffix(xh.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let total = n * r;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_rows, ints) = (n as i64, [self.inp as i32, r as i32, ld as i32, self.t as i32]);
        macro_rules! go {
            ($t:ty) => {{
                let mut x = xh.as_cuda_slice_mut::<$t>()?.slice_mut(start..end);
                let mv = view::<$t>(m, ml, "lora mask", 1)?;
                let mut bld = func.builder();
                bld.arg(&mut x);
                bld.arg(&mv);
                bld.arg(&n_rows);
                for i in &ints {
                    bld.arg(i);
                }
                // SAFETY: argument types match the kernel's signature; one thread per value.
                unsafe { bld.launch(cfg) }.w()?;
            }};
        }
        by_dtype!(xh.dtype(), T => go!(T));
        Ok(())
    }
}

/// log p(targets[n]) under logits [N, V] (any float dtype) → [N] f32, one pass over the logits.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits.apply_op2_no_bwd(targets, &TargetLogProb)
}

struct TargetLogProb;

impl TargetLogProb {
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        x: (&CudaStorage, &Layout),
        tgt: (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, v) = x.1.shape().dims2()?;
        if tgt.1.shape().elem_count() != n {
            candle_core::bail!("target log-probs: {} targets for {n} rows", tgt.1.shape().elem_count());
        }
        let dev = x.0.device().clone();
        let xv = view::<T>(x.0, x.1, "logits", 1)?;
        let tv = view::<u32>(tgt.0, tgt.1, "targets", 1)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let name = format!("target_logprob_{}", suffix(x.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let vi = v as i32;
        let mut b = func.builder();
        b.arg(&xv);
        b.arg(&tv);
        b.arg(&out);
        b.arg(&vi);
        // SAFETY: argument types match the kernel's signature; one block per row.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
    }
}

impl CustomOp2 for TargetLogProb {
    cuda_only!(op2, "fused-target-log-prob");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(x.dtype(), T => self.go::<T>((x, xl), (t, tl)))
    }
}

/// Rows `idx` [N] u32 of src [R, C] (contiguous) → [N, C], reading only device memory (candle's
/// index_select copies its index layout from the host, which waits for the device's queue).
pub fn gather_rows(src: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
    src.apply_op2_no_bwd(idx, &GatherRows)
}

struct GatherRows;

impl GatherRows {
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        x: (&CudaStorage, &Layout),
        idx: (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (_, cols) = x.1.shape().dims2()?;
        let n = idx.1.shape().elem_count();
        let dev = x.0.device().clone();
        // 16-byte copies (used when a row is whole packs) need a pack-aligned start.
        let align = if cols.is_multiple_of(pack(x.0.dtype())) { pack(x.0.dtype()) } else { 1 };
        let xv = view::<T>(x.0, x.1, "gather source", align)?;
        let iv = view::<u32>(idx.0, idx.1, "gather rows", 1)?;
        let stream = dev.cuda_stream();
        let (src, _guard) = xv.device_ptr(&stream);
        // SAFETY: the callers' indices are below src's row count (they come from the engine's own
        // layouts, not from input files).
        let out = unsafe { gather_launch::<T>(&dev, src, &iv, n, cols)? };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, cols))))
    }
}

/// Launches `gather_rows` (kernels/fused.cu): rows `idx` [n] of the [R, cols] table of T at device
/// address `src` → a new [n, cols] buffer.
/// # Safety
/// Every index must be below the table's row count, and `src` valid until the kernel has run.
unsafe fn gather_launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    dev: &CudaDevice,
    src: u64,
    idx: &CudaView<u32>,
    n: usize,
    cols: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<T>(n * cols)? };
    if n > 0 {
        let func = dev.get_or_load_custom_func(&format!("gather_rows_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (n.min(1 << 30) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (nn, cc) = (n as i64, cols as i64);
        let mut b = func.builder();
        b.arg(&src);
        b.arg(idx);
        b.arg(&out);
        b.arg(&nn);
        b.arg(&cc);
        // SAFETY: the arguments match the kernel's (src, idx, out, n, cols); the caller vouches
        // for the indices and the table.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

impl CustomOp2 for GatherRows {
    cuda_only!(op2, "gather-rows");

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        i: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if i.dtype() != DType::U32 {
            candle_core::bail!("gather rows: indices must be u32, not {:?}", i.dtype());
        }
        by_dtype!(x.dtype(), T => self.go::<T>((x, xl), (i, il)))
    }
}

/// Flash attention (kernels/fused.cu `flash_attn`): q [B, nh, t, D] (contiguous), k, v
/// [B, kvh, s, D] (rows contiguous, heads any distance apart: KV-cache views), `pad` [B] u32 → the o
/// projection's input rows [B·t, ld]: heads merged, zeros after nh·D. bf16/f16, D in {16, 32, 64, 128}.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: &Tensor,
    scale: f32,
    ld: usize,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(k, v, &Flash { pad: pad.clone(), scale, ld })
}

/// Whether `flash_attention` takes this head size and dtype, in this build (kernels compiled for sm_80+).
pub fn flash_fits(head_dim: usize, dtype: DType) -> bool {
    let cap: u32 = env!("GLM4_VERIFY_PTX_CAP").parse().unwrap_or(0);
    cap >= 80 && matches!(head_dim, 16 | 32 | 64 | 128) && matches!(dtype, DType::BF16 | DType::F16)
}

struct Flash {
    pad: Tensor,
    scale: f32,
    ld: usize,
}

impl Flash {
    /// (offset of the first element, distance between heads) of a [B, kvh, s, D] view with contiguous rows.
    fn kv_layout(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
        let (_, kvh, _, d) = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1
            || st[2] != d
            || st[0] != kvh * st[1]
            || !st[1].is_multiple_of(8)
            || !l.start_offset().is_multiple_of(8)
        {
            candle_core::bail!("flash attention: {what} strides {st:?} for {:?}", l.dims());
        }
        Ok((l.start_offset(), st[1]))
    }

    fn go<T: CudaDType + DeviceRepr>(
        &self,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, nh, t, d) = q.1.shape().dims4()?;
        let (kb, kvh, s, kd) = k.1.shape().dims4()?;
        // Output rows are written two values at a time: ld must be even.
        let bad_ld = self.ld < nh * d || !self.ld.is_multiple_of(2);
        if kb != b || kd != d || v.1.dims() != k.1.dims() || kvh == 0 || nh % kvh != 0 || s < t || bad_ld {
            candle_core::bail!(
                "flash attention: q {:?}, k {:?}, v {:?}, rows of {}",
                q.1.dims(),
                k.1.dims(),
                v.1.dims(),
                self.ld
            );
        }
        let (ko, khs) = Self::kv_layout(k.1, "k")?;
        let (vo, vhs) = Self::kv_layout(v.1, "v")?;
        if khs != vhs {
            candle_core::bail!("flash attention: k and v heads {khs} and {vhs} apart");
        }
        let dev = q.0.device().clone();
        let qv = view::<T>(q.0, q.1, "flash q", 8)?;
        let kv = k.0.as_cuda_slice::<T>()?.slice(ko..);
        let vv = v.0.as_cuda_slice::<T>()?.slice(vo..);
        let (pg, pl) = self.pad.storage_and_layout();
        let candle_core::Storage::Cuda(ps) = &*pg else {
            candle_core::bail!("flash attention: pads must be on the GPU")
        };
        let pv = view::<u32>(ps, pl, "flash pads", 1)?;
        if pv.len() != b {
            candle_core::bail!("flash attention: {} pads for {b} rows", pv.len());
        }
        // SAFETY: every element is written by the kernel (heads, then zeros up to ld).
        let out = unsafe { dev.alloc::<T>(b * t * self.ld)? };
        // The heads sharing a key/value head go into one block when their queries fit (decoding);
        // up to 16 query rows, the block's warps split the keys instead of the rows.
        let g = nh / kvh;
        let pk = if g * t <= 64 { g } else { 1 };
        let kernel = if pk * t <= 16 { "flash_decode" } else { "flash_attn" };
        let func = dev.get_or_load_custom_func(&format!("{kernel}_{}_{d}", suffix(q.0.dtype())?), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: ((nh / pk) as u32, b as u32, (pk * t).div_ceil(64) as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [nh as i32, kvh as i32, t as i32, s as i32];
        let (hs, ld) = (khs as i64, self.ld as i32);
        let mut bld = func.builder();
        bld.arg(&qv);
        bld.arg(&kv);
        bld.arg(&vv);
        bld.arg(&pv);
        bld.arg(&out);
        for i in &ints {
            bld.arg(i);
        }
        bld.arg(&hs);
        bld.arg(&ld);
        bld.arg(&self.scale);
        let pk = pk as i32;
        bld.arg(&pk);
        // SAFETY: argument types match the kernel's signature; the grid covers every (query block, head, row).
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b * t, self.ld))))
    }
}

impl CustomOp3 for Flash {
    cuda_only!(op3, "flash-attention");

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.go::<bf16>((q, ql), (k, kl), (v, vl)),
            DType::F16 => self.go::<f16>((q, ql), (k, kl), (v, vl)),
            d => candle_core::bail!("flash attention takes bf16 or f16, not {d:?}"),
        }
    }
}

/// A [rows, cols] table in page-locked host memory that the gather kernel reads in place, over
/// the bus: the input embedding when GPU memory is tight (a lookup reads one row per token, a
/// few MB per pass, where the table takes 1.2 GB of the GPU on GLM-4-9B).
pub struct HostRows {
    backing: Backing,
    /// Where the lookups run: waited for before the memory goes.
    stream: Arc<CudaStream>,
    /// The table's address as kernels see it (unified addressing).
    ptr: u64,
    bytes: usize,
    cols: usize,
    dtype: DType,
}

enum Backing {
    /// A copy in page-locked memory.
    Pinned(#[allow(dead_code)] candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u8>),
    /// The pages of a memory-mapped file (in the page cache), registered read-only where they are.
    File { _map: Arc<memmap2::Mmap>, start: usize },
}

impl Drop for HostRows {
    fn drop(&mut self) {
        // The lookups queued on the stream read the memory until they end.
        let _ = self.stream.synchronize();
        if let Backing::File { start, .. } = self.backing {
            if self.stream.context().bind_to_thread().is_ok() {
                // SAFETY: `start` was registered by `HostRows::from_file`, and nothing reads it now.
                let _ = unsafe { sys::cuMemHostUnregister(start as *mut std::ffi::c_void) };
            }
        }
    }
}

impl HostRows {
    /// A copy of `t` [rows, cols] (contiguous, on CUDA) in mapped host memory.
    pub fn from_device(t: &Tensor) -> candle_core::Result<Self> {
        let (_, cols) = t.dims2()?;
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else { candle_core::bail!("host rows: a CUDA tensor expected") };
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let ctx = stream.context().clone();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: every byte is written by the copy below before any read.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }.w()?;
        let dst = host.as_mut_ptr().w()?;
        let (a, _) = contiguous(layout, "host rows")?;
        let src = by_dtype!(t.dtype(), T => {
            let v = s.as_cuda_slice::<T>()?.slice(a..a + t.elem_count());
            let p = v.device_ptr(&stream).0;
            p
        });
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `dst` holds `bytes` bytes, `src` as many on the device; the copy ends before return.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst as *mut std::ffi::c_void, src, bytes, stream.cu_stream()).result().w()?;
            stream.synchronize().w()?;
            sys::cuMemHostGetDevicePointer_v2(&mut ptr, dst as *mut std::ffi::c_void, 0).result().w()?;
        }
        Ok(HostRows { backing: Backing::Pinned(host), stream: stream.clone(), ptr, bytes, cols, dtype: t.dtype() })
    }

    /// The table at `range` of a memory-mapped file, [rows, cols] of `dtype` as stored, used in
    /// place: its pages are registered with the driver (read-only), not copied; ~35 GB/s against
    /// ~3 GB/s for allocating page-locked memory and copying into it.
    pub fn from_file(
        map: Arc<memmap2::Mmap>,
        range: std::ops::Range<usize>,
        cols: usize,
        dtype: DType,
        dev: &CudaDevice,
    ) -> candle_core::Result<Self> {
        const PAGE: usize = 4096;
        // The kernel's 16-byte loads need 16-byte aligned rows (safetensors aligns tensors to
        // their element size only).
        if !(map.as_ptr() as usize + range.start).is_multiple_of(16) {
            candle_core::bail!("host rows: the table is not 16-byte aligned in its file");
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let base = map.as_ptr() as usize;
        let (start, end) = ((base + range.start) / PAGE * PAGE, (base + range.end).next_multiple_of(PAGE));
        let flags =
            sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: [start, end) lies in the map's pages (mappings cover whole pages), which the
        // returned value keeps mapped until it unregisters them.
        unsafe {
            sys::cuMemHostRegister_v2(start as *mut std::ffi::c_void, end - start, flags).result().w()?;
            let backing = Backing::File { _map: map, start };
            let mut rows = HostRows { backing, stream, ptr: 0, bytes: range.len(), cols, dtype };
            sys::cuMemHostGetDevicePointer_v2(&mut ptr, start as *mut std::ffi::c_void, 0).result().w()?;
            rows.ptr = ptr + (base + range.start - start) as u64;
            Ok(rows)
        }
    }

    /// Bytes of the table.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rows `idx` ([N] u32 on the device) → [N, cols] on the device.
    pub fn gather(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        idx.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for HostRows {
    cuda_only!(op1, "host-rows");

    fn cuda_fwd(&self, i: &CudaStorage, il: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if i.dtype() != DType::U32 {
            candle_core::bail!("host rows: indices must be u32, not {:?}", i.dtype());
        }
        let n = il.shape().elem_count();
        let dev = i.device().clone();
        let iv = view::<u32>(i, il, "host rows", 1)?;
        let cols = self.cols;
        by_dtype!(self.dtype, T => {
            // SAFETY: the table stays registered while the model holds it (its Drop waits for the
            // stream); the indices are token ids, checked against the vocabulary (its rows).
            let out = unsafe { gather_launch::<T>(&dev, self.ptr, &iv, n, cols)? };
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, cols))))
        })
    }
}
